//! What the archiver reports, besides the runner's consumer metrics.

use cdp_runtime::metrics::{duration_histogram, Metrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GapLabels {
    pub topic: String,
    /// `stopped` (the archiver stopped on it) or `acknowledged` (an operator accepted it).
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct ArchiverMetrics {
    pub gaps: Family<GapLabels, Counter>,
    pub buffered_bytes: Gauge,
    pub pressure_cuts: Counter,
    pub gap_offsets: Family<GapLabels, Counter>,
    pub files: Family<TopicLabels, Counter>,
    pub records: Family<TopicLabels, Counter>,
    pub bytes: Family<TopicLabels, Counter>,
    pub upload_failures: Family<TopicLabels, Counter>,
    pub upload_duration: Family<TopicLabels, Histogram, fn() -> Histogram>,
}

impl ArchiverMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self::unregistered();
        metrics.register("archive_files", "Archive files uploaded", m.files.clone());
        metrics.register(
            "archive_buffered_bytes",
            "Record bytes held in open, waiting and uploading files, over all partitions",
            m.buffered_bytes.clone(),
        );
        metrics.register(
            "archive_pressure_cuts",
            "Open files closed early because the process held more than its buffer budget",
            m.pressure_cuts.clone(),
        );
        metrics.register(
            "archive_gaps",
            "Holes found in a delete-policy topic's log (records gone before they were archived)",
            m.gaps.clone(),
        );
        metrics.register(
            "archive_gap_offsets",
            "Offsets missing in the holes counted by archive_gaps",
            m.gap_offsets.clone(),
        );
        metrics.register(
            "archive_records",
            "Records in uploaded archive files",
            m.records.clone(),
        );
        metrics.register(
            "archive_bytes",
            "Bytes of uploaded archive files (compressed)",
            m.bytes.clone(),
        );
        metrics.register(
            "archive_upload_failures",
            "Failed uploads (retried with back-off)",
            m.upload_failures.clone(),
        );
        metrics.register(
            "archive_upload_duration_seconds",
            "Time to upload one archive file",
            m.upload_duration.clone(),
        );
        m
    }

    /// Metrics nobody scrapes (tools and benchmarks).
    pub fn unregistered() -> Self {
        Self {
            gaps: Family::default(),
            buffered_bytes: Gauge::default(),
            pressure_cuts: Counter::default(),
            gap_offsets: Family::default(),
            files: Family::default(),
            records: Family::default(),
            bytes: Family::default(),
            upload_failures: Family::default(),
            upload_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
        }
    }
}
