//! The archiver, restore and replay against the real broker, a local directory and the S3
//! server (garage).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use cdp_archiver::restore::{restore, RestoreRequest};
use cdp_archiver::{Archive, ArchiverArgs, ArchiverConfig, StoreArgs};
use cdp_integration_tests::archive::{
    archived_count, check_gapless, local_store, produce_mix, read_archive, read_log, require_s3,
    s3_endpoint, s3_store, wait_gapless, OwnS3,
};
use cdp_integration_tests::{brokers, create_topics, kafka_args, metric_sum, unique, wait_until};
use cdp_runtime::admin::Readiness;
use cdp_runtime::config::RunnerArgs;
use cdp_runtime::metrics::Metrics;
use cdp_runtime::Shutdown;
use rand::Rng;

const T0: i64 = 1_763_800_000_000;

fn archiver_args(topic: &str, codec: cdp_archiver::ocf::Codec, max_records: u64) -> ArchiverArgs {
    ArchiverArgs {
        group: unique("archiver"),
        topics: vec![topic.to_owned()],
        codec,
        max_records,
        max_bytes: 64 * 1024 * 1024,
        window_secs: 3_600,
        grace_ms: 500,
        acknowledged_gaps: Vec::new(),
        max_buffered_bytes: 1024 * 1024 * 1024,
    }
}

fn tuning() -> RunnerArgs {
    RunnerArgs {
        batch_size: 1_000,
        batch_linger_ms: 50,
        retry_backoff_max_ms: 1_000,
        ..RunnerArgs::default()
    }
}

/// An archiver running in this process until dropped.
struct Running {
    shutdown: Shutdown,
    task: Option<tokio::task::JoinHandle<Result<(), cdp_archiver::ArchiverError>>>,
}

impl Running {
    fn start(archiver: ArchiverArgs, store: StoreArgs, metrics: &Metrics) -> Self {
        let shutdown = Shutdown::new();
        let config = ArchiverConfig {
            kafka: kafka_args(""),
            runner: tuning(),
            archiver,
            store,
        };
        let (m, s) = (metrics.clone(), shutdown.clone());
        let task =
            tokio::spawn(
                async move { cdp_archiver::run(config, &m, &Readiness::default(), s).await },
            );
        Self {
            shutdown,
            task: Some(task),
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }

    /// Whether the archiver stopped on its own.
    fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// How an archiver that stopped on its own ended: its error, with every cause.
    async fn outcome(mut self) -> anyhow::Result<Option<String>> {
        let Some(t) = self.task.take() else {
            return Ok(None);
        };
        Ok(t.await?
            .err()
            .map(|e| format!("{:#}", anyhow::Error::from(e))))
    }

    /// Waits for the archiver to stop on its own, and returns its error (with every cause).
    async fn error(self) -> anyhow::Result<String> {
        wait_until("the archiver stopped", Duration::from_secs(60), || async {
            Ok(self.finished())
        })
        .await?;
        self.outcome()
            .await?
            .context("the archiver stopped without an error")
    }
}

/// Deletes a partition's records below `before` (the log start moves, as retention moves it).
async fn delete_records(topic: &str, partition: i32, before: i64) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))?;
    let done = admin
        .delete_records(
            &tpl,
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for e in done.elements() {
        e.error()?;
    }
    Ok(())
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// The archiver as its own process, to SIGKILL it.
fn spawn_probe(topic: &str, group: &str, store: &StoreArgs) -> anyhow::Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_archiver-probe"))
        .env("CDP_KAFKA_BROKERS", brokers())
        .env("CDP_ARCHIVE_TOPICS", topic)
        .env("CDP_ARCHIVER_GROUP", group)
        .env("CDP_ARCHIVE_URL", &store.archive_url)
        .env("CDP_ARCHIVE_MAX_RECORDS", "1500")
        .env("CDP_ARCHIVE_GRACE_MS", "500")
        .env("CDP_ARCHIVE_WINDOW_SECS", "3600")
        .env("CDP_BATCH_SIZE", "200")
        .env("CDP_BATCH_SIZE_MAX", "200")
        // A killed member holds its partitions until its session times out; small fetches
        // keep the archiver slow enough for the kills to land mid-run.
        .env(
            "CDP_KAFKA_PROPERTIES",
            "session.timeout.ms=6000,heartbeat.interval.ms=500,max.partition.fetch.bytes=4096",
        )
        // What a probe did is in the test's output when it fails.
        .env("CDP_LOG", "warn,cdp_runtime=info,cdp_archiver=info")
        .env("CDP_LOG_FORMAT", "pretty")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning archiver-probe")
}

