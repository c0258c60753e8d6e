//! Registered agents, the capability index, and route selection.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use fem_proto::{
    AgentId, Capability, CapabilityPattern, ErrorCode, Frame, PublicKey, Target, ToolSpec,
};
use tokio::sync::{Notify, mpsc};

/// Frames towards one session.
pub(crate) type SessionTx = mpsc::Sender<Frame>;

/// What an agent offers; replaced by embodimentUpdate.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// Tools.
    pub tools: Vec<ToolSpec>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
}

/// One registered agent and its session.
#[derive(Debug)]
pub struct AgentEntry {
    /// Agent id.
    pub id: AgentId,
    /// The key bound to the id while registered.
    pub key: PublicKey,
    /// Distinguishes successive sessions of the same id.
    pub session_id: u64,
    pub(crate) tx: SessionTx,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// Registration time, ms since the epoch.
    pub connected_since_ms: u64,
    /// Concurrency limit declared at registration.
    pub max_concurrent: u32,
    in_flight: AtomicU32,
    /// Time of the last frame received, ms since the epoch.
    pub last_seen_ms: AtomicU64,
    profile: RwLock<Profile>,
    /// Calls waiting for a free slot, oldest first.
    queue: Mutex<VecDeque<Queued>>,
    queued: AtomicUsize,
    /// Notified to close the session (revoke, replacement).
    pub(crate) evict: Notify,
    /// For an agent behind another broker: the peer broker the route goes through.
    pub via: Option<AgentId>,
    /// Broker hops to the agent (0 for a local agent).
    pub hops: u32,
}

/// A call waiting at the broker for a slot on its agent.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) key: crate::core::PendingKey,
    pub(crate) seq: u64,
    pub(crate) deliver: Frame,
}

/// Where [`Registry::select`] placed a call.
#[derive(Debug)]
pub(crate) enum Selection {
    /// A slot was taken on this agent: send now.
    Slot(Arc<AgentEntry>),
    /// Every candidate is at its limit: wait in this agent's queue.
    Queue(Arc<AgentEntry>),
}

impl AgentEntry {
    pub(crate) fn new(
        id: AgentId,
        key: PublicKey,
        session_id: u64,
        tx: SessionTx,
        transport: &'static str,
        max_concurrent: u32,
        profile: Profile,
    ) -> Self {
        let now = fem_proto::now_ms();
        Self {
            id,
            key,
            session_id,
            tx,
            transport,
            connected_since_ms: now,
            max_concurrent,
            in_flight: AtomicU32::new(0),
            last_seen_ms: AtomicU64::new(now),
            profile: RwLock::new(profile),
            queue: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            evict: Notify::new(),
            via: None,
            hops: 0,
        }
    }

    /// An agent reached through peer broker `via`, `hops` brokers away. Its
    /// own broker enforces its concurrency limit, so none applies here.
    pub(crate) fn remote(
        id: AgentId,
        key: PublicKey,
        session_id: u64,
        tx: SessionTx,
        via: AgentId,
        hops: u32,
        profile: Profile,
    ) -> Self {
        let mut e = Self::new(id, key, session_id, tx, "federation", u32::MAX, profile);
        e.via = Some(via);
        e.hops = hops;
        e
    }

    pub(crate) fn offers(&self, tool: &Capability) -> bool {
        self.has_tool(tool)
    }

