//! Result rows: the printed table and the JSON file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// One line of the results.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Row {
    /// Workload group (`single`, `federated`, `nats`, `crypto`, `scale`,
    /// `federation`, `fanout`, `fedscale`).
    pub(crate) workload: String,
    /// The case within the group, e.g. `quic 256B c=16`.
    pub(crate) case: String,
    /// Repeated runs the medians are taken over.
    pub(crate) runs: usize,
    /// Median calls (or operations) per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) calls_per_sec: Option<f64>,
    /// Median latency percentiles, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) p90_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) p99_us: Option<f64>,
    /// Median CPU time of every process involved (servers, callers and
    /// agents) per completed call, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cpu_us_per_call: Option<f64>,
    /// The same split by role: the server processes (brokers or
    /// nats-server), the caller side (this process: callers, publisher,
    /// subscribers) and the agent side (the agent process: echo agents or
    /// the NATS responder), microseconds per call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) server_cpu_us_per_call: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) caller_cpu_us_per_call: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) agent_cpu_us_per_call: Option<f64>,
    /// Resident memory of the server processes at the end, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) server_rss_bytes: Option<u64>,
    /// Failed calls summed over the runs.
    pub(crate) errors: u64,
    /// Ratios to the NATS row with the same payload and concurrency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_nats_throughput: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_nats_p50: Option<f64>,
    /// Server CPU per call over nats-server's CPU per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_nats_server_cpu: Option<f64>,
    /// CPU per call divided by the signatures' cost per call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vs_crypto_floor: Option<f64>,
    /// Other named figures of the row.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) figures: BTreeMap<String, f64>,
    /// Parameters and remarks.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) note: String,
}

/// Fills the `vs_nats_*` ratios of every row of one case against the row
/// `is_nats` picks (the same case through nats-server).
pub(crate) fn compare_to_nats(rows: &mut [Row], is_nats: impl Fn(&Row) -> bool) {
    let nats = rows
        .iter()
        .find(|r| is_nats(r))
        .map(|r| (r.calls_per_sec, r.p50_us, r.server_cpu_us_per_call));
    let Some((Some(nt), Some(np), nc)) = nats else {
        return;
    };
    for r in rows.iter_mut().filter(|r| !is_nats(r)) {
        r.vs_nats_throughput = r.calls_per_sec.map(|t| t / nt);
        r.vs_nats_p50 = r.p50_us.map(|p| p / np);
        r.vs_nats_server_cpu = r
            .server_cpu_us_per_call
            .zip(nc.filter(|c| *c > 0.0))
            .map(|(c, n)| c / n);
    }
}

/// Run-wide facts printed with the table.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: BTreeMap<String, String>,
    pub(crate) settings: BTreeMap<String, String>,
    pub(crate) rows: Vec<Row>,
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.2}x"))
}

/// The table printed at the end.
pub(crate) fn table(rows: &[Row]) -> String {
    let head = [
        "workload",
        "case",
        "calls/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "cpu us/call",
        "srv us",
        "caller us",
        "agent us",
        "rss MiB",
        "thr/NATS",
        "p50/NATS",
        "srv/NATS",
        "cpu/floor",
        "err",
    ];
    let mut cells: Vec<Vec<String>> = vec![head.iter().map(|s| (*s).to_owned()).collect()];
    for r in rows {
        cells.push(vec![
            r.workload.clone(),
            r.case.clone(),
            num(r.calls_per_sec),
            num(r.p50_us),
            num(r.p90_us),
            num(r.p99_us),
            num(r.cpu_us_per_call),
            num(r.server_cpu_us_per_call),
            num(r.caller_cpu_us_per_call),
            num(r.agent_cpu_us_per_call),
            num(r.server_rss_bytes.map(|b| b as f64 / 1048576.0)),
            ratio(r.vs_nats_throughput),
            ratio(r.vs_nats_p50),
            ratio(r.vs_nats_server_cpu),
            ratio(r.vs_crypto_floor),
            r.errors.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, c) in cells.iter().enumerate() {
        for (i, cell) in c.iter().enumerate() {
            if i < 2 {
                let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
            } else {
                let _ = write!(out, "{cell:>w$}  ", w = widths[i]);
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        if n == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * widths.len()));
            out.push('\n');
        }
    }
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| !r.figures.is_empty() || !r.note.is_empty())
        .map(|r| {
            let figs: Vec<String> = r
                .figures
                .iter()
                .map(|(k, v)| format!("{k}={}", num(Some(*v))))
                .collect();
            format!("{} / {}: {} {}", r.workload, r.case, figs.join(" "), r.note)
        })
        .collect();
    if !notes.is_empty() {
        out.push_str("\nfigures:\n");
        for n in notes {
            out.push_str("  ");
            out.push_str(n.trim_end());
            out.push('\n');
        }
    }
    out
}
