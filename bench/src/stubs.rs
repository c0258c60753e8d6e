//! Workload 10 (only when named): hub and spokes at scale, with spokes that
//! hold every agent id (`--federation-routes full`) and then with stub
//! spokes (`summary`), side by side. One hub and `--mesh-size` - 1 spokes
//! (9 by default), `--fed-agents` agents on each spoke (1,000 by default)
//! of ten kinds (capability `stubs.kN`), every one an SDK agent of this
//! process over TLS/TCP. Measured for each:
//!
//! - each spoke's resident memory once all agents are registered and
//!   routed (median over the spokes), and the hub's;
//! - the federation bytes each spoke received while the agents registered
//!   (`fem_broker_federation_bytes_total{direction="received"}`, pings
//!   included), per registration in the federation;
//! - the time until an agent of a new kind on one spoke is callable by
//!   capability from every other spoke.

use std::time::{Duration, Instant};

use anyhow::bail;
use fem_agent_sdk::Transport;
use fem_proto::{CapabilityPattern, ErrorCode, Target};

use crate::calls::{caller, connect_agents, echo_agent, echo_tool, options, start_cluster};
use crate::federation::ms;
use crate::load::median;
use crate::procs::{BrokerProc, broker_url, host_ip, metric_sum};
use crate::report::Row;
use crate::{Settings, Workload};

/// First host of the full-spokes run (hub, then spokes); the stub run uses
/// the ten after it.
const FIRST_HOST: u8 = 62;
/// Most brokers in one run (hosts .62-.71 and .72-.81).
const MAX_BROKERS: u8 = 10;
/// Kinds of agent on each spoke.
const KINDS: usize = 10;
/// Longest wait for registrations to be routed, and for the new kind.
const LIMIT: Duration = Duration::from_secs(120);

/// Federation bytes `b` has received.
async fn received(b: &BrokerProc) -> anyhow::Result<f64> {
    Ok(metric_sum(
        b.metrics,
        "fem_broker_federation_bytes_total",
        "direction=\"received\"",
    )
    .await?
    .unwrap_or(0.0))
}

