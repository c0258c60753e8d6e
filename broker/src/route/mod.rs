//! The routing core: a state machine without sockets, tasks or clocks of its
//! own, in the shape of quinn-proto. The async layer (sessions, links, the
//! gateway, the timer task) hands it events with an explicit time in
//! microseconds since the Unix epoch and carries out what it returns
//! ([`Router::poll_output`]): frames for clients, messages for federation
//! links, sessions and links to close, discovery answers to sign.
//!
//! Everything it promises (exactly one terminal answer per call by its
//! deadline, no call delivered twice, routes that converge once links are
//! stable, nothing left pending) is checked without sockets by the
//! federation simulation in `tests/`.
//!
//! Envelopes reach it already admitted ([`admission::admit`]): signature
//! work stays outside the lock the async layer keeps around the router.

pub mod admission;
pub mod paths;
mod pending;
mod registry;
mod summary;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fem_proto::{
    AdvertisedAgent, AgentId, Capability, Carried, DiscoverTools, DiscoveredTool, EmbodimentUpdate,
    ErrorCode, FedFrame, Frame, PublicKey, RequestId, SignedEnvelope, Target, ToolCall,
    ToolOutcome, ToolResult, ToolSpec,
};
use tracing::debug;

use self::admission::{Credential, Refusal};
use self::paths::{Advert, Change, Delta, Gap, RemoteRoute, RouteTable};
use self::pending::{CallTarget, Pending, PendingTable};
use self::registry::Registry;
pub use self::registry::{LocalAgent, Profile};
use self::summary::{Kind, SummaryIndex};
use crate::metrics::Metrics;

/// Time in microseconds since the Unix epoch (virtual in the simulation).
pub type Micros = u64;

/// The current wall-clock time as the router counts it.
pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A client of this broker: a registered session, or a gateway request
/// waiting for its one answer. The async layer numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

/// A federation link. The async layer numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// A call in flight at this broker; on a link it is the relay id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(u64);

/// Where the answer to a call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyTo {
    /// A client session or gateway request of this broker.
    Client(ClientId),
    /// The peer broker that relayed the call, under its relay id.
    Link {
        /// The link the call came in on.
        link: LinkId,
        /// The id the peer gave the call.
        relay: u64,
    },
}

/// What the async layer must do.
#[derive(Debug)]
pub enum Output {
    /// Send a frame to a client.
    Send {
        /// The client.
        to: ClientId,
        /// The frame.
        frame: Frame,
    },
    /// Send a message on a federation link.
    Link {
        /// The link.
        to: LinkId,
        /// The message.
        frame: FedFrame,
    },
    /// Send `error {code, message}` to a session and close it.
    Evict {
        /// The session.
        client: ClientId,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Close a link (replaced by a duplicate that both ends keep).
    CloseLink {
        /// The link.
        link: LinkId,
    },
    /// Sign a toolsDiscovered with the broker's key and send it.
    Discovered {
        /// The client.
        to: ClientId,
        /// The query's request id.
        request_id: RequestId,
        /// The tools found.
        tools: Vec<DiscoveredTool>,
        /// Where the next page starts, when there is one.
        next_cursor: Option<String>,
    },
}

/// A registration that passed admission.
#[derive(Debug)]
pub struct Registration {
    /// The session.
    pub client: ClientId,
    /// The agent id.
    pub id: AgentId,
    /// Its key.
    pub key: PublicKey,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// Concurrency limit.
    pub max_concurrent: u32,
    /// What it offers.
    pub profile: Profile,
    /// The `accepted` frame, sent before anything else reaches the session.
    pub accepted: Frame,
}

/// A toolCall that passed admission, and where it came from.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// Where the answer goes.
    pub reply: ReplyTo,
    /// The caller (the envelope's sender).
    pub caller: &'a AgentId,
    /// The caller's key (passed on so the agent can verify or check the grant).
    pub caller_key: PublicKey,
    /// The call.
    pub call: &'a ToolCall,
    /// The caller's envelope (signed, or attested by the entry broker),
    /// relayed untouched.
    pub envelope: Carried,
    /// Broker hops the call may still take.
    pub hops_left: u8,
    /// Where the call comes from.
    pub arrival: Arrival<'a>,
    /// The caller's verified grant, when the broker has a trust anchor.
    pub credential: Option<Arc<Credential>>,
}

/// Where a call comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival<'a> {
    /// A session, the gateway or MCP of this broker: the call enters here.
    Entry,
    /// Relayed by a peer that chose this agent: it runs there or fails.
    Pinned(&'a AgentId),
    /// Relayed by a stub peer that holds only this broker's summary: this
    /// broker chooses the agent, and never relays the call on unchosen.
    Open,
}

/// Whether a new link is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkUp {
    /// The link carries traffic.
    Accepted,
    /// Another link to the same peer is kept instead (the one opened by the
    /// smaller broker id, so both ends keep the same one); close this one.
    Duplicate,
}

/// An agent behind a peer broker, and the link its route leaves on.
#[derive(Clone, Debug)]
pub struct RemoteAgent {
    /// The route.
    pub route: RemoteRoute,
    /// The link to `route.via`.
    pub link: LinkId,
}

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// This broker's id.
    pub broker_id: AgentId,
    /// Upper bound on any call's deadline.
    pub max_call_timeout: Duration,
    /// Calls that may wait for a slot on one agent.
    pub agent_queue_limit: usize,
    /// Delay that batches local agent changes into one advertisement.
    pub advert_delay: Duration,
    /// Percent of one agent's slots (and of its queue) one caller may hold.
    pub caller_share_percent: u8,
    /// Bytes of calls waiting for slots, all agents together.
    pub max_waiting_bytes: usize,
    /// Largest discovery answer page, bytes of tools.
    pub discovery_page_bytes: usize,
    /// This broker is a stub (`--federation-routes summary`): peers send it
    /// capability summaries instead of agent sets, and it advertises only
    /// its own agents.
    pub stub: bool,
    /// Largest capability summary sent to a stub peer, bytes (under the
    /// frame size).
    pub max_summary_bytes: usize,
}

impl RouterConfig {
    /// `n` scaled by the caller share, at least 1.
    fn share(&self, n: usize) -> usize {
        (n * usize::from(self.caller_share_percent))
            .div_ceil(100)
            .max(1)
    }
}

/// Where a tool stands in discovery order: its agent, then its name.
fn discovery_pos<'a>(agent: &'a AgentId, tool: &'a ToolSpec) -> (&'a str, &'a str) {
    (agent.as_str(), tool.name.as_str())
}

/// Maximum tools in one discovery answer.
const MAX_DISCOVERY: usize = 1000;

#[derive(Debug)]
struct LinkState {
    id: LinkId,
    initiator: AgentId,
    /// Agent ids the peer's grant lets it advertise (None: unrestricted).
    advertise: Option<Vec<fem_proto::IdPattern>>,
    /// The peer understands `RelayCancel` and `RelayProgress`.
    cancels: bool,
    /// The peer relays broker-attested calls ([`fem_proto::ATTESTED_FEATURE`]).
    attested: bool,
    /// The peer takes `AdvertiseDelta` and `Resync` ([`fem_proto::DELTA_FEATURE`]);
    /// without it every change is a full `Advertise`.
    deltas: bool,
    /// Per origin, the version of the advertisement last sent on this link
    /// (for this broker's own agents, its sequence number); none when the
    /// origin was withdrawn or never sent. A change whose previous version
    /// the link holds goes as a delta.
    sent: HashMap<AgentId, u64>,
    /// The peer is a stub ([`fem_proto::SUMMARY_FEATURE`]): it is sent
    /// capability summaries instead of advertisements.
    stub: bool,
    /// The summary last sent to it.
    summary_sent: Option<Vec<fem_proto::SummaryProfile>>,
    /// The summary it sent (this broker being a stub).
    summary: Vec<fem_proto::SummaryProfile>,
    /// Open relays in flight to it.
    open_in_flight: u32,
}

/// Progress updates of one call are forwarded at most this many a second
/// on average (a token bucket per call): they are advisory, and an agent
/// flooding them must not fill its callers' queues. Updates over the rate
/// are dropped.
const PROGRESS_RATE: u32 = 20;
/// Progress updates one call may send back to back.
const PROGRESS_BURST: u32 = 10;

enum Answer {
    Result {
        envelope: Carried,
        signer: PublicKey,
        outcome: &'static str,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
}

/// What a call asks of the agent that runs it.
#[derive(Clone, Copy)]
struct Want<'a> {
    tool: &'a Capability,
    /// The call is broker-attested: the tool must accept that.
    attested: bool,
    grant: Option<&'a fem_proto::Grant>,
}

impl Want<'_> {
    fn served_by(&self, tools: &[ToolSpec]) -> bool {
        tools.iter().any(|t| t.serves(self.tool, self.attested))
    }

    fn unattested_refusal(&self, whom: &str) -> Refusal {
        (
            ErrorCode::PermissionDenied,
            format!(
                "tool {} of {whom} does not accept broker-attested calls; sign the call",
                self.tool
            ),
        )
    }
}

