//! Connection options.

use std::time::Duration;

use crate::{BrokerUrl, SdkError, Transport, Trust};

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
    /// Default deadline of calls made with [`Client::call`](crate::Client::call) (default 30 s).
    pub call_timeout: Duration,
    /// Maximum frame size accepted.
    pub max_frame: usize,
    /// The client's grant, presented before every registration (needed
    /// where the broker has a trust anchor).
    pub grant: Option<fem_proto::SignedGrant>,
    /// Operator keys: when set, an agent runs a call only if the caller's
    /// grant verifies against them and allows it (end-to-end check).
    pub trust_anchors: Vec<fem_proto::PublicKey>,
}

impl Options {
    /// Options for a broker URL: `https://host:port` (QUIC, falling back to
    /// TLS/TCP), `quic://host:port` or `tls://host:port`. Port defaults to 8443.
    ///
    /// # Errors
    /// [`SdkError::Net`] with [`NetError::Url`](crate::NetError::Url) for a malformed URL or an
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
            grant: None,
            trust_anchors: Vec::new(),
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

    /// Sets the operator keys that callers' grants must verify against.
    #[must_use]
    pub fn trust_anchors(mut self, anchors: Vec<fem_proto::PublicKey>) -> Self {
        self.trust_anchors = anchors;
        self
    }

    /// Sets the grant presented at registration.
    #[must_use]
    pub fn grant(mut self, grant: fem_proto::SignedGrant) -> Self {
        self.grant = Some(grant);
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
