//! Hostile load against a real broker process, each case as an attacker
//! runs it (raw TLS, registered keys, a client that stops reading): the
//! attacker gets a typed refusal or is cut, the broker's memory and
//! descriptors stay bounded, and a legitimate agent and caller in the same
//! test keep getting answers. Hosts 300..=319.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fem_agent_sdk::{AgentBuilder, Client, Tool};
use fem_proto::{
    AgentId, Body, CapabilityPattern, Envelope, ErrorCode, Frame, Header, JsonText,
    RenderInstruction, SignedEnvelope, SigningKey, Target, ToolSpec,
};
use fem_tests::{
    BrokerProcess, RawConn, echo_agent, eventually, host, metric, open_fds, options_for,
    registration, rss_kib, tls_connect,
};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::bounded;

const MIB: u64 = 1024;

fn tool_spec(name: &str, description_bytes: usize) -> ToolSpec {
    ToolSpec {
        name: fem_proto::Capability::new(name).unwrap(),
        description: "d".repeat(description_bytes),
        input_schema: JsonText::from_value(&json!({"type": "object"})),
        accepts_attested: false,
    }
}

/// A registered raw session (it reads only when the test says so).
async fn raw_agent(b: &BrokerProcess, id: &str) -> (RawConn, SigningKey) {
    let key = SigningKey::generate();
    let mut conn = RawConn::connect(b.addr, b.ca().as_ref()).await;
    conn.send(&Frame::Envelope(registration(
        id,
        &key,
        vec![],
        fem_proto::now_ms(),
    )))
    .await;
    assert!(
        matches!(conn.recv().await, Some(Frame::Accepted(_))),
        "{id} not accepted"
    );
    (conn, key)
}

