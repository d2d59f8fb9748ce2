//! A transactional outbox of ready Kafka records, relayed without duplicates.
//!
//! A service writes records into its outbox table in the same Postgres transaction as the
//! state they describe ([`push`]); a relay produces them in `seq` order and deletes them.
//! The broker has no Kafka transactions, so "produced, then deleted" has a gap: a relay that
//! dies after producing and before deleting would produce the same records again. The relay
//! closes it: before producing it marks the outbox dirty, each record carries its `seq` in
//! the `cdp-outbox-seq` header and goes to a partition computed from its key, and a pass that
//! finds the outbox dirty first reads the last record of each partition it is about to write
//! to and skips the rows already there. The idempotent producer keeps each partition in
//! `seq` order, so what a dead relay published is a prefix per partition.
//!
//! Writers must hand out `seq` in commit order (a service serializes its writing
//! transactions, e.g. with an advisory lock); one relay runs at a time (a session advisory
//! lock, released when its connection closes, also when the process dies).
//!
//! A record can be a barrier ([`Release`]): it leaves only once every record before it is
//! published and deleted, and, with a gate, once the outbox's gate table (another queue
//! of the service with a `seq`) holds no row at or below a position. An answer that says
//! "done" is a barrier behind the records it speaks for, so whoever reads the answer finds
//! those records on their topics and no longer in the outbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool};

use crate::config::KafkaArgs;
use crate::kafka::producer::{OutgoingRecord, ProduceError, Producer};
use crate::kafka::{client_config, KafkaSetupError};
use crate::replay;
use crate::{Shutdown, TopicPartition};

/// The header carrying a record's outbox sequence number.
pub const SEQ_HEADER: &str = "cdp-outbox-seq";

/// How long reading the last record of a partition may take.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// A record waiting in an outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub release: Release,
}

/// When a record may leave the outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Release {
    /// With the records around it, in `seq` order.
    #[default]
    InOrder,
    /// Alone, after every earlier record of the outbox is published and deleted.
    Barrier,
    /// As a barrier, and after the outbox's gate table holds no row with `seq` at or below
    /// this position (see [`gate_position`]).
    BarrierAfterGate(i64),
}

impl Record {
    /// A record with a value under a string key (an event's partition key), no headers.
    pub fn keyed(topic: &str, key: &str, value: Vec<u8>) -> Self {
        Self {
            topic: topic.to_owned(),
            key: Some(key.as_bytes().to_vec()),
            value: Some(value),
            headers: Vec::new(),
            release: Release::InOrder,
        }
    }

    /// A tombstone of `key`.
    pub fn tombstone(topic: &str, key: &[u8]) -> Self {
        Self {
            topic: topic.to_owned(),
            key: Some(key.to_vec()),
            value: None,
            headers: Vec::new(),
            release: Release::InOrder,
        }
    }

    /// The same record, released as `release` says.
    pub fn released(mut self, release: Release) -> Self {
        self.release = release;
        self
    }
}

/// An outbox: its records table (`seq BIGSERIAL, topic, key, value, headers, barrier,
/// gate_seq`) and its one-row state table (`dirty`), both in the service's schema.
#[derive(Clone, Copy, Debug)]
pub struct Outbox {
    pub records: &'static str,
    pub state: &'static str,
    /// Another queue of the service (a table with a `seq` column whose rows are deleted
    /// once published) that [`Release::BarrierAfterGate`] records wait for.
    pub gate: Option<&'static str>,
}

