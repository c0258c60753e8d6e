//! Identifiers that cannot hold invalid values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ProtoError;
use crate::serde_util::{de_bytes, ser_bytes};

/// Maximum length of an agent or broker id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Maximum length of a capability or tool name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// An agent (or broker) id: 1..=128 bytes of `[A-Za-z0-9._:@/-]`.
///
/// Kubernetes node names, host names and UUIDs all fit.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

impl AgentId {
    /// Validates and wraps an id.
    ///
    /// # Errors
    /// [`ProtoError::InvalidId`] when empty, too long or with a forbidden character.
    pub fn new(s: impl Into<String>) -> Result<Self, ProtoError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b));
        if ok {
            Ok(Self(s))
        } else {
            Err(ProtoError::InvalidId(truncate_for_error(&s)))
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate_for_error(s: &str) -> String {
    s.chars().take(64).collect()
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({})", self.0)
    }
}
impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl FromStr for AgentId {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}
impl Serialize for AgentId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(s.into_owned()).map_err(serde::de::Error::custom)
    }
}

fn valid_segment(seg: &str, wildcard_ok: bool) -> bool {
    (wildcard_ok && seg == "*")
        || (!seg.is_empty()
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
}

macro_rules! dotted_name {
    ($(#[$m:meta])* $name:ident, wildcard = $wild:expr) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a dotted name.
            ///
            /// # Errors
            /// [`ProtoError::InvalidName`] when a segment is empty or has a forbidden character.
            pub fn new(s: impl Into<String>) -> Result<Self, ProtoError> {
                let s = s.into();
                if s.len() <= MAX_NAME_LEN && s.split('.').all(|seg| valid_segment(seg, $wild)) {
                    Ok(Self(s))
                } else {
                    Err(ProtoError::InvalidName(truncate_for_error(&s)))
                }
            }
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $name {
            type Err = ProtoError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(s.into_owned()).map_err(serde::de::Error::custom)
            }
        }
    };
}

dotted_name!(
    /// A concrete capability or tool name such as `shell.run`: dot-separated
    /// segments of `[A-Za-z0-9_-]`.
    Capability,
    wildcard = false
);

dotted_name!(
    /// A capability pattern: like [`Capability`], but a segment may be `*`,
    /// which matches exactly one segment (`shell.*` matches `shell.run`, not
    /// `shell` nor `shell.run.fast`).
    CapabilityPattern,
    wildcard = true
);

impl CapabilityPattern {
    /// Whether the pattern matches a concrete capability.
    pub fn matches(&self, cap: &Capability) -> bool {
        let mut p = self.0.split('.');
        let mut c = cap.0.split('.');
        loop {
            match (p.next(), c.next()) {
                (None, None) => return true,
                (Some(ps), Some(cs)) if ps == "*" || ps == cs => {}
                _ => return false,
            }
        }
    }

    /// True when the pattern has no wildcard (an exact-name lookup suffices).
    pub fn is_exact(&self) -> bool {
        !self.0.split('.').any(|s| s == "*")
    }
}

impl From<Capability> for CapabilityPattern {
    fn from(c: Capability) -> Self {
        Self(c.0)
    }
}

macro_rules! byte_id {
    ($(#[$m:meta])* $name:ident, $n:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $n]);

        impl $name {
            /// A fresh random value from the thread's CSPRNG (ChaCha, seeded
            /// and periodically reseeded from the operating system): one per
            /// envelope, so no system call each time.
            pub fn random() -> Self {
                use rand::RngCore as _;
                let mut b = [0u8; $n];
                rand::thread_rng().fill_bytes(&mut b);
                Self(b)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl FromStr for $name {
            type Err = ProtoError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut b = [0u8; $n];
                hex::decode_to_slice(s, &mut b)
                    .map_err(|_| ProtoError::InvalidHex(stringify!($name)))?;
                Ok(Self(b))
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                ser_bytes(&self.0, s)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                de_bytes(d).map(Self)
            }
        }
    };
}

byte_id!(
    /// A 128-bit random nonce; with the timestamp it makes every envelope unique.
    Nonce,
    16
);
byte_id!(
    /// A 128-bit request id chosen by the caller; correlates a toolCall (or
    /// discoverTools) with its answer.
    RequestId,
    16
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids() {
        assert!(AgentId::new("node-17.example.com").is_ok());
        assert!(AgentId::new("").is_err());
        assert!(AgentId::new("a b").is_err());
        assert!(AgentId::new("x".repeat(129)).is_err());
    }

    #[test]
    fn patterns() {
        let p = |s| CapabilityPattern::new(s).unwrap();
        let c = |s| Capability::new(s).unwrap();
        assert!(p("shell.run").matches(&c("shell.run")));
        assert!(p("shell.*").matches(&c("shell.run")));
        assert!(!p("shell.*").matches(&c("shell")));
        assert!(!p("shell.*").matches(&c("shell.run.fast")));
        assert!(p("*.run").matches(&c("shell.run")));
        assert!(!p("code.*").matches(&c("shell.run")));
        assert!(Capability::new("shell.*").is_err());
        assert!(Capability::new("shell..run").is_err());
        assert!(p("shell.run").is_exact());
        assert!(!p("shell.*").is_exact());
    }
}
