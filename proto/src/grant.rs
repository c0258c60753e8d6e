//! Grants: signed, expiring credentials bound to one public key, issued by
//! an operator key (the trust anchor), by an issuer key the operator limited
//! to a namespace of ids, or by the holder of a delegable grant (attenuation:
//! the new grant must be narrower than its parent).
//!
//! A grant says which agent ids its key may register, which capabilities and
//! tools (and event topics) it may offer, which tools it may call (optionally
//! only on agents whose id matches a pattern), with deny rules that win, an
//! optional rate limit, and whether it may act as operator.
//!
//! Encoding: the [`Grant`] in postcard, signed with Ed25519 over
//! `"fem/1 grant\n" || bytes`; a [`SignedGrant`] carries its parent chain, so
//! anyone holding the anchors verifies it offline. Verification costs one
//! signature check per link of the chain; callers cache the result per grant.

use serde::{Deserialize, Serialize};

use crate::error::ProtoError;
use crate::ids::{AgentId, Capability, CapabilityPattern, MAX_ID_LEN};
use crate::keys::{PublicKey, Signature, SigningKey};

/// Domain-separation tag of grant signatures.
pub const GRANT_DOMAIN: &[u8] = b"fem/1 grant\n";
/// Longest accepted chain (operator, issuer, grant, two attenuations).
pub const MAX_CHAIN: usize = 4;
/// Accepted clock skew for `issued_ms`, in ms.
const SKEW_MS: u64 = 5 * 60 * 1000;

/// A pattern over agent ids: exact, or a prefix followed by one `*` at the
/// end (`team-a-*`); `*` alone matches every id. Prefix patterns keep the
/// "narrower than" relation of attenuation decidable at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdPattern(String);

impl IdPattern {
    /// Validates a pattern.
    ///
    /// # Errors
    /// [`ProtoError::InvalidId`] for a `*` other than at the end, or a
    /// character an id may not hold.
    pub fn new(s: impl Into<String>) -> Result<Self, ProtoError> {
        let s = s.into();
        let body = s.strip_suffix('*').unwrap_or(&s);
        let ok = s.len() <= MAX_ID_LEN
            && !s.is_empty()
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b));
        if ok {
            Ok(Self(s))
        } else {
            Err(ProtoError::InvalidId(s.chars().take(64).collect()))
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn prefix(&self) -> (&str, bool) {
        match self.0.strip_suffix('*') {
            Some(p) => (p, true),
            None => (&self.0, false),
        }
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &AgentId) -> bool {
        match self.prefix() {
            (p, true) => id.as_str().starts_with(p),
            (p, false) => id.as_str() == p,
        }
    }

    /// Whether every id this pattern matches is matched by `wider`.
    pub fn within(&self, wider: &Self) -> bool {
        match (self.prefix(), wider.prefix()) {
            ((a, _), (b, true)) => a.starts_with(b),
            ((a, false), (b, false)) => a == b,
            ((_, true), (_, false)) => false,
        }
    }
}

impl TryFrom<String> for IdPattern {
    type Error = ProtoError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<IdPattern> for String {
    fn from(p: IdPattern) -> Self {
        p.0
    }
}

impl std::fmt::Display for IdPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether every name `narrow` matches is matched by `wide` (same number of
/// segments; each segment of `wide` is `*` or equal).
pub fn pattern_within(narrow: &CapabilityPattern, wide: &CapabilityPattern) -> bool {
    let (n, w): (Vec<&str>, Vec<&str>) = (
        narrow.as_str().split('.').collect(),
        wide.as_str().split('.').collect(),
    );
    n.len() == w.len() && n.iter().zip(&w).all(|(a, b)| *b == "*" || a == b)
}

/// One call rule: tools matching `tool`, on agents matching `agents` (any
/// agent when absent). Written `tool` or `tool@agents` on the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRule {
    /// Tool name pattern.
    pub tool: CapabilityPattern,
    /// Agent id pattern, if the rule is limited to some agents.
    pub agents: Option<IdPattern>,
}

impl CallRule {
    /// Parses `tool` or `tool@agents`.
    ///
    /// # Errors
    /// [`ProtoError::InvalidName`] or [`ProtoError::InvalidId`].
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        let (tool, agents) = match s.split_once('@') {
            Some((t, a)) => (t, Some(IdPattern::new(a)?)),
            None => (s, None),
        };
        Ok(Self {
            tool: CapabilityPattern::new(tool)?,
            agents,
        })
    }

