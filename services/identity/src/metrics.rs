//! The identity service's metrics.

use cdp_runtime::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Default)]
pub struct IdentityMetrics {
    pub duplicates: Counter,
    pub refusals: Family<ReasonLabels, Counter>,
    pub merges: Counter,
    pub splits: Counter,
    pub rederived_events: Counter,
    pub candidates: Gauge,
    pub automerges: Counter,
}

impl IdentityMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let m = Self::default();
        metrics.register(
            "identity_duplicate_events",
            "Customer events seen again (same event id) and given no second effect",
            m.duplicates.clone(),
        );
        metrics.register(
            "identity_refused_links",
            "Links a rule refused, by reason (blocked, severed, expired, unique, limit)",
            m.refusals.clone(),
        );
        metrics.register(
            "identity_profile_merges",
            "ProfilesMerged events emitted",
            m.merges.clone(),
        );
        metrics.register(
            "identity_profile_splits",
            "ProfileSplit events emitted",
            m.splits.clone(),
        );
        metrics.register(
            "identity_rederived_events",
            "Observations applied again because an event arrived late or a link was severed",
            m.rederived_events.clone(),
        );
        metrics.register(
            "identity_duplicate_candidates",
            "Open fuzzy duplicate candidates after the last sweep",
            m.candidates.clone(),
        );
        metrics.register(
            "identity_automatic_merges",
            "Duplicate candidates merged automatically (alias events published)",
            m.automerges.clone(),
        );
        m
    }

    pub fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }
}
