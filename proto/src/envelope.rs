//! Envelope types of the FEP lineage.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{ErrorCode, ProtoError};
use crate::ids::{AgentId, Capability, CapabilityPattern, Nonce, RequestId};
use crate::keys::PublicKey;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// JSON text carried inside a binary envelope.
///
/// postcard is not self-describing, so JSON values travel as text; in the
/// JSON form of an envelope they appear as ordinary JSON values. Text decoded
/// from a peer is not validated until [`JsonText::parse`] is called, because
/// brokers relay parameters without reading them.
#[derive(Clone, PartialEq, Eq)]
pub struct JsonText(String);

impl JsonText {
    /// Validates and wraps JSON text.
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] when `s` is not valid JSON.
    pub fn new(s: impl Into<String>) -> Result<Self, ProtoError> {
        let s = s.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&s).map_err(|e| ProtoError::Malformed {
            what: "JSON text",
            detail: e.to_string(),
        })?;
        Ok(Self(s))
    }
    /// Serialises a JSON value.
    pub fn from_value(v: &serde_json::Value) -> Self {
        Self(v.to_string())
    }
    /// Parses the text.
    ///
    /// # Errors
    /// [`ProtoError::Malformed`] when the text is not valid JSON.
    pub fn parse(&self) -> Result<serde_json::Value, ProtoError> {
        serde_json::from_str(&self.0).map_err(|e| ProtoError::Malformed {
            what: "JSON text",
            detail: e.to_string(),
        })
    }
    /// The raw text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonText({})", self.0)
    }
}

impl Serialize for JsonText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            match serde_json::value::RawValue::from_string(self.0.clone()) {
                Ok(raw) => raw.serialize(s),
                Err(_) => s.serialize_str(&self.0),
            }
        } else {
            s.serialize_str(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let v = serde_json::Value::deserialize(d)?;
            Ok(Self(v.to_string()))
        } else {
            String::deserialize(d).map(Self)
        }
    }
}

/// Header common to every envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// Who signed the envelope (agent or broker id).
    pub sender: AgentId,
    /// Milliseconds since the Unix epoch at signing.
    pub timestamp_ms: u64,
    /// 128 random bits; (sender, nonce) is unique within the replay window.
    pub nonce: Nonce,
}

impl Header {
    /// A header stamped with the current time and a fresh nonce.
    pub fn now(sender: AgentId) -> Self {
        Self {
            sender,
            timestamp_ms: now_ms(),
            nonce: Nonce::random(),
        }
    }
}

/// One tool an agent offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    /// Tool name, e.g. `shell.run`.
    pub name: Capability,
    /// Human description.
    pub description: String,
    /// JSON Schema of the parameters.
    pub input_schema: JsonText,
    /// The tool accepts broker-attested calls: unsigned calls whose caller
    /// the broker where they entered vouches for (proto/README.md §8.14).
    /// False (the default) keeps every call to it signed end to end.
    #[serde(default)]
    pub accepts_attested: bool,
}

impl ToolSpec {
    /// A tool that takes signed calls only.
    pub fn new(name: Capability, description: impl Into<String>, input_schema: JsonText) -> Self {
        Self {
            name,
            description: description.into(),
            input_schema,
            accepts_attested: false,
        }
    }

    /// True when this is tool `name` and it takes a call of this kind.
    pub fn serves(&self, name: &Capability, attested: bool) -> bool {
        self.name == *name && (self.accepts_attested || !attested)
    }
}

/// registerAgent: the first envelope on a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterAgent {
    /// The key that signs this and every later envelope of the agent.
    pub public_key: PublicKey,
    /// Capabilities offered (routing by capability pattern matches these).
    pub capabilities: Vec<Capability>,
    /// Tools offered.
    pub tools: Vec<ToolSpec>,
    /// Free-form metadata (environment, version, node...).
    pub metadata: BTreeMap<String, String>,
    /// The broker never has more calls than this in flight to the agent
    /// (0 means the agent serves no calls: a pure caller).
    pub max_concurrent_calls: u32,
}

/// registerBroker: a broker introducing itself on a federation link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterBroker {
    /// The broker's id.
    pub broker_id: AgentId,
    /// Where it can be reached (URL).
    pub endpoint: String,
    /// The broker's identity key.
    pub public_key: PublicKey,
    /// Broker features.
    pub capabilities: Vec<String>,
}

/// emitEvent: publish `payload` on `topic` to subscribed agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmitEvent {
    /// Topic name.
    pub topic: Capability,
    /// Event payload.
    pub payload: JsonText,
}

/// renderInstruction: a UI/rendering instruction for a target agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenderInstruction {
    /// The agent that should render.
    pub target: AgentId,
    /// The instruction.
    pub instruction: JsonText,
}

/// Where a tool call goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// A specific agent.
    Agent(AgentId),
    /// Any live agent with a capability matching the pattern.
    Capability(CapabilityPattern),
}

/// toolCall: run `tool` with `parameters` on the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolCall {
    /// Caller-chosen id, echoed by the result.
    pub request_id: RequestId,
    /// Agent id or capability pattern.
    pub target: Target,
    /// Tool name.
    pub tool: Capability,
    /// Parameters (validated by the agent against the tool's schema).
    pub parameters: JsonText,
    /// Absolute deadline, ms since the Unix epoch.
    pub deadline_ms: u64,
    /// The broker the caller sent the call to: any other broker refuses it
    /// where it enters, so a captured call cannot be replayed elsewhere.
    /// Required under a grant; relaying brokers do not check it.
    pub audience: Option<AgentId>,
}