    /// Whether the rule covers `tool` on `agent`.
    pub fn covers(&self, tool: &Capability, agent: &AgentId) -> bool {
        self.tool.matches(tool) && self.agents.as_ref().is_none_or(|p| p.matches(agent))
    }

    fn within(&self, wide: &Self) -> bool {
        pattern_within(&self.tool, &wide.tool)
            && match (&self.agents, &wide.agents) {
                (_, None) => true,
                (Some(a), Some(b)) => a.within(b),
                (None, Some(_)) => false,
            }
    }
}

impl std::fmt::Display for CallRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.agents {
            Some(a) => write!(f, "{}@{a}", self.tool),
            None => write!(f, "{}", self.tool),
        }
    }
}

/// What a grant's key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// An agent or caller.
    Agent,
    /// An issuer: may sign agent grants for ids within `register`.
    Issuer,
    /// A broker: may join the federation under an id within `register` and
    /// advertise agents whose ids are within `offer_ids`.
    Broker,
}

/// A token bucket: `per_sec` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained calls per second.
    pub per_sec: u32,
    /// Calls allowed at once.
    pub burst: u32,
}

/// A credential bound to one key. postcard encodes fields in order: only
/// append fields in a new grant version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// Format version (1).
    pub version: u8,
    /// Random id (revocations name it).
    pub id: [u8; 16],
    /// The key the grant is bound to.
    pub subject: PublicKey,
    /// What the key is.
    pub role: Role,
    /// Issue time, ms since the epoch.
    pub issued_ms: u64,
    /// Expiry, ms since the epoch.
    pub expires_ms: u64,
    /// Ids the key may register (agents), issue for (issuers), or use (brokers).
    pub register: Vec<IdPattern>,
    /// Capabilities, tools and event topics it may offer (agents).
    pub offer: Vec<CapabilityPattern>,
    /// Agent ids a broker may advertise (brokers).
    pub offer_ids: Vec<IdPattern>,
    /// What it may call.
    pub call: Vec<CallRule>,
    /// What it may never call (wins over `call`).
    pub deny: Vec<CallRule>,
    /// Calls per second at the entry broker.
    pub rate: Option<RateLimit>,
    /// May revoke others and read operator views.
    pub operator: bool,
    /// May sign narrower grants for other keys.
    pub delegate: bool,
}

impl Grant {
    /// Whether the key may register `id`.
    pub fn may_register(&self, id: &AgentId) -> bool {
        self.register.iter().any(|p| p.matches(id))
    }

    /// Whether the key may offer `name` (a capability, tool or topic).
    pub fn may_offer(&self, name: &Capability) -> bool {
        self.offer.iter().any(|p| p.matches(name))
    }

    /// Whether the key may call `tool` on `agent` (deny wins).
    pub fn may_call(&self, tool: &Capability, agent: &AgentId) -> bool {
        !self.deny.iter().any(|r| r.covers(tool, agent))
            && self.call.iter().any(|r| r.covers(tool, agent))
    }

    /// Whether the key may call `tool` on some agent (for a quick refusal
    /// before routing; the agent is checked when one is chosen).
    pub fn may_call_somewhere(&self, tool: &Capability) -> bool {
        self.call.iter().any(|r| {
            r.tool.matches(tool)
                && !self
                    .deny
                    .iter()
                    .any(|d| d.tool.matches(tool) && d.agents.is_none())
        })
    }

    /// Whether a broker grant lets its broker advertise agent `id`.
    pub fn may_advertise(&self, id: &AgentId) -> bool {
        self.offer_ids.iter().any(|p| p.matches(id))
    }

