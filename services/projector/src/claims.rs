//! Which identifiers this projector has already seen claimed, and since when: a batch need
//! not send Postgres an identifier whose claim is already earlier than the batch's, which
//! was most of the `customer_identities` statement's work (every event carries its subject's
//! identifiers, so every batch probed nearly every identifier again).
//!
//! Why skipping is exact: an identifier's `first_seen` in the read model only ever moves
//! earlier (a claim replaces another only when it is earlier; merges and splits re-point
//! `profile_id` and leave `first_seen` alone; only an erasure deletes identities, and no
//! event naming an erased token is applied again), so a time seen here stays an upper bound
//! of the stored one for every identifier a batch can still write. A candidate strictly later than it loses to
//! the stored claim whatever its profile, and the statement would leave the row as it is.
//! A time is recorded once the batch's statements ran, before its commit: if the commit
//! fails, the same events are applied again before any later batch (a retry, or after a
//! restart with an empty cache) and their candidates are not strictly later than what they
//! recorded, so they are written then. One cache per projector run, so per generation: a
//! rebuilt generation (perhaps from a later start) starts with none.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::rows::{IdentityKey, IdentityRow};

/// Identifiers remembered at most (about 300 bytes each, so some 60 MB); past it the cache
/// starts again (it only saves work).
const MAX_IDENTIFIERS: usize = 200_000;

/// token → (kind, namespace, earliest first_seen seen) of each identifier with it.
type Seen = HashMap<String, Vec<(String, String, DateTime<Utc>)>>;

#[derive(Default)]
pub struct Claims {
    seen: Mutex<Seen>,
}

fn claimed(seen: &Seen, (kind, namespace, token): &IdentityKey<'_>) -> Option<DateTime<Utc>> {
    seen.get(*token)?
        .iter()
        .find(|(k, n, _)| k == kind && n == namespace)
        .map(|(_, _, at)| *at)
}

impl Claims {
    /// Drops the rows whose identifier is already claimed strictly earlier. Returns how many.
    pub fn skip_settled(&self, identities: &mut HashMap<IdentityKey<'_>, IdentityRow>) -> usize {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let before = identities.len();
        identities.retain(|key, row| claimed(&seen, key).is_none_or(|at| row.first_seen <= at));
        before - identities.len()
    }

    /// Forgets identifiers an erasure deleted (their events are never applied again, so this
    /// only frees the memory; another instance's cache keeps them harmlessly).
    pub fn forget(&self, tokens: &[String]) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for t in tokens {
            seen.remove(t);
        }
    }

    /// Remembers the claims a batch wrote (or found earlier ones for).
    pub fn record(&self, identities: &HashMap<IdentityKey<'_>, IdentityRow>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() + identities.len() > MAX_IDENTIFIERS {
            seen.clear();
        }
        for ((kind, namespace, token), row) in identities {
            // The token is copied only for an identifier not remembered yet.
            let claims = match seen.get_mut(*token) {
                Some(claims) => claims,
                None => seen.entry((*token).to_owned()).or_default(),
            };
            match claims
                .iter_mut()
                .find(|(k, n, _)| k == kind && n == namespace)
            {
                Some((_, _, at)) => *at = (*at).min(row.first_seen),
                None => claims.push(((*kind).to_owned(), (*namespace).to_owned(), row.first_seen)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn row(secs: i64, profile: u128) -> IdentityRow {
        IdentityRow {
            profile_id: Uuid::from_u128(profile),
            origin: Uuid::from_u128(profile),
            first_seen: DateTime::from_timestamp(secs, 0).unwrap_or_default(),
        }
    }

    fn batch<'a>(rows: &[(IdentityKey<'a>, i64, u128)]) -> HashMap<IdentityKey<'a>, IdentityRow> {
        rows.iter().map(|(k, t, p)| (*k, row(*t, *p))).collect()
    }

    #[test]
    fn only_candidates_strictly_later_than_a_recorded_claim_are_skipped() {
        let claims = Claims::default();
        claims.record(&batch(&[(("EMAIL", "", "h1"), 10, 1)]));
        // Later: the stored claim (10 or earlier) wins whatever the profile.
        let mut later = batch(&[(("EMAIL", "", "h1"), 11, 0)]);
        assert_eq!(claims.skip_settled(&mut later), 1);
        assert!(later.is_empty());
        let mut kept = batch(&[
            // The same time: the profile id decides, so Postgres must see it.
            (("EMAIL", "", "h1"), 10, 0),
            // Another kind or namespace with the same token is another identifier.
            (("USER_ID", "", "h1"), 20, 1),
            (("EXTERNAL_ID", "crm", "h1"), 20, 1),
            // Never seen.
            (("PHONE", "", "h2"), 20, 1),
        ]);
        assert_eq!(claims.skip_settled(&mut kept), 0);
        assert_eq!(kept.len(), 4);
    }

    #[test]
    fn a_recorded_claim_only_moves_earlier() {
        let claims = Claims::default();
        claims.record(&batch(&[(("EMAIL", "", "h"), 10, 1)]));
        // A batch that wrote a later candidate (it lost in Postgres) does not move it.
        claims.record(&batch(&[(("EMAIL", "", "h"), 30, 2)]));
        let mut at_20 = batch(&[(("EMAIL", "", "h"), 20, 3)]);
        assert_eq!(claims.skip_settled(&mut at_20), 1);
        // An earlier claim does.
        claims.record(&batch(&[(("EMAIL", "", "h"), 5, 4)]));
        let mut at_7 = batch(&[(("EMAIL", "", "h"), 7, 3)]);
        assert_eq!(claims.skip_settled(&mut at_7), 1);
        let mut at_5 = batch(&[(("EMAIL", "", "h"), 5, 3)]);
        assert_eq!(claims.skip_settled(&mut at_5), 0);
    }
}
