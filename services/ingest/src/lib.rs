//! The ingest service: a Segment-compatible HTTP tracking API and native contract events,
//! into Kafka. Every 2xx means every accepted event is acknowledged by the broker
//! (idempotent producer, `acks=all`); invalid events never reach Kafka.
//!
//! [`publisher`] is also the library for apps that produce straight to Kafka: the same
//! validation, PII sealing and keying as the HTTP path.

pub mod config;
pub mod currency;
pub mod fields;
pub mod http;
pub mod metrics;
pub mod native;
pub mod openapi;
pub mod publisher;
pub mod rejections;
pub mod segment;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cdp_keystore::config::KeyArgs;
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{KafkaArgs, PostgresArgs};
use cdp_runtime::kafka::producer::{Producer, ProducerOptions};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::topics::Topics;
use cdp_runtime::{pg, Shutdown};

use config::IngestArgs;
use http::App;
use publisher::Publisher;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    WriteKeys(#[from] config::WriteKeyError),
    #[error("key material")]
    Keys(#[from] cdp_keystore::CryptoError),
    #[error("Kafka producer")]
    Kafka(#[from] cdp_runtime::kafka::KafkaSetupError),
    #[error("Postgres")]
    Db(#[from] sqlx::Error),
    #[error("migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Patterns(#[from] cdp_keystore::identifiers::PatternError),
}

/// Everything `cdp ingest` needs.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub kafka: KafkaArgs,
    pub pg: PostgresArgs,
    pub keys: KeyArgs,
    pub ingest: IngestArgs,
}

/// Applies the migrations the ingest service needs (key store, rejection log).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), IngestError> {
    cdp_keystore::store::migrator().run(pool).await?;
    rejections::migrator().run(pool).await?;
    Ok(())
}

/// Binds the API; the returned future serves until shutdown.
pub async fn bind(
    config: IngestConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: Shutdown,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = Result<(), IngestError>>,
    ),
    IngestError,
> {
    let write_keys = config.ingest.write_key_map()?;
    let pool = pg::connect(&config.pg).await?;
    migrate(&pool).await?;
    let keys = Arc::new(config.keys.key_store(pool.clone())?);
    let vault = Arc::new(config.keys.vault(pool.clone())?);
    let producer = Arc::new(Producer::with_options(
        &config.kafka,
        ProducerOptions {
            // A dead broker must turn into a 503 in bounded time, not a hung request.
            delivery_timeout: config.ingest.produce_timeout(),
            ..ProducerOptions::default()
        },
    )?);
    let app = Arc::new(App {
        publisher: Publisher::new(
            producer,
            keys,
            vault,
            Topics::new(&config.kafka.topic_prefix),
        )
        .with_blocked_patterns(cdp_keystore::BlockPatterns::parse(
            &config.ingest.blocked_patterns,
        )?),
        write_keys,
        limits: config.ingest.limits(),
        produce_timeout: config.ingest.produce_timeout(),
        retry_after_secs: config.ingest.retry_after_secs,
        auth_failures: cdp_runtime::auth::FailureThrottle::new(
            config.ingest.auth_failures_per_minute,
            Duration::from_secs(60),
        ),
        metrics: metrics::IngestMetrics::register(metrics),
        pool,
    });
    let listener = tokio::net::TcpListener::bind(config.ingest.addr)
        .await
        .map_err(|source| IngestError::Bind {
            addr: config.ingest.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(IngestError::Serve)?;
    let ready = readiness.component("ingest");
    let serve = async move {
        ready.set(true);
        tracing::info!(%addr, "ingest API listening");
        let result = axum::serve(
            listener,
            http::router(app).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
        .map_err(IngestError::Serve);
        ready.set(false);
        result
    };
    Ok((addr, serve))
}

/// Runs the ingest service until shutdown.
pub async fn run(
    config: IngestConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: Shutdown,
) -> Result<(), IngestError> {
    let (_, serve) = bind(config, metrics, readiness, shutdown).await?;
    serve.await
}
