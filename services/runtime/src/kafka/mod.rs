//! Kafka plumbing on rdkafka: client configuration, records, the producer and the
//! consumer runner.

pub mod partition;
pub mod producer;
pub mod record;
pub mod runner;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

use crate::config::{ConfigError, KafkaArgs};

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the Kafka client")]
    Client(#[from] KafkaError),
    #[error("cannot create topic {topic}")]
    CreateTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot read the configuration of topic {topic}")]
    DescribeTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// The base client configuration: brokers plus the operator's extra properties.
pub fn client_config(kafka: &KafkaArgs) -> Result<ClientConfig, ConfigError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in kafka.extra_properties()? {
        cfg.set(k, v);
    }
    Ok(cfg)
}
