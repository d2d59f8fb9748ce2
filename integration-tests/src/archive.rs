//! Harness of the archiver tests: a varied record mix, the log read back exactly, the
//! archive read back and checked for gapless coverage, and an S3 server of a test's own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use cdp_archiver::ocf::ArchivedRecord;
use cdp_archiver::{Archive, StoreArgs};
use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::{RawRecord, RecordCopier, RecordHeaders};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::{brokers, kafka_args, unique};

/// The shared S3 server of `scripts/stack` (garage) and its development credentials.
pub fn s3_endpoint() -> String {
    std::env::var("CDP_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:3900".to_owned())
}

pub const S3_BUCKET: &str = "cdp-archive";
pub const S3_KEY_ID: &str = "GK0000000000000000000cd5a7";
pub const S3_SECRET: &str = "c0ffee0000000000000000000000000000000000000000000000000000000000";

/// Store arguments for a fresh prefix of the S3 bucket at `endpoint`.
pub fn s3_store(endpoint: &str) -> StoreArgs {
    StoreArgs {
        archive_url: format!("s3://{S3_BUCKET}/{}", unique("test")),
        s3_endpoint: Some(endpoint.to_owned()),
        s3_region: Some("garage".to_owned()),
        s3_access_key_id: Some(S3_KEY_ID.to_owned()),
        s3_secret_access_key: Some(S3_SECRET.to_owned()),
        s3_retry_timeout_secs: 2,
        s3_sign_payload: cdp_archiver::store::SignPayload::Auto,
    }
}

/// Fails with instructions when the S3 server does not answer.
pub async fn require_s3(endpoint: &str) -> anyhow::Result<()> {
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_owned();
    let ok = tokio::task::spawn_blocking(move || {
        std::net::TcpStream::connect_timeout(
            &addr.parse().map_err(|e| anyhow::anyhow!("{addr}: {e}"))?,
            Duration::from_secs(2),
        )
        .map_err(anyhow::Error::from)
    })
    .await?;
    ok.map(|_| ()).with_context(|| {
        format!("no S3 server answers at {endpoint}: start the local stack with `scripts/stack up` (or set CDP_TEST_S3_ENDPOINT)")
    })
}

/// Runs an archiver in this process until the shutdown is triggered.
pub fn spawn(
    config: cdp_archiver::ArchiverConfig,
) -> crate::pipeline::Spawned<cdp_archiver::ArchiverError> {
    crate::pipeline::spawn(
        &cdp_runtime::metrics::Metrics::new(),
        |m, r, s| async move { cdp_archiver::run(config, &m, &r, s).await },
    )
}

/// A local directory archive in a fresh temporary directory.
pub fn local_store() -> (StoreArgs, PathBuf) {
    let dir = std::env::temp_dir().join(unique("cdp-archive"));
    (StoreArgs::local(dir.to_string_lossy().into_owned()), dir)
}

