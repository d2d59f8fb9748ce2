//! The SQL that applies a batch's rows: one multi-row statement per table, each guarded so
//! that re-applying or applying out of order converges to the same rows.

use std::collections::HashMap;
use std::fmt::Write;

use sqlx::postgres::PgArguments;
use sqlx::{Arguments, Encode, PgConnection, Postgres, Type};
use uuid::Uuid;

use crate::rows::Rows;

type Db = Result<(), sqlx::Error>;

/// The guards that make per-profile rows order-independent; merges and batches use the same.
const TRAITS_CONFLICT: &str = "ON CONFLICT (profile_id, trait) DO UPDATE SET value = EXCLUDED.value, sealed = EXCLUDED.sealed,
     subject_id = EXCLUDED.subject_id, asserted_at = EXCLUDED.asserted_at, event_id = EXCLUDED.event_id
 WHERE (EXCLUDED.asserted_at, EXCLUDED.event_id) > (customer_traits.asserted_at, customer_traits.event_id)";

const CONSENTS_CONFLICT: &str = "ON CONFLICT (profile_id, purpose) DO UPDATE SET status = EXCLUDED.status, basis = EXCLUDED.basis,
     policy_version = EXCLUDED.policy_version, changed_at = EXCLUDED.changed_at, evidence_event_id = EXCLUDED.evidence_event_id
 WHERE (EXCLUDED.changed_at, EXCLUDED.evidence_event_id) > (consents.changed_at, consents.evidence_event_id)";

const CUSTOMERS_CONFLICT: &str = "ON CONFLICT (profile_id) DO UPDATE SET
     data_source = CASE WHEN (EXCLUDED.first_seen, EXCLUDED.first_event_id) < (customers.first_seen, customers.first_event_id)
                        THEN EXCLUDED.data_source ELSE customers.data_source END,
     first_event_id = CASE WHEN (EXCLUDED.first_seen, EXCLUDED.first_event_id) < (customers.first_seen, customers.first_event_id)
                        THEN EXCLUDED.first_event_id ELSE customers.first_event_id END,
     first_seen = LEAST(customers.first_seen, EXCLUDED.first_seen),
     last_seen = GREATEST(customers.last_seen, EXCLUDED.last_seen)
 WHERE EXCLUDED.last_seen > customers.last_seen
    OR (EXCLUDED.first_seen, EXCLUDED.first_event_id) < (customers.first_seen, customers.first_event_id)";

/// Takes this generation's merge lock for the transaction: exclusively for a batch that
/// applies merges or splits, shared by every other batch. So no merge or split commits
/// between a batch resolving its profiles and committing its rows: a row written for a loser
/// after the merge had re-pointed the loser's rows would stay behind (projector instances
/// share the partitions, and a merge is applied by whichever reads it).
pub async fn hold_merges(tx: &mut PgConnection, reshapes: bool) -> Db {
    let lock = if reshapes {
        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.merges'))"
    } else {
        "SELECT pg_advisory_xact_lock_shared(hashtext(current_schema() || '.merges'))"
    };
    sqlx::query(lock).execute(&mut *tx).await?;
    Ok(())
}

