//! The FEM wire protocol, without I/O.
//!
//! * [`Envelope`]s (registerAgent, toolCall, toolResult, ...) carry a common
//!   [`Header`] (sender, timestamp in ms, 128-bit nonce) and one [`Body`].
//! * A [`SignedEnvelope`] holds the *exact encoded bytes* of an envelope and an
//!   Ed25519 signature over a domain-separation tag followed by those bytes (see
//!   `proto/README.md`). Relays forward it untouched, so the final recipient
//!   verifies the original sender's signature.
//! * [`Frame`]s are the transport messages between a client and a broker:
//!   postcard-encoded and length-delimited, with a hard maximum size.
//! * [`verify`] holds the one Ed25519 verification rule (ZIP 215) for single
//!   and batch checks, and the small-order check for identity keys.
//! * [`NonceCache`] implements replay protection: a timestamp window plus a
//!   per-sender nonce set covering that window.
//!
//! ```no_run
//! use fem_proto::{Body, Envelope, Header, SigningKey, SignedEnvelope, AgentId};
//! # fn demo(body: Body) -> Result<(), fem_proto::ProtoError> {
//! let key = SigningKey::generate();
//! let env = Envelope::new(Header::now(AgentId::new("agent-1")?), body);
//! let signed = SignedEnvelope::sign(&env, &key)?;
//! let checked = signed.verify(&key.public_key())?;
//! assert_eq!(checked, env);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod envelope;
mod error;
mod federation;
mod frame;
pub mod grant;
pub mod http_sig;
mod ids;
mod keys;
mod replay;
mod serde_util;
mod signed;
pub mod verify;

pub use envelope::{
    Body, DiscoverTools, DiscoveredTool, EmbodimentUpdate, EmitEvent, Envelope, EnvelopeType,
    Header, JsonText, RegisterAgent, RegisterBroker, RenderInstruction, Revoke, Target, ToolCall,
    ToolOutcome, ToolResult, ToolSpec, ToolsDiscovered, now_ms,
};
pub use error::{ErrorCode, ProtoError};
pub use federation::{
    ATTESTED_FEATURE, AdvertisedAgent, CANCEL_FEATURE, DEFAULT_MAX_HOPS, DELTA_FEATURE, FedFrame,
    MAX_SUMMARY_PROFILES, RELAY_FEATURE, RelayedCall, SUMMARY_FEATURE, SummaryProfile, SummaryTool,
};
pub use frame::{
    Accepted, DEFAULT_MAX_FRAME, FORWARD_OVERHEAD, FRAME_HEADER_LEN, Frame, FrameDecoder,
    ProgressUpdate, decode_frame_payload, decode_message, encode_frame, encode_message, frame_len,
    max_forwarded_envelope,
};
pub use grant::{
    CallRule, Grant, GrantError, GrantLink, IdPattern, Revocation, Role, SignedGrant,
    SignedRevocation,
};
pub use ids::{AgentId, Capability, CapabilityPattern, MAX_ID_LEN, MAX_NAME_LEN, Nonce, RequestId};
pub use keys::{PublicKey, Signature, SigningKey};
pub use replay::{DEFAULT_REPLAY_WINDOW_MS, NonceCache};
pub use signed::{
    Carried, Format, SIGNATURE_DOMAIN, SignedEnvelope, UnsignedEnvelope, signing_input,
};

/// ALPN protocol id of the native client protocol (QUIC and TLS/TCP).
pub const ALPN_NATIVE: &[u8] = b"fem/1";
/// ALPN protocol id of broker-to-broker federation links.
pub const ALPN_FEDERATION: &[u8] = b"fem-fed/1";
/// Protocol version carried in the signature domain tag.
pub const PROTOCOL_VERSION: u8 = 1;
