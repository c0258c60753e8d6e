//! Test support: loopback addresses, in-process brokers, broker and agent
//! processes killed on drop (their logs dumped when a test fails), raw
//! protocol connections and a tiny HTTPS client.
#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fem_agent_sdk::wire::FrameReader;
use fem_agent_sdk::{AgentBuilder, Client, Options, Tool, ToolError, Trust};
use fem_broker::{Broker, BrokerConfig};
use fem_proto::{AgentId, SigningKey};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The port every test broker uses, each on its own loopback address.
pub const PORT: u16 = 8443;

/// The loopback address of test host `n` (1..=60000): 127.0.x.y, never 127.0.0.1.
pub fn host(n: u16) -> SocketAddr {
    let n = u32::from(n) + 1;
    SocketAddr::from(([127, 0, (n / 250) as u8, (n % 250 + 2) as u8], PORT))
}

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// A broker running in this process, with its data directory.
pub struct TestBroker {
    /// The broker.
    pub broker: Broker,
    /// Its data directory (certificate, keys).
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    /// Starts a broker on `addr` with test-friendly settings, adjusted by `tweak`.
    pub async fn start(addr: SocketAddr, tweak: impl FnOnce(&mut BrokerConfig)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), addr, tweak).await
    }

    /// Starts a broker whose development CA is the one in `ca_from` (see
    /// [`shared_ca`]), so brokers trust each other's certificates with one
    /// CA file, as a real deployment would.
    pub async fn start_sharing_ca(
        addr: SocketAddr,
        ca_from: &Path,
        tweak: impl FnOnce(&mut BrokerConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        seed_ca(ca_from, dir.path());
        Self::start_in(dir, addr, tweak).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        addr: SocketAddr,
        tweak: impl FnOnce(&mut BrokerConfig),
    ) -> Self {
        logs();
        let mut cfg = BrokerConfig {
            listen: addr,
            data_dir: dir.path().to_owned(),
            broker_id: AgentId::new(format!("broker-{}", addr.ip())).unwrap(),
            shutdown_grace: Duration::from_millis(500),
            ..BrokerConfig::default()
        };
        tweak(&mut cfg);
        let broker = Broker::bind(cfg).await.unwrap();
        Self { broker, dir }
    }

    /// The development CA clients trust.
    pub fn ca(&self) -> PathBuf {
        self.broker.ca_path().unwrap().to_owned()
    }

    /// Client options for this broker (`https://IP:PORT`, CA trust, fast reconnects).
    pub fn options(&self) -> Options {
        options_for(self.broker.local_addr(), &self.ca())
    }
}

/// A directory holding a fresh development CA (`tls/ca.pem`, `tls/ca.key`)
/// for brokers that must trust each other.
pub fn shared_ca() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fem_broker::tls::load_material(
        &fem_broker::TlsSource::SelfSigned,
        dir.path(),
        &["localhost".into()],
    )
    .unwrap();
    dir
}

/// Copies the development CA of data directory `from` into data directory
/// `to`, so the broker started there issues its certificate from it.
pub fn seed_ca(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("tls")).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(from.join("tls").join(f), to.join("tls").join(f)).unwrap();
    }
}

/// Client options for a broker at `addr` trusting `ca`.
pub fn options_for(addr: SocketAddr, ca: &Path) -> Options {
    Options::new(&format!("https://{addr}"))
        .unwrap()
        .trust(Trust::CaFile(ca.to_owned()))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .heartbeat(Duration::from_millis(500))
}

/// Connects a caller with a fresh key.
pub async fn caller(id: &str, opts: Options) -> Client {
    Client::connect(AgentId::new(id).unwrap(), SigningKey::generate(), opts)
        .await
        .unwrap()
}

