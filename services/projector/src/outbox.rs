//! The profiles topic: a relay publishes snapshots of the profiles the outbox names (written
//! in the same transaction as the rows), then deletes those outbox rows. A crash between
//! producing and deleting republishes the same snapshot: harmless on a compacted topic.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
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

#[derive(sqlx::FromRow)]
struct SnapshotRow {
    profile_id: Uuid,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    identifiers: serde_json::Value,
    traits: serde_json::Value,
    consents: serde_json::Value,
    interactions: i64,
    transactions: i64,
}

fn s(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn t(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|x| DateTime::parse_from_rfc3339(x).ok())
        .map(|x| x.with_timezone(&Utc))
        .unwrap_or_default()
}

fn items(v: &serde_json::Value) -> &[serde_json::Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Snapshots of many profiles in one query; profiles that no longer exist are absent.
pub async fn snapshots(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, ProfileEvent>, sqlx::Error> {
    let rows: Vec<SnapshotRow> = sqlx::query_as(
        "SELECT c.profile_id, c.first_seen, c.last_seen,
           (SELECT coalesce(jsonb_agg(jsonb_build_array(kind, namespace, value_hash) ORDER BY kind, namespace, value_hash), '[]')
              FROM customer_identities i WHERE i.profile_id = c.profile_id) AS identifiers,
           (SELECT coalesce(jsonb_agg(jsonb_build_array(trait, value, encode(sealed, 'hex'), subject_id, asserted_at) ORDER BY trait), '[]')
              FROM customer_traits t WHERE t.profile_id = c.profile_id) AS traits,
           (SELECT coalesce(jsonb_agg(jsonb_build_array(purpose, status, basis, changed_at) ORDER BY purpose), '[]')
              FROM consents k WHERE k.profile_id = c.profile_id) AS consents,
           (SELECT count(*) FROM interactions x WHERE x.profile_id = c.profile_id) AS interactions,
           (SELECT count(*) FROM transactions x WHERE x.profile_id = c.profile_id) AS transactions
         FROM customers c WHERE c.profile_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let identifiers: Vec<Identifier> = items(&r.identifiers)
            .iter()
            .filter_map(|i| {
                let ns = s(&i[1]);
                IdentifierKind::from_symbol(&s(&i[0])).map(|kind| Identifier {
                    kind,
                    namespace: (!ns.is_empty()).then_some(ns),
                    value_hash: s(&i[2]),
                })
            })
            .collect();
        let traits: Vec<TraitValue> = items(&r.traits)
            .iter()
            .map(|x| {
                let sealed = x[2]
                    .as_str()
                    .and_then(|h| hex::decode(h).ok())
                    .map(Sealed::from_bytes);
                TraitValue {
                    name: s(&x[0]),
                    // PII travels sealed, as its subject sealed it; only non-PII in plaintext.
                    value: if sealed.is_some() {
                        None
                    } else {
                        x[1].as_str().map(str::to_owned)
                    },
                    sealed,
                    subject_id: s(&x[3]),
                    asserted_at: t(&x[4]),
                }
            })
            .collect();
        let consents: Vec<ConsentState> = items(&r.consents)
            .iter()
            .filter_map(|x| {
                Some(ConsentState {
                    purpose: s(&x[0]),
                    status: ConsentStatus::from_symbol(x[1].as_str()?)?,
                    basis: LegalBasis::from_symbol(x[2].as_str()?)?,
                    changed_at: t(&x[3]),
                })
            })
            .collect();
        let subject_id = traits
            .first()
            .map(|t| t.subject_id.clone())
            .unwrap_or_default();
        let event = ProfileEvent {
            envelope: Envelope {
                event_id: Uuid::now_v7(),
                occurred_at: r.last_seen,
                received_at: Utc::now(),
                source: "projector".to_owned(),
                subject: Subject {
                    subject_id,
                    identifiers: identifiers.clone(),
                },
                partition_key: r.profile_id.to_string(),
            },
            payload: ProfilePayload::Snapshot(ProfileSnapshot {
                profile_id: r.profile_id,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                identifiers,
                traits,
                consents,
                interactions: r.interactions,
                transactions: r.transactions,
            }),
        };
        out.insert(r.profile_id, event);
    }
    Ok(out)
}

/// Outbox rows one relay pass reads. Large, so that when the relay lags (the outbox grows
/// by one row per batch and changed profile) a pass coalesces many batches' rows into one
/// snapshot per profile: its cost follows the profiles that changed, not the batches.
const ROWS_PER_PASS: i64 = 20_000;

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
    let mut snaps = HashMap::with_capacity(live.len());
    for chunk in live.chunks(SNAPSHOTS_PER_QUERY) {
        snaps.extend(snapshots(pool, chunk).await?);
    }
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
    producer.send_all(&recs).await?;
    // Exactly the rows read: a batch that took a lower number but committed later is
    // still waiting, and is published next time.
    let seqs: Vec<i64> = rows.iter().map(|(seq, _, _)| *seq).collect();
    sqlx::query("DELETE FROM profile_outbox WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len())
}

/// Relays until shutdown, backing off on errors.
pub async fn relay(
    pool: PgPool,
    producer: std::sync::Arc<Producer>,
    topic: String,
    shutdown: Shutdown,
) {
    // A profile changed by many batches in a row is published once per interval, not once
    // per batch: the outbox coalesces, the relay drains it every `interval`.
    let interval = Duration::from_millis(500);
    let mut backoff = interval;
    while !shutdown.is_triggered() {
        match relay_once(&pool, &producer, &topic, ROWS_PER_PASS).await {
            Ok(n) if n as i64 == ROWS_PER_PASS => continue,
            Ok(_) => backoff = interval,
            Err(e) => {
                tracing::warn!(error = %cdp_runtime::sink::Rejection::from_error("relay", &e).reason, "profile snapshot relay failed; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => {}
        }
    }
}