/// Follows the merges: the profile each of `ids` belongs to now.
pub async fn resolve(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Uuid>, sqlx::Error> {
    let rows: Vec<(Uuid, Uuid)> =
        sqlx::query_as("SELECT loser, winner FROM profile_merges WHERE loser = ANY($1)")
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Applies one merge: the loser's rows now belong to the winner. Idempotent.
pub async fn merge(
    tx: &mut PgConnection,
    loser: Uuid,
    winner: Uuid,
    link_id: Uuid,
    cause: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    // A merge the other way round (the identity graph re-derived which subject came first):
    // the winner stops being the loser's loser.
    sqlx::query("DELETE FROM profile_merges WHERE loser = $1 AND winner = $2")
        .bind(winner)
        .bind(loser)
        .execute(&mut *tx)
        .await?;
    // Where the winner itself went, and whether this merge is new.
    let winner = resolve(tx, &[winner])
        .await?
        .get(&winner)
        .copied()
        .unwrap_or(winner);
    if winner == loser {
        return Ok(None);
    }
    let inserted = sqlx::query(
        "INSERT INTO profile_merges (loser, winner, link_id, cause_event_id) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(loser)
    .bind(winner)
    .bind(link_id)
    .bind(cause)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(None);
    }
    // Keep chains flat: whatever was merged into the loser now points at the winner.
    sqlx::query("UPDATE profile_merges SET winner = $2 WHERE winner = $1")
        .bind(loser)
        .bind(winner)
        .execute(&mut *tx)
        .await?;
    for table in [
        "interactions",
        "transactions",
        "capsule_views",
        "customer_identities",
    ] {
        sqlx::query(&format!(
            "UPDATE {table} SET profile_id = $2 WHERE profile_id = $1"
        ))
        .bind(loser)
        .bind(winner)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE capsules SET owner_profile_id = $2 WHERE owner_profile_id = $1")
        .bind(loser)
        .bind(winner)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        &format!(
        "INSERT INTO customer_traits (profile_id, trait, value, sealed, subject_id, asserted_at, event_id)
         SELECT $2, trait, value, sealed, subject_id, asserted_at, event_id FROM customer_traits WHERE profile_id = $1
         {TRAITS_CONFLICT}"
    ),
    )
    .bind(loser)
    .bind(winner)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM customer_traits WHERE profile_id = $1")
        .bind(loser)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        &format!(
        "INSERT INTO consents (profile_id, purpose, status, basis, policy_version, changed_at, evidence_event_id)
         SELECT $2, purpose, status, basis, policy_version, changed_at, evidence_event_id FROM consents WHERE profile_id = $1
         {CONSENTS_CONFLICT}"
    ),
    )
    .bind(loser)
    .bind(winner)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM consents WHERE profile_id = $1")
        .bind(loser)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        &format!(
        "INSERT INTO customers (profile_id, first_seen, last_seen, data_source, first_event_id, active)
         SELECT $2, first_seen, last_seen, data_source, first_event_id, true FROM customers WHERE profile_id = $1
         {CUSTOMERS_CONFLICT}"
    ),
    )
    .bind(loser)
    .bind(winner)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM customers WHERE profile_id = $1")
        .bind(loser)
        .execute(&mut *tx)
        .await?;
    enqueue(tx, &[loser], true).await?;
    enqueue(tx, &[winner], false).await?;
    Ok(Some(winner))
}

/// Applies one split: the subjects `moved` (their own profile ids) left `from` and make up
/// `to`. The rows their events wrote (by origin) and the traits they asserted move with them;
/// consents and capsules stay (they record no origin), and a trait value a merge had
/// superseded is not restored. Idempotent.
pub async fn split(tx: &mut PgConnection, from: Uuid, to: Uuid, moved: &[Uuid], cause: Uuid) -> Db {
    if from == to || moved.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM profile_merges WHERE loser = ANY($1)")
        .bind(moved)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO profile_merges (loser, winner, link_id, cause_event_id)
         SELECT m, $2, $3, $4 FROM UNNEST($1::uuid[]) AS m WHERE m <> $2
         ON CONFLICT (loser) DO UPDATE SET winner = EXCLUDED.winner",
    )
    .bind(moved)
    .bind(to)
    .bind(Uuid::nil())
    .bind(cause)
    .execute(&mut *tx)
    .await?;
    for table in [
        "interactions",
        "transactions",
        "capsule_views",
        "customer_identities",
    ] {
        sqlx::query(&format!(
            "UPDATE {table} SET profile_id = $2 WHERE profile_id = $1 AND origin = ANY($3)"
        ))
        .bind(from)
        .bind(to)
        .bind(moved)
        .execute(&mut *tx)
        .await?;
    }
    // Traits name the subject that asserted them.
    let traits: Vec<(String, String)> =
        sqlx::query_as("SELECT trait, subject_id FROM customer_traits WHERE profile_id = $1")
            .bind(from)
            .fetch_all(&mut *tx)
            .await?;
    let leaving: Vec<String> = traits
        .into_iter()
        .filter(|(_, s)| moved.contains(&cdp_schemas::profile_id_of(s)))
        .map(|(t, _)| t)
        .collect();
    if !leaving.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO customer_traits (profile_id, trait, value, sealed, subject_id, asserted_at, event_id)
             SELECT $2, trait, value, sealed, subject_id, asserted_at, event_id FROM customer_traits
              WHERE profile_id = $1 AND trait = ANY($3)
             {TRAITS_CONFLICT}"
        ))
        .bind(from)
        .bind(to)
        .bind(&leaving)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM customer_traits WHERE profile_id = $1 AND trait = ANY($2)")
            .bind(from)
            .bind(&leaving)
            .execute(&mut *tx)
            .await?;
    }
    // The new profile starts as the old one's row says (first and last seen, source); the
    // events that follow refine it.
    sqlx::query(
        "INSERT INTO customers (profile_id, first_seen, last_seen, data_source, first_event_id, active)
         SELECT $2, first_seen, last_seen, data_source, first_event_id, true FROM customers WHERE profile_id = $1
         ON CONFLICT (profile_id) DO NOTHING",
    )
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?;
    enqueue(tx, &[from, to], false).await
}

