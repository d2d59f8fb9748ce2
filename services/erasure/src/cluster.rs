//! Who a request erases: the whole cluster of the identifiers and profiles it names, as the
//! identity graph knows it (the identity service's tables, a documented contract: nodes
//! with their component label and profile).
//!
//! A component is every node sharing a label, so it includes the subjects whose profiles
//! were merged away: each subject's own profile is the UUIDv5 of its token. Links identity's
//! rules refused (blocked values, unique kinds, limits, operator splits) are counted and not
//! followed: they join the person to someone else. The graph lock is held while reading,
//! so no link can join the cluster between this read and the shred in the same transaction.

use std::collections::BTreeSet;

use cdp_schemas::profile_id_of;
use sqlx::PgConnection;
use uuid::Uuid;

/// A person's cluster.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Every identifier and subject token.
    pub tokens: BTreeSet<String>,
    /// Every profile: current and merged away.
    pub profiles: BTreeSet<Uuid>,
    /// Links identity refused between the cluster and other nodes.
    pub refused_links: i64,
}

impl Cluster {
    /// A token the graph does not know may still be a subject (one seen only in capsule
    /// events, or events identity has not read yet): its own profile is in the cluster.
    fn own_profiles(&mut self, tokens: &[String]) {
        self.profiles
            .extend(tokens.iter().map(|t| profile_id_of(t)));
    }
}

/// Resolves the cluster of `tokens` and `profiles` from the identity graph in `schema`
/// (absent when identity is not deployed: then the cluster is what the request named).
pub async fn resolve(
    tx: &mut PgConnection,
    schema: &str,
    tokens: &[String],
    profiles: &[Uuid],
) -> Result<Cluster, sqlx::Error> {
    let mut cluster = Cluster {
        tokens: tokens.iter().cloned().collect(),
        profiles: profiles.iter().copied().collect(),
        refused_links: 0,
    };
    let graph: Option<String> =
        sqlx::query_scalar("SELECT to_regclass(format('%I.identity_nodes', $1::text))::text")
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
    if graph.is_none() {
        cluster.own_profiles(tokens);
        return Ok(cluster);
    }
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '.identity_graph'))")
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    let rows: Vec<(i64, String, bool, Option<Uuid>)> = sqlx::query_as(&format!(
        "WITH start AS (
             SELECT DISTINCT coalesce(label, node_id) AS l FROM \"{schema}\".identity_nodes
              WHERE token = ANY($1) OR profile_id = ANY($2))
         SELECT node_id, token, subject, profile_id FROM \"{schema}\".identity_nodes
          WHERE coalesce(label, node_id) IN (SELECT l FROM start)"
    ))
    .bind(tokens)
    .bind(profiles)
    .fetch_all(&mut *tx)
    .await?;
    let mut nodes = Vec::with_capacity(rows.len());
    let known: BTreeSet<&str> = rows.iter().map(|(_, t, _, _)| t.as_str()).collect();
    let unknown: Vec<String> = tokens
        .iter()
        .filter(|t| !known.contains(t.as_str()))
        .cloned()
        .collect();
    cluster.own_profiles(&unknown);
    for (node, token, subject, profile) in rows {
        if subject {
            cluster.profiles.insert(profile_id_of(&token));
        }
        cluster.profiles.extend(profile);
        cluster.tokens.insert(token);
        nodes.push(node);
    }
    cluster.refused_links = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".identity_refusals
          WHERE (node = ANY($1)) <> (other_node = ANY($1))"
    ))
    .bind(&nodes)
    .fetch_one(&mut *tx)
    .await?;
    Ok(cluster)
}
