//! Erasure's part in the key store: what makes a person unreadable and unlinkable, in one
//! transaction ([`shred`]), and what keeps them from coming back.
//!
//! - **Suppression registry** (`suppressions`): the one thing kept about an erased person.
//!   An entry is the HMAC, under the suppression key (derived from the master key, not the
//!   identifier key), of an erased identifier's vault digest, with the request id: no token,
//!   profile or record. The vault refuses to create a token for a suppressed identifier, so
//!   ingest and the publishing library refuse events carrying it.
//! - **Erasure ledger** (`erased_tokens`): the erased tokens. Tokens are random and their
//!   vault rows are gone, so the ledger links to no one; consumers skip events naming a
//!   token in it, so a replay, a rebuild or a restore never re-creates the person.
//!
//! Creating a token and erasing an identifier are serialized per identifier by advisory
//! locks on its digest (shared to create, exclusive to erase): a token created concurrently
//! with an erasure is either erased with it or refused as suppressed, never left behind.

use ring::hmac;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::identifiers::Digest;
use crate::store::{KeyStore, KeyStoreError};

/// Keys suppression entries. Derived from the master key, so a deployment has no further
/// secret to keep, and independent of the identifier key.
pub struct SuppressionKey(hmac::Key);

impl SuppressionKey {
    pub fn from_master(master: &[u8; 32]) -> Self {
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, master),
            b"cdp suppression key v1",
        );
        Self(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    /// The registry's entry for an identifier's vault digest.
    pub fn entry(&self, digest: &Digest) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.0, digest).as_ref());
        out
    }
}

