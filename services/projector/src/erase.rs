//! Erasure in the read models: when the erasure processor has scoped and shredded a person
//! (`ErasureScoped` on the compliance topic), every row of their profiles goes (in every
//! generation: the live one and the retired ones it scrubs, and each building one itself),
//! their profiles get tombstones on the profiles topic, and the projector answers with
//! `ErasureApplied`: as `projector` from the live generation, as `projector.g<N>` from a
//! building one or a retired one (a swap overtook the projector still running it), whose
//! answers the processor records but does not wait for. So a request completes only once the
//! generation the read views show was scrubbed: the live generation reads the request itself
//! (its position is before it, or the processor asks again). Runs in the batch's transaction, holding the merge lock exclusively:
//! no batch that resolved its profiles (and checked the erasure ledger) before the shred can
//! commit rows for the person after this deletion.

use std::collections::{BTreeMap, BTreeSet};

use cdp_runtime::outbox::{Outbox, Record, Release};
use cdp_schemas::model::compliance::{ErasureApplied, ErasureScoped};
use cdp_schemas::{ComplianceEvent, CompliancePayload};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store;

/// The projector's outbox of records other than profile snapshots (its erasure answers),
/// gated by the profile queue: an answer leaves once the tombstones it speaks for are
/// published.
pub const OUTBOX: Outbox = Outbox {
    records: "projector_outbox",
    state: "projector_outbox_relay",
    gate: Some("profile_outbox"),
};

/// Namespace of the ids of the projector's `ErasureApplied` events (UUIDv5 of the request
/// and the generation: a retried batch writes the same event).
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x4f0c_9b62_81d7_4c55_9a1e_3b7d_2e60_0406);

/// What an erasure removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Rows deleted per table (`g<N>.<table>` for a retired generation's tables).
    pub tables: BTreeMap<String, i64>,
    /// Profiles given a tombstone on the profiles topic.
    pub tombstones: i64,
}

impl Removed {
    pub fn rows(&self) -> i64 {
        self.tables.values().sum()
    }
}

/// Which generation a handler projects into: its answers and what it scrubs depend on
/// whether that generation is the live one.
#[derive(Debug, Clone)]
pub struct Role {
    pub prefix: String,
    pub number: i32,
}

/// Whether the handler's generation is the live one, read under a share lock on its row so
/// that a swap waits for the erasure's transaction (and the transaction for the swap). A
/// building generation is not live yet; a retired one no longer is (a swap overtook the
/// projector still running it).
pub async fn is_live(tx: &mut PgConnection, role: &Role) -> Result<bool, sqlx::Error> {
    let state: Option<String> = sqlx::query_scalar(
        "SELECT state FROM projector_generations WHERE prefix = $1 AND generation = $2 FOR SHARE",
    )
    .bind(&role.prefix)
    .bind(role.number)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(state.as_deref() == Some("live"))
}

/// Deletes everything the read models hold of the scoped profiles and tokens: in this
/// generation (whose profiles get tombstones) and, when it is the live one, in every retired
/// generation of the prefix (kept for rollback, not published, so scrubbed here). Idempotent: a second run finds nothing and deletes nothing (it still
/// asks for the tombstones).
pub async fn erase(
    tx: &mut PgConnection,
    role: &Role,
    live: bool,
    scoped: &ErasureScoped,
) -> Result<Removed, sqlx::Error> {
    let mut removed = Removed::default();
    let own = format!("{}_g{}", role.prefix, role.number);
    let ids = delete_in(tx, &own, "", scoped, &mut removed).await?;
    // A profile that no longer exists is published as a tombstone.
    store::enqueue(tx, &ids, true).await?;
    removed.tombstones = ids.len() as i64;
    if live {
        let retired: Vec<i32> = sqlx::query_scalar(
            "SELECT generation FROM projector_generations
              WHERE prefix = $1 AND state = 'retired' ORDER BY generation",
        )
        .bind(&role.prefix)
        .fetch_all(&mut *tx)
        .await?;
        for n in retired {
            let schema = format!("{}_g{n}", role.prefix);
            delete_in(tx, &schema, &format!("g{n}."), scoped, &mut removed).await?;
        }
    }
    Ok(removed)
}

