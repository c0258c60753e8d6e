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
    /// Bounds on what any one peer may make the broker hold.
    pub limits: Limits,
    /// The MCP endpoint (`/mcp`): principals, views, plain listener.
    pub mcp: crate::mcp::config::McpConfig,
}

/// Bounds on connections, memory and fair use (README "Limits" lists each
/// with its flag).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Native connections that have not registered yet, held apart from
    /// `max_connections` so idle handshakes cannot lock agents out.
    pub max_pending_connections: usize,
    /// TLS (and QUIC) handshake, ALPN included.
    pub handshake_timeout: Duration,
    /// Largest frame before registration, and largest registerAgent or
    /// embodimentUpdate envelope.
    pub max_registration_bytes: usize,
    /// Tools one agent may offer.
    pub max_tools: usize,
    /// Capabilities one agent may offer.
    pub max_capabilities: usize,
    /// Bytes of one tool description.
    pub max_description_bytes: usize,
    /// Bytes of one tool's input schema.
    pub max_schema_bytes: usize,
    /// Metadata entries of one agent (keys up to 64 bytes, values up to 1 KiB).
    pub max_metadata_entries: usize,
    /// Bytes queued towards one session before it is cut as a slow consumer.
    pub session_queue_bytes: usize,
    /// Broker-wide bytes of queued frames and waiting calls; beyond it new
    /// calls and events are refused with RATE_LIMITED.
    pub max_memory: usize,
    /// HTTPS connections at once (they do not count against `max_connections`).
    pub max_http_connections: usize,
    /// Time to receive a request's headers.
    pub http_header_timeout: Duration,
    /// An HTTP connection with no request in progress is closed after this.
    pub http_idle_timeout: Duration,
    /// Share of one agent's call slots (percent) one caller may hold; its
    /// further calls wait in the agent's queue.
    pub caller_share_percent: u8,
    /// Largest event payload, bytes.
    pub max_event_bytes: usize,
    /// Events one sender may publish per second (burst: one second's worth).
    pub event_rate: u32,
    /// Largest discovery answer page, bytes (further pages by cursor).
    pub discovery_page_bytes: usize,
    /// Signed envelopes one key may send per second, averaged over the
    /// replay window, where the broker keeps nonces (the JSON gateway,
    /// signed `/mcp` requests, operator views; sessions keep none): the
    /// nonces kept per key are this times the window, and beyond them
    /// requests are refused RATE_LIMITED.
    pub replay_key_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            max_registration_bytes: 256 * 1024,
            max_tools: 256,
            max_capabilities: 64,
            max_description_bytes: 4096,
            max_schema_bytes: 32 * 1024,
            max_metadata_entries: 64,
            session_queue_bytes: 16 * 1024 * 1024,
            max_memory: 1024 * 1024 * 1024,
            max_http_connections: 1024,
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            caller_share_percent: 50,
            max_event_bytes: 64 * 1024,
            event_rate: 100,
            discovery_page_bytes: 1024 * 1024,
            replay_key_rate: 3_000,
        }
    }
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
            max_call_timeout: Duration::from_secs(300),
            agent_queue_limit: 1024,
            session_queue: 1024,
            registration_timeout: Duration::from_secs(10),
            metrics_listen: None,
            admin_token: None,
            federation: FederationConfig::default(),
            shutdown_grace: Duration::from_secs(10),
            trust_anchors: Vec::new(),
            limits: Limits::default(),
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
    /// Verify the signatures of relayed calls and results here too (their
    /// recipients always do): defence in depth, at a CPU cost per call.
    pub verify_relayed: bool,
    /// Take capability summaries from peers instead of every agent set, and
    /// advertise only this broker's own agents (a stub, for spokes that do
    /// not need every agent id; proto/README.md §8.15).
    pub stub: bool,
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
            verify_relayed: false,
            stub: false,
        }
    }
}
