//! The tracking API's parsers over bad JSON: random documents built from the fields the API
//! reads (and others), random values of every type at every place (NUL and other control
//! characters, huge and negative numbers, deep nesting), and valid messages with one node
//! replaced, through every Segment call and the native parser. Each parses or names its
//! failing fields: never a panic.
//!
//! Seeded: `CDP_FUZZ_SEED` repeats a run (a failure prints its seed); `CDP_FUZZ_CASES` sets the
//! documents per call (default 3,000).

use std::panic::{catch_unwind, AssertUnwindSafe};

use cdp_ingest::segment::{self, Call, Ctx, Limits};
use cdp_keystore::IdentifierHasher;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

const KEYS: &[&str] = &[
    "type",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "event",
    "name",
    "category",
    "traits",
    "properties",
    "context",
    "timestamp",
    "sentAt",
    "originalTimestamp",
    "messageId",
    "integrations",
    "email",
    "phone",
    "firstName",
    "lastName",
    "address",
    "birthday",
    "products",
    "product_id",
    "sku",
    "price",
    "quantity",
    "revenue",
    "total",
    "currency",
    "order_id",
    "coupon",
    "url",
    "title",
    "consent",
    "categoryPreferences",
    "payload",
    "capsule_id",
    "owner",
    "settings",
    "amount",
    "device",
    "id",
    "ip",
    "locale",
    "library",
    "batch",
    "writeKey",
    "",
];

fn text(rng: &mut StdRng) -> String {
    match rng.random_range(0..8) {
        0 => String::new(),
        1 => "\u{0000}".to_owned(),
        2 => "x".repeat(rng.random_range(1..40_000)),
        3 => "2026-13-45T99:99:99Z".to_owned(),
        4 => "ümlaut ✓ 𝄞 \u{202e}".to_owned(),
        5 => format!("user{}@example.org", rng.random::<u16>()),
        6 => "+1 (415) 555-0100".to_owned(),
        _ => (0..rng.random_range(0..24))
            .map(|_| char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?'))
            .collect(),
    }
}

fn value(rng: &mut StdRng, depth: usize) -> Value {
    let leaf = depth > 6 || rng.random_bool(0.5);
    match rng.random_range(0..if leaf { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!([f64::MAX, f64::MIN, 1e-300, -0.0, 0.1][rng.random_range(0..5)]),
        4 => json!(u64::MAX),
        5 => Value::String(text(rng)),
        6 => Value::Array(
            (0..rng.random_range(0..5))
                .map(|_| value(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(object(rng, depth + 1)),
    }
}

fn object(rng: &mut StdRng, depth: usize) -> Map<String, Value> {
    (0..rng.random_range(0..10))
        .map(|_| {
            let key = if rng.random_bool(0.8) {
                KEYS[rng.random_range(0..KEYS.len())].to_owned()
            } else {
                text(rng)
            };
            (key, value(rng, depth))
        })
        .collect()
}

/// Nesting as deep as the JSON parser allows (serde_json stops at 128 levels).
fn deep(levels: usize) -> Value {
    (0..levels).fold(json!("bottom"), |inner, i| {
        if i % 2 == 0 {
            json!({ "properties": inner })
        } else {
            json!([inner])
        }
    })
}

/// Replaces one node of `v`, chosen at random, with a random value.
fn replace_one(rng: &mut StdRng, v: &mut Value) {
    let children: usize = match v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if children == 0 || rng.random_bool(0.3) {
        *v = value(rng, 3);
        return;
    }
    let i = rng.random_range(0..children);
    match v {
        Value::Object(m) => {
            if let Some(child) = m.values_mut().nth(i) {
                replace_one(rng, child);
            }
        }
        Value::Array(a) => replace_one(rng, &mut a[i]),
        _ => {}
    }
}

fn valid_messages() -> Vec<Value> {
    vec![
        json!({"userId": "u1", "traits": {"email": "ada@example.org", "phone": "+1 415 555 0100",
               "firstName": "Ada", "address": {"city": "London"}}, "messageId": "m1"}),
        json!({"userId": "u1", "event": "Order Completed", "messageId": "m2",
               "properties": {"order_id": "o-1", "total": 12.5, "currency": "EUR", "coupon": "C",
                              "products": [{"product_id": "p", "price": 12.5, "quantity": 1}]}}),
        json!({"anonymousId": "a1", "name": "Home", "properties": {"url": "https://x", "title": "T"},
               "context": {"consent": {"categoryPreferences": {"marketing": true}}}}),
        json!({"previousId": "a1", "userId": "u1", "timestamp": "2026-11-22T10:00:00Z"}),
        json!({"userId": "u1", "groupId": "g1", "traits": {"name": "Org"}}),
        json!({"type": "capsule_created", "userId": "u1",
               "payload": {"capsule_id": "0195f6a4-6b1e-7c1d-9b7e-2f3c4d5e6f70", "title": "T"}}),
    ]
}

#[test]
fn random_and_damaged_messages_parse_or_name_their_fields_never_panic() {
    let seed = std::env::var("CDP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases: usize = std::env::var("CDP_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000);
    eprintln!("CDP_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let hasher = IdentifierHasher::new(&[9; 32], "US");
    let limits = Limits {
        max_event_bytes: 32 * 1024,
        max_batch_bytes: 500 * 1024,
        max_message_id_len: 100,
        max_future: chrono::Duration::hours(1),
    };
    let ctx = Ctx {
        source: "fuzz",
        received_at: chrono::Utc::now(),
        limits: &limits,
        hasher: &hasher,
        batch_sent_at: None,
    };
    let valid = valid_messages();
    let mut documents: Vec<Value> = vec![deep(126), deep(127), json!([]), json!("x"), json!(1)];
    for _ in 0..cases {
        documents.push(Value::Object(object(&mut rng, 0)));
        let mut damaged = valid[rng.random_range(0..valid.len())].clone();
        for _ in 0..rng.random_range(1..4) {
            replace_one(&mut rng, &mut damaged);
        }
        documents.push(damaged);
    }
    for doc in &documents {
        // What the API does with a body: serialize, parse back (a JSON round trip), read.
        let bytes = serde_json::to_vec(doc).unwrap_or_default();
        let Ok(parsed) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        for call in Call::ALL {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                segment::parse(&ctx, call, "", &parsed).err()
            }));
            match outcome {
                Ok(Some(errors)) => assert!(
                    !errors.is_empty(),
                    "a refusal names its fields: {parsed} (CDP_FUZZ_SEED={seed})"
                ),
                Ok(None) => {}
                Err(_) => panic!("segment {call:?} panicked on {parsed} (CDP_FUZZ_SEED={seed})"),
            }
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            cdp_ingest::native::parse(&ctx, "", &parsed).err()
        }));
        match outcome {
            Ok(Some(errors)) => assert!(!errors.is_empty(), "{parsed}"),
            Ok(None) => {}
            Err(_) => panic!("native parse panicked on {parsed} (CDP_FUZZ_SEED={seed})"),
        }
    }
}
