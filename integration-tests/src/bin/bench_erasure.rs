//! Erasure time (not a test): from `ErasureRequested` to `ErasureCompleted` for people with
//! many events and five linked identifiers, with many other profiles in the read models.
//! Ingest, identity, the projector and the erasure processor run in this process against
//! the broker at CDP_TEST_KAFKA_BROKERS and Postgres.
//!
//! `CDP_TEST_KAFKA_BROKERS=127.0.0.1:9192 target/release/bench-erasure [people] [events each] [other profiles]`
//!
//! Each person: an anonymous visitor who signs up (user id, email, phone) and comes back on a
//! second device, then `events - 2` page views and tracks, all through the HTTP API; identity
//! links the five identifiers into one profile. The other profiles are written straight into
//! the live read models (a customer row, an identifier and two interactions each): the erasure
//! deletes by index, and what matters is that those indexes are the size of a real
//! deployment's. Then each person is erased in turn, by email; the figure is the processor's
//! own (request to completion), then the time `verify` takes over Postgres and every topic.

use std::time::{Duration, Instant};

use cdp_erasure::Request;
use cdp_integration_tests::ingest::Ingest;
use cdp_integration_tests::pipeline;
use cdp_keystore::RawIdentifier;
use cdp_runtime::topics::Topic;
use cdp_schemas::IdentifierKind;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(1_800);
const LIVE: &str = "p_bench_g1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let people: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let events: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let others: i64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    cdp_integration_tests::log_from_env()?;
    let ing = Ingest::start().await?;
    let ic = cdp_integration_tests::identity::identity_for(
        &ing.kafka,
        &ing.db,
        &ing.key_args,
        "id_bench",
    );
    let mut pc = pipeline::projector(&ing, "bench");
    pc.runner = pipeline::runner(1_000);
    pc.projector.lanes = cdp_integration_tests::projector::lanes_from_env();
    let mut ec = pipeline::erasure(&ing, "erasure_bench", "id_bench");
    ec.runner.batch_linger_ms = 5;
    cdp_integration_tests::identity::create_graph(&ic).await?;
    let (stop_i, task_i) = cdp_integration_tests::identity::spawn(ic.clone());
    let (stop_p, task_p) = cdp_integration_tests::projector::spawn(pc.clone());
    let (stop_e, task_e) = pipeline::spawn_erasure(ec.clone());

    let started = Instant::now();
    for p in 0..people {
        let mut batch = vec![
            json!({"type": "page", "anonymousId": format!("anon-{p}"), "name": "Home"}),
            json!({"type": "identify", "anonymousId": format!("anon-{p}"), "userId": format!("user-{p}"),
                   "traits": {"email": format!("person{p}@example.org"),
                              "phone": format!("+1 415 555 {:04}", p), "firstName": "Ada"}}),
            json!({"type": "identify", "anonymousId": format!("anon-{p}-phone"), "userId": format!("user-{p}")}),
        ];
        for n in 3..events {
            batch.push(if n % 2 == 0 {
                json!({"type": "track", "userId": format!("user-{p}"), "event": "Product Viewed",
                       "properties": {"product_id": format!("p-{}", n % 100)}})
            } else {
                json!({"type": "page", "userId": format!("user-{p}"), "name": "Product",
                       "properties": {"url": format!("https://shop.example/p/{n}")}})
            });
        }
        for chunk in batch.chunks(1_000) {
            let (status, body) = ing.post("/v1/batch", &json!({ "batch": chunk })).await?;
            anyhow::ensure!(status == 200, "ingest answered {status}: {body}");
        }
    }
    cdp_integration_tests::identity::caught_up(
        &ing.db.pool,
        &ic,
        &ing.topic(Topic::CustomerEvents),
        WAIT,
    )
    .await?;
    cdp_integration_tests::projector::caught_up(
        &ing.db.pool,
        &pc,
        WAIT,
        Duration::from_millis(200),
    )
    .await?;
    eprintln!(
        "{people} people, {} events: ingested and projected in {:.1} s",
        people * events,
        started.elapsed().as_secs_f64()
    );

    let loading = Instant::now();
    let pool = &ing.db.pool;
    for sql in [
        "INSERT INTO {LIVE}.customers (profile_id, first_seen, last_seen, data_source, first_event_id)
         SELECT md5('p' || i)::uuid, now(), now(), 'bench', md5('e' || i)::uuid
           FROM generate_series(1, $1) i",
        "INSERT INTO {LIVE}.customer_identities (kind, namespace, token, profile_id, first_seen, origin)
         SELECT 'USER_ID', '', md5('t' || i), md5('p' || i)::uuid, now(), md5('p' || i)::uuid
           FROM generate_series(1, $1) i",
        "INSERT INTO {LIVE}.interactions (event_id, profile_id, occurred_at, interaction_type,
                                          channel, touchpoint, properties, source, origin)
         SELECT md5('i' || i || '-' || j)::uuid, md5('p' || i)::uuid, now(), 'Page Viewed',
                'web', 'Home', '{}', 'bench', md5('p' || i)::uuid
           FROM generate_series(1, $1) i, generate_series(1, 2) j",
    ] {
        sqlx::query(&sql.replace("{LIVE}", LIVE))
            .bind(others)
            .execute(pool)
            .await?;
    }
    sqlx::query(&format!(
        "ANALYZE {LIVE}.customers, {LIVE}.customer_identities, {LIVE}.interactions"
    ))
    .execute(pool)
    .await?;
    let (profiles,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {LIVE}.customers"))
        .fetch_one(pool)
        .await?;
    eprintln!(
        "{profiles} profiles in the read models ({others} written directly in {:.1} s)",
        loading.elapsed().as_secs_f64()
    );

    let requests = cdp_erasure::Requests::open(&ec).await?;
    let mut elapsed = Vec::new();
    let mut verified = Vec::new();
    for p in 0..people {
        let t = Instant::now();
        let id = requests
            .file(&Request {
                identifiers: vec![RawIdentifier::new(
                    IdentifierKind::Email,
                    format!("person{p}@example.org"),
                )],
                profiles: Vec::new(),
                requested_by: "bench".to_owned(),
                reason: Some("benchmark".to_owned()),
                suppress: true,
                force: false,
            })
            .await?;
        let done = requests
            .wait_final(id, WAIT)
            .await?
            .ok_or_else(|| anyhow::anyhow!("request {id} did not complete"))?;
        let wall = t.elapsed();
        anyhow::ensure!(done.outcome.as_deref() == Some("ERASED"), "{done:?}");
        anyhow::ensure!(done.tokens == Some(5), "five identifiers: {done:?}");
        let ms =
            (done.completed_at.unwrap_or(done.requested_at) - done.requested_at).num_milliseconds();
        let v = Instant::now();
        let report = requests.verify(id, &[]).await?;
        anyhow::ensure!(report.clean(), "{report:?}");
        let (rows, tombstones) = done.totals();
        eprintln!(
            "person {p}: request to completion {ms} ms (filing to completion seen {} ms); \
             {rows} rows, {tombstones} tombstones; verify {} ms",
            wall.as_millis(),
            v.elapsed().as_millis()
        );
        elapsed.push(ms);
        verified.push(v.elapsed().as_millis() as i64);
    }
    elapsed.sort_unstable();
    verified.sort_unstable();
    println!(
        "erasure, {events} events and 5 identifiers per person, {profiles} profiles: \
         request to completion median {} ms (runs {:?}); verify median {} ms",
        elapsed[elapsed.len() / 2],
        elapsed,
        verified[verified.len() / 2]
    );
    requests.close().await;
    for stop in [&stop_e, &stop_p, &stop_i] {
        stop.trigger();
    }
    task_e.await??;
    task_p.await??;
    task_i.await??;
    ing.stop().await
}
