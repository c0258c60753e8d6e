//! Command-line options shared by the FEM programs (feature `cli`): those
//! of fem-net, and [`ConnectArgs`] for the broker connection.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
pub use fem_net::cli::{LogArgs, LogFormat, TransportArg, host_name, shutdown_signal};

use crate::{Options, SdkError, Transport, Trust};

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
    /// Operator public key file: callers' grants must verify against it (repeatable).
    #[arg(long = "trust-anchor", env = "FEM_TRUST_ANCHOR", value_delimiter = ',')]
    pub trust_anchor: Vec<PathBuf>,
}

impl ConnectArgs {
    /// Connection options from the arguments.
    ///
    /// # Errors
    /// [`SdkError::Net`] for a bad URL, conflicting trust options or a
    /// malformed pin.
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
        let mut anchors = Vec::new();
        for p in &self.trust_anchor {
            anchors.push(crate::keys::load_public_key(p)?);
        }
        if !anchors.is_empty() {
            o = o.trust_anchors(anchors);
        }
        Ok(o)
    }
}
