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
//!   on the first offset, so a repeated upload writes the same bytes to the same name.
//!
//! Uploads overlap with consumption: each partition has at most one upload task in flight,
//! which takes every file sealed so far and writes them in order while the next batches are
//! read and encoded. Files sealed meanwhile wait for that task; when more than
//! [`MAX_WAITING_FILES`] wait, the batch waits for the upload (back-pressure, so memory is
//! bounded). A failed upload hands its files back and surfaces as a retryable error at the
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

use crate::cut::{self, CutPolicy, OpenFile, SealedFile};
use crate::layout;
use crate::metrics::{ArchiverMetrics, TopicLabels};
use crate::ocf::Codec;
use crate::store::{Archive, StoreError};

/// Sealed files a partition may hold while its upload is in flight before batches wait.
pub const MAX_WAITING_FILES: usize = 2;

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
}

pub struct ArchiveSink {
    archive: Archive,
    policy: CutPolicy,
    codec: Codec,
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
        if let Err(e) = archive.put(&path, bytes.clone()).await {
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

/// Waits for a partition's upload in flight. A failure puts its files back in front of
/// the sealed ones.
async fn settle(ps: &mut PartitionState) -> Result<(), SinkError> {
    let Some(upload) = ps.upload.take() else {
        return Ok(());
    };
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
        metrics: ArchiverMetrics,
    ) -> Self {
        Self {
            archive,
            policy,
            codec,
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
        let next = self
            .archive
            .next_offset(&tp.topic, tp.partition)
            .await
            .map_err(store_error)?;
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
                if ps.next.is_some_and(|n| r.offset < n) {
                    // Already archived, or already held from an earlier attempt of this batch.
                    skipped += 1;
                    continue;
                }
                if let Some(f) = cut::add(&mut ps.open, r, &self.policy, self.codec, now) {
                    ps.sealed.push_back(f);
                }
                ps.next = Some(r.offset + 1);
                applied += 1;
            }
            let c = stats.topic(&tp.topic);
            c.applied += applied;
            c.skipped += skipped;
        }
        self.pump(&mut state).await?;
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
        self.pump(&mut state).await
    }
}
