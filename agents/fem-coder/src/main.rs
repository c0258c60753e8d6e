//! `fem-coder`: registers code.execute, shell.run and file.read with a broker
//! and runs them inside the sandbox policy.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fem_agent_sdk::cli::{ConnectArgs, LogArgs};
use fem_agent_sdk::{AgentBuilder, AgentMetrics, Client, Tool, ToolError, keys};
use fem_coder::sandbox::isolation::{IsolationOptions, Layer, Level};
use fem_coder::sandbox::{self, Policy, PolicyOptions, SandboxError};
use fem_proto::AgentId;

/// FEM agent with sandboxed code.execute, shell.run and file.read tools.
#[derive(Debug, clap::Parser)]
#[command(name = "fem-coder", version)]
struct Args {
    /// YAML file with the same settings as the flags (snake_case keys);
    /// flags and FEM_* variables win over it.
    #[arg(long, env = "FEM_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    conn: ConnectArgs,
    /// Agent id (default: the host name).
    #[arg(long, env = "FEM_AGENT_ID")]
    agent: Option<String>,
    /// Capabilities (and tools) to offer: any of code.execute, shell.run, file.read.
    #[arg(
        long,
        env = "FEM_AGENT_CAPABILITIES",
        value_delimiter = ',',
        default_value = "code.execute,shell.run,file.read"
    )]
    capabilities: Vec<String>,
    /// Private key file (created 0600 if missing) [default: ~/.local/share/fem/agents/ID.key].
    #[arg(long, env = "FEM_AGENT_KEY")]
    key: Option<PathBuf>,
    /// Directory file.read and cwd may use (repeatable; default: the work directory).
    #[arg(long = "allow-path", env = "FEM_ALLOW_PATHS", value_delimiter = ',')]
    allow_paths: Vec<PathBuf>,
    /// Program shell.run and code.execute may start (repeatable; replaces the defaults:
    /// echo ls cat git python3 sh pwd wc head tail grep uname date env true false).
    /// Shell commands ({"command": ...}) are allowed only when sh is allowed.
    #[arg(
        long = "allow-program",
        env = "FEM_ALLOW_PROGRAMS",
        value_delimiter = ','
    )]
    allow_programs: Vec<String>,
    /// Working directory of commands (default: the current directory).
    #[arg(long, env = "FEM_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Maximum run time of one tool call.
    #[arg(long, env = "FEM_TOOL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output kept per stream (stdout, stderr), bytes.
    #[arg(long, env = "FEM_MAX_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    max_output_bytes: usize,
    /// Maximum bytes file.read returns.
    #[arg(long, env = "FEM_MAX_FILE_BYTES", default_value_t = 1024 * 1024)]
    max_file_bytes: u64,
    /// CPU seconds per child (RLIMIT_CPU).
    #[arg(long, env = "FEM_CPU_SECONDS", default_value_t = 30)]
    cpu_seconds: u64,
    /// Address space per child in bytes (RLIMIT_AS).
    #[arg(long, env = "FEM_MEMORY_BYTES", default_value_t = 1024 * 1024 * 1024)]
    memory_bytes: u64,
    /// Processes per user for the child (RLIMIT_NPROC; not enforced for root).
    #[arg(long, env = "FEM_MAX_PROCESSES", default_value_t = 256)]
    max_processes: u64,
    /// Plain-HTTP listener for /metrics, /health and /ready (e.g. :9091) [default: none].
    #[arg(long, env = "FEM_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Calls served at once.
    #[arg(long, env = "FEM_MAX_CONCURRENT", default_value_t = 10)]
    max_concurrent: usize,
    /// Refuse to start unless children get at least this isolation level
    /// (base, landlock, seccomp, namespaces; each includes the ones before).
    /// The agent always runs at the best level the machine offers.
    #[arg(long, env = "FEM_SANDBOX_MIN_LEVEL", default_value = "base")]
    sandbox_min_level: Level,
    /// Let calls ask for network access ("network": true); without it,
    /// children have no TCP or UDP at all.
    #[arg(long, env = "FEM_ALLOW_NETWORK")]
    allow_network: bool,
    /// Another path children may read and execute (repeatable), e.g. a
    /// toolchain outside /usr.
    #[arg(
        long = "sandbox-read-path",
        env = "FEM_SANDBOX_READ_PATHS",
        value_delimiter = ','
    )]
    sandbox_read_paths: Vec<PathBuf>,
    /// Isolation layers to switch off, for tests and diagnosis (landlock,
    /// seccomp, namespaces, cgroup).
    #[arg(
        long = "sandbox-disable",
        env = "FEM_SANDBOX_DISABLE",
        value_delimiter = ',',
        hide = true
    )]
    sandbox_disable: Vec<String>,
    /// Tools that take broker-attested calls: unsigned calls whose caller
    /// the entry broker vouches for (faster; any broker on the path could
    /// then forge calls to them). Off for every tool by default.
    #[arg(
        long = "accept-attested",
        env = "FEM_ACCEPT_ATTESTED",
        value_delimiter = ','
    )]
    accept_attested: Vec<String>,
    #[command(flatten)]
    log: LogArgs,
}

