//! A platform slice for identity tests: its own topics, database and keys; customer events
//! with chosen identifiers, produced as ingest would (vault tokens, keyed by subject).

use std::sync::Arc;
use std::time::Duration;

use cdp_identity::rules::RulesArgs;
use cdp_identity::{IdentityArgs, IdentityConfig};
use cdp_keystore::config::KeyArgs;
use cdp_keystore::identifiers::{subject_id, Normalized, RawIdentifier};
use cdp_keystore::Vault;
use cdp_runtime::config::{KafkaArgs, RunnerArgs};
use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::topics::{self, Topic, Topics};
use cdp_schemas::{CustomerEvent, IdentifierKind};
use chrono::{DateTime, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{unique, wait_until, TestDb};

/// One event as a test describes it.
#[derive(Clone, Debug)]
pub struct Spec {
    pub event_id: Uuid,
    /// Seconds after a fixed origin.
    pub at: i64,
    pub ids: Vec<(IdentifierKind, String)>,
}

impl Spec {
    pub fn new(n: u128, at: i64, ids: &[(IdentifierKind, &str)]) -> Self {
        Self {
            event_id: Uuid::from_u128(0x1d00_0000_0000_0000_0000_0000_0000_0000 + n),
            at,
            ids: ids.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        }
    }
}

/// A spec as a product-view track event carrying its identifiers (plaintext, for the
/// publisher to tokenize and seal); `i` varies the product.
pub fn track_draft(
    s: &Spec,
    i: usize,
    source: &str,
) -> cdp_ingest::publisher::Draft<CustomerEvent> {
    use cdp_ingest::publisher::{envelope, Draft};
    use cdp_schemas::CustomerPayload;
    let at = origin() + chrono::Duration::seconds(s.at);
    Draft {
        event: CustomerEvent {
            envelope: envelope(s.event_id, at, at, source),
            payload: CustomerPayload::Track(crate::product_view(i as u64)),
        },
        references: Vec::new(),
        identifiers: s
            .ids
            .iter()
            .map(|(k, v)| RawIdentifier::new(*k, v.as_str()))
            .collect(),
    }
}

pub fn origin() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

pub struct IdSlice {
    pub kafka: KafkaArgs,
    pub topics: Topics,
    pub db: TestDb,
    pub key_args: KeyArgs,
    pub vault: Arc<Vault>,
    pub producer: Arc<Producer>,
}

/// A spec's identifier as a client sends it (external ids in the `crm` namespace).
fn raw(kind: IdentifierKind, value: &str) -> RawIdentifier {
    RawIdentifier {
        kind,
        namespace: (kind == IdentifierKind::ExternalId).then(|| "crm".to_owned()),
        value: value.to_owned(),
    }
}

impl IdSlice {
    /// A slice with its own topics, beside `other` when given: then in the same database,
    /// with the same keys and vault, so the same identifiers have the same tokens (and
    /// profile ids) in both.
    pub async fn create(other: Option<&IdSlice>) -> anyhow::Result<Self> {
        let prefix = format!("{}.", unique("ident"));
        let kafka = KafkaArgs::local(crate::brokers(), prefix.clone());
        let topics = Topics::new(&prefix);
        topics::ensure(&kafka, &topics::catalogue(&topics)).await?;
        let (db, key_args, vault) = match other {
            Some(o) => (o.db.share(), o.key_args.clone(), o.vault.clone()),
            None => {
                let db = TestDb::create().await?;
                cdp_keystore::store::migrator().run(&db.pool).await?;
                let key_args = crate::random_key_args();
                let vault = Arc::new(key_args.vault(db.pool.clone())?);
                (db, key_args, vault)
            }
        };
        let producer = Arc::new(Producer::new(&kafka)?);
        Ok(Self {
            kafka,
            topics,
            db,
            key_args,
            vault,
            producer,
        })
    }

    pub fn topic(&self, t: Topic) -> String {
        self.topics.name(t)
    }

    /// The default rules, as `cdp identity` parses them with no settings.
    pub fn default_rules() -> RulesArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            rules: RulesArgs,
        }
        match Cli::try_parse_from(["x"]) {
            Ok(c) => c.rules,
            Err(e) => panic!("default rules: {e}"),
        }
    }

    /// A configuration with its own schema and group.
    pub fn config(&self, name: &str, rules: RulesArgs) -> IdentityConfig {
        IdentityConfig {
            kafka: self.kafka.clone(),
            pg: self.db.args(),
            keys: self.key_args.clone(),
            runner: RunnerArgs {
                batch_size: 500,
                batch_linger_ms: 50,
                ..RunnerArgs::default()
            },
            identity: IdentityArgs {
                group: format!("{}.{name}", self.topic(Topic::Audit)),
                schema: format!("id_{name}"),
                rules,
                candidates: cdp_identity::candidates::CandidateArgs::default(),
                cache_nodes: cdp_identity::DEFAULT_CACHE_NODES,
            },
        }
    }

    /// The events specs describe: track events carrying the identifiers as tokens.
    pub async fn events(&self, specs: &[Spec]) -> anyhow::Result<Vec<CustomerEvent>> {
        let hasher = self.vault.hasher();
        let mut normalized: Vec<Normalized> = Vec::new();
        for s in specs {
            for (k, v) in &s.ids {
                normalized.push(hasher.identifier(&raw(*k, v))?);
            }
        }
        let mut tokens = self.vault.identifiers(&normalized).await?.into_iter();
        let mut out = Vec::with_capacity(specs.len());
        for s in specs {
            let ids: Vec<_> = tokens.by_ref().take(s.ids.len()).collect();
            let subject = subject_id(&ids).unwrap_or_default();
            let mut e = crate::event(0, "x");
            e.envelope.event_id = s.event_id;
            e.envelope.occurred_at = origin() + chrono::Duration::seconds(s.at);
            e.envelope.subject.subject_id = subject.clone();
            e.envelope.subject.identifiers = ids;
            e.envelope.partition_key = subject;
            out.push(e);
        }
        Ok(out)
    }

    /// The event a spec describes.
    pub async fn event(&self, s: &Spec) -> anyhow::Result<CustomerEvent> {
        self.events(std::slice::from_ref(s))
            .await?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no event"))
    }

    /// The profile id ingest's subject rule gives an event carrying these identifiers.
    pub async fn profile_of(&self, ids: &[(IdentifierKind, &str)]) -> anyhow::Result<Uuid> {
        let e = self.event(&Spec::new(0, 0, ids)).await?;
        Ok(cdp_schemas::profile_id_of(&e.envelope.subject.subject_id))
    }

    /// The token of a spec's identifier.
    pub async fn token(&self, kind: IdentifierKind, value: &str) -> anyhow::Result<String> {
        let id = self.vault.hasher().identifier(&raw(kind, value))?;
        let mut t = self.vault.tokens(&[id]).await?;
        t.pop().ok_or_else(|| anyhow::anyhow!("no token"))
    }

    /// Produces the events, each onto `partition(i)` (or by key when None).
    pub async fn produce(
        &self,
        specs: &[Spec],
        partition: impl Fn(usize) -> Option<i32>,
    ) -> anyhow::Result<()> {
        let topic = self.topic(Topic::CustomerEvents);
        for (c, chunk) in specs.chunks(2_000).enumerate() {
            let mut encoded = Vec::with_capacity(chunk.len());
            for e in self.events(chunk).await? {
                encoded.push((e.envelope.partition_key.clone(), cdp_schemas::encode(&e)?));
            }
            let recs: Vec<OutgoingRecord<'_>> = encoded
                .iter()
                .enumerate()
                .map(|(i, (k, v))| OutgoingRecord {
                    topic: &topic,
                    key: Some(k.as_bytes()),
                    value: Some(v),
                    partition: partition(c * 2_000 + i),
                    ..Default::default()
                })
                .collect();
            self.producer.send_all(&recs).await?;
        }
        Ok(())
    }

    /// The identity schema's pool of a configuration.
    pub async fn pool(&self, config: &IdentityConfig) -> anyhow::Result<PgPool> {
        Ok(cdp_identity::pool(&config.pg, &config.identity.schema).await?)
    }

    /// Waits until the service applied everything in the customer topic now and its outbox
    /// is empty.
    pub async fn caught_up(
        &self,
        config: &IdentityConfig,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        caught_up(
            &self.db.pool,
            config,
            &self.topic(Topic::CustomerEvents),
            timeout,
        )
        .await
    }

    /// Profile of each identifier (plaintext values, looked up in this slice's vault).
    pub async fn profiles(
        &self,
        pool: &PgPool,
        ids: &[(IdentifierKind, &str)],
    ) -> anyhow::Result<Vec<Option<Uuid>>> {
        let mut out = Vec::new();
        for (k, v) in ids {
            let id = raw(*k, v);
            let token = self.token(*k, v).await?;
            let row: Option<(Option<Uuid>,)> = sqlx::query_as(
                "SELECT profile_id FROM identity_nodes WHERE kind = $1 AND namespace = $2 AND token = $3",
            )
            .bind(id.kind.as_str())
            .bind(id.namespace.unwrap_or_default())
            .bind(&token)
            .fetch_optional(pool)
            .await?;
            out.push(row.and_then(|r| r.0));
        }
        Ok(out)
    }
}

