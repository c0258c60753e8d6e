//! The broker's library configuration (plain struct with defaults; the binary
//! maps flags, FEM_* variables and files onto it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fem_proto::{AgentId, DEFAULT_MAX_FRAME, DEFAULT_REPLAY_WINDOW_MS, PublicKey};

use fem_net::tls::TlsSource;

/// Broker configuration.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Address for QUIC (UDP) and TLS (TCP), same port number.
    pub listen: SocketAddr,
    /// Keeps the identity key and the generated certificates.
    pub data_dir: PathBuf,
    /// Certificate source.
    pub tls: TlsSource,
    /// Extra names for a generated certificate (besides localhost, loopbacks, host name).
    pub tls_names: Vec<String>,
    /// The broker's id.
    pub broker_id: AgentId,
    /// Maximum concurrent client connections.
    pub max_connections: usize,
    /// Maximum frame payload in bytes.
    pub max_frame: usize,
    /// Heartbeat interval announced to agents.
    pub heartbeat_interval: Duration,
    /// Silence after which an agent is evicted.
    pub heartbeat_grace: Duration,
    /// Accepted clock skew for envelope timestamps, ms.
    pub replay_window_ms: u64,
    /// Upper bound on any call's deadline.
    pub max_call_timeout: Duration,
    /// Calls that may wait at the broker for a slot on one agent.
    pub agent_queue_limit: usize,
    /// Frames queued per session before it counts as a slow consumer.
    pub session_queue: usize,
    /// Time allowed between connecting and registering.
    pub registration_timeout: Duration,
    /// Plain-HTTP listener for /metrics, /health and /ready (in-cluster scrapers).
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token guarding the operator views (`/v1/agents`, ...); without
    /// one the views are disabled.
    pub admin_token: Option<String>,
    /// Federation with other brokers.
    pub federation: FederationConfig,
    /// Grace period for in-flight calls at shutdown.
    pub shutdown_grace: Duration,
    /// Operator keys whose grants admit agents and callers; empty is
    /// development trust (ids bound to their first key, with a warning).
    pub trust_anchors: Vec<PublicKey>,
    /// The MCP endpoint (`/mcp`): principals, views, plain listener.
    pub mcp: crate::mcp::config::McpConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            data_dir: PathBuf::from("fem-data"),
            tls: TlsSource::SelfSigned,
            tls_names: Vec::new(),
            broker_id: AgentId::new("fem-broker").unwrap_or_else(|_| unreachable!()),
            max_connections: 10_000,
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_grace: Duration::from_secs(30),
            replay_window_ms: DEFAULT_REPLAY_WINDOW_MS,
            max_call_timeout: Duration::from_secs(600),
            agent_queue_limit: 1024,
            session_queue: 1024,
            registration_timeout: Duration::from_secs(10),
            metrics_listen: None,
            admin_token: None,
            federation: FederationConfig::default(),
            shutdown_grace: Duration::from_secs(10),
            trust_anchors: Vec::new(),
            mcp: crate::mcp::config::McpConfig::default(),
        }
    }
}

/// How this broker takes part in a federation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FederationMode {
    /// No federation: no links are dialled, and links from peers are refused.
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
    /// This broker's grant (role broker), presented to peers before its
    /// hello; peers with a trust anchor require one.
    pub grant: Option<fem_proto::SignedGrant>,
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
    pub dns_server: Option<SocketAddr>,
    /// A separate UDP address for federation links (default: the main port).
    pub listen: Option<SocketAddr>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            mode: FederationMode::Off,
            peers: Vec::new(),
            hubs: Vec::new(),
            trust: fem_net::Trust::System,
            peer_keys: None,
            grant: None,
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
