//! Ed25519 key files: the seed as 64 hex digits (written 0600), the public
//! key as 64 hex digits.
//!
//! Writing never follows a symbolic link: a link planted where a key file is
//! to be written is refused (`O_NOFOLLOW` together with `O_EXCL`, or
//! `O_NOFOLLOW` alone where a file is overwritten), so a key cannot be sent
//! to another file through it. Reading follows links (mounted secrets are
//! links).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use fem_proto::{PublicKey, SigningKey};

use crate::NetError;

/// Reads a private key file.
///
/// # Errors
/// [`NetError::Io`] when unreadable, [`NetError::MalformedKey`].
pub fn load_key(path: &Path) -> Result<SigningKey, NetError> {
    let text = fs::read_to_string(path).map_err(|e| NetError::io(path, e))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| NetError::MalformedKey {
        path: path.to_owned(),
    })?;
    Ok(SigningKey::from_seed(seed))
}

/// Writes a private key file with mode 0600; refuses to overwrite a file or
/// to write through a symbolic link.
///
/// # Errors
/// [`NetError::Io`] on I/O failure or when the path exists.
pub fn save_key(path: &Path, key: &SigningKey) -> Result<(), NetError> {
    write_no_follow(path, &hex::encode(key.seed()), Replace::No, 0o600)
}

/// Writes a public key file (hex, mode 0644), replacing a file at `path`
/// but refusing a symbolic link there.
///
/// # Errors
/// [`NetError::Io`] on I/O failure or when `path` is a symbolic link.
pub fn save_public_key(path: &Path, key: &PublicKey) -> Result<(), NetError> {
    write_no_follow(path, &key.to_string(), Replace::Yes, 0o644)
}

/// Whether [`write_no_follow`] may replace an existing file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    Yes,
    No,
}

/// Writes `line` and a newline to `path`, created with `mode`, never through
/// a symbolic link (`O_NOFOLLOW`); an existing file is truncated with
/// [`Replace::Yes`] and refused (`O_EXCL`) with [`Replace::No`].
fn write_no_follow(path: &Path, line: &str, replace: Replace, mode: u32) -> Result<(), NetError> {
    let mut options = fs::OpenOptions::new();
    options
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode);
    match replace {
        Replace::Yes => options.create(true).truncate(true),
        Replace::No => options.create_new(true),
    };
    let mut f = options.open(path).map_err(|e| NetError::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| NetError::io(path, e))
}

/// Reads a public key file (hex).
///
/// # Errors
/// [`NetError::Io`] when unreadable, [`NetError::MalformedKey`].
pub fn load_public_key(path: &Path) -> Result<PublicKey, NetError> {
    let text = fs::read_to_string(path).map_err(|e| NetError::io(path, e))?;
    text.trim().parse().map_err(|_| NetError::MalformedKey {
        path: path.to_owned(),
    })
}

/// Loads the key at `path`, or generates and saves one (creating the parent
/// directories) if the file does not exist.
///
/// # Errors
/// As [`load_key`] and [`save_key`].
pub fn load_or_generate_key(path: &Path) -> Result<SigningKey, NetError> {
    if path.exists() {
        return load_key(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| NetError::io(dir, e))?;
    }
    let key = SigningKey::generate();
    save_key(path, &key)?;
    Ok(key)
}

/// Writes `data` to `path` readable by the owner only (0600), atomically: a
/// new file beside it (`path` with extension `tmp`) renamed over `path`. A
/// symbolic link at `path` is replaced, not followed.
///
/// # Errors
/// I/O errors.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Where an agent keeps its key when none is given:
/// `~/.local/share/fem/agents/ID.key` (`fem-agent-keys/ID.key` without a home).
pub fn default_agent_key_path(id: &str) -> std::path::PathBuf {
    let base = match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => std::path::PathBuf::from(h).join(".local/share/fem/agents"),
        _ => std::path::PathBuf::from("fem-agent-keys"),
    };
    base.join(format!("{id}.key"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    use super::*;

    #[test]
    fn key_file_is_0600_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k/agent.key");
        let k = load_or_generate_key(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_key(&p).unwrap().public_key(), k.public_key());
        assert_eq!(load_or_generate_key(&p).unwrap().seed(), k.seed());
        assert!(save_key(&p, &k).is_err(), "must not overwrite");
        let pubp = dir.path().join("agent.pub");
        save_public_key(&pubp, &k.public_key()).unwrap();
        assert_eq!(load_public_key(&pubp).unwrap(), k.public_key());
        // A public key file is replaced.
        let other = SigningKey::generate().public_key();
        save_public_key(&pubp, &other).unwrap();
        assert_eq!(load_public_key(&pubp).unwrap(), other);
    }

    #[test]
    fn malformed_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad");
        fs::write(&p, "not hex\n").unwrap();
        assert!(matches!(load_key(&p), Err(NetError::MalformedKey { .. })));
        assert!(matches!(
            load_public_key(&p),
            Err(NetError::MalformedKey { .. })
        ));
        assert!(matches!(
            load_key(&dir.path().join("missing")),
            Err(NetError::Io { .. })
        ));
    }

    /// A symbolic link planted at the secret or the public key's path (to an
    /// existing file or to none) is refused, and its target is untouched.
    #[test]
    fn planted_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        let absent = dir.path().join("absent");
        let key = SigningKey::generate();
        for target in [&victim, &absent] {
            let secret = dir.path().join("out.key");
            let public = dir.path().join("out.pub");
            symlink(target, &secret).unwrap();
            symlink(target, &public).unwrap();
            assert!(save_key(&secret, &key).is_err());
            assert!(save_public_key(&public, &key.public_key()).is_err());
            assert!(load_or_generate_key(&secret).is_err());
            fs::remove_file(&secret).unwrap();
            fs::remove_file(&public).unwrap();
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(!absent.exists());
        // write_private replaces a link instead of writing through it.
        let link = dir.path().join("tls.key");
        symlink(&victim, &link).unwrap();
        write_private(&link, b"new").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(
            !fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&link).unwrap(), "new");
    }
}
