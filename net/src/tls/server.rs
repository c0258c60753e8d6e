//! The server side: a certificate and key from PEM files or from the
//! development CA, and the server configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{fingerprint, read_certs};
use crate::NetError;

/// Where a server's TLS certificate comes from.
#[derive(Clone, Debug, Default)]
pub enum TlsSource {
    /// Generate (once) a development CA, and a server certificate issued by
    /// it, in the data directory (see [`super::dev_ca`]).
    #[default]
    SelfSigned,
    /// PEM files given by the operator.
    Files {
        /// Certificate chain (leaf first).
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// A loaded certificate chain and key.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate (what clients pin).
    pub fingerprint: [u8; 32],
    /// The development CA file, when self-signed.
    pub ca_path: Option<PathBuf>,
}

/// Loads or generates the certificate for `source`.
///
/// `names` are the subject alternative names the generated certificate must
/// carry; when they change, a new leaf is issued by the same CA.
///
/// # Errors
/// [`NetError::Pem`] or [`NetError::NoCertificate`] for unreadable files;
/// with [`TlsSource::SelfSigned`] also [`NetError::Io`] and
/// [`NetError::Generate`].
pub fn load_material(
    source: &TlsSource,
    data_dir: &Path,
    names: &[String],
) -> Result<TlsMaterial, NetError> {
    match source {
        TlsSource::Files { cert, key } => {
            let chain = read_certs(cert)?;
            let leaf = chain
                .first()
                .ok_or_else(|| NetError::NoCertificate { path: cert.clone() })?;
            let fp = fingerprint(leaf);
            let key = PrivateKeyDer::from_pem_file(key).map_err(|source| NetError::Pem {
                path: key.clone(),
                source,
            })?;
            Ok(TlsMaterial {
                chain,
                key,
                fingerprint: fp,
                ca_path: None,
            })
        }
        TlsSource::SelfSigned => super::dev_ca::issue(data_dir, names),
    }
}

/// A TLS 1.3-only rustls server configuration offering `alpn`.
///
/// # Errors
/// [`NetError::Tls`] when the key does not match the certificate.
pub fn server_config(m: &TlsMaterial, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}
