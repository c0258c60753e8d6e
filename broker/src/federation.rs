//! Federation: authenticated QUIC links between brokers (ALPN `fem-fed/1`),
//! path-vector route advertisements, and calls relayed across links.
//!
//! Each broker advertises, per origin broker, the full set of agents it can
//! reach, with the path of broker ids the advertisement took. A broker drops
//! advertisements whose path holds its own id (no loops), keeps per peer only
//! the newest sequence number of each origin, prefers per origin the shortest
//! path (then the newest data), and re-advertises its
//! choice to every peer (a withdrawal where it has none). Agents behind other
//! brokers become [`AgentEntry`]s with `via` set; a call routed to one is sent
//! over the link as-is (the caller's signed bytes) with a hop limit, and the
//! result comes back the same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fem_net::wire::{FrameReader, write_loop};
use fem_proto::{
    ALPN_FEDERATION, AdvertisedAgent, AgentId, Body, Capability, CapabilityPattern, Envelope,
    ErrorCode, FedFrame, Frame, Header, PublicKey, RegisterBroker, SignedEnvelope, Target,
    ToolSpec,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::core::Shared;
use crate::registry::{AgentEntry, Profile};

/// How this broker takes part in a federation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FederationMode {
    /// No federation (links are still accepted from peers if trusted).
    #[default]
    Off,
    /// Full mesh: connect to every `peers` URL.
    Mesh,
    /// Hub: accept spokes and other hubs (and connect to `peers`, for a mesh of hubs).
    Hub,
    /// Spoke: connect to the first reachable of `hubs`, failing over in order.
    Spoke,
}

/// Federation settings.
#[derive(Clone, Debug)]
pub struct FederationConfig {
    /// Mode.
    pub mode: FederationMode,
    /// Peer broker URLs to keep links to (mesh, or a mesh of hubs).
    pub peers: Vec<String>,
    /// Hub URLs for a spoke, in fail-over order.
    pub hubs: Vec<String>,
    /// How to trust peer certificates.
    pub trust: fem_net::Trust,
    /// Broker keys allowed to federate; `None` is development trust (any key).
    pub peer_keys: Option<Vec<PublicKey>>,
    /// Link liveness probe interval.
    pub ping_interval: Duration,
    /// Silence after which a link is declared down and its routes withdrawn.
    pub link_timeout: Duration,
    /// Longest reconnection delay.
    pub backoff_max: Duration,
    /// DNS SRV names whose targets are peers (re-resolved every `discovery_interval`).
    pub discover_srv: Vec<String>,
    /// How often SRV names are resolved again.
    pub discovery_interval: Duration,
    /// DNS server for discovery instead of the system resolver.
    pub dns_server: Option<std::net::SocketAddr>,
    /// A separate UDP address for federation links (default: the main port).
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            mode: FederationMode::Off,
            peers: Vec::new(),
            hubs: Vec::new(),
            trust: fem_net::Trust::System,
            peer_keys: None,
            ping_interval: Duration::from_millis(500),
            link_timeout: Duration::from_secs(3),
            backoff_max: Duration::from_secs(5),
            discover_srv: Vec::new(),
            discovery_interval: Duration::from_secs(30),
            dns_server: None,
            listen: None,
        }
    }
}

#[derive(Clone, Debug)]
struct Advert {
    seq: u64,
    path: Vec<AgentId>,
    agents: Vec<AdvertisedAgent>,
}

#[derive(Debug)]
struct Link {
    id: u64,
    fed_tx: mpsc::Sender<FedFrame>,
    frame_tx: mpsc::Sender<Frame>,
    /// Which broker opened the connection (duplicate links keep the one
    /// opened by the smaller id, so both ends agree).
    initiator: AgentId,
}

