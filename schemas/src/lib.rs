//! The CDP event contract.
//!
//! The Avro schemas in `schemas/avro/*.avsc` are the source of truth; this crate holds
//! them (with every released version under `avro/history/`), typed Rust events that mirror
//! them, and the codec that frames each datum with Avro single-object encoding. It has no
//! async and no Kafka dependency, so producers in any process can use it.

mod aliases;
pub mod archive;
pub mod canonical;
pub mod catalog;
pub mod codec;
pub mod error;
pub mod fixtures;
pub mod model;
pub mod registry;
mod resolve;
mod value;

pub use codec::{decode, decode_versioned, encode, fingerprint_of, Contract};
pub use error::{CodecError, ContractError};
pub use model::audit::{AuditEvent, AuditPayload};
pub use model::capsule::{CapsuleEvent, CapsulePayload};
pub use model::common::{Amount, Envelope, Identifier, IdentifierKind, Sealed, Subject};
pub use model::compliance::{ComplianceEvent, CompliancePayload};
pub use model::customer::{CustomerEvent, CustomerPayload};
pub use model::identity::{IdentityEvent, IdentityPayload};
pub use model::profile::{profile_id_of, ProfileEvent, ProfilePayload, ProfileSnapshot};

/// Every schema of the contract: (file stem, its schema set).
pub fn all_schemas() -> [&'static registry::SchemaSet; 6] {
    [
        CustomerEvent::schema_set(),
        CapsuleEvent::schema_set(),
        ComplianceEvent::schema_set(),
        IdentityEvent::schema_set(),
        ProfileEvent::schema_set(),
        AuditEvent::schema_set(),
    ]
}