fn tool_error(e: SandboxError) -> ToolError {
    ToolError::new(e.code(), e.to_string())
}

fn tools(policy: &Arc<Policy>, caps: &[String], attested: &[String]) -> anyhow::Result<Vec<Tool>> {
    let mut out = Vec::new();
    for cap in caps {
        let p = Arc::clone(policy);
        let tool = match cap.as_str() {
            sandbox::SHELL_RUN => Tool::new(
                sandbox::SHELL_RUN,
                "Run a program (argv, no shell) or, where the policy allows a shell, a shell command",
                sandbox::shell_run_schema(),
                move |req| {
                    let p = Arc::clone(&p);
                    async move { sandbox::shell_run(&p, req.params).await.map_err(tool_error) }
                },
            )?,
            sandbox::CODE_EXECUTE => Tool::new(
                sandbox::CODE_EXECUTE,
                "Run a python or sh snippet in a fresh temporary directory",
                sandbox::code_execute_schema(),
                move |req| {
                    let p = Arc::clone(&p);
                    async move {
                        sandbox::code_execute(&p, req.params)
                            .await
                            .map_err(tool_error)
                    }
                },
            )?,
            sandbox::FILE_READ => Tool::new(
                sandbox::FILE_READ,
                "Read a file inside the allowed roots",
                sandbox::file_read_schema(),
                move |req| {
                    let p = Arc::clone(&p);
                    async move { sandbox::file_read(&p, req.params).await.map_err(tool_error) }
                },
            )?,
            other => anyhow::bail!(
                "unknown capability {other:?}: fem-coder offers code.execute, shell.run, file.read"
            ),
        };
        out.push(tool);
    }
    for name in attested.iter().filter(|n| !n.trim().is_empty()) {
        let Some(t) = out.iter_mut().find(|t| t.spec().name.as_str() == name) else {
            anyhow::bail!("--accept-attested {name}: not a tool this agent offers ({caps:?})");
        };
        *t = t.clone().accept_attested();
    }
    Ok(out)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let defaults = PolicyOptions::default();
    let mut disable = Vec::new();
    for name in args.sandbox_disable.iter().filter(|n| !n.trim().is_empty()) {
        disable.push(
            name.parse::<Layer>()
                .map_err(|e| anyhow::anyhow!("FEM_SANDBOX_DISABLE: {e}"))?,
        );
    }
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
    };
    let id = AgentId::new(
        args.agent
            .clone()
            .unwrap_or_else(|| fem_agent_sdk::cli::host_name("fem-coder")),
    )?;
    // A key that survives restarts: brokers bind an id to the first key that
    // registered it (development trust) or to the key its grant names. The
    // default place is used only where tool children cannot read it.
    let readable: Vec<PathBuf> = args
        .allow_paths
        .iter()
        .chain(&args.sandbox_read_paths)
        .chain(args.allow_paths.is_empty().then_some(&work_dir))
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let key_path = match &args.key {
        Some(p) => Some(p.clone()),
        None => {
            let p = keys::default_agent_key_path(id.as_str());
            let inside = readable.iter().any(|r| p.starts_with(r));
            if inside {
                tracing::warn!(
                    path = %p.display(),
                    "no --key, and the default key file would lie where tool children may read it: using a fresh key for this run (a development-trust broker will refuse this id after a restart; pass --key outside the allowed paths)"
                );
                None
            } else {
                Some(p)
            }
        }
    };
    let key = match &key_path {
        // Its directory is created if missing.
        Some(p) => keys::load_or_generate_key(p)?,
        None => fem_proto::SigningKey::generate(),
    };
    let policy = Arc::new(Policy::new(PolicyOptions {
        // Empty means "the work directory" (see PolicyOptions).
        allow_paths: args.allow_paths.clone(),
        allow_programs: if args.allow_programs.is_empty() {
            defaults.allow_programs
        } else {
            args.allow_programs.clone()
        },
        work_dir,
        timeout: args.timeout,
        max_output_bytes: args.max_output_bytes,
        max_file_bytes: args.max_file_bytes,
        cpu_seconds: args.cpu_seconds,
        memory_bytes: args.memory_bytes,
        max_processes: args.max_processes,
        isolation: IsolationOptions {
            disable,
            allow_network: args.allow_network,
            read_paths: args.sandbox_read_paths.clone(),
            // The key is created before the policy, so its inode is known.
            protected_files: key_path.iter().cloned().collect(),
        },
    })?);
    tracing::info!(policy = %policy.describe(), "sandbox policy");
    let isolation = policy.isolation();
    let level = isolation.level();
    tracing::info!(
        level = %level,
        layers = %isolation.describe(),
        network = if args.allow_network { "calls may ask" } else { "off" },
        "sandbox level"
    );
    if level < args.sandbox_min_level {
        let missing: Vec<String> = Level::ALL
            .into_iter()
            .filter(|l| *l > level && *l <= args.sandbox_min_level)
            .filter_map(Level::layer)
            .map(|l| format!("{l}: {}", isolation.why_off(l).unwrap_or("off")))
            .collect();
        anyhow::bail!(
            "refusing to start: children would run at sandbox level {level}, below \
             --sandbox-min-level {} ({})",
            args.sandbox_min_level,
            missing.join("; ")
        );
    }
    let opts = args.conn.options()?.call_timeout(args.timeout);
    let tools = tools(&policy, &args.capabilities, &args.accept_attested)?;
    let registry = prometheus::Registry::new();
    let metrics = AgentMetrics::new(&registry)?;
    register_sandbox_metrics(&registry, policy.isolation())?;
    let client_slot: Arc<std::sync::OnceLock<Client>> = Arc::default();
    if let Some(addr) = &args.metrics_listen {
        serve_metrics(addr, registry, Arc::clone(&client_slot)).await?;
    }
    let mut b = AgentBuilder::new(id.clone(), key.clone())
        .metrics(metrics)
        .max_concurrent(args.max_concurrent)
        .call_timeout(args.timeout)
        .metadata("sandbox.level", level.as_str());
    if let Some(abi) = policy.isolation().kernel_landlock_abi() {
        b = b.metadata("sandbox.landlock_abi", &abi.to_string());
    }
    for c in &args.capabilities {
        b = b.capability(c)?;
    }
    for t in tools {
        b = b.tool(t);
    }
    let client = fem_agent_sdk::cli::connect_retrying(b, &opts).await?;
    let _ = client_slot.set(client.clone());
    tracing::info!(agent = %id, key = %key.public_key(), "fem-coder registered");
    fem_agent_sdk::cli::shutdown_signal().await;
    tracing::info!("signal received; closing");
    client.shutdown().await;
    Ok(())
}

