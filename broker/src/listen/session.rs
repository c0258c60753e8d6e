//! One client connection: registration, then envelopes until it ends. The
//! session admits what it reads and hands it to the routing core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fem_net::wire::{FrameReader, ReadError, write_loop};
use fem_proto::{Accepted, AgentId, Body, Carried, ErrorCode, Frame, PublicKey, RegisterAgent};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::route::admission::{self, Credential, Entry, Refusal, Refused, Signer};
use crate::route::{Arrival, ClientId, Incoming, Profile, Registration, ReplyTo};
use crate::state::{ClientHandle, Shared};

/// The registered identity of a session.
struct Identity {
    client: ClientId,
    handle: Arc<ClientHandle>,
    id: AgentId,
    key: PublicKey,
    /// Its verified grant (with a trust anchor).
    credential: Option<Arc<Credential>>,
    /// Its place among `--max-connections`.
    _slot: OwnedSemaphorePermit,
    /// Its event publication rate (`--event-rate`).
    events: std::sync::Mutex<crate::budget::TokenBucket>,
}

/// Serves one connection until it closes, is evicted or the broker stops.
pub(crate) async fn run<R, W>(
    shared: Arc<Shared>,
    reader: R,
    writer: W,
    transport: &'static str,
    peer: SocketAddr,
    pending: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("session", %peer, transport, agent = tracing::field::Empty);
    async move {
        let max = shared.config.max_frame;
        let (tx, rx) = shared.outbox();
        let writer_task = tokio::spawn(
            async move {
                if let Err(e) = write_loop(rx, writer, max).await {
                    debug!(error = %e, "writer ended");
                }
            }
            .in_current_span(),
        );
        // Until it registers, a connection may send only small frames.
        let mut reader = FrameReader::new(reader, shared.config.limits.max_registration_bytes);
        shared
            .metrics
            .connections
            .with_label_values(&[transport])
            .inc();
        let (client, handle) = shared.add_client(tx.clone());
        match register(&shared, client, &handle, &mut reader, transport, pending).await {
            Ok(me) => {
                tracing::Span::current().record("agent", me.id.as_str());
                reader.set_max(max);
                serve(&shared, &me, &mut reader).await;
            }
            Err((code, reason)) => {
                shared
                    .metrics
                    .registrations
                    .with_label_values(&[code.as_str()])
                    .inc();
                info!(%code, %reason, "registration refused");
                let _ = tx.push(Frame::Denied { code, reason });
            }
        }
        shared.remove_client(client);
        drop(tx);
        drop(reader);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
        shared
            .metrics
            .connections
            .with_label_values(&[transport])
            .dec();
    }
    .instrument(span)
    .await;
}

