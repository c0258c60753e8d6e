//! Broker-to-broker messages on federation links (ALPN `fem-fed/1`).
//!
//! Routing is path-vector: each broker advertises, per origin broker, the
//! agents it can reach and the path of broker ids the advertisement took.
//! A broker ignores an advertisement whose path holds its own id (no loops),
//! keeps from each peer only the newest sequence number of each origin (an
//! old advertisement never replaces a newer one), and prefers per origin the
//! shortest path.
//!
//! Between brokers that both announce [`DELTA_FEATURE`], an origin's agent set
//! crosses a link in full once (when the link comes up, and when the receiver
//! asks with [`FedFrame::Resync`]); every later change is an
//! [`FedFrame::AdvertiseDelta`] naming the sequence number it applies to, so
//! one registration costs the same bytes however many agents are registered.

use serde::{Deserialize, Serialize};

use crate::envelope::ToolSpec;
use crate::error::ErrorCode;
use crate::ids::{AgentId, Capability, RequestId};
use crate::keys::PublicKey;
use crate::signed::{Carried, SignedEnvelope, UnsignedEnvelope};

/// Default limit on broker hops for a relayed call.
pub const DEFAULT_MAX_HOPS: u8 = 8;

/// An agent as advertised to peer brokers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdvertisedAgent {
    /// Agent id.
    pub id: AgentId,
    /// Its registered key (callers and relays verify its results with it).
    pub key: PublicKey,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// Tools.
    pub tools: Vec<ToolSpec>,
}

/// A tool as a capability summary names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryTool {
    /// Tool name.
    pub name: Capability,
    /// The tool takes broker-attested calls.
    pub accepts_attested: bool,
}

/// One kind of agent reachable through the sender of a
/// [`FedFrame::Summary`]: what such agents offer, without their ids.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryProfile {
    /// Broker hops from the receiver to the nearest such agent (1: an agent
    /// of the sender itself).
    pub hops: u8,
    /// Capabilities such an agent offers (sorted).
    pub capabilities: Vec<Capability>,
    /// Its tools (sorted by name).
    pub tools: Vec<SummaryTool>,
}

impl SummaryProfile {
    /// True when an agent of this kind serves `tool` (taking an attested
    /// call only if the tool accepts them).
    pub fn serves(&self, tool: &Capability, attested: bool) -> bool {
        self.tools
            .iter()
            .any(|t| t.name == *tool && (t.accepts_attested || !attested))
    }
}

