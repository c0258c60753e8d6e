//! HTTP endpoints: health, readiness and metrics (also on the plain
//! `--metrics-listen` port), and on the TLS port only the operator views and
//! the JSON gateway.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fem_proto::ErrorCode;
use serde_json::json;
use sha2::Digest as _;

use super::gateway;
use crate::state::Shared;

/// /health, /ready and /metrics.
pub(crate) fn plain_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Everything served over HTTPS on the broker port.
pub(crate) fn tls_router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_frame;
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/agents", get(agents))
        .route("/v1/peers", get(peers))
        .route("/v1/routes", get(routes))
        .route("/v1/call", post(gateway::call))
        .route("/v1/discover", post(gateway::discover))
        .route("/v1/revocations", post(revocations))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::clone(&shared))
        .merge(crate::mcp::routes(shared))
}

/// `POST /v1/revocations`: a signed revocation in its file form. Anyone may
/// deliver one: its signature by a trust anchor is what counts.
async fn revocations(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let text = String::from_utf8_lossy(&body);
    let outcome = fem_proto::SignedRevocation::from_text(&text)
        .map_err(|e| (ErrorCode::BadRequest, e.to_string()))
        .and_then(|r| s.apply_revocation(&r, None));
    match outcome {
        Ok(applied) => axum::Json(json!({"applied": applied})).into_response(),
        Err((code, message)) => {
            let status = match code {
                ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            (
                status,
                axum::Json(json!({"error": {"code": code.as_str(), "message": message}})),
            )
                .into_response()
        }
    }
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "broker_id": s.config.broker_id.as_str(),
        "agents": s.view(crate::route::Router::agent_count),
    }))
    .into_response()
}

