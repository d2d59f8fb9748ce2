//! Moving a consumer's stored positions: what `cdp replay <service> --to ...` does.
//!
//! Effectively-once services keep their positions in Postgres (the runner seeks to them on
//! assignment); other consumers keep them in their Kafka group. Either way a move is
//! planned first (current and target offset per partition, shown by a dry run), refused
//! while the group has live members (they would overwrite it) unless forced, then applied.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::config::KafkaArgs;
use crate::kafka::{client_config, KafkaSetupError};
use crate::TopicPartition;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where to move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Earliest,
    Latest,
    /// The first offset whose record timestamp is at or after this time (the end where
    /// there is none).
    Time(DateTime<Utc>),
    /// Explicit offsets: `topic:partition:offset`, or `partition:offset` for every topic.
    Offsets(Vec<(Option<String>, i32, i64)>),
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("invalid target {0:?}: expected earliest, latest, an RFC 3339 time, or partition:offset / topic:partition:offset, comma-separated")]
    InvalidTarget(String),
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("{topic}:{partition} is not a partition of the service's topics")]
    UnknownPartition { topic: String, partition: i32 },
    #[error("group {group} has {} live member(s) ({}): stop the service first, or force", members.len(), members.join(", "))]
    LiveMembers { group: String, members: Vec<String> },
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("reading {0} to its end stalled")]
    ScanTimeout(String),
}

impl FromStr for Target {
    type Err = ReplayError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "earliest" => return Ok(Target::Earliest),
            "latest" => return Ok(Target::Latest),
            _ => {}
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(Target::Time(t.with_timezone(&Utc)));
        }
        let bad = || ReplayError::InvalidTarget(s.to_owned());
        s.split(',')
            .map(|part| {
                let mut it = part.trim().rsplitn(3, ':');
                let offset: i64 = it.next().and_then(|o| o.parse().ok()).ok_or_else(bad)?;
                let partition: i32 = it.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                let topic = match it.next() {
                    Some("") => return Err(bad()),
                    other => other.map(str::to_owned),
                };
                if offset < 0 || partition < 0 {
                    return Err(bad());
                }
                Ok((topic, partition, offset))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Target::Offsets)
    }
}

/// Where a consumer's positions live.
#[derive(Clone, Debug)]
pub enum PositionStore {
    /// `cdp_consumer_offsets` rows of `group` in this database (effectively-once services).
    Postgres { pool: PgPool, group: String },
    /// The Kafka group's committed offsets.
    Kafka { group: String },
}

impl PositionStore {
    pub fn group(&self) -> &str {
        match self {
            PositionStore::Postgres { group, .. } | PositionStore::Kafka { group } => group,
        }
    }
}

/// One partition's move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub partition: TopicPartition,
    /// The stored next offset (`None`: nothing stored; the consumer would start from its
    /// default).
    pub current: Option<i64>,
    pub target: i64,
    /// The partition's (low, high) watermarks, for context.
    pub watermarks: (i64, i64),
}

/// What a replay would do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub group: String,
    pub moves: Vec<Move>,
    /// Live members of the group (client ids), at planning time.
    pub members: Vec<String>,
}

fn consumer(kafka: &KafkaArgs, group: Option<&str>) -> Result<BaseConsumer, ReplayError> {
    let mut cfg = client_config(kafka).map_err(KafkaSetupError::from)?;
    if let Some(g) = group {
        cfg.set("group.id", g).set("enable.auto.commit", "false");
    }
    Ok(cfg.create().map_err(KafkaSetupError::from)?)
}

/// Partition → (low, high) watermarks of `topics`.
pub fn watermarks(
    kafka: &KafkaArgs,
    topics: &[String],
) -> Result<BTreeMap<TopicPartition, (i64, i64)>, ReplayError> {
    let c = consumer(kafka, None)?;
    let mut out = BTreeMap::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), TIMEOUT)?;
        let Some(mt) = md
            .topics()
            .iter()
            .find(|mt| mt.name() == t && mt.error().is_none())
        else {
            return Err(ReplayError::UnknownTopic(t.clone()));
        };
        for part in mt.partitions() {
            let w = c.fetch_watermarks(t, part.id(), TIMEOUT)?;
            out.insert(
                TopicPartition {
                    topic: t.clone(),
                    partition: part.id(),
                },
                w,
            );
        }
    }
    Ok(out)
}

