//! The identity service's domain logic: customer events in, the graph updated, and the
//! identity topic and the resolved-events stream written to the outbox, all in the batch's
//! transaction (with the consumer offsets).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use cdp_runtime::outbox::{self, Outbox, Record};
use cdp_runtime::pg::{classify, Decoded, PgHandler, Rejected};
use cdp_runtime::sink::{Rejection, SinkError};
use cdp_runtime::RawRecord;
use cdp_schemas::model::compliance::ErasureScoped;
use cdp_schemas::model::identity::{IdentifiersLinked, ProfileSplit, ProfilesMerged};
use cdp_schemas::{
    ComplianceEvent, CompliancePayload, CustomerEvent, CustomerPayload, Envelope, Identifier,
    IdentifierKind, IdentityEvent, IdentityPayload, Subject,
};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::cache::GraphCache;
use crate::erase;
use crate::graph::{Key, Kind, Observation, Rules};
use crate::metrics::IdentityMetrics;
use crate::resolve::{resolve, Outcome, ProfileChange};
use crate::store::{lock_graph, PgGraph};

/// The identity service's outbox tables.
pub const OUTBOX: Outbox = Outbox {
    records: "identity_outbox",
    state: "identity_outbox_relay",
    gate: None,
};

/// The header of the resolved stream naming the event's profile.
pub const PROFILE_HEADER: &str = "cdp-profile-id";

/// Namespace of the identity events' ids (UUIDv5 of what they say, so a batch retried after
/// a crash writes the same events).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x7c1e_55a0_2b1d_4f8e_8a3c_9d4e_0f11_0011);

#[derive(Clone, Debug)]
pub struct OutTopics {
    pub identity: String,
    pub resolved: String,
    /// Read for erasures, written with the answers to them.
    pub compliance: String,
}

pub struct IdentityHandler {
    pub rules: Arc<Rules>,
    pub kinds: BTreeSet<IdentifierKind>,
    pub out: OutTopics,
    pub metrics: IdentityMetrics,
    /// The graph as this process last wrote it (see crate::cache).
    pub cache: GraphCache,
}

/// A customer event, a tombstone (they carry no identifiers), or from the compliance
/// topic a person to erase or an event that is not identity's to act on.
pub enum Input {
    Event(Box<CustomerEvent>),
    Tombstone,
    Erasure(ErasureScoped),
    Ignored,
}

/// What identity resolution reads of an event: the subject's identifiers, and an alias's
/// previous identifier (an alias says both are the same person).
pub fn observation(e: &CustomerEvent, kinds: &BTreeSet<IdentifierKind>) -> Observation {
    let previous = match &e.payload {
        CustomerPayload::Alias(a) => Some(&a.previous),
        _ => None,
    };
    let keys = e
        .envelope
        .subject
        .identifiers
        .iter()
        .chain(previous)
        .filter(|i| kinds.contains(&i.kind))
        .map(|i| Key::new(Kind::Id(i.kind), i.namespace.as_deref(), &i.token))
        .collect();
    Observation::new(
        e.envelope.event_id,
        e.envelope.occurred_at.timestamp_micros(),
        &e.envelope.subject.subject_id,
        keys,
    )
}

/// The tokens ingest named in the record's `cdp-blocked-identifiers` header (a blocked
/// pattern matched their plaintext).
pub fn blocked_tokens(record: &RawRecord) -> Vec<&str> {
    record
        .headers
        .iter()
        .filter(|(k, _)| *k == cdp_keystore::identifiers::BLOCKED_HEADER)
        .filter_map(|(_, v)| v)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(',').map(str::trim).filter(|h| !h.is_empty()))
        .collect()
}

fn identifier(k: &Key) -> Identifier {
    let kind = match k.kind {
        Kind::Id(k) => k,
        // A bare subject id is reported as the user id it stands for.
        Kind::Subject => IdentifierKind::UserId,
    };
    Identifier {
        kind,
        namespace: (!k.namespace.is_empty()).then(|| k.namespace.clone()),
        token: k.token.clone(),
    }
}

fn identity_event(
    payload: IdentityPayload,
    key: Uuid,
    name: &str,
    occurred_at: DateTime<Utc>,
) -> IdentityEvent {
    IdentityEvent {
        envelope: Envelope {
            event_id: Uuid::new_v5(&EVENT_NAMESPACE, name.as_bytes()),
            occurred_at,
            received_at: Utc::now(),
            source: "identity".to_owned(),
            subject: Subject {
                subject_id: key.to_string(),
                identifiers: Vec::new(),
            },
            partition_key: key.to_string(),
        },
        payload,
    }
}

fn record(topic: &str, e: &IdentityEvent) -> Result<Record, SinkError> {
    let value = cdp_schemas::encode(e).map_err(|x| SinkError::Fatal(Box::new(x)))?;
    Ok(Record::keyed(topic, &e.envelope.partition_key, value))
}

