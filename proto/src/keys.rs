//! Ed25519 key and signature newtypes; dalek types stay out of the public API.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

use crate::error::ProtoError;
use crate::serde_util::{de_bytes, ser_bytes};

/// An Ed25519 public key (32 bytes; hex in text form).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// An Ed25519 signature (64 bytes; hex in text form).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

/// An Ed25519 signing key. `Debug` never prints the secret.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl PublicKey {
    /// Verifies `sig` over `msg` under FEM's one rule, ZIP 215
    /// ([`verify::verify_one`](crate::verify::verify_one)).
    ///
    /// # Errors
    /// [`ProtoError::InvalidSignature`] when the key or signature is malformed or does not verify.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> Result<(), ProtoError> {
        crate::verify::verify_one(self, msg, sig)
    }

    /// Short fingerprint for logs: first 8 bytes of SHA-256, hex.
    pub fn fingerprint(&self) -> String {
        hex::encode(&sha2::Sha256::digest(self.0)[..8])
    }
}

impl SigningKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// The key from its 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The 32-byte seed (the secret). Handle with care.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> Signature {
        use ed25519_dalek::Signer as _;
        Signature(self.0.sign(msg).to_bytes())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public={})", self.public_key())
    }
}

macro_rules! hex_display {
    ($name:ident, $n:expr) => {
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl FromStr for $name {
            type Err = ProtoError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut b = [0u8; $n];
                hex::decode_to_slice(s.trim(), &mut b)
                    .map_err(|_| ProtoError::InvalidHex(stringify!($name)))?;
                Ok(Self(b))
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                ser_bytes(&self.0, s)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                de_bytes(d).map(Self)
            }
        }
    };
}
hex_display!(PublicKey, 32);
hex_display!(Signature, 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_reject() {
        let k = SigningKey::generate();
        let sig = k.sign(b"hello");
        k.public_key().verify(b"hello", &sig).unwrap();
        assert!(k.public_key().verify(b"hellO", &sig).is_err());
        let other = SigningKey::generate();
        assert!(other.public_key().verify(b"hello", &sig).is_err());
        assert!(!format!("{k:?}").contains(&hex::encode(k.seed())));
    }
}
