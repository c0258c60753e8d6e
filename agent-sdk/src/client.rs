//! The client handle and its background connection task.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fem_proto::{
    ALPN_NATIVE, AgentId, Body, Capability, CapabilityPattern, DiscoverTools, DiscoveredTool,
    EmbodimentUpdate, EmitEvent, Envelope, ErrorCode, Format, Frame, Header, JsonText, Nonce,
    NonceCache, PublicKey, RegisterAgent, RequestId, Revoke, SignedEnvelope, SigningKey, Target,
    ToolCall, ToolOutcome, ToolResult,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::tool::{Tool, ToolError, ToolRequest};
use crate::wire::{FrameReader, write_loop};
use crate::{AgentMetrics, Options, SdkError, Transport};

/// Where a call's error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This process (not connected, local deadline, bad arguments).
    Local,
    /// The broker (no route, timeout, agent unavailable, ...).
    Broker,
    /// The executing agent (the tool failed or refused).
    Agent,
}

/// A call, discovery or event that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    /// Typed code.
    pub code: ErrorCode,
    /// Message.
    pub message: String,
    /// Who reported it.
    pub origin: Origin,
}

impl CallError {
    fn local(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            origin: Origin::Local,
        }
    }
    /// The error code (to branch on).
    pub fn kind(&self) -> ErrorCode {
        self.code
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CallError {}

/// An event received on a subscribed topic.
#[derive(Clone, Debug)]
pub struct Event {
    /// Who emitted it.
    pub sender: AgentId,
    /// Topic.
    pub topic: Capability,
    /// Payload.
    pub payload: serde_json::Value,
}

type Reply = Result<serde_json::Value, CallError>;
type AckTx = oneshot::Sender<Result<(), CallError>>;

struct PendingCall {
    epoch: u64,
    tx: oneshot::Sender<Reply>,
}

struct Inner {
    id: AgentId,
    key: SigningKey,
    opts: Options,
    /// The current connection (None while disconnected): its epoch and its
    /// writer. A frame made for one connection is never sent on a later one
    /// (no silent re-execution). Senders hand frames straight to it.
    writer: Mutex<Option<(u64, mpsc::Sender<Frame>)>>,
    pending: Mutex<HashMap<RequestId, PendingCall>>,
    acks: Mutex<HashMap<Nonce, (u64, AckTx)>>,
    subs: Mutex<HashMap<Capability, Vec<mpsc::Sender<Event>>>>,
    /// Shared with the calls in flight, so serving a call copies no spec.
    tools: Mutex<BTreeMap<Capability, Arc<Tool>>>,
    capabilities: Mutex<Vec<Capability>>,
    metadata: BTreeMap<String, String>,
    max_concurrent: usize,
    handler_timeout: Duration,
    metrics: Option<AgentMetrics>,
    broker_key: Mutex<Option<PublicKey>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Becomes true when the connection task has ended.
    finished: tokio::sync::watch::Receiver<bool>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A connected agent or caller. Cheap to clone; the connection lives in a
/// background task and closes when the last clone is dropped or on [`Client::close`].
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
    _guard: Arc<CloseOnDrop>,
}

#[derive(Debug)]
struct CloseOnDrop(tokio::sync::watch::Sender<bool>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// Builds and connects an agent.
#[derive(Debug)]
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
        acks: Mutex::new(HashMap::new()),
        subs: Mutex::new(HashMap::new()),
        tools: Mutex::new(tools),
        capabilities: Mutex::new(b.capabilities),
        metadata: b.metadata,
        max_concurrent: b.max_concurrent,
        handler_timeout: b.call_timeout,
        metrics: b.metrics,
        broker_key: Mutex::new(None),
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

impl Client {
    /// Connects a pure caller (no tools).
    ///
    /// # Errors
    /// As [`AgentBuilder::connect`].
    pub async fn connect(id: AgentId, key: SigningKey, opts: Options) -> Result<Self, SdkError> {
        AgentBuilder::new(id, key)
            .max_concurrent(0)
            .connect(opts)
            .await
    }

    /// This client's agent id.
    pub fn id(&self) -> &AgentId {
        &self.inner.id
    }

    /// This client's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.key.public_key()
    }

    /// True while registered with a broker.
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.writer).is_some()
    }

    /// Waits until registered (after a reconnect), up to `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.is_connected() {
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn sign(&self, body: Body) -> Result<SignedEnvelope, CallError> {
        let env = Envelope::new(Header::now(self.inner.id.clone()), body);
        SignedEnvelope::sign(&env, &self.inner.key)
            .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))
    }

    /// The current connection's epoch and writer.
    fn connection(&self) -> Result<(u64, mpsc::Sender<Frame>), CallError> {
        lock(&self.inner.writer).clone().ok_or_else(|| {
            CallError::local(ErrorCode::AgentUnavailable, "not connected to the broker")
        })
    }

    /// Calls `tool` on `target` with the default deadline.
    ///
    /// # Errors
    /// A [`CallError`]: from the broker (NO_ROUTE, TIMEOUT, AGENT_UNAVAILABLE,
    /// RATE_LIMITED, ...), the agent (BAD_REQUEST, PERMISSION_DENIED,
    /// TOOL_FAILED, ...) or locally (not connected).
    pub async fn call(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        self.call_with_timeout(target, tool, params, self.inner.opts.call_timeout)
            .await
    }

    /// Calls `tool` on `target`; the broker answers TIMEOUT at the deadline.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_with_timeout(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        let tool = Capability::new(tool)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        let request_id = RequestId::random();
        let deadline_ms =
            fem_proto::now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX / 2);
        let signed = self.sign(Body::ToolCall(ToolCall {
            request_id,
            target,
            tool,
            parameters: JsonText::from_value(&params),
            deadline_ms,
        }))?;
        self.request(request_id, signed, timeout).await
    }

    async fn request(
        &self,
        request_id: RequestId,
        signed: SignedEnvelope,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        if signed.bytes.len() + 128 > self.inner.opts.max_frame {
            return Err(CallError::local(
                ErrorCode::TooLarge,
                "request exceeds the maximum frame size",
            ));
        }
        let (epoch, writer) = self.connection()?;
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(request_id, PendingCall { epoch, tx });
        if writer.send(Frame::Envelope(signed)).await.is_err() {
            lock(&self.inner.pending).remove(&request_id);
            return Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            ));
        }
        // The broker answers TIMEOUT at the deadline; the local timer only
        // guards against a broker that never answers.
        match tokio::time::timeout(timeout + Duration::from_secs(2), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            )),
            Err(_) => {
                lock(&self.inner.pending).remove(&request_id);
                Err(CallError::local(
                    ErrorCode::Timeout,
                    "no answer from the broker",
                ))
            }
        }
    }

    /// Lists tools whose agents have a capability matching `capability`.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn discover(
        &self,
        capability: Option<CapabilityPattern>,
        limit: u32,
    ) -> Result<Vec<DiscoveredTool>, CallError> {
        let request_id = RequestId::random();
        let signed = self.sign(Body::DiscoverTools(DiscoverTools {
            request_id,
            capability,
            environment: None,
            limit,
        }))?;
        let v = self
            .request(request_id, signed, self.inner.opts.call_timeout)
            .await?;
        serde_json::from_value(v).map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))
    }

    async fn acked(&self, nonce: Nonce, frame: Frame) -> Result<(), CallError> {
        let (epoch, writer) = self.connection()?;
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.acks).insert(nonce, (epoch, tx));
        if writer.send(frame).await.is_err() {
            return Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            ));
        }
        match tokio::time::timeout(self.inner.opts.call_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            )),
            Err(_) => {
                lock(&self.inner.acks).remove(&nonce);
                Err(CallError::local(
                    ErrorCode::Timeout,
                    "no acknowledgement from the broker",
                ))
            }
        }
    }

    async fn send_acked(&self, body: Body) -> Result<(), CallError> {
        let signed = self.sign(body)?;
        let nonce = signed
            .open()
            .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))?
            .header
            .nonce;
        self.acked(nonce, Frame::Envelope(signed)).await
    }

    /// Publishes an event on `topic`.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn emit(&self, topic: &str, payload: serde_json::Value) -> Result<(), CallError> {
        let topic = Capability::new(topic)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        self.send_acked(Body::EmitEvent(EmitEvent {
            topic,
            payload: JsonText::from_value(&payload),
        }))
        .await
    }

    /// Subscribes to `topic`; events arrive on the returned channel (kept
    /// across reconnections).
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn subscribe(&self, topic: &str) -> Result<mpsc::Receiver<Event>, CallError> {
        let topic = Capability::new(topic)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        let (tx, rx) = mpsc::channel(256);
        lock(&self.inner.subs)
            .entry(topic.clone())
            .or_default()
            .push(tx);
        let nonce = Nonce::random();
        self.acked(nonce, Frame::Subscribe { nonce, topic }).await?;
        Ok(rx)
    }

    /// Replaces this agent's tools (embodimentUpdate).
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn update_tools(&self, tools: Vec<Tool>) -> Result<(), CallError> {
        let specs = tools.iter().map(|t| t.spec.clone()).collect();
        *lock(&self.inner.tools) = tools
            .into_iter()
            .map(|t| (t.spec.name.clone(), Arc::new(t)))
            .collect();
        self.send_acked(Body::EmbodimentUpdate(EmbodimentUpdate {
            tools: specs,
            capabilities: None,
            metadata: None,
        }))
        .await
    }

    /// Removes this agent from the mesh and closes the connection.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn revoke(&self, reason: &str) -> Result<(), CallError> {
        let r = self
            .send_acked(Body::Revoke(Revoke {
                target: self.inner.id.clone(),
                reason: reason.to_owned(),
            }))
            .await;
        let _ = self.inner.shutdown.send(true);
        r
    }

    /// Starts closing the connection (pending calls fail with AGENT_UNAVAILABLE).
    pub fn close(&self) {
        let _ = self.inner.shutdown.send(true);
    }

    /// Closes the connection and waits (up to 2 s) until the broker has been
    /// told, so it unregisters the agent at once.
    pub async fn shutdown(&self) {
        self.close();
        let mut f = self.inner.finished.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), f.wait_for(|d| *d)).await;
    }
}

