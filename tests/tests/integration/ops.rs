//! Operations: JSON gateway, operator views, readiness during drain,
//! SIGTERM drain, Prometheus scraping, metric lint.

use std::net::SocketAddr;
use std::time::Duration;

use fem_proto::{
    AgentId, Body, Envelope, Header, JsonText, RequestId, SignedEnvelope, SigningKey, Target,
    ToolCall,
};
use fem_tests::{Proc, TestBroker, caller, echo_agent, host, http};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::bounded;

fn json_call(sender: &str, key: &SigningKey, agent: &str, params: Value) -> String {
    json_call_for(sender, key, agent, params, None)
}

/// A signed JSON call naming `audience` as the broker it is for.
fn json_call_for(
    sender: &str,
    key: &SigningKey,
    agent: &str,
    params: Value,
    audience: Option<&str>,
) -> String {
    let env = Envelope::new(
        Header::now(AgentId::new(sender).unwrap()),
        Body::ToolCall(ToolCall {
            request_id: RequestId::random(),
            target: Target::Agent(AgentId::new(agent).unwrap()),
            tool: fem_proto::Capability::new("echo").unwrap(),
            parameters: JsonText::from_value(&params),
            deadline_ms: fem_proto::now_ms() + 5000,
            audience: audience.map(|a| AgentId::new(a).unwrap()),
        }),
    );
    let signed = SignedEnvelope::sign_json(&env, key).unwrap();
    json!({"publicKey": key.public_key(), "envelope": signed}).to_string()
}

/// The gateway's per-key replay limit is the rate `--replay-key-rate` says
/// (averaged over the 60 s window), not a side effect: with 1 a second, one
/// key gets 60 signed requests a window and then RATE_LIMITED, while
/// another key is served.
#[tokio::test]
async fn the_gateway_limits_each_key_to_its_replay_rate() {
    bounded(90, async {
        let b = TestBroker::start(host(385), |c| c.limits.replay_key_rate = 1).await;
        let (_a, _) = echo_agent("gw-385", b.options(), 64).await;
        let (addr, ca) = (b.broker.local_addr(), b.ca());
        let key = SigningKey::generate();
        for i in 0..60 {
            let body = json_call("flood-1", &key, "gw-385", json!({"i": i}));
            let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &body).await;
            assert_eq!(status, 200, "request {i}: {out}");
        }
        let body = json_call("flood-1", &key, "gw-385", json!({"i": 60}));
        let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &body).await;
        assert_eq!(status, 429, "{out}");
        assert!(out.contains("RATE_LIMITED"), "{out}");
        let other = SigningKey::generate();
        let body = json_call("calm-2", &other, "gw-385", json!({}));
        let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &body).await;
        assert_eq!(status, 200, "{out}");
    })
    .await;
}

