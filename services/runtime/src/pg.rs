//! Postgres: the pool, the migrations, and [`PgSink`], the effectively-once sink. A
//! handler's rows and the consumer offsets are written in one transaction; the offset
//! rows are locked first, so two consumers that briefly both believe they own a partition
//! (a rebalance, a zombie) serialise on the lock and neither applies a record twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;

use crate::config::PostgresArgs;
use crate::dlq::{DeadLetter, DeadLetters};
use crate::kafka::record::{RawRecord, TopicPartition};
use crate::sink::{ApplyStats, Rejection, Sink, SinkError};

/// The runtime's own migrations (the consumer offsets table). Services have their own
/// migrators; all of them ignore each other's versions.
pub fn migrator() -> Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m
}

pub async fn connect(args: &PostgresArgs) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(args.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&args.database_url)
        .await
}

/// A pool whose connections resolve unqualified names in `schema`, then in `public` (where
/// the shared tables live: consumer positions, the key store). `schema` must be a checked
/// identifier ([`valid_schema_name`]).
pub async fn connect_in(args: &PostgresArgs, schema: &str) -> Result<PgPool, sqlx::Error> {
    let opts = PgConnectOptions::from_str(&args.database_url)?
        .options([("search_path", format!("\"{schema}\",public"))]);
    PgPoolOptions::new()
        .max_connections(args.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
}

/// Whether `s` can name a service's schema: a lower-case letter, then lower-case letters,
/// digits and underscores, at most 48 bytes (it goes into SQL, quoted).
pub fn valid_schema_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Creates a schema unless it exists. `CREATE SCHEMA IF NOT EXISTS` alone is not safe
/// against itself: two sessions creating the same schema at once can fail on the catalog's
/// unique index, so creators take turns. `schema` must be a checked identifier.
pub async fn create_schema(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cdp.create_schema'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Classifies a database error: transient failures are retried; data the database refuses
/// (SQLSTATE class 22, data exception: a NUL character in text, a number or date out of
/// range; a not-null or check constraint the data breaks, 23502 and 23514; class 54, a value
/// past a limit, such as an index row too large) is [`SinkError::Refused`], which [`PgSink`]
/// pins on the record that carries it; the rest stop the consumer. Unique and foreign-key
/// violations are not the record's fault by themselves (handlers upsert; a reference may wait
/// for a row another partition brings) and stay fatal: they point at a defect.
pub fn classify(e: sqlx::Error) -> SinkError {
    let code = match &e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    let retryable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // serialization_failure, deadlock_detected, admin/crash shutdown, cannot_connect_now,
        // and every connection_exception (08xxx)
        sqlx::Error::Database(_) => code.as_deref().is_some_and(|c| {
            matches!(c, "40001" | "40P01" | "57P01" | "57P02" | "57P03") || c.starts_with("08")
        }),
        _ => false,
    };
    if retryable {
        SinkError::Retryable(Box::new(e))
    } else if code.as_deref().is_some_and(|c| {
        c.starts_with("22") || c.starts_with("54") || matches!(c, "23502" | "23514")
    }) {
        SinkError::Refused(Box::new(e))
    } else {
        SinkError::Fatal(Box::new(e))
    }
}

/// The dead-letter reason for a record whose data the database refused: the SQLSTATE and the
/// constraint, never the database's message (it may quote the value, which may be personal).
fn refused(cause: &(dyn std::error::Error + 'static)) -> Rejection {
    let db = cause.downcast_ref::<sqlx::Error>().and_then(|e| match e {
        sqlx::Error::Database(db) => Some(db),
        _ => None,
    });
    let code = db.and_then(|db| db.code()).unwrap_or_default();
    let condition = match code.as_ref() {
        "22021" => " (character_not_in_repertoire: a NUL character in text)",
        "22P05" => " (untranslatable_character: a \\u0000 escape in JSON)",
        "22003" => " (numeric_value_out_of_range)",
        "22008" => " (datetime_field_overflow)",
        "22001" => " (string_data_right_truncation)",
        "22P02" => " (invalid_text_representation)",
        "23502" => " (not_null_violation)",
        "23514" => " (check_violation)",
        "54000" => " (program_limit_exceeded: a value too large, e.g. for an index)",
        _ => "",
    };
    let constraint = db
        .and_then(|db| db.constraint())
        .map(|c| format!(", constraint {c}"))
        .unwrap_or_default();
    Rejection::new(
        "refused_by_database",
        format!("the database refused the record's data: SQLSTATE {code}{condition}{constraint}"),
    )
}

/// A record that decoded, handed to the handler.
pub struct Decoded<'r, E> {
    pub record: &'r RawRecord,
    pub event: &'r E,
}

/// A batch decoded ahead of its transaction (see [`Sink::prepare`]).
pub struct PgBatch<E> {
    records: Vec<RawRecord>,
    events: Vec<Result<E, Rejection>>,
}

/// A record the handler refuses (by index into the slice it was given).
pub struct Rejected {
    pub index: usize,
    pub rejection: Rejection,
}

/// A service's domain logic over Postgres: decode a record, then apply a batch inside the
/// transaction the runner opened. The handler must not commit.
pub trait PgHandler: Send + Sync + 'static {
    type Event: Send + Sync;

    /// Turns a record into the service's event, or rejects it (it is dead-lettered).
    fn decode(&self, record: &RawRecord) -> Result<Self::Event, Rejection>;

    /// Applies the batch in `tx`. Returns the records it rejects as invalid: they must
    /// have had no effect. An error rolls the whole batch back.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        batch: &'a [Decoded<'a, Self::Event>],
    ) -> impl Future<Output = Result<Vec<Rejected>, SinkError>> + Send + 'a;
}

