//! Registration and routing with in-process brokers and SDK clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fem_agent_sdk::{AgentBuilder, Origin, Tool, Transport};
use fem_proto::{AgentId, CapabilityPattern, ErrorCode, SigningKey, Target};
use fem_tests::{TestBroker, caller, echo_agent, eventually, host, https_get};
use serde_json::json;

use crate::bounded;

fn by_id(id: &str) -> Target {
    Target::Agent(AgentId::new(id).unwrap())
}

fn by_cap(p: &str) -> Target {
    Target::Capability(CapabilityPattern::new(p).unwrap())
}

async fn call_by_id_and_capability(n: u16, transport: Transport) {
    let b = TestBroker::start(host(n), |_| {}).await;
    let opts = b.options().transport(transport);
    let (_agent, count) = echo_agent("echo-1", opts.clone(), 10).await;
    let c = caller("caller-1", opts).await;
    let r = c
        .call(by_id("echo-1"), "echo", json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(r, json!({"x": 1}));
    let r = c
        .call(by_cap("echo.*"), "echo", json!({"y": "two"}))
        .await
        .unwrap();
    assert_eq!(r, json!({"y": "two"}));
    let r = c
        .call(by_cap("echo.basic"), "echo", json!({}))
        .await
        .unwrap();
    assert_eq!(r, json!({}));
    assert_eq!(*count.lock().unwrap(), 3);
    assert_eq!(b.broker.registry().len(), 2);
}

#[tokio::test]
async fn call_by_id_and_capability_over_quic() {
    bounded(60, call_by_id_and_capability(1, Transport::Quic)).await;
}

#[tokio::test]
async fn call_by_id_and_capability_over_tcp() {
    bounded(60, call_by_id_and_capability(2, Transport::Tcp)).await;
}

#[tokio::test]
async fn typed_errors_no_route_tool_not_found_tool_failed() {
    bounded(60, async {
        let b = TestBroker::start(host(3), |_| {}).await;
        let (_agent, _) = echo_agent("echo-3", b.options(), 10).await;
        let c = caller("caller-3", b.options()).await;
        let t = Instant::now();
        let e = c
            .call(by_id("nobody"), "echo", json!({}))
            .await
            .unwrap_err();
        assert_eq!((e.code, e.origin), (ErrorCode::NoRoute, Origin::Broker));
        let e = c
            .call(by_cap("gpu.*"), "echo", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoRoute);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "NO_ROUTE must be immediate"
        );
        let e = c
            .call(by_id("echo-3"), "other.tool", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::ToolNotFound);
        let e = c
            .call(by_id("echo-3"), "echo", json!({"fail": true}))
            .await
            .unwrap_err();
        assert_eq!((e.code, e.origin), (ErrorCode::ToolFailed, Origin::Agent));
        // Parameters are checked against the tool's schema by the agent.
        let e = c
            .call(by_id("echo-3"), "echo", json!([1, 2]))
            .await
            .unwrap_err();
        assert_eq!((e.code, e.origin), (ErrorCode::BadRequest, Origin::Agent));
    })
    .await;
}

#[tokio::test]
async fn deadline_gives_timeout_and_late_result_is_dropped() {
    bounded(60, async {
        let b = TestBroker::start(host(4), |_| {}).await;
        let (_agent, _) = echo_agent("slow-4", b.options(), 10).await;
        let c = caller("caller-4", b.options()).await;
        let t = Instant::now();
        let e = c
            .call_with_timeout(
                by_id("slow-4"),
                "echo",
                json!({"sleep_ms": 2500}),
                Duration::from_millis(300),
            )
            .await
            .unwrap_err();
        // Answered at the deadline, well before the handler would finish:
        // by the broker, or by the agent's SDK, which bounds the handler by
        // the same deadline (whichever is first; never both).
        assert_eq!(e.code, ErrorCode::Timeout, "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "TIMEOUT only after {:?}",
            t.elapsed()
        );
        // The late result arrives after the deadline and is dropped; the
        // next call still gets exactly its own answer.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = c
            .call(by_id("slow-4"), "echo", json!({"n": 2}))
            .await
            .unwrap();
        assert_eq!(r, json!({"n": 2}));
    })
    .await;
}

