//! Calls in flight and their deadlines, kept together so that a call leaves
//! both in one step.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use fem_proto::{AgentId, Frame, PublicKey, RequestId};

use super::{CallId, ClientId, LinkId, Micros, ReplyTo};

/// Where a call went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CallTarget {
    /// An agent on a session of this broker.
    Local {
        /// The agent's session.
        session: ClientId,
        /// The agent.
        agent: AgentId,
    },
    /// An agent behind a peer broker, relayed over `link` under the call's id.
    Remote {
        /// The link the call left on.
        link: LinkId,
        /// The agent chosen.
        agent: AgentId,
        /// Its advertised key: the result must be signed by it.
        key: PublicKey,
    },
    /// Relayed open over `link` to `peer`, whose summary this stub holds:
    /// the peer chooses the agent.
    Open {
        /// The link the call left on.
        link: LinkId,
        /// The peer.
        peer: AgentId,
    },
}

impl CallTarget {
    /// The agent the call went to.
    pub(crate) fn agent(&self) -> &AgentId {
        match self {
            Self::Local { agent, .. } | Self::Remote { agent, .. } => agent,
            Self::Open { peer, .. } => peer,
        }
    }

    /// The link a relayed call left on.
    pub(crate) fn link(&self) -> Option<LinkId> {
        match self {
            Self::Local { .. } => None,
            Self::Remote { link, .. } | Self::Open { link, .. } => Some(*link),
        }
    }
}

/// A call awaiting its terminal answer.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) reply: ReplyTo,
    pub(crate) caller: AgentId,
    pub(crate) request_id: RequestId,
    pub(crate) target: CallTarget,
    pub(crate) started: Micros,
    pub(crate) deadline: Micros,
    /// True once the call holds a concurrency slot on a local agent.
    pub(crate) holds_slot: bool,
    /// The frame to deliver, kept while the call waits for a slot.
    pub(crate) waiting: Option<Frame>,
    /// The progress rate limit, from the call's first update.
    pub(crate) progress: Option<crate::budget::TokenBucket>,
    /// The call is broker-attested: its result may come back unsigned.
    pub(crate) attested: bool,
}

/// Who may cancel a call: the client that made it, by its request id, or
/// the peer that relayed it, by its relay id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Origin {
    Client(ClientId, RequestId),
    Link(LinkId, u64),
}

fn origin(p: &Pending) -> Origin {
    match p.reply {
        ReplyTo::Client(c) => Origin::Client(c, p.request_id),
        ReplyTo::Link { link, relay } => Origin::Link(link, relay),
    }
}

/// The pending table, its indexes by (agent session, request id) and by
/// origin, and the deadline heap.
#[derive(Debug, Default)]
pub(crate) struct PendingTable {
    calls: HashMap<CallId, Pending>,
    by_local: HashMap<(ClientId, RequestId), CallId>,
    by_origin: HashMap<Origin, CallId>,
    deadlines: BinaryHeap<Reverse<(Micros, CallId)>>,
    next: u64,
}

impl PendingTable {
    pub(crate) fn len(&self) -> usize {
        self.calls.len()
    }

    pub(crate) fn get(&self, id: CallId) -> Option<&Pending> {
        self.calls.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: CallId) -> Option<&mut Pending> {
        self.calls.get_mut(&id)
    }

    /// The call an agent's session answers with `request_id`.
    pub(crate) fn local(&self, session: ClientId, request_id: RequestId) -> Option<CallId> {
        self.by_local.get(&(session, request_id)).copied()
    }

    /// The call `client` made under `request_id`.
    pub(crate) fn made_by(&self, client: ClientId, request_id: RequestId) -> Option<CallId> {
        self.by_origin
            .get(&Origin::Client(client, request_id))
            .copied()
    }

    /// The call the peer on `link` relayed as `relay`.
    pub(crate) fn relayed_by(&self, link: LinkId, relay: u64) -> Option<CallId> {
        self.by_origin.get(&Origin::Link(link, relay)).copied()
    }

    /// Files a call; `None` when the same agent session already has a call
    /// with this request id in flight.
    pub(crate) fn insert(&mut self, p: Pending) -> Option<CallId> {
        self.next += 1;
        let id = CallId(self.next);
        if let CallTarget::Local { session, .. } = &p.target {
            let key = (*session, p.request_id);
            if self.by_local.contains_key(&key) {
                return None;
            }
            self.by_local.insert(key, id);
        }
        // A caller reusing a request id cancels only its latest call.
        self.by_origin.insert(origin(&p), id);
        self.deadlines.push(Reverse((p.deadline, id)));
        self.calls.insert(id, p);
        Some(id)
    }

    pub(crate) fn remove(&mut self, id: CallId) -> Option<Pending> {
        let p = self.calls.remove(&id)?;
        if let CallTarget::Local { session, .. } = &p.target {
            self.by_local.remove(&(*session, p.request_id));
        }
        let o = origin(&p);
        if self.by_origin.get(&o) == Some(&id) {
            self.by_origin.remove(&o);
        }
        // Answered calls leave their heap entry until it is due; when they
        // outnumber the calls in flight, drop them, so the heap follows the
        // calls in flight and not calls/s x timeout.
        if self.deadlines.len() > 1024 && self.deadlines.len() > 2 * self.calls.len() {
            let calls = &self.calls;
            self.deadlines
                .retain(|Reverse((_, id))| calls.contains_key(id));
        }
        Some(p)
    }

    /// Ids of the calls matching `f`.
    pub(crate) fn select(&self, f: impl Fn(&Pending) -> bool) -> Vec<CallId> {
        let mut ids: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, p)| f(p))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The earliest deadline still filed (possibly of an answered call).
    pub(crate) fn next_deadline(&self) -> Option<Micros> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    /// Calls whose deadline is `now` or earlier, removed from the heap.
    pub(crate) fn due(&mut self, now: Micros) -> Vec<CallId> {
        let mut due = Vec::new();
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if self.calls.contains_key(&id) {
                due.push(id);
            }
        }
        due
    }

    /// Deadline entries kept (for tests of the pruning).
    #[cfg(test)]
    pub(crate) fn heap_len(&self) -> usize {
        self.deadlines.len()
    }
}
