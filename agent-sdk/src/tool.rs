//! Tools an agent serves.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use fem_proto::{AgentId, Capability, ErrorCode, JsonText, PublicKey, RequestId, ToolSpec};
use futures::future::BoxFuture;

use crate::SdkError;

/// One call as the handler sees it (already verified).
#[derive(Clone, Debug)]
pub struct ToolRequest {
    /// The caller: its signature verified, or (see `attested_by`) vouched
    /// for by a broker. With trust anchors, its grant was checked too.
    pub caller: AgentId,
    /// The caller's key.
    pub caller_key: PublicKey,
    /// The broker that attested an unsigned call (only to a tool built with
    /// [`Tool::accept_attested`]); `None` when the caller signed it.
    pub attested_by: Option<AgentId>,
    /// Request id.
    pub request_id: RequestId,
    /// Tool name.
    pub tool: Capability,
    /// Parameters, valid against the tool's schema.
    pub params: serde_json::Value,
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// Reports progress to the caller.
    pub progress: Progress,
}

/// Reports a call's progress to its caller (through the brokers, which
/// forward at most 20 updates a second per call and drop the rest).
#[derive(Clone)]
pub struct Progress {
    pub(crate) inner: std::sync::Weak<crate::connection::Inner>,
    pub(crate) epoch: u64,
    pub(crate) request_id: RequestId,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// Sends `progress` (and the `total`, when known, and a short message)
    /// to the caller. Never blocks: dropped when the connection's queue is
    /// full or the connection is gone.
    pub fn report(&self, progress: f64, total: Option<f64>, message: Option<String>) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let update = fem_proto::ProgressUpdate {
            progress,
            total,
            message,
        };
        if let (Some(update), Some(w)) = (update.checked(), inner.writer(self.epoch)) {
            let _ = w.try_send(fem_proto::Frame::Progress {
                request_id: self.request_id,
                update,
            });
        }
    }
}

/// A typed tool failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolError {
    /// Code sent to the caller.
    pub code: ErrorCode,
    /// Message sent to the caller.
    pub message: String,
}

impl ToolError {
    /// A failure with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ToolError {}

type Handler =
    dyn Fn(ToolRequest) -> BoxFuture<'static, Result<serde_json::Value, ToolError>> + Send + Sync;

/// A tool: its spec, compiled schema and handler.
#[derive(Clone)]
pub struct Tool {
    pub(crate) spec: ToolSpec,
    pub(crate) validator: Arc<jsonschema::Validator>,
    pub(crate) handler: Arc<Handler>,
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tool")
            .field("name", &self.spec.name)
            .finish_non_exhaustive()
    }
}

impl Tool {
    /// A tool named `name` (dotted, e.g. `shell.run`) whose parameters must
    /// match the JSON Schema `schema`.
    ///
    /// # Errors
    /// [`SdkError::Config`] for an invalid name or schema.
    pub fn new<F, Fut>(
        name: &str,
        description: &str,
        schema: serde_json::Value,
        handler: F,
    ) -> Result<Self, SdkError>
    where
        F: Fn(ToolRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, ToolError>> + Send + 'static,
    {
        let name = Capability::new(name)?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| SdkError::Config(format!("tool {name}: invalid JSON Schema: {e}")))?;
        Ok(Self {
            spec: ToolSpec {
                name,
                description: description.to_owned(),
                input_schema: JsonText::from_value(&schema),
                accepts_attested: false,
            },
            validator: Arc::new(validator),
            handler: Arc::new(move |req| Box::pin(handler(req))),
        })
    }

    /// Lets the tool take broker-attested calls: unsigned calls whose
    /// caller the broker where they entered vouches for (no signature work
    /// for the caller, the brokers or this agent; results go back unsigned
    /// too). Any broker on the path could then forge calls to this tool, so
    /// only for tools where that is acceptable (proto/README.md §8.14).
    #[must_use]
    pub fn accept_attested(mut self) -> Self {
        self.spec.accepts_attested = true;
        self
    }

    /// The tool's spec.
    pub fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    /// Checks parameters against the schema.
    pub(crate) fn validate(&self, params: &serde_json::Value) -> Result<(), ToolError> {
        // The common case needs no error list.
        if self.validator.is_valid(params) {
            return Ok(());
        }
        let errors: Vec<String> = self
            .validator
            .iter_errors(params)
            .take(5)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ToolError::new(
                ErrorCode::BadRequest,
                format!(
                    "parameters do not match the schema of {}: {}",
                    self.spec.name,
                    errors.join("; ")
                ),
            ))
        }
    }
}
