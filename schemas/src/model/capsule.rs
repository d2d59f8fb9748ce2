//! Capsule events: `cdp.capsule.CapsuleEvent` (schemas/avro/capsule-event.avsc).
//! A capsule is a published content item that customers interact with.

use apache_avro::types::Value;
use uuid::Uuid;

use super::common::{Envelope, Sealed};
use crate::error::ContractError;
use crate::value::{self, avro_enum, AvroEnum, Fields};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleEvent {
    pub envelope: Envelope,
    pub payload: CapsulePayload,
}

impl CapsuleEvent {
    /// Every identifier token the event names: its subject's, its identifiers', and a
    /// created capsule's owner.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        let owner = match &self.payload {
            CapsulePayload::Created(c) => Some(c.owner_subject_id.as_str()),
            _ => None,
        };
        self.envelope.tokens().chain(owner)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapsulePayload {
    Created(CapsuleCreated),
    ContentAdded(CapsuleContentAdded),
    Published(CapsulePublished),
    Viewed(CapsuleViewed),
    Deleted(CapsuleDeleted),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleCreated {
    pub capsule_id: Uuid,
    pub owner_subject_id: String,
    /// Sealed.
    pub title: Option<Sealed>,
    pub content_type: String,
    /// Sealed.
    pub storage_path: Option<Sealed>,
    /// Sealed JSON object of string values.
    pub settings_json: Option<Sealed>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleContentAdded {
    pub capsule_id: Uuid,
    pub content_id: Uuid,
    pub content_type: String,
    /// Sealed.
    pub storage_path: Option<Sealed>,
    pub size_bytes: Option<i64>,
    /// Inline user-generated content, sealed.
    pub body: Option<Sealed>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsulePublished {
    pub capsule_id: Uuid,
    pub visibility: Visibility,
}

avro_enum! {
    pub enum Visibility {
        Public = "PUBLIC",
        Unlisted = "UNLISTED",
        Private = "PRIVATE",
    }
}

/// The subject (envelope) viewed the capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleViewed {
    pub capsule_id: Uuid,
    pub channel: Option<String>,
    pub duration_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleDeleted {
    pub capsule_id: Uuid,
    /// Sealed free text.
    pub reason: Option<Sealed>,
}

/// The fields marked `"pii": true`, by name, of a payload (`mut` for mutable references).
macro_rules! capsule_pii {
    ($payload:expr, $($m:ident)?) => {
        match $payload {
            Self::Created(p) => vec![
                ("title", &$($m)? p.title),
                ("storage_path", &$($m)? p.storage_path),
                ("settings_json", &$($m)? p.settings_json),
            ],
            Self::ContentAdded(p) => vec![
                ("storage_path", &$($m)? p.storage_path),
                ("body", &$($m)? p.body),
            ],
            Self::Deleted(p) => vec![("reason", &$($m)? p.reason)],
            Self::Published(_) | Self::Viewed(_) => vec![],
        }
    };
}

impl CapsulePayload {
    pub(crate) const BRANCHES: usize = 5;

    /// The schema record name of this variant.
    pub fn record_name(&self) -> &'static str {
        match self {
            Self::Created(_) => "CapsuleCreated",
            Self::ContentAdded(_) => "CapsuleContentAdded",
            Self::Published(_) => "CapsulePublished",
            Self::Viewed(_) => "CapsuleViewed",
            Self::Deleted(_) => "CapsuleDeleted",
        }
    }

    /// Every field marked `"pii": true` in the schema, by field name.
    pub fn pii_mut(&mut self) -> Vec<(&'static str, &mut Option<Sealed>)> {
        capsule_pii!(self, mut)
    }

    /// The same fields as [`Self::pii_mut`], read only.
    pub fn pii(&self) -> Vec<(&'static str, &Option<Sealed>)> {
        capsule_pii!(self,)
    }

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Created(_) => "capsule.created",
            Self::ContentAdded(_) => "capsule.content_added",
            Self::Published(_) => "capsule.published",
            Self::Viewed(_) => "capsule.viewed",
            Self::Deleted(_) => "capsule.deleted",
        }
    }

    /// The capsule every capsule event is about.
    pub fn capsule_id(&self) -> Uuid {
        match self {
            Self::Created(p) => p.capsule_id,
            Self::ContentAdded(p) => p.capsule_id,
            Self::Published(p) => p.capsule_id,
            Self::Viewed(p) => p.capsule_id,
            Self::Deleted(p) => p.capsule_id,
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        let (i, fields) = match self {
            Self::Created(p) => (
                0,
                vec![
                    ("capsule_id", value::uuid(&p.capsule_id)),
                    ("owner_subject_id", value::string(&p.owner_subject_id)),
                    ("title", value::sealed(&p.title)),
                    ("content_type", value::string(&p.content_type)),
                    ("storage_path", value::sealed(&p.storage_path)),
                    ("settings_json", value::sealed(&p.settings_json)),
                ],
            ),
            Self::ContentAdded(p) => (
                1,
                vec![
                    ("capsule_id", value::uuid(&p.capsule_id)),
                    ("content_id", value::uuid(&p.content_id)),
                    ("content_type", value::string(&p.content_type)),
                    ("storage_path", value::sealed(&p.storage_path)),
                    ("size_bytes", value::opt_long(p.size_bytes)),
                    ("body", value::sealed(&p.body)),
                ],
            ),
            Self::Published(p) => (
                2,
                vec![
                    ("capsule_id", value::uuid(&p.capsule_id)),
                    ("visibility", p.visibility.to_value()),
                ],
            ),
            Self::Viewed(p) => (
                3,
                vec![
                    ("capsule_id", value::uuid(&p.capsule_id)),
                    ("channel", value::opt_string(&p.channel)),
                    ("duration_ms", value::opt_long(p.duration_ms)),
                ],
            ),
            Self::Deleted(p) => (
                4,
                vec![
                    ("capsule_id", value::uuid(&p.capsule_id)),
                    ("reason", value::sealed(&p.reason)),
                ],
            ),
        };
        Value::Union(i, Box::new(value::record(fields)))
    }

    pub(crate) fn from_branch(i: usize, v: Value) -> Result<Self, ContractError> {
        Ok(match i {
            0 => {
                let mut f = Fields::new("CapsuleCreated", v)?;
                Self::Created(CapsuleCreated {
                    capsule_id: f.uuid("capsule_id")?,
                    owner_subject_id: f.string("owner_subject_id")?,
                    title: f.sealed("title")?,
                    content_type: f.string("content_type")?,
                    storage_path: f.sealed("storage_path")?,
                    settings_json: f.sealed("settings_json")?,
                })
            }
            1 => {
                let mut f = Fields::new("CapsuleContentAdded", v)?;
                Self::ContentAdded(CapsuleContentAdded {
                    capsule_id: f.uuid("capsule_id")?,
                    content_id: f.uuid("content_id")?,
                    content_type: f.string("content_type")?,
                    storage_path: f.sealed("storage_path")?,
                    size_bytes: f.opt_long("size_bytes")?,
                    body: f.sealed("body")?,
                })
            }
            2 => {
                let mut f = Fields::new("CapsulePublished", v)?;
                Self::Published(CapsulePublished {
                    capsule_id: f.uuid("capsule_id")?,
                    visibility: f.symbol("visibility")?,
                })
            }
            3 => {
                let mut f = Fields::new("CapsuleViewed", v)?;
                Self::Viewed(CapsuleViewed {
                    capsule_id: f.uuid("capsule_id")?,
                    channel: f.opt_string("channel")?,
                    duration_ms: f.opt_long("duration_ms")?,
                })
            }
            _ => {
                let mut f = Fields::new("CapsuleDeleted", v)?;
                Self::Deleted(CapsuleDeleted {
                    capsule_id: f.uuid("capsule_id")?,
                    reason: f.sealed("reason")?,
                })
            }
        })
    }
}
