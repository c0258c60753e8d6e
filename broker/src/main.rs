//! `fem-broker`: merge flags, FEM_* variables and the YAML file (in that
//! order of precedence), bind, serve until SIGINT/SIGTERM, drain, exit.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use fem_broker::{Broker, BrokerConfig, FederationConfig, TlsSource};
use fem_net::cli::LogArgs;
use fem_proto::AgentId;
use serde::Deserialize;

/// FEM broker: signed agent registration and tool-call routing over QUIC and TLS.
///
/// Every option can also come from its FEM_* variable or from the YAML file
/// given with --config (same names, snake_case); flags win over variables,
/// variables over the file.
#[derive(Debug, Parser)]
#[command(name = "fem-broker", version)]
struct Args {
    /// YAML configuration file.
    #[arg(long, env = "FEM_CONFIG")]
    config: Option<PathBuf>,
    /// Address for QUIC (UDP) and TLS (TCP), same port; ":8443" means all IPv4 interfaces [default: :8443].
    #[arg(long, env = "FEM_LISTEN")]
    listen: Option<String>,
    /// Directory for the broker identity key and generated certificates [default: ~/.local/share/fem/broker].
    #[arg(long, env = "FEM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TLS certificate chain (PEM). Without it a development certificate is generated.
    #[arg(long, env = "FEM_TLS_CERT")]
    cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "FEM_TLS_KEY")]
    key: Option<PathBuf>,
    /// Extra DNS names or IPs for the generated certificate (repeatable).
    #[arg(long = "tls-name", env = "FEM_TLS_NAMES", value_delimiter = ',')]
    tls_names: Option<Vec<String>>,
    /// Broker id [default: the host name].
    #[arg(long, env = "FEM_BROKER_ID")]
    broker_id: Option<String>,
    /// Maximum concurrent agent connections [default: 10000].
    #[arg(long, env = "FEM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Calls that may wait at the broker for a slot on one agent; beyond it RATE_LIMITED [default: 1024].
    #[arg(long, env = "FEM_AGENT_QUEUE_LIMIT")]
    agent_queue_limit: Option<usize>,
    /// Maximum frame size in bytes [default: 4194304].
    #[arg(long, env = "FEM_MAX_FRAME_SIZE")]
    max_frame_size: Option<usize>,
    /// Upper bound on any call's deadline; longer deadlines are shortened to it [default: 300s].
    #[arg(long, env = "FEM_MAX_CALL_TIMEOUT", value_parser = humantime::parse_duration)]
    max_call_timeout: Option<Duration>,
    /// Time allowed between connecting and registering [default: 10s].
    #[arg(long, env = "FEM_REGISTRATION_TIMEOUT", value_parser = humantime::parse_duration)]
    registration_timeout: Option<Duration>,
    /// Frames queued towards one session before it is cut as SLOW_CONSUMER [default: 1024].
    #[arg(long, env = "FEM_SESSION_QUEUE")]
    session_queue: Option<usize>,
    /// Heartbeat interval announced to agents [default: 10s].
    #[arg(long, env = "FEM_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Silence after which an agent is evicted and its calls answered AGENT_UNAVAILABLE [default: 30s].
    #[arg(long, env = "FEM_HEARTBEAT_GRACE", value_parser = humantime::parse_duration)]
    heartbeat_grace: Option<Duration>,
    /// Accepted clock skew for envelope timestamps (replay window) [default: 60s].
    #[arg(long, env = "FEM_REPLAY_WINDOW", value_parser = humantime::parse_duration)]
    replay_window: Option<Duration>,
    /// Grace period for in-flight calls on SIGTERM [default: 10s].
    #[arg(long, env = "FEM_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Plain-HTTP listener for /metrics, /health and /ready (e.g. :9090) [default: none].
    #[arg(long, env = "FEM_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// File holding the bearer token that guards the operator views (/v1/agents, /v1/peers,
    /// /v1/routes); the FEM_ADMIN_TOKEN variable may give the token itself [default: views disabled].
    #[arg(long, env = "FEM_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// This broker's grant (from `fem trust grant --role broker`), presented to
    /// federation peers; peers with a trust anchor require it [default: none].
    #[arg(long = "broker-grant", env = "FEM_BROKER_GRANT")]
    broker_grant: Option<PathBuf>,
    /// Operator public key whose grants admit agents and callers (repeatable, for
    /// rotation). Without one the broker runs in development trust: any key may
    /// register, and an id is bound to the first key that used it [default: none].
    #[arg(long = "trust-anchor", env = "FEM_TRUST_ANCHOR", value_delimiter = ',')]
    trust_anchor: Option<Vec<PathBuf>>,
    /// Federation mode: hub, spoke or mesh [default: none].
    #[arg(long, env = "FEM_FEDERATION_MODE", value_enum)]
    federation_mode: Option<ModeArg>,
    /// Hub broker URL for a spoke (repeatable: fail-over in order); `srv:NAME` takes the
    /// hubs from a DNS SRV name in RFC 2782 priority and weight order.
    #[arg(
        long = "federation-hub",
        env = "FEM_FEDERATION_HUB",
        value_delimiter = ','
    )]
    federation_hub: Option<Vec<String>>,
    /// Separate UDP address for federation links (e.g. :8444) [default: the --listen port].
    #[arg(long, env = "FEM_FEDERATION_LISTEN")]
    federation_listen: Option<String>,
    /// Peer broker URL to keep a federation link to (repeatable).
    #[arg(long = "peer", env = "FEM_PEERS", value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// File listing the broker public keys (hex, one per line) allowed to federate;
    /// without it any key is accepted (development trust, logged as a warning).
    #[arg(long, env = "FEM_PEER_KEYS")]
    peer_keys: Option<PathBuf>,
    /// Trust peer brokers' certificates issued by this CA (PEM).
    #[arg(long, env = "FEM_CA")]
    ca: Option<PathBuf>,
    /// Trust peer brokers' certificates with this SHA-256 fingerprint.
    #[arg(long, env = "FEM_PIN")]
    pin: Option<String>,
    /// Do not verify peer brokers' certificates (development only).
    #[arg(long, env = "FEM_INSECURE")]
    insecure: bool,
    /// DNS SRV name whose targets are peer brokers (repeatable), e.g. _fem._udp.brokers.example.com.
    #[arg(long = "discover-srv", env = "FEM_DISCOVER_SRV", value_delimiter = ',')]
    discover_srv: Option<Vec<String>>,
    /// How often SRV names are resolved again [default: 30s].
    #[arg(long, env = "FEM_DISCOVERY_INTERVAL", value_parser = humantime::parse_duration)]
    discovery_interval: Option<Duration>,
    /// DNS server (HOST:PORT) for SRV discovery instead of the system resolver.
    #[arg(long, env = "FEM_DNS_SERVER")]
    dns_server: Option<String>,
    /// Plain-HTTP listener for /mcp on a loopback address (e.g. 127.0.0.1:8080); /mcp is
    /// always served on the TLS port. Principals and views: the `mcp:` section of the file [default: none].
    #[arg(long, env = "FEM_MCP_LISTEN")]
    mcp_listen: Option<String>,
    /// Verify relayed calls and results at this broker too (recipients always do) [default: off].
    #[arg(long, env = "FEM_VERIFY_RELAYED")]
    verify_relayed: bool,
    /// What peers send this broker: `full` (every agent, by id) or `summary` (kinds of
    /// agent without ids; this broker then advertises only its own agents, for spokes
    /// that do not need every agent id) [default: full].
    #[arg(long, env = "FEM_FEDERATION_ROUTES", value_enum)]
    federation_routes: Option<RoutesArg>,
    /// Silence after which a federation link is dropped and its routes withdrawn [default: 3s].
    #[arg(long, env = "FEM_LINK_TIMEOUT", value_parser = humantime::parse_duration)]
    link_timeout: Option<Duration>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// Declares the limit flags, their `limits:` section in the YAML file, and
