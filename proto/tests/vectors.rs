//! Checks the committed test vectors in `proto/testdata/vectors.json`.
//!
//! The file is the contract for clients in other languages, so this test
//! rebuilds every value from the file's *inputs* (seed, JSON form) and compares
//! it byte for byte with the file's *outputs* (encoded bytes, signing input,
//! signature, frame). A change of the encoding makes it fail.
//!
//! To regenerate the file after a deliberate protocol change:
//!
//! ```sh
//! FEM_REGEN_VECTORS=1 cargo test -p fem-proto --test vectors
//! ```
//!
//! then review the diff: every changed byte breaks existing clients.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use fem_proto::{
    Accepted, AgentId, Body, Capability, CapabilityPattern, DEFAULT_MAX_FRAME, DiscoverTools,
    Envelope, EnvelopeType, ErrorCode, FRAME_HEADER_LEN, Format, Frame, FrameDecoder, Header,
    JsonText, Nonce, PublicKey, RegisterAgent, RequestId, Signature, SignedEnvelope, SigningKey,
    Target, ToolCall, ToolOutcome, ToolResult, ToolSpec, UnsignedEnvelope, decode_frame_payload,
    encode_frame, signing_input,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Serialize, Deserialize)]
struct VectorFile {
    comment: Vec<String>,
    envelopes: Vec<EnvelopeVector>,
    frames: Vec<FrameVector>,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnvelopeVector {
    description: String,
    /// 32-byte Ed25519 seed (RFC 8032 private key).
    seed_hex: String,
    public_key_hex: String,
    format: Format,
    #[serde(rename = "type")]
    kind: String,
    /// The envelope in its JSON form (the input of the vector).
    envelope_json: Value,
    /// The exact bytes that are signed and carried in `SignedEnvelope.bytes`.
    envelope_bytes_hex: String,
    /// `"fem/1 " || format || " " || type || "\n"`, as text.
    signing_input_prefix: String,
    signing_input_hex: String,
    signature_hex: String,
    /// The `SignedEnvelope` in its JSON form (HTTP gateway).
    signed_envelope_json: Value,
    /// `Frame::Envelope(signed)` with its 4-byte big-endian length prefix.
    frame_hex: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FrameVector {
    description: String,
    /// The frame as serde_json renders it (for reading; frames travel as postcard).
    frame_json: Value,
    /// Length prefix and postcard payload.
    frame_hex: String,
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/vectors.json")
}

// ---------------------------------------------------------------- generation

const T0: u64 = 1_700_000_000_000;

fn seq16(start: u8) -> [u8; 16] {
    std::array::from_fn(|i| start.wrapping_add(u8::try_from(i).unwrap()))
}

fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn cap(s: &str) -> Capability {
    Capability::new(s).unwrap()
}

fn header(sender: &str, ts: u64, nonce_start: u8) -> Header {
    Header {
        sender: id(sender),
        timestamp_ms: ts,
        nonce: Nonce(seq16(nonce_start)),
    }
}

fn agent_key() -> SigningKey {
    SigningKey::from_seed([0x07; 32])
}

fn caller_key() -> SigningKey {
    SigningKey::from_seed([0x08; 32])
}

fn request_id() -> RequestId {
    RequestId(seq16(0xa0))
}

fn shell_tool() -> ToolSpec {
    // JSON texts use objects whose keys are already sorted, so the text is
    // the same whether or not serde_json's `preserve_order` is enabled.
    ToolSpec {
        name: cap("shell.run"),
        description: "Run a shell command".into(),
        input_schema: JsonText::from_value(&json!({
            "properties": {"cmd": {"type": "string"}},
            "required": ["cmd"],
            "type": "object"
        })),
        accepts_attested: false,
    }
}

fn tool_call(nonce_start: u8, target: Target) -> Envelope {
    Envelope::new(
        header("caller-1", T0 + 1_000, nonce_start),
        Body::ToolCall(ToolCall {
            request_id: request_id(),
            target,
            tool: cap("shell.run"),
            parameters: JsonText::from_value(&json!({"cmd": "echo hi"})),
            deadline_ms: T0 + 31_000,
            audience: None,
        }),
    )
}

/// (description, key, format, envelope)
fn envelope_cases() -> Vec<(&'static str, SigningKey, Format, Envelope)> {
    let register = Envelope::new(
        header("agent-1", T0, 0x00),
        Body::RegisterAgent(RegisterAgent {
            public_key: agent_key().public_key(),
            capabilities: vec![cap("shell.run")],
            tools: vec![shell_tool()],
            metadata: BTreeMap::from([("environment".to_owned(), "dev".to_owned())]),
            max_concurrent_calls: 4,
        }),
    );
    let call = tool_call(0x10, Target::Agent(id("agent-1")));
    let result_ok = Envelope::new(
        header("agent-1", T0 + 2_000, 0x20),
        Body::ToolResult(ToolResult {
            request_id: request_id(),
            caller: id("caller-1"),
            outcome: ToolOutcome::Success(JsonText::from_value(
                &json!({"exitCode": 0, "stdout": "hi\n"}),
            )),
        }),
    );
    let result_err = Envelope::new(
        header("agent-1", T0 + 2_000, 0x30),
        Body::ToolResult(ToolResult {
            request_id: request_id(),
            caller: id("caller-1"),
            outcome: ToolOutcome::Error {
                code: ErrorCode::ToolFailed,
                message: "exit status 1".into(),
            },
        }),
    );
    let discover = Envelope::new(
        header("caller-1", T0 + 3_000, 0x40),
        Body::DiscoverTools(DiscoverTools {
            request_id: RequestId(seq16(0xb0)),
            capability: Some(CapabilityPattern::new("shell.*").unwrap()),
            environment: None,
            limit: 10,
            cursor: None,
        }),
    );
    let call_json = tool_call(
        0x50,
        Target::Capability(CapabilityPattern::new("shell.*").unwrap()),
    );
    vec![
        (
            "registerAgent, postcard: agent-1 registers one tool (seed 0x07 x 32)",
            agent_key(),
            Format::Postcard,
            register,
        ),
        (
            "toolCall, postcard: caller-1 calls shell.run on agent-1 (seed 0x08 x 32)",
            caller_key(),
            Format::Postcard,
            call,
        ),
        (
            "toolResult, postcard: agent-1 answers with a success value",
            agent_key(),
            Format::Postcard,
            result_ok,
        ),
        (
            "toolResult, postcard: agent-1 answers with error TOOL_FAILED (code 14)",
            agent_key(),
            Format::Postcard,
            result_err,
        ),
        (
            "discoverTools, postcard: Option fields, one Some and one None",
            caller_key(),
            Format::Postcard,
            discover,
        ),
        (
            "toolCall, json: caller-1 calls shell.run on any agent matching shell.*",
            caller_key(),
            Format::Json,
            call_json,
        ),
    ]
}

fn frame_cases() -> Vec<(&'static str, Frame)> {
    let signed = SignedEnvelope::sign(
        &tool_call(0x10, Target::Agent(id("agent-1"))),
        &caller_key(),
    )
    .unwrap();
    let err = |code, text: &str| (code, text.to_owned());
    vec![
        (
            "deliver: the broker relays caller-1's toolCall with caller-1's key",
            Frame::Deliver {
                envelope: signed,
                signer: caller_key().public_key(),
            },
        ),
        (
            "accepted: registration accepted",
            Frame::Accepted(Accepted {
                agent_id: id("agent-1"),
                broker_id: id("broker-a"),
                broker_key: SigningKey::from_seed([0x09; 32]).public_key(),
                heartbeat_interval_ms: 10_000,
                grace_ms: 30_000,
                max_frame: 4_194_304,
            }),
        ),
        ("denied: registration refused", {
            let (code, reason) = err(ErrorCode::IdConflict, "agent-1 is bound to another key");
            Frame::Denied { code, reason }
        }),
        (
            "heartbeat: seq 300 (varint 0xac 0x02)",
            Frame::Heartbeat { seq: 300 },
        ),
        ("heartbeatAck: seq 300", Frame::HeartbeatAck { seq: 300 }),
        ("callFailed: no agent matches", {
            let (code, message) = err(ErrorCode::NoRoute, "no live agent for shell.*");
            Frame::CallFailed {
                request_id: request_id(),
                code,
                message,
            }
        }),
        (
            "ack: envelope accepted",
            Frame::Ack {
                nonce: Nonce(seq16(0x10)),
            },
        ),
        ("nack: envelope refused as a replay", {
            let (code, message) = err(ErrorCode::Replayed, "nonce already seen");
            Frame::Nack {
                nonce: Nonce(seq16(0x10)),
                code,
                message,
            }
        }),
        (
            "subscribe to a topic",
            Frame::Subscribe {
                nonce: Nonce(seq16(0x60)),
                topic: cap("build.finished"),
            },
        ),
        (
            "unsubscribe from a topic",
            Frame::Unsubscribe {
                nonce: Nonce(seq16(0x70)),
                topic: cap("build.finished"),
            },
        ),
        ("error: connection-level error, the broker closes", {
            let (code, message) = err(ErrorCode::ShuttingDown, "broker shutting down");
            Frame::Error { code, message }
        }),
        (
            "unsigned: caller-1's toolCall without a signature, vouched for by its session",
            Frame::Unsigned(unsigned()),
        ),
        (
            "attested: broker-a attests caller-1's unsigned toolCall, with caller-1's key",
            Frame::Attested {
                envelope: unsigned(),
                signer: caller_key().public_key(),
                attested_by: id("broker-a"),
            },
        ),
    ]
}

fn unsigned() -> UnsignedEnvelope {
    let mut call = tool_call(0x10, Target::Agent(id("agent-1")));
    if let Body::ToolCall(c) = &mut call.body {
        c.audience = Some(id("broker-a"));
    }
    UnsignedEnvelope::encode(&call).unwrap()
}

fn encode_envelope(env: &Envelope, format: Format) -> Vec<u8> {
    match format {
        Format::Postcard => postcard::to_stdvec(env).unwrap(),
        Format::Json => serde_json::to_vec(env).unwrap(),
    }
}

fn sign(env: &Envelope, format: Format, key: &SigningKey) -> SignedEnvelope {
    match format {
        Format::Postcard => SignedEnvelope::sign(env, key).unwrap(),
        Format::Json => SignedEnvelope::sign_json(env, key).unwrap(),
    }
}

fn framed(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(frame, &mut out, DEFAULT_MAX_FRAME).unwrap();
    out
}

fn prefix(format: Format, kind: EnvelopeType) -> String {
    format!("fem/1 {} {}\n", format.as_str(), kind.as_str())
}

fn generate() -> VectorFile {
    let envelopes = envelope_cases()
        .into_iter()
        .map(|(description, key, format, env)| {
            let signed = sign(&env, format, &key);
            let input = signing_input(format, env.kind(), &signed.bytes);
            EnvelopeVector {
                description: description.to_owned(),
                seed_hex: hex::encode(key.seed()),
                public_key_hex: key.public_key().to_string(),
                format,
                kind: env.kind().as_str().to_owned(),
                envelope_json: serde_json::to_value(&env).unwrap(),
                envelope_bytes_hex: hex::encode(&signed.bytes),
                signing_input_prefix: prefix(format, env.kind()),
                signing_input_hex: hex::encode(&input),
                signature_hex: signed.signature.to_string(),
                signed_envelope_json: serde_json::to_value(&signed).unwrap(),
                frame_hex: hex::encode(framed(&Frame::Envelope(signed))),
            }
        })
        .collect();
    let frames = frame_cases()
        .into_iter()
        .map(|(description, frame)| FrameVector {
            description: description.to_owned(),
            frame_json: serde_json::to_value(&frame).unwrap(),
            frame_hex: hex::encode(framed(&frame)),
        })
        .collect();
    VectorFile {
        comment: vec![
            "FEM protocol test vectors; the layout is described in proto/README.md.".into(),
            "Checked by proto/tests/vectors.rs; regenerate with FEM_REGEN_VECTORS=1 (review the diff!).".into(),
            "Seeds are Ed25519 (RFC 8032) 32-byte private keys; signatures are deterministic.".into(),
            "frame_hex = 4-byte big-endian payload length || postcard(Frame).".into(),
        ],
        envelopes,
        frames,
    }
}

// ------------------------------------------------------------------ checking

fn bytes_of(h: &str) -> Vec<u8> {
    hex::decode(h).unwrap()
}

fn check_envelope(v: &EnvelopeVector) {
    let what = v.description.as_str();
    let seed: [u8; 32] = bytes_of(&v.seed_hex).try_into().unwrap();
    let key = SigningKey::from_seed(seed);
    let public: PublicKey = v.public_key_hex.parse().unwrap();
    assert_eq!(key.public_key(), public, "{what}: public key from seed");

    // Input: the JSON form. Output 1: the encoded bytes.
    let env: Envelope = serde_json::from_value(v.envelope_json.clone()).unwrap();
    assert_eq!(env.kind().as_str(), v.kind, "{what}: type");
    let bytes = encode_envelope(&env, v.format);
    assert_eq!(
        hex::encode(&bytes),
        v.envelope_bytes_hex,
        "{what}: envelope bytes"
    );
    // The JSON form is what serde_json produces for the envelope.
    assert_eq!(serde_json::to_value(&env).unwrap(), v.envelope_json);

    // Signing input.
    let input = signing_input(v.format, env.kind(), &bytes);
    assert_eq!(
        v.signing_input_prefix,
        prefix(v.format, env.kind()),
        "{what}: prefix"
    );
    let mut expected_input = v.signing_input_prefix.as_bytes().to_vec();
    expected_input.extend_from_slice(&bytes);
    assert_eq!(
        input, expected_input,
        "{what}: signing input = prefix || bytes"
    );
    assert_eq!(
        hex::encode(&input),
        v.signing_input_hex,
        "{what}: signing input"
    );

    // Signature (Ed25519 is deterministic).
    let sig = key.sign(&input);
    assert_eq!(sig.to_string(), v.signature_hex, "{what}: signature");
    let signed = sign(&env, v.format, &key);
    assert_eq!(signed.bytes, bytes, "{what}: SignedEnvelope::sign bytes");
    assert_eq!(
        signed.signature, sig,
        "{what}: SignedEnvelope::sign signature"
    );

    // The file's bytes and signature verify on their own.
    let from_file = SignedEnvelope {
        format: v.format,
        bytes: bytes_of(&v.envelope_bytes_hex),
        signature: v.signature_hex.parse::<Signature>().unwrap(),
    };
    assert_eq!(from_file.verify(&public).unwrap(), env, "{what}: verify");
    assert_eq!(
        serde_json::to_value(&from_file).unwrap(),
        v.signed_envelope_json,
        "{what}: SignedEnvelope JSON form"
    );
    let back: SignedEnvelope = serde_json::from_value(v.signed_envelope_json.clone()).unwrap();
    assert_eq!(back, from_file);

    // The frame.
    let frame = Frame::Envelope(signed);
    let out = framed(&frame);
    assert_eq!(hex::encode(&out), v.frame_hex, "{what}: frame");
    let wire = bytes_of(&v.frame_hex);
    let len = u32::from_be_bytes(wire[..FRAME_HEADER_LEN].try_into().unwrap()) as usize;
    assert_eq!(len, wire.len() - FRAME_HEADER_LEN, "{what}: length prefix");
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
    dec.push(&wire);
    assert_eq!(
        dec.next_frame().unwrap(),
        Some(Frame::Envelope(from_file.clone()))
    );
    assert_eq!(dec.next_frame().unwrap(), None);

    // Tampering: every single-byte change of the envelope bytes fails.
    for i in 0..from_file.bytes.len() {
        for mask in [0x01, 0x80] {
            let mut t = from_file.clone();
            t.bytes[i] ^= mask;
            assert!(
                t.verify(&public).is_err(),
                "{what}: byte {i} ^ {mask:#x} still verifies"
            );
        }
    }
    for i in 0..64 {
        let mut t = from_file.clone();
        t.signature.0[i] ^= 0x01;
        assert!(t.verify(&public).is_err(), "{what}: signature byte {i}");
    }
    let mut t = from_file.clone();
    t.bytes.push(0);
    assert!(t.verify(&public).is_err(), "{what}: appended byte");
    // Another key, another type tag, another format tag: all refused.
    let other = SigningKey::from_seed([0x55; 32]).public_key();
    assert!(from_file.verify(&other).is_err(), "{what}: other key");
    let wrong_kind = if env.kind() == EnvelopeType::Revoke {
        EnvelopeType::ToolCall
    } else {
        EnvelopeType::Revoke
    };
    assert!(from_file.verify_opened(wrong_kind, &public).is_err());
    let swapped = SignedEnvelope {
        format: match v.format {
            Format::Postcard => Format::Json,
            Format::Json => Format::Postcard,
        },
        ..from_file
    };
    assert!(swapped.verify(&public).is_err(), "{what}: other format tag");
}

fn check_frame(v: &FrameVector) {
    let what = v.description.as_str();
    let frame: Frame = serde_json::from_value(v.frame_json.clone()).unwrap();
    assert_eq!(
        hex::encode(framed(&frame)),
        v.frame_hex,
        "{what}: frame bytes"
    );
    let wire = bytes_of(&v.frame_hex);
    assert_eq!(
        decode_frame_payload(&wire[FRAME_HEADER_LEN..]).unwrap(),
        frame,
        "{what}: decode"
    );
    if let Frame::Deliver { envelope, signer } = &frame {
        envelope.verify(signer).unwrap();
    }
}

fn regen() -> bool {
    std::env::var_os("FEM_REGEN_VECTORS").is_some_and(|v| v == "1")
}

#[test]
fn vectors() {
    if regen() {
        let mut text = serde_json::to_string_pretty(&generate()).unwrap();
        text.push('\n');
        std::fs::write(path(), text).unwrap();
        eprintln!("regenerated {}", path().display());
    }
    let text = std::fs::read_to_string(path()).unwrap();
    let file: VectorFile = serde_json::from_str(&text).unwrap();
    assert!(file.envelopes.len() >= 4);
    let formats: Vec<_> = file.envelopes.iter().map(|v| v.format).collect();
    assert!(formats.contains(&Format::Json) && formats.contains(&Format::Postcard));
    for v in &file.envelopes {
        check_envelope(v);
    }
    for v in &file.frames {
        check_frame(v);
    }
    // Every frame variant is covered by the file.
    let mut variants: Vec<String> = file
        .envelopes
        .iter()
        .map(|_| "envelope".to_owned())
        .chain(file.frames.iter().map(|v| match &v.frame_json {
            Value::Object(m) => m.keys().next().cloned().unwrap(),
            Value::String(s) => s.clone(),
            other => panic!("unexpected frame JSON {other}"),
        }))
        .collect();
    variants.sort();
    variants.dedup();
    assert_eq!(variants.len(), 14, "frame variants covered: {variants:?}");
}

/// The code's own cases still produce exactly the committed file (catches a
/// vector whose inputs were edited by hand without regenerating).
#[test]
fn file_matches_generator() {
    if regen() {
        return; // `vectors` is rewriting the file.
    }
    let text = std::fs::read_to_string(path()).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(file, serde_json::to_value(generate()).unwrap());
}
