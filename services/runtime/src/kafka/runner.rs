//! The consumer runner every consumer service uses.
//!
//! - Subscribes with the service's group; on assignment, asks the sink where each partition
//!   stands and assigns at exactly those offsets (partitions the sink never saw start at
//!   [`StartFrom`]). Kafka's committed offsets are only a mirror for lag tools.
//! - Polls on a dedicated thread with `BaseConsumer` (one queue, so each partition stays in
//!   order), gathers a batch by size or linger time, hands it to the sink, which applies it
//!   atomically with the new positions and dead-letters what it cannot apply. A batch that
//!   reached its size keeps taking records while they are already waiting, up to the
//!   maximum: a consumer that is behind (after a pause, in a replay) writes fewer, larger
//!   transactions, and one that keeps up cuts at the normal size, for latency.
//! - Batches are applied one at a time, in order, on a runtime task: while batch N is being
//!   applied, the poll thread gathers batch N+1 and lets the sink prepare it (decode), so the
//!   process's work and the database's overlap.
//! - A batch cut at the maximum size means more records were waiting than one batch takes:
//!   the runner reports itself behind ([`CatchUp`]) until it cuts two smaller batches in a
//!   row or finds nothing to do, so work that only matters once caught up can wait.
//! - Retryable sink errors back off and retry the same batch without advancing; fatal ones
//!   stop the runner with an error.
//! - On revocation and on shutdown, the in-flight batch is finished before partitions are
//!   released. Rebalance callbacks never panic.
//! - Ready (`/readyz`) means assigned and making progress: the group gave the consumer an
//!   assignment (an empty one too: a standby member is ready), it received records or an
//!   answer from the broker within `CDP_CONSUMER_STALL_SECS`, and no batch has been failing
//!   for that long. `consumer_unready` says which of the three is missing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use tokio::runtime::Handle;
use tracing::Instrument;

use crate::admin::ReadyFlag;
use crate::config::{KafkaArgs, RunnerArgs};
use crate::dlq::DeadLetters;
use crate::kafka::producer::Producer;
use crate::kafka::record::{RawRecord, RecordCopier, TopicPartition};
use crate::kafka::{client_config, KafkaSetupError};
use crate::metrics::{GroupLabels, Outcome, RecordLabels, RunnerMetrics, UnreadyLabels};
use crate::shutdown::Shutdown;
use crate::sink::{Sink, SinkError};

/// How often an idle runner lets its sink act on time.
const TICK_INTERVAL: Duration = Duration::from_millis(200);

/// How long an idle consumer goes without a sign of the broker before it asks for metadata
/// (at most; a third of the stall time when that is shorter).
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// How long that question may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an assignment may wait for the broker to say where new partitions start
/// ([`start_offsets`]): a broker that does not answer leaves it to the client, not the
/// rebalance callback waiting.
const START_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a partition the sink has never seen starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

/// What a runner consumes and how.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    pub kafka: KafkaArgs,
    pub group_id: String,
    pub topics: Vec<String>,
    pub dead_letter_topic: String,
    pub tuning: RunnerArgs,
    pub start: StartFrom,
    /// Where the runner says whether it is behind the log.
    pub catch_up: CatchUp,
}

/// Whether a runner is catching up: set when it cuts a batch at its maximum size (more
/// records were waiting than one batch takes), cleared when it cuts two smaller ones in a
/// row ([`Cuts`]) or when nothing is being applied and a poll finds nothing. Clones share
/// the flag, so a service's other tasks can read it (the projector's relay holds off
/// publishing snapshots that the backlog would supersede).
#[derive(Clone, Debug, Default)]
pub struct CatchUp(Arc<AtomicBool>);

impl CatchUp {
    pub fn is_catching_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Whether it changed.
    fn set(&self, behind: bool) -> bool {
        // The poll thread sets it per batch or idle poll: a store only when it changes.
        let changed = self.is_catching_up() != behind;
        if changed {
            self.0.store(behind, Ordering::Relaxed);
        }
        changed
    }
}

/// The poll thread's reading of [`CatchUp`] from the sizes of the batches it cuts. A cut at
/// the maximum says behind. One smaller cut does not say caught up: a fetch still in flight
/// when the records already fetched run out cuts one batch of a backlog short (measured: one
/// run in four of a 100,000-event catch-up). Two smaller cuts in a row do, also under a
/// steady load that never leaves the log idle.
#[derive(Debug)]
struct Cuts {
    smaller_in_a_row: u8,
}

