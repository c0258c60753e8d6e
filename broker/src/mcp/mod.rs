//! The broker as an MCP server: `POST /mcp` (and `/mcp/<view>`) on the
//! HTTPS port and on the optional plain-HTTP `--mcp-listen` loopback
//! listener, Streamable HTTP, stateless (any replica answers any request).
//!
//! - `tools/list`: the federation's tools the caller's principal may call
//!   (discovery with its grant), under the name rule of [`names`], limited
//!   to the view when one is named.
//! - `tools/call`: a toolCall signed as the principal and routed like any
//!   other (by capability, or to one agent for a per-agent name), with the
//!   configured deadline; the result becomes text content, a FEM error
//!   `isError: true` with its typed code.
//!
//! The MCP protocol itself (both eras, JSON-RPC, Origin validation) is
//! [`server`], the one file that uses the rmcp crate. See docs/mcp.md.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fem_proto::{
    Body, CapabilityPattern, DiscoverTools, ErrorCode, Frame, Header, JsonText, RequestId,
    SignedEnvelope, Target, ToolCall, ToolOutcome,
};
use serde_json::json;

use crate::route::admission::{Credential, Refusal};
use crate::route::{Arrival, Incoming};
use crate::state::Shared;

mod auth;
pub(crate) mod config;
pub(crate) mod names;
mod server;

pub(crate) use auth::Principals;
use auth::{AuthError, Principal};
use config::McpView;
use names::{Named, Offer, Route};

/// Who is calling, and through which view: set by [`serve`] on the request
/// before the MCP layer sees it.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    principal: Arc<Principal>,
    view: Option<Arc<McpView>>,
}

/// A tool as `tools/list` shows it.
#[derive(Debug)]
pub(crate) struct Listed {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) input_schema: serde_json::Map<String, serde_json::Value>,
}

/// The answer to a `tools/call` that reached the routing core.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The tool's JSON result.
    Ok(serde_json::Value),
    /// A typed FEM error.
    Failed {
        /// The code.
        code: ErrorCode,
        /// The message.
        message: String,
    },
}

/// Why a request failed before a call was routed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum McpFailure {
    /// No such tool for this caller (or hidden by the view).
    #[error("unknown tool {0:?}")]
    UnknownTool(String),
    /// The principal's grant was refused, or discovery failed.
    #[error("{}: {}", .0.0.as_str(), .0.1)]
    Refused(Refusal),
}

impl McpFailure {
    /// `UNKNOWN_TOOL`, or the FEM error code of a refusal.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::UnknownTool(_) => "UNKNOWN_TOOL",
            Self::Refused((code, _)) => code.as_str(),
        }
    }
}

/// The routes `/mcp` and `/mcp/{view}`.
pub(crate) fn routes(shared: Arc<Shared>) -> axum::Router {
    let svc = server::service(Arc::clone(&shared));
    axum::Router::new()
        .route("/mcp", axum::routing::any(serve))
        .route("/mcp/{view}", axum::routing::any(serve))
        .with_state((shared, svc))
}

/// Authenticates, resolves the view, and hands the request to the MCP layer.
async fn serve(
    State((s, svc)): State<(Arc<Shared>, server::Service)>,
    mut req: Request,
) -> Response {
    let view = match req.uri().path().strip_prefix("/mcp/") {
        None => None,
        Some(name) => match s.config.mcp.views.iter().find(|v| v.name == name) {
            Some(v) => Some(Arc::new(v.clone())),
            None => {
                count(&s, "http", "unknown_view");
                return (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error": format!("no MCP view {name:?} on this broker")})),
                )
                    .into_response();
            }
        },
    };
    if let Some(sig) = req
        .headers()
        .get(fem_proto::http_sig::SIGNATURE_HEADER)
        .cloned()
    {
        let (parts, body) = req.into_parts();
        // The signature covers the body: read it (bounded) and put it back.
        let Ok(bytes) = axum::body::to_bytes(body, s.config.max_frame).await else {
            count(&s, "http", "too_large");
            let message = format!(
                "a signed /mcp request body is at most {} bytes (--max-frame-size)",
                s.config.max_frame
            );
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(json!({ "error": message })),
            )
                .into_response();
        };
        let principal = match auth::signed(&s, &parts, &sig, &bytes) {
            Ok(p) => p,
            Err((code, message)) => {
                count(&s, "http", "unauthorized");
                s.metrics.refused(code.as_str());
                let status = if code == ErrorCode::PermissionDenied {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::UNAUTHORIZED
                };
                return (
                    status,
                    [(header::WWW_AUTHENTICATE, "Bearer, FEM-Grant")],
                    axum::Json(json!({"error": format!("{code}: {message}")})),
                )
                    .into_response();
            }
        };
        let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
        req.extensions_mut().insert(Caller { principal, view });
        return svc.handle(req).await;
    }
    let principal = match s.mcp_principals.authenticate(req.headers()) {
        Ok(p) => p,
        Err(e) => {
            count(&s, "http", "unauthorized");
            s.metrics.refused("MCP_UNAUTHORIZED");
            let why = match e {
                AuthError::Missing => "missing bearer token",
                _ => "wrong bearer token",
            };
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({"error": why})),
            )
                .into_response();
        }
    };
    req.extensions_mut().insert(Caller { principal, view });
    svc.handle(req).await
}