/// Federation state of one broker.
#[derive(Debug, Default)]
pub(crate) struct Fed {
    links: DashMap<AgentId, Arc<Link>>,
    /// origin -> peer -> what that peer advertised for it. Touched only when
    /// routes change, never on the call path.
    adj: Mutex<HashMap<AgentId, HashMap<AgentId, Advert>>>,
    /// origin -> the chosen advertisement and the peer it came from.
    best: Mutex<HashMap<AgentId, (AgentId, Advert)>>,
    /// Agents behind other brokers, by id (the best route for each).
    remote: DashMap<AgentId, Arc<AgentEntry>>,
    local_seq: AtomicU64,
    dirty: AtomicBool,
    endpoint: OnceLock<quinn::Endpoint>,
    link_seq: AtomicU64,
    /// Links the configuration asks for that are up (for /ready).
    required_up: DashMap<String, bool>,
}

impl Fed {
    /// Picks a remote agent for a call: fewest hops, then fewest calls in flight.
    pub(crate) fn select_remote(
        &self,
        target: &Target,
        tool: &Capability,
    ) -> Option<Arc<AgentEntry>> {
        let mut best: Option<Arc<AgentEntry>> = None;
        let better =
            |a: &AgentEntry, b: &AgentEntry| (a.hops, a.in_flight()) < (b.hops, b.in_flight());
        match target {
            Target::Agent(id) => {
                let e = self.remote.get(id)?.clone();
                e.offers(tool).then_some(e)
            }
            Target::Capability(p) => {
                for e in &self.remote {
                    let e = e.value();
                    if e.offers(tool)
                        && e.profile().capabilities.iter().any(|c| p.matches(c))
                        && best.as_ref().is_none_or(|b| better(e, b))
                    {
                        best = Some(Arc::clone(e));
                    }
                }
                best
            }
        }
    }

    /// Tools of remote agents for discovery: (agent, origin broker, capabilities, tool).
    pub(crate) fn remote_tools(
        &self,
        pattern: Option<&CapabilityPattern>,
    ) -> Vec<(AgentId, AgentId, Vec<Capability>, ToolSpec)> {
        let best = lock(&self.best);
        let mut out = Vec::new();
        for (origin, (_, adv)) in best.iter() {
            for a in &adv.agents {
                if pattern.is_some_and(|p| !a.capabilities.iter().any(|c| p.matches(c))) {
                    continue;
                }
                for t in &a.tools {
                    out.push((
                        a.id.clone(),
                        origin.clone(),
                        a.capabilities.clone(),
                        t.clone(),
                    ));
                }
            }
        }
        out
    }

    /// Peer ids with a live link.
    pub(crate) fn peers(&self) -> Vec<AgentId> {
        self.links.iter().map(|l| l.key().clone()).collect()
    }

    /// True when every link the configuration asks for is up.
    pub(crate) fn links_ready(&self) -> bool {
        self.required_up.iter().all(|e| *e.value())
    }

