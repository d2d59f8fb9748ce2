//! The processor's state machine, one step per compliance event, each in the batch's
//! transaction with the consumer offsets (so a crash resumes where the log says and a
//! repeated event is a no-op):
//!
//! - `ErasureRequested`: resolve the cluster; over the size limit without force, refuse
//!   (nothing changes); else shred it in the key store (suppression entries, erasure
//!   ledger, keys destroyed, vault rows deleted), forget the named digests, and publish
//!   `ErasureScoped` for the services. A cluster nobody knew completes at once.
//! - `ErasureApplied`: record the service's answer; when every awaited service answered,
//!   publish `ErasureCompleted` with the counts per store and the elapsed time.

use std::collections::BTreeSet;
use std::sync::Arc;

use cdp_keystore::crypto::field_aad;
use cdp_keystore::erasure::{self, Shred, SuppressionKey};
use cdp_keystore::identifiers::Digest;
use cdp_keystore::KeyStore;
use cdp_runtime::outbox::{self, Outbox, Record};
use cdp_runtime::pg::{classify, Decoded, PgHandler, Rejected};
use cdp_runtime::sink::{Rejection, SinkError};
use cdp_runtime::RawRecord;
use cdp_schemas::model::audit::{audit_subject, AuditEvent, AuditPayload, ErasureAudited};
use cdp_schemas::model::compliance::{
    ErasureApplied, ErasureCompleted, ErasureOutcome, ErasureRequested, ErasureScoped,
};
use cdp_schemas::{ComplianceEvent, CompliancePayload};
use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{cluster, read_status, Status};

/// The processor's outbox tables.
pub const OUTBOX: Outbox = Outbox {
    records: "erasure_outbox",
    state: "erasure_outbox_relay",
    gate: None,
};

/// Namespace of the processor's event ids (UUIDv5 of request and step: a retried batch
/// writes the same events).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x2b7e_0c4d_5a19_4f3b_8e62_d1a0_c7f4_0701);

pub struct ErasureHandler {
    pub compliance_topic: String,
    pub audit_topic: String,
    /// Seals who asked and why in the audit record.
    pub keys: Arc<KeyStore>,
    pub identity_schema: String,
    pub suppression: SuppressionKey,
    /// The services whose answers complete a request.
    pub services: Vec<String>,
    /// Largest cluster (profiles) erased without force.
    pub max_profiles: usize,
}

fn fatal(e: impl std::error::Error + Send + Sync + 'static) -> SinkError {
    SinkError::Fatal(Box::new(e))
}

/// An event of the processor for its outbox.
fn record(topic: &str, step: &str, payload: CompliancePayload) -> Result<Record, SinkError> {
    let id = Uuid::new_v5(
        &EVENT_NAMESPACE,
        format!("{}:{step}", payload.request_id()).as_bytes(),
    );
    let event = ComplianceEvent::of_request(id, "cdp-erasure", Vec::new(), payload);
    Ok(Record::keyed(
        topic,
        &event.envelope.partition_key,
        cdp_schemas::encode(&event).map_err(fatal)?,
    ))
}

/// `ErasureScoped` of a request: the same event (same id) whenever it is published.
fn scoped_record(topic: &str, scoped: ErasureScoped) -> Result<Record, SinkError> {
    record(topic, "scoped", CompliancePayload::ErasureScoped(scoped))
}

type RequestRow = (String, Option<Vec<Vec<u8>>>);

