//! The graph in Postgres: loading components and observations for [`resolve`], and writing
//! an outcome back, inside the batch's transaction.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::cache::{CachedNode, GraphCache, Written};
use crate::graph::{Applied, Key, Kind, Micros, Observation, Position, Refusal, Seen, Severed};
use crate::resolve::{Outcome, Source};

/// Serializes the graph's writers (replicas of the service, and operator splits).
pub async fn lock_graph(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.identity_graph'))")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn micros(t: DateTime<Utc>) -> Micros {
    t.timestamp_micros()
}

fn time(m: Micros) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(m).unwrap_or_default()
}

type NodeRow = (
    i64,
    String,
    String,
    String,
    i64,
    Option<Uuid>,
    Option<DateTime<Utc>>,
    Option<Uuid>,
    Option<DateTime<Utc>>,
    Option<Uuid>,
    bool,
    Option<DateTime<Utc>>,
    Option<Uuid>,
);

/// event id, time, subject node, nodes, nodes blocked in the event.
type ObservationRow = (Uuid, DateTime<Utc>, i64, Vec<i64>, Vec<i64>);

const NODE_COLUMNS: &str =
    "n.node_id, n.kind, n.namespace, n.token, coalesce(n.label, n.node_id), n.profile_id,
     n.first_at, n.first_event, n.last_at, n.last_event, n.subject, n.link_at, n.link_event";

/// The graph's rows a batch reads and writes, keyed both ways.
pub struct PgGraph<'c> {
    tx: &'c mut PgConnection,
    ids: HashMap<Key, i64>,
    keys: HashMap<i64, Key>,
    /// What each loaded node's row held, to write only the rows that change.
    stored: HashMap<Key, CachedNode>,
    /// Nodes this transaction created: components of their own, nothing seen yet.
    created: HashSet<i64>,
    cache: Option<GraphCache>,
    /// What resolution read, for the per-batch debug line.
    pub reads: Reads,
}

/// Time spent and rows read by resolution's reads of one batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reads {
    pub bound: std::time::Duration,
    pub components: std::time::Duration,
    pub component_rows: usize,
    /// Nodes of components served by the process's cache.
    pub cached_rows: usize,
    pub observations: std::time::Duration,
    pub observation_rows: usize,
}

fn key_of(kind: &str, namespace: String, token: String) -> Option<Key> {
    Kind::parse(kind).map(|kind| Key {
        kind,
        namespace,
        token,
    })
}

fn columns(keys: &[Key]) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
    (
        keys.iter().map(|k| k.kind.as_str()).collect(),
        keys.iter().map(|k| k.namespace.as_str()).collect(),
        keys.iter().map(|k| k.token.as_str()).collect(),
    )
}

impl<'c> PgGraph<'c> {
    pub fn new(tx: &'c mut PgConnection) -> Self {
        Self {
            tx,
            ids: HashMap::new(),
            keys: HashMap::new(),
            stored: HashMap::new(),
            created: HashSet::new(),
            cache: None,
            reads: Reads::default(),
        }
    }

    /// A graph that serves components from `cache` where it can; call it holding the graph
    /// lock. The cache is brought in line with the stored graph first.
    pub async fn cached(tx: &'c mut PgConnection, cache: &GraphCache) -> Result<Self, sqlx::Error> {
        let mut g = Self::new(tx);
        if cache.enabled() {
            let token: Option<(Uuid,)> = sqlx::query_as("SELECT token FROM identity_graph_version")
                .fetch_optional(&mut *g.tx)
                .await?;
            cache.reconcile(token.map(|t| t.0));
            g.cache = Some(cache.clone());
        }
        Ok(g)
    }

    pub fn conn(&mut self) -> &mut PgConnection {
        self.tx
    }

