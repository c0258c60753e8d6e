//! The one Ed25519 verification rule of FEM: ZIP 215, for single and batch
//! checks alike.
//!
//! Every signature FEM checks (envelopes, grant links, revocations) goes
//! through [`verify_one`] or [`Batch`]; this module is the only user of
//! `ed25519-zebra`, and signing stays on `ed25519-dalek`. The rule
//! ([ZIP 215](https://zips.z.cash/zip-0215)), for a public key `A`, a
//! signature `R || S` and a message `M`:
//!
//! 1. `A` and `R` must decode as points of the curve; non-canonical
//!    encodings (a `y` coordinate of `p` or more, or the sign bit set on
//!    `x = 0`) are **accepted**, small-order points too;
//! 2. `S` must be canonical, `S < ℓ`, else the signature is refused;
//! 3. with `k = SHA-512(R || A || M) mod ℓ`, the cofactored equation
//!    `[8][S]B = [8]R + [8][k]A` must hold (never the cofactorless one).
//!
//! Batch verification checks a random linear combination of the same
//! cofactored equations, so a batch accepts exactly the signatures that
//! single verification accepts: the outcome never depends on what else was
//! in the batch, nor on which check a broker or an agent chose.
//!
//! Under this rule a small-order key can "sign" anything (`R` small order,
//! `S = 0`), so keys are only accepted as identities after
//! [`check_identity_key`]: registration and grant subjects call it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;

use curve25519_dalek::edwards::CompressedEdwardsY;
use ed25519_zebra::{VerificationKey, VerificationKeyBytes, batch};

use crate::error::ProtoError;
use crate::keys::{PublicKey, Signature};

/// Decoded public keys kept per thread (decoding a point costs a few µs).
const KEY_CACHE: usize = 1024;

thread_local! {
    static KEYS: RefCell<HashMap<[u8; 32], VerificationKey>> = RefCell::new(HashMap::new());
}

/// Verifies `sig` over `msg` under `key` (ZIP 215). The decoded key is
/// cached per thread, keyed by its 32 bytes.
///
/// # Errors
/// [`ProtoError::InvalidSignature`] when the key or `R` does not decode, `S`
/// is not canonical, or the equation does not hold.
pub fn verify_one(key: &PublicKey, msg: &[u8], sig: &Signature) -> Result<(), ProtoError> {
    let sig = ed25519_zebra::Signature::from_bytes(&sig.0);
    decoded(key)?
        .verify(&sig, msg)
        .map_err(|_| ProtoError::InvalidSignature)
}

/// Whether `key` may stand for an identity: the canonical encoding of a
/// curve point that is not of small order. A small-order key's signatures
/// prove nothing under ZIP 215, and one point, one encoding keeps a key's
/// bytes unambiguous. Registration (registerAgent, registerBroker) and
/// grant subjects are checked with it; verification itself stays ZIP 215.
///
/// # Errors
/// [`ProtoError::WeakKey`].
pub fn check_identity_key(key: &PublicKey) -> Result<(), ProtoError> {
    match CompressedEdwardsY(key.0).decompress() {
        Some(point) if !point.is_small_order() && point.compress().0 == key.0 => Ok(()),
        _ => Err(ProtoError::WeakKey),
    }
}

fn decoded(key: &PublicKey) -> Result<VerificationKey, ProtoError> {
    let decode = || {
        VerificationKey::try_from(VerificationKeyBytes::from(key.0))
            .map_err(|_| ProtoError::InvalidSignature)
    };
    KEYS.with(|cell| {
        // Never re-entered; if it were, skip the cache rather than panic.
        let Ok(mut keys) = cell.try_borrow_mut() else {
            return decode();
        };
        if let Some(vk) = keys.get(&key.0) {
            return Ok(*vk);
        }
        let vk = decode()?;
        if keys.len() >= KEY_CACHE
            && let Some(old) = keys.keys().next().copied()
        {
            keys.remove(&old);
        }
        keys.insert(key.0, vk);
        Ok(vk)
    })
}