/// Produces `n` records spread over the topic's `partitions` by key: values of varied size,
/// some tombstones, some records without key, headers (one with a null value) on some.
/// Timestamps step by 1 ms from `start_ms`.
pub async fn produce_mix(
    topic: &str,
    partitions: usize,
    n: usize,
    start_ms: i64,
) -> anyhow::Result<()> {
    let producer = Producer::new(&kafka_args(""))?;
    let mut payloads = Vec::with_capacity(n);
    for i in 0..n {
        let key = (i % 13 != 0).then(|| format!("subject-{}", i % 997).into_bytes());
        let value = (i % 17 != 5).then(|| {
            // Half text-like, half random bytes (like sealed PII and ids): compresses as
            // real events do, not as a run of one byte.
            let len = 40 + (i * 7919) % 400;
            let mut v = format!("{{\"event\":\"Order Completed\",\"n\":{i},\"p\":\"").into_bytes();
            let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            while v.len() < len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.extend_from_slice(&x.to_le_bytes()[..4]);
            }
            v.truncate(len);
            v
        });
        payloads.push((key, value, i));
    }
    for chunk in payloads.chunks(5_000) {
        let recs: Vec<OutgoingRecord<'_>> = chunk
            .iter()
            .map(|(k, v, i)| OutgoingRecord {
                topic,
                key: k.as_deref(),
                value: v.as_deref(),
                headers: if i % 3 == 0 {
                    vec![("cdp.source", Some(b"test".as_slice())), ("trace", None)]
                } else {
                    vec![]
                },
                timestamp_ms: Some(start_ms + *i as i64),
                // Keyless records still need a partition: round-robin them.
                partition: k.is_none().then_some((*i % partitions) as i32),
            })
            .collect();
        producer.send_all(&recs).await?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Every record of a topic, per partition in offset order, read up to the high watermarks
/// as they are now.
pub async fn read_log(topic: &str) -> anyhow::Result<BTreeMap<i32, Vec<RawRecord>>> {
    read_log_from(&brokers(), topic).await
}

/// Every record of a topic on `brokers`, per partition in offset order, from each
/// partition's log start up to its high watermark as they are when the read starts. Fails
/// unless every partition came back whole (contiguous offsets from its low to its high
/// watermark).
pub async fn read_log_from(
    brokers: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, Vec<RawRecord>>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("log-reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut ends = BTreeMap::new();
        let mut starts = BTreeMap::new();
        for t in md.topics() {
            for p in t.partitions() {
                let (lo, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                ends.insert(p.id(), hi);
                starts.insert(p.id(), lo);
            }
        }
        ensure!(!ends.is_empty(), "topic {topic} has no partitions");
        // Assigned, not subscribed: a reader waits for no group coordinator, one thing less
        // that a loaded test broker can be slow at.
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (p, lo) in &starts {
            tpl.add_partition_offset(&topic, *p, rdkafka::Offset::Offset(*lo))?;
        }
        c.assign(&tpl)?;
        let mut out: BTreeMap<i32, Vec<RawRecord>> = ends.keys().map(|p| (*p, vec![])).collect();
        let mut copier = RecordCopier::new();
        let started = Instant::now();
        // A partition is read once its record before the high watermark came; one whose log
        // start reached its high watermark (empty, or every record deleted) has none to wait for.
        let done = |out: &BTreeMap<i32, Vec<RawRecord>>| {
            ends.iter().all(|(p, hi)| {
                let lo = starts.get(p).copied().unwrap_or(0);
                *hi <= lo
                    || out
                        .get(p)
                        .and_then(|v| v.last())
                        .is_some_and(|r| r.offset + 1 >= *hi)
            })
        };
        while !done(&out) {
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "reading {topic} back timed out"
            );
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                let r = copier.copy(&m?);
                if ends.get(&r.partition).is_some_and(|hi| r.offset < *hi) {
                    out.entry(r.partition).or_default().push(r);
                }
            }
        }
        for (p, records) in &out {
            let lo = starts.get(p).copied().unwrap_or(0);
            let whole = records
                .iter()
                .enumerate()
                .all(|(i, r)| r.offset == lo + i as i64)
                && ends
                    .get(p)
                    .is_some_and(|hi| records.len() as i64 == hi - lo);
            ensure!(
                whole,
                "partition {p} of {topic} came back with offsets missing"
            );
        }
        Ok(out)
    })
    .await?
}

/// Every archived record of a topic, per partition, in file order, with each file's
/// (first, last) offsets from its header.
pub struct Archived {
    pub records: BTreeMap<i32, Vec<ArchivedRecord>>,
    pub files: BTreeMap<i32, Vec<(i64, i64)>>,
}

pub async fn read_archive(archive: &Archive, topic: &str) -> anyhow::Result<Archived> {
    let mut records: BTreeMap<i32, Vec<ArchivedRecord>> = BTreeMap::new();
    let mut files: BTreeMap<i32, Vec<(i64, i64)>> = BTreeMap::new();
    for f in archive.list(topic, None).await? {
        let (h, recs) = archive.read(&f).await?;
        let first = h
            .number(cdp_archiver::ocf::meta::FIRST_OFFSET)
            .context("first offset")?;
        let last = h
            .number(cdp_archiver::ocf::meta::LAST_OFFSET)
            .context("last offset")?;
        ensure!(
            first == f.name.first_offset,
            "{}: header and name disagree",
            f.path
        );
        ensure!(
            recs.first().map(|r| r.offset) == Some(first)
                && recs.last().map(|r| r.offset) == Some(last),
            "{}: records do not span the header's range",
            f.path
        );
        files
            .entry(f.name.partition)
            .or_default()
            .push((first, last));
        records.entry(f.name.partition).or_default().extend(recs);
    }
    Ok(Archived { records, files })
}

