//! What runs in a tool's child between fork and exec.
//!
//! Why this module allows `unsafe`: `CommandExt::pre_exec` is unsafe, and
//! the steps it takes (unshare, mount, pivot_root, a second and third fork,
//! landlock_restrict_self, close_range) have no safe wrappers that may be
//! used after a fork. Everything here runs in the forked copy of a
//! multi-threaded process, where only async-signal-safe operations are
//! allowed: no allocation, no locks, no buffered I/O. The parent prepares a
//! [`ChildPlan`] (every path a `CString`, every filter compiled, every file
//! content a byte string) and this module only makes system calls with it,
//! reads `errno` (`io::Error::last_os_error`, which does not allocate) and
//! formats numbers into stack buffers.
//!
//! Process layout with namespaces (C is the process std forked):
//!
//! ```text
//! agent ── C (new user, mount, PID, IPC, UTS, net namespaces; builds the
//!          │  view; waits and passes P2's status on)
//!          └─ P1 = PID 1 of the namespace (mounts /proc, pivots; reaps)
//!             └─ P2 (drops capabilities, no_new_privs, Landlock, seccomp;
//!                    exec of the tool)
//! ```
//!
//! When P1 exits, the kernel kills everything left in the PID namespace, so
//! nothing the tool started outlives it, whatever its process group or
//! session. Without namespaces C is the tool itself.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::process::CommandExt as _;
use std::sync::Arc;

use nix::libc::{self, c_int, c_long, c_ulong};
use seccompiler::BpfProgram;

/// Resource limits, already clamped to the agent's hard limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) cpu_seconds: u64,
    pub(crate) address_space: u64,
    pub(crate) processes: u64,
}

/// Landlock, as the child applies it.
#[derive(Debug)]
pub(super) struct LandlockPlan {
    /// The ruleset built by the agent for this call (kept open by it until
    /// the spawn returns).
    pub(super) ruleset_fd: c_int,
    /// Access bits to grant on `/proc` once the child mounted its own (0:
    /// no /proc rule).
    pub(super) proc_access: u64,
}

/// One step of building the child's file system view, in order.
#[derive(Debug, Clone)]
pub(super) enum MountStep {
    /// mkdir; an existing directory is fine.
    Dir(CString),
    /// An empty file to bind a file onto; an existing file is fine.
    File(CString),
    /// A symbolic link `link` -> `target`.
    Symlink { target: CString, link: CString },
    /// A tmpfs with these options.
    Tmpfs { target: CString, options: CString },
    /// A recursive bind mount.
    Bind { source: CString, target: CString },
    /// Remount a bind read-only (and nosuid, nodev), keeping the flags the
    /// kernel locked when the mount namespace was copied.
    ReadOnly(CString),
}

/// The namespaces, as the child enters them.
#[derive(Debug)]
pub(super) struct NsPlan {
    /// CLONE_NEW* flags for unshare(2).
    pub(super) flags: c_int,
    /// Contents of /proc/self/uid_map and gid_map.
    pub(super) uid_map: Vec<u8>,
    pub(super) gid_map: Vec<u8>,
    /// The empty directory the new root's tmpfs is mounted on.
    pub(super) new_root: CString,
    /// Steps that build the view below `new_root`.
    pub(super) steps: Vec<MountStep>,
    /// Where P1 mounts the namespace's own /proc (below `new_root`), if
    /// the kernel allows it.
    pub(super) proc_target: Option<CString>,
    /// The working directory, as a path inside the view.
    pub(super) cwd: CString,
}

/// Everything the child does, prepared by the agent.
#[derive(Debug)]
pub(super) struct ChildPlan {
    pub(super) limits: Limits,
    /// `cgroup.procs` files of the call's cgroups, joined first.
    pub(super) cgroup_procs: Vec<CString>,
    /// Highest capability number; the bounding set is emptied up to it.
    pub(super) cap_last: c_int,
    pub(super) landlock: Option<LandlockPlan>,
    /// Filters installed in order (each with its own action).
    pub(super) seccomp: Vec<Arc<BpfProgram>>,
    pub(super) ns: Option<NsPlan>,
    /// Probe mode: after the layers, exit with [`probe_bits`] instead of exec.
    pub(super) probe: bool,
    /// Files the probe checks are unreadable.
    pub(super) protected: Vec<CString>,
}

