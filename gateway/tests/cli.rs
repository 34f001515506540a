//! The `gateway` command line as an OT engineer uses it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn gateway(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the gateway binary runs")
}

/// A temporary folder with a development PKI (`gateway pki dev`) in `pki/`.
fn dev_pki_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(
        &["pki", "dev", "--gateway-id", "plant1-gw1", "--out", "pki"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    dir
}

/// The example configuration OT engineers start from.
fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.example.toml"))
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn dev_pki_then_check_of_the_example_config_succeeds() {
    let dir = dev_pki_dir();
    for key in [
        "gateway.key.pem",
        "gateway-signing.key.pem",
        "broker.key.pem",
        "operator.key.pem",
        "operator-signing.key.pem",
    ] {
        let mode = std::fs::metadata(dir.path().join("pki").join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    std::fs::write(dir.path().join("gateway.toml"), example()).unwrap();
    let out = gateway(&["check", "-c", "gateway.toml", "--dev"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("OK: gateway plant1-gw1, 1 device(s), 16 tag(s)"),
        "{}",
        text(&out)
    );

    let out = gateway(
        &["key", "public", "pki/gateway-signing.key.pem"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    let kid = printed
        .lines()
        .next()
        .unwrap()
        .strip_prefix("kid: ")
        .unwrap();
    let pem = std::fs::read_to_string(dir.path().join("pki/gateway-signing.pub.pem")).unwrap();
    let mut trust = twin_model::TrustStore::new();
    assert_eq!(
        trust.add_pem(&pem).unwrap(),
        kid,
        "printed kid is the thumbprint of the public key"
    );

    // In the production profile (the default) the gateway refuses to run
    // on the development PKI, before connecting anywhere.
    let out = gateway(&["run", "-c", "gateway.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("refusing to start with development PKI material")
            && t.contains("gateway.crt.pem")
            && t.contains("profile = \"dev\""),
        "{t}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing was started: {t}"
    );
}

#[test]
fn check_reports_every_error_with_its_line_and_fails() {
    let dir = dev_pki_dir();
    let example = example();
    // Two mistakes: a misspelt option and a duplicated tag name.
    let broken = example
        .replacen("poll_interval_ms =", "pol_interval_ms =", 1)
        .replacen("name = \"tank1.inflow\"", "name = \"tank1.level\"", 1);
    assert_ne!(broken, example);
    std::fs::write(dir.path().join("gateway.toml"), &broken).unwrap();
    std::fs::set_permissions(
        dir.path().join("pki/gateway.key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = gateway(&["check", "-c", "gateway.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    let line_of = |needle: &str| broken.lines().position(|l| l.contains(needle)).unwrap() + 1;
    assert!(
        t.contains(&format!("gateway.toml:{}:", line_of("pol_interval_ms")))
            && t.contains("poll_interval_ms"),
        "{t}"
    );
    let dup_line = broken
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("name = \"tank1.level\""))
        .nth(1)
        .unwrap()
        .0
        + 1;
    assert!(
        t.contains(&format!("gateway.toml:{dup_line}:")) && t.contains("tank1.level"),
        "{t}"
    );
    assert!(t.contains("chmod 600"), "{t}");
    assert!(t.contains("3 error(s)"), "{t}");

    // `run` refuses the same file without connecting anywhere.
    let out = gateway(&["run", "-c", "gateway.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not starting"), "{}", text(&out));
}

#[test]
fn the_shipped_policy_checks_its_cases_pass_and_a_dry_run_explains_the_decision() {
    let dir = dev_pki_dir();
    std::fs::write(dir.path().join("gateway.toml"), example()).unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let policies = policies.to_str().unwrap();

    let out = gateway(
        &["policy", "check", policies, "-c", "gateway.toml"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK"), "{}", text(&out));

    let out = gateway(
        &["policy", "cases", policies, "-c", "gateway.toml"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 failed"), "{}", text(&out));

    let out = gateway(
        &[
            "policy",
            "test",
            policies,
            "-c",
            "gateway.toml",
            "--tag",
            "tank1.level_setpoint",
            "--value",
            "3.0",
            "--operator",
            "alice@plant1",
            "--role",
            "plant1-operators",
            "--at",
            "2026-11-25T03:00:00+01:00",
            "--current",
            "tank1.level_setpoint=2.5",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("decision: DENY (outside_window)") && t.contains("tank1-setpoint"),
        "{t}"
    );

    // A broken policy is reported with its line, and exits 1.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(
        broken.join("p.toml"),
        "[[rules]]\nid = \"r\"\nroles = [\"nobody\"]\ntags = [\"tank1.level\"]\n",
    )
    .unwrap();
    let out = gateway(
        &[
            "policy",
            "check",
            broken.to_str().unwrap(),
            "-c",
            "gateway.toml",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("p.toml:"), "{}", text(&out));
}

#[test]
fn audit_verify_accepts_an_intact_log_and_names_the_first_altered_record() {
    use std::sync::Arc;
    use twin_model::audit::{ConfigChanged, Event};
    let dir = dev_pki_dir();
    let pem = std::fs::read_to_string(dir.path().join("pki/gateway-signing.key.pem")).unwrap();
    let key = Arc::new(twin_model::SigningKey::from_pkcs8_pem(&pem).unwrap());
    let log_path = dir.path().join("audit.jsonl");
    let mut log = gateway::audit::AuditLog::open(&log_path, key, "plant1-gw1").unwrap();
    for i in 0..5 {
        log.append(&Event::ConfigChanged(ConfigChanged {
            source: format!("gateway.toml#{i}"),
            sha256: "x".repeat(43),
            summary: "test".into(),
        }))
        .unwrap();
    }
    log.close("test").unwrap();

    let out = gateway(
        &[
            "audit",
            "verify",
            "audit.jsonl",
            "--trust",
            "pki/gateway-signing.pub.pem",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).starts_with("OK:"), "{}", text(&out));

    // Edit one record: the verifier names the place and fails.
    let content = std::fs::read_to_string(&log_path).unwrap();
    let edited = content.replacen("gateway.toml#2", "gateway.toml#9", 1);
    assert_ne!(edited, content);
    std::fs::write(&log_path, edited).unwrap();
    let out = gateway(
        &[
            "audit",
            "verify",
            "audit.jsonl",
            "--trust",
            "pki/gateway-signing.pub.pem",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("FAILED at line") && text(&out).contains("bad_prev"),
        "{}",
        text(&out)
    );
}

#[test]
fn check_reports_the_command_side_and_fails_without_operator_keys() {
    let dir = dev_pki_dir();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let example = example();
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!(
            "{example}\n[commands]\npolicy_dir = \"{}\"\noperator_keys_dir = \"operators\"\nissuer = \"plant1-ops\"\n",
            policies.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("operators")).unwrap();

    let out = gateway(&["check", "-c", "gateway.toml", "--dev"], dir.path());
    assert!(!out.status.success(), "no operator key: {}", text(&out));
    assert!(text(&out).contains("no operator key"), "{}", text(&out));

    std::fs::copy(
        dir.path().join("pki/operator-signing.pub.pem"),
        dir.path().join("operators/idp.pem"),
    )
    .unwrap();
    let out = gateway(&["check", "-c", "gateway.toml", "--dev"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("1 operator key(s)"), "{t}");
    assert!(t.contains("in enforce mode, 4 rule(s)"), "{t}");
}

#[test]
fn the_security_self_check_reports_dev_material_in_production_as_json_and_fails() {
    let dir = dev_pki_dir();
    std::fs::write(dir.path().join("gateway.toml"), example()).unwrap();
    let out = gateway(&["check", "-c", "gateway.toml", "--json"], dir.path());
    assert!(
        !out.status.success(),
        "dev PKI without --dev: {}",
        text(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"dev_pki_in_production"), "{codes:?}");
    assert_eq!(report["gateway_id"], "plant1-gw1");

    // Loosened key permissions are found in the development profile too.
    std::fs::set_permissions(
        dir.path().join("pki/gateway-signing.key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = gateway(
        &[
            "check",
            "-c",
            "gateway.toml",
            "--json",
            "--dev",
            "--fail-on",
            "critical",
        ],
        dir.path(),
    );
    // The configuration itself refuses a key readable by others.
    assert!(!out.status.success(), "{}", text(&out));
}

#[test]
fn sbom_prints_the_cyclonedx_document_the_inventory_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(&["sbom"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["bomFormat"], "CycloneDX");
    assert_eq!(doc["metadata"]["component"]["name"], "gateway");
    let names: Vec<&str> = doc["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(names.contains(&"rumqttc") && names.contains(&"twin-model"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&gateway::sbom::sbom_sha256()), "{err}");
}
