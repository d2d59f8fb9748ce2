//! The identity graph as a pure function of observations.
//!
//! An observation is one customer event: its id, when it occurred, its subject and the
//! identifiers it carries. Observations are applied in canonical order, `(occurred_at,
//! event_id)`, never in arrival order: the rules (limits, unique kinds, time-to-live) make the
//! result depend on the order links are proposed, so the order must be one every replica and
//! every replay agrees on. The store keeps the graph incrementally when events arrive in that
//! order and re-derives the affected components from their observations when one arrives late
//! (see `store`).
//!
//! Within an event, identifiers are ranked by the configured priority; the highest-ranked one
//! that may link (not blocked, not severed by an operator, not expired) is the anchor, and
//! every other identifier is proposed as a link to it. A proposal is accepted when it joins
//! two components that together keep the rules, and refused (with the reason recorded)
//! otherwise. A component's profile is the profile of its subject seen first (ties: profile
//! id), so which profile survives a merge does not depend on arrival order either.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use cdp_schemas::{profile_id_of, IdentifierKind};
use uuid::Uuid;

/// Event time in microseconds since the Unix epoch.
pub type Micros = i64;

/// Canonical position of an observation: event time, then event id.
pub type Position = (Micros, Uuid);

/// Namespace of link ids (UUIDv5 of the event and the two identifiers).
const LINK_NAMESPACE: Uuid = Uuid::from_u128(0x7c1e_55a0_2b1d_4f8e_8a3c_9d4e_0f11_0010);

/// What a node of the graph is: an identifier kind, or a subject id that is the token of none
/// of its event's identifiers (events produced straight to Kafka may name such a subject).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Id(IdentifierKind),
    Subject,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Id(IdentifierKind::UserId),
        Kind::Id(IdentifierKind::AnonymousId),
        Kind::Id(IdentifierKind::Email),
        Kind::Id(IdentifierKind::Phone),
        Kind::Id(IdentifierKind::DeviceId),
        Kind::Id(IdentifierKind::ExternalId),
        Kind::Subject,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Id(k) => k.as_str(),
            Kind::Subject => "SUBJECT",
        }
    }

    /// Parses the stored symbol, or a configuration name (`user_id`, `EMAIL`, ...).
    pub fn parse(s: &str) -> Option<Kind> {
        let up = s.trim().to_ascii_uppercase();
        if up == "SUBJECT" {
            return Some(Kind::Subject);
        }
        IdentifierKind::from_symbol(&up).map(Kind::Id)
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(6)
    }
}

/// One identifier (or bare subject) as the graph knows it: a vault token, never the value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub token: String,
}

impl Key {
    pub fn new(kind: Kind, namespace: Option<&str>, token: &str) -> Self {
        Self {
            kind,
            namespace: namespace.unwrap_or_default().to_owned(),
            token: token.to_owned(),
        }
    }

    /// The profile this key is the subject of (the projector's base profile id).
    pub fn profile_id(&self) -> Uuid {
        profile_id_of(&self.token)
    }
}

/// One event, as identity resolution sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub event_id: Uuid,
    pub at: Micros,
    /// The node the event is about (one of `keys`).
    pub subject: Key,
    /// Every node the event carries, the subject included, without repeats.
    pub keys: Vec<Key>,
    /// Those of `keys` a blocked pattern matched where the plaintext was (ingest): they
    /// never link in this event.
    pub blocked: Vec<Key>,
}

