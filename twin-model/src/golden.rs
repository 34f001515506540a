//! Golden test vectors: fixed keys and fixed inputs whose signed bytes are
//! exact. They are written to `docs/golden/` and quoted in
//! `docs/wire-format.md`; the tests below fail if the code and the files
//! ever disagree. Run `UPDATE_GOLDEN=1 cargo test -p twin-model golden` to
//! rewrite the files after a deliberate wire change.
//!
//! Two sets: what the gateway signs with its key ([`key`]: batches, the
//! reported twin, status, command results, audit checkpoints), and a
//! command from the cloud: a command token and an approval token signed by
//! two operator keys ([`operator_seed`], [`approver_seed`]), the command
//! message carrying both, the gateway's results for it and the audit log
//! of the run that handled it.

use crate::audit::{
    AuditChain, AuthFailure, CommandDecision, CommandOutcome, CommandsDropped, Decision, Event,
    Previous, ShadowDifference, Started, Stopped,
};
use crate::batch::{sign_batch, BatchHash, BatchPayload};
use crate::command::{
    command_binding, ApprovalClaims, Approves, CommandBody, CommandClaims, Envelope, APPROVAL_TYP,
    COMMAND_TYP,
};
use crate::jws::{b64url, sha256, SigningKey};
use crate::result::{CommandResult, Status as ResultStatus, RESULT_TYP};
use crate::sample::{reason, Quality, Sample, Value};
use crate::status::{State, Status, STATUS_TYP};
use crate::twin::{ReportedTwin, REPORTED_TYP};
use aws_lc_rs::signature::Ed25519KeyPair;
use serde::Serialize;

/// The gateway of every golden vector.
pub const GATEWAY_ID: &str = "plant1-gw1";
/// The operator token issuer of the golden command vectors.
pub const ISSUER: &str = "plant1-ops";

/// 32 consecutive bytes `first, first + 1, ..., first + 31`.
fn consecutive_seed(first: u8) -> [u8; 32] {
    let mut s = [0u8; 32];
    for (i, b) in s.iter_mut().enumerate() {
        *b = first.wrapping_add(i as u8);
    }
    s
}

