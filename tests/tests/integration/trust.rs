//! Trust, tested as an outsider would attack it: throw-away keys, grants
//! for other keys or ids, forged and tampered grants, calls outside a
//! grant, and ids squatted in development trust. Brokers on 127.0.x.y
//! (hosts 160 to 179), clients through the SDK.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fem_agent_sdk::{AgentBuilder, Client, Options, SdkError};
use fem_proto::grant::RateLimit;
use fem_proto::{
    AgentId, CallRule, CapabilityPattern, ErrorCode, Grant, IdPattern, Role, SignedGrant,
    SigningKey, Target,
};
use fem_tests::{TestBroker, echo_tool, host};
use serde_json::json;

use crate::bounded;

fn now() -> u64 {
    fem_proto::now_ms()
}

/// A grant for `subject` from `issuer` with the given rights.
fn grant(
    issuer: &SigningKey,
    subject: &SigningKey,
    ids: &[&str],
    offer: &[&str],
    call: &[&str],
    deny: &[&str],
) -> SignedGrant {
    grant_body(subject, ids, offer, call, deny)
        .sign(issuer, None)
        .unwrap()
}

/// The unsigned grant of [`grant`], valid for an hour, for tests that
/// change a field before signing.
fn grant_body(
    subject: &SigningKey,
    ids: &[&str],
    offer: &[&str],
    call: &[&str],
    deny: &[&str],
) -> Grant {
    Grant {
        version: 1,
        id: rand_id(),
        subject: subject.public_key(),
        role: Role::Agent,
        issued_ms: now(),
        expires_ms: now() + 3_600_000,
        register: ids.iter().map(|s| IdPattern::new(*s).unwrap()).collect(),
        offer: offer
            .iter()
            .map(|s| CapabilityPattern::new(*s).unwrap())
            .collect(),
        offer_ids: Vec::new(),
        call: call.iter().map(|s| CallRule::parse(s).unwrap()).collect(),
        deny: deny.iter().map(|s| CallRule::parse(s).unwrap()).collect(),
        rate: None,
        operator: false,
        delegate: false,
    }
}

fn rand_id() -> [u8; 16] {
    fem_proto::RequestId::random().0
}

/// An unsigned revocation of `subject`'s key, issued now.
fn revocation(subject: fem_proto::PublicKey) -> fem_proto::Revocation {
    fem_proto::Revocation {
        version: 1,
        id: rand_id(),
        issued_ms: now(),
        subject: Some(subject),
        grant_id: None,
        before_ms: None,
    }
}

async fn trusted_broker(n: u16, operator: &SigningKey) -> TestBroker {
    let anchor = operator.public_key();
    TestBroker::start(host(n), move |c| c.trust_anchors = vec![anchor]).await
}

/// An agent `id` offering capability `echo.basic` and tool `echo`.
async fn agent(
    id: &str,
    key: SigningKey,
    opts: Options,
) -> Result<(Client, Arc<Mutex<u32>>), SdkError> {
    let n = Arc::new(Mutex::new(0));
    let c = AgentBuilder::new(AgentId::new(id).unwrap(), key)
        .capability("echo.basic")
        .unwrap()
        .tool(echo_tool(Arc::clone(&n)))
        .connect(opts)
        .await?;
    Ok((c, n))
}

fn denied_code(r: Result<impl Sized, SdkError>) -> ErrorCode {
    match r {
        Err(SdkError::Denied { code, .. }) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the registration was accepted"),
    }
}

