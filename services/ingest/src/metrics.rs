//! Ingest metrics.

use cdp_runtime::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub outcome: &'static str,
    /// For rejections: the failing field (its last path segment), a bounded set.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    /// `unknown_key` (missing, malformed or unknown write key) or `throttled` (refused
    /// unread: its address failed too often).
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct IngestMetrics {
    pub auth_failures: Family<AuthFailureLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub events: Family<EventLabels, Counter>,
    pub produce_duration: Histogram,
    pub in_flight: Gauge,
}

impl IngestMetrics {
    pub fn register(m: &Metrics) -> Self {
        let s = Self {
            auth_failures: Family::default(),
            requests: Family::default(),
            events: Family::default(),
            produce_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            in_flight: Gauge::default(),
        };
        m.register(
            "ingest_requests",
            "HTTP requests by route and status",
            s.requests.clone(),
        );
        m.register(
            "ingest_auth_failures",
            "Requests refused for their write key, or unread because their address failed too often",
            s.auth_failures.clone(),
        );
        m.register(
            "ingest_events",
            "Events accepted or rejected (by failing field)",
            s.events.clone(),
        );
        m.register(
            "ingest_produce_duration_seconds",
            "Time from producing a request's events to the broker's acknowledgement",
            s.produce_duration.clone(),
        );
        m.register(
            "ingest_in_flight_events",
            "Events waiting for the broker's acknowledgement",
            s.in_flight.clone(),
        );
        s
    }
}
