//! Unit tests of the routing core: events in, outputs out, explicit time.

use fem_proto::{Body, Envelope, Header, JsonText, RequestId, SigningKey, ToolOutcome, ToolSpec};

use super::*;

const T0: Micros = 1_700_000_000_000_000;

fn id(s: &str) -> AgentId {
    AgentId::new(s).expect("id")
}

fn router(name: &str) -> Router {
    Router::new(
        RouterConfig {
            broker_id: id(name),
            max_call_timeout: Duration::from_secs(600),
            agent_queue_limit: 2,
            advert_delay: Duration::from_millis(50),
            caller_share_percent: 100,
            max_waiting_bytes: 1 << 30,
            discovery_page_bytes: 1 << 20,
            stub: false,
            max_summary_bytes: 1 << 20,
        },
        Metrics::new().expect("metrics"),
        T0,
    )
}

fn tool(name: &str) -> ToolSpec {
    ToolSpec {
        name: Capability::new(name).expect("tool"),
        description: String::new(),
        input_schema: JsonText::new("{}").expect("json"),
        accepts_attested: false,
    }
}

fn register(r: &mut Router, client: u64, name: &str, key: &SigningKey, max: u32) {
    r.register(
        T0,
        Registration {
            client: ClientId(client),
            id: id(name),
            key: key.public_key(),
            transport: "tcp",
            max_concurrent: max,
            profile: Profile {
                capabilities: vec![Capability::new("echo").expect("cap")],
                tools: vec![tool("echo")],
                metadata: Default::default(),
            },
            accepted: Frame::Heartbeat { seq: 0 },
        },
    )
    .expect("registered");
    drain(r);
}

/// Broker `b` with agent `a` (client 1, one slot) and caller `c` (client 2).
fn agent_and_caller() -> (Router, SigningKey, SigningKey) {
    let mut r = router("b");
    let agent = SigningKey::generate();
    let caller = SigningKey::generate();
    register(&mut r, 1, "a", &agent, 1);
    register(&mut r, 2, "c", &caller, 0);
    (r, agent, caller)
}

fn drain(r: &mut Router) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

fn call_env(
    key: &SigningKey,
    caller: &str,
    target: Target,
    deadline_ms: u64,
) -> (ToolCall, SignedEnvelope) {
    let call = ToolCall {
        request_id: RequestId::random(),
        target,
        tool: Capability::new("echo").expect("tool"),
        parameters: JsonText::new("{}").expect("json"),
        deadline_ms,
        audience: None,
    };
    let env = Envelope::new(Header::now(id(caller)), Body::ToolCall(call.clone()));
    (call, SignedEnvelope::sign(&env, key).expect("sign"))
}

fn result_env(
    key: &SigningKey,
    agent: &str,
    call: &ToolCall,
    caller: &str,
) -> (ToolResult, SignedEnvelope) {
    let result = ToolResult {
        request_id: call.request_id,
        caller: id(caller),
        outcome: ToolOutcome::Success(JsonText::new("1").expect("json")),
    };
    let env = Envelope::new(Header::now(id(agent)), Body::ToolResult(result.clone()));
    (result, SignedEnvelope::sign(&env, key).expect("sign"))
}

fn incoming<'a>(
    caller: &'a AgentId,
    key: &SigningKey,
    call: &'a ToolCall,
    envelope: SignedEnvelope,
) -> Incoming<'a> {
    Incoming {
        reply: ReplyTo::Client(ClientId(2)),
        caller,
        caller_key: key.public_key(),
        call,
        envelope: Carried::Signed(envelope),
        hops_left: 8,
        arrival: Arrival::Entry,
        credential: None,
    }
}

