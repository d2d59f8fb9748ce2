//! The erasure processor: `cdp erase` files a request, `cdp erasure` executes it.
//!
//! A request names a person by identifiers (looked up in the vault, read-only) and profile
//! ids; it is stored with who asked and why (never on a topic) and published as
//! `ErasureRequested` on the compliance topic. The processor (its own consumer group on
//! that topic) resolves the person's whole cluster from the identity graph, shreds it in the
//! key store in one transaction (suppression entries, erasure ledger, data keys destroyed,
//! vault rows deleted) and publishes `ErasureScoped`; every consumer service deletes its
//! rows, tombstones its keys and answers `ErasureApplied`; once every awaited service has
//! answered, the processor publishes `ErasureCompleted` with the counts per store. Each
//! step is one transaction with the consumer offsets: a crash resumes, a repeat is a no-op.

pub mod api;
pub mod cluster;
pub mod handler;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cdp_keystore::config::KeyArgs;
use cdp_keystore::identifiers::{Digest, RawIdentifier};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::{KafkaArgs, PostgresArgs, RunnerArgs};
use cdp_runtime::kafka::producer::Producer;
use cdp_runtime::kafka::runner::{self, RunnerConfig, RunnerError, StartFrom};
use cdp_runtime::metrics::{Metrics, RunnerMetrics};
use cdp_runtime::outbox::{self, Relay};
use cdp_runtime::pg::{self, PgSink};
use cdp_runtime::topics::{Topic, Topics};
use cdp_runtime::Shutdown;
use cdp_schemas::model::compliance::ErasureRequested;
use cdp_schemas::{ComplianceEvent, CompliancePayload};
use chrono::{DateTime, Utc};
use clap::Args;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use handler::{ErasureHandler, OUTBOX};

/// Default of `CDP_ERASURE_MAX_PROFILES`.
pub const DEFAULT_MAX_PROFILES: usize = 25;

#[derive(Args, Clone, Debug)]
pub struct ErasureArgs {
    /// Consumer group of the erasure processor.
    #[arg(
        id = "erasure_group",
        long = "erasure-group",
        env = "CDP_ERASURE_GROUP",
        default_value = "cdp.erasure"
    )]
    pub group: String,
    /// Postgres schema of the erasure requests.
    #[arg(
        id = "erasure_schema",
        long = "erasure-schema",
        env = "CDP_ERASURE_SCHEMA",
        default_value = "erasure"
    )]
    pub schema: String,
    /// Postgres schema of the identity graph, which the processor reads to resolve a
    /// person's cluster (the identity service's `CDP_IDENTITY_SCHEMA`).
    #[arg(
        id = "erasure_identity_schema",
        long = "erasure-identity-schema",
        env = "CDP_IDENTITY_SCHEMA",
        default_value = "identity"
    )]
    pub identity_schema: String,
    /// The services whose `ErasureApplied` completes a request, comma-separated: every
    /// service that keeps personal rows.
    #[arg(
        long = "erasure-services",
        env = "CDP_ERASURE_SERVICES",
        value_delimiter = ',',
        default_value = "projector,identity"
    )]
    pub services: Vec<String>,
    /// Largest cluster, in profiles (merged-away ones included), erased without `--force`:
    /// a mega-merge must not erase many people at once.
    #[arg(
        long = "erasure-max-profiles",
        env = "CDP_ERASURE_MAX_PROFILES",
        default_value_t = DEFAULT_MAX_PROFILES
    )]
    pub max_profiles: usize,
    /// A scoped request still waiting for a service's answer this many seconds after the
    /// services were asked is asked again (`ErasureScoped` republished).
    #[arg(
        long = "erasure-reask-secs",
        env = "CDP_ERASURE_REASK_SECS",
        default_value_t = DEFAULT_REASK_SECS
    )]
    pub reask_secs: u64,
}

pub const DEFAULT_REASK_SECS: u64 = 60;

