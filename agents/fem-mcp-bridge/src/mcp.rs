//! The MCP client side: the only module that uses `rmcp`, so an upgrade of the
//! SDK touches this file alone. Everything leaves it as plain data
//! ([`McpTool`], [`CallOutcome`], JSON values) or as an [`McpError`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CancelledNotificationParam, ClientCapabilities,
    ClientConfig, ClientRequest, Implementation, ProgressNotificationParam, ProgressToken,
    RequestId, ServerResult,
};
use rmcp::service::{
    NotificationContext, PeerRequestOptions, RunningServiceCancellationToken, ServiceError,
};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceExt as _};
use tokio::sync::{mpsc, oneshot};

/// Time allowed for starting the server and the MCP initialization handshake.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGTERM to the child's process group, time before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where the MCP server is.
#[derive(Clone, Debug)]
pub(crate) enum ServerSpec {
    /// A program started as a child, spoken to over its stdin and stdout.
    /// Run directly (never through a shell) in its own process group.
    Command {
        /// Program (looked up in PATH when it has no slash).
        program: OsString,
        /// Its arguments.
        args: Vec<OsString>,
    },
    /// A Streamable HTTP endpoint (`http://` or `https://`).
    Url(String),
}

impl ServerSpec {
    /// `stdio` or `http`.
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Self::Command { .. } => "stdio",
            Self::Url(_) => "http",
        }
    }

    /// For log lines.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Command { program, args } => {
                let mut s = program.to_string_lossy().into_owned();
                for a in args {
                    s.push(' ');
                    s.push_str(&a.to_string_lossy());
                }
                s
            }
            Self::Url(u) => u.clone(),
        }
    }
}

/// Errors of the MCP side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum McpError {
    /// The child could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The MCP initialization handshake failed.
    #[error("MCP initialization failed")]
    Initialize(#[source] Box<rmcp::service::ClientInitializeError>),
    /// The server did not finish starting in time.
    #[error("the MCP server did not initialize within {0:?}")]
    StartTimeout(Duration),
    /// The connection to the server is closed (the child exited).
    #[error("the MCP server connection is closed")]
    Closed,
    /// The server answered with a JSON-RPC error.
    #[error("MCP error {code}: {message}")]
    Rpc {
        /// JSON-RPC error code (-32602: invalid params).
        code: i32,
        /// Its message.
        message: String,
    },
    /// Another failure of the MCP service (transport, unexpected answer).
    #[error("MCP request failed")]
    Service(#[source] ServiceError),
    /// A value of the MCP SDK that does not convert to JSON.
    #[error("cannot convert an MCP value to JSON")]
    Json(#[from] serde_json::Error),
}

impl McpError {
    /// True when retrying cannot help (the program does not exist or may
    /// not be run).
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self, Self::Spawn { source, .. } if matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        ))
    }

    /// True when the server is gone (the call should be answered
    /// AGENT_UNAVAILABLE rather than TOOL_FAILED).
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Closed | Self::Service(ServiceError::TransportSend(_))
        )
    }

    /// True for a JSON-RPC "invalid params" error.
    pub(crate) fn is_invalid_params(&self) -> bool {
        matches!(self, Self::Rpc { code, .. } if *code == rmcp::model::ErrorCode::INVALID_PARAMS.0)
    }
}

impl From<ServiceError> for McpError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::McpError(d) => Self::Rpc {
                code: d.code.0,
                message: d.message.into_owned(),
            },
            ServiceError::TransportClosed => Self::Closed,
            other => Self::Service(other),
        }
    }
}

/// A tool as the MCP server lists it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct McpTool {
    /// The MCP name (what `tools/call` takes).
    pub(crate) name: String,
    /// Description (or the title when there is none; empty when neither).
    pub(crate) description: String,
    /// `inputSchema`, as sent.
    pub(crate) input_schema: serde_json::Value,
}

/// A `tools/call` result as plain JSON.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CallOutcome {
    /// `isError: true`.
    pub(crate) is_error: bool,
    /// `structuredContent`, when present.
    pub(crate) structured: Option<serde_json::Value>,
    /// `content`: each item as its MCP JSON (`{"type":"text","text":...}`, ...).
    pub(crate) content: Vec<serde_json::Value>,
}

