//! What the archiver reports, besides the runner's consumer metrics.

use cdp_runtime::metrics::{duration_histogram, Metrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Clone)]
pub struct ArchiverMetrics {
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
            files: Family::default(),
            records: Family::default(),
            bytes: Family::default(),
            upload_failures: Family::default(),
            upload_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
        }
    }
}
