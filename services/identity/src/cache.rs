//! A process-local copy of the graph's nodes, grouped by component, so that a batch reads
//! from Postgres only the components this process has not seen yet.
//!
//! It is trusted only while it reflects the stored graph. Every write to the graph sets a new
//! token in `identity_graph_version`, under the graph lock and in the writing transaction.
//! A batch stages what it wrote under its token; the next batch, holding the lock, reads the
//! stored token: if it is the staged one, the write committed and the cache takes it in; if it
//! is the cache's own, the write rolled back and is dropped; anything else means another writer
//! (a second instance, an operator split, a rebuild) and the cache starts over empty. A cached
//! component is always whole: a batch loads and writes whole components.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::graph::{Key, Seen};

/// A node as stored: its id, its component's label (a node id), what was seen of it and its
/// profile.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedNode {
    pub id: i64,
    pub label: i64,
    pub seen: Option<Seen>,
    pub profile: Option<Uuid>,
}

/// Every node of the components a write touched, as it left them.
pub type Written = Vec<(Key, CachedNode)>;

#[derive(Debug, Default)]
struct Inner {
    /// The stored token the cache reflects.
    token: Option<Uuid>,
    nodes: HashMap<Key, CachedNode>,
    members: HashMap<i64, Vec<Key>>,
    /// A write not known to have committed: its token and every node of the components it
    /// touched, or `None` when it could not say (the cache is then dropped if it committed).
    pending: Option<(Uuid, Option<Written>)>,
}

impl Inner {
    fn clear(&mut self) {
        self.nodes.clear();
        self.members.clear();
    }

    /// Forgets a component.
    fn forget(&mut self, label: i64) {
        for k in self.members.remove(&label).unwrap_or_default() {
            self.nodes.remove(&k);
        }
    }

    fn apply(&mut self, nodes: Written, capacity: usize) {
        // The components these nodes were in, and any component already under a label they
        // now carry, are replaced whole.
        let labels: HashSet<i64> = nodes
            .iter()
            .filter_map(|(k, _)| self.nodes.get(k).map(|n| n.label))
            .chain(nodes.iter().map(|(_, n)| n.label))
            .collect();
        for l in labels {
            self.forget(l);
        }
        for (k, n) in nodes {
            self.members.entry(n.label).or_default().push(k.clone());
            self.nodes.insert(k, n);
        }
        if self.nodes.len() > capacity {
            self.clear();
        }
    }
}

/// The cache, shared by the batches of one process. `capacity` nodes at most (it starts over
/// empty when a write takes it past that); 0 turns it off.
#[derive(Clone, Debug)]
pub struct GraphCache {
    inner: Arc<Mutex<Inner>>,
    capacity: usize,
}

/// What [`GraphCache::reconcile`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reconciled {
    /// The cache already reflected the stored graph.
    Kept,
    /// The last staged write committed and is in the cache now.
    Applied,
    /// The stored graph was written by someone else: the cache starts over.
    Cleared,
}