    /// Calls in flight to this agent.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes one concurrency slot if the agent is below its limit.
    pub(crate) fn try_acquire(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max_concurrent).then_some(n + 1)
            })
            .is_ok()
    }

    /// Returns a slot taken by [`Self::try_acquire`].
    pub(crate) fn release(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Calls waiting at the broker for a slot on this agent.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn queue_lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a waiting call; `still_pending` prunes calls that expired
    /// when the queue is full. False when the queue stays full.
    pub(crate) fn enqueue(
        &self,
        q: Queued,
        limit: usize,
        still_pending: impl Fn(&Queued) -> bool,
    ) -> bool {
        let mut queue = self.queue_lock();
        if queue.len() >= limit {
            queue.retain(|x| still_pending(x));
        }
        if queue.len() >= limit {
            return false;
        }
        queue.push_back(q);
        self.queued.store(queue.len(), Ordering::Relaxed);
        true
    }

    /// Takes the oldest waiting call.
    pub(crate) fn dequeue(&self) -> Option<Queued> {
        let mut queue = self.queue_lock();
        let q = queue.pop_front();
        self.queued.store(queue.len(), Ordering::Relaxed);
        q
    }

    /// Drops every waiting call (the session ended; the calls are answered
    /// through the pending table).
    pub(crate) fn clear_queue(&self) {
        let mut queue = self.queue_lock();
        queue.clear();
        self.queued.store(0, Ordering::Relaxed);
    }

    /// A copy of the profile.
    pub fn profile(&self) -> Profile {
        self.profile.read().map(|p| p.clone()).unwrap_or_default()
    }

    pub(crate) fn set_profile(&self, profile: Profile) {
        if let Ok(mut p) = self.profile.write() {
            *p = profile;
        }
    }

    fn has_tool(&self, tool: &Capability) -> bool {
        self.profile
            .read()
            .is_ok_and(|p| p.tools.iter().any(|t| &t.name == tool))
    }
}

/// The registry: agent id -> entry, capability -> agent ids.
#[derive(Debug, Default)]
pub struct Registry {
    agents: DashMap<AgentId, Arc<AgentEntry>>,
    caps: DashMap<Capability, Vec<AgentId>>,
    rr: AtomicUsize,
}

/// Outcome of [`Registry::insert`].
#[derive(Debug)]
pub(crate) enum Insert {
    /// Registered; the previous session of the same id and key (if any) was replaced.
    Done(Option<Arc<AgentEntry>>),
    /// The id is live under another key.
    Conflict,
}

impl Registry {
    /// Number of registered agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// True when no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The entry of `id`.
    pub fn get(&self, id: &AgentId) -> Option<Arc<AgentEntry>> {
        self.agents.get(id).map(|e| Arc::clone(e.value()))
    }

    /// Every entry (a snapshot).
    pub fn snapshot(&self) -> Vec<Arc<AgentEntry>> {
        self.agents.iter().map(|e| Arc::clone(e.value())).collect()
    }

    pub(crate) fn insert(&self, entry: Arc<AgentEntry>) -> Insert {
        use dashmap::mapref::entry::Entry;
        let caps = entry.profile().capabilities;
        let replaced = match self.agents.entry(entry.id.clone()) {
            Entry::Occupied(mut o) => {
                if o.get().key != entry.key {
                    return Insert::Conflict;
                }
                Some(o.insert(Arc::clone(&entry)))
            }
            Entry::Vacant(v) => {
                v.insert(Arc::clone(&entry));
                None
            }
        };
        if let Some(old) = &replaced {
            self.unindex(&old.id, &old.profile().capabilities);
        }
        self.index(&entry.id, &caps);
        Insert::Done(replaced)
    }

    /// Removes `id` if its current session is `session_id`; returns whether it did.
    pub(crate) fn remove(&self, id: &AgentId, session_id: u64) -> bool {
        match self.agents.remove_if(id, |_, e| e.session_id == session_id) {
            Some((_, e)) => {
                self.unindex(id, &e.profile().capabilities);
                true
            }
            None => false,
        }
    }

    /// Replaces an agent's profile (embodimentUpdate).
    pub(crate) fn update_profile(&self, entry: &AgentEntry, profile: Profile) {
        let old = entry.profile().capabilities;
        self.unindex(&entry.id, &old);
        let caps = profile.capabilities.clone();
        if let Ok(mut p) = entry.profile.write() {
            *p = profile;
        }
        self.index(&entry.id, &caps);
    }

