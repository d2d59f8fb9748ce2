//! The profile API (read role): the customer 360 by id or by identifier, paginated
//! interactions and transactions, ETags, and an audit row for every access.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use cdp_keystore::{RawIdentifier, Vault};
use cdp_schemas::IdentifierKind;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use cdp_runtime::auth::ApiTokens;
pub use cdp_runtime::auth::Principal;

pub struct ApiState {
    /// Connections whose search_path is the read views schema.
    pub pool: PgPool,
    /// Read-only: a lookup by identifier finds its token, never creates one.
    pub vault: Vault,
    pub tokens: ApiTokens,
}

fn error(status: StatusCode, reason: &str) -> Response {
    (status, Json(json!({"error": reason}))).into_response()
}

/// The role the profile API requires.
pub const ROLE: &str = "read";

fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<Principal, Box<Response>> {
    state.tokens.authorize(headers, ROLE)
}

async fn audit(
    pool: &PgPool,
    who: &Principal,
    route: &str,
    profile: Option<Uuid>,
    lookup: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO public.profile_access_audit (principal, route, profile_id, lookup) VALUES ($1, $2, $3, $4)")
        .bind(&who.name)
        .bind(route)
        .bind(profile)
        .bind(lookup)
        .execute(pool)
        .await?;
    Ok(())
}

fn internal(e: sqlx::Error) -> Response {
    tracing::error!(error = %e, "profile API query failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the read models are unavailable",
    )
}

/// JSON with a strong ETag; 304 when the client has it.
fn with_etag(headers: &HeaderMap, body: Value) -> Response {
    let text = body.to_string();
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let etag = format!("\"{}\"", hex::encode(&digest.as_ref()[..16]));
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], text).into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// Who read a profile, how: the access-audit row a read writes.
struct Access<'a> {
    who: &'a Principal,
    route: &'a str,
    lookup: Option<&'a str>,
}

/// Which profile a read asks for: by id, or the owner of an identifier (kind, token).
enum Target<'a> {
    Id(Uuid),
    Identifier(&'a str, &'a str),
}

/// The columns of an interaction as the API shows it (the 360's last ten and the pages).
macro_rules! interaction_columns {
    () => {
        "event_id, occurred_at, interaction_type, channel, touchpoint, duration_ms, outcome, properties, source"
    };
}

/// The customer 360 as one statement (one round trip, one snapshot), which also finds the
/// profile that owns an identifier and writes the access-audit row: the audit row names the
/// profile asked for (none when an identifier matched nothing), is written whether the
/// profile exists or not, and only if the read itself succeeds.
const PROFILE_360: &str = concat!("WITH target AS (
       SELECT $1::uuid AS id WHERE $1::uuid IS NOT NULL
       UNION ALL
       SELECT profile_id FROM customer_identities
        WHERE $1::uuid IS NULL AND kind = $5 AND namespace = '' AND token = $6
     ), audited AS (
       INSERT INTO public.profile_access_audit (principal, route, profile_id, lookup)
       SELECT $2, $3, (SELECT id FROM target), $4
     )
     SELECT c.profile_id, c.first_seen, c.last_seen, c.active, c.data_source,
       (SELECT coalesce(jsonb_object_agg(trait, value), '{}') FROM customer_traits WHERE profile_id = c.profile_id),
       (SELECT coalesce(jsonb_agg(jsonb_build_object('kind', kind, 'namespace', nullif(namespace, ''), 'token', token,
                'first_seen', first_seen) ORDER BY kind, namespace, token), '[]')
          FROM customer_identities WHERE profile_id = c.profile_id),
       (SELECT coalesce(jsonb_agg(jsonb_build_object('purpose', purpose, 'status', status, 'basis', basis,
                'policy_version', policy_version, 'changed_at', changed_at, 'evidence_event_id', evidence_event_id) ORDER BY purpose), '[]')
          FROM consents WHERE profile_id = c.profile_id),
       (SELECT coalesce(jsonb_agg(jsonb_build_object('currency', currency, 'net_amount', net_amount, 'count', n) ORDER BY currency), '[]')
          FROM (SELECT currency, sum(CASE WHEN status = 'REFUNDED' THEN -amount ELSE amount END)::text AS net_amount, count(*) AS n
                  FROM transactions WHERE profile_id = c.profile_id AND status <> 'CANCELLED' GROUP BY currency) t),
       (SELECT coalesce(jsonb_agg(jsonb_build_object('capsule_id', capsule_id, 'title', title, 'visibility', visibility,
                'created_at', created_at, 'published_at', published_at, 'deleted_at', deleted_at,
                'status', CASE WHEN deleted_at IS NOT NULL THEN 'DELETED' WHEN published_at IS NOT NULL THEN 'PUBLISHED' ELSE 'DRAFT' END)
                ORDER BY capsule_id), '[]')
          FROM capsules WHERE owner_profile_id = c.profile_id),
       (SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY x.occurred_at DESC, x.event_id DESC), '[]')
          FROM (SELECT ", interaction_columns!(), "
                  FROM interactions WHERE profile_id = c.profile_id ORDER BY occurred_at DESC, event_id DESC LIMIT 10) x)
     FROM customers c WHERE c.profile_id = (SELECT id FROM target)");

