//! Workloads 1 to 3: echo round trips through one broker (QUIC, TLS/TCP, and
//! MCP `tools/call` through `/mcp` over HTTPS),
//! across two meshed brokers, through a hub between two spokes, and through
//! nats-server with TLS. All systems are started once and measured in turn
//! for every repetition of every case, so each ratio compares runs that were
//! made side by side.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fem_agent_sdk::{AgentBuilder, Client, Options, Tool, Transport, Trust};
use fem_proto::{
    AgentId, CallRule, CapabilityPattern, ErrorCode, Grant, IdPattern, Role, SignedGrant,
    SigningKey, Target,
};
use futures::StreamExt as _;

use crate::agentproc::{AgentHost, FemAgent, HostSpec, NatsResponder};
use crate::crypto::{self, CryptoOps, Floor};
use crate::load::{self, Caller, Endpoint, RunStats, median};
use crate::procs::{BrokerProc, NatsProc, RoleCpu, RoleCpuUs, broker_url, host_ip};
use crate::report::{self, Row};
use crate::{Settings, Workload};

/// One system under test with its callers.
struct System {
    workload: Workload,
    name: &'static str,
    /// Brokers a call crosses (0 for NATS).
    brokers_on_path: u32,
    /// Server processes (CPU and RSS are summed over them).
    pids: Vec<u32>,
    to: Endpoint,
}

/// Everything kept alive while the systems are measured.
#[derive(Default)]
struct Running {
    brokers: Vec<BrokerProc>,
    nats: Option<NatsProc>,
    /// The agent side (echo agents, NATS responder), in its own process.
    spec: HostSpec,
    host: Option<AgentHost>,
    systems: Vec<System>,
}

impl Running {
    /// Adds a FEM system: `caller` calling `agent` (connected later, in the
    /// agent process) across `brokers_on_path` brokers whose processes are `pids`.
    fn add_fem(
        &mut self,
        workload: Workload,
        name: &'static str,
        brokers_on_path: u32,
        pids: Vec<u32>,
        caller: Client,
        agent: FemAgent,
    ) -> anyhow::Result<()> {
        self.systems.push(System {
            workload,
            name,
            brokers_on_path,
            pids,
            to: Endpoint::Fem {
                client: caller,
                target: Target::Agent(AgentId::new(agent.id.as_str())?),
                attested: name.ends_with("+attested"),
            },
        });
        self.spec.fem.push(agent);
        Ok(())
    }
}

/// Registrations in flight at once when a workload connects many agents:
/// enough to keep a broker busy, few enough that the client side is not
/// what limits the rate.
pub(crate) const CONNECTING_AT_ONCE: usize = 256;

/// Connects `n` agents of this process offering `tool`, [`CONNECTING_AT_ONCE`]
/// at a time; agent `k` gets the id, capability and options `spec(k)` gives.
/// Returns each `k` with its outcome, in the order they finished.
pub(crate) async fn connect_agents(
    n: usize,
    tool: &Tool,
    spec: impl Fn(usize) -> (String, String, Options),
) -> Vec<(usize, anyhow::Result<Client>)> {
    futures::stream::iter(0..n)
        .map(|k| {
            let (id, capability, opts) = spec(k);
            let tool = tool.clone();
            async move {
                let r = async {
                    Ok(AgentBuilder::new(AgentId::new(id)?, SigningKey::generate())
                        .capability(&capability)?
                        .tool(tool)
                        .connect(opts)
                        .await?)
                }
                .await;
                (k, r)
            }
        })
        .buffer_unordered(CONNECTING_AT_ONCE)
        .collect()
        .await
}

/// An echo agent of the agent process, on the broker at `b`.
pub(crate) fn agent_spec(id: &str, b: &BrokerProc, transport: Transport) -> FemAgent {
    FemAgent {
        id: id.to_owned(),
        capability: "bench.echo".to_owned(),
        broker: format!("https://{}", b.addr),
        quic: transport == Transport::Quic,
        seed: None,
        grant: None,
        trust_anchors: Vec::new(),
    }
}

/// The echo tool: returns its parameters. It accepts broker-attested
/// calls, so the `+attested` cases can call it unsigned; signed calls to it
/// stay signed end to end.
pub(crate) fn echo_tool() -> anyhow::Result<Tool> {
    Ok(Tool::new(
        "echo",
        "Returns its parameters",
        serde_json::json!({"type": "object"}),
        |req| async move { Ok(req.params) },
    )?
    .accept_attested())
}

