//! Layered isolation of the processes `shell.run` and `code.execute` start.
//!
//! The program allow-list of the [`Policy`](super::Policy) decides what a
//! caller may *start*; it is not a boundary, since allowed programs (sh,
//! python3, env, git) start anything. The boundary is what the kernel
//! enforces on the child before exec, in layers, each probed once at start:
//!
//! - **base** (always): no_new_privs, an empty capability bounding set (a
//!   root agent's children have no capabilities), rlimits, their own process
//!   group killed at the deadline, a scrubbed environment, no inherited
//!   descriptors; and in the agent, a non-dumpable process (children cannot
//!   read its memory or environment through /proc or ptrace) and file.read
//!   refusing the key's inode;
//! - **landlock**: read-only access to the system paths programs need,
//!   read-write to the allowed roots and the call's own directory, nothing
//!   else (the key stays outside all of them); TCP bind and connect refused
//!   unless the call may use the network (ABI 4); signals and abstract unix
//!   sockets scoped to the call (ABI 6);
//! - **seccomp**: a deny list (ptrace, process_vm_*, mount, bpf, keyctl,
//!   io_uring, unshare/setns, kexec, modules, ...), sockets other than
//!   AF_UNIX without network, and, without a PID namespace, no setsid or
//!   signals to the agent;
//! - **namespaces** (where unprivileged user namespaces work): user, mount,
//!   PID, IPC, UTS and (without network) net; the child sees a view of the
//!   file system holding only the paths above and a /proc of its own, with a
//!   PID 1 that reaps orphans and whose end kills everything the call
//!   started.
//!
//! The [`Level`] is the longest prefix of base, landlock, seccomp,
//! namespaces that is enforced.

// The child setup reads kernel structs laid out for 64-bit Linux, and
// seccompiler knows only x86_64, aarch64 and riscv64.
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!("fem-coder's isolation supports 64-bit Linux only");

mod cgroup;
mod child;
mod filter;
mod rules;
mod view;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use nix::libc;
use serde_json::{Value, json};

pub(crate) use child::Limits;
use child::{ChildPlan, LandlockPlan, NsPlan, probe};

use super::SandboxError;

/// Directories children may read and execute (those that exist).
pub const SYSTEM_DIRS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ca-certificates",
    "/etc/ld.so.conf.d",
];

/// Files of /etc children may read (those that exist): the dynamic linker,
/// users and groups, name resolution, time zone, TLS roots, git and Python.
/// Not /etc as a whole: it holds /etc/shadow, host keys and, in many
/// deployments, the agent's own key.
pub const SYSTEM_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/gitconfig",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/debian_version",
    "/etc/locale.alias",
    "/etc/inputrc",
];

/// Device nodes children may read and write.
pub const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// An optional layer of isolation (the base layer is always on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// Landlock file and network rules.
    Landlock,
    /// The seccomp deny list.
    Seccomp,
    /// User, mount, PID, IPC, UTS and net namespaces.
    Namespaces,
    /// A cgroup per call (process and memory limits, kill of every member);
    /// beside the levels, where the agent may create cgroups.
    Cgroup,
}

impl Layer {
    /// Every optional layer.
    pub const ALL: [Self; 4] = [
        Self::Landlock,
        Self::Seccomp,
        Self::Namespaces,
        Self::Cgroup,
    ];

    /// The layer's name in flags, reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Landlock => "landlock",
            Self::Seccomp => "seccomp",
            Self::Namespaces => "namespaces",
            Self::Cgroup => "cgroup",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Layer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown sandbox layer {s:?} (landlock, seccomp, namespaces, cgroup)")
            })
    }
}

/// How strongly children are isolated: each level includes the ones before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The base layer only.
    #[default]
    Base,
    /// Base and Landlock.
    Landlock,
    /// Base, Landlock and seccomp.
    Seccomp,
    /// All layers, namespaces included.
    Namespaces,
}

impl Level {
    /// Every level, weakest first.
    pub const ALL: [Self; 4] = [Self::Base, Self::Landlock, Self::Seccomp, Self::Namespaces];