/// the merge of both over the defaults, from one list.
macro_rules! limits {
    ($($(#[doc = $doc:literal])* $field:ident: $ty:ty, $env:literal, $parse:expr;)*) => {
        /// Bounds on connections, memory and fair use (README "Limits").
        #[derive(Debug, clap::Args)]
        #[command(next_help_heading = "Limits")]
        struct LimitArgs {
            $($(#[doc = $doc])* #[arg(long, env = $env, value_parser = $parse)] $field: Option<$ty>,)*
        }

        /// The `limits:` section of the YAML file (sizes and durations as text).
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileLimits {
            $($field: Option<String>,)*
        }

        fn merge_limits(args: &LimitArgs, file: &FileLimits) -> anyhow::Result<fem_broker::Limits> {
            let d = fem_broker::Limits::default();
            Ok(fem_broker::Limits {
                $($field: match (&args.$field, &file.$field) {
                    (Some(v), _) => v.clone(),
                    (None, Some(text)) => ($parse)(text.as_str())
                        .map_err(|e| anyhow::anyhow!("limits.{}: {e}", stringify!($field)))?,
                    (None, None) => d.$field,
                },)*
            })
        }
    };
}

limits! {
    /// Connections that have not registered yet (apart from --max-connections) [default: 256].
    max_pending_connections: usize, "FEM_MAX_PENDING_CONNECTIONS", parse_count;
    /// TLS/QUIC handshake time, ALPN included [default: 10s].
    handshake_timeout: Duration, "FEM_HANDSHAKE_TIMEOUT", humantime::parse_duration;
    /// Largest frame before registration, and largest registerAgent/embodimentUpdate [default: 256KiB].
    max_registration_bytes: usize, "FEM_MAX_REGISTRATION_BYTES", parse_bytes;
    /// Tools one agent may offer [default: 256].
    max_tools: usize, "FEM_MAX_TOOLS", parse_count;
    /// Capabilities one agent may offer [default: 64].
    max_capabilities: usize, "FEM_MAX_CAPABILITIES", parse_count;
    /// Bytes of one tool description [default: 4KiB].
    max_description_bytes: usize, "FEM_MAX_DESCRIPTION_BYTES", parse_bytes;
    /// Bytes of one tool input schema [default: 32KiB].
    max_schema_bytes: usize, "FEM_MAX_SCHEMA_BYTES", parse_bytes;
    /// Metadata entries per agent (keys to 64 B, values to 1 KiB) [default: 64].
    max_metadata_entries: usize, "FEM_MAX_METADATA_ENTRIES", parse_count;
    /// Bytes queued towards one session before it is cut as SLOW_CONSUMER [default: 16MiB].
    session_queue_bytes: usize, "FEM_SESSION_QUEUE_BYTES", parse_bytes;
    /// Broker-wide bytes of queued frames and waiting calls; beyond it new work is refused [default: 1GiB].
    max_memory: usize, "FEM_MAX_MEMORY", parse_bytes;
    /// HTTPS connections at once [default: 1024].
    max_http_connections: usize, "FEM_MAX_HTTP_CONNECTIONS", parse_count;
    /// Time to receive an HTTP request's headers [default: 10s].
    http_header_timeout: Duration, "FEM_HTTP_HEADER_TIMEOUT", humantime::parse_duration;
    /// Idle HTTP connections are closed after this [default: 60s].
    http_idle_timeout: Duration, "FEM_HTTP_IDLE_TIMEOUT", humantime::parse_duration;
    /// Percent of one agent's call slots one caller may hold [default: 50].
    caller_share_percent: u8, "FEM_CALLER_SHARE_PERCENT", parse_percent;
    /// Largest event payload [default: 64KiB].
    max_event_bytes: usize, "FEM_MAX_EVENT_BYTES", parse_bytes;
    /// Events one sender may publish per second [default: 100].
    event_rate: u32, "FEM_EVENT_RATE", parse_rate;
    /// Largest discovery answer page [default: 1MiB].
    discovery_page_bytes: usize, "FEM_DISCOVERY_PAGE_BYTES", parse_bytes;
    /// Signed requests one key may send per second over the replay window, where the
    /// broker keeps nonces (gateway, signed /mcp, operator views) [default: 3000].
    replay_key_rate: u32, "FEM_REPLAY_KEY_RATE", parse_rate;
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be positive".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn parse_rate(s: &str) -> Result<u32, String> {
    let n = parse_count(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?}: too large"))
}

fn parse_percent(s: &str) -> Result<u8, String> {
    match s.trim().trim_end_matches('%').parse::<u8>() {
        Ok(n @ 1..=100) => Ok(n),
        _ => Err(format!("{s:?}: a percentage from 1 to 100")),
    }
}

/// Bytes: a number with an optional KiB, MiB or GiB suffix (K, M, G too).
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("{s:?}: not a size"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("{s:?}: unknown unit {other:?} (B, KiB, MiB, GiB)")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("must be positive".into()),
        Some(b) => Ok(b),
        None => Err(format!("{s:?}: too large")),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeArg {
    Hub,
    Spoke,
    Mesh,
}

/// What peers send this broker (`--federation-routes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RoutesArg {
    /// Every agent, by id.
    Full,
    /// Capability summaries (a stub).
    Summary,
}

/// The `federation:` section of the YAML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFederation {
    mode: Option<ModeArg>,
    listen: Option<String>,
    #[serde(default)]
    hub: Option<OneOrMany>,
    peers: Option<Vec<String>>,
    peer_keys: Option<PathBuf>,
    ca: Option<PathBuf>,
    pin: Option<String>,
    insecure: Option<bool>,
    #[serde(default, with = "opt_duration")]
    link_timeout: Option<Duration>,
    verify_relayed: Option<bool>,
    routes: Option<RoutesArg>,
    discovery: Option<FileDiscovery>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDiscovery {
    enabled: Option<bool>,
    srv: Option<Vec<String>>,
    #[serde(default, with = "opt_duration")]
    interval: Option<Duration>,
    dns_server: Option<String>,
}

/// The YAML file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    tls_names: Option<Vec<String>>,
    broker_id: Option<String>,
    max_connections: Option<usize>,
    agent_queue_limit: Option<usize>,
    max_frame_size: Option<usize>,
    #[serde(default, with = "opt_duration")]
    max_call_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    registration_timeout: Option<Duration>,
    session_queue: Option<usize>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default, with = "opt_duration")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    heartbeat_grace: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    replay_window: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    shutdown_grace: Option<Duration>,
    metrics_listen: Option<String>,
    admin_token_file: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<fem_net::cli::LogFormat>,
    #[serde(default)]
    trust_anchor: Option<OneOrMany>,
    broker_grant: Option<PathBuf>,
    #[serde(default)]
    federation: FileFederation,
    #[serde(default)]
    mcp: fem_broker::McpFile,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

fn parse_addr(flag: &str, s: &str) -> anyhow::Result<SocketAddr> {
    let s = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    s.to_socket_addrs()
        .with_context(|| format!("{flag} {s:?}"))?
        .next()
        .with_context(|| format!("{flag} {s:?}: no address"))
}

fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join(".local/share/fem/broker"),
        _ => PathBuf::from("fem-data"),
    }
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("--config {}", path.display()))
}

