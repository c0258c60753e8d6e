//! Hostile and malformed input on raw connections: each refusal is typed and
//! the broker keeps serving other agents.

use std::collections::BTreeMap;
use std::time::Duration;

use fem_agent_sdk::AgentBuilder;
use fem_proto::{
    AgentId, Body, Envelope, ErrorCode, Frame, Header, RegisterAgent, SignedEnvelope, SigningKey,
    Target, ToolCall,
};
use fem_tests::{RawConn, TestBroker, caller, echo_agent, eventually, host, registration};
use serde_json::json;

use crate::bounded;

async fn expect_denied(conn: &mut RawConn, code: ErrorCode) -> String {
    match conn.recv().await {
        Some(Frame::Denied { code: got, reason }) => {
            assert_eq!(got, code, "{reason}");
            reason
        }
        other => panic!("expected Denied({code}), got {other:?}"),
    }
}

/// A healthy agent and caller keep working after every refusal.
async fn still_serving(c: &fem_agent_sdk::Client, id: &str) {
    let r = c
        .call(
            Target::Agent(AgentId::new(id).unwrap()),
            "echo",
            json!({"ok": true}),
        )
        .await
        .unwrap();
    assert_eq!(r, json!({"ok": true}));
}

#[tokio::test]
async fn refusals_are_typed_and_harmless() {
    bounded(90, async {
        let b = TestBroker::start(host(20), |_| {}).await;
        let addr = b.broker.local_addr();
        let ca = b.ca();
        let (_good, _) = echo_agent("good-20", b.options(), 10).await;
        let c = caller("caller-20", b.options()).await;
        let now = fem_proto::now_ms;

        // Bad signature: bytes signed by one key, registered under another.
        let key = SigningKey::generate();
        let mut signed = registration("bad-sig", &key, vec![], now());
        signed.signature = SigningKey::generate().sign(b"something else");
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send(&Frame::Envelope(signed)).await;
        expect_denied(&mut conn, ErrorCode::InvalidSignature).await;
        still_serving(&c, "good-20").await;

        // A small-order key with the trivial forgery (R = identity, S = 0),
        // which ZIP 215 verification accepts for any message: the signature
        // passes, the key is refused, and nothing is bound.
        let mut signed = registration("weak-key-20", &SigningKey::generate(), vec![], now());
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut env = signed.open().unwrap();
        if let Body::RegisterAgent(r) = &mut env.body {
            r.public_key = fem_proto::PublicKey(identity);
        }
        signed.bytes = SignedEnvelope::sign(&env, &SigningKey::generate())
            .unwrap()
            .bytes;
        let mut forged = [0u8; 64];
        forged[..32].copy_from_slice(&identity);
        signed.signature = fem_proto::Signature(forged);
        signed.verify(&fem_proto::PublicKey(identity)).unwrap();
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send(&Frame::Envelope(signed)).await;
        let reason = expect_denied(&mut conn, ErrorCode::BadRequest).await;
        assert!(reason.contains("small order"), "{reason}");
        still_serving(&c, "good-20").await;

        // An id held by another key.
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send(&Frame::Envelope(registration(
            "good-20",
            &SigningKey::generate(),
            vec![],
            now(),
        )))
        .await;
        let reason = expect_denied(&mut conn, ErrorCode::IdConflict).await;
        assert!(reason.contains("good-20"), "{reason}");
        still_serving(&c, "good-20").await;

        // A replayed registration (same bytes, same nonce).
        let key = SigningKey::generate();
        let once = registration("replay-20", &key, vec![], now());
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send(&Frame::Envelope(once.clone())).await;
        assert!(matches!(conn.recv().await, Some(Frame::Accepted(_))));
        drop(conn);
        assert!(
            eventually(Duration::from_secs(5), || b
                .broker
                .registry()
                .get(&AgentId::new("replay-20").unwrap())
                .is_none())
            .await
        );
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send(&Frame::Envelope(once)).await;
        expect_denied(&mut conn, ErrorCode::Replayed).await;
        still_serving(&c, "good-20").await;

        // A stale timestamp (two minutes old; the window is one minute).
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send(&Frame::Envelope(registration(
            "stale-20",
            &SigningKey::generate(),
            vec![],
            now() - 120_000,
        )))
        .await;
        expect_denied(&mut conn, ErrorCode::StaleTimestamp).await;

        // An oversized frame is refused from its length prefix alone.
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send_bytes(&(64u32 * 1024 * 1024).to_be_bytes()).await;
        expect_denied(&mut conn, ErrorCode::TooLarge).await;

        // Garbage bytes inside a well-formed length prefix.
        let mut conn = RawConn::connect(addr, &ca).await;
        let mut garbage = 40u32.to_be_bytes().to_vec();
        garbage.extend((0..40u8).map(|i| i.wrapping_mul(97).wrapping_add(200)));
        conn.send_bytes(&garbage).await;
        expect_denied(&mut conn, ErrorCode::BadRequest).await;

        // Anything but registerAgent first.
        let mut conn = RawConn::connect(addr, &ca).await;
        conn.send(&Frame::Heartbeat { seq: 1 }).await;
        expect_denied(&mut conn, ErrorCode::NotRegistered).await;

        still_serving(&c, "good-20").await;
        assert_eq!(b.broker.registry().len(), 2);
    })
    .await;
}

