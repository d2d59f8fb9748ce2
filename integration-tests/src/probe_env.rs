//! What every probe binary (a service as a process the tests can SIGKILL) reads from its
//! environment the same way.

use anyhow::Context;
use cdp_runtime::config::{KafkaArgs, LogFormat, TelemetryArgs};

/// A required variable.
pub fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

/// Logs to stderr, filtered by `CDP_LOG` (default `warn`).
pub fn init_logging() -> anyhow::Result<()> {
    cdp_runtime::telemetry::init(&TelemetryArgs {
        log_format: LogFormat::Pretty,
        log_filter: std::env::var("CDP_LOG").unwrap_or_else(|_| "warn".to_owned()),
    })?;
    Ok(())
}

/// `CDP_KAFKA_BROKERS` with `topic_prefix`, plus `CDP_KAFKA_PROPERTIES` (`k=v,k=v`).
pub fn kafka(topic_prefix: impl Into<String>) -> anyhow::Result<KafkaArgs> {
    let mut kafka = KafkaArgs::local(var("CDP_KAFKA_BROKERS")?, topic_prefix);
    kafka.properties = std::env::var("CDP_KAFKA_PROPERTIES")
        .map(|p| p.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(kafka)
}
