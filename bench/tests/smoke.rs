//! Smoke test: the harness runs every workload at a tiny size and produces
//! every row. It asserts nothing about speed; figures come from real runs of
//! `fem-bench` (see BENCHMARKS.md).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn every_workload_produces_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fem-bench"))
        .args([
            "--duration",
            "300ms",
            "--warmup",
            "100ms",
            "--repeat",
            "1",
            "--payloads",
            "256,16384",
            "--concurrency",
            "1,4",
            "--scale",
            "40",
            "--mesh-size",
            "3",
            "--rounds",
            "1",
            "--subscribers",
            "1,3",
            "--fed-agents",
            "10",
            // Its own /24 of loopback, apart from the integration tests' hosts.
            "--net",
            "127.0.201.0",
            "--json",
        ])
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("fem-bench did not finish within 600 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut table = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut table).unwrap();
    eprintln!("{table}");
    assert!(status.success(), "fem-bench failed: {status}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let cases = |w: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r["workload"] == w)
            .map(|r| r["case"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut want_calls = Vec::new();
    for size in ["256B", "16KiB"] {
        for c in [1, 4] {
            want_calls.push(("single", format!("quic {size} c={c}")));
            want_calls.push(("single", format!("tls-tcp {size} c={c}")));
            want_calls.push(("single", format!("mcp-https {size} c={c}")));
            want_calls.push(("federated", format!("mesh2 {size} c={c}")));
            want_calls.push(("federated", format!("mesh2+verify {size} c={c}")));
            want_calls.push(("federated", format!("hub {size} c={c}")));
            want_calls.push(("nats", format!("nats-tls {size} c={c}")));
            for attested in ["quic+attested", "tls-tcp+attested"] {
                want_calls.push(("single", format!("{attested} {size} c={c}")));
            }
            for attested in ["mesh2+attested", "hub+attested"] {
                want_calls.push(("federated", format!("{attested} {size} c={c}")));
            }
        }
    }
    for (w, case) in &want_calls {
        let row = rows
            .iter()
            .find(|r| r["workload"] == *w && r["case"] == case.as_str())
            .unwrap_or_else(|| panic!("no row {w} / {case}; rows: {:?}", cases(w)));
        assert!(
            row["calls_per_sec"].as_f64().unwrap() > 0.0,
            "{w} / {case}: no calls"
        );
        assert_eq!(row["errors"], 0, "{w} / {case}: {}", row["note"]);
        assert!(row["p99_us"].as_f64().unwrap() >= row["p50_us"].as_f64().unwrap());
        for role in [
            "server_cpu_us_per_call",
            "caller_cpu_us_per_call",
            "agent_cpu_us_per_call",
        ] {
            assert!(row[role].as_f64().is_some(), "{w} / {case}: no {role}");
        }
        if *w != "nats" {
            assert!(
                row["vs_nats_throughput"].as_f64().is_some(),
                "{w} / {case}: no NATS ratio"
            );
            // Attested calls do no signature work: no floor to compare with.
            assert_eq!(
                row["vs_crypto_floor"].as_f64().is_some(),
                !case.contains("+attested"),
                "{w} / {case}: floor ratio"
            );
        }
    }
    assert_eq!(cases("crypto").len(), 8, "{:?}", cases("crypto"));
    let scale = cases("scale");
    for t in ["quic", "tls-tcp"] {
        for want in [
            format!("{t} 40 agents register"),
            format!("{t} call by id among 40 agents 256B c=1"),
            format!("{t} call by capability among 40 agents 256B c=1"),
        ] {
            assert!(scale.contains(&want), "no scale row {want:?} in {scale:?}");
        }
        let reg = rows
            .iter()
            .find(|r| r["case"] == format!("{t} 40 agents register").as_str())
            .unwrap();
        assert_eq!(reg["errors"], 0, "{reg}");
        assert!(
            reg["figures"]["broker_rss_per_agent_bytes"]
                .as_f64()
                .is_some()
        );
    }
    for sys in [
        "fem-quic",
        "fem-tls-tcp",
        "fem-quic+attested",
        "fem-tls-tcp+attested",
        "nats-tls",
    ] {
        for n in [1, 3] {
            let case = format!("{sys} {n} subs 256B");
            let row = rows
                .iter()
                .find(|r| r["workload"] == "fanout" && r["case"] == case.as_str())
                .unwrap_or_else(|| panic!("no fanout row {case}; rows: {:?}", cases("fanout")));
            assert!(
                row["calls_per_sec"].as_f64().unwrap() > 0.0,
                "fanout / {case}: no events delivered"
            );
            assert_eq!(row["errors"], 0, "fanout / {case}: {row}");
            assert!(row["p99_us"].as_f64().unwrap() >= row["p50_us"].as_f64().unwrap());
            assert!(row["server_cpu_us_per_call"].as_f64().is_some());
        }
    }
    let fedscale = cases("fedscale");
    assert_eq!(fedscale.len(), 4, "{fedscale:?}");
    for r in rows.iter().filter(|r| r["workload"] == "fedscale") {
        if r["case"].as_str().unwrap().contains("register") {
            assert!(r["calls_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        } else {
            assert!(r["figures"]["median_ms"].as_f64().is_some(), "{r}");
        }
    }
    let fed = cases("federation");
    assert_eq!(fed.len(), 4, "{fed:?}");
    for r in rows.iter().filter(|r| r["workload"] == "federation") {
        assert!(r["figures"]["median_ms"].as_f64().is_some(), "{r}");
    }
}

/// Runs `fem-bench ARGS --json FILE` and returns the rows it wrote.
fn bench_rows(args: &[&str]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fem-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fem-bench {args:?} failed: {}",
        out.status
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    report["rows"].as_array().unwrap().clone()
}

/// The soak (run only when named) produces its row with its memory figures.
#[test]
fn the_soak_produces_its_row() {
    let rows = bench_rows(&["soak", "--soak", "3s", "--net", "127.0.202.0"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["workload"], "soak");
    assert_eq!(row["errors"], 0, "{row}");
    assert!(row["calls_per_sec"].as_f64().unwrap() > 0.0, "{row}");
    assert!(
        row["figures"]["rss_end_mib"].as_f64().unwrap() > 0.0,
        "{row}"
    );
}

/// The stubs run (only when named) produces a row per topology; the stub
/// spokes hold no agent id, so they receive less per registration.
#[test]
fn the_stubs_run_produces_both_rows() {
    let rows = bench_rows(&[
        "stubs",
        "--mesh-size",
        "3",
        "--fed-agents",
        "40",
        "--net",
        "127.0.203.0",
    ]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let bytes = |r: &serde_json::Value| {
        assert_eq!(r["workload"], "stubs");
        assert_eq!(r["errors"], 0, "{r}");
        assert!(
            r["figures"]["new_kind_callable_from_all_ms"]
                .as_f64()
                .is_some(),
            "{r}"
        );
        r["figures"]["spoke_bytes_received_per_registration"]
            .as_f64()
            .unwrap()
    };
    let (full, stub) = (bytes(&rows[0]), bytes(&rows[1]));
    assert!(
        stub < full,
        "stub spokes received {stub} B per registration, full spokes {full}"
    );
}
