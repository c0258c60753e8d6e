//! What an agent or a caller links to join a FEM mesh.
//!
//! * [`AgentBuilder`] registers an agent (id, key, capabilities, tools with
//!   JSON schemas and async handlers) and serves calls concurrently, with
//!   heartbeats and automatic reconnection plus re-registration.
//! * [`Client`] (returned by [`AgentBuilder::connect`], or
//!   [`Client::connect`] for a pure caller) calls tools by agent id or by
//!   capability, discovers tools, emits and subscribes to events.
//! * Everything received is verified: envelope signatures against the key the
//!   broker vouches for, replay windows, and the broker's certificate by CA
//!   file, pinned fingerprint, or (only when asked) not at all.
//!
//! ```no_run
//! use fem_agent_sdk::{AgentBuilder, Options, Tool, Trust};
//! use fem_proto::{AgentId, SigningKey, Target};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let opts = Options::new("https://localhost:8443")?.trust(Trust::Insecure);
//! let echo = Tool::new("echo", "Echo the input", serde_json::json!({"type": "object"}), |req| async move {
//!     Ok(req.params)
//! })?;
//! let agent = AgentBuilder::new(AgentId::new("echo-1")?, SigningKey::generate())
//!     .capability("echo")?
//!     .tool(echo)
//!     .connect(opts.clone())
//!     .await?;
//! let caller = fem_agent_sdk::Client::connect(AgentId::new("caller")?, SigningKey::generate(), opts).await?;
//! let out = caller.call(Target::Agent(agent.id().clone()), "echo", serde_json::json!({"hi": 1})).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

#[cfg(feature = "cli")]
pub mod cli;
mod client;
pub mod keys;
mod metrics;
pub mod tls;
mod tool;
pub mod wire;

use std::time::Duration;

pub use client::{AgentBuilder, CallError, Client, Event, Origin};
pub use fem_proto as proto;
pub use metrics::AgentMetrics;
pub use tls::Trust;
pub use tool::{Tool, ToolError, ToolRequest};

/// Errors of the SDK (connection set-up, configuration, keys).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A key file problem.
    #[error("key: {0}")]
    Key(String),
    /// Could not connect to the broker.
    #[error("connect to {url}: {reason}")]
    Connect {
        /// Broker URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The broker refused the registration.
    #[error("registration refused: {code}: {reason}")]
    Denied {
        /// Code.
        code: fem_proto::ErrorCode,
        /// Reason given by the broker.
        reason: String,
    },
    /// A protocol error.
    #[error(transparent)]
    Proto(#[from] fem_proto::ProtoError),
}

/// Which transport to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// QUIC first, TLS over TCP when QUIC does not connect (UDP blocked).
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Broker host (name or IP).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Transport preference.
    pub transport: Transport,
    /// Certificate trust.
    pub trust: Trust,
    /// Heartbeat interval (default 10 s).
    pub heartbeat: Duration,
    /// Time allowed for one connection attempt (default 10 s; QUIC gets at most 3 s in Auto mode).
    pub connect_timeout: Duration,
    /// First reconnection delay (default 200 ms), doubled up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest reconnection delay (default 30 s).
    pub backoff_max: Duration,
    /// Default deadline of calls made with [`Client::call`] (default 30 s).
    pub call_timeout: Duration,
    /// Maximum frame size accepted.
    pub max_frame: usize,
    /// The client's grant, presented before every registration (needed
    /// where the broker has a trust anchor).
    pub grant: Option<fem_proto::SignedGrant>,
}

impl Options {
    /// Options for a broker URL: `https://host:port` (QUIC, falling back to
    /// TLS/TCP), `quic://host:port` or `tls://host:port`. Port defaults to 8443.
    ///
    /// # Errors
    /// [`SdkError::Config`] for a malformed URL or unknown scheme.
    pub fn new(url: &str) -> Result<Self, SdkError> {
        let u = url::Url::parse(url)
            .map_err(|e| SdkError::Config(format!("broker URL {url:?}: {e}")))?;
        let transport = match u.scheme() {
            "https" | "fem" => Transport::Auto,
            "quic" => Transport::Quic,
            "tls" | "tcp" => Transport::Tcp,
            s => {
                return Err(SdkError::Config(format!(
                    "broker URL {url:?}: unknown scheme {s:?}"
                )));
            }
        };
        let host = match u.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(SdkError::Config(format!("broker URL {url:?} has no host"))),
        };
        Ok(Self {
            host,
            port: u.port().unwrap_or(8443),
            transport,
            trust: Trust::default(),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            call_timeout: Duration::from_secs(30),
            max_frame: fem_proto::DEFAULT_MAX_FRAME,
            grant: None,
        })
    }

    /// Sets the certificate trust.
    #[must_use]
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    /// Sets the grant presented at registration.
    #[must_use]
    pub fn grant(mut self, grant: fem_proto::SignedGrant) -> Self {
        self.grant = Some(grant);
        self
    }

    /// Sets the transport.
    #[must_use]
    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    /// Sets the heartbeat interval.
    #[must_use]
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = d;
        self
    }

    /// Sets the default call deadline.
    #[must_use]
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.call_timeout = d;
        self
    }

    /// Sets the reconnection backoff bounds.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// `host:port` for messages.
    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}
