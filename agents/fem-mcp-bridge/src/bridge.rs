//! The bridge: FEM tools whose handlers relay to the MCP server, and the
//! supervisor that keeps the server running and the registered tools equal
//! to what it lists.
//!
//! Calls are answered:
//! - AGENT_UNAVAILABLE while the server is down (between a child's death and
//!   its restart), or when it dies during the call;
//! - TIMEOUT when the MCP tool does not answer by the call's deadline
//!   (capped by `--call-timeout`);
//! - TOOL_FAILED with the text of the result when the tool answers
//!   `isError: true`, or with the JSON-RPC error the server sent
//!   (BAD_REQUEST for "invalid params");
//! - otherwise with `structuredContent` when present, else the joined text
//!   when every content item is text, else the content array as MCP JSON.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fem_agent_sdk::{Client, SdkError, Tool, ToolError, ToolRequest};
use fem_proto::{Capability, ErrorCode};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::mcp::{CallOutcome, McpCaller, McpError, McpTool, ServerSpec, Session};
use crate::names::{self, NameError};

/// Longest error message passed to the caller, in bytes.
const MAX_ERROR_MESSAGE: usize = 16 * 1024;

/// What the bridge serves and how it restarts.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The MCP server.
    pub(crate) server: ServerSpec,
    /// The capability the tools are offered under (and their name prefix).
    pub(crate) capability: Capability,
    /// `--tool-name MCP=FEM` overrides.
    pub(crate) overrides: BTreeMap<String, Capability>,
    /// FEM tool names (patterns) that take broker-attested calls.
    pub(crate) accept_attested: Vec<fem_proto::CapabilityPattern>,
    /// First restart delay, doubled after each failed start.
    pub(crate) backoff_initial: Duration,
    /// Longest restart delay.
    pub(crate) backoff_max: Duration,
    /// A server up this long counts as healthy: the next restart waits
    /// `backoff_initial` again.
    pub(crate) stable_after: Duration,
}

