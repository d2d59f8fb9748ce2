//! The HTTP tracking API.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use cdp_runtime::auth::FailureThrottle;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::fields::FieldError;
use crate::metrics::{AuthFailureLabels, EventLabels, IngestMetrics, RequestLabels};
use crate::native::{self, NativeDraft};
use crate::publisher::{Prepared, PublishError, Publisher};
use crate::rejections::{self, Rejected};
use crate::segment::{self, Call, Ctx, Limits};

/// What a route does.
#[derive(Debug, Clone, Copy)]
pub enum RouteKind {
    Segment(Call),
    Batch,
    Native,
}

/// A route of the API; the router and the OpenAPI document are both built from [`ROUTES`].
#[derive(Debug)]
pub struct Route {
    pub path: &'static str,
    pub kind: RouteKind,
    pub summary: &'static str,
}

pub const ROUTES: &[Route] = &[
    Route { path: "/v1/identify", kind: RouteKind::Segment(Call::Identify), summary: "Segment identify: who the user is, with traits" },
    Route { path: "/v1/track", kind: RouteKind::Segment(Call::Track), summary: "Segment track: an action; e-commerce Order Completed/Refunded/Cancelled become transactions" },
    Route { path: "/v1/page", kind: RouteKind::Segment(Call::Page), summary: "Segment page: a web page view" },
    Route { path: "/v1/screen", kind: RouteKind::Segment(Call::Screen), summary: "Segment screen: a mobile screen view" },
    Route { path: "/v1/group", kind: RouteKind::Segment(Call::Group), summary: "Segment group: the user joined a group (recorded as a Group interaction)" },
    Route { path: "/v1/alias", kind: RouteKind::Segment(Call::Alias), summary: "Segment alias: previousId and userId are the same person" },
    Route { path: "/v1/batch", kind: RouteKind::Batch, summary: "Segment batch: up to the batch size limit of mixed calls" },
    Route { path: "/v1/import", kind: RouteKind::Batch, summary: "Alias of /v1/batch" },
    Route { path: "/v1/events", kind: RouteKind::Native, summary: "Native contract events (capsules, consent changes, transactions), single or {\"batch\": [...]}" },
];

pub struct App {
    pub publisher: Publisher,
    pub write_keys: HashMap<String, String>,
    pub limits: Limits,
    pub produce_timeout: Duration,
    pub retry_after_secs: u64,
    pub auth_failures: FailureThrottle,
    pub metrics: IngestMetrics,
    pub pool: PgPool,
}

fn error_body(errors: &[FieldError]) -> Value {
    json!({"success": false, "errors": errors})
}

fn reply(status: StatusCode, body: Value) -> (StatusCode, Response) {
    (status, (status, Json(body)).into_response())
}

/// The write key of an `Authorization: Basic` header (the user name; the password is empty).
fn write_key_from_header(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = auth
        .strip_prefix("Basic ")
        .or_else(|| auth.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let key = text.split_once(':').map_or(text.as_str(), |(k, _)| k);
    (!key.is_empty()).then(|| key.to_owned())
}

/// 401 for a request without a known write key; the client's address counts a failure.
fn unauthorized(app: &App, peer: Option<IpAddr>) -> (StatusCode, Response) {
    if let Some(ip) = peer {
        app.auth_failures.failed(ip, Instant::now());
    }
    app.metrics
        .auth_failures
        .get_or_create(&AuthFailureLabels {
            outcome: "unknown_key",
        })
        .inc();
    let (status, mut resp) = reply(
        StatusCode::UNAUTHORIZED,
        error_body(&[FieldError::new(
            "authorization",
            "unknown or missing write key (HTTP Basic, write key as user name)",
        )]),
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"cdp\""),
    );
    (status, resp)
}

/// 429 for an address that failed to authenticate too often: its request is not read.
fn throttled(app: &App, wait: Duration) -> (StatusCode, Response) {
    app.metrics
        .auth_failures
        .get_or_create(&AuthFailureLabels {
            outcome: "throttled",
        })
        .inc();
    let (status, mut resp) = reply(
        StatusCode::TOO_MANY_REQUESTS,
        error_body(&[FieldError::new(
            "authorization",
            "too many failed authentications from this address; retry later",
        )]),
    );
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    (status, resp)
}