type Profile360Row = (
    Uuid,
    DateTime<Utc>,
    DateTime<Utc>,
    bool,
    String,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
);

/// The customer 360 of a profile, or `None`; records the access.
async fn profile_json(
    pool: &PgPool,
    target: &Target<'_>,
    access: &Access<'_>,
) -> Result<Option<Value>, sqlx::Error> {
    let (id, identifier) = match *target {
        Target::Id(id) => (Some(id), None),
        Target::Identifier(kind, token) => (None, Some((kind, token))),
    };
    let row: Option<Profile360Row> = sqlx::query_as(PROFILE_360)
        .bind(id)
        .bind(&access.who.name)
        .bind(access.route)
        .bind(access.lookup)
        .bind(identifier.map(|(k, _)| k))
        .bind(identifier.map(|(_, h)| h))
        .fetch_optional(pool)
        .await?;
    let Some((
        id,
        first_seen,
        last_seen,
        active,
        data_source,
        mut traits,
        identities,
        consents,
        totals,
        capsules,
        last,
    )) = row
    else {
        return Ok(None);
    };
    // Trait values are text; custom traits are a JSON document kept as text.
    if let Some(custom) = traits.get_mut("custom_traits") {
        if let Some(parsed) = custom
            .as_str()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
        {
            *custom = parsed;
        }
    }
    Ok(Some(json!({
        "profile_id": id,
        "first_seen": first_seen,
        "last_seen": last_seen,
        "active": active,
        "data_source": data_source,
        "traits": traits,
        "identities": identities,
        "consents": consents,
        "last_interactions": last,
        "transaction_totals": totals,
        "capsules": capsules,
    })))
}

#[derive(Clone, Copy)]
pub enum Table {
    Interactions,
    Transactions,
}

fn encode_cursor(t: DateTime<Utc>, id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{id}", t.timestamp_micros()))
}

fn decode_cursor(c: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (t, id) = text.split_once(':')?;
    Some((
        DateTime::from_timestamp_micros(t.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

/// One page, newest first, keyset-paginated on (occurred_at, event_id).
pub async fn page(
    pool: &PgPool,
    table: Table,
    id: Uuid,
    limit: i64,
    after: Option<(DateTime<Utc>, Uuid)>,
) -> Result<Value, sqlx::Error> {
    let (t, cols) = match table {
        Table::Interactions => ("interactions", interaction_columns!()),
        Table::Transactions => ("transactions", "event_id, occurred_at, order_id, status, amount::text AS amount, currency, items, payment_method, coupon, source"),
    };
    let (ts, eid) = after.unwrap_or((DateTime::<Utc>::MAX_UTC, Uuid::max()));
    let rows: Vec<(Value,)> = sqlx::query_as(&format!(
        "SELECT to_jsonb(x) FROM (SELECT {cols} FROM {t} WHERE profile_id = $1 AND (occurred_at, event_id) < ($2, $3)
          ORDER BY occurred_at DESC, event_id DESC LIMIT $4) x"
    ))
    .bind(id)
    .bind(ts)
    .bind(eid)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let mut items: Vec<Value> = rows.into_iter().map(|(v,)| v).collect();
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().and_then(|last| {
            let t = last["occurred_at"]
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())?;
            let e = last["event_id"]
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())?;
            Some(encode_cursor(t.with_timezone(&Utc), e))
        })
    } else {
        None
    };
    Ok(json!({"items": items, "next_cursor": next}))
}