#[test]
fn a_call_waits_for_a_slot_and_times_out_exactly_once() {
    let (mut r, agent, caller) = agent_and_caller();
    let cid = id("c");
    let deadline_ms = T0 / 1000 + 1_000;
    let (c1, e1) = call_env(&caller, "c", Target::Agent(id("a")), deadline_ms);
    let (c2, e2) = call_env(&caller, "c", Target::Agent(id("a")), deadline_ms);
    r.call(T0, incoming(&cid, &caller, &c1, e1));
    r.call(T0, incoming(&cid, &caller, &c2, e2));
    let out = drain(&mut r);
    assert_eq!(out.len(), 1, "one delivered, one waiting: {out:?}");
    assert_eq!(r.agent(&id("a")).map(|a| a.queue.len()), Some(1));
    // The first answers; the waiting call takes the slot.
    let (res, env) = result_env(&agent, "a", &c1, "c");
    r.result(
        T0 + 10,
        ClientId(1),
        &res,
        Carried::Signed(env),
        agent.public_key(),
    );
    let out = drain(&mut r);
    assert!(
        matches!(
            &out[0],
            Output::Send {
                to: ClientId(1),
                ..
            }
        ),
        "{out:?}"
    );
    assert!(
        matches!(
            &out[1],
            Output::Send {
                to: ClientId(2),
                frame: Frame::Deliver { .. }
            }
        ),
        "{out:?}"
    );
    // The second never answers: one TIMEOUT at its deadline, then nothing.
    assert_eq!(r.next_timeout(), Some(deadline_ms * 1000));
    r.tick(deadline_ms * 1000 - 1);
    assert!(drain(&mut r).is_empty());
    r.tick(deadline_ms * 1000);
    let out = drain(&mut r);
    assert!(
        matches!(
            &out[..],
            [Output::Send {
                frame: Frame::CallFailed {
                    code: ErrorCode::Timeout,
                    ..
                },
                ..
            }]
        ),
        "{out:?}"
    );
    let (res, env) = result_env(&agent, "a", &c2, "c");
    r.result(
        T0 + 2_000_000,
        ClientId(1),
        &res,
        Carried::Signed(env),
        agent.public_key(),
    );
    assert!(drain(&mut r).is_empty(), "a late result is dropped");
    assert_eq!(r.pending_len(), 0);
    assert_eq!(r.agent(&id("a")).map(|a| a.in_flight), Some(0));
}

#[test]
fn a_result_for_another_caller_is_not_accepted() {
    let mut r = router("b");
    let agent = SigningKey::generate();
    let caller = SigningKey::generate();
    let cid = id("c");
    register(&mut r, 1, "a", &agent, 4);
    register(&mut r, 2, "c", &caller, 0);
    let (c1, e1) = call_env(&caller, "c", Target::Agent(id("a")), T0 / 1000 + 1_000);
    r.call(T0, incoming(&cid, &caller, &c1, e1));
    drain(&mut r);
    let (res, env) = result_env(&agent, "a", &c1, "someone-else");
    r.result(
        T0,
        ClientId(1),
        &res,
        Carried::Signed(env),
        agent.public_key(),
    );
    assert!(drain(&mut r).is_empty());
    assert_eq!(r.pending_len(), 1);
}

#[test]
fn a_replaced_session_fails_its_calls_and_is_evicted() {
    let mut r = router("b");
    let agent = SigningKey::generate();
    let caller = SigningKey::generate();
    let cid = id("c");
    register(&mut r, 1, "a", &agent, 4);
    register(&mut r, 2, "c", &caller, 0);
    let (c1, e1) = call_env(&caller, "c", Target::Agent(id("a")), T0 / 1000 + 1_000);
    r.call(T0, incoming(&cid, &caller, &c1, e1));
    drain(&mut r);
    // Another key may not take the id.
    let intruder = SigningKey::generate();
    let refused = r.register(
        T0,
        Registration {
            client: ClientId(3),
            id: id("a"),
            key: intruder.public_key(),
            transport: "tcp",
            max_concurrent: 1,
            profile: Profile::default(),
            accepted: Frame::Heartbeat { seq: 0 },
        },
    );
    assert_eq!(refused.map_err(|e| e.0), Err(ErrorCode::IdConflict));
    register(&mut r, 4, "a", &agent, 4);
    assert_eq!(r.pending_len(), 0);
    r.session_closed(T0, ClientId(1));
    assert_eq!(r.agent(&id("a")).map(|a| a.session), Some(ClientId(4)));
}

#[test]
fn deadlines_of_answered_calls_do_not_pile_up() {
    let mut r = router("b");
    let agent = SigningKey::generate();
    let caller = SigningKey::generate();
    let cid = id("c");
    register(&mut r, 1, "a", &agent, 4);
    register(&mut r, 2, "c", &caller, 0);
    let far = T0 / 1000 + 600_000;
    let (c, e) = call_env(&caller, "c", Target::Agent(id("a")), far);
    let (res, renv) = result_env(&agent, "a", &c, "c");
    for _ in 0..5_000 {
        r.call(T0, incoming(&cid, &caller, &c, e.clone()));
        r.result(
            T0,
            ClientId(1),
            &res,
            Carried::Signed(renv.clone()),
            agent.public_key(),
        );
        drain(&mut r);
    }
    assert!(
        r.pending.heap_len() <= 1025,
        "{} stale deadlines kept",
        r.pending.heap_len()
    );
}