#[derive(Args, Clone, Debug)]
pub struct ErasureApiArgs {
    /// Address of the erasures API (`POST /v1/erasures`, `GET /v1/erasures/{id}`,
    /// `compliance` role of CDP_API_TOKENS); `off` to not serve it.
    #[arg(
        long = "erasure-api-addr",
        env = "CDP_ERASURE_API_ADDR",
        default_value = "127.0.0.1:8092"
    )]
    pub erasure_api_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
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
    #[error("identifier: {0}")]
    Identifier(#[from] cdp_keystore::identifiers::NormalizeError),
    #[error("identifier vault")]
    Vault(#[from] cdp_keystore::VaultError),
    #[error("event contract")]
    Codec(#[from] cdp_schemas::CodecError),
    #[error("outbox relay")]
    Relay(#[from] cdp_runtime::outbox::RelayError),
    #[error("`{0}` is not a valid schema name (lower-case letters, digits, underscores)")]
    Schema(String),
    #[error("a request must name at least one identifier or profile")]
    Empty,
    #[error("{0} contains an identifier of the person: it is kept with the request after the erasure, so name the channel or ticket instead")]
    PersonalText(&'static str),
    #[error("reading a topic")]
    Scan(#[from] cdp_runtime::replay::ReplayError),
    #[error("key store")]
    KeyStore(#[from] cdp_keystore::KeyStoreError),
    #[error("a blocking task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("no erasure request {0}")]
    NoRequest(Uuid),
    #[error("erasure request {0} is {1}, not completed: nothing to verify yet")]
    NotCompleted(Uuid, String),
    #[error(transparent)]
    Token(#[from] cdp_runtime::auth::TokenError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("erasures API")]
    Serve(#[source] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ErasureConfig {
    pub kafka: KafkaArgs,
    pub pg: PostgresArgs,
    pub keys: KeyArgs,
    pub runner: RunnerArgs,
    pub erasure: ErasureArgs,
}

fn check_schema(s: &str) -> Result<(), ErasureError> {
    if pg::valid_schema_name(s) {
        Ok(())
    } else {
        Err(ErasureError::Schema(s.to_owned()))
    }
}

/// The erasure schema's migrations.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}

/// A pool whose connections work in the erasure schema (the key store in `public`).
pub async fn pool(pg_args: &PostgresArgs, args: &ErasureArgs) -> Result<PgPool, ErasureError> {
    check_schema(&args.schema)?;
    check_schema(&args.identity_schema)?;
    let admin = pg::connect(pg_args).await?;
    pg::migrator().run(&admin).await?;
    cdp_keystore::store::migrator().run(&admin).await?;
    pg::create_schema(&admin, &args.schema).await?;
    admin.close().await;
    let pool = pg::connect_in(pg_args, &args.schema).await?;
    migrator().run(&pool).await?;
    Ok(pool)
}

/// Relay pass size and interval.
const RELAY_ROWS: i64 = 1_000;
const RELAY_INTERVAL: Duration = Duration::from_millis(100);

/// Runs the processor until shutdown.
pub async fn run(
    config: ErasureConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: Shutdown,
) -> Result<(), ErasureError> {
    let pool = pool(&config.pg, &config.erasure).await?;
    let topics = Topics::new(&config.kafka.topic_prefix);
    let producer = Arc::new(Producer::new(&config.kafka)?);
    let handler = ErasureHandler {
        compliance_topic: topics.name(Topic::Compliance),
        audit_topic: topics.name(Topic::Audit),
        keys: Arc::new(config.keys.key_store(pool.clone())?),
        identity_schema: config.erasure.identity_schema.clone(),
        suppression: config.keys.suppression_key()?,
        services: config.erasure.services.clone(),
        max_profiles: config.erasure.max_profiles,
    };
    let relay = tokio::spawn(
        Relay::new(pool.clone(), producer.clone(), config.kafka.clone(), OUTBOX).run(
            shutdown.clone(),
            RELAY_INTERVAL,
            RELAY_ROWS,
        ),
    );
    let sink = Arc::new(PgSink::new(
        pool.clone(),
        config.erasure.group.clone(),
        handler,
    ));
    let reask = {
        let (pool, topic, stop) = (
            pool.clone(),
            topics.name(Topic::Compliance),
            shutdown.clone(),
        );
        let after = Duration::from_secs(config.erasure.reask_secs.max(1));
        tokio::spawn(async move {
            let every = (after / 4).max(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.wait() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(e) = handler::ask_again(&pool, &topic, after).await {
                    tracing::warn!(error = %e, "asking the services again failed; retrying");
                }
            }
        })
    };
    let result = runner::run(
        RunnerConfig {
            kafka: config.kafka.clone(),
            group_id: config.erasure.group.clone(),
            topics: vec![topics.name(Topic::Compliance)],
            dead_letter_topic: topics.name(Topic::DeadLetter),
            tuning: config.runner.clone(),
            start: StartFrom::Earliest,
            catch_up: Default::default(),
        },
        sink,
        producer,
        RunnerMetrics::register(metrics),
        Some(readiness.component("erasure")),
        shutdown.clone(),
    )
    .await;
    shutdown.trigger();
    let _ = relay.await;
    let _ = reask.await;
    pool.close().await;
    Ok(result?)
}

/// Binds the erasures API; the future serves until shutdown. `None` when it is `off`.
pub async fn bind_api(
    config: &ErasureConfig,
    api: &ErasureApiArgs,
    api_tokens: &[String],
    shutdown: Shutdown,
) -> Result<
    Option<(
        std::net::SocketAddr,
        impl std::future::Future<Output = Result<(), ErasureError>>,
    )>,
    ErasureError,
> {
    let addr = api.erasure_api_addr.trim();
    if addr == "off" {
        return Ok(None);
    }
    let state = Arc::new(api::ApiState {
        tokens: cdp_runtime::auth::ApiTokens::parse(api_tokens)?,
        requests: Requests::open(config).await?,
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ErasureError::Bind {
            addr: addr.to_owned(),
            source,
        })?;
    let local = listener.local_addr().map_err(ErasureError::Serve)?;
    let serve = async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
            .map_err(ErasureError::Serve)
    };
    Ok(Some((local, serve)))
}

/// What a request names and why.
#[derive(Debug, Clone)]
pub struct Request {
    pub identifiers: Vec<RawIdentifier>,
    pub profiles: Vec<Uuid>,
    pub requested_by: String,
    pub reason: Option<String>,
    /// Off: erase without suppressing (the person may come back, unlinked).
    pub suppress: bool,
    /// Erase a cluster larger than `CDP_ERASURE_MAX_PROFILES`.
    pub force: bool,
}

/// The field of a request (`requested_by`, `reason`) that contains one of the person's
/// identifier values, ignoring case. Both are kept after the erasure (the request's row,
/// the sealed audit record); one naming the person would link the request, and through it
/// the erased tokens, back to them.
fn names_the_person<'a>(
    request: &Request,
    values: impl Iterator<Item = &'a str>,
) -> Option<&'static str> {
    let by = request.requested_by.to_lowercase();
    let reason = request.reason.as_deref().unwrap_or_default().to_lowercase();
    for v in values {
        let v = v.trim().to_lowercase();
        if v.len() < 4 {
            continue;
        }
        if by.contains(&v) {
            return Some("requested_by");
        }
        if reason.contains(&v) {
            return Some("reason");
        }
    }
    None
}

/// How verify judges a platform topic's records.
fn topic_kind(t: Topic) -> verify::Kind {
    match t {
        Topic::Identity | Topic::Profiles => verify::Kind::Compacted,
        Topic::Compliance => verify::Kind::Compliance,
        Topic::Audit => verify::Kind::Nowhere,
        Topic::CustomerEvents
        | Topic::CapsuleEvents
        | Topic::ResolvedEvents
        | Topic::DeadLetter => verify::Kind::Events,
    }
}

/// How long the law gives (GDPR art. 12(3): one month).
const DUE_DAYS: i64 = 30;

/// Filing and reading requests (`cdp erase`, `cdp erasure status`, the erasures API).
pub struct Requests {
    pool: PgPool,
    vault: cdp_keystore::Vault,
    /// Publishes a filed request at once (a running processor's relay would otherwise).
    relay: tokio::sync::Mutex<Relay>,
    compliance_topic: String,
    kafka: KafkaArgs,
    /// Tries the sealed values verify finds.
    keys: cdp_keystore::KeyStore,
}

/// How long a topic read by verify may stall before it fails.
const SCAN_IDLE: Duration = Duration::from_secs(30);

impl Requests {
    pub async fn open(config: &ErasureConfig) -> Result<Self, ErasureError> {
        let pool = pool(&config.pg, &config.erasure).await?;
        let vault = config.keys.vault(pool.clone())?;
        let producer = Arc::new(Producer::new(&config.kafka)?);
        let relay = Relay::new(pool.clone(), producer, config.kafka.clone(), OUTBOX);
        let keys = config.keys.key_store(pool.clone())?;
        Ok(Self {
            pool,
            vault,
            relay: tokio::sync::Mutex::new(relay),
            compliance_topic: Topics::new(&config.kafka.topic_prefix).name(Topic::Compliance),
            kafka: config.kafka.clone(),
            keys,
        })
    }

    /// Files a request: its row (with who asked and why, and the named identifiers' vault
    /// digests until it is scoped) and its `ErasureRequested` in the outbox, in one
    /// transaction; then relays it. Returns the request id.
    pub async fn file(&self, request: &Request) -> Result<Uuid, ErasureError> {
        if request.identifiers.is_empty() && request.profiles.is_empty() {
            return Err(ErasureError::Empty);
        }
        let hasher = self.vault.hasher();
        let normalized = request
            .identifiers
            .iter()
            .map(|raw| hasher.identifier(raw))
            .collect::<Result<Vec<_>, _>>()?;
        let values = request
            .identifiers
            .iter()
            .map(|r| r.value.as_str())
            .chain(normalized.iter().map(|n| n.value.as_str()));
        if let Some(field) = names_the_person(request, values) {
            return Err(ErasureError::PersonalText(field));
        }
        let digests: Vec<Vec<u8>> = normalized
            .iter()
            .map(|n| hasher.digest(n).to_vec())
            .collect();
        let identifiers: Vec<_> = normalized
            .iter()
            .zip(self.vault.find(&normalized).await?)
            .filter_map(|(n, token)| token.map(|t| n.with_token(t)))
            .collect();
        let request_id = Uuid::now_v7();
        let now = Utc::now();
        let due_at = now + chrono::Duration::days(DUE_DAYS);
        let event = ComplianceEvent::of_request(
            request_id,
            "cdp-erase",
            identifiers,
            CompliancePayload::ErasureRequested(ErasureRequested {
                request_id,
                profile_ids: request.profiles.clone(),
                suppress: request.suppress,
                force: request.force,
                due_at,
            }),
        );
        let record = outbox::Record::keyed(
            &self.compliance_topic,
            &event.envelope.partition_key,
            cdp_schemas::encode(&event)?,
        );
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO erasure_requests
                 (request_id, state, requested_by, reason, named, suppress, force, requested_at, due_at)
             VALUES ($1, 'requested', $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(request_id)
        .bind(&request.requested_by)
        .bind(&request.reason)
        .bind(&digests)
        .bind(request.suppress)
        .bind(request.force)
        .bind(now)
        .bind(due_at)
        .execute(&mut *tx)
        .await?;
        handler::hold_outbox(&mut tx).await?;
        outbox::push(&mut tx, OUTBOX, std::slice::from_ref(&record)).await?;
        tx.commit().await?;
        self.relay.lock().await.relay_once(RELAY_ROWS).await?;
        tracing::info!(%request_id, "erasure request filed");
        Ok(request_id)
    }

    /// Requests, newest first (one when `id` is given; an error when it is unknown).
    pub async fn status(&self, id: Option<Uuid>, limit: i64) -> Result<Vec<Status>, ErasureError> {
        let mut conn = self.pool.acquire().await?;
        let out = read_status(&mut conn, id, limit).await?;
        if let (Some(id), true) = (id, out.is_empty()) {
            return Err(ErasureError::NoRequest(id));
        }
        Ok(out)
    }

    /// Waits until a request reaches a final state (completed or refused); `None` when it
    /// has not within `timeout`.
    pub async fn wait_final(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> Result<Option<Status>, ErasureError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.status(Some(id), 1).await?.pop();
            if let Some(s) = s.filter(Status::is_final) {
                return Ok(Some(s));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What a completed request erased: its tokens and profile ids.
    pub async fn scope(&self, id: Uuid) -> Result<(Vec<String>, Vec<Uuid>), ErasureError> {
        let scope: Option<(String, Vec<String>, Vec<Uuid>)> = sqlx::query_as(
            "SELECT state, scope_tokens, scope_profiles FROM erasure_requests WHERE request_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((state, tokens, profiles)) = scope else {
            return Err(ErasureError::NoRequest(id));
        };
        if state != "completed" {
            return Err(ErasureError::NotCompleted(id, state));
        }
        Ok((tokens, profiles))
    }

    /// Searches Postgres and the platform's topics, plus `extra_topics` (restored copies,
    /// say) as event topics, for what a completed request erased (see [`verify`]). The
    /// archive is searched by the caller that can read it, through [`Self::search_store`].
    pub async fn verify(
        &self,
        id: Uuid,
        extra_topics: &[String],
    ) -> Result<verify::Report, ErasureError> {
        let (tokens, profiles) = self.scope(id).await?;
        let mut conn = self.pool.acquire().await?;
        let mut report = verify::search_postgres(&mut conn, id, &tokens, &profiles).await?;
        drop(conn);
        if tokens.is_empty() && profiles.is_empty() {
            return Ok(report);
        }
        let needles = Arc::new(verify::Needles::new(&tokens, &profiles));
        let names = Topics::new(&self.kafka.topic_prefix);
        let mut topics: Vec<(String, verify::Kind)> = Topic::ALL
            .iter()
            .map(|t| (names.name(*t), topic_kind(*t)))
            .collect();
        topics.extend(
            extra_topics
                .iter()
                .map(|t| (t.clone(), verify::Kind::Events)),
        );
        for (topic, kind) in topics {
            let mut search =
                verify::StoreSearch::new(needles.clone(), format!("topic {topic}"), kind);
            let kafka = self.kafka.clone();
            let search = tokio::task::spawn_blocking(move || {
                cdp_runtime::replay::scan(&kafka, &[topic], SCAN_IDLE, |r| {
                    search.record(
                        r.key.as_deref(),
                        r.value.as_deref(),
                        r.headers.iter().filter_map(|(_, v)| v),
                    )
                })
                .map(|_| search)
            })
            .await??;
            report.stores.push(search.finish(&self.keys).await?);
        }
        Ok(report)
    }

    /// A search of another store (an archived topic) for a completed request's scope: feed
    /// it the store's records, finish it with [`Self::keys`], add it to the report.
    pub async fn search_store(
        &self,
        id: Uuid,
        store: String,
    ) -> Result<verify::StoreSearch, ErasureError> {
        let (tokens, profiles) = self.scope(id).await?;
        Ok(verify::StoreSearch::new(
            Arc::new(verify::Needles::new(&tokens, &profiles)),
            store,
            verify::Kind::Events,
        ))
    }

    /// The key store verify tries sealed values against.
    pub fn keys(&self) -> &cdp_keystore::KeyStore {
        &self.keys
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// A request as `cdp erasure status` shows it.
#[derive(Debug, Clone)]
pub struct Status {
    pub request_id: Uuid,
    pub state: String,
    pub outcome: Option<String>,
    pub requested_by: String,
    pub reason: Option<String>,
    pub suppress: bool,
    pub force: bool,
    pub requested_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub profiles: Option<i32>,
    pub tokens: Option<i32>,
    pub refused_links: Option<i64>,
    pub keys_destroyed: Option<i64>,
    pub vault_rows: Option<i64>,
    pub suppressed: Option<i64>,
    pub awaiting: Vec<String>,
    /// Each service's answer, by service name.
    pub answers: Vec<Answer>,
}

/// One service's answer to a scoped request.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Answer {
    pub service: String,
    pub rows_deleted: i64,
    pub tombstones: i64,
    /// Rows deleted per table.
    #[sqlx(json)]
    pub stores: BTreeMap<String, i64>,
}

impl Status {
    /// Completed or refused: nothing more will happen to it.
    pub fn is_final(&self) -> bool {
        self.state == "completed" || self.state == "refused"
    }

    /// Rows deleted and tombstones published, all services together.
    pub fn totals(&self) -> (i64, i64) {
        self.answers
            .iter()
            .fold((0, 0), |(r, t), a| (r + a.rows_deleted, t + a.tombstones))
    }

    /// Rows deleted per store, `service.table`.
    pub fn stores(&self) -> BTreeMap<String, i64> {
        self.answers
            .iter()
            .flat_map(|a| {
                a.stores
                    .iter()
                    .map(move |(table, n)| (format!("{}.{table}", a.service), *n))
            })
            .collect()
    }
}

#[derive(sqlx::FromRow)]
struct StatusRow {
    request_id: Uuid,
    state: String,
    outcome: Option<String>,
    requested_by: String,
    reason: Option<String>,
    suppress: bool,
    force: bool,
    requested_at: DateTime<Utc>,
    due_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    profiles: Option<i32>,
    tokens: Option<i32>,
    refused_links: Option<i64>,
    keys_destroyed: Option<i64>,
    vault_rows: Option<i64>,
    suppressed: Option<i64>,
    awaiting: Vec<String>,
}

/// Requests, newest first (only `id` when given), with their answers.
pub(crate) async fn read_status(
    conn: &mut PgConnection,
    id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Status>, sqlx::Error> {
    let rows: Vec<StatusRow> = sqlx::query_as(
        "SELECT request_id, state, outcome, requested_by, reason, suppress, force, requested_at,
                due_at, completed_at, profiles, tokens, refused_links, keys_destroyed,
                vault_rows, suppressed, awaiting
           FROM erasure_requests WHERE $1::uuid IS NULL OR request_id = $1
          ORDER BY requested_at DESC LIMIT $2",
    )
    .bind(id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let answers = sqlx::query_as(
            "SELECT service, rows_deleted, tombstones, stores FROM erasure_acks
              WHERE request_id = $1 ORDER BY service",
        )
        .bind(r.request_id)
        .fetch_all(&mut *conn)
        .await?;
        out.push(Status {
            request_id: r.request_id,
            state: r.state,
            outcome: r.outcome,
            requested_by: r.requested_by,
            reason: r.reason,
            suppress: r.suppress,
            force: r.force,
            requested_at: r.requested_at,
            due_at: r.due_at,
            completed_at: r.completed_at,
            profiles: r.profiles,
            tokens: r.tokens,
            refused_links: r.refused_links,
            keys_destroyed: r.keys_destroyed,
            vault_rows: r.vault_rows,
            suppressed: r.suppressed,
            awaiting: r.awaiting,
            answers,
        });
    }
    Ok(out)
}

/// Removes the suppression entries of identifiers (a person who signs up again starts as a
/// new, unlinked person). Returns how many entries were removed.
pub async fn unsuppress(
    config: &ErasureConfig,
    identifiers: &[RawIdentifier],
) -> Result<u64, ErasureError> {
    let pool = pool(&config.pg, &config.erasure).await?;
    let hasher = config.keys.hasher()?;
    let digests = identifiers
        .iter()
        .map(|raw| Ok(hasher.digest(&hasher.identifier(raw)?)))
        .collect::<Result<Vec<Digest>, ErasureError>>()?;
    let mut tx = pool.begin().await?;
    let removed =
        cdp_keystore::erasure::unsuppress(&mut tx, &config.keys.suppression_key()?, &digests)
            .await?;
    tx.commit().await?;
    pool.close().await;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(service: &str, rows: i64, tombstones: i64, tables: &[(&str, i64)]) -> Answer {
        Answer {
            service: service.to_owned(),
            rows_deleted: rows,
            tombstones,
            stores: tables.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect(),
        }
    }

    #[test]
    fn totals_and_stores_add_every_answer() {
        let now = Utc::now();
        let status = Status {
            request_id: Uuid::nil(),
            state: "completed".to_owned(),
            outcome: Some("ERASED".to_owned()),
            requested_by: "dpo".to_owned(),
            reason: None,
            suppress: true,
            force: false,
            requested_at: now,
            due_at: now,
            completed_at: Some(now),
            profiles: Some(2),
            tokens: Some(4),
            refused_links: Some(0),
            keys_destroyed: Some(2),
            vault_rows: Some(4),
            suppressed: Some(4),
            awaiting: vec!["identity".to_owned(), "projector".to_owned()],
            answers: vec![
                answer(
                    "identity",
                    12,
                    5,
                    &[("identity_links", 3), ("identity_nodes", 4)],
                ),
                answer("projector", 11, 2, &[("customers", 1)]),
            ],
        };
        assert!(status.is_final());
        assert_eq!(status.totals(), (23, 7));
        assert_eq!(
            status.stores().into_iter().collect::<Vec<_>>(),
            [
                ("identity.identity_links".to_owned(), 3),
                ("identity.identity_nodes".to_owned(), 4),
                ("projector.customers".to_owned(), 1),
            ]
        );
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(check_schema("erasure_t2").is_ok());
        for bad in ["", "Erasure", "1erasure", "era-sure", "era\"sure"] {
            assert!(check_schema(bad).is_err(), "{bad}");
        }
    }
}