impl Cuts {
    const CAUGHT_UP_AFTER: u8 = 2;

    fn caught_up() -> Self {
        Self {
            smaller_in_a_row: Self::CAUGHT_UP_AFTER,
        }
    }

    /// After cutting a batch (`at_max`: at the maximum size): whether the runner is behind.
    fn cut(&mut self, at_max: bool) -> bool {
        self.smaller_in_a_row = if at_max {
            0
        } else {
            self.smaller_in_a_row.saturating_add(1)
        };
        self.smaller_in_a_row < Self::CAUGHT_UP_AFTER
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error("cannot subscribe to {topics:?}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
    #[error("the sink failed for group {group}")]
    Sink {
        group: String,
        #[source]
        source: SinkError,
    },
    #[error("the consumer thread of group {0} panicked")]
    Panicked(String),
}

struct Shared<S> {
    sink: Arc<S>,
    dlq: DeadLetters,
    handle: Handle,
    group: String,
    start: StartFrom,
    backoff_max: Duration,
    pending: Mutex<Vec<RawRecord>>,
    /// The batch being applied while the poll thread gathers and prepares the next.
    in_flight: Mutex<Option<InFlight>>,
    fatal: Mutex<Option<RunnerError>>,
    assigned: Mutex<BTreeSet<TopicPartition>>,
    shutdown: Shutdown,
    metrics: RunnerMetrics,
    catch_up: CatchUp,
    health: Mutex<Health>,
    ready: Option<ReadyFlag>,
    stall: Duration,
    /// Set when the task running [`run`] is dropped before the poll thread ended.
    dropped: Arc<AtomicBool>,
}

/// Sets its flag when dropped.
struct FlagOnDrop(Arc<AtomicBool>);

impl Drop for FlagOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What readiness is made of.
struct Health {
    /// The group gave this consumer an assignment (possibly empty).
    assigned: bool,
    /// When the consumer last showed it reaches the broker: a batch of records, or an
    /// answer to a metadata request.
    reached: Instant,
    /// Since when the batch being applied keeps failing.
    failing_since: Option<Instant>,
}

impl Health {
    fn new() -> Self {
        Self {
            assigned: false,
            reached: Instant::now(),
            failing_since: None,
        }
    }

    /// Why the consumer is not ready, if it is not.
    fn unready(&self, now: Instant, stall: Duration) -> Option<&'static str> {
        // A failing batch holds the poll thread, so no record or broker answer is seen
        // meanwhile: the sink's failure is the reason then.
        if !self.assigned {
            Some("unassigned")
        } else if self
            .failing_since
            .is_some_and(|t| now.saturating_duration_since(t) > stall)
        {
            Some("sink_failing")
        } else if now.saturating_duration_since(self.reached) > stall {
            Some("broker_unreachable")
        } else {
            None
        }
    }
}

const UNREADY_REASONS: [&str; 3] = ["unassigned", "broker_unreachable", "sink_failing"];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // (a Vec or a set) is still consistent enough to keep going or to shut down.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Outcome of trying to apply a batch.
enum Flushed {
    Done,
    /// Shutdown came while retrying: nothing was applied, nothing stored.
    Abandoned,
}

/// A batch handed to the sink on a runtime task.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Flushed, SinkError>>,
    /// The last offset of each partition in the batch, mirrored to Kafka once applied.
    last: Vec<(String, i32, i64)>,
}

fn last_offsets(batch: &[RawRecord]) -> Vec<(String, i32, i64)> {
    let mut last: std::collections::BTreeMap<(&str, i32), i64> = Default::default();
    for r in batch {
        let e = last.entry((&r.topic, r.partition)).or_insert(r.offset);
        *e = (*e).max(r.offset);
    }
    last.into_iter()
        .map(|((t, p), o)| (t.to_owned(), p, o))
        .collect()
}

