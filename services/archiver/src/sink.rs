//! The archiver as a runner sink: records go into per-partition files; closed files are
//! uploaded in offset order; positions come from the archive itself.
//!
//! Why this is gapless and duplicate-free across crashes:
//! - the position of a partition is one past the last offset of its last uploaded file,
//!   read from the archive on every assignment, so whatever was buffered or being uploaded
//!   when a process died is simply read again from Kafka;
//! - an upload is atomic (a local file is written aside and renamed; an S3 PUT is all or
//!   nothing), and a partition's files are uploaded strictly in order, the next only after
//!   the previous succeeded, so the archive never holds a later file without the earlier;
//! - file boundaries depend on the records, not on timing (see [`crate::cut`]), and names
//!   on the first offset, so a repeated upload writes the same bytes to the same name;
//! - uploads are create-only: an object is never overwritten. A file whose name is taken
//!   by an object with the same range is already archived (a repeated upload); one with a
//!   different range means another archiver wrote the partition (a member evicted during
//!   an outage and its successor): this one stops with [`Fenced`] before writing anything
//!   after it, and on restart continues from the archive as it is;
//! - a record above the next offset to archive is a hole in the log (see
//!   [`crate::continuity`]): the archiver stops unless the topic is compacted or an
//!   operator acknowledged the loss; on assignment, the partition's newest two files must
//!   follow each other.
//!
//! Uploads overlap with consumption: each partition has at most one upload task in flight,
//! which takes every file sealed so far and writes them in order while the next batches are
//! read and encoded. Files sealed meanwhile wait for that task; when more than
//! [`MAX_WAITING_FILES`] wait, the batch waits for the upload. Over all partitions, the
//! record bytes held (open, waiting, uploading) stay within a budget: beyond it the batch
//! waits for uploads and the largest open files close early (back-pressure; memory is
//! bounded whatever the partition count). A failed upload hands its files back and surfaces as a retryable error at the
//! next batch or tick, which uploads them again. Before a partition is read again from the
//! archive (assignment) or handed to another archiver (revocation), its upload task is
//! awaited, so a late upload from this process can never land after the new owner's files.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use cdp_runtime::dlq::DeadLetters;
use cdp_runtime::sink::{ApplyStats, Sink, SinkError};
use cdp_runtime::{RawRecord, TopicPartition};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::continuity::{Continuity, ContinuityError, Hole};
use crate::cut::{self, CutPolicy, OpenFile, SealedFile};
use crate::layout;
use crate::metrics::{ArchiverMetrics, GapLabels, TopicLabels};
use crate::ocf::{meta, Codec};
use crate::store::{Archive, Created, Listed, StoreError};

/// Sealed files a partition may hold while its upload is in flight before batches wait.
pub const MAX_WAITING_FILES: usize = 2;

/// Under memory pressure, open files are closed until the process holds at most this
/// fraction of its budget (so that it does not cut one file per batch at the limit).
const RELIEVED: f64 = 0.5;

/// An upload task's failure: the files it did not write (the failed one first).
#[derive(Debug)]
struct UploadFailed {
    files: VecDeque<SealedFile>,
    error: SinkError,
}

type Upload = JoinHandle<Result<(), UploadFailed>>;

#[derive(Debug, Default)]
struct PartitionState {
    /// The next offset to archive; `None` until the partition's first record when nothing
    /// of it is archived yet.
    next: Option<i64>,
    open: Option<OpenFile>,
    /// Sealed, not yet handed to an upload task, in offset order.
    sealed: VecDeque<SealedFile>,
    /// The partition's upload in flight; it holds files older than `sealed`.
    upload: Option<Upload>,
    /// Record bytes of the files in the upload in flight.
    uploading: u64,
}

impl PartitionState {
    /// Record bytes this partition holds: open, waiting and uploading.
    fn held(&self) -> u64 {
        self.open.as_ref().map_or(0, |f| f.bytes)
            + self.sealed.iter().map(|f| f.bytes).sum::<u64>()
            + self.uploading
    }
}

/// A file could not be written because another archiver wrote a different file under its
/// name: this process no longer owns the partition's archive.
#[derive(Debug, thiserror::Error)]
#[error(
    "archive file {object} exists with offsets {existing_first}..={existing_last}, this \
     archiver cut {first}..={last}: another archiver wrote partition {partition} of {topic} \
     (it was handed over while this one could not upload); stopping, a restart continues \
     from the archive"
)]
pub struct Fenced {
    pub topic: String,
    pub partition: i32,
    pub object: String,
    pub first: i64,
    pub last: i64,
    pub existing_first: i64,
    pub existing_last: i64,
}

