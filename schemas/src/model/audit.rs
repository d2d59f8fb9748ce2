//! The audit trail: `cdp.audit.AuditEvent` (schemas/avro/audit-event.avsc), on the audit
//! topic keyed by request id. The erasure processor writes one `ErasureAudited` per request
//! when it reaches a final state. Who asked and why are sealed with the data key of the
//! audit subject `request:<request id>` ([`audit_subject`]); nothing in it names the person.

use std::collections::BTreeMap;

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::common::{Envelope, Sealed, Subject};
use crate::error::ContractError;
use crate::value::{self, AvroEnum, Fields};

/// The key-store subject whose data key seals a request's audit record.
pub fn audit_subject(request_id: Uuid) -> String {
    format!("request:{request_id}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub envelope: Envelope,
    pub payload: AuditPayload,
}

impl AuditEvent {
    /// An audit event of a request, keyed (and its PII sealed) by the request.
    pub fn of_request(event_id: Uuid, source: &str, payload: AuditPayload) -> Self {
        let now = Utc::now();
        let request_id = payload.request_id();
        Self {
            envelope: Envelope {
                event_id,
                occurred_at: now,
                received_at: now,
                source: source.to_owned(),
                subject: Subject {
                    subject_id: audit_subject(request_id),
                    identifiers: Vec::new(),
                },
                partition_key: request_id.to_string(),
            },
            payload,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditPayload {
    ErasureAudited(ErasureAudited),
}

/// The outcomes of an erasure are the compliance topic's (`AuditedOutcome` in the schema
/// has the same symbols).
pub use super::compliance::ErasureOutcome as AuditedOutcome;

/// One erasure request, as the compliance team files it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureAudited {
    pub request_id: Uuid,
    pub requested_by: Option<Sealed>,
    pub reason: Option<Sealed>,
    pub requested_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
    pub outcome: AuditedOutcome,
    pub suppress: bool,
    pub force: bool,
    pub profiles: i32,
    pub tokens: i32,
    pub refused_links: i64,
    pub keys_destroyed: i64,
    pub vault_rows_deleted: i64,
    pub suppressed: i64,
    pub rows_deleted: i64,
    pub tombstones_emitted: i64,
    /// Rows deleted per store (`service.table`).
    pub stores: BTreeMap<String, i64>,
    /// The services that answered.
    pub services: Vec<String>,
    pub elapsed_ms: i64,
}

impl AuditPayload {
    pub(crate) const BRANCHES: usize = 1;

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::ErasureAudited(_) => "audit.erasure",
        }
    }

    pub fn request_id(&self) -> Uuid {
        match self {
            Self::ErasureAudited(a) => a.request_id,
        }
    }

    /// Who asked and why.
    pub fn pii_mut(&mut self) -> Vec<(&'static str, &mut Option<Sealed>)> {
        match self {
            Self::ErasureAudited(a) => vec![
                ("requested_by", &mut a.requested_by),
                ("reason", &mut a.reason),
            ],
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let Self::ErasureAudited(a) = self;
        Value::Union(
            0,
            Box::new(value::record(vec![
                ("request_id", value::uuid(&a.request_id)),
                ("requested_by", value::sealed(&a.requested_by)),
                ("reason", value::sealed(&a.reason)),
                ("requested_at", value::ts(&a.requested_at)),
                ("due_at", value::ts(&a.due_at)),
                ("completed_at", value::ts(&a.completed_at)),
                ("outcome", a.outcome.to_value()),
                ("suppress", Value::Boolean(a.suppress)),
                ("force", Value::Boolean(a.force)),
                ("profiles", Value::Int(a.profiles)),
                ("tokens", Value::Int(a.tokens)),
                ("refused_links", Value::Long(a.refused_links)),
                ("keys_destroyed", Value::Long(a.keys_destroyed)),
                ("vault_rows_deleted", Value::Long(a.vault_rows_deleted)),
                ("suppressed", Value::Long(a.suppressed)),
                ("rows_deleted", Value::Long(a.rows_deleted)),
                ("tombstones_emitted", Value::Long(a.tombstones_emitted)),
                ("stores", value::long_map(&a.stores)),
                ("services", value::string_array(&a.services)),
                ("elapsed_ms", Value::Long(a.elapsed_ms)),
            ])),
        )
    }

    pub(crate) fn from_branch(_i: usize, v: Value) -> Result<Self, ContractError> {
        let mut f = Fields::new("ErasureAudited", v)?;
        Ok(Self::ErasureAudited(ErasureAudited {
            request_id: f.uuid("request_id")?,
            requested_by: f.sealed("requested_by")?,
            reason: f.sealed("reason")?,
            requested_at: f.ts("requested_at")?,
            due_at: f.ts("due_at")?,
            completed_at: f.ts("completed_at")?,
            outcome: f.symbol("outcome")?,
            suppress: f.bool("suppress")?,
            force: f.bool("force")?,
            profiles: f.int("profiles")?,
            tokens: f.int("tokens")?,
            refused_links: f.long("refused_links")?,
            keys_destroyed: f.long("keys_destroyed")?,
            vault_rows_deleted: f.long("vault_rows_deleted")?,
            suppressed: f.long("suppressed")?,
            rows_deleted: f.long("rows_deleted")?,
            tombstones_emitted: f.long("tombstones_emitted")?,
            stores: f.long_map("stores")?,
            services: f.string_array("services")?,
            elapsed_ms: f.long("elapsed_ms")?,
        }))
    }
}
