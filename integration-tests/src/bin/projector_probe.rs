//! `cdp project` as a process the tests can SIGKILL: the same `cdp_projector::run`, configured
//! from `CDP_*` variables (brokers, topic prefix, database, keys, group, schema prefix,
//! batch size, extra Kafka properties).

use cdp_integration_tests::probe_env::{init_logging, kafka, var};
use cdp_keystore::config::KeyArgs;
use cdp_projector::{ProjectorArgs, ProjectorConfig};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{PostgresArgs, RunnerArgs};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::Shutdown;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging()?;
    let kafka = kafka(var("CDP_TOPIC_PREFIX")?)?;
    let config = ProjectorConfig {
        kafka,
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
        projector: ProjectorArgs {
            group: var("CDP_PROJECTOR_GROUP")?,
            schema_prefix: var("CDP_PROJECTOR_SCHEMA")?,
            lanes: cdp_integration_tests::projector::lanes_from_env(),
        },
    };
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    cdp_projector::run(config, &Metrics::new(), &Readiness::default(), shutdown).await?;
    Ok(())
}
