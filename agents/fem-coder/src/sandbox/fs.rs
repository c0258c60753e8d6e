//! Path confinement and bounded file reads.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::OpenOptionsExt,
    path::{Component, Path, PathBuf},
};

use nix::libc;

use super::isolation::Isolation;
use super::{Policy, SandboxError, push_bounded};

/// Longest path string accepted from a caller.
const MAX_PATH_LEN: usize = 4096;

/// Size of each read from a file.
const READ_CHUNK: usize = 64 * 1024;

/// Whether `path` is one of `roots` or below one. `Path::starts_with` compares
/// whole components, so `/x/ab` is not inside `/x/a`.
pub(super) fn within_roots(roots: &[PathBuf], path: &Path) -> bool {
    roots.iter().any(|root| path.starts_with(root))
}

/// Removes `.` and resolves `..` without touching the file system.
fn lexical_normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn roots_list(policy: &Policy) -> String {
    policy
        .roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn outside(policy: &Policy, what: &str, raw: &str) -> SandboxError {
    SandboxError::PermissionDenied(format!(
        "{what} `{raw}` is outside the allowed roots ({})",
        roots_list(policy)
    ))
}

/// Canonicalizes `raw` (relative to the work dir) and requires the result to
/// lie inside an allowed root.
///
/// Errors: `BadRequest` for an empty or overlong path, a path that does not
/// exist (inside the roots) or cannot be resolved; `PermissionDenied` when the
/// path (or, if it does not exist, its lexical form) is outside the roots or
/// not accessible.
pub(super) async fn resolve_in_roots(
    policy: &Policy,
    raw: &str,
    what: &str,
) -> Result<PathBuf, SandboxError> {
    if raw.is_empty() {
        return Err(SandboxError::BadRequest(format!(
            "{what} must not be empty"
        )));
    }
    if raw.len() > MAX_PATH_LEN {
        return Err(SandboxError::BadRequest(format!(
            "{what} is longer than {MAX_PATH_LEN} bytes"
        )));
    }
    if raw.contains('\0') {
        return Err(SandboxError::BadRequest(format!(
            "{what} contains a NUL byte"
        )));
    }
    let joined = policy.work_dir.join(raw);
    match tokio::fs::canonicalize(&joined).await {
        Ok(canonical) if within_roots(&policy.roots, &canonical) => Ok(canonical),
        Ok(_) => Err(outside(policy, what, raw)),
        // Do not reveal whether paths outside the roots exist.
        Err(_) if !within_roots(&policy.roots, &lexical_normalize(&joined)) => {
            Err(outside(policy, what, raw))
        }
        Err(e) => Err(match e.kind() {
            io::ErrorKind::NotFound => {
                SandboxError::BadRequest(format!("{what} `{raw}` not found"))
            }
            io::ErrorKind::PermissionDenied => {
                SandboxError::PermissionDenied(format!("{what} `{raw}` is not accessible: {e}"))
            }
            _ => SandboxError::BadRequest(format!("{what} `{raw}` cannot be resolved: {e}")),
        }),
    }
}

/// Like [`resolve_in_roots`], and the result must be a directory.
pub(super) async fn resolve_dir(policy: &Policy, raw: &str) -> Result<PathBuf, SandboxError> {
    let dir = resolve_in_roots(policy, raw, "cwd").await?;
    match tokio::fs::metadata(&dir).await {
        Ok(meta) if meta.is_dir() => Ok(dir),
        Ok(_) => Err(SandboxError::BadRequest(format!(
            "cwd `{raw}` is not a directory"
        ))),
        Err(e) => Err(SandboxError::Io {
            context: format!("cwd `{raw}`"),
            source: e,
        }),
    }
}

/// What [`read_bounded`] read.
pub(super) struct FileContent {
    /// Size of the file as reported by fstat.
    pub(super) size: u64,
    /// At most `limit` bytes from the start of the file.
    pub(super) bytes: Vec<u8>,
    /// Whether the file had more than `limit` bytes.
    pub(super) truncated: bool,
}

fn open_error(path: &Path, e: io::Error) -> SandboxError {
    let shown = path.display();
    if e.raw_os_error() == Some(libc::ELOOP) {
        // O_NOFOLLOW: the last component became a symlink after we resolved it.
        return SandboxError::PermissionDenied(format!("`{shown}` changed while being opened"));
    }
    match e.kind() {
        io::ErrorKind::NotFound => SandboxError::BadRequest(format!("`{shown}` not found")),
        io::ErrorKind::PermissionDenied => {
            SandboxError::PermissionDenied(format!("`{shown}` is not readable: {e}"))
        }
        _ => SandboxError::Io {
            context: format!("opening `{shown}`"),
            source: e,
        },
    }
}

fn not_regular(path: &Path) -> SandboxError {
    SandboxError::BadRequest(format!("`{}` is not a regular file", path.display()))
}

/// Reads at most `limit` bytes of the regular file at the canonical `path`,
/// never allocating more than `limit` bytes for the content. Blocking: call
/// from `spawn_blocking`.
///
/// Errors: `BadRequest` if the file vanished or is not a regular file,
/// `PermissionDenied` if it is unreadable, was swapped for something
/// outside `roots` while being opened, or is a file `isolation` protects
/// (the agent's key, under any name: hard links share its inode), `Io` for
/// read failures.
pub(super) fn read_bounded(
    path: &Path,
    limit: u64,
    roots: &[PathBuf],
    isolation: &Isolation,
) -> Result<FileContent, SandboxError> {
    // Refuse FIFOs, devices and sockets before opening them: opening one can
    // block or have side effects.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(not_regular(path)),
        Err(e) => return Err(open_error(path, e)),
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    let meta = file.metadata().map_err(|e| SandboxError::Io {
        context: format!("stat `{}`", path.display()),
        source: e,
    })?;
    if !meta.is_file() {
        return Err(not_regular(path));
    }
    // Checked on the opened file: a name swapped in after resolution still
    // leads to this inode.
    if isolation.protects(&meta) {
        return Err(SandboxError::PermissionDenied(format!(
            "`{}` is the agent's key (a hard link to it); file.read never returns it",
            path.display()
        )));
    }
    check_opened_inside(&file, roots)?;

    let size = meta.len();
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(cap.min(usize::try_from(size).unwrap_or(usize::MAX)));
    let mut chunk = vec![0u8; READ_CHUNK.min(cap.max(1))];
    let read_err = |e: io::Error| SandboxError::Io {
        context: format!("reading `{}`", path.display()),
        source: e,
    };
    let mut reader = (&file).take(limit);
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                push_bounded(&mut bytes, &chunk[..n], cap);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    // We stopped at `limit` (or EOF): one more byte tells which. The size from
    // fstat is not trusted for this (files can grow, procfs reports 0).
    let truncated = if bytes.len() == cap {
        let mut probe = [0u8; 1];
        loop {
            match (&file).read(&mut probe) {
                Ok(n) => break n > 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_err(e)),
            }
        }
    } else {
        false
    };
    Ok(FileContent {
        size,
        bytes,
        truncated,
    })
}

/// Closes the window between canonicalization and open (an intermediate
/// directory swapped for a symlink): asks the kernel where the opened file
/// really is. Skipped when /proc is unavailable.
#[cfg(target_os = "linux")]
fn check_opened_inside(file: &File, roots: &[PathBuf]) -> Result<(), SandboxError> {
    use std::os::fd::AsRawFd;
    match std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        Ok(real) if !within_roots(roots, &real) => Err(SandboxError::PermissionDenied(
            "the file moved outside the allowed roots while being opened".to_owned(),
        )),
        _ => Ok(()),
    }
}

#[cfg(not(target_os = "linux"))]
fn check_opened_inside(_file: &File, _roots: &[PathBuf]) -> Result<(), SandboxError> {
    Ok(())
}
