//! Cancellation and progress across a federation, with real broker and
//! agent processes: a caller that gives up (drops its call, is killed, or
//! its MCP client hangs up) stops the process the call started behind
//! another broker and frees the agent's slot; progress an agent reports
//! reaches a native caller and an MCP client through two brokers.
//! Hosts 360 to 369.

use std::time::Duration;

use fem_agent_sdk::{AgentBuilder, Tool};
use fem_proto::{AgentId, SigningKey, Target};
use fem_tests::{Proc, eventually, metric, options_for};
use serde_json::{Value, json};

use crate::bounded;
use crate::mcp::{TOKEN, coder, mcp_client, mcp_config};

/// True while a process whose command line contains `marker` runs.
fn running(marker: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(marker)
        })
    })
}

/// `shell.run` arguments that sleep long enough to be cancelled; the
/// duration is the marker that finds the process in /proc.
fn sleeper(marker: &str) -> Value {
    json!({"argv": ["sh", "-c", format!("sleep {marker}")]})
}

/// A tool `steps.run` that reports `n` steps of progress, 150 ms apart,
/// then answers `{"steps": n}`.
fn stepper() -> Tool {
    Tool::new(
        "steps.run",
        "Reports progress for each of n steps",
        json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
        |req| async move {
            let n = req.params["n"].as_u64().unwrap_or(3);
            for i in 1..=n {
                tokio::time::sleep(Duration::from_millis(150)).await;
                #[allow(clippy::cast_precision_loss)]
                req.progress
                    .report(i as f64, Some(n as f64), Some(format!("step {i} of {n}")));
            }
            Ok(json!({"steps": n}))
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_caller_that_gives_up_stops_the_work_behind_another_broker() {
    bounded(240, async {
        let conf = tempfile::tempdir().unwrap();
        let config = mcp_config(conf.path(), "");
        let envs = [("FEM_CONFIG", config.as_str())];
        let (_brokers, [a, b], ca_dir, _dirs) =
            fem_tests::meshed_pair(360, &envs, Duration::from_secs(20)).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        let work = tempfile::tempdir().unwrap();
        let _coder = coder("coder-360", a, &ca, work.path()).await;
        let client = fem_tests::caller("caller-360", options_for(b, &ca)).await;
        let coder_id = Target::Agent(AgentId::new("coder-360").unwrap());
        // Routes converge: a quick call through B reaches fem-coder behind A.
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = client
                .call(coder_id.clone(), "shell.run", json!({"argv": ["true"]}))
                .await;
            if r.is_ok() {
                break;
            }
            assert!(tokio::time::Instant::now() < end, "no route: {r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // 1. The caller drops its call once the process runs: the process
        //    is killed (it would otherwise sleep 19 s holding a slot).
        let marker = "19.3601";
        let call = client.call_with_timeout(
            coder_id.clone(),
            "shell.run",
            sleeper(marker),
            Duration::from_secs(30),
        );
        tokio::select! {
            r = call => panic!("the sleeping call answered: {r:?}"),
            () = async { while !running(marker) { tokio::time::sleep(Duration::from_millis(50)).await } } => {}
        }
        assert!(
            eventually(Duration::from_secs(10), || !running(marker)).await,
            "the process of the cancelled call still runs"
        );
        let cancelled = "fem_broker_tool_calls_total{outcome=\"CANCELLED\"}";
        assert!(metric(b, &ca, cancelled).await >= 1.0, "B counted no cancel");
        assert!(
            metric(a, &ca, cancelled).await >= 1.0,
            "A never heard of the cancel"
        );

        // 2. A `fem call` process killed while it waits: its session closes,
        //    its call is cancelled, the process behind A is killed.
        let marker = "19.3602";
        let (url, ca_s) = (format!("https://{b}"), ca.to_str().unwrap().to_owned());
        let args = sleeper(marker).to_string();
        let mut cli = Proc::spawn(
            "fem",
            &[
                "call", "--broker", &url, "--ca", &ca_s, "--agent", "coder-360", "--tool",
                "shell.run", "--timeout", "30s", "--args", &args,
            ],
            &[],
        );
        assert!(
            eventually(Duration::from_secs(20), || running(marker)).await,
            "the CLI's call never started:\n{}",
            cli.output()
        );
        cli.kill();
        assert!(
            eventually(Duration::from_secs(10), || !running(marker)).await,
            "the process of a killed caller's call still runs"
        );

        // 3. An MCP client that hangs up (raw HTTP over TLS, closed before
        //    the answer): the call is cancelled in the mesh.
        let marker = "19.3603";
        let body = json!({
            "jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "shell_run", "arguments": sleeper(marker)},
        })
        .to_string();
        let auth = format!("Bearer {TOKEN}");
        let request = format!(
            "POST /mcp HTTP/1.1\r\nHost: {b}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut tls = fem_tests::tls_connect(b, &ca, b"http/1.1").await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tls, request.as_bytes())
            .await
            .unwrap();
        assert!(
            eventually(Duration::from_secs(20), || running(marker)).await,
            "the MCP call never started"
        );
        drop(tls);
        assert!(
            eventually(Duration::from_secs(10), || !running(marker)).await,
            "the process of a call whose MCP client hung up still runs"
        );

        // Every slot is free again: a call goes through at once.
        let r = client
            .call_with_timeout(
                coder_id,
                "shell.run",
                json!({"argv": ["echo", "after"]}),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(r["stdout"], "after\n", "{r}");
    })
    .await;
}

#[tokio::test]
async fn progress_reaches_native_and_mcp_callers_through_two_brokers() {
    bounded(180, async {
        let conf = tempfile::tempdir().unwrap();
        let config = mcp_config(conf.path(), "");
        let envs = [("FEM_CONFIG", config.as_str())];
        let (_brokers, [a, b], ca_dir, _dirs) =
            fem_tests::meshed_pair(362, &envs, Duration::from_secs(20)).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        let _agent =
            AgentBuilder::new(AgentId::new("stepper-362").unwrap(), SigningKey::generate())
                .capability("steps.run")
                .unwrap()
                .tool(stepper())
                .connect(options_for(a, &ca))
                .await
                .unwrap();
        let client = fem_tests::caller("caller-362", options_for(b, &ca)).await;
        let target = Target::Agent(AgentId::new("stepper-362").unwrap());
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        loop {
            let r = client
                .call_with_progress(
                    target.clone(),
                    "steps.run",
                    json!({"n": 4}),
                    Duration::from_secs(20),
                    tx.clone(),
                )
                .await;
            if let Ok(v) = r {
                assert_eq!(v["steps"], 4, "{v}");
                break;
            }
            assert!(tokio::time::Instant::now() < end, "no route: {r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut seen = Vec::new();
        while let Ok(u) = rx.try_recv() {
            seen.push(u);
        }
        let steps: Vec<f64> = seen.iter().map(|u| u.progress).collect();
        assert_eq!(steps, [1.0, 2.0, 3.0, 4.0], "{seen:?}");
        assert!(seen.iter().all(|u| u.total == Some(4.0)), "{seen:?}");
        assert_eq!(seen[3].message.as_deref(), Some("step 4 of 4"));

        // The MCP Python SDK's progress callback, through /mcp on B.
        let url = format!("https://{b}/mcp");
        let v = mcp_client(&[
            "--url",
            &url,
            "--ca",
            ca.to_str().unwrap(),
            "--token",
            TOKEN,
            "--call",
            "steps_run",
            "--arguments",
            r#"{"n": 3}"#,
            "--progress",
        ])
        .await;
        assert_eq!(v["call"]["isError"], false, "{v}");
        let progress = v["progress"].as_array().unwrap_or_else(|| panic!("{v}"));
        let steps: Vec<f64> = progress
            .iter()
            .map(|p| p["progress"].as_f64().unwrap())
            .collect();
        assert_eq!(steps, [1.0, 2.0, 3.0], "{v}");
        assert_eq!(progress[2]["message"], "step 3 of 3", "{v}");
    })
    .await;
}
