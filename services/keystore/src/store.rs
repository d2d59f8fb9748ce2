//! Per-subject data keys in Postgres (`subject_keys`), wrapped by the master key, created on
//! first sight and destroyed by erasure. Unwrapped keys are cached per process for a short
//! TTL; the table is the only shared state, so any number of replicas agree.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::crypto::{CryptoError, DataKey, MasterKey};

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

type Cached = (Option<Arc<DataKey>>, Instant);

pub struct KeyStore {
    pool: PgPool,
    master: MasterKey,
    rng: SystemRandom,
    ttl: Duration,
    live: Mutex<HashMap<String, (Arc<DataKey>, Instant)>>,
    versions: Mutex<HashMap<(String, u32), Cached>>,
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn version_of(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl KeyStore {
    pub fn new(pool: PgPool, master: MasterKey, ttl: Duration) -> Self {
        Self {
            pool,
            master,
            rng: SystemRandom::new(),
            ttl,
            live: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
        }
    }

    pub fn rng(&self) -> &SystemRandom {
        &self.rng
    }

    /// The live key of each subject, creating keys for subjects seen for the first time (or
    /// seen again after an erasure: they get a new version; erased versions stay destroyed).
    pub async fn current_keys(
        &self,
        subjects: &[&str],
    ) -> Result<HashMap<String, Arc<DataKey>>, KeyStoreError> {
        let mut out = HashMap::with_capacity(subjects.len());
        let mut missing: Vec<String> = Vec::new();
        {
            let cache = guard(&self.live);
            for s in subjects {
                match cache.get(*s) {
                    Some((k, at)) if at.elapsed() < self.ttl => {
                        out.insert((*s).to_owned(), k.clone());
                    }
                    _ => missing.push((*s).to_owned()),
                }
            }
        }
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
                Some((v, None)) => to_create.push((s.clone(), v + 1)),
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
        let mut cache = guard(&self.live);
        if cache.len() > CACHE_MAX {
            cache.clear();
        }
        let now = Instant::now();
        for s in &missing {
            if let Some(k) = out.get(s) {
                cache.insert(s.clone(), (k.clone(), now));
            }
        }
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
        if let Some((k, at)) = guard(&self.versions).get(&id) {
            if at.elapsed() < self.ttl {
                return Ok(k.clone());
            }
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
        let mut cache = guard(&self.versions);
        if cache.len() > CACHE_MAX {
            cache.clear();
        }
        cache.insert(id, (key.clone(), Instant::now()));
        Ok(key)
    }

    /// Many key versions at once (one query for the cache misses); destroyed or unknown
    /// versions map to `None`.
    pub async fn keys(
        &self,
        wanted: &[(String, u32)],
    ) -> Result<HashMap<(String, u32), Option<Arc<DataKey>>>, KeyStoreError> {
        let mut out = HashMap::with_capacity(wanted.len());
        let mut missing: Vec<(String, u32)> = Vec::new();
        {
            let cache = guard(&self.versions);
            for id in wanted {
                match cache.get(id) {
                    Some((k, at)) if at.elapsed() < self.ttl => {
                        out.insert(id.clone(), k.clone());
                    }
                    _ => missing.push(id.clone()),
                }
            }
        }
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
        let mut cache = guard(&self.versions);
        if cache.len() > CACHE_MAX {
            cache.clear();
        }
        let now = Instant::now();
        for id in missing {
            let key = found.remove(&id).flatten();
            cache.insert(id.clone(), (key.clone(), now));
            out.insert(id, key);
        }
        Ok(out)
    }

    /// Destroys every key version of a subject (erasure). Returns how many were destroyed.
    /// Other processes may keep using a cached key for up to the cache TTL.
    pub async fn destroy(&self, subject_id: &str) -> Result<u64, KeyStoreError> {
        let done = sqlx::query(
            "UPDATE subject_keys SET wrapped_key = NULL, destroyed_at = now()
              WHERE subject_id = $1 AND destroyed_at IS NULL",
        )
        .bind(subject_id)
        .execute(&self.pool)
        .await?;
        guard(&self.live).remove(subject_id);
        guard(&self.versions).retain(|(s, _), _| s != subject_id);
        Ok(done.rows_affected())
    }
}