/// Creates identity's schema and tables before the service runs (tests read its graph).
pub async fn create_graph(config: &IdentityConfig) -> anyhow::Result<()> {
    cdp_identity::pool(&config.pg, &config.identity.schema)
        .await?
        .close()
        .await;
    Ok(())
}

/// An identity configuration beside another service's slice (same topics, database and keys),
/// with its own schema and group, and the default rules.
pub fn identity_for(
    kafka: &KafkaArgs,
    db: &TestDb,
    keys: &KeyArgs,
    schema: &str,
) -> IdentityConfig {
    let audit = Topics::new(&kafka.topic_prefix).name(Topic::Audit);
    IdentityConfig {
        kafka: kafka.clone(),
        pg: db.args(),
        keys: keys.clone(),
        runner: RunnerArgs {
            batch_size: 100,
            batch_linger_ms: 50,
            ..RunnerArgs::default()
        },
        identity: IdentityArgs {
            group: format!("{audit}.{schema}"),
            schema: schema.to_owned(),
            rules: IdSlice::default_rules(),
            candidates: cdp_identity::candidates::CandidateArgs::default(),
            cache_nodes: cdp_identity::DEFAULT_CACHE_NODES,
        },
    }
}

/// Waits until the identity service of `config` applied everything in `customer_topic` now
/// and its outbox is empty. `pool` is the database's (where the consumer positions are).
pub async fn caught_up(
    pool: &PgPool,
    config: &IdentityConfig,
    customer_topic: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let ends = crate::topic_ends(customer_topic).await?;
    let schema_pool = cdp_identity::pool(&config.pg, &config.identity.schema).await?;
    wait_until(
        "identity caught up and its outbox relayed",
        timeout,
        || async {
            let stored = cdp_runtime::pg::stored_positions(pool, &config.identity.group).await?;
            let applied = ends.iter().all(|(p, end)| {
                *end == 0
                    || stored
                        .get(&cdp_runtime::TopicPartition {
                            topic: customer_topic.to_owned(),
                            partition: *p,
                        })
                        .is_some_and(|s| s >= end)
            });
            Ok(applied
                && cdp_runtime::outbox::pending(&schema_pool, cdp_identity::handler::OUTBOX)
                    .await?
                    == 0)
        },
    )
    .await?;
    schema_pool.close().await;
    Ok(())
}

