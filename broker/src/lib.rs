//! The FEM broker as a library: bind, run, shut down.
//!
//! Agents connect over QUIC (UDP) or TLS 1.3 over TCP on the same port number,
//! register with a signed registerAgent, and exchange signed envelopes. The
//! broker routes each toolCall to a live agent (by id or capability pattern)
//! and routes the toolResult back, answering every call exactly once: the
//! result, or a typed error (NO_ROUTE, TIMEOUT, AGENT_UNAVAILABLE, ...).
//!
//! ```no_run
//! # async fn demo() -> Result<(), fem_broker::BrokerError> {
//! let broker = fem_broker::Broker::bind(fem_broker::BrokerConfig::default()).await?;
//! println!("listening on {}", broker.local_addr());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod budget;
mod config;
pub mod federation;
mod listen;
mod mcp;
mod metrics;
pub mod route;
mod state;
mod trust;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use config::{BrokerConfig, FederationConfig, FederationMode, Limits};
/// TLS configuration and the development CA (from fem-net).
pub use fem_net::tls;
pub use fem_net::tls::TlsSource;
use fem_proto::{AgentId, PublicKey};
pub use mcp::config::{McpConfig, McpFile, McpFilePrincipal, McpFileView, McpPrincipal, McpView};
pub use metrics::Metrics;
pub use route::Profile;

use crate::state::Shared;