    fn index(&self, id: &AgentId, caps: &[Capability]) {
        for c in caps {
            let mut v = self.caps.entry(c.clone()).or_default();
            if !v.contains(id) {
                v.push(id.clone());
            }
        }
    }

    fn unindex(&self, id: &AgentId, caps: &[Capability]) {
        for c in caps {
            if let Some(mut v) = self.caps.get_mut(c) {
                v.retain(|x| x != id);
            }
            self.caps.remove_if(c, |_, v| v.is_empty());
        }
    }

    /// Agents with a capability matching `pattern`.
    pub fn matching(&self, pattern: &CapabilityPattern) -> Vec<Arc<AgentEntry>> {
        let mut ids: Vec<AgentId> = if pattern.is_exact() {
            Capability::new(pattern.as_str())
                .ok()
                .and_then(|c| self.caps.get(&c).map(|v| v.clone()))
                .unwrap_or_default()
        } else {
            self.caps
                .iter()
                .filter(|e| pattern.matches(e.key()))
                .flat_map(|e| e.value().clone())
                .collect()
        };
        ids.sort_unstable();
        ids.dedup();
        ids.iter().filter_map(|id| self.get(id)).collect()
    }

    /// Picks a live agent for a call: fewest calls in flight, round robin
    /// among ties, never above an agent's limit; takes a slot on it. When
    /// every candidate is at its limit (or already has calls waiting, so
    /// waiting calls keep their order), picks the shortest queue below
    /// `queue_limit`.
    ///
    /// # Errors
    /// `NO_ROUTE`, `TOOL_NOT_FOUND` or `RATE_LIMITED` with a reason.
    pub(crate) fn select(
        &self,
        target: &Target,
        tool: &Capability,
        queue_limit: usize,
    ) -> Result<Selection, (ErrorCode, String)> {
        let mut candidates = match target {
            Target::Agent(id) => {
                let e = self
                    .get(id)
                    .ok_or_else(|| (ErrorCode::NoRoute, format!("no agent {id} is registered")))?;
                if !e.has_tool(tool) {
                    return Err((
                        ErrorCode::ToolNotFound,
                        format!("agent {id} offers no tool {tool}"),
                    ));
                }
                vec![e]
            }
            Target::Capability(p) => {
                let all = self.matching(p);
                if all.is_empty() {
                    return Err((
                        ErrorCode::NoRoute,
                        format!("no agent has a capability matching {p}"),
                    ));
                }
                let with_tool: Vec<_> = all.into_iter().filter(|e| e.has_tool(tool)).collect();
                if with_tool.is_empty() {
                    return Err((
                        ErrorCode::ToolNotFound,
                        format!("no agent matching {p} offers tool {tool}"),
                    ));
                }
                with_tool
            }
        };
        candidates.retain(|e| e.max_concurrent > 0);
        if candidates.is_empty() {
            return Err((
                ErrorCode::NoRoute,
                format!("no agent matching the target serves calls ({tool})"),
            ));
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let pick = |list: &[Arc<AgentEntry>], load: &dyn Fn(&AgentEntry) -> usize| {
            let len = list.len();
            let mut best = start % len;
            for i in 1..len {
                let j = (start + i) % len;
                if load(&list[j]) < load(&list[best]) {
                    best = j;
                }
            }
            best
        };
        let mut free: Vec<_> = candidates
            .iter()
            .filter(|e| e.queued() == 0)
            .cloned()
            .collect();
        while !free.is_empty() {
            let best = pick(&free, &|e| e.in_flight() as usize);
            let e = free.swap_remove(best);
            if e.try_acquire() {
                return Ok(Selection::Slot(e));
            }
        }
        let best = pick(&candidates, &|e| e.queued());
        let e = candidates.swap_remove(best);
        if e.queued() < queue_limit {
            Ok(Selection::Queue(e))
        } else {
            Err((
                ErrorCode::RateLimited,
                format!(
                    "agent {} is at its concurrency limit and {} calls are waiting",
                    e.id,
                    e.queued()
                ),
            ))
        }
    }
}
