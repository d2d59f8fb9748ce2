//! Deterministic sample events, one per event type: used by the contract's golden-bytes
//! and compatibility tests, by the service tests and by the benchmarks.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::model::audit::*;
use crate::model::capsule::*;
use crate::model::common::*;
use crate::model::compliance::*;
use crate::model::customer::*;
use crate::model::identity::*;
use crate::model::profile::*;

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_767_225_600 + secs, 123_456_000)
        .single()
        .unwrap_or(DateTime::UNIX_EPOCH)
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn sealed(tag: &str) -> Option<Sealed> {
    Some(Sealed::from_bytes(format!("sealed:{tag}").into_bytes()))
}

/// A token-shaped value (the vault's tokens are 32 hex characters).
fn token(tag: &str) -> String {
    format!("{tag:0>32}")
}

/// A sample envelope for event number `n`, about subject `subject`.
pub fn envelope(n: u128, subject: &str) -> Envelope {
    Envelope {
        event_id: id(n),
        occurred_at: at(n as i64),
        received_at: at(n as i64 + 1),
        source: "fixtures".to_owned(),
        subject: Subject {
            subject_id: token(subject),
            identifiers: vec![
                Identifier {
                    kind: IdentifierKind::UserId,
                    namespace: None,
                    token: token(&format!("u{subject}")),
                },
                Identifier {
                    kind: IdentifierKind::ExternalId,
                    namespace: Some("salesforce".to_owned()),
                    token: token(&format!("sf{subject}")),
                },
            ],
        },
        partition_key: token(subject),
    }
}

fn amount(s: &str) -> Amount {
    s.parse().unwrap_or_else(|e| panic!("fixture amount: {e}"))
}

