//! The archive's object store: a local directory (the default) or any S3-compatible store,
//! behind `object_store`, with the operations the archiver and restore need.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};

use crate::layout::{self, FileName};
use crate::ocf::{self, meta, Header, OcfError};

/// Where the archive lives.
#[derive(clap::Args, Clone)]
pub struct StoreArgs {
    /// Archive location: a local directory (`archive`, `/var/lib/cdp/archive`,
    /// `file:///var/lib/cdp/archive`) or `s3://bucket/prefix`. S3 credentials come from the
    /// standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) variables.
    #[arg(long, env = "CDP_ARCHIVE_URL", default_value = "archive")]
    pub archive_url: String,
    /// S3 endpoint for S3-compatible stores (garage, MinIO, Ceph): e.g. `http://127.0.0.1:3900`.
    /// Unset: AWS S3 (or AWS_ENDPOINT_URL). Path-style requests; plain http is allowed when
    /// the endpoint says http://.
    #[arg(long, env = "CDP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (garage's default is `garage`). Unset: AWS_REGION, else us-east-1.
    #[arg(long, env = "CDP_S3_REGION")]
    pub s3_region: Option<String>,
    /// S3 access key id. Unset: AWS_ACCESS_KEY_ID.
    #[arg(long, env = "CDP_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key. Unset: AWS_SECRET_ACCESS_KEY. Secret.
    #[arg(long, env = "CDP_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// How long one S3 request is retried inside the client before the archiver's own retry
    /// with back-off takes over (seconds).
    #[arg(long, env = "CDP_S3_RETRY_TIMEOUT_SECS", default_value_t = 10)]
    pub s3_retry_timeout_secs: u64,
    /// Whether S3 requests sign the SHA-256 of what they upload: `auto` signs over http://
    /// and not over https://, where TLS already protects the body (as the AWS SDKs do;
    /// it saves hashing every archived byte twice, once here and once in the store).
    #[arg(long, env = "CDP_S3_SIGN_PAYLOAD", value_enum, default_value_t = SignPayload::Auto)]
    pub s3_sign_payload: SignPayload,
}

/// See [`StoreArgs::s3_sign_payload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SignPayload {
    Auto,
    Always,
    Never,
}

impl SignPayload {
    /// Whether a request to `endpoint` (`None`: AWS S3, over https) signs its payload.
    pub fn signs(self, endpoint: Option<&str>) -> bool {
        match self {
            SignPayload::Always => true,
            SignPayload::Never => false,
            SignPayload::Auto => endpoint.is_some_and(|e| !e.starts_with("https://")),
        }
    }
}

impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreArgs")
            .field("archive_url", &self.archive_url)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("s3_access_key_id", &self.s3_access_key_id)
            .field(
                "s3_secret_access_key",
                &self.s3_secret_access_key.as_ref().map(|_| "<secret>"),
            )
            .field("s3_retry_timeout_secs", &self.s3_retry_timeout_secs)
            .field("s3_sign_payload", &self.s3_sign_payload)
            .finish()
    }
}

impl StoreArgs {
    pub fn local(dir: impl Into<String>) -> Self {
        Self {
            archive_url: dir.into(),
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_retry_timeout_secs: 10,
            s3_sign_payload: SignPayload::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid archive location {url:?}: {reason}")]
    Location { url: String, reason: String },
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("archive file {path} is unreadable")]
    Corrupt {
        path: String,
        #[source]
        source: OcfError,
    },
    #[error("archive file {path} has no {key} in its header")]
    MissingMetadata { path: String, key: &'static str },
}

impl StoreError {
    /// Whether retrying may help (network, server errors) as opposed to a defect or a
    /// damaged archive.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::ObjectStore(e) => !matches!(
                e,
                object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            _ => false,
        }
    }
}

/// What a create-only put did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    Written,
    /// An object of that name was there already; it is unchanged.
    Existed,
}

/// One archive file as listed.
#[derive(Clone, Debug)]
pub struct Listed {
    pub name: FileName,
    pub path: Path,
    pub size: u64,
}

/// The archive: an object store and the prefix under which files are written.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    display: String,
    /// Whether the store honours create-only puts (a local directory does; an S3 store is
    /// asked by [`Archive::probe_create_only`]).
    create_only: bool,
}

/// Bytes fetched to read a header; a header with the schema is about 2 KiB.
const HEADER_PROBE: u64 = 16 * 1024;

