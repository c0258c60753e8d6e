//! Per-call cgroups, where the agent may create them: a process limit
//! (pids.max) and a memory limit for the whole call, and a way to find and
//! kill every process of the call, whatever its group or session.
//!
//! cgroup v2: the agent's own cgroup must be writable (systemd
//! `Delegate=yes`, a root agent); the agent moves itself into a leaf
//! `fem-coder-agent` so that its cgroup may enable the controllers for the
//! calls' cgroups beside it. cgroup v1: `fem-coder-PID/call-N` below the
//! agent's cgroup in the pids and memory hierarchies (a root agent).
//! Anything that fails leaves the layer off; nothing here is required.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Which cgroup version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    V1,
    V2,
}

/// The agent's cgroups for calls.
#[derive(Debug)]
pub(super) struct Cgroups {
    version: Version,
    /// Where call cgroups are created: one directory (v2) or one per
    /// hierarchy (v1: pids, then memory if writable).
    parents: Vec<PathBuf>,
    /// Directories this agent created (removed on drop, deepest first).
    created: Vec<PathBuf>,
    memory: bool,
    next: AtomicU64,
}

/// The cgroup(s) of one call.
#[derive(Debug)]
pub(super) struct CallGroup {
    version: Version,
    dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
}

/// The agent's cgroup paths: ("", path) for v2, (controllers, path) for v1.
fn own_cgroups() -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            Some((controllers, path))
        })
        .collect()
}

/// Mount points of cgroup file systems: (fstype, super options, mount point).
fn cgroup_mounts() -> Vec<(String, String, PathBuf)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_owned();
            let _source = r.next()?;
            let options = r.next().unwrap_or("").to_owned();
            fstype
                .starts_with("cgroup")
                .then(|| (fstype, options, PathBuf::from(mount_point)))
        })
        .collect()
}

fn join(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// Removes `fem-coder-PID` directories of agents that are gone (their calls
/// are over), so that killed agents leave nothing behind for long.
fn remove_stale(dir: &Path, own: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("fem-coder-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if name.to_str() == Some(own) || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(calls) = std::fs::read_dir(e.path()) {
            for c in calls.flatten() {
                if c.path().is_dir() {
                    let _ = std::fs::remove_dir(c.path());
                }
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

impl Cgroups {
    /// Finds writable cgroups with a process controller, v2 first.
    pub(super) fn detect() -> Option<Self> {
        let own = own_cgroups();
        let mounts = cgroup_mounts();
        Self::v2(&own, &mounts).or_else(|| Self::v1(&own, &mounts))
    }

    fn v2(own: &[(String, String)], mounts: &[(String, String, PathBuf)]) -> Option<Self> {
        let path = &own.iter().find(|(c, _)| c.is_empty())?.1;
        let mount = &mounts.iter().find(|(t, _, _)| t == "cgroup2")?.2;
        let dir = join(mount, path);
        let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if !has("pids") {
            return None;
        }
        let memory = has("memory");
        let wanted = if memory { "+pids +memory" } else { "+pids" };
        let mut created = Vec::new();
        // A cgroup with processes may not enable controllers for its
        // children: the agent moves into a leaf of its own first.
        let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
        if !enabled.split_whitespace().any(|c| c == "pids") {
            let leaf = dir.join("fem-coder-agent");
            if std::fs::create_dir(&leaf).is_ok() {
                created.push(leaf.clone());
            }
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string()).ok()?;
            if write(&dir.join("cgroup.subtree_control"), wanted).is_err() {
                // Others share the cgroup: go back where we were.
                let _ = write(&dir.join("cgroup.procs"), &std::process::id().to_string());
                for d in created.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
                return None;
            }
        }
        Some(Self {
            version: Version::V2,
            parents: vec![dir],
            created,
            memory,
            next: AtomicU64::new(0),
        })
    }

    fn v1(own: &[(String, String)], mounts: &[(String, String, PathBuf)]) -> Option<Self> {
        let name = format!("fem-coder-{}", std::process::id());
        let hierarchy = |controller: &str| -> Option<PathBuf> {
            let path = &own
                .iter()
                .find(|(c, _)| c.split(',').any(|x| x == controller))?
                .1;
            let mount = &mounts
                .iter()
                .find(|(t, o, _)| t == "cgroup" && o.split(',').any(|x| x == controller))?
                .2;
            let base = join(mount, path);
            remove_stale(&base, &name);
            let dir = base.join(&name);
            std::fs::create_dir(&dir).ok()?;
            Some(dir)
        };
        let pids = hierarchy("pids")?;
        let mut parents = vec![pids.clone()];
        let mut created = vec![pids];
        let memory = match hierarchy("memory") {
            Some(m) => {
                parents.push(m.clone());
                created.push(m);
                true
            }
            None => false,
        };
        Some(Self {
            version: Version::V1,
            parents,
            created,
            memory,
            next: AtomicU64::new(0),
        })
    }

    /// "v1" or "v2".
    pub(super) fn version(&self) -> &'static str {
        match self.version {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }

    /// Whether calls get a memory limit too.
    pub(super) fn limits_memory(&self) -> bool {
        self.memory
    }

    /// A cgroup for one call, with at most `processes` processes and
    /// `memory` bytes of memory (and no swap).
    ///
    /// Errors: the I/O error of creating or configuring it.
    pub(super) fn call(&self, processes: u64, memory: u64) -> std::io::Result<CallGroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut group = CallGroup {
            version: self.version,
            dirs: Vec::new(),
        };
        for parent in &self.parents {
            let dir = parent.join(format!("call-{n}"));
            std::fs::create_dir(&dir)?;
            group.dirs.push(dir.clone());
            if dir.join("pids.max").exists() {
                write(&dir.join("pids.max"), &processes.to_string())?;
            }
            match self.version {
                Version::V2 if self.memory => {
                    write(&dir.join("memory.max"), &memory.to_string())?;
                    let _ = write(&dir.join("memory.swap.max"), "0");
                }
                Version::V1 if dir.join("memory.limit_in_bytes").exists() => {
                    write(&dir.join("memory.limit_in_bytes"), &memory.to_string())?;
                    let _ = write(
                        &dir.join("memory.memsw.limit_in_bytes"),
                        &memory.to_string(),
                    );
                }
                _ => {}
            }
        }
        Ok(group)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl CallGroup {
    /// The `cgroup.procs` files the child writes "0" to, joining them.
    pub(super) fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok())
            .collect()
    }

    fn members(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Sends SIGKILL to every process of the call (one pass, quick).
    pub(super) fn kill(&self) {
        if self.version == Version::V2
            && let Some(d) = self.dirs.first()
        {
            let _ = write(&d.join("cgroup.kill"), "1");
        }
        for pid in self.members() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// Kills every process of the call until none is left and removes its
    /// cgroups (blocking: waits up to a second for the processes to go).
    pub(super) fn finish(self) {
        let end = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            self.kill();
            let removed = self
                .dirs
                .iter()
                .all(|d| std::fs::remove_dir(d).is_ok() || !d.exists());
            if removed {
                return;
            }
            if std::time::Instant::now() >= end {
                tracing::warn!(dirs = ?self.dirs, "a call's cgroup is still busy; left for later");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
