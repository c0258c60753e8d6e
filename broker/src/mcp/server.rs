//! The MCP protocol layer: the only file that uses the rmcp crate (pinned
//! exactly in the workspace), so an upgrade touches this file alone.
//!
//! rmcp's Streamable HTTP service runs without sessions
//! (`legacy_session_mode = false`): a `2026-07-28` request (`server/discover`,
//! `MCP-Protocol-Version` and method headers) and the `initialize`
//! handshake of `2025-06-18` and `2025-11-25` are each answered from the
//! request alone, with no `Mcp-Session-Id`, so any broker replica can answer
//! any request. JSON responses, no SSE streams. `Origin` is validated by
//! rmcp against `mcp.allowed_origins` (403 otherwise); the `Host` check is
//! off because brokers are reached under any name and every request is
//! authenticated.

use std::sync::Arc;

use axum::response::Response;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    Implementation, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler};
use serde_json::json;

use super::{Caller, McpFailure, Outcome};
use crate::state::Shared;

/// The MCP service of one broker (cheap to clone).
#[derive(Clone)]
pub(crate) struct Service(StreamableHttpService<Handler, NeverSessionManager>);

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mcp::Service")
    }
}

impl Service {
    /// Serves one HTTP request (its extensions carry the [`Caller`]).
    pub(crate) async fn handle(&self, req: axum::extract::Request) -> Response {
        self.0.handle(req).await.map(axum::body::Body::new)
    }
}

/// The service for `shared`'s configuration.
pub(crate) fn service(shared: Arc<Shared>) -> Service {
    let cfg = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_sse_retry(None)
        .with_max_request_body_bytes(shared.config.max_frame)
        .disable_allowed_hosts()
        .with_allowed_origins(shared.config.mcp.allowed_origins.clone())
        .enforce_origin_validation();
    let handler = Handler { shared };
    Service(StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(NeverSessionManager::default()),
        cfg,
    ))
}

/// Answers MCP requests from the broker's routing core.
#[derive(Clone)]
pub(crate) struct Handler {
    shared: Arc<Shared>,
}

fn caller(ctx: &RequestContext<RoleServer>) -> Result<Caller, ErrorData> {
    ctx.extensions
        .get::<axum::http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("request without a caller", None))
}

fn protocol_error(f: McpFailure) -> ErrorData {
    match f {
        McpFailure::UnknownTool(name) => ErrorData::invalid_params(
            format!("unknown tool {name:?}"),
            Some(json!({"code": "TOOL_NOT_FOUND"})),
        ),
        McpFailure::Refused((code, message)) => {
            ErrorData::internal_error(message, Some(json!({"code": code.as_str()})))
        }
    }
}

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("fem-broker", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "Tools of the FEM federation as seen from broker {}.",
                self.shared.config.broker_id
            ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let caller = caller(&ctx)?;
        let listed = super::list(&self.shared, &caller)
            .await
            .map_err(protocol_error)?;
        let tools = listed
            .into_iter()
            .map(|l| Tool::new(l.name, l.description, l.input_schema))
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = caller(&ctx)?;
        // Progress reaches the client only when it asked for it; rmcp then
        // answers on an SSE stream instead of one JSON body.
        let token = ctx.meta.get_progress_token();
        let (tx, mut updates) = tokio::sync::mpsc::channel(16);
        let call = super::call(
            &self.shared,
            &caller,
            &request.name,
            request.arguments,
            token.is_some().then_some(tx),
        );
        tokio::pin!(call);
        let notify = |u: fem_proto::ProgressUpdate| {
            let peer = ctx.peer.clone();
            let token = token.clone();
            async move {
                if let Some(t) = token {
                    let mut p = ProgressNotificationParam::new(t, u.progress);
                    if let Some(total) = u.total {
                        p = p.with_total(total);
                    }
                    if let Some(m) = u.message {
                        p = p.with_message(m);
                    }
                    let _ = peer.notify_progress(p).await;
                }
            }
        };
        let outcome = loop {
            tokio::select! {
                outcome = &mut call => break outcome.map_err(protocol_error)?,
                Some(u) = updates.recv() => notify(u).await,
                // The client went away or cancelled: dropping the call
                // cancels it in the mesh.
                () = ctx.ct.cancelled() => {
                    return Err(ErrorData::internal_error(
                        "cancelled",
                        Some(json!({"code": "CANCELLED"})),
                    ));
                }
            }
        };
        // Updates that came just before the answer go out before it.
        while let Ok(u) = updates.try_recv() {
            notify(u).await;
        }
        let result = match outcome {
            Outcome::Ok(v) => CallToolResult::success(vec![ContentBlock::text(v.to_string())]),
            Outcome::Failed { code, message } => {
                let text = json!({"error": {"code": code.as_str(), "message": message}});
                CallToolResult::error(vec![ContentBlock::text(text.to_string())])
            }
        };
        Ok(result.into())
    }
}
