//! Tests of the outbox: round trip, bounds and gap records, tampering and
//! truncation of the file, a model test over random operations with
//! crashes, and the group commits of the writer.
//!
//! How redb reacts to a file altered while closed (redb 4): a plain open
//! trusts a file that was shut down cleanly, so an altered page is read
//! back as it is (or, for a page redb interprets, may make it panic).
//! [`Outbox::open`] therefore opens with redb's integrity check, which
//! verifies the checksum of every page: a flipped byte in a live page, or a
//! file cut short, makes the whole file unreadable, and it is set aside. A
//! record altered with valid page checksums (a deliberate edit, or a record
//! copied to another position) gets past redb and is caught by the
//! record's own check: it is quarantined. Both paths are tested here.

use super::*;
use crate::config::{FullPolicy, OutboxConfig};
use crate::uplink::state::{self, ChainState, StateFile};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use twin_model::gap::reason;
use twin_model::{TrustStore, MAX_MESSAGE_BYTES, WIRE_VERSION};

const GATEWAY: &str = "gw-test-1";
const KEY_SEED: [u8; 32] = [7; 32];
const NOW: u64 = 1_700_000_000_000;

fn key() -> Arc<SigningKey> {
    Arc::new(SigningKey::from_seed(&KEY_SEED).expect("a 32-byte seed is a key"))
}

fn trust() -> TrustStore {
    let mut t = TrustStore::new();
    t.add(key().public_key());
    t
}

fn config(max_bytes: u64, full_policy: FullPolicy) -> OutboxConfig {
    OutboxConfig {
        max_bytes,
        full_policy,
        ..OutboxConfig::default()
    }
}

fn options(config: OutboxConfig, cipher: Option<Cipher>) -> OutboxOptions {
    OutboxOptions {
        config,
        cipher,
        key: key(),
        gateway_id: GATEWAY.into(),
    }
}

fn plain() -> OutboxOptions {
    options(OutboxConfig::default(), None)
}

fn open(dir: &Path, opts: OutboxOptions) -> (Outbox, OpenReport) {
    Outbox::open(dir, opts).expect("the outbox opens")
}

fn chain(seq: u64) -> ChainState {
    ChainState {
        seq,
        prev_hash: BatchHash([(seq % 251) as u8 + 1; 32]),
        twin_version: seq * 10,
    }
}

/// A compact-JWS-shaped body, unique per seq (so it can be found in the
/// file), `pad` bytes longer than the shortest.
fn jws(seq: u64, pad: usize) -> Vec<u8> {
    format!(
        "eyJhbGciOiJFZERTQSJ9.batch-{seq:08}-{}.c2lnbmF0dXJl",
        "p".repeat(pad)
    )
    .into_bytes()
}

fn rec(seq: u64, points: u32) -> NewRecord {
    NewRecord {
        seq,
        jws: jws(seq, 40),
        points,
        created_ms: NOW,
    }
}

/// Size of a stored plain record: header, body, check.
fn stored_len(r: &NewRecord) -> u64 {
    record::encode(&[0; 16], r.seq, r.created_ms, r.points, &r.jws, None).len() as u64
}

fn stored(r: &NewRecord) -> Stored {
    Stored {
        seq: r.seq,
        jws: r.jws.clone(),
        points: r.points,
    }
}

fn all_pending(o: &Outbox) -> Vec<Stored> {
    o.pending(0, usize::MAX).expect("pending reads")
}

fn seqs(v: &[Stored]) -> Vec<u64> {
    v.iter().map(|s| s.seq).collect()
}

/// The stored gap records, each verified with the gateway's public key
/// and parsed.
fn verified_gaps(o: &Outbox) -> Vec<GapRecord> {
    let trust = trust();
    o.gaps(usize::MAX)
        .expect("gaps read")
        .into_iter()
        .map(|(id, jws)| {
            let v = trust
                .verify_compact(&jws, GAP_TYP, MAX_MESSAGE_BYTES)
                .expect("a gap record is signed by the gateway key");
            assert_eq!(v.header.typ, GAP_TYP);
            let g: GapRecord =
                serde_json::from_slice(&v.payload).expect("a gap record parses as GapRecord");
            assert_eq!(g.gap_id, id, "stored under its own id");
            assert_eq!(g.gateway_id, GATEWAY);
            assert_eq!(g.v, WIRE_VERSION);
            g
        })
        .collect()
}

/// (seqs, points, reason) of a gap record, for comparisons.
fn summary(g: &GapRecord) -> (Vec<[u64; 2]>, Option<u64>, &str) {
    (g.seqs.clone(), g.points, g.reason.as_str())
}

/// Appends `n` records one commit each (points = seq), writes the
/// checkpoint, and closes the outbox.
fn fill(dir: &Path, opts: OutboxOptions, n: u64) -> Vec<NewRecord> {
    let (o, _) = open(dir, opts);
    let records: Vec<NewRecord> = (1..=n).map(|s| rec(s, s as u32)).collect();
    for r in &records {
        o.append(std::slice::from_ref(r), chain(r.seq), &[], NOW)
            .expect("append");
    }
    o.checkpoint().expect("checkpoint");
    records
}

