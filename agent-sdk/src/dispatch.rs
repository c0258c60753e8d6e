//! Frames from the broker: results and failures to the waiting calls,
//! events to subscribers, calls to the tool handlers.

use std::collections::HashMap;
use std::sync::Arc;

use fem_proto::{
    AgentId, Body, Envelope, ErrorCode, Frame, Grant, NonceCache, ProtoError, PublicKey, RequestId,
    SignedEnvelope, ToolOutcome,
};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use crate::agent::{Proven, reply_error, serve_call};
use crate::caller::Event;
use crate::connection::{Inner, Reply, Sealing, lock};
use crate::{CallError, Origin};

fn resolve(inner: &Inner, id: &RequestId, reply: Reply) {
    if let Some(c) = lock(&inner.pending).remove(id) {
        let _ = c.tx.send(reply);
    } else {
        debug!(request = %id, "answer for an unknown or expired request");
    }
}

/// Callers' grants kept per connection at most (dropped whole when full).
const MAX_GRANTS: usize = 10_000;

/// What one connection has seen: replay caches per sender, and the grants
/// of callers (verified against the agent's own trust anchors).
#[derive(Debug, Default)]
pub(crate) struct Seen {
    replay: HashMap<AgentId, NonceCache>,
    grants: HashMap<PublicKey, Grant>,
}

/// With trust anchors, a call runs only if the caller's grant (sent by the
/// broker before the first call, verified here) binds its id to its key
/// and allows this tool on this agent: a broker can drop calls but cannot
/// make the agent run one the operator did not grant.
fn check_caller(
    inner: &Inner,
    seen: &Seen,
    caller: &AgentId,
    signer: &PublicKey,
    tool: &fem_proto::Capability,
) -> Result<(), String> {
    if inner.opts.trust_anchors.is_empty() {
        return Ok(());
    }
    let g = seen
        .grants
        .get(signer)
        .ok_or_else(|| format!("no valid grant of caller {caller} reached this agent"))?;
    if fem_proto::now_ms() >= g.expires_ms {
        return Err(format!("the grant of caller {caller} expired"));
    }
    if !g.may_register(caller) {
        return Err(format!(
            "the caller's grant does not bind id {caller} to its key"
        ));
    }
    if !g.may_call(tool, &inner.id) {
        return Err(format!(
            "the grant of caller {caller} does not allow {tool} on {}",
            inner.id
        ));
    }
    Ok(())
}

/// Runs a proven call once its caller's grant allows it (with anchors),
/// else answers PERMISSION_DENIED.
fn run_call(
    inner: &Arc<Inner>,
    epoch: u64,
    how: Sealing,
    p: Proven,
    sem: &Arc<Semaphore>,
    seen: &Seen,
) {
    let caller = &p.header.sender;
    if let Err(why) = check_caller(inner, seen, caller, &p.signer, &p.call.tool) {
        let attested = p.attested_by.is_some();
        warn!(%caller, attested, %why, "call refused end to end");
        return reply_error(
            inner,
            epoch,
            how,
            p.call.request_id,
            p.header.sender,
            ErrorCode::PermissionDenied,
            why,
        );
    }
    serve_call(inner, epoch, how, p, sem);
}

/// Nonces kept per sender within the 60 s replay window. Brokers leave
/// nonces to recipients, so this is the one replay limit on a sender's
/// envelopes to this client: about 66,000 a second sustained (the broker
/// routes far fewer); beyond it `RATE_LIMITED`. At most about 80 MB for a
/// sender that fills it (one set of 16-byte nonces per second).
const MAX_NONCES_PER_SENDER: usize = 4_000_000;

/// Most frames handled as one batch.
pub(crate) const MAX_BATCH: usize = 64;

