//! Transport frames and length-delimited framing.
//!
//! On the wire a frame is a 4-byte big-endian length `n` followed by `n`
//! bytes of postcard-encoded [`Frame`]. Receivers refuse a length above their
//! maximum *before* reading or allocating the payload.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ProtoError};
use crate::ids::{AgentId, Capability, Nonce, RequestId};
use crate::keys::PublicKey;
use crate::signed::{SignedEnvelope, UnsignedEnvelope};

/// Default maximum frame payload: 4 MiB.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;
/// Length prefix size.
pub const FRAME_HEADER_LEN: usize = 4;

/// Room kept in a frame for what brokers wrap around a forwarded envelope
/// (a delivery's signer key, a relay's ids and the caller's grant chain).
pub const FORWARD_OVERHEAD: usize = 16 * 1024;

/// The largest envelope (its `bytes`) that can cross brokers whose maximum
/// frame is `max_frame`: larger ones are refused TOO_LARGE where they enter.
pub fn max_forwarded_envelope(max_frame: usize) -> usize {
    max_frame.saturating_sub(FORWARD_OVERHEAD)
}

/// What the broker tells an agent whose registration it accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    /// The registered id.
    pub agent_id: AgentId,
    /// The broker's id.
    pub broker_id: AgentId,
    /// The broker's identity key (it signs toolsDiscovered).
    pub broker_key: PublicKey,
    /// How often the broker expects a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Silence longer than this evicts the agent.
    pub grace_ms: u64,
    /// The broker's maximum frame size.
    pub max_frame: u32,
}

