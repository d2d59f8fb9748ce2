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

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use cdp_runtime::dlq::DeadLetters;
use cdp_runtime::sink::{ApplyStats, Sink, SinkError};
use cdp_runtime::{RawRecord, TopicPartition};
use tokio::sync::Mutex;

use crate::cut::{CutPolicy, OpenFile, SealedFile};
use crate::layout;
use crate::metrics::{ArchiverMetrics, TopicLabels};
use crate::ocf::Codec;
use crate::store::{Archive, StoreError};

#[derive(Debug, Default)]
struct PartitionState {
    /// The next offset to archive; `None` until the partition's first record when nothing
    /// of it is archived yet.
    next: Option<i64>,
    open: Option<OpenFile>,
    sealed: VecDeque<SealedFile>,
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

    /// Uploads every sealed file: partitions concurrently, each partition's files in offset
    /// order. A failure leaves that partition's remaining files queued (the runner retries
    /// the batch; its records are already held and are skipped).
    async fn upload_sealed(
        &self,
        state: &mut HashMap<TopicPartition, PartitionState>,
    ) -> Result<(), SinkError> {
        let uploads = state
            .values_mut()
            .filter(|ps| !ps.sealed.is_empty())
            .map(|ps| self.upload_partition(ps));
        futures::future::join_all(uploads)
            .await
            .into_iter()
            .collect()
    }

    async fn upload_partition(&self, ps: &mut PartitionState) -> Result<(), SinkError> {
        while let Some(file) = ps.sealed.front() {
            let path = layout::object_path(
                self.archive.prefix(),
                &file.topic,
                file.partition,
                file.first_offset,
                file.first_timestamp_ms,
            );
            let labels = TopicLabels {
                topic: file.topic.clone(),
            };
            let started = Instant::now();
            if let Err(e) = self.archive.put(&path, file.bytes.clone()).await {
                self.metrics.upload_failures.get_or_create(&labels).inc();
                tracing::warn!(
                    topic = %file.topic,
                    partition = file.partition,
                    offset = file.first_offset,
                    error = %e,
                    "upload failed"
                );
                return Err(store_error(e));
            }
            self.metrics
                .upload_duration
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            self.metrics.files.get_or_create(&labels).inc();
            self.metrics
                .records
                .get_or_create(&labels)
                .inc_by(file.records);
            self.metrics
                .bytes
                .get_or_create(&labels)
                .inc_by(file.bytes.len() as u64);
            tracing::info!(
                topic = %file.topic,
                partition = file.partition,
                offset = file.first_offset,
                last_offset = file.last_offset,
                records = file.records,
                bytes = file.bytes.len(),
                object = %path,
                "archived"
            );
            ps.sealed.pop_front();
        }
        Ok(())
    }

    /// (Re)starts a partition from the archive's position, dropping whatever was held.
    async fn load(
        &self,
        state: &mut HashMap<TopicPartition, PartitionState>,
        tp: &TopicPartition,
    ) -> Result<Option<i64>, SinkError> {
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

    async fn apply(
        &self,
        batch: &[RawRecord],
        _dlq: &DeadLetters,
    ) -> Result<ApplyStats, SinkError> {
        let mut state = self.state.lock().await;
        let mut stats = ApplyStats::default();
        let now = Instant::now();
        // Per-record bookkeeping without allocations: counts by topic name, and the
        // partition key rebuilt only when the partition changes (batches come in runs).
        let mut counts: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut current: Option<TopicPartition> = None;
        for r in batch {
            if current
                .as_ref()
                .is_none_or(|c| c.partition != r.partition || c.topic != r.topic)
            {
                let tp = r.topic_partition();
                if !state.contains_key(&tp) {
                    self.load(&mut state, &tp).await?;
                }
                current = Some(tp);
            }
            let Some(ps) = current.as_ref().and_then(|tp| state.get_mut(tp)) else {
                continue;
            };
            let count = counts.entry(r.topic.as_str()).or_default();
            if ps.next.is_some_and(|n| r.offset < n) {
                // Already archived, or already held from an earlier attempt of this batch.
                count.1 += 1;
                continue;
            }
            if ps
                .open
                .as_ref()
                .is_some_and(|f| f.must_close_before(r, &self.policy))
            {
                if let Some(f) = ps.open.take() {
                    ps.sealed
                        .push_back(f.seal().map_err(|e| SinkError::Fatal(Box::new(e)))?);
                }
            }
            ps.open
                .get_or_insert_with(|| OpenFile::start(r, self.codec))
                .append(r, &self.policy, now)
                .map_err(|e| SinkError::Fatal(Box::new(e)))?;
            ps.next = Some(r.offset + 1);
            count.0 += 1;
        }
        for (topic, (applied, skipped)) in counts {
            let c = stats.topic(topic);
            c.applied += applied;
            c.skipped += skipped;
        }
        self.upload_sealed(&mut state).await?;
        Ok(stats)
    }

    async fn revoked(&self, partitions: &[TopicPartition]) {
        // Another archiver owns them now: what this one held is not written by it (a tail
        // file closed here could differ from the new owner's cut).
        let mut state = self.state.lock().await;
        for tp in partitions {
            state.remove(tp);
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
                    ps.sealed
                        .push_back(f.seal().map_err(|e| SinkError::Fatal(Box::new(e)))?);
                }
            }
        }
        self.upload_sealed(&mut state).await
    }
}