#[tokio::test]
async fn json_gateway_calls_and_refusals() {
    bounded(90, async {
        let b = TestBroker::start(host(40), |_| {}).await;
        let (_a, _) = echo_agent("gw-40", b.options(), 10).await;
        let addr = b.broker.local_addr();
        let ca = b.ca();
        let key = SigningKey::generate();

        // A signed call succeeds; the result is signed by the agent, in JSON.
        let body = json_call("web-1", &key, "gw-40", json!({"hello": "gateway"}));
        let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &body).await;
        assert_eq!(status, 200, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let result: SignedEnvelope = serde_json::from_value(v["result"].clone()).unwrap();
        let signer: fem_proto::PublicKey = serde_json::from_value(v["signer"].clone()).unwrap();
        let env = result.verify(&signer).unwrap();
        assert_eq!(result.format, fem_proto::Format::Json);
        let Body::ToolResult(r) = env.body else {
            panic!("not a toolResult")
        };
        assert_eq!(
            r.outcome,
            fem_proto::ToolOutcome::Success(JsonText::new(r#"{"hello":"gateway"}"#).unwrap())
        );

        // The same request again is a replay.
        let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &body).await;
        assert_eq!(status, 409, "{out}");
        assert!(out.contains("REPLAYED"), "{out}");

        // A call captured on its way to another broker, replayed here, is
        // refused: it names its broker (audience).
        let elsewhere = json_call_for("web-1", &key, "gw-40", json!({}), Some("broker-elsewhere"));
        let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &elsewhere).await;
        assert_eq!(status, 403, "{out}");
        assert!(out.contains("signed for broker broker-elsewhere"), "{out}");
        let here = format!("broker-{}", addr.ip());
        let mine = json_call_for("web-1", &key, "gw-40", json!({"to": "here"}), Some(&here));
        let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &mine).await;
        assert_eq!(status, 200, "{out}");

        // A bad signature.
        let mut v: Value =
            serde_json::from_str(&json_call("web-1", &key, "gw-40", json!({}))).unwrap();
        v["publicKey"] = json!(SigningKey::generate().public_key());
        let (status, out) =
            fem_tests::https(addr, &ca, "POST", "/v1/call", &[], &v.to_string()).await;
        assert_eq!(status, 401, "{out}");
        assert!(out.contains("INVALID_SIGNATURE"), "{out}");

        // Malformed JSON.
        let (status, out) = fem_tests::https(addr, &ca, "POST", "/v1/call", &[], "{not json").await;
        assert_eq!(status, 400, "{out}");
        assert!(
            out.contains("BAD_REQUEST") && out.contains("malformed request JSON"),
            "{out}"
        );

        // No route.
        let (status, out) = fem_tests::https(
            addr,
            &ca,
            "POST",
            "/v1/call",
            &[],
            &json_call("web-1", &key, "nobody", json!({})),
        )
        .await;
        assert_eq!(status, 404, "{out}");
        assert!(out.contains("NO_ROUTE"), "{out}");

        // An id held by a registered agent with another key.
        let (status, out) = fem_tests::https(
            addr,
            &ca,
            "POST",
            "/v1/call",
            &[],
            &json_call("gw-40", &key, "gw-40", json!({})),
        )
        .await;
        assert_eq!(status, 403, "{out}");
        assert!(out.contains("ID_CONFLICT"), "{out}");

        // The broker keeps serving native clients.
        let c = caller("caller-40", b.options()).await;
        c.call(
            Target::Agent(AgentId::new("gw-40").unwrap()),
            "echo",
            json!({}),
        )
        .await
        .unwrap();
    })
    .await;
}

#[tokio::test]
async fn gateway_client_written_from_the_docs() {
    bounded(90, async {
        let python = ["python3", "/usr/bin/python3"].into_iter().find(|p| {
            std::process::Command::new(p)
                .args(["-c", "import cryptography"])
                .status()
                .is_ok_and(|s| s.success())
        });
        let Some(python) = python else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install python3 with the cryptography package"
            );
            eprintln!("skipping: no python3 with the cryptography package");
            return;
        };
        let b = TestBroker::start(host(41), |_| {}).await;
        let (_a, _) = echo_agent("py-41", b.options(), 10).await;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/gateway_client.py");
        let url = format!("https://{}", b.broker.local_addr());
        let out = tokio::process::Command::new(python)
            .args([
                script,
                &url,
                b.ca().to_str().unwrap(),
                "py-41",
                "echo",
                r#"{"from": "python"}"#,
            ])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v, json!({"success": {"from": "python"}}));
        // A refusal exits 2 with the typed error.
        let out = tokio::process::Command::new(python)
            .args([
                script,
                &url,
                b.ca().to_str().unwrap(),
                "nobody",
                "echo",
                "{}",
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("NO_ROUTE"));
    })
    .await;
}