fn positions(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Asserts that `open` found the outbox lost: the old file (if any) set
/// aside, a new empty outbox, the chain `LOST_OUTBOX_SEQ_JUMP` past the
/// checkpoint `cp`, and one signed `outbox_lost` gap record for the jump.
fn assert_lost(o: &Outbox, report: &OpenReport, cp: ChainState, expect_aside: bool) {
    let jumped = ChainState {
        seq: cp.seq + LOST_OUTBOX_SEQ_JUMP,
        prev_hash: BatchHash::GENESIS,
        twin_version: cp.twin_version,
    };
    assert_eq!(report.chain, jumped);
    assert_eq!(o.chain().unwrap(), jumped);
    assert_eq!(report.records, 0);
    assert_eq!(report.set_aside.is_some(), expect_aside, "{report:?}");
    if let Some(aside) = &report.set_aside {
        assert!(aside.exists(), "the unreadable file is kept for inspection");
        let name = aside.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("outbox.redb.corrupt-"), "{name}");
    }
    assert!(
        all_pending(o).is_empty(),
        "nothing of the old file is published"
    );
    // The run starts at the lowest batch the checkpoint saw unacknowledged
    // (everything the lost file may have held), else just past it.
    let lost_from = StateFile::new(&o.dir)
        .load_first_unacked()
        .unwrap()
        .map_or(cp.seq + 1, |f| f.min(cp.seq + 1));
    let gaps = verified_gaps(o);
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(
        summary(&gaps[0]),
        (
            vec![[lost_from, cp.seq + LOST_OUTBOX_SEQ_JUMP]],
            None,
            reason::OUTBOX_LOST
        )
    );
}

/// Asserts that a reopen after a loss keeps the jumped chain and does not
/// jump again.
fn assert_reopen_keeps(dir: &Path, cp: ChainState) {
    let (o, report) = open(dir, plain());
    assert_eq!(report.chain.seq, cp.seq + LOST_OUTBOX_SEQ_JUMP);
    assert_eq!(report.set_aside, None);
    assert_eq!(verified_gaps(&o).len(), 1, "no second gap record");
}

// ---------------------------------------------------------------------------
// 1. Round trip

#[test]
fn appended_records_come_back_in_seq_order_until_acknowledged_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (o, report) = open(dir.path(), plain());
    assert_eq!(
        report,
        OpenReport {
            chain: ChainState::GENESIS,
            records: 0,
            set_aside: None
        }
    );
    assert_eq!(o.chain().unwrap(), ChainState::GENESIS);
    assert!(o.is_empty());

    let first: Vec<NewRecord> = (1..=3).map(|s| rec(s, 10 + s as u32)).collect();
    let second = vec![
        NewRecord {
            jws: jws(4, 0),
            ..rec(4, 0)
        },
        NewRecord {
            jws: jws(5, 900),
            ..rec(5, 70_000)
        },
    ];
    o.append(&first, chain(3), &[], NOW).unwrap();
    assert_eq!(o.chain().unwrap(), chain(3));
    o.append(&second, chain(5), &[], NOW).unwrap();
    assert_eq!(o.chain().unwrap(), chain(5));

    let all: Vec<NewRecord> = first.iter().chain(&second).cloned().collect();
    let size = |rs: &[&NewRecord]| rs.iter().map(|r| stored_len(r)).sum::<u64>();
    assert_eq!(all_pending(&o), all.iter().map(stored).collect::<Vec<_>>());
    assert_eq!(seqs(&o.pending(3, 100).unwrap()), [3, 4, 5]);
    assert_eq!(seqs(&o.pending(0, 2).unwrap()), [1, 2]);
    assert_eq!(seqs(&o.pending(6, 100).unwrap()), Vec::<u64>::new());
    assert_eq!(o.stats.records.load(Ordering::Relaxed), 5);
    assert_eq!(
        o.stats.bytes.load(Ordering::Relaxed),
        size(&all.iter().collect::<Vec<_>>())
    );
    assert_eq!(o.first_seq().unwrap(), Some(1));

    o.ack(&[Item::Batch(2), Item::Batch(4), Item::Batch(99)])
        .unwrap();
    let left = [&all[0], &all[2], &all[4]];
    assert_eq!(
        all_pending(&o),
        left.iter().map(|r| stored(r)).collect::<Vec<_>>()
    );
    assert_eq!(o.len(), 3);
    assert_eq!(o.stats.bytes.load(Ordering::Relaxed), size(&left));
    o.ack(&[Item::Batch(1)]).unwrap();
    assert_eq!(o.first_seq().unwrap(), Some(3));
    assert!(verified_gaps(&o).is_empty(), "nothing was dropped");
    assert_eq!(o.stats.commits.load(Ordering::Relaxed), 2);
    drop(o);

    let (o, report) = open(dir.path(), plain());
    assert_eq!(
        report,
        OpenReport {
            chain: chain(5),
            records: 2,
            set_aside: None
        }
    );
    assert_eq!(o.chain().unwrap(), chain(5));
    assert_eq!(seqs(&all_pending(&o)), [3, 5]);
    assert_eq!(o.stats.records.load(Ordering::Relaxed), 2);
    assert_eq!(
        o.stats.bytes.load(Ordering::Relaxed),
        size(&[&all[2], &all[4]])
    );
    assert!(verified_gaps(&o).is_empty());
}

