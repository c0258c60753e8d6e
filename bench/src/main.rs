//! `fem-bench`: starts its own brokers, echo agents, callers and a
//! nats-server on loopback addresses, runs the workloads, prints a table and
//! writes the same figures as JSON. See BENCHMARKS.md.
//!
//! Workloads: `single` (one broker, QUIC, TLS/TCP and MCP over HTTPS), `federated` (two meshed
//! brokers, a hub between two spokes), `nats` (nats-server with TLS,
//! async-nats requesters), `crypto` (the Ed25519 floor of one call), `scale`
//! (agents connecting and registering to one broker), `federation` (route
//! convergence and withdrawal in a mesh of brokers), `fanout` (one event
//! publisher, many subscribers, beside NATS publish/subscribe), `fedscale`
//! (a mesh of brokers with many agents each: convergence and link bytes of
//! one registration).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use fem_agent_sdk::cli::TransportArg;

mod agentproc;
mod calls;
mod crypto;
mod fanout;
mod federation;
mod fedscale;
mod load;
mod mcp;
mod procs;
mod report;
mod scale;
mod soak;
mod stubs;

use crate::procs::{BenchCa, find_program};
use crate::report::{Report, Row};

/// FEM benchmarks: tool-call latency and throughput (side by side with NATS
/// request-reply over TLS), the cryptographic floor, connection scale and
/// federation convergence.
#[derive(Debug, Parser)]
#[command(name = "fem-bench", version)]
struct Args {
    /// Workloads to run (all when none).
    #[arg(value_enum)]
    names: Vec<Workload>,
    /// A run of a couple of minutes: 1 s per measurement, one repetition, 1,000 agents.
    #[arg(long)]
    quick: bool,
    /// Measured time of one run [default: 5s, 1s with --quick].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Unmeasured warm-up before each run [default: 500ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Repetitions of each run; medians are reported [default: 3, 1 with --quick].
    #[arg(long)]
    repeat: Option<usize>,
    /// Payload sizes in bytes (JSON text of the echoed parameters) [default: 256,16384].
    #[arg(long, value_delimiter = ',')]
    payloads: Option<Vec<usize>>,
    /// Caller concurrency levels [default: 1,16,64].
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Agent counts of the scale workload [default: 1000,10000; 1000 with --quick].
    #[arg(long, value_delimiter = ',')]
    scale: Option<Vec<usize>>,
    /// Transports of the scale workload's agents.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "quic,tcp")]
    scale_transport: Vec<TransportArg>,
    /// Brokers in the federation mesh.
    #[arg(long, default_value_t = 10)]
    mesh_size: u8,
    /// Convergence rounds in the federation workload [default: 5, 2 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// The /24 of loopback addresses to use: host n is its address .n (brokers from .2).
    #[arg(long, default_value = "127.0.100.0")]
    net: Ipv4Addr,
    /// Where to write the JSON results.
    #[arg(long, default_value = "fem-bench-results.json")]
    json: PathBuf,
    /// The fem-broker binary [default: beside fem-bench, else on PATH].
    #[arg(long, env = "FEM_BENCH_BROKER")]
    broker_bin: Option<PathBuf>,
    /// The nats-server binary [default: on PATH or /usr/sbin].
    #[arg(long, env = "FEM_BENCH_NATS_SERVER")]
    nats_server: Option<PathBuf>,
    /// Subscriber counts of the fanout workload.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    subscribers: Vec<usize>,
    /// Agents per broker of the fedscale workload.
    #[arg(long, default_value_t = 1000)]
    fed_agents: usize,
    /// Length of the soak workload [default: 600s, 30s with --quick].
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Keep the working directory (broker data and logs) and print its path.
    #[arg(long)]
    keep: bool,
    /// Internal: run as the agent process of a run, on this spec file.
    #[arg(long, hide = true)]
    agent_host: Option<PathBuf>,
}