/// Bits of a probe child's exit status.
pub(super) mod probe {
    pub(in crate::sandbox) const NO_NEW_PRIVS: i32 = 1;
    pub(in crate::sandbox) const SECCOMP: i32 = 2;
    pub(in crate::sandbox) const LANDLOCK: i32 = 4;
    pub(in crate::sandbox) const PID_NAMESPACE: i32 = 8;
    pub(in crate::sandbox) const PROC: i32 = 16;
    pub(in crate::sandbox) const NO_CAPABILITIES: i32 = 32;
    pub(in crate::sandbox) const PROTECTED_UNREADABLE: i32 = 64;
    /// Always set by a probe that ran to the end.
    pub(in crate::sandbox) const DONE: i32 = 128;
}

/// Installs the plan as the command's pre-exec hook.
pub(super) fn install(cmd: &mut std::process::Command, plan: Arc<ChildPlan>) {
    // SAFETY: the hook runs between fork and exec. `run` only makes
    // async-signal-safe system calls on data the agent prepared before the
    // fork (the plan is moved into the hook and read, never written), does
    // not allocate, and leaves the process only by returning to std (which
    // then execs) or by _exit.
    unsafe {
        cmd.pre_exec(move || run(&plan));
    }
}

/// The kernel's Landlock ABI version (None: Landlock is off or absent).
pub(super) fn kernel_landlock_abi() -> Option<i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: c_ulong = 1;
    // SAFETY: with a null attribute and size 0 this call only reports the
    // version; it touches no memory of ours.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then(|| i32::try_from(v).unwrap_or(i32::MAX))
}

fn cvt(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes `msg` and a number to stderr (for failures after the point where
/// std can still report an error). Best effort.
fn say(msg: &[u8], n: i32) {
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    // SAFETY: plain writes of stack buffers to fd 2.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::write(2, buf[i..].as_ptr().cast(), buf.len() - i);
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
}

fn exit(code: c_int) -> ! {
    // SAFETY: _exit ends the process without running atexit handlers or
    // flushing buffers that belong to the agent.
    unsafe { libc::_exit(code) }
}

/// fork(2) without libc's wrapper: glibc's fork runs atfork handlers that
/// take locks (malloc's) another thread of the agent may have held when std
/// forked us.
fn raw_fork() -> io::Result<libc::pid_t> {
    // SAFETY: clone with only SIGCHLD and no new stack is fork: the child
    // continues on a copy of this stack.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as c_long,
            0 as c_long,
            0 as c_long,
            0 as c_long,
            0 as c_long,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::pid_t)
    }
}

fn close_from(first: u32, flags: u32) {
    // SAFETY: close_range only acts on our descriptor table.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as c_ulong,
            c_ulong::from(u32::MAX),
            flags as c_ulong,
        )
    };
    if r < 0 {
        // Kernels before 5.9 (close_range) or 5.11 (CLOEXEC): one by one.
        for fd in first..65536 {
            // SAFETY: on a descriptor we may not have; EBADF is ignored.
            unsafe {
                if flags == 0 {
                    libc::close(fd as c_int);
                } else {
                    libc::fcntl(fd as c_int, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
        }
    }
}

/// Closes every descriptor but `keep`.
fn close_all_but(keep: c_int) {
    let keep = keep as u32;
    if keep > 0 {
        // SAFETY: close_range on our own table.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                0 as c_ulong,
                (keep - 1) as c_ulong,
                0 as c_ulong,
            );
        }
    }
    close_from(keep + 1, 0);
}

