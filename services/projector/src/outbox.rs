//! The profiles topic: a relay publishes snapshots of the profiles the outbox names (written
//! in the same transaction as the rows), then deletes those outbox rows. A crash between
//! producing and deleting republishes the same snapshot: harmless on a compacted topic.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::kafka::runner::CatchUp;
use cdp_runtime::Shutdown;
use cdp_schemas::model::customer::{ConsentStatus, LegalBasis};
use cdp_schemas::model::profile::{ConsentState, ProfilePayload, ProfileSnapshot, TraitValue};
use cdp_schemas::{Envelope, Identifier, IdentifierKind, ProfileEvent, Sealed, Subject};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database")]
    Db(#[from] sqlx::Error),
    #[error("encoding a snapshot")]
    Encode(#[from] cdp_schemas::CodecError),
    #[error("producing snapshots")]
    Produce(#[from] cdp_runtime::kafka::producer::ProduceError),
}

/// Snapshots of many profiles: one query per table, each over all of `ids` (typed rows,
/// no JSON built by the database and parsed again here), in one repeatable-read
/// transaction so that every snapshot is of one committed state; profiles that no longer
/// exist are absent. Lists are ordered by their natural keys, byte-wise, whatever the
/// database's collation.
pub async fn snapshots(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, ProfileEvent>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let customers: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT profile_id, first_seen, last_seen FROM customers WHERE profile_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut out: HashMap<Uuid, ProfileSnapshot> = customers
        .into_iter()
        .map(|(profile_id, first_seen, last_seen)| {
            let snapshot = ProfileSnapshot {
                profile_id,
                first_seen,
                last_seen,
                identifiers: Vec::new(),
                traits: Vec::new(),
                consents: Vec::new(),
                interactions: 0,
                transactions: 0,
            };
            (profile_id, snapshot)
        })
        .collect();
    if out.is_empty() {
        return Ok(HashMap::new());
    }
    let identifiers: Vec<(Uuid, String, String, String)> = sqlx::query_as(
        "SELECT profile_id, kind, namespace, token FROM customer_identities WHERE profile_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    for (id, kind, namespace, token) in identifiers {
        let (Some(s), Some(kind)) = (out.get_mut(&id), IdentifierKind::from_symbol(&kind)) else {
            continue;
        };
        s.identifiers.push(Identifier {
            kind,
            namespace: (!namespace.is_empty()).then_some(namespace),
            token,
        });
    }
    type Trait = (
        Uuid,
        String,
        Option<String>,
        Option<Vec<u8>>,
        String,
        DateTime<Utc>,
    );
    let traits: Vec<Trait> = sqlx::query_as(
        "SELECT profile_id, trait, value, sealed, subject_id, asserted_at FROM customer_traits WHERE profile_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    for (id, name, value, sealed, subject_id, asserted_at) in traits {
        let Some(s) = out.get_mut(&id) else { continue };
        s.traits.push(TraitValue {
            name,
            // PII travels sealed, as its subject sealed it; only non-PII in plaintext.
            value: if sealed.is_some() { None } else { value },
            sealed: sealed.map(Sealed::from_bytes),
            subject_id,
            asserted_at,
        });
    }
    let consents: Vec<(Uuid, String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT profile_id, purpose, status, basis, changed_at FROM consents WHERE profile_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    for (id, purpose, status, basis, changed_at) in consents {
        let (Some(s), Some(status), Some(basis)) = (
            out.get_mut(&id),
            ConsentStatus::from_symbol(&status),
            LegalBasis::from_symbol(&basis),
        ) else {
            continue;
        };
        s.consents.push(ConsentState {
            purpose,
            status,
            basis,
            changed_at,
        });
    }
    type SetCount = fn(&mut ProfileSnapshot, i64);
    let counted: [(&str, SetCount); 2] = [
        ("interactions", |s, n| s.interactions = n),
        ("transactions", |s, n| s.transactions = n),
    ];
    for (table, set) in counted {
        let counts: Vec<(Uuid, i64)> = sqlx::query_as(&format!(
            "SELECT profile_id, count(*) FROM {table} WHERE profile_id = ANY($1) GROUP BY profile_id"
        ))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        for (id, n) in counts {
            if let Some(s) = out.get_mut(&id) {
                set(s, n);
            }
        }
    }
    tx.commit().await?;
    Ok(out
        .into_iter()
        .map(|(id, mut s)| {
            s.identifiers.sort_by(|a, b| {
                (a.kind.as_str(), &a.namespace, &a.token).cmp(&(
                    b.kind.as_str(),
                    &b.namespace,
                    &b.token,
                ))
            });
            s.traits.sort_by(|a, b| a.name.cmp(&b.name));
            s.consents.sort_by(|a, b| a.purpose.cmp(&b.purpose));
            (id, event_of(s))
        })
        .collect())
}

/// The event that publishes a snapshot.
fn event_of(snapshot: ProfileSnapshot) -> ProfileEvent {
    let subject_id = snapshot
        .traits
        .first()
        .map(|t| t.subject_id.clone())
        .unwrap_or_default();
    ProfileEvent {
        envelope: Envelope {
            event_id: Uuid::now_v7(),
            occurred_at: snapshot.last_seen,
            received_at: Utc::now(),
            source: "projector".to_owned(),
            subject: Subject {
                subject_id,
                identifiers: snapshot.identifiers.clone(),
            },
            partition_key: snapshot.profile_id.to_string(),
        },
        payload: ProfilePayload::Snapshot(snapshot),
    }
}

/// Outbox rows one relay pass reads at most (bounds its memory). Large, so that when the
/// relay lags (the outbox grows by one row per batch and changed profile) a pass coalesces
/// many batches' rows into one snapshot per profile: its cost follows the profiles that
/// changed, not the batches.
const ROWS_PER_PASS: i64 = 200_000;

/// The pause between passes: at least `RELAY_INTERVAL` (a profile changed by many batches in
/// a row is published about once per interval), and at least `RELAY_REST` times as long as
/// the last pass took, so passes occupy at most about a third of the time, whatever the
/// load: under heavy load they grow further apart and each coalesces more changes per
/// profile, instead of competing with the projection for the same cores (back to back, the
/// relay's snapshot SQL took 7.8 s of database time in a 10.6 s catch-up on two cores).
const RELAY_INTERVAL: Duration = Duration::from_millis(500);
const RELAY_REST: u32 = 2;

/// Profiles per snapshot query.
const SNAPSHOTS_PER_QUERY: usize = 2_000;

/// Publishes the snapshots of the profiles named by up to `limit` outbox rows; returns how
/// many rows it consumed. One relay at a time (a transaction-scoped advisory lock; another
/// relay finding it taken does nothing), so a profile's publications follow the order of its
/// changes: every snapshot is read after the rows that asked for it were committed.
pub async fn relay_once(
    pool: &PgPool,
    producer: &Producer,
    topic: &str,
    limit: i64,
) -> Result<usize, RelayError> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let (mine,): (bool,) = sqlx::query_as(
        "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.profile_outbox'))",
    )
    .fetch_one(&mut *tx)
    .await?;
    if !mine {
        return Ok(0);
    }
    let rows: Vec<(i64, Uuid, bool)> =
        sqlx::query_as("SELECT seq, profile_id, deleted FROM profile_outbox ORDER BY seq LIMIT $1")
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    // Coalesce: a profile named by several rows is published once, as its latest row says.
    let mut latest: BTreeMap<Uuid, bool> = BTreeMap::new();
    for (_, id, deleted) in &rows {
        latest.insert(*id, *deleted);
    }
    let pending: Vec<(Uuid, bool)> = latest.into_iter().collect();
    let live: Vec<Uuid> = pending
        .iter()
        .filter(|(_, d)| !d)
        .map(|(id, _)| *id)
        .collect();
    let read = started.elapsed();
    let mut snaps = HashMap::with_capacity(live.len());
    for chunk in live.chunks(SNAPSHOTS_PER_QUERY) {
        snaps.extend(snapshots(pool, chunk).await?);
    }
    let snapshotted = started.elapsed();
    let mut values: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(pending.len());
    for (id, _) in &pending {
        // Deleted or gone: a tombstone.
        let value = match snaps.remove(id) {
            Some(s) => Some(cdp_schemas::encode(&s)?),
            None => None,
        };
        values.push((id.to_string(), value));
    }
    let recs: Vec<OutgoingRecord<'_>> = values
        .iter()
        .map(|(k, v)| OutgoingRecord {
            topic,
            key: Some(k.as_bytes()),
            value: v.as_deref(),
            ..Default::default()
        })
        .collect();
    let encoded = started.elapsed();
    producer.send_all(&recs).await?;
    let produced = started.elapsed();
    // Exactly the rows read: a batch that took a lower number but committed later is
    // still waiting, and is published next time.
    let seqs: Vec<i64> = rows.iter().map(|(seq, _, _)| *seq).collect();
    sqlx::query("DELETE FROM profile_outbox WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::debug!(
        rows = rows.len(),
        profiles = pending.len(),
        outbox_ms = read.as_millis() as u64,
        snapshots_ms = (snapshotted - read).as_millis() as u64,
        encode_ms = (encoded - snapshotted).as_millis() as u64,
        produce_ms = (produced - encoded).as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "relay pass"
    );
    Ok(rows.len())
}

/// The longest the relay holds off while the projector catches up.
const RELAY_MAX_DEFER: Duration = Duration::from_secs(10);

/// Whether a relay pass is due: always while the projector keeps up; while it catches up
/// (the backlog will change the same profiles again, so their snapshots now would be
/// superseded before anyone needs them), only once the relay has held off for
/// `RELAY_MAX_DEFER`. `deferred` is when the relay started holding off.
fn pass_due(catching_up: bool, deferred: &mut Option<Instant>, now: Instant) -> bool {
    if catching_up {
        let since = *deferred.get_or_insert(now);
        if now.duration_since(since) < RELAY_MAX_DEFER {
            return false;
        }
    }
    *deferred = None;
    true
}

/// Relays until shutdown, pacing itself (see [`RELAY_REST`]), holding off while the
/// projector catches up (see [`RELAY_MAX_DEFER`]) and backing off on errors.
pub async fn relay(
    pool: PgPool,
    producer: std::sync::Arc<Producer>,
    topic: String,
    catch_up: CatchUp,
    shutdown: Shutdown,
) {
    let mut backoff = RELAY_INTERVAL;
    let mut deferred = None;
    while !shutdown.is_triggered() {
        let started = Instant::now();
        let pause = if !pass_due(catch_up.is_catching_up(), &mut deferred, started) {
            // Held off: look again at the usual interval.
            RELAY_INTERVAL
        } else {
            match relay_once(&pool, &producer, &topic, ROWS_PER_PASS).await {
                Ok(_) => {
                    backoff = RELAY_INTERVAL;
                    RELAY_INTERVAL.max(started.elapsed() * RELAY_REST)
                }
                Err(e) => {
                    tracing::warn!(error = %cdp_runtime::sink::Rejection::from_error("relay", &e).reason, "profile snapshot relay failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    backoff
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_keeping_up_passes_every_time() {
        let mut deferred = None;
        let now = Instant::now();
        assert!(pass_due(false, &mut deferred, now));
        assert!(pass_due(false, &mut deferred, now + RELAY_INTERVAL));
        assert_eq!(deferred, None);
    }

    #[test]
    fn catching_up_defers_passes_for_at_most_the_maximum() {
        let mut deferred = None;
        let t0 = Instant::now();
        assert!(!pass_due(true, &mut deferred, t0));
        assert!(!pass_due(true, &mut deferred, t0 + RELAY_MAX_DEFER / 2));
        assert!(!pass_due(
            true,
            &mut deferred,
            t0 + RELAY_MAX_DEFER - Duration::from_millis(1)
        ));
        // Held off long enough: a pass, and the next one is deferred again from then on.
        let t1 = t0 + RELAY_MAX_DEFER;
        assert!(pass_due(true, &mut deferred, t1));
        assert!(!pass_due(true, &mut deferred, t1 + RELAY_INTERVAL));
        assert!(pass_due(
            true,
            &mut deferred,
            t1 + RELAY_INTERVAL + RELAY_MAX_DEFER
        ));
    }

    #[test]
    fn caught_up_passes_at_once_and_forgets_the_deferral() {
        let mut deferred = None;
        let t0 = Instant::now();
        assert!(!pass_due(true, &mut deferred, t0));
        let t1 = t0 + RELAY_INTERVAL;
        assert!(pass_due(false, &mut deferred, t1));
        assert_eq!(deferred, None);
        // A new backlog is deferred from its own start.
        assert!(!pass_due(true, &mut deferred, t1 + RELAY_MAX_DEFER));
    }
}