impl Inner {
    /// The writer of connection `epoch`, if it is still the current one.
    fn writer(&self, epoch: u64) -> Option<mpsc::Sender<Frame>> {
        match &*lock(&self.writer) {
            Some((e, w)) if *e == epoch => Some(w.clone()),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

struct Link {
    reader: Reader,
    writer: Writer,
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
    transport: &'static str,
}

async fn open_link(opts: &Options) -> Result<Link, SdkError> {
    let err = |reason: String| SdkError::Connect {
        url: opts.endpoint(),
        reason,
    };
    let addr = tokio::net::lookup_host((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| err(format!("resolve: {e}")))?
        .next()
        .ok_or_else(|| err("resolve: no address".into()))?;
    let tls = crate::tls::client_config(&opts.trust, &[ALPN_NATIVE])?;
    let mut quic_err = None;
    if opts.transport != Transport::Tcp {
        let limit = if opts.transport == Transport::Auto {
            opts.connect_timeout.min(Duration::from_secs(3))
        } else {
            opts.connect_timeout
        };
        match tokio::time::timeout(limit, open_quic(addr, &opts.host, tls.clone(), opts)).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(e)) => quic_err = Some(e),
            Err(_) => quic_err = Some(format!("QUIC handshake timed out after {limit:?}")),
        }
        if opts.transport == Transport::Quic {
            return Err(err(quic_err.unwrap_or_default()));
        }
        debug!(error = ?quic_err, "QUIC failed; trying TLS over TCP");
    }
    let tcp = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let name = server_name(&opts.host)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_NATIVE) {
            return Err("broker did not agree on the fem/1 protocol (ALPN)".to_owned());
        }
        let (r, w) = tokio::io::split(tls);
        Ok::<_, String>(Link {
            reader: Box::new(r),
            writer: Box::new(w),
            quic: None,
            transport: "tcp",
        })
    };
    match tokio::time::timeout(opts.connect_timeout, tcp).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(err(match quic_err {
            Some(q) => format!("{q}; {e}"),
            None => e,
        })),
        Err(_) => Err(err("TLS over TCP timed out".into())),
    }
}

fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("server name {host:?}: {e}"))
}

async fn open_quic(
    addr: std::net::SocketAddr,
    host: &str,
    tls: rustls::ClientConfig,
    opts: &Options,
) -> Result<Link, String> {
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("QUIC endpoint: {e}"))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("QUIC TLS: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(opts.heartbeat.min(Duration::from_secs(10))));
    // The broker never opens streams towards a client.
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    cfg.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(cfg);
    let conn = endpoint
        .connect(addr, host)
        .map_err(|e| format!("QUIC connect: {e}"))?
        .await
        .map_err(|e| format!("QUIC: {e}"))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("QUIC stream: {e}"))?;
    Ok(Link {
        reader: Box::new(recv),
        writer: Box::new(send),
        quic: Some((endpoint, conn)),
        transport: "quic",
    })
}

/// Keeps the connection up: connect, register, serve; on loss, fail what
/// was in flight, back off (exponentially, reset after a registration), and
/// start again. Ends when the client is closed or dropped, or when the very
/// first attempt fails (then `connect` reports the error).
async fn connection_task(weak: Weak<Inner>, first: oneshot::Sender<Result<(), SdkError>>) {
    let mut first = Some(first);
    let mut epoch_seq = 0u64;
    let mut backoff = Duration::ZERO;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let mut stop = inner.shutdown.subscribe();
        let stopped = *stop.borrow_and_update();
        if stopped {
            return;
        }
        let was_first = first.is_some();
        let registered = run_once(&inner, &mut first, &mut epoch_seq).await;
        if was_first && !registered {
            return;
        }
        backoff = if registered {
            inner.opts.backoff_initial
        } else {
            (backoff * 2).clamp(inner.opts.backoff_initial, inner.opts.backoff_max)
        };
        drop(inner);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

async fn run_once(
    inner: &Arc<Inner>,
    first: &mut Option<oneshot::Sender<Result<(), SdkError>>>,
    epoch_seq: &mut u64,
) -> bool {
    let report = |first: &mut Option<oneshot::Sender<Result<(), SdkError>>>, e: SdkError| {
        if let Some(f) = first.take() {
            let _ = f.send(Err(e));
        } else {
            warn!(error = %e, "reconnect failed");
        }
    };
    let link = match open_link(&inner.opts).await {
        Ok(l) => l,
        Err(e) => {
            report(first, e);
            return false;
        }
    };
    let Link {
        reader,
        writer,
        quic,
        transport,
    } = link;
    let (wtx, wrx) = mpsc::channel::<Frame>(1024);
    let max = inner.opts.max_frame;
    let writer_task = tokio::spawn(async move { write_loop(wrx, writer, max).await });
    let mut reader = FrameReader::new(reader, max);

    let close = |wtx: mpsc::Sender<Frame>, reader_task: Option<tokio::task::JoinHandle<()>>| async move {
        drop(wtx);
        if let Some(t) = reader_task {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
        if let Some((endpoint, conn)) = quic {
            conn.close(0u32.into(), b"bye");
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        }
    };

    // Register.
    let reg = {
        let tools = lock(&inner.tools)
            .values()
            .map(|t| t.spec.clone())
            .collect();
        Body::RegisterAgent(RegisterAgent {
            public_key: inner.key.public_key(),
            capabilities: lock(&inner.capabilities).clone(),
            tools,
            metadata: inner.metadata.clone(),
            max_concurrent_calls: u32::try_from(inner.max_concurrent).unwrap_or(u32::MAX),
        })
    };
    let env = Envelope::new(Header::now(inner.id.clone()), reg);
    let signed = match SignedEnvelope::sign(&env, &inner.key) {
        Ok(s) => s,
        Err(e) => {
            report(first, e.into());
            return false;
        }
    };
    // A grant, when the client has one, goes first (brokers with a trust
    // anchor require it before registerAgent).
    if let Some(g) = &inner.opts.grant {
        let _ = wtx.send(Frame::Grant(g.clone())).await;
    }
    let _ = wtx.send(Frame::Envelope(signed)).await;
    let answer = tokio::time::timeout(inner.opts.connect_timeout, reader.next()).await;
    let accepted = match answer {
        Ok(Ok(Some(Frame::Accepted(a)))) => a,
        Ok(Ok(Some(Frame::Denied { code, reason }))) => {
            close(wtx, None).await;
            report(first, SdkError::Denied { code, reason });
            return false;
        }
        Ok(Ok(Some(other))) => {
            close(wtx, None).await;
            report(
                first,
                SdkError::Connect {
                    url: inner.opts.endpoint(),
                    reason: format!("unexpected answer to registration: {other:?}"),
                },
            );
            return false;
        }
        Ok(Ok(None) | Err(_)) | Err(_) => {
            close(wtx, None).await;
            report(
                first,
                SdkError::Connect {
                    url: inner.opts.endpoint(),
                    reason: "no answer to registration".into(),
                },
            );
            return false;
        }
    };
    *epoch_seq += 1;
    let epoch = *epoch_seq;
    *lock(&inner.broker_key) = Some(accepted.broker_key);
    // Calls made for an earlier connection are failed, so nothing is sent
    // twice or silently lost.
    fail_pending(inner, |e| e < epoch, "connection to the broker was lost");
    *lock(&inner.writer) = Some((epoch, wtx.clone()));
    if let Some(m) = &inner.metrics {
        m.connected.set(1);
    }
    info!(broker = %accepted.broker_id, transport, "registered");
    if let Some(f) = first.take() {
        let _ = f.send(Ok(()));
    }
    // Re-subscribe.
    let topics: Vec<Capability> = lock(&inner.subs).keys().cloned().collect();
    for topic in topics {
        let _ = wtx
            .send(Frame::Subscribe {
                nonce: Nonce::random(),
                topic,
            })
            .await;
    }

    // Frames are handled on the task that reads them: no hop between the
    // socket and the waiting caller or the tool handler.
    let base = Instant::now();
    let last_rx = Arc::new(AtomicU64::new(0));
    let (ended_tx, mut ended) = oneshot::channel::<()>();
    let reader_task = {
        let (inner, wtx, last_rx) = (Arc::clone(inner), wtx.clone(), Arc::clone(&last_rx));
        let sem = Arc::new(Semaphore::new(inner.max_concurrent.max(1)));
        tokio::spawn(
            async move {
                let mut replay: HashMap<AgentId, NonceCache> = HashMap::new();
                while let Ok(Some(f)) = reader.next().await {
                    let at = u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX);
                    last_rx.store(at, Ordering::Relaxed);
                    if !handle_inbound(&inner, f, epoch, &wtx, &sem, &mut replay) {
                        break;
                    }
                }
                drop(ended_tx);
            }
            .in_current_span(),
        )
    };

    // The broker answers every heartbeat, so three silent intervals mean
    // the broker (or the path to it) is gone.
    let grace = inner.opts.heartbeat * 3;
    let mut hb = tokio::time::interval(inner.opts.heartbeat);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut stop = inner.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = &mut ended => break,
            _ = hb.tick() => {
                let silent = base.elapsed().saturating_sub(Duration::from_millis(last_rx.load(Ordering::Relaxed)));
                if silent > grace {
                    warn!(grace_ms = grace.as_millis() as u64, "broker silent; reconnecting");
                    break;
                }
                seq += 1;
                let _ = wtx.try_send(Frame::Heartbeat { seq });
            }
            // Frames already queued (e.g. a revoke) are written before the
            // writer closes: `close` waits for it.
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    *lock(&inner.writer) = None;
    if let Some(m) = &inner.metrics {
        m.connected.set(0);
    }
    fail_pending(inner, |e| e <= epoch, "connection to the broker was lost");
    close(wtx, Some(reader_task)).await;
    info!("disconnected from broker");
    true
}

fn fail_pending(inner: &Inner, which: impl Fn(u64) -> bool, why: &str) {
    let calls: Vec<PendingCall> = {
        let mut p = lock(&inner.pending);
        let ids: Vec<RequestId> = p
            .iter()
            .filter(|(_, c)| which(c.epoch))
            .map(|(k, _)| *k)
            .collect();
        ids.iter().filter_map(|k| p.remove(k)).collect()
    };
    for c in calls {
        let _ =
            c.tx.send(Err(CallError::local(ErrorCode::AgentUnavailable, why)));
    }
    let acks: Vec<oneshot::Sender<Result<(), CallError>>> = {
        let mut a = lock(&inner.acks);
        let ids: Vec<Nonce> = a
            .iter()
            .filter(|(_, (e, _))| which(*e))
            .map(|(k, _)| *k)
            .collect();
        ids.iter()
            .filter_map(|k| a.remove(k))
            .map(|(_, tx)| tx)
            .collect()
    };
    for tx in acks {
        let _ = tx.send(Err(CallError::local(ErrorCode::AgentUnavailable, why)));
    }
}

fn resolve(inner: &Inner, id: &RequestId, reply: Reply) {
    if let Some(c) = lock(&inner.pending).remove(id) {
        let _ = c.tx.send(reply);
    } else {
        debug!(request = %id, "answer for an unknown or expired request");
    }
}

/// Handles one frame from the broker; false ends the connection.
fn handle_inbound(
    inner: &Arc<Inner>,
    frame: Frame,
    epoch: u64,
    wtx: &mpsc::Sender<Frame>,
    sem: &Arc<Semaphore>,
    replay: &mut HashMap<AgentId, NonceCache>,
) -> bool {
    match frame {
        Frame::Deliver { envelope, signer } => {
            let format = envelope.format;
            let env = match envelope.verify(&signer) {
                Ok(env) => env,
                Err(e) => {
                    warn!(error = %e, "dropping an envelope whose signature does not verify");
                    return true;
                }
            };
            let cache = replay
                .entry(env.header.sender.clone())
                .or_insert_with(|| NonceCache::new(fem_proto::DEFAULT_REPLAY_WINDOW_MS, 1_000_000));
            if let Err(e) = cache.check(
                env.header.timestamp_ms,
                &env.header.nonce,
                fem_proto::now_ms(),
            ) {
                warn!(error = %e, sender = %env.header.sender, "dropping a replayed or stale envelope");
                if let Body::ToolCall(c) = &env.body {
                    reply_error(
                        inner,
                        epoch,
                        format,
                        c.request_id,
                        env.header.sender.clone(),
                        e.code(),
                        e.to_string(),
                    );
                }
                return true;
            }
            let Envelope { header, body } = env;
            match body {
                Body::ToolCall(call) => serve_call(inner, epoch, format, header, signer, call, sem),
                Body::ToolResult(r) => {
                    let reply = match r.outcome {
                        ToolOutcome::Success(v) => v.parse().map_err(|e| {
                            CallError::local(
                                ErrorCode::BadRequest,
                                format!("agent sent invalid JSON: {e}"),
                            )
                        }),
                        ToolOutcome::Error { code, message } => Err(CallError {
                            code,
                            message,
                            origin: Origin::Agent,
                        }),
                    };
                    if r.caller == inner.id {
                        resolve(inner, &r.request_id, reply);
                    }
                }
                Body::ToolsDiscovered(d) => {
                    let trusted = *lock(&inner.broker_key) == Some(signer);
                    let reply = if trusted {
                        serde_json::to_value(&d.tools)
                            .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))
                    } else {
                        Err(CallError::local(
                            ErrorCode::InvalidSignature,
                            "discovery answer not signed by the broker",
                        ))
                    };
                    resolve(inner, &d.request_id, reply);
                }
                Body::EmitEvent(ev) => {
                    let payload = ev.payload.parse().unwrap_or(serde_json::Value::Null);
                    let mut subs = lock(&inner.subs);
                    if let Some(list) = subs.get_mut(&ev.topic) {
                        list.retain(|tx| {
                            tx.try_send(Event {
                                sender: header.sender.clone(),
                                topic: ev.topic.clone(),
                                payload: payload.clone(),
                            })
                            .is_ok()
                                || !tx.is_closed()
                        });
                    }
                }
                other => debug!(kind = %other.kind(), "ignoring delivered envelope"),
            }
            true
        }
        Frame::CallFailed {
            request_id,
            code,
            message,
        } => {
            resolve(
                inner,
                &request_id,
                Err(CallError {
                    code,
                    message,
                    origin: Origin::Broker,
                }),
            );
            true
        }
        Frame::Ack { nonce } => {
            if let Some((_, tx)) = lock(&inner.acks).remove(&nonce) {
                let _ = tx.send(Ok(()));
            }
            true
        }
        Frame::Nack {
            nonce,
            code,
            message,
        } => {
            if let Some((_, tx)) = lock(&inner.acks).remove(&nonce) {
                let _ = tx.send(Err(CallError {
                    code,
                    message,
                    origin: Origin::Broker,
                }));
            }
            true
        }
        Frame::Heartbeat { seq } => {
            let _ = wtx.try_send(Frame::HeartbeatAck { seq });
            true
        }
        Frame::HeartbeatAck { .. } | Frame::Accepted(_) => true,
        Frame::Error { code, message } => {
            warn!(%code, %message, "broker closed the session");
            false
        }
        Frame::Denied { code, reason } => {
            warn!(%code, %reason, "broker denied the session");
            false
        }
        Frame::Envelope(_)
        | Frame::Subscribe { .. }
        | Frame::Unsubscribe { .. }
        | Frame::Grant(_) => {
            debug!("ignoring a client-only frame from the broker");
            true
        }
    }
}