    /// Whether this grant is no wider than `parent` in every respect.
    fn within(&self, parent: &Self) -> Result<(), String> {
        let ids =
            |a: &[IdPattern], b: &[IdPattern]| a.iter().all(|x| b.iter().any(|y| x.within(y)));
        if self.role != parent.role {
            return Err("an attenuated grant keeps its parent's role".into());
        }
        if !ids(&self.register, &parent.register) || !ids(&self.offer_ids, &parent.offer_ids) {
            return Err("ids wider than the parent grant".into());
        }
        if !self
            .offer
            .iter()
            .all(|x| parent.offer.iter().any(|y| pattern_within(x, y)))
        {
            return Err("offers wider than the parent grant".into());
        }
        if !self
            .call
            .iter()
            .all(|x| parent.call.iter().any(|y| x.within(y)))
        {
            return Err("calls wider than the parent grant".into());
        }
        // Every deny of the parent must still hold.
        if !parent.deny.iter().all(|d| self.deny.contains(d)) {
            return Err("drops a deny rule of the parent grant".into());
        }
        let rate_ok = match (self.rate, parent.rate) {
            (_, None) => true,
            (Some(a), Some(b)) => a.per_sec <= b.per_sec && a.burst <= b.burst,
            (None, Some(_)) => false,
        };
        if !rate_ok {
            return Err("a rate limit above the parent's".into());
        }
        if (self.operator && !parent.operator) || self.expires_ms > parent.expires_ms {
            return Err("operator rights or a lifetime beyond the parent's".into());
        }
        Ok(())
    }

    /// Signs the grant with `key` (an operator key, or the subject key of
    /// `parent`, an issuer or delegable grant).
    ///
    /// # Errors
    /// [`ProtoError::Encode`] on serialisation failure.
    pub fn sign(
        &self,
        key: &SigningKey,
        parent: Option<SignedGrant>,
    ) -> Result<SignedGrant, ProtoError> {
        let body = postcard::to_allocvec(self).map_err(|e| ProtoError::Encode(e.to_string()))?;
        let signature = key.sign(&signing_input(&body));
        let mut chain = vec![GrantLink {
            body,
            signer: key.public_key(),
            signature,
        }];
        chain.extend(parent.map(|p| p.chain).unwrap_or_default());
        Ok(SignedGrant { chain })
    }
}

/// What a signature covers: a domain-separation tag, then the bytes.
fn tagged(domain: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(domain.len() + body.len());
    v.extend_from_slice(domain);
    v.extend_from_slice(body);
    v
}

fn signing_input(body: &[u8]) -> Vec<u8> {
    tagged(GRANT_DOMAIN, body)
}

/// One signed grant of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantLink {
    /// The postcard bytes of the [`Grant`].
    pub body: Vec<u8>,
    /// Who signed it.
    pub signer: PublicKey,
    /// Ed25519 over [`GRANT_DOMAIN`] and `body`.
    pub signature: Signature,
}

/// A grant with the chain that authorises its signer, leaf first: each
/// link is signed by the subject of the next, the last by a trust anchor.
/// A flat list (not nested) so that decoding hostile bytes never recurses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedGrant {
    /// The links, leaf first.
    pub chain: Vec<GrantLink>,
}

/// Why a grant is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The bytes do not decode.
    #[error("malformed grant: {0}")]
    Malformed(String),
    /// A signature in the chain does not verify.
    #[error("a grant signature does not verify")]
    BadSignature,
    /// The chain does not end at a configured trust anchor.
    #[error("the grant chain does not end at a trust anchor (signed by {0})")]
    UnknownIssuer(String),
    /// A grant in the chain expired (or is not valid yet).
    #[error("grant {id} expired or not yet valid")]
    Expired {
        /// Hex id of the grant.
        id: String,
    },
    /// A link of the chain grants more than its signer may.
    #[error("grant {id} exceeds its issuer's rights: {why}")]
    Exceeds {
        /// Hex id of the grant.
        id: String,
        /// Which right.
        why: String,
    },
    /// Longer than [`MAX_CHAIN`].
    #[error("grant chain longer than {MAX_CHAIN}")]
    TooLong,
    /// A grant's subject is not a usable identity key (not a curve point, or
    /// of small order: see [`check_identity_key`](crate::verify::check_identity_key)).
    #[error("grant {id} is bound to a key of small order or not on the curve")]
    WeakKey {
        /// Hex id of the grant.
        id: String,
    },
}