impl Archive {
    pub fn open(args: &StoreArgs) -> Result<Self, StoreError> {
        let url = args.archive_url.trim();
        let bad = |reason: &str| StoreError::Location {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(RetryConfig {
                    max_retries: 5,
                    retry_timeout: Duration::from_secs(args.s3_retry_timeout_secs),
                    ..RetryConfig::default()
                });
            if let Some(endpoint) = &args.s3_endpoint {
                b = b
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let Some(region) = &args.s3_region {
                b = b.with_region(region);
            }
            if let Some(id) = &args.s3_access_key_id {
                b = b.with_access_key_id(id);
            }
            if let Some(secret) = &args.s3_secret_access_key {
                b = b.with_secret_access_key(secret);
            }
            // The endpoint in effect: ours, else the one the builder took from the environment.
            let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
            b = b.with_unsigned_payload(!args.s3_sign_payload.signs(endpoint.as_deref()));
            let store = b.build()?;
            let prefix = Path::parse(prefix.trim_matches('/')).map_err(|e| bad(&e.to_string()))?;
            return Ok(Self {
                store: Arc::new(store),
                prefix,
                display: url.to_owned(),
                create_only: true,
            });
        }
        let dir = match url.strip_prefix("file://") {
            Some(p) => p,
            None if url.contains("://") => {
                return Err(bad("supported: a directory, file://, s3://"))
            }
            None => url,
        };
        if dir.is_empty() {
            return Err(bad("empty directory"));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| bad(&format!("cannot create the directory: {e}")))?;
        let store = LocalFileSystem::new_with_prefix(dir)?;
        Ok(Self {
            store: Arc::new(store),
            prefix: Path::default(),
            display: url.to_owned(),
            create_only: true,
        })
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// Writes a whole object (atomically: readers see the old object or the new one).
    pub async fn put(&self, path: &Path, bytes: Bytes) -> Result<(), StoreError> {
        self.store.put(path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Writes a whole object unless one exists under its name: a create-only put (S3's
    /// `If-None-Match: *`, a hard link on a local directory), so two writers of one name never
    /// overwrite each other: the first wins, the second learns it lost. On a store that ignores
    /// conditional puts (see [`Archive::probe_create_only`]) the name is looked up first,
    /// which fences a writer that comes late, not two writing the same name at the same time.
    pub async fn put_new(&self, path: &Path, bytes: Bytes) -> Result<Created, StoreError> {
        if !self.create_only {
            match self.store.head(path).await {
                Ok(_) => return Ok(Created::Existed),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            self.put(path, bytes).await?;
            return Ok(Created::Written);
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(Created::Written),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Existed),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the store honours create-only puts, found by trying: an object under
    /// `_cdp/` is created twice (the second must be refused) and deleted. Garage 2.5, for
    /// one, ignores `If-None-Match` on PUT. Returns the answer and remembers it.
    pub async fn probe_create_only(&mut self) -> Result<bool, StoreError> {
        let path = self.prefix.clone().join("_cdp").join(format!(
            "create-only-probe-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        self.create_only = true;
        let first = self.put_new(&path, Bytes::from_static(b"1")).await;
        let second = match first {
            Ok(_) => self.put_new(&path, Bytes::from_static(b"2")).await,
            Err(e) => Err(e),
        };
        let _ = self.store.delete(&path).await;
        self.create_only = match second {
            Ok(Created::Existed) => true,
            Ok(Created::Written) => false,
            Err(StoreError::ObjectStore(object_store::Error::NotImplemented { .. })) => false,
            Err(e) => return Err(e),
        };
        Ok(self.create_only)
    }

    pub async fn get(&self, path: &Path) -> Result<Bytes, StoreError> {
        Ok(self.store.get(path).await?.bytes().await?)
    }

    /// An object's size in bytes.
    pub async fn size(&self, path: &Path) -> Result<u64, StoreError> {
        Ok(self.store.head(path).await?.size)
    }

    pub async fn delete(&self, path: &Path) -> Result<(), StoreError> {
        Ok(self.store.delete(path).await?)
    }

    /// Every archive file of a topic (or one partition), ordered by partition then offset.
    pub async fn list(
        &self,
        topic: &str,
        partition: Option<i32>,
    ) -> Result<Vec<Listed>, StoreError> {
        let dir = layout::partition_dir(&self.prefix, topic, partition);
        let mut files: Vec<Listed> = self
            .store
            .list(Some(&dir))
            .try_filter_map(|m| async move {
                Ok(layout::parse(&m.location).map(|name| Listed {
                    name,
                    path: m.location,
                    size: m.size,
                }))
            })
            .try_collect()
            .await?;
        files.retain(|f| f.name.topic == topic && partition.is_none_or(|p| f.name.partition == p));
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    /// A file's header, from its first bytes.
    pub async fn header(&self, file: &Listed) -> Result<Header, StoreError> {
        let corrupt = |source| StoreError::Corrupt {
            path: file.path.to_string(),
            source,
        };
        let probe = self
            .store
            .get_range(&file.path, 0..HEADER_PROBE.min(file.size))
            .await?;
        match Header::parse(&probe) {
            Ok(h) => Ok(h),
            Err(OcfError::Truncated(_)) if file.size > HEADER_PROBE => {
                Header::parse(&self.get(&file.path).await?).map_err(corrupt)
            }
            Err(e) => Err(corrupt(e)),
        }
    }

    /// The next offset to archive for a partition: one past the last archived offset, or
    /// `None` if nothing of it is archived.
    pub async fn next_offset(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, StoreError> {
        let files = self.list(topic, Some(partition)).await?;
        let Some(last) = files.last() else {
            return Ok(None);
        };
        let header = self.header(last).await?;
        let last_offset =
            header
                .number(meta::LAST_OFFSET)
                .ok_or_else(|| StoreError::MissingMetadata {
                    path: last.path.to_string(),
                    key: meta::LAST_OFFSET,
                })?;
        Ok(Some(last_offset + 1))
    }

    /// Reads a whole file.
    pub async fn read(
        &self,
        file: &Listed,
    ) -> Result<(Header, Vec<ocf::ArchivedRecord>), StoreError> {
        let bytes = self.get(&file.path).await?;
        ocf::read_all(&bytes).map_err(|source| StoreError::Corrupt {
            path: file.path.to_string(),
            source,
        })
    }
}

impl std::fmt::Display for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_signed_over_plain_http_unless_told_otherwise() {
        let http = Some("http://127.0.0.1:3900");
        let https = Some("https://s3.example.com");
        assert!(SignPayload::Auto.signs(http));
        assert!(!SignPayload::Auto.signs(https));
        assert!(!SignPayload::Auto.signs(None), "AWS S3 itself is https");
        assert!(SignPayload::Always.signs(https));
        assert!(!SignPayload::Never.signs(http));
    }
}