/// Routers joined by in-memory links that deliver in order, counting the
/// encoded bytes of what each link carries.
struct Net {
    routers: Vec<Router>,
    /// (router, its link) -> (the other router, its link).
    ends: HashMap<(usize, LinkId), (usize, LinkId)>,
    /// (from, to) -> encoded bytes and frames sent.
    sent: BTreeMap<(usize, usize), (usize, usize)>,
    next_link: u64,
    next_client: u64,
}

impl Net {
    fn new(names: &[&str]) -> Self {
        Self {
            routers: names.iter().map(|n| router(n)).collect(),
            ends: HashMap::new(),
            sent: BTreeMap::new(),
            next_link: 100,
            next_client: 10_000,
        }
    }

    fn link(&mut self, a: usize, b: usize, deltas: bool) {
        let (la, lb) = (LinkId(self.next_link), LinkId(self.next_link + 1));
        self.next_link += 2;
        self.ends.insert((a, la), (b, lb));
        self.ends.insert((b, lb), (a, la));
        let (na, nb) = (
            self.routers[a].broker_id().clone(),
            self.routers[b].broker_id().clone(),
        );
        let features = |r: &Router| {
            let mut f = vec![fem_proto::CANCEL_FEATURE.to_owned()];
            if deltas {
                f.push(fem_proto::DELTA_FEATURE.to_owned());
            }
            if r.cfg.stub {
                f.push(fem_proto::SUMMARY_FEATURE.to_owned());
            }
            f
        };
        let (fa, fb) = (features(&self.routers[a]), features(&self.routers[b]));
        let up = self.routers[a].link_up(T0, la, nb, na.clone(), None, &fb);
        assert_eq!(up, LinkUp::Accepted);
        let up = self.routers[b].link_up(T0, lb, na.clone(), na, None, &fa);
        assert_eq!(up, LinkUp::Accepted);
        self.pump();
    }

    /// Delivers link messages until none is left.
    fn pump(&mut self) {
        loop {
            let mut frames = Vec::new();
            for (i, r) in self.routers.iter_mut().enumerate() {
                while let Some(o) = r.poll_output() {
                    if let Output::Link { to, frame } = o {
                        let (j, lj) = self.ends[&(i, to)];
                        let mut buf = Vec::new();
                        fem_proto::encode_message(&frame, &mut buf, usize::MAX).expect("encodes");
                        let e = self.sent.entry((i, j)).or_default();
                        e.0 += buf.len();
                        e.1 += 1;
                        frames.push((j, lj, frame));
                    }
                }
            }
            if frames.is_empty() {
                return;
            }
            for (j, lj, frame) in frames {
                self.routers[j].link_frame(T0, lj, frame);
            }
        }
    }

    /// Registers `names` at router `at` and lets the batched advertisement go.
    fn register(&mut self, at: usize, names: &[String], now: Micros) {
        for name in names {
            let key = SigningKey::generate();
            self.next_client += 1;
            register(&mut self.routers[at], self.next_client, name, &key, 4);
        }
        self.settle(now + 60_000);
    }

    /// Runs every router's timer at `now` and delivers what follows, until
    /// nothing is left (a batched advertisement or summary a hop away).
    fn settle(&mut self, now: Micros) {
        for _ in 0..self.routers.len() + 1 {
            for r in &mut self.routers {
                r.tick(now);
            }
            self.pump();
        }
    }
}

/// Bytes and frames each of the links a-b and b-c carries for one more
/// registration at `a`, with `n` agents registered there before.
fn one_more_registration(n: usize, deltas: bool) -> ((usize, usize), (usize, usize)) {
    let mut net = Net::new(&["a", "b", "c"]);
    net.link(0, 1, deltas);
    net.link(1, 2, deltas);
    let before: Vec<String> = (0..n).map(|i| format!("agent-{i:05}")).collect();
    net.register(0, &before, T0);
    assert_eq!(net.routers[2].remote_agents().count(), n);
    net.sent.clear();
    net.register(0, &["agent-new".to_owned()], T0 + 1_000_000);
    assert_eq!(net.routers[2].remote_agents().count(), n + 1);
    let on = |from, to| net.sent.get(&(from, to)).copied().unwrap_or_default();
    if deltas {
        // Nothing flows back: the registration is news only downstream
        // (full advertisements come with withdrawals towards the origin).
        assert_eq!(on(1, 0).1 + on(2, 1).1, 0, "{:?}", net.sent);
    }
    (on(0, 1), on(1, 2))
}

