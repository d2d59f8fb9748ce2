//! A content digest of the read models: equal digests mean equal tables, row for row.

use sqlx::PgPool;

use crate::generation::TABLES;

/// md5 of every table's rows in primary-key order, then of those, as hex. Computed in
/// Postgres, over the generation schema the pool points at.
pub async fn digest(pool: &PgPool) -> Result<(String, Vec<(String, String, i64)>), sqlx::Error> {
    let mut per_table = Vec::new();
    for t in TABLES {
        let (d, n): (Option<String>, i64) = sqlx::query_as(&format!(
            "SELECT md5(string_agg(r::text, E'\\n' ORDER BY r::text)), count(*) FROM {t} r"
        ))
        .fetch_one(pool)
        .await?;
        per_table.push(((*t).to_owned(), d.unwrap_or_default(), n));
    }
    let all: String = per_table
        .iter()
        .map(|(t, d, n)| format!("{t}:{d}:{n}\n"))
        .collect();
    let (total,): (String,) = sqlx::query_as("SELECT md5($1)")
        .bind(all)
        .fetch_one(pool)
        .await?;
    Ok((total, per_table))
}