enum Choice {
    Slot(AgentId),
    Queue(AgentId),
    Remote(AgentId),
    /// An open relay to this stub's peer, which chooses the agent.
    Open(AgentId),
}

/// The routing core of one broker.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    metrics: Metrics,
    registry: Registry,
    pending: PendingTable,
    subs: BTreeMap<Capability, Vec<(ClientId, AgentId)>>,
    links: BTreeMap<AgentId, LinkState>,
    link_peer: HashMap<LinkId, AgentId>,
    routes: RouteTable,
    remote: BTreeMap<AgentId, RemoteAgent>,
    /// Calls in flight per remote agent (survives route changes).
    remote_load: HashMap<AgentId, u32>,
    /// Bytes of calls waiting for slots (against `max_waiting_bytes`).
    waiting_bytes: usize,
    rr: usize,
    /// The sequence number of the local agent set last advertised.
    local_seq: u64,
    /// The ids in that set (while any link is up).
    local_ids: HashSet<AgentId>,
    /// Local agents changed since (while any link is up): the next delta.
    local_dirty: BTreeSet<AgentId>,
    advert_due: Option<Micros>,
    out: VecDeque<Output>,
    /// Bumped whenever the tools this broker can route to may have changed.
    generation: u64,
    /// Agents counted by kind, while a stub peer is linked.
    index: Option<SummaryIndex>,
    /// What stub peers were sent may be out of date.
    summary_dirty: bool,
}

