//! Signatures over exact bytes with domain separation.

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, EnvelopeType};
use crate::error::ProtoError;
use crate::keys::{PublicKey, Signature, SigningKey};
use crate::verify::Batch;

/// First bytes of every signing input: protocol name and version.
pub const SIGNATURE_DOMAIN: &[u8] = b"fem/1 ";

/// How an envelope's bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Format {
    /// postcard (the native protocol).
    Postcard,
    /// UTF-8 JSON (the HTTP gateway and other-language clients).
    Json,
}

impl Format {
    /// The name used in the domain tag.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postcard => "postcard",
            Self::Json => "json",
        }
    }
}

/// The message a signature covers:
/// `"fem/1 " || format || " " || type || "\n" || bytes`.
pub fn signing_input(format: Format, kind: EnvelopeType, bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 32 + bytes.len());
    v.extend_from_slice(SIGNATURE_DOMAIN);
    v.extend_from_slice(format.as_str().as_bytes());
    v.push(b' ');
    v.extend_from_slice(kind.as_str().as_bytes());
    v.push(b'\n');
    v.extend_from_slice(bytes);
    v
}

/// An envelope as signed: its exact encoded bytes and the signature over them.
///
/// Relays forward this value untouched; re-encoding a [`Frame`](crate::Frame)
/// that contains it reproduces the same `bytes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// Encoding of `bytes`.
    pub format: Format,
    /// The encoded [`Envelope`].
    #[serde(with = "crate::serde_util::vec_bytes")]
    pub bytes: Vec<u8>,
    /// Ed25519 signature over [`signing_input`].
    pub signature: Signature,
}

impl SignedEnvelope {
    /// Encodes `env` with postcard and signs it.
    ///
    /// # Errors
    /// [`ProtoError::Encode`] if encoding fails.
    pub fn sign(env: &Envelope, key: &SigningKey) -> Result<Self, ProtoError> {
        let bytes = postcard::to_stdvec(env).map_err(|e| ProtoError::Encode(e.to_string()))?;
        Ok(Self::sign_bytes(Format::Postcard, env.kind(), bytes, key))
    }

    /// Encodes `env` as JSON and signs it.
    ///
    /// # Errors
    /// [`ProtoError::Encode`] if encoding fails.
    pub fn sign_json(env: &Envelope, key: &SigningKey) -> Result<Self, ProtoError> {
        let bytes = serde_json::to_vec(env).map_err(|e| ProtoError::Encode(e.to_string()))?;
        Ok(Self::sign_bytes(Format::Json, env.kind(), bytes, key))
    }

    fn sign_bytes(format: Format, kind: EnvelopeType, bytes: Vec<u8>, key: &SigningKey) -> Self {
        let signature = key.sign(&signing_input(format, kind, &bytes));
        Self {
            format,
            bytes,
            signature,
        }
    }

    /// Decodes the envelope **without** checking the signature (to learn the
    /// sender, then look up its key).
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] when the bytes do not decode.
    pub fn open(&self) -> Result<Envelope, ProtoError> {
        open_bytes(self.format, &self.bytes)
    }

    /// Checks the signature of an envelope already decoded with [`Self::open`].
    ///
    /// # Errors
    /// [`ProtoError::InvalidSignature`].
    pub fn verify_opened(&self, kind: EnvelopeType, key: &PublicKey) -> Result<(), ProtoError> {
        key.verify(
            &signing_input(self.format, kind, &self.bytes),
            &self.signature,
        )
    }

    /// Decodes and verifies against `key`.
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] or [`ProtoError::InvalidSignature`].
    pub fn verify(&self, key: &PublicKey) -> Result<Envelope, ProtoError> {
        let env = self.open()?;
        self.verify_opened(env.kind(), key)?;
        Ok(env)
    }

    /// [`Self::verify`] for several envelopes at once, each with its key,
    /// as one batch ([`Batch`]): one result per item, in order, each equal
    /// to what [`Self::verify`] gives for that item alone.
    pub fn verify_batch<'a>(
        items: impl IntoIterator<Item = (&'a Self, &'a PublicKey)>,
    ) -> Vec<Result<Envelope, ProtoError>> {
        let mut batch = Batch::new();
        let mut opened = Vec::new();
        for (signed, key) in items {
            let env = signed.open().inspect(|env| {
                let input = signing_input(signed.format, env.kind(), &signed.bytes);
                batch.queue(key, &input, &signed.signature);
            });
            opened.push(env);
        }
        let mut checked = batch.verify().into_iter();
        opened
            .into_iter()
            .map(|env| {
                let env = env?;
                checked
                    .next()
                    .unwrap_or(Err(ProtoError::InvalidSignature))
                    .map(|()| env)
            })
            .collect()
    }
}

/// Decodes envelope bytes of `format`, refusing trailing bytes.
fn open_bytes(format: Format, bytes: &[u8]) -> Result<Envelope, ProtoError> {
    match format {
        Format::Postcard => {
            let (env, rest) = postcard::take_from_bytes::<Envelope>(bytes).map_err(|e| {
                ProtoError::Malformed {
                    what: "envelope",
                    detail: e.to_string(),
                }
            })?;
            if !rest.is_empty() {
                return Err(ProtoError::Malformed {
                    what: "envelope",
                    detail: format!("{} trailing bytes", rest.len()),
                });
            }
            Ok(env)
        }
        Format::Json => serde_json::from_slice(bytes).map_err(|e| ProtoError::Malformed {
            what: "envelope",
            detail: e.to_string(),
        }),
    }
}