/// Receives a call's progress: (progress, total, message).
pub(crate) type OnProgress = Arc<dyn Fn(f64, Option<f64>, Option<String>) + Send + Sync>;

/// Calls in flight that want their progress, by the token of their request.
type ProgressRoutes = Arc<Mutex<HashMap<ProgressToken, OnProgress>>>;

fn routes(r: &ProgressRoutes) -> std::sync::MutexGuard<'_, HashMap<ProgressToken, OnProgress>> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends a unit on `changed` whenever the server announces that its tool
/// list changed, and hands progress notifications to their calls.
struct Handler {
    changed: mpsc::Sender<()>,
    progress: ProgressRoutes,
}

impl ClientHandler for Handler {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        // A full channel already holds a pending re-list.
        let _ = self.changed.try_send(());
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let route = routes(&self.progress).get(&params.progress_token).cloned();
        if let Some(report) = route {
            report(params.progress, params.total, params.message);
        }
    }

    async fn on_custom_notification(
        &self,
        notification: rmcp::model::CustomNotification,
        _context: NotificationContext<RoleClient>,
    ) {
        tracing::debug!(method = %notification.method, "MCP notification ignored");
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("fem-mcp-bridge", env!("CARGO_PKG_VERSION")),
        )
    }
}

/// A cheap handle for requests to one running server session.
#[derive(Clone)]
pub(crate) struct McpCaller {
    peer: Peer<RoleClient>,
    progress: ProgressRoutes,
}

impl std::fmt::Debug for McpCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpCaller").finish_non_exhaustive()
    }
}

/// A request in flight: dropped before its answer (the FEM call was
/// cancelled), it sends `notifications/cancelled`; it also unregisters the
/// request's progress route.
struct InFlight {
    peer: Peer<RoleClient>,
    progress: ProgressRoutes,
    token: ProgressToken,
    id: Option<RequestId>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        routes(&self.progress).remove(&self.token);
        if let Some(id) = self.id.take() {
            let peer = self.peer.clone();
            tokio::spawn(async move {
                let reason = Some("cancelled by the FEM caller".to_owned());
                let _ = peer
                    .notify_cancelled(CancelledNotificationParam::new(Some(id), reason))
                    .await;
            });
        }
    }
}

impl McpCaller {
    /// Every tool of the server (all pages).
    ///
    /// # Errors
    /// [`McpError`] when the request fails or a tool does not convert.
    pub(crate) async fn list_tools(&self) -> Result<Vec<McpTool>, McpError> {
        let tools = self.peer.list_all_tools().await?;
        let mut out = Vec::with_capacity(tools.len());
        for t in tools {
            let description = t
                .description
                .as_deref()
                .map(str::to_owned)
                .or_else(|| t.title.clone())
                .unwrap_or_default();
            out.push(McpTool {
                name: t.name.into_owned(),
                description,
                input_schema: serde_json::to_value(&*t.input_schema)?,
            });
        }
        Ok(out)
    }

    /// Calls tool `name` with `arguments` (a JSON object, or none); the
    /// server's progress notifications for it go to `progress`. Dropping the
    /// future before the answer cancels the request at the server.
    ///
    /// # Errors
    /// [`McpError`]: [`McpError::Closed`] when the server is gone,
    /// [`McpError::Rpc`] for a JSON-RPC error answer.
    pub(crate) async fn call(
        &self,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
        progress: Option<OnProgress>,
    ) -> Result<CallOutcome, McpError> {
        let mut params = CallToolRequestParams::new(name.to_owned());
        params.arguments = arguments;
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        let handle = self
            .peer
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await?;
        let mut in_flight = InFlight {
            peer: self.peer.clone(),
            progress: self.progress.clone(),
            token: handle.progress_token.clone(),
            id: Some(handle.id.clone()),
        };
        if let Some(p) = progress {
            routes(&self.progress).insert(handle.progress_token.clone(), p);
        }
        let answer = handle.await_response().await;
        in_flight.id = None;

        let ServerResult::CallToolResult(r) = answer? else {
            return Err(McpError::from(ServiceError::UnexpectedResponse));
        };
        let content = r
            .content
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CallOutcome {
            is_error: r.is_error.unwrap_or(false),
            structured: r.structured_content,
            content,
        })
    }
}

