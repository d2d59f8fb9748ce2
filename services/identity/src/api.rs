//! The operators' view of the graph: `GET /v1/identity/{profile_id}` lists a profile's
//! identifiers (kind, token, first and last seen), the links that joined them with the
//! events that caused them, and the links the rules refused. Bearer tokens; the `operator`
//! role is required. Values are vault tokens: the graph holds no identifier, plain or hashed.
//! `GET /v1/identity/candidates` lists fuzzy duplicate candidates (profile pairs and their
//! scores, best first, with a cursor).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cdp_runtime::auth::ApiTokens;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// The role the identity API requires.
pub const ROLE: &str = "operator";

pub struct ApiState {
    /// Connections whose search_path is the identity schema.
    pub pool: PgPool,
    pub tokens: ApiTokens,
}

fn error(status: StatusCode, reason: &str) -> Response {
    (status, Json(json!({"error": reason}))).into_response()
}

fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    state.tokens.authorize(headers, ROLE).map(|_| ())
}

type LinkRow = (Uuid, String, String, String, String, Uuid, DateTime<Utc>);
type RefusalRow = (
    Uuid,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    DateTime<Utc>,
);

type NodeRow = (
    i64,
    String,
    String,
    String,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    bool,
);

/// A profile's identity as JSON, or None when no identifier belongs to it.
pub async fn profile_identity(pool: &PgPool, id: Uuid) -> Result<Option<Value>, sqlx::Error> {
    let nodes: Vec<NodeRow> = sqlx::query_as(
        "SELECT node_id, kind, namespace, token, first_at, last_at, subject
           FROM identity_nodes WHERE profile_id = $1 ORDER BY first_at, kind, token",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    if nodes.is_empty() {
        return Ok(None);
    }
    let ids: Vec<i64> = nodes.iter().map(|n| n.0).collect();
    let links: Vec<LinkRow> = sqlx::query_as(
        "SELECT l.link_id, f.kind, f.token, t.kind, t.token, l.cause_event_id, l.occurred_at
           FROM identity_links l
           JOIN identity_nodes f ON f.node_id = l.from_node
           JOIN identity_nodes t ON t.node_id = l.to_node
          WHERE l.from_node = ANY($1) OR l.to_node = ANY($1)
          ORDER BY l.occurred_at, l.link_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let refusals: Vec<RefusalRow> = sqlx::query_as(
        "SELECT r.event_id, n.kind, n.token, o.kind, o.token, r.reason, r.rule_kind, r.occurred_at
               FROM identity_refusals r
               JOIN identity_nodes n ON n.node_id = r.node
               JOIN identity_nodes o ON o.node_id = r.other_node
              WHERE r.node = ANY($1) OR r.other_node = ANY($1)
              ORDER BY r.occurred_at DESC, r.event_id
              LIMIT 200",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let ident = |kind: &str, token: &str| json!({"kind": kind, "token": token});
    Ok(Some(json!({
        "profile_id": id,
        "identifiers": nodes.iter().map(|(_, kind, ns, token, first, last, subject)| json!({
            "kind": kind,
            "namespace": (!ns.is_empty()).then_some(ns),
            "token": token,
            "first_seen": first,
            "last_seen": last,
            "subject": subject,
        })).collect::<Vec<_>>(),
        "links": links.iter().map(|(link, fk, fh, tk, th, cause, at)| json!({
            "link_id": link,
            "from": ident(fk, fh),
            "to": ident(tk, th),
            "cause_event_id": cause,
            "occurred_at": at,
        })).collect::<Vec<_>>(),
        "refused": refusals.iter().map(|(event, nk, nh, ok, oh, reason, rule_kind, at)| json!({
            "event_id": event,
            "identifier": ident(nk, nh),
            "other": ident(ok, oh),
            "reason": reason,
            "rule_kind": rule_kind,
            "occurred_at": at,
        })).collect::<Vec<_>>(),
    })))
}

async fn get_identity(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "profile_id: not a UUID");
    };
    match profile_identity(&state.pool, id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such profile"),
        Err(e) => {
            tracing::error!(error = %e, "identity API query failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
        }
    }
}

#[derive(serde::Deserialize)]
struct CandidateQuery {
    min_score: Option<f64>,
    status: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

type CandidateRow = (
    Uuid,
    Uuid,
    f64,
    f64,
    Option<f64>,
    Option<bool>,
    String,
    Option<Uuid>,
    DateTime<Utc>,
    DateTime<Utc>,
);

/// `<score>_<profile a>_<profile b>` of the last row of a page.
fn parse_cursor(s: &str) -> Option<(f64, Uuid, Uuid)> {
    let mut it = s.splitn(3, '_');
    Some((
        it.next()?.parse().ok()?,
        Uuid::parse_str(it.next()?).ok()?,
        Uuid::parse_str(it.next()?).ok()?,
    ))
}

async fn get_candidates(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<CandidateQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return *r;
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return error(StatusCode::BAD_REQUEST, "limit: between 1 and 500");
    }
    let status = q.status.as_deref().unwrap_or("open");
    if !matches!(status, "open" | "alias_published" | "all") {
        return error(
            StatusCode::BAD_REQUEST,
            "status: open, alias_published or all",
        );
    }
    let after = match q.after.as_deref().map(parse_cursor) {
        None => None,
        Some(Some(c)) => Some(c),
        Some(None) => return error(StatusCode::BAD_REQUEST, "after: not a cursor of this API"),
    };
    let rows: Result<Vec<CandidateRow>, _> = sqlx::query_as(
        "SELECT profile_a, profile_b, score, name_score, street_score, birth_date_match,
                status, merge_event_id, first_reported_at, scored_at
           FROM identity_candidates
          WHERE score >= $1 AND ($2 = 'all' OR status = $2)
            AND ($3::float8 IS NULL OR score < $3
                 OR (score = $3 AND (profile_a, profile_b) > ($4, $5)))
          ORDER BY score DESC, profile_a, profile_b
          LIMIT $6",
    )
    .bind(q.min_score.unwrap_or(0.0))
    .bind(status)
    .bind(after.map(|c| c.0))
    .bind(after.map(|c| c.1).unwrap_or_default())
    .bind(after.map(|c| c.2).unwrap_or_default())
    .bind(limit)
    .fetch_all(&state.pool)
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "candidates query failed");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "database error");
        }
    };
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| format!("{}_{}_{}", r.2, r.0, r.1)))
        .flatten();
    Json(json!({
        "candidates": rows.iter().map(|(a, b, score, name, street, birth, status, merge, first, scored)| json!({
            "profile_a": a,
            "profile_b": b,
            "score": score,
            "name_score": name,
            "street_score": street,
            "birth_date_match": birth,
            "status": status,
            "merge_event_id": merge,
            "first_reported_at": first,
            "scored_at": scored,
        })).collect::<Vec<_>>(),
        "next": next,
    }))
    .into_response()
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/identity/candidates", get(get_candidates))
        .route("/v1/identity/{profile_id}", get(get_identity))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let score = 0.912_345_678_901_234_5_f64;
        let c = format!("{score}_{a}_{b}");
        assert_eq!(parse_cursor(&c), Some((score, a, b)));
        assert_eq!(parse_cursor("x_y_z"), None);
    }
}
