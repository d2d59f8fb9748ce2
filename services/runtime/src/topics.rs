//! The topic catalogue: every topic the platform uses, in one place, and the admin step
//! that creates the missing ones with their configs.

use std::time::Duration;

use std::collections::HashMap;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaArgs;
use crate::kafka::{client_config, KafkaSetupError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cleanup {
    Delete,
    Compact,
}

impl Cleanup {
    fn as_str(self) -> &'static str {
        match self {
            Cleanup::Delete => "delete",
            Cleanup::Compact => "compact",
        }
    }

    /// A topic's `cleanup.policy` value: compacted when it names `compact` (also
    /// `compact,delete`), where offsets of a partition have holes by design.
    pub fn parse(policy: &str) -> Self {
        if policy.split(',').any(|p| p.trim() == "compact") {
            Cleanup::Compact
        } else {
            Cleanup::Delete
        }
    }
}

/// The cleanup policy of each topic as the broker reports it (`delete`, Kafka's default,
/// when it reports none).
pub async fn cleanup_policies(
    kafka: &KafkaArgs,
    topics: &[String],
) -> Result<HashMap<String, Cleanup>, KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)?.create()?;
    let specs: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let results = admin.describe_configs(&specs, &opts).await?;
    let mut out = HashMap::new();
    for (topic, result) in topics.iter().zip(results) {
        let policy = match result {
            Ok(resource) => resource
                .get("cleanup.policy")
                .and_then(|e| e.value.as_deref())
                .map_or(Cleanup::Delete, Cleanup::parse),
            Err(code) => {
                return Err(KafkaSetupError::DescribeTopic {
                    topic: topic.clone(),
                    source: KafkaError::AdminOp(code),
                })
            }
        };
        out.insert(topic.clone(), policy);
    }
    Ok(out)
}

/// The platform's topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    CustomerEvents,
    CapsuleEvents,
    Compliance,
    Identity,
    ResolvedEvents,
    Profiles,
    Audit,
    DeadLetter,
}

/// A topic's name (after the prefix) and configs.
#[derive(Clone, Copy, Debug)]
pub struct TopicSpec {
    pub suffix: &'static str,
    pub partitions: i32,
    pub cleanup: Cleanup,
    /// `retention.ms`; -1 keeps records forever (the log is the source of truth).
    pub retention_ms: i64,
    pub purpose: &'static str,
}

const DAY_MS: i64 = 86_400_000;

impl Topic {
    pub const ALL: [Topic; 8] = [
        Topic::CustomerEvents,
        Topic::CapsuleEvents,
        Topic::Compliance,
        Topic::Identity,
        Topic::ResolvedEvents,
        Topic::Profiles,
        Topic::Audit,
        Topic::DeadLetter,
    ];

    pub fn spec(self) -> TopicSpec {
        let (suffix, partitions, cleanup, retention_ms, purpose) = match self {
            Topic::CustomerEvents => (
                "customer-events",
                6,
                Cleanup::Delete,
                -1,
                "customer events, keyed by subject id",
            ),
            Topic::CapsuleEvents => (
                "capsule-events",
                6,
                Cleanup::Delete,
                -1,
                "capsule events, keyed by capsule id",
            ),
            Topic::Compliance => (
                "compliance",
                3,
                Cleanup::Delete,
                -1,
                "erasure and export requests and completions",
            ),
            Topic::Identity => (
                "identity",
                6,
                Cleanup::Compact,
                -1,
                "identity graph changes, keyed by link id (links), loser (merges) or new profile (splits)",
            ),
            Topic::ResolvedEvents => (
                "customer-events-resolved",
                6,
                Cleanup::Delete,
                -1,
                "customer events once each (duplicates removed), stamped with their profile id, keyed by it",
            ),
            Topic::Profiles => (
                "profiles",
                6,
                Cleanup::Compact,
                -1,
                "profile snapshots, keyed by profile id",
            ),
            Topic::Audit => (
                "audit",
                1,
                Cleanup::Delete,
                -1,
                "audit trail of compliance actions",
            ),
            Topic::DeadLetter => (
                "dead-letter",
                3,
                Cleanup::Delete,
                14 * DAY_MS,
                "records a consumer could not process, with the reason in headers",
            ),
        };
        TopicSpec {
            suffix,
            partitions,
            cleanup,
            retention_ms,
            purpose,
        }
    }
}

/// Topic names under one prefix (`cdp.` by default; tests use a unique prefix each).
#[derive(Clone, Debug)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn name(&self, topic: Topic) -> String {
        format!("{}{}", self.prefix, topic.spec().suffix)
    }
}

/// What `ensure` did to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    Created(String),
    Existed(String),
}

/// Creates the given topics where missing, with the catalogue's configs.
pub async fn ensure(
    kafka: &KafkaArgs,
    topics: &[(String, TopicSpec)],
) -> Result<Vec<Ensured>, KafkaSetupError> {
    let replication = kafka.topic_replication;
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)?.create()?;
    let retention: Vec<String> = topics
        .iter()
        .map(|(_, s)| s.retention_ms.to_string())
        .collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&retention)
        .map(|((name, spec), retention)| {
            NewTopic::new(name, spec.partitions, TopicReplication::Fixed(replication))
                .set("cleanup.policy", spec.cleanup.as_str())
                .set("retention.ms", retention)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &opts).await?;
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(name) => out.push(Ensured::Created(name)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => out.push(Ensured::Existed(name)),
            Err((name, code)) => {
                return Err(KafkaSetupError::CreateTopic {
                    topic: name,
                    source: KafkaError::AdminOp(code),
                })
            }
        }
    }
    Ok(out)
}

/// Every catalogue topic under a prefix.
pub fn catalogue(topics: &Topics) -> Vec<(String, TopicSpec)> {
    Topic::ALL
        .iter()
        .map(|t| (topics.name(*t), t.spec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        let t = Topics::new("x.");
        let names: std::collections::BTreeSet<String> =
            Topic::ALL.iter().map(|k| t.name(*k)).collect();
        assert_eq!(names.len(), Topic::ALL.len());
        assert!(names.iter().all(|n| n.starts_with("x.")));
        assert_eq!(t.name(Topic::CustomerEvents), "x.customer-events");
    }

    #[test]
    fn a_policy_naming_compact_is_compacted() {
        assert_eq!(Cleanup::parse("compact"), Cleanup::Compact);
        assert_eq!(Cleanup::parse("delete, compact"), Cleanup::Compact);
        assert_eq!(Cleanup::parse("delete"), Cleanup::Delete);
        assert_eq!(Cleanup::parse(""), Cleanup::Delete);
    }

    #[test]
    fn compacted_topics_are_the_keyed_snapshots() {
        let compacted: Vec<Topic> = Topic::ALL
            .into_iter()
            .filter(|t| t.spec().cleanup == Cleanup::Compact)
            .collect();
        assert_eq!(compacted, vec![Topic::Identity, Topic::Profiles]);
    }
}
