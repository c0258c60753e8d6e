//! Admission: the one check every incoming envelope passes before the
//! routing core sees it (open, verify, replay window, metrics), and the
//! validation of what a registration declares. Signature work happens here,
//! outside the core's lock.

use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;
use fem_proto::{
    AgentId, Body, Capability, Envelope, EnvelopeType, ErrorCode, Grant, Header, NonceCache,
    ProtoError, PublicKey, Role, SignedEnvelope, SignedGrant, ToolSpec,
};

use crate::metrics::Metrics;

/// A refusal: the code and a message for the peer.
pub type Refusal = (ErrorCode, String);

/// Timestamp window and nonce cache per signing key. Keyed by the key that
/// signed, not the id an envelope claims: a stranger signing envelopes in a
/// victim's name can fill only its own key's cache.
#[derive(Debug)]
pub struct ReplayGuard {
    window_ms: u64,
    per_key: usize,
    nonces: DashMap<PublicKey, Mutex<NonceCache>>,
}

impl ReplayGuard {
    /// A guard accepting timestamps within `window_ms` of now and, from one
    /// key, `rate` envelopes a second averaged over that window
    /// (`--replay-key-rate`): the nonces it keeps per key.
    pub fn for_rate(window_ms: u64, rate: u32) -> Self {
        let per_key = u64::from(rate).saturating_mul(window_ms.div_ceil(1000).max(1));
        Self::with_capacity(window_ms, usize::try_from(per_key).unwrap_or(usize::MAX))
    }

    /// A guard remembering at most `per_key` nonces per key and window.
    pub fn with_capacity(window_ms: u64, per_key: usize) -> Self {
        Self {
            window_ms,
            per_key,
            nonces: DashMap::new(),
        }
    }

    /// Refuses a header outside the window or with a nonce already seen.
    ///
    /// # Errors
    /// `STALE_TIMESTAMP`, `REPLAYED` or `RATE_LIMITED` as [`ProtoError`].
    pub fn check(&self, signer: &PublicKey, h: &Header, now_ms: u64) -> Result<(), ProtoError> {
        let check = |cache: &Mutex<NonceCache>| {
            let mut c = cache.lock().map_err(|_| ProtoError::RateLimited)?;
            c.check(h.timestamp_ms, &h.nonce, now_ms)
        };
        // Known keys take a shared lock on the shard.
        if let Some(cache) = self.nonces.get(signer) {
            return check(&cache);
        }
        let cache = self
            .nonces
            .entry(*signer)
            .or_insert_with(|| Mutex::new(NonceCache::new(self.window_ms, self.per_key)));
        check(&cache)
    }

    /// Refuses a timestamp outside the window (no nonce kept).
    ///
    /// # Errors
    /// `STALE_TIMESTAMP` as [`ProtoError`].
    pub fn check_time(&self, h: &Header, now_ms: u64) -> Result<(), ProtoError> {
        if h.timestamp_ms.abs_diff(now_ms) > self.window_ms {
            return Err(ProtoError::StaleTimestamp {
                ts: h.timestamp_ms,
                now: now_ms,
                window_ms: self.window_ms,
            });
        }
        Ok(())
    }

    /// Forgets the caches of keys that are not `live` and whose window passed.
    pub fn forget_idle(&self, now_ms: u64, live: impl Fn(&PublicKey) -> bool) {
        self.nonces.retain(|id, cache| {
            live(id)
                || cache
                    .get_mut()
                    .map(|c| {
                        c.expire(now_ms);
                        !c.is_empty()
                    })
                    .unwrap_or(false)
        });
    }
}

