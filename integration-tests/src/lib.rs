//! Helpers for the end-to-end tests. Every test gets unique topic names, consumer groups
//! and a fresh database, so tests run in parallel and in any order. A test whose service
//! is not running fails with a message that says how to start it.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cdp_keystore::config::KeyArgs;
use cdp_keystore::{RawIdentifier, Vault};
use cdp_runtime::config::{KafkaArgs, PostgresArgs};
use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::pg::{Decoded, PgHandler, Rejected};
use cdp_runtime::sink::{Rejection, SinkError};
use cdp_runtime::RawRecord;
use cdp_schemas::{CodecError, CustomerEvent, CustomerPayload, IdentifierKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use sqlx::{PgConnection, PgPool};

pub mod archive;
pub mod cpu;
pub mod identity;
pub mod ingest;
pub mod pipeline;
pub mod probe_env;
pub mod projector;

/// Where the test services are. Defaults match `scripts/stack`.
pub fn brokers() -> String {
    std::env::var("CDP_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// The Python of the stack's venv (`scripts/stack up` installs Segment's analytics-python,
/// fastavro and zstandard there), or `CDP_TEST_PYTHON`.
pub fn stack_python() -> anyhow::Result<std::path::PathBuf> {
    let p = std::env::var_os("CDP_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.stack/venv/bin/python")
        });
    anyhow::ensure!(
        p.exists(),
        "{} is missing: `scripts/stack up` creates the venv (or set CDP_TEST_PYTHON)",
        p.display()
    );
    Ok(p)
}

pub fn admin_database_url() -> String {
    std::env::var("CDP_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The sum of a metric family's samples in a registry's exposition (counters end in `_total`).
pub fn metric_sum(metrics: &cdp_runtime::metrics::Metrics, family: &str) -> anyhow::Result<f64> {
    Ok(metrics
        .encode()?
        .lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Logs to stderr with the filter in `CDP_LOG` when it is set (benchmarks' debug lines).
pub fn log_from_env() -> anyhow::Result<()> {
    if let Ok(filter) = std::env::var("CDP_LOG") {
        cdp_runtime::telemetry::init(&cdp_runtime::config::TelemetryArgs {
            log_format: cdp_runtime::config::LogFormat::Pretty,
            log_filter: filter,
        })?;
    }
    Ok(())
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Fresh random key material (master and identifier keys), other settings at their defaults.
pub fn random_key_args() -> KeyArgs {
    let hex = || -> String {
        (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect()
    };
    KeyArgs::with_keys(hex(), hex())
}

/// The vault token of a plaintext identifier (created when the vault has none yet, as ingest
/// and the publisher would).
pub async fn token(vault: &Vault, kind: IdentifierKind, value: &str) -> anyhow::Result<String> {
    let id = vault
        .hasher()
        .identifier(&RawIdentifier::new(kind, value))?;
    vault
        .tokens(&[id])
        .await?
        .pop()
        .context("the vault answered no token")
}

/// Shreds a person's tokens with suppression (the key store's part of an erasure, as the
/// erasure processor runs it), in one transaction.
pub async fn shred(
    pool: &PgPool,
    keys: &KeyArgs,
    tokens: &[String],
) -> anyhow::Result<cdp_keystore::erasure::Shredded> {
    let profiles: Vec<uuid::Uuid> = tokens
        .iter()
        .map(|t| cdp_schemas::profile_id_of(t))
        .collect();
    let mut tx = pool.begin().await?;
    let done = cdp_keystore::erasure::shred(
        &mut tx,
        &keys.suppression_key()?,
        &cdp_keystore::erasure::Shred {
            tokens,
            named: &[],
            suppress: true,
            profiles: &profiles,
        },
    )
    .await?;
    tx.commit().await?;
    Ok(done)
}

pub fn kafka_args(prefix: &str) -> KafkaArgs {
    KafkaArgs::local(brokers(), prefix)
}

/// Fails with instructions when no broker answers.
pub async fn require_broker() -> anyhow::Result<()> {
    let brokers = brokers();
    let b = brokers.clone();
    let result = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b).create()?;
        consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|_| ())
    })
    .await?;
    result.with_context(|| {
        format!("no Kafka broker answers at {brokers}: start the local stack with `scripts/stack up` (or set CDP_TEST_KAFKA_BROKERS)")
    })
}

/// Creates topics (name, partitions) with delete cleanup.
pub async fn create_topics(topics: &[(&str, i32)]) -> anyhow::Result<()> {
    require_broker().await?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        // Every record is kept: some tests write records timestamped long ago (fixed dates
        // for deterministic archive names), and the broker's time retention (7 days by
        // default, by record timestamp) would otherwise delete them whenever its periodic
        // sweep happens to run mid-test, which the archive tests saw as records that never
        // came (a partition's log starting past what was archived).
        .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1)).set("retention.ms", "-1"))
        .collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await? {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    Ok(())
}

/// A database created for one test, with the runtime's migrations applied.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create() -> anyhow::Result<Self> {
        let admin_url = admin_database_url();
        let admin = PgPool::connect(&admin_url).await.with_context(|| {
            format!("no Postgres at {admin_url}: start it with `scripts/stack up` (or set CDP_TEST_DATABASE_URL)")
        })?;
        let name = format!("cdp_t_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await?;
        admin.close().await;
        let url = match admin_url.rfind('/') {
            Some(i) => format!("{}/{name}", &admin_url[..i]),
            None => bail!("CDP_TEST_DATABASE_URL has no database path: {admin_url}"),
        };
        let pool = PgPool::connect(&url).await?;
        cdp_runtime::pg::migrator().run(&pool).await?;
        Ok(Self { name, url, pool })
    }

    /// Another handle on the same database (for slices that share it and its vault).
    pub fn share(&self) -> Self {
        Self {
            name: self.name.clone(),
            url: self.url.clone(),
            pool: self.pool.clone(),
        }
    }

    pub fn args(&self) -> PostgresArgs {
        PostgresArgs {
            database_url: self.url.clone(),
            max_connections: 4,
        }
    }

    /// Drops the database (call at the end of a passing test; failed tests keep theirs for
    /// inspection, and `scripts/stack down` removes leftovers).
    pub async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let admin = PgPool::connect(&admin_database_url()).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await?;
        Ok(())
    }
}