// ---------------------------------------------------------------------------
// 2. Bounds and gap records

#[test]
fn drop_oldest_keeps_the_newest_and_accounts_each_drop_in_one_signed_gap_record() {
    let dir = tempfile::tempdir().unwrap();
    let size = stored_len(&rec(1, 1));
    let (o, _) = open(
        dir.path(),
        options(config(3 * size, FullPolicy::DropOldest), None),
    );
    // Exactly at the bound: nothing is dropped.
    o.append(&[rec(1, 11), rec(2, 12), rec(3, 13)], chain(3), &[], NOW)
        .unwrap();
    assert!(verified_gaps(&o).is_empty());
    o.append(&[rec(4, 14), rec(5, 15)], chain(5), &[], NOW)
        .unwrap();
    assert_eq!(seqs(&all_pending(&o)), [3, 4, 5]);
    let gaps = verified_gaps(&o);
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        summary(&gaps[0]),
        (vec![[1, 2]], Some(11 + 12), reason::OUTBOX_FULL)
    );

    // Non-adjacent drops are named as separate runs of one record.
    o.ack(&[Item::Batch(4)]).unwrap();
    o.append(&[rec(6, 16), rec(7, 17), rec(8, 18)], chain(8), &[], NOW)
        .unwrap();
    assert_eq!(seqs(&all_pending(&o)), [6, 7, 8]);
    let gaps = verified_gaps(&o);
    assert_eq!(gaps.len(), 2);
    assert_eq!(gaps[0].gap_id, 1);
    assert_eq!(gaps[1].gap_id, 2);
    assert_eq!(
        summary(&gaps[1]),
        (vec![[3, 3], [5, 5]], Some(13 + 15), reason::OUTBOX_FULL)
    );
    assert_eq!(o.stats.bytes.load(Ordering::Relaxed), 3 * size);
    assert_eq!(o.stats.dropped_batches.load(Ordering::Relaxed), 4);
    assert_eq!(
        o.stats.dropped_points.load(Ordering::Relaxed),
        11 + 12 + 13 + 15
    );
    assert_eq!(o.chain().unwrap(), chain(8));

    // A record larger than the whole bound is dropped itself.
    let big = NewRecord {
        jws: jws(9, 4 * size as usize),
        ..rec(9, 19)
    };
    o.append(&[big], chain(9), &[], NOW).unwrap();
    assert_eq!(seqs(&all_pending(&o)), Vec::<u64>::new());
    let gaps = verified_gaps(&o);
    assert_eq!(
        summary(&gaps[2]),
        (vec![[6, 9]], Some(16 + 17 + 18 + 19), reason::OUTBOX_FULL)
    );
    assert_eq!(o.stats.bytes.load(Ordering::Relaxed), 0);

    // Acknowledged gap records go; the others stay.
    o.ack(&[Item::Gap(1), Item::Gap(3)]).unwrap();
    let ids: Vec<u64> = verified_gaps(&o).iter().map(|g| g.gap_id).collect();
    assert_eq!(ids, [2]);
}

#[test]
fn drop_newest_keeps_the_oldest_and_accounts_the_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let size = stored_len(&rec(1, 1));
    let (o, _) = open(
        dir.path(),
        options(config(3 * size, FullPolicy::DropNewest), None),
    );
    o.append(&[rec(1, 1), rec(2, 2)], chain(2), &[], NOW)
        .unwrap();
    o.append(&[rec(3, 3), rec(4, 4), rec(5, 5)], chain(5), &[], NOW)
        .unwrap();
    assert_eq!(seqs(&all_pending(&o)), [1, 2, 3]);
    let gaps = verified_gaps(&o);
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        summary(&gaps[0]),
        (vec![[4, 5]], Some(4 + 5), reason::OUTBOX_FULL)
    );
    // The dropped batches were signed: the chain moves past them.
    assert_eq!(o.chain().unwrap(), chain(5));
    assert_eq!(o.stats.bytes.load(Ordering::Relaxed), 3 * size);

    // Room made by an acknowledgement is used again.
    o.ack(&[Item::Batch(1)]).unwrap();
    o.append(&[rec(6, 6), rec(7, 7)], chain(7), &[], NOW)
        .unwrap();
    assert_eq!(seqs(&all_pending(&o)), [2, 3, 6]);
    assert_eq!(
        summary(&verified_gaps(&o)[1]),
        (vec![[7, 7]], Some(7), reason::OUTBOX_FULL)
    );
}