impl ErasureHandler {
    async fn requested(
        &self,
        tx: &mut PgConnection,
        event: &ComplianceEvent,
        r: &ErasureRequested,
        out: &mut Vec<Record>,
    ) -> Result<(), SinkError> {
        // A request filed elsewhere (straight to the topic) gets its row here.
        sqlx::query(
            "INSERT INTO erasure_requests
                 (request_id, state, requested_by, suppress, force, requested_at, due_at)
             VALUES ($1, 'requested', $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(r.request_id)
        .bind(format!("log:{}", event.envelope.source))
        .bind(r.suppress)
        .bind(r.force)
        .bind(event.envelope.occurred_at)
        .bind(r.due_at)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let (state, named): RequestRow = sqlx::query_as(
            "SELECT state, named FROM erasure_requests WHERE request_id = $1 FOR UPDATE",
        )
        .bind(r.request_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        if state != "requested" {
            tracing::info!(request_id = %r.request_id, state, "erasure request already handled");
            return Ok(());
        }
        let named: Vec<Digest> = named
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.try_into().ok())
            .collect();
        // Identifiers the vault tokenized after the request was filed are part of it.
        let keys: Vec<&[u8]> = named.iter().map(|d| d.as_slice()).collect();
        let mut tokens: Vec<String> = sqlx::query_scalar(
            "SELECT token FROM identifier_vault WHERE digest = ANY($1::bytea[])",
        )
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tokens.extend(
            event
                .envelope
                .subject
                .identifiers
                .iter()
                .map(|i| i.token.clone()),
        );
        tokens.sort_unstable();
        tokens.dedup();
        let cluster = cluster::resolve(tx, &self.identity_schema, &tokens, &r.profile_ids)
            .await
            .map_err(classify)?;
        let profiles = cluster.profiles.len();
        if profiles > self.max_profiles && !r.force {
            tracing::warn!(
                request_id = %r.request_id,
                profiles,
                limit = self.max_profiles,
                "erasure refused: the cluster is larger than the limit and the request has no force"
            );
            sqlx::query(
                "UPDATE erasure_requests SET state = 'refused', outcome = 'REFUSED_TOO_LARGE',
                        named = NULL, profiles = $2, tokens = $3, refused_links = $4,
                        completed_at = now()
                  WHERE request_id = $1",
            )
            .bind(r.request_id)
            .bind(profiles as i32)
            .bind(cluster.tokens.len() as i32)
            .bind(cluster.refused_links)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            return self.finish(tx, r.request_id, out).await;
        }
        let all: Vec<String> = cluster.tokens.iter().cloned().collect();
        let profile_ids: Vec<Uuid> = cluster.profiles.iter().copied().collect();
        let shredded = erasure::shred(
            tx,
            &self.suppression,
            &Shred {
                tokens: &all,
                named: &named,
                suppress: r.suppress,
                profiles: &profile_ids,
            },
        )
        .await
        .map_err(keystore_error)?;
        let nothing = cluster.tokens.is_empty() && r.profile_ids.is_empty();
        let awaiting: Vec<String> = if nothing {
            Vec::new()
        } else {
            self.services.clone()
        };
        sqlx::query(
            "UPDATE erasure_requests SET state = 'scoped', named = NULL, scoped_at = now(),
                    asked_at = now(),
                    profiles = $2, tokens = $3, refused_links = $4, keys_destroyed = $5,
                    vault_rows = $6, suppressed = $7, awaiting = $8, scope_tokens = $9,
                    scope_profiles = $10
              WHERE request_id = $1",
        )
        .bind(r.request_id)
        .bind(profiles as i32)
        .bind(cluster.tokens.len() as i32)
        .bind(cluster.refused_links)
        .bind(shredded.keys_destroyed as i64)
        .bind(shredded.vault_rows as i64)
        .bind(shredded.suppressed as i64)
        .bind(&awaiting)
        .bind(&all)
        .bind(&profile_ids)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tracing::info!(
            request_id = %r.request_id,
            profiles,
            tokens = cluster.tokens.len(),
            keys_destroyed = shredded.keys_destroyed,
            vault_rows = shredded.vault_rows,
            "erasure scoped and shredded"
        );
        if awaiting.is_empty() {
            return self.complete(tx, r.request_id, out).await;
        }
        out.push(scoped_record(
            &self.compliance_topic,
            ErasureScoped {
                request_id: r.request_id,
                tokens: all,
                profile_ids,
            },
        )?);
        Ok(())
    }

    async fn applied(
        &self,
        tx: &mut PgConnection,
        a: &ErasureApplied,
        out: &mut Vec<Record>,
    ) -> Result<(), SinkError> {
        let stores = serde_json::to_value(&a.stores).map_err(fatal)?;
        // The first answer of a service counts (a rebuilt projector generation answers
        // again, having found nothing).
        sqlx::query(
            "INSERT INTO erasure_acks (request_id, service, rows_deleted, tombstones, stores)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(a.request_id)
        .bind(&a.service)
        .bind(a.rows_deleted)
        .bind(a.tombstones_emitted)
        .bind(stores)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let open: Option<(Vec<String>,)> = sqlx::query_as(
            "SELECT awaiting FROM erasure_requests WHERE request_id = $1 AND state = 'scoped' FOR UPDATE",
        )
        .bind(a.request_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let Some((awaiting,)) = open else {
            return Ok(());
        };
        let acked: BTreeSet<String> =
            sqlx::query_scalar("SELECT service FROM erasure_acks WHERE request_id = $1")
                .bind(a.request_id)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?
                .into_iter()
                .collect();
        if awaiting.iter().all(|s| acked.contains(s)) {
            self.complete(tx, a.request_id, out).await?;
        }
        Ok(())
    }

    /// Marks a scoped request completed and publishes `ErasureCompleted` with its counts.
    async fn complete(
        &self,
        tx: &mut PgConnection,
        request_id: Uuid,
        out: &mut Vec<Record>,
    ) -> Result<(), SinkError> {
        sqlx::query(
            "UPDATE erasure_requests SET state = 'completed', completed_at = now(),
                    outcome = CASE WHEN tokens = 0 AND profiles = 0 THEN 'NOTHING_FOUND' ELSE 'ERASED' END
              WHERE request_id = $1",
        )
        .bind(request_id)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        self.finish(tx, request_id, out).await
    }

    /// Publishes `ErasureCompleted` and the audit record of a request its transaction just
    /// put in a final state (completed or refused), with the counts its row and answers hold.
    async fn finish(
        &self,
        tx: &mut PgConnection,
        request_id: Uuid,
        out: &mut Vec<Record>,
    ) -> Result<(), SinkError> {
        let status = final_status(tx, request_id).await?;
        let (rows, tombstones) = status.totals();
        let elapsed = elapsed(&status);
        tracing::info!(
            %request_id,
            state = status.state,
            rows,
            tombstones,
            elapsed_ms = elapsed,
            "erasure request decided"
        );
        out.push(record(
            &self.compliance_topic,
            "completed",
            CompliancePayload::ErasureCompleted(ErasureCompleted {
                request_id,
                keys_destroyed: status.keys_destroyed.unwrap_or_default() as i32,
                rows_deleted: rows,
                tombstones_emitted: tombstones,
                outcome: outcome(&status),
                profiles: status.profiles.unwrap_or_default(),
                tokens: status.tokens.unwrap_or_default(),
                vault_rows_deleted: status.vault_rows.unwrap_or_default(),
                suppressed: status.suppressed.unwrap_or_default(),
                refused_links: status.refused_links.unwrap_or_default(),
                stores: status.stores(),
                elapsed_ms: elapsed,
            }),
        )?);
        out.push(self.audit(&status).await?);
        Ok(())
    }

    /// The audit record of a request in its final state, who asked and why sealed with the
    /// request's audit key.
    async fn audit(&self, status: &Status) -> Result<Record, SinkError> {
        let request_id = status.request_id;
        let subject = audit_subject(request_id);
        let key = self
            .keys
            .current_keys(&[subject.as_str()])
            .await
            .map_err(keystore_error)?
            .remove(&subject)
            .ok_or_else(|| fatal(AuditKeyGone(request_id)))?;
        let seal = |field: &str, plaintext: &str| {
            key.seal(
                self.keys.rng(),
                &field_aad(&subject, field),
                plaintext.as_bytes(),
            )
            .map_err(fatal)
        };
        let (rows, tombstones) = status.totals();
        let audited = ErasureAudited {
            request_id,
            requested_by: Some(seal("requested_by", &status.requested_by)?),
            reason: status
                .reason
                .as_deref()
                .map(|r| seal("reason", r))
                .transpose()?,
            requested_at: status.requested_at,
            due_at: status.due_at,
            completed_at: status.completed_at.unwrap_or_else(Utc::now),
            outcome: outcome(status),
            suppress: status.suppress,
            force: status.force,
            profiles: status.profiles.unwrap_or_default(),
            tokens: status.tokens.unwrap_or_default(),
            refused_links: status.refused_links.unwrap_or_default(),
            keys_destroyed: status.keys_destroyed.unwrap_or_default(),
            vault_rows_deleted: status.vault_rows.unwrap_or_default(),
            suppressed: status.suppressed.unwrap_or_default(),
            rows_deleted: rows,
            tombstones_emitted: tombstones,
            stores: status.stores(),
            services: status.answers.iter().map(|a| a.service.clone()).collect(),
            elapsed_ms: elapsed(status),
        };
        let event = AuditEvent::of_request(
            Uuid::new_v5(&EVENT_NAMESPACE, format!("{request_id}:audit").as_bytes()),
            "cdp-erasure",
            AuditPayload::ErasureAudited(audited),
        );
        Ok(Record::keyed(
            &self.audit_topic,
            &event.envelope.partition_key,
            cdp_schemas::encode(&event).map_err(fatal)?,
        ))
    }
}

/// A request in its final state, read in the transaction that put it there.
async fn final_status(tx: &mut PgConnection, request_id: Uuid) -> Result<Status, SinkError> {
    read_status(tx, Some(request_id), 1)
        .await
        .map_err(classify)?
        .pop()
        .ok_or_else(|| fatal(crate::ErasureError::NoRequest(request_id)))
}

fn outcome(status: &Status) -> ErasureOutcome {
    match status.outcome.as_deref() {
        Some("REFUSED_TOO_LARGE") => ErasureOutcome::RefusedTooLarge,
        Some("NOTHING_FOUND") => ErasureOutcome::NothingFound,
        _ => ErasureOutcome::Erased,
    }
}

/// Milliseconds from the request to its final state.
fn elapsed(status: &Status) -> i64 {
    let end = status.completed_at.unwrap_or_else(Utc::now);
    (end - status.requested_at).num_milliseconds().max(0)
}

/// The audit key of a request was destroyed before its audit record was written.
#[derive(Debug, thiserror::Error)]
#[error("the audit key of erasure request {0} is destroyed")]
struct AuditKeyGone(Uuid);

fn keystore_error(e: cdp_keystore::KeyStoreError) -> SinkError {
    match e {
        cdp_keystore::KeyStoreError::Db(e) => classify(e),
        other => fatal(other),
    }
}

/// A scoped request: id, tokens, profiles, awaited services.
type WaitingRow = (Uuid, Vec<String>, Vec<Uuid>, Vec<String>);

/// Publishes `ErasureScoped` again for every request still waiting for an answer `after`
/// its services were last asked (a service whose consumer position moved past the event,
/// a projector generation retired before it read it): the event is the same, deleting finds
/// what is left, and an answer counts once. Returns how many requests were asked again.
pub(crate) async fn ask_again(
    pool: &sqlx::PgPool,
    compliance_topic: &str,
    after: std::time::Duration,
) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    hold_outbox(&mut tx).await?;
    let waiting: Vec<WaitingRow> = sqlx::query_as(
        "SELECT request_id, scope_tokens, scope_profiles, awaiting FROM erasure_requests
          WHERE state = 'scoped' AND coalesce(asked_at, scoped_at) < now() - $1
          ORDER BY scoped_at LIMIT 100 FOR UPDATE SKIP LOCKED",
    )
    .bind(after)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(waiting.len());
    for (request_id, tokens, profile_ids, awaiting) in waiting {
        let answered: Vec<String> =
            sqlx::query_scalar("SELECT service FROM erasure_acks WHERE request_id = $1")
                .bind(request_id)
                .fetch_all(&mut *tx)
                .await?;
        let missing: Vec<&String> = awaiting.iter().filter(|s| !answered.contains(s)).collect();
        tracing::warn!(
            %request_id,
            ?missing,
            "an erasure request is still waiting for answers: asking the services again"
        );
        sqlx::query("UPDATE erasure_requests SET asked_at = now() WHERE request_id = $1")
            .bind(request_id)
            .execute(&mut *tx)
            .await?;
        match scoped_record(
            compliance_topic,
            ErasureScoped {
                request_id,
                tokens,
                profile_ids,
            },
        ) {
            Ok(r) => out.push(r),
            Err(e) => tracing::error!(%request_id, error = %e, "cannot encode ErasureScoped"),
        }
    }
    outbox::push(&mut tx, OUTBOX, &out).await?;
    tx.commit().await?;
    Ok(out.len())
}

/// Serializes the outbox's writers (processor replicas and request filing) until commit,
/// so its `seq` follows commit order as the relay requires.
pub(crate) async fn hold_outbox(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.erasure_outbox'))")
        .execute(tx)
        .await?;
    Ok(())
}

impl PgHandler for ErasureHandler {
    type Event = ComplianceEvent;

    fn decode(&self, record: &RawRecord) -> Result<ComplianceEvent, Rejection> {
        let value = record
            .value
            .as_deref()
            .ok_or_else(|| Rejection::new("empty", "a compliance record without a value"))?;
        cdp_schemas::decode(value).map_err(|e| Rejection::from_error(e.kind(), &e))
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        batch: &[Decoded<'_, ComplianceEvent>],
    ) -> Result<Vec<Rejected>, SinkError> {
        let mut out = Vec::new();
        for d in batch {
            match &d.event.payload {
                CompliancePayload::ErasureRequested(r) => {
                    self.requested(tx, d.event, r, &mut out).await?
                }
                CompliancePayload::ErasureApplied(a) => self.applied(tx, a, &mut out).await?,
                _ => {}
            }
        }
        if !out.is_empty() {
            hold_outbox(tx).await.map_err(classify)?;
            outbox::push(tx, OUTBOX, &out).await.map_err(classify)?;
        }
        Ok(Vec::new())
    }
}
