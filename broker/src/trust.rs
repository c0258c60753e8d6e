//! The broker's trust: its anchors and a cache of verified grants, or,
//! without an anchor, development trust that binds each id to the first key
//! that registered it (trust on first use), persisted in the data directory.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use fem_proto::{AgentId, ErrorCode, PublicKey, Revocation, SignedGrant, SignedRevocation};
use sha2::Digest as _;

use crate::route::admission::{Credential, Refusal};

/// Largest grant chain accepted, encoded (well within
/// [`fem_proto::FORWARD_OVERHEAD`], which relays carry it in).
pub(crate) const MAX_GRANT_BYTES: usize = 8 * 1024;

/// Verified grants kept at most (the cache is dropped whole when full).
const CACHE_MAX: usize = 10_000;

use crate::budget::TokenBucket as Bucket;

/// Anchors and verified grants, or development bindings.
#[derive(Debug)]
pub(crate) struct Trust {
    anchors: Vec<PublicKey>,
    cache: DashMap<[u8; 32], Arc<Credential>>,
    buckets: DashMap<[u8; 16], Mutex<Bucket>>,
    bindings: Mutex<HashMap<AgentId, PublicKey>>,
    bindings_file: PathBuf,
    revocations: Mutex<Vec<(Revocation, SignedRevocation)>>,
    revocations_file: PathBuf,
}

