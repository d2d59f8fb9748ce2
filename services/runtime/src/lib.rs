//! Shared plumbing of every CDP service, written once: configuration, telemetry, shutdown,
//! the admin HTTP server (health and metrics), the topic catalogue, the Kafka producer and
//! the consumer runner with its sinks (Postgres offsets in the handler's transaction,
//! dead-letter queue).
//!
//! A service crate only supplies its domain logic: a [`pg::PgHandler`] (or its own
//! [`sink::Sink`]) and a `run(config, shutdown)` entry.

pub mod admin;
pub mod auth;
pub mod config;
pub mod dlq;
pub mod kafka;
pub mod metrics;
pub mod outbox;
pub mod pg;
pub mod replay;
pub mod shutdown;
pub mod sink;
pub mod telemetry;
pub mod topics;

pub use kafka::record::{RawRecord, RecordCopier, RecordHeaders, TopicPartition};
pub use shutdown::Shutdown;
