//! The projector: customer and capsule events (and identity merges) into Postgres read
//! models, effectively once; the profile API over them; the profiles topic for subscribers;
//! and rebuilds from the log into a fresh schema, swapped in when caught up.

pub mod api;
pub mod claims;
pub mod digest;
pub mod erase;
pub mod generation;
pub mod handler;
pub mod outbox;
pub mod rows;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cdp_keystore::config::KeyArgs;
use cdp_keystore::KeyStore;
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{KafkaArgs, PostgresArgs, RunnerArgs};
use cdp_runtime::kafka::producer::Producer;
use cdp_runtime::kafka::runner::{self, RunnerConfig, RunnerError, StartFrom};
use cdp_runtime::metrics::{Metrics, RunnerMetrics};
use cdp_runtime::outbox::Relay;
use cdp_runtime::pg::PgSink;
use cdp_runtime::replay::{self, PositionStore};
use cdp_runtime::topics::{Topic, Topics};
use cdp_runtime::{pg, Shutdown, TopicPartition};
use clap::Args;
use sqlx::PgPool;

use generation::{Generation, GenerationError};
use handler::{ProjectorHandler, TopicNames};

#[derive(Args, Clone, Debug)]
pub struct ProjectorArgs {
    /// Consumer group base name; generation N consumes as `<group>.g<N>`.
    #[arg(
        long = "projector-group",
        env = "CDP_PROJECTOR_GROUP",
        default_value = "cdp.projector"
    )]
    pub group: String,
    /// Prefix of the read-model schemas: `<prefix>_g<N>`, views in `<prefix>_read`.
    #[arg(
        long = "projector-schema",
        env = "CDP_PROJECTOR_SCHEMA",
        default_value = "projector"
    )]
    pub schema_prefix: String,
    /// Transactions a batch is applied in at once, each on its own connection, by
    /// partition number (`partition % lanes`): a projector catching up (a rebuild, a
    /// backlog) uses that many database connections and cores. Each lane stores its own
    /// partitions' positions; merges wait for every lane in flight (docs/projector.md).
    #[arg(
        long = "projector-lanes",
        env = "CDP_PROJECTOR_LANES",
        default_value_t = DEFAULT_LANES
    )]
    pub lanes: u32,
}

/// Lanes unless configured: two transactions at once take a second core where a batch's
/// statements in one transaction run one after another (docs/benchmarks.md).
pub const DEFAULT_LANES: u32 = 2;

#[derive(Args, Clone)]
pub struct ApiArgs {
    /// Address of the profile API.
    #[arg(
        long = "api-addr",
        env = "CDP_API_ADDR",
        default_value = "127.0.0.1:8089"
    )]
    pub api_addr: SocketAddr,
    /// API tokens, `principal:role:secret` comma-separated; the `read` role reads profiles.
    /// Secret.
    #[arg(
        long = "api-tokens",
        env = "CDP_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true,
        required = true
    )]
    pub api_tokens: Vec<String>,
}