/// One echo call answered within `within`.
async fn answered(c: &Client, agent: &str, within: Duration) {
    let t = Instant::now();
    let r = c
        .call_with_timeout(
            Target::Agent(AgentId::new(agent).unwrap()),
            "echo",
            json!({"ping": 1}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(r, json!({"ping": 1}));
    assert!(
        t.elapsed() < within,
        "legitimate call took {:?}",
        t.elapsed()
    );
}

async fn limit_hits(b: &BrokerProcess, limit: &str) -> f64 {
    metric(
        b.addr,
        b.ca().as_ref(),
        &format!("fem_broker_limit_hits_total{{limit=\"{limit}\"}}"),
    )
    .await
}

/// Unregistered connections hold their own budget: idle handshakes and
/// 4 MiB frame headers neither lock registered agents out nor hold memory,
/// and they are gone after the registration timeout.
#[tokio::test]
async fn unregistered_connections_are_bounded_apart_from_agents() {
    bounded(90, async {
        let b = BrokerProcess::start(
            host(300),
            &[
                "--max-connections",
                "3",
                "--max-pending-connections",
                "30",
                "--registration-timeout",
                "3s",
            ],
            &[],
        )
        .await;
        let ca = b.ca();
        let opts = options_for(b.addr, ca.as_ref());
        let (_agent, _) = echo_agent("agent-300", opts.clone(), 4).await;
        let c = fem_tests::caller("caller-300", opts.clone()).await;
        answered(&c, "agent-300", Duration::from_secs(2)).await;
        let pid = b.proc.pid();
        let (fds0, rss0) = (open_fds(pid), rss_kib(pid));

        // 20 connections announce a 4 MiB frame and send 200 KiB of it.
        let mut announcing = Vec::new();
        for _ in 0..20 {
            let mut conn = RawConn::connect(b.addr, ca.as_ref()).await;
            let mut bytes = (4u32 * 1024 * 1024).to_be_bytes().to_vec();
            bytes.extend(std::iter::repeat_n(7u8, 200 * 1024));
            let _ = conn.writer.write_all(&bytes).await;
            announcing.push(conn);
        }
        for conn in &mut announcing {
            match conn.recv().await {
                Some(Frame::Denied { code, reason }) => {
                    assert_eq!(code, ErrorCode::TooLarge, "{reason}");
                }
                other => panic!("expected Denied(TOO_LARGE), got {other:?}"),
            }
        }
        // 40 idle handshakes: 30 fit the budget of unregistered connections,
        // the rest are closed at once.
        let mut idle = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            match tls_connect(b.addr, ca.as_ref(), fem_proto::ALPN_NATIVE).await {
                Ok(s) => idle.push(s),
                Err(_) => refused += 1,
            }
        }
        // Those over the budget see the connection end without a frame.
        let mut closed = 0;
        for s in &mut idle {
            let mut buf = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await
            {
                closed += 1;
            }
        }
        assert!(
            refused + closed >= 10,
            "over-budget connections must be closed (refused {refused}, closed {closed})"
        );
        // Registered sessions are untouched: the caller keeps its answers.
        for _ in 0..5 {
            answered(&c, "agent-300", Duration::from_secs(2)).await;
        }
        let rss_flood = rss_kib(pid);
        assert!(
            rss_flood < rss0 + 24 * MIB,
            "RSS grew from {rss0} KiB to {rss_flood} KiB under the flood"
        );
        // After the registration timeout every idle connection is closed.
        assert!(
            eventually(Duration::from_secs(10), || open_fds(pid) <= fds0 + 2).await,
            "descriptors did not return: {} open, {fds0} before",
            open_fds(pid)
        );
        assert!(limit_hits(&b, "max_pending_connections").await >= 1.0);
        answered(&c, "agent-300", Duration::from_secs(2)).await;
        println!(
            "unregistered flood: RSS {rss0} -> {rss_flood} KiB, fds {fds0} -> {} after timeout, {refused}+{closed} over budget",
            open_fds(pid)
        );
    })
    .await;
}

/// HTTP on the TLS port: idle connections, half-sent headers and idle
/// keep-alive (HTTP/1.1 and HTTP/2) are closed on time, and connections
/// beyond --max-http-connections are closed at once.
#[tokio::test]
async fn http_connections_are_bounded_in_count_and_time() {
    bounded(60, async {
        let b = BrokerProcess::start(
            host(301),
            &[
                "--max-http-connections",
                "8",
                "--http-header-timeout",
                "2s",
                "--http-idle-timeout",
                "3s",
            ],
            &[],
        )
        .await;
        let ca = b.ca();
        let pid = b.proc.pid();
        let fds0 = open_fds(pid);
        let mut conns = Vec::new();
        for i in 0..8 {
            let alpn: &[u8] = if i % 4 == 3 { b"h2" } else { b"http/1.1" };
            let mut s = tls_connect(b.addr, ca.as_ref(), alpn).await.unwrap();
            match i % 4 {
                // Half a request header, never finished.
                1 => s
                    .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                    .await
                    .unwrap(),
                // One request, then idle keep-alive.
                2 => s
                    .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap(),
                _ => {}
            }
            conns.push((i, s, Instant::now()));
        }
        // The broker takes a connection's HTTP slot after its side of the
        // handshake: let it catch up with the eight before the ninth.
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Over the limit: closed at once.
        let mut extra = tls_connect(b.addr, ca.as_ref(), b"http/1.1").await.unwrap();
        let _ = extra
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok() && !String::from_utf8_lossy(&buf).contains("200 OK"),
            "the ninth HTTP connection was served"
        );
        // Every one of the eight ends within its limit (plus slack).
        for (i, s, start) in &mut conns {
            let mut sink = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut sink)).await;
            assert!(r.is_ok(), "HTTP connection {i} still open after 8 s");
            let took = start.elapsed();
            assert!(
                took < Duration::from_secs(7),
                "connection {i} took {took:?}"
            );
        }
        assert!(
            eventually(Duration::from_secs(5), || open_fds(pid) <= fds0).await,
            "descriptors did not return: {} open, {fds0} before",
            open_fds(pid)
        );
        assert!(limit_hits(&b, "max_http_connections").await >= 1.0);
        // HTTP/1.1 keep-alive waits for the next headers at most the header
        // timeout; HTTP/2 and unstarted connections are closed by the broker.
        let timed_out =
            limit_hits(&b, "http_idle_timeout").await + limit_hits(&b, "http_header_timeout").await;
        assert!(timed_out >= 1.0);
        // The port still serves.
        let (status, _) = fem_tests::https_get(b.addr, ca.as_ref(), "/health").await;
        assert_eq!(status, 200);
    })
    .await;
}

