//! Certificates, the broker identity key, and TLS configurations.
//!
//! With no `--cert/--key`, the broker keeps a development CA and a server
//! certificate issued by it in the data directory (clients trust the CA with
//! `--ca DATA_DIR/tls/ca.pem`, or pin the server certificate's SHA-256).

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fem_proto::SigningKey;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest as _;

use crate::BrokerError;

/// Where the broker's TLS certificate comes from.
#[derive(Clone, Debug, Default)]
pub enum TlsSource {
    /// Generate (once) a development CA and server certificate in the data directory.
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

/// Writes `data` to `path` readable by the owner only (0600), atomically.
///
/// # Errors
/// I/O errors.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Loads the broker's Ed25519 identity from `dir/broker.key`, creating it on first start.
///
/// # Errors
/// I/O errors or a corrupt key file.
pub fn load_or_create_identity(dir: &Path) -> Result<SigningKey, BrokerError> {
    let path = dir.join("broker.key");
    if path.exists() {
        let text = fs::read_to_string(&path).map_err(|e| BrokerError::io(&path, e))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| {
            BrokerError::Config(format!("{}: not a 64-hex-digit key", path.display()))
        })?;
        return Ok(SigningKey::from_seed(seed));
    }
    let key = SigningKey::generate();
    write_private(&path, hex::encode(key.seed()).as_bytes())
        .map_err(|e| BrokerError::io(&path, e))?;
    Ok(key)
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    sha2::Sha256::digest(cert.as_ref()).into()
}

/// Loads or generates the certificate for `source`.
///
/// `names` are the subject alternative names the generated certificate must
/// carry; when they change, a new leaf is issued by the same CA.
///
/// # Errors
/// I/O, PEM or certificate generation errors.
pub fn load_material(
    source: &TlsSource,
    data_dir: &Path,
    names: &[String],
) -> Result<TlsMaterial, BrokerError> {
    match source {
        TlsSource::Files { cert, key } => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| BrokerError::Config(format!("{}: {e}", cert.display())))?;
            let leaf = chain.first().ok_or_else(|| {
                BrokerError::Config(format!("{}: no certificate", cert.display()))
            })?;
            let fp = fingerprint(leaf);
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| BrokerError::Config(format!("{}: {e}", key.display())))?;
            Ok(TlsMaterial {
                chain,
                key,
                fingerprint: fp,
                ca_path: None,
            })
        }
        TlsSource::SelfSigned => self_signed(data_dir, names),
    }
}

fn self_signed(data_dir: &Path, names: &[String]) -> Result<TlsMaterial, BrokerError> {
    let dir = data_dir.join("tls");
    fs::create_dir_all(&dir).map_err(|e| BrokerError::io(&dir, e))?;
    let gen_err = |e: rcgen::Error| BrokerError::Config(format!("certificate generation: {e}"));
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let (ca_cert, ca_key) = if ca_cert_path.exists() && ca_key_path.exists() {
        let key_pem =
            fs::read_to_string(&ca_key_path).map_err(|e| BrokerError::io(&ca_key_path, e))?;
        let cert_pem =
            fs::read_to_string(&ca_cert_path).map_err(|e| BrokerError::io(&ca_cert_path, e))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(gen_err)?;
        // Re-derive an issuer with the same name and key: leaves it signs
        // verify against the CA certificate on disk.
        let params = rcgen::CertificateParams::from_ca_cert_pem(&cert_pem).map_err(gen_err)?;
        (params.self_signed(&key).map_err(gen_err)?, key)
    } else {
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "FEM development CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())
            .map_err(|e| BrokerError::io(&ca_key_path, e))?;
        fs::write(&ca_cert_path, cert.pem()).map_err(|e| BrokerError::io(&ca_cert_path, e))?;
        (cert, key)
    };

    let leaf_path = dir.join("cert.pem");
    let leaf_key_path = dir.join("key.pem");
    let names_path = dir.join("names.txt");
    let wanted = names.join("\n");
    let current = fs::read_to_string(&names_path).unwrap_or_default();
    if current != wanted || !leaf_path.exists() || !leaf_key_path.exists() {
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(n.clone().try_into().map_err(gen_err)?),
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().map_or("fem-broker", String::as_str),
        );
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(gen_err)?;
        write_private(&leaf_key_path, key.serialize_pem().as_bytes())
            .map_err(|e| BrokerError::io(&leaf_key_path, e))?;
        fs::write(&leaf_path, cert.pem()).map_err(|e| BrokerError::io(&leaf_path, e))?;
        fs::write(&names_path, &wanted).map_err(|e| BrokerError::io(&names_path, e))?;
    }
    let mut m = load_material(
        &TlsSource::Files {
            cert: leaf_path,
            key: leaf_key_path,
        },
        data_dir,
        names,
    )?;
    m.ca_path = Some(ca_cert_path);
    Ok(m)
}

/// A TLS 1.3-only rustls server configuration offering `alpn`.
///
/// # Errors
/// When the key does not match the certificate.
pub fn server_config(m: &TlsMaterial, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, BrokerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| BrokerError::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| BrokerError::Config(format!("TLS certificate/key: {e}")))?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}
