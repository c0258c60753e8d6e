//! Peer discovery through DNS SRV records, re-resolved on an interval.
//!
//! Each SRV target (with its A/AAAA addresses) is a peer; the broker keeps a
//! link to every peer found except itself, starts dialling peers that appear
//! and closes links to peers that leave DNS. Resolution failures (NXDOMAIN,
//! timeouts, bad records) are logged and counted, never fatal; the last
//! known set is kept until a resolution succeeds.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::sync::watch;
use tracing::{info, warn};

use super::dial::{DialTarget, dial_loop};
use crate::state::Shared;

fn resolver(dns: Option<SocketAddr>) -> Result<TokioResolver, ResolveError> {
    let mut opts = ResolverOpts::default();
    // Always ask again: membership changes must be seen on the next interval.
    opts.cache_size = 0;
    opts.timeout = std::time::Duration::from_secs(2);
    opts.attempts = 2;
    match dns {
        Some(addr) => {
            let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            let cfg = ResolverConfig::from_parts(None, vec![], group);
            Ok(
                TokioResolver::builder_with_config(cfg, TokioConnectionProvider::default())
                    .with_options(opts)
                    .build(),
            )
        }
        None => {
            let mut b = TokioResolver::builder_tokio()?;
            *b.options_mut() = opts;
            Ok(b.build())
        }
    }
}

/// Peers named by one SRV name: (address, target name).
async fn lookup(
    r: &TokioResolver,
    name: &str,
) -> Result<BTreeSet<(SocketAddr, String)>, ResolveError> {
    let srv = r.srv_lookup(name).await?;
    let mut out = BTreeSet::new();
    for rec in srv.iter() {
        let target = rec.target().to_utf8();
        let host = target.trim_end_matches('.').to_owned();
        match r.lookup_ip(target.as_str()).await {
            Ok(ips) => {
                for ip in ips.iter() {
                    out.insert((SocketAddr::new(ip, rec.port()), host.clone()));
                }
            }
            Err(e) => {
                warn!(srv = name, target = %host, error = %e, "SRV target does not resolve; skipped")
            }
        }
    }
    Ok(out)
}

/// The targets of `name` in the order RFC 2782 asks a client to try them:
/// lowest priority first; within one priority, a weighted random order.
pub(crate) async fn ordered_targets(
    name: &str,
    dns: Option<SocketAddr>,
) -> Result<Vec<(SocketAddr, String)>, ResolveError> {
    use rand::Rng as _;
    let r = resolver(dns)?;
    let srv = r.srv_lookup(name).await?;
    let mut recs: Vec<(u16, u16, String, u16)> = srv
        .iter()
        .map(|rec| {
            (
                rec.priority(),
                rec.weight(),
                rec.target().to_utf8(),
                rec.port(),
            )
        })
        .collect();
    recs.sort_by_key(|r| r.0);
    // The generator is not Send: keep it out of the awaits below.
    let order = {
        let mut order = Vec::new();
        let mut rng = rand::thread_rng();
        while !recs.is_empty() {
            let prio = recs[0].0;
            let mut group: Vec<_> = recs.iter().filter(|r| r.0 == prio).cloned().collect();
            recs.retain(|r| r.0 != prio);
            // Zero weights first, then pick by running sums (RFC 2782).
            group.sort_by_key(|r| r.1 != 0);
            while !group.is_empty() {
                let total: u32 = group.iter().map(|r| u32::from(r.1)).sum();
                let pick = rng.gen_range(0..=total);
                let mut sum = 0u32;
                let idx = group
                    .iter()
                    .position(|r| {
                        sum += u32::from(r.1);
                        sum >= pick
                    })
                    .unwrap_or(0);
                order.push(group.remove(idx));
            }
        }
        order
    };
    let mut out = Vec::new();
    for (_, _, target, port) in order {
        let host = target.trim_end_matches('.').to_owned();
        if let Ok(ips) = r.lookup_ip(target.as_str()).await {
            for ip in ips.iter() {
                out.push((SocketAddr::new(ip, port), host.clone()));
            }
        }
    }
    Ok(out)
}

/// Resolves the configured SRV names every interval and keeps one dialler per peer.
pub(crate) async fn run(weak: Weak<Shared>) {
    let (names, interval, dns) = match weak.upgrade() {
        Some(s) => {
            let f = &s.config.federation;
            (f.discover_srv.clone(), f.discovery_interval, f.dns_server)
        }
        None => return,
    };
    let r = match resolver(dns) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "no DNS resolver; SRV discovery disabled");
            return;
        }
    };
    let mut dialers: HashMap<SocketAddr, watch::Sender<bool>> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.is_shutting_down() {
            return;
        }
        let mut found = BTreeSet::new();
        let mut complete = true;
        for name in &names {
            match lookup(&r, name).await {
                Ok(set) => found.extend(set),
                Err(e) => {
                    complete = false;
                    let kind = if e.is_no_records_found() {
                        "NXDOMAIN"
                    } else {
                        "ERROR"
                    };
                    warn!(srv = %name, error = %e, "SRV lookup failed; keeping the known peers");
                    shared
                        .metrics
                        .discovery_errors
                        .with_label_values(&[kind])
                        .inc();
                }
            }
        }
        let me = shared.config.listen;
        for (addr, host) in &found {
            if *addr == me || dialers.contains_key(addr) {
                continue;
            }
            info!(peer = %addr, name = %host, "peer found in DNS");
            let (tx, rx) = watch::channel(false);
            dialers.insert(*addr, tx);
            let target = DialTarget::Found {
                addr: *addr,
                name: host.clone(),
            };
            tokio::spawn(dial_loop(Arc::downgrade(&shared), target, Some(rx)));
        }
        if complete {
            let present: BTreeSet<SocketAddr> = found.iter().map(|(a, _)| *a).collect();
            dialers.retain(|addr, stop| {
                let keep = present.contains(addr);
                if !keep {
                    info!(peer = %addr, "peer left DNS; dropping it");
                    let _ = stop.send(true);
                }
                keep
            });
        }
    }
}