/// Reads every record of `topics`, each partition from its low to its high watermark as
/// they are when called, in offset order per partition, handing each to `visit`; returns
/// how many records it read. Assigned, not subscribed: no group, no committed position.
/// Fails, naming the partitions, when a topic stops coming for `idle` before its end.
pub fn scan(
    kafka: &KafkaArgs,
    topics: &[String],
    idle: Duration,
    mut visit: impl FnMut(&crate::RawRecord),
) -> Result<u64, ReplayError> {
    let mut read = 0;
    for topic in topics {
        read += scan_topic(kafka, topic, idle, &mut visit)?;
    }
    Ok(read)
}

/// One topic of [`scan`] (one consumer per topic: the end-of-partition event names only
/// the partition).
fn scan_topic(
    kafka: &KafkaArgs,
    topic: &str,
    idle: Duration,
    visit: &mut impl FnMut(&crate::RawRecord),
) -> Result<u64, ReplayError> {
    let marks = watermarks(kafka, &[topic.to_owned()])?;
    let mut want = TopicPartitionList::new();
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    for (tp, (low, high)) in &marks {
        if high > low {
            want.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*low))?;
            open.insert(tp.partition, *high);
        }
    }
    if open.is_empty() {
        return Ok(0);
    }
    let c: BaseConsumer = client_config(kafka)
        .map_err(KafkaSetupError::from)?
        .set("group.id", "cdp.scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(KafkaSetupError::from)?;
    c.assign(&want)?;
    let mut copier = crate::kafka::record::RecordCopier::new();
    let mut progress = std::time::Instant::now();
    let mut read = 0u64;
    while !open.is_empty() {
        if progress.elapsed() > idle {
            let names: Vec<String> = open.keys().map(|p| format!("{topic}:{p}")).collect();
            return Err(ReplayError::ScanTimeout(names.join(", ")));
        }
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        progress = std::time::Instant::now();
        let m = match m {
            Ok(m) => m,
            // The end of a partition, also when its last offsets were compacted away.
            Err(KafkaError::PartitionEOF(partition)) => {
                open.remove(&partition);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let r = copier.copy(&m);
        let Some(high) = open.get(&r.partition).copied() else {
            continue;
        };
        if r.offset < high {
            visit(&r);
            read += 1;
        }
        if r.offset + 1 >= high {
            open.remove(&r.partition);
        }
    }
    Ok(read)
}

/// For each partition, the first offset whose timestamp is at or after `t`; partitions
/// with no such record are absent.
pub fn offsets_for_time(
    kafka: &KafkaArgs,
    parts: &[TopicPartition],
    t: DateTime<Utc>,
) -> Result<Vec<(TopicPartition, i64)>, ReplayError> {
    let c = consumer(kafka, None)?;
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(t.timestamp_millis()))?;
    }
    Ok(concrete_offsets(&c.offsets_for_times(tpl, TIMEOUT)?))
}

/// The partitions of a list that carry a concrete offset.
fn concrete_offsets(tpl: &TopicPartitionList) -> Vec<(TopicPartition, i64)> {
    tpl.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((
                TopicPartition {
                    topic: e.topic().to_owned(),
                    partition: e.partition(),
                },
                o,
            )),
            _ => None,
        })
        .collect()
}

/// Live members of a Kafka group (client id and host), empty when it has none.
pub fn live_members(kafka: &KafkaArgs, group: &str) -> Result<Vec<String>, ReplayError> {
    let c = consumer(kafka, None)?;
    let list = c.fetch_group_list(Some(group), TIMEOUT)?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .map(|m| format!("{}@{}", m.client_id(), m.client_host()))
        .collect())
}

async fn current_positions(
    kafka: &KafkaArgs,
    store: &PositionStore,
    parts: Vec<TopicPartition>,
) -> Result<HashMap<TopicPartition, i64>, ReplayError> {
    match store {
        PositionStore::Postgres { pool, group } => {
            Ok(crate::pg::stored_positions(pool, group).await?)
        }
        PositionStore::Kafka { group } => {
            let (kafka, group) = (kafka.clone(), group.clone());
            tokio::task::spawn_blocking(move || {
                let c = consumer(&kafka, Some(&group))?;
                let mut tpl = TopicPartitionList::new();
                for p in &parts {
                    tpl.add_partition(&p.topic, p.partition);
                }
                let committed = c.committed_offsets(tpl, TIMEOUT)?;
                Ok(concrete_offsets(&committed).into_iter().collect())
            })
            .await?
        }
    }
}