    /// Remote routes as (agent, via peer, hops) for the operator view.
    pub(crate) fn routes(&self) -> Vec<(AgentId, AgentId, u32)> {
        self.remote
            .iter()
            .filter_map(|e| Some((e.key().clone(), e.via.clone()?, e.hops)))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts federation: dialers for configured peers and hubs, and the task
/// that advertises local agent changes.
pub(crate) fn start(shared: &Arc<Shared>, endpoint: quinn::Endpoint) {
    let fed = &shared.fed;
    let _ = fed.endpoint.set(endpoint);
    fed.local_seq
        .store(fem_proto::now_ms().saturating_mul(1000), Ordering::Relaxed);
    let cfg = &shared.config.federation;
    if cfg.mode != FederationMode::Off && cfg.peer_keys.is_none() {
        warn!(
            "federation in development trust: any broker with a valid certificate may link (set --peer-keys)"
        );
    }
    // Each configured link must be up for /ready; its dialler flags it
    // under the key it is registered with here.
    let required = |ready_key: String, urls: Vec<String>| {
        fed.required_up.insert(ready_key.clone(), false);
        tokio::spawn(dial_loop(
            Arc::downgrade(shared),
            DialTarget::Urls { urls, ready_key },
            None,
        ));
    };
    for url in &cfg.peers {
        required(url.clone(), vec![url.clone()]);
    }
    if cfg.mode == FederationMode::Spoke && !cfg.hubs.is_empty() {
        required("hub".to_owned(), cfg.hubs.clone());
    }
    set_peer_gauge(shared);
    if !cfg.discover_srv.is_empty() {
        tokio::spawn(crate::discovery::run(Arc::downgrade(shared)));
    }
    tokio::spawn(advertise_task(Arc::downgrade(shared)));
}

/// Marks the local agent set as changed (advertised within 50 ms).
pub(crate) fn local_changed(shared: &Shared) {
    shared.fed.dirty.store(true, Ordering::Release);
}

async fn advertise_task(weak: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.fed.dirty.swap(false, Ordering::AcqRel) && !shared.fed.links.is_empty() {
            let adv = local_advert(&shared);
            for l in &shared.fed.links {
                let _ = l.fed_tx.try_send(adv.clone());
            }
        }
    }
}

fn local_advert(shared: &Shared) -> FedFrame {
    let seq = shared.fed.local_seq.fetch_add(1, Ordering::AcqRel) + 1;
    let agents = shared
        .registry
        .snapshot()
        .into_iter()
        .filter(|a| a.max_concurrent > 0)
        .map(|a| {
            let p = a.profile();
            AdvertisedAgent {
                id: a.id.clone(),
                key: a.key,
                capabilities: p.capabilities,
                tools: p.tools,
            }
        })
        .collect();
    FedFrame::Advertise {
        origin: shared.config.broker_id.clone(),
        seq,
        path: vec![shared.config.broker_id.clone()],
        agents,
    }
}

/// Where a dialer connects.
#[derive(Clone, Debug)]
pub(crate) enum DialTarget {
    /// Broker URLs, the first reachable one (one URL for a mesh peer; the
    /// hubs in fail-over order for a spoke), required for readiness under
    /// `ready_key`.
    Urls {
        /// The URLs, in fail-over order.
        urls: Vec<String>,
        /// The key of this link in the readiness table.
        ready_key: String,
    },
    /// A peer found in DNS: its address and the name its certificate carries.
    Found {
        /// Address from the SRV target's A/AAAA record.
        addr: std::net::SocketAddr,
        /// The SRV target name (TLS server name).
        name: String,
    },
}

/// Keeps a link up to `target`, with backoff, until `stop` turns true.
pub(crate) async fn dial_loop(
    weak: std::sync::Weak<Shared>,
    target: DialTarget,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut i = 0usize;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.is_shutting_down() || stop.as_ref().is_some_and(|s| *s.borrow()) {
            return;
        }
        let (attempt, key) = match &target {
            DialTarget::Urls { urls, ready_key } => {
                let url = urls[i % urls.len()].clone();
                (dial_url(&shared, &url).await, Some(ready_key.clone()))
            }
            DialTarget::Found { addr, name } => (dial(&shared, *addr, name).await, None),
        };
        match attempt {
            Ok((conn, send, recv)) => {
                backoff = Duration::from_millis(100);
                let flag = key.filter(|k| shared.fed.required_up.contains_key(k));
                let end = run_link(
                    Arc::clone(&shared),
                    conn,
                    recv,
                    send,
                    true,
                    flag,
                    stop.clone(),
                )
                .await;
                if end == LinkEnd::Myself {
                    debug!("discovered peer is this broker; not dialling it again");
                    return;
                }
                // A spoke whose hub went away tries the next hub first.
                if matches!(&target, DialTarget::Urls { urls, .. } if urls.len() > 1) {
                    i += 1;
                }
            }
            Err(e) => {
                debug!(?target, error = %e, "federation dial failed");
                i += 1;
            }
        }
        let max = shared.config.federation.backoff_max;
        drop(shared);
        match &mut stop {
            Some(s) => {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = s.changed() => {}
                }
            }
            None => tokio::time::sleep(backoff).await,
        }
        backoff = (backoff * 2).min(max);
    }
}

