//! The broker as an MCP server, driven by the official MCP Python SDK
//! (tests/mcp_client.py, PyPI package `mcp`) against real broker processes
//! with fem-coder agents: both protocol eras, a federation, typed FEM
//! errors, views, grants, Origin and bearer tokens. Hosts 260 to 289.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fem_proto::{AgentId, CallRule, CapabilityPattern, Grant, IdPattern, Role, SigningKey};
use fem_tests::{Proc, host, https, https_get};
use serde_json::{Value, json};

use crate::bounded;

pub(crate) const TOKEN: &str = "mcp-test-token-8f1d";

/// Runs tests/mcp_client.py with `args`; returns its JSON line.
pub(crate) async fn mcp_client(args: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/mcp_client.py");
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("python3")
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mcp_client.py did not finish within 90 s")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "mcp_client.py printed no JSON (is the `mcp` package installed? pip install mcp)\nstdout: {stdout}\nstderr: {stderr}"
        )
    })
}

pub(crate) fn names(v: &Value) -> Vec<String> {
    v["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {v}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Lists through `args` until every tool in `wanted` appears (routes
/// converge), within `within`.
pub(crate) async fn until_listed(args: &[&str], wanted: &[&str], within: Duration) -> Value {
    let end = tokio::time::Instant::now() + within;
    loop {
        let v = mcp_client(args).await;
        if v.get("tools").is_some() {
            let listed = names(&v);
            if wanted.iter().all(|w| listed.iter().any(|n| n == w)) {
                return v;
            }
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{wanted:?} never listed within {within:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A directory with the principal's token and key and the broker's YAML
/// file (`mcp:` section with `views`), returned with the file's path.
pub(crate) fn mcp_config(dir: &Path, extra: &str) -> String {
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let key = SigningKey::generate();
    let hex: String = key.seed().iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join("principal.key"), hex).unwrap();
    let yaml = format!(
        "mcp:\n  principals:\n    - id: mcp-tester\n      token_file: {d}/token\n      key_file: {d}/principal.key\n{extra}  views:\n    files:\n      tools: [\"file.read\"]\n",
        d = dir.display()
    );
    let path = dir.join("broker.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A fem-coder agent `id` on the broker at `addr`.
pub(crate) async fn coder(id: &str, addr: SocketAddr, ca: &Path, work: &Path) -> Proc {
    let url = format!("https://{addr}");
    let mut p = Proc::spawn(
        "fem-coder",
        &[
            "--broker",
            &url,
            "--ca",
            ca.to_str().unwrap(),
            "--agent",
            id,
            "--work-dir",
            work.to_str().unwrap(),
            "--timeout",
            "20s",
        ],
        &[],
    );
    p.wait_for("fem-coder registered", Duration::from_secs(30))
        .await;
    p
}

#[tokio::test]
async fn an_mcp_client_on_one_broker_calls_fem_coder_behind_another_in_both_eras() {
    bounded(240, async {
        let conf = tempfile::tempdir().unwrap();
        let config = mcp_config(conf.path(), "");
        let plain = SocketAddr::new(host(261).ip(), 9260);
        let plain_s = plain.to_string();
        let envs = [
            ("FEM_CONFIG", config.as_str()),
            ("FEM_MCP_LISTEN", plain_s.as_str()),
        ];
        let (_brokers, [a, b], ca_dir, _dirs) =
            fem_tests::meshed_pair(260, &envs, Duration::from_secs(20)).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        // fem-coder behind A; the MCP client enters at B.
        let work = tempfile::tempdir().unwrap();
        let _coder = coder("coder-260", a, &ca, work.path()).await;
        let url = format!("https://{b}/mcp");
        let ca_s = ca.to_str().unwrap();
        let https_args = ["--url", &url, "--ca", ca_s, "--token", TOKEN];
        let listed = until_listed(&https_args, &["shell_run"], Duration::from_secs(20)).await;

        // The SDK's default mode: server/discover at the newest revision.
        assert_eq!(listed["protocol"], "2026-07-28", "{listed}");
        let tools = names(&listed);
        for t in ["shell_run", "file_read", "code_execute"] {
            assert!(tools.contains(&t.to_owned()), "{t} missing: {tools:?}");
        }
        let shell = listed["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "shell_run")
            .unwrap();
        assert_eq!(shell["inputSchema"]["type"], "object", "{shell}");
        assert!(!shell["description"].as_str().unwrap().is_empty());

        let mut args = https_args.to_vec();
        args.extend([
            "--call",
            "shell_run",
            "--arguments",
            r#"{"argv": ["echo", "hi"]}"#,
        ]);
        let v = mcp_client(&args).await;
        assert_eq!(v["call"]["isError"], false, "{v}");
        let text: Value = serde_json::from_str(v["call"]["text"][0].as_str().unwrap()).unwrap();
        assert_eq!(text["stdout"], "hi\n", "{v}");

        // The legacy handshake (initialize, 2025-11-25) on the plain-HTTP
        // listener; a program fem-coder does not allow is a typed FEM error.
        let plain_url = format!("http://{plain}/mcp");
        let v = mcp_client(&[
            "--url",
            &plain_url,
            "--token",
            TOKEN,
            "--mode",
            "legacy",
            "--call",
            "shell_run",
            "--arguments",
            r#"{"argv": ["no-such-program-for-mcp"]}"#,
        ])
        .await;
        assert_eq!(v["protocol"], "2025-11-25", "{v}");
        assert!(names(&v).contains(&"shell_run".to_owned()), "{v}");
        assert_eq!(v["call"]["isError"], true, "{v}");
        let err: Value = serde_json::from_str(v["call"]["text"][0].as_str().unwrap()).unwrap();
        assert_eq!(err["error"]["code"], "PERMISSION_DENIED", "{v}");

        // The per-agent name routes to that agent, listed or not.
        let mut args = https_args.to_vec();
        args.extend([
            "--call",
            "coder-260__shell_run",
            "--arguments",
            r#"{"argv": ["echo", "agent"]}"#,
        ]);
        let v = mcp_client(&args).await;
        assert_eq!(v["call"]["isError"], false, "{v}");
    })
    .await;
}

#[tokio::test]
async fn views_origins_and_tokens() {
    bounded(180, async {
        let b = host(264);
        let conf = tempfile::tempdir().unwrap();
        let config = mcp_config(
            conf.path(),
            "  allowed_origins: [\"https://app.example.com\"]\n",
        );
        let broker =
            fem_tests::BrokerProcess::start(b, &[], &[("FEM_CONFIG", config.as_str())]).await;
        let ca = broker.ca();
        let work = tempfile::tempdir().unwrap();
        let _coder = coder("coder-264", b, Path::new(&ca), work.path()).await;
        let url = format!("https://{b}/mcp/files");
        let view_args = ["--url", url.as_str(), "--ca", &ca, "--token", TOKEN];
        let v = until_listed(&view_args, &["file_read"], Duration::from_secs(20)).await;
        assert_eq!(names(&v), ["file_read"], "the view shows file.read only");
        // A name outside the view is unknown there.
        let mut args = view_args.to_vec();
        args.extend([
            "--call",
            "shell_run",
            "--arguments",
            r#"{"argv": ["echo", "hi"]}"#,
        ]);
        let v = mcp_client(&args).await;
        assert_eq!(v["call"]["error"]["code"], -32602, "{v}");
        // An unknown view.
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}})
        .to_string();
        let auth = format!("Bearer {TOKEN}");
        let accept = ("Accept", "application/json, text/event-stream");
        let ca_p = Path::new(&ca);
        let (st, _) = https(
            b,
            ca_p,
            "POST",
            "/mcp/nope",
            &[("Authorization", &auth), accept],
            &init,
        )
        .await;
        assert_eq!(st, 404);
        // The raw handshake of 2025-06-18 works, without a session id.
        let (st, body) = https(
            b,
            ca_p,
            "POST",
            "/mcp",
            &[("Authorization", &auth), accept],
            &init,
        )
        .await;
        assert_eq!(st, 200, "{body}");
        assert!(body.contains("\"2025-06-18\""), "{body}");
        // A bad Origin: 403; an allowed one passes.
        let (st, body) = https(
            b,
            ca_p,
            "POST",
            "/mcp",
            &[
                ("Authorization", &auth),
                accept,
                ("Origin", "https://evil.example"),
            ],
            &init,
        )
        .await;
        assert_eq!(st, 403, "{body}");
        let (st, body) = https(
            b,
            ca_p,
            "POST",
            "/mcp",
            &[
                ("Authorization", &auth),
                accept,
                ("Origin", "https://app.example.com"),
            ],
            &init,
        )
        .await;
        assert_eq!(st, 200, "{body}");
        // A wrong token, or none: 401 (principals are configured).
        for h in [
            vec![("Authorization", "Bearer wrong"), accept],
            vec![accept],
        ] {
            let (st, _) = https(b, ca_p, "POST", "/mcp", &h, &init).await;
            assert_eq!(st, 401);
        }
        let v = mcp_client(&[
            "--url",
            &format!("https://{b}/mcp"),
            "--ca",
            &ca,
            "--token",
            "wrong",
        ])
        .await;
        assert!(v.get("connectError").is_some(), "{v}");
        // Counted.
        let (_, metrics) = https_get(b, ca_p, "/metrics").await;
        assert!(
            metrics.contains("fem_broker_mcp_requests_total{method=\"tools/list\",outcome=\"ok\"}"),
            "{metrics}"
        );
    })
    .await;
}

fn grant(
    op: &SigningKey,
    subject: &SigningKey,
    ids: &[&str],
    offer: &[&str],
    call: &[&str],
) -> fem_proto::SignedGrant {
    let now = fem_proto::now_ms();
    Grant {
        version: 1,
        id: fem_proto::RequestId::random().0,
        subject: subject.public_key(),
        role: Role::Agent,
        issued_ms: now,
        expires_ms: now + 3_600_000,
        register: ids.iter().map(|s| IdPattern::new(*s).unwrap()).collect(),
        offer: offer
            .iter()
            .map(|s| CapabilityPattern::new(*s).unwrap())
            .collect(),
        offer_ids: Vec::new(),
        call: call.iter().map(|s| CallRule::parse(s).unwrap()).collect(),
        deny: Vec::new(),
        rate: None,
        operator: false,
        delegate: false,
    }
    .sign(op, None)
    .unwrap()
}

/// An SDK agent `id` offering capability `cap` and one echoing tool `tool`.
async fn agent(
    id: &str,
    cap: &str,
    tool: &str,
    key: SigningKey,
    opts: fem_agent_sdk::Options,
) -> fem_agent_sdk::Client {
    let t = fem_agent_sdk::Tool::new(
        tool,
        "echoes its parameters",
        json!({"type": "object"}),
        |req: fem_agent_sdk::ToolRequest| async move { Ok(req.params) },
    )
    .unwrap();
    fem_agent_sdk::AgentBuilder::new(AgentId::new(id).unwrap(), key)
        .capability(cap)
        .unwrap()
        .tool(t)
        .connect(opts)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_principal_sees_and_calls_only_what_its_grant_allows() {
    bounded(180, async {
        let b = host(266);
        let op = SigningKey::generate();
        let conf = tempfile::tempdir().unwrap();
        let anchor = conf.path().join("anchor.pub");
        std::fs::write(&anchor, format!("{}\n", op.public_key())).unwrap();
        // The principal's key and grant: it may call echo.ping only.
        let principal = SigningKey::generate();
        let g = grant(&op, &principal, &["mcp-tester"], &[], &["echo.ping"]);
        std::fs::write(conf.path().join("principal.grant"), g.to_text().unwrap()).unwrap();
        let config = mcp_config(
            conf.path(),
            &format!(
                "      grant_file: {}/principal.grant\n",
                conf.path().display()
            ),
        );
        // mcp_config wrote a fresh key: use the granted one.
        let hex: String = principal
            .seed()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        std::fs::write(conf.path().join("principal.key"), hex).unwrap();
        let anchor_s = anchor.to_str().unwrap();
        let broker = fem_tests::BrokerProcess::start(
            b,
            &["--trust-anchor", anchor_s],
            &[("FEM_CONFIG", config.as_str())],
        )
        .await;
        let ca = broker.ca();
        let opts = fem_tests::options_for(b, Path::new(&ca));
        let (k1, k2) = (SigningKey::generate(), SigningKey::generate());
        let g1 = grant(&op, &k1, &["pinger"], &["echo.*", "echo.ping"], &[]);
        let g2 = grant(&op, &k2, &["vault"], &["secret.*", "secret.read"], &[]);
        let _a1 = agent(
            "pinger",
            "echo.basic",
            "echo.ping",
            k1,
            opts.clone().grant(g1),
        )
        .await;
        let _a2 = agent("vault", "secret.store", "secret.read", k2, opts.grant(g2)).await;
        let url = format!("https://{b}/mcp");
        let base = ["--url", url.as_str(), "--ca", &ca, "--token", TOKEN];
        let v = until_listed(&base, &["echo_ping"], Duration::from_secs(20)).await;
        assert_eq!(names(&v), ["echo_ping"], "only what the grant allows: {v}");
        let mut args = base.to_vec();
        args.extend(["--call", "secret_read"]);
        let v = mcp_client(&args).await;
        assert_eq!(v["call"]["error"]["code"], -32602, "{v}");
        let mut args = base.to_vec();
        args.extend(["--call", "echo_ping", "--arguments", r#"{"x": 1}"#]);
        let v = mcp_client(&args).await;
        assert_eq!(v["call"]["isError"], false, "{v}");
        let out: Value = serde_json::from_str(v["call"]["text"][0].as_str().unwrap()).unwrap();
        assert_eq!(out, json!({"x": 1}));
        // The per-agent alias of a tool outside the grant is unknown too.
        let mut args = base.to_vec();
        args.extend(["--call", "vault__secret_read"]);
        let v = mcp_client(&args).await;
        assert_eq!(v["call"]["error"]["code"], -32602, "{v}");
    })
    .await;
}
