//! The connection task: connect (QUIC, else TLS over TCP), register, keep
//! alive with heartbeats, and reconnect with backoff; and the state it
//! shares with the [`Client`](crate::Client) handles.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fem_proto::{
    ALPN_NATIVE, AgentId, Body, Capability, Envelope, ErrorCode, Frame, Header, Nonce, PublicKey,
    RegisterAgent, RequestId, SignedEnvelope, SigningKey,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{Instrument as _, debug, info, warn};

use crate::caller::Event;
use crate::dispatch::{MAX_BATCH, handle_frames};
use crate::wire::{FrameReader, write_loop};
use crate::{AgentMetrics, CallError, Options, SdkError, Tool, Transport};

pub(crate) type Reply = Result<serde_json::Value, CallError>;
pub(crate) type AckTx = oneshot::Sender<Result<(), CallError>>;

pub(crate) struct PendingCall {
    pub(crate) epoch: u64,
    pub(crate) tx: oneshot::Sender<Reply>,
    /// Where the call's progress updates go, if the caller asked for them.
    pub(crate) progress: Option<mpsc::Sender<fem_proto::ProgressUpdate>>,
    /// Sent broker-attested: only such a call takes an unsigned result.
    pub(crate) attested: bool,
}

/// One subscription's channel.
pub(crate) struct Subscriber {
    pub(crate) tx: mpsc::Sender<Event>,
    /// Takes broker-attested (unsigned) events as well as signed ones.
    pub(crate) attested: bool,
}

pub(crate) struct Inner {
    pub(crate) id: AgentId,
    pub(crate) key: SigningKey,
    pub(crate) opts: Options,
    /// The current connection (None while disconnected): its epoch and its
    /// writer. A frame made for one connection is never sent on a later one
    /// (no silent re-execution). Senders hand frames straight to it.
    pub(crate) writer: Mutex<Option<(u64, mpsc::Sender<Frame>)>>,
    pub(crate) pending: Mutex<HashMap<RequestId, PendingCall>>,
    /// Calls this agent is serving, by request id: a `cancel` frame from the
    /// broker aborts the handler (dropping its future).
    pub(crate) running: Mutex<HashMap<RequestId, futures::future::AbortHandle>>,
    pub(crate) acks: Mutex<HashMap<Nonce, (u64, AckTx)>>,
    pub(crate) subs: Mutex<HashMap<Capability, Vec<Subscriber>>>,
    /// Shared with the calls in flight, so serving a call copies no spec.
    pub(crate) tools: Mutex<BTreeMap<Capability, Arc<Tool>>>,
    pub(crate) capabilities: Mutex<Vec<Capability>>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) max_concurrent: usize,
    pub(crate) handler_timeout: Duration,
    pub(crate) metrics: Option<AgentMetrics>,
    pub(crate) broker_key: Mutex<Option<PublicKey>>,
    /// The broker's id (from `Accepted`): the audience of our calls.
    pub(crate) broker_id: Mutex<Option<AgentId>>,
    /// The largest envelope the broker can forward (from its `Accepted`):
    /// results and requests above it are answered TOO_LARGE at once.
    pub(crate) max_envelope: AtomicUsize,
    pub(crate) shutdown: tokio::sync::watch::Sender<bool>,
    /// Becomes true when the connection task has ended.
    pub(crate) finished: tokio::sync::watch::Receiver<bool>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// How an envelope leaves this client: its encoding, and unsigned (for the
/// broker to attest) or signed. An answer takes its call's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sealing {
    pub(crate) format: fem_proto::Format,
    pub(crate) attested: bool,
}

impl Inner {
    /// The frame that sends `env` sealed as `how`, and its envelope's size.
    pub(crate) fn seal(
        &self,
        env: &Envelope,
        how: Sealing,
    ) -> Result<(Frame, usize), fem_proto::ProtoError> {
        use fem_proto::{Format, UnsignedEnvelope};
        Ok(match (how.attested, how.format) {
            (true, Format::Postcard) => unsigned(UnsignedEnvelope::encode(env)?),
            (true, Format::Json) => unsigned(UnsignedEnvelope::encode_json(env)?),
            (false, Format::Postcard) => signed(SignedEnvelope::sign(env, &self.key)?),
            (false, Format::Json) => signed(SignedEnvelope::sign_json(env, &self.key)?),
        })
    }

