//! `cdp erasure` as a process the tests can SIGKILL: the same `cdp_erasure::run`, configured
//! from `CDP_*` variables (brokers, topic prefix, database, keys, group, schemas, services,
//! extra Kafka properties).

use cdp_erasure::{ErasureArgs, ErasureConfig};
use cdp_integration_tests::probe_env::{init_logging, kafka, var};
use cdp_keystore::config::KeyArgs;
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{PostgresArgs, RunnerArgs};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::Shutdown;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging()?;
    let mut keys = KeyArgs::with_keys(var("CDP_MASTER_KEY")?, var("CDP_IDENTIFIER_KEY")?);
    keys.erasure_propagation_ms = 0;
    let kafka = kafka(var("CDP_TOPIC_PREFIX")?)?;
    let config = ErasureConfig {
        kafka,
        pg: PostgresArgs {
            database_url: var("CDP_DATABASE_URL")?,
            max_connections: 4,
        },
        keys,
        runner: RunnerArgs {
            batch_size: 50,
            batch_linger_ms: 20,
            ..RunnerArgs::default()
        },
        erasure: ErasureArgs {
            group: var("CDP_ERASURE_GROUP")?,
            schema: var("CDP_ERASURE_SCHEMA")?,
            identity_schema: var("CDP_IDENTITY_SCHEMA")?,
            services: var("CDP_ERASURE_SERVICES")?
                .split(',')
                .map(str::to_owned)
                .collect(),
            max_profiles: cdp_erasure::DEFAULT_MAX_PROFILES,
            reask_secs: var("CDP_ERASURE_REASK_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(cdp_erasure::DEFAULT_REASK_SECS),
        },
    };
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    cdp_erasure::run(config, &Metrics::new(), &Readiness::default(), shutdown).await?;
    Ok(())
}
