//! What the design relies on from the broker, checked with our own client (rdkafka). These
//! tests back `docs/broker-compatibility.md`: if the broker changes, they say what broke.

use std::time::Duration;

use cdp_integration_tests::*;
use cdp_runtime::kafka::producer::{OutgoingRecord, Producer};
use cdp_runtime::topics::{self, Cleanup, Topic, Topics};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

fn assigned_consumer() -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("broker-check"))
        .set("enable.auto.commit", "false")
        .create()?)
}

/// Reads `n` records of one partition starting at `from`.
fn read(
    topic: &str,
    partition: i32,
    from: Offset,
    n: usize,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    let c = assigned_consumer()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, from)?;
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    while out.len() < n {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "read {} of {n}",
            out.len()
        );
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            out.push(m?.detach());
        }
    }
    Ok(out)
}

#[tokio::test]
async fn catalogue_topics_are_created_with_their_configs_and_creation_is_idempotent(
) -> anyhow::Result<()> {
    require_broker().await?;
    let prefix = format!("{}.", unique("cat"));
    let kafka = kafka_args(&prefix);
    let catalogue = topics::catalogue(&Topics::new(&prefix));
    let first = topics::ensure(&kafka, &catalogue).await?;
    assert!(
        first
            .iter()
            .all(|e| matches!(e, topics::Ensured::Created(_))),
        "{first:?}"
    );
    let second = topics::ensure(&kafka, &catalogue).await?;
    assert!(
        second
            .iter()
            .all(|e| matches!(e, topics::Ensured::Existed(_))),
        "{second:?}"
    );

    let name = Topics::new(&prefix).name(Topic::Identity);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(&name)], &AdminOptions::new())
        .await?;
    let config = described
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no config"))??;
    let cleanup = config.get("cleanup.policy").and_then(|e| e.value.clone());
    assert_eq!(
        cleanup.as_deref(),
        Some("compact"),
        "explicitly set configs are reported"
    );
    assert_eq!(Topic::Identity.spec().cleanup, Cleanup::Compact);

    let metadata = tokio::task::spawn_blocking({
        let name = name.clone();
        move || -> anyhow::Result<usize> {
            let c = assigned_consumer()?;
            let md = c.fetch_metadata(Some(&name), Duration::from_secs(10))?;
            Ok(md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0))
        }
    })
    .await??;
    assert_eq!(metadata, Topic::Identity.spec().partitions as usize);
    Ok(())
}

#[tokio::test]
async fn idempotent_acked_produce_keeps_keys_headers_timestamps_and_tombstones(
) -> anyhow::Result<()> {
    let topic = unique("broker-produce");
    create_topics(&[(&topic, 1)]).await?;
    let producer = Producer::new(&kafka_args(""))?;
    let d1 = producer
        .send(OutgoingRecord {
            topic: &topic,
            key: Some(b"k1"),
            value: Some(b"v1"),
            headers: vec![("h", Some(b"x".as_slice())), ("empty", None)],
            timestamp_ms: Some(1_700_000_000_123),
            ..Default::default()
        })
        .await?;
    let d2 = producer
        .send(OutgoingRecord {
            topic: &topic,
            key: Some(b"k1"),
            value: None,
            ..Default::default()
        })
        .await?;
    assert_eq!((d1.offset, d2.offset), (0, 1));
    let records =
        tokio::task::spawn_blocking(move || read(&topic, 0, Offset::Beginning, 2)).await??;
    assert_eq!(records[0].key(), Some(b"k1".as_slice()));
    assert_eq!(records[0].payload(), Some(b"v1".as_slice()));
    assert_eq!(records[0].timestamp().to_millis(), Some(1_700_000_000_123));
    let hs = records[0]
        .headers()
        .ok_or_else(|| anyhow::anyhow!("headers lost"))?;
    assert_eq!(hs.count(), 2);
    assert_eq!(hs.get(0).value, Some(b"x".as_slice()));
    assert_eq!(hs.get(1).value, None);
    assert_eq!(records[1].key(), Some(b"k1".as_slice()));
    assert_eq!(records[1].payload(), None, "a tombstone stays a tombstone");
    Ok(())
}