#[tokio::test]
async fn operator_views_need_the_token() {
    bounded(60, async {
        let b = TestBroker::start(host(42), |c| c.admin_token = Some("s3cret-token".into())).await;
        let (_a, _) = echo_agent("view-42", b.options(), 10).await;
        let addr = b.broker.local_addr();
        let ca = b.ca();
        let get = |path: &'static str, token: Option<&'static str>| {
            let ca = ca.clone();
            async move {
                let headers: Vec<(&str, String)> = token
                    .map(|t| ("Authorization", format!("Bearer {t}")))
                    .into_iter()
                    .collect();
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                fem_tests::https(addr, &ca, "GET", path, &h, "").await
            }
        };
        assert_eq!(get("/v1/agents", None).await.0, 401);
        assert_eq!(get("/v1/agents", Some("wrong")).await.0, 401);
        let (status, body) = get("/v1/agents", Some("s3cret-token")).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let agent = &v["agents"][0];
        assert_eq!(agent["id"], "view-42");
        assert_eq!(agent["tools"][0]["name"], "echo");
        assert!(agent["transport"] == "quic" || agent["transport"] == "tcp");
        assert!(!body.contains("s3cret"), "never echo secrets");
        let (status, body) = get("/v1/routes", Some("s3cret-token")).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"via\":\"local\""), "{body}");
        assert_eq!(get("/v1/peers", Some("s3cret-token")).await.0, 200);

        // Without a configured token the views are off.
        let b2 = TestBroker::start(host(43), |_| {}).await;
        let (status, _) = fem_tests::https(
            b2.broker.local_addr(),
            &b2.ca(),
            "GET",
            "/v1/agents",
            &[],
            "",
        )
        .await;
        assert_eq!(status, 404);
    })
    .await;
}

