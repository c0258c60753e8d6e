//! Local agents: sessions, profiles, the capability index, concurrency slots
//! and the calls waiting for one.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use fem_proto::{AgentId, Capability, CapabilityPattern, PublicKey, ToolSpec};

use super::{CallId, ClientId};

/// What an agent offers; replaced by embodimentUpdate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// Tools.
    pub tools: Vec<ToolSpec>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Profile {
    /// True when the agent offers a tool named `tool`.
    pub fn has_tool(&self, tool: &Capability) -> bool {
        self.tools.iter().any(|t| &t.name == tool)
    }

    /// True when one of the capabilities matches `pattern`.
    pub fn matches(&self, pattern: &CapabilityPattern) -> bool {
        self.capabilities.iter().any(|c| pattern.matches(c))
    }
}

/// One caller's use of one agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerUse {
    /// Calls holding a slot.
    pub slots: u32,
    /// Calls waiting in the agent's queue.
    pub waiting: u32,
}

/// One agent registered on a session of this broker.
#[derive(Debug)]
pub struct LocalAgent {
    /// Agent id.
    pub id: AgentId,
    /// The key bound to the id while registered.
    pub key: PublicKey,
    /// Its session.
    pub session: ClientId,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// Registration time, ms since the epoch.
    pub connected_since_ms: u64,
    /// Concurrency limit declared at registration.
    pub max_concurrent: u32,
    /// Calls holding a slot.
    pub in_flight: u32,
    /// Calls waiting for a slot, oldest first.
    pub queue: VecDeque<CallId>,
    /// Slots held and calls waiting, per caller (the fair-use share).
    pub by_caller: HashMap<AgentId, CallerUse>,
    /// What it offers.
    pub profile: Profile,
    /// Callers whose grant this session already received.
    pub grants_sent: HashSet<PublicKey>,
}

/// The registry: agent id -> agent, session -> id, capability -> ids.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    agents: HashMap<AgentId, LocalAgent>,
    sessions: HashMap<ClientId, AgentId>,
    caps: HashMap<Capability, Vec<AgentId>>,
}

impl LocalAgent {
    /// The caller's use of this agent.
    pub fn use_of(&self, caller: &AgentId) -> CallerUse {
        self.by_caller.get(caller).copied().unwrap_or_default()
    }

    /// Changes the caller's use; entries at zero are removed.
    /// The id is copied only when the caller gets an entry.
    pub(crate) fn adjust(&mut self, caller: &AgentId, f: impl FnOnce(&mut CallerUse)) {
        match self.by_caller.get_mut(caller) {
            Some(e) => {
                f(e);
                if *e == CallerUse::default() {
                    self.by_caller.remove(caller);
                }
            }
            None => {
                let mut e = CallerUse::default();
                f(&mut e);
                if e != CallerUse::default() {
                    self.by_caller.insert(caller.clone(), e);
                }
            }
        }
    }
}

impl Registry {
    pub(crate) fn len(&self) -> usize {
        self.agents.len()
    }

    pub(crate) fn get(&self, id: &AgentId) -> Option<&LocalAgent> {
        self.agents.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: &AgentId) -> Option<&mut LocalAgent> {
        self.agents.get_mut(id)
    }

    pub(crate) fn by_session(&self, session: ClientId) -> Option<&LocalAgent> {
        self.sessions
            .get(&session)
            .and_then(|id| self.agents.get(id))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &LocalAgent> {
        self.agents.values()
    }

    /// Inserts an agent; the previous agent of the same id is returned.
    pub(crate) fn insert(&mut self, agent: LocalAgent) -> Option<LocalAgent> {
        let old = self.remove_id(&agent.id);
        self.index(&agent.id, &agent.profile.capabilities);
        self.sessions.insert(agent.session, agent.id.clone());
        self.agents.insert(agent.id.clone(), agent);
        old
    }

    /// Removes the agent of `session`, if it is still registered.
    pub(crate) fn remove_session(&mut self, session: ClientId) -> Option<LocalAgent> {
        let id = self.sessions.get(&session)?.clone();
        self.remove_id(&id)
    }

    fn remove_id(&mut self, id: &AgentId) -> Option<LocalAgent> {
        let old = self.agents.remove(id)?;
        self.sessions.remove(&old.session);
        self.unindex(id, &old.profile.capabilities);
        Some(old)
    }

    /// Replaces the profile of the agent of `session`.
    pub(crate) fn set_profile(&mut self, session: ClientId, profile: Profile) -> bool {
        let Some(id) = self.sessions.get(&session).cloned() else {
            return false;
        };
        let Some(old) = self.agents.get(&id).map(|a| a.profile.capabilities.clone()) else {
            return false;
        };
        self.unindex(&id, &old);
        self.index(&id, &profile.capabilities);
        if let Some(a) = self.agents.get_mut(&id) {
            a.profile = profile;
        }
        true
    }

    fn index(&mut self, id: &AgentId, caps: &[Capability]) {
        for c in caps {
            let v = self.caps.entry(c.clone()).or_default();
            if !v.contains(id) {
                v.push(id.clone());
            }
        }
    }

    fn unindex(&mut self, id: &AgentId, caps: &[Capability]) {
        for c in caps {
            if let Some(v) = self.caps.get_mut(c) {
                v.retain(|x| x != id);
                if v.is_empty() {
                    self.caps.remove(c);
                }
            }
        }
    }

    /// Ids of agents with a capability matching `pattern`, sorted.
    pub(crate) fn matching(&self, pattern: &CapabilityPattern) -> Vec<AgentId> {
        let mut ids: Vec<AgentId> = if pattern.is_exact() {
            Capability::new(pattern.as_str())
                .ok()
                .and_then(|c| self.caps.get(&c).cloned())
                .unwrap_or_default()
        } else {
            self.caps
                .iter()
                .filter(|(c, _)| pattern.matches(c))
                .flat_map(|(_, v)| v.iter().cloned())
                .collect()
        };
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