/// A registered session that stops reading is cut once its queue holds
/// --session-queue-bytes, however large the frames aimed at it.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_its_byte_budget() {
    bounded(90, async {
        let b = BrokerProcess::start(host(302), &["--session-queue-bytes", "4MiB"], &[]).await;
        let ca = b.ca();
        let opts = options_for(b.addr, ca.as_ref());
        let (_agent, _) = echo_agent("agent-302", opts.clone(), 4).await;
        let c = fem_tests::caller("caller-302", opts).await;
        let pid = b.proc.pid();
        let rss0 = rss_kib(pid);
        let (_victim, _) = raw_agent(&b, "victim-302").await;
        let (mut attacker, akey) = raw_agent(&b, "attacker-302").await;
        // 100 render instructions of 1 MiB each at a session that never reads.
        let blob = "r".repeat(1024 * 1024);
        let mut acked = 0;
        let mut refused = 0;
        for _ in 0..100 {
            let env = Envelope::new(
                Header::now(AgentId::new("attacker-302").unwrap()),
                Body::RenderInstruction(RenderInstruction {
                    target: AgentId::new("victim-302").unwrap(),
                    instruction: JsonText::from_value(&json!({"blob": blob})),
                }),
            );
            let env = SignedEnvelope::sign(&env, &akey).unwrap();
            attacker.send(&Frame::Envelope(env)).await;
            match attacker.recv().await {
                Some(Frame::Ack { .. }) => acked += 1,
                Some(Frame::Nack { .. }) => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        answered(&c, "agent-302", Duration::from_secs(2)).await;
        let rss1 = rss_kib(pid);
        assert!(
            rss1 < rss0 + 48 * MIB,
            "RSS grew from {rss0} KiB to {rss1} KiB"
        );
        assert!(limit_hits(&b, "session_queue_bytes").await >= 1.0);
        // The victim's session is gone, so later renders are refused.
        assert!(
            refused > 0,
            "renders to a cut session must be refused ({acked} acked)"
        );
        println!("slow consumer: RSS {rss0} -> {rss1} KiB; {acked} acked, {refused} refused");
    })
    .await;
}

/// What a registration may carry is limited, typed, and names its flag.
#[tokio::test]
async fn registrations_over_the_limits_are_refused_typed() {
    bounded(60, async {
        let b = BrokerProcess::start(host(303), &[], &[]).await;
        let cases: Vec<(Vec<ToolSpec>, &str)> = vec![
            (
                (0..300).map(|i| tool_spec(&format!("t{i}"), 10)).collect(),
                "--max-tools",
            ),
            (vec![tool_spec("big", 5000)], "--max-description-bytes"),
        ];
        for (tools, flag) in cases {
            let key = SigningKey::generate();
            let mut conn = RawConn::connect(b.addr, b.ca().as_ref()).await;
            conn.send(&Frame::Envelope(registration(
                "reg-303",
                &key,
                tools,
                fem_proto::now_ms(),
            )))
            .await;
            match conn.recv().await {
                Some(Frame::Denied { code, reason }) => {
                    assert_eq!(code, ErrorCode::TooLarge, "{reason}");
                    assert!(reason.contains(flag), "{reason}");
                }
                other => panic!("expected Denied(TOO_LARGE), got {other:?}"),
            }
        }
        // A registration frame above --max-registration-bytes (256 KiB).
        let key = SigningKey::generate();
        let mut conn = RawConn::connect(b.addr, b.ca().as_ref()).await;
        let tools = (0..100)
            .map(|i| tool_spec(&format!("t{i}"), 4000))
            .collect();
        conn.send(&Frame::Envelope(registration(
            "reg-303",
            &key,
            tools,
            fem_proto::now_ms(),
        )))
        .await;
        assert!(matches!(
            conn.recv().await,
            Some(Frame::Denied {
                code: ErrorCode::TooLarge,
                ..
            })
        ));
        assert!(limit_hits(&b, "registration").await >= 2.0);
    })
    .await;
}

/// Discovery answers come in pages of at most --discovery-page-bytes, so a
/// federation of large tool lists never makes an answer exceed the frame.
#[tokio::test]
async fn discovery_is_paged_within_its_byte_budget() {
    bounded(90, async {
        let b = BrokerProcess::start(host(304), &["--discovery-page-bytes", "64KiB"], &[]).await;
        let opts = options_for(b.addr, b.ca().as_ref());
        let mut agents = Vec::new();
        for a in 0..6 {
            let mut builder = AgentBuilder::new(
                AgentId::new(format!("big-{a}")).unwrap(),
                SigningKey::generate(),
            )
            .capability("big.tools")
            .unwrap();
            for t in 0..50 {
                builder = builder.tool(
                    Tool::new(
                        &format!("big.t{t:02}"),
                        &"x".repeat(3000),
                        json!({"type": "object"}),
                        |req| async move { Ok(req.params) },
                    )
                    .unwrap(),
                );
            }
            agents.push(builder.connect(opts.clone()).await.unwrap());
        }
        let c = fem_tests::caller("caller-304", opts).await;
        let pattern = CapabilityPattern::new("big.*").unwrap();
        let (first, next) = c
            .discover_page(Some(pattern.clone()), 0, None)
            .await
            .unwrap();
        let page_bytes: usize = first.iter().map(|t| t.tool.description.len()).sum();
        assert!(next.is_some(), "900 KB of tools fit one 64 KiB page?");
        assert!(
            !first.is_empty() && page_bytes <= 64 * 1024,
            "page of {page_bytes} bytes"
        );
        let all = c.discover(Some(pattern), 0).await.unwrap();
        assert_eq!(all.len(), 300, "every tool across the pages");
        let mut keys: Vec<_> = all
            .iter()
            .map(|t| format!("{} {}", t.agent_id, t.tool.name))
            .collect();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "pages overlap");
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "pages out of order");
        println!(
            "discovery: 300 tools in pages of {} ({page_bytes} bytes)",
            first.len()
        );
    })
    .await;
}