#[test]
fn a_registration_costs_the_same_link_bytes_however_many_agents_are_registered() {
    let small = one_more_registration(10, true);
    let large = one_more_registration(1000, true);
    let full_small = one_more_registration(10, false);
    let full_large = one_more_registration(1000, false);
    println!(
        "bytes (frames) for one registration, origin link then re-advertisement: \
         deltas with 10 agents {small:?}, with 1000 {large:?}; \
         full advertisements with 10 {full_small:?}, with 1000 {full_large:?}"
    );
    // One frame per link, of the same size with 10 or 1000 agents.
    assert_eq!(small, large);
    assert_eq!((small.0.1, small.1.1), (1, 1));
    // Without the feature every change is the whole set.
    assert!(
        full_large.0.0 > 50 * full_small.0.0,
        "{full_small:?} {full_large:?}"
    );
    assert!(small.0.0 < full_small.0.0);
}

#[test]
fn a_resync_gets_the_current_set_and_a_gap_asks_once() {
    let mut net = Net::new(&["a", "b"]);
    net.link(0, 1, true);
    let names: Vec<String> = (0..3).map(|i| format!("agent-{i}")).collect();
    net.register(0, &names, T0);
    // A peer asks again (as after a gap): the whole set, or a withdrawal
    // where there is no route.
    let (a, b) = (id("a"), id("b"));
    net.routers[1].link_frame(T0, LinkId(101), FedFrame::Resync { origin: b.clone() });
    net.routers[1].link_frame(T0, LinkId(101), FedFrame::Resync { origin: id("x") });
    let out = drain(&mut net.routers[1]);
    match out.as_slice() {
        [
            Output::Link {
                frame: FedFrame::Advertise { origin, agents, .. },
                ..
            },
            Output::Link {
                frame: FedFrame::Withdraw { origin: x },
                ..
            },
        ] => assert_eq!((origin, agents.len(), x), (&b, 0, &id("x"))),
        other => panic!("{other:?}"),
    }
    net.routers[0].link_frame(T0, LinkId(100), FedFrame::Resync { origin: a.clone() });
    let out = drain(&mut net.routers[0]);
    match out.as_slice() {
        [
            Output::Link {
                frame: FedFrame::Advertise { origin, agents, .. },
                ..
            },
        ] => assert_eq!((origin, agents.len()), (&a, 3)),
        other => panic!("{other:?}"),
    }
    // A delta on a base b does not hold: one resync, then silence until
    // the full set.
    let path = vec![a.clone()];
    let delta = |seq| FedFrame::AdvertiseDelta {
        origin: a.clone(),
        seq,
        base_seq: seq - 1,
        path: path.clone(),
        added: Vec::new(),
        removed: vec![id("agent-0")],
    };
    net.routers[1].link_frame(T0, LinkId(101), delta(T0 + 100));
    net.routers[1].link_frame(T0, LinkId(101), delta(T0 + 101));
    let out = drain(&mut net.routers[1]);
    assert!(
        matches!(
            out.as_slice(),
            [Output::Link {
                frame: FedFrame::Resync { .. },
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(net.routers[1].remote_agents().count(), 3);
}

#[test]
fn a_cancel_frees_the_slot_for_the_waiting_call_and_tells_the_agent() {
    let (mut r, agent, caller) = agent_and_caller();
    let cid = id("c");
    let deadline_ms = T0 / 1000 + 10_000;
    let (c1, e1) = call_env(&caller, "c", Target::Agent(id("a")), deadline_ms);
    let (c2, e2) = call_env(&caller, "c", Target::Agent(id("a")), deadline_ms);
    r.call(T0, incoming(&cid, &caller, &c1, e1));
    r.call(T0, incoming(&cid, &caller, &c2, e2));
    drain(&mut r);
    // Cancelling the waiting call sends the agent nothing.
    r.cancel(T0 + 1, ClientId(2), c2.request_id);
    let out = drain(&mut r);
    assert!(
        matches!(
            &out[..],
            [Output::Send {
                to: ClientId(2),
                frame: Frame::CallFailed {
                    code: ErrorCode::Cancelled,
                    ..
                }
            }]
        ),
        "{out:?}"
    );
    // Cancelling the running one tells the agent, answers the caller once,
    // and frees the slot.
    r.cancel(T0 + 2, ClientId(2), c1.request_id);
    let out = drain(&mut r);
    assert!(
        matches!(&out[0], Output::Send { to: ClientId(1), frame: Frame::Cancel { request_id } } if *request_id == c1.request_id),
        "{out:?}"
    );
    assert!(
        matches!(
            &out[1],
            Output::Send {
                to: ClientId(2),
                frame: Frame::CallFailed {
                    code: ErrorCode::Cancelled,
                    ..
                }
            }
        ),
        "{out:?}"
    );
    assert_eq!(r.agent(&id("a")).map(|a| a.in_flight), Some(0));
    assert_eq!(r.pending_len(), 0);
    // The agent's late result and a second cancel change nothing.
    let (res, env) = result_env(&agent, "a", &c1, "c");
    r.result(
        T0 + 3,
        ClientId(1),
        &res,
        Carried::Signed(env),
        agent.public_key(),
    );
    r.cancel(T0 + 4, ClientId(2), c1.request_id);
    assert!(drain(&mut r).is_empty());
}

#[test]
fn progress_is_forwarded_in_bursts_and_then_at_the_rate_limit() {
    let (mut r, _agent, caller) = agent_and_caller();
    let cid = id("c");
    let (c1, e1) = call_env(&caller, "c", Target::Agent(id("a")), T0 / 1000 + 60_000);
    r.call(T0, incoming(&cid, &caller, &c1, e1));
    drain(&mut r);
    let update = |p: f64| fem_proto::ProgressUpdate {
        progress: p,
        total: None,
        message: None,
    };
    let forwarded = |out: &[Output]| {
        out.iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::Send {
                        to: ClientId(2),
                        frame: Frame::Progress { .. }
                    }
                )
            })
            .count()
    };
    // A burst of 25 at one instant: the burst passes, the rest is dropped.
    for i in 0..25 {
        r.progress(T0 + 10, ClientId(1), c1.request_id, update(f64::from(i)));
    }
    assert_eq!(forwarded(&drain(&mut r)), PROGRESS_BURST as usize);
    // Then one per interval.
    let interval = 1_000_000 / u64::from(PROGRESS_RATE);
    let t = T0 + 10 + interval;
    r.progress(t, ClientId(1), c1.request_id, update(30.0));
    r.progress(t, ClientId(1), c1.request_id, update(31.0));
    assert_eq!(forwarded(&drain(&mut r)), 1);
    // Not a number, or from a session that does not run the call: dropped.
    let later = t + 10 * interval;
    r.progress(later, ClientId(1), c1.request_id, update(f64::NAN));
    r.progress(later, ClientId(2), c1.request_id, update(40.0));
    assert_eq!(forwarded(&drain(&mut r)), 0);
}

fn attested(env: &SignedEnvelope, by: &str) -> Carried {
    Carried::Attested {
        envelope: fem_proto::UnsignedEnvelope {
            format: env.format,
            bytes: env.bytes.clone(),
        },
        by: id(by),
    }
}

/// Broker `b` with two agents of capability `echo`: `open` (client 1)
/// accepts attested calls, `closed` (client 3) does not; caller `c` is
/// client 2.
fn attested_setup() -> (Router, SigningKey, SigningKey) {
    let mut r = router("b");
    let (agent, caller) = (SigningKey::generate(), SigningKey::generate());
    for (client, name, accepts) in [(1, "open", true), (3, "closed", false)] {
        let mut t = tool("echo");
        t.accepts_attested = accepts;
        r.register(
            T0,
            Registration {
                client: ClientId(client),
                id: id(name),
                key: agent.public_key(),
                transport: "tcp",
                max_concurrent: 4,
                profile: Profile {
                    capabilities: vec![Capability::new("echo").expect("cap")],
                    tools: vec![t],
                    metadata: Default::default(),
                },
                accepted: Frame::Heartbeat { seq: 0 },
            },
        )
        .expect("registered");
    }
    register(&mut r, 2, "c", &caller, 0);
    drain(&mut r);
    (r, agent, caller)
}

/// Caller `c` (client 2) sends an attested call to `target` at broker `b`;
/// the call and what the router put out.
fn call_attested(r: &mut Router, key: &SigningKey, target: Target) -> (ToolCall, Vec<Output>) {
    let cid = id("c");
    let (c, e) = call_env(key, "c", target, T0 / 1000 + 5_000);
    let mut inc = incoming(&cid, key, &c, e.clone());
    inc.envelope = attested(&e, "b");
    r.call(T0, inc);
    let out = drain(r);
    (c, out)
}

#[test]
fn attested_calls_reach_only_tools_that_accept_them() {
    let (mut r, _, caller) = attested_setup();
    // By id, to the tool that does not accept them: refused at entry.
    let (_, out) = call_attested(&mut r, &caller, Target::Agent(id("closed")));
    assert!(
        matches!(&out[..], [Output::Send { to: ClientId(2), frame: Frame::CallFailed { code: ErrorCode::PermissionDenied, message, .. } }] if message.contains("does not accept broker-attested")),
        "{out:?}"
    );
    // By capability, once per slot: always the agent that accepts them
    // (the other has every slot free), delivered as attested by this broker.
    for _ in 0..4 {
        let echo = fem_proto::CapabilityPattern::new("echo").expect("p");
        let (_, out) = call_attested(&mut r, &caller, Target::Capability(echo));
        assert!(
            matches!(&out[..], [Output::Send { to: ClientId(1), frame: Frame::Attested { attested_by, .. } }] if *attested_by == id("b")),
            "{out:?}"
        );
    }
}

#[test]
fn only_an_attested_call_takes_an_unsigned_result() {
    let (mut r, agent, caller) = attested_setup();
    let cid = id("c");
    let deadline = T0 / 1000 + 5_000;
    // A signed call answered unsigned: the caller gets INVALID_SIGNATURE
    // rather than a result nobody signed.
    let (c, e) = call_env(&caller, "c", Target::Agent(id("open")), deadline);
    r.call(T0, incoming(&cid, &caller, &c, e));
    drain(&mut r);
    let (res, renv) = result_env(&agent, "open", &c, "c");
    r.result(
        T0 + 1,
        ClientId(1),
        &res,
        attested(&renv, "b"),
        agent.public_key(),
    );
    let out = drain(&mut r);
    assert!(
        matches!(
            &out[..],
            [Output::Send {
                to: ClientId(2),
                frame: Frame::CallFailed {
                    code: ErrorCode::InvalidSignature,
                    ..
                }
            }]
        ),
        "{out:?}"
    );
    // An attested call answered unsigned: delivered as attested.
    let (c, _) = call_attested(&mut r, &caller, Target::Agent(id("open")));
    let (res, renv) = result_env(&agent, "open", &c, "c");
    r.result(
        T0 + 2,
        ClientId(1),
        &res,
        attested(&renv, "b"),
        agent.public_key(),
    );
    let out = drain(&mut r);
    assert!(
        matches!(
            &out[..],
            [Output::Send {
                to: ClientId(2),
                frame: Frame::Attested { .. }
            }]
        ),
        "{out:?}"
    );
    assert_eq!(r.pending_len(), 0);
}

/// A router that is a stub (`--federation-routes summary`).
fn stub_router(name: &str) -> Router {
    Router::new(
        RouterConfig {
            stub: true,
            ..router(name).cfg.clone()
        },
        Metrics::new().expect("metrics"),
        T0,
    )
}

/// Registers agent `name` at router `at` offering capability `cap` (and
/// tool echo), and lets the batched advertisement go.
fn register_kind(net: &mut Net, at: usize, name: &str, cap: &str, now: Micros) {
    net.next_client += 1;
    let r = &mut net.routers[at];
    r.register(
        now,
        Registration {
            client: ClientId(net.next_client),
            id: id(name),
            key: SigningKey::generate().public_key(),
            transport: "tcp",
            max_concurrent: 2,
            profile: Profile {
                capabilities: vec![Capability::new(cap).expect("cap")],
                tools: vec![tool("echo")],
                metadata: Default::default(),
            },
            accepted: Frame::Heartbeat { seq: 0 },
        },
    )
    .expect("registered");
    drain(r);
    net.settle(now + 60_000);
}

#[test]
fn a_stub_holds_summaries_relays_open_and_advertises_only_its_own_agents() {
    // Hub h, stub s, spokes p (behind h) and q (beside s, full routes).
    let mut net = Net::new(&["h", "s", "p", "q"]);
    net.routers[1] = stub_router("s");
    net.link(0, 1, true);
    net.link(0, 2, true);
    net.link(1, 3, true);
    let names: Vec<String> = (0..200).map(|i| format!("p-{i:03}")).collect();
    net.register(2, &names, T0);
    register_kind(&mut net, 1, "s-own", "local.only", T0 + 100_000);

    // The stub knows no remote agent by id, one kind of agent two hops away.
    let stub = &net.routers[1];
    assert_eq!(stub.remote_agents().count(), 0);
    let held = &stub.links[&id("h")].summary;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].hops, 2);
    // Its own agent reaches everyone in full; q learns nothing else from it.
    assert!(
        net.routers[0]
            .remote_agents()
            .any(|(a, _)| *a == id("s-own"))
    );
    assert!(
        net.routers[2]
            .remote_agents()
            .any(|(a, _)| *a == id("s-own"))
    );
    let q: Vec<_> = net.routers[3]
        .remote_agents()
        .map(|(a, _)| a.clone())
        .collect();
    assert_eq!(q, vec![id("s-own")]);

    // More agents of a known kind cost the stub's link nothing; a new kind
    // is one summary frame.
    net.sent.clear();
    let more: Vec<String> = (0..50).map(|i| format!("p-more-{i:03}")).collect();
    net.register(2, &more, T0 + 200_000);
    assert_eq!(net.sent.get(&(0, 1)), None, "{:?}", net.sent);
    register_kind(&mut net, 2, "p-new", "other.kind", T0 + 300_000);
    assert_eq!(net.sent.get(&(0, 1)).map(|s| s.1), Some(1));
    assert_eq!(net.routers[1].links[&id("h")].summary.len(), 2);

    // A call by capability at the stub goes open to the hub, which chooses.
    let caller = SigningKey::generate();
    register(&mut net.routers[1], 7, "caller", &caller, 0);
    let cid = id("caller");
    let (call, env) = call_env(
        &caller,
        "caller",
        Target::Capability("echo".parse().expect("pattern")),
        u64::MAX / 2000,
    );
    net.routers[1].call(T0 + 400_000, incoming(&cid, &caller, &call, env));
    let out = drain(&mut net.routers[1]);
    let relayed = match out.as_slice() {
        [Output::Link { to, frame }] => (*to, frame.clone().into_call().expect("a relayed call")),
        other => panic!("{other:?}"),
    };
    assert_eq!(relayed.1.agent, None, "an open relay");
    let (hub_end, _) = net.ends[&(1, relayed.0)];
    assert_eq!(hub_end, 0);
    let hub_link = net.ends[&(1, relayed.0)].1;
    net.routers[0].call(
        T0 + 400_000,
        Incoming {
            reply: ReplyTo::Link {
                link: hub_link,
                relay: relayed.1.id,
            },
            caller: &cid,
            caller_key: relayed.1.signer,
            call: &call,
            envelope: relayed.1.envelope,
            hops_left: relayed.1.hops_left,
            arrival: Arrival::Open,
            credential: None,
        },
    );
    match drain(&mut net.routers[0]).as_slice() {
        [
            Output::Link {
                frame: FedFrame::RelayCall { agent, .. },
                ..
            },
        ] => assert!(agent.as_str().starts_with("p-"), "{agent}"),
        other => panic!("{other:?}"),
    }
    // The result comes back signed by whichever agent the hub chose.
    let agent_key = SigningKey::generate();
    let (result, renv) = result_env(&agent_key, "p-007", &call, "caller");
    net.routers[1].relay_result(
        T0 + 500_000,
        relayed.0,
        relayed.1.id,
        &result,
        Carried::Signed(renv),
        agent_key.public_key(),
    );
    match drain(&mut net.routers[1]).as_slice() {
        [
            Output::Send {
                to: ClientId(2),
                frame: Frame::Deliver { .. },
            },
        ] => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(net.routers[1].pending_len(), 0);

    // An open relay is never relayed open again: the hub answers NO_ROUTE
    // for what neither it nor its routes hold.
    let (call, env) = call_env(
        &caller,
        "caller",
        Target::Capability("nothing.*".parse().expect("pattern")),
        u64::MAX / 2000,
    );
    net.routers[0].call(
        T0 + 600_000,
        Incoming {
            reply: ReplyTo::Link {
                link: hub_link,
                relay: 99,
            },
            caller: &cid,
            caller_key: caller.public_key(),
            call: &call,
            envelope: Carried::Signed(env),
            hops_left: 7,
            arrival: Arrival::Open,
            credential: None,
        },
    );
    match drain(&mut net.routers[0]).as_slice() {
        [
            Output::Link {
                frame: FedFrame::RelayFailed { code, .. },
                ..
            },
        ] => assert_eq!(*code, ErrorCode::NoRoute),
        other => panic!("{other:?}"),
    }

    // The hub's link to the stub goes: the summary and the calls on it go.
    net.routers[1].link_down(T0 + 700_000, relayed.0);
    assert!(!net.routers[1].links.contains_key(&id("h")));
}

