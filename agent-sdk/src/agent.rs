//! [`AgentBuilder`], and serving the calls delivered to this agent's tools.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fem_proto::{
    AgentId, Body, Capability, Envelope, ErrorCode, Header, JsonText, PublicKey, RequestId,
    SigningKey, Target, ToolCall, ToolOutcome, ToolResult,
};
use tokio::sync::{Semaphore, oneshot};
use tracing::{Instrument as _, debug, info_span, warn};

use crate::caller::{Client, CloseOnDrop};
use crate::connection::{Inner, Sealing, connection_task, lock};
use crate::tool::Progress;
use crate::{AgentMetrics, Options, SdkError, Tool, ToolError, ToolRequest};

/// Builds and connects an agent.
#[derive(Clone, Debug)]
pub struct AgentBuilder {
    id: AgentId,
    key: SigningKey,
    capabilities: Vec<Capability>,
    tools: Vec<Tool>,
    metadata: BTreeMap<String, String>,
    max_concurrent: usize,
    call_timeout: Duration,
    metrics: Option<AgentMetrics>,
}

impl AgentBuilder {
    /// An agent with this id and key; no tools yet; 10 concurrent calls; 30 s per call.
    pub fn new(id: AgentId, key: SigningKey) -> Self {
        Self {
            id,
            key,
            capabilities: Vec::new(),
            tools: Vec::new(),
            metadata: BTreeMap::new(),
            max_concurrent: 10,
            call_timeout: Duration::from_secs(30),
            metrics: None,
        }
    }

    /// Adds a capability.
    ///
    /// # Errors
    /// [`SdkError::Proto`] for an invalid name.
    pub fn capability(mut self, c: &str) -> Result<Self, SdkError> {
        let c = Capability::new(c)?;
        if !self.capabilities.contains(&c) {
            self.capabilities.push(c);
        }
        Ok(self)
    }

    /// Adds a tool.
    #[must_use]
    pub fn tool(mut self, t: Tool) -> Self {
        self.tools.push(t);
        self
    }

    /// Adds a metadata entry (e.g. `environment`).
    #[must_use]
    pub fn metadata(mut self, k: &str, v: &str) -> Self {
        self.metadata.insert(k.to_owned(), v.to_owned());
        self
    }

    /// Calls served at once (the broker never sends more).
    #[must_use]
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }

    /// Records served calls in these metrics.
    #[must_use]
    pub fn metrics(mut self, m: AgentMetrics) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Upper bound on one handler's run time.
    #[must_use]
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.call_timeout = d;
        self
    }

    /// Connects, registers and starts serving. Returns once the broker accepted
    /// the registration; afterwards the connection is kept up (heartbeats,
    /// reconnection with exponential backoff, re-registration).
    ///
    /// # Errors
    /// [`SdkError::Connect`] when the first attempt fails, [`SdkError::Denied`]
    /// when the broker refuses the registration.
    pub async fn connect(self, opts: Options) -> Result<Client, SdkError> {
        start(self, opts).await
    }
}