async fn register<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    client: ClientId,
    handle: &Arc<ClientHandle>,
    reader: &mut FrameReader<R>,
    transport: &'static str,
    pending: OwnedSemaphorePermit,
) -> Result<Identity, Refusal> {
    let refused = |r: Refusal| {
        shared.metrics.refused(r.0.as_str());
        r
    };
    let deadline = tokio::time::Instant::now() + shared.config.registration_timeout;
    let mut presented = None;
    let signed = loop {
        let frame = tokio::time::timeout_at(deadline, reader.next())
            .await
            .map_err(|_| {
                refused((
                    ErrorCode::NotRegistered,
                    "no registerAgent within the registration timeout".to_owned(),
                ))
            })?
            .map_err(|e| refused(read_refusal(&e)))?
            .ok_or_else(|| {
                refused((
                    ErrorCode::NotRegistered,
                    "connection closed before registering".to_owned(),
                ))
            })?;
        match frame {
            // A grant may precede the registration, once.
            Frame::Grant(g) if presented.is_none() => presented = Some(g),
            Frame::Envelope(signed) => break signed,
            _ => {
                return Err(refused((
                    ErrorCode::NotRegistered,
                    "the first frame must be a signed registerAgent (after an optional grant)"
                        .to_owned(),
                )));
            }
        }
    };
    let admitted = admission::admit(
        &signed,
        Signer::Registration,
        None,
        Entry::Client,
        &shared.replay,
        &shared.metrics,
    )
    .map_err(|r| r.refusal)?;
    let id = admitted.env.header.sender.clone();
    let Body::RegisterAgent(reg) = admitted.env.body else {
        return Err(refused((
            ErrorCode::NotRegistered,
            format!(
                "the first envelope must be registerAgent, not {}",
                admitted.env.kind()
            ),
        )));
    };
    admission::validate_profile(
        &shared.config.limits,
        &reg.capabilities,
        &reg.tools,
        Some(&reg.metadata),
    )
    .map_err(|r| {
        shared.metrics.limit_hit("registration");
        refused(r)
    })?;
    let credential = if shared.trust.enforced() {
        let Some(g) = presented else {
            return Err(refused((
                ErrorCode::PermissionDenied,
                "this broker has a trust anchor: present a grant (--grant) before registerAgent"
                    .to_owned(),
            )));
        };
        let c = shared.trust.verify(&g).map_err(refused)?;
        admission::check_registration(
            &c.grant,
            &id,
            &reg.public_key,
            &reg.capabilities,
            &reg.tools,
        )
        .map_err(refused)?;
        Some(c)
    } else {
        shared.trust.bind(&id, &reg.public_key).map_err(refused)?;
        None
    };
    // Registered sessions hold one of --max-connections; the unregistered
    // budget is handed back.
    let slot = Arc::clone(&shared.conn_limit)
        .try_acquire_owned()
        .map_err(|_| {
            shared.metrics.limit_hit("max_connections");
            refused((
                ErrorCode::TooManyConnections,
                format!(
                    "connection limit of {} reached",
                    shared.config.max_connections
                ),
            ))
        })?;
    drop(pending);
    let RegisterAgent {
        public_key,
        capabilities,
        tools,
        metadata,
        max_concurrent_calls,
    } = reg;
    let n_tools = tools.len();
    let accepted = Frame::Accepted(Accepted {
        agent_id: id.clone(),
        broker_id: shared.config.broker_id.clone(),
        broker_key: shared.broker_key,
        heartbeat_interval_ms: millis(shared.config.heartbeat_interval),
        grace_ms: millis(shared.config.heartbeat_grace),
        max_frame: u32::try_from(shared.config.max_frame).unwrap_or(u32::MAX),
    });
    shared
        .route(|r, now| {
            r.register(
                now,
                Registration {
                    client,
                    id: id.clone(),
                    key: public_key,
                    transport,
                    max_concurrent: max_concurrent_calls,
                    profile: Profile {
                        capabilities,
                        tools,
                        metadata,
                    },
                    accepted,
                },
            )
        })
        .map_err(refused)?;
    if let Ok(mut c) = handle.credential.lock() {
        c.clone_from(&credential);
    }
    info!(agent = %id, key = %public_key.fingerprint(), tools = n_tools, "agent registered");
    Ok(Identity {
        client,
        handle: Arc::clone(handle),
        id,
        key: public_key,
        credential,
        _slot: slot,
        events: std::sync::Mutex::new(crate::budget::TokenBucket::new(
            shared.config.limits.event_rate,
            fem_proto::now_ms(),
        )),
    })
}

impl Identity {
    fn grant(&self) -> Option<&fem_proto::Grant> {
        self.credential.as_deref().map(|c| &c.grant)
    }

    /// Event size, rate and the memory budget (each hit counted).
    fn may_emit(&self, shared: &Shared, bytes: usize) -> Result<(), Refusal> {
        let limits = &shared.config.limits;
        if bytes > limits.max_event_bytes {
            shared.metrics.limit_hit("max_event_bytes");
            return Err((
                ErrorCode::TooLarge,
                format!(
                    "event of {bytes} bytes; the limit is {} (--max-event-bytes)",
                    limits.max_event_bytes
                ),
            ));
        }
        let taken = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(fem_proto::now_ms(), limits.event_rate, limits.event_rate);
        if !taken {
            shared.metrics.limit_hit("event_rate");
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "more than {} events a second (--event-rate)",
                    limits.event_rate
                ),
            ));
        }
        shared.check_budget()
    }
}

