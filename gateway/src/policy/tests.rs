//! Tests of the policy as a whole: the example policy and every case next
//! to it, each check at its line, the engine's states and modes, and a
//! model test of `decide` against a plain re-implementation of the rules.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use twin_model::{Quality, Value};

use super::*;
use crate::config::{self, Config};

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example device configuration, loaded once from a folder with dummy
/// dev-PKI files (the loader checks that the key files exist).
fn example() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        for (file, mode, pem) in [
            ("pki/ca.crt.pem", 0o644, "CERTIFICATE"),
            ("pki/gateway.crt.pem", 0o644, "CERTIFICATE"),
            ("pki/gateway.key.pem", 0o600, "PRIVATE KEY"),
            ("pki/gateway-signing.key.pem", 0o600, "PRIVATE KEY"),
        ] {
            let path = dir.path().join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(
                &path,
                format!("-----BEGIN {pem}-----\nTUlJQg==\n-----END {pem}-----\n"),
            )
            .unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        let text = fs::read_to_string(repo_dir().join("gateway/gateway.example.toml")).unwrap();
        match config::parse_str(&dir.path().join("gateway.toml"), &text) {
            Ok(c) => c,
            Err(e) => panic!("the example configuration has errors:\n{e}"),
        }
    })
}

fn policies_dir() -> PathBuf {
    repo_dir().join("policies")
}

/// Checks policy text as `policy.toml`.
fn check(text: &str) -> Result<(Policy, Vec<Warning>), ConfigErrors> {
    Policy::parse(
        &[(PathBuf::from("policy.toml"), text.to_string())],
        example(),
    )
}

use crate::config::ConfigErrors;

fn errors(text: &str) -> Vec<String> {
    match check(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn warnings(text: &str) -> Vec<String> {
    match check(text) {
        Ok((_, w)) => w.iter().map(|w| w.to_string()).collect(),
        Err(e) => panic!("expected no errors, got:\n{e}"),
    }
}

/// Asserts that exactly one of `found` is at `line` and contains `text`.
fn assert_one_at(found: &[String], line: usize, text: &str) {
    let at = format!("policy.toml:{line}:");
    let hits: Vec<&String> = found
        .iter()
        .filter(|e| e.starts_with(&at) && e.contains(text))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected one report at line {line} containing {text:?}, found:\n{}",
        found.join("\n")
    );
}

const ROLES: &str = r#"
[[roles]]
name = "op"
subjects = ["alice"]
claims = ["operators"]
"#;

/// A policy: the roles above (lines 1-5), then `rules` from line 6.
fn with_roles(rules: &str) -> String {
    format!("{ROLES}{rules}")
}

// -- the example policy and its cases ----------------------------------------

#[test]
fn the_example_policy_loads_without_errors_or_warnings() {
    let (policy, warnings) = match Policy::load_dir(&policies_dir(), example()) {
        Ok(p) => p,
        Err(e) => panic!("policies/ has errors:\n{e}"),
    };
    assert!(warnings.is_empty(), "warnings:\n{warnings:?}");
    assert_eq!(policy.mode(), Mode::Enforce);
    assert_eq!(
        policy.rule_ids().collect::<Vec<_>>(),
        [
            "tank1-setpoint",
            "tank1-mode",
            "tank1-pump-start",
            "tank1-pump-stop"
        ]
    );
}

#[test]
fn every_case_next_to_the_policies_gets_its_expected_decision() {
    let report = match run_tests(&policies_dir(), example()) {
        Ok(r) => r,
        Err(e) => panic!("the policy or its cases have errors:\n{e}"),
    };
    assert!(report.results.len() >= 20, "{report}");
    let first_failure = report.failures().next().map(|r| r.name.clone());
    if let Some(name) = first_failure {
        panic!("case \"{name}\" failed:\n{report}");
    }
}

#[test]
fn the_cases_next_to_the_policies_cover_every_deny_code() {
    let mut seen = std::collections::BTreeSet::new();
    for entry in fs::read_dir(policies_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".tests.toml") {
            let text = fs::read_to_string(&path).unwrap();
            for case in parse_cases(&path, &text, example()).unwrap() {
                seen.extend(case.expect.deny);
            }
        }
    }
    let missing: Vec<&str> = DenyCode::ALL
        .iter()
        .filter(|c| !seen.contains(c))
        .map(|c| c.code())
        .collect();
    assert!(missing.is_empty(), "no case expects: {missing:?}");
}

