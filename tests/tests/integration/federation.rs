//! Federation: brokers on their own loopback addresses linked by QUIC,
//! calls entering any broker reach agents behind any other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fem_broker::{FederationConfig, FederationMode};
use fem_proto::{AgentId, CapabilityPattern, ErrorCode, Target};
use fem_tests::{TestBroker, caller, echo_agent, eventually, host};
use serde_json::json;

use crate::bounded;

fn url(a: SocketAddr) -> String {
    format!("https://{a}")
}

fn fed(mode: FederationMode, peers: Vec<String>, hubs: Vec<String>, ca: &Path) -> FederationConfig {
    FederationConfig {
        mode,
        peers,
        hubs,
        trust: fem_agent_sdk::Trust::CaFile(ca.to_owned()),
        link_timeout: Duration::from_millis(1500),
        ping_interval: Duration::from_millis(250),
        backoff_max: Duration::from_millis(500),
        ..FederationConfig::default()
    }
}

/// Starts brokers at `addrs` sharing one development CA; `f(i, ca)` gives
/// broker i's federation settings. The CA directory lives as long as the result.
async fn cluster(
    addrs: &[SocketAddr],
    f: impl Fn(usize, &Path) -> FederationConfig,
) -> (Vec<TestBroker>, tempfile::TempDir) {
    let ca_dir = tempfile::tempdir().unwrap();
    fem_broker::tls::load_material(
        &fem_broker::TlsSource::SelfSigned,
        ca_dir.path(),
        &["localhost".into()],
    )
    .unwrap();
    let ca = ca_dir.path().join("tls/ca.pem");
    let mut out = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let fc = f(i, &ca);
        out.push(TestBroker::start_sharing_ca(*a, ca_dir.path(), |c| c.federation = fc).await);
    }
    (out, ca_dir)
}

fn ca_of(b: &TestBroker) -> PathBuf {
    b.ca()
}

async fn routable(c: &fem_agent_sdk::Client, agent: &str, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        match c
            .call(
                Target::Agent(AgentId::new(agent).unwrap()),
                "echo",
                json!({"probe": true}),
            )
            .await
        {
            Ok(_) => return t.elapsed(),
            Err(e) if e.code == ErrorCode::NoRoute && t.elapsed() < within => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("{agent} not routable after {:?}: {e}", t.elapsed()),
        }
    }
}

