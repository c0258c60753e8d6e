//! A process-level fault test: three `fem-broker` processes in a full mesh
//! under sustained calls from several callers, while a broker is SIGKILLed
//! and restarted and an agent is SIGKILLed mid-call and restarted.
//!
//! - Brokers A, B, C (hosts 320..=322) share one CA; B is killed and
//!   restarted with the same data directory, identity and address.
//! - Agents are `fem-fault-agent` processes (built from this crate): `X`
//!   behind B, `Y` behind C. Each execution appends `REQUEST CALLER TAG` to
//!   the agent's log before it sleeps and answers, so executions are counted
//!   outside the process that may die, including those a SIGKILL cut short.
//! - Callers: one SDK `Client` per broker (own key), and one raw-protocol
//!   caller on A and on C, each with several calls in flight, by capability
//!   and by agent id, every call with a unique `tag`.
//!
//! What "exactly one terminal answer" is checked against:
//! - raw callers read every frame the broker sends them and count the
//!   answers (a `deliver`ed toolResult or a `callFailed`) per request id;
//!   each request id they sent must get exactly one, and none may arrive
//!   for a request id they did not send. The SDK cannot hide anything here
//!   (the SDK drops an answer for an unknown request id silently, so a
//!   second answer would be invisible through a `Client`). Raw callers sit
//!   on A and C, whose connections stay up, so they check the brokers'
//!   promise for local calls, relayed calls and calls relayed through the
//!   broker that is killed;
//! - every call future returned once, within its deadline plus slack (no
//!   hang), and every issued call has one recorded outcome.
//!
//! No double execution: no request id and no tag appears twice in the
//! agents' logs, every logged tag belongs to an issued call, and every
//! successful result names the one execution line with its tag (same agent,
//! request id and caller).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fem_agent_sdk::{Client, Origin};
use fem_proto::{
    AgentId, Body, Capability, CapabilityPattern, Envelope, ErrorCode, Frame, Header, JsonText,
    PublicKey, RegisterAgent, RequestId, SignedEnvelope, SigningKey, Target, ToolCall, ToolOutcome,
};
use fem_tests::{Proc, host, options_for, ready_within};
use rand::Rng as _;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot};

use crate::bounded;

/// Every call's deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
/// Past the deadline a call must have returned by (the SDK's own guard is
/// the deadline plus 2 s).
const SLACK: Duration = Duration::from_secs(3);
/// Calls in flight per caller.
const WORKERS: usize = 4;
const BROKER_FLAGS: &[&str] = &["--heartbeat-interval", "500ms", "--heartbeat-grace", "2s"];
const LINK_TIMEOUT: &str = "2s";
const X: &str = "fault-x";
const Y: &str = "fault-y";

/// How one call ended.
#[derive(Clone, Debug)]
enum Outcome {
    /// The agent's result: which agent ran it, under which request id.
    Ok { agent: String, request: String },
    /// A typed error and who reported it.
    Failed { code: ErrorCode, origin: Origin },
    /// A raw caller's connection closed before the answer.
    Lost,
    /// No answer by the deadline plus slack.
    Hang,
}

impl Outcome {
    fn label(&self) -> String {
        match self {
            Self::Ok { .. } => "ok".into(),
            Self::Failed { code, origin } => match origin {
                Origin::Local => format!("{code}(local)"),
                Origin::Broker => code.to_string(),
                Origin::Agent => format!("{code}(agent)"),
            },
            Self::Lost => "LOST".into(),
            Self::Hang => "HANG".into(),
        }
    }
}

/// One issued call and its outcome.
#[derive(Clone, Debug)]
struct Record {
    caller: String,
    entry: usize,
    tag: String,
    target: &'static str,
    /// A probe of every route (not part of the sustained load).
    probe: bool,
    issued: Instant,
    elapsed: Duration,
    /// Known up front for raw callers.
    request: Option<String>,
    outcome: Outcome,
}

type RawAnswer = Result<(String, String), ErrorCode>;

