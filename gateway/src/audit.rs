//! The audit log file: append-only, hash-chained, periodically signed.
//!
//! The record format and the chain are defined in [`twin_model::audit`]; this
//! module owns the file.
//!
//! # On-disk format
//! One file (conventionally `audit.jsonl` in the data directory), mode 0600,
//! UTF-8, one record per line, each line ending in `\n` (see
//! [`twin_model::audit`] for the fields). Every file starts at record n=1
//! with `prev` = 43 `A`s, and every run of the gateway appends a `started`
//! record followed by a checkpoint; [`AuditLog::close`] appends `stopped` and
//! a final checkpoint.
//!
//! # Invariants
//! 1. Audit before acting: [`AuditLog::append`] returns `Ok` only after the
//!    line is written and `fdatasync`ed. A caller acts on a decision only
//!    after that. An `Err` means the record may be missing (or, rarely, present
//!    without having been confirmed): the caller must not act, and fails
//!    closed.
//! 2. After any write or sync error the log refuses every further record
//!    ([`AuditError::Failed`]) until it is reopened: a torn or unsynced line is
//!    never followed by more records. The log tries to cut a partial line off
//!    the end, so that a reopen finds whole records only.
//! 3. Nothing is ever rewritten. A file that does not verify at open is
//!    renamed to `<name>.broken-<ms>` (kept as evidence, never modified), and a
//!    new file starts whose `started` record names it and its first bad record,
//!    and the index and hash of its last good record.
//! 4. A checkpoint is written before a record when `checkpoint_every_records`
//!    records or `checkpoint_interval_ms` have passed since the last one
//!    ([`AuditLog::checkpoint_if_due`] for a timer), so a checkpoint never
//!    stands between a record's write and its `Ok`.
//! 5. The log is a plain file: symlinks, directories and devices are refused.
//!
//! Every call blocks on the disk (one fsync per record): call it from a
//! blocking thread, not from an async task.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use twin_model::audit::{
    parse_line, AuditChain, BadRecord, Event, Previous, SetAside, Started, Stopped, Verifier,
    VerifyReport, MAX_LINE_BYTES,
};
use twin_model::jws::b64url;
use twin_model::{SigningKey, TrustStore};

/// Why the audit log could not be opened or written. The caller fails closed
/// on every one of them.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: not a regular file (the audit log must be a plain file, not a directory, device or symlink)")]
    NotAFile { path: PathBuf },
    #[error("{path}: cannot open the audit log: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: cannot read the audit log: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: the audit log does not verify and cannot be renamed aside to {to}: {source}")]
    SetAside {
        path: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("{path}: cannot write audit record n={n}: {source}")]
    Write {
        path: PathBuf,
        n: u64,
        source: io::Error,
    },
    #[error("{path}: audit record n={n} would be {len} bytes, more than the limit of {limit}; nothing was written")]
    TooLarge {
        path: PathBuf,
        n: u64,
        len: usize,
        limit: usize,
    },
    #[error("{path}: audit record n={n} would not read back ({reason}); nothing was written")]
    Invalid {
        path: PathBuf,
        n: u64,
        reason: String,
    },
    #[error("checkpoints are written by the audit log itself; call `checkpoint()` instead of appending one")]
    CheckpointByHand,
    #[error("{path}: the audit log failed earlier ({cause}) and accepts no records until it is reopened")]
    Failed { path: PathBuf, cause: String },
}

impl AuditError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            AuditError::NotAFile { .. } => "not_a_file",
            AuditError::Open { .. } => "open",
            AuditError::Read { .. } => "read",
            AuditError::SetAside { .. } => "set_aside",
            AuditError::Write { .. } => "write",
            AuditError::TooLarge { .. } => "too_large",
            AuditError::Invalid { .. } => "invalid",
            AuditError::CheckpointByHand => "checkpoint_by_hand",
            AuditError::Failed { .. } => "failed",
        }
    }
}

/// When checkpoints are written, and the clock.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// A checkpoint after at most this many records (at least 1).
    pub checkpoint_every_records: u64,
    /// A checkpoint when this long has passed since the last one and records
    /// were written since.
    pub checkpoint_interval_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub now_ms: fn() -> u64,
    /// Keys that signed earlier checkpoints of the file (before a key
    /// rotation), besides the current key.
    pub previous_keys: TrustStore,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            checkpoint_every_records: 100,
            checkpoint_interval_ms: 60_000,
            now_ms: crate::clock::now_ms,
            previous_keys: TrustStore::new(),
        }
    }
}

