//! A platform slice for projector tests: its own topics, database and keys; realistic sealed
//! events produced with the ingest library; projectors run in-process or as a process.

use std::sync::Arc;
use std::time::Duration;

use cdp_ingest::publisher::{envelope, plain, Draft, Prepared, Publisher};
use cdp_keystore::config::KeyArgs;
use cdp_keystore::{KeyStore, RawIdentifier, Vault};
use cdp_projector::{ProjectorArgs, ProjectorConfig};
use cdp_runtime::config::{KafkaArgs, RunnerArgs};
use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::topics::{self, Topic, Topics};
use cdp_schemas::model::capsule::*;
use cdp_schemas::model::customer::*;
use cdp_schemas::{
    Amount, CapsuleEvent, CapsulePayload, CustomerEvent, CustomerPayload, IdentifierKind,
};
use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::{unique, wait_until_every, TestDb};

pub struct Slice {
    pub kafka: KafkaArgs,
    pub topics: Topics,
    pub db: TestDb,
    pub key_args: KeyArgs,
    pub keys: Arc<KeyStore>,
    pub vault: Arc<Vault>,
    pub producer: Arc<Producer>,
    pub publisher: Publisher,
}

/// Event `n` of a deterministic, realistic mix over `subjects` subjects.
pub fn draft(n: u64, subjects: u64) -> (Option<Draft<CustomerEvent>>, Option<Draft<CapsuleEvent>>) {
    let s = n % subjects;
    let user = format!("user-{s}");
    let at = |k: u64| -> DateTime<Utc> {
        Utc.timestamp_opt(1_767_225_600 + (k as i64) * 7, 0)
            .single()
            .unwrap_or_default()
    };
    let id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("event-{n}").as_bytes());
    let mut ids = vec![RawIdentifier::new(IdentifierKind::UserId, user.clone())];
    match n % 10 {
        // Identify links the email (and some phones); tracks link an anonymous id.
        0 | 1 => {
            ids.push(RawIdentifier::new(
                IdentifierKind::Email,
                format!("{user}-{}@example.org", n % 3),
            ));
            if s % 5 == 0 {
                ids.push(RawIdentifier::new(
                    IdentifierKind::Phone,
                    format!("+44207123{s:04}"),
                ));
            }
        }
        2..=5 => ids.push(RawIdentifier::new(
            IdentifierKind::AnonymousId,
            format!("anon-{s}"),
        )),
        _ => {}
    }
    let env = envelope(id, at(n), at(n), "test");
    let customer = |payload| {
        Some(Draft {
            event: CustomerEvent {
                envelope: env.clone(),
                payload,
            },
            references: Vec::new(),
            identifiers: ids.clone(),
        })
    };
    match n % 10 {
        0 | 1 => (
            customer(CustomerPayload::Identify(Identify {
                email: plain(format!("{user}-{}@example.org", n % 3)),
                first_name: plain(format!("Name{}", n % 7)),
                city: plain("London"),
                country: Some(if n % 2 == 0 { "GB" } else { "FR" }.to_owned()),
                ..Identify::default()
            })),
            None,
        ),
        2..=5 => (
            customer(CustomerPayload::Track(crate::product_view(n))),
            None,
        ),
        6 => (
            customer(CustomerPayload::Transaction(Transaction {
                order_id: plain(format!("o-{n}")),
                status: TransactionStatus::Completed,
                amount: format!("{}.50", n % 100)
                    .parse()
                    .unwrap_or_else(|_| Amount::zero()),
                currency: "EUR".to_owned(),
                line_items: None,
                payment_method: Some("card".to_owned()),
                coupon: None,
            })),
            None,
        ),
        7 => (
            customer(CustomerPayload::ConsentChanged(ConsentChanged {
                purpose: format!("purpose-{}", n % 3),
                status: if n % 4 == 0 {
                    ConsentStatus::Granted
                } else {
                    ConsentStatus::Denied
                },
                basis: LegalBasis::Consent,
                policy_version: None,
            })),
            None,
        ),
        8 => {
            let capsule_id = Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("capsule-{}", s % 20).as_bytes(),
            );
            (
                None,
                Some(Draft {
                    event: CapsuleEvent {
                        envelope: env,
                        payload: CapsulePayload::Created(CapsuleCreated {
                            capsule_id,
                            owner_subject_id: String::new(),
                            title: plain(format!("Capsule {}", s % 20)),
                            content_type: "text/markdown".to_owned(),
                            storage_path: None,
                            settings_json: None,
                        }),
                    },
                    references: Vec::new(),
                    identifiers: ids,
                }),
            )
        }
        _ => {
            let capsule_id = Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("capsule-{}", n % 20).as_bytes(),
            );
            (
                None,
                Some(Draft {
                    event: CapsuleEvent {
                        envelope: env,
                        payload: CapsulePayload::Viewed(CapsuleViewed {
                            capsule_id,
                            channel: Some("mobile".to_owned()),
                            duration_ms: Some(1000),
                        }),
                    },
                    references: Vec::new(),
                    identifiers: ids,
                }),
            )
        }
    }
}