/// A result too large to forward is answered TOO_LARGE at once, not at the
/// caller's deadline.
#[tokio::test]
async fn an_oversized_result_is_answered_at_once() {
    bounded(60, async {
        let b = BrokerProcess::start(host(305), &[], &[]).await;
        let opts = options_for(b.addr, b.ca().as_ref());
        let nul = Tool::new(
            "nul",
            "1 MB of NUL",
            json!({"type": "object"}),
            |_req| async { Ok(json!("\u{0}".repeat(1_000_000))) },
        )
        .unwrap();
        let _agent = AgentBuilder::new(AgentId::new("nul-305").unwrap(), SigningKey::generate())
            .capability("nul")
            .unwrap()
            .tool(nul)
            .connect(opts.clone())
            .await
            .unwrap();
        let c = fem_tests::caller("caller-305", opts).await;
        let t = Instant::now();
        let e = c
            .call_with_timeout(
                Target::Agent(AgentId::new("nul-305").unwrap()),
                "nul",
                json!({}),
                Duration::from_secs(40),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorCode::TooLarge, "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
    })
    .await;
}

/// One caller holds at most its share of an agent's slots; deadlines are
/// capped by --max-call-timeout.
#[tokio::test]
async fn one_caller_cannot_hold_every_slot() {
    bounded(90, async {
        let b = BrokerProcess::start(host(306), &["--max-call-timeout", "6s"], &[]).await;
        let opts = options_for(b.addr, b.ca().as_ref());
        let (_agent, count) = echo_agent("slots-306", opts.clone(), 4).await;
        let attacker = Arc::new(fem_tests::caller("attacker-306", opts.clone()).await);
        let legit = fem_tests::caller("legit-306", opts).await;
        let mut held = Vec::new();
        for _ in 0..10 {
            let a = Arc::clone(&attacker);
            held.push(tokio::spawn(async move {
                a.call_with_timeout(
                    Target::Agent(AgentId::new("slots-306").unwrap()),
                    "echo",
                    json!({"sleep_ms": 4000}),
                    Duration::from_secs(45),
                )
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Half the slots are the attacker's at most: this one runs at once.
        answered(&legit, "slots-306", Duration::from_secs(2)).await;
        assert_eq!(
            *count.lock().unwrap(),
            3,
            "2 attacker calls and 1 legitimate"
        );
        // A deadline beyond --max-call-timeout is cut to it.
        let t = Instant::now();
        let e = legit
            .call_with_timeout(
                Target::Agent(AgentId::new("slots-306").unwrap()),
                "echo",
                json!({"sleep_ms": 20_000}),
                Duration::from_secs(60),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorCode::Timeout, "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(9),
            "took {:?}",
            t.elapsed()
        );
        for h in held {
            let _ = h.await;
        }
    })
    .await;
}

/// Events are limited in size and rate per sender; a subscriber receives
/// what was accepted.
#[tokio::test]
async fn an_event_flood_is_bounded_per_sender() {
    bounded(60, async {
        let b = BrokerProcess::start(
            host(307),
            &["--event-rate", "20", "--max-event-bytes", "1KiB"],
            &[],
        )
        .await;
        let opts = options_for(b.addr, b.ca().as_ref());
        let sub = fem_tests::caller("sub-307", opts.clone()).await;
        let mut rx = sub.subscribe("flood.topic").await.unwrap();
        let publisher = fem_tests::caller("pub-307", opts).await;
        let e = publisher
            .emit("flood.topic", json!({"blob": "b".repeat(2048)}))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorCode::TooLarge, "{e}");
        let (mut ok, mut limited) = (0u32, 0u32);
        let t = Instant::now();
        for i in 0..100 {
            match publisher.emit("flood.topic", json!({"i": i})).await {
                Ok(()) => ok += 1,
                Err(e) if e.kind() == ErrorCode::RateLimited => limited += 1,
                Err(e) => panic!("{e}"),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let allowed = 20 + (secs * 20.0).ceil() as u32 + 1;
        assert!(ok <= allowed, "{ok} events accepted in {secs:.2} s");
        assert!(limited > 0);
        let got = Arc::new(Mutex::new(0u32));
        let g = Arc::clone(&got);
        let drain = tokio::spawn(async move {
            while tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .ok()
                .flatten()
                .is_some()
            {
                *g.lock().unwrap() += 1;
            }
        });
        let _ = drain.await;
        assert_eq!(
            *got.lock().unwrap(),
            ok,
            "the subscriber gets what was accepted"
        );
        assert!(limit_hits(&b, "event_rate").await >= 1.0);
        assert!(limit_hits(&b, "max_event_bytes").await >= 1.0);
    })
    .await;
}

/// A configured peer that is not linked shows as `state="down"` (what the
/// FemFederationPeerDown alert watches) until its link comes up.
#[tokio::test]
async fn a_missing_peer_is_exported_as_down() {
    bounded(60, async {
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let (a, b) = (host(310), host(311));
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fem_tests::seed_ca(ca_dir.path(), da.path());
        fem_tests::seed_ca(ca_dir.path(), db.path());
        let _pa = fem_tests::mesh_broker_proc(a, da.path(), &ca, &[b], "2s").await;
        let down = || metric(a, &ca, "fem_broker_federation_peers{state=\"down\"}");
        assert_eq!(down().await, 1.0);
        let _pb = fem_tests::mesh_broker_proc(b, db.path(), &ca, &[a], "2s").await;
        let mut linked = false;
        for _ in 0..100 {
            if down().await == 0.0 {
                linked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(linked, "the peer stayed down");
        assert_eq!(
            metric(a, &ca, "fem_broker_federation_peers{state=\"up\"}").await,
            1.0
        );
    })
    .await;
}
