//! Property tests of the wire format under valid and hostile input.
//!
//! Strategies build arbitrary *valid* frames of every variant, including
//! `Envelope`/`Deliver` frames carrying really signed envelopes of every body
//! type in both formats, and the properties check round trips, stream
//! reassembly, size limits, signature binding, and that malformed input is an
//! error, never a panic.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use fem_proto::{
    Accepted, AgentId, Body, Capability, CapabilityPattern, DEFAULT_MAX_FRAME, DiscoverTools,
    DiscoveredTool, EmbodimentUpdate, EmitEvent, Envelope, ErrorCode, FRAME_HEADER_LEN, Format,
    Frame, FrameDecoder, Header, JsonText, MAX_ID_LEN, MAX_NAME_LEN, Nonce, ProtoError, PublicKey,
    RegisterAgent, RegisterBroker, RenderInstruction, RequestId, Revoke, Signature, SignedEnvelope,
    SigningKey, Target, ToolCall, ToolOutcome, ToolResult, ToolSpec, ToolsDiscovered,
    decode_frame_payload, encode_frame, frame_len,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

// ---------------------------------------------------------------- strategies

fn agent_id() -> impl Strategy<Value = AgentId> {
    prop_oneof![
        9 => "[A-Za-z0-9._:@/-]{1,24}",
        1 => "[A-Za-z0-9._:@/-]{120,128}",
    ]
    .prop_map(|s| AgentId::new(s).unwrap())
}

fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,8}"
}

fn capability() -> impl Strategy<Value = Capability> {
    prop_oneof![
        9 => vec(segment(), 1..4).prop_map(|s| s.join(".")),
        // Exactly at the length limit.
        1 => Just(format!("{}.{}", "a".repeat(63), "b".repeat(MAX_NAME_LEN - 64))),
    ]
    .prop_map(|s| Capability::new(s).unwrap())
}

fn pattern() -> impl Strategy<Value = CapabilityPattern> {
    vec(prop_oneof![segment(), Just("*".to_owned())], 1..4)
        .prop_map(|s| CapabilityPattern::new(s.join(".")).unwrap())
}

/// Free text, including control characters and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,24}",
        1 => any::<String>(),
    ]
}

/// JSON values without floats (floats may not survive a text round trip).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `canonical`: JSON text as `serde_json` writes it, which survives the JSON
/// form unchanged. Otherwise also arbitrary text, which postcard carries
/// without validation (as a peer may send it).
fn json_text(canonical: bool) -> BoxedStrategy<JsonText> {
    let valid = json_value().prop_map(|v| JsonText::from_value(&v));
    if canonical {
        valid.boxed()
    } else {
        prop_oneof![
            3 => valid,
            1 => text().prop_map(|s| {
                // The only way to build unvalidated text: decode it, as a receiver does.
                postcard::from_bytes::<JsonText>(&postcard::to_stdvec(&s).unwrap()).unwrap()
            }),
        ]
        .boxed()
    }
}

/// `canonical`: only codes that survive the JSON form (named codes).
fn error_code(canonical: bool) -> BoxedStrategy<ErrorCode> {
    if canonical {
        (1u16..=18).prop_map(ErrorCode::from_u16).boxed()
    } else {
        any::<u16>().prop_map(ErrorCode::from_u16).boxed()
    }
}

fn public_key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>().prop_map(PublicKey)
}

fn nonce() -> impl Strategy<Value = Nonce> {
    any::<[u8; 16]>().prop_map(Nonce)
}

fn request_id() -> impl Strategy<Value = RequestId> {
    any::<[u8; 16]>().prop_map(RequestId)
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(text(), text(), 0..3)
}

fn tool_spec(c: bool) -> impl Strategy<Value = ToolSpec> {
    (capability(), text(), json_text(c), any::<bool>()).prop_map(
        |(name, description, input_schema, accepts_attested)| ToolSpec {
            name,
            description,
            input_schema,
            accepts_attested,
        },
    )
}