#[tokio::test]
async fn seek_and_offsets_for_times_work() -> anyhow::Result<()> {
    let topic = unique("broker-seek");
    create_topics(&[(&topic, 1)]).await?;
    let producer = Producer::new(&kafka_args(""))?;
    let recs: Vec<OutgoingRecord<'_>> = (0..10)
        .map(|i| OutgoingRecord {
            topic: &topic,
            value: Some(b"x".as_slice()),
            timestamp_ms: Some(1_000_000 + i * 1_000),
            ..Default::default()
        })
        .collect();
    producer.send_all(&recs).await?;
    let t = topic.clone();
    let from_seek =
        tokio::task::spawn_blocking(move || read(&t, 0, Offset::Offset(7), 3)).await??;
    assert_eq!(
        from_seek.iter().map(|m| m.offset()).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    let found = tokio::task::spawn_blocking(move || -> anyhow::Result<Offset> {
        let c = assigned_consumer()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(1_004_500))?;
        let r = c.offsets_for_times(tpl, Duration::from_secs(10))?;
        let e = r.elements();
        Ok(e.first().map(|e| e.offset()).unwrap_or(Offset::Invalid))
    })
    .await??;
    assert_eq!(
        found,
        Offset::Offset(5),
        "first record at or after the timestamp"
    );
    Ok(())
}

/// The runner assigns a partition its sink never saw at a concrete offset read from the broker
/// (a first fetch of symbolic offsets held the first records back by `fetch.wait.max.ms`).
#[tokio::test]
async fn a_new_partition_starts_at_the_offsets_the_broker_reports() -> anyhow::Result<()> {
    use cdp_runtime::kafka::runner::{start_offsets, StartFrom};
    use cdp_runtime::TopicPartition;
    let topic = unique("broker-start");
    create_topics(&[(&topic, 2)]).await?;
    let producer = Producer::new(&kafka_args(""))?;
    let recs: Vec<OutgoingRecord<'_>> = (0..3)
        .map(|_| OutgoingRecord {
            topic: &topic,
            partition: Some(0),
            value: Some(b"x".as_slice()),
            ..Default::default()
        })
        .collect();
    producer.send_all(&recs).await?;
    let starts = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Offset>> {
        let c = assigned_consumer()?;
        let tp = |partition| TopicPartition {
            topic: topic.clone(),
            partition,
        };
        // One partition per lookup, so each case stands on its own.
        let start_offset = |c: &BaseConsumer, p: &TopicPartition, start, wait| {
            start_offsets(c, &[p], start, wait)[0]
        };
        let wait = Duration::from_secs(5);
        Ok(vec![
            start_offset(&c, &tp(0), StartFrom::Earliest, wait),
            start_offset(&c, &tp(0), StartFrom::Latest, wait),
            start_offset(&c, &tp(1), StartFrom::Earliest, wait),
            start_offset(&c, &tp(1), StartFrom::Latest, wait),
            // A partition the broker does not have: the client is left to look it up.
            start_offset(&c, &tp(7), StartFrom::Earliest, wait),
            // No time left to ask: likewise, without asking.
            start_offset(&c, &tp(0), StartFrom::Latest, Duration::ZERO),
        ])
    })
    .await??;
    assert_eq!(
        starts,
        vec![
            Offset::Offset(0),
            Offset::Offset(3),
            Offset::Offset(0),
            Offset::Offset(0),
            Offset::Beginning,
            Offset::End,
        ]
    );
    Ok(())
}

#[tokio::test]
async fn transactions_are_refused_so_nothing_may_depend_on_them() -> anyhow::Result<()> {
    require_broker().await?;
    let outcome = tokio::task::spawn_blocking(|| -> anyhow::Result<bool> {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("transactional.id", unique("tx"))
            .create()?;
        Ok(p.init_transactions(Duration::from_secs(10)).is_ok())
    })
    .await??;
    assert!(
        !outcome,
        "the broker accepted a transactional producer: docs/broker-compatibility.md needs updating"
    );
    Ok(())
}

#[tokio::test]
async fn deleting_a_topic_leaves_the_others_alone() -> anyhow::Result<()> {
    let (doomed, kept) = (unique("broker-del"), unique("broker-keep"));
    create_topics(&[(&doomed, 1), (&kept, 1)]).await?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    for r in admin
        .delete_topics(&[&doomed], &AdminOptions::new())
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("delete {t}: {e}"))?;
    }
    let names = tokio::task::spawn_blocking(|| -> anyhow::Result<Vec<String>> {
        let md = assigned_consumer()?.fetch_metadata(None, Duration::from_secs(10))?;
        Ok(md.topics().iter().map(|t| t.name().to_owned()).collect())
    })
    .await??;
    assert!(!names.contains(&doomed), "deleted topic still listed");
    assert!(names.contains(&kept), "deleting one topic removed another");
    Ok(())
}