/// The position in the outbox's gate table a barrier written now must wait for: the
/// highest `seq` the caller's transaction can see, its own rows included.
pub async fn gate_position(tx: &mut PgConnection, outbox: Outbox) -> Result<i64, sqlx::Error> {
    let Some(gate) = outbox.gate else {
        return Ok(0);
    };
    let (seq,): (Option<i64>,) = sqlx::query_as(&format!("SELECT max(seq) FROM {gate}"))
        .fetch_one(&mut *tx)
        .await?;
    Ok(seq.unwrap_or(0))
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database")]
    Db(#[from] sqlx::Error),
    #[error("producing")]
    Produce(#[from] ProduceError),
    #[error("reading what was already published")]
    Replay(#[from] replay::ReplayError),
    #[error("Kafka")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("Kafka client")]
    Setup(#[from] KafkaSetupError),
    #[error("topic {0} has no partitions")]
    NoPartitions(String),
    #[error("a blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Headers as one column: per header a u16 name length, the name, a u32 value length, the
/// value (big endian).
pub fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in headers {
        let (kl, vl) = (
            k.len().min(u16::MAX as usize),
            v.len().min(u32::MAX as usize),
        );
        out.extend_from_slice(&(kl as u16).to_be_bytes());
        out.extend_from_slice(&k.as_bytes()[..kl]);
        out.extend_from_slice(&(vl as u32).to_be_bytes());
        out.extend_from_slice(&v[..vl]);
    }
    out
}

/// The inverse of [`encode_headers`]; a truncated tail is ignored.
pub fn decode_headers(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((kl, rest)) = b.split_first_chunk::<2>() {
        let kl = u16::from_be_bytes(*kl) as usize;
        if rest.len() < kl {
            break;
        }
        let (k, rest) = rest.split_at(kl);
        let Some((vl, rest)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let vl = u32::from_be_bytes(*vl) as usize;
        if rest.len() < vl {
            break;
        }
        let (v, rest) = rest.split_at(vl);
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
        b = rest;
    }
    out
}

/// Writes records into the outbox, in order, inside the caller's transaction.
pub async fn push(
    tx: &mut PgConnection,
    outbox: Outbox,
    records: &[Record],
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = records.iter().map(|r| r.topic.as_str()).collect();
    let keys: Vec<Option<&[u8]>> = records.iter().map(|r| r.key.as_deref()).collect();
    let values: Vec<Option<&[u8]>> = records.iter().map(|r| r.value.as_deref()).collect();
    let headers: Vec<Vec<u8>> = records.iter().map(|r| encode_headers(&r.headers)).collect();
    let barriers: Vec<bool> = records
        .iter()
        .map(|r| r.release != Release::InOrder)
        .collect();
    let gates: Vec<Option<i64>> = records
        .iter()
        .map(|r| match r.release {
            Release::BarrierAfterGate(seq) => Some(seq),
            _ => None,
        })
        .collect();
    sqlx::query(&format!(
        "INSERT INTO {} (topic, key, value, headers, barrier, gate_seq)
         SELECT t, k, v, h, b, g
           FROM UNNEST($1::text[], $2::bytea[], $3::bytea[], $4::bytea[], $5::bool[], $6::int8[])
             WITH ORDINALITY AS x(t, k, v, h, b, g, n) ORDER BY n",
        outbox.records
    ))
    .bind(&topics)
    .bind(&keys)
    .bind(&values)
    .bind(&headers)
    .bind(&barriers)
    .bind(&gates)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The partition a record goes to: Kafka's default partitioner for a keyed record (murmur2,
/// as the producer and every Java client compute it, so records of one key share a partition
/// whichever path wrote them), its sequence number modulo the partition count otherwise.
pub fn partition_for(key: Option<&[u8]>, seq: i64, partitions: i32) -> i32 {
    match key {
        Some(k) => crate::kafka::partition::partition_of(k, partitions),
        None => (seq.rem_euclid(i64::from(partitions.max(1)))) as i32,
    }
}

/// The highest outbox seq already in each partition (partitions holding none are absent).
fn published(
    kafka: &KafkaArgs,
    parts: &[TopicPartition],
) -> Result<HashMap<TopicPartition, i64>, RelayError> {
    let topics: Vec<String> = parts
        .iter()
        .map(|p| p.topic.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let marks = replay::watermarks(kafka, &topics)?;
    let mut want = TopicPartitionList::new();
    let mut pending = BTreeSet::new();
    for p in parts {
        if let Some((low, high)) = marks.get(p) {
            if high > low {
                want.add_partition_offset(&p.topic, p.partition, Offset::Offset(high - 1))?;
                pending.insert(p.clone());
            }
        }
    }
    let mut out = HashMap::new();
    if pending.is_empty() {
        return Ok(out);
    }
    let c: BaseConsumer = client_config(kafka)
        .map_err(KafkaSetupError::from)?
        .set("group.id", "cdp.outbox-relay")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(KafkaSetupError::from)?;
    c.assign(&want)?;
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    while !pending.is_empty() && std::time::Instant::now() < deadline {
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let tp = TopicPartition {
            topic: m.topic().to_owned(),
            partition: m.partition(),
        };
        let last = marks.get(&tp).map_or(0, |(_, h)| h - 1);
        if m.offset() < last {
            continue;
        }
        let seq = m.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == SEQ_HEADER)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<i64>().ok())
        });
        if let Some(seq) = seq {
            out.insert(tp.clone(), seq);
        }
        pending.remove(&tp);
    }
    if !pending.is_empty() {
        return Err(RelayError::Kafka(
            rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            ),
        ));
    }
    Ok(out)
}

type Row = (
    i64,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<u8>,
    bool,
    Option<i64>,
);

/// What one relay pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pass {
    /// Rows published and deleted.
    rows: usize,
    /// Rows are ready now (the pass stopped at a barrier or at its limit).
    more: bool,
}

/// How many of the oldest rows one pass publishes: up to the first barrier, or the
/// barrier alone when it comes first.
fn ready_prefix(barriers: impl IntoIterator<Item = bool>) -> usize {
    let mut n = 0;
    for barrier in barriers {
        if barrier {
            return if n == 0 { 1 } else { n };
        }
        n += 1;
    }
    n
}

/// The relay of one outbox.
pub struct Relay {
    pool: PgPool,
    producer: Arc<Producer>,
    kafka: KafkaArgs,
    outbox: Outbox,
    partitions: HashMap<String, i32>,
}

impl Relay {
    pub fn new(pool: PgPool, producer: Arc<Producer>, kafka: KafkaArgs, outbox: Outbox) -> Self {
        Self {
            pool,
            producer,
            kafka,
            outbox,
            partitions: HashMap::new(),
        }
    }

    async fn partitions(&mut self, topic: &str) -> Result<i32, RelayError> {
        if let Some(n) = self.partitions.get(topic) {
            return Ok(*n);
        }
        let (kafka, t) = (self.kafka.clone(), vec![topic.to_owned()]);
        let marks = tokio::task::spawn_blocking(move || replay::watermarks(&kafka, &t)).await??;
        let n = marks.len() as i32;
        if n == 0 {
            return Err(RelayError::NoPartitions(topic.to_owned()));
        }
        self.partitions.insert(topic.to_owned(), n);
        Ok(n)
    }

    /// Relays up to `limit` records; returns how many rows it consumed (0 when another relay
    /// holds the outbox or a gated barrier is first and its gate is not yet clear).
    pub async fn relay_once(&mut self, limit: i64) -> Result<usize, RelayError> {
        Ok(self.relay_pass(limit).await?.rows)
    }

    async fn relay_pass(&mut self, limit: i64) -> Result<Pass, RelayError> {
        let mut conn = self.pool.acquire().await?;
        let lock = format!("{}.{}", "outbox", self.outbox.records);
        let (mine,): (bool,) =
            sqlx::query_as("SELECT pg_try_advisory_lock(hashtext(current_schema() || $1))")
                .bind(&lock)
                .fetch_one(&mut *conn)
                .await?;
        if !mine {
            return Ok(Pass::default());
        }
        let result = self.pass(&mut conn, limit).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext(current_schema() || $1))")
            .bind(&lock)
            .execute(&mut *conn)
            .await;
        if unlocked.is_err() {
            // The lock must not outlive this pass on a pooled connection.
            conn.detach();
        }
        result
    }

    async fn pass(&mut self, conn: &mut PgConnection, limit: i64) -> Result<Pass, RelayError> {
        let mut rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT seq, topic, key, value, headers, barrier, gate_seq
               FROM {} ORDER BY seq LIMIT $1",
            self.outbox.records
        ))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        let full = rows.len() as i64 == limit;
        let ready = ready_prefix(rows.iter().map(|r| r.5));
        let cut = ready < rows.len();
        rows.truncate(ready);
        let Some(first) = rows.first() else {
            return Ok(Pass::default());
        };
        if let (Some(gate), Some(position)) = (self.outbox.gate, first.6) {
            let (waiting,): (bool,) = sqlx::query_as(&format!(
                "SELECT EXISTS (SELECT 1 FROM {gate} WHERE seq <= $1)"
            ))
            .bind(position)
            .fetch_one(&mut *conn)
            .await?;
            if waiting {
                return Ok(Pass::default());
            }
        }
        let mut targets = Vec::with_capacity(rows.len());
        for (seq, topic, key, ..) in &rows {
            let n = self.partitions(topic).await?;
            targets.push(TopicPartition {
                topic: topic.clone(),
                partition: partition_for(key.as_deref(), *seq, n),
            });
        }
        let (dirty,): (bool,) = sqlx::query_as(&format!("SELECT dirty FROM {}", self.outbox.state))
            .fetch_one(&mut *conn)
            .await?;
        let done: HashMap<TopicPartition, i64> = if dirty {
            let (kafka, parts) = (
                self.kafka.clone(),
                targets
                    .iter()
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
            let done = tokio::task::spawn_blocking(move || published(&kafka, &parts)).await??;
            tracing::info!(
                partitions = done.len(),
                "outbox relay resumes after an interrupted pass: skipping what was published"
            );
            done
        } else {
            sqlx::query(&format!("UPDATE {} SET dirty = true", self.outbox.state))
                .execute(&mut *conn)
                .await?;
            HashMap::new()
        };
        let seqs: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
        let headers: Vec<Vec<(String, Vec<u8>)>> =
            rows.iter().map(|r| decode_headers(&r.4)).collect();
        let mut out: Vec<OutgoingRecord<'_>> = Vec::with_capacity(rows.len());
        let mut skipped = 0usize;
        for (i, ((seq, topic, key, value, ..), tp)) in rows.iter().zip(&targets).enumerate() {
            if done.get(tp).is_some_and(|d| seq <= d) {
                skipped += 1;
                continue;
            }
            let mut hs: Vec<(&str, Option<&[u8]>)> = headers[i]
                .iter()
                .map(|(k, v)| (k.as_str(), Some(v.as_slice())))
                .collect();
            hs.push((SEQ_HEADER, Some(seqs[i].as_bytes())));
            out.push(OutgoingRecord {
                topic,
                key: key.as_deref(),
                value: value.as_deref(),
                headers: hs,
                timestamp_ms: None,
                partition: Some(tp.partition),
            });
        }
        if skipped > 0 {
            tracing::info!(
                skipped,
                "outbox records already published were not sent again"
            );
        }
        self.producer.send_all(&out).await?;
        let all: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query(&format!(
            "DELETE FROM {} WHERE seq = ANY($1)",
            self.outbox.records
        ))
        .bind(&all)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("UPDATE {} SET dirty = false", self.outbox.state))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Pass {
            rows: rows.len(),
            more: cut || full,
        })
    }

    /// Relays until shutdown (then drains what is committed), backing off on errors.
    pub async fn run(mut self, shutdown: Shutdown, interval: Duration, limit: i64) {
        let mut backoff = interval;
        loop {
            let stopping = shutdown.is_triggered();
            match self.relay_pass(limit).await {
                Ok(Pass { more: true, .. }) => continue,
                Ok(_) => backoff = interval,
                Err(e) => {
                    tracing::warn!(error = %crate::sink::Rejection::from_error("relay", &e).reason, outbox = self.outbox.records, "outbox relay failed; retrying");
                    self.partitions.clear();
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if stopping {
                        return;
                    }
                }
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait() => {}
            }
        }
    }
}