/// Handles frames that arrived together, in order, as [`handle_inbound`]
/// does one by one, except that the signatures of the delivered envelopes
/// among them are verified as one batch first (one rule, so each result is
/// the one a single check gives: a forged envelope is still refused alone).
/// Fewer than two deliveries take the single path. `frames` is left empty
/// (the reader keeps its buffer). False ends the connection.
pub(crate) fn handle_frames(
    inner: &Arc<Inner>,
    frames: &mut Vec<Frame>,
    epoch: u64,
    wtx: &mpsc::Sender<Frame>,
    sem: &Arc<Semaphore>,
    seen: &mut Seen,
) -> bool {
    let delivered = frames.iter().filter_map(|f| match f {
        Frame::Deliver { envelope, signer } => Some((envelope, signer)),
        _ => None,
    });
    if delivered.clone().count() < 2 {
        return frames
            .drain(..)
            .all(|f| handle_inbound(inner, f, epoch, wtx, sem, seen));
    }
    let mut checked = SignedEnvelope::verify_batch(delivered).into_iter();
    for f in frames.drain(..) {
        let go_on = match f {
            Frame::Deliver { envelope, signer } => {
                let result = checked.next().unwrap_or(Err(ProtoError::InvalidSignature));
                deliver(inner, &envelope, result, signer, epoch, sem, seen)
            }
            other => handle_inbound(inner, other, epoch, wtx, sem, seen),
        };
        if !go_on {
            return false;
        }
    }
    true
}

/// A delivered envelope whose signature was checked (alone or in a batch):
/// dropped when the check failed, then replay-checked and dispatched.
fn deliver(
    inner: &Arc<Inner>,
    signed: &SignedEnvelope,
    checked: Result<Envelope, ProtoError>,
    signer: PublicKey,
    epoch: u64,
    sem: &Arc<Semaphore>,
    seen: &mut Seen,
) -> bool {
    let how = Sealing {
        format: signed.format,
        attested: false,
    };
    let env = match checked {
        Ok(env) => env,
        Err(e) => {
            warn!(error = %e, "refusing an envelope whose signature does not verify");
            // Brokers leave signatures to recipients: a call that does not
            // verify is answered (to the session that sent it, which the
            // broker checked) so its slot is freed at once.
            if let Ok(Envelope {
                header,
                body: Body::ToolCall(c),
            }) = signed.open()
            {
                reply_error(
                    inner,
                    epoch,
                    how,
                    c.request_id,
                    header.sender,
                    ErrorCode::InvalidSignature,
                    "the call's signature does not verify with the caller's key".into(),
                );
            }
            return true;
        }
    };
    let cache = seen
        .replay
        .entry(env.header.sender.clone())
        .or_insert_with(|| {
            NonceCache::new(fem_proto::DEFAULT_REPLAY_WINDOW_MS, MAX_NONCES_PER_SENDER)
        });
    if let Err(e) = cache.check(
        env.header.timestamp_ms,
        &env.header.nonce,
        fem_proto::now_ms(),
    ) {
        warn!(error = %e, sender = %env.header.sender, "dropping a replayed or stale envelope");
        if let Body::ToolCall(c) = &env.body {
            reply_error(
                inner,
                epoch,
                how,
                c.request_id,
                env.header.sender.clone(),
                e.code(),
                e.to_string(),
            );
        }
        return true;
    }
    let Envelope { header, body } = env;
    match body {
        Body::ToolCall(call) => {
            let call = Proven {
                header,
                signer,
                call,
                attested_by: None,
            };
            run_call(inner, epoch, how, call, sem, seen);
        }
        Body::ToolResult(r) => {
            if r.caller == inner.id {
                resolve(inner, &r.request_id, result_reply(r.outcome));
            }
        }
        Body::ToolsDiscovered(d) => {
            let trusted = *lock(&inner.broker_key) == Some(signer);
            let reply = if trusted {
                serde_json::to_value(&d.tools)
                    .map(|tools| serde_json::json!({"tools": tools, "nextCursor": d.next_cursor}))
                    .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))
            } else {
                Err(CallError::local(
                    ErrorCode::InvalidSignature,
                    "discovery answer not signed by the broker",
                ))
            };
            resolve(inner, &d.request_id, reply);
        }
        Body::EmitEvent(ev) => publish(inner, header.sender, ev, None),
        other => debug!(kind = %other.kind(), "ignoring delivered envelope"),
    }
    true
}

fn result_reply(outcome: ToolOutcome) -> Reply {
    match outcome {
        ToolOutcome::Success(v) => v.parse().map_err(|e| {
            CallError::local(
                ErrorCode::BadRequest,
                format!("agent sent invalid JSON: {e}"),
            )
        }),
        ToolOutcome::Error { code, message } => Err(CallError {
            code,
            message,
            origin: Origin::Agent,
        }),
    }
}

