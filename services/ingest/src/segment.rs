//! The Segment tracking API (identify, track, page, screen, group, alias, batch) mapped to
//! the contract. See `docs/ingest.md` for the field-by-field mapping.

use cdp_keystore::{IdentifierHasher, RawIdentifier};
use cdp_schemas::model::customer::*;
use cdp_schemas::{Amount, CustomerEvent, CustomerPayload, Identifier, IdentifierKind};
use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::currency;
use crate::fields::{Errors, FieldError, Obj};
use crate::publisher::{envelope, plain, Draft};

/// Namespace of the UUIDv5 event ids derived from non-UUID message ids.
pub const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a2f_41b4_93c1_4d2e_9a57_0c1d_cd70_0001);

/// Validation limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_message_id_len: usize,
    /// How far in the future (after clock-skew correction) a timestamp may be.
    pub max_future: Duration,
}

/// What every message is read with.
pub struct Ctx<'a> {
    pub source: &'a str,
    pub received_at: DateTime<Utc>,
    pub limits: &'a Limits,
    pub hasher: &'a IdentifierHasher,
    /// A batch's top-level `sentAt`, for messages without their own.
    pub batch_sent_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl Call {
    /// Every call, in the order the API documents them.
    pub const ALL: [Call; 6] = [
        Call::Identify,
        Call::Track,
        Call::Page,
        Call::Screen,
        Call::Group,
        Call::Alias,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "identify" => Call::Identify,
            "track" => Call::Track,
            "page" => Call::Page,
            "screen" => Call::Screen,
            "group" => Call::Group,
            "alias" => Call::Alias,
            _ => return None,
        })
    }
}

/// The event id of a message: its messageId if that is a UUID, a UUIDv5 of (source,
/// messageId) otherwise (so a client's retry maps to the same event), a UUIDv7 if absent.
pub fn event_id(source: &str, message_id: Option<&str>) -> Uuid {
    match message_id {
        Some(m) => Uuid::parse_str(m.trim()).unwrap_or_else(|_| {
            Uuid::new_v5(&MESSAGE_ID_NAMESPACE, format!("{source}\0{m}").as_bytes())
        }),
        None => Uuid::now_v7(),
    }
}

/// The fields every call shares.
pub(crate) struct Common<'a> {
    pub obj: Obj<'a>,
    pub message_id: Option<String>,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub identifiers: Vec<RawIdentifier>,
    pub context: Option<Obj<'a>>,
}

fn identifier(
    ctx: &Ctx<'_>,
    errs: &mut Errors,
    path: String,
    kind: IdentifierKind,
    value: Option<String>,
) -> Option<(RawIdentifier, String)> {
    let value = value?;
    match ctx.hasher.normalize(kind, &value) {
        Ok(normalized) => Some((RawIdentifier::new(kind, normalized.clone()), normalized)),
        Err(e) => {
            errs.add(path, e.to_string());
            None
        }
    }
}