/// Runs the identity service in-process until the returned shutdown is triggered.
pub fn spawn(config: IdentityConfig) -> crate::pipeline::Spawned<cdp_identity::IdentityError> {
    crate::pipeline::spawn(
        &cdp_runtime::metrics::Metrics::new(),
        |m, r, s| async move { cdp_identity::run(config, &m, &r, s).await },
    )
}

/// A realistic workload: `people` persons, each with an anonymous id, an email, a device, and
/// for two in three a user id; most events carry the anonymous id alone, about one in five
/// carries two or more identifiers; one person in ten shares the previous person's device,
/// some emails are junk; event times jitter so that partitions deliver some events late.
pub fn workload(n: usize, people: usize, seed: u64) -> Vec<Spec> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Zipf-like: low person numbers are much more active.
        let r = (next() % 1_000_000) as f64 / 1_000_000.0;
        let p = ((people as f64).powf(r) as usize)
            .saturating_sub(1)
            .min(people - 1);
        let anon = format!("anon-{p}");
        let at = (i as i64) - (next() % 30) as i64;
        let kind = next() % 14;
        let ids: Vec<(IdentifierKind, String)> = match kind {
            0 => vec![
                (IdentifierKind::AnonymousId, anon),
                (IdentifierKind::Email, format!("p{p}@example.org")),
            ],
            1 if p % 3 != 0 => vec![
                (IdentifierKind::UserId, format!("user-{p}")),
                (IdentifierKind::AnonymousId, anon),
                (IdentifierKind::Email, format!("p{p}@example.org")),
            ],
            2 => vec![
                (IdentifierKind::AnonymousId, anon),
                (
                    IdentifierKind::DeviceId,
                    format!("dev-{}", if p % 10 == 1 { p - 1 } else { p }),
                ),
            ],
            3 if next() % 4 == 0 => vec![
                (IdentifierKind::AnonymousId, anon),
                (IdentifierKind::Email, "test@example.com".to_owned()),
            ],
            _ => vec![(IdentifierKind::AnonymousId, anon)],
        };
        out.push(Spec {
            event_id: Uuid::from_u128(((seed as u128) << 64) | i as u128),
            at,
            ids,
        });
    }
    out
}