/// Flags (and their variables) over the file over the defaults.
fn config(args: &mut Args) -> anyhow::Result<BrokerConfig> {
    let file = match &args.config {
        Some(p) => load_file(p)?,
        None => FileConfig::default(),
    };
    let d = BrokerConfig::default();
    if args.log.log_level.is_none() {
        args.log.log_level = file.log_level.clone();
    }
    if args.log.log_format.is_none() {
        args.log.log_format = file.log_format;
    }
    let listen = args
        .listen
        .clone()
        .or(file.listen)
        .unwrap_or_else(|| ":8443".into());
    let broker_id = AgentId::new(
        args.broker_id
            .clone()
            .or(file.broker_id)
            .unwrap_or_else(|| fem_net::cli::host_name("fem-broker")),
    )
    .context("--broker-id")?;
    let cert = args.cert.clone().or(file.cert);
    let key = args.key.clone().or(file.key);
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => TlsSource::Files { cert, key },
        (None, None) => TlsSource::SelfSigned,
        _ => anyhow::bail!("--cert and --key go together"),
    };
    let heartbeat_interval = args
        .heartbeat_interval
        .or(file.heartbeat_interval)
        .unwrap_or(d.heartbeat_interval);
    let heartbeat_grace = args
        .heartbeat_grace
        .or(file.heartbeat_grace)
        .unwrap_or(d.heartbeat_grace);
    if heartbeat_grace <= heartbeat_interval {
        anyhow::bail!(
            "--heartbeat-grace ({heartbeat_grace:?}) must be longer than --heartbeat-interval ({heartbeat_interval:?})"
        );
    }
    let max_connections = args
        .max_connections
        .or(file.max_connections)
        .unwrap_or(d.max_connections);
    let max_frame = args
        .max_frame_size
        .or(file.max_frame_size)
        .unwrap_or(d.max_frame);
    if max_connections == 0 || max_frame < 1024 {
        anyhow::bail!("--max-connections must be positive and --max-frame-size at least 1024");
    }
    let limits = merge_limits(&args.limits, &file.limits)?;
    if limits.max_registration_bytes > max_frame {
        anyhow::bail!("--max-registration-bytes may not exceed --max-frame-size");
    }
    let max_call_timeout = args
        .max_call_timeout
        .or(file.max_call_timeout)
        .unwrap_or(d.max_call_timeout);
    let registration_timeout = args
        .registration_timeout
        .or(file.registration_timeout)
        .unwrap_or(d.registration_timeout);
    let session_queue = args
        .session_queue
        .or(file.session_queue)
        .unwrap_or(d.session_queue);
    if max_call_timeout.is_zero() || registration_timeout.is_zero() || session_queue == 0 {
        anyhow::bail!(
            "--max-call-timeout, --registration-timeout and --session-queue must be positive"
        );
    }
    let metrics_listen = args
        .metrics_listen
        .clone()
        .or(file.metrics_listen)
        .map(|s| parse_addr("--metrics-listen", &s))
        .transpose()?;
    let admin_token = match args.admin_token_file.clone().or(file.admin_token_file) {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .with_context(|| format!("--admin-token-file {}", p.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("FEM_ADMIN_TOKEN").ok(),
    }
    .filter(|t| !t.is_empty());
    let (mut mcp, file_mcp_listen) = file.mcp.load()?;
    mcp.listen = args
        .mcp_listen
        .clone()
        .or(file_mcp_listen)
        .map(|s| parse_addr("--mcp-listen", &s))
        .transpose()?;
    let mut federation = federation(args, file.federation)?;
    if let Some(p) = args.broker_grant.clone().or(file.broker_grant) {
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("--broker-grant {}", p.display()))?;
        federation.grant = Some(
            fem_proto::SignedGrant::from_text(&text)
                .with_context(|| format!("--broker-grant {}", p.display()))?,
        );
    }
    let anchor_files: Vec<PathBuf> = match (args.trust_anchor.clone(), file.trust_anchor) {
        (Some(a), _) => a,
        (None, Some(OneOrMany::One(a))) => vec![a.into()],
        (None, Some(OneOrMany::Many(a))) => a.into_iter().map(PathBuf::from).collect(),
        (None, None) => Vec::new(),
    };
    let mut trust_anchors = Vec::new();
    for f in &anchor_files {
        trust_anchors.extend(read_keys("--trust-anchor", f)?);
    }
    Ok(BrokerConfig {
        listen: parse_addr("--listen", &listen)?,
        data_dir: args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir),
        tls,
        tls_names: args
            .tls_names
            .clone()
            .or(file.tls_names)
            .unwrap_or_default(),
        broker_id,
        max_connections,
        max_frame,
        max_call_timeout,
        registration_timeout,
        session_queue,
        limits,
        agent_queue_limit: args
            .agent_queue_limit
            .or(file.agent_queue_limit)
            .unwrap_or(d.agent_queue_limit),
        heartbeat_interval,
        heartbeat_grace,
        replay_window_ms: match args.replay_window.or(file.replay_window) {
            Some(w) => u64::try_from(w.as_millis()).context("--replay-window")?,
            None => d.replay_window_ms,
        },
        shutdown_grace: args
            .shutdown_grace
            .or(file.shutdown_grace)
            .unwrap_or(d.shutdown_grace),
        metrics_listen,
        admin_token,
        federation,
        trust_anchors,
        mcp,
    })
}