/// Errors of the broker library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// Invalid configuration or unreadable files.
    #[error("configuration: {0}")]
    Config(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Binding a socket failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Key files, certificates or TLS set-up.
    #[error(transparent)]
    Net(#[from] fem_net::NetError),
}

impl BrokerError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Entry point: [`Broker::bind`] returns a running broker.
#[derive(Debug)]
pub struct Broker {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    fingerprint: [u8; 32],
    ca_path: Option<PathBuf>,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    mcp_addr: Option<SocketAddr>,
    fed_endpoint: Option<quinn::Endpoint>,
}

impl Broker {
    /// Loads keys and certificates, binds TCP and UDP on the same port and
    /// starts serving. With port 0, a free port is chosen for both.
    ///
    /// # Errors
    /// [`BrokerError::Config`], [`BrokerError::Io`], [`BrokerError::Net`] or
    /// [`BrokerError::Bind`].
    pub async fn bind(config: BrokerConfig) -> Result<Self, BrokerError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| BrokerError::io(&config.data_dir, e))?;
        let identity = fem_net::keys::load_or_generate_key(&config.data_dir.join("broker.key"))?;
        let names = cert_names(&config);
        let material = tls::load_material(&config.tls, &config.data_dir, &names)?;
        let tcp_tls = tls::server_config(&material, &[fem_proto::ALPN_NATIVE, b"h2", b"http/1.1"])?;
        let mut quic_tls = tls::server_config(
            &material,
            &[fem_proto::ALPN_NATIVE, fem_proto::ALPN_FEDERATION],
        )?;
        // No TLS session tickets over QUIC: agents and federation links
        // never resume (each connection starts from a fresh client
        // configuration), and every handshake paid for two tickets and the
        // packet and acknowledgement that carried them.
        quic_tls.send_tls13_tickets = 0;

        let (listener, udp) = bind_pair(config.listen).await?;
        let local_addr = listener.local_addr().map_err(|e| BrokerError::Bind {
            addr: config.listen,
            source: e,
        })?;

        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(quic_tls)
            .map_err(|e| BrokerError::Config(format!("QUIC TLS: {e}")))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        let mut transport = quinn::TransportConfig::default();
        // One stream per connection (agent session or federation link): a
        // peer cannot open more streams for the broker to buffer.
        transport.max_concurrent_bidi_streams(1u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        // With that one stream, the connection's windows need not exceed
        // the stream's: quinn's defaults let a peer that issues large
        // credit hold 10 MB of the broker's writes per connection, and
        // put no connection-level bound on what it sends.
        transport.stream_receive_window(QUIC_STREAM_WINDOW.into());
        transport.receive_window(QUIC_STREAM_WINDOW.into());
        transport.send_window(u64::from(QUIC_STREAM_WINDOW));
        // The broker never reads QUIC datagrams: with quinn's default a
        // peer could park 1.25 MB of them per connection; now sending one
        // is a protocol violation that closes the connection.
        transport.datagram_receive_buffer_size(None);
        transport.mtu_discovery_config(Some(one_probe_mtu_discovery()));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.heartbeat_grace + Duration::from_secs(5))
                .map_err(|e| BrokerError::Config(format!("idle timeout: {e}")))?,
        ));
        server_config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            udp,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| BrokerError::Bind {
            addr: local_addr,
            source: e,
        })?;

        // Links may get their own UDP address (--federation-listen).
        let fed_endpoint = match config.federation.listen {
            Some(addr) => {
                let mut fed_tls = tls::server_config(&material, &[fem_proto::ALPN_FEDERATION])?;
                fed_tls.send_tls13_tickets = 0;
                let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(fed_tls)
                    .map_err(|e| BrokerError::Config(format!("QUIC TLS: {e}")))?;
                let sock = tune_udp(
                    std::net::UdpSocket::bind(addr)
                        .map_err(|e| BrokerError::Bind { addr, source: e })?,
                );
                Some(
                    quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        Some(quinn::ServerConfig::with_crypto(Arc::new(crypto))),
                        sock,
                        Arc::new(quinn::TokioRuntime),
                    )
                    .map_err(|e| BrokerError::Bind { addr, source: e })?,
                )
            }
            None => None,
        };
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| BrokerError::Bind { addr, source: e })?,
            ),
            None => None,
        };
        let mcp_listener = match config.mcp.listen {
            Some(addr) if !addr.ip().is_loopback() => {
                return Err(BrokerError::Config(format!(
                    "--mcp-listen {addr}: plain HTTP is for loopback addresses only; use /mcp on the TLS port"
                )));
            }
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| BrokerError::Bind { addr, source: e })?,
            ),
            None => None,
        };
        let principals = mcp::Principals::new(
            &config.mcp,
            !config.trust_anchors.is_empty(),
            &config.data_dir,
        )?;
        let metrics = Metrics::new()?;
        let shared = Shared::new(config, identity, metrics, principals);
        let mut tasks = vec![
            tokio::spawn(listen::tcp_accept_loop(
                Arc::clone(&shared),
                listener,
                Arc::new(tcp_tls),
            )),
            tokio::spawn(listen::quic_accept_loop(
                Arc::clone(&shared),
                endpoint.clone(),
            )),
        ];
        if let Some(fe) = &fed_endpoint {
            tasks.push(tokio::spawn(listen::quic_accept_loop(
                Arc::clone(&shared),
                fe.clone(),
            )));
            tracing::info!(addr = ?fe.local_addr().ok(), "federation listener (QUIC, fem-fed/1)");
        }
        let mut metrics_addr = None;
        if let Some(l) = metrics_listener {
            metrics_addr = l.local_addr().ok();
            let app = listen::http::plain_router(Arc::clone(&shared));
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::warn!(error = %e, "metrics listener ended");
                }
            }));
            tracing::info!(addr = ?metrics_addr, "plain-HTTP metrics listener (/metrics, /health, /ready)");
        }
        let mut mcp_addr = None;
        if let Some(l) = mcp_listener {
            mcp_addr = l.local_addr().ok();
            let app = mcp::routes(Arc::clone(&shared));
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::warn!(error = %e, "MCP listener ended");
                }
            }));
            tracing::info!(addr = ?mcp_addr, "plain-HTTP MCP listener (/mcp)");
        }
        federation::start(&shared, endpoint.clone());
        shared.ready.store(true, Ordering::Relaxed);
        tracing::info!(
            addr = %local_addr,
            broker_id = %shared.config.broker_id,
            fingerprint = %hex::encode(material.fingerprint),
            identity = %shared.broker_key,
            ca = ?material.ca_path,
            "fem-broker listening (QUIC on UDP, TLS on TCP)"
        );
        Ok(Self {
            shared,
            local_addr,
            fingerprint: material.fingerprint,
            ca_path: material.ca_path,
            endpoint,
            tasks,
            metrics_addr,
            mcp_addr,
            fed_endpoint,
        })
    }

    /// The bound address (TCP and UDP share the port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound plain-HTTP metrics address, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound plain-HTTP MCP address, when configured.
    pub fn mcp_addr(&self) -> Option<SocketAddr> {
        self.mcp_addr
    }

    /// SHA-256 of the served certificate, as clients pin it.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The development CA certificate, when the certificate was generated.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca_path.as_deref()
    }

    /// A live view of the agents registered on this broker.
    pub fn registry(&self) -> Agents<'_> {
        Agents {
            shared: &self.shared,
        }
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Stops accepting connections, lets calls in flight finish for up to
    /// the configured grace period, then closes every session.
    pub async fn shutdown(self) {
        // Readiness drops first (load balancers stop sending), health and
        // metrics stay up while calls in flight finish; new native sessions
        // are refused.
        self.shared.ready.store(false, Ordering::Relaxed);
        self.shared.draining.store(true, Ordering::Relaxed);
        self.endpoint.set_server_config(None);
        if let Some(fe) = &self.fed_endpoint {
            fe.set_server_config(None);
        }
        let deadline = Instant::now() + self.shared.config.shutdown_grace;
        while self.shared.pending_len() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.begin_shutdown();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        if let Some(fe) = &self.fed_endpoint {
            fe.close(0u32.into(), b"shutdown");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The agents registered on one broker, read live from its routing core.
#[derive(Debug)]
pub struct Agents<'a> {
    shared: &'a Arc<Shared>,
}

impl Agents<'_> {
    /// Number of registered agents.
    pub fn len(&self) -> usize {
        self.shared.view(route::Router::agent_count)
    }

    /// True when no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The agent `id`, if registered.
    pub fn get(&self, id: &AgentId) -> Option<AgentView> {
        self.shared.view(|r| {
            r.agent(id).map(|a| AgentView {
                id: a.id.clone(),
                key: a.key,
                transport: a.transport,
                session: a.session,
                shared: Arc::clone(self.shared),
            })
        })
    }
}

