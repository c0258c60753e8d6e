//! `fem-mcp-bridge`: makes an MCP server a FEM agent. Starts the server as a
//! child over stdio (or connects to a Streamable HTTP one with `--url`),
//! registers its tools, relays calls, follows its tool list, and restarts it
//! with backoff when it dies.
#![forbid(unsafe_code)]

mod bridge;
mod mcp;
mod names;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fem_agent_sdk::cli::{ConnectArgs, LogArgs};
use fem_agent_sdk::{AgentBuilder, keys};
use fem_proto::{AgentId, Capability};

use crate::bridge::{Bridge, Config};
use crate::mcp::ServerSpec;

const NAME_RULE: &str = "\
Tool names: each MCP tool is offered as CAPABILITY.NAME, where NAME is the MCP
name with ASCII letters lowercased and every character other than a-z, 0-9, _
and - replaced by _ (so `Get Time` under --capability time is `time.get_time`).
A name longer than 128 bytes is cut and ends with - and 8 hex digits of a hash
of the MCP name. --tool-name MCP=FEM gives one tool a full FEM name instead.
Two MCP tools with one FEM name are refused at start (add a --tool-name).

Results: structuredContent when present; else the text items joined by
newlines (a JSON string) when all items are text; else the content array as
MCP JSON. isError: true is TOOL_FAILED with the text; no answer by the
deadline is TIMEOUT; while the server is down (restarting) AGENT_UNAVAILABLE.

Example:
  fem-mcp-bridge --broker https://localhost:8443 --ca ca.pem --agent time-1 \\
      --capability time -- python3 -m mcp_server_time --local-timezone UTC";

/// FEM agent offering the tools of an MCP server.
#[derive(Debug, clap::Parser)]
#[command(name = "fem-mcp-bridge", version, after_help = NAME_RULE)]
struct Args {
    /// YAML file with the same settings as the flags (snake_case keys, and
    /// `command: [PROGRAM, ARG...]`); flags and FEM_* variables win over it.
    #[arg(long, env = "FEM_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    conn: ConnectArgs,
    /// Agent id (required).
    #[arg(long, env = "FEM_AGENT_ID")]
    agent: Option<String>,
    /// Private key file (created 0600 if missing) [default: ~/.local/share/fem/agents/ID.key].
    #[arg(long, env = "FEM_AGENT_KEY")]
    key: Option<PathBuf>,
    /// Streamable HTTP MCP endpoint (instead of a command).
    #[arg(long, env = "FEM_MCP_URL")]
    url: Option<String>,
    /// Capability the tools are offered under, and the prefix of their names.
    #[arg(long, env = "FEM_MCP_CAPABILITY", default_value = "mcp")]
    capability: String,
    /// FEM name for one MCP tool, replacing the name rule (repeatable).
    #[arg(long = "tool-name", value_name = "MCP=FEM")]
    tool_names: Vec<String>,
    /// Longest run time of one call (the call's own deadline may be shorter).
    #[arg(long, env = "FEM_CALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// First delay before restarting a dead MCP server; doubled after each
    /// failed start, and used again once the server stayed up 10 s.
    #[arg(long, env = "FEM_RESTART_BACKOFF_INITIAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    restart_backoff_initial: Duration,
    /// Longest delay between restarts of the MCP server.
    #[arg(long, env = "FEM_RESTART_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    restart_backoff_max: Duration,
    /// Calls relayed at once.
    #[arg(long, env = "FEM_MAX_CONCURRENT", default_value_t = 10)]
    max_concurrent: usize,
    /// FEM tool names (patterns such as `time.*`) that also take
    /// broker-attested calls: unsigned, the entry broker vouching for the
    /// caller (any broker on the path could forge them). None by default.
    #[arg(
        long = "accept-attested",
        env = "FEM_ACCEPT_ATTESTED",
        value_delimiter = ','
    )]
    accept_attested: Vec<String>,
    #[command(flatten)]
    log: LogArgs,
    /// The MCP server: PROGRAM and its arguments, after `--` (run directly,
    /// never through a shell).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// Flags and variables, then the `--config` file (every flag by its
/// snake_case name; `tool_names` as a map) for whatever they left unset.
fn parse_args() -> anyhow::Result<Args> {
    Ok(fem_agent_sdk::cli::parse_with_config(
        |a: &Args| a.config.clone(),
        |args, o| {
            o.connection(&mut args.conn)?;
            o.log(&mut args.log)?;
            o.take_opt("agent", &mut args.agent)?;
            o.take_opt("key", &mut args.key)?;
            o.take_opt("url", &mut args.url)?;
            o.take("capability", &mut args.capability)?;
            let mut names: Option<BTreeMap<String, String>> = None;
            o.take_opt("tool_names", &mut names)?;
            if let Some(m) = names {
                args.tool_names = m.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            }
            o.take_duration("call_timeout", &mut args.call_timeout)?;
            o.take_duration("restart_backoff_initial", &mut args.restart_backoff_initial)?;
            o.take_duration("restart_backoff_max", &mut args.restart_backoff_max)?;
            o.take("max_concurrent", &mut args.max_concurrent)?;
            let mut attested: Option<Vec<String>> = None;
            o.take_opt("accept_attested", &mut attested)?;
            if let Some(a) = attested {
                args.accept_attested = a;
            }
            let mut command: Option<Vec<String>> = None;
            o.take_opt("command", &mut command)?;
            if let Some(c) = command {
                args.command = c.into_iter().map(OsString::from).collect();
            }
            Ok(())
        },
    )?)
}