/// The outcome of a tool call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ToolOutcome {
    /// The tool's result.
    Success(JsonText),
    /// A typed failure.
    Error {
        /// Code.
        code: ErrorCode,
        /// Human message.
        message: String,
    },
}

/// toolResult: the executing agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolResult {
    /// The request id of the call.
    pub request_id: RequestId,
    /// The caller the result is for (binds the result to the call).
    pub caller: AgentId,
    /// Result or error.
    pub outcome: ToolOutcome,
}

/// revoke: remove an agent from the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoke {
    /// The agent to remove.
    pub target: AgentId,
    /// Why.
    pub reason: String,
}

/// discoverTools: list tools matching a query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoverTools {
    /// Correlates the answer.
    pub request_id: RequestId,
    /// Only agents with a capability matching this pattern.
    pub capability: Option<CapabilityPattern>,
    /// Only agents whose metadata `environment` equals this.
    pub environment: Option<String>,
    /// At most this many tools (0: the broker's maximum).
    pub limit: u32,
    /// Continue after this point: the `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

/// One tool in a discovery answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveredTool {
    /// The agent offering it.
    pub agent_id: AgentId,
    /// The broker that reaches the agent.
    pub broker_id: AgentId,
    /// The agent's capabilities.
    pub capabilities: Vec<Capability>,
    /// The tool.
    pub tool: ToolSpec,
}

/// toolsDiscovered: the answer to discoverTools, signed by the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolsDiscovered {
    /// The request id of the query.
    pub request_id: RequestId,
    /// Matching tools.
    pub tools: Vec<DiscoveredTool>,
    /// Set when more tools match: ask again with it as `cursor`.
    pub next_cursor: Option<String>,
}

/// embodimentUpdate: the agent's tools (and optionally capabilities) changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmbodimentUpdate {
    /// The new full tool list (replaces the old one).
    pub tools: Vec<ToolSpec>,
    /// New capabilities, if they changed.
    pub capabilities: Option<Vec<Capability>>,
    /// New metadata, if it changed.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The body of an envelope. postcard encodes the variant by index: only
/// append variants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Body {
    /// registerAgent.
    RegisterAgent(RegisterAgent),
    /// registerBroker.
    RegisterBroker(RegisterBroker),
    /// emitEvent.
    EmitEvent(EmitEvent),
    /// renderInstruction.
    RenderInstruction(RenderInstruction),
    /// toolCall.
    ToolCall(ToolCall),
    /// toolResult.
    ToolResult(ToolResult),
    /// revoke.
    Revoke(Revoke),
    /// discoverTools.
    DiscoverTools(DiscoverTools),
    /// toolsDiscovered.
    ToolsDiscovered(ToolsDiscovered),
    /// embodimentUpdate.
    EmbodimentUpdate(EmbodimentUpdate),
}

/// The envelope type, as named in the signature domain tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnvelopeType {
    /// registerAgent.
    RegisterAgent,
    /// registerBroker.
    RegisterBroker,
    /// emitEvent.
    EmitEvent,
    /// renderInstruction.
    RenderInstruction,
    /// toolCall.
    ToolCall,
    /// toolResult.
    ToolResult,
    /// revoke.
    Revoke,
    /// discoverTools.
    DiscoverTools,
    /// toolsDiscovered.
    ToolsDiscovered,
    /// embodimentUpdate.
    EmbodimentUpdate,
}

impl EnvelopeType {
    /// The FEP name (`toolCall`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RegisterAgent => "registerAgent",
            Self::RegisterBroker => "registerBroker",
            Self::EmitEvent => "emitEvent",
            Self::RenderInstruction => "renderInstruction",
            Self::ToolCall => "toolCall",
            Self::ToolResult => "toolResult",
            Self::Revoke => "revoke",
            Self::DiscoverTools => "discoverTools",
            Self::ToolsDiscovered => "toolsDiscovered",
            Self::EmbodimentUpdate => "embodimentUpdate",
        }
    }
}

impl fmt::Display for EnvelopeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Body {
    /// The envelope type of this body.
    pub fn kind(&self) -> EnvelopeType {
        match self {
            Self::RegisterAgent(_) => EnvelopeType::RegisterAgent,
            Self::RegisterBroker(_) => EnvelopeType::RegisterBroker,
            Self::EmitEvent(_) => EnvelopeType::EmitEvent,
            Self::RenderInstruction(_) => EnvelopeType::RenderInstruction,
            Self::ToolCall(_) => EnvelopeType::ToolCall,
            Self::ToolResult(_) => EnvelopeType::ToolResult,
            Self::Revoke(_) => EnvelopeType::Revoke,
            Self::DiscoverTools(_) => EnvelopeType::DiscoverTools,
            Self::ToolsDiscovered(_) => EnvelopeType::ToolsDiscovered,
            Self::EmbodimentUpdate(_) => EnvelopeType::EmbodimentUpdate,
        }
    }
}

/// A complete envelope: header and body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Common header.
    pub header: Header,
    /// Type-specific body.
    pub body: Body,
}

impl Envelope {
    /// Builds an envelope.
    pub fn new(header: Header, body: Body) -> Self {
        Self { header, body }
    }
    /// The envelope type.
    pub fn kind(&self) -> EnvelopeType {
        self.body.kind()
    }
}