impl GraphCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            capacity,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding it may have left it half-updated: start over.
        self.inner.lock().unwrap_or_else(|poisoned| {
            let mut g = poisoned.into_inner();
            g.clear();
            g.token = None;
            g.pending = None;
            g
        })
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Nodes held.
    pub fn len(&self) -> usize {
        self.inner().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Brings the cache in line with the stored token; call it holding the graph lock.
    pub fn reconcile(&self, stored: Option<Uuid>) -> Reconciled {
        let mut g = self.inner();
        let pending = g.pending.take();
        if let (Some((token, nodes)), Some(s)) = (pending, stored) {
            if token == s {
                g.token = stored;
                match nodes {
                    Some(nodes) => g.apply(nodes, self.capacity),
                    None => g.clear(),
                }
                return Reconciled::Applied;
            }
        }
        if stored.is_some() && g.token == stored {
            return Reconciled::Kept;
        }
        g.clear();
        g.token = stored;
        Reconciled::Cleared
    }

    /// The whole components holding any of these keys, from the cache, and the keys it does
    /// not hold.
    pub fn components(&self, keys: &[Key]) -> (Vec<Vec<(Key, CachedNode)>>, Vec<Key>) {
        let g = self.inner();
        let mut labels = HashSet::new();
        let mut held = Vec::new();
        let mut missing = Vec::new();
        for k in keys {
            let Some(n) = g.nodes.get(k) else {
                missing.push(k.clone());
                continue;
            };
            if !labels.insert(n.label) {
                continue;
            }
            let members = g
                .members
                .get(&n.label)
                .map(Vec::as_slice)
                .unwrap_or_default();
            held.push(
                members
                    .iter()
                    .filter_map(|m| g.nodes.get(m).map(|n| (m.clone(), n.clone())))
                    .collect(),
            );
        }
        (held, missing)
    }

    /// What a write left in the components it touched (every node of them), under the token
    /// it stored; `None` when it cannot say. Taken in by the next [`reconcile`](Self::reconcile)
    /// that finds the token stored.
    pub fn stage(&self, token: Uuid, nodes: Option<Written>) {
        if self.enabled() {
            self.inner().pending = Some((token, nodes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Kind;
    use cdp_schemas::IdentifierKind;

    fn key(h: &str) -> Key {
        Key {
            kind: Kind::Id(IdentifierKind::Email),
            namespace: String::new(),
            token: h.to_owned(),
        }
    }

    fn node(id: i64, label: i64) -> CachedNode {
        CachedNode {
            id,
            label,
            seen: None,
            profile: None,
        }
    }

    fn labels(c: &GraphCache, keys: &[&str]) -> Vec<Vec<(String, i64)>> {
        let keys: Vec<Key> = keys.iter().map(|k| key(k)).collect();
        let (held, _) = c.components(&keys);
        held.into_iter()
            .map(|g| {
                let mut g: Vec<(String, i64)> =
                    g.into_iter().map(|(k, n)| (k.token, n.label)).collect();
                g.sort();
                g
            })
            .collect()
    }

    #[test]
    fn a_staged_write_counts_only_once_its_token_is_stored() {
        let c = GraphCache::new(100);
        let t0 = Uuid::from_u128(1);
        assert_eq!(c.reconcile(Some(t0)), Reconciled::Cleared);
        // Rolled back: the stored token is still the cache's.
        c.stage(Uuid::from_u128(2), Some(vec![(key("a"), node(1, 1))]));
        assert_eq!(c.reconcile(Some(t0)), Reconciled::Kept);
        assert!(c.is_empty());
        // Committed.
        let t1 = Uuid::from_u128(3);
        c.stage(
            t1,
            Some(vec![(key("a"), node(1, 1)), (key("b"), node(2, 1))]),
        );
        assert_eq!(c.reconcile(Some(t1)), Reconciled::Applied);
        assert_eq!(
            labels(&c, &["a"]),
            vec![vec![("a".into(), 1), ("b".into(), 1)]]
        );
        // Someone else wrote.
        assert_eq!(c.reconcile(Some(Uuid::from_u128(4))), Reconciled::Cleared);
        assert!(c.is_empty());
        // A rebuilt schema without the token.
        assert_eq!(c.reconcile(None), Reconciled::Cleared);
        c.stage(Uuid::from_u128(5), Some(vec![(key("a"), node(1, 1))]));
        assert_eq!(c.reconcile(None), Reconciled::Cleared);
        assert!(c.is_empty());
    }

    #[test]
    fn merges_and_splits_replace_whole_components() {
        let c = GraphCache::new(100);
        let mut token = 10u128;
        let mut write = |nodes: Vec<(&str, i64, i64)>| {
            token += 1;
            let t = Uuid::from_u128(token);
            c.stage(
                t,
                Some(
                    nodes
                        .into_iter()
                        .map(|(k, id, l)| (key(k), node(id, l)))
                        .collect(),
                ),
            );
            c.reconcile(Some(t))
        };
        c.reconcile(Some(Uuid::from_u128(10)));
        write(vec![("a", 1, 1), ("b", 2, 1)]);
        write(vec![("c", 3, 3), ("d", 4, 3)]);
        // Merge: {a, b} and {c, d} become one under label 1.
        write(vec![("a", 1, 1), ("b", 2, 1), ("c", 3, 1), ("d", 4, 1)]);
        assert_eq!(
            labels(&c, &["d", "a"]),
            vec![vec![
                ("a".into(), 1),
                ("b".into(), 1),
                ("c".into(), 1),
                ("d".into(), 1)
            ]]
        );
        // Split: c and d leave.
        write(vec![("a", 1, 1), ("b", 2, 1), ("c", 3, 3), ("d", 4, 3)]);
        assert_eq!(
            labels(&c, &["a", "c"]),
            vec![
                vec![("a".into(), 1), ("b".into(), 1)],
                vec![("c".into(), 3), ("d".into(), 3)]
            ]
        );
        let (_, missing) = c.components(&[key("a"), key("z")]);
        assert_eq!(missing, vec![key("z")]);
    }

    #[test]
    fn an_unknown_write_or_overflow_empties_it() {
        let c = GraphCache::new(3);
        c.reconcile(Some(Uuid::from_u128(1)));
        c.stage(Uuid::from_u128(2), Some(vec![(key("a"), node(1, 1))]));
        c.reconcile(Some(Uuid::from_u128(2)));
        assert_eq!(c.len(), 1);
        c.stage(Uuid::from_u128(3), None);
        assert_eq!(c.reconcile(Some(Uuid::from_u128(3))), Reconciled::Applied);
        assert!(c.is_empty());
        let nodes = (0..4).map(|i| (key(&i.to_string()), node(i, i))).collect();
        c.stage(Uuid::from_u128(4), Some(nodes));
        c.reconcile(Some(Uuid::from_u128(4)));
        assert!(c.is_empty(), "past capacity it starts over");
        let off = GraphCache::new(0);
        off.reconcile(Some(Uuid::from_u128(1)));
        off.stage(Uuid::from_u128(2), Some(vec![(key("a"), node(1, 1))]));
        assert_eq!(off.reconcile(Some(Uuid::from_u128(2))), Reconciled::Cleared);
        assert!(off.is_empty());
    }
}