/// Hands an event to the topic's subscribers; an attested one (`by` the
/// broker that vouched for its sender) only to those that accept them.
fn publish(inner: &Inner, sender: AgentId, ev: fem_proto::EmitEvent, by: Option<AgentId>) {
    let payload = ev.payload.parse().unwrap_or(serde_json::Value::Null);
    let mut subs = lock(&inner.subs);
    if let Some(list) = subs.get_mut(&ev.topic) {
        list.retain(|sub| {
            if by.is_some() && !sub.attested {
                return true;
            }
            sub.tx
                .try_send(Event {
                    sender: sender.clone(),
                    topic: ev.topic.clone(),
                    payload: payload.clone(),
                    attested_by: by.clone(),
                })
                .is_ok()
                || !sub.tx.is_closed()
        });
    }
}

/// An unsigned envelope the broker attests (broker-attested mode): no
/// signature or nonce to check; the session with the broker vouches for
/// it. A call still passes the tool's own opt-in and, with trust anchors,
/// the caller's grant; a result is taken only for an attested call.
fn attested(
    inner: &Arc<Inner>,
    envelope: &fem_proto::UnsignedEnvelope,
    signer: PublicKey,
    by: AgentId,
    epoch: u64,
    sem: &Arc<Semaphore>,
    seen: &Seen,
) {
    let how = Sealing {
        format: envelope.format,
        attested: true,
    };
    let Envelope { header, body } = match envelope.open() {
        Ok(env) => env,
        Err(e) => {
            warn!(error = %e, "dropping an attested envelope that does not decode");
            return;
        }
    };
    match body {
        Body::ToolCall(call) => {
            let call = Proven {
                header,
                signer,
                call,
                attested_by: Some(by),
            };
            run_call(inner, epoch, how, call, sem, seen);
        }
        Body::ToolResult(r) if r.caller == inner.id => {
            let attested_call = lock(&inner.pending)
                .get(&r.request_id)
                .is_some_and(|c| c.attested);
            let reply = if attested_call {
                result_reply(r.outcome)
            } else {
                Err(CallError::local(
                    ErrorCode::InvalidSignature,
                    format!("the result of a signed call came unsigned (attested by {by})"),
                ))
            };
            resolve(inner, &r.request_id, reply);
        }
        Body::EmitEvent(ev) => publish(inner, header.sender, ev, Some(by)),
        other => debug!(kind = %other.kind(), "ignoring attested envelope"),
    }
}

