//! Workload 8: federation at scale. A full mesh of brokers (`--mesh-size`,
//! 10 by default) with `--fed-agents` agents registered on each (1,000 by
//! default: 10,000 in all, every one an SDK agent of this process over
//! TLS/TCP). Measured, first on the empty mesh and then with all agents
//! registered:
//!
//! - the time until one new agent registered on one broker is listed by
//!   discovery at every other broker (then a call from each must succeed);
//! - the bytes the brokers send on their federation links for that one
//!   registration: `fem_broker_federation_bytes_total{direction="sent"}`
//!   summed over the brokers, read before and after, less what the links
//!   send when idle (pings) over the same time. Without that metric the
//!   figure is left out (n/a);
//! - the time until every other broker withdraws it when it leaves, and
//!   (once, at the end) when its broker is killed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use fem_agent_sdk::{Client, Transport};
use fem_proto::CapabilityPattern;

use crate::calls::{
    CONNECTING_AT_ONCE, caller, connect_agents, echo_agent, echo_tool, options, start_cluster,
};
use crate::federation::{call_from_each, mesh_args, ms, until_all, wait_full_mesh};
use crate::load::median;
use crate::procs::{BrokerProc, broker_url, host_ip, metric_sum};
use crate::report::Row;
use crate::{Settings, Workload};

/// First host number of the mesh in the bench network (up to .60).
const FIRST_HOST: u8 = 42;
const LAST_HOST: u8 = 60;
/// The link counter that is read, and the sample label summed.
const LINK_BYTES: &str = "fem_broker_federation_bytes_total";
const SENT: &str = "direction=\"sent\"";
/// The brokers' federation ping interval (their default, which the
/// benchmark keeps).
const PING: Duration = Duration::from_millis(500);
/// How long the links' idle traffic is measured before each registration
/// (a whole number of pings); also the shortest time the registration's
/// bytes are counted over.
const IDLE_WINDOW: Duration = Duration::from_secs(2);
/// Longest wait for the bulk registration's convergence and the kill's withdrawal.
const LIMIT: Duration = Duration::from_secs(120);
/// Longest wait for one registration to reach all (or to be withdrawn).
const ROUND_LIMIT: Duration = Duration::from_secs(30);

/// Bytes sent on federation links, summed over `brokers`; `None` when a
/// broker does not report the metric.
async fn link_bytes(brokers: &[BrokerProc]) -> anyhow::Result<Option<f64>> {
    let mut sum = 0.0;
    for b in brokers {
        match metric_sum(b.metrics, LINK_BYTES, SENT).await? {
            Some(v) => sum += v,
            None => return Ok(None),
        }
    }
    Ok(Some(sum))
}

/// `d` rounded up to a whole number of ping intervals.
fn whole_pings(d: Duration) -> Duration {
    let n = d.as_nanos().div_ceil(PING.as_nanos());
    PING * u32::try_from(n).unwrap_or(u32::MAX)
}

/// Figures of one registration.
struct Registration {
    routable_ms: f64,
    left_ms: f64,
    /// Link bytes the registration caused (idle traffic subtracted).
    bytes: Option<f64>,
    /// Link bytes per second when idle.
    idle_bytes_per_s: Option<f64>,
}

