//! The consumer runner against the real broker and Postgres: effectively-once across
//! SIGKILL, rebalances, poison records and graceful shutdown.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cdp_integration_tests::*;
use cdp_runtime::config::RunnerArgs;
use cdp_runtime::dlq::headers;
use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::kafka::runner::{self, RunnerConfig, StartFrom};
use cdp_runtime::metrics::{Metrics, RunnerMetrics};
use cdp_runtime::pg::PgSink;
use cdp_runtime::Shutdown;
use rand::Rng;

struct Probe {
    topic: String,
    group: String,
    dlq: String,
    db_url: String,
    batch_size: usize,
    delay_ms: u64,
}

impl Probe {
    fn spawn(&self) -> anyhow::Result<Child> {
        Command::new(env!("CARGO_BIN_EXE_runner-probe"))
            .env("CDP_KAFKA_BROKERS", brokers())
            .env("CDP_DATABASE_URL", &self.db_url)
            .env("CDP_BATCH_SIZE", self.batch_size.to_string())
            .env("CDP_BATCH_SIZE_MAX", (4 * self.batch_size).to_string())
            .env(
                "CDP_KAFKA_PROPERTIES",
                "session.timeout.ms=6000,heartbeat.interval.ms=500",
            )
            .env("PROBE_TOPIC", &self.topic)
            .env("PROBE_GROUP", &self.group)
            .env("PROBE_DLQ", &self.dlq)
            .env("PROBE_DELAY_MS", self.delay_ms.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("spawning runner-probe")
    }
}

/// A topic (2 partitions) with `n` events already waiting, its DLQ and group, and a database
/// with the probe table: the setup of the in-process runner tests.
struct Backlog {
    topic: String,
    dlq: String,
    group: String,
    db: TestDb,
    producer: Arc<Producer>,
}

impl Backlog {
    async fn create(name: &str, n: u64) -> anyhow::Result<Self> {
        Self::with_partitions(name, n, 2).await
    }

    /// A topic of `partitions` partitions holding `n` events, its dead-letter topic, a
    /// database with the probe table.
    async fn with_partitions(name: &str, n: u64, partitions: i32) -> anyhow::Result<Self> {
        let topic = unique(&format!("runner-{name}"));
        let dlq = unique(&format!("runner-{name}-dlq"));
        let group = unique(&format!("runner-{name}-group"));
        create_topics(&[(&topic, partitions), (&dlq, 1)]).await?;
        let db = TestDb::create().await?;
        create_probe_table(&db.pool).await?;
        let producer = Arc::new(Producer::new(&kafka_args(""))?);
        produce_events(&producer, &topic, n, partitions).await?;
        Ok(Self {
            topic,
            dlq,
            group,
            db,
            producer,
        })
    }

    fn config(&self, batch_size: usize) -> RunnerConfig {
        runner_config(&self.topic, &self.group, &self.dlq, batch_size)
    }

    /// Runs `handler` in-process until `n` probe rows exist, then shuts it down.
    async fn apply_all<H: cdp_runtime::pg::PgHandler>(
        &self,
        config: RunnerConfig,
        handler: H,
        metrics: &Metrics,
        n: u64,
    ) -> anyhow::Result<()> {
        self.apply_all_in_lanes(config, handler, metrics, n, 1)
            .await
    }

