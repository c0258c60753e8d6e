//! An echo agent: registers capability `echo` with one tool, `echo`, that
//! answers with its parameters, and serves until Ctrl-C.
//!
//! ```text
//! cargo run -p fem-agent-sdk --example echo_agent -- \
//!     --broker https://localhost:8443 --ca DATA_DIR/tls/ca.pem --id echo-1 --key echo-1.key
//! ```
//!
//! Options fall back to FEM_BROKER_URL, FEM_CA, FEM_AGENT_ID and FEM_KEY. A
//! broker in development trust binds an id to the first key it sees, so give
//! `--key` with `--id` to run the same agent again.

mod common;

use fem_agent_sdk::{AgentBuilder, Tool};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::Args::parse()?;
    let (id, key) = args.identity("echo")?;
    let echo = Tool::new(
        "echo",
        "Answers with its parameters",
        serde_json::json!({"type": "object"}),
        |req| async move { Ok(req.params) },
    )?;
    let agent = AgentBuilder::new(id, key)
        .capability("echo")?
        .tool(echo)
        .connect(args.options()?)
        .await?;
    println!(
        "{} registered with capability echo; Ctrl-C stops it",
        agent.id()
    );
    tokio::signal::ctrl_c().await?;
    agent.shutdown().await;
    Ok(())
}
