//! Edge cases of FEM's one Ed25519 rule (ZIP 215), in
//! `proto/testdata/zip215.json`: small-order keys and `R` (canonical and
//! non-canonical encodings), mixed-order points, non-canonical `S`, points
//! that do not decode. Each vector states the ZIP 215 outcome, the outcome
//! under ed25519-dalek's `verify_strict` (FEM's rule before), and whether
//! registration accepts the key as an identity.
//!
//! The test checks that single verification, the batch equation alone and
//! the batch with fallback all give the stated outcome, on every vector by
//! itself, on all of them together, and mixed with valid signatures. It
//! also rebuilds the file from its seeds and compares it, so it is
//! deterministic. To regenerate after a deliberate change:
//!
//! ```sh
//! FEM_REGEN_VECTORS=1 cargo test -p fem-proto --test zip215
//! ```
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use curve25519_dalek::constants::EIGHT_TORSION;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use fem_proto::verify::{Batch, check_identity_key, verify_one};
use fem_proto::{PublicKey, Signature, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha512};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct VectorFile {
    comment: Vec<String>,
    vectors: Vec<Vector>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Vector {
    description: String,
    public_key_hex: String,
    message_hex: String,
    signature_hex: String,
    /// The outcome under FEM's rule, single and batch alike.
    zip215: bool,
    /// The outcome under ed25519-dalek `verify_strict` (FEM's rule before).
    dalek_strict: bool,
    /// Whether registration and grants accept the key
    /// (`fem_proto::verify::check_identity_key`).
    identity_key: bool,
}

// ---------------------------------------------------------------- generation

/// ℓ, the order of the prime-order subgroup, little-endian.
const ELL: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

const MSG: &[u8] = b"fem/1 zip215 vector";

/// The signer: seed `07`x32 (agent-1 of `vectors.json`).
struct Signer {
    a: Scalar,
    public: EdwardsPoint,
    seed: [u8; 32],
}

impl Signer {
    fn new(seed: [u8; 32]) -> Self {
        let h = Sha512::digest(seed);
        let mut lo = [0u8; 32];
        lo.copy_from_slice(&h[..32]);
        let a = Scalar::from_bytes_mod_order(clamp_integer(lo));
        let public = EdwardsPoint::mul_base(&a);
        assert_eq!(
            public.compress().0,
            SigningKey::from_seed(seed).public_key().0
        );
        Self { a, public, seed }
    }

    /// A deterministic nonce scalar for vector `tag`.
    fn nonce(&self, tag: &str) -> Scalar {
        let h: [u8; 64] = Sha512::new()
            .chain_update(self.seed)
            .chain_update(tag)
            .finalize()
            .into();
        Scalar::from_bytes_mod_order_wide(&h)
    }

    /// `S = r + k·a` for the given encodings of `R` and `A` (valid under the
    /// cofactored equation whenever `R - [r]B` and `A - [a]B` are torsion).
    fn s_for(&self, r: Scalar, r_bytes: &[u8; 32], a_bytes: &[u8; 32], msg: &[u8]) -> Scalar {
        r + k(r_bytes, a_bytes, msg) * self.a
    }
}

fn k(r_bytes: &[u8; 32], a_bytes: &[u8; 32], msg: &[u8]) -> Scalar {
    let h: [u8; 64] = Sha512::new()
        .chain_update(r_bytes)
        .chain_update(a_bytes)
        .chain_update(msg)
        .finalize()
        .into();
    Scalar::from_bytes_mod_order_wide(&h)
}

fn sig(r: &[u8; 32], s: &[u8; 32]) -> [u8; 64] {
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(r);
    out[32..].copy_from_slice(s);
    out
}

/// Adds ℓ to a little-endian 256-bit number (no overflow for `S < ℓ`).
fn plus_ell(s: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let v = u16::from(s[i]) + u16::from(ELL[i]) + carry;
        out[i] = (v & 0xff) as u8;
        carry = v >> 8;
    }
    assert_eq!(carry, 0);
    out
}