    /// Creates the nodes that do not exist yet and learns every key's node id.
    pub async fn ensure(&mut self, keys: &[Key]) -> Result<(), sqlx::Error> {
        let missing: Vec<Key> = keys
            .iter()
            .filter(|k| !self.ids.contains_key(*k))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let (kinds, namespaces, tokens) = columns(&missing);
        let rows: Vec<(i64, String, String, String, bool)> = sqlx::query_as(
            "WITH k AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, namespace, token)),
             ins AS (
                INSERT INTO identity_nodes (kind, namespace, token)
                SELECT kind, namespace, token FROM k ORDER BY kind, namespace, token
                ON CONFLICT DO NOTHING
                RETURNING node_id, kind, namespace, token)
             SELECT node_id, kind, namespace, token, true FROM ins
             UNION ALL
             SELECT n.node_id, n.kind, n.namespace, n.token, false
               FROM identity_nodes n JOIN k USING (kind, namespace, token)",
        )
        .bind(&kinds)
        .bind(&namespaces)
        .bind(&tokens)
        .fetch_all(&mut *self.tx)
        .await?;
        let mut known = Vec::with_capacity(rows.len());
        for (id, kind, ns, token, new) in rows {
            if new {
                self.created.insert(id);
            }
            known.push((id, kind, ns, token));
        }
        self.remember_all(known);
        Ok(())
    }

    /// Learns a node's id and key, both ways.
    fn remember(&mut self, id: i64, key: Key) {
        self.ids.insert(key.clone(), id);
        self.keys.insert(id, key);
    }

    fn remember_all(&mut self, rows: Vec<(i64, String, String, String)>) {
        for (id, kind, ns, token) in rows {
            if let Some(k) = key_of(&kind, ns, token) {
                self.remember(id, k);
            }
        }
    }

    fn ids_of(&self, keys: &[Key]) -> Vec<i64> {
        keys.iter()
            .filter_map(|k| self.ids.get(k).copied())
            .collect()
    }

    /// Nodes by id (learning their keys).
    async fn learn(&mut self, ids: &[i64]) -> Result<(), sqlx::Error> {
        let missing: Vec<i64> = ids
            .iter()
            .filter(|i| !self.keys.contains_key(*i))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
            "SELECT node_id, kind, namespace, token FROM identity_nodes WHERE node_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *self.tx)
        .await?;
        self.remember_all(rows);
        Ok(())
    }

