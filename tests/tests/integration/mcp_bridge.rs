//! fem-mcp-bridge over a real MCP server (`mcp-server-time` from PyPI, run as
//! `python3 -m mcp_server_time`), behind broker A of two meshed broker
//! processes; calls enter at broker B through the `fem` CLI:
//! - the server's `get_current_time` answers through the mesh;
//! - after its child is killed, calls are answered AGENT_UNAVAILABLE by the
//!   still registered agent, and succeed again once the child is restarted;
//! - stopping the bridge leaves no child behind.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fem_tests::{Proc, host, https_get, log_field, run_fem};
use serde_json::Value;

use crate::bounded;

const AGENT: &str = "mcp-time-240";
const TOOL: &str = "time.get_current_time";

async fn ready_within(addr: SocketAddr, ca: &Path, within: Duration) -> bool {
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if https_get(addr, ca, "/ready").await.0 == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `fem call` through the broker at `entry`; (exit code, stdout, stderr).
async fn call(entry: SocketAddr, ca: &Path) -> (i32, String, String) {
    let url = format!("https://{entry}");
    run_fem(&[
        "call",
        "--broker",
        &url,
        "--ca",
        ca.to_str().unwrap(),
        "--agent",
        AGENT,
        "--tool",
        TOOL,
        "--timeout",
        "20s",
        "--args",
        r#"{"timezone":"UTC"}"#,
    ])
    .await
}

/// Calls until one succeeds (routes take a moment to cross the mesh);
/// returns its result.
async fn call_until_ok(entry: SocketAddr, ca: &Path, within: Duration) -> Value {
    let end = tokio::time::Instant::now() + within;
    loop {
        let (code, out, err) = call(entry, ca).await;
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
        let have = std::process::Command::new("python3")
            .args(["-c", "import mcp_server_time"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            have,
            "this test needs the MCP server mcp-server-time: pip install mcp-server-time"
        );
        let (a, b) = (host(240), host(241));
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [&da, &db] {
            fem_tests::seed_ca(ca_dir.path(), d.path());
        }
        let (to_b, to_a) = ([b], [a]);
        let (pa, pb) = tokio::join!(
            fem_tests::mesh_broker_proc(a, da.path(), &ca, &to_b, "2s"),
            fem_tests::mesh_broker_proc(b, db.path(), &ca, &to_a, "2s")
        );
        for x in [a, b] {
            assert!(
                ready_within(x, &ca, Duration::from_secs(20)).await,
                "{x} not ready:\n{}\n{}",
                pa.output(),
                pb.output()
            );
        }

        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("bridge.key");
        let url_a = format!("https://{a}");
        let mut bridge = Proc::spawn(
            "fem-mcp-bridge",
            &[
                "--broker",
                &url_a,
                "--ca",
                ca.to_str().unwrap(),
                "--agent",
                AGENT,
                "--key",
                key.to_str().unwrap(),
                "--capability",
                "time",
                // A long first restart delay: the test calls while the child is down.
                "--restart-backoff-initial",
                "4s",
                "--restart-backoff-max",
                "8s",
                "--call-timeout",
                "15s",
                "--",
                "python3",
                "-m",
                "mcp_server_time",
                "--local-timezone",
                "UTC",
            ],
            &[],
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
