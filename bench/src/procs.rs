//! Server processes the harness starts (fem-broker, nats-server), their
//! resident memory and CPU time, and a small HTTP GET for their endpoints.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fem_net::tls::{TlsSource, load_material};
use http_body_util::BodyExt as _;

/// The broker port (QUIC on UDP, TLS on TCP); every broker has its own address.
const BROKER_PORT: u16 = 8443;
/// Plain-HTTP metrics port of each broker (same address).
const METRICS_PORT: u16 = 9090;

/// Host `n` of the bench network: `base` with its last octet replaced by `n`.
pub(crate) fn host_ip(base: Ipv4Addr, n: u8) -> Ipv4Addr {
    let [a, b, c, _] = base.octets();
    Ipv4Addr::new(a, b, c, n)
}

/// The URL clients and peer brokers use for the broker at `ip`.
pub(crate) fn broker_url(ip: Ipv4Addr) -> String {
    format!("https://{}", SocketAddr::from((ip, BROKER_PORT)))
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    /// Its combined stdout/stderr.
    log: PathBuf,
    name: String,
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {} ({})", name, bin.display()))?;
        Ok(Self {
            child,
            log,
            name: name.to_owned(),
        })
    }

    /// Process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in bytes (VmRSS).
    pub(crate) fn rss(&self) -> anyhow::Result<u64> {
        rss_of(self.pid())
    }

    /// SIGKILL, without waiting for anything graceful.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails with the tail of the log when the process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// VmRSS of a process, in bytes.
pub(crate) fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no VmRSS in /proc/PID/status")
}

/// utime + stime of a process (all threads). /proc reports them in USER_HZ
/// ticks, which Linux fixes at 100 per second for user space.
pub(crate) fn cpu_of(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; fields after it are plain.
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .context("malformed /proc/PID/stat")?;
    Ok(Duration::from_millis(ticks * 10))
}

/// CPU time of the processes of each role, read together.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RoleCpu {
    /// The servers: brokers or nats-server.
    server: Duration,
    /// This process: callers, publishers, subscribers.
    caller: Duration,
    /// The agent process, if any.
    agent: Duration,
}

/// [`RoleCpu`] per operation, microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RoleCpuUs {
    pub(crate) server: f64,
    pub(crate) caller: f64,
    pub(crate) agent: f64,
}

impl RoleCpuUs {
    pub(crate) fn total(&self) -> f64 {
        self.server + self.caller + self.agent
    }
}

impl RoleCpu {
    /// Now, for the server processes `servers` and the agent process `agent`.
    pub(crate) fn read(servers: &[u32], agent: Option<u32>) -> anyhow::Result<Self> {
        let mut server = Duration::ZERO;
        for p in servers {
            server += cpu_of(*p)?;
        }
        Ok(Self {
            server,
            caller: cpu_of(std::process::id())?,
            agent: agent.map(cpu_of).transpose()?.unwrap_or_default(),
        })
    }

    /// The time used since `before`.
    pub(crate) fn since(&self, before: &Self) -> Self {
        Self {
            server: self.server.saturating_sub(before.server),
            caller: self.caller.saturating_sub(before.caller),
            agent: self.agent.saturating_sub(before.agent),
        }
    }

    /// Microseconds per operation: `share` of the time over `ops` operations
    /// (zeros without operations).
    pub(crate) fn us_per(&self, ops: u64, share: f64) -> RoleCpuUs {
        if ops == 0 {
            return RoleCpuUs::default();
        }
        let per = |d: Duration| d.as_secs_f64() * share * 1e6 / ops as f64;
        RoleCpuUs {
            server: per(self.server),
            caller: per(self.caller),
            agent: per(self.agent),
        }
    }
}

/// A broker process on its own loopback address.
#[derive(Debug)]
pub(crate) struct BrokerProc {
    pub(crate) proc: Proc,
    /// Native protocol address (QUIC and TLS).
    pub(crate) addr: SocketAddr,
    /// Plain-HTTP metrics address.
    pub(crate) metrics: SocketAddr,
    /// Data directory (identity, development CA, certificate).
    pub(crate) dir: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
}