/// Plans moving `store`'s positions on `topics` to `target`. Changes nothing.
pub async fn plan(
    kafka: &KafkaArgs,
    store: &PositionStore,
    topics: &[String],
    target: &Target,
) -> Result<Plan, ReplayError> {
    let marks = {
        let (kafka, topics) = (kafka.clone(), topics.to_vec());
        tokio::task::spawn_blocking(move || watermarks(&kafka, &topics)).await??
    };
    let parts: Vec<TopicPartition> = marks.keys().cloned().collect();
    let current = current_positions(kafka, store, parts.clone()).await?;
    let targets: BTreeMap<TopicPartition, i64> = match target {
        Target::Earliest => marks
            .iter()
            .map(|(tp, (lo, _))| (tp.clone(), *lo))
            .collect(),
        Target::Latest => marks
            .iter()
            .map(|(tp, (_, hi))| (tp.clone(), *hi))
            .collect(),
        Target::Time(t) => {
            let (kafka, parts, t) = (kafka.clone(), parts.clone(), *t);
            let found: HashMap<TopicPartition, i64> =
                tokio::task::spawn_blocking(move || offsets_for_time(&kafka, &parts, t))
                    .await??
                    .into_iter()
                    .collect();
            // No record at or after the time: the end of the partition.
            marks
                .iter()
                .map(|(tp, (_, hi))| (tp.clone(), found.get(tp).copied().unwrap_or(*hi)))
                .collect()
        }
        Target::Offsets(list) => {
            let mut out = BTreeMap::new();
            for (topic, partition, offset) in list {
                let matching: Vec<&TopicPartition> = marks
                    .keys()
                    .filter(|tp| {
                        tp.partition == *partition && topic.as_ref().is_none_or(|t| &tp.topic == t)
                    })
                    .collect();
                if matching.is_empty() {
                    return Err(ReplayError::UnknownPartition {
                        topic: topic.clone().unwrap_or_else(|| topics.join("|")),
                        partition: *partition,
                    });
                }
                for tp in matching {
                    out.insert(tp.clone(), *offset);
                }
            }
            out
        }
    };
    let members = {
        let (kafka, group) = (kafka.clone(), store.group().to_owned());
        tokio::task::spawn_blocking(move || live_members(&kafka, &group)).await??
    };
    Ok(Plan {
        group: store.group().to_owned(),
        moves: targets
            .into_iter()
            .map(|(tp, target)| Move {
                current: current.get(&tp).copied(),
                watermarks: marks.get(&tp).copied().unwrap_or((0, 0)),
                partition: tp,
                target,
            })
            .collect(),
        members,
    })
}

/// Applies a plan. Refuses when the group has live members now, unless `force`.
pub async fn apply(
    kafka: &KafkaArgs,
    store: &PositionStore,
    plan: &Plan,
    force: bool,
) -> Result<(), ReplayError> {
    let members = {
        let (kafka, group) = (kafka.clone(), plan.group.clone());
        tokio::task::spawn_blocking(move || live_members(&kafka, &group)).await??
    };
    if !members.is_empty() && !force {
        return Err(ReplayError::LiveMembers {
            group: plan.group.clone(),
            members,
        });
    }
    match store {
        PositionStore::Postgres { pool, group } => {
            let mut tx = pool.begin().await?;
            for m in &plan.moves {
                sqlx::query(
                    "INSERT INTO cdp_consumer_offsets (group_id, topic, partition, next_offset)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (group_id, topic, partition)
                     DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
                )
                .bind(group)
                .bind(&m.partition.topic)
                .bind(m.partition.partition)
                .bind(m.target)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }
        PositionStore::Kafka { group } => {
            let (kafka, group, moves) = (kafka.clone(), group.clone(), plan.moves.clone());
            tokio::task::spawn_blocking(move || -> Result<(), ReplayError> {
                let c = consumer(&kafka, Some(&group))?;
                let mut tpl = TopicPartitionList::new();
                for m in &moves {
                    tpl.add_partition_offset(
                        &m.partition.topic,
                        m.partition.partition,
                        Offset::Offset(m.target),
                    )?;
                }
                c.commit(&tpl, CommitMode::Sync)?;
                Ok(())
            })
            .await?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!("earliest".parse::<Target>().ok(), Some(Target::Earliest));
        assert_eq!("latest".parse::<Target>().ok(), Some(Target::Latest));
        assert!(matches!(
            "2026-11-22T10:00:00Z".parse::<Target>(),
            Ok(Target::Time(_))
        ));
        assert_eq!(
            "0:10, cdp.customer-events:3:7".parse::<Target>().ok(),
            Some(Target::Offsets(vec![
                (None, 0, 10),
                (Some("cdp.customer-events".into()), 3, 7)
            ]))
        );
        for bad in ["", "soon", "1", ":1:2", "0:-1", "x:y"] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
    }
}
