//! The file system a child sees inside its mount namespace: a tmpfs root
//! holding, at their usual paths, the read-only system paths, a few device
//! nodes, the allowed roots and the call's own directory, and nothing else
//! (no key, no home directories, no /tmp of the agent). Built by the agent as
//! a list of [`MountStep`]s the child replays.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use super::child::MountStep;
use crate::sandbox::SandboxError;

/// What is bound at one path.
#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File,
    /// A symbolic link whose target lies inside the view.
    Link(PathBuf),
}

#[derive(Debug, Clone)]
struct Entry {
    /// Where it appears (and, for binds, where it comes from).
    path: PathBuf,
    source: PathBuf,
    kind: Kind,
    writable: bool,
}

/// The parts of the view known at start.
#[derive(Debug, Clone)]
pub(super) struct View {
    new_root: PathBuf,
    entries: Vec<Entry>,
    devices: Vec<PathBuf>,
}

fn cstring(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::InvalidPolicy(format!("path {} contains NUL", p.display())))
}

/// `root` + absolute `p`.
fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

impl View {
    /// Describes the view: `dirs` and `files` read-only (symlinks among them
    /// kept as links when their target is in the view), `devices` bound
    /// read-write on a tmpfs /dev, `roots` read-write.
    pub(super) fn new(
        new_root: &Path,
        dirs: &[PathBuf],
        files: &[PathBuf],
        devices: &[PathBuf],
        roots: &[PathBuf],
    ) -> Self {
        let mut entries = Vec::new();
        let bound_dirs: Vec<PathBuf> = dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        for (paths, writable) in [(dirs, false), (files, false), (roots, true)] {
            for p in paths {
                let Ok(meta) = std::fs::symlink_metadata(p) else {
                    continue;
                };
                let Ok(real) = std::fs::canonicalize(p) else {
                    continue;
                };
                let kind = if meta.file_type().is_symlink()
                    && bound_dirs.iter().any(|d| real.starts_with(d) && *d != real)
                {
                    match std::fs::read_link(p) {
                        Ok(target) => Kind::Link(target),
                        Err(_) => continue,
                    }
                } else if real.is_dir() {
                    Kind::Dir
                } else {
                    Kind::File
                };
                entries.push(Entry {
                    path: p.clone(),
                    source: real,
                    kind,
                    writable,
                });
            }
        }
        Self {
            new_root: new_root.to_path_buf(),
            entries,
            devices: devices.iter().filter(|d| d.exists()).cloned().collect(),
        }
    }

    /// The directory the new root is mounted on.
    pub(super) fn new_root(&self) -> &Path {
        &self.new_root
    }

    /// The steps for one call, with `extra` directories read-write too.
    pub(super) fn steps(&self, extra: &[&Path]) -> Result<Vec<MountStep>, SandboxError> {
        let root = &self.new_root;
        let mut entries = self.entries.clone();
        for dir in extra {
            entries.push(Entry {
                path: dir.to_path_buf(),
                source: dir.to_path_buf(),
                kind: Kind::Dir,
                writable: true,
            });
        }
        // Parents before children, so that a bind never hides a later one.
        entries.sort_by_key(|e| e.path.components().count());

        let mut steps = vec![MountStep::Tmpfs {
            target: cstring(root)?,
            options: c"mode=0755,size=1m,nr_inodes=4096".to_owned(),
        }];
        let mut made: BTreeSet<PathBuf> = BTreeSet::new();
        let mut dirs_of = |p: &Path, steps: &mut Vec<MountStep>| -> Result<(), SandboxError> {
            let mut parents: Vec<&Path> = p.ancestors().skip(1).collect();
            parents.reverse();
            for a in parents {
                if a == Path::new("/") || !made.insert(a.to_path_buf()) {
                    continue;
                }
                steps.push(MountStep::Dir(cstring(&under(root, a))?));
            }
            Ok(())
        };
        let mut read_only = Vec::new();
        for e in &entries {
            dirs_of(&e.path, &mut steps)?;
            let target = cstring(&under(root, &e.path))?;
            match &e.kind {
                Kind::Link(to) => steps.push(MountStep::Symlink {
                    target: cstring(to)?,
                    link: target,
                }),
                Kind::Dir | Kind::File => {
                    steps.push(if matches!(e.kind, Kind::Dir) {
                        MountStep::Dir(target.clone())
                    } else {
                        MountStep::File(target.clone())
                    });
                    steps.push(MountStep::Bind {
                        source: cstring(&e.source)?,
                        target: target.clone(),
                    });
                    if !e.writable {
                        read_only.push(MountStep::ReadOnly(target));
                    }
                }
            }
        }
        // /dev: a small tmpfs with the device nodes a program expects.
        let dev = under(root, Path::new("/dev"));
        steps.push(MountStep::Dir(cstring(&dev)?));
        steps.push(MountStep::Tmpfs {
            target: cstring(&dev)?,
            options: c"mode=0755,size=64k,nr_inodes=64".to_owned(),
        });
        for d in &self.devices {
            let target = cstring(&under(root, d))?;
            steps.push(MountStep::File(target.clone()));
            steps.push(MountStep::Bind {
                source: cstring(d)?,
                target,
            });
        }
        for (link, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            steps.push(MountStep::Symlink {
                target: cstring(Path::new(to))?,
                link: cstring(&dev.join(link))?,
            });
        }
        steps.push(MountStep::Dir(cstring(&under(root, Path::new("/proc")))?));
        // Read-only last: mount points below a bind are created first.
        steps.extend(read_only);
        Ok(steps)
    }

    /// Where P1 mounts /proc.
    pub(super) fn proc_target(&self) -> Result<CString, SandboxError> {
        cstring(&under(&self.new_root, Path::new("/proc")))
    }

    /// A path as a C string (the working directory inside the view).
    pub(super) fn inside(p: &Path) -> Result<CString, SandboxError> {
        cstring(p)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn steps_create_parents_first_and_remount_read_only_last() {
        let work = tempfile::tempdir().unwrap();
        let call = tempfile::tempdir().unwrap();
        let view = View::new(
            Path::new("/nr"),
            &[PathBuf::from("/usr"), PathBuf::from("/nonexistent")],
            &[PathBuf::from("/etc/passwd")],
            &[PathBuf::from("/dev/null")],
            &[work.path().to_path_buf()],
        );
        let steps = view.steps(&[call.path()]).unwrap();
        let text: Vec<String> = steps.iter().map(|s| format!("{s:?}")).collect();
        let pos = |needle: &str| {
            text.iter()
                .position(|t| t.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing in {text:#?}"))
        };
        assert!(matches!(steps[0], MountStep::Tmpfs { .. }));
        assert!(pos("Dir(\"/nr/etc\")") < pos("File(\"/nr/etc/passwd\")"));
        assert!(pos("Bind { source: \"/usr\"") < pos("ReadOnly(\"/nr/usr\")"));
        assert!(!text.iter().any(|t| t.contains("nonexistent")));
        let last_bind = text.iter().rposition(|t| t.starts_with("Bind")).unwrap();
        let first_ro = pos("ReadOnly");
        assert!(last_bind < first_ro, "{text:#?}");
        // The work directory and the call's directory stay writable.
        let w = work.path().canonicalize().unwrap();
        assert!(
            !text
                .iter()
                .any(|t| t.starts_with("ReadOnly") && t.contains(w.to_str().unwrap()))
        );
    }
}