/// Whose signature an envelope must carry, and who checks it.
///
/// Signatures are checked at the edges (proto/README.md section 8.13): the
/// broker verifies what authenticates a connection (registrations) and what
/// arrives without one (the gateway); on an authenticated session it checks
/// only that the sender is the session's identity and leaves the signature
/// and the nonce to the recipient, which verifies every envelope delivered
/// to it; relays from peers are verified only with `--verify-relayed`.
#[derive(Clone, Copy, Debug)]
pub enum Signer<'a> {
    /// A registered session: the sender must be the session's id; the
    /// signature (by its key) is the recipient's to check.
    Session {
        /// The session's agent.
        id: &'a AgentId,
        /// Its registered key.
        key: &'a PublicKey,
    },
    /// A key presented with the envelope, without a session (gateway
    /// requests): signature, timestamp and nonce all checked here.
    Key(&'a PublicKey),
    /// Relayed by an authenticated peer broker with the key of its sender:
    /// verified here only when `verify` (`--verify-relayed`); the recipient
    /// verifies it in any case.
    Relayed {
        /// The sender's key as the peer gave it.
        key: &'a PublicKey,
        /// Check the signature here too (defence in depth).
        verify: bool,
    },
    /// A registration: the key inside the body (registerAgent, registerBroker).
    Registration,
}

/// Where an envelope entered, for the `envelopes` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A native session or the gateway: counted as `accepted`.
    Client,
    /// Relayed by a peer broker: counted as `relayed`.
    Relay,
}

/// An envelope that passed admission.
#[derive(Debug)]
pub struct Admitted {
    /// The opened envelope.
    pub env: Envelope,
    /// The key that signed it.
    pub key: PublicKey,
}

/// Why admission failed, with what is known of the envelope for the answer.
#[derive(Debug)]
pub struct Refused {
    /// Code and message.
    pub refusal: Refusal,
    /// The opened envelope, when it could be opened (the answer correlates with it).
    pub env: Option<Box<Envelope>>,
}

/// An envelope as admission sees it: signed, or unsigned (broker-attested
/// mode, taken only from a session or a peer).
#[derive(Clone, Copy, Debug)]
pub enum Sealed<'a> {
    /// Signed by its sender.
    Signed(&'a SignedEnvelope),
    /// Without a signature.
    Unsigned(&'a fem_proto::UnsignedEnvelope),
}

impl<'a> From<&'a SignedEnvelope> for Sealed<'a> {
    fn from(s: &'a SignedEnvelope) -> Self {
        Self::Signed(s)
    }
}

impl<'a> From<&'a fem_proto::Carried> for Sealed<'a> {
    fn from(c: &'a fem_proto::Carried) -> Self {
        match c {
            fem_proto::Carried::Signed(s) => Self::Signed(s),
            fem_proto::Carried::Attested { envelope, .. } => Self::Unsigned(envelope),
        }
    }
}

impl Sealed<'_> {
    fn open(self) -> Result<Envelope, ProtoError> {
        match self {
            Self::Signed(s) => s.open(),
            Self::Unsigned(u) => u.open(),
        }
    }
}

/// Opens `signed`, checks the sender and signature against `signer`, checks
/// `want` (if given) and the replay window, and counts the outcome.
///
/// # Errors
/// [`Refused`] with the typed code: `BAD_REQUEST` for a malformed envelope
/// or wrong type, `PERMISSION_DENIED` for a sender that is not the
/// session's, `INVALID_SIGNATURE`, `STALE_TIMESTAMP`, `REPLAYED`.
pub fn admit<'a>(
    signed: impl Into<Sealed<'a>>,
    signer: Signer<'_>,
    want: Option<EnvelopeType>,
    entry: Entry,
    replay: &ReplayGuard,
    metrics: &Metrics,
) -> Result<Admitted, Refused> {
    let started = Instant::now();
    let signed = signed.into();
    metrics.messages_processed_total.inc();
    let env = match signed.open() {
        Ok(env) => env,
        Err(e) => {
            metrics
                .envelopes
                .with_label_values(&["unknown", "malformed"])
                .inc();
            metrics.refused(e.code().as_str());
            return Err(Refused {
                refusal: (e.code(), e.to_string()),
                env: None,
            });
        }
    };
    let kind = env.kind();
    let checked = check(signed, &env, signer, want, replay);
    let outcome = match &checked {
        Ok(_) if entry == Entry::Relay => "relayed",
        Ok(_) => "accepted",
        Err((code, _)) => code.as_str(),
    };
    metrics
        .envelopes
        .with_label_values(&[kind.as_str(), outcome])
        .inc();
    match checked {
        Ok(key) => {
            metrics
                .verify_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(Admitted { env, key })
        }
        Err(refusal) => {
            metrics.refused(refusal.0.as_str());
            Err(Refused {
                refusal,
                env: Some(Box::new(env)),
            })
        }
    }
}

