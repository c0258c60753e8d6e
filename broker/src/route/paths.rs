//! Path-vector route computation between brokers, as pure functions over a
//! table: no I/O, no clock, no knowledge of sessions. The routing core feeds
//! it what federation links carry and sends what it returns. (It lives with
//! the core rather than in `federation/`, which drives links, so that no
//! two broker modules import each other.)
//!
//! Each broker advertises, per origin broker, the full set of agents it can
//! reach with the path of broker ids the advertisement took. A broker drops
//! advertisements whose path holds its own id (no loops), keeps per peer only
//! the newest sequence number of each origin, prefers per origin the shortest
//! path (then the newest data, then the smallest peer id, so the choice is
//! deterministic), and re-advertises its choice to every peer (a withdrawal
//! where it has none, or where the peer is on the chosen path).

use std::collections::HashMap;

use fem_proto::{AdvertisedAgent, AgentId, FedFrame};

/// Longest path accepted in an advertisement (longer ones are loops or abuse).
pub const MAX_PATH: usize = 32;

/// One origin's agent set as a peer advertised it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// The origin's sequence number of this agent set.
    pub seq: u64,
    /// Brokers the advertisement passed, origin first, sender last.
    pub path: Vec<AgentId>,
    /// The origin's agents.
    pub agents: Vec<AdvertisedAgent>,
}

/// A change of the chosen route of one origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The origin broker.
    pub origin: AgentId,
    /// The new choice, or none (withdrawn).
    pub best: Option<Advert>,
}

/// The best known route to one agent behind another broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRoute {
    /// The peer the route goes through.
    pub via: AgentId,
    /// The broker the agent is connected to.
    pub origin: AgentId,
    /// Broker hops to the agent (1: the peer itself).
    pub hops: u32,
    /// The agent as advertised.
    pub agent: AdvertisedAgent,
}

/// What every peer advertised, and the choice per origin.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// origin -> peer -> what that peer advertised for it.
    adj: HashMap<AgentId, HashMap<AgentId, Advert>>,
    /// origin -> (peer, chosen advertisement).
    best: HashMap<AgentId, (AgentId, Advert)>,
}

impl RouteTable {
    /// Takes `peer`'s advertisement of `origin`; returns the change of choice, if any.
    pub fn advertised(
        &mut self,
        me: &AgentId,
        peer: &AgentId,
        origin: AgentId,
        adv: Advert,
    ) -> Option<Change> {
        let per = self.adj.entry(origin.clone()).or_default();
        if origin == *me || adv.path.contains(me) || adv.path.len() > MAX_PATH {
            // A loop, or our own agents coming back: not a route.
            per.remove(peer);
        } else if per.get(peer).is_none_or(|a| a.seq <= adv.seq) {
            per.insert(peer.clone(), adv);
        }
        self.recompute(&origin)
    }

    /// `peer` no longer reaches `origin`.
    pub fn withdrawn(&mut self, peer: &AgentId, origin: AgentId) -> Option<Change> {
        if let Some(per) = self.adj.get_mut(&origin) {
            per.remove(peer);
        }
        self.recompute(&origin)
    }

    /// The link to `peer` is gone: forget all it advertised.
    pub fn peer_lost(&mut self, peer: &AgentId) -> Vec<Change> {
        let mut origins: Vec<AgentId> = self
            .adj
            .iter_mut()
            .filter_map(|(o, per)| per.remove(peer).map(|_| o.clone()))
            .collect();
        // In a fixed order, so the messages that follow are deterministic.
        origins.sort_unstable();
        origins.iter().filter_map(|o| self.recompute(o)).collect()
    }

    fn recompute(&mut self, origin: &AgentId) -> Option<Change> {
        let choice = self.adj.get(origin).and_then(|per| {
            per.iter()
                .min_by(|(pa, a), (pb, b)| {
                    a.path
                        .len()
                        .cmp(&b.path.len())
                        .then(b.seq.cmp(&a.seq))
                        .then(pa.cmp(pb))
                })
                .map(|(p, a)| (p.clone(), a.clone()))
        });
        if self.adj.get(origin).is_some_and(HashMap::is_empty) {
            self.adj.remove(origin);
        }
        let same = match (&choice, self.best.get(origin)) {
            (Some((p, a)), Some((op, oa))) => p == op && a == oa,
            (None, None) => true,
            _ => false,
        };
        if same {
            return None;
        }
        let best = choice.as_ref().map(|c| c.1.clone());
        match choice {
            Some(c) => self.best.insert(origin.clone(), c),
            None => self.best.remove(origin),
        };
        Some(Change {
            origin: origin.clone(),
            best,
        })
    }

