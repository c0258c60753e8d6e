//! The MCP endpoint's configuration: the library struct, and the `mcp:`
//! section of the broker's YAML file that loads into it (see docs/mcp.md).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fem_proto::{AgentId, CapabilityPattern, SignedGrant, SigningKey};
use serde::Deserialize;
use sha2::Digest as _;

use crate::BrokerError;

/// Settings of `/mcp` (on the TLS port) and of the optional plain-HTTP
/// listener.
#[derive(Clone, Debug)]
pub struct McpConfig {
    /// Plain-HTTP listener for `/mcp` on a loopback address (off by default).
    pub listen: Option<SocketAddr>,
    /// Bearer-token principals: whoever presents a token acts as its principal.
    pub principals: Vec<McpPrincipal>,
    /// Named subsets served at `/mcp/<name>`.
    pub views: Vec<McpView>,
    /// Browser origins allowed to call (`scheme://host[:port]`); a request
    /// with any other `Origin` header is refused with 403.
    pub allowed_origins: Vec<String>,
    /// Deadline of a `tools/call`.
    pub call_timeout: Duration,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            listen: None,
            principals: Vec::new(),
            views: Vec::new(),
            allowed_origins: Vec::new(),
            call_timeout: Duration::from_secs(60),
        }
    }
}

/// A principal the broker signs calls for, on behalf of clients presenting
/// its bearer token.
#[derive(Clone, Debug)]
pub struct McpPrincipal {
    /// The id the calls are signed as (the caller agents see).
    pub id: AgentId,
    /// Its key (the broker holds it: see docs/mcp.md on the trust this implies).
    pub key: SigningKey,
    /// Its grant (required with a trust anchor): what it may call.
    pub grant: Option<SignedGrant>,
    /// SHA-256 of the bearer token.
    pub token_sha256: [u8; 32],
}

/// A named subset of the federation's tools, served at `/mcp/<name>`.
#[derive(Clone, Debug)]
pub struct McpView {
    /// The path segment.
    pub name: String,
    /// Only agents with a capability matching one of these (empty: any).
    pub capabilities: Vec<CapabilityPattern>,
    /// Only tools whose FEM name matches one of these (empty: any).
    pub tools: Vec<CapabilityPattern>,
}

impl McpView {
    /// Whether the view shows `tool` offered by an agent with `capabilities`.
    pub(crate) fn shows(
        &self,
        tool: &fem_proto::Capability,
        capabilities: &[fem_proto::Capability],
    ) -> bool {
        (self.capabilities.is_empty()
            || capabilities
                .iter()
                .any(|c| self.capabilities.iter().any(|p| p.matches(c))))
            && (self.tools.is_empty() || self.tools.iter().any(|p| p.matches(tool)))
    }
}

/// The `mcp:` section of the broker's YAML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpFile {
    /// Plain-HTTP listener (loopback only).
    pub listen: Option<String>,
    /// Allowed browser origins.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Deadline of a `tools/call`, e.g. `60s`.
    pub call_timeout: Option<String>,
    /// Bearer-token principals.
    #[serde(default)]
    pub principals: Vec<McpFilePrincipal>,
    /// Views by name.
    #[serde(default)]
    pub views: std::collections::BTreeMap<String, McpFileView>,
}

/// One principal in the YAML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpFilePrincipal {
    /// Principal id.
    pub id: String,
    /// SHA-256 of the token, in hex (`printf %s TOKEN | sha256sum`).
    pub token_sha256: Option<String>,
    /// A file holding the token itself (trimmed).
    pub token_file: Option<PathBuf>,
    /// The principal's private key file (hex seed, as `fem keygen` writes).
    pub key_file: PathBuf,
    /// The principal's grant file (`fem trust grant`).
    pub grant_file: Option<PathBuf>,
}

/// One view in the YAML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpFileView {
    /// Capability patterns.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Tool name patterns.
    #[serde(default)]
    pub tools: Vec<String>,
}

fn bad(what: impl std::fmt::Display) -> BrokerError {
    BrokerError::Config(format!("mcp: {what}"))
}

fn read(path: &Path) -> Result<String, BrokerError> {
    std::fs::read_to_string(path).map_err(|e| BrokerError::io(path, e))
}

impl McpFile {
    /// Reads the files the section names and checks every value. `listen`
    /// is returned unparsed (the binary resolves addresses).
    ///
    /// # Errors
    /// [`BrokerError::Config`] for an invalid value, [`BrokerError::Io`] or
    /// [`BrokerError::Net`] for an unreadable file.
    pub fn load(self) -> Result<(McpConfig, Option<String>), BrokerError> {
        let d = McpConfig::default();
        let call_timeout = match &self.call_timeout {
            Some(t) => {
                humantime::parse_duration(t).map_err(|e| bad(format!("call_timeout: {e}")))?
            }
            None => d.call_timeout,
        };
        let mut principals = Vec::new();
        for p in self.principals {
            let id = AgentId::new(p.id.as_str()).map_err(|e| bad(format!("principal id: {e}")))?;
            let token_sha256 = match (&p.token_sha256, &p.token_file) {
                (Some(h), None) => {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(h.trim(), &mut out).map_err(|_| {
                        bad(format!("principal {id}: token_sha256 is not 64 hex digits"))
                    })?;
                    out
                }
                (None, Some(f)) => {
                    let token = read(f)?;
                    let token = token.trim();
                    if token.is_empty() {
                        return Err(bad(format!("principal {id}: {} is empty", f.display())));
                    }
                    sha2::Sha256::digest(token.as_bytes()).into()
                }
                _ => {
                    return Err(bad(format!(
                        "principal {id}: give exactly one of token_sha256 and token_file"
                    )));
                }
            };
            let key = fem_net::keys::load_key(&p.key_file)?;
            let grant = match &p.grant_file {
                Some(f) => Some(
                    SignedGrant::from_text(&read(f)?)
                        .map_err(|e| bad(format!("principal {id}: {}: {e}", f.display())))?,
                ),
                None => None,
            };
            principals.push(McpPrincipal {
                id,
                key,
                grant,
                token_sha256,
            });
        }
        let mut views = Vec::new();
        for (name, v) in self.views {
            if !super::names::valid(&name) {
                return Err(bad(format!("view name {name:?}: use [A-Za-z0-9_-]")));
            }
            let pats = |list: &[String]| {
                list.iter()
                    .map(|s| {
                        CapabilityPattern::new(s.as_str())
                            .map_err(|e| bad(format!("view {name}: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            views.push(McpView {
                capabilities: pats(&v.capabilities)?,
                tools: pats(&v.tools)?,
                name,
            });
        }
        Ok((
            McpConfig {
                listen: None,
                principals,
                views,
                allowed_origins: self.allowed_origins,
                call_timeout,
            },
            self.listen,
        ))
    }
}
