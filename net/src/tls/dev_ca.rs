//! The development CA: with no certificate of its own, a server keeps a CA
//! and a certificate issued by it in its data directory, under `tls/`:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem`, `ca.key` | the CA (clients trust `ca.pem` with `--ca`) |
//! | `cert.pem`, `key.pem` | the server certificate and its key |
//! | `names.txt` | the names the certificate was issued for |
//!
//! Private keys are written 0600. The certificate is issued again, by the
//! same CA, when the names change; servers whose data directories hold the
//! same CA files trust each other through it.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use super::{TlsMaterial, TlsSource, load_material};
use crate::NetError;
use crate::keys::write_private;

/// Loads the CA from `data_dir/tls/` (creating it on first use), issues a
/// server certificate for `names` unless the one there already has them,
/// and loads it.
///
/// # Errors
/// [`NetError::Io`], [`NetError::Generate`], or errors reading the files
/// back as in [`load_material`].
pub(super) fn issue(data_dir: &Path, names: &[String]) -> Result<TlsMaterial, NetError> {
    let dir = data_dir.join("tls");
    fs::create_dir_all(&dir).map_err(|e| NetError::io(&dir, e))?;
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let (ca_cert, ca_key) = if ca_cert_path.exists() && ca_key_path.exists() {
        let key_pem =
            fs::read_to_string(&ca_key_path).map_err(|e| NetError::io(&ca_key_path, e))?;
        let cert_pem =
            fs::read_to_string(&ca_cert_path).map_err(|e| NetError::io(&ca_cert_path, e))?;
        let key = rcgen::KeyPair::from_pem(&key_pem)?;
        // Re-derive an issuer with the same name and key: leaves it signs
        // verify against the CA certificate on disk.
        let params = rcgen::CertificateParams::from_ca_cert_pem(&cert_pem)?;
        (params.self_signed(&key)?, key)
    } else {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
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
        let cert = params.self_signed(&key)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())
            .map_err(|e| NetError::io(&ca_key_path, e))?;
        fs::write(&ca_cert_path, cert.pem()).map_err(|e| NetError::io(&ca_cert_path, e))?;
        (cert, key)
    };

    let leaf_path = dir.join("cert.pem");
    let leaf_key_path = dir.join("key.pem");
    let names_path = dir.join("names.txt");
    let wanted = names.join("\n");
    let current = fs::read_to_string(&names_path).unwrap_or_default();
    if current != wanted || !leaf_path.exists() || !leaf_key_path.exists() {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(n.clone().try_into()?),
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
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        write_private(&leaf_key_path, key.serialize_pem().as_bytes())
            .map_err(|e| NetError::io(&leaf_key_path, e))?;
        fs::write(&leaf_path, cert.pem()).map_err(|e| NetError::io(&leaf_path, e))?;
        fs::write(&names_path, &wanted).map_err(|e| NetError::io(&names_path, e))?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::tls::{Trust, client_config, server_config};

    #[test]
    fn issues_once_and_again_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let m = issue(dir.path(), &names).unwrap();
        let ca = m.ca_path.clone().unwrap();
        for key in ["ca.key", "key.pem"] {
            let mode = fs::metadata(dir.path().join("tls").join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        // Same names: the same certificate.
        let again = issue(dir.path(), &names).unwrap();
        assert_eq!(again.fingerprint, m.fingerprint);
        // New names: a new leaf from the same CA.
        let more = issue(dir.path(), &["other.example".to_owned()]).unwrap();
        assert_ne!(more.fingerprint, m.fingerprint);
        assert_eq!(more.ca_path.as_deref(), Some(ca.as_path()));
        // Both ends of a configuration build (TLS 1.3 only).
        let server = server_config(&more, &[b"x"]).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"x".to_vec()]);
        client_config(&Trust::CaFile(ca), &[b"x"]).unwrap();
    }

    #[test]
    fn unreadable_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsSource::Files {
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
        };
        assert!(matches!(
            load_material(&missing, dir.path(), &[]),
            Err(NetError::Pem { .. })
        ));
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        assert!(matches!(
            client_config(&Trust::CaFile(empty), &[]),
            Err(NetError::NoCertificate { .. })
        ));
    }
}