    /// The level's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Landlock => "landlock",
            Self::Seccomp => "seccomp",
            Self::Namespaces => "namespaces",
        }
    }

    /// 0 for base up to 3 for namespaces (the metric's value).
    pub fn rank(self) -> i64 {
        self as i64
    }

    /// The layer this level adds to the one below (None for base).
    pub fn layer(self) -> Option<Layer> {
        match self {
            Self::Base => None,
            Self::Landlock => Some(Layer::Landlock),
            Self::Seccomp => Some(Layer::Seccomp),
            Self::Namespaces => Some(Layer::Namespaces),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown sandbox level {s:?} (base, landlock, seccomp, namespaces)")
            })
    }
}

/// The operator's isolation settings (flags, variables, YAML).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IsolationOptions {
    /// Layers switched off (`FEM_SANDBOX_DISABLE`, for tests and
    /// diagnosis). Default: none.
    pub disable: Vec<Layer>,
    /// Whether a call may ask for the network (`--allow-network`). Default:
    /// false.
    pub allow_network: bool,
    /// More paths children may read and execute (`--sandbox-read-path`),
    /// e.g. a toolchain outside /usr. Default: none.
    pub read_paths: Vec<PathBuf>,
    /// Files children must never read: the agent's key. The agent refuses to
    /// start if one lies in a path children may read, and file.read refuses
    /// their inodes (hard links included). Default: none.
    pub protected_files: Vec<PathBuf>,
}

/// A protected file, by identity.
#[derive(Debug, Clone)]
struct Protected {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

#[derive(Debug)]
struct Seccomp {
    offline: Arc<seccompiler::BpfProgram>,
    online: Arc<seccompiler::BpfProgram>,
    clone3: Arc<seccompiler::BpfProgram>,
    denied: usize,
    /// Compiled for children that share the agent's PID namespace.
    guards_agent: bool,
}

#[derive(Debug)]
struct Namespaces {
    view: view::View,
    proc: bool,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

/// The probed isolation of one agent.
#[derive(Debug)]
pub struct Isolation {
    level: Level,
    landlock: Option<rules::Rules>,
    kernel_abi: Option<i32>,
    seccomp: Option<Seccomp>,
    namespaces: Option<Namespaces>,
    cgroups: Option<cgroup::Cgroups>,
    /// Why each missing layer is missing.
    off: BTreeMap<Layer, String>,

    roots: Vec<PathBuf>,
    protected: Vec<Protected>,
    protected_c: Vec<CString>,
    protected_unreadable: bool,
    capabilities_dropped: bool,
    allow_network: bool,
    cap_last: libc::c_int,
    processes_bounded: bool,
}

/// Per-call state: the plan the child runs, and the ruleset descriptor it
/// refers to (which must stay open until the spawn returns).
#[derive(Debug)]
pub(super) struct Prepared {
    plan: Arc<ChildPlan>,
    _ruleset: Option<OwnedFd>,
}

/// A call's cgroup, killed and removed when the call ends (or is dropped).
#[derive(Debug)]
pub(super) struct CallGroup(Option<cgroup::CallGroup>);

impl CallGroup {
    /// Kills whatever is left of the call now, and removes its cgroup in
    /// the background (that may wait for the processes to go). Call from
    /// the async runtime.
    pub(super) fn finish(mut self) {
        if let Some(g) = self.0.take() {
            g.kill();
            drop(tokio::task::spawn_blocking(move || g.finish()));
        }
    }
}

impl Drop for CallGroup {
    fn drop(&mut self) {
        // A cancelled call: clean up on a thread of its own.
        if let Some(g) = self.0.take() {
            std::thread::spawn(move || g.finish());
        }
    }
}

impl Prepared {
    /// Makes `cmd` apply the layers in its child.
    pub(super) fn install(&self, cmd: &mut std::process::Command) {
        child::install(cmd, Arc::clone(&self.plan));
    }
}

fn cap_last() -> libc::c_int {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &libc::c_int| (0..64).contains(&n))
        .unwrap_or(40)
}

fn paths(list: &[&str]) -> Vec<PathBuf> {
    list.iter().map(PathBuf::from).collect()
}

/// /etc/python3* (Debian's site configuration).
fn python_etc() -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/etc") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(b"python3"))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn cstring(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::InvalidPolicy(format!("path {} contains NUL", p.display())))
}

