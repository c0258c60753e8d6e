//! Memory bounds in bytes: the broker-wide budget (`--max-memory`) and the
//! per-session outbound queue (`--session-queue-bytes`, `--session-queue`).
//!
//! Every frame queued towards a client carries its weight; the weight is
//! released when the frame leaves the queue (written, or dropped with the
//! session), so the counters cannot drift whatever way a session ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fem_proto::Frame;
use serde::{Serialize, Serializer};
use tokio::sync::mpsc;

/// Bytes counted against `--max-memory`.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// True when new work (calls, events) must be refused: what is held
    /// already is answered, nothing new is taken on.
    pub(crate) fn exhausted(&self) -> bool {
        self.used() >= self.limit
    }

    /// The configured limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

/// An approximation of the memory a queued frame holds: its variable parts
/// plus a fixed overhead.
pub(crate) fn weight(f: &Frame) -> usize {
    const OVERHEAD: usize = 128;
    OVERHEAD
        + match f {
            Frame::Envelope(e) | Frame::Deliver { envelope: e, .. } => e.bytes.len(),
            Frame::Unsigned(e) | Frame::Attested { envelope: e, .. } => e.bytes.len(),
            Frame::Denied { reason: m, .. }
            | Frame::CallFailed { message: m, .. }
            | Frame::Nack { message: m, .. }
            | Frame::Error { message: m, .. } => m.len(),
            Frame::Grant(g) => g.chain.iter().map(|l| l.body.len() + 96).sum(),
            Frame::Progress { update, .. } => update.message.as_ref().map_or(0, String::len),
            Frame::Accepted(_)
            | Frame::Cancel { .. }
            | Frame::Heartbeat { .. }
            | Frame::HeartbeatAck { .. }
            | Frame::Ack { .. }
            | Frame::Subscribe { .. }
            | Frame::Unsubscribe { .. } => 0,
        }
}

/// The accounts one session's queue is charged to.
#[derive(Debug)]
struct Accounts {
    queued: AtomicUsize,
    budget: Arc<Budget>,
}

/// A frame in a session queue; dropping it releases its weight.
#[derive(Debug)]
pub(crate) struct Queued {
    /// Boxed, so a queue slot is 3 words: every session's queue allocates
    /// its first block of 32 slots when it is made, and with frames inline
    /// that block took 4 KiB per connection, idle or not.
    frame: Option<Box<Frame>>,
    weight: usize,
    accounts: Arc<Accounts>,
}

impl Queued {
    /// Takes the frame out, releasing its weight.
    pub(crate) fn into_frame(mut self) -> Frame {
        self.frame
            .take()
            .map_or(Frame::Heartbeat { seq: 0 }, |f| *f)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.accounts
            .queued
            .fetch_sub(self.weight, Ordering::Relaxed);
        self.accounts.budget.release(self.weight);
    }
}

impl Serialize for Queued {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Only `into_frame`, which consumes the item, takes the frame out.
        match &self.frame {
            Some(f) => f.serialize(s),
            None => Err(serde::ser::Error::custom("frame already taken")),
        }
    }
}

/// Why a frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The session is gone.
    Closed,
    /// The queue is over `--session-queue` frames or `--session-queue-bytes`:
    /// the client does not read (the name is the limit).
    Full(&'static str),
}

/// The sending side of a session queue, bounded in frames and bytes.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Queued>,
    accounts: Arc<Accounts>,
    max_bytes: usize,
}

impl Outbox {
    /// A queue of at most `frames` frames and `max_bytes` bytes.
    pub(crate) fn new(
        frames: usize,
        max_bytes: usize,
        budget: &Arc<Budget>,
    ) -> (Self, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(frames);
        let accounts = Arc::new(Accounts {
            queued: AtomicUsize::new(0),
            budget: Arc::clone(budget),
        });
        (
            Self {
                tx,
                accounts,
                max_bytes,
            },
            rx,
        )
    }

    /// Queues a frame without waiting.
    ///
    /// # Errors
    /// [`PushError`]; the frame is dropped.
    pub(crate) fn push(&self, frame: Frame) -> Result<(), PushError> {
        let w = weight(&frame);
        let before = self.accounts.queued.fetch_add(w, Ordering::Relaxed);
        self.accounts.budget.add(w);
        let item = Queued {
            frame: Some(Box::new(frame)),
            weight: w,
            accounts: Arc::clone(&self.accounts),
        };
        // One frame larger than the whole allowance still passes into an
        // empty queue: the frame limit bounds it.
        if before > 0 && before + w > self.max_bytes {
            return Err(PushError::Full("session_queue_bytes"));
        }
        self.tx.try_send(item).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PushError::Full("session_queue"),
            mpsc::error::TrySendError::Closed(_) => PushError::Closed,
        })
    }

    /// Bytes queued now.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.accounts.queued.load(Ordering::Relaxed)
    }
}

/// A token bucket: `per_sec` tokens a second, at most `burst` saved.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub(crate) fn new(burst: u32, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(burst),
            last_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now_ms: u64, per_sec: u32, burst: u32) -> bool {
        #[allow(clippy::cast_precision_loss)]
        let refill = now_ms.saturating_sub(self.last_ms) as f64 * f64::from(per_sec) / 1000.0;
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.last_ms = self.last_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn big(n: usize) -> Frame {
        Frame::Error {
            code: fem_proto::ErrorCode::Internal,
            message: "x".repeat(n),
        }
    }

    #[test]
    fn bytes_are_bounded_and_released_on_every_path() {
        let budget = Budget::new(1 << 30);
        let (out, mut rx) = Outbox::new(100, 10_000, &budget);
        out.push(big(4000)).unwrap();
        out.push(big(4000)).unwrap();
        assert_eq!(
            out.push(big(4000)),
            Err(PushError::Full("session_queue_bytes"))
        );
        assert_eq!(budget.used(), out.queued_bytes());
        // Written: released.
        let q = rx.try_recv().unwrap();
        assert_eq!(q.into_frame(), big(4000));
        assert_eq!(out.queued_bytes(), weight(&big(4000)));
        // Dropped with the receiver: released.
        drop(rx);
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(budget.used(), 0);
        assert_eq!(out.push(big(1)), Err(PushError::Closed));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn frame_count_is_bounded_too() {
        let budget = Budget::new(1 << 30);
        let (out, _rx) = Outbox::new(2, 1 << 20, &budget);
        out.push(Frame::Heartbeat { seq: 1 }).unwrap();
        out.push(Frame::Heartbeat { seq: 2 }).unwrap();
        assert_eq!(
            out.push(Frame::Heartbeat { seq: 3 }),
            Err(PushError::Full("session_queue"))
        );
        assert_eq!(budget.used(), 2 * weight(&Frame::Heartbeat { seq: 0 }));
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(2, 0);
        assert!(b.take(0, 10, 2));
        assert!(b.take(0, 10, 2));
        assert!(!b.take(0, 10, 2));
        assert!(!b.take(50, 10, 2));
        assert!(b.take(100, 10, 2));
        // Saved tokens stop at the burst.
        assert!(b.take(10_000, 10, 2) && b.take(10_000, 10, 2));
        assert!(!b.take(10_000, 10, 2));
    }

    #[test]
    fn one_large_frame_passes_an_empty_queue() {
        let budget = Budget::new(10);
        let (out, _rx) = Outbox::new(4, 100, &budget);
        out.push(big(1000)).unwrap();
        assert!(budget.exhausted());
    }
}
