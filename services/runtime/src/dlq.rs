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

/// A dead letter read back from the dead-letter topic: where it came from, why, and the
/// record as it was (its headers without the `cdp.dlq.*` ones).
#[derive(Clone, Debug)]
pub struct Letter {
    /// Where the letter is in the dead-letter topic.
    pub at: (i32, i64),
    /// When it was dead-lettered (the letter's timestamp).
    pub dead_lettered_ms: Option<i64>,
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub kind: String,
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The original record's timestamp.
    pub timestamp_ms: Option<i64>,
}

/// Which dead letters to read (every field that is set must match).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub topic: Option<String>,
    /// Dead-lettered at or after this time (milliseconds since the epoch).
    pub since_ms: Option<i64>,
}

impl Filter {
    fn admits(&self, l: &Letter) -> bool {
        self.group.as_ref().is_none_or(|g| *g == l.group)
            && self.kind.as_ref().is_none_or(|k| *k == l.kind)
            && self.topic.as_ref().is_none_or(|t| *t == l.topic)
            && self
                .since_ms
                .is_none_or(|s| l.dead_lettered_ms.is_some_and(|t| t >= s))
    }
}

/// Header naming the letter a re-driven record came from (`<dead-letter topic>:<partition>:<offset>`).
pub const REDRIVEN_FROM: &str = "cdp.dlq.redriven-from";

impl Letter {
    /// Reads a dead-letter record; `None` for a record without the headers every letter carries.
    pub fn from_record(r: &RawRecord) -> Option<Self> {
        let text = |name: &str| {
            r.headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        Some(Self {
            at: (r.partition, r.offset),
            dead_lettered_ms: r.timestamp_ms,
            group: text(headers::GROUP)?,
            topic: text(headers::TOPIC)?,
            partition: text(headers::PARTITION)?.parse().ok()?,
            offset: text(headers::OFFSET)?.parse().ok()?,
            kind: text(headers::KIND).unwrap_or_default(),
            reason: text(headers::REASON).unwrap_or_default(),
            key: r.key.as_ref().map(|k| k.to_vec()),
            value: r.value.as_ref().map(|v| v.to_vec()),
            headers: r
                .headers
                .iter()
                .filter(|(k, _)| !k.starts_with("cdp.dlq."))
                .map(|(k, v)| (k.to_owned(), v.map(<[u8]>::to_vec)))
                .collect(),
            timestamp_ms: text(headers::TIMESTAMP).and_then(|t| t.parse().ok()),
        })
    }
}

/// Every dead letter of `dlq_topic` that `filter` admits, once per origin (group, topic,
/// partition, offset; the first copy: a letter produced twice, by a process that died
/// between producing and recording it, is listed once), in the order they were written.
pub fn read(
    kafka: &crate::config::KafkaArgs,
    dlq_topic: &str,
    filter: &Filter,
) -> Result<Vec<Letter>, crate::replay::ReplayError> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    crate::replay::scan(
        kafka,
        &[dlq_topic.to_owned()],
        std::time::Duration::from_secs(30),
        |r| {
            if let Some(l) = Letter::from_record(r) {
                let origin = (l.group.clone(), l.topic.clone(), l.partition, l.offset);
                if filter.admits(&l) && seen.insert(origin) {
                    out.push(l);
                }
            }
        },
    )?;
    out.sort_by_key(|l| (l.dead_lettered_ms, l.at));
    Ok(out)
}

/// Produces each letter's record again onto its original topic and partition: key, value,
/// headers and timestamp as they were, plus [`REDRIVEN_FROM`]. Every consumer of the topic
/// reads it; those that applied the record before (every group but the one that dead-lettered
/// it) recognise its event id and change nothing, so a re-drive can be repeated. Returns how
/// many records were produced.
pub async fn redrive(
    producer: &Producer,
    dlq_topic: &str,
    letters: &[Letter],
) -> Result<usize, crate::kafka::producer::ProduceError> {
    let from: Vec<String> = letters
        .iter()
        .map(|l| format!("{dlq_topic}:{}:{}", l.at.0, l.at.1))
        .collect();
    let records: Vec<OutgoingRecord<'_>> = letters
        .iter()
        .zip(&from)
        .map(|(l, from)| {
            let mut hs: Vec<(&str, Option<&[u8]>)> = l
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect();
            hs.push((REDRIVEN_FROM, Some(from.as_bytes())));
            OutgoingRecord {
                topic: &l.topic,
                key: l.key.as_deref(),
                value: l.value.as_deref(),
                headers: hs,
                timestamp_ms: l.timestamp_ms,
                partition: Some(l.partition),
            }
        })
        .collect();
    producer.send_all(&records).await?;
    Ok(records.len())
}
