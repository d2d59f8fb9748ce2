//! Native events: contract events the Segment spec does not cover (capsules, explicit
//! consent changes, transactions), as JSON with the Avro contract's field names.
//!
//! ```json
//! {"type": "capsule.created", "userId": "u1", "messageId": "m1", "timestamp": "...",
//!  "identifiers": [{"kind": "EMAIL", "value": "ada@example.org"}],
//!  "payload": {"capsule_id": "…", "title": "…", "content_type": "text/markdown"}}
//! ```

use cdp_keystore::RawIdentifier;
use cdp_schemas::model::capsule::*;
use cdp_schemas::model::customer::*;
use cdp_schemas::{CapsuleEvent, CapsulePayload, CustomerEvent, CustomerPayload, IdentifierKind};
use serde_json::Value;
use uuid::Uuid;

use crate::currency;
use crate::fields::{Errors, FieldError, Obj};
use crate::publisher::{envelope, plain, Draft};
use crate::segment::{common, line_items, Common, Ctx, ItemKeys};

/// Event types accepted on the native endpoint.
pub const NATIVE_TYPES: &[&str] = &[
    "capsule.created",
    "capsule.content_added",
    "capsule.published",
    "capsule.viewed",
    "capsule.deleted",
    "customer.consent_changed",
    "customer.transaction",
];

/// A parsed native event.
#[derive(Debug)]
pub enum NativeDraft {
    Customer(Draft<CustomerEvent>),
    Capsule(Draft<CapsuleEvent>),
}

fn uuid_field(o: &Obj<'_>, key: &str, errs: &mut Errors) -> Option<Uuid> {
    let s = errs.check(o.str(key))?;
    Uuid::parse_str(s.trim()).ok().or_else(|| {
        errs.add(o.path_of(key), "is not a UUID");
        None
    })
}

fn symbol<T>(
    o: &Obj<'_>,
    key: &str,
    default: Option<T>,
    parse: fn(&str) -> Option<T>,
    symbols: &[&str],
    errs: &mut Errors,
) -> Option<T> {
    match errs.check(o.opt_str(key)).flatten() {
        None => {
            if default.is_none() {
                errs.add(o.path_of(key), "is required");
            }
            default
        }
        Some(s) => parse(&s.trim().to_ascii_uppercase()).or_else(|| {
            errs.add(
                o.path_of(key),
                format!("must be one of {}", symbols.join(", ")),
            );
            None
        }),
    }
}

fn extra_identifiers(c: &mut Common<'_>, ctx: &Ctx<'_>, errs: &mut Errors) {
    let Some(list) = errs.check(c.obj.opt_array("identifiers")).flatten() else {
        return;
    };
    for (i, v) in list.iter().enumerate() {
        let Some(o) = errs.check(Obj::new(
            format!("{}[{i}]", c.obj.path_of("identifiers")),
            v,
        )) else {
            continue;
        };
        let kind = symbol(
            &o,
            "kind",
            None,
            IdentifierKind::from_symbol,
            IdentifierKind::symbols(),
            errs,
        );
        let value = errs.check(o.str("value"));
        let namespace = errs.check(o.opt_str("namespace")).flatten();
        if let (Some(kind), Some(value)) = (kind, value) {
            let raw = RawIdentifier {
                kind,
                namespace,
                value,
            };
            match ctx.hasher.identifier(&raw) {
                Ok(normalized) => c.identifiers.push(RawIdentifier {
                    value: normalized.value,
                    ..raw
                }),
                Err(e) => errs.add(o.path_of("value"), e.to_string()),
            }
        }
    }
}

fn settings(o: &Obj<'_>, errs: &mut Errors) -> Option<cdp_schemas::Sealed> {
    let mut out = std::collections::BTreeMap::new();
    if let Some(s) = errs.check(o.opt_obj("settings")).flatten() {
        for (k, v) in s.map {
            match v {
                Value::String(x) => {
                    out.insert(k.clone(), x.clone());
                }
                Value::Null => {}
                other => {
                    out.insert(k.clone(), other.to_string());
                }
            }
        }
    }
    if out.is_empty() {
        return None;
    }
    serde_json::to_string(&out).ok().and_then(plain)
}

