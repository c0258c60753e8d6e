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
    let ca_dir = fem_tests::shared_ca();
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
async fn spoke_with_one_hub_becomes_ready() {
    bounded(60, async {
        // A spoke given a single --federation-hub reports ready once that
        // link is up (it used to wait for a key no dialler ever set).
        let (h, s) = (host(111), host(112));
        let (bs, _ca) = cluster(&[h, s], |i, ca| match i {
            0 => fed(FederationMode::Hub, vec![], vec![], ca),
            _ => fed(FederationMode::Spoke, vec![], vec![url(h)], ca),
        })
        .await;
        let ca = bs[1].ca();
        let t = Instant::now();
        let last = loop {
            let r = fem_tests::https_get(s, &ca, "/ready").await;
            if r.0 == 200 || t.elapsed() > Duration::from_secs(20) {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(last.0, 200, "spoke never ready: {last:?}");
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

#[tokio::test]
async fn killed_broker_is_withdrawn_and_rejoins_after_restart() {
    bounded(120, async {
        let (a, b) = (host(95), host(96));
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [&da, &db] {
            fem_tests::seed_ca(ca_dir.path(), d.path());
        }
        let _pa = fem_tests::mesh_broker_proc(a, da.path(), &ca, &[b], "1s").await;
        let pb = fem_tests::mesh_broker_proc(b, db.path(), &ca, &[a], "1s").await;
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
        let _pb = fem_tests::mesh_broker_proc(b, db.path(), &ca, &[a], "1s").await;
        assert!(agent.wait_connected(Duration::from_secs(30)).await, "agent did not re-register at B");
        let took = routable(&c, "on-b", Duration::from_secs(30)).await;
        eprintln!("processes: after restart, routable again from A {:?} after B started ({took:?} of polling)", t.elapsed());
    })
    .await;
}

/// A dnsmasq serving SRV and A records for `brokers` (name, address).
fn dnsmasq(
    listen: SocketAddr,
    srv: &str,
    brokers: &[(&str, SocketAddr)],
) -> Option<tokio::process::Child> {
    let records: Vec<(&str, SocketAddr, u16)> = brokers.iter().map(|(n, a)| (*n, *a, 0)).collect();
    dnsmasq_prio(listen, srv, &records)
}

/// A dnsmasq serving `srv` with (target, address, priority) records, all of
/// weight 10; None (test skipped) when dnsmasq is not installed outside CI.
fn dnsmasq_prio(
    listen: SocketAddr,
    srv: &str,
    records: &[(&str, SocketAddr, u16)],
) -> Option<tokio::process::Child> {
    let mut args = vec![
        "--keep-in-foreground".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--bind-interfaces".to_owned(),
        format!("--listen-address={}", listen.ip()),
        format!("--port={}", listen.port()),
        "--pid-file=".to_owned(),
        "--local-ttl=0".to_owned(),
    ];
    for (name, addr, prio) in records {
        args.push(format!("--srv-host={srv},{name},{},{prio},10", addr.port()));
        args.push(format!("--host-record={name},{}", addr.ip()));
    }
    let bin = ["dnsmasq", "/usr/sbin/dnsmasq"].into_iter().find(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .is_ok()
    });
    let Some(bin) = bin else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install dnsmasq (Debian dnsmasq-base)"
        );
        eprintln!("skipping: dnsmasq not installed");
        return None;
    };
    Some(
        tokio::process::Command::new(bin)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    )
}

async fn restart_dns(
    old: &mut tokio::process::Child,
    listen: SocketAddr,
    srv: &str,
    brokers: &[(&str, SocketAddr)],
) {
    let _ = old.kill().await;
    let _ = old.wait().await;
    *old = dnsmasq(listen, srv, brokers).unwrap();
}

/// The value of the sample `name{labels}` in `b`'s metrics (0 if absent).
fn sample(b: &TestBroker, name: &str) -> f64 {
    b.broker
        .metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn peers_up(b: &TestBroker) -> u32 {
    sample(b, "fem_broker_federation_peers{state=\"up\"}") as u32
}

#[tokio::test]
async fn srv_discovery_joins_new_brokers_and_drops_removed_ones() {
    bounded(120, async {
        let dns = SocketAddr::new(host(97).ip(), 5353);
        let srv = "_fem._udp.fem.test";
        let addrs = [host(98), host(99), host(100), host(101)];
        let names = ["b1.fem.test", "b2.fem.test", "b3.fem.test", "b4.fem.test"];
        let three: Vec<(&str, SocketAddr)> = names.iter().copied().zip(addrs).take(3).collect();
        let Some(mut dns_proc) = dnsmasq(dns, srv, &three) else {
            return;
        };
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let disc = |ca: &Path| FederationConfig {
            discover_srv: vec![srv.to_owned()],
            discovery_interval: Duration::from_millis(500),
            dns_server: Some(dns),
            ..fed(FederationMode::Mesh, vec![], vec![], ca)
        };
        let mut bs = Vec::new();
        for i in 0..3 {
            // b2 only accepts links (it discovers nobody itself), so whether
            // the others keep a link to it is decided by DNS alone.
            let fc = if i == 1 {
                FederationConfig {
                    mode: FederationMode::Hub,
                    ..fed(FederationMode::Hub, vec![], vec![], &ca)
                }
            } else {
                disc(&ca)
            };
            let name = names[i].to_owned();
            bs.push(
                TestBroker::start_sharing_ca(addrs[i], ca_dir.path(), |c| {
                    c.federation = fc;
                    c.tls_names = vec![name];
                })
                .await,
            );
        }
        let (_a3, _) = echo_agent("srv-agent-3", bs[2].options(), 10).await;
        let c = caller("srv-caller", bs[0].options()).await;
        let took = routable(&c, "srv-agent-3", Duration::from_secs(20)).await;
        eprintln!("SRV: three brokers found each other; routable after {took:?}");
        assert!(eventually(Duration::from_secs(10), || peers_up(&bs[0]) == 2).await);

        // A fourth broker appears in DNS: it is joined on the next interval.
        let four: Vec<(&str, SocketAddr)> = names.iter().copied().zip(addrs).collect();
        restart_dns(&mut dns_proc, dns, srv, &four).await;
        let fc = disc(&ca);
        bs.push(
            TestBroker::start_sharing_ca(addrs[3], ca_dir.path(), |c| {
                c.federation = fc;
                c.tls_names = vec![names[3].to_owned()];
            })
            .await,
        );
        let (_a4, _) = echo_agent("srv-agent-4", bs[3].options(), 10).await;
        let t = Instant::now();
        routable(&c, "srv-agent-4", Duration::from_secs(20)).await;
        eprintln!(
            "SRV: fourth broker joined and routable after {:?}",
            t.elapsed()
        );
        assert!(eventually(Duration::from_secs(10), || peers_up(&bs[0]) == 3).await);

        // b2 leaves DNS: every broker drops its link to b2 and stops dialling it.
        assert_eq!(peers_up(&bs[1]), 3);
        let without_b2: Vec<(&str, SocketAddr)> = four
            .iter()
            .copied()
            .filter(|(n, _)| *n != "b2.fem.test")
            .collect();
        restart_dns(&mut dns_proc, dns, srv, &without_b2).await;
        let t = Instant::now();
        assert!(
            eventually(Duration::from_secs(10), || peers_up(&bs[1]) == 0).await,
            "b2 kept links"
        );
        eprintln!(
            "SRV: broker removed from DNS dropped by all after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            peers_up(&bs[1]),
            0,
            "a broker removed from DNS was dialled again"
        );
        assert_eq!(peers_up(&bs[0]), 2);
        eprintln!("SRV: removed broker dropped and not dialled again");
    })
    .await;
}

#[tokio::test]
async fn srv_failures_are_counted_not_fatal() {
    bounded(60, async {
        let dns = SocketAddr::new(host(102).ip(), 5353);
        let Some(_dns) = dnsmasq(dns, "_fem._udp.other.test", &[("x.other.test", host(104))])
        else {
            return;
        };
        let b = TestBroker::start(host(103), |c| {
            c.federation = FederationConfig {
                mode: FederationMode::Mesh,
                discover_srv: vec!["_fem._udp.missing.test".into()],
                discovery_interval: Duration::from_millis(300),
                dns_server: Some(dns),
                ..FederationConfig::default()
            };
        })
        .await;
        assert!(
            eventually(Duration::from_secs(15), || b
                .broker
                .metrics()
                .render()
                .contains("fem_broker_discovery_errors_total"))
            .await,
            "resolution failures were not counted"
        );
        let (_a, _) = echo_agent("still-alive", b.options(), 10).await;
        let c = caller("still-caller", b.options()).await;
        c.call(
            Target::Agent(AgentId::new("still-alive").unwrap()),
            "echo",
            json!({}),
        )
        .await
        .unwrap();
    })
    .await;
}

#[tokio::test]
async fn spokes_pick_hubs_by_srv_priority_and_hubs_listen_apart() {
    bounded(120, async {
        let dns = SocketAddr::new(host(105).ip(), 5353);
        let (h1, h2, s1, s2) = (host(106), host(107), host(108), host(109));
        // Hub 1 takes links on a port of its own.
        let h1_fed = SocketAddr::new(h1.ip(), 8444);
        let srv = "_fem-hub._udp.fem.test";
        // Wait until the binary dnsmasq is known to exist (or skip).
        if dnsmasq(
            SocketAddr::new(host(110).ip(), 5353),
            "_x._udp.fem.test",
            &[],
        )
        .is_none()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _dns = dnsmasq_prio(
            dns,
            srv,
            &[("hub1.fem.test", h1_fed, 10), ("hub2.fem.test", h2, 20)],
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let hub = |listen: Option<SocketAddr>, peer: String| FederationConfig {
            listen,
            ..fed(FederationMode::Hub, vec![peer], vec![], &ca)
        };
        let spoke = || FederationConfig {
            dns_server: Some(dns),
            ..fed(
                FederationMode::Spoke,
                vec![],
                vec![format!("srv:{srv}")],
                &ca,
            )
        };
        let b_h1 = TestBroker::start_sharing_ca(h1, ca_dir.path(), |c| {
            c.federation = hub(Some(h1_fed), url(h2));
            c.tls_names = vec!["hub1.fem.test".into()];
        })
        .await;
        let b_h2 = TestBroker::start_sharing_ca(h2, ca_dir.path(), |c| {
            c.federation = hub(None, format!("https://{h1_fed}"));
            c.tls_names = vec!["hub2.fem.test".into()];
        })
        .await;
        let b_s1 =
            TestBroker::start_sharing_ca(s1, ca_dir.path(), |c| c.federation = spoke()).await;
        let b_s2 =
            TestBroker::start_sharing_ca(s2, ca_dir.path(), |c| c.federation = spoke()).await;
        let (_a, _) = echo_agent("prio-agent", b_s2.options(), 10).await;
        let c = caller("prio-caller", b_s1.options()).await;
        let took = routable(&c, "prio-agent", Duration::from_secs(20)).await;
        eprintln!("srv: hubs: spoke-to-spoke routable after {took:?}");
        // Both spokes chose the priority-10 hub (over its separate port).
        assert!(
            eventually(Duration::from_secs(10), || peers_up(&b_h1) >= 3).await,
            "spokes did not pick hub 1"
        );
        assert_eq!(peers_up(&b_h2), 1, "only hub 1 links to hub 2");
        // Hub 1 goes: the spokes fail over to the priority-20 hub.
        b_h1.broker.shutdown().await;
        let took = routable(&c, "prio-agent", Duration::from_secs(30)).await;
        eprintln!("srv: hubs: failed over to the priority-20 hub after {took:?}");
        assert!(peers_up(&b_h2) >= 2);
    })
    .await;
}

/// `fem_broker_federation_bytes_total{direction}` of an in-process broker.
fn fed_bytes(b: &TestBroker, direction: &str) -> u64 {
    let name = format!("fem_broker_federation_bytes_total{{direction=\"{direction}\"}}");
    sample(b, &name) as u64
}

/// Waits until `b` routes `n` remote agents.
async fn routes(b: &TestBroker, n: usize) {
    assert!(
        eventually(Duration::from_secs(30), || sample(b, "fem_broker_routes")
            == n as f64)
        .await,
        "{} does not route {n} agents",
        b.broker.local_addr()
    );
}

/// Over real links, one registration costs the same bytes with 10 agents
/// registered as with 111: one delta, counted in
/// `fem_broker_federation_bytes_total` on both ends. (Pings are slowed to
/// one a minute so that only route messages cross the link.)
#[tokio::test]
async fn link_bytes_per_registration_do_not_grow_with_the_agents_registered() {
    bounded(120, async {
        let (a, b) = (host(350), host(351));
        let (bs, _ca) = cluster(&[a, b], |i, ca| FederationConfig {
            ping_interval: Duration::from_secs(60),
            link_timeout: Duration::from_secs(120),
            ..fed(
                FederationMode::Mesh,
                vec![url(if i == 0 { b } else { a })],
                vec![],
                ca,
            )
        })
        .await;
        let mut agents = Vec::new();
        let mut add = async |from: usize, n: usize| {
            for i in from..from + n {
                agents.push(echo_agent(&format!("agent-{i:04}"), bs[0].options(), 1).await);
            }
        };
        add(0, 10).await;
        routes(&bs[1], 10).await;
        // One more registration, measured on both ends of the link.
        let one_more = async |name: &str, total: usize| {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (sent, received) = (fed_bytes(&bs[0], "sent"), fed_bytes(&bs[1], "received"));
            let agent = echo_agent(name, bs[0].options(), 1).await;
            routes(&bs[1], total).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let d = (
                fed_bytes(&bs[0], "sent") - sent,
                fed_bytes(&bs[1], "received") - received,
            );
            (agent, d)
        };
        let (_x1, small) = one_more("extra-1", 11).await;
        add(10, 100).await;
        routes(&bs[1], 111).await;
        let (_x2, large) = one_more("extra-2", 112).await;
        eprintln!(
            "link bytes for one registration: {small:?} (sent, received) with 10 agents registered, {large:?} with 111"
        );
        assert_eq!(small.0, small.1, "sent and received disagree");
        assert_eq!(small, large, "the bytes grew with the agents registered");
        assert!(small.0 > 0 && small.0 < 200, "{small:?}");
    })
    .await;
}

/// A stub spoke (`--federation-routes summary`) learns kinds of agent, not
/// agent ids: it routes nothing by id, yet calls by capability and by id
/// reach agents behind the hub, which chooses; its own agent is reachable
/// from the other spoke; more agents of a kind it knows cost its link
/// nothing, and a new kind is one summary.
#[tokio::test]
async fn a_stub_spoke_routes_through_summaries_without_agent_ids() {
    bounded(120, async {
        let (h, s, p) = (host(380), host(381), host(382));
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let mut bs = Vec::new();
        for (i, a) in [h, s, p].into_iter().enumerate() {
            let fc = FederationConfig {
                // Only route messages cross the links while bytes are counted.
                ping_interval: Duration::from_secs(60),
                link_timeout: Duration::from_secs(120),
                stub: i == 1,
                ..match i {
                    0 => fed(FederationMode::Hub, vec![], vec![], &ca),
                    _ => fed(FederationMode::Spoke, vec![], vec![url(h)], &ca),
                }
            };
            bs.push(
                TestBroker::start_sharing_ca(a, ca_dir.path(), |c| {
                    c.federation = fc;
                    c.admin_token = Some("view-token".into());
                })
                .await,
            );
        }
        let mut agents = Vec::new();
        for i in 0..20 {
            agents.push(echo_agent(&format!("p-agent-{i:02}"), bs[2].options(), 4).await);
        }
        let counter = std::sync::Arc::new(std::sync::Mutex::new(0));
        let _own = fem_agent_sdk::AgentBuilder::new(
            AgentId::new("s-agent").unwrap(),
            fem_proto::SigningKey::generate(),
        )
        .capability("local.only")
        .unwrap()
        .tool(fem_tests::echo_tool(std::sync::Arc::clone(&counter)))
        .connect(bs[1].options())
        .await
        .unwrap();
        routes(&bs[0], 21).await;
        routes(&bs[2], 1).await;

        let c = caller("stub-caller", bs[1].options()).await;
        let by_cap = Target::Capability(CapabilityPattern::new("echo.*").unwrap());
        let t = Instant::now();
        let r = loop {
            match c.call(by_cap.clone(), "echo", json!({"n": 1})).await {
                Err(e) if e.code == ErrorCode::NoRoute && t.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => break r,
            }
        };
        assert_eq!(r.unwrap(), json!({"n": 1}));
        eprintln!("stub: first call by capability through the summary after {:?}", t.elapsed());
        // No agent id crossed to the stub; its peers view shows the kind.
        assert_eq!(sample(&bs[1], "fem_broker_routes"), 0.0);
        let auth = [("Authorization", "Bearer view-token")];
        let (status, body) = fem_tests::https(s, &bs[1].ca(), "GET", "/v1/peers", &auth, "").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"summary\"") && body.contains("echo.basic"), "{body}");
        let r = c
            .call(
                Target::Agent(AgentId::new("p-agent-07").unwrap()),
                "echo",
                json!({"n": 2}),
            )
            .await
            .unwrap();
        assert_eq!(r, json!({"n": 2}));
        assert_eq!(*agents[7].1.lock().unwrap(), 1, "p-agent-07 ran the call by id");
        let served: u32 = agents.iter().map(|a| *a.1.lock().unwrap()).sum();
        assert_eq!(served, 2);
        // The hub answers for ids it does not know; the stub for kinds no
        // summary holds.
        let e = c
            .call(
                Target::Agent(AgentId::new("nobody").unwrap()),
                "echo",
                json!({}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoRoute, "{e}");
        let e = c
            .call(
                Target::Capability(CapabilityPattern::new("nothing.*").unwrap()),
                "echo",
                json!({}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoRoute, "{e}");
        // The stub's own agent is advertised in full: the other spoke calls it by id.
        let pc = caller("p-caller", bs[2].options()).await;
        let r = pc
            .call(
                Target::Agent(AgentId::new("s-agent").unwrap()),
                "echo",
                json!({"n": 3}),
            )
            .await
            .unwrap();
        assert_eq!(r, json!({"n": 3}));
        assert_eq!(*counter.lock().unwrap(), 1);

        // Ten more agents of a kind the stub knows: nothing reaches it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = fed_bytes(&bs[1], "received");
        for i in 20..30 {
            agents.push(echo_agent(&format!("p-agent-{i:02}"), bs[2].options(), 4).await);
        }
        routes(&bs[0], 31).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let same_kind = fed_bytes(&bs[1], "received") - before;
        // One agent of a new kind: one summary.
        let _new = fem_agent_sdk::AgentBuilder::new(
            AgentId::new("p-new-kind").unwrap(),
            fem_proto::SigningKey::generate(),
        )
        .capability("other.kind")
        .unwrap()
        .tool(fem_tests::echo_tool(std::sync::Arc::new(std::sync::Mutex::new(0))))
        .connect(bs[2].options())
        .await
        .unwrap();
        routes(&bs[0], 32).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let new_kind = fed_bytes(&bs[1], "received") - before - same_kind;
        eprintln!(
            "stub link bytes: {same_kind} for 10 agents of a known kind, {new_kind} for one of a new kind"
        );
        assert_eq!(same_kind, 0);
        assert!(new_kind > 0 && new_kind < 300, "{new_kind}");
        let r = c
            .call(
                Target::Capability(CapabilityPattern::new("other.*").unwrap()),
                "echo",
                json!({"n": 4}),
            )
            .await
            .unwrap();
        assert_eq!(r, json!({"n": 4}));
    })
    .await;
}