/// One line written and synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLine {
    pub n: u64,
    /// The exact line, without `\n`, to forward to the audit topic.
    pub line: String,
}

/// A record written and synced: the caller may now act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRef {
    /// Index of the record.
    pub n: u64,
    /// The exact line, without `\n`, to forward to the audit topic.
    pub line: String,
    /// A checkpoint that was due and was written just before the record.
    pub checkpoint: Option<WrittenLine>,
}

impl AuditRef {
    /// Every line written by this call, in file order (forward them in this order).
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.checkpoint
            .iter()
            .map(|c| c.line.as_str())
            .chain(std::iter::once(self.line.as_str()))
    }
}

/// What [`AuditLog::open`] found and did.
#[derive(Debug, Clone)]
pub struct Opened {
    pub previous: Previous,
    /// The verification of the file found at open, if there was one.
    pub report: Option<VerifyReport>,
    /// Where a broken file was renamed to, and its first bad record.
    pub set_aside: Option<(PathBuf, BadRecord)>,
    /// The `started` record and checkpoint written at open, to forward.
    pub lines: Vec<WrittenLine>,
}

/// The audit log of one gateway. One owner; not shared between processes.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Bytes of whole, synced records in the file.
    len: u64,
    key: Arc<SigningKey>,
    gateway_id: String,
    options: AuditOptions,
    chain: AuditChain,
    since_checkpoint: u64,
    last_checkpoint_ms: u64,
    failed: Option<String>,
    opened: Opened,
}

impl AuditLog {
    /// Opens (or creates) the log at `path` with default checkpoint settings.
    pub fn open(
        path: &Path,
        key: Arc<SigningKey>,
        gateway_id: &str,
    ) -> Result<AuditLog, AuditError> {
        Self::open_with(path, key, gateway_id, AuditOptions::default())
    }

    /// Opens (or creates) the log at `path`: verifies an existing file and
    /// continues its chain, or renames a broken one aside and starts anew;
    /// then writes `started` and a checkpoint.
    pub fn open_with(
        path: &Path,
        key: Arc<SigningKey>,
        gateway_id: &str,
        options: AuditOptions,
    ) -> Result<AuditLog, AuditError> {
        let mut file = open_plain_file(path, false)?;
        let existing_len = file
            .metadata()
            .map_err(|source| read_err(path, source))?
            .len();

        let mut trust = options.previous_keys.clone();
        trust.add(key.public_key());

        let mut previous = Previous::None;
        let mut report = None;
        let mut set_aside = None;
        let mut unverified_tail = 0;
        let mut chain = AuditChain::new();
        let mut len = 0;

        if existing_len > 0 {
            file.seek(SeekFrom::Start(0))
                .map_err(|source| read_err(path, source))?;
            let r = verify_reader(&mut file, &trust).map_err(|source| read_err(path, source))?;
            match r.first_bad.clone() {
                None => {
                    chain = AuditChain::resume(r.last_n, r.head);
                    len = existing_len;
                    previous = if r.closed {
                        Previous::Closed
                    } else {
                        Previous::NotClosed
                    };
                    unverified_tail = r.unverified_tail;
                }
                Some(bad) => {
                    let to = set_aside_name(path, (options.now_ms)());
                    fs::rename(path, &to).map_err(|source| AuditError::SetAside {
                        path: path.into(),
                        to: to.clone(),
                        source,
                    })?;
                    sync_parent(path);
                    drop(file);
                    file = open_plain_file(path, true)?;
                    previous = Previous::SetAside;
                    set_aside = Some((to, bad));
                }
            }
            report = Some(r);
        } else {
            sync_parent(path);
        }

        let now = (options.now_ms)();
        let mut log = AuditLog {
            path: path.into(),
            file,
            len,
            key,
            gateway_id: gateway_id.into(),
            options,
            chain,
            since_checkpoint: 0,
            last_checkpoint_ms: now,
            failed: None,
            opened: Opened {
                previous,
                report: report.clone(),
                set_aside: set_aside.clone(),
                lines: Vec::new(),
            },
        };
        let started = Event::Started(Started {
            gateway_id: gateway_id.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            previous,
            unverified_tail,
            set_aside: match (&set_aside, &report) {
                (Some((to, bad)), Some(r)) => Some(SetAside {
                    file: to.display().to_string(),
                    line: bad.line,
                    n: bad.n,
                    reason: bad.reason.code().into(),
                    detail: bad.detail.clone(),
                    last_good_n: r.last_n,
                    last_good_head: b64url(&r.head),
                }),
                _ => None,
            },
        });
        let first = log.write_event(&started, now)?;
        let checkpoint = log.write_checkpoint(now)?;
        log.opened.lines = vec![first, checkpoint];
        Ok(log)
    }