impl std::fmt::Debug for ApiArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ApiArgs {{ api_addr: {}, api_tokens: <{} secret> }}",
            self.api_addr,
            self.api_tokens.len()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("database")]
    Db(#[from] sqlx::Error),
    #[error("migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Generation(#[from] GenerationError),
    #[error("key material")]
    Keys(#[from] cdp_keystore::CryptoError),
    #[error("Kafka")]
    Kafka(#[from] cdp_runtime::kafka::KafkaSetupError),
    #[error("Kafka metadata")]
    Metadata(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Replay(#[from] cdp_runtime::replay::ReplayError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Token(#[from] cdp_runtime::auth::TokenError),
    #[error("`{0}` is not earliest, an RFC 3339 time or topic:partition:offset,...")]
    From(String),
    #[error("the rebuild stopped before it caught up with the log")]
    Interrupted,
    #[error("a background task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("API server")]
    Serve(#[source] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    pub kafka: KafkaArgs,
    pub pg: PostgresArgs,
    pub keys: KeyArgs,
    pub runner: RunnerArgs,
    pub projector: ProjectorArgs,
}

fn topic_names(kafka: &KafkaArgs) -> (Topics, TopicNames) {
    let topics = Topics::new(&kafka.topic_prefix);
    let names = TopicNames {
        customer: topics.name(Topic::CustomerEvents),
        capsule: topics.name(Topic::CapsuleEvents),
        identity: topics.name(Topic::Identity),
        compliance: topics.name(Topic::Compliance),
    };
    (topics, names)
}

/// The migrations the projector needs outside its generation schemas.
pub async fn migrate(pool: &PgPool) -> Result<(), ProjectorError> {
    pg::migrator().run(pool).await?;
    cdp_keystore::store::migrator().run(pool).await?;
    generation::shared_migrator().run(pool).await?;
    Ok(())
}

struct Parts {
    admin: PgPool,
    keys: Arc<KeyStore>,
    producer: Arc<Producer>,
    topics: Topics,
    names: TopicNames,
}

async fn parts(config: &ProjectorConfig) -> Result<Parts, ProjectorError> {
    generation::check_prefix(&config.projector.schema_prefix)?;
    let admin = pg::connect(&config.pg).await?;
    migrate(&admin).await?;
    let keys = Arc::new(config.keys.key_store(admin.clone())?);
    let producer = Arc::new(Producer::new(&config.kafka)?);
    let (topics, names) = topic_names(&config.kafka);
    Ok(Parts {
        admin,
        keys,
        producer,
        topics,
        names,
    })
}

fn runner_config(config: &ProjectorConfig, p: &Parts, g: &Generation) -> RunnerConfig {
    RunnerConfig {
        kafka: config.kafka.clone(),
        group_id: g.group(&config.projector.group),
        topics: vec![
            p.names.customer.clone(),
            p.names.capsule.clone(),
            p.names.identity.clone(),
            p.names.compliance.clone(),
        ],
        dead_letter_topic: p.topics.name(Topic::DeadLetter),
        tuning: config.runner.clone(),
        start: StartFrom::Earliest,
        catch_up: Default::default(),
    }
}

/// Pass size and interval of the relay of the projector's erasure answers.
const ANSWER_ROWS: i64 = 1_000;
const ANSWER_INTERVAL: Duration = Duration::from_millis(200);

/// Runs the projector on the live generation until shutdown; when a rebuild swaps in a new
/// generation, it moves to it (its offsets are the rebuild's) and carries on.
pub async fn run(
    config: ProjectorConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: Shutdown,
) -> Result<(), ProjectorError> {
    let p = parts(&config).await?;
    let runner_metrics = RunnerMetrics::register(metrics);
    let ready = readiness.component("projector");
    while !shutdown.is_triggered() {
        let g =
            generation::ensure_live(&p.admin, &config.pg, &config.projector.schema_prefix).await?;
        tracing::info!(schema = %g.schema(), "projecting into the live generation");
        // A generation created by an older release gets the read-model migrations added
        // since (they are written to apply to a live generation; sqlx serializes replicas),
        // and read views over its tables as they now are.
        let pool = g.pool(&config.pg).await?;
        generation::upgrade(&p.admin, &pool, &g).await?;
        let stop = Shutdown::new();
        let watcher = {
            let (admin, prefix, g, stop, outer) = (
                p.admin.clone(),
                config.projector.schema_prefix.clone(),
                g.clone(),
                stop.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = outer.wait() => break,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    match generation::live(&admin, &prefix).await {
                        Ok(Some(now)) if now != g => {
                            tracing::info!(
                                generation = now.number,
                                "a new generation went live: switching"
                            );
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot read the live generation"),
                    }
                }
                stop.trigger();
            })
        };
        let consumer = runner_config(&config, &p, &g);
        let relay = tokio::spawn(outbox::relay(
            pool.clone(),
            p.producer.clone(),
            p.topics.name(Topic::Profiles),
            consumer.catch_up.clone(),
            stop.clone(),
        ));
        let sink = Arc::new(
            PgSink::new(
                pool.clone(),
                g.group(&config.projector.group),
                ProjectorHandler::new(p.names.clone(), p.keys.clone(), g.role()),
            )
            .with_lanes(config.projector.lanes),
        );
        let answers = tokio::spawn(
            Relay::new(
                pool.clone(),
                p.producer.clone(),
                config.kafka.clone(),
                erase::OUTBOX,
            )
            .run(stop.clone(), ANSWER_INTERVAL, ANSWER_ROWS),
        );
        let result = runner::run(
            consumer,
            sink,
            p.producer.clone(),
            runner_metrics.clone(),
            Some(ready.clone()),
            stop.clone(),
        )
        .await;
        stop.trigger();
        watcher.abort();
        let _ = relay.await;
        let _ = answers.await;
        pool.close().await;
        result?;
    }
    Ok(())
}

/// Where the live projector keeps its positions and which topics it consumes, for moving
/// them (`cdp replay projector --to`). `None` when no generation is live yet.
pub async fn position_store(
    config: &ProjectorConfig,
) -> Result<Option<(PositionStore, Vec<String>)>, ProjectorError> {
    generation::check_prefix(&config.projector.schema_prefix)?;
    let admin = pg::connect(&config.pg).await?;
    migrate(&admin).await?;
    let Some(live) = generation::live(&admin, &config.projector.schema_prefix).await? else {
        return Ok(None);
    };
    let (_, names) = topic_names(&config.kafka);
    Ok(Some((
        PositionStore::Postgres {
            pool: admin,
            group: live.group(&config.projector.group),
        },
        vec![
            names.customer,
            names.capsule,
            names.identity,
            names.compliance,
        ],
    )))
}

/// Where a rebuild starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    Earliest,
    Time(chrono::DateTime<chrono::Utc>),
    Offsets(Vec<(String, i32, i64)>),
}

impl FromStr for ReplayFrom {
    type Err = ProjectorError;

    /// The same syntax as a replay target, minus `latest` (nothing to rebuild) and with
    /// every offset naming its topic.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ProjectorError::From(s.to_owned());
        match s.parse::<replay::Target>().map_err(|_| bad())? {
            replay::Target::Earliest => Ok(Self::Earliest),
            replay::Target::Time(t) => Ok(Self::Time(t)),
            replay::Target::Latest => Err(bad()),
            replay::Target::Offsets(list) => list
                .into_iter()
                .map(|(topic, partition, offset)| Ok((topic.ok_or_else(bad)?, partition, offset)))
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Offsets),
        }
    }
}

/// Where each partition of a rebuild starts: where asked (`requested`), but never past the
/// position the copied read models stand at (`copied`); partitions the copy holds nothing of
/// are left out, so they start at the beginning of the log.
fn start_positions(
    copied: &HashMap<TopicPartition, i64>,
    requested: &HashMap<TopicPartition, i64>,
) -> HashMap<TopicPartition, i64> {
    copied
        .iter()
        .map(|(tp, at)| {
            let start = requested.get(tp).map_or(*at, |asked| (*asked).min(*at));
            (tp.clone(), start)
        })
        .collect()
}

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub generation: i32,
    pub digest: String,
}

