//! Workload 9 (only when named): one caller keeps 64 signed calls of 256 B
//! in flight through one broker (QUIC) to an echo agent in the agent
//! process, for `--soak` (10 minutes by default), sampling the broker's
//! resident memory every 10 s. Answers whether a single caller can hold the
//! broker's full rate without errors and whether the broker's memory stays
//! flat once warm (the replay-cache ceiling this replaced is in
//! BENCHMARKS.md).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fem_agent_sdk::Transport;
use fem_proto::{AgentId, Target};

use crate::agentproc::{AgentHost, HostSpec};
use crate::calls::{agent_spec, caller, options, until_routable};
use crate::load::{self, Caller, Endpoint};
use crate::procs::{BrokerProc, host_ip};
use crate::report::Row;
use crate::{Settings, Workload};

/// Host of the soak broker in the bench network.
const BROKER_HOST: u8 = 61;
/// Calls in flight.
const CONCURRENCY: usize = 64;
/// Payload of each call (JSON text of the parameters).
const PAYLOAD: usize = 256;
/// How often the broker's memory is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Memory before this is warm-up (connections, buffers, allocator).
const WARM: Duration = Duration::from_secs(60);

/// Runs the soak and returns its row.
pub(crate) async fn run(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let dir = s.work.join("soak");
    let mut b =
        BrokerProc::start(&s.broker_bin, host_ip(s.net, BROKER_HOST), &dir, &s.ca, &[]).await?;
    b.wait_ready(Duration::from_secs(60)).await?;
    let spec = HostSpec {
        ca: s.ca.pem.clone(),
        fem: vec![agent_spec("echo-soak", &b, Transport::Quic)],
        nats: Vec::new(),
    };
    let _host = AgentHost::start(&spec, &dir.join("agents")).await?;
    let c = caller("caller-soak", options(s, &b, Transport::Quic)?).await?;
    until_routable(&c, "echo-soak", Duration::from_secs(30)).await?;
    let pid = b.proc.pid();
    let samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let t0 = Instant::now();
    let sampler = {
        let samples = Arc::clone(&samples);
        tokio::spawn(async move {
            loop {
                if let Ok(rss) = crate::procs::rss_of(pid)
                    && let Ok(mut v) = samples.lock()
                {
                    let t = t0.elapsed().as_secs_f64();
                    v.push((t, rss));
                    // A line a minute, so a long soak shows where it is.
                    if v.len() % 6 == 0 {
                        eprintln!(
                            "  soak      {:.0} s: broker RSS {:.1} MiB",
                            t,
                            rss as f64 / (1024.0 * 1024.0)
                        );
                    }
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    let load = Caller::new(
        Endpoint::Fem {
            client: c.clone(),
            target: Target::Agent(AgentId::new("echo-soak")?),
            attested: false,
        },
        PAYLOAD,
    );
    let stats = load::run(&load, CONCURRENCY, Duration::ZERO, s.soak).await;
    sampler.abort();
    let end_rss = crate::procs::rss_of(pid).context("broker RSS")?;
    let mut samples = samples.lock().map(|v| v.clone()).unwrap_or_default();
    samples.push((t0.elapsed().as_secs_f64(), end_rss));
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let warm: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= WARM.as_secs_f64())
        .map(|(_, r)| *r)
        .collect();
    let first_warm = warm.first().copied().unwrap_or(end_rss);
    let (lo, hi) = (
        warm.iter().copied().min().unwrap_or(end_rss),
        warm.iter().copied().max().unwrap_or(end_rss),
    );
    eprintln!(
        "  soak      quic 256B c=64 for {:?}: {:.0} calls/s, {} errors, broker RSS after {}s {:.1} MiB, then {:.1} to {:.1} MiB, at the end {:.1} MiB",
        s.soak,
        stats.calls_per_sec,
        stats.errors,
        WARM.as_secs(),
        mib(first_warm),
        mib(lo),
        mib(hi),
        mib(end_rss)
    );
    let mut row = Row {
        workload: Workload::Soak.name().into(),
        case: format!("quic 256B c={CONCURRENCY} for {}s", s.soak.as_secs()),
        runs: 1,
        calls_per_sec: Some(stats.calls_per_sec),
        p50_us: Some(stats.p50_us),
        p90_us: Some(stats.p90_us),
        p99_us: Some(stats.p99_us),
        server_rss_bytes: Some(end_rss),
        errors: stats.errors,
        note: stats
            .first_error
            .map(|e| format!("first error: {e}"))
            .unwrap_or_default(),
        ..Row::default()
    };
    for (k, v) in [
        ("rss_after_warmup_mib", mib(first_warm)),
        ("rss_min_after_warmup_mib", mib(lo)),
        ("rss_max_after_warmup_mib", mib(hi)),
        ("rss_end_mib", mib(end_rss)),
        ("calls", stats.calls as f64),
    ] {
        row.figures.insert(k.into(), v);
    }
    Ok(vec![row])
}