/// Signatures verified together: one multi-scalar multiplication for the
/// whole batch, then, only if it fails, one check per signature to find the
/// bad ones. Each result equals what [`verify_one`] gives for that item.
/// Keys are decoded by the batch itself (not through the per-thread cache).
///
/// ```
/// use fem_proto::{SigningKey, verify::Batch};
/// let key = SigningKey::from_seed([7; 32]);
/// let mut batch = Batch::new();
/// batch.queue(&key.public_key(), b"one", &key.sign(b"one"));
/// batch.queue(&key.public_key(), b"two", &key.sign(b"one"));
/// let results = batch.verify();
/// assert!(results[0].is_ok() && results[1].is_err());
/// ```
#[derive(Clone, Default)]
pub struct Batch {
    items: Vec<batch::Item>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one signature; results come back in queueing order. The message
    /// is hashed now and not kept.
    pub fn queue(&mut self, key: &PublicKey, msg: &[u8], sig: &Signature) {
        let sig = ed25519_zebra::Signature::from_bytes(&sig.0);
        self.items.push(batch::Item::from((
            VerificationKeyBytes::from(key.0),
            sig,
            msg,
        )));
    }

    /// Signatures queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The batch equation alone, all or nothing: `Ok` exactly when every
    /// queued signature passes [`verify_one`] (an empty batch passes).
    ///
    /// # Errors
    /// [`ProtoError::InvalidSignature`] when any one does not verify.
    pub fn verify_all(self) -> Result<(), ProtoError> {
        let mut verifier = batch::Verifier::new();
        for item in self.items {
            verifier.queue(item);
        }
        verifier
            .verify(BatchRng(rand::thread_rng()))
            .map_err(|_| ProtoError::InvalidSignature)
    }

    /// Verifies everything queued; one result per item, in order, each
    /// `Err(ProtoError::InvalidSignature)` or `Ok(())`.
    pub fn verify(self) -> Vec<Result<(), ProtoError>> {
        let single = |item: batch::Item| {
            item.verify_single()
                .map_err(|_| ProtoError::InvalidSignature)
        };
        if self.items.len() < 2 {
            return self.items.into_iter().map(single).collect();
        }
        if self.clone().verify_all().is_ok() {
            return self.items.iter().map(|_| Ok(())).collect();
        }
        self.items.into_iter().map(single).collect()
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("len", &self.items.len())
            .finish()
    }
}

/// The batch's random coefficients come from the thread's CSPRNG (rand 0.8,
/// seeded from the OS), adapted to the `rand_core` 0.10 traits ed25519-zebra
/// asks for.
struct BatchRng(rand::rngs::ThreadRng);

impl rand_core_010::TryRng for BatchRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(rand::RngCore::next_u32(&mut self.0))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(rand::RngCore::next_u64(&mut self.0))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        rand::RngCore::fill_bytes(&mut self.0, dst);
        Ok(())
    }
}

impl rand_core_010::TryCryptoRng for BatchRng {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SigningKey;

    #[test]
    fn batch_agrees_with_single_and_finds_the_bad_one() {
        let keys: Vec<SigningKey> = (0..5u8).map(|i| SigningKey::from_seed([i; 32])).collect();
        let mut batch = Batch::new();
        let mut expect = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let msg = [i as u8; 10];
            let mut sig = k.sign(&msg);
            if i == 3 {
                sig.0[5] ^= 1;
            }
            expect.push(verify_one(&k.public_key(), &msg, &sig).is_ok());
            batch.queue(&k.public_key(), &msg, &sig);
        }
        let got: Vec<bool> = batch.verify().iter().map(Result::is_ok).collect();
        assert_eq!(got, expect);
        assert_eq!(got, [true, true, true, false, true]);
        assert!(Batch::new().verify().is_empty());
    }

    #[test]
    fn cache_stays_bounded() {
        let sig = Signature([0; 64]);
        for i in 0..(KEY_CACHE + 10) {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let k = SigningKey::from_seed(seed);
            let _ = verify_one(&k.public_key(), b"m", &sig);
        }
        KEYS.with(|c| assert!(c.borrow().len() <= KEY_CACHE));
    }

    #[test]
    fn identity_keys() {
        check_identity_key(&SigningKey::generate().public_key()).unwrap();
        // The identity point, canonically and not.
        let mut id = [0u8; 32];
        id[0] = 1;
        assert!(check_identity_key(&PublicKey(id)).is_err());
        id[31] = 0x80;
        assert!(check_identity_key(&PublicKey(id)).is_err());
    }
}