/// Options for a broker of this run (trusting the bench CA), over `transport`.
pub(crate) fn options(
    s: &Settings,
    b: &BrokerProc,
    transport: Transport,
) -> anyhow::Result<Options> {
    Ok(Options::new(&format!("https://{}", b.addr))?
        .trust(Trust::CaFile(s.ca.pem.clone()))
        .transport(transport))
}

/// Connects an echo agent `id` with `capability` that serves up to 256
/// calls at once.
pub(crate) async fn echo_agent(
    id: &str,
    capability: &str,
    opts: Options,
) -> anyhow::Result<Client> {
    echo_agent_with_key(id, SigningKey::generate(), capability, opts).await
}

/// [`echo_agent`] with `key` (one a grant names).
pub(crate) async fn echo_agent_with_key(
    id: &str,
    key: SigningKey,
    capability: &str,
    opts: Options,
) -> anyhow::Result<Client> {
    AgentBuilder::new(AgentId::new(id)?, key)
        .capability(capability)?
        .tool(echo_tool()?)
        .max_concurrent(256)
        .connect(opts)
        .await
        .with_context(|| format!("echo agent {id}"))
}

/// Connects a caller.
pub(crate) async fn caller(id: &str, opts: Options) -> anyhow::Result<Client> {
    Client::connect(AgentId::new(id)?, SigningKey::generate(), opts)
        .await
        .with_context(|| format!("caller {id}"))
}

/// Waits until `target` answers a call from `c` (routes may take a moment to
/// reach the caller's broker).
pub(crate) async fn until_routable(
    c: &Client,
    agent: &str,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let target = Target::Agent(AgentId::new(agent)?);
    loop {
        match c
            .call_with_timeout(
                target.clone(),
                "echo",
                serde_json::json!({}),
                Duration::from_secs(5),
            )
            .await
        {
            Ok(_) => return Ok(t.elapsed()),
            Err(e) if e.code == ErrorCode::NoRoute && t.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => bail!("{agent} not routable after {:?}: {e}", t.elapsed()),
        }
    }
}

async fn start_fem(s: &Settings, run: &mut Running) -> anyhow::Result<()> {
    let dir = s.work.join("single");
    let mut a = BrokerProc::start(&s.broker_bin, host_ip(s.net, 2), &dir, &s.ca, &[]).await?;
    a.wait_ready(Duration::from_secs(60)).await?;
    let caller_q = caller("caller-quic", options(s, &a, Transport::Quic)?).await?;
    let caller_t = caller("caller-tcp", options(s, &a, Transport::Tcp)?).await?;
    let caller_qa = caller("caller-quic-att", options(s, &a, Transport::Quic)?).await?;
    let caller_ta = caller("caller-tcp-att", options(s, &a, Transport::Tcp)?).await?;
    let pids = vec![a.proc.pid()];
    // The MCP row calls echo-quic (its per-agent MCP name) through /mcp:
    // the same agent and parameters as the quic row, entering over HTTPS.
    let mcp = crate::mcp::McpClient::new(a.addr, &s.ca.pem, "echo-quic__echo")?;
    run.add_fem(
        Workload::Single,
        "quic",
        1,
        pids.clone(),
        caller_q,
        agent_spec("echo-quic", &a, Transport::Quic),
    )?;
    run.add_fem(
        Workload::Single,
        "tls-tcp",
        1,
        pids.clone(),
        caller_t,
        agent_spec("echo-tcp", &a, Transport::Tcp),
    )?;
    // Session-authenticated: the same echo, called unsigned and answered
    // unsigned, with no signature work on the path.
    run.add_fem(
        Workload::Single,
        "quic+attested",
        1,
        pids.clone(),
        caller_qa,
        agent_spec("echo-quic-att", &a, Transport::Quic),
    )?;
    run.add_fem(
        Workload::Single,
        "tls-tcp+attested",
        1,
        pids.clone(),
        caller_ta,
        agent_spec("echo-tcp-att", &a, Transport::Tcp),
    )?;
    run.systems.push(System {
        workload: Workload::Single,
        name: "mcp-https",
        brokers_on_path: 1,
        pids,
        to: Endpoint::Mcp(mcp),
    });
    run.brokers.push(a);
    start_trusted(s, run).await
}

