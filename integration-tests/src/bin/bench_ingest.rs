//! Benchmark of the ingest API (not a test).
//!
//! Spawns `cdp ingest` (release build, its own process so its peak RSS is its own), then:
//! 1. ceiling: the same events, sealed and encoded in the contract, produced straight to
//!    the same broker with our idempotent `acks=all` producer, in batches of 100 from
//!    N concurrent tasks;
//! 2. peak: N concurrent HTTP clients sending batches of 100 realistic events (identify,
//!    track, page, orders) as fast as they are accepted;
//! 3. at half the peak rate: the same clients, paced, for the latency figure.
//!
//! ```sh
//! CDP_STACK_DIR=.stack-bench CDP_KAFKA_PORT=9192 CDP_BROKER_STORAGE=memory scripts/stack up
//! cargo build --release -p cdp -p cdp-integration-tests --bin cdp --bin bench-ingest
//! CDP_TEST_KAFKA_BROKERS=127.0.0.1:9192 target/release/bench-ingest [clients] [batches per client]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_ingest::publisher::Publisher;
use cdp_integration_tests::*;
use cdp_keystore::config::KeyArgs;
use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::topics::{self, Topics};
use serde_json::{json, Value};

const BATCH: usize = 100;
const WRITE_KEY: &str = "bench-key";

