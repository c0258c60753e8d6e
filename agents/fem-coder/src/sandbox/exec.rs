//! Running one child process under the policy: scrubbed environment, own
//! process group, the isolation layers (see `isolation`), bounded output
//! capture and a deadline.

use std::{
    io,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use nix::{
    libc,
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use rlimit::Resource;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Command,
    time::Instant,
};

use super::isolation::Limits;
use super::{Policy, SANDBOX_PATH, SandboxError, push_bounded};

/// How long to keep draining the pipes once the child has exited or been
/// killed. Only processes that escaped the process group (setsid) can keep the
/// pipes open that long; after this we stop reading and return what we have.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Size of each read from a child pipe.
const READ_CHUNK: usize = 32 * 1024;

/// One execution request, already validated against the policy.
pub(super) struct Spec {
    /// Absolute path of the allowed program to execute.
    pub(super) program: PathBuf,
    /// Arguments after argv[0].
    pub(super) args: Vec<String>,
    /// Working directory (already checked against the policy).
    pub(super) cwd: PathBuf,
    /// Data for the child's stdin; `None` means /dev/null.
    pub(super) stdin: Option<String>,
    /// Effective deadline for the whole run.
    pub(super) timeout: Duration,
    /// Value of TMPDIR in the child.
    pub(super) tmpdir: PathBuf,
    /// Tool name, for the log line.
    pub(super) tool: &'static str,
    /// Whether the call asked for the network (the policy allowed it).
    pub(super) network: bool,
}

impl Limits {
    /// The policy's limits, clamped to what the agent may set.
    ///
    /// Errors: [`SandboxError::Internal`] on a platform without one of them.
    pub(crate) fn for_options(
        cpu_seconds: u64,
        memory_bytes: u64,
        max_processes: u64,
    ) -> Result<Self, SandboxError> {
        for resource in [Resource::CPU, Resource::AS, Resource::NPROC, Resource::CORE] {
            // Checked here, in the parent, so that `rlimit::setrlimit` cannot
            // take its allocating "unsupported" error path in the child.
            if !resource.is_supported() {
                return Err(SandboxError::Internal(format!(
                    "resource limit {resource:?} is not supported on this platform"
                )));
            }
        }
        Ok(Self {
            cpu_seconds: clamp_to_hard(Resource::CPU, cpu_seconds),
            address_space: clamp_to_hard(Resource::AS, memory_bytes),
            processes: clamp_to_hard(Resource::NPROC, max_processes),
        })
    }
}

/// An unprivileged process cannot raise a hard limit: ask for at most the
/// agent's own hard limit so that setrlimit in the child cannot fail on EPERM.
fn clamp_to_hard(resource: Resource, wanted: u64) -> u64 {
    match rlimit::getrlimit(resource) {
        Ok((_, hard)) => wanted.min(hard),
        Err(_) => wanted,
    }
}

/// Sends SIGKILL to the child's whole process group, and does so on drop
/// while armed (the run future was cancelled or returned early).
struct GroupKiller {
    pgid: Pid,
    armed: bool,
}

impl GroupKiller {
    fn kill(&self) {
        // Never signal group 0 (our own group) or 1 (init's).
        if self.pgid.as_raw() > 1 {
            // ESRCH (group already gone) is the normal case after exit.
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Output of one stream, capped.
struct Capture {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capture {
    fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if push_bounded(&mut self.buf, data, self.cap) {
            self.truncated = true;
        }
    }

    /// Lossy UTF-8; a multi-byte character cut by truncation is dropped
    /// rather than turned into U+FFFD.
    fn into_string(self) -> String {
        let mut buf = self.buf;
        if self.truncated {
            let cut = match std::str::from_utf8(&buf) {
                Err(e) if e.error_len().is_none() => Some(e.valid_up_to()),
                _ => None,
            };
            if let Some(len) = cut {
                buf.truncate(len);
            }
        }
        match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

fn spawn_error(program: &Path, e: io::Error) -> SandboxError {
    if e.raw_os_error() == Some(libc::E2BIG) {
        SandboxError::BadRequest("argument list too long".to_owned())
    } else if e.kind() == io::ErrorKind::InvalidInput {
        SandboxError::BadRequest(format!("cannot start {}: {e}", program.display()))
    } else {
        SandboxError::Io {
            context: format!("cannot start {}", program.display()),
            source: e,
        }
    }
}

/// Runs `spec` to completion, timeout or cancellation and returns the result
/// JSON of shell.run / code.execute.
pub(super) async fn run(policy: &Policy, spec: Spec) -> Result<Value, SandboxError> {
    // The call's own directory is writable besides the roots (it is the cwd
    // of code.execute and the TMPDIR of both tools).
    let group = policy.isolation.call_group(policy.limits)?;
    let prepared = policy.isolation.prepare(
        policy.limits,
        &group,
        &[spec.tmpdir.as_path()],
        &spec.cwd,
        spec.network,
        false,
    )?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .env("PATH", SANDBOX_PATH)
        .env("HOME", policy.work_dir())
        .env("LANG", "C.UTF-8")
        .env("TMPDIR", &spec.tmpdir)
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    prepared.install(cmd.as_std_mut());

    let started = Instant::now();
    let spawned = cmd.spawn();
    // The child has its copy of the ruleset descriptor (or failed).
    drop(prepared);
    let mut child = spawned.map_err(|e| spawn_error(&spec.program, e))?;
    // The child is the leader of a new group whose id is its pid.
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .filter(|&id| id > 1)
    else {
        return Err(SandboxError::Internal(
            "spawned child has no usable process id".to_owned(),
        ));
    };
    let cgroup = group;
    let mut group = GroupKiller {
        pgid: Pid::from_raw(pgid),
        armed: true,
    };
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(SandboxError::Internal(
            "child output pipes are missing".to_owned(),
        ));
    };

    // Feed stdin concurrently with reading, so a child that writes before it
    // reads cannot deadlock us. Dropping the pipe afterwards sends EOF.
    let stdin_pipe = child.stdin.take();
    let stdin_data = spec.stdin;
    let feed = async move {
        if let (Some(mut pipe), Some(data)) = (stdin_pipe, stdin_data) {
            match pipe.write_all(data.as_bytes()).await {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                    tracing::debug!(error = %e, "writing child stdin failed");
                }
                _ => {}
            }
        }
    };
    tokio::pin!(feed);

    let deadline = started + spec.timeout;
    let mut out = Capture::new(policy.max_output_bytes);
    let mut err = Capture::new(policy.max_output_bytes);
    let mut out_chunk = vec![0u8; READ_CHUNK];
    let mut err_chunk = vec![0u8; READ_CHUNK];
    let (mut out_open, mut err_open, mut fed) = (true, true, false);
    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    // Set once the child has exited or was killed: from then on we only drain.
    let mut drain_deadline: Option<Instant> = None;

    while status.is_none() || out_open || err_open {
        let wake = drain_deadline.unwrap_or(deadline);
        tokio::select! {
            r = stdout.read(&mut out_chunk), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => out.push(&out_chunk[..n]),
            },
            r = stderr.read(&mut err_chunk), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => err.push(&err_chunk[..n]),
            },
            () = &mut feed, if !fed => fed = true,
            r = child.wait(), if status.is_none() => {
                let st = r.map_err(|e| SandboxError::Io {
                    context: "waiting for the child".to_owned(),
                    source: e,
                })?;
                status = Some(st);
                // Leftover background processes of the group die with the
                // leader, which also closes the pipes they hold.
                group.kill();
                drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_GRACE);
            }
            () = tokio::time::sleep_until(wake) => {
                if drain_deadline.is_some() {
                    // Something outside the group keeps the pipes open, or the
                    // killed child is not reaped yet: give up waiting.
                    break;
                }
                timed_out = true;
                group.kill();
                drain_deadline = Some(Instant::now() + DRAIN_GRACE);
            }
        }
    }
    if status.is_none() {
        status = child.try_wait().ok().flatten();
    }
    if status.is_some() {
        // The group was killed right after the leader was reaped; do not
        // signal the (possibly recycled) id again.
        group.armed = false;
    }
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // Whatever left the process group (setsid, double fork) is still in the
    // call's cgroup, where there is one.
    cgroup.finish();
    let exit_code = status.and_then(|s| s.code());
    let signal = status.and_then(|s| s.signal());
    let truncated = out.truncated || err.truncated;
    tracing::info!(
        tool = spec.tool,
        program = %spec.program.display(),
        exit_code,
        signal,
        timed_out,
        truncated,
        duration_ms,
        "sandboxed execution finished"
    );
    Ok(json!({
        "stdout": out.into_string(),
        "stderr": err.into_string(),
        "exit_code": exit_code,
        "signal": signal,
        "timed_out": timed_out,
        "truncated": truncated,
        "duration_ms": duration_ms,
        "sandbox": policy.isolation.report(spec.network),
    }))
}