#[test]
fn a_failing_case_is_reported_with_its_name_and_the_explanation() {
    let (policy, _) = Policy::load_dir(&policies_dir(), example()).unwrap();
    let text = r#"
[[case]]
name = "a wrong expectation"
tag = "tank1.inlet_valve"
value = true
operator = "alice@plant1"
at = "2026-11-25T10:00:00+01:00"
expect = "permit"
"#;
    let cases = parse_cases(Path::new("x.tests.toml"), text, example()).unwrap();
    let report = run_cases(&policy, &cases);
    assert!(!report.passed());
    let shown = report.to_string();
    assert!(
        shown.contains("FAIL a wrong expectation (x.tests.toml:2): deny:no_rule"),
        "{shown}"
    );
    assert!(
        shown.contains("expected permit, got deny:no_rule"),
        "{shown}"
    );
}

#[test]
fn case_files_report_unknown_keys_tags_and_codes_at_their_lines() {
    let text = r#"[[case]]
name = "x"
tag = "tank1.mode"
valu = 1
operator = "a"
at = "yesterday"
current = { "tank1.mdoe" = 1 }
expect = "deny:interlok"
"#;
    let e = parse_cases(Path::new("x.tests.toml"), text, example())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.tests.toml:1:1: error: missing required key \"value\""),
        "{e}"
    );
    assert!(
        e.contains("x.tests.toml:4:1: error: unknown key \"valu\""),
        "{e}"
    );
    assert!(e.contains("did you mean \"value\"?"), "{e}");
    assert!(e.contains("x.tests.toml:6:6: error: \"at\""), "{e}");
    assert!(
        e.contains("x.tests.toml:7:13: error: unknown tag \"tank1.mdoe\""),
        "{e}"
    );
    assert!(
        e.contains("x.tests.toml:8:10: error: unknown expectation \"deny:interlok\""),
        "{e}"
    );
    assert!(e.contains("did you mean \"deny:interlock\"?"), "{e}");
}

// -- checks, each at its line ------------------------------------------------

#[test]
fn unknown_keys_are_errors_with_did_you_mean() {
    let e = errors(&with_roles(
        r#"
[[rules]]
id = "r"
roles = ["op"]
tags = ["tank1.mode"]
allowed = [0, 1]
max_stpe = 1
"#,
    ));
    assert_one_at(&e, 12, "unknown key \"max_stpe\" in rule \"r\"");
    assert_one_at(&e, 12, "did you mean \"max_step\"?");
    let e = errors("[[rule]]\nid = \"r\"\n");
    assert_one_at(&e, 1, "did you mean \"rules\"?");
}

#[test]
fn unknown_tags_are_errors_with_did_you_mean() {
    let e = errors(&with_roles(
        r#"
[[rules]]
id = "r"
roles = ["op"]
tags = ["tank1.level_setpont"]
min = 1
max = 2
"#,
    ));
    assert_one_at(&e, 10, "names unknown tag \"tank1.level_setpont\"");
    assert_one_at(&e, 10, "did you mean \"tank1.level_setpoint\"?");
}

