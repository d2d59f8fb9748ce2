//! An ingest service running in the test process against the real broker and Postgres,
//! with its own topics (unique prefix), database and keys.

use std::sync::Arc;

use anyhow::Context;
use cdp_ingest::config::IngestArgs;
use cdp_ingest::IngestConfig;
use cdp_keystore::config::KeyArgs;
use cdp_keystore::crypto::{field_aad, sealed_version};
use cdp_keystore::{KeyStore, RawIdentifier, Vault};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::KafkaArgs;
use cdp_runtime::metrics::Metrics;
use cdp_runtime::topics::{self, Topic, Topics};
use cdp_runtime::Shutdown;
use cdp_schemas::{IdentifierKind, Sealed};

use crate::{brokers, random_key_args, unique, TestDb};

pub const WRITE_KEY: &str = "test-write-key";

pub struct Ingest {
    pub base_url: String,
    pub topics: Topics,
    pub db: TestDb,
    pub keys: Arc<KeyStore>,
    /// The vault the service uses (same database and identifier key).
    pub vault: Arc<Vault>,
    pub metrics: Metrics,
    pub kafka: KafkaArgs,
    /// The service's key material, for a direct producer of the same deployment.
    pub key_args: KeyArgs,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<Result<(), cdp_ingest::IngestError>>,
}

/// Options a test may change.
pub struct Options {
    pub brokers: String,
    pub produce_timeout_ms: u64,
    /// `CDP_IDENTITY_BLOCKED_PATTERNS` entries.
    pub blocked_patterns: Vec<String>,
    /// `CDP_ERASURE_PROPAGATION_MS` of the service (0: it sees an erasure at once).
    pub erasure_propagation_ms: u64,
    /// `CDP_INGEST_AUTH_FAILURES_PER_MINUTE` of the service.
    pub auth_failures_per_minute: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            brokers: brokers(),
            produce_timeout_ms: 10_000,
            blocked_patterns: Vec::new(),
            erasure_propagation_ms: 1000,
            auth_failures_per_minute: 30,
        }
    }
}

impl Ingest {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> anyhow::Result<Self> {
        let prefix = format!("{}.", unique("ing"));
        let kafka = KafkaArgs::local(opts.brokers, prefix.clone());
        let topics = Topics::new(&prefix);
        topics::ensure(&kafka, &topics::catalogue(&topics)).await?;
        let db = TestDb::create().await?;
        let mut keys_args = random_key_args();
        keys_args.erasure_propagation_ms = opts.erasure_propagation_ms;
        let config = IngestConfig {
            kafka: kafka.clone(),
            pg: db.args(),
            keys: keys_args.clone(),
            ingest: IngestArgs {
                addr: "127.0.0.1:0".parse()?,
                write_keys: vec![format!("{WRITE_KEY}=test-app")],
                max_event_bytes: 32 * 1024,
                max_batch_bytes: 500 * 1024,
                max_future_secs: 3600,
                produce_timeout_ms: opts.produce_timeout_ms,
                retry_after_secs: 5,
                auth_failures_per_minute: opts.auth_failures_per_minute,
                blocked_patterns: opts.blocked_patterns,
            },
        };
        let metrics = Metrics::new();
        let shutdown = Shutdown::new();
        let (addr, serve) =
            cdp_ingest::bind(config, &metrics, &Readiness::default(), shutdown.clone()).await?;
        let task = tokio::spawn(serve);
        let keys = Arc::new(keys_args.key_store(db.pool.clone())?);
        Ok(Self {
            base_url: format!("http://{addr}"),
            topics,
            vault: Arc::new(keys_args.vault(db.pool.clone())?),
            keys,
            db,
            metrics,
            kafka,
            key_args: keys_args,
            shutdown,
            task,
        })
    }

    /// The token the vault holds for a plaintext identifier (an error when it holds none:
    /// ingest creates tokens, a lookup never does).
    pub async fn token(&self, kind: IdentifierKind, value: &str) -> anyhow::Result<String> {
        let id = self
            .vault
            .hasher()
            .identifier(&RawIdentifier::new(kind, value))?;
        self.vault
            .find(&[id])
            .await?
            .pop()
            .flatten()
            .context("the vault holds no token for this identifier")
    }

    pub fn topic(&self, t: Topic) -> String {
        self.topics.name(t)
    }

    /// POSTs JSON with the test write key.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.base_url))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// Opens a sealed PII field of a subject's event.
    pub async fn open(
        &self,
        subject_id: &str,
        field: &str,
        sealed: &Option<Sealed>,
    ) -> anyhow::Result<Option<String>> {
        let Some(s) = sealed else { return Ok(None) };
        let version = sealed_version(s)?;
        let key = self
            .keys
            .key(subject_id, version)
            .await?
            .ok_or_else(|| anyhow::anyhow!("key of {subject_id} v{version} is gone"))?;
        Ok(Some(String::from_utf8(
            key.open(&field_aad(subject_id, field), s)?,
        )?))
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.task.await??;
        self.db.drop_db().await
    }
}