/// A caller speaking the native protocol over TLS/TCP itself, so that it
/// sees every answer frame the broker sends.
struct RawCaller {
    id: AgentId,
    key: SigningKey,
    tx: mpsc::Sender<Frame>,
    waiters: Arc<Mutex<HashMap<RequestId, oneshot::Sender<RawAnswer>>>>,
    /// Answer frames received per request id.
    answers: Arc<Mutex<HashMap<RequestId, u32>>>,
    /// Request ids sent.
    sent: Mutex<HashSet<RequestId>>,
    closed: Arc<AtomicBool>,
}

impl RawCaller {
    async fn connect(addr: SocketAddr, ca: &Path, id: &str) -> Arc<Self> {
        let id = AgentId::new(id).unwrap();
        let key = SigningKey::generate();
        let mut conn = fem_tests::RawConn::connect(addr, ca).await;
        // A caller: no tools, no slots.
        let register = Envelope::new(
            Header::now(id.clone()),
            Body::RegisterAgent(RegisterAgent {
                public_key: key.public_key(),
                capabilities: vec![],
                tools: vec![],
                metadata: BTreeMap::new(),
                max_concurrent_calls: 0,
            }),
        );
        conn.send(&Frame::Envelope(
            SignedEnvelope::sign(&register, &key).unwrap(),
        ))
        .await;
        let fem_tests::RawConn {
            mut reader,
            writer: mut w,
        } = conn;
        match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
            Ok(Ok(Some(Frame::Accepted(_)))) => {}
            other => panic!("raw caller {id} not accepted: {other:?}"),
        }
        let (tx, mut rx) = mpsc::channel::<Frame>(256);
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let mut buf = Vec::new();
                fem_proto::encode_frame(&f, &mut buf, usize::MAX).unwrap();
                if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
                    break;
                }
            }
        });
        let hb = tx.clone();
        tokio::spawn(async move {
            for seq in 0.. {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if hb.send(Frame::Heartbeat { seq }).await.is_err() {
                    break;
                }
            }
        });
        let me = Arc::new(Self {
            id,
            key,
            tx,
            waiters: Arc::default(),
            answers: Arc::default(),
            sent: Mutex::default(),
            closed: Arc::default(),
        });
        let (waiters, answers, closed) = (
            Arc::clone(&me.waiters),
            Arc::clone(&me.answers),
            Arc::clone(&me.closed),
        );
        let ack = me.tx.clone();
        tokio::spawn(async move {
            let answer = |rid: RequestId, a: RawAnswer| {
                *answers.lock().unwrap().entry(rid).or_default() += 1;
                if let Some(w) = waiters.lock().unwrap().remove(&rid) {
                    let _ = w.send(a);
                }
            };
            loop {
                match reader.next().await {
                    Ok(Some(Frame::Deliver { envelope, signer })) => {
                        let Some((rid, a)) = delivered(&envelope, &signer) else {
                            eprintln!("raw caller: an unreadable delivery from the broker");
                            break;
                        };
                        answer(rid, a);
                    }
                    Ok(Some(Frame::CallFailed {
                        request_id, code, ..
                    })) => answer(request_id, Err(code)),
                    Ok(Some(Frame::Heartbeat { seq })) => {
                        let _ = ack.try_send(Frame::HeartbeatAck { seq });
                    }
                    Ok(Some(Frame::HeartbeatAck { .. } | Frame::Accepted(_))) => {}
                    other => {
                        eprintln!("raw caller: connection ended: {other:?}");
                        break;
                    }
                }
            }
            closed.store(true, Ordering::SeqCst);
            // Dropping the waiters tells the calls their answer is lost.
            waiters.lock().unwrap().clear();
        });
        me
    }

    async fn call(&self, target: Target, params: serde_json::Value) -> (String, Outcome) {
        let request_id = RequestId::random();
        let env = Envelope::new(
            Header::now(self.id.clone()),
            Body::ToolCall(ToolCall {
                request_id,
                target,
                tool: Capability::new("exec.count").unwrap(),
                parameters: JsonText::from_value(&params),
                deadline_ms: fem_proto::now_ms() + CALL_TIMEOUT.as_millis() as u64,
                audience: None,
            }),
        );
        let signed = SignedEnvelope::sign(&env, &self.key).unwrap();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(request_id, tx);
        self.sent.lock().unwrap().insert(request_id);
        let rid = request_id.to_string();
        if self.tx.send(Frame::Envelope(signed)).await.is_err() {
            return (rid, Outcome::Lost);
        }
        let out = match tokio::time::timeout(CALL_TIMEOUT + SLACK, rx).await {
            Ok(Ok(Ok((agent, request)))) => Outcome::Ok { agent, request },
            Ok(Ok(Err(code))) => Outcome::Failed {
                code,
                origin: Origin::Broker,
            },
            Ok(Err(_)) => Outcome::Lost,
            Err(_) => Outcome::Hang,
        };
        (rid, out)
    }
}

