//! The admin server every service exposes: `/healthz` (the process is alive), `/readyz`
//! (every component reports ready) and `/metrics` (Prometheus / OpenMetrics text).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Readiness of the process's components.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

/// One component's readiness switch.
#[derive(Clone)]
pub struct ReadyFlag {
    name: String,
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    /// Registers a component, not ready until it says so.
    pub fn component(&self, name: impl Into<String>) -> ReadyFlag {
        let name = name.into();
        if let Ok(mut c) = self.checks.lock() {
            c.insert(name.clone(), false);
        }
        ReadyFlag {
            name,
            checks: self.checks.clone(),
        }
    }

    /// Components that are not ready (empty when the process is ready).
    pub fn unready(&self) -> Vec<String> {
        match self.checks.lock() {
            Ok(c) => c
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(n, _)| n.clone())
                .collect(),
            Err(_) => vec!["readiness registry poisoned".to_owned()],
        }
    }
}

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        if let Ok(mut c) = self.checks.lock() {
            c.insert(self.name.clone(), ready);
        }
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let unready = s.readiness.unready();
    if unready.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", unready.join(", ")),
        )
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    match s.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The admin routes, for embedding or testing.
pub fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(self::metrics))
        .with_state(AdminState { metrics, readiness })
}

/// Binds the admin server; the returned future serves until shutdown.
pub async fn bind(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(metrics, readiness);
    let serve = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
    };
    Ok((local, serve))
}