async fn ready(State(s): State<Arc<Shared>>) -> Response {
    let links = crate::federation::links_ready(&s);
    if s.ready.load(Ordering::Relaxed) && links {
        let peers: Vec<_> = s.view(|r| r.peers().cloned().collect());
        axum::Json(json!({"status": "ready", "listeners": ["quic", "tcp"], "peers": peers}))
            .into_response()
    } else {
        let missing = if s.is_shutting_down() {
            "draining: shutting down"
        } else if !links {
            "federation links the configuration asks for"
        } else {
            "listeners"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "missing": [missing]})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    crate::federation::export_down(&s);
    // Gauges derived from live state are set when scraped, not per frame.
    s.metrics
        .budget_bytes
        .set(i64::try_from(s.budget.used()).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Authorizes an operator view: a request signed by the holder of an
/// operator grant (`Fem-Grant` and `Fem-Signature`, see
/// `fem_proto::http_sig`), or, where one is configured, the bearer token
/// (compared in constant time over SHA-256 digests: no length leak).
fn authorize(s: &Shared, headers: &HeaderMap, uri: &Uri) -> Result<(), Box<Response>> {
    let deny = |status: StatusCode, message: String| {
        Box::new(
            (
                status,
                [(header::WWW_AUTHENTICATE, "Bearer, FEM-Grant")],
                axum::Json(json!({"error": message})),
            )
                .into_response(),
        )
    };
    if let Some(sig) = headers.get(fem_proto::http_sig::SIGNATURE_HEADER) {
        let path = uri
            .path_and_query()
            .map_or_else(|| uri.path(), |p| p.as_str());
        return operator_signed(s, headers, sig, path).map_err(|(code, message)| {
            s.metrics.refused(code.as_str());
            let status = if code == ErrorCode::PermissionDenied {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            deny(status, format!("{code}: {message}"))
        });
    }
    let Some(expected) = &s.config.admin_token else {
        return Err(if s.trust.enforced() {
            deny(
                StatusCode::UNAUTHORIZED,
                "sign the request with an operator grant (fem views --grant), or start the broker with --admin-token-file".into(),
            )
        } else {
            deny(
                StatusCode::NOT_FOUND,
                "operator views are disabled; start the broker with --admin-token-file or FEM_ADMIN_TOKEN".into(),
            )
        });
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let a = sha2::Sha256::digest(given.as_bytes());
    let b = sha2::Sha256::digest(expected.as_bytes());
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if diff == 0 {
        Ok(())
    } else {
        Err(deny(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

/// A GET signed by the subject of an operator grant, fresh and not replayed.
fn operator_signed(
    s: &Shared,
    headers: &HeaderMap,
    sig: &axum::http::HeaderValue,
    path: &str,
) -> Result<(), crate::route::admission::Refusal> {
    if !s.trust.enforced() {
        return Err((
            ErrorCode::PermissionDenied,
            "development trust: no trust anchor, so no operator grants; use --admin-token-file"
                .into(),
        ));
    }
    let signed = verify_signed(s, headers, sig, "GET", path, b"")?;
    match signed.credential {
        Some(c) if c.grant.operator => Ok(()),
        Some(_) => Err((
            ErrorCode::PermissionDenied,
            "the grant does not allow operator views (fem trust grant --operator)".into(),
        )),
        None => Err((
            ErrorCode::BadRequest,
            "a signed request needs the Fem-Grant header".into(),
        )),
    }
}

/// A verified signed HTTP request (`fem_proto::http_sig`).
pub(crate) struct SignedRequest {
    /// The key that signed it.
    pub(crate) key: fem_proto::PublicKey,
    /// Its `Fem-Grant`, verified against the anchors and bound to `key`;
    /// required with a trust anchor, absent or ignored without one.
    pub(crate) credential: Option<Arc<crate::route::admission::Credential>>,
}

/// Checks a signed HTTP request: the signature over method, path, time,
/// nonce and body; the time window and the nonce once per key (a captured
/// request cannot be sent again); with a trust anchor, the grant for the
/// signing key.
///
/// # Errors
/// `BAD_REQUEST` for unreadable headers, `INVALID_SIGNATURE`,
/// `STALE_TIMESTAMP`, `REPLAYED`, `PERMISSION_DENIED` for a grant that is
/// not the signer's or does not verify.
pub(crate) fn verify_signed(
    s: &Shared,
    headers: &HeaderMap,
    sig: &axum::http::HeaderValue,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<SignedRequest, crate::route::admission::Refusal> {
    use fem_proto::http_sig::{GRANT_HEADER, HttpSignature};
    let bad = |m: &str| (ErrorCode::BadRequest, m.to_owned());
    let sig = HttpSignature::parse(sig.to_str().map_err(|_| bad("Fem-Signature is not text"))?)
        .map_err(|e| (e.code(), e.to_string()))?;
    sig.verify(method, path, body)
        .map_err(|e| (e.code(), e.to_string()))?;
    let header = fem_proto::Header {
        sender: s.config.broker_id.clone(),
        timestamp_ms: sig.ts_ms,
        nonce: sig.nonce,
    };
    s.replay
        .check(&sig.key, &header, fem_proto::now_ms())
        .map_err(|e| (e.code(), e.to_string()))?;
    let text = headers.get(GRANT_HEADER).and_then(|v| v.to_str().ok());
    let credential = match text {
        Some(text) if s.trust.enforced() => {
            let grant = fem_proto::SignedGrant::from_text(text).map_err(|e| bad(&e.to_string()))?;
            let c = s.trust.verify(&grant)?;
            if c.grant.subject != sig.key {
                return Err((
                    ErrorCode::PermissionDenied,
                    "the grant is not for the signing key".into(),
                ));
            }
            Some(c)
        }
        None if s.trust.enforced() => {
            return Err(bad("a signed request needs the Fem-Grant header"));
        }
        _ => None,
    };
    Ok(SignedRequest {
        key: sig.key,
        credential,
    })
}

async fn agents(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorize(&s, &headers, &uri) {
        return *r;
    }
    let mut list: Vec<_> = s.view(|r| {
        r.agents()
            .map(|a| {
                let p = &a.profile;
                let last_seen = s
                    .client(a.session)
                    .map_or(0, |c| c.last_seen_ms.load(Ordering::Relaxed));
                json!({
                    "id": a.id,
                    "publicKey": a.key,
                    "capabilities": p.capabilities,
                    "tools": p.tools.iter().map(|t| json!({"name": t.name, "description": t.description})).collect::<Vec<_>>(),
                    "metadata": p.metadata,
                    "transport": a.transport,
                    "connectedSinceMs": a.connected_since_ms,
                    "lastSeenMs": last_seen,
                    "maxConcurrentCalls": a.max_concurrent,
                    "callsInFlight": a.in_flight,
                    "callsQueued": a.queue.len(),
                })
            })
            .collect()
    });
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    axum::Json(json!({"agents": list})).into_response()
}

async fn peers(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorize(&s, &headers, &uri) {
        return *r;
    }
    let peers: Vec<_> = s.view(|r| {
        r.peers()
            .map(|p| {
                let n = r.remote_agents().filter(|(_, a)| &a.route.via == p).count();
                // A stub shows the kinds of agent each peer summarised.
                let kinds = r.summaries().find(|(q, _)| q == &p).map(|(_, k)| k);
                match kinds {
                    Some(k) => json!({"id": p, "state": "up", "routes": n, "summary": k}),
                    None => json!({"id": p, "state": "up", "routes": n}),
                }
            })
            .collect()
    });
    axum::Json(json!({"brokerId": s.config.broker_id, "peers": peers})).into_response()
}

async fn routes(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = authorize(&s, &headers, &uri) {
        return *r;
    }
    let mut list: Vec<_> = s.view(|r| {
        let local = r.agents().map(|a| {
            json!({
                "agent": a.id,
                "capabilities": a.profile.capabilities,
                "tools": a.profile.tools.iter().map(|t| &t.name).collect::<Vec<_>>(),
                "via": "local",
                "broker": s.config.broker_id,
                "hops": 0,
                "callsInFlight": a.in_flight,
            })
        });
        let remote = r.remote_agents().map(|(id, a)| {
            json!({
                "agent": id,
                "capabilities": a.route.agent.capabilities,
                "tools": a.route.agent.tools.iter().map(|t| &t.name).collect::<Vec<_>>(),
                "via": a.route.via,
                "broker": a.route.origin,
                "hops": a.route.hops,
                "callsInFlight": r.remote_in_flight(id),
            })
        });
        local.chain(remote).collect()
    });
    list.sort_by(|a, b| a["agent"].as_str().cmp(&b["agent"].as_str()));
    axum::Json(json!({"routes": list})).into_response()
}