/// The workload groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum Workload {
    /// One broker, QUIC and TLS/TCP.
    Single,
    /// Two meshed brokers; a hub between two spokes.
    Federated,
    /// nats-server with TLS.
    Nats,
    /// The Ed25519 floor.
    Crypto,
    /// Agents registering to one broker.
    Scale,
    /// Convergence in a mesh of brokers.
    Federation,
    /// One event publisher, many subscribers; NATS publish/subscribe beside.
    Fanout,
    /// A mesh of brokers with many agents each.
    Fedscale,
    /// One caller at 64 in flight for `--soak`, broker memory sampled (only when named).
    Soak,
    /// A hub with full spokes, then with stub spokes, many agents each (only when named).
    Stubs,
}

impl Workload {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Federated => "federated",
            Self::Nats => "nats",
            Self::Crypto => "crypto",
            Self::Scale => "scale",
            Self::Federation => "federation",
            Self::Fanout => "fanout",
            Self::Fedscale => "fedscale",
            Self::Soak => "soak",
            Self::Stubs => "stubs",
        }
    }
}

/// Settings of a run, resolved from the arguments.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) workloads: Vec<Workload>,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) repeat: usize,
    pub(crate) payloads: Vec<usize>,
    pub(crate) concurrency: Vec<usize>,
    pub(crate) scale: Vec<usize>,
    pub(crate) scale_transports: Vec<fem_agent_sdk::Transport>,
    pub(crate) mesh_size: u8,
    pub(crate) rounds: usize,
    pub(crate) subscribers: Vec<usize>,
    pub(crate) fed_agents: usize,
    pub(crate) soak: Duration,
    pub(crate) net: Ipv4Addr,
    pub(crate) broker_bin: PathBuf,
    pub(crate) nats_bin: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) ca: BenchCa,
}

impl Settings {
    pub(crate) fn selected(&self, w: Workload) -> bool {
        self.workloads.contains(&w)
    }
}

fn settings(a: &Args, work: PathBuf) -> anyhow::Result<Settings> {
    let mut workloads = a.names.clone();
    workloads.sort_unstable();
    workloads.dedup();
    if workloads.is_empty() {
        // Everything but the soak, which takes ten minutes on its own, and
        // the stubs run, which registers twice as many agents as fedscale.
        workloads = Workload::value_variants()
            .iter()
            .copied()
            .filter(|w| !matches!(w, Workload::Soak | Workload::Stubs))
            .collect();
    }
    if !(2..=200).contains(&a.mesh_size) {
        bail!("--mesh-size must be 2 to 200");
    }
    let needs_broker = workloads
        .iter()
        .any(|w| !matches!(w, Workload::Nats | Workload::Crypto));
    let broker_bin = if needs_broker {
        find_program(a.broker_bin.as_deref(), "fem-broker")
            .context("build it first: cargo build --release --workspace --bins")?
    } else {
        PathBuf::new()
    };
    let nats_bin = if workloads.contains(&Workload::Nats) || workloads.contains(&Workload::Fanout) {
        find_program(a.nats_server.as_deref(), "nats-server").context(
            "install it (Debian: apt-get install nats-server) or leave out the nats and fanout workloads",
        )?
    } else {
        PathBuf::new()
    };
    let ca = BenchCa::new(&work.join("ca"))?;
    Ok(Settings {
        workloads,
        duration: a.duration.unwrap_or(if a.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }),
        warmup: a.warmup.unwrap_or(Duration::from_millis(500)),
        repeat: a.repeat.unwrap_or(if a.quick { 1 } else { 3 }).max(1),
        payloads: a.payloads.clone().unwrap_or_else(|| vec![256, 16 * 1024]),
        concurrency: a.concurrency.clone().unwrap_or_else(|| vec![1, 16, 64]),
        scale: a.scale.clone().unwrap_or_else(|| {
            if a.quick {
                vec![1000]
            } else {
                vec![1000, 10_000]
            }
        }),
        scale_transports: a.scale_transport.iter().map(|&t| t.into()).collect(),
        mesh_size: a.mesh_size,
        rounds: a.rounds.unwrap_or(if a.quick { 2 } else { 5 }).max(1),
        subscribers: a.subscribers.clone(),
        fed_agents: a.fed_agents,
        soak: a.soak.unwrap_or(if a.quick {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(600)
        }),
        net: a.net,
        broker_bin,
        nats_bin,
        work,
        ca,
    })
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
    {
        m.insert("cpu".into(), model.1.trim().to_owned());
    }
    m.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, usize::from)
            .to_string(),
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        m.insert("loadavg_at_start".into(), l.trim().to_owned());
    }
    m.insert(
        "build".into(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    );
    m
}