impl<S: Sink> Shared<S> {
    /// Updates health and publishes readiness (the flag and `consumer_unready`).
    fn health(&self, update: impl FnOnce(&mut Health)) {
        let reason = {
            let mut h = lock(&self.health);
            update(&mut h);
            h.unready(Instant::now(), self.stall)
        };
        if let Some(flag) = &self.ready {
            flag.set(reason.is_none());
        }
        for r in UNREADY_REASONS {
            self.metrics
                .unready
                .get_or_create(&UnreadyLabels {
                    group: self.group.clone(),
                    reason: r,
                })
                .set(i64::from(reason == Some(r)));
        }
    }

    /// On an idle consumer that has not heard from the broker for a while, asks it for a
    /// topic's metadata: an answer shows the connection works when no record comes.
    fn probe_broker(&self, consumer: &BaseConsumer<RunnerContext<S>>, topic: &str) {
        let quiet = lock(&self.health).reached.elapsed();
        if quiet < PROBE_INTERVAL.min(self.stall / 3) {
            self.health(|_| {});
            return;
        }
        match consumer.fetch_metadata(Some(topic), PROBE_TIMEOUT) {
            Ok(_) => self.health(|h| h.reached = Instant::now()),
            Err(e) => {
                tracing::debug!(group = %self.group, error = %e, quiet_ms = quiet.as_millis() as u64, "the broker did not answer");
                self.health(|_| {});
            }
        }
    }

    /// Says whether the runner is behind, to the service ([`CatchUp`]) and in the metrics.
    fn catching_up(&self, behind: bool) {
        if self.catch_up.set(behind) {
            self.metrics
                .catching_up
                .get_or_create(&self.labels())
                .set(i64::from(behind));
        }
    }

    fn labels(&self) -> GroupLabels {
        GroupLabels {
            group: self.group.clone(),
        }
    }