impl Slice {
    pub async fn create() -> anyhow::Result<Self> {
        let prefix = format!("{}.", unique("proj"));
        let kafka = KafkaArgs::local(crate::brokers(), prefix.clone());
        let topics = Topics::new(&prefix);
        topics::ensure(&kafka, &topics::catalogue(&topics)).await?;
        let db = TestDb::create().await?;
        cdp_projector::migrate(&db.pool).await?;
        let key_args = crate::random_key_args();
        let keys = Arc::new(key_args.key_store(db.pool.clone())?);
        let vault = Arc::new(key_args.vault(db.pool.clone())?);
        let producer = Arc::new(Producer::new(&kafka)?);
        let publisher = Publisher::new(
            producer.clone(),
            keys.clone(),
            vault.clone(),
            topics.clone(),
        );
        Ok(Self {
            kafka,
            topics,
            db,
            key_args,
            keys,
            vault,
            producer,
            publisher,
        })
    }

    /// The vault token of a plaintext identifier.
    pub async fn token(&self, kind: IdentifierKind, value: &str) -> anyhow::Result<String> {
        crate::token(&self.vault, kind, value).await
    }

    /// The profile id of a user id as a subject (before any merge).
    pub async fn profile_of_user(&self, user_id: &str) -> anyhow::Result<Uuid> {
        Ok(cdp_schemas::profile_id_of(
            &self.token(IdentifierKind::UserId, user_id).await?,
        ))
    }

    /// Seals and encodes events `range` of the mix.
    pub async fn prepare(
        &self,
        range: std::ops::Range<u64>,
        subjects: u64,
    ) -> anyhow::Result<Vec<Prepared>> {
        let mut customers = Vec::new();
        let mut capsules = Vec::new();
        for n in range {
            let (c, k) = draft(n, subjects);
            customers.extend(c);
            capsules.extend(k);
        }
        let mut out = Vec::new();
        for chunk in customers.chunks(2_000) {
            out.extend(self.publisher.prepare(chunk.to_vec()).await?);
        }
        for chunk in capsules.chunks(2_000) {
            out.extend(self.publisher.prepare(chunk.to_vec()).await?);
        }
        Ok(out)
    }