impl BrokerProc {
    /// Starts `fem-broker` at `ip` with data directory `dir`, its certificate
    /// issued by `ca`, and waits until `/health` answers 200 (a federated
    /// broker is ready only once its links are up: see [`Self::wait_ready`]).
    pub(crate) async fn start(
        bin: &Path,
        ip: Ipv4Addr,
        dir: &Path,
        ca: &BenchCa,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        ca.seed(dir)?;
        let addr = SocketAddr::from((ip, BROKER_PORT));
        let metrics = SocketAddr::from((ip, METRICS_PORT));
        let mut args = vec![
            "--listen".to_owned(),
            addr.to_string(),
            "--data-dir".to_owned(),
            dir.display().to_string(),
            "--broker-id".to_owned(),
            format!("bench-{ip}"),
            "--metrics-listen".to_owned(),
            metrics.to_string(),
        ];
        args.extend_from_slice(extra);
        let mut b = Self {
            proc: Proc::spawn("fem-broker", bin, &args, dir.join("broker.log"))?,
            addr,
            metrics,
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            args,
        };
        b.wait_for("/health", Duration::from_secs(60)).await?;
        Ok(b)
    }

    /// Starts the same broker again (after a kill), with the same arguments.
    pub(crate) async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        let log = self.dir.join("broker.restarted.log");
        self.proc = Proc::spawn("fem-broker", &self.bin, &self.args, log)?;
        self.wait_for("/health", Duration::from_secs(60)).await
    }

    /// Waits until `/ready` answers 200: listening, and the federation links
    /// its flags ask for are up.
    pub(crate) async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        self.wait_for("/ready", limit).await
    }

    async fn wait_for(&mut self, path: &str, limit: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + limit;
        loop {
            self.proc.check_alive()?;
            if let Ok((200, _)) = http_get(self.metrics, path).await {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("broker at {}: {path} not 200 after {limit:?}", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of a metric sample (`name` with its `{labels}` if any)
    /// from /metrics; 0 when the broker does not report it.
    pub(crate) async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        Ok(metric_at(self.metrics, sample).await?.unwrap_or(0.0))
    }
}

async fn metrics_text(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

/// The value of a metric sample (`name` with its `{labels}` if any) from
/// the /metrics at `addr`; `None` when it is not there.
pub(crate) async fn metric_at(addr: SocketAddr, sample: &str) -> anyhow::Result<Option<f64>> {
    Ok(metrics_text(addr).await?.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == sample).then(|| v.parse::<f64>().ok()).flatten()
    }))
}

/// The sum of the samples of metric `name` whose labels include `label`
/// (e.g. `direction="sent"`) from the /metrics at `addr`; `None` when
/// there is no such sample (the metric is absent).
pub(crate) async fn metric_sum(
    addr: SocketAddr,
    name: &str,
    label: &str,
) -> anyhow::Result<Option<f64>> {
    Ok(sum_samples(&metrics_text(addr).await?, name, label))
}

