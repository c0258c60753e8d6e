//! Path-vector route computation between brokers, as pure functions over a
//! table: no I/O, no clock, no knowledge of sessions. The routing core feeds
//! it what federation links carry and sends what it returns. (It lives with
//! the core rather than in `federation/`, which drives links, so that no
//! two broker modules import each other.)
//!
//! Each broker advertises, per origin broker, the set of agents it can reach
//! with the path of broker ids the advertisement took. A broker drops
//! advertisements whose path holds its own id (no loops), keeps per peer only
//! the newest sequence number of each origin, prefers per origin the shortest
//! path (then the newest data, then the smallest peer id, so the choice is
//! deterministic), and re-advertises its choice to every peer (a withdrawal
//! where it has none, or where the peer is on the chosen path).
//!
//! A peer's advertisement arrives in full ([`RouteTable::advertised`]) or as a
//! delta on the last one it sent ([`RouteTable::delta`]). Each change of a
//! choice comes back as a [`Change`] holding what differs from the previous
//! choice, so a registration costs work and bytes in proportion to the
//! agents that changed, not to the agents an origin has: a delta on the
//! chosen advertisement changes only the agents it names, and a switch to
//! another peer's advertisement is diffed against the previous choice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use fem_proto::{AdvertisedAgent, AgentId, FedFrame};

/// Longest path accepted in an advertisement (longer ones are loops or abuse).
pub const MAX_PATH: usize = 32;

/// Most agents one peer's advertisement of one origin may grow to by
/// deltas (a full advertisement is bounded by the frame size instead).
pub const MAX_ADVERTISED: usize = 100_000;

/// An agent set, by id (ordered, so what is sent is deterministic).
pub type Agents = BTreeMap<AgentId, Arc<AdvertisedAgent>>;

/// One origin's agent set as a peer advertised it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advert {
    /// The origin's sequence number of this agent set.
    pub seq: u64,
    /// Brokers the advertisement passed, origin first, sender last.
    pub path: Vec<AgentId>,
    /// The origin's agents.
    pub agents: Agents,
}

impl Advert {
    /// An advertisement from what a frame carries.
    pub fn new(seq: u64, path: Vec<AgentId>, agents: Vec<AdvertisedAgent>) -> Self {
        Self {
            seq,
            path,
            agents: agents
                .into_iter()
                .map(|a| (a.id.clone(), Arc::new(a)))
                .collect(),
        }
    }
}

/// The chosen advertisement of one origin, as this broker passes it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// The peer it came from.
    pub via: AgentId,
    /// What that peer advertised (a copy: the choice survives the peer's
    /// later changes until they are applied to it).
    pub advert: Advert,
    /// Bumped at every change of the choice: a link that was sent this
    /// version holds exactly `advert`, so a delta on it is enough.
    pub version: u64,
}

/// What the previous choice of an origin was, as peers were sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Before {
    /// Its sequence number (the base of a delta).
    pub seq: u64,
    /// Its version (see [`Chosen::version`]).
    pub version: u64,
}

/// A change of the chosen route of one origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The origin broker.
    pub origin: AgentId,
    /// The previous choice, if there was one.
    pub before: Option<Before>,
    /// Agents new or changed since the previous choice (all of them when
    /// there was none).
    pub added: Vec<Arc<AdvertisedAgent>>,
    /// Ids gone since the previous choice (all of them on a withdrawal).
    pub removed: Vec<AgentId>,
    /// The peer or the path changed: every agent of the origin has a new
    /// route, not only those in `added`.
    pub moved: bool,
}

/// A delta that does not apply to what the peer advertised before: ask the
/// peer for its full advertisement ([`FedFrame::Resync`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap;

/// A peer's change of its advertisement of one origin (what
/// [`FedFrame::AdvertiseDelta`] carries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// The origin's sequence number after the change.
    pub seq: u64,
    /// The sequence number it applies to.
    pub base_seq: u64,
    /// The whole path after the change.
    pub path: Vec<AgentId>,
    /// Agents new or changed.
    pub added: Vec<AdvertisedAgent>,
    /// Ids gone.
    pub removed: Vec<AgentId>,
}