#[tokio::test]
async fn ready_turns_503_while_draining_and_calls_finish() {
    bounded(60, async {
        let m = SocketAddr::new(host(44).ip(), 9090);
        let b = TestBroker::start(host(44), |c| {
            c.metrics_listen = Some(m);
            c.shutdown_grace = Duration::from_secs(10);
        })
        .await;
        let (_a, _) = echo_agent("drain-44", b.options(), 10).await;
        let c = caller("caller-44", b.options()).await;
        assert_eq!(http(m, "GET", "/ready", &[], "").await.0, 200);
        assert_eq!(http(m, "GET", "/health", &[], "").await.0, 200);
        let call = {
            let c = c.clone();
            tokio::spawn(async move {
                c.call(
                    Target::Agent(AgentId::new("drain-44").unwrap()),
                    "echo",
                    json!({"sleep_ms": 1500}),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let TestBroker { broker, dir: _dir } = b;
        let stop = tokio::spawn(broker.shutdown());
        let mut saw_503 = false;
        for _ in 0..50 {
            let (status, body) = http(m, "GET", "/ready", &[], "").await;
            if status == 503 {
                assert!(body.contains("draining"), "{body}");
                saw_503 = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(saw_503, "/ready never reported 503 while draining");
        assert_eq!(
            call.await.unwrap().unwrap(),
            json!({"sleep_ms": 1500}),
            "the call in flight must finish"
        );
        stop.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_calls_in_flight_then_exits_zero() {
    bounded(90, async {
        let addr = host(45);
        let dir = tempfile::tempdir().unwrap();
        let listen = addr.to_string();
        let mut broker = Proc::spawn(
            "fem-broker",
            &[
                "--listen",
                &listen,
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--shutdown-grace",
                "10s",
            ],
            &[],
        );
        broker
            .wait_for("fem-broker listening", Duration::from_secs(30))
            .await;
        let ca = dir.path().join("tls/ca.pem");
        let opts = fem_tests::options_for(addr, &ca);
        let (_a, _) = echo_agent("term-45", opts.clone(), 10).await;
        let c = caller("caller-45", opts).await;
        let call = {
            let c = c.clone();
            tokio::spawn(async move {
                c.call(
                    Target::Agent(AgentId::new("term-45").unwrap()),
                    "echo",
                    json!({"sleep_ms": 1500}),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        broker.signal("TERM");
        assert_eq!(call.await.unwrap().unwrap(), json!({"sleep_ms": 1500}));
        let st = broker
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("broker did not exit");
        assert!(st.success(), "{st}\n{}", broker.output());
        assert!(broker.output().contains("draining"));
    })
    .await;
}

fn promtool() -> Option<&'static str> {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install promtool (Debian package prometheus)"
        );
        eprintln!("skipping: promtool not installed");
    }
    found.then_some("promtool")
}

/// Lines of `promtool check metrics` output, except the one the deployment
/// guide forces (a gauge named *_total).
async fn lint_metrics(text: &str) -> Vec<String> {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    all.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("fem_broker_registered_agents_total"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn promtool_finds_nothing_in_broker_and_agent_metrics() {
    bounded(90, async {
        if promtool().is_none() {
            return;
        }
        let m = SocketAddr::new(host(46).ip(), 9090);
        let b = TestBroker::start(host(46), |c| c.metrics_listen = Some(m)).await;
        let (_a, _) = echo_agent("lint-46", b.options(), 10).await;
        let c = caller("caller-46", b.options()).await;
        c.call(
            Target::Agent(AgentId::new("lint-46").unwrap()),
            "echo",
            json!({}),
        )
        .await
        .unwrap();
        let _ = c
            .call(
                Target::Agent(AgentId::new("nobody").unwrap()),
                "echo",
                json!({}),
            )
            .await;
        let (_, text) = http(m, "GET", "/metrics", &[], "").await;
        assert!(text.contains("fem_broker_registered_agents 2"), "{text}");
        let problems = lint_metrics(&text).await;
        assert!(
            problems.is_empty(),
            "promtool on broker metrics: {problems:?}"
        );

        // fem-coder's own /metrics.
        let work = tempfile::tempdir().unwrap();
        let cm = SocketAddr::new(host(46).ip(), 9091);
        let url = format!("https://{}", b.broker.local_addr());
        let mut coder = Proc::spawn(
            "fem-coder",
            &[
                "--broker",
                &url,
                "--ca",
                b.ca().to_str().unwrap(),
                "--agent",
                "coder-46",
                "--work-dir",
                work.path().to_str().unwrap(),
                "--metrics-listen",
                &cm.to_string(),
            ],
            &[],
        );
        coder
            .wait_for("fem-coder registered", Duration::from_secs(30))
            .await;
        c.call(
            Target::Agent(AgentId::new("coder-46").unwrap()),
            "shell.run",
            json!({"argv": ["true"]}),
        )
        .await
        .unwrap();
        let (status, _) = http(cm, "GET", "/ready", &[], "").await;
        assert_eq!(status, 200);
        let (_, text) = http(cm, "GET", "/metrics", &[], "").await;
        assert!(
            text.contains("fem_agent_tool_execution_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("fem_agent_queue_length 0"), "{text}");
        let problems = lint_metrics(&text).await;
        assert!(
            problems.is_empty(),
            "promtool on fem-coder metrics: {problems:?}"
        );
    })
    .await;
}

async fn prom_query(addr: SocketAddr, q: &str) -> Option<f64> {
    let path = format!("/api/v1/query?query={q}");
    let (status, body) = http(addr, "GET", &path, &[], "").await;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_broker() {
    bounded(120, async {
        let found = std::process::Command::new("prometheus").arg("--version").output().is_ok();
        if !found {
            assert!(std::env::var_os("CI").is_none(), "CI must install prometheus (Debian package)");
            eprintln!("skipping: prometheus not installed");
            return;
        }
        let m = SocketAddr::new(host(47).ip(), 9090);
        let b = TestBroker::start(host(47), |c| c.metrics_listen = Some(m)).await;
        let (_a1, _) = echo_agent("prom-a", b.options(), 10).await;
        let (_a2, _) = echo_agent("prom-b", b.options(), 10).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: fem-broker\n    static_configs:\n      - targets: ['{m}']\n"),
        )
        .unwrap();
        let prom_addr = SocketAddr::new(host(48).ip(), 9090);
        let mut child = tokio::process::Command::new("prometheus")
            .args([
                &format!("--config.file={}", cfg.display()),
                &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                &format!("--web.listen-address={prom_addr}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut agents = None;
        for _ in 0..200 {
            agents = prom_query(prom_addr, "fem_broker_registered_agents_total").await;
            if agents.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(agents, Some(2.0), "Prometheus did not report 2 registered agents");
        let before = prom_query(prom_addr, "fem_broker_messages_processed_total").await.unwrap();
        let c = caller("caller-47", b.options()).await;
        for i in 0..5 {
            c.call(Target::Agent(AgentId::new("prom-a").unwrap()), "echo", json!({"i": i})).await.unwrap();
        }
        let mut after = before;
        for _ in 0..100 {
            after = prom_query(prom_addr, "fem_broker_messages_processed_total").await.unwrap_or(before);
            if after >= before + 5.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(after >= before + 5.0, "message counter did not grow in Prometheus: {before} -> {after}");
        let _ = child.kill().await;
    })
    .await;
}