async fn start(b: AgentBuilder, opts: Options) -> Result<Client, SdkError> {
    let max_envelope = fem_proto::max_forwarded_envelope(opts.max_frame);
    let tools = b
        .tools
        .into_iter()
        .map(|t| (t.spec.name.clone(), Arc::new(t)))
        .collect();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (shutdown, _) = tokio::sync::watch::channel(false);
    let (finished_tx, finished) = tokio::sync::watch::channel(false);
    let inner = Arc::new(Inner {
        id: b.id,
        key: b.key,
        opts,
        writer: Mutex::new(None),
        pending: Mutex::new(HashMap::new()),
        running: Mutex::new(HashMap::new()),
        acks: Mutex::new(HashMap::new()),
        subs: Mutex::new(HashMap::new()),
        tools: Mutex::new(tools),
        capabilities: Mutex::new(b.capabilities),
        metadata: b.metadata,
        max_concurrent: b.max_concurrent,
        handler_timeout: b.call_timeout,
        metrics: b.metrics,
        broker_key: Mutex::new(None),
        broker_id: Mutex::new(None),
        max_envelope: std::sync::atomic::AtomicUsize::new(max_envelope),
        shutdown: shutdown.clone(),
        finished,
    });
    let weak = Arc::downgrade(&inner);
    let (first_tx, first_rx) = oneshot::channel();
    let span = info_span!("agent", id = %inner.id);
    tokio::spawn(
        async move {
            connection_task(weak, first_tx).await;
            let _ = finished_tx.send(true);
        }
        .instrument(span),
    );
    match first_rx.await {
        Ok(Ok(())) => Ok(Client {
            inner,
            _guard: Arc::new(CloseOnDrop(shutdown)),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SdkError::Config("connection task ended".into())),
    }
}

pub(crate) fn reply_error(
    inner: &Arc<Inner>,
    epoch: u64,
    how: Sealing,
    request_id: RequestId,
    caller: AgentId,
    code: ErrorCode,
    message: String,
) {
    send_result(
        inner,
        epoch,
        how,
        ToolResult {
            request_id,
            caller,
            outcome: ToolOutcome::Error { code, message },
        },
    );
}

fn send_result(inner: &Arc<Inner>, epoch: u64, how: Sealing, result: ToolResult) {
    let (request_id, caller) = (result.request_id, result.caller.clone());
    let env = Envelope::new(Header::now(inner.id.clone()), Body::ToolResult(result));
    // Answer in the caller's format (a JSON caller, the HTTP gateway, can
    // then read the result without a postcard decoder), unsigned when the
    // call came attested.
    let seal = |env: &Envelope| inner.seal(env, how);
    let max = inner
        .max_envelope
        .load(std::sync::atomic::Ordering::Relaxed);
    let sealed = match seal(&env) {
        // Too large for the broker to forward: the caller hears so at once
        // instead of waiting for its deadline.
        Ok((_, n)) if n > max => {
            warn!(
                bytes = n,
                max, "result too large for the broker; answering TOO_LARGE"
            );
            let failed = ToolResult {
                request_id,
                caller,
                outcome: ToolOutcome::Error {
                    code: ErrorCode::TooLarge,
                    message: format!(
                        "the result is {n} bytes encoded; the broker forwards at most {max}"
                    ),
                },
            };
            seal(&Envelope::new(
                Header::now(inner.id.clone()),
                Body::ToolResult(failed),
            ))
        }
        other => other,
    };
    match sealed {
        Ok((frame, _)) => {
            let sent = inner
                .writer(epoch)
                .is_some_and(|w| w.try_send(frame).is_ok());
            if !sent {
                warn!(
                    "outgoing queue full; result dropped (the broker answers the caller at the deadline)"
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot encode a result"),
    }
}

/// A call whose sender is proven: by its signature, or (`attested_by`) by
/// the broker that vouched for it.
pub(crate) struct Proven {
    pub(crate) header: Header,
    pub(crate) signer: PublicKey,
    pub(crate) call: ToolCall,
    pub(crate) attested_by: Option<AgentId>,
}

/// Runs a delivered call on its tool.
pub(crate) fn serve_call(
    inner: &Arc<Inner>,
    epoch: u64,
    how: Sealing,
    proven: Proven,
    sem: &Arc<Semaphore>,
) {
    let Proven {
        header,
        signer,
        call,
        attested_by,
    } = proven;
    let caller = header.sender;
    // Every refusal before the handler runs answers the same call.
    let refuse = |code: ErrorCode, message: String| {
        reply_error(
            inner,
            epoch,
            how,
            call.request_id,
            caller.clone(),
            code,
            message,
        );
    };
    let addressed = match &call.target {
        Target::Agent(id) => id == &inner.id,
        Target::Capability(p) => lock(&inner.capabilities).iter().any(|c| p.matches(c)),
    };
    if !addressed {
        return refuse(
            ErrorCode::BadRequest,
            "call not addressed to this agent".into(),
        );
    }
    let Some(tool) = lock(&inner.tools).get(&call.tool).cloned() else {
        return refuse(ErrorCode::ToolNotFound, format!("no tool {}", call.tool));
    };
    // The tool's own setting decides, whatever a broker claims it declared.
    if let Some(by) = &attested_by
        && !tool.spec.accepts_attested
    {
        return refuse(
            ErrorCode::PermissionDenied,
            format!(
                "tool {} does not accept broker-attested calls (this one was attested by {by}); sign the call",
                call.tool
            ),
        );
    }
    let now = fem_proto::now_ms();
    if call.deadline_ms <= now {
        return refuse(
            ErrorCode::Timeout,
            "deadline passed before execution".into(),
        );
    }
    let budget = Duration::from_millis(call.deadline_ms - now).min(inner.handler_timeout);
    let params = match call.parameters.parse() {
        Ok(p) => p,
        Err(e) => {
            return refuse(ErrorCode::BadRequest, e.to_string());
        }
    };
    if let Err(e) = tool.validate(&params) {
        return refuse(e.code, e.message);
    }
    let inner = Arc::clone(inner);
    let sem = Arc::clone(sem);
    // A cancel from the broker aborts the call wherever it is: waiting for
    // a slot or in its handler.
    let (abort, registration) = futures::future::AbortHandle::new_pair();
    lock(&inner.running).insert(call.request_id, abort);
    // Debug level, as at the broker: a span per call is costly at info.
    let span = tracing::debug_span!("call", request = %call.request_id, tool = %call.tool, caller = %caller);
    tokio::spawn(
        async move {
            let m = inner.metrics.as_ref();
            let request_id = call.request_id;
            let run = async {
                let queued = m.map(|m| GaugeUp::new(&m.queue_length));
                let _permit = sem.acquire_owned().await;
                drop(queued);
                let _running = m.map(|m| GaugeUp::new(&m.calls_in_flight));
                let started = Instant::now();
                let req = ToolRequest {
                    caller: caller.clone(),
                    caller_key: signer,
                    attested_by,
                    request_id,
                    tool: call.tool.clone(),
                    params,
                    deadline: Instant::now() + budget,
                    progress: Progress {
                        inner: Arc::downgrade(&inner),
                        epoch,
                        request_id,
                    },
                };
                let outcome = match tokio::time::timeout(budget, (tool.handler)(req)).await {
                    Ok(Ok(v)) => ToolOutcome::Success(JsonText::from_value(&v)),
                    Ok(Err(ToolError { code, message })) => ToolOutcome::Error { code, message },
                    Err(_) => ToolOutcome::Error {
                        code: ErrorCode::Timeout,
                        message: format!("handler exceeded {} ms", budget.as_millis()),
                    },
                };
                (outcome, started)
            };
            let served = futures::future::Abortable::new(run, registration).await;
            // Before the result leaves: the broker may reuse the request id
            // for another call once it has the result.
            lock(&inner.running).remove(&request_id);
            let Ok((outcome, started)) = served else {
                if let Some(m) = m {
                    m.tool_calls
                        .with_label_values(&[call.tool.as_str(), "CANCELLED"])
                        .inc();
                }
                debug!("call cancelled; no result sent");
                return;
            };
            let label = match &outcome {
                ToolOutcome::Success(_) => "ok",
                ToolOutcome::Error { code, .. } => code.as_str(),
            };
            if let Some(m) = m {
                let labels = [call.tool.as_str(), label];
                m.tool_execution_duration
                    .with_label_values(&labels)
                    .observe(started.elapsed().as_secs_f64());
                m.tool_calls.with_label_values(&labels).inc();
            }
            debug!(outcome = label, "call served");
            send_result(
                &inner,
                epoch,
                how,
                ToolResult {
                    request_id,
                    caller,
                    outcome,
                },
            );
        }
        .instrument(span),
    );
}

/// Raises a gauge for as long as it lives (a cancelled call lowers it too).
struct GaugeUp<'a>(&'a prometheus::IntGauge);

impl<'a> GaugeUp<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for GaugeUp<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
