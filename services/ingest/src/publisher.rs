//! The direct-producer library: what the HTTP API does after parsing, usable by any Rust
//! app that produces straight to Kafka. It normalizes identifiers and replaces them by their
//! vault tokens (created on first sight), picks the subject and its data key (created on
//! first sight), seals every PII field, keys the record, encodes it in the contract and
//! produces it idempotently with `acks=all`.
//!
//! Build a [`Draft`]: a contract event whose PII fields hold *plaintext* (see
//! [`plain`]), with an empty subject, plus the raw identifiers. The publisher fills in the
//! rest; the plaintext never leaves the process.

use std::sync::Arc;

use cdp_keystore::crypto::field_aad;
use cdp_keystore::identifiers::{subject_id, BLOCKED_HEADER};
use cdp_keystore::{
    BlockPatterns, IdentifierHasher, KeyStore, KeyStoreError, NormalizeError, Normalized,
    RawIdentifier, Vault, VaultError,
};
use cdp_runtime::kafka::producer::{OutgoingRecord, ProduceError, Producer};
use cdp_runtime::topics::{Topic, Topics};
use cdp_schemas::{
    CapsuleEvent, CapsulePayload, CodecError, Contract, CustomerEvent, CustomerPayload, Envelope,
    Identifier, IdentifierKind, Sealed, Subject,
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
    /// PII fields hold plaintext; the subject, the partition key and the identifiers the
    /// payload refers to are filled in on publish.
    pub event: E,
    /// The subject's identifiers.
    pub identifiers: Vec<RawIdentifier>,
    /// Identifiers the payload refers to besides the subject's own (an alias's previous id),
    /// tokenized with them and handed to [`Publishable::bind`] in order.
    pub references: Vec<RawIdentifier>,
}

impl<E> Draft<E> {
    /// A draft whose payload refers to no identifier but the subject's.
    pub fn new(event: E, identifiers: Vec<RawIdentifier>) -> Self {
        Self {
            event,
            identifiers,
            references: Vec::new(),
        }
    }
}

/// Events the publisher routes: which topic, and which key.
pub trait Publishable: Contract {
    const TOPIC: Topic;
    /// The Kafka key, once the subject is known.
    fn partition_key(&self) -> String;
    /// Fills what the payload holds of the subject (its token) and of the draft's references
    /// (their identifiers, in order).
    fn bind(&mut self, subject: &str, references: Vec<Identifier>);
}

impl Publishable for CustomerEvent {
    const TOPIC: Topic = Topic::CustomerEvents;
    fn partition_key(&self) -> String {
        self.envelope.subject.subject_id.clone()
    }
    fn bind(&mut self, _subject: &str, references: Vec<Identifier>) {
        if let (CustomerPayload::Alias(a), Some(previous)) =
            (&mut self.payload, references.into_iter().next())
        {
            a.previous = previous;
        }
    }
}

impl Publishable for CapsuleEvent {
    const TOPIC: Topic = Topic::CapsuleEvents;
    fn partition_key(&self) -> String {
        self.payload.capsule_id().to_string()
    }
    fn bind(&mut self, subject: &str, _references: Vec<Identifier>) {
        if let CapsulePayload::Created(c) = &mut self.payload {
            c.owner_subject_id = subject.to_owned();
        }
    }
}

/// A sealed, encoded record ready to produce.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The draft's position in the batch it was prepared from.
    pub draft: usize,
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub event_id: Uuid,
    pub event_type: &'static str,
    /// The `cdp-blocked-identifiers` header: tokens of the identifiers a blocked pattern
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
    #[error("event {index} carries an identifier of an erased person: refused (suppressed)")]
    Erased { index: usize },
    #[error("the key store failed")]
    Keys(#[from] KeyStoreError),
    #[error("the identifier vault failed")]
    Vault(#[from] VaultError),
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
    vault: Arc<Vault>,
    topics: Topics,
    blocked: BlockPatterns,
}

/// Why the publisher refused a draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It carries an identifier of an erased person (suppressed), or names an erased
    /// subject.
    Erased,
}

/// Drafts prepared: the records to produce, and the drafts refused, by position.
#[derive(Debug, Default)]
pub struct Preparation {
    pub prepared: Vec<Prepared>,
    pub refused: Vec<(usize, Refusal)>,
}

/// A draft with its identifiers normalized, before tokenizing.
struct Staged<E> {
    event: E,
    identifiers: Vec<Normalized>,
    references: Vec<Normalized>,
    blocked: Vec<usize>,
}

