//! Compliance events: `cdp.compliance.ComplianceEvent` (schemas/avro/compliance-event.avsc).
//! Keyed by request id. An erasure request names its identifiers as the envelope subject's
//! identifiers (vault tokens).

use std::collections::BTreeMap;

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::common::{Envelope, Identifier, Subject};
use crate::error::ContractError;
use crate::value::{self, avro_enum, AvroEnum, Fields};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComplianceEvent {
    pub envelope: Envelope,
    pub payload: CompliancePayload,
}

impl ComplianceEvent {
    /// An event of a request, keyed by the request id; `identifiers` are the identifiers a
    /// request names (tokens), empty for every other event.
    pub fn of_request(
        event_id: Uuid,
        source: &str,
        identifiers: Vec<Identifier>,
        payload: CompliancePayload,
    ) -> Self {
        let now = Utc::now();
        Self {
            envelope: Envelope {
                event_id,
                occurred_at: now,
                received_at: now,
                source: source.to_owned(),
                subject: Subject {
                    subject_id: identifiers
                        .first()
                        .map(|i| i.token.clone())
                        .unwrap_or_default(),
                    identifiers,
                },
                partition_key: payload.request_id().to_string(),
            },
            payload,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompliancePayload {
    ErasureRequested(ErasureRequested),
    ErasureCompleted(ErasureCompleted),
    ExportRequested(ExportRequested),
    ExportCompleted(ExportCompleted),
    ErasureScoped(ErasureScoped),
    ErasureApplied(ErasureApplied),
}

/// A request to erase a person: the identifiers it names are the envelope subject's
/// identifiers (vault tokens); who asked and why are kept out of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRequested {
    pub request_id: Uuid,
    pub profile_ids: Vec<Uuid>,
    pub suppress: bool,
    pub force: bool,
    pub due_at: DateTime<Utc>,
}

avro_enum! {
    pub enum ErasureOutcome {
        Erased = "ERASED",
        RefusedTooLarge = "REFUSED_TOO_LARGE",
        NothingFound = "NOTHING_FOUND",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureCompleted {
    pub request_id: Uuid,
    pub keys_destroyed: i32,
    pub rows_deleted: i64,
    pub tombstones_emitted: i64,
    pub outcome: ErasureOutcome,
    pub profiles: i32,
    pub tokens: i32,
    pub vault_rows_deleted: i64,
    pub suppressed: i64,
    pub refused_links: i64,
    /// Rows deleted per store (`service.table`).
    pub stores: BTreeMap<String, i64>,
    pub elapsed_ms: i64,
}

/// The cluster the processor resolved and shredded: every consumer service deletes what it
/// holds of it and answers with [`ErasureApplied`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureScoped {
    pub request_id: Uuid,
    pub tokens: Vec<String>,
    pub profile_ids: Vec<Uuid>,
}

/// One consumer service removed the cluster from its stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureApplied {
    pub request_id: Uuid,
    pub service: String,
    pub rows_deleted: i64,
    pub tombstones_emitted: i64,
    pub stores: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequested {
    pub request_id: Uuid,
    pub requested_by: String,
    pub format: ExportFormat,
}

avro_enum! {
    pub enum ExportFormat {
        Json = "JSON",
        Avro = "AVRO",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCompleted {
    pub request_id: Uuid,
    pub location: String,
    pub record_count: i64,
}

impl CompliancePayload {
    /// These events carry no PII fields.
    pub fn pii_mut(&mut self) -> Vec<(&'static str, &mut Option<crate::model::common::Sealed>)> {
        Vec::new()
    }

    pub(crate) const BRANCHES: usize = 6;

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::ErasureRequested(_) => "compliance.erasure_requested",
            Self::ErasureCompleted(_) => "compliance.erasure_completed",
            Self::ExportRequested(_) => "compliance.export_requested",
            Self::ExportCompleted(_) => "compliance.export_completed",
            Self::ErasureScoped(_) => "compliance.erasure_scoped",
            Self::ErasureApplied(_) => "compliance.erasure_applied",
        }
    }

    /// The request the event belongs to.
    pub fn request_id(&self) -> Uuid {
        match self {
            Self::ErasureRequested(p) => p.request_id,
            Self::ErasureCompleted(p) => p.request_id,
            Self::ExportRequested(p) => p.request_id,
            Self::ExportCompleted(p) => p.request_id,
            Self::ErasureScoped(p) => p.request_id,
            Self::ErasureApplied(p) => p.request_id,
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let (i, fields) = match self {
            Self::ErasureRequested(p) => (
                0,
                vec![
                    ("request_id", value::uuid(&p.request_id)),
                    ("profile_ids", value::uuid_array(&p.profile_ids)),
                    ("suppress", Value::Boolean(p.suppress)),
                    ("force", Value::Boolean(p.force)),
                    ("due_at", value::ts(&p.due_at)),
                ],
            ),
            Self::ErasureCompleted(p) => (
                1,
                vec![
                    ("request_id", value::uuid(&p.request_id)),
                    ("keys_destroyed", Value::Int(p.keys_destroyed)),
                    ("rows_deleted", Value::Long(p.rows_deleted)),
                    ("tombstones_emitted", Value::Long(p.tombstones_emitted)),
                    ("outcome", p.outcome.to_value()),
                    ("profiles", Value::Int(p.profiles)),
                    ("tokens", Value::Int(p.tokens)),
                    ("vault_rows_deleted", Value::Long(p.vault_rows_deleted)),
                    ("suppressed", Value::Long(p.suppressed)),
                    ("refused_links", Value::Long(p.refused_links)),
                    ("stores", value::long_map(&p.stores)),
                    ("elapsed_ms", Value::Long(p.elapsed_ms)),
                ],
            ),
            Self::ExportRequested(p) => (
                2,
                vec![
                    ("request_id", value::uuid(&p.request_id)),
                    ("requested_by", value::string(&p.requested_by)),
                    ("format", p.format.to_value()),
                ],
            ),
            Self::ExportCompleted(p) => (
                3,
                vec![
                    ("request_id", value::uuid(&p.request_id)),
                    ("location", value::string(&p.location)),
                    ("record_count", Value::Long(p.record_count)),
                ],
            ),
            Self::ErasureScoped(p) => (
                4,
                vec![
                    ("request_id", value::uuid(&p.request_id)),
                    ("tokens", value::string_array(&p.tokens)),
                    ("profile_ids", value::uuid_array(&p.profile_ids)),
                ],
            ),
            Self::ErasureApplied(p) => (
                5,
                vec![
                    ("request_id", value::uuid(&p.request_id)),
                    ("service", value::string(&p.service)),
                    ("rows_deleted", Value::Long(p.rows_deleted)),
                    ("tombstones_emitted", Value::Long(p.tombstones_emitted)),
                    ("stores", value::long_map(&p.stores)),
                ],
            ),
        };
        Value::Union(i, Box::new(value::record(fields)))
    }

    pub(crate) fn from_branch(i: usize, v: Value) -> Result<Self, ContractError> {
        Ok(match i {
            0 => {
                let mut f = Fields::new("ErasureRequested", v)?;
                Self::ErasureRequested(ErasureRequested {
                    request_id: f.uuid("request_id")?,
                    profile_ids: f.uuid_array("profile_ids")?,
                    suppress: f.bool("suppress")?,
                    force: f.bool("force")?,
                    due_at: f.ts("due_at")?,
                })
            }
            1 => {
                let mut f = Fields::new("ErasureCompleted", v)?;
                Self::ErasureCompleted(ErasureCompleted {
                    request_id: f.uuid("request_id")?,
                    keys_destroyed: f.int("keys_destroyed")?,
                    rows_deleted: f.long("rows_deleted")?,
                    tombstones_emitted: f.long("tombstones_emitted")?,
                    outcome: f.symbol("outcome")?,
                    profiles: f.int("profiles")?,
                    tokens: f.int("tokens")?,
                    vault_rows_deleted: f.long("vault_rows_deleted")?,
                    suppressed: f.long("suppressed")?,
                    refused_links: f.long("refused_links")?,
                    stores: f.long_map("stores")?,
                    elapsed_ms: f.long("elapsed_ms")?,
                })
            }
            2 => {
                let mut f = Fields::new("ExportRequested", v)?;
                Self::ExportRequested(ExportRequested {
                    request_id: f.uuid("request_id")?,
                    requested_by: f.string("requested_by")?,
                    format: f.symbol("format")?,
                })
            }
            3 => {
                let mut f = Fields::new("ExportCompleted", v)?;
                Self::ExportCompleted(ExportCompleted {
                    request_id: f.uuid("request_id")?,
                    location: f.string("location")?,
                    record_count: f.long("record_count")?,
                })
            }
            4 => {
                let mut f = Fields::new("ErasureScoped", v)?;
                Self::ErasureScoped(ErasureScoped {
                    request_id: f.uuid("request_id")?,
                    tokens: f.string_array("tokens")?,
                    profile_ids: f.uuid_array("profile_ids")?,
                })
            }
            _ => {
                let mut f = Fields::new("ErasureApplied", v)?;
                Self::ErasureApplied(ErasureApplied {
                    request_id: f.uuid("request_id")?,
                    service: f.string("service")?,
                    rows_deleted: f.long("rows_deleted")?,
                    tombstones_emitted: f.long("tombstones_emitted")?,
                    stores: f.long_map("stores")?,
                })
            }
        })
    }
}
