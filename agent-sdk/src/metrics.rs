//! Agent-side Prometheus metrics, registered in a registry the program owns.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// What an agent records about the calls it serves.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// Handler run time, by tool and outcome (`ok` or an error code).
    pub tool_execution_duration: HistogramVec,
    /// Calls served, by tool and outcome.
    pub tool_calls: IntCounterVec,
    /// Calls received and waiting for a free handler slot.
    pub queue_length: IntGauge,
    /// Calls being executed.
    pub calls_in_flight: IntGauge,
    /// 1 while registered with a broker.
    pub connected: IntGauge,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry`.
    ///
    /// # Errors
    /// When a metric of the same name is already registered.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let tool_execution_duration = HistogramVec::new(
            HistogramOpts::new(
                "fem_agent_tool_execution_duration_seconds",
                "Time the agent spent executing a tool call.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.5, 14)?),
            &["tool", "outcome"],
        )?;
        let tool_calls = IntCounterVec::new(
            Opts::new(
                "fem_agent_tool_calls_total",
                "Tool calls served, by tool and outcome.",
            ),
            &["tool", "outcome"],
        )?;
        let queue_length = IntGauge::new(
            "fem_agent_queue_length",
            "Calls received and waiting for a free handler slot.",
        )?;
        let calls_in_flight =
            IntGauge::new("fem_agent_calls_in_flight", "Tool calls being executed.")?;
        let connected = IntGauge::new("fem_agent_connected", "1 while registered with a broker.")?;
        registry.register(Box::new(tool_execution_duration.clone()))?;
        registry.register(Box::new(tool_calls.clone()))?;
        registry.register(Box::new(queue_length.clone()))?;
        registry.register(Box::new(calls_in_flight.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        Ok(Self {
            tool_execution_duration,
            tool_calls,
            queue_length,
            calls_in_flight,
            connected,
        })
    }
}
