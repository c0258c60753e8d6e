//! Attack tests for fem-coder's isolation, written as the attacker would act:
//! a real broker, real fem-coder processes and every call made with the `fem`
//! CLI. The code a caller sends tries to read the agent's key (directly,
//! through `/proc` of its parent, through a hard link), leave its directory,
//! reach the network, outlive its deadline and signal the agent.
//!
//! Each attack runs against several coders of one broker: every layer on, one
//! optional layer switched off (`FEM_SANDBOX_DISABLE`), and all of them off.
//! Each attack names the layers that stop it; it must be refused exactly when
//! the coder reports one of them enforced, and must succeed otherwise, which
//! shows that the attack is real. The coder with every layer on must stop
//! every attack. `FEM_ISOLATION_SURVEY=1` prints the outcome table without
//! asserting (how the attacks were measured on the code before isolation).
//!
//! Addresses: hosts 140..=159.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fem_tests::{BrokerProcess, Proc, host};
use rand::Rng as _;
use serde_json::{Value, json};

use crate::bounded;

/// The layers a coder reports in the `sandbox` object of its results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layer {
    /// no_new_privs, rlimits, process group, scrubbed environment and
    /// descriptors, no capabilities, a non-dumpable agent, file.read checks.
    Base,
    /// Landlock file rules.
    Landlock,
    /// Landlock TCP rules (ABI 4 and later).
    LandlockTcp,
    /// Landlock signal scoping (ABI 6 and later).
    LandlockSignals,
    Seccomp,
    Namespaces,
    /// A cgroup per call, where the agent may create one.
    Cgroup,
}

use Layer::{Base, Cgroup, Landlock, LandlockSignals, LandlockTcp, Namespaces, Seccomp};

/// A coder configuration: a label and the layers switched off.
#[derive(Clone, Copy, Debug)]
struct Config {
    label: &'static str,
    disable: &'static str,
}

const FULL: Config = Config {
    label: "full",
    disable: "",
};
const NO_LANDLOCK: Config = Config {
    label: "no-landlock",
    disable: "landlock",
};
const NO_SECCOMP: Config = Config {
    label: "no-seccomp",
    disable: "seccomp",
};
const NO_NAMESPACES: Config = Config {
    label: "no-namespaces",
    disable: "namespaces",
};
const BASE_ONLY: Config = Config {
    label: "base-only",
    disable: "landlock,seccomp,namespaces,cgroup",
};
const ALL: [Config; 5] = [FULL, NO_LANDLOCK, NO_SECCOMP, NO_NAMESPACES, BASE_ONLY];

fn survey() -> bool {
    std::env::var_os("FEM_ISOLATION_SURVEY").is_some()
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// One fem-coder process and what it reported about its sandbox.
struct Coder {
    label: &'static str,
    id: String,
    proc: Proc,
    work: tempfile::TempDir,
    /// The `sandbox` object of a `shell.run echo` result (null before
    /// isolation existed).
    report: Value,
}

impl Coder {
    fn enforces(&self, layer: Layer) -> bool {
        let layers = &self.report["layers"];
        match layer {
            Base => layers["base"].is_object(),
            Landlock => layers["landlock"].is_object(),
            LandlockTcp => layers["landlock"]["tcp"] == true,
            LandlockSignals => layers["landlock"]["signal_scope"] == true,
            Seccomp => layers["seccomp"].is_object(),
            Namespaces => layers["namespaces"].is_object(),
            Cgroup => layers["cgroup"].is_object(),
        }
    }

    fn stops(&self, by: &[Layer]) -> bool {
        by.iter().any(|&l| self.enforces(l))
    }

    fn work(&self) -> &Path {
        self.work.path()
    }
}

/// What one `fem call` gave.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
    result: Value,
}

impl Outcome {
    /// Everything the attacker gets back: the child's output and the error.
    fn text(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.result["stdout"].as_str().unwrap_or(""),
            self.result["stderr"].as_str().unwrap_or(""),
            self.stderr
        )
    }

    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "call failed: {}\n{}",
            self.stderr, self.stdout
        );
        self
    }
}

/// A broker, a key file outside every root, and coders of several configurations.
struct Lab {
    broker: BrokerProcess,
    _secrets: tempfile::TempDir,
    key: PathBuf,
    key_hex: String,
    env_secret: String,
    coders: Vec<Coder>,
    n: u16,
}