#[tokio::test]
async fn two_agents_share_load() {
    bounded(60, async {
        let b = TestBroker::start(host(5), |_| {}).await;
        let (_a, ca) = echo_agent("share-a", b.options(), 4).await;
        let (_b, cb) = echo_agent("share-b", b.options(), 4).await;
        let c = caller("caller-5", b.options()).await;
        let mut tasks = Vec::new();
        for i in 0..40 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.call(
                    by_cap("echo.basic"),
                    "echo",
                    json!({"i": i, "sleep_ms": 20}),
                )
                .await
                .unwrap()
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap()["i"], json!(i));
        }
        let (na, nb) = (*ca.lock().unwrap(), *cb.lock().unwrap());
        assert_eq!(na + nb, 40);
        assert!(na >= 10 && nb >= 10, "load not shared: {na} vs {nb}");
    })
    .await;
}

#[tokio::test]
async fn concurrency_limit_queue_and_overflow() {
    bounded(60, async {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // One caller uses every slot here; the caller share is tested in bounds.rs.
        let b = TestBroker::start(host(6), |c| {
            c.agent_queue_limit = 4;
            c.limits.caller_share_percent = 100;
        })
        .await;
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tool = {
            let (now, peak) = (Arc::clone(&now), Arc::clone(&peak));
            Tool::new("echo", "slow echo", json!({"type": "object"}), move |req| {
                let (now, peak) = (Arc::clone(&now), Arc::clone(&peak));
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(req.params)
                }
            })
            .unwrap()
        };
        let _a = AgentBuilder::new(AgentId::new("limited-6").unwrap(), SigningKey::generate())
            .tool(tool)
            .max_concurrent(2)
            .connect(b.options())
            .await
            .unwrap();
        let c = caller("caller-6", b.options()).await;
        // 2 run at once, 4 wait at the broker, the 7th is refused.
        let mut tasks = Vec::new();
        for i in 0..6 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.call(by_id("limited-6"), "echo", json!({"i": i})).await
            }));
        }
        let entry = b
            .broker
            .registry()
            .get(&AgentId::new("limited-6").unwrap())
            .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || entry.queued() == 4
                && entry.in_flight() == 2)
            .await
        );
        let e = c
            .call(by_id("limited-6"), "echo", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited, "{e}");
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), json!({"i": i}));
        }
        assert_eq!(
            peak.load(Ordering::SeqCst),
            2,
            "the agent's limit was exceeded"
        );
        // A call whose deadline passes while it waits is answered TIMEOUT once.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let c = c.clone();
            slow.push(tokio::spawn(async move {
                c.call(by_id("limited-6"), "echo", json!({})).await
            }));
        }
        assert!(eventually(Duration::from_secs(5), || entry.in_flight() == 2).await);
        let e = c
            .call_with_timeout(
                by_id("limited-6"),
                "echo",
                json!({}),
                Duration::from_millis(100),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Timeout);
        for t in slow {
            t.await.unwrap().unwrap();
        }
        assert!(
            eventually(Duration::from_secs(5), || entry.queued() == 0
                && entry.in_flight() == 0)
            .await
        );
    })
    .await;
}

