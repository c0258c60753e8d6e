//! Signed HTTP requests: how a client holding a grant authenticates to a
//! broker's HTTPS endpoints (the operator views) without a shared token.
//!
//! The request carries two headers: `Fem-Grant` (the grant in its file form)
//! and `Fem-Signature: key=HEX,ts=MS,nonce=HEX,sig=HEX`, where `sig` is
//! Ed25519 by `key` over
//!
//! ```text
//! "fem/1 http\n" || METHOD || "\n" || PATH-AND-QUERY || "\n" || ts || "\n" || nonce || "\n" || hex(SHA-256(body))
//! ```
//!
//! The broker checks the signature, the timestamp against its replay window,
//! the nonce once per key, and that the grant binds `key` (proto/README.md
//! section 8.12).

use sha2::Digest as _;

use crate::error::ProtoError;
use crate::ids::Nonce;
use crate::keys::{PublicKey, Signature, SigningKey};

/// Domain-separation tag of signed HTTP requests.
pub const HTTP_DOMAIN: &[u8] = b"fem/1 http\n";
/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "fem-signature";
/// The header carrying the grant (its file form).
pub const GRANT_HEADER: &str = "fem-grant";

/// The signature of one HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpSignature {
    /// The signing key (the grant's subject).
    pub key: PublicKey,
    /// When it was signed, ms since the epoch.
    pub ts_ms: u64,
    /// Random, once per key within the replay window.
    pub nonce: Nonce,
    /// Ed25519 over [`signing_input`].
    pub signature: Signature,
}

/// The bytes a request signature covers.
pub fn signing_input(method: &str, path: &str, ts_ms: u64, nonce: &Nonce, body: &[u8]) -> Vec<u8> {
    let digest = hex::encode(sha2::Sha256::digest(body));
    let mut out = HTTP_DOMAIN.to_vec();
    out.extend_from_slice(
        format!(
            "{}\n{path}\n{ts_ms}\n{nonce}\n{digest}",
            method.to_ascii_uppercase()
        )
        .as_bytes(),
    );
    out
}

impl HttpSignature {
    /// Signs a request now with a fresh nonce.
    pub fn sign(key: &SigningKey, method: &str, path: &str, body: &[u8]) -> Self {
        let (ts_ms, nonce) = (crate::now_ms(), Nonce::random());
        let signature = key.sign(&signing_input(method, path, ts_ms, &nonce, body));
        Self {
            key: key.public_key(),
            ts_ms,
            nonce,
            signature,
        }
    }

    /// The header value.
    pub fn to_header(&self) -> String {
        format!(
            "key={},ts={},nonce={},sig={}",
            self.key,
            self.ts_ms,
            self.nonce,
            hex::encode(self.signature.0)
        )
    }

    /// Parses a header value.
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] naming what is wrong.
    pub fn parse(value: &str) -> Result<Self, ProtoError> {
        let bad = |detail: &str| ProtoError::Malformed {
            what: "Fem-Signature header",
            detail: detail.to_owned(),
        };
        let (mut key, mut ts, mut nonce, mut sig) = (None, None, None, None);
        for part in value.split(',') {
            let (k, v) = part
                .trim()
                .split_once('=')
                .ok_or_else(|| bad("expected k=v pairs"))?;
            match k {
                "key" => key = Some(v.parse::<PublicKey>().map_err(|_| bad("key"))?),
                "ts" => ts = Some(v.parse::<u64>().map_err(|_| bad("ts"))?),
                "nonce" => nonce = Some(v.parse::<Nonce>().map_err(|_| bad("nonce"))?),
                "sig" => {
                    let mut b = [0u8; 64];
                    hex::decode_to_slice(v, &mut b).map_err(|_| bad("sig"))?;
                    sig = Some(Signature(b));
                }
                _ => return Err(bad("unknown field")),
            }
        }
        match (key, ts, nonce, sig) {
            (Some(key), Some(ts_ms), Some(nonce), Some(signature)) => Ok(Self {
                key,
                ts_ms,
                nonce,
                signature,
            }),
            _ => Err(bad("needs key, ts, nonce and sig")),
        }
    }

    /// Checks the signature over this request.
    ///
    /// # Errors
    /// [`ProtoError::InvalidSignature`].
    pub fn verify(&self, method: &str, path: &str, body: &[u8]) -> Result<(), ProtoError> {
        self.key.verify(
            &signing_input(method, path, self.ts_ms, &self.nonce, body),
            &self.signature,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let k = SigningKey::generate();
        let s = HttpSignature::sign(&k, "get", "/v1/agents", b"");
        let parsed = HttpSignature::parse(&s.to_header()).unwrap();
        assert_eq!(parsed, s);
        parsed.verify("GET", "/v1/agents", b"").unwrap();
        assert!(parsed.verify("GET", "/v1/routes", b"").is_err());
        assert!(parsed.verify("POST", "/v1/agents", b"").is_err());
        assert!(parsed.verify("GET", "/v1/agents", b"x").is_err());
        assert!(HttpSignature::parse("key=00").is_err());
        assert!(HttpSignature::parse("nonsense").is_err());
    }
}