/// The request id and answer of a delivered toolResult, if it verifies.
fn delivered(envelope: &SignedEnvelope, signer: &PublicKey) -> Option<(RequestId, RawAnswer)> {
    let env = envelope.verify(signer).ok()?;
    let Body::ToolResult(r) = env.body else {
        return None;
    };
    let a = match r.outcome {
        ToolOutcome::Success(v) => Ok(ok_fields(&v.parse().ok()?)),
        ToolOutcome::Error { code, .. } => Err(code),
    };
    Some((r.request_id, a))
}

fn ok_fields(v: &serde_json::Value) -> (String, String) {
    (
        v["agent"].as_str().unwrap_or_default().to_owned(),
        v["request"].as_str().unwrap_or_default().to_owned(),
    )
}

#[derive(Clone)]
enum Caller {
    Sdk(Client),
    Raw(Arc<RawCaller>),
}

impl Caller {
    async fn call(&self, target: Target, params: serde_json::Value) -> (Option<String>, Outcome) {
        match self {
            Self::Sdk(c) => {
                let r = c
                    .call_with_timeout(target, "exec.count", params, CALL_TIMEOUT)
                    .await;
                let out = match r {
                    Ok(v) => {
                        let (agent, request) = ok_fields(&v);
                        Outcome::Ok { agent, request }
                    }
                    Err(e) => Outcome::Failed {
                        code: e.code,
                        origin: e.origin,
                    },
                };
                (None, out)
            }
            Self::Raw(r) => {
                let (rid, out) = r.call(target, params).await;
                (Some(rid), out)
            }
        }
    }
}

fn target_of(kind: &'static str) -> Target {
    match kind {
        "cap" => Target::Capability(CapabilityPattern::new("exec.*").unwrap()),
        id => Target::Agent(AgentId::new(id).unwrap()),
    }
}

const KINDS: [&str; 3] = ["cap", X, Y];
const NAMES: [&str; 3] = ["a", "b", "c"];