#[tokio::test]
async fn registered_session_refuses_forged_and_replayed_envelopes() {
    bounded(60, async {
        let b = TestBroker::start(host(21), |_| {}).await;
        let (_good, _) = echo_agent("good-21", b.options(), 10).await;
        let key = SigningKey::generate();
        let mut conn = RawConn::connect(b.broker.local_addr(), &b.ca()).await;
        conn.send(&Frame::Envelope(registration(
            "raw-21",
            &key,
            vec![],
            fem_proto::now_ms(),
        )))
        .await;
        assert!(matches!(conn.recv().await, Some(Frame::Accepted(_))));
        let call = |sender: &str, key: &SigningKey| {
            let env = Envelope::new(
                Header::now(AgentId::new(sender).unwrap()),
                Body::ToolCall(ToolCall {
                    request_id: fem_proto::RequestId::random(),
                    target: Target::Agent(AgentId::new("good-21").unwrap()),
                    tool: fem_proto::Capability::new("echo").unwrap(),
                    parameters: fem_proto::JsonText::from_value(&json!({"a": 1})),
                    deadline_ms: fem_proto::now_ms() + 5000,
                    audience: None,
                }),
            );
            SignedEnvelope::sign(&env, key).unwrap()
        };
        let failed = |f: Option<Frame>| match f {
            Some(Frame::CallFailed { code, .. }) => code,
            other => panic!("expected CallFailed, got {other:?}"),
        };
        // Claiming another sender.
        conn.send(&Frame::Envelope(call("good-21", &key))).await;
        assert_eq!(failed(conn.recv().await), ErrorCode::PermissionDenied);
        // The broker leaves signatures on a session to the recipient: the
        // agent refuses a call signed by the wrong key, and says so.
        let refused_by_agent = |f: Option<Frame>| match f {
            Some(Frame::Deliver { envelope, signer }) => {
                match envelope.verify(&signer).unwrap().body {
                    Body::ToolResult(fem_proto::ToolResult {
                        outcome: fem_proto::ToolOutcome::Error { code, .. },
                        ..
                    }) => code,
                    other => panic!("expected an error result, got {other:?}"),
                }
            }
            other => panic!("expected the agent's answer, got {other:?}"),
        };
        conn.send(&Frame::Envelope(call("raw-21", &SigningKey::generate())))
            .await;
        assert_eq!(
            refused_by_agent(conn.recv().await),
            ErrorCode::InvalidSignature
        );
        // A valid call succeeds, and its replay is refused.
        let ok = call("raw-21", &key);
        conn.send(&Frame::Envelope(ok.clone())).await;
        match conn.recv().await {
            Some(Frame::Deliver { envelope, signer }) => {
                let env = envelope.verify(&signer).unwrap();
                assert!(matches!(env.body, Body::ToolResult(_)));
                assert_eq!(env.header.sender.as_str(), "good-21");
            }
            other => panic!("expected the result, got {other:?}"),
        }
        conn.send(&Frame::Envelope(ok)).await;
        assert_eq!(refused_by_agent(conn.recv().await), ErrorCode::Replayed);
    })
    .await;
}

#[tokio::test]
async fn silent_agent_is_evicted_and_its_calls_answered() {
    bounded(60, async {
        let b = TestBroker::start(host(22), |c| {
            c.heartbeat_interval = Duration::from_millis(200);
            c.heartbeat_grace = Duration::from_millis(800);
        })
        .await;
        // A raw agent that registers a tool and then never speaks again.
        let key = SigningKey::generate();
        let env = Envelope::new(
            Header::now(AgentId::new("silent-22").unwrap()),
            Body::RegisterAgent(RegisterAgent {
                public_key: key.public_key(),
                capabilities: vec![fem_proto::Capability::new("echo.basic").unwrap()],
                tools: vec![fem_proto::ToolSpec {
                    name: fem_proto::Capability::new("echo").unwrap(),
                    description: String::new(),
                    input_schema: fem_proto::JsonText::from_value(&json!({"type": "object"})),
                    accepts_attested: false,
                }],
                metadata: BTreeMap::new(),
                max_concurrent_calls: 4,
            }),
        );
        let mut conn = RawConn::connect(b.broker.local_addr(), &b.ca()).await;
        conn.send(&Frame::Envelope(SignedEnvelope::sign(&env, &key).unwrap()))
            .await;
        assert!(matches!(conn.recv().await, Some(Frame::Accepted(_))));
        let c = caller("caller-22", b.options()).await;
        let t = std::time::Instant::now();
        let e = c
            .call_with_timeout(
                Target::Agent(AgentId::new("silent-22").unwrap()),
                "echo",
                json!({}),
                Duration::from_secs(20),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AgentUnavailable, "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "eviction took {:?}",
            t.elapsed()
        );
        assert!(
            b.broker
                .registry()
                .get(&AgentId::new("silent-22").unwrap())
                .is_none()
        );
        // The SDK caller heartbeats, so it stays registered.
        assert!(c.is_connected());
    })
    .await;
}

#[tokio::test]
async fn same_key_reconnect_replaces_a_stale_session() {
    bounded(60, async {
        let b = TestBroker::start(host(23), |_| {}).await;
        let key = SigningKey::generate();
        let mut stale = RawConn::connect(b.broker.local_addr(), &b.ca()).await;
        stale
            .send(&Frame::Envelope(registration(
                "dup-23",
                &key,
                vec![],
                fem_proto::now_ms(),
            )))
            .await;
        assert!(matches!(stale.recv().await, Some(Frame::Accepted(_))));
        // The same agent (same key) comes back on a new connection.
        let fresh = AgentBuilder::new(AgentId::new("dup-23").unwrap(), key)
            .connect(b.options())
            .await
            .unwrap();
        assert!(fresh.is_connected());
        assert!(matches!(
            stale.recv().await,
            Some(Frame::Error {
                code: ErrorCode::AgentUnavailable,
                ..
            })
        ));
        assert_eq!(b.broker.registry().len(), 1);
        let entry = b
            .broker
            .registry()
            .get(&AgentId::new("dup-23").unwrap())
            .unwrap();
        assert_eq!(entry.transport, "quic");
    })
    .await;
}
