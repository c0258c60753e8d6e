//! A test agent for the process-level fault test: capability `exec.fault`,
//! one tool `exec.count` that records each execution durably, then sleeps.
//!
//! ```text
//! fem-fault-agent --broker URL --ca CA.pem --id ID --key KEY --log EXEC.log [--max-concurrent N]
//! ```
//!
//! Each execution appends one line `REQUEST_ID CALLER TAG` to the log with a
//! single write(2) on a file opened O_APPEND, before the handler sleeps
//! `sleep_ms` and answers `{"tag", "agent", "request"}`. A line is written
//! as soon as the call starts, so a call cut short by SIGKILL is still
//! counted as executed; what write(2) returned survives SIGKILL (it is in
//! the page cache), so no fsync is needed for this test.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use fem_agent_sdk::proto::{AgentId, ErrorCode};
use fem_agent_sdk::{AgentBuilder, Options, Tool, ToolError, Trust, keys};
use serde_json::json;

struct Args {
    broker: String,
    ca: PathBuf,
    id: String,
    key: PathBuf,
    log: PathBuf,
    max_concurrent: usize,
}

fn args() -> anyhow::Result<Args> {
    let (mut broker, mut ca, mut id, mut key, mut log) = (None, None, None, None, None);
    let mut max_concurrent = 16;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--broker" => broker = Some(v),
            "--ca" => ca = Some(v.into()),
            "--id" => id = Some(v),
            "--key" => key = Some(v.into()),
            "--log" => log = Some(v.into()),
            "--max-concurrent" => max_concurrent = v.parse()?,
            _ => bail!("unknown option {flag}"),
        }
    }
    Ok(Args {
        broker: broker.context("--broker")?,
        ca: ca.context("--ca")?,
        id: id.context("--id")?,
        key: key.context("--key")?,
        log: log.context("--log")?,
        max_concurrent,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let id = AgentId::new(a.id.as_str())?;
    let key = keys::load_or_generate_key(&a.key)?;
    let log = Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)
            .with_context(|| format!("open {}", a.log.display()))?,
    );
    let me = a.id.clone();
    let tool = Tool::new(
        "exec.count",
        "Records the execution, sleeps sleep_ms, answers with the tag",
        json!({"type": "object", "required": ["tag"]}),
        move |req| {
            let (log, me) = (Arc::clone(&log), me.clone());
            async move {
                let tag = req.params["tag"].as_str().unwrap_or("-").to_owned();
                let line = format!("{} {} {tag}\n", req.request_id, req.caller);
                // One write(2) of one line on an O_APPEND file.
                (&*log).write_all(line.as_bytes()).map_err(|e| {
                    ToolError::new(ErrorCode::Internal, format!("execution log: {e}"))
                })?;
                let ms = req.params["sleep_ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!({"tag": tag, "agent": me, "request": req.request_id.to_string()}))
            }
        },
    )?;
    let opts = Options::new(&a.broker)?
        .trust(Trust::CaFile(a.ca))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .heartbeat(Duration::from_millis(500));
    let agent = AgentBuilder::new(id, key)
        .capability("exec.fault")?
        .tool(tool)
        .max_concurrent(a.max_concurrent)
        .connect(opts)
        .await?;
    println!("fem-fault-agent registered as {}", agent.id());
    tokio::signal::ctrl_c().await?;
    agent.shutdown().await;
    Ok(())
}
