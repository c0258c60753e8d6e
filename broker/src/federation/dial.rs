//! Dialling: keeps a link up to a configured or discovered peer, with
//! backoff, trying hubs in fail-over order.

use std::sync::Arc;
use std::time::Duration;

use fem_proto::ALPN_FEDERATION;
use tracing::debug;

use super::link::{LinkEnd, run_link};
use crate::state::Shared;

/// Where a dialer connects.
#[derive(Clone, Debug)]
pub(crate) enum DialTarget {
    /// Broker URLs, the first reachable one (one URL for a mesh peer; the
    /// hubs in fail-over order for a spoke), required for readiness under
    /// `ready_key`.
    Urls {
        /// The URLs, in fail-over order.
        urls: Vec<String>,
        /// The key of this link in the readiness table.
        ready_key: String,
    },
    /// A peer found in DNS: its address and the name its certificate carries.
    Found {
        /// Address from the SRV target's A/AAAA record.
        addr: std::net::SocketAddr,
        /// The SRV target name (TLS server name).
        name: String,
    },
}

/// Keeps a link up to `target`, with backoff, until `stop` turns true.
pub(crate) async fn dial_loop(
    weak: std::sync::Weak<Shared>,
    target: DialTarget,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut i = 0usize;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.is_shutting_down() || stop.as_ref().is_some_and(|s| *s.borrow()) {
            return;
        }
        let (attempt, key) = match &target {
            DialTarget::Urls { urls, ready_key } => {
                let url = urls[i % urls.len()].clone();
                (dial_url(&shared, &url).await, Some(ready_key.clone()))
            }
            DialTarget::Found { addr, name } => (dial(&shared, *addr, name).await, None),
        };
        match attempt {
            Ok((conn, send, recv)) => {
                backoff = Duration::from_millis(100);
                let end = run_link(
                    Arc::clone(&shared),
                    conn,
                    recv,
                    send,
                    true,
                    key.clone(),
                    stop.clone(),
                )
                .await;
                if end == LinkEnd::Myself {
                    debug!("discovered peer is this broker; not dialling it again");
                    return;
                }
                // A spoke whose hub went away tries the next hub first.
                if matches!(&target, DialTarget::Urls { urls, .. } if urls.len() > 1) {
                    i += 1;
                }
            }
            Err(e) => {
                debug!(?target, error = %e, "federation dial failed");
                i += 1;
            }
        }
        let max = shared.config.federation.backoff_max;
        drop(shared);
        match &mut stop {
            Some(s) => {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = s.changed() => {}
                }
            }
            None => tokio::time::sleep(backoff).await,
        }
        backoff = (backoff * 2).min(max);
    }
}

async fn dial_url(
    shared: &Arc<Shared>,
    url: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
    // `srv:NAME`: the SRV targets in RFC 2782 order (priority, then weighted
    // random), the first that answers.
    if let Some(name) = url.strip_prefix("srv:") {
        let targets = super::discovery::ordered_targets(name, shared.config.federation.dns_server)
            .await
            .map_err(|e| format!("SRV {name}: {e}"))?;
        let mut last = format!("SRV {name}: no targets");
        for (addr, host) in targets {
            match dial(shared, addr, &host).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        return Err(last);
    }
    let opts = fem_net::BrokerUrl::parse(url).map_err(|e| e.to_string())?;
    let addr = tokio::net::lookup_host((opts.host(), opts.port()))
        .await
        .map_err(|e| format!("resolve {url}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {url}: no address"))?;
    dial(shared, addr, opts.host()).await
}

async fn dial(
    shared: &Arc<Shared>,
    addr: std::net::SocketAddr,
    name: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
    let endpoint = shared.fed.endpoint.get().ok_or("no endpoint")?;
    let tls = fem_net::tls::client_config(&shared.config.federation.trust, &[ALPN_FEDERATION])
        .map_err(|e| e.to_string())?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let connecting = endpoint
        .connect_with(cfg, addr, name)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let conn = tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
    Ok((conn, send, recv))
}
