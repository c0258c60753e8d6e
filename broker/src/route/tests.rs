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
        envelope,
        hops_left: 8,
        pinned: None,
        credential: None,
    }
}

#[test]
fn a_call_waits_for_a_slot_and_times_out_exactly_once() {
    let mut r = router("b");
    let agent = SigningKey::generate();
    let caller = SigningKey::generate();
    let cid = id("c");
    register(&mut r, 1, "a", &agent, 1);
    register(&mut r, 2, "c", &caller, 0);
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
    r.result(T0 + 10, ClientId(1), &res, env, agent.public_key());
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
    r.result(T0 + 2_000_000, ClientId(1), &res, env, agent.public_key());
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
    r.result(T0, ClientId(1), &res, env, agent.public_key());
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
        r.result(T0, ClientId(1), &res, renv.clone(), agent.public_key());
        drain(&mut r);
    }
    assert!(
        r.pending.heap_len() <= 1025,
        "{} stale deadlines kept",
        r.pending.heap_len()
    );
}

#[test]
fn a_cancel_frees_the_slot_for_the_waiting_call_and_tells_the_agent() {
    let mut r = router("b");
    let agent = SigningKey::generate();
    let caller = SigningKey::generate();
    let cid = id("c");
    register(&mut r, 1, "a", &agent, 1);
    register(&mut r, 2, "c", &caller, 0);
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
    r.result(T0 + 3, ClientId(1), &res, env, agent.public_key());
    r.cancel(T0 + 4, ClientId(2), c1.request_id);
    assert!(drain(&mut r).is_empty());
}

#[test]
fn progress_is_forwarded_in_bursts_and_then_at_the_rate_limit() {
    let mut r = router("b");
    let agent = SigningKey::generate();
    let caller = SigningKey::generate();
    let cid = id("c");
    register(&mut r, 1, "a", &agent, 1);
    register(&mut r, 2, "c", &caller, 0);
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
    let t = T0 + 10 + PROGRESS_INTERVAL;
    r.progress(t, ClientId(1), c1.request_id, update(30.0));
    r.progress(t, ClientId(1), c1.request_id, update(31.0));
    assert_eq!(forwarded(&drain(&mut r)), 1);
    // Not a number, or from a session that does not run the call: dropped.
    let later = t + 10 * PROGRESS_INTERVAL;
    r.progress(later, ClientId(1), c1.request_id, update(f64::NAN));
    r.progress(later, ClientId(2), c1.request_id, update(40.0));
    assert_eq!(forwarded(&drain(&mut r)), 0);
}