    /// Event ids of these that were resolved before (duplicates).
    pub async fn known_events(&mut self, ids: &[Uuid]) -> Result<HashSet<Uuid>, sqlx::Error> {
        let rows: Vec<(Uuid,)> =
            sqlx::query_as("SELECT event_id FROM identity_observations WHERE event_id = ANY($1)")
                .bind(ids)
                .fetch_all(&mut *self.tx)
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The operator's severances.
    pub async fn severed(&mut self) -> Result<Severed, sqlx::Error> {
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT node, other_node FROM identity_severed")
            .fetch_all(&mut *self.tx)
            .await?;
        if rows.is_empty() {
            return Ok(Severed::default());
        }
        let ids: Vec<i64> = rows.iter().flat_map(|(a, b)| [*a, *b]).collect();
        self.learn(&ids).await?;
        let mut s = Severed::default();
        for (a, b) in rows {
            let Some(ka) = self.keys.get(&a).cloned() else {
                continue;
            };
            if b == 0 {
                s.keys.insert(ka);
            } else if let Some(kb) = self.keys.get(&b) {
                s.pairs.insert(Severed::pair(&ka, kb));
            }
        }
        Ok(s)
    }

    /// Writes what resolving a batch produced: the batch's observations, links and refusals
    /// (replacing those of a re-derived part), and every node whose row changed.
    pub async fn commit(
        &mut self,
        batch: &[Observation],
        out: &Outcome,
    ) -> Result<CommitStats, sqlx::Error> {
        let mut stats = CommitStats::default();
        let all: Vec<Key> = out.graph.all_keys();
        self.ensure(&all).await?;
        // Observations.
        let mut ev = Vec::with_capacity(batch.len());
        let mut at = Vec::with_capacity(batch.len());
        let mut subject = Vec::with_capacity(batch.len());
        let mut nodes = Vec::with_capacity(batch.len());
        let mut blocked = Vec::with_capacity(batch.len());
        // Postgres has no arrays of ragged arrays: one text literal per observation.
        let literal = |ids: Vec<i64>| {
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            format!("{{{}}}", ids.join(","))
        };
        for o in batch {
            ev.push(o.event_id);
            at.push(time(o.at));
            subject.push(self.ids.get(&o.subject).copied().unwrap_or_default());
            nodes.push(literal(self.ids_of(&o.keys)));
            blocked.push(literal(self.ids_of(&o.blocked)));
        }
        sqlx::query(
            "INSERT INTO identity_observations (event_id, occurred_at, subject, nodes, blocked)
             SELECT e, t, s, n::bigint[], b::bigint[]
               FROM UNNEST($1::uuid[], $2::timestamptz[], $3::bigint[], $4::text[], $5::text[]) AS x(e, t, s, n, b)
             ON CONFLICT DO NOTHING",
        )
        .bind(&ev)
        .bind(&at)
        .bind(&subject)
        .bind(&nodes)
        .bind(&blocked)
        .execute(&mut *self.tx)
        .await?;
        let mut previous_links: HashSet<Uuid> = HashSet::new();
        if let Some(r) = &out.rederived {
            let keys: Vec<Key> = r.keys.iter().cloned().collect();
            let ids = self.ids_of(&keys);
            let gone: Vec<(Uuid,)> = sqlx::query_as(
                "DELETE FROM identity_links WHERE from_node = ANY($1) OR to_node = ANY($1) RETURNING link_id",
            )
            .bind(&ids)
            .fetch_all(&mut *self.tx)
            .await?;
            previous_links.extend(gone.into_iter().map(|g| g.0));
            let events: Vec<Uuid> = r.events.iter().copied().collect();
            sqlx::query("DELETE FROM identity_refusals WHERE event_id = ANY($1)")
                .bind(&events)
                .execute(&mut *self.tx)
                .await?;
            stats.new_links.extend(
                self.store(&r.applied)
                    .await?
                    .into_iter()
                    .filter(|l| !previous_links.contains(l)),
            );
            stats.rederived_nodes = ids.len();
            stats.rederived_events = events.len();
        }
        stats.new_links.extend(self.store(&out.applied).await?);
        stats.refusals = out.applied.refusals.len()
            + out
                .rederived
                .as_ref()
                .map_or(0, |r| r.applied.refusals.len());
        // Nodes whose row changed.
        let mut id = Vec::new();
        let mut label = Vec::new();
        let mut profile: Vec<Option<Uuid>> = Vec::new();
        let mut first_at: Vec<Option<DateTime<Utc>>> = Vec::new();
        let mut first_ev: Vec<Option<Uuid>> = Vec::new();
        let mut last_at: Vec<Option<DateTime<Utc>>> = Vec::new();
        let mut last_ev: Vec<Option<Uuid>> = Vec::new();
        let mut subj = Vec::new();
        let mut link_at: Vec<Option<DateTime<Utc>>> = Vec::new();
        let mut link_ev: Vec<Option<Uuid>> = Vec::new();
        // What the touched components are now, for the cache; `None` if a node is missing.
        let mut written: Option<Written> = Some(Vec::new());
        for a in out.graph.assignments() {
            let (Some(nid), Some(lid)) = (self.ids.get(&a.key), self.ids.get(&a.label)) else {
                written = None;
                continue;
            };
            let now = CachedNode {
                id: *nid,
                label: *lid,
                seen: a.seen,
                profile: a.profile,
            };
            let unchanged = self.stored.get(&a.key) == Some(&now);
            if let Some(w) = &mut written {
                w.push((a.key, now));
            }
            if unchanged {
                continue;
            }
            id.push(*nid);
            label.push(*lid);
            profile.push(a.profile);
            first_at.push(a.seen.map(|s| time(s.first.0)));
            first_ev.push(a.seen.map(|s| s.first.1));
            last_at.push(a.seen.map(|s| time(s.last.0)));
            last_ev.push(a.seen.map(|s| s.last.1));
            subj.push(a.seen.is_some_and(|s| s.subject));
            link_at.push(a.seen.and_then(|s| s.link).map(|l| time(l.0)));
            link_ev.push(a.seen.and_then(|s| s.link).map(|l| l.1));
        }
        stats.nodes_written = id.len();
        sqlx::query(
            "UPDATE identity_nodes n SET label = x.l, profile_id = x.p, first_at = x.fa, first_event = x.fe,
                    last_at = x.la, last_event = x.le, subject = x.s, link_at = x.ka, link_event = x.ke
               FROM UNNEST($1::bigint[], $2::bigint[], $3::uuid[], $4::timestamptz[], $5::uuid[],
                           $6::timestamptz[], $7::uuid[], $8::bool[], $9::timestamptz[], $10::uuid[])
                    AS x(i, l, p, fa, fe, la, le, s, ka, ke)
              WHERE n.node_id = x.i",
        )
        .bind(&id)
        .bind(&label)
        .bind(&profile)
        .bind(&first_at)
        .bind(&first_ev)
        .bind(&last_at)
        .bind(&last_ev)
        .bind(&subj)
        .bind(&link_at)
        .bind(&link_ev)
        .execute(&mut *self.tx)
        .await?;
        // Every write to the graph gets a new token (see crate::cache).
        let token = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO identity_graph_version (single, token) VALUES (true, $1)
             ON CONFLICT (single) DO UPDATE SET token = EXCLUDED.token",
        )
        .bind(token)
        .execute(&mut *self.tx)
        .await?;
        if let Some(c) = &self.cache {
            c.stage(token, written);
        }
        Ok(stats)
    }

