//! Replay protection: a timestamp window plus a per-sender nonce cache.

use std::collections::{HashSet, VecDeque};

use crate::error::ProtoError;
use crate::ids::Nonce;

/// Default accepted clock skew either side of the receiver's clock: 60 s.
pub const DEFAULT_REPLAY_WINDOW_MS: u64 = 60_000;

/// Width of one bucket of nonces, ms: buckets are dropped whole once every
/// timestamp they can hold is outside the window.
const BUCKET_MS: u64 = 1_000;

/// The nonces one sender used within the window.
///
/// An envelope is accepted when its timestamp lies within `window_ms` of
/// `now` and its nonce was not seen before among envelopes signed in the
/// same second. Nonces are kept in one set per second of their *own*
/// timestamp, and a set is dropped whole once that second is older than the
/// window: a replay of anything dropped is refused by the timestamp check,
/// so forgetting it is safe, and expiry costs nothing per envelope.
#[derive(Debug, Clone)]
pub struct NonceCache {
    /// (second of the timestamps, their nonces), oldest first.
    buckets: VecDeque<(u64, HashSet<[u8; 16]>)>,
    len: usize,
    window_ms: u64,
    /// The latest `now` seen: forgotten entries lie below `high - window`,
    /// so timestamps below that stay refused even if the clock steps back.
    high: u64,
    max_entries: usize,
}

impl NonceCache {
    /// A cache for a `window_ms` skew holding at most `max_entries` nonces:
    /// a sender exceeding it within one window is rate limited, which makes
    /// `max_entries` a rate limit of `max_entries / window` per second.
    pub fn new(window_ms: u64, max_entries: usize) -> Self {
        Self {
            buckets: VecDeque::new(),
            len: 0,
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
        let second = ts / BUCKET_MS;
        let at = self.buckets.partition_point(|(s, _)| *s < second);
        let exists = self.buckets.get(at).is_some_and(|(s, _)| *s == second);
        if exists && self.buckets[at].1.contains(&nonce.0) {
            return Err(ProtoError::Replayed);
        }
        if self.len >= self.max_entries {
            return Err(ProtoError::RateLimited);
        }
        if !exists {
            self.buckets.insert(at, (second, HashSet::new()));
        }
        self.buckets[at].1.insert(nonce.0);
        self.len += 1;
        Ok(())
    }

    /// Forgets nonces older than the window (they are refused as stale
    /// anyway), a whole second at a time.
    pub fn expire(&mut self, now: u64) {
        self.high = self.high.max(now);
        let cutoff = self.high.saturating_sub(self.window_ms);
        while let Some((second, set)) = self.buckets.front() {
            // The bucket's latest possible timestamp is still in the window.
            if (second + 1) * BUCKET_MS > cutoff {
                break;
            }
            self.len -= set.len();
            self.buckets.pop_front();
        }
    }

    /// Number of nonces held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// Timestamps out of order land in their own second; a bucket goes
    /// only when all of it is outside the window.
    #[test]
    fn buckets_out_of_order_and_partial_expiry() {
        let mut c = NonceCache::new(2_000, 100);
        c.check(10_500, &Nonce([1; 16]), 10_600).unwrap();
        c.check(9_100, &Nonce([2; 16]), 10_600).unwrap();
        c.check(10_900, &Nonce([3; 16]), 10_600).unwrap();
        assert!(matches!(
            c.check(9_100, &Nonce([2; 16]), 10_700),
            Err(ProtoError::Replayed)
        ));
        // Same nonce, another second: a different envelope.
        c.check(10_100, &Nonce([2; 16]), 10_700).unwrap();
        assert_eq!(c.len(), 4);
        // cutoff 9_500: the 9 s bucket may still hold 9_500..9_999, so it stays.
        c.expire(11_500);
        assert_eq!(c.len(), 4);
        // cutoff 10_000: it goes.
        c.expire(12_000);
        assert_eq!(c.len(), 3);
        assert!(matches!(
            c.check(9_100, &Nonce([2; 16]), 12_000),
            Err(ProtoError::StaleTimestamp { .. })
        ));
    }
}