impl SignedGrant {
    /// The grant file form: base64 of the postcard bytes, one line.
    ///
    /// # Errors
    /// [`ProtoError::Encode`] on serialisation failure.
    pub fn to_text(&self) -> Result<String, ProtoError> {
        to_text(self)
    }

    /// Parses the grant file form.
    ///
    /// # Errors
    /// [`GrantError::Malformed`].
    pub fn from_text(text: &str) -> Result<Self, GrantError> {
        from_text(text)
    }

    /// The leaf grant without checking anything (for display).
    ///
    /// # Errors
    /// [`GrantError::Malformed`].
    pub fn decode(&self) -> Result<Grant, GrantError> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| GrantError::Malformed("empty grant chain".into()))?;
        decode(&leaf.body)
    }

    /// Verifies the signatures, lifetimes and rights of the whole chain
    /// against `anchors` at `now_ms`; returns the leaf grant and the ids of
    /// every grant of the chain (revocations may name any of them).
    ///
    /// # Errors
    /// A [`GrantError`] naming the first problem.
    pub fn verify(&self, anchors: &[PublicKey], now_ms: u64) -> Result<Verified, GrantError> {
        if self.chain.len() > MAX_CHAIN {
            return Err(GrantError::TooLong);
        }
        let mut parent: Option<Grant> = None;
        let mut ids = Vec::with_capacity(self.chain.len());
        // From the anchor's grant down to the leaf.
        for (i, link) in self.chain.iter().enumerate().rev() {
            let g = decode(&link.body)?;
            link.signer
                .verify(&signing_input(&link.body), &link.signature)
                .map_err(|_| GrantError::BadSignature)?;
            let id = hex::encode(g.id);
            if crate::verify::check_identity_key(&g.subject).is_err() {
                return Err(GrantError::WeakKey { id });
            }
            if now_ms >= g.expires_ms || g.issued_ms > now_ms.saturating_add(SKEW_MS) {
                return Err(GrantError::Expired { id });
            }
            let exceeds = |why: String| GrantError::Exceeds {
                id: id.clone(),
                why,
            };
            match &parent {
                None if i + 1 == self.chain.len() => {
                    if !anchors.contains(&link.signer) {
                        return Err(GrantError::UnknownIssuer(link.signer.fingerprint()));
                    }
                }
                None => return Err(GrantError::Malformed("broken chain".into())),
                Some(p) => {
                    if p.subject != link.signer {
                        return Err(exceeds(
                            "signed by a key other than its parent grant's".into(),
                        ));
                    }
                    match p.role {
                        // An issuer signs agent grants within its namespace.
                        Role::Issuer if g.role == Role::Agent => {
                            let inside = g
                                .register
                                .iter()
                                .all(|x| p.register.iter().any(|y| x.within(y)));
                            if !inside {
                                return Err(exceeds("ids outside the issuer's namespace".into()));
                            }
                            if g.operator || g.delegate || g.expires_ms > p.expires_ms {
                                return Err(exceeds(
                                    "issuers grant neither operator nor delegation rights, nor beyond their own lifetime".into(),
                                ));
                            }
                        }
                        _ if p.delegate => g.within(p).map_err(exceeds)?,
                        _ => return Err(exceeds("its signer's grant may not delegate".into())),
                    }
                }
            }
            ids.push(g.id);
            parent = Some(g);
        }
        let grant = parent.ok_or_else(|| GrantError::Malformed("empty grant chain".into()))?;
        ids.reverse();
        Ok(Verified { grant, chain: ids })
    }
}

fn decode(body: &[u8]) -> Result<Grant, GrantError> {
    let g: Grant = postcard::from_bytes(body).map_err(|e| GrantError::Malformed(e.to_string()))?;
    if g.version != 1 {
        return Err(GrantError::Malformed(format!(
            "grant version {}",
            g.version
        )));
    }
    Ok(g)
}

/// A grant whose chain verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The grant.
    pub grant: Grant,
    /// Ids of the grant and its ancestors, leaf first.
    pub chain: Vec<[u8; 16]>,
}

/// Domain-separation tag of revocation signatures.
pub const REVOCATION_DOMAIN: &[u8] = b"fem/1 revocation\n";