    /// Writes links (each pair keeps its earliest event) and refusals; returns the ids of
    /// links that did not exist.
    async fn store(&mut self, a: &Applied) -> Result<Vec<Uuid>, sqlx::Error> {
        let mut link = Vec::new();
        let mut from = Vec::new();
        let mut to = Vec::new();
        let mut cause = Vec::new();
        let mut at = Vec::new();
        let mut earliest: HashMap<Uuid, &crate::graph::Link> = HashMap::new();
        for l in &a.links {
            let e = earliest.entry(l.link_id).or_insert(l);
            if (l.at, l.cause) < (e.at, e.cause) {
                *e = l;
            }
        }
        for l in earliest.into_values() {
            let (Some(f), Some(t)) = (self.ids.get(&l.from), self.ids.get(&l.to)) else {
                continue;
            };
            link.push(l.link_id);
            from.push(*f);
            to.push(*t);
            cause.push(l.cause);
            at.push(time(l.at));
        }
        let written: Vec<(Uuid, bool)> = sqlx::query_as(
            "INSERT INTO identity_links AS l (link_id, from_node, to_node, cause_event_id, occurred_at)
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[], $5::timestamptz[])
             ON CONFLICT (link_id) DO UPDATE SET cause_event_id = EXCLUDED.cause_event_id, occurred_at = EXCLUDED.occurred_at
              WHERE (EXCLUDED.occurred_at, EXCLUDED.cause_event_id) < (l.occurred_at, l.cause_event_id)
             RETURNING link_id, xmax = 0",
        )
        .bind(&link)
        .bind(&from)
        .bind(&to)
        .bind(&cause)
        .bind(&at)
        .fetch_all(&mut *self.tx)
        .await?;
        let inserted: Vec<Uuid> = written
            .into_iter()
            .filter(|(_, new)| *new)
            .map(|(id, _)| id)
            .collect();
        let rows: Vec<&Refusal> = a.refusals.iter().collect();
        let mut ev = Vec::new();
        let mut node = Vec::new();
        let mut other = Vec::new();
        let mut reason = Vec::new();
        let mut kind: Vec<Option<&str>> = Vec::new();
        let mut at = Vec::new();
        for r in rows {
            let (Some(n), Some(o)) = (self.ids.get(&r.key), self.ids.get(&r.other)) else {
                continue;
            };
            ev.push(r.event_id);
            node.push(*n);
            other.push(*o);
            reason.push(r.reason.as_str());
            kind.push(r.reason.kind().map(Kind::as_str));
            at.push(time(r.at));
        }
        sqlx::query(
            "INSERT INTO identity_refusals (event_id, node, other_node, reason, rule_kind, occurred_at)
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::timestamptz[])
             ON CONFLICT DO NOTHING",
        )
        .bind(&ev)
        .bind(&node)
        .bind(&other)
        .bind(&reason)
        .bind(&kind)
        .bind(&at)
        .execute(&mut *self.tx)
        .await?;
        Ok(inserted)
    }
}