#[tokio::test]
async fn full_mesh_of_three_routes_by_id_and_capability() {
    bounded(90, async {
        let addrs = [host(60), host(61), host(62)];
        let urls: Vec<String> = addrs.iter().map(|a| url(*a)).collect();
        let (bs, _ca) = cluster(&addrs, |i, ca| {
            let peers = urls
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, u)| u.clone())
                .collect();
            fed(FederationMode::Mesh, peers, vec![], ca)
        })
        .await;
        let (_agent, count) = echo_agent("far-agent", bs[2].options(), 10).await;
        let c = caller("caller-a", bs[0].options()).await;
        let took = routable(&c, "far-agent", Duration::from_secs(20)).await;
        eprintln!("mesh of 3: agent routable from A after {took:?}");
        let r = c
            .call(
                Target::Capability(CapabilityPattern::new("echo.*").unwrap()),
                "echo",
                json!({"via": "capability"}),
            )
            .await
            .unwrap();
        assert_eq!(r, json!({"via": "capability"}));
        // Redundant paths (A-C direct and A-B-C): exactly one delivery per call.
        let before = *count.lock().unwrap();
        for i in 0..20 {
            let r = c
                .call(
                    Target::Agent(AgentId::new("far-agent").unwrap()),
                    "echo",
                    json!({"i": i}),
                )
                .await
                .unwrap();
            assert_eq!(r, json!({"i": i}));
        }
        assert_eq!(
            *count.lock().unwrap() - before,
            20,
            "a call was delivered twice"
        );
        // Discovery spans the federation and names the broker reaching the agent.
        let tools = c
            .discover(Some(CapabilityPattern::new("echo.*").unwrap()), 0)
            .await
            .unwrap();
        assert_eq!(tools.len(), 1);
        assert_eq!(
            tools[0].broker_id.as_str(),
            format!("broker-{}", addrs[2].ip())
        );
        // Routing table view: one remote route at A.
        assert_eq!(bs[0].broker.registry().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn hub_with_two_spokes_and_failover_to_a_second_hub() {
    bounded(120, async {
        // h1, h2 are hubs meshed together; s1, s2 spokes that prefer h1.
        let (h1, h2, s1, s2) = (host(63), host(64), host(65), host(66));
        let addrs = [h1, h2, s1, s2];
        let (mut bs, _ca) = cluster(&addrs, |i, ca| match i {
            0 => fed(FederationMode::Hub, vec![url(h2)], vec![], ca),
            1 => fed(FederationMode::Hub, vec![url(h1)], vec![], ca),
            _ => fed(FederationMode::Spoke, vec![], vec![url(h1), url(h2)], ca),
        })
        .await;
        let (_agent, _) = echo_agent("spoke-agent", bs[3].options(), 10).await;
        let c = caller("spoke-caller", bs[2].options()).await;
        let took = routable(&c, "spoke-agent", Duration::from_secs(20)).await;
        eprintln!("hub-and-spoke: spoke-to-spoke routable after {took:?}");
        // Kill hub 1: both spokes fail over to hub 2 and calls flow again.
        let h1b = bs.remove(0);
        h1b.broker.shutdown().await;
        let took = routable(&c, "spoke-agent", Duration::from_secs(30)).await;
        eprintln!("hub-and-spoke: routable again through the second hub after {took:?}");
    })
    .await;
}

#[tokio::test]
async fn mesh_of_hubs_each_with_a_spoke() {
    bounded(90, async {
        let (h1, h2, s1, s2) = (host(67), host(68), host(69), host(70));
        let (bs, _ca) = cluster(&[h1, h2, s1, s2], |i, ca| match i {
            0 => fed(FederationMode::Hub, vec![url(h2)], vec![], ca),
            1 => fed(FederationMode::Hub, vec![url(h1)], vec![], ca),
            2 => fed(FederationMode::Spoke, vec![], vec![url(h1)], ca),
            _ => fed(FederationMode::Spoke, vec![], vec![url(h2)], ca),
        })
        .await;
        let (_agent, _) = echo_agent("edge-agent", bs[3].options(), 10).await;
        let c = caller("edge-caller", bs[2].options()).await;
        let took = routable(&c, "edge-agent", Duration::from_secs(20)).await;
        eprintln!("mesh of hubs: spoke to spoke across hubs after {took:?}");
        let r = c
            .call(
                Target::Agent(AgentId::new("edge-agent").unwrap()),
                "echo",
                json!({"hops": 3}),
            )
            .await
            .unwrap();
        assert_eq!(r, json!({"hops": 3}));
    })
    .await;
}

#[tokio::test]
async fn peer_key_not_listed_is_refused() {
    bounded(60, async {
        let (a, b) = (host(71), host(72));
        let (bs, _ca) = cluster(&[a, b], |i, ca| {
            let mut f = fed(
                FederationMode::Mesh,
                vec![url(if i == 0 { b } else { a })],
                vec![],
                ca,
            );
            // Only a key nobody has is allowed.
            f.peer_keys = Some(vec![fem_proto::SigningKey::generate().public_key()]);
            f
        })
        .await;
        let (_agent, _) = echo_agent("lonely", bs[1].options(), 10).await;
        let c = caller("lonely-caller", bs[0].options()).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let e = c
            .call(
                Target::Agent(AgentId::new("lonely").unwrap()),
                "echo",
                json!({}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoRoute);
        let m = bs[0].broker.metrics().render();
        assert!(
            m.contains("fem_broker_refusals_total{reason=\"PEER_REFUSED\"}"),
            "{m}"
        );
        let _ = ca_of(&bs[0]);
    })
    .await;
}

#[tokio::test]
async fn link_loss_withdraws_routes_and_fails_calls_in_flight() {
    bounded(90, async {
        let (a, b) = (host(73), host(74));
        let (mut bs, _ca) = cluster(&[a, b], |i, ca| {
            fed(
                FederationMode::Mesh,
                vec![url(if i == 0 { b } else { a })],
                vec![],
                ca,
            )
        })
        .await;
        let (_agent, _) = echo_agent("behind-b", bs[1].options(), 10).await;
        let c = caller("caller-73", bs[0].options()).await;
        routable(&c, "behind-b", Duration::from_secs(20)).await;
        let slow = {
            let c = c.clone();
            tokio::spawn(async move {
                c.call_with_timeout(
                    Target::Agent(AgentId::new("behind-b").unwrap()),
                    "echo",
                    json!({"sleep_ms": 20000}),
                    Duration::from_secs(30),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        let b1 = bs.remove(1);
        b1.broker.shutdown().await; // its links close
        let e = slow.await.unwrap().unwrap_err();
        assert_eq!(e.code, ErrorCode::AgentUnavailable, "{e}");
        eprintln!(
            "link loss: call in flight answered AGENT_UNAVAILABLE after {:?}",
            t.elapsed()
        );
        assert!(
            eventually(Duration::from_secs(10), || bs[0]
                .broker
                .metrics()
                .render()
                .contains("fem_broker_routes 0"))
            .await,
            "route not withdrawn"
        );
        eprintln!("link loss: route withdrawn after {:?}", t.elapsed());
        let e = c
            .call(
                Target::Agent(AgentId::new("behind-b").unwrap()),
                "echo",
                json!({}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoRoute);
    })
    .await;
}

#[tokio::test]
async fn ten_brokers_in_a_mesh_converge() {
    bounded(120, async {
        let addrs: Vec<SocketAddr> = (0..10).map(|i| host(80 + i)).collect();
        let urls: Vec<String> = addrs.iter().map(|a| url(*a)).collect();
        let t = Instant::now();
        let (bs, _ca) = cluster(&addrs, |i, ca| {
            let peers = urls
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, u)| u.clone())
                .collect();
            fed(FederationMode::Mesh, peers, vec![], ca)
        })
        .await;
        let mut agents = Vec::new();
        for (i, b) in bs.iter().enumerate() {
            agents.push(echo_agent(&format!("agent-{i}"), b.options(), 10).await);
        }
        // Every broker routes to every agent.
        let ok = eventually(Duration::from_secs(60), || {
            bs.iter()
                .all(|b| b.broker.metrics().render().contains("fem_broker_routes 9"))
        })
        .await;
        assert!(ok, "the mesh did not converge");
        eprintln!(
            "ten-broker mesh: every broker routes to all 10 agents {:?} after start",
            t.elapsed()
        );
        let c = caller("caller-80", bs[0].options()).await;
        for i in 0..10 {
            c.call(
                Target::Agent(AgentId::new(format!("agent-{i}")).unwrap()),
                "echo",
                json!({}),
            )
            .await
            .unwrap();
        }
    })
    .await;
}

/// Starts a broker process in `dir` (whose tls/ holds the shared CA).
async fn broker_proc(addr: SocketAddr, dir: &Path, ca: &Path, peer: SocketAddr) -> fem_tests::Proc {
    let listen = addr.to_string();
    let peer = url(peer);
    let id = format!("proc-{}", addr.ip());
    let mut p = fem_tests::Proc::spawn(
        "fem-broker",
        &[
            "--listen",
            &listen,
            "--data-dir",
            dir.to_str().unwrap(),
            "--broker-id",
            &id,
            "--federation-mode",
            "mesh",
            "--peer",
            &peer,
            "--ca",
            ca.to_str().unwrap(),
            "--link-timeout",
            "1s",
        ],
        &[],
    );
    p.wait_for("fem-broker listening", Duration::from_secs(30))
        .await;
    p
}

#[tokio::test]
async fn killed_broker_is_withdrawn_and_rejoins_after_restart() {
    bounded(120, async {
        let (a, b) = (host(95), host(96));
        let ca_dir = tempfile::tempdir().unwrap();
        fem_broker::tls::load_material(&fem_broker::TlsSource::SelfSigned, ca_dir.path(), &["localhost".into()]).unwrap();
        let ca = ca_dir.path().join("tls/ca.pem");
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [&da, &db] {
            std::fs::create_dir_all(d.path().join("tls")).unwrap();
            for f in ["ca.pem", "ca.key"] {
                std::fs::copy(ca_dir.path().join("tls").join(f), d.path().join("tls").join(f)).unwrap();
            }
        }
        let _pa = broker_proc(a, da.path(), &ca, b).await;
        let pb = broker_proc(b, db.path(), &ca, a).await;
        let (agent, _) = echo_agent("on-b", fem_tests::options_for(b, &ca), 10).await;
        let c = caller("on-a", fem_tests::options_for(a, &ca)).await;
        let took = routable(&c, "on-b", Duration::from_secs(20)).await;
        eprintln!("processes: agent on B routable from A after {took:?}");

        pb.signal("KILL");
        let t = Instant::now();
        let mut withdrawn = None;
        while t.elapsed() < Duration::from_secs(15) {
            match c.call(Target::Agent(AgentId::new("on-b").unwrap()), "echo", json!({})).await {
                Err(e) if e.code == ErrorCode::NoRoute => {
                    withdrawn = Some(t.elapsed());
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let withdrawn = withdrawn.expect("routes of the killed broker were not withdrawn");
        eprintln!("processes: SIGKILLed broker's agent withdrawn at A after {withdrawn:?} (link timeout 1s)");
        // A call now fails fast with a typed error.
        let t2 = Instant::now();
        let e = c.call(Target::Agent(AgentId::new("on-b").unwrap()), "echo", json!({})).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NoRoute);
        assert!(t2.elapsed() < Duration::from_secs(2));

        drop(pb);
        let t = Instant::now();
        let _pb = broker_proc(b, db.path(), &ca, a).await;
        assert!(agent.wait_connected(Duration::from_secs(30)).await, "agent did not re-register at B");
        let took = routable(&c, "on-b", Duration::from_secs(30)).await;
        eprintln!("processes: after restart, routable again from A {:?} after B started ({took:?} of polling)", t.elapsed());
    })
    .await;
}
