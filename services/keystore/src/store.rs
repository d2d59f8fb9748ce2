//! Per-subject data keys in Postgres (`subject_keys`), wrapped by the master key, created on
//! first sight and destroyed by erasure. Unwrapped keys are cached per process until the key
//! store's epoch moves (see [`crate::epoch`]): a key destroyed anywhere stops opening data in
//! every process within the check interval. The tables are the only shared state, so any
//! number of replicas agree.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::crypto::{CryptoError, DataKey, MasterKey};
use crate::epoch::{Cache, Epoch};

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("key store database error")]
    Db(#[from] sqlx::Error),
    #[error("key of subject {subject_id} v{version} cannot be unwrapped")]
    Unwrap {
        subject_id: String,
        version: u32,
        #[source]
        source: CryptoError,
    },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("subject {0}: a key could not be created")]
    Race(String),
}

/// The key store's migrations; they ignore other components' versions.
pub fn migrator() -> Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m
}

const CACHE_MAX: usize = 100_000;

pub struct KeyStore {
    pool: PgPool,
    master: MasterKey,
    rng: SystemRandom,
    epoch: Epoch,
    live: Cache<String, Arc<DataKey>>,
    versions: Cache<KeyId, Option<Arc<DataKey>>>,
}

/// A subject's key version.
type KeyId = (String, u32);