fn body(c: bool) -> impl Strategy<Value = Body> {
    let register_agent = (
        public_key(),
        vec(capability(), 0..3),
        vec(tool_spec(c), 0..3),
        metadata(),
        any::<u32>(),
    )
        .prop_map(
            |(public_key, capabilities, tools, metadata, max_concurrent_calls)| {
                Body::RegisterAgent(RegisterAgent {
                    public_key,
                    capabilities,
                    tools,
                    metadata,
                    max_concurrent_calls,
                })
            },
        );
    let register_broker = (agent_id(), text(), public_key(), vec(text(), 0..3)).prop_map(
        |(broker_id, endpoint, public_key, capabilities)| {
            Body::RegisterBroker(RegisterBroker {
                broker_id,
                endpoint,
                public_key,
                capabilities,
            })
        },
    );
    let emit = (capability(), json_text(c))
        .prop_map(|(topic, payload)| Body::EmitEvent(EmitEvent { topic, payload }));
    let render = (agent_id(), json_text(c)).prop_map(|(target, instruction)| {
        Body::RenderInstruction(RenderInstruction {
            target,
            instruction,
        })
    });
    let target = prop_oneof![
        agent_id().prop_map(Target::Agent),
        pattern().prop_map(Target::Capability),
    ];
    let call = (
        request_id(),
        target,
        capability(),
        json_text(c),
        any::<u64>(),
    )
        .prop_map(|(request_id, target, tool, parameters, deadline_ms)| {
            Body::ToolCall(ToolCall {
                request_id,
                target,
                tool,
                parameters,
                deadline_ms,
                audience: None,
            })
        });
    let outcome = prop_oneof![
        json_text(c).prop_map(ToolOutcome::Success),
        (error_code(c), text()).prop_map(|(code, message)| ToolOutcome::Error { code, message }),
    ];
    let result = (request_id(), agent_id(), outcome).prop_map(|(request_id, caller, outcome)| {
        Body::ToolResult(ToolResult {
            request_id,
            caller,
            outcome,
        })
    });
    let revoke =
        (agent_id(), text()).prop_map(|(target, reason)| Body::Revoke(Revoke { target, reason }));
    let discover = (
        request_id(),
        option::of(pattern()),
        option::of(text()),
        any::<u32>(),
        option::of(text()),
    )
        .prop_map(|(request_id, capability, environment, limit, cursor)| {
            Body::DiscoverTools(DiscoverTools {
                request_id,
                capability,
                environment,
                limit,
                cursor,
            })
        });
    let discovered_tool = (
        agent_id(),
        agent_id(),
        vec(capability(), 0..3),
        tool_spec(c),
    )
        .prop_map(|(agent_id, broker_id, capabilities, tool)| DiscoveredTool {
            agent_id,
            broker_id,
            capabilities,
            tool,
        });
    let discovered = (request_id(), vec(discovered_tool, 0..3), option::of(text())).prop_map(
        |(request_id, tools, next_cursor)| {
            Body::ToolsDiscovered(ToolsDiscovered {
                request_id,
                tools,
                next_cursor,
            })
        },
    );
    let embodiment = (
        vec(tool_spec(c), 0..3),
        option::of(vec(capability(), 0..3)),
        option::of(metadata()),
    )
        .prop_map(|(tools, capabilities, metadata)| {
            Body::EmbodimentUpdate(EmbodimentUpdate {
                tools,
                capabilities,
                metadata,
            })
        });
    prop_oneof![
        register_agent,
        register_broker,
        emit,
        render,
        call,
        result,
        revoke,
        discover,
        discovered,
        embodiment,
    ]
}

fn envelope(canonical: bool) -> impl Strategy<Value = Envelope> {
    (agent_id(), any::<u64>(), nonce(), body(canonical)).prop_map(
        |(sender, timestamp_ms, nonce, body)| {
            Envelope::new(
                Header {
                    sender,
                    timestamp_ms,
                    nonce,
                },
                body,
            )
        },
    )
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Postcard), Just(Format::Json)]
}

fn key() -> impl Strategy<Value = SigningKey> {
    any::<[u8; 32]>().prop_map(SigningKey::from_seed)
}

fn sign(env: &Envelope, format: Format, key: &SigningKey) -> SignedEnvelope {
    match format {
        Format::Postcard => SignedEnvelope::sign(env, key).unwrap(),
        // The JSON form of unvalidated JSON text or unknown codes is lossy,
        // but signing covers the bytes actually produced, so it still verifies.
        Format::Json => SignedEnvelope::sign_json(env, key).unwrap(),
    }
}

/// A really signed envelope, with its signer's public key.
fn signed(canonical: bool) -> impl Strategy<Value = (SignedEnvelope, PublicKey, Envelope)> {
    (envelope(canonical), format(), key()).prop_map(|(env, format, key)| {
        let s = sign(&env, format, &key);
        (s, key.public_key(), env)
    })
}

fn signature() -> impl Strategy<Value = Signature> {
    vec(any::<u8>(), 64).prop_map(|v| Signature(v.try_into().unwrap()))
}