/// Marks profiles for (re)publication; `deleted` publishes a tombstone.
pub async fn enqueue(tx: &mut PgConnection, ids: &[Uuid], deleted: bool) -> Db {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(ENQUEUE)
        .bind(ids)
        .bind(deleted)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Marks profiles for (re)publication. Append-only: never waits on the rows the relay is
/// publishing.
const ENQUEUE: &str =
    "INSERT INTO profile_outbox (profile_id, deleted) SELECT x, $2 FROM UNNEST($1::uuid[]) AS x";

/// One statement with its arguments already encoded.
struct Statement {
    sql: String,
    args: PgArguments,
    /// The first argument that failed to encode (reported by [`Statement::done`]).
    failed: Option<sqlx::error::BoxDynError>,
}

impl Statement {
    fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            args: PgArguments::default(),
            failed: None,
        }
    }

    fn bind<'q, T: Encode<'q, Postgres> + Type<Postgres> + 'q>(mut self, value: T) -> Self {
        if self.failed.is_none() {
            if let Err(e) = self.args.add(value) {
                self.failed = Some(e);
            }
        }
        self
    }

    fn done(self) -> Result<Self, sqlx::Error> {
        match self.failed {
            Some(e) => Err(sqlx::Error::Encode(e)),
            None => Ok(self),
        }
    }
}

fn col<T, R, F: Fn(&T) -> R>(items: &[T], f: F) -> Vec<R> {
    items.iter().map(f).collect()
}

/// A batch's rows in key order (`order` gives a key's place; uuids by `as_u128`, which
/// orders them as their bytes, as Postgres does): every lane takes the rows it may share
/// with another (a profile's) in the same order, so lanes wait on each other but never
/// deadlock, and a batch's statements do not depend on the order of its hash maps.
fn in_order<K, V, O: Ord>(rows: &HashMap<K, V>, order: impl Fn(&K) -> O) -> Vec<(&K, &V)> {
    let mut sorted: Vec<_> = rows.iter().collect();
    sorted.sort_unstable_by_key(|(k, _)| order(k));
    sorted
}

