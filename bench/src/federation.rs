//! Workload 6: a full mesh of brokers, each on its own loopback address.
//! How long until an agent registered on one broker is routable from all the
//! others, until all withdraw it when it leaves, and until all withdraw it
//! when its broker is killed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fem_agent_sdk::{Client, Transport};
use fem_proto::{CapabilityPattern, ErrorCode, Target};

use crate::calls::{caller, echo_agent, options, start_cluster};
use crate::load::median;
use crate::procs::{BrokerProc, broker_url, host_ip};
use crate::report::Row;
use crate::{Settings, Workload};

/// How often each broker is asked whether it knows the agent.
const POLL: Duration = Duration::from_millis(5);
/// First host number of the mesh in the bench network.
const FIRST_HOST: u8 = 30;

async fn peers_up(b: &BrokerProc) -> anyhow::Result<f64> {
    b.metric("fem_broker_federation_peers{state=\"up\"}").await
}

pub(crate) async fn wait_full_mesh(
    brokers: &[BrokerProc],
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let want = (brokers.len() - 1) as f64;
    for b in brokers {
        while peers_up(b).await? < want {
            if t.elapsed() > limit {
                bail!(
                    "broker {} has fewer than {want} links up after {limit:?}",
                    b.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(t.elapsed())
}

/// Polls discovery at each caller until `present` holds for the agent's
/// capability; returns the time the slowest caller took.
pub(crate) async fn until_all(
    callers: &[&Client],
    cap: &CapabilityPattern,
    present: bool,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let polls = callers.iter().map(|c| async move {
        loop {
            let found = c
                .discover(Some(cap.clone()), 10)
                .await
                .map(|tools| !tools.is_empty())
                .map_err(|e| anyhow::anyhow!("discover at {}: {e}", c.id()))?;
            if found == present {
                return Ok::<_, anyhow::Error>(t0.elapsed());
            }
            if t0.elapsed() > limit {
                bail!(
                    "{cap} still {} at {} after {limit:?}",
                    if present { "unknown" } else { "listed" },
                    c.id()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    });
    let took = futures::future::try_join_all(polls).await?;
    Ok(took.into_iter().max().unwrap_or_default())
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Broker `i`'s flags in a full mesh of the brokers at `urls`.
pub(crate) fn mesh_args(urls: &[String], i: usize) -> Vec<String> {
    let mut a = vec!["--federation-mode".to_owned(), "mesh".to_owned()];
    for (j, u) in urls.iter().enumerate() {
        if j != i {
            a.extend(["--peer".to_owned(), u.clone()]);
        }
    }
    a
}

/// Calls `agent`'s echo tool with `params` from each of `callers`:
/// routable means a call works, not only that discovery lists it.
pub(crate) async fn call_from_each(
    callers: &[&Client],
    agent: &Client,
    params: &serde_json::Value,
) -> anyhow::Result<()> {
    for c in callers {
        c.call(Target::Agent(agent.id().clone()), "echo", params.clone())
            .await
            .with_context(|| format!("call from {} to {}", c.id(), agent.id()))?;
    }
    Ok(())
}

/// Runs the federation workload.
pub(crate) async fn run(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let m = usize::from(s.mesh_size);
    let hosts: Vec<u8> = (0..s.mesh_size).map(|i| FIRST_HOST + i).collect();
    let urls: Vec<String> = hosts
        .iter()
        .map(|n| broker_url(host_ip(s.net, *n)))
        .collect();
    let started = Instant::now();
    let mut brokers = start_cluster(s, "fed", &hosts, |i| mesh_args(&urls, i)).await?;
    let formed = wait_full_mesh(&brokers, Duration::from_secs(120)).await?;
    let formed_after_start = started.elapsed();
    let mut callers = Vec::new();
    for (i, b) in brokers.iter().enumerate() {
        callers.push(caller(&format!("fed-caller-{i}"), options(s, b, Transport::Quic)?).await?);
    }
    let limit = Duration::from_secs(60);
    let (mut advertise, mut leave) = (Vec::new(), Vec::new());
    for r in 0..s.rounds {
        let origin = r % m;
        let cap = CapabilityPattern::new(format!("fedbench.r{r}"))?;
        let opts = options(s, &brokers[origin], Transport::Quic)?;
        let agent = echo_agent(&format!("fed-agent-{r}"), cap.as_str(), opts).await?;
        let others: Vec<&Client> = (0..m)
            .filter(|&i| i != origin)
            .map(|i| &callers[i])
            .collect();
        advertise.push(ms(until_all(&others, &cap, true, limit).await?));
        call_from_each(&others, &agent, &serde_json::json!({"r": r})).await?;
        // Timed from the moment the agent hangs up (`close` does not wait
        // for its connection task to finish closing).
        agent.close();
        leave.push(ms(until_all(&others, &cap, false, limit).await?));
    }

    // Kill the agent's broker: the others notice through the link timeout.
    let mut killed = Vec::new();
    let kills = s.rounds.min(3);
    for k in 0..kills {
        let cap = CapabilityPattern::new(format!("fedbench.k{k}"))?;
        let opts = options(s, &brokers[0], Transport::Quic)?;
        let agent = echo_agent(&format!("fed-kill-{k}"), cap.as_str(), opts).await?;
        let others: Vec<&Client> = callers[1..].iter().collect();
        until_all(&others, &cap, true, limit).await?;
        brokers[0].proc.kill();
        killed.push(ms(until_all(&others, &cap, false, limit).await?));
        // A call now gets a typed NO_ROUTE, not silence.
        match others[0]
            .call(
                Target::Agent(agent.id().clone()),
                "echo",
                serde_json::json!({}),
            )
            .await
        {
            Err(e) if e.code == ErrorCode::NoRoute => {}
            other => bail!(
                "after the kill, a call to {} answered {other:?}",
                agent.id()
            ),
        }
        agent.close();
        brokers[0].restart().await?;
        wait_full_mesh(&brokers, Duration::from_secs(120)).await?;
    }
    for b in &mut brokers {
        b.proc.check_alive()?;
    }

    let row = |case: String, samples: &[f64], note: &str| {
        let mut figures = BTreeMap::new();
        figures.insert("median_ms".into(), median(samples));
        figures.insert("max_ms".into(), samples.iter().copied().fold(0.0, f64::max));
        Row {
            workload: Workload::Federation.name().into(),
            case,
            runs: samples.len(),
            figures,
            note: note.to_owned(),
            ..Row::default()
        }
    };
    Ok(vec![
        row(
            format!("mesh of {m}: all links up"),
            &[ms(formed_after_start)],
            &format!("{:.0} ms after the last broker was ready", ms(formed)),
        ),
        row(
            format!("mesh of {m}: routable from all others"),
            &advertise,
            "from registration accepted to the slowest broker listing it (5 ms polling)",
        ),
        row(
            format!("mesh of {m}: withdrawn after the agent leaves"),
            &leave,
            "from clean disconnect to the slowest broker dropping it",
        ),
        row(
            format!("mesh of {m}: withdrawn after its broker is killed"),
            &killed,
            "SIGKILL; bounded by --link-timeout (default 3s)",
        ),
    ])
}