impl Observation {
    /// Builds an observation from an event's subject id and identifiers: the subject is the
    /// identifier whose token is the subject id, or a bare subject node when none is.
    pub fn new(event_id: Uuid, at: Micros, subject_id: &str, identifiers: Vec<Key>) -> Self {
        let mut keys: Vec<Key> = Vec::with_capacity(identifiers.len() + 1);
        for k in identifiers {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let subject = keys
            .iter()
            .filter(|k| k.token == subject_id)
            .min()
            .cloned()
            .unwrap_or_else(|| Key::new(Kind::Subject, None, subject_id));
        if !keys.contains(&subject) {
            keys.push(subject.clone());
        }
        Self {
            event_id,
            at,
            subject,
            keys,
            blocked: Vec::new(),
        }
    }

    /// Marks the keys whose token is in `tokens` as blocked in this event.
    pub fn block(mut self, tokens: &[&str]) -> Self {
        self.blocked = self
            .keys
            .iter()
            .filter(|k| tokens.contains(&k.token.as_str()))
            .cloned()
            .collect();
        self.blocked.sort();
        self
    }

    /// Whether a key never links in this event (a configured blocked value, or a pattern
    /// matched it).
    pub fn blocks(&self, rules: &Rules, key: &Key) -> bool {
        rules.blocked.contains(key) || self.blocked.contains(key)
    }

    pub fn position(&self) -> Position {
        (self.at, self.event_id)
    }
}

/// The configured rules.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Kinds in priority order (first is highest); unlisted kinds rank after, in kind order.
    pub priority: Vec<Kind>,
    /// Kinds of which a profile holds at most one value: two profiles holding different
    /// values never merge.
    pub unique: BTreeSet<Kind>,
    /// Most values of a kind one profile may hold.
    pub limits: BTreeMap<Kind, u32>,
    /// A value of this kind not seen for this long (event time) no longer links until it is
    /// seen again.
    pub ttl: BTreeMap<Kind, Micros>,
    /// Values that never link (exact match on the token of the normalized value).
    pub blocked: HashSet<Key>,
}

impl Rules {
    fn rank(&self, k: Kind) -> (usize, usize) {
        match self.priority.iter().position(|p| *p == k) {
            Some(i) => (i, 0),
            None => (self.priority.len(), k.index()),
        }
    }

    /// The order in which an event's identifiers are considered: by priority, then by key.
    /// The first that may link anchors the others.
    fn order(&self, a: &Key, b: &Key) -> std::cmp::Ordering {
        self.rank(a.kind).cmp(&self.rank(b.kind)).then(a.cmp(b))
    }
}

/// Links and identifiers an operator removed (`cdp identity split`).
#[derive(Clone, Debug, Default)]
pub struct Severed {
    pub keys: HashSet<Key>,
    /// Pairs, smaller key first.
    pub pairs: HashSet<(Key, Key)>,
}

impl Severed {
    pub fn pair(a: &Key, b: &Key) -> (Key, Key) {
        if a <= b {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        }
    }

    fn severs(&self, a: &Key, b: &Key) -> bool {
        !self.pairs.is_empty() && self.pairs.contains(&Self::pair(a, b))
    }
}

/// Why a proposed link was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Blocked,
    Severed,
    Expired,
    /// Both profiles hold a value of this unique kind.
    Unique(Kind),
    /// Together the profiles would hold more values of this kind than allowed.
    Limit(Kind),
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Blocked => "blocked",
            Reason::Severed => "severed",
            Reason::Expired => "expired",
            Reason::Unique(_) => "unique",
            Reason::Limit(_) => "limit",
        }
    }

    /// The kind a unique or limit refusal is about.
    pub fn kind(self) -> Option<Kind> {
        match self {
            Reason::Unique(k) | Reason::Limit(k) => Some(k),
            _ => None,
        }
    }
}

/// An accepted link: a pair of identifiers an event carried together, with the earliest such
/// event. Links that joined two components also produced a merge.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Link {
    pub link_id: Uuid,
    pub from: Key,
    pub to: Key,
    pub cause: Uuid,
    pub at: Micros,
}

/// A refused link, recorded and counted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Refusal {
    pub event_id: Uuid,
    pub key: Key,
    pub other: Key,
    pub reason: Reason,
    pub at: Micros,
}

/// A link that merged two profiled components.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merge {
    pub winner: Uuid,
    pub loser: Uuid,
    pub link_id: Uuid,
    pub cause: Uuid,
}

/// What applying observations produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub links: Vec<Link>,
    pub refusals: Vec<Refusal>,
    pub merges: Vec<Merge>,
}

/// What the graph knows of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub first: Position,
    pub last: Position,
    /// Whether an event was ever about this node (it then has a profile of its own).
    pub subject: bool,
    /// The latest observation that could link this node: one carrying another identifier,
    /// or any observation when its kind has a time-to-live. Only these decide links, so only
    /// these make an observation late.
    pub link: Option<Position>,
}