/// An `echo` tool (returns its parameters) that counts its calls.
pub fn echo_tool(counter: Arc<Mutex<u32>>) -> Tool {
    Tool::new(
        "echo",
        "Returns its parameters",
        serde_json::json!({"type": "object"}),
        move |req| {
            let counter = Arc::clone(&counter);
            async move {
                *counter.lock().unwrap() += 1;
                if let Some(ms) = req
                    .params
                    .get("sleep_ms")
                    .and_then(serde_json::Value::as_u64)
                {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if req.params.get("fail").is_some() {
                    return Err(ToolError::new(
                        fem_proto::ErrorCode::ToolFailed,
                        "asked to fail",
                    ));
                }
                Ok(req.params)
            }
        },
    )
    .unwrap()
}

/// Connects an agent `id` with capability `echo.basic` and the `echo` tool.
pub async fn echo_agent(
    id: &str,
    opts: Options,
    max_concurrent: usize,
) -> (Client, Arc<Mutex<u32>>) {
    let counter = Arc::new(Mutex::new(0));
    let client = AgentBuilder::new(AgentId::new(id).unwrap(), SigningKey::generate())
        .capability("echo.basic")
        .unwrap()
        .tool(echo_tool(Arc::clone(&counter)))
        .max_concurrent(max_concurrent)
        .connect(opts)
        .await
        .unwrap();
    (client, counter)
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tls_client(ca: &Path, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let cfg = fem_agent_sdk::tls::client_config(&Trust::CaFile(ca.to_owned()), &[alpn]).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS client stream.
pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `addr` offering one ALPN protocol (trusting `ca`).
///
/// # Errors
/// Connecting or the handshake failed (the broker may close at once).
pub async fn tls_connect(addr: SocketAddr, ca: &Path, alpn: &[u8]) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tls_client(ca, alpn).connect(name, tcp).await
}

/// Resident memory of process `pid`, KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The sum of a metric's samples whose line starts with `prefix` (a name,
/// optionally with its opening labels), from the broker's /metrics.
pub async fn metric(addr: SocketAddr, ca: &Path, prefix: &str) -> f64 {
    let (_, text) = https_get(addr, ca, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A raw native-protocol connection over TLS/TCP, for hostile-input tests.
pub struct RawConn {
    /// Frame reader.
    pub reader: FrameReader<tokio::io::ReadHalf<TlsStream>>,
    /// Byte writer.
    pub writer: tokio::io::WriteHalf<TlsStream>,
}

impl RawConn {
    /// Connects with ALPN fem/1.
    pub async fn connect(addr: SocketAddr, ca: &Path) -> Self {
        let tls = tls_connect(addr, ca, fem_proto::ALPN_NATIVE).await.unwrap();
        let (r, w) = tokio::io::split(tls);
        Self {
            reader: FrameReader::new(r, 64 * 1024 * 1024),
            writer: w,
        }
    }

    /// Sends a frame.
    pub async fn send(&mut self, f: &fem_proto::Frame) {
        let mut buf = Vec::new();
        fem_proto::encode_frame(f, &mut buf, usize::MAX).unwrap();
        self.send_bytes(&buf).await;
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.writer.write_all(b).await.unwrap();
        self.writer.flush().await.unwrap();
    }

    /// The next frame within 5 s (None at end of stream or on a read error).
    pub async fn recv(&mut self) -> Option<fem_proto::Frame> {
        tokio::time::timeout(Duration::from_secs(5), self.reader.next())
            .await
            .expect("no frame within 5 s")
            .ok()
            .flatten()
    }
}

/// `id`'s registration under `key` (no capabilities, one call at a time)
/// offering `tools`, stamped `timestamp_ms`, for raw connections.
pub fn registration(
    id: &str,
    key: &SigningKey,
    tools: Vec<fem_proto::ToolSpec>,
    timestamp_ms: u64,
) -> fem_proto::SignedEnvelope {
    let env = fem_proto::Envelope::new(
        fem_proto::Header {
            sender: AgentId::new(id).unwrap(),
            timestamp_ms,
            nonce: fem_proto::Nonce::random(),
        },
        fem_proto::Body::RegisterAgent(fem_proto::RegisterAgent {
            public_key: key.public_key(),
            capabilities: vec![],
            tools,
            metadata: std::collections::BTreeMap::new(),
            max_concurrent_calls: 1,
        }),
    );
    fem_proto::SignedEnvelope::sign(&env, key).unwrap()
}

/// GET `path` over HTTPS (HTTP/1.1) from a broker; returns status and body.
pub async fn https_get(addr: SocketAddr, ca: &Path, path: &str) -> (u16, String) {
    https(addr, ca, "GET", path, &[], "").await
}

/// One HTTP/1.1 request over TLS (trusting `ca`); returns status and body.
pub async fn https(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let tls = tls_connect(addr, ca, b"http/1.1").await.unwrap();
    exchange(tls, addr, method, path, headers, body).await
}

/// One HTTP/1.1 request over plain TCP; (0, "") when nothing listens.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => exchange(s, addr, method, path, headers, body).await,
        Err(_) => (0, String::new()),
    }
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Path of a workspace binary in the test executable's target directory.
///
/// The README's test command (`cargo build --workspace --bins && cargo test
/// --workspace`) builds them first; when one is missing it is built here.
/// Building from inside a test run would change the environment cargo sees
/// and rebuild dependencies, so an existing binary is used as it is.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_owned();
    let path = dir.join(name);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--workspace", "--bins"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("cargo build");
            assert!(st.success(), "building the binaries failed");
        });
    }
    path
}

