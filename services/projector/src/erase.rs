//! Erasure in the read models: when the erasure processor has scoped and shredded a person
//! (`ErasureScoped` on the compliance topic), every row of their profiles goes, their
//! profiles get tombstones on the profiles topic, and the projector answers with
//! `ErasureApplied`. Runs in the batch's transaction, holding the merge lock exclusively:
//! no batch that resolved its profiles (and checked the erasure ledger) before the shred can
//! commit rows for the person after this deletion.

use std::collections::{BTreeMap, BTreeSet};

use cdp_runtime::outbox::{Outbox, Record};
use cdp_schemas::model::compliance::{ErasureApplied, ErasureScoped};
use cdp_schemas::{ComplianceEvent, CompliancePayload};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store;

/// The projector's outbox of records other than profile snapshots (its erasure answers).
pub const OUTBOX: Outbox = Outbox {
    records: "projector_outbox",
    state: "projector_outbox_relay",
};

/// Namespace of the ids of the projector's `ErasureApplied` events (UUIDv5 of the request
/// and the generation: a retried batch writes the same event).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x4f0c_9b62_81d7_4c55_9a1e_3b7d_2e60_0406);

/// What an erasure removed from one generation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Rows deleted per table.
    pub tables: BTreeMap<String, i64>,
    /// Profiles given a tombstone on the profiles topic.
    pub tombstones: i64,
}

impl Removed {
    pub fn rows(&self) -> i64 {
        self.tables.values().sum()
    }
}

/// Deletes everything the read models hold of the scoped profiles and tokens. Idempotent:
/// a second run finds nothing and deletes nothing (it still asks for the tombstones).
pub async fn erase(tx: &mut PgConnection, scoped: &ErasureScoped) -> Result<Removed, sqlx::Error> {
    // The profiles: the scoped ones, those the read model filed the tokens under, and
    // whatever they were merged into or from.
    let claimed: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT profile_id FROM customer_identities WHERE token = ANY($1)",
    )
    .bind(&scoped.tokens)
    .fetch_all(&mut *tx)
    .await?;
    let mut profiles: BTreeSet<Uuid> = scoped.profile_ids.iter().copied().collect();
    profiles.extend(claimed);
    let first: Vec<Uuid> = profiles.iter().copied().collect();
    let merged: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT loser, winner FROM profile_merges WHERE loser = ANY($1) OR winner = ANY($1)",
    )
    .bind(&first)
    .fetch_all(&mut *tx)
    .await?;
    for (loser, winner) in merged {
        profiles.insert(loser);
        profiles.insert(winner);
    }
    let ids: Vec<Uuid> = profiles.into_iter().collect();
    let mut removed = Removed::default();
    let mut count = |table: &str, n: u64| {
        if n > 0 {
            *removed.tables.entry(table.to_owned()).or_default() += n as i64;
        }
    };
    // Capsules the person owns, with their contents (titles, settings and bodies are theirs).
    let n = sqlx::query(
        "DELETE FROM capsule_contents WHERE capsule_id IN
           (SELECT capsule_id FROM capsules WHERE owner_profile_id = ANY($1))",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    count("capsule_contents", n);
    for (table, column) in [
        ("capsules", "owner_profile_id"),
        ("capsule_views", "profile_id"),
        ("interactions", "profile_id"),
        ("transactions", "profile_id"),
        ("consents", "profile_id"),
        ("customer_traits", "profile_id"),
        ("customers", "profile_id"),
    ] {
        let n = sqlx::query(&format!("DELETE FROM {table} WHERE {column} = ANY($1)"))
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        count(table, n);
    }
    let n = sqlx::query(
        "DELETE FROM customer_identities WHERE profile_id = ANY($1) OR token = ANY($2)",
    )
    .bind(&ids)
    .bind(&scoped.tokens)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    count("customer_identities", n);
    let n = sqlx::query("DELETE FROM profile_merges WHERE loser = ANY($1) OR winner = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    count("profile_merges", n);
    // A profile that no longer exists is published as a tombstone.
    store::enqueue(tx, &ids, true).await?;
    removed.tombstones = ids.len() as i64;
    Ok(removed)
}

/// The projector's answer to an erasure, for its outbox.
pub fn applied(
    compliance_topic: &str,
    generation: &str,
    scoped: &ErasureScoped,
    removed: &Removed,
) -> Result<Record, cdp_schemas::CodecError> {
    let event = ComplianceEvent::of_request(
        Uuid::new_v5(
            &EVENT_NAMESPACE,
            format!("{}:{generation}", scoped.request_id).as_bytes(),
        ),
        "cdp-projector",
        Vec::new(),
        CompliancePayload::ErasureApplied(ErasureApplied {
            request_id: scoped.request_id,
            service: "projector".to_owned(),
            rows_deleted: removed.rows(),
            tombstones_emitted: removed.tombstones,
            stores: removed.tables.clone(),
        }),
    );
    Ok(Record::keyed(
        compliance_topic,
        &event.envelope.partition_key,
        cdp_schemas::encode(&event)?,
    ))
}