impl Trust {
    /// Trust with `anchors` (none: development trust, bindings in `data_dir`).
    pub(crate) fn new(anchors: Vec<PublicKey>, data_dir: &Path) -> Self {
        let bindings_file = data_dir.join("id-bindings");
        let revocations_file = data_dir.join("revocations");
        let mut revocations = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&revocations_file) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                // Kept once verified: an operator grant that signed it is
                // checked as of when it signed, not now.
                let verified = SignedRevocation::from_text(line).and_then(|s| {
                    let at = s.decode()?.issued_ms;
                    Ok((s.verify(&anchors, at)?, s))
                });
                match verified {
                    Ok(r) => revocations.push(r),
                    Err(e) => tracing::warn!(error = %e, "stored revocation ignored"),
                }
            }
        }
        let mut bindings = HashMap::new();
        if anchors.is_empty()
            && let Ok(text) = std::fs::read_to_string(&bindings_file)
        {
            for line in text.lines() {
                let mut it = line.split_whitespace();
                if let (Some(id), Some(key)) = (it.next(), it.next())
                    && let (Ok(id), Ok(key)) = (AgentId::new(id), key.parse::<PublicKey>())
                {
                    bindings.insert(id, key);
                }
            }
        }
        Self {
            anchors,
            cache: DashMap::new(),
            buckets: DashMap::new(),
            bindings: Mutex::new(bindings),
            bindings_file,
            revocations: Mutex::new(revocations),
            revocations_file,
        }
    }

    /// True when a trust anchor is configured.
    pub(crate) fn enforced(&self) -> bool {
        !self.anchors.is_empty()
    }

    /// Verifies a grant (once per distinct grant; then from the cache).
    ///
    /// # Errors
    /// `PERMISSION_DENIED` with the reason.
    pub(crate) fn verify(&self, signed: &SignedGrant) -> Result<Arc<Credential>, Refusal> {
        let bytes = postcard::to_allocvec(signed)
            .map_err(|e| (ErrorCode::BadRequest, format!("grant: {e}")))?;
        // Grants travel with relayed calls inside the forwarding overhead.
        if bytes.len() > MAX_GRANT_BYTES {
            return Err((
                ErrorCode::TooLarge,
                format!(
                    "grant of {} bytes; grants are limited to {MAX_GRANT_BYTES}",
                    bytes.len()
                ),
            ));
        }
        let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        let now = fem_proto::now_ms();
        if let Some(c) = self.cache.get(&digest)
            && now < c.grant.expires_ms
        {
            return Ok(Arc::clone(&c));
        }
        let v = signed
            .verify(&self.anchors, now)
            .map_err(|e| (ErrorCode::PermissionDenied, format!("grant refused: {e}")))?;
        if self.revoked(&v.grant, &v.chain) {
            return Err((
                ErrorCode::PermissionDenied,
                format!("grant {} is revoked", hex::encode(v.grant.id)),
            ));
        }
        let c = Arc::new(Credential {
            grant: v.grant,
            chain: v.chain,
            signed: signed.clone(),
        });
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(digest, Arc::clone(&c));
        Ok(c)
    }

    fn revoked(&self, grant: &fem_proto::Grant, chain: &[[u8; 16]]) -> bool {
        lock(&self.revocations)
            .iter()
            .any(|(r, _)| r.revokes(grant, chain))
    }

    /// Verifies and records a revocation (persisted in the data directory);
    /// returns it when it is new, `None` when it was known.
    ///
    /// # Errors
    /// `BAD_REQUEST` without a trust anchor or for a malformed revocation;
    /// `PERMISSION_DENIED` when no anchor signed it.
    pub(crate) fn revoke(&self, signed: &SignedRevocation) -> Result<Option<Revocation>, Refusal> {
        if !self.enforced() {
            return Err((
                ErrorCode::BadRequest,
                "development trust: this broker has no trust anchor, so nothing to revoke".into(),
            ));
        }
        let r = signed
            .verify(&self.anchors, fem_proto::now_ms())
            .map_err(|e| match e {
                fem_proto::GrantError::Malformed(_) => (ErrorCode::BadRequest, e.to_string()),
                _ => (
                    ErrorCode::PermissionDenied,
                    format!("revocation refused: {e}"),
                ),
            })?;
        let mut list = lock(&self.revocations);
        if list.iter().any(|(x, _)| x.id == r.id) {
            return Ok(None);
        }
        let line = signed
            .to_text()
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.revocations_file)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!(error = %e, file = %self.revocations_file.display(), "revocation not persisted");
        }
        list.push((r.clone(), signed.clone()));
        drop(list);
        // Cached grants are checked again on their next use.
        self.cache.clear();
        Ok(Some(r))
    }

    /// Every revocation held (sent to a peer when a link comes up).
    pub(crate) fn revocations(&self) -> Vec<SignedRevocation> {
        lock(&self.revocations)
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Takes one call from the grant's rate limit, if it has one.
    ///
    /// # Errors
    /// `RATE_LIMITED` with the limit.
    pub(crate) fn take_call(&self, c: &Credential) -> Result<(), Refusal> {
        let Some(rate) = c.grant.rate else {
            return Ok(());
        };
        let now = fem_proto::now_ms();
        let bucket = self
            .buckets
            .entry(c.grant.id)
            .or_insert_with(|| Mutex::new(Bucket::new(rate.burst, now)));
        let mut b = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if b.take(now, rate.per_sec, rate.burst) {
            Ok(())
        } else {
            Err((
                ErrorCode::RateLimited,
                format!(
                    "the grant's rate limit of {} calls/s (burst {}) is exhausted",
                    rate.per_sec, rate.burst
                ),
            ))
        }
    }

    /// Development trust: binds `id` to `key` on first use and refuses any
    /// other key for it afterwards, connected or not.
    ///
    /// # Errors
    /// `ID_CONFLICT` when the id belongs to another key.
    pub(crate) fn bind(&self, id: &AgentId, key: &PublicKey) -> Result<(), Refusal> {
        self.check(id, key, true)
    }

    /// Development trust for one-shot gateway requests: an id that an agent
    /// registered stays that agent's, but a request binds nothing (gateway
    /// clients may use a fresh key per request).
    ///
    /// # Errors
    /// `ID_CONFLICT` when the id belongs to another key.
    pub(crate) fn check_bound(&self, id: &AgentId, key: &PublicKey) -> Result<(), Refusal> {
        self.check(id, key, false)
    }

    fn check(&self, id: &AgentId, key: &PublicKey, bind: bool) -> Result<(), Refusal> {
        let mut b = lock(&self.bindings);
        match b.get(id) {
            Some(k) if k == key => Ok(()),
            Some(k) => Err((
                ErrorCode::IdConflict,
                format!(
                    "agent id {id} belongs to key {} (development trust binds an id to the first key that used it; remove it from {} to reassign)",
                    k.fingerprint(),
                    self.bindings_file.display()
                ),
            )),
            None if !bind => Ok(()),
            None => {
                b.insert(id.clone(), *key);
                let line = format!("{id} {key}\n");
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.bindings_file)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
                if let Err(e) = written {
                    tracing::warn!(error = %e, file = %self.bindings_file.display(), "id binding not persisted");
                }
                Ok(())
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
