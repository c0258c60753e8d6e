//! Broker-attested calls and events (proto/README.md §8.14) with real
//! broker processes over TLS and QUIC: an unsigned call crosses two brokers
//! to a tool that accepts attested calls, and the handler learns which
//! broker vouched for the caller; tools that did not opt in are never
//! reached by one, whatever a client or a broker sends; only subscribers
//! that accept attested events receive them. Hosts 370 to 379.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fem_agent_sdk::{AgentBuilder, Client, Tool};
use fem_proto::{
    AgentId, Body, Capability, Envelope, ErrorCode, Frame, Header, JsonText, RequestId, SigningKey,
    Target, ToolCall, UnsignedEnvelope,
};
use fem_tests::{RawConn, options_for, registration};
use serde_json::{Value, json};

use crate::bounded;

/// A tool named `name` that answers who called it and who vouched.
fn whoami(name: &str, seen: Arc<Mutex<Vec<Option<String>>>>) -> Tool {
    Tool::new(
        name,
        "Answers its caller",
        json!({"type": "object"}),
        move |req| {
            let seen = Arc::clone(&seen);
            async move {
                let by = req.attested_by.as_ref().map(ToString::to_string);
                seen.lock().unwrap().push(by.clone());
                Ok(json!({"caller": req.caller.as_str(), "attestedBy": by}))
            }
        },
    )
    .unwrap()
}

