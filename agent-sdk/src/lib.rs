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
mod metrics;
mod tool;

use std::time::Duration;

pub use client::{AgentBuilder, CallError, Client, Event, Origin};
pub use fem_net::{BrokerUrl, NetError, Transport, Trust, keys, tls, wire};
pub use fem_proto as proto;
pub use metrics::AgentMetrics;
pub use tool::{Tool, ToolError, ToolRequest};

/// Errors of the SDK (connection set-up, configuration).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A configuration the connection cannot be made with: the broker URL,
    /// certificate trust (a CA file, a pin) or TLS set-up.
    #[error(transparent)]
    Net(#[from] NetError),
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

impl SdkError {
    /// True for errors that retrying will not mend: [`SdkError::Config`]
    /// and [`SdkError::Net`] (a bad URL, CA file or pin).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Net(_))
    }
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
}

impl Options {
    /// Options for a broker URL: `https://host:port` (QUIC, falling back to
    /// TLS/TCP), `quic://host:port` or `tls://host:port`. Port defaults to 8443.
    ///
    /// # Errors
    /// [`SdkError::Net`] with [`NetError::Url`] for a malformed URL or an
    /// unknown scheme.
    pub fn new(url: &str) -> Result<Self, SdkError> {
        let url = BrokerUrl::parse(url)?;
        Ok(Self::from_url(&url))
    }

    /// Options for a parsed broker URL, with the defaults of [`Options::new`].
    pub fn from_url(url: &BrokerUrl) -> Self {
        Self {
            host: url.host().to_owned(),
            port: url.port(),
            transport: url.transport(),
            trust: Trust::default(),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            call_timeout: Duration::from_secs(30),
            max_frame: fem_proto::DEFAULT_MAX_FRAME,
        }
    }

    /// Sets the certificate trust.
    #[must_use]
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
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
        fem_net::endpoint(&self.host, self.port)
    }
}
