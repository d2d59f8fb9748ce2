//! An ingest service running in the test process against the real broker and Postgres,
//! with its own topics (unique prefix), database and keys.

use std::sync::Arc;
use std::time::Duration;

use cdp_ingest::config::IngestArgs;
use cdp_ingest::IngestConfig;
use cdp_keystore::config::KeyArgs;
use cdp_keystore::crypto::{field_aad, sealed_version};
use cdp_keystore::{IdentifierHasher, KeyStore};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::KafkaArgs;
use cdp_runtime::metrics::Metrics;
use cdp_runtime::topics::{self, Topic, Topics};
use cdp_runtime::Shutdown;
use cdp_schemas::Sealed;

use crate::{brokers, unique, TestDb};

pub const WRITE_KEY: &str = "test-write-key";

pub struct Ingest {
    pub base_url: String,
    pub topics: Topics,
    pub db: TestDb,
    pub keys: Arc<KeyStore>,
    pub hasher: IdentifierHasher,
    pub metrics: Metrics,
    pub kafka: KafkaArgs,
    /// The service's key material, for a direct producer of the same deployment.
    pub key_args: KeyArgs,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<Result<(), cdp_ingest::IngestError>>,
}

fn hex_key() -> String {
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Options a test may change.
pub struct Options {
    pub brokers: String,
    pub produce_timeout_ms: u64,
    /// `CDP_IDENTITY_BLOCKED_PATTERNS` entries.
    pub blocked_patterns: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            brokers: brokers(),
            produce_timeout_ms: 10_000,
            blocked_patterns: Vec::new(),
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
        let keys_args = KeyArgs {
            master_key: hex_key(),
            identifier_key: hex_key(),
            default_phone_region: "US".to_owned(),
            key_cache_ttl_secs: 60,
        };
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
                blocked_patterns: opts.blocked_patterns,
            },
        };
        let metrics = Metrics::new();
        let shutdown = Shutdown::new();
        let (addr, serve) =
            cdp_ingest::bind(config, &metrics, &Readiness::default(), shutdown.clone()).await?;
        let task = tokio::spawn(serve);
        let keys = Arc::new(KeyStore::new(
            db.pool.clone(),
            keys_args.master()?,
            Duration::from_secs(1),
        ));
        Ok(Self {
            base_url: format!("http://{addr}"),
            topics,
            hasher: keys_args.hasher()?,
            keys,
            db,
            metrics,
            kafka,
            key_args: keys_args,
            shutdown,
            task,
        })
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
