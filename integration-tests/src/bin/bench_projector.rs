//! Benchmark of the projector (not a test).
//!
//! 1. Projection: N realistic sealed events (40% track, 20% identify, 10% each order,
//!    consent, capsule created, capsule viewed) over 6 partitions by key (the subject, as
//!    ingest produces them; `CDP_BENCH_ROUND_ROBIN=1`: round robin), projected from the
//!    start by `cdp_projector::run` (decode, open PII, fold, upsert, offsets, outbox) in the
//!    lanes the last argument gives (the projector's default, 2, otherwise).
//! 2. Ceiling: Postgres `COPY` of the very rows the projection wrote, into the same tables of
//!    a fresh generation, in the same run.
//! 3. Profile API: a generation with P profiles (one email identity and three traits each,
//!    loaded by COPY), lookups by id and by email at a fixed rate; p50/p99, when the requests
//!    over 10 ms were sent, and what else ran in Postgres meanwhile (autovacuum, waits,
//!    checkpoints), to tell a pause of the API from one beside it.
//!
//! Phases 1 and 2 also print where the machine's CPU went meanwhile (seconds per command:
//! postgres, the broker, this process; idle), from `/proc`; phase 1 also how long after the
//! read models the profiles topic had every snapshot.
//!
//! ```sh
//! CDP_STACK_DIR=.stack-bench CDP_KAFKA_PORT=9192 CDP_BROKER_STORAGE=memory scripts/stack up
//! cargo build --release -p cdp-integration-tests --bin bench-projector
//! CDP_TEST_KAFKA_BROKERS=127.0.0.1:9192 target/release/bench-projector [events] [profiles] [requests/s] [batch size] [max batch size] [lanes]
//! ```
//!
//! The maximum batch size defaults to the runner's (`CDP_BATCH_SIZE_MAX`); equal to the batch
//! size, it turns off the growth of batches while the projector catches up.
//!
//! `CDP_LOG=warn,cdp_projector=debug,cdp_runtime=debug` adds a line per batch (phases of the
//! projector's transaction, and the runner's commit).
//!
//! `CDP_KAFKA_PROPERTIES` (`key=value`, comma-separated) gives the projector's Kafka clients
//! extra librdkafka properties, as the service reads them (to try fetch sizes, for instance).
//!
//! `CDP_BENCH_KEEP_DB=1` keeps the benchmark's database (its name is printed) for `EXPLAIN`.

use std::time::{Duration, Instant};

