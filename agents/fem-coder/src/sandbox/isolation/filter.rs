//! The seccomp layer: BPF programs compiled once at start with seccompiler
//! and installed in each child right before exec (see `child`).
//!
//! The filter is a deny list on top of the other layers: it removes the
//! system calls that reach past them (other processes' memory, mounts,
//! namespaces, keyrings, BPF, io_uring, modules, kexec), restricts sockets to
//! AF_UNIX unless the call may use the network, and, when the child shares
//! the agent's PID namespace, keeps it in its process group and away from the
//! agent's signals.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::sandbox::SandboxError;

/// System calls refused with EPERM in every child.
const DENIED: &[libc::c_long] = &[
    // Other processes' memory and descriptors.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    // Mounts and namespaces (the child's view is set up before the filter).
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    // File handles bypass path checks.
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    // Kernel attack surface a tool never needs.
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_userfaultfd,
    libc::SYS_perf_event_open,
    libc::SYS_fanotify_init,
    // The machine itself.
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_vhangup,
];

/// Namespace flags that clone(2) may not pass (clone3 is refused as a whole,
/// see [`Programs::clone3`]).
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// The compiled programs for one agent.
#[derive(Debug)]
pub(super) struct Programs {
    /// The deny list for calls without network.
    pub(super) offline: BpfProgram,
    /// The deny list for calls allowed the network.
    pub(super) online: BpfProgram,
    /// clone3 answers ENOSYS, so that libc falls back to clone, whose flags
    /// the deny list can inspect (clone3 passes them in memory).
    pub(super) clone3: BpfProgram,
    /// How many system calls the deny list names.
    pub(super) denied: usize,
}

/// Who the filter protects when the child shares the agent's PID namespace.
#[derive(Debug, Clone, Copy)]
pub(super) struct Agent {
    /// The agent's pid.
    pub(super) pid: i32,
    /// The agent's process group.
    pub(super) pgid: i32,
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(conditions)
}

fn arg_eq(index: u8, value: i64) -> Result<SeccompCondition, seccompiler::BackendError> {
    // pid_t and int arguments: compare the low 32 bits only, as the kernel does.
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(value as u32),
    )
}

fn build(
    network: bool,
    agent: Option<Agent>,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in DENIED {
        // An empty chain matches unconditionally.
        rules.insert(nr, Vec::new());
    }
    if !network {
        rules.insert(
            libc::SYS_socket,
            vec![rule(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Ne,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    let mut clone_rules = Vec::new();
    for &flag in NAMESPACE_FLAGS {
        let flag = u64::from(flag as u32);
        clone_rules.push(rule(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    if let Some(agent) = agent {
        // Without a PID namespace of its own the child sees the agent: no
        // signal to it, its group or everyone (-1), and no leaving the
        // process group that the deadline kills.
        let mut kill = vec![
            rule(vec![arg_eq(0, i64::from(agent.pid))?])?,
            rule(vec![arg_eq(0, -1)?])?,
        ];
        if agent.pgid > 1 {
            kill.push(rule(vec![arg_eq(0, -i64::from(agent.pgid))?])?);
        }
        rules.insert(libc::SYS_kill, kill);
        for nr in [
            libc::SYS_tgkill,
            libc::SYS_rt_sigqueueinfo,
            libc::SYS_rt_tgsigqueueinfo,
            libc::SYS_pidfd_open,
        ] {
            rules.insert(nr, vec![rule(vec![arg_eq(0, i64::from(agent.pid))?])?]);
        }
        // tkill names a thread, any thread of the agent: refused outright
        // (libc's raise() uses tgkill).
        rules.insert(libc::SYS_tkill, Vec::new());
        rules.insert(libc::SYS_setsid, Vec::new());
        rules.insert(libc::SYS_setpgid, Vec::new());
    }
    Ok(rules)
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    action: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, seccompiler::Error> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, action, arch)?;
    Ok(BpfProgram::try_from(filter)?)
}

impl Programs {
    /// Compiles the programs for this machine's architecture. `agent` is set
    /// when children share the agent's PID namespace.
    ///
    /// Errors: [`SandboxError::Internal`] for an architecture seccompiler
    /// does not know, or a filter it refuses.
    pub(super) fn compile(agent: Option<Agent>) -> Result<Self, SandboxError> {
        let err =
            |e: &dyn std::fmt::Display| SandboxError::Internal(format!("seccomp filter: {e}"));
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(&e))?;
        let eperm = SeccompAction::Errno(libc::EPERM as u32);
        let offline = compile(
            build(false, agent).map_err(|e| err(&e))?,
            eperm.clone(),
            arch,
        )
        .map_err(|e| err(&e))?;
        let online =
            compile(build(true, agent).map_err(|e| err(&e))?, eperm, arch).map_err(|e| err(&e))?;
        let mut clone3 = BTreeMap::new();
        clone3.insert(libc::SYS_clone3, Vec::new());
        let clone3 = compile(clone3, SeccompAction::Errno(libc::ENOSYS as u32), arch)
            .map_err(|e| err(&e))?;
        Ok(Self {
            offline,
            online,
            clone3,
            denied: DENIED.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn programs_compile_for_this_machine() {
        let p = Programs::compile(Some(Agent {
            pid: 1234,
            pgid: 1200,
        }))
        .unwrap();
        assert!(!p.offline.is_empty() && !p.online.is_empty() && !p.clone3.is_empty());
        // The offline program carries the socket rule the online one lacks.
        assert!(p.offline.len() > p.online.len());
        let in_ns = Programs::compile(None).unwrap();
        assert!(in_ns.offline.len() < p.offline.len());
    }
}