pub fn customer_events() -> Vec<CustomerEvent> {
    let e = |n: u128, payload| CustomerEvent {
        envelope: envelope(n, "1"),
        payload,
    };
    vec![
        e(
            1,
            CustomerPayload::Identify(Identify {
                first_name: sealed("Ada"),
                last_name: sealed("Lovelace"),
                email: sealed("ada@example.org"),
                phone: sealed("+442071234567"),
                birth_date: sealed("1815-12-10"),
                street: sealed("12 St James's Square"),
                city: sealed("London"),
                postal_code: sealed("SW1Y 4JH"),
                region: None,
                country: Some("GB".to_owned()),
                custom_traits: sealed(r#"{"plan":"pro"}"#),
            }),
        ),
        e(
            2,
            CustomerPayload::Track(Track {
                interaction_type: "Product Viewed".to_owned(),
                channel: Some("web".to_owned()),
                touchpoint: Some("product-page".to_owned()),
                duration_ms: Some(5_400),
                outcome: None,
                properties: sealed(r#"{"product_id":"p-1"}"#),
            }),
        ),
        e(
            3,
            CustomerPayload::PageViewed(PageViewed {
                name: Some("Pricing".to_owned()),
                category: Some("marketing".to_owned()),
                title: sealed("Pricing - Example"),
                url: sealed("https://example.org/pricing?ref=ada"),
                referrer: None,
                properties: None,
            }),
        ),
        e(
            4,
            CustomerPayload::ScreenViewed(ScreenViewed {
                name: Some("Home".to_owned()),
                category: None,
                properties: sealed("{}"),
            }),
        ),
        e(
            5,
            CustomerPayload::Transaction(Transaction {
                order_id: sealed("o-1001"),
                status: TransactionStatus::Completed,
                amount: amount("-1234.5678"),
                currency: "EUR".to_owned(),
                line_items: sealed(&LineItem::json(&[LineItem {
                    product_id: "p-1".to_owned(),
                    sku: Some("SKU-1".to_owned()),
                    name: Some("Analytical Engine".to_owned()),
                    category: Some("machines".to_owned()),
                    quantity: 2,
                    unit_price: amount("617.2839"),
                }])),
                payment_method: Some("card".to_owned()),
                coupon: None,
            }),
        ),
        e(
            6,
            CustomerPayload::ConsentChanged(ConsentChanged {
                purpose: "marketing_email".to_owned(),
                status: ConsentStatus::Granted,
                basis: LegalBasis::Consent,
                policy_version: Some("2026-01".to_owned()),
            }),
        ),
        e(
            7,
            CustomerPayload::Alias(Alias {
                previous: Identifier {
                    kind: IdentifierKind::AnonymousId,
                    namespace: None,
                    token: token("anon1"),
                },
            }),
        ),
    ]
}

pub fn capsule_events() -> Vec<CapsuleEvent> {
    let capsule_id = id(0xC0);
    let e = |n: u128, payload| CapsuleEvent {
        envelope: envelope(n, "2"),
        payload,
    };
    vec![
        e(
            11,
            CapsulePayload::Created(CapsuleCreated {
                capsule_id,
                owner_subject_id: token("2"),
                title: sealed("Spring lookbook"),
                content_type: "text/markdown".to_owned(),
                storage_path: sealed("capsules/c0/index.md"),
                settings_json: sealed(r#"{"comments":"off"}"#),
            }),
        ),
        e(
            12,
            CapsulePayload::ContentAdded(CapsuleContentAdded {
                capsule_id,
                content_id: id(0xC1),
                content_type: "image/png".to_owned(),
                storage_path: sealed("capsules/c0/1.png"),
                size_bytes: Some(48_213),
                body: sealed("caption"),
            }),
        ),
        e(
            13,
            CapsulePayload::Published(CapsulePublished {
                capsule_id,
                visibility: Visibility::Public,
            }),
        ),
        e(
            14,
            CapsulePayload::Viewed(CapsuleViewed {
                capsule_id,
                channel: Some("mobile".to_owned()),
                duration_ms: Some(12_000),
            }),
        ),
        e(
            15,
            CapsulePayload::Deleted(CapsuleDeleted {
                capsule_id,
                reason: sealed("owner request"),
            }),
        ),
    ]
}

pub fn compliance_events() -> Vec<ComplianceEvent> {
    let e = |n: u128, payload| ComplianceEvent {
        envelope: envelope(n, "3"),
        payload,
    };
    vec![
        e(
            21,
            CompliancePayload::ErasureRequested(ErasureRequested {
                request_id: id(0xE1),
                profile_ids: vec![id(0xF1)],
                suppress: true,
                force: false,
                due_at: at(30 * 86_400),
            }),
        ),
        e(
            22,
            CompliancePayload::ErasureCompleted(ErasureCompleted {
                request_id: id(0xE1),
                keys_destroyed: 1,
                rows_deleted: 42,
                tombstones_emitted: 3,
                outcome: ErasureOutcome::Erased,
                profiles: 2,
                tokens: 5,
                vault_rows_deleted: 4,
                suppressed: 4,
                refused_links: 1,
                stores: [("projector.customers".to_owned(), 2)].into(),
                elapsed_ms: 840,
            }),
        ),
        e(
            23,
            CompliancePayload::ExportRequested(ExportRequested {
                request_id: id(0xE2),
                requested_by: "dpo@example.org".to_owned(),
                format: ExportFormat::Json,
            }),
        ),
        e(
            24,
            CompliancePayload::ExportCompleted(ExportCompleted {
                request_id: id(0xE2),
                location: "s3://exports/e2.json".to_owned(),
                record_count: 17,
            }),
        ),
        e(
            25,
            CompliancePayload::ErasureScoped(ErasureScoped {
                request_id: id(0xE1),
                tokens: vec!["0123456789abcdef0123456789abcdef".to_owned()],
                profile_ids: vec![id(0xF1), id(0xF2)],
            }),
        ),
        e(
            26,
            CompliancePayload::ErasureApplied(ErasureApplied {
                request_id: id(0xE1),
                service: "projector".to_owned(),
                rows_deleted: 40,
                tombstones_emitted: 2,
                stores: [("customers".to_owned(), 2)].into(),
            }),
        ),
    ]
}

pub fn identity_events() -> Vec<IdentityEvent> {
    let e = |n: u128, payload| IdentityEvent {
        envelope: envelope(n, "4"),
        payload,
    };
    let ident = |kind, tag: &str| Identifier {
        kind,
        namespace: None,
        token: token(tag),
    };
    vec![
        e(
            31,
            IdentityPayload::IdentifiersLinked(IdentifiersLinked {
                link_id: id(0x11),
                profile_id: id(0xA1),
                from: ident(IdentifierKind::Email, "e4"),
                to: ident(IdentifierKind::Phone, "p4"),
                cause_event_id: id(1),
            }),
        ),
        e(
            32,
            IdentityPayload::ProfilesMerged(ProfilesMerged {
                winner_profile_id: id(0xA1),
                loser_profile_id: id(0xA2),
                link_id: id(0x11),
                cause_event_id: id(1),
            }),
        ),
        e(
            33,
            IdentityPayload::ProfileSplit(ProfileSplit {
                from_profile_id: id(0xA1),
                to_profile_id: id(0xA2),
                moved_profile_ids: vec![id(0xA2), id(0xA3)],
                reason: "severed".to_owned(),
                cause_event_id: id(1),
            }),
        ),
    ]
}

pub fn profile_events() -> Vec<ProfileEvent> {
    vec![ProfileEvent {
        envelope: envelope(41, "5"),
        payload: ProfilePayload::Snapshot(ProfileSnapshot {
            profile_id: id(0xA5),
            first_seen: at(0),
            last_seen: at(3_600),
            identifiers: vec![Identifier {
                kind: IdentifierKind::Email,
                namespace: None,
                token: token("e5"),
            }],
            traits: vec![
                TraitValue {
                    name: "country".to_owned(),
                    value: Some("GB".to_owned()),
                    sealed: None,
                    subject_id: token("5"),
                    asserted_at: at(10),
                },
                TraitValue {
                    name: "email".to_owned(),
                    value: None,
                    sealed: sealed("ada@example.org"),
                    subject_id: token("5"),
                    asserted_at: at(10),
                },
            ],
            consents: vec![ConsentState {
                purpose: "analytics".to_owned(),
                status: ConsentStatus::Denied,
                basis: LegalBasis::Consent,
                changed_at: at(20),
            }],
            interactions: 12,
            transactions: 2,
        }),
    }]
}

pub fn audit_events() -> Vec<AuditEvent> {
    vec![AuditEvent {
        envelope: Envelope {
            subject: Subject {
                subject_id: audit_subject(id(0x61)),
                identifiers: Vec::new(),
            },
            partition_key: id(0x61).to_string(),
            ..envelope(51, "6")
        },
        payload: AuditPayload::ErasureAudited(ErasureAudited {
            request_id: id(0x61),
            requested_by: sealed("dpo@example.org"),
            reason: sealed("Art. 17 request, ticket 4711"),
            requested_at: at(0),
            due_at: at(30 * 86_400),
            completed_at: at(2),
            outcome: AuditedOutcome::Erased,
            suppress: true,
            force: false,
            profiles: 3,
            tokens: 5,
            refused_links: 1,
            keys_destroyed: 3,
            vault_rows_deleted: 5,
            suppressed: 5,
            rows_deleted: 42,
            tombstones_emitted: 9,
            // One entry: Avro maps encode in hash order, so golden bytes need one.
            stores: BTreeMap::from([("projector.customers".to_owned(), 1)]),
            services: vec!["identity".to_owned(), "projector".to_owned()],
            elapsed_ms: 850,
        }),
    }]
}
