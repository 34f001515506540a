use super::mint::{sign_compact, sign_with_header};
use super::*;
use std::path::Path;
use twin_model::command::{Approves, CommandBody};
use twin_model::jws::b64url;

const NOW_MS: u64 = 1_700_000_000_000;
const NOW_S: u64 = NOW_MS / 1000;
const GATEWAY: &str = "gw-plant-1";
const ISSUER: &str = "ops-idp";

struct Kit {
    ed: OperatorKey,
    ec: OperatorKey,
    bob: OperatorKey,
    verifier: TokenVerifier,
    dir: tempfile::TempDir,
}

fn store(dir: &Path, capacity: u64) -> ReplayStore {
    ReplayStore::open(
        dir,
        ReplayOptions {
            capacity,
            leeway_ms: DEFAULT_LEEWAY_MS,
        },
    )
    .unwrap()
}

fn trust_dir(dir: &Path, keys: &[&OperatorKey]) -> OperatorTrustStore {
    let keys_dir = dir.join("operators");
    std::fs::create_dir_all(&keys_dir).unwrap();
    for (i, k) in keys.iter().enumerate() {
        std::fs::write(keys_dir.join(format!("op-{i}.pem")), k.public_key_pem()).unwrap();
    }
    OperatorTrustStore::load_dir(&keys_dir).unwrap()
}

fn kit_with_capacity(capacity: u64) -> Kit {
    let dir = tempfile::tempdir().unwrap();
    let ed = OperatorKey::from_pkcs8_pem(&crate::pki::new_signing_key_pem().unwrap()).unwrap();
    let ec = OperatorKey::generate(Algorithm::ES256).unwrap();
    let bob = OperatorKey::generate(Algorithm::EdDSA).unwrap();
    let trust = trust_dir(dir.path(), &[&ed, &ec, &bob]);
    let verifier = TokenVerifier::new(
        trust,
        VerifierConfig::new(GATEWAY, ISSUER),
        store(dir.path(), capacity),
    );
    Kit {
        ed,
        ec,
        bob,
        verifier,
        dir,
    }
}

fn kit() -> Kit {
    kit_with_capacity(1000)
}

fn claims(jti: &str) -> CommandClaims {
    CommandClaims {
        iss: ISSUER.into(),
        sub: "alice".into(),
        aud: GATEWAY.into(),
        iat: NOW_S,
        nbf: NOW_S,
        exp: NOW_S + 120,
        jti: jti.into(),
        roles: vec!["operator".into()],
        amr: vec!["pwd".into(), "otp".into()],
        cmd: CommandBody {
            tag: "FV-101.setpoint".into(),
            value: Value::Float(42.5),
            expect: Some(Value::Float(40.0)),
        },
    }
}

fn approval(jti: &str, sub: &str, command: &VerifiedCommand) -> ApprovalClaims {
    ApprovalClaims {
        iss: ISSUER.into(),
        sub: sub.into(),
        aud: GATEWAY.into(),
        iat: NOW_S,
        nbf: NOW_S,
        exp: NOW_S + 120,
        jti: jti.into(),
        roles: vec!["supervisor".into()],
        amr: vec!["pwd".into(), "hwk".into()],
        approves: Approves {
            jti: command.jti.clone(),
            sha256: command.binding.clone(),
        },
    }
}

impl Kit {
    fn refuse(&self, token: &[u8]) -> &'static str {
        self.verifier.verify(token, NOW_MS).unwrap_err().code()
    }

    /// A token with `claims` changed by `edit`, signed by the Ed25519 key.
    fn with(&self, edit: impl FnOnce(&mut CommandClaims)) -> String {
        let mut c = claims("c-edit");
        edit(&mut c);
        mint_command(&self.ed, &c)
    }

    /// A validly signed command token with `payload` as claims.
    fn signed_payload(&self, payload: &[u8]) -> String {
        sign_compact(&self.ed, COMMAND_TYP, payload)
    }
}