use cdp_integration_tests::cpu;
use cdp_integration_tests::projector::{spawn, Slice};
use cdp_keystore::RawIdentifier;
use cdp_projector::generation;
use cdp_schemas::IdentifierKind;
use futures_util::StreamExt;
use sqlx::PgConnection;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn copy_out(conn: &mut PgConnection, sql: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut stream = conn.copy_out_raw(sql).await?;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

async fn copy_in(conn: &mut PgConnection, sql: &str, data: &[u8]) -> anyhow::Result<u64> {
    let mut copy = conn.copy_in_raw(sql).await?;
    for chunk in data.chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    Ok(copy.finish().await?)
}

/// What else ran in Postgres while the API was measured, sampled every 50 ms from a connection
/// of its own: autovacuum workers and backends waiting on something other than their client
/// (locks, I/O, WAL), as (ms after `t0`, what). A pause of the API shows up next to its cause.
fn watch_postgres(
    pool: sqlx::PgPool,
    t0: Instant,
    done: cdp_runtime::Shutdown,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<(u128, String)>>> {
    tokio::spawn(async move {
        let mut conn = pool.acquire().await?;
        let mut seen = Vec::new();
        while !done.is_triggered() {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT backend_type || ': ' || coalesce(wait_event_type || '/' || wait_event, 'running') || ' ' || left(query, 60)
                   FROM pg_stat_activity
                  WHERE pid <> pg_backend_pid()
                    AND (backend_type = 'autovacuum worker'
                         OR (backend_type = 'client backend' AND state = 'active'
                             AND wait_event_type IS NOT NULL AND wait_event_type <> 'Client'))",
            )
            .fetch_all(&mut *conn)
            .await?;
            let at = t0.elapsed().as_millis();
            seen.extend(rows.into_iter().map(|(what,)| (at, what)));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(seen)
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let profiles: i64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let rate: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let batch_max: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(cdp_runtime::config::RunnerArgs::default().batch_size_max);
    let lanes: u32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(cdp_projector::DEFAULT_LANES);
    cdp_integration_tests::log_from_env()?;
    let slice = Slice::create().await?;
    let events = slice.prepare(0..n, 9_999).await?;
    // By key, as ingest produces them: a subject's events share a partition. Or round robin
    // (`CDP_BENCH_ROUND_ROBIN=1`, a producer that does not key by subject): every subject's
    // events spread over all partitions, so lanes write the same profiles.
    let round_robin = std::env::var_os("CDP_BENCH_ROUND_ROBIN").is_some();
    slice
        .produce(&events, |i| round_robin.then_some((i % 6) as i32))
        .await?;

    // 1. Projection.
    let mut config = slice.config("bench");
    config.runner.batch_size = batch;
    config.runner.batch_size_max = batch_max;
    config.projector.lanes = lanes;
    if let Ok(props) = std::env::var("CDP_KAFKA_PROPERTIES") {
        // Empty entries are skipped where the properties are read (`extra_properties`).
        config.kafka.properties = props.split(',').map(str::to_owned).collect();
    }
    println!("projecting {n} events");
    let started = Instant::now();
    let cpu0 = cpu::Snapshot::take();
    let (stop, task) = spawn(config.clone());
    // Looked at every 5 ms (here and for the outbox below): the default 100 ms poll would add
    // up to 5% to a 2-second run.
    slice
        .caught_up_every(
            &config,
            Duration::from_secs(1_800),
            Duration::from_millis(5),
        )
        .await?;
    let projected = started.elapsed();
    let projection_cpu = cpu::Snapshot::take().since(&cpu0);
    println!("projected in {:.1} s", projected.as_secs_f64());
    // The profiles topic trails the read models by design (the relay paces itself and
    // coalesces while the projector catches up): how long until every snapshot was published.
    let live = generation::live(&slice.db.pool, "p_bench")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no live generation"))?;
    let outbox = format!("SELECT count(*) FROM \"{}\".profile_outbox", live.schema());
    cdp_integration_tests::wait_until_every(
        "every profile snapshot published",
        Duration::from_secs(300),
        Duration::from_millis(5),
        || async {
            let (left,): (i64,) = sqlx::query_as(&outbox).fetch_one(&slice.db.pool).await?;
            Ok(left == 0)
        },
    )
    .await?;
    let published = started.elapsed();
    stop.trigger();
    task.await??;

    // 2. COPY ceiling: the same rows into the same tables of a fresh generation.
    let fresh = generation::create(&slice.db.pool, &slice.db.args(), "p_bench").await?;
    let mut conn = slice.db.pool.acquire().await?;
    let mut dumps = Vec::new();
    let mut rows = 0u64;
    for t in generation::TABLES {
        let data = copy_out(
            &mut conn,
            &format!("COPY \"{}\".{t} TO STDOUT", live.schema()),
        )
        .await?;
        dumps.push((t, data));
    }
    let started = Instant::now();
    let cpu0 = cpu::Snapshot::take();
    // Per table, to set beside the projector's `batch statements` debug lines.
    let mut per_table = Vec::new();
    for (t, data) in &dumps {
        let one = Instant::now();
        let n = copy_in(
            &mut conn,
            &format!("COPY \"{}\".{t} FROM STDIN", fresh.schema()),
            data,
        )
        .await?;
        rows += n;
        if n > 0 {
            per_table.push(format!("{t} {n} rows {} ms", one.elapsed().as_millis()));
        }
    }
    let copied = started.elapsed();
    let copy_cpu = cpu::Snapshot::take().since(&cpu0);
    drop(conn);

    // 3. The profile API on a large table.
    let api_gen = generation::create(&slice.db.pool, &slice.db.args(), "p_apibench").await?;
    let s = api_gen.schema();
    sqlx::query(&format!(
        "INSERT INTO \"{s}\".customers (profile_id, first_seen, last_seen, data_source, first_event_id)
         SELECT md5('p' || i)::uuid, now() - interval '1 day', now(), 'bench', md5('e' || i)::uuid FROM generate_series(1, $1) i"
    ))
    .bind(profiles)
    .execute(&slice.db.pool)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO \"{s}\".customer_traits (profile_id, trait, value, subject_id, asserted_at, event_id)
         SELECT md5('p' || i)::uuid, t, t || '-' || i, 'bench', now(), md5('e' || i)::uuid
           FROM generate_series(1, $1) i, unnest(ARRAY['first_name', 'city', 'country']) t"
    ))
    .bind(profiles)
    .execute(&slice.db.pool)
    .await?;
    let (ids,): (Vec<uuid::Uuid>,) = sqlx::query_as(
        "SELECT array_agg(md5('p' || i)::uuid ORDER BY i) FROM generate_series(1, $1) i",
    )
    .bind(profiles)
    .fetch_one(&slice.db.pool)
    .await?;
    // Every email has its vault row, as ingest would have made it: a lookup goes through
    // the vault.
    let mut identities = Vec::with_capacity(profiles as usize * 110);
    for (c, chunk) in ids.chunks(10_000).enumerate() {
        let emails = (0..chunk.len())
            .map(|i| {
                slice.vault.hasher().identifier(&RawIdentifier::new(
                    IdentifierKind::Email,
                    format!("user{}@example.org", c * 10_000 + i + 1),
                ))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (token, id) in slice.vault.tokens(&emails).await?.iter().zip(chunk) {
            identities.extend_from_slice(
                format!("EMAIL\t\t{token}\t{id}\t2026-01-01 00:00:00+00\n").as_bytes(),
            );
        }
    }
    let mut conn = slice.db.pool.acquire().await?;
    copy_in(
        &mut conn,
        &format!("COPY \"{s}\".customer_identities (kind, namespace, token, profile_id, first_seen) FROM STDIN"),
        &identities,
    )
    .await?;
    drop(conn);
    sqlx::query(&format!(
        "ANALYZE \"{s}\".customers, \"{s}\".customer_identities, \"{s}\".customer_traits"
    ))
    .execute(&slice.db.pool)
    .await?;
    // The load above writes more than a gigabyte of WAL: without a checkpoint now, the ones
    // it triggers (max_wal_size) run during the measurement and time the bulk load's disk
    // writes rather than the API (seen here: p99 0.1-1 s, p50 2-171 ms).
    sqlx::query("CHECKPOINT").execute(&slice.db.pool).await?;
    generation::swap(&slice.db.pool, &api_gen).await?;
    let shutdown = cdp_runtime::Shutdown::new();
    let api = cdp_projector::ApiArgs {
        api_addr: "127.0.0.1:0".parse()?,
        api_tokens: vec!["bench:read:bench-token".into()],
    };
    let mut pg = slice.db.args();
    pg.max_connections = 8;
    let (addr, serve) =
        cdp_projector::bind_api(&pg, &slice.key_args, "p_apibench", &api, shutdown.clone()).await?;
    let server = tokio::spawn(serve);
    let client = reqwest::Client::new();
    // One second of warm-up, not measured: the server's pool opens its connections lazily and
    // each prepares its statements, which queued the first ~100 ms of requests (a service that
    // has been running does not pay that). Then ten seconds measured.
    let warm = rate;
    let total = rate * 10;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = Vec::with_capacity(total as usize);
    let bgwriter =
        "SELECT checkpoints_timed + checkpoints_req, buffers_backend FROM pg_stat_bgwriter";
    let (checkpoints0, backend_writes0): (i64, i64) =
        sqlx::query_as(bgwriter).fetch_one(&slice.db.pool).await?;
    let t0 = Instant::now();
    let watched = cdp_runtime::Shutdown::new();
    let watcher = watch_postgres(slice.db.pool.clone(), t0, watched.clone());
    for k in 0..warm + total {
        tokio::time::sleep_until((t0 + interval * k as u32).into()).await;
        let i = (k * 7_919) % profiles as u64;
        let url = if k % 2 == 0 {
            format!("http://{addr}/v1/profiles/{}", ids[i as usize])
        } else {
            format!(
                "http://{addr}/v1/profiles?email=user{}%40example.org",
                i + 1
            )
        };
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client.get(url).bearer_auth("bench-token").send().await?;
            anyhow::ensure!(r.status().is_success(), "status {}", r.status());
            let _ = r.bytes().await?;
            Ok::<_, anyhow::Error>((k, t.elapsed(), t - t0))
        }));
    }
    let (mut by_id, mut by_email) = (Vec::new(), Vec::new());
    // When the slow requests were sent (ms after the first): one pause shows as one cluster.
    let mut slow = Vec::new();
    for t in tasks {
        let (k, d, sent) = t.await??;
        if k < warm {
            continue;
        }
        if d > Duration::from_millis(10) {
            slow.push(sent.as_millis());
        }
        if k % 2 == 0 {
            by_id.push(d)
        } else {
            by_email.push(d)
        }
    }
    let achieved = (warm + total) as f64 / t0.elapsed().as_secs_f64();
    watched.trigger();
    let beside = watcher.await??;
    let (checkpoints1, backend_writes1): (i64, i64) =
        sqlx::query_as(bgwriter).fetch_one(&slice.db.pool).await?;
    by_id.sort();
    by_email.sort();
    shutdown.trigger();
    server.await??;

    let eps = n as f64 / projected.as_secs_f64();
    println!(
        "events: {n} over 6 partitions {}, batch {batch} (up to {batch_max} while behind), {lanes} lanes, broker {}",
        if round_robin { "round robin" } else { "by key" },
        cdp_integration_tests::brokers()
    );
    println!(
        "projection: {:.1} s, {eps:.0} events/s",
        projected.as_secs_f64()
    );
    println!("  CPU: {projection_cpu}");
    println!(
        "  every profile snapshot published (outbox empty) {:.1} s after the read models caught up",
        (published - projected).as_secs_f64()
    );
    println!(
        "COPY ceiling: {rows} rows (the projection's) in {:.2} s",
        copied.as_secs_f64()
    );
    println!("  per table: {}", per_table.join("; "));
    println!("  CPU: {copy_cpu}");
    println!(
        "projection / COPY ceiling (time of COPY over time of projection): {:.2}",
        copied.as_secs_f64() / projected.as_secs_f64()
    );
    println!(
        "measured requests over 10 ms: {} of {total}, sent between {:?} and {:?} ms after the first request",
        slow.len(),
        slow.first(),
        slow.last()
    );
    if !slow.is_empty() {
        println!(
            "  sent at (ms, the first 100): {:?}",
            &slow[..slow.len().min(100)]
        );
    }
    println!(
        "Postgres beside the API (ms after the first request; autovacuum, waits; the first 60 samples):"
    );
    for (at, what) in beside.iter().take(60) {
        println!("  {at} {what}");
    }
    println!(
        "  checkpoints during the API run: {}, buffers written by backends themselves: {}",
        checkpoints1 - checkpoints0,
        backend_writes1 - backend_writes0
    );
    println!("profile API on {profiles} profiles at {achieved:.0} req/s: by id p50 {:?} p99 {:?}; by email p50 {:?} p99 {:?}",
        percentile(&by_id, 0.5), percentile(&by_id, 0.99), percentile(&by_email, 0.5), percentile(&by_email, 0.99));
    if std::env::var_os("CDP_BENCH_KEEP_DB").is_some() {
        println!("database kept for inspection: {}", slice.db.name);
        return Ok(());
    }
    slice.db.drop_db().await
}
