//! The archiver as its own process (what `cdp archive` runs, without the admin server), so
//! tests can SIGKILL it. Configured by the same `CDP_*` environment variables as
//! `cdp archive` (CDP_KAFKA_BROKERS, CDP_ARCHIVE_URL, CDP_ARCHIVE_TOPICS, ...).

use clap::Parser;

use cdp_archiver::{ArchiverArgs, ArchiverConfig, StoreArgs};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{KafkaArgs, RunnerArgs, TelemetryArgs};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::{telemetry, Shutdown};

#[derive(Parser, Debug)]
struct Probe {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    runner: RunnerArgs,
    #[command(flatten)]
    archiver: ArchiverArgs,
    #[command(flatten)]
    store: StoreArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let p = Probe::parse();
    telemetry::init(&p.telemetry)?;
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    cdp_archiver::run(
        ArchiverConfig {
            kafka: p.kafka,
            runner: p.runner,
            archiver: p.archiver,
            store: p.store,
        },
        &Metrics::new(),
        &Readiness::default(),
        shutdown,
    )
    .await?;
    Ok(())
}
