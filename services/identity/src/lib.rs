//! Identity resolution and event dedup: `cdp identity`.
//!
//! Consumes the customer events, keeps an identity graph in Postgres (identifiers as vault
//! tokens, linked by the events that carry several of them, under configurable rules),
//! and publishes through a transactional outbox: graph changes (`IdentifiersLinked`,
//! `ProfilesMerged`, `ProfileSplit`) to the identity topic, which the projector follows, and
//! every customer event once, stamped with its profile id, to the resolved-events topic.
//! The graph is a pure function of the events ([`graph`]), kept incrementally ([`resolve`]).

pub mod api;
pub mod cache;
pub mod candidates;
pub mod erase;
pub mod graph;
pub mod handler;
pub mod metrics;
pub mod resolve;
pub mod rules;
pub mod store;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cdp_keystore::config::KeyArgs;
use cdp_keystore::identifiers::RawIdentifier;
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{KafkaArgs, PostgresArgs, RunnerArgs};
use cdp_runtime::kafka::producer::Producer;
use cdp_runtime::kafka::runner::{self, RunnerConfig, RunnerError, StartFrom};
use cdp_runtime::metrics::{Metrics, RunnerMetrics};
use cdp_runtime::outbox::{self, Relay};
use cdp_runtime::pg::{self, PgSink};
use cdp_runtime::replay::PositionStore;
use cdp_runtime::topics::{Topic, Topics};
use cdp_runtime::Shutdown;
use cdp_schemas::IdentifierKind;
use clap::Args;
use sqlx::PgPool;
use uuid::Uuid;

use graph::{Key, Kind};
use handler::{IdentityHandler, OutTopics, OUTBOX};
use metrics::IdentityMetrics;
use rules::{RulesArgs, RulesError};

/// Default of `CDP_IDENTITY_CACHE_NODES`.
pub const DEFAULT_CACHE_NODES: usize = 1_000_000;

#[derive(Args, Clone, Debug)]
pub struct IdentityArgs {
    /// Consumer group of the identity service.
    #[arg(
        id = "identity_group",
        long = "identity-group",
        env = "CDP_IDENTITY_GROUP",
        default_value = "cdp.identity"
    )]
    pub group: String,
    /// Postgres schema holding the identity graph.
    #[arg(
        id = "identity_schema",
        long = "identity-schema",
        env = "CDP_IDENTITY_SCHEMA",
        default_value = "identity"
    )]
    pub schema: String,
    /// Identifiers of the graph this process keeps in memory, whole components, so a batch
    /// reads from Postgres only those it has not seen (a few hundred bytes each). It is checked
    /// against a token every write to the graph changes: with two instances writing in turn
    /// it is mostly empty. 0 turns it off.
    #[arg(
        long = "identity-cache-nodes",
        env = "CDP_IDENTITY_CACHE_NODES",
        default_value_t = DEFAULT_CACHE_NODES
    )]
    pub cache_nodes: usize,
    #[command(flatten)]
    pub rules: RulesArgs,
    #[command(flatten)]
    pub candidates: candidates::CandidateArgs,
}

