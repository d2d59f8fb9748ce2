//! Generations of the read models. Each lives in its own schema (`<prefix>_g<N>`) with its
//! own consumer group (`<group>.g<N>`); `projector_generations` says which one is live and
//! the `<prefix>_read` views point at it. A rebuild fills a new generation and swaps both
//! in one transaction, so readers never see a half-built model.

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use cdp_runtime::config::PostgresArgs;

/// The read-model tables, in dependency-free order (for copies and digests).
pub const TABLES: &[&str] = &[
    "customers",
    "customer_traits",
    "customer_identities",
    "interactions",
    "transactions",
    "consents",
    "capsules",
    "capsule_contents",
    "capsule_views",
    "profile_merges",
];

/// Views exposed in `<prefix>_read`.
pub const VIEWS: &[&str] = &[
    "customers",
    "customer_traits",
    "customer_identities",
    "interactions",
    "transactions",
    "consents",
    "capsules",
    "capsule_contents",
    "capsule_views",
    "profile_merges",
    "customer_360",
];

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("schema prefix `{0}` must match [a-z_][a-z0-9_]{{0,40}}")]
    BadPrefix(String),
    #[error("database")]
    Db(#[from] sqlx::Error),
    #[error("read-model migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("generation {0} of {1} does not exist")]
    Missing(i32, String),
}

pub fn migrator() -> Migrator {
    sqlx::migrate!("./migrations")
}

/// Migrations of the shared tables (generation pointer, access audit).
pub fn shared_migrator() -> Migrator {
    let mut m = sqlx::migrate!("./migrations-shared");
    m.set_ignore_missing(true);
    m
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub prefix: String,
    pub number: i32,
}

pub fn check_prefix(prefix: &str) -> Result<(), GenerationError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 41
        && prefix
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(GenerationError::BadPrefix(prefix.to_owned()))
    }
}

impl Generation {
    pub fn schema(&self) -> String {
        format!("{}_g{}", self.prefix, self.number)
    }

    /// What the generation's handler needs to know of it.
    pub fn role(&self) -> crate::erase::Role {
        crate::erase::Role {
            prefix: self.prefix.clone(),
            number: self.number,
        }
    }

    pub fn group(&self, base: &str) -> String {
        format!("{base}.g{}", self.number)
    }

    /// A pool whose connections resolve unqualified names in this generation's schema.
    pub async fn pool(&self, args: &PostgresArgs) -> Result<PgPool, GenerationError> {
        let opts = PgConnectOptions::from_str(&args.database_url)?
            .options([("search_path", format!("{},public", self.schema()))]);
        Ok(PgPoolOptions::new()
            .max_connections(args.max_connections)
            .connect_with(opts)
            .await?)
    }
}

pub fn read_schema(prefix: &str) -> String {
    format!("{prefix}_read")
}

/// The live generation, if any.
pub async fn live<'e>(
    db: impl sqlx::PgExecutor<'e>,
    prefix: &str,
) -> Result<Option<Generation>, GenerationError> {
    let row: Option<(i32,)> = sqlx::query_as(
        "SELECT generation FROM projector_generations WHERE prefix = $1 AND state = 'live'",
    )
    .bind(prefix)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(n,)| Generation {
        prefix: prefix.to_owned(),
        number: n,
    }))
}

/// Creates the next generation's schema with the read-model migrations, in state `building`.
pub async fn create(
    pool: &PgPool,
    args: &PostgresArgs,
    prefix: &str,
) -> Result<Generation, GenerationError> {
    check_prefix(prefix)?;
    shared_migrator().run(pool).await?;
    let (next,): (i32,) = sqlx::query_as(
        "INSERT INTO projector_generations (prefix, generation, state)
         SELECT $1, COALESCE(max(generation), 0) + 1, 'building' FROM projector_generations WHERE prefix = $1
         RETURNING generation",
    )
    .bind(prefix)
    .fetch_one(pool)
    .await?;
    let generation = Generation {
        prefix: prefix.to_owned(),
        number: next,
    };
    cdp_runtime::pg::create_schema(pool, &generation.schema()).await?;
    let gen_pool = generation.pool(args).await?;
    migrator().run(&gen_pool).await?;
    gen_pool.close().await;
    Ok(generation)
}

