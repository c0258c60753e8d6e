//! fem-mcp-bridge over a real MCP server (`mcp-server-time` from PyPI, run as
//! `python3 -m mcp_server_time`), behind broker A of two meshed broker
//! processes; calls enter at broker B through the `fem` CLI:
//! - the server's `get_current_time` answers through the mesh;
//! - after its child is killed, calls are answered AGENT_UNAVAILABLE by the
//!   still registered agent, and succeed again once the child is restarted;
//! - stopping the bridge leaves no child behind.
//!
//! And over a small MCP server written with the `mcp` Python SDK (installed
//! with mcp-server-time) whose tool list grows at run time:
//! - a tool added after `notifications/tools/list_changed` becomes callable
//!   through the mesh (embodimentUpdate);
//! - two MCP tools with one FEM name stop the bridge with an error naming
//!   them, unless `--tool-name` separates them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fem_tests::{Proc, log_field};
use serde_json::Value;
use serde_json::json;

use crate::bounded;

const AGENT: &str = "mcp-time-240";
const TOOL: &str = "time.get_current_time";

/// An MCP server (stdio) offering `add_tool(name)`, which adds a tool
/// `name` answering its own name and announces the changed list; the
/// arguments name tools to offer from the start.
const GROWING_SERVER: &str = r#"
import sys
from mcp.server.mcpserver import Context, MCPServer

app = MCPServer("growing")


def answer(name):
    def tool() -> str:
        return name
    return tool


for n in sys.argv[1:]:
    app.add_tool(answer(n), name=n, description=f"answers {n}")


@app.tool()
async def add_tool(name: str, ctx: Context) -> str:
    """Adds a tool called NAME and announces the changed list."""
    app.add_tool(answer(name), name=name, description=f"answers {name}")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


app.run()
"#;

fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success())
}

/// `fem call` through the broker at `entry`, with a 20 s CLI deadline;
/// (exit code, stdout, stderr).
async fn call_tool(
    entry: SocketAddr,
    ca: &Path,
    agent: &str,
    tool: &str,
    args: &Value,
) -> (i32, String, String) {
    fem_tests::fem_call(entry, ca, agent, tool, args, "20s").await
}

/// `get_current_time` of the time server in UTC.
async fn call(entry: SocketAddr, ca: &Path) -> (i32, String, String) {
    call_tool(entry, ca, AGENT, TOOL, &json!({"timezone": "UTC"})).await
}

/// Calls until one succeeds (routes take a moment to cross the mesh);
/// returns its result.
async fn call_until_ok(entry: SocketAddr, ca: &Path, within: Duration) -> Value {
    call_tool_until_ok(entry, ca, AGENT, TOOL, &json!({"timezone": "UTC"}), within).await
}

