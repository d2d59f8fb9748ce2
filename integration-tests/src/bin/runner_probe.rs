//! A consumer process running the shared runner with the probe handler, so tests can
//! SIGKILL and SIGTERM a real process. Configured by environment:
//! `CDP_KAFKA_BROKERS`, `CDP_DATABASE_URL`, `CDP_BATCH_SIZE`, `CDP_KAFKA_PROPERTIES`,
//! `PROBE_TOPIC`, `PROBE_GROUP`, `PROBE_DLQ`, `PROBE_DELAY_MS`.

use cdp_integration_tests::probe_env::{init_logging, kafka, var};
use std::sync::Arc;
use std::time::Duration;

use cdp_integration_tests::ProbeHandler;
use cdp_runtime::config::{PostgresArgs, RunnerArgs};
use cdp_runtime::kafka::producer::Producer;
use cdp_runtime::kafka::runner::{self, RunnerConfig, StartFrom};
use cdp_runtime::metrics::{Metrics, RunnerMetrics};
use cdp_runtime::pg::PgSink;
use cdp_runtime::{pg, Shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging()?;
    let kafka = kafka("")?;
    let pg_args = PostgresArgs {
        database_url: var("CDP_DATABASE_URL")?,
        max_connections: 2,
    };
    let tuning = RunnerArgs {
        batch_size: var("CDP_BATCH_SIZE")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(200),
        batch_size_max: var("CDP_BATCH_SIZE_MAX")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(RunnerArgs::default().batch_size_max),
        batch_linger_ms: 50,
        ..RunnerArgs::default()
    };
    let delay = Duration::from_millis(
        var("PROBE_DELAY_MS")
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0),
    );
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    let pool = pg::connect(&pg_args).await?;
    let producer = Arc::new(Producer::new(&kafka)?);
    let config = RunnerConfig {
        kafka,
        group_id: var("PROBE_GROUP")?,
        topics: vec![var("PROBE_TOPIC")?],
        dead_letter_topic: var("PROBE_DLQ")?,
        tuning,
        start: StartFrom::Earliest,
        catch_up: Default::default(),
    };
    let sink = Arc::new(PgSink::new(
        pool,
        config.group_id.clone(),
        ProbeHandler { delay },
    ));
    let metrics = RunnerMetrics::register(&Metrics::new());
    runner::run(config, sink, producer, metrics, None, shutdown).await?;
    Ok(())
}