fn count(s: &Shared, method: &str, outcome: &str) {
    s.metrics
        .mcp_requests
        .with_label_values(&[method, outcome])
        .inc();
}

/// The principal's credential: its verified grant with a trust anchor (bound
/// to its id and key); without one, the id must not belong to another key.
fn credential(s: &Shared, p: &Principal) -> Result<Option<Arc<Credential>>, Refusal> {
    if !s.trust.enforced() {
        s.trust.check_bound(&p.id, &p.public)?;
        return Ok(None);
    }
    let signed = p.grant.as_ref().ok_or_else(|| {
        (
            ErrorCode::PermissionDenied,
            format!("principal {} has no grant", p.id),
        )
    })?;
    let c = s.trust.verify(signed)?;
    if c.grant.subject != p.public || !c.grant.may_register(&p.id) {
        return Err((
            ErrorCode::PermissionDenied,
            format!(
                "the grant of principal {} does not bind its id to its key",
                p.id
            ),
        ));
    }
    Ok(Some(c))
}

/// Discovery pages read for one tools/list (with the default page size,
/// tens of thousands of tools).
const MAX_CATALOG_PAGES: usize = 64;

/// Catalogs kept at most (one per principal; dropped whole when full).
const MAX_CATALOGS: usize = 1024;

/// The tools a principal may call: the offers sorted, and their names.
#[derive(Debug)]
pub(crate) struct Catalog {
    offers: Vec<Offer>,
    named: Vec<Named>,
}

/// Catalogs built per principal, each with the router generation and the
/// grant it was built for: `tools/call` resolves a name without reading the
/// federation's tools again until they (or the grant) change.
#[derive(Debug, Default)]
pub(crate) struct Catalogs(std::sync::Mutex<std::collections::HashMap<fem_proto::AgentId, Cached>>);

/// A catalog with the router generation and grant it was built for.
type Cached = (u64, Option<fem_proto::Grant>, Arc<Catalog>);

impl Catalogs {
    fn get(
        &self,
        id: &fem_proto::AgentId,
        generation: u64,
        grant: Option<&fem_proto::Grant>,
    ) -> Option<Arc<Catalog>> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(id)
            .filter(|(g, held, _)| *g == generation && held.as_ref() == grant)
            .map(|(_, _, c)| Arc::clone(c))
    }

    fn put(
        &self,
        id: &fem_proto::AgentId,
        generation: u64,
        grant: Option<&fem_proto::Grant>,
        c: &Arc<Catalog>,
    ) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_CATALOGS && !map.contains_key(id) {
            map.clear();
        }
        map.insert(id.clone(), (generation, grant.cloned(), Arc::clone(c)));
    }
}

/// The tools `principal` may call, from the cache while the router's
/// generation and the grant are the ones it was built for.
async fn catalog(
    s: &Shared,
    principal: &Principal,
    credential: Option<&Credential>,
) -> Result<Arc<Catalog>, McpFailure> {
    let grant = credential.map(|c| &c.grant);
    // Read before building: a change while building makes the next request rebuild.
    let generation = s.view(crate::route::Router::generation);
    if let Some(c) = s.mcp_catalogs.get(&principal.id, generation, grant) {
        return Ok(c);
    }
    let c = Arc::new(build_catalog(s, grant).await?);
    s.mcp_catalogs.put(&principal.id, generation, grant, &c);
    Ok(c)
}

