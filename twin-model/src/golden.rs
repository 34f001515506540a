//! Golden test vectors: a fixed key and fixed inputs whose signed bytes are
//! exact. They are written to `docs/golden/` and quoted in
//! `docs/wire-format.md`; the tests below fail if the code and the files
//! ever disagree. Run `UPDATE_GOLDEN=1 cargo test -p twin-model golden` to
//! rewrite the files after a deliberate wire change.

use crate::batch::{sign_batch, BatchHash, BatchPayload};
use crate::jws::SigningKey;
use crate::sample::{reason, Quality, Sample, Value};
use crate::status::{State, Status, STATUS_TYP};
use crate::twin::{ReportedTwin, REPORTED_TYP};

/// Seed of the golden signing key: bytes 0x00, 0x01, ..., 0x1f.
pub fn seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    for (i, b) in s.iter_mut().enumerate() {
        *b = i as u8;
    }
    s
}

pub fn key() -> SigningKey {
    SigningKey::from_seed(&seed()).expect("fixed seed is valid")
}

/// The two golden batches: seq 1 (genesis) and seq 2 chained to it.
pub fn batches() -> Vec<(BatchPayload, String)> {
    let key = key();
    let first = BatchPayload {
        v: 1,
        gateway_id: "plant1-gw1".into(),
        seq: 1,
        prev_hash: BatchHash::GENESIS.to_b64url(),
        created_ms: 1_767_225_600_000,
        samples: vec![
            Sample::good("tank1.level", Value::Float(2.5), 1_767_225_599_990),
            Sample::good("tank1.pump", Value::Bool(true), 1_767_225_599_990),
            Sample::good(
                "tank1.cycles",
                Value::UInt(18_446_744_073_709_551_615),
                1_767_225_599_990,
            ),
            Sample::good("tank1.setpoint", Value::Int(-40), 1_767_225_599_990),
            Sample::good(
                "tank1.batch_id",
                Value::Text("B-0042".into()),
                1_767_225_599_990,
            ),
            Sample::bad("tank1.temp", reason::NAN, 1_767_225_599_990),
            Sample {
                tag: "tank1.flow".into(),
                value: None,
                quality: Quality::Bad,
                reason: Some(format!(
                    "{}illegal_data_address",
                    reason::MODBUS_EXCEPTION_PREFIX
                )),
                ts_ms: 1_767_225_599_990,
            },
        ],
    };
    let (jws1, h1) = sign_batch(&key, &first);
    let second = BatchPayload {
        v: 1,
        gateway_id: "plant1-gw1".into(),
        seq: 2,
        prev_hash: h1.to_b64url(),
        created_ms: 1_767_225_601_000,
        samples: vec![Sample::good(
            "tank1.level",
            Value::Float(2.625),
            1_767_225_600_990,
        )],
    };
    let (jws2, _) = sign_batch(&key, &second);
    vec![(first, jws1), (second, jws2)]
}

/// The golden reported twin after both golden batches.
pub fn reported() -> (ReportedTwin, String) {
    let mut twin = ReportedTwin::new("plant1-gw1");
    for (b, _) in batches() {
        for s in &b.samples {
            twin.apply(s, (s.tag == "tank1.level").then_some("m"));
        }
        twin.seq = b.seq;
    }
    twin.updated_ms = 1_767_225_601_000;
    let json = serde_json::to_vec(&twin).expect("twin serializes");
    let jws = key().sign_compact(REPORTED_TYP, &json);
    (twin, jws)
}

/// The golden status messages (online, then its matching last will).
pub fn statuses() -> Vec<(Status, String)> {
    [State::Online, State::Offline]
        .into_iter()
        .map(|state| {
            let s = Status {
                v: 1,
                gateway_id: "plant1-gw1".into(),
                state,
                session: 1_767_225_500_000,
                seq: 0,
            };
            let jws = key().sign_compact(
                STATUS_TYP,
                &serde_json::to_vec(&s).expect("status serializes"),
            );
            (s, jws)
        })
        .collect()
}

/// Every golden file: (name under `docs/golden/`, exact content).
pub fn files() -> Vec<(&'static str, String)> {
    let k = key();
    let b = batches();
    let (_, reported) = reported();
    let st = statuses();
    vec![
        (
            "key.seed.hex",
            format!(
                "{}\n",
                seed()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        ),
        ("key.pub.pem", k.public_key_pem()),
        ("key.kid.txt", format!("{}\n", k.kid())),
        (
            "batch-1.payload.json",
            format!("{}\n", serde_json::to_string(&b[0].0).expect("json")),
        ),
        ("batch-1.jws", format!("{}\n", b[0].1)),
        (
            "batch-2.payload.json",
            format!("{}\n", serde_json::to_string(&b[1].0).expect("json")),
        ),
        ("batch-2.jws", format!("{}\n", b[1].1)),
        ("reported.jws", format!("{reported}\n")),
        ("status-online.jws", format!("{}\n", st[0].1)),
        ("status-offline.jws", format!("{}\n", st[1].1)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jws::TrustStore;
    use crate::verify::{ChainVerifier, Continuity};
    use std::path::PathBuf;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/golden")
    }

    #[test]
    fn golden_files_match_the_code() {
        let update = std::env::var_os("UPDATE_GOLDEN").is_some();
        for (name, content) in files() {
            let path = dir().join(name);
            if update {
                std::fs::create_dir_all(dir()).unwrap();
                std::fs::write(&path, &content).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
                    path.display()
                )
            });
            assert_eq!(
                on_disk, content,
                "golden file {name} differs from what the code produces"
            );
        }
    }

    #[test]
    fn golden_batches_verify_as_a_chain() {
        let mut trust = TrustStore::new();
        trust.add_pem(&key().public_key_pem()).unwrap();
        let mut v = ChainVerifier::new(trust);
        let b = batches();
        assert_eq!(
            v.verify(b[0].1.as_bytes()).unwrap().continuity,
            Continuity::First
        );
        let second = v.verify(b[1].1.as_bytes()).unwrap();
        assert_eq!(second.continuity, Continuity::InOrder);
        assert_eq!(second.payload, b[1].0);
    }
}
