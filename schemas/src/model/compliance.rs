//! Compliance events: `cdp.compliance.ComplianceEvent` (schemas/avro/compliance-event.avsc).
//! The envelope's subject is the data subject of the request.

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::common::Envelope;
use crate::error::ContractError;
use crate::value::{self, avro_enum, AvroEnum, Fields};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComplianceEvent {
    pub envelope: Envelope,
    pub payload: CompliancePayload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompliancePayload {
    ErasureRequested(ErasureRequested),
    ErasureCompleted(ErasureCompleted),
    ExportRequested(ExportRequested),
    ExportCompleted(ExportCompleted),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRequested {
    pub request_id: Uuid,
    pub requested_by: String,
    pub reason: Option<String>,
    pub due_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureCompleted {
    pub request_id: Uuid,
    pub keys_destroyed: i32,
    pub rows_deleted: i64,
    pub tombstones_emitted: i64,
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

    pub(crate) const BRANCHES: usize = 4;

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::ErasureRequested(_) => "compliance.erasure_requested",
            Self::ErasureCompleted(_) => "compliance.erasure_completed",
            Self::ExportRequested(_) => "compliance.export_requested",
            Self::ExportCompleted(_) => "compliance.export_completed",
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let (i, fields) = match self {
            Self::ErasureRequested(p) => (
                0,
                vec![
                    ("request_id", value::uuid(&p.request_id)),
                    ("requested_by", value::string(&p.requested_by)),
                    ("reason", value::opt_string(&p.reason)),
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
        };
        Value::Union(i, Box::new(value::record(fields)))
    }

    pub(crate) fn from_branch(i: usize, v: Value) -> Result<Self, ContractError> {
        Ok(match i {
            0 => {
                let mut f = Fields::new("ErasureRequested", v)?;
                Self::ErasureRequested(ErasureRequested {
                    request_id: f.uuid("request_id")?,
                    requested_by: f.string("requested_by")?,
                    reason: f.opt_string("reason")?,
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
            _ => {
                let mut f = Fields::new("ExportCompleted", v)?;
                Self::ExportCompleted(ExportCompleted {
                    request_id: f.uuid("request_id")?,
                    location: f.string("location")?,
                    record_count: f.long("record_count")?,
                })
            }
        })
    }
}