/// Seed of the golden signing key: bytes 0x00, 0x01, ..., 0x1f.
pub fn seed() -> [u8; 32] {
    consecutive_seed(0x00)
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
                server_ts_ms: None,
                flags: Vec::new(),
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

/// The golden alert: a flagged setpoint (signed with the gateway key).
pub fn alert() -> (crate::alert::Alert, String) {
    let a = crate::alert::Alert {
        v: 1,
        gateway_id: "plant1-gw1".into(),
        code: "sensor_out_of_range".into(),
        severity: crate::alert::Severity::Medium,
        subject: "tag:tank1.level_setpoint".into(),
        message: "tank1.level_setpoint = 4.8 is outside 0.5 .. 4.5".into(),
        evidence: [
            ("max".to_string(), serde_json::json!(4.5)),
            ("min".to_string(), serde_json::json!(0.5)),
            ("value".to_string(), serde_json::json!(4.8)),
        ]
        .into_iter()
        .collect(),
        count: 1,
        first_ms: 1_767_225_602_000,
        last_ms: 1_767_225_602_000,
    };
    let jws = key().sign_compact(
        crate::alert::ALERT_TYP,
        &serde_json::to_vec(&a).expect("alert serializes"),
    );
    (a, jws)
}

/// The golden SBOM: a small CycloneDX document, published in two parts of
/// at most 256 bytes.
pub fn sbom() -> String {
    concat!(
        r#"{"bomFormat":"CycloneDX","specVersion":"1.5","version":1,"#,
        r#""metadata":{"component":{"type":"application","name":"gateway","version":"0.1.0","purl":"pkg:cargo/gateway@0.1.0","bom-ref":"pkg:cargo/gateway@0.1.0"}},"#,
        r#""components":[{"type":"library","name":"itoa","version":"1.0.15","purl":"pkg:cargo/itoa@1.0.15","bom-ref":"pkg:cargo/itoa@1.0.15"}],"#,
        r#""dependencies":[{"ref":"pkg:cargo/gateway@0.1.0","dependsOn":["pkg:cargo/itoa@1.0.15"]},{"ref":"pkg:cargo/itoa@1.0.15","dependsOn":[]}]}"#
    )
    .to_owned()
}

/// The golden SBOM index and its two parts (signed with the gateway key).
pub fn sbom_messages() -> (crate::inventory::SbomIndex, String, Vec<String>) {
    let doc = sbom();
    let hex = |b: &[u8]| -> String { b.iter().map(|x| format!("{x:02x}")).collect() };
    let parts: Vec<&[u8]> = doc.as_bytes().chunks(256).collect();
    let index = crate::inventory::SbomIndex {
        v: 1,
        gateway_id: "plant1-gw1".into(),
        media_type: "application/vnd.cyclonedx+json".into(),
        sha256: hex(&crate::jws::sha256(doc.as_bytes())),
        bytes: doc.len(),
        parts: parts.iter().map(|p| hex(&crate::jws::sha256(p))).collect(),
    };
    let jws = key().sign_compact(
        crate::inventory::SBOM_TYP,
        &serde_json::to_vec(&index).expect("index serializes"),
    );
    let part_jws = parts
        .iter()
        .map(|p| key().sign_compact(crate::inventory::SBOM_PART_TYP, p))
        .collect();
    (index, jws, part_jws)
}

/// The golden inventory: one Modbus device with its identity (signed with
/// the gateway key).
pub fn inventory() -> (crate::inventory::Inventory, String) {
    use crate::inventory::*;
    let (index, _, _) = sbom_messages();
    let fields = [
        (field::VENDOR_NAME, "Twin Gateway Project"),
        (field::PRODUCT_CODE, "TANK-SIM"),
        (field::REVISION, "0.1.0"),
        (field::PRODUCT_NAME, "Tank simulator"),
        (field::MODEL_NAME, "TANK-1"),
    ];
    let inv = Inventory {
        v: 1,
        gateway_id: "plant1-gw1".into(),
        ts_ms: 1_767_225_603_000,
        gateway: GatewayEntry {
            version: "0.1.0".into(),
            commit: "unknown".into(),
            rustc: "rustc 1.95.0".into(),
            target: "x86_64-unknown-linux-gnu".into(),
            profile: "release".into(),
            deployment_profile: "production".into(),
            features: vec!["modbus_tcp".into(), "commands".into()],
            config_sha256: "n4bQgYhMfWWaL-qgxVrQFaO_TxsrC4Is0V1sFbDwCgg".into(),
            policy_sha256: Some("LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564".into()),
            sbom_sha256: index.sha256,
            sbom_components: 1,
            certificates: vec![CertificateEntry {
                role: "mqtt_client".into(),
                file: "pki/gateway.crt.pem".into(),
                subject: "CN=plant1-gw1".into(),
                issuer: "CN=plant1 CA".into(),
                sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae".into(),
                not_before_ms: 1_767_225_600_000,
                not_after_ms: 1_798_761_600_000,
            }],
            keys: vec![KeyEntry {
                role: "telemetry_signing".into(),
                kid: key().kid().to_owned(),
                alg: "EdDSA".into(),
            }],
        },
        devices: vec![DeviceEntry {
            name: "plc1".into(),
            protocol: "modbus_tcp".into(),
            endpoint: "192.168.1.10:502".into(),
            unit_id: Some(1),
            security: None,
            tag_count: 2,
            tags: vec!["tank1.level".into(), "tank1.mode".into()],
            tags_omitted: false,
            writable: vec!["tank1.mode".into()],
            identity: Some(DeviceIdentity {
                fields: fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            }),
            identity_status: None,
            identity_since_ms: Some(1_767_225_600_500),
            identity_changed_ms: None,
            last_seen_ms: Some(1_767_225_602_900),
        }],
    };
    let jws = key().sign_compact(
        crate::inventory::INVENTORY_TYP,
        &serde_json::to_vec(&inv).expect("inventory serializes"),
    );
    (inv, jws)
}

/// Seed of the golden requesting operator's key (`alice@plant1`): bytes
/// 0x20, 0x21, ..., 0x3f.
pub fn operator_seed() -> [u8; 32] {
    consecutive_seed(0x20)
}

/// Seed of the golden approving operator's key (`dave@plant1`): bytes
/// 0x40, 0x41, ..., 0x5f.
pub fn approver_seed() -> [u8; 32] {
    consecutive_seed(0x40)
}

/// The public half and key id of an operator seed (Ed25519: the same key
/// id formula as the gateway's key).
pub fn operator_key(seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_seed(seed).expect("fixed seed is valid")
}

/// The protected header of an operator token, in the member order the
/// operator tool writes (`gateway::command_auth::mint`): `alg`, `typ`,
/// `kid`. (The gateway's own messages use `alg`, `kid`, `typ`.)
#[derive(Serialize)]
struct OperatorHeader<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

/// Signs `payload` as an operator token (JWS compact, EdDSA) with the
/// Ed25519 key of `seed`: header `{"alg":"EdDSA","typ":<typ>,"kid":<kid>}`.
pub fn sign_operator_token(seed: &[u8; 32], typ: &str, payload: &[u8]) -> String {
    let key = operator_key(seed);
    let header = OperatorHeader {
        alg: "EdDSA",
        typ,
        kid: key.kid(),
    };
    let header = serde_json::to_vec(&header).expect("header serializes");
    let mut out = b64url(&header);
    out.push('.');
    out.push_str(&b64url(payload));
    let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("fixed seed is valid");
    let sig = pair.sign(out.as_bytes());
    out.push('.');
    out.push_str(&b64url(sig.as_ref()));
    out
}

/// The golden command token: `alice@plant1` switches `tank1.mode` from 0
/// (auto) to 1 (manual), valid 2026-01-01T00:00:00Z to 00:02:00Z.
pub fn command() -> (CommandClaims, String) {
    let claims = CommandClaims {
        iss: ISSUER.into(),
        sub: "alice@plant1".into(),
        aud: GATEWAY_ID.into(),
        iat: 1_767_225_600,
        nbf: 1_767_225_600,
        exp: 1_767_225_720,
        jti: "cmd-20260101-0001".into(),
        roles: vec!["plant1-operators".into()],
        amr: vec!["pwd".into(), "otp".into()],
        cmd: CommandBody {
            tag: "tank1.mode".into(),
            value: Value::Int(1),
            expect: Some(Value::Int(0)),
        },
    };
    let payload = serde_json::to_vec(&claims).expect("claims serialize");
    let token = sign_operator_token(&operator_seed(), COMMAND_TYP, &payload);
    (claims, token)
}

/// The golden approval token: `dave@plant1` approves the golden command,
/// bound to it by `jti` and by [`command_binding`].
pub fn approval() -> (ApprovalClaims, String) {
    let (command, token) = command();
    let claims = ApprovalClaims {
        iss: ISSUER.into(),
        sub: "dave@plant1".into(),
        aud: GATEWAY_ID.into(),
        iat: 1_767_225_630,
        nbf: 1_767_225_630,
        exp: 1_767_225_720,
        jti: "apr-20260101-0001".into(),
        roles: vec!["plant1-supervisors".into()],
        amr: vec!["pwd".into(), "hwk".into()],
        approves: Approves {
            jti: command.jti,
            sha256: command_binding(&token).expect("a token has a signing input"),
        },
    };
    let payload = serde_json::to_vec(&claims).expect("claims serialize");
    let token = sign_operator_token(&approver_seed(), APPROVAL_TYP, &payload);
    (claims, token)
}

/// The golden command message: the envelope carrying the command and its
/// approval, and its exact bytes on the command topic.
pub fn command_message() -> (Envelope, Vec<u8>) {
    let envelope = Envelope {
        command: command().1,
        approvals: vec![approval().1],
    };
    let bytes = envelope.to_message();
    (envelope, bytes)
}

/// base64url SHA-256 of the golden command message: the `message_sha256`
/// of its results and of its `auth_failure` record.
pub fn message_sha256() -> String {
    b64url(&sha256(&command_message().1))
}

/// Index of the golden command's `command_decision` record in [`audit_log`].
const DECISION_N: u64 = 3;
/// Index of the `auth_failure` record of its second delivery.
const REPLAY_N: u64 = 6;

/// The golden results: the command message `applied`, then the same
/// message delivered a second time and `refused` as `replayed`.
pub fn results() -> Vec<(CommandResult, String)> {
    let (claims, _) = command();
    let applied = CommandResult {
        v: 1,
        gateway_id: GATEWAY_ID.into(),
        command_id: Some(claims.jti.clone()),
        operator: Some(claims.sub.clone()),
        tag: Some(claims.cmd.tag.clone()),
        value: Some(claims.cmd.value.clone()),
        status: ResultStatus::Applied,
        code: None,
        rule_id: Some("tank1-mode".into()),
        reason: "written and read back as 1".into(),
        readback: Some(Value::Int(1)),
        message_sha256: message_sha256(),
        audit_n: Some(DECISION_N),
        ts_ms: 1_767_225_631_250,
    };
    let replayed = CommandResult {
        v: 1,
        gateway_id: GATEWAY_ID.into(),
        command_id: None,
        operator: None,
        tag: None,
        value: None,
        status: ResultStatus::Refused,
        code: Some("replayed".into()),
        rule_id: None,
        reason: "token id was seen before".into(),
        readback: None,
        message_sha256: message_sha256(),
        audit_n: Some(REPLAY_N),
        ts_ms: 1_767_225_632_010,
    };
    [applied, replayed]
        .into_iter()
        .map(|r| {
            let json = serde_json::to_vec(&r).expect("result serializes");
            let jws = key().sign_compact(RESULT_TYP, &json);
            (r, jws)
        })
        .collect()
}

/// The golden audit log (lines without their `\n`): a run of the gateway
/// that applies the golden command, audits a shadow-policy difference,
/// refuses the command's second delivery, summarises a flood, and closes
/// in order. Record kinds, by index: 1 `started`, 2 `checkpoint`,
/// 3 `command_decision`, 4 `shadow_difference`, 5 `command_outcome`,
/// 6 `auth_failure`, 7 `commands_dropped`, 8 `checkpoint`, 9 `stopped`,
/// 10 `checkpoint`.
pub fn audit_log() -> Vec<String> {
    let key = key();
    let (claims, token) = command();
    let (_, approval) = approval();
    let message_len = command_message().1.len() as u64;
    let mut chain = AuditChain::new();
    let started = Event::Started(Started {
        gateway_id: GATEWAY_ID.into(),
        version: "0.1.0".into(),
        previous: Previous::None,
        unverified_tail: 0,
        set_aside: None,
    });
    let mut lines = vec![chain.append(&started, 1_767_225_500_000)];
    lines.push(chain.append_checkpoint(&key, GATEWAY_ID, 1_767_225_500_000));
    let events = [
        (
            1_767_225_631_020,
            Event::CommandDecision(CommandDecision {
                command_id: claims.jti.clone(),
                operator: claims.sub.clone(),
                tag: claims.cmd.tag.clone(),
                value: claims.cmd.value.clone(),
                decision: Decision::Permit,
                reason_code: None,
                reason: "permitted by rule \"tank1-mode\"".into(),
                rule_id: Some("tank1-mode".into()),
                token,
                approval_tokens: vec![approval],
            }),
        ),
        (
            1_767_225_631_030,
            Event::ShadowDifference(ShadowDifference {
                command_id: claims.jti.clone(),
                tag: claims.cmd.tag.clone(),
                enforced: "permit".into(),
                enforced_rule: Some("tank1-mode".into()),
                candidate: "deny:too_few_approvals".into(),
                candidate_rule: Some("tank1-mode".into()),
                candidate_source: "/etc/twin-gateway/policies-next".into(),
            }),
        ),
        (
            1_767_225_631_240,
            Event::CommandOutcome(CommandOutcome {
                command_id: claims.jti.clone(),
                tag: claims.cmd.tag.clone(),
                status: "applied".into(),
                code: None,
                reason: "written and read back as 1".into(),
                readback: Some(Value::Int(1)),
                decision_n: DECISION_N,
            }),
        ),
        (
            1_767_225_632_000,
            Event::AuthFailure(AuthFailure {
                code: "replayed".into(),
                detail: "token id was seen before".into(),
                command_id: None,
                subject: None,
                message_sha256: message_sha256(),
                message_len,
            }),
        ),
        (
            1_767_225_641_000,
            Event::CommandsDropped(CommandsDropped {
                code: "rate_limited".into(),
                count: 25,
                first_ms: 1_767_225_640_012,
                last_ms: 1_767_225_640_730,
            }),
        ),
    ];
    for (ts, e) in &events {
        lines.push(chain.append(e, *ts));
    }
    lines.push(chain.append_checkpoint(&key, GATEWAY_ID, 1_767_225_660_000));
    let stopped = Event::Stopped(Stopped {
        reason: "shutdown".into(),
    });
    lines.push(chain.append(&stopped, 1_767_225_700_000));
    lines.push(chain.append_checkpoint(&key, GATEWAY_ID, 1_767_225_700_000));
    lines
}

/// A seed as 64 lowercase hex characters and a newline.
fn hex_line(seed: &[u8; 32]) -> String {
    format!(
        "{}\n",
        seed.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// JSON of `value` and a newline.
fn json_line<T: Serialize>(value: &T) -> String {
    format!("{}\n", serde_json::to_string(value).expect("json"))
}

/// Every golden file: (name under `docs/golden/`, exact content).
pub fn files() -> Vec<(&'static str, String)> {
    let k = key();
    let b = batches();
    let (_, reported) = reported();
    let st = statuses();
    let alice = operator_key(&operator_seed());
    let dave = operator_key(&approver_seed());
    let (command_claims, command_token) = command();
    let (approval_claims, approval_token) = approval();
    let (_, message) = command_message();
    let message = String::from_utf8(message).expect("the envelope is UTF-8");
    let r = results();
    let audit: String = audit_log().iter().map(|l| format!("{l}\n")).collect();
    vec![
        ("key.seed.hex", hex_line(&seed())),
        ("key.pub.pem", k.public_key_pem()),
        ("key.kid.txt", format!("{}\n", k.kid())),
        ("batch-1.payload.json", json_line(&b[0].0)),
        ("batch-1.jws", format!("{}\n", b[0].1)),
        ("batch-2.payload.json", json_line(&b[1].0)),
        ("batch-2.jws", format!("{}\n", b[1].1)),
        ("reported.jws", format!("{reported}\n")),
        ("status-online.jws", format!("{}\n", st[0].1)),
        ("status-offline.jws", format!("{}\n", st[1].1)),
        ("operator-alice.seed.hex", hex_line(&operator_seed())),
        ("operator-alice.pub.pem", alice.public_key_pem()),
        ("operator-alice.kid.txt", format!("{}\n", alice.kid())),
        ("operator-dave.seed.hex", hex_line(&approver_seed())),
        ("operator-dave.pub.pem", dave.public_key_pem()),
        ("operator-dave.kid.txt", format!("{}\n", dave.kid())),
        ("command.claims.json", json_line(&command_claims)),
        ("command.jwt", format!("{command_token}\n")),
        (
            "command.binding.txt",
            format!(
                "{}\n",
                command_binding(&command_token).expect("a token has a signing input")
            ),
        ),
        ("approval.claims.json", json_line(&approval_claims)),
        ("approval.jwt", format!("{approval_token}\n")),
        ("command-message.json", format!("{message}\n")),
        (
            "command-message.sha256.txt",
            format!("{}\n", message_sha256()),
        ),
        ("result-applied.payload.json", json_line(&r[0].0)),
        ("result-applied.jws", format!("{}\n", r[0].1)),
        ("result-refused.payload.json", json_line(&r[1].0)),
        ("result-refused.jws", format!("{}\n", r[1].1)),
        ("audit.jsonl", audit),
        ("alert.payload.json", json_line(&alert().0)),
        ("alert.jws", format!("{}\n", alert().1)),
        ("inventory.payload.json", json_line(&inventory().0)),
        ("inventory.jws", format!("{}\n", inventory().1)),
        ("sbom.cdx.json", format!("{}\n", sbom())),
        ("sbom-index.payload.json", json_line(&sbom_messages().0)),
        ("sbom-index.jws", format!("{}\n", sbom_messages().1)),
        ("sbom-part-0.jws", format!("{}\n", sbom_messages().2[0])),
        ("sbom-part-1.jws", format!("{}\n", sbom_messages().2[1])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{parse_line, verify_bytes, Kind};
    use crate::jws::{b64url_decode, public_key_from_pem, TrustStore};
    use crate::verify::{ChainVerifier, Continuity};
    use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
    use std::path::PathBuf;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/golden")
    }

    #[test]
    fn golden_inventory_alert_and_sbom_verify_and_the_parts_make_the_document() {
        let mut trust = TrustStore::new();
        trust.add_pem(&stored("key.pub.pem")).unwrap();
        let v = trust
            .verify_compact(
                stored("alert.jws").as_bytes(),
                crate::alert::ALERT_TYP,
                1 << 20,
            )
            .unwrap();
        let a: crate::alert::Alert = serde_json::from_slice(&v.payload).unwrap();
        assert_eq!(a.code, "sensor_out_of_range");
        let v = trust
            .verify_compact(
                stored("inventory.jws").as_bytes(),
                crate::inventory::INVENTORY_TYP,
                1 << 20,
            )
            .unwrap();
        let inv: crate::inventory::Inventory = serde_json::from_slice(&v.payload).unwrap();
        let v = trust
            .verify_compact(
                stored("sbom-index.jws").as_bytes(),
                crate::inventory::SBOM_TYP,
                1 << 20,
            )
            .unwrap();
        let index: crate::inventory::SbomIndex = serde_json::from_slice(&v.payload).unwrap();
        assert_eq!(index.parts.len(), 2);
        let mut doc = Vec::new();
        for (i, hash) in index.parts.iter().enumerate() {
            let part = trust
                .verify_compact(
                    stored(&format!("sbom-part-{i}.jws")).as_bytes(),
                    crate::inventory::SBOM_PART_TYP,
                    1 << 20,
                )
                .unwrap()
                .payload;
            let h: String = crate::jws::sha256(&part)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect();
            assert_eq!(&h, hash);
            doc.extend_from_slice(&part);
        }
        assert_eq!(doc, stored("sbom.cdx.json").as_bytes());
        assert_eq!(doc.len(), index.bytes);
        assert_eq!(inv.gateway.sbom_sha256, index.sha256);
        // Wrong typ: an inventory is not an alert.
        assert!(trust
            .verify_compact(
                stored("inventory.jws").as_bytes(),
                crate::alert::ALERT_TYP,
                1 << 20
            )
            .is_err());
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

    /// A golden file's bytes as stored. While `UPDATE_GOLDEN` rewrites the
    /// files (concurrently with this test), the bytes the code produces.
    fn raw(name: &str) -> Vec<u8> {
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            let (_, content) = files()
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{name} is not a golden file"));
            return content.into_bytes();
        }
        let path = dir().join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A golden text file as stored, without its final newline.
    fn stored(name: &str) -> String {
        let text = String::from_utf8(raw(name)).expect("golden files are UTF-8");
        text.strip_suffix('\n')
            .unwrap_or_else(|| panic!("{name} does not end in a newline"))
            .to_owned()
    }

    /// Verifies an operator token the way a verifier that knows only the
    /// stored public key would, and returns its header and payload bytes.
    fn verify_operator_token(token: &str, pem_file: &str) -> (String, Vec<u8>) {
        let key = public_key_from_pem(&stored(pem_file)).expect("an Ed25519 PEM public key");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{token}");
        let signing_input = format!("{}.{}", parts[0], parts[1]);
        let signature = b64url_decode(parts[2]).expect("base64url signature");
        assert_eq!(signature.len(), 64);
        UnparsedPublicKey::new(&ED25519, key)
            .verify(signing_input.as_bytes(), &signature)
            .expect("the operator's signature verifies");
        let header = String::from_utf8(b64url_decode(parts[0]).unwrap()).unwrap();
        (header, b64url_decode(parts[1]).unwrap())
    }

    #[test]
    fn golden_command_token_is_an_operator_token() {
        let (claims, token) = command();
        assert_eq!(stored("command.jwt"), token);
        let (header, payload) = verify_operator_token(&token, "operator-alice.pub.pem");
        let kid = stored("operator-alice.kid.txt");
        assert_eq!(kid, operator_key(&operator_seed()).kid());
        assert_eq!(
            header,
            format!(r#"{{"alg":"EdDSA","typ":"twin-command+jwt","kid":"{kid}"}}"#)
        );
        assert_eq!(payload, stored("command.claims.json").as_bytes());
        assert_eq!(CommandClaims::from_json(&payload).unwrap(), claims);
        assert_eq!(claims.exp - claims.iat, 120);
        // The gateway's own signing helper writes another header order:
        // operator tokens are not made with it.
        let gateway_style = operator_key(&operator_seed()).sign_compact(COMMAND_TYP, &payload);
        assert_ne!(gateway_style, token);
    }

    #[test]
    fn golden_approval_is_bound_to_the_golden_command() {
        let (command_claims, command_token) = command();
        let (claims, token) = approval();
        assert_eq!(stored("approval.jwt"), token);
        let (header, payload) = verify_operator_token(&token, "operator-dave.pub.pem");
        let kid = stored("operator-dave.kid.txt");
        assert_eq!(
            header,
            format!(r#"{{"alg":"EdDSA","typ":"twin-approval+jwt","kid":"{kid}"}}"#)
        );
        assert_eq!(payload, stored("approval.claims.json").as_bytes());
        assert_eq!(ApprovalClaims::from_json(&payload).unwrap(), claims);
        // The binding, computed here from the token text alone.
        let signing_input = command_token.rsplit_once('.').unwrap().0;
        let binding = b64url(&sha256(signing_input.as_bytes()));
        assert_eq!(claims.approves.sha256, binding);
        assert_eq!(Some(binding.clone()), command_binding(&command_token));
        assert_eq!(stored("command.binding.txt"), binding);
        assert_eq!(claims.approves.jti, command_claims.jti);
        assert_ne!(claims.sub, command_claims.sub);
        assert_ne!(claims.jti, command_claims.jti);
        assert!(claims.exp - claims.iat <= 300 && claims.iat >= command_claims.iat);
    }

    #[test]
    fn golden_command_message_parses_to_its_tokens() {
        let (envelope, bytes) = command_message();
        assert_eq!(stored("command-message.json").as_bytes(), bytes.as_slice());
        let parsed = Envelope::parse(&bytes).unwrap();
        assert_eq!(parsed, envelope);
        assert_eq!(parsed.command, command().1);
        assert_eq!(parsed.approvals, vec![approval().1]);
        assert!(bytes.len() <= 65_536);
        // The file's trailing newline is whitespace the parser ignores,
        // but it is not part of the message that was hashed.
        let file = raw("command-message.json");
        assert_eq!(Envelope::parse(&file).unwrap(), envelope);
        assert_eq!(
            stored("command-message.sha256.txt"),
            b64url(&sha256(&bytes))
        );
        assert_ne!(b64url(&sha256(&file)), message_sha256());
        // The bare token is a command message too.
        let bare = Envelope::parse(command().1.as_bytes()).unwrap();
        assert_eq!((bare.command, bare.approvals.len()), (command().1, 0));
    }

    #[test]
    fn golden_results_verify_with_the_gateway_key() {
        let mut trust = TrustStore::new();
        trust.add_pem(&stored("key.pub.pem")).unwrap();
        let expected = results();
        let files = [
            ("result-applied.jws", "result-applied.payload.json"),
            ("result-refused.jws", "result-refused.payload.json"),
        ];
        for ((result, jws), (jws_file, payload_file)) in expected.iter().zip(files) {
            assert_eq!(&stored(jws_file), jws);
            let v = trust
                .verify_compact(jws.as_bytes(), RESULT_TYP, crate::MAX_MESSAGE_BYTES)
                .unwrap();
            assert_eq!(v.payload, stored(payload_file).as_bytes());
            let back: CommandResult = serde_json::from_slice(&v.payload).unwrap();
            assert_eq!(&back, result);
            assert_eq!(back.message_sha256, message_sha256());
        }
        let (applied, refused) = (&expected[0].0, &expected[1].0);
        assert_eq!(applied.status, ResultStatus::Applied);
        assert_eq!(applied.command_id.as_deref(), Some("cmd-20260101-0001"));
        assert_eq!(
            (applied.code.as_deref(), &applied.readback),
            (None, &applied.value)
        );
        assert_eq!(refused.status, ResultStatus::Refused);
        assert_eq!(refused.code.as_deref(), Some("replayed"));
        assert!(refused.command_id.is_none() && refused.readback.is_none());
        // Every member is present, absent values as null.
        let json = stored("result-refused.payload.json");
        for member in [
            "command_id",
            "operator",
            "tag",
            "value",
            "rule_id",
            "readback",
        ] {
            assert!(json.contains(&format!(r#""{member}":null"#)), "{member}");
        }
    }

    #[test]
    fn golden_audit_log_verifies_and_names_the_golden_command() {
        let mut trust = TrustStore::new();
        trust.add_pem(&stored("key.pub.pem")).unwrap();
        let text = raw("audit.jsonl");
        let report = verify_bytes(&text, &trust);
        assert!(report.is_ok(), "{report}");
        assert_eq!((report.records, report.checkpoints), (10, 3));
        assert!(report.closed && report.warnings().is_empty());
        assert_eq!(report.gateway_id.as_deref(), Some(GATEWAY_ID));
        let records: Vec<_> = audit_log()
            .iter()
            .map(|l| parse_line(l.as_bytes()).unwrap())
            .collect();
        let kinds: Vec<Kind> = records.iter().map(|r| r.event.kind()).collect();
        use Kind::*;
        assert_eq!(
            kinds,
            [
                Started,
                Checkpoint,
                CommandDecision,
                ShadowDifference,
                CommandOutcome,
                AuthFailure,
                CommandsDropped,
                Checkpoint,
                Stopped,
                Checkpoint
            ]
        );
        let at = |n: u64| &records[(n - 1) as usize].event;
        let r = results();
        let Event::CommandDecision(d) = at(r[0].0.audit_n.unwrap()) else {
            panic!("the applied result names its decision record")
        };
        assert_eq!(d.token, command().1);
        assert_eq!(d.approval_tokens, vec![approval().1]);
        assert_eq!(Some(d.command_id.clone()), r[0].0.command_id);
        let Event::CommandOutcome(o) = at(5) else {
            panic!("record 5 is the outcome")
        };
        assert_eq!((o.decision_n, o.status.as_str()), (DECISION_N, "applied"));
        let Event::AuthFailure(f) = at(r[1].0.audit_n.unwrap()) else {
            panic!("the refused result names its auth_failure record")
        };
        assert_eq!(f.message_sha256, message_sha256());
        assert_eq!(f.code, r[1].0.code.clone().unwrap());
        assert_eq!(f.message_len, command_message().1.len() as u64);
    }
}