pub struct ArchiveSink {
    /// For the partitions' ends, checked against the archive on assignment (`None`: not
    /// checked, for tools that drive the sink by hand).
    kafka: Option<cdp_runtime::config::KafkaArgs>,
    archive: Archive,
    policy: CutPolicy,
    codec: Codec,
    /// Record bytes the process may hold over all partitions.
    budget: u64,
    continuity: Continuity,
    state: Mutex<HashMap<TopicPartition, PartitionState>>,
    metrics: ArchiverMetrics,
}

fn store_error(e: StoreError) -> SinkError {
    if e.is_transient() {
        SinkError::Retryable(Box::new(e))
    } else {
        SinkError::Fatal(Box::new(e))
    }
}

/// Compresses and writes `files` in order, stopping at the first failure. Compression runs
/// on a blocking thread, in parallel with consumption.
async fn upload_files(
    archive: Archive,
    metrics: ArchiverMetrics,
    mut files: VecDeque<SealedFile>,
) -> Result<(), UploadFailed> {
    while let Some(file) = files.pop_front() {
        let encoded = match tokio::task::spawn_blocking(move || file.encoded()).await {
            Ok(result) => result.map_err(|e| SinkError::Fatal(Box::new(e))),
            Err(join) => Err(SinkError::Fatal(Box::new(join))),
        };
        let (file, bytes) = match encoded {
            Ok(encoded) => encoded,
            Err(error) => return Err(UploadFailed { files, error }),
        };
        let path = layout::object_path(
            archive.prefix(),
            &file.topic,
            file.partition,
            file.first_offset,
            file.first_timestamp_ms,
        );
        let labels = TopicLabels {
            topic: file.topic.clone(),
        };
        let started = Instant::now();
        let put = match archive.put_new(&path, bytes.clone()).await {
            Ok(Created::Written) => Ok(()),
            Ok(Created::Existed) => match same_range(&archive, &path, &file).await {
                Ok(()) => {
                    tracing::info!(topic = %file.topic, partition = file.partition, offset = file.first_offset, object = %path, "already archived");
                    Ok(())
                }
                Err(error) => {
                    files.push_front(file);
                    return Err(UploadFailed { files, error });
                }
            },
            Err(e) => Err(e),
        };
        if let Err(e) = put {
            metrics.upload_failures.get_or_create(&labels).inc();
            tracing::warn!(
                topic = %file.topic,
                partition = file.partition,
                offset = file.first_offset,
                error = %e,
                "upload failed"
            );
            files.push_front(file);
            return Err(UploadFailed {
                files,
                error: store_error(e),
            });
        }
        metrics
            .upload_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        metrics.files.get_or_create(&labels).inc();
        metrics.records.get_or_create(&labels).inc_by(file.records);
        metrics
            .bytes
            .get_or_create(&labels)
            .inc_by(bytes.len() as u64);
        tracing::info!(
            topic = %file.topic,
            partition = file.partition,
            offset = file.first_offset,
            last_offset = file.last_offset,
            records = file.records,
            bytes = bytes.len(),
            object = %path,
            "archived"
        );
    }
    Ok(())
}

/// Whether the object already at `path` holds the same range as `file` (the same records of
/// the log, so the same bytes); `Err` is [`Fenced`] when it does not.
async fn same_range(
    archive: &Archive,
    path: &object_store::path::Path,
    file: &SealedFile,
) -> Result<(), SinkError> {
    let Some(name) = layout::parse(path) else {
        return Err(SinkError::Fatal(
            format!("{path} is not an archive file name").into(),
        ));
    };
    let listed = Listed {
        name,
        path: path.clone(),
        size: archive.size(path).await.map_err(store_error)?,
    };
    let header = archive.header(&listed).await.map_err(store_error)?;
    let existing = (
        header.number(meta::FIRST_OFFSET).unwrap_or(-1),
        header.number(meta::LAST_OFFSET).unwrap_or(-1),
    );
    if existing == (file.first_offset, file.last_offset) {
        return Ok(());
    }
    Err(SinkError::Fatal(Box::new(Fenced {
        topic: file.topic.clone(),
        partition: file.partition,
        object: path.to_string(),
        first: file.first_offset,
        last: file.last_offset,
        existing_first: existing.0,
        existing_last: existing.1,
    })))
}