    fn set_fatal(&self, e: RunnerError) {
        let mut f = lock(&self.fatal);
        if f.is_none() {
            *f = Some(e);
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16));
        base.min(self.backoff_max)
    }

    /// Sleeps, waking early on shutdown. Returns false if shutdown came.
    async fn pause(&self, d: Duration) -> bool {
        let until = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < until {
            if self.shutdown.is_triggered() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20).min(until - tokio::time::Instant::now()))
                .await;
        }
        !self.shutdown.is_triggered()
    }

    /// Applies a prepared batch, retrying transient failures.
    async fn apply_retrying(&self, batch: &S::Prepared) -> Result<Flushed, SinkError> {
        let records = S::records(batch);
        let labels = self.labels();
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let span = tracing::info_span!(
                "batch",
                group = %self.group,
                records = records.len(),
                topic = %records[0].topic,
                partition = records[0].partition,
                offset = records[0].offset,
                attempt,
            );
            match self.sink.apply(batch, &self.dlq).instrument(span).await {
                Ok(stats) => {
                    self.metrics
                        .batch_duration
                        .get_or_create(&labels)
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.batches.get_or_create(&labels).inc();
                    for (topic, c) in &stats.per_topic {
                        for (outcome, n) in [
                            (Outcome::Applied, c.applied),
                            (Outcome::Skipped, c.skipped),
                            (Outcome::DeadLettered, c.dead_lettered),
                        ] {
                            if n > 0 {
                                self.metrics
                                    .records
                                    .get_or_create(&RecordLabels {
                                        group: self.group.clone(),
                                        topic: topic.clone(),
                                        outcome,
                                    })
                                    .inc_by(n);
                            }
                        }
                    }
                    let t = stats.total();
                    tracing::debug!(
                        group = %self.group,
                        records = records.len(),
                        apply_ms = started.elapsed().as_millis() as u64,
                        applied = t.applied,
                        skipped = t.skipped,
                        dead_lettered = t.dead_lettered,
                        "batch committed"
                    );
                    if attempt > 0 {
                        self.health(|h| h.failing_since = None);
                    }
                    return Ok(Flushed::Done);
                }
                Err(e) if e.is_retryable() => {
                    self.health(|h| {
                        h.failing_since.get_or_insert(started);
                    });
                    self.metrics.batch_retries.get_or_create(&labels).inc();
                    let wait = self.backoff(attempt);
                    tracing::warn!(group = %self.group, error = %crate::sink::Rejection::from_error("retry", &e).reason, retry_in_ms = wait.as_millis() as u64, "batch failed, will retry");
                    attempt = attempt.saturating_add(1);
                    if !self.pause(wait).await {
                        tracing::info!(group = %self.group, "shutdown while retrying: the batch was not applied and will be redelivered");
                        return Ok(Flushed::Abandoned);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Prepares the pending batch (while the previous one may still be applied), waits for
    /// the previous one, then starts applying this one on the runtime. Batches are applied
    /// one at a time, in order; a batch is never applied after one that was abandoned.
    /// With `last_tick` (the poll loop's), the sink's time-based work runs between the two
    /// if it is due.
    fn dispatch(
        self: &Arc<Self>,
        consumer: &BaseConsumer<RunnerContext<S>>,
        last_tick: Option<&mut Instant>,
    ) -> Result<Flushed, RunnerError> {
        let batch = std::mem::take(&mut *lock(&self.pending));
        let started = Instant::now();
        let prepared = (!batch.is_empty()).then(|| self.sink.prepare(batch));
        let prepare_ms = started.elapsed().as_millis() as u64;
        let settled = self.settle(consumer)?;
        if prepared.is_some() {
            tracing::debug!(
                group = %self.group,
                prepare_ms,
                // How long the poll thread waited for the previous batch to be applied.
                wait_ms = (started.elapsed().as_millis() as u64).saturating_sub(prepare_ms),
                "batch prepared"
            );
        }
        if let Flushed::Abandoned = settled {
            return Ok(Flushed::Abandoned);
        }
        // Between two batches: the sink's time-based work, when due, goes here, so that a
        // consumer that is never idle (catching up) still ticks without waiting for it.
        if let Some(last) = last_tick {
            self.tick_if_due(last)?;
        }
        if let Some(prepared) = prepared {
            lock(&self.health).reached = Instant::now();
            let last = last_offsets(S::records(&prepared));
            let shared = self.clone();
            let task = self
                .handle
                .spawn(async move { shared.apply_retrying(&prepared).await });
            *lock(&self.in_flight) = Some(InFlight { task, last });
        }
        Ok(Flushed::Done)
    }

    /// Waits for the batch being applied, if any, and mirrors its positions to Kafka.
    fn settle(&self, consumer: &BaseConsumer<RunnerContext<S>>) -> Result<Flushed, RunnerError> {
        let Some(in_flight) = lock(&self.in_flight).take() else {
            return Ok(Flushed::Done);
        };
        match self.handle.block_on(in_flight.task) {
            Ok(Ok(Flushed::Done)) => {
                self.mirror_commit(consumer, &in_flight.last);
                Ok(Flushed::Done)
            }
            Ok(Ok(Flushed::Abandoned)) => Ok(Flushed::Abandoned),
            Ok(Err(source)) => Err(RunnerError::Sink {
                group: self.group.clone(),
                source,
            }),
            Err(_) => Err(RunnerError::Panicked(self.group.clone())),
        }
    }

    /// Applies everything gathered so far and waits until it is committed.
    fn flush(
        self: &Arc<Self>,
        consumer: &BaseConsumer<RunnerContext<S>>,
    ) -> Result<Flushed, RunnerError> {
        match self.dispatch(consumer, None)? {
            Flushed::Abandoned => Ok(Flushed::Abandoned),
            Flushed::Done => self.settle(consumer),
        }
    }

    /// Whether no batch is being applied (none was dispatched, or the last one finished).
    fn sink_idle(&self) -> bool {
        lock(&self.in_flight)
            .as_ref()
            .is_none_or(|f| f.task.is_finished())
    }

    /// Lets the sink act on time (see [`Sink::tick`]) if `TICK_INTERVAL` has passed since it
    /// `last` did. Call only between batches (none in flight). Retryable failures are logged
    /// and tried again at the next tick.
    fn tick_if_due(&self, last: &mut Instant) -> Result<(), RunnerError> {
        if last.elapsed() < TICK_INTERVAL {
            return Ok(());
        }
        *last = Instant::now();
        match self.handle.block_on(self.sink.tick()) {
            Ok(()) => Ok(()),
            Err(e) if e.is_retryable() => {
                tracing::warn!(group = %self.group, error = %crate::sink::Rejection::from_error("retry", &e).reason, "sink tick failed, will retry");
                Ok(())
            }
            Err(source) => Err(RunnerError::Sink {
                group: self.group.clone(),
                source,
            }),
        }
    }

    /// Mirrors the sink's positions into the group's Kafka offsets, for lag tooling only.
    fn mirror_commit(
        &self,
        consumer: &BaseConsumer<RunnerContext<S>>,
        last: &[(String, i32, i64)],
    ) {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, o) in last {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(o + 1)) {
                tracing::debug!(error = %e, "cannot build commit list");
            }
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "mirroring offsets to Kafka failed (positions are in the sink)");
        }
    }

    fn on_assign(&self, consumer: &BaseConsumer<RunnerContext<S>>, tpl: &mut TopicPartitionList) {
        let parts: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition {
                topic: e.topic().to_owned(),
                partition: e.partition(),
            })
            .collect();
        let mut attempt = 0u32;
        let positions = loop {
            match self.handle.block_on(self.sink.positions(&parts)) {
                Ok(p) => break Ok(p),
                Err(e) if e.is_retryable() && attempt < 8 && !self.shutdown.is_triggered() => {
                    tracing::warn!(error = %e, "cannot read positions from the sink, retrying");
                    let _ = self.handle.block_on(self.pause(self.backoff(attempt)));
                    attempt += 1;
                }
                Err(e) => break Err(e),
            }
        };
        match positions {
            Ok(map) => {
                let mut set = |p: &TopicPartition, offset: Offset| {
                    tracing::info!(group = %self.group, topic = %p.topic, partition = p.partition, offset = ?offset, "partition assigned");
                    if let Err(e) = tpl.set_partition_offset(&p.topic, p.partition, offset) {
                        tracing::error!(error = %e, "cannot set assignment offset");
                    }
                };
                let mut new = Vec::new();
                for p in &parts {
                    match map.get(p) {
                        Some(o) => set(p, Offset::Offset(*o)),
                        None => new.push(p),
                    }
                }
                let starts = start_offsets(consumer, &new, self.start, START_LOOKUP_TIMEOUT);
                for (p, offset) in new.into_iter().zip(starts) {
                    set(p, offset);
                }
            }
            Err(source) => {
                tracing::error!(error = %source, "cannot read positions: stopping");
                self.set_fatal(RunnerError::Sink {
                    group: self.group.clone(),
                    source,
                });
            }
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
            _ => consumer.assign(tpl),
        };
        if let Err(e) = result {
            // Not ready until an assignment takes (the group retries it).
            tracing::error!(error = %e, "assign failed");
            self.health(|h| h.assigned = false);
            return;
        }
        let mut assigned = lock(&self.assigned);
        if !matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        ) {
            assigned.clear();
        }
        assigned.extend(parts);
        self.metrics
            .assigned_partitions
            .get_or_create(&self.labels())
            .set(assigned.len() as i64);
        drop(assigned);
        self.health(|h| {
            h.assigned = true;
            h.reached = Instant::now();
        });
    }

    fn on_revoke(
        self: &Arc<Self>,
        consumer: &BaseConsumer<RunnerContext<S>>,
        tpl: &TopicPartitionList,
    ) {
        // Finish the in-flight batch before the partitions go to another consumer.
        match self.flush(consumer) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not finish the in-flight batch on revocation");
                self.set_fatal(e);
            }
        }
        let revoked: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition {
                topic: e.topic().to_owned(),
                partition: e.partition(),
            })
            .collect();
        tracing::info!(group = %self.group, partitions = revoked.len(), "partitions revoked");
        self.handle.block_on(self.sink.revoked(&revoked));
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "unassign failed");
        }
        let mut assigned = lock(&self.assigned);
        for p in &revoked {
            assigned.remove(p);
        }
        if !matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        ) {
            assigned.clear();
        }
        self.metrics
            .assigned_partitions
            .get_or_create(&self.labels())
            .set(assigned.len() as i64);
    }
}