#[test]
fn records_past_max_age_are_dropped_and_failed_writes_are_accounted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        max_age: Duration::from_secs(60),
        ..OutboxConfig::default()
    };
    let (o, _) = open(dir.path(), options(cfg, None));
    let at = |seq, points, created_ms| NewRecord {
        created_ms,
        ..rec(seq, points)
    };
    o.append(&[at(1, 5, 1_000), at(2, 6, 2_000)], chain(2), &[], 2_000)
        .unwrap();
    // created_ms + max_age == now: still kept (only strictly older goes).
    o.append(&[at(3, 7, 61_000)], chain(3), &[], 61_000)
        .unwrap();
    assert_eq!(seqs(&all_pending(&o)), [1, 2, 3]);
    assert!(verified_gaps(&o).is_empty());

    // Batches 4 and 5 could not be stored earlier; they are named with the
    // next commit that succeeds, in the same transaction.
    o.append(&[at(6, 8, 62_500)], chain(6), &[(4, 40), (5, 50)], 62_500)
        .unwrap();
    assert_eq!(seqs(&all_pending(&o)), [3, 6]);
    let gaps = verified_gaps(&o);
    assert_eq!(gaps.len(), 2);
    assert_eq!(
        summary(&gaps[0]),
        (vec![[1, 2]], Some(5 + 6), reason::MAX_AGE)
    );
    assert_eq!(
        summary(&gaps[1]),
        (vec![[4, 5]], Some(40 + 50), reason::STORAGE_ERROR)
    );
    assert_eq!(
        o.stats.bytes.load(Ordering::Relaxed),
        stored_len(&at(3, 7, 61_000)) + stored_len(&at(6, 8, 62_500))
    );
}

#[test]
fn gap_records_are_never_dropped_by_the_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let size = stored_len(&rec(1, 1));
    let (o, _) = open(
        dir.path(),
        options(config(size, FullPolicy::DropOldest), None),
    );
    for s in 1..=30 {
        o.append(&[rec(s, 1)], chain(s), &[], NOW).unwrap();
    }
    assert_eq!(seqs(&all_pending(&o)), [30]);
    let gaps = verified_gaps(&o);
    assert_eq!(gaps.len(), 29, "one per dropping append, all kept");
    for (i, g) in gaps.iter().enumerate() {
        let s = i as u64 + 1;
        assert_eq!(summary(g), (vec![[s, s]], Some(1), reason::OUTBOX_FULL));
    }
    assert_eq!(
        o.stats.bytes.load(Ordering::Relaxed),
        size,
        "gaps are not records"
    );
    let ids: Vec<Item> = gaps.iter().map(|g| Item::Gap(g.gap_id)).collect();
    o.ack(&ids).unwrap();
    assert!(o.gaps(usize::MAX).unwrap().is_empty());
    drop(o);
    let (o, _) = open(dir.path(), plain());
    assert!(
        o.gaps(usize::MAX).unwrap().is_empty(),
        "acks of gaps persist"
    );
}

// ---------------------------------------------------------------------------
// 3. Tampering