/// A capsule payload; a created capsule's owner is the event's subject, which the publisher
/// fills in.
fn capsule(kind: &str, p: &Obj<'_>, errs: &mut Errors) -> Option<CapsulePayload> {
    let capsule_id = uuid_field(p, "capsule_id", errs);
    let s = |errs: &mut Errors, k: &str| errs.check(p.opt_str(k)).flatten();
    let payload = match kind {
        "capsule.created" => {
            let title = errs.check(p.str("title"));
            let content_type = errs.check(p.str("content_type"));
            CapsulePayload::Created(CapsuleCreated {
                capsule_id: capsule_id?,
                owner_subject_id: String::new(),
                title: plain(title?),
                content_type: content_type?,
                storage_path: s(errs, "storage_path").and_then(plain),
                settings_json: settings(p, errs),
            })
        }
        "capsule.content_added" => {
            let content_id = uuid_field(p, "content_id", errs);
            let content_type = errs.check(p.str("content_type"));
            CapsulePayload::ContentAdded(CapsuleContentAdded {
                capsule_id: capsule_id?,
                content_id: content_id?,
                content_type: content_type?,
                storage_path: s(errs, "storage_path").and_then(plain),
                size_bytes: errs.check(p.opt_i64("size_bytes")).flatten(),
                body: s(errs, "body").and_then(plain),
            })
        }
        "capsule.published" => CapsulePayload::Published(CapsulePublished {
            capsule_id: capsule_id?,
            visibility: symbol(
                p,
                "visibility",
                Some(Visibility::Public),
                Visibility::from_symbol,
                Visibility::symbols(),
                errs,
            )?,
        }),
        "capsule.viewed" => CapsulePayload::Viewed(CapsuleViewed {
            capsule_id: capsule_id?,
            channel: s(errs, "channel"),
            duration_ms: errs.check(p.opt_i64("duration_ms")).flatten(),
        }),
        _ => CapsulePayload::Deleted(CapsuleDeleted {
            capsule_id: capsule_id?,
            reason: s(errs, "reason").and_then(plain),
        }),
    };
    Some(payload)
}

fn customer(kind: &str, p: &Obj<'_>, errs: &mut Errors) -> Option<CustomerPayload> {
    if kind == "customer.consent_changed" {
        let purpose = errs.check(p.str("purpose"));
        let status = symbol(
            p,
            "status",
            None,
            ConsentStatus::from_symbol,
            ConsentStatus::symbols(),
            errs,
        );
        let basis = symbol(
            p,
            "basis",
            Some(LegalBasis::Consent),
            LegalBasis::from_symbol,
            LegalBasis::symbols(),
            errs,
        );
        return Some(CustomerPayload::ConsentChanged(ConsentChanged {
            purpose: purpose?,
            status: status?,
            basis: basis?,
            policy_version: errs.check(p.opt_str("policy_version")).flatten(),
        }));
    }
    let order_id = errs.check(
        p.opt_id("order_id")
            .and_then(|o| o.ok_or_else(|| FieldError::new(p.path_of("order_id"), "is required"))),
    );
    let status = symbol(
        p,
        "status",
        Some(TransactionStatus::Completed),
        TransactionStatus::from_symbol,
        TransactionStatus::symbols(),
        errs,
    );
    let amount = errs.check(
        p.opt_amount("amount")
            .and_then(|a| a.ok_or_else(|| FieldError::new(p.path_of("amount"), "is required"))),
    );
    let currency = errs.check(p.str("currency")).and_then(|c| {
        currency::normalize(&c).or_else(|| {
            errs.add(p.path_of("currency"), "is not an ISO 4217 currency code");
            None
        })
    });
    let items = line_items(
        p,
        &ItemKeys {
            list: "items",
            ids: &["product_id"],
            price: "unit_price",
        },
        errs,
    );
    Some(CustomerPayload::Transaction(Transaction {
        order_id: plain(order_id?),
        status: status?,
        amount: amount?,
        currency: currency?,
        line_items: (!items.is_empty())
            .then(|| LineItem::json(&items))
            .and_then(plain),
        payment_method: errs.check(p.opt_str("payment_method")).flatten(),
        coupon: errs.check(p.opt_str("coupon")).flatten().and_then(plain),
    }))
}

/// Reads one native event. On failure, every failing field.
pub fn parse(
    ctx: &Ctx<'_>,
    path: &str,
    v: &Value,
) -> Result<(Option<String>, NativeDraft), Vec<FieldError>> {
    let mut errs = Errors::default();
    let obj = Obj::new(path, v).map_err(|e| vec![e])?;
    let kind = errs.check(obj.str("type"));
    if let Some(k) = &kind {
        if !NATIVE_TYPES.contains(&k.as_str()) {
            errs.add(
                obj.path_of("type"),
                format!("must be one of {}", NATIVE_TYPES.join(", ")),
            );
        }
    }
    let payload = errs.check(
        obj.opt_obj("payload")
            .and_then(|p| p.ok_or_else(|| FieldError::new(obj.path_of("payload"), "is required"))),
    );
    let Some(mut c) = common(ctx, obj, &mut errs) else {
        return Err(errs.0);
    };
    extra_identifiers(&mut c, ctx, &mut errs);
    let (Some(kind), Some(p)) = (kind, payload) else {
        return Err(errs.0);
    };
    if !errs.is_empty() {
        return Err(errs.0);
    }
    let env = envelope(c.event_id, c.occurred_at, ctx.received_at, ctx.source);
    let draft = if kind.starts_with("capsule.") {
        capsule(&kind, &p, &mut errs).map(|payload| {
            NativeDraft::Capsule(Draft::new(
                CapsuleEvent {
                    envelope: env,
                    payload,
                },
                c.identifiers.clone(),
            ))
        })
    } else {
        customer(&kind, &p, &mut errs).map(|payload| {
            NativeDraft::Customer(Draft::new(
                CustomerEvent {
                    envelope: env,
                    payload,
                },
                c.identifiers.clone(),
            ))
        })
    };
    match draft {
        Some(d) if errs.is_empty() => Ok((c.message_id, d)),
        _ => Err(errs.0),
    }
}