/// Signed envelopes as a frame may carry them: real ones, and arbitrary bytes
/// (a frame does not require its envelope to decode or verify).
fn any_signed() -> impl Strategy<Value = SignedEnvelope> {
    prop_oneof![
        4 => signed(false).prop_map(|(s, _, _)| s),
        1 => (format(), vec(any::<u8>(), 0..64), signature()).prop_map(
            |(format, bytes, signature)| SignedEnvelope {
                format,
                bytes,
                signature,
            }
        ),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let code = || error_code(false);
    prop_oneof![
        any_signed().prop_map(Frame::Envelope),
        (any_signed(), public_key())
            .prop_map(|(envelope, signer)| Frame::Deliver { envelope, signer }),
        (
            agent_id(),
            agent_id(),
            public_key(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(
                |(agent_id, broker_id, broker_key, heartbeat_interval_ms, grace_ms, max_frame)| {
                    Frame::Accepted(Accepted {
                        agent_id,
                        broker_id,
                        broker_key,
                        heartbeat_interval_ms,
                        grace_ms,
                        max_frame,
                    })
                }
            ),
        (code(), text()).prop_map(|(code, reason)| Frame::Denied { code, reason }),
        any::<u64>().prop_map(|seq| Frame::Heartbeat { seq }),
        any::<u64>().prop_map(|seq| Frame::HeartbeatAck { seq }),
        (request_id(), code(), text()).prop_map(|(request_id, code, message)| Frame::CallFailed {
            request_id,
            code,
            message
        }),
        nonce().prop_map(|nonce| Frame::Ack { nonce }),
        (nonce(), code(), text()).prop_map(|(nonce, code, message)| Frame::Nack {
            nonce,
            code,
            message
        }),
        (nonce(), capability()).prop_map(|(nonce, topic)| Frame::Subscribe { nonce, topic }),
        (nonce(), capability()).prop_map(|(nonce, topic)| Frame::Unsubscribe { nonce, topic }),
        (code(), text()).prop_map(|(code, message)| Frame::Error { code, message }),
    ]
}

// ------------------------------------------------------------------- helpers

fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(frame, &mut out, DEFAULT_MAX_FRAME).unwrap();
    out
}

/// Pulls frames until the decoder needs more bytes or fails.
fn drain(dec: &mut FrameDecoder, out: &mut Vec<Frame>) -> Result<(), ProtoError> {
    while let Some(f) = dec.next_frame()? {
        out.push(f);
    }
    Ok(())
}

/// Whatever decoded from hostile bytes must be stable: re-encoding and
/// decoding gives the same value, and opening the envelopes does not panic.
fn check_decoded(frame: &Frame) {
    let again = decode_frame_payload(&encode(frame)[FRAME_HEADER_LEN..]).unwrap();
    assert_eq!(&again, frame);
    if let Frame::Envelope(s) | Frame::Deliver { envelope: s, .. } = frame
        && let Ok(env) = s.open()
    {
        let bytes = postcard::to_stdvec(&env).unwrap();
        let re = SignedEnvelope {
            format: Format::Postcard,
            bytes,
            signature: s.signature,
        };
        assert_eq!(re.open().unwrap(), env);
    }
}

fn flip(bytes: &mut [u8], at: &Index, mask: u8) -> usize {
    let i = at.index(bytes.len());
    bytes[i] ^= mask;
    i
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// encode → decode is the identity, and the prefix is the payload length.
    #[test]
    fn frame_round_trip(frame in frame()) {
        let buf = encode(&frame);
        let header: [u8; 4] = buf[..FRAME_HEADER_LEN].try_into().unwrap();
        let len = u32::from_be_bytes(header) as usize;
        prop_assert_eq!(len, buf.len() - FRAME_HEADER_LEN);
        prop_assert_eq!(frame_len(header, DEFAULT_MAX_FRAME).unwrap(), len);
        prop_assert_eq!(&decode_frame_payload(&buf[FRAME_HEADER_LEN..]).unwrap(), &frame);
        // A limit equal to the payload length accepts it; one less refuses it.
        let mut dec = FrameDecoder::new(len);
        dec.push(&buf);
        prop_assert_eq!(dec.next_frame().unwrap(), Some(frame.clone()));
        prop_assert_eq!(dec.next_frame().unwrap(), None);
        if len > 0 {
            let mut dec = FrameDecoder::new(len - 1);
            dec.push(&buf);
            let refused = matches!(dec.next_frame(), Err(ProtoError::TooLarge { .. }));
            prop_assert!(refused);
            let mut out = vec![0xee; 3];
            let refused = matches!(
                encode_frame(&frame, &mut out, len - 1),
                Err(ProtoError::TooLarge { .. })
            );
            prop_assert!(refused);
            prop_assert_eq!(out, vec![0xee; 3], "earlier output must be kept");
        }
        // Appending to a non-empty buffer keeps its contents.
        let mut out = b"prev".to_vec();
        encode_frame(&frame, &mut out, DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(&out[..4], b"prev");
        prop_assert_eq!(&out[4..], &buf[..]);
    }

    /// The decoder reassembles frames from any split of the stream.
    #[test]
    fn decoder_any_chunking(
        frames in vec(frame(), 1..5),
        cuts in vec(any::<Index>(), 0..10),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            encode_frame(f, &mut stream, DEFAULT_MAX_FRAME).unwrap();
        }
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        at.dedup();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for w in at.windows(2) {
            dec.push(&stream[w[0]..w[1]]);
            drain(&mut dec, &mut got).unwrap();
        }
        prop_assert_eq!(&got, &frames);
        prop_assert_eq!(dec.next_frame().unwrap(), None);
        // Byte by byte as well.
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = 0;
        for b in &stream {
            dec.push(std::slice::from_ref(b));
            while dec.next_frame().unwrap().is_some() {
                got += 1;
            }
        }
        prop_assert_eq!(got, frames.len());
    }

    /// Random bytes: an error or a frame, never a panic.
    #[test]
    fn random_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..512),
        variant in 0u8..14,
    ) {
        if let Ok(f) = decode_frame_payload(&bytes) {
            check_decoded(&f);
        }
        // The same bytes behind a plausible variant index.
        let mut tagged = vec![variant];
        tagged.extend_from_slice(&bytes);
        if let Ok(f) = decode_frame_payload(&tagged) {
            check_decoded(&f);
        }
        // As a stream (random length prefixes), with a small limit.
        let mut dec = FrameDecoder::new(1024);
        dec.push(&bytes);
        let mut got = Vec::new();
        let _ = drain(&mut dec, &mut got);
        for f in &got {
            check_decoded(f);
        }
        // As envelope bytes in both formats.
        for format in [Format::Postcard, Format::Json] {
            let s = SignedEnvelope { format, bytes: bytes.clone(), signature: Signature([0; 64]) };
            let _ = s.open();
        }
        let _ = serde_json::from_slice::<SignedEnvelope>(&bytes);
    }

    /// Every strict prefix of a payload is an error (and the stream decoder
    /// waits for more), for frames and for envelope bytes.
    #[test]
    fn truncated_is_an_error(frame in frame(), at in any::<Index>()) {
        let buf = encode(&frame);
        let payload = &buf[FRAME_HEADER_LEN..];
        let cut = at.index(payload.len());
        prop_assert!(decode_frame_payload(&payload[..cut]).is_err());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&buf[..FRAME_HEADER_LEN + cut]);
        prop_assert_eq!(dec.next_frame().unwrap(), None);
        if let Frame::Envelope(s) | Frame::Deliver { envelope: s, .. } = &frame
            && s.format == Format::Postcard && s.open().is_ok() && !s.bytes.is_empty() {
                let mut t = s.clone();
                t.bytes.truncate(at.index(s.bytes.len()));
                prop_assert!(t.open().is_err());
            }
    }

    /// Flipped bits: an error or a stable frame, never a panic; flips in the
    /// length prefix leave the stream decoder waiting or refusing.
    #[test]
    fn bit_flips_never_panic(
        frame in frame(),
        at in any::<Index>(),
        bit in 0u8..8,
        more in vec((any::<Index>(), 1u8..=255), 0..4),
    ) {
        let mut buf = encode(&frame);
        let i = flip(&mut buf[FRAME_HEADER_LEN..], &at, 1 << bit);
        for (at, mask) in &more {
            flip(&mut buf[FRAME_HEADER_LEN..], at, *mask);
        }
        match decode_frame_payload(&buf[FRAME_HEADER_LEN..]) {
            Ok(f) => check_decoded(&f),
            Err(e) => prop_assert!(matches!(e, ProtoError::Malformed { .. }), "{e:?} at {i}"),
        }
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&buf);
        let mut got = Vec::new();
        let _ = drain(&mut dec, &mut got);
        // A flipped length prefix.
        let mut buf = encode(&frame);
        flip(&mut buf[..FRAME_HEADER_LEN], &at, 1 << bit);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&buf);
        let mut got = Vec::new();
        let _ = drain(&mut dec, &mut got);
    }

    /// A length above the maximum is refused from the 4-byte header alone.
    #[test]
    fn oversize_refused_before_payload(
        max in 0usize..(1 << 20),
        excess in 1u64..=u64::from(u32::MAX),
        extra in vec(any::<u8>(), 0..16),
    ) {
        let len = (max as u64 + excess).min(u64::from(u32::MAX));
        prop_assume!(len > max as u64);
        let header = u32::try_from(len).unwrap().to_be_bytes();
        let mut dec = FrameDecoder::new(max);
        dec.push(&header);
        let refused = matches!(
            dec.next_frame(),
            Err(ProtoError::TooLarge { len: l, max: m }) if l as u64 == len && m == max
        );
        prop_assert!(refused);
        // Also with a partial header first and some payload bytes after.
        let mut dec = FrameDecoder::new(max);
        dec.push(&header[..2]);
        prop_assert_eq!(dec.next_frame().unwrap(), None);
        dec.push(&header[2..]);
        dec.push(&extra);
        let refused = matches!(dec.next_frame(), Err(ProtoError::TooLarge { .. }));
        prop_assert!(refused);
        prop_assert!(frame_len(header, max).is_err());
    }

    /// The JSON form of a SignedEnvelope (HTTP gateway) round-trips exactly,
    /// and a postcard envelope carried that way still verifies.
    #[test]
    fn signed_envelope_json_round_trip((s, pk, env) in signed(false)) {
        let text = serde_json::to_string(&s).unwrap();
        let back: SignedEnvelope = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &s);
        if s.format == Format::Postcard {
            prop_assert_eq!(back.verify(&pk).unwrap(), env);
        }
        // (JSON-format envelopes of unknown error codes do not open: see
        // `unknown_error_code_in_json_form` below.)
    }

    /// Envelopes survive both encodings exactly (for JSON texts as serde_json
    /// writes them and named error codes).
    #[test]
    fn envelope_round_trip_both_formats(env in envelope(true), key in key()) {
        let pk = key.public_key();
        for format in [Format::Postcard, Format::Json] {
            let s = sign(&env, format, &key);
            prop_assert_eq!(s.verify(&pk).unwrap(), env.clone());
        }
        let json = serde_json::to_vec(&env).unwrap();
        prop_assert_eq!(serde_json::from_slice::<Envelope>(&json).unwrap(), env);
    }

    /// Any single-byte change of the envelope bytes or the signature, and any
    /// other key, makes verification fail.
    #[test]
    fn any_flip_breaks_the_signature(
        (s, pk, _env) in signed(false),
        at in any::<Index>(),
        mask in 1u8..=255,
        other in key(),
    ) {
        let mut t = s.clone();
        flip(&mut t.bytes, &at, mask);
        prop_assert!(t.verify(&pk).is_err());
        let mut t = s.clone();
        flip(&mut t.signature.0, &at, mask);
        prop_assert!(t.verify(&pk).is_err());
        prop_assume!(other.public_key() != pk);
        prop_assert!(s.verify(&other.public_key()).is_err());
    }
}

