//! Capability summaries (proto/README.md §8.15), as pure data: what a broker
//! tells a stub peer it can route to, and what a stub holds of it.
//!
//! A summary names kinds of agent (capabilities and tool names), never agent
//! ids, with the fewest hops to one of each kind. Many agents share a kind,
//! so a summary's size follows the kinds, and a registration of one more
//! agent of a known kind changes nothing a stub is sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fem_proto::{
    AgentId, Capability, MAX_SUMMARY_PROFILES, SummaryProfile, SummaryTool, Target, ToolSpec,
};

/// Most capabilities, and most tools, one profile of a received summary may
/// name (beyond the names one agent may register under any sane limits).
pub(super) const MAX_PROFILE_NAMES: usize = 1024;

/// What agents of one kind offer (the profile of a summary without hops).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Kind {
    capabilities: Vec<Capability>,
    tools: Vec<SummaryTool>,
}

impl Kind {
    /// The kind of an agent with these capabilities and tools.
    pub(super) fn of(capabilities: &[Capability], tools: &[ToolSpec]) -> Arc<Self> {
        let mut capabilities = capabilities.to_vec();
        capabilities.sort();
        capabilities.dedup();
        let mut tools: Vec<SummaryTool> = tools
            .iter()
            .map(|t| SummaryTool {
                name: t.name.clone(),
                accepts_attested: t.accepts_attested,
            })
            .collect();
        tools.sort();
        tools.dedup();
        Arc::new(Self {
            capabilities,
            tools,
        })
    }

    /// Bytes it takes on the wire, roughly (bounds a summary's frame).
    fn weight(&self) -> usize {
        let strings = self.capabilities.iter().map(|c| c.as_str().len() + 2);
        let tools = self.tools.iter().map(|t| t.name.as_str().len() + 3);
        8 + strings.sum::<usize>() + tools.sum::<usize>()
    }
}

/// Where an agent is, as a summary counts it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    /// Broker hops from this broker (0: its own agent).
    hops: u32,
    /// The broker that holds it.
    origin: AgentId,
    /// The peer its route leaves through (this broker for its own agents).
    via: AgentId,
}

/// The agents this broker can route to, counted by kind and place, kept up
/// to date while a stub peer is linked (so building a summary costs the
/// kinds, not the agents).
#[derive(Debug, Default)]
pub(super) struct SummaryIndex {
    /// Each agent's kind and place (own agents and remote ones apart: an
    /// id may be both while a route catches up).
    local: HashMap<AgentId, (Arc<Kind>, Arc<Place>)>,
    remote: HashMap<AgentId, (Arc<Kind>, Arc<Place>)>,
    counts: BTreeMap<Arc<Kind>, BTreeMap<Arc<Place>, u32>>,
    /// Every place an agent is counted at (few: origins times peers).
    places: BTreeMap<Arc<Place>, u32>,
}

impl SummaryIndex {
    /// Sets (or with `None` removes) an agent of this broker or a remote one.
    pub(super) fn set(
        &mut self,
        local: bool,
        id: &AgentId,
        now: Option<(Arc<Kind>, u32, AgentId, AgentId)>,
    ) {
        let new = now.map(|(kind, hops, origin, via)| {
            let place = Place { hops, origin, via };
            // The shared copies, where the kind or place is counted already.
            let kind = self
                .counts
                .get_key_value(&kind)
                .map_or(kind, |(k, _)| Arc::clone(k));
            let place = self
                .places
                .get_key_value(&place)
                .map_or_else(|| Arc::new(place), |(p, _)| Arc::clone(p));
            (kind, place)
        });
        let map = if local {
            &mut self.local
        } else {
            &mut self.remote
        };
        let old = match &new {
            Some(n) => map.insert(id.clone(), n.clone()),
            None => map.remove(id),
        };
        if old == new {
            return;
        }
        if let Some((kind, place)) = old {
            if let Some(places) = self.counts.get_mut(&kind) {
                if let Some(n) = places.get_mut(&place) {
                    *n -= 1;
                    if *n == 0 {
                        places.remove(&place);
                    }
                }
                if places.is_empty() {
                    self.counts.remove(&kind);
                }
            }
            if let Some(n) = self.places.get_mut(&place) {
                *n -= 1;
                if *n == 0 {
                    self.places.remove(&place);
                }
            }
        }
        if let Some((kind, place)) = new {
            *self.places.entry(Arc::clone(&place)).or_default() += 1;
            *self
                .counts
                .entry(kind)
                .or_default()
                .entry(place)
                .or_default() += 1;
        }
    }

    /// The summary for stub `peer`: every kind reachable other than through
    /// the peer or at it, with the fewest hops from the peer, fewest hops
    /// first; at most [`MAX_SUMMARY_PROFILES`] kinds and about `max_bytes`.
    /// Also returns how many kinds were left out.
    pub(super) fn summary_for(
        &self,
        peer: &AgentId,
        max_bytes: usize,
    ) -> (Vec<SummaryProfile>, usize) {
        let mut kinds: Vec<(u32, &Kind)> = self
            .counts
            .iter()
            .filter_map(|(kind, places)| {
                places
                    .keys()
                    .filter(|p| p.via != *peer && p.origin != *peer)
                    .map(|p| p.hops)
                    .min()
                    .map(|h| (h, &**kind))
            })
            .collect();
        kinds.sort();
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        let total = kinds.len();
        for (hops, kind) in kinds {
            bytes += kind.weight();
            if out.len() == MAX_SUMMARY_PROFILES || bytes > max_bytes {
                break;
            }
            out.push(SummaryProfile {
                hops: u8::try_from(hops.saturating_add(1)).unwrap_or(u8::MAX),
                capabilities: kind.capabilities.clone(),
                tools: kind.tools.clone(),
            });
        }
        let dropped = total - out.len();
        (out, dropped)
    }
}

