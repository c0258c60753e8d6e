//! Prometheus metrics: one registry created at start and passed around.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use prometheus::core::Collector;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Label sets a [`Family`] remembers; further ones are looked up each time.
const FAMILY_SLOTS: usize = 32;

/// A labelled metric family of prometheus.
pub trait Labelled: Clone + Collector + 'static {
    /// One child.
    type Child: Clone;
    /// As prometheus' `with_label_values`.
    fn lookup(&self, labels: &[&str]) -> Self::Child;
}

impl Labelled for IntCounterVec {
    type Child = IntCounter;
    fn lookup(&self, labels: &[&str]) -> IntCounter {
        self.with_label_values(labels)
    }
}

impl Labelled for HistogramVec {
    type Child = Histogram;
    fn lookup(&self, labels: &[&str]) -> Histogram {
        self.with_label_values(labels)
    }
}

/// A labelled metric recorded on every call or envelope, whose children
/// are found without hashing or locking once seen: prometheus'
/// `with_label_values` hashes the labels and takes a read lock each time.
/// A child stays what prometheus returned for its labels (these families
/// are never pruned), so what is exported is unchanged.
#[derive(Clone)]
pub struct Family<V: Labelled> {
    vec: V,
    seen: Arc<[Slot<V::Child>]>,
}

/// A remembered label set and its child.
type Slot<M> = OnceLock<(Box<[String]>, M)>;

impl<V: Labelled> std::fmt::Debug for Family<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seen = self.seen.iter().filter(|s| s.get().is_some()).count();
        f.debug_struct("Family").field("seen", &seen).finish()
    }
}

/// A child of a [`Family`]: remembered, or looked up for this use only.
#[derive(Debug)]
pub enum Child<'a, M> {
    /// Found among the remembered label sets.
    Seen(&'a M),
    /// Looked up in the family (no free slot was left).
    Looked(M),
}

impl<M> Deref for Child<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        match self {
            Self::Seen(m) => m,
            Self::Looked(m) => m,
        }
    }
}