fn check(
    signed: Sealed<'_>,
    env: &Envelope,
    signer: Signer<'_>,
    want: Option<EnvelopeType>,
    replay: &ReplayGuard,
) -> Result<PublicKey, Refusal> {
    let kind = env.kind();
    if let Some(want) = want
        && kind != want
    {
        return Err((
            ErrorCode::BadRequest,
            format!("expected a {want} envelope, not {kind}"),
        ));
    }
    // (key, verify the signature here, keep its nonce here)
    let (key, verify, keep_nonce) = match signer {
        Signer::Session { id, key } => {
            if env.header.sender != *id {
                return Err((
                    ErrorCode::PermissionDenied,
                    format!(
                        "envelope sender {} is not this session's agent {id}",
                        env.header.sender
                    ),
                ));
            }
            (*key, false, false)
        }
        Signer::Key(key) => (*key, true, true),
        Signer::Relayed { key, verify } => (*key, verify, false),
        Signer::Registration => match &env.body {
            Body::RegisterAgent(r) => (r.public_key, true, true),
            Body::RegisterBroker(r) => {
                if env.header.sender != r.broker_id {
                    return Err((
                        ErrorCode::PermissionDenied,
                        "sender and broker id differ".into(),
                    ));
                }
                (r.public_key, true, true)
            }
            _ => {
                return Err((
                    ErrorCode::NotRegistered,
                    format!("the first envelope must be a registration, not {kind}"),
                ));
            }
        },
    };
    let refuse = |e: ProtoError| (e.code(), e.to_string());
    match signed {
        Sealed::Signed(s) if verify => s.verify_opened(kind, &key).map_err(refuse)?,
        Sealed::Signed(_) => {}
        // Unsigned envelopes come only from a session (its identity was
        // checked above) or a peer (which attests them): never where a
        // signature is the only proof of the sender.
        Sealed::Unsigned(_) => {
            if matches!(signer, Signer::Key(_) | Signer::Registration) {
                return Err((
                    ErrorCode::InvalidSignature,
                    format!("a {kind} here must be signed"),
                ));
            }
        }
    }
    if matches!(signer, Signer::Registration) {
        // Under ZIP 215 anyone can sign for a small-order key: never bind one.
        fem_proto::verify::check_identity_key(&key).map_err(refuse)?;
    }
    // Nonces are kept only where there is no session (and for
    // registrations): on a session nobody else can replay into it, and the
    // recipient keeps its own; a stale timestamp is refused everywhere.
    let now = fem_proto::now_ms();
    if keep_nonce {
        replay.check(&key, &env.header, now).map_err(refuse)?;
    } else {
        replay.check_time(&env.header, now).map_err(refuse)?;
    }
    Ok(key)
}

