//! What both ends of a FEM connection share, without knowing brokers, agents
//! or routing.
//!
//! * [`wire`]: length-prefixed frames over any async byte stream (a QUIC
//!   stream or TLS over TCP). Reading runs fem-proto's fuzzed
//!   [`FrameDecoder`](fem_proto::FrameDecoder); writing batches queued frames.
//! * [`tls`]: TLS 1.3 client and server configurations, certificate
//!   [`Trust`] (a CA file, a pinned fingerprint, the system roots), and the
//!   development CA kept in a data directory.
//! * [`keys`]: Ed25519 key files, written 0600 and never through a
//!   symbolic link.
//! * [`BrokerUrl`]: `https://host:port` and the schemes that force a
//!   [`Transport`].
//! * `cli` (feature `cli`): command-line options and set-up shared by the
//!   programs (logging, transport choice, shutdown signals).
//!
//! ```no_run
//! use fem_net::{BrokerUrl, Trust, tls, wire::FrameReader};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let url = BrokerUrl::parse("tls://localhost:8443")?;
//! let trust = Trust::from_options(Some("ca.pem".into()), None, false)?;
//! let config = tls::client_config(&trust, &[fem_proto::ALPN_NATIVE])?;
//! let tcp = tokio::net::TcpStream::connect((url.host(), url.port())).await?;
//! let name = rustls::pki_types::ServerName::try_from(url.host().to_owned())?;
//! let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
//!     .connect(name, tcp)
//!     .await?;
//! let mut frames = FrameReader::new(stream, fem_proto::DEFAULT_MAX_FRAME);
//! while let Some(frame) = frames.next().await? {
//!     println!("{frame:?}");
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod broker_url;
#[cfg(feature = "cli")]
pub mod cli;
mod error;
pub mod keys;
pub mod tls;
pub mod wire;

pub use broker_url::{BrokerUrl, DEFAULT_PORT, Transport, endpoint};
pub use error::{NetError, UrlError};
pub use tls::Trust;