/// Ids at their limits are accepted; one more byte is not.
#[test]
fn limits() {
    assert!(AgentId::new("a".repeat(MAX_ID_LEN)).is_ok());
    assert!(AgentId::new("a".repeat(MAX_ID_LEN + 1)).is_err());
    assert!(Capability::new("a".repeat(MAX_NAME_LEN)).is_ok());
    assert!(Capability::new("a".repeat(MAX_NAME_LEN + 1)).is_err());
    // An id that fails validation is refused by the decoder too.
    let bad = postcard::to_stdvec("a b").unwrap();
    assert!(postcard::from_bytes::<AgentId>(&bad).is_err());
}

/// `ErrorCode::Unknown(n)` keeps its number in JSON, and a name from a newer
/// peer decodes as unknown instead of making the envelope unreadable.
#[test]
fn unknown_error_code_in_json_form() {
    let key = SigningKey::from_seed([0x07; 32]);
    let env = Envelope::new(
        Header {
            sender: AgentId::new("agent-1").unwrap(),
            timestamp_ms: 1,
            nonce: Nonce([0; 16]),
        },
        Body::ToolResult(ToolResult {
            request_id: RequestId([0; 16]),
            caller: AgentId::new("caller-1").unwrap(),
            outcome: ToolOutcome::Error {
                code: ErrorCode::from_u16(999),
                message: String::new(),
            },
        }),
    );
    let s = SignedEnvelope::sign_json(&env, &key).unwrap();
    assert_eq!(s.verify(&key.public_key()).unwrap(), env);
    // A newer peer's code name must not make the whole envelope undecodable.
    let newer = br#""SOME_FUTURE_CODE""#;
    assert!(serde_json::from_slice::<ErrorCode>(newer).is_ok());
}