impl<V: Labelled> Family<V> {
    fn new(vec: V) -> Self {
        Self {
            vec,
            seen: (0..FAMILY_SLOTS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The child for `labels`, as prometheus' `with_label_values`.
    ///
    /// # Panics
    /// As prometheus: when the number of labels is not the family's.
    pub fn with_label_values(&self, labels: &[&str]) -> Child<'_, V::Child> {
        for slot in self.seen.iter() {
            let Some((known, m)) = slot.get() else {
                break;
            };
            if known.len() == labels.len() && known.iter().zip(labels).all(|(k, l)| k == l) {
                return Child::Seen(m);
            }
        }
        let m = self.vec.lookup(labels);
        // Slots fill in order; two threads may remember the same labels
        // twice, which only costs a slot.
        for slot in self.seen.iter() {
            if slot.get().is_none() {
                let known = labels.iter().map(|l| (*l).to_owned()).collect();
                if slot.set((known, m.clone())).is_ok() {
                    break;
                }
            }
        }
        Child::Looked(m)
    }
}

/// The broker's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Current registered agents (name kept from the original deployment guide).
    pub registered_agents_total: IntGauge,
    /// Current registered agents (conventional name).
    pub registered_agents: IntGauge,
    /// Envelopes processed (all types).
    pub messages_processed_total: IntCounter,
    /// Envelopes by type and outcome.
    pub envelopes: Family<IntCounterVec>,
    /// Open connections by transport.
    pub connections: IntGaugeVec,
    /// Tool calls by outcome (ok or error code).
    pub tool_calls: Family<IntCounterVec>,
    /// Tool-call duration seen at the broker.
    pub tool_call_duration: Family<HistogramVec>,
    /// Calls in flight.
    pub calls_in_flight: IntGauge,
    /// Refusals by reason (error code).
    pub refusals: IntCounterVec,
    /// Registrations by outcome.
    pub registrations: IntCounterVec,
    /// Frames queued towards each agent session.
    pub agent_queue_length: IntGaugeVec,
    /// Envelope verification time.
    pub verify_seconds: Histogram,
    /// Bytes received on native connections.
    pub bytes_received: IntCounter,
    /// Bytes sent on native connections.
    pub bytes_sent: IntCounter,
    /// Requests served by the JSON gateway, by endpoint and status.
    pub gateway_requests: IntCounterVec,
    /// MCP requests, by method and outcome (ok or error code).
    pub mcp_requests: IntCounterVec,
    /// Federation peers by link state.
    pub federation_peers: IntGaugeVec,
    /// Agents reachable through peer brokers.
    pub routes: IntGauge,
    /// Encoded frame bytes on federation links, by direction.
    pub federation_bytes: IntCounterVec,
    /// Advertisement deltas that did not apply (a resync was asked for).
    pub federation_resyncs: IntCounter,
    /// Failed DNS SRV resolutions, by kind.
    pub discovery_errors: IntCounterVec,
    /// 1 while the broker runs in development trust (no trust anchor).
    pub development_trust: IntGauge,
    /// Times a configured limit refused or cut something, by limit.
    pub limit_hits: IntCounterVec,
    /// Bytes held in session queues and waiting calls (the --max-memory budget).
    pub budget_bytes: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    ///
    /// # Errors
    /// Only on duplicate registration (a programming error).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let limit_hits = IntCounterVec::new(
            Opts::new(
                "fem_broker_limit_hits_total",
                "Times a configured limit refused or cut something, by limit (README \"Limits\").",
            ),
            &["limit"],
        )?;
        let budget_bytes = IntGauge::new(
            "fem_broker_memory_budget_bytes",
            "Bytes held in session queues and waiting calls, counted against --max-memory.",
        )?;
        let registered_agents_total = IntGauge::new(
            "fem_broker_registered_agents_total",
            "Agents currently registered (gauge; name kept from the FEM deployment guide).",
        )?;
        let registered_agents = IntGauge::new(
            "fem_broker_registered_agents",
            "Agents currently registered.",
        )?;
        let messages_processed_total = IntCounter::new(
            "fem_broker_messages_processed_total",
            "Envelopes processed by the broker.",
        )?;
        let envelopes = IntCounterVec::new(
            Opts::new(
                "fem_broker_envelopes_total",
                "Envelopes received, by type and outcome.",
            ),
            &["type", "outcome"],
        )?;
        let connections = IntGaugeVec::new(
            Opts::new(
                "fem_broker_connections",
                "Open client connections, by transport.",
            ),
            &["transport"],
        )?;
        let tool_calls = IntCounterVec::new(
            Opts::new(
                "fem_broker_tool_calls_total",
                "Tool calls answered, by outcome.",
            ),
            &["outcome"],
        )?;
        let tool_call_duration = HistogramVec::new(
            HistogramOpts::new(
                "fem_broker_tool_call_duration_seconds",
                "Time from a call's arrival to its terminal answer.",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.5, 16)?),
            &["outcome"],
        )?;
        let calls_in_flight = IntGauge::new(
            "fem_broker_calls_in_flight",
            "Tool calls awaiting an answer.",
        )?;
        let refusals = IntCounterVec::new(
            Opts::new(
                "fem_broker_refusals_total",
                "Envelopes or connections refused, by reason.",
            ),
            &["reason"],
        )?;
        let registrations = IntCounterVec::new(
            Opts::new(
                "fem_broker_registrations_total",
                "Registration attempts, by outcome.",
            ),
            &["outcome"],
        )?;
        let agent_queue_length = IntGaugeVec::new(
            Opts::new(
                "fem_broker_agent_queue_length",
                "Calls waiting at the broker for a free slot on each agent.",
            ),
            &["agent"],
        )?;
        let verify_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fem_broker_verify_seconds",
                "Signature and replay checks per envelope.",
            )
            .buckets(prometheus::exponential_buckets(0.00001, 2.0, 12)?),
        )?;
        let bytes_received = IntCounter::new(
            "fem_broker_received_bytes_total",
            "Bytes received on native connections.",
        )?;
        let bytes_sent = IntCounter::new(
            "fem_broker_sent_bytes_total",
            "Bytes sent on native connections.",
        )?;
        let gateway_requests = IntCounterVec::new(
            Opts::new(
                "fem_broker_gateway_requests_total",
                "JSON gateway requests, by endpoint and status.",
            ),
            &["endpoint", "status"],
        )?;
        let mcp_requests = IntCounterVec::new(
            Opts::new(
                "fem_broker_mcp_requests_total",
                "MCP requests, by method and outcome (ok or error code).",
            ),
            &["method", "outcome"],
        )?;
        let federation_peers = IntGaugeVec::new(
            Opts::new(
                "fem_broker_federation_peers",
                "Federation peers, by link state.",
            ),
            &["state"],
        )?;
        let routes = IntGauge::new(
            "fem_broker_routes",
            "Agents reachable through peer brokers.",
        )?;
        let federation_bytes = IntCounterVec::new(
            Opts::new(
                "fem_broker_federation_bytes_total",
                "Encoded frame bytes on federation links, by direction (sent or received).",
            ),
            &["direction"],
        )?;
        let federation_resyncs = IntCounter::new(
            "fem_broker_federation_resyncs_total",
            "Advertisement deltas from peers that did not apply to what was held (a full advertisement was asked for).",
        )?;
        registry.register(Box::new(federation_bytes.clone()))?;
        registry.register(Box::new(federation_resyncs.clone()))?;
        let discovery_errors = IntCounterVec::new(
            Opts::new(
                "fem_broker_discovery_errors_total",
                "Failed DNS SRV resolutions, by kind.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(discovery_errors.clone()))?;
        let development_trust = IntGauge::new(
            "fem_broker_development_trust",
            "1 when no trust anchor is configured: any key may register (ids bound on first use)",
        )?;
        registry.register(Box::new(development_trust.clone()))?;
        registry.register(Box::new(limit_hits.clone()))?;
        registry.register(Box::new(budget_bytes.clone()))?;
        registry.register(Box::new(federation_peers.clone()))?;
        registry.register(Box::new(routes.clone()))?;
        registry.register(Box::new(bytes_received.clone()))?;
        registry.register(Box::new(bytes_sent.clone()))?;
        registry.register(Box::new(gateway_requests.clone()))?;
        registry.register(Box::new(mcp_requests.clone()))?;
        registry.register(Box::new(registered_agents_total.clone()))?;
        registry.register(Box::new(registered_agents.clone()))?;
        registry.register(Box::new(messages_processed_total.clone()))?;
        registry.register(Box::new(envelopes.clone()))?;
        let envelopes = Family::new(envelopes);
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(tool_calls.clone()))?;
        registry.register(Box::new(tool_call_duration.clone()))?;
        let tool_calls = Family::new(tool_calls);
        let tool_call_duration = Family::new(tool_call_duration);
        registry.register(Box::new(calls_in_flight.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(registrations.clone()))?;
        registry.register(Box::new(agent_queue_length.clone()))?;
        registry.register(Box::new(verify_seconds.clone()))?;
        Ok(Self {
            registry,
            registered_agents_total,
            registered_agents,
            messages_processed_total,
            envelopes,
            connections,
            tool_calls,
            tool_call_duration,
            calls_in_flight,
            refusals,
            registrations,
            agent_queue_length,
            verify_seconds,
            bytes_received,
            bytes_sent,
            gateway_requests,
            mcp_requests,
            federation_peers,
            routes,
            federation_bytes,
            federation_resyncs,
            discovery_errors,
            development_trust,
            limit_hits,
            budget_bytes,
        })
    }

    /// Counts one refusal (`fem_broker_refusals_total`), by code or reason.
    pub fn refused(&self, reason: &str) {
        self.refusals.with_label_values(&[reason]).inc();
    }

    /// Counts one hit of `limit` (a name from README "Limits").
    pub fn limit_hit(&self, limit: &str) {
        self.limit_hits.with_label_values(&[limit]).inc();
    }

    /// Adds `delta` to both registered-agent gauges.
    pub fn agents_changed(&self, delta: i64) {
        self.registered_agents_total.add(delta);
        self.registered_agents.add(delta);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembered or not, every label set counts into prometheus' own
    /// child, so the exposition is what `with_label_values` would give.
    #[test]
    fn family_counts_into_prometheus_children() {
        let vec = IntCounterVec::new(Opts::new("t_total", "t"), &["a", "b"]).expect("valid");
        let family = Family::new(vec.clone());
        let labels: Vec<String> = (0..FAMILY_SLOTS + 8).map(|i| format!("l{i}")).collect();
        for round in 0..3 {
            for l in &labels {
                family.with_label_values(&[l, "x"]).inc();
            }
            family.with_label_values(&["l0", "y"]).inc_by(round + 1);
        }
        for l in &labels {
            assert_eq!(vec.with_label_values(&[l, "x"]).get(), 3, "{l}");
        }
        assert_eq!(vec.with_label_values(&["l0", "y"]).get(), 6);
        assert!(matches!(
            family.with_label_values(&["l0", "x"]),
            Child::Seen(_)
        ));
    }
}