async fn dial_url(
    shared: &Arc<Shared>,
    url: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
    // `srv:NAME`: the SRV targets in RFC 2782 order (priority, then weighted
    // random), the first that answers.
    if let Some(name) = url.strip_prefix("srv:") {
        let targets = crate::discovery::ordered_targets(name, shared.config.federation.dns_server)
            .await
            .map_err(|e| format!("SRV {name}: {e}"))?;
        let mut last = format!("SRV {name}: no targets");
        for (addr, host) in targets {
            match dial(shared, addr, &host).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        return Err(last);
    }
    let opts = fem_net::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
    let addr = tokio::net::lookup_host((opts.host(), opts.port()))
        .await
        .map_err(|e| format!("resolve {url}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {url}: no address"))?;
    dial(shared, addr, opts.host()).await
}

async fn dial(
    shared: &Arc<Shared>,
    addr: std::net::SocketAddr,
    name: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
    let endpoint = shared.fed.endpoint.get().ok_or("no endpoint")?;
    let tls = fem_net::tls::client_config(&shared.config.federation.trust, &[ALPN_FEDERATION])
        .map_err(|e| e.to_string())?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let connecting = endpoint
        .connect_with(cfg, addr, name)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let conn = tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
    Ok((conn, send, recv))
}

/// Serves a link accepted on the QUIC endpoint.
pub(crate) async fn accept(shared: Arc<Shared>, conn: quinn::Connection) {
    if shared.config.federation.mode == FederationMode::Off {
        shared
            .metrics
            .refusals
            .with_label_values(&["PEER_REFUSED"])
            .inc();
        conn.close(2u32.into(), b"federation is not enabled on this broker");
        return;
    }
    let Ok(Ok((send, recv))) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
    else {
        conn.close(1u32.into(), b"no stream");
        return;
    };
    let _ = run_link(shared, conn, recv, send, false, None, None).await;
}

/// How a link ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkEnd {
    /// The peer is this broker (a discovered address of our own).
    Myself,
    /// Refused or ended.
    Other,
}

fn hello(shared: &Shared) -> Result<FedFrame, fem_proto::ProtoError> {
    let env = Envelope::new(
        Header::now(shared.config.broker_id.clone()),
        Body::RegisterBroker(RegisterBroker {
            broker_id: shared.config.broker_id.clone(),
            endpoint: format!("https://{}", shared.config.listen),
            public_key: shared.broker_key,
            capabilities: vec!["relay".into()],
        }),
    );
    Ok(FedFrame::Hello(SignedEnvelope::sign(
        &env,
        &shared.identity,
    )?))
}

const MYSELF: &str = "a link to myself";

/// Checks a peer's Hello: signature, freshness, allowed key, not ourselves.
fn check_hello(
    shared: &Shared,
    f: Option<FedFrame>,
) -> Result<(AgentId, PublicKey), (ErrorCode, String)> {
    let Some(FedFrame::Hello(signed)) = f else {
        return Err((
            ErrorCode::NotRegistered,
            "the first message must be a signed registerBroker".into(),
        ));
    };
    let env = signed.open().map_err(|e| (e.code(), e.to_string()))?;
    let Body::RegisterBroker(rb) = env.body else {
        return Err((
            ErrorCode::NotRegistered,
            "the first envelope must be registerBroker".into(),
        ));
    };
    signed
        .verify_opened(fem_proto::EnvelopeType::RegisterBroker, &rb.public_key)
        .map_err(|e| (e.code(), e.to_string()))?;
    if env.header.sender != rb.broker_id {
        return Err((
            ErrorCode::PermissionDenied,
            "sender and broker id differ".into(),
        ));
    }
    shared
        .check_replay(&rb.broker_id, &env.header)
        .map_err(|e| (e.code(), e.to_string()))?;
    if let Some(keys) = &shared.config.federation.peer_keys {
        if !keys.contains(&rb.public_key) {
            return Err((
                ErrorCode::PermissionDenied,
                format!(
                    "broker {} key {} is not in --peer-keys",
                    rb.broker_id, rb.public_key
                ),
            ));
        }
    }
    if rb.broker_id == shared.config.broker_id {
        return Err((ErrorCode::BadRequest, MYSELF.into()));
    }
    Ok((rb.broker_id, rb.public_key))
}

