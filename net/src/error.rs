//! The error type of fem-net.

use std::path::PathBuf;

/// Errors of fem-net: configuration, files, certificates and broker URLs.
///
/// Reading frames has its own error, [`ReadError`](crate::wire::ReadError).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Invalid configuration (conflicting trust options, a malformed pin).
    #[error("configuration: {0}")]
    Config(String),
    /// A broker URL that does not parse.
    #[error("broker URL {url:?}: {source}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        source: UrlError,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file does not hold 64 hex digits.
    #[error("{path}: expected 64 hex digits")]
    MalformedKey {
        /// The key file.
        path: PathBuf,
    },
    /// A PEM file (certificates or private key) could not be read.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path}: no certificate found")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate that rustls does not accept (e.g. as a trust root).
    #[error("{path}: {source}")]
    BadCertificate {
        /// The file it came from.
        path: PathBuf,
        /// The cause.
        source: rustls::Error,
    },
    /// A TLS configuration that rustls refuses (e.g. a key that does not
    /// match its certificate).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Generating the development CA or a certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

impl NetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// What is wrong with a broker URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not a URL.
    #[error(transparent)]
    Parse(#[from] url::ParseError),
    /// A scheme other than `https`, `fem`, `quic`, `tls` or `tcp`.
    #[error("unknown scheme {0:?}")]
    UnknownScheme(String),
    /// No host.
    #[error("no host")]
    NoHost,
}
