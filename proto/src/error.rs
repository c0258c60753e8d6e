//! Typed error codes on the wire, and the crate's error type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a call, an envelope or a registration was refused. Stable on the wire
/// as a `u16`; shown as `SCREAMING_SNAKE_CASE` in JSON and logs. Codes a peer
/// does not know decode as [`ErrorCode::Unknown`] instead of failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No live agent matches the target.
    NoRoute,
    /// The deadline passed before an answer came.
    Timeout,
    /// The chosen agent disconnected or was evicted with the call in flight.
    AgentUnavailable,
    /// Policy refused the request.
    PermissionDenied,
    /// The signature did not verify against the sender's key.
    InvalidSignature,
    /// The (sender, timestamp, nonce) was seen before.
    Replayed,
    /// The timestamp lies outside the accepted window.
    StaleTimestamp,
    /// Too many requests, or every matching agent is at its concurrency limit.
    RateLimited,
    /// The request is malformed.
    BadRequest,
    /// A frame or field exceeds its limit.
    TooLarge,
    /// Something other than registerAgent arrived before registration.
    NotRegistered,
    /// The id is bound to another public key.
    IdConflict,
    /// The agent does not offer the requested tool.
    ToolNotFound,
    /// The tool ran and failed.
    ToolFailed,
    /// The broker is shutting down.
    ShuttingDown,
    /// The broker's connection limit is reached.
    TooManyConnections,
    /// The receiver could not keep up and its connection was closed.
    SlowConsumer,
    /// An internal error in the broker or agent.
    Internal,
    /// The caller cancelled the call (or went away) before its answer.
    Cancelled,
    /// A code this build does not know.
    Unknown(u16),
}

const CODES: &[(ErrorCode, u16, &str)] = &[
    (ErrorCode::NoRoute, 1, "NO_ROUTE"),
    (ErrorCode::Timeout, 2, "TIMEOUT"),
    (ErrorCode::AgentUnavailable, 3, "AGENT_UNAVAILABLE"),
    (ErrorCode::PermissionDenied, 4, "PERMISSION_DENIED"),
    (ErrorCode::InvalidSignature, 5, "INVALID_SIGNATURE"),
    (ErrorCode::Replayed, 6, "REPLAYED"),
    (ErrorCode::StaleTimestamp, 7, "STALE_TIMESTAMP"),
    (ErrorCode::RateLimited, 8, "RATE_LIMITED"),
    (ErrorCode::BadRequest, 9, "BAD_REQUEST"),
    (ErrorCode::TooLarge, 10, "TOO_LARGE"),
    (ErrorCode::NotRegistered, 11, "NOT_REGISTERED"),
    (ErrorCode::IdConflict, 12, "ID_CONFLICT"),
    (ErrorCode::ToolNotFound, 13, "TOOL_NOT_FOUND"),
    (ErrorCode::ToolFailed, 14, "TOOL_FAILED"),
    (ErrorCode::ShuttingDown, 15, "SHUTTING_DOWN"),
    (ErrorCode::TooManyConnections, 16, "TOO_MANY_CONNECTIONS"),
    (ErrorCode::SlowConsumer, 17, "SLOW_CONSUMER"),
    (ErrorCode::Internal, 18, "INTERNAL"),
    (ErrorCode::Cancelled, 19, "CANCELLED"),
];

impl ErrorCode {
    /// The stable numeric code.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Unknown(n) => n,
            c => CODES.iter().find(|e| e.0 == c).map_or(0, |e| e.1),
        }
    }
    /// From the numeric code; unknown numbers give [`ErrorCode::Unknown`].
    pub fn from_u16(n: u16) -> Self {
        CODES
            .iter()
            .find(|e| e.1 == n)
            .map_or(Self::Unknown(n), |e| e.0)
    }
    /// The `SCREAMING_SNAKE_CASE` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown(_) => "UNKNOWN",
            c => CODES.iter().find(|e| e.0 == c).map_or("UNKNOWN", |e| e.2),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "UNKNOWN({n})"),
            c => f.write_str(c.as_str()),
        }
    }
}