/// The pseudo-tool a call rule names to allow renderInstructions to agents.
fn render_tool() -> fem_proto::Capability {
    fem_proto::Capability::new("render").unwrap_or_else(|_| unreachable!())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn read_refusal(e: &ReadError) -> Refusal {
    match e {
        ReadError::Proto(p) => (p.code(), p.to_string()),
        other => (ErrorCode::BadRequest, format!("read failed: {other}")),
    }
}

async fn serve<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    me: &Identity,
    reader: &mut FrameReader<R>,
) {
    let send = |f: Frame| me.handle.send(f, &shared.metrics);
    let grace = shared.config.heartbeat_grace;
    let mut shutdown = shared.shutdown_signal();
    // A session lives no longer than its grant: at expiry it is closed (its
    // calls answered), and the client reconnects with a fresh grant.
    let expires_ms = me.grant().map(|g| g.expires_ms);
    let expiry = async {
        match expires_ms {
            Some(ms) => {
                let left = ms.saturating_sub(fem_proto::now_ms());
                tokio::time::sleep(Duration::from_millis(left)).await;
            }
            None => std::future::pending().await,
        }
    };
    // Every future but the read lives across frames: made per frame, each
    // would register and unregister a waiter (a lock each) per frame.
    let closed = me.handle.close.notified();
    let stopping = shutdown.wait_for(|s| *s);
    // The silence deadline is moved only when it fires (to the last frame
    // plus the grace), not re-armed in the timer wheel on every frame.
    let silence = tokio::time::sleep(grace);
    let mut last_frame = tokio::time::Instant::now();
    tokio::pin!(expiry, closed, stopping, silence);
    loop {
        let frame = tokio::select! {
            () = &mut expiry => {
                info!(agent = %me.id, "grant expired; closing the session");
                shared.metrics.refused(ErrorCode::PermissionDenied.as_str());
                send(Frame::Error {
                    code: ErrorCode::PermissionDenied,
                    message: format!(
                        "your grant expired at {} ms since the epoch; reconnect with a fresh grant",
                        expires_ms.unwrap_or_default()
                    ),
                });
                return;
            }
            () = &mut closed => {
                let (code, message) = me.handle.take_reason().unwrap_or_else(|| (ErrorCode::AgentUnavailable, "session closed by the broker".into()));
                send(Frame::Error { code, message });
                return;
            }
            _ = &mut stopping => {
                send(Frame::Error { code: ErrorCode::ShuttingDown, message: "broker shutting down".into() });
                return;
            }
            () = &mut silence => {
                let due = last_frame + grace;
                if due > tokio::time::Instant::now() {
                    silence.as_mut().reset(due);
                    continue;
                }
                warn!(agent = %me.id, grace_ms = millis(grace), "agent silent past its grace period; evicting");
                shared.metrics.refused("HEARTBEAT_TIMEOUT");
                return;
            }
            r = reader.next() => r,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => {
                debug!("connection closed by peer");
                return;
            }
            Err(e) => {
                let (code, message) = read_refusal(&e);
                if matches!(e, ReadError::Proto(_)) {
                    info!(%code, %message, "bad frame; closing connection");
                    shared.metrics.refused(code.as_str());
                    send(Frame::Error { code, message });
                } else {
                    debug!(%message, "connection lost");
                }
                return;
            }
        };
        last_frame = tokio::time::Instant::now();
        me.handle
            .last_seen_ms
            .store(fem_proto::now_ms(), Ordering::Relaxed);
        match frame {
            Frame::Heartbeat { seq } => {
                send(Frame::HeartbeatAck { seq });
            }
            Frame::HeartbeatAck { .. } => {}
            Frame::Envelope(signed) => {
                if !handle_envelope(shared, me, Carried::Signed(signed)) {
                    return;
                }
            }
            Frame::Unsigned(envelope) => {
                let by = shared.config.broker_id.clone();
                if !handle_envelope(shared, me, Carried::Attested { envelope, by }) {
                    return;
                }
            }
            Frame::Subscribe { nonce, topic } => {
                // Reading a topic is calling it: a call rule must cover it.
                if me.grant().is_some_and(|g| !g.may_call_somewhere(&topic)) {
                    send(Frame::Nack {
                        nonce,
                        code: ErrorCode::PermissionDenied,
                        message: format!("your grant does not allow subscribing to {topic}"),
                    });
                    continue;
                }
                shared.route(|r, _| r.subscribe(me.client, &me.id, topic));
                send(Frame::Ack { nonce });
            }
            Frame::Unsubscribe { nonce, topic } => {
                shared.route(|r, _| r.unsubscribe(&me.id, &topic));
                send(Frame::Ack { nonce });
            }
            Frame::Cancel { request_id } => {
                shared.route(|r, now| r.cancel(now, me.client, request_id));
            }
            Frame::Progress { request_id, update } => {
                shared.route(|r, now| r.progress(now, me.client, request_id, update));
            }
            other => {
                let message = format!("unexpected frame from a client: {}", frame_name(&other));
                shared.metrics.refused("BAD_REQUEST");
                send(Frame::Error {
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
        Frame::Grant(_) => "grant",
        Frame::Cancel { .. } => "cancel",
        Frame::Progress { .. } => "progress",
        Frame::Unsigned(_) => "unsigned",
        Frame::Attested { .. } => "attested",
    }
}

/// Admits and dispatches one envelope, signed or (broker-attested mode)
/// unsigned; false closes the session.
fn handle_envelope(shared: &Arc<Shared>, me: &Identity, signed: Carried) -> bool {
    let send = |f: Frame| me.handle.send(f, &shared.metrics);
    let signer = Signer::Session {
        id: &me.id,
        key: &me.key,
    };
    let admitted = match admission::admit(
        &signed,
        signer,
        None,
        Entry::Client,
        &shared.replay,
        &shared.metrics,
    ) {
        Ok(a) => a,
        Err(Refused {
            refusal: (code, message),
            env: None,
        }) => {
            // Not even an envelope: the connection is unusable.
            send(Frame::Error { code, message });
            return false;
        }
        Err(Refused {
            refusal: (code, message),
            env: Some(env),
        }) => {
            debug!(%code, %message, kind = env.kind().as_str(), "envelope refused");
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
            send(frame);
            return true;
        }
    };
    let (header, body) = (admitted.env.header, admitted.env.body);
    // Only what a recipient checks for itself may travel unsigned: calls
    // (to tools that accept them), their results and events.
    if signed.is_attested()
        && !matches!(
            body,
            Body::ToolCall(_) | Body::ToolResult(_) | Body::EmitEvent(_)
        )
    {
        let message = format!("a {} must be signed", body.kind());
        shared.metrics.refused("BAD_REQUEST");
        send(match &body {
            Body::DiscoverTools(d) => Frame::CallFailed {
                request_id: d.request_id,
                code: ErrorCode::BadRequest,
                message,
            },
            _ => Frame::Nack {
                nonce: header.nonce,
                code: ErrorCode::BadRequest,
                message,
            },
        });
        return true;
    }
    // What cannot cross the next hop is refused here, typed, rather than
    // dropped on the way.
    let max = fem_proto::max_forwarded_envelope(shared.config.max_frame);
    let size = signed.bytes().len();
    if size > max {
        shared.metrics.limit_hit("max_frame_size");
        let message = format!(
            "{} of {} bytes; brokers forward envelopes of at most {max} bytes (--max-frame-size less {} for forwarding)",
            body.kind(),
            size,
            fem_proto::FORWARD_OVERHEAD
        );
        match &body {
            Body::ToolCall(c) => send(Frame::CallFailed {
                request_id: c.request_id,
                code: ErrorCode::TooLarge,
                message,
            }),
            Body::ToolResult(r) => {
                shared.route(|rt, now| {
                    rt.result_failed(now, me.client, r, ErrorCode::TooLarge, message);
                });
            }
            _ => send(Frame::Nack {
                nonce: header.nonce,
                code: ErrorCode::TooLarge,
                message,
            }),
        }
        return true;
    }
    let ack = |r: Result<(), Refusal>| {
        let frame = match r {
            Ok(()) => Frame::Ack {
                nonce: header.nonce,
            },
            Err((code, message)) => Frame::Nack {
                nonce: header.nonce,
                code,
                message,
            },
        };
        send(frame);
    };
    match body {
        Body::ToolCall(call) => {
            let allowed = shared.check_budget().and_then(|()| {
                me.credential
                    .as_deref()
                    .map_or(Ok(()), |c| shared.trust.take_call(c))
            });
            if let Err((code, message)) = allowed {
                shared.metrics.refused(code.as_str());
                send(Frame::CallFailed {
                    request_id: call.request_id,
                    code,
                    message,
                });
                return true;
            }
            let _span = tracing::debug_span!(
                "call",
                request = %call.request_id,
                tool = %call.tool,
                caller = %me.id
            )
            .entered();
            shared.route(|r, now| {
                r.call(
                    now,
                    Incoming {
                        reply: ReplyTo::Client(me.client),
                        caller: &me.id,
                        caller_key: me.key,
                        call: &call,
                        envelope: signed,
                        hops_left: fem_proto::DEFAULT_MAX_HOPS,
                        arrival: Arrival::Entry,
                        credential: me.credential.clone(),
                    },
                );
            });
        }
        Body::ToolResult(result) => {
            shared.route(|r, now| r.result(now, me.client, &result, signed, me.key));
        }
        Body::DiscoverTools(q) => shared.route(|r, _| r.discover(me.client, &q, me.grant())),
        Body::EmitEvent(ev) => {
            // Publishing on a topic is offering it.
            if me.grant().is_some_and(|g| !g.may_offer(&ev.topic)) {
                ack(Err((
                    ErrorCode::PermissionDenied,
                    format!("your grant does not allow publishing on {}", ev.topic),
                )));
                return true;
            }
            if let Err(refusal) = me.may_emit(shared, size) {
                ack(Err(refusal));
                return true;
            }
            shared.route(|r, _| r.emit(&me.id, &ev.topic, &signed, me.key));
            ack(Ok(()));
        }
        Body::RenderInstruction(ri) => {
            if me
                .grant()
                .is_some_and(|g| !g.may_call(&render_tool(), &ri.target))
            {
                ack(Err((
                    ErrorCode::PermissionDenied,
                    format!("your grant does not allow render on {}", ri.target),
                )));
                return true;
            }
            let Carried::Signed(signed) = signed else {
                return true;
            };
            ack(shared.route(|r, _| r.render(&ri.target, signed, me.key)));
        }
        Body::Revoke(r) => {
            if r.target == me.id {
                info!(agent = %me.id, reason = %r.reason, "agent revoked itself");
                ack(Ok(()));
                return false;
            }
            ack(Err((
                ErrorCode::PermissionDenied,
                "an agent may only revoke itself (operator keys are not configured)".into(),
            )));
        }
        Body::EmbodimentUpdate(u) => {
            let granted = match me.grant() {
                Some(g) => admission::check_offer(
                    g,
                    u.capabilities.as_deref().unwrap_or_default(),
                    &u.tools,
                ),
                None => Ok(()),
            };
            let limits = &shared.config.limits;
            let r = granted
                .and_then(|()| {
                    if size > limits.max_registration_bytes {
                        return Err((
                            ErrorCode::TooLarge,
                            format!(
                                "embodimentUpdate of {} bytes; the limit is {} (--max-registration-bytes)",
                                size,
                                limits.max_registration_bytes
                            ),
                        ));
                    }
                    admission::validate_profile(
                        limits,
                        u.capabilities.as_deref().unwrap_or_default(),
                        &u.tools,
                        u.metadata.as_ref(),
                    )
                })
                .and_then(|()| shared.route(|r, now| r.update_profile(now, me.client, u)));
            if r.is_ok() {
                info!(agent = %me.id, "embodiment updated");
            }
            ack(r);
        }
        Body::RegisterAgent(_) | Body::RegisterBroker(_) | Body::ToolsDiscovered(_) => {
            let kind = body.kind();
            ack(Err((
                ErrorCode::BadRequest,
                format!("{kind} is not accepted on a registered agent session"),
            )));
        }
    }
    true
}