/// Errors that stop the bridge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BridgeError {
    /// The MCP server cannot be started.
    #[error(transparent)]
    Mcp(#[from] McpError),
    /// The server's tools have no distinct FEM names.
    #[error(transparent)]
    Names(#[from] NameError),
    /// A tool could not be built.
    #[error("tool {name}")]
    Tool {
        /// FEM name.
        name: String,
        /// Why.
        source: SdkError,
    },
}

/// The session that answers calls now; `None` while the server is down.
type Up = Arc<Mutex<Option<McpCaller>>>;

/// What the supervisor waits for.
enum Event {
    Ended,
    ToolsChanged,
    Shutdown,
}

/// Tools as registered: FEM name and the MCP tool behind it.
type Mapping = Vec<(Capability, McpTool)>;

/// A running bridge: the current MCP session and the tools registered for it.
#[derive(Debug)]
pub(crate) struct Bridge {
    cfg: Config,
    up: Up,
    session: Option<Session>,
    started: Instant,
    changed_tx: mpsc::Sender<()>,
    changed_rx: mpsc::Receiver<()>,
    registered: Mapping,
}

impl Bridge {
    /// Starts the MCP server, retrying with backoff until it initializes and
    /// lists its tools; returns the bridge and the FEM tools to register.
    ///
    /// # Errors
    /// [`BridgeError::Mcp`] when the program cannot be run at all,
    /// [`BridgeError::Names`] when two tools map to one FEM name.
    pub(crate) async fn start(cfg: Config) -> Result<(Self, Vec<Tool>), BridgeError> {
        let (changed_tx, changed_rx) = mpsc::channel(1);
        let mut delay = cfg.backoff_initial;
        let (session, listed) = loop {
            match start_and_list(&cfg.server, changed_tx.clone()).await {
                Ok(x) => break x,
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    warn!(error = %chain(&e), retry_in_ms = delay.as_millis() as u64, "MCP server not started");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(cfg.backoff_max);
                }
            }
        };
        let mapping = map_tools(&cfg, listed)?;
        let up: Up = Arc::new(Mutex::new(Some(session.caller())));
        let tools = fem_tools(&up, &mapping, &cfg.accept_attested)?;
        log_mapping(&mapping);
        Ok((
            Self {
                cfg,
                up,
                session: Some(session),
                started: Instant::now(),
                changed_tx,
                changed_rx,
                registered: mapping,
            },
            tools,
        ))
    }

    /// The child's process id (stdio mode, while it runs).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.session.as_ref().and_then(Session::pid)
    }

    /// Supervises until `shutdown` turns true: restarts the server when it
    /// ends, re-lists its tools after a restart and on `tools/list_changed`,
    /// and updates the agent's tools (embodimentUpdate) when they changed.
    /// Stops the server (its whole process group) before returning.
    pub(crate) async fn run(mut self, client: Client, mut shutdown: watch::Receiver<bool>) {
        let mut delay = self.cfg.backoff_initial;
        loop {
            let Some(session) = self.session.as_mut() else {
                // Down: restart after `delay`.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                // A server that dies again soon waits longer next time.
                delay = (delay * 2).min(self.cfg.backoff_max);
                match start_and_list(&self.cfg.server, self.changed_tx.clone()).await {
                    Ok((s, listed)) => {
                        info!(pid = s.pid(), "MCP server restarted");
                        *lock(&self.up) = Some(s.caller());
                        self.session = Some(s);
                        self.started = Instant::now();
                        self.update(&client, listed).await;
                    }
                    Err(e) => {
                        warn!(error = %chain(&e), retry_in_ms = delay.as_millis() as u64, "MCP server restart failed");
                    }
                }
                continue;
            };
            let event = tokio::select! {
                () = session.ended() => Event::Ended,
                Some(()) = self.changed_rx.recv() => Event::ToolsChanged,
                _ = shutdown.wait_for(|s| *s) => Event::Shutdown,
            };
            match event {
                Event::Ended => {
                    *lock(&self.up) = None;
                    let up_for = self.started.elapsed();
                    if let Some(s) = self.session.take() {
                        // Whatever the child left in its group goes too.
                        s.kill();
                    }
                    if up_for >= self.cfg.stable_after {
                        delay = self.cfg.backoff_initial;
                    }
                    warn!(
                        up_ms = up_for.as_millis() as u64,
                        restart_in_ms = delay.as_millis() as u64,
                        "MCP server exited; calls are answered AGENT_UNAVAILABLE until it is back"
                    );
                }
                Event::ToolsChanged => {
                    let caller = session.caller();
                    match caller.list_tools().await {
                        Ok(listed) => {
                            info!("MCP server announced a changed tool list");
                            self.update(&client, listed).await;
                        }
                        Err(e) => warn!(error = %chain(&e), "cannot re-list the MCP tools"),
                    }
                }
                Event::Shutdown => break,
            }
        }
        *lock(&self.up) = None;
        if let Some(s) = self.session.take() {
            s.stop().await;
        }
    }

    /// Maps `listed` and, when it differs from what is registered, replaces
    /// the agent's tools. A mapping error keeps the old tools.
    async fn update(&mut self, client: &Client, listed: Vec<McpTool>) {
        let mapping = match map_tools(&self.cfg, listed) {
            Ok(m) => m,
            Err(e) => {
                error!(error = %chain(&e), "new MCP tool list refused; the registered tools stay");
                return;
            }
        };
        if mapping == self.registered {
            return;
        }
        let tools = match fem_tools(&self.up, &mapping, &self.cfg.accept_attested) {
            Ok(t) => t,
            Err(e) => {
                error!(error = %chain(&e), "new MCP tool list refused; the registered tools stay");
                return;
            }
        };
        log_mapping(&mapping);
        // The SDK keeps the new list even when the update is not
        // acknowledged, and registers with it after a reconnection.
        match client.update_tools(tools).await {
            Ok(()) => info!(tools = mapping.len(), "agent tools updated"),
            Err(e) => {
                warn!(error = %chain(&e), "tool update not acknowledged (sent again on reconnection)")
            }
        }
        self.registered = mapping;
    }
}

