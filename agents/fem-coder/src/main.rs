//! `fem-coder`: registers code.execute, shell.run and file.read with a broker
//! and runs them inside the sandbox policy.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fem_agent_sdk::cli::{ConnectArgs, LogArgs};
use fem_agent_sdk::{AgentBuilder, AgentMetrics, Client, Tool, ToolError, keys};
use fem_coder::sandbox::{self, Policy, PolicyOptions, SandboxError};
use fem_proto::{AgentId, SigningKey};

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
    /// Private key file (created 0600 if missing). Without it a fresh key is used per run.
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
    #[command(flatten)]
    log: LogArgs,
}

fn tool_error(e: SandboxError) -> ToolError {
    ToolError::new(e.code(), e.to_string())
}

fn tools(policy: &Arc<Policy>, caps: &[String]) -> anyhow::Result<Vec<Tool>> {
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
    Ok(out)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let defaults = PolicyOptions::default();
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
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
    })?);
    tracing::info!(policy = %policy.describe(), "sandbox policy");
    let id = AgentId::new(
        args.agent
            .clone()
            .unwrap_or_else(|| fem_agent_sdk::cli::host_name("fem-coder")),
    )?;
    let key = match &args.key {
        Some(p) => keys::load_or_generate_key(p)?,
        None => SigningKey::generate(),
    };
    let opts = args.conn.options()?.call_timeout(args.timeout);
    let tools = tools(&policy, &args.capabilities)?;
    let registry = prometheus::Registry::new();
    let metrics = AgentMetrics::new(&registry)?;
    let client_slot: Arc<std::sync::OnceLock<Client>> = Arc::default();
    if let Some(addr) = &args.metrics_listen {
        serve_metrics(addr, registry, Arc::clone(&client_slot)).await?;
    }
    // Keep trying until the broker accepts us (it may start after us).
    let mut backoff = Duration::from_millis(250);
    let client = loop {
        let mut b = AgentBuilder::new(id.clone(), key.clone())
            .metrics(metrics.clone())
            .max_concurrent(args.max_concurrent)
            .call_timeout(args.timeout);
        for c in &args.capabilities {
            b = b.capability(c)?;
        }
        for t in &tools {
            b = b.tool(t.clone());
        }
        match b.connect(opts.clone()).await {
            Ok(c) => break c,
            Err(e) if e.is_config() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot register yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    let _ = client_slot.set(client.clone());
    tracing::info!(agent = %id, key = %key.public_key(), "fem-coder registered");
    fem_agent_sdk::cli::shutdown_signal().await;
    tracing::info!("signal received; closing");
    client.shutdown().await;
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

/// The `--config` file: every flag, by its snake_case name.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    broker: Option<String>,
    ca: Option<PathBuf>,
    pin: Option<String>,
    insecure: Option<bool>,
    transport: Option<fem_agent_sdk::cli::TransportArg>,
    heartbeat: Option<String>,
    agent: Option<String>,
    capabilities: Option<Vec<String>>,
    key: Option<PathBuf>,
    allow_paths: Option<Vec<PathBuf>>,
    allow_programs: Option<Vec<String>>,
    work_dir: Option<PathBuf>,
    timeout: Option<String>,
    max_output_bytes: Option<usize>,
    max_file_bytes: Option<u64>,
    cpu_seconds: Option<u64>,
    memory_bytes: Option<u64>,
    max_processes: Option<u64>,
    metrics_listen: Option<String>,
    max_concurrent: Option<usize>,
    log_level: Option<String>,
    log_format: Option<fem_agent_sdk::cli::LogFormat>,
}

/// Flags and variables, then the file for whatever they left at its default.
fn parse_args() -> anyhow::Result<Args> {
    use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches)?;
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    let f: FileConfig = serde_yaml_ng::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    let unset = |id: &str| {
        !matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let dur = |name: &str, v: &str| {
        humantime::parse_duration(v)
            .map_err(|e| anyhow::anyhow!("--config {}: {name}: {e}", path.display()))
    };
    macro_rules! take {
        ($id:literal, $field:expr, $value:expr) => {
            if unset($id) {
                if let Some(v) = $value {
                    $field = v;
                }
            }
        };
    }
    take!("broker", args.conn.broker, f.broker);
    take!("ca", args.conn.ca, f.ca.map(Some));
    take!("pin", args.conn.pin, f.pin.map(Some));
    take!("insecure", args.conn.insecure, f.insecure);
    take!("transport", args.conn.transport, f.transport);
    take!(
        "heartbeat",
        args.conn.heartbeat,
        f.heartbeat.map(|v| dur("heartbeat", &v)).transpose()?
    );
    take!("agent", args.agent, f.agent.map(Some));
    take!("capabilities", args.capabilities, f.capabilities);
    take!("key", args.key, f.key.map(Some));
    take!("allow_paths", args.allow_paths, f.allow_paths);
    take!("allow_programs", args.allow_programs, f.allow_programs);
    take!("work_dir", args.work_dir, f.work_dir.map(Some));
    take!(
        "timeout",
        args.timeout,
        f.timeout.map(|v| dur("timeout", &v)).transpose()?
    );
    take!(
        "max_output_bytes",
        args.max_output_bytes,
        f.max_output_bytes
    );
    take!("max_file_bytes", args.max_file_bytes, f.max_file_bytes);
    take!("cpu_seconds", args.cpu_seconds, f.cpu_seconds);
    take!("memory_bytes", args.memory_bytes, f.memory_bytes);
    take!("max_processes", args.max_processes, f.max_processes);
    take!(
        "metrics_listen",
        args.metrics_listen,
        f.metrics_listen.map(Some)
    );
    take!("max_concurrent", args.max_concurrent, f.max_concurrent);
    take!("log_level", args.log.log_level, f.log_level.map(Some));
    take!("log_format", args.log.log_format, f.log_format.map(Some));
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
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