/// Reads the federation's tools `grant` allows (all discovery pages) and names them.
async fn build_catalog(
    s: &Shared,
    grant: Option<&fem_proto::Grant>,
) -> Result<Catalog, McpFailure> {
    // The whole catalog, page after page (the name rule needs every offer).
    let mut tools = Vec::new();
    let mut cursor = None;
    for _ in 0..MAX_CATALOG_PAGES {
        let q = DiscoverTools {
            request_id: RequestId::random(),
            capability: None,
            environment: None,
            limit: 0,
            cursor: cursor.take(),
        };
        let answer = crate::listen::gateway::discover_once(s, &q, grant).await;
        match answer {
            Some(Frame::Deliver { envelope, .. }) => match envelope.open().map(|e| e.body) {
                Ok(Body::ToolsDiscovered(d)) => {
                    tools.extend(d.tools);
                    cursor = d.next_cursor;
                }
                _ => {
                    return Err(McpFailure::Refused((
                        ErrorCode::Internal,
                        "discovery answered something else".into(),
                    )));
                }
            },
            Some(Frame::CallFailed { code, message, .. }) => {
                return Err(McpFailure::Refused((code, message)));
            }
            _ => {
                return Err(McpFailure::Refused((
                    ErrorCode::Timeout,
                    "no discovery answer".into(),
                )));
            }
        }
        if cursor.is_none() {
            break;
        }
    }
    let mut offers: Vec<Offer> = tools
        .into_iter()
        .map(|t| Offer {
            agent: t.agent_id,
            capabilities: t.capabilities,
            tool: t.tool,
        })
        .collect();
    let named = names::assign(&mut offers);
    Ok(Catalog { offers, named })
}

/// The offers of `n` the caller's view shows (all without a view).
fn in_view<'a>(caller: &Caller, offers: &'a [Offer], n: &Named) -> Vec<&'a Offer> {
    n.offers
        .iter()
        .map(|&i| &offers[i])
        .filter(|o| {
            caller
                .view
                .as_ref()
                .is_none_or(|v| v.shows(&o.tool.name, &o.capabilities))
        })
        // A signed request's calls are attested: only tools that take them.
        .filter(|o| caller.principal.key.is_some() || o.tool.accepts_attested)
        .collect()
}

/// `tools/list`: the listed names the caller may call and its view shows.
///
/// # Errors
/// [`McpFailure::Refused`] when the principal's grant is refused or
/// discovery fails.
#[tracing::instrument(skip_all, fields(principal = %caller.principal.id))]
pub(crate) async fn list(s: &Shared, caller: &Caller) -> Result<Vec<Listed>, McpFailure> {
    let r = list_inner(s, caller).await;
    match &r {
        Ok(_) => count(s, "tools/list", "ok"),
        Err(e) => count(s, "tools/list", e.kind()),
    }
    r
}

async fn list_inner(s: &Shared, caller: &Caller) -> Result<Vec<Listed>, McpFailure> {
    let cred = credential(s, &caller.principal).map_err(McpFailure::Refused)?;
    let c = catalog(s, &caller.principal, cred.as_deref()).await?;
    let mut out = Vec::new();
    for n in c.named.iter().filter(|n| n.listed) {
        let Some(o) = in_view(caller, &c.offers, n).into_iter().next() else {
            continue;
        };
        let input_schema = match o.tool.input_schema.parse() {
            Ok(serde_json::Value::Object(m)) => m,
            _ => {
                let mut m = serde_json::Map::new();
                m.insert("type".into(), json!("object"));
                m
            }
        };
        let description = match &n.route {
            Route::Capability => o.tool.description.clone(),
            Route::Agent(a) => format!("{} (on agent {a})", o.tool.description),
        };
        out.push(Listed {
            name: n.name.clone(),
            description,
            input_schema,
        });
    }
    Ok(out)
}