/// Calls through `caller` from worker `w` until `stop`, recording each.
async fn worker(
    name: String,
    entry: usize,
    w: usize,
    caller: Caller,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    issued: Arc<AtomicU64>,
) {
    let mut seq = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let kind = KINDS[(seq + w) % KINDS.len()];
        let tag = format!("{name}.w{w}.{seq}");
        seq += 1;
        let sleep_ms = rand::thread_rng().gen_range(50..=300u64);
        issued.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        let (request, outcome) = caller
            .call(target_of(kind), json!({"tag": tag, "sleep_ms": sleep_ms}))
            .await;
        let local = matches!(
            outcome,
            Outcome::Failed {
                origin: Origin::Local,
                ..
            }
        );
        records.lock().unwrap().push(Record {
            caller: name.clone(),
            entry,
            tag,
            target: kind,
            probe: false,
            issued: t,
            elapsed: t.elapsed(),
            request,
            outcome,
        });
        if local {
            // Not connected: do not spin while the SDK reconnects.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn start_agent(addr: SocketAddr, ca: &Path, id: &str, work: &Path) -> Proc {
    let url = format!("https://{addr}");
    let key = work.join(format!("{id}.key"));
    let log = work.join(format!("{id}.log"));
    let mut p = Proc::spawn(
        "fem-fault-agent",
        &[
            "--broker",
            &url,
            "--ca",
            ca.to_str().unwrap(),
            "--id",
            id,
            "--key",
            key.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
            "--max-concurrent",
            "16",
        ],
        &[],
    );
    p.wait_for("fem-fault-agent registered", Duration::from_secs(30))
        .await;
    p
}

/// One line of an agent's execution log.
#[derive(Debug)]
struct Exec {
    agent: &'static str,
    request: String,
    caller: String,
    tag: String,
}

/// Every execution the agents logged.
fn executions(work: &Path) -> Vec<Exec> {
    let mut out = Vec::new();
    for agent in [X, Y] {
        let text = std::fs::read_to_string(work.join(format!("{agent}.log"))).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 3, "torn execution line in {agent}'s log: {line:?}");
            out.push(Exec {
                agent,
                request: f[0].into(),
                caller: f[1].into(),
                tag: f[2].into(),
            });
        }
    }
    out
}