async fn call_tool_until_ok(
    entry: SocketAddr,
    ca: &Path,
    agent: &str,
    tool: &str,
    args: &Value,
    within: Duration,
) -> Value {
    let end = tokio::time::Instant::now() + within;
    loop {
        let (code, out, err) = call_tool(entry, ca, agent, tool, args).await;
        if code == 0 {
            return serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("result is not JSON ({e}): {out}"));
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no successful call within {within:?}; last: {code} {out} {err}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The time server's answer: JSON text with the zone and an ISO date time.
fn assert_time_answer(v: &Value) {
    let v = match v {
        Value::String(s) => serde_json::from_str(s)
            .unwrap_or_else(|e| panic!("text answer is not the server's JSON ({e}): {s}")),
        other => other.clone(),
    };
    assert_eq!(v["timezone"], "UTC", "{v}");
    let dt = v["datetime"].as_str().unwrap_or_default();
    assert!(dt.len() >= 19 && dt.as_bytes()[10] == b'T', "{v}");
}

fn pid_alive(pid: u32) -> bool {
    // A zombie has exited; only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn mcp_bridge_relays_through_the_mesh_and_survives_its_child_dying() {
    bounded(180, async {
        assert!(
            python_has("mcp_server_time"),
            "this test needs the MCP server mcp-server-time: pip install mcp-server-time"
        );
        let (_brokers, [a, b], ca_dir, _dirs) =
            fem_tests::meshed_pair(240, &[], Duration::from_secs(20)).await;
        let ca = ca_dir.path().join("tls/ca.pem");

        let keys = tempfile::tempdir().unwrap();
        let mut bridge = fem_tests::mcp_bridge_proc(
            AGENT,
            a,
            &ca,
            keys.path(),
            &[
                "--capability",
                "time",
                // A long first restart delay: the test calls while the child is down.
                "--restart-backoff-initial",
                "4s",
                "--restart-backoff-max",
                "8s",
                "--call-timeout",
                "15s",
            ],
            &[
                "python3",
                "-m",
                "mcp_server_time",
                "--local-timezone",
                "UTC",
            ],
        );
        let started = bridge
            .wait_for("MCP server started", Duration::from_secs(60))
            .await;
        let pid: u32 = log_field(&started, "pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {started:?}"));
        bridge
            .wait_for("fem-mcp-bridge registered", Duration::from_secs(30))
            .await;

        // A real answer, through B.
        let v = call_until_ok(b, &ca, Duration::from_secs(30)).await;
        assert_time_answer(&v);

        // The child dies: the agent stays registered and says so.
        assert!(pid_alive(pid), "the MCP child {pid} is not running");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        bridge
            .wait_for("MCP server exited", Duration::from_secs(10))
            .await;
        let (code, out, err) = call(b, &ca).await;
        assert_eq!(code, 2, "call while the child is down: {out} {err}");
        assert!(
            err.contains("AGENT_UNAVAILABLE"),
            "call while the child is down: {err}"
        );

        // Restarted: calls succeed again, served by a new child.
        let restarted = bridge
            .wait_for("MCP server restarted", Duration::from_secs(60))
            .await;
        let new_pid: u32 = log_field(&restarted, "pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {restarted:?}"));
        assert_ne!(new_pid, pid);
        let v = call_until_ok(b, &ca, Duration::from_secs(30)).await;
        assert_time_answer(&v);

        // Stopping the bridge takes its child along.
        bridge.signal("TERM");
        assert!(
            bridge.wait_exit(Duration::from_secs(15)).await.is_some(),
            "the bridge did not exit on SIGTERM:\n{}",
            bridge.output()
        );
        let gone = fem_tests::eventually(Duration::from_secs(10), || !pid_alive(new_pid)).await;
        assert!(gone, "the MCP child {new_pid} outlived the bridge");
    })
    .await;
}

/// `fem-mcp-bridge` over the growing server, registered at `broker`.
fn growing_bridge(
    broker: SocketAddr,
    ca: &Path,
    dir: &Path,
    agent: &str,
    extra: &[&str],
    initial_tools: &[&str],
) -> Proc {
    let script = dir.join("growing.py");
    std::fs::write(&script, GROWING_SERVER).unwrap();
    let mut args = vec!["--capability", "grow"];
    args.extend_from_slice(extra);
    let mut command = vec!["python3", script.to_str().unwrap()];
    command.extend_from_slice(initial_tools);
    fem_tests::mcp_bridge_proc(agent, broker, ca, dir, &args, &command)
}

