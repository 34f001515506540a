//! The replay store: every token id (`jti`) accepted, kept until the token
//! could no longer be accepted anyway.
//!
//! # On-disk format
//! One redb database, `command-replay.redb` in the data directory:
//!
//! | table | key | value |
//! |---|---|---|
//! | `seen` | jti (str) | exp of the token, ms since the Unix epoch (u64) |
//! | `by_exp` | (exp ms u64, jti str) | () |
//!
//! # Invariants
//! 1. `seen` and `by_exp` hold the same (jti, exp) pairs; both change in
//!    one transaction.
//! 2. A jti is in `seen` before [`ReplayStore::check_and_record`] returns
//!    `Ok` for it: the transaction is committed with
//!    `Durability::Immediate` (fsync) first.
//! 3. An entry is removed only once `exp + leeway` has passed: from then
//!    on the verifier refuses the token as expired, so forgetting its id
//!    opens no replay.
//! 4. `seen` never holds more than `capacity` entries. When it is full of
//!    unexpired entries, or cannot be read or written, new tokens are
//!    refused (`replay_store_unavailable`): the store fails closed.
//!
//! A database that cannot be opened is an error of [`ReplayStore::open`];
//! it is not replaced by an empty one, which would accept every token it
//! had seen again.

use super::Refusal;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use std::path::{Path, PathBuf};

const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
const BY_EXP: TableDefinition<(u64, &str), ()> = TableDefinition::new("by_exp");

pub const FILE_NAME: &str = "command-replay.redb";

/// redb page cache: the store holds at most `capacity` short entries.
const CACHE_BYTES: usize = 1024 * 1024;

/// Options of [`ReplayStore::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Most token ids kept at once.
    pub capacity: u64,
    /// Kept past `exp` this long: the verifier's clock leeway.
    pub leeway_ms: u64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            capacity: 100_000,
            leeway_ms: super::DEFAULT_LEEWAY_MS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay store {path}: {source}")]
    Db { path: PathBuf, source: redb::Error },
}

/// The durable set of accepted token ids.
pub struct ReplayStore {
    db: Database,
    path: PathBuf,
    opts: ReplayOptions,
}

impl std::fmt::Debug for ReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayStore")
            .field("path", &self.path)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl ReplayStore {
    /// Opens (or creates) `command-replay.redb` in `dir`, checking every
    /// page first (a plain open may panic on a file altered since it was
    /// closed).
    pub fn open(dir: &Path, opts: ReplayOptions) -> Result<Self, ReplayError> {
        let path = dir.join(FILE_NAME);
        let err = |e: redb::Error| ReplayError::Db {
            path: path.clone(),
            source: e,
        };
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(SEEN).map_err(|e| err(e.into()))?;
        txn.open_table(BY_EXP).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(ReplayStore { db, path, opts })
    }

    /// Refuses a `jti` seen before (`replayed`); records a new one durably
    /// before returning `Ok`. Purges entries whose `exp + leeway` has
    /// passed first. Refuses (`replay_store_unavailable`) when the store
    /// is full of unexpired entries or cannot be written.
    pub fn check_and_record(&self, jti: &str, exp_ms: u64, now_ms: u64) -> Result<(), Refusal> {
        match self.try_record(jti, exp_ms, now_ms) {
            Ok(Outcome::Recorded) => Ok(()),
            Ok(Outcome::Seen) => Err(Refusal::Replayed),
            Ok(Outcome::Full) => {
                tracing::error!(path = %self.path.display(), capacity = self.opts.capacity, "the command replay store is full of unexpired token ids; commands are refused until some expire");
                Err(Refusal::ReplayStoreUnavailable(format!(
                    "full ({} unexpired token ids)",
                    self.opts.capacity
                )))
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "the command replay store cannot be written; commands are refused");
                Err(Refusal::ReplayStoreUnavailable(e.to_string()))
            }
        }
    }

    fn try_record(&self, jti: &str, exp_ms: u64, now_ms: u64) -> Result<Outcome, redb::Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let outcome = {
            let mut seen = txn.open_table(SEEN)?;
            let mut by_exp = txn.open_table(BY_EXP)?;
            // Purge, oldest expiry first.
            loop {
                let first = match by_exp.first()? {
                    Some((k, _)) => {
                        let (exp, id) = k.value();
                        (exp.saturating_add(self.opts.leeway_ms) < now_ms)
                            .then(|| (exp, id.to_owned()))
                    }
                    None => None,
                };
                let Some((exp, id)) = first else { break };
                by_exp.remove((exp, id.as_str()))?;
                seen.remove(id.as_str())?;
            }
            if seen.get(jti)?.is_some() {
                Outcome::Seen
            } else if seen.len()? >= self.opts.capacity {
                Outcome::Full
            } else {
                seen.insert(jti, exp_ms)?;
                by_exp.insert((exp_ms, jti), ())?;
                Outcome::Recorded
            }
        };
        // Commit also when nothing was recorded: the purge is kept.
        txn.commit()?;
        Ok(outcome)
    }

    /// Token ids currently kept.
    pub fn len(&self) -> Result<u64, ReplayError> {
        let err = |e: redb::Error| ReplayError::Db {
            path: self.path.clone(),
            source: e,
        };
        let r = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = r.open_table(SEEN).map_err(|e| err(e.into()))?;
        t.len().map_err(|e| err(e.into()))
    }

    pub fn is_empty(&self) -> Result<bool, ReplayError> {
        Ok(self.len()? == 0)
    }
}

enum Outcome {
    Recorded,
    Seen,
    Full,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, capacity: u64) -> ReplayStore {
        ReplayStore::open(
            dir,
            ReplayOptions {
                capacity,
                leeway_ms: 1_000,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_recorded_jti_is_refused_again_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        assert_eq!(store.check_and_record("a", 10_000, 0), Ok(()));
        assert_eq!(
            store.check_and_record("a", 10_000, 1),
            Err(Refusal::Replayed)
        );
        drop(store);
        let store = open(dir.path(), 10);
        assert_eq!(
            store.check_and_record("a", 10_000, 2),
            Err(Refusal::Replayed)
        );
        assert_eq!(store.len().unwrap(), 1);
    }

    #[test]
    fn entries_are_purged_only_after_expiry_plus_leeway() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        store.check_and_record("a", 10_000, 0).unwrap();
        store.check_and_record("b", 20_000, 0).unwrap();
        // At exp + leeway the entry is still kept.
        assert_eq!(
            store.check_and_record("a", 10_000, 11_000),
            Err(Refusal::Replayed)
        );
        store.check_and_record("c", 30_000, 11_001).unwrap();
        assert_eq!(store.len().unwrap(), 2);
    }

    #[test]
    fn a_full_store_of_unexpired_entries_fails_closed_until_some_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 2);
        store.check_and_record("a", 10_000, 0).unwrap();
        store.check_and_record("b", 10_000, 0).unwrap();
        let r = store.check_and_record("c", 10_000, 0).unwrap_err();
        assert_eq!(r.code(), "replay_store_unavailable");
        store.check_and_record("c", 50_000, 20_000).unwrap();
    }
}
