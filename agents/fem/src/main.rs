//! `fem`: call tools, list tools, serve MCP over stdio, manage keys and check
//! signatures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fem_agent_sdk::cli::{ConnectArgs, LogArgs};
use fem_agent_sdk::{CallError, Client, keys};
use fem_proto::{AgentId, CapabilityPattern, SignedEnvelope, SigningKey, Target};

mod https;
mod mcp;
mod trust;

/// Command-line client for a FEM mesh.
#[derive(Debug, Parser)]
#[command(name = "fem", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, clap::Args)]
struct Identity {
    /// Caller id (default: `fem-cli-` and 12 hex digits of the key).
    #[arg(long = "id", env = "FEM_CLIENT_ID")]
    id: Option<String>,
    /// Private key file (default: a fresh key for this run).
    #[arg(long = "key", env = "FEM_KEY_FILE")]
    key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Generate an Ed25519 key pair: OUT (0600, the secret) and OUT.pub (stem.pub).
    Keygen {
        /// Private key file to create.
        #[arg(long, default_value = "agent.key")]
        out: PathBuf,
    },
    /// Call a tool and print its result JSON on stdout.
    Call {
        #[command(flatten)]
        conn: ConnectArgs,
        #[command(flatten)]
        me: Identity,
        /// Target agent id.
        #[arg(
            long,
            conflicts_with = "capability",
            required_unless_present = "capability"
        )]
        agent: Option<String>,
        /// Target capability pattern (e.g. shell.run or shell.*).
        #[arg(long)]
        capability: Option<String>,
        /// Tool name.
        #[arg(long)]
        tool: String,
        /// Parameters as JSON.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Deadline.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Send the call unsigned, for the broker to attest (only tools
        /// that accept broker-attested calls take it).
        #[arg(long)]
        attested: bool,
    },
    /// List tools in the mesh (optionally by capability pattern).
    Tools {
        #[command(flatten)]
        conn: ConnectArgs,
        #[command(flatten)]
        me: Identity,
        /// Capability pattern filter.
        #[arg(long)]
        capability: Option<String>,
        /// Maximum number of tools.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Verify a signed envelope (JSON form) against a public key file.
    VerifySignature {
        /// Signed envelope JSON ({"format", "bytes", "signature"}).
        #[arg(long)]
        envelope: PathBuf,
        /// Public key file (64 hex digits).
        #[arg(long)]
        pubkey: PathBuf,
    },
    /// Operator views (agents, routes, peers) as JSON: a request signed with an
    /// operator grant (--key with --grant), or the broker's bearer token.
    Views {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Which view.
        #[arg(value_enum)]
        view: ViewArg,
        /// The key of the operator grant given with --grant.
        #[arg(long, env = "FEM_KEY_FILE", conflicts_with = "token_file")]
        key: Option<PathBuf>,
        /// File holding the broker's bearer token (--admin-token-file).
        #[arg(long, env = "FEM_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Run a stdio MCP server that forwards to a broker's /mcp (for desktop
    /// clients that launch stdio servers).
    Mcp(mcp::McpArgs),
    /// Operator keys and grants: init, issuer, grant, show.
    #[command(subcommand)]
    Trust(trust::TrustCmd),
    /// Sign an envelope given in JSON form (prints the signed envelope JSON).
    Sign {
        /// Envelope JSON ({"header": ..., "body": ...}).
        #[arg(long)]
        envelope: PathBuf,
        /// Private key file.
        #[arg(long)]
        key: PathBuf,
    },
}

/// An operator view.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ViewArg {
    /// Registered agents (`/v1/agents`).
    Agents,
    /// The routing table (`/v1/routes`).
    Routes,
    /// Federation peers (`/v1/peers`).
    Peers,
}

/// Exit status for a call refused or failed in the mesh.
const EXIT_CALL_FAILED: u8 = 2;

fn identity(me: &Identity) -> anyhow::Result<(AgentId, SigningKey)> {
    let key = match &me.key {
        Some(p) => keys::load_key(p)?,
        None => SigningKey::generate(),
    };
    let id = match &me.id {
        Some(id) => AgentId::new(id.as_str())?,
        None => AgentId::new(format!(
            "fem-cli-{}",
            &hex::encode(key.public_key().0)[..12]
        ))?,
    };
    Ok((id, key))
}

fn pub_path(out: &Path) -> PathBuf {
    out.with_extension("pub")
}

