//! The profiles topic: a relay publishes snapshots of the profiles the outbox names (written
//! in the same transaction as the rows), then deletes those outbox rows. A crash between
//! producing and deleting republishes the same snapshot: harmless on a compacted topic.

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
struct TraitRecord {
    trait_name: String,
    value: Option<String>,
    sealed: Option<Vec<u8>>,
    subject_id: String,
    asserted_at: DateTime<Utc>,
}

/// The snapshot of one profile, or `None` when it no longer exists.
pub async fn snapshot(
    pool: &PgPool,
    profile_id: Uuid,
) -> Result<Option<ProfileEvent>, sqlx::Error> {
    let row: Option<(DateTime<Utc>, DateTime<Utc>)> =
        sqlx::query_as("SELECT first_seen, last_seen FROM customers WHERE profile_id = $1")
            .bind(profile_id)
            .fetch_optional(pool)
            .await?;
    let Some((first_seen, last_seen)) = row else {
        return Ok(None);
    };
    let ids: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT kind, namespace, value_hash FROM customer_identities WHERE profile_id = $1 ORDER BY kind, namespace, value_hash",
    )
    .bind(profile_id)
    .fetch_all(pool)
    .await?;
    let identifiers: Vec<Identifier> = ids
        .into_iter()
        .filter_map(|(k, n, h)| {
            IdentifierKind::from_symbol(&k).map(|kind| Identifier {
                kind,
                namespace: (!n.is_empty()).then_some(n),
                value_hash: h,
            })
        })
        .collect();
    let traits: Vec<TraitRecord> = sqlx::query_as(
        "SELECT trait AS trait_name, value, sealed, subject_id, asserted_at FROM customer_traits WHERE profile_id = $1 ORDER BY trait",
    )
    .bind(profile_id)
    .fetch_all(pool)
    .await?;
    let consents: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT purpose, status, basis, changed_at FROM consents WHERE profile_id = $1 ORDER BY purpose",
    )
    .bind(profile_id)
    .fetch_all(pool)
    .await?;
    let (interactions, transactions): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM interactions WHERE profile_id = $1), (SELECT count(*) FROM transactions WHERE profile_id = $1)",
    )
    .bind(profile_id)
    .fetch_one(pool)
    .await?;
    let subject_id = traits
        .first()
        .map(|t| t.subject_id.clone())
        .unwrap_or_default();
    let snapshot = ProfileSnapshot {
        profile_id,
        first_seen,
        last_seen,
        identifiers: identifiers.clone(),
        traits: traits
            .into_iter()
            .map(|t| TraitValue {
                // PII travels sealed, as its subject sealed it; only non-PII in plaintext.
                value: if t.sealed.is_some() { None } else { t.value },
                sealed: t.sealed.map(Sealed::from_bytes),
                name: t.trait_name,
                subject_id: t.subject_id,
                asserted_at: t.asserted_at,
            })
            .collect(),
        consents: consents
            .into_iter()
            .filter_map(|(purpose, status, basis, changed_at)| {
                Some(ConsentState {
                    purpose,
                    status: ConsentStatus::from_symbol(&status)?,
                    basis: LegalBasis::from_symbol(&basis)?,
                    changed_at,
                })
            })
            .collect(),
        interactions,
        transactions,
    };
    Ok(Some(ProfileEvent {
        envelope: Envelope {
            event_id: Uuid::now_v7(),
            occurred_at: last_seen,
            received_at: Utc::now(),
            source: "projector".to_owned(),
            subject: Subject {
                subject_id,
                identifiers,
            },
            partition_key: profile_id.to_string(),
        },
        payload: ProfilePayload::Snapshot(snapshot),
    }))
}

/// Publishes up to `limit` pending snapshots; returns how many.
pub async fn relay_once(
    pool: &PgPool,
    producer: &Producer,
    topic: &str,
    limit: i64,
) -> Result<usize, RelayError> {
    let mut tx = pool.begin().await?;
    let pending: Vec<(Uuid, bool)> = sqlx::query_as(
        "SELECT profile_id, deleted FROM profile_outbox ORDER BY profile_id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let mut values: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(pending.len());
    for (id, deleted) in &pending {
        let value = if *deleted {
            None
        } else {
            match snapshot(pool, *id).await? {
                Some(s) => Some(cdp_schemas::encode(&s)?),
                None => None,
            }
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
    let ids: Vec<Uuid> = pending.iter().map(|(id, _)| *id).collect();
    sqlx::query("DELETE FROM profile_outbox WHERE profile_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(pending.len())
}

/// Relays until shutdown, backing off on errors.
pub async fn relay(
    pool: PgPool,
    producer: std::sync::Arc<Producer>,
    topic: String,
    shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_triggered() {
        match relay_once(&pool, &producer, &topic, 500).await {
            Ok(n) if n > 0 => {
                backoff = Duration::from_millis(200);
                continue;
            }
            Ok(_) => {}
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