impl Isolation {
    /// Probes the layers (minus `opts.disable`) with test children and keeps
    /// those that work. `roots` are the canonical allowed roots (read-write
    /// for children); `limits` are applied to the probes too.
    ///
    /// Errors: [`SandboxError::InvalidPolicy`] if a protected file lies in a
    /// path children may read; [`SandboxError::Internal`] or
    /// [`SandboxError::Io`] if even the base layer cannot start a child.
    pub(crate) fn probe(
        opts: &IsolationOptions,
        roots: &[PathBuf],
        limits: Limits,
    ) -> Result<Self, SandboxError> {
        let mut dirs = paths(SYSTEM_DIRS);
        dirs.extend(python_etc());
        let mut read_paths = Vec::new();
        for p in &opts.read_paths {
            let c = std::fs::canonicalize(p).map_err(|e| SandboxError::Io {
                context: format!("sandbox read path {}", p.display()),
                source: e,
            })?;
            read_paths.push(c);
        }
        dirs.extend(read_paths.iter().cloned());
        let files = paths(SYSTEM_FILES);
        let devices = paths(DEVICES);

        let mut protected = Vec::new();
        for p in &opts.protected_files {
            let Ok(real) = std::fs::canonicalize(p) else {
                continue;
            };
            let meta = std::fs::metadata(&real).map_err(|e| SandboxError::Io {
                context: format!("protected file {}", real.display()),
                source: e,
            })?;
            check_outside(&real, roots, &dirs, &files, &devices)?;
            protected.push(Protected {
                path: real,
                dev: meta.dev(),
                ino: meta.ino(),
            });
        }
        let protected_c = protected
            .iter()
            .map(|p| cstring(&p.path))
            .collect::<Result<Vec<_>, _>>()?;

        let mut off = BTreeMap::new();
        for l in &opts.disable {
            off.insert(*l, "switched off (FEM_SANDBOX_DISABLE)".to_owned());
        }
        let kernel_abi = child::kernel_landlock_abi();
        let mut landlock = None;
        if let std::collections::btree_map::Entry::Vacant(slot) = off.entry(Layer::Landlock) {
            match rules::kernel_abi() {
                Some(abi) => landlock = Some(rules::Rules::new(abi, &dirs, &files, &devices)?),
                None => {
                    slot.insert("not supported by this kernel".to_owned());
                }
            }
        }
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let mut namespaces = None;
        if let std::collections::btree_map::Entry::Vacant(slot) = off.entry(Layer::Namespaces) {
            match new_root_dir(uid) {
                Ok(root) => {
                    let view = view::View::new(&root, &dirs, &files, &devices, roots);
                    namespaces = Some(Namespaces {
                        view,
                        proc: true,
                        uid_map: format!("{uid} {uid} 1\n").into_bytes(),
                        gid_map: format!("{gid} {gid} 1\n").into_bytes(),
                    });
                }
                Err(e) => {
                    slot.insert(e.to_string());
                }
            }
        }
        remove_stale_call_dirs(uid);

        let mut cgroups = None;
        if let std::collections::btree_map::Entry::Vacant(slot) = off.entry(Layer::Cgroup) {
            match cgroup::Cgroups::detect() {
                Some(c) => match probe_cgroup(&c, limits) {
                    Ok(()) => cgroups = Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "sandbox: cannot put children in a cgroup");
                        slot.insert(e.to_string());
                    }
                },
                None => {
                    slot.insert("no writable cgroup with the pids controller".to_owned());
                }
            }
        }

        let mut iso = Self {
            level: Level::Base,
            landlock,
            kernel_abi,
            seccomp: None,
            namespaces,
            cgroups,
            off,
            roots: roots.to_vec(),
            protected,
            protected_c,
            protected_unreadable: false,
            capabilities_dropped: false,
            allow_network: opts.allow_network,
            cap_last: cap_last(),
            processes_bounded: uid != 0,
        };
        let want_seccomp = !iso.off.contains_key(&Layer::Seccomp);
        loop {
            iso.seccomp = if want_seccomp && !iso.off.contains_key(&Layer::Seccomp) {
                Some(iso.compile_seccomp()?)
            } else {
                None
            };
            match iso.self_test(limits) {
                Ok(bits) => {
                    if bits & probe::NO_NEW_PRIVS == 0 {
                        return Err(SandboxError::Internal(
                            "the probe child could not set no_new_privs".to_owned(),
                        ));
                    }
                    let mut missing = Vec::new();
                    if iso.namespaces.is_some() && bits & probe::PID_NAMESPACE == 0 {
                        missing.push((Layer::Namespaces, "the probe had no PID namespace"));
                    }
                    if iso.seccomp.is_some() && bits & probe::SECCOMP == 0 {
                        missing.push((Layer::Seccomp, "the probe had no seccomp filter"));
                    }
                    if iso.landlock.is_some() && bits & probe::LANDLOCK == 0 {
                        missing.push((Layer::Landlock, "the probe could open /"));
                    }
                    if missing.is_empty() {
                        iso.capabilities_dropped = bits & probe::NO_CAPABILITIES != 0;
                        iso.protected_unreadable = bits & probe::PROTECTED_UNREADABLE != 0;
                        break;
                    }
                    for (layer, why) in missing {
                        iso.drop_layer(layer, why.to_owned());
                    }
                }
                Err(e) => {
                    // The strongest remaining layer goes first; /proc is
                    // given up before the namespaces.
                    let why = e.to_string();
                    if let Some(ns) = iso.namespaces.as_mut().filter(|ns| ns.proc) {
                        tracing::warn!(error = %why, "sandbox: no /proc of its own in the namespaces");
                        ns.proc = false;
                    } else if iso.namespaces.is_some() {
                        iso.drop_layer(Layer::Namespaces, why);
                    } else if iso.seccomp.is_some() {
                        iso.drop_layer(Layer::Seccomp, why);
                    } else if iso.landlock.is_some() {
                        iso.drop_layer(Layer::Landlock, why);
                    } else {
                        return Err(SandboxError::Internal(format!(
                            "a child with the base layer cannot start: {why}"
                        )));
                    }
                }
            }
        }
        iso.level = if iso.landlock.is_none() {
            Level::Base
        } else if iso.seccomp.is_none() {
            Level::Landlock
        } else if iso.namespaces.is_none() {
            Level::Seccomp
        } else {
            Level::Namespaces
        };
        Ok(iso)
    }

    fn drop_layer(&mut self, layer: Layer, why: String) {
        tracing::warn!(%layer, reason = %why, "sandbox layer unavailable");
        match layer {
            Layer::Landlock => self.landlock = None,
            Layer::Seccomp => self.seccomp = None,
            Layer::Namespaces => self.namespaces = None,
            Layer::Cgroup => self.cgroups = None,
        }
        self.off.insert(layer, why);
    }

    fn compile_seccomp(&self) -> Result<Seccomp, SandboxError> {
        // Children in a PID namespace of their own cannot name the agent;
        // the others get the rules that keep them away from it.
        let agent = self.namespaces.is_none().then(|| filter::Agent {
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            pgid: nix::unistd::getpgrp().as_raw(),
        });
        let p = filter::Programs::compile(agent)?;
        Ok(Seccomp {
            offline: Arc::new(p.offline),
            online: Arc::new(p.online),
            clone3: Arc::new(p.clone3),
            denied: p.denied,
            guards_agent: agent.is_some(),
        })
    }

    /// Runs a probe child under the current layers; returns its bits.
    fn self_test(&self, limits: Limits) -> Result<i32, SandboxError> {
        let scratch = tempfile::Builder::new()
            .prefix("fem-coder-probe-")
            .tempdir()
            .map_err(|e| SandboxError::Io {
                context: "creating the sandbox probe directory".to_owned(),
                source: e,
            })?;
        let group = self.call_group(limits)?;
        let prepared = self.prepare(
            limits,
            &group,
            &[scratch.path()],
            scratch.path(),
            false,
            true,
        )?;
        let mut cmd = std::process::Command::new("/");
        cmd.current_dir(scratch.path())
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        prepared.install(&mut cmd);
        let out = cmd.output().map_err(|e| SandboxError::Io {
            context: "starting the sandbox probe".to_owned(),
            source: e,
        })?;
        drop(prepared);
        drop(group);
        match out.status.code() {
            Some(code) if code & probe::DONE != 0 => Ok(code),
            _ => Err(SandboxError::Internal(format!(
                "the sandbox probe ended with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    /// The plan for one call: `writable` directories besides the roots
    /// (the call's own), the working directory, and whether the call may
    /// use the network (the policy must allow it; see [`Self::allows_network`]).
    pub(super) fn prepare(
        &self,
        limits: Limits,
        group: &CallGroup,
        writable: &[&Path],
        cwd: &Path,
        network: bool,
        probe: bool,
    ) -> Result<Prepared, SandboxError> {
        let network = network && self.allow_network;
        let mut all: Vec<&Path> = self.roots.iter().map(PathBuf::as_path).collect();
        all.extend_from_slice(writable);
        let ruleset = match &self.landlock {
            Some(r) => Some(r.ruleset(&all, network)?),
            None => None,
        };
        let ns = match &self.namespaces {
            Some(n) => {
                let mut flags = libc::CLONE_NEWUSER
                    | libc::CLONE_NEWNS
                    | libc::CLONE_NEWPID
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS;
                if !network {
                    flags |= libc::CLONE_NEWNET;
                }
                Some(NsPlan {
                    flags,
                    uid_map: n.uid_map.clone(),
                    gid_map: n.gid_map.clone(),
                    new_root: cstring(n.view.new_root())?,
                    steps: n.view.steps(writable)?,
                    proc_target: if n.proc {
                        Some(n.view.proc_target()?)
                    } else {
                        None
                    },
                    cwd: view::View::inside(cwd)?,
                })
            }
            None => None,
        };
        let landlock = match (&ruleset, &self.landlock) {
            (Some(fd), Some(r)) => Some(LandlockPlan {
                ruleset_fd: fd.as_raw_fd(),
                proc_access: match &self.namespaces {
                    Some(n) if n.proc => r.proc_access(),
                    _ => 0,
                },
            }),
            _ => None,
        };
        let seccomp = match &self.seccomp {
            Some(s) => vec![
                Arc::clone(if network { &s.online } else { &s.offline }),
                Arc::clone(&s.clone3),
            ],
            None => Vec::new(),
        };
        Ok(Prepared {
            plan: Arc::new(ChildPlan {
                limits,
                cgroup_procs: group
                    .0
                    .as_ref()
                    .map(cgroup::CallGroup::procs_files)
                    .unwrap_or_default(),
                cap_last: self.cap_last,
                landlock,
                seccomp,
                ns,
                probe,
                protected: if probe {
                    self.protected_c.clone()
                } else {
                    Vec::new()
                },
            }),
            _ruleset: ruleset,
        })
    }

    /// A cgroup for one call where cgroups are available (empty otherwise).
    ///
    /// Errors: [`SandboxError::Io`] if it cannot be created.
    pub(super) fn call_group(&self, limits: Limits) -> Result<CallGroup, SandboxError> {
        match &self.cgroups {
            Some(c) => c
                .call(limits.processes, limits.address_space)
                .map(|g| CallGroup(Some(g)))
                .map_err(|e| SandboxError::Io {
                    context: "creating the call's cgroup".to_owned(),
                    source: e,
                }),
            None => Ok(CallGroup(None)),
        }
    }

    /// The level reached.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Whether `layer` is enforced.
    pub fn enforces(&self, layer: Layer) -> bool {
        match layer {
            Layer::Landlock => self.landlock.is_some(),
            Layer::Seccomp => self.seccomp.is_some(),
            Layer::Namespaces => self.namespaces.is_some(),
            Layer::Cgroup => self.cgroups.is_some(),
        }
    }

    /// Why `layer` is not enforced (None if it is).
    pub fn why_off(&self, layer: Layer) -> Option<&str> {
        self.off.get(&layer).map(String::as_str)
    }

    /// Whether calls may ask for the network.
    pub fn allows_network(&self) -> bool {
        self.allow_network
    }

    /// Whether `meta` is (a hard link to) a protected file.
    pub(super) fn protects(&self, meta: &std::fs::Metadata) -> bool {
        self.protected
            .iter()
            .any(|p| p.dev == meta.dev() && p.ino == meta.ino())
    }

    /// The Landlock ABI the kernel reports (None: no Landlock).
    pub fn kernel_landlock_abi(&self) -> Option<i32> {
        self.kernel_abi
    }

    /// The `sandbox` object of a result: the level and what each layer
    /// enforced for a call with (or without) `network`.
    pub fn report(&self, network: bool) -> Value {
        let network = network && self.allow_network;
        let base = json!({
            "no_new_privs": true,
            "capabilities": if self.capabilities_dropped { "none" } else { "kept" },
            "rlimits": true,
            "process_group": "killed at the deadline",
            "environment": "scrubbed",
            "file_descriptors": "closed at exec",
            "agent_dumpable": false,
            "protected_files_readable": !self.protected.is_empty() && !self.protected_unreadable,
        });
        let landlock = self.landlock.as_ref().map(|r| {
            json!({
                "abi": rules::abi_number(r.abi()),
                "kernel_abi": self.kernel_abi,
                "filesystem": true,
                "tcp": r.handles_tcp() && !network,
                "signal_scope": r.scopes(),
                "abstract_unix_scope": r.scopes(),
            })
        });
        let seccomp = self.seccomp.as_ref().map(|s| {
            json!({
                "denied_syscalls": s.denied,
                "sockets": if network { "any" } else { "unix only" },
                "namespace_flags": "denied",
                "agent_signals": if s.guards_agent { "denied" } else { "not visible" },
                "setsid": if s.guards_agent { "denied" } else { "allowed" },
            })
        });
        let namespaces = self.namespaces.as_ref().map(|n| {
            json!({
                "user": true,
                "mount": true,
                "pid": true,
                "ipc": true,
                "uts": true,
                "net": !network,
                "proc": n.proc,
            })
        });
        let cgroup = self.cgroups.as_ref().map(|c| {
            json!({
                "version": c.version(),
                "processes": "pids.max",
                "memory": c.limits_memory(),
                "kill": "every member at the end",
            })
        });
        let processes = if self.cgroups.is_some() {
            "bounded per call (cgroup pids.max)"
        } else if self.processes_bounded {
            "bounded per user (RLIMIT_NPROC counts every process of the agent's uid)"
        } else {
            "not bounded (no cgroup, and RLIMIT_NPROC does not apply to root)"
        };
        let memory = if self.cgroups.as_ref().is_some_and(|c| c.limits_memory()) {
            "per call (cgroup) and per process (RLIMIT_AS)"
        } else {
            "per process only (RLIMIT_AS)"
        };
        json!({
            "level": self.level.as_str(),
            "network": network,
            "layers": {
                "base": base,
                "landlock": landlock,
                "seccomp": seccomp,
                "namespaces": namespaces,
                "cgroup": cgroup,
            },
            "processes": processes,
            "memory": memory,
        })
    }

    /// One line for the startup log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for layer in Layer::ALL {
            match (self.enforces(layer), self.why_off(layer)) {
                (true, _) if layer == Layer::Landlock => parts.push(format!(
                    "landlock=on(abi {}{})",
                    self.landlock
                        .as_ref()
                        .map_or(0, |r| rules::abi_number(r.abi())),
                    self.kernel_abi
                        .map(|k| format!(", kernel {k}"))
                        .unwrap_or_default()
                )),
                (true, _) => parts.push(format!("{layer}=on")),
                (false, why) => parts.push(format!("{layer}=off({})", why.unwrap_or("?"))),
            }
        }
        parts.join(" ")
    }
}

/// The empty directory each child mounts its new root on (in its own mount
/// namespace, so one directory serves every call): `fem-coder-root-UID` in
/// the temporary directory, made once and kept, or a fresh one if that name
/// is taken by something else.
fn new_root_dir(uid: u32) -> Result<PathBuf, SandboxError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let path = std::env::temp_dir().join(format!("fem-coder-root-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&path);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() && m.uid() == uid => Ok(path),
        _ => {
            let dir = tempfile::Builder::new()
                .prefix("fem-coder-root-")
                .tempdir()
                .map_err(|e| SandboxError::Io {
                    context: "creating the sandbox root directory".to_owned(),
                    source: e,
                })?;
            // Kept for the agent's life (an empty directory).
            Ok(dir.keep())
        }
    }
}

/// The prefix of this agent's per-call directories (`fem-coder-PID-` and
/// `fem-coder-tmp-PID-`), by which a later agent finds what a killed one
/// left behind.
pub(super) fn call_dir_prefix(tmp: bool) -> String {
    let pid = std::process::id();
    if tmp {
        format!("fem-coder-tmp-{pid}-")
    } else {
        format!("fem-coder-{pid}-")
    }
}

/// Removes the call directories of agents of this uid that are gone.
fn remove_stale_call_dirs(uid: u32) {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("fem-coder-")) else {
            continue;
        };
        let rest = rest.strip_prefix("tmp-").unwrap_or(rest);
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Only real directories of our own (remove_dir_all does not follow
        // symbolic links).
        if std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == uid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Starts a probe child with only the base layer in a call cgroup.
fn probe_cgroup(c: &cgroup::Cgroups, limits: Limits) -> Result<(), SandboxError> {
    let group = c
        .call(limits.processes, limits.address_space)
        .map_err(|e| SandboxError::Io {
            context: "creating a probe cgroup".to_owned(),
            source: e,
        })?;
    let plan = Arc::new(ChildPlan {
        limits,
        cgroup_procs: group.procs_files(),
        cap_last: 0,
        landlock: None,
        seccomp: Vec::new(),
        ns: None,
        probe: true,
        protected: Vec::new(),
    });
    let mut cmd = std::process::Command::new("/");
    cmd.env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    child::install(&mut cmd, plan);
    let status = cmd.status();
    group.finish();
    match status {
        Ok(st) if st.code().is_some_and(|c| c & probe::DONE != 0) => Ok(()),
        Ok(st) => Err(SandboxError::Internal(format!(
            "the cgroup probe ended with {st}"
        ))),
        Err(e) => Err(SandboxError::Io {
            context: "joining a cgroup".to_owned(),
            source: e,
        }),
    }
}

/// Refuses a protected file that children could read.
fn check_outside(
    file: &Path,
    roots: &[PathBuf],
    dirs: &[PathBuf],
    files: &[PathBuf],
    devices: &[PathBuf],
) -> Result<(), SandboxError> {
    let refuse = |place: &Path| {
        Err(SandboxError::InvalidPolicy(format!(
            "the key file {} lies in {}, which tool children may read; keep it outside the \
             allowed paths and the sandbox read paths",
            file.display(),
            place.display()
        )))
    };
    for r in roots {
        if file.starts_with(r) {
            return refuse(r);
        }
    }
    for d in dirs {
        let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        if file.starts_with(&d) {
            return refuse(&d);
        }
    }
    for f in files.iter().chain(devices) {
        if std::fs::canonicalize(f).is_ok_and(|c| c == file) {
            return refuse(f);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn levels_and_layers_parse_and_order() {
        assert_eq!("seccomp".parse::<Level>().unwrap(), Level::Seccomp);
        assert!(
            "fortress"
                .parse::<Level>()
                .unwrap_err()
                .contains("fortress")
        );
        assert!(Level::Base < Level::Landlock && Level::Seccomp < Level::Namespaces);
        assert_eq!(Level::Namespaces.rank(), 3);
        assert_eq!("landlock".parse::<Layer>().unwrap(), Layer::Landlock);
        assert!("selinux".parse::<Layer>().is_err());
    }

    #[test]
    fn a_key_children_could_read_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let key = root.path().join("agent.key");
        std::fs::write(&key, "k").unwrap();
        let root_c = root.path().canonicalize().unwrap();
        let opts = IsolationOptions {
            protected_files: vec![key],
            ..IsolationOptions::default()
        };
        let limits = Limits {
            cpu_seconds: 5,
            address_space: 1 << 30,
            processes: 64,
        };
        let err = Isolation::probe(&opts, &[root_c], limits).unwrap_err();
        assert!(matches!(err, SandboxError::InvalidPolicy(_)), "{err}");
        assert!(err.to_string().contains("agent.key"), "{err}");
    }
}