/// Reads the shared fields: ids, time (with Segment's clock-skew correction from `sentAt`),
/// identifiers (user id, anonymous id, email and phone from traits, device id).
pub(crate) fn common<'a>(ctx: &Ctx<'_>, obj: Obj<'a>, errs: &mut Errors) -> Option<Common<'a>> {
    let user_id = errs.check(obj.opt_id("userId")).flatten();
    let anonymous_id = errs.check(obj.opt_id("anonymousId")).flatten();
    let message_id = errs.check(obj.opt_id("messageId")).flatten();
    if let Some(m) = &message_id {
        if m.chars().count() > ctx.limits.max_message_id_len {
            errs.add(
                obj.path_of("messageId"),
                format!(
                    "is longer than {} characters",
                    ctx.limits.max_message_id_len
                ),
            );
        }
    }
    let timestamp = errs.check(obj.opt_time("timestamp")).flatten();
    let sent_at = errs
        .check(obj.opt_time("sentAt"))
        .flatten()
        .or(ctx.batch_sent_at);
    let occurred_at = match (timestamp, sent_at) {
        (Some(t), Some(sent)) => ctx.received_at - (sent - t),
        (Some(t), None) => t,
        (None, _) => ctx.received_at,
    };
    if occurred_at > ctx.received_at + ctx.limits.max_future {
        errs.add(
            obj.path_of("timestamp"),
            format!(
                "is more than {} s in the future",
                ctx.limits.max_future.num_seconds()
            ),
        );
    }
    let context = errs.check(obj.opt_obj("context")).flatten();
    if user_id.is_none() && anonymous_id.is_none() {
        errs.add(obj.path_of("userId"), "userId or anonymousId is required");
    }
    let mut identifiers = Vec::new();
    let mut push = |r: Option<(RawIdentifier, String)>| {
        if let Some((raw, _)) = r {
            identifiers.push(raw);
        }
    };
    push(identifier(
        ctx,
        errs,
        obj.path_of("userId"),
        IdentifierKind::UserId,
        user_id,
    ));
    push(identifier(
        ctx,
        errs,
        obj.path_of("anonymousId"),
        IdentifierKind::AnonymousId,
        anonymous_id,
    ));
    if let Some(c) = &context {
        if let Some(device) = errs.check(c.opt_obj("device")).flatten() {
            let id = errs.check(device.opt_id("id")).flatten();
            push(identifier(
                ctx,
                errs,
                device.path_of("id"),
                IdentifierKind::DeviceId,
                id,
            ));
        }
    }
    Some(Common {
        event_id: event_id(ctx.source, message_id.as_deref()),
        message_id,
        occurred_at,
        identifiers,
        context,
        obj,
    })
}

fn draft(
    ctx: &Ctx<'_>,
    c: &Common<'_>,
    event_id: Uuid,
    payload: CustomerPayload,
) -> Draft<CustomerEvent> {
    Draft::new(
        CustomerEvent {
            envelope: envelope(event_id, c.occurred_at, ctx.received_at, ctx.source),
            payload,
        },
        c.identifiers.clone(),
    )
}

/// The email and phone of a traits object, validated, normalized and added as identifiers.
fn contact(
    ctx: &Ctx<'_>,
    traits: &Obj<'_>,
    c: &mut Common<'_>,
    errs: &mut Errors,
) -> (Option<String>, Option<String>) {
    let email = errs.check(traits.opt_str("email")).flatten();
    let email = identifier(
        ctx,
        errs,
        traits.path_of("email"),
        IdentifierKind::Email,
        email,
    );
    let phone = errs.check(traits.opt_id("phone")).flatten();
    let phone = identifier(
        ctx,
        errs,
        traits.path_of("phone"),
        IdentifierKind::Phone,
        phone,
    );
    let mut out = (None, None);
    if let Some((raw, normalized)) = email {
        c.identifiers.push(raw);
        out.0 = Some(normalized);
    }
    if let Some((raw, normalized)) = phone {
        c.identifiers.push(raw);
        out.1 = Some(normalized);
    }
    out
}

