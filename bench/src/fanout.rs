//! Workload 7: event fan-out. One publisher emits 256 B events on a topic
//! that 1, 10 or 100 subscribers (each on its own connection) receive: over
//! FEM (the SDK's `emit` and `subscribe`, QUIC and TLS/TCP, one broker;
//! signed events, and broker-attested ones with `emit_attested` and
//! `subscribe_accepting_attested`) and over NATS with TLS
//! (publish/subscribe, async-nats).
//!
//! Flow control is the same for both: the publisher keeps at most
//! [`WINDOW`] events in flight, an event being in flight until every
//! subscriber has it (counted in deliveries: `WINDOW x subscribers`), and
//! refills from half the window. Figures are delivered events per second
//! summed over subscribers, and publish-to-delivery latency (the publisher
//! puts its clock in the payload; publisher and subscribers share this
//! process). Deliveries still missing a second after the window stalls, or
//! two seconds after a run, are counted as dropped.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use fem_agent_sdk::{Client, Transport};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::Notify;

use crate::calls::{caller, options};
use crate::load::{median, percentile};
use crate::procs::{BrokerProc, NatsProc, RoleCpu, host_ip};
use crate::report::{self, Row};
use crate::{Settings, Workload};

/// Size of one event's payload (JSON text).
const EVENT_BYTES: usize = 256;
/// Events in flight (published, not yet delivered to every subscriber).
const WINDOW: i64 = 64;
/// A stalled window gives up on its missing deliveries after this.
const WRITE_OFF: Duration = Duration::from_secs(1);
/// Host of the fan-out broker and of its nats-server in the bench network.
const BROKER_HOST: u8 = 40;
const NATS_HOST: u8 = 41;
/// Events one sender may publish per second on the fan-out broker (the
/// broker's default, 100, would be the figure otherwise).
const EVENT_RATE: &str = "1000000";

/// Delivery accounting of one topic, shared by its publisher and subscribers.
#[derive(Debug)]
struct Flow {
    /// Clock of the payload timestamps.
    base: Instant,
    subscribers: i64,
    /// Deliveries owed (events published x subscribers), made, given up.
    expected: AtomicI64,
    delivered: AtomicI64,
    written_off: AtomicI64,
    /// The publisher waits for deliveries to go down to `low_water`.
    waiting: AtomicBool,
    low_water: i64,
    wake: Notify,
    /// The measured window, nanoseconds on `base`.
    from_ns: AtomicU64,
    stop_ns: AtomicU64,
    /// Latencies (microseconds) recorded by each subscriber.
    samples: Vec<Mutex<Vec<u32>>>,
}