async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Vec<u8>, (StatusCode, FieldError)> {
    let too_big = |n: String| {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            FieldError::new("body", format!("is {n} bytes, over the {limit}-byte limit")),
        )
    };
    let raw = axum::body::to_bytes(body, limit + 1)
        .await
        .map_err(|_| too_big("more than".to_owned() + &format!(" {limit}")))?;
    if raw.len() > limit {
        return Err(too_big(raw.len().to_string()));
    }
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::GzDecoder::new(&raw[..])
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                FieldError::new("body", "is not valid gzip"),
            )
        })?;
    if out.len() > limit {
        return Err(too_big(format!("more than {limit} decompressed")));
    }
    Ok(out)
}

/// The last segment of a path without indexes: a bounded metric label.
fn reason_label(path: &str) -> String {
    let last = path.rsplit('.').next().unwrap_or(path);
    let last = last.split('[').next().unwrap_or(last);
    if last.is_empty() {
        "body".to_owned()
    } else {
        last.chars().take(40).collect()
    }
}

/// Parsed and validated drafts of a request, and its rejections.
#[derive(Default)]
struct Sorted {
    customer: Vec<crate::publisher::Draft<cdp_schemas::CustomerEvent>>,
    capsule: Vec<crate::publisher::Draft<cdp_schemas::CapsuleEvent>>,
    /// The message (position and id) each customer and capsule draft came from.
    customer_from: Vec<usize>,
    capsule_from: Vec<usize>,
    message_ids: Vec<Option<String>>,
    rejected: Vec<Rejected>,
    accepted_messages: usize,
}