    /// What open found and did.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Index of the next record.
    pub fn next_index(&self) -> u64 {
        self.chain.next_index()
    }

    /// Writes one record and syncs it. Act on what it records only after
    /// this returns `Ok`. Writes a due checkpoint first.
    pub fn append(&mut self, event: &Event) -> Result<AuditRef, AuditError> {
        if matches!(event, Event::Checkpoint(_)) {
            return Err(AuditError::CheckpointByHand);
        }
        self.usable()?;
        let now = (self.options.now_ms)();
        let checkpoint = if self.checkpoint_due(now) {
            Some(self.write_checkpoint(now)?)
        } else {
            None
        };
        let WrittenLine { n, line } = self.write_event(event, now)?;
        Ok(AuditRef {
            n,
            line,
            checkpoint,
        })
    }

    /// Writes a checkpoint if one is due (call from a timer).
    pub fn checkpoint_if_due(&mut self) -> Result<Option<WrittenLine>, AuditError> {
        self.usable()?;
        let now = (self.options.now_ms)();
        if self.checkpoint_due(now) {
            self.write_checkpoint(now).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Writes a checkpoint now.
    pub fn checkpoint(&mut self) -> Result<WrittenLine, AuditError> {
        self.usable()?;
        let now = (self.options.now_ms)();
        self.write_checkpoint(now)
    }

    /// Closes the log in order: `stopped`, then a final checkpoint.
    pub fn close(mut self, reason: &str) -> Result<Vec<WrittenLine>, AuditError> {
        self.usable()?;
        let now = (self.options.now_ms)();
        let stopped = self.write_event(
            &Event::Stopped(Stopped {
                reason: reason.into(),
            }),
            now,
        )?;
        let checkpoint = self.write_checkpoint(now)?;
        Ok(vec![stopped, checkpoint])
    }

    fn usable(&self) -> Result<(), AuditError> {
        match &self.failed {
            Some(cause) => Err(AuditError::Failed {
                path: self.path.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn checkpoint_due(&self, now: u64) -> bool {
        self.since_checkpoint > 0
            && (self.since_checkpoint >= self.options.checkpoint_every_records.max(1)
                || now.saturating_sub(self.last_checkpoint_ms)
                    >= self.options.checkpoint_interval_ms)
    }

    fn write_event(&mut self, event: &Event, now: u64) -> Result<WrittenLine, AuditError> {
        let mut next = self.chain.clone();
        let n = next.next_index();
        let line = next.append(event, now);
        self.write_line(n, &line)?;
        self.chain = next;
        self.since_checkpoint += 1;
        Ok(WrittenLine { n, line })
    }

    fn write_checkpoint(&mut self, now: u64) -> Result<WrittenLine, AuditError> {
        let mut next = self.chain.clone();
        let n = next.next_index();
        let line = next.append_checkpoint(&self.key, &self.gateway_id, now);
        self.write_line(n, &line)?;
        self.chain = next;
        self.since_checkpoint = 0;
        self.last_checkpoint_ms = now;
        Ok(WrittenLine { n, line })
    }

    /// Appends `line` and `\n` in one write, then syncs. On failure the log
    /// is marked failed (invariant 2).
    fn write_line(&mut self, n: u64, line: &str) -> Result<(), AuditError> {
        self.usable()?;
        if line.len() > MAX_LINE_BYTES {
            return Err(AuditError::TooLarge {
                path: self.path.clone(),
                n,
                len: line.len(),
                limit: MAX_LINE_BYTES,
            });
        }
        // Every line written must read back as a record (a NaN would not).
        if let Err(e) = parse_line(line.as_bytes()) {
            return Err(AuditError::Invalid {
                path: self.path.clone(),
                n,
                reason: e.to_string(),
            });
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        match self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(source) => {
                // Best effort: leave whole records only. If this fails too,
                // the next open finds a torn line and sets the file aside.
                let _ = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data());
                self.failed = Some(source.to_string());
                Err(AuditError::Write {
                    path: self.path.clone(),
                    n,
                    source,
                })
            }
        }
    }
}

/// Verifies an audit log file and reports the first bad record. For the
/// `gateway audit verify FILE` command; the report's `Display` is written
/// for an auditor.
pub fn verify_file(path: &Path, trust: &TrustStore) -> Result<VerifyReport, io::Error> {
    let file = File::open(path)?;
    verify_reader(file, trust)
}

/// Verifies a log read from `reader`, one bounded line at a time (a line
/// longer than [`MAX_LINE_BYTES`] is never held whole).
pub fn verify_reader<R: Read>(reader: R, trust: &TrustStore) -> Result<VerifyReport, io::Error> {
    let mut reader = BufReader::new(reader);
    let mut verifier = Verifier::new(trust);
    let limit = MAX_LINE_BYTES as u64 + 1;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = (&mut reader).take(limit).read_until(b'\n', &mut buf)?;
        if read == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            verifier.push_line(&buf);
        } else if buf.len() as u64 >= limit {
            verifier.push_too_long();
            break;
        } else {
            verifier.push_partial(&buf);
            break;
        }
    }
    Ok(verifier.finish())
}

/// Opens `path` for reading and appending, mode 0600, refusing anything but
/// a plain file. `create_new` for a file that must not exist yet.
fn open_plain_file(path: &Path, create_new: bool) -> Result<File, AuditError> {
    // A missing file is created below; any other metadata error shows up
    // again, with its cause, when opening.
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            return Err(AuditError::NotAFile { path: path.into() });
        }
    }
    let mut opts = OpenOptions::new();
    opts.read(true).append(true).mode(0o600);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true);
    }
    let open_err = |source| AuditError::Open {
        path: path.into(),
        source,
    };
    let file = opts.open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(AuditError::NotAFile { path: path.into() });
    }
    if meta.permissions().mode() & 0o777 != 0o600 {
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(open_err)?;
    }
    Ok(file)
}