fn version_of(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl KeyStore {
    /// `check_interval`: how long a key destroyed elsewhere may still be used from this
    /// process's cache.
    pub fn new(pool: PgPool, master: MasterKey, check_interval: Duration) -> Self {
        Self {
            epoch: Epoch::new(pool.clone(), check_interval),
            pool,
            master,
            rng: SystemRandom::new(),
            live: Cache::new(CACHE_MAX),
            versions: Cache::new(CACHE_MAX),
        }
    }

    pub fn rng(&self) -> &SystemRandom {
        &self.rng
    }

    /// The live key of each subject, creating keys for subjects seen for the first time.
    /// A subject whose keys an erasure destroyed is absent from the result: it never gets a
    /// key again (its token is in the erasure ledger; the person, if they come back, has new
    /// tokens and so new subjects).
    pub async fn current_keys(
        &self,
        subjects: &[&str],
    ) -> Result<HashMap<String, Arc<DataKey>>, KeyStoreError> {
        let generation = self.epoch.generation().await?;
        let wanted: Vec<String> = subjects.iter().map(|s| (*s).to_owned()).collect();
        let (mut out, mut missing) = self.live.get_many(generation, &wanted);
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(out);
        }
        let rows: Vec<(String, i32, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT DISTINCT ON (subject_id) subject_id, key_version, wrapped_key
               FROM subject_keys WHERE subject_id = ANY($1)
              ORDER BY subject_id, key_version DESC",
        )
        .bind(&missing)
        .fetch_all(&self.pool)
        .await?;
        let latest: HashMap<String, (i32, Option<Vec<u8>>)> =
            rows.into_iter().map(|(s, v, w)| (s, (v, w))).collect();
        let mut to_create: Vec<(String, i32)> = Vec::new();
        for s in &missing {
            match latest.get(s) {
                Some((v, Some(wrapped))) => {
                    let key = self.unwrap(s, *v, wrapped)?;
                    out.insert(s.clone(), key);
                }
                Some((_, None)) => {}
                None => to_create.push((s.clone(), 1)),
            }
        }
        if !to_create.is_empty() {
            let mut subjects = Vec::with_capacity(to_create.len());
            let mut versions = Vec::with_capacity(to_create.len());
            let mut wrapped = Vec::with_capacity(to_create.len());
            for (s, v) in &to_create {
                let (_, w) = self.master.generate(&self.rng, s, version_of(*v))?;
                subjects.push(s.clone());
                versions.push(*v);
                wrapped.push(w);
            }
            sqlx::query(
                "INSERT INTO subject_keys (subject_id, key_version, wrapped_key)
                 SELECT * FROM UNNEST($1::text[], $2::int[], $3::bytea[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(&subjects)
            .bind(&versions)
            .bind(&wrapped)
            .execute(&self.pool)
            .await?;
            // Another replica may have won the insert: read back what is stored.
            let rows: Vec<(String, i32, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT k.subject_id, k.key_version, k.wrapped_key
                   FROM subject_keys k JOIN UNNEST($1::text[], $2::int[]) AS x(s, v)
                     ON k.subject_id = x.s AND k.key_version = x.v",
            )
            .bind(&subjects)
            .bind(&versions)
            .fetch_all(&self.pool)
            .await?;
            for (s, v, w) in rows {
                let w = w.ok_or_else(|| KeyStoreError::Race(s.clone()))?;
                let key = self.unwrap(&s, v, &w)?;
                out.insert(s, key);
            }
            if let Some((s, _)) = to_create.iter().find(|(s, _)| !out.contains_key(s)) {
                return Err(KeyStoreError::Race(s.clone()));
            }
        }
        self.live.put_many(
            generation,
            missing
                .iter()
                .filter_map(|s| out.get(s).map(|k| (s.clone(), k.clone()))),
        );
        Ok(out)
    }

    fn unwrap(
        &self,
        subject_id: &str,
        version: i32,
        wrapped: &[u8],
    ) -> Result<Arc<DataKey>, KeyStoreError> {
        self.master
            .unwrap_key(subject_id, version_of(version), wrapped)
            .map(Arc::new)
            .map_err(|source| KeyStoreError::Unwrap {
                subject_id: subject_id.to_owned(),
                version: version_of(version),
                source,
            })
    }

    /// One version of a subject's key, for opening sealed data. `None` when it was
    /// destroyed (the subject was erased) or never existed.
    pub async fn key(
        &self,
        subject_id: &str,
        version: u32,
    ) -> Result<Option<Arc<DataKey>>, KeyStoreError> {
        let id = (subject_id.to_owned(), version);
        let generation = self.epoch.generation().await?;
        if let Some(k) = self.versions.get_many(generation, [&id]).0.remove(&id) {
            return Ok(k);
        }
        let row: Option<(Option<Vec<u8>>,)> = sqlx::query_as(
            "SELECT wrapped_key FROM subject_keys WHERE subject_id = $1 AND key_version = $2",
        )
        .bind(subject_id)
        .bind(i32::try_from(version).unwrap_or(i32::MAX))
        .fetch_optional(&self.pool)
        .await?;
        let key = match row {
            Some((Some(w),)) => {
                Some(self.unwrap(subject_id, i32::try_from(version).unwrap_or(i32::MAX), &w)?)
            }
            _ => None,
        };
        self.versions.put_many(generation, [(id, key.clone())]);
        Ok(key)
    }

    /// Many key versions at once (one query for the cache misses); destroyed or unknown
    /// versions map to `None`.
    pub async fn keys(
        &self,
        wanted: &[(String, u32)],
    ) -> Result<HashMap<(String, u32), Option<Arc<DataKey>>>, KeyStoreError> {
        let generation = self.epoch.generation().await?;
        let (mut out, mut missing) = self.versions.get_many(generation, wanted);
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(out);
        }
        let subjects: Vec<&str> = missing.iter().map(|(s, _)| s.as_str()).collect();
        let versions: Vec<i32> = missing
            .iter()
            .map(|(_, v)| i32::try_from(*v).unwrap_or(i32::MAX))
            .collect();
        let rows: Vec<(String, i32, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT k.subject_id, k.key_version, k.wrapped_key
               FROM subject_keys k JOIN UNNEST($1::text[], $2::int[]) AS x(s, v)
                 ON k.subject_id = x.s AND k.key_version = x.v",
        )
        .bind(&subjects)
        .bind(&versions)
        .fetch_all(&self.pool)
        .await?;
        let mut found: HashMap<(String, u32), Option<Arc<DataKey>>> = HashMap::new();
        for (s, v, w) in rows {
            let key = match w {
                Some(w) => Some(self.unwrap(&s, v, &w)?),
                None => None,
            };
            found.insert((s, version_of(v)), key);
        }
        let loaded: Vec<(KeyId, Option<Arc<DataKey>>)> = missing
            .into_iter()
            .map(|id| {
                let key = found.remove(&id).flatten();
                (id, key)
            })
            .collect();
        self.versions.put_many(generation, loaded.iter().cloned());
        out.extend(loaded);
        Ok(out)
    }

    /// Destroys every key version of these subjects (erasure), in the caller's transaction:
    /// the rows stay (versions never restart), the wrapped keys are gone, and the epoch moves
    /// so every process drops its cached keys within the check interval. Returns how many
    /// versions were destroyed.
    pub async fn destroy(
        tx: &mut sqlx::PgConnection,
        subjects: &[String],
    ) -> Result<u64, KeyStoreError> {
        let done = sqlx::query(
            "UPDATE subject_keys SET wrapped_key = NULL, destroyed_at = now()
              WHERE subject_id = ANY($1) AND destroyed_at IS NULL",
        )
        .bind(subjects)
        .execute(&mut *tx)
        .await?;
        Epoch::bump(tx).await?;
        Ok(done.rows_affected())
    }
}