/// A grant from `op` for `key`: register `id`, offer the echo capability and
/// tool, call `echo` anywhere.
fn bench_grant(op: &SigningKey, key: &SigningKey, id: &str) -> anyhow::Result<SignedGrant> {
    let now = fem_proto::now_ms();
    Ok(Grant {
        version: 1,
        id: fem_proto::RequestId::random().0,
        subject: key.public_key(),
        role: Role::Agent,
        issued_ms: now,
        expires_ms: now + 24 * 3_600_000,
        register: vec![IdPattern::new(id)?],
        offer: vec![
            CapabilityPattern::new("bench.*")?,
            CapabilityPattern::new("echo")?,
        ],
        offer_ids: Vec::new(),
        call: vec![CallRule::parse("echo")?],
        deny: Vec::new(),
        rate: None,
        operator: false,
        delegate: false,
    }
    .sign(op, None)?)
}

/// The same QUIC case on a broker with a trust anchor: the agent and the
/// caller hold grants, the broker checks the caller's grant at entry and the
/// agent checks it again end to end (its SDK has the anchor too).
async fn start_trusted(s: &Settings, run: &mut Running) -> anyhow::Result<()> {
    let dir = s.work.join("single-trust");
    std::fs::create_dir_all(&dir)?;
    let op = SigningKey::generate();
    let anchor = dir.join("operator.pub");
    std::fs::write(&anchor, format!("{}\n", op.public_key()))?;
    let extra = ["--trust-anchor".to_owned(), anchor.display().to_string()];
    let mut b = BrokerProc::start(
        &s.broker_bin,
        host_ip(s.net, 9),
        &dir.join("broker"),
        &s.ca,
        &extra,
    )
    .await?;
    b.wait_ready(Duration::from_secs(60)).await?;
    let (ak, ck) = (SigningKey::generate(), SigningKey::generate());
    let agent = FemAgent {
        seed: Some(ak.seed()),
        grant: Some(bench_grant(&op, &ak, "echo-trust")?),
        trust_anchors: vec![op.public_key()],
        ..agent_spec("echo-trust", &b, Transport::Quic)
    };
    let caller = Client::connect(
        AgentId::new("caller-trust")?,
        ck.clone(),
        options(s, &b, Transport::Quic)?.grant(bench_grant(&op, &ck, "caller-trust")?),
    )
    .await
    .context("caller with a grant")?;
    run.add_fem(
        Workload::Single,
        "quic+trust",
        1,
        vec![b.proc.pid()],
        caller,
        agent,
    )?;
    run.brokers.push(b);
    Ok(())
}

/// Starts brokers at hosts `ns` (their certificates issued by the bench CA,
/// which they also trust for links); `args(i)` gives broker i's federation flags.
pub(crate) async fn start_cluster(
    s: &Settings,
    name: &str,
    ns: &[u8],
    args: impl Fn(usize) -> Vec<String>,
) -> anyhow::Result<Vec<BrokerProc>> {
    let mut out = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        let dir = s.work.join(format!("{name}-{i}"));
        let mut a = args(i);
        a.extend(["--ca".to_owned(), s.ca.pem.display().to_string()]);
        out.push(BrokerProc::start(&s.broker_bin, host_ip(s.net, *n), &dir, &s.ca, &a).await?);
    }
    for b in &mut out {
        b.wait_ready(Duration::from_secs(120)).await?;
    }
    Ok(out)
}

/// Two brokers at hosts `ns` meshed together, with `extra` flags on both.
async fn mesh_of_two(
    s: &Settings,
    name: &str,
    ns: [u8; 2],
    extra: &[&str],
) -> anyhow::Result<Vec<BrokerProc>> {
    let urls = ns.map(|n| broker_url(host_ip(s.net, n)));
    start_cluster(s, name, &ns, |i| {
        let mut a: Vec<String> = vec![
            "--federation-mode".into(),
            "mesh".into(),
            "--peer".into(),
            urls[1 - i].clone(),
        ];
        a.extend(extra.iter().map(|x| (*x).to_owned()));
        a
    })
    .await
}

async fn start_federated(s: &Settings, run: &mut Running) -> anyhow::Result<()> {
    let mesh = mesh_of_two(s, "mesh2", [3, 4], &[]).await?;
    add_federated(s, run, &["mesh2", "mesh2+attested"], mesh, 2).await?;
    // The same path with the relaying brokers verifying signatures too
    // (defence in depth; signed calls only: attested ones carry none).
    let verifying = mesh_of_two(s, "mesh2-verify", [10, 11], &["--verify-relayed"]).await?;
    add_federated(s, run, &["mesh2+verify"], verifying, 2).await?;

    let hub_url = broker_url(host_ip(s.net, 5));
    let star = start_cluster(s, "hub", &[5, 6, 7], |i| {
        if i == 0 {
            vec!["--federation-mode".into(), "hub".into()]
        } else {
            vec![
                "--federation-mode".into(),
                "spoke".into(),
                "--federation-hub".into(),
                hub_url.clone(),
            ]
        }
    })
    .await?;
    // Caller on one spoke, agent on the other: the call crosses the hub.
    let [hub, a, b] =
        <[BrokerProc; 3]>::try_from(star).map_err(|_| anyhow::anyhow!("expected three brokers"))?;
    add_federated(s, run, &["hub", "hub+attested"], vec![a, b, hub], 3).await
}

