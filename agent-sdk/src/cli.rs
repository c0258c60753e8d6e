//! Command-line options shared by the FEM programs (feature `cli`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::{Options, SdkError, Transport, Trust};

/// Transport choice on the command line.
#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportArg {
    /// QUIC, falling back to TLS over TCP.
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => Self::Auto,
            TransportArg::Quic => Self::Quic,
            TransportArg::Tcp => Self::Tcp,
        }
    }
}

/// Broker connection options: URL and certificate trust.
#[derive(Clone, Debug, Args)]
pub struct ConnectArgs {
    /// Broker URL (https://host:8443; quic:// or tls:// force a transport).
    #[arg(long, env = "FEM_BROKER_URL", default_value = "https://localhost:8443")]
    pub broker: String,
    /// Trust the broker certificate issued by this CA (PEM file).
    #[arg(long, env = "FEM_CA")]
    pub ca: Option<PathBuf>,
    /// Trust the broker certificate with this SHA-256 fingerprint (hex).
    #[arg(long, env = "FEM_PIN")]
    pub pin: Option<String>,
    /// Do not verify the broker certificate (development only).
    #[arg(long, env = "FEM_INSECURE")]
    pub insecure: bool,
    /// Transport.
    #[arg(long, env = "FEM_TRANSPORT", value_enum, default_value = "auto")]
    pub transport: TransportArg,
    /// Heartbeat interval.
    #[arg(long, env = "FEM_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Grant file (from `fem trust grant`), presented to brokers with a trust anchor.
    #[arg(long, env = "FEM_GRANT")]
    pub grant: Option<PathBuf>,
}

impl ConnectArgs {
    /// Connection options from the arguments.
    ///
    /// # Errors
    /// [`SdkError::Config`] for a bad URL or conflicting trust options.
    pub fn options(&self) -> Result<Options, SdkError> {
        let trust = Trust::from_options(self.ca.clone(), self.pin.as_deref(), self.insecure)?;
        // Auto leaves the choice to the URL's scheme.
        let transport = match self.transport {
            TransportArg::Auto => None,
            t => Some(Transport::from(t)),
        };
        let mut o = Options::new(&self.broker)?
            .trust(trust)
            .heartbeat(self.heartbeat);
        if let Some(t) = transport {
            o = o.transport(t);
        }
        if let Some(p) = &self.grant {
            let text = std::fs::read_to_string(p)
                .map_err(|e| SdkError::Config(format!("--grant {}: {e}", p.display())))?;
            let g = fem_proto::SignedGrant::from_text(&text)
                .map_err(|e| SdkError::Config(format!("--grant {}: {e}", p.display())))?;
            o = o.grant(g);
        }
        Ok(o)
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Logging options.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log level or filter (RUST_LOG overrides it; default info, warn for `fem`).
    #[arg(long, env = "FEM_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "FEM_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    /// Installs the global subscriber (logs go to stderr); `default_level`
    /// applies when neither `--log-level` nor RUST_LOG is set.
    pub fn init(&self, default_level: &str) {
        let level = self.log_level.as_deref().unwrap_or(default_level);
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        match self.log_format.unwrap_or(LogFormat::Text) {
            LogFormat::Text => b.init(),
            LogFormat::Json => b.json().flatten_event(true).init(),
        }
    }
}

/// The host name (from the kernel), or `fallback` when it cannot be read.
pub fn host_name(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| fallback.to_owned())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
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
