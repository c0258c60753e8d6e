//! The JSON gateway: POST a signed toolCall (or discoverTools) as JSON and
//! receive the signed toolResult (or toolsDiscovered) in the response.
//!
//! Request body: `{"publicKey": HEX, "envelope": {"format": "json",
//! "bytes": BASE64, "signature": HEX}}` where `bytes` is the JSON envelope
//! and the signature covers `"fem/1 json toolCall\n" || bytes`. The caller
//! is identified by its key, as a registering agent is: an id held by another
//! key is refused. See docs/gateway.md.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fem_proto::{Body, EnvelopeType, ErrorCode, Frame, PublicKey, SignedEnvelope};

use serde::Deserialize;
use serde_json::json;

use crate::route::admission::{self, Credential, Entry, Refused, Signer};
use crate::route::{Arrival, ClientId, Incoming, ReplyTo};
use crate::state::Shared;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GatewayRequest {
    public_key: PublicKey,
    envelope: SignedEnvelope,
    /// The caller's grant in its file form (required with a trust anchor).
    #[serde(default)]
    grant: Option<String>,
}

/// The caller's verified grant with a trust anchor (its id must be within
/// it); without one, the id is bound to the first key that used it.
fn caller_credential(
    s: &Shared,
    sender: &fem_proto::AgentId,
    req: &GatewayRequest,
) -> Result<Option<Arc<Credential>>, admission::Refusal> {
    if !s.trust.enforced() {
        s.trust.check_bound(sender, &req.public_key)?;
        return Ok(None);
    }
    let text = req.grant.as_deref().ok_or_else(|| {
        (
            ErrorCode::PermissionDenied,
            "this broker has a trust anchor: the request needs a \"grant\"".to_owned(),
        )
    })?;
    let signed = fem_proto::SignedGrant::from_text(text)
        .map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
    let c = s.trust.verify(&signed)?;
    if c.grant.subject != req.public_key || !c.grant.may_register(sender) {
        return Err((
            ErrorCode::PermissionDenied,
            format!("the grant does not bind id {sender} to this key"),
        ));
    }
    Ok(Some(c))
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::NoRoute | ErrorCode::ToolNotFound => StatusCode::NOT_FOUND,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::AgentUnavailable | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::RateLimited | ErrorCode::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::PermissionDenied | ErrorCode::IdConflict => StatusCode::FORBIDDEN,
        ErrorCode::InvalidSignature => StatusCode::UNAUTHORIZED,
        ErrorCode::Replayed | ErrorCode::StaleTimestamp => StatusCode::CONFLICT,
        ErrorCode::BadRequest | ErrorCode::NotRegistered => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(s: &Shared, endpoint: &str, code: ErrorCode, message: impl Into<String>) -> Response {
    let status = status_of(code);
    s.metrics
        .gateway_requests
        .with_label_values(&[endpoint, status.as_str()])
        .inc();
    (
        status,
        axum::Json(json!({"error": {"code": code.as_str(), "message": message.into()}})),
    )
        .into_response()
}

pub(crate) async fn call(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    serve(s, body, EnvelopeType::ToolCall, "call").await
}

pub(crate) async fn discover(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    serve(s, body, EnvelopeType::DiscoverTools, "discover").await
}

async fn serve(s: Arc<Shared>, body: Bytes, want: EnvelopeType, endpoint: &str) -> Response {
    let req: GatewayRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                &s,
                endpoint,
                ErrorCode::BadRequest,
                format!("malformed request JSON: {e}"),
            );
        }
    };
    let admitted = match admission::admit(
        &req.envelope,
        Signer::Key(&req.public_key),
        Some(want),
        Entry::Client,
        &s.replay,
        &s.metrics,
    ) {
        Ok(a) => a,
        Err(Refused {
            refusal: (code, message),
            env,
        }) => {
            // A malformed envelope or the wrong type is the request's fault.
            let code = if env.is_none() || code == ErrorCode::BadRequest {
                ErrorCode::BadRequest
            } else {
                code
            };
            return error(&s, endpoint, code, message);
        }
    };
    let max = fem_proto::max_forwarded_envelope(s.config.max_frame);
    if req.envelope.bytes.len() > max {
        s.metrics.limit_hit("max_frame_size");
        let message = format!(
            "envelope of {} bytes; brokers forward envelopes of at most {max} bytes",
            req.envelope.bytes.len()
        );
        return error(&s, endpoint, ErrorCode::TooLarge, message);
    }
    let sender = admitted.env.header.sender.clone();
    let credential = match caller_credential(&s, &sender, &req) {
        Ok(c) => c,
        Err((code, message)) => {
            s.metrics.refused(code.as_str());
            return error(&s, endpoint, code, message);
        }
    };
    let grant = credential.as_deref().map(|c| &c.grant);
    if want == EnvelopeType::ToolCall
        && let Some(Err((code, message))) = credential.as_deref().map(|c| s.trust.take_call(c))
    {
        s.metrics.refused(code.as_str());
        return error(&s, endpoint, code, message);
    }
    if let Err((code, message)) = s.check_budget() {
        return error(&s, endpoint, code, message);
    }
    let answer = match admitted.env.body {
        Body::ToolCall(c) => {
            call_once(&s, &c, None, |reply| Incoming {
                reply,
                caller: &sender,
                caller_key: req.public_key,
                call: &c,
                envelope: fem_proto::Carried::Signed(req.envelope),
                hops_left: fem_proto::DEFAULT_MAX_HOPS,
                arrival: Arrival::Entry,
                credential: credential.clone(),
            })
            .await
        }
        Body::DiscoverTools(q) => discover_once(&s, &q, grant).await,
        _ => return error(&s, endpoint, ErrorCode::BadRequest, "unsupported envelope"),
    };
    match answer {
        Some(Frame::Deliver { envelope, signer }) => {
            let decoded = envelope.open().ok();
            s.metrics
                .gateway_requests
                .with_label_values(&[endpoint, "200"])
                .inc();
            axum::Json(json!({"result": envelope, "signer": signer, "envelope": decoded}))
                .into_response()
        }
        Some(Frame::CallFailed { code, message, .. }) => error(&s, endpoint, code, message),
        Some(other) => error(
            &s,
            endpoint,
            ErrorCode::Internal,
            format!("unexpected answer {other:?}"),
        ),
        None => error(
            &s,
            endpoint,
            ErrorCode::Timeout,
            "no answer before the deadline",
        ),
    }
}

