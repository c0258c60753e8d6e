//! Ed25519 verification cost, side by side in one run: the old rule
//! (ed25519-dalek `verify_strict`), FEM's rule (ZIP 215, ed25519-zebra)
//! single with and without a decoded key, and batches of 16 and 64.
//!
//! ```sh
//! cargo run --release -p fem-proto --example verify_bench [rounds]
//! ```
//!
//! Prints µs per signature, the median of `rounds` (default 9) timed rounds
//! of about 200 ms each. Messages are 300 bytes (a small toolCall's signing
//! input); every signature is by a different key unless stated.

use std::hint::black_box;
use std::time::{Duration, Instant};

use fem_proto::verify::{Batch, verify_one};
use fem_proto::{PublicKey, Signature, SigningKey};

const ROUND: Duration = Duration::from_millis(200);

/// µs per signature of `f`, which checks `per_call` signatures per call.
fn measure(rounds: usize, per_call: usize, f: &mut dyn FnMut(usize)) -> f64 {
    let mut per_sig = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let mut calls = 0usize;
        while t.elapsed() < ROUND {
            f(calls);
            calls += 1;
        }
        per_sig.push(t.elapsed().as_secs_f64() * 1e6 / (calls * per_call) as f64);
    }
    per_sig.sort_by(f64::total_cmp);
    per_sig[per_sig.len() / 2]
}

struct Signed {
    key: PublicKey,
    msg: Vec<u8>,
    sig: Signature,
}

fn signed(n: usize, one_key: bool) -> Vec<Signed> {
    let shared = SigningKey::generate();
    (0..n)
        .map(|i| {
            let key = if one_key {
                shared.clone()
            } else {
                SigningKey::generate()
            };
            let mut msg = vec![0u8; 300];
            msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Signed {
                key: key.public_key(),
                sig: key.sign(&msg),
                msg,
            }
        })
        .collect()
}

fn batch_of(items: &[Signed]) -> Batch {
    let mut b = Batch::new();
    for s in items {
        b.queue(&s.key, &s.msg, &s.sig);
    }
    b
}

fn main() {
    let rounds = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9usize)
        .max(1);
    let pool = signed(64, false);
    let mut rows: Vec<(&str, f64)> = Vec::new();

    rows.push((
        "single, dalek verify_strict, key decoded each time (old rule)",
        measure(rounds, 1, &mut |n| {
            let s = &pool[n % pool.len()];
            let ok = ed25519_dalek::VerifyingKey::from_bytes(&s.key.0).is_ok_and(|vk| {
                vk.verify_strict(&s.msg, &ed25519_dalek::Signature::from_bytes(&s.sig.0))
                    .is_ok()
            });
            black_box(ok);
        }),
    ));
    let decoded: Vec<ed25519_dalek::VerifyingKey> = pool
        .iter()
        .filter_map(|s| ed25519_dalek::VerifyingKey::from_bytes(&s.key.0).ok())
        .collect();
    rows.push((
        "single, dalek verify_strict, key already decoded",
        measure(rounds, 1, &mut |n| {
            let s = &pool[n % pool.len()];
            let sig = ed25519_dalek::Signature::from_bytes(&s.sig.0);
            black_box(
                decoded[n % decoded.len()]
                    .verify_strict(&s.msg, &sig)
                    .is_ok(),
            );
        }),
    ));
    rows.push((
        "single, ZIP 215 verify_one (key cache hit)",
        measure(rounds, 1, &mut |n| {
            let s = &pool[n % pool.len()];
            black_box(verify_one(&s.key, &s.msg, &s.sig).is_ok());
        }),
    ));
    rows.push((
        "single, ZIP 215, key decoded each time (a batch of one)",
        measure(rounds, 1, &mut |n| {
            let s = &pool[n % pool.len()];
            black_box(batch_of(std::slice::from_ref(s)).verify()[0].is_ok());
        }),
    ));
    for size in [16usize, 64] {
        let items = &pool[..size];
        rows.push((
            if size == 16 {
                "batch of 16, ZIP 215, distinct keys"
            } else {
                "batch of 64, ZIP 215, distinct keys"
            },
            measure(rounds, size, &mut |_| {
                black_box(batch_of(items).verify().iter().all(Result::is_ok));
            }),
        ));
    }
    let same = signed(64, true);
    rows.push((
        "batch of 64, ZIP 215, one key (coalesced)",
        measure(rounds, 64, &mut |_| {
            black_box(batch_of(&same).verify().iter().all(Result::is_ok));
        }),
    ));
    let mut forged: Vec<Signed> = signed(16, false);
    forged[7].sig.0[40] ^= 1;
    rows.push((
        "batch of 16 with one forged (batch fails, then 16 single checks)",
        measure(rounds, 16, &mut |_| {
            black_box(
                batch_of(&forged)
                    .verify()
                    .iter()
                    .filter(|r| r.is_ok())
                    .count(),
            );
        }),
    ));

    println!("median of {rounds} rounds of {ROUND:?}; µs per signature");
    for (what, us) in rows {
        println!("{us:8.2}  {what}");
    }
}