/// Flips the last byte of every copy of `needle` in the closed database
/// file (copy-on-write may leave older copies in freed pages). Returns how
/// many copies there were.
fn flip_in_file(dir: &Path, needle: &[u8]) -> usize {
    let path = db_path(dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let hits = positions(&bytes, needle);
    for &h in &hits {
        bytes[h + needle.len() - 1] ^= 0x01;
    }
    std::fs::write(&path, &bytes).unwrap();
    hits.len()
}

/// Rewrites stored values through redb itself, so page checksums stay
/// valid: what a deliberate edit of the file would look like.
fn edit_records(dir: &Path, edit: impl FnOnce(&mut redb::Table<'_, u64, &'static [u8]>)) {
    let db = Database::create(db_path(dir)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(RECORDS).unwrap();
        edit(&mut t);
    }
    txn.commit().unwrap();
}

fn value(t: &redb::Table<'_, u64, &'static [u8]>, seq: u64) -> Vec<u8> {
    t.get(seq).unwrap().expect("stored").value().to_vec()
}

#[test]
fn a_byte_flipped_in_the_file_is_caught_by_the_page_checksums_and_the_outbox_is_set_aside() {
    for cipher in [None, Some(Cipher::new(&[3; 32]))] {
        let encrypted = cipher.is_some();
        let dir = tempfile::tempdir().unwrap();
        let records = fill(dir.path(), options(OutboxConfig::default(), cipher), 5);
        let cp = StateFile::new(dir.path()).load().unwrap();
        assert_eq!(cp, chain(5));
        let file = std::fs::read(db_path(dir.path())).unwrap();
        let needle = if encrypted {
            // The JWS text is not in the file; flip the ciphertext, found
            // by the header that precedes it (created_ms, points, length).
            let body = &records[2].jws;
            for r in &records {
                assert!(positions(&file, &r.jws).is_empty(), "encrypted at rest");
            }
            let mut h = NOW.to_be_bytes().to_vec();
            h.extend_from_slice(&3u32.to_be_bytes());
            h.extend_from_slice(&(body.len() as u32).to_be_bytes());
            let at = positions(&file, &h);
            assert!(!at.is_empty());
            // Header tail and nonce, up to the 16th ciphertext byte.
            file[at[0]..at[0] + h.len() + 12 + 16].to_vec()
        } else {
            records[2].jws.clone()
        };
        assert!(flip_in_file(dir.path(), &needle) >= 1);

        let (o, report) = open(dir.path(), plain_or(encrypted));
        assert_lost(&o, &report, cp, true);
        assert!(o.quarantined().unwrap().is_empty());
        drop(o);
        assert_reopen_keeps_with(dir.path(), cp, encrypted);
    }
}

fn plain_or(encrypted: bool) -> OutboxOptions {
    options(
        OutboxConfig::default(),
        encrypted.then(|| Cipher::new(&[3; 32])),
    )
}

fn assert_reopen_keeps_with(dir: &Path, cp: ChainState, encrypted: bool) {
    if encrypted {
        let (o, report) = open(dir, plain_or(true));
        assert_eq!(report.chain.seq, cp.seq + LOST_OUTBOX_SEQ_JUMP);
        assert_eq!(report.set_aside, None);
        assert_eq!(verified_gaps(&o).len(), 1);
    } else {
        assert_reopen_keeps(dir, cp);
    }
}

#[test]
fn a_record_altered_with_valid_page_checksums_is_quarantined_and_never_published() {
    for encrypted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let records = fill(dir.path(), plain_or(encrypted), 6);
        edit_records(dir.path(), |t| {
            // A flipped byte in the body (the JWS, or its ciphertext).
            let mut v = value(t, 2);
            let i = v.len() - 30;
            v[i] ^= 0x01;
            t.insert(2, &v[..]).unwrap();
            // An intact record copied over another position.
            let v4 = value(t, 4);
            t.insert(5, &v4[..]).unwrap();
        });
        let raw2_altered = {
            let db = Database::create(db_path(dir.path())).unwrap();
            let r = db.begin_read().unwrap();
            let t = r.open_table(RECORDS).unwrap();
            t.get(2).unwrap().unwrap().value().to_vec()
        };

        let (o, report) = open(dir.path(), plain_or(encrypted));
        assert_eq!(report.set_aside, None, "redb sees valid pages");
        assert_eq!(report.records, 6);
        let expect: Vec<Stored> = [0, 2, 3, 5].iter().map(|&i| stored(&records[i])).collect();
        assert_eq!(all_pending(&o), expect, "the others still come back");
        let q = o.quarantined().unwrap();
        assert_eq!(q.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 5]);
        assert_eq!(q[0].1, raw2_altered, "kept as found, for inspection");
        let gaps = verified_gaps(&o);
        assert_eq!(gaps.len(), 1);
        assert_eq!(
            summary(&gaps[0]),
            (vec![[2, 2], [5, 5]], None, reason::QUARANTINED)
        );
        assert_eq!(o.stats.quarantined.load(Ordering::Relaxed), 2);
        assert_eq!(o.stats.records.load(Ordering::Relaxed), 4);
        let size = if encrypted {
            // nonce + tag instead of the check
            |r: &NewRecord| stored_len(r) + 12
        } else {
            |r: &NewRecord| stored_len(r)
        };
        assert_eq!(
            o.stats.bytes.load(Ordering::Relaxed),
            [0, 2, 3, 5].iter().map(|&i| size(&records[i])).sum::<u64>()
        );
        // Read again: nothing more is quarantined, no second gap record.
        assert_eq!(all_pending(&o), expect);
        assert_eq!(verified_gaps(&o).len(), 1);
        drop(o);
        let (o, report) = open(dir.path(), plain_or(encrypted));
        assert_eq!(report.records, 4);
        assert_eq!(all_pending(&o), expect);
        assert_eq!(o.chain().unwrap(), chain(6));
    }
}

#[test]
fn encrypted_records_do_not_show_the_jws_in_the_file_and_plain_ones_do() {
    for encrypted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let records = fill(dir.path(), plain_or(encrypted), 3);
        let file = std::fs::read(db_path(dir.path())).unwrap();
        for r in &records {
            assert_eq!(
                positions(&file, &r.jws).is_empty(),
                encrypted,
                "seq {} encrypted={encrypted}",
                r.seq
            );
        }
        // Opening with the other mode publishes nothing: every record
        // fails its check and is accounted.
        let (o, _) = open(dir.path(), plain_or(!encrypted));
        assert!(all_pending(&o).is_empty());
        assert_eq!(
            summary(&verified_gaps(&o)[0]),
            (vec![[1, 3]], None, reason::QUARANTINED)
        );
    }
}