fn identify(ctx: &Ctx<'_>, c: &mut Common<'_>, errs: &mut Errors) -> Option<CustomerPayload> {
    let traits = errs.check(c.obj.opt_obj("traits")).flatten();
    let Some(t) = traits else {
        return Some(CustomerPayload::Identify(Identify::default()));
    };
    let (email, phone) = contact(ctx, &t, c, errs);
    let s = |errs: &mut Errors, k: &str| errs.check(t.opt_str(k)).flatten();
    let first_name = s(errs, "firstName").or_else(|| s(errs, "first_name"));
    let last_name = s(errs, "lastName").or_else(|| s(errs, "last_name"));
    let birth_date = s(errs, "birthday").or_else(|| s(errs, "birth_date"));
    let mut country = s(errs, "country");
    let (mut street, mut city, mut postal_code, mut region) = (None, None, None, None);
    if let Some(a) = errs.check(t.opt_obj("address")).flatten() {
        let s = |errs: &mut Errors, k: &str| errs.check(a.opt_str(k)).flatten();
        street = s(errs, "street");
        city = s(errs, "city");
        postal_code = s(errs, "postalCode").or_else(|| s(errs, "postal_code"));
        region = s(errs, "state").or_else(|| s(errs, "region"));
        country = country.or_else(|| s(errs, "country"));
    }
    // ISO 3166-1 alpha-2 goes to `country`; anything else stays among the custom traits.
    let iso_country = country
        .as_deref()
        .map(str::trim)
        .filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
        .map(str::to_ascii_uppercase);
    let mut known = vec![
        "email",
        "phone",
        "firstName",
        "first_name",
        "lastName",
        "last_name",
        "birthday",
        "birth_date",
        "address",
    ];
    if iso_country.is_some() {
        known.push("country");
    }
    Some(CustomerPayload::Identify(Identify {
        first_name: first_name.and_then(plain),
        last_name: last_name.and_then(plain),
        email: email.and_then(plain),
        phone: phone.and_then(plain),
        birth_date: birth_date.and_then(plain),
        street: street.and_then(plain),
        city: city.and_then(plain),
        postal_code: postal_code.and_then(plain),
        region: region.and_then(plain),
        country: iso_country,
        custom_traits: t.rest_json(&known).and_then(plain),
    }))
}

fn transaction(
    status: TransactionStatus,
    props: Option<&Obj<'_>>,
    path: &str,
    errs: &mut Errors,
) -> Option<CustomerPayload> {
    let Some(p) = props else {
        errs.add(
            format!("{path}.properties"),
            "is required for e-commerce order events",
        );
        return None;
    };
    let order_id = errs.check(
        p.opt_id("order_id")
            .and_then(|o| o.ok_or_else(|| FieldError::new(p.path_of("order_id"), "is required"))),
    );
    let amount = errs
        .check(p.opt_amount("total"))
        .flatten()
        .or_else(|| errs.check(p.opt_amount("revenue")).flatten());
    if amount.is_none() && !p.has("total") && !p.has("revenue") {
        errs.add(p.path_of("total"), "is required (or revenue)");
    }
    let currency = match errs.check(p.opt_str("currency")).flatten() {
        None => Some("USD".to_owned()),
        Some(c) => {
            let n = currency::normalize(&c);
            if n.is_none() {
                errs.add(p.path_of("currency"), "is not an ISO 4217 currency code");
            }
            n
        }
    };
    let items = line_items(
        p,
        &ItemKeys {
            list: "products",
            ids: &["product_id", "id", "sku"],
            price: "price",
        },
        errs,
    );
    Some(CustomerPayload::Transaction(Transaction {
        order_id: plain(order_id?),
        status,
        amount: amount?,
        currency: currency?,
        line_items: (!items.is_empty())
            .then(|| LineItem::json(&items))
            .and_then(plain),
        payment_method: errs.check(p.opt_str("payment_method")).flatten(),
        coupon: errs.check(p.opt_str("coupon")).flatten().and_then(plain),
    }))
}

/// Where an order's line items are: the list, the product id (first present wins) and the price.
pub(crate) struct ItemKeys {
    pub list: &'static str,
    pub ids: &'static [&'static str],
    pub price: &'static str,
}