/// The rows of a map keyed by uuid (an event or content id), in key order.
fn values_in_order<V>(rows: &HashMap<Uuid, V>) -> Vec<&V> {
    in_order(rows, Uuid::as_u128)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// The statements that write a batch's rows, one per table with rows, their arguments
/// encoded, run by [`execute`].
fn writes(rows: &Rows<'_>) -> Result<Vec<Statement>, sqlx::Error> {
    let mut out = Vec::new();
    let traits = in_order(&rows.traits, |(p, n)| (p.as_u128(), *n));
    if !traits.is_empty() {
        out.push(
            Statement::new(
            format!(
        "INSERT INTO customer_traits (profile_id, trait, value, sealed, subject_id, asserted_at, event_id)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::timestamptz[], $7::uuid[])
         {TRAITS_CONFLICT}"
    ),
        )
        .bind(col(&traits, |((p, _), _)| *p))
        .bind(col(&traits, |((_, n), _)| *n))
        .bind(col(&traits, |(_, t)| t.value.as_deref()))
        .bind(col(&traits, |(_, t)| t.sealed))
        .bind(col(&traits, |(_, t)| t.subject_id))
        .bind(col(&traits, |(_, t)| t.stamp.0))
        .bind(col(&traits, |(_, t)| t.stamp.1))
        .done()?,
        );
    }
    let ids = in_order(&rows.identities, |k| *k);
    if !ids.is_empty() {
        // A row is written only when the identifier is new or an earlier claim arrives; the
        // NOT EXISTS leaves rows that stay as they are unlocked and unwritten (a claim only
        // ever moves earlier, so one skipped here cannot become due by a concurrent write).
        out.push(
            Statement::new(
            "INSERT INTO customer_identities AS c (kind, namespace, token, profile_id, first_seen, origin)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::uuid[], $5::timestamptz[], $6::uuid[])
                        AS x(kind, namespace, token, profile_id, first_seen, origin)
              WHERE NOT EXISTS (SELECT 1 FROM customer_identities e
                                 WHERE (e.kind, e.namespace, e.token) = (x.kind, x.namespace, x.token)
                                   AND (e.first_seen, e.profile_id) <= (x.first_seen, x.profile_id))
             ON CONFLICT (kind, namespace, token) DO UPDATE SET
                 profile_id = EXCLUDED.profile_id, origin = EXCLUDED.origin, first_seen = EXCLUDED.first_seen
             WHERE (EXCLUDED.first_seen, EXCLUDED.profile_id) < (c.first_seen, c.profile_id)",
        )
        .bind(col(&ids, |((k, _, _), _)| *k))
        .bind(col(&ids, |((_, n, _), _)| *n))
        .bind(col(&ids, |((_, _, h), _)| *h))
        .bind(col(&ids, |(_, r)| r.profile_id))
        .bind(col(&ids, |(_, r)| r.first_seen))
        .bind(col(&ids, |(_, r)| r.origin))
        .done()?,
        );
    }
    let it = values_in_order(&rows.interactions);
    if !it.is_empty() {
        out.push(
            Statement::new(
            "INSERT INTO interactions (event_id, profile_id, occurred_at, interaction_type, channel, touchpoint, duration_ms, outcome, properties, source, origin)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[], $9::text[]::jsonb[], $10::text[], $11::uuid[])
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(col(&it, |r| r.event_id))
        .bind(col(&it, |r| r.profile_id))
        .bind(col(&it, |r| r.occurred_at))
        .bind(col(&it, |r| r.interaction_type))
        .bind(col(&it, |r| r.channel))
        .bind(col(&it, |r| r.touchpoint))
        .bind(col(&it, |r| r.duration_ms))
        .bind(col(&it, |r| r.outcome))
        .bind(col(&it, |r| r.properties.as_deref()))
        .bind(col(&it, |r| r.source))
        .bind(col(&it, |r| r.origin))
        .done()?,
        );
    }
    let tr = values_in_order(&rows.transactions);
    if !tr.is_empty() {
        out.push(
            Statement::new(
            "INSERT INTO transactions (event_id, profile_id, occurred_at, order_id, status, amount, currency, items, payment_method, coupon, source, origin)
             SELECT e, p, t, o, s, a::numeric, c, i, pm, cp, src, og
               FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]::jsonb[], $9::text[], $10::text[], $11::text[], $12::uuid[])
                 AS x(e, p, t, o, s, a, c, i, pm, cp, src, og)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(col(&tr, |r| r.event_id))
        .bind(col(&tr, |r| r.profile_id))
        .bind(col(&tr, |r| r.occurred_at))
        .bind(col(&tr, |r| r.order_id.as_str()))
        .bind(col(&tr, |r| r.status))
        .bind(col(&tr, |r| r.amount.as_str()))
        .bind(col(&tr, |r| r.currency))
        .bind(col(&tr, |r| r.items.as_str()))
        .bind(col(&tr, |r| r.payment_method))
        .bind(col(&tr, |r| r.coupon.as_deref()))
        .bind(col(&tr, |r| r.source))
        .bind(col(&tr, |r| r.origin))
        .done()?,
        );
    }
    let cs = in_order(&rows.consents, |(p, n)| (p.as_u128(), *n));
    if !cs.is_empty() {
        out.push(
            Statement::new(
            format!(
        "INSERT INTO consents (profile_id, purpose, status, basis, policy_version, changed_at, evidence_event_id)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::uuid[])
         {CONSENTS_CONFLICT}"
    ),
        )
        .bind(col(&cs, |((p, _), _)| *p))
        .bind(col(&cs, |((_, n), _)| *n))
        .bind(col(&cs, |(_, c)| c.status))
        .bind(col(&cs, |(_, c)| c.basis))
        .bind(col(&cs, |(_, c)| c.policy_version))
        .bind(col(&cs, |(_, c)| c.stamp.0))
        .bind(col(&cs, |(_, c)| c.stamp.1))
        .done()?,
        );
    }
    capsule_writes(rows, &mut out)?;
    // Customers last: the only rows that lanes share when a profile's events come on
    // different partitions (capsule views travel with the capsule, not the viewer), so their
    // locks are held from here to the commit instead of for the whole batch; every lane
    // takes them in profile id order (`in_order`), so lanes wait on each other but never
    // deadlock.
    let customers = in_order(&rows.customers, Uuid::as_u128);
    if !customers.is_empty() {
        out.push(
            Statement::new(
            format!(
        "INSERT INTO customers (profile_id, first_seen, last_seen, data_source, first_event_id)
             SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::uuid[])
         {CUSTOMERS_CONFLICT}"
    ),
        )
        .bind(col(&customers, |(p, _)| **p))
        .bind(col(&customers, |(_, c)| c.first.0))
        .bind(col(&customers, |(_, c)| c.last_seen))
        .bind(col(&customers, |(_, c)| c.data_source))
        .bind(col(&customers, |(_, c)| c.first.1))
        .done()?,
        );
    }
    if !rows.touched.is_empty() {
        let mut touched: Vec<Uuid> = rows.touched.iter().copied().collect();
        touched.sort_unstable_by_key(Uuid::as_u128);
        out.push(Statement::new(ENQUEUE).bind(touched).bind(false).done()?);
    }
    Ok(out)
}