/// A transport message between a client (agent or caller) and a broker.
/// postcard encodes variants by index: only append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Frame {
    /// Client to broker: an envelope signed by the session's agent.
    Envelope(SignedEnvelope),
    /// Broker to client: a relayed envelope and the key the broker holds for
    /// its sender, so the recipient can verify it.
    Deliver {
        /// The envelope, bytes untouched.
        envelope: SignedEnvelope,
        /// The sender's registered public key.
        signer: PublicKey,
    },
    /// Registration accepted.
    Accepted(Accepted),
    /// Registration refused; the broker closes the connection.
    Denied {
        /// Why.
        code: ErrorCode,
        /// Detail.
        reason: String,
    },
    /// Liveness probe (either direction).
    Heartbeat {
        /// Echoed by the ack.
        seq: u64,
    },
    /// Answer to a heartbeat.
    HeartbeatAck {
        /// The probe's sequence number.
        seq: u64,
    },
    /// Terminal failure of a toolCall or discoverTools.
    CallFailed {
        /// The request.
        request_id: RequestId,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// An envelope or request (by its nonce) was accepted.
    Ack {
        /// Nonce of the acknowledged envelope or subscription.
        nonce: Nonce,
    },
    /// An envelope or request (by its nonce) was refused.
    Nack {
        /// Nonce of the refused envelope or subscription.
        nonce: Nonce,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Subscribe the session to an event topic.
    Subscribe {
        /// Correlates the ack.
        nonce: Nonce,
        /// Topic.
        topic: Capability,
    },
    /// Unsubscribe from a topic.
    Unsubscribe {
        /// Correlates the ack.
        nonce: Nonce,
        /// Topic.
        topic: Capability,
    },
    /// Connection-level error; the sender closes the connection after it.
    Error {
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// A grant (section "Trust" of proto/README.md). Client to broker: the
    /// client's own grant, sent before its registerAgent. Broker to agent:
    /// the grant of a caller, sent before that caller's first call reaches
    /// the session, so the agent can check the call end to end.
    Grant(crate::grant::SignedGrant),
    /// Cancel a call. Caller to broker: the session's own call `request_id`
    /// (the broker answers it `CANCELLED` and forgets it). Broker to agent:
    /// stop the call the session is running under `request_id`; no answer
    /// is expected. Unsigned: only the session that made a call can cancel
    /// it, and a broker that could forge a cancel could drop the call anyway.
    Cancel {
        /// The call.
        request_id: RequestId,
    },
    /// Progress of a call in flight. Agent to broker for the call it runs
    /// under `request_id`; broker to caller for its call. Advisory and
    /// unsigned, like a cancel: brokers drop updates that come too fast.
    Progress {
        /// The call.
        request_id: RequestId,
        /// The update.
        update: ProgressUpdate,
    },
    /// Client to broker: an envelope without a signature, vouched for by
    /// the session (broker-attested mode, proto/README.md §8.14): a
    /// toolCall to a tool that accepts attested calls, the toolResult of an
    /// attested call, or an emitEvent.
    Unsigned(UnsignedEnvelope),
    /// Broker to client: an unsigned envelope, the key the broker holds for
    /// its sender, and the broker that attests the sender (where it entered).
    Attested {
        /// The envelope, bytes untouched.
        envelope: UnsignedEnvelope,
        /// The sender's registered public key.
        signer: PublicKey,
        /// The broker that vouches for the sender.
        attested_by: AgentId,
    },
}

/// How far a call has come, as the agent reports it (the fields of MCP's
/// `notifications/progress`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressUpdate {
    /// Progress so far; should increase with every update.
    pub progress: f64,
    /// The total, when known.
    pub total: Option<f64>,
    /// A short human message.
    pub message: Option<String>,
}

// Frames compare numbers bit for bit once `checked` has refused NaN.
impl Eq for ProgressUpdate {}

impl ProgressUpdate {
    /// Longest message forwarded, in bytes.
    pub const MAX_MESSAGE_BYTES: usize = 1024;

    /// The update if its numbers are finite, with its message cut to
    /// [`Self::MAX_MESSAGE_BYTES`] at a character boundary.
    pub fn checked(mut self) -> Option<Self> {
        if !self.progress.is_finite() || self.total.is_some_and(|t| !t.is_finite()) {
            return None;
        }
        if let Some(m) = &mut self.message
            && m.len() > Self::MAX_MESSAGE_BYTES
        {
            let mut end = Self::MAX_MESSAGE_BYTES;
            while !m.is_char_boundary(end) {
                end -= 1;
            }
            m.truncate(end);
        }
        Some(self)
    }
}

/// Appends the length-prefixed encoding of `frame` to `out`.
///
/// # Errors
/// [`ProtoError::Encode`] on serialisation failure; [`ProtoError::TooLarge`]
/// when the payload exceeds `max`.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>, max: usize) -> Result<(), ProtoError> {
    encode_message(frame, out, max)
}

/// [`encode_frame`] for any message type (e.g. [`FedFrame`](crate::FedFrame)).
///
/// # Errors
/// As [`encode_frame`].
pub fn encode_message<T: Serialize>(
    frame: &T,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), ProtoError> {
    /// Appends into the caller's buffer without taking ownership of it, so
    /// an encoding error leaves earlier frames in `out` intact.
    struct Sink<'a>(&'a mut Vec<u8>);
    impl Extend<u8> for Sink<'_> {
        fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
            self.0.extend(iter);
        }
    }
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    if let Err(e) = postcard::to_extend(frame, Sink(out)) {
        out.truncate(start);
        return Err(ProtoError::Encode(e.to_string()));
    }
    let len = out.len() - start - FRAME_HEADER_LEN;
    if len > max {
        out.truncate(start);
        return Err(ProtoError::TooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| ProtoError::TooLarge { len, max })?;
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// Reads the payload length from a frame header, refusing lengths above `max`.
///
/// # Errors
/// [`ProtoError::TooLarge`].
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        Err(ProtoError::TooLarge { len, max })
    } else {
        Ok(len)
    }
}

/// Decodes one frame payload (without its length prefix). Trailing bytes are an error.
///
/// # Errors
/// [`ProtoError::Malformed`].
pub fn decode_frame_payload(payload: &[u8]) -> Result<Frame, ProtoError> {
    decode_message(payload)
}

