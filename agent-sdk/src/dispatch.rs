//! Frames from the broker: results and failures to the waiting calls,
//! events to subscribers, calls to the tool handlers.

use std::collections::HashMap;
use std::sync::Arc;

use fem_proto::{
    AgentId, Body, Envelope, ErrorCode, Frame, Grant, NonceCache, PublicKey, RequestId, ToolOutcome,
};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use crate::agent::{reply_error, serve_call};
use crate::caller::Event;
use crate::connection::{Inner, Reply, lock};
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
            let format = envelope.format;
            let env = match envelope.verify(&signer) {
                Ok(env) => env,
                Err(e) => {
                    warn!(error = %e, "dropping an envelope whose signature does not verify");
                    return true;
                }
            };
            let cache = seen
                .replay
                .entry(env.header.sender.clone())
                .or_insert_with(|| NonceCache::new(fem_proto::DEFAULT_REPLAY_WINDOW_MS, 1_000_000));
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
                        format,
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
                    if let Err(why) = check_caller(inner, seen, &header.sender, &signer, &call.tool)
                    {
                        warn!(caller = %header.sender, %why, "call refused end to end");
                        reply_error(
                            inner,
                            epoch,
                            format,
                            call.request_id,
                            header.sender,
                            ErrorCode::PermissionDenied,
                            why,
                        );
                        return true;
                    }
                    serve_call(inner, epoch, format, header, signer, call, sem);
                }
                Body::ToolResult(r) => {
                    let reply = match r.outcome {
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
                    };
                    if r.caller == inner.id {
                        resolve(inner, &r.request_id, reply);
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
                Body::EmitEvent(ev) => {
                    let payload = ev.payload.parse().unwrap_or(serde_json::Value::Null);
                    let mut subs = lock(&inner.subs);
                    if let Some(list) = subs.get_mut(&ev.topic) {
                        list.retain(|tx| {
                            tx.try_send(Event {
                                sender: header.sender.clone(),
                                topic: ev.topic.clone(),
                                payload: payload.clone(),
                            })
                            .is_ok()
                                || !tx.is_closed()
                        });
                    }
                }
                other => debug!(kind = %other.kind(), "ignoring delivered envelope"),
            }
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
        Frame::Envelope(_) | Frame::Subscribe { .. } | Frame::Unsubscribe { .. } => {
            debug!("ignoring a client-only frame from the broker");
            true
        }
    }
}
