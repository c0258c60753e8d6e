//! One client connection: registration, then envelopes until it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use fem_net::wire::{FrameReader, ReadError, write_loop};
use fem_proto::{
    Accepted, AgentId, Body, Envelope, ErrorCode, Frame, Header, ProtoError, RegisterAgent,
    SignedEnvelope, ToolSpec,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::core::Shared;
use crate::registry::{AgentEntry, Insert, Profile};

/// Serves one connection until it closes, is evicted or the broker stops.
pub(crate) async fn run<R, W>(
    shared: Arc<Shared>,
    reader: R,
    writer: W,
    transport: &'static str,
    peer: SocketAddr,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("session", %peer, transport, agent = tracing::field::Empty);
    async move {
        let max = shared.config.max_frame;
        let (tx, rx) = mpsc::channel::<Frame>(shared.config.session_queue);
        let writer_task = tokio::spawn(
            async move {
                if let Err(e) = write_loop(rx, writer, max).await {
                    debug!(error = %e, "writer ended");
                }
            }
            .in_current_span(),
        );
        let mut reader = FrameReader::new(reader, max);
        shared
            .metrics
            .connections
            .with_label_values(&[transport])
            .inc();
        let entry = match register(&shared, &mut reader, &tx, transport).await {
            Ok(entry) => Some(entry),
            Err((code, reason)) => {
                shared
                    .metrics
                    .registrations
                    .with_label_values(&[code.as_str()])
                    .inc();
                shared
                    .metrics
                    .refusals
                    .with_label_values(&[code.as_str()])
                    .inc();
                info!(%code, %reason, "registration refused");
                let _ = tx.try_send(Frame::Denied { code, reason });
                None
            }
        };
        if let Some(entry) = entry {
            tracing::Span::current().record("agent", entry.id.as_str());
            serve(&shared, &entry, &mut reader, &tx).await;
            shared.unregister(&entry);
        }
        drop(tx);
        drop(reader);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer_task).await;
        shared
            .metrics
            .connections
            .with_label_values(&[transport])
            .dec();
    }
    .instrument(span)
    .await;
}

type Refusal = (ErrorCode, String);

fn refusal(e: &ProtoError) -> Refusal {
    (e.code(), e.to_string())
}