#[test]
fn a_byte_altered_anywhere_in_the_file_is_detected_or_harmless_and_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let records = fill(dir.path(), plain(), 20);
    let cp = chain(20);
    let original = std::fs::read(db_path(dir.path())).unwrap();
    let expect: Vec<Stored> = records.iter().map(stored).collect();
    let (mut harmless, mut set_aside) = (0, 0);
    // A prime step reaches every kind of page and every offset within one.
    for at in (0..original.len()).step_by(1021) {
        let d = tempfile::tempdir().unwrap();
        let mut bytes = original.clone();
        bytes[at] ^= 0x10;
        std::fs::write(db_path(d.path()), &bytes).unwrap();
        StateFile::new(d.path()).save(&cp).unwrap();
        let (o, report) = Outbox::open(d.path(), plain())
            .unwrap_or_else(|e| panic!("byte {at}: open failed: {e}"));
        if report.set_aside.is_some() {
            assert_lost(&o, &report, cp, true);
            set_aside += 1;
        } else {
            // An unused byte: the outbox is whole.
            assert_eq!(report.chain, cp, "byte {at}");
            assert_eq!(all_pending(&o), expect, "byte {at}");
            harmless += 1;
        }
    }
    assert!(harmless > 0 && set_aside > 0, "{harmless} {set_aside}");
}

// ---------------------------------------------------------------------------
// 4. Truncation and deletion

#[test]
fn a_file_cut_short_is_set_aside_and_the_chain_jumps_past_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), plain(), 8);
    let original = std::fs::read(db_path(dir.path())).unwrap();
    let cp = chain(8);
    // Half, one page, shorter than redb's header, shorter than its magic
    // number, one byte short.
    for len in [original.len() / 2, 4096, 100, 9, 5, original.len() - 1] {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(db_path(d.path()), &original[..len]).unwrap();
        StateFile::new(d.path()).save(&cp).unwrap();
        let (o, report) = Outbox::open(d.path(), plain())
            .unwrap_or_else(|e| panic!("cut to {len}: open failed: {e}"));
        assert_lost(&o, &report, cp, true);
        let aside = report.set_aside.clone().unwrap();
        assert_eq!(std::fs::metadata(&aside).unwrap().len(), len as u64);
        // The new outbox works and continues the chain.
        let next = cp.seq + LOST_OUTBOX_SEQ_JUMP + 1;
        o.append(&[rec(next, 1)], chain(next), &[], NOW).unwrap();
        assert_eq!(seqs(&all_pending(&o)), [next]);
        drop(o);
        let (o, report) = open(d.path(), plain());
        assert_eq!(report.chain, chain(next));
        assert_eq!(report.set_aside, None);
        assert_eq!(verified_gaps(&o).len(), 1);
    }
}

#[test]
fn a_file_cut_to_zero_bytes_is_a_new_database_and_the_chain_still_jumps() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), plain(), 4);
    std::fs::write(db_path(dir.path()), b"").unwrap();
    // redb initializes an empty file as a new database: nothing to set
    // aside, but the checkpoint shows that an outbox existed.
    let (o, report) = open(dir.path(), plain());
    assert_lost(&o, &report, chain(4), false);
    drop(o);
    assert_reopen_keeps(dir.path(), chain(4));
}

#[test]
fn a_deleted_outbox_with_a_checkpoint_makes_the_chain_jump() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), plain(), 4);
    std::fs::remove_file(db_path(dir.path())).unwrap();
    let (o, report) = open(dir.path(), plain());
    assert_lost(&o, &report, chain(4), false);
    drop(o);
    assert_reopen_keeps(dir.path(), chain(4));
}

#[test]
fn a_first_start_without_a_checkpoint_begins_at_genesis_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let (o, report) = open(dir.path(), plain());
    assert_eq!(report.chain, ChainState::GENESIS);
    assert!(o.gaps(usize::MAX).unwrap().is_empty());
    assert!(!dir.path().join(state::FILE_NAME).exists());
}

// ---------------------------------------------------------------------------
// 5. Model test

#[derive(Debug, Clone)]
enum Op {
    /// Records to append: (points, body padding) each.
    Append(Vec<(u32, usize)>),
    /// Acknowledge the pending records and gap records these pick.
    Ack(Vec<prop::sample::Index>),
    /// Drop the outbox and open it again from the same directory.
    Crash,
    /// Read from a seq picked among the pending ones (or past them).
    Pending(prop::sample::Index, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0u32..1000, 0usize..200), 1..5).prop_map(Op::Append),
        3 => prop::collection::vec(any::<prop::sample::Index>(), 0..4).prop_map(Op::Ack),
        1 => Just(Op::Crash),
        2 => (any::<prop::sample::Index>(), 1usize..6).prop_map(|(i, n)| Op::Pending(i, n)),
    ]
}

