//! The persisted chain position: last sequence number, hash of the last
//! batch, and the reported twin's version.
//!
//! File `chain.json` in the data directory, replaced atomically (write a
//! temporary file, fsync it, rename it over the old one, fsync the folder),
//! so after a crash or power loss it holds either the old or the new state,
//! never a mix. It is written after a batch is signed and before the batch
//! is handed to the MQTT link: a sequence number is never used twice.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use twin_model::BatchHash;

pub const FILE_NAME: &str = "chain.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState {
    pub seq: u64,
    pub prev_hash: BatchHash,
    pub twin_version: u64,
}

impl ChainState {
    pub const GENESIS: ChainState = ChainState {
        seq: 0,
        prev_hash: BatchHash::GENESIS,
        twin_version: 0,
    };
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    seq: u64,
    prev_hash: String,
    twin_version: u64,
    /// Lowest sequence number not yet acknowledged by the broker when the
    /// checkpoint was written (absent: none was pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_unacked: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid chain state ({reason}); the sequence cannot safely continue. Restore the file from backup, or move it away to start a new chain (the twin will report the restart as a replay)")]
    Corrupt { path: PathBuf, reason: String },
}

/// The chain state file of one data directory.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    path: PathBuf,
}

impl StateFile {
    pub fn new(data_dir: &Path) -> Self {
        StateFile {
            dir: data_dir.into(),
            path: data_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's content; `None` if it does not exist yet.
    fn read(&self) -> Result<Option<OnDisk>, StateError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Reads the state; genesis if the file does not exist yet.
    pub fn load(&self) -> Result<ChainState, StateError> {
        let Some(d) = self.read()? else {
            return Ok(ChainState::GENESIS);
        };
        let prev_hash =
            BatchHash::from_b64url(&d.prev_hash).ok_or_else(|| StateError::Corrupt {
                path: self.path.clone(),
                reason: "prev_hash is not a SHA-256".into(),
            })?;
        Ok(ChainState {
            seq: d.seq,
            prev_hash,
            twin_version: d.twin_version,
        })
    }

    /// The lowest unacknowledged sequence number recorded with the state.
    pub fn load_first_unacked(&self) -> Result<Option<u64>, StateError> {
        Ok(self.read()?.and_then(|d| d.first_unacked))
    }

    pub fn save(&self, s: &ChainState) -> Result<(), StateError> {
        self.save_with_first_unacked(s, None)
    }

    /// Replaces the state atomically and durably, with the lowest sequence
    /// number still waiting for the broker.
    pub fn save_with_first_unacked(
        &self,
        s: &ChainState,
        first_unacked: Option<u64>,
    ) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let body = serde_json::to_string(&OnDisk {
            seq: s.seq,
            prev_hash: s.prev_hash.to_b64url(),
            twin_version: s.twin_version,
            first_unacked,
        })
        .expect("chain state serializes");
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(body.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_reload_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        assert_eq!(f.load().unwrap(), ChainState::GENESIS);
        let s = ChainState {
            seq: 42,
            prev_hash: BatchHash([3; 32]),
            twin_version: 7,
        };
        f.save(&s).unwrap();
        assert_eq!(f.load().unwrap(), s);
        fs::write(f.path(), "{\"seq\":1").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("not a valid chain state"), "{e}");
    }
}