/// Our producer (librdkafka, `partitioner=murmur2_random`) puts a keyed record where Kafka's
/// Java client would (`cdp_runtime::kafka::partition`), which is also where the outbox relays
/// put theirs: records and tombstones of one key share a partition whatever path wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_partitions_keys_as_the_java_client_does() -> anyhow::Result<()> {
    use cdp_runtime::kafka::partition::partition_of;
    require_broker().await?;
    let topic = unique("partitioner");
    create_topics(&[(&topic, 7)]).await?;
    let producer = Producer::new(&kafka_args("partitioner"))?;
    let keys: Vec<String> = (0..300)
        .map(|i| match i % 3 {
            0 => format!("{i}"),
            1 => uuid::Uuid::new_v4().to_string(),
            _ => format!("subject-{i}-{}", "x".repeat(i % 11)),
        })
        .collect();
    let records: Vec<OutgoingRecord<'_>> = keys
        .iter()
        .map(|k| OutgoingRecord {
            topic: &topic,
            key: Some(k.as_bytes()),
            value: Some(b"v"),
            ..Default::default()
        })
        .collect();
    let delivered = producer.send_all(&records).await?;
    for (k, d) in keys.iter().zip(&delivered) {
        assert_eq!(
            d.partition,
            partition_of(k.as_bytes(), 7),
            "key {k}: the producer and the Java client's partitioner disagree"
        );
    }
    assert!(
        delivered
            .iter()
            .map(|d| d.partition)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == 7
    );
    Ok(())
}

/// Every record left in one partition (offset, key, whether it is a tombstone), read from its
/// low to its high watermark.
fn records_left(brokers: &str, topic: &str) -> anyhow::Result<Vec<(i64, String, bool)>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("compaction-check"))
        .set("enable.auto.commit", "false")
        .create()?;
    let (low, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))?;
    c.assign(&tpl)?;
    let started = std::time::Instant::now();
    while out.last().is_none_or(|(o, _, _)| *o < high - 1) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "read {out:?}, up to {high}"
        );
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m?;
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            out.push((m.offset(), key, m.payload().is_none()));
        }
    }
    Ok(out)
}

/// On a broker of the test's own with `storage`, a compacted topic holding five values of key
/// `a`, then a value and a tombstone of key `b` (offsets 0 to 6).
async fn compacted_topic(storage: &str) -> anyhow::Result<(OwnBroker, String)> {
    let broker = OwnBroker::start_with(storage)?;
    let topic = unique("compacted");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()?;
    let created =
        admin
            .create_topics(
                [&rdkafka::admin::NewTopic::new(
                    &topic,
                    1,
                    rdkafka::admin::TopicReplication::Fixed(1),
                )
                .set("cleanup.policy", "compact")],
                &AdminOptions::new(),
            )
            .await?;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let mut kafka = kafka_args("compaction");
    kafka.brokers = broker.brokers();
    let producer = Producer::new(&kafka)?;
    let mut records: Vec<OutgoingRecord<'_>> = (0..5)
        .map(|_| OutgoingRecord {
            topic: &topic,
            key: Some(b"a"),
            value: Some(b"value"),
            partition: Some(0),
            ..Default::default()
        })
        .collect();
    records.push(OutgoingRecord {
        topic: &topic,
        key: Some(b"b"),
        value: Some(b"value"),
        partition: Some(0),
        ..Default::default()
    });
    records.push(OutgoingRecord {
        topic: &topic,
        key: Some(b"b"),
        value: None,
        partition: Some(0),
        ..Default::default()
    });
    producer.send_all(&records).await?;
    Ok((broker, topic))
}

/// The test broker compacts `cleanup.policy=compact` topics with sqlite storage, in its
/// maintenance task (every `maintenance_interval`, 10 minutes by default), not when records
/// are written: older records of a key are physically removed, the latest value and
/// tombstones stay. Run on brokers of the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_storage_compacts_a_compacted_topic_in_its_maintenance_task() -> anyhow::Result<()> {
    // Before the task runs, everything is there.
    let (idle, topic) = compacted_topic("sqlite://broker.db?maintenance_interval=1h").await?;
    let brokers = idle.brokers();
    let all = tokio::task::spawn_blocking(move || records_left(&brokers, &topic)).await??;
    assert_eq!(
        all.iter().map(|(o, _, _)| *o).collect::<Vec<_>>(),
        (0..7).collect::<Vec<i64>>()
    );
    drop(idle);
    // With a one-second interval, the task compacts it.
    let (broker, topic) = compacted_topic("sqlite://broker.db?maintenance_interval=1s").await?;
    let compacted = vec![(4, "a".to_owned(), false), (6, "b".to_owned(), true)];
    wait_until(
        "only the latest value of a and b's tombstone are left",
        Duration::from_secs(60),
        || {
            let (brokers, topic, want) = (broker.brokers(), topic.clone(), compacted.clone());
            async move {
                let left =
                    tokio::task::spawn_blocking(move || records_left(&brokers, &topic)).await??;
                Ok(left == want)
            }
        },
    )
    .await?;
    Ok(())
}