/// What a revocation withdraws: every grant of a key, one grant (and every
/// grant signed under it), or a key's grants issued before a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// Format version (1).
    pub version: u8,
    /// Random id (brokers keep each once).
    pub id: [u8; 16],
    /// When it was signed, ms since the epoch.
    pub issued_ms: u64,
    /// The key whose grants are revoked (all of them, or those before `before_ms`).
    pub subject: Option<PublicKey>,
    /// One grant (by id) revoked wherever it appears in a chain.
    pub grant_id: Option<[u8; 16]>,
    /// With `subject`: only grants issued before this time.
    pub before_ms: Option<u64>,
}

impl Revocation {
    /// Whether a verified grant (its leaf and chain ids) is revoked.
    pub fn revokes(&self, grant: &Grant, chain: &[[u8; 16]]) -> bool {
        if self.grant_id.is_some_and(|g| chain.contains(&g)) {
            return true;
        }
        match (self.subject, self.before_ms) {
            (Some(k), None) => grant.subject == k,
            (Some(k), Some(t)) => grant.subject == k && grant.issued_ms < t,
            (None, _) => false,
        }
    }

    /// Signs the revocation with a trust anchor's key, or with the key of an
    /// operator grant (`grant`, which travels with it).
    ///
    /// # Errors
    /// [`ProtoError::Encode`] on serialisation failure.
    pub fn sign(
        &self,
        key: &SigningKey,
        grant: Option<SignedGrant>,
    ) -> Result<SignedRevocation, ProtoError> {
        let body = postcard::to_allocvec(self).map_err(|e| ProtoError::Encode(e.to_string()))?;
        let signature = key.sign(&revocation_input(&body));
        Ok(SignedRevocation {
            body,
            signer: key.public_key(),
            signature,
            grant,
        })
    }
}

fn revocation_input(body: &[u8]) -> Vec<u8> {
    tagged(REVOCATION_DOMAIN, body)
}

/// A revocation signed by a trust anchor or by the holder of an operator grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedRevocation {
    /// The postcard bytes of the [`Revocation`].
    pub body: Vec<u8>,
    /// Who signed it: a trust anchor, or the subject of `grant`.
    pub signer: PublicKey,
    /// Ed25519 over [`REVOCATION_DOMAIN`] and `body`.
    pub signature: Signature,
    /// The signer's operator grant, when the signer is not an anchor.
    pub grant: Option<SignedGrant>,
}

impl SignedRevocation {
    /// Verifies the signature by one of `anchors`, or by the subject of an
    /// operator grant that chains to one and is valid at `now_ms`, and decodes.
    ///
    /// # Errors
    /// [`GrantError::UnknownIssuer`], [`GrantError::BadSignature`],
    /// [`GrantError::Malformed`], the grant's error, or [`GrantError::Exceeds`]
    /// when the grant is not an operator grant of the signer.
    pub fn verify(&self, anchors: &[PublicKey], now_ms: u64) -> Result<Revocation, GrantError> {
        if !anchors.contains(&self.signer) {
            let Some(g) = &self.grant else {
                return Err(GrantError::UnknownIssuer(self.signer.fingerprint()));
            };
            let v = g.verify(anchors, now_ms)?;
            if v.grant.subject != self.signer || !v.grant.operator {
                return Err(GrantError::Exceeds {
                    id: hex::encode(v.grant.id),
                    why: "only an operator grant of the signing key may revoke".into(),
                });
            }
        }
        self.signer
            .verify(&revocation_input(&self.body), &self.signature)
            .map_err(|_| GrantError::BadSignature)?;
        self.decode()
    }

    /// Decodes without checking the signature (for display).
    ///
    /// # Errors
    /// [`GrantError::Malformed`].
    pub fn decode(&self) -> Result<Revocation, GrantError> {
        let r: Revocation =
            postcard::from_bytes(&self.body).map_err(|e| GrantError::Malformed(e.to_string()))?;
        if r.version != 1 || (r.subject.is_none() && r.grant_id.is_none()) {
            return Err(GrantError::Malformed(
                "a revocation names a key or a grant".into(),
            ));
        }
        Ok(r)
    }