/// Waits for a partition's upload in flight. A failure puts its files back in front of
/// the sealed ones.
async fn settle(ps: &mut PartitionState) -> Result<(), SinkError> {
    let Some(upload) = ps.upload.take() else {
        return Ok(());
    };
    ps.uploading = 0;
    match upload.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(UploadFailed { mut files, error })) => {
            files.append(&mut ps.sealed);
            ps.sealed = files;
            Err(error)
        }
        Err(join) => Err(SinkError::Fatal(Box::new(join))),
    }
}

/// Forgets a partition, after its upload in flight (if any) finished: whoever reads its
/// position from the archive next must see that upload. A failed upload only means its
/// records are read from Kafka again.
async fn release(state: &mut HashMap<TopicPartition, PartitionState>, tp: &TopicPartition) {
    if let Some(mut ps) = state.remove(tp) {
        if let Err(e) = settle(&mut ps).await {
            tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "an upload failed; its records are archived again from Kafka");
        }
    }
}

impl ArchiveSink {
    pub fn new(
        archive: Archive,
        policy: CutPolicy,
        codec: Codec,
        budget: u64,
        continuity: Continuity,
        metrics: ArchiverMetrics,
    ) -> Self {
        Self {
            kafka: None,
            archive,
            policy,
            codec,
            budget: budget.max(1),
            continuity,
            state: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Moves every partition's uploads along: collects finished uploads, waits for one
    /// whose partition has too many files waiting, and starts a task for the files sealed
    /// since. Partitions proceed independently; the first failure is returned after all
    /// were moved along.
    async fn pump(
        &self,
        state: &mut HashMap<TopicPartition, PartitionState>,
    ) -> Result<(), SinkError> {
        let moves = state.values_mut().map(|ps| self.pump_partition(ps));
        futures::future::join_all(moves).await.into_iter().collect()
    }

    /// Keeps the record bytes held over all partitions within the budget: while over it,
    /// waits for the largest upload in flight, and when none is left to wait for, closes
    /// the largest open file (it uploads at once), until the process holds at most half of
    /// its budget. The batch waits meanwhile: back-pressure on the consumer.
    async fn relieve(
        &self,
        state: &mut HashMap<TopicPartition, PartitionState>,
    ) -> Result<(), SinkError> {
        let held = |state: &HashMap<TopicPartition, PartitionState>| -> u64 {
            state.values().map(PartitionState::held).sum()
        };
        let mut total = held(state);
        if total > self.budget {
            let target = (self.budget as f64 * RELIEVED) as u64;
            tracing::debug!(
                held = total,
                budget = self.budget,
                "archiver over its buffer budget"
            );
            while total > target {
                let uploading = state
                    .values_mut()
                    .filter(|ps| ps.upload.is_some())
                    .max_by_key(|ps| ps.uploading);
                if let Some(ps) = uploading {
                    settle(ps).await?;
                    self.pump_partition(ps).await?;
                } else if let Some(ps) = state
                    .values_mut()
                    .filter(|ps| ps.open.is_some())
                    .max_by_key(|ps| ps.open.as_ref().map_or(0, |f| f.bytes))
                {
                    if let Some(f) = ps.open.take() {
                        ps.sealed.push_back(f.seal());
                        self.metrics.pressure_cuts.inc();
                    }
                    self.pump_partition(ps).await?;
                } else {
                    break;
                }
                total = held(state);
            }
        }
        self.metrics.buffered_bytes.set(total as i64);
        Ok(())
    }

    async fn pump_partition(&self, ps: &mut PartitionState) -> Result<(), SinkError> {
        if ps
            .upload
            .as_ref()
            .is_some_and(|u| u.is_finished() || ps.sealed.len() > MAX_WAITING_FILES)
        {
            settle(ps).await?;
        }
        if ps.upload.is_none() && !ps.sealed.is_empty() {
            let files = std::mem::take(&mut ps.sealed);
            ps.uploading = files.iter().map(|f| f.bytes).sum();
            ps.upload = Some(tokio::spawn(upload_files(
                self.archive.clone(),
                self.metrics.clone(),
                files,
            )));
        }
        Ok(())
    }

    /// (Re)starts a partition from the archive's position, dropping whatever was held
    /// (after its upload in flight, if any, finished: the position must include it).
    async fn load(
        &self,
        state: &mut HashMap<TopicPartition, PartitionState>,
        tp: &TopicPartition,
    ) -> Result<Option<i64>, SinkError> {
        release(state, tp).await;
        let next = self.next_offset(tp).await?;
        state.insert(
            tp.clone(),
            PartitionState {
                next,
                ..Default::default()
            },
        );
        Ok(next)
    }
}

impl ArchiveSink {
    /// Checks on assignment that the archive is not ahead of the log ([`ContinuityError::AheadOfLog`]).
    pub fn checking_log_ends(mut self, kafka: cdp_runtime::config::KafkaArgs) -> Self {
        self.kafka = Some(kafka);
        self
    }

    /// Fails when a partition's archived position is past its log's end.
    async fn check_ends(&self, positions: &HashMap<TopicPartition, i64>) -> Result<(), SinkError> {
        let Some(kafka) = self.kafka.clone() else {
            return Ok(());
        };
        if positions.is_empty() {
            return Ok(());
        }
        let topics: Vec<String> = positions
            .keys()
            .map(|tp| tp.topic.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let marks =
            tokio::task::spawn_blocking(move || cdp_runtime::replay::watermarks(&kafka, &topics))
                .await
                .map_err(|e| SinkError::Fatal(Box::new(e)))?
                .map_err(|e| SinkError::Retryable(Box::new(e)))?;
        for (tp, next) in positions {
            if let Some((_, end)) = marks.get(tp) {
                if next > end {
                    return Err(SinkError::Fatal(Box::new(ContinuityError::AheadOfLog {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        archived: next - 1,
                        end: *end,
                    })));
                }
            }
        }
        Ok(())
    }

    /// One past the last archived offset of a partition (`None`: nothing archived), after
    /// checking that no two files start at the same offset and that the newest two follow
    /// each other (no overlap; on delete-policy topics no hole but an acknowledged one).
    async fn next_offset(&self, tp: &TopicPartition) -> Result<Option<i64>, SinkError> {
        let files = self
            .archive
            .list(&tp.topic, Some(tp.partition))
            .await
            .map_err(store_error)?;
        let overlap = |previous: &Listed, next: &Listed, first: i64| {
            SinkError::Fatal(Box::new(ContinuityError::Overlap {
                topic: tp.topic.clone(),
                partition: tp.partition,
                previous: previous.path.to_string(),
                next: next.path.to_string(),
                first,
            }))
        };
        if let Some(w) = files
            .windows(2)
            .find(|w| w[0].name.first_offset == w[1].name.first_offset)
        {
            return Err(overlap(&w[0], &w[1], w[1].name.first_offset));
        }
        let Some(last) = files.last() else {
            return Ok(None);
        };
        let header = self.archive.header(last).await.map_err(store_error)?;
        let last_offset = header.number(meta::LAST_OFFSET).ok_or_else(|| {
            store_error(StoreError::MissingMetadata {
                path: last.path.to_string(),
                key: meta::LAST_OFFSET,
            })
        })?;
        if let [.., previous, _] = files.as_slice() {
            let before = self.archive.header(previous).await.map_err(store_error)?;
            let previous_last = before.number(meta::LAST_OFFSET).ok_or_else(|| {
                store_error(StoreError::MissingMetadata {
                    path: previous.path.to_string(),
                    key: meta::LAST_OFFSET,
                })
            })?;
            let first = last.name.first_offset;
            if previous_last >= first {
                return Err(overlap(previous, last, first));
            }
            let acknowledged = header
                .gap_before()
                .is_some_and(|(from, to)| from <= previous_last + 1 && first - 1 <= to);
            if previous_last + 1 < first
                && !acknowledged
                && !self.continuity.is_compacted(&tp.topic)
            {
                return Err(SinkError::Fatal(Box::new(ContinuityError::FileGap {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    previous: previous.path.to_string(),
                    next: last.path.to_string(),
                    from: previous_last + 1,
                    to: first - 1,
                })));
            }
        }
        Ok(Some(last_offset + 1))
    }

    /// A hole `next..record.offset` in a partition: compacted topics pass; an acknowledged
    /// loss ends the open file, so that the hole lies between two files and the next file's
    /// header names it; any other hole stops the archiver.
    fn hole(
        &self,
        ps: &mut PartitionState,
        r: &RawRecord,
        next: i64,
    ) -> Result<Option<(i64, i64)>, SinkError> {
        let labels = |outcome| GapLabels {
            topic: r.topic.to_string(),
            outcome,
        };
        match self.continuity.hole(&r.topic, r.partition, next, r.offset) {
            Ok(Hole::Compacted) => Ok(None),
            Ok(Hole::Acknowledged(gap)) => {
                self.metrics
                    .gaps
                    .get_or_create(&labels("acknowledged"))
                    .inc();
                self.metrics
                    .gap_offsets
                    .get_or_create(&labels("acknowledged"))
                    .inc_by((gap.to - gap.from + 1) as u64);
                tracing::warn!(topic = %r.topic, partition = r.partition, from = gap.from, to = gap.to, "acknowledged gap: these offsets are not in the archive");
                if let Some(f) = ps.open.take() {
                    ps.sealed.push_back(f.seal());
                }
                Ok(Some((gap.from, gap.to)))
            }
            Err(e) => {
                if let ContinuityError::Gap(gap) = &e {
                    self.metrics.gaps.get_or_create(&labels("stopped")).inc();
                    self.metrics
                        .gap_offsets
                        .get_or_create(&labels("stopped"))
                        .inc_by((gap.to - gap.from + 1) as u64);
                }
                tracing::error!(topic = %r.topic, partition = r.partition, offset = r.offset, error = %e, "gap in the log");
                Err(SinkError::Fatal(Box::new(e)))
            }
        }
    }
}

impl Sink for ArchiveSink {
    async fn positions(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, SinkError> {
        let mut state = self.state.lock().await;
        let mut out = HashMap::new();
        for tp in partitions {
            // Whatever this process held for the partition is read again from the
            // archive's position: drop it.
            if let Some(n) = self.load(&mut state, tp).await? {
                out.insert(tp.clone(), n);
            }
        }
        self.check_ends(&out).await?;
        Ok(out)
    }

    /// Records are archived as they came: nothing to prepare.
    type Prepared = Vec<RawRecord>;

    fn prepare(&self, batch: Vec<RawRecord>) -> Vec<RawRecord> {
        batch
    }

    fn records(batch: &Vec<RawRecord>) -> &[RawRecord] {
        batch
    }

    async fn apply(
        &self,
        batch: &Vec<RawRecord>,
        _dlq: &DeadLetters,
    ) -> Result<ApplyStats, SinkError> {
        let mut state = self.state.lock().await;
        let mut stats = ApplyStats::default();
        let now = Instant::now();
        // Batches come in runs of one partition: the partition's state is looked up once
        // per run, and nothing is hashed or allocated per record.
        for run in batch.chunk_by(|a, b| a.partition == b.partition && a.topic == b.topic) {
            let tp = run[0].topic_partition();
            if !state.contains_key(&tp) {
                self.load(&mut state, &tp).await?;
            }
            let Some(ps) = state.get_mut(&tp) else {
                continue;
            };
            let (mut applied, mut skipped) = (0u64, 0u64);
            for r in run {
                let gap = match ps.next {
                    // Already archived, or already held from an earlier attempt of this batch.
                    Some(n) if r.offset < n => {
                        skipped += 1;
                        continue;
                    }
                    Some(n) if r.offset > n => self.hole(ps, r, n)?,
                    _ => None,
                };
                if let Some(f) = cut::add(&mut ps.open, r, &self.policy, self.codec, now) {
                    ps.sealed.push_back(f);
                }
                if let (Some(gap), Some(open)) = (gap, ps.open.as_mut()) {
                    open.gap_before = Some(gap);
                }
                ps.next = Some(r.offset + 1);
                applied += 1;
            }
            let c = stats.topic(&tp.topic);
            c.applied += applied;
            c.skipped += skipped;
        }
        self.pump(&mut state).await?;
        self.relieve(&mut state).await?;
        Ok(stats)
    }

    async fn revoked(&self, partitions: &[TopicPartition]) {
        // Another archiver owns them now: what this one held is not written by it (a tail
        // file closed here could differ from the new owner's cut).
        // Its upload in flight is awaited first, so it cannot land after the new owner's.
        let mut state = self.state.lock().await;
        for tp in partitions {
            release(&mut state, tp).await;
        }
    }

    async fn tick(&self) -> Result<(), SinkError> {
        let mut state = self.state.lock().await;
        let now_ms = chrono::Utc::now().timestamp_millis();
        for ps in state.values_mut() {
            if ps
                .open
                .as_ref()
                .is_some_and(|f| f.idle_expired(&self.policy, now_ms))
            {
                if let Some(f) = ps.open.take() {
                    ps.sealed.push_back(f.seal());
                }
            }
        }
        self.pump(&mut state).await?;
        self.relieve(&mut state).await
    }
}