impl Lab {
    async fn start(n: u16, configs: &[Config], extra: &[&str]) -> Self {
        let broker = BrokerProcess::start(host(n), &[], &[]).await;
        let secrets = tempfile::tempdir().unwrap();
        let seed: [u8; 32] = rand::thread_rng().r#gen();
        let key_hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let key = secrets.path().join("agent.key");
        std::fs::write(&key, format!("{key_hex}\n")).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env_secret = format!("envsecret{}", rand::thread_rng().r#gen::<u64>());
        let mut lab = Self {
            broker,
            _secrets: secrets,
            key,
            key_hex,
            env_secret,
            coders: Vec::new(),
            n,
        };
        for c in configs {
            lab.add_coder(c.label, c.disable, extra).await;
        }
        lab
    }

    async fn add_coder(&mut self, label: &'static str, disable: &str, extra: &[&str]) {
        let work = tempfile::tempdir().unwrap();
        let id = format!("{label}-{}", self.n);
        let (url, ca) = (self.broker.url(), self.broker.ca());
        let key = self.key.to_str().unwrap().to_owned();
        let w = work.path().to_str().unwrap().to_owned();
        let mut args = vec![
            "--broker",
            &url,
            "--ca",
            &ca,
            "--agent",
            &id,
            "--key",
            &key,
            "--work-dir",
            &w,
            "--timeout",
            "20s",
        ];
        args.extend_from_slice(extra);
        let envs = [
            ("FEM_SANDBOX_DISABLE", disable),
            ("FEM_TEST_SECRET", self.env_secret.as_str()),
        ];
        let mut proc = Proc::spawn("fem-coder", &args, &envs);
        proc.wait_for("fem-coder registered", Duration::from_secs(30))
            .await;
        let mut coder = Coder {
            label,
            id,
            proc,
            work,
            report: Value::Null,
        };
        let r = self
            .call(&coder, "shell.run", json!({"argv": ["echo", "hi"]}))
            .await;
        r.ok();
        assert_eq!(r.result["stdout"], "hi\n", "{}", r.stdout);
        coder.report = r.result["sandbox"].clone();
        eprintln!("[isolation] coder {label}: sandbox {}", coder.report);
        self.coders.push(coder);
    }

    async fn call(&self, coder: &Coder, tool: &str, args: Value) -> Outcome {
        let (code, stdout, stderr) = self.broker.call(&coder.id, tool, &args).await;
        let result = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        Outcome {
            code,
            stdout,
            stderr,
            result,
        }
    }

    async fn python(&self, coder: &Coder, code: &str) -> Outcome {
        self.call(
            coder,
            "code.execute",
            json!({"language": "python", "code": code}),
        )
        .await
    }

    async fn sh(&self, coder: &Coder, code: &str) -> Outcome {
        self.call(
            coder,
            "code.execute",
            json!({"language": "sh", "code": code}),
        )
        .await
    }

    fn key_str(&self) -> &str {
        self.key.to_str().unwrap()
    }

    /// The agent's pid, as the test knows it (the attacker may guess it).
    fn pid(coder: &Coder) -> u32 {
        coder.proc.pid()
    }
}

/// Records one attack on one coder: `escaped` says whether it worked. It
/// must have failed exactly when one of the layers `by` is enforced, and
/// every attack must be stopped on the fully isolated coder.
fn judge(coder: &Coder, attack: &str, by: &[Layer], escaped: bool, evidence: &str) {
    let stopped = coder.stops(by);
    eprintln!(
        "[isolation] {:<14} {:<58} {}",
        coder.label,
        attack,
        if escaped { "ESCAPED" } else { "refused" }
    );
    if survey() {
        return;
    }
    if coder.label == "full" {
        assert!(
            stopped,
            "{attack}: none of the layers {by:?} is enforced by the full coder on this machine: {}",
            coder.report
        );
    }
    if stopped {
        assert!(
            !escaped,
            "{attack} escaped the coder {} although {by:?} should stop it ({}):\n{evidence}",
            coder.label, coder.report
        );
    } else {
        assert!(
            escaped,
            "{attack} failed on the coder {} where none of {by:?} is enforced ({}): \
             the attack itself does not work:\n{evidence}",
            coder.label, coder.report
        );
    }
}

fn py_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Python that opens each path and prints what it read (or the error).
fn py_read(paths: &[&str]) -> String {
    let list: Vec<String> = paths.iter().map(|p| py_str(p)).collect();
    format!(
        "for p in [{}]:\n    try:\n        print('READ', p, open(p, 'rb').read(65536).decode('latin1'))\n    except Exception as e:\n        print('DENIED', p, repr(e))\n",
        list.join(", ")
    )
}

/// Python that scans the readable memory of its parent and of `pid` for
/// the key's seed and prints it in hex when found. The seed travels
/// reversed, so that the code itself never contains the secret.
fn py_scan_memory(key_hex: &str, pid: u32) -> String {
    let reversed: String = key_hex.chars().rev().collect();
    format!(
        r#"import os
seed = bytes.fromhex({rev}[::-1])
for pid in sorted({{os.getppid(), {pid}}}):
    try:
        maps = open('/proc/%d/maps' % pid).read().splitlines()
        mem = open('/proc/%d/mem' % pid, 'rb', buffering=0)
    except Exception as e:
        print('DENIED', pid, repr(e))
        continue
    found = False
    for line in maps:
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split('-'))
        if 'r' not in parts[1] or hi - lo > (1 << 28):
            continue
        try:
            mem.seek(lo)
            chunk = mem.read(hi - lo)
        except Exception:
            continue
        i = chunk.find(seed)
        if i >= 0:
            print('FOUND', pid, chunk[i:i + 32].hex())
            found = True
            break
    print('SCANNED', pid, found)
"#,
        rev = py_str(&reversed),
    )
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn secrets_stay_out_of_reach() {
    bounded(600, async {
        let lab = Lab::start(140, &ALL, &[]).await;
        let key = lab.key_str().to_owned();

        // "Another user's home": a 0700 directory of uid 4242 when we are
        // root (a plain directory outside the roots otherwise).
        let other = tempfile::tempdir().unwrap();
        let token = format!("othersecret{}", rand::thread_rng().r#gen::<u64>());
        let other_file = other.path().join("secret.txt");
        std::fs::write(&other_file, &token).unwrap();
        std::fs::set_permissions(&other_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(other.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let other_owned = is_root()
            && std::os::unix::fs::chown(&other_file, Some(4242), Some(4242)).is_ok()
            && std::os::unix::fs::chown(other.path(), Some(4242), Some(4242)).is_ok();
        let other_file = other_file.to_str().unwrap().to_owned();
        // The agent runs as we do: it could read /etc/shadow exactly when we can.
        let shadow = std::fs::read_to_string("/etc/shadow")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
            .filter(|l| !l.is_empty());

        for c in &lab.coders {
            let pid = Lab::pid(c);
            let files = [Landlock, Namespaces];

            let r = lab.python(c, &py_read(&[&key])).await;
            judge(c, "code.execute python reads the key file", &files, r.text().contains(&lab.key_hex), &r.text());

            let r = lab.sh(c, &format!("cat {key}")).await;
            judge(c, "code.execute sh reads the key file", &files, r.text().contains(&lab.key_hex), &r.text());

            let programs: [Vec<&str>; 8] = [
                vec!["cat", &key],
                vec!["head", &key],
                vec!["tail", &key],
                vec!["grep", "", &key],
                vec!["git", "--no-pager", "diff", "--no-index", "--", "/dev/null", &key],
                vec!["python3", "-c", "import sys; print(open(sys.argv[1]).read())", &key],
                vec!["env", "cat", &key],
                vec!["sh", "-c", "cat \"$1\"", "sh", &key],
            ];
            for argv in programs {
                let r = lab.call(c, "shell.run", json!({"argv": argv})).await;
                let attack = format!("shell.run {} reads the key file", argv[0]);
                judge(c, &attack, &files, r.text().contains(&lab.key_hex), &r.text());
            }

            // The attacker does not know the path: the parent's command line has it.
            let r = lab
                .call(
                    c,
                    "shell.run",
                    json!({"command": "cat \"$(tr '\\0' '\\n' < /proc/$PPID/cmdline | sed -n '/^--key$/{n;p;}')\""}),
                )
                .await;
            judge(c, "shell.run finds the key via /proc/$PPID/cmdline", &files, r.text().contains(&lab.key_hex), &r.text());

            let r = lab.python(c, &py_read(&[&format!("/proc/{pid}/cmdline")])).await;
            let r2 = lab
                .python(c, "import os\nprint(open('/proc/%d/cmdline' % os.getppid(), 'rb').read())")
                .await;
            let text = format!("{}\n{}", r.text(), r2.text());
            judge(c, "code.execute reads the agent's /proc/PID/cmdline", &files, text.contains(&key), &text);

            let env_code = format!(
                "import os\nfor pid in sorted({{os.getppid(), {pid}}}):\n    try:\n        print(pid, open('/proc/%d/environ' % pid, 'rb').read())\n    except Exception as e:\n        print('DENIED', pid, repr(e))\n"
            );
            let r = lab.python(c, &env_code).await;
            judge(c, "code.execute reads the agent's /proc/PID/environ", &[Base, Landlock, Namespaces], r.text().contains(&lab.env_secret), &r.text());

            let r = lab.python(c, &py_scan_memory(&lab.key_hex, pid)).await;
            judge(c, "code.execute recovers the key from /proc/PID/mem", &[Base, Landlock, Namespaces], r.text().contains(&lab.key_hex), &r.text());

            if let Some(line) = &shadow {
                let by: &[Layer] = &[Landlock, Namespaces];
                let r = lab.python(c, &py_read(&["/etc/shadow"])).await;
                judge(c, "code.execute reads /etc/shadow", by, r.text().contains(line.as_str()), &r.text());
            }

            // The broker of this node, same user: its identity key and the
            // development CA's private key.
            let broker_keys = [
                lab.broker.dir.path().join("broker.key"),
                lab.broker.dir.path().join("tls/ca.key"),
            ];
            let secrets: Vec<String> = broker_keys
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .map(|s| s.lines().find(|l| !l.starts_with("-----")).unwrap_or("").to_owned())
                .filter(|l| l.len() > 16)
                .collect();
            assert!(!secrets.is_empty(), "the broker wrote no key files");
            let paths: Vec<&str> = broker_keys.iter().map(|p| p.to_str().unwrap()).collect();
            let r = lab.python(c, &py_read(&paths)).await;
            let leaked = secrets.iter().any(|s| r.text().contains(s.as_str()));
            judge(c, "code.execute reads the broker's and the CA's keys", &files, leaked, &r.text());

            // Nothing of the agent's descriptors reaches the child.
            let r = lab
                .python(c, "import os\nfds = []\nfor fd in range(3, 4096):\n    try:\n        os.fstat(fd)\n        fds.append(fd)\n    except OSError:\n        pass\nprint('FDS', fds)\n")
                .await;
            judge(c, "code.execute inherits the agent's descriptors", &[Base], !r.text().contains("FDS []"), &r.text());

            let by: &[Layer] = if other_owned {
                &[Base, Landlock, Namespaces]
            } else {
                &[Landlock, Namespaces]
            };
            let r = lab.sh(c, &format!("cat {other_file}")).await;
            judge(c, "code.execute sh reads another user's home", by, r.text().contains(&token), &r.text());
        }
    })
    .await;
}

#[tokio::test]
async fn a_hard_link_to_the_key_is_refused() {
    bounded(300, async {
        let lab = Lab::start(141, &ALL, &[]).await;
        let key = lab.key_str().to_owned();
        let key_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&lab.key).unwrap());
        let linked = |p: PathBuf| {
            std::fs::metadata(p).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == key_ino)
        };
        for c in &lab.coders {
            let work = c.work().to_str().unwrap().to_owned();
            let r = lab
                .call(
                    c,
                    "shell.run",
                    json!({"command": format!("ln {key} k-sh; ls -l k-sh")}),
                )
                .await;
            judge(
                c,
                "shell.run hard-links the key into the work dir",
                &[Landlock, Namespaces],
                linked(c.work().join("k-sh")),
                &r.text(),
            );
            let code = format!(
                "import os\nos.link({}, {})\n",
                py_str(&key),
                py_str(&format!("{work}/k-py"))
            );
            let r = lab.python(c, &code).await;
            judge(
                c,
                "code.execute os.link()s the key into the work dir",
                &[Landlock, Namespaces],
                linked(c.work().join("k-py")),
                &r.text(),
            );
            for name in ["k-sh", "k-py"] {
                let read = lab.call(c, "file.read", json!({"path": name})).await;
                let text = format!("{}\n{}", read.stdout, read.stderr);
                if c.enforces(Base) && !survey() {
                    assert!(
                        !text.contains(&lab.key_hex),
                        "file.read returned the key through {name}: {text}"
                    );
                }
            }

            // However the link came to be, file.read knows the key's inode.
            std::fs::hard_link(&lab.key, c.work().join("k-test")).unwrap();
            let read = lab.call(c, "file.read", json!({"path": "k-test"})).await;
            let text = format!("{}\n{}", read.stdout, read.stderr);
            judge(
                c,
                "file.read of a hard link to the key made outside",
                &[Base],
                text.contains(&lab.key_hex),
                &text,
            );
            if c.enforces(Base) && !survey() {
                assert_eq!(read.code, 2, "{text}");
                assert!(read.stderr.contains("PERMISSION_DENIED"), "{text}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn writes_stay_inside_the_working_directories() {
    bounded(300, async {
        let lab = Lab::start(142, &ALL, &[]).await;
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path().to_str().unwrap().to_owned();
        let key_dir = lab.key.parent().unwrap().to_str().unwrap().to_owned();
        for c in &lab.coders {
            let tag = c.label;
            let code = format!(
                "import os\nfor p in [{}, {}]:\n    try:\n        open(p, 'w').write('x')\n        print('WROTE', p)\n    except Exception as e:\n        print('DENIED', p, repr(e))\nopen('in-tmp.txt', 'w').write('fine')\nprint('TMP OK', os.getcwd())\n",
                py_str(&format!("{out}/{tag}-py.txt")),
                py_str(&format!("{key_dir}/{tag}-planted.txt")),
            );
            let r = lab.python(c, &code).await;
            r.ok();
            assert!(r.text().contains("TMP OK"), "the call's own directory must be writable: {}", r.text());
            let escaped = outside.path().join(format!("{tag}-py.txt")).exists()
                || Path::new(&key_dir).join(format!("{tag}-planted.txt")).exists();
            judge(c, "code.execute python writes outside its directories", &[Landlock, Namespaces], escaped, &r.text());

            let r = lab
                .call(c, "shell.run", json!({"command": format!("echo x > {out}/{tag}-sh.txt; echo ok > inside.txt")}))
                .await;
            let escaped = outside.path().join(format!("{tag}-sh.txt")).exists();
            judge(c, "shell.run writes outside the roots", &[Landlock, Namespaces], escaped, &r.text());
            // The work directory (a root) stays writable and readable.
            let read = lab.call(c, "file.read", json!({"path": "inside.txt"})).await;
            read.ok();
            assert_eq!(read.result["content"], "ok\n", "{}", read.stdout);
        }
    })
    .await;
}

/// Accepts one TCP connection or receives one datagram within `wait`.
fn received(tcp: &TcpListener, udp: &UdpSocket, wait: Duration) -> (bool, bool) {
    let end = Instant::now() + wait;
    let (mut got_tcp, mut got_udp) = (false, false);
    while Instant::now() < end && !(got_tcp && got_udp) {
        if let Ok((mut s, _)) = tcp.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf);
            got_tcp = true;
        }
        let mut buf = [0u8; 64];
        if udp.recv_from(&mut buf).is_ok() {
            got_udp = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (got_tcp, got_udp)
}

#[tokio::test]
async fn the_network_is_off_unless_the_policy_allows_it() {
    bounded(300, async {
        let mut lab = Lab::start(143, &ALL, &[]).await;
        lab.add_coder("net-allowed", "", &["--allow-network"]).await;
        // Listeners on another address of the test range: not the broker's.
        let ip = host(144).ip();
        let tcp = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        udp.set_nonblocking(true).unwrap();
        let (tport, uport) = (
            tcp.local_addr().unwrap().port(),
            udp.local_addr().unwrap().port(),
        );
        let code = format!(
            r#"import socket
try:
    s = socket.create_connection(("{ip}", {tport}), timeout=3)
    s.sendall(b"TCPLEAK")
    s.close()
    print("TCP_OK")
except Exception as e:
    print("TCP_DENIED", repr(e))
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"UDPLEAK", ("{ip}", {uport}))
    print("UDP_SENT")
except Exception as e:
    print("UDP_DENIED", repr(e))
"#
        );
        for c in &lab.coders {
            let network = c.label == "net-allowed";
            let params = if network {
                json!({"language": "python", "code": code, "network": true})
            } else {
                json!({"language": "python", "code": code})
            };
            let r = lab.call(c, "code.execute", params).await;
            let (got_tcp, got_udp) = received(&tcp, &udp, Duration::from_millis(1500));
            if network {
                eprintln!(
                    "[isolation] {:<14} {:<58} tcp={got_tcp} udp={got_udp}",
                    c.label, "network allowed by policy and call"
                );
                if !survey() {
                    r.ok();
                    assert!(
                        got_tcp && got_udp,
                        "allowed network did not work: {}",
                        r.text()
                    );
                }
                // Without asking for it, the call has no network either.
                let r = lab
                    .call(
                        c,
                        "code.execute",
                        json!({"language": "python", "code": code}),
                    )
                    .await;
                let (got_tcp, got_udp) = received(&tcp, &udp, Duration::from_millis(1500));
                judge(
                    c,
                    "TCP connect without asking for network",
                    &[LandlockTcp, Seccomp, Namespaces],
                    got_tcp,
                    &r.text(),
                );
                judge(
                    c,
                    "UDP send without asking for network",
                    &[Seccomp, Namespaces],
                    got_udp,
                    &r.text(),
                );
                continue;
            }
            judge(
                c,
                "code.execute connects to a loopback TCP listener",
                &[LandlockTcp, Seccomp, Namespaces],
                got_tcp,
                &r.text(),
            );
            judge(
                c,
                "code.execute sends a UDP datagram",
                &[Seccomp, Namespaces],
                got_udp,
                &r.text(),
            );
            // Asking for the network is refused where the policy does not allow it.
            let r = lab
                .call(
                    c,
                    "code.execute",
                    json!({"language": "python", "code": "print(1)", "network": true}),
                )
                .await;
            if !survey() {
                assert_eq!(r.code, 2, "{}", r.stdout);
                assert!(
                    r.stderr.contains("PERMISSION_DENIED") && r.stderr.contains("network"),
                    "{}",
                    r.stderr
                );
            }
        }
    })
    .await;
}

/// Pids of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && !cmd.contains("python") && !cmd.contains("sh -c") {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether a process carrying `marker` is still alive 3 s after its call
/// ended; kills any survivor.
async fn survives(marker: &str) -> bool {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return false;
        }
        if Instant::now() >= end {
            for pid in left {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn marker() -> String {
    let mut rng = rand::thread_rng();
    format!(
        "{}.{:06}",
        rng.gen_range(700..999),
        rng.gen_range(0..1_000_000)
    )
}

#[tokio::test]
async fn background_processes_die_with_their_call() {
    bounded(300, async {
        let lab = Lab::start(145, &ALL, &[]).await;
        for c in &lab.coders {
            let m = marker();
            let code = format!(
                r#"import os, time
if os.fork() == 0:
    try:
        os.setsid()
    except Exception as e:
        print("setsid", repr(e), flush=True)
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "{m}"])
    os._exit(0)
time.sleep(60)
"#
            );
            let r = lab
                .call(c, "code.execute", json!({"language": "python", "code": code, "timeout_ms": 1500}))
                .await;
            let escaped = survives(&m).await;
            if !survey() {
                assert_eq!(r.result["timed_out"], true, "{}", r.stdout);
            }
            judge(c, "setsid() + double fork outlives the deadline", &[Seccomp, Namespaces, Cgroup], escaped, &r.text());

            let m = marker();
            let r = lab.sh(c, &format!("setsid sleep {m} & sleep 1; exit 0")).await;
            let escaped = survives(&m).await;
            judge(c, "setsid(1) background outlives a finished call", &[Seccomp, Namespaces, Cgroup], escaped, &r.text());

            let m = marker();
            let r = lab
                .call(c, "code.execute", json!({"language": "sh", "code": format!("(sleep {m} &); sleep 60"), "timeout_ms": 1000}))
                .await;
            let escaped = survives(&m).await;
            judge(c, "double-forked background outlives the deadline", &[Base], escaped, &r.text());
        }
    })
    .await;
}

#[tokio::test]
async fn children_cannot_see_or_signal_the_agent() {
    bounded(300, async {
        let mut lab = Lab::start(146, &ALL, &[]).await;
        for c in &lab.coders {
            let pid = Lab::pid(c);
            let r = lab
                .python(c, &format!("import os\nprint('SEES_AGENT' if os.path.exists('/proc/{pid}/status') else 'HIDDEN')"))
                .await;
            // Landlock refuses opening /proc/PID files but not stat(2) on
            // them: only a PID namespace hides the agent.
            judge(c, "code.execute sees the agent in /proc", &[Namespaces], r.text().contains("SEES_AGENT"), &r.text());

            // Signal 0 tests the permission without harming the agent.
            let r = lab
                .python(c, &format!("import os\ntry:\n    os.kill({pid}, 0)\n    print('SIGNAL_OK')\nexcept Exception as e:\n    print('SIGNAL_DENIED', repr(e))\n"))
                .await;
            let by = [LandlockSignals, Seccomp, Namespaces];
            judge(c, "code.execute may signal the agent", &by, r.text().contains("SIGNAL_OK"), &r.text());
        }
        // Where it is refused, try for real: the agent must survive and serve.
        for c in lab.coders.iter_mut() {
            let by = [LandlockSignals, Seccomp, Namespaces];
            if !c.stops(&by) || survey() {
                continue;
            }
            let pid = Lab::pid(c);
            let code = format!(
                "import os\nfor p in (os.getppid(), {pid}):\n    try:\n        os.kill(p, 9)\n    except Exception as e:\n        print('DENIED', p, repr(e))\n"
            );
            let (code_, out, err) = lab.broker.call(&c.id, "code.execute", &json!({"language": "python", "code": code})).await;
            assert_eq!(code_, 0, "{out}{err}");
            assert!(
                c.proc.wait_exit(Duration::from_millis(300)).await.is_none(),
                "the agent {} was killed by its child",
                c.label
            );
        }
        for c in &lab.coders {
            let r = lab.call(c, "shell.run", json!({"argv": ["echo", "alive"]})).await;
            r.ok();
            assert_eq!(r.result["stdout"], "alive\n");
        }
    })
    .await;
}

#[tokio::test]
async fn allowed_programs_cannot_start_their_way_out() {
    bounded(300, async {
        let strict = ["--allow-program", "echo,env,python3,git"];
        let lab = Lab::start(147, &[FULL, NO_LANDLOCK, NO_NAMESPACES, BASE_ONLY], &strict).await;
        let key = lab.key_str().to_owned();
        for c in &lab.coders {
            // The policy still refuses a shell command...
            let r = lab.call(c, "shell.run", json!({"command": "id"})).await;
            assert_eq!(r.code, 2, "{}", r.stdout);
            // ...but the allowed programs start whatever they like.
            let attempts = [
                ("env sh -c", json!({"argv": ["env", "sh", "-c", format!("cat {key}")]})),
                ("python3 -c os.system", json!({"argv": ["python3", "-c", format!("import os; os.system('cat {key}')")]})),
                ("git alias !cmd", json!({"argv": ["git", "-c", format!("alias.x=!cat {key}"), "x"]})),
            ];
            for (what, args) in attempts {
                let r = lab.call(c, "shell.run", args).await;
                judge(c, &format!("{what} reads the key without sh allowed"), &[Landlock, Namespaces], r.text().contains(&lab.key_hex), &r.text());
            }
        }
    })
    .await;
}

#[tokio::test]
async fn bombs_are_contained_and_the_agent_keeps_serving() {
    bounded(300, async {
        let lab = Lab::start(148, &[FULL], &["--max-output-bytes", "65536", "--memory-bytes", "536870912"]).await;
        let c = &lab.coders[0];
        let serving = || async {
            let t = Instant::now();
            let r = lab.call(c, "shell.run", json!({"argv": ["echo", "still here"]})).await;
            r.ok();
            assert_eq!(r.result["stdout"], "still here\n");
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        };

        let r = lab
            .call(c, "shell.run", json!({"command": "yes leak", "timeout_ms": 2000}))
            .await;
        r.ok();
        assert_eq!(r.result["truncated"], true, "{}", r.stdout);
        assert_eq!(r.result["stdout"].as_str().unwrap().len(), 65536);
        serving().await;

        // One process cannot take more than --memory-bytes (RLIMIT_AS).
        let r = lab
            .python(c, "try:\n    x = bytearray(2 << 30)\n    print('ALLOCATED')\nexcept MemoryError:\n    print('REFUSED')\n")
            .await;
        r.ok();
        assert!(r.text().contains("REFUSED"), "{}", r.text());
        serving().await;
        eprintln!("[isolation] memory: {}", c.report["memory"]);

        // Three processes of 400 MiB each stay under the per-process limit;
        // together they pass the call's 512 MiB, where a cgroup holds it.
        if c.report["memory"].as_str().is_some_and(|m| m.starts_with("per call")) {
            let code = r#"import os, time
kids = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        b = b"x" * (400 << 20)
        print("HELD", i, flush=True)
        time.sleep(2)
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.waitpid(k, 0)
"#;
            let r = lab.python(c, code).await;
            r.ok();
            let held = r.text().matches("HELD").count();
            assert!(held < 3, "three 400 MiB children fitted in a 512 MiB call: {}", r.text());
            serving().await;
        } else {
            eprintln!("[isolation] memory per call skipped: only RLIMIT_AS bounds it here");
        }

        // A fork bomb only where something bounds the processes of one call.
        if c.report["processes"].as_str().is_some_and(|p| p.starts_with("bounded")) {
            let r = lab
                .call(c, "code.execute", json!({"language": "sh", "code": "b() { b | b & }; b", "timeout_ms": 3000}))
                .await;
            r.ok();
            serving().await;
        } else {
            eprintln!(
                "[isolation] fork bomb skipped: processes of a call are not bounded here ({})",
                c.report["processes"]
            );
        }
    })
    .await;
}

#[tokio::test]
async fn sandbox_min_level_refuses_to_start_below_it() {
    bounded(120, async {
        let b = BrokerProcess::start(host(149), &[], &[]).await;
        let work = tempfile::tempdir().unwrap();
        let (url, ca) = (b.url(), b.ca());
        let w = work.path().to_str().unwrap().to_owned();
        let base = [
            "--broker",
            url.as_str(),
            "--ca",
            ca.as_str(),
            "--work-dir",
            w.as_str(),
        ];
        let refused = |args: Vec<&str>, envs: Vec<(&'static str, &'static str)>| {
            let mut p = Proc::spawn("fem-coder", &args, &envs);
            async move {
                let st = p
                    .wait_exit(Duration::from_secs(20))
                    .await
                    .expect("fem-coder kept running");
                assert!(!st.success());
                p.output()
            }
        };
        let mut args = base.to_vec();
        args.extend(["--agent", "min-flag", "--sandbox-min-level", "namespaces"]);
        let out = refused(args, vec![("FEM_SANDBOX_DISABLE", "namespaces")]).await;
        assert!(
            out.contains("--sandbox-min-level namespaces") && out.contains("refusing to start"),
            "{out}"
        );

        let mut args = base.to_vec();
        args.extend(["--agent", "min-env"]);
        let out = refused(
            args,
            vec![
                ("FEM_SANDBOX_DISABLE", "seccomp"),
                ("FEM_SANDBOX_MIN_LEVEL", "seccomp"),
            ],
        )
        .await;
        assert!(
            out.contains("refusing to start") && out.contains("seccomp"),
            "{out}"
        );

        let cfg = work.path().join("coder.yaml");
        std::fs::write(&cfg, "sandbox_min_level: landlock\n").unwrap();
        let mut args = base.to_vec();
        args.extend(["--agent", "min-yaml", "--config", cfg.to_str().unwrap()]);
        let out = refused(args, vec![("FEM_SANDBOX_DISABLE", "landlock")]).await;
        assert!(
            out.contains("refusing to start") && out.contains("landlock"),
            "{out}"
        );

        let mut args = base.to_vec();
        args.extend(["--agent", "min-bad", "--sandbox-min-level", "fortress"]);
        let out = refused(args, vec![]).await;
        assert!(out.contains("fortress"), "{out}");

        // At or below what is available it starts.
        let mut args = base.to_vec();
        args.extend(["--agent", "min-ok", "--sandbox-min-level", "base"]);
        let mut p = Proc::spawn("fem-coder", &args, &[]);
        p.wait_for("fem-coder registered", Duration::from_secs(30))
            .await;
    })
    .await;
}

#[tokio::test]
async fn the_sandbox_level_is_reported_everywhere() {
    bounded(120, async {
        let token = "iso-admin-token";
        let b = BrokerProcess::start(host(150), &[], &[("FEM_ADMIN_TOKEN", token)]).await;
        let work = tempfile::tempdir().unwrap();
        let (url, ca) = (b.url(), b.ca());
        let w = work.path().to_str().unwrap().to_owned();
        let metrics = SocketAddr::new(host(151).ip(), 9091);
        let m = metrics.to_string();
        let mut levels = Vec::new();
        for (id, disable) in [
            ("report-full", ""),
            ("report-noseccomp", "seccomp"),
            ("report-base", "landlock,seccomp,namespaces"),
        ] {
            let mut args = vec![
                "--broker",
                url.as_str(),
                "--ca",
                ca.as_str(),
                "--work-dir",
                w.as_str(),
                "--agent",
                id,
            ];
            if id == "report-full" {
                args.extend(["--metrics-listen", m.as_str()]);
            }
            let mut p = Proc::spawn("fem-coder", &args, &[("FEM_SANDBOX_DISABLE", disable)]);
            p.wait_for("fem-coder registered", Duration::from_secs(30))
                .await;
            let line = p.wait_for("sandbox level", Duration::from_secs(5)).await;
            let level = fem_tests::log_field(&line, "level").unwrap();
            let (code, out, err) = b.call(id, "shell.run", &json!({"argv": ["true"]})).await;
            assert_eq!(code, 0, "{err}");
            let r: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(r["sandbox"]["level"], level.as_str(), "{out}\n{line}");
            let (status, body) = fem_tests::https(
                b.addr,
                Path::new(&ca),
                "GET",
                "/v1/agents",
                &[("Authorization", &format!("Bearer {token}"))],
                "",
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let agents: Value = serde_json::from_str(&body).unwrap();
            let me = agents["agents"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["id"] == id)
                .unwrap()
                .clone();
            assert_eq!(me["metadata"]["sandbox.level"], level.as_str(), "{me}");
            if id == "report-full" {
                let (status, text) = fem_tests::http(metrics, "GET", "/metrics", &[], "").await;
                assert_eq!(status, 200);
                let gauge = text
                    .lines()
                    .find(|l| l.starts_with("fem_coder_sandbox_level "))
                    .unwrap_or_else(|| panic!("no fem_coder_sandbox_level in\n{text}"));
                let rank = ["base", "landlock", "seccomp", "namespaces"]
                    .iter()
                    .position(|l| *l == level)
                    .unwrap();
                assert_eq!(gauge, format!("fem_coder_sandbox_level {rank}"));
            }
            levels.push((id, level, p));
        }
        assert_eq!(levels[2].1, "base");
        assert_ne!(levels[1].1, "seccomp");
        assert_ne!(levels[1].1, "namespaces");
    })
    .await;
}
