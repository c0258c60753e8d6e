//! Federation: authenticated QUIC links between brokers (ALPN `fem-fed/1`),
//! path-vector routes (computed by the routing core, [`crate::route::paths`]),
//! dialling with backoff and fail-over, and DNS SRV discovery.
//!
//! A call routed to an agent behind another broker leaves as a `RelayCall`
//! naming the agent the entry broker chose, with the caller's signed bytes
//! untouched and a hop limit; the agent's broker runs it on that agent (or
//! relays it on towards it) and the answer comes back under the same id.

mod dial;
mod discovery;
mod link;

use std::sync::Arc;

use fem_proto::AgentId;
use tracing::warn;

use self::dial::{DialTarget, dial_loop};
pub(crate) use self::link::accept;
use crate::config::FederationMode;
use crate::state::Shared;

/// Configured links (peers, the hub) whose peer is not linked now: never
/// reached, or reached and its link is down (whichever of two duplicate
/// links was kept counts as up).
fn links_down(shared: &Shared) -> usize {
    let peers: Vec<Option<AgentId>> = shared
        .fed
        .required
        .iter()
        .map(|e| e.value().clone())
        .collect();
    shared.view(|r| {
        peers
            .iter()
            .filter(|p| !p.as_ref().is_some_and(|p| r.has_link(p)))
            .count()
    })
}

/// True when every configured link reached its peer and a link to that
/// peer is up.
pub(crate) fn links_ready(shared: &Shared) -> bool {
    links_down(shared) == 0
}

/// Sets `fem_broker_federation_peers{state="down"}` (evaluated at each scrape).
pub(crate) fn export_down(shared: &Shared) {
    shared
        .metrics
        .federation_peers
        .with_label_values(&["down"])
        .set(i64::try_from(links_down(shared)).unwrap_or(i64::MAX));
}

/// Starts federation: dialers for configured peers and hubs, and the task
/// that advertises local agent changes.
pub(crate) fn start(shared: &Arc<Shared>, endpoint: quinn::Endpoint) {
    let fed = &shared.fed;
    let _ = fed.endpoint.set(endpoint);
    let cfg = &shared.config.federation;
    if cfg.mode != FederationMode::Off && cfg.peer_keys.is_none() {
        warn!(
            "federation in development trust: any broker with a valid certificate may link (set --peer-keys)"
        );
    }
    // Each configured link must be up for /ready; its dialler flags it
    // under the key it is registered with here.
    let required = |ready_key: String, urls: Vec<String>| {
        fed.required.insert(ready_key.clone(), None);
        tokio::spawn(dial_loop(
            Arc::downgrade(shared),
            DialTarget::Urls { urls, ready_key },
            None,
        ));
    };
    for url in &cfg.peers {
        required(url.clone(), vec![url.clone()]);
    }
    if cfg.mode == FederationMode::Spoke && !cfg.hubs.is_empty() {
        required("hub".to_owned(), cfg.hubs.clone());
    }
    if !cfg.discover_srv.is_empty() {
        tokio::spawn(discovery::run(Arc::downgrade(shared)));
    }
}