/// A child process killed on drop; its output is dumped if the test panicked.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Spawns `bin(name)` with `args`; stdout and stderr go to a log file.
    pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin(name));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Self {
            name: name.to_owned(),
            child,
            log,
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a line of output contains `needle`; returns that line.
    pub async fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let f = std::fs::File::open(&self.log).unwrap();
            if let Some(line) = BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .find(|l| l.contains(needle))
            {
                return line;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before printing {needle:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            assert!(
                Instant::now() < end,
                "{} did not print {needle:?} within {timeout:?}:\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends a signal (e.g. "KILL", "TERM").
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status();
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for exit up to `timeout`; returns the exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- output of {} -----\n{}\n-----",
                self.name,
                self.output()
            );
        }
    }
}

/// Extracts `key=value` from a log line.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    let v: String = rest
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    Some(v)
}

/// Runs `fem` with `args` to completion (bounded by 60 s); returns (exit code, stdout, stderr).
pub async fn run_fem(args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(bin("fem"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("fem did not finish within 60 s")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `fem-broker` process on its own loopback address, with a fresh data
/// directory (its development CA is `DATA/tls/ca.pem`).
pub struct BrokerProcess {
    /// The process.
    pub proc: Proc,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its data directory.
    pub dir: tempfile::TempDir,
}

impl BrokerProcess {
    /// Starts `fem-broker --listen ADDR` with `extra` flags and `envs`, and
    /// waits for its listening line.
    pub async fn start(addr: SocketAddr, extra: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_in(addr, tempfile::tempdir().unwrap(), extra, envs).await
    }

    /// [`Self::start`] in an existing data directory (a restart keeps its
    /// identity and certificate).
    pub async fn start_in(
        addr: SocketAddr,
        dir: tempfile::TempDir,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let listen = addr.to_string();
        let data = dir.path().to_str().unwrap().to_owned();
        let id = format!("broker-{}", addr.ip());
        let mut args = vec!["--listen", &listen, "--data-dir", &data, "--broker-id", &id];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn("fem-broker", &args, envs);
        proc.wait_for("fem-broker listening", Duration::from_secs(30))
            .await;
        Self { proc, addr, dir }
    }

    /// The development CA file (PEM).
    pub fn ca(&self) -> String {
        self.dir
            .path()
            .join("tls/ca.pem")
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// `https://ADDR`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `fem call --agent AGENT --tool TOOL --args ARGS` through this broker,
    /// with a 60 s CLI deadline; returns (exit code, stdout, stderr).
    pub async fn call(
        &self,
        agent: &str,
        tool: &str,
        args: &serde_json::Value,
    ) -> (i32, String, String) {
        fem_call(self.addr, Path::new(&self.ca()), agent, tool, args, "60s").await
    }
}

/// `fem call --agent AGENT --tool TOOL --args ARGS --timeout TIMEOUT`
/// through the broker at `broker` (trusting `ca`); returns (exit code,
/// stdout, stderr).
pub async fn fem_call(
    broker: SocketAddr,
    ca: &Path,
    agent: &str,
    tool: &str,
    args: &serde_json::Value,
    timeout: &str,
) -> (i32, String, String) {
    fem_call_with(broker, ca, agent, tool, args, timeout, &[]).await
}

/// [`fem_call`] with more flags of `fem call` (e.g. `--attested`).
pub async fn fem_call_with(
    broker: SocketAddr,
    ca: &Path,
    agent: &str,
    tool: &str,
    args: &serde_json::Value,
    timeout: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let (url, args) = (format!("https://{broker}"), args.to_string());
    let mut all = vec![
        "call",
        "--broker",
        &url,
        "--ca",
        ca.to_str().unwrap(),
        "--agent",
        agent,
        "--tool",
        tool,
        "--timeout",
        timeout,
        "--args",
        &args,
    ];
    all.extend_from_slice(extra);
    run_fem(&all).await
}

/// Starts a `fem-broker` process on `addr` in mesh mode with `peers`, in
/// `dir` (whose tls/ holds the shared CA, see [`seed_ca`]), with the given
/// `--link-timeout`; returns once it listens.
pub async fn mesh_broker_proc(
    addr: SocketAddr,
    dir: &Path,
    ca: &Path,
    peers: &[SocketAddr],
    link_timeout: &str,
) -> Proc {
    mesh_broker_proc_with(addr, dir, ca, peers, link_timeout, &[], &[]).await
}

/// [`mesh_broker_proc`] with `extra` flags (e.g. heartbeat settings) and
/// environment variables (FEM_CONFIG, ...).
pub async fn mesh_broker_proc_with(
    addr: SocketAddr,
    dir: &Path,
    ca: &Path,
    peers: &[SocketAddr],
    link_timeout: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let listen = addr.to_string();
    let peers = peers
        .iter()
        .map(|p| format!("https://{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let id = format!("mesh-{}", addr.ip());
    let mut p = Proc::spawn(
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
            &peers,
            "--ca",
            ca.to_str().unwrap(),
            "--link-timeout",
            link_timeout,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
        envs,
    );
    p.wait_for("fem-broker listening", Duration::from_secs(30))
        .await;
    p
}

/// Polls `GET /ready` of the broker at `addr` until 200 or `within` passes.
pub async fn ready_within(addr: SocketAddr, ca: &Path, within: Duration) -> bool {
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if https_get(addr, ca, "/ready").await.0 == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Two meshed broker processes on hosts `n` and `n + 1` sharing one CA,
/// the second with `envs_b`; returns once both are ready within `within`.
/// Returns the processes, their addresses, the CA directory (its
/// `tls/ca.pem` is the CA) and their data directories.
pub async fn meshed_pair(
    n: u16,
    envs_b: &[(&str, &str)],
    within: Duration,
) -> (
    Vec<Proc>,
    [SocketAddr; 2],
    tempfile::TempDir,
    Vec<tempfile::TempDir>,
) {
    let (a, b) = (host(n), host(n + 1));
    let ca_dir = shared_ca();
    let ca = ca_dir.path().join("tls/ca.pem");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&da, &db] {
        seed_ca(ca_dir.path(), d.path());
    }
    let (to_b, to_a) = ([b], [a]);
    let (pa, pb) = tokio::join!(
        mesh_broker_proc(a, da.path(), &ca, &to_b, "2s"),
        mesh_broker_proc_with(b, db.path(), &ca, &to_a, "2s", &[], envs_b)
    );
    for x in [a, b] {
        assert!(
            ready_within(x, &ca, within).await,
            "{x} not ready within {within:?}:\n{}\n{}",
            pa.output(),
            pb.output()
        );
    }
    (vec![pa, pb], [a, b], ca_dir, vec![da, db])
}

/// A `fem-mcp-bridge` process: agent `agent` (its key in `keys`) behind
/// `broker`, with `args` before `--` and the MCP server `command` after.
pub fn mcp_bridge_proc(
    agent: &str,
    broker: SocketAddr,
    ca: &Path,
    keys: &Path,
    args: &[&str],
    command: &[&str],
) -> Proc {
    let url = format!("https://{broker}");
    let key = keys.join(format!("{agent}.key"));
    let mut all = vec![
        "--broker",
        &url,
        "--ca",
        ca.to_str().unwrap(),
        "--agent",
        agent,
        "--key",
        key.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    all.push("--");
    all.extend_from_slice(command);
    Proc::spawn("fem-mcp-bridge", &all, &[])
}