/// The canonical encodings of the 8 small-order points, then the 6
/// non-canonical encodings of small-order points (sign bit set on `x = 0`,
/// or `y` written as `y + p`).
fn small_order_encodings() -> Vec<(String, [u8; 32])> {
    let mut out: Vec<(String, [u8; 32])> = EIGHT_TORSION
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                format!("small-order point T{i} (canonical)"),
                p.compress().0,
            )
        })
        .collect();
    let mut y1_sign = [0u8; 32];
    y1_sign[0] = 1;
    y1_sign[31] = 0x80;
    let mut ym1_sign = [0xff; 32];
    ym1_sign[0] = 0xec;
    let mut y0_p = [0xff; 32];
    y0_p[0] = 0xed;
    y0_p[31] = 0x7f;
    let mut y0_p_sign = y0_p;
    y0_p_sign[31] = 0xff;
    let mut y1_p = y0_p;
    y1_p[0] = 0xee;
    let mut y1_p_sign = y1_p;
    y1_p_sign[31] = 0xff;
    for (what, e) in [
        ("identity (y = 1) with the sign bit set", y1_sign),
        ("order 2 (y = -1) with the sign bit set", ym1_sign),
        ("order 4 (y = 0) written as y = p", y0_p),
        ("order 4 (y = 0) written as y = p, sign bit set", y0_p_sign),
        ("identity written as y = p + 1", y1_p),
        ("identity written as y = p + 1, sign bit set", y1_p_sign),
    ] {
        let p = CompressedEdwardsY(e).decompress().unwrap();
        assert!(p.is_small_order() && p.compress().0 != e, "{what}");
        out.push((format!("small-order point, non-canonical: {what}"), e));
    }
    out
}

/// Non-canonical encodings (`y + p`, either sign) that decode to points
/// not of small order: their discrete logs are unknown, so nobody can sign.
fn non_canonical_large_order() -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    for i in 0..19u8 {
        for sign in [0u8, 0x80] {
            let mut e = [0xff; 32];
            e[0] = 0xed + i;
            e[31] = 0x7f | sign;
            if let Some(p) = CompressedEdwardsY(e).decompress()
                && !p.is_small_order()
            {
                out.push(e);
            }
        }
    }
    out
}

/// The smallest `y` whose encoding is not a curve point.
fn not_a_point() -> [u8; 32] {
    (2u8..)
        .map(|y| {
            let mut e = [0u8; 32];
            e[0] = y;
            e
        })
        .find(|e| CompressedEdwardsY(*e).decompress().is_none())
        .unwrap()
}

fn strict(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(pk) else {
        return false;
    };
    vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
        .is_ok()
}

fn vector(description: String, pk: [u8; 32], msg: &[u8], s: [u8; 64], zip215: bool) -> Vector {
    Vector {
        description,
        public_key_hex: hex::encode(pk),
        message_hex: hex::encode(msg),
        signature_hex: hex::encode(s),
        zip215,
        dalek_strict: strict(&pk, msg, &s),
        identity_key: check_identity_key(&PublicKey(pk)).is_ok(),
    }
}