/// Polls `check` every 100 ms until it returns true, failing after `timeout` with `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    wait_until_every(what, timeout, Duration::from_millis(100), check).await
}

/// [`wait_until`], polling every `every` (benchmarks time what they wait for: a coarse poll
/// would add up to its interval to the measurement).
pub async fn wait_until_every<F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    loop {
        // A check that never returns (a query behind a lock, a stuck client) fails the wait
        // too, saying so, instead of hanging the test until the runner kills it.
        let left = timeout.saturating_sub(started.elapsed()) + Duration::from_secs(5);
        match tokio::time::timeout(left, check()).await {
            Ok(done) => {
                if done? {
                    return Ok(());
                }
            }
            Err(_) => bail!("waiting for {what}: a check did not return within {left:?}"),
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// A web product view (one of 50 products, chosen by `n`), as the workloads track it.
pub fn product_view(n: u64) -> cdp_schemas::model::customer::Track {
    cdp_schemas::model::customer::Track {
        interaction_type: "Product Viewed".to_owned(),
        channel: Some("web".to_owned()),
        touchpoint: Some(format!("p-{}", n % 50)),
        duration_ms: Some((n % 1000) as i64),
        outcome: None,
        properties: cdp_ingest::publisher::plain(format!(r#"{{"product_id":"p-{}"}}"#, n % 50)),
    }
}

/// A valid customer event whose partition key is `key`.
pub fn event(n: u64, key: &str) -> CustomerEvent {
    let mut e = cdp_schemas::fixtures::customer_events()
        .into_iter()
        .nth(1)
        .unwrap_or_else(|| panic!("fixtures have a track event"));
    e.envelope.event_id = uuid::Uuid::now_v7();
    e.envelope.partition_key = key.to_owned();
    e.envelope.subject.subject_id = key.to_owned();
    if let CustomerPayload::Track(t) = &mut e.payload {
        t.interaction_type = format!("probe {n}");
    }
    e
}

/// Produces `n` events with keys `k0..k{n-1}`, spread over `partitions` partitions by key
/// (explicitly, so the spread is even). Returns the keys.
pub async fn produce_events(
    producer: &Producer,
    topic: &str,
    n: u64,
    partitions: i32,
) -> anyhow::Result<Vec<String>> {
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    for chunk in keys.chunks(2_000) {
        let values: Vec<Vec<u8>> = chunk
            .iter()
            .map(|k| {
                let i: u64 = k[1..].parse().unwrap_or(0);
                cdp_schemas::encode(&event(i, k))
            })
            .collect::<Result<_, CodecError>>()?;
        let recs: Vec<OutgoingRecord<'_>> = chunk
            .iter()
            .zip(&values)
            .map(|(k, v)| {
                let i: u64 = k[1..].parse().unwrap_or(0);
                OutgoingRecord {
                    topic,
                    key: Some(k.as_bytes()),
                    value: Some(v),
                    partition: Some((i % partitions as u64) as i32),
                    ..Default::default()
                }
            })
            .collect();
        producer.send_all(&recs).await?;
    }
    Ok(keys)
}

/// The probe handler: writes one row per applied record into `probe_applied`, which has
/// no unique constraint, so a double apply shows up as a duplicate row. Events whose
/// source is `reject-me` are valid Avro but invalid for the domain: the handler rejects them.
pub struct ProbeHandler {
    /// Sleeps inside the transaction, to make a batch take time (shutdown tests).
    pub delay: Duration,
}

pub async fn create_probe_table(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS probe_applied (
            key TEXT NOT NULL, topic TEXT NOT NULL, partition INT NOT NULL,
            kafka_offset BIGINT NOT NULL, event_id UUID NOT NULL)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

impl PgHandler for ProbeHandler {
    type Event = CustomerEvent;

    fn decode(&self, record: &RawRecord) -> Result<CustomerEvent, Rejection> {
        let value = record.value.as_deref().unwrap_or_default();
        cdp_schemas::decode::<CustomerEvent>(value).map_err(|e| Rejection::from_error(e.kind(), &e))
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        batch: &[Decoded<'_, CustomerEvent>],
    ) -> Result<Vec<Rejected>, SinkError> {
        if !self.delay.is_zero() {
            sqlx::query("SELECT pg_sleep($1)")
                .bind(self.delay.as_secs_f64())
                .execute(&mut *tx)
                .await
                .map_err(cdp_runtime::pg::classify)?;
        }
        let mut rejected = Vec::new();
        let (mut keys, mut topics, mut parts, mut offsets, mut ids) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (i, d) in batch.iter().enumerate() {
            if d.event.envelope.source == "reject-me" {
                rejected.push(Rejected {
                    index: i,
                    rejection: Rejection::new(
                        "invalid",
                        "source `reject-me` is refused by the probe",
                    ),
                });
                continue;
            }
            keys.push(
                String::from_utf8_lossy(d.record.key.as_deref().unwrap_or_default()).into_owned(),
            );
            topics.push(d.record.topic.to_string());
            parts.push(d.record.partition);
            offsets.push(d.record.offset);
            ids.push(d.event.envelope.event_id);
        }
        sqlx::query(
            "INSERT INTO probe_applied (key, topic, partition, kafka_offset, event_id)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::uuid[])",
        )
        .bind(&keys)
        .bind(&topics)
        .bind(&parts)
        .bind(&offsets)
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(cdp_runtime::pg::classify)?;
        Ok(rejected)
    }
}

/// (rows, distinct keys) in `probe_applied`.
pub async fn probe_counts(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT key) FROM probe_applied")
            .fetch_one(pool)
            .await?;
    Ok((rows, distinct))
}

/// A consumed record.
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: std::collections::HashMap<String, String>,
}

/// Reads at least `n` records of a topic from the start (fresh group), failing after `timeout`.
pub async fn consume(topic: &str, n: usize, timeout: Duration) -> anyhow::Result<Vec<Consumed>> {
    consume_from(&brokers(), topic, n, timeout).await
}

/// [`consume`] from a given broker.
pub async fn consume_from(
    brokers: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Consumed>> {
    use rdkafka::message::{Headers, Message};
    let topic = topic.to_owned();
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        consumer.subscribe(&[&topic])?;
        let mut out = Vec::new();
        let started = Instant::now();
        while out.len() < n {
            if started.elapsed() > timeout {
                bail!(
                    "only {} of {n} records in {topic} after {timeout:?}",
                    out.len()
                );
            }
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m?;
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
        }
        Ok(out)
    })
    .await?
}

/// Counts the records of a topic (sum of high watermarks).
pub async fn topic_len(topic: &str) -> anyhow::Result<i64> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()?;
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut total = 0;
        for t in md.topics() {
            for p in t.partitions() {
                let (lo, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                total += hi - lo;
            }
        }
        Ok(total)
    })
    .await?
}

/// A broker of the test's own (nisshi, sqlite storage in a temporary directory), for tests
/// that stop and restart it without disturbing the shared one.
pub struct OwnBroker {
    pub port: u16,
    dir: std::path::PathBuf,
    storage: String,
    child: Option<std::process::Child>,
}

impl OwnBroker {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("sqlite://broker.db")
    }

    /// With a storage URL of the test's choosing (relative paths are in the broker's own
    /// directory), e.g. `sqlite://broker.db?maintenance_interval=1s`.
    pub fn start_with(storage: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(unique("cdp-broker"));
        std::fs::create_dir_all(&dir)?;
        let mut b = Self {
            port,
            dir,
            storage: storage.to_owned(),
            child: None,
        };
        b.resume()?;
        Ok(b)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and storage.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let bin = std::env::var_os("CDP_TEST_NISSHI")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cargo/bin/nisshi")
            });
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: `scripts/stack up` installs it (or set CDP_TEST_NISSHI)",
            bin.display()
        );
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new(bin)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--group-initial-rebalance-delay",
                "0s",
                "--storage-engine",
                &self.storage,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "own broker did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// High watermark of each partition of a topic.
pub async fn topic_ends(topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()?;
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut out = Vec::new();
        for t in md.topics() {
            for p in t.partitions() {
                let (_, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                out.push((p.id(), hi));
            }
        }
        Ok(out)
    })
    .await?
}
