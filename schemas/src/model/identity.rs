//! Identity events: `cdp.identity.IdentityEvent` (schemas/avro/identity-event.avsc).

use apache_avro::types::Value;
use uuid::Uuid;

use super::common::{Envelope, Identifier};
use crate::error::ContractError;
use crate::value::{self, Fields};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityEvent {
    pub envelope: Envelope,
    pub payload: IdentityPayload,
}

impl IdentityEvent {
    /// The identifier tokens the event names: both ends of a link. (Merges and splits name
    /// profiles, not identifiers; the envelope names the record's key.)
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        let link = match &self.payload {
            IdentityPayload::IdentifiersLinked(l) => {
                vec![l.from.token.as_str(), l.to.token.as_str()]
            }
            _ => Vec::new(),
        };
        link.into_iter()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPayload {
    IdentifiersLinked(IdentifiersLinked),
    ProfilesMerged(ProfilesMerged),
    ProfileSplit(ProfileSplit),
}

/// Two identifiers were linked into one profile by an event that carried both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifiersLinked {
    pub link_id: Uuid,
    pub profile_id: Uuid,
    pub from: Identifier,
    pub to: Identifier,
    pub cause_event_id: Uuid,
}

/// Two profiles became one; rows of the loser now belong to the winner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfilesMerged {
    pub winner_profile_id: Uuid,
    pub loser_profile_id: Uuid,
    pub link_id: Uuid,
    pub cause_event_id: Uuid,
}

/// Subjects left a profile and now make up another (since schema version 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSplit {
    pub from_profile_id: Uuid,
    pub to_profile_id: Uuid,
    /// The moved subjects' own profile ids.
    pub moved_profile_ids: Vec<Uuid>,
    /// `severed` or `rederived`.
    pub reason: String,
    pub cause_event_id: Uuid,
}

impl IdentityPayload {
    /// These events carry no PII fields.
    pub fn pii_mut(&mut self) -> Vec<(&'static str, &mut Option<crate::model::common::Sealed>)> {
        Vec::new()
    }

    pub(crate) const BRANCHES: usize = 3;

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::IdentifiersLinked(_) => "identity.identifiers_linked",
            Self::ProfilesMerged(_) => "identity.profiles_merged",
            Self::ProfileSplit(_) => "identity.profile_split",
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let (i, fields) = match self {
            Self::IdentifiersLinked(p) => (
                0,
                vec![
                    ("link_id", value::uuid(&p.link_id)),
                    ("profile_id", value::uuid(&p.profile_id)),
                    ("from", p.from.to_value()),
                    ("to", p.to.to_value()),
                    ("cause_event_id", value::uuid(&p.cause_event_id)),
                ],
            ),
            Self::ProfilesMerged(p) => (
                1,
                vec![
                    ("winner_profile_id", value::uuid(&p.winner_profile_id)),
                    ("loser_profile_id", value::uuid(&p.loser_profile_id)),
                    ("link_id", value::uuid(&p.link_id)),
                    ("cause_event_id", value::uuid(&p.cause_event_id)),
                ],
            ),
            Self::ProfileSplit(p) => (
                2,
                vec![
                    ("from_profile_id", value::uuid(&p.from_profile_id)),
                    ("to_profile_id", value::uuid(&p.to_profile_id)),
                    ("moved_profile_ids", value::uuid_array(&p.moved_profile_ids)),
                    ("reason", Value::String(p.reason.clone())),
                    ("cause_event_id", value::uuid(&p.cause_event_id)),
                ],
            ),
        };
        Value::Union(i, Box::new(value::record(fields)))
    }

    pub(crate) fn from_branch(i: usize, v: Value) -> Result<Self, ContractError> {
        Ok(match i {
            0 => {
                let mut f = Fields::new("IdentifiersLinked", v)?;
                Self::IdentifiersLinked(IdentifiersLinked {
                    link_id: f.uuid("link_id")?,
                    profile_id: f.uuid("profile_id")?,
                    from: Identifier::from_fields(f.record("from", "Identifier")?)?,
                    to: Identifier::from_fields(f.record("to", "Identifier")?)?,
                    cause_event_id: f.uuid("cause_event_id")?,
                })
            }
            1 => {
                let mut f = Fields::new("ProfilesMerged", v)?;
                Self::ProfilesMerged(ProfilesMerged {
                    winner_profile_id: f.uuid("winner_profile_id")?,
                    loser_profile_id: f.uuid("loser_profile_id")?,
                    link_id: f.uuid("link_id")?,
                    cause_event_id: f.uuid("cause_event_id")?,
                })
            }
            _ => {
                let mut f = Fields::new("ProfileSplit", v)?;
                Self::ProfileSplit(ProfileSplit {
                    from_profile_id: f.uuid("from_profile_id")?,
                    to_profile_id: f.uuid("to_profile_id")?,
                    moved_profile_ids: f.uuid_array("moved_profile_ids")?,
                    reason: f.string("reason")?,
                    cause_event_id: f.uuid("cause_event_id")?,
                })
            }
        })
    }
}
