//! The ingest API end to end: HTTP in, Kafka out (real broker), keys in Postgres.

use std::collections::HashMap;
use std::time::Duration;

use cdp_integration_tests::ingest::{Ingest, WRITE_KEY};
use cdp_integration_tests::*;
use cdp_runtime::topics::Topic;
use cdp_schemas::model::capsule::*;
use cdp_schemas::model::customer::*;
use cdp_schemas::{CapsuleEvent, CapsulePayload, CustomerEvent, CustomerPayload, IdentifierKind};
use serde_json::json;
use uuid::Uuid;

fn id() -> String {
    Uuid::new_v4().to_string()
}

async fn customer_events(ing: &Ingest, n: usize) -> anyhow::Result<HashMap<Uuid, CustomerEvent>> {
    let recs = consume(
        &ing.topic(Topic::CustomerEvents),
        n,
        Duration::from_secs(30),
    )
    .await?;
    let mut out = HashMap::new();
    for r in recs {
        let e: CustomerEvent = cdp_schemas::decode(r.value.as_deref().unwrap_or_default())?;
        assert_eq!(
            r.key.as_deref(),
            Some(e.envelope.subject.subject_id.as_bytes()),
            "keyed by subject"
        );
        assert_eq!(
            r.headers.get("cdp.event_id"),
            Some(&e.envelope.event_id.to_string())
        );
        out.insert(e.envelope.event_id, e);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_round_trips_into_the_contract_with_pii_sealed() -> anyhow::Result<()> {
    let ing = Ingest::start().await?;
    let (m_identify, m_track, m_page, m_screen, m_group, m_alias, m_order, m_b1, m_b2) =
        (id(), id(), id(), id(), id(), id(), id(), id(), id());
    let calls = vec![
        (
            "/v1/identify",
            json!({"userId": "u-1", "messageId": m_identify, "timestamp": "2026-11-01T10:00:00Z",
            "traits": {"email": " Ada@Example.ORG ", "phone": "+44 20 7123 4567", "firstName": "Ada", "lastName": "Lovelace",
                       "birthday": "1815-12-10", "plan": "pro",
                       "address": {"street": "12 St James's Square", "city": "London", "postalCode": "SW1Y 4JH", "country": "gb"}},
            "context": {"consent": {"categoryPreferences": {"marketing": true, "analytics": false}}}}),
        ),
        (
            "/v1/track",
            json!({"userId": "u-1", "messageId": m_track, "event": "Product Viewed",
            "properties": {"product_id": "p-1", "duration_ms": 5400, "outcome": "viewed"}, "context": {"channel": "web"}}),
        ),
        (
            "/v1/page",
            json!({"anonymousId": "a-1", "messageId": m_page, "name": "Pricing",
            "properties": {"title": "Pricing", "url": "https://example.org/pricing?ref=ada", "category": "marketing"}}),
        ),
        (
            "/v1/screen",
            json!({"userId": "u-1", "messageId": m_screen, "name": "Home", "properties": {"category": "main", "tab": 2}}),
        ),
        (
            "/v1/group",
            json!({"userId": "u-1", "messageId": m_group, "groupId": "org-7", "traits": {"name": "Analytical Engines Ltd"}}),
        ),
        (
            "/v1/alias",
            json!({"userId": "u-1", "previousId": "a-1", "messageId": m_alias}),
        ),
        (
            "/v1/track",
            json!({"userId": "u-1", "messageId": m_order, "event": "Order Completed",
            "properties": {"order_id": "o-1", "total": 1234.5, "currency": "eur", "payment_method": "card",
                           "products": [{"product_id": "p-1", "sku": "S-1", "name": "Engine", "quantity": 2, "price": "617.25"}]}}),
        ),
    ];
    for (path, body) in &calls {
        let (status, resp) = ing.post(path, body).await?;
        assert_eq!(status, 200, "{path}: {resp}");
        assert_eq!(resp["accepted"], 1, "{path}");
    }
    let (status, resp) = ing
        .post("/v1/batch", &json!({"batch": [
            {"type": "track", "userId": "u-2", "messageId": m_b1, "event": "Signed Up"},
            {"type": "identify", "userId": "u-2", "messageId": m_b2, "traits": {"email": "grace@example.org"}}]}))
        .await?;
    assert_eq!(
        (status, resp["accepted"].clone()),
        (200, json!(2)),
        "{resp}"
    );

    // identify + 2 consents + 6 other calls + 2 batch events
    let events = customer_events(&ing, 11).await?;
    let ev = |m: &str| {
        events
            .get(&Uuid::parse_str(m).unwrap_or_default())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("missing {m}"))
    };

    let identify = ev(&m_identify)?;
    let subject = identify.envelope.subject.subject_id.clone();
    assert_eq!(identify.envelope.source, "test-app");
    assert_eq!(
        identify.envelope.occurred_at.to_rfc3339(),
        "2026-11-01T10:00:00+00:00"
    );
    let kinds: Vec<IdentifierKind> = identify
        .envelope
        .subject
        .identifiers
        .iter()
        .map(|i| i.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            IdentifierKind::UserId,
            IdentifierKind::Email,
            IdentifierKind::Phone
        ]
    );
    let user_token = ing.token(IdentifierKind::UserId, "u-1").await?;
    assert_eq!(subject, user_token, "the subject is the user id's token");
    let CustomerPayload::Identify(t) = &identify.payload else {
        panic!("not identify")
    };
    assert_eq!(
        ing.open(&subject, "email", &t.email).await?.as_deref(),
        Some("ada@example.org")
    );
    assert_eq!(
        ing.open(&subject, "phone", &t.phone).await?.as_deref(),
        Some("+442071234567")
    );
    assert_eq!(
        ing.open(&subject, "first_name", &t.first_name)
            .await?
            .as_deref(),
        Some("Ada")
    );
    assert_eq!(
        ing.open(&subject, "postal_code", &t.postal_code)
            .await?
            .as_deref(),
        Some("SW1Y 4JH")
    );
    assert_eq!(
        ing.open(&subject, "birth_date", &t.birth_date)
            .await?
            .as_deref(),
        Some("1815-12-10")
    );
    assert_eq!(
        ing.open(&subject, "custom_traits", &t.custom_traits)
            .await?
            .as_deref(),
        Some(r#"{"plan":"pro"}"#)
    );
    assert_eq!(t.country.as_deref(), Some("GB"));
    let raw = consume(
        &ing.topic(Topic::CustomerEvents),
        11,
        Duration::from_secs(10),
    )
    .await?;
    for r in &raw {
        let bytes = r.value.as_deref().unwrap_or_default();
        for plaintext in ["ada@example.org", "Ada@Example", "Lovelace", "7123", "u-1"] {
            assert!(
                !bytes
                    .windows(plaintext.len())
                    .any(|w| w == plaintext.as_bytes()),
                "plaintext {plaintext} in the log"
            );
        }
    }

    let consents: Vec<&CustomerEvent> = events
        .values()
        .filter(|e| matches!(e.payload, CustomerPayload::ConsentChanged(_)))
        .collect();
    assert_eq!(consents.len(), 2);
    for c in consents {
        let CustomerPayload::ConsentChanged(cc) = &c.payload else {
            continue;
        };
        let want = if cc.purpose == "marketing" {
            ConsentStatus::Granted
        } else {
            ConsentStatus::Denied
        };
        assert_eq!(cc.status, want);
        assert_eq!(c.envelope.subject.subject_id, subject);
    }

    let CustomerPayload::Track(t) = ev(&m_track)?.payload else {
        panic!("not track")
    };
    assert_eq!(
        (
            t.interaction_type.as_str(),
            t.channel.as_deref(),
            t.duration_ms,
            t.outcome.as_deref()
        ),
        ("Product Viewed", Some("web"), Some(5400), Some("viewed"))
    );
    let props = ing
        .open(&subject, "properties", &t.properties)
        .await?
        .unwrap_or_default();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&props)?["product_id"],
        "p-1"
    );

    let page = ev(&m_page)?;
    let anon_subject = ing.token(IdentifierKind::AnonymousId, "a-1").await?;
    assert_eq!(page.envelope.subject.subject_id, anon_subject);
    let CustomerPayload::PageViewed(p) = &page.payload else {
        panic!("not page")
    };
    assert_eq!(
        (p.name.as_deref(), p.category.as_deref()),
        (Some("Pricing"), Some("marketing"))
    );
    assert_eq!(
        ing.open(&anon_subject, "title", &p.title).await?.as_deref(),
        Some("Pricing")
    );
    assert_eq!(
        ing.open(&anon_subject, "url", &p.url).await?.as_deref(),
        Some("https://example.org/pricing?ref=ada")
    );

    let CustomerPayload::ScreenViewed(s) = ev(&m_screen)?.payload else {
        panic!("not screen")
    };
    assert_eq!(
        (s.name.as_deref(), s.category.as_deref()),
        (Some("Home"), Some("main"))
    );
    assert_eq!(
        ing.open(&subject, "properties", &s.properties)
            .await?
            .as_deref(),
        Some(r#"{"tab":2}"#)
    );

    let CustomerPayload::Track(g) = ev(&m_group)?.payload else {
        panic!("group is a Group interaction")
    };
    assert_eq!(
        (g.interaction_type.as_str(), g.touchpoint.as_deref()),
        ("Group", Some("org-7"))
    );

    let CustomerPayload::Alias(a) = ev(&m_alias)?.payload else {
        panic!("not alias")
    };
    assert_eq!(
        a.previous.token,
        ing.token(IdentifierKind::UserId, "a-1").await?
    );

    let CustomerPayload::Transaction(o) = ev(&m_order)?.payload else {
        panic!("Order Completed is a transaction")
    };
    assert_eq!(
        (o.status, o.amount.to_string().as_str(), o.currency.as_str()),
        (TransactionStatus::Completed, "1234.5000", "EUR")
    );
    // The order id and its lines are sealed: the shop's records link them to the buyer.
    let o_subject = ev(&m_order)?.envelope.subject.subject_id;
    assert_eq!(
        ing.open(&o_subject, "order_id", &o.order_id)
            .await?
            .as_deref(),
        Some("o-1")
    );
    let lines: serde_json::Value = serde_json::from_str(
        &ing.open(&o_subject, "line_items", &o.line_items)
            .await?
            .unwrap_or_default(),
    )?;
    assert_eq!(lines.as_array().map(Vec::len), Some(1), "{lines}");
    assert_eq!(
        (&lines[0]["quantity"], &lines[0]["unit_price"]),
        (&serde_json::json!(2), &serde_json::json!("617.2500"))
    );

    let CustomerPayload::Identify(b2) = ev(&m_b2)?.payload else {
        panic!("batch identify")
    };
    let u2 = ing.token(IdentifierKind::UserId, "u-2").await?;
    assert_eq!(
        ing.open(&u2, "email", &b2.email).await?.as_deref(),
        Some("grace@example.org")
    );
    assert!(matches!(ev(&m_b1)?.payload, CustomerPayload::Track(_)));
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_capsule_consent_and_transaction_events_round_trip() -> anyhow::Result<()> {
    let ing = Ingest::start().await?;
    let capsule_id = Uuid::new_v4();
    let content_id = Uuid::new_v4();
    let events = json!({"batch": [
        {"type": "capsule.created", "userId": "owner-1", "messageId": id(),
         "payload": {"capsule_id": capsule_id, "title": "Spring", "content_type": "text/markdown", "storage_path": "c/1.md", "settings": {"comments": "off"}}},
        {"type": "capsule.content_added", "userId": "owner-1", "messageId": id(),
         "payload": {"capsule_id": capsule_id, "content_id": content_id, "content_type": "text/plain", "size_bytes": 12, "body": "hello, world"}},
        {"type": "capsule.published", "userId": "owner-1", "payload": {"capsule_id": capsule_id, "visibility": "unlisted"}},
        {"type": "capsule.viewed", "anonymousId": "viewer-9", "payload": {"capsule_id": capsule_id, "channel": "mobile", "duration_ms": 1200}},
        {"type": "capsule.deleted", "userId": "owner-1", "payload": {"capsule_id": capsule_id, "reason": "spring is over"}},
        {"type": "customer.consent_changed", "userId": "owner-1", "payload": {"purpose": "analytics", "status": "WITHDRAWN", "basis": "CONSENT"}},
        {"type": "customer.transaction", "userId": "owner-1",
         "identifiers": [{"kind": "EXTERNAL_ID", "namespace": "shopify", "value": "cust-77"}],
         "payload": {"order_id": "o-9", "status": "REFUNDED", "amount": "19.99", "currency": "usd",
                     "items": [{"product_id": "p-9", "quantity": 1, "unit_price": "19.99"}]}}
    ]});
    let (status, resp) = ing.post("/v1/events", &events).await?;
    assert_eq!(
        (status, resp["accepted"].clone()),
        (200, json!(7)),
        "{resp}"
    );

    let recs = consume(&ing.topic(Topic::CapsuleEvents), 5, Duration::from_secs(30)).await?;
    let capsule: Vec<CapsuleEvent> = recs
        .iter()
        .map(|r| cdp_schemas::decode(r.value.as_deref().unwrap_or_default()))
        .collect::<Result<_, _>>()?;
    assert!(
        recs.iter()
            .all(|r| r.key.as_deref() == Some(capsule_id.to_string().as_bytes())),
        "keyed by capsule"
    );
    let owner = ing.token(IdentifierKind::UserId, "owner-1").await?;
    let by_type: HashMap<&str, &CapsuleEvent> = capsule
        .iter()
        .map(|e| (e.payload.event_type(), e))
        .collect();
    let CapsulePayload::Created(c) = &by_type["capsule.created"].payload else {
        panic!()
    };
    assert_eq!(c.owner_subject_id, owner);
    // The title and the settings are the owner's words: sealed with the owner's key.
    assert_eq!(
        ing.open(&owner, "title", &c.title).await?.as_deref(),
        Some("Spring")
    );
    assert_eq!(
        ing.open(&owner, "settings_json", &c.settings_json)
            .await?
            .as_deref(),
        Some(r#"{"comments":"off"}"#)
    );
    let added = by_type["capsule.content_added"];
    let CapsulePayload::ContentAdded(a) = &added.payload else {
        panic!()
    };
    assert_eq!(a.content_id, content_id);
    assert_eq!(
        ing.open(&owner, "body", &a.body).await?.as_deref(),
        Some("hello, world")
    );
    let CapsulePayload::Published(p) = &by_type["capsule.published"].payload else {
        panic!()
    };
    assert_eq!(p.visibility, Visibility::Unlisted);
    let viewed = by_type["capsule.viewed"];
    assert_eq!(
        viewed.envelope.subject.subject_id,
        ing.token(IdentifierKind::AnonymousId, "viewer-9").await?
    );
    let deleted = by_type["capsule.deleted"];
    let CapsulePayload::Deleted(d) = &deleted.payload else {
        panic!()
    };
    assert_eq!(
        ing.open(&deleted.envelope.subject.subject_id, "reason", &d.reason)
            .await?
            .as_deref(),
        Some("spring is over")
    );

    let customer = customer_events(&ing, 2).await?;
    let mut seen = 0;
    for e in customer.values() {
        match &e.payload {
            CustomerPayload::ConsentChanged(c) => {
                assert_eq!(
                    (c.purpose.as_str(), c.status, c.basis),
                    ("analytics", ConsentStatus::Withdrawn, LegalBasis::Consent)
                );
                seen += 1;
            }
            CustomerPayload::Transaction(t) => {
                assert_eq!(
                    (t.status, t.amount.to_string().as_str(), t.currency.as_str()),
                    (TransactionStatus::Refunded, "19.9900", "USD")
                );
                let ext = e
                    .envelope
                    .subject
                    .identifiers
                    .iter()
                    .find(|i| i.kind == IdentifierKind::ExternalId);
                assert_eq!(ext.and_then(|i| i.namespace.as_deref()), Some("shopify"));
                seen += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, 2);
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_twice_is_the_same_event() -> anyhow::Result<()> {
    let ing = Ingest::start().await?;
    let body =
        json!({"userId": "u-1", "messageId": "ajs-next-1700000000000-abc", "event": "Clicked"});
    assert_eq!(ing.post("/v1/track", &body).await?.0, 200);
    assert_eq!(ing.post("/v1/track", &body).await?.0, 200);
    let no_id = json!({"userId": "u-1", "event": "Clicked"});
    assert_eq!(ing.post("/v1/track", &no_id).await?.0, 200);
    let events = consume(
        &ing.topic(Topic::CustomerEvents),
        3,
        Duration::from_secs(30),
    )
    .await?;
    let ids: Vec<Uuid> = events
        .iter()
        .map(|r| {
            cdp_schemas::decode::<CustomerEvent>(r.value.as_deref().unwrap_or_default())
                .map(|e| e.envelope.event_id)
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(ids[0], ids[1], "a client retry keeps its event id");
    assert_eq!(
        ids[0],
        cdp_ingest::segment::event_id("test-app", Some("ajs-next-1700000000000-abc"))
    );
    assert_ne!(ids[2], ids[0]);
    assert_eq!(ids[2].get_version_num(), 7, "server-side ids are UUIDv7");
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_status_and_field_path_and_never_reaches_kafka(
) -> anyhow::Result<()> {
    let ing = Ingest::start().await?;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", ing.base_url);
    let future = (chrono::Utc::now() + chrono::Duration::days(2)).to_rfc3339();
    let cases: Vec<(&str, serde_json::Value, u16, &str)> = vec![
        (
            "/v1/track",
            json!({"userId": 42.5, "event": ["x"]}),
            400,
            "event",
        ),
        ("/v1/track", json!({"event": "Clicked"}), 400, "userId"),
        (
            "/v1/identify",
            json!({"userId": "u", "traits": {"email": "not-an-email"}}),
            400,
            "traits.email",
        ),
        (
            "/v1/identify",
            json!({"userId": "u", "traits": {"phone": "12"}}),
            400,
            "traits.phone",
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": "x", "timestamp": future}),
            400,
            "timestamp",
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": "x", "timestamp": "yesterday"}),
            400,
            "timestamp",
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": "x", "messageId": "m".repeat(101)}),
            400,
            "messageId",
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": "Order Completed", "properties": {"order_id": "o", "total": 5, "currency": "EURO"}}),
            400,
            "properties.currency",
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": "x", "properties": {"blob": "x".repeat(40_000)}}),
            400,
            "body",
        ),
        ("/v1/alias", json!({"userId": "u"}), 400, "previousId"),
        (
            "/v1/events",
            json!({"type": "capsule.created", "userId": "u", "payload": {"capsule_id": "nope", "title": "t", "content_type": "x"}}),
            400,
            "payload.capsule_id",
        ),
        (
            "/v1/events",
            json!({"type": "capsule.exploded", "userId": "u", "payload": {}}),
            400,
            "type",
        ),
    ];
    for (path, body, status, field) in &cases {
        let (got, resp) = ing.post(path, body).await?;
        assert_eq!(got, *status, "{path} {body}: {resp}");
        let paths: Vec<&str> = resp["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["path"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            paths.contains(field),
            "{path}: expected an error at {field}, got {resp}"
        );
        assert!(
            !resp.to_string().contains("not-an-email"),
            "reasons never echo values"
        );
    }
    // Malformed JSON.
    let resp = client
        .post(url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .body("{\"userId\": ")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        resp.json::<serde_json::Value>().await?["errors"][0]["path"],
        "body"
    );
    // Oversize batch.
    let big: Vec<serde_json::Value> = (0..20).map(|i| json!({"type": "track", "userId": "u", "event": "x", "properties": {"pad": "y".repeat(30_000), "i": i}})).collect();
    let (status, _) = ing.post("/v1/batch", &json!({"batch": big})).await?;
    assert_eq!(status, 413);
    // Unknown and missing write keys.
    let resp = client
        .post(url("/v1/track"))
        .basic_auth("wrong", Some(""))
        .json(&json!({"userId": "u", "event": "x"}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    let resp = client
        .post(url("/v1/track"))
        .json(&json!({"userId": "u", "event": "x"}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    // A batch with some invalid events answers 200, accepts the valid ones, lists the others.
    let (status, resp) = ing
        .post(
            "/v1/batch",
            &json!({"batch": [
            {"type": "track", "userId": "u", "event": "ok", "messageId": "good-1"},
            {"type": "track", "event": "no ids", "messageId": "bad-1"},
            {"type": "explode", "userId": "u"},
            {"type": "identify", "userId": "u", "traits": {"email": "x@"}, "messageId": "bad-2"}]}),
        )
        .await?;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["accepted"], 1);
    let rejected = resp["rejected"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        rejected
            .iter()
            .map(|r| r["index"].as_u64().unwrap_or(99))
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(rejected[0]["errors"][0]["path"], "batch[1].userId");
    assert_eq!(rejected[1]["errors"][0]["path"], "batch[2].type");
    assert_eq!(rejected[2]["errors"][0]["path"], "batch[3].traits.email");

    // Only the one valid event reached Kafka; every rejection is in the log.
    assert_eq!(topic_len(&ing.topic(Topic::CustomerEvents)).await?, 1);
    let logged = cdp_ingest::rejections::recent(&ing.db.pool, 100).await?;
    assert_eq!(logged.len(), cases.len() + 3);
    assert!(logged.iter().all(|r| r.source == "test-app"));
    let metrics = ing.metrics.encode()?;
    assert!(
        metrics.contains("cdp_ingest_events_total{outcome=\"rejected\",reason=\"email\"} 2"),
        "{metrics}"
    );
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_write_key_costs_no_parsing_and_an_address_that_keeps_failing_waits(
) -> anyhow::Result<()> {
    let ing = Ingest::start_with(ingest::Options {
        auth_failures_per_minute: 3,
        ..Default::default()
    })
    .await?;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/track", ing.base_url);
    // A Basic key is checked before the body is read: neither broken JSON nor broken gzip
    // is looked at.
    let resp = client
        .post(&url)
        .basic_auth("guess-1", Some(""))
        .body("{\"userId\": ")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.json::<serde_json::Value>().await?["errors"][0]["path"],
        "authorization"
    );
    let resp = client
        .post(&url)
        .basic_auth("guess-2", Some(""))
        .header("content-encoding", "gzip")
        .body("not gzip at all")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    // A body's writeKey is still heard when no Basic key is sent.
    let resp = client
        .post(&url)
        .json(
            &json!({"writeKey": WRITE_KEY, "userId": "u", "event": "Body key", "messageId": id()}),
        )
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let resp = client
        .post(&url)
        .json(&json!({"writeKey": "guess-3", "userId": "u", "event": "x"}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    // Three failures within the minute: the address is refused unread, even with a good key.
    let resp = client
        .post(&url)
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "u", "event": "After the guesses", "messageId": id()}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 429);
    let wait: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Retry-After"))?;
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        topic_len(&ing.topic(Topic::CustomerEvents)).await?,
        1,
        "only the authenticated event reached Kafka"
    );
    let metrics = ing.metrics.encode()?;
    for line in [
        "cdp_ingest_auth_failures_total{outcome=\"unknown_key\"} 3",
        "cdp_ingest_auth_failures_total{outcome=\"throttled\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_accepted() -> anyhow::Result<()> {
    use std::io::Write;
    let ing = Ingest::start().await?;
    let body = serde_json::to_vec(
        &json!({"batch": [{"type": "track", "userId": "u", "event": "Zipped"}]}),
    )?;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&body)?;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/batch", ing.base_url))
        .basic_auth(WRITE_KEY, Some(""))
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(enc.finish()?)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(topic_len(&ing.topic(Topic::CustomerEvents)).await?, 1);
    let doc: serde_json::Value = reqwest::get(format!("{}/openapi.json", ing.base_url))
        .await?
        .json()
        .await?;
    assert!(doc["paths"]["/v1/batch"]["post"].is_object());
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_official_python_sdk_works_unchanged() -> anyhow::Result<()> {
    let python = stack_python()?;
    let ing = Ingest::start().await?;
    let run = Uuid::new_v4().simple().to_string();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/segment_python.py");
    let (url, r) = (ing.base_url.clone(), run.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(url)
            .arg(WRITE_KEY)
            .arg(r)
            .output()
    })
    .await??;
    assert!(
        out.status.success(),
        "SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = customer_events(&ing, 4).await?;
    let mut types: Vec<&str> = events.values().map(|e| e.payload.event_type()).collect();
    types.sort();
    assert_eq!(
        types,
        vec![
            "customer.alias",
            "customer.identify",
            "customer.page_viewed",
            "customer.track"
        ]
    );
    let user = ing
        .token(IdentifierKind::UserId, &format!("sdk-user-{run}"))
        .await?;
    for e in events.values() {
        assert_eq!(e.envelope.subject.subject_id, user);
        let expected = cdp_ingest::segment::event_id(
            "test-app",
            Some(&format!(
                "{run}-{}",
                e.payload
                    .event_type()
                    .trim_start_matches("customer.")
                    .replace("page_viewed", "page")
            )),
        );
        assert_eq!(
            e.envelope.event_id, expected,
            "messageId maps to the event id"
        );
        if let CustomerPayload::Identify(t) = &e.payload {
            assert_eq!(
                ing.open(&user, "email", &t.email).await?,
                Some(format!("sdk-{run}@example.org"))
            );
        }
    }
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_means_503_in_bounded_time_and_nothing_accepted_is_lost() -> anyhow::Result<()>
{
    let mut broker = OwnBroker::start()?;
    let ing = Ingest::start_with(cdp_integration_tests::ingest::Options {
        brokers: broker.brokers(),
        produce_timeout_ms: 3_000,
        ..Default::default()
    })
    .await?;
    let send = |n: u32| {
        let body = json!({"batch": (0..5).map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "x", "messageId": format!("m-{n}-{i}")})).collect::<Vec<_>>()});
        let ing = &ing;
        async move { ing.post("/v1/batch", &body).await }
    };
    let (status, _) = send(1).await?;
    assert_eq!(status, 200);

    broker.kill()?;
    let started = std::time::Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/batch", ing.base_url))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"batch": (0..5).map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "x", "messageId": format!("m-2-{i}")})).collect::<Vec<_>>()}))
        .send()
        .await?;
    let waited = started.elapsed();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    assert!(
        waited < Duration::from_secs(10),
        "a dead broker is answered in bounded time, took {waited:?}"
    );

    broker.resume()?;
    // The client retries the refused batch, with the same messageIds, until it is accepted.
    let mut accepted = false;
    for _ in 0..30 {
        if send(2).await?.0 == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        accepted,
        "after the broker returns, the retried request is accepted"
    );
    assert_eq!(send(3).await?.0, 200);

    // Every accepted event is in the log (a 503'd attempt may also have landed: same event ids).
    let topic = ing.topic(Topic::CustomerEvents);
    // The whole topic: a 503'd attempt that landed anyway makes more than 15 records.
    let log = cdp_integration_tests::archive::read_log_from(&broker.brokers(), &topic).await?;
    let ids: std::collections::HashSet<Uuid> = log
        .values()
        .flatten()
        .map(|r| {
            cdp_schemas::decode::<CustomerEvent>(r.value.as_deref().unwrap_or_default())
                .map(|e| e.envelope.event_id)
        })
        .collect::<Result<_, _>>()?;
    for n in 1..=3 {
        for i in 0..5 {
            let want = cdp_ingest::segment::event_id("test-app", Some(&format!("m-{n}-{i}")));
            assert!(ids.contains(&want), "accepted event m-{n}-{i} is missing");
        }
    }
    ing.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_producer_gets_the_same_contract_as_the_http_path() -> anyhow::Result<()> {
    use cdp_ingest::publisher::{envelope, plain, Draft, Publisher};
    use cdp_keystore::RawIdentifier;
    let ing = Ingest::start().await?;
    // Over HTTP.
    let (status, _) = ing
        .post(
            "/v1/identify",
            &json!({"userId": "direct-1", "traits": {"email": "Direct@Example.org"}}),
        )
        .await?;
    assert_eq!(status, 200);
    // Straight to Kafka with the library, same keys and vault as the service.
    let producer = std::sync::Arc::new(cdp_runtime::kafka::producer::Producer::new(&ing.kafka)?);
    let publisher = Publisher::new(
        producer,
        ing.keys.clone(),
        ing.vault.clone(),
        ing.topics.clone(),
    );
    let now = chrono::Utc::now();
    let draft = Draft {
        event: CustomerEvent {
            envelope: envelope(Uuid::now_v7(), now, now, "direct-app"),
            payload: CustomerPayload::Identify(Identify {
                email: plain("direct@example.org"),
                ..Identify::default()
            }),
        },
        references: Vec::new(),
        identifiers: vec![
            RawIdentifier::new(IdentifierKind::UserId, "direct-1"),
            RawIdentifier::new(IdentifierKind::Email, "Direct@Example.org"),
        ],
    };
    let prepared = publisher.publish(vec![draft]).await?;
    assert_eq!(prepared.len(), 1);
    // A draft without identifiers is refused before anything is produced.
    let orphan = Draft {
        event: CustomerEvent {
            envelope: envelope(Uuid::now_v7(), now, now, "direct-app"),
            payload: CustomerPayload::Identify(Identify::default()),
        },
        references: Vec::new(),
        identifiers: vec![],
    };
    assert!(publisher.publish(vec![orphan]).await.is_err());

    let events: Vec<CustomerEvent> = consume(
        &ing.topic(Topic::CustomerEvents),
        2,
        Duration::from_secs(30),
    )
    .await?
    .iter()
    .map(|r| cdp_schemas::decode(r.value.as_deref().unwrap_or_default()))
    .collect::<Result<_, _>>()?;
    let (http, direct) = (&events[0], &events[1]);
    assert_eq!(
        http.envelope.subject, direct.envelope.subject,
        "same subject and identifier tokens"
    );
    assert_eq!(
        http.envelope.partition_key, direct.envelope.partition_key,
        "same key, same partition"
    );
    let subject = &direct.envelope.subject.subject_id;
    for e in &events {
        let CustomerPayload::Identify(t) = &e.payload else {
            panic!()
        };
        assert_eq!(
            ing.open(subject, "email", &t.email).await?.as_deref(),
            Some("direct@example.org")
        );
    }
    ing.stop().await
}

/// A NUL character (U+0000) anywhere in a message (Postgres stores none in text or jsonb) is
/// refused with the path of every string holding one, whatever the route; the message never
/// reaches Kafka and its rejection is logged (the logged message id and paths spell the NUL
/// `\u0000`). Other control characters pass unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_refused_with_its_path_on_every_route() -> anyhow::Result<()> {
    let ing = Ingest::start().await?;
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        (
            "/v1/identify",
            json!({"userId": "u", "traits": {"name": "Ada\u{0}", "email": "ada@example.org"}}),
            vec!["traits.name"],
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": "Sign\u{0}up"}),
            vec!["event"],
        ),
        (
            "/v1/track",
            json!({"userId": "u", "event": "x", "properties": {"plan": "pro\u{0}", "tags": ["a", "\u{0}"], "ke\u{0}y": 1}}),
            vec![
                "properties.ke\\u0000y",
                "properties.plan",
                "properties.tags[1]",
            ],
        ),
        (
            "/v1/page",
            json!({"userId": "u", "name": "Home", "properties": {"title": "\u{0}"}}),
            vec!["properties.title"],
        ),
        (
            "/v1/alias",
            json!({"userId": "u", "previousId": "old\u{0}"}),
            vec!["previousId"],
        ),
        (
            "/v1/track",
            json!({"anonymousId": "a\u{0}", "event": "x", "messageId": "m\u{0}1"}),
            vec!["anonymousId", "messageId"],
        ),
        (
            "/v1/events",
            json!({"type": "capsule.created", "userId": "u", "payload": {"capsule_id": "0192f7a0-0000-7000-8000-000000000001", "title": "T\u{0}", "content_type": "text/plain"}}),
            vec!["payload.title"],
        ),
    ];
    for (path, body, fields) in &cases {
        let (status, resp) = ing.post(path, body).await?;
        assert_eq!(status, 400, "{path} {body}: {resp}");
        let paths: Vec<&str> = resp["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["path"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(&paths, fields, "{path}: {resp}");
    }
    // In a batch only the message with a NUL is refused.
    let (status, resp) = ing
        .post(
            "/v1/batch",
            &json!({"batch": [
                {"type": "track", "userId": "u", "event": "ok", "messageId": "good-1",
                 "properties": {"note": "tab\tand\u{1}control\u{7f}characters"}},
                {"type": "identify", "userId": "u", "traits": {"city": "Par\u{0}is"}, "messageId": "bad-\u{0}"}]}),
        )
        .await?;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["accepted"], 1);
    assert_eq!(
        resp["rejected"][0]["errors"],
        json!([
            {"path": "batch[1].messageId", "reason": "contains a NUL character (U+0000), which is not accepted"},
            {"path": "batch[1].traits.city", "reason": "contains a NUL character (U+0000), which is not accepted"}
        ])
    );
    // Only the accepted message reached Kafka, its control characters as sent.
    let events = customer_events(&ing, 1).await?;
    assert_eq!(topic_len(&ing.topic(Topic::CustomerEvents)).await?, 1);
    let event = events
        .values()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the accepted event"))?;
    let properties = ing
        .open(
            &event.envelope.subject.subject_id,
            "properties",
            match &event.payload {
                cdp_schemas::CustomerPayload::Track(t) => &t.properties,
                _ => &None,
            },
        )
        .await?
        .unwrap_or_default();
    assert!(
        properties.contains("tab\\tand\\u0001control\u{7f}characters"),
        "{properties}"
    );
    // Every refusal is in the rejection log, NUL spelled out.
    let logged = cdp_ingest::rejections::recent(&ing.db.pool, 100).await?;
    assert_eq!(logged.len(), cases.len() + 1);
    assert!(logged
        .iter()
        .any(|r| r.message_id.as_deref() == Some("bad-\\u0000")));
    assert!(logged
        .iter()
        .any(|r| r.errors.to_string().contains("properties.ke\\\\u0000y")));
    ing.stop().await
}

/// After an erasure (shredded with suppression, as the erasure processor does), events
/// carrying any of the person's identifiers are refused at ingest, message by message, with a
/// typed rejection that names no value, and by the direct-producer library; everybody else's
/// events go through. A new identifier of the same person, never erased, is accepted (as a
/// new person: nothing links it to the erased tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_an_erased_person_are_refused_at_ingest_and_by_the_library() -> anyhow::Result<()>
{
    let ing = Ingest::start_with(ingest::Options {
        erasure_propagation_ms: 0,
        ..Default::default()
    })
    .await?;
    let run = id();
    let (ada, ada_mail, bob) = (
        format!("ada-{run}"),
        format!("ada-{run}@example.org"),
        format!("bob-{run}"),
    );
    let (status, _) = ing
        .post(
            "/v1/identify",
            &json!({"userId": ada, "traits": {"email": ada_mail, "firstName": "Ada"}}),
        )
        .await?;
    assert_eq!(status, 200);
    let tokens = vec![
        ing.token(IdentifierKind::UserId, &ada).await?,
        ing.token(IdentifierKind::Email, &ada_mail).await?,
    ];
    shred(&ing.db.pool, &ing.key_args, &tokens).await?;

    // A batch: Ada by user id, Ada by email alone, Bob, and Ada's new device.
    let (status, body) = ing
        .post(
            "/v1/batch",
            &json!({"batch": [
                {"type": "track", "userId": ada, "event": "Login", "messageId": "m-ada"},
                {"type": "identify", "anonymousId": "anon-x", "traits": {"email": ada_mail.to_uppercase()}, "messageId": "m-mail"},
                {"type": "track", "userId": bob, "event": "Login", "messageId": "m-bob"},
                {"type": "track", "anonymousId": format!("new-device-{run}"), "event": "Open", "messageId": "m-new"},
            ]}),
        )
        .await?;
    assert_eq!(status, 200);
    assert_eq!(body["accepted"], 2, "{body}");
    let rejected = body["rejected"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        rejected
            .iter()
            .map(|r| (r["index"].as_u64(), r["messageId"].as_str()))
            .collect::<Vec<_>>(),
        vec![(Some(0), Some("m-ada")), (Some(1), Some("m-mail"))]
    );
    assert!(rejected.iter().all(|r| r["errors"][0]["reason"]
        .as_str()
        .is_some_and(|m| m.contains("erased person"))));
    let text = body.to_string();
    assert!(
        !text.contains(&ada) && !text.contains("ada-"),
        "no value in the answer"
    );

    // A single call gets a 400.
    let (status, _) = ing
        .post("/v1/track", &json!({"userId": ada, "event": "Again"}))
        .await?;
    assert_eq!(status, 400);
    let (logged,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM ingest_rejections WHERE errors::text LIKE '%erased person%'",
    )
    .fetch_one(&ing.db.pool)
    .await?;
    assert_eq!(logged, 3);
    let (leaked,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM ingest_rejections WHERE errors::text LIKE '%' || $1 || '%'",
    )
    .bind(&run)
    .fetch_one(&ing.db.pool)
    .await?;
    assert_eq!(leaked, 0, "the rejection log holds no value");

    // The library refuses too, naming the draft.
    let producer = std::sync::Arc::new(cdp_runtime::kafka::producer::Producer::new(&ing.kafka)?);
    let publisher = cdp_ingest::publisher::Publisher::new(
        producer,
        ing.keys.clone(),
        ing.vault.clone(),
        ing.topics.clone(),
    );
    let now = chrono::Utc::now();
    let draft = |user: &str| {
        cdp_ingest::publisher::Draft::new(
            CustomerEvent {
                envelope: cdp_ingest::publisher::envelope(Uuid::now_v7(), now, now, "direct"),
                payload: CustomerPayload::Track(product_view(1)),
            },
            vec![cdp_keystore::RawIdentifier::new(
                IdentifierKind::UserId,
                user,
            )],
        )
    };
    assert!(matches!(
        publisher.publish(vec![draft(&bob), draft(&ada)]).await,
        Err(cdp_ingest::publisher::PublishError::Erased { index: 1 })
    ));

    // On the topic: the first identify, Bob's and the new device's events; nothing of Ada's
    // after the erasure.
    let events = customer_events(&ing, 3).await?;
    let subjects: Vec<&str> = events
        .values()
        .map(|e| e.envelope.subject.subject_id.as_str())
        .collect();
    assert_eq!(
        subjects.iter().filter(|s| **s == tokens[0]).count(),
        1,
        "only the identify before the erasure"
    );
    ing.stop().await
}

/// schemathesis (the stack's venv) generates requests from `/openapi.json` for every route:
/// each gets a status and a body the document lists, never a 5xx or a hang. Seeded
/// (`CDP_SCHEMATHESIS_SEED`, default 26) so that a CI run repeats; examples per operation from
/// `CDP_SCHEMATHESIS_EXAMPLES` (default 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_gets_a_documented_answer_to_every_generated_request() -> anyhow::Result<()> {
    let ing = Ingest::start_with(ingest::Options {
        auth_failures_per_minute: 0,
        ..Default::default()
    })
    .await?;
    let schemathesis = stack_python()?.with_file_name("schemathesis");
    anyhow::ensure!(
        schemathesis.exists(),
        "{} is missing: `scripts/stack up` installs it",
        schemathesis.display()
    );
    let seed = std::env::var("CDP_SCHEMATHESIS_SEED").unwrap_or_else(|_| "26".to_owned());
    let examples = std::env::var("CDP_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".to_owned());
    let auth = format!(
        "Authorization: Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{WRITE_KEY}:")
        )
    );
    let url = format!("{}/openapi.json", ing.base_url);
    let dir = std::env::temp_dir().join(unique("schemathesis"));
    std::fs::create_dir_all(&dir)?;
    let out = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(schemathesis)
                .current_dir(&dir)
                .args([
                    "run",
                    &url,
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,\
                     response_schema_conformance,response_headers_conformance",
                    "--max-examples",
                    &examples,
                    "--seed",
                    &seed,
                    "--generation-database",
                    "none",
                    "-H",
                    &auth,
                ])
                .output()
        })
        .await??
    };
    let _ = std::fs::remove_dir_all(&dir);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "schemathesis failed:\n{report}");
    anyhow::ensure!(report.contains("passed"), "no requests ran? {report}");
    ing.stop().await
}