#[tokio::test]
async fn attested_calls_cross_two_brokers_only_to_tools_that_accept_them() {
    bounded(120, async {
        let (_brokers, [a, b], ca_dir, _dirs) =
            fem_tests::meshed_pair(370, &[], Duration::from_secs(20)).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let _agent = AgentBuilder::new(AgentId::new("fast-370").unwrap(), SigningKey::generate())
            .capability("fast")
            .unwrap()
            .tool(whoami("fast.who", Arc::clone(&seen)).accept_attested())
            .tool(whoami("fast.strict", Arc::clone(&seen)))
            .connect(options_for(a, &ca))
            .await
            .unwrap();
        let caller = fem_tests::caller("caller-370", options_for(b, &ca)).await;
        let agent = Target::Agent(AgentId::new("fast-370").unwrap());
        let t = Duration::from_secs(5);
        // Routes converge: a signed call through B reaches the agent behind A.
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        let signed = loop {
            match caller.call(agent.clone(), "fast.who", json!({})).await {
                Ok(v) => break v,
                Err(e) if tokio::time::Instant::now() > end => panic!("no route: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert_eq!(
            signed["attestedBy"],
            Value::Null,
            "a signed call is not attested"
        );
        // Unsigned, through B to A: B (where it entered) vouches.
        let v = caller
            .call_attested(agent.clone(), "fast.who", json!({}), t)
            .await
            .unwrap();
        assert_eq!(v["caller"], "caller-370");
        assert_eq!(v["attestedBy"], format!("mesh-{}", b.ip()));
        // By capability too.
        let by_cap = Target::Capability(fem_proto::CapabilityPattern::new("fast").unwrap());
        caller
            .call_attested(by_cap, "fast.who", json!({}), t)
            .await
            .unwrap();
        // A tool that did not opt in: refused where the call entered, and
        // its handler never ran.
        let before = seen.lock().unwrap().len();
        let e = caller
            .call_attested(agent.clone(), "fast.strict", json!({}), t)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
        assert!(e.message.contains("does not accept broker-attested"), "{e}");
        assert_eq!(seen.lock().unwrap().len(), before);
        // The same tool signed: runs.
        caller
            .call_with_timeout(agent, "fast.strict", json!({}), t)
            .await
            .unwrap();
    })
    .await;
}

/// An unsigned toolCall from `sender` for `tool` on `agent`.
fn unsigned_call(sender: &str, agent: &str, tool: &str) -> (RequestId, Frame) {
    let request_id = RequestId::random();
    let env = Envelope::new(
        Header::now(AgentId::new(sender).unwrap()),
        Body::ToolCall(ToolCall {
            request_id,
            target: Target::Agent(AgentId::new(agent).unwrap()),
            tool: Capability::new(tool).unwrap(),
            parameters: JsonText::new("{}").unwrap(),
            deadline_ms: fem_proto::now_ms() + 5_000,
            audience: None,
        }),
    );
    (
        request_id,
        Frame::Unsigned(UnsignedEnvelope::encode(&env).unwrap()),
    )
}

/// The first of the next frames that `pick` takes (other frames are
/// skipped; the connection closing first fails the test).
async fn next_picked<T>(conn: &mut RawConn, mut pick: impl FnMut(Frame) -> Option<T>) -> T {
    loop {
        let frame = conn
            .recv()
            .await
            .expect("connection closed before the answer");
        if let Some(t) = pick(frame) {
            return t;
        }
    }
}

/// The callFailed for `id` among the next frames.
async fn failed(conn: &mut RawConn, id: RequestId) -> (ErrorCode, String) {
    next_picked(conn, |f| match f {
        Frame::CallFailed {
            request_id,
            code,
            message,
        } if request_id == id => Some((code, message)),
        _ => None,
    })
    .await
}

/// An attacker with a raw session and a throw-away key: unsigned calls in
/// another agent's name, to a tool that did not opt in, and unsigned
/// envelopes the broker acts on itself are all refused, typed, and the
/// session stays usable.
#[tokio::test]
async fn unsigned_envelopes_from_a_hostile_session_are_refused() {
    bounded(60, async {
        let b = fem_tests::BrokerProcess::start(fem_tests::host(372), &[], &[]).await;
        let ca = b.ca();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let _agent = AgentBuilder::new(AgentId::new("victim-372").unwrap(), SigningKey::generate())
            .tool(whoami("v.open", Arc::clone(&seen)).accept_attested())
            .tool(whoami("v.strict", Arc::clone(&seen)))
            .connect(options_for(b.addr, ca.as_ref()))
            .await
            .unwrap();
        let key = SigningKey::generate();
        let mut conn = RawConn::connect(b.addr, ca.as_ref()).await;
        conn.send(&Frame::Envelope(registration(
            "mallory-372",
            &key,
            vec![],
            fem_proto::now_ms(),
        )))
        .await;
        assert!(matches!(conn.recv().await, Some(Frame::Accepted(_))));
        // In another caller's name: the session is mallory's.
        let (id, f) = unsigned_call("victim-372", "victim-372", "v.open");
        conn.send(&f).await;
        let (code, msg) = failed(&mut conn, id).await;
        assert_eq!(code, ErrorCode::PermissionDenied, "{msg}");
        // To the tool that did not opt in.
        let (id, f) = unsigned_call("mallory-372", "victim-372", "v.strict");
        conn.send(&f).await;
        let (code, msg) = failed(&mut conn, id).await;
        assert_eq!(code, ErrorCode::PermissionDenied, "{msg}");
        // An unsigned revoke of itself is not acted on: revokes must be signed.
        let revoke = Envelope::new(
            Header::now(AgentId::new("mallory-372").unwrap()),
            Body::Revoke(fem_proto::Revoke {
                target: AgentId::new("mallory-372").unwrap(),
                reason: "x".into(),
            }),
        );
        let nonce = revoke.header.nonce;
        conn.send(&Frame::Unsigned(UnsignedEnvelope::encode(&revoke).unwrap()))
            .await;
        let code = next_picked(&mut conn, |f| match f {
            Frame::Nack { nonce: n, code, .. } if n == nonce => Some(code),
            _ => None,
        })
        .await;
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(seen.lock().unwrap().is_empty(), "no handler ran");
        // Its own attested call to the tool that accepts them runs, and
        // the result comes back unsigned, attested by the broker.
        let (id, f) = unsigned_call("mallory-372", "victim-372", "v.open");
        conn.send(&f).await;
        let (env, attested_by) = next_picked(&mut conn, |f| match f {
            Frame::Attested {
                envelope,
                attested_by,
                ..
            } => Some((envelope.open().unwrap(), attested_by)),
            Frame::CallFailed { message, .. } => panic!("refused: {message}"),
            _ => None,
        })
        .await;
        let Body::ToolResult(r) = env.body else {
            panic!("not a result: {env:?}");
        };
        assert_eq!(r.request_id, id);
        assert_eq!(attested_by.as_str(), format!("broker-{}", b.addr.ip()));
        assert_eq!(seen.lock().unwrap().len(), 1);
    })
    .await;
}

/// A subscriber receives attested events only when it asked for them.
#[tokio::test]
async fn attested_events_reach_only_subscribers_that_accept_them() {
    bounded(60, async {
        let b = fem_tests::BrokerProcess::start(fem_tests::host(373), &[], &[]).await;
        let opts = || options_for(b.addr, b.ca().as_ref());
        let publisher = fem_tests::caller("pub-373", opts()).await;
        let strict: Client = fem_tests::caller("strict-373", opts()).await;
        let open: Client = fem_tests::caller("open-373", opts()).await;
        let mut strict_rx = strict.subscribe("build.done").await.unwrap();
        let mut open_rx = open
            .subscribe_accepting_attested("build.done")
            .await
            .unwrap();
        publisher
            .emit_attested("build.done", json!({"n": 1}))
            .await
            .unwrap();
        publisher.emit("build.done", json!({"n": 2})).await.unwrap();
        let within = Duration::from_secs(5);
        let first = tokio::time::timeout(within, open_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.payload["n"], 1);
        assert_eq!(
            first.attested_by.map(|a| a.to_string()),
            Some(format!("broker-{}", b.addr.ip()))
        );
        let second = tokio::time::timeout(within, open_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (second.payload["n"].clone(), second.attested_by),
            (json!(2), None)
        );
        // The strict subscriber gets only the signed one.
        let only = tokio::time::timeout(within, strict_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(only.payload["n"], 2);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), strict_rx.recv())
                .await
                .is_err()
        );
    })
    .await;
}