/// What a commit wrote.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub new_links: Vec<Uuid>,
    pub refusals: usize,
    pub nodes_written: usize,
    pub rederived_nodes: usize,
    pub rederived_events: usize,
}

fn seen_of(
    first_at: Option<DateTime<Utc>>,
    first_ev: Option<Uuid>,
    last_at: Option<DateTime<Utc>>,
    last_ev: Option<Uuid>,
    subject: bool,
    link: Option<Position>,
) -> Option<Seen> {
    let first: Position = (micros(first_at?), first_ev?);
    let last: Position = (micros(last_at?), last_ev?);
    Some(Seen {
        first,
        last,
        subject,
        link,
    })
}

impl Source for PgGraph<'_> {
    type Error = sqlx::Error;

    async fn bound(&mut self, keys: &[Key]) -> Result<bool, sqlx::Error> {
        let t = std::time::Instant::now();
        let ids = self.ids_of(keys);
        let (bound,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM identity_refusals
                             WHERE (node = ANY($1) OR other_node = ANY($1)) AND reason IN ('unique', 'limit'))",
        )
        .bind(&ids)
        .fetch_one(&mut *self.tx)
        .await?;
        self.reads.bound += t.elapsed();
        Ok(bound)
    }

    async fn link_positions(
        &mut self,
        links: &[Uuid],
    ) -> Result<HashMap<Uuid, Position>, sqlx::Error> {
        let rows: Vec<(Uuid, DateTime<Utc>, Uuid)> = sqlx::query_as(
            "SELECT link_id, occurred_at, cause_event_id FROM identity_links WHERE link_id = ANY($1)",
        )
        .bind(links)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, at, cause)| (id, (micros(at), cause)))
            .collect())
    }

    async fn components(
        &mut self,
        keys: &[Key],
    ) -> Result<Vec<crate::resolve::Members>, sqlx::Error> {
        let t = std::time::Instant::now();
        let (held, keys) = match &self.cache {
            Some(c) => c.components(keys),
            None => (Vec::new(), keys.to_vec()),
        };
        let mut out: Vec<crate::resolve::Members> = Vec::with_capacity(held.len());
        for group in held {
            self.reads.cached_rows += group.len();
            let mut members = Vec::with_capacity(group.len());
            for (k, n) in group {
                self.remember(n.id, k.clone());
                members.push((k.clone(), n.seen));
                self.stored.insert(k, n);
            }
            out.push(members);
        }
        let keys = keys.as_slice();
        self.ensure(keys).await?;
        // A node this transaction created is a component of its own with nothing seen: no
        // need to read it back.
        let mut ids = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(id) = self.ids.get(k).copied() else {
                continue;
            };
            if self.created.contains(&id) {
                self.stored.insert(
                    k.clone(),
                    CachedNode {
                        id,
                        label: id,
                        seen: None,
                        profile: None,
                    },
                );
                out.push(vec![(k.clone(), None)]);
            } else {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            self.reads.components += t.elapsed();
            return Ok(out);
        }
        let rows: Vec<NodeRow> = sqlx::query_as(&format!(
            "SELECT {NODE_COLUMNS} FROM identity_nodes n
              WHERE coalesce(n.label, n.node_id) IN
                    (SELECT coalesce(label, node_id) FROM identity_nodes WHERE node_id = ANY($1))"
        ))
        .bind(&ids)
        .fetch_all(&mut *self.tx)
        .await?;
        self.reads.component_rows += rows.len();
        let mut comps: HashMap<i64, Vec<(Key, Option<Seen>)>> = HashMap::new();
        for (id, kind, ns, token, label, profile, fa, fe, la, le, subject, ka, ke) in rows {
            let Some(k) = key_of(&kind, ns, token) else {
                continue;
            };
            let link = ka.zip(ke).map(|(a, e)| (micros(a), e));
            let seen = seen_of(fa, fe, la, le, subject, link);
            self.remember(id, k.clone());
            self.stored.insert(
                k.clone(),
                CachedNode {
                    id,
                    label,
                    seen,
                    profile,
                },
            );
            comps.entry(label).or_default().push((k, seen));
        }
        self.reads.components += t.elapsed();
        out.extend(comps.into_values());
        Ok(out)
    }

    async fn observations(
        &mut self,
        keys: &[Key],
        singles: &[Key],
    ) -> Result<Vec<Observation>, sqlx::Error> {
        let t = std::time::Instant::now();
        self.ensure(keys).await?;
        let ids = self.ids_of(keys);
        let single_ids = self.ids_of(singles);
        let rows: Vec<ObservationRow> = sqlx::query_as(
            "SELECT event_id, occurred_at, subject, nodes, blocked FROM identity_observations
              WHERE cardinality(nodes) > 1 AND nodes && $1::bigint[]
             UNION ALL
             SELECT event_id, occurred_at, subject, nodes, blocked FROM identity_observations
              WHERE cardinality(nodes) = 1 AND nodes[1] = ANY($2::bigint[])",
        )
        .bind(&ids)
        .bind(&single_ids)
        .fetch_all(&mut *self.tx)
        .await?;
        let referenced: Vec<i64> = rows
            .iter()
            .flat_map(|r| r.3.iter().copied().chain([r.2]))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.learn(&referenced).await?;
        self.reads.observations += t.elapsed();
        self.reads.observation_rows += rows.len();
        Ok(rows
            .into_iter()
            .filter_map(|(event_id, at, subject, nodes, blocked)| {
                let keys = |ids: &[i64]| -> Vec<Key> {
                    ids.iter()
                        .filter_map(|n| self.keys.get(n).cloned())
                        .collect()
                };
                let mut blocked = keys(&blocked);
                blocked.sort();
                Some(Observation {
                    event_id,
                    at: micros(at),
                    subject: self.keys.get(&subject)?.clone(),
                    keys: keys(&nodes),
                    blocked,
                })
            })
            .collect())
    }
}