/// The message id as the rejection log keeps it: at most 100 characters, NUL spelled out.
fn message_id_of(v: &Value) -> Option<String> {
    match v.get("messageId") {
        Some(Value::String(s)) => {
            let head: String = s.chars().take(100).collect();
            Some(crate::fields::spell_nul(&head).into_owned())
        }
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn sort_messages(
    ctx: &Ctx<'_>,
    kind: RouteKind,
    items: &[(String, &Value, Option<Call>)],
) -> Sorted {
    let mut out = Sorted::default();
    for (index, (path, v, call)) in items.iter().enumerate() {
        out.message_ids.push(message_id_of(v));
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0);
        let nul = crate::fields::nul_characters(path, v);
        let result = if !nul.is_empty() {
            Err(nul)
        } else if size > ctx.limits.max_event_bytes {
            Err(vec![FieldError::new(
                if path.is_empty() {
                    "body".to_owned()
                } else {
                    path.clone()
                },
                format!(
                    "event is {size} bytes, over the {}-byte limit",
                    ctx.limits.max_event_bytes
                ),
            )])
        } else {
            match (kind, call) {
                (RouteKind::Native, _) => native::parse(ctx, path, v).map(|(m, d)| {
                    match d {
                        NativeDraft::Customer(c) => {
                            out.customer.push(c);
                            out.customer_from.push(index);
                        }
                        NativeDraft::Capsule(c) => {
                            out.capsule.push(c);
                            out.capsule_from.push(index);
                        }
                    }
                    m
                }),
                (_, Some(call)) => segment::parse(ctx, *call, path, v).map(|p| {
                    out.customer_from
                        .extend(std::iter::repeat_n(index, p.drafts.len()));
                    out.customer.extend(p.drafts);
                    p.message_id
                }),
                (_, None) => Err(vec![FieldError::new(
                    segment_type_path(path),
                    "must be one of identify, track, page, screen, group, alias",
                )]),
            }
        };
        match result {
            Ok(_) => out.accepted_messages += 1,
            Err(errors) => out.rejected.push(Rejected {
                index,
                message_id: out.message_ids[index].clone(),
                errors,
            }),
        }
    }
    out
}

fn segment_type_path(path: &str) -> String {
    crate::fields::join(path, "type")
}

/// What a request's publication did.
struct Published {
    accepted: usize,
    /// Messages refused because they carry an erased person's identifier.
    erased: Vec<Rejected>,
}

async fn publish(app: &App, sorted: Sorted) -> Result<Published, PublishError> {
    let customer = app.publisher.prepare_each(sorted.customer).await?;
    let capsule = app.publisher.prepare_each(sorted.capsule).await?;
    // A message is refused whole when any of its drafts is.
    let mut refused: Vec<usize> = customer
        .refused
        .iter()
        .map(|(i, _)| sorted.customer_from[*i])
        .chain(capsule.refused.iter().map(|(i, _)| sorted.capsule_from[*i]))
        .collect();
    refused.sort_unstable();
    refused.dedup();
    let prepared: Vec<Prepared> = customer
        .prepared
        .into_iter()
        .filter(|p| !refused.contains(&sorted.customer_from[p.draft]))
        .chain(
            capsule
                .prepared
                .into_iter()
                .filter(|p| !refused.contains(&sorted.capsule_from[p.draft])),
        )
        .collect();
    let n = prepared.len();
    app.metrics.in_flight.inc_by(n as i64);
    let started = Instant::now();
    let sent = tokio::time::timeout(app.produce_timeout, app.publisher.send(&prepared)).await;
    app.metrics.in_flight.dec_by(n as i64);
    app.metrics
        .produce_duration
        .observe(started.elapsed().as_secs_f64());
    match sent {
        Ok(r) => r?,
        Err(_) => {
            return Err(PublishError::Produce(
                cdp_runtime::kafka::producer::ProduceError::QueueFull(app.produce_timeout),
            ))
        }
    }
    let erased = refused
        .iter()
        .map(|&index| Rejected {
            index,
            message_id: sorted.message_ids[index].clone(),
            errors: vec![FieldError::new(
                "",
                "carries an identifier of an erased person: refused (the identifier is suppressed)",
            )],
        })
        .collect::<Vec<_>>();
    Ok(Published {
        accepted: sorted.accepted_messages - erased.len(),
        erased,
    })
}

/// Authenticates before reading: a request whose HTTP Basic header names an unknown write
/// key, or whose address failed too often, costs no body read and no parsing. Only a request
/// without a Basic key is read for the body's `writeKey` (Segment's libraries send either).
async fn handle(
    app: Arc<App>,
    route: &'static Route,
    peer: Option<IpAddr>,
    headers: HeaderMap,
    body: Body,
) -> (StatusCode, Response) {
    let received_at = chrono::Utc::now();
    if let Some(wait) = peer.and_then(|ip| app.auth_failures.refused(ip, Instant::now())) {
        return throttled(&app, wait);
    }
    let header_source = match write_key_from_header(&headers) {
        Some(key) => match app.write_keys.get(&key) {
            Some(source) => Some(source.clone()),
            None => return unauthorized(&app, peer),
        },
        None => None,
    };
    let bytes = match read_body(&headers, body, app.limits.max_batch_bytes).await {
        Ok(b) => b,
        Err((status, e)) => return reply(status, error_body(&[e])),
    };
    let value: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                error_body(&[FieldError::new("body", format!("is not valid JSON: {e}"))]),
            )
        }
    };
    let source = match header_source {
        Some(source) => source,
        None => match value
            .get("writeKey")
            .and_then(Value::as_str)
            .and_then(|k| app.write_keys.get(k).cloned())
        {
            Some(source) => source,
            None => return unauthorized(&app, peer),
        },
    };

    let items: Vec<(String, &Value, Option<Call>)> = match route.kind {
        RouteKind::Segment(call) => vec![(String::new(), &value, Some(call))],
        RouteKind::Batch | RouteKind::Native => match value.get("batch") {
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        format!("batch[{i}]"),
                        v,
                        v.get("type").and_then(Value::as_str).and_then(Call::parse),
                    )
                })
                .collect(),
            Some(_) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    error_body(&[FieldError::new("batch", "expected an array")]),
                )
            }
            None if matches!(route.kind, RouteKind::Native) => vec![(String::new(), &value, None)],
            None => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    error_body(&[FieldError::new("batch", "is required")]),
                )
            }
        },
    };
    let ctx = Ctx {
        source: &source,
        received_at,
        limits: &app.limits,
        hasher: app.publisher.hasher(),
        batch_sent_at: value
            .get("sentAt")
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&chrono::Utc)),
    };
    let mut sorted = sort_messages(&ctx, route.kind, &items);
    let single = matches!(route.kind, RouteKind::Segment(_))
        || (matches!(route.kind, RouteKind::Native) && value.get("batch").is_none());
    for r in &sorted.rejected {
        for e in &r.errors {
            app.metrics
                .events
                .get_or_create(&EventLabels {
                    outcome: "rejected",
                    reason: reason_label(&e.path),
                })
                .inc();
        }
    }
    if let Err(e) = rejections::record(&app.pool, &source, route.path, &sorted.rejected).await {
        tracing::error!(error = %e, rejected = sorted.rejected.len(), "could not write the rejection log");
    }
    if single && !sorted.rejected.is_empty() {
        let errors: Vec<FieldError> = sorted
            .rejected
            .iter()
            .flat_map(|r| r.errors.clone())
            .collect();
        return reply(StatusCode::BAD_REQUEST, error_body(&errors));
    }
    let mut rejected = std::mem::take(&mut sorted.rejected);
    match publish(&app, sorted).await {
        Ok(Published { accepted, erased }) => {
            app.metrics
                .events
                .get_or_create(&EventLabels {
                    outcome: "accepted",
                    reason: String::new(),
                })
                .inc_by(accepted as u64);
            if !erased.is_empty() {
                app.metrics
                    .events
                    .get_or_create(&EventLabels {
                        outcome: "rejected",
                        reason: "erased".to_owned(),
                    })
                    .inc_by(erased.len() as u64);
                if let Err(e) = rejections::record(&app.pool, &source, route.path, &erased).await {
                    tracing::error!(error = %e, rejected = erased.len(), "could not write the rejection log");
                }
            }
            if single && !erased.is_empty() {
                let errors: Vec<FieldError> =
                    erased.iter().flat_map(|r| r.errors.clone()).collect();
                return reply(StatusCode::BAD_REQUEST, error_body(&errors));
            }
            rejected.extend(erased);
            rejected.sort_by_key(|r| r.index);
            reply(
                StatusCode::OK,
                json!({"success": true, "accepted": accepted, "rejected": rejected}),
            )
        }
        Err(
            e @ (PublishError::Identifier { .. }
            | PublishError::NoIdentifier { .. }
            | PublishError::Erased { .. }),
        ) => reply(
            StatusCode::BAD_REQUEST,
            error_body(&[FieldError::new("", e.to_string())]),
        ),
        Err(e) => {
            let cause = cdp_runtime::sink::Rejection::from_error("publish", &e).reason;
            tracing::warn!(error = %cause, "events not accepted: answering 503");
            let (status, mut resp) = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                error_body(&[FieldError::new(
                    "",
                    "the event log is unavailable; nothing was accepted, retry later",
                )]),
            );
            if let Ok(v) = HeaderValue::from_str(&app.retry_after_secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            (status, resp)
        }
    }
}

/// The API's router.
pub fn router(app: Arc<App>) -> Router {
    let mut r = Router::new().route(
        "/openapi.json",
        get(|| async { Json(crate::openapi::document()) }),
    );
    for route in ROUTES {
        let app = app.clone();
        r = r.route(
            route.path,
            post(move |request: axum::extract::Request| {
                let app = app.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let peer = parts
                        .extensions
                        .get::<axum::extract::ConnectInfo<SocketAddr>>()
                        .map(|c| c.0.ip());
                    let (status, resp) =
                        handle(app.clone(), route, peer, parts.headers, body).await;
                    app.metrics
                        .requests
                        .get_or_create(&RequestLabels {
                            route: route.path,
                            status: status.as_u16(),
                        })
                        .inc();
                    resp
                }
            }),
        );
    }
    r.layer(axum::extract::DefaultBodyLimit::disable())
}
