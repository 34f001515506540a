//! Commands from the twin, end to end: operator-signed tokens published on
//! the real Mosquitto, the gateway deciding under a policy, the simulated
//! PLC counting every write frame it receives.

use super::*;
use gateway::command_auth::mint::{sign_compact, sign_with_header};
use gateway::command_auth::{mint_approval, mint_command, Algorithm, OperatorKey};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use twin_model::audit::{parse_line, Event as AuditEvent};
use twin_model::command::{ApprovalClaims, Approves, CommandBody, CommandClaims, Envelope};
use twin_model::jws::{b64url, sha256};
use twin_model::result::{CommandResult, Status, RESULT_TYP};
use twin_testkit::sim::tank;

const ISSUER: &str = "plant-ops";

/// Operator limits out of the way, for tests that send many commands in a
/// row (the flood test keeps the defaults).
const FAST_OPERATORS: &str = "operator_rate_per_s = 1000\noperator_burst = 1000\n";

static JTI: AtomicU64 = AtomicU64::new(1);

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Command claims for `sub` writing `value` to `tag`, valid for two minutes.
pub(crate) fn claims(sub: &str, tag: &str, value: Value) -> CommandClaims {
    let now = now_s();
    CommandClaims {
        iss: ISSUER.into(),
        sub: sub.into(),
        aud: GW.into(),
        iat: now,
        nbf: now,
        exp: now + 120,
        jti: format!("cmd-{}-{}", now, JTI.fetch_add(1, Ordering::Relaxed)),
        roles: Vec::new(),
        amr: vec!["pwd".into()],
        cmd: CommandBody {
            tag: tag.into(),
            value,
            expect: None,
        },
    }
}

/// Alice (with a second factor) asks for manual mode.
fn manual_mode(sub: &str) -> CommandClaims {
    let mut c = claims(sub, "tank1.mode", Value::Int(1));
    c.amr = vec!["pwd".into(), "otp".into()];
    c
}

fn approval(key: &OperatorKey, sub: &str, command_token: &str, jti: &str) -> String {
    let now = now_s();
    mint_approval(
        key,
        &ApprovalClaims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: GW.into(),
            iat: now,
            nbf: now,
            exp: now + 120,
            jti: format!("apr-{}-{}", now, JTI.fetch_add(1, Ordering::Relaxed)),
            roles: Vec::new(),
            amr: vec!["pwd".into(), "otp".into()],
            approves: Approves {
                jti: jti.into(),
                sha256: twin_model::command::command_binding(command_token)
                    .expect("a token has a dot"),
            },
        },
    )
}

/// A UTC window of one hour that does not contain now (for `outside_window`).
fn closed_window() -> String {
    let hour = (now_s() / 3600) % 24;
    let from = (hour + 2) % 24;
    let to = (hour + 3) % 24;
    if to == 0 {
        format!("{{ days = \"mon-sun\", from = \"{from:02}:00\", to = \"23:59\", tz = \"UTC\" }}")
    } else {
        format!(
            "{{ days = \"mon-sun\", from = \"{from:02}:00\", to = \"{to:02}:00\", tz = \"UTC\" }}"
        )
    }
}

/// The policy of these tests (the example policy has staffed-hours
/// windows, which would make the tests depend on the time of day).
fn test_policy() -> String {
    format!(
        r#"
[policy]
mode = "enforce"

[[roles]]
name = "operator"
subjects = ["alice", "bob", "carol"]

[[rules]]
id = "setpoint"
roles = ["operator"]
tags = ["tank1.level_setpoint"]
min = 0.5
max = 4.5
max_step = 0.5
rate_per_tag = "2/min"
interlocks = [{{ tag = "tank1.mode", equals = 1 }}]

[[rules]]
id = "mode"
roles = ["operator"]
tags = ["tank1.mode"]
allowed = [0, 1]
require_mfa = true
approvals = 1

[[rules]]
id = "pump-stop"
roles = ["operator"]
tags = ["tank1.pump"]
allowed = [false]

[[rules]]
id = "pump-start-night"
roles = ["operator"]
tags = ["tank1.pump"]
allowed = [true]
windows = [{window}]
"#,
        window = closed_window()
    )
}

/// The gateway's side of the test: config with `[commands]`, the policy
/// and the operator keys in the test PKI's folder.
struct Setup {
    pki: TestPki,
    broker: Mosquitto,
    plc: PlcSim,
    /// Trusted (Ed25519, the identity provider's key).
    idp: OperatorKey,
    /// Trusted (P-256).
    idp_es: OperatorKey,
    /// Not in the trust store.
    stranger: OperatorKey,
    cfg: Config,
}

impl Setup {
    async fn new(extra_config: &str) -> anyhow::Result<Setup> {
        let pki = TestPki::new(GW)?;
        let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
        let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
        let idp = OperatorKey::generate(Algorithm::EdDSA)?;
        let idp_es = OperatorKey::generate(Algorithm::ES256)?;
        let stranger = OperatorKey::generate(Algorithm::EdDSA)?;
        let root = pki.root().to_path_buf();
        std::fs::create_dir_all(root.join("operators"))?;
        std::fs::write(root.join("operators/idp.pem"), idp.public_key_pem())?;
        std::fs::write(root.join("operators/idp-es.pem"), idp_es.public_key_pem())?;
        std::fs::create_dir_all(root.join("policies"))?;
        std::fs::write(root.join("policies/test.toml"), test_policy())?;
        let text = format!(
            "{}\n[commands]\npolicy_dir = \"policies\"\noperator_keys_dir = \"operators\"\nissuer = \"{ISSUER}\"\npolicy_reload_ms = 200\n{extra_config}",
            twin_testkit::render_example_config(broker.port(), plc.addr())?
        );
        let cfg = write_config(&root, &text, 50)?;
        Ok(Setup {
            pki,
            broker,
            plc,
            idp,
            idp_es,
            stranger,
            cfg,
        })
    }

    async fn start_gateway(&self) -> anyhow::Result<gateway::run::GatewayHandle> {
        let gw = gateway::run::start(self.cfg.clone()).await?;
        Ok(gw)
    }

    fn policy_dir(&self) -> std::path::PathBuf {
        self.pki.root().join("policies")
    }
}

