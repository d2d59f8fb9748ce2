//! Erasure in the identity graph: when the erasure processor has scoped and shredded a
//! person (`ErasureScoped` on the compliance topic), their nodes, observations, links,
//! refusals, severed notes and duplicate candidates go; every key the identity topic holds
//! for them (their links, their profiles' merges and splits) gets a tombstone; and identity
//! answers with `ErasureApplied`. Runs in the batch's transaction under the graph lock.
//!
//! The processor scopes whole components (every node sharing a label with a named one),
//! so no remaining component loses a link and none needs re-deriving. Observations of other
//! subjects that carried a node of the person (links the rules refused) keep their other
//! nodes.

use std::collections::{BTreeMap, BTreeSet};

use cdp_runtime::outbox::{Record, Release};
use cdp_schemas::model::compliance::{ErasureApplied, ErasureScoped};
use cdp_schemas::{ComplianceEvent, CompliancePayload};
use sqlx::PgConnection;
use uuid::Uuid;

/// Namespace of the ids of identity's `ErasureApplied` events (UUIDv5 of the request: a
/// retried batch writes the same event).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x9d3a_61f0_0c84_4b6e_b2d5_71c8_3e0a_0507);

/// What an erasure removed from the graph.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Rows deleted per table.
    pub tables: BTreeMap<String, i64>,
    /// The identity topic's keys to tombstone: link ids and profile ids.
    pub keys: BTreeSet<String>,
}

impl Removed {
    pub fn rows(&self) -> i64 {
        self.tables.values().sum()
    }
}

/// Deletes the scoped tokens' nodes and everything about them. Idempotent: a second run
/// finds nothing (it still names the profiles' keys for tombstones).
pub async fn erase(tx: &mut PgConnection, scoped: &ErasureScoped) -> Result<Removed, sqlx::Error> {
    let nodes: Vec<(i64, Option<Uuid>)> = sqlx::query_as(
        "SELECT node_id, profile_id FROM identity_nodes WHERE token = ANY($1) OR profile_id = ANY($2)",
    )
    .bind(&scoped.tokens)
    .bind(&scoped.profile_ids)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<i64> = nodes.iter().map(|(n, _)| *n).collect();
    let mut profiles: BTreeSet<Uuid> = scoped.profile_ids.iter().copied().collect();
    profiles.extend(nodes.iter().filter_map(|(_, p)| *p));
    let profiles: Vec<Uuid> = profiles.into_iter().collect();
    let mut removed = Removed::default();
    let mut count = |table: &str, n: u64| {
        if n > 0 {
            *removed.tables.entry(table.to_owned()).or_default() += n as i64;
        }
    };
    let links: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM identity_links WHERE from_node = ANY($1) OR to_node = ANY($1) RETURNING link_id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    count("identity_links", links.len() as u64);
    let n = sqlx::query("DELETE FROM identity_observations WHERE subject = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    count("identity_observations", n);
    // Other subjects' observations that carried one of the nodes (a refused link) keep the
    // rest of what they observed, in order.
    let n = sqlx::query(
        "UPDATE identity_observations
            SET nodes = ARRAY(SELECT x FROM unnest(nodes) WITH ORDINALITY u(x, i)
                               WHERE x <> ALL($1) ORDER BY i),
                blocked = ARRAY(SELECT x FROM unnest(blocked) WITH ORDINALITY u(x, i)
                                 WHERE x <> ALL($1) ORDER BY i)
          WHERE nodes && $1 OR blocked && $1",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tracing::debug!(observations = n, "other subjects' observations scrubbed");
    for (table, sql) in [
        (
            "identity_refusals",
            "DELETE FROM identity_refusals WHERE node = ANY($1) OR other_node = ANY($1)",
        ),
        (
            "identity_severed",
            "DELETE FROM identity_severed WHERE node = ANY($1) OR other_node = ANY($1)",
        ),
        (
            "identity_nodes",
            "DELETE FROM identity_nodes WHERE node_id = ANY($1)",
        ),
    ] {
        let n = sqlx::query(sql)
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        count(table, n);
    }
    let n = sqlx::query(
        "DELETE FROM identity_candidates WHERE profile_a = ANY($1) OR profile_b = ANY($1)",
    )
    .bind(&profiles)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    count("identity_candidates", n);
    // Every write to the graph gets a new version: other processes drop their caches.
    sqlx::query(
        "INSERT INTO identity_graph_version (single, token) VALUES (true, gen_random_uuid())
         ON CONFLICT (single) DO UPDATE SET token = EXCLUDED.token",
    )
    .execute(&mut *tx)
    .await?;
    // Links are keyed by link id; merges by the loser's profile, splits by the new one.
    removed.keys = links.iter().chain(&profiles).map(Uuid::to_string).collect();
    Ok(removed)
}

/// The tombstones and the answer to the processor, for the outbox. The answer is a
/// barrier: it leaves once the tombstones are published and gone from the outbox, so a
/// completed erasure has nothing of the person left there.
pub fn records(
    identity_topic: &str,
    compliance_topic: &str,
    scoped: &ErasureScoped,
    removed: &Removed,
) -> Result<Vec<Record>, cdp_schemas::CodecError> {
    let mut out: Vec<Record> = removed
        .keys
        .iter()
        .map(|k| Record::tombstone(identity_topic, k.as_bytes()))
        .collect();
    let event = ComplianceEvent::of_request(
        Uuid::new_v5(&EVENT_NAMESPACE, scoped.request_id.as_bytes()),
        "cdp-identity",
        Vec::new(),
        CompliancePayload::ErasureApplied(ErasureApplied {
            request_id: scoped.request_id,
            service: "identity".to_owned(),
            rows_deleted: removed.rows(),
            tombstones_emitted: removed.keys.len() as i64,
            stores: removed.tables.clone(),
        }),
    );
    // The answer leaves after the tombstones are published and out of the outbox.
    out.push(
        Record::keyed(
            compliance_topic,
            &event.envelope.partition_key,
            cdp_schemas::encode(&event)?,
        )
        .released(Release::Barrier),
    );
    Ok(out)
}