/// The target of a call by capability: a capability every offering agent
/// has (the tool's own name first, then the smallest), within the view's
/// capability patterns; without one, the first agent by id.
fn target_of(caller: &Caller, tool: &fem_proto::Capability, offers: &[&Offer]) -> Target {
    let allowed = |c: &fem_proto::Capability| {
        caller.view.as_ref().is_none_or(|v| {
            v.capabilities.is_empty() || v.capabilities.iter().any(|p| p.matches(c))
        })
    };
    let mut common: Vec<&fem_proto::Capability> = offers
        .first()
        .map(|o| o.capabilities.iter().collect())
        .unwrap_or_default();
    common.retain(|c| allowed(c) && offers.iter().all(|o| o.capabilities.contains(c)));
    common.sort();
    let chosen = common
        .iter()
        .find(|c| *c == &tool)
        .or_else(|| common.first())
        .copied();
    match chosen {
        Some(c) => Target::Capability(CapabilityPattern::from(c.clone())),
        None => {
            let first = offers.iter().map(|o| &o.agent).min();
            match first {
                Some(a) => Target::Agent(a.clone()),
                None => Target::Capability(CapabilityPattern::from(tool.clone())),
            }
        }
    }
}

/// `tools/call`: resolves `name`, signs the call as the principal, routes
/// it and waits for the answer.
///
/// # Errors
/// [`McpFailure::UnknownTool`] for a name the caller cannot see; FEM errors
/// are an [`Outcome::Failed`].
#[tracing::instrument(skip_all, fields(principal = %caller.principal.id, tool = name))]
pub(crate) async fn call(
    s: &Shared,
    caller: &Caller,
    name: &str,
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
    progress: Option<tokio::sync::mpsc::Sender<fem_proto::ProgressUpdate>>,
) -> Result<Outcome, McpFailure> {
    let p = &caller.principal;
    let cred = match credential(s, p) {
        Ok(c) => c,
        Err((code, message)) => return Ok(failed(s, code, message)),
    };
    let c = match catalog(s, p, cred.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            count(s, "tools/call", e.kind());
            return Err(e);
        }
    };
    let Some(n) = c.named.iter().find(|n| n.name == name) else {
        count(s, "tools/call", "UNKNOWN_TOOL");
        return Err(McpFailure::UnknownTool(name.to_owned()));
    };
    let visible = in_view(caller, &c.offers, n);
    if visible.is_empty() {
        count(s, "tools/call", "UNKNOWN_TOOL");
        return Err(McpFailure::UnknownTool(name.to_owned()));
    }
    let target = match &n.route {
        Route::Agent(a) => Target::Agent(a.clone()),
        Route::Capability => target_of(caller, &n.tool, &visible),
    };
    if let Some(Err((code, message))) = cred.as_deref().map(|c| s.trust.take_call(c)) {
        s.metrics.refused(code.as_str());
        return Ok(failed(s, code, message));
    }
    let timeout = u64::try_from(s.config.mcp.call_timeout.as_millis()).unwrap_or(u64::MAX);
    let call = ToolCall {
        request_id: RequestId::random(),
        target,
        tool: n.tool.clone(),
        parameters: JsonText::from_value(&serde_json::Value::Object(arguments.unwrap_or_default())),
        deadline_ms: fem_proto::now_ms().saturating_add(timeout),
        audience: Some(s.config.broker_id.clone()),
    };
    let env = fem_proto::Envelope::new(Header::now(p.id.clone()), Body::ToolCall(call.clone()));
    let sealed = match &p.key {
        Some(k) => SignedEnvelope::sign(&env, k).map(fem_proto::Carried::Signed),
        None => {
            fem_proto::UnsignedEnvelope::encode(&env).map(|envelope| fem_proto::Carried::Attested {
                envelope,
                by: s.config.broker_id.clone(),
            })
        }
    };
    let envelope = match sealed {
        Ok(e) => e,
        Err(e) => return Ok(failed(s, e.code(), format!("encoding the call: {e}"))),
    };
    let answer = crate::listen::gateway::call_once(s, &call, progress, |reply| Incoming {
        reply,
        caller: &p.id,
        caller_key: p.public,
        call: &call,
        envelope,
        hops_left: fem_proto::DEFAULT_MAX_HOPS,
        arrival: Arrival::Entry,
        credential: cred.clone(),
    })
    .await;
    let opened = match answer {
        Some(Frame::Deliver { envelope, .. }) => Some(envelope.open()),
        Some(Frame::Attested { envelope, .. }) => Some(envelope.open()),
        Some(Frame::CallFailed { code, message, .. }) => {
            return Ok(failed(s, code, message));
        }
        Some(_) => Some(Err(fem_proto::ProtoError::Malformed {
            what: "answer",
            detail: "unexpected frame".into(),
        })),
        None => None,
    };
    let outcome = match opened {
        Some(opened) => match opened.map(|e| e.body) {
            Ok(Body::ToolResult(r)) => match r.outcome {
                ToolOutcome::Success(v) => match v.parse() {
                    Ok(v) => Outcome::Ok(v),
                    Err(e) => Outcome::Failed {
                        code: ErrorCode::Internal,
                        message: format!("the result is not JSON: {e}"),
                    },
                },
                ToolOutcome::Error { code, message } => Outcome::Failed { code, message },
            },
            _ => Outcome::Failed {
                code: ErrorCode::Internal,
                message: "the call was answered with something else than a toolResult".into(),
            },
        },
        None => Outcome::Failed {
            code: ErrorCode::Timeout,
            message: "no answer before the deadline".into(),
        },
    };
    match &outcome {
        Outcome::Ok(_) => count(s, "tools/call", "ok"),
        Outcome::Failed { code, .. } => count(s, "tools/call", code.as_str()),
    }
    Ok(outcome)
}

