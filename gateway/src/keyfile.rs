//! Reading and writing private key files, with the permission rules the
//! gateway enforces: a private key readable by group or others is refused.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: private key is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Refuses a private key file whose mode grants any access to group or others.
pub fn check_private(path: &Path) -> Result<(), KeyFileError> {
    let meta = fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

/// Reads a private key file after checking its permissions.
pub fn read_private(path: &Path) -> Result<String, KeyFileError> {
    check_private(path)?;
    fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.into(),
        source,
    })
}

/// Writes a private key with mode 0600 (created with that mode, never wider).
pub fn write_private(path: &Path, contents: &str) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Write {
        path: path.into(),
        source,
    };
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(())
}

/// Writes a public file (certificate, public key) with mode 0644.
pub fn write_public(path: &Path, contents: &str) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Write {
        path: path.into(),
        source,
    };
    fs::write(path, contents).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_keys_are_written_0600_and_open_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_private(&p, "secret").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_private(&p).unwrap(), "secret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_private(&p).unwrap_err().to_string();
        assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
    }
}
