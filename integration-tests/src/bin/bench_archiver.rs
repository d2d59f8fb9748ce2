//! Archiver benchmark: archived records/s and MB/s to a local directory and to the S3
//! server, next to the raw consume ceiling (rdkafka reading the same topic without writing)
//! measured in the same run; then restore records/s.
//!
//!   CDP_TEST_KAFKA_BROKERS=127.0.0.1:9192 target/release/bench-archiver [records]
//!
//! Needs the broker (a memory broker for stable figures, see docs/benchmarks.md) and the
//! stack's S3 server on 127.0.0.1:3900 (`CDP_NO_S3=1` leaves the S3 phase out).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use cdp_archiver::restore::{restore, RestoreRequest};
use cdp_archiver::store::SignPayload;
use cdp_archiver::{Archive, ArchiverArgs, ArchiverConfig, StoreArgs};
use cdp_integration_tests::archive::{local_store, produce_mix, require_s3, s3_endpoint, s3_store};
use cdp_integration_tests::{brokers, create_topics, kafka_args, metric_sum, unique};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::RunnerArgs;
use cdp_runtime::metrics::Metrics;
use cdp_runtime::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Timestamps well in the past, so the tail files close as soon as the log goes quiet.
const T0: i64 = 1_700_000_000_000;

/// Raw consume of the whole topic: (records, payload bytes, seconds).
fn consume_ceiling(topic: &str, n: usize) -> anyhow::Result<(usize, u64, f64)> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("bench-ceiling"))
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "16384")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..6 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let started = Instant::now();
    let (mut count, mut bytes) = (0usize, 0u64);
    while count < n {
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "ceiling read timed out"
        );
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            bytes += (m.payload_len() + m.key().map_or(0, <[u8]>::len)) as u64;
            count += 1;
        }
    }
    Ok((count, bytes, started.elapsed().as_secs_f64()))
}

/// Measures and prints the raw consume rate: (records/s, payload MB).
async fn ceiling(topic: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let (count, payload, secs) = {
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || consume_ceiling(&topic, n)).await??
    };
    let mb = payload as f64 / 1e6;
    let rate = count as f64 / secs;
    println!(
        "ceiling  raw consume           {rate:>10.0} records/s  {:>7.1} MB/s",
        mb / secs
    );
    Ok((rate, mb))
}

/// Archives the topic from scratch into `store`: (seconds, archive bytes).
async fn archive_run(topic: &str, store: StoreArgs, n: usize) -> anyhow::Result<(f64, u64)> {
    let metrics = Metrics::new();
    let shutdown = Shutdown::new();
    let config = ArchiverConfig {
        kafka: kafka_args(""),
        runner: RunnerArgs {
            batch_size: 2_000,
            batch_linger_ms: 20,
            ..RunnerArgs::default()
        },
        archiver: ArchiverArgs {
            group: unique("bench-archiver"),
            topics: vec![topic.to_owned()],
            codec: cdp_archiver::ocf::Codec::Zstandard,
            max_records: 100_000,
            max_bytes: 64 * 1024 * 1024,
            window_secs: 300,
            grace_ms: 0,
            acknowledged_gaps: Vec::new(),
            max_buffered_bytes: 1024 * 1024 * 1024,
        },
        store: store.clone(),
    };
    let task = {
        let (m, s) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move { cdp_archiver::run(config, &m, &Readiness::default(), s).await })
    };
    // The clock starts when the group has assigned the partitions (joining a group is not
    // archiving, and the ceiling does not join one) and stops when the last file is
    // uploaded (the tail files close at the first tick after the log goes quiet).
    let joining = Instant::now();
    while metric_sum(&metrics, "cdp_consumer_assigned_partitions")? < 6.0 {
        ensure!(!task.is_finished(), "the archiver stopped");
        ensure!(joining.elapsed() < Duration::from_secs(60), "no assignment");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    while metric_sum(&metrics, "cdp_archive_records_total")? < n as f64 {
        ensure!(!task.is_finished(), "the archiver stopped");
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "archiving timed out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    shutdown.trigger();
    task.await??;
    let archive = Archive::open(&store)?;
    let bytes = archive
        .list(topic, None)
        .await?
        .iter()
        .map(|f| f.size)
        .sum();
    Ok((secs, bytes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("records")?
        .unwrap_or(500_000);
    // CDP_NO_S3=1 (as for scripts/stack) leaves the S3 phase out.
    let with_s3 = std::env::var("CDP_NO_S3").as_deref() != Ok("1");
    let endpoint = s3_endpoint();
    if with_s3 {
        require_s3(&endpoint).await?;
    }
    let topic = unique("bench-archive");
    create_topics(&[(&topic, 6)]).await?;
    let t = Instant::now();
    produce_mix(&topic, 6, n, T0).await?;
    println!("produced {n} records in {:.1} s", t.elapsed().as_secs_f64());

    // The ceiling is measured before the archive runs and again after them; the higher of
    // the two is the one the ratios use (one short read varied by up to half here).
    let (ceiling_before, mb) = ceiling(&topic, n).await?;
    let (local, dir) = local_store();
    let mut runs = Vec::new();
    runs.push((
        "local directory",
        archive_run(&topic, local.clone(), n).await?,
    ));
    if with_s3 {
        runs.push((
            "S3 (garage)",
            archive_run(&topic, s3_store(&endpoint), n).await?,
        ));
        // What the same upload costs unsigned, as it is by default over https://.
        let unsigned = StoreArgs {
            s3_sign_payload: SignPayload::Never,
            ..s3_store(&endpoint)
        };
        runs.push((
            "S3, payload unsigned",
            archive_run(&topic, unsigned, n).await?,
        ));
    } else {
        println!("archive  S3                    left out (CDP_NO_S3=1)");
    }
    let (ceiling_after, _) = ceiling(&topic, n).await?;
    let ceiling = ceiling_before.max(ceiling_after);
    for (name, (secs, bytes)) in runs {
        println!(
            "archive  {name:<20}  {:>10.0} records/s  {:>7.1} MB/s  = {:.2} of ceiling  ({:.1} MB of files)",
            n as f64 / secs,
            mb / secs,
            (n as f64 / secs) / ceiling,
            bytes as f64 / 1e6
        );
    }
    let archive = Archive::open(&local)?;
    let summary = restore(
        &kafka_args(""),
        &archive,
        &RestoreRequest {
            topic: topic.clone(),
            partition: None,
            from: None,
            to: None,
            into: unique("bench-restored"),
            allow_nonempty: false,
        },
        |_| {},
    )
    .await?;
    println!(
        "restore  local directory       {:>10.0} records/s  ({} records, {} files)",
        summary.records as f64 / summary.elapsed.as_secs_f64(),
        summary.records,
        summary.files
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