/// A content digest of the graph: nodes (by key, with profile and seen times), links and
/// refusals, all named by identifier keys (node ids depend on arrival order; these do not).
/// Equal digests mean equal graphs.
pub async fn digest(pool: &sqlx::PgPool) -> Result<String, sqlx::Error> {
    let (d,): (Option<String>,) = sqlx::query_as(
        "SELECT md5(
            coalesce((SELECT string_agg(concat_ws('|', kind, namespace, token, profile_id, first_at, first_event,
                                                  last_at, last_event, subject), E'\\n' ORDER BY kind, namespace, token)
                        FROM identity_nodes WHERE first_at IS NOT NULL), '')
            || '#' ||
            coalesce((SELECT string_agg(concat_ws('|', l.link_id, f.kind, f.token, t.kind, t.token, l.cause_event_id, l.occurred_at),
                                        E'\\n' ORDER BY l.link_id)
                        FROM identity_links l JOIN identity_nodes f ON f.node_id = l.from_node
                        JOIN identity_nodes t ON t.node_id = l.to_node), '')
            || '#' ||
            coalesce((SELECT string_agg(concat_ws('|', r.event_id, n.kind, n.token, o.kind, o.token, r.reason, r.rule_kind),
                                        E'\\n' ORDER BY r.event_id, n.kind, n.token, o.kind, o.token)
                        FROM identity_refusals r JOIN identity_nodes n ON n.node_id = r.node
                        JOIN identity_nodes o ON o.node_id = r.other_node), ''))",
    )
    .fetch_one(pool)
    .await?;
    Ok(d.unwrap_or_default())
}
