//! `cdp identity` as a process the tests can SIGKILL: the same `cdp_identity::run`, configured
//! from `CDP_*` variables (brokers, topic prefix, database, identifier key, group, schema,
//! batch size, extra Kafka properties); the rules are the defaults.

use cdp_identity::{IdentityArgs, IdentityConfig};
use cdp_integration_tests::probe_env::{init_logging, kafka, var};
use cdp_keystore::config::KeyArgs;
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{PostgresArgs, RunnerArgs};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::Shutdown;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging()?;
    let kafka = kafka(var("CDP_TOPIC_PREFIX")?)?;
    let config = IdentityConfig {
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