/// [`decode_frame_payload`] for any message type.
///
/// # Errors
/// [`ProtoError::Malformed`].
pub fn decode_message<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    let (frame, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| ProtoError::Malformed {
            what: "frame",
            detail: e.to_string(),
        })?;
    if rest.is_empty() {
        Ok(frame)
    } else {
        Err(ProtoError::Malformed {
            what: "frame",
            detail: format!("{} trailing bytes", rest.len()),
        })
    }
}

/// Received bytes above this are released once every frame in them has been
/// taken, so an idle connection does not keep the buffer of a large frame.
const KEEP_BUFFER: usize = 64 * 1024;

/// Incremental decoder of a byte stream into frames (sans-IO): push bytes as
/// they arrive, pull complete frames.
///
/// Memory stays within one maximum frame plus the bytes pushed at once: the
/// buffer grows only with bytes pushed (a declared length is never reserved
/// ahead), and a length above the maximum is refused as soon as its 4-byte
/// header is in, before any of its payload is needed.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset belong to frames already taken.
    start: usize,
    max: usize,
}

impl FrameDecoder {
    /// A decoder refusing payloads above `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Changes the maximum for frames not yet taken (a broker raises it
    /// once a session has registered).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            // Drop the frames already taken before growing.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes pushed but not yet taken as frames (a partial frame, or frames
    /// not yet pulled). Zero at a frame boundary.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// [`ProtoError::TooLarge`] or [`ProtoError::Malformed`]; the stream is
    /// unusable afterwards.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        self.next_message()
    }

    /// [`Self::next_frame`] for any message type (e.g. [`FedFrame`](crate::FedFrame)).
    ///
    /// # Errors
    /// As [`Self::next_frame`].
    pub fn next_message<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Result<Option<T>, ProtoError> {
        let pending = &self.buf[self.start..];
        let Some(header) = pending.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(header);
        let len = frame_len(h, self.max)?;
        let Some(payload) = pending.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
            return Ok(None);
        };
        let message = decode_message(payload)?;
        self.start += FRAME_HEADER_LEN + len;
        if self.start == self.buf.len() {
            self.start = 0;
            if self.buf.capacity() > KEEP_BUFFER {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        }
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::FedFrame;

    #[test]
    fn next_message_decodes_other_types() {
        let mut buf = Vec::new();
        encode_message(&FedFrame::Ping { seq: 7 }, &mut buf, DEFAULT_MAX_FRAME).unwrap();
        encode_message(&FedFrame::Ping { seq: 8 }, &mut buf, DEFAULT_MAX_FRAME).unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&buf[..buf.len() - 1]);
        assert_eq!(
            dec.next_message::<FedFrame>().unwrap(),
            Some(FedFrame::Ping { seq: 7 })
        );
        assert_eq!(dec.next_message::<FedFrame>().unwrap(), None);
        assert!(dec.buffered() > 0);
        dec.push(&buf[buf.len() - 1..]);
        assert_eq!(
            dec.next_message::<FedFrame>().unwrap(),
            Some(FedFrame::Ping { seq: 8 })
        );
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn declared_length_is_not_reserved() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let len = u32::try_from(DEFAULT_MAX_FRAME).unwrap();
        dec.push(&len.to_be_bytes());
        dec.push(&[0; 16]);
        assert_eq!(dec.next_frame().unwrap(), None);
        assert!(dec.buf.capacity() < 1024, "{}", dec.buf.capacity());
    }

    #[test]
    fn large_buffer_released_at_a_frame_boundary() {
        let big = Frame::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(2 * KEEP_BUFFER),
        };
        let mut buf = Vec::new();
        encode_frame(&big, &mut buf, DEFAULT_MAX_FRAME).unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&buf);
        assert_eq!(dec.next_frame().unwrap(), Some(big));
        assert_eq!(dec.buf.capacity(), 0);
    }
}
