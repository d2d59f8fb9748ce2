//! Profile snapshots: `cdp.profile.ProfileEvent` (schemas/avro/profile-event.avsc), published
//! by the projector on the compacted profiles topic, keyed by profile id.

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::common::{Envelope, Identifier, Sealed};
use super::customer::{ConsentStatus, LegalBasis};
use crate::error::ContractError;
use crate::value::{self, AvroEnum, Fields};

/// Namespace of profile ids derived from subject ids.
pub const PROFILE_NAMESPACE: Uuid = Uuid::from_u128(0x7c1e_55a0_2b1d_4f8e_8a3c_9d4e_0f11_0002);

/// The profile a subject starts as, before identity resolution merges it into another:
/// UUIDv5 of the subject id. Every service derives it the same way.
pub fn profile_id_of(subject_id: &str) -> Uuid {
    Uuid::new_v5(&PROFILE_NAMESPACE, subject_id.as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileEvent {
    pub envelope: Envelope,
    pub payload: ProfilePayload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfilePayload {
    Snapshot(ProfileSnapshot),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSnapshot {
    pub profile_id: Uuid,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub identifiers: Vec<Identifier>,
    pub traits: Vec<TraitValue>,
    pub consents: Vec<ConsentState>,
    pub interactions: i64,
    pub transactions: i64,
}

/// One trait: non-PII in `value`, PII in `sealed` (as its subject sealed it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraitValue {
    pub name: String,
    pub value: Option<String>,
    pub sealed: Option<Sealed>,
    pub subject_id: String,
    pub asserted_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentState {
    pub purpose: String,
    pub status: ConsentStatus,
    pub basis: LegalBasis,
    pub changed_at: DateTime<Utc>,
}

impl ProfilePayload {
    pub(crate) const BRANCHES: usize = 1;

    pub fn event_type(&self) -> &'static str {
        "profile.snapshot"
    }

    /// Sealed trait values are PII.
    pub fn pii_mut(&mut self) -> Vec<(&'static str, &mut Option<Sealed>)> {
        match self {
            Self::Snapshot(s) => s
                .traits
                .iter_mut()
                .map(|t| ("sealed", &mut t.sealed))
                .collect(),
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let Self::Snapshot(s) = self;
        Value::Union(
            0,
            Box::new(value::record(vec![
                ("profile_id", value::uuid(&s.profile_id)),
                ("first_seen", value::ts(&s.first_seen)),
                ("last_seen", value::ts(&s.last_seen)),
                (
                    "identifiers",
                    Value::Array(s.identifiers.iter().map(Identifier::to_value).collect()),
                ),
                (
                    "traits",
                    Value::Array(
                        s.traits
                            .iter()
                            .map(|t| {
                                value::record(vec![
                                    ("name", value::string(&t.name)),
                                    ("value", value::opt_string(&t.value)),
                                    ("sealed", value::sealed(&t.sealed)),
                                    ("subject_id", value::string(&t.subject_id)),
                                    ("asserted_at", value::ts(&t.asserted_at)),
                                ])
                            })
                            .collect(),
                    ),
                ),
                (
                    "consents",
                    Value::Array(
                        s.consents
                            .iter()
                            .map(|c| {
                                value::record(vec![
                                    ("purpose", value::string(&c.purpose)),
                                    ("status", c.status.to_value()),
                                    ("basis", c.basis.to_value()),
                                    ("changed_at", value::ts(&c.changed_at)),
                                ])
                            })
                            .collect(),
                    ),
                ),
                ("interactions", Value::Long(s.interactions)),
                ("transactions", Value::Long(s.transactions)),
            ])),
        )
    }

    pub(crate) fn from_branch(_i: usize, v: Value) -> Result<Self, ContractError> {
        let mut f = Fields::new("ProfileSnapshot", v)?;
        Ok(Self::Snapshot(ProfileSnapshot {
            profile_id: f.uuid("profile_id")?,
            first_seen: f.ts("first_seen")?,
            last_seen: f.ts("last_seen")?,
            identifiers: f
                .array("identifiers")?
                .into_iter()
                .map(|v| Identifier::from_fields(Fields::new("Identifier", v)?))
                .collect::<Result<_, _>>()?,
            traits: f
                .array("traits")?
                .into_iter()
                .map(|v| {
                    let mut t = Fields::new("TraitValue", v)?;
                    Ok(TraitValue {
                        name: t.string("name")?,
                        value: t.opt_string("value")?,
                        sealed: t.sealed("sealed")?,
                        subject_id: t.string("subject_id")?,
                        asserted_at: t.ts("asserted_at")?,
                    })
                })
                .collect::<Result<_, ContractError>>()?,
            consents: f
                .array("consents")?
                .into_iter()
                .map(|v| {
                    let mut c = Fields::new("ConsentState", v)?;
                    Ok(ConsentState {
                        purpose: c.string("purpose")?,
                        status: c.symbol("status")?,
                        basis: c.symbol("basis")?,
                        changed_at: c.ts("changed_at")?,
                    })
                })
                .collect::<Result<_, ContractError>>()?,
            interactions: f.long("interactions")?,
            transactions: f.long("transactions")?,
        }))
    }
}
