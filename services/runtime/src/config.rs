//! Configuration shared by services: every field has a flag, an `CDP_*` environment variable
//! and, except secrets, a default that works with the local stack.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Args, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(
        long = "kafka-brokers",
        env = "CDP_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Prefix of every topic name; the catalogue appends `customer-events`, `identity`, ...
    #[arg(long, env = "CDP_TOPIC_PREFIX", default_value = "cdp.")]
    pub topic_prefix: String,
    /// Replication factor of the topics this process creates (1 locally, 3 in production).
    #[arg(
        long = "topic-replication",
        env = "CDP_TOPIC_REPLICATION",
        default_value_t = 1
    )]
    pub topic_replication: i32,
    /// Compression of produced record batches.
    #[arg(long = "kafka-compression", env = "CDP_KAFKA_COMPRESSION", value_enum, default_value_t = Compression::Lz4)]
    pub compression: Compression,
    /// Extra librdkafka client properties, `key=value`, comma-separated (TLS and SASL
    /// settings go here: `security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512,...`).
    /// Values of keys naming a password, secret, key or token are never printed.
    #[arg(
        long = "kafka-property",
        env = "CDP_KAFKA_PROPERTIES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub properties: Vec<String>,
}

/// Whether a librdkafka property's value is a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, `ssl.key.pem`, ...).
fn secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas", "credential"]
        .iter()
        .any(|s| key.contains(s))
}

impl std::fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: Vec<String> = self
            .properties
            .iter()
            .map(|p| match p.split_once('=') {
                Some((k, _)) if secret_property(k) => format!("{k}=<secret>"),
                Some(_) => p.clone(),
                None => "<malformed>".to_owned(),
            })
            .collect();
        f.debug_struct("KafkaArgs")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("topic_replication", &self.topic_replication)
            .field("compression", &self.compression)
            .field("properties", &properties)
            .finish()
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Lz4,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
        }
    }
}

impl KafkaArgs {
    /// The extra properties as pairs; malformed entries are reported, not ignored.
    pub fn extra_properties(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.properties
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| ConfigError::Invalid {
                        name: "CDP_KAFKA_PROPERTIES",
                        reason: format!("`{p}` is not key=value"),
                    })
            })
            .collect()
    }

    /// A local-stack configuration (for tests and tools).
    pub fn local(brokers: impl Into<String>, topic_prefix: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: topic_prefix.into(),
            topic_replication: 1,
            compression: Compression::Lz4,
            properties: Vec::new(),
        }
    }
}

#[derive(Args, Clone)]
pub struct PostgresArgs {
    /// Postgres connection URL. May carry a password: it is never logged.
    #[arg(
        long = "database-url",
        env = "CDP_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/cdp"
    )]
    pub database_url: String,
    /// Maximum connections in this process's pool.
    #[arg(
        long = "pg-max-connections",
        env = "CDP_PG_MAX_CONNECTIONS",
        default_value_t = 8
    )]
    pub max_connections: u32,
}

impl fmt::Debug for PostgresArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresArgs")
            .field("database_url", &redact_url(&self.database_url))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// The URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[derive(Args, Clone, Debug)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long = "log-format", global = true, env = "CDP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` env-filter syntax.
    #[arg(
        long = "log",
        env = "CDP_LOG",
        default_value = "info,rdkafka=warn,sqlx=warn"
    )]
    pub log_filter: String,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Args, Clone, Debug)]
pub struct AdminArgs {
    /// Address of the admin server: /healthz, /readyz, /metrics.
    #[arg(
        long = "admin-addr",
        env = "CDP_ADMIN_ADDR",
        default_value = "127.0.0.1:9464"
    )]
    pub admin_addr: SocketAddr,
}

#[derive(Args, Clone, Debug)]
pub struct RunnerArgs {
    /// Records per batch (one sink transaction per batch) when the consumer keeps up: a
    /// batch is cut at this size as soon as no further record is waiting.
    #[arg(long = "batch-size", env = "CDP_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Largest batch, taken while records keep waiting (catching up after a pause, a
    /// replay, a rebuild): the batch then grows past `CDP_BATCH_SIZE` with what is already
    /// fetched, up to this many records. Values below `CDP_BATCH_SIZE` mean `CDP_BATCH_SIZE`.
    #[arg(
        long = "batch-size-max",
        env = "CDP_BATCH_SIZE_MAX",
        default_value_t = 20_000
    )]
    pub batch_size_max: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[arg(
        long = "batch-linger-ms",
        env = "CDP_BATCH_LINGER_MS",
        default_value_t = 200
    )]
    pub batch_linger_ms: u64,
    /// Stop the consumer after this many consecutive dead-lettered records (a bad deploy
    /// stops instead of dead-lettering a whole topic). 0 disables the limit.
    #[arg(
        long = "dlq-max-consecutive",
        env = "CDP_DLQ_MAX_CONSECUTIVE",
        default_value_t = 1000
    )]
    pub max_consecutive_dead_letters: u64,
    /// Cap of the exponential back-off between retries of a failed batch, in milliseconds.
    #[arg(
        long = "retry-backoff-max-ms",
        env = "CDP_RETRY_BACKOFF_MAX_MS",
        default_value_t = 10_000
    )]
    pub retry_backoff_max_ms: u64,
    /// A consumer is not ready (`/readyz`) when for this many seconds it neither received a
    /// record nor an answer from the broker, or its sink kept failing a batch.
    #[arg(
        long = "consumer-stall-secs",
        env = "CDP_CONSUMER_STALL_SECS",
        default_value_t = 30
    )]
    pub stall_secs: u64,
}

impl Default for RunnerArgs {
    fn default() -> Self {
        Self {
            batch_size: 500,
            batch_size_max: 20_000,
            batch_linger_ms: 200,
            max_consecutive_dead_letters: 1000,
            retry_backoff_max_ms: 10_000,
            stall_secs: 30,
        }
    }
}

impl RunnerArgs {
    /// The largest batch the runner takes (never below the normal batch size).
    pub fn batch_ceiling(&self) -> usize {
        self.batch_size_max.max(self.batch_size)
    }

    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.batch_linger_ms)
    }

    pub fn retry_backoff_max(&self) -> Duration {
        Duration::from_millis(self.retry_backoff_max_ms)
    }

    pub fn stall(&self) -> Duration {
        Duration::from_secs(self.stall_secs.max(1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_secrets_are_never_printed() {
        let mut k = KafkaArgs::local("b:9092", "cdp.");
        k.properties = vec![
            "security.protocol=SASL_SSL".into(),
            "sasl.password=hunter2".into(),
            "ssl.key.password=swordfish".into(),
            "sasl.oauthbearer.client.secret=s3cr3t".into(),
        ];
        let printed = format!("{k:?}");
        for secret in ["hunter2", "swordfish", "s3cr3t"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("security.protocol=SASL_SSL"));
        assert!(printed.contains("sasl.password=<secret>"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn extra_properties_parse_or_fail_loudly() {
        let mut k = KafkaArgs::local("b", "p.");
        k.properties = vec!["a=1".into(), " b = x=y ".into()];
        assert_eq!(
            k.extra_properties().ok(),
            Some(vec![("a".into(), "1".into()), ("b".into(), "x=y".into())])
        );
        k.properties = vec!["nonsense".into()];
        assert!(k.extra_properties().is_err());
    }
}