fn print_call_error(e: &CallError) -> ExitCode {
    let origin = format!("{:?}", e.origin).to_lowercase();
    eprintln!(
        "{}",
        serde_json::json!({"error": {"code": e.code.as_str(), "message": e.message, "origin": origin}})
    );
    ExitCode::from(EXIT_CALL_FAILED)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Keygen { out } => {
            let key = SigningKey::generate();
            keys::save_key(&out, &key)?;
            let p = pub_path(&out);
            keys::save_public_key(&p, &key.public_key())?;
            println!(
                "{}",
                serde_json::json!({"key": out, "public_key_file": p, "public_key": key.public_key().to_string()})
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Call {
            conn,
            me,
            agent,
            capability,
            tool,
            args,
            timeout,
            attested,
        } => {
            let params: serde_json::Value = serde_json::from_str(&args)
                .map_err(|e| anyhow::anyhow!("--args is not valid JSON: {e}"))?;
            let target = match (agent, capability) {
                (Some(a), _) => Target::Agent(AgentId::new(a)?),
                (None, Some(c)) => Target::Capability(CapabilityPattern::new(c)?),
                (None, None) => anyhow::bail!("give --agent or --capability"),
            };
            let (id, key) = identity(&me)?;
            let opts = conn.options()?.call_timeout(timeout);
            let client = Client::connect(id, key, opts).await?;
            let r = if attested {
                client.call_attested(target, &tool, params, timeout).await
            } else {
                client.call(target, &tool, params).await
            };
            client.shutdown().await;
            match r {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(print_call_error(&e)),
            }
        }
        Cmd::Tools {
            conn,
            me,
            capability,
            limit,
        } => {
            let pattern = capability.map(CapabilityPattern::new).transpose()?;
            let (id, key) = identity(&me)?;
            let client = Client::connect(id, key, conn.options()?).await?;
            let r = client.discover(pattern, limit).await;
            client.shutdown().await;
            match r {
                Ok(tools) => {
                    println!("{}", serde_json::to_string_pretty(&tools)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(print_call_error(&e)),
            }
        }
        Cmd::VerifySignature { envelope, pubkey } => {
            let text = std::fs::read_to_string(&envelope)
                .map_err(|e| anyhow::anyhow!("{}: {e}", envelope.display()))?;
            let signed: SignedEnvelope = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a signed envelope: {e}", envelope.display())
            })?;
            let key = keys::load_public_key(&pubkey)?;
            match signed.verify(&key) {
                Ok(env) => {
                    println!(
                        "{}",
                        serde_json::json!({"valid": true, "type": env.kind().as_str(), "sender": env.header.sender, "envelope": env})
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!(
                        "{}",
                        serde_json::json!({"valid": false, "error": e.to_string(), "code": e.code().as_str()})
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::Views {
            conn,
            view,
            key,
            token_file,
        } => {
            let path = match view {
                ViewArg::Agents => "/v1/agents",
                ViewArg::Routes => "/v1/routes",
                ViewArg::Peers => "/v1/peers",
            };
            let mut headers = Vec::new();
            if let Some(t) = token_file {
                let token = std::fs::read_to_string(&t)
                    .with_context(|| format!("--token-file {}", t.display()))?;
                headers.push(("Authorization", format!("Bearer {}", token.trim())));
            } else {
                let (Some(key), Some(grant)) = (key, &conn.grant) else {
                    anyhow::bail!("give --key and --grant (an operator grant), or --token-file");
                };
                let key = keys::load_key(&key)?;
                let grant = trust::read_grant(grant)?;
                let sig = fem_proto::http_sig::HttpSignature::sign(&key, "GET", path, b"");
                headers.push((fem_proto::http_sig::SIGNATURE_HEADER, sig.to_header()));
                headers.push((fem_proto::http_sig::GRANT_HEADER, grant.to_text()?));
            }
            let (status, body) = https::request(&conn, "GET", path, &headers, "").await?;
            if status == 200 {
                println!("{body}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("broker answered {status}: {body}");
                Ok(ExitCode::from(EXIT_CALL_FAILED))
            }
        }
        Cmd::Mcp(args) => Ok(mcp::run(args).await?),
        Cmd::Trust(cmd) => {
            trust::run(cmd).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sign { envelope, key } => {
            let text = std::fs::read_to_string(&envelope)
                .map_err(|e| anyhow::anyhow!("{}: {e}", envelope.display()))?;
            let env: fem_proto::Envelope = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not an envelope: {e}", envelope.display()))?;
            let signed = SignedEnvelope::sign(&env, &keys::load_key(&key)?)?;
            println!("{}", serde_json::to_string_pretty(&signed)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init("warn");
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