    /// What `me` sends `peer` about `origin` given the choice `best`.
    pub fn frame_for(
        me: &AgentId,
        peer: &AgentId,
        origin: &AgentId,
        best: Option<&Advert>,
    ) -> FedFrame {
        match best {
            Some(a) if !a.path.contains(peer) && origin != peer => {
                let mut path = a.path.clone();
                path.push(me.clone());
                FedFrame::Advertise {
                    origin: origin.clone(),
                    seq: a.seq,
                    path,
                    agents: a.agents.clone(),
                }
            }
            _ => FedFrame::Withdraw {
                origin: origin.clone(),
            },
        }
    }

    /// Every current choice, as sent to a newly linked `peer`.
    pub fn frames_for(&self, me: &AgentId, peer: &AgentId) -> Vec<FedFrame> {
        let mut origins: Vec<_> = self.best.iter().collect();
        origins.sort_by(|a, b| a.0.cmp(b.0));
        origins
            .into_iter()
            .map(|(origin, (_, adv))| Self::frame_for(me, peer, origin, Some(adv)))
            .collect()
    }

    /// The best route to every remote agent (fewest hops; ties by origin id).
    pub fn agents(&self) -> HashMap<AgentId, RemoteRoute> {
        let mut out: HashMap<AgentId, RemoteRoute> = HashMap::new();
        for (origin, (via, adv)) in &self.best {
            let hops = u32::try_from(adv.path.len()).unwrap_or(u32::MAX);
            for a in &adv.agents {
                let better = out
                    .get(&a.id)
                    .is_none_or(|r| (hops, origin) < (r.hops, &r.origin));
                if better {
                    out.insert(
                        a.id.clone(),
                        RemoteRoute {
                            via: via.clone(),
                            origin: origin.clone(),
                            hops,
                            agent: a.clone(),
                        },
                    );
                }
            }
        }
        out
    }

    /// Origins with a chosen route, and the peer each goes through.
    pub fn origins(&self) -> impl Iterator<Item = (&AgentId, &AgentId)> {
        self.best.iter().map(|(o, (via, _))| (o, via))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).expect("id")
    }

    fn adv(seq: u64, path: &[&str]) -> Advert {
        Advert {
            seq,
            path: path.iter().map(|p| id(p)).collect(),
            agents: Vec::new(),
        }
    }

    #[test]
    fn shortest_path_wins_and_loops_are_dropped() {
        let mut t = RouteTable::default();
        let me = id("a");
        assert!(
            t.advertised(&me, &id("c"), id("o"), adv(1, &["o", "x", "c"]))
                .is_some()
        );
        let c = t
            .advertised(&me, &id("b"), id("o"), adv(1, &["o", "b"]))
            .expect("change");
        assert_eq!(c.best.expect("best").path.len(), 2);
        // A path through me is a loop: withdrawn from b.
        let c = t
            .advertised(&me, &id("b"), id("o"), adv(2, &["o", "a", "b"]))
            .expect("change");
        assert_eq!(c.best.expect("best").path.len(), 3);
        // Older sequence numbers never replace newer ones.
        assert!(
            t.advertised(&me, &id("c"), id("o"), adv(0, &["o", "c"]))
                .is_none()
        );
        assert_eq!(t.peer_lost(&id("c")).len(), 1);
        assert!(t.agents().is_empty());
        assert_eq!(t.origins().count(), 0);
    }

    #[test]
    fn frames_never_advertise_back_through_the_path() {
        let me = id("a");
        let a = adv(1, &["o", "b"]);
        assert!(matches!(
            RouteTable::frame_for(&me, &id("b"), &id("o"), Some(&a)),
            FedFrame::Withdraw { .. }
        ));
        match RouteTable::frame_for(&me, &id("c"), &id("o"), Some(&a)) {
            FedFrame::Advertise { path, .. } => assert_eq!(path.len(), 3),
            other => panic!("{other:?}"),
        }
    }
}
