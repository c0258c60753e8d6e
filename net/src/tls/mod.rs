//! TLS 1.3 configuration for both ends of a connection (rustls with the
//! *ring* provider; TLS 1.2 is never offered or accepted).
//!
//! * Client: [`Trust`] says how the server's certificate is checked, and
//!   [`client_config`] builds the configuration.
//! * Server: [`load_material`] reads a certificate chain and key
//!   ([`TlsSource::Files`]) or issues one from the development CA in a data
//!   directory ([`TlsSource::SelfSigned`], see [`dev_ca`]), and
//!   [`server_config`] builds the configuration.

mod client;
pub mod dev_ca;
mod server;

use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use sha2::Digest as _;

pub use client::{Trust, client_config};
pub use server::{TlsMaterial, TlsSource, load_material, server_config};

use crate::NetError;

/// SHA-256 of a DER certificate (what clients pin, as servers log it).
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    sha2::Sha256::digest(cert.as_ref()).into()
}

/// The certificates of a PEM file (possibly none).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| NetError::Pem {
            path: path.to_owned(),
            source,
        })
}
