//! The agent side in its own process, so CPU per call can be split by role:
//! the brokers (or nats-server), the callers (this process) and the agents.
//!
//! fem-bench starts itself again with the hidden `--agent-host FILE`; the
//! file lists the echo agents to connect (and the NATS responders to
//! subscribe). The child connects them all, prints `ready` on stdout, and
//! exits when its stdin closes, so it never outlives the run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use fem_agent_sdk::{Client, Options, Transport, Trust};
use fem_proto::{PublicKey, SignedGrant, SigningKey};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::calls::echo_agent_with_key;
use crate::procs::nats_connect;

/// What the agent process connects.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct HostSpec {
    /// The CA the brokers' and nats-server's certificates come from.
    pub(crate) ca: PathBuf,
    pub(crate) fem: Vec<FemAgent>,
    pub(crate) nats: Vec<NatsResponder>,
}

/// One echo agent (the `echo` tool, up to 256 calls at once).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FemAgent {
    pub(crate) id: String,
    pub(crate) capability: String,
    /// `https://IP:PORT` of its broker.
    pub(crate) broker: String,
    pub(crate) quic: bool,
    /// Its key's seed when the parent needs the key (a grant names it);
    /// otherwise a fresh key.
    pub(crate) seed: Option<[u8; 32]>,
    pub(crate) grant: Option<SignedGrant>,
    pub(crate) trust_anchors: Vec<PublicKey>,
}

/// A queue-group responder echoing every request on `subject`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct NatsResponder {
    /// `tls://IP:4222`.
    pub(crate) url: String,
    pub(crate) subject: String,
}

/// The running agent process (killed on drop).
#[derive(Debug)]
pub(crate) struct AgentHost {
    child: Child,
    /// Held open: the child exits when it closes.
    _stdin: ChildStdin,
    pid: u32,
}

impl AgentHost {
    /// Writes `spec` to `dir/agents.json`, starts this executable on it and
    /// waits until every agent is registered and every responder subscribed.
    pub(crate) async fn start(spec: &HostSpec, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("agents.json");
        std::fs::write(&file, serde_json::to_vec_pretty(spec)?)?;
        let log = dir.join("agents.log");
        let me = std::env::current_exe().context("this executable's path")?;
        let mut child = Command::new(me)
            .arg("--agent-host")
            .arg(&file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("start the agent process")?;
        let pid = child.id().context("agent process id")?;
        let stdin = child.stdin.take().context("agent process stdin")?;
        let stdout = child.stdout.take().context("agent process stdout")?;
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        let read = stdout.read_line(&mut line);
        match tokio::time::timeout(Duration::from_secs(120), read).await {
            Ok(Ok(_)) if line.trim() == "ready" => Ok(Self {
                child,
                _stdin: stdin,
                pid,
            }),
            other => {
                let _ = child.kill().await;
                bail!(
                    "the agent process did not get ready ({other:?}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            }
        }
    }

    /// Process id (for its CPU time).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails when the agent process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("the agent process exited ({status})");
        }
        Ok(())
    }
}

/// The child's side: connect everything in `file`, say `ready`, serve until
/// stdin closes.
pub(crate) async fn serve(file: &Path) -> anyhow::Result<()> {
    let spec: HostSpec = serde_json::from_slice(
        &std::fs::read(file).with_context(|| format!("read {}", file.display()))?,
    )?;
    let mut agents: Vec<Client> = Vec::new();
    for a in &spec.fem {
        let key = a
            .seed
            .map_or_else(SigningKey::generate, SigningKey::from_seed);
        let mut opts = Options::new(&a.broker)?
            .trust(Trust::CaFile(spec.ca.clone()))
            .transport(if a.quic {
                Transport::Quic
            } else {
                Transport::Tcp
            })
            .trust_anchors(a.trust_anchors.clone());
        if let Some(g) = &a.grant {
            opts = opts.grant(g.clone());
        }
        agents.push(echo_agent_with_key(&a.id, key, &a.capability, opts).await?);
    }
    let mut tasks = Vec::new();
    for r in &spec.nats {
        let client = nats_connect(async_nats::ConnectOptions::new(), &spec.ca, &r.url)
            .await
            .context("NATS responder")?;
        let mut sub = client
            .queue_subscribe(r.subject.clone(), "echo".into())
            .await
            .context("NATS subscribe")?;
        // The subscription must reach the server before the first request.
        client.flush().await.context("NATS flush")?;
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    let _ = client.publish(reply, msg.payload).await;
                }
            }
        }));
    }
    println!("ready");
    // Until the parent closes our stdin (or dies).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    for t in &tasks {
        t.abort();
    }
    for a in &agents {
        a.close();
    }
    Ok(())
}