/// Rows waiting in an outbox, for tests and health.
pub async fn pending(pool: &PgPool, outbox: Outbox) -> Result<i64, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {}", outbox.records))
        .fetch_one(pool)
        .await?;
    Ok(n)
}

/// Per-topic counts, for logs.
pub fn by_topic(records: &[Record]) -> BTreeMap<&str, usize> {
    let mut m = BTreeMap::new();
    for r in records {
        *m.entry(r.topic.as_str()).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let hs = vec![
            ("a".to_owned(), b"1".to_vec()),
            ("cdp-profile-id".to_owned(), Vec::new()),
        ];
        assert_eq!(decode_headers(&encode_headers(&hs)), hs);
        assert!(decode_headers(&[0, 5, b'x']).is_empty());
    }

    #[test]
    fn keyed_records_go_where_the_producer_puts_them() {
        let p = crate::kafka::partition::partition_of(b"profile-1", 6);
        assert_eq!(partition_for(Some(b"profile-1"), 0, 6), p);
        assert_eq!(partition_for(Some(b"profile-1"), 99, 6), p);
        assert_eq!(partition_for(None, 13, 6), 1);
    }

    #[test]
    fn a_pass_stops_before_a_barrier_and_sends_a_first_barrier_alone() {
        assert_eq!(ready_prefix([false, false, false]), 3);
        assert_eq!(ready_prefix([false, false, true, false]), 2);
        assert_eq!(ready_prefix([true, false, false]), 1);
        assert_eq!(ready_prefix([true, true]), 1);
        assert_eq!(ready_prefix(std::iter::empty()), 0);
    }
}