fn generate() -> VectorFile {
    let signer = Signer::new([7; 32]);
    let a_bytes = signer.public.compress().0;
    let key = SigningKey::from_seed(signer.seed);
    let mut v = Vec::new();

    // Ordinary signatures.
    let good = key.sign(MSG).0;
    v.push(vector(
        "valid RFC 8032 signature".into(),
        a_bytes,
        MSG,
        good,
        true,
    ));
    v.push(vector(
        "valid signature, another message".into(),
        a_bytes,
        b"fem/1 zip215 vectoR",
        good,
        false,
    ));
    let mut s = [0u8; 32];
    s.copy_from_slice(&good[32..]);
    let r: [u8; 32] = good[..32].try_into().unwrap();
    v.push(vector(
        "non-canonical S: the valid S plus l (S >= l is refused)".into(),
        a_bytes,
        MSG,
        sig(&r, &plus_ell(&s)),
        false,
    ));
    let mut high = s;
    high[31] |= 0x80;
    v.push(vector(
        "non-canonical S: the valid S with bit 255 set".into(),
        a_bytes,
        MSG,
        sig(&r, &high),
        false,
    ));

    // Small-order public keys: with R = identity and S = 0 the cofactored
    // equation holds for any message ([8]·0·B = [8]R + [8][k]A = 0).
    let identity = EIGHT_TORSION[0].compress().0;
    let small = small_order_encodings();
    for (what, e) in &small {
        v.push(vector(
            format!("public key: {what}; R = identity, S = 0 (anyone can sign)"),
            *e,
            MSG,
            sig(&identity, &[0; 32]),
            true,
        ));
    }
    // Small-order R under a real key: S = k·a makes [8]S·B = [8]R + [8]k·A.
    for (what, e) in &small {
        let s = signer.s_for(Scalar::ZERO, e, &a_bytes, MSG);
        v.push(vector(
            format!("R: {what}; real key, S = k·a"),
            a_bytes,
            MSG,
            sig(e, &s.to_bytes()),
            true,
        ));
    }
    // Mixed-order R = [r]B + T: the cofactored equation holds, the
    // cofactorless one (which batch verification cannot check) does not.
    for (i, t) in [(1usize, 8), (2, 4), (4, 2)] {
        let r = signer.nonce(&format!("mixed R {i}"));
        let r_bytes = (EdwardsPoint::mul_base(&r) + EIGHT_TORSION[i]).compress().0;
        let s = signer.s_for(r, &r_bytes, &a_bytes, MSG);
        v.push(vector(
            format!("mixed-order R = [r]B + T{i} (T of order {t}); S = r + k·a"),
            a_bytes,
            MSG,
            sig(&r_bytes, &s.to_bytes()),
            true,
        ));
    }
    // Mixed-order key A' = A + T: signatures by the holder of a verify under
    // ZIP 215; A' is still a usable identity (only that holder can sign).
    for (i, t) in [(1usize, 8), (2, 4), (4, 2)] {
        let key_bytes = (signer.public + EIGHT_TORSION[i]).compress().0;
        let r = signer.nonce(&format!("mixed A {i}"));
        let r_bytes = EdwardsPoint::mul_base(&r).compress().0;
        let s = signer.s_for(r, &r_bytes, &key_bytes, MSG);
        v.push(vector(
            format!("mixed-order public key A + T{i} (T of order {t}); S = r + k·a"),
            key_bytes,
            MSG,
            sig(&r_bytes, &s.to_bytes()),
            true,
        ));
    }
    // Non-canonical encodings of points not of small order: they decode, but
    // with an unknown discrete log no signature verifies.
    for e in non_canonical_large_order().into_iter().take(2) {
        v.push(vector(
            "public key: non-canonical encoding (y + p) of a point not of small order; R = identity, S = 0".into(),
            e,
            MSG,
            sig(&identity, &[0; 32]),
            false,
        ));
    }
    // Real key, R = identity, S = 0: refused, since [8][k]A is not zero.
    v.push(vector(
        "real key, R = identity, S = 0".into(),
        a_bytes,
        MSG,
        sig(&identity, &[0; 32]),
        false,
    ));
    // Encodings that are not points.
    let bad = not_a_point();
    v.push(vector(
        "public key is not a curve point".into(),
        bad,
        MSG,
        good,
        false,
    ));
    v.push(vector(
        "R is not a curve point".into(),
        a_bytes,
        MSG,
        sig(&bad, &s),
        false,
    ));

    VectorFile {
        comment: vec![
            "FEM's Ed25519 rule is ZIP 215 (https://zips.z.cash/zip-0215); see proto/README.md section 6.".into(),
            "zip215: the outcome of single and batch verification alike; dalek_strict: ed25519-dalek verify_strict (the rule before); identity_key: accepted at registration and as a grant subject.".into(),
            "Checked by proto/tests/zip215.rs; regenerate with FEM_REGEN_VECTORS=1 (review the diff!).".into(),
        ],
        vectors: v,
    }
}

