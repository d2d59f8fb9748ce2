//! The rejection log: every refused event with its failing fields, in Postgres.

use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::fields::FieldError;

pub fn migrator() -> Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m
}

/// One refused event.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    /// Position in the request's batch (0 for single calls).
    pub index: usize,
    #[serde(rename = "messageId", skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub errors: Vec<FieldError>,
}

pub async fn record(
    pool: &PgPool,
    source: &str,
    route: &str,
    rejected: &[Rejected],
) -> Result<(), sqlx::Error> {
    if rejected.is_empty() {
        return Ok(());
    }
    let ids: Vec<Option<String>> = rejected.iter().map(|r| r.message_id.clone()).collect();
    let errors: Vec<serde_json::Value> = rejected
        .iter()
        .map(|r| serde_json::to_value(&r.errors).unwrap_or(serde_json::Value::Null))
        .collect();
    sqlx::query(
        "INSERT INTO ingest_rejections (source, route, message_id, errors)
         SELECT $1, $2, m, e FROM UNNEST($3::text[], $4::jsonb[]) AS x(m, e)",
    )
    .bind(source)
    .bind(route)
    .bind(&ids)
    .bind(&errors)
    .execute(pool)
    .await?;
    Ok(())
}

/// A logged rejection, for `cdp ingest rejections`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct LoggedRejection {
    pub id: i64,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub source: String,
    pub route: String,
    pub message_id: Option<String>,
    pub errors: serde_json::Value,
}

pub async fn recent(pool: &PgPool, limit: i64) -> Result<Vec<LoggedRejection>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, received_at, source, route, message_id, errors FROM ingest_rejections ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}