struct RunnerContext<S> {
    shared: Arc<Shared<S>>,
}

impl<S: Sink> ClientContext for RunnerContext<S> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "rdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "rdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "rdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "rdkafka", facility = fac, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "rdkafka", group = %self.shared.group, error = %error, "{reason}");
    }
}

impl<S: Sink> ConsumerContext for RunnerContext<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.shared
            .metrics
            .rebalances
            .get_or_create(&self.shared.labels())
            .inc();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.shared.on_assign(consumer, tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.on_revoke(consumer, tpl)
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::error!(error = %code, "rebalance error: dropping the assignment");
                self.shared.on_revoke(consumer, tpl);
            }
        }
    }
}

/// Where partitions the sink never saw start, as concrete offsets read from the broker (their
/// first offset for [`StartFrom::Earliest`], their end for [`StartFrom::Latest`]), in the
/// order given, with one request per broker for all of them. Assigned as `Offset::Beginning`
/// or `Offset::End` instead, the client looks each offset up while it already fetches the
/// partitions it knows: measured with nisshi, a consumer starting on a backlog sent a first
/// fetch holding only the topics' empty partitions, which the broker held for
/// `fetch.wait.max.ms` (100 ms) before the partitions with records were asked for at all.
/// A partition the broker gives no offset for within `timeout` (none at all if it is zero)
/// keeps the symbolic offset, for the client to look up.
pub fn start_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    parts: &[&TopicPartition],
    start: StartFrom,
    timeout: Duration,
) -> Vec<Offset> {
    let symbolic = match start {
        StartFrom::Earliest => Offset::Beginning,
        StartFrom::Latest => Offset::End,
    };
    if parts.is_empty() || timeout.is_zero() {
        return vec![symbolic; parts.len()];
    }
    // ListOffsets by "time": the symbolic offsets are the protocol's earliest and latest.
    let mut ask = TopicPartitionList::new();
    for p in parts {
        if let Err(e) = ask.add_partition_offset(&p.topic, p.partition, symbolic) {
            tracing::debug!(topic = %p.topic, partition = p.partition, error = %e, "cannot ask where the partition starts");
        }
    }
    let found = match consumer.offsets_for_times(ask, timeout) {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read where new partitions start; the client will look them up");
            return vec![symbolic; parts.len()];
        }
    };
    parts
        .iter()
        .map(|p| match found.find_partition(&p.topic, p.partition) {
            Some(e) if e.error().is_ok() => match e.offset() {
                Offset::Offset(at) if at >= 0 => Offset::Offset(at),
                _ => symbolic,
            },
            _ => symbolic,
        })
        .collect()
}