/// One running server: a started child (or an HTTP session) after the
/// MCP initialization handshake.
pub(crate) struct Session {
    caller: McpCaller,
    cancel: Option<RunningServiceCancellationToken>,
    ended: oneshot::Receiver<()>,
    pid: Option<u32>,
}

impl Session {
    /// Starts the server (or connects to it) and initializes the session;
    /// `changed` receives a unit for each `notifications/tools/list_changed`.
    ///
    /// # Errors
    /// [`McpError::Spawn`], [`McpError::Initialize`] or
    /// [`McpError::StartTimeout`].
    pub(crate) async fn start(
        spec: &ServerSpec,
        changed: mpsc::Sender<()>,
    ) -> Result<Self, McpError> {
        let progress = ProgressRoutes::default();
        let handler = Handler {
            changed,
            progress: progress.clone(),
        };
        match spec {
            ServerSpec::Command { program, args } => {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args)
                    // Its own process group, so the whole group can be
                    // killed (grandchildren included).
                    .process_group(0)
                    .kill_on_drop(true);
                // The bridge's own settings (key and grant paths) are not
                // the server's business.
                for (k, _) in std::env::vars_os() {
                    if k.to_string_lossy().starts_with("FEM_") {
                        cmd.env_remove(k);
                    }
                }
                let child = TokioChildProcess::new(cmd).map_err(|source| McpError::Spawn {
                    program: program.to_string_lossy().into_owned(),
                    source,
                })?;
                let pid = child.id();
                let started = tokio::time::timeout(START_TIMEOUT, handler.serve(child)).await;
                let running = match started {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        kill_group(pid);
                        return Err(McpError::Initialize(Box::new(e)));
                    }
                    Err(_) => {
                        // Dropping the transport kills the child; the
                        // group may hold more.
                        kill_group(pid);
                        return Err(McpError::StartTimeout(START_TIMEOUT));
                    }
                };
                Ok(Self::running(running, pid, progress))
            }
            ServerSpec::Url(url) => {
                let transport = StreamableHttpClientTransport::from_uri(url.as_str());
                let running = tokio::time::timeout(START_TIMEOUT, handler.serve(transport))
                    .await
                    .map_err(|_| McpError::StartTimeout(START_TIMEOUT))?
                    .map_err(|e| McpError::Initialize(Box::new(e)))?;
                Ok(Self::running(running, None, progress))
            }
        }
    }

    fn running(
        running: rmcp::service::RunningService<RoleClient, Handler>,
        pid: Option<u32>,
        progress: ProgressRoutes,
    ) -> Self {
        let caller = McpCaller {
            peer: running.peer().clone(),
            progress,
        };
        let cancel = Some(running.cancellation_token());
        let (tx, ended) = oneshot::channel();
        tokio::spawn(async move {
            let reason = running.waiting().await;
            tracing::debug!(?reason, "MCP session ended");
            let _ = tx.send(());
        });
        Self {
            caller,
            cancel,
            ended,
            pid,
        }
    }

    /// The child's process id (stdio mode).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// A handle for requests.
    pub(crate) fn caller(&self) -> McpCaller {
        self.caller.clone()
    }

    /// Resolves when the session has ended (the child exited or closed its
    /// output, or the HTTP session failed).
    pub(crate) async fn ended(&mut self) {
        let _ = (&mut self.ended).await;
    }

    /// Ends the session: SIGTERM to the child's process group, then SIGKILL
    /// after a short grace.
    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.pid {
            signal_group(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if let Some(c) = self.cancel.take() {
            c.cancel();
        }
        let _ = tokio::time::timeout(STOP_GRACE, &mut self.ended).await;
        kill_group(self.pid.take());
    }

    /// Kills the child's process group at once (after the child died, its
    /// children may live on).
    pub(crate) fn kill(&self) {
        kill_group(self.pid);
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // No orphans, however the session ends.
        kill_group(self.pid);
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

fn signal_group(pid: u32, sig: nix::sys::signal::Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    // The child leads its own group (process_group(0)), so its pid is the
    // group id. ESRCH (already gone) is fine.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(raw), sig);
}