/// A child process that is SIGKILLed when the test ends, passed or failed.
struct KillOnDrop(Child);

impl KillOnDrop {
    fn kill_now(&mut self) -> anyhow::Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_leaves_no_gap_and_no_duplicate() -> anyhow::Result<()> {
    const N: usize = 100_000;
    let topic = unique("archive-kill");
    create_topics(&[(&topic, 6)]).await?;
    let t = std::time::Instant::now();
    produce_mix(&topic, 6, N, T0).await?;
    eprintln!("[{:?}] produced", t.elapsed());
    let log = read_log(&topic).await?;
    eprintln!("[{:?}] log read", t.elapsed());
    ensure!(log.values().map(Vec::len).sum::<usize>() == N);
    let (store, dir) = local_store();
    let archive = Archive::open(&store)?;
    let group = unique("archiver-kill");
    let mut rng = rand::rng();
    // One kill in each fifth of the run, at a random point within it.
    let points: Vec<usize> = (0..5)
        .map(|k| 3_000 + k * 18_000 + rng.random_range(0..15_000))
        .collect();
    for (i, point) in points.iter().enumerate() {
        // Each run archives something of its own before it dies.
        let target = (*point as u64)
            .max(archived_count(&archive, &topic).await? + 1_000)
            .min(N as u64 - 1);
        let mut child = KillOnDrop(spawn_probe(&topic, &group, &store)?);
        wait_until(
            &format!("{target} records archived before kill {}", i + 1),
            Duration::from_secs(120),
            || async { Ok(archived_count(&archive, &topic).await? >= target) },
        )
        .await?;
        // A random extra moment, so the kill lands in any phase (consuming, encoding,
        // uploading, renaming).
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
        child.kill_now()?;
        eprintln!("[{:?}] kill {} at >= {target}", t.elapsed(), i + 1);
        // What is there after every kill is already gapless up to where it stops.
        let archived = read_archive(&archive, &topic).await?;
        for (p, files) in &archived.files {
            for w in files.windows(2) {
                ensure!(
                    w[0].1 + 1 == w[1].0,
                    "partition {p}: files {:?} then {:?}",
                    w[0],
                    w[1]
                );
            }
        }
    }
    let mut child = KillOnDrop(spawn_probe(&topic, &group, &store)?);
    let archived = wait_gapless(&archive, &topic, &log, Duration::from_secs(180)).await?;
    child.kill_now()?;
    let files: usize = archived.files.values().map(Vec::len).sum();
    ensure!(files >= 6 * 2, "expected many files, got {files}");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fastavro_reads_the_files_with_the_same_records() -> anyhow::Result<()> {
    let python = cdp_integration_tests::stack_python()?;
    for codec in [
        cdp_archiver::ocf::Codec::Zstandard,
        cdp_archiver::ocf::Codec::Deflate,
    ] {
        let topic = unique("archive-fastavro");
        create_topics(&[(&topic, 3)]).await?;
        produce_mix(&topic, 3, 3_000, T0).await?;
        let log = read_log(&topic).await?;
        let (store, dir) = local_store();
        let archive = Archive::open(&store)?;
        let running = Running::start(archiver_args(&topic, codec, 400), store, &Metrics::new());
        let archived = wait_gapless(&archive, &topic, &log, Duration::from_secs(60)).await?;
        running.stop().await?;
        // fastavro reads every file; print per-file count and every record's offset, key,
        // value (hex) and headers, as JSON lines.
        let script = r#"
import json, sys, glob, fastavro
for path in sorted(glob.glob(sys.argv[1] + '/**/*.avro', recursive=True)):
    with open(path, 'rb') as f:
        reader = fastavro.reader(f)
        codec = reader.metadata.get('avro.codec')
        for r in reader:
            print(json.dumps({'codec': codec, 'partition': r['partition'], 'offset': r['offset'],
                'key': None if r['key'] is None else r['key'].hex(),
                'value': None if r['value'] is None else r['value'].hex(),
                'ts': None if r['timestamp'] is None else int(r['timestamp'].timestamp() * 1000),
                'headers': [[h['key'], None if h['value'] is None else h['value'].hex()] for h in r['headers']]}))
"#;
        let out = Command::new(&python)
            .args(["-c", script])
            .arg(&dir)
            .output()
            .context("running fastavro")?;
        ensure!(
            out.status.success(),
            "fastavro failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let total: usize = archived.records.values().map(Vec::len).sum();
        ensure!(
            lines.len() == total,
            "fastavro read {} records, we archived {total}",
            lines.len()
        );
        let hex = |b: Option<&[u8]>| {
            b.map(|b| serde_json::Value::String(b.iter().map(|x| format!("{x:02x}")).collect()))
                .unwrap_or(serde_json::Value::Null)
        };
        let mut by_pos: BTreeMap<(i64, i64), &serde_json::Value> = BTreeMap::new();
        for l in &lines {
            ensure!(l["codec"] == codec.avro_name(), "codec {:?}", l["codec"]);
            by_pos.insert(
                (
                    l["partition"].as_i64().unwrap_or(-1),
                    l["offset"].as_i64().unwrap_or(-1),
                ),
                l,
            );
        }
        for recs in log.values() {
            for r in recs {
                let l = by_pos
                    .get(&(i64::from(r.partition), r.offset))
                    .with_context(|| format!("fastavro lacks {}:{}", r.partition, r.offset))?;
                ensure!(
                    l["key"] == hex(r.key.as_deref()) && l["value"] == hex(r.value.as_deref()),
                    "{}:{} differs",
                    r.partition,
                    r.offset
                );
                ensure!(
                    l["ts"].as_i64() == r.timestamp_ms,
                    "{}:{} timestamp",
                    r.partition,
                    r.offset
                );
                let headers: Vec<serde_json::Value> = r
                    .headers
                    .iter()
                    .map(|(k, v)| serde_json::json!([k, hex(v)]))
                    .collect();
                ensure!(
                    l["headers"] == serde_json::Value::Array(headers),
                    "{}:{} headers",
                    r.partition,
                    r.offset
                );
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// Archives a topic, deletes it, restores into a new topic and compares per partition.
async fn round_trip(store: StoreArgs) -> anyhow::Result<()> {
    let topic = unique("archive-restore");
    create_topics(&[(&topic, 4)]).await?;
    produce_mix(&topic, 4, 6_000, T0).await?;
    let log = read_log(&topic).await?;
    let tombstones: usize = log.values().flatten().filter(|r| r.value.is_none()).count();
    ensure!(tombstones > 100, "the mix has tombstones ({tombstones})");
    let archive = Archive::open(&store)?;
    let running = Running::start(
        archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 1_000),
        store.clone(),
        &Metrics::new(),
    );
    let archived = wait_gapless(&archive, &topic, &log, Duration::from_secs(60)).await?;
    running.stop().await?;
    let archived_tombstones = archived
        .records
        .values()
        .flatten()
        .filter(|r| r.value.is_none())
        .count();
    ensure!(
        archived_tombstones == tombstones,
        "{archived_tombstones} of {tombstones} tombstones archived"
    );

    // Retention expired: the topic is gone.
    delete_topic(&topic).await?;
    let into = unique("archive-restored");
    let req = RestoreRequest {
        topic: topic.clone(),
        partition: None,
        from: None,
        to: None,
        into: into.clone(),
        allow_nonempty: false,
    };
    let mut calls = 0;
    let summary = restore(&kafka_args(""), &archive, &req, |_| calls += 1).await?;
    ensure!(summary.records == 6_000, "restored {}", summary.records);
    ensure!(calls > summary.files, "progress is reported per file");
    let restored = read_log(&into).await?;
    ensure!(restored.len() == log.len(), "partition count");
    for (p, expected) in &log {
        let got = restored
            .get(p)
            .with_context(|| format!("partition {p} restored"))?;
        ensure!(
            got.len() == expected.len(),
            "partition {p}: {} of {}",
            got.len(),
            expected.len()
        );
        for (a, b) in got.iter().zip(expected) {
            ensure!(
                a.key == b.key
                    && a.value == b.value
                    && a.headers == b.headers
                    && a.timestamp_ms == b.timestamp_ms,
                "partition {p}: record {} restored as {}, differs",
                b.offset,
                a.offset
            );
        }
    }
    // A second restore into the now non-empty topic is refused.
    let again = restore(&kafka_args(""), &archive, &req, |_| {}).await;
    ensure!(
        matches!(
            again,
            Err(cdp_archiver::restore::RestoreError::NotEmpty { .. })
        ),
        "restoring twice into the same topic must be refused, got {again:?}"
    );
    Ok(())
}

async fn delete_topic(topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    for r in admin.delete_topics(&[topic], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("deleting {t}: {e}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_round_trip_from_a_local_directory() -> anyhow::Result<()> {
    let (store, dir) = local_store();
    round_trip(store).await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tombstones_survive_archive_and_restore_through_s3() -> anyhow::Result<()> {
    let endpoint = s3_endpoint();
    require_s3(&endpoint).await?;
    round_trip(s3_store(&endpoint)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_30_second_s3_outage_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let s3 = OwnS3::start()?;
    let store = s3_store(&s3.endpoint());
    let topic = unique("archive-outage");
    create_topics(&[(&topic, 6)]).await?;
    produce_mix(&topic, 6, 10_000, T0).await?;
    let archive = Archive::open(&store)?;
    let metrics = Metrics::new();
    let running = Running::start(
        archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 500),
        store,
        &metrics,
    );
    wait_until("a first part archived", Duration::from_secs(60), || async {
        Ok(archived_count(&archive, &topic).await? >= 3_000)
    })
    .await?;
    s3.kill()?;
    // Records keep arriving while the store is down.
    produce_mix(&topic, 6, 10_000, T0 + 10_000).await?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    s3.resume()?;
    let log = read_log(&topic).await?;
    let archived = wait_gapless(&archive, &topic, &log, Duration::from_secs(120)).await?;
    running.stop().await?;
    check_gapless(&archived, &log)?;
    let failures = metric_sum(&metrics, "cdp_archive_upload_failures_total")?;
    ensure!(
        failures > 0.0,
        "the outage was noticed (upload failures counted)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_moves_offsets_refuses_live_members_and_dry_run_changes_nothing(
) -> anyhow::Result<()> {
    use cdp_runtime::replay::{self, PositionStore, ReplayError, Target};
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    let topic = unique("replay");
    create_topics(&[(&topic, 3)]).await?;
    produce_mix(&topic, 3, 3_000, T0).await?;
    let log = read_log(&topic).await?;
    let ends: BTreeMap<i32, i64> = log
        .iter()
        .map(|(p, v)| (*p, v.last().map_or(0, |r| r.offset + 1)))
        .collect();
    let group = unique("replay-group");
    let kafka = kafka_args("");
    let topics = vec![topic.clone()];

    // The group has consumed everything.
    let committed = |group: String, topic: String| async move {
        tokio::task::spawn_blocking(move || -> anyhow::Result<BTreeMap<i32, i64>> {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", &group)
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..3 {
                tpl.add_partition(&topic, p);
            }
            let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
            Ok(got
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect())
        })
        .await?
    };
    {
        let (g, t, ends) = (group.clone(), topic.clone(), ends.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", &g)
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for (p, end) in &ends {
                tpl.add_partition_offset(&t, *p, Offset::Offset(*end))?;
            }
            c.commit(&tpl, CommitMode::Sync)?;
            Ok(())
        })
        .await??;
    }
    ensure!(committed(group.clone(), topic.clone()).await? == ends);
    let store = PositionStore::Kafka {
        group: group.clone(),
    };

    // Dry run: a plan, nothing moved.
    let plan = replay::plan(&kafka, &store, &topics, &Target::Earliest).await?;
    ensure!(plan.moves.len() == 3);
    for m in &plan.moves {
        ensure!(
            m.target == 0 && m.current == ends.get(&m.partition.partition).copied(),
            "{m:?}"
        );
    }
    ensure!(
        committed(group.clone(), topic.clone()).await? == ends,
        "planning changed nothing"
    );

    // A live member: refused.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let member = {
        let (g, t, stop) = (group.clone(), topic.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("group.id", &g)
                .set("enable.auto.commit", "false")
                .create()?;
            c.subscribe(&[&t])?;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.poll(Duration::from_millis(100));
            }
            c.unsubscribe();
            Ok(())
        })
    };
    wait_until("the member joined", Duration::from_secs(30), || async {
        let (k, g) = (kafka.clone(), group.clone());
        Ok(
            !tokio::task::spawn_blocking(move || replay::live_members(&k, &g))
                .await??
                .is_empty(),
        )
    })
    .await?;
    let refused = replay::apply(&kafka, &store, &plan, false).await;
    ensure!(
        matches!(refused, Err(ReplayError::LiveMembers { .. })),
        "{refused:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    member
        .join()
        .map_err(|_| anyhow::anyhow!("member thread panicked"))??;
    ensure!(
        committed(group.clone(), topic.clone()).await? == ends,
        "the refusal changed nothing"
    );

    // Members gone: earliest, then a time, then explicit offsets.
    wait_until("the member left", Duration::from_secs(30), || async {
        let (k, g) = (kafka.clone(), group.clone());
        Ok(
            tokio::task::spawn_blocking(move || replay::live_members(&k, &g))
                .await??
                .is_empty(),
        )
    })
    .await?;
    replay::apply(&kafka, &store, &plan, false).await?;
    ensure!(committed(group.clone(), topic.clone())
        .await?
        .values()
        .all(|o| *o == 0));

    // The first record at or after T0 + 1500 ms, per partition.
    let at = chrono::DateTime::from_timestamp_millis(T0 + 1_500).context("time")?;
    let plan = replay::plan(&kafka, &store, &topics, &Target::Time(at)).await?;
    replay::apply(&kafka, &store, &plan, false).await?;
    let got = committed(group.clone(), topic.clone()).await?;
    for (p, recs) in &log {
        let expected = recs
            .iter()
            .find(|r| r.timestamp_ms.is_some_and(|t| t >= T0 + 1_500))
            .map_or(ends[p], |r| r.offset);
        ensure!(
            got.get(p) == Some(&expected),
            "partition {p}: {:?} vs {expected}",
            got.get(p)
        );
    }
    let target: Target = format!("0:5,{topic}:2:7").parse()?;
    let plan = replay::plan(&kafka, &store, &topics, &target).await?;
    ensure!(plan.moves.len() == 2, "only the named partitions move");
    replay::apply(&kafka, &store, &plan, false).await?;
    let got = committed(group.clone(), topic.clone()).await?;
    ensure!(
        got.get(&0) == Some(&5) && got.get(&2) == Some(&7),
        "{got:?}"
    );

    // Postgres-stored positions (effectively-once services) move the same way.
    let db = cdp_integration_tests::TestDb::create().await?;
    let pool = cdp_runtime::pg::connect(&db.args()).await?;
    let pg_group = unique("replay-pg");
    let store = PositionStore::Postgres {
        pool: pool.clone(),
        group: pg_group.clone(),
    };
    let plan = replay::plan(&kafka, &store, &topics, &Target::Latest).await?;
    ensure!(plan.moves.iter().all(|m| m.current.is_none()));
    replay::apply(&kafka, &store, &plan, false).await?;
    let stored = cdp_runtime::pg::stored_positions(&pool, &pg_group).await?;
    for (p, end) in &ends {
        let tp = cdp_runtime::TopicPartition {
            topic: topic.clone(),
            partition: *p,
        };
        ensure!(
            stored.get(&tp) == Some(end),
            "partition {p}: {:?}",
            stored.get(&tp)
        );
    }
    pool.close().await;
    db.drop_db().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_archivers_in_one_group_hand_partitions_over_without_gap_or_duplicate(
) -> anyhow::Result<()> {
    let topic = unique("archive-pair");
    create_topics(&[(&topic, 6)]).await?;
    produce_mix(&topic, 6, 20_000, T0).await?;
    let (store, dir) = local_store();
    let archive = Archive::open(&store)?;
    let args = archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 700);
    let first = Running::start(args.clone(), store.clone(), &Metrics::new());
    wait_until("a first part archived", Duration::from_secs(60), || async {
        Ok(archived_count(&archive, &topic).await? >= 4_000)
    })
    .await?;
    // A second member joins (the partitions are split), more records arrive, then the first
    // leaves (the second takes everything).
    let second = Running::start(args, store, &Metrics::new());
    produce_mix(&topic, 6, 10_000, T0 + 20_000).await?;
    wait_until("more archived", Duration::from_secs(60), || async {
        Ok(archived_count(&archive, &topic).await? >= 12_000)
    })
    .await?;
    first.stop().await?;
    produce_mix(&topic, 6, 5_000, T0 + 30_000).await?;
    let log = read_log(&topic).await?;
    wait_gapless(&archive, &topic, &log, Duration::from_secs(120)).await?;
    second.stop().await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_start_past_the_archive_stops_the_archiver_until_the_loss_is_acknowledged(
) -> anyhow::Result<()> {
    let topic = unique("archive-gap");
    create_topics(&[(&topic, 1)]).await?;
    produce_mix(&topic, 1, 1_000, T0).await?;
    let (store, dir) = local_store();
    let archive = Archive::open(&store)?;
    let args = archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 100);
    let first = Running::start(args.clone(), store.clone(), &Metrics::new());
    wait_until(
        "1,000 records archived",
        Duration::from_secs(60),
        || async { Ok(archived_count(&archive, &topic).await? >= 1_000) },
    )
    .await?;
    first.stop().await?;
    // While no archiver runs, 500 more records come and the log start moves past 200 of
    // them: offsets 1000..=1199 are gone before they were archived.
    produce_mix(&topic, 1, 500, T0 + 10_000).await?;
    delete_records(&topic, 0, 1_200).await?;

    let metrics = Metrics::new();
    let stopped = Running::start(args.clone(), store.clone(), &metrics);
    let error = stopped.error().await?;
    ensure!(
        error.contains("offsets 1000..=1199")
            && error.contains(&format!(
                "CDP_ARCHIVE_ACKNOWLEDGED_GAPS={topic}:0:1000-1199"
            )),
        "the error names the partition, the range and the acknowledgement: {error}"
    );
    let gaps = metric_sum(&metrics, "cdp_archive_gaps_total")?;
    ensure!(gaps == 1.0, "archive_gaps {gaps}");
    ensure!(
        archived_count(&archive, &topic).await? == 1_000,
        "nothing archived past the gap"
    );

    // Acknowledged, the archiver goes on; the gap lies between two files and the file after
    // it names it.
    let acknowledged = cdp_archiver::ArchiverArgs {
        acknowledged_gaps: vec![format!("{topic}:0:1000-1199").parse()?],
        ..args
    };
    let resumed = Running::start(acknowledged, store, &Metrics::new());
    wait_until("the rest archived", Duration::from_secs(60), || async {
        Ok(archived_count(&archive, &topic).await? >= 1_300)
    })
    .await?;
    resumed.stop().await?;
    let archived = read_archive(&archive, &topic).await?;
    let files = archived.files.get(&0).cloned().unwrap_or_default();
    let starts: Vec<i64> = files.iter().map(|(first, _)| *first).collect();
    ensure!(
        starts[..10] == (0..10).map(|i| i * 100).collect::<Vec<_>>()[..] && starts[10] == 1_200,
        "files {files:?}"
    );
    let after = archive
        .list(&topic, Some(0))
        .await?
        .into_iter()
        .find(|f| f.name.first_offset == 1_200)
        .context("the file after the gap")?;
    ensure!(archive.header(&after).await?.gap_before() == Some((1_000, 1_199)));
    let log = read_log(&topic).await?;
    let offsets: Vec<i64> = archived.records[&0].iter().map(|r| r.offset).collect();
    let expected: Vec<i64> = (0..1_000).chain(1_200..1_500).collect();
    ensure!(offsets == expected, "archived offsets");
    ensure!(log[&0].first().map(|r| r.offset) == Some(1_200));
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_archivers_fighting_over_a_partition_never_overwrite_each_other() -> anyhow::Result<()>
{
    let topic = unique("archive-fight");
    create_topics(&[(&topic, 3)]).await?;
    let (store, dir) = local_store();
    let archive = Archive::open(&store)?;
    // Two archivers of different groups both own every partition (as an evicted member and
    // its successor do) and cut differently: their first files share names, not ranges.
    let (ma, mb) = (Metrics::new(), Metrics::new());
    let a = Running::start(
        archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 700),
        store.clone(),
        &ma,
    );
    let b = Running::start(
        archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 500),
        store.clone(),
        &mb,
    );
    // Both read the archive's (empty) position before anything is written.
    wait_until(
        "both archivers assigned",
        Duration::from_secs(60),
        || async {
            Ok(metric_sum(&ma, "cdp_consumer_assigned_partitions")? == 3.0
                && metric_sum(&mb, "cdp_consumer_assigned_partitions")? == 3.0)
        },
    )
    .await?;
    produce_mix(&topic, 3, 20_000, T0).await?;
    wait_until("one archiver fenced", Duration::from_secs(120), || async {
        Ok(a.finished() || b.finished())
    })
    .await?;
    let mut fenced = 0;
    for r in [a, b] {
        if r.finished() {
            let error = r.outcome().await?.unwrap_or_default();
            ensure!(
                error.contains("another archiver wrote partition"),
                "{error}"
            );
            fenced += 1;
        } else {
            r.stop().await?;
        }
    }
    ensure!(fenced >= 1);
    // Whatever each wrote stays as written; a third archiver finishes from the archive.
    let last = Running::start(
        archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 700),
        store,
        &Metrics::new(),
    );
    let log = read_log(&topic).await?;
    wait_gapless(&archive, &topic, &log, Duration::from_secs(120)).await?;
    last.stop().await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_partitions_stay_within_the_buffer_budget_and_stay_gapless() -> anyhow::Result<()> {
    const N: usize = 20_000;
    const BUDGET: u64 = 512 * 1024;
    let topic = unique("archive-budget");
    create_topics(&[(&topic, 24)]).await?;
    produce_mix(&topic, 24, N, T0).await?;
    let (store, dir) = local_store();
    let archive = Archive::open(&store)?;
    // No count, size or time rule cuts a file within the test (one window, a grace of an
    // hour): only the budget over all 24 partitions (about 4.8 MB of records) does.
    let args = ArchiverArgs {
        max_records: 10_000_000,
        grace_ms: 3_600_000,
        max_buffered_bytes: BUDGET,
        ..archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 1)
    };
    let metrics = Metrics::new();
    let running = Running::start(args, store, &metrics);
    wait_until(
        "most records archived under pressure",
        Duration::from_secs(120),
        || async { Ok(archived_count(&archive, &topic).await? >= 15_000) },
    )
    .await?;
    let unlabelled = |name: &str| -> anyhow::Result<f64> {
        metrics
            .encode()?
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .with_context(|| format!("no {name}"))
    };
    let cuts = unlabelled("cdp_archive_pressure_cuts_total")?;
    ensure!(cuts > 0.0, "pressure cuts {cuts}");
    running.stop().await?;
    let held = unlabelled("cdp_archive_buffered_bytes")?;
    ensure!(held <= BUDGET as f64, "held {held} after a batch");
    // What was archived is each partition's log from its start, file after file.
    let archived = read_archive(&archive, &topic).await?;
    let log = read_log(&topic).await?;
    for (p, files) in &archived.files {
        let mut next = 0;
        for (first, last) in files {
            ensure!(
                *first == next,
                "partition {p}: a file starts at {first}, expected {next}"
            );
            next = last + 1;
        }
        let got: Vec<_> = archived.records[p]
            .iter()
            .map(cdp_integration_tests::archive::as_raw)
            .collect();
        ensure!(
            got[..] == log[p][..got.len()],
            "partition {p}: records differ from the log"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_archive_ahead_of_a_recreated_topic_stops_the_archiver() -> anyhow::Result<()> {
    let topic = unique("archive-ahead");
    create_topics(&[(&topic, 1)]).await?;
    produce_mix(&topic, 1, 300, T0).await?;
    let (store, dir) = local_store();
    let archive = Archive::open(&store)?;
    let args = archiver_args(&topic, cdp_archiver::ocf::Codec::Zstandard, 100);
    let first = Running::start(args.clone(), store.clone(), &Metrics::new());
    wait_until("300 records archived", Duration::from_secs(60), || async {
        Ok(archived_count(&archive, &topic).await? >= 300)
    })
    .await?;
    first.stop().await?;
    // The topic is deleted and created again: its log starts over at offset 0.
    delete_topic(&topic).await?;
    wait_until(
        "the topic created again",
        Duration::from_secs(60),
        || async { Ok(create_topics(&[(&topic, 1)]).await.is_ok()) },
    )
    .await?;
    produce_mix(&topic, 1, 50, T0 + 60_000).await?;
    let stopped = Running::start(args, store, &Metrics::new());
    let error = stopped.error().await?;
    ensure!(
        error.contains("the archive holds offsets up to 299 but the log ends at 50"),
        "{error}"
    );
    ensure!(
        archived_count(&archive, &topic).await? == 300,
        "nothing of the new log archived as the old"
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
