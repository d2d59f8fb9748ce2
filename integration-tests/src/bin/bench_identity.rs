//! Benchmark of identity resolution (not a test), next to the projector on the same events.
//!
//! A realistic workload (`identity::workload`): Zipf-skewed activity over P people, one event
//! in five carrying two or more identifiers, junk emails, shared devices, jittered event
//! times (late events). The events are sealed and published as ingest does, then resolved
//! from the start by `cdp_identity::run`, then projected from the start by
//! `cdp_projector::run` (which also follows the identity topic), each alone on the machine.
//!
//! ```sh
//! CDP_STACK_DIR=.stack-bench CDP_KAFKA_PORT=9192 CDP_BROKER_STORAGE=memory CDP_NO_S3=1 scripts/stack up
//! cargo build --release -p cdp-integration-tests --bin bench-identity
//! CDP_TEST_KAFKA_BROKERS=127.0.0.1:9192 target/release/bench-identity [events] [people] [batch size]
//! ```

use std::time::{Duration, Instant};

use cdp_identity::{IdentityArgs, IdentityConfig};
use cdp_ingest::publisher::Draft;
use cdp_integration_tests::identity::{track_draft, workload, IdSlice};
use cdp_integration_tests::projector::{spawn, Slice};
use cdp_runtime::config::RunnerArgs;
use cdp_runtime::topics::Topic;
use cdp_schemas::CustomerEvent;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let people: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    cdp_integration_tests::log_from_env()?;
    let slice = Slice::create().await?;
    let specs = workload(n, people, 42);
    let multi = specs.iter().filter(|s| s.ids.len() > 1).count();
    let t = Instant::now();
    let drafts: Vec<Draft<CustomerEvent>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| track_draft(s, i, "bench"))
        .collect();
    let mut prepared = Vec::with_capacity(n);
    for chunk in drafts.chunks(2_000) {
        prepared.extend(slice.publisher.prepare(chunk.to_vec()).await?);
    }
    slice.produce(&prepared, |_| None).await?;
    println!(
        "workload: {n} events over {people} people, {multi} ({:.0}%) with two or more identifiers; produced in {:.1} s",
        100.0 * multi as f64 / n as f64,
        t.elapsed().as_secs_f64()
    );

    // 1. Identity resolution.
    let config = IdentityConfig {
        kafka: slice.kafka.clone(),
        pg: slice.db.args(),
        keys: slice.key_args.clone(),
        runner: RunnerArgs {
            batch_size: batch,
            ..RunnerArgs::default()
        },
        identity: IdentityArgs {
            group: format!("{}.bench-identity", slice.topic(Topic::Audit)),
            schema: "bench_identity".to_owned(),
            rules: IdSlice::default_rules(),
            candidates: cdp_identity::candidates::CandidateArgs::default(),
            cache_nodes: cdp_identity::DEFAULT_CACHE_NODES,
        },
    };
    let pool = cdp_identity::pool(&config.pg, &config.identity.schema).await?;
    let ends = cdp_integration_tests::topic_ends(&slice.topic(Topic::CustomerEvents)).await?;
    let stop = cdp_runtime::Shutdown::new();
    let s = stop.clone();
    let c = config.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move {
        cdp_identity::run(
            c,
            &cdp_runtime::metrics::Metrics::new(),
            &cdp_runtime::admin::Readiness::default(),
            s,
        )
        .await
    });
    let topic = slice.topic(Topic::CustomerEvents);
    let mut resolved_at = None;
    loop {
        let stored =
            cdp_runtime::pg::stored_positions(&slice.db.pool, &config.identity.group).await?;
        let done = ends.iter().all(|(p, end)| {
            *end == 0
                || stored
                    .get(&cdp_runtime::TopicPartition {
                        topic: topic.clone(),
                        partition: *p,
                    })
                    .is_some_and(|s| s >= end)
        });
        if done && resolved_at.is_none() {
            resolved_at = Some(started.elapsed());
        }
        if done && cdp_runtime::outbox::pending(&pool, cdp_identity::handler::OUTBOX).await? == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(3_600) {
            anyhow::bail!("identity did not finish in an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let published = started.elapsed();
    stop.trigger();
    task.await??;
    let resolved = resolved_at.unwrap_or(published);
    let (nodes, profiles, links, refusals): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM identity_nodes),
                (SELECT count(DISTINCT profile_id) FROM identity_nodes),
                (SELECT count(*) FROM identity_links),
                (SELECT count(*) FROM identity_refusals)",
    )
    .fetch_one(&pool)
    .await?;
    let id_rate = n as f64 / resolved.as_secs_f64();
    println!(
        "identity: {n} events resolved in {:.2} s = {id_rate:.0} events/s (all published in {:.2} s = {:.0} events/s); {nodes} identifiers, {profiles} profiles, {links} links, {refusals} refused links",
        resolved.as_secs_f64(),
        published.as_secs_f64(),
        n as f64 / published.as_secs_f64()
    );

    // 2. The projector on the same events (and the identity topic the run above wrote).
    let pc = slice.config("bench");
    let mut pc = pc;
    pc.runner.batch_size = batch;
    pc.runner.batch_linger_ms = RunnerArgs::default().batch_linger_ms;
    let started = Instant::now();
    let (stop, task) = spawn(pc.clone());
    slice.caught_up(&pc, Duration::from_secs(3_600)).await?;
    let projected = started.elapsed();
    stop.trigger();
    task.await??;
    let pr_rate = n as f64 / projected.as_secs_f64();
    println!(
        "projector: {n} events projected in {:.2} s = {pr_rate:.0} events/s",
        projected.as_secs_f64()
    );
    println!("identity / projector: {:.2}", id_rate / pr_rate);
    pool.close().await;
    slice.db.drop_db().await
}