fn reply_error(
    inner: &Arc<Inner>,
    epoch: u64,
    format: Format,
    request_id: RequestId,
    caller: AgentId,
    code: ErrorCode,
    message: String,
) {
    send_result(
        inner,
        epoch,
        format,
        ToolResult {
            request_id,
            caller,
            outcome: ToolOutcome::Error { code, message },
        },
    );
}

fn send_result(inner: &Arc<Inner>, epoch: u64, format: Format, result: ToolResult) {
    let env = Envelope::new(Header::now(inner.id.clone()), Body::ToolResult(result));
    // Answer in the caller's format: a JSON caller (the HTTP gateway) can
    // then verify and read the result without a postcard decoder.
    let signed = match format {
        Format::Json => SignedEnvelope::sign_json(&env, &inner.key),
        _ => SignedEnvelope::sign(&env, &inner.key),
    };
    match signed {
        Ok(s) => {
            let sent = inner
                .writer(epoch)
                .is_some_and(|w| w.try_send(Frame::Envelope(s)).is_ok());
            if !sent {
                warn!(
                    "outgoing queue full; result dropped (the broker answers the caller at the deadline)"
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot sign a result"),
    }
}

fn serve_call(
    inner: &Arc<Inner>,
    epoch: u64,
    format: Format,
    header: Header,
    signer: PublicKey,
    call: ToolCall,
    sem: &Arc<Semaphore>,
) {
    let caller = header.sender;
    let addressed = match &call.target {
        Target::Agent(id) => id == &inner.id,
        Target::Capability(p) => lock(&inner.capabilities).iter().any(|c| p.matches(c)),
    };
    if !addressed {
        return reply_error(
            inner,
            epoch,
            format,
            call.request_id,
            caller,
            ErrorCode::BadRequest,
            "call not addressed to this agent".into(),
        );
    }
    let Some(tool) = lock(&inner.tools).get(&call.tool).cloned() else {
        return reply_error(
            inner,
            epoch,
            format,
            call.request_id,
            caller,
            ErrorCode::ToolNotFound,
            format!("no tool {}", call.tool),
        );
    };
    let now = fem_proto::now_ms();
    if call.deadline_ms <= now {
        return reply_error(
            inner,
            epoch,
            format,
            call.request_id,
            caller,
            ErrorCode::Timeout,
            "deadline passed before execution".into(),
        );
    }
    let budget = Duration::from_millis(call.deadline_ms - now).min(inner.handler_timeout);
    let params = match call.parameters.parse() {
        Ok(p) => p,
        Err(e) => {
            return reply_error(
                inner,
                epoch,
                format,
                call.request_id,
                caller,
                ErrorCode::BadRequest,
                e.to_string(),
            );
        }
    };
    if let Err(e) = tool.validate(&params) {
        return reply_error(
            inner,
            epoch,
            format,
            call.request_id,
            caller,
            e.code,
            e.message,
        );
    }
    let inner = Arc::clone(inner);
    let sem = Arc::clone(sem);
    // Debug level, as at the broker: a span per call is costly at info.
    let span = tracing::debug_span!("call", request = %call.request_id, tool = %call.tool, caller = %caller);
    tokio::spawn(
        async move {
            let m = inner.metrics.clone();
            if let Some(m) = &m {
                m.queue_length.inc();
            }
            let _permit = sem.acquire_owned().await;
            if let Some(m) = &m {
                m.queue_length.dec();
                m.calls_in_flight.inc();
            }
            let started = Instant::now();
            let req = ToolRequest {
                caller: caller.clone(),
                caller_key: signer,
                request_id: call.request_id,
                tool: call.tool.clone(),
                params,
                deadline: Instant::now() + budget,
            };
            let outcome = match tokio::time::timeout(budget, (tool.handler)(req)).await {
                Ok(Ok(v)) => ToolOutcome::Success(JsonText::from_value(&v)),
                Ok(Err(ToolError { code, message })) => ToolOutcome::Error { code, message },
                Err(_) => ToolOutcome::Error {
                    code: ErrorCode::Timeout,
                    message: format!("handler exceeded {} ms", budget.as_millis()),
                },
            };
            let label = match &outcome {
                ToolOutcome::Success(_) => "ok",
                ToolOutcome::Error { code, .. } => code.as_str(),
            };
            if let Some(m) = &m {
                m.calls_in_flight.dec();
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
                format,
                ToolResult {
                    request_id: call.request_id,
                    caller,
                    outcome,
                },
            );
        }
        .instrument(span),
    );
}
