//! The broker's shared state: the routing core behind one lock, the tables
//! that map its client and link ids to channels, and the timer task. This is
//! the only place that turns the core's outputs into I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use fem_proto::{
    AgentId, Body, Envelope, ErrorCode, FedFrame, Frame, Header, PublicKey, SignedEnvelope,
    SigningKey, ToolsDiscovered,
};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tracing::{debug, warn};

use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::route::admission::ReplayGuard;
use crate::route::{ClientId, LinkId, Micros, Output, Router, RouterConfig, now_micros};

use crate::budget::{Budget, Outbox, PushError};

/// A client's channel and the signal that closes its session.
#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub(crate) tx: Outbox,
    /// Set with the reason before `close` is notified.
    pub(crate) close_reason: Mutex<Option<(ErrorCode, String)>>,
    pub(crate) close: Notify,
    /// Time of the last frame received, ms since the epoch.
    pub(crate) last_seen_ms: AtomicU64,
    /// The session's verified grant (with a trust anchor), for revocation.
    pub(crate) credential: Mutex<Option<Arc<crate::route::admission::Credential>>>,
}

impl ClientHandle {
    pub(crate) fn new(tx: Outbox) -> Arc<Self> {
        Arc::new(Self {
            tx,
            close_reason: Mutex::new(None),
            close: Notify::new(),
            last_seen_ms: AtomicU64::new(fem_proto::now_ms()),
            credential: Mutex::new(None),
        })
    }

    /// Asks the session to send `error {code, message}` and close.
    pub(crate) fn evict(&self, code: ErrorCode, message: String) {
        if let Ok(mut r) = self.close_reason.lock() {
            r.get_or_insert((code, message));
        }
        self.close.notify_one();
    }

    /// Sends without waiting; a client whose queue is full is a slow
    /// consumer and its session is closed (its calls then fail), so other
    /// clients never wait on it.
    pub(crate) fn send(&self, frame: Frame, metrics: &Metrics) {
        match self.tx.push(frame) {
            Ok(()) => {}
            Err(PushError::Closed) => debug!("client gone; frame dropped"),
            Err(PushError::Full(limit)) => {
                warn!(
                    limit,
                    queued_bytes = self.tx.queued_bytes(),
                    "slow consumer: session queue full; closing its session"
                );
                metrics.refused(ErrorCode::SlowConsumer.as_str());
                metrics.limit_hit(limit);
                self.evict(
                    ErrorCode::SlowConsumer,
                    format!("session queue full ({limit}): the client does not read"),
                );
            }
        }
    }

    pub(crate) fn take_reason(&self) -> Option<(ErrorCode, String)> {
        self.close_reason.lock().ok().and_then(|mut r| r.take())
    }
}

/// A link's channel and the signal that closes it.
#[derive(Debug)]
pub(crate) struct LinkHandle {
    pub(crate) tx: mpsc::Sender<FedFrame>,
    pub(crate) close: Notify,
}

/// Federation state the async layer keeps; routes and links live in the
/// routing core.
#[derive(Debug, Default)]
pub(crate) struct Fed {
    pub(crate) endpoint: std::sync::OnceLock<quinn::Endpoint>,
    /// Links the configuration asks for, by readiness key, and the peer
    /// each reached once its handshake passed.
    pub(crate) required: DashMap<String, Option<AgentId>>,
    /// The key each peer broker id last linked with.
    pub(crate) linked: DashMap<AgentId, PublicKey>,
}

/// Hashes the broker's own sequential client and link ids, looked up for
/// every frame sent: FxHash (one multiplication) instead of SipHash, which
/// guards against keys chosen by a peer and these are not.
type IdHash = rustc_hash::FxBuildHasher;

/// A discovery page to sign once the router lock is released.
type Discovered = (
    ClientId,
    fem_proto::RequestId,
    Vec<fem_proto::DiscoveredTool>,
    Option<String>,
);

