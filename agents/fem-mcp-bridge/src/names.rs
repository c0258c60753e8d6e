//! The name rule: how an MCP tool name becomes a FEM tool name.
//!
//! FEM tool names are dot-separated segments of `[A-Za-z0-9_-]`, at most
//! 128 bytes (`fem_proto::Capability`). MCP tool names are free text in
//! practice. The rule, applied to each MCP tool name:
//!
//! 1. ASCII letters are lowercased; `a-z`, `0-9`, `_` and `-` are kept;
//!    every other character (`.`, `/`, space, any non-ASCII character) becomes
//!    one `_`. An empty name becomes `_`.
//! 2. The result is prefixed with the capability and a dot:
//!    `--capability time` and `get_current_time` give `time.get_current_time`.
//!    The derived part is a single segment, so the grant and discovery
//!    pattern `time.*` covers exactly the bridge's tools.
//! 3. When the whole name would exceed 128 bytes, the derived part is cut and
//!    `-` plus 8 hex digits of the FNV-1a hash of the MCP name are appended.
//!
//! `--tool-name MCP=FEM` replaces the rule for one tool by a full FEM name.
//! Two MCP tools that end with the same FEM name are refused
//! ([`NameError::Collision`]): the bridge does not start, and names the
//! tools and the override to add.

use std::collections::BTreeMap;

use fem_proto::{Capability, MAX_NAME_LEN};

/// Why a set of MCP tool names has no FEM names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum NameError {
    /// Two MCP tools map to one FEM name.
    #[error(
        "MCP tools {first:?} and {second:?} both map to the FEM tool name {fem}; \
         give one of them another name with --tool-name {second}=NAME"
    )]
    Collision {
        /// The FEM name.
        fem: String,
        /// One MCP tool.
        first: String,
        /// The other.
        second: String,
    },
    /// The derived name is not a valid FEM name (only for a capability
    /// too long to leave room for any tool part).
    #[error("MCP tool {mcp:?}: no valid FEM name under capability {capability}: {reason}")]
    Invalid {
        /// The MCP tool.
        mcp: String,
        /// The capability.
        capability: String,
        /// Why.
        reason: String,
    },
}

/// The FEM name of MCP tool `mcp` under `capability` by the rule (no overrides).
///
/// # Errors
/// [`NameError::Invalid`] when the capability leaves no room for a tool part.
pub(crate) fn derive_name(capability: &Capability, mcp: &str) -> Result<Capability, NameError> {
    let mut part: String = mcp
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if part.is_empty() {
        part.push('_');
    }
    let prefix = capability.as_str().len() + 1;
    if prefix + part.len() > MAX_NAME_LEN {
        let suffix = format!("-{:08x}", fnv1a(mcp.as_bytes()));
        let keep = MAX_NAME_LEN.saturating_sub(prefix + suffix.len());
        // ASCII only after the mapping, so any byte index is a char boundary.
        part.truncate(keep);
        part.push_str(&suffix);
    }
    Capability::new(format!("{capability}.{part}")).map_err(|e| NameError::Invalid {
        mcp: mcp.to_owned(),
        capability: capability.to_string(),
        reason: e.to_string(),
    })
}

/// FEM names for every MCP tool in `tools` (in their order): the override
/// when `overrides` has one, else [`derive_name`].
///
/// # Errors
/// [`NameError::Collision`] when two tools end with the same FEM name;
/// [`NameError::Invalid`] as [`derive_name`].
pub(crate) fn map_all<'a>(
    capability: &Capability,
    tools: impl IntoIterator<Item = &'a str>,
    overrides: &BTreeMap<String, Capability>,
) -> Result<Vec<(String, Capability)>, NameError> {
    let mut seen: BTreeMap<Capability, String> = BTreeMap::new();
    let mut out = Vec::new();
    for mcp in tools {
        let fem = match overrides.get(mcp) {
            Some(f) => f.clone(),
            None => derive_name(capability, mcp)?,
        };
        if let Some(first) = seen.get(&fem) {
            return Err(NameError::Collision {
                fem: fem.to_string(),
                first: first.clone(),
                second: mcp.to_owned(),
            });
        }
        seen.insert(fem.clone(), mcp.to_owned());
        out.push((mcp.to_owned(), fem));
    }
    Ok(out)
}

