//! The official MCP conformance suite (npm `@modelcontextprotocol/conformance`,
//! `server` mode) against broker B's `/mcp`, with the reference server
//! `@modelcontextprotocol/server-everything` and the suite's own tools
//! (tests/conformance_tools.py) each bridged into the mesh by fem-mcp-bridge
//! behind broker A, so the tool scenarios reach their tools through the
//! federation. Hosts 345 and 346.
//!
//! The suite, Node 22 and server-everything are installed by .ci/run
//! (.ci/install-mcp-conformance) into `FEM_MCP_CONFORMANCE_DIR` (default
//! `target/mcp-conformance`). Without them the test fails under CI and is
//! skipped, with a line saying so, elsewhere.
//!
//! Every scenario's outcome is printed; the scenarios that apply to a
//! gateway of tools must pass. docs/mcp.md lists each outcome and why the
//! others do not apply.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fem_tests::host;
use serde_json::Value;

use crate::bounded;
use crate::mcp::until_listed;

/// Scenarios a gateway of tools must pass (see docs/mcp.md).
const MUST_PASS: &[&str] = &[
    "server-initialize",
    "ping",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-error",
    "server-sse-multiple-streams",
    "tools-call-with-progress",
];

/// The suite's tools, offered under their own names (one FEM segment each,
/// so `/mcp` lists them unchanged).
const CONFORMANCE_TOOLS: &[&str] = &[
    "test_simple_text",
    "test_image_content",
    "test_audio_content",
    "test_embedded_resource",
    "test_multiple_content_types",
    "test_error_handling",
    "test_tool_with_logging",
    "test_tool_with_progress",
    "json_schema_2020_12_tool",
];

fn install_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("FEM_MCP_CONFORMANCE_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/mcp-conformance"),
        PathBuf::from,
    );
    dir.join("node_modules/.bin/node").exists().then_some(dir)
}

/// Each scenario's outcome from the suite's result directories: passed when
/// no check failed.
fn outcomes(results: &Path) -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(results).unwrap().map(Result::unwrap) {
        let dir = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = dir.strip_prefix("server-") else {
            continue;
        };
        // server-<scenario>-<timestamp like 2026-01-01T00-00-00-000Z>
        let scenario = rest.rsplitn(7, '-').last().unwrap_or(rest).to_owned();
        let text = std::fs::read_to_string(e.path().join("checks.json")).unwrap_or_default();
        let checks: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| c["status"] == "FAILURE")
            .map(|c| format!("{}: {}", c["id"], c["errorMessage"]))
            .collect();
        out.push((scenario, failed.is_empty(), failed.join("; ")));
    }
    out.sort();
    out
}

#[tokio::test]
async fn the_mcp_conformance_suite_against_a_gateway_of_the_federation() {
    let Some(dir) = install_dir() else {
        let msg = "MCP conformance suite not installed: run .ci/install-mcp-conformance";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    };
    bounded(300, async {
        // B: development trust (no principal, no token: the suite sends
        // none) and the plain loopback listener.
        let plain = SocketAddr::new(host(346).ip(), 9346);
        let plain_s = plain.to_string();
        let envs = [("FEM_MCP_LISTEN", plain_s.as_str())];
        let (_brokers, [a, _b], ca_dir, _dirs) =
            fem_tests::meshed_pair(345, &envs, Duration::from_secs(20)).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        let keys = tempfile::tempdir().unwrap();
        let node = dir.join("node_modules/.bin/node");
        let node = node.to_str().unwrap();
        let everything =
            dir.join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
        let _everything = fem_tests::mcp_bridge_proc(
            "everything-345",
            a,
            &ca,
            keys.path(),
            &["--capability", "everything"],
            &[node, everything.to_str().unwrap()],
        );
        let renames: Vec<String> = CONFORMANCE_TOOLS
            .iter()
            .flat_map(|t| ["--tool-name".to_owned(), format!("{t}={t}")])
            .collect();
        let mut args: Vec<&str> = renames.iter().map(String::as_str).collect();
        args.extend(["--capability", "conformance"]);
        let tools_py = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance_tools.py");
        let _tools = fem_tests::mcp_bridge_proc(
            "conformance-345",
            a,
            &ca,
            keys.path(),
            &args,
            &["python3", tools_py],
        );

        // Both servers' tools listed at B.
        let url = format!("http://{plain}/mcp");
        until_listed(
            &["--url", &url, "--mode", "legacy"],
            &["everything_echo", "test_simple_text"],
            Duration::from_secs(60),
        )
        .await;

        let results = tempfile::tempdir().unwrap();
        let suite = dir.join("node_modules/@modelcontextprotocol/conformance/dist/index.js");
        let out = tokio::time::timeout(
            Duration::from_secs(180),
            tokio::process::Command::new(node)
                .arg(&suite)
                .args(["server", "--url", &url, "-o"])
                .arg(results.path())
                .current_dir(results.path())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the conformance suite finished within 180 s")
        .expect("node runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout.rsplit("=== SUMMARY ===").next().unwrap_or("");
        eprintln!("conformance suite summary:{summary}");

        let outcomes = outcomes(results.path());
        for (s, passed, why) in &outcomes {
            let mark = if *passed { "PASS" } else { "FAIL" };
            eprintln!("{mark} {s} {why}");
        }
        for s in MUST_PASS {
            let o = outcomes.iter().find(|(n, _, _)| n == s);
            assert!(
                o.is_some_and(|(_, passed, _)| *passed),
                "scenario {s} must pass at a gateway: {o:?}\n{stdout}"
            );
        }
    })
    .await;
}
