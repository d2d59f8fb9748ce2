//! The producer every service uses: idempotent, `acks=all`, compressed. A send resolves
//! only once the broker has acknowledged the record, so "sent" means durable.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaArgs;
use crate::kafka::{client_config, KafkaSetupError};

/// A record to produce.
#[derive(Clone, Debug, Default)]
pub struct OutgoingRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    /// `None` produces a tombstone.
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    pub timestamp_ms: Option<i64>,
    pub partition: Option<i32>,
}

/// Where the broker stored a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The broker refused or did not acknowledge the record in time. With an idempotent
    /// producer a timeout means "possibly persisted": retry, and let consumers dedup.
    #[error("record for topic {topic} was not acknowledged")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// The local queue stayed full for the whole queue timeout (backpressure).
    #[error("producer queue full for {0:?}")]
    QueueFull(Duration),
    #[error("producer was shut down before delivery was known")]
    Canceled,
    #[error("flushing the producer timed out")]
    Flush(#[source] KafkaError),
}

impl ProduceError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProduceError::Delivery { source, .. } => !matches!(
                source.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::InvalidRecord
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::InvalidMessage
                )
            ),
            ProduceError::QueueFull(_) | ProduceError::Canceled | ProduceError::Flush(_) => true,
        }
    }
}

/// Tuning of the producer.
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// How long a send may wait for room in the local queue.
    pub queue_timeout: Duration,
    /// librdkafka `message.timeout.ms`: total time to get an acknowledgement.
    pub delivery_timeout: Duration,
    /// librdkafka `linger.ms`.
    pub linger: Duration,
    /// How long dropping the producer waits to flush queued records.
    pub flush_timeout: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            queue_timeout: Duration::from_secs(5),
            delivery_timeout: Duration::from_secs(120),
            linger: Duration::from_millis(5),
            flush_timeout: Duration::from_secs(10),
        }
    }
}

/// An idempotent, acknowledged producer. Not `Clone`: share it behind an `Arc`; dropping
/// the last handle flushes what is queued, with a deadline.
pub struct Producer {
    inner: FutureProducer,
    options: ProducerOptions,
}

fn headers(hs: &[(&str, Option<&[u8]>)]) -> Option<OwnedHeaders> {
    if hs.is_empty() {
        return None;
    }
    Some(
        hs.iter()
            .fold(OwnedHeaders::new_with_capacity(hs.len()), |acc, (k, v)| {
                acc.insert(Header { key: k, value: *v })
            }),
    )
}

impl Producer {
    pub fn new(kafka: &KafkaArgs) -> Result<Self, KafkaSetupError> {
        Self::with_options(kafka, ProducerOptions::default())
    }

    pub fn with_options(
        kafka: &KafkaArgs,
        options: ProducerOptions,
    ) -> Result<Self, KafkaSetupError> {
        let mut cfg = client_config(kafka)?;
        cfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", kafka.compression.as_str())
            // Kafka's Java default: a key lands on the same partition whichever client produced it.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", options.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                options.delivery_timeout.as_millis().to_string(),
            );
        let inner: FutureProducer = cfg.create()?;
        Ok(Self { inner, options })
    }

    fn enqueue(&self, rec: &OutgoingRecord<'_>) -> Result<DeliveryFuture, KafkaError> {
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(rec.topic);
        if let Some(k) = rec.key {
            fr = fr.key(k);
        }
        if let Some(v) = rec.value {
            fr = fr.payload(v);
        }
        if let Some(h) = headers(&rec.headers) {
            fr = fr.headers(h);
        }
        if let Some(ts) = rec.timestamp_ms {
            fr = fr.timestamp(ts);
        }
        if let Some(p) = rec.partition {
            fr = fr.partition(p);
        }
        self.inner.send_result(fr).map_err(|(e, _)| e)
    }

    async fn settle(topic: &str, fut: DeliveryFuture) -> Result<Delivered, ProduceError> {
        match fut.await {
            Ok(Ok(d)) => Ok(Delivered {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Err((source, _))) => Err(ProduceError::Delivery {
                topic: topic.to_owned(),
                source,
            }),
            Err(_) => Err(ProduceError::Canceled),
        }
    }

    /// Produces one record and waits for the broker's acknowledgement.
    pub async fn send(&self, rec: OutgoingRecord<'_>) -> Result<Delivered, ProduceError> {
        let mut out = self.send_all(std::slice::from_ref(&rec)).await?;
        out.pop().ok_or(ProduceError::Canceled)
    }

    /// Produces every record, pipelined, and waits until all are acknowledged. Results are
    /// in input order. The first failure is returned (the others may have been stored:
    /// delivery is at-least-once and consumers dedup by event id).
    pub async fn send_all(
        &self,
        recs: &[OutgoingRecord<'_>],
    ) -> Result<Vec<Delivered>, ProduceError> {
        let mut pending: VecDeque<(usize, DeliveryFuture)> = VecDeque::with_capacity(recs.len());
        let mut out: Vec<Option<Delivered>> = vec![None; recs.len()];
        for (i, rec) in recs.iter().enumerate() {
            let started = Instant::now();
            loop {
                match self.enqueue(rec) {
                    Ok(fut) => {
                        pending.push_back((i, fut));
                        break;
                    }
                    Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                        if started.elapsed() > self.options.queue_timeout {
                            return Err(ProduceError::QueueFull(self.options.queue_timeout));
                        }
                        match pending.pop_front() {
                            Some((j, fut)) => {
                                out[j] = Some(Self::settle(recs[j].topic, fut).await?)
                            }
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err(source) => {
                        return Err(ProduceError::Delivery {
                            topic: rec.topic.to_owned(),
                            source,
                        })
                    }
                }
            }
        }
        while let Some((j, fut)) = pending.pop_front() {
            out[j] = Some(Self::settle(recs[j].topic, fut).await?);
        }
        out.into_iter()
            .map(|d| d.ok_or(ProduceError::Canceled))
            .collect()
    }

    /// Waits for every queued record to be acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), ProduceError> {
        self.inner.flush(timeout).map_err(ProduceError::Flush)
    }

    /// Records queued locally and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        if self.inner.in_flight_count() > 0 {
            if let Err(e) = self.inner.flush(self.options.flush_timeout) {
                tracing::error!(error = %e, in_flight = self.inner.in_flight_count(), "producer dropped with unacknowledged records");
            }
        }
    }
}
