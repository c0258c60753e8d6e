//! The Landlock layer, over the `landlock` crate: the kernel's ABI probed at
//! start, the system paths opened once, and a ruleset built per call in the
//! agent (the child only calls landlock_restrict_self with its descriptor).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, Scope,
};

use crate::sandbox::SandboxError;

/// The newest ABI this code asks for; the crate lowers requests to what the
/// kernel offers (best effort) and [`kernel_abi`] says what that is.
const TARGET: ABI = ABI::V6;

/// The highest Landlock ABI the kernel supports (and the crate knows), or
/// `None` when Landlock is not available.
pub(super) fn kernel_abi() -> Option<ABI> {
    // Creating a ruleset that handles the newest rights as a hard requirement
    // fails exactly when the kernel lacks them; nothing is enforced by it.
    for abi in [ABI::V6, ABI::V5, ABI::V4, ABI::V3, ABI::V2, ABI::V1] {
        let created = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(abi))
            .and_then(|r| r.create());
        if created.is_ok() {
            return Some(abi);
        }
    }
    None
}

fn landlock_error(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Internal(format!("landlock: {e}"))
}

/// A path children may read (and execute), opened once.
#[derive(Debug)]
struct ReadOnly {
    fd: PathFd,
    access: BitFlags<AccessFs>,
}

/// What one kernel gives and what children may read.
#[derive(Debug)]
pub(super) struct Rules {
    abi: ABI,
    read_only: Vec<ReadOnly>,
}

/// Numbers of the ABI, for reports.
pub(super) fn abi_number(abi: ABI) -> u32 {
    abi as u32
}

impl Rules {
    /// Opens the read-only paths (`dirs` get read and execute on their whole
    /// tree, `files` read and execute, `devices` read and write). Paths that
    /// do not exist are skipped.
    ///
    /// Errors: [`SandboxError::Internal`] if an existing path cannot be opened.
    pub(super) fn new(
        abi: ABI,
        dirs: &[PathBuf],
        files: &[PathBuf],
        devices: &[PathBuf],
    ) -> Result<Self, SandboxError> {
        let read = AccessFs::from_read(abi);
        let device = AccessFs::from_file(abi) & (AccessFs::ReadFile | AccessFs::WriteFile);
        let mut read_only = Vec::new();
        let sets: [(&[PathBuf], BitFlags<AccessFs>); 3] = [
            (dirs, read),
            (files, read & AccessFs::from_file(abi)),
            (devices, device),
        ];
        for (paths, access) in sets {
            for p in paths {
                if !p.exists() {
                    continue;
                }
                let fd =
                    PathFd::new(p).map_err(|e| landlock_error(format!("{}: {e}", p.display())))?;
                read_only.push(ReadOnly { fd, access });
            }
        }
        Ok(Self { abi, read_only })
    }

    /// The ABI in use.
    pub(super) fn abi(&self) -> ABI {
        self.abi
    }

    /// Whether TCP bind and connect are handled (ABI 4).
    pub(super) fn handles_tcp(&self) -> bool {
        self.abi >= ABI::V4
    }

    /// Whether signals and abstract unix sockets are scoped (ABI 6).
    pub(super) fn scopes(&self) -> bool {
        self.abi >= ABI::V6
    }

    /// The raw access bits the child grants on a `/proc` it mounted itself.
    pub(super) fn proc_access(&self) -> u64 {
        (AccessFs::from_read(self.abi) & !BitFlags::from(AccessFs::Execute)).bits()
    }

    /// A ruleset for one call: the read-only paths, full access below each
    /// of `writable`, and TCP refused unless `network`. Returns its
    /// descriptor, for landlock_restrict_self in the child.
    ///
    /// Errors: [`SandboxError::Internal`] when the kernel refuses a rule or
    /// a writable directory cannot be opened.
    pub(super) fn ruleset(
        &self,
        writable: &[&Path],
        network: bool,
    ) -> Result<OwnedFd, SandboxError> {
        let abi = self.abi;
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(abi.min(TARGET)))
            .map_err(landlock_error)?;
        if !network && self.handles_tcp() {
            ruleset = ruleset
                .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
                .map_err(landlock_error)?;
        }
        if self.scopes() {
            ruleset = ruleset
                .scope(Scope::Signal | Scope::AbstractUnixSocket)
                .map_err(landlock_error)?;
        }
        let mut created = ruleset.create().map_err(landlock_error)?;
        for ro in &self.read_only {
            created = created
                .add_rule(PathBeneath::new(&ro.fd, ro.access))
                .map_err(landlock_error)?;
        }
        for dir in writable {
            let fd =
                PathFd::new(dir).map_err(|e| landlock_error(format!("{}: {e}", dir.display())))?;
            created = created
                .add_rule(PathBeneath::new(fd, AccessFs::from_all(abi)))
                .map_err(landlock_error)?;
        }
        let fd: Option<OwnedFd> = created.into();
        fd.ok_or_else(|| landlock_error("the kernel gave no ruleset"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_ruleset_is_built_where_landlock_exists() {
        let Some(abi) = kernel_abi() else {
            eprintln!("skipping: Landlock is not available");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let rules = Rules::new(
            abi,
            &[PathBuf::from("/usr"), PathBuf::from("/does-not-exist")],
            &[PathBuf::from("/etc/passwd")],
            &[PathBuf::from("/dev/null")],
        )
        .unwrap();
        assert_eq!(rules.read_only.len(), 3);
        rules.ruleset(&[dir.path()], false).unwrap();
        rules.ruleset(&[dir.path()], true).unwrap();
        assert!(rules.proc_access() & AccessFs::ReadFile as u64 != 0);
        assert!(rules.proc_access() & AccessFs::Execute as u64 == 0);
    }
}