/// Checks what a registration or embodimentUpdate offers against the
/// broker's limits (each refusal names its flag), then that tool names are
/// unique and every schema is a valid JSON Schema.
///
/// # Errors
/// `TOO_LARGE` over a limit, `BAD_REQUEST` for a duplicate or invalid tool.
pub fn validate_profile(
    limits: &crate::config::Limits,
    capabilities: &[Capability],
    tools: &[ToolSpec],
    metadata: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<(), Refusal> {
    let too_large = |what: String| Err((ErrorCode::TooLarge, what));
    if capabilities.len() > limits.max_capabilities {
        return too_large(format!(
            "{} capabilities offered; the limit is {} (--max-capabilities)",
            capabilities.len(),
            limits.max_capabilities
        ));
    }
    if tools.len() > limits.max_tools {
        return too_large(format!(
            "{} tools offered; the limit is {} (--max-tools)",
            tools.len(),
            limits.max_tools
        ));
    }
    if let Some(m) = metadata {
        if m.len() > limits.max_metadata_entries {
            return too_large(format!(
                "{} metadata entries; the limit is {} (--max-metadata-entries)",
                m.len(),
                limits.max_metadata_entries
            ));
        }
        if let Some((k, v)) = m
            .iter()
            .find(|(k, v)| k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE)
        {
            return too_large(format!(
                "metadata {:?} ({} + {} bytes): keys are limited to {MAX_METADATA_KEY} bytes and values to {MAX_METADATA_VALUE}",
                k.chars().take(64).collect::<String>(),
                k.len(),
                v.len()
            ));
        }
    }
    for t in tools {
        if t.description.len() > limits.max_description_bytes {
            return too_large(format!(
                "tool {}: description of {} bytes; the limit is {} (--max-description-bytes)",
                t.name,
                t.description.len(),
                limits.max_description_bytes
            ));
        }
        if t.input_schema.as_str().len() > limits.max_schema_bytes {
            return too_large(format!(
                "tool {}: input schema of {} bytes; the limit is {} (--max-schema-bytes)",
                t.name,
                t.input_schema.as_str().len(),
                limits.max_schema_bytes
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    for t in tools {
        if !names.insert(&t.name) {
            return Err((
                ErrorCode::BadRequest,
                format!("tool {} is declared twice", t.name),
            ));
        }
        let schema = t.input_schema.parse().map_err(|e| {
            (
                ErrorCode::BadRequest,
                format!("tool {}: schema is not JSON: {e}", t.name),
            )
        })?;
        jsonschema::validator_for(&schema).map_err(|e| {
            (
                ErrorCode::BadRequest,
                format!("tool {}: invalid JSON Schema: {e}", t.name),
            )
        })?;
    }
    Ok(())
}

/// Longest metadata key, bytes.
pub const MAX_METADATA_KEY: usize = 64;
/// Longest metadata value, bytes.
pub const MAX_METADATA_VALUE: usize = 1024;

/// A verified grant and its signed form (passed on to peers and agents).
#[derive(Debug)]
pub struct Credential {
    /// The grant, verified against the broker's trust anchors.
    pub grant: Grant,
    /// Ids of the grant and its ancestors (revocations may name any).
    pub chain: Vec<[u8; 16]>,
    /// As the client presented it.
    pub signed: SignedGrant,
}

/// Checks that `grant` lets `key` register `id` offering `capabilities` and `tools`.
///
/// # Errors
/// `PERMISSION_DENIED` naming what the grant does not cover.
pub fn check_registration(
    grant: &Grant,
    id: &AgentId,
    key: &PublicKey,
    capabilities: &[Capability],
    tools: &[ToolSpec],
) -> Result<(), Refusal> {
    let deny = |m: String| Err((ErrorCode::PermissionDenied, m));
    if grant.subject != *key {
        return deny(format!(
            "the grant is bound to key {}, not to the registering key {}",
            grant.subject.fingerprint(),
            key.fingerprint()
        ));
    }
    if grant.role != Role::Agent {
        return deny(format!("a {:?} grant cannot register an agent", grant.role));
    }
    if !grant.may_register(id) {
        return deny(format!("the grant does not cover agent id {id}"));
    }
    check_offer(grant, capabilities, tools)
}

/// Checks that every capability and tool is within the grant's offers.
///
/// # Errors
/// `PERMISSION_DENIED` naming the first one outside.
pub fn check_offer(
    grant: &Grant,
    capabilities: &[Capability],
    tools: &[ToolSpec],
) -> Result<(), Refusal> {
    for c in capabilities.iter().chain(tools.iter().map(|t| &t.name)) {
        if !grant.may_offer(c) {
            return Err((
                ErrorCode::PermissionDenied,
                format!("the grant does not let this key offer {c}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use fem_proto::{Header, Nonce, SigningKey};

    use super::*;

    /// A stranger signing in a victim's name fills only its own key's
    /// cache: the victim's envelopes are still accepted.
    #[test]
    fn a_strangers_envelopes_do_not_fill_the_victims_nonce_cache() {
        let guard = ReplayGuard::with_capacity(60_000, 100);
        let (victim, stranger) = (SigningKey::generate(), SigningKey::generate());
        let id = AgentId::new("victim").unwrap();
        let now = 1_000_000;
        let header = || Header {
            sender: id.clone(),
            timestamp_ms: now,
            nonce: Nonce::random(),
        };
        for _ in 0..100 {
            guard.check(&stranger.public_key(), &header(), now).unwrap();
        }
        assert!(guard.check(&stranger.public_key(), &header(), now).is_err());
        guard.check(&victim.public_key(), &header(), now).unwrap();
    }
}
