//! The projector's domain logic: decode, open PII, resolve profiles through merges, fold
//! the batch into rows, apply. Runs inside the runner's transaction (effectively-once).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use cdp_keystore::crypto::{field_aad, sealed_version};
use cdp_keystore::{DataKey, KeyStore};
use cdp_runtime::outbox;
use cdp_runtime::pg::{classify, Decoded, PgHandler, Rejected};
use cdp_runtime::sink::{Rejection, SinkError};
use cdp_runtime::RawRecord;
use cdp_schemas::model::capsule::CapsulePayload;
use cdp_schemas::model::compliance::ErasureScoped;
use cdp_schemas::{
    profile_id_of, CapsuleEvent, CodecError, ComplianceEvent, CompliancePayload, CustomerEvent,
    CustomerPayload, IdentityEvent, IdentityPayload, Sealed,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::claims::Claims;
use crate::erase;
use crate::rows::*;
use crate::store;

/// A decoded record of one of the projected topics.
#[derive(Debug, Clone)]
pub enum Projected {
    Customer(CustomerEvent),
    Capsule(CapsuleEvent),
    Identity(IdentityEvent),
    /// A tombstone on the identity topic (compaction marker): nothing to do.
    Tombstone,
    /// A person to erase (the erasure processor scoped and shredded them).
    Erasure(ErasureScoped),
    /// A compliance event that is not the projector's to act on.
    Ignored,
}

/// Which topic carries what.
#[derive(Debug, Clone)]
pub struct TopicNames {
    pub customer: String,
    pub capsule: String,
    pub identity: String,
    pub compliance: String,
}

pub struct ProjectorHandler {
    topics: TopicNames,
    keys: Arc<KeyStore>,
    claims: Claims,
    /// The generation it projects into.
    role: erase::Role,
}

impl ProjectorHandler {
    /// A handler for one projector run (one generation).
    pub fn new(topics: TopicNames, keys: Arc<KeyStore>, role: erase::Role) -> Self {
        Self {
            topics,
            keys,
            claims: Claims::default(),
            role,
        }
    }
}

fn rejection(e: CodecError) -> Rejection {
    Rejection::from_error(e.kind(), &e)
}

#[derive(Debug, thiserror::Error)]
#[error("sealed field {field} of event {event_id} does not open with its subject's key")]
struct Unopenable {
    field: &'static str,
    event_id: Uuid,
}

/// Opens the PII of events. A destroyed key (erased subject) opens to nothing: the rule is
/// that such an event writes no PII at all, only its non-personal facts.
struct Opener<'k> {
    keys: HashMap<(&'k str, u32), Option<&'k DataKey>>,
}

enum Opened {
    Value(String),
    Erased,
}

impl<'k> Opener<'k> {
    fn new(keys: &'k HashMap<(String, u32), Option<Arc<DataKey>>>) -> Self {
        let keys = keys
            .iter()
            .map(|((s, v), k)| ((s.as_str(), *v), k.as_deref()))
            .collect();
        Self { keys }
    }

    fn open(
        &self,
        subject: &str,
        field: &'static str,
        sealed: &Sealed,
        event_id: Uuid,
    ) -> Result<Opened, Unopenable> {
        let version = sealed_version(sealed).map_err(|_| Unopenable { field, event_id })?;
        match self.keys.get(&(subject, version)) {
            Some(Some(key)) => key
                .open(&field_aad(subject, field), sealed)
                .map(|p| {
                    Opened::Value(
                        String::from_utf8(p)
                            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                    )
                })
                .map_err(|_| Unopenable { field, event_id }),
            _ => Ok(Opened::Erased),
        }
    }

    /// The plaintext of an optional sealed field; `None` when absent or erased.
    fn text(
        &self,
        subject: &str,
        field: &'static str,
        sealed: &Option<Sealed>,
        event_id: Uuid,
    ) -> Result<Option<String>, Unopenable> {
        match sealed {
            None => Ok(None),
            Some(s) => match self.open(subject, field, s, event_id)? {
                Opened::Value(v) => Ok(Some(v)),
                Opened::Erased => Ok(None),
            },
        }
    }
}

/// Properties as a JSON document: the text itself when it is JSON, else a JSON string of it.
fn json_text(text: Option<String>) -> Option<String> {
    text.map(|t| {
        if serde_json::from_str::<serde::de::IgnoredAny>(&t).is_ok() {
            t
        } else {
            serde_json::Value::String(t).to_string()
        }
    })
}

/// Properties as a JSON object to add fields to (a non-object document starts empty).
fn json_object(text: Option<String>) -> serde_json::Map<String, serde_json::Value> {
    text.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| match v {
            serde_json::Value::Object(o) => Some(o),
            _ => None,
        })
        .unwrap_or_default()
}