/// Until `b`'s `fem_broker_routes` reaches `want`.
async fn until_routes(b: &BrokerProc, want: f64, t0: Instant) -> anyhow::Result<()> {
    while b.metric("fem_broker_routes").await? < want {
        if t0.elapsed() > LIMIT {
            bail!(
                "broker {} routes {} agents, not {want}, after {LIMIT:?}",
                b.addr,
                b.metric("fem_broker_routes").await?
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One topology: the hub and its spokes, stubs or not.
async fn one(s: &Settings, stub: bool) -> anyhow::Result<Row> {
    let n = s.mesh_size.min(MAX_BROKERS);
    let first = FIRST_HOST + if stub { MAX_BROKERS } else { 0 };
    let hosts: Vec<u8> = (0..n).map(|i| first + i).collect();
    let hub_url = broker_url(host_ip(s.net, first));
    let per = s.fed_agents;
    let max_conn = (per + 100).max(10_000).to_string();
    let mode = if stub { "summary" } else { "full" };
    let name = if stub { "stub" } else { "full" };
    let brokers = start_cluster(s, &format!("stubs-{name}"), &hosts, |i| {
        let mut a = vec!["--max-connections".to_owned(), max_conn.clone()];
        if i == 0 {
            a.extend(["--federation-mode".to_owned(), "hub".to_owned()]);
        } else {
            a.extend([
                "--federation-mode".to_owned(),
                "spoke".to_owned(),
                "--federation-hub".to_owned(),
                hub_url.clone(),
                "--federation-routes".to_owned(),
                mode.to_owned(),
            ]);
        }
        a
    })
    .await?;
    let spokes = &brokers[1..];
    let t0 = Instant::now();
    while brokers[0]
        .metric("fem_broker_federation_peers{state=\"up\"}")
        .await?
        < spokes.len() as f64
    {
        if t0.elapsed() > LIMIT {
            bail!("the hub has not every spoke linked after {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before: Vec<f64> = futures::future::try_join_all(spokes.iter().map(received)).await?;
    let tool = echo_tool()?;
    let opts: Vec<_> = spokes
        .iter()
        .map(|b| options(s, b, Transport::Tcp))
        .collect::<anyhow::Result<_>>()?;
    let total = spokes.len() * per;
    let t0 = Instant::now();
    let results = connect_agents(total, &tool, |k| {
        let (b, j) = (k % spokes.len(), k / spokes.len());
        (
            format!("st-{b}-{j}"),
            format!("stubs.k{}", j % KINDS),
            opts[b].clone(),
        )
    })
    .await;
    let mut agents = Vec::new();
    let mut failed = 0u64;
    for (_, r) in results {
        match r {
            Ok(a) => agents.push(a),
            Err(e) => {
                failed += 1;
                eprintln!("  stubs     {name}: a registration failed: {e:#}");
            }
        }
    }
    let registered = agents.len() as f64;
    until_routes(&brokers[0], registered, t0).await?;
    if !stub {
        for b in spokes {
            until_routes(b, registered - per as f64, t0).await?;
        }
    }
    let routed_in = t0.elapsed();
    // Let the last summaries and deltas settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<f64> = futures::future::try_join_all(spokes.iter().map(received)).await?;
    let per_reg: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) / registered.max(1.0))
        .collect();
    let spoke_rss: Vec<f64> = spokes
        .iter()
        .map(|b| b.proc.rss().map(|r| r as f64))
        .collect::<anyhow::Result<_>>()?;
    let hub_rss = brokers[0].proc.rss()? as f64;

    // A new kind on spoke 1, called by capability from every other spoke.
    let cap = CapabilityPattern::new("stubs.new")?;
    let _new = echo_agent(
        "st-new",
        cap.as_str(),
        options(s, &spokes[0], Transport::Quic)?,
    )
    .await?;
    let mut callers = Vec::new();
    for (i, b) in spokes.iter().enumerate().skip(1) {
        callers.push(caller(&format!("st-caller-{i}"), options(s, b, Transport::Quic)?).await?);
    }
    let t1 = Instant::now();
    for c in &callers {
        loop {
            let target = Target::Capability(cap.clone());
            match c
                .call(target, "echo", serde_json::json!({"new": true}))
                .await
            {
                Ok(_) => break,
                Err(e) if e.code == ErrorCode::NoRoute && t1.elapsed() < LIMIT => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => bail!("call by capability from {}: {e}", c.id()),
            }
        }
    }
    let new_kind = t1.elapsed();
    let mib = |b: f64| b / (1024.0 * 1024.0);
    eprintln!(
        "  stubs     {name} spokes: {total} agents routed in {:.1} s; spoke RSS {:.1} MiB (median), hub {:.1} MiB; \
         each spoke received {:.1} B per registration; a new kind callable from all spokes in {:.0} ms",
        routed_in.as_secs_f64(),
        mib(median(&spoke_rss)),
        mib(hub_rss),
        median(&per_reg),
        ms(new_kind)
    );
    let mut row = Row {
        workload: Workload::Stubs.name().into(),
        case: format!(
            "hub + {} {name} spokes x {per} agents ({KINDS} kinds)",
            spokes.len()
        ),
        runs: 1,
        calls_per_sec: Some(registered / routed_in.as_secs_f64()),
        server_rss_bytes: Some(median(&spoke_rss) as u64),
        errors: failed,
        note: "TLS/TCP agents of this process; server RSS: the median spoke; \
               bytes received per spoke per registration include pings"
            .into(),
        ..Row::default()
    };
    for (k, v) in [
        ("spoke_rss_median_mib", mib(median(&spoke_rss))),
        ("hub_rss_mib", mib(hub_rss)),
        ("spoke_bytes_received_per_registration", median(&per_reg)),
        ("new_kind_callable_from_all_ms", ms(new_kind)),
        ("registered_and_routed_s", routed_in.as_secs_f64()),
    ] {
        row.figures.insert(k.into(), v);
    }
    for a in &agents {
        a.close();
    }
    Ok(row)
}

/// Runs both topologies, full spokes first.
pub(crate) async fn run(s: &Settings) -> anyhow::Result<Vec<Row>> {
    Ok(vec![one(s, false).await?, one(s, true).await?])
}
