//! The cryptographic floor: what the Ed25519 operations of one call cost on
//! this machine, measured on the exact signing inputs of a real toolCall and
//! toolResult, single-threaded.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use fem_proto::{
    AgentId, Body, Envelope, Header, JsonText, RequestId, SignedEnvelope, SigningKey, Target,
    ToolCall, ToolOutcome, ToolResult, signing_input,
};

use crate::Workload;
use crate::calls::size_name;
use crate::load::{echo_params, median};
use crate::report::Row;

/// Ed25519 operations one call performs, by path.
///
/// On one broker: the caller signs the toolCall; the broker verifies it on
/// entry; the agent verifies it (it checks who asked); the agent signs the
/// toolResult; the broker verifies it on entry; the caller verifies it.
/// Each further broker on the path verifies the call and the result once more
/// on entry (relays forward the exact bytes, they never re-sign).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CryptoOps {
    pub(crate) signs: u32,
    pub(crate) verifies: u32,
}

impl CryptoOps {
    /// The operations left on any path once brokers no longer verify
    /// session envelopes or relays (proto/README.md section 8.13): the
    /// caller and the agent sign, the agent and the caller verify.
    pub(crate) fn edges() -> Self {
        Self {
            signs: 2,
            verifies: 2,
        }
    }

    /// The operations of a call crossing `brokers` brokers, each verifying
    /// both envelopes on entry (the fully verified path).
    pub(crate) fn for_path(brokers: u32) -> Self {
        Self {
            signs: 2,
            verifies: 2 + 2 * brokers,
        }
    }
}

/// Measured cost of one sign and one verify.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Floor {
    pub(crate) sign_us: f64,
    /// Single verification as the broker does it (ZIP 215, the decoded key
    /// cached per thread).
    pub(crate) verify_us: f64,
    /// For comparison: the old rule (ed25519-dalek strict verification,
    /// key already decoded), and ZIP 215 batch verification of 64
    /// signatures by different keys as recipients do it (per signature).
    pub(crate) verify_prepared_us: f64,
    pub(crate) verify_batch64_us: f64,
}

impl Floor {
    /// The median of each figure over several measurements.
    pub(crate) fn median(all: &[Self]) -> Option<Self> {
        let m = |f: fn(&Self) -> f64| median(&all.iter().map(f).collect::<Vec<_>>());
        (!all.is_empty()).then(|| Self {
            sign_us: m(|f| f.sign_us),
            verify_us: m(|f| f.verify_us),
            verify_prepared_us: m(|f| f.verify_prepared_us),
            verify_batch64_us: m(|f| f.verify_batch64_us),
        })
    }

    /// CPU microseconds the signatures of one call need.
    pub(crate) fn call_us(&self, ops: CryptoOps) -> f64 {
        f64::from(ops.signs) * self.sign_us + f64::from(ops.verifies) * self.verify_us
    }
}

fn signed_pair(payload: usize) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let params = echo_params(payload);
    let call = Envelope::new(
        Header::now(AgentId::new("bench-caller")?),
        Body::ToolCall(ToolCall {
            request_id: RequestId::random(),
            target: Target::Agent(AgentId::new("bench-echo")?),
            tool: fem_proto::Capability::new("echo")?,
            parameters: JsonText::from_value(&params),
            deadline_ms: fem_proto::now_ms() + 30_000,
            audience: None,
        }),
    );
    let result = Envelope::new(
        Header::now(AgentId::new("bench-echo")?),
        Body::ToolResult(ToolResult {
            request_id: RequestId::random(),
            caller: AgentId::new("bench-caller")?,
            outcome: ToolOutcome::Success(JsonText::from_value(&params)),
        }),
    );
    let key = SigningKey::generate();
    let input = |env: &Envelope| -> anyhow::Result<Vec<u8>> {
        let s = SignedEnvelope::sign(env, &key)?;
        Ok(signing_input(s.format, env.kind(), &s.bytes))
    };
    Ok((input(&call)?, input(&result)?))
}