    /// Produces prepared records, optionally onto explicit partitions.
    pub async fn produce(
        &self,
        prepared: &[Prepared],
        partition: impl Fn(usize) -> Option<i32>,
    ) -> anyhow::Result<()> {
        for (c, chunk) in prepared.chunks(2_000).enumerate() {
            let recs: Vec<OutgoingRecord<'_>> = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| OutgoingRecord {
                    topic: &p.topic,
                    key: Some(p.key.as_bytes()),
                    value: Some(&p.value),
                    partition: partition(c * 2_000 + i),
                    ..Default::default()
                })
                .collect();
            self.producer.send_all(&recs).await?;
        }
        Ok(())
    }

    pub fn topic(&self, t: Topic) -> String {
        self.topics.name(t)
    }

    /// Publishes what the identity service publishes when it links two identifiers in a
    /// profile (`IdentifiersLinked`, keyed by the link), as of the event at `at`.
    pub async fn publish_link(
        &self,
        profile: Uuid,
        from: cdp_schemas::Identifier,
        to: cdp_schemas::Identifier,
        at: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        use cdp_schemas::model::identity::IdentifiersLinked;
        use cdp_schemas::{IdentityEvent, IdentityPayload};
        let link_id = Uuid::new_v4();
        let mut envelope = envelope(Uuid::new_v4(), at, at, "identity");
        envelope.subject.subject_id = link_id.to_string();
        envelope.partition_key = link_id.to_string();
        let event = IdentityEvent {
            envelope,
            payload: IdentityPayload::IdentifiersLinked(IdentifiersLinked {
                link_id,
                profile_id: profile,
                from,
                to,
                cause_event_id: Uuid::new_v4(),
            }),
        };
        let value = cdp_schemas::encode(&event)?;
        let topic = self.topic(Topic::Identity);
        self.producer
            .send(OutgoingRecord {
                topic: &topic,
                key: Some(link_id.to_string().as_bytes()),
                value: Some(&value),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// A projector configuration with its own schemas and group.
    pub fn config(&self, name: &str) -> ProjectorConfig {
        ProjectorConfig {
            kafka: self.kafka.clone(),
            pg: self.db.args(),
            keys: self.key_args.clone(),
            runner: RunnerArgs {
                batch_size: 500,
                batch_linger_ms: 50,
                ..RunnerArgs::default()
            },
            projector: ProjectorArgs {
                group: format!("{}.{name}", self.topics.name(Topic::Audit)),
                schema_prefix: format!("p_{name}"),
                lanes: cdp_projector::DEFAULT_LANES,
            },
        }
    }

    /// Waits until the live generation of `config` has applied everything in the topics now.
    pub async fn caught_up(
        &self,
        config: &ProjectorConfig,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.caught_up_every(config, timeout, Duration::from_millis(100))
            .await
    }

    /// [`Slice::caught_up`], looking every `every`.
    /// Waits until identity (`identity`, beside this slice) has resolved everything in the
    /// customer topic and emptied its outbox, then until the projector has applied
    /// everything, identity's links included.
    pub async fn caught_up_with_identity(
        &self,
        identity: &cdp_identity::IdentityConfig,
        config: &ProjectorConfig,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        crate::identity::caught_up(
            &self.db.pool,
            identity,
            &self.topic(Topic::CustomerEvents),
            timeout,
        )
        .await?;
        self.caught_up(config, timeout).await
    }

    pub async fn caught_up_every(
        &self,
        config: &ProjectorConfig,
        timeout: Duration,
        every: Duration,
    ) -> anyhow::Result<()> {
        caught_up(&self.db.pool, config, timeout, every).await
    }

    pub async fn digest(&self, config: &ProjectorConfig) -> anyhow::Result<String> {
        Ok(
            cdp_projector::live_digest(&config.pg, &config.projector.schema_prefix)
                .await?
                .map(|(d, _)| d)
                .unwrap_or_default(),
        )
    }
}

/// The projector's lanes from `CDP_PROJECTOR_LANES` (for the probe and benchmarks that build
/// their configuration by hand), its default otherwise.
pub fn lanes_from_env() -> u32 {
    std::env::var("CDP_PROJECTOR_LANES")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(cdp_projector::DEFAULT_LANES)
}

/// Waits until the live generation of `config` has applied everything in its input topics
/// now (the compliance topic included), looking every `every`. `pool` is the database's.
pub async fn caught_up(
    pool: &sqlx::PgPool,
    config: &ProjectorConfig,
    timeout: Duration,
    every: Duration,
) -> anyhow::Result<()> {
    let names = Topics::new(&config.kafka.topic_prefix);
    let mut marks = Vec::new();
    for t in [
        Topic::CustomerEvents,
        Topic::CapsuleEvents,
        Topic::Identity,
        Topic::Compliance,
    ] {
        let t = names.name(t);
        let ends = crate::topic_ends(&t).await?;
        marks.push((t, ends));
    }
    wait_until_every("the projector caught up", timeout, every, || async {
        let Some(g) =
            cdp_projector::generation::live(pool, &config.projector.schema_prefix).await?
        else {
            return Ok(false);
        };
        let stored =
            cdp_runtime::pg::stored_positions(pool, &g.group(&config.projector.group)).await?;
        Ok(marks.iter().all(|(t, ends)| {
            ends.iter().all(|(p, end)| {
                *end == 0
                    || stored
                        .get(&cdp_runtime::TopicPartition {
                            topic: t.clone(),
                            partition: *p,
                        })
                        .is_some_and(|s| s >= end)
            })
        }))
    })
    .await
}

/// Runs a projector in-process until the returned handle's shutdown is triggered.
pub fn spawn(config: ProjectorConfig) -> crate::pipeline::Spawned<cdp_projector::ProjectorError> {
    crate::pipeline::spawn(
        &cdp_runtime::metrics::Metrics::new(),
        |m, r, s| async move { cdp_projector::run(config, &m, &r, s).await },
    )
}