/// The bridge configuration from the arguments (pure: no I/O).
fn bridge_config(args: &Args) -> anyhow::Result<Config> {
    let server = match (&args.url, args.command.split_first()) {
        (Some(_), Some(_)) => anyhow::bail!("give either --url or a command after --, not both"),
        (None, None) => {
            anyhow::bail!("no MCP server: give a command after -- (or --url for an HTTP server)")
        }
        (Some(u), None) => {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                anyhow::bail!("--url {u}: expected an http:// or https:// URL");
            }
            ServerSpec::Url(u.clone())
        }
        (None, Some((program, rest))) => ServerSpec::Command {
            program: program.clone(),
            args: rest.to_vec(),
        },
    };
    let capability = Capability::new(args.capability.as_str())
        .map_err(|e| anyhow::anyhow!("--capability: {e}"))?;
    let mut overrides = BTreeMap::new();
    for spec in &args.tool_names {
        // The FEM name has no '=', so the last one separates.
        let Some((mcp, fem)) = spec.rsplit_once('=') else {
            anyhow::bail!("--tool-name {spec}: expected MCP=FEM");
        };
        let fem = Capability::new(fem).map_err(|e| anyhow::anyhow!("--tool-name {spec}: {e}"))?;
        if overrides.insert(mcp.to_owned(), fem).is_some() {
            anyhow::bail!("--tool-name {mcp}: given twice");
        }
    }
    let accept_attested = args
        .accept_attested
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            fem_proto::CapabilityPattern::new(p.as_str())
                .map_err(|e| anyhow::anyhow!("--accept-attested {p}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Config {
        server,
        capability,
        overrides,
        accept_attested,
        backoff_initial: args.restart_backoff_initial,
        backoff_max: args.restart_backoff_max.max(args.restart_backoff_initial),
        stable_after: Duration::from_secs(10),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Some(agent) = args.agent.clone() else {
        anyhow::bail!("--agent ID is required (or FEM_AGENT_ID)");
    };
    let id = AgentId::new(agent)?;
    let cfg = bridge_config(&args)?;
    let opts = args.conn.options()?;
    let key_path = args
        .key
        .clone()
        .unwrap_or_else(|| keys::default_agent_key_path(id.as_str()));
    // Its directory is created if missing.
    let key = keys::load_or_generate_key(&key_path)?;

    let (bridge, tools) = Bridge::start(cfg.clone()).await?;
    let tool_count = tools.len();
    let mut b = AgentBuilder::new(id.clone(), key.clone())
        .max_concurrent(args.max_concurrent)
        .call_timeout(args.call_timeout)
        .metadata("mcp.transport", cfg.server.transport())
        .capability(cfg.capability.as_str())?;
    for t in tools {
        b = b.tool(t);
    }
    let client = tokio::select! {
        r = fem_agent_sdk::cli::connect_retrying(b, &opts) => r?,
        () = fem_agent_sdk::cli::shutdown_signal() => {
            tracing::info!("signal received before registration; closing");
            return Ok(());
        }
    };
    tracing::info!(
        agent = %id,
        key = %key.public_key(),
        capability = %cfg.capability,
        tools = tool_count,
        pid = bridge.pid(),
        "fem-mcp-bridge registered"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(bridge.run(client.clone(), stop_rx));
    fem_agent_sdk::cli::shutdown_signal().await;
    tracing::info!("signal received; closing");
    client.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), supervisor).await;
    Ok(())
}

// One thread: rmcp runs each notification of the server in its own task, and
// only a single-threaded scheduler keeps them (progress) in order and ahead
// of the answer that follows them. A bridge is bound by its one server.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fem-mcp-bridge: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    args.log.init("info");
    // One crypto provider for every rustls user (the broker connection and
    // the HTTP MCP client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fem-mcp-bridge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser as _;

    use super::*;

    fn parse(a: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("fem-mcp-bridge").chain(a.iter().copied())).unwrap()
    }

    #[test]
    fn the_command_follows_the_double_dash_unchanged() {
        let cfg = bridge_config(&parse(&[
            "--capability",
            "time",
            "--",
            "python3",
            "-m",
            "mcp_server_time",
            "--local-timezone",
            "UTC; rm -rf /",
        ]))
        .unwrap();
        let ServerSpec::Command { program, args } = cfg.server else {
            panic!("not a command");
        };
        assert_eq!(program, "python3");
        assert_eq!(
            args,
            ["-m", "mcp_server_time", "--local-timezone", "UTC; rm -rf /"]
        );
        assert_eq!(cfg.capability.as_str(), "time");
        assert_eq!(cfg.backoff_initial, Duration::from_millis(200));
    }

    #[test]
    fn a_url_or_a_command_but_not_both_nor_neither() {
        let cfg = bridge_config(&parse(&["--url", "http://127.0.0.1:8000/mcp"])).unwrap();
        assert!(matches!(cfg.server, ServerSpec::Url(_)));
        for bad in [
            &["--url", "http://h/mcp", "--", "srv"][..],
            &[][..],
            &["--url", "ftp://h/mcp"][..],
            &["--capability", "no spaces", "--", "srv"][..],
        ] {
            assert!(bridge_config(&parse(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tool_name_overrides() {
        let cfg = bridge_config(&parse(&[
            "--tool-name",
            "Get Time=time.now",
            "--tool-name",
            "a=b=c.d",
            "--",
            "srv",
        ]))
        .unwrap();
        assert_eq!(cfg.overrides["Get Time"].as_str(), "time.now");
        assert_eq!(cfg.overrides["a=b"].as_str(), "c.d");
        for bad in [
            &["--tool-name", "x", "--", "srv"][..],
            &["--tool-name", "x=not valid", "--", "srv"][..],
            &["--tool-name", "x=a", "--tool-name", "x=b", "--", "srv"][..],
        ] {
            assert!(bridge_config(&parse(bad)).is_err(), "{bad:?}");
        }
    }
}