/// `tools/call` of `name` as a JSON-RPC body.
fn tools_call(name: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": name, "arguments": {}}})
    .to_string()
}

/// POSTs `body` to `path` signed by `key` (as `fem mcp --key` does); returns
/// the status, the answer, and the signature header (to replay it).
async fn signed_post(
    b: &fem_tests::BrokerProcess,
    key: &SigningKey,
    path: &str,
    body: &str,
) -> (u16, String, String) {
    let sig = fem_proto::http_sig::HttpSignature::sign(key, "POST", path, body.as_bytes());
    let header = sig.to_header();
    let (status, answer) = post(b, path, &header, body).await;
    (status, answer, header)
}

async fn post(b: &fem_tests::BrokerProcess, path: &str, sig: &str, body: &str) -> (u16, String) {
    fem_tests::https(
        b.addr,
        b.ca().as_ref(),
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
            ("MCP-Protocol-Version", "2025-11-25"),
            (fem_proto::http_sig::SIGNATURE_HEADER, sig),
        ],
        body,
    )
    .await
}

/// Signed requests on `/mcp`: the caller's own key authenticates each
/// request (no token), and its calls reach tools as broker-attested calls.
/// An attacker replaying a captured request, altering its body, or using
/// an id bound to another key is refused.
#[tokio::test]
async fn signed_mcp_requests_make_attested_calls() {
    bounded(120, async {
        let b = fem_tests::BrokerProcess::start(fem_tests::host(374), &[], &[]).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let agent_key = SigningKey::generate();
        let _agent = AgentBuilder::new(AgentId::new("tools-374").unwrap(), agent_key)
            .tool(whoami("t.open", Arc::clone(&seen)).accept_attested())
            .tool(whoami("t.strict", Arc::clone(&seen)))
            .connect(options_for(b.addr, b.ca().as_ref()))
            .await
            .unwrap();
        let alice = SigningKey::generate();
        let path = "/mcp?as=alice-374";
        let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
        let (status, answer, _) = signed_post(&b, &alice, path, &list).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("t_open"), "{answer}");
        assert!(
            !answer.contains("strict"),
            "only tools that take attested calls: {answer}"
        );
        // A call: the agent sees alice, attested by this broker.
        let body = tools_call("t_open");
        let (status, answer, sig) = signed_post(&b, &alice, path, &body).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("alice-374"), "{answer}");
        assert!(
            answer.contains(&format!("broker-{}", b.addr.ip())),
            "{answer}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
        // The captured request sent again: refused, not run twice.
        let (status, answer) = post(&b, path, &sig, &body).await;
        assert_eq!(status, 401, "{answer}");
        assert!(answer.contains("REPLAYED"), "{answer}");
        // Its signature on another body: refused.
        let sig = fem_proto::http_sig::HttpSignature::sign(&alice, "POST", path, body.as_bytes());
        let (status, answer) = post(&b, path, &sig.to_header(), &tools_call("t_other")).await;
        assert_eq!(status, 401, "{answer}");
        // Or for another caller id: the signed path names alice.
        let (status, answer) = post(&b, "/mcp?as=bob-374", &sig.to_header(), &body).await;
        assert_eq!(status, 401, "{answer}");
        // A throw-away key calling as the agent's own id, bound to its key.
        let mallory = SigningKey::generate();
        let (status, answer, _) =
            signed_post(&b, &mallory, "/mcp?as=tools-374", &tools_call("t_open")).await;
        assert_eq!(status, 401, "{answer}");
        assert!(answer.contains("belongs to key"), "{answer}");
        // The tool that did not opt in cannot be called by name.
        let (_, answer, _) = signed_post(&b, &alice, path, &tools_call("t_strict")).await;
        assert!(
            answer.contains("error") || answer.contains("isError"),
            "{answer}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1, "no other handler ran");
        // `fem mcp --key --id` signs each message the same way over stdio.
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("carol.key");
        fem_net::keys::save_key(&key_file, &SigningKey::generate()).unwrap();
        let url = b.url();
        let ca = b.ca();
        let out = crate::mcp_stdio::raw(
            &[
                "--broker",
                &url,
                "--ca",
                &ca,
                "--key",
                key_file.to_str().unwrap(),
                "--id",
                "carol-374",
            ],
            &format!("{}\n", tools_call("t_open")),
        )
        .await;
        let text = out[0].to_string();
        assert!(text.contains("carol-374"), "{text}");
        assert_eq!(seen.lock().unwrap().len(), 2);
    })
    .await;
}