impl Router {
    /// A router with no agents, links or calls; `now` seeds the sequence
    /// numbers of its advertisements, so a restarted broker's are newer.
    pub fn new(cfg: RouterConfig, metrics: Metrics, now: Micros) -> Self {
        Self {
            cfg,
            metrics,
            registry: Registry::default(),
            pending: PendingTable::default(),
            subs: BTreeMap::new(),
            links: BTreeMap::new(),
            link_peer: HashMap::new(),
            routes: RouteTable::default(),
            remote: BTreeMap::new(),
            remote_load: HashMap::new(),
            waiting_bytes: 0,
            rr: 0,
            local_seq: now,
            local_ids: HashSet::new(),
            local_dirty: BTreeSet::new(),
            advert_due: None,
            out: VecDeque::new(),
            generation: 0,
            index: None,
            summary_dirty: false,
        }
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Self::tick`] has work: the earliest deadline or advertisement.
    pub fn next_timeout(&self) -> Option<Micros> {
        match (self.pending.next_deadline(), self.advert_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Answers TIMEOUT to calls whose deadline passed and sends a batched
    /// advertisement of local changes.
    pub fn tick(&mut self, now: Micros) {
        for id in self.pending.due(now) {
            let Some(p) = self.pending.get(id) else {
                continue;
            };
            let message = format!(
                "no answer from {} within the deadline ({} ms)",
                p.target.agent(),
                now.saturating_sub(p.started) / 1000
            );
            self.finish(
                id,
                now,
                Answer::Failed {
                    code: ErrorCode::Timeout,
                    message,
                },
            );
        }
        if self.advert_due.is_some_and(|t| t <= now) {
            self.flush_local();
        }
    }

    // ----- sessions -----

    /// Registers an agent (or a pure caller) on `reg.client`. The same id
    /// with the same key replaces its previous session, whose calls fail.
    ///
    /// # Errors
    /// `ID_CONFLICT` when the id is registered under another key.
    pub fn register(&mut self, now: Micros, reg: Registration) -> Result<(), Refusal> {
        if self.registry.get(&reg.id).is_some_and(|a| a.key != reg.key) {
            return Err((
                ErrorCode::IdConflict,
                format!("agent id {} is registered with another public key", reg.id),
            ));
        }
        self.out.push_back(Output::Send {
            to: reg.client,
            frame: reg.accepted,
        });
        let old = self.registry.insert(LocalAgent {
            id: reg.id.clone(),
            key: reg.key,
            session: reg.client,
            transport: reg.transport,
            connected_since_ms: now / 1000,
            max_concurrent: reg.max_concurrent,
            in_flight: 0,
            queue: VecDeque::new(),
            by_caller: HashMap::new(),
            profile: reg.profile,
            grants_sent: HashSet::new(),
        });
        match old {
            Some(old) => {
                debug!(agent = %reg.id, "same agent re-registered; closing its previous session");
                let session = old.session;
                self.end_calls(
                    now,
                    |t| matches!(t, CallTarget::Local { session: s, .. } if *s == session),
                    "agent re-registered on a new connection",
                    |_| false,
                    "",
                );
                self.drop_subscriptions(old.session);
                self.out.push_back(Output::Evict {
                    client: old.session,
                    code: ErrorCode::AgentUnavailable,
                    message: "session closed by the broker".into(),
                });
            }
            None => self.metrics.agents_changed(1),
        }
        self.metrics
            .registrations
            .with_label_values(&["accepted"])
            .inc();
        self.local_changed(now, reg.id);
        Ok(())
    }

    /// A client is gone: its agent (if still current) leaves, its calls in
    /// flight fail with AGENT_UNAVAILABLE, its subscriptions end, and the
    /// calls it made are cancelled (agents stop work nobody will read and
    /// free their slots).
    pub fn session_closed(&mut self, now: Micros, client: ClientId) {
        // Only registered sessions subscribe (a replaced one lost its
        // subscriptions when it was replaced), so a gateway request or a
        // refused connection costs no scan of the subscription table.
        let Some(agent) = self.registry.remove_session(client) else {
            return;
        };
        self.drop_subscriptions(client);
        self.metrics.agents_changed(-1);
        let _ = self
            .metrics
            .agent_queue_length
            .remove_label_values(&[agent.id.as_str()]);
        self.end_calls(
            now,
            |t| matches!(t, CallTarget::Local { session, .. } if *session == client),
            "agent disconnected with the call in flight",
            |r| *r == ReplyTo::Client(client),
            "the caller disconnected",
        );
        self.local_changed(now, agent.id);
    }

    /// The client cancels its call `request_id` (a session's `cancel`
    /// frame, or a gateway or MCP request whose HTTP client went away).
    /// Unknown or finished calls are ignored.
    pub fn cancel(&mut self, now: Micros, client: ClientId, request_id: RequestId) {
        if let Some(id) = self.pending.made_by(client, request_id) {
            self.cancel_call(id, now, "cancelled by the caller");
        }
    }

    /// The peer on `link` cancels the call it relayed as `relay`.
    pub fn relay_cancel(&mut self, now: Micros, link: LinkId, relay: u64) {
        if let Some(id) = self.pending.relayed_by(link, relay) {
            self.cancel_call(id, now, "cancelled where the call entered the mesh");
        }
    }

    /// Ends a call as `CANCELLED` and tells whoever runs it to stop: the
    /// agent's session (if the call reached it) or the next broker.
    fn cancel_call(&mut self, id: CallId, now: Micros, why: &str) {
        let Some(p) = self.pending.get(id) else {
            return;
        };
        match &p.target {
            CallTarget::Local { session, .. } if p.waiting.is_none() => {
                self.out.push_back(Output::Send {
                    to: *session,
                    frame: Frame::Cancel {
                        request_id: p.request_id,
                    },
                });
            }
            CallTarget::Local { .. } => {}
            CallTarget::Remote { link, .. } | CallTarget::Open { link, .. } => {
                if self.link_cancels(*link) {
                    self.out.push_back(Output::Link {
                        to: *link,
                        frame: FedFrame::RelayCancel { id: id.0 },
                    });
                }
            }
        }
        debug!(request = %p.request_id, why, "call cancelled");
        self.finish(
            id,
            now,
            Answer::Failed {
                code: ErrorCode::Cancelled,
                message: why.to_owned(),
            },
        );
    }

    /// Progress from the agent on `client` for the call it runs under
    /// `request_id`, forwarded towards the caller (per call, bursts of 10
    /// then 20 a second; non-finite numbers dropped).
    pub fn progress(
        &mut self,
        now: Micros,
        client: ClientId,
        request_id: RequestId,
        update: fem_proto::ProgressUpdate,
    ) {
        if let Some(id) = self.pending.local(client, request_id) {
            self.forward_progress(id, now, update);
        }
    }

    /// Progress relayed back over `link` for the call this broker relayed as `relay`.
    pub fn relay_progress(
        &mut self,
        now: Micros,
        link: LinkId,
        relay: u64,
        update: fem_proto::ProgressUpdate,
    ) {
        if let Some(id) = self.relayed_over(link, relay) {
            self.forward_progress(id, now, update);
        }
    }

    /// The pending call this broker relayed over `link` as `relay`.
    fn relayed_over(&self, link: LinkId, relay: u64) -> Option<CallId> {
        let id = CallId(relay);
        self.pending
            .get(id)
            .is_some_and(|p| p.target.link() == Some(link))
            .then_some(id)
    }

    fn forward_progress(&mut self, id: CallId, now: Micros, update: fem_proto::ProgressUpdate) {
        let Some(update) = update.checked() else {
            return;
        };
        let Some(p) = self.pending.get_mut(id) else {
            return;
        };
        let now_ms = now / 1000;
        let bucket = p
            .progress
            .get_or_insert_with(|| crate::budget::TokenBucket::new(PROGRESS_BURST, now_ms));
        if !bucket.take(now_ms, PROGRESS_RATE, PROGRESS_BURST) {
            self.metrics.limit_hit("progress_rate");
            return;
        }
        let (reply, request_id) = (p.reply, p.request_id);
        let out = match reply {
            ReplyTo::Client(to) => Output::Send {
                to,
                frame: Frame::Progress { request_id, update },
            },
            ReplyTo::Link { link, relay } if self.link_cancels(link) => Output::Link {
                to: link,
                frame: FedFrame::RelayProgress { id: relay, update },
            },
            ReplyTo::Link { .. } => return,
        };
        self.out.push_back(out);
    }

    /// True when the peer on `link` understands cancels and progress.
    fn link_cancels(&self, link: LinkId) -> bool {
        self.link_peer
            .get(&link)
            .and_then(|peer| self.links.get(peer))
            .is_some_and(|l| l.id == link && l.cancels)
    }

    /// Applies an embodimentUpdate of the agent on `client` (tools already validated).
    ///
    /// # Errors
    /// `NOT_REGISTERED` for a client without an agent.
    pub fn update_profile(
        &mut self,
        now: Micros,
        client: ClientId,
        u: EmbodimentUpdate,
    ) -> Result<(), Refusal> {
        let Some(agent) = self.registry.by_session(client) else {
            return Err((ErrorCode::NotRegistered, "no agent on this session".into()));
        };
        let id = agent.id.clone();
        let mut p = agent.profile.clone();
        p.tools = u.tools;
        if let Some(c) = u.capabilities {
            p.capabilities = c;
        }
        if let Some(m) = u.metadata {
            p.metadata = m;
        }
        self.registry.set_profile(client, p);
        self.local_changed(now, id);
        Ok(())
    }

    // ----- calls -----

    /// Routes an admitted toolCall. A call relayed by a peer names the agent
    /// the entry broker chose ([`Arrival::Pinned`]); it runs there or fails,
    /// never on another agent. An open relay ([`Arrival::Open`]) is resolved
    /// here and never relayed on unchosen.
    pub fn call(&mut self, now: Micros, incoming: Incoming<'_>) {
        let Incoming {
            reply,
            caller,
            caller_key,
            call,
            envelope,
            hops_left,
            arrival,
            credential,
        } = incoming;
        let grant = credential.as_deref().map(|c| &c.grant);
        let deadline_at = call.deadline_ms.saturating_mul(1000);
        if deadline_at <= now {
            return self.refuse_call(
                reply,
                call.request_id,
                ErrorCode::Timeout,
                "the call's deadline has already passed".into(),
            );
        }
        let max = u64::try_from(self.cfg.max_call_timeout.as_micros()).unwrap_or(u64::MAX);
        let deadline = now + (deadline_at - now).min(max);
        // The audience is checked where a call enters (relays carry calls
        // addressed to another broker), and required under a grant.
        if arrival == Arrival::Entry {
            match &call.audience {
                Some(a) if *a != self.cfg.broker_id => {
                    return self.refuse_call(
                        reply,
                        call.request_id,
                        ErrorCode::PermissionDenied,
                        format!(
                            "the call was signed for broker {a}, not {}",
                            self.cfg.broker_id
                        ),
                    );
                }
                None if grant.is_some() => {
                    return self.refuse_call(
                        reply,
                        call.request_id,
                        ErrorCode::PermissionDenied,
                        "a call under a grant must name its broker (audience)".into(),
                    );
                }
                _ => {}
            }
        }
        if grant.is_some_and(|g| !g.may_call_somewhere(&call.tool)) {
            return self.refuse_call(
                reply,
                call.request_id,
                ErrorCode::PermissionDenied,
                format!("your grant does not allow calling {}", call.tool),
            );
        }
        let want = Want {
            tool: &call.tool,
            attested: envelope.is_attested(),
            grant,
        };
        let choice = match arrival {
            Arrival::Pinned(agent) => {
                self.select_pinned(&call.target, agent, want, hops_left, caller)
            }
            Arrival::Entry | Arrival::Open => match self.select_local(&call.target, want, caller) {
                Ok(c) => Ok(c),
                Err(e) => {
                    // Agents known by id first; a stub then tries its
                    // peers' summaries (only where the call entered: an
                    // open relay is never relayed on unchosen).
                    let found = self.select_remote(&call.target, want).map(Choice::Remote);
                    let found = match found {
                        None if arrival == Arrival::Entry => {
                            self.select_summary(&call.target, want).map(Choice::Open)
                        }
                        f => f,
                    };
                    match found {
                        Some(_) if hops_left == 0 => Err((
                            ErrorCode::NoRoute,
                            "the call reached its broker hop limit".into(),
                        )),
                        Some(c) => Ok(c),
                        // Say why when only the attestation stands in the way.
                        None if want.attested
                            && self
                                .select_remote(
                                    &call.target,
                                    Want {
                                        attested: false,
                                        ..want
                                    },
                                )
                                .is_some() =>
                        {
                            Err(want.unattested_refusal(&describe(&call.target)))
                        }
                        None => Err(e),
                    }
                }
            },
        };
        let choice = match choice {
            Ok(c) => c,
            Err((code, message)) => return self.refuse_call(reply, call.request_id, code, message),
        };
        let (target, slot) = match &choice {
            Choice::Slot(a) | Choice::Queue(a) => {
                let Some(local) = self.registry.get(a) else {
                    return;
                };
                (
                    CallTarget::Local {
                        session: local.session,
                        agent: a.clone(),
                    },
                    matches!(choice, Choice::Slot(_)),
                )
            }
            Choice::Remote(a) => {
                let Some(r) = self.remote.get(a) else {
                    return;
                };
                (
                    CallTarget::Remote {
                        link: r.link,
                        agent: a.clone(),
                        key: r.route.agent.key,
                    },
                    false,
                )
            }
            Choice::Open(peer) => {
                let Some(l) = self.links.get(peer) else {
                    return;
                };
                (
                    CallTarget::Open {
                        link: l.id,
                        peer: peer.clone(),
                    },
                    false,
                )
            }
        };
        let filed = self.pending.insert(Pending {
            reply,
            caller: caller.clone(),
            request_id: call.request_id,
            target: target.clone(),
            started: now,
            deadline,
            holds_slot: slot,
            waiting: None,
            progress: None,
            attested: want.attested,
        });
        let Some(id) = filed else {
            let agent = target.agent();
            return self.refuse_call(
                reply,
                call.request_id,
                ErrorCode::BadRequest,
                format!(
                    "request id {} is already in flight to {agent}",
                    call.request_id
                ),
            );
        };
        self.metrics.calls_in_flight.inc();
        let open = matches!(target, CallTarget::Open { .. });
        match target {
            CallTarget::Local { session, agent } => {
                let deliver = envelope.deliver(caller_key);
                // The agent checks the call against the caller's grant: it
                // gets the grant once per session, before the first call.
                if let (Some(c), Some(a)) = (&credential, self.registry.get_mut(&agent))
                    && a.grants_sent.insert(caller_key)
                {
                    self.out.push_back(Output::Send {
                        to: session,
                        frame: Frame::Grant(c.signed.clone()),
                    });
                }
                if slot {
                    debug!(request = %call.request_id, tool = %call.tool, %agent, "routing call");
                    if let Some(a) = self.registry.get_mut(&agent) {
                        a.in_flight += 1;
                        a.adjust(caller, |u| u.slots += 1);
                    }
                    self.out.push_back(Output::Send {
                        to: session,
                        frame: deliver,
                    });
                } else {
                    debug!(request = %call.request_id, tool = %call.tool, %agent, "agent busy; call queued");
                    self.waiting_bytes += crate::budget::weight(&deliver);
                    if let Some(p) = self.pending.get_mut(id) {
                        p.waiting = Some(deliver);
                    }
                    if let Some(a) = self.registry.get_mut(&agent) {
                        a.queue.push_back(id);
                        a.adjust(caller, |u| u.waiting += 1);
                        self.metrics
                            .agent_queue_length
                            .with_label_values(&[agent.as_str()])
                            .set(i64::try_from(a.queue.len()).unwrap_or(i64::MAX));
                    }
                }
            }
            CallTarget::Remote { link, agent, .. } | CallTarget::Open { link, peer: agent } => {
                // A remote agent counts its load; an open relay its peer's.
                let pinned = if open {
                    if let Some(l) = self.links.get_mut(&agent) {
                        l.open_in_flight += 1;
                    }
                    None
                } else {
                    *self.remote_load.entry(agent.clone()).or_default() += 1;
                    Some(agent)
                };
                debug!(request = %call.request_id, tool = %call.tool, agent = ?pinned, "relaying call");
                let frame = FedFrame::relay_call(
                    id.0,
                    pinned,
                    hops_left.saturating_sub(1),
                    caller_key,
                    envelope,
                    credential.map(|c| c.signed.clone()),
                );
                self.out.push_back(Output::Link { to: link, frame });
            }
        }
    }

    /// An admitted toolResult from the agent on `client` (whose key is `key`).
    pub fn result(
        &mut self,
        now: Micros,
        client: ClientId,
        result: &ToolResult,
        envelope: Carried,
        key: PublicKey,
    ) {
        let Some(id) = self.answered_by(client, result) else {
            return self.late(result.request_id);
        };
        let answer = self.result_answer(id, result, envelope, key);
        self.finish(id, now, answer);
    }

    /// The answer a result gives its call: only an attested call may be
    /// answered unsigned (a signed call's caller verifies the result).
    fn result_answer(
        &self,
        id: CallId,
        result: &ToolResult,
        envelope: Carried,
        signer: PublicKey,
    ) -> Answer {
        if envelope.is_attested() && !self.pending.get(id).is_some_and(|p| p.attested) {
            return Answer::Failed {
                code: ErrorCode::InvalidSignature,
                message: "the agent answered a signed call with an unsigned result".into(),
            };
        }
        Answer::Result {
            envelope,
            signer,
            outcome: outcome_label(result),
        }
    }

    /// The call the agent on `client` answers with `result` (for its caller).
    fn answered_by(&self, client: ClientId, result: &ToolResult) -> Option<CallId> {
        self.pending.local(client, result.request_id).filter(|id| {
            self.pending
                .get(*id)
                .is_some_and(|p| p.caller == result.caller)
        })
    }

    /// An agent answered a call with an envelope the broker cannot forward
    /// (too large): the caller gets `code` at once instead of a timeout.
    pub fn result_failed(
        &mut self,
        now: Micros,
        client: ClientId,
        result: &ToolResult,
        code: ErrorCode,
        message: String,
    ) {
        let Some(id) = self.answered_by(client, result) else {
            return self.late(result.request_id);
        };
        self.finish(id, now, Answer::Failed { code, message });
    }

    /// A result relayed back over `link` for the call this broker relayed as `relay`.
    pub fn relay_result(
        &mut self,
        now: Micros,
        link: LinkId,
        relay: u64,
        result: &ToolResult,
        envelope: Carried,
        signer: PublicKey,
    ) {
        let id = CallId(relay);
        let ours = self.pending.get(id).is_some_and(|p| {
            p.caller == result.caller
                && p.request_id == result.request_id
                && match &p.target {
                    CallTarget::Remote { link: l, key, .. } => *l == link && *key == signer,
                    // The peer resolved the call: its word on the key is
                    // what an advertisement would have said.
                    CallTarget::Open { link: l, .. } => *l == link,
                    CallTarget::Local { .. } => false,
                }
        });
        if !ours {
            return self.late(result.request_id);
        }
        let answer = self.result_answer(id, result, envelope, signer);
        self.finish(id, now, answer);
    }

    /// A terminal failure relayed back over `link` for the call relayed as `relay`.
    pub fn relay_failed(
        &mut self,
        now: Micros,
        link: LinkId,
        relay: u64,
        code: ErrorCode,
        message: String,
    ) {
        if let Some(id) = self.relayed_over(link, relay) {
            self.finish(id, now, Answer::Failed { code, message });
        }
    }

    fn late(&mut self, request_id: RequestId) {
        debug!(request = %request_id, "late or unknown toolResult dropped");
        self.metrics.refused("LATE_RESULT");
    }

    fn select_local(
        &mut self,
        target: &Target,
        want: Want<'_>,
        caller: &AgentId,
    ) -> Result<Choice, Refusal> {
        let Want { tool, grant, .. } = want;
        let mut candidates: Vec<AgentId> = match target {
            Target::Agent(id) => {
                let a = self
                    .registry
                    .get(id)
                    .ok_or_else(|| (ErrorCode::NoRoute, format!("no agent {id} is registered")))?;
                if !a.profile.has_tool(tool) {
                    return Err((
                        ErrorCode::ToolNotFound,
                        format!("agent {id} offers no tool {tool}"),
                    ));
                }
                vec![id.clone()]
            }
            Target::Capability(p) => {
                let all = self.registry.matching(p);
                if all.is_empty() {
                    return Err((
                        ErrorCode::NoRoute,
                        format!("no agent has a capability matching {p}"),
                    ));
                }
                let with_tool: Vec<AgentId> = all
                    .into_iter()
                    .filter(|id| {
                        self.registry
                            .get(id)
                            .is_some_and(|a| a.profile.has_tool(tool))
                    })
                    .collect();
                if with_tool.is_empty() {
                    return Err((
                        ErrorCode::ToolNotFound,
                        format!("no agent matching {p} offers tool {tool}"),
                    ));
                }
                with_tool
            }
        };
        // Like the grant below, attestation narrows the agents that offer
        // the tool; signed calls skip it.
        if want.attested {
            let reg = &self.registry;
            candidates.retain(|id| {
                reg.get(id)
                    .is_some_and(|a| want.served_by(&a.profile.tools))
            });
            if candidates.is_empty() {
                return Err(want.unattested_refusal(&describe(target)));
            }
        }
        if let Some(g) = grant {
            candidates.retain(|id| g.may_call(tool, id));
            if candidates.is_empty() {
                return Err((
                    ErrorCode::PermissionDenied,
                    format!(
                        "your grant does not allow calling {tool} on {}",
                        describe(target)
                    ),
                ));
            }
        }
        let reg = &self.registry;
        let agent = |id: &AgentId| reg.get(id);
        candidates.retain(|id| agent(id).is_some_and(|a| a.max_concurrent > 0));
        if candidates.is_empty() {
            return Err((
                ErrorCode::NoRoute,
                format!("no agent matching the target serves calls ({tool})"),
            ));
        }
        self.rr = self.rr.wrapping_add(1);
        let start = self.rr;
        let cfg = &self.cfg;
        // Fewest calls in flight among agents with a free slot that this
        // caller is still within its share of; round robin among ties. A
        // free slot with calls waiting means every waiting caller is at its
        // share (`pump` keeps that true), so this call does not jump them.
        let free = least(&candidates, start, |id| {
            agent(id)
                .filter(|a| {
                    a.in_flight < a.max_concurrent
                        && (a.use_of(caller).slots as usize) < cfg.share(a.max_concurrent as usize)
                })
                .map(|a| a.in_flight)
        });
        if let Some(id) = free {
            return Ok(Choice::Slot(id));
        }
        let shortest = least(&candidates, start, |id| {
            agent(id).map(|a| u32::try_from(a.queue.len()).unwrap_or(u32::MAX))
        });
        let Some(id) = shortest else {
            return Err((ErrorCode::NoRoute, format!("no agent serves {tool}")));
        };
        let (queued, mine) =
            agent(&id).map_or((0, 0), |a| (a.queue.len(), a.use_of(caller).waiting));
        if queued >= cfg.agent_queue_limit {
            self.metrics.limit_hit("agent_queue_limit");
            return Err((
                ErrorCode::RateLimited,
                format!("agent {id} is at its concurrency limit and {queued} calls are waiting"),
            ));
        }
        if mine as usize >= cfg.share(cfg.agent_queue_limit) {
            self.metrics.limit_hit("caller_share_percent");
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "you have {mine} calls waiting at agent {id}: one caller may hold {}% of its queue (--caller-share-percent)",
                    cfg.caller_share_percent
                ),
            ));
        }
        if self.waiting_bytes >= cfg.max_waiting_bytes {
            self.metrics.limit_hit("max_memory");
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "calls waiting for agents hold {} bytes, the broker's limit (half of --max-memory)",
                    self.waiting_bytes
                ),
            ));
        }
        Ok(Choice::Queue(id))
    }

    /// Fewest hops, then fewest calls in flight; round robin among ties.
    fn select_remote(&mut self, target: &Target, want: Want<'_>) -> Option<AgentId> {
        let Want { tool, grant, .. } = want;
        let allowed = |id: &AgentId| grant.is_none_or(|g| g.may_call(tool, id));
        // An attested call goes only through a peer that relays them.
        let links = &self.links;
        let usable = |r: &RemoteAgent| {
            want.served_by(&r.route.agent.tools)
                && (!want.attested || links.get(&r.route.via).is_some_and(|l| l.attested))
        };
        match target {
            Target::Agent(id) => self
                .remote
                .get(id)
                .filter(|r| usable(r))
                .filter(|_| allowed(id))
                .map(|_| id.clone()),
            Target::Capability(p) => {
                let candidates: Vec<AgentId> = self
                    .remote
                    .iter()
                    .filter(|(_, r)| {
                        usable(r) && r.route.agent.capabilities.iter().any(|c| p.matches(c))
                    })
                    .filter(|(id, _)| allowed(id))
                    .map(|(id, _)| id.clone())
                    .collect();
                self.rr = self.rr.wrapping_add(1);
                let (remote, load) = (&self.remote, &self.remote_load);
                least(&candidates, self.rr, |id| {
                    let hops = remote.get(id).map_or(u32::MAX, |r| r.route.hops);
                    let in_flight = load.get(id).copied().unwrap_or(0);
                    Some(u64::from(hops) << 32 | u64::from(in_flight))
                })
            }
        }
    }

    /// A stub's choice among the peers whose summaries hold a kind of agent
    /// that could take the call: fewest hops, then fewest open relays in
    /// flight; round robin among ties.
    fn select_summary(&mut self, target: &Target, want: Want<'_>) -> Option<AgentId> {
        let candidates: Vec<(&AgentId, (u8, u32))> = self
            .links
            .iter()
            .filter(|(_, l)| !want.attested || l.attested)
            .filter_map(|(peer, l)| {
                summary::best_hops(&l.summary, target, want.tool, want.attested)
                    .map(|h| (peer, (h, l.open_in_flight)))
            })
            .collect();
        self.rr = self.rr.wrapping_add(1);
        let start = self.rr % candidates.len().max(1);
        // The first of the least from the round-robin start, as `least`.
        candidates[start..]
            .iter()
            .chain(&candidates[..start])
            .min_by_key(|c| c.1)
            .map(|c| c.0.clone())
    }

    /// A relayed call runs on the agent the entry broker chose, which must
    /// match the signed target; through a hub it is relayed on.
    fn select_pinned(
        &mut self,
        target: &Target,
        agent: &AgentId,
        want: Want<'_>,
        hops_left: u8,
        caller: &AgentId,
    ) -> Result<Choice, Refusal> {
        let Want { tool, grant, .. } = want;
        let matches_target = match target {
            Target::Agent(id) => id == agent,
            Target::Capability(p) => match (self.registry.get(agent), self.remote.get(agent)) {
                (Some(a), _) => a.profile.matches(p),
                (None, Some(r)) => r.route.agent.capabilities.iter().any(|c| p.matches(c)),
                (None, None) => true,
            },
        };
        if !matches_target {
            return Err((
                ErrorCode::BadRequest,
                format!("relayed to agent {agent}, which the call's target does not name"),
            ));
        }
        if grant.is_some_and(|g| !g.may_call(tool, agent)) {
            return Err((
                ErrorCode::PermissionDenied,
                format!("the caller's grant does not allow calling {tool} on {agent}"),
            ));
        }
        if self.registry.get(agent).is_some() {
            return self.select_local(&Target::Agent(agent.clone()), want, caller);
        }
        match self.select_remote(&Target::Agent(agent.clone()), want) {
            Some(_) if hops_left == 0 => Err((
                ErrorCode::NoRoute,
                "the call reached its broker hop limit".into(),
            )),
            Some(a) => Ok(Choice::Remote(a)),
            None => Err((
                ErrorCode::AgentUnavailable,
                format!("agent {agent} is no longer reachable from this broker"),
            )),
        }
    }

    fn refuse_call(
        &mut self,
        reply: ReplyTo,
        request_id: RequestId,
        code: ErrorCode,
        message: String,
    ) {
        self.metrics
            .tool_calls
            .with_label_values(&[code.as_str()])
            .inc();
        debug!(request = %request_id, %code, %message, "call refused");
        self.answer(reply, request_id, Answer::Failed { code, message });
    }

    /// Ends a call: frees its slot or load, counts it, sends the answer.
    fn finish(&mut self, id: CallId, now: Micros, answer: Answer) {
        let Some(p) = self.pending.remove(id) else {
            return;
        };
        match &p.target {
            CallTarget::Local { session, agent } => {
                if let Some(w) = &p.waiting {
                    self.waiting_bytes =
                        self.waiting_bytes.saturating_sub(crate::budget::weight(w));
                }
                if let Some(a) = self
                    .registry
                    .get_mut(agent)
                    .filter(|a| a.session == *session)
                {
                    if p.holds_slot {
                        a.in_flight = a.in_flight.saturating_sub(1);
                        a.adjust(&p.caller, |u| u.slots = u.slots.saturating_sub(1));
                    } else {
                        // Answered while waiting (deadline, cancel): it
                        // leaves the queue now, so the queue holds only
                        // calls still waiting.
                        if let Some(i) = a.queue.iter().position(|q| *q == id) {
                            a.queue.remove(i);
                        }
                        a.adjust(&p.caller, |u| u.waiting = u.waiting.saturating_sub(1));
                        self.metrics
                            .agent_queue_length
                            .with_label_values(&[agent.as_str()])
                            .set(i64::try_from(a.queue.len()).unwrap_or(i64::MAX));
                    }
                }
                if p.holds_slot {
                    self.pump(agent);
                }
            }
            CallTarget::Remote { agent, .. } => {
                if let Some(n) = self.remote_load.get_mut(agent) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.remote_load.remove(agent);
                    }
                }
            }
            CallTarget::Open { link, peer } => {
                if let Some(l) = self.links.get_mut(peer).filter(|l| l.id == *link) {
                    l.open_in_flight = l.open_in_flight.saturating_sub(1);
                }
            }
        }
        let outcome = match &answer {
            Answer::Result { outcome, .. } => outcome,
            Answer::Failed { code, .. } => code.as_str(),
        };
        self.metrics.calls_in_flight.dec();
        self.metrics.tool_calls.with_label_values(&[outcome]).inc();
        #[allow(clippy::cast_precision_loss)]
        self.metrics
            .tool_call_duration
            .with_label_values(&[outcome])
            .observe(now.saturating_sub(p.started) as f64 / 1e6);
        self.answer(p.reply, p.request_id, answer);
    }

    fn answer(&mut self, reply: ReplyTo, request_id: RequestId, answer: Answer) {
        let out = match (reply, answer) {
            (
                ReplyTo::Client(to),
                Answer::Result {
                    envelope, signer, ..
                },
            ) => Output::Send {
                to,
                frame: envelope.deliver(signer),
            },
            (ReplyTo::Client(to), Answer::Failed { code, message }) => Output::Send {
                to,
                frame: Frame::CallFailed {
                    request_id,
                    code,
                    message,
                },
            },
            (
                ReplyTo::Link { link, relay },
                Answer::Result {
                    envelope, signer, ..
                },
            ) => Output::Link {
                to: link,
                frame: match envelope {
                    Carried::Signed(envelope) => FedFrame::RelayResult {
                        id: relay,
                        signer,
                        envelope,
                    },
                    Carried::Attested { envelope, by } => FedFrame::RelayAttestedResult {
                        id: relay,
                        signer,
                        envelope,
                        attested_by: by,
                    },
                },
            },
            (ReplyTo::Link { link, relay }, Answer::Failed { code, message }) => Output::Link {
                to: link,
                frame: FedFrame::RelayFailed {
                    id: relay,
                    code,
                    message,
                },
            },
        };
        self.out.push_back(out);
    }

    /// Moves waiting calls onto free slots of `agent`: the oldest whose
    /// caller is within its share first (others keep their place).
    fn pump(&mut self, agent: &AgentId) {
        let Some(a) = self.registry.get_mut(agent) else {
            return;
        };
        if a.queue.is_empty() {
            return;
        }
        let cap = self.cfg.share(a.max_concurrent as usize);
        while a.in_flight < a.max_concurrent {
            let pending = &self.pending;
            let next = a.queue.iter().position(|id| {
                pending
                    .get(*id)
                    .is_some_and(|p| (a.use_of(&p.caller).slots as usize) < cap)
            });
            let Some(id) = next.and_then(|i| a.queue.remove(i)) else {
                break;
            };
            let Some(p) = self.pending.get_mut(id) else {
                continue;
            };
            let Some(frame) = p.waiting.take() else {
                continue;
            };
            self.waiting_bytes = self
                .waiting_bytes
                .saturating_sub(crate::budget::weight(&frame));
            p.holds_slot = true;
            a.in_flight += 1;
            a.adjust(&p.caller, |u| {
                u.waiting = u.waiting.saturating_sub(1);
                u.slots += 1;
            });
            self.out.push_back(Output::Send {
                to: a.session,
                frame,
            });
        }
        self.metrics
            .agent_queue_length
            .with_label_values(&[agent.as_str()])
            .set(i64::try_from(a.queue.len()).unwrap_or(i64::MAX));
    }

    /// In one pass over the calls in flight: answers AGENT_UNAVAILABLE to
    /// those whose target is gone, and cancels those whose caller is gone.
    fn end_calls(
        &mut self,
        now: Micros,
        target_gone: impl Fn(&CallTarget) -> bool,
        why_target: &str,
        origin_gone: impl Fn(&ReplyTo) -> bool,
        why_origin: &str,
    ) {
        let ids = self
            .pending
            .select(|p| target_gone(&p.target) || origin_gone(&p.reply));
        for id in ids {
            let Some(p) = self.pending.get(id) else {
                continue;
            };
            if target_gone(&p.target) {
                let message = format!("{}: {why_target}", p.target.agent());
                self.finish(
                    id,
                    now,
                    Answer::Failed {
                        code: ErrorCode::AgentUnavailable,
                        message,
                    },
                );
            } else {
                self.cancel_call(id, now, why_origin);
            }
        }
    }

    // ----- discovery, events, instructions -----

    /// Answers discoverTools with one page: the matching tools ordered by
    /// agent id then tool name, from just after `cursor`, at most `limit`
    /// tools and `discovery_page_bytes` bytes (always at least one); with a
    /// grant, only the tools it may call. `nextCursor` is set when more match.
    pub fn discover(
        &mut self,
        client: ClientId,
        q: &DiscoverTools,
        grant: Option<&fem_proto::Grant>,
    ) {
        let limit = match q.limit {
            0 => MAX_DISCOVERY,
            n => (n as usize).min(MAX_DISCOVERY),
        };
        let allowed = |t: &ToolSpec, id: &AgentId| grant.is_none_or(|g| g.may_call(&t.name, id));
        // (agent, reaching broker, capabilities, tool)
        let mut found: Vec<(&AgentId, &AgentId, &Vec<Capability>, &ToolSpec)> = Vec::new();
        let ids: Vec<AgentId> = match &q.capability {
            Some(p) => self.registry.matching(p),
            None => self.registry.iter().map(|a| a.id.clone()).collect(),
        };
        for id in &ids {
            let Some(a) = self.registry.get(id) else {
                continue;
            };
            let p = &a.profile;
            if let Some(env) = &q.environment
                && p.metadata.get("environment") != Some(env)
            {
                continue;
            }
            // Prefer the tools whose own name matches the pattern; an agent
            // whose tools are named otherwise lists all of them.
            let named = q
                .capability
                .as_ref()
                .is_some_and(|pat| p.tools.iter().any(|t| pat.matches(&t.name)));
            for t in &p.tools {
                let listed = !named
                    || q.capability
                        .as_ref()
                        .is_some_and(|pat| pat.matches(&t.name));
                if listed && allowed(t, &a.id) {
                    found.push((&a.id, &self.cfg.broker_id, &p.capabilities, t));
                }
            }
        }
        if q.environment.is_none() {
            for (id, r) in &self.remote {
                let a = &r.route.agent;
                if q.capability
                    .as_ref()
                    .is_some_and(|p| !a.capabilities.iter().any(|c| p.matches(c)))
                {
                    continue;
                }
                for t in &a.tools {
                    if allowed(t, id) {
                        found.push((id, &r.route.origin, &a.capabilities, t));
                    }
                }
            }
        }
        // The cursor is "AGENT TOOL" of the last tool sent; a space sorts
        // below every character ids and names may hold, so comparing the
        // pair is comparing the text.
        let key = |agent: &AgentId, tool: &ToolSpec| format!("{agent} {}", tool.name);
        found.sort_unstable_by(|a, b| discovery_pos(a.0, a.3).cmp(&discovery_pos(b.0, b.3)));
        let from = q.cursor.as_deref().map_or(0, |c| {
            let after = c.split_once(' ').unwrap_or((c, ""));
            found.partition_point(|(agent, _, _, tool)| discovery_pos(agent, tool) <= after)
        });
        let mut tools = Vec::new();
        let mut bytes = 0;
        let mut next_cursor = None;
        for (i, (agent, broker, caps, tool)) in found.iter().enumerate().skip(from) {
            let size = 64
                + agent.as_str().len()
                + broker.as_str().len()
                + caps.iter().map(|c| c.as_str().len() + 2).sum::<usize>()
                + tool.name.as_str().len()
                + tool.description.len()
                + tool.input_schema.as_str().len();
            let full = tools.len() >= limit || bytes + size > self.cfg.discovery_page_bytes;
            if !tools.is_empty() && full {
                if let Some(last) = i.checked_sub(1).and_then(|j| found.get(j)) {
                    next_cursor = Some(key(last.0, last.3));
                }
                break;
            }
            bytes += size;
            tools.push(DiscoveredTool {
                agent_id: (*agent).clone(),
                broker_id: (*broker).clone(),
                capabilities: (*caps).clone(),
                tool: (*tool).clone(),
            });
        }
        self.out.push_back(Output::Discovered {
            to: client,
            request_id: q.request_id,
            tools,
            next_cursor,
        });
    }

    /// Subscribes the agent `id` on `client` to `topic`.
    pub fn subscribe(&mut self, client: ClientId, id: &AgentId, topic: Capability) {
        let v = self.subs.entry(topic).or_default();
        v.retain(|(_, x)| x != id);
        v.push((client, id.clone()));
    }

    /// Ends the subscription of `id` to `topic`.
    pub fn unsubscribe(&mut self, id: &AgentId, topic: &Capability) {
        if let Some(v) = self.subs.get_mut(topic) {
            v.retain(|(_, x)| x != id);
            if v.is_empty() {
                self.subs.remove(topic);
            }
        }
    }

    fn drop_subscriptions(&mut self, client: ClientId) {
        self.subs.retain(|_, v| {
            v.retain(|(c, _)| *c != client);
            !v.is_empty()
        });
    }

    /// Fans an event out to the topic's subscribers, not back to its sender.
    pub fn emit(
        &mut self,
        sender: &AgentId,
        topic: &Capability,
        envelope: &Carried,
        key: PublicKey,
    ) {
        let Some(v) = self.subs.get(topic) else {
            return;
        };
        for (client, id) in v {
            if id != sender {
                self.out.push_back(Output::Send {
                    to: *client,
                    frame: envelope.clone().deliver(key),
                });
            }
        }
    }

    /// Delivers a renderInstruction to its target agent.
    ///
    /// # Errors
    /// `NO_ROUTE` when the target is not registered here.
    pub fn render(
        &mut self,
        target: &AgentId,
        envelope: SignedEnvelope,
        key: PublicKey,
    ) -> Result<(), Refusal> {
        let Some(a) = self.registry.get(target) else {
            return Err((
                ErrorCode::NoRoute,
                format!("no agent {target} is registered"),
            ));
        };
        self.out.push_back(Output::Send {
            to: a.session,
            frame: Frame::Deliver {
                envelope,
                signer: key,
            },
        });
        Ok(())
    }

    // ----- federation -----

    /// A link to broker `peer` passed its handshake; `initiator` opened it.
    /// With a trust anchor, `advertise` holds the agent ids the peer's grant
    /// lets it advertise: agents outside them are dropped from its adverts.
    /// `features` are what the peer announced in registerBroker (cancels,
    /// advertisement deltas).
    pub fn link_up(
        &mut self,
        now: Micros,
        link: LinkId,
        peer: AgentId,
        initiator: AgentId,
        advertise: Option<Vec<fem_proto::IdPattern>>,
        features: &[String],
    ) -> LinkUp {
        if let Some(old) = self.links.get(&peer) {
            let winner = std::cmp::min(&self.cfg.broker_id, &peer);
            if old.initiator == *winner && initiator != *winner {
                return LinkUp::Duplicate;
            }
            let old = old.id;
            self.out.push_back(Output::CloseLink { link: old });
            self.link_down(now, old);
        }
        if self.links.is_empty() {
            // Local changes are not tracked without links: start again
            // from the registry, under a new number.
            self.local_ids = self.advertised_locals().map(|a| a.id.clone()).collect();
            self.local_dirty.clear();
            self.local_seq += 1;
        }
        self.links.insert(
            peer.clone(),
            LinkState {
                id: link,
                initiator,
                advertise,
                cancels: features.iter().any(|f| f == fem_proto::CANCEL_FEATURE),
                attested: features.iter().any(|f| f == fem_proto::ATTESTED_FEATURE),
                deltas: features.iter().any(|f| f == fem_proto::DELTA_FEATURE),
                sent: HashMap::new(),
                stub: features.iter().any(|f| f == fem_proto::SUMMARY_FEATURE),
                summary_sent: None,
                summary: Vec::new(),
                open_in_flight: 0,
            },
        );
        self.link_peer.insert(link, peer.clone());
        self.peers_changed();
        // Pending local changes to the other peers (as deltas), and our
        // own agents in full to the new one; then every route we chose (a
        // stub peer gets a summary of them all instead).
        if self.links.get(&peer).is_some_and(|l| l.stub) {
            self.index_agents();
            self.summary_dirty = true;
        }
        self.flush_local();
        let deltas = self.links.get(&peer).is_some_and(|l| l.deltas);
        for origin in self.routes.chosen_origins() {
            self.send_route(&peer, &origin, !deltas);
        }
        LinkUp::Accepted
    }

    /// A link ended: its routes are withdrawn and the calls relayed over it fail.
    pub fn link_down(&mut self, now: Micros, link: LinkId) {
        let Some(peer) = self.link_peer.remove(&link) else {
            return;
        };
        if self.links.get(&peer).is_some_and(|l| l.id == link)
            && let Some(l) = self.links.remove(&peer)
            && !l.summary.is_empty()
        {
            self.generation += 1;
        }
        if !self.links.values().any(|l| l.stub) {
            self.index = None;
        }
        self.peers_changed();
        // Calls relayed over the link fail; calls the peer relayed here have
        // no one to answer any more.
        self.end_calls(
            now,
            |t| t.link() == Some(link),
            "link to the agent's broker lost",
            |r| matches!(r, ReplyTo::Link { link: l, .. } if *l == link),
            "the peer that relayed the call is gone",
        );
        let changes = self.routes.peer_lost(&peer);
        self.routes_changed(now, changes);
    }

    /// A route message from a link (advertise, its delta, withdraw, or a
    /// request for a resync); other messages have their own entry points
    /// and are ignored here.
    pub fn link_frame(&mut self, now: Micros, link: LinkId, frame: FedFrame) {
        let Some(peer) = self.link_peer.get(&link).cloned() else {
            return;
        };
        let me = self.cfg.broker_id.clone();
        let change = match frame {
            FedFrame::Advertise {
                origin,
                seq,
                path,
                mut agents,
            } => {
                self.outside_grant(&peer, &mut agents);
                self.routes
                    .advertised(&me, &peer, origin, Advert::new(seq, path, agents))
            }
            FedFrame::AdvertiseDelta {
                origin,
                seq,
                base_seq,
                path,
                mut added,
                removed,
            } => {
                self.outside_grant(&peer, &mut added);
                let delta = Delta {
                    seq,
                    base_seq,
                    path,
                    added,
                    removed,
                };
                match self.routes.delta(&me, &peer, origin.clone(), delta) {
                    Ok(applied) => {
                        if applied.over_limit > 0 {
                            debug!(%peer, %origin, dropped = applied.over_limit, "advertised agents over the limit per origin dropped");
                            self.metrics
                                .limit_hits
                                .with_label_values(&["advertised_agents"])
                                .inc_by(applied.over_limit as u64);
                        }
                        applied.change
                    }
                    Err(Gap) => {
                        debug!(%peer, %origin, base_seq, "advertisement delta without its base; asking for a resync");
                        self.metrics.federation_resyncs.inc();
                        // A broker that sends deltas answers resync (whatever
                        // it announced: the feature says what it takes).
                        self.out.push_back(Output::Link {
                            to: link,
                            frame: FedFrame::Resync { origin },
                        });
                        None
                    }
                }
            }
            FedFrame::Withdraw { origin } => self.routes.withdrawn(&peer, origin),
            FedFrame::Summary { profiles } => {
                self.summary_from(&peer, profiles);
                None
            }
            FedFrame::Resync { origin } => {
                if origin == me {
                    if let Some(l) = self.links.get_mut(&peer) {
                        l.sent.remove(&me);
                    }
                    self.send_local(&peer, None);
                } else {
                    self.send_route(&peer, &origin, true);
                }
                None
            }
            _ => None,
        };
        if let Some(c) = change {
            self.routes_changed(now, vec![c]);
        }
    }

    /// Keeps `peer`'s summary, when this broker is a stub and the peer's
    /// grant lets it advertise every id (`*`): a summary names no agents,
    /// so a peer limited to some ids could claim any kind of agent.
    fn summary_from(&mut self, peer: &AgentId, mut profiles: Vec<fem_proto::SummaryProfile>) {
        let stub = self.cfg.stub;
        let Some(l) = self.links.get_mut(peer) else {
            return;
        };
        if !stub {
            debug!(%peer, "capability summary from a peer that was not asked for one; ignored");
            return;
        }
        let limited = l
            .advertise
            .as_ref()
            .is_some_and(|ids| !ids.iter().any(|p| p.as_str() == "*"));
        if limited {
            debug!(%peer, "capability summary from a peer whose grant limits what it advertises; ignored");
            self.metrics.refused("SUMMARY_OUTSIDE_GRANT");
            return;
        }
        // A kind no agent could register (over the names one agent may
        // offer) is dropped: it would only slow every match. Then at most
        // MAX_SUMMARY_PROFILES are kept.
        let before = profiles.len();
        profiles.retain(|p| {
            p.capabilities.len() <= summary::MAX_PROFILE_NAMES
                && p.tools.len() <= summary::MAX_PROFILE_NAMES
        });
        profiles.truncate(fem_proto::MAX_SUMMARY_PROFILES);
        if profiles.len() < before {
            self.metrics
                .limit_hits
                .with_label_values(&["summary_profiles"])
                .inc_by((before - profiles.len()) as u64);
        }
        l.summary = profiles;
        self.generation += 1;
    }

    /// Drops agents outside `peer`'s grant from what it advertised (counted).
    fn outside_grant(&self, peer: &AgentId, agents: &mut Vec<AdvertisedAgent>) {
        let Some(allowed) = self.links.get(peer).and_then(|l| l.advertise.as_ref()) else {
            return;
        };
        let before = agents.len();
        agents.retain(|a| allowed.iter().any(|p| p.matches(&a.id)));
        if agents.len() < before {
            debug!(%peer, dropped = before - agents.len(), "advertised agents outside the peer's grant dropped");
            self.metrics
                .refusals
                .with_label_values(&["ADVERT_OUTSIDE_GRANT"])
                .inc_by((before - agents.len()) as u64);
        }
    }

    /// Sends `peer` the current choice for `origin` in full: an advertisement
    /// or, where it has none (or the peer is on its path), a withdrawal when
    /// `withdraw` says so.
    fn send_route(&mut self, peer: &AgentId, origin: &AgentId, withdraw: bool) {
        let Some(l) = self.links.get_mut(peer).filter(|l| !l.stub) else {
            return;
        };
        // A stub advertises only its own agents.
        let chosen = self
            .routes
            .chosen(origin)
            .filter(|c| !self.cfg.stub && RouteTable::passes_to(peer, origin, &c.advert));
        match chosen {
            Some(c) => l.sent.insert(origin.clone(), c.version),
            None => l.sent.remove(origin),
        };
        if chosen.is_none() && !withdraw {
            return;
        }
        let frame =
            RouteTable::frame_for(&self.cfg.broker_id, peer, origin, chosen.map(|c| &c.advert));
        self.out.push_back(Output::Link { to: l.id, frame });
    }

    /// Passes changes of choice on to every peer, and updates the routes to
    /// the agents they touch.
    fn routes_changed(&mut self, now: Micros, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        self.generation += 1;
        let me = &self.cfg.broker_id;
        for (peer, l) in &mut self.links {
            if l.stub || self.cfg.stub {
                continue;
            }
            for c in &changes {
                if let Some(frame) = Self::route_frame(&self.routes, me, peer, l, c) {
                    self.out.push_back(Output::Link { to: l.id, frame });
                }
            }
        }
        for c in &changes {
            // The agents whose best route may differ now.
            let mut ids: BTreeSet<AgentId> = c.removed.iter().cloned().collect();
            if c.moved {
                if let Some(chosen) = self.routes.chosen(&c.origin) {
                    ids.extend(chosen.advert.agents.keys().cloned());
                }
            } else {
                ids.extend(c.added.iter().map(|a| a.id.clone()));
            }
            for id in ids {
                let remote = self.routes.route_of(&id).and_then(|route| {
                    let link = self.links.get(&route.via)?.id;
                    Some(RemoteAgent { route, link })
                });
                if let Some(ix) = &mut self.index {
                    ix.set(false, &id, remote.as_ref().map(Self::kind_place));
                }
                match remote {
                    Some(r) => self.remote.insert(id, r),
                    None => self.remote.remove(&id),
                };
            }
        }
        if self.index.is_some() {
            self.summary_dirty = true;
            self.schedule_advert(now);
        }
        self.metrics
            .routes
            .set(i64::try_from(self.remote.len()).unwrap_or(i64::MAX));
    }

    /// What one peer is sent for one change: a delta when it takes them and
    /// holds the previous choice, else the new choice in full or a
    /// withdrawal (to a peer that takes deltas, only when it holds a route).
    fn route_frame(
        routes: &RouteTable,
        me: &AgentId,
        peer: &AgentId,
        l: &mut LinkState,
        c: &Change,
    ) -> Option<FedFrame> {
        let chosen = routes
            .chosen(&c.origin)
            .filter(|ch| RouteTable::passes_to(peer, &c.origin, &ch.advert));
        let deltas = l.deltas;
        let Some(ch) = chosen else {
            let held = l.sent.remove(&c.origin).is_some();
            return (held || !deltas).then(|| FedFrame::Withdraw {
                origin: c.origin.clone(),
            });
        };
        let held = l.sent.insert(c.origin.clone(), ch.version);
        match c.before {
            Some(b)
                if deltas
                    && held == Some(b.version)
                    && c.added.len() + c.removed.len() < ch.advert.agents.len().max(1) =>
            {
                Some(FedFrame::AdvertiseDelta {
                    origin: c.origin.clone(),
                    seq: ch.advert.seq,
                    base_seq: b.seq,
                    path: RouteTable::path_via(me, &ch.advert),
                    added: c.added.iter().map(|a| (**a).clone()).collect(),
                    removed: c.removed.clone(),
                })
            }
            _ => Some(RouteTable::frame_for(me, peer, &c.origin, Some(&ch.advert))),
        }
    }

    fn peers_changed(&self) {
        self.metrics
            .federation_peers
            .with_label_values(&["up"])
            .set(i64::try_from(self.links.len()).unwrap_or(i64::MAX));
    }

    /// Notes a change of the local agent `id` and schedules an advertisement
    /// of local changes (a new link gets one at once, so without links there
    /// is nothing to note or schedule).
    fn local_changed(&mut self, now: Micros, id: AgentId) {
        self.generation += 1;
        if self.links.is_empty() {
            return;
        }
        if self.index.is_some() {
            let now_here = self
                .registry
                .get(&id)
                .filter(|a| Self::is_advertised(a))
                .map(|a| self.local_place(a));
            if let Some(ix) = &mut self.index {
                ix.set(true, &id, now_here);
            }
            self.summary_dirty = true;
        }
        self.local_dirty.insert(id);
        self.schedule_advert(now);
    }

    /// The next advertisement (and summaries) go out after `advert_delay`,
    /// batching what changes until then.
    fn schedule_advert(&mut self, now: Micros) {
        if self.advert_due.is_none() {
            let delay = u64::try_from(self.cfg.advert_delay.as_micros()).unwrap_or(u64::MAX);
            self.advert_due = Some(now.saturating_add(delay));
        }
    }

    /// Kind and place of a local agent, for the summary index.
    fn local_place(&self, a: &LocalAgent) -> (Arc<Kind>, u32, AgentId, AgentId) {
        let me = self.cfg.broker_id.clone();
        (
            Kind::of(&a.profile.capabilities, &a.profile.tools),
            0,
            me.clone(),
            me,
        )
    }

    /// Kind and place of a remote agent, for the summary index.
    fn kind_place(r: &RemoteAgent) -> (Arc<Kind>, u32, AgentId, AgentId) {
        let a = &r.route.agent;
        (
            Kind::of(&a.capabilities, &a.tools),
            r.route.hops,
            r.route.origin.clone(),
            r.route.via.clone(),
        )
    }

    /// Builds the summary index from every agent this broker routes to,
    /// when the first stub peer links (it is then kept up to date).
    fn index_agents(&mut self) {
        if self.index.is_some() {
            return;
        }
        let mut ix = SummaryIndex::default();
        for a in self.advertised_locals() {
            ix.set(true, &a.id, Some(self.local_place(a)));
        }
        for (id, r) in &self.remote {
            ix.set(false, id, Some(Self::kind_place(r)));
        }
        self.index = Some(ix);
    }

    /// Sends each stub peer its summary, where it changed since the last.
    fn flush_summaries(&mut self) {
        if !std::mem::take(&mut self.summary_dirty) {
            return;
        }
        let Some(ix) = &self.index else {
            return;
        };
        for (peer, l) in &mut self.links {
            if !l.stub {
                continue;
            }
            let (profiles, dropped) = ix.summary_for(peer, self.cfg.max_summary_bytes);
            if dropped > 0 {
                debug!(%peer, dropped, "kinds of agent left out of a capability summary (over its size)");
                self.metrics
                    .limit_hits
                    .with_label_values(&["summary_profiles"])
                    .inc_by(dropped as u64);
            }
            if l.summary_sent.as_ref() == Some(&profiles) {
                continue;
            }
            l.summary_sent = Some(profiles.clone());
            self.out.push_back(Output::Link {
                to: l.id,
                frame: FedFrame::Summary { profiles },
            });
        }
    }

    /// Pure callers (no slots) are not advertised to peers.
    fn is_advertised(a: &LocalAgent) -> bool {
        a.max_concurrent > 0
    }

    /// Local agents as peers see them.
    fn advertised_locals(&self) -> impl Iterator<Item = &LocalAgent> {
        self.registry.iter().filter(|a| Self::is_advertised(a))
    }

    fn advertised(a: &LocalAgent) -> AdvertisedAgent {
        AdvertisedAgent {
            id: a.id.clone(),
            key: a.key,
            capabilities: a.profile.capabilities.clone(),
            tools: a.profile.tools.clone(),
        }
    }

    /// Sends the local changes batched since the last advertisement, under
    /// a new sequence number, as a delta to every peer that takes one and
    /// holds the last set, and the whole set to the others.
    fn flush_local(&mut self) {
        self.advert_due = None;
        if self.links.is_empty() {
            return;
        }
        self.flush_summaries();
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for id in std::mem::take(&mut self.local_dirty) {
            match self.registry.get(&id).filter(|a| Self::is_advertised(a)) {
                Some(a) => {
                    added.push(Self::advertised(a));
                    self.local_ids.insert(id);
                }
                None => {
                    if self.local_ids.remove(&id) {
                        removed.push(id);
                    }
                }
            }
        }
        let base = self.local_seq;
        if !added.is_empty() || !removed.is_empty() {
            self.local_seq += 1;
        }
        let peers: Vec<AgentId> = self.links.keys().cloned().collect();
        let delta = (base != self.local_seq).then_some((base, added, removed));
        for peer in peers {
            self.send_local(&peer, delta.as_ref());
        }
    }

    /// Brings `peer` to the current local set: nothing when it holds it, the
    /// `delta` from its base when it takes deltas and holds that base, the
    /// whole set otherwise.
    fn send_local(
        &mut self,
        peer: &AgentId,
        delta: Option<&(u64, Vec<AdvertisedAgent>, Vec<AgentId>)>,
    ) {
        let me = self.cfg.broker_id.clone();
        let seq = self.local_seq;
        let Some(l) = self.links.get_mut(peer) else {
            return;
        };
        if l.stub {
            return;
        }
        let held = l.sent.insert(me.clone(), seq);
        let (to, deltas) = (l.id, l.deltas);
        let frame = match delta {
            _ if held == Some(seq) => return,
            Some((base, added, removed)) if deltas && held == Some(*base) => {
                FedFrame::AdvertiseDelta {
                    origin: me.clone(),
                    seq,
                    base_seq: *base,
                    path: vec![me],
                    added: added.clone(),
                    removed: removed.clone(),
                }
            }
            _ => {
                let mut agents: Vec<AdvertisedAgent> =
                    self.advertised_locals().map(Self::advertised).collect();
                agents.sort_by(|a, b| a.id.cmp(&b.id));
                FedFrame::Advertise {
                    origin: me.clone(),
                    seq,
                    path: vec![me],
                    agents,
                }
            }
        };
        self.out.push_back(Output::Link { to, frame });
    }

    // ----- views -----

    /// This broker's id.
    pub fn broker_id(&self) -> &AgentId {
        &self.cfg.broker_id
    }

    /// Agents registered here.
    pub fn agents(&self) -> impl Iterator<Item = &LocalAgent> {
        self.registry.iter()
    }

    /// The agent `id`, if registered here.
    pub fn agent(&self, id: &AgentId) -> Option<&LocalAgent> {
        self.registry.get(id)
    }

    /// The agent registered on `client`.
    pub fn agent_of(&self, client: ClientId) -> Option<&LocalAgent> {
        self.registry.by_session(client)
    }

    /// Number of agents registered here.
    pub fn agent_count(&self) -> usize {
        self.registry.len()
    }

    /// Agents behind peer brokers, with their best route.
    pub fn remote_agents(&self) -> impl Iterator<Item = (&AgentId, &RemoteAgent)> {
        self.remote.iter()
    }

    /// The capability summaries peers sent this broker (a stub), by peer.
    pub fn summaries(&self) -> impl Iterator<Item = (&AgentId, &[fem_proto::SummaryProfile])> {
        self.links
            .iter()
            .filter(|(_, l)| !l.summary.is_empty())
            .map(|(peer, l)| (peer, l.summary.as_slice()))
    }

    /// Calls in flight to a remote agent, as this broker counts them.
    pub fn remote_in_flight(&self, id: &AgentId) -> u32 {
        self.remote_load.get(id).copied().unwrap_or(0)
    }

    /// Peers with a live link.
    pub fn peers(&self) -> impl Iterator<Item = &AgentId> {
        self.links.keys()
    }

    /// True when a link to `peer` is up.
    pub fn has_link(&self, peer: &AgentId) -> bool {
        self.links.contains_key(peer)
    }

    /// Changes whenever the tools this broker can route to may have changed
    /// (agents registered, updated or gone here, routes from peers): a
    /// catalog built at one generation holds until the next.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Calls awaiting an answer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

fn describe(target: &Target) -> String {
    match target {
        Target::Agent(id) => format!("agent {id}"),
        Target::Capability(p) => format!("agents with a capability matching {p}"),
    }
}

fn outcome_label(r: &ToolResult) -> &'static str {
    match &r.outcome {
        ToolOutcome::Success(_) => "ok",
        ToolOutcome::Error { code, .. } => code.as_str(),
    }
}

/// The candidate with the smallest `load` (None: not eligible), scanning
/// from `start` so that ties rotate.
fn least<K: Ord + Copy>(
    candidates: &[AgentId],
    start: usize,
    load: impl Fn(&AgentId) -> Option<K>,
) -> Option<AgentId> {
    let len = candidates.len();
    let mut best: Option<(K, usize)> = None;
    for i in 0..len {
        let j = (start + i) % len;
        if let Some(l) = load(&candidates[j])
            && best.is_none_or(|(b, _)| l < b)
        {
            best = Some((l, j));
        }
    }
    best.map(|(_, j)| candidates[j].clone())
}

#[cfg(test)]
mod tests;