    /// [`Backlog::apply_all`] with a sink that applies each batch in `lanes` transactions.
    async fn apply_all_in_lanes<H: cdp_runtime::pg::PgHandler>(
        &self,
        config: RunnerConfig,
        handler: H,
        metrics: &Metrics,
        n: u64,
        lanes: u32,
    ) -> anyhow::Result<()> {
        let sink = Arc::new(
            PgSink::new(self.db.pool.clone(), self.group.clone(), handler).with_lanes(lanes),
        );
        let shutdown = Shutdown::new();
        let catch_up = config.catch_up.clone();
        let task = tokio::spawn(runner::run(
            config,
            sink,
            self.producer.clone(),
            RunnerMetrics::register(metrics),
            None,
            shutdown.clone(),
        ));
        wait_until("every record applied", Duration::from_secs(90), || async {
            Ok(probe_counts(&self.db.pool).await?.0 >= n as i64)
        })
        .await?;
        // With everything applied and nothing more to read, the runner is not behind.
        wait_until(
            "the runner no longer catching up",
            Duration::from_secs(30),
            || async { Ok(!catch_up.is_catching_up()) },
        )
        .await?;
        shutdown.trigger();
        task.await??;
        assert_eq!(probe_counts(&self.db.pool).await?, (n as i64, n as i64));
        Ok(())
    }
}

fn signal(child: &Child, sig: i32) -> anyhow::Result<()> {
    let pid = child.id();
    // `unsafe_code` is forbidden in the workspace, so signal through kill(1) rather than libc.
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

async fn wait_exit(
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "process did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_applies_every_record_exactly_once() -> anyhow::Result<()> {
    const N: i64 = 20_000;
    let topic = unique("runner-kill");
    let dlq = unique("runner-kill-dlq");
    create_topics(&[(&topic, 6), (&dlq, 1)]).await?;
    let db = TestDb::create().await?;
    create_probe_table(&db.pool).await?;
    let producer = Producer::new(&kafka_args(""))?;
    produce_events(&producer, &topic, N as u64, 6).await?;

    // Batches of 50 with a short pause inside each transaction: about 400 transactions,
    // so the kills land while work is in flight.
    let probe = Probe {
        topic: topic.clone(),
        group: unique("runner-kill-group"),
        dlq,
        db_url: db.url.clone(),
        batch_size: 50,
        delay_ms: 10,
    };
    let mut rng = rand::rng();
    // Up to 60%: from a kill point the wait's polling (100 ms) and the random extra moment
    // pass before the kill, and a point at 90% (2,000 records, ten batches of up to 200)
    // let the probe finish first once in a while (seen here).
    let mut kill_points: Vec<i64> = (0..6)
        .map(|_| rng.random_range(N / 20..N * 3 / 5))
        .collect();
    kill_points.sort_unstable();
    for (i, point) in kill_points.iter().enumerate() {
        let mut child = probe.spawn()?;
        wait_until(
            &format!("{point} rows before kill {}", i + 1),
            Duration::from_secs(120),
            || async { Ok(probe_counts(&db.pool).await?.0 >= *point) },
        )
        .await?;
        // A random extra moment, so the kill hits any phase of a batch.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
        signal(&child, 9)?;
        let status = wait_exit(&mut child, Duration::from_secs(10)).await?;
        let rows = probe_counts(&db.pool).await?.0;
        eprintln!(
            "kill {}: SIGKILL at >= {point} rows ({status}); {rows} rows after",
            i + 1
        );
        assert!(rows < N, "the run finished before kill {}", i + 1);
    }

    let mut child = probe.spawn()?;
    wait_until("all records applied", Duration::from_secs(180), || async {
        Ok(probe_counts(&db.pool).await?.0 >= N)
    })
    .await?;
    signal(&child, 15)?;
    let status = wait_exit(&mut child, Duration::from_secs(30)).await?;
    assert!(status.success(), "graceful stop exits 0, got {status}");

    let (rows, distinct) = probe_counts(&db.pool).await?;
    assert_eq!(
        (rows, distinct),
        (N, N),
        "every record applied exactly once"
    );
    db.drop_db().await
}

fn runner_config(topic: &str, group: &str, dlq: &str, batch_size: usize) -> RunnerConfig {
    let mut kafka = kafka_args("");
    kafka.properties = vec![
        "session.timeout.ms=6000".into(),
        "heartbeat.interval.ms=500".into(),
    ];
    RunnerConfig {
        kafka,
        group_id: group.to_owned(),
        topics: vec![topic.to_owned()],
        dead_letter_topic: dlq.to_owned(),
        tuning: RunnerArgs {
            batch_size,
            batch_linger_ms: 50,
            ..RunnerArgs::default()
        },
        start: StartFrom::Earliest,
        catch_up: Default::default(),
    }
}

/// The value of a runner gauge (the process has one group in these tests), if it was set.
fn gauge(metrics: &Metrics, name: &str) -> Option<i64> {
    let text = metrics.encode().unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn assigned(metrics: &Metrics) -> i64 {
    gauge(metrics, "cdp_consumer_assigned_partitions").unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_consumer_hands_its_partitions_over_without_loss_or_repeat() -> anyhow::Result<()>
{
    const N: u64 = 6_000;
    let topic = unique("runner-rebalance");
    let dlq = unique("runner-rebalance-dlq");
    let group = unique("runner-rebalance-group");
    create_topics(&[(&topic, 6), (&dlq, 1)]).await?;
    let db = TestDb::create().await?;
    create_probe_table(&db.pool).await?;
    let producer = Arc::new(Producer::new(&kafka_args(""))?);

    let start = |shutdown: Shutdown, metrics: Metrics| {
        let sink = Arc::new(PgSink::new(
            db.pool.clone(),
            group.clone(),
            ProbeHandler {
                delay: Duration::ZERO,
            },
        ));
        let config = runner_config(&topic, &group, &dlq, 100);
        let producer = producer.clone();
        tokio::spawn(async move {
            runner::run(
                config,
                sink,
                producer,
                RunnerMetrics::register(&metrics),
                None,
                shutdown,
            )
            .await
        })
    };
    let (stop_a, stop_b) = (Shutdown::new(), Shutdown::new());
    let (metrics_a, metrics_b) = (Metrics::new(), Metrics::new());
    let a = start(stop_a.clone(), metrics_a.clone());
    let b = start(stop_b.clone(), metrics_b.clone());
    wait_until(
        "both consumers own partitions",
        Duration::from_secs(60),
        || async {
            Ok(assigned(&metrics_a) > 0
                && assigned(&metrics_b) > 0
                && assigned(&metrics_a) + assigned(&metrics_b) == 6)
        },
    )
    .await?;

    produce_events(&producer, &topic, N / 2, 6).await?;
    wait_until("some records applied", Duration::from_secs(60), || async {
        Ok(probe_counts(&db.pool).await?.0 > 0)
    })
    .await?;
    stop_a.trigger();
    a.await??;
    wait_until(
        "the survivor owns every partition",
        Duration::from_secs(60),
        || async { Ok(assigned(&metrics_b) == 6) },
    )
    .await?;
    // Second half goes only to the survivor.
    let more: Vec<String> = (N / 2..N).map(|i| format!("k{i}")).collect();
    for chunk in more.chunks(1000) {
        let values: Vec<Vec<u8>> = chunk
            .iter()
            .map(|k| cdp_schemas::encode(&event(0, k)))
            .collect::<Result<_, _>>()?;
        let recs: Vec<OutgoingRecord<'_>> = chunk
            .iter()
            .zip(&values)
            .map(|(k, v)| OutgoingRecord {
                topic: &topic,
                key: Some(k.as_bytes()),
                value: Some(v),
                ..Default::default()
            })
            .collect();
        producer.send_all(&recs).await?;
    }
    wait_until("every record applied", Duration::from_secs(120), || async {
        Ok(probe_counts(&db.pool).await?.0 >= N as i64)
    })
    .await?;
    stop_b.trigger();
    b.await??;
    let (rows, distinct) = probe_counts(&db.pool).await?;
    assert_eq!((rows, distinct), (N as i64, N as i64));
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_the_partition_moves_on() -> anyhow::Result<()> {
    let topic = unique("runner-poison");
    let dlq = unique("runner-poison-dlq");
    let group = unique("runner-poison-group");
    create_topics(&[(&topic, 1), (&dlq, 1)]).await?;
    let db = TestDb::create().await?;
    create_probe_table(&db.pool).await?;
    let producer = Arc::new(Producer::new(&kafka_args(""))?);

    produce_events(&producer, &topic, 100, 1).await?;
    // Offset 100: not Avro at all. Offset 101: valid Avro the handler refuses.
    producer
        .send(OutgoingRecord {
            topic: &topic,
            key: Some(b"garbage"),
            value: Some(b"{\"not\": \"avro\"}"),
            headers: vec![("origin", Some(b"test".as_slice()))],
            ..Default::default()
        })
        .await?;
    let mut refused = event(0, "refused");
    refused.envelope.source = "reject-me".to_owned();
    let refused_bytes = cdp_schemas::encode(&refused)?;
    producer
        .send(OutgoingRecord {
            topic: &topic,
            key: Some(b"refused"),
            value: Some(&refused_bytes),
            ..Default::default()
        })
        .await?;
    let after: Vec<String> = (100..200).map(|i| format!("k{i}")).collect();
    let values: Vec<Vec<u8>> = after
        .iter()
        .map(|k| cdp_schemas::encode(&event(0, k)))
        .collect::<Result<_, _>>()?;
    let recs: Vec<OutgoingRecord<'_>> = after
        .iter()
        .zip(&values)
        .map(|(k, v)| OutgoingRecord {
            topic: &topic,
            key: Some(k.as_bytes()),
            value: Some(v),
            ..Default::default()
        })
        .collect();
    producer.send_all(&recs).await?;

    let shutdown = Shutdown::new();
    let sink = Arc::new(PgSink::new(
        db.pool.clone(),
        group.clone(),
        ProbeHandler {
            delay: Duration::ZERO,
        },
    ));
    let metrics = Metrics::new();
    let task = tokio::spawn(runner::run(
        runner_config(&topic, &group, &dlq, 64),
        sink,
        producer.clone(),
        RunnerMetrics::register(&metrics),
        None,
        shutdown.clone(),
    ));
    wait_until(
        "the records around the poison applied",
        Duration::from_secs(60),
        || async { Ok(probe_counts(&db.pool).await?.0 >= 200) },
    )
    .await?;
    shutdown.trigger();
    task.await??;
    assert_eq!(probe_counts(&db.pool).await?, (200, 200));
    let stored = cdp_runtime::pg::stored_positions(&db.pool, &group).await?;
    assert_eq!(
        stored.values().copied().collect::<Vec<_>>(),
        vec![202],
        "positions moved past the poison"
    );

    // Both rejected records are in the dead-letter topic, unchanged, with their story.
    let dlq_records = consume(&dlq, 2, Duration::from_secs(60)).await?;
    assert_eq!(dlq_records.len(), 2);
    let garbage = &dlq_records[0];
    assert_eq!(
        garbage.value.as_deref(),
        Some(b"{\"not\": \"avro\"}".as_slice())
    );
    assert_eq!(garbage.headers["origin"], "test");
    assert_eq!(garbage.headers[headers::KIND], "bad_magic");
    assert!(garbage.headers[headers::REASON].contains("single-object marker"));
    assert_eq!(garbage.headers[headers::TOPIC], topic);
    assert_eq!(garbage.headers[headers::PARTITION], "0");
    assert_eq!(garbage.headers[headers::OFFSET], "100");
    assert_eq!(garbage.headers[headers::GROUP], group);
    let refused = &dlq_records[1];
    assert_eq!(refused.headers[headers::KIND], "invalid");
    assert_eq!(refused.headers[headers::OFFSET], "101");
    assert!(metrics.encode()?.contains("outcome=\"DeadLettered\"} 2"));
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_batch_exits_zero_with_the_batch_all_or_nothing() -> anyhow::Result<()> {
    let topic = unique("runner-term");
    let dlq = unique("runner-term-dlq");
    create_topics(&[(&topic, 1), (&dlq, 1)]).await?;
    let db = TestDb::create().await?;
    create_probe_table(&db.pool).await?;
    let producer = Producer::new(&kafka_args(""))?;
    produce_events(&producer, &topic, 2_000, 1).await?;
    let probe = Probe {
        topic: topic.clone(),
        group: unique("runner-term-group"),
        dlq,
        db_url: db.url.clone(),
        batch_size: 100,
        delay_ms: 1_500,
    };
    let mut child = probe.spawn()?;
    // Wait until a batch is inside its transaction (sleeping in pg_sleep), then SIGTERM.
    wait_until("a batch in flight", Duration::from_secs(60), || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%' AND state = 'active'",
        )
        .fetch_one(&db.pool)
        .await?;
        Ok(n > 0)
    })
    .await?;
    signal(&child, 15)?;
    let status = wait_exit(&mut child, Duration::from_secs(30)).await?;
    assert!(status.success(), "SIGTERM exits 0, got {status}");

    // The stored position and the applied rows agree exactly: the batch in flight was
    // applied whole (or not at all), never in part.
    let stored = cdp_runtime::pg::stored_positions(&db.pool, &probe.group).await?;
    let next = stored.values().copied().next().unwrap_or(0);
    let offsets: Vec<(i64,)> =
        sqlx::query_as("SELECT kafka_offset FROM probe_applied ORDER BY kafka_offset")
            .fetch_all(&db.pool)
            .await?;
    let offsets: Vec<i64> = offsets.into_iter().map(|(o,)| o).collect();
    assert!(
        next > 0,
        "the batch in flight when SIGTERM came was finished"
    );
    assert_eq!(offsets, (0..next).collect::<Vec<_>>());
    db.drop_db().await
}

/// The probe, failing (after writing) the first `failures` transactions with a retryable
/// error, or the first that carry records of `failing_partition` only; it also counts the
/// transactions in flight at once.
struct Flaky {
    inner: ProbeHandler,
    failures: std::sync::atomic::AtomicU32,
    failing_partition: Option<i32>,
    in_flight: std::sync::atomic::AtomicU32,
    /// Shared with the test, which reads it after the run.
    most_in_flight: Arc<std::sync::atomic::AtomicU32>,
    /// Transactions that wait for each other inside `handle` (the lanes of a batch) before
    /// writing, for at most ten seconds: a sink that runs them one after another is seen
    /// as such instead of by luck of timing.
    together: Option<tokio::sync::Barrier>,
}

impl Flaky {
    fn new(failures: u32, failing_partition: Option<i32>, together: usize) -> Self {
        Self {
            inner: ProbeHandler {
                delay: Duration::ZERO,
            },
            failures: std::sync::atomic::AtomicU32::new(failures),
            failing_partition,
            in_flight: Default::default(),
            most_in_flight: Default::default(),
            together: (together > 1).then(|| tokio::sync::Barrier::new(together)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("injected transient failure")]
struct Injected;

impl cdp_runtime::pg::PgHandler for Flaky {
    type Event = cdp_schemas::CustomerEvent;

    fn decode(
        &self,
        record: &cdp_runtime::RawRecord,
    ) -> Result<Self::Event, cdp_runtime::sink::Rejection> {
        self.inner.decode(record)
    }

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        batch: &[cdp_runtime::pg::Decoded<'_, Self::Event>],
    ) -> Result<Vec<cdp_runtime::pg::Rejected>, cdp_runtime::sink::SinkError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.most_in_flight.fetch_max(now, SeqCst);
        if let Some(together) = &self.together {
            // On time-out, go on alone: the test's in-flight assertion then fails.
            let _ = tokio::time::timeout(Duration::from_secs(10), together.wait()).await;
        }
        // Write first, then fail: the rollback must undo the rows.
        let result = self.inner.handle(tx, batch).await;
        self.in_flight.fetch_sub(1, SeqCst);
        let rejected = result?;
        let targeted = self
            .failing_partition
            .is_none_or(|p| batch.iter().any(|d| d.record.partition == p));
        if targeted
            && self
                .failures
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .is_ok()
        {
            return Err(cdp_runtime::sink::SinkError::Retryable(Box::new(Injected)));
        }
        Ok(rejected)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_roll_back_and_retry_without_advancing() -> anyhow::Result<()> {
    let backlog = Backlog::create("retry", 1_000).await?;
    let handler = Flaky::new(3, None, 1);
    let metrics = Metrics::new();
    let mut config = backlog.config(100);
    config.tuning.retry_backoff_max_ms = 200;
    backlog.apply_all(config, handler, &metrics, 1_000).await?;
    let text = metrics.encode()?;
    let retries = text
        .lines()
        .find(|l| l.starts_with("cdp_consumer_batch_retries_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(retries, Some(3));
    backlog.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_apply_partitions_in_concurrent_transactions_and_a_failed_lane_alone_is_retried(
) -> anyhow::Result<()> {
    const N: u64 = 2_000;
    let backlog = Backlog::create("lanes", N).await?;
    // The two lanes of a batch meet inside the handler; two failures of partition 1's lane.
    let handler = Flaky::new(2, Some(1), 2);
    let most_in_flight = handler.most_in_flight.clone();
    let metrics = Metrics::new();
    // One batch of every record, so that it holds both partitions whatever order the
    // consumer fetches them in.
    let mut config = backlog.config(N as usize);
    config.tuning.batch_linger_ms = 10_000;
    config.tuning.retry_backoff_max_ms = 200;
    backlog
        .apply_all_in_lanes(config, handler, &metrics, N, 2)
        .await?;
    // Each transaction (its rows share an xmin) holds one lane: here, one partition.
    let partitions_per_tx: Vec<i64> = sqlx::query_scalar(
        "SELECT count(DISTINCT partition) FROM probe_applied GROUP BY xmin::text",
    )
    .fetch_all(&backlog.db.pool)
    .await?;
    assert!(
        partitions_per_tx.iter().all(|&p| p == 1),
        "a transaction held records of both partitions: {partitions_per_tx:?}"
    );
    assert_eq!(
        most_in_flight.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the lanes of a batch did not run at once"
    );
    // The batch failed twice and was retried; what partition 0's lane had committed was
    // skipped on each retry, not applied again (apply_all checked there is one row per record).
    let text = metrics.encode()?;
    let count = |prefix: &str, label: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(count("cdp_consumer_batch_retries_total{", ""), 2);
    assert!(
        count("cdp_consumer_records_total{", "outcome=\"Skipped\"") > 0,
        "no record of the lane that committed was skipped on retry"
    );
    backlog.db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_behind_takes_batches_past_the_batch_size_up_to_the_maximum_and_says_it_is_behind(
) -> anyhow::Result<()> {
    const N: u64 = 6_000;
    // A backlog before the consumer starts: every record is already waiting.
    let backlog = Backlog::create("catchup", N).await?;
    let mut config = backlog.config(100);
    config.tuning.batch_size_max = 1_000;
    let handler = CatchUpSeen {
        inner: ProbeHandler {
            delay: Duration::ZERO,
        },
        catch_up: config.catch_up.clone(),
        seen: Default::default(),
    };
    let seen = handler.seen.clone();
    let metrics = Metrics::new();
    // (apply_all also waits for the runner to say it has caught up.)
    backlog.apply_all(config, handler, &metrics, N).await?;
    // The gauge is set when the flag changes: present means it went to 1, and it is back to 0.
    assert_eq!(
        gauge(&metrics, "cdp_consumer_catching_up"),
        Some(0),
        "the catching-up gauge did not go up and back down"
    );
    let seen = std::mem::take(&mut *seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    assert!(
        seen.iter().any(|&(size, behind)| size == 1_000 && behind),
        "no batch of the maximum size was applied while the runner said it was catching up: {seen:?}"
    );
    // Each batch is one transaction: the rows it inserted share their xmin.
    let sizes: Vec<i64> =
        sqlx::query_scalar("SELECT count(*) FROM probe_applied GROUP BY xmin::text")
            .fetch_all(&backlog.db.pool)
            .await?;
    assert!(
        sizes.iter().all(|&s| s <= 1_000),
        "a batch exceeded the maximum: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&s| s > 100),
        "the backlog was taken in batches of the normal size only: {sizes:?}"
    );
    // At the normal size alone it would take at least 60 transactions.
    assert!(
        sizes.len() < 30,
        "too many batches for a backlog: {sizes:?}"
    );
    backlog.db.drop_db().await
}

/// Records each batch's size and whether the runner said it was catching up when it was
/// applied.
struct CatchUpSeen {
    inner: ProbeHandler,
    catch_up: runner::CatchUp,
    seen: Arc<std::sync::Mutex<Vec<(usize, bool)>>>,
}

impl cdp_runtime::pg::PgHandler for CatchUpSeen {
    type Event = cdp_schemas::CustomerEvent;

    fn decode(
        &self,
        record: &cdp_runtime::RawRecord,
    ) -> Result<Self::Event, cdp_runtime::sink::Rejection> {
        self.inner.decode(record)
    }

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        batch: &[cdp_runtime::pg::Decoded<'_, Self::Event>],
    ) -> Result<Vec<cdp_runtime::pg::Rejected>, cdp_runtime::sink::SinkError> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((batch.len(), self.catch_up.is_catching_up()));
        }
        self.inner.handle(tx, batch).await
    }
}

/// Counts the applies that ended after records of the next batch had been decoded.
#[derive(Default)]
struct OverlapCounts {
    decoded: std::sync::atomic::AtomicU64,
    applied: std::sync::atomic::AtomicU64,
    applies: std::sync::atomic::AtomicU32,
    ahead: std::sync::atomic::AtomicU32,
}

struct Overlap {
    inner: ProbeHandler,
    counts: Arc<OverlapCounts>,
}

impl cdp_runtime::pg::PgHandler for Overlap {
    type Event = cdp_schemas::CustomerEvent;

    fn decode(
        &self,
        record: &cdp_runtime::RawRecord,
    ) -> Result<Self::Event, cdp_runtime::sink::Rejection> {
        self.counts
            .decoded
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.decode(record)
    }

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        batch: &[cdp_runtime::pg::Decoded<'_, Self::Event>],
    ) -> Result<Vec<cdp_runtime::pg::Rejected>, cdp_runtime::sink::SinkError> {
        use std::sync::atomic::Ordering::SeqCst;
        let result = self.inner.handle(tx, batch).await;
        let c = &self.counts;
        let through = c.applied.fetch_add(batch.len() as u64, SeqCst) + batch.len() as u64;
        c.applies.fetch_add(1, SeqCst);
        if c.decoded.load(SeqCst) > through {
            c.ahead.fetch_add(1, SeqCst);
        }
        result
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_batch_is_gathered_and_decoded_while_a_slow_one_is_applied() -> anyhow::Result<()>
{
    use std::sync::atomic::Ordering::SeqCst;
    const N: u64 = 3_000;
    let backlog = Backlog::create("overlap", N).await?;
    // Each batch takes longer than the runner's tick interval (200 ms) to apply: a tick due
    // meanwhile must not make the poll thread wait for it.
    let counts = Arc::new(OverlapCounts::default());
    let handler = Overlap {
        inner: ProbeHandler {
            delay: Duration::from_millis(400),
        },
        counts: counts.clone(),
    };
    let mut config = backlog.config(100);
    config.tuning.batch_size_max = 500;
    backlog
        .apply_all(config, handler, &Metrics::new(), N)
        .await?;
    let (applies, ahead) = (counts.applies.load(SeqCst), counts.ahead.load(SeqCst));
    // Every batch but the last has a successor waiting in the backlog, decoded before the
    // batch's own transaction ends.
    assert!(
        applies >= 6 && ahead + 1 >= applies,
        "of {applies} batches applied, only {ahead} ended after the next one was decoded"
    );
    backlog.db.drop_db().await
}

/// A runner gauge with a `reason` label.
fn unready(metrics: &Metrics, reason: &str) -> i64 {
    let text = metrics.encode().unwrap_or_default();
    text.lines()
        .find(|l| {
            l.starts_with("cdp_consumer_unready{") && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_cut_off_from_the_broker_is_not_ready_and_says_why() -> anyhow::Result<()> {
    let mut broker = OwnBroker::start()?;
    let topic = unique("runner-ready");
    let dlq = unique("runner-ready-dlq");
    let group = unique("runner-ready-group");
    let mut config = runner_config(&topic, &group, &dlq, 100);
    config.kafka.brokers = broker.brokers();
    config.tuning.stall_secs = 3;
    let spec = cdp_runtime::topics::Topic::CustomerEvents.spec();
    cdp_runtime::topics::ensure(&config.kafka, &[(topic.clone(), spec), (dlq.clone(), spec)])
        .await?;
    let db = TestDb::create().await?;
    create_probe_table(&db.pool).await?;
    let producer = Arc::new(Producer::new(&config.kafka)?);
    let sink = Arc::new(PgSink::new(
        db.pool.clone(),
        group.clone(),
        ProbeHandler {
            delay: Duration::ZERO,
        },
    ));
    let readiness = cdp_runtime::admin::Readiness::default();
    let metrics = Metrics::new();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(runner::run(
        config,
        sink,
        producer,
        RunnerMetrics::register(&metrics),
        Some(readiness.component("consumer")),
        shutdown.clone(),
    ));
    wait_until("ready once assigned", Duration::from_secs(60), || async {
        Ok(readiness.unready().is_empty() && assigned(&metrics) == 6)
    })
    .await?;
    // Idle and assigned, it stays ready past the stall time: the broker's answers count as
    // progress (sampled over twice the stall time).
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        anyhow::ensure!(
            readiness.unready().is_empty(),
            "an idle consumer stays ready"
        );
    }

    broker.kill()?;
    wait_until(
        "not ready without the broker",
        Duration::from_secs(30),
        || async {
            Ok(readiness.unready() == ["consumer"] && unready(&metrics, "broker_unreachable") == 1)
        },
    )
    .await?;
    broker.resume()?;
    wait_until(
        "ready again with the broker back",
        Duration::from_secs(60),
        || async {
            Ok(readiness.unready().is_empty() && unready(&metrics, "broker_unreachable") == 0)
        },
    )
    .await?;
    shutdown.trigger();
    task.await??;
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_batch_keeps_failing_is_not_ready_until_it_passes() -> anyhow::Result<()> {
    let backlog = Backlog::create("sink-failing", 200).await?;
    let metrics = Metrics::new();
    let readiness = cdp_runtime::admin::Readiness::default();
    let mut config = backlog.config(100);
    config.tuning.retry_backoff_max_ms = 200;
    config.tuning.stall_secs = 2;
    let sink = Arc::new(PgSink::new(
        backlog.db.pool.clone(),
        backlog.group.clone(),
        Flaky::new(40, None, 1),
    ));
    let shutdown = Shutdown::new();
    let task = tokio::spawn(runner::run(
        config,
        sink,
        backlog.producer.clone(),
        RunnerMetrics::register(&metrics),
        Some(readiness.component("consumer")),
        shutdown.clone(),
    ));
    wait_until(
        "not ready while the batch fails",
        Duration::from_secs(60),
        || async {
            Ok(readiness.unready() == ["consumer"] && unready(&metrics, "sink_failing") == 1)
        },
    )
    .await?;
    wait_until("ready once it passed", Duration::from_secs(60), || async {
        Ok(readiness.unready().is_empty() && probe_counts(&backlog.db.pool).await?.0 == 200)
    })
    .await?;
    shutdown.trigger();
    task.await??;
    backlog.db.drop_db().await
}

/// The probe handler, whose first transaction fails at commit (a deferred trigger raises a
/// serialization failure), after the batch's dead letters were produced.
struct FailsFirstCommit {
    inner: ProbeHandler,
    armed: std::sync::atomic::AtomicBool,
}

impl cdp_runtime::pg::PgHandler for FailsFirstCommit {
    type Event = cdp_schemas::CustomerEvent;

    fn decode(
        &self,
        record: &cdp_runtime::RawRecord,
    ) -> Result<Self::Event, cdp_runtime::sink::Rejection> {
        self.inner.decode(record)
    }

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        batch: &[cdp_runtime::pg::Decoded<'_, Self::Event>],
    ) -> Result<Vec<cdp_runtime::pg::Rejected>, cdp_runtime::sink::SinkError> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            sqlx::query("INSERT INTO commit_fails VALUES (1)")
                .execute(&mut *tx)
                .await
                .map_err(cdp_runtime::pg::classify)?;
        }
        self.inner.handle(tx, batch).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_fails_does_not_dead_letter_twice() -> anyhow::Result<()> {
    // Offset 0 is poison, so the first batch, whose commit fails, dead-letters it.
    let Backlog {
        topic,
        dlq,
        group,
        db,
        producer,
    } = Backlog::with_partitions("dlq-once", 0, 1).await?;
    producer
        .send(OutgoingRecord {
            topic: &topic,
            key: Some(b"garbage"),
            value: Some(b"not avro"),
            ..Default::default()
        })
        .await?;
    produce_events(&producer, &topic, 100, 1).await?;
    for statement in [
        "CREATE TABLE commit_fails (n int)",
        "CREATE FUNCTION commit_fails() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'injected commit failure' USING ERRCODE = '40001'; END $$",
        "CREATE CONSTRAINT TRIGGER commit_fails AFTER INSERT ON commit_fails
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_fails()",
    ] {
        sqlx::query(statement).execute(&db.pool).await?;
    }
    let sink = Arc::new(PgSink::new(
        db.pool.clone(),
        group.clone(),
        FailsFirstCommit {
            inner: ProbeHandler {
                delay: Duration::ZERO,
            },
            armed: std::sync::atomic::AtomicBool::new(true),
        },
    ));
    let metrics = Metrics::new();
    let shutdown = Shutdown::new();
    let mut config = runner_config(&topic, &group, &dlq, 500);
    config.tuning.retry_backoff_max_ms = 200;
    let task = tokio::spawn(runner::run(
        config,
        sink,
        producer.clone(),
        RunnerMetrics::register(&metrics),
        None,
        shutdown.clone(),
    ));
    wait_until("every event applied", Duration::from_secs(60), || async {
        Ok(probe_counts(&db.pool).await?.0 >= 100)
    })
    .await?;
    shutdown.trigger();
    task.await??;
    let retries = metric_sum(&metrics, "cdp_consumer_batch_retries_total")?;
    anyhow::ensure!(
        retries == 1.0,
        "the first commit failed once ({retries} retries)"
    );
    anyhow::ensure!(
        topic_len(&dlq).await? == 1,
        "the poison record is dead-lettered once, not once per attempt"
    );
    let (marked,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM cdp_dead_letters WHERE group_id = $1")
            .bind(&group)
            .fetch_one(&db.pool)
            .await?;
    anyhow::ensure!(marked == 1);
    db.drop_db().await
}

/// A consumer whose task is dropped with its runtime (a test that panicked, a process
/// shutting down without triggering shutdown) stops its poll thread: the runtime finishes
/// dropping instead of waiting forever for it.
#[test]
fn a_runtime_dropped_with_a_consumer_running_finishes_dropping() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let backlog = rt.block_on(Backlog::create("dropped", 100))?;
    let (db_name, db_url) = (backlog.db.name.clone(), backlog.db.url.clone());
    let sink = Arc::new(PgSink::new(
        backlog.db.pool.clone(),
        backlog.group.clone(),
        ProbeHandler {
            delay: Duration::ZERO,
        },
    ));
    let metrics = Metrics::new();
    // Its shutdown is never triggered.
    rt.spawn(runner::run(
        backlog.config(100),
        sink,
        backlog.producer.clone(),
        RunnerMetrics::register(&metrics),
        None,
        Shutdown::new(),
    ));
    let pool = backlog.db.pool.clone();
    rt.block_on(wait_until(
        "the backlog applied",
        Duration::from_secs(60),
        || async { Ok(probe_counts(&pool).await?.0 >= 100) },
    ))?;
    let (done, dropped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(backlog);
        drop(rt);
        let _ = done.send(());
    });
    dropped
        .recv_timeout(Duration::from_secs(60))
        .context("the runtime is still dropping after 60 s: a consumer thread holds it")?;
    let cleanup = tokio::runtime::Runtime::new()?;
    cleanup.block_on(async {
        TestDb {
            name: db_name,
            url: db_url.clone(),
            pool: sqlx::PgPool::connect(&db_url).await?,
        }
        .drop_db()
        .await
    })
}

/// The probe handler refusing `reject-me` events until fixed, and applying an event id once.
struct FixedLater {
    inner: ProbeHandler,
    fixed: std::sync::atomic::AtomicBool,
}

impl cdp_runtime::pg::PgHandler for FixedLater {
    type Event = cdp_schemas::CustomerEvent;

    fn decode(
        &self,
        record: &cdp_runtime::RawRecord,
    ) -> Result<Self::Event, cdp_runtime::sink::Rejection> {
        let mut event = self.inner.decode(record)?;
        if self.fixed.load(std::sync::atomic::Ordering::SeqCst) {
            event.envelope.source = "fixed".to_owned();
        }
        Ok(event)
    }

    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        batch: &[cdp_runtime::pg::Decoded<'_, Self::Event>],
    ) -> Result<Vec<cdp_runtime::pg::Rejected>, cdp_runtime::sink::SinkError> {
        let ids: Vec<uuid::Uuid> = batch.iter().map(|d| d.event.envelope.event_id).collect();
        let seen: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT event_id FROM probe_applied WHERE event_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(cdp_runtime::pg::classify)?;
        // Once per event id: not again after an earlier batch, not twice in this one.
        let mut seen: std::collections::HashSet<uuid::Uuid> = seen.into_iter().collect();
        let (index, fresh): (Vec<usize>, Vec<_>) = batch
            .iter()
            .enumerate()
            .filter(|(_, d)| seen.insert(d.event.envelope.event_id))
            .map(|(i, d)| {
                let d = cdp_runtime::pg::Decoded {
                    record: d.record,
                    event: d.event,
                };
                (i, d)
            })
            .unzip();
        let mut rejected = self.inner.handle(tx, &fresh).await?;
        for r in &mut rejected {
            r.index = index[r.index];
        }
        Ok(rejected)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_by_kind_and_re_driven_once_fixed() -> anyhow::Result<()> {
    let Backlog {
        topic,
        dlq,
        group,
        db,
        producer,
    } = Backlog::with_partitions("redrive", 20, 1).await?;
    producer
        .send(OutgoingRecord {
            topic: &topic,
            key: Some(b"garbage"),
            value: Some(b"not avro"),
            ..Default::default()
        })
        .await?;
    let mut refused = event(1_000, "refused");
    refused.envelope.source = "reject-me".to_owned();
    let refused_bytes = cdp_schemas::encode(&refused)?;
    producer
        .send(OutgoingRecord {
            topic: &topic,
            key: Some(b"refused"),
            value: Some(&refused_bytes),
            headers: vec![("origin", Some(b"shop".as_slice()))],
            ..Default::default()
        })
        .await?;
    let handler = Arc::new(PgSink::new(
        db.pool.clone(),
        group.clone(),
        FixedLater {
            inner: ProbeHandler {
                delay: Duration::ZERO,
            },
            fixed: std::sync::atomic::AtomicBool::new(false),
        },
    ));
    let shutdown = Shutdown::new();
    let task = tokio::spawn(runner::run(
        runner_config(&topic, &group, &dlq, 100),
        handler.clone(),
        producer.clone(),
        RunnerMetrics::register(&Metrics::new()),
        None,
        shutdown.clone(),
    ));
    wait_until(
        "both refused records dead-lettered",
        Duration::from_secs(60),
        || async { Ok(topic_len(&dlq).await? == 2 && probe_counts(&db.pool).await?.0 == 20) },
    )
    .await?;

    let kafka = kafka_args("");
    let read = |filter: cdp_runtime::dlq::Filter| {
        let (kafka, dlq) = (kafka.clone(), dlq.clone());
        async move {
            anyhow::Ok(
                tokio::task::spawn_blocking(move || cdp_runtime::dlq::read(&kafka, &dlq, &filter))
                    .await??,
            )
        }
    };
    let all = read(Default::default()).await?;
    let kinds: Vec<&str> = all.iter().map(|l| l.kind.as_str()).collect();
    anyhow::ensure!(kinds == ["too_short", "invalid"], "{kinds:?}");
    anyhow::ensure!(all.iter().all(|l| l.group == group && l.topic == topic));
    let invalid = read(cdp_runtime::dlq::Filter {
        kind: Some("invalid".into()),
        ..Default::default()
    })
    .await?;
    anyhow::ensure!(invalid.len() == 1 && invalid[0].offset == 21);
    anyhow::ensure!(
        invalid[0].headers == [("origin".to_owned(), Some(b"shop".to_vec()))],
        "the record's own headers, without the letter's: {:?}",
        invalid[0].headers
    );

    // The cause is fixed; the invalid one is re-driven, twice: applied once.
    handler_fixed(&handler);
    for _ in 0..2 {
        anyhow::ensure!(cdp_runtime::dlq::redrive(&producer, &dlq, &invalid).await? == 1);
    }
    let stored = |n: i64| {
        let (pool, group) = (db.pool.clone(), group.clone());
        async move {
            let at = cdp_runtime::pg::stored_positions(&pool, &group).await?;
            anyhow::Ok(at.values().copied().collect::<Vec<_>>() == [n])
        }
    };
    wait_until(
        "both re-driven copies read",
        Duration::from_secs(60),
        || stored(24),
    )
    .await?;
    shutdown.trigger();
    task.await??;
    anyhow::ensure!(probe_counts(&db.pool).await? == (21, 21), "applied once");
    anyhow::ensure!(topic_len(&dlq).await? == 2, "nothing dead-lettered again");
    db.drop_db().await
}

fn handler_fixed(sink: &PgSink<FixedLater>) {
    sink.handler()
        .fixed
        .store(true, std::sync::atomic::Ordering::SeqCst);
}