/// Makes `generation` live: retires the previous one and points the read views at it, in
/// one transaction.
pub async fn swap(pool: &PgPool, generation: &Generation) -> Result<(), GenerationError> {
    let mut tx = pool.begin().await?;
    lock_swaps(&mut tx).await?;
    let exists: Option<(i32,)> = sqlx::query_as(
        "SELECT generation FROM projector_generations WHERE prefix = $1 AND generation = $2",
    )
    .bind(&generation.prefix)
    .bind(generation.number)
    .fetch_optional(&mut *tx)
    .await?;
    if exists.is_none() {
        return Err(GenerationError::Missing(
            generation.number,
            generation.prefix.clone(),
        ));
    }
    sqlx::query(
        "UPDATE projector_generations SET state = 'retired' WHERE prefix = $1 AND state = 'live'",
    )
    .bind(&generation.prefix)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE projector_generations SET state = 'live' WHERE prefix = $1 AND generation = $2",
    )
    .bind(&generation.prefix)
    .bind(generation.number)
    .execute(&mut *tx)
    .await?;
    expose(&mut tx, generation).await?;
    tx.commit().await?;
    Ok(())
}

/// Serializes whatever points the read views somewhere (swaps, upgrades) until `tx` ends.
async fn lock_swaps(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cdp-projector-swap'))")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Points the read views of `generation`'s prefix at its tables.
async fn expose(tx: &mut PgConnection, generation: &Generation) -> Result<(), sqlx::Error> {
    let read = read_schema(&generation.prefix);
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{read}\""))
        .execute(&mut *tx)
        .await?;
    for v in VIEWS {
        sqlx::query(&format!("DROP VIEW IF EXISTS \"{read}\".\"{v}\""))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE VIEW \"{read}\".\"{v}\" AS SELECT * FROM \"{}\".\"{v}\"",
            generation.schema()
        ))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Brings the read-model migrations added since `generation` was created onto it and, if it
/// is live, re-creates the read views over its tables as they now are (a view lists the
/// columns of its table as they were when it was made; a migration may have dropped one with
/// its view). One transaction under the swap lock: readers see the old views or the new ones.
/// `gen_pool` is `generation`'s own pool ([`Generation::pool`]).
pub async fn upgrade(
    pool: &PgPool,
    gen_pool: &PgPool,
    generation: &Generation,
) -> Result<(), GenerationError> {
    migrator().run(gen_pool).await?;
    let mut tx = pool.begin().await?;
    lock_swaps(&mut tx).await?;
    let live = live(&mut *tx, &generation.prefix).await?;
    if live.as_ref() == Some(generation) {
        expose(&mut tx, generation).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The live generation, creating the first one if there is none.
pub async fn ensure_live(
    pool: &PgPool,
    args: &PostgresArgs,
    prefix: &str,
) -> Result<Generation, GenerationError> {
    check_prefix(prefix)?;
    shared_migrator().run(pool).await?;
    if let Some(g) = live(pool, prefix).await? {
        return Ok(g);
    }
    // Replicas starting together: one creates the first generation, the others wait and use it.
    let mut lock = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('cdp-projector-first-generation'))")
        .execute(&mut *lock)
        .await?;
    let result = async {
        if let Some(g) = live(pool, prefix).await? {
            return Ok(g);
        }
        let g = create(pool, args, prefix).await?;
        swap(pool, &g).await?;
        Ok(g)
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext('cdp-projector-first-generation'))")
        .execute(&mut *lock)
        .await?;
    result
}