    /// The writer of connection `epoch`, if it is still the current one.
    pub(crate) fn writer(&self, epoch: u64) -> Option<mpsc::Sender<Frame>> {
        match &*lock(&self.writer) {
            Some((e, w)) if *e == epoch => Some(w.clone()),
            _ => None,
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

struct Link {
    reader: Reader,
    writer: Writer,
    quic: Option<(Arc<quinn::Endpoint>, quinn::Connection)>,
    transport: &'static str,
}

/// The QUIC client endpoints in use, one per runtime and address family:
/// every connection of a process (all its agents and callers) shares one
/// UDP socket and one endpoint driver instead of a socket, a driver task and
/// a receive buffer each. Each connection keeps its own TLS and transport
/// configuration (`connect_with`). An endpoint is closed when its last
/// connection drops it; one is made per tokio runtime, since its driver
/// task lives on the runtime that made it.
static ENDPOINTS: Mutex<Vec<(tokio::runtime::Id, bool, Weak<quinn::Endpoint>)>> =
    Mutex::new(Vec::new());

/// Socket buffers asked for on a shared client endpoint, which carries the
/// handshakes of every connection of the process at once: with the kernel's
/// default (about 208 KiB) a burst of them can overflow it, and each dropped
/// packet costs a retransmission timeout. The kernel caps it at
/// net.core.rmem_max / wmem_max; memory is used only while packets wait.
const CLIENT_UDP_BUFFER: usize = 4 * 1024 * 1024;

/// The shared client endpoint of this runtime for `addr`'s family, made on
/// first use.
fn client_endpoint(addr: std::net::SocketAddr) -> Result<Arc<quinn::Endpoint>, String> {
    let runtime = tokio::runtime::Handle::current().id();
    let v6 = addr.is_ipv6();
    let mut endpoints = lock(&ENDPOINTS);
    endpoints.retain(|(_, _, e)| e.strong_count() > 0);
    if let Some(e) = endpoints
        .iter()
        .find(|(r, f, _)| *r == runtime && *f == v6)
        .and_then(|(_, _, e)| e.upgrade())
    {
        return Ok(e);
    }
    let bind: std::net::SocketAddr = if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| format!("QUIC endpoint: {e}"))?;
    let socket = socket2::Socket::from(socket);
    let _ = socket.set_recv_buffer_size(CLIENT_UDP_BUFFER);
    let _ = socket.set_send_buffer_size(CLIENT_UDP_BUFFER);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| format!("QUIC endpoint: {e}"))?;
    let endpoint = Arc::new(endpoint);
    endpoints.push((runtime, v6, Arc::downgrade(&endpoint)));
    Ok(endpoint)
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
    let endpoint = client_endpoint(addr)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("QUIC TLS: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(opts.heartbeat.min(Duration::from_secs(10))));
    // The broker never opens streams towards a client.
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Nor sends datagrams.
    transport.datagram_receive_buffer_size(None);
    // Path MTU discovery with one probe at 1452 bytes rather than a binary
    // search of four from 1200: each probe is a padded packet the broker
    // parses byte by byte, on every connection (the broker does the same).
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(1452).minimum_change(1452 - 1200);
    transport.mtu_discovery_config(Some(mtud));
    cfg.transport_config(Arc::new(transport));
    let conn = endpoint
        .connect_with(cfg, addr, host)
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
pub(crate) async fn connection_task(
    weak: Weak<Inner>,
    first: oneshot::Sender<Result<(), SdkError>>,
) {
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
            drop(conn);
            // The endpoint's driver sends the close while any connection
            // uses it; the last one out waits for it (the process may be
            // about to exit).
            if Arc::strong_count(&endpoint) == 1 {
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
            }
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
    *lock(&inner.broker_id) = Some(accepted.broker_id.clone());
    let broker_max = usize::try_from(accepted.max_frame).unwrap_or(usize::MAX);
    inner.max_envelope.store(
        fem_proto::max_forwarded_envelope(max.min(broker_max)),
        Ordering::Relaxed,
    );
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
                let mut seen = crate::dispatch::Seen::default();
                // One buffer for the connection, emptied by each batch.
                let mut frames = Vec::new();
                while let Ok(Some(f)) = reader.next().await {
                    let at = u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX);
                    last_rx.store(at, Ordering::Relaxed);
                    // Frames that arrived with this one are handled with it, so
                    // their signatures are verified as one batch. A decoding
                    // error stops the collection; the next read reports it.
                    frames.push(f);
                    while frames.len() < MAX_BATCH {
                        match reader.next_buffered() {
                            Ok(Some(f)) => frames.push(f),
                            Ok(None) | Err(_) => break,
                        }
                    }
                    if !handle_frames(&inner, &mut frames, epoch, &wtx, &sem, &mut seen) {
                        break;
                    }
                }
                drop(ended_tx);
            }
            .in_current_span(),
        )
    };

    // Heartbeats at least as often as the broker asks, so it never evicts
    // a live agent; the broker answers every one, so three silent intervals
    // mean the broker (or the path to it) is gone.
    let every = inner.opts.heartbeat.min(Duration::from_millis(
        accepted.heartbeat_interval_ms.max(100),
    ));
    let grace = every * 3;
    let mut hb = tokio::time::interval(every);
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

fn unsigned(u: fem_proto::UnsignedEnvelope) -> (Frame, usize) {
    let n = u.bytes.len();
    (Frame::Unsigned(u), n)
}

fn signed(s: SignedEnvelope) -> (Frame, usize) {
    let n = s.bytes.len();
    (Frame::Envelope(s), n)
}