/// Deletes the person's rows from one generation's schema (tables it lacks, being older,
/// are skipped); returns the profiles it found.
async fn delete_in(
    tx: &mut PgConnection,
    schema: &str,
    label: &str,
    scoped: &ErasureScoped,
    removed: &mut Removed,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let present: BTreeSet<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(schema)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let has = |t: &str| present.contains(t);
    let q = |t: &str| format!("\"{schema}\".{t}");
    // The profiles: the scoped ones, those the read model filed the tokens under, and
    // whatever they were merged into or from.
    let mut profiles: BTreeSet<Uuid> = scoped.profile_ids.iter().copied().collect();
    if has("customer_identities") {
        let claimed: Vec<Uuid> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT profile_id FROM {} WHERE token = ANY($1)",
            q("customer_identities")
        ))
        .bind(&scoped.tokens)
        .fetch_all(&mut *tx)
        .await?;
        profiles.extend(claimed);
    }
    if has("profile_merges") {
        let first: Vec<Uuid> = profiles.iter().copied().collect();
        let merged: Vec<(Uuid, Uuid)> = sqlx::query_as(&format!(
            "SELECT loser, winner FROM {} WHERE loser = ANY($1) OR winner = ANY($1)",
            q("profile_merges")
        ))
        .bind(&first)
        .fetch_all(&mut *tx)
        .await?;
        for (loser, winner) in merged {
            profiles.insert(loser);
            profiles.insert(winner);
        }
    }
    let ids: Vec<Uuid> = profiles.into_iter().collect();
    let mut count = |table: &str, n: u64| {
        if n > 0 {
            *removed.tables.entry(format!("{label}{table}")).or_default() += n as i64;
        }
    };
    // Capsules the person owns, with their contents (titles, settings and bodies are theirs).
    if has("capsule_contents") && has("capsules") {
        let n = sqlx::query(&format!(
            "DELETE FROM {} WHERE capsule_id IN
               (SELECT capsule_id FROM {} WHERE owner_profile_id = ANY($1))",
            q("capsule_contents"),
            q("capsules")
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        count("capsule_contents", n);
    }
    for (table, column) in [
        ("capsules", "owner_profile_id"),
        ("capsule_views", "profile_id"),
        ("interactions", "profile_id"),
        ("transactions", "profile_id"),
        ("consents", "profile_id"),
        ("customer_traits", "profile_id"),
        ("customers", "profile_id"),
    ] {
        if !has(table) {
            continue;
        }
        let n = sqlx::query(&format!(
            "DELETE FROM {} WHERE {column} = ANY($1)",
            q(table)
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        count(table, n);
    }
    if has("customer_identities") {
        let n = sqlx::query(&format!(
            "DELETE FROM {} WHERE profile_id = ANY($1) OR token = ANY($2)",
            q("customer_identities")
        ))
        .bind(&ids)
        .bind(&scoped.tokens)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        count("customer_identities", n);
    }
    if has("profile_merges") {
        let n = sqlx::query(&format!(
            "DELETE FROM {} WHERE loser = ANY($1) OR winner = ANY($1)",
            q("profile_merges")
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        count("profile_merges", n);
    }
    Ok(ids)
}

/// The answer of a generation (`live` or not) to an erasure, for its outbox: a barrier
/// behind the tombstones up to `gate` in the profile queue.
pub fn applied(
    compliance_topic: &str,
    role: &Role,
    live: bool,
    gate: i64,
    scoped: &ErasureScoped,
    removed: &Removed,
) -> Result<Record, cdp_schemas::CodecError> {
    let service = if live {
        "projector".to_owned()
    } else {
        format!("projector.g{}", role.number)
    };
    let event = ComplianceEvent::of_request(
        Uuid::new_v5(
            &EVENT_NAMESPACE,
            format!("{}:{}_g{}", scoped.request_id, role.prefix, role.number).as_bytes(),
        ),
        "cdp-projector",
        Vec::new(),
        CompliancePayload::ErasureApplied(ErasureApplied {
            request_id: scoped.request_id,
            service,
            rows_deleted: removed.rows(),
            tombstones_emitted: removed.tombstones,
            stores: removed.tables.clone(),
        }),
    );
    Ok(Record::keyed(
        compliance_topic,
        &event.envelope.partition_key,
        cdp_schemas::encode(&event)?,
    )
    .released(Release::BarrierAfterGate(gate)))
}
