//! Who is calling `/mcp`: a bearer token mapped to a principal whose calls
//! the broker signs; a request signed by the caller's own key (its calls
//! are broker-attested); or, in development trust with no principal
//! configured, a development principal for requests without a token.

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use fem_proto::{AgentId, PublicKey, SignedGrant, SigningKey};
use sha2::Digest as _;

use super::config::{McpConfig, McpPrincipal};
use crate::BrokerError;

/// The id of the development principal.
pub(crate) const DEV_PRINCIPAL: &str = "mcp-dev";

/// Who a request calls as.
#[derive(Debug)]
pub(crate) struct Principal {
    pub(crate) id: AgentId,
    /// The key the broker signs this principal's calls with (token
    /// principals); `None` for a signed request, whose calls the broker
    /// attests instead (it holds no key of the caller's).
    pub(crate) key: Option<SigningKey>,
    pub(crate) public: PublicKey,
    pub(crate) grant: Option<SignedGrant>,
    /// `None`: the development principal (requests without a token).
    pub(super) token_sha256: Option<[u8; 32]>,
}

/// Why a request has no principal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AuthError {
    /// No `Authorization: Bearer` header, and no development principal.
    #[error("missing bearer token")]
    Missing,
    /// A token no principal has.
    #[error("wrong bearer token")]
    Wrong,
}

/// The principals of one broker.
#[derive(Debug)]
pub(crate) struct Principals {
    list: Vec<Arc<Principal>>,
}

impl Principals {
    /// The configured principals; with none and no trust anchor, the
    /// development principal (key in `data_dir/mcp-dev.key`, with a warning).
    /// With a trust anchor every principal needs a grant.
    ///
    /// # Errors
    /// [`BrokerError::Config`] for a principal without a grant under a trust
    /// anchor; [`BrokerError::Net`] when the development key cannot be made.
    pub(crate) fn new(
        cfg: &McpConfig,
        trust_enforced: bool,
        data_dir: &std::path::Path,
    ) -> Result<Self, BrokerError> {
        let mut list: Vec<Arc<Principal>> = cfg.principals.iter().map(from_config).collect();
        if trust_enforced {
            if let Some(p) = list.iter().find(|p| p.grant.is_none()) {
                return Err(BrokerError::Config(format!(
                    "mcp: principal {} needs a grant_file: this broker has a trust anchor",
                    p.id
                )));
            }
        } else if list.is_empty() {
            let key = fem_net::keys::load_or_generate_key(&data_dir.join("mcp-dev.key"))?;
            tracing::warn!(
                principal = DEV_PRINCIPAL,
                key = %key.public_key(),
                "development trust: /mcp serves requests without a bearer token as principal {DEV_PRINCIPAL}, signed by the broker; configure mcp.principals and a trust anchor for production"
            );
            list.push(Arc::new(Principal {
                id: AgentId::new(DEV_PRINCIPAL).map_err(|e| BrokerError::Config(e.to_string()))?,
                public: key.public_key(),
                key: Some(key),
                grant: None,
                token_sha256: None,
            }));
        }
        Ok(Self { list })
    }

    /// The principal of a request, from its `Authorization: Bearer` header.
    /// Tokens are compared as SHA-256 digests, in constant time, against
    /// every principal (no early exit).
    ///
    /// # Errors
    /// [`AuthError`] when the request has no principal.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, AuthError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return self
                .list
                .iter()
                .find(|p| p.token_sha256.is_none())
                .cloned()
                .ok_or(AuthError::Missing);
        };
        let given: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for p in &self.list {
            if let Some(want) = &p.token_sha256 {
                let diff = want
                    .iter()
                    .zip(given.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b));
                if diff == 0 && found.is_none() {
                    found = Some(Arc::clone(p));
                }
            }
        }
        found.ok_or(AuthError::Wrong)
    }
}

/// The principal of a request signed by its caller (`Fem-Signature`,
/// `Fem-Grant`, and `?as=ID` in the signed path): the id must be one the
/// grant lets the key register (in development trust, not bound to
/// another key). Its calls are broker-attested.
///
/// # Errors
/// As [`crate::listen::http::verify_signed`]; `BAD_REQUEST` without `as`.
pub(crate) fn signed(
    s: &crate::state::Shared,
    parts: &axum::http::request::Parts,
    sig: &axum::http::HeaderValue,
    body: &[u8],
) -> Result<Arc<Principal>, crate::route::admission::Refusal> {
    use fem_proto::ErrorCode;
    let uri = &parts.uri;
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path(), |p| p.as_str());
    let id = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("as="))
        .ok_or_else(|| {
            (
                ErrorCode::BadRequest,
                "a signed /mcp request names its caller: POST /mcp?as=ID".to_owned(),
            )
        })?;
    let id = AgentId::new(id).map_err(|e| (ErrorCode::BadRequest, format!("as={id}: {e}")))?;
    let r = crate::listen::http::verify_signed(
        s,
        &parts.headers,
        sig,
        parts.method.as_str(),
        path,
        body,
    )?;
    match &r.credential {
        Some(c) if !c.grant.may_register(&id) => {
            return Err((
                ErrorCode::PermissionDenied,
                format!("the grant does not bind id {id} to the signing key"),
            ));
        }
        Some(_) => {}
        None => s.trust.check_bound(&id, &r.key)?,
    }
    Ok(Arc::new(Principal {
        id,
        key: None,
        public: r.key,
        grant: r.credential.map(|c| c.signed.clone()),
        token_sha256: None,
    }))
}

fn from_config(p: &McpPrincipal) -> Arc<Principal> {
    Arc::new(Principal {
        id: p.id.clone(),
        public: p.key.public_key(),
        key: Some(p.key.clone()),
        grant: p.grant.clone(),
        token_sha256: Some(p.token_sha256),
    })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn principal(id: &str, token: &str) -> McpPrincipal {
        McpPrincipal {
            id: AgentId::new(id).unwrap(),
            key: SigningKey::generate(),
            grant: None,
            token_sha256: sha2::Sha256::digest(token.as_bytes()).into(),
        }
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn tokens_map_to_their_principals() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = McpConfig {
            principals: vec![principal("a", "ta"), principal("b", "tb")],
            ..McpConfig::default()
        };
        let p = Principals::new(&cfg, false, dir.path()).unwrap();
        assert_eq!(p.authenticate(&bearer("tb")).unwrap().id.as_str(), "b");
        assert_eq!(p.authenticate(&bearer("ta")).unwrap().id.as_str(), "a");
        assert!(matches!(
            p.authenticate(&bearer("tc")),
            Err(AuthError::Wrong)
        ));
        // Principals configured: no token, no principal.
        assert!(matches!(
            p.authenticate(&HeaderMap::new()),
            Err(AuthError::Missing)
        ));
    }

    #[test]
    fn development_principal_only_without_principals_and_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let p = Principals::new(&McpConfig::default(), false, dir.path()).unwrap();
        assert_eq!(
            p.authenticate(&HeaderMap::new()).unwrap().id.as_str(),
            DEV_PRINCIPAL
        );
        assert!(matches!(
            p.authenticate(&bearer("x")),
            Err(AuthError::Wrong)
        ));
        // With a trust anchor: no development principal.
        let p = Principals::new(&McpConfig::default(), true, dir.path()).unwrap();
        assert!(p.authenticate(&HeaderMap::new()).is_err());
        // And a principal without a grant is a configuration error.
        let cfg = McpConfig {
            principals: vec![principal("a", "ta")],
            ..McpConfig::default()
        };
        assert!(Principals::new(&cfg, true, dir.path()).is_err());
    }
}
