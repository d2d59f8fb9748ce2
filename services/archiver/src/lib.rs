//! The archiver: every event topic (and the compliance topics) into Avro Object Container
//! Files on a local directory or any S3-compatible store, gapless and without duplicates
//! across crashes; and `restore`, which brings archived records back into a topic.
//!
//! - [`ocf`]: the container file format (writer and reader).
//! - [`layout`]: deterministic object names.
//! - [`cut`]: where a file ends.
//! - [`continuity`]: no offset twice, none missing unless acknowledged.
//! - [`sink`]: the runner sink (positions are the archive itself).
//! - [`store`]: the object store.
//! - [`restore`]: archive → topic.

pub mod continuity;
pub mod cut;
pub mod layout;
pub mod metrics;
pub mod ocf;
pub mod restore;
pub mod sink;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{KafkaArgs, RunnerArgs};
use cdp_runtime::kafka::producer::Producer;
use cdp_runtime::kafka::runner::{self, RunnerConfig, RunnerError, StartFrom};
use cdp_runtime::kafka::KafkaSetupError;
use cdp_runtime::metrics::{Metrics, RunnerMetrics};
use cdp_runtime::topics::{Topic, Topics};
use cdp_runtime::Shutdown;

pub use store::{Archive, StoreArgs, StoreError};

/// The topics archived by default: every event topic and the compliance topics. The profiles
/// topic is a projection (rebuilt by replay) and dead letters have their own retention.
pub const ARCHIVED: [Topic; 5] = [
    Topic::CustomerEvents,
    Topic::CapsuleEvents,
    Topic::Compliance,
    Topic::Identity,
    Topic::Audit,
];

/// What the archiver does and where files end.
#[derive(clap::Args, Clone, Debug)]
pub struct ArchiverArgs {
    /// Consumer group of the archiver (its positions are the archive itself; the group's
    /// Kafka offsets only mirror them for lag tools).
    #[arg(
        id = "archiver_group",
        value_name = "GROUP",
        long = "archiver-group",
        env = "CDP_ARCHIVER_GROUP",
        default_value = "cdp-archiver"
    )]
    pub group: String,
    /// Topics to archive, comma-separated. Default: the catalogue's event and compliance
    /// topics (customer-events, capsule-events, compliance, identity, audit) with the prefix.
    #[arg(
        id = "archive_topics",
        value_name = "TOPICS",
        long = "archive-topics",
        env = "CDP_ARCHIVE_TOPICS",
        value_delimiter = ','
    )]
    pub topics: Vec<String>,
    /// Block compression of archive files.
    #[arg(
        id = "archive_codec",
        value_name = "CODEC",
        long = "archive-codec",
        env = "CDP_ARCHIVE_CODEC",
        value_enum,
        default_value = "zstandard"
    )]
    pub codec: ocf::Codec,
    /// A file closes at this many records.
    #[arg(
        id = "archive_max_records",
        value_name = "N",
        long = "archive-max-records",
        env = "CDP_ARCHIVE_MAX_RECORDS",
        default_value_t = 100_000
    )]
    pub max_records: u64,
    /// A file closes before its key, value and header bytes would pass this (held in memory
    /// per partition until uploaded).
    #[arg(id = "archive_max_bytes",
        value_name = "BYTES", long = "archive-max-bytes", env = "CDP_ARCHIVE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_bytes: u64,
    /// A file holds records of one time window (by record timestamp, aligned to the epoch):
    /// a record of a later window starts a new file.
    #[arg(
        id = "archive_window_secs",
        value_name = "SECS",
        long = "archive-window-secs",
        env = "CDP_ARCHIVE_WINDOW_SECS",
        default_value_t = 300
    )]
    pub window_secs: u64,
    /// At the tail of the log, a file closes once its window ended this long ago and its
    /// partition has been quiet this long (milliseconds).
    #[arg(
        id = "archive_grace_ms",
        value_name = "MS",
        long = "archive-grace-ms",
        env = "CDP_ARCHIVE_GRACE_MS",
        default_value_t = 30_000
    )]
    pub grace_ms: u64,
    /// Offsets an operator accepts as lost to the archive, `topic:partition:from-to`,
    /// comma-separated. The archiver stops when records of a delete-policy topic are gone
    /// from the log before it archived them, and its error names the entry that lets it go on.
    #[arg(
        id = "archive_acknowledged_gaps",
        value_name = "GAPS",
        long = "archive-acknowledged-gaps",
        env = "CDP_ARCHIVE_ACKNOWLEDGED_GAPS",
        value_delimiter = ','
    )]
    pub acknowledged_gaps: Vec<continuity::AcknowledgedGap>,
    /// Bytes of records the process may hold over all partitions (open files, files waiting
    /// for upload and being uploaded). Beyond it, a batch waits for uploads, and the largest
    /// open files close early.
    #[arg(
        id = "archive_max_buffered_bytes",
        value_name = "BYTES",
        long = "archive-max-buffered-bytes",
        env = "CDP_ARCHIVE_MAX_BUFFERED_BYTES",
        default_value_t = 1024 * 1024 * 1024
    )]
    pub max_buffered_bytes: u64,
}

