//! The erasures API (the `compliance` role of `CDP_API_TOKENS`):
//!
//! - `POST /v1/erasures` files a request: `{"identifiers": [{"kind": "email", "value": "…"},
//!   {"kind": "external_id", "namespace": "crm", "value": "…"}], "profiles": ["<uuid>"],
//!   "reason": "…", "suppress": true, "force": false}`; the caller's principal is recorded
//!   as the requester. 202 with the request id and its status URL.
//! - `GET /v1/erasures/{id}`: the request's state, counts and each service's answer.
//! - `GET /v1/erasures?limit=N`: the latest requests.
//!
//! Identifier values are personal data: they are never logged, and a value that does not
//! normalize is reported by its position only.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cdp_keystore::RawIdentifier;
use cdp_runtime::auth::{error, ApiTokens};
use cdp_schemas::IdentifierKind;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{ErasureError, Request, Requests, Status};

/// The role the erasures API requires.
pub const ROLE: &str = "compliance";

pub struct ApiState {
    pub requests: Requests,
    pub tokens: ApiTokens,
}

#[derive(Deserialize)]
struct IdentifierBody {
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    value: String,
}

#[derive(Deserialize)]
struct ErasureBody {
    #[serde(default)]
    identifiers: Vec<IdentifierBody>,
    #[serde(default)]
    profiles: Vec<Uuid>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default = "yes")]
    suppress: bool,
    #[serde(default)]
    force: bool,
}

fn yes() -> bool {
    true
}

/// A request's state as JSON.
pub fn status_json(s: &Status) -> Value {
    json!({
        "request_id": s.request_id,
        "state": s.state,
        "outcome": s.outcome,
        "requested_by": s.requested_by,
        "reason": s.reason,
        "requested_at": s.requested_at,
        "due_at": s.due_at,
        "completed_at": s.completed_at,
        "cluster": {"profiles": s.profiles, "tokens": s.tokens, "refused_links": s.refused_links},
        "key_store": {"keys_destroyed": s.keys_destroyed, "vault_rows_deleted": s.vault_rows, "suppressed": s.suppressed},
        "awaiting": s.awaiting,
        "suppress": s.suppress,
        "force": s.force,
        "answers": s.answers.iter().map(|a| json!({
            "service": a.service, "rows_deleted": a.rows_deleted, "tombstones": a.tombstones,
            "stores": a.stores,
        })).collect::<Vec<_>>(),
    })
}

fn internal(e: ErasureError) -> Response {
    tracing::error!(error = %e, "erasures API");
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

async fn create(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<ErasureBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let who = match state.tokens.authorize(&headers, ROLE) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body is not an erasure request",
        );
    };
    let mut identifiers = Vec::with_capacity(body.identifiers.len());
    for (i, id) in body.identifiers.into_iter().enumerate() {
        let Some(kind) = IdentifierKind::from_symbol(&id.kind.to_ascii_uppercase()) else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("identifiers[{i}].kind is not an identifier kind"),
            );
        };
        identifiers.push(RawIdentifier {
            kind,
            namespace: id.namespace,
            value: id.value,
        });
    }
    let request = Request {
        identifiers,
        profiles: body.profiles,
        requested_by: who.name,
        reason: body.reason,
        suppress: body.suppress,
        force: body.force,
    };
    match state.requests.file(&request).await {
        Ok(id) => (
            StatusCode::ACCEPTED,
            Json(json!({"request_id": id, "status": format!("/v1/erasures/{id}")})),
        )
            .into_response(),
        Err(ErasureError::Empty) => error(
            StatusCode::BAD_REQUEST,
            "name at least one identifier or profile",
        ),
        Err(ErasureError::Identifier(_)) => error(
            StatusCode::BAD_REQUEST,
            "an identifier does not normalize (an email, phone or external id without namespace)",
        ),
        Err(e @ ErasureError::PersonalText(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => internal(e),
    }
}

async fn one(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Response {
    if let Err(r) = state.tokens.authorize(&headers, ROLE) {
        return *r;
    }
    match state.requests.status(Some(id), 1).await {
        Ok(list) => match list.first() {
            Some(s) => Json(status_json(s)).into_response(),
            None => error(StatusCode::NOT_FOUND, "no such erasure request"),
        },
        Err(ErasureError::NoRequest(_)) => error(StatusCode::NOT_FOUND, "no such erasure request"),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn list(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = state.tokens.authorize(&headers, ROLE) {
        return *r;
    }
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    match state.requests.status(None, limit).await {
        Ok(list) => Json(json!({"requests": list.iter().map(status_json).collect::<Vec<_>>()}))
            .into_response(),
        Err(e) => internal(e),
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/erasures", get(list).post(create))
        .route("/v1/erasures/{id}", get(one))
        .with_state(state)
}
