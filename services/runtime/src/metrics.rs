//! Prometheus metrics: one registry per process, typed metric families with bounded labels.
//! Names follow `cdp_<subsystem>_<name>_<unit>` (counters get `_total` on exposition).

use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

/// The process's metric registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// The runners' families, registered once however many consumers the process runs.
    runner: Arc<OnceLock<RunnerMetrics>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry::with_prefix("cdp"))),
            runner: Arc::new(OnceLock::new()),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a metric; the caller keeps a clone to update it.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// The OpenMetrics text exposition of every registered metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match self.registry.lock() {
            Ok(r) => prometheus_client::encoding::text::encode(&mut out, &r)?,
            Err(_) => return Err(std::fmt::Error),
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Applied by the sink.
    Applied,
    /// Already applied earlier (redelivery after a crash or rebalance): no effect.
    Skipped,
    /// Sent to the dead-letter topic.
    DeadLettered,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    pub group: String,
    pub topic: String,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnreadyLabels {
    pub group: String,
    /// `unassigned`, `broker_unreachable` or `sink_failing`.
    pub reason: &'static str,
}

/// Buckets for durations from 1 ms to about 30 s, doubling.
pub fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// What the consumer runner reports.
#[derive(Clone)]
pub struct RunnerMetrics {
    pub records: Family<RecordLabels, Counter>,
    pub batches: Family<GroupLabels, Counter>,
    pub batch_retries: Family<GroupLabels, Counter>,
    pub batch_duration: Family<GroupLabels, Histogram, fn() -> Histogram>,
    pub assigned_partitions: Family<GroupLabels, Gauge>,
    pub rebalances: Family<GroupLabels, Counter>,
    pub catching_up: Family<GroupLabels, Gauge>,
    pub unready: Family<UnreadyLabels, Gauge>,
}

impl RunnerMetrics {
    /// The process's runner metrics (registered on first use; every consumer shares them,
    /// told apart by the `group` label).
    pub fn register(metrics: &Metrics) -> Self {
        metrics
            .runner
            .get_or_init(|| Self::register_new(metrics))
            .clone()
    }

    fn register_new(metrics: &Metrics) -> Self {
        let m = Self {
            records: Family::default(),
            batches: Family::default(),
            batch_retries: Family::default(),
            batch_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            assigned_partitions: Family::default(),
            rebalances: Family::default(),
            catching_up: Family::default(),
            unready: Family::default(),
        };
        metrics.register(
            "consumer_records",
            "Records handled by consumer runners, by outcome",
            m.records.clone(),
        );
        metrics.register(
            "consumer_batches",
            "Batches committed by the sink",
            m.batches.clone(),
        );
        metrics.register(
            "consumer_batch_retries",
            "Batches retried after a retryable sink error",
            m.batch_retries.clone(),
        );
        metrics.register(
            "consumer_batch_duration_seconds",
            "Time to apply one batch in the sink",
            m.batch_duration.clone(),
        );
        metrics.register(
            "consumer_assigned_partitions",
            "Partitions currently assigned to this consumer",
            m.assigned_partitions.clone(),
        );
        metrics.register(
            "consumer_rebalances",
            "Partition assignments and revocations",
            m.rebalances.clone(),
        );
        metrics.register(
            "consumer_catching_up",
            "1 while the consumer is behind the log (it cuts batches at the maximum size), else 0",
            m.catching_up.clone(),
        );
        metrics.register(
            "consumer_unready",
            "1 for the reason a consumer is not ready (unassigned: no assignment yet; \
             broker_unreachable: no record or broker answer for CDP_CONSUMER_STALL_SECS; \
             sink_failing: a batch has failed for that long), else 0",
            m.unready.clone(),
        );
        m
    }
}
