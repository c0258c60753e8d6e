//! Frames from the broker: results and failures to the waiting calls,
//! events to subscribers, calls to the tool handlers.

use std::collections::HashMap;
use std::sync::Arc;

use fem_proto::{AgentId, Body, Envelope, ErrorCode, Frame, NonceCache, RequestId, ToolOutcome};
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

/// Handles one frame from the broker; false ends the connection.
pub(crate) fn handle_inbound(
    inner: &Arc<Inner>,
    frame: Frame,
    epoch: u64,
    wtx: &mpsc::Sender<Frame>,
    sem: &Arc<Semaphore>,
    replay: &mut HashMap<AgentId, NonceCache>,
) -> bool {
    match frame {
        Frame::Deliver { envelope, signer } => {
            let format = envelope.format;
            let env = match envelope.verify(&signer) {
                Ok(env) => env,
                Err(e) => {
                    warn!(error = %e, "dropping an envelope whose signature does not verify");
                    return true;
                }
            };
            let cache = replay
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
                Body::ToolCall(call) => serve_call(inner, epoch, format, header, signer, call, sem),
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
        Frame::Envelope(_)
        | Frame::Subscribe { .. }
        | Frame::Unsubscribe { .. }
        | Frame::Grant(_) => {
            debug!("ignoring a client-only frame from the broker");
            true
        }
    }
}
