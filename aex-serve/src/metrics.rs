//! `GET /metrics` in the Prometheus text format (by `prometheus-client`).
//!
//! - `aex_agent_budget_micro`, `aex_agent_spent_micro`, `aex_agent_reserved_micro`: per agent
//!   (label `agent`), read from the store at each scrape — so they include in-process agents and
//!   other processes sharing the database;
//! - `aex_requests_total{endpoint, status, code}`: the gateway's answers by outcome and reason
//!   (`code` is the stable reason, `ok` for a success);
//! - `aex_settlements_total{state}`: how the gateway's calls settled (`committed`, `failed`,
//!   `released`, and `estimated` counted apart);
//! - `aex_provider_latency_seconds` and `aex_gateway_overhead_seconds`: histograms of the time
//!   spent waiting on the provider, and of everything else a governed call took (admission,
//!   routing, settlement, the gateway itself);
//! - `aex_store_transactions_total`, `aex_store_writes_total` and
//!   `aex_store_transaction_seconds_total`: this process's write transactions, the operations
//!   they carried, and the time they held the store.

use std::time::Duration;

use aex_core::{ExecutionState, Kernel};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub endpoint: &'static str,
    pub status: u16,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

/// The gateway's metrics. Thread-safe.
pub(crate) struct Metrics {
    requests: Family<RequestLabels, Counter>,
    settlements: Family<StateLabels, Counter>,
    provider_latency: Histogram,
    overhead: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        // 50 µs .. ~100 s, doubling.
        let buckets = || Histogram::new(exponential_buckets(0.000_05, 2.0, 22));
        Metrics {
            requests: Family::default(),
            settlements: Family::default(),
            provider_latency: buckets(),
            overhead: buckets(),
        }
    }
}

impl Metrics {
    /// One answered request.
    pub(crate) fn answered(&self, endpoint: &'static str, status: u16, code: &str) {
        self.requests.get_or_create(&RequestLabels { endpoint, status, code: code.to_string() }).inc();
    }

    /// One settled call: its state, whether it was estimated, and — for a call that was
    /// answered — where its time went: `(waiting on the provider, in all)`.
    pub(crate) fn settled(&self, state: ExecutionState, estimated: bool, times: Option<(Duration, Duration)>) {
        let state = match state {
            ExecutionState::Committed => "committed",
            ExecutionState::Failed => "failed",
            ExecutionState::Released => "released",
            ExecutionState::Reserved | ExecutionState::Dispatched => "open",
        };
        self.settlements.get_or_create(&StateLabels { state }).inc();
        if estimated {
            self.settlements.get_or_create(&StateLabels { state: "estimated" }).inc();
        }
        if let Some((provider, total)) = times {
            self.provider_latency.observe(provider.as_secs_f64());
            self.overhead.observe(total.saturating_sub(provider).as_secs_f64());
        }
    }

    /// The text exposition, with the per-agent gauges and store counters read now.
    pub(crate) fn render(&self, kernel: &Kernel) -> aex_core::Result<String> {
        // Each scrape reads the agents into families of its own: concurrent scrapes never see
        // each other's half-filled gauges.
        let agents = kernel.list_agents()?;
        let (budget, spent, reserved) = (Family::<AgentLabels, Gauge>::default(), Family::<AgentLabels, Gauge>::default(), Family::<AgentLabels, Gauge>::default());
        for a in &agents {
            let labels = AgentLabels { agent: a.name.clone() };
            budget.get_or_create(&labels).set(a.budget_micro);
            spent.get_or_create(&labels).set(a.spent_micro);
            reserved.get_or_create(&labels).set(a.reserved_micro);
        }
        let stats = kernel.write_stats();
        let mut registry = Registry::with_prefix("aex");
        registry.register("agent_budget_micro", "Each agent's budget, micro-USD", budget);
        registry.register("agent_spent_micro", "What each agent has spent, micro-USD", spent);
        registry.register("agent_reserved_micro", "What each agent holds reserved for calls in flight, micro-USD", reserved);
        registry.register("requests", "Requests the gateway answered, by endpoint, status and reason", self.requests.clone());
        registry.register("settlements", "How the gateway's calls settled", self.settlements.clone());
        registry.register("provider_latency_seconds", "Time waiting on the provider per call", self.provider_latency.clone());
        registry.register("gateway_overhead_seconds", "Time per call not spent waiting on the provider", self.overhead.clone());
        registry.register("store_transactions", "Write transactions this process ran", ConstCounter::new(stats.transactions));
        registry.register("store_writes", "Write operations those transactions carried", ConstCounter::new(stats.writes));
        registry.register(
            "store_transaction_seconds",
            "Time write transactions held the store, from waiting for its lock to the commit",
            ConstCounter::new(stats.busy.as_secs_f64()),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).map_err(|e| aex_core::Error::Internal(format!("metrics encoding: {e}")))?;
        Ok(out)
    }
}