/// 32-bit FNV-1a: a fixed, dependency-free hash for the length rule.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cap(s: &str) -> Capability {
        Capability::new(s).unwrap()
    }

    #[test]
    fn plain_names_are_prefixed_with_the_capability() {
        let c = cap("time");
        assert_eq!(
            derive_name(&c, "get_current_time").unwrap().as_str(),
            "time.get_current_time"
        );
        assert_eq!(
            derive_name(&c, "convert-time").unwrap().as_str(),
            "time.convert-time"
        );
        assert_eq!(
            derive_name(&cap("mcp.files"), "read").unwrap().as_str(),
            "mcp.files.read"
        );
    }

    #[test]
    fn invalid_characters_become_underscores_and_letters_lowercase() {
        let c = cap("x");
        assert_eq!(derive_name(&c, "GetTime").unwrap().as_str(), "x.gettime");
        assert_eq!(
            derive_name(&c, "files.read").unwrap().as_str(),
            "x.files_read"
        );
        assert_eq!(derive_name(&c, "a/b c:d").unwrap().as_str(), "x.a_b_c_d");
        assert_eq!(derive_name(&c, "héllo").unwrap().as_str(), "x.h_llo");
        assert_eq!(derive_name(&c, "").unwrap().as_str(), "x._");
        assert_eq!(derive_name(&c, "..").unwrap().as_str(), "x.__");
    }

    #[test]
    fn long_names_are_cut_with_a_hash_and_stay_distinct() {
        let c = cap("cap");
        let a = "a".repeat(200);
        let b = format!("{}b", "a".repeat(199));
        let (fa, fb) = (derive_name(&c, &a).unwrap(), derive_name(&c, &b).unwrap());
        assert_eq!(fa.as_str().len(), MAX_NAME_LEN);
        assert_eq!(fb.as_str().len(), MAX_NAME_LEN);
        assert_ne!(fa, fb);
        // Deterministic.
        assert_eq!(derive_name(&c, &a).unwrap(), fa);
    }

    #[test]
    fn a_capability_without_room_is_refused() {
        let c = cap(&"c".repeat(MAX_NAME_LEN));
        assert!(matches!(
            derive_name(&c, "t"),
            Err(NameError::Invalid { .. })
        ));
    }

    #[test]
    fn collisions_are_refused_and_overrides_resolve_them() {
        let c = cap("t");
        let err = map_all(&c, ["Get-Time", "get-time"], &BTreeMap::new()).unwrap_err();
        assert_eq!(
            err,
            NameError::Collision {
                fem: "t.get-time".into(),
                first: "Get-Time".into(),
                second: "get-time".into(),
            }
        );
        assert!(err.to_string().contains("--tool-name get-time=NAME"));
        let err = map_all(&c, ["a.b", "a/b"], &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, NameError::Collision { .. }));

        let mut o = BTreeMap::new();
        o.insert("get-time".to_owned(), cap("t.lower"));
        let m = map_all(&c, ["Get-Time", "get-time"], &o).unwrap();
        assert_eq!(
            m,
            vec![
                ("Get-Time".to_owned(), cap("t.get-time")),
                ("get-time".to_owned(), cap("t.lower")),
            ]
        );
    }

    #[test]
    fn an_override_may_not_take_another_tools_name() {
        let c = cap("t");
        let mut o = BTreeMap::new();
        o.insert("b".to_owned(), cap("t.a"));
        assert!(matches!(
            map_all(&c, ["a", "b"], &o),
            Err(NameError::Collision { .. })
        ));
    }
}