impl Publisher {
    pub fn new(
        producer: Arc<Producer>,
        keys: Arc<KeyStore>,
        vault: Arc<Vault>,
        topics: Topics,
    ) -> Self {
        Self {
            producer,
            keys,
            vault,
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
        self.vault.hasher()
    }

    /// Normalizes, tokenizes, seals, keys and encodes drafts; a draft carrying an erased
    /// person's identifier fails the whole batch ([`PublishError::Erased`]). Nothing is
    /// produced.
    pub async fn prepare<E: Publishable>(
        &self,
        drafts: Vec<Draft<E>>,
    ) -> Result<Vec<Prepared>, PublishError> {
        let p = self.prepare_each(drafts).await?;
        match p.refused.first() {
            Some((index, Refusal::Erased)) => Err(PublishError::Erased { index: *index }),
            None => Ok(p.prepared),
        }
    }

    /// Like [`Self::prepare`], refusing drafts one by one: those carrying an erased person's
    /// identifier are left out and named in [`Preparation::refused`].
    pub async fn prepare_each<E: Publishable>(
        &self,
        drafts: Vec<Draft<E>>,
    ) -> Result<Preparation, PublishError> {
        let hasher = self.vault.hasher();
        let mut staged = Vec::with_capacity(drafts.len());
        for (index, d) in drafts.into_iter().enumerate() {
            let normalize = |raw: &RawIdentifier| {
                hasher
                    .identifier(raw)
                    .map_err(|source| PublishError::Identifier {
                        index,
                        kind: raw.kind,
                        source,
                    })
            };
            let mut identifiers: Vec<Normalized> = Vec::with_capacity(d.identifiers.len());
            let mut blocked = Vec::new();
            for raw in &d.identifiers {
                let n = normalize(raw)?;
                if !identifiers.contains(&n) {
                    if self.blocked.blocks(n.kind, &n.value) {
                        blocked.push(identifiers.len());
                    }
                    identifiers.push(n);
                }
            }
            if identifiers.is_empty() {
                return Err(PublishError::NoIdentifier { index });
            }
            let references = d
                .references
                .iter()
                .map(normalize)
                .collect::<Result<Vec<_>, _>>()?;
            staged.push(Staged {
                event: d.event,
                identifiers,
                references,
                blocked,
            });
        }
        let all: Vec<Normalized> = staged
            .iter()
            .flat_map(|s| s.identifiers.iter().chain(&s.references).cloned())
            .collect();
        let mut tokens = self
            .vault
            .tokens_unless_suppressed(&all)
            .await?
            .into_iter()
            .zip(&all)
            .map(|(t, n)| t.map(|token| n.with_token(token)));
        let mut bound = Vec::with_capacity(staged.len());
        let mut refused = Vec::new();
        for (index, s) in staged.into_iter().enumerate() {
            // Each draft takes exactly its own tokens, refused or not.
            let ids: Vec<Option<Identifier>> = tokens.by_ref().take(s.identifiers.len()).collect();
            let references: Vec<Option<Identifier>> =
                tokens.by_ref().take(s.references.len()).collect();
            let ids: Option<Vec<Identifier>> = ids.into_iter().collect();
            let references: Option<Vec<Identifier>> = references.into_iter().collect();
            let (Some(ids), Some(references)) = (ids, references) else {
                refused.push((index, Refusal::Erased));
                continue;
            };
            let subject = subject_id(&ids).ok_or(VaultError::Race)?;
            let blocked: Vec<&str> = s.blocked.iter().map(|i| ids[*i].token.as_str()).collect();
            let blocked = (!blocked.is_empty()).then(|| blocked.join(","));
            bound.push((index, subject, ids, references, s.event, blocked));
        }
        let subjects: Vec<&str> = bound.iter().map(|(_, s, ..)| s.as_str()).collect();
        let keys = self.keys.current_keys(&subjects).await?;
        let topic = self.topics.name(E::TOPIC);
        let mut out = Vec::with_capacity(bound.len());
        for (index, subject, ids, references, mut event, blocked) in bound {
            // The key store gives an erased subject no key (a token cached before the
            // erasure reached this process).
            let Some(key) = keys.get(&subject) else {
                refused.push((index, Refusal::Erased));
                continue;
            };
            for (field, slot) in event.pii_mut() {
                if let Some(plaintext) = slot.take() {
                    *slot = Some(key.seal(
                        self.keys.rng(),
                        &field_aad(&subject, field),
                        plaintext.as_bytes(),
                    )?);
                }
            }
            event.bind(&subject, references);
            event.envelope_mut().subject = Subject {
                subject_id: subject,
                identifiers: ids,
            };
            event.envelope_mut().partition_key = event.partition_key();
            let value = cdp_schemas::encode(&event)?;
            out.push(Prepared {
                draft: index,
                topic: topic.clone(),
                key: event.partition_key(),
                value,
                event_id: event.envelope().event_id,
                event_type: event.event_type(),
                blocked,
            });
        }
        refused.sort_unstable_by_key(|(i, _)| *i);
        Ok(Preparation {
            prepared: out,
            refused,
        })
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