    /// The file form: base64 of the postcard bytes, one line.
    ///
    /// # Errors
    /// [`ProtoError::Encode`] on serialisation failure.
    pub fn to_text(&self) -> Result<String, ProtoError> {
        to_text(self)
    }

    /// Parses the file form.
    ///
    /// # Errors
    /// [`GrantError::Malformed`].
    pub fn from_text(text: &str) -> Result<Self, GrantError> {
        from_text(text)
    }
}

/// The file form of grants and revocations: base64 of the postcard bytes.
fn to_text<T: Serialize>(v: &T) -> Result<String, ProtoError> {
    use base64::Engine as _;
    let bytes = postcard::to_allocvec(v).map_err(|e| ProtoError::Encode(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn from_text<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, GrantError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| GrantError::Malformed(format!("not base64: {e}")))?;
    postcard::from_bytes(&bytes).map_err(|e| GrantError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> CapabilityPattern {
        CapabilityPattern::new(s).expect("pattern")
    }

    fn grant(subject: &SigningKey) -> Grant {
        Grant {
            version: 1,
            id: [1; 16],
            subject: subject.public_key(),
            role: Role::Agent,
            issued_ms: 1_000,
            expires_ms: 10_000,
            register: vec![IdPattern::new("coder-*").expect("id")],
            offer: vec![p("shell.*"), p("file.read")],
            offer_ids: Vec::new(),
            call: vec![
                CallRule::parse("file.read@coder-*").expect("rule"),
                CallRule::parse("shell.*").expect("rule"),
            ],
            deny: vec![CallRule::parse("shell.run").expect("rule")],
            rate: None,
            operator: false,
            delegate: true,
        }
    }

    fn id(s: &str) -> AgentId {
        AgentId::new(s).expect("id")
    }

    fn cap(s: &str) -> Capability {
        Capability::new(s).expect("cap")
    }

    #[test]
    fn rights_and_deny() {
        let k = SigningKey::generate();
        let g = grant(&k);
        assert!(g.may_register(&id("coder-7")));
        assert!(!g.may_register(&id("other")));
        assert!(g.may_offer(&cap("shell.run")));
        assert!(!g.may_offer(&cap("code.execute")));
        assert!(g.may_call(&cap("file.read"), &id("coder-1")));
        assert!(!g.may_call(&cap("file.read"), &id("web-1")));
        assert!(g.may_call(&cap("shell.ls"), &id("web-1")));
        assert!(!g.may_call(&cap("shell.run"), &id("coder-1")), "deny wins");
        assert!(!g.may_call_somewhere(&cap("shell.run")));
    }

    #[test]
    fn small_order_subjects_are_refused() {
        let op = SigningKey::generate();
        // The identity point (canonical and with the sign bit set), a point
        // of order 4, and one of order 8: anyone can sign for them under ZIP 215.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut identity_sign = identity;
        identity_sign[31] = 0x80;
        let order4 = [0u8; 32];
        let order8: [u8; 32] =
            hex::decode("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
                .expect("hex")
                .try_into()
                .expect("32 bytes");
        for key in [identity, identity_sign, order4, order8] {
            let mut g = grant(&op);
            g.subject = PublicKey(key);
            let signed = g.sign(&op, None).expect("sign");
            assert!(matches!(
                signed.verify(&[op.public_key()], 2_000),
                Err(GrantError::WeakKey { .. })
            ));
        }
    }

    #[test]
    fn chain_verifies_and_attenuation_cannot_widen() {
        let op = SigningKey::generate();
        let agent = SigningKey::generate();
        let sub = SigningKey::generate();
        let root = grant(&agent).sign(&op, None).expect("sign");
        assert!(root.verify(&[op.public_key()], 2_000).is_ok());
        assert!(matches!(
            root.verify(&[sub.public_key()], 2_000),
            Err(GrantError::UnknownIssuer(_))
        ));
        assert!(matches!(
            root.verify(&[op.public_key()], 10_000),
            Err(GrantError::Expired { .. })
        ));

        let mut narrow = grant(&sub);
        narrow.id = [2; 16];
        narrow.register = vec![IdPattern::new("coder-sub-*").expect("id")];
        narrow.call = vec![CallRule::parse("file.read@coder-1").expect("rule")];
        narrow.offer = vec![p("file.read")];
        let child = narrow.sign(&agent, Some(root.clone())).expect("sign");
        let v = child
            .verify(&[op.public_key()], 2_000)
            .expect("narrower grant verifies");
        assert_eq!(v.chain, vec![[2; 16], [1; 16]]);

        let mut wide = narrow.clone();
        wide.register = vec![IdPattern::new("*").expect("id")];
        let bad = wide.sign(&agent, Some(root.clone())).expect("sign");
        assert!(matches!(
            bad.verify(&[op.public_key()], 2_000),
            Err(GrantError::Exceeds { .. })
        ));

        let mut no_deny = narrow.clone();
        no_deny.deny.clear();
        let bad = no_deny.sign(&agent, Some(root.clone())).expect("sign");
        assert!(matches!(
            bad.verify(&[op.public_key()], 2_000),
            Err(GrantError::Exceeds { .. })
        ));

        // Signed by someone else than the parent's subject.
        let bad = narrow.sign(&sub, Some(root)).expect("sign");
        assert!(bad.verify(&[op.public_key()], 2_000).is_err());
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let op = SigningKey::generate();
        let mut g = grant(&SigningKey::generate())
            .sign(&op, None)
            .expect("sign");
        let last = g.chain[0].body.len() - 1;
        g.chain[0].body[last] ^= 1;
        assert!(g.verify(&[op.public_key()], 2_000).is_err());
    }

    #[test]
    fn issuers_stay_in_their_namespace() {
        let op = SigningKey::generate();
        let issuer = SigningKey::generate();
        let agent = SigningKey::generate();
        let mut ig = grant(&issuer);
        ig.role = Role::Issuer;
        ig.delegate = false;
        ig.register = vec![IdPattern::new("team-a-*").expect("id")];
        let ig = ig.sign(&op, None).expect("sign");
        let mut g = grant(&agent);
        g.delegate = false;
        g.register = vec![IdPattern::new("team-a-x").expect("id")];
        assert!(
            g.sign(&issuer, Some(ig.clone()))
                .expect("sign")
                .verify(&[op.public_key()], 2_000)
                .is_ok()
        );
        g.register = vec![IdPattern::new("team-b-x").expect("id")];
        assert!(
            g.sign(&issuer, Some(ig))
                .expect("sign")
                .verify(&[op.public_key()], 2_000)
                .is_err()
        );
    }

    #[test]
    fn revocations_name_keys_grants_and_times() {
        let op = SigningKey::generate();
        let k = SigningKey::generate();
        let g = grant(&k);
        let r = Revocation {
            version: 1,
            id: [9; 16],
            issued_ms: 5_000,
            subject: Some(k.public_key()),
            grant_id: None,
            before_ms: Some(1_000),
        };
        assert!(!r.revokes(&g, &[g.id]), "issued at 1000, not before");
        let r = Revocation {
            before_ms: Some(1_001),
            ..r
        };
        assert!(r.revokes(&g, &[g.id]));
        let by_id = Revocation {
            subject: None,
            grant_id: Some([7; 16]),
            before_ms: None,
            ..r
        };
        assert!(
            by_id.revokes(&g, &[g.id, [7; 16]]),
            "an ancestor's id revokes the chain"
        );
        let signed = by_id.sign(&op, None).expect("sign");
        assert!(signed.verify(&[op.public_key()], 0).is_ok());
        assert!(signed.verify(&[k.public_key()], 0).is_err());
        let back = SignedRevocation::from_text(&signed.to_text().expect("text")).expect("parse");
        assert_eq!(back, signed);
    }

    #[test]
    fn id_patterns() {
        let a = IdPattern::new("team-a-*").expect("id");
        assert!(IdPattern::new("team-a-x").expect("id").within(&a));
        assert!(IdPattern::new("team-a-x*").expect("id").within(&a));
        assert!(!IdPattern::new("team-*").expect("id").within(&a));
        assert!(IdPattern::new("a*b").is_err());
        assert!(pattern_within(&p("shell.run"), &p("shell.*")));
        assert!(!pattern_within(&p("shell.*"), &p("shell.run")));
    }
}