async fn run_link<R, W>(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    recv: R,
    send: W,
    initiator: bool,
    required_key: Option<String>,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> LinkEnd
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max = shared.config.max_frame;
    let (fed_tx, fed_rx) = mpsc::channel::<FedFrame>(4096);
    let writer = tokio::spawn(async move {
        let _ = write_loop(fed_rx, send, max).await;
    });
    let mut reader = FrameReader::new(recv, max);
    let Ok(h) = hello(&shared) else {
        return LinkEnd::Other;
    };
    let _ = fed_tx.send(h).await;
    let first = tokio::time::timeout(Duration::from_secs(5), reader.next_message::<FedFrame>())
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let (peer, _key) = match check_hello(&shared, first) {
        Ok(x) => x,
        Err((ErrorCode::BadRequest, reason)) if reason == MYSELF => {
            conn.close(2u32.into(), b"myself");
            return LinkEnd::Myself;
        }
        Err((code, reason)) => {
            warn!(%code, %reason, remote = %conn.remote_address(), "federation peer refused");
            shared
                .metrics
                .refusals
                .with_label_values(&["PEER_REFUSED"])
                .inc();
            let _ = fed_tx.send(FedFrame::Refused { code, reason }).await;
            drop(fed_tx);
            let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
            conn.close(2u32.into(), b"refused");
            return LinkEnd::Other;
        }
    };
    let me = shared.config.broker_id.clone();
    let opener = if initiator { me.clone() } else { peer.clone() };
    let span = info_span!("link", %peer, initiator);
    async move {
        let (frame_tx, frame_rx) = mpsc::channel::<Frame>(shared.config.session_queue.max(1024));
        let id = shared.fed.link_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let link = Arc::new(Link {
            id,
            fed_tx: fed_tx.clone(),
            frame_tx,
            initiator: opener.clone(),
        });
        // Two links to the same peer (both dialled): keep the one opened by
        // the smaller broker id, so both ends keep the same one.
        {
            use dashmap::mapref::entry::Entry;
            match shared.fed.links.entry(peer.clone()) {
                Entry::Occupied(mut o) => {
                    let keep_new = opener == std::cmp::min(me.clone(), peer.clone());
                    let keep_old = o.get().initiator == std::cmp::min(me.clone(), peer.clone());
                    if keep_old && !keep_new {
                        debug!("duplicate link; keeping the existing one");
                        drop(o);
                        drop(fed_tx);
                        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
                        // Wait for the peer to close it, so a dialer does not spin.
                        let _ = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
                        return LinkEnd::Other;
                    }
                    o.insert(Arc::clone(&link));
                }
                Entry::Vacant(v) => {
                    v.insert(Arc::clone(&link));
                }
            }
        }
        if let Some(k) = &required_key {
            shared.fed.required_up.insert(k.clone(), true);
        }
        set_peer_gauge(&shared);
        info!("federation link up");
        // Tell the new peer everything we reach.
        let _ = fed_tx.send(local_advert(&shared)).await;
        for f in adverts_for(&shared, &peer) {
            let _ = fed_tx.send(f).await;
        }
        let translator = tokio::spawn(translate(frame_rx, fed_tx.clone()));
        let timeout = shared.config.federation.link_timeout;
        let mut ping = tokio::time::interval(shared.config.federation.ping_interval);
        let mut last_rx = Instant::now();
        let mut seq = 0u64;
        let (itx, mut irx) = mpsc::channel::<FedFrame>(4096);
        let read_task = tokio::spawn(async move {
            while let Ok(Some(f)) = reader.next_message::<FedFrame>().await {
                if itx.send(f).await.is_err() {
                    break;
                }
            }
        });
        loop {
            tokio::select! {
                f = irx.recv() => match f {
                    Some(f) => {
                        last_rx = Instant::now();
                        handle(&shared, &peer, &link, f);
                    }
                    None => break,
                },
                () = async {
                    match &mut stop {
                        Some(s) => { let _ = s.wait_for(|v| *v).await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    info!("peer left DNS; closing the link");
                    break;
                }
                _ = ping.tick() => {
                    if last_rx.elapsed() > timeout {
                        warn!(silent_ms = last_rx.elapsed().as_millis() as u64, "federation peer silent; dropping the link");
                        break;
                    }
                    seq += 1;
                    let _ = fed_tx.try_send(FedFrame::Ping { seq });
                }
            }
            if shared.is_shutting_down() && shared.pending_len() == 0 {
                break;
            }
        }
        read_task.abort();
        translator.abort();
        link_down(&shared, &peer, id);
        if let Some(k) = &required_key {
            shared.fed.required_up.insert(k.clone(), false);
        }
        set_peer_gauge(&shared);
        drop(fed_tx);
        drop(link);
        let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
        conn.close(0u32.into(), b"bye");
        info!("federation link down");
        LinkEnd::Other
    }
    .instrument(span)
    .await
}

fn set_peer_gauge(shared: &Shared) {
    let up = i64::try_from(shared.fed.links.len()).unwrap_or(i64::MAX);
    shared
        .metrics
        .federation_peers
        .with_label_values(&["up"])
        .set(up);
}

/// Frames the routing core addresses to a link become federation messages.
async fn translate(mut rx: mpsc::Receiver<Frame>, tx: mpsc::Sender<FedFrame>) {
    while let Some(f) = rx.recv().await {
        let out = match f {
            Frame::Forward {
                hops_left,
                envelope,
                signer,
            } => FedFrame::Call {
                hops_left,
                signer,
                envelope,
            },
            Frame::Deliver { envelope, signer } => FedFrame::Result { signer, envelope },
            Frame::CallFailed {
                request_id,
                code,
                message,
            } => FedFrame::CallFailed {
                request_id,
                code,
                message,
            },
            _ => continue,
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

fn handle(shared: &Arc<Shared>, peer: &AgentId, link: &Arc<Link>, f: FedFrame) {
    match f {
        FedFrame::Advertise {
            origin,
            seq,
            path,
            agents,
        } => {
            let me = &shared.config.broker_id;
            let mut adj = lock(&shared.fed.adj);
            let per = adj.entry(origin.clone()).or_default();
            if origin == *me || path.contains(me) || path.len() > 32 {
                // A loop, or our own agents coming back: not a route.
                per.remove(peer);
            } else if per.get(peer).is_none_or(|a| a.seq <= seq) {
                per.insert(peer.clone(), Advert { seq, path, agents });
            }
            drop(adj);
            recompute(shared, &[origin]);
        }
        FedFrame::Withdraw { origin } => {
            let mut adj = lock(&shared.fed.adj);
            if let Some(per) = adj.get_mut(&origin) {
                per.remove(peer);
            }
            drop(adj);
            recompute(shared, &[origin]);
        }
        FedFrame::Call {
            hops_left,
            signer,
            envelope,
        } => relay_in(shared, link, hops_left, signer, envelope),
        FedFrame::Result { signer, envelope } => shared.remote_result(peer, envelope, signer),
        FedFrame::CallFailed {
            request_id,
            code,
            message,
        } => shared.remote_failed(peer, request_id, code, message),
        FedFrame::Ping { seq } => {
            let _ = link.fed_tx.try_send(FedFrame::Pong { seq });
        }
        FedFrame::Pong { .. } | FedFrame::Hello(_) => {}
        FedFrame::Refused { code, reason } => warn!(%code, %reason, "peer refused the link"),
    }
}

/// A call arriving over a link: verify the caller's signature on entry, then
/// route it like any other call; answers go back over the link.
fn relay_in(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    hops_left: u8,
    signer: PublicKey,
    envelope: SignedEnvelope,
) {
    let started = Instant::now();
    let fail = |request_id, code: ErrorCode, message: String| {
        let _ = link.fed_tx.try_send(FedFrame::CallFailed {
            request_id,
            code,
            message,
        });
    };
    let env = match envelope.open() {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "malformed relayed call dropped");
            return;
        }
    };
    let Body::ToolCall(call) = env.body else {
        return;
    };
    if let Err(e) = envelope.verify_opened(fem_proto::EnvelopeType::ToolCall, &signer) {
        shared
            .metrics
            .refusals
            .with_label_values(&[e.code().as_str()])
            .inc();
        return fail(call.request_id, e.code(), e.to_string());
    }
    if let Err(e) = shared.check_replay(&env.header.sender, &env.header) {
        shared
            .metrics
            .refusals
            .with_label_values(&[e.code().as_str()])
            .inc();
        return fail(call.request_id, e.code(), e.to_string());
    }
    shared.metrics.messages_processed_total.inc();
    shared
        .metrics
        .envelopes
        .with_label_values(&["toolCall", "relayed"])
        .inc();
    let caller = Arc::new(AgentEntry::new(
        env.header.sender,
        signer,
        shared.next_session_id(),
        link.frame_tx.clone(),
        "federation",
        0,
        Profile::default(),
    ));
    shared.route_call(&caller, call, envelope, started, hops_left);
}

/// Our current choices, as sent to `peer` (withdrawals where the peer is on
/// the path or we reach nothing).
fn adverts_for(shared: &Shared, peer: &AgentId) -> Vec<FedFrame> {
    let best = lock(&shared.fed.best);
    best.iter()
        .map(|(origin, (_, adv))| advert_to(shared, peer, origin, Some(adv)))
        .collect()
}

fn advert_to(shared: &Shared, peer: &AgentId, origin: &AgentId, adv: Option<&Advert>) -> FedFrame {
    match adv {
        Some(a) if !a.path.contains(peer) && origin != peer => {
            let mut path = a.path.clone();
            path.push(shared.config.broker_id.clone());
            FedFrame::Advertise {
                origin: origin.clone(),
                seq: a.seq,
                path,
                agents: a.agents.clone(),
            }
        }
        _ => FedFrame::Withdraw {
            origin: origin.clone(),
        },
    }
}

/// Re-chooses the best advertisement of each origin in `origins`; on a
/// change, tells every peer and rebuilds the remote agent entries.
fn recompute(shared: &Arc<Shared>, origins: &[AgentId]) {
    let mut changed = Vec::new();
    {
        let adj = lock(&shared.fed.adj);
        let mut best = lock(&shared.fed.best);
        for origin in origins {
            let choice = adj.get(origin).and_then(|per| {
                per.iter()
                    // Shortest path first (stable routes), then the freshest
                    // data; per peer, a newer sequence number always replaced
                    // an older one on arrival.
                    .min_by(|(pa, a), (pb, b)| {
                        a.path
                            .len()
                            .cmp(&b.path.len())
                            .then(b.seq.cmp(&a.seq))
                            .then(pa.cmp(pb))
                    })
                    .map(|(p, a)| (p.clone(), a.clone()))
            });
            let old = best.get(origin);
            let same = match (&choice, old) {
                (Some((p, a)), Some((op, oa))) => p == op && a.seq == oa.seq && a.path == oa.path,
                (None, None) => true,
                _ => false,
            };
            if !same {
                match &choice {
                    Some(c) => {
                        best.insert(origin.clone(), c.clone());
                    }
                    None => {
                        best.remove(origin);
                    }
                }
                changed.push((origin.clone(), choice.map(|c| c.1)));
            }
        }
    }
    if changed.is_empty() {
        return;
    }
    for l in &shared.fed.links {
        for (origin, adv) in &changed {
            let _ = l
                .fed_tx
                .try_send(advert_to(shared, l.key(), origin, adv.as_ref()));
        }
    }
    rebuild_remote(shared);
}

/// Rebuilds the remote agent entries from the chosen advertisements, keeping
/// entries whose route did not change (their calls stay in flight) and
/// failing the calls of entries that lost their route.
fn rebuild_remote(shared: &Arc<Shared>) {
    let best = lock(&shared.fed.best).clone();
    let mut wanted: HashMap<AgentId, (AgentId, u32, AdvertisedAgent)> = HashMap::new();
    for (_, (via, adv)) in best {
        let hops = u32::try_from(adv.path.len()).unwrap_or(u32::MAX);
        for a in adv.agents {
            let better = wanted.get(&a.id).is_none_or(|(_, h, _)| hops < *h);
            if better {
                wanted.insert(a.id.clone(), (via.clone(), hops, a));
            }
        }
    }
    let mut gone: Vec<Arc<AgentEntry>> = Vec::new();
    shared.fed.remote.retain(|id, e| {
        let keep = wanted.get(id).is_some_and(|(via, hops, a)| {
            e.via.as_ref() == Some(via)
                && e.hops == *hops
                && e.key == a.key
                && shared
                    .fed
                    .links
                    .get(via)
                    .is_some_and(|l| l.frame_tx.same_channel(&e.tx))
        });
        if !keep {
            gone.push(Arc::clone(e));
        }
        keep
    });
    for (id, (via, hops, a)) in wanted {
        if shared.fed.remote.contains_key(&id) {
            if let Some(e) = shared.fed.remote.get(&id) {
                e.set_profile(Profile {
                    capabilities: a.capabilities,
                    tools: a.tools,
                    metadata: Default::default(),
                });
            }
            continue;
        }
        let Some(link) = shared.fed.links.get(&via).map(|l| Arc::clone(l.value())) else {
            continue;
        };
        let entry = AgentEntry::remote(
            id.clone(),
            a.key,
            shared.next_session_id(),
            link.frame_tx.clone(),
            via,
            hops,
            Profile {
                capabilities: a.capabilities,
                tools: a.tools,
                metadata: Default::default(),
            },
        );
        shared.fed.remote.insert(id, Arc::new(entry));
    }
    // Calls in flight on a replaced or withdrawn route stay pending: their
    // answer comes back over the link they left on (the agent's broker
    // answers AGENT_UNAVAILABLE if the agent left), and a lost link fails
    // them in `link_down`.
    drop(gone);
    shared
        .metrics
        .routes
        .set(i64::try_from(shared.fed.remote.len()).unwrap_or(i64::MAX));
}

/// A link ended: forget its routes, answer its calls, tell the other peers.
fn link_down(shared: &Arc<Shared>, peer: &AgentId, id: u64) {
    let removed = shared
        .fed
        .links
        .remove_if(peer, |_, l| l.id == id)
        .is_some();
    if !removed {
        // Replaced by a newer link to the same peer, which carries on.
        return;
    }
    let origins: Vec<AgentId> = {
        let mut adj = lock(&shared.fed.adj);
        adj.iter_mut()
            .filter_map(|(o, per)| per.remove(peer).map(|_| o.clone()))
            .collect()
    };
    shared.fail_calls_via(peer, "link to the agent's broker lost");
    recompute(shared, &origins);
    rebuild_remote(shared);
}
