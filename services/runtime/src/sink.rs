//! What the consumer runner needs from a sink: where each partition stands, and a way to
//! apply a batch atomically with the new positions. Offsets live in the sink, never only
//! in Kafka, so a crash at any point neither loses nor repeats an effect.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as StdError;
use std::future::Future;

use crate::dlq::DeadLetters;
use crate::kafka::record::{RawRecord, TopicPartition};

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A sink failure, classified so the runner knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Transient (connection lost, serialization conflict, broker unavailable): the batch
    /// is rolled back and retried with back-off, without advancing.
    #[error("retryable sink failure")]
    Retryable(#[source] BoxError),
    /// A defect or a state no retry can fix: the consumer stops with an error.
    #[error("fatal sink failure")]
    Fatal(#[source] BoxError),
    /// The store refused data a record of the batch carries (a value Postgres cannot hold,
    /// such as a NUL character in text): the record's fault, not the service's. A sink that
    /// can tell which record it was dead-letters it and applies the rest (`PgSink` does); for
    /// the runner it is fatal like [`SinkError::Fatal`] (see `pg::classify` for the SQLSTATEs).
    #[error("the store refused a record's data")]
    Refused(#[source] BoxError),
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Retryable(_))
    }
}

/// Why one record cannot be applied: it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Short stable name (`corrupt_avro`, `unknown_fingerprint`, `invalid`, ...).
    pub kind: &'static str,
    /// Human-readable cause chain. Never contains PII.
    pub reason: String,
}

impl Rejection {
    pub fn new(kind: &'static str, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }

    /// From an error, with its whole `source()` chain.
    pub fn from_error(kind: &'static str, e: &(dyn StdError + 'static)) -> Self {
        let mut reason = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            cur = s.source();
        }
        Self { kind, reason }
    }
}

/// Per-topic counts of what a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub applied: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub per_topic: BTreeMap<String, Counts>,
}

impl ApplyStats {
    pub fn topic(&mut self, topic: &str) -> &mut Counts {
        self.per_topic.entry(topic.to_owned()).or_default()
    }

    /// Adds another part's counts (a lane of the same batch).
    pub fn add(&mut self, other: ApplyStats) {
        for (topic, c) in other.per_topic {
            let mine = self.topic(&topic);
            mine.applied += c.applied;
            mine.skipped += c.skipped;
            mine.dead_lettered += c.dead_lettered;
        }
    }

    pub fn total(&self) -> Counts {
        self.per_topic
            .values()
            .fold(Counts::default(), |a, c| Counts {
                applied: a.applied + c.applied,
                skipped: a.skipped + c.skipped,
                dead_lettered: a.dead_lettered + c.dead_lettered,
            })
    }
}

/// A destination that stores its own consumer positions.
pub trait Sink: Send + Sync + 'static {
    /// The next offset to read for each partition the sink has seen; partitions it has
    /// never applied anything from are absent.
    fn positions<'a>(
        &'a self,
        partitions: &'a [TopicPartition],
    ) -> impl Future<Output = Result<HashMap<TopicPartition, i64>, SinkError>> + Send + 'a;

    /// A batch made ready for [`Sink::apply`] (decoded, for instance).
    type Prepared: Send + Sync + 'static;

    /// Work on a batch that needs no transaction and changes nothing (decoding). The runner
    /// prepares the next batch while the previous one is being applied, so this work and the
    /// sink's own (the database's) overlap.
    fn prepare(&self, batch: Vec<RawRecord>) -> Self::Prepared;

    /// The records of a prepared batch, in the order they were given.
    fn records(batch: &Self::Prepared) -> &[RawRecord];

    /// Applies a batch (each partition's records in offset order) and records the new
    /// positions, atomically. Records at offsets the sink already holds have no effect.
    /// Records that cannot be applied go to `dlq` before the positions move past them.
    /// A failed attempt may be retried with the same prepared batch.
    fn apply<'a>(
        &'a self,
        batch: &'a Self::Prepared,
        dlq: &'a DeadLetters,
    ) -> impl Future<Output = Result<ApplyStats, SinkError>> + Send + 'a;

    /// Called by the runner about five times a second while no batch is pending, for sinks that
    /// hold records back until a time-based rule releases them (the archiver closes the
    /// files at the tail of the log). Does nothing by default.
    fn tick(&self) -> impl Future<Output = Result<(), SinkError>> + Send + '_ {
        async { Ok(()) }
    }

    /// Called when partitions go to another consumer, after the in-flight batch was
    /// applied, and for every held partition at shutdown before the group is left: a sink
    /// holding records back must forget them, and finish or give up whatever it still does
    /// for them in the background (the new owner starts from the sink's positions). Does
    /// nothing by default.
    fn revoked<'a>(
        &'a self,
        partitions: &'a [TopicPartition],
    ) -> impl Future<Output = ()> + Send + 'a {
        let _ = partitions;
        async {}
    }
}
