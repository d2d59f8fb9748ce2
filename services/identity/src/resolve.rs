//! Resolving a batch of new observations against the stored graph, incrementally.
//!
//! The graph is defined as [`graph::derive`] over every observation: the result of applying
//! them all in canonical order. Storing the whole history and re-deriving on every batch would
//! be exact and slow, so a batch is applied in two ways:
//!
//! - **in order** (the common case): every new observation comes after everything already
//!   applied to the components it touches, so applying it to the loaded components gives
//!   exactly what re-deriving would;
//! - **late**: an observation earlier than something already applied to a component it
//!   touches. The components it reaches, closed over every stored observation touching
//!   them (and the components those reach), are forgotten and re-derived from their
//!   observations in canonical order; the rest of the batch is then applied in order.
//!
//! Either way the outcome equals [`graph::derive`] over all observations, whatever the arrival
//! order (the property test below checks this against random arrival orders and batches).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;

use uuid::Uuid;

use crate::graph::{Applied, Graph, Key, Observation, Rules, Severed};

/// A stored component: every member with what was seen of it.
pub type Members = Vec<(Key, Option<crate::graph::Seen>)>;

/// What resolution needs from storage.
pub trait Source: Send {
    type Error: Send;

    /// The stored components holding any of these keys, each as all its members with what
    /// was seen of them. Unknown keys are left out.
    fn components(
        &mut self,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<Members>, Self::Error>> + Send;

    /// Whether a link of any of these keys was ever refused for a count (unique or limit).
    fn bound(&mut self, keys: &[Key]) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// The position (time, cause event) of each of these stored links; unknown ones are left
    /// out.
    fn link_positions(
        &mut self,
        links: &[Uuid],
    ) -> impl Future<Output = Result<HashMap<Uuid, crate::graph::Position>, Self::Error>> + Send;

    /// Every stored observation carrying any of these keys that can link: those carrying two
    /// keys or more, and those carrying one of `singles` alone.
    fn observations(
        &mut self,
        keys: &[Key],
        singles: &[Key],
    ) -> impl Future<Output = Result<Vec<Observation>, Self::Error>> + Send;
}

/// A re-derivation: the nodes and observations it covered, and what it produced for them
/// (which replaces what was stored for them).
#[derive(Debug, Default)]
pub struct Rederived {
    pub keys: BTreeSet<Key>,
    pub events: BTreeSet<Uuid>,
    pub applied: Applied,
}

/// A change of profile the projector must follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileChange {
    /// Everything of `loser` now belongs to `winner`.
    Merged {
        winner: Uuid,
        loser: Uuid,
        link_id: Uuid,
        cause: Uuid,
    },
    /// The subjects `moved` (base profile ids) left `from` and now make up `to`.
    Split {
        from: Uuid,
        to: Uuid,
        moved: Vec<Uuid>,
        cause: Uuid,
    },
}

/// The result of resolving one batch.
#[derive(Debug)]
pub struct Outcome {
    pub graph: Graph,
    /// Produced by the in-order part.
    pub applied: Applied,
    pub rederived: Option<Rederived>,
    /// Profile changes of subjects, old to new.
    pub changes: Vec<ProfileChange>,
    /// Profile of each loaded key before the batch.
    pub before: HashMap<Key, Option<Uuid>>,
}

async fn load<S: Source>(src: &mut S, g: &mut Graph, keys: &[Key]) -> Result<(), S::Error> {
    let missing: Vec<Key> = keys.iter().filter(|k| !g.contains(k)).cloned().collect();
    if missing.is_empty() {
        return Ok(());
    }
    for members in src.components(&missing).await? {
        if members.iter().all(|(k, _)| !g.contains(k)) {
            g.load_component(members);
        }
    }
    // Keys storage does not know are new nodes, each alone: closures must reach them too.
    for k in missing {
        if !g.contains(&k) {
            g.load_component(vec![(k, None)]);
        }
    }
    Ok(())
}