/// Runs statements made by [`writes`], in order.
async fn execute(tx: &mut PgConnection, writes: Vec<Statement>) -> Db {
    let mut times = String::new();
    for w in writes {
        let started = std::time::Instant::now();
        let done = sqlx::query_with(&w.sql, w.args).execute(&mut *tx).await?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            // The table: "INSERT INTO <table> ...".
            let table = w.sql.split_whitespace().nth(2).unwrap_or("?");
            let ms = started.elapsed().as_millis();
            let rows = done.rows_affected();
            let _ = write!(times, "{table} {rows} rows {ms} ms; ");
        }
    }
    if !times.is_empty() {
        tracing::debug!(statements = %times.trim_end_matches("; "), "batch statements");
    }
    Ok(())
}

/// Writes a batch's rows.
pub async fn apply(tx: &mut PgConnection, rows: &Rows<'_>) -> Db {
    execute(tx, writes(rows)?).await
}

fn capsule_writes(rows: &Rows<'_>, out: &mut Vec<Statement>) -> Result<(), sqlx::Error> {
    let created = in_order(&rows.capsules_created, Uuid::as_u128);
    if !created.is_empty() {
        out.push(
            Statement::new(
            "INSERT INTO capsules (capsule_id, owner_profile_id, title, content_type, storage_path, settings, created_at, created_event_id)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[]::jsonb[], $7::timestamptz[], $8::uuid[])
             ON CONFLICT (capsule_id) DO UPDATE SET owner_profile_id = EXCLUDED.owner_profile_id, title = EXCLUDED.title,
                 content_type = EXCLUDED.content_type, storage_path = EXCLUDED.storage_path, settings = EXCLUDED.settings,
                 created_at = EXCLUDED.created_at, created_event_id = EXCLUDED.created_event_id
             WHERE capsules.created_at IS NULL
                OR (EXCLUDED.created_at, EXCLUDED.created_event_id) < (capsules.created_at, capsules.created_event_id)",
        )
        .bind(col(&created, |(c, _)| **c))
        .bind(col(&created, |(_, r)| r.owner_profile_id))
        .bind(col(&created, |(_, r)| r.title.as_deref()))
        .bind(col(&created, |(_, r)| r.content_type))
        .bind(col(&created, |(_, r)| r.storage_path.as_deref()))
        .bind(col(&created, |(_, r)| r.settings.as_str()))
        .bind(col(&created, |(_, r)| r.stamp.0))
        .bind(col(&created, |(_, r)| r.stamp.1))
        .done()?,
        );
    }
    let published = in_order(&rows.capsules_published, Uuid::as_u128);
    if !published.is_empty() {
        out.push(
            Statement::new(
            "INSERT INTO capsules (capsule_id, visibility, published_at, published_event_id)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::uuid[])
             ON CONFLICT (capsule_id) DO UPDATE SET visibility = EXCLUDED.visibility, published_at = EXCLUDED.published_at,
                 published_event_id = EXCLUDED.published_event_id
             WHERE capsules.published_at IS NULL
                OR (EXCLUDED.published_at, EXCLUDED.published_event_id) > (capsules.published_at, capsules.published_event_id)",
        )
        .bind(col(&published, |(c, _)| **c))
        .bind(col(&published, |(_, (v, _))| *v))
        .bind(col(&published, |(_, (_, s))| s.0))
        .bind(col(&published, |(_, (_, s))| s.1))
        .done()?,
        );
    }
    let deleted = in_order(&rows.capsules_deleted, Uuid::as_u128);
    if !deleted.is_empty() {
        out.push(
            Statement::new(
            "INSERT INTO capsules (capsule_id, deleted_reason, deleted_at, deleted_event_id)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::uuid[])
             ON CONFLICT (capsule_id) DO UPDATE SET deleted_reason = EXCLUDED.deleted_reason, deleted_at = EXCLUDED.deleted_at,
                 deleted_event_id = EXCLUDED.deleted_event_id
             WHERE capsules.deleted_at IS NULL
                OR (EXCLUDED.deleted_at, EXCLUDED.deleted_event_id) < (capsules.deleted_at, capsules.deleted_event_id)",
        )
        .bind(col(&deleted, |(c, _)| **c))
        .bind(col(&deleted, |(_, (r, _))| r.as_deref()))
        .bind(col(&deleted, |(_, (_, s))| s.0))
        .bind(col(&deleted, |(_, (_, s))| s.1))
        .done()?,
        );
    }
    let contents = values_in_order(&rows.contents);
    if !contents.is_empty() {
        out.push(
            Statement::new(
            "INSERT INTO capsule_contents (content_id, capsule_id, content_type, storage_path, size_bytes, body, added_at, event_id)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::timestamptz[], $8::uuid[])
             ON CONFLICT (content_id) DO UPDATE SET capsule_id = EXCLUDED.capsule_id, content_type = EXCLUDED.content_type,
                 storage_path = EXCLUDED.storage_path, size_bytes = EXCLUDED.size_bytes, body = EXCLUDED.body,
                 added_at = EXCLUDED.added_at, event_id = EXCLUDED.event_id
             WHERE (EXCLUDED.added_at, EXCLUDED.event_id) > (capsule_contents.added_at, capsule_contents.event_id)",
        )
        .bind(col(&contents, |r| r.content_id))
        .bind(col(&contents, |r| r.capsule_id))
        .bind(col(&contents, |r| r.content_type))
        .bind(col(&contents, |r| r.storage_path.as_deref()))
        .bind(col(&contents, |r| r.size_bytes))
        .bind(col(&contents, |r| r.body.as_deref()))
        .bind(col(&contents, |r| r.stamp.0))
        .bind(col(&contents, |r| r.stamp.1))
        .done()?,
        );
    }
    let views = values_in_order(&rows.views);
    if !views.is_empty() {
        out.push(
            Statement::new(
            "INSERT INTO capsule_views (event_id, capsule_id, profile_id, occurred_at, channel, duration_ms, origin)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[], $5::text[], $6::bigint[], $7::uuid[])
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(col(&views, |r| r.event_id))
        .bind(col(&views, |r| r.capsule_id))
        .bind(col(&views, |r| r.profile_id))
        .bind(col(&views, |r| r.occurred_at))
        .bind(col(&views, |r| r.channel))
        .bind(col(&views, |r| r.duration_ms))
        .bind(col(&views, |r| r.origin))
        .done()?,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_written_in_the_order_postgres_sorts_their_keys() {
        // Uuids whose first bytes differ, whose last bytes differ, and one with the top bit
        // set (a signed comparison would put it first).
        let ids = [
            Uuid::from_u128(0xff00_0000_0000_0000_0000_0000_0000_0001),
            Uuid::from_u128(2),
            Uuid::from_u128(0x0100_0000_0000_0000_0000_0000_0000_0000),
            Uuid::from_u128(1),
            Uuid::from_u128(0x8000_0000_0000_0000_0000_0000_0000_0000),
        ];
        let by_id: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, u)| (*u, i)).collect();
        let mut expected = ids.to_vec();
        // Uuid's own order is its bytes', as Postgres orders uuid.
        expected.sort();
        let written: Vec<Uuid> = in_order(&by_id, Uuid::as_u128)
            .into_iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(written, expected);

        let traits: HashMap<(Uuid, &str), ()> = [
            ((ids[0], "b"), ()),
            ((ids[1], "z"), ()),
            ((ids[0], "a"), ()),
            ((ids[4], "m"), ()),
        ]
        .into_iter()
        .collect();
        let written: Vec<(Uuid, &str)> = in_order(&traits, |(p, n)| (p.as_u128(), *n))
            .into_iter()
            .map(|(k, _)| *k)
            .collect();
        let mut expected: Vec<(Uuid, &str)> = traits.keys().copied().collect();
        expected.sort();
        assert_eq!(written, expected);
    }
}