async fn run(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    // The floor is measured first, then again beside every repetition of the
    // call workloads: the machine's speed drifts, and the ratios compare
    // figures taken side by side.
    let mut floors: BTreeMap<usize, Vec<crypto::Floor>> = BTreeMap::new();
    let fem_calls = s.selected(Workload::Single) || s.selected(Workload::Federated);
    if s.selected(Workload::Crypto) || fem_calls {
        for &p in &s.payloads {
            let f = crypto::measure(p, 5, s.duration.min(Duration::from_secs(1)) / 5)?;
            floors.entry(p).or_default().push(f);
        }
    }
    let call_rows = if fem_calls || s.selected(Workload::Nats) {
        calls::run(s, &mut floors).await?
    } else {
        Vec::new()
    };
    if s.selected(Workload::Crypto) {
        rows.extend(crypto::rows(&floors));
    }
    rows.extend(call_rows);
    if s.selected(Workload::Scale) {
        for &n in &s.scale {
            for &t in &s.scale_transports {
                rows.extend(
                    scale::run(s, n, t)
                        .await
                        .with_context(|| format!("scale with {n} agents"))?,
                );
            }
        }
    }
    if s.selected(Workload::Federation) {
        rows.extend(federation::run(s).await.context("federation")?);
    }
    if s.selected(Workload::Fanout) {
        rows.extend(fanout::run(s).await.context("fanout")?);
    }
    if s.selected(Workload::Fedscale) {
        rows.extend(fedscale::run(s).await.context("fedscale")?);
    }
    if s.selected(Workload::Soak) {
        rows.extend(soak::run(s).await.context("soak")?);
    }
    if s.selected(Workload::Stubs) {
        rows.extend(stubs::run(s).await.context("stubs")?);
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match main_inner(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fem-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main_inner(args: &Args) -> anyhow::Result<()> {
    // Thousands of agents hold a socket each, in this process and the broker's.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if let Some(spec) = &args.agent_host {
        return tokio::runtime::Runtime::new()?.block_on(agentproc::serve(spec));
    }
    let work = tempfile::Builder::new().prefix("fem-bench-").tempdir()?;
    // Kept (with the broker logs) from the start when asked, so a failed run can be read.
    let (work_path, _guard) = if args.keep {
        let p = work.keep();
        eprintln!("working directory (kept): {}", p.display());
        (p, None)
    } else {
        (work.path().to_owned(), Some(work))
    };
    let s = settings(args, work_path)?;
    let machine = machine();
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let rows = rt.block_on(run(&s))?;
    drop(rt);
    let mut settings_map = BTreeMap::new();
    settings_map.insert(
        "duration".into(),
        humantime::format_duration(s.duration).to_string(),
    );
    settings_map.insert(
        "warmup".into(),
        humantime::format_duration(s.warmup).to_string(),
    );
    settings_map.insert("repeat".into(), s.repeat.to_string());
    settings_map.insert("net".into(), format!("{}/24", s.net));
    if s.selected(Workload::Fanout) {
        settings_map.insert(
            "subscribers".into(),
            s.subscribers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if s.selected(Workload::Fedscale) || s.selected(Workload::Stubs) {
        settings_map.insert("fed_agents".into(), s.fed_agents.to_string());
    }
    if s.selected(Workload::Soak) {
        settings_map.insert(
            "soak".into(),
            humantime::format_duration(s.soak).to_string(),
        );
    }
    settings_map.insert(
        "workloads".into(),
        s.workloads
            .iter()
            .map(|w| w.name())
            .collect::<Vec<_>>()
            .join(","),
    );
    settings_map.insert(
        "elapsed".into(),
        humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())).to_string(),
    );
    let report = Report {
        machine,
        settings: settings_map,
        rows,
    };
    println!("{}", report::table(&report.rows));
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("write {}", args.json.display()))?;
    println!("results written to {}", args.json.display());
    Ok(())
}