/// A message on a federation link. postcard encodes variants by index: only append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum FedFrame {
    /// The first message each side sends: a signed registerBroker.
    Hello(SignedEnvelope),
    /// Hello refused; the link closes.
    Refused {
        /// Why.
        code: ErrorCode,
        /// Detail.
        reason: String,
    },
    /// The agents reachable through the sender for one origin broker.
    Advertise {
        /// The broker the agents are connected to.
        origin: AgentId,
        /// The origin's sequence number of this agent set.
        seq: u64,
        /// Brokers the advertisement passed, origin first, sender last.
        path: Vec<AgentId>,
        /// The full agent set of the origin.
        agents: Vec<AdvertisedAgent>,
    },
    /// The sender no longer reaches `origin`.
    Withdraw {
        /// The origin broker.
        origin: AgentId,
    },
    /// A call relayed to the receiver (relay/1: the receiver chose the
    /// agent again). No longer sent; a broker refuses it (see `RelayCall`).
    Call {
        /// Hops the call may still take after the receiver.
        hops_left: u8,
        /// The caller's key (as the sending broker holds it).
        signer: PublicKey,
        /// The caller's envelope, bytes untouched.
        envelope: SignedEnvelope,
    },
    /// A result relayed back towards the caller (relay/1; no longer sent).
    Result {
        /// The executing agent's key.
        signer: PublicKey,
        /// The agent's toolResult, bytes untouched.
        envelope: SignedEnvelope,
    },
    /// Terminal failure of a relayed call (relay/1; no longer sent).
    CallFailed {
        /// The request.
        request_id: RequestId,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Link liveness probe.
    Ping {
        /// Echoed.
        seq: u64,
    },
    /// Answer to a probe.
    Pong {
        /// The probe's number.
        seq: u64,
    },
    /// A call relayed to the receiver for one agent the sender chose (the
    /// receiver runs it on that agent or fails it; it never chooses again).
    /// Answered by `RelayResult` or `RelayFailed` with the same `id`.
    RelayCall {
        /// The sender's id for the call, echoed by the answer.
        id: u64,
        /// The agent chosen by the sending broker.
        agent: AgentId,
        /// Hops the call may still take after the receiver.
        hops_left: u8,
        /// The caller's key (as the sending broker holds it).
        signer: PublicKey,
        /// The caller's envelope, bytes untouched.
        envelope: SignedEnvelope,
        /// The caller's grant, when the federation has a trust anchor (the
        /// agent's broker and the agent check the call against it).
        grant: Option<crate::grant::SignedGrant>,
    },
    /// The agent's result for the relayed call `id`.
    RelayResult {
        /// The relay id of the call.
        id: u64,
        /// The executing agent's key.
        signer: PublicKey,
        /// The agent's toolResult, bytes untouched.
        envelope: SignedEnvelope,
    },
    /// Terminal failure of the relayed call `id`.
    RelayFailed {
        /// The relay id of the call.
        id: u64,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Revocations the sender holds: all of them when a link comes up (so
    /// peers reconcile after a partition), then each new one as it arrives.
    Revocations(Vec<crate::grant::SignedRevocation>),
    /// The sender's broker grant, sent before its hello when it has one
    /// (required by brokers with a trust anchor).
    Grant(crate::grant::SignedGrant),
    /// The call relayed as `id` was cancelled where it entered: stop it and
    /// send nothing back. Only to peers that announce [`CANCEL_FEATURE`].
    RelayCancel {
        /// The relay id of the call.
        id: u64,
    },
    /// Progress of the call relayed as `id`, on its way back to the caller.
    /// Only to peers that announce [`CANCEL_FEATURE`].
    RelayProgress {
        /// The relay id of the call.
        id: u64,
        /// The update.
        update: crate::frame::ProgressUpdate,
    },
    /// A change of what the sender reaches for one origin, relative to the
    /// last advertisement of that origin the sender sent on this link (only
    /// to a peer that announced [`DELTA_FEATURE`]). The receiver applies it
    /// only when what it holds from the sender for `origin` has sequence
    /// number `base_seq`; otherwise (a gap) it answers `Resync`.
    AdvertiseDelta {
        /// The broker the agents are connected to.
        origin: AgentId,
        /// The origin's sequence number of the agent set after the change.
        seq: u64,
        /// The sequence number of the advertisement the change applies to.
        base_seq: u64,
        /// The whole path after the change, origin first, sender last.
        path: Vec<AgentId>,
        /// Agents new or changed since `base_seq` (whole entries, replacing
        /// any held under the same id).
        added: Vec<AdvertisedAgent>,
        /// Ids no longer reachable since `base_seq`.
        removed: Vec<AgentId>,
    },
    /// The receiver of a delta holds no base for it: the sender answers with
    /// its full `Advertise` of `origin` (or `Withdraw` if it no longer
    /// reaches it), and sends deltas from that one on.
    Resync {
        /// The origin broker.
        origin: AgentId,
    },
    /// `RelayCall` for a broker-attested call (proto/README.md §8.14): the
    /// caller's envelope is unsigned and `attested_by` vouches for it. Only
    /// to peers that announce [`ATTESTED_FEATURE`].
    RelayAttestedCall {
        /// The sender's id for the call, echoed by the answer.
        id: u64,
        /// The agent chosen by the sending broker.
        agent: AgentId,
        /// Hops the call may still take after the receiver.
        hops_left: u8,
        /// The caller's key (as the entry broker holds it).
        signer: PublicKey,
        /// The caller's envelope, bytes untouched.
        envelope: UnsignedEnvelope,
        /// The broker where the call entered.
        attested_by: AgentId,
        /// The caller's grant, when the federation has a trust anchor.
        grant: Option<crate::grant::SignedGrant>,
    },
    /// `RelayResult` for the unsigned result of an attested call.
    RelayAttestedResult {
        /// The relay id of the call.
        id: u64,
        /// The executing agent's key.
        signer: PublicKey,
        /// The agent's toolResult, bytes untouched.
        envelope: UnsignedEnvelope,
        /// The broker where the result entered (the agent's).
        attested_by: AgentId,
    },
    /// What the sender can route to, as kinds of agent without their ids,
    /// replacing any summary it sent before: sent instead of advertisements
    /// to a peer that announced [`SUMMARY_FEATURE`] (proto/README.md §8.15).
    Summary {
        /// The kinds, fewest hops first.
        profiles: Vec<SummaryProfile>,
    },
    /// A call relayed without a chosen agent, by a broker that holds only
    /// this broker's summary: the receiver resolves the call's target among
    /// its own agents and the agents it knows by id, and never relays it
    /// on without choosing one. Answered as `RelayCall` is.
    RelayOpenCall {
        /// The sender's id for the call, echoed by the answer.
        id: u64,
        /// Hops the call may still take after the receiver.
        hops_left: u8,
        /// The caller's key (as the sending broker holds it).
        signer: PublicKey,
        /// The caller's envelope, bytes untouched.
        envelope: SignedEnvelope,
        /// The caller's grant, when the federation has a trust anchor.
        grant: Option<crate::grant::SignedGrant>,
    },
    /// `RelayOpenCall` for a broker-attested call.
    RelayOpenAttestedCall {
        /// The sender's id for the call, echoed by the answer.
        id: u64,
        /// Hops the call may still take after the receiver.
        hops_left: u8,
        /// The caller's key (as the entry broker holds it).
        signer: PublicKey,
        /// The caller's envelope, bytes untouched.
        envelope: UnsignedEnvelope,
        /// The broker where the call entered.
        attested_by: AgentId,
        /// The caller's grant, when the federation has a trust anchor.
        grant: Option<crate::grant::SignedGrant>,
    },
}

/// A call relayed by a peer (`RelayCall`, `RelayOpenCall` or their
/// attested forms), taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayedCall {
    /// The sender's id for the call.
    pub id: u64,
    /// The agent the sending broker chose; `None` for an open relay (the
    /// receiver chooses).
    pub agent: Option<AgentId>,
    /// Hops the call may still take after the receiver.
    pub hops_left: u8,
    /// The caller's key.
    pub signer: PublicKey,
    /// The caller's envelope, signed or attested.
    pub envelope: Carried,
    /// The caller's grant, with a trust anchor.
    pub grant: Option<crate::grant::SignedGrant>,
}

impl FedFrame {
    /// The call of a `RelayCall`, `RelayAttestedCall`, `RelayOpenCall` or
    /// `RelayOpenAttestedCall`; `None` for any other frame (match the four
    /// variants first).
    pub fn into_call(self) -> Option<RelayedCall> {
        let (id, agent, hops_left, signer, envelope, grant) = match self {
            Self::RelayCall {
                id,
                agent,
                hops_left,
                signer,
                envelope,
                grant,
            } => (
                id,
                Some(agent),
                hops_left,
                signer,
                Carried::Signed(envelope),
                grant,
            ),
            Self::RelayOpenCall {
                id,
                hops_left,
                signer,
                envelope,
                grant,
            } => (
                id,
                None,
                hops_left,
                signer,
                Carried::Signed(envelope),
                grant,
            ),
            Self::RelayAttestedCall {
                id,
                agent,
                hops_left,
                signer,
                envelope,
                attested_by,
                grant,
            } => {
                let envelope = Carried::Attested {
                    envelope,
                    by: attested_by,
                };
                (id, Some(agent), hops_left, signer, envelope, grant)
            }
            Self::RelayOpenAttestedCall {
                id,
                hops_left,
                signer,
                envelope,
                attested_by,
                grant,
            } => {
                let envelope = Carried::Attested {
                    envelope,
                    by: attested_by,
                };
                (id, None, hops_left, signer, envelope, grant)
            }
            _ => return None,
        };
        Some(RelayedCall {
            id,
            agent,
            hops_left,
            signer,
            envelope,
            grant,
        })
    }

    /// The relay frame for a call: pinned to `agent`, or open (`None`).
    pub fn relay_call(
        id: u64,
        agent: Option<AgentId>,
        hops_left: u8,
        signer: PublicKey,
        envelope: Carried,
        grant: Option<crate::grant::SignedGrant>,
    ) -> Self {
        match (agent, envelope) {
            (Some(agent), Carried::Signed(envelope)) => Self::RelayCall {
                id,
                agent,
                hops_left,
                signer,
                envelope,
                grant,
            },
            (Some(agent), Carried::Attested { envelope, by }) => Self::RelayAttestedCall {
                id,
                agent,
                hops_left,
                signer,
                envelope,
                attested_by: by,
                grant,
            },
            (None, Carried::Signed(envelope)) => Self::RelayOpenCall {
                id,
                hops_left,
                signer,
                envelope,
                grant,
            },
            (None, Carried::Attested { envelope, by }) => Self::RelayOpenAttestedCall {
                id,
                hops_left,
                signer,
                envelope,
                attested_by: by,
                grant,
            },
        }
    }

    /// `(id, signer, envelope)` of a `RelayResult` or `RelayAttestedResult`;
    /// `None` for any other frame (match the two variants first).
    pub fn into_result(self) -> Option<(u64, PublicKey, Carried)> {
        match self {
            Self::RelayResult {
                id,
                signer,
                envelope,
            } => Some((id, signer, Carried::Signed(envelope))),
            Self::RelayAttestedResult {
                id,
                signer,
                envelope,
                attested_by,
            } => Some((
                id,
                signer,
                Carried::Attested {
                    envelope,
                    by: attested_by,
                },
            )),
            _ => None,
        }
    }
}

/// The feature a broker announces in registerBroker when it relays calls
/// with `RelayCall` (a link to a broker without it is refused).
pub const RELAY_FEATURE: &str = "relay/2";

/// The feature a broker announces when it understands `RelayCancel` and
/// `RelayProgress` (a peer without it is not sent them: postcard cannot skip
/// a variant it does not know).
pub const CANCEL_FEATURE: &str = "cancel/1";

/// The feature a broker announces in registerBroker when it takes
/// `AdvertiseDelta` and `Resync`; a peer without it gets full `Advertise`s.
pub const DELTA_FEATURE: &str = "advert-delta/1";

/// The feature a broker announces when it relays broker-attested calls and
/// results (`RelayAttestedCall`, `RelayAttestedResult`); attested calls are
/// not routed through a peer without it.
pub const ATTESTED_FEATURE: &str = "attested/1";

/// The feature a broker announces when it wants capability summaries
/// ([`FedFrame::Summary`]) instead of every agent set, and relays calls it
/// cannot resolve to the peers that sent them ([`FedFrame::RelayOpenCall`]).
/// Such a broker (a stub) advertises only its own agents.
pub const SUMMARY_FEATURE: &str = "summary/1";

/// Most profiles a broker keeps from one peer's summary (more are dropped
/// and counted).
pub const MAX_SUMMARY_PROFILES: usize = 4096;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    /// Variants are appended: the route messages of before deltas keep
    /// their bytes, and the new ones take the next indices.
    #[test]
    fn route_messages_keep_their_indices_and_round_trip() {
        let withdraw = postcard::to_allocvec(&FedFrame::Withdraw { origin: id("b") }).unwrap();
        assert_eq!(withdraw, [3, 1, b'b']);
        let advertise = FedFrame::Advertise {
            origin: id("b"),
            seq: 1,
            path: vec![id("b")],
            agents: Vec::new(),
        };
        assert_eq!(
            postcard::to_allocvec(&advertise).unwrap(),
            [2, 1, b'b', 1, 1, 1, b'b', 0]
        );
        let delta = FedFrame::AdvertiseDelta {
            origin: id("b"),
            seq: 2,
            base_seq: 1,
            path: vec![id("b")],
            added: Vec::new(),
            removed: vec![id("x")],
        };
        let bytes = postcard::to_allocvec(&delta).unwrap();
        assert_eq!(bytes, [16, 1, b'b', 2, 1, 1, 1, b'b', 0, 1, 1, b'x']);
        assert_eq!(postcard::from_bytes::<FedFrame>(&bytes).unwrap(), delta);
        let resync = FedFrame::Resync { origin: id("b") };
        let bytes = postcard::to_allocvec(&resync).unwrap();
        assert_eq!(bytes, [17, 1, b'b']);
        assert_eq!(postcard::from_bytes::<FedFrame>(&bytes).unwrap(), resync);
    }
}