/// One registered agent; its counters are read live.
#[derive(Clone, Debug)]
pub struct AgentView {
    /// Agent id.
    pub id: AgentId,
    /// Its registered key.
    pub key: PublicKey,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    session: route::ClientId,
    shared: Arc<Shared>,
}

impl AgentView {
    fn read<T: Default>(&self, f: impl FnOnce(&route::LocalAgent) -> T) -> T {
        self.shared
            .view(|r| {
                r.agent(&self.id)
                    .filter(|a| a.session == self.session)
                    .map(f)
            })
            .unwrap_or_default()
    }

    /// Calls in flight to this agent (0 once it is gone).
    pub fn in_flight(&self) -> u32 {
        self.read(|a| a.in_flight)
    }

    /// Calls waiting at the broker for a slot on this agent.
    pub fn queued(&self) -> usize {
        self.read(|a| a.queue.len())
    }
}

fn cert_names(config: &BrokerConfig) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let ip = config.listen.ip();
    if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
        names.push(ip.to_string());
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim().to_owned();
        if !h.is_empty() && !names.contains(&h) {
            names.push(h);
        }
    }
    for n in &config.tls_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// The flow-control window of a QUIC connection's one stream, each way:
/// quinn's default (enough for 12.5 MB/s at 100 ms round trips). Reading,
/// a session takes bytes from it as they arrive (frames are reassembled
/// in the frame decoder, within --max-frame-size).
const QUIC_STREAM_WINDOW: u32 = 1_250_000;

/// Path MTU discovery with one probe, straight at quinn's upper bound (a
/// 1452-byte UDP payload, what Ethernet paths carry), instead of a binary
/// search from 1200 in four probes. Each probe is a padded packet that the
/// receiver parses byte by byte; the search ran on every connection (and
/// again every 10 minutes). With 10,000 agents registering, parsing padding
/// (probes and Initial packets) was 12 % of the broker's CPU samples, 7 %
/// with one probe. A path that cannot carry 1452 stays at 1200, QUIC's
/// minimum. The SDK does the same.
fn one_probe_mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(1452).minimum_change(1452 - 1200);
    mtud
}

/// Socket buffer asked for on the QUIC socket. All clients share this one
/// socket: with the kernel's default (about 208 KiB) a burst of handshakes
/// overflows it, and every dropped Initial costs the client QUIC's initial
/// retransmission timeout (about 1 s with backoff). The kernel caps the size
/// at net.core.rmem_max / wmem_max.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Enlarges the receive and send buffers of a QUIC socket, warning when the
/// kernel grants much less than asked.
fn tune_udp(udp: std::net::UdpSocket) -> std::net::UdpSocket {
    let sock = socket2::Socket::from(udp);
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    // Linux reports twice the usable size it granted.
    let got = sock.recv_buffer_size().unwrap_or(0) / 2;
    if got < UDP_BUFFER / 4 {
        tracing::warn!(
            granted = got,
            wanted = UDP_BUFFER,
            "small UDP receive buffer: bursts of QUIC handshakes may be dropped (raise net.core.rmem_max)"
        );
    }
    sock.into()
}

/// Binds TCP and UDP on the same port; with port 0, retries until both get one.
async fn bind_pair(
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, std::net::UdpSocket), BrokerError> {
    let mut last = None;
    for _ in 0..20 {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| BrokerError::Bind { addr, source: e })?;
        let bound = listener
            .local_addr()
            .map_err(|e| BrokerError::Bind { addr, source: e })?;
        match std::net::UdpSocket::bind(bound) {
            Ok(udp) => return Ok((listener, tune_udp(udp))),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => {
                return Err(BrokerError::Bind {
                    addr: bound,
                    source: e,
                });
            }
        }
    }
    Err(BrokerError::Bind {
        addr,
        source: last.unwrap_or_else(|| std::io::Error::other("no free port")),
    })
}