/// Registers one new agent on `brokers[origin]`, times its propagation to
/// every other broker and counts the link bytes it caused; then it leaves
/// and its withdrawal is timed.
async fn one_registration(
    s: &Settings,
    brokers: &[BrokerProc],
    callers: &[Client],
    origin: usize,
    tag: &str,
) -> anyhow::Result<Registration> {
    // Idle links send a ping each way every PING: over windows that are
    // whole multiples of it, their idle bytes are the same in every window
    // and subtract exactly. Each window runs from the start of one reading
    // of all brokers to the start of the next. The last registration's
    // withdrawal settles first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    let b0 = link_bytes(brokers).await?;
    tokio::time::sleep_until((t0 + IDLE_WINDOW).into()).await;
    let t1 = Instant::now();
    let b1 = link_bytes(brokers).await?;
    let idle = b0.zip(b1).map(|(a, b)| b - a);

    let cap = CapabilityPattern::new(format!("fedscale.new.{tag}"))?;
    let opts = options(s, &brokers[origin], Transport::Quic)?;
    let agent = echo_agent(&format!("fs-new-{tag}"), cap.as_str(), opts).await?;
    let others: Vec<&Client> = (0..brokers.len())
        .filter(|&i| i != origin)
        .map(|i| &callers[i])
        .collect();
    let routable = until_all(&others, &cap, true, ROUND_LIMIT).await?;
    // Everything the registration set off has been sent well before twice
    // the time it took to reach the slowest broker.
    let window = whole_pings(IDLE_WINDOW.max(routable * 2 + Duration::from_millis(250)));
    tokio::time::sleep_until((t1 + window).into()).await;
    let b2 = link_bytes(brokers).await?;
    let scale = window.as_secs_f64() / IDLE_WINDOW.as_secs_f64();
    let bytes = b1
        .zip(b2)
        .zip(idle)
        .map(|((a, b), idle)| (b - a) - idle * scale);
    let idle_rate = idle.map(|i| i / IDLE_WINDOW.as_secs_f64());
    call_from_each(&others, &agent, &serde_json::json!({"tag": tag})).await?;
    agent.close();
    let left = until_all(&others, &cap, false, ROUND_LIMIT).await?;
    eprintln!(
        "  fedscale  {tag:<4} routable from all in {:>7.1} ms, withdrawn in {:>7.1} ms after leaving, link bytes {}",
        ms(routable),
        ms(left),
        bytes.map_or_else(|| "n/a".to_owned(), |b| format!("{b:.0}"))
    );
    Ok(Registration {
        routable_ms: ms(routable),
        left_ms: ms(left),
        bytes,
        idle_bytes_per_s: idle_rate,
    })
}

/// Registrations `0..rounds` on brokers in turn; failures are kept as such.
async fn registrations(
    s: &Settings,
    brokers: &[BrokerProc],
    callers: &[Client],
    prefix: &str,
) -> (Vec<Registration>, Vec<String>) {
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for r in 0..s.rounds {
        let tag = format!("{prefix}{r}");
        match one_registration(s, brokers, callers, r % brokers.len(), &tag).await {
            Ok(x) => ok.push(x),
            Err(e) => {
                eprintln!("  fedscale  {tag:<4} failed: {e:#}");
                failed.push(format!("{e:#}"));
            }
        }
    }
    (ok, failed)
}

fn registration_row(case: String, regs: &[Registration], failed: &[String]) -> Row {
    let mut figures = BTreeMap::new();
    let routable: Vec<f64> = regs.iter().map(|r| r.routable_ms).collect();
    if !regs.is_empty() {
        figures.insert("median_ms".into(), median(&routable));
        figures.insert(
            "max_ms".into(),
            routable.iter().copied().fold(0.0, f64::max),
        );
        figures.insert(
            "left_withdrawn_median_ms".into(),
            median(&regs.iter().map(|r| r.left_ms).collect::<Vec<_>>()),
        );
    }
    let bytes: Vec<f64> = regs.iter().filter_map(|r| r.bytes).collect();
    let idle: Vec<f64> = regs.iter().filter_map(|r| r.idle_bytes_per_s).collect();
    let note = if bytes.is_empty() {
        format!("link bytes per registration n/a: the brokers do not report {LINK_BYTES}")
    } else {
        figures.insert("link_bytes_per_registration".into(), median(&bytes));
        figures.insert("link_bytes_idle_per_s".into(), median(&idle));
        "link bytes: sent on all links for one registration, idle traffic subtracted".into()
    };
    let failures = failed
        .first()
        .map(|e| {
            format!(
                "; {} of {} failed, first: {e}",
                failed.len(),
                failed.len() + regs.len()
            )
        })
        .unwrap_or_default();
    Row {
        workload: Workload::Fedscale.name().into(),
        case,
        runs: regs.len(),
        errors: failed.len() as u64,
        figures,
        note: format!(
            "from registration accepted to the slowest broker listing it; {note}{failures}"
        ),
        ..Row::default()
    }
}

/// Resident memory of all `brokers`, bytes.
fn rss_sum(brokers: &[BrokerProc]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for b in brokers {
        sum += b.proc.rss()?;
    }
    Ok(sum)
}