fn event(run: &str, n: usize) -> Value {
    let user = format!("user-{}", n % 5_000);
    let id = format!("{run}-{n}");
    match n % 10 {
        0 | 1 => json!({"type": "identify", "userId": user, "messageId": id,
            "traits": {"email": format!("{user}@example.org"), "firstName": "Ada", "lastName": "Lovelace", "plan": "pro",
                       "address": {"city": "London", "postalCode": "SW1Y 4JH", "country": "GB"}},
            "context": {"library": {"name": "bench"}, "ip": "10.0.0.1"}}),
        2 | 3 => json!({"type": "page", "userId": user, "messageId": id, "name": "Pricing",
            "properties": {"url": "https://example.org/pricing", "title": "Pricing", "referrer": "https://search.example"}}),
        4 => json!({"type": "track", "userId": user, "messageId": id, "event": "Order Completed",
            "properties": {"order_id": id, "total": 99.5, "currency": "EUR",
                           "products": [{"product_id": "p-1", "price": 49.75, "quantity": 2}]}}),
        _ => json!({"type": "track", "userId": user, "messageId": id, "event": "Product Viewed",
            "properties": {"product_id": format!("p-{}", n % 300), "category": "books", "price": 12.5}, "context": {"channel": "web"}}),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Sends `batches` batches per client; `pace` spaces a client's requests. Returns
/// (events accepted, elapsed, request latencies).
async fn http_phase(
    url: &str,
    run: &str,
    clients: usize,
    batches: usize,
    pace: Option<Duration>,
) -> anyhow::Result<(usize, Duration, Vec<Duration>)> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url, run) = (client.clone(), url.to_owned(), run.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(batches);
            let mut accepted = 0usize;
            let mut next = Instant::now();
            for b in 0..batches {
                if let Some(p) = pace {
                    tokio::time::sleep_until(next.into()).await;
                    next += p;
                }
                let base = (c * batches + b) * BATCH;
                let body = json!({"batch": (base..base + BATCH).map(|n| event(&run, n)).collect::<Vec<_>>()});
                let t = Instant::now();
                let resp = client.post(format!("{url}/v1/batch")).basic_auth(WRITE_KEY, Some("")).json(&body).send().await?;
                let status = resp.status().as_u16();
                let v: Value = resp.json().await?;
                lat.push(t.elapsed());
                anyhow::ensure!(status == 200, "status {status}: {v}");
                accepted += v["accepted"].as_u64().unwrap_or(0) as usize;
            }
            Ok::<_, anyhow::Error>((accepted, lat))
        }));
    }
    let mut total = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (a, l) = t.await??;
        total += a;
        lat.extend(l);
    }
    let elapsed = started.elapsed();
    lat.sort();
    Ok((total, elapsed, lat))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let clients: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let batches: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let prefix = format!("{}.", unique("bench-ingest"));
    let kafka = kafka_args(&prefix);
    let topics = Topics::new(&prefix);
    topics::ensure(&kafka, &topics::catalogue(&topics)).await?;
    let db = TestDb::create().await?;
    let hex = |b: u8| (0..32).map(|_| format!("{b:02x}")).collect::<String>();
    let key_args = KeyArgs::with_keys(hex(0x11), hex(0x22));
    cdp_ingest::migrate(&db.pool).await?;

    // 1. Ceiling: the same events, prepared by the same library, produced straight to Kafka.
    let producer = Arc::new(Producer::new(&kafka)?);
    let keys = Arc::new(key_args.key_store(db.pool.clone())?);
    let vault = Arc::new(key_args.vault(db.pool.clone())?);
    let publisher = Publisher::new(producer.clone(), keys, vault, topics.clone());
    let ctx_limits = cdp_ingest::config::IngestArgs {
        addr: "127.0.0.1:0".parse()?,
        write_keys: vec![],
        max_event_bytes: 32 * 1024,
        max_batch_bytes: 500 * 1024,
        max_future_secs: 3600,
        produce_timeout_ms: 10_000,
        retry_after_secs: 5,
        auth_failures_per_minute: 30,
        blocked_patterns: Vec::new(),
    }
    .limits();
    let hasher = key_args.hasher()?;
    let total = clients * batches * BATCH;
    let now = chrono::Utc::now();
    let mut drafts = Vec::with_capacity(total);
    for n in 0..total {
        let v = event("ceiling", n);
        let call = cdp_ingest::segment::Call::parse(v["type"].as_str().unwrap_or("track"))
            .unwrap_or(cdp_ingest::segment::Call::Track);
        let ctx = cdp_ingest::segment::Ctx {
            source: "bench",
            received_at: now,
            limits: &ctx_limits,
            hasher: &hasher,
            batch_sent_at: None,
        };
        let parsed =
            cdp_ingest::segment::parse(&ctx, call, "", &v).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        drafts.extend(parsed.drafts);
    }
    let prepared = publisher.prepare(drafts).await?;
    let prepared = Arc::new(prepared);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per = prepared.len().div_ceil(clients);
    for c in 0..clients {
        let (producer, prepared) = (producer.clone(), prepared.clone());
        tasks.push(tokio::spawn(async move {
            let mine =
                &prepared[(c * per).min(prepared.len())..((c + 1) * per).min(prepared.len())];
            for chunk in mine.chunks(BATCH) {
                let recs: Vec<OutgoingRecord<'_>> = chunk
                    .iter()
                    .map(|p| OutgoingRecord {
                        topic: &p.topic,
                        key: Some(p.key.as_bytes()),
                        value: Some(&p.value),
                        ..Default::default()
                    })
                    .collect();
                producer.send_all(&recs).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let ceiling = prepared.len() as f64 / started.elapsed().as_secs_f64();

    // 2. The HTTP path, in its own process.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cdp = std::env::var("CDP_BENCH_BIN").unwrap_or_else(|_| "target/release/cdp".into());
    let mut child = std::process::Command::new(&cdp)
        .arg("ingest")
        .env("CDP_KAFKA_BROKERS", brokers())
        .env("CDP_TOPIC_PREFIX", &prefix)
        .env("CDP_DATABASE_URL", &db.url)
        .env("CDP_MASTER_KEY", &key_args.master_key)
        .env("CDP_IDENTIFIER_KEY", &key_args.identifier_key)
        .env("CDP_INGEST_WRITE_KEYS", format!("{WRITE_KEY}=bench"))
        .env("CDP_INGEST_ADDR", format!("127.0.0.1:{port}"))
        .env("CDP_ADMIN_ADDR", "127.0.0.1:0")
        .env("CDP_LOG", "warn")
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    wait_until("ingest up", Duration::from_secs(30), || async {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok())
    })
    .await?;
    // Warm-up (keys of the 5,000 users get created once).
    http_phase(&url, "warm", clients, 5, None).await?;
    let (accepted, elapsed, lat) = http_phase(&url, "peak", clients, batches, None).await?;
    let peak = accepted as f64 / elapsed.as_secs_f64();
    // 3. Half the peak rate.
    let per_client_batches_per_sec = peak / 2.0 / BATCH as f64 / clients as f64;
    let pace = Duration::from_secs_f64(1.0 / per_client_batches_per_sec);
    let (_, _, half_lat) =
        http_phase(&url, "half", clients, (batches / 2).max(10), Some(pace)).await?;
    let rss = peak_rss_mib(child.id());
    child.kill()?;
    child.wait()?;

    println!(
        "clients: {clients}, batches of {BATCH}, {accepted} events per phase, broker {}",
        brokers()
    );
    println!("ceiling (sealed+encoded events, rdkafka acks=all): {ceiling:>9.0} events/s");
    println!("HTTP peak (accepted, acknowledged):               {peak:>9.0} events/s  ({:.2} of ceiling)", peak / ceiling);
    println!(
        "  request latency at peak: p50 {:?}  p99 {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!(
        "  request latency at half the peak rate: p50 {:?}  p99 {:?}",
        percentile(&half_lat, 0.5),
        percentile(&half_lat, 0.99)
    );
    println!("  cdp ingest peak RSS: {rss:.0} MiB");
    db.drop_db().await
}
