//! `fem-broker`: parse flags (with FEM_* fallbacks), bind, serve until SIGINT/SIGTERM.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fem_agent_sdk::cli::LogArgs;
use fem_broker::{Broker, BrokerConfig, TlsSource};
use fem_proto::AgentId;

/// FEM broker: signed agent registration and tool-call routing over QUIC and TLS.
#[derive(Debug, Parser)]
#[command(name = "fem-broker", version)]
struct Args {
    /// Address for QUIC (UDP) and TLS (TCP), same port; ":8443" means all IPv4 interfaces.
    #[arg(long, env = "FEM_LISTEN", default_value = ":8443")]
    listen: String,
    /// Directory for the broker identity key and generated certificates.
    #[arg(long, env = "FEM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TLS certificate chain (PEM). Without it a development certificate is generated.
    #[arg(long, env = "FEM_TLS_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "FEM_TLS_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Extra DNS names or IPs for the generated certificate (repeatable).
    #[arg(long = "tls-name", env = "FEM_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// Broker id (default: the host name).
    #[arg(long, env = "FEM_BROKER_ID")]
    broker_id: Option<String>,
    /// Maximum concurrent agent connections.
    #[arg(long, env = "FEM_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Calls that may wait at the broker for a slot on one agent (beyond: RATE_LIMITED).
    #[arg(long, env = "FEM_AGENT_QUEUE_LIMIT", default_value_t = 1024)]
    agent_queue_limit: usize,
    /// Maximum frame size in bytes.
    #[arg(long, env = "FEM_MAX_FRAME_SIZE", default_value_t = fem_proto::DEFAULT_MAX_FRAME)]
    max_frame_size: usize,
    /// Heartbeat interval announced to agents.
    #[arg(long, env = "FEM_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Silence after which an agent is evicted and its calls answered AGENT_UNAVAILABLE.
    #[arg(long, env = "FEM_HEARTBEAT_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    heartbeat_grace: Duration,
    /// Accepted clock skew for envelope timestamps (replay window).
    #[arg(long, env = "FEM_REPLAY_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    replay_window: Duration,
    /// Grace period for in-flight calls on SIGTERM.
    #[arg(long, env = "FEM_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    log: LogArgs,
}

fn parse_listen(s: &str) -> anyhow::Result<SocketAddr> {
    let s = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    s.to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("--listen {s:?}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--listen {s:?}: no address"))
}

fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join(".local/share/fem/broker"),
        _ => PathBuf::from("fem-data"),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fem-broker".to_owned())
}

fn config(args: &Args) -> anyhow::Result<BrokerConfig> {
    let broker_id = AgentId::new(args.broker_id.clone().unwrap_or_else(host_name))?;
    if args.heartbeat_grace <= args.heartbeat_interval {
        anyhow::bail!("--heartbeat-grace must be longer than --heartbeat-interval");
    }
    Ok(BrokerConfig {
        listen: parse_listen(&args.listen)?,
        data_dir: args.data_dir.clone().unwrap_or_else(default_data_dir),
        tls: match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => TlsSource::SelfSigned,
        },
        tls_names: args.tls_names.clone(),
        broker_id,
        max_connections: args.max_connections,
        max_frame: args.max_frame_size,
        agent_queue_limit: args.agent_queue_limit,
        heartbeat_interval: args.heartbeat_interval,
        heartbeat_grace: args.heartbeat_grace,
        replay_window_ms: u64::try_from(args.replay_window.as_millis())?,
        shutdown_grace: args.shutdown_grace,
        ..BrokerConfig::default()
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    args.log.init("info");
    let run = async {
        let cfg = config(&args)?;
        let broker = Broker::bind(cfg).await?;
        wait_for_signal().await;
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