/// Routes an admitted toolCall for a caller without a session (the gateway,
/// MCP) through a one-answer client, and waits for its answer until the
/// call's deadline (capped by the broker's) plus a margin. `incoming` builds
/// the call with the client's reply target; progress updates on the way go
/// to `progress` (dropped when it is full). Dropping the future before the
/// answer (the HTTP client went away) cancels the call in the mesh.
/// `None`: no answer in time.
pub(crate) async fn call_once<'a>(
    s: &Shared,
    call: &fem_proto::ToolCall,
    progress: Option<tokio::sync::mpsc::Sender<fem_proto::ProgressUpdate>>,
    incoming: impl FnOnce(ReplyTo) -> Incoming<'a>,
) -> Option<Frame> {
    let wait = Duration::from_millis(call.deadline_ms.saturating_sub(fem_proto::now_ms()))
        .min(s.config.max_call_timeout);
    let mut once = OneAnswer::open(s, Some(call.request_id));
    let client = once.client;
    s.route(|r, now| r.call(now, incoming(ReplyTo::Client(client))));
    let end = tokio::time::Instant::now() + wait + Duration::from_secs(5);
    loop {
        match once.next(end).await? {
            Frame::Progress { update, .. } => {
                if let Some(p) = &progress {
                    let _ = p.try_send(update);
                }
            }
            answer => return Some(once.done(answer)),
        }
    }
}

/// Answers discoverTools for a caller without a session, filtered by its
/// grant (if any): the broker-signed toolsDiscovered, or `None`.
pub(crate) async fn discover_once(
    s: &Shared,
    q: &fem_proto::DiscoverTools,
    grant: Option<&fem_proto::Grant>,
) -> Option<Frame> {
    let mut once = OneAnswer::open(s, None);
    let client = once.client;
    s.route(|r, _| r.discover(client, q, grant));
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let answer = once.next(end).await?;
    Some(once.done(answer))
}

/// A one-answer client: the broker answers it like any other caller. It
/// leaves the router when dropped; before its answer, that also cancels
/// its call.
struct OneAnswer<'s> {
    s: &'s Shared,
    client: ClientId,
    rx: tokio::sync::mpsc::Receiver<crate::budget::Queued>,
    /// The call to cancel if the answer never came.
    call: Option<fem_proto::RequestId>,
}

impl<'s> OneAnswer<'s> {
    fn open(s: &'s Shared, call: Option<fem_proto::RequestId>) -> Self {
        let (tx, rx) = s.outbox();
        let (client, _handle) = s.add_client(tx);
        Self {
            s,
            client,
            rx,
            call,
        }
    }

    async fn next(&mut self, end: tokio::time::Instant) -> Option<Frame> {
        tokio::time::timeout_at(end, self.rx.recv())
            .await
            .ok()
            .flatten()
            .map(crate::budget::Queued::into_frame)
    }

    /// The terminal answer came: nothing left to cancel.
    fn done(&mut self, answer: Frame) -> Frame {
        self.call = None;
        answer
    }
}

impl Drop for OneAnswer<'_> {
    fn drop(&mut self) {
        if let Some(request_id) = self.call {
            let client = self.client;
            self.s.route(|r, now| r.cancel(now, client, request_id));
        }
        self.s.remove_client(self.client);
    }
}