/// An envelope without a signature (broker-attested mode, proto/README.md
/// §8.14): the session it arrives on vouches for its sender, and the broker
/// where it entered attests that sender to the recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsignedEnvelope {
    /// Encoding of `bytes`.
    pub format: Format,
    /// The encoded [`Envelope`].
    #[serde(with = "crate::serde_util::vec_bytes")]
    pub bytes: Vec<u8>,
}

impl UnsignedEnvelope {
    /// Encodes `env` with postcard.
    ///
    /// # Errors
    /// [`ProtoError::Encode`] if encoding fails.
    pub fn encode(env: &Envelope) -> Result<Self, ProtoError> {
        let bytes = postcard::to_stdvec(env).map_err(|e| ProtoError::Encode(e.to_string()))?;
        Ok(Self {
            format: Format::Postcard,
            bytes,
        })
    }

    /// Encodes `env` as JSON.
    ///
    /// # Errors
    /// [`ProtoError::Encode`] if encoding fails.
    pub fn encode_json(env: &Envelope) -> Result<Self, ProtoError> {
        let bytes = serde_json::to_vec(env).map_err(|e| ProtoError::Encode(e.to_string()))?;
        Ok(Self {
            format: Format::Json,
            bytes,
        })
    }

    /// Decodes the envelope.
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] when the bytes do not decode.
    pub fn open(&self) -> Result<Envelope, ProtoError> {
        open_bytes(self.format, &self.bytes)
    }
}

/// An envelope on its way to its recipient: signed by its sender, or
/// attested by the broker where it entered. Brokers relay either untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carried {
    /// Signed by its sender; the recipient verifies the signature.
    Signed(SignedEnvelope),
    /// Unsigned; broker `by` vouches for its sender.
    Attested {
        /// The envelope.
        envelope: UnsignedEnvelope,
        /// The broker where it entered.
        by: crate::AgentId,
    },
}

impl Carried {
    /// The encoded envelope.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Signed(s) => &s.bytes,
            Self::Attested { envelope, .. } => &envelope.bytes,
        }
    }

    /// Decodes the envelope (a signature is the recipient's to check).
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] when the bytes do not decode.
    pub fn open(&self) -> Result<Envelope, ProtoError> {
        match self {
            Self::Signed(s) => s.open(),
            Self::Attested { envelope, .. } => envelope.open(),
        }
    }

    /// True for a broker-attested envelope.
    pub fn is_attested(&self) -> bool {
        matches!(self, Self::Attested { .. })
    }

    /// The frame that delivers it to a client, with its sender's key.
    pub fn deliver(self, signer: PublicKey) -> crate::Frame {
        match self {
            Self::Signed(envelope) => crate::Frame::Deliver { envelope, signer },
            Self::Attested { envelope, by } => crate::Frame::Attested {
                envelope,
                signer,
                attested_by: by,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentId, Body, Header, Revoke};

    fn env() -> Envelope {
        Envelope::new(
            Header::now(AgentId::new("a").unwrap()),
            Body::Revoke(Revoke {
                target: AgentId::new("a").unwrap(),
                reason: "bye".into(),
            }),
        )
    }

    #[test]
    fn both_formats_verify_and_tamper_fails() {
        let k = SigningKey::generate();
        for s in [
            SignedEnvelope::sign(&env(), &k).unwrap(),
            SignedEnvelope::sign_json(&env(), &k).unwrap(),
        ] {
            s.verify(&k.public_key()).unwrap();
            let mut t = s.clone();
            let last = t.bytes.len() - 2;
            t.bytes[last] ^= 1;
            assert!(t.verify(&k.public_key()).is_err());
            // The same bytes under another type tag do not verify.
            assert!(
                s.verify_opened(EnvelopeType::ToolCall, &k.public_key())
                    .is_err()
            );
        }
    }

    #[test]
    fn batch_matches_single() {
        let k = SigningKey::generate();
        let good = SignedEnvelope::sign(&env(), &k).unwrap();
        let json = SignedEnvelope::sign_json(&env(), &k).unwrap();
        let mut forged = good.clone();
        forged.signature.0[0] ^= 1;
        let mut garbled = good.clone();
        garbled.bytes.push(0);
        let other = SigningKey::generate().public_key();
        let pk = k.public_key();
        let items = [
            (&good, &pk),
            (&forged, &pk),
            (&json, &pk),
            (&garbled, &pk),
            (&good, &other),
            (&json, &pk),
        ];
        let batch = SignedEnvelope::verify_batch(items);
        assert_eq!(batch.len(), items.len());
        for ((s, key), got) in items.iter().zip(&batch) {
            let single = s.verify(key);
            assert_eq!(got.as_ref().ok(), single.as_ref().ok());
            assert_eq!(
                got.as_ref().err().map(ProtoError::code),
                single.as_ref().err().map(ProtoError::code)
            );
        }
        let ok: Vec<bool> = batch.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, false, true, false, false, true]);
    }
}
