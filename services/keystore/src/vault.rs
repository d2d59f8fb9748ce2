//! The identifier vault: the one place where an identifier meets its token.
//!
//! `identifier_vault` maps the keyed digest of a normalized identifier (HMAC-SHA256 with the
//! identifier key) to a random 128-bit token. Everything durable outside the vault (the log,
//! the archive, the identity graph, the read models, subject ids, key names and Kafka keys)
//! carries only tokens. A keyed hash would stay linkable to the person by anyone holding the
//! key and the email; a token links to the person only through its vault row, and erasure
//! deletes that row ([`crate::erasure::shred`]).
//!
//! Tokens are created on first sight ([`Vault::tokens`], batched; replicas racing on one
//! identifier agree on the stored row), never for an identifier the suppression registry
//! holds (see [`crate::erasure`]), and looked up read-only by operator and API reads
//! ([`Vault::find`]). Each process caches tokens, bounded in size; a deletion moves the
//! key store's epoch, which empties every process's cache within the check interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cdp_schemas::Identifier;
use ring::rand::SystemRandom;
use sqlx::PgPool;

use crate::crypto::random;
use crate::epoch::{Cache, Epoch};
use crate::erasure::{lock, SuppressionKey};
use crate::identifiers::{Digest, IdentifierHasher, Normalized};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("identifier vault database error")]
    Db(#[from] sqlx::Error),
    #[error("the system random generator failed")]
    Random,
    #[error("an identifier's token was neither stored nor found")]
    Race,
    #[error("identifier {0} of the batch was erased and is suppressed")]
    Suppressed(usize),
}

pub struct Vault {
    pool: PgPool,
    hasher: IdentifierHasher,
    suppression: SuppressionKey,
    rng: SystemRandom,
    epoch: Epoch,
    cache: Cache<Digest, Arc<str>>,
}

/// A fresh token: 128 random bits as 32 lower-case hex characters.
fn token(rng: &SystemRandom) -> Result<String, VaultError> {
    let bytes: [u8; 16] = random(rng).map_err(|_| VaultError::Random)?;
    Ok(hex::encode(bytes))
}

impl Vault {
    /// `cache_entries` bounds this process's token cache; `check_interval` is how stale a
    /// cached token may be after an erasure deleted it elsewhere.
    pub fn new(
        pool: PgPool,
        hasher: IdentifierHasher,
        suppression: SuppressionKey,
        cache_entries: usize,
        check_interval: Duration,
    ) -> Self {
        Self {
            epoch: Epoch::new(pool.clone(), check_interval),
            pool,
            hasher,
            suppression,
            rng: SystemRandom::new(),
            cache: Cache::new(cache_entries.max(1)),
        }
    }

    /// Normalization (for parsers that check identifiers before tokenizing them).
    pub fn hasher(&self) -> &IdentifierHasher {
        &self.hasher
    }