/// Until every broker routes to at least `want(i)` remote agents.
async fn until_routes(
    brokers: &[BrokerProc],
    want: impl Fn(usize) -> f64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    for (i, b) in brokers.iter().enumerate() {
        while b.metric("fem_broker_routes").await? < want(i) {
            if t.elapsed() > limit {
                bail!(
                    "broker {} routes to {} agents, not {}, after {limit:?}",
                    b.addr,
                    b.metric("fem_broker_routes").await?,
                    want(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(t.elapsed())
}

/// Registers a new agent on the last broker, kills that broker, and
/// returns the time until every other broker has withdrawn the new agent,
/// then until broker i routes to no more than `rest(i)` agents.
async fn kill_last(
    s: &Settings,
    brokers: &mut [BrokerProc],
    callers: &[Client],
    its_agents: &[Client],
    rest: impl Fn(usize) -> f64,
) -> anyhow::Result<(Duration, Duration)> {
    let last = brokers.len() - 1;
    let cap = CapabilityPattern::new("fedscale.kill")?;
    let agent = echo_agent(
        "fs-kill",
        cap.as_str(),
        options(s, &brokers[last], Transport::Quic)?,
    )
    .await?;
    let others: Vec<&Client> = callers[..last].iter().collect();
    until_all(&others, &cap, true, LIMIT).await?;
    brokers[last].proc.kill();
    let killed = Instant::now();
    // Its agents would only try to reconnect.
    agent.close();
    for a in its_agents {
        a.close();
    }
    let withdrawn = until_all(&others, &cap, false, LIMIT).await?;
    let mut all_gone = Duration::ZERO;
    for (i, b) in brokers[..last].iter().enumerate() {
        while b.metric("fem_broker_routes").await? > rest(i) {
            if killed.elapsed() > LIMIT {
                bail!(
                    "broker {} still routes to the killed broker's agents after {LIMIT:?}",
                    b.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all_gone = killed.elapsed();
    }
    eprintln!(
        "  fedscale  after the kill: the new agent withdrawn in {:.0} ms, all its broker's agents in {:.0} ms",
        ms(withdrawn),
        ms(all_gone)
    );
    Ok((withdrawn, all_gone))
}

/// Runs the fedscale workload.
pub(crate) async fn run(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let m = usize::from(s.mesh_size);
    if m > usize::from(LAST_HOST - FIRST_HOST + 1) {
        bail!(
            "the fedscale mesh has at most {} brokers (127.x.x.{FIRST_HOST}-{LAST_HOST}); --mesh-size is {m}",
            LAST_HOST - FIRST_HOST + 1
        );
    }
    let per = s.fed_agents;
    let total = m * per;
    let hosts: Vec<u8> = (0..s.mesh_size).map(|i| FIRST_HOST + i).collect();
    let urls: Vec<String> = hosts
        .iter()
        .map(|n| broker_url(host_ip(s.net, *n)))
        .collect();
    let max_conn = (per + 100).max(10_000).to_string();
    let mut brokers = start_cluster(s, "fedscale", &hosts, |i| {
        let mut a = mesh_args(&urls, i);
        a.extend(["--max-connections".to_owned(), max_conn.clone()]);
        a
    })
    .await?;
    let formed = wait_full_mesh(&brokers, LIMIT).await?;
    eprintln!(
        "  fedscale  mesh of {m}: all links up {:.0} ms after the last broker was ready",
        ms(formed)
    );
    let mut callers = Vec::new();
    for (i, b) in brokers.iter().enumerate() {
        callers.push(caller(&format!("fs-caller-{i}"), options(s, b, Transport::Quic)?).await?);
    }
    let mut rows = Vec::new();

    // The empty mesh first: what one registration costs with nothing else registered.
    let (empty, failed) = registrations(s, &brokers, &callers, "e").await;
    rows.push(registration_row(
        format!("mesh of {m}, no other agents: new agent routable from all"),
        &empty,
        &failed,
    ));

    // Then `per` agents on every broker, registered in an interleaved order.
    let rss_before = rss_sum(&brokers)?;
    let tool = echo_tool()?;
    let opts: Vec<_> = brokers
        .iter()
        .map(|b| options(s, b, Transport::Tcp))
        .collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    let results = connect_agents(total, &tool, |k| {
        let (b, j) = (k % m, k / m);
        (
            format!("fs-{b}-{j}"),
            format!("fedscale.b{b}.n{j}"),
            opts[b].clone(),
        )
    })
    .await;
    let registered_in = t0.elapsed();
    eprintln!(
        "  fedscale  {total} agents registered in {:.1} s",
        registered_in.as_secs_f64()
    );
    let mut agents: Vec<Vec<Client>> = (0..m).map(|_| Vec::new()).collect();
    let (mut failed, mut first_error) = (0u64, None);
    for (k, r) in results {
        match r {
            Ok(a) => agents[k % m].push(a),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    // Routable from all: every broker routes to every other broker's
    // agents (those that registered).
    let per_broker: Vec<usize> = agents.iter().map(Vec::len).collect();
    let registered: usize = per_broker.iter().sum();
    let remote = |i: usize| (registered - per_broker[i]) as f64;
    let mut figures = BTreeMap::new();
    figures.insert("all_registered_s".into(), registered_in.as_secs_f64());
    match until_routes(&brokers, remote, LIMIT).await {
        Ok(_) => {
            let routable_in = t0.elapsed();
            eprintln!(
                "  fedscale  every broker routes to all remote agents {:.1} s after the first registration",
                routable_in.as_secs_f64()
            );
            figures.insert(
                "all_routable_everywhere_s".into(),
                routable_in.as_secs_f64(),
            );
        }
        Err(e) => {
            eprintln!("  fedscale  not routable everywhere: {e:#}");
            failed += 1;
            first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }
    let rss = rss_sum(&brokers)?;
    figures.insert(
        "broker_rss_per_agent_bytes".into(),
        rss.saturating_sub(rss_before) as f64 / total.max(1) as f64,
    );
    rows.push(Row {
        workload: Workload::Fedscale.name().into(),
        case: format!("mesh of {m} x {per} agents: register {total}"),
        runs: 1,
        calls_per_sec: Some(registered as f64 / registered_in.as_secs_f64()),
        server_rss_bytes: Some(rss),
        errors: failed,
        figures,
        note: format!(
            "TLS/TCP agents of this process, {CONNECTING_AT_ONCE} registrations in flight; \
             routable everywhere: every broker's fem_broker_routes counts all remote agents{}",
            first_error
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        ),
        ..Row::default()
    });
    // Let the last advertisements settle before counting bytes.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (full, failed) = registrations(s, &brokers, &callers, "f").await;
    rows.push(registration_row(
        format!("mesh of {m} x {per} agents: new agent routable from all"),
        &full,
        &failed,
    ));

    // Kill the last broker with a new agent (and its `per` others) on it.
    let last = m - 1;
    let case = format!("mesh of {m} x {per} agents: withdrawn after its broker is killed");
    let note = format!(
        "SIGKILL of a broker holding {} agents; bounded by --link-timeout (default 3s)",
        per_broker[last] + 1
    );
    let rest = (registered - per_broker[last]) as f64;
    let killed = kill_last(s, &mut brokers, &callers, &agents[last], |i| {
        rest - per_broker[i] as f64
    })
    .await;
    rows.push(match killed {
        Ok((withdrawn, all_gone)) => {
            let mut figures = BTreeMap::new();
            figures.insert("median_ms".into(), ms(withdrawn));
            figures.insert("max_ms".into(), ms(withdrawn));
            figures.insert("all_its_agents_withdrawn_ms".into(), ms(all_gone));
            Row {
                workload: Workload::Fedscale.name().into(),
                case,
                runs: 1,
                figures,
                note,
                ..Row::default()
            }
        }
        Err(e) => {
            eprintln!("  fedscale  kill: {e:#}");
            Row {
                workload: Workload::Fedscale.name().into(),
                case,
                runs: 0,
                errors: 1,
                note: format!("{note}; failed: {e:#}"),
                ..Row::default()
            }
        }
    });
    for b in &mut brokers[..last] {
        b.proc.check_alive()?;
    }
    for list in &agents {
        for a in list {
            a.close();
        }
    }
    Ok(rows)
}