#[test]
fn a_stub_takes_summaries_only_from_peers_that_may_advertise_every_id() {
    let mut r = stub_router("s");
    let pattern = |p: &str| fem_proto::IdPattern::new(p).expect("pattern");
    let features = [fem_proto::DELTA_FEATURE.to_owned()];
    r.link_up(
        T0,
        LinkId(1),
        id("limited"),
        id("limited"),
        Some(vec![pattern("team-a-*")]),
        &features,
    );
    r.link_up(
        T0,
        LinkId(2),
        id("open"),
        id("open"),
        Some(vec![pattern("*")]),
        &features,
    );
    drain(&mut r);
    let summary = || FedFrame::Summary {
        profiles: vec![fem_proto::SummaryProfile {
            hops: 1,
            capabilities: vec![Capability::new("echo").expect("cap")],
            tools: vec![fem_proto::SummaryTool {
                name: Capability::new("echo").expect("tool"),
                accepts_attested: false,
            }],
        }],
    };
    r.link_frame(T0, LinkId(1), summary());
    r.link_frame(T0, LinkId(2), summary());
    let held: Vec<&AgentId> = r.summaries().map(|(p, _)| p).collect();
    assert_eq!(held, vec![&id("open")]);
    // A kind no agent could register is dropped, the rest kept.
    let mut oversized = summary();
    if let FedFrame::Summary { profiles } = &mut oversized {
        let mut huge = profiles[0].clone();
        huge.capabilities = (0..2000)
            .map(|i| Capability::new(format!("c{i}")).expect("cap"))
            .collect();
        profiles.push(huge);
    }
    r.link_frame(T0, LinkId(2), oversized);
    let kept: Vec<usize> = r.summaries().map(|(_, k)| k.len()).collect();
    assert_eq!(kept, vec![1]);
    // A broker that is not a stub ignores summaries it did not ask for.
    let mut full = router("f");
    full.link_up(T0, LinkId(3), id("open"), id("open"), None, &features);
    full.link_frame(T0, LinkId(3), summary());
    assert_eq!(full.summaries().count(), 0);
}

/// What a stub's link carries against a full spoke's as agents of a few
/// kinds register behind the hub (bytes counted on the encoded frames).
#[test]
fn a_stub_link_carries_kinds_not_agents() {
    let mut net = Net::new(&["h", "s", "p", "f"]);
    net.routers[1] = stub_router("s");
    for spoke in 1..4 {
        net.link(0, spoke, true);
    }
    net.sent.clear();
    for i in 0..2000 {
        register_kind(
            &mut net,
            2,
            &format!("p-{i:04}"),
            &format!("kind.k{}", i % 10),
            T0 + i * 1000,
        );
    }
    let (stub, full) = (net.sent[&(0, 1)], net.sent[&(0, 3)]);
    println!(
        "2,000 registrations of 10 kinds behind the hub: {} bytes in {} frames to the stub, {} bytes in {} frames to a full spoke",
        stub.0, stub.1, full.0, full.1
    );
    assert_eq!(stub.1, 10, "one summary per new kind");
    assert!(full.0 > 100 * stub.0, "{stub:?} {full:?}");
    assert_eq!(net.routers[3].remote_agents().count(), 2000);
    assert_eq!(net.routers[1].remote_agents().count(), 0);
}