/// What applying a delta did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The change of choice, if any.
    pub change: Option<Change>,
    /// New agents left out: the set would have grown past [`MAX_ADVERTISED`].
    pub over_limit: usize,
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
    pub agent: Arc<AdvertisedAgent>,
}

/// Which agents of the touched peer's advertisement changed.
enum Touched<'a> {
    /// Only these ids (a delta).
    Ids(&'a [AgentId]),
    /// Any of them (a full advertisement or a withdrawal).
    All,
}

/// What every peer advertised, and the choice per origin.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// origin -> peer -> what that peer advertised for it.
    adj: HashMap<AgentId, HashMap<AgentId, Advert>>,
    /// origin -> the chosen advertisement.
    best: HashMap<AgentId, Chosen>,
    /// (origin, peer) whose delta found a gap: a resync was asked for, and
    /// deltas are dropped until a full advertisement or a withdrawal comes.
    resync: BTreeSet<(AgentId, AgentId)>,
    /// The last version given to a choice.
    version: u64,
}

impl RouteTable {
    /// Takes `peer`'s full advertisement of `origin`; returns the change of
    /// choice, if any.
    pub fn advertised(
        &mut self,
        me: &AgentId,
        peer: &AgentId,
        origin: AgentId,
        adv: Advert,
    ) -> Option<Change> {
        let resyncing = self.resync.remove(&(origin.clone(), peer.clone()));
        let per = self.adj.entry(origin.clone()).or_default();
        if origin == *me || adv.path.contains(me) || adv.path.len() > MAX_PATH {
            // A loop, or our own agents coming back: not a route.
            per.remove(peer);
        } else if resyncing || per.get(peer).is_none_or(|a| a.seq <= adv.seq) {
            // An answer to a resync replaces what the peer said before,
            // whatever its number; otherwise only newer numbers do.
            per.insert(peer.clone(), adv);
        }
        self.recompute(&origin, peer, &Touched::All)
    }

    /// Takes `peer`'s delta of `origin` on its advertisement numbered
    /// `d.base_seq`; returns the change of choice, if any.
    ///
    /// # Errors
    /// [`Gap`] when what the peer advertised before is not `base_seq` (or
    /// nothing): the caller asks the peer for a resync. Deltas that follow
    /// are dropped until the full advertisement comes.
    pub fn delta(
        &mut self,
        me: &AgentId,
        peer: &AgentId,
        origin: AgentId,
        d: Delta,
    ) -> Result<Applied, Gap> {
        let Delta {
            seq,
            base_seq,
            path,
            added,
            removed,
        } = d;
        let key = (origin.clone(), peer.clone());
        if self.resync.contains(&key) {
            return Ok(Applied {
                change: None,
                over_limit: 0,
            });
        }
        let held = self
            .adj
            .get_mut(&origin)
            .and_then(|per| per.get_mut(peer))
            .filter(|a| a.seq == base_seq);
        let Some(held) = held else {
            self.resync.insert(key);
            return Err(Gap);
        };
        if origin == *me || path.contains(me) || path.len() > MAX_PATH {
            if let Some(per) = self.adj.get_mut(&origin) {
                per.remove(peer);
            }
            return Ok(Applied {
                change: self.recompute(&origin, peer, &Touched::All),
                over_limit: 0,
            });
        }
        held.seq = seq;
        held.path = path;
        let mut touched: Vec<AgentId> = Vec::with_capacity(added.len() + removed.len());
        for id in removed {
            held.agents.remove(&id);
            touched.push(id);
        }
        let mut over_limit = 0;
        for a in added {
            if held.agents.len() >= MAX_ADVERTISED && !held.agents.contains_key(&a.id) {
                over_limit += 1;
                continue;
            }
            touched.push(a.id.clone());
            held.agents.insert(a.id.clone(), Arc::new(a));
        }
        Ok(Applied {
            change: self.recompute(&origin, peer, &Touched::Ids(&touched)),
            over_limit,
        })
    }

    /// `peer` no longer reaches `origin`.
    pub fn withdrawn(&mut self, peer: &AgentId, origin: AgentId) -> Option<Change> {
        self.resync.remove(&(origin.clone(), peer.clone()));
        if let Some(per) = self.adj.get_mut(&origin) {
            per.remove(peer);
        }
        self.recompute(&origin, peer, &Touched::All)
    }