/// Rebuilds the read models from the log into a new generation and swaps it in once it has
/// caught up with the log as it was when the rebuild started. `earliest` starts empty; a
/// time or offsets start from a copy of the live generation and re-apply from there.
pub async fn rebuild(
    config: ProjectorConfig,
    from: ReplayFrom,
    shutdown: Shutdown,
) -> Result<Rebuilt, ProjectorError> {
    let p = parts(&config).await?;
    let prefix = &config.projector.schema_prefix;
    let live = generation::live(&p.admin, prefix).await?;
    let g = generation::create(&p.admin, &config.pg, prefix).await?;
    let pool = g.pool(&config.pg).await?;
    let group = g.group(&config.projector.group);
    let topics = vec![
        p.names.customer.clone(),
        p.names.capsule.clone(),
        p.names.identity.clone(),
    ];
    let marks = {
        let (kafka, topics) = (config.kafka.clone(), topics.clone());
        tokio::task::spawn_blocking(move || replay::watermarks(&kafka, &topics)).await??
    };
    if from != ReplayFrom::Earliest {
        let requested: HashMap<TopicPartition, i64> = match &from {
            ReplayFrom::Time(t) => {
                let (kafka, parts, t) = (
                    config.kafka.clone(),
                    marks.keys().cloned().collect::<Vec<_>>(),
                    *t,
                );
                tokio::task::spawn_blocking(move || replay::offsets_for_time(&kafka, &parts, t))
                    .await??
                    .into_iter()
                    .collect()
            }
            ReplayFrom::Offsets(list) => list
                .iter()
                .map(|(t, part, o)| {
                    (
                        TopicPartition {
                            topic: t.clone(),
                            partition: *part,
                        },
                        *o,
                    )
                })
                .collect(),
            ReplayFrom::Earliest => HashMap::new(),
        };
        // The copy and the positions it stands at come from one snapshot: the live
        // projector commits rows and positions together, so the copy holds exactly the
        // records before those positions, however the live one moves meanwhile.
        let mut tx = p.admin.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let copied = match &live {
            Some(l) => {
                let at = pg::stored_positions(&mut *tx, &l.group(&config.projector.group)).await?;
                for t in generation::TABLES {
                    sqlx::query(&format!(
                        "INSERT INTO \"{}\".{t} SELECT * FROM \"{}\".{t}",
                        g.schema(),
                        l.schema()
                    ))
                    .execute(&mut *tx)
                    .await?;
                }
                at
            }
            None => HashMap::new(),
        };
        // A partition starts where asked, but never past where the copy stands (that would
        // skip the records in between; applying a record twice changes nothing). One the
        // copy holds nothing of starts at the beginning.
        let positions = start_positions(&copied, &requested);
        for (tp, o) in &positions {
            sqlx::query(
                "INSERT INTO cdp_consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
            )
            .bind(&group)
            .bind(&tp.topic)
            .bind(tp.partition)
            .bind(o)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        for (tp, asked) in &requested {
            match positions.get(tp) {
                Some(o) if o < asked => {
                    tracing::info!(topic = %tp.topic, partition = tp.partition, asked, from = o, "the live generation stands before the requested start: rebuilding from its position")
                }
                None => {
                    tracing::info!(topic = %tp.topic, partition = tp.partition, asked, "the live generation holds nothing of this partition: rebuilding it from the beginning")
                }
                _ => {}
            }
        }
    }
    let stop = Shutdown::new();
    let sink = Arc::new(
        PgSink::new(
            pool.clone(),
            group.clone(),
            ProjectorHandler::new(p.names.clone(), p.keys.clone(), g.role()),
        )
        .with_lanes(config.projector.lanes),
    );
    let task = tokio::spawn(runner::run(
        runner_config(&config, &p, &g),
        sink,
        p.producer.clone(),
        RunnerMetrics::register(&Metrics::new()),
        None,
        stop.clone(),
    ));
    loop {
        if shutdown.is_triggered() || task.is_finished() {
            stop.trigger();
            task.await??;
            return Err(ProjectorError::Interrupted);
        }
        let stored = pg::stored_positions(&p.admin, &group).await?;
        let caught_up = marks
            .iter()
            .all(|(tp, (low, high))| high <= low || stored.get(tp).is_some_and(|s| s >= high));
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.trigger();
    task.await??;
    let (digest, _) = digest::digest(&pool).await?;
    generation::swap(&p.admin, &g).await?;
    pool.close().await;
    tracing::info!(generation = g.number, %digest, "rebuilt generation is live");
    Ok(Rebuilt {
        generation: g.number,
        digest,
    })
}

/// The digest of the live generation.
pub async fn live_digest(
    pg_args: &PostgresArgs,
    prefix: &str,
) -> Result<Option<(String, Vec<(String, String, i64)>)>, ProjectorError> {
    let admin = pg::connect(pg_args).await?;
    generation::shared_migrator().run(&admin).await?;
    let Some(g) = generation::live(&admin, prefix).await? else {
        return Ok(None);
    };
    let pool = g.pool(pg_args).await?;
    let d = digest::digest(&pool).await?;
    pool.close().await;
    Ok(Some(d))
}

/// Binds the profile API over the `<prefix>_read` views; the future serves until shutdown.
pub async fn bind_api(
    pg_args: &PostgresArgs,
    keys: &KeyArgs,
    prefix: &str,
    api: &ApiArgs,
    shutdown: Shutdown,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = Result<(), ProjectorError>>,
    ),
    ProjectorError,
> {
    generation::check_prefix(prefix)?;
    let admin = pg::connect(pg_args).await?;
    migrate(&admin).await?;
    admin.close().await;
    let opts = sqlx::postgres::PgConnectOptions::from_str(&pg_args.database_url)?.options([
        (
            "search_path",
            format!("{},public", generation::read_schema(prefix)),
        ),
        // The API's only writes are access-audit rows: they need not wait for the WAL flush
        // (a Postgres crash may lose the last fraction of a second of them).
        ("synchronous_commit", "off".to_owned()),
    ]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(pg_args.max_connections)
        .connect_with(opts)
        .await?;
    let state = Arc::new(api::ApiState {
        vault: keys.vault(pool.clone())?,
        pool,
        tokens: cdp_runtime::auth::ApiTokens::parse(&api.api_tokens)?,
    });
    let listener = tokio::net::TcpListener::bind(api.api_addr)
        .await
        .map_err(|source| ProjectorError::Bind {
            addr: api.api_addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(ProjectorError::Serve)?;
    let serve = async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
            .map_err(ProjectorError::Serve)
    };
    Ok((addr, serve))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition {
            topic: "events".into(),
            partition: p,
        }
    }

    #[test]
    fn a_rebuild_never_starts_past_the_copy() {
        let copied = HashMap::from([(tp(0), 100), (tp(1), 50), (tp(2), 70)]);
        let requested = HashMap::from([(tp(0), 80), (tp(1), 90), (tp(3), 10)]);
        let starts = start_positions(&copied, &requested);
        assert_eq!(
            starts.get(&tp(0)),
            Some(&80),
            "earlier than the copy: as asked"
        );
        assert_eq!(
            starts.get(&tp(1)),
            Some(&50),
            "later: where the copy stands"
        );
        assert_eq!(
            starts.get(&tp(2)),
            Some(&70),
            "not asked: where the copy stands"
        );
        assert_eq!(
            starts.get(&tp(3)),
            None,
            "not in the copy: from the beginning"
        );
    }
}