/// State shared by every task of one broker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) identity: SigningKey,
    pub(crate) broker_key: PublicKey,
    pub(crate) metrics: Metrics,
    pub(crate) replay: ReplayGuard,
    /// Trust anchors and verified grants, or development bindings.
    pub(crate) trust: crate::trust::Trust,
    pub(crate) conn_limit: Arc<Semaphore>,
    /// Native connections not yet registered (and TLS handshakes).
    pub(crate) pending_limit: Arc<Semaphore>,
    /// HTTPS connections.
    pub(crate) http_limit: Arc<Semaphore>,
    /// Bytes of queued frames, against `--max-memory`.
    pub(crate) budget: Arc<Budget>,
    pub(crate) ready: AtomicBool,
    /// Set at shutdown: new native sessions are refused.
    pub(crate) draining: AtomicBool,
    /// Federation state the async layer keeps (endpoint, readiness).
    pub(crate) fed: Fed,
    /// Who may call `/mcp`.
    pub(crate) mcp_principals: crate::mcp::Principals,
    /// The tools each MCP principal may call, while they hold.
    pub(crate) mcp_catalogs: crate::mcp::Catalogs,
    router: Mutex<Router>,
    clients: DashMap<ClientId, Arc<ClientHandle>, IdHash>,
    links: DashMap<LinkId, Arc<LinkHandle>, IdHash>,
    next_id: AtomicU64,
    /// The timeout the timer task sleeps towards (u64::MAX: none); only an
    /// earlier one wakes it.
    armed: AtomicU64,
    timer_wake: Arc<Notify>,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    /// Creates the state and spawns its timer and janitor tasks.
    pub(crate) fn new(
        config: BrokerConfig,
        identity: SigningKey,
        metrics: Metrics,
        mcp_principals: crate::mcp::Principals,
    ) -> Arc<Self> {
        let (shutdown, _) = watch::channel(false);
        let router = Router::new(
            RouterConfig {
                broker_id: config.broker_id.clone(),
                max_call_timeout: config.max_call_timeout,
                agent_queue_limit: config.agent_queue_limit,
                advert_delay: Duration::from_millis(50),
                caller_share_percent: config.limits.caller_share_percent,
                max_waiting_bytes: config.limits.max_memory / 2,
                discovery_page_bytes: config
                    .limits
                    .discovery_page_bytes
                    .min(fem_proto::max_forwarded_envelope(config.max_frame) / 2),
                stub: config.federation.stub,
                max_summary_bytes: config.max_frame / 2,
            },
            metrics.clone(),
            now_micros(),
        );
        if config.trust_anchors.is_empty() {
            metrics.development_trust.set(1);
            tracing::warn!(
                data_dir = %config.data_dir.display(),
                "development trust: no --trust-anchor, so any key may register and call; ids are bound to the first key that used them"
            );
        } else {
            tracing::info!(
                anchors = config.trust_anchors.len(),
                "trust anchors configured: grants required"
            );
        }
        let shared = Arc::new(Self {
            broker_key: identity.public_key(),
            identity,
            replay: ReplayGuard::for_rate(config.replay_window_ms, config.limits.replay_key_rate),
            trust: crate::trust::Trust::new(config.trust_anchors.clone(), &config.data_dir),
            conn_limit: Arc::new(Semaphore::new(config.max_connections)),
            pending_limit: Arc::new(Semaphore::new(config.limits.max_pending_connections)),
            http_limit: Arc::new(Semaphore::new(config.limits.max_http_connections)),
            budget: Budget::new(config.limits.max_memory),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            fed: Fed::default(),
            mcp_principals,
            mcp_catalogs: crate::mcp::Catalogs::default(),
            router: Mutex::new(router),
            clients: DashMap::default(),
            links: DashMap::default(),
            next_id: AtomicU64::new(1),
            armed: AtomicU64::new(u64::MAX),
            timer_wake: Arc::new(Notify::new()),
            shutdown,
            metrics,
            config,
        });
        tokio::spawn(timer_task(
            Arc::downgrade(&shared),
            Arc::clone(&shared.timer_wake),
        ));
        tokio::spawn(janitor_task(Arc::downgrade(&shared)));
        shared
    }

    /// A fresh id for a client or a link.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
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

    fn lock(&self) -> MutexGuard<'_, Router> {
        self.router
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the router (views, readiness); nothing is sent.
    pub(crate) fn view<R>(&self, f: impl FnOnce(&Router) -> R) -> R {
        f(&self.lock())
    }

    /// Runs one event through the router at the current time and carries
    /// out what it returns. Frames are handed to channels under the lock, so
    /// every client and link sees them in the router's order; discovery
    /// answers are signed after it is released.
    pub(crate) fn route<R>(&self, f: impl FnOnce(&mut Router, Micros) -> R) -> R {
        let (r, next) = self.run(f);
        if let Some(next) = next
            && next < self.armed.load(Ordering::Acquire)
        {
            self.armed.fetch_min(next, Ordering::AcqRel);
            self.timer_wake.notify_one();
        }
        r
    }

    /// [`Self::route`] without waking the timer; returns the next timeout.
    fn run<R>(&self, f: impl FnOnce(&mut Router, Micros) -> R) -> (R, Option<Micros>) {
        let mut to_sign = Vec::new();
        let (r, next) = {
            let mut router = self.lock();
            let r = f(&mut router, now_micros());
            while let Some(out) = router.poll_output() {
                self.dispatch(out, &mut to_sign);
            }
            (r, router.next_timeout())
        };
        for (to, request_id, tools, next_cursor) in to_sign {
            self.send_discovered(to, request_id, tools, next_cursor);
        }
        (r, next)
    }

    fn dispatch(&self, out: Output, to_sign: &mut Vec<Discovered>) {
        match out {
            Output::Send { to, frame } => self.send_client(to, frame),
            Output::Link { to, frame } => {
                if let Some(l) = self.links.get(&to)
                    && l.tx.try_send(frame).is_err()
                {
                    warn!(
                        link = to.0,
                        "federation link queue full or closed; closing it"
                    );
                    l.close.notify_one();
                }
            }
            Output::Evict {
                client,
                code,
                message,
            } => {
                if let Some(c) = self.clients.get(&client) {
                    c.evict(code, message);
                }
            }
            Output::CloseLink { link } => {
                if let Some(l) = self.links.get(&link) {
                    l.close.notify_one();
                }
            }
            Output::Discovered {
                to,
                request_id,
                tools,
                next_cursor,
            } => to_sign.push((to, request_id, tools, next_cursor)),
        }
    }

    /// Sends without waiting (see [`ClientHandle::send`]).
    pub(crate) fn send_client(&self, to: ClientId, frame: Frame) {
        match self.clients.get(&to) {
            Some(c) => c.send(frame, &self.metrics),
            None => debug!(client = to.0, "client gone; frame dropped"),
        }
    }

    fn send_discovered(
        &self,
        to: ClientId,
        request_id: fem_proto::RequestId,
        tools: Vec<fem_proto::DiscoveredTool>,
        next_cursor: Option<String>,
    ) {
        let env = Envelope::new(
            broker_header(&self.config.broker_id),
            Body::ToolsDiscovered(ToolsDiscovered {
                request_id,
                tools,
                next_cursor,
            }),
        );
        let frame = match SignedEnvelope::sign(&env, &self.identity) {
            Ok(signed) => Frame::Deliver {
                envelope: signed,
                signer: self.broker_key,
            },
            Err(e) => Frame::CallFailed {
                request_id,
                code: e.code(),
                message: format!("discovery answer: {e}"),
            },
        };
        self.send_client(to, frame);
    }

    /// A session queue bounded by the configured frames and bytes.
    pub(crate) fn outbox(&self) -> (Outbox, mpsc::Receiver<crate::budget::Queued>) {
        Outbox::new(
            self.config.session_queue,
            self.config.limits.session_queue_bytes,
            &self.budget,
        )
    }

    /// Refuses new work while the memory budget is spent (counted).
    ///
    /// # Errors
    /// `RATE_LIMITED` naming the budget.
    pub(crate) fn check_budget(&self) -> Result<(), crate::route::admission::Refusal> {
        if self.budget.exhausted() {
            self.metrics.limit_hit("max_memory");
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "the broker's memory budget (--max-memory {} bytes) is spent; retry later",
                    self.budget.limit()
                ),
            ));
        }
        Ok(())
    }

    /// Adds a client whose frames go to `tx`; returns its id and handle.
    pub(crate) fn add_client(&self, tx: Outbox) -> (ClientId, Arc<ClientHandle>) {
        let id = ClientId(self.next_id());
        let h = ClientHandle::new(tx);
        self.clients.insert(id, Arc::clone(&h));
        (id, h)
    }

    /// Removes a client and tells the router.
    pub(crate) fn remove_client(&self, id: ClientId) {
        self.route(|r, now| r.session_closed(now, id));
        self.clients.remove(&id);
    }

    /// The handle of a live client.
    pub(crate) fn client(&self, id: ClientId) -> Option<Arc<ClientHandle>> {
        self.clients.get(&id).map(|c| Arc::clone(c.value()))
    }

    /// Adds a link whose messages go to `tx`.
    pub(crate) fn add_link(&self, tx: mpsc::Sender<FedFrame>) -> (LinkId, Arc<LinkHandle>) {
        let id = LinkId(self.next_id());
        let h = Arc::new(LinkHandle {
            tx,
            close: Notify::new(),
        });
        self.links.insert(id, Arc::clone(&h));
        (id, h)
    }

    /// Removes a link and tells the router.
    pub(crate) fn remove_link(&self, id: LinkId) {
        self.route(|r, now| r.link_down(now, id));
        self.links.remove(&id);
    }

    /// Applies a revocation (from a client, an operator or a peer `from`):
    /// persisted, sessions of revoked grants closed at once (their calls
    /// answered), and passed on to every other peer. Returns whether it was new.
    ///
    /// # Errors
    /// As [`crate::trust::Trust::revoke`].
    pub(crate) fn apply_revocation(
        &self,
        signed: &fem_proto::SignedRevocation,
        from: Option<LinkId>,
    ) -> Result<bool, crate::route::admission::Refusal> {
        let Some(r) = self.trust.revoke(signed)? else {
            return Ok(false);
        };
        let mut closed = 0;
        for c in &self.clients {
            let hit = c
                .credential
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .is_some_and(|cred| r.revokes(&cred.grant, &cred.chain));
            if hit {
                closed += 1;
                c.evict(
                    ErrorCode::PermissionDenied,
                    "the session's grant was revoked".into(),
                );
            }
        }
        for l in &self.links {
            if Some(*l.key()) != from {
                let _ = l.tx.try_send(FedFrame::Revocations(vec![signed.clone()]));
            }
        }
        tracing::info!(revocation = %hex::encode(r.id), sessions_closed = closed, "revocation applied");
        Ok(true)
    }

    /// Calls awaiting an answer.
    pub(crate) fn pending_len(&self) -> usize {
        self.view(Router::pending_len)
    }
}

/// The header of an envelope the broker signs itself.
pub(crate) fn broker_header(id: &AgentId) -> Header {
    Header::now(id.clone())
}

/// The longest the timer task sleeps: it bounds how late a timeout fires
/// if it raced the task.
const TICK: Duration = Duration::from_millis(100);

/// One task ticks the router at its next timeout (deadlines, batched
/// advertisements); no task per call. It ends within a tick of the broker's
/// state being dropped.
async fn timer_task(weak: std::sync::Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let sleep = {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let ((), next) = shared.run(|r, now| r.tick(now));
            shared
                .armed
                .store(next.unwrap_or(u64::MAX), Ordering::Release);
            let now = now_micros();
            next.map_or(TICK, |at| {
                Duration::from_micros(at.saturating_sub(now)).min(TICK)
            })
        };
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = wake.notified() => {}
        }
    }
}

/// Forgets replay caches of keys that are gone and whose window passed.
async fn janitor_task(weak: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let live: std::collections::HashSet<PublicKey> =
            shared.view(|r| r.agents().map(|a| a.key).collect());
        shared
            .replay
            .forget_idle(fem_proto::now_ms(), |key| live.contains(key));
    }
}