    /// The link to `peer` is gone: forget all it advertised.
    pub fn peer_lost(&mut self, peer: &AgentId) -> Vec<Change> {
        self.resync.retain(|(_, p)| p != peer);
        let mut origins: Vec<AgentId> = self
            .adj
            .iter_mut()
            .filter_map(|(o, per)| per.remove(peer).map(|_| o.clone()))
            .collect();
        // In a fixed order, so the messages that follow are deterministic.
        origins.sort_unstable();
        origins
            .iter()
            .filter_map(|o| self.recompute(o, peer, &Touched::All))
            .collect()
    }

    /// Chooses again for `origin` after `peer`'s advertisement of it
    /// changed as `touched` says.
    fn recompute(
        &mut self,
        origin: &AgentId,
        peer: &AgentId,
        touched: &Touched<'_>,
    ) -> Option<Change> {
        let choice = self.adj.get(origin).and_then(|per| {
            per.iter()
                .min_by(|(pa, a), (pb, b)| {
                    a.path
                        .len()
                        .cmp(&b.path.len())
                        .then(b.seq.cmp(&a.seq))
                        .then(pa.cmp(pb))
                })
                .map(|(p, _)| p.clone())
        });
        if self.adj.get(origin).is_some_and(HashMap::is_empty) {
            self.adj.remove(origin);
        }
        let Some(via) = choice else {
            // Withdrawn.
            let old = self.best.remove(origin)?;
            return Some(Change {
                origin: origin.clone(),
                before: Some(Before {
                    seq: old.advert.seq,
                    version: old.version,
                }),
                added: Vec::new(),
                removed: old.advert.agents.into_keys().collect(),
                moved: true,
            });
        };
        let new = self.adj.get(origin)?.get(&via)?;
        let version = self.version + 1;
        let change = match self.best.get_mut(origin) {
            None => {
                self.best.insert(
                    origin.clone(),
                    Chosen {
                        via: via.clone(),
                        advert: new.clone(),
                        version,
                    },
                );
                Change {
                    origin: origin.clone(),
                    before: None,
                    added: new.agents.values().cloned().collect(),
                    removed: Vec::new(),
                    moved: true,
                }
            }
            Some(old) => {
                if old.via == via && via != *peer {
                    // The choice stays with a peer whose advertisement did
                    // not change.
                    return None;
                }
                let before = Before {
                    seq: old.advert.seq,
                    version: old.version,
                };
                let moved = old.via != via || old.advert.path != new.path;
                let (added, removed) = match touched {
                    Touched::Ids(ids) if old.via == via => {
                        diff_ids(&mut old.advert.agents, &new.agents, ids)
                    }
                    _ => {
                        let d = diff_all(&old.advert.agents, &new.agents);
                        old.advert.agents.clone_from(&new.agents);
                        d
                    }
                };
                if !moved && added.is_empty() && removed.is_empty() && old.advert.seq == new.seq {
                    return None;
                }
                old.via = via;
                old.advert.seq = new.seq;
                old.advert.path.clone_from(&new.path);
                old.version = version;
                Change {
                    origin: origin.clone(),
                    before: Some(before),
                    added,
                    removed,
                    moved,
                }
            }
        };
        self.version = version;
        Some(change)
    }

    /// The chosen advertisement of `origin`.
    pub fn chosen(&self, origin: &AgentId) -> Option<&Chosen> {
        self.best.get(origin)
    }

    /// What `me` sends `peer` in full about `origin` given the choice
    /// `best` (an advertisement, or a withdrawal where it has none or the
    /// peer is on its path).
    pub fn frame_for(
        me: &AgentId,
        peer: &AgentId,
        origin: &AgentId,
        best: Option<&Advert>,
    ) -> FedFrame {
        match best {
            Some(a) if Self::passes_to(peer, origin, a) => FedFrame::Advertise {
                origin: origin.clone(),
                seq: a.seq,
                path: Self::path_via(me, a),
                agents: a.agents.values().map(|a| (**a).clone()).collect(),
            },
            _ => FedFrame::Withdraw {
                origin: origin.clone(),
            },
        }
    }