/// The effectively-once Postgres sink.
pub struct PgSink<H> {
    lane: Arc<Lane<H>>,
    lanes: u32,
}

/// What a lane's transaction needs, shared by the lanes' tasks.
struct Lane<H> {
    pool: PgPool,
    group: String,
    handler: H,
}

impl<H: PgHandler> PgSink<H> {
    pub fn new(pool: PgPool, group: impl Into<String>, handler: H) -> Self {
        Self {
            lane: Arc::new(Lane {
                pool,
                group: group.into(),
                handler,
            }),
            lanes: 1,
        }
    }

    /// Applies a batch as up to `lanes` transactions at once, each on its own connection:
    /// records of partition number `p` go to lane `p % lanes`, with their partitions'
    /// positions, so each lane is effectively-once on its own, as separate consumers of
    /// the same group would be (the same partition number of every topic shares a lane:
    /// one key's records on topics partitioned alike stay together). A batch is applied
    /// when every lane has committed; a failed lane fails the batch, and its retry skips
    /// what the other lanes committed. Only for handlers that are correct under concurrent
    /// consumers (their writes commute across partitions, or they lock what they share).
    /// Each lane is its own runtime task, so one lane's work in this process (the handler's
    /// folding, encoding its statements) runs beside the other lanes' instead of holding
    /// them up. The pool needs a connection per lane. 1 (the default) is one transaction
    /// per batch.
    pub fn with_lanes(mut self, lanes: u32) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    pub fn handler(&self) -> &H {
        &self.lane.handler
    }
}

/// Stored positions of a group (next offset to read), for operators and tests.
pub async fn stored_positions<'e>(
    db: impl sqlx::PgExecutor<'e>,
    group: &str,
) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM cdp_consumer_offsets WHERE group_id = $1 AND next_offset >= 0",
    )
    .bind(group)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, next)| (TopicPartition { topic, partition }, next))
        .collect())
}