/// An order's line items; every failing field is recorded.
pub(crate) fn line_items(p: &Obj<'_>, keys: &ItemKeys, errs: &mut Errors) -> Vec<LineItem> {
    let mut items = Vec::new();
    let Some(list) = errs.check(p.opt_array(keys.list)).flatten() else {
        return items;
    };
    for (i, v) in list.iter().enumerate() {
        let Some(o) = errs.check(Obj::new(format!("{}[{i}]", p.path_of(keys.list)), v)) else {
            continue;
        };
        let product_id = keys
            .ids
            .iter()
            .find_map(|k| errs.check(o.opt_id(k)).flatten());
        if product_id.is_none() {
            errs.add(
                o.path_of(keys.ids[0]),
                format!("is required (one of {})", keys.ids.join(", ")),
            );
        }
        let quantity = errs.check(o.opt_i64("quantity")).flatten().unwrap_or(1);
        let quantity = i32::try_from(quantity).ok().or_else(|| {
            errs.add(o.path_of("quantity"), "is out of range");
            None
        });
        let unit_price = errs.check(o.opt_amount(keys.price)).flatten();
        if let (Some(product_id), Some(quantity)) = (product_id, quantity) {
            items.push(LineItem {
                product_id,
                sku: errs.check(o.opt_id("sku")).flatten(),
                name: errs.check(o.opt_str("name")).flatten(),
                category: errs.check(o.opt_str("category")).flatten(),
                quantity,
                unit_price: unit_price.unwrap_or_else(Amount::zero),
            });
        }
    }
    items
}

fn track(c: &Common<'_>, errs: &mut Errors) -> Option<CustomerPayload> {
    let name = errs.check(c.obj.str("event"));
    let props = errs.check(c.obj.opt_obj("properties")).flatten();
    let status = match name.as_deref() {
        Some("Order Completed") => Some(TransactionStatus::Completed),
        Some("Order Refunded") => Some(TransactionStatus::Refunded),
        Some("Order Cancelled") => Some(TransactionStatus::Cancelled),
        _ => None,
    };
    if let Some(status) = status {
        return transaction(status, props.as_ref(), &c.obj.path, errs);
    }
    let channel = c
        .context
        .as_ref()
        .and_then(|ctx| errs.check(ctx.opt_str("channel")).flatten());
    let (touchpoint, duration_ms, outcome, properties) = match &props {
        Some(p) => (
            errs.check(p.opt_str("touchpoint")).flatten(),
            errs.check(p.opt_i64("duration_ms")).flatten(),
            errs.check(p.opt_str("outcome")).flatten(),
            p.rest_json(&[]),
        ),
        None => (None, None, None, None),
    };
    Some(CustomerPayload::Track(Track {
        interaction_type: name?,
        channel,
        touchpoint,
        duration_ms,
        outcome,
        properties: properties.and_then(plain),
    }))
}

fn page(c: &Common<'_>, errs: &mut Errors) -> Option<CustomerPayload> {
    let name = errs.check(c.obj.opt_str("name")).flatten();
    let props = errs.check(c.obj.opt_obj("properties")).flatten();
    let s = |errs: &mut Errors, k: &str| {
        props
            .as_ref()
            .and_then(|p| errs.check(p.opt_str(k)).flatten())
    };
    Some(CustomerPayload::PageViewed(PageViewed {
        category: s(errs, "category").or_else(|| errs.check(c.obj.opt_str("category")).flatten()),
        title: s(errs, "title").and_then(plain),
        url: s(errs, "url").and_then(plain),
        referrer: s(errs, "referrer").and_then(plain),
        properties: props
            .as_ref()
            .and_then(|p| p.rest_json(&["category", "title", "url", "referrer"]))
            .and_then(plain),
        name,
    }))
}

fn screen(c: &Common<'_>, errs: &mut Errors) -> Option<CustomerPayload> {
    let props = errs.check(c.obj.opt_obj("properties")).flatten();
    Some(CustomerPayload::ScreenViewed(ScreenViewed {
        name: errs.check(c.obj.opt_str("name")).flatten(),
        category: props
            .as_ref()
            .and_then(|p| errs.check(p.opt_str("category")).flatten()),
        properties: props
            .as_ref()
            .and_then(|p| p.rest_json(&["category"]))
            .and_then(plain),
    }))
}