/// What the outbox should hold.
/// A gap record in the model: (seqs, points, reason).
type ModelGap = (Vec<[u64; 2]>, Option<u64>, String);

#[derive(Default)]
struct Model {
    records: BTreeMap<u64, (Vec<u8>, u32)>,
    sizes: BTreeMap<u64, u64>,
    /// Unacknowledged gap records: id -> (seqs, points, reason).
    gaps: BTreeMap<u64, ModelGap>,
    next_gap: u64,
    acked: BTreeSet<u64>,
    /// Every seq ever named by a gap record.
    accounted: BTreeSet<u64>,
    seq: u64,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.sizes.values().sum()
    }

    fn gap(&mut self, dropped: &[(u64, u32)]) {
        if dropped.is_empty() {
            return;
        }
        self.next_gap += 1;
        self.accounted.extend(dropped.iter().map(|(s, _)| *s));
        self.gaps.insert(
            self.next_gap,
            (
                gap::runs(dropped.iter().map(|(s, _)| *s)),
                Some(dropped.iter().map(|(_, p)| u64::from(*p)).sum()),
                reason::OUTBOX_FULL.into(),
            ),
        );
    }

    fn append(&mut self, new: &[NewRecord], cfg: &OutboxConfig) {
        let mut dropped_new = Vec::new();
        for r in new {
            let len = stored_len(r);
            if cfg.full_policy == FullPolicy::DropNewest && self.bytes() + len > cfg.max_bytes {
                dropped_new.push((r.seq, r.points));
                continue;
            }
            self.records.insert(r.seq, (r.jws.clone(), r.points));
            self.sizes.insert(r.seq, len);
        }
        let mut dropped_old = Vec::new();
        while self.bytes() > cfg.max_bytes {
            let (seq, (_, points)) = self.records.pop_first().expect("bytes > 0");
            self.sizes.remove(&seq);
            dropped_old.push((seq, points));
        }
        self.gap(&dropped_new);
        self.gap(&dropped_old);
        self.seq = new.last().map(|r| r.seq).unwrap_or(self.seq);
    }
}

fn check(o: &Outbox, m: &Model, last_chain: &mut u64) -> Result<(), TestCaseError> {
    let expect: Vec<Stored> = m
        .records
        .iter()
        .map(|(&seq, (jws, points))| Stored {
            seq,
            jws: jws.clone(),
            points: *points,
        })
        .collect();
    // Exactly the unacknowledged records: an in-process drop closes redb
    // cleanly, which makes the non-durable acknowledgements durable, so
    // none comes back. (On a power loss one might: at-least-once.)
    prop_assert_eq!(all_pending(o), expect);
    let gaps: BTreeMap<u64, ModelGap> = verified_gaps(o)
        .into_iter()
        .map(|g| (g.gap_id, (g.seqs, g.points, g.reason)))
        .collect();
    prop_assert_eq!(&gaps, &m.gaps);
    let c = o.chain().unwrap();
    prop_assert!(c.seq >= *last_chain, "the chain went back");
    prop_assert_eq!(
        c,
        if m.seq == 0 {
            ChainState::GENESIS
        } else {
            chain(m.seq)
        }
    );
    *last_chain = c.seq;
    prop_assert_eq!(o.stats.bytes.load(Ordering::Relaxed), m.bytes());
    prop_assert_eq!(
        o.stats.records.load(Ordering::Relaxed),
        m.records.len() as u64
    );
    for seq in 1..=c.seq {
        let places = [
            m.acked.contains(&seq),
            m.records.contains_key(&seq),
            m.accounted.contains(&seq),
        ];
        prop_assert_eq!(
            places.iter().filter(|p| **p).count(),
            1,
            "seq {} is in {:?} (acked, pending, gap)",
            seq,
            places
        );
    }
    Ok(())
}