/// The fewest hops to an agent of `profiles` that could take a call to
/// `tool` on `target` (an id target matches any kind with the tool: the
/// peer resolves the id); `None` when none could.
pub(super) fn best_hops(
    profiles: &[SummaryProfile],
    target: &Target,
    tool: &Capability,
    attested: bool,
) -> Option<u8> {
    profiles
        .iter()
        .filter(|p| p.serves(tool, attested))
        .filter(|p| match target {
            Target::Agent(_) => true,
            Target::Capability(pat) => p.capabilities.iter().any(|c| pat.matches(c)),
        })
        .map(|p| p.hops)
        .min()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    fn cap(s: &str) -> Capability {
        Capability::new(s).unwrap()
    }

    fn tool(name: &str, attested: bool) -> ToolSpec {
        let mut t = ToolSpec::new(cap(name), "", fem_proto::JsonText::new("{}").unwrap());
        t.accepts_attested = attested;
        t
    }

    #[test]
    fn agents_of_one_kind_are_one_profile_and_counted_out_again() {
        let mut ix = SummaryIndex::default();
        let kind = Kind::of(&[cap("work.b"), cap("work.a")], &[tool("t", false)]);
        let me = id("hub");
        for i in 0..1000 {
            ix.set(
                true,
                &id(&format!("a{i}")),
                Some((kind.clone(), 0, me.clone(), me.clone())),
            );
        }
        let (s, dropped) = ix.summary_for(&id("stub"), 1 << 20);
        assert_eq!(dropped, 0);
        assert_eq!(s.len(), 1);
        // One kind and one place, shared by the thousand agents (with the
        // index's keys, and the test's `kind`).
        let (k, p) = &ix.local[&id("a7")];
        assert_eq!((Arc::strong_count(k), Arc::strong_count(p)), (1002, 1002));
        assert_eq!(s[0].hops, 1);
        assert_eq!(s[0].capabilities, vec![cap("work.a"), cap("work.b")]);
        for i in 0..1000 {
            ix.set(true, &id(&format!("a{i}")), None);
        }
        assert!(ix.summary_for(&id("stub"), 1 << 20).0.is_empty());
        assert!(ix.counts.is_empty() && ix.places.is_empty());
    }

    #[test]
    fn a_stub_is_not_told_of_its_own_agents_and_hops_are_the_fewest() {
        let mut ix = SummaryIndex::default();
        let k = Kind::of(&[cap("c")], &[tool("t", true)]);
        let (hub, stub, far) = (id("hub"), id("stub"), id("far"));
        // The stub's own agent, reached directly and through another hub.
        ix.set(
            false,
            &id("s1"),
            Some((k.clone(), 1, stub.clone(), stub.clone())),
        );
        ix.set(
            false,
            &id("s2"),
            Some((k.clone(), 2, stub.clone(), far.clone())),
        );
        assert!(ix.summary_for(&stub, 1 << 20).0.is_empty());
        ix.set(
            false,
            &id("f1"),
            Some((k.clone(), 2, far.clone(), far.clone())),
        );
        ix.set(
            false,
            &id("f2"),
            Some((k.clone(), 1, far.clone(), far.clone())),
        );
        let s = ix.summary_for(&stub, 1 << 20).0;
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].hops, 2);
        // Another peer is told of the stub's agents, one hop closer.
        let s = ix.summary_for(&hub, 1 << 20).0;
        assert_eq!(s[0].hops, 2);
        ix.set(false, &id("f2"), None);
        assert_eq!(ix.summary_for(&stub, 1 << 20).0[0].hops, 3);
    }

    #[test]
    fn a_summary_is_bounded_by_bytes() {
        let mut ix = SummaryIndex::default();
        let me = id("hub");
        for i in 0..100 {
            let k = Kind::of(&[cap(&format!("cap.{i:03}"))], &[tool("t", false)]);
            ix.set(
                true,
                &id(&format!("a{i}")),
                Some((k, 0, me.clone(), me.clone())),
            );
        }
        let (s, dropped) = ix.summary_for(&id("stub"), 200);
        assert!(!s.is_empty() && s.len() < 100);
        assert_eq!(s.len() + dropped, 100);
    }

    #[test]
    fn matching_follows_target_tool_and_attestation() {
        let profiles = vec![
            SummaryProfile {
                hops: 1,
                capabilities: vec![cap("shell.run")],
                tools: vec![SummaryTool {
                    name: cap("exec"),
                    accepts_attested: false,
                }],
            },
            SummaryProfile {
                hops: 3,
                capabilities: vec![cap("shell.run")],
                tools: vec![SummaryTool {
                    name: cap("exec"),
                    accepts_attested: true,
                }],
            },
        ];
        let by_cap = Target::Capability("shell.*".parse().unwrap());
        assert_eq!(best_hops(&profiles, &by_cap, &cap("exec"), false), Some(1));
        assert_eq!(best_hops(&profiles, &by_cap, &cap("exec"), true), Some(3));
        assert_eq!(best_hops(&profiles, &by_cap, &cap("other"), false), None);
        let elsewhere = Target::Capability("file.*".parse().unwrap());
        assert_eq!(best_hops(&profiles, &elsewhere, &cap("exec"), false), None);
        let by_id = Target::Agent(id("anyone"));
        assert_eq!(best_hops(&profiles, &by_id, &cap("exec"), false), Some(1));
    }
}
