//! End-to-end latency (not a test): from the tracking API's 200 to the row being visible in
//! the read models, at a fixed event rate. Ingest and projector run in this process against
//! the broker at CDP_TEST_KAFKA_BROKERS and Postgres.
//!
//! `CDP_TEST_KAFKA_BROKERS=127.0.0.1:9192 target/release/bench-e2e [events/s] [seconds] [max batch]`
//! (`CDP_BENCH_CONSUMER_PROPERTIES=k=v,…` adds librdkafka properties to the projector's consumer;
//! `CDP_PROJECTOR_LANES` sets its lanes)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_integration_tests::ingest::{Ingest, WRITE_KEY};
use cdp_integration_tests::projector::spawn;
use cdp_projector::{ProjectorArgs, ProjectorConfig};
use cdp_runtime::config::RunnerArgs;
use serde_json::json;
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rate: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    // The projector's largest batch while behind (the runner's default unless given).
    let batch_max: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(RunnerArgs::default().batch_size_max);
    cdp_integration_tests::log_from_env()?;
    let ing = Ingest::start().await?;
    // Extra librdkafka properties for the projector's consumer (`k=v,k=v`), to compare
    // settings with one binary, e.g. `fetch.wait.max.ms=500` (librdkafka's default).
    let mut kafka = ing.kafka.clone();
    if let Ok(p) = std::env::var("CDP_BENCH_CONSUMER_PROPERTIES") {
        kafka.properties = p.split(',').map(str::to_owned).collect();
    }
    let config = ProjectorConfig {
        kafka,
        pg: ing.db.args(),
        keys: ing.key_args.clone(),
        runner: RunnerArgs {
            batch_size: 1_000,
            batch_size_max: batch_max,
            batch_linger_ms: 20,
            ..RunnerArgs::default()
        },
        projector: ProjectorArgs {
            group: format!("{}projector", ing.kafka.topic_prefix),
            schema_prefix: "p_e2e".to_owned(),
            lanes: cdp_integration_tests::projector::lanes_from_env(),
        },
    };
    cdp_projector::migrate(&ing.db.pool).await?;
    let (stop, task) = spawn(config);
    // Wait for the read views.
    cdp_integration_tests::wait_until(
        "the projector's first generation",
        Duration::from_secs(30),
        || async {
            Ok(cdp_projector::generation::live(&ing.db.pool, "p_e2e")
                .await?
                .is_some())
        },
    )
    .await?;

    const BATCH: u64 = 100;
    let clients = 10u64;
    let per_client = Duration::from_secs_f64(clients as f64 * BATCH as f64 / rate as f64);
    let accepted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut senders = Vec::new();
    for c in 0..clients {
        let (client, url, accepted) = (
            client.clone(),
            format!("{}/v1/batch", ing.base_url),
            accepted.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut next = Instant::now() + per_client.mul_f64(c as f64 / clients as f64);
            while started.elapsed() < Duration::from_secs(secs) {
                tokio::time::sleep_until(next.into()).await;
                next += per_client;
                let ids: Vec<Uuid> = (0..BATCH).map(|_| Uuid::new_v4()).collect();
                let body = json!({"batch": ids.iter().enumerate().map(|(i, id)| json!({
                    "type": "track", "userId": format!("user-{}", (c * 1_000 + i as u64) % 5_000), "messageId": id,
                    "event": "Product Viewed", "properties": {"product_id": "p-1"}})).collect::<Vec<_>>()});
                let r = client.post(&url).basic_auth(WRITE_KEY, Some("")).json(&body).send().await?;
                anyhow::ensure!(r.status().is_success(), "status {}", r.status());
                let at = Instant::now();
                // One sampled event per batch.
                if let Ok(mut a) = accepted.lock() {
                    a.insert(ids[0], at);
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    loop {
        let pending: Vec<Uuid> = accepted
            .lock()
            .map(|a| a.keys().copied().collect())
            .unwrap_or_default();
        if !pending.is_empty() {
            let seen: Vec<(Uuid,)> = sqlx::query_as(
                "SELECT event_id FROM p_e2e_read.interactions WHERE event_id = ANY($1)",
            )
            .bind(&pending)
            .fetch_all(&ing.db.pool)
            .await?;
            let now = Instant::now();
            if let Ok(mut a) = accepted.lock() {
                for (id,) in seen {
                    if let Some(t) = a.remove(&id) {
                        latencies.push(now - t);
                    }
                }
            }
        }
        let done = senders.iter().all(|s| s.is_finished())
            && accepted.lock().map(|a| a.is_empty()).unwrap_or(true);
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for s in senders {
        s.await??;
    }
    latencies.sort();
    let p = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let missing = accepted.lock().map(|a| a.len()).unwrap_or(0);
    println!("target {rate} events/s for {secs} s, {} sampled events (one per batch of {BATCH}), {missing} not visible in time", latencies.len());
    println!(
        "HTTP 200 → row visible: p50 {:?}  p99 {:?}  max {:?}",
        p(0.5),
        p(0.99),
        latencies.last().copied().unwrap_or_default()
    );
    stop.trigger();
    task.await??;
    ing.stop().await
}
