//! Benchmark of the consumer runner (not a test). Measures, in one run on one machine:
//!
//! 1. produce: our idempotent acks=all producer, N events over 6 partitions;
//! 2. consume ceiling: a bare rdkafka consumer reading them, no processing;
//! 3. Postgres ceiling: the same rows inserted with UNNEST, one transaction per batch;
//! 4. runner: the full path (decode, offset lock, insert, offsets, commit) with the probe handler.
//!
//! and prints the runner's rate as a ratio of the lower ceiling. Uses the broker at
//! CDP_TEST_KAFKA_BROKERS (start a memory-backed one for benchmarks:
//! `CDP_STACK_DIR=.stack-bench CDP_KAFKA_PORT=9192 CDP_BROKER_STORAGE=memory scripts/stack up`).
//!
//! `cargo run --release -p cdp-integration-tests --bin bench-runner -- [events] [batch]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_integration_tests::*;
use cdp_runtime::config::RunnerArgs;
use cdp_runtime::kafka::producer::Producer;
use cdp_runtime::kafka::runner::{self, RunnerConfig, StartFrom};
use cdp_runtime::metrics::{Metrics, RunnerMetrics};
use cdp_runtime::pg::PgSink;
use cdp_runtime::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let topic = unique("bench-runner");
    let dlq = unique("bench-runner-dlq");
    create_topics(&[(&topic, 6), (&dlq, 1)]).await?;
    let db = TestDb::create().await?;
    create_probe_table(&db.pool).await?;
    let producer = Arc::new(Producer::new(&kafka_args(""))?);

    let t = Instant::now();
    let keys = produce_events(&producer, &topic, n, 6).await?;
    let produce = t.elapsed();

    let t = Instant::now();
    let consumed = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || -> anyhow::Result<u64> {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", unique("bench-raw"))
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "false")
                .create()?;
            c.subscribe(&[&topic])?;
            let mut seen = 0u64;
            while seen < n {
                if let Some(m) = c.poll(Duration::from_millis(100)) {
                    m?;
                    seen += 1;
                }
            }
            Ok(seen)
        }
    })
    .await??;
    let consume = t.elapsed();

    // Postgres ceiling: the probe's rows, UNNEST insert, one transaction per batch.
    sqlx::query("CREATE TABLE pg_ceiling (LIKE probe_applied)")
        .execute(&db.pool)
        .await?;
    let t = Instant::now();
    for (i, chunk) in keys.chunks(batch).enumerate() {
        let mut tx = db.pool.begin().await?;
        let topics = vec![topic.clone(); chunk.len()];
        let parts: Vec<i32> = (0..chunk.len()).map(|j| (j % 6) as i32).collect();
        let offsets: Vec<i64> = (0..chunk.len()).map(|j| (i * batch + j) as i64).collect();
        let ids: Vec<uuid::Uuid> = (0..chunk.len()).map(|_| uuid::Uuid::now_v7()).collect();
        sqlx::query(
            "INSERT INTO pg_ceiling (key, topic, partition, kafka_offset, event_id)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::uuid[])",
        )
        .bind(chunk)
        .bind(&topics)
        .bind(&parts)
        .bind(&offsets)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    let pg = t.elapsed();

    let group = unique("bench-runner-group");
    let sink = Arc::new(PgSink::new(
        db.pool.clone(),
        group.clone(),
        ProbeHandler {
            delay: Duration::ZERO,
        },
    ));
    let shutdown = Shutdown::new();
    let config = RunnerConfig {
        kafka: kafka_args(""),
        group_id: group,
        topics: vec![topic.clone()],
        dead_letter_topic: dlq,
        tuning: RunnerArgs {
            batch_size: batch,
            batch_linger_ms: 50,
            ..RunnerArgs::default()
        },
        start: StartFrom::Earliest,
        catch_up: Default::default(),
    };
    let t = Instant::now();
    let task = tokio::spawn(runner::run(
        config,
        sink,
        producer.clone(),
        RunnerMetrics::register(&Metrics::new()),
        None,
        shutdown.clone(),
    ));
    wait_until(
        "runner applied everything",
        Duration::from_secs(600),
        || async { Ok(probe_counts(&db.pool).await?.0 >= n as i64) },
    )
    .await?;
    let run = t.elapsed();
    shutdown.trigger();
    task.await??;
    let (rows, distinct) = probe_counts(&db.pool).await?;
    anyhow::ensure!(
        rows == n as i64 && distinct == n as i64,
        "runner applied {rows} rows, {distinct} distinct"
    );

    let ceiling = rate(consumed, consume).min(rate(n, pg));
    println!("events: {n}, batch: {batch}, broker: {}", brokers());
    println!(
        "produce (idempotent, acks=all):  {:>10.0} events/s",
        rate(n, produce)
    );
    println!(
        "consume ceiling (bare rdkafka):  {:>10.0} events/s",
        rate(consumed, consume)
    );
    println!(
        "Postgres ceiling (UNNEST, tx/batch): {:>6.0} rows/s",
        rate(n, pg)
    );
    println!(
        "runner (decode+lock+insert+offsets): {:>6.0} events/s",
        rate(n, run)
    );
    println!(
        "runner / min(ceilings):          {:>10.2}",
        rate(n, run) / ceiling
    );
    db.drop_db().await
}
