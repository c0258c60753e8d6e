//! Behaviour that is about processes: agents and brokers killed and
//! restarted, and the shipped binaries driven as a user would.

use std::time::{Duration, Instant};

use fem_proto::{AgentId, ErrorCode, Target};
use fem_tests::{BrokerProcess, Proc, caller, echo_agent, host, log_field, options_for, run_fem};
use serde_json::json;

use crate::bounded;

async fn start_coder(b: &BrokerProcess, id: &str, work: &std::path::Path, extra: &[&str]) -> Proc {
    let url = b.url();
    let ca = b.ca();
    let work = work.to_str().unwrap();
    let mut args = vec![
        "--broker",
        &url,
        "--ca",
        &ca,
        "--agent",
        id,
        "--work-dir",
        work,
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn("fem-coder", &args, &[]);
    p.wait_for("fem-coder registered", Duration::from_secs(30))
        .await;
    p
}

async fn agent_killed_mid_call(n: u16, transport: &str, broker_extra: &[&str]) {
    let b = BrokerProcess::start(host(n), broker_extra, &[]).await;
    let work = tempfile::tempdir().unwrap();
    let id = format!("victim-{n}");
    let coder = start_coder(&b, &id, work.path(), &["--transport", transport]).await;
    let c = caller(
        &format!("caller-{n}"),
        options_for(b.addr, std::path::Path::new(&b.ca())),
    )
    .await;
    let call = {
        let c = c.clone();
        let id = id.clone();
        tokio::spawn(async move {
            c.call_with_timeout(
                Target::Agent(AgentId::new(id).unwrap()),
                "shell.run",
                json!({"command": "sleep 20"}),
                Duration::from_secs(25),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    coder.signal("KILL");
    let e = call.await.unwrap().unwrap_err();
    assert_eq!(e.code, ErrorCode::AgentUnavailable, "{e}");
    eprintln!(
        "{transport}: AGENT_UNAVAILABLE {:?} after SIGKILL",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn agent_killed_mid_call_over_tcp_gives_agent_unavailable() {
    bounded(90, agent_killed_mid_call(30, "tcp", &[])).await;
}

#[tokio::test]
async fn agent_killed_mid_call_over_quic_gives_agent_unavailable() {
    // A killed QUIC peer sends nothing; the broker notices by heartbeat silence.
    bounded(
        90,
        agent_killed_mid_call(
            31,
            "quic",
            &["--heartbeat-interval", "500ms", "--heartbeat-grace", "2s"],
        ),
    )
    .await;
}

#[tokio::test]
async fn broker_restart_is_survived_by_agent_reconnection() {
    bounded(120, async {
        let addr = host(32);
        let b = BrokerProcess::start(addr, &[], &[]).await;
        let line = b.proc.output();
        let fp = log_field(&line, "fingerprint").unwrap();
        let pin = fem_agent_sdk::Trust::from_options(None, Some(&fp), false).unwrap();
        let opts = fem_agent_sdk::Options::new(&b.url())
            .unwrap()
            .trust(pin)
            .backoff(Duration::from_millis(50), Duration::from_millis(400))
            .heartbeat(Duration::from_millis(300));
        let (agent, count) = echo_agent("phoenix-32", opts.clone(), 10).await;
        let c = caller("caller-32", opts.clone()).await;
        c.call(
            Target::Agent(AgentId::new("phoenix-32").unwrap()),
            "echo",
            json!({"n": 1}),
        )
        .await
        .unwrap();

        let BrokerProcess { mut proc, dir, .. } = b;
        proc.signal("KILL");
        proc.wait_exit(Duration::from_secs(5)).await.unwrap();
        drop(proc);
        assert!(fem_tests::eventually(Duration::from_secs(10), || !agent.is_connected()).await);
        // Same data directory: same certificate, so the pin still holds.
        let b2 = BrokerProcess::start_in(addr, dir, &[], &[]).await;
        assert_eq!(log_field(&b2.proc.output(), "fingerprint").unwrap(), fp);
        assert!(
            agent.wait_connected(Duration::from_secs(20)).await,
            "agent did not re-register"
        );
        assert!(
            c.wait_connected(Duration::from_secs(20)).await,
            "caller did not reconnect"
        );
        let r = c
            .call(
                Target::Agent(AgentId::new("phoenix-32").unwrap()),
                "echo",
                json!({"n": 2}),
            )
            .await
            .unwrap();
        assert_eq!(r, json!({"n": 2}));
        assert_eq!(*count.lock().unwrap(), 2);
    })
    .await;
}

#[tokio::test]
async fn fem_coder_policy_through_the_cli() {
    bounded(120, async {
        let b = BrokerProcess::start(host(33), &[], &[]).await;
        let work = tempfile::tempdir().unwrap();
        std::fs::write(work.path().join("notes.txt"), "inside the root\n").unwrap();
        let _coder = start_coder(&b, "coder-33", work.path(), &[]).await;
        let url = b.url();
        let ca = b.ca();
        let base = ["call", "--broker", url.as_str(), "--ca", ca.as_str()];
        let fem = |rest: &[&str]| {
            let mut a: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
            a.extend(rest.iter().map(|s| (*s).to_owned()));
            async move {
                let refs: Vec<&str> = a.iter().map(String::as_str).collect();
                run_fem(&refs).await
            }
        };
        let (code, out, err) = fem(&[
            "--capability",
            "shell.*",
            "--tool",
            "shell.run",
            "--args",
            r#"{"argv":["echo","hello from fem"]}"#,
        ])
        .await;
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["stdout"], "hello from fem\n");
        assert_eq!(v["exit_code"], 0);

        let (code, out, err) = fem(&[
            "--agent",
            "coder-33",
            "--tool",
            "file.read",
            "--args",
            r#"{"path":"notes.txt"}"#,
        ])
        .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["content"],
            "inside the root\n"
        );

        let (code, _, err) = fem(&[
            "--agent",
            "coder-33",
            "--tool",
            "file.read",
            "--args",
            r#"{"path":"/etc/passwd"}"#,
        ])
        .await;
        assert_eq!(code, 2);
        assert!(
            err.contains("PERMISSION_DENIED") && err.contains("outside the allowed roots"),
            "{err}"
        );

        let (code, _, err) = fem(&[
            "--agent",
            "coder-33",
            "--tool",
            "file.read",
            "--args",
            r#"{"path":"../../../../etc/passwd"}"#,
        ])
        .await;
        assert_eq!(code, 2);
        assert!(err.contains("PERMISSION_DENIED"), "{err}");

        let (code, _, err) = fem(&[
            "--agent",
            "coder-33",
            "--tool",
            "shell.run",
            "--args",
            r#"{"argv":["rm","-rf","/"]}"#,
        ])
        .await;
        assert_eq!(code, 2);
        assert!(
            err.contains("PERMISSION_DENIED") && err.contains("rm"),
            "{err}"
        );

        let (code, out, err) = fem(&[
            "--agent",
            "coder-33",
            "--tool",
            "code.execute",
            "--args",
            r#"{"language":"sh","code":"echo $((6*7))"}"#,
        ])
        .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["stdout"],
            "42\n"
        );

        let (code, _, err) =
            fem(&["--agent", "nobody", "--tool", "shell.run", "--args", "{}"]).await;
        assert_eq!(code, 2);
        assert!(err.contains("NO_ROUTE"), "{err}");

        let (code, _, err) = fem(&[
            "--agent",
            "coder-33",
            "--tool",
            "shell.run",
            "--args",
            "not json",
        ])
        .await;
        assert_eq!(code, 1);
        assert!(err.contains("--args is not valid JSON"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn fem_coder_without_shell_refuses_commands() {
    bounded(90, async {
        let b = BrokerProcess::start(host(34), &[], &[]).await;
        let work = tempfile::tempdir().unwrap();
        let _coder = start_coder(&b, "strict-34", work.path(), &["--allow-program", "echo"]).await;
        let (code, _, err) = run_fem(&[
            "call",
            "--broker",
            &b.url(),
            "--ca",
            &b.ca(),
            "--agent",
            "strict-34",
            "--tool",
            "shell.run",
            "--args",
            r#"{"command":"echo hi; id"}"#,
        ])
        .await;
        assert_eq!(code, 2);
        assert!(
            err.contains("PERMISSION_DENIED") && err.contains("shell"),
            "{err}"
        );
        let (code, _, err) = run_fem(&[
            "call",
            "--broker",
            &b.url(),
            "--ca",
            &b.ca(),
            "--agent",
            "strict-34",
            "--tool",
            "code.execute",
            "--args",
            r#"{"language":"python","code":"print(1)"}"#,
        ])
        .await;
        assert_eq!(code, 2);
        assert!(err.contains("PERMISSION_DENIED"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn keygen_sign_and_verify_signature() {
    bounded(60, async {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("agent.key");
        let key_s = key.to_str().unwrap();
        let (code, _, err) = run_fem(&["keygen", "--out", key_s]).await;
        assert_eq!(code, 0, "{err}");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let pubkey = dir.path().join("agent.pub");
        let env = json!({
            "header": {"sender": "agent-1", "timestampMs": 1_700_000_000_000u64, "nonce": "000102030405060708090a0b0c0d0e0f"},
            "body": {"revoke": {"target": "agent-1", "reason": "test"}}
        });
        let env_path = dir.path().join("env.json");
        std::fs::write(&env_path, env.to_string()).unwrap();
        let (code, signed, err) = run_fem(&["sign", "--envelope", env_path.to_str().unwrap(), "--key", key_s]).await;
        assert_eq!(code, 0, "{err}");
        let signed_path = dir.path().join("envelope.json");
        std::fs::write(&signed_path, &signed).unwrap();
        let (code, out, _) = run_fem(&[
            "verify-signature", "--envelope", signed_path.to_str().unwrap(), "--pubkey", pubkey.to_str().unwrap(),
        ])
        .await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("\"valid\":true"), "{out}");
        // Another key does not verify it.
        let other = dir.path().join("other.key");
        run_fem(&["keygen", "--out", other.to_str().unwrap()]).await;
        let (code, out, _) = run_fem(&[
            "verify-signature", "--envelope", signed_path.to_str().unwrap(), "--pubkey",
            dir.path().join("other.pub").to_str().unwrap(),
        ])
        .await;
        assert_eq!(code, 1);
        assert!(out.contains("INVALID_SIGNATURE"), "{out}");
    })
    .await;
}

#[tokio::test]
async fn sigterm_stops_the_broker_cleanly() {
    bounded(60, async {
        let mut b = BrokerProcess::start(host(35), &["--shutdown-grace", "1s"], &[]).await;
        b.proc.signal("TERM");
        let st = b
            .proc
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("broker did not exit");
        assert!(st.success(), "{st}");
    })
    .await;
}

#[tokio::test]
async fn fem_coder_reads_its_yaml_config_and_flags_win() {
    bounded(90, async {
        let b = BrokerProcess::start(host(36), &[], &[]).await;
        let work = tempfile::tempdir().unwrap();
        let cfg = work.path().join("coder.yaml");
        std::fs::write(
            &cfg,
            format!(
                "broker: {}\nca: {}\nagent: from-yaml\nallow_programs: [echo]\nwork_dir: {}\ntimeout: 5s\n",
                b.url(),
                b.ca(),
                work.path().display()
            ),
        )
        .unwrap();
        // The flag beats the file's agent id; everything else comes from the file.
        let mut coder = Proc::spawn("fem-coder", &["--config", cfg.to_str().unwrap(), "--agent", "from-flag"], &[]);
        coder.wait_for("fem-coder registered", Duration::from_secs(30)).await;
        let call = |args: &'static str| {
            let (url, ca) = (b.url(), b.ca());
            async move {
                run_fem(&["call", "--broker", &url, "--ca", &ca, "--agent", "from-flag", "--tool", "shell.run", "--args", args]).await
            }
        };
        let (code, out, err) = call(r#"{"argv":["echo","yaml"]}"#).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("yaml\\n"), "{out}");
        let (code, _, err) = call(r#"{"argv":["ls"]}"#).await;
        assert_eq!(code, 2);
        assert!(err.contains("PERMISSION_DENIED"), "{err}");
        // An unknown key is a clear error at start.
        std::fs::write(&cfg, "agent: x\nno_such_key: 1\n").unwrap();
        let mut bad = Proc::spawn("fem-coder", &["--config", cfg.to_str().unwrap()], &[]);
        let st = bad.wait_exit(Duration::from_secs(10)).await.expect("fem-coder did not exit");
        assert!(!st.success());
        assert!(bad.output().contains("no_such_key"), "{}", bad.output());
    })
    .await;
}

/// The shipped `fem-broker` as a stub spoke (`FEM_FEDERATION_ROUTES=summary`)
/// behind a hub process: `fem call` at the stub reaches an agent of the hub
/// by id, through the hub's summary and an open relay.
#[tokio::test]
async fn a_stub_spoke_process_calls_through_its_hubs_summary() {
    bounded(90, async {
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let ca_s = ca.to_str().unwrap().to_owned();
        let dirs: Vec<tempfile::TempDir> = (0..2)
            .map(|_| {
                let d = tempfile::tempdir().unwrap();
                fem_tests::seed_ca(ca_dir.path(), d.path());
                d
            })
            .collect();
        let mut dirs = dirs.into_iter();
        let (hub_addr, stub_addr) = (host(383), host(384));
        let hub = BrokerProcess::start_in(
            hub_addr,
            dirs.next().unwrap(),
            &["--federation-mode", "hub", "--ca", &ca_s],
            &[],
        )
        .await;
        let hub_url = hub.url();
        let metrics = std::net::SocketAddr::new(stub_addr.ip(), 9090);
        let m = metrics.to_string();
        let _stub = BrokerProcess::start_in(
            stub_addr,
            dirs.next().unwrap(),
            &[
                "--federation-mode",
                "spoke",
                "--federation-hub",
                &hub_url,
                "--ca",
                &ca_s,
                "--metrics-listen",
                &m,
            ],
            &[("FEM_FEDERATION_ROUTES", "summary")],
        )
        .await;
        let (_agent, count) = echo_agent("hub-agent-383", options_for(hub_addr, &ca), 4).await;
        let t = Instant::now();
        let (rc, out, err) = loop {
            let r = fem_tests::fem_call(
                stub_addr,
                &ca,
                "hub-agent-383",
                "echo",
                &json!({"x": 1}),
                "10s",
            )
            .await;
            if r.0 == 0 || t.elapsed() > Duration::from_secs(30) {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(rc, 0, "{out}\n{err}");
        assert!(out.contains("\"x\""), "{out}");
        assert_eq!(*count.lock().unwrap(), 1);
        // The stub holds no route by id: the call went by the summary.
        let (_, text) = fem_tests::http(metrics, "GET", "/metrics", &[], "").await;
        assert!(text.lines().any(|l| l == "fem_broker_routes 0"), "{text}");
    })
    .await;
}