    /// The token of each identifier, in order, creating tokens for identifiers seen for the
    /// first time; [`VaultError::Suppressed`] names the first identifier that was erased and
    /// is suppressed.
    pub async fn tokens(&self, ids: &[Normalized]) -> Result<Vec<String>, VaultError> {
        self.tokens_unless_suppressed(ids)
            .await?
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.ok_or(VaultError::Suppressed(i)))
            .collect()
    }

    /// Like [`Self::tokens`], with `None` for each identifier that was erased and is
    /// suppressed (no token exists for it and none is created).
    pub async fn tokens_unless_suppressed(
        &self,
        ids: &[Normalized],
    ) -> Result<Vec<Option<String>>, VaultError> {
        let digests: Vec<Digest> = ids.iter().map(|i| self.hasher.digest(i)).collect();
        let generation = self.epoch.generation().await?;
        let (mut found, missing) = self.cache.get_many(generation, &digests);
        if !missing.is_empty() {
            let mut missing = missing;
            missing.sort_unstable();
            missing.dedup();
            let stored = self.select(&missing).await?;
            let absent: Vec<Digest> = missing
                .iter()
                .filter(|d| !stored.contains_key(*d))
                .copied()
                .collect();
            let mut fresh = HashMap::new();
            if !absent.is_empty() {
                fresh = self.insert(&absent).await?;
                let lost: Vec<Digest> = absent
                    .iter()
                    .filter(|d| !fresh.contains_key(*d))
                    .copied()
                    .collect();
                if !lost.is_empty() {
                    // Another replica stored these first: theirs are the tokens.
                    fresh.extend(self.select(&lost).await?);
                }
            }
            let loaded: Vec<(Digest, Arc<str>)> = stored.into_iter().chain(fresh).collect();
            self.cache.put_many(generation, loaded.iter().cloned());
            found.extend(loaded);
        }
        let suppressed = self.suppressed(&digests, &found).await?;
        digests
            .iter()
            .map(|d| match found.get(d) {
                Some(t) => Ok(Some(t.to_string())),
                None if suppressed.contains(d) => Ok(None),
                None => Err(VaultError::Race),
            })
            .collect()
    }

    /// Which of the digests without a token are suppressed.
    async fn suppressed(
        &self,
        digests: &[Digest],
        found: &HashMap<Digest, Arc<str>>,
    ) -> Result<Vec<Digest>, VaultError> {
        let missing: Vec<Digest> = digests
            .iter()
            .filter(|d| !found.contains_key(*d))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<Vec<u8>> = missing
            .iter()
            .map(|d| self.suppression.entry(d).to_vec())
            .collect();
        let hit: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT entry FROM suppressions WHERE entry = ANY($1::bytea[])")
                .bind(&entries)
                .fetch_all(&self.pool)
                .await?;
        Ok(missing
            .into_iter()
            .zip(entries)
            .filter(|(_, e)| hit.contains(e))
            .map(|(d, _)| d)
            .collect())
    }

    /// Contract identifiers (kind, namespace, token) for normalized ones, in order.
    pub async fn identifiers(&self, ids: &[Normalized]) -> Result<Vec<Identifier>, VaultError> {
        let tokens = self.tokens(ids).await?;
        Ok(ids
            .iter()
            .zip(tokens)
            .map(|(n, token)| n.with_token(token))
            .collect())
    }

    /// The token of each identifier if the vault holds one; never creates. For reads by a
    /// plaintext identifier (the profile API, operator commands, erasure requests).
    pub async fn find(&self, ids: &[Normalized]) -> Result<Vec<Option<String>>, VaultError> {
        let digests: Vec<Digest> = ids.iter().map(|i| self.hasher.digest(i)).collect();
        let generation = self.epoch.generation().await?;
        let (mut found, missing) = self.cache.get_many(generation, &digests);
        if !missing.is_empty() {
            let stored = self.select(&missing).await?;
            self.cache
                .put_many(generation, stored.iter().map(|(d, t)| (*d, t.clone())));
            found.extend(stored);
        }
        Ok(digests
            .iter()
            .map(|d| found.get(d).map(|t| t.to_string()))
            .collect())
    }

    async fn select(&self, digests: &[Digest]) -> Result<HashMap<Digest, Arc<str>>, VaultError> {
        let keys: Vec<&[u8]> = digests.iter().map(|d| d.as_slice()).collect();
        let rows: Vec<(Vec<u8>, String)> = sqlx::query_as(
            "SELECT digest, token FROM identifier_vault WHERE digest = ANY($1::bytea[])",
        )
        .bind(&keys)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(entry).collect())
    }

    /// Stores tokens for identifiers seen for the first time, except suppressed ones, under
    /// the identifiers' shared locks: an erasure holding one exclusively has either not
    /// begun (its suppression entry is absent and it will delete the row made here) or has
    /// committed (the statement below, which starts after the lock, sees its entry).
    async fn insert(&self, digests: &[Digest]) -> Result<HashMap<Digest, Arc<str>>, VaultError> {
        let keys: Vec<&[u8]> = digests.iter().map(|d| d.as_slice()).collect();
        let entries: Vec<Vec<u8>> = digests
            .iter()
            .map(|d| self.suppression.entry(d).to_vec())
            .collect();
        let tokens = digests
            .iter()
            .map(|_| token(&self.rng))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, digests, false).await?;
        let rows: Vec<(Vec<u8>, String)> = sqlx::query_as(
            "INSERT INTO identifier_vault (digest, token)
             SELECT x.d, x.t FROM UNNEST($1::bytea[], $2::text[], $3::bytea[]) AS x(d, t, s)
              WHERE NOT EXISTS (SELECT 1 FROM suppressions WHERE entry = x.s)
             ON CONFLICT DO NOTHING
             RETURNING digest, token",
        )
        .bind(&keys)
        .bind(&tokens)
        .bind(&entries)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.into_iter().filter_map(entry).collect())
    }
}

fn entry((digest, token): (Vec<u8>, String)) -> Option<(Digest, Arc<str>)> {
    let digest: Digest = digest.try_into().ok()?;
    Some((digest, Arc::from(token)))
}
