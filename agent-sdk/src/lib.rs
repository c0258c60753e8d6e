//! What an agent or a caller links to join a FEM mesh.
//!
//! * [`AgentBuilder`] registers an agent (id, key, capabilities, tools with
//!   JSON schemas and async handlers) and serves calls concurrently, with
//!   heartbeats and automatic reconnection plus re-registration.
//! * [`Client`] (returned by [`AgentBuilder::connect`], or
//!   [`Client::connect`] for a pure caller) calls tools by agent id or by
//!   capability, discovers tools, emits and subscribes to events.
//! * Everything received is verified: envelope signatures against the key the
//!   broker vouches for, replay windows, and the broker's certificate by CA
//!   file, pinned fingerprint, or (only when asked) not at all.
//!
//! ```no_run
//! use fem_agent_sdk::{AgentBuilder, Options, Tool, Trust};
//! use fem_proto::{AgentId, SigningKey, Target};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let opts = Options::new("https://localhost:8443")?.trust(Trust::Insecure);
//! let echo = Tool::new("echo", "Echo the input", serde_json::json!({"type": "object"}), |req| async move {
//!     Ok(req.params)
//! })?;
//! let agent = AgentBuilder::new(AgentId::new("echo-1")?, SigningKey::generate())
//!     .capability("echo")?
//!     .tool(echo)
//!     .connect(opts.clone())
//!     .await?;
//! let caller = fem_agent_sdk::Client::connect(AgentId::new("caller")?, SigningKey::generate(), opts).await?;
//! let out = caller.call(Target::Agent(agent.id().clone()), "echo", serde_json::json!({"hi": 1})).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod agent;
mod caller;
#[cfg(feature = "cli")]
pub mod cli;
mod connection;
mod dispatch;
mod errors;
mod metrics;
mod options;
mod tool;

pub use agent::AgentBuilder;
pub use caller::{Client, Event};
pub use errors::{CallError, Origin, SdkError};
pub use fem_net::{BrokerUrl, NetError, Transport, Trust, keys, tls, wire};
pub use fem_proto as proto;
pub use metrics::AgentMetrics;
pub use options::Options;
pub use tool::{Progress, Tool, ToolError, ToolRequest};
