//! Command-line options and set-up shared by the FEM programs (feature
//! `cli`): transport choice, logging, host name, shutdown signals.

use clap::{Args, ValueEnum};

use crate::Transport;

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
        use tracing_subscriber::filter::{EnvFilter, Targets};
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::{Layer, Registry};

        let level = self.log_level.as_deref().unwrap_or(default_level);
        let from_env = std::env::var("RUST_LOG").ok();
        let directives = from_env.as_deref().unwrap_or(level);
        // Levels by target (all FEM's defaults) need no state per span:
        // EnvFilter, kept for span and field directives, looks every
        // entered span up under a shared lock, on every poll of every
        // instrumented task.
        let filter: Box<dyn Layer<Registry> + Send + Sync> = match directives.parse::<Targets>() {
            Ok(targets) if !directives.is_empty() => Box::new(targets),
            _ => Box::new(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
            ),
        };
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        let registry = tracing_subscriber::registry().with(filter);
        match self.log_format.unwrap_or(LogFormat::Text) {
            LogFormat::Text => registry.with(fmt).init(),
            LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
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
