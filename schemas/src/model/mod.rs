//! Typed events, one module per topic family. Field order and union branch order follow
//! the `.avsc` files exactly.

pub mod audit;
pub mod capsule;
pub mod common;
pub mod compliance;
pub mod customer;
pub mod identity;
pub mod profile;

use crate::codec::contract;
use audit::{AuditEvent, AuditPayload};
use capsule::{CapsuleEvent, CapsulePayload};
use compliance::{ComplianceEvent, CompliancePayload};
use customer::{CustomerEvent, CustomerPayload};
use identity::{IdentityEvent, IdentityPayload};
use profile::{ProfileEvent, ProfilePayload};

contract!(
    CustomerEvent,
    CustomerPayload,
    "customer-event",
    "CustomerEvent",
    &[
        (
            1,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/customer-event/v1.avsc"
            ))
        ),
        (
            2,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/customer-event/v2.avsc"
            ))
        ),
        (
            3,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/customer-event/v3.avsc"
            ))
        )
    ]
);
contract!(
    CapsuleEvent,
    CapsulePayload,
    "capsule-event",
    "CapsuleEvent",
    &[
        (
            1,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/capsule-event/v1.avsc"
            ))
        ),
        (
            2,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/capsule-event/v2.avsc"
            ))
        ),
        (
            3,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/capsule-event/v3.avsc"
            ))
        )
    ]
);
contract!(
    ComplianceEvent,
    CompliancePayload,
    "compliance-event",
    "ComplianceEvent",
    &[
        (
            1,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/compliance-event/v1.avsc"
            ))
        ),
        (
            2,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/compliance-event/v2.avsc"
            ))
        ),
        (
            3,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/compliance-event/v3.avsc"
            ))
        )
    ]
);
contract!(
    IdentityEvent,
    IdentityPayload,
    "identity-event",
    "IdentityEvent",
    &[
        (
            1,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/identity-event/v1.avsc"
            ))
        ),
        (
            2,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/identity-event/v2.avsc"
            ))
        ),
        (
            3,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/identity-event/v3.avsc"
            ))
        )
    ]
);
contract!(
    ProfileEvent,
    ProfilePayload,
    "profile-event",
    "ProfileEvent",
    &[
        (
            1,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/profile-event/v1.avsc"
            ))
        ),
        (
            2,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/avro/history/profile-event/v2.avsc"
            ))
        )
    ]
);
contract!(
    AuditEvent,
    AuditPayload,
    "audit-event",
    "AuditEvent",
    &[(
        1,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/avro/history/audit-event/v1.avsc"
        ))
    )]
);
