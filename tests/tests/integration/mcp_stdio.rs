//! `fem mcp`, the stdio MCP server that forwards to a broker's `/mcp`,
//! driven by the official MCP Python SDK's stdio client
//! (tests/mcp_client.py with a command) in both protocol eras, through a view, and
//! with the broker down. Hosts 340 and 341.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use fem_tests::{bin, host};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::bounded;
use crate::mcp::{coder, mcp_client, mcp_config, names, until_listed};

/// The stdio client's arguments to run `FEM mcp FEM_ARGS` (`fem` is the
/// binary's path).
fn stdio_args<'a>(client_args: &[&'a str], fem: &'a str, fem_args: &[&'a str]) -> Vec<&'a str> {
    let mut args = client_args.to_vec();
    args.extend(["--", fem, "mcp"]);
    args.extend_from_slice(fem_args);
    args
}

/// Runs `fem mcp ARGS` with `input` on stdin (then closed); returns the
/// messages it printed, once it exited (successfully) within 30 s.
pub(crate) async fn raw(args: &[&str], input: &str) -> Vec<Value> {
    let mut child = tokio::process::Command::new(bin("fem"))
        .arg("mcp")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut answers = Vec::new();
    while let Some(l) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("fem mcp answers within 30 s")
        .unwrap()
    {
        answers.push(serde_json::from_str::<Value>(&l).expect("only JSON on stdout"));
    }
    let st = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("fem mcp exits when stdin closes")
        .unwrap();
    assert!(st.success(), "{st}");
    answers
}

#[tokio::test]
async fn fem_mcp_serves_a_brokers_tools_over_stdio_in_both_eras() {
    bounded(180, async {
        let b = host(340);
        let conf = tempfile::tempdir().unwrap();
        let config = mcp_config(conf.path(), "");
        let broker =
            fem_tests::BrokerProcess::start(b, &[], &[("FEM_CONFIG", config.as_str())]).await;
        let ca = broker.ca();
        let work = tempfile::tempdir().unwrap();
        let _coder = coder("coder-340", b, Path::new(&ca), work.path()).await;
        let url = broker.url();
        let token_file = conf.path().join("token");
        let token_file = token_file.to_str().unwrap();
        let fem_args = ["--broker", &url, "--ca", &ca, "--token-file", token_file];

        // The SDK's default: server/discover at the newest revision.
        let call = [
            "--call",
            "shell_run",
            "--arguments",
            r#"{"argv": ["echo", "stdio"]}"#,
        ];
        let fem = bin("fem");
        let fem = fem.to_str().unwrap();
        let args = stdio_args(&call, fem, &fem_args);
        let v = until_listed(&args, &["shell_run"], Duration::from_secs(30)).await;
        assert_eq!(v["protocol"], "2026-07-28", "{v}");
        for t in ["shell_run", "file_read", "code_execute"] {
            assert!(names(&v).contains(&t.to_owned()), "{t} missing: {v}");
        }
        assert_eq!(v["call"]["isError"], false, "{v}");
        let out: Value = serde_json::from_str(v["call"]["text"][0].as_str().unwrap()).unwrap();
        assert_eq!(out["stdout"], "stdio\n", "{v}");

        // The initialize handshake, through the view `files`: a tool outside
        // the view is unknown there (a JSON-RPC error, forwarded as it is).
        let mut view_args = fem_args.to_vec();
        view_args.extend(["--view", "files"]);
        let mut legacy = vec!["--mode", "legacy"];
        legacy.extend(call);
        let v = mcp_client(&stdio_args(&legacy, fem, &view_args)).await;
        assert_eq!(v["protocol"], "2025-11-25", "{v}");
        assert_eq!(names(&v), ["file_read"], "{v}");
        assert_eq!(v["call"]["error"]["code"], -32602, "{v}");

        // A wrong token: the broker's 401 is an error answer, not a crash.
        let answers = raw(
            &["--broker", &url, "--ca", &ca, "--token", "wrong"],
            concat!(r#"{"jsonrpc":"2.0","id":"a","method":"tools/list"}"#, "\n"),
        )
        .await;
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers[0]["id"], "a", "{answers:?}");
        let msg = answers[0]["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("HTTP 401"), "{answers:?}");
    })
    .await;
}

#[tokio::test]
async fn fem_mcp_answers_errors_when_the_broker_is_down() {
    bounded(60, async {
        // Nothing listens on host(341); the pin is never checked.
        let url = format!("https://{}", host(341));
        let pin = "00".repeat(32);
        let input = concat!(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{}}"#,
            "\n",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            "\n",
            "not json\n",
        );
        let answers = raw(&["--broker", &url, "--pin", &pin], input).await;
        // One answer per request and per unparsable line; none for the
        // notification.
        assert_eq!(answers.len(), 2, "{answers:?}");
        let by_id = |id: Value| answers.iter().find(|a| a["id"] == id).cloned();
        let down = by_id(7.into()).expect("an answer to request 7");
        assert_eq!(down["error"]["code"], -32000, "{down}");
        let parse = by_id(Value::Null).expect("an answer to the bad line");
        assert_eq!(parse["error"]["code"], -32700, "{parse}");
    })
    .await;
}
