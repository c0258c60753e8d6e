//! A caller: asks the mesh for any agent with capability `echo`, calls its
//! `echo` tool and prints the answer.
//!
//! ```text
//! cargo run -p fem-agent-sdk --example caller -- \
//!     --broker https://localhost:8443 --ca DATA_DIR/tls/ca.pem
//! ```
//!
//! Options as for `echo_agent` (FEM_BROKER_URL, FEM_CA, FEM_AGENT_ID, FEM_KEY).

mod common;

use fem_agent_sdk::Client;
use fem_agent_sdk::proto::{CapabilityPattern, Target};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::Args::parse()?;
    let (id, key) = args.identity("caller")?;
    let caller = Client::connect(id, key, args.options()?).await?;
    let target = Target::Capability(CapabilityPattern::new("echo")?);
    let params = serde_json::json!({"hello": "mesh"});
    let answer = caller.call(target, "echo", params).await;
    caller.shutdown().await;
    println!("{}", answer?);
    Ok(())
}
