//! The client side: trust in the server's certificate by a CA file, a pinned
//! fingerprint, the system roots, or (only when asked) no verification.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::{fingerprint, read_certs};
use crate::NetError;

/// How the client decides to trust the broker's certificate.
#[derive(Clone, Debug, Default)]
pub enum Trust {
    /// The operating system's root certificates.
    #[default]
    System,
    /// Certificates (a CA, or the server certificate itself) from a PEM file.
    CaFile(PathBuf),
    /// The SHA-256 of the server's certificate (as `fem-broker` logs it).
    Pin([u8; 32]),
    /// No verification at all. Development only; logged as a warning.
    Insecure,
}

impl Trust {
    /// Builds the trust from the usual `--ca`, `--pin`, `--insecure` options
    /// (at most one may be given).
    ///
    /// # Errors
    /// [`NetError::Config`] for conflicting options or a malformed pin.
    pub fn from_options(
        ca: Option<PathBuf>,
        pin: Option<&str>,
        insecure: bool,
    ) -> Result<Self, NetError> {
        let given = usize::from(ca.is_some()) + usize::from(pin.is_some()) + usize::from(insecure);
        if given > 1 {
            return Err(NetError::Config(
                "give at most one of --ca, --pin and --insecure".into(),
            ));
        }
        if let Some(ca) = ca {
            return Ok(Self::CaFile(ca));
        }
        if let Some(pin) = pin {
            let hexpart = pin.trim().trim_start_matches("sha256:").replace(':', "");
            let mut b = [0u8; 32];
            hex::decode_to_slice(&hexpart, &mut b).map_err(|_| {
                NetError::Config("--pin needs the 64 hex digits of a SHA-256 fingerprint".into())
            })?;
            return Ok(Self::Pin(b));
        }
        Ok(if insecure {
            Self::Insecure
        } else {
            Self::System
        })
    }
}

/// A TLS 1.3-only client configuration offering `alpn`.
///
/// # Errors
/// For [`Trust::CaFile`]: [`NetError::Pem`] when the file cannot be read,
/// [`NetError::NoCertificate`] or [`NetError::BadCertificate`].
pub fn client_config(trust: &Trust, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match trust {
        Trust::System => {
            let mut roots = rustls::RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            for c in loaded.certs {
                let _ = roots.add(c);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(path)? {
                roots.add(c).map_err(|source| NetError::BadCertificate {
                    path: path.clone(),
                    source,
                })?;
            }
            if roots.is_empty() {
                return Err(NetError::NoCertificate { path: path.clone() });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FingerprintVerifier {
                pin: Some(*pin),
                provider,
            }))
            .with_no_client_auth(),
        Trust::Insecure => {
            tracing::warn!(
                "TLS certificate verification is DISABLED (--insecure); use only for development"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FingerprintVerifier {
                    pin: None,
                    provider,
                }))
                .with_no_client_auth()
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// Accepts the server certificate whose SHA-256 equals the pin (or any, when
/// `pin` is `None`), and still checks that the server holds its key.
#[derive(Debug)]
struct FingerprintVerifier {
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pin {
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) => {
                let got = fingerprint(end_entity);
                if got == pin {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "certificate fingerprint {} does not match the pinned {}",
                        hex::encode(got),
                        hex::encode(pin)
                    )))
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