/// Who an event is about: its subject's own profile and the profile it belongs to now.
#[derive(Clone, Copy)]
struct Owner {
    /// The subject's own profile id (rows record it as their origin).
    origin: Uuid,
    /// Where merges have put it.
    profile: Uuid,
}

impl ProjectorHandler {
    fn fold_customer<'a>(
        &self,
        e: &'a CustomerEvent,
        owner: Owner,
        opener: &Opener<'_>,
        rows: &mut Rows<'a>,
    ) -> Result<(), Unopenable> {
        let env = &e.envelope;
        let subject = env.subject.subject_id.as_str();
        let stamp: Stamp = (env.occurred_at, env.event_id);
        let id = env.event_id;
        let Owner { origin, profile } = owner;
        rows.seen(profile, stamp, &env.source);
        // The event's own subject identifier is the subject's profile's by construction. Its
        // other identifiers (and an alias's previous one) belong to a profile only when the
        // identity service links them (`IdentifiersLinked`): its rules may refuse a link
        // (unique kinds, limits, blocked values, time-to-live, operator splits), and the read
        // model must not link what identity keeps apart.
        for i in env
            .subject
            .identifiers
            .iter()
            .filter(|i| i.token == env.subject.subject_id)
        {
            rows.identity(
                (
                    i.kind.as_str(),
                    i.namespace.as_deref().unwrap_or(""),
                    &i.token,
                ),
                profile,
                origin,
                env.occurred_at,
            );
        }
        let interaction =
            |t: &'a str, channel, touchpoint, duration_ms, outcome, properties| InteractionRow {
                event_id: id,
                profile_id: profile,
                origin,
                occurred_at: env.occurred_at,
                interaction_type: t,
                channel,
                touchpoint,
                duration_ms,
                outcome,
                properties,
                source: &env.source,
            };
        match &e.payload {
            CustomerPayload::Identify(t) => {
                for (field, s) in e.payload.pii() {
                    let Some(s) = s.as_ref() else { continue };
                    if let Opened::Value(v) = opener.open(subject, field, s, id)? {
                        rows.trait_value(
                            profile,
                            field,
                            TraitRow {
                                value: Some(v),
                                sealed: Some(s.as_bytes()),
                                subject_id: subject,
                                stamp,
                            },
                        );
                    }
                }
                if let Some(c) = &t.country {
                    rows.trait_value(
                        profile,
                        "country",
                        TraitRow {
                            value: Some(c.clone()),
                            sealed: None,
                            subject_id: subject,
                            stamp,
                        },
                    );
                }
            }
            CustomerPayload::Track(t) => {
                let props = json_text(opener.text(subject, "properties", &t.properties, id)?);
                let row = interaction(
                    &t.interaction_type,
                    t.channel.as_deref(),
                    t.touchpoint.as_deref(),
                    t.duration_ms,
                    t.outcome.as_deref(),
                    props,
                );
                rows.interactions.insert(id, row);
            }
            CustomerPayload::PageViewed(p) => {
                let mut props =
                    json_object(opener.text(subject, "properties", &p.properties, id)?);
                for (field, v) in [
                    ("url", &p.url),
                    ("referrer", &p.referrer),
                    ("title", &p.title),
                ] {
                    if let Some(text) = opener.text(subject, field, v, id)? {
                        props.insert(field.to_owned(), serde_json::Value::String(text));
                    }
                }
                if let Some(c) = &p.category {
                    props.insert("category".to_owned(), serde_json::Value::String(c.clone()));
                }
                let row = interaction(
                    "Page Viewed",
                    Some("web"),
                    p.name.as_deref(),
                    None,
                    None,
                    Some(serde_json::Value::Object(props).to_string()),
                );
                rows.interactions.insert(id, row);
            }
            CustomerPayload::ScreenViewed(s) => {
                let mut props =
                    json_object(opener.text(subject, "properties", &s.properties, id)?);
                if let Some(c) = &s.category {
                    props.insert("category".to_owned(), serde_json::Value::String(c.clone()));
                }
                let row = interaction(
                    "Screen Viewed",
                    Some("mobile"),
                    s.name.as_deref(),
                    None,
                    None,
                    Some(serde_json::Value::Object(props).to_string()),
                );
                rows.interactions.insert(id, row);
            }
            CustomerPayload::Transaction(t) => {
                let order_id = opener
                    .text(subject, "order_id", &t.order_id, id)?
                    .unwrap_or_default();
                // The sealed lines as they are, when they are a JSON array.
                let items = opener
                    .text(subject, "line_items", &t.line_items, id)?
                    .filter(|j| {
                        serde_json::from_str::<serde_json::Value>(j).is_ok_and(|v| v.is_array())
                    })
                    .unwrap_or_else(|| "[]".to_owned());
                let coupon = opener.text(subject, "coupon", &t.coupon, id)?;
                rows.transactions.insert(
                    id,
                    TransactionRow {
                        event_id: id,
                        profile_id: profile,
                        origin,
                        occurred_at: env.occurred_at,
                        order_id,
                        status: t.status.as_str(),
                        amount: t.amount.to_string(),
                        currency: &t.currency,
                        items,
                        payment_method: t.payment_method.as_deref(),
                        coupon,
                        source: &env.source,
                    },
                );
            }
            CustomerPayload::ConsentChanged(c) => rows.consent(
                profile,
                &c.purpose,
                ConsentRow {
                    status: c.status.as_str(),
                    basis: c.basis.as_str(),
                    policy_version: c.policy_version.as_deref(),
                    stamp,
                },
            ),
            // What an alias links is identity's decision (see above).
            CustomerPayload::Alias(_) => {}
        }
        Ok(())
    }

    /// A link identity accepted: both identifiers belong to the link's profile (as merges
    /// have moved it since), claimed at the time of the event that carried them.
    fn fold_link<'a>(e: &'a IdentityEvent, profile: Uuid, rows: &mut Rows<'a>) {
        let IdentityPayload::IdentifiersLinked(l) = &e.payload else {
            return;
        };
        // Its snapshot on the profiles topic lists identifiers.
        rows.touched.insert(profile);
        for i in [&l.from, &l.to] {
            rows.identity(
                (
                    i.kind.as_str(),
                    i.namespace.as_deref().unwrap_or(""),
                    &i.token,
                ),
                profile,
                l.profile_id,
                e.envelope.occurred_at,
            );
        }
    }

    fn fold_capsule<'a>(
        &self,
        e: &'a CapsuleEvent,
        owner: Owner,
        opener: &Opener<'_>,
        rows: &mut Rows<'a>,
    ) -> Result<(), Unopenable> {
        let env = &e.envelope;
        let stamp: Stamp = (env.occurred_at, env.event_id);
        let Owner { origin, profile } = owner;
        rows.seen(profile, stamp, &env.source);
        match &e.payload {
            CapsulePayload::Created(c) => {
                let subject = &env.subject.subject_id;
                // The sealed settings as they are, when they are a JSON object.
                let settings = opener
                    .text(subject, "settings_json", &c.settings_json, env.event_id)?
                    .filter(|j| {
                        serde_json::from_str::<serde_json::Value>(j).is_ok_and(|v| v.is_object())
                    })
                    .unwrap_or_else(|| "{}".to_owned());
                let row = CapsuleCreatedRow {
                    owner_profile_id: profile,
                    title: opener.text(subject, "title", &c.title, env.event_id)?,
                    content_type: &c.content_type,
                    storage_path: opener.text(
                        subject,
                        "storage_path",
                        &c.storage_path,
                        env.event_id,
                    )?,
                    settings,
                    stamp,
                };
                rows.created(c.capsule_id, row)
            }
            CapsulePayload::ContentAdded(c) => {
                let subject = &env.subject.subject_id;
                let body = opener.text(subject, "body", &c.body, env.event_id)?;
                let row = CapsuleContentRow {
                    content_id: c.content_id,
                    capsule_id: c.capsule_id,
                    content_type: &c.content_type,
                    storage_path: opener.text(
                        subject,
                        "storage_path",
                        &c.storage_path,
                        env.event_id,
                    )?,
                    size_bytes: c.size_bytes,
                    body,
                    stamp,
                };
                match rows.contents.get(&c.content_id) {
                    Some(old) if old.stamp >= stamp => {}
                    _ => {
                        rows.contents.insert(c.content_id, row);
                    }
                }
            }
            CapsulePayload::Published(p) => {
                rows.published(p.capsule_id, p.visibility.as_str(), stamp)
            }
            CapsulePayload::Viewed(v) => {
                rows.views.insert(
                    env.event_id,
                    CapsuleViewRow {
                        event_id: env.event_id,
                        capsule_id: v.capsule_id,
                        profile_id: profile,
                        origin,
                        occurred_at: env.occurred_at,
                        channel: v.channel.as_deref(),
                        duration_ms: v.duration_ms,
                    },
                );
            }
            CapsulePayload::Deleted(d) => {
                let reason =
                    opener.text(&env.subject.subject_id, "reason", &d.reason, env.event_id)?;
                rows.deleted(d.capsule_id, reason, stamp)
            }
        }
        Ok(())
    }
}