fn group(c: &Common<'_>, errs: &mut Errors) -> Option<CustomerPayload> {
    let group_id =
        errs.check(c.obj.opt_id("groupId").and_then(|g| {
            g.ok_or_else(|| FieldError::new(c.obj.path_of("groupId"), "is required"))
        }));
    let traits = errs.check(c.obj.opt_obj("traits")).flatten();
    Some(CustomerPayload::Track(Track {
        interaction_type: "Group".to_owned(),
        channel: None,
        touchpoint: group_id,
        duration_ms: None,
        outcome: None,
        properties: traits.and_then(|t| t.rest_json(&[])).and_then(plain),
    }))
}

/// An alias: its `previousId` is a reference the publisher replaces by its token.
fn alias(
    ctx: &Ctx<'_>,
    c: &Common<'_>,
    errs: &mut Errors,
    references: &mut Vec<RawIdentifier>,
) -> Option<CustomerPayload> {
    if !c.obj.has("userId") {
        errs.add(c.obj.path_of("userId"), "is required for alias");
    }
    let previous = errs.check(c.obj.opt_id("previousId").and_then(|p| {
        p.ok_or_else(|| FieldError::new(c.obj.path_of("previousId"), "is required"))
    }))?;
    let previous = RawIdentifier::new(IdentifierKind::UserId, previous);
    match ctx.hasher.identifier(&previous) {
        Ok(_) => {
            references.push(previous);
            Some(CustomerPayload::Alias(Alias {
                previous: Identifier {
                    kind: IdentifierKind::UserId,
                    namespace: None,
                    token: String::new(),
                },
            }))
        }
        Err(e) => {
            errs.add(c.obj.path_of("previousId"), e.to_string());
            None
        }
    }
}

/// Consent categories in `context.consent.categoryPreferences` become consent events.
fn consents(ctx: &Ctx<'_>, c: &Common<'_>, errs: &mut Errors) -> Vec<Draft<CustomerEvent>> {
    let Some(context) = &c.context else {
        return vec![];
    };
    let Some(consent) = errs.check(context.opt_obj("consent")).flatten() else {
        return vec![];
    };
    let Some(prefs) = errs.check(consent.opt_obj("categoryPreferences")).flatten() else {
        return vec![];
    };
    let mut out = Vec::new();
    for (purpose, v) in prefs.map {
        let granted = match v {
            Value::Bool(b) => *b,
            _ => {
                errs.add(prefs.path_of(purpose), "expected a boolean");
                continue;
            }
        };
        let id = Uuid::new_v5(&c.event_id, format!("consent:{purpose}").as_bytes());
        out.push(draft(
            ctx,
            c,
            id,
            CustomerPayload::ConsentChanged(ConsentChanged {
                purpose: purpose.clone(),
                status: if granted {
                    ConsentStatus::Granted
                } else {
                    ConsentStatus::Denied
                },
                basis: LegalBasis::Consent,
                policy_version: errs.check(consent.opt_str("policyVersion")).flatten(),
            }),
        ));
    }
    out
}

/// A parsed message: its messageId (for the response) and its drafts.
#[derive(Debug)]
pub struct Parsed {
    pub message_id: Option<String>,
    pub drafts: Vec<Draft<CustomerEvent>>,
}