/// The identity topic's records for an outcome: new links, merges and splits.
pub fn identity_records(
    topic: &str,
    outcome: &Outcome,
    new_links: &HashSet<Uuid>,
    at: &dyn Fn(&Uuid) -> DateTime<Utc>,
    split_reason: &str,
    metrics: &IdentityMetrics,
) -> Result<Vec<Record>, SinkError> {
    let mut out: Vec<Record> = Vec::new();
    let mut announced = HashSet::new();
    for l in outcome
        .rederived
        .iter()
        .flat_map(|r| r.applied.links.iter())
        .chain(outcome.applied.links.iter())
        .filter(|l| new_links.contains(&l.link_id) && announced.insert(l.link_id))
    {
        let profile = outcome.graph.profile_of(&l.from).unwrap_or_default();
        let e = identity_event(
            IdentityPayload::IdentifiersLinked(IdentifiersLinked {
                link_id: l.link_id,
                profile_id: profile,
                from: identifier(&l.from),
                to: identifier(&l.to),
                cause_event_id: l.cause,
            }),
            // Keyed by the link, not the profile: the topic is compacted, and every link must
            // survive compaction for a rebuilt projection to know which identifiers it joined.
            l.link_id,
            &format!("linked:{}", l.link_id),
            at(&l.cause),
        );
        out.push(record(topic, &e)?);
    }
    for c in &outcome.changes {
        let e = match c {
            ProfileChange::Merged {
                winner,
                loser,
                link_id,
                cause,
            } => {
                metrics.merges.inc();
                identity_event(
                    IdentityPayload::ProfilesMerged(ProfilesMerged {
                        winner_profile_id: *winner,
                        loser_profile_id: *loser,
                        link_id: *link_id,
                        cause_event_id: *cause,
                    }),
                    *loser,
                    &format!("merged:{winner}:{loser}:{cause}"),
                    at(cause),
                )
            }
            ProfileChange::Split {
                from,
                to,
                moved,
                cause,
            } => {
                metrics.splits.inc();
                identity_event(
                    IdentityPayload::ProfileSplit(ProfileSplit {
                        from_profile_id: *from,
                        to_profile_id: *to,
                        moved_profile_ids: moved.clone(),
                        reason: split_reason.to_owned(),
                        cause_event_id: *cause,
                    }),
                    *to,
                    &format!("split:{from}:{to}:{cause}"),
                    at(cause),
                )
            }
        };
        out.push(record(topic, &e)?);
    }
    Ok(out)
}

impl PgHandler for IdentityHandler {
    type Event = Input;