/// Resolves a batch of observations that are new (not stored, no repeats). The components
/// of `force` are re-derived even when nothing is late (after an operator split).
pub async fn resolve<S: Source>(
    src: &mut S,
    rules: &Rules,
    severed: &Severed,
    mut batch: Vec<Observation>,
    force: &[Key],
) -> Result<Outcome, S::Error> {
    batch.sort_by_key(Observation::position);
    let mut g = Graph::new();
    let keys: Vec<Key> = batch
        .iter()
        .flat_map(|o| o.keys.iter().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    load(src, &mut g, &keys).await?;
    let mut late: Vec<usize> = batch
        .iter()
        .enumerate()
        .filter(|(_, o)| {
            Graph::links(rules, o) && g.watermark(&o.keys).is_some_and(|w| w > o.position())
        })
        .map(|(i, _)| i)
        .collect();
    if !late.is_empty() {
        late = unsettled(src, rules, severed, &batch, late).await?;
    }
    if !late.is_empty() && force.is_empty() {
        if let Some(out) = in_any_order(src, rules, severed, &g, &batch, &late).await? {
            return Ok(out);
        }
    }
    // Loaded before anything changes, so every member of every touched component is here.
    let mut before: HashMap<Key, Option<Uuid>> = HashMap::new();
    let mut rederived = None;
    let mut rest: Vec<&Observation> = batch.iter().collect();
    if !late.is_empty() || !force.is_empty() {
        // Close over components and the observations that touch them.
        // Blocked and severed identifiers never link: they are not a path between components.
        let inert = |k: &Key| rules.blocked.contains(k) || severed.keys.contains(k);
        // A forced key (just severed) is where the closure starts: its component re-derives.
        // Nor are identifiers a pattern blocked in the event carrying them.
        let mut reach: BTreeSet<Key> = late
            .iter()
            .flat_map(|i| {
                let o = &batch[*i];
                o.keys.iter().filter(|k| !o.blocks(rules, k)).cloned()
            })
            .filter(|k| !inert(k))
            .chain(force.iter().cloned())
            .collect();
        let mut queried: BTreeSet<Key> = BTreeSet::new();
        let mut in_r: BTreeMap<Uuid, Observation> = BTreeMap::new();
        loop {
            let frontier: Vec<Key> = reach.difference(&queried).cloned().collect();
            if frontier.is_empty() {
                break;
            }
            load(src, &mut g, &frontier).await?;
            queried.extend(frontier.iter().cloned());
            let members: Vec<Key> = g
                .members_of(&frontier)
                .into_iter()
                .filter(|m| !queried.contains(m) || frontier.contains(m))
                .collect();
            queried.extend(members.iter().cloned());
            reach.extend(members.iter().cloned());
            let singles: Vec<Key> = members
                .iter()
                .filter(|k| rules.ttl.contains_key(&k.kind))
                .cloned()
                .collect();
            let stored = src.observations(&members, &singles).await?;
            let member_set: HashSet<&Key> = members.iter().collect();
            for o in stored.into_iter().chain(
                batch
                    .iter()
                    .filter(|o| Graph::links(rules, o))
                    .filter(|o| o.keys.iter().any(|k| member_set.contains(k)))
                    .cloned(),
            ) {
                for k in &o.keys {
                    if !inert(k) && !o.blocks(rules, k) && !queried.contains(k) {
                        reach.insert(k.clone());
                    }
                }
                in_r.entry(o.event_id).or_insert(o);
            }
        }
        let keys: Vec<Key> = reach.iter().cloned().collect();
        load(src, &mut g, &keys).await?;
        // The blocked and severed nodes those observations carry keep what was seen of them.
        let carried: Vec<Key> = in_r
            .values()
            .flat_map(|o| o.keys.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        load(src, &mut g, &carried).await?;
        for k in g.members_of(&keys) {
            before.entry(k.clone()).or_insert_with(|| g.profile_of(&k));
        }
        g.reset(&keys);
        let mut obs: Vec<&Observation> = in_r.values().collect();
        obs.sort_by_key(|o| o.position());
        let mut applied = Applied::default();
        for o in obs {
            g.apply(rules, severed, o, &mut applied);
        }
        rest.retain(|o| !in_r.contains_key(&o.event_id));
        rederived = Some(Rederived {
            keys: reach,
            events: in_r.keys().copied().collect(),
            applied,
        });
    }
    for k in g.all_keys() {
        before.entry(k.clone()).or_insert_with(|| g.profile_of(&k));
    }
    let mut applied = Applied::default();
    for o in rest {
        g.apply(rules, severed, o, &mut applied);
    }
    let changes = changes(&g, &before, &applied, rederived.as_ref(), &batch);
    Ok(Outcome {
        graph: g,
        applied,
        rederived,
        changes,
        before,
    })
}

/// The late observations that can change the graph. One whose every proposed pair is a
/// stored link caused before it cannot: in canonical order those pairs were connected when
/// it comes (components only grow), so it links nothing new, and its other effects — what
/// was seen of its identifiers (minima and maxima) and refusals by static rules (blocked) —
/// do not depend on order. Applied as it comes, it gives what re-derivation would.
async fn unsettled<S: Source>(
    src: &mut S,
    rules: &Rules,
    severed: &Severed,
    batch: &[Observation],
    late: Vec<usize>,
) -> Result<Vec<usize>, S::Error> {
    let proposals: Vec<Option<Vec<Uuid>>> = late
        .iter()
        .map(|i| Graph::proposals(rules, severed, &batch[*i]))
        .collect();
    let ids: Vec<Uuid> = proposals
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stored = if ids.is_empty() {
        HashMap::new()
    } else {
        src.link_positions(&ids).await?
    };
    Ok(late
        .into_iter()
        .zip(proposals)
        .filter(|(i, p)| {
            let Some(p) = p else { return true };
            let at = batch[*i].position();
            !p.iter().all(|l| stored.get(l).is_some_and(|s| *s < at))
        })
        .map(|(i, _)| i)
        .collect())
}

/// Late events whose components no rule binds need no re-derivation. A rule binds a
/// component when it holds more of a kind than a limit or a unique kind allows, or when a
/// link of one of its members was ever refused for a count (that refusal could go the other
/// way in another order), or when a late event carries a kind with a time-to-live. Where
/// none binds, every proposal inside the component is accepted in any order, so its
/// membership, links (each pair with its earliest event) and profile are what canonical
/// order gives: the batch is applied as it came, in canonical order within the batch.
async fn in_any_order<S: Source>(
    src: &mut S,
    rules: &Rules,
    severed: &Severed,
    g: &Graph,
    batch: &[Observation],
    late: &[usize],
) -> Result<Option<Outcome>, S::Error> {
    let late_keys: Vec<Key> = late
        .iter()
        .flat_map(|i| batch[*i].keys.iter().cloned())
        .collect();
    if late_keys.iter().any(|k| rules.ttl.contains_key(&k.kind)) {
        return Ok(None);
    }
    let mut g = g.clone();
    let before: HashMap<Key, Option<Uuid>> = g
        .all_keys()
        .into_iter()
        .map(|k| {
            let p = g.profile_of(&k);
            (k, p)
        })
        .collect();
    let mut applied = Applied::default();
    for o in batch {
        g.apply(rules, severed, o, &mut applied);
    }
    if !late_keys.iter().all(|k| g.within_rules(rules, k)) {
        return Ok(None);
    }
    let members: BTreeSet<Key> = g.members_of(&late_keys).into_iter().collect();
    let counted = applied.refusals.iter().any(|r| {
        r.reason.kind().is_some() && (members.contains(&r.key) || members.contains(&r.other))
    });
    if counted
        || src
            .bound(&members.iter().cloned().collect::<Vec<_>>())
            .await?
    {
        return Ok(None);
    }
    let changes = changes(&g, &before, &applied, None, batch);
    Ok(Some(Outcome {
        graph: g,
        applied,
        rederived: None,
        changes,
        before,
    }))
}

/// The profile changes between `before` and the graph now, for subjects.
fn changes(
    g: &Graph,
    before: &HashMap<Key, Option<Uuid>>,
    applied: &Applied,
    rederived: Option<&Rederived>,
    batch: &[Observation],
) -> Vec<ProfileChange> {
    let merges: HashMap<Uuid, (Uuid, Uuid)> = applied
        .merges
        .iter()
        .chain(rederived.iter().flat_map(|r| r.applied.merges.iter()))
        .map(|m| (m.loser, (m.link_id, m.cause)))
        .collect();
    let fallback_cause = rederived
        .and_then(|r| {
            batch
                .iter()
                .find(|o| r.events.contains(&o.event_id))
                .map(|o| o.event_id)
        })
        .or_else(|| batch.first().map(|o| o.event_id))
        .unwrap_or_default();
    // Old profile -> new profile -> subjects (base profiles) that went there.
    let mut moves: BTreeMap<Uuid, BTreeMap<Uuid, Vec<Uuid>>> = BTreeMap::new();
    for a in g.assignments() {
        let Some(seen) = a.seen else { continue };
        if !seen.subject {
            continue;
        }
        let Some(new) = a.profile else { continue };
        let base = a.key.profile_id();
        let old = before.get(&a.key).copied().flatten().unwrap_or(base);
        moves
            .entry(old)
            .or_default()
            .entry(new)
            .or_default()
            .push(base);
    }
    let mut out = Vec::new();
    for (old, targets) in moves {
        if targets.len() == 1 {
            let Some(new) = targets.keys().next().copied() else {
                continue;
            };
            if new != old {
                let (link_id, cause) = merges
                    .get(&old)
                    .copied()
                    .unwrap_or((Uuid::nil(), fallback_cause));
                out.push(ProfileChange::Merged {
                    winner: new,
                    loser: old,
                    link_id,
                    cause,
                });
            }
            continue;
        }
        for (new, mut moved) in targets {
            if new == old {
                continue;
            }
            moved.sort();
            out.push(ProfileChange::Split {
                from: old,
                to: new,
                moved,
                cause: fallback_cause,
            });
        }
    }
    out
}

/// An in-memory store of the graph, applying outcomes as the Postgres store does: the
/// reference the property test runs the incremental algorithm against.
#[derive(Default, Debug, Clone)]
pub struct MemoryStore {
    pub nodes: BTreeMap<Key, (Key, Option<crate::graph::Seen>, Option<Uuid>)>,
    pub observations: BTreeMap<Uuid, Observation>,
    pub links: BTreeMap<Uuid, crate::graph::Link>,
    pub refusals: BTreeSet<crate::graph::Refusal>,
}

impl MemoryStore {
    /// Stores a batch's outcome; returns nothing, like a committed transaction.
    pub fn commit(&mut self, batch: &[Observation], out: &Outcome) {
        for o in batch {
            self.observations.insert(o.event_id, o.clone());
        }
        if let Some(r) = &out.rederived {
            self.links
                .retain(|_, l| !r.keys.contains(&l.from) && !r.keys.contains(&l.to));
            self.refusals.retain(|x| !r.events.contains(&x.event_id));
            self.store(&r.applied);
        }
        self.store(&out.applied);
        for a in out.graph.assignments() {
            self.nodes.insert(a.key, (a.label, a.seen, a.profile));
        }
    }

    fn store(&mut self, a: &Applied) {
        for l in &a.links {
            let e = self.links.entry(l.link_id).or_insert_with(|| l.clone());
            if (l.at, l.cause) < (e.at, e.cause) {
                *e = l.clone();
            }
        }
        self.refusals.extend(a.refusals.iter().cloned());
    }

    /// Keeps only observations not seen before (event-level dedup), first occurrence wins.
    pub fn fresh(&self, batch: Vec<Observation>) -> Vec<Observation> {
        let mut seen = HashSet::new();
        batch
            .into_iter()
            .filter(|o| !self.observations.contains_key(&o.event_id) && seen.insert(o.event_id))
            .collect()
    }
}

impl Source for MemoryStore {
    type Error = std::convert::Infallible;

    async fn components(&mut self, keys: &[Key]) -> Result<Vec<Members>, Self::Error> {
        let labels: BTreeSet<&Key> = keys
            .iter()
            .filter_map(|k| self.nodes.get(k).map(|n| &n.0))
            .collect();
        Ok(labels
            .into_iter()
            .map(|l| {
                self.nodes
                    .iter()
                    .filter(|(_, n)| &n.0 == l)
                    .map(|(k, n)| (k.clone(), n.1))
                    .collect()
            })
            .collect())
    }

    async fn bound(&mut self, keys: &[Key]) -> Result<bool, Self::Error> {
        let keys: HashSet<&Key> = keys.iter().collect();
        Ok(self.refusals.iter().any(|r| {
            r.reason.kind().is_some() && (keys.contains(&r.key) || keys.contains(&r.other))
        }))
    }

    async fn link_positions(
        &mut self,
        links: &[Uuid],
    ) -> Result<HashMap<Uuid, crate::graph::Position>, Self::Error> {
        Ok(links
            .iter()
            .filter_map(|id| self.links.get(id).map(|l| (*id, (l.at, l.cause))))
            .collect())
    }

    async fn observations(
        &mut self,
        keys: &[Key],
        singles: &[Key],
    ) -> Result<Vec<Observation>, Self::Error> {
        let keys: HashSet<&Key> = keys.iter().collect();
        let singles: HashSet<&Key> = singles.iter().collect();
        Ok(self
            .observations
            .values()
            .filter(|o| o.keys.iter().any(|k| keys.contains(k)))
            .filter(|o| o.keys.len() > 1 || o.keys.iter().any(|k| singles.contains(k)))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{derive, Kind};
    use cdp_schemas::IdentifierKind;
    use proptest::prelude::*;

    fn pool() -> Vec<Key> {
        let mut keys = Vec::new();
        for (kind, n) in [
            (IdentifierKind::UserId, 3),
            (IdentifierKind::Email, 4),
            (IdentifierKind::AnonymousId, 6),
            (IdentifierKind::DeviceId, 3),
        ] {
            for i in 0..n {
                keys.push(Key::new(
                    Kind::Id(kind),
                    None,
                    &format!("{}{i}", kind.as_str()),
                ));
            }
        }
        keys
    }

    fn rules() -> Rules {
        let junk = Key::new(Kind::Id(IdentifierKind::DeviceId), None, "DEVICE_ID0");
        Rules {
            priority: vec![
                Kind::Id(IdentifierKind::UserId),
                Kind::Id(IdentifierKind::Email),
            ],
            unique: [Kind::Id(IdentifierKind::UserId)].into(),
            limits: [(Kind::Id(IdentifierKind::Email), 2)].into(),
            ttl: [(Kind::Id(IdentifierKind::AnonymousId), 20)].into(),
            blocked: [junk].into(),
        }
    }

    /// Random events; in some of them (as if their producer evaluated a blocked pattern) one
    /// email is marked blocked, in others it is not.
    fn events() -> impl Strategy<Value = Vec<Observation>> {
        let n = pool().len();
        prop::collection::vec(
            (0i64..60, prop::collection::vec(0..n, 1..4), any::<bool>()),
            1..40,
        )
        .prop_map(|raw| {
            let keys = pool();
            let patterned = keys[4].token.clone();
            raw.into_iter()
                .enumerate()
                .map(|(i, (at, picks, flagged))| {
                    let ids: Vec<Key> = picks.iter().map(|p| keys[*p].clone()).collect();
                    let subject = ids[0].token.clone();
                    let o = Observation::new(Uuid::from_u128(i as u128 + 1), at, &subject, ids);
                    if flagged {
                        o.block(&[patterned.as_str()])
                    } else {
                        o
                    }
                })
                .collect()
        })
    }

    /// Arrival: a permutation with some events delivered twice, cut into batches.
    fn arrival(
        events: Vec<Observation>,
    ) -> impl Strategy<Value = (Vec<Observation>, Vec<Vec<Observation>>)> {
        let n = events.len();
        (
            Just(events).prop_shuffle(),
            prop::collection::vec(0..n, 0..5),
            prop::collection::vec(1usize..6, 1..20),
        )
            .prop_map(|(shuffled, repeats, sizes)| {
                let mut seq = shuffled.clone();
                for r in repeats {
                    let at = r.min(seq.len());
                    seq.insert(at, shuffled[r].clone());
                }
                let mut batches = Vec::new();
                let mut it = seq.into_iter().peekable();
                let mut s = sizes.into_iter().cycle();
                while it.peek().is_some() {
                    let size = s.next().unwrap_or(1);
                    batches.push(it.by_ref().take(size).collect());
                }
                (shuffled, batches)
            })
    }

    fn run(batches: Vec<Vec<Observation>>, severed: &Severed) -> MemoryStore {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut store = MemoryStore::default();
        for b in batches {
            let fresh = store.fresh(b);
            if fresh.is_empty() {
                continue;
            }
            let mut src = store.clone();
            let out = match rt.block_on(resolve(&mut src, &rules(), severed, fresh.clone(), &[])) {
                Ok(o) => o,
                Err(e) => match e {},
            };
            store.commit(&fresh, &out);
        }
        store
    }

    fn expected(all: &[Observation], severed: &Severed) -> MemoryStore {
        let (g, applied) = derive(&rules(), severed, all);
        let mut m = MemoryStore::default();
        for a in g.assignments() {
            m.nodes.insert(a.key, (a.label, a.seen, a.profile));
        }
        for l in applied.links {
            m.links.entry(l.link_id).or_insert(l);
        }
        m.refusals = applied.refusals.into_iter().collect();
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_arrival_order_and_batching_gives_the_derived_graph(
            (all, batches) in events().prop_flat_map(arrival)
        ) {
            let got = run(batches, &Severed::default());
            let want = expected(&all, &Severed::default());
            prop_assert_eq!(&got.nodes, &want.nodes);
            prop_assert_eq!(&got.links, &want.links);
            prop_assert_eq!(&got.refusals, &want.refusals);
        }

        #[test]
        fn a_severed_identifier_gives_the_graph_derived_without_it(
            (all, batches) in events().prop_flat_map(arrival),
            cut in 0usize..16,
        ) {
            let severed = Severed { keys: [pool()[cut].clone()].into(), ..Severed::default() };
            let got = run(batches, &severed);
            let want = expected(&all, &severed);
            prop_assert_eq!(&got.nodes, &want.nodes);
            prop_assert_eq!(&got.links, &want.links);
        }
    }

    #[test]
    fn a_late_event_that_changes_the_first_subject_renames_the_profile() {
        let a = Key::new(Kind::Id(IdentifierKind::AnonymousId), None, "a");
        let b = Key::new(Kind::Id(IdentifierKind::AnonymousId), None, "b");
        let e = Key::new(Kind::Id(IdentifierKind::Email), None, "e");
        let late = Observation::new(Uuid::from_u128(2), 5, "b", vec![b.clone(), e.clone()]);
        let first = Observation::new(Uuid::from_u128(1), 10, "a", vec![a.clone(), e.clone()]);
        let store = run(vec![vec![first.clone()]], &Severed::default());
        let mut src = store.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let out = match rt.block_on(resolve(
            &mut src,
            &rules(),
            &Severed::default(),
            vec![late],
            &[],
        )) {
            Ok(o) => o,
            Err(e) => match e {},
        };
        assert!(out.rederived.is_some(), "an earlier event re-derives");
        assert_eq!(out.graph.profile_of(&a), Some(b.profile_id()));
        assert_eq!(
            out.changes,
            vec![ProfileChange::Merged {
                winner: b.profile_id(),
                loser: a.profile_id(),
                link_id: out
                    .rederived
                    .as_ref()
                    .map(|r| r.applied.merges[0].link_id)
                    .unwrap_or_default(),
                cause: Uuid::from_u128(1),
            }]
        );
    }
}