impl ArchiverArgs {
    pub fn policy(&self) -> cut::CutPolicy {
        cut::CutPolicy {
            max_records: self.max_records.max(1),
            max_bytes: self.max_bytes.max(1),
            window_ms: i64::try_from(self.window_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX)
                .max(1),
            grace: Duration::from_millis(self.grace_ms),
        }
    }

    /// The topics to archive, with the catalogue's default.
    pub fn topics(&self, kafka: &KafkaArgs) -> Vec<String> {
        if self.topics.is_empty() {
            let names = Topics::new(&kafka.topic_prefix);
            ARCHIVED.iter().map(|t| names.name(*t)).collect()
        } else {
            self.topics.clone()
        }
    }
}

/// Everything `cdp archive` needs.
#[derive(Clone, Debug)]
pub struct ArchiverConfig {
    pub kafka: KafkaArgs,
    pub runner: RunnerArgs,
    pub archiver: ArchiverArgs,
    pub store: StoreArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error("cannot open the archive")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error("the archiver's consumer failed")]
    Runner(#[from] RunnerError),
}

/// Runs the archiver until `shutdown`. Files still open at shutdown are not written: the
/// next run reads their records again from Kafka (cuts stay deterministic).
pub async fn run(
    config: ArchiverConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: Shutdown,
) -> Result<(), ArchiverError> {
    let mut archive = Archive::open(&config.store)?;
    if !archive.probe_create_only().await? {
        tracing::warn!(archive = %archive, "the object store ignores create-only puts: the archiver looks a name up before writing it, which stops an archiver that comes late to a name, not two writing it at the same moment");
    }
    let topics = config.archiver.topics(&config.kafka);
    tracing::info!(archive = %archive, topics = ?topics, "archiving");
    let policies = cdp_runtime::topics::cleanup_policies(&config.kafka, &topics).await?;
    let sink = Arc::new(
        sink::ArchiveSink::new(
            archive,
            config.archiver.policy(),
            config.archiver.codec,
            config.archiver.max_buffered_bytes,
            continuity::Continuity::new(policies, config.archiver.acknowledged_gaps.clone()),
            metrics::ArchiverMetrics::register(metrics),
        )
        .checking_log_ends(config.kafka.clone()),
    );
    let producer = Arc::new(Producer::new(&config.kafka)?);
    let names = Topics::new(&config.kafka.topic_prefix);
    runner::run(
        RunnerConfig {
            kafka: config.kafka.clone(),
            group_id: config.archiver.group.clone(),
            topics,
            dead_letter_topic: names.name(Topic::DeadLetter),
            tuning: config.runner.clone(),
            start: StartFrom::Earliest,
            catch_up: Default::default(),
        },
        sink,
        producer,
        RunnerMetrics::register(metrics),
        Some(readiness.component("archiver")),
        shutdown,
    )
    .await?;
    Ok(())
}