/// fem-coder as an operator starts it: `--accept-attested file.read` lets
/// `fem call --attested` read a file, while `shell.run` still refuses the
/// same unsigned call (nothing is started).
#[tokio::test]
async fn fem_coder_takes_attested_calls_only_on_the_tools_named() {
    bounded(90, async {
        let b = fem_tests::BrokerProcess::start(fem_tests::host(375), &[], &[]).await;
        let work = tempfile::tempdir().unwrap();
        std::fs::write(work.path().join("note.txt"), "attested read").unwrap();
        let url = b.url();
        let ca = b.ca();
        let mut coder = fem_tests::Proc::spawn(
            "fem-coder",
            &[
                "--broker",
                &url,
                "--ca",
                &ca,
                "--agent",
                "coder-375",
                "--work-dir",
                work.path().to_str().unwrap(),
                "--accept-attested",
                "file.read",
            ],
            &[],
        );
        coder
            .wait_for("fem-coder registered", Duration::from_secs(30))
            .await;
        let call = |tool: &'static str, args: Value| {
            let ca = std::path::PathBuf::from(&ca);
            async move {
                fem_tests::fem_call_with(
                    b.addr,
                    &ca,
                    "coder-375",
                    tool,
                    &args,
                    "30s",
                    &["--attested"],
                )
                .await
            }
        };
        let (code, out, err) = call("file.read", json!({"path": "note.txt"})).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("attested read"), "{out}");
        let marker = work.path().join("started");
        let (code, out, err) = call(
            "shell.run",
            json!({"argv": ["sh", "-c", format!("touch {}", marker.display())]}),
        )
        .await;
        assert_ne!(code, 0, "{out}");
        assert!(err.contains("does not accept broker-attested"), "{err}");
        assert!(!marker.exists(), "shell.run ran an attested call");
    })
    .await;
}