fn run_model(cfg: OutboxConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut o = open(dir.path(), options(cfg.clone(), None)).0;
    let mut m = Model::default();
    let mut last_chain = 0;
    for op in ops {
        match op {
            Op::Append(new) => {
                let new: Vec<NewRecord> = new
                    .iter()
                    .enumerate()
                    .map(|(i, &(points, pad))| {
                        let seq = m.seq + 1 + i as u64;
                        NewRecord {
                            seq,
                            jws: jws(seq, pad),
                            points,
                            created_ms: NOW,
                        }
                    })
                    .collect();
                let to = new.last().expect("at least one").seq;
                o.append(&new, chain(to), &[], NOW).unwrap();
                m.append(&new, &cfg);
            }
            Op::Ack(picks) => {
                let recs: Vec<u64> = m.records.keys().copied().collect();
                let gaps: Vec<u64> = m.gaps.keys().copied().collect();
                let mut items = Vec::new();
                for (n, pick) in picks.iter().enumerate() {
                    // Alternate between records and gap records.
                    if n % 2 == 0 && !recs.is_empty() {
                        let seq = recs[pick.index(recs.len())];
                        items.push(Item::Batch(seq));
                        if m.records.remove(&seq).is_some() {
                            m.sizes.remove(&seq);
                            m.acked.insert(seq);
                        }
                    } else if !gaps.is_empty() {
                        let id = gaps[pick.index(gaps.len())];
                        items.push(Item::Gap(id));
                        m.gaps.remove(&id);
                    }
                }
                o.ack(&items).unwrap();
            }
            Op::Crash => {
                drop(o);
                let (reopened, report) = open(dir.path(), options(cfg.clone(), None));
                prop_assert_eq!(report.records, m.records.len() as u64);
                prop_assert_eq!(report.set_aside, None);
                o = reopened;
            }
            Op::Pending(pick, max) => {
                let keys: Vec<u64> = m.records.keys().copied().collect();
                let from = if keys.is_empty() {
                    m.seq + 1
                } else {
                    // One past the last seq is a valid start too.
                    let i = pick.index(keys.len() + 1);
                    keys.get(i).copied().unwrap_or(m.seq + 1)
                };
                let got = seqs(&o.pending(from, max).unwrap());
                let want: Vec<u64> = m.records.range(from..).map(|(s, _)| *s).take(max).collect();
                prop_assert_eq!(got, want);
            }
        }
        check(&o, &m, &mut last_chain)?;
    }
    Ok(())
}

fn model_config() -> impl Strategy<Value = OutboxConfig> {
    prop_oneof![
        2 => Just(config(64 * 1024 * 1024, FullPolicy::DropOldest)),
        1 => (300u64..1500).prop_map(|b| config(b, FullPolicy::DropOldest)),
        1 => (300u64..1500).prop_map(|b| config(b, FullPolicy::DropNewest)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_appends_acks_crashes_and_reads_match_a_simple_model(
        cfg in model_config(),
        ops in prop::collection::vec(op(), 1..24),
    ) {
        run_model(cfg, ops)?;
    }
}

// ---------------------------------------------------------------------------
// 6. Group commits

/// A record created now: the writer applies the age bound with the wall
/// clock.
fn fresh(seq: u64, points: u32) -> NewRecord {
    NewRecord {
        created_ms: crate::clock::now_ms(),
        ..rec(seq, points)
    }
}

#[test]
fn the_writer_stores_many_queued_jobs_in_few_commits_and_checkpoints_at_the_end() {
    use crate::uplink::writer::{self, WriteJob};
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(open(dir.path(), plain()).0);
    let wake = Arc::new(tokio::sync::Notify::new());
    const JOBS: u64 = 600;
    let (tx, rx) = tokio::sync::mpsc::channel(JOBS as usize);
    // All jobs are queued before the writer starts: it must take as many
    // as it may (256) per commit.
    for seq in 1..=JOBS {
        tx.try_send(WriteJob {
            record: fresh(seq, 2),
            chain: chain(seq),
        })
        .expect("the channel has room");
    }
    drop(tx);
    let writer = {
        let (outbox, wake) = (outbox.clone(), wake.clone());
        std::thread::spawn(move || writer::run(Some(outbox), rx, wake))
    };
    writer
        .join()
        .expect("the writer ends when the channel closes");

    let commits = outbox.stats.commits.load(Ordering::Relaxed);
    assert_eq!(commits, JOBS.div_ceil(256), "group commits");
    assert_eq!(outbox.len(), JOBS);
    assert_eq!(seqs(&all_pending(&outbox)), (1..=JOBS).collect::<Vec<_>>());
    assert_eq!(outbox.chain().unwrap(), chain(JOBS));
    assert_eq!(StateFile::new(dir.path()).load().unwrap(), chain(JOBS));
    // The MQTT link was woken (the permit is stored).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(1), wake.notified())
            .await
            .expect("woken after a commit")
    });
}

#[test]
fn the_writer_groups_jobs_sent_while_it_commits() {
    use crate::uplink::writer::{self, WriteJob};
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(open(dir.path(), plain()).0);
    const JOBS: u64 = 2000;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let writer = {
        let outbox = outbox.clone();
        std::thread::spawn(move || {
            writer::run(Some(outbox), rx, Arc::new(tokio::sync::Notify::new()))
        })
    };
    for seq in 1..=JOBS {
        tx.blocking_send(WriteJob {
            record: fresh(seq, 1),
            chain: chain(seq),
        })
        .unwrap();
    }
    drop(tx);
    writer.join().unwrap();
    let commits = outbox.stats.commits.load(Ordering::Relaxed);
    // Each commit is an fsync; while one runs the sender fills the channel
    // (64), so a commit carries many jobs.
    assert!(commits <= JOBS / 4, "{commits} commits for {JOBS} jobs");
    assert_eq!(outbox.len(), JOBS);
    assert_eq!(outbox.chain().unwrap(), chain(JOBS));
    assert!(dir.path().join(state::FILE_NAME).exists());
}