/// Handles one frame from the broker; false ends the connection.
pub(crate) fn handle_inbound(
    inner: &Arc<Inner>,
    frame: Frame,
    epoch: u64,
    wtx: &mpsc::Sender<Frame>,
    sem: &Arc<Semaphore>,
    seen: &mut Seen,
) -> bool {
    match frame {
        Frame::Grant(g) => {
            if !inner.opts.trust_anchors.is_empty() {
                match g.verify(&inner.opts.trust_anchors, fem_proto::now_ms()) {
                    Ok(v) => {
                        if seen.grants.len() >= MAX_GRANTS {
                            seen.grants.clear();
                        }
                        seen.grants.insert(v.grant.subject, v.grant);
                    }
                    Err(e) => {
                        warn!(error = %e, "a caller's grant from the broker does not verify; ignored")
                    }
                }
            }
            true
        }
        Frame::Deliver { envelope, signer } => {
            let checked = envelope.verify(&signer);
            deliver(inner, &envelope, checked, signer, epoch, sem, seen)
        }
        Frame::Attested {
            envelope,
            signer,
            attested_by,
        } => {
            attested(inner, &envelope, signer, attested_by, epoch, sem, seen);
            true
        }
        Frame::CallFailed {
            request_id,
            code,
            message,
        } => {
            resolve(
                inner,
                &request_id,
                Err(CallError {
                    code,
                    message,
                    origin: Origin::Broker,
                }),
            );
            true
        }
        Frame::Ack { nonce } => {
            if let Some((_, tx)) = lock(&inner.acks).remove(&nonce) {
                let _ = tx.send(Ok(()));
            }
            true
        }
        Frame::Nack {
            nonce,
            code,
            message,
        } => {
            if let Some((_, tx)) = lock(&inner.acks).remove(&nonce) {
                let _ = tx.send(Err(CallError {
                    code,
                    message,
                    origin: Origin::Broker,
                }));
            }
            true
        }
        Frame::Heartbeat { seq } => {
            let _ = wtx.try_send(Frame::HeartbeatAck { seq });
            true
        }
        Frame::HeartbeatAck { .. } | Frame::Accepted(_) => true,
        Frame::Error { code, message } => {
            warn!(%code, %message, "broker closed the session");
            false
        }
        Frame::Denied { code, reason } => {
            warn!(%code, %reason, "broker denied the session");
            false
        }
        Frame::Cancel { request_id } => {
            // The caller cancelled (or left): the handler's future is
            // dropped, which for fem-coder kills the process group it runs.
            if let Some(h) = lock(&inner.running).remove(&request_id) {
                debug!(request = %request_id, "call cancelled by the broker");
                h.abort();
            }
            true
        }
        Frame::Progress { request_id, update } => {
            if let Some(tx) = lock(&inner.pending)
                .get(&request_id)
                .and_then(|c| c.progress.as_ref())
            {
                let _ = tx.try_send(update);
            }
            true
        }
        Frame::Envelope(_)
        | Frame::Unsigned(_)
        | Frame::Subscribe { .. }
        | Frame::Unsubscribe { .. } => {
            debug!("ignoring a client-only frame from the broker");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use fem_proto::{Header, JsonText, SigningKey, ToolResult};
    use tokio::sync::oneshot;

    use super::*;
    use crate::Options;
    use crate::connection::PendingCall;

    fn caller() -> Arc<Inner> {
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let (_, finished) = tokio::sync::watch::channel(false);
        Arc::new(Inner {
            id: AgentId::new("caller-1").unwrap(),
            key: SigningKey::generate(),
            opts: Options::new("https://127.0.0.1:1").unwrap(),
            writer: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
            tools: Mutex::new(BTreeMap::new()),
            capabilities: Mutex::new(Vec::new()),
            metadata: BTreeMap::new(),
            max_concurrent: 1,
            handler_timeout: std::time::Duration::from_secs(1),
            metrics: None,
            broker_key: Mutex::new(None),
            broker_id: Mutex::new(None),
            max_envelope: std::sync::atomic::AtomicUsize::new(fem_proto::DEFAULT_MAX_FRAME),
            shutdown,
            finished,
        })
    }

    /// A toolResult for `id` from `agent`, as the broker delivers it.
    fn result(agent: &SigningKey, id: RequestId, n: u64) -> Frame {
        let env = Envelope::new(
            Header::now(AgentId::new("agent-1").unwrap()),
            Body::ToolResult(ToolResult {
                request_id: id,
                caller: AgentId::new("caller-1").unwrap(),
                outcome: ToolOutcome::Success(JsonText::from_value(&serde_json::json!({"n": n}))),
            }),
        );
        Frame::Deliver {
            envelope: SignedEnvelope::sign(&env, agent).unwrap(),
            signer: agent.public_key(),
        }
    }

    #[test]
    fn a_batch_with_one_forged_envelope_dispatches_the_good_ones() {
        let inner = caller();
        let agent = SigningKey::generate();
        let mut waiting = Vec::new();
        let mut frames = Vec::new();
        for n in 0..4u64 {
            let id = RequestId::random();
            let (tx, rx) = oneshot::channel();
            lock(&inner.pending).insert(
                id,
                PendingCall {
                    epoch: 1,
                    tx,
                    progress: None,
                    attested: false,
                },
            );
            waiting.push((id, rx));
            let mut f = result(&agent, id, n);
            if n == 2
                && let Frame::Deliver { envelope, .. } = &mut f
            {
                envelope.signature.0[40] ^= 1;
            }
            frames.push(f);
        }
        frames.insert(1, Frame::Heartbeat { seq: 9 });
        let (wtx, mut wrx) = mpsc::channel(8);
        let sem = Arc::new(Semaphore::new(1));
        let mut seen = Seen::default();
        assert!(handle_frames(&inner, &mut frames, 1, &wtx, &sem, &mut seen));

        for (n, (id, mut rx)) in waiting.into_iter().enumerate() {
            if n == 2 {
                // Refused: the call still waits for a genuine answer.
                assert!(rx.try_recv().is_err());
                assert!(lock(&inner.pending).contains_key(&id));
            } else {
                let v = rx.try_recv().unwrap().unwrap();
                assert_eq!(v, serde_json::json!({"n": n}));
            }
        }
        // Other frames of the batch are still handled, in order.
        assert!(matches!(wrx.try_recv(), Ok(Frame::HeartbeatAck { seq: 9 })));
    }

    /// Handles one frame of connection 1 with a fresh state and one slot.
    fn handle_alone(inner: &Arc<Inner>, frame: Frame, wtx: &mpsc::Sender<Frame>) -> bool {
        let sem = Arc::new(Semaphore::new(1));
        handle_inbound(inner, frame, 1, wtx, &sem, &mut Seen::default())
    }

    /// `env` as a broker delivers it attested (no signature) by `broker-x`.
    fn attested_frame(env: &Envelope, signer: PublicKey) -> Frame {
        Frame::Attested {
            envelope: fem_proto::UnsignedEnvelope::encode(env).unwrap(),
            signer,
            attested_by: AgentId::new("broker-x").unwrap(),
        }
    }

    /// A broker that forges an unsigned result for a signed call: the
    /// caller gets INVALID_SIGNATURE, never the forged value.
    #[test]
    fn a_signed_call_takes_no_unsigned_result() {
        let inner = caller();
        let id = RequestId::random();
        let (tx, mut rx) = oneshot::channel();
        lock(&inner.pending).insert(
            id,
            PendingCall {
                epoch: 1,
                tx,
                progress: None,
                attested: false,
            },
        );
        let forged = Envelope::new(
            Header::now(AgentId::new("agent-1").unwrap()),
            Body::ToolResult(ToolResult {
                request_id: id,
                caller: AgentId::new("caller-1").unwrap(),
                outcome: ToolOutcome::Success(JsonText::from_value(&serde_json::json!("forged"))),
            }),
        );
        let (wtx, _wrx) = mpsc::channel(8);
        let frame = attested_frame(&forged, SigningKey::generate().public_key());
        assert!(handle_alone(&inner, frame, &wtx));
        let e = rx.try_recv().unwrap().unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidSignature, "{e}");
    }

    /// A broker that delivers an attested call to a tool that did not opt
    /// in: the agent refuses it itself and the handler never runs.
    #[test]
    fn a_tool_that_did_not_opt_in_refuses_attested_calls() {
        let inner = caller();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let tool = crate::Tool::new("strict", "", serde_json::json!({}), move |_| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok(serde_json::json!(1)) }
        })
        .unwrap();
        lock(&inner.tools).insert(tool.spec.name.clone(), Arc::new(tool));
        let (wtx, mut wrx) = mpsc::channel(8);
        *lock(&inner.writer) = Some((1, wtx.clone()));
        let call = Envelope::new(
            Header::now(AgentId::new("mallory").unwrap()),
            Body::ToolCall(fem_proto::ToolCall {
                request_id: RequestId::random(),
                target: fem_proto::Target::Agent(inner.id.clone()),
                tool: fem_proto::Capability::new("strict").unwrap(),
                parameters: JsonText::new("{}").unwrap(),
                deadline_ms: fem_proto::now_ms() + 5_000,
                audience: None,
            }),
        );
        let frame = attested_frame(&call, SigningKey::generate().public_key());
        assert!(handle_alone(&inner, frame, &wtx));
        let Ok(Frame::Unsigned(answer)) = wrx.try_recv() else {
            panic!("no unsigned answer");
        };
        let Body::ToolResult(r) = answer.open().unwrap().body else {
            panic!("not a result");
        };
        assert!(
            matches!(
                r.outcome,
                ToolOutcome::Error {
                    code: ErrorCode::PermissionDenied,
                    ..
                }
            ),
            "{:?}",
            r.outcome
        );
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
