//! Ed25519 key files: the seed as 64 hex digits (written 0600), the public
//! key as 64 hex digits.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use fem_proto::{PublicKey, SigningKey};

use crate::SdkError;

/// Reads a private key file.
///
/// # Errors
/// [`SdkError::Key`] when unreadable or malformed.
pub fn load_key(path: &Path) -> Result<SigningKey, SdkError> {
    let text =
        fs::read_to_string(path).map_err(|e| SdkError::Key(format!("{}: {e}", path.display())))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .map_err(|_| SdkError::Key(format!("{}: expected 64 hex digits", path.display())))?;
    Ok(SigningKey::from_seed(seed))
}

/// Writes a private key file with mode 0600 (refuses to overwrite).
///
/// # Errors
/// [`SdkError::Key`] on I/O failure or when the file exists.
pub fn save_key(path: &Path, key: &SigningKey) -> Result<(), SdkError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| SdkError::Key(format!("{}: {e}", path.display())))?;
    writeln!(f, "{}", hex::encode(key.seed()))
        .map_err(|e| SdkError::Key(format!("{}: {e}", path.display())))
}

/// Writes a public key file (hex).
///
/// # Errors
/// [`SdkError::Key`] on I/O failure.
pub fn save_public_key(path: &Path, key: &PublicKey) -> Result<(), SdkError> {
    fs::write(path, format!("{key}\n"))
        .map_err(|e| SdkError::Key(format!("{}: {e}", path.display())))
}

/// Reads a public key file (hex).
///
/// # Errors
/// [`SdkError::Key`] when unreadable or malformed.
pub fn load_public_key(path: &Path) -> Result<PublicKey, SdkError> {
    let text =
        fs::read_to_string(path).map_err(|e| SdkError::Key(format!("{}: {e}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| SdkError::Key(format!("{}: expected 64 hex digits", path.display())))
}

/// Loads the key at `path`, or generates and saves one if the file does not exist.
///
/// # Errors
/// [`SdkError::Key`].
pub fn load_or_generate_key(path: &Path) -> Result<SigningKey, SdkError> {
    if path.exists() {
        return load_key(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| SdkError::Key(format!("{}: {e}", dir.display())))?;
    }
    let key = SigningKey::generate();
    save_key(path, &key)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

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
        assert!(save_key(&p, &k).is_err(), "must not overwrite");
        let pubp = dir.path().join("agent.pub");
        save_public_key(&pubp, &k.public_key()).unwrap();
        assert_eq!(load_public_key(&pubp).unwrap(), k.public_key());
    }
}