#[tokio::test]
async fn mcp_bridge_follows_a_changed_tool_list_and_refuses_colliding_names() {
    bounded(180, async {
        assert!(
            python_has("mcp.server.mcpserver"),
            "this test needs the mcp Python SDK 2.x: pip install mcp-server-time"
        );
        let (_brokers, [a, b], ca_dir, _dirs) =
            fem_tests::meshed_pair(242, &[], Duration::from_secs(20)).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        let work = tempfile::tempdir().unwrap();

        // Two MCP names, one FEM name: refused at start, with the fix named.
        let mut refused = growing_bridge(
            a,
            &ca,
            work.path(),
            "grow-243",
            &[],
            &["Get-Time", "get-time"],
        );
        let st = refused
            .wait_exit(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| {
                panic!("the bridge ran with colliding names:\n{}", refused.output())
            });
        assert!(!st.success());
        let out = refused.output();
        assert!(
            out.contains("grow.get-time") && out.contains("--tool-name get-time="),
            "{out}"
        );

        // With an override both are offered; a tool added later is too.
        let mut bridge = growing_bridge(
            a,
            &ca,
            work.path(),
            "grow-242",
            &["--tool-name", "get-time=grow.lower"],
            &["Get-Time", "get-time"],
        );
        bridge
            .wait_for("fem-mcp-bridge registered", Duration::from_secs(60))
            .await;
        let v = call_tool_until_ok(
            b,
            &ca,
            "grow-242",
            "grow.lower",
            &json!({}),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(v, json!({"result": "get-time"}));
        let v = call_tool_until_ok(
            b,
            &ca,
            "grow-242",
            "grow.get-time",
            &json!({}),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(v, json!({"result": "Get-Time"}));

        let (code, out, err) = call_tool(b, &ca, "grow-242", "grow.hello_there", &json!({})).await;
        assert_eq!(code, 2, "{out} {err}");
        // Not offered yet (over federation the entry broker says NO_ROUTE).
        assert!(
            err.contains("TOOL_NOT_FOUND") || err.contains("NO_ROUTE"),
            "{err}"
        );
        let v = call_tool_until_ok(
            b,
            &ca,
            "grow-242",
            "grow.add_tool",
            &json!({"name": "Hello.There"}),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(v, json!({"result": "added Hello.There"}));
        bridge
            .wait_for("agent tools updated", Duration::from_secs(20))
            .await;
        let v = call_tool_until_ok(
            b,
            &ca,
            "grow-242",
            "grow.hello_there",
            &json!({}),
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(v, json!({"result": "Hello.There"}));
    })
    .await;
}

/// `--accept-attested time.get_current_time`: `fem call --attested` reaches
/// the wrapped server's tool through a broker, while the server's other
/// tool still refuses the same unsigned call.
#[tokio::test]
async fn mcp_bridge_takes_attested_calls_on_the_tools_named() {
    bounded(120, async {
        assert!(
            python_has("mcp_server_time"),
            "this test needs the MCP server mcp-server-time: pip install mcp-server-time"
        );
        let broker = fem_tests::BrokerProcess::start(fem_tests::host(376), &[], &[]).await;
        let ca = PathBuf::from(broker.ca());
        let keys = tempfile::tempdir().unwrap();
        let mut bridge = fem_tests::mcp_bridge_proc(
            "mcp-time-376",
            broker.addr,
            &ca,
            keys.path(),
            &[
                "--capability",
                "time",
                "--accept-attested",
                "time.get_current_time",
            ],
            &[
                "python3",
                "-m",
                "mcp_server_time",
                "--local-timezone",
                "UTC",
            ],
        );
        bridge
            .wait_for("fem-mcp-bridge registered", Duration::from_secs(60))
            .await;
        let attested = |tool: &'static str, args: Value| {
            let ca = ca.clone();
            let addr = broker.addr;
            async move {
                fem_tests::fem_call_with(
                    addr,
                    &ca,
                    "mcp-time-376",
                    tool,
                    &args,
                    "30s",
                    &["--attested"],
                )
                .await
            }
        };
        let (code, out, err) = attested(TOOL, json!({"timezone": "UTC"})).await;
        assert_eq!(code, 0, "{out}{err}");
        assert_time_answer(&serde_json::from_str(&out).unwrap());
        let (code, out, err) = attested(
            "time.convert_time",
            json!({"source_timezone": "UTC", "time": "12:00", "target_timezone": "UTC"}),
        )
        .await;
        assert_ne!(code, 0, "{out}");
        assert!(err.contains("does not accept broker-attested"), "{err}");
    })
    .await;
}