fn create_consumer<S: Sink>(
    config: &RunnerConfig,
    shared: Arc<Shared<S>>,
) -> Result<BaseConsumer<RunnerContext<S>>, RunnerError> {
    let mut cfg = client_config(&config.kafka).map_err(KafkaSetupError::from)?;
    cfg.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match config.start {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        )
        // Bound what librdkafka prefetches per partition (memory, and work lost on revoke).
        .set("queued.max.messages.kbytes", "16384")
        // When that bound is reached librdkafka (>= 2.4) pauses fetching for
        // `fetch.queue.backoff.ms`, 1 s by default: a consumer slower than the broker then
        // drains its queue and waits idle for most of that second (measured: the runner
        // fetched ~95k records/s instead of ~300k). Resume fetching soon instead.
        .set("fetch.queue.backoff.ms", "10")
        // How long the broker may hold a fetch that finds nothing new (librdkafka's default
        // is 500 ms). Apache Kafka answers a parked fetch as soon as records arrive, so there
        // this only bounds how often an idle consumer asks; a broker that long-polls by
        // sleeping (nisshi sleeps half of what is left of the wait, then looks again) adds up
        // to half of it to every record's latency.
        .set("fetch.wait.max.ms", "100")
        // What one fetch brings per partition (librdkafka's default is 1 MiB). The records of
        // a batch come in the order the fetches brought them, so a batch interleaves its
        // partitions only as finely as this: with 1 MiB (about 4,000 events of the contract), a
        // 20,000-record batch held five partitions' runs and a `PgSink`'s lanes, split by
        // partition, carried 8,000 and 12,000 records, or 3,000 and 15,000, and the batch
        // waited for the fuller one. With 256 KiB its lanes carry about as much
        // (docs/benchmarks.md, eleventh session). A fetch still asks for every partition, up
        // to `fetch.max.bytes` in all.
        .set("max.partition.fetch.bytes", "262144");
    // The operator's properties win over the defaults above.
    for (k, v) in config
        .kafka
        .extra_properties()
        .map_err(KafkaSetupError::from)?
    {
        cfg.set(k, v);
    }
    let consumer: BaseConsumer<RunnerContext<S>> = cfg
        .create_with_context(RunnerContext { shared })
        .map_err(KafkaSetupError::from)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| RunnerError::Subscribe {
            topics: config.topics.clone(),
            source,
        })?;
    Ok(consumer)
}