/// Adds the cases `names` (broker-attested where the name ends in
/// `+attested`) across `brokers`: the caller on the first broker, the echo
/// agent on the second, the call crossing `brokers_on_path` brokers.
async fn add_federated(
    s: &Settings,
    run: &mut Running,
    names: &[&'static str],
    brokers: Vec<BrokerProc>,
    brokers_on_path: u32,
) -> anyhow::Result<()> {
    for &name in names {
        // Ids allow no `+`.
        let id = name.replace('+', "-");
        let agent = agent_spec(&format!("echo-{id}"), &brokers[1], Transport::Quic);
        let c = caller(
            &format!("caller-{id}"),
            options(s, &brokers[0], Transport::Quic)?,
        )
        .await?;
        let pids = brokers.iter().map(|b| b.proc.pid()).collect();
        run.add_fem(Workload::Federated, name, brokers_on_path, pids, c, agent)?;
    }
    run.brokers.extend(brokers);
    Ok(())
}

async fn start_nats(s: &Settings, run: &mut Running) -> anyhow::Result<()> {
    let nats = NatsProc::start(&s.nats_bin, host_ip(s.net, 8), &s.work.join("nats"), &s.ca).await?;
    let requester = nats.connect().await.context("NATS requester")?;
    // A queue-group responder echoing every request, as a NATS service
    // would, in the agent process.
    run.spec.nats.push(NatsResponder {
        url: nats.url.clone(),
        subject: "bench.echo".into(),
    });
    run.systems.push(System {
        workload: Workload::Nats,
        name: "nats-tls",
        brokers_on_path: 0,
        pids: vec![nats.proc.pid()],
        to: Endpoint::Nats {
            client: requester,
            subject: "bench.echo".into(),
        },
    });
    run.nats = Some(nats);
    Ok(())
}

/// Starts the agent process with every system's agents and responders, and
/// waits until each FEM caller reaches its agent.
async fn start_agents(s: &Settings, run: &mut Running) -> anyhow::Result<()> {
    run.spec.ca = s.ca.pem.clone();
    run.host = Some(AgentHost::start(&run.spec, &s.work.join("agents")).await?);
    for sys in &run.systems {
        if let Endpoint::Fem {
            client,
            target: Target::Agent(id),
            ..
        } = &sys.to
        {
            until_routable(client, id.as_str(), Duration::from_secs(30)).await?;
        }
    }
    Ok(())
}

struct Measured {
    stats: RunStats,
    /// CPU per call of each role (`total()`: of every process involved).
    per_role: RoleCpuUs,
    /// CPU per call over the signatures' cost measured in the same repetition.
    vs_floor: Option<f64>,
    rss: u64,
}

async fn measure(
    s: &Settings,
    sys: &System,
    agent_pid: Option<u32>,
    payload: usize,
    conc: usize,
) -> anyhow::Result<Measured> {
    let caller = Caller::new(sys.to.clone(), payload);
    // The CPU window covers warm-up too; calls in it are counted the same way.
    let before = RoleCpu::read(&sys.pids, agent_pid)?;
    let t0 = Instant::now();
    let stats = load::run(&caller, conc, s.warmup, s.duration).await;
    let wall = t0.elapsed();
    let used = RoleCpu::read(&sys.pids, agent_pid)?.since(&before);
    // Scale the CPU of the whole window down to the measured part.
    let share = s.duration.as_secs_f64() / wall.as_secs_f64();
    let per_role = used.us_per(stats.calls, share);
    let mut rss = 0;
    for p in &sys.pids {
        rss += crate::procs::rss_of(*p)?;
    }
    Ok(Measured {
        stats,
        per_role,
        vs_floor: None,
        rss,
    })
}

/// Runs the selected call workloads. With FEM systems, the signatures' cost
/// is measured again in every repetition (added to `floors`, per payload)
/// and each run's CPU per call is compared with it.
pub(crate) async fn run(
    s: &Settings,
    floors: &mut BTreeMap<usize, Vec<Floor>>,
) -> anyhow::Result<Vec<Row>> {
    let mut run = Running::default();
    if s.selected(Workload::Single) {
        start_fem(s, &mut run)
            .await
            .context("starting the single-broker systems")?;
    }
    if s.selected(Workload::Federated) {
        start_federated(s, &mut run)
            .await
            .context("starting the federated systems")?;
    }
    if s.selected(Workload::Nats) {
        start_nats(s, &mut run)
            .await
            .context("starting nats-server")?;
    }
    start_agents(s, &mut run)
        .await
        .context("starting the agent process")?;
    let agent_pid = run.host.as_ref().map(AgentHost::pid);
    let mut rows = Vec::new();
    for &payload in &s.payloads {
        for &conc in &s.concurrency {
            let mut per_sys: Vec<Vec<Measured>> =
                (0..run.systems.len()).map(|_| Vec::new()).collect();
            let fem = run.systems.iter().any(|x| x.brokers_on_path > 0);
            for _ in 0..s.repeat {
                let floor = if fem {
                    let f = crypto::measure(payload, 3, Duration::from_millis(30))?;
                    floors.entry(payload).or_default().push(f);
                    Some(f)
                } else {
                    None
                };
                for (i, sys) in run.systems.iter().enumerate() {
                    let mut m = measure(s, sys, agent_pid, payload, conc).await?;
                    // Attested calls do no signature work: no floor to compare with.
                    let signed = !matches!(sys.to, Endpoint::Fem { attested: true, .. });
                    if sys.brokers_on_path > 0 && signed {
                        m.vs_floor = floor.map(|f| {
                            m.per_role.total() / f.call_us(CryptoOps::for_path(sys.brokers_on_path))
                        });
                    }
                    eprintln!(
                        "  {:<9} {:<10} {payload:>5}B c={conc:<3} {:>9.0} calls/s  p50 {:>7.0} us  p99 {:>7.0} us  cpu {:>6.1} us/call (server {:.1}, callers {:.1}, agent {:.1}){}",
                        sys.workload.name(),
                        sys.name,
                        m.stats.calls_per_sec,
                        m.stats.p50_us,
                        m.stats.p99_us,
                        m.per_role.total(),
                        m.per_role.server,
                        m.per_role.caller,
                        m.per_role.agent,
                        m.stats
                            .first_error
                            .as_ref()
                            .map(|e| format!("  errors {} ({e})", m.stats.errors))
                            .unwrap_or_default()
                    );
                    per_sys[i].push(m);
                }
            }
            let mut case_rows: Vec<Row> = run
                .systems
                .iter()
                .zip(&per_sys)
                .map(|(sys, ms)| {
                    let med = |f: &dyn Fn(&Measured) -> f64| {
                        median(&ms.iter().map(f).collect::<Vec<_>>())
                    };
                    let cpu = med(&|m| m.per_role.total());
                    let vs_floor: Vec<f64> = ms.iter().filter_map(|m| m.vs_floor).collect();
                    Row {
                        workload: sys.workload.name().into(),
                        case: format!("{} {} c={conc}", sys.name, size_name(payload)),
                        runs: ms.len(),
                        calls_per_sec: Some(med(&|m| m.stats.calls_per_sec)),
                        p50_us: Some(med(&|m| m.stats.p50_us)),
                        p90_us: Some(med(&|m| m.stats.p90_us)),
                        p99_us: Some(med(&|m| m.stats.p99_us)),
                        cpu_us_per_call: Some(cpu),
                        server_cpu_us_per_call: Some(med(&|m| m.per_role.server)),
                        caller_cpu_us_per_call: Some(med(&|m| m.per_role.caller)),
                        agent_cpu_us_per_call: Some(med(&|m| m.per_role.agent)),
                        server_rss_bytes: ms.last().map(|m| m.rss),
                        errors: ms.iter().map(|m| m.stats.errors).sum(),
                        vs_crypto_floor: (!vs_floor.is_empty()).then(|| median(&vs_floor)),
                        note: ms
                            .iter()
                            .find_map(|m| m.stats.first_error.clone())
                            .map(|e| format!("first error: {e}"))
                            .unwrap_or_default(),
                        ..Row::default()
                    }
                })
                .collect();
            report::compare_to_nats(&mut case_rows, |r| r.workload == Workload::Nats.name());
            rows.extend(case_rows);
        }
    }
    for b in &mut run.brokers {
        b.proc.check_alive()?;
    }
    if let Some(h) = &mut run.host {
        h.check_alive()?;
    }
    Ok(rows)
}

/// `256B`, `16KiB`.
pub(crate) fn size_name(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}KiB", n / 1024)
    } else {
        format!("{n}B")
    }
}
