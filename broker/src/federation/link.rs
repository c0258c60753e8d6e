//! One federation link: the signed registerBroker handshake, then route
//! messages and relayed calls until it ends. Relayed calls are admitted here
//! (outside the routing core's lock) and handed to the core.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fem_net::wire::{FrameReader, write_loop};
use fem_proto::{
    ATTESTED_FEATURE, AgentId, Body, CANCEL_FEATURE, Carried, DELTA_FEATURE, Envelope,
    EnvelopeType, ErrorCode, FedFrame, Header, PublicKey, RELAY_FEATURE, RegisterBroker,
    RelayedCall, SUMMARY_FEATURE, SignedEnvelope,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::config::FederationMode;
use crate::listen::counted::Counted;
use crate::route::admission::{self, Entry, Refused, Signer};
use crate::route::{Arrival, Incoming, LinkId, LinkUp, ReplyTo};
use crate::state::Shared;

/// Messages queued towards one peer before the link counts as stuck.
const LINK_QUEUE: usize = 4096;

/// Serves a link accepted on the QUIC endpoint.
pub(crate) async fn accept(shared: Arc<Shared>, conn: quinn::Connection) {
    if shared.config.federation.mode == FederationMode::Off {
        shared.metrics.refused("PEER_REFUSED");
        conn.close(2u32.into(), b"federation is not enabled on this broker");
        return;
    }
    let Ok(Ok((send, recv))) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
    else {
        conn.close(1u32.into(), b"no stream");
        return;
    };
    let _ = run_link(shared, conn, recv, send, false, None, None).await;
}

/// How a link ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkEnd {
    /// The peer is this broker (a discovered address of our own).
    Myself,
    /// Refused or ended.
    Other,
}

fn hello(shared: &Shared) -> Result<FedFrame, fem_proto::ProtoError> {
    let env = Envelope::new(
        Header::now(shared.config.broker_id.clone()),
        Body::RegisterBroker(RegisterBroker {
            broker_id: shared.config.broker_id.clone(),
            endpoint: format!("https://{}", shared.config.listen),
            public_key: shared.broker_key,
            capabilities: vec![
                "relay".into(),
                RELAY_FEATURE.into(),
                CANCEL_FEATURE.into(),
                ATTESTED_FEATURE.into(),
                DELTA_FEATURE.into(),
            ]
            .into_iter()
            .chain(
                shared
                    .config
                    .federation
                    .stub
                    .then(|| SUMMARY_FEATURE.into()),
            )
            .collect(),
        }),
    );
    Ok(FedFrame::Hello(SignedEnvelope::sign(
        &env,
        &shared.identity,
    )?))
}

const MYSELF: &str = "a link to myself";

/// Checks a peer's Hello: signature, freshness, allowed key, not ourselves.
/// Returns the peer's id, key and announced features.
fn check_hello(
    shared: &Shared,
    f: Option<FedFrame>,
) -> Result<(AgentId, PublicKey, Vec<String>), (ErrorCode, String)> {
    let Some(FedFrame::Hello(signed)) = f else {
        return Err((
            ErrorCode::NotRegistered,
            "the first message must be a signed registerBroker".into(),
        ));
    };
    let admitted = admission::admit(
        &signed,
        Signer::Registration,
        Some(EnvelopeType::RegisterBroker),
        Entry::Client,
        &shared.replay,
        &shared.metrics,
    )
    .map_err(|r| r.refusal)?;
    let Body::RegisterBroker(rb) = admitted.env.body else {
        return Err((
            ErrorCode::NotRegistered,
            "the first envelope must be registerBroker".into(),
        ));
    };
    if !rb.capabilities.iter().any(|c| c == RELAY_FEATURE) {
        return Err((
            ErrorCode::BadRequest,
            format!(
                "broker {} does not announce {RELAY_FEATURE}: it relays calls with an older federation protocol; upgrade it",
                rb.broker_id
            ),
        ));
    }
    if let Some(keys) = &shared.config.federation.peer_keys
        && !keys.contains(&rb.public_key)
    {
        return Err((
            ErrorCode::PermissionDenied,
            format!(
                "broker {} key {} is not in --peer-keys",
                rb.broker_id, rb.public_key
            ),
        ));
    }
    if rb.broker_id == shared.config.broker_id {
        if rb.public_key == shared.broker_key {
            return Err((ErrorCode::BadRequest, MYSELF.into()));
        }
        return Err((
            ErrorCode::IdConflict,
            format!(
                "the peer uses this broker's own id {}: give each broker its own --broker-id (it defaults to the host name)",
                rb.broker_id
            ),
        ));
    }
    if let Some(k) = shared.fed.linked.get(&rb.broker_id)
        && *k != rb.public_key
        && shared.view(|r| r.has_link(&rb.broker_id))
    {
        return Err((
            ErrorCode::IdConflict,
            format!(
                "broker id {} is already linked under another key ({}); a second broker with the same --broker-id?",
                rb.broker_id,
                k.fingerprint()
            ),
        ));
    }
    Ok((rb.broker_id, rb.public_key, rb.capabilities))
}

