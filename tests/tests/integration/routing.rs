//! Regressions of the router found by a process-level fault test, checked
//! through real broker processes (each on its own loopback address) with
//! SDK agents and callers over QUIC:
//! - a call by capability relayed to another broker runs on the agent the
//!   entry broker chose, and its result reaches the caller (it used to be
//!   dropped as "unknown" when the agent's broker chose another agent, and
//!   the caller got TIMEOUT although the call ran);
//! - calls in flight to agents behind other brokers are counted, so "fewest
//!   calls in flight" spreads calls by capability across them;
//! - `/ready` turns 200 once links are up even when both brokers dial each
//!   other and one of the duplicate links is closed.

use std::net::SocketAddr;
use std::time::Duration;

use fem_proto::{CapabilityPattern, Target};
use fem_tests::{Proc, caller, echo_agent, host, ready_within};
use serde_json::json;

use crate::bounded;

/// Three meshed broker processes on hosts `n`, `n+1`, `n+2`.
async fn three_brokers(
    n: u16,
) -> (
    Vec<Proc>,
    Vec<SocketAddr>,
    tempfile::TempDir,
    Vec<tempfile::TempDir>,
) {
    let addrs = [host(n), host(n + 1), host(n + 2)];
    let ca_dir = fem_tests::shared_ca();
    let ca = ca_dir.path().join("tls/ca.pem");
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        fem_tests::seed_ca(ca_dir.path(), d.path());
        let peers: Vec<SocketAddr> = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| *p)
            .collect();
        procs.push(fem_tests::mesh_broker_proc(*a, d.path(), &ca, &peers, "2s").await);
        dirs.push(d);
    }
    for a in &addrs {
        assert!(
            ready_within(*a, &ca, Duration::from_secs(20)).await,
            "{a} not ready"
        );
    }
    (procs, addrs.to_vec(), ca_dir, dirs)
}

fn by_capability() -> Target {
    Target::Capability(CapabilityPattern::new("echo.*").unwrap())
}

#[tokio::test]
async fn capability_calls_relayed_to_other_brokers_get_the_agents_results() {
    bounded(120, async {
        let (_procs, addrs, ca_dir, _dirs) = three_brokers(120).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        // Two agents behind B and one behind C; the caller enters at A.
        let (_x1, n1) = echo_agent("rx-1", fem_tests::options_for(addrs[1], &ca), 4).await;
        let (_x2, n2) = echo_agent("rx-2", fem_tests::options_for(addrs[1], &ca), 4).await;
        let (_y, n3) = echo_agent("ry-1", fem_tests::options_for(addrs[2], &ca), 4).await;
        let c = caller("rcaller", fem_tests::options_for(addrs[0], &ca)).await;
        // Routable from A once all three are advertised.
        let mut seen = 0;
        for _ in 0..200 {
            if c.call(by_capability(), "echo", json!({})).await.is_ok() {
                seen += 1;
                if seen >= 3 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = *n1.lock().unwrap() + *n2.lock().unwrap() + *n3.lock().unwrap();
        for i in 0..30 {
            let out = c
                .call(by_capability(), "echo", json!({"i": i}))
                .await
                .unwrap_or_else(|e| panic!("call {i} by capability failed: {e}"));
            assert_eq!(out, json!({"i": i}), "call {i}: not the agent's result");
        }
        let counts = [
            *n1.lock().unwrap(),
            *n2.lock().unwrap(),
            *n3.lock().unwrap(),
        ];
        assert_eq!(
            counts.iter().sum::<u32>() - before,
            30,
            "each call ran exactly once: {counts:?}"
        );
        assert!(
            counts.iter().all(|n| *n > 0),
            "every agent served: {counts:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn calls_in_flight_to_remote_agents_balance_the_load() {
    bounded(120, async {
        let (_procs, addrs, ca_dir, _dirs) = three_brokers(124).await;
        let ca = ca_dir.path().join("tls/ca.pem");
        let (_b, nb) = echo_agent("lb-b", fem_tests::options_for(addrs[1], &ca), 64).await;
        let (_c, nc) = echo_agent("lb-c", fem_tests::options_for(addrs[2], &ca), 64).await;
        let c = caller("lb-caller", fem_tests::options_for(addrs[0], &ca)).await;
        // Wait until both are routable from A.
        for _ in 0..200 {
            let _ = c.call(by_capability(), "echo", json!({})).await;
            if *nb.lock().unwrap() > 0 && *nc.lock().unwrap() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (b0, c0) = (*nb.lock().unwrap(), *nc.lock().unwrap());
        // 200 calls of 20 ms each, 16 at a time: by fewest calls in flight
        // the two agents share them.
        let mut tasks = Vec::new();
        for w in 0..16 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..12 {
                    c.call(
                        by_capability(),
                        "echo",
                        json!({"w": w, "i": i, "sleep_ms": 20}),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (b, cc) = (*nb.lock().unwrap() - b0, *nc.lock().unwrap() - c0);
        eprintln!(
            "routing: calls by capability from A: {b} to the agent on B, {cc} to the agent on C"
        );
        assert_eq!(b + cc, 192);
        assert!(
            b.min(cc) * 10 >= (b + cc) * 3,
            "calls by capability did not spread across brokers: {b} against {cc}"
        );
    })
    .await;
}

#[tokio::test]
async fn ready_once_links_are_up_although_both_ends_dial() {
    bounded(150, async {
        // Both brokers list each other, so two links open and one is closed.
        for round in 0..4u16 {
            let _pair = fem_tests::meshed_pair(128 + 2 * round, &[], Duration::from_secs(15)).await;
        }
    })
    .await;
}