#[derive(Clone, Debug)]
struct Component {
    members: Vec<usize>,
    counts: [u32; 7],
    /// The earliest subject: (first seen, profile id).
    canonical: Option<(Position, Uuid)>,
}

impl Component {
    fn single(i: usize, key: &Key) -> Self {
        let mut counts = [0; 7];
        counts[key.kind.index()] = 1;
        Self {
            members: vec![i],
            counts,
            canonical: None,
        }
    }
}

/// A part of the identity graph: the nodes loaded, grouped into components.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    keys: Vec<Key>,
    index: HashMap<Key, usize>,
    seen: Vec<Option<Seen>>,
    root: Vec<usize>,
    comps: HashMap<usize, Component>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads one stored component (its members with what was seen of them).
    pub fn load_component(&mut self, members: Vec<(Key, Option<Seen>)>) {
        let mut ids = Vec::with_capacity(members.len());
        for (key, seen) in members {
            let i = self.node(&key);
            self.seen[i] = seen;
            ids.push(i);
        }
        let mut it = ids.into_iter();
        if let Some(first) = it.next() {
            self.refresh(first);
            for i in it {
                self.refresh(i);
                self.union(first, i);
            }
        }
    }

    /// Forgets the grouping of these nodes' components, so that the observations that can
    /// link them can be applied again in canonical order. First and last seen stay: they are
    /// a minimum and a maximum, which applying an observation again does not change.
    pub fn reset(&mut self, keys: &[Key]) {
        for k in keys {
            let i = self.node(k);
            let r = self.root[i];
            if let Some(c) = self.comps.remove(&r) {
                for m in c.members {
                    self.root[m] = m;
                    if let Some(s) = &mut self.seen[m] {
                        s.link = None;
                    }
                    self.comps.insert(m, Component::single(m, &self.keys[m]));
                    self.refresh(m);
                }
            }
        }
    }

    /// Whether the component of `key` holds no more of each kind than the rules allow (then
    /// no proposal inside it can have been refused by a count, in any order).
    pub fn within_rules(&self, rules: &Rules, key: &Key) -> bool {
        let Some(c) = self
            .index
            .get(key)
            .and_then(|i| self.comps.get(&self.root[*i]))
        else {
            return true;
        };
        rules.unique.iter().all(|k| c.counts[k.index()] <= 1)
            && rules.limits.iter().all(|(k, l)| c.counts[k.index()] <= *l)
    }

    /// Whether an observation can link anything: it carries two nodes or more, or one of a
    /// kind with a time-to-live (its time decides later links). Others only move first and
    /// last seen, which do not depend on order.
    pub fn links(rules: &Rules, obs: &Observation) -> bool {
        obs.keys.len() > 1 || obs.keys.iter().any(|k| rules.ttl.contains_key(&k.kind))
    }

    fn node(&mut self, key: &Key) -> usize {
        if let Some(i) = self.index.get(key) {
            return *i;
        }
        let i = self.keys.len();
        self.keys.push(key.clone());
        self.index.insert(key.clone(), i);
        self.seen.push(None);
        self.root.push(i);
        self.comps.insert(i, Component::single(i, key));
        i
    }

    /// Recomputes the canonical subject of a node's component after its `seen` changed.
    fn refresh(&mut self, i: usize) {
        let cand = self.seen[i]
            .filter(|s| s.subject)
            .map(|s| (s.first, self.keys[i].profile_id()));
        if let Some(c) = self.comps.get_mut(&self.root[i]) {
            if let Some(cand) = cand {
                if c.canonical.is_none_or(|cur| cand < cur) {
                    c.canonical = Some(cand);
                }
            }
        }
    }

    /// Joins two components (the larger absorbs the smaller); returns the surviving root.
    fn union(&mut self, a: usize, b: usize) -> usize {
        let (ra, rb) = (self.root[a], self.root[b]);
        if ra == rb {
            return ra;
        }
        let (big, small) = {
            let la = self.comps.get(&ra).map_or(0, |c| c.members.len());
            let lb = self.comps.get(&rb).map_or(0, |c| c.members.len());
            if la >= lb {
                (ra, rb)
            } else {
                (rb, ra)
            }
        };
        let Some(s) = self.comps.remove(&small) else {
            return big;
        };
        for m in &s.members {
            self.root[*m] = big;
        }
        if let Some(c) = self.comps.get_mut(&big) {
            c.members.extend(s.members);
            for (x, y) in c.counts.iter_mut().zip(s.counts) {
                *x += y;
            }
            c.canonical = match (c.canonical, s.canonical) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            };
        }
        big
    }

    fn canonical(&self, i: usize) -> Option<(Position, Uuid)> {
        self.comps.get(&self.root[i]).and_then(|c| c.canonical)
    }

    /// Whether two components may be joined, or the rule that refuses it.
    fn check(&self, rules: &Rules, a: usize, b: usize) -> Result<(), Reason> {
        let (Some(ca), Some(cb)) = (self.comps.get(&self.root[a]), self.comps.get(&self.root[b]))
        else {
            return Ok(());
        };
        for k in &rules.unique {
            let x = k.index();
            if ca.counts[x] > 0 && cb.counts[x] > 0 {
                return Err(Reason::Unique(*k));
            }
        }
        for (k, limit) in &rules.limits {
            let x = k.index();
            if ca.counts[x] + cb.counts[x] > *limit {
                return Err(Reason::Limit(*k));
            }
        }
        Ok(())
    }

    /// The latest observation applied to any member of the components of these keys.
    pub fn watermark<'k>(&self, keys: impl IntoIterator<Item = &'k Key>) -> Option<Position> {
        let mut roots = BTreeSet::new();
        for k in keys {
            if let Some(i) = self.index.get(k) {
                roots.insert(self.root[*i]);
            }
        }
        roots
            .into_iter()
            .filter_map(|r| self.comps.get(&r))
            .flat_map(|c| c.members.iter())
            .filter_map(|m| self.seen[*m].and_then(|s| s.link))
            .max()
    }

    /// The pairs an observation asks to link (its anchor with each other identifier no
    /// static rule refuses), when what it does depends on the graph only through them: None
    /// when one of its kinds has a time-to-live (eligibility then depends on time) or a pair
    /// is severed. The anchor and the verdicts are those [`Graph::apply`] computes.
    pub fn proposals(rules: &Rules, severed: &Severed, obs: &Observation) -> Option<Vec<Uuid>> {
        if obs.keys.iter().any(|k| rules.ttl.contains_key(&k.kind)) {
            return None;
        }
        let mut ranked: Vec<&Key> = obs.keys.iter().collect();
        ranked.sort_by(|a, b| rules.order(a, b));
        ranked.dedup();
        let free = |k: &Key| !obs.blocks(rules, k) && !severed.keys.contains(k);
        let mut eligible = ranked.into_iter().filter(|k| free(k));
        let Some(anchor) = eligible.next() else {
            return Some(Vec::new());
        };
        let mut out = Vec::new();
        for k in eligible {
            if severed.severs(anchor, k) {
                return None;
            }
            let (from, to) = Severed::pair(anchor, k);
            out.push(link_id(&from, &to));
        }
        Some(out)
    }

    /// Applies one observation. Callers apply observations in canonical order.
    pub fn apply(
        &mut self,
        rules: &Rules,
        severed: &Severed,
        obs: &Observation,
        out: &mut Applied,
    ) {
        let pos = obs.position();
        let linking = Self::links(rules, obs);
        let mut ranked: Vec<usize> = obs.keys.iter().map(|k| self.node(k)).collect();
        ranked.sort_by(|a, b| rules.order(&self.keys[*a], &self.keys[*b]));
        ranked.dedup();
        // Eligibility is judged on what was seen before this event.
        let verdicts: Vec<Option<Reason>> = ranked
            .iter()
            .map(|i| {
                let key = &self.keys[*i];
                if obs.blocks(rules, key) {
                    Some(Reason::Blocked)
                } else if severed.keys.contains(key) {
                    Some(Reason::Severed)
                } else if let (Some(ttl), Some(last)) =
                    (rules.ttl.get(&key.kind), self.seen[*i].and_then(|s| s.link))
                {
                    (last.0 < obs.at.saturating_sub(*ttl)).then_some(Reason::Expired)
                } else {
                    None
                }
            })
            .collect();
        for i in &ranked {
            let subject = self.keys[*i] == obs.subject;
            let s = match self.seen[*i] {
                None => Seen {
                    first: pos,
                    last: pos,
                    subject,
                    link: linking.then_some(pos),
                },
                Some(s) => Seen {
                    first: s.first.min(pos),
                    last: s.last.max(pos),
                    subject: s.subject || subject,
                    link: if linking {
                        Some(s.link.map_or(pos, |l| l.max(pos)))
                    } else {
                        s.link
                    },
                },
            };
            self.seen[*i] = Some(s);
            self.refresh(*i);
        }
        if ranked.len() < 2 {
            return;
        }
        let anchor = ranked
            .iter()
            .zip(&verdicts)
            .find(|(_, v)| v.is_none())
            .map(|(i, _)| *i);
        for (i, verdict) in ranked.iter().zip(&verdicts) {
            let i = *i;
            if Some(i) == anchor {
                continue;
            }
            let other =
                anchor.unwrap_or_else(|| ranked.iter().copied().find(|j| *j != i).unwrap_or(i));
            let refuse = |reason, out: &mut Applied, g: &Graph| {
                out.refusals.push(Refusal {
                    event_id: obs.event_id,
                    key: g.keys[i].clone(),
                    other: g.keys[other].clone(),
                    reason,
                    at: obs.at,
                })
            };
            if let Some(reason) = verdict {
                refuse(*reason, out, self);
                continue;
            }
            let Some(a) = anchor else { continue };
            if severed.severs(&self.keys[a], &self.keys[i]) {
                refuse(Reason::Severed, out, self);
                continue;
            }
            // A link is a pair an event showed together and no rule refused; it is recorded
            // (with its earliest event) whether or not the two were connected already, so
            // the links do not depend on the order events arrive in.
            let (from, to) = Severed::pair(&self.keys[a], &self.keys[i]);
            let link = Link {
                link_id: link_id(&from, &to),
                from,
                to,
                cause: obs.event_id,
                at: obs.at,
            };
            if self.root[a] == self.root[i] {
                out.links.push(link);
                continue;
            }
            if let Err(reason) = self.check(rules, a, i) {
                refuse(reason, out, self);
                continue;
            }
            let link_id = link.link_id;
            let (ca, ci) = (self.canonical(a), self.canonical(i));
            self.union(a, i);
            out.links.push(link);
            if let (Some(x), Some(y)) = (ca, ci) {
                let (w, l) = if x <= y { (x, y) } else { (y, x) };
                out.merges.push(Merge {
                    winner: w.1,
                    loser: l.1,
                    link_id,
                    cause: obs.event_id,
                });
            }
        }
    }

    /// Every node with its component's profile (None for a component no event was about)
    /// and a component label (a member's key, the smallest).
    pub fn assignments(&self) -> Vec<Assignment> {
        let mut out = Vec::with_capacity(self.keys.len());
        for c in self.comps.values() {
            let label = c.members.iter().map(|m| &self.keys[*m]).min().cloned();
            let Some(label) = label else { continue };
            for m in &c.members {
                out.push(Assignment {
                    key: self.keys[*m].clone(),
                    seen: self.seen[*m],
                    profile: c.canonical.map(|x| x.1),
                    label: label.clone(),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Whether the node is loaded.
    pub fn contains(&self, key: &Key) -> bool {
        self.index.contains_key(key)
    }

    /// Every member of the components of these keys (loaded ones only).
    pub fn members_of(&self, keys: &[Key]) -> Vec<Key> {
        let roots: BTreeSet<usize> = keys
            .iter()
            .filter_map(|k| self.index.get(k).map(|i| self.root[*i]))
            .collect();
        roots
            .into_iter()
            .filter_map(|r| self.comps.get(&r))
            .flat_map(|c| c.members.iter().map(|m| self.keys[*m].clone()))
            .collect()
    }

    /// Every loaded node.
    pub fn all_keys(&self) -> Vec<Key> {
        self.keys.clone()
    }

    /// The profile of a node's component.
    pub fn profile_of(&self, key: &Key) -> Option<Uuid> {
        self.index
            .get(key)
            .and_then(|i| self.canonical(*i))
            .map(|x| x.1)
    }
}

/// Where a node stands after applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub key: Key,
    pub seen: Option<Seen>,
    pub profile: Option<Uuid>,
    pub label: Key,
}

/// The link id of an accepted link: the same event linking the same pair always gets it.
/// The id of the link between two identifiers (the smaller key first): one per pair.
pub fn link_id(from: &Key, to: &Key) -> Uuid {
    let mut name = Vec::with_capacity(from.token.len() + to.token.len() + 32);
    for k in [from, to] {
        name.extend_from_slice(k.kind.as_str().as_bytes());
        name.push(0);
        name.extend_from_slice(k.namespace.as_bytes());
        name.push(0);
        name.extend_from_slice(k.token.as_bytes());
        name.push(0);
    }
    Uuid::new_v5(&LINK_NAMESPACE, &name)
}

/// Applies observations in canonical order to an empty graph.
pub fn derive(rules: &Rules, severed: &Severed, observations: &[Observation]) -> (Graph, Applied) {
    let mut sorted: Vec<&Observation> = observations.iter().collect();
    sorted.sort_by_key(|o| o.position());
    sorted.dedup_by_key(|o| o.event_id);
    let mut g = Graph::new();
    let mut out = Applied::default();
    for o in sorted {
        g.apply(rules, severed, o, &mut out);
    }
    (g, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn key(kind: IdentifierKind, v: &str) -> Key {
        Key::new(Kind::Id(kind), None, v)
    }

    fn obs(n: u128, at: Micros, keys: &[Key]) -> Observation {
        let subject = keys[0].token.clone();
        Observation::new(Uuid::from_u128(n), at, &subject, keys.to_vec())
    }

    fn rules() -> Rules {
        Rules {
            priority: vec![
                Kind::Id(IdentifierKind::UserId),
                Kind::Id(IdentifierKind::Email),
                Kind::Id(IdentifierKind::AnonymousId),
            ],
            unique: [Kind::Id(IdentifierKind::UserId)].into(),
            limits: [(Kind::Id(IdentifierKind::Email), 2)].into(),
            ..Rules::default()
        }
    }

    use IdentifierKind::{AnonymousId as Anon, Email, UserId as User};

    #[test]
    fn shared_identifiers_make_one_profile_named_by_the_earliest_subject() {
        let (a1, a2, e) = (key(Anon, "a1"), key(Anon, "a2"), key(Email, "e"));
        let (g, out) = derive(
            &rules(),
            &Severed::default(),
            &[
                obs(2, 20, &[a2.clone(), e.clone()]),
                obs(1, 10, &[a1.clone(), e.clone()]),
            ],
        );
        assert_eq!(g.profile_of(&a1), Some(a1.profile_id()));
        assert_eq!(g.profile_of(&a2), Some(a1.profile_id()));
        assert_eq!(out.links.len(), 2);
        assert_eq!(
            out.merges,
            vec![Merge {
                winner: a1.profile_id(),
                loser: a2.profile_id(),
                link_id: out.links[1].link_id,
                cause: Uuid::from_u128(2),
            }]
        );
    }

    #[test]
    fn two_user_ids_never_merge_and_the_refusal_is_recorded() {
        let (u1, u2, e) = (key(User, "u1"), key(User, "u2"), key(Email, "e"));
        let (g, out) = derive(
            &rules(),
            &Severed::default(),
            &[
                obs(1, 10, &[u1.clone(), e.clone()]),
                obs(2, 20, &[u2.clone(), e.clone()]),
            ],
        );
        assert_eq!(g.profile_of(&e), Some(u1.profile_id()));
        assert_eq!(g.profile_of(&u2), Some(u2.profile_id()));
        assert_eq!(out.refusals.len(), 1);
        assert_eq!(out.refusals[0].key, e);
        assert_eq!(out.refusals[0].other, u2);
        assert_eq!(out.refusals[0].reason, Reason::Unique(Kind::Id(User)));
    }

    #[test]
    fn a_limit_refuses_the_link_that_would_exceed_it() {
        let u = key(User, "u");
        let es: Vec<Key> = (0..3).map(|i| key(Email, &format!("e{i}"))).collect();
        let o: Vec<Observation> = es
            .iter()
            .enumerate()
            .map(|(i, e)| obs(i as u128 + 1, i as i64, &[u.clone(), e.clone()]))
            .collect();
        let (g, out) = derive(&rules(), &Severed::default(), &o);
        assert_eq!(g.profile_of(&es[1]), Some(u.profile_id()));
        assert_eq!(g.profile_of(&es[2]), None, "the third email stays alone");
        assert_eq!(out.refusals.len(), 1);
        assert_eq!(out.refusals[0].reason, Reason::Limit(Kind::Id(Email)));
        assert_eq!(out.refusals[0].key, es[2]);
    }

    #[test]
    fn blocked_values_never_link() {
        let mut r = rules();
        let junk = key(Email, "test@example.com");
        r.blocked.insert(junk.clone());
        let (a1, a2) = (key(Anon, "a1"), key(Anon, "a2"));
        let (g, out) = derive(
            &r,
            &Severed::default(),
            &[
                obs(1, 1, &[a1.clone(), junk.clone()]),
                obs(2, 2, &[a2.clone(), junk.clone()]),
            ],
        );
        assert_ne!(g.profile_of(&a1), g.profile_of(&a2));
        assert_eq!(out.refusals.len(), 2);
        assert!(out
            .refusals
            .iter()
            .all(|r| r.reason == Reason::Blocked && r.key == junk));
        assert!(out.links.is_empty());
    }

    #[test]
    fn an_identifier_unseen_for_its_ttl_does_not_link_until_seen_again() {
        let mut r = rules();
        r.ttl.insert(Kind::Id(Anon), 100);
        let (a, e1, e2) = (key(Anon, "a"), key(Email, "e1"), key(Email, "e2"));
        let (g, out) = derive(
            &r,
            &Severed::default(),
            &[
                obs(1, 0, std::slice::from_ref(&a)),
                obs(2, 500, &[e1.clone(), a.clone()]),
                obs(3, 550, &[e2.clone(), a.clone()]),
            ],
        );
        assert_eq!(out.refusals.len(), 1);
        assert_eq!(out.refusals[0].reason, Reason::Expired);
        assert_eq!(out.refusals[0].key, a);
        assert_ne!(g.profile_of(&e1), g.profile_of(&a));
        assert_eq!(
            g.profile_of(&e2),
            g.profile_of(&a),
            "seen again: links again"
        );
    }

    #[test]
    fn severing_an_identifier_re_derives_the_profiles_without_it() {
        let junk = key(Email, "junk");
        let o: Vec<Observation> = (0..10u128)
            .flat_map(|p| {
                let a = key(Anon, &format!("a{p}"));
                let d = key(IdentifierKind::DeviceId, &format!("d{p}"));
                [
                    obs(p * 2 + 1, (p * 2) as i64, &[a.clone(), d]),
                    obs(p * 2 + 2, (p * 2 + 1) as i64, &[a, junk.clone()]),
                ]
            })
            .collect();
        let mut r = rules();
        r.limits.clear();
        let (g, _) = derive(&r, &Severed::default(), &o);
        let merged: BTreeSet<Option<Uuid>> = (0..10)
            .map(|p| g.profile_of(&key(Anon, &format!("a{p}"))))
            .collect();
        assert_eq!(merged.len(), 1, "the junk email merges everyone");
        let severed = Severed {
            keys: [junk].into(),
            ..Severed::default()
        };
        let (g, _) = derive(&r, &severed, &o);
        for p in 0..10 {
            let a = key(Anon, &format!("a{p}"));
            let d = key(IdentifierKind::DeviceId, &format!("d{p}"));
            assert_eq!(g.profile_of(&a), Some(a.profile_id()));
            assert_eq!(
                g.profile_of(&d),
                Some(a.profile_id()),
                "not one profile per identifier"
            );
        }
    }

    #[test]
    fn a_subject_id_outside_the_identifiers_is_its_own_node() {
        let o = Observation::new(Uuid::from_u128(1), 0, "s1", vec![key(Email, "e")]);
        assert_eq!(o.subject, Key::new(Kind::Subject, None, "s1"));
        assert_eq!(o.keys.len(), 2);
    }
}