/// The profile a record is about before merges: its subject's own profile for customer and
/// capsule events, the linked profile for a link (none for a link of identifiers no event was
/// about, whose profile identity leaves nil).
fn origin_of(event: &Projected) -> Option<Uuid> {
    match event {
        Projected::Customer(e) => Some(profile_id_of(&e.envelope.subject.subject_id)),
        Projected::Capsule(e) => Some(profile_id_of(&e.envelope.subject.subject_id)),
        Projected::Identity(e) => match &e.payload {
            IdentityPayload::IdentifiersLinked(l) if !l.profile_id.is_nil() => Some(l.profile_id),
            _ => None,
        },
        Projected::Tombstone | Projected::Erasure(_) | Projected::Ignored => None,
    }
}

/// Every (subject, key version) whose key the batch needs.
fn wanted_keys(batch: &[Decoded<'_, Projected>]) -> Vec<(String, u32)> {
    let mut out = HashSet::new();
    for d in batch {
        let (subject, sealed) = match d.event {
            Projected::Customer(e) => (&e.envelope.subject.subject_id, e.payload.pii()),
            Projected::Capsule(e) => (&e.envelope.subject.subject_id, e.payload.pii()),
            Projected::Identity(_)
            | Projected::Tombstone
            | Projected::Erasure(_)
            | Projected::Ignored => continue,
        };
        for s in sealed.into_iter().filter_map(|(_, s)| s.as_ref()) {
            if let Ok(v) = sealed_version(s) {
                out.insert((subject.as_str(), v));
            }
        }
    }
    out.into_iter().map(|(s, v)| (s.to_owned(), v)).collect()
}

/// The records that name a token or a profile of an erased person (the erasure ledger): they have no
/// effect, so a replay, a rebuild or a restore never re-creates the person.
async fn erased_records(
    tx: &mut PgConnection,
    batch: &[Decoded<'_, Projected>],
) -> Result<BTreeSet<usize>, SinkError> {
    let per: Vec<Vec<&str>> = batch
        .iter()
        .map(|d| match d.event {
            Projected::Customer(e) => e.tokens().collect(),
            Projected::Capsule(e) => e.tokens().collect(),
            Projected::Identity(e) => e.tokens().collect(),
            Projected::Tombstone | Projected::Erasure(_) | Projected::Ignored => Vec::new(),
        })
        .collect();
    let mut all: Vec<&str> = per.iter().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    let erased = cdp_keystore::erasure::erased(tx, &all)
        .await
        .map_err(classify)?;
    // Merges and splits name profiles, not identifiers.
    let reshaped: Vec<Vec<Uuid>> = batch
        .iter()
        .map(|d| match d.event {
            Projected::Identity(e) => match &e.payload {
                IdentityPayload::ProfilesMerged(m) => {
                    vec![m.loser_profile_id, m.winner_profile_id]
                }
                IdentityPayload::ProfileSplit(s) => {
                    let mut p = vec![s.from_profile_id, s.to_profile_id];
                    p.extend(&s.moved_profile_ids);
                    p
                }
                IdentityPayload::IdentifiersLinked(_) => Vec::new(),
            },
            _ => Vec::new(),
        })
        .collect();
    let mut profiles: Vec<Uuid> = reshaped.iter().flatten().copied().collect();
    profiles.sort_unstable();
    profiles.dedup();
    let erased_profiles = cdp_keystore::erasure::erased_profiles(tx, &profiles)
        .await
        .map_err(classify)?;
    Ok(per
        .iter()
        .zip(&reshaped)
        .enumerate()
        .filter(|(_, (tokens, profiles))| {
            tokens.iter().any(|t| erased.contains(*t))
                || profiles.iter().any(|p| erased_profiles.contains(p))
        })
        .map(|(i, _)| i)
        .collect())
}

impl PgHandler for ProjectorHandler {
    type Event = Projected;

    fn decode(&self, record: &RawRecord) -> Result<Projected, Rejection> {
        let Some(value) = record.value.as_deref() else {
            if *record.topic == *self.topics.identity {
                return Ok(Projected::Tombstone);
            }
            return Err(rejection(CodecError::Empty));
        };
        if *record.topic == *self.topics.customer {
            cdp_schemas::decode(value)
                .map(Projected::Customer)
                .map_err(rejection)
        } else if *record.topic == *self.topics.capsule {
            cdp_schemas::decode(value)
                .map(Projected::Capsule)
                .map_err(rejection)
        } else if *record.topic == *self.topics.identity {
            cdp_schemas::decode(value)
                .map(Projected::Identity)
                .map_err(rejection)
        } else if *record.topic == *self.topics.compliance {
            cdp_schemas::decode::<ComplianceEvent>(value)
                .map(|e| match e.payload {
                    CompliancePayload::ErasureScoped(s) => Projected::Erasure(s),
                    _ => Projected::Ignored,
                })
                .map_err(rejection)
        } else {
            Err(Rejection::new(
                "unknown_topic",
                format!("the projector does not read {}", record.topic),
            ))
        }
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        batch: &[Decoded<'_, Projected>],
    ) -> Result<Vec<Rejected>, SinkError> {
        let t0 = std::time::Instant::now();
        // Merges, splits and erasures hold the merge lock exclusively.
        let reshapes = batch.iter().any(|d| match d.event {
            Projected::Identity(e) => !matches!(e.payload, IdentityPayload::IdentifiersLinked(_)),
            Projected::Erasure(_) => true,
            _ => false,
        });
        store::hold_merges(tx, reshapes).await.map_err(classify)?;
        let erased = erased_records(tx, batch).await?;
        // Merges and splits first, in log order: everything written below already follows them.
        // Those of an erased person are skipped like their events.
        for (i, d) in batch.iter().enumerate() {
            if erased.contains(&i) {
                continue;
            }
            if let Projected::Identity(e) = d.event {
                match &e.payload {
                    IdentityPayload::ProfilesMerged(m) => {
                        store::merge(
                            tx,
                            m.loser_profile_id,
                            m.winner_profile_id,
                            m.link_id,
                            m.cause_event_id,
                        )
                        .await
                        .map_err(classify)?;
                    }
                    IdentityPayload::ProfileSplit(s) => {
                        store::split(
                            tx,
                            s.from_profile_id,
                            s.to_profile_id,
                            &s.moved_profile_ids,
                            s.cause_event_id,
                        )
                        .await
                        .map_err(classify)?;
                    }
                    IdentityPayload::IdentifiersLinked(_) => {}
                }
            }
        }
        let keys = self
            .keys
            .keys(&wanted_keys(batch))
            .await
            .map_err(|e| SinkError::Retryable(Box::new(e)))?;
        let t1 = std::time::Instant::now();
        let opener = Opener::new(&keys);
        // Each record's profile before merges, hashed once.
        let origins: Vec<Option<Uuid>> = batch.iter().map(|d| origin_of(d.event)).collect();
        let base: Vec<Uuid> = origins
            .iter()
            .flatten()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let merged = store::resolve(tx, &base).await.map_err(classify)?;
        let owner = |index: usize| {
            let origin = origins[index].unwrap_or_default();
            Owner {
                origin,
                profile: merged.get(&origin).copied().unwrap_or(origin),
            }
        };
        let fold = |skip: &BTreeSet<usize>| {
            let mut rows = Rows::default();
            let mut failed = Vec::new();
            for (index, d) in batch.iter().enumerate() {
                if skip.contains(&index) {
                    continue;
                }
                let result = match d.event {
                    Projected::Customer(e) => {
                        self.fold_customer(e, owner(index), &opener, &mut rows)
                    }
                    Projected::Capsule(e) => self.fold_capsule(e, owner(index), &opener, &mut rows),
                    Projected::Identity(e) => {
                        if origins[index].is_some() {
                            Self::fold_link(e, owner(index).profile, &mut rows);
                        }
                        Ok(())
                    }
                    Projected::Tombstone | Projected::Erasure(_) | Projected::Ignored => Ok(()),
                };
                if let Err(e) = result {
                    failed.push(Rejected {
                        index,
                        rejection: Rejection::from_error("unopenable_pii", &e),
                    });
                }
            }
            (rows, failed)
        };
        let t2 = std::time::Instant::now();
        let (mut rows, rejected) = fold(&erased);
        if !rejected.is_empty() {
            // Fold again without the rejected records, so they have no effect at all.
            let mut skip = erased.clone();
            skip.extend(rejected.iter().map(|r| r.index));
            rows = fold(&skip).0;
        }
        let settled = self.claims.skip_settled(&mut rows.identities);
        let t3 = std::time::Instant::now();
        store::apply(tx, &rows).await.map_err(classify)?;
        self.claims.record(&rows.identities);
        // Erasures last: whatever this batch wrote for the person goes too.
        let mut removals = Vec::new();
        for d in batch {
            if let Projected::Erasure(scoped) = d.event {
                let live = erase::is_live(tx, &self.role).await.map_err(classify)?;
                let removed = erase::erase(tx, &self.role, live, scoped)
                    .await
                    .map_err(classify)?;
                self.claims.forget(&scoped.tokens);
                tracing::info!(
                    request_id = %scoped.request_id,
                    live,
                    rows = removed.rows(),
                    tombstones = removed.tombstones,
                    "erasure applied to the read models"
                );
                removals.push((scoped, live, removed));
            }
        }
        if !removals.is_empty() {
            // The answers wait for every tombstone this transaction queued.
            let gate = outbox::gate_position(tx, erase::OUTBOX)
                .await
                .map_err(classify)?;
            let answers = removals
                .iter()
                .map(|(scoped, live, removed)| {
                    erase::applied(
                        &self.topics.compliance,
                        &self.role,
                        *live,
                        gate,
                        scoped,
                        removed,
                    )
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SinkError::Fatal(Box::new(e)))?;
            outbox::push(tx, erase::OUTBOX, &answers)
                .await
                .map_err(classify)?;
        }
        tracing::debug!(
            events = batch.len(),
            erased = erased.len(),
            profiles = rows.customers.len(),
            identifiers_settled = settled,
            merges_and_keys_ms = (t1 - t0).as_millis() as u64,
            resolve_ms = (t2 - t1).as_millis() as u64,
            fold_ms = (t3 - t2).as_millis() as u64,
            write_ms = t3.elapsed().as_millis() as u64,
            "batch folded and written"
        );
        Ok(rejected)
    }
}