/// `fem_coder_sandbox_level` (0 base .. 3 namespaces) and
/// `fem_coder_sandbox_layer{layer}` (1 when enforced), set once at start.
fn register_sandbox_metrics(
    registry: &prometheus::Registry,
    isolation: &sandbox::isolation::Isolation,
) -> anyhow::Result<()> {
    let level = prometheus::IntGauge::new(
        "fem_coder_sandbox_level",
        "Isolation level of tool children: 0 base, 1 landlock, 2 seccomp, 3 namespaces",
    )?;
    level.set(isolation.level().rank());
    registry.register(Box::new(level))?;
    let layers = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "fem_coder_sandbox_layer",
            "1 when the isolation layer is enforced on tool children",
        ),
        &["layer"],
    )?;
    for layer in Layer::ALL {
        layers
            .with_label_values(&[layer.as_str()])
            .set(i64::from(isolation.enforces(layer)));
    }
    registry.register(Box::new(layers))?;
    Ok(())
}

/// /metrics, /health (alive) and /ready (registered with a broker) over plain HTTP.
async fn serve_metrics(
    addr: &str,
    registry: prometheus::Registry,
    client: Arc<std::sync::OnceLock<Client>>,
) -> anyhow::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    use prometheus::Encoder as _;

    let addr = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut buf = Vec::new();
                    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        buf,
                    )
                }
            }),
        )
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ready",
            get(move || {
                let connected = client.get().is_some_and(Client::is_connected);
                async move {
                    if connected {
                        (StatusCode::OK, "registered")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not registered with a broker",
                        )
                    }
                }
            }),
        );
    tracing::info!(%addr, "metrics listener (/metrics, /health, /ready)");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics listener ended");
        }
    });
    Ok(())
}