#[derive(Args, Clone, Debug)]
pub struct IdentityApiArgs {
    /// Address of the identity API (`GET /v1/identity/{profile_id}` and
    /// `GET /v1/identity/candidates`, `operator` role of CDP_API_TOKENS); `off` to not serve
    /// it.
    #[arg(
        long = "identity-api-addr",
        env = "CDP_IDENTITY_API_ADDR",
        default_value = "127.0.0.1:8091"
    )]
    pub identity_api_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("database")]
    Db(#[from] sqlx::Error),
    #[error("migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("key material")]
    Keys(#[from] cdp_keystore::CryptoError),
    #[error("Kafka")]
    Kafka(#[from] cdp_runtime::kafka::KafkaSetupError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error(transparent)]
    Candidates(#[from] candidates::CandidateError),
    #[error("`{0}` is not a valid schema name (lower-case letters, digits, underscores)")]
    Schema(String),
    #[error(transparent)]
    Token(#[from] cdp_runtime::auth::TokenError),
    #[error("no link {0} in the graph")]
    NoLink(Uuid),
    #[error("the identifier is not in the graph")]
    NoIdentifier,
    #[error("identifier: {0}")]
    Identifier(#[from] cdp_keystore::identifiers::NormalizeError),
    #[error("identifier vault")]
    Vault(#[from] cdp_keystore::VaultError),
    #[error("{0}")]
    Sink(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("identity API")]
    Serve(#[source] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub kafka: KafkaArgs,
    pub pg: PostgresArgs,
    pub keys: KeyArgs,
    pub runner: RunnerArgs,
    pub identity: IdentityArgs,
}

pub(crate) fn check_schema(s: &str) -> Result<(), IdentityError> {
    if pg::valid_schema_name(s) {
        Ok(())
    } else {
        Err(IdentityError::Schema(s.to_owned()))
    }
}

/// The identity schema's migrations.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}

/// A pool whose connections work in the identity schema (shared tables in `public`).
pub async fn pool(pg_args: &PostgresArgs, schema: &str) -> Result<PgPool, IdentityError> {
    check_schema(schema)?;
    let admin = pg::connect(pg_args).await?;
    pg::migrator().run(&admin).await?;
    cdp_keystore::store::migrator().run(&admin).await?;
    pg::create_schema(&admin, schema).await?;
    admin.close().await;
    let pool = pg::connect_in(pg_args, schema).await?;
    migrator().run(&pool).await?;
    Ok(pool)
}

fn out_topics(kafka: &KafkaArgs) -> (Topics, OutTopics) {
    let topics = Topics::new(&kafka.topic_prefix);
    let out = OutTopics {
        identity: topics.name(Topic::Identity),
        resolved: topics.name(Topic::ResolvedEvents),
        compliance: topics.name(Topic::Compliance),
    };
    (topics, out)
}

/// The handler with its rules; blocked values are replaced by their vault tokens (created if
/// new, so a blocked value first sent later gets the token the rules hold).
async fn handler(
    config: &IdentityConfig,
    metrics: IdentityMetrics,
    pool: &PgPool,
) -> Result<IdentityHandler, IdentityError> {
    let vault = config.keys.vault(pool.clone())?;
    let mut rules = rules::rules(&config.identity.rules)?;
    let blocked = rules::blocked(&config.identity.rules, vault.hasher())?;
    for id in vault.identifiers(&blocked).await? {
        rules.blocked.insert(Key::new(
            Kind::Id(id.kind),
            id.namespace.as_deref(),
            &id.token,
        ));
    }
    let kinds = rules::kinds(&config.identity.rules)?;
    let (_, out) = out_topics(&config.kafka);
    Ok(IdentityHandler {
        rules: Arc::new(rules),
        kinds,
        out,
        metrics,
        cache: cache::GraphCache::new(config.identity.cache_nodes),
    })
}

/// Relay pass size and interval.
const RELAY_ROWS: i64 = 20_000;
const RELAY_INTERVAL: Duration = Duration::from_millis(200);

/// Runs identity resolution until shutdown.
pub async fn run(
    config: IdentityConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: Shutdown,
) -> Result<(), IdentityError> {
    config.identity.candidates.check()?;
    let pool = pool(&config.pg, &config.identity.schema).await?;
    let identity_metrics = IdentityMetrics::register(metrics);
    let handler = handler(&config, identity_metrics.clone(), &pool).await?;
    let producer = Arc::new(Producer::new(&config.kafka)?);
    let (topics, _) = out_topics(&config.kafka);
    let sweeps = tokio::spawn(candidates::run_sweeps(
        pool.clone(),
        config.identity.candidates.clone(),
        producer.clone(),
        topics.name(Topic::CustomerEvents),
        identity_metrics,
        shutdown.clone(),
    ));
    let relay = tokio::spawn(
        Relay::new(pool.clone(), producer.clone(), config.kafka.clone(), OUTBOX).run(
            shutdown.clone(),
            RELAY_INTERVAL,
            RELAY_ROWS,
        ),
    );
    let sink = Arc::new(PgSink::new(
        pool.clone(),
        config.identity.group.clone(),
        handler,
    ));
    let result = runner::run(
        RunnerConfig {
            kafka: config.kafka.clone(),
            group_id: config.identity.group.clone(),
            topics: vec![
                topics.name(Topic::CustomerEvents),
                topics.name(Topic::Compliance),
            ],
            dead_letter_topic: topics.name(Topic::DeadLetter),
            tuning: config.runner.clone(),
            start: StartFrom::Earliest,
            catch_up: Default::default(),
        },
        sink,
        producer,
        RunnerMetrics::register(metrics),
        Some(readiness.component("identity")),
        shutdown.clone(),
    )
    .await;
    shutdown.trigger();
    let _ = relay.await;
    let _ = sweeps.await;
    pool.close().await;
    Ok(result?)
}

/// One duplicate-candidate sweep now (`cdp identity candidates`), with the service's settings.
pub async fn sweep_candidates(
    config: &IdentityConfig,
) -> Result<candidates::SweepReport, IdentityError> {
    let pool = pool(&config.pg, &config.identity.schema).await?;
    let producer = Producer::new(&config.kafka)?;
    let (topics, _) = out_topics(&config.kafka);
    let report = candidates::sweep(
        &pool,
        &config.identity.candidates,
        &producer,
        &topics.name(Topic::CustomerEvents),
        &IdentityMetrics::default(),
    )
    .await;
    pool.close().await;
    Ok(report?)
}

/// Where the identity service keeps its positions, for `cdp replay identity`.
pub async fn position_store(
    config: &IdentityConfig,
) -> Result<(PositionStore, Vec<String>), IdentityError> {
    let admin = pg::connect(&config.pg).await?;
    pg::migrator().run(&admin).await?;
    let topics = Topics::new(&config.kafka.topic_prefix);
    Ok((
        PositionStore::Postgres {
            pool: admin,
            group: config.identity.group.clone(),
        },
        vec![
            topics.name(Topic::CustomerEvents),
            topics.name(Topic::Compliance),
        ],
    ))
}

/// What an operator split removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitTarget {
    /// One accepted link (its id, from the identity API or the identity topic).
    Link(Uuid),
    /// An identifier as clients send it (`email:test@example.com`); normalized and looked up
    /// in the vault.
    Identifier(IdentifierKind, Option<String>, String),
    /// An identifier by its token (`email:token:<hex>`), as the identity API shows it.
    Token(IdentifierKind, Option<String>, String),
}

impl FromStr for SplitTarget {
    type Err = String;

    /// `link:<uuid>`, `<kind>:<value>`, `<kind>:token:<hex>`; external ids put their namespace
    /// after the kind (`external_id:salesforce:42`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (head, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: expected link:<id>, kind:value or kind:token:<hex>"))?;
        if head == "link" {
            return Uuid::parse_str(rest.trim())
                .map(SplitTarget::Link)
                .map_err(|e| format!("`{rest}`: {e}"));
        }
        let Some(Kind::Id(kind)) = Kind::parse(head) else {
            return Err(format!("`{head}` is not an identifier kind"));
        };
        let (ns, rest) = if kind == IdentifierKind::ExternalId {
            let (ns, r) = rest.split_once(':').ok_or_else(|| {
                "external ids need a namespace: external_id:<ns>:<value>".to_owned()
            })?;
            (Some(ns.to_owned()), r)
        } else {
            (None, rest)
        };
        Ok(match rest.strip_prefix("token:") {
            Some(t) => SplitTarget::Token(kind, ns, t.trim().to_ascii_lowercase()),
            None => SplitTarget::Identifier(kind, ns, rest.to_owned()),
        })
    }
}

/// What a split did.
#[derive(Debug, Clone)]
pub struct SplitReport {
    pub rederived_nodes: usize,
    pub rederived_events: usize,
    pub profiles_after: usize,
    pub splits: usize,
}

/// Severs a link or an identifier and re-derives the profiles it joined from the remaining
/// links, in one transaction; the `ProfileSplit` events go out through the outbox (the running
/// service's relay publishes them, or the next one that starts).
pub async fn split(
    config: &IdentityConfig,
    target: SplitTarget,
    note: &str,
) -> Result<SplitReport, IdentityError> {
    let pool = pool(&config.pg, &config.identity.schema).await?;
    let handler = handler(config, IdentityMetrics::default(), &pool).await?;
    let mut tx = pool.begin().await?;
    store::lock_graph(&mut tx).await?;
    let (node, other, link_id, cause): (i64, i64, Option<Uuid>, Uuid) = match &target {
        SplitTarget::Link(id) => {
            let row: Option<(i64, i64, Uuid)> = sqlx::query_as(
                "SELECT from_node, to_node, cause_event_id FROM identity_links WHERE link_id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let (a, b, cause) = row.ok_or(IdentityError::NoLink(*id))?;
            (a.min(b), a.max(b), Some(*id), cause)
        }
        SplitTarget::Identifier(..) | SplitTarget::Token(..) => {
            let (kind, ns, token) = match target.clone() {
                SplitTarget::Identifier(kind, ns, value) => {
                    let vault = config.keys.vault(pool.clone())?;
                    let id = vault.hasher().identifier(&RawIdentifier {
                        kind,
                        namespace: ns,
                        value,
                    })?;
                    let token = vault
                        .find(std::slice::from_ref(&id))
                        .await?
                        .pop()
                        .flatten()
                        .ok_or(IdentityError::NoIdentifier)?;
                    (id.kind, id.namespace, token)
                }
                SplitTarget::Token(kind, ns, token) => (kind, ns, token),
                SplitTarget::Link(_) => return Err(IdentityError::NoIdentifier),
            };
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT node_id FROM identity_nodes WHERE kind = $1 AND namespace = $2 AND token = $3",
            )
            .bind(kind.as_str())
            .bind(ns.unwrap_or_default())
            .bind(&token)
            .fetch_optional(&mut *tx)
            .await?;
            let (n,) = row.ok_or(IdentityError::NoIdentifier)?;
            (n, 0, None, Uuid::nil())
        }
    };
    sqlx::query(
        "INSERT INTO identity_severed (node, other_node, link_id, note) VALUES ($1, $2, $3, $4)
         ON CONFLICT (node, other_node) DO UPDATE SET note = EXCLUDED.note",
    )
    .bind(node)
    .bind(other)
    .bind(link_id)
    .bind(note)
    .execute(&mut *tx)
    .await?;
    let keys: Vec<(String, String, String)> =
        sqlx::query_as("SELECT kind, namespace, token FROM identity_nodes WHERE node_id = ANY($1)")
            .bind([node, other].as_slice())
            .fetch_all(&mut *tx)
            .await?;
    let force: Vec<Key> = keys
        .into_iter()
        .filter_map(|(k, ns, h)| {
            Kind::parse(&k).map(|kind| Key {
                kind,
                namespace: ns,
                token: h,
            })
        })
        .collect();
    let mut g = store::PgGraph::new(&mut tx);
    let severed = g.severed().await?;
    let mut outcome =
        resolve::resolve(&mut g, &handler.rules, &severed, Vec::new(), &force).await?;
    for c in &mut outcome.changes {
        match c {
            resolve::ProfileChange::Split { cause: x, .. }
            | resolve::ProfileChange::Merged { cause: x, .. } => *x = cause,
        }
    }
    let stats = g.commit(&[], &outcome).await?;
    let new_links: HashSet<Uuid> = stats.new_links.iter().copied().collect();
    let now = chrono::Utc::now();
    let records = handler::identity_records(
        &handler.out.identity,
        &outcome,
        &new_links,
        &|_| now,
        "severed",
        &handler.metrics,
    )
    .map_err(|e| {
        IdentityError::Sink(cdp_runtime::sink::Rejection::from_error("split", &e).reason)
    })?;
    outbox::push(g.conn(), OUTBOX, &records).await?;
    let profiles_after = outcome
        .graph
        .assignments()
        .iter()
        .filter_map(|a| a.profile)
        .collect::<BTreeSet<_>>()
        .len();
    let splits = outcome
        .changes
        .iter()
        .filter(|c| matches!(c, resolve::ProfileChange::Split { .. }))
        .count();
    tx.commit().await?;
    pool.close().await;
    tracing::info!(
        rederived_nodes = stats.rederived_nodes,
        splits,
        "split committed"
    );
    Ok(SplitReport {
        rederived_nodes: stats.rederived_nodes,
        rederived_events: stats.rederived_events,
        profiles_after,
        splits,
    })
}

/// Binds the identity API; the future serves until shutdown. `None` when it is `off`.
pub async fn bind_api(
    pg_args: &PostgresArgs,
    schema: &str,
    api: &IdentityApiArgs,
    api_tokens: &[String],
    shutdown: Shutdown,
) -> Result<
    Option<(
        SocketAddr,
        impl std::future::Future<Output = Result<(), IdentityError>>,
    )>,
    IdentityError,
> {
    if api.identity_api_addr.trim() == "off" {
        return Ok(None);
    }
    let pool = pool(pg_args, schema).await?;
    let state = Arc::new(api::ApiState {
        pool,
        tokens: cdp_runtime::auth::ApiTokens::parse(api_tokens)?,
    });
    let listener = tokio::net::TcpListener::bind(api.identity_api_addr.trim())
        .await
        .map_err(|source| IdentityError::Bind {
            addr: api.identity_api_addr.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(IdentityError::Serve)?;
    let serve = async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
            .map_err(IdentityError::Serve)
    };
    Ok(Some((addr, serve)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_targets_parse() {
        let id = Uuid::from_u128(7);
        assert_eq!(format!("link:{id}").parse(), Ok(SplitTarget::Link(id)));
        assert_eq!(
            "email:Test@Example.com".parse(),
            Ok(SplitTarget::Identifier(
                IdentifierKind::Email,
                None,
                "Test@Example.com".to_owned()
            ))
        );
        assert_eq!(
            "external_id:crm:token:ABC".parse(),
            Ok(SplitTarget::Token(
                IdentifierKind::ExternalId,
                Some("crm".to_owned()),
                "abc".to_owned()
            ))
        );
        assert!("nonsense".parse::<SplitTarget>().is_err());
        assert!("mail:x".parse::<SplitTarget>().is_err());
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(check_schema("identity_t1").is_ok());
        assert!(check_schema("Identity").is_err());
        assert!(check_schema("x; DROP").is_err());
    }
}