fn write_file(path: &CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: open/write/close with a NUL-terminated path and a live buffer.
    unsafe {
        let fd = cvt(libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    cvt(unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    })
    .map(drop)
}

/// The mount flags the kernel locks on mounts copied into a less privileged
/// namespace, read back so that a remount keeps them.
fn locked_flags(target: &CStr) -> io::Result<c_ulong> {
    // The kernel's struct statfs on 64-bit targets is 8-byte words with
    // f_flags the eleventh; libc's struct hides it in padding, and
    // statvfs(3) may read /proc/mounts (allocating) on old kernels.
    let mut words = [0u64; 32];
    // SAFETY: statfs(2) writes at most 120 bytes into our 256-byte buffer.
    if unsafe { libc::syscall(libc::SYS_statfs, target.as_ptr(), words.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let f = words[10] as c_ulong;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
    ] {
        if f & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    flags |= if f & libc::ST_NOATIME != 0 {
        libc::MS_NOATIME
    } else if f & libc::ST_RELATIME != 0 {
        libc::MS_RELATIME
    } else {
        libc::MS_STRICTATIME
    };
    Ok(flags)
}

impl MountStep {
    fn apply(&self) -> io::Result<()> {
        // SAFETY (all arms): system calls on NUL-terminated paths owned by
        // the plan.
        match self {
            Self::Dir(path) => {
                if unsafe { libc::mkdir(path.as_ptr(), 0o755) } < 0 && errno() != libc::EEXIST {
                    return Err(io::Error::last_os_error());
                }
            }
            Self::File(path) => {
                let fd = unsafe {
                    libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_RDONLY | libc::O_CLOEXEC,
                        0o644,
                    )
                };
                if fd < 0 && errno() != libc::EEXIST && errno() != libc::EROFS {
                    return Err(io::Error::last_os_error());
                }
                if fd >= 0 {
                    unsafe { libc::close(fd) };
                }
            }
            Self::Symlink { target, link } => {
                if unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) } < 0
                    && errno() != libc::EEXIST
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Self::Tmpfs { target, options } => mount(
                Some(c"tmpfs"),
                target,
                Some(c"tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some(options),
            )?,
            Self::Bind { source, target } => mount(
                Some(source),
                target,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?,
            Self::ReadOnly(target) => {
                let keep = locked_flags(target)?;
                mount(
                    None,
                    target,
                    None,
                    libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | keep,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

/// The pre-exec hook.
fn run(plan: &ChildPlan) -> io::Result<()> {
    // The agent's handlers (SIGCHLD, SIGTERM, SIGINT) must not run in the
    // processes below that never exec: they wait for their children, and
    // die by the signals sent to them. exec resets them for the tool.
    // SAFETY: signal(2) with default dispositions; errors (SIGKILL, SIGSTOP,
    // numbers the kernel lacks) are ignored.
    unsafe {
        for sig in 1..32 {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    set_limits(plan.limits)?;
    // "0" is the writer itself; everything it starts stays in the cgroup.
    for procs in &plan.cgroup_procs {
        write_file(procs, b"0")?;
    }
    if let Some(ns) = &plan.ns {
        // Returns only in P2.
        enter_namespaces(ns)?;
    }
    lock_down(plan)
}

fn set_limits(limits: Limits) -> io::Result<()> {
    use rlimit::Resource;
    // `rlimit::setrlimit` builds the struct on the stack and reports errors
    // as `last_os_error`; the resources were checked supported in the agent,
    // so its allocating "unsupported" path cannot be taken.
    rlimit::setrlimit(Resource::CORE, 0, 0)?;
    rlimit::setrlimit(Resource::CPU, limits.cpu_seconds, limits.cpu_seconds)?;
    rlimit::setrlimit(Resource::AS, limits.address_space, limits.address_space)?;
    rlimit::setrlimit(Resource::NPROC, limits.processes, limits.processes)?;
    Ok(())
}

fn enter_namespaces(ns: &NsPlan) -> io::Result<()> {
    // SAFETY (this function): system calls on plan data and stack buffers.
    cvt(unsafe { libc::unshare(ns.flags) })?;
    // The agent is non-dumpable, so /proc/self of this copy belongs to root
    // and an unprivileged agent could not write its own maps: dumpable for
    // the three writes only (nothing else runs as this uid in the new
    // namespace yet), then back before anything else happens.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1 as c_ulong, 0, 0, 0) })?;
    let maps = write_maps(ns);
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as c_ulong, 0, 0, 0) })?;
    maps?;
    // Nothing we mount may propagate back to the agent's namespace.
    mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    for step in &ns.steps {
        step.apply()?;
    }
    let name = b"fem-sandbox";
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;

    let mut status = [0 as c_int; 2];
    cvt(unsafe { libc::pipe2(status.as_mut_ptr(), libc::O_CLOEXEC) })?;
    let pid1 = raw_fork()?;
    if pid1 > 0 {
        // C: nothing of the agent's descriptors stays open here (the output
        // pipes must close when the tool's processes end).
        unsafe { libc::close(status[1]) };
        close_all_but(status[0]);
        relay(pid1, status[0]);
    }

    // P1, PID 1 of the new namespace.
    unsafe { libc::close(status[0]) };
    if let Some(target) = &ns.proc_target {
        // hidepid=ptraceable: processes the tool may not ptrace (P1, a copy
        // of the agent) are not even listed. Not hidepid=invisible, which
        // shows everything to members of group 0 (a root agent's children).
        // Kernels before 5.8 only know hidepid=2.
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(
            Some(c"proc"),
            target,
            Some(c"proc"),
            flags,
            Some(c"hidepid=ptraceable"),
        )
        .or_else(|_| {
            mount(
                Some(c"proc"),
                target,
                Some(c"proc"),
                flags,
                Some(c"hidepid=2"),
            )
        })?;
    }
    cvt(unsafe { libc::chdir(ns.new_root.as_ptr()) })?;
    // pivot_root(".", ".") stacks the old root on the new one; detaching it
    // leaves only the view (no path leads back to the agent's files).
    let dot = c".";
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    cvt(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })?;
    cvt(unsafe { libc::chdir(c"/".as_ptr()) })?;
    cvt(unsafe { libc::chdir(ns.cwd.as_ptr()) })?;

    let pid2 = raw_fork()?;
    if pid2 > 0 {
        close_all_but(status[1]);
        reap(pid2, status[1]);
    }
    // P2: the tool.
    unsafe { libc::close(status[1]) };
    Ok(())
}

fn write_maps(ns: &NsPlan) -> io::Result<()> {
    // Kernels before 3.19 have no setgroups file.
    match write_file(c"/proc/self/setgroups", b"deny") {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
        _ => {}
    }
    write_file(c"/proc/self/uid_map", &ns.uid_map)?;
    write_file(c"/proc/self/gid_map", &ns.gid_map)
}

/// P1: reaps every orphan of the namespace until the tool (P2) ends, then
/// exits with its status (a signal is written to `status_fd`, since PID 1
/// cannot kill itself with it). Its exit ends the namespace.
fn reap(pid2: libc::pid_t, status_fd: c_int) -> ! {
    loop {
        let mut st: c_int = 0;
        // SAFETY: waitpid with a stack int.
        let r = unsafe { libc::waitpid(-1, &mut st, 0) };
        if r == pid2 {
            if libc::WIFSIGNALED(st) {
                let sig = [libc::WTERMSIG(st) as u8];
                // SAFETY: a one-byte write of a stack buffer.
                unsafe { libc::write(status_fd, sig.as_ptr().cast(), 1) };
                exit(0);
            }
            exit(libc::WEXITSTATUS(st));
        }
        if r < 0 && errno() != libc::EINTR {
            exit(125);
        }
    }
}

/// C: waits for P1 and ends the same way the tool did.
fn relay(pid1: libc::pid_t, status_fd: c_int) -> ! {
    let mut st: c_int = 0;
    loop {
        // SAFETY: waitpid with a stack int.
        let r = unsafe { libc::waitpid(pid1, &mut st, 0) };
        if r == pid1 {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            exit(125);
        }
    }
    if libc::WIFEXITED(st) {
        let mut sig = [0u8; 1];
        // SAFETY: a one-byte read into a stack buffer; P1 is gone, so the
        // pipe holds its byte or reports end of file.
        if unsafe { libc::read(status_fd, sig.as_mut_ptr().cast(), 1) } == 1 && sig[0] > 0 {
            die_by(c_int::from(sig[0]));
        }
        exit(libc::WEXITSTATUS(st));
    }
    die_by(libc::WTERMSIG(st));
}

/// Ends this process by `sig` (so the agent reports the tool's signal).
fn die_by(sig: c_int) -> ! {
    // SAFETY: resetting a disposition, unblocking and raising a signal.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
    }
    exit(128 + sig)
}

/// The layers every child gets, then Landlock and seccomp.
fn lock_down(plan: &ChildPlan) -> io::Result<()> {
    // SAFETY (this function): prctl and syscalls with integer arguments or
    // stack structs.
    unsafe {
        // No capabilities after exec, even for root: the bounding set limits
        // what exec grants. EPERM (an unprivileged agent, which has none) is
        // fine.
        for cap in 0..=plan.cap_last {
            libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0,
            0,
            0,
        );
        cvt(libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as c_ulong,
            0,
            0,
            0,
        ))?;
    }
    // Every descriptor above stderr closes at exec; the ruleset's is still
    // needed until then.
    close_from(3, libc::CLOSE_RANGE_CLOEXEC);
    if let Some(ll) = &plan.landlock {
        if ll.proc_access != 0 {
            add_proc_rule(ll);
        }
        // SAFETY: landlock_restrict_self with the ruleset descriptor.
        if unsafe {
            libc::syscall(
                libc::SYS_landlock_restrict_self,
                ll.ruleset_fd,
                0 as c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    for program in &plan.seccomp {
        // seccompiler::apply_filter sets no_new_privs and installs the
        // program with one seccomp(2) call; its errors carry errno only.
        if let Err(e) = seccompiler::apply_filter(program) {
            return Err(match e {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                _ => io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
    }
    if plan.probe {
        exit(probe_bits(plan));
    }
    Ok(())
}

/// Grants read access to the namespace's own /proc (mounted by P1, so the
/// agent could not name it in the ruleset).
fn add_proc_rule(ll: &LandlockPlan) {
    #[repr(C, packed)]
    struct PathBeneathAttr {
        allowed_access: u64,
        parent_fd: i32,
    }
    const LANDLOCK_RULE_PATH_BENEATH: c_ulong = 1;
    // SAFETY: open/close of a path, and landlock_add_rule with a packed
    // struct on the stack, as the kernel's uapi defines it.
    unsafe {
        let fd = libc::open(
            c"/proc".as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_DIRECTORY,
        );
        if fd < 0 {
            return;
        }
        let attr = PathBeneathAttr {
            allowed_access: ll.proc_access,
            parent_fd: fd,
        };
        if libc::syscall(
            libc::SYS_landlock_add_rule,
            ll.ruleset_fd,
            LANDLOCK_RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0 as c_ulong,
        ) < 0
        {
            say(
                b"fem-coder sandbox: no Landlock rule for /proc, errno ",
                errno(),
            );
        }
        libc::close(fd);
    }
}

/// What a probe child observed about itself.
fn probe_bits(plan: &ChildPlan) -> c_int {
    let mut bits = probe::DONE;
    // SAFETY: prctl queries, open/close, getpid.
    unsafe {
        if libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 {
            bits |= probe::NO_NEW_PRIVS;
        }
        if libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) == 2 {
            bits |= probe::SECCOMP;
        }
        // No rule covers "/" itself.
        let fd = libc::open(
            c"/".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 && errno() == libc::EACCES {
            bits |= probe::LANDLOCK;
        } else if fd >= 0 {
            libc::close(fd);
        }
        if libc::getpid() == 2 {
            bits |= probe::PID_NAMESPACE;
        }
        let fd = libc::open(
            c"/proc/self/stat".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            bits |= probe::PROC;
            libc::close(fd);
        }
        const CAP_SYS_ADMIN: c_ulong = 21;
        if libc::prctl(libc::PR_CAPBSET_READ, CAP_SYS_ADMIN, 0, 0, 0) == 0 {
            bits |= probe::NO_CAPABILITIES;
        }
        let mut unreadable = true;
        for p in &plan.protected {
            let fd = libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                unreadable = false;
                libc::close(fd);
            }
        }
        if unreadable {
            bits |= probe::PROTECTED_UNREADABLE;
        }
    }
    bits
}