/// Reads one Segment message of a known call type. On failure, every failing field.
pub fn parse(ctx: &Ctx<'_>, call: Call, path: &str, v: &Value) -> Result<Parsed, Vec<FieldError>> {
    let mut errs = Errors::default();
    let obj = Obj::new(path, v).map_err(|e| vec![e])?;
    let Some(mut c) = common(ctx, obj, &mut errs) else {
        return Err(errs.0);
    };
    let mut references = Vec::new();
    let payload = match call {
        Call::Identify => identify(ctx, &mut c, &mut errs),
        Call::Track => track(&c, &mut errs),
        Call::Page => page(&c, &mut errs),
        Call::Screen => screen(&c, &mut errs),
        Call::Group => group(&c, &mut errs),
        Call::Alias => alias(ctx, &c, &mut errs, &mut references),
    };
    if call != Call::Identify {
        // Traits sent with other calls in context.traits still link email and phone.
        if let Some(t) = c
            .context
            .as_ref()
            .and_then(|x| errs.check(x.opt_obj("traits")).flatten())
        {
            let _ = contact(ctx, &t, &mut c, &mut errs);
        }
    }
    let consent = consents(ctx, &c, &mut errs);
    match payload {
        Some(p) if errs.is_empty() => {
            let mut main = draft(ctx, &c, c.event_id, p);
            main.references = references;
            let mut drafts = vec![main];
            drafts.extend(consent);
            Ok(Parsed {
                message_id: c.message_id,
                drafts,
            })
        }
        _ => Err(errs.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_ctx<T>(f: impl FnOnce(&Ctx<'_>) -> T) -> T {
        let hasher = IdentifierHasher::new(&[9; 32], "US");
        let limits = Limits {
            max_event_bytes: 32 * 1024,
            max_batch_bytes: 500 * 1024,
            max_message_id_len: 100,
            max_future: Duration::hours(1),
        };
        let received_at = DateTime::parse_from_rfc3339("2026-11-22T10:06:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("{e}"));
        f(&Ctx {
            source: "app",
            received_at,
            limits: &limits,
            hasher: &hasher,
            batch_sent_at: None,
        })
    }

    #[test]
    fn event_ids_follow_the_message_id() {
        let u = Uuid::new_v4();
        assert_eq!(event_id("app", Some(&u.to_string())), u);
        assert_eq!(event_id("app", Some("m-1")), event_id("app", Some("m-1")));
        assert_ne!(
            event_id("app", Some("m-1")),
            event_id("other", Some("m-1")),
            "scoped by source"
        );
        assert_eq!(event_id("app", None).get_version_num(), 7);
    }

    #[test]
    fn client_clock_skew_is_corrected_with_sent_at() {
        let parsed = with_ctx(|ctx| {
            parse(
                ctx,
                Call::Track,
                "",
                &json!({"userId": "u", "event": "x", "timestamp": "2026-11-22T10:00:00Z", "sentAt": "2026-11-22T10:05:00Z"}),
            )
        })
        .unwrap_or_else(|e| panic!("{e:?}"));
        // Sent 5 minutes after it happened, received at 10:06: it happened at 10:01.
        assert_eq!(
            parsed.drafts[0].event.envelope.occurred_at.to_rfc3339(),
            "2026-11-22T10:01:00+00:00"
        );
    }

    #[test]
    fn every_failing_field_is_reported_at_once() {
        let errs = with_ctx(|ctx| {
            parse(
                ctx,
                Call::Identify,
                "batch[4]",
                &json!({"messageId": "m", "timestamp": "soon", "traits": {"email": "a@", "phone": "1"}}),
            )
        })
        .err()
        .unwrap_or_default();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "batch[4].timestamp",
                "batch[4].userId",
                "batch[4].traits.email",
                "batch[4].traits.phone"
            ]
        );
    }

    #[test]
    fn consent_categories_become_consent_events_with_stable_ids() {
        let body = json!({"userId": "u", "event": "x", "messageId": "m-1",
            "context": {"consent": {"categoryPreferences": {"ads": true, "analytics": false}}}});
        let a =
            with_ctx(|ctx| parse(ctx, Call::Track, "", &body)).unwrap_or_else(|e| panic!("{e:?}"));
        let b =
            with_ctx(|ctx| parse(ctx, Call::Track, "", &body)).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(a.drafts.len(), 3);
        let ids = |p: &Parsed| {
            p.drafts
                .iter()
                .map(|d| d.event.envelope.event_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&a),
            ids(&b),
            "a retry yields the same consent event ids"
        );
    }
}
