//! The dead-letter queue: records a consumer cannot process are produced, unchanged, to
//! the dead-letter topic with the reason and their origin in headers. Nothing is dropped
//! silently, and a limit stops a consumer that rejects everything (a bad deploy) instead
//! of letting it dead-letter a whole topic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::kafka::producer::{OutgoingRecord, Producer};
use crate::kafka::record::RawRecord;
use crate::sink::{Rejection, SinkError};

/// Header names on dead-lettered records.
pub mod headers {
    pub const REASON: &str = "cdp.dlq.reason";
    pub const KIND: &str = "cdp.dlq.kind";
    pub const TOPIC: &str = "cdp.dlq.topic";
    pub const PARTITION: &str = "cdp.dlq.partition";
    pub const OFFSET: &str = "cdp.dlq.offset";
    pub const GROUP: &str = "cdp.dlq.group";
    pub const TIMESTAMP: &str = "cdp.dlq.timestamp";
}

#[derive(Debug, thiserror::Error)]
#[error("{count} consecutive records were dead-lettered (limit {limit}); stopping so a bad deploy does not dead-letter the whole topic")]
pub struct DeadLetterLimit {
    pub count: u64,
    pub limit: u64,
}

/// A record and why it was rejected.
pub struct DeadLetter<'a> {
    pub record: &'a RawRecord,
    pub rejection: Rejection,
}

/// Clones share the consecutive count (a sink's lanes send their batch's letters through
/// clones of the runner's).
#[derive(Clone)]
pub struct DeadLetters {
    producer: Arc<Producer>,
    topic: String,
    group: String,
    max_consecutive: u64,
    consecutive: Arc<AtomicU64>,
}

impl DeadLetters {
    pub fn new(
        producer: Arc<Producer>,
        topic: impl Into<String>,
        group: impl Into<String>,
        max_consecutive: u64,
    ) -> Self {
        Self {
            producer,
            topic: topic.into(),
            group: group.into(),
            max_consecutive,
            consecutive: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produces the letters and waits for the broker's acknowledgement. `applied` is how
    /// many records of the same batch were applied (it resets the consecutive count).
    /// Call before the sink's positions move past the letters.
    pub async fn send(&self, letters: &[DeadLetter<'_>], applied: u64) -> Result<(), SinkError> {
        let dead = letters.len() as u64;
        let prospective = if applied > 0 {
            dead
        } else {
            self.consecutive.load(Ordering::Relaxed) + dead
        };
        if self.max_consecutive > 0 && prospective > self.max_consecutive {
            return Err(SinkError::Fatal(Box::new(DeadLetterLimit {
                count: prospective,
                limit: self.max_consecutive,
            })));
        }
        if letters.is_empty() {
            self.consecutive.store(prospective, Ordering::Relaxed);
            return Ok(());
        }
        let meta: Vec<[String; 4]> = letters
            .iter()
            .map(|l| {
                [
                    l.record.partition.to_string(),
                    l.record.offset.to_string(),
                    l.record
                        .timestamp_ms
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    l.rejection.reason.clone(),
                ]
            })
            .collect();
        let recs: Vec<OutgoingRecord<'_>> = letters
            .iter()
            .zip(&meta)
            .map(|(l, [partition, offset, ts, reason])| {
                let mut hs: Vec<(&str, Option<&[u8]>)> = l.record.headers.iter().collect();
                hs.push((headers::REASON, Some(reason.as_bytes())));
                hs.push((headers::KIND, Some(l.rejection.kind.as_bytes())));
                hs.push((headers::TOPIC, Some(l.record.topic.as_bytes())));
                hs.push((headers::PARTITION, Some(partition.as_bytes())));
                hs.push((headers::OFFSET, Some(offset.as_bytes())));
                hs.push((headers::GROUP, Some(self.group.as_bytes())));
                hs.push((headers::TIMESTAMP, Some(ts.as_bytes())));
                OutgoingRecord {
                    topic: &self.topic,
                    key: l.record.key.as_deref(),
                    value: l.record.value.as_deref(),
                    headers: hs,
                    timestamp_ms: None,
                    partition: None,
                }
            })
            .collect();
        for l in letters {
            tracing::warn!(
                topic = %l.record.topic,
                partition = l.record.partition,
                offset = l.record.offset,
                kind = l.rejection.kind,
                reason = %l.rejection.reason,
                dlq = %self.topic,
                "dead-lettering record"
            );
        }
        self.producer.send_all(&recs).await.map_err(|e| {
            if e.is_retryable() {
                SinkError::Retryable(Box::new(e))
            } else {
                SinkError::Fatal(Box::new(e))
            }
        })?;
        self.consecutive.store(prospective, Ordering::Relaxed);
        Ok(())
    }
}