async fn get_profile(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let who = match authorize(&s, &headers) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::NOT_FOUND, "no such profile");
    };
    respond_profile(
        &s,
        &who,
        &headers,
        Target::Id(id),
        "/v1/profiles/{id}",
        None,
    )
    .await
}

async fn respond_profile(
    s: &ApiState,
    who: &Principal,
    headers: &HeaderMap,
    target: Target<'_>,
    route: &str,
    lookup: Option<&str>,
) -> Response {
    let access = Access { who, route, lookup };
    match profile_json(&s.pool, &target, &access).await {
        Ok(Some(body)) => with_etag(headers, body),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such profile"),
        Err(e) => internal(e),
    }
}

async fn lookup(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let who = match authorize(&s, &headers) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let by = [
        ("email", IdentifierKind::Email),
        ("phone", IdentifierKind::Phone),
        ("user_id", IdentifierKind::UserId),
        ("anonymous_id", IdentifierKind::AnonymousId),
    ];
    let Some((name, kind, value)) = by.iter().find_map(|(n, k)| q.get(*n).map(|v| (*n, *k, v)))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "give one of email, phone, user_id, anonymous_id",
        );
    };
    let token = match s
        .vault
        .hasher()
        .identifier(&RawIdentifier::new(kind, value.as_str()))
    {
        Ok(normalized) => match s.vault.find(&[normalized]).await {
            Ok(mut found) => found.pop().flatten(),
            Err(e) => {
                tracing::error!(error = %e, "identifier vault lookup failed");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the read models are unavailable",
                );
            }
        },
        Err(_) => None,
    };
    let Some(token) = token else {
        let _ = audit(&s.pool, &who, "/v1/profiles", None, Some(name)).await;
        return error(StatusCode::NOT_FOUND, "no such profile");
    };
    let target = Target::Identifier(kind.as_str(), &token);
    respond_profile(&s, &who, &headers, target, "/v1/profiles", Some(name)).await
}

async fn list(
    s: Arc<ApiState>,
    headers: HeaderMap,
    id: String,
    q: HashMap<String, String>,
    table: Table,
    route: &str,
) -> Response {
    let who = match authorize(&s, &headers) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::NOT_FOUND, "no such profile");
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<i64>().ok())
        .unwrap_or(50)
        .clamp(1, 500);
    let after = match q.get("cursor") {
        None => None,
        Some(c) => match decode_cursor(c) {
            Some(c) => Some(c),
            None => return error(StatusCode::BAD_REQUEST, "bad cursor"),
        },
    };
    if let Err(e) = audit(&s.pool, &who, route, Some(id), None).await {
        return internal(e);
    }
    let exists: Result<Option<(i32,)>, _> =
        sqlx::query_as("SELECT 1 FROM customers WHERE profile_id = $1")
            .bind(id)
            .fetch_optional(&s.pool)
            .await;
    match exists {
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such profile"),
        Err(e) => return internal(e),
        Ok(Some(_)) => {}
    }
    match page(&s.pool, table, id, limit, after).await {
        Ok(body) => with_etag(&headers, body),
        Err(e) => internal(e),
    }
}

async fn interactions(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    list(
        s,
        headers,
        id,
        q,
        Table::Interactions,
        "/v1/profiles/{id}/interactions",
    )
    .await
}

async fn transactions(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    list(
        s,
        headers,
        id,
        q,
        Table::Transactions,
        "/v1/profiles/{id}/transactions",
    )
    .await
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/profiles", get(lookup))
        .route("/v1/profiles/{id}", get(get_profile))
        .route("/v1/profiles/{id}/interactions", get(interactions))
        .route("/v1/profiles/{id}/transactions", get(transactions))
        .with_state(state)
}
