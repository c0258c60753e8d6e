//! Shared broker state: registry, pending calls, subscriptions, and the
//! per-message operations that act on them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fem_proto::{
    AgentId, Body, Capability, DiscoverTools, DiscoveredTool, Envelope, ErrorCode, Frame, Header,
    NonceCache, ProtoError, PublicKey, RequestId, SignedEnvelope, SigningKey, ToolCall, ToolResult,
    ToolsDiscovered,
};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::registry::{AgentEntry, Queued, Registry, Selection, SessionTx};

/// Key of a call in flight: the agent executing it and the caller's request id.
pub(crate) type PendingKey = (AgentId, RequestId);

/// A call awaiting its terminal answer.
#[derive(Debug)]
pub(crate) struct Pending {
    seq: u64,
    caller: AgentId,
    caller_tx: SessionTx,
    target: Arc<AgentEntry>,
    started: Instant,
    /// True once the call took a concurrency slot on its agent (false while it waits in the queue).
    holds_slot: bool,
}

/// Maximum nonces remembered per sender within one replay window.
const MAX_NONCES_PER_SENDER: usize = 200_000;
/// Maximum tools in one discovery answer.
const MAX_DISCOVERY: usize = 1000;

/// State shared by every session of one broker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) identity: SigningKey,
    pub(crate) broker_key: PublicKey,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    pub(crate) conn_limit: Arc<Semaphore>,
    pub(crate) ready: AtomicBool,
    /// Federation state (links and routes to agents behind other brokers).
    pub(crate) fed: crate::federation::Fed,
    /// Set at shutdown: new native sessions are refused.
    pub(crate) draining: AtomicBool,
    pending: DashMap<PendingKey, Pending>,
    /// Deadlines of new calls, for the deadline task (a lock-free queue:
    /// filing one takes no lock and wakes nothing).
    deadlines: mpsc::UnboundedSender<(Instant, u64, PendingKey)>,
    /// The deadline the task sleeps towards, in ms after `started`
    /// (u64::MAX: none); only a call with an earlier one wakes it.
    deadline_armed: AtomicU64,
    deadline_wake: Arc<Notify>,
    started: Instant,
    nonces: DashMap<AgentId, Mutex<NonceCache>>,
    subs: DashMap<Capability, Vec<(AgentId, u64, SessionTx)>>,
    session_seq: AtomicU64,
    call_seq: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    /// Creates the state and spawns its deadline and janitor tasks.
    pub(crate) fn new(config: BrokerConfig, identity: SigningKey, metrics: Metrics) -> Arc<Self> {
        let (dl_tx, dl_rx) = mpsc::unbounded_channel();
        let wake = Arc::new(Notify::new());
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Self {
            broker_key: identity.public_key(),
            identity,
            registry: Registry::default(),
            metrics,
            conn_limit: Arc::new(Semaphore::new(config.max_connections)),
            ready: AtomicBool::new(false),
            fed: crate::federation::Fed::default(),
            draining: AtomicBool::new(false),
            pending: DashMap::new(),
            deadlines: dl_tx,
            deadline_armed: AtomicU64::new(u64::MAX),
            deadline_wake: Arc::clone(&wake),
            started: Instant::now(),
            nonces: DashMap::new(),
            subs: DashMap::new(),
            session_seq: AtomicU64::new(1),
            call_seq: AtomicU64::new(1),
            shutdown,
            config,
        });
        tokio::spawn(deadline_task(Arc::downgrade(&shared), dl_rx, wake));
        tokio::spawn(janitor_task(Arc::downgrade(&shared)));
        shared
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.session_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
    }

    /// Calls awaiting an answer.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Timestamp window and per-sender nonce check.
    pub(crate) fn check_replay(&self, sender: &AgentId, h: &Header) -> Result<(), ProtoError> {
        let check = |cache: &Mutex<NonceCache>| {
            let mut c = cache.lock().map_err(|_| ProtoError::RateLimited)?;
            c.check(h.timestamp_ms, &h.nonce, fem_proto::now_ms())
        };
        // Known senders take a shared lock on the shard and no id copy.
        if let Some(cache) = self.nonces.get(sender) {
            return check(&cache);
        }
        let cache = self.nonces.entry(sender.clone()).or_insert_with(|| {
            Mutex::new(NonceCache::new(
                self.config.replay_window_ms,
                MAX_NONCES_PER_SENDER,
            ))
        });
        check(&cache)
    }

    /// Removes a session's agent (if still current) and answers its calls.
    pub(crate) fn unregister(&self, entry: &Arc<AgentEntry>) {
        if self.registry.remove(&entry.id, entry.session_id) {
            crate::federation::local_changed(self);
            self.metrics.agents_changed(-1);
            let _ = self
                .metrics
                .agent_queue_length
                .remove_label_values(&[entry.id.as_str()]);
            info!(agent = %entry.id, "agent unregistered");
        }
        self.fail_calls_to(entry, "agent disconnected with the call in flight");
        self.unsubscribe_session(&entry.id, entry.session_id);
    }

    /// Answers AGENT_UNAVAILABLE to every call in flight to this session.
    pub(crate) fn fail_calls_to(&self, entry: &Arc<AgentEntry>, why: &str) {
        let keys: Vec<PendingKey> = self
            .pending
            .iter()
            .filter(|p| p.key().0 == entry.id && p.value().target.session_id == entry.session_id)
            .map(|p| p.key().clone())
            .collect();
        entry.clear_queue();
        for key in keys {
            if let Some((key, p)) = self
                .pending
                .remove_if(&key, |_, p| p.target.session_id == entry.session_id)
            {
                self.finish(
                    p,
                    Frame::CallFailed {
                        request_id: key.1,
                        code: ErrorCode::AgentUnavailable,
                        message: format!("{}: {why}", entry.id),
                    },
                    ErrorCode::AgentUnavailable.as_str(),
                );
            }
        }
    }

    /// Releases the agent slot, records metrics and sends the terminal answer.
    fn finish(&self, p: Pending, answer: Frame, outcome: &str) {
        if p.holds_slot {
            p.target.release();
            self.pump(&p.target);
        }
        self.metrics.calls_in_flight.dec();
        self.metrics.tool_calls.with_label_values(&[outcome]).inc();
        self.metrics
            .tool_call_duration
            .with_label_values(&[outcome])
            .observe(p.started.elapsed().as_secs_f64());
        self.send_or_drop_slow(&p.caller, &p.caller_tx, answer);
    }

    /// Sends without waiting; a receiver whose queue is full is a slow
    /// consumer and its session is closed, so other clients never wait on it.
    fn send_or_drop_slow(&self, id: &AgentId, tx: &SessionTx, frame: Frame) {
        match tx.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(agent = %id, "receiver gone; answer dropped")
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(agent = %id, "slow consumer: queue full; closing its session");
                self.metrics
                    .refusals
                    .with_label_values(&[ErrorCode::SlowConsumer.as_str()])
                    .inc();
                if let Some(e) = self.registry.get(id) {
                    e.evict.notify_one();
                }
            }
        }
    }

    /// Routes a verified toolCall to an agent.
    pub(crate) fn route_call(
        &self,
        caller: &Arc<AgentEntry>,
        call: ToolCall,
        signed: SignedEnvelope,
        started: Instant,
        hops_left: u8,
    ) {
        // Debug level: at info it cost about 10 us of a 300 us round trip
        // (BENCHMARKS.md); `--log-level fem_broker=debug` turns it on.
        let _span = tracing::debug_span!(
            "call",
            request = %call.request_id,
            tool = %call.tool,
            caller = %caller.id
        )
        .entered();
        let fail = |code: ErrorCode, message: String| {
            self.metrics
                .tool_calls
                .with_label_values(&[code.as_str()])
                .inc();
            debug!(request = %call.request_id, %code, %message, "call refused");
            self.send_or_drop_slow(
                &caller.id,
                &caller.tx,
                Frame::CallFailed {
                    request_id: call.request_id,
                    code,
                    message,
                },
            );
        };
        let now = fem_proto::now_ms();
        if call.deadline_ms <= now {
            return fail(
                ErrorCode::Timeout,
                "the call's deadline has already passed".into(),
            );
        }
        let budget =
            Duration::from_millis(call.deadline_ms - now).min(self.config.max_call_timeout);
        // Local agents first; then agents behind peer brokers.
        let (target, holds_slot) =
            match self
                .registry
                .select(&call.target, &call.tool, self.config.agent_queue_limit)
            {
                Ok(Selection::Slot(t)) => (t, true),
                Ok(Selection::Queue(t)) => (t, false),
                Err((code, message)) => match self.fed.select_remote(&call.target, &call.tool) {
                    Some(_) if hops_left == 0 => {
                        return fail(
                            ErrorCode::NoRoute,
                            "the call reached its broker hop limit".into(),
                        );
                    }
                    Some(t) => (t, true),
                    None => return fail(code, message),
                },
            };
        let key = (target.id.clone(), call.request_id);
        let seq = self.call_seq.fetch_add(1, Ordering::Relaxed);
        {
            use dashmap::mapref::entry::Entry;
            match self.pending.entry(key.clone()) {
                Entry::Occupied(_) => {
                    if holds_slot {
                        target.release();
                    }
                    return fail(
                        ErrorCode::BadRequest,
                        format!(
                            "request id {} is already in flight to {}",
                            call.request_id, target.id
                        ),
                    );
                }
                Entry::Vacant(v) => {
                    v.insert(Pending {
                        seq,
                        caller: caller.id.clone(),
                        caller_tx: caller.tx.clone(),
                        target: Arc::clone(&target),
                        started,
                        holds_slot,
                    });
                }
            }
        }
        self.metrics.calls_in_flight.inc();
        self.schedule_deadline(Instant::now() + budget, seq, key.clone());
        let deliver = if target.via.is_some() {
            Frame::Forward {
                hops_left: hops_left.saturating_sub(1),
                envelope: signed,
                signer: caller.key,
            }
        } else {
            Frame::Deliver {
                envelope: signed,
                signer: caller.key,
            }
        };
        if holds_slot {
            debug!(request = %call.request_id, tool = %call.tool, agent = %target.id, "routing call");
            self.send_to_agent(&target, &key, seq, deliver);
        } else {
            debug!(request = %call.request_id, tool = %call.tool, agent = %target.id, "agent busy; call queued");
            let queued = Queued {
                key: key.clone(),
                seq,
                deliver,
            };
            let limit = self.config.agent_queue_limit;
            if target.enqueue(queued, limit, |q| self.is_pending(&q.key, q.seq)) {
                self.metrics
                    .agent_queue_length
                    .with_label_values(&[target.id.as_str()])
                    .set(i64::try_from(target.queued()).unwrap_or(i64::MAX));
                // A slot may have freed between selection and enqueueing.
                self.pump(&target);
            } else if let Some((key, p)) = self.pending.remove_if(&key, |_, p| p.seq == seq) {
                self.finish(
                    p,
                    Frame::CallFailed {
                        request_id: key.1,
                        code: ErrorCode::RateLimited,
                        message: format!(
                            "agent {} is at its concurrency limit and its queue is full",
                            key.0
                        ),
                    },
                    ErrorCode::RateLimited.as_str(),
                );
            }
        }
    }

    /// Files a call's deadline for the deadline task.
    fn schedule_deadline(&self, at: Instant, seq: u64, key: PendingKey) {
        let _ = self.deadlines.send((at, seq, key));
        let at_ms = self.ms_since_start(at);
        if at_ms < self.deadline_armed.load(Ordering::Acquire) {
            self.deadline_armed.fetch_min(at_ms, Ordering::AcqRel);
            self.deadline_wake.notify_one();
        }
    }

    fn ms_since_start(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn is_pending(&self, key: &PendingKey, seq: u64) -> bool {
        self.pending.get(key).is_some_and(|p| p.seq == seq)
    }

    /// Sends a call that holds a slot; an agent that cannot take it fails it at once.
    fn send_to_agent(&self, target: &Arc<AgentEntry>, key: &PendingKey, seq: u64, deliver: Frame) {
        if target.tx.try_send(deliver).is_err() {
            if let Some((key, p)) = self.pending.remove_if(key, |_, p| p.seq == seq) {
                self.finish(
                    p,
                    Frame::CallFailed {
                        request_id: key.1,
                        code: ErrorCode::AgentUnavailable,
                        message: format!(
                            "agent {} cannot accept calls (queue full or closing)",
                            target.id
                        ),
                    },
                    ErrorCode::AgentUnavailable.as_str(),
                );
            }
        }
    }

    /// Moves waiting calls onto free slots of `agent`, oldest first,
    /// skipping calls that expired while they waited.
    fn pump(&self, agent: &Arc<AgentEntry>) {
        // Most calls find the queue empty: then the gauge (a labelled
        // lookup) is left alone; enqueueing sets it.
        if agent.queued() == 0 {
            return;
        }
        while agent.queued() > 0 && agent.try_acquire() {
            let Some(q) = agent.dequeue() else {
                agent.release();
                break;
            };
            let taken = match self.pending.get_mut(&q.key) {
                Some(mut p) if p.seq == q.seq => {
                    p.holds_slot = true;
                    true
                }
                _ => false,
            };
            if taken {
                self.send_to_agent(agent, &q.key, q.seq, q.deliver);
            } else {
                agent.release();
            }
        }
        self.metrics
            .agent_queue_length
            .with_label_values(&[agent.id.as_str()])
            .set(i64::try_from(agent.queued()).unwrap_or(i64::MAX));
    }

    /// Relays a verified toolResult to the caller of the matching call.
    pub(crate) fn deliver_result(
        &self,
        agent: &Arc<AgentEntry>,
        result: ToolResult,
        signed: SignedEnvelope,
        _h: &Header,
    ) {
        let key = (agent.id.clone(), result.request_id);
        let Some((_, p)) = self.pending.remove_if(&key, |_, p| {
            p.target.session_id == agent.session_id && p.caller == result.caller
        }) else {
            debug!(request = %result.request_id, "late or unknown toolResult dropped");
            self.metrics
                .refusals
                .with_label_values(&["LATE_RESULT"])
                .inc();
            return;
        };
        let outcome = match &result.outcome {
            fem_proto::ToolOutcome::Success(_) => "ok",
            fem_proto::ToolOutcome::Error { code, .. } => code.as_str(),
        };
        self.finish(
            p,
            Frame::Deliver {
                envelope: signed,
                signer: agent.key,
            },
            outcome,
        );
    }

    /// Answers discoverTools with a broker-signed toolsDiscovered.
    pub(crate) fn discover(&self, caller: &Arc<AgentEntry>, q: &DiscoverTools) {
        let limit = match q.limit {
            0 => MAX_DISCOVERY,
            n => (n as usize).min(MAX_DISCOVERY),
        };
        let agents = match &q.capability {
            Some(p) => self.registry.matching(p),
            None => self.registry.snapshot(),
        };
        let mut tools = Vec::new();
        'outer: for a in agents {
            let p = a.profile();
            if let Some(env) = &q.environment {
                if p.metadata.get("environment") != Some(env) {
                    continue;
                }
            }
            // Prefer the tools whose own name matches the pattern; an agent
            // whose tools are named otherwise lists all of them.
            let named: Vec<_> = match &q.capability {
                Some(pat) => p.tools.iter().filter(|t| pat.matches(&t.name)).collect(),
                None => Vec::new(),
            };
            let listed: Vec<_> = if named.is_empty() {
                p.tools.iter().collect()
            } else {
                named
            };
            for t in listed {
                if tools.len() >= limit {
                    break 'outer;
                }
                tools.push(DiscoveredTool {
                    agent_id: a.id.clone(),
                    broker_id: self.config.broker_id.clone(),
                    capabilities: p.capabilities.clone(),
                    tool: t.clone(),
                });
            }
        }
        for (agent_id, broker_id, caps, t) in self.fed.remote_tools(q.capability.as_ref()) {
            if tools.len() >= limit || q.environment.is_some() {
                break;
            }
            if tools
                .iter()
                .any(|d: &DiscoveredTool| d.agent_id == agent_id && d.tool.name == t.name)
            {
                continue;
            }
            tools.push(DiscoveredTool {
                agent_id,
                broker_id,
                capabilities: caps,
                tool: t,
            });
        }
        let env = Envelope::new(
            crate::session::broker_header(&self.config.broker_id),
            Body::ToolsDiscovered(ToolsDiscovered {
                request_id: q.request_id,
                tools,
            }),
        );
        let frame = match SignedEnvelope::sign(&env, &self.identity) {
            Ok(signed) => Frame::Deliver {
                envelope: signed,
                signer: self.broker_key,
            },
            Err(e) => Frame::CallFailed {
                request_id: q.request_id,
                code: ErrorCode::Internal,
                message: e.to_string(),
            },
        };
        self.send_or_drop_slow(&caller.id, &caller.tx, frame);
    }

    pub(crate) fn subscribe(&self, entry: &Arc<AgentEntry>, topic: Capability) {
        let mut v = self.subs.entry(topic).or_default();
        v.retain(|(id, _, _)| id != &entry.id);
        v.push((entry.id.clone(), entry.session_id, entry.tx.clone()));
    }

    pub(crate) fn unsubscribe(&self, id: &AgentId, topic: &Capability) {
        if let Some(mut v) = self.subs.get_mut(topic) {
            v.retain(|(x, _, _)| x != id);
        }
        self.subs.remove_if(topic, |_, v| v.is_empty());
    }

    fn unsubscribe_session(&self, id: &AgentId, session: u64) {
        self.subs.retain(|_, v| {
            v.retain(|(x, s, _)| !(x == id && *s == session));
            !v.is_empty()
        });
    }

    /// Fans an event out to the topic's subscribers (not back to its sender).
    pub(crate) fn emit(
        &self,
        sender: &Arc<AgentEntry>,
        topic: &Capability,
        signed: &SignedEnvelope,
    ) {
        let targets: Vec<(AgentId, SessionTx)> = self
            .subs
            .get(topic)
            .map(|v| {
                v.iter()
                    .filter(|(id, _, _)| id != &sender.id)
                    .map(|(id, _, tx)| (id.clone(), tx.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (id, tx) in targets {
            self.send_or_drop_slow(
                &id,
                &tx,
                Frame::Deliver {
                    envelope: signed.clone(),
                    signer: sender.key,
                },
            );
        }
    }

    /// A toolResult relayed back by peer broker `via`.
    pub(crate) fn remote_result(&self, via: &AgentId, signed: SignedEnvelope, signer: PublicKey) {
        let env = match signed.verify(&signer) {
            Ok(env) => env,
            Err(e) => {
                warn!(peer = %via, error = %e, "relayed result does not verify; dropped");
                self.metrics
                    .refusals
                    .with_label_values(&[e.code().as_str()])
                    .inc();
                return;
            }
        };
        let Body::ToolResult(result) = env.body else {
            return;
        };
        let key = (env.header.sender.clone(), result.request_id);
        let Some((_, p)) = self.pending.remove_if(&key, |_, p| {
            p.target.via.as_ref() == Some(via)
                && p.target.key == signer
                && p.caller == result.caller
        }) else {
            debug!(request = %result.request_id, "late or unknown relayed result dropped");
            return;
        };
        let outcome = match &result.outcome {
            fem_proto::ToolOutcome::Success(_) => "ok",
            fem_proto::ToolOutcome::Error { code, .. } => code.as_str(),
        };
        self.finish(
            p,
            Frame::Deliver {
                envelope: signed,
                signer,
            },
            outcome,
        );
    }

    /// A terminal failure relayed back by peer broker `via`.
    pub(crate) fn remote_failed(
        &self,
        via: &AgentId,
        request_id: RequestId,
        code: ErrorCode,
        message: String,
    ) {
        let key = self
            .pending
            .iter()
            .find(|p| p.key().1 == request_id && p.value().target.via.as_ref() == Some(via))
            .map(|p| p.key().clone());
        if let Some(key) = key {
            if let Some((key, p)) = self
                .pending
                .remove_if(&key, |_, p| p.target.via.as_ref() == Some(via))
            {
                self.finish(
                    p,
                    Frame::CallFailed {
                        request_id: key.1,
                        code,
                        message,
                    },
                    code.as_str(),
                );
            }
        }
    }

    /// Answers AGENT_UNAVAILABLE to every call relayed through peer `via`.
    pub(crate) fn fail_calls_via(&self, via: &AgentId, why: &str) {
        let keys: Vec<PendingKey> = self
            .pending
            .iter()
            .filter(|p| p.value().target.via.as_ref() == Some(via))
            .map(|p| p.key().clone())
            .collect();
        for key in keys {
            if let Some((key, p)) = self
                .pending
                .remove_if(&key, |_, p| p.target.via.as_ref() == Some(via))
            {
                self.finish(
                    p,
                    Frame::CallFailed {
                        request_id: key.1,
                        code: ErrorCode::AgentUnavailable,
                        message: format!("{}: {why}", key.0),
                    },
                    ErrorCode::AgentUnavailable.as_str(),
                );
            }
        }
    }

    fn expire(&self, seq: u64, key: &PendingKey) {
        if let Some((key, p)) = self.pending.remove_if(key, |_, p| p.seq == seq) {
            let waited = p.started.elapsed();
            self.finish(
                p,
                Frame::CallFailed {
                    request_id: key.1,
                    code: ErrorCode::Timeout,
                    message: format!(
                        "no answer from {} within the deadline ({} ms)",
                        key.0,
                        waited.as_millis()
                    ),
                },
                ErrorCode::Timeout.as_str(),
            );
        }
    }
}

/// The longest the deadline task sleeps: it bounds how long filed deadlines
/// wait in the queue, and how late one can fire if it raced the task.
const DEADLINE_TICK: Duration = Duration::from_millis(100);

/// The deadline task's heap of calls in flight, earliest first.
#[derive(Debug, Default)]
struct DeadlineHeap {
    heap: BinaryHeap<Reverse<(Instant, u64, PendingKey)>>,
}

impl DeadlineHeap {
    fn push(&mut self, at: Instant, seq: u64, key: PendingKey) {
        self.heap.push(Reverse((at, seq, key)));
    }

    fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Removes and returns the calls whose deadline is `now` or earlier.
    fn take_due(&mut self, now: Instant) -> Vec<(u64, PendingKey)> {
        let mut due = Vec::new();
        while self.next().is_some_and(|at| at <= now) {
            if let Some(Reverse((_, seq, key))) = self.heap.pop() {
                due.push((seq, key));
            }
        }
        due
    }

    /// Answered calls leave their entry until its deadline; when they
    /// outnumber the `in_flight` calls, drop them, so the heap follows the
    /// calls in flight, not calls/s x timeout.
    fn prune(&mut self, in_flight: usize, is_pending: impl Fn(&PendingKey, u64) -> bool) {
        if self.heap.len() > 1024 && self.heap.len() > 2 * in_flight {
            self.heap
                .retain(|Reverse((_, seq, key))| is_pending(key, *seq));
        }
    }
}

/// One task answers TIMEOUT at each call's deadline (no task per call). It
/// owns the heap, so the per-call path only queues; it ends within a tick of
/// the broker's state being dropped.
async fn deadline_task(
    shared: std::sync::Weak<Shared>,
    mut filed: mpsc::UnboundedReceiver<(Instant, u64, PendingKey)>,
    wake: Arc<Notify>,
) {
    let mut heap = DeadlineHeap::default();
    loop {
        let now = Instant::now();
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            while let Ok((at, seq, key)) = filed.try_recv() {
                heap.push(at, seq, key);
            }
            for (seq, key) in heap.take_due(now) {
                shared.expire(seq, &key);
            }
            heap.prune(shared.pending.len(), |key, seq| shared.is_pending(key, seq));
            let next = heap.next();
            shared.deadline_armed.store(
                next.map_or(u64::MAX, |at| shared.ms_since_start(at)),
                Ordering::Release,
            );
            next
        };
        let until = next.map_or(now + DEADLINE_TICK, |at| at.min(now + DEADLINE_TICK));
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => {}
            () = wake.notified() => {}
        }
    }
}

/// Forgets nonce caches of agents that are gone and whose window has passed.
async fn janitor_task(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = fem_proto::now_ms();
        shared.nonces.retain(|id, cache| {
            shared.registry.get(id).is_some()
                || cache
                    .get_mut()
                    .map(|c| {
                        c.expire(now);
                        !c.is_empty()
                    })
                    .unwrap_or(false)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_of_answered_calls_do_not_pile_up() {
        let mut heap = DeadlineHeap::default();
        let caller = AgentId::new("caller").expect("id");
        let far = Instant::now() + Duration::from_secs(600);
        // None of these calls is pending any more (answered at once), as
        // under load with long deadlines.
        for seq in 0..20_000u64 {
            heap.push(far, seq, (caller.clone(), RequestId::random()));
            heap.prune(0, |_, _| false);
        }
        let len = heap.heap.len();
        assert!(len <= 1025, "{len} stale deadlines kept");
    }
}