fn failed(s: &Shared, code: ErrorCode, message: String) -> Outcome {
    count(s, "tools/call", code.as_str());
    Outcome::Failed { code, message }
}

#[cfg(test)]
mod tests {
    use fem_proto::{AgentId, Capability, SigningKey, ToolSpec};

    use super::*;

    fn offer(agent: &str, caps: &[&str], tool: &str) -> Offer {
        Offer {
            agent: AgentId::new(agent).unwrap(),
            capabilities: caps.iter().map(|c| Capability::new(*c).unwrap()).collect(),
            tool: ToolSpec {
                name: Capability::new(tool).unwrap(),
                description: String::new(),
                input_schema: JsonText::new("{}").unwrap(),
                accepts_attested: false,
            },
        }
    }

    fn caller(view: Option<McpView>) -> Caller {
        let key = SigningKey::generate();
        Caller {
            principal: Arc::new(Principal {
                id: AgentId::new("p").unwrap(),
                public: key.public_key(),
                key: Some(key),
                grant: None,
                token_sha256: None,
            }),
            view: view.map(Arc::new),
        }
    }

    fn cap(t: &Target) -> String {
        match t {
            Target::Capability(p) => format!("cap:{p}"),
            Target::Agent(a) => format!("agent:{a}"),
        }
    }

    #[test]
    fn calls_by_capability_use_a_capability_every_offering_agent_has() {
        let tool = Capability::new("shell.run").unwrap();
        let (a, b) = (
            offer("a", &["code.execute", "shell.run"], "shell.run"),
            offer("b", &["shell.run", "x.y"], "shell.run"),
        );
        let c = caller(None);
        assert_eq!(cap(&target_of(&c, &tool, &[&a, &b])), "cap:shell.run");
        let (a, b) = (
            offer("a", &["z.z", "node.tools"], "shell.run"),
            offer("b", &["node.tools", "a.a", "z.z"], "shell.run"),
        );
        assert_eq!(cap(&target_of(&c, &tool, &[&a, &b])), "cap:node.tools");
        // Nothing in common: the first agent by id.
        let (a, b) = (
            offer("b", &["one.x"], "shell.run"),
            offer("a", &["two.x"], "shell.run"),
        );
        assert_eq!(cap(&target_of(&c, &tool, &[&a, &b])), "agent:a");
        // A view limits the capability to its patterns.
        let view = McpView {
            name: "v".into(),
            capabilities: vec![CapabilityPattern::new("z.*").unwrap()],
            tools: Vec::new(),
        };
        let (a, b) = (
            offer("a", &["z.z", "node.tools"], "shell.run"),
            offer("b", &["node.tools", "z.z"], "shell.run"),
        );
        assert_eq!(
            cap(&target_of(&caller(Some(view)), &tool, &[&a, &b])),
            "cap:z.z"
        );
    }

    #[test]
    fn views_filter_by_tool_and_capability() {
        let v = McpView {
            name: "v".into(),
            capabilities: vec![CapabilityPattern::new("shell.*").unwrap()],
            tools: vec![CapabilityPattern::new("shell.run").unwrap()],
        };
        let shell = Capability::new("shell.run").unwrap();
        let read = Capability::new("file.read").unwrap();
        let caps = [Capability::new("shell.run").unwrap()];
        assert!(v.shows(&shell, &caps));
        assert!(!v.shows(&read, &caps));
        assert!(!v.shows(&shell, &[Capability::new("code.execute").unwrap()]));
    }
}
