//! The SDK's errors: [`SdkError`] for connecting, [`CallError`] for what a
//! call, discovery or event answers.

use std::fmt;

use fem_proto::ErrorCode;

use crate::NetError;

/// Errors of the SDK (connection set-up, configuration).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A configuration the connection cannot be made with: the broker URL,
    /// certificate trust (a CA file, a pin) or TLS set-up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Could not connect to the broker.
    #[error("connect to {url}: {reason}")]
    Connect {
        /// Broker URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The broker refused the registration.
    #[error("registration refused: {code}: {reason}")]
    Denied {
        /// Code.
        code: ErrorCode,
        /// Reason given by the broker.
        reason: String,
    },
    /// A protocol error.
    #[error(transparent)]
    Proto(#[from] fem_proto::ProtoError),
}

impl SdkError {
    /// True for errors that retrying will not mend: [`SdkError::Config`]
    /// and [`SdkError::Net`] (a bad URL, CA file or pin).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Net(_))
    }
}

/// Where a call's error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This process (not connected, local deadline, bad arguments).
    Local,
    /// The broker (no route, timeout, agent unavailable, ...).
    Broker,
    /// The executing agent (the tool failed or refused).
    Agent,
}

/// A call, discovery or event that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    /// Typed code.
    pub code: ErrorCode,
    /// Message.
    pub message: String,
    /// Who reported it.
    pub origin: Origin,
}

impl CallError {
    pub(crate) fn local(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            origin: Origin::Local,
        }
    }
    /// The error code (to branch on).
    pub fn kind(&self) -> ErrorCode {
        self.code
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CallError {}