#[tokio::test]
async fn registration_needs_a_grant_for_this_key_id_and_offer() {
    bounded(60, async {
        let op = SigningKey::generate();
        let b = trusted_broker(160, &op).await;
        // A throw-away key without a grant.
        let k = SigningKey::generate();
        assert_eq!(
            denied_code(agent("coder-1", k.clone(), b.options()).await),
            ErrorCode::PermissionDenied
        );
        // A grant bound to another key.
        let other = SigningKey::generate();
        let g = grant(&op, &other, &["coder-*"], &["echo.*", "echo"], &[], &[]);
        assert_eq!(
            denied_code(agent("coder-1", k.clone(), b.options().grant(g)).await),
            ErrorCode::PermissionDenied
        );
        // A grant from a key that is not the anchor.
        let rogue = SigningKey::generate();
        let g = grant(&rogue, &k, &["coder-*"], &["echo.*", "echo"], &[], &[]);
        assert_eq!(
            denied_code(agent("coder-1", k.clone(), b.options().grant(g)).await),
            ErrorCode::PermissionDenied
        );
        // An id outside the grant, then a capability outside it.
        let g = grant(&op, &k, &["coder-*"], &["echo.*", "echo"], &[], &[]);
        assert_eq!(
            denied_code(agent("web-1", k.clone(), b.options().grant(g.clone())).await),
            ErrorCode::PermissionDenied
        );
        let narrow = grant(&op, &k, &["coder-*"], &["echo"], &[], &[]);
        assert_eq!(
            denied_code(agent("coder-1", k.clone(), b.options().grant(narrow)).await),
            ErrorCode::PermissionDenied
        );
        // Expired, and tampered with (one byte of the signed grant flipped).
        let mut expired = grant(&op, &k, &["coder-*"], &["echo.*", "echo"], &[], &[]);
        let mut raw = expired.decode().unwrap();
        raw.expires_ms = now() - 1;
        expired = raw.sign(&op, None).unwrap();
        assert_eq!(
            denied_code(agent("coder-1", k.clone(), b.options().grant(expired)).await),
            ErrorCode::PermissionDenied
        );
        let mut tampered = g.clone();
        let last = tampered.chain[0].body.len() - 1;
        tampered.chain[0].body[last] ^= 1;
        assert_eq!(
            denied_code(agent("coder-1", k.clone(), b.options().grant(tampered)).await),
            ErrorCode::PermissionDenied
        );
        // The right grant registers; the same key cannot take a second id
        // outside it.
        let (_a, _) = agent("coder-1", k.clone(), b.options().grant(g.clone()))
            .await
            .expect("a granted agent registers");
        assert_eq!(b.broker.registry().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn calls_outside_the_grant_are_refused_at_entry_and_hidden_from_discovery() {
    bounded(60, async {
        let op = SigningKey::generate();
        let b = trusted_broker(161, &op).await;
        let ak = SigningKey::generate();
        let ag = grant(
            &op,
            &ak,
            &["coder-*"],
            &["echo.*", "echo", "secret"],
            &[],
            &[],
        );
        let n = Arc::new(Mutex::new(0));
        let secret =
            fem_agent_sdk::Tool::new("secret", "must not run", json!({"type": "object"}), {
                let n = Arc::clone(&n);
                move |req| {
                    let n = Arc::clone(&n);
                    async move {
                        *n.lock().unwrap() += 1;
                        Ok(req.params)
                    }
                }
            })
            .unwrap();
        let _agent = AgentBuilder::new(AgentId::new("coder-1").unwrap(), ak)
            .capability("echo.basic")
            .unwrap()
            .tool(echo_tool(Arc::new(Mutex::new(0))))
            .tool(secret)
            .connect(b.options().grant(ag))
            .await
            .unwrap();
        // The caller may call echo on coder-*, and anything but `secret`.
        let ck = SigningKey::generate();
        let cg = grant(
            &op,
            &ck,
            &["caller-1"],
            &[],
            &["echo@coder-*", "*"],
            &["secret"],
        );
        let caller = Client::connect(AgentId::new("caller-1").unwrap(), ck, b.options().grant(cg))
            .await
            .unwrap();
        let by_id = Target::Agent(AgentId::new("coder-1").unwrap());
        assert_eq!(
            caller
                .call(by_id.clone(), "echo", json!({"x": 1}))
                .await
                .unwrap(),
            json!({"x": 1})
        );
        let e = caller
            .call(by_id.clone(), "secret", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied, "deny beats allow: {e}");
        let by_cap = Target::Capability(CapabilityPattern::new("echo.*").unwrap());
        let e = caller.call(by_cap, "secret", json!({})).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert_eq!(*n.lock().unwrap(), 0, "the denied tool never ran");
        let tools = caller.discover(None, 100).await.unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t.tool.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["echo"],
            "discovery hides what the caller may not call"
        );
    })
    .await;
}

#[tokio::test]
async fn attenuated_grants_work_and_cannot_widen() {
    bounded(60, async {
        let op = SigningKey::generate();
        let b = trusted_broker(162, &op).await;
        let parent_key = SigningKey::generate();
        let mut parent = grant(
            &op,
            &parent_key,
            &["team-*"],
            &["echo.*", "echo"],
            &["echo"],
            &[],
        )
        .decode()
        .unwrap();
        parent.delegate = true;
        let parent = parent.sign(&op, None).unwrap();
        // A sub-agent's narrower grant signed by the parent's key.
        let sub = SigningKey::generate();
        let mut narrow = grant(
            &parent_key,
            &sub,
            &["team-sub"],
            &["echo.basic", "echo"],
            &["echo"],
            &[],
        )
        .decode()
        .unwrap();
        narrow.expires_ms = now() + 60_000;
        let child = narrow
            .clone()
            .sign(&parent_key, Some(parent.clone()))
            .unwrap();
        let (_a, _) = agent("team-sub", sub.clone(), b.options().grant(child))
            .await
            .expect("a narrower grant works");
        // The same, widened to every id: refused.
        let mut wide = narrow;
        wide.register = vec![IdPattern::new("*").unwrap()];
        let widened = wide.sign(&parent_key, Some(parent)).unwrap();
        assert_eq!(
            denied_code(
                agent(
                    "other-1",
                    SigningKey::generate(),
                    b.options().grant(widened)
                )
                .await
            ),
            ErrorCode::PermissionDenied
        );
    })
    .await;
}

#[tokio::test]
async fn development_trust_binds_an_id_to_its_first_key() {
    bounded(60, async {
        let b = TestBroker::start(host(163), |_| {}).await;
        let first = SigningKey::generate();
        let (a, _) = agent("squat-1", first.clone(), b.options()).await.unwrap();
        a.shutdown().await;
        assert!(
            fem_tests::eventually(Duration::from_secs(5), || b.broker.registry().is_empty()).await
        );
        // The agent is gone; a new key claims its id.
        let thief = SigningKey::generate();
        assert_eq!(
            denied_code(agent("squat-1", thief, b.options()).await),
            ErrorCode::IdConflict
        );
        let (_back, _) = agent("squat-1", first, b.options())
            .await
            .expect("the first key gets its id back");
    })
    .await;
}

#[tokio::test]
async fn a_grants_rate_limit_answers_rate_limited() {
    bounded(60, async {
        let op = SigningKey::generate();
        let b = trusted_broker(164, &op).await;
        let ak = SigningKey::generate();
        let (_a, _) = agent(
            "rl-agent",
            ak.clone(),
            b.options().grant(grant(
                &op,
                &ak,
                &["rl-agent"],
                &["echo.*", "echo"],
                &[],
                &[],
            )),
        )
        .await
        .unwrap();
        let ck = SigningKey::generate();
        let mut g = grant(&op, &ck, &["rl-caller"], &[], &["echo"], &[])
            .decode()
            .unwrap();
        g.rate = Some(RateLimit {
            per_sec: 1,
            burst: 2,
        });
        let caller = Client::connect(
            AgentId::new("rl-caller").unwrap(),
            ck,
            b.options().grant(g.sign(&op, None).unwrap()),
        )
        .await
        .unwrap();
        let target = Target::Agent(AgentId::new("rl-agent").unwrap());
        for _ in 0..2 {
            caller
                .call(target.clone(), "echo", json!({}))
                .await
                .unwrap();
        }
        let e = caller
            .call(target.clone(), "echo", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited, "{e}");
        // The bucket refills at 1/s.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        caller.call(target, "echo", json!({})).await.unwrap();
    })
    .await;
}

/// A compromised broker (a TLS server speaking fem/1 that the test
/// controls) forges calls to an agent that trusts the operator: signed by a
/// throw-away key without a grant, then with a grant from a rogue operator.
/// The agent's SDK refuses both and runs nothing; a call whose caller holds
/// a real grant runs (the control).
#[tokio::test]
async fn a_forging_broker_cannot_make_an_agent_run_a_call() {
    use fem_net::wire::FrameReader;
    use fem_proto::{Accepted, Body, Envelope, Frame, Header, ToolCall, ToolOutcome};
    use tokio::io::AsyncWriteExt as _;

    bounded(60, async {
        let op = SigningKey::generate();
        let addr = host(165);
        let dir = tempfile::tempdir().unwrap();
        let material = fem_broker::tls::load_material(
            &fem_broker::TlsSource::SelfSigned,
            dir.path(),
            &[addr.ip().to_string()],
        )
        .unwrap();
        let server = fem_broker::tls::server_config(&material, &[fem_proto::ALPN_NATIVE]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();

        // The victim agent trusts the operator's key.
        let ak = SigningKey::generate();
        let ag = grant(&op, &ak, &["victim"], &["echo.*", "echo"], &[], &[]);
        let opts = Options::new(&format!("tls://{addr}"))
            .unwrap()
            .trust(fem_agent_sdk::Trust::CaFile(
                material.ca_path.clone().unwrap(),
            ))
            .grant(ag)
            .trust_anchors(vec![op.public_key()]);
        let ran = Arc::new(Mutex::new(0));
        let agent_task = {
            let ran = Arc::clone(&ran);
            tokio::spawn(async move {
                AgentBuilder::new(AgentId::new("victim").unwrap(), ak)
                    .capability("echo.basic")
                    .unwrap()
                    .tool(echo_tool(ran))
                    .connect(opts)
                    .await
            })
        };
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let (r, mut w) = tokio::io::split(tls);
        let mut reader = FrameReader::new(r, 1 << 20);
        let send = |f: Frame| {
            let mut buf = Vec::new();
            fem_proto::encode_frame(&f, &mut buf, 1 << 20).unwrap();
            buf
        };
        // Grant, then registration; the forging broker accepts.
        assert!(matches!(
            reader.next().await.unwrap(),
            Some(Frame::Grant(_))
        ));
        assert!(matches!(
            reader.next().await.unwrap(),
            Some(Frame::Envelope(_))
        ));
        let accepted = Frame::Accepted(Accepted {
            agent_id: AgentId::new("victim").unwrap(),
            broker_id: AgentId::new("forger").unwrap(),
            broker_key: SigningKey::generate().public_key(),
            heartbeat_interval_ms: 10_000,
            grace_ms: 30_000,
            max_frame: 1 << 20,
        });
        w.write_all(&send(accepted)).await.unwrap();
        let _agent = agent_task.await.unwrap().unwrap();

        let evil = SigningKey::generate();
        let call = |n: u8| {
            let c = ToolCall {
                request_id: fem_proto::RequestId([n; 16]),
                target: Target::Agent(AgentId::new("victim").unwrap()),
                tool: fem_proto::Capability::new("echo").unwrap(),
                parameters: fem_proto::JsonText::new("{}").unwrap(),
                deadline_ms: now() + 10_000,
                audience: None,
            };
            let env = Envelope::new(
                Header::now(AgentId::new("evil").unwrap()),
                Body::ToolCall(c),
            );
            Frame::Deliver {
                envelope: fem_proto::SignedEnvelope::sign(&env, &evil).unwrap(),
                signer: evil.public_key(),
            }
        };
        let outcome = async |reader: &mut FrameReader<_>| loop {
            match reader.next().await.unwrap() {
                Some(Frame::Envelope(s)) => {
                    if let Body::ToolResult(r) = s.open().unwrap().body {
                        return r.outcome;
                    }
                }
                Some(_) => continue,
                None => panic!("the agent closed the connection"),
            }
        };
        // 1. A forged call, no grant at all.
        w.write_all(&send(call(1))).await.unwrap();
        let o = outcome(&mut reader).await;
        assert!(
            matches!(
                o,
                ToolOutcome::Error {
                    code: ErrorCode::PermissionDenied,
                    ..
                }
            ),
            "{o:?}"
        );
        // 2. With a grant from a rogue operator.
        let rogue = SigningKey::generate();
        let fake = grant(&rogue, &evil, &["evil"], &[], &["echo"], &[]);
        w.write_all(&send(Frame::Grant(fake))).await.unwrap();
        w.write_all(&send(call(2))).await.unwrap();
        let o = outcome(&mut reader).await;
        assert!(
            matches!(
                o,
                ToolOutcome::Error {
                    code: ErrorCode::PermissionDenied,
                    ..
                }
            ),
            "{o:?}"
        );
        assert_eq!(*ran.lock().unwrap(), 0, "no forged call ran");
        // 3. The control: the caller holds a real grant for echo.
        let real = grant(&op, &evil, &["evil"], &[], &["echo"], &[]);
        w.write_all(&send(Frame::Grant(real))).await.unwrap();
        w.write_all(&send(call(3))).await.unwrap();
        let o = outcome(&mut reader).await;
        assert!(matches!(o, ToolOutcome::Success(_)), "{o:?}");
        assert_eq!(*ran.lock().unwrap(), 1);
    })
    .await;
}

/// A broker grant from `op` for the identity key in `dir` (created here,
/// as `fem-broker` would on first start), for broker id `id`, allowed to
/// advertise agents matching `advertise`.
fn broker_grant(
    op: &SigningKey,
    dir: &std::path::Path,
    id: &str,
    advertise: &[&str],
) -> SignedGrant {
    let key = fem_net::keys::load_or_generate_key(&dir.join("broker.key")).unwrap();
    let mut g = grant(op, &key, &[id], &[], &[], &[]).decode().unwrap();
    g.role = Role::Broker;
    g.offer_ids = advertise
        .iter()
        .map(|p| IdPattern::new(*p).unwrap())
        .collect();
    g.sign(op, None).unwrap()
}

/// Broker `i` of a mesh over `addrs` with anchor `op`, in `dir` (which
/// holds the shared development CA), as `fem-broker` would start it.
async fn mesh_member(
    addrs: &[std::net::SocketAddr],
    i: usize,
    dir: &std::path::Path,
    ca: &std::path::Path,
    op: &SigningKey,
) -> fem_broker::Broker {
    let peers = addrs
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, a)| format!("https://{a}"))
        .collect();
    let id = format!("rv-{i}");
    let grant = broker_grant(op, dir, &id, &["*"]);
    let config = fem_broker::BrokerConfig {
        listen: addrs[i],
        data_dir: dir.to_owned(),
        broker_id: AgentId::new(id).unwrap(),
        shutdown_grace: Duration::from_millis(200),
        trust_anchors: vec![op.public_key()],
        federation: fem_broker::FederationConfig {
            mode: fem_broker::FederationMode::Mesh,
            peers,
            trust: fem_agent_sdk::Trust::CaFile(ca.to_owned()),
            link_timeout: Duration::from_millis(1500),
            ping_interval: Duration::from_millis(250),
            backoff_max: Duration::from_millis(300),
            grant: Some(grant),
            ..fem_broker::FederationConfig::default()
        },
        ..fem_broker::BrokerConfig::default()
    };
    // A restarted broker may find its port still held for a moment by the
    // tasks of the one it replaces.
    for _ in 0..100 {
        match fem_broker::Broker::bind(config.clone()).await {
            Ok(b) => return b,
            Err(fem_broker::BrokerError::Bind { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("{} stayed in use", addrs[i]);
}

/// A revocation delivered to one broker of a 3-broker mesh closes the
/// revoked agent's session on another broker, keeps it out after a broker
/// restart, and reaches a broker that was not linked when it was issued.
#[tokio::test]
async fn a_revocation_reaches_the_mesh_survives_restarts_and_partitions() {
    bounded(120, async {
        let op = SigningKey::generate();
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let addrs = [host(166), host(167), host(168)];
        let dirs: Vec<tempfile::TempDir> = (0..4)
            .map(|_| {
                let d = tempfile::tempdir().unwrap();
                fem_tests::seed_ca(ca_dir.path(), d.path());
                d
            })
            .collect();
        let mut brokers = Vec::new();
        for (i, d) in dirs.iter().take(3).enumerate() {
            brokers.push(mesh_member(&addrs, i, d.path(), &ca, &op).await);
        }
        // The agent to revoke on broker 2, a caller on broker 0.
        let ak = SigningKey::generate();
        let ag = grant(&op, &ak, &["rv-agent"], &["echo.*", "echo"], &[], &[]);
        let (agent_client, _) = agent("rv-agent", ak.clone(), fem_tests::options_for(addrs[2], &ca).grant(ag.clone()))
            .await
            .unwrap();
        let ck = SigningKey::generate();
        let cg = grant(&op, &ck, &["rv-caller"], &[], &["echo"], &[]);
        let caller = Client::connect(
            AgentId::new("rv-caller").unwrap(),
            ck,
            fem_tests::options_for(addrs[0], &ca).grant(cg),
        )
        .await
        .unwrap();
        let target = Target::Agent(AgentId::new("rv-agent").unwrap());
        let mut routed = false;
        for _ in 0..200 {
            if caller.call(target.clone(), "echo", json!({})).await.is_ok() {
                routed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(routed, "the agent on broker 2 was never routable from broker 0");

        // The operator revokes the agent's key; anyone delivers it to broker 0.
        let revoked = revocation(ak.public_key()).sign(&op, None).unwrap();
        let t = std::time::Instant::now();
        let (status, body) = fem_tests::https(
            addrs[0],
            &ca,
            "POST",
            "/v1/revocations",
            &[("content-type", "text/plain")],
            &revoked.to_text().unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let gone = fem_tests::eventually(Duration::from_secs(10), || {
            brokers[2]
                .registry()
                .get(&AgentId::new("rv-agent").unwrap())
                .is_none()
        })
        .await;
        assert!(gone, "the revoked agent's session on broker 2 was not closed");
        eprintln!(
            "trust: revocation delivered to broker 0 closed the agent's session on broker 2 after {:?}",
            t.elapsed()
        );
        let e = caller.call(target.clone(), "echo", json!({})).await.unwrap_err();
        assert!(
            matches!(e.code, ErrorCode::NoRoute | ErrorCode::AgentUnavailable),
            "{e}"
        );
        // A forged revocation (not signed by the anchor) is refused.
        let forged = revocation(SigningKey::generate().public_key())
            .sign(&SigningKey::generate(), None)
            .unwrap();
        let (status, _) = fem_tests::https(
            addrs[1],
            &ca,
            "POST",
            "/v1/revocations",
            &[],
            &forged.to_text().unwrap(),
        )
        .await;
        assert_eq!(status, 403);

        // Broker 2 restarts: the revocation is kept.
        agent_client.close();
        let b2 = brokers.pop().unwrap();
        b2.shutdown().await;
        brokers.push(mesh_member(&addrs, 2, dirs[2].path(), &ca, &op).await);
        assert_eq!(
            denied_code(
                agent("rv-agent", ak.clone(), fem_tests::options_for(addrs[2], &ca).grant(ag.clone())).await
            ),
            ErrorCode::PermissionDenied
        );

        // A fourth broker, not linked when the revocation was issued, joins
        // broker 0 and learns it on link-up.
        let d = host(169);
        let late = fem_broker::Broker::bind(fem_broker::BrokerConfig {
            listen: d,
            data_dir: dirs[3].path().to_owned(),
            broker_id: AgentId::new("rv-late").unwrap(),
            trust_anchors: vec![op.public_key()],
            federation: fem_broker::FederationConfig {
                mode: fem_broker::FederationMode::Mesh,
                peers: vec![format!("https://{}", addrs[0])],
                trust: fem_agent_sdk::Trust::CaFile(ca.clone()),
                grant: Some(broker_grant(&op, dirs[3].path(), "rv-late", &["*"])),
                ..fem_broker::FederationConfig::default()
            },
            ..fem_broker::BrokerConfig::default()
        })
        .await
        .unwrap();
        let mut refused = false;
        for _ in 0..100 {
            let r = agent("rv-agent", ak.clone(), fem_tests::options_for(d, &ca).grant(ag.clone())).await;
            match r {
                Err(SdkError::Denied {
                    code: ErrorCode::PermissionDenied,
                    ..
                }) => {
                    refused = true;
                    break;
                }
                Ok((c, _)) => {
                    c.close();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused, "the late broker never learnt the revocation");
        late.shutdown().await;
    })
    .await;
}

/// With a trust anchor, a broker without a broker grant cannot link, and a
/// broker granted only `team-a-*` cannot attract calls for other agents.
#[tokio::test]
async fn rogue_brokers_can_neither_link_nor_attract_calls() {
    bounded(90, async {
        let op = SigningKey::generate();
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let (a, r) = (host(170), host(171));
        let dirs: Vec<tempfile::TempDir> = (0..2)
            .map(|_| {
                let d = tempfile::tempdir().unwrap();
                fem_tests::seed_ca(ca_dir.path(), d.path());
                d
            })
            .collect();
        let fed =
            |peer: std::net::SocketAddr, grant: Option<SignedGrant>| fem_broker::FederationConfig {
                mode: fem_broker::FederationMode::Mesh,
                peers: vec![format!("https://{peer}")],
                trust: fem_agent_sdk::Trust::CaFile(ca.clone()),
                link_timeout: Duration::from_millis(1500),
                ping_interval: Duration::from_millis(250),
                backoff_max: Duration::from_millis(300),
                grant,
                ..fem_broker::FederationConfig::default()
            };
        let start = |addr, dir: &std::path::Path, id: &str, f| {
            fem_broker::Broker::bind(fem_broker::BrokerConfig {
                listen: addr,
                data_dir: dir.to_owned(),
                broker_id: AgentId::new(id).unwrap(),
                trust_anchors: vec![op.public_key()],
                federation: f,
                ..fem_broker::BrokerConfig::default()
            })
        };
        let good = start(
            a,
            dirs[0].path(),
            "good",
            fed(r, Some(broker_grant(&op, dirs[0].path(), "good", &["*"]))),
        )
        .await
        .unwrap();
        // 1. No broker grant: never linked.
        let rogue = start(r, dirs[1].path(), "rogue", fed(a, None))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            good.metrics()
                .federation_peers
                .with_label_values(&["up"])
                .get(),
            0,
            "a broker without a grant linked"
        );
        assert!(
            good.metrics()
                .render()
                .contains(r#"fem_broker_refusals_total{reason="PEER_REFUSED"}"#),
            "the refusal is counted"
        );
        rogue.shutdown().await;
        // 2. Granted for team-a-* only; its agent shell-1 claims shell.run.
        let mut rogue = None;
        for _ in 0..100 {
            match start(
                r,
                dirs[1].path(),
                "rogue",
                fed(
                    a,
                    Some(broker_grant(&op, dirs[1].path(), "rogue", &["team-a-*"])),
                ),
            )
            .await
            {
                Ok(b) => {
                    rogue = Some(b);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let rogue = rogue.expect("the rogue broker could not bind again");
        let mk = |id: &str| {
            let k = SigningKey::generate();
            let g = grant(&op, &k, &[id], &["echo.*", "echo"], &[], &[]);
            (k, g)
        };
        let (k1, g1) = mk("team-a-1");
        let (_a1, _) = agent("team-a-1", k1, fem_tests::options_for(r, &ca).grant(g1))
            .await
            .unwrap();
        let (k2, g2) = mk("shell-1");
        let (_a2, _) = agent("shell-1", k2, fem_tests::options_for(r, &ca).grant(g2))
            .await
            .unwrap();
        let ck = SigningKey::generate();
        let cg = grant(&op, &ck, &["rg-caller"], &[], &["echo"], &[]);
        let caller = Client::connect(
            AgentId::new("rg-caller").unwrap(),
            ck,
            fem_tests::options_for(a, &ca).grant(cg),
        )
        .await
        .unwrap();
        let mut reached = false;
        for _ in 0..200 {
            if caller
                .call(
                    Target::Agent(AgentId::new("team-a-1").unwrap()),
                    "echo",
                    json!({}),
                )
                .await
                .is_ok()
            {
                reached = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(reached, "the granted namespace is routable");
        let e = caller
            .call(
                Target::Agent(AgentId::new("shell-1").unwrap()),
                "echo",
                json!({}),
            )
            .await
            .unwrap_err();
        assert_eq!(
            e.code,
            ErrorCode::NoRoute,
            "an agent outside the broker's grant attracted a call: {e}"
        );
        rogue.shutdown().await;
        good.shutdown().await;
    })
    .await;
}

/// Operator views answer a request signed by the holder of an operator
/// grant, and refuse a stranger, a replay, a non-operator grant and a grant
/// lent to another key; an operator grant (not only the anchor) may revoke.
#[tokio::test]
async fn operator_grants_open_the_views_and_revoke() {
    use fem_proto::http_sig::{GRANT_HEADER, HttpSignature, SIGNATURE_HEADER};
    bounded(60, async {
        let op = SigningKey::generate();
        let b = trusted_broker(172, &op).await;
        let (addr, ca) = (b.broker.local_addr(), b.ca());
        let ops_key = SigningKey::generate();
        let operator_grant = Grant {
            operator: true,
            ..grant_body(&ops_key, &["ops-*"], &[], &[], &[])
        }
        .sign(&op, None)
        .unwrap();
        let get = |key: &SigningKey, grant: &SignedGrant, sig: Option<HttpSignature>| {
            let sig = sig.unwrap_or_else(|| HttpSignature::sign(key, "GET", "/v1/agents", b""));
            let (h1, h2) = (sig.to_header(), grant.to_text().unwrap());
            let ca = ca.clone();
            async move {
                fem_tests::https(
                    addr,
                    &ca,
                    "GET",
                    "/v1/agents",
                    &[(SIGNATURE_HEADER, h1.as_str()), (GRANT_HEADER, h2.as_str())],
                    "",
                )
                .await
            }
        };
        let sig = HttpSignature::sign(&ops_key, "GET", "/v1/agents", b"");
        let (status, body) = get(&ops_key, &operator_grant, Some(sig.clone())).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"agents\""), "{body}");
        // The same signed request again: a replay.
        assert_eq!(get(&ops_key, &operator_grant, Some(sig)).await.0, 401);
        // A stranger presenting the operator's grant with its own signature.
        let stranger = SigningKey::generate();
        assert_eq!(get(&stranger, &operator_grant, None).await.0, 403);
        // A valid grant without the operator right.
        let plain = grant(&op, &stranger, &["x-*"], &[], &["echo"], &[]);
        assert_eq!(get(&stranger, &plain, None).await.0, 403);
        // No signature and no configured token.
        assert_eq!(fem_tests::https_get(addr, &ca, "/v1/agents").await.0, 401);
        // The same through the CLI, as an operator types it.
        let dir = tempfile::tempdir().unwrap();
        let (kf, gf) = (dir.path().join("ops.key"), dir.path().join("ops.grant"));
        fem_agent_sdk::keys::save_key(&kf, &ops_key).unwrap();
        std::fs::write(&gf, operator_grant.to_text().unwrap()).unwrap();
        let url = format!("https://{addr}");
        let (code, out, err) = fem_tests::run_fem(&[
            "views",
            "routes",
            "--broker",
            &url,
            "--ca",
            ca.to_str().unwrap(),
            "--key",
            kf.to_str().unwrap(),
            "--grant",
            gf.to_str().unwrap(),
        ])
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("\"routes\""), "{out}");

        // The operator grant's holder revokes an agent's key.
        let ak = SigningKey::generate();
        let ag = grant(&op, &ak, &["rv-*"], &["echo.*", "echo"], &[], &[]);
        let (agent_client, _) = agent("rv-172", ak.clone(), b.options().grant(ag))
            .await
            .unwrap();
        let revoke = |signer: &SigningKey, grant: Option<SignedGrant>| {
            revocation(ak.public_key())
                .sign(signer, grant)
                .unwrap()
                .to_text()
                .unwrap()
        };
        let post = |text: String| {
            let ca = ca.clone();
            async move { fem_tests::https(addr, &ca, "POST", "/v1/revocations", &[], &text).await }
        };
        // Not an operator grant: refused.
        let (status, _) = post(revoke(&stranger, Some(plain.clone()))).await;
        assert_eq!(status, 403);
        assert!(agent_client.is_connected());
        let (status, body) = post(revoke(&ops_key, Some(operator_grant.clone()))).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            fem_tests::eventually(Duration::from_secs(5), || b
                .broker
                .registry()
                .get(&AgentId::new("rv-172").unwrap())
                .is_none())
            .await
        );
    })
    .await;
}

/// A session lives no longer than its grant: at expiry the broker closes
/// it, and the expired grant cannot register again.
#[tokio::test]
async fn a_session_ends_when_its_grant_expires() {
    bounded(60, async {
        let op = SigningKey::generate();
        let b = trusted_broker(173, &op).await;
        let k = SigningKey::generate();
        let short = Grant {
            expires_ms: now() + 1_500,
            ..grant_body(&k, &["short-*"], &["echo.*", "echo"], &[], &[])
        }
        .sign(&op, None)
        .unwrap();
        let (client, _) = agent("short-173", k.clone(), b.options().grant(short.clone()))
            .await
            .unwrap();
        let id = AgentId::new("short-173").unwrap();
        assert!(b.broker.registry().get(&id).is_some());
        let t = std::time::Instant::now();
        assert!(
            fem_tests::eventually(Duration::from_secs(5), || b
                .broker
                .registry()
                .get(&id)
                .is_none())
            .await,
            "the session outlived its grant"
        );
        eprintln!(
            "trust: session closed {:?} after registering with a 1.5 s grant",
            t.elapsed()
        );
        client.close();
        assert_eq!(
            denied_code(agent("short-173", k, b.options().grant(short)).await),
            ErrorCode::PermissionDenied
        );
    })
    .await;
}
