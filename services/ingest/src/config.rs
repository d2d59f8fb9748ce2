//! `cdp ingest` configuration.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::segment::Limits;

#[derive(Args, Clone)]
pub struct IngestArgs {
    /// Address of the tracking API.
    #[arg(
        long = "ingest-addr",
        env = "CDP_INGEST_ADDR",
        default_value = "127.0.0.1:8088"
    )]
    pub addr: SocketAddr,
    /// Write keys, `key=source` pairs, comma-separated. A request authenticates with HTTP Basic
    /// (write key as user name, empty password). Secret.
    #[arg(
        long = "write-keys",
        env = "CDP_INGEST_WRITE_KEYS",
        value_delimiter = ',',
        hide_env_values = true,
        required = true
    )]
    pub write_keys: Vec<String>,
    /// Largest event, in bytes of JSON.
    #[arg(long = "max-event-bytes", env = "CDP_INGEST_MAX_EVENT_BYTES", default_value_t = 32 * 1024)]
    pub max_event_bytes: usize,
    /// Largest request body (a batch), in bytes, after gzip decompression.
    #[arg(long = "max-batch-bytes", env = "CDP_INGEST_MAX_BATCH_BYTES", default_value_t = 500 * 1024)]
    pub max_batch_bytes: usize,
    /// How far in the future an event's timestamp may be, in seconds.
    #[arg(
        long = "max-future-secs",
        env = "CDP_INGEST_MAX_FUTURE_SECS",
        default_value_t = 3600
    )]
    pub max_future_secs: i64,
    /// Longest wait for the broker's acknowledgement before answering 503, in milliseconds.
    #[arg(
        long = "produce-timeout-ms",
        env = "CDP_INGEST_PRODUCE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub produce_timeout_ms: u64,
    /// `Retry-After` of 503 answers, in seconds.
    #[arg(
        long = "retry-after-secs",
        env = "CDP_INGEST_RETRY_AFTER_SECS",
        default_value_t = 5
    )]
    pub retry_after_secs: u64,
    /// Failed authentications a client address may make per minute; beyond it the address
    /// gets 429 without its requests being read until its minute ends. 0: no limit (behind a
    /// proxy that hides client addresses, limit there instead).
    #[arg(
        long = "auth-failures-per-minute",
        env = "CDP_INGEST_AUTH_FAILURES_PER_MINUTE",
        default_value_t = 30
    )]
    pub auth_failures_per_minute: u32,
    /// Identifier values that never link: `kind:regex` over the normalized value,
    /// `;`-separated (e.g. `email:^test(\+.*)?@example\.com$;device_id:^0+$`). Matching
    /// identifiers are named in the record's `cdp-blocked-identifiers` header and identity
    /// resolution refuses to link them (reason `blocked`).
    #[arg(
        long = "blocked-patterns",
        env = "CDP_IDENTITY_BLOCKED_PATTERNS",
        value_delimiter = ';',
        default_value = ""
    )]
    pub blocked_patterns: Vec<String>,
}

impl fmt::Debug for IngestArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestArgs")
            .field("addr", &self.addr)
            .field(
                "write_keys",
                &format!("<{} secret keys>", self.write_keys.len()),
            )
            .field("max_event_bytes", &self.max_event_bytes)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_future_secs", &self.max_future_secs)
            .field("produce_timeout_ms", &self.produce_timeout_ms)
            .field("retry_after_secs", &self.retry_after_secs)
            .field("auth_failures_per_minute", &self.auth_failures_per_minute)
            .field("blocked_patterns", &self.blocked_patterns)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("CDP_INGEST_WRITE_KEYS: entry {0} is not key=source")]
pub struct WriteKeyError(pub usize);

impl IngestArgs {
    /// Write key to source name.
    pub fn write_key_map(&self) -> Result<HashMap<String, String>, WriteKeyError> {
        self.write_keys
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.trim().is_empty())
            .map(|(i, e)| match e.split_once('=') {
                Some((k, s)) if !k.trim().is_empty() && !s.trim().is_empty() => {
                    Ok((k.trim().to_owned(), s.trim().to_owned()))
                }
                _ => Err(WriteKeyError(i)),
            })
            .collect()
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.max_event_bytes,
            max_batch_bytes: self.max_batch_bytes,
            max_message_id_len: 100,
            max_future: chrono::Duration::seconds(self.max_future_secs),
        }
    }

    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.produce_timeout_ms)
    }
}