/// Archived records seen as the log's records.
pub fn as_raw(r: &ArchivedRecord) -> RawRecord {
    RawRecord {
        topic: r.topic.as_str().into(),
        partition: r.partition,
        offset: r.offset,
        key: r.key.clone().map(Into::into),
        value: r.value.clone().map(Into::into),
        headers: RecordHeaders::from_pairs(
            r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
        ),
        timestamp_ms: r.timestamp_ms,
    }
}

/// Whether the archive covers each partition of `log` exactly: files back to back from the
/// partition's first offset to its last, every record equal to the log's. `Err` says what
/// differs.
pub fn check_gapless(
    archived: &Archived,
    log: &BTreeMap<i32, Vec<RawRecord>>,
) -> anyhow::Result<()> {
    for (p, expected) in log {
        let files = archived.files.get(p).map(Vec::as_slice).unwrap_or_default();
        let mut next = expected.first().map(|r| r.offset);
        for (first, last) in files {
            if Some(*first) != next {
                bail!(
                    "partition {p}: a file starts at {first}, expected {next:?} (gap or overlap)"
                );
            }
            next = Some(last + 1);
        }
        let got: Vec<RawRecord> = archived
            .records
            .get(p)
            .map(|v| v.iter().map(as_raw).collect())
            .unwrap_or_default();
        if got.len() != expected.len() {
            bail!(
                "partition {p}: {} records archived, {} in the log",
                got.len(),
                expected.len()
            );
        }
        if let Some(i) = (0..got.len()).find(|i| got[*i] != expected[*i]) {
            bail!(
                "partition {p}: record at offset {} differs from the log",
                expected[i].offset
            );
        }
    }
    Ok(())
}

/// Records archived for a topic so far, from the file headers (cheap: no file is read).
pub async fn archived_count(archive: &Archive, topic: &str) -> anyhow::Result<u64> {
    let mut n = 0;
    for f in archive.list(topic, None).await? {
        let h = archive.header(&f).await?;
        n += h
            .number(cdp_archiver::ocf::meta::RECORD_COUNT)
            .context("record count")? as u64;
    }
    Ok(n)
}

/// Waits until the file headers count as many records as the log (as read once, now), then
/// checks that the archive covers it exactly.
pub async fn wait_gapless(
    archive: &Archive,
    topic: &str,
    log: &BTreeMap<i32, Vec<RawRecord>>,
    timeout: Duration,
) -> anyhow::Result<Archived> {
    let total: u64 = log.values().map(|v| v.len() as u64).sum();
    crate::wait_until(
        &format!("{total} records of {topic} archived"),
        timeout,
        || async { Ok(archived_count(archive, topic).await? >= total) },
    )
    .await?;
    let archived = read_archive(archive, topic).await?;
    check_gapless(&archived, log)?;
    Ok(archived)
}

/// A garage S3 server of the test's own (`scripts/s3-node` on a free port and a temporary
/// directory), for tests that stop and restart it without disturbing the shared one.
pub struct OwnS3 {
    pub port: u16,
    dir: PathBuf,
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join(name)
}

impl OwnS3 {
    pub fn start() -> anyhow::Result<Self> {
        // S3, RPC and admin take three consecutive ports.
        let port = loop {
            let p = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            if p < 65_000
                && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())
            {
                break p;
            }
        };
        let s = Self {
            port,
            dir: std::env::temp_dir().join(unique("cdp-s3")),
        };
        s.resume()?;
        Ok(s)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and data.
    pub fn resume(&self) -> anyhow::Result<()> {
        let garage =
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin/garage");
        ensure!(
            garage.exists(),
            "{} is missing: `scripts/stack up` installs it",
            garage.display()
        );
        let status = std::process::Command::new(script("s3-node"))
            .arg(&self.dir)
            .arg(self.port.to_string())
            .status()
            .context("running scripts/s3-node")?;
        ensure!(
            status.success(),
            "scripts/s3-node failed; see {}/garage.log",
            self.dir.display()
        );
        Ok(())
    }

    /// SIGKILLs it.
    pub fn kill(&self) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.dir.join("garage.pid"))?;
        let pid = pid.trim();
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status()?;
        let started = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "garage {pid} did not die"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