fn read_err(path: &Path, source: io::Error) -> AuditError {
    AuditError::Read {
        path: path.into(),
        source,
    }
}

/// `<path>.broken-<ms>`, with `-<k>` added if that name is taken.
fn set_aside_name(path: &Path, now_ms: u64) -> PathBuf {
    let base = format!("{}.broken-{now_ms}", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut k = 1u32;
    while fs::symlink_metadata(&candidate).is_ok() {
        candidate = PathBuf::from(format!("{base}-{k}"));
        k += 1;
    }
    candidate
}

/// Makes a creation or rename in the directory durable. Best effort: a
/// directory that cannot be synced still holds the file.
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use twin_model::audit::{verify_bytes, AuditChain, BadReason, CommandDecision, Decision};
    use twin_model::Value;

    const GW: &str = "plant1-gw1";

    fn key() -> Arc<SigningKey> {
        Arc::new(SigningKey::from_seed(&[3u8; 32]).unwrap())
    }

    fn trust() -> TrustStore {
        let mut t = TrustStore::new();
        t.add(key().public_key());
        t
    }

    fn decision(id: &str) -> Event {
        Event::CommandDecision(CommandDecision {
            command_id: id.into(),
            operator: "alice".into(),
            tag: "tank1.setpoint".into(),
            value: Value::Float(2.5),
            decision: Decision::Deny,
            reason_code: Some("no_rule".into()),
            reason: "no rule permits this".into(),
            rule_id: None,
            token: format!("eyJhbGciOiJFZERTQSJ9.{id}.c2ln"),
            approval_tokens: vec![],
        })
    }

    fn no_auto_checkpoints() -> AuditOptions {
        AuditOptions {
            checkpoint_every_records: 1000,
            checkpoint_interval_ms: u64::MAX,
            ..AuditOptions::default()
        }
    }

    /// A closed log of 8 lines: started, checkpoint, d1, d2, d3, checkpoint
    /// (by hand), stopped, checkpoint.
    fn written_log(dir: &Path) -> (PathBuf, Vec<String>) {
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        for id in ["cmd-1", "cmd-2", "cmd-3"] {
            log.append(&decision(id)).unwrap();
        }
        log.checkpoint().unwrap();
        log.close("shutdown").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines = text.lines().map(String::from).collect();
        (path, lines)
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(path, text).unwrap();
    }

    fn checkpoint_event_line(
        prev_line: &str,
        n: u64,
        signer: &SigningKey,
        head: [u8; 32],
    ) -> String {
        let jws = twin_model::audit::sign_checkpoint(
            signer,
            &twin_model::audit::CheckpointClaims {
                n,
                head: b64url(&head),
                gateway_id: GW.into(),
            },
        );
        let mut chain = AuditChain::resume(n - 1, twin_model::jws::sha256(prev_line.as_bytes()));
        chain.append(&Event::Checkpoint(twin_model::audit::Checkpoint { jws }), 1)
    }

    #[test]
    fn a_log_written_closed_reopened_and_continued_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (path, lines) = written_log(dir.path());
        assert_eq!(lines.len(), 8);
        let mut log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        assert_eq!(log.opened().previous, Previous::Closed);
        assert_eq!(log.opened().lines[0].n, 9);
        let r = log.append(&decision("cmd-4")).unwrap();
        assert_eq!(r.n, 11);
        assert_eq!(
            fs::read_to_string(&path).unwrap().lines().last(),
            Some(r.line.as_str())
        );
        let closing = log.close("shutdown").unwrap();
        assert_eq!(
            closing.iter().map(|l| l.n).collect::<Vec<_>>(),
            vec![12, 13]
        );

        let report = verify_file(&path, &trust()).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!((report.records, report.checkpoints), (13, 5));
        assert!(report.closed);
        assert!(report.warnings().is_empty());
        assert_eq!(
            report.to_string(),
            "OK: 13 records, 5 checkpoints, last record n=13, gateway plant1-gw1, closed in order"
        );
    }

    #[test]
    fn a_log_left_open_by_a_crash_is_continued_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        log.append(&decision("cmd-1")).unwrap();
        log.append(&decision("cmd-2")).unwrap();
        drop(log); // no close: as after kill -9

        let report = verify_file(&path, &trust()).unwrap();
        assert!(report.is_ok());
        assert_eq!(report.unverified_tail, 2);
        assert!(!report.closed);

        let log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        assert_eq!(log.opened().previous, Previous::NotClosed);
        let started = parse_line(log.opened().lines[0].line.as_bytes()).unwrap();
        let Event::Started(s) = started.event else {
            panic!("first record at open is not `started`")
        };
        assert_eq!((s.previous, s.unverified_tail), (Previous::NotClosed, 2));
        log.close("shutdown").unwrap();
        assert!(verify_file(&path, &trust()).unwrap().is_ok());
    }

    #[test]
    fn each_tampering_of_the_file_is_named_by_verify_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, good) = written_log(dir.path());
        let other = SigningKey::from_seed(&[4u8; 32]).unwrap();
        type Tamper = Box<dyn Fn(&mut Vec<String>)>;
        // (what, tampering, expected line, expected reason)
        let cases: Vec<(&str, Tamper, u64, BadReason)> = vec![
            (
                "edit a field of line 4",
                Box::new(|l| l[3] = l[3].replace("no_rule", "permit")),
                5,
                BadReason::BadPrev,
            ),
            (
                "delete line 4",
                Box::new(|l| {
                    l.remove(3);
                }),
                4,
                BadReason::BadIndex,
            ),
            (
                "insert a forged line after line 3",
                Box::new(|l| {
                    let mut chain = AuditChain::resume(3, twin_model::jws::sha256(l[2].as_bytes()));
                    let forged = chain.append(&decision("cmd-forged"), 1);
                    l.insert(3, forged);
                }),
                5,
                BadReason::BadIndex,
            ),
            (
                "swap lines 3 and 4",
                Box::new(|l| l.swap(2, 3)),
                3,
                BadReason::BadIndex,
            ),
            (
                "checkpoint on line 6 signed by another key",
                Box::new(move |l| {
                    let head = twin_model::jws::sha256(l[4].as_bytes());
                    l[5] = checkpoint_event_line(&l[4], 6, &other, head);
                }),
                6,
                BadReason::BadCheckpoint,
            ),
            (
                "checkpoint on line 6 over another head",
                Box::new(|l| {
                    let head = twin_model::jws::sha256(b"not the chain");
                    l[5] = checkpoint_event_line(&l[4], 6, &key(), head);
                }),
                6,
                BadReason::BadCheckpoint,
            ),
        ];
        for (what, tamper, line, reason) in cases {
            let mut lines = good.clone();
            tamper(&mut lines);
            write_lines(&path, &lines);
            let report = verify_file(&path, &trust()).unwrap();
            let bad = report
                .first_bad
                .clone()
                .unwrap_or_else(|| panic!("{what}: not detected"));
            assert_eq!((bad.line, bad.reason), (line, reason), "{what}: {report}");
            assert!(
                report
                    .to_string()
                    .starts_with(&format!("FAILED at line {line} ")),
                "{what}: {report}"
            );
        }
    }

    #[test]
    fn a_file_cut_mid_line_is_truncated_and_at_a_line_boundary_is_an_unverified_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (path, good) = written_log(dir.path());
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 10]).unwrap();
        let report = verify_file(&path, &trust()).unwrap();
        let bad = report.first_bad.clone().unwrap();
        assert_eq!((bad.line, bad.reason), (8, BadReason::Truncated));

        write_lines(&path, &good[..5]);
        let report = verify_file(&path, &trust()).unwrap();
        assert!(report.is_ok());
        assert_eq!(report.unverified_tail, 3);
        let text = report.to_string();
        assert!(
            text.contains("warning: unverified tail: 3 records after the last checkpoint (n=2)"),
            "{text}"
        );
        assert!(text.contains("warning: missing final checkpoint"), "{text}");
    }

    #[test]
    fn a_broken_log_at_open_is_set_aside_and_a_new_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut lines) = written_log(dir.path());
        lines[3] = lines[3].replace("alice", "mallory");
        write_lines(&path, &lines);
        let tampered = fs::read(&path).unwrap();

        let log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        let (aside, bad) = log.opened().set_aside.clone().unwrap();
        assert_eq!((bad.line, bad.reason), (5, BadReason::BadPrev));
        let name = aside.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("audit.jsonl.broken-"), "{name}");
        assert_eq!(
            fs::read(&aside).unwrap(),
            tampered,
            "evidence kept unmodified"
        );

        let first = parse_line(log.opened().lines[0].line.as_bytes()).unwrap();
        assert_eq!(first.n, 1);
        let Event::Started(s) = first.event else {
            panic!("first record is not `started`")
        };
        assert_eq!(s.previous, Previous::SetAside);
        let s = s.set_aside.unwrap();
        assert_eq!(s.file, aside.display().to_string());
        assert_eq!((s.line, s.n, s.reason.as_str()), (5, Some(5), "bad_prev"));
        assert_eq!(s.last_good_n, 4);
        log.close("shutdown").unwrap();
        let report = verify_file(&path, &trust()).unwrap();
        assert!(report.is_ok() && report.closed, "{report}");
    }

    #[test]
    fn a_log_torn_by_a_crash_mid_write_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = written_log(dir.path());
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 10]).unwrap();
        let log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        let (_, bad) = log.opened().set_aside.clone().unwrap();
        assert_eq!(bad.reason, BadReason::Truncated);
    }

    #[test]
    fn append_returns_an_error_not_a_panic_when_the_disk_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        // Every write to /dev/full fails with ENOSPC.
        log.file = OpenOptions::new().append(true).open("/dev/full").unwrap();
        let err = log.append(&decision("cmd-1")).unwrap_err();
        match &err {
            AuditError::Write { n, source, .. } => {
                assert_eq!(*n, 3);
                assert_eq!(source.raw_os_error(), Some(28), "ENOSPC");
            }
            other => panic!("unexpected error {other:?}"),
        }
        // Failed closed: nothing more is accepted until reopened.
        let err = log.append(&decision("cmd-2")).unwrap_err();
        assert_eq!(err.code(), "failed");
        assert_eq!(log.checkpoint().unwrap_err().code(), "failed");
        assert_eq!(log.close("shutdown").unwrap_err().code(), "failed");
        // The real file still holds whole records only, and reopens.
        let log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        assert_eq!(log.opened().previous, Previous::NotClosed);
    }

    #[test]
    fn open_returns_an_error_where_the_log_cannot_be_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = AuditLog::open(dir.path(), key(), GW).unwrap_err();
        assert_eq!(err.code(), "not_a_file");
        assert!(dir.path().is_dir(), "a directory is never renamed aside");
        // Nothing can be created under /proc, not even by root.
        let err =
            AuditLog::open(Path::new("/proc/self/no-such-dir/audit.jsonl"), key(), GW).unwrap_err();
        assert_eq!(err.code(), "open");
        assert!(err
            .to_string()
            .starts_with("/proc/self/no-such-dir/audit.jsonl: cannot open"));
        // A device is refused before it is read or renamed.
        let err = AuditLog::open(Path::new("/dev/full"), key(), GW).unwrap_err();
        assert_eq!(err.code(), "not_a_file");
        assert!(Path::new("/dev/full").exists());
        // So is a symlink.
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(dir.path().join("target.jsonl"), &link).unwrap();
        assert_eq!(
            AuditLog::open(&link, key(), GW).unwrap_err().code(),
            "not_a_file"
        );
    }

    #[test]
    fn the_log_file_has_mode_0600_even_if_it_was_wider() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        AuditLog::open(&path, key(), GW)
            .unwrap()
            .close("x")
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        AuditLog::open(&path, key(), GW).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_checkpoint_is_written_before_the_record_after_every_n_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let options = AuditOptions {
            checkpoint_every_records: 3,
            ..no_auto_checkpoints()
        };
        // Lines 1-2: started, checkpoint.
        let mut log = AuditLog::open_with(&path, key(), GW, options).unwrap();
        let mut with_checkpoint = Vec::new();
        for i in 0..7 {
            let r = log.append(&decision(&format!("cmd-{i}"))).unwrap();
            if let Some(c) = &r.checkpoint {
                assert_eq!(c.n + 1, r.n);
                assert_eq!(
                    r.lines().collect::<Vec<_>>(),
                    vec![c.line.as_str(), r.line.as_str()]
                );
                with_checkpoint.push(c.n);
            }
        }
        assert_eq!(with_checkpoint, vec![6, 10]);
        let report = verify_file(&path, &trust()).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!((report.checkpoints, report.unverified_tail), (3, 1));
    }

    static CLOCK: AtomicU64 = AtomicU64::new(1_000_000);
    fn test_clock() -> u64 {
        CLOCK.load(Ordering::SeqCst)
    }

    #[test]
    fn a_checkpoint_is_written_when_the_interval_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let options = AuditOptions {
            checkpoint_every_records: 1000,
            checkpoint_interval_ms: 5_000,
            now_ms: test_clock,
            ..AuditOptions::default()
        };
        let mut log = AuditLog::open_with(&path, key(), GW, options).unwrap();
        CLOCK.fetch_add(6_000, Ordering::SeqCst);
        assert_eq!(
            log.checkpoint_if_due().unwrap(),
            None,
            "nothing new to sign"
        );
        log.append(&decision("cmd-1")).unwrap();
        assert_eq!(log.checkpoint_if_due().unwrap().map(|c| c.n), Some(4));
        log.append(&decision("cmd-2")).unwrap();
        assert_eq!(log.checkpoint_if_due().unwrap(), None, "interval not over");
        CLOCK.fetch_add(5_000, Ordering::SeqCst);
        let r = log.append(&decision("cmd-3")).unwrap();
        assert_eq!(r.checkpoint.map(|c| c.n), Some(6));
        assert!(verify_file(&path, &trust()).unwrap().is_ok());
    }

    #[test]
    fn a_record_too_large_or_unreadable_is_refused_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open_with(&path, key(), GW, no_auto_checkpoints()).unwrap();
        let mut big = decision("cmd-big");
        if let Event::CommandDecision(d) = &mut big {
            d.token = "x".repeat(MAX_LINE_BYTES);
        }
        assert_eq!(log.append(&big).unwrap_err().code(), "too_large");
        let mut nan = decision("cmd-nan");
        if let Event::CommandDecision(d) = &mut nan {
            d.value = Value::Float(f64::NAN);
        }
        assert_eq!(log.append(&nan).unwrap_err().code(), "invalid");
        assert_eq!(log.append(&decision("cmd-1")).unwrap().n, 3);
        assert_eq!(
            log.append(&Event::Checkpoint(twin_model::audit::Checkpoint {
                jws: "x".into()
            }))
            .unwrap_err()
            .code(),
            "checkpoint_by_hand"
        );
        log.close("shutdown").unwrap();
        let report = verify_bytes(&fs::read(&path).unwrap(), &trust());
        assert!(report.is_ok() && report.closed, "{report}");
    }
}
