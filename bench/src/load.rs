//! Closed-loop load: `concurrency` callers each send a request, wait for its
//! echo, check it, and send the next. Latencies of the calls that start after
//! the warm-up and end before the stop are recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fem_agent_sdk::Client;
use fem_proto::Target;

/// Where echo requests go.
#[derive(Clone, Debug)]
pub(crate) enum Endpoint {
    /// A FEM tool call (`echo`) to `target`: signed, or unsigned for the
    /// broker to attest when `attested`.
    Fem {
        client: Client,
        target: Target,
        attested: bool,
    },
    /// An MCP `tools/call` through a broker's `/mcp`.
    Mcp(crate::mcp::McpClient),
    /// A NATS request on `subject`.
    Nats {
        client: async_nats::Client,
        subject: String,
    },
}

/// Echo requests of one payload size to one endpoint.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    to: Endpoint,
    /// The parameters (FEM, MCP) and the same JSON as bytes (NATS).
    params: Arc<serde_json::Value>,
    payload: Bytes,
}

impl Caller {
    /// Requests to `to` whose JSON parameters are `size` bytes.
    pub(crate) fn new(to: Endpoint, size: usize) -> Self {
        let params = echo_params(size);
        let payload = Bytes::from(serde_json::to_vec(&params).unwrap_or_default());
        Self {
            to,
            params: Arc::new(params),
            payload,
        }
    }

    /// One request; the answer must equal what was sent.
    pub(crate) async fn once(&self) -> Result<(), String> {
        let same = match &self.to {
            Endpoint::Fem {
                client,
                target,
                attested,
            } => {
                let (target, params) = (target.clone(), self.params.as_ref().clone());
                let out = if *attested {
                    // The SDK's default deadline, as `call` uses.
                    let timeout = Duration::from_secs(30);
                    client.call_attested(target, "echo", params, timeout).await
                } else {
                    client.call(target, "echo", params).await
                };
                out.map_err(|e| e.to_string())? == *self.params
            }
            Endpoint::Mcp(client) => client.call(self.params.as_ref()).await? == *self.params,
            Endpoint::Nats { client, subject } => {
                let msg = client
                    .request(subject.clone(), self.payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                msg.payload == self.payload
            }
        };
        if same {
            Ok(())
        } else {
            Err("echo differs from the request".into())
        }
    }
}

/// Figures of one measured run.
#[derive(Clone, Debug, Default)]
pub(crate) struct RunStats {
    /// Completed calls per second in the measured window.
    pub(crate) calls_per_sec: f64,
    /// Latency percentiles, microseconds.
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    /// Calls that failed (any error) in the measured window.
    pub(crate) errors: u64,
    /// Calls completed in the measured window.
    pub(crate) calls: u64,
    /// The first error seen, to say why.
    pub(crate) first_error: Option<String>,
}

/// Runs `caller` from `concurrency` tasks for `warmup + duration`.
pub(crate) async fn run(
    caller: &Caller,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> RunStats {
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop = measure_from + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let caller = caller.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let t = Instant::now();
                if t >= stop {
                    break;
                }
                let r = caller.once().await;
                let end = Instant::now();
                if t < measure_from || end > stop {
                    continue;
                }
                match r {
                    Ok(()) => lat
                        .push(u32::try_from(end.duration_since(t).as_micros()).unwrap_or(u32::MAX)),
                    Err(e) => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(e);
                        }
                        // A failing system must not turn into a busy loop.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut stats = RunStats::default();
    for t in tasks {
        if let Ok((lat, errors, first)) = t.await {
            all.extend(lat);
            stats.errors += errors;
            if stats.first_error.is_none() {
                stats.first_error = first;
            }
        }
    }
    all.sort_unstable();
    stats.calls = all.len() as u64;
    stats.calls_per_sec = all.len() as f64 / duration.as_secs_f64();
    stats.p50_us = percentile(&all, 0.50);
    stats.p90_us = percentile(&all, 0.90);
    stats.p99_us = percentile(&all, 0.99);
    stats
}

/// Nearest-rank percentile of sorted samples (0 when empty).
pub(crate) fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

/// Median of a list of figures (the mean of the middle two for an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The parameters of an echo call whose JSON text is `size` bytes:
/// `{"data":"xxxx..."}`.
pub(crate) fn echo_params(size: usize) -> serde_json::Value {
    let overhead = r#"{"data":""}"#.len();
    serde_json::json!({ "data": "x".repeat(size.saturating_sub(overhead)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let s: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&s, 0.5), 50.0);
        assert_eq!(percentile(&s, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn echo_params_have_the_asked_size() {
        for size in [256, 16 * 1024] {
            assert_eq!(
                serde_json::to_vec(&echo_params(size))
                    .unwrap_or_default()
                    .len(),
                size
            );
        }
    }
}
