//! The direct-producer library: what the HTTP API does after parsing, usable by any Rust
//! app that produces straight to Kafka. It normalizes and hashes identifiers, picks the
//! subject and its data key (created on first sight), seals every PII field, keys the
//! record, encodes it in the contract and produces it idempotently with `acks=all`.
//!
//! Build a [`Draft`]: a contract event whose PII fields hold *plaintext* (see
//! [`plain`]), with an empty subject, plus the raw identifiers. The publisher fills in the
//! rest; the plaintext never leaves the process.

use std::sync::Arc;

use cdp_keystore::crypto::field_aad;
use cdp_keystore::identifiers::{subject_id, BLOCKED_HEADER};
use cdp_keystore::{
    BlockPatterns, IdentifierHasher, KeyStore, KeyStoreError, NormalizeError, RawIdentifier,
};
use cdp_runtime::kafka::producer::{OutgoingRecord, ProduceError, Producer};
use cdp_runtime::topics::{Topic, Topics};
use cdp_schemas::{
    CapsuleEvent, CodecError, Contract, CustomerEvent, Envelope, IdentifierKind, Sealed, Subject,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A PII value in plaintext, for a draft's PII field.
pub fn plain(s: impl Into<String>) -> Option<Sealed> {
    Some(Sealed::from_bytes(s.into().into_bytes()))
}

/// An envelope for a draft: the publisher fills the subject and partition key.
pub fn envelope(
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    source: &str,
) -> Envelope {
    Envelope {
        event_id,
        occurred_at,
        received_at,
        source: source.to_owned(),
        subject: Subject {
            subject_id: String::new(),
            identifiers: Vec::new(),
        },
        partition_key: String::new(),
    }
}

/// An event before sealing and keying.
#[derive(Debug, Clone)]
pub struct Draft<E> {
    /// PII fields hold plaintext; the subject and partition key are filled in on publish.
    pub event: E,
    pub identifiers: Vec<RawIdentifier>,
}

/// Events the publisher routes: which topic, and which key.
pub trait Publishable: Contract {
    const TOPIC: Topic;
    /// The Kafka key, once the subject is known.
    fn partition_key(&self) -> String;
}

impl Publishable for CustomerEvent {
    const TOPIC: Topic = Topic::CustomerEvents;
    fn partition_key(&self) -> String {
        self.envelope.subject.subject_id.clone()
    }
}

impl Publishable for CapsuleEvent {
    const TOPIC: Topic = Topic::CapsuleEvents;
    fn partition_key(&self) -> String {
        self.payload.capsule_id().to_string()
    }
}

/// A sealed, encoded record ready to produce.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub event_id: Uuid,
    pub event_type: &'static str,
    /// The `cdp-blocked-identifiers` header: hashes of the identifiers a blocked pattern
    /// matched, comma-separated (None when none did).
    pub blocked: Option<String>,
}