#[test]
fn rules_naming_read_only_tags_are_errors() {
    let e = errors(&with_roles(
        r#"
[[rules]]
id = "r"
roles = ["op"]
tags = ["tank1.mode", "tank1.level"]
allowed = [0, 1]
"#,
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_one_at(&e, 10, "names tag \"tank1.level\", which is read-only");
}

#[test]
fn duplicate_rule_ids_are_errors_even_across_files() {
    let rule = "[[rules]]\nid = \"same\"\nroles = [\"op\"]\ntags = [\"tank1.pump\"]\n";
    let files = [
        (PathBuf::from("a.toml"), format!("{ROLES}{rule}")),
        (PathBuf::from("b.toml"), format!("\n{rule}")),
    ];
    let e = Policy::parse(&files, example()).unwrap_err().to_string();
    assert!(
        e.contains("b.toml:3:6: error: duplicate rule id \"same\" (first defined at a.toml:6)"),
        "{e}"
    );
}

#[test]
fn unknown_roles_are_errors_with_did_you_mean() {
    let e = errors(&with_roles(
        r#"
[[rules]]
id = "r"
roles = ["opp"]
tags = ["tank1.pump"]
"#,
    ));
    assert_one_at(&e, 9, "names unknown role \"opp\"");
    assert_one_at(&e, 9, "did you mean \"op\"?");
}

#[test]
fn min_greater_than_max_is_an_error() {
    let e = errors(&with_roles(
        "\n[[rules]]\nid = \"r\"\nroles = [\"op\"]\ntags = [\"tank1.level_setpoint\"]\nmin = 4\nmax = 1\n",
    ));
    assert_one_at(&e, 11, "min 4 is greater than max 1");
}

#[test]
fn allowed_values_outside_min_and_max_are_errors() {
    let e = errors(&with_roles(
        "\n[[rules]]\nid = \"r\"\nroles = [\"op\"]\ntags = [\"tank1.mode\"]\nmin = 0\nmax = 1\nallowed = [0, 1, 7]\n",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_one_at(&e, 13, "allowed value 7");
}

#[test]
fn rules_that_can_never_hold_are_errors() {
    // Bounds outside what the register can hold (u16 * 0.01 m: 0 .. 655.35 m).
    let e = errors(&with_roles(
        "\n[[rules]]\nid = \"r\"\nroles = [\"op\"]\ntags = [\"tank1.level_setpoint\"]\nmin = 700\nmax = 800\n",
    ));
    assert_one_at(
        &e,
        11,
        "can never permit a value for \"tank1.level_setpoint\"",
    );
    // Interlocks that contradict each other.
    let e = errors(&with_roles(
        r#"
[[rules]]
id = "r"
roles = ["op"]
tags = ["tank1.pump"]
interlocks = [
  { tag = "tank1.mode", equals = 1 },
  { tag = "tank1.mode", equals = 0 },
]
"#,
    ));
    assert_one_at(&e, 13, "can never both hold");
    // More approvals than the rule's roles have people.
    let e = errors(
        "[[roles]]\nname = \"pair\"\nsubjects = [\"a\", \"b\"]\n\n[[rules]]\nid = \"r\"\nroles = [\"pair\"]\ntags = [\"tank1.pump\"]\napprovals = 2\n",
    );
    assert_one_at(
        &e,
        9,
        "needs 2 approval(s) besides the requester, but its roles name only 2 person(s)",
    );
    // An empty allowed list; min/max on an on/off tag.
    let e = errors(&with_roles(
        "\n[[rules]]\nid = \"r\"\nroles = [\"op\"]\ntags = [\"tank1.pump\"]\nallowed = []\nmax = 1\n",
    ));
    assert_one_at(&e, 11, "is empty: the rule can never permit");
    assert_one_at(&e, 12, "\"max\" in rule \"r\" applies to numbers");
}

#[test]
fn two_rules_with_disjoint_bounds_for_the_same_role_and_tag_are_legitimate() {
    let w = warnings(&with_roles(
        r#"
[[rules]]
id = "low"
roles = ["op"]
tags = ["tank1.level_setpoint"]
min = 0.5
max = 1.0

[[rules]]
id = "high"
roles = ["op"]
tags = ["tank1.level_setpoint"]
min = 3.0
max = 4.5
"#,
    ));
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn a_rule_without_bounds_on_a_numeric_tag_is_a_warning() {
    let w = warnings(&with_roles(
        "\n[[rules]]\nid = \"r\"\nroles = [\"op\"]\ntags = [\"tank1.level_setpoint\"]\n",
    ));
    assert_one_at(
        &w,
        7,
        "warning: rule \"r\" permits any value for tag \"tank1.level_setpoint\"",
    );
    // On/off tags have only two values: no warning.
    let w = warnings(&with_roles(
        "\n[[rules]]\nid = \"r\"\nroles = [\"op\"]\ntags = [\"tank1.pump\"]\n",
    ));
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn patterns_that_match_nothing_or_every_writable_tag_are_warnings() {
    let w = warnings(&with_roles(
        r#"
[[rules]]
id = "r"
roles = ["op"]
tags = ["tank2.*", "tank1.pres*", "tank1.p*"]

[[rules]]
id = "all"
roles = ["op"]
tags = ["tank1.*"]
allowed = [false]
"#,
    ));
    assert_one_at(&w, 10, "pattern \"tank2.*\" in rule \"r\" matches no tag");
    assert_one_at(
        &w,
        10,
        "pattern \"tank1.pres*\" in rule \"r\" matches only read-only tags",
    );
    assert_one_at(
        &w,
        15,
        "pattern \"tank1.*\" in rule \"all\" matches every writable tag",
    );
    assert_eq!(w.len(), 3, "{w:?}");
}

#[test]
fn bad_time_zones_rates_and_windows_are_errors_at_their_lines() {
    let e = errors(&with_roles(
        r#"
[[rules]]
id = "r"
roles = ["op"]
tags = ["tank1.pump"]
rate_per_tag = "6 per minute"
rate_per_operator = "0/h"
windows = [
  { days = "mon-frii", from = "06:00", to = "22:00", tz = "Europe/Berlin" },
  { from = "25:00", to = "22:00", tz = "Europe/Berln" },
  { from = "08:00", to = "08:00", tz = "UTC" },
]
"#,
    ));
    assert_one_at(&e, 11, "\"rate_per_tag\" in rule \"r\" is not a rate");
    assert_one_at(&e, 12, "\"rate_per_operator\" in rule \"r\" is not a rate");
    assert_one_at(&e, 14, "unknown day \"frii\"; did you mean \"fri\"?");
    assert_one_at(
        &e,
        15,
        "\"from\" in a window of rule \"r\" is not a time of day",
    );
    assert_one_at(&e, 15, "unknown time zone \"Europe/Berln\"");
    assert_one_at(&e, 15, "did you mean \"Europe/Berlin\"?");
    assert_one_at(&e, 16, "starts and ends at the same time");
    assert_eq!(e.len(), 6, "{e:?}");
}

#[test]
fn every_error_of_every_file_is_reported_at_once_in_file_order() {
    let files = [
        (
            PathBuf::from("a.toml"),
            "[policy]\nmode = \"enforse\"\n".to_string(),
        ),
        (
            PathBuf::from("b.toml"),
            "[[rules]]\nid = \"r\"\nroles = [\"nobody\"]\ntags = [\"tank1.nope\"]\n".to_string(),
        ),
    ];
    let e = Policy::parse(&files, example()).unwrap_err();
    let places: Vec<String> = e
        .errors
        .iter()
        .map(|e| format!("{}:{}", e.file.display(), e.line))
        .collect();
    assert_eq!(places, ["a.toml:2", "b.toml:3", "b.toml:4"], "{e}");
    assert!(e.to_string().contains("did you mean \"enforce\"?"), "{e}");
}

#[test]
fn a_missing_folder_or_a_broken_policy_gives_an_engine_that_denies_everything() {
    let cmd = setpoint(3.0, "alice@plant1");
    let (mut engine, result) = Engine::load(Path::new("/nonexistent/policies"), example());
    assert!(result.is_err());
    assert_eq!(denial(engine.decide(&cmd, &())).code, DenyCode::NoPolicy);

    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("p.toml"), "[[rules]]\nid = 5\n").unwrap();
    let (mut engine, result) = Engine::load(dir.path(), example());
    let e = result.unwrap_err().to_string();
    assert!(
        e.contains("p.toml:2:6: error: \"id\" in [[rules]] must be a string"),
        "{e}"
    );
    assert_eq!(
        denial(engine.decide(&cmd, &())).code,
        DenyCode::InvalidPolicy
    );

    let empty = tempfile::tempdir().unwrap();
    let (mut engine, _) = Engine::load(empty.path(), example());
    assert_eq!(denial(engine.decide(&cmd, &())).code, DenyCode::NoPolicy);
}

// -- the engine ----------------------------------------------------------------

/// 2026-11-25 10:00 in Berlin, a Wednesday.
const WEDNESDAY_10H: u64 = 1_795_597_200_000;

fn setpoint(value: f64, operator: &str) -> Command {
    Command {
        id: "cmd-1".into(),
        tag: "tank1.level_setpoint".into(),
        value: Value::Float(value),
        operator: operator.into(),
        roles: Vec::new(),
        amr: vec!["otp".into()],
        approvers: Vec::new(),
        at_ms: WEDNESDAY_10H,
    }
}

fn plant(setpoint: f64) -> BTreeMap<String, CurrentValue> {
    [
        ("tank1.mode", Value::UInt(1)),
        ("tank1.high_alarm", Value::Bool(false)),
        ("tank1.level_setpoint", Value::Float(setpoint)),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_string(), CurrentValue::good(v)))
    .collect()
}

fn denial(d: Decision) -> Denial {
    match d {
        Decision::Deny(d) => d,
        Decision::Permit(p) => panic!("expected a denial, got a permit by {}", p.rule()),
    }
}

fn tank_policy() -> Policy {
    Policy::load_dir(&policies_dir(), example()).unwrap().0
}

#[test]
fn wednesday_10h_is_what_the_cases_write() {
    let ts: jiff::Timestamp = "2026-11-25T10:00:00+01:00".parse().unwrap();
    assert_eq!(ts.as_millisecond() as u64, WEDNESDAY_10H);
}

#[test]
fn a_permit_carries_the_tag_value_command_and_rule() {
    let mut engine = Engine::new(tank_policy());
    match engine.decide(&setpoint(3.0, "alice@plant1"), &plant(2.5)) {
        Decision::Permit(p) => {
            assert_eq!(p.tag(), "tank1.level_setpoint");
            assert_eq!(p.value(), &Value::Float(3.0));
            assert_eq!(p.command_id(), "cmd-1");
            assert_eq!(p.rule(), "tank1-setpoint");
        }
        Decision::Deny(d) => panic!("denied: {d}"),
    }
}

#[test]
fn rate_limits_count_only_permits() {
    let mut engine = Engine::new(tank_policy());
    // Denied commands (step too large) use up nothing.
    for _ in 0..10 {
        assert_eq!(
            denial(engine.decide(&setpoint(4.0, "alice@plant1"), &plant(2.5))).code,
            DenyCode::StepTooLarge
        );
    }
    for i in 0..6 {
        let d = engine.decide(&setpoint(3.0, "alice@plant1"), &plant(2.5));
        assert!(
            matches!(d, Decision::Permit(_)),
            "permit {i}: {:?}",
            d.outcome()
        );
    }
    let d = denial(engine.decide(&setpoint(3.0, "alice@plant1"), &plant(2.5)));
    assert_eq!(d.code, DenyCode::RateLimited);
    assert_eq!(d.rule.as_deref(), Some("tank1-setpoint"));
    // A minute later the window has moved on.
    let mut later = setpoint(3.0, "alice@plant1");
    later.at_ms += 60_000;
    assert!(matches!(
        engine.decide(&later, &plant(2.5)),
        Decision::Permit(_)
    ));
}

#[test]
fn audit_mode_reports_the_would_be_decision_and_never_permits() {
    let mut engine = Engine::new(tank_policy().with_mode(Mode::Audit));
    let d = denial(engine.decide(&setpoint(3.0, "alice@plant1"), &plant(2.5)));
    assert_eq!(d.code, DenyCode::AuditMode);
    assert_eq!(d.code.code(), "audit_mode");
    assert!(
        d.reason.contains("would permit by rule \"tank1-setpoint\""),
        "{}",
        d.reason
    );
    let d = denial(engine.decide(&setpoint(4.8, "alice@plant1"), &plant(4.5)));
    assert!(
        d.reason.contains("would deny (out_of_bounds)"),
        "{}",
        d.reason
    );
}

#[test]
fn shadow_mode_reports_where_a_candidate_decides_differently_without_counting() {
    let engine = Engine::new(tank_policy());
    let text = fs::read_to_string(policies_dir().join("tank1.toml"))
        .unwrap()
        .replace("max = 4.5 ", "max = 3.0 ");
    let (candidate, _) =
        Policy::parse(&[(PathBuf::from("candidate.toml"), text)], example()).unwrap();
    let cmd = setpoint(3.5, "alice@plant1");
    let diff = engine
        .shadow(&candidate, &cmd, &plant(3.0))
        .expect("a difference");
    assert!(matches!(diff.enforced, Outcome::Permit { .. }), "{diff}");
    assert!(
        matches!(&diff.candidate, Outcome::Deny(d) if d.code == DenyCode::OutOfBounds),
        "{diff}"
    );
    assert_eq!(
        engine.shadow(&candidate, &setpoint(2.5, "alice@plant1"), &plant(3.0)),
        None
    );
    // Shadowing counts nothing: six permits are still available.
    let mut engine = engine;
    for _ in 0..7 {
        let _ = engine.shadow(&candidate, &cmd, &plant(3.0));
    }
    for _ in 0..6 {
        assert!(matches!(
            engine.decide(&cmd, &plant(3.0)),
            Decision::Permit(_)
        ));
    }
}

#[test]
fn the_closest_rule_names_the_denial() {
    let mut engine = Engine::new(tank_policy());
    let mut cmd = setpoint(0.0, "alice@plant1");
    cmd.tag = "tank1.pump".into();
    cmd.value = Value::Bool(true);
    let mut current = plant(2.5);
    current.insert(
        "tank1.level".into(),
        CurrentValue {
            value: None,
            quality: Quality::Bad,
        },
    );
    let d = denial(engine.decide(&cmd, &current));
    // tank1-pump-stop fails at the value; tank1-pump-start gets to the interlocks.
    assert_eq!(
        (d.code, d.rule.as_deref()),
        (DenyCode::Interlock, Some("tank1-pump-start"))
    );
    assert!(
        d.reason.contains("\"tank1.level\" has bad quality"),
        "{}",
        d.reason
    );
}

#[test]
fn a_dry_run_explains_the_decision_rule_by_rule() {
    let policy = tank_policy();
    let text = dry_run(&policy, &setpoint(3.5, "alice@plant1"), &plant(2.5)).to_string();
    assert!(text.contains("set \"tank1.level_setpoint\" to 3.5 m, requested by alice@plant1 at 2026-11-25T09:00:00Z"), "{text}");
    assert!(text.contains("decision: DENY (step_too_large)"), "{text}");
    assert!(
        text.contains("closest rule: \"tank1-setpoint\" (") && text.contains("tank1.toml:"),
        "{text}"
    );
    assert!(
        text.contains(
            "because: the change from 2.5 m to 3.5 m is 1 m, more than the step limit 0.5 m"
        ),
        "{text}"
    );
    assert!(
        text.contains("ok   role       alice@plant1 holds role shift-operator"),
        "{text}"
    );
    assert!(text.contains("FAIL step"), "{text}");
    assert!(
        text.contains(
            "Wed 10:00 Europe/Berlin is inside the window mon-fri 06:00-22:00 Europe/Berlin"
        ),
        "{text}"
    );
}

#[test]
fn every_deny_code_string_is_stable_and_distinct() {
    let codes: std::collections::BTreeSet<&str> = DenyCode::ALL.iter().map(|c| c.code()).collect();
    assert_eq!(codes.len(), DenyCode::ALL.len());
    for c in DenyCode::ALL {
        assert_eq!(DenyCode::from_code(c.code()), Some(c));
    }
}

// -- model test: decide against a plain re-implementation ---------------------

const WRITABLE: [&str; 4] = [
    "tank1.level_setpoint",
    "tank1.mode",
    "tank1.pump",
    "tank1.inlet_valve",
];
const TAG_CHOICES: [&str; 7] = [
    "tank1.level_setpoint",
    "tank1.mode",
    "tank1.pump",
    "tank1.inlet_valve",
    "tank1.level",
    "tank1.high_alarm",
    "tank1.nope",
];
/// name, subjects, claims
const MODEL_ROLES: [(&str, &[&str], &[&str]); 3] = [
    ("r0", &["u0"], &["c0"]),
    ("r1", &["u1", "u2"], &[]),
    ("r2", &[], &["c2"]),
];

#[derive(Debug, Clone)]
enum Target {
    Tag(usize),
    /// `tank1.*`: every writable tag.
    All,
}

#[derive(Debug, Clone)]
struct ModelRule {
    roles: Vec<usize>,
    target: Target,
    min_max: Option<(f64, f64)>,
    allowed: Option<Vec<f64>>,
    allowed_bool: Option<bool>,
    max_step: Option<f64>,
    interlock_mode: Option<u8>,
    window: Option<(u8, u32, u32)>,
    mfa: bool,
    approvals: u32,
    rate: Option<u32>,
}

fn rule_strategy() -> impl Strategy<Value = ModelRule> {
    let grid = prop::sample::select(vec![0.0f64, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.5]);
    (
        prop::sample::subsequence(vec![0usize, 1, 2], 1..=3),
        prop_oneof![4 => (0usize..4).prop_map(Target::Tag), 1 => Just(Target::All)],
        prop::option::of((grid.clone(), grid.clone())),
        prop::option::of(prop::collection::vec(grid.clone(), 1..3)),
        prop::option::of(any::<bool>()),
        prop::option::of(prop::sample::select(vec![0.5, 1.0])),
        prop::option::of(0u8..2),
        prop::option::of((1u8..128, 0u32..24, 1u32..=24)),
        (any::<bool>(), 0u32..2, prop::option::of(1u32..3)),
    )
        .prop_map(
            |(roles, target, mm, allowed, ab, step, il, win, (mfa, approvals, rate))| {
                let numeric = matches!(target, Target::Tag(0 | 1));
                let boolean = matches!(target, Target::Tag(2 | 3));
                let use_allowed = numeric && allowed.is_some() && mm.is_none();
                ModelRule {
                    roles,
                    min_max: if numeric {
                        mm.map(|(a, b)| (a.min(b), a.max(b)))
                    } else {
                        None
                    },
                    // The mode register holds whole numbers only.
                    allowed: if use_allowed {
                        allowed.map(|a| {
                            if matches!(target, Target::Tag(1)) {
                                a.iter().map(|x| x.floor()).collect()
                            } else {
                                a
                            }
                        })
                    } else {
                        None
                    },
                    allowed_bool: if boolean { ab } else { None },
                    max_step: if numeric { step } else { None },
                    interlock_mode: il,
                    window: win.filter(|(_, f, t)| f < t),
                    mfa,
                    approvals,
                    rate,
                    target,
                }
            },
        )
}

fn policy_text(rules: &[ModelRule]) -> String {
    let mut s = String::new();
    for (name, subjects, claims) in MODEL_ROLES {
        s.push_str(&format!(
            "[[roles]]\nname = \"{name}\"\nsubjects = {subjects:?}\nclaims = {claims:?}\n\n"
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        let roles: Vec<&str> = r.roles.iter().map(|&k| MODEL_ROLES[k].0).collect();
        let tag = match r.target {
            Target::Tag(k) => WRITABLE[k],
            Target::All => "tank1.*",
        };
        s.push_str(&format!(
            "[[rules]]\nid = \"rule{i}\"\nroles = {roles:?}\ntags = [\"{tag}\"]\n"
        ));
        if let Some((lo, hi)) = r.min_max {
            s.push_str(&format!("min = {lo:?}\nmax = {hi:?}\n"));
        }
        if let Some(a) = &r.allowed {
            let list: Vec<String> = a.iter().map(|x| format!("{x:?}")).collect();
            s.push_str(&format!("allowed = [{}]\n", list.join(", ")));
        }
        if let Some(b) = r.allowed_bool {
            s.push_str(&format!("allowed = [{b}]\n"));
        }
        if let Some(step) = r.max_step {
            s.push_str(&format!("max_step = {step:?}\n"));
        }
        if let Some(m) = r.interlock_mode {
            s.push_str(&format!(
                "interlocks = [{{ tag = \"tank1.mode\", equals = {m} }}]\n"
            ));
        }
        if let Some((days, from, to)) = r.window {
            let list: Vec<&str> = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
                .into_iter()
                .enumerate()
                .filter(|(d, _)| days & (1 << d) != 0)
                .map(|(_, n)| n)
                .collect();
            s.push_str(&format!(
                "windows = [{{ days = \"{}\", from = \"{from:02}:00\", to = \"{to:02}:00\", tz = \"UTC\" }}]\n",
                list.join(",")
            ));
        }
        s.push_str(&format!(
            "require_mfa = {}\napprovals = {}\n",
            r.mfa, r.approvals
        ));
        if let Some(n) = r.rate {
            s.push_str(&format!("rate_per_tag = \"{n}/min\"\n"));
        }
        s.push('\n');
    }
    s
}

fn command_strategy() -> impl Strategy<Value = Command> {
    let value = prop_oneof![
        prop::sample::select(vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.5, 0.005])
            .prop_map(Value::Float),
        (0i64..3).prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
    ];
    (
        prop::sample::select(TAG_CHOICES.to_vec()),
        value,
        prop::sample::select(vec!["u0", "u1", "u2", "u3"]),
        prop::sample::subsequence(vec!["c0", "c2", "c9"], 0..=2),
        prop::sample::subsequence(vec!["pwd", "otp"], 0..=2),
        prop::collection::vec(prop::sample::select(vec!["u0", "u1", "u2", "u3"]), 0..3),
        // Any time in a week of November 2026.
        0u64..7 * 24 * 4,
    )
        .prop_map(|(tag, value, op, roles, amr, approvers, quarter)| Command {
            id: "c".into(),
            tag: tag.into(),
            value,
            operator: op.into(),
            roles: roles.into_iter().map(String::from).collect(),
            amr: amr.into_iter().map(String::from).collect(),
            approvers: approvers.into_iter().map(Approver::subject).collect(),
            at_ms: WEDNESDAY_10H + quarter * 15 * 60_000,
        })
}

fn current_strategy() -> impl Strategy<Value = BTreeMap<String, CurrentValue>> {
    (
        prop::option::of(0u64..2),
        prop::option::of(prop::sample::select(vec![1.0, 2.5, 3.0])),
    )
        .prop_map(|(mode, sp)| {
            let mut m = BTreeMap::new();
            if let Some(mode) = mode {
                m.insert(
                    "tank1.mode".to_string(),
                    CurrentValue::good(Value::UInt(mode)),
                );
            }
            match sp {
                Some(v) => m.insert(
                    "tank1.level_setpoint".to_string(),
                    CurrentValue::good(Value::Float(v)),
                ),
                None => m.insert(
                    "tank1.level_setpoint".to_string(),
                    CurrentValue {
                        value: None,
                        quality: Quality::Bad,
                    },
                ),
            };
            m
        })
}

/// Whether the tag can hold the value: the register types of the example,
/// written out by hand.
fn oracle_representable(tag: &str, v: &Value) -> bool {
    match (tag, v) {
        ("tank1.pump" | "tank1.inlet_valve", Value::Bool(_)) => true,
        ("tank1.pump" | "tank1.inlet_valve", Value::Int(n)) => *n == 0 || *n == 1,
        ("tank1.level_setpoint", Value::Float(x)) => {
            (0.0..=655.35).contains(x) && ((x * 100.0).round() - x * 100.0).abs() < 1e-6
        }
        ("tank1.level_setpoint", Value::Int(n)) => (0..=655).contains(n),
        ("tank1.mode", Value::Float(x)) => x.fract() == 0.0 && (0.0..=65535.0).contains(x),
        ("tank1.mode", Value::Int(n)) => (0..=65535).contains(n),
        _ => false,
    }
}

fn num(v: &Value) -> f64 {
    match v {
        Value::Float(x) => *x,
        Value::Int(n) => *n as f64,
        Value::UInt(n) => *n as f64,
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Text(_) => f64::NAN,
    }
}

/// Whether the rule's conditions (all but the rate limit) hold.
fn oracle_rule_holds(
    r: &ModelRule,
    cmd: &Command,
    current: &BTreeMap<String, CurrentValue>,
) -> bool {
    let holds_role = |subject: &str, claims: &[String]| {
        r.roles.iter().any(|&k| {
            let (_, subjects, role_claims) = MODEL_ROLES[k];
            subjects.contains(&subject) || claims.iter().any(|c| role_claims.contains(&c.as_str()))
        })
    };
    let tag_ok = match r.target {
        Target::Tag(k) => WRITABLE[k] == cmd.tag,
        Target::All => WRITABLE.contains(&cmd.tag.as_str()),
    };
    if !tag_ok || !holds_role(&cmd.operator, &cmd.roles) {
        return false;
    }
    let x = num(&cmd.value);
    if let Some((lo, hi)) = r.min_max {
        if x < lo || x > hi {
            return false;
        }
    }
    if let Some(a) = &r.allowed {
        if !a.iter().any(|y| (y - x).abs() < 1e-9) {
            return false;
        }
    }
    if let Some(b) = r.allowed_bool {
        let v = match cmd.value {
            Value::Bool(v) => v,
            _ => x == 1.0,
        };
        if v != b {
            return false;
        }
    }
    if let Some(step) = r.max_step {
        match current
            .get(&cmd.tag)
            .and_then(|c| c.value.as_ref().filter(|_| c.quality == Quality::Good))
        {
            Some(cur) if (num(cur) - x).abs() <= step + 1e-9 => {}
            _ => return false,
        }
    }
    if let Some((days, from, to)) = r.window {
        let secs = cmd.at_ms / 1000;
        let weekday = ((secs / 86_400 + 3) % 7) as u32; // 1970-01-01 was a Thursday
        let hour = (secs % 86_400) / 3600;
        if days & (1 << weekday) == 0 || hour < u64::from(from) || hour >= u64::from(to) {
            return false;
        }
    }
    if let Some(m) = r.interlock_mode {
        match current.get("tank1.mode").and_then(|c| c.value.as_ref()) {
            Some(v) if num(v) == f64::from(m) => {}
            _ => return false,
        }
    }
    if r.mfa && !cmd.amr.iter().any(|a| a == "otp") {
        return false;
    }
    if r.approvals > 0 {
        let subjects: Vec<&str> = cmd.approvers.iter().map(|a| a.subject.as_str()).collect();
        let distinct: std::collections::BTreeSet<&str> = subjects.iter().copied().collect();
        if subjects.contains(&cmd.operator.as_str()) || distinct.len() != subjects.len() {
            return false;
        }
        let qualified = subjects.iter().filter(|s| holds_role(s, &[])).count();
        if qualified < r.approvals as usize {
            return false;
        }
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn decide_permits_exactly_when_a_matching_rule_has_all_conditions_true(
        rules in prop::collection::vec(rule_strategy(), 0..4),
        cmds in prop::collection::vec(command_strategy(), 1..4),
        current in current_strategy(),
    ) {
        let text = policy_text(&rules);
        let policy = match Policy::parse(&[(PathBuf::from("model.toml"), text.clone())], example()) {
            Ok((p, _)) => p,
            Err(e) => panic!("generated policy has errors:\n{e}\n{text}"),
        };
        let rated = rules.iter().any(|r| r.rate.is_some());
        let mut engine = Engine::new(policy);
        for cmd in &cmds {
            let expected = WRITABLE.contains(&cmd.tag.as_str())
                && oracle_representable(&cmd.tag, &cmd.value)
                && rules.iter().any(|r| oracle_rule_holds(r, cmd, &current));
            let decision = engine.decide(cmd, &current);
            let permitted = matches!(decision, Decision::Permit(_));
            if permitted {
                prop_assert!(WRITABLE.contains(&cmd.tag.as_str()), "permit for a non-writable tag");
                prop_assert!(expected, "permit that no rule allows: {:?}\n{:?}\n{}", decision.outcome(), cmd, text);
            } else if !rated {
                prop_assert!(!expected, "denied although a rule allows it: {:?}\n{:?}\n{}", decision.outcome(), cmd, text);
            }
        }
    }
}