/// The records of `letters` this group has already dead-lettered.
async fn already_sent(
    tx: &mut PgConnection,
    group: &str,
    letters: &[DeadLetter<'_>],
) -> Result<HashSet<(String, i32, i64)>, sqlx::Error> {
    if letters.is_empty() {
        return Ok(HashSet::new());
    }
    let topics: Vec<&str> = letters.iter().map(|l| &*l.record.topic).collect();
    let partitions: Vec<i32> = letters.iter().map(|l| l.record.partition).collect();
    let offsets: Vec<i64> = letters.iter().map(|l| l.record.offset).collect();
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT d.topic, d.partition, d.\"offset\"
           FROM cdp_dead_letters d
           JOIN UNNEST($2::text[], $3::int4[], $4::int8[]) AS x(t, p, o)
             ON d.topic = x.t AND d.partition = x.p AND d.\"offset\" = x.o
          WHERE d.group_id = $1",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Records that `letters` were produced, outside the batch's transaction: a failed commit
/// must not forget them.
async fn record_sent(
    pool: &PgPool,
    group: &str,
    letters: &[DeadLetter<'_>],
) -> Result<(), sqlx::Error> {
    if letters.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = letters.iter().map(|l| &*l.record.topic).collect();
    let partitions: Vec<i32> = letters.iter().map(|l| l.record.partition).collect();
    let offsets: Vec<i64> = letters.iter().map(|l| l.record.offset).collect();
    let kinds: Vec<&str> = letters.iter().map(|l| l.rejection.kind).collect();
    sqlx::query(
        "INSERT INTO cdp_dead_letters (group_id, topic, partition, \"offset\", kind)
         SELECT $1, t, p, o, k FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::text[]) AS x(t, p, o, k)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&kinds)
    .execute(pool)
    .await?;
    Ok(())
}

async fn lock_positions(
    tx: &mut PgConnection,
    group: &str,
    parts: &[TopicPartition],
) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
    let topics: Vec<&str> = parts.iter().map(|p| p.topic.as_str()).collect();
    let partitions: Vec<i32> = parts.iter().map(|p| p.partition).collect();
    sqlx::query(
        "INSERT INTO cdp_consumer_offsets (group_id, topic, partition, next_offset)
         SELECT $1, t, p, -1 FROM UNNEST($2::text[], $3::int[]) AS x(t, p)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .execute(&mut *tx)
    .await?;
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT o.topic, o.partition, o.next_offset
           FROM cdp_consumer_offsets o
           JOIN UNNEST($2::text[], $3::int[]) AS x(t, p) ON o.topic = x.t AND o.partition = x.p
          WHERE o.group_id = $1
          ORDER BY o.topic, o.partition
            FOR UPDATE OF o",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, next)| (TopicPartition { topic, partition }, next))
        .collect())
}

async fn store_positions(
    tx: &mut PgConnection,
    group: &str,
    next: &HashMap<TopicPartition, i64>,
) -> Result<(), sqlx::Error> {
    let mut topics = Vec::with_capacity(next.len());
    let mut partitions = Vec::with_capacity(next.len());
    let mut offsets = Vec::with_capacity(next.len());
    for (tp, o) in next {
        topics.push(tp.topic.as_str());
        partitions.push(tp.partition);
        offsets.push(*o);
    }
    sqlx::query(
        "UPDATE cdp_consumer_offsets o SET next_offset = x.n, updated_at = now()
           FROM UNNEST($2::text[], $3::int[], $4::bigint[]) AS x(t, p, n)
          WHERE o.group_id = $1 AND o.topic = x.t AND o.partition = x.p",
    )
    .bind(group)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl<H: PgHandler> Sink for PgSink<H> {
    async fn positions(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, SinkError> {
        let all = stored_positions(&self.lane.pool, &self.lane.group)
            .await
            .map_err(classify)?;
        Ok(all
            .into_iter()
            .filter(|(tp, _)| partitions.contains(tp))
            .collect())
    }

    /// Shared with the lanes' tasks.
    type Prepared = Arc<PgBatch<H::Event>>;

    fn prepare(&self, records: Vec<RawRecord>) -> Arc<PgBatch<H::Event>> {
        let events = records
            .iter()
            .map(|r| self.lane.handler.decode(r))
            .collect();
        Arc::new(PgBatch { records, events })
    }

    fn records(batch: &Arc<PgBatch<H::Event>>) -> &[RawRecord] {
        &batch.records
    }

    async fn apply(
        &self,
        prepared: &Arc<PgBatch<H::Event>>,
        dlq: &DeadLetters,
    ) -> Result<ApplyStats, SinkError> {
        let lanes = self.lanes as i32;
        let mut by_lane: Vec<Vec<usize>> = vec![Vec::new(); self.lanes as usize];
        for (i, r) in prepared.records.iter().enumerate() {
            by_lane[r.partition.rem_euclid(lanes) as usize].push(i);
        }
        by_lane.retain(|l| !l.is_empty());
        if by_lane.len() <= 1 {
            // One lane (or a batch of one lane's partitions): one transaction.
            let all = by_lane.pop().unwrap_or_default();
            return self.lane.apply(prepared, &all, dlq).await;
        }
        // Every lane runs to its end (commit or rollback) before the batch's outcome is
        // known. If this future is dropped, the set aborts the lanes' tasks, which rolls
        // back the transactions not yet committed, as dropping them in place would.
        let mut tasks = tokio::task::JoinSet::new();
        for indices in by_lane {
            let (lane, prepared, dlq) = (self.lane.clone(), prepared.clone(), dlq.clone());
            tasks.spawn(
                async move { lane.apply(&prepared, &indices, &dlq).await }
                    .instrument(tracing::Span::current()),
            );
        }
        let mut stats = ApplyStats::default();
        let mut failed: Option<SinkError> = None;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.unwrap_or_else(|e| {
                Err(SinkError::Fatal(
                    format!("a lane of group {} failed: {e}", self.lane.group).into(),
                ))
            });
            match result {
                Ok(lane) => stats.add(lane),
                // A fatal error wins over a retryable one: retrying cannot mend it.
                Err(e) => match failed {
                    Some(SinkError::Fatal(_)) => {}
                    _ => failed = Some(e),
                },
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }
}

/// How a lane hands its records to the handler.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parts {
    /// All at once (every batch, first).
    Whole,
    /// In parts under savepoints, after the database refused the whole (see [`isolate`]).
    Isolating,
}

/// Applies `batch`, which the database refused whole, in parts, each under a savepoint: a
/// part the database refuses is rolled back and halved until the record it refuses is alone;
/// that record is rejected (it goes to the dead-letter topic) and every other is applied.
/// Handlers are correct for any cut of the log into batches, so applying a batch as several
/// smaller ones changes nothing else. About two handler calls per halving: some 30 for one
/// bad record in 20,000.
async fn isolate<H: PgHandler>(
    handler: &H,
    tx: &mut PgConnection,
    batch: &[Decoded<'_, H::Event>],
) -> Result<Vec<Rejected>, SinkError> {
    let mut rejected = Vec::new();
    // Parts still to apply, the next one last (so they run in batch order); the whole was
    // refused already, so its halves come first.
    let mid = batch.len() / 2;
    let mut parts = vec![(mid, batch.len()), (0, mid)];
    parts.retain(|(from, to)| from < to);
    while let Some((from, to)) = parts.pop() {
        sqlx::query("SAVEPOINT cdp_part")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        match handler.handle(tx, &batch[from..to]).await {
            Ok(part) => {
                sqlx::query("RELEASE SAVEPOINT cdp_part")
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                rejected.extend(part.into_iter().map(|r| Rejected {
                    index: r.index + from,
                    rejection: r.rejection,
                }));
            }
            Err(SinkError::Refused(cause)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT cdp_part")
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                sqlx::query("RELEASE SAVEPOINT cdp_part")
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                if to - from == 1 {
                    rejected.push(Rejected {
                        index: from,
                        rejection: refused(cause.as_ref()),
                    });
                } else {
                    let mid = from + (to - from) / 2;
                    parts.push((mid, to));
                    parts.push((from, mid));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(rejected)
}

impl<H: PgHandler> Lane<H> {
    /// Applies the records at `indices` of a batch (in batch order) in one transaction with
    /// their partitions' positions. When the database refuses data of the batch, the
    /// transaction is rolled back and the batch applied again in parts, so that only the
    /// records it refuses are dead-lettered (a record's bad value never stops the service).
    async fn apply(
        &self,
        prepared: &PgBatch<H::Event>,
        indices: &[usize],
        dlq: &DeadLetters,
    ) -> Result<ApplyStats, SinkError> {
        match self.apply_as(prepared, indices, dlq, Parts::Whole).await {
            Err(SinkError::Refused(_)) => {
                tracing::warn!(
                    group = %self.group,
                    records = indices.len(),
                    "the database refused data of a batch; applying it in parts to dead-letter the records at fault"
                );
                self.apply_as(prepared, indices, dlq, Parts::Isolating)
                    .await
            }
            other => other,
        }
    }

    async fn apply_as(
        &self,
        prepared: &PgBatch<H::Event>,
        indices: &[usize],
        dlq: &DeadLetters,
        mode: Parts,
    ) -> Result<ApplyStats, SinkError> {
        let mut stats = ApplyStats::default();
        if indices.is_empty() {
            return Ok(stats);
        }
        let lane = || {
            indices
                .iter()
                .map(|&i| (&prepared.records[i], &prepared.events[i]))
        };
        let parts: Vec<TopicPartition> = lane()
            .map(|(r, _)| r.topic_partition())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let held = lock_positions(&mut tx, &self.group, &parts)
            .await
            .map_err(classify)?;

        // Skip what this group already applied (redelivery after a crash or rebalance).
        let mut next: HashMap<TopicPartition, i64> = HashMap::new();
        let mut letters: Vec<DeadLetter<'_>> = Vec::new();
        let mut decoded: Vec<Decoded<'_, H::Event>> = Vec::with_capacity(indices.len());
        for (r, event) in lane() {
            let tp = r.topic_partition();
            let from = held.get(&tp).copied().unwrap_or(-1);
            if r.offset < from {
                stats.topic(&r.topic).skipped += 1;
                continue;
            }
            let n = next.entry(tp).or_insert(r.offset + 1);
            *n = (*n).max(r.offset + 1);
            match event {
                Ok(event) => decoded.push(Decoded { record: r, event }),
                Err(rejection) => letters.push(DeadLetter {
                    record: r,
                    rejection: rejection.clone(),
                }),
            }
        }
        let rejected = match mode {
            Parts::Whole => self.handler.handle(&mut tx, &decoded).await?,
            Parts::Isolating => isolate(&self.handler, &mut tx, &decoded).await?,
        };
        let mut rejected_idx = BTreeSet::new();
        for Rejected { index, rejection } in rejected {
            if let Some(d) = decoded.get(index) {
                if rejected_idx.insert(index) {
                    letters.push(DeadLetter {
                        record: d.record,
                        rejection,
                    });
                }
            }
        }
        let applied = (decoded.len() - rejected_idx.len()) as u64;
        for (i, d) in decoded.iter().enumerate() {
            if !rejected_idx.contains(&i) {
                stats.topic(&d.record.topic).applied += 1;
            }
        }
        for l in &letters {
            stats.topic(&l.record.topic).dead_lettered += 1;
        }
        // Letters produced by an earlier attempt of this batch (whose commit failed) are
        // not produced again.
        let sent = already_sent(&mut tx, &self.group, &letters)
            .await
            .map_err(classify)?;
        letters.retain(|l| {
            !sent.contains(&(
                l.record.topic.to_string(),
                l.record.partition,
                l.record.offset,
            ))
        });
        dlq.send(&letters, applied).await?;
        record_sent(&self.pool, &self.group, &letters)
            .await
            .map_err(classify)?;
        store_positions(&mut tx, &self.group, &next)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(stats)
    }
}