impl Flow {
    fn new(base: Instant, subscribers: usize) -> Self {
        let n = i64::try_from(subscribers).unwrap_or(i64::MAX);
        Self {
            base,
            subscribers: n,
            expected: AtomicI64::new(0),
            delivered: AtomicI64::new(0),
            written_off: AtomicI64::new(0),
            waiting: AtomicBool::new(false),
            low_water: WINDOW / 2 * n,
            wake: Notify::new(),
            from_ns: AtomicU64::new(u64::MAX),
            stop_ns: AtomicU64::new(0),
            samples: (0..subscribers).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Deliveries owed and not yet made or given up.
    fn outstanding(&self) -> i64 {
        self.expected.load(Ordering::Acquire)
            - self.delivered.load(Ordering::Acquire)
            - self.written_off.load(Ordering::Acquire)
    }

    /// Subscriber `i` received an event published at `t_ns`.
    fn delivered(&self, i: usize, t_ns: u64) {
        let now = self.now_ns();
        if t_ns >= self.from_ns.load(Ordering::Relaxed)
            && now <= self.stop_ns.load(Ordering::Relaxed)
        {
            let us = u32::try_from((now.saturating_sub(t_ns)) / 1000).unwrap_or(u32::MAX);
            if let Ok(mut v) = self.samples[i].lock() {
                v.push(us);
            }
        }
        self.delivered.fetch_add(1, Ordering::AcqRel);
        if self.waiting.load(Ordering::Acquire) && self.outstanding() <= self.low_water {
            self.wake.notify_one();
        }
    }
}

/// The payload of an event published at `t_ns`: `{"data":"xx...","t":T}`,
/// [`EVENT_BYTES`] long.
fn event_json(t_ns: u64) -> String {
    let t = t_ns.to_string();
    let overhead = r#"{"data":"","t":}"#.len() + t.len();
    format!(
        r#"{{"data":"{}","t":{t}}}"#,
        "x".repeat(EVENT_BYTES.saturating_sub(overhead))
    )
}

#[derive(serde::Deserialize)]
struct Stamp {
    t: u64,
}

/// Where events are published.
enum Publisher {
    /// A FEM client, emitting broker-attested events when `true`.
    Fem(Client, bool),
    Nats(async_nats::Client),
}

impl Publisher {
    async fn publish(&self, topic: &str, t_ns: u64) -> Result<(), String> {
        match self {
            Self::Fem(c, attested) => {
                let v: serde_json::Value =
                    serde_json::from_str(&event_json(t_ns)).map_err(|e| e.to_string())?;
                let r = if *attested {
                    c.emit_attested(topic, v).await
                } else {
                    c.emit(topic, v).await
                };
                r.map_err(|e| e.to_string())
            }
            Self::Nats(c) => c
                .publish(topic.to_owned(), Bytes::from(event_json(t_ns)))
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// One system: a publisher, its server, and one flow per subscriber count.
struct System {
    name: &'static str,
    server_pid: u32,
    publisher: Publisher,
    /// (subscribers, topic, flow)
    flows: Vec<(usize, String, Arc<Flow>)>,
    /// Slow-consumer signals seen so far (broker refusals or NATS events).
    slow: SlowCounter,
}

enum SlowCounter {
    Broker(std::net::SocketAddr),
    Nats(Arc<AtomicU64>),
}

impl SlowCounter {
    async fn read(&self) -> f64 {
        match self {
            Self::Broker(metrics) => crate::procs::metric_at(
                *metrics,
                "fem_broker_refusals_total{reason=\"SLOW_CONSUMER\"}",
            )
            .await
            .ok()
            .flatten()
            .unwrap_or(0.0),
            Self::Nats(n) => n.load(Ordering::Relaxed) as f64,
        }
    }
}

/// Everything kept alive while the systems are measured.
#[derive(Default)]
struct Running {
    broker: Option<BrokerProc>,
    nats: Option<NatsProc>,
    fem_subscribers: Vec<Client>,
    nats_subscribers: Vec<async_nats::Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    systems: Vec<System>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn topic(system: &str, n: usize) -> String {
    // A topic is a capability: no `+`.
    format!("bench.fanout.{}.s{n}", system.replace('+', "-"))
}

async fn start_fem(
    s: &Settings,
    run: &mut Running,
    b: &BrokerProc,
    name: &'static str,
    transport: Transport,
    base: Instant,
) -> anyhow::Result<()> {
    let attested = name.ends_with("+attested");
    // Client ids allow no `+`.
    let id = name.replace('+', "-");
    let most = s.subscribers.iter().copied().max().unwrap_or(0);
    let mut subs = Vec::with_capacity(most);
    for i in 0..most {
        subs.push(caller(&format!("fanout-{id}-sub-{i}"), options(s, b, transport)?).await?);
    }
    let mut flows = Vec::new();
    for &n in &s.subscribers {
        let t = topic(name, n);
        let flow = Arc::new(Flow::new(base, n));
        for (i, c) in subs.iter().take(n).enumerate() {
            let rx = if attested {
                c.subscribe_accepting_attested(&t).await
            } else {
                c.subscribe(&t).await
            };
            let mut rx = rx.with_context(|| format!("subscribe to {t}"))?;
            let flow = Arc::clone(&flow);
            run.tasks.push(tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    if let Some(t_ns) = ev.payload.get("t").and_then(serde_json::Value::as_u64) {
                        flow.delivered(i, t_ns);
                    }
                }
            }));
        }
        flows.push((n, t, flow));
    }
    run.fem_subscribers.extend(subs);
    let publisher = caller(&format!("fanout-{id}-pub"), options(s, b, transport)?).await?;
    run.systems.push(System {
        name,
        server_pid: b.proc.pid(),
        publisher: Publisher::Fem(publisher, attested),
        flows,
        slow: SlowCounter::Broker(b.metrics),
    });
    Ok(())
}

async fn start_nats(s: &Settings, run: &mut Running, base: Instant) -> anyhow::Result<()> {
    let nats = NatsProc::start(
        &s.nats_bin,
        host_ip(s.net, NATS_HOST),
        &s.work.join("fanout-nats"),
        &s.ca,
    )
    .await?;
    let slow = Arc::new(AtomicU64::new(0));
    let most = s.subscribers.iter().copied().max().unwrap_or(0);
    let mut subs = Vec::with_capacity(most);
    for _ in 0..most {
        let slow = Arc::clone(&slow);
        let opts = async_nats::ConnectOptions::new().event_callback(move |e| {
            let slow = Arc::clone(&slow);
            async move {
                if matches!(e, async_nats::Event::SlowConsumer(_)) {
                    slow.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        subs.push(nats.connect_with(opts).await.context("NATS subscriber")?);
    }
    let name = "nats-tls";
    let mut flows = Vec::new();
    for &n in &s.subscribers {
        let t = topic(name, n);
        let flow = Arc::new(Flow::new(base, n));
        for (i, c) in subs.iter().take(n).enumerate() {
            let mut sub = c.subscribe(t.clone()).await.context("NATS subscribe")?;
            let flow = Arc::clone(&flow);
            run.tasks.push(tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    if let Ok(st) = serde_json::from_slice::<Stamp>(&msg.payload) {
                        flow.delivered(i, st.t);
                    }
                }
            }));
        }
        flows.push((n, t, flow));
    }
    // The subscriptions must reach the server before the first event.
    for c in &subs {
        c.flush().await.context("NATS flush")?;
    }
    run.nats_subscribers.extend(subs);
    let publisher = nats.connect().await.context("NATS publisher")?;
    run.systems.push(System {
        name,
        server_pid: nats.proc.pid(),
        publisher: Publisher::Nats(publisher),
        flows,
        slow: SlowCounter::Nats(slow),
    });
    run.nats = Some(nats);
    Ok(())
}

/// Figures of one measured run.
#[derive(Debug, Default)]
struct Measured {
    events_per_sec: f64,
    delivered_per_sec: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    cpu: crate::procs::RoleCpuUs,
    dropped: i64,
    publish_errors: u64,
    first_error: Option<String>,
    slow_consumers: f64,
    rss: u64,
}

/// Publishes on `topic` for `warmup + duration` under the window, then
/// waits for the last deliveries.
async fn measure(s: &Settings, sys: &System, topic: &str, flow: &Flow) -> anyhow::Result<Measured> {
    let slow_before = sys.slow.read().await;
    for v in &flow.samples {
        if let Ok(mut v) = v.lock() {
            v.clear();
        }
    }
    let before = RoleCpu::read(&[sys.server_pid], None)?;
    let t0 = Instant::now();
    let start = flow.now_ns();
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let from = start + ns(s.warmup);
    let stop = from + ns(s.duration);
    flow.from_ns.store(from, Ordering::Relaxed);
    flow.stop_ns.store(stop, Ordering::Relaxed);
    let n = flow.subscribers;
    let window = usize::try_from(WINDOW).unwrap_or(64);
    let mut inflight = FuturesUnordered::new();
    let (mut published, mut errors, mut first_error) = (0u64, 0u64, None);
    let mut dropped = 0i64;
    let mut on_result = |r: Result<(), String>| {
        if let Err(e) = r {
            // Not published: nobody owes these deliveries.
            flow.expected.fetch_sub(n, Ordering::AcqRel);
            errors += 1;
            first_error.get_or_insert(e);
        }
    };
    loop {
        let now = flow.now_ns();
        if now >= stop {
            break;
        }
        let full = flow.outstanding() >= WINDOW * n;
        if !full && inflight.len() < window {
            flow.expected.fetch_add(n, Ordering::AcqRel);
            if (from..stop).contains(&now) {
                published += 1;
            }
            inflight.push(sys.publisher.publish(topic, now));
            continue;
        }
        if full {
            flow.waiting.store(true, Ordering::Release);
        }
        let stall = tokio::time::sleep(WRITE_OFF);
        tokio::select! {
            biased;
            Some(r) = inflight.next(), if !inflight.is_empty() => on_result(r),
            () = flow.wake.notified(), if full => {}
            () = stall => {
                if full {
                    let lost = flow.outstanding().max(0);
                    flow.written_off.fetch_add(lost, Ordering::AcqRel);
                    dropped += lost;
                }
            }
        }
        flow.waiting.store(false, Ordering::Release);
    }
    // The last acknowledgements, then the last deliveries.
    let end = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(r)) = tokio::time::timeout_at(end.into(), inflight.next()).await {
        on_result(r);
    }
    drop(inflight);
    while flow.outstanding() > 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lost = flow.outstanding().max(0);
    flow.written_off.fetch_add(lost, Ordering::AcqRel);
    dropped += lost;
    let wall = t0.elapsed();
    let used = RoleCpu::read(&[sys.server_pid], None)?.since(&before);
    let mut all: Vec<u32> = Vec::new();
    for v in &flow.samples {
        if let Ok(mut v) = v.lock() {
            all.append(&mut v);
        }
    }
    all.sort_unstable();
    let secs = s.duration.as_secs_f64();
    Ok(Measured {
        events_per_sec: published as f64 / secs,
        delivered_per_sec: all.len() as f64 / secs,
        p50_us: percentile(&all, 0.50),
        p90_us: percentile(&all, 0.90),
        p99_us: percentile(&all, 0.99),
        // The CPU window includes warm-up and the drain: scaled to the measured part.
        cpu: used.us_per(all.len() as u64, secs / wall.as_secs_f64()),
        dropped,
        publish_errors: errors,
        first_error,
        slow_consumers: sys.slow.read().await - slow_before,
        rss: crate::procs::rss_of(sys.server_pid)?,
    })
}

/// Runs the fan-out workload.
pub(crate) async fn run(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let base = Instant::now();
    let mut run = Running::default();
    let mut b = BrokerProc::start(
        &s.broker_bin,
        host_ip(s.net, BROKER_HOST),
        &s.work.join("fanout"),
        &s.ca,
        &["--event-rate".to_owned(), EVENT_RATE.to_owned()],
    )
    .await?;
    b.wait_ready(Duration::from_secs(60)).await?;
    start_fem(s, &mut run, &b, "fem-quic", Transport::Quic, base).await?;
    start_fem(s, &mut run, &b, "fem-tls-tcp", Transport::Tcp, base).await?;
    start_fem(s, &mut run, &b, "fem-quic+attested", Transport::Quic, base).await?;
    start_fem(
        s,
        &mut run,
        &b,
        "fem-tls-tcp+attested",
        Transport::Tcp,
        base,
    )
    .await?;
    start_nats(s, &mut run, base).await?;
    run.broker = Some(b);

    let mut rows = Vec::new();
    for (ci, &n) in s.subscribers.iter().enumerate() {
        let mut per_sys: Vec<Vec<Measured>> = run.systems.iter().map(|_| Vec::new()).collect();
        for _ in 0..s.repeat {
            for (i, sys) in run.systems.iter().enumerate() {
                let (_, topic, flow) = &sys.flows[ci];
                let m = measure(s, sys, topic, flow).await?;
                eprintln!(
                    "  fanout    {:<11} {n:>3} subs {:>9.0} events/s delivered  p50 {:>7.0} us  p99 {:>7.0} us  server cpu {:>5.1} us/event{}",
                    sys.name,
                    m.delivered_per_sec,
                    m.p50_us,
                    m.p99_us,
                    m.cpu.server,
                    if m.dropped > 0 || m.publish_errors > 0 {
                        format!(
                            "  dropped {} publish errors {} ({})",
                            m.dropped,
                            m.publish_errors,
                            m.first_error.as_deref().unwrap_or("-")
                        )
                    } else {
                        String::new()
                    }
                );
                per_sys[i].push(m);
            }
        }
        let mut case_rows: Vec<Row> = run
            .systems
            .iter()
            .zip(&per_sys)
            .map(|(sys, ms)| {
                let med =
                    |f: &dyn Fn(&Measured) -> f64| median(&ms.iter().map(f).collect::<Vec<_>>());
                let dropped: i64 = ms.iter().map(|m| m.dropped).sum();
                let publish_errors: u64 = ms.iter().map(|m| m.publish_errors).sum();
                let mut figures = std::collections::BTreeMap::new();
                figures.insert("events_published_per_s".into(), med(&|m| m.events_per_sec));
                figures.insert("dropped".into(), dropped as f64);
                figures.insert("publish_errors".into(), publish_errors as f64);
                figures.insert(
                    "slow_consumer_signals".into(),
                    ms.iter().map(|m| m.slow_consumers).sum(),
                );
                Row {
                    workload: Workload::Fanout.name().into(),
                    case: format!("{} {n} subs 256B", sys.name),
                    runs: ms.len(),
                    calls_per_sec: Some(med(&|m| m.delivered_per_sec)),
                    p50_us: Some(med(&|m| m.p50_us)),
                    p90_us: Some(med(&|m| m.p90_us)),
                    p99_us: Some(med(&|m| m.p99_us)),
                    cpu_us_per_call: Some(med(&|m| m.cpu.total())),
                    server_cpu_us_per_call: Some(med(&|m| m.cpu.server)),
                    caller_cpu_us_per_call: Some(med(&|m| m.cpu.caller)),
                    server_rss_bytes: ms.last().map(|m| m.rss),
                    errors: u64::try_from(dropped).unwrap_or(0) + publish_errors,
                    figures,
                    note: ms
                        .iter()
                        .find_map(|m| m.first_error.clone())
                        .map(|e| format!("first publish error: {e}"))
                        .unwrap_or_default(),
                    ..Row::default()
                }
            })
            .collect();
        report::compare_to_nats(&mut case_rows, |r| r.case.starts_with("nats-tls"));
        rows.extend(case_rows);
    }
    if let Some(b) = &mut run.broker {
        b.proc.check_alive()?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_asked_size() {
        for t in [0, 123_456_789, u64::MAX] {
            assert_eq!(event_json(t).len(), EVENT_BYTES);
            let st: Stamp = serde_json::from_str(&event_json(t)).unwrap_or(Stamp { t: 1 });
            assert_eq!(st.t, t);
        }
    }
}