/// The operator's side: publishes command messages and reads verified
/// results (and everything else of the gateway's topics).
struct Operator {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
    sub: Subscriber,
    trust: TrustStore,
    results: BTreeMap<String, CommandResult>,
    audit_lines: Vec<String>,
    alerts: Vec<twin_model::alert::Alert>,
    inventories: Vec<twin_model::inventory::Inventory>,
    sbom_index: Option<twin_model::inventory::SbomIndex>,
    sbom_parts: BTreeMap<usize, Vec<u8>>,
    online: u64,
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Operator {
    async fn start(s: &Setup) -> anyhow::Result<Operator> {
        let sub = Subscriber::start(
            &s.broker,
            &s.pki,
            "operator-watch",
            Identity::Operator,
            &format!("twin/{GW}/#"),
        )
        .await?;
        let opts = s
            .broker
            .client_options(&s.pki, "operator-send", Identity::Operator)?;
        let (client, mut events) = AsyncClient::new(opts, 1024);
        let task = tokio::spawn(async move {
            loop {
                if events.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let mut trust = TrustStore::new();
        trust.add_pem(&std::fs::read_to_string(&s.pki.gateway_signing_pub)?)?;
        Ok(Operator {
            client,
            task,
            sub,
            trust,
            results: BTreeMap::new(),
            audit_lines: Vec::new(),
            alerts: Vec::new(),
            inventories: Vec::new(),
            sbom_index: None,
            sbom_parts: BTreeMap::new(),
            online: 0,
        })
    }

    /// Takes every message that has arrived, or waits up to `wait` for one.
    async fn pump(&mut self, wait: Duration) -> anyhow::Result<bool> {
        let msg = match tokio::time::timeout(wait, self.sub.rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("the subscriber stopped"),
            Err(_) => return Ok(false),
        };
        let (topic, payload) = msg;
        // The payload of a signed message of type `typ`, verified.
        let trust = &self.trust;
        let verified = |typ: &str| -> anyhow::Result<Vec<u8>> {
            trust
                .verify_compact(&payload, typ, 1 << 20)
                .map(|v| v.payload)
                .map_err(|e| anyhow::anyhow!("a message on {topic} does not verify: {e}"))
        };
        use twin_model::inventory::{INVENTORY_TYP, SBOM_PART_TYP, SBOM_TYP};
        let sbom_part = topic
            .rsplit_once("/sbom/")
            .and_then(|(_, i)| i.parse::<usize>().ok());
        if topic.ends_with("/result") {
            let r: CommandResult = serde_json::from_slice(&verified(RESULT_TYP)?)?;
            self.results.insert(r.message_sha256.clone(), r);
        } else if topic.ends_with("/alerts") {
            let alert = verified(twin_model::alert::ALERT_TYP)?;
            self.alerts.push(serde_json::from_slice(&alert)?);
        } else if topic.ends_with("/inventory") {
            let inventory = verified(INVENTORY_TYP)?;
            self.inventories.push(serde_json::from_slice(&inventory)?);
        } else if topic.ends_with("/sbom") {
            self.sbom_index = Some(serde_json::from_slice(&verified(SBOM_TYP)?)?);
        } else if let Some(i) = sbom_part {
            let part = verified(SBOM_PART_TYP)?;
            self.sbom_parts.insert(i, part);
        } else if topic.ends_with("/audit") {
            self.audit_lines.push(String::from_utf8(payload)?);
        } else if topic.ends_with("/status") && payload.len() > 10 {
            // Signed status; `online` after each (re)connect.
            if let Ok(v) =
                self.trust
                    .verify_compact(&payload, twin_model::status::STATUS_TYP, 1 << 20)
            {
                if String::from_utf8_lossy(&v.payload).contains("\"online\"") {
                    self.online += 1;
                }
            }
        }
        Ok(true)
    }

    /// Takes every message that arrives during `d`.
    async fn pump_for(&mut self, d: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.pump(until - Instant::now()).await?;
        }
        Ok(())
    }

    /// Waits until the gateway has announced itself online `n` times (its
    /// command subscription is made before the announcement).
    async fn wait_online(&mut self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.online < n {
            if Instant::now() > deadline {
                bail!("the gateway did not come online ({} of {n})", self.online);
            }
            self.pump(Duration::from_millis(100)).await?;
        }
        Ok(())
    }

    async fn publish(&mut self, payload: Vec<u8>, retain: bool) -> anyhow::Result<String> {
        let digest = b64url(&sha256(&payload));
        // The same bytes sent again (a replay) get a result of their own.
        self.results.remove(&digest);
        self.client
            .publish(
                format!("twin/{GW}/command"),
                QoS::AtLeastOnce,
                retain,
                payload,
            )
            .await?;
        Ok(digest)
    }

    /// The verified result of the message with digest `digest`.
    async fn result_of(&mut self, digest: &str) -> anyhow::Result<CommandResult> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.results.get(digest) {
                return Ok(r.clone());
            }
            if Instant::now() > deadline {
                bail!("no result for message {digest} within 10 s");
            }
            self.pump(Duration::from_millis(100)).await?;
        }
    }

    /// Publishes `payload` and returns its verified result.
    async fn send(&mut self, payload: Vec<u8>) -> anyhow::Result<CommandResult> {
        let digest = self.publish(payload, false).await?;
        self.result_of(&digest).await
    }
}

/// A compact JWS with the given header and payload, signed by `key` (for
/// headers a correct operator tool would never write).
fn with_header(key: &OperatorKey, header: serde_json::Value, claims: &CommandClaims) -> String {
    sign_with_header(
        key,
        &serde_json::to_vec(&header).unwrap(),
        &serde_json::to_vec(claims).unwrap(),
    )
}

fn expect_refused(r: &CommandResult, code: &str, what: &str) {
    assert_eq!(
        (r.status, r.code.as_deref()),
        (Status::Refused, Some(code)),
        "{what}: {r:?}"
    );
}

fn expect_denied(r: &CommandResult, code: &str, what: &str) {
    assert_eq!(
        (r.status, r.code.as_deref()),
        (Status::Denied, Some(code)),
        "{what}: {r:?}"
    );
    assert!(r.audit_n.is_some(), "{what}: the decision is audited");
}

/// The reason codes found in the audit file, with how often each occurs.
fn audit_codes(path: &Path) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut codes = BTreeMap::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let rec = parse_line(line.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let code = match rec.event {
            AuditEvent::AuthFailure(a) => Some(a.code),
            AuditEvent::CommandDecision(d) => Some(d.reason_code.unwrap_or("permit".into())),
            AuditEvent::CommandOutcome(o) => Some(format!("outcome:{}", o.status)),
            AuditEvent::PolicyLoaded(_) => Some("policy_loaded".into()),
            AuditEvent::PolicyRejected(_) => Some("policy_rejected".into()),
            _ => None,
        };
        if let Some(c) = code {
            *codes.entry(c).or_default() += 1;
        }
    }
    Ok(codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_forged_malformed_or_unpermitted_command_is_refused_with_its_code_audited_and_writes_nothing(
) -> anyhow::Result<()> {
    init();
    let mut s = Setup::new(FAST_OPERATORS).await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    let key = &s.idp;

    // Wait until the gateway has read the tank once (step limits and
    // interlocks need current values).
    tokio::time::sleep(Duration::from_millis(300)).await;

    // -- the token ----------------------------------------------------------
    let base = claims("alice", "tank1.inlet_valve", Value::Bool(false));
    let header = |alg: &str, kid: &str| serde_json::json!({"alg": alg, "typ": "twin-command+jwt", "kid": kid});
    let unsigned = {
        let h = b64url(&serde_json::to_vec(&header("none", key.kid()))?);
        let p = b64url(&serde_json::to_vec(&base)?);
        format!("{h}.{p}.")
    };
    let r = op.send(unsigned.into_bytes()).await?;
    expect_refused(&r, "alg_none", "alg none");

    let hs256 = {
        let h = b64url(&serde_json::to_vec(&header("HS256", key.kid()))?);
        let p = b64url(&serde_json::to_vec(&base)?);
        let input = format!("{h}.{p}");
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                key.public_key_pem().as_bytes(),
            ),
            input.as_bytes(),
        );
        format!("{input}.{}", b64url(mac.as_ref()))
    };
    expect_refused(
        &op.send(hs256.into_bytes()).await?,
        "alg_hmac",
        "HS256 with the public key as secret",
    );

    let t = mint_command(
        &s.stranger,
        &claims("alice", "tank1.inlet_valve", Value::Bool(false)),
    );
    expect_refused(
        &op.send(t.into_bytes()).await?,
        "unknown_kid",
        "unknown kid",
    );