async fn register<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<R>,
    tx: &mpsc::Sender<Frame>,
    transport: &'static str,
) -> Result<Arc<AgentEntry>, Refusal> {
    let first = tokio::time::timeout(shared.config.registration_timeout, reader.next())
        .await
        .map_err(|_| {
            (
                ErrorCode::NotRegistered,
                "no registerAgent within the registration timeout".to_owned(),
            )
        })?
        .map_err(|e| read_refusal(&e))?
        .ok_or_else(|| {
            (
                ErrorCode::NotRegistered,
                "connection closed before registering".to_owned(),
            )
        })?;
    let Frame::Envelope(signed) = first else {
        return Err((
            ErrorCode::NotRegistered,
            "the first frame must be a signed registerAgent".to_owned(),
        ));
    };
    let env = signed.open().map_err(|e| refusal(&e))?;
    let Body::RegisterAgent(reg) = env.body else {
        return Err((
            ErrorCode::NotRegistered,
            format!(
                "the first envelope must be registerAgent, not {}",
                env.body.kind()
            ),
        ));
    };
    let id = env.header.sender.clone();
    signed
        .verify_opened(fem_proto::EnvelopeType::RegisterAgent, &reg.public_key)
        .map_err(|e| refusal(&e))?;
    shared
        .check_replay(&id, &env.header)
        .map_err(|e| refusal(&e))?;
    validate_tools(&reg.tools)?;
    let RegisterAgent {
        public_key,
        capabilities,
        tools,
        metadata,
        max_concurrent_calls,
    } = reg;
    let entry = Arc::new(AgentEntry::new(
        id.clone(),
        public_key,
        shared.next_session_id(),
        tx.clone(),
        transport,
        max_concurrent_calls,
        Profile {
            capabilities,
            tools,
            metadata,
        },
    ));
    match shared.registry.insert(Arc::clone(&entry)) {
        Insert::Conflict => {
            return Err((
                ErrorCode::IdConflict,
                format!("agent id {id} is registered with another public key"),
            ));
        }
        Insert::Done(Some(old)) => {
            info!(agent = %id, "same agent re-registered; closing its previous session");
            shared.fail_calls_to(&old, "agent re-registered on a new connection");
            old.evict.notify_one();
        }
        Insert::Done(None) => shared.metrics.agents_changed(1),
    }
    shared
        .metrics
        .registrations
        .with_label_values(&["accepted"])
        .inc();
    crate::federation::local_changed(shared);
    let accepted = Frame::Accepted(Accepted {
        agent_id: id.clone(),
        broker_id: shared.config.broker_id.clone(),
        broker_key: shared.broker_key,
        heartbeat_interval_ms: millis(shared.config.heartbeat_interval),
        grace_ms: millis(shared.config.heartbeat_grace),
        max_frame: u32::try_from(shared.config.max_frame).unwrap_or(u32::MAX),
    });
    let _ = tx.try_send(accepted);
    info!(agent = %id, key = %public_key.fingerprint(), tools = entry.profile().tools.len(), "agent registered");
    Ok(entry)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn read_refusal(e: &ReadError) -> Refusal {
    match e {
        ReadError::Proto(p) => refusal(p),
        other => (ErrorCode::BadRequest, format!("read failed: {other}")),
    }
}

/// Tool names are unique and schemas are valid JSON Schemas.
pub(crate) fn validate_tools(tools: &[ToolSpec]) -> Result<(), Refusal> {
    let mut names = std::collections::HashSet::new();
    for t in tools {
        if !names.insert(&t.name) {
            return Err((
                ErrorCode::BadRequest,
                format!("tool {} is declared twice", t.name),
            ));
        }
        let schema = t.input_schema.parse().map_err(|e| {
            (
                ErrorCode::BadRequest,
                format!("tool {}: schema is not JSON: {e}", t.name),
            )
        })?;
        jsonschema::validator_for(&schema).map_err(|e| {
            (
                ErrorCode::BadRequest,
                format!("tool {}: invalid JSON Schema: {e}", t.name),
            )
        })?;
    }
    Ok(())
}

async fn serve<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    entry: &Arc<AgentEntry>,
    reader: &mut FrameReader<R>,
    tx: &mpsc::Sender<Frame>,
) {
    let grace = shared.config.heartbeat_grace;
    let mut shutdown = shared.shutdown_signal();
    loop {
        let frame = tokio::select! {
            () = entry.evict.notified() => {
                let _ = tx.try_send(Frame::Error { code: ErrorCode::AgentUnavailable, message: "session closed by the broker".into() });
                return;
            }
            _ = shutdown.wait_for(|s| *s) => {
                let _ = tx.try_send(Frame::Error { code: ErrorCode::ShuttingDown, message: "broker shutting down".into() });
                return;
            }
            r = tokio::time::timeout(grace, reader.next()) => r,
        };
        let frame = match frame {
            Err(_) => {
                warn!(agent = %entry.id, grace_ms = millis(grace), "agent silent past its grace period; evicting");
                shared
                    .metrics
                    .refusals
                    .with_label_values(&["HEARTBEAT_TIMEOUT"])
                    .inc();
                return;
            }
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => {
                debug!("connection closed by peer");
                return;
            }
            Ok(Err(e)) => {
                let (code, message) = read_refusal(&e);
                if matches!(e, ReadError::Proto(_)) {
                    info!(%code, %message, "bad frame; closing connection");
                    shared
                        .metrics
                        .refusals
                        .with_label_values(&[code.as_str()])
                        .inc();
                    let _ = tx.try_send(Frame::Error { code, message });
                } else {
                    debug!(%message, "connection lost");
                }
                return;
            }
        };
        entry
            .last_seen_ms
            .store(fem_proto::now_ms(), std::sync::atomic::Ordering::Relaxed);
        match frame {
            Frame::Heartbeat { seq } => {
                let _ = tx.try_send(Frame::HeartbeatAck { seq });
            }
            Frame::HeartbeatAck { .. } => {}
            Frame::Envelope(signed) => {
                if !handle_envelope(shared, entry, signed, tx) {
                    return;
                }
            }
            Frame::Subscribe { nonce, topic } => {
                shared.subscribe(entry, topic);
                let _ = tx.try_send(Frame::Ack { nonce });
            }
            Frame::Unsubscribe { nonce, topic } => {
                shared.unsubscribe(&entry.id, &topic);
                let _ = tx.try_send(Frame::Ack { nonce });
            }
            other => {
                let message = format!("unexpected frame from a client: {}", frame_name(&other));
                shared
                    .metrics
                    .refusals
                    .with_label_values(&["BAD_REQUEST"])
                    .inc();
                let _ = tx.try_send(Frame::Error {
                    code: ErrorCode::BadRequest,
                    message,
                });
                return;
            }
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Envelope(_) => "envelope",
        Frame::Deliver { .. } => "deliver",
        Frame::Accepted(_) => "accepted",
        Frame::Denied { .. } => "denied",
        Frame::Heartbeat { .. } => "heartbeat",
        Frame::HeartbeatAck { .. } => "heartbeatAck",
        Frame::CallFailed { .. } => "callFailed",
        Frame::Ack { .. } => "ack",
        Frame::Nack { .. } => "nack",
        Frame::Subscribe { .. } => "subscribe",
        Frame::Unsubscribe { .. } => "unsubscribe",
        Frame::Error { .. } => "error",
        Frame::Forward { .. } => "forward",
    }
}

/// Verifies and dispatches one envelope; false closes the session.
fn handle_envelope(
    shared: &Arc<Shared>,
    entry: &Arc<AgentEntry>,
    signed: SignedEnvelope,
    tx: &mpsc::Sender<Frame>,
) -> bool {
    let started = Instant::now();
    shared.metrics.messages_processed_total.inc();
    let env = match signed.open() {
        Ok(env) => env,
        Err(e) => {
            shared
                .metrics
                .envelopes
                .with_label_values(&["unknown", "malformed"])
                .inc();
            let _ = tx.try_send(Frame::Error {
                code: e.code(),
                message: e.to_string(),
            });
            return false;
        }
    };
    let kind = env.kind();
    let refuse = |code: ErrorCode, message: String| {
        shared
            .metrics
            .envelopes
            .with_label_values(&[kind.as_str(), code.as_str()])
            .inc();
        shared
            .metrics
            .refusals
            .with_label_values(&[code.as_str()])
            .inc();
        debug!(%code, %message, kind = kind.as_str(), "envelope refused");
        let frame = match &env.body {
            Body::ToolCall(c) => Frame::CallFailed {
                request_id: c.request_id,
                code,
                message,
            },
            Body::DiscoverTools(d) => Frame::CallFailed {
                request_id: d.request_id,
                code,
                message,
            },
            _ => Frame::Nack {
                nonce: env.header.nonce,
                code,
                message,
            },
        };
        let _ = tx.try_send(frame);
    };
    if env.header.sender != entry.id {
        refuse(
            ErrorCode::PermissionDenied,
            format!(
                "envelope sender {} is not this session's agent {}",
                env.header.sender, entry.id
            ),
        );
        return true;
    }
    if let Err(e) = signed.verify_opened(kind, &entry.key) {
        refuse(e.code(), e.to_string());
        return true;
    }
    if let Err(e) = shared.check_replay(&entry.id, &env.header) {
        refuse(e.code(), e.to_string());
        return true;
    }
    shared
        .metrics
        .verify_seconds
        .observe(started.elapsed().as_secs_f64());
    shared
        .metrics
        .envelopes
        .with_label_values(&[kind.as_str(), "accepted"])
        .inc();
    let Envelope { header, body } = env;
    match body {
        Body::ToolCall(call) => {
            shared.route_call(entry, call, signed, started, fem_proto::DEFAULT_MAX_HOPS);
        }
        Body::ToolResult(result) => shared.deliver_result(entry, result, signed, &header),
        Body::DiscoverTools(q) => shared.discover(entry, &q),
        Body::EmitEvent(ev) => {
            shared.emit(entry, &ev.topic, &signed);
            let _ = tx.try_send(Frame::Ack {
                nonce: header.nonce,
            });
        }
        Body::RenderInstruction(ri) => match shared.registry.get(&ri.target) {
            Some(target) => {
                let _ = target.tx.try_send(Frame::Deliver {
                    envelope: signed,
                    signer: entry.key,
                });
                let _ = tx.try_send(Frame::Ack {
                    nonce: header.nonce,
                });
            }
            None => {
                let _ = tx.try_send(Frame::Nack {
                    nonce: header.nonce,
                    code: ErrorCode::NoRoute,
                    message: format!("no agent {} is registered", ri.target),
                });
            }
        },
        Body::Revoke(r) => {
            if r.target == entry.id {
                info!(agent = %entry.id, reason = %r.reason, "agent revoked itself");
                let _ = tx.try_send(Frame::Ack {
                    nonce: header.nonce,
                });
                return false;
            }
            let _ = tx.try_send(Frame::Nack {
                nonce: header.nonce,
                code: ErrorCode::PermissionDenied,
                message: "an agent may only revoke itself (operator keys are not configured)"
                    .into(),
            });
        }
        Body::EmbodimentUpdate(u) => {
            if let Err((code, message)) = validate_tools(&u.tools) {
                let _ = tx.try_send(Frame::Nack {
                    nonce: header.nonce,
                    code,
                    message,
                });
                return true;
            }
            let mut p = entry.profile();
            p.tools = u.tools;
            if let Some(c) = u.capabilities {
                p.capabilities = c;
            }
            if let Some(m) = u.metadata {
                p.metadata = m;
            }
            shared.registry.update_profile(entry, p);
            crate::federation::local_changed(shared);
            info!(agent = %entry.id, "embodiment updated");
            let _ = tx.try_send(Frame::Ack {
                nonce: header.nonce,
            });
        }
        Body::RegisterAgent(_) | Body::RegisterBroker(_) | Body::ToolsDiscovered(_) => {
            let _ = tx.try_send(Frame::Nack {
                nonce: header.nonce,
                code: ErrorCode::BadRequest,
                message: format!("{kind} is not accepted on a registered agent session"),
            });
        }
    }
    true
}

/// The header of an envelope the broker signs itself.
pub(crate) fn broker_header(id: &AgentId) -> Header {
    Header::now(id.clone())
}
