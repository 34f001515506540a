//! The durable outbox between signing and publishing.
//!
//! Every signed batch is stored here, in the same transaction as the chain
//! position it advances, before anything may publish it; the MQTT link
//! publishes from here and deletes a batch only when the broker has
//! acknowledged it. The twin removes duplicates by (gateway, seq), so the
//! twin sees each batch exactly once, or a signed gap record accounts for it.
//!
//! # On-disk format
//! One redb database, `outbox.redb` in the data directory:
//!
//! | table | key | value |
//! |---|---|---|
//! | `records` | seq (u64) | a record (see [`record`]): header, signed batch, integrity check or AES-256-GCM |
//! | `gaps` | gap id (u64) | a signed gap record (JWS), until acknowledged |
//! | `quarantine` | seq (u64) | the raw bytes of a record that failed its check, kept for inspection |
//! | `meta` | name | `id` (16 random bytes), `chain` (seq u64, hash [32], twin version u64), `bytes` (u64), `next_gap` (u64), `dropped_points` (u64), `dropped_batches` (u64) |
//!
//! # Invariants
//! 1. `meta.chain.seq` is the highest sequence number ever signed with a
//!    stored or accounted batch; it only grows. It is written in the same
//!    transaction as the records that advance it.
//! 2. Every seq in `1..=chain.seq` is in exactly one of: acknowledged by the
//!    broker (deleted), `records`, or a gap record (stored or delivered).
//! 3. `meta.bytes` is the sum of the sizes of `records` values.
//! 4. A record is only ever published after the transaction that stored it
//!    committed with `Durability::Immediate` (one fsync per group commit,
//!    not per batch or point).
//! 5. A record that fails its integrity check is never published: it moves
//!    to `quarantine` and a gap record (`quarantined`) accounts for it.
//! 6. Gap records are never dropped by the bounds.
//!
//! Deletions after acknowledgements are committed without an fsync: a
//! crash may forget a deletion, and the batch is then sent again (a
//! duplicate the twin drops), never lost.

pub mod record;

use crate::config::{FullPolicy, OutboxConfig};
use crate::uplink::state::{ChainState, StateFile};
use record::{Cipher, RecordError};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use twin_model::gap::{self, GapRecord, GAP_TYP};
use twin_model::{BatchHash, SigningKey};

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const GAPS: TableDefinition<u64, &[u8]> = TableDefinition::new("gaps");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub const FILE_NAME: &str = "outbox.redb";

/// redb page cache of the outbox.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// After an outbox is lost, the chain continues this far past the last
/// checkpoint, so no sequence number signed since can be reused.
pub const LOST_OUTBOX_SEQ_JUMP: u64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database: {0}")]
    Db(#[from] redb::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] crate::uplink::state::StateError),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(impl From<$t> for OutboxError { fn from(e: $t) -> Self { OutboxError::Db(e.into()) } })*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// A signed batch to store.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub seq: u64,
    pub jws: Vec<u8>,
    pub points: u32,
    pub created_ms: u64,
}

/// A stored batch, checked and ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub jws: Vec<u8>,
    pub points: u32,
}

/// What the MQTT link publishes and acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Item {
    Batch(u64),
    Gap(u64),
}

/// Counters, readable at any time.
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped_points: AtomicU64,
    pub dropped_batches: AtomicU64,
    pub quarantined: AtomicU64,
    pub commits: AtomicU64,
    pub storage_errors: AtomicU64,
}

/// Options of [`Outbox::open`].
pub struct OutboxOptions {
    pub config: OutboxConfig,
    pub cipher: Option<Cipher>,
    pub key: Arc<SigningKey>,
    pub gateway_id: String,
}

/// What [`Outbox::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub chain: ChainState,
    pub records: u64,
    /// Set when the database could not be opened and was moved aside.
    pub set_aside: Option<PathBuf>,
}