/// Calls from every SDK caller to every target until each has succeeded
/// once; returns false if that takes longer than `within`.
async fn all_routes_ok(
    sdk: &[(String, usize, Client)],
    records: &Mutex<Vec<Record>>,
    round: &str,
    within: Duration,
) -> bool {
    let end = Instant::now() + within;
    let mut left: Vec<(usize, &'static str)> = (0..sdk.len())
        .flat_map(|i| KINDS.iter().map(move |k| (i, *k)))
        .collect();
    let mut n = 0;
    while !left.is_empty() && Instant::now() < end {
        let mut still = Vec::new();
        for (i, kind) in left {
            let (name, entry, c) = &sdk[i];
            let tag = format!("{name}.{round}.{n}");
            n += 1;
            let t = Instant::now();
            let (_, outcome) = Caller::Sdk(c.clone())
                .call(target_of(kind), json!({"tag": tag, "sleep_ms": 0}))
                .await;
            if !matches!(outcome, Outcome::Ok { .. }) {
                still.push((i, kind));
            }
            records.lock().unwrap().push(Record {
                caller: name.clone(),
                entry: *entry,
                tag,
                target: kind,
                probe: true,
                issued: t,
                elapsed: t.elapsed(),
                request: None,
                outcome,
            });
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    left.is_empty()
}

/// Every call returned once, within its deadline plus slack, with an
/// answer from the mesh; every request a raw caller sent got exactly one
/// answer frame, and none came for a request it did not send. Returns the
/// answer frames the raw callers counted.
fn check_one_answer(records: &[Record], raw: &[(String, usize, Arc<RawCaller>)]) -> u64 {
    for r in records {
        assert!(
            r.elapsed <= CALL_TIMEOUT + SLACK,
            "{} ({}) took {:?}",
            r.tag,
            r.outcome.label(),
            r.elapsed
        );
        assert!(
            !matches!(r.outcome, Outcome::Hang | Outcome::Lost),
            "{} to {} through {}: {}",
            r.tag,
            r.target,
            NAMES[r.entry],
            r.outcome.label()
        );
        // A local TIMEOUT is the SDK's guard: the broker never answered.
        assert!(
            !matches!(
                r.outcome,
                Outcome::Failed {
                    code: ErrorCode::Timeout,
                    origin: Origin::Local
                }
            ),
            "{}: no answer from the broker by the deadline",
            r.tag
        );
    }
    let mut raw_answers = 0u64;
    for (name, _, rc) in raw {
        assert!(
            !rc.closed.load(Ordering::SeqCst),
            "{name}'s connection closed"
        );
        let sent = rc.sent.lock().unwrap().clone();
        let answers = rc.answers.lock().unwrap().clone();
        for rid in &sent {
            let n = answers.get(rid).copied().unwrap_or(0);
            assert_eq!(n, 1, "{name}: request {rid} got {n} answers");
        }
        for rid in answers.keys() {
            assert!(
                sent.contains(rid),
                "{name}: an answer for unknown request {rid}"
            );
        }
        raw_answers += answers.values().map(|n| u64::from(*n)).sum::<u64>();
    }
    raw_answers
}

/// No request id or call executed twice, every execution was issued by
/// the caller it names, and every result is the one execution of its call.
/// Returns the successful calls.
fn check_executions(records: &[Record], execs: &[Exec]) -> usize {
    let mut by_request = HashSet::new();
    let mut by_tag: HashMap<&str, &Exec> = HashMap::new();
    for e in execs {
        assert!(
            by_request.insert(&e.request),
            "request {} executed twice",
            e.request
        );
        assert!(
            by_tag.insert(&e.tag, e).is_none(),
            "call {} executed twice",
            e.tag
        );
    }
    let tags: HashMap<&str, &Record> = records.iter().map(|r| (r.tag.as_str(), r)).collect();
    assert_eq!(tags.len(), records.len(), "tags are unique");
    for e in execs {
        let r = tags
            .get(e.tag.as_str())
            .unwrap_or_else(|| panic!("{e:?} was never issued"));
        assert_eq!(e.caller, r.caller, "{e:?} ran for another caller");
    }
    let mut ok = 0;
    for r in records {
        if let Outcome::Ok { agent, request } = &r.outcome {
            ok += 1;
            let e = by_tag
                .get(r.tag.as_str())
                .unwrap_or_else(|| panic!("{}: a result without an execution", r.tag));
            assert_eq!(
                (e.agent, &e.request),
                (agent.as_str(), request),
                "{}: result and execution differ",
                r.tag
            );
            if let Some(rid) = &r.request {
                assert_eq!(rid, request, "{}: answered under another request id", r.tag);
            }
        }
    }
    ok
}

/// (successful, all) of `rs`.
fn share<'a>(rs: impl IntoIterator<Item = &'a Record>) -> (usize, usize) {
    let (mut ok, mut n) = (0, 0);
    for r in rs {
        n += 1;
        if matches!(r.outcome, Outcome::Ok { .. }) {
            ok += 1;
        }
    }
    (ok, n)
}

#[tokio::test]
async fn mesh_survives_broker_and_agent_kills_with_one_answer_per_call() {
    bounded(240, async {
        let started = Instant::now();
        let addrs = [host(320), host(321), host(322)];
        let ca_dir = fem_tests::shared_ca();
        let ca = ca_dir.path().join("tls/ca.pem");
        let dirs: Vec<tempfile::TempDir> = (0..3)
            .map(|_| {
                let d = tempfile::tempdir().unwrap();
                fem_tests::seed_ca(ca_dir.path(), d.path());
                d
            })
            .collect();
        // Broker i, in its data directory, linked to the two others.
        let start_broker = async |i: usize| {
            let peers: Vec<SocketAddr> = (0..3).filter(|j| *j != i).map(|j| addrs[j]).collect();
            let (dir, flags) = (dirs[i].path(), BROKER_FLAGS);
            fem_tests::mesh_broker_proc_with(addrs[i], dir, &ca, &peers, LINK_TIMEOUT, flags, &[])
                .await
        };
        let mut brokers = Vec::new();
        for i in 0..3 {
            brokers.push(start_broker(i).await);
        }
        for a in &addrs {
            assert!(
                ready_within(*a, &ca, Duration::from_secs(20)).await,
                "{a} not ready"
            );
        }
        let work = tempfile::tempdir().unwrap();
        let _x = start_agent(addrs[1], &ca, X, work.path()).await;
        let mut y = start_agent(addrs[2], &ca, Y, work.path()).await;

        let records = Arc::new(Mutex::new(Vec::<Record>::new()));
        let mut sdk = Vec::new();
        for i in 0..3 {
            let name = format!("fault-sdk-{}", NAMES[i]);
            let c = fem_tests::caller(&name, options_for(addrs[i], &ca)).await;
            sdk.push((name, i, c));
        }
        let mut raw = Vec::new();
        for i in [0, 2] {
            let name = format!("fault-raw-{}", NAMES[i]);
            raw.push((
                name.clone(),
                i,
                RawCaller::connect(addrs[i], &ca, &name).await,
            ));
        }
        // Routes have converged once every caller reaches every target.
        assert!(
            all_routes_ok(&sdk, &records, "warmup", Duration::from_secs(30)).await,
            "the mesh did not converge"
        );

        // Sustained load.
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let load_start = Instant::now();
        let mut tasks = Vec::new();
        let callers = sdk
            .iter()
            .map(|(n, e, c)| (n.clone(), *e, Caller::Sdk(c.clone())))
            .chain(
                raw.iter()
                    .map(|(n, e, r)| (n.clone(), *e, Caller::Raw(Arc::clone(r)))),
            );
        for (name, entry, c) in callers {
            for w in 0..WORKERS {
                tasks.push(tokio::spawn(worker(
                    name.clone(),
                    entry,
                    w,
                    c.clone(),
                    Arc::clone(&stop),
                    Arc::clone(&records),
                    Arc::clone(&issued),
                )));
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;

        // SIGKILL broker B (agent X and caller fault-sdk-b are behind it),
        // then restart it with the same data directory and address.
        let kill_b = Instant::now();
        let mut b = brokers.remove(1);
        b.signal("KILL");
        b.wait_exit(Duration::from_secs(5))
            .await
            .expect("B did not die");
        drop(b);
        tokio::time::sleep(Duration::from_secs(1)).await;
        brokers.insert(1, start_broker(1).await);
        for a in &addrs {
            assert!(
                ready_within(*a, &ca, Duration::from_secs(20)).await,
                "{a} not ready after B's restart"
            );
        }
        let b_back = kill_b.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;

        // SIGKILL agent Y while it has calls in flight, then restart it.
        let y_log = work.path().join(format!("{Y}.log"));
        let lines = || std::fs::read_to_string(&y_log).map_or(0, |s| s.lines().count());
        let before = lines();
        assert!(
            fem_tests::eventually(Duration::from_secs(10), || lines() > before).await,
            "Y executes nothing"
        );
        let kill_y = Instant::now();
        y.signal("KILL");
        y.wait_exit(Duration::from_secs(5))
            .await
            .expect("Y did not die");
        let y_lines_at_kill = lines();
        drop(y);
        // Down longer than the heartbeat grace: C finds the silent QUIC
        // session dead itself and answers Y's calls in flight; callers by
        // capability fall back to X meanwhile.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _y = start_agent(addrs[2], &ca, Y, work.path()).await;

        // Settle: every broker reaches every target again.
        assert!(
            all_routes_ok(&sdk, &records, "recovery", Duration::from_secs(30)).await,
            "the mesh did not recover"
        );
        let recovered = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        let load_time = load_start.elapsed();
        // Give a second answer time to arrive, if a broker were to send one.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let records = records.lock().unwrap().clone();
        let loaded = records.iter().filter(|r| !r.probe).count();
        assert_eq!(
            loaded as u64,
            issued.load(Ordering::SeqCst),
            "a call has no outcome"
        );
        // ---- exactly one terminal answer per call; nothing executed twice ----
        let raw_answers = check_one_answer(&records, &raw);
        let execs = executions(work.path());
        let ok = check_executions(&records, &execs);
        let tags: HashMap<&str, &Record> = records.iter().map(|r| (r.tag.as_str(), r)).collect();
        // Y was killed mid-call: some of its executions have no result.
        let cut_y: Vec<&Record> = execs
            .iter()
            .filter(|e| e.agent == Y)
            .map(|e| tags[e.tag.as_str()])
            .filter(|r| !matches!(r.outcome, Outcome::Ok { .. }))
            .collect();
        // Executions whose caller got no result: the agent died or its
        // broker did (the answer was lost with the link or the session).
        let mut cut: BTreeMap<String, usize> = BTreeMap::new();
        for e in &execs {
            let o = &tags[e.tag.as_str()].outcome;
            if !matches!(o, Outcome::Ok { .. }) {
                *cut.entry(o.label()).or_default() += 1;
            }
        }
        assert!(!cut_y.is_empty(), "Y had no call in flight when killed");
        // How long after the SIGKILL Y's calls in flight were answered.
        let y_answered = cut_y
            .iter()
            .map(|r| (r.issued + r.elapsed).saturating_duration_since(kill_y))
            .max()
            .unwrap_or_default();
        // Each was answered AGENT_UNAVAILABLE (by a broker, or by the SDK
        // when its own broker died), never left to time out.
        assert!(
            cut.keys().all(|k| k.starts_with("AGENT_UNAVAILABLE")),
            "calls cut short: {cut:?}"
        );

        // The broker counts every answer it produces once, by outcome.
        // A never restarted and hosts no agent, so its count is exactly
        // the calls that entered through it.
        let entered_a = records
            .iter()
            .filter(|r| r.entry == 0)
            .filter(|r| {
                !matches!(
                    r.outcome,
                    Outcome::Failed {
                        origin: Origin::Local,
                        ..
                    }
                )
            })
            .count();
        let answered_a = fem_tests::metric(addrs[0], &ca, "fem_broker_tool_calls_total").await;
        assert_eq!(
            answered_a as usize, entered_a,
            "A answered {answered_a} calls; {entered_a} entered through it"
        );

        // ---- the mesh worked before the faults and recovered after ----
        let load: Vec<&Record> = records.iter().filter(|r| !r.probe).collect();
        let before: Vec<&Record> = load
            .iter()
            .copied()
            .filter(|r| r.issued + r.elapsed < kill_b)
            .collect();
        let after: Vec<&Record> = load
            .iter()
            .copied()
            .filter(|r| r.issued >= recovered)
            .collect();
        let (b_ok, b_n) = share(before.iter().copied());
        let (a_ok, a_n) = share(after.iter().copied());
        let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
        for r in &records {
            *by_code.entry(r.outcome.label()).or_default() += 1;
        }
        eprintln!(
            "faults: {} calls issued ({} under load, {} probes), ok {ok}, \
             outcomes {by_code:?}; {} executions ({} of X, {} of Y), \
             without a result {cut:?} ({} cut short on Y, killed at line \
             {y_lines_at_kill}, all answered within {y_answered:?} of the kill); \
             broker A answered {answered_a} calls; raw callers: {raw_answers} \
             answers for {} calls, each exactly once; finished before the faults \
             ok {b_ok}/{b_n}, after recovery ok {a_ok}/{a_n}; B back in {b_back:?}, \
             recovery {:?} after Y's kill; load {load_time:?}, test {:?}",
            records.len(),
            load.len(),
            records.len() - load.len(),
            execs.len(),
            execs.iter().filter(|e| e.agent == X).count(),
            execs.iter().filter(|e| e.agent == Y).count(),
            cut_y.len(),
            raw.iter()
                .map(|(_, _, r)| r.sent.lock().unwrap().len())
                .sum::<usize>(),
            recovered - kill_y,
            started.elapsed(),
        );
        // Nothing has failed yet: every call that finished before B's kill succeeded.
        assert!(
            b_n > 50 && b_ok == b_n,
            "before the faults: {b_ok}/{b_n} ok"
        );
        assert!(
            a_n > 50 && a_ok * 100 >= a_n * 90,
            "after recovery: {a_ok}/{a_n} ok"
        );
        let names = sdk.iter().map(|(n, _, _)| n);
        for name in names.chain(raw.iter().map(|(n, _, _)| n)) {
            let (ok, n) = share(after.iter().copied().filter(|r| &r.caller == name));
            assert!(
                n > 0 && ok * 100 >= n * 90,
                "{name} after recovery: {ok}/{n} ok"
            );
        }
    })
    .await;
}