#[tokio::test]
async fn stalled_agent_slows_only_its_own_calls() {
    bounded(60, async {
        let b = TestBroker::start(host(7), |_| {}).await;
        let stalled = Tool::new(
            "echo",
            "never answers",
            json!({"type": "object"}),
            |_req| async {
                std::future::pending::<()>().await;
                Ok(json!(null))
            },
        )
        .unwrap();
        let _s = AgentBuilder::new(AgentId::new("stalled-7").unwrap(), SigningKey::generate())
            .tool(stalled)
            .connect(b.options())
            .await
            .unwrap();
        let (_f, _) = echo_agent("fast-7", b.options(), 10).await;
        let c = caller("caller-7", b.options()).await;
        let mut stuck = Vec::new();
        for _ in 0..10 {
            let c = c.clone();
            stuck.push(tokio::spawn(async move {
                c.call_with_timeout(
                    by_id("stalled-7"),
                    "echo",
                    json!({}),
                    Duration::from_secs(3),
                )
                .await
            }));
        }
        let t = Instant::now();
        for i in 0..50 {
            c.call(by_id("fast-7"), "echo", json!({"i": i}))
                .await
                .unwrap();
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "fast calls were held up: {:?}",
            t.elapsed()
        );
        for s in stuck {
            assert_eq!(s.await.unwrap().unwrap_err().code, ErrorCode::Timeout);
        }
    })
    .await;
}

#[tokio::test]
async fn discovery_events_embodiment_and_revoke() {
    bounded(60, async {
        let b = TestBroker::start(host(8), |_| {}).await;
        let (agent, _) = echo_agent("disc-8", b.options(), 10).await;
        let c = caller("caller-8", b.options()).await;
        let tools = c
            .discover(Some(CapabilityPattern::new("echo.*").unwrap()), 0)
            .await
            .unwrap();
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].agent_id.as_str(), "disc-8");
        assert_eq!(tools[0].tool.name.as_str(), "echo");
        assert_eq!(
            tools[0].broker_id.as_str(),
            format!("broker-{}", b.broker.local_addr().ip())
        );
        assert!(
            c.discover(Some(CapabilityPattern::new("gpu.*").unwrap()), 0)
                .await
                .unwrap()
                .is_empty()
        );

        // Events fan out to subscribers, not back to the sender.
        let mut rx = agent.subscribe("alerts.disk").await.unwrap();
        c.emit("alerts.disk", json!({"free": 3})).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (ev.sender.as_str(), ev.payload),
            ("caller-8", json!({"free": 3}))
        );

        // embodimentUpdate replaces the tools.
        let v2 = Tool::new(
            "echo.v2",
            "v2",
            json!({"type": "object"}),
            |req| async move { Ok(req.params) },
        )
        .unwrap();
        agent.update_tools(vec![v2]).await.unwrap();
        assert_eq!(
            c.call(by_id("disc-8"), "echo", json!({}))
                .await
                .unwrap_err()
                .code,
            ErrorCode::ToolNotFound
        );
        assert_eq!(
            c.call(by_id("disc-8"), "echo.v2", json!({"v": 2}))
                .await
                .unwrap(),
            json!({"v": 2})
        );

        // An agent may revoke itself but nobody else.
        agent.revoke("done").await.unwrap();
        assert!(
            eventually(Duration::from_secs(5), || b
                .broker
                .registry()
                .get(&AgentId::new("disc-8").unwrap())
                .is_none())
            .await
        );
        assert_eq!(
            c.call(by_id("disc-8"), "echo.v2", json!({}))
                .await
                .unwrap_err()
                .code,
            ErrorCode::NoRoute
        );
    })
    .await;
}

#[tokio::test]
async fn health_ready_and_metrics_over_https() {
    bounded(60, async {
        let b = TestBroker::start(host(9), |_| {}).await;
        let (_a, _) = echo_agent("metrics-9", b.options(), 10).await;
        let c = caller("caller-9", b.options()).await;
        c.call(by_id("metrics-9"), "echo", json!({})).await.unwrap();
        let addr = b.broker.local_addr();
        let (status, body) = https_get(addr, &b.ca(), "/health").await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = https_get(addr, &b.ca(), "/ready").await;
        assert_eq!(status, 200);
        let (status, body) = https_get(addr, &b.ca(), "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("fem_broker_registered_agents_total 2"),
            "{body}"
        );
        assert!(
            body.contains("fem_broker_tool_calls_total{outcome=\"ok\"} 1"),
            "{body}"
        );
        let (status, _) = https_get(addr, &b.ca(), "/nope").await;
        assert_eq!(status, 404);
    })
    .await;
}
