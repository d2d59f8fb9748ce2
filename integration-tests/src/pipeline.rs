//! The services' configurations for tests and benchmarks that run the pipeline in one process
//! on one ingest service's deployment (its topic prefix, database and keys).

use cdp_archiver::{ArchiverArgs, ArchiverConfig, StoreArgs};
use cdp_erasure::{ErasureArgs, ErasureConfig};
use cdp_projector::{ProjectorArgs, ProjectorConfig};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::RunnerArgs;
use cdp_runtime::metrics::Metrics;
use cdp_runtime::topics::Topic;
use cdp_runtime::Shutdown;

use crate::ingest::Ingest;

/// Batches of `batch_size`, cut after 20 ms at the latest.
pub fn runner(batch_size: usize) -> RunnerArgs {
    RunnerArgs {
        batch_size,
        batch_linger_ms: 20,
        ..RunnerArgs::default()
    }
}

/// A projector whose group is `<audit topic>.<name>` and whose schemas are `p_<name>_*`.
pub fn projector(ing: &Ingest, name: &str) -> ProjectorConfig {
    ProjectorConfig {
        kafka: ing.kafka.clone(),
        pg: ing.db.args(),
        keys: ing.key_args.clone(),
        runner: runner(500),
        projector: ProjectorArgs {
            group: format!("{}.{name}", ing.topic(Topic::Audit)),
            schema_prefix: format!("p_{name}"),
            lanes: cdp_projector::DEFAULT_LANES,
        },
    }
}

/// The erasure processor in `schema`, asking the projector and identity (whose graph is in
/// `identity_schema`).
pub fn erasure(ing: &Ingest, schema: &str, identity_schema: &str) -> ErasureConfig {
    ErasureConfig {
        kafka: ing.kafka.clone(),
        pg: ing.db.args(),
        keys: ing.key_args.clone(),
        runner: runner(100),
        erasure: ErasureArgs {
            group: format!("{}.{schema}", ing.topic(Topic::Audit)),
            schema: schema.to_owned(),
            identity_schema: identity_schema.to_owned(),
            services: vec!["projector".to_owned(), "identity".to_owned()],
            max_profiles: cdp_erasure::DEFAULT_MAX_PROFILES,
            reask_secs: cdp_erasure::DEFAULT_REASK_SECS,
        },
    }
}

/// The archiver of the catalogue's archived topics into `store`; files close a moment after
/// a topic goes quiet.
pub fn archiver(ing: &Ingest, store: StoreArgs) -> ArchiverConfig {
    ArchiverConfig {
        kafka: ing.kafka.clone(),
        runner: runner(500),
        archiver: ArchiverArgs {
            group: format!("{}.archiver", ing.topic(Topic::Audit)),
            topics: Vec::new(),
            codec: cdp_archiver::ocf::Codec::Zstandard,
            max_records: 100_000,
            max_bytes: 64 * 1024 * 1024,
            window_secs: 1,
            grace_ms: 300,
            acknowledged_gaps: Vec::new(),
            max_buffered_bytes: 1024 * 1024 * 1024,
        },
        store,
    }
}

/// A service's task and the switch that stops it.
pub type Spawned<E> = (Shutdown, tokio::task::JoinHandle<Result<(), E>>);

/// Runs a service's `run(config, metrics, readiness, shutdown)` on a task, reporting into
/// `metrics`, until the returned shutdown is triggered.
pub fn spawn<E, F, Fut>(metrics: &Metrics, run: F) -> Spawned<E>
where
    F: FnOnce(Metrics, Readiness, Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let shutdown = Shutdown::new();
    let task = tokio::spawn(run(metrics.clone(), Readiness::default(), shutdown.clone()));
    (shutdown, task)
}

/// Runs the erasure processor until the returned shutdown is triggered.
pub fn spawn_erasure(config: ErasureConfig) -> Spawned<cdp_erasure::ErasureError> {
    spawn(&Metrics::new(), |m, r, s| async move {
        cdp_erasure::run(config, &m, &r, s).await
    })
}
