//! Replay protection: a timestamp window plus a per-sender nonce cache.

use std::collections::BTreeSet;

use crate::error::ProtoError;
use crate::ids::Nonce;

/// Default accepted clock skew either side of the receiver's clock: 60 s.
pub const DEFAULT_REPLAY_WINDOW_MS: u64 = 60_000;

/// The nonces one sender used within the window.
///
/// An envelope is accepted when its timestamp lies within `window_ms` of
/// `now` and its (timestamp, nonce) was not seen before. Entries are expired by
/// their *own* timestamp: once an entry is older than the window, a replay of
/// it is refused by the timestamp check, so forgetting it is safe.
#[derive(Debug, Clone)]
pub struct NonceCache {
    seen: BTreeSet<(u64, [u8; 16])>,
    window_ms: u64,
    /// The latest `now` seen: forgotten entries lie below `high - window`,
    /// so timestamps below that stay refused even if the clock steps back.
    high: u64,
    max_entries: usize,
}

impl NonceCache {
    /// A cache for a `window_ms` skew holding at most `max_entries` nonces
    /// (a sender exceeding it within one window is rate limited).
    pub fn new(window_ms: u64, max_entries: usize) -> Self {
        Self {
            seen: BTreeSet::new(),
            window_ms,
            high: 0,
            max_entries,
        }
    }

    /// Checks and records one envelope.
    ///
    /// # Errors
    /// [`ProtoError::StaleTimestamp`], [`ProtoError::Replayed`] or
    /// [`ProtoError::RateLimited`]; a refused envelope is not recorded.
    pub fn check(&mut self, ts: u64, nonce: &Nonce, now: u64) -> Result<(), ProtoError> {
        if ts.abs_diff(now) > self.window_ms || ts < self.high.saturating_sub(self.window_ms) {
            return Err(ProtoError::StaleTimestamp {
                ts,
                now,
                window_ms: self.window_ms,
            });
        }
        self.expire(now);
        if self.seen.contains(&(ts, nonce.0)) {
            return Err(ProtoError::Replayed);
        }
        if self.seen.len() >= self.max_entries {
            return Err(ProtoError::RateLimited);
        }
        self.seen.insert((ts, nonce.0));
        Ok(())
    }

    /// Forgets nonces older than the window (they are refused as stale anyway).
    pub fn expire(&mut self, now: u64) {
        self.high = self.high.max(now);
        let cutoff = self.high.saturating_sub(self.window_ms);
        if self.seen.first().is_some_and(|f| f.0 < cutoff) {
            self.seen = self.seen.split_off(&(cutoff, [0; 16]));
        }
    }

    /// Number of nonces held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_replay_and_expiry() {
        let mut c = NonceCache::new(1000, 3);
        let n = Nonce([1; 16]);
        c.check(10_000, &n, 10_000).unwrap();
        assert!(matches!(
            c.check(10_000, &n, 10_100),
            Err(ProtoError::Replayed)
        ));
        assert!(matches!(
            c.check(8_000, &Nonce([2; 16]), 10_000),
            Err(ProtoError::StaleTimestamp { .. })
        ));
        // Virtual time moves on: the old entry expires, and its replay is stale.
        c.check(12_000, &Nonce([3; 16]), 12_000).unwrap();
        assert_eq!(c.len(), 1);
        assert!(matches!(
            c.check(10_000, &n, 12_000),
            Err(ProtoError::StaleTimestamp { .. })
        ));
        c.check(12_001, &Nonce([4; 16]), 12_000).unwrap();
        c.check(12_002, &Nonce([5; 16]), 12_000).unwrap();
        // The clock steps back: forgotten timestamps stay refused.
        assert!(matches!(
            c.check(10_000, &n, 10_500),
            Err(ProtoError::StaleTimestamp { .. })
        ));
        assert!(matches!(
            c.check(12_003, &Nonce([6; 16]), 12_000),
            Err(ProtoError::RateLimited)
        ));
    }
}