/// Measures sign and verify on the signing inputs of a call and its result
/// with `payload` bytes of parameters: `rounds` timed batches of about
/// `batch` each; the median batch counts.
pub(crate) fn measure(payload: usize, rounds: usize, batch: Duration) -> anyhow::Result<Floor> {
    let key = SigningKey::generate();
    let pk = key.public_key();
    let (call, result) = signed_pair(payload)?;
    let sigs = [key.sign(&call), key.sign(&result)];
    let inputs = [&call, &result];
    let time = |f: &dyn Fn(usize)| {
        let mut per_op = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let mut n = 0usize;
            while t.elapsed() < batch {
                for _ in 0..64 {
                    f(n);
                    n += 1;
                }
            }
            per_op.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
        median(&per_op)
    };
    let sign_us = time(&|n| {
        black_box(key.sign(black_box(inputs[n % 2])));
    });
    let verify_us = time(&|n| {
        let ok = pk.verify(black_box(inputs[n % 2]), &sigs[n % 2]).is_ok();
        black_box(ok);
    });

    let dk = ed25519_dalek::SigningKey::from_bytes(&key.seed());
    let vk = dk.verifying_key();
    let dsigs = [
        ed25519_dalek::Signer::sign(&dk, &call),
        ed25519_dalek::Signer::sign(&dk, &result),
    ];
    let verify_prepared_us = time(&|n| {
        let ok = vk
            .verify_strict(black_box(inputs[n % 2]), &dsigs[n % 2])
            .is_ok();
        black_box(ok);
    });
    const BATCH: usize = 64;
    let keys: Vec<SigningKey> = (0..BATCH).map(|_| SigningKey::generate()).collect();
    let pks: Vec<fem_proto::PublicKey> = keys.iter().map(SigningKey::public_key).collect();
    let msgs: Vec<&[u8]> = (0..BATCH).map(|i| inputs[i % 2].as_slice()).collect();
    let bsigs: Vec<fem_proto::Signature> = keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
    // `time` runs its closure in groups of 64: one batch per 64 calls.
    let verify_batch64_us = time(&|n| {
        if n % BATCH == 0 {
            let mut batch = fem_proto::verify::Batch::new();
            for ((pk, m), sig) in pks.iter().zip(&msgs).zip(&bsigs) {
                batch.queue(pk, black_box(m), sig);
            }
            black_box(batch.verify_all().is_ok());
        }
    });
    Ok(Floor {
        sign_us,
        verify_us,
        verify_prepared_us,
        verify_batch64_us,
    })
}

/// The crypto rows: per payload, the median of every measurement of the run
/// and the cost of one call's signatures on each path.
pub(crate) fn rows(floors: &BTreeMap<usize, Vec<Floor>>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (&p, all) in floors {
        let Some(f) = Floor::median(all) else {
            continue;
        };
        for (path, ops) in [
            ("one broker", CryptoOps::for_path(1)),
            ("two brokers", CryptoOps::for_path(2)),
            ("hub and two spokes", CryptoOps::for_path(3)),
            ("at the edges", CryptoOps::edges()),
        ] {
            let us = f.call_us(ops);
            let mut figures = BTreeMap::from([
                ("sign_us".to_owned(), f.sign_us),
                ("verify_us".to_owned(), f.verify_us),
                ("verify_prepared_key_us".to_owned(), f.verify_prepared_us),
                ("verify_batch64_us".to_owned(), f.verify_batch64_us),
                ("signs".to_owned(), f64::from(ops.signs)),
                ("verifies".to_owned(), f64::from(ops.verifies)),
                ("crypto_us_per_call".to_owned(), us),
            ]);
            if path == "at the edges" {
                // Recipients verify what arrived together as one batch.
                figures.insert(
                    "crypto_us_per_call_batch64".to_owned(),
                    f64::from(ops.signs) * f.sign_us
                        + f64::from(ops.verifies) * f.verify_batch64_us,
                );
            }
            rows.push(Row {
                workload: Workload::Crypto.name().into(),
                case: format!("floor {path} {}", size_name(p)),
                runs: all.len(),
                calls_per_sec: Some(1e6 / us),
                cpu_us_per_call: Some(us),
                figures,
                note: "calls/s per core if signatures were the only work".into(),
                ..Row::default()
            });
        }
    }
    rows
}