fn header(alg: &str, kid: &str, extra: &str) -> Vec<u8> {
    format!(r#"{{"alg":"{alg}","typ":"{COMMAND_TYP}","kid":"{kid}"{extra}}}"#).into_bytes()
}

fn payload() -> Vec<u8> {
    serde_json::to_vec(&claims("c-forged")).unwrap()
}

#[test]
fn a_valid_eddsa_command_and_a_valid_es256_command_both_pass() {
    let k = kit();
    let token = mint_command(&k.ed, &claims("c-ed"));
    let v = k.verifier.verify(token.as_bytes(), NOW_MS).unwrap();
    assert_eq!(v.jti, "c-ed");
    assert_eq!(v.operator, "alice");
    assert_eq!(v.tag, "FV-101.setpoint");
    assert_eq!(v.value, Value::Float(42.5));
    assert_eq!(v.expect, Some(Value::Float(40.0)));
    assert_eq!(v.alg, Algorithm::EdDSA);
    assert_eq!(v.kid, k.ed.kid());
    assert_eq!(v.issued_at_ms, NOW_MS);
    assert_eq!(v.expires_at_ms, NOW_MS + 120_000);
    assert_eq!(v.token, token);
    assert_eq!(
        Some(v.binding.clone()),
        twin_model::command::command_binding(&token)
    );

    let token = mint_command(&k.ec, &claims("c-ec"));
    let v = k.verifier.verify(token.as_bytes(), NOW_MS).unwrap();
    assert_eq!(v.alg, Algorithm::ES256);
    assert_eq!(v.kid, k.ec.kid());
    let cmd = v.to_policy_command(&[]);
    assert_eq!(cmd.id, "c-ec");
    assert_eq!(cmd.operator, "alice");
    assert_eq!(cmd.amr, vec!["pwd".to_string(), "otp".to_string()]);
}

#[test]
fn a_command_within_the_leeway_passes() {
    let k = kit();
    let t = k.with(|c| {
        c.jti = "c-skew".into();
        c.iat = NOW_S + 20;
        c.nbf = NOW_S + 20;
        c.exp = NOW_S + 60;
    });
    assert!(k.verifier.verify(t.as_bytes(), NOW_MS).is_ok());
    let t = k.with(|c| {
        c.jti = "c-late".into();
        c.iat = NOW_S - 100;
        c.nbf = NOW_S - 100;
        c.exp = NOW_S - 20;
    });
    assert!(k.verifier.verify(t.as_bytes(), NOW_MS).is_ok());
}

#[test]
fn alg_none_is_refused() {
    let k = kit();
    for alg in ["none", "None", "NONE"] {
        let h = b64url(&header(alg, k.ed.kid(), ""));
        let token = format!("{h}.{}.", b64url(&payload()));
        assert_eq!(k.refuse(token.as_bytes()), "alg_none");
    }
}

#[test]
fn hs256_signed_with_the_public_key_as_hmac_secret_is_refused() {
    let k = kit();
    let h = b64url(&header("HS256", k.ed.kid(), ""));
    let input = format!("{h}.{}", b64url(&payload()));
    for secret in [k.ed.public_key_pem().into_bytes(), k.ed.public_key()] {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
        let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        let token = format!("{input}.{}", b64url(tag.as_ref()));
        assert_eq!(k.refuse(token.as_bytes()), "alg_hmac");
    }
}

#[test]
fn an_unknown_kid_is_refused() {
    let k = kit();
    let stranger = OperatorKey::generate(Algorithm::EdDSA).unwrap();
    assert_eq!(
        k.refuse(mint_command(&stranger, &claims("c-1")).as_bytes()),
        "unknown_kid"
    );
}

#[test]
fn jku_and_an_embedded_jwk_are_ignored_so_the_attackers_token_fails() {
    let k = kit();
    let attacker = OperatorKey::generate(Algorithm::EdDSA).unwrap();
    let jwk = format!(
        r#","jku":"https://attacker.example/jwks.json","x5u":"https://attacker.example/c.pem","jwk":{{"kty":"OKP","crv":"Ed25519","x":"{}"}}"#,
        b64url(&attacker.public_key())
    );
    // The attacker's own kid: not in the trust store.
    let t = sign_with_header(
        &attacker,
        &header("EdDSA", attacker.kid(), &jwk),
        &payload(),
    );
    assert_eq!(k.refuse(t.as_bytes()), "unknown_kid");
    // A trusted operator's kid: the trusted key is used, not the embedded one.
    let t = sign_with_header(&attacker, &header("EdDSA", k.ed.kid(), &jwk), &payload());
    assert_eq!(k.refuse(t.as_bytes()), "bad_signature");
    // The same members on a genuine token change nothing.
    let t = sign_with_header(&k.ed, &header("EdDSA", k.ed.kid(), &jwk), &payload());
    assert!(k.verifier.verify(t.as_bytes(), NOW_MS).is_ok());
}

#[test]
fn a_crit_header_or_a_repeated_header_member_is_refused() {
    let k = kit();
    let t = sign_with_header(
        &k.ed,
        &header("EdDSA", k.ed.kid(), r#","crit":["exp"]"#),
        &payload(),
    );
    assert_eq!(k.refuse(t.as_bytes()), "bad_header");
    let t = sign_with_header(
        &k.ed,
        &header("EdDSA", k.ed.kid(), r#","kid":"other""#),
        &payload(),
    );
    assert_eq!(k.refuse(t.as_bytes()), "bad_header");
    let t = sign_with_header(&k.ed, br#"["EdDSA","twin-command+jwt","x"]"#, &payload());
    assert_eq!(k.refuse(t.as_bytes()), "bad_header");
}

#[test]
fn a_bad_signature_is_refused() {
    let k = kit();
    let token = mint_command(&k.ed, &claims("c-1"));
    let (input, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{input}.{}", b64url(&[0u8; 64]));
    assert_eq!(k.refuse(forged.as_bytes()), "bad_signature");
    let short = format!("{input}.");
    assert_eq!(k.refuse(short.as_bytes()), "bad_signature");
    // Another payload under the original signature.
    let (_, sig) = token.rsplit_once('.').unwrap();
    let h = token.split('.').next().unwrap();
    let swapped = format!("{h}.{}.{sig}", b64url(&payload()));
    assert_eq!(k.refuse(swapped.as_bytes()), "bad_signature");
}

#[test]
fn signature_is_checked_before_claims() {
    let k = kit();
    let token = k.with(|c| c.exp = NOW_S - 3600);
    let (input, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{input}.{}", b64url(&[1u8; 64]));
    assert_eq!(k.refuse(forged.as_bytes()), "bad_signature");
}

#[test]
fn an_expired_command_is_refused() {
    let k = kit();
    let t = k.with(|c| {
        c.iat = NOW_S - 200;
        c.nbf = NOW_S - 200;
        c.exp = NOW_S - 30;
    });
    assert_eq!(k.refuse(t.as_bytes()), "expired");
}

#[test]
fn a_command_not_yet_valid_is_refused() {
    let k = kit();
    let t = k.with(|c| c.nbf = NOW_S + 31);
    assert_eq!(k.refuse(t.as_bytes()), "not_yet_valid");
}

#[test]
fn a_command_issued_in_the_future_is_refused() {
    let k = kit();
    let t = k.with(|c| {
        c.iat = NOW_S + 31;
        c.exp = NOW_S + 120;
    });
    assert_eq!(k.refuse(t.as_bytes()), "issued_in_future");
}

#[test]
fn a_lifetime_longer_than_the_maximum_is_refused() {
    let k = kit();
    let t = k.with(|c| c.exp = NOW_S + 301);
    assert_eq!(k.refuse(t.as_bytes()), "lifetime_too_long");
    let t = k.with(|c| {
        c.iat = NOW_S;
        c.exp = NOW_S - 1;
        c.nbf = NOW_S - 10;
    });
    assert_eq!(k.refuse(t.as_bytes()), "bad_claims");
}

#[test]
fn a_wrong_audience_is_refused() {
    let k = kit();
    let t = k.with(|c| c.aud = "gw-plant-2".into());
    assert_eq!(k.refuse(t.as_bytes()), "wrong_audience");
}

#[test]
fn a_wrong_issuer_is_refused() {
    let k = kit();
    let t = k.with(|c| c.iss = "someone-else".into());
    assert_eq!(k.refuse(t.as_bytes()), "wrong_issuer");
}

#[test]
fn a_replayed_jti_is_refused_by_the_same_verifier_and_after_reopening_the_store() {
    let k = kit();
    let token = mint_command(&k.ed, &claims("c-once"));
    k.verifier.verify(token.as_bytes(), NOW_MS).unwrap();
    assert_eq!(k.refuse(token.as_bytes()), "replayed");
    // A new token (other content, other key) reusing the jti.
    let mut other = claims("c-once");
    other.cmd.value = Value::Int(1);
    assert_eq!(k.refuse(mint_command(&k.ec, &other).as_bytes()), "replayed");

    let Kit {
        verifier, dir, ed, ..
    } = k;
    let trust = verifier.trust_store().clone();
    drop(verifier);
    let reopened = TokenVerifier::new(
        trust,
        VerifierConfig::new(GATEWAY, ISSUER),
        store(dir.path(), 1000),
    );
    assert_eq!(
        reopened
            .verify(token.as_bytes(), NOW_MS + 1000)
            .unwrap_err()
            .code(),
        "replayed"
    );
    assert!(reopened
        .verify(mint_command(&ed, &claims("c-next")).as_bytes(), NOW_MS)
        .is_ok());
}

#[test]
fn an_oversized_token_is_refused_before_parsing() {
    let k = kit();
    assert_eq!(
        k.refuse(&vec![0xff; DEFAULT_MAX_TOKEN_BYTES + 1]),
        "too_large"
    );
    let mut c = claims("c-big");
    c.cmd.value = Value::Text("x".repeat(DEFAULT_MAX_TOKEN_BYTES));
    assert_eq!(k.refuse(mint_command(&k.ed, &c).as_bytes()), "too_large");
}

#[test]
fn a_non_utf8_token_is_refused() {
    let k = kit();
    assert_eq!(k.refuse(b"eyJ\xff.e30.AA"), "not_utf8");
}

#[test]
fn a_token_without_three_base64url_parts_is_malformed() {
    let k = kit();
    for t in [
        "",
        "a.b",
        "a.b.c.d",
        "eyJ=.e30.AA",
        "e30.e30.A A",
        "e30 .e30.AA",
    ] {
        assert_eq!(k.refuse(t.as_bytes()), "malformed", "{t:?}");
    }
}

#[test]
fn deeply_nested_claims_are_refused() {
    let k = kit();
    for depth in [9, 200, 2500] {
        let deep = format!(
            r#"{{"iss":"ops-idp","x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(
            k.refuse(k.signed_payload(deep.as_bytes()).as_bytes()),
            "too_deep"
        );
    }
    let deep = format!(
        r#"{{"cmd":{{"value":{}1{}}}}}"#,
        "[".repeat(500),
        "]".repeat(500)
    );
    assert_eq!(
        k.refuse(k.signed_payload(deep.as_bytes()).as_bytes()),
        "too_deep"
    );
}

#[test]
fn wrong_typed_unknown_or_repeated_claims_are_refused() {
    let k = kit();
    let json = String::from_utf8(payload()).unwrap();
    let exp = (NOW_S + 120).to_string();
    let cases = [
        json.replace(&exp, &format!("\"{exp}\"")),
        json.replace(r#"["operator"]"#, r#""operator""#),
        json.replace(r#"["pwd","otp"]"#, r#"[1,2]"#),
        json.replace(&exp, &format!("{exp}.5")),
        json.replace(r#""value":42.5"#, r#""value":{"raw":42.5}"#),
        json.replacen('{', r#"{"admin":true,"#, 1),
        json.replacen('{', r#"{"aud":"gw-plant-1","#, 1),
        json.replace(r#""jti":"c-forged""#, r#""jti":"""#),
        json.replace(r#""jti":"c-forged","#, ""),
        "[]".into(),
        "not json".into(),
    ];
    for case in cases {
        assert_ne!(case, json);
        assert_eq!(
            k.refuse(k.signed_payload(case.as_bytes()).as_bytes()),
            "bad_claims",
            "{case}"
        );
    }
}

#[test]
fn an_es256_token_for_a_key_pinned_to_eddsa_is_refused() {
    let k = kit();
    // Signed with the P-256 key but naming the Ed25519 key.
    let t = sign_with_header(&k.ec, &header("ES256", k.ed.kid(), ""), &payload());
    assert_eq!(k.refuse(t.as_bytes()), "alg_mismatch");
    let t = sign_with_header(&k.ed, &header("EdDSA", k.ec.kid(), ""), &payload());
    assert_eq!(k.refuse(t.as_bytes()), "alg_mismatch");
    let t = sign_with_header(&k.ed, &header("RS256", k.ed.kid(), ""), &payload());
    assert_eq!(k.refuse(t.as_bytes()), "alg_mismatch");
}

#[test]
fn a_token_of_the_other_type_is_refused() {
    let k = kit();
    let token = mint_command(&k.ed, &claims("c-1"));
    let v = k.verifier.verify(token.as_bytes(), NOW_MS).unwrap();
    let approval_token = mint_approval(&k.bob, &approval("a-1", "bob", &v));
    assert_eq!(k.refuse(approval_token.as_bytes()), "wrong_typ");
    let err = k
        .verifier
        .verify_approval(mint_command(&k.ed, &claims("c-2")).as_bytes(), &v, NOW_MS)
        .unwrap_err();
    assert_eq!(err.code(), "wrong_typ");
}

#[test]
fn an_approval_of_the_command_passes_and_a_self_approval_is_reported() {
    let k = kit();
    let token = mint_command(&k.ed, &claims("c-1"));
    let cmd = k.verifier.verify(token.as_bytes(), NOW_MS).unwrap();
    let bob = mint_approval(&k.bob, &approval("a-bob", "bob", &cmd));
    let a = k
        .verifier
        .verify_approval(bob.as_bytes(), &cmd, NOW_MS)
        .unwrap();
    assert_eq!(a.approver.subject, "bob");
    assert_eq!(a.approver.roles, vec!["supervisor".to_string()]);
    assert!(!a.by_requester);
    assert_eq!(
        k.verifier
            .verify_approval(bob.as_bytes(), &cmd, NOW_MS)
            .unwrap_err()
            .code(),
        "replayed"
    );
    let own = mint_approval(&k.ec, &approval("a-alice", "alice", &cmd));
    let s = k
        .verifier
        .verify_approval(own.as_bytes(), &cmd, NOW_MS)
        .unwrap();
    assert!(s.by_requester);
    let policy_cmd = cmd.to_policy_command(&[a, s]);
    assert_eq!(policy_cmd.approvers.len(), 2);
}

#[test]
fn an_approval_bound_to_another_command_is_refused() {
    let k = kit();
    let first = k
        .verifier
        .verify(mint_command(&k.ed, &claims("c-1")).as_bytes(), NOW_MS)
        .unwrap();
    let mut other = claims("c-2");
    other.cmd.value = Value::Float(99.0);
    let second = k
        .verifier
        .verify(mint_command(&k.ed, &other).as_bytes(), NOW_MS)
        .unwrap();
    let for_first = mint_approval(&k.bob, &approval("a-1", "bob", &first));
    let err = k
        .verifier
        .verify_approval(for_first.as_bytes(), &second, NOW_MS)
        .unwrap_err();
    assert_eq!(err.code(), "wrong_command");
    // The right jti with the hash of another command.
    let mut mixed = approval("a-2", "bob", &second);
    mixed.approves.sha256 = first.binding.clone();
    let err = k
        .verifier
        .verify_approval(mint_approval(&k.bob, &mixed).as_bytes(), &second, NOW_MS)
        .unwrap_err();
    assert_eq!(err.code(), "wrong_command");
    // A refused approval is not recorded: the right one still passes.
    let right = approval("a-1", "bob", &second);
    assert!(k
        .verifier
        .verify_approval(mint_approval(&k.bob, &right).as_bytes(), &second, NOW_MS)
        .is_ok());
}

#[test]
fn a_full_replay_store_refuses_with_replay_store_unavailable() {
    let k = kit_with_capacity(2);
    for jti in ["c-1", "c-2"] {
        k.verifier
            .verify(mint_command(&k.ed, &claims(jti)).as_bytes(), NOW_MS)
            .unwrap();
    }
    assert_eq!(
        k.refuse(mint_command(&k.ed, &claims("c-3")).as_bytes()),
        "replay_store_unavailable"
    );
    // Once the recorded tokens are past exp + leeway, room is made again.
    let later_ms = NOW_MS + 120_000 + DEFAULT_LEEWAY_MS + 1;
    let mut c = claims("c-3");
    c.iat = later_ms / 1000;
    c.nbf = c.iat;
    c.exp = c.iat + 60;
    assert!(k
        .verifier
        .verify(mint_command(&k.ed, &c).as_bytes(), later_ms)
        .is_ok());
}

#[test]
fn a_trust_store_refuses_files_that_are_not_public_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.pem"),
        crate::pki::new_signing_key_pem().unwrap(),
    )
    .unwrap();
    assert!(OperatorTrustStore::load_dir(dir.path()).is_err());
    let k = OperatorKey::generate(Algorithm::ES256).unwrap();
    let mut store = OperatorTrustStore::new();
    let kid = store.add_pem(&k.public_key_pem(), "test").unwrap();
    assert_eq!(kid, k.kid());
    assert_eq!(store.get(&kid).unwrap().algorithm(), Algorithm::ES256);
}