// ------------------------------------------------------------------ checking

struct Case {
    key: PublicKey,
    msg: Vec<u8>,
    sig: Signature,
    zip215: bool,
}

fn cases(file: &VectorFile) -> Vec<Case> {
    file.vectors
        .iter()
        .map(|v| Case {
            key: PublicKey(hex::decode(&v.public_key_hex).unwrap().try_into().unwrap()),
            msg: hex::decode(&v.message_hex).unwrap(),
            sig: Signature(hex::decode(&v.signature_hex).unwrap().try_into().unwrap()),
            zip215: v.zip215,
        })
        .collect()
}

/// Single, the batch equation alone, and the batch with fallback agree with
/// the expected outcomes of `group`.
fn check_group(group: &[&Case], what: &str) {
    let mut batch = Batch::new();
    for c in group {
        batch.queue(&c.key, &c.msg, &c.sig);
    }
    let expect: Vec<bool> = group.iter().map(|c| c.zip215).collect();
    let single: Vec<bool> = group
        .iter()
        .map(|c| verify_one(&c.key, &c.msg, &c.sig).is_ok())
        .collect();
    assert_eq!(single, expect, "{what}: single");
    assert_eq!(
        batch.clone().verify_all().is_ok(),
        expect.iter().all(|&ok| ok),
        "{what}: batch equation"
    );
    let items: Vec<bool> = batch.verify().iter().map(Result::is_ok).collect();
    assert_eq!(items, expect, "{what}: batch results");
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/zip215.json")
}

#[test]
fn zip215_vectors() {
    let generated = generate();
    if std::env::var_os("FEM_REGEN_VECTORS").is_some_and(|v| v == "1") {
        let mut text = serde_json::to_string_pretty(&generated).unwrap();
        text.push('\n');
        std::fs::write(path(), text).unwrap();
    }
    let file: VectorFile = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    assert_eq!(file, generated, "the file differs from what its seeds give");

    for v in &file.vectors {
        let pk: [u8; 32] = hex::decode(&v.public_key_hex).unwrap().try_into().unwrap();
        let s: [u8; 64] = hex::decode(&v.signature_hex).unwrap().try_into().unwrap();
        let msg = hex::decode(&v.message_hex).unwrap();
        assert_eq!(strict(&pk, &msg, &s), v.dalek_strict, "{}", v.description);
        assert_eq!(
            check_identity_key(&PublicKey(pk)).is_ok(),
            v.identity_key,
            "{}",
            v.description
        );
        // A key anyone can sign for is never an identity.
        if v.zip215 && s[32..] == [0; 32] {
            assert!(!v.identity_key, "{}", v.description);
        }
    }

    let cases = cases(&file);
    // Each vector alone, and as a batch of two with itself.
    for (i, c) in cases.iter().enumerate() {
        check_group(&[c], &file.vectors[i].description);
        check_group(&[c, c], &file.vectors[i].description);
    }
    // Everything together; every accepted one together (one equation).
    check_group(&cases.iter().collect::<Vec<_>>(), "all vectors");
    check_group(
        &cases.iter().filter(|c| c.zip215).collect::<Vec<_>>(),
        "all accepted vectors",
    );

    // Each vector among valid signatures by other keys, at the front, in
    // the middle and at the end of a batch.
    let others: Vec<Case> = (0..6u8)
        .map(|i| {
            let k = SigningKey::from_seed([0x40 + i; 32]);
            let msg = vec![i; 40];
            Case {
                key: k.public_key(),
                sig: k.sign(&msg),
                msg,
                zip215: true,
            }
        })
        .collect();
    for (i, c) in cases.iter().enumerate() {
        for at in [0, 3, 6] {
            let mut group: Vec<&Case> = others.iter().collect();
            group.insert(at, c);
            check_group(&group, &format!("{} at {at}", file.vectors[i].description));
        }
    }
}