/// Flags and variables, then the `--config` file (every flag by its
/// snake_case name) for whatever they left unset.
fn parse_args() -> anyhow::Result<Args> {
    Ok(fem_agent_sdk::cli::parse_with_config(
        |a: &Args| a.config.clone(),
        |args, o| {
            o.connection(&mut args.conn)?;
            o.log(&mut args.log)?;
            o.take_opt("agent", &mut args.agent)?;
            o.take("capabilities", &mut args.capabilities)?;
            o.take_opt("key", &mut args.key)?;
            o.take("allow_paths", &mut args.allow_paths)?;
            o.take("allow_programs", &mut args.allow_programs)?;
            o.take_opt("work_dir", &mut args.work_dir)?;
            o.take_duration("timeout", &mut args.timeout)?;
            o.take("max_output_bytes", &mut args.max_output_bytes)?;
            o.take("max_file_bytes", &mut args.max_file_bytes)?;
            o.take("cpu_seconds", &mut args.cpu_seconds)?;
            o.take("memory_bytes", &mut args.memory_bytes)?;
            o.take("max_processes", &mut args.max_processes)?;
            o.take_opt("metrics_listen", &mut args.metrics_listen)?;
            o.take("max_concurrent", &mut args.max_concurrent)?;
            o.take("sandbox_min_level", &mut args.sandbox_min_level)?;
            o.take("allow_network", &mut args.allow_network)?;
            o.take("sandbox_read_paths", &mut args.sandbox_read_paths)?;
            Ok(())
        },
    )?)
}

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything holds the key: a non-dumpable process's /proc/PID/mem,
    // environ and ptrace are refused to processes of the same uid that lack
    // CAP_SYS_PTRACE (tool children have no capabilities), and it leaves no
    // core dump.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("fem-coder: error: cannot make the process non-dumpable: {e}");
        return ExitCode::FAILURE;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fem-coder: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    args.log.init("info");
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fem-coder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