async fn start_and_list(
    spec: &ServerSpec,
    changed: mpsc::Sender<()>,
) -> Result<(Session, Vec<McpTool>), McpError> {
    let session = Session::start(spec, changed).await?;
    info!(server = %spec.describe(), pid = session.pid(), "MCP server started");
    let listed = session.caller().list_tools().await?;
    Ok((session, listed))
}

fn map_tools(cfg: &Config, listed: Vec<McpTool>) -> Result<Mapping, NameError> {
    for mcp in cfg.overrides.keys() {
        if !listed.iter().any(|t| &t.name == mcp) {
            warn!(tool = %mcp, "--tool-name names a tool the MCP server does not list");
        }
    }
    let names = names::map_all(
        &cfg.capability,
        listed.iter().map(|t| t.name.as_str()),
        &cfg.overrides,
    )?;
    Ok(names
        .into_iter()
        .zip(listed)
        .map(|((_, fem), t)| (fem, t))
        .collect())
}

fn log_mapping(mapping: &Mapping) {
    for (fem, t) in mapping {
        info!(tool = %fem, mcp_tool = %t.name, "tool offered");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One FEM tool per mapped MCP tool. A schema the SDK does not accept is
/// replaced by `{"type":"object"}` with a warning. Tools whose FEM name
/// matches one of `attested` take broker-attested calls.
fn fem_tools(
    up: &Up,
    mapping: &Mapping,
    attested: &[fem_proto::CapabilityPattern],
) -> Result<Vec<Tool>, BridgeError> {
    let mut out = Vec::with_capacity(mapping.len());
    for (fem, t) in mapping {
        let up = Arc::clone(up);
        let name: Arc<str> = Arc::from(t.name.as_str());
        let handler = move |req: ToolRequest| {
            let up = Arc::clone(&up);
            let name = Arc::clone(&name);
            async move { relay(&up, &name, req).await }
        };
        let tool = match Tool::new(
            fem.as_str(),
            &t.description,
            t.input_schema.clone(),
            handler.clone(),
        ) {
            Ok(tool) => tool,
            Err(e) => {
                warn!(
                    tool = %fem,
                    mcp_tool = %t.name,
                    error = %chain(&e),
                    "MCP inputSchema not accepted; registering the permissive {{\"type\":\"object\"}}"
                );
                Tool::new(
                    fem.as_str(),
                    &t.description,
                    serde_json::json!({"type": "object"}),
                    handler,
                )
                .map_err(|source| BridgeError::Tool {
                    name: fem.to_string(),
                    source,
                })?
            }
        };
        let tool = if attested.iter().any(|p| p.matches(fem)) {
            tool.accept_attested()
        } else {
            tool
        };
        out.push(tool);
    }
    Ok(out)
}

/// Relays one call to MCP tool `name`, bounded by the call's deadline.
async fn relay(up: &Up, name: &str, req: ToolRequest) -> Result<Value, ToolError> {
    let Some(caller) = lock(up).clone() else {
        return Err(ToolError::new(
            ErrorCode::AgentUnavailable,
            "the MCP server is not running (restarting)",
        ));
    };
    let arguments = match req.params {
        Value::Object(m) => Some(m),
        Value::Null => None,
        _ => {
            return Err(ToolError::new(
                ErrorCode::BadRequest,
                "MCP tool arguments must be a JSON object",
            ));
        }
    };
    let budget = req.deadline.saturating_duration_since(Instant::now());
    let reporter = req.progress;
    let progress: crate::mcp::OnProgress =
        Arc::new(move |done, total, message| reporter.report(done, total, message));
    match tokio::time::timeout(budget, caller.call(name, arguments, Some(progress))).await {
        Err(_) => Err(ToolError::new(
            ErrorCode::Timeout,
            format!(
                "MCP tool {name} did not answer within {} ms",
                budget.as_millis()
            ),
        )),
        Ok(Err(e)) if e.is_unavailable() => Err(ToolError::new(
            ErrorCode::AgentUnavailable,
            format!("MCP server gone during the call: {}", chain(&e)),
        )),
        Ok(Err(e)) if e.is_invalid_params() => {
            Err(ToolError::new(ErrorCode::BadRequest, truncate(chain(&e))))
        }
        Ok(Err(e)) => Err(ToolError::new(ErrorCode::ToolFailed, truncate(chain(&e)))),
        Ok(Ok(out)) => map_outcome(out),
    }
}

/// The FEM answer for an MCP `tools/call` result (see the module docs).
///
/// # Errors
/// TOOL_FAILED for `isError: true`.
pub(crate) fn map_outcome(o: CallOutcome) -> Result<Value, ToolError> {
    if o.is_error {
        let text = texts(&o.content, false).unwrap_or_else(|| {
            if o.content.is_empty() {
                "the MCP tool reported an error".to_owned()
            } else {
                Value::Array(o.content.clone()).to_string()
            }
        });
        return Err(ToolError::new(ErrorCode::ToolFailed, truncate(text)));
    }
    if let Some(s) = o.structured {
        return Ok(s);
    }
    Ok(match texts(&o.content, true) {
        Some(t) => Value::String(t),
        None => Value::Array(o.content),
    })
}

/// The text items joined by newlines; `None` when there is none, or (with
/// `all`) when an item is not text.
fn texts(content: &[Value], all: bool) -> Option<String> {
    let mut parts = Vec::new();
    for item in content {
        match (item.get("type").and_then(Value::as_str), item.get("text")) {
            (Some("text"), Some(Value::String(t))) => parts.push(t.as_str()),
            _ if all => return None,
            _ => {}
        }
    }
    (!parts.is_empty()).then(|| parts.join("\n"))
}

/// An error and its causes: `error: cause: cause`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [truncated]");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn outcome(is_error: bool, structured: Option<Value>, content: Value) -> CallOutcome {
        CallOutcome {
            is_error,
            structured,
            content: content.as_array().unwrap().clone(),
        }
    }

    #[test]
    fn structured_content_wins() {
        let o = outcome(
            false,
            Some(json!({"t": 1})),
            json!([{"type": "text", "text": "{\"t\": 1}"}]),
        );
        assert_eq!(map_outcome(o).unwrap(), json!({"t": 1}));
    }

    #[test]
    fn text_items_are_joined() {
        let o = outcome(
            false,
            None,
            json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
        );
        assert_eq!(map_outcome(o).unwrap(), json!("a\nb"));
    }

    #[test]
    fn mixed_content_is_returned_as_the_array() {
        let c = json!([
            {"type": "text", "text": "a"},
            {"type": "image", "data": "AAAA", "mimeType": "image/png"}
        ]);
        let o = outcome(false, None, c.clone());
        assert_eq!(map_outcome(o).unwrap(), c);
        assert_eq!(
            map_outcome(outcome(false, None, json!([]))).unwrap(),
            json!([])
        );
    }

    #[test]
    fn is_error_becomes_tool_failed_with_the_text() {
        let o = outcome(
            true,
            None,
            json!([{"type": "text", "text": "bad zone"}, {"type": "image", "data": ""}]),
        );
        let e = map_outcome(o).unwrap_err();
        assert_eq!(e.code, ErrorCode::ToolFailed);
        assert_eq!(e.message, "bad zone");
        let e = map_outcome(outcome(true, Some(json!(1)), json!([]))).unwrap_err();
        assert_eq!(e.code, ErrorCode::ToolFailed);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = truncate("é".repeat(MAX_ERROR_MESSAGE));
        assert!(s.len() <= MAX_ERROR_MESSAGE + 12);
        assert!(s.ends_with("[truncated]"));
    }
}