    fn decode(&self, record: &RawRecord) -> Result<Input, Rejection> {
        let Some(value) = record.value.as_deref() else {
            return Ok(Input::Tombstone);
        };
        if *record.topic == *self.out.compliance {
            return cdp_schemas::decode::<ComplianceEvent>(value)
                .map(|e| match e.payload {
                    CompliancePayload::ErasureScoped(s) => Input::Erasure(s),
                    _ => Input::Ignored,
                })
                .map_err(|e| Rejection::from_error("undecodable", &e));
        }
        cdp_schemas::decode::<CustomerEvent>(value)
            .map(|e| Input::Event(Box::new(e)))
            .map_err(|e| Rejection::from_error("undecodable", &e))
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        batch: &[Decoded<'_, Input>],
    ) -> Result<Vec<Rejected>, SinkError> {
        lock_graph(tx).await.map_err(classify)?;
        self.resolve_events(tx, batch).await?;
        // Erasures last: whatever this batch linked for the person goes too.
        for d in batch {
            if let Input::Erasure(scoped) = d.event {
                let removed = erase::erase(tx, scoped).await.map_err(classify)?;
                let records =
                    erase::records(&self.out.identity, &self.out.compliance, scoped, &removed)
                        .map_err(|e| SinkError::Fatal(Box::new(e)))?;
                outbox::push(tx, OUTBOX, &records).await.map_err(classify)?;
                tracing::info!(
                    request_id = %scoped.request_id,
                    rows = removed.rows(),
                    tombstones = removed.keys.len(),
                    "erasure applied to the identity graph"
                );
            }
        }
        Ok(Vec::new())
    }
}

impl IdentityHandler {
    /// Resolves the batch's customer events (holding the graph lock).
    async fn resolve_events(
        &self,
        tx: &mut PgConnection,
        batch: &[Decoded<'_, Input>],
    ) -> Result<(), SinkError> {
        let mut g = PgGraph::cached(tx, &self.cache).await.map_err(classify)?;
        // Event-level dedup: within the batch, then against everything resolved before.
        let mut firsts: Vec<(usize, &CustomerEvent)> = Vec::with_capacity(batch.len());
        let mut in_batch = HashSet::with_capacity(batch.len());
        for (i, d) in batch.iter().enumerate() {
            if let Input::Event(e) = d.event {
                if in_batch.insert(e.envelope.event_id) {
                    firsts.push((i, e));
                }
            }
        }
        let ids: Vec<Uuid> = firsts.iter().map(|(_, e)| e.envelope.event_id).collect();
        let known = g.known_events(&ids).await.map_err(classify)?;
        let unseen: Vec<(usize, &CustomerEvent)> = firsts
            .into_iter()
            .filter(|(_, e)| !known.contains(&e.envelope.event_id))
            .collect();
        let events = batch
            .iter()
            .filter(|d| matches!(d.event, Input::Event(_)))
            .count();
        self.metrics
            .duplicates
            .inc_by((events - unseen.len()) as u64);
        // Events of an erased person (a token in the erasure ledger) are not resolved, not
        // observed and not passed on: a replay never re-creates the person.
        let mut tokens: Vec<&str> = unseen.iter().flat_map(|(_, e)| e.tokens()).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let erased = cdp_keystore::erasure::erased(g.conn(), &tokens)
            .await
            .map_err(classify)?;
        let fresh: Vec<(usize, &CustomerEvent)> = unseen
            .into_iter()
            .filter(|(_, e)| !e.tokens().any(|t| erased.contains(t)))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let observations: Vec<Observation> = fresh
            .iter()
            .map(|(i, e)| observation(e, &self.kinds).block(&blocked_tokens(batch[*i].record)))
            .collect();
        let severed = g.severed().await.map_err(classify)?;
        let t0 = std::time::Instant::now();
        let outcome = resolve(&mut g, &self.rules, &severed, observations.clone(), &[])
            .await
            .map_err(classify)?;
        let t1 = std::time::Instant::now();
        let reads = g.reads;
        let stats = g.commit(&observations, &outcome).await.map_err(classify)?;
        let t2 = std::time::Instant::now();

        let when: HashMap<Uuid, DateTime<Utc>> = fresh
            .iter()
            .map(|(_, e)| (e.envelope.event_id, e.envelope.occurred_at))
            .collect();
        let at = |id: &Uuid| when.get(id).copied().unwrap_or_else(Utc::now);
        let new_links: HashSet<Uuid> = stats.new_links.iter().copied().collect();
        let mut out = identity_records(
            &self.out.identity,
            &outcome,
            &new_links,
            &at,
            "rederived",
            &self.metrics,
        )?;
        // The resolved stream: each new event once, in batch order, stamped with its profile.
        for ((i, _), o) in fresh.iter().zip(&observations) {
            let r = batch[*i].record;
            let profile = outcome
                .graph
                .profile_of(&o.subject)
                .unwrap_or_else(|| o.subject.profile_id())
                .to_string();
            let mut headers: Vec<(String, Vec<u8>)> = r
                .headers
                .iter()
                .filter(|(k, _)| *k != PROFILE_HEADER && *k != outbox::SEQ_HEADER)
                .map(|(k, v)| (k.to_owned(), v.unwrap_or_default().to_vec()))
                .collect();
            headers.push((PROFILE_HEADER.to_owned(), profile.clone().into_bytes()));
            out.push(Record {
                topic: self.out.resolved.clone(),
                key: Some(profile.into_bytes()),
                value: r.value.as_deref().map(<[u8]>::to_vec),
                headers,
                release: outbox::Release::InOrder,
            });
        }
        outbox::push(g.conn(), OUTBOX, &out)
            .await
            .map_err(classify)?;
        let refusals = outcome.applied.refusals.iter().chain(
            outcome
                .rederived
                .iter()
                .flat_map(|r| r.applied.refusals.iter()),
        );
        for r in refusals {
            self.metrics.refusal(r.reason.as_str());
        }
        self.metrics
            .rederived_events
            .inc_by(stats.rederived_events as u64);
        tracing::debug!(
            events = fresh.len(),
            nodes = stats.nodes_written,
            rederived_nodes = stats.rederived_nodes,
            rederived_events = stats.rederived_events,
            resolve_ms = (t1 - t0).as_millis() as u64,
            bound_ms = reads.bound.as_millis() as u64,
            components_ms = reads.components.as_millis() as u64,
            observations_ms = reads.observations.as_millis() as u64,
            component_rows = reads.component_rows,
            cached_rows = reads.cached_rows,
            observation_rows = reads.observation_rows,
            commit_ms = (t2 - t1).as_millis() as u64,
            outbox_ms = t2.elapsed().as_millis() as u64,
            "batch resolved"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alias_links_its_previous_identifier() {
        let id = |kind, h: &str| Identifier {
            kind,
            namespace: None,
            token: h.to_owned(),
        };
        let e = crate::candidates::merge_event(
            &id(IdentifierKind::UserId, "aa"),
            &id(IdentifierKind::AnonymousId, "bb"),
            (Uuid::nil(), Uuid::nil()),
            Utc::now(),
        );
        let all: BTreeSet<IdentifierKind> =
            [IdentifierKind::UserId, IdentifierKind::AnonymousId].into();
        let o = observation(&e, &all);
        assert_eq!(o.keys.len(), 2);
        assert_eq!(o.subject.token, "aa");
        let users: BTreeSet<IdentifierKind> = [IdentifierKind::UserId].into();
        assert_eq!(observation(&e, &users).keys.len(), 1);
    }
}