fn sum_samples(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut sum = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        let Some((labels, v)) = rest.strip_prefix('{').and_then(|r| r.split_once("} ")) else {
            continue;
        };
        if labels.split(',').any(|kv| kv.trim() == label)
            && let Ok(v) = v.trim().parse::<f64>()
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The CA every server of a run gets its certificate from, so clients and
/// peer brokers trust them all with one file. It is the broker's own
/// development CA, made and used by the broker's code.
#[derive(Debug)]
pub(crate) struct BenchCa {
    dir: PathBuf,
    /// The CA certificate (PEM) clients trust.
    pub(crate) pem: PathBuf,
}

impl BenchCa {
    /// Generates a development CA in `dir/tls/`.
    pub(crate) fn new(dir: &Path) -> anyhow::Result<Self> {
        load_material(&TlsSource::SelfSigned, dir, &["localhost".to_owned()])?;
        Ok(Self {
            dir: dir.to_owned(),
            pem: dir.join("tls").join("ca.pem"),
        })
    }

    /// Puts the CA into a data directory (`tls/ca.pem`, `tls/ca.key`): a
    /// broker started there issues its development certificate from it.
    pub(crate) fn seed(&self, data_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(data_dir.join("tls"))?;
        for f in ["ca.pem", "ca.key"] {
            std::fs::copy(self.dir.join("tls").join(f), data_dir.join("tls").join(f))
                .with_context(|| format!("copy {f}"))?;
        }
        Ok(())
    }

    /// Issues a server certificate for `ip` in `dir/tls/`; returns the
    /// (certificate, key) PEM paths.
    fn issue(&self, ip: Ipv4Addr, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.seed(dir)?;
        load_material(
            &TlsSource::SelfSigned,
            dir,
            &[ip.to_string(), "localhost".to_owned()],
        )?;
        Ok((
            dir.join("tls").join("cert.pem"),
            dir.join("tls").join("key.pem"),
        ))
    }
}

/// GET `path` over plain HTTP/1.1; returns the status and the body.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .context("HTTP GET timed out")?
}

/// A nats-server with TLS on its own loopback address, and the CA its
/// clients trust.
#[derive(Debug)]
pub(crate) struct NatsProc {
    pub(crate) proc: Proc,
    /// Client URL (`tls://IP:4222`).
    pub(crate) url: String,
    /// CA certificate (PEM) for the clients.
    pub(crate) ca: PathBuf,
}

impl NatsProc {
    /// Writes a server certificate for `ip` issued by `ca` and a config with
    /// TLS required, starts `bin` and waits until it accepts connections.
    pub(crate) async fn start(
        bin: &Path,
        ip: Ipv4Addr,
        dir: &Path,
        ca: &BenchCa,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (cert_pem, key_pem) = ca.issue(ip, dir)?;
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"{ip}:4222\"\n\
                 tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n",
                cert_pem.display(),
                key_pem.display()
            ),
        )?;
        let mut proc = Proc::spawn(
            "nats-server",
            bin,
            &["-c".to_owned(), conf.display().to_string()],
            dir.join("nats.log"),
        )?;
        let addr = SocketAddr::from((ip, 4222));
        let end = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            proc.check_alive()?;
            if Instant::now() > end {
                bail!("nats-server at {addr} not accepting after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            proc,
            url: format!("tls://{addr}"),
            ca: ca.pem.clone(),
        })
    }
}

impl NatsProc {
    /// A client connection over TLS trusting the bench CA.
    pub(crate) async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        self.connect_with(async_nats::ConnectOptions::new()).await
    }

    /// The same with more options (capacities, an event callback).
    pub(crate) async fn connect_with(
        &self,
        opts: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::Client> {
        nats_connect(opts, &self.ca, &self.url).await
    }
}

/// A NATS client with `opts` over TLS to `url`, trusting the CA file `ca`.
pub(crate) async fn nats_connect(
    opts: async_nats::ConnectOptions,
    ca: &Path,
    url: &str,
) -> anyhow::Result<async_nats::Client> {
    Ok(opts
        .add_root_certificates(ca.to_owned())
        .require_tls(true)
        .connect(url)
        .await?)
}

/// Finds a program: an explicit path, else `name` beside this executable,
/// else on PATH, else in the sbin directories where Debian puts servers.
pub(crate) fn find_program(explicit: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/local/sbin".into()]) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found beside fem-bench, on PATH or in /usr/sbin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_labelled_samples() {
        let text = "# TYPE fem_x_total counter\n\
                    fem_x_total{direction=\"sent\",peer=\"a\"} 10\n\
                    fem_x_total{direction=\"received\",peer=\"a\"} 7\n\
                    fem_x_total{peer=\"b\",direction=\"sent\"} 5\n\
                    fem_x_totally{direction=\"sent\"} 100\n";
        assert_eq!(
            sum_samples(text, "fem_x_total", "direction=\"sent\""),
            Some(15.0)
        );
        assert_eq!(sum_samples(text, "fem_y_total", "direction=\"sent\""), None);
    }
}