/// With a trust anchor, a peer must hold a broker grant for its id and key;
/// returns the agent ids it may advertise (None without an anchor).
fn check_peer_grant(
    shared: &Shared,
    peer: &AgentId,
    key: &PublicKey,
    grant: Option<fem_proto::SignedGrant>,
) -> Result<Option<Vec<fem_proto::IdPattern>>, (ErrorCode, String)> {
    if !shared.trust.enforced() {
        return Ok(None);
    }
    let g = grant.ok_or_else(|| {
        (
            ErrorCode::PermissionDenied,
            format!("broker {peer} presented no grant (this federation has a trust anchor: start it with --broker-grant)"),
        )
    })?;
    let c = shared.trust.verify(&g)?;
    let ok = c.grant.role == fem_proto::Role::Broker
        && c.grant.subject == *key
        && c.grant.may_register(peer);
    if !ok {
        return Err((
            ErrorCode::PermissionDenied,
            format!("the grant of broker {peer} is not a broker grant for its id and key"),
        ));
    }
    Ok(Some(c.grant.offer_ids.clone()))
}

/// Runs a link whose QUIC stream is open: handshake, then traffic until it
/// ends. A dialled link registered for readiness under `ready_key` records
/// the peer it reached there, whichever of two duplicate links survives.
pub(crate) async fn run_link<R, W>(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    recv: R,
    send: W,
    initiator: bool,
    ready_key: Option<String>,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> LinkEnd
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max = shared.config.max_frame;
    let bytes = |direction| {
        shared
            .metrics
            .federation_bytes
            .with_label_values(&[direction])
    };
    let send = Counted::new(send, bytes("sent"));
    let recv = Counted::new(recv, bytes("received"));
    let (fed_tx, fed_rx) = mpsc::channel::<FedFrame>(LINK_QUEUE);
    let writer = tokio::spawn(async move {
        let _ = write_loop(fed_rx, send, max).await;
    });
    let mut reader = FrameReader::new(recv, max);
    let Ok(h) = hello(&shared) else {
        return LinkEnd::Other;
    };
    if let Some(g) = &shared.config.federation.grant {
        let _ = fed_tx.send(FedFrame::Grant(g.clone())).await;
    }
    let _ = fed_tx.send(h).await;
    // The peer's grant (if it has one), then its hello, within 5 s.
    let handshake = async {
        let mut grant = None;
        loop {
            match reader.next_message::<FedFrame>().await {
                Ok(Some(FedFrame::Grant(g))) if grant.is_none() => grant = Some(g),
                Ok(other) => return (grant, other),
                Err(_) => return (grant, None),
            }
        }
    };
    let (peer_grant, first) = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .unwrap_or((None, None));
    let checked = check_hello(&shared, first).and_then(|(peer, key, features)| {
        let advertise = check_peer_grant(&shared, &peer, &key, peer_grant)?;
        Ok((peer, key, features, advertise))
    });
    let (peer, features, advertise) = match checked {
        Ok((peer, key, features, advertise)) => {
            shared.fed.linked.insert(peer.clone(), key);
            (peer, features, advertise)
        }
        Err((ErrorCode::BadRequest, reason)) if reason == MYSELF => {
            conn.close(2u32.into(), b"myself");
            return LinkEnd::Myself;
        }
        Err((code, reason)) => {
            warn!(%code, %reason, remote = %conn.remote_address(), "federation peer refused");
            shared.metrics.refused("PEER_REFUSED");
            let _ = fed_tx.send(FedFrame::Refused { code, reason }).await;
            drop(fed_tx);
            let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
            conn.close(2u32.into(), b"refused");
            return LinkEnd::Other;
        }
    };
    if let Some(k) = &ready_key {
        shared.fed.required.insert(k.clone(), Some(peer.clone()));
    }
    let me = shared.config.broker_id.clone();
    let opener = if initiator { me } else { peer.clone() };
    let span = info_span!("link", %peer, initiator);
    async move {
        let (link, handle) = shared.add_link(fed_tx.clone());
        if shared.route(|r, now| r.link_up(now, link, peer.clone(), opener, advertise, &features))
            == LinkUp::Duplicate
        {
            debug!("duplicate link; keeping the existing one");
            shared.remove_link(link);
            drop(fed_tx);
            drop(handle);
            let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
            // Wait for the peer to close it, so a dialer does not spin.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
            return LinkEnd::Other;
        }
        info!("federation link up");
        // Every revocation we hold, so a peer that missed some catches up.
        let held = shared.trust.revocations();
        if !held.is_empty() {
            let _ = fed_tx.try_send(FedFrame::Revocations(held));
        }
        let timeout = shared.config.federation.link_timeout;
        let mut ping = tokio::time::interval(shared.config.federation.ping_interval);
        let mut last_rx = Instant::now();
        let mut seq = 0u64;
        // The read is cancel-safe (bytes read stay in the decoder), so it
        // runs here rather than on a task of its own: no channel hop and
        // wake-up per frame. The other futures live across frames, so none
        // registers a waiter anew per frame.
        let mut closed = Box::pin(handle.close.notified());
        let left_dns = async {
            match &mut stop {
                Some(s) => {
                    let _ = s.wait_for(|v| *v).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(left_dns);
        loop {
            tokio::select! {
                f = reader.next_message::<FedFrame>() => match f {
                    Ok(Some(f)) => {
                        last_rx = Instant::now();
                        handle_frame(&shared, link, &fed_tx, f);
                    }
                    Ok(None) | Err(_) => break,
                },
                () = &mut closed => {
                    info!("link replaced or stuck; closing it");
                    break;
                }
                () = &mut left_dns => {
                    info!("peer left DNS; closing the link");
                    break;
                }
                _ = ping.tick() => {
                    if last_rx.elapsed() > timeout {
                        warn!(silent_ms = u64::try_from(last_rx.elapsed().as_millis()).unwrap_or(u64::MAX), "federation peer silent; dropping the link");
                        break;
                    }
                    seq += 1;
                    let _ = fed_tx.try_send(FedFrame::Ping { seq });
                }
            }
            if shared.is_shutting_down() && shared.pending_len() == 0 {
                break;
            }
        }
        drop(closed);
        shared.remove_link(link);
        drop(fed_tx);
        drop(handle);
        let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
        conn.close(0u32.into(), b"bye");
        info!("federation link down");
        LinkEnd::Other
    }
    .instrument(span)
    .await
}

fn handle_frame(shared: &Arc<Shared>, link: LinkId, tx: &mpsc::Sender<FedFrame>, f: FedFrame) {
    match f {
        f @ (FedFrame::RelayCall { .. }
        | FedFrame::RelayAttestedCall { .. }
        | FedFrame::RelayOpenCall { .. }
        | FedFrame::RelayOpenAttestedCall { .. }) => {
            if let Some(call) = f.into_call() {
                relay_in(shared, link, tx, call);
            }
        }
        f @ (FedFrame::RelayResult { .. } | FedFrame::RelayAttestedResult { .. }) => {
            if let Some((id, signer, envelope)) = f.into_result() {
                relay_back(shared, link, id, signer, envelope);
            }
        }
        FedFrame::Advertise { .. }
        | FedFrame::AdvertiseDelta { .. }
        | FedFrame::Withdraw { .. }
        | FedFrame::Summary { .. }
        | FedFrame::Resync { .. } => {
            shared.route(|r, now| r.link_frame(now, link, f));
        }
        FedFrame::RelayFailed { id, code, message } => {
            shared.route(|r, now| r.relay_failed(now, link, id, code, message));
        }
        FedFrame::RelayCancel { id } => shared.route(|r, now| r.relay_cancel(now, link, id)),
        FedFrame::RelayProgress { id, update } => {
            shared.route(|r, now| r.relay_progress(now, link, id, update));
        }
        FedFrame::Ping { seq } => {
            let _ = tx.try_send(FedFrame::Pong { seq });
        }
        FedFrame::Pong { .. } | FedFrame::Hello(_) | FedFrame::Grant(_) => {}
        FedFrame::Refused { code, reason } => warn!(%code, %reason, "peer refused the link"),
        FedFrame::Revocations(list) => {
            for r in &list {
                if let Err((code, message)) = shared.apply_revocation(r, Some(link)) {
                    warn!(%code, %message, "revocation from a peer refused");
                }
            }
        }
        FedFrame::Call { .. } | FedFrame::Result { .. } | FedFrame::CallFailed { .. } => {
            warn!("relay/1 message from a relay/2 peer; dropped");
        }
    }
}

/// A call relayed to us for `agent`: the caller's signature is checked on
/// entry only with `--verify-relayed` (an attested call has none: the peer
/// vouches for it) and, with a trust anchor, its grant (never the peer's
/// word alone); then the core runs it on that agent; the answer goes back
/// over the link under the peer's `id`.
fn relay_in(shared: &Arc<Shared>, link: LinkId, tx: &mpsc::Sender<FedFrame>, call: RelayedCall) {
    let RelayedCall {
        id,
        agent,
        hops_left,
        signer,
        envelope,
        grant,
    } = call;
    let admitted = match admission::admit(
        &envelope,
        Signer::Relayed {
            key: &signer,
            verify: shared.config.federation.verify_relayed,
        },
        Some(EnvelopeType::ToolCall),
        Entry::Relay,
        &shared.replay,
        &shared.metrics,
    ) {
        Ok(a) => a,
        Err(Refused {
            refusal: (code, message),
            ..
        }) => {
            let _ = tx.try_send(FedFrame::RelayFailed { id, code, message });
            return;
        }
    };
    let Body::ToolCall(call) = admitted.env.body else {
        return;
    };
    let caller = admitted.env.header.sender;
    let credential = if shared.trust.enforced() {
        let checked = grant
            .ok_or_else(|| {
                (
                    ErrorCode::PermissionDenied,
                    "a relayed call needs the caller's grant".to_owned(),
                )
            })
            .and_then(|g| shared.trust.verify(&g))
            .and_then(|c| {
                if c.grant.subject == signer && c.grant.may_register(&caller) {
                    Ok(c)
                } else {
                    Err((
                        ErrorCode::PermissionDenied,
                        format!("the grant does not bind caller {caller} to its key"),
                    ))
                }
            });
        match checked {
            Ok(c) => Some(c),
            Err((code, message)) => {
                let _ = tx.try_send(FedFrame::RelayFailed { id, code, message });
                return;
            }
        }
    } else {
        None
    };
    shared.route(|r, now| {
        r.call(
            now,
            Incoming {
                reply: ReplyTo::Link { link, relay: id },
                caller: &caller,
                caller_key: signer,
                call: &call,
                envelope,
                hops_left,
                arrival: agent.as_ref().map_or(Arrival::Open, Arrival::Pinned),
                credential,
            },
        );
    });
}

/// A result relayed back for our call `id`: admitted (the agent's signature
/// with `signer`, its replay window) before the core takes it, where the
/// key must be the chosen agent's; one that fails admission fails the call.
fn relay_back(shared: &Arc<Shared>, link: LinkId, id: u64, signer: PublicKey, envelope: Carried) {
    let admitted = admission::admit(
        &envelope,
        Signer::Relayed {
            key: &signer,
            verify: shared.config.federation.verify_relayed,
        },
        Some(EnvelopeType::ToolResult),
        Entry::Relay,
        &shared.replay,
        &shared.metrics,
    );
    match admitted.map(|a| a.env.body) {
        Ok(Body::ToolResult(result)) => {
            shared.route(|r, now| r.relay_result(now, link, id, &result, envelope, signer));
        }
        Ok(_) => {}
        Err(Refused {
            refusal: (code, message),
            ..
        }) => {
            warn!(%code, %message, "relayed result refused");
            shared.route(|r, now| {
                r.relay_failed(
                    now,
                    link,
                    id,
                    code,
                    format!("the agent's result was refused: {message}"),
                );
            });
        }
    }
}