impl FromStr for ErrorCode {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CODES
            .iter()
            .find(|e| e.2 == s)
            .map(|e| e.0)
            .ok_or_else(|| ProtoError::UnknownErrorCode(s.chars().take(40).collect()))
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (s.is_human_readable(), self) {
            // A code this build does not know keeps its number in JSON too.
            (true, Self::Unknown(n)) => s.serialize_u16(*n),
            (true, c) => s.serialize_str(c.as_str()),
            (false, c) => s.serialize_u16(c.as_u16()),
        }
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ErrorCode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an error code name or number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ErrorCode, E> {
                Ok(u16::try_from(v).map_or(ErrorCode::Unknown(0), ErrorCode::from_u16))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ErrorCode, E> {
                Ok(u16::try_from(v).map_or(ErrorCode::Unknown(0), ErrorCode::from_u16))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ErrorCode, E> {
                // A name from a newer peer is not an error: it is unknown here.
                Ok(v.parse().unwrap_or(ErrorCode::Unknown(0)))
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(V)
        } else {
            u16::deserialize(d).map(Self::from_u16)
        }
    }
}

/// Errors of the protocol crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// An id failed validation.
    #[error("invalid id {0:?}: 1-128 characters of [A-Za-z0-9._:@/-]")]
    InvalidId(String),
    /// A capability, pattern or tool name failed validation.
    #[error("invalid name {0:?}: dot-separated segments of [A-Za-z0-9_-]")]
    InvalidName(String),
    /// An error code name this build does not know.
    #[error("unknown error code {0:?}")]
    UnknownErrorCode(String),
    /// Hex text of the wrong length or alphabet.
    #[error("invalid hex for {0}")]
    InvalidHex(&'static str),
    /// The bytes do not decode.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
    /// A frame exceeds the maximum size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The signature does not verify.
    #[error("invalid signature")]
    InvalidSignature,
    /// A public key that cannot stand for an identity: not a curve point, or
    /// of small order (anyone can sign for it under ZIP 215).
    #[error("public key refused: not a curve point, or of small order")]
    WeakKey,
    /// The nonce was seen before within the window.
    #[error("replayed envelope (nonce already seen)")]
    Replayed,
    /// The timestamp is outside the window.
    #[error("timestamp {ts} ms is outside the {window_ms} ms window around {now} ms")]
    StaleTimestamp {
        /// Envelope timestamp.
        ts: u64,
        /// Receiver clock.
        now: u64,
        /// Accepted skew either side.
        window_ms: u64,
    },
    /// Too many nonces held for one sender within the window.
    #[error("too many envelopes from one sender within the replay window")]
    RateLimited,
    /// Encoding failed (only on absurd inputs).
    #[error("encode: {0}")]
    Encode(String),
}

impl ProtoError {
    /// The wire error code that reports this error to a peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidId(_)
            | Self::InvalidName(_)
            | Self::UnknownErrorCode(_)
            | Self::InvalidHex(_)
            | Self::Malformed { .. }
            | Self::WeakKey => ErrorCode::BadRequest,
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::InvalidSignature => ErrorCode::InvalidSignature,
            Self::Replayed => ErrorCode::Replayed,
            Self::StaleTimestamp { .. } => ErrorCode::StaleTimestamp,
            Self::RateLimited => ErrorCode::RateLimited,
            Self::Encode(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for (c, n, s) in CODES {
            assert_eq!(ErrorCode::from_u16(*n), *c);
            assert_eq!(c.as_u16(), *n);
            assert_eq!(s.parse::<ErrorCode>().unwrap(), *c);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown(999));
        let unknown = serde_json::to_string(&ErrorCode::Unknown(999)).unwrap();
        assert_eq!(
            serde_json::from_str::<ErrorCode>(&unknown).unwrap(),
            ErrorCode::Unknown(999)
        );
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"FROM_THE_FUTURE\"").unwrap(),
            ErrorCode::Unknown(0)
        );
        let json = serde_json::to_string(&ErrorCode::NoRoute).unwrap();
        assert_eq!(json, "\"NO_ROUTE\"");
    }
}