/// The advisory-lock keys of digests, sorted (every locker takes them in the same order).
fn lock_keys(digests: &[Digest]) -> Vec<i64> {
    let mut keys: Vec<i64> = digests
        .iter()
        .map(|d| {
            let mut k = [0u8; 8];
            k.copy_from_slice(&d[..8]);
            i64::from_be_bytes(k)
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Takes the per-identifier locks in the caller's transaction: shared to create tokens,
/// exclusive to erase.
pub(crate) async fn lock(
    tx: &mut PgConnection,
    digests: &[Digest],
    exclusive: bool,
) -> Result<(), sqlx::Error> {
    let keys = lock_keys(digests);
    if keys.is_empty() {
        return Ok(());
    }
    let function = if exclusive {
        "pg_advisory_xact_lock"
    } else {
        "pg_advisory_xact_lock_shared"
    };
    sqlx::query(&format!(
        "SELECT count({function}(k)) FROM (SELECT unnest($1::bigint[]) AS k ORDER BY 1) s"
    ))
    .bind(&keys)
    .execute(tx)
    .await?;
    Ok(())
}

/// What [`shred`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shredded {
    /// Vault rows deleted (identifiers made unlinkable).
    pub vault_rows: u64,
    /// Data key versions destroyed.
    pub keys_destroyed: u64,
    /// Suppression entries written.
    pub suppressed: u64,
    /// Tokens written to the erasure ledger.
    pub ledgered: u64,
}

/// What one erasure shreds.
pub struct Shred<'a> {
    /// Every token of the person: identifiers and subjects (the cluster).
    pub tokens: &'a [String],
    /// The digests of the identifiers the request named. Their tokens are shredded too,
    /// whether the vault knew them when the cluster was resolved or created them since, and
    /// they are suppressed even if the vault never knew them.
    pub named: &'a [Digest],
    /// Whether to suppress at all (off: the person may come back, as a new person).
    pub suppress: bool,
    /// Every profile of the person, merged-away ones included: into the ledger.
    pub profiles: &'a [Uuid],
}

/// Erases a person from the key store, in the caller's transaction: suppression entries for
/// their identifiers (unless `suppress` is off), every token into the ledger, every data key
/// of their subjects destroyed, the vault rows deleted, and the epoch moved (every process
/// drops its cached keys and tokens within `CDP_ERASURE_PROPAGATION_MS`). Idempotent:
/// shredding again finds nothing left and changes nothing.
pub async fn shred(
    tx: &mut PgConnection,
    key: &SuppressionKey,
    what: &Shred<'_>,
) -> Result<Shredded, KeyStoreError> {
    let known: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT digest FROM identifier_vault WHERE token = ANY($1)")
            .bind(what.tokens)
            .fetch_all(&mut *tx)
            .await?;
    let mut digests: Vec<Digest> = known
        .into_iter()
        .filter_map(|d| d.try_into().ok())
        .chain(what.named.iter().copied())
        .collect();
    digests.sort_unstable();
    digests.dedup();
    lock(tx, &digests, true).await?;
    // Under the locks no token of these identifiers can appear or go: read them again.
    let keys: Vec<&[u8]> = digests.iter().map(|d| d.as_slice()).collect();
    let current: Vec<String> =
        sqlx::query_scalar("SELECT token FROM identifier_vault WHERE digest = ANY($1::bytea[])")
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
    let mut tokens: Vec<String> = what.tokens.iter().cloned().chain(current).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let mut done = Shredded::default();
    if what.suppress {
        let entries: Vec<Vec<u8>> = digests.iter().map(|d| key.entry(d).to_vec()).collect();
        done.suppressed = sqlx::query(
            "INSERT INTO suppressions (entry)
             SELECT e FROM unnest($1::bytea[]) e ON CONFLICT DO NOTHING",
        )
        .bind(&entries)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    done.ledgered = sqlx::query(
        "INSERT INTO erased_tokens (token) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(&tokens)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "INSERT INTO erased_profiles (profile_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING",
    )
    .bind(what.profiles)
    .execute(&mut *tx)
    .await?;
    // A subject id is a token: destroying the keys of every token destroys the subjects'.
    // It also moves the epoch, which empties every process's caches of keys and tokens.
    done.keys_destroyed = KeyStore::destroy(tx, &tokens).await?;
    done.vault_rows = sqlx::query("DELETE FROM identifier_vault WHERE digest = ANY($1::bytea[])")
        .bind(&keys)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    Ok(done)
}

/// Removes suppression entries (a person who signs up again starts as a new, unlinked
/// person). Returns how many were removed.
pub async fn unsuppress(
    tx: &mut PgConnection,
    key: &SuppressionKey,
    digests: &[Digest],
) -> Result<u64, sqlx::Error> {
    let entries: Vec<Vec<u8>> = digests.iter().map(|d| key.entry(d).to_vec()).collect();
    Ok(
        sqlx::query("DELETE FROM suppressions WHERE entry = ANY($1::bytea[])")
            .bind(&entries)
            .execute(tx)
            .await?
            .rows_affected(),
    )
}

/// Which of `profiles` the erasure ledger holds.
pub async fn erased_profiles(
    tx: &mut PgConnection,
    profiles: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    if profiles.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<Uuid> =
        sqlx::query_scalar("SELECT profile_id FROM erased_profiles WHERE profile_id = ANY($1)")
            .bind(profiles)
            .fetch_all(tx)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Which of `tokens` the erasure ledger holds.
pub async fn erased(
    tx: &mut PgConnection,
    tokens: &[&str],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    if tokens.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT token FROM erased_tokens WHERE token = ANY($1)")
            .bind(tokens)
            .fetch_all(tx)
            .await?;
    Ok(rows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_keyed_by_the_master_key_and_differ_from_the_digest() {
        let d = [7u8; 32];
        let a = SuppressionKey::from_master(&[1; 32]);
        let b = SuppressionKey::from_master(&[2; 32]);
        assert_eq!(a.entry(&d), a.entry(&d));
        assert_ne!(a.entry(&d), b.entry(&d));
        assert_ne!(a.entry(&d), d);
    }

    #[test]
    fn lock_keys_are_sorted_and_unique() {
        let mut a = [0u8; 32];
        a[0] = 2;
        let mut b = [0u8; 32];
        b[0] = 1;
        assert_eq!(lock_keys(&[a, b, a]), {
            let mut v = vec![
                i64::from_be_bytes([2, 0, 0, 0, 0, 0, 0, 0]),
                i64::from_be_bytes([1, 0, 0, 0, 0, 0, 0, 0]),
            ];
            v.sort_unstable();
            v
        });
    }
}
