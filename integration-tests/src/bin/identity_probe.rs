//! `cdp identity` as a process the tests can SIGKILL: the same `cdp_identity::run`, configured
//! from `CDP_*` variables (brokers, topic prefix, database, identifier key, group, schema,
//! batch size); the rules are the defaults.

use anyhow::Context;
use cdp_identity::{IdentityArgs, IdentityConfig};
use cdp_keystore::config::KeyArgs;
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{KafkaArgs, PostgresArgs, RunnerArgs, TelemetryArgs};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::{telemetry, Shutdown};

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init(&TelemetryArgs {
        log_format: cdp_runtime::config::LogFormat::Pretty,
        log_filter: std::env::var("CDP_LOG").unwrap_or_else(|_| "warn".to_owned()),
    })?;
    let config = IdentityConfig {
        kafka: KafkaArgs::local(var("CDP_KAFKA_BROKERS")?, var("CDP_TOPIC_PREFIX")?),
        pg: PostgresArgs {
            database_url: var("CDP_DATABASE_URL")?,
            max_connections: 4,
        },
        keys: KeyArgs::with_keys(var("CDP_MASTER_KEY")?, var("CDP_IDENTIFIER_KEY")?),
        runner: RunnerArgs {
            batch_size: var("CDP_BATCH_SIZE")
                .ok()
                .and_then(|b| b.parse().ok())
                .unwrap_or(500),
            batch_size_max: var("CDP_BATCH_SIZE_MAX")
                .ok()
                .and_then(|b| b.parse().ok())
                .unwrap_or(RunnerArgs::default().batch_size_max),
            batch_linger_ms: 50,
            ..RunnerArgs::default()
        },
        identity: IdentityArgs {
            group: var("CDP_IDENTITY_GROUP")?,
            schema: var("CDP_IDENTITY_SCHEMA")?,
            rules: cdp_integration_tests::identity::IdSlice::default_rules(),
            candidates: cdp_identity::candidates::CandidateArgs::default(),
            cache_nodes: cdp_identity::DEFAULT_CACHE_NODES,
        },
    };
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    cdp_identity::run(config, &Metrics::new(), &Readiness::default(), shutdown).await?;
    Ok(())
}