    /// True when an advertisement of `origin` taking `a`'s path may be
    /// passed to `peer` (not back to a broker on the path).
    pub fn passes_to(peer: &AgentId, origin: &AgentId, a: &Advert) -> bool {
        !a.path.contains(peer) && origin != peer
    }

    /// `a`'s path extended by `me`.
    pub fn path_via(me: &AgentId, a: &Advert) -> Vec<AgentId> {
        let mut path = Vec::with_capacity(a.path.len() + 1);
        path.extend_from_slice(&a.path);
        path.push(me.clone());
        path
    }

    /// Origins with a chosen route, in order.
    pub fn chosen_origins(&self) -> Vec<AgentId> {
        let mut origins: Vec<AgentId> = self.best.keys().cloned().collect();
        origins.sort_unstable();
        origins
    }

    /// The best route to the remote agent `id` (fewest hops; ties by origin id).
    pub fn route_of(&self, id: &AgentId) -> Option<RemoteRoute> {
        self.best
            .iter()
            .filter_map(|(origin, c)| {
                let agent = c.advert.agents.get(id)?;
                let hops = u32::try_from(c.advert.path.len()).unwrap_or(u32::MAX);
                Some((hops, origin, c, agent))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(hops, origin, c, agent)| RemoteRoute {
                via: c.via.clone(),
                origin: origin.clone(),
                hops,
                agent: Arc::clone(agent),
            })
    }

    /// Origins with a chosen route, and the peer each goes through.
    pub fn origins(&self) -> impl Iterator<Item = (&AgentId, &AgentId)> {
        self.best.iter().map(|(o, c)| (o, &c.via))
    }
}

/// Brings `old` to `new` for the ids of a delta; returns (added or changed,
/// removed) as they differ from `old`.
fn diff_ids(
    old: &mut Agents,
    new: &Agents,
    ids: &[AgentId],
) -> (Vec<Arc<AdvertisedAgent>>, Vec<AgentId>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    // A delta names each id once, but nothing stops a peer naming one twice.
    let ids: BTreeSet<&AgentId> = ids.iter().collect();
    for id in ids {
        match (old.get(id), new.get(id)) {
            (o, Some(n)) if o.is_none_or(|o| o != n) => {
                added.push(Arc::clone(n));
                old.insert(id.clone(), Arc::clone(n));
            }
            (Some(_), None) => {
                removed.push(id.clone());
                old.remove(id);
            }
            _ => {}
        }
    }
    (added, removed)
}

/// (added or changed, removed) from `old` to `new`, in one ordered walk.
fn diff_all(old: &Agents, new: &Agents) -> (Vec<Arc<AdvertisedAgent>>, Vec<AgentId>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let mut o = old.iter().peekable();
    let mut n = new.iter().peekable();
    loop {
        match (o.peek(), n.peek()) {
            (Some((oi, oa)), Some((ni, na))) => match oi.cmp(ni) {
                std::cmp::Ordering::Less => {
                    removed.push((*oi).clone());
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    added.push(Arc::clone(na));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(oa, na) && oa != na {
                        added.push(Arc::clone(na));
                    }
                    o.next();
                    n.next();
                }
            },
            (Some((oi, _)), None) => {
                removed.push((*oi).clone());
                o.next();
            }
            (None, Some((_, na))) => {
                added.push(Arc::clone(na));
                n.next();
            }
            (None, None) => break,
        }
    }
    (added, removed)
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
            agents: Agents::new(),
        }
    }

    fn agent(name: &str) -> AdvertisedAgent {
        AdvertisedAgent {
            id: id(name),
            key: fem_proto::SigningKey::from_seed([7; 32]).public_key(),
            capabilities: Vec::new(),
            tools: Vec::new(),
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
        assert!(c.moved);
        assert_eq!(t.chosen(&id("o")).expect("best").advert.path.len(), 2);
        // A path through me is a loop: withdrawn from b.
        t.advertised(&me, &id("b"), id("o"), adv(2, &["o", "a", "b"]))
            .expect("change");
        assert_eq!(t.chosen(&id("o")).expect("best").advert.path.len(), 3);
        // Older sequence numbers never replace newer ones.
        assert!(
            t.advertised(&me, &id("c"), id("o"), adv(0, &["o", "c"]))
                .is_none()
        );
        assert_eq!(t.peer_lost(&id("c")).len(), 1);
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

    #[test]
    fn deltas_change_only_what_they_name_and_gaps_ask_once() {
        let mut t = RouteTable::default();
        let (me, b, o) = (id("a"), id("b"), id("o"));
        let full = Advert::new(1, vec![o.clone(), b.clone()], vec![agent("x"), agent("y")]);
        let c = t.advertised(&me, &b, o.clone(), full).expect("change");
        assert_eq!((c.before, c.added.len()), (None, 2));
        let v1 = t.chosen(&o).expect("best").version;
        // y leaves, z comes: the change names just those two.
        let delta = |seq, base_seq, added, removed| Delta {
            seq,
            base_seq,
            path: vec![id("o"), id("b")],
            added,
            removed,
        };
        let c = t
            .delta(
                &me,
                &b,
                o.clone(),
                delta(2, 1, vec![agent("z")], vec![id("y")]),
            )
            .expect("applies")
            .change
            .expect("change");
        assert_eq!(
            c.before,
            Some(Before {
                seq: 1,
                version: v1
            })
        );
        assert_eq!(
            c.added.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["z"]
        );
        assert_eq!(c.removed, [id("y")]);
        assert!(!c.moved);
        let ids: Vec<_> = t
            .chosen(&o)
            .expect("best")
            .advert
            .agents
            .keys()
            .cloned()
            .collect();
        assert_eq!(ids, [id("x"), id("z")]);
        // A delta on a number not held is a gap; the next ones are dropped
        // until the full advertisement comes, whatever its number.
        assert_eq!(
            t.delta(&me, &b, o.clone(), delta(4, 3, Vec::new(), Vec::new())),
            Err(Gap)
        );
        let dropped = Applied {
            change: None,
            over_limit: 0,
        };
        assert_eq!(
            t.delta(&me, &b, o.clone(), delta(5, 4, Vec::new(), Vec::new())),
            Ok(dropped)
        );
        let c = t
            .advertised(
                &me,
                &b,
                o.clone(),
                Advert::new(1, vec![o.clone(), b.clone()], vec![agent("x")]),
            )
            .expect("change");
        assert_eq!(c.removed, [id("z")]);
        assert_eq!(t.chosen(&o).expect("best").advert.seq, 1);
        // A switch to another peer is diffed against the previous choice.
        let c = t
            .advertised(
                &me,
                &o,
                o.clone(),
                Advert::new(1, vec![o.clone()], vec![agent("x")]),
            )
            .expect("change");
        assert!(c.moved && c.added.is_empty() && c.removed.is_empty());
        assert_eq!(t.route_of(&id("x")).expect("route").via, o);
    }

    #[test]
    fn deltas_do_not_grow_a_set_past_the_limit() {
        let mut t = RouteTable::default();
        let (me, b) = (id("a"), id("b"));
        let path = vec![b.clone()];
        t.advertised(&me, &b, b.clone(), Advert::new(1, path.clone(), Vec::new()))
            .expect("change");
        let template = agent("x");
        let many = |from: usize, n: usize| -> Vec<AdvertisedAgent> {
            (from..from + n)
                .map(|i| AdvertisedAgent {
                    id: id(&format!("a{i}")),
                    ..template.clone()
                })
                .collect()
        };
        let delta = |seq, added| Delta {
            seq,
            base_seq: seq - 1,
            path: path.clone(),
            added,
            removed: Vec::new(),
        };
        let applied = t
            .delta(&me, &b, b.clone(), delta(2, many(0, MAX_ADVERTISED - 1)))
            .expect("applies");
        assert_eq!(applied.over_limit, 0);
        // Two more: one fits; a known id may still change.
        let mut added = many(MAX_ADVERTISED - 1, 2);
        added.push(many(0, 1).remove(0));
        let applied = t
            .delta(&me, &b, b.clone(), delta(3, added))
            .expect("applies");
        assert_eq!(applied.over_limit, 1);
        let held = &t.chosen(&b).expect("best").advert.agents;
        assert_eq!(held.len(), MAX_ADVERTISED);
    }
}