/// Public keys from a file: one per line in hex, `#` comments allowed.
fn read_keys(flag: &str, p: &Path) -> anyhow::Result<Vec<fem_proto::PublicKey>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("{flag} {}", p.display()))?;
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.parse::<fem_proto::PublicKey>()
                .with_context(|| format!("{flag} {}: {l:?}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if keys.is_empty() {
        anyhow::bail!("{flag} {}: no public key in the file", p.display());
    }
    Ok(keys)
}

fn federation(args: &Args, file: FileFederation) -> anyhow::Result<FederationConfig> {
    use fem_broker::FederationMode;
    let disc = file.discovery.filter(|d| d.enabled.unwrap_or(true));
    let discover_srv = args
        .discover_srv
        .clone()
        .or_else(|| disc.as_ref().and_then(|d| d.srv.clone()))
        .unwrap_or_default();
    let discovery_interval = args
        .discovery_interval
        .or_else(|| disc.as_ref().and_then(|d| d.interval))
        .unwrap_or(Duration::from_secs(30));
    if discovery_interval.is_zero() {
        anyhow::bail!("--discovery-interval must be positive");
    }
    let dns_server = args
        .dns_server
        .clone()
        .or_else(|| disc.as_ref().and_then(|d| d.dns_server.clone()))
        .map(|s| {
            s.to_socket_addrs()
                .with_context(|| format!("--dns-server {s:?}"))?
                .next()
                .with_context(|| format!("--dns-server {s:?}: no address"))
        })
        .transpose()?;
    let mode = match args.federation_mode.or(file.mode) {
        None => FederationMode::Off,
        Some(ModeArg::Hub) => FederationMode::Hub,
        Some(ModeArg::Spoke) => FederationMode::Spoke,
        Some(ModeArg::Mesh) => FederationMode::Mesh,
    };
    let file_hubs = match file.hub {
        Some(OneOrMany::One(h)) => Some(vec![h]),
        Some(OneOrMany::Many(h)) => Some(h),
        None => None,
    };
    let hubs = args.federation_hub.clone().or(file_hubs);
    let hubs = hubs.unwrap_or_default();
    let peers = args.peers.clone().or(file.peers).unwrap_or_default();
    match mode {
        FederationMode::Spoke if hubs.is_empty() => {
            anyhow::bail!("--federation-mode spoke needs --federation-hub URL")
        }
        FederationMode::Spoke if !peers.is_empty() => {
            anyhow::bail!("a spoke connects to hubs only; use --federation-hub, not --peer")
        }
        FederationMode::Mesh if peers.is_empty() && discover_srv.is_empty() => {
            tracing_free_warning(
                "--federation-mode mesh without --peer or --discover-srv: waiting for peers to connect",
            )
        }
        FederationMode::Off
            if !peers.is_empty() || !hubs.is_empty() || !discover_srv.is_empty() =>
        {
            anyhow::bail!("--peer/--federation-hub need --federation-mode (mesh, hub or spoke)")
        }
        _ => {}
    }
    for u in peers.iter().chain(&hubs).filter(|u| !u.starts_with("srv:")) {
        fem_net::BrokerUrl::parse(u).with_context(|| format!("peer URL {u:?}"))?;
    }
    let listen = args
        .federation_listen
        .clone()
        .or(file.listen)
        .map(|s| parse_addr("--federation-listen", &s))
        .transpose()?;
    let trust = fem_net::Trust::from_options(
        args.ca.clone().or(file.ca),
        args.pin.clone().or(file.pin).as_deref(),
        args.insecure || file.insecure.unwrap_or(false),
    )?;
    let peer_keys = match args.peer_keys.clone().or(file.peer_keys) {
        Some(p) => Some(read_keys("--peer-keys", &p)?),
        None => None,
    };
    let d = FederationConfig::default();
    Ok(FederationConfig {
        mode,
        peers,
        hubs,
        trust,
        peer_keys,
        discover_srv,
        discovery_interval,
        dns_server,
        listen,
        link_timeout: args
            .link_timeout
            .or(file.link_timeout)
            .unwrap_or(d.link_timeout),
        verify_relayed: args.verify_relayed || file.verify_relayed.unwrap_or(false),
        stub: args.federation_routes.or(file.routes) == Some(RoutesArg::Summary),
        ..d
    })
}

fn tracing_free_warning(msg: &str) {
    eprintln!("fem-broker: warning: {msg}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    let cfg = config(&mut args);
    // rmcp logs every stateless MCP request at info.
    args.log.init("info,rmcp=warn");
    let run = async {
        let broker = Broker::bind(cfg?).await?;
        fem_net::cli::shutdown_signal().await;
        tracing::info!("signal received; draining");
        broker.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fem-broker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
