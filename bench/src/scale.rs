//! Workload 5: many agents connecting and registering to one broker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fem_agent_sdk::Transport;
use fem_proto::{AgentId, CapabilityPattern, Target};

use crate::calls::{CONNECTING_AT_ONCE, caller, connect_agents, echo_tool, options, size_name};
use crate::load::{self, Caller, Endpoint};
use crate::procs::{BrokerProc, cpu_of, host_ip};
use crate::report::Row;
use crate::{Settings, Workload};

/// Connects `n` agents (over `transport`, one echo tool and one capability each) to a
/// fresh broker and measures registrations per second, the time until the
/// broker routes to all of them, its resident memory per agent and a call's
/// latency with all of them registered.
pub(crate) async fn run(s: &Settings, n: usize, transport: Transport) -> anyhow::Result<Vec<Row>> {
    let tname = match transport {
        Transport::Tcp => "tls-tcp",
        Transport::Quic => "quic",
        _ => "auto",
    };
    let dir = s.work.join(format!("scale-{n}-{tname}"));
    // The default connection limit is 10,000; the run needs n agents plus callers.
    let limit = (n + 100).max(10_000).to_string();
    let mut b = BrokerProc::start(
        &s.broker_bin,
        host_ip(s.net, 20),
        &dir,
        &s.ca,
        &["--max-connections".to_owned(), limit],
    )
    .await?;
    b.wait_ready(Duration::from_secs(60)).await?;
    let opts = options(s, &b, transport)?;
    let c = caller("scale-caller", opts.clone()).await?;
    let base = b.metric("fem_broker_registered_agents").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = b.proc.rss()?;

    let tool = echo_tool()?;
    // CPU of each side over the registrations: the broker, and this process
    // (which holds the agents), to tell which side limits the rate.
    let cpu0 = (cpu_of(b.proc.pid())?, cpu_of(std::process::id())?);
    let t0 = Instant::now();
    let results = connect_agents(n, &tool, |i| {
        (format!("scale-{i}"), format!("scale.n{i}"), opts.clone())
    })
    .await;
    let registered_in = t0.elapsed();
    let cpu1 = (cpu_of(b.proc.pid())?, cpu_of(std::process::id())?);
    let mut agents = Vec::with_capacity(n);
    let mut failed = 0u64;
    let mut first_error = None;
    for (_, r) in results {
        match r {
            Ok(a) => agents.push(a),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    // Routable: the broker's registry holds every agent.
    let want = base + agents.len() as f64;
    let end = Instant::now() + Duration::from_secs(120);
    while b.metric("fem_broker_registered_agents").await? < want {
        if Instant::now() > end {
            bail!("broker did not list {want} agents within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let routable_in = t0.elapsed();
    // Prove it with calls to a spread of agents, by id and by capability.
    let step = (n / 50).max(1);
    for i in (0..n).step_by(step) {
        let id = AgentId::new(format!("scale-{i}"))?;
        c.call(Target::Agent(id), "echo", serde_json::json!({"i": i}))
            .await
            .with_context(|| format!("call to scale-{i}"))?;
        let cap = CapabilityPattern::new(format!("scale.n{i}"))?;
        c.call(Target::Capability(cap), "echo", serde_json::json!({"i": i}))
            .await
            .with_context(|| format!("call to capability scale.n{i}"))?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = b.proc.rss()?;
    let per_agent = (rss_after.saturating_sub(rss_before)) as f64 / agents.len().max(1) as f64;

    let per_reg = |d: Duration| d.as_secs_f64() * 1e6 / agents.len().max(1) as f64;
    let (broker_us, agents_us) = (per_reg(cpu1.0 - cpu0.0), per_reg(cpu1.1 - cpu0.1));
    let mid = n / 2;
    let mut rows = Vec::new();
    let mut figures = BTreeMap::new();
    figures.insert("all_registered_s".into(), registered_in.as_secs_f64());
    figures.insert("all_routable_s".into(), routable_in.as_secs_f64());
    figures.insert("broker_rss_per_agent_bytes".into(), per_agent);
    figures.insert("broker_rss_before_bytes".into(), rss_before as f64);
    figures.insert("broker_cpu_us_per_registration".into(), broker_us);
    figures.insert("agents_cpu_us_per_registration".into(), agents_us);
    rows.push(Row {
        workload: Workload::Scale.name().into(),
        case: format!("{tname} {n} agents register"),
        runs: 1,
        calls_per_sec: Some(agents.len() as f64 / registered_in.as_secs_f64()),
        server_rss_bytes: Some(rss_after),
        cpu_us_per_call: Some(broker_us + agents_us),
        server_cpu_us_per_call: Some(broker_us),
        caller_cpu_us_per_call: Some(agents_us),
        errors: failed,
        figures,
        note: format!(
            "{CONNECTING_AT_ONCE} registrations in flight; CPU per registration: srv = broker, caller = the agents (fem-bench){}",
            first_error
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        ),
        ..Row::default()
    });
    for (how, target) in [
        (
            "by id",
            Target::Agent(AgentId::new(format!("scale-{mid}"))?),
        ),
        (
            "by capability",
            Target::Capability(CapabilityPattern::new(format!("scale.n{mid}"))?),
        ),
    ] {
        let caller = Caller::new(
            Endpoint::Fem {
                client: c.clone(),
                target,
                attested: false,
            },
            256,
        );
        let st = load::run(&caller, 1, s.warmup, s.duration).await;
        rows.push(Row {
            workload: Workload::Scale.name().into(),
            case: format!("{tname} call {how} among {n} agents {} c=1", size_name(256)),
            runs: 1,
            calls_per_sec: Some(st.calls_per_sec),
            p50_us: Some(st.p50_us),
            p90_us: Some(st.p90_us),
            p99_us: Some(st.p99_us),
            server_rss_bytes: Some(b.proc.rss()?),
            errors: st.errors,
            note: st
                .first_error
                .map(|e| format!("first error: {e}"))
                .unwrap_or_default(),
            ..Row::default()
        });
    }
    for a in &agents {
        a.close();
    }
    drop(agents);
    drop(b);
    Ok(rows)
}