    let jku = with_header(
        &s.stranger,
        serde_json::json!({"alg": "EdDSA", "typ": "twin-command+jwt", "kid": s.stranger.kid(),
            "jku": "https://attacker.example/keys.json",
            "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(&s.stranger.public_key())}}),
        &claims("alice", "tank1.inlet_valve", Value::Bool(false)),
    );
    expect_refused(
        &op.send(jku.into_bytes()).await?,
        "unknown_kid",
        "jku and jwk pointing elsewhere are ignored",
    );

    let good = mint_command(
        key,
        &claims("alice", "tank1.inlet_valve", Value::Bool(false)),
    );
    let mut forged = good.clone().into_bytes();
    let at = forged.len() - 5;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    expect_refused(&op.send(forged).await?, "bad_signature", "bad signature");

    // Claims a correct token may not carry, each with its refusal.
    type Edit = fn(&mut CommandClaims);
    let edits: [(Edit, &str); 7] = [
        (
            |c| {
                c.iat -= 600;
                c.nbf -= 600;
                c.exp = c.iat + 120;
            },
            "expired",
        ),
        (
            |c| {
                c.nbf += 600;
                c.exp = c.iat + 290;
            },
            "not_yet_valid",
        ),
        (
            |c| {
                c.iat += 3600;
                c.exp = c.iat + 60;
            },
            "issued_in_future",
        ),
        (|c| c.exp = c.iat + 3600, "lifetime_too_long"),
        (|c| c.aud = "plant2-gw1".into(), "wrong_audience"),
        (|c| c.iss = "someone-else".into(), "wrong_issuer"),
        (|c| c.sub = String::new(), "bad_claims"),
    ];
    for (edit, code) in edits {
        let mut c = claims("alice", "tank1.inlet_valve", Value::Bool(false));
        edit(&mut c);
        let r = op.send(mint_command(key, &c).into_bytes()).await?;
        expect_refused(&r, code, code);
    }
    // -- the message ----------------------------------------------------------
    let big = vec![b'a'; 70 * 1024];
    expect_refused(&op.send(big).await?, "too_large", "oversized");
    expect_refused(
        &op.send(vec![0xff, 0xfe, b'.', 0x80]).await?,
        "not_utf8",
        "non-UTF-8",
    );
    let deep = format!("{{\"command\":{}1{}}}", "[".repeat(64), "]".repeat(64));
    expect_refused(
        &op.send(deep.into_bytes()).await?,
        "too_deep",
        "deeply nested envelope",
    );
    expect_refused(
        &op.send(br#"{"command":42}"#.to_vec()).await?,
        "bad_envelope",
        "wrong-typed envelope",
    );
    let wrong_typed = sign_compact(
        key,
        "twin-command+jwt",
        format!(
            r#"{{"iss":"{ISSUER}","sub":"alice","aud":"{GW}","iat":{n},"nbf":{n},"exp":{e},"jti":"typed-1","roles":[],"amr":[],"cmd":{{"tag":"tank1.mode","value":{{"nested":[1]}}}}}}"#,
            n = now_s(),
            e = now_s() + 60
        )
        .as_bytes(),
    );
    expect_refused(
        &op.send(wrong_typed.into_bytes()).await?,
        "bad_claims",
        "wrong-typed claims",
    );

    // -- the policy -----------------------------------------------------------
    let cmd = |sub: &str, tag: &str, v: Value| mint_command(key, &claims(sub, tag, v));
    let denials = [
        ("alice", "tank1.no_such_tag", Value::Int(1), "unknown_tag"),
        ("alice", "tank1.level", Value::Float(1.0), "read_only_tag"),
        ("mallory", "tank1.pump", Value::Bool(false), "role"),
        (
            "alice",
            "tank1.level_setpoint",
            Value::Float(4.9),
            "out_of_bounds",
        ),
        (
            "alice",
            "tank1.level_setpoint",
            Value::Float(3.5),
            "step_too_large",
        ),
        // The tank starts in auto mode; the rule needs manual.
        (
            "alice",
            "tank1.level_setpoint",
            Value::Float(2.7),
            "interlock",
        ),
        ("alice", "tank1.pump", Value::Bool(true), "outside_window"),
        ("alice", "tank1.mode", Value::Int(1), "mfa_required"),
    ];
    for (sub, tag, value, code) in denials {
        let r = op.send(cmd(sub, tag, value).into_bytes()).await?;
        expect_denied(&r, code, &format!("{sub} writing {tag}"));
    }
    let c = manual_mode("alice");
    let t = mint_command(&s.idp_es, &c);
    expect_denied(
        &op.send(t.into_bytes()).await?,
        "too_few_approvals",
        "too few approvals (ES256 token)",
    );
    let c = manual_mode("alice");
    let t = mint_command(key, &c);
    let twice = Envelope {
        command: t.clone(),
        approvals: vec![
            approval(key, "bob", &t, &c.jti),
            approval(key, "bob", &t, &c.jti),
        ],
    };
    expect_denied(
        &op.send(twice.to_message()).await?,
        "duplicate_approver",
        "approvals from the same operator twice",
    );
    let c = manual_mode("alice");
    let t = mint_command(key, &c);
    let own = Envelope {
        command: t.clone(),
        approvals: vec![approval(key, "alice", &t, &c.jti)],
    };
    expect_denied(
        &op.send(own.to_message()).await?,
        "duplicate_approver",
        "self-approval",
    );
    let other = mint_command(key, &claims("alice", "tank1.mode", Value::Int(0)));
    let moved = Envelope {
        command: t.clone(),
        approvals: vec![approval(key, "bob", &other, &c.jti)],
    };
    // The command's own jti was spent by the self-approval above.
    expect_refused(
        &op.send(moved.to_message()).await?,
        "replayed",
        "a spent command id",
    );
    let c = manual_mode("alice");
    let t = mint_command(key, &c);
    let moved = Envelope {
        command: t.clone(),
        approvals: vec![approval(key, "bob", &other, "another")],
    };
    expect_refused(
        &op.send(moved.to_message()).await?,
        "approval_wrong_command",
        "an approval of another command",
    );

    // -- replays ----------------------------------------------------------------
    let once = cmd("alice", "tank1.inlet_valve", Value::Bool(false));
    expect_denied(
        &op.send(once.clone().into_bytes()).await?,
        "no_rule",
        "a valid token for a tag without a rule",
    );
    expect_refused(
        &op.send(once.clone().into_bytes()).await?,
        "replayed",
        "replayed on the same connection",
    );

    s.broker.restart().await?;
    op.wait_online(2).await?;
    expect_refused(
        &op.send(once.clone().into_bytes()).await?,
        "replayed",
        "replayed after a reconnect",
    );

    // Retained: published while the gateway is down, delivered as retained
    // when it subscribes again after the restart.
    let stragglers = gw.stop().await;
    assert!(stragglers.is_empty(), "{stragglers:?}");
    let retained = cmd("alice", "tank1.pump", Value::Bool(false));
    let retained_digest = op.publish(retained.into_bytes(), true).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw = s.start_gateway().await?;
    op.wait_online(3).await?;
    expect_refused(
        &op.result_of(&retained_digest).await?,
        "retained",
        "a retained command",
    );
    expect_refused(
        &op.send(once.clone().into_bytes()).await?,
        "replayed",
        "replayed after a gateway restart",
    );

    // -- no policy, invalid policy ------------------------------------------------
    let dir = s.policy_dir();
    std::fs::rename(&dir, dir.with_extension("away"))?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    expect_denied(
        &op.send(cmd("alice", "tank1.pump", Value::Bool(false)).into_bytes())
            .await?,
        "no_policy",
        "policy folder removed",
    );
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("broken.toml"), "[policy]\nmode = \"enforce\"\n[[rules]]\nid = \"x\"\ntags = [\"tank1.pump\"]\nroles = [\"nobody\"]\nallowed = [false]\n")?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    expect_denied(
        &op.send(cmd("alice", "tank1.pump", Value::Bool(false)).into_bytes())
            .await?,
        "invalid_policy",
        "invalid policy",
    );

    assert_eq!(
        s.plc.write_frames(),
        0,
        "no refused command may reach the PLC"
    );

    let stragglers = gw.stop().await;
    assert!(stragglers.is_empty(), "{stragglers:?}");

    // Every refusal and decision is in the audit log, which verifies.
    let audit = s.cfg.audit.file.clone();
    let codes = audit_codes(&audit)?;
    for code in [
        "alg_none",
        "alg_hmac",
        "unknown_kid",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "lifetime_too_long",
        "wrong_audience",
        "wrong_issuer",
        "too_large",
        "not_utf8",
        "too_deep",
        "bad_envelope",
        "bad_claims",
        "unknown_tag",
        "read_only_tag",
        "role",
        "out_of_bounds",
        "step_too_large",
        "interlock",
        "outside_window",
        "mfa_required",
        "too_few_approvals",
        "duplicate_approver",
        "approval_wrong_command",
        "no_rule",
        "replayed",
        "retained",
        "no_policy",
        "invalid_policy",
        "policy_rejected",
    ] {
        assert!(
            codes.contains_key(code),
            "no audit record with code {code}: {codes:?}"
        );
    }
    assert!(!codes.contains_key("permit"), "{codes:?}");
    let mut trust = TrustStore::new();
    trust.add_pem(&std::fs::read_to_string(&s.pki.gateway_signing_pub)?)?;
    let report = gateway::audit::verify_file(&audit, &trust)?;
    assert!(report.is_ok(), "{report:?}");
    // The audit topic carried the same lines, in order.
    while op.pump(Duration::from_millis(200)).await? {}
    let file: Vec<String> = std::fs::read_to_string(&audit)?
        .lines()
        .map(str::to_owned)
        .collect();
    let forwarded: Vec<&String> = op.audit_lines.iter().filter(|l| file.contains(l)).collect();
    assert!(
        forwarded.len() + 5 >= file.len() && !forwarded.is_empty(),
        "{} of {} audit lines were forwarded",
        forwarded.len(),
        file.len()
    );
    s.plc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permitted_commands_write_the_exact_value_read_it_back_report_it_signed_and_update_the_twin(
) -> anyhow::Result<()> {
    init();
    let s = Setup::new(FAST_OPERATORS).await?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = &s.idp;

    // Manual mode: needs MFA and a second operator.
    let c = manual_mode("alice");
    let t = mint_command(key, &c);
    let env = Envelope {
        command: t.clone(),
        approvals: vec![approval(key, "bob", &t, &c.jti)],
    };
    let r = op.send(env.to_message()).await?;
    assert_eq!(r.status, Status::Applied, "{r:?}");
    assert_eq!(r.rule_id.as_deref(), Some("mode"));
    assert_eq!(r.readback, Some(Value::UInt(1)));
    assert_eq!(r.command_id.as_deref(), Some(c.jti.as_str()));
    assert_eq!(s.plc.holding(tank::MODE), 1, "FC 6 wrote the register");
    assert_eq!(s.plc.write_frames(), 1);

    // The setpoint in two permitted steps (u16 with scale 0.01), then the
    // rule's rate limit (2 per minute) stops the third.
    let sp = |v: f64| {
        mint_command(
            key,
            &claims("carol", "tank1.level_setpoint", Value::Float(v)),
        )
    };
    let r = op.send(sp(3.0).into_bytes()).await?;
    assert_eq!(
        (r.status, r.readback.clone()),
        (Status::Applied, Some(Value::Float(3.0))),
        "{r:?}"
    );
    assert_eq!(s.plc.holding(tank::LEVEL_SETPOINT), 300);
    let r = op.send(sp(3.4).into_bytes()).await?;
    assert_eq!(r.status, Status::Applied, "{r:?}");
    assert_eq!(s.plc.holding(tank::LEVEL_SETPOINT), 340);
    let r = op.send(sp(3.6).into_bytes()).await?;
    expect_denied(&r, "rate_limited", "third setpoint within a minute");
    assert_eq!(s.plc.holding(tank::LEVEL_SETPOINT), 340);
    assert_eq!(s.plc.write_frames(), 3);

    // The pump stop is a coil (FC 5).
    let stop = mint_command(key, &claims("alice", "tank1.pump", Value::Bool(false)));
    let r = op.send(stop.into_bytes()).await?;
    assert_eq!(
        (r.status, r.readback.clone()),
        (Status::Applied, Some(Value::Bool(false))),
        "{r:?}"
    );
    assert_eq!(s.plc.write_frames(), 4);

    // `expect` guards against a stale screen: the mode is 1, not 0, so
    // nothing is written.
    let mut c = claims("alice", "tank1.pump", Value::Bool(false));
    c.cmd.expect = Some(Value::Bool(true));
    let r = op.send(mint_command(key, &c).into_bytes()).await?;
    assert_eq!(
        (r.status, r.code.as_deref()),
        (Status::Failed, Some("expect_mismatch")),
        "{r:?}"
    );
    assert_eq!(s.plc.write_frames(), 4, "an expect mismatch writes nothing");

    // The twin shows the new values with the command that caused them.
    let mode_cmd = c_jti_of(&op, "tank1.mode");
    twin.until(
        Duration::from_secs(10),
        "the reported twin names the command",
        |t| {
            t.view()
                .reported
                .as_ref()
                .and_then(|r| r.tags.get("tank1.mode"))
                .is_some_and(|s| {
                    s.command_id.as_deref() == Some(mode_cmd.as_str())
                        && s.value == Some(Value::UInt(1))
                })
                && t.view()
                    .reported
                    .as_ref()
                    .and_then(|r| r.tags.get("tank1.level_setpoint"))
                    .is_some_and(|s| s.value == Some(Value::Float(3.4)))
        },
    )
    .await?;
    let reported = twin.view().reported.expect("a reported twin");
    let setpoint = &reported.tags["tank1.level_setpoint"];
    assert_eq!(setpoint.value, Some(Value::Float(3.4)));
    assert!(setpoint.command_id.is_some());
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());

    let stragglers = gw.stop().await;
    assert!(stragglers.is_empty(), "{stragglers:?}");
    let codes = audit_codes(&s.cfg.audit.file)?;
    assert_eq!(codes.get("permit"), Some(&5), "{codes:?}");
    assert_eq!(codes.get("outcome:applied"), Some(&4), "{codes:?}");
    assert_eq!(codes.get("outcome:failed"), Some(&1), "{codes:?}");
    s.plc.stop().await;
    Ok(())
}

/// The command id of the applied command that wrote `tag`.
fn c_jti_of(op: &Operator, tag: &str) -> String {
    op.results
        .values()
        .find(|r| r.status == Status::Applied && r.tag.as_deref() == Some(tag))
        .and_then(|r| r.command_id.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_register_value_is_written_in_one_fc16_request_in_the_tags_byte_order(
) -> anyhow::Result<()> {
    init();
    let bulk = PlcSim::start_bulk("127.0.0.1:0".parse()?, 64).await?;
    // The bench device changes every register every 10 ms; hold it still so
    // that what is read back is what was written.
    bulk.freeze(true);
    let extra = format!(
        r#"
[[devices]]
name = "bulk"
protocol = "modbus-tcp"
address = "{addr}"
unit_id = 1
poll_interval_ms = 100

[[devices.tags]]
name = "bulk.limit"
area = "holding_register"
address = 10
type = "f32"
order = "CDAB"
writable = true

[[devices.tags]]
name = "bulk.counter"
area = "holding_register"
address = 20
type = "u64"
order = "DCBA"
writable = true
"#,
        addr = bulk.addr()
    );
    let mut s = Setup::new(FAST_OPERATORS).await?;
    let mut text = std::fs::read_to_string(&s.cfg.source)?;
    // Devices must come after the other tables: append to the device list.
    text.push_str(&extra);
    s.cfg = write_config(s.pki.root(), &text, 50)?;
    std::fs::write(
        s.policy_dir().join("bulk.toml"),
        r#"
[[roles]]
name = "engineer"
subjects = ["erin"]

[[rules]]
id = "bulk"
roles = ["engineer"]
tags = ["bulk.*"]
min = 0
max = 1e17
"#,
    )?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    let key = &s.idp;

    let r = op
        .send(mint_command(key, &claims("erin", "bulk.limit", Value::Float(1234.5))).into_bytes())
        .await?;
    assert_eq!(
        (r.status, r.readback.clone()),
        (Status::Applied, Some(Value::Float(1234.5))),
        "{r:?}"
    );
    let be = 1234.5f32.to_be_bytes();
    let (hi, lo) = (
        u16::from_be_bytes([be[0], be[1]]),
        u16::from_be_bytes([be[2], be[3]]),
    );
    assert_eq!(bulk.holdings(10, 2), vec![lo, hi], "CDAB: low word first");

    let r = op
        .send(
            mint_command(
                key,
                &claims("erin", "bulk.counter", Value::UInt(0x0102_0304_0506_0708)),
            )
            .into_bytes(),
        )
        .await?;
    assert_eq!(r.status, Status::Applied, "{r:?}");
    assert_eq!(
        bulk.holdings(20, 4),
        vec![0x0807, 0x0605, 0x0403, 0x0201],
        "DCBA"
    );
    assert_eq!(
        bulk.write_frames(),
        2,
        "one FC 16 request per value, never split"
    );
    assert_eq!(s.plc.write_frames(), 0);

    gw.stop().await;
    bulk.stop().await;
    s.plc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_change_is_swapped_in_an_invalid_one_is_rejected_and_a_candidate_runs_in_shadow(
) -> anyhow::Result<()> {
    init();
    let s = Setup::new("candidate_policy_dir = \"policies-next\"\n").await?;
    let next = s.pki.root().join("policies-next");
    std::fs::create_dir_all(&next)?;
    // The candidate lets the pump start at any hour.
    std::fs::write(
        next.join("test.toml"),
        test_policy().replace(&format!("windows = [{}]", closed_window()), ""),
    )?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = &s.idp;
    let cmd = |tag: &str, v: Value| mint_command(key, &claims("alice", tag, v));

    // Shadow: enforced denies (window), the candidate would permit.
    let r = op
        .send(cmd("tank1.pump", Value::Bool(true)).into_bytes())
        .await?;
    expect_denied(&r, "outside_window", "enforced policy");

    // No rule for the inlet valve yet.
    let r = op
        .send(cmd("tank1.inlet_valve", Value::Bool(false)).into_bytes())
        .await?;
    expect_denied(&r, "no_rule", "before the change");

    // A valid change: swapped in.
    let file = s.policy_dir().join("test.toml");
    let valve_rule = "\n[[rules]]\nid = \"valve-close\"\nroles = [\"operator\"]\ntags = [\"tank1.inlet_valve\"]\nallowed = [false]\n";
    std::fs::write(&file, format!("{}{valve_rule}", test_policy()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = op
            .send(cmd("tank1.inlet_valve", Value::Bool(false)).into_bytes())
            .await?;
        if r.status != Status::Denied || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (r.status, r.rule_id.as_deref()),
        (Status::Applied, Some("valve-close")),
        "{r:?}"
    );

    // An invalid change: rejected, the policy in force stays.
    std::fs::write(
        &file,
        format!("{}{valve_rule}\nunknown_key = 1\n", test_policy()),
    )?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = op
        .send(cmd("tank1.inlet_valve", Value::Bool(false)).into_bytes())
        .await?;
    assert_eq!(
        (r.status, r.rule_id.as_deref()),
        (Status::Applied, Some("valve-close")),
        "{r:?}"
    );
    assert!(gw.downlink_stats.policy_rejections.load(Ordering::Relaxed) >= 1);

    gw.stop().await;
    let mut shadow = Vec::new();
    let mut rejected = Vec::new();
    for line in std::fs::read_to_string(&s.cfg.audit.file)?.lines() {
        match parse_line(line.as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .event
        {
            AuditEvent::ShadowDifference(d) => shadow.push(d),
            AuditEvent::PolicyRejected(p) => rejected.push(p),
            _ => {}
        }
    }
    let pump = shadow
        .iter()
        .find(|d| d.tag == "tank1.pump")
        .expect("a shadow difference for the pump");
    assert_eq!(pump.enforced, "deny:outside_window");
    assert_eq!(pump.candidate, "permit");
    assert_eq!(pump.candidate_rule.as_deref(), Some("pump-start-night"));
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0]
            .errors
            .iter()
            .any(|e| e.contains("unknown_key") && e.contains("test.toml:")),
        "the rejection names the file and the line: {:?}",
        rejected[0].errors
    );
    s.plc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_writable_audit_log_commands_are_refused_while_telemetry_goes_on(
) -> anyhow::Result<()> {
    init();
    let s = Setup::new("\n[audit]\nfile = \"audit-dir/audit.jsonl\"\n").await?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    let key = &s.idp;

    let r = op
        .send(mint_command(key, &claims("alice", "tank1.pump", Value::Bool(false))).into_bytes())
        .await?;
    expect_refused(&r, "audit_unavailable", "no audit log");
    assert_eq!(s.plc.write_frames(), 0);
    let before = twin.view().batches;
    twin.until(
        Duration::from_secs(10),
        "telemetry while commands are refused",
        |t| t.view().batches >= before + 10,
    )
    .await?;
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());

    // Once the log can be written, commands are taken again.
    std::fs::create_dir_all(s.pki.root().join("audit-dir"))?;
    let r = op
        .send(mint_command(key, &claims("alice", "tank1.pump", Value::Bool(false))).into_bytes())
        .await?;
    assert_eq!(r.status, Status::Applied, "{r:?}");
    gw.stop().await;
    s.plc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_commands_neither_delays_telemetry_nor_passes_more_than_the_rate_limits(
) -> anyhow::Result<()> {
    init();
    let s = Setup::new("").await?;
    let cc = s.cfg.commands.clone().expect("commands configured");
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    twin.until(Duration::from_secs(10), "telemetry", |t| {
        t.view().batches >= 5
    })
    .await?;

    // Valid, permitted commands (pump stop has no rate limit in the
    // policy) mixed with forged ones, published as fast as the client can.
    const N: usize = 6000;
    let key = &s.idp;
    let messages: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let t = if i % 2 == 0 {
                mint_command(key, &claims("alice", "tank1.pump", Value::Bool(false)))
            } else {
                mint_command(
                    &s.stranger,
                    &claims("alice", "tank1.pump", Value::Bool(false)),
                )
            };
            t.into_bytes()
        })
        .collect();
    let opts = s
        .broker
        .client_options(&s.pki, "flooder", Identity::Operator)?;
    let (flooder, mut events) = AsyncClient::new(opts, 4096);
    let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let flood_started = Instant::now();
    for (i, m) in messages.into_iter().enumerate() {
        let qos = if i % 3 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        flooder
            .publish(format!("twin/{GW}/command"), qos, false, m)
            .await?;
    }
    // Watch telemetry while the gateway works through the flood.
    let batches_before = twin.view().batches;
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        let seen = twin.view().batches;
        twin.until(Duration::from_secs(5), "telemetry during the flood", |t| {
            t.view().batches > seen
        })
        .await?;
        max_gap = max_gap.max(last.elapsed());
        last = Instant::now();
    }
    let flood_s = flood_started.elapsed().as_secs_f64();
    let batches = twin.view().batches - batches_before;
    poller.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = gw.downlink_stats.clone();
    let link = gw.link_stats.clone();
    gw.stop().await;

    let received = link.received.load(Ordering::Relaxed);
    let handled = stats.handled.load(Ordering::Relaxed);
    let dropped = stats.dropped.load(Ordering::Relaxed);
    let applied = stats.applied.load(Ordering::Relaxed);
    let window_s = flood_s + 1.0;
    let global_max = f64::from(cc.burst) + f64::from(cc.rate_per_s) * window_s;
    let operator_max = f64::from(cc.operator_burst) + f64::from(cc.operator_rate_per_s) * window_s;
    println!(
        "flood: {received} received in {flood_s:.1} s, {handled} handled, {dropped} dropped unread, {applied} applied; telemetry: {batches} batches, longest gap {max_gap:?}"
    );
    assert!(
        received >= 1000,
        "the flood reached the gateway: {received}"
    );
    assert!(
        handled as f64 <= global_max,
        "{handled} handled > {global_max}"
    );
    assert!(
        applied as f64 <= operator_max,
        "{applied} applied > {operator_max}"
    );
    assert!(applied >= 1, "valid commands still pass within the limits");
    assert_eq!(
        s.plc.write_frames(),
        applied,
        "one write frame per applied command"
    );
    assert!(
        max_gap < Duration::from_secs(1),
        "telemetry stalled for {max_gap:?}"
    );
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    let codes = audit_codes(&s.cfg.audit.file)?;
    let summarised: u64 = std::fs::read_to_string(&s.cfg.audit.file)?
        .lines()
        .filter_map(|l| match parse_line(l.as_bytes()).ok()?.event {
            AuditEvent::CommandsDropped(d) => Some(d.count),
            _ => None,
        })
        .sum();
    assert_eq!(
        summarised, dropped,
        "every dropped message is counted in the audit log: {codes:?}"
    );
    assert!(handled + dropped <= received);
    s.plc.stop().await;
    Ok(())
}

/// `GET path` on the metrics endpoint: status line and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header")?;
    Ok((
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    ))
}

/// The samples of a Prometheus text exposition, by `name{labels}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_endpoint_counts_what_happened_and_health_follows_the_devices(
) -> anyhow::Result<()> {
    init();
    let s = Setup::new("\n[metrics]\nlisten = \"127.0.0.1:0\"\n").await?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    let addr = gw.metrics_addr.context("metrics configured")?;
    assert!(addr.ip().is_loopback());
    op.wait_online(1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = &s.idp;

    let r = op
        .send(mint_command(key, &claims("alice", "tank1.pump", Value::Bool(false))).into_bytes())
        .await?;
    assert_eq!(r.status, Status::Applied, "{r:?}");
    let r = op
        .send(mint_command(key, &claims("alice", "tank1.no_such_tag", Value::Int(1))).into_bytes())
        .await?;
    expect_denied(&r, "unknown_tag", "unknown tag");
    let r = op
        .send(
            mint_command(
                &s.stranger,
                &claims("alice", "tank1.pump", Value::Bool(false)),
            )
            .into_bytes(),
        )
        .await?;
    expect_refused(&r, "unknown_kid", "unknown key");
    twin.until(Duration::from_secs(10), "telemetry", |t| {
        t.view().batches >= 5
    })
    .await?;

    let (status, body) = http_get(addr, "/metrics").await?;
    assert!(status.contains("200"), "{status}");
    let m = samples(&body);
    let get = |k: &str| m.get(k).copied().unwrap_or(-1.0);
    assert_eq!(
        get(r#"twin_commands_total{status="applied",code="ok"}"#),
        1.0,
        "{body}"
    );
    assert_eq!(
        get(r#"twin_commands_total{status="denied",code="unknown_tag"}"#),
        1.0
    );
    assert_eq!(
        get(r#"twin_commands_total{status="refused",code="unknown_kid"}"#),
        1.0
    );
    assert_eq!(
        get(r#"twin_device_writes_total{device="plc1",result="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"twin_device_writes_total{device="plc1",result="failed"}"#),
        0.0
    );
    assert_eq!(get(r#"twin_device_connected{device="plc1"}"#), 1.0);
    assert!(
        get(r#"twin_device_reads_total{device="plc1"}"#) >= 5.0,
        "{body}"
    );
    assert_eq!(get(r#"twin_device_read_errors_total{device="plc1"}"#), 0.0);
    assert_eq!(get(r#"twin_device_exceptions_total{device="plc1"}"#), 0.0);
    assert_eq!(get(r#"twin_device_timeouts_total{device="plc1"}"#), 0.0);
    assert_eq!(get(r#"twin_device_connects_total{device="plc1"}"#), 1.0);
    assert_eq!(get("twin_mqtt_connected"), 1.0);
    assert_eq!(get("twin_policy_in_force"), 1.0);
    let signed = get("twin_batches_signed_total");
    assert!(
        signed >= twin.view().batches as f64,
        "{signed} < {}",
        twin.view().batches
    );
    assert_eq!(get("twin_last_seq"), signed, "one seq per signed batch");
    assert!(get("process_resident_memory_bytes") > 1e6);
    assert_eq!(get("twin_commands_dropped_total"), 0.0);

    let (status, body) = http_get(addr, "/health").await?;
    assert!(
        status.contains("200") && body.starts_with("ready"),
        "{status} {body}"
    );
    // Three polls answered with an exception: counted as such.
    s.plc
        .set_exception(Some(tokio_modbus::ExceptionCode::ServerDeviceBusy));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(addr, "/metrics").await?;
        let m = samples(&body);
        let exceptions = m
            .get(r#"twin_device_exceptions_total{device="plc1"}"#)
            .copied()
            .unwrap_or_default();
        if exceptions >= 3.0 {
            let errors = m
                .get(r#"twin_device_read_errors_total{device="plc1"}"#)
                .copied()
                .unwrap_or_default();
            assert!(errors >= exceptions, "exceptions are errors too: {body}");
            break;
        }
        if Instant::now() > deadline {
            bail!("exceptions not counted: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.plc.set_exception(None);
    s.plc.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(addr, "/health").await?;
        if status.contains("503") {
            assert!(body.contains("device plc1 not connected"), "{body}");
            break;
        }
        if Instant::now() > deadline {
            bail!("still ready with the PLC gone: {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = http_get(addr, "/metrics").await?;
    assert!(
        samples(&body)
            .get(r#"twin_device_read_errors_total{device="plc1"}"#)
            .is_some_and(|n| *n >= 1.0),
        "{body}"
    );
    let (status, _) = http_get(addr, "/other").await?;
    assert!(status.contains("404"), "{status}");
    gw.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_implausible_value_is_flagged_inside_the_signed_sample_and_alerted_once(
) -> anyhow::Result<()> {
    init();
    let mut s = Setup::new("").await?;
    let text = std::fs::read_to_string(&s.cfg.source)?.replacen(
        "name = \"tank1.level_setpoint\"\n",
        "name = \"tank1.level_setpoint\"\ncheck = { min = 0.5, max = 4.5 }\n",
        1,
    );
    s.cfg = write_config(s.pki.root(), &text, 50)?;
    assert!(s.cfg.checks.contains_key("tank1.level_setpoint"));
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    twin.until(Duration::from_secs(10), "telemetry", |t| {
        t.view().batches >= 10
    })
    .await?;
    // A clean run: no alert.
    op.pump_for(Duration::from_millis(500)).await?;
    assert!(op.alerts.is_empty(), "{:?}", op.alerts);

    s.plc.set_holding(tank::LEVEL_SETPOINT, 480); // 4.8 m
    let deadline = Instant::now() + Duration::from_secs(10);
    while !op.alerts.iter().any(|a| a.code == "sensor_out_of_range") {
        if Instant::now() > deadline {
            bail!("no sensor_out_of_range alert: {:?}", op.alerts);
        }
        op.pump(Duration::from_millis(100)).await?;
    }
    let a = op
        .alerts
        .iter()
        .find(|a| a.code == "sensor_out_of_range")
        .expect("found above");
    assert_eq!(a.subject, "tag:tank1.level_setpoint");
    assert_eq!(a.evidence.get("max"), Some(&serde_json::json!(4.5)));
    // Every poll is flagged; the alert is not repeated within its window.
    op.pump_for(Duration::from_millis(600)).await?;
    assert_eq!(
        op.alerts
            .iter()
            .filter(|a| a.code == "sensor_out_of_range")
            .count(),
        1,
        "{:?}",
        op.alerts
    );
    twin.until(Duration::from_secs(10), "a flagged sample", |t| {
        t.telemetry.iter().any(|jws| {
            let payload = jws
                .split('.')
                .nth(1)
                .and_then(twin_model::jws::b64url_decode)
                .and_then(|b| serde_json::from_slice::<twin_model::BatchPayload>(&b).ok());
            payload.is_some_and(|p| {
                p.samples.iter().any(|s| {
                    s.tag == "tank1.level_setpoint" && s.flags == vec!["out_of_range".to_string()]
                })
            })
        })
    })
    .await?;
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    gw.stop().await;
    let audited = std::fs::read_to_string(&s.cfg.audit.file)?
        .lines()
        .filter(|l| l.contains(r#""kind":"alert""#))
        .count();
    assert!(audited >= 1, "the alert is in the audit log");
    s.plc.stop().await;
    Ok(())
}

/// Waits until `op` holds an alert with `code`, at most `within`.
async fn alert_within(
    op: &mut Operator,
    code: &str,
    within: Duration,
) -> anyhow::Result<twin_model::alert::Alert> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(a) = op.alerts.iter().find(|a| a.code == code) {
            return Ok(a.clone());
        }
        if Instant::now() > deadline {
            bail!("no {code} alert within {within:?}: {:?}", op.alerts);
        }
        op.pump(Duration::from_millis(100)).await?;
    }
}

/// Waits until the latest inventory satisfies `ok`.
async fn inventory_where(
    op: &mut Operator,
    what: &str,
    ok: impl Fn(&twin_model::inventory::Inventory) -> bool,
) -> anyhow::Result<twin_model::inventory::Inventory> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(inv) = op.inventories.last().filter(|i| ok(i)) {
            return Ok(inv.clone());
        }
        if Instant::now() > deadline {
            bail!("no inventory with {what}: {:?}", op.inventories.last());
        }
        op.pump(Duration::from_millis(100)).await?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_holds_the_real_identities_and_a_swapped_device_a_foreign_unit_an_exception_storm_and_a_command_at_night_raise_alerts(
) -> anyhow::Result<()> {
    use twin_model::inventory::field;
    use twin_testkit::sim;
    init();
    // Usual hours: one hour, six hours from now (UTC), so that now is not.
    let h = (now_s() / 3600) % 24;
    let watch = format!(
        "[watch]\nusual_hours = {{ from = \"{:02}:00\", to = \"{:02}:00\", tz = \"UTC\" }}\n",
        (h + 6) % 24,
        (h + 7) % 24
    );
    let mut s = Setup::new(&format!("{FAST_OPERATORS}{watch}")).await?;
    // The PLC behind a proxy that can make another unit id answer.
    let proxy = twin_testkit::rogue::UnitRewriter::start(s.plc.addr())?;
    let text = std::fs::read_to_string(&s.cfg.source)?.replacen(
        &format!("\"{}\"", s.plc.addr()),
        &format!("\"{}\"", proxy.addr()),
        1,
    );
    s.cfg = write_config(s.pki.root(), &text, 50)?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;

    // The inventory: the simulator's identity as read over FC 43/14.
    let inv = inventory_where(&mut op, "the PLC's identity", |i| {
        i.devices.first().is_some_and(|d| d.identity.is_some())
    })
    .await?;
    let dev = &inv.devices[0];
    assert_eq!(
        (dev.name.as_str(), dev.protocol.as_str(), dev.unit_id),
        ("plc1", "modbus_tcp", Some(1))
    );
    assert_eq!(dev.endpoint, proxy.addr().to_string());
    assert_eq!(dev.tags.len(), 16);
    assert!(dev.writable.contains(&"tank1.level_setpoint".to_string()));
    let fields = &dev.identity.as_ref().expect("checked above").fields;
    let real = sim::Identity::default_tank();
    assert_eq!(fields.get(field::VENDOR_NAME), Some(&real.vendor));
    assert_eq!(fields.get(field::PRODUCT_CODE), Some(&real.product_code));
    assert_eq!(fields.get(field::REVISION), Some(&real.revision));
    assert_eq!(fields.get(field::MODEL_NAME), real.model_name.as_ref());
    assert!(s.plc.identification_frames() >= 1);
    // The gateway itself.
    let g = &inv.gateway;
    assert_eq!(g.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(g.deployment_profile, "production");
    assert!(
        g.features.contains(&"commands".to_string())
            && g.features.contains(&"modbus_tcp".to_string())
    );
    assert_eq!(
        g.config_sha256,
        b64url(&sha256(&std::fs::read(&s.cfg.source)?)),
        "the hash of the file read at start"
    );
    assert!(g.policy_sha256.is_some(), "a policy is in force");
    let client_der = x509_der(&s.pki.gateway.cert)?;
    let mqtt_client = g
        .certificates
        .iter()
        .find(|c| c.role == "mqtt_client")
        .expect("the MQTT client certificate is listed");
    assert_eq!(mqtt_client.sha256, hex(&sha256(&client_der)));
    assert!(mqtt_client.subject.contains(GW) && mqtt_client.not_after_ms > 0);
    assert!(g.certificates.iter().any(|c| c.role == "mqtt_ca"));
    assert!(g
        .keys
        .iter()
        .any(|k| k.role == "telemetry_signing" && k.kid == gw.kid));
    assert_eq!(g.keys.iter().filter(|k| k.role == "operator").count(), 2);
    // The SBOM it names: signed parts, each within the message size limit,
    // that together make a CycloneDX document with the same hash.
    let deadline = Instant::now() + Duration::from_secs(10);
    let complete = |op: &Operator| {
        op.sbom_index
            .as_ref()
            .is_some_and(|i| (0..i.parts.len()).all(|k| op.sbom_parts.contains_key(&k)))
    };
    while !complete(&op) && Instant::now() < deadline {
        op.pump(Duration::from_millis(100)).await?;
    }
    let index = op
        .sbom_index
        .clone()
        .context("no SBOM index was published")?;
    assert!(
        index.parts.len() >= 2,
        "the example's 128 KiB limit needs parts"
    );
    let mut sbom = Vec::new();
    for (k, hash) in index.parts.iter().enumerate() {
        let part = op.sbom_parts.get(&k).context("an SBOM part is missing")?;
        assert_eq!(&hex(&sha256(part)), hash);
        sbom.extend_from_slice(part);
    }
    assert_eq!(sbom.len(), index.bytes);
    assert_eq!(hex(&sha256(&sbom)), g.sbom_sha256);
    assert_eq!(index.sha256, g.sbom_sha256);
    let doc: serde_json::Value = serde_json::from_slice(&sbom)?;
    assert_eq!(doc["specVersion"], "1.5");
    assert!(doc["components"]
        .as_array()
        .is_some_and(|c| c.len() == g.sbom_components && c.iter().any(|c| c["name"] == "tokio")));
    // The platform team's view: `twinctl inventory` fetches the retained
    // messages, verifies them and reassembles the same SBOM.
    let opts = twinctl::client::ClientOptions {
        host: "127.0.0.1".into(),
        port: s.broker.port(),
        ca_file: s.pki.ca_cert.clone(),
        cert_file: s.pki.operator_client.cert.clone(),
        key_file: s.pki.operator_client.key.clone(),
        client_id: "platform-team".into(),
    };
    let fetched =
        twinctl::inventory::fetch(&opts, "twin", GW, op.trust.clone(), Duration::from_secs(10))
            .await?
            .map_err(|p| anyhow::anyhow!("twinctl inventory: {p:?}"))?;
    assert_eq!(fetched.sbom, sbom);
    assert_eq!(fetched.inventory.gateway, inv.gateway);
    let text = twinctl::inventory::describe(&fetched);
    assert!(
        text.contains(&real.vendor) && text.contains("certificate mqtt_client"),
        "{text}"
    );

    // A clean run raises no alert.
    op.pump_for(Duration::from_secs(2)).await?;
    assert!(op.alerts.is_empty(), "{:?}", op.alerts);

    // The device is swapped for one with other firmware: noticed at the
    // next connection.
    let mut swapped = real.clone();
    swapped.revision = "9.9.9".into();
    s.plc.set_identity(swapped);
    s.plc.stop().await;
    s.plc.restart().await?;
    let a = alert_within(&mut op, "device_identity_changed", Duration::from_secs(15)).await?;
    assert_eq!(a.subject, "device:plc1");
    assert_eq!(
        a.evidence["changes"],
        serde_json::json!([{"field": "revision", "before": real.revision, "after": "9.9.9"}])
    );
    let inv = inventory_where(&mut op, "the new revision", |i| {
        i.devices[0].identity_changed_ms.is_some()
    })
    .await?;
    assert_eq!(
        inv.devices[0]
            .identity
            .as_ref()
            .and_then(|i| i.fields.get(field::REVISION)),
        Some(&"9.9.9".to_string())
    );
    assert!(s
        .cfg
        .gateway
        .data_dir
        .join(gateway::inventory::IDENTITIES_FILE)
        .exists());

    // Another unit id answers in place of the PLC.
    proxy.set_answer_unit(Some(7));
    let a = alert_within(&mut op, "device_unknown_answering", Duration::from_secs(10)).await?;
    assert_eq!(a.evidence["answered"], "unit 7");
    assert_eq!(a.subject, "device:plc1");
    proxy.set_answer_unit(None);

    // An exception storm.
    s.plc
        .set_exception(Some(tokio_modbus::ExceptionCode::ServerDeviceBusy));
    let a = alert_within(&mut op, "device_exception_storm", Duration::from_secs(15)).await?;
    assert!(
        a.evidence["exceptions"].as_u64().is_some_and(|n| n >= 3),
        "{a:?}"
    );
    s.plc.set_exception(None);

    // A command outside the usual hours: decided as usual, and alerted.
    let t = mint_command(
        &s.idp,
        &claims("carol", "tank1.level_setpoint", Value::Float(2.5)),
    );
    op.send(t.into_bytes()).await?;
    let a = alert_within(&mut op, "command_outside_hours", Duration::from_secs(5)).await?;
    assert_eq!(a.subject, "operator:carol");
    assert!(
        !op.alerts.iter().any(|a| a.code.starts_with("command_new")),
        "operators are learned for the first week: {:?}",
        op.alerts
    );

    gw.stop().await;
    // Every alert is in the audit log.
    let audit = std::fs::read_to_string(&s.cfg.audit.file)?;
    for code in [
        "device_identity_changed",
        "device_unknown_answering",
        "device_exception_storm",
        "command_outside_hours",
    ] {
        assert!(
            audit.contains(&format!("\"code\":\"{code}\"")),
            "{code} is audited"
        );
    }
    s.plc.stop().await;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    gateway::inventory::hex(bytes)
}

/// The DER of the first certificate of a PEM file.
fn x509_der(path: &Path) -> anyhow::Result<Vec<u8>> {
    gateway::selfcheck::certificate_ders(&std::fs::read(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .into_iter()
        .next()
        .context("no certificate in the file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_with_the_gateways_identity_and_a_refused_certificate_raise_broker_alerts(
) -> anyhow::Result<()> {
    init();
    let mut s = Setup::new("").await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    op.pump_for(Duration::from_secs(1)).await?;
    assert!(op.alerts.is_empty(), "{:?}", op.alerts);

    // A copy of the gateway's certificate in other hands: a client that
    // connects with the gateway's client id, and again whenever it is
    // thrown out. The broker hands the session back and forth.
    let opts = s
        .broker
        .client_options(&s.pki, &s.cfg.mqtt.client_id, Identity::Gateway)?;
    let intruder = tokio::spawn(async move {
        loop {
            let (_client, mut events) = AsyncClient::new(opts.clone(), 16);
            while events.poll().await.is_ok() {}
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let a = alert_within(&mut op, "broker_session_takeover", Duration::from_secs(60)).await;
    intruder.abort();
    let a = a?;
    assert_eq!(a.subject, "gateway");
    assert!(
        a.evidence["short_sessions"]
            .as_u64()
            .is_some_and(|n| n >= 3),
        "{a:?}"
    );
    gw.stop().await;
    let audit = std::fs::read_to_string(&s.cfg.audit.file)?;
    assert!(audit.contains("\"code\":\"broker_session_takeover\""));

    // A client certificate the broker does not accept (another CA): the
    // alert cannot reach the twin, but it is in the audit log.
    let text = std::fs::read_to_string(&s.cfg.source)?
        .replacen("pki/gateway.crt.pem", "pki/rogue-client.crt.pem", 1)
        .replacen("pki/gateway.key.pem", "pki/rogue-client.key.pem", 1);
    s.cfg = write_config(s.pki.root(), &text, 50)?;
    let gw = s.start_gateway().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audit = std::fs::read_to_string(&s.cfg.audit.file)?;
        if audit
            .lines()
            .filter(|l| l.contains("\"code\":\"broker_auth_failure\""))
            .count()
            >= 1
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("no broker_auth_failure alert in the audit log");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.stop().await;
    s.plc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_identify_itself_as_expected_is_not_read_until_it_does(
) -> anyhow::Result<()> {
    use twin_testkit::sim;
    init();
    let mut s = Setup::new("").await?;
    let text = std::fs::read_to_string(&s.cfg.source)?
        .replacen(
            "# identify = true",
            "expect_identity = { vendor_name = \"Twin Gateway Project\", product_code = \"TANK-SIM\" }",
            1,
        )
        .replacen("reconnect_max_ms = 10000", "reconnect_max_ms = 1000", 1);
    s.cfg = write_config(s.pki.root(), &text, 50)?;
    let mut twin = Twin::start(&s.broker, &s.pki, 64).await?;
    let mut op = Operator::start(&s).await?;
    let gw = s.start_gateway().await?;
    op.wait_online(1).await?;
    twin.until(Duration::from_secs(10), "the expected PLC's values", |t| {
        t.tag("tank1.level")
            .is_some_and(|v| v.quality == Quality::Good)
    })
    .await?;
    op.pump_for(Duration::from_millis(500)).await?;
    assert!(op.alerts.is_empty(), "{:?}", op.alerts);

    // Another product answers at the PLC's address.
    let mut other = sim::Identity::default_tank();
    other.product_code = "PUMP-SIM".into();
    s.plc.set_identity(other);
    s.plc.stop().await;
    s.plc.restart().await?;
    let a = alert_within(&mut op, "device_identity_mismatch", Duration::from_secs(15)).await?;
    assert_eq!(a.severity, twin_model::alert::Severity::Critical);
    assert!(
        a.message
            .contains("product_code is \"PUMP-SIM\", expected \"TANK-SIM\""),
        "{a:?}"
    );
    twin.until(
        Duration::from_secs(10),
        "the tags bad with identity_mismatch",
        |t| {
            t.tag("tank1.level")
                .is_some_and(|v| v.reason.as_deref() == Some("identity_mismatch"))
        },
    )
    .await?;
    let reads = s.plc.read_frames();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.plc.read_frames(),
        reads,
        "a device that is not the expected one is not read"
    );

    // The expected device is back: read again at the next connection.
    s.plc.set_identity(sim::Identity::default_tank());
    twin.until(Duration::from_secs(15), "good values again", |t| {
        t.tag("tank1.level")
            .is_some_and(|v| v.quality == Quality::Good)
    })
    .await?;
    assert!(twin.rejections().is_empty(), "{:?}", twin.rejections());
    gw.stop().await;
    s.plc.stop().await;
    Ok(())
}