fn poll_loop<S: Sink>(
    consumer: BaseConsumer<RunnerContext<S>>,
    shared: Arc<Shared<S>>,
    tuning: RunnerArgs,
    probe_topic: String,
) -> Result<(), RunnerError> {
    let mut batch_started: Option<Instant> = None;
    let mut last_tick = Instant::now();
    let linger = tuning.batch_linger();
    let take_fatal = || lock(&shared.fatal).take();
    let mut copier = RecordCopier::new();
    let ceiling = tuning.batch_ceiling();
    let mut cuts = Cuts::caught_up();
    // Records pending, as of the last poll (only a poll, through a revocation, empties the
    // batch behind this loop's back).
    let mut len = 0usize;
    loop {
        if let Some(e) = take_fatal() {
            return Err(e);
        }
        if shared.shutdown.is_triggered() {
            break;
        }
        if shared.dropped.load(Ordering::Relaxed) {
            // Nobody waits for this consumer any more (its task was dropped, e.g. with the
            // runtime): stop without touching the runtime, which may be shutting down.
            tracing::warn!(group = %shared.group, "the consumer's task was dropped: stopping without finishing the batch in flight (it will be redelivered)");
            consumer.unsubscribe();
            return Ok(());
        }
        // Past the normal batch size, only what is already fetched is taken: the batch grows
        // while records keep waiting (catching up) and is cut as soon as none does.
        let wait = if len >= tuning.batch_size {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        let polled = consumer.poll(wait).map(|r| r.map(|m| copier.copy(&m)));
        if let Some(e) = take_fatal() {
            return Err(e);
        }
        let idle = polled.is_none();
        // One lock of the pending batch per record: push and size together.
        len = match polled {
            None => lock(&shared.pending).len(),
            Some(Ok(record)) => {
                batch_started.get_or_insert_with(Instant::now);
                let mut pending = lock(&shared.pending);
                pending.push(record);
                pending.len()
            }
            Some(Err(e)) => {
                tracing::warn!(group = %shared.group, error = %e, "consumer error");
                lock(&shared.pending).len()
            }
        };
        if len > 0 {
            // The linger clock is read when the log pauses and every 64 records, not for
            // every record (clock reads were a tenth of this thread's time at full speed).
            let due =
                (idle || len % 64 == 0) && batch_started.is_some_and(|t| t.elapsed() >= linger);
            let full = len >= ceiling || (idle && len >= tuning.batch_size);
            if full || due {
                // Cut at the maximum: behind; smaller (linger time, or the records waiting
                // ran out) twice in a row: keeping up.
                shared.catching_up(cuts.cut(len >= ceiling));
                if let Flushed::Abandoned = shared.dispatch(&consumer, Some(&mut last_tick))? {
                    break;
                }
                // The batch went to the sink whole.
                len = 0;
                batch_started = None;
            }
        } else {
            batch_started = None;
        }
        // Between batches (also under steady load, so quiet partitions are not starved), once
        // the batch in flight has finished: the poll thread never waits for it here, it
        // gathers the next batch meanwhile (dispatching that one ticks if still due).
        if len == 0 && shared.sink_idle() {
            if idle {
                // Nothing applying, nothing fetched, nothing came: caught up, or cut off.
                cuts = Cuts::caught_up();
                shared.catching_up(false);
                shared.probe_broker(&consumer, &probe_topic);
            }
            if let Flushed::Abandoned = shared.settle(&consumer)? {
                break;
            }
            shared.tick_if_due(&mut last_tick)?;
        }
    }
    // Shutdown: finish the in-flight batch, then leave the group.
    lock(&shared.fatal).take().map_or(Ok(()), Err)?;
    if let Flushed::Abandoned = shared.flush(&consumer)? {
        tracing::info!(group = %shared.group, "shutdown: the batches not applied will be redelivered");
    }
    // The sink lets go of its partitions before the group hands them to someone else.
    let held: Vec<TopicPartition> = lock(&shared.assigned).iter().cloned().collect();
    shared.handle.block_on(shared.sink.revoked(&held));
    consumer.unsubscribe();
    drop(consumer);
    tracing::info!(group = %shared.group, "consumer stopped");
    Ok(())
}

/// Runs a consumer until `shutdown` (returns `Ok` after finishing the in-flight batch) or
/// a fatal error.
pub async fn run<S: Sink>(
    config: RunnerConfig,
    sink: Arc<S>,
    producer: Arc<Producer>,
    metrics: RunnerMetrics,
    ready: Option<ReadyFlag>,
    shutdown: Shutdown,
) -> Result<(), RunnerError> {
    // Fail fast, before joining the group, if the sink is unreachable.
    sink.positions(&[])
        .await
        .map_err(|source| RunnerError::Sink {
            group: config.group_id.clone(),
            source,
        })?;
    let shared = Arc::new(Shared {
        sink,
        dlq: DeadLetters::new(
            producer,
            config.dead_letter_topic.clone(),
            config.group_id.clone(),
            config.tuning.max_consecutive_dead_letters,
        ),
        handle: Handle::current(),
        group: config.group_id.clone(),
        start: config.start,
        backoff_max: config.tuning.retry_backoff_max(),
        pending: Mutex::new(Vec::with_capacity(config.tuning.batch_size)),
        in_flight: Mutex::new(None),
        fatal: Mutex::new(None),
        assigned: Mutex::new(BTreeSet::new()),
        shutdown,
        metrics,
        catch_up: config.catch_up.clone(),
        health: Mutex::new(Health::new()),
        ready: ready.clone(),
        stall: config.tuning.stall(),
        dropped: Arc::new(AtomicBool::new(false)),
    });
    // A dropped `run` (an aborted task, a runtime shutting down after a panic) stops the poll
    // thread instead of leaving it running with nobody to stop it.
    let _stop_when_dropped = FlagOnDrop(shared.dropped.clone());
    let consumer = create_consumer(&config, shared.clone())?;
    tracing::info!(group = %config.group_id, topics = ?config.topics, "consumer started");
    // Not ready until assigned.
    shared.health(|_| {});
    let group = config.group_id.clone();
    let tuning = config.tuning.clone();
    let probe_topic = config.topics.first().cloned().unwrap_or_default();
    let result =
        tokio::task::spawn_blocking(move || poll_loop(consumer, shared, tuning, probe_topic))
            .await
            .unwrap_or_else(|_| Err(RunnerError::Panicked(group)));
    if let Some(r) = &ready {
        r.set(false);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::{Cuts, Health};
    use std::time::{Duration, Instant};

    #[test]
    fn ready_means_assigned_reaching_the_broker_and_no_batch_failing_for_long() {
        let stall = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut h = Health::new();
        h.reached = t0;
        assert_eq!(h.unready(t0, stall), Some("unassigned"));
        h.assigned = true;
        assert_eq!(h.unready(t0 + Duration::from_secs(29), stall), None);
        assert_eq!(
            h.unready(t0 + Duration::from_secs(31), stall),
            Some("broker_unreachable")
        );
        h.failing_since = Some(t0);
        assert_eq!(
            h.unready(t0 + Duration::from_secs(32), stall),
            Some("sink_failing")
        );
        h.failing_since = Some(t0 + Duration::from_secs(20));
        h.reached = t0 + Duration::from_secs(31);
        assert_eq!(h.unready(t0 + Duration::from_secs(32), stall), None);
    }

    fn behind_after(at_max: &[bool]) -> Vec<bool> {
        let mut cuts = Cuts::caught_up();
        at_max.iter().map(|m| cuts.cut(*m)).collect()
    }

    #[test]
    fn a_runner_keeping_up_never_says_behind() {
        assert_eq!(behind_after(&[false; 4]), [false; 4]);
    }

    #[test]
    fn one_cut_at_the_maximum_says_behind_and_two_smaller_ones_in_a_row_say_caught_up() {
        assert_eq!(
            behind_after(&[true, true, false, false, false]),
            [true, true, true, false, false]
        );
    }

    #[test]
    fn one_batch_of_a_backlog_cut_short_does_not_say_caught_up() {
        // A fetch in flight cut the third batch short; the backlog goes on.
        assert_eq!(
            behind_after(&[true, true, false, true, true, false, false]),
            [true, true, true, true, true, true, false]
        );
    }
}