pub struct Outbox {
    db: Database,
    id: [u8; 16],
    cipher: Option<Cipher>,
    config: OutboxConfig,
    key: Arc<SigningKey>,
    gateway_id: String,
    dir: PathBuf,
    pub stats: Arc<OutboxStats>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn encode_chain(c: &ChainState) -> Vec<u8> {
    let mut v = Vec::with_capacity(48);
    v.extend_from_slice(&c.seq.to_be_bytes());
    v.extend_from_slice(&c.prev_hash.0);
    v.extend_from_slice(&c.twin_version.to_be_bytes());
    v
}

fn decode_chain(b: &[u8]) -> Option<ChainState> {
    if b.len() != 48 {
        return None;
    }
    let hash: [u8; 32] = b.get(8..40)?.try_into().ok()?;
    Some(ChainState {
        seq: u64_at(b, 0),
        prev_hash: BatchHash(hash),
        twin_version: u64_at(b, 40),
    })
}

fn meta_u64(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, OutboxError> {
    Ok(t.get(key)?.map(|v| u64_at(v.value(), 0)).unwrap_or(0))
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`. A database that cannot be
    /// read is moved aside (`outbox.redb.corrupt-<ms>`), a new one is made,
    /// and the chain continues past the last checkpoint with a signed gap
    /// record (`outbox_lost`) for what the old one held.
    pub fn open(dir: &Path, opts: OutboxOptions) -> Result<(Outbox, OpenReport), OutboxError> {
        let path = dir.join(FILE_NAME);
        let checkpoint = StateFile::new(dir);
        let (db, set_aside) = match create_checked(&path) {
            Ok(db) => (db, None),
            Err(e) if unreadable(&e) => {
                let aside = dir.join(format!("{FILE_NAME}.corrupt-{}", crate::clock::now_ms()));
                tracing::error!(path = %path.display(), error = %e, aside = %aside.display(), "the outbox database is unreadable; it is set aside and a new one started");
                std::fs::rename(&path, &aside).map_err(|source| OutboxError::Io {
                    path: path.clone(),
                    source,
                })?;
                (create_checked(&path)?, Some(aside))
            }
            Err(e) => return Err(e.into()),
        };
        let mut outbox = Outbox {
            db,
            id: [0; 16],
            cipher: opts.cipher,
            config: opts.config,
            key: opts.key,
            gateway_id: opts.gateway_id,
            dir: dir.into(),
            stats: Arc::new(OutboxStats::default()),
        };
        let txn = outbox.db.begin_write()?;
        let (chain, records, bytes, fresh) = {
            let mut meta = txn.open_table(META)?;
            let records = txn.open_table(RECORDS)?;
            txn.open_table(GAPS)?;
            txn.open_table(QUARANTINE)?;
            let fresh = meta.get("id")?.is_none();
            if fresh {
                let mut id = [0u8; 16];
                aws_lc_rs::rand::fill(&mut id).expect("the system random generator works");
                meta.insert("id", &id[..])?;
            }
            if let Some(id) = meta.get("id")?.and_then(|v| v.value().try_into().ok()) {
                outbox.id = id;
            }
            let chain = meta.get("chain")?.and_then(|v| decode_chain(v.value()));
            (chain, records.len()?, meta_u64(&meta, "bytes")?, fresh)
        };
        let chain = match chain {
            Some(c) => c,
            None => {
                // A new outbox. A checkpoint beyond genesis means an outbox
                // existed and is gone (set aside, or deleted): the chain
                // jumps ahead so no sequence number is ever reused.
                let cp = checkpoint.load()?;
                let lost = set_aside.is_some() || (fresh && cp.seq > 0);
                let mut c = cp;
                if lost {
                    // From the lowest batch still waiting for the broker at
                    // the checkpoint: everything the lost outbox may have held.
                    let from = checkpoint
                        .load_first_unacked()?
                        .map_or(cp.seq + 1, |f| f.min(cp.seq + 1));
                    c.seq = cp.seq + LOST_OUTBOX_SEQ_JUMP;
                    c.prev_hash = BatchHash::GENESIS;
                    outbox.put_gap(&txn, vec![[from, c.seq]], None, gap::reason::OUTBOX_LOST)?;
                }
                txn.open_table(META)?
                    .insert("chain", &encode_chain(&c)[..])?;
                c
            }
        };
        txn.commit()?;
        outbox.stats.records.store(records, Ordering::Relaxed);
        outbox.stats.bytes.store(bytes, Ordering::Relaxed);
        Ok((
            outbox,
            OpenReport {
                chain,
                records,
                set_aside,
            },
        ))
    }

    /// The chain position last committed.
    pub fn chain(&self) -> Result<ChainState, OutboxError> {
        let r = self.db.begin_read()?;
        let meta = r.open_table(META)?;
        Ok(meta
            .get("chain")?
            .and_then(|v| decode_chain(v.value()))
            .unwrap_or(ChainState::GENESIS))
    }

    /// Writes the chain position to the checkpoint file (used only if the
    /// database is ever lost).
    pub fn checkpoint(&self) -> Result<(), OutboxError> {
        // Read the position first: a batch stored in between only makes
        // `first_unacked` lower than needed, never higher.
        let chain = self.chain()?;
        let first = self.first_seq()?;
        StateFile::new(&self.dir).save_with_first_unacked(&chain, first)?;
        Ok(())
    }

    fn put_gap(
        &self,
        txn: &redb::WriteTransaction,
        seqs: Vec<[u64; 2]>,
        points: Option<u64>,
        reason: &str,
    ) -> Result<(), OutboxError> {
        let mut meta = txn.open_table(META)?;
        let gap_id = meta_u64(&meta, "next_gap")? + 1;
        meta.insert("next_gap", &gap_id.to_be_bytes()[..])?;
        let record = GapRecord {
            v: twin_model::WIRE_VERSION,
            gateway_id: self.gateway_id.clone(),
            gap_id,
            seqs,
            points,
            reason: reason.into(),
            created_ms: crate::clock::now_ms(),
        };
        let batches = record.batches();
        let jws = self.key.sign_compact(
            GAP_TYP,
            &serde_json::to_vec(&record).expect("gap record serializes"),
        );
        txn.open_table(GAPS)?.insert(gap_id, jws.as_bytes())?;
        let dp = meta_u64(&meta, "dropped_points")? + points.unwrap_or(0);
        let db = meta_u64(&meta, "dropped_batches")? + batches;
        meta.insert("dropped_points", &dp.to_be_bytes()[..])?;
        meta.insert("dropped_batches", &db.to_be_bytes()[..])?;
        self.stats
            .dropped_points
            .fetch_add(points.unwrap_or(0), Ordering::Relaxed);
        self.stats
            .dropped_batches
            .fetch_add(batches, Ordering::Relaxed);
        tracing::warn!(
            gap_id,
            batches,
            points,
            reason,
            "batches dropped; a signed gap record tells the twin"
        );
        Ok(())
    }

    /// Stores `records` and the chain position they lead to, in one
    /// durable transaction, applying the size and age bounds. `failed`
    /// names earlier batches that could not be stored (they get a gap record).
    pub fn append(
        &self,
        records: &[NewRecord],
        chain: ChainState,
        failed: &[(u64, u32)],
        now_ms: u64,
    ) -> Result<(), OutboxError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(RECORDS)?;
            let mut bytes = meta_u64(&meta, "bytes")?;
            let mut dropped_new: Vec<(u64, u32)> = Vec::new();
            for r in records {
                let value = record::encode(
                    &self.id,
                    r.seq,
                    r.created_ms,
                    r.points,
                    &r.jws,
                    self.cipher.as_ref(),
                );
                let len = value.len() as u64;
                if self.config.full_policy == FullPolicy::DropNewest
                    && bytes + len > self.config.max_bytes
                {
                    dropped_new.push((r.seq, r.points));
                    continue;
                }
                table.insert(r.seq, &value[..])?;
                bytes += len;
            }
            // Oldest first: past the size bound, or past the age bound.
            let mut dropped_full: Vec<(u64, u32)> = Vec::new();
            let mut dropped_old: Vec<(u64, u32)> = Vec::new();
            let max_age_ms = self.config.max_age.as_millis() as u64;
            loop {
                let Some((seq, len, created, points)) = table.first()?.map(|(k, v)| {
                    let v = v.value();
                    let (created, points) = header_fields(v);
                    (k.value(), v.len() as u64, created, points)
                }) else {
                    break;
                };
                let too_big = bytes > self.config.max_bytes;
                let too_old = created.saturating_add(max_age_ms) < now_ms;
                if !too_big && !too_old {
                    break;
                }
                table.remove(seq)?;
                bytes = bytes.saturating_sub(len);
                if too_old {
                    dropped_old.push((seq, points))
                } else {
                    dropped_full.push((seq, points))
                }
            }
            meta.insert("bytes", &bytes.to_be_bytes()[..])?;
            meta.insert("chain", &encode_chain(&chain)[..])?;
            self.stats.bytes.store(bytes, Ordering::Relaxed);
            self.stats.records.store(table.len()?, Ordering::Relaxed);
            drop(table);
            drop(meta);
            for (list, why) in [
                (dropped_new, gap::reason::OUTBOX_FULL),
                (dropped_full, gap::reason::OUTBOX_FULL),
                (dropped_old, gap::reason::MAX_AGE),
                (failed.to_vec(), gap::reason::STORAGE_ERROR),
            ] {
                if !list.is_empty() {
                    let points = list.iter().map(|(_, p)| u64::from(*p)).sum();
                    self.put_gap(
                        &txn,
                        gap::runs(list.iter().map(|(s, _)| *s)),
                        Some(points),
                        why,
                    )?;
                }
            }
        }
        txn.commit()?;
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Up to `max` stored batches with seq >= `from`, oldest first, each
    /// checked. A record that fails its check is quarantined (and a gap
    /// record accounts for it) instead of being returned.
    pub fn pending(&self, from: u64, max: usize) -> Result<Vec<Stored>, OutboxError> {
        let mut out = Vec::new();
        let mut bad: Vec<(u64, Vec<u8>, RecordError)> = Vec::new();
        {
            let r = self.db.begin_read()?;
            let table = r.open_table(RECORDS)?;
            for entry in table.range(from..)? {
                let (k, v) = entry?;
                let (seq, raw) = (k.value(), v.value());
                match record::decode(&self.id, seq, raw, self.cipher.as_ref()) {
                    Ok(d) => out.push(Stored {
                        seq,
                        jws: d.body,
                        points: d.points,
                    }),
                    Err(e) => bad.push((seq, raw.to_vec(), e)),
                }
                if out.len() >= max {
                    break;
                }
            }
        }
        if !bad.is_empty() {
            self.quarantine(&bad)?;
        }
        Ok(out)
    }

    fn quarantine(&self, bad: &[(u64, Vec<u8>, RecordError)]) -> Result<(), OutboxError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut q = txn.open_table(QUARANTINE)?;
            let mut meta = txn.open_table(META)?;
            let mut bytes = meta_u64(&meta, "bytes")?;
            for (seq, raw, why) in bad {
                tracing::error!(seq, error = %why, "an outbox record failed its check; it is quarantined and never published");
                records.remove(*seq)?;
                q.insert(*seq, &raw[..])?;
                bytes = bytes.saturating_sub(raw.len() as u64);
            }
            meta.insert("bytes", &bytes.to_be_bytes()[..])?;
            self.stats.bytes.store(bytes, Ordering::Relaxed);
            self.stats.records.store(records.len()?, Ordering::Relaxed);
        }
        // The points of an altered record cannot be trusted: unknown.
        self.put_gap(
            &txn,
            gap::runs(bad.iter().map(|(s, _, _)| *s)),
            None,
            gap::reason::QUARANTINED,
        )?;
        txn.commit()?;
        self.stats
            .quarantined
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Stored gap records not yet acknowledged, oldest first.
    pub fn gaps(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, OutboxError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(GAPS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((k.value(), v.value().to_vec()));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes acknowledged items (no fsync: see the module doc).
    pub fn ack(&self, items: &[Item]) -> Result<(), OutboxError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        {
            let mut records = txn.open_table(RECORDS)?;
            let mut gaps = txn.open_table(GAPS)?;
            let mut meta = txn.open_table(META)?;
            let mut bytes = meta_u64(&meta, "bytes")?;
            for item in items {
                match item {
                    Item::Batch(seq) => {
                        if let Some(v) = records.remove(*seq)? {
                            bytes = bytes.saturating_sub(v.value().len() as u64);
                        }
                    }
                    Item::Gap(id) => {
                        gaps.remove(*id)?;
                    }
                }
            }
            meta.insert("bytes", &bytes.to_be_bytes()[..])?;
            self.stats.bytes.store(bytes, Ordering::Relaxed);
            self.stats.records.store(records.len()?, Ordering::Relaxed);
        }
        txn.commit()?;
        Ok(())
    }

    /// Quarantined records (seq, raw bytes), for inspection and tests.
    pub fn quarantined(&self) -> Result<Vec<(u64, Vec<u8>)>, OutboxError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Batches stored and not yet acknowledged.
    pub fn len(&self) -> u64 {
        self.stats.records.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lowest stored seq, if any.
    pub fn first_seq(&self) -> Result<Option<u64>, OutboxError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(RECORDS)?;
        let first = t.first()?.map(|(k, _)| k.value());
        Ok(first)
    }
}

/// Opens or creates the database, verifying the checksum of every page
/// first: a plain open trusts a file that was shut down cleanly and may
/// panic on one altered since (redb documents this), where the check
/// reports it as [`redb::StorageError::Corrupted`].
fn create_checked(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder()
        .set_check_integrity_on_open(true)
        // redb caches up to 1 GiB by default; the outbox is written once and
        // read about once, so a small cache keeps the gateway's memory flat
        // during long outages.
        .set_cache_size(CACHE_BYTES)
        .create(path)
}

/// Whether an error of [`create_checked`] means the file cannot be read as
/// an outbox (and is set aside), not that the storage failed (the error is
/// returned). redb reports a file too short to hold its header, or without
/// its magic number, as an I/O error (`UnexpectedEof`, `InvalidData`).
fn unreadable(e: &redb::DatabaseError) -> bool {
    use redb::{DatabaseError as D, StorageError as S};
    match e {
        D::Storage(S::Corrupted(_)) | D::UpgradeRequired(_) | D::RepairAborted => true,
        D::Storage(S::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// `created_ms` and `points` from a record header, without checking it
/// (used only to apply the bounds; a bad record is caught when read).
fn header_fields(v: &[u8]) -> (u64, u32) {
    let created = u64_at(v, 6);
    let points = v
        .get(14..18)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0);
    (created, points)
}

#[cfg(test)]
mod tests;