impl Prepared {
    /// The headers every published record carries.
    pub fn headers<'a>(&'a self, event_id: &'a str) -> Vec<(&'a str, Option<&'a [u8]>)> {
        let mut h = vec![
            ("cdp.event_id", Some(event_id.as_bytes())),
            ("cdp.event_type", Some(self.event_type.as_bytes())),
        ];
        if let Some(b) = &self.blocked {
            h.push((BLOCKED_HEADER, Some(b.as_bytes())));
        }
        h
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("event {index}: identifier {kind:?} {source}")]
    Identifier {
        index: usize,
        kind: IdentifierKind,
        #[source]
        source: NormalizeError,
    },
    #[error("event {index} has no identifier: at least a user id or an anonymous id is needed")]
    NoIdentifier { index: usize },
    #[error("the key store failed")]
    Keys(#[from] KeyStoreError),
    #[error("sealing PII failed")]
    Seal(#[from] cdp_keystore::CryptoError),
    #[error("encoding failed")]
    Encode(#[from] CodecError),
    #[error("producing failed")]
    Produce(#[from] ProduceError),
}

pub struct Publisher {
    producer: Arc<Producer>,
    keys: Arc<KeyStore>,
    hasher: Arc<IdentifierHasher>,
    topics: Topics,
    blocked: BlockPatterns,
}

impl Publisher {
    pub fn new(
        producer: Arc<Producer>,
        keys: Arc<KeyStore>,
        hasher: Arc<IdentifierHasher>,
        topics: Topics,
    ) -> Self {
        Self {
            producer,
            keys,
            hasher,
            topics,
            blocked: BlockPatterns::default(),
        }
    }

    /// Identifiers matching these patterns are named in each record's `cdp-blocked-identifiers`
    /// header (identity resolution never links them).
    pub fn with_blocked_patterns(mut self, patterns: BlockPatterns) -> Self {
        self.blocked = patterns;
        self
    }

    pub fn hasher(&self) -> &IdentifierHasher {
        &self.hasher
    }

    /// Normalizes, hashes, seals, keys and encodes drafts. Nothing is produced.
    pub async fn prepare<E: Publishable>(
        &self,
        drafts: Vec<Draft<E>>,
    ) -> Result<Vec<Prepared>, PublishError> {
        let mut staged = Vec::with_capacity(drafts.len());
        for (index, d) in drafts.into_iter().enumerate() {
            let mut ids = Vec::with_capacity(d.identifiers.len());
            let mut blocked: Vec<String> = Vec::new();
            for raw in &d.identifiers {
                let (id, normalized) =
                    self.hasher
                        .identifier(raw)
                        .map_err(|source| PublishError::Identifier {
                            index,
                            kind: raw.kind,
                            source,
                        })?;
                if self.blocked.blocks(id.kind, &normalized) && !blocked.contains(&id.value_hash) {
                    blocked.push(id.value_hash.clone());
                }
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let subject = subject_id(&ids).ok_or(PublishError::NoIdentifier { index })?;
            let blocked = (!blocked.is_empty()).then(|| blocked.join(","));
            staged.push((subject, ids, d.event, blocked));
        }
        let subjects: Vec<&str> = staged.iter().map(|(s, ..)| s.as_str()).collect();
        let keys = self.keys.current_keys(&subjects).await?;
        let topic = self.topics.name(E::TOPIC);
        let mut out = Vec::with_capacity(staged.len());
        for (subject, ids, mut event, blocked) in staged {
            let key = keys
                .get(&subject)
                .ok_or_else(|| KeyStoreError::Race(subject.clone()))?;
            for (field, slot) in event.pii_mut() {
                if let Some(plaintext) = slot.take() {
                    *slot = Some(key.seal(
                        self.keys.rng(),
                        &field_aad(&subject, field),
                        plaintext.as_bytes(),
                    )?);
                }
            }
            event.envelope_mut().subject = Subject {
                subject_id: subject,
                identifiers: ids,
            };
            event.envelope_mut().partition_key = event.partition_key();
            let value = cdp_schemas::encode(&event)?;
            out.push(Prepared {
                topic: topic.clone(),
                key: event.partition_key(),
                value,
                event_id: event.envelope().event_id,
                event_type: event.event_type(),
                blocked,
            });
        }
        Ok(out)
    }

    /// Produces prepared records and waits until the broker acknowledged every one.
    pub async fn send(&self, prepared: &[Prepared]) -> Result<(), PublishError> {
        let ids: Vec<String> = prepared.iter().map(|p| p.event_id.to_string()).collect();
        let recs: Vec<OutgoingRecord<'_>> = prepared
            .iter()
            .zip(&ids)
            .map(|(p, id)| OutgoingRecord {
                topic: &p.topic,
                key: Some(p.key.as_bytes()),
                value: Some(&p.value),
                headers: p.headers(id),
                timestamp_ms: None,
                partition: None,
            })
            .collect();
        self.producer.send_all(&recs).await?;
        Ok(())
    }

    /// [`prepare`](Self::prepare) then [`send`](Self::send).
    pub async fn publish<E: Publishable>(
        &self,
        drafts: Vec<Draft<E>>,
    ) -> Result<Vec<Prepared>, PublishError> {
        let prepared = self.prepare(drafts).await?;
        self.send(&prepared).await?;
        Ok(prepared)
    }
}
