//! Test cases kept next to a policy (`*.tests.toml`): commands with the
//! decision they must get. `gateway policy test DIR` runs them with
//! [`run_tests`]; the unit tests run those of `policies/`.
//!
//! ```toml
//! [[case]]
//! name = "operator raises the setpoint in manual mode"
//! tag = "tank1.level_setpoint"
//! value = 3.0
//! operator = "alice@plant1"
//! roles = ["plant1-operators"]
//! amr = ["pwd", "otp"]
//! approvers = ["bob@plant1", { subject = "carol@plant1", roles = ["plant1-supervisors"] }]
//! at = "2026-11-25T10:00:00+01:00"
//! current = { "tank1.mode" = 1, "tank1.level_setpoint" = { value = 2.5, quality = "good" } }
//! repeat = 1                 # decide the command this many times; the last decision counts
//! assume_policy = "audit"    # or "missing", "invalid": run against such a policy instead
//! expect = "deny:audit_mode" # or "permit"
//! rule = "tank1-setpoint"    # the rule that permits, or that the denial names
//! ```
//!
//! Every case starts with a fresh engine (no earlier permits).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};
use twin_model::{Quality, Value};

use super::command::{Approver, Command, CurrentValue};
use super::decide::{DenyCode, Engine, Explanation, Outcome};
use super::load::{literal, read_files, DirError, Policy, Warning};
use super::model::{Literal, Mode, Place, TagInfo};
use crate::config::read::{closest, describe, Field, Reader, Table};
use crate::config::{Config, ConfigError, ConfigErrors};

const CASE_KEYS: &[&str] = &[
    "name",
    "id",
    "tag",
    "value",
    "operator",
    "roles",
    "amr",
    "approvers",
    "at",
    "current",
    "repeat",
    "assume_policy",
    "expect",
    "rule",
];

/// Which policy a case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assume {
    /// The policy of the folder, as written.
    AsWritten,
    /// The policy of the folder in audit mode.
    Audit,
    /// No policy at all.
    Missing,
    /// A policy with errors.
    Invalid,
}

const ASSUME: &[(&str, Assume)] = &[
    ("as-written", Assume::AsWritten),
    ("audit", Assume::Audit),
    ("missing", Assume::Missing),
    ("invalid", Assume::Invalid),
];

/// The decision a case expects.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// `None` for a permit.
    pub deny: Option<DenyCode>,
    /// The rule that must permit, or that the denial must name.
    pub rule: Option<String>,
}

/// One test case.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub place: Place,
    pub command: Command,
    pub current: BTreeMap<String, CurrentValue>,
    pub repeat: u32,
    pub assume: Assume,
    pub expect: Expect,
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub place: Place,
    pub expect: Expect,
    pub outcome: Outcome,
    pub passed: bool,
    /// The decision explained (printed for failed cases).
    pub explanation: Explanation,
}

/// The results of every case, and the warnings of the policy.
#[derive(Debug, Clone)]
pub struct TestReport {
    pub results: Vec<CaseResult>,
    pub warnings: Vec<Warning>,
}

impl TestReport {
    /// Whether every case got the decision it expects.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }

    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.results.iter().filter(|r| !r.passed)
    }
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.warnings {
            writeln!(f, "{w}")?;
        }
        for r in &self.results {
            let mark = if r.passed { "ok  " } else { "FAIL" };
            writeln!(f, "{mark} {} ({}): {}", r.name, r.place, r.outcome.short())?;
        }
        for r in self.failures() {
            let expected = match r.expect.deny {
                None => "permit".to_string(),
                Some(c) => format!("deny:{c}"),
            };
            let rule = r
                .expect
                .rule
                .as_ref()
                .map(|x| format!(" by rule \"{x}\""))
                .unwrap_or_default();
            writeln!(
                f,
                "\ncase \"{}\" ({}): expected {expected}{rule}, got {}",
                r.name, r.place, r.outcome
            )?;
            write!(f, "{}", r.explanation)?;
        }
        let failed = self.failures().count();
        writeln!(
            f,
            "\n{} case(s), {} passed, {failed} failed",
            self.results.len(),
            self.results.len() - failed
        )
    }
}

/// Checks the policy of `dir` and runs every case of its `*.tests.toml`
/// files: the report, or every error of the policy or the case files.
pub fn run_tests(dir: &Path, config: &Config) -> Result<TestReport, ConfigErrors> {
    let (policy, warnings) = Policy::load_dir(dir, config)?;
    let files = read_files(dir, true).map_err(DirError::into_errors)?;
    let mut cases = Vec::new();
    let mut errors = Vec::new();
    for (path, text) in &files {
        match parse_cases(path, text, config) {
            Ok(mut c) => cases.append(&mut c),
            Err(mut e) => errors.append(&mut e.errors),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors { errors });
    }
    let mut report = run_cases(&policy, &cases);
    report.warnings = warnings;
    Ok(report)
}

/// Runs cases against a policy; each case starts with a fresh engine.
pub fn run_cases(policy: &Policy, cases: &[TestCase]) -> TestReport {
    let results = cases
        .iter()
        .map(|case| {
            let mut engine = match case.assume {
                Assume::AsWritten => Engine::new(policy.clone()),
                Assume::Audit => Engine::new(policy.clone().with_mode(Mode::Audit)),
                Assume::Missing => Engine::without_policy("the test case assumes no policy"),
                Assume::Invalid => Engine::with_invalid_policy(&ConfigErrors {
                    errors: vec![ConfigError {
                        file: case.place.file.clone(),
                        line: case.place.line,
                        col: 1,
                        message: "the test case assumes a policy with errors".into(),
                        help: None,
                    }],
                }),
            };
            for _ in 1..case.repeat {
                let _earlier = engine.decide(&case.command, &case.current);
            }
            let explanation = engine.explain(&case.command, &case.current);
            let outcome = engine.decide(&case.command, &case.current).outcome();
            let code_ok = match (&outcome, case.expect.deny) {
                (Outcome::Permit { .. }, None) => true,
                (Outcome::Deny(d), Some(c)) => d.code == c,
                _ => false,
            };
            let rule_ok = case
                .expect
                .rule
                .as_deref()
                .is_none_or(|r| outcome.rule() == Some(r));
            CaseResult {
                name: case.name.clone(),
                place: case.place.clone(),
                expect: case.expect.clone(),
                passed: code_ok && rule_ok,
                outcome,
                explanation,
            }
        })
        .collect();
    TestReport {
        results,
        warnings: Vec::new(),
    }
}

/// Reads the cases of one `*.tests.toml` file.
pub fn parse_cases(
    file: &Path,
    text: &str,
    config: &Config,
) -> Result<Vec<TestCase>, ConfigErrors> {
    let tags = TagInfo::all(config);
    let mut r = Reader::new(file, text);
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            r.error(&e.span().unwrap_or(0..0), e.message().to_string());
        }
        return Err(ConfigErrors::new(r.into_errors()));
    }
    let top = Table {
        table: root.get_ref(),
        span: 0..0,
        name: "the top level".into(),
    };
    r.unknown_keys(&top, &["case"]);
    let mut cases = Vec::new();
    if let Field::Valid(items) = r.array_of_tables(&top, "case") {
        for (table, span) in items.into_inner() {
            let t = Table {
                table,
                span,
                name: "[[case]]".into(),
            };
            if let Some(c) = case(&mut r, &t, file, &tags) {
                cases.push(c);
            }
        }
    }
    let errors = r.into_errors();
    if errors.is_empty() {
        Ok(cases)
    } else {
        Err(ConfigErrors::new(errors))
    }
}

fn to_value(l: Literal, v: &DeValue<'_>) -> Value {
    match (l, v) {
        (Literal::Number(_), DeValue::Integer(i)) => {
            i64::from_str_radix(i.as_str(), i.radix()).map_or(Value::Float(0.0), Value::Int)
        }
        (Literal::Number(n), _) => Value::Float(n),
        (Literal::Bool(b), _) => Value::Bool(b),
        (Literal::Text(s), _) => Value::Text(s),
    }
}

fn scalar(r: &mut Reader<'_>, t: &Table<'_, '_>, key: &str) -> Field<Value> {
    let Some(v) = t.get(key) else {
        return Field::Absent;
    };
    match literal(v.get_ref()) {
        Some(l) => Field::Valid(Spanned::new(v.span(), to_value(l, v.get_ref()))),
        None => {
            r.error(
                &v.span(),
                format!(
                    "\"{key}\" in {} must be a number, true/false or a string, found {}",
                    t.name,
                    describe(v.get_ref())
                ),
            );
            Field::Invalid
        }
    }
}

fn string_list(r: &mut Reader<'_>, t: &Table<'_, '_>, key: &str) -> Option<Vec<String>> {
    let Some(v) = t.get(key) else {
        return Some(Vec::new());
    };
    let items = match v.get_ref() {
        DeValue::Array(items) => items,
        other => {
            r.error(
                &v.span(),
                format!(
                    "\"{key}\" in {} must be a list of strings, found {}",
                    t.name,
                    describe(other)
                ),
            );
            return None;
        }
    };
    let mut out = Vec::new();
    for item in items.iter() {
        match item.get_ref() {
            DeValue::String(s) => out.push(s.to_string()),
            other => {
                r.error(
                    &item.span(),
                    format!(
                        "\"{key}\" in {} must list strings, found {}",
                        t.name,
                        describe(other)
                    ),
                );
                return None;
            }
        }
    }
    Some(out)
}

fn case(
    r: &mut Reader<'_>,
    t: &Table<'_, '_>,
    file: &Path,
    tags: &BTreeMap<String, TagInfo>,
) -> Option<TestCase> {
    r.unknown_keys(t, CASE_KEYS);
    let name = r.non_empty(t, "name");
    let name = r.required(t, "name", "\"what the case shows\"", name);
    let t = &Table {
        table: t.table,
        span: t.span.clone(),
        name: match name.get() {
            Some(n) => format!("case \"{n}\""),
            None => "[[case]]".into(),
        },
    };
    let id = r.non_empty(t, "id");
    let tag = r.non_empty(t, "tag");
    let tag = r.required(t, "tag", "\"tank1.level_setpoint\"", tag);
    let value = scalar(r, t, "value");
    let value = r.required(t, "value", "2.5", value);
    let operator = r.non_empty(t, "operator");
    let operator = r.required(t, "operator", "\"alice@plant1\"", operator);
    let roles = string_list(r, t, "roles");
    let amr = string_list(r, t, "amr");
    let approvers = approvers(r, t);
    let at = match t.get("at") {
        None => {
            r.missing(t, "at", "\"2026-11-25T10:00:00+01:00\"");
            None
        }
        Some(v) => {
            let text = match v.get_ref() {
                DeValue::String(s) => Some(s.to_string()),
                DeValue::Datetime(d) => Some(d.to_string()),
                _ => None,
            };
            let ms = text
                .as_deref()
                .and_then(|s| s.parse::<jiff::Timestamp>().ok())
                .and_then(|ts| u64::try_from(ts.as_millisecond()).ok());
            if ms.is_none() {
                r.error_help(
                    &v.span(),
                    format!("\"at\" in {} is not a time with an offset", t.name),
                    Some("write it like \"2026-11-25T10:00:00+01:00\" or \"2026-11-25T09:00:00Z\""),
                );
            }
            ms
        }
    };
    let current = current(r, t, tags);
    let repeat = r.integer::<u32>(t, "repeat", 1..=10_000);
    let assume = r.choice(t, "assume_policy", ASSUME);
    let expect = r.string(t, "expect");
    let expect = r.required(t, "expect", "\"permit\"", expect).and_then(|s| {
        let e = s.get_ref().trim();
        if e == "permit" {
            return Some(None);
        }
        if let Some(code) = e.strip_prefix("deny:").and_then(DenyCode::from_code) {
            return Some(Some(code));
        }
        let codes: Vec<String> = DenyCode::ALL.iter().map(|c| format!("deny:{c}")).collect();
        let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
        let help = match closest(e, &refs) {
            Some(c) => format!("did you mean \"{c}\"?"),
            None => format!("write \"permit\" or one of {}", codes.join(", ")),
        };
        r.error_help(
            &s.span(),
            format!("unknown expectation \"{e}\" in {}", t.name),
            Some(help),
        );
        None
    });
    let rule = r.non_empty(t, "rule");
    let line = r.line(&t.span);
    let name = name.value()?;
    Some(TestCase {
        place: Place {
            file: file.to_path_buf(),
            line,
        },
        command: Command {
            id: id.value().unwrap_or_else(|| name.clone()),
            tag: tag.value()?,
            value: value.value()?,
            operator: operator.value()?,
            roles: roles?,
            amr: amr?,
            approvers: approvers?,
            at_ms: at?,
        },
        name,
        current: current?,
        repeat: repeat.or(1)?,
        assume: assume.or(Assume::AsWritten)?,
        expect: Expect {
            deny: expect.value()?,
            rule: rule.optional()?,
        },
    })
}

fn approvers(r: &mut Reader<'_>, t: &Table<'_, '_>) -> Option<Vec<Approver>> {
    let Some(v) = t.get("approvers") else {
        return Some(Vec::new());
    };
    let DeValue::Array(items) = v.get_ref() else {
        r.error(
            &v.span(),
            format!(
                "\"approvers\" in {} must be a list, found {}",
                t.name,
                describe(v.get_ref())
            ),
        );
        return None;
    };
    let mut out = Some(Vec::new());
    for item in items.iter() {
        let a = match item.get_ref() {
            DeValue::String(s) => Some(Approver::subject(s.to_string())),
            DeValue::Table(table) => {
                let at = Table {
                    table,
                    span: item.span(),
                    name: format!("an approver of {}", t.name),
                };
                r.unknown_keys(&at, &["subject", "roles"]);
                let s = r.non_empty(&at, "subject");
                let s = r.required(&at, "subject", "\"bob@plant1\"", s);
                let roles = string_list(r, &at, "roles");
                s.value()
                    .zip(roles)
                    .map(|(subject, roles)| Approver { subject, roles })
            }
            other => {
                r.error_help(
                    &item.span(),
                    format!("an approver in {} must be a subject or a table, found {}", t.name, describe(other)),
                    Some("write \"bob@plant1\" or { subject = \"bob@plant1\", roles = [\"plant1-supervisors\"] }"),
                );
                None
            }
        };
        out = out.zip(a).map(|(mut v, a)| {
            v.push(a);
            v
        });
    }
    out
}

const QUALITIES: &[(&str, Quality)] = &[
    ("good", Quality::Good),
    ("uncertain", Quality::Uncertain),
    ("bad", Quality::Bad),
];

fn current(
    r: &mut Reader<'_>,
    t: &Table<'_, '_>,
    tags: &BTreeMap<String, TagInfo>,
) -> Option<BTreeMap<String, CurrentValue>> {
    let ct = match r.table(t, "current", &format!("the current values of {}", t.name)) {
        Field::Absent => return Some(BTreeMap::new()),
        Field::Invalid => return None,
        Field::Valid(ct) => ct.into_inner(),
    };
    let names: Vec<&str> = tags.keys().map(String::as_str).collect();
    let mut out = Some(BTreeMap::new());
    for (k, v) in ct.table.iter() {
        let tag = k.get_ref().to_string();
        if !tags.contains_key(&tag) {
            let help = closest(&tag, &names).map(|c| format!("did you mean \"{c}\"?"));
            r.error_help(
                &k.span(),
                format!("unknown tag \"{tag}\" in {}", ct.name),
                help,
            );
            out = None;
            continue;
        }
        let cv = match v.get_ref() {
            DeValue::Table(table) => {
                let vt = Table {
                    table,
                    span: v.span(),
                    name: format!("the current value of \"{tag}\""),
                };
                r.unknown_keys(&vt, &["value", "quality"]);
                let value = scalar(r, &vt, "value");
                let quality = r.choice(&vt, "quality", QUALITIES);
                value
                    .optional()
                    .zip(quality.or(Quality::Good))
                    .map(|(value, quality)| CurrentValue { value, quality })
            }
            other => match literal(other) {
                Some(l) => Some(CurrentValue::good(to_value(l, other))),
                None => {
                    r.error(&v.span(), format!("the current value of \"{tag}\" must be a value or {{ value = ..., quality = \"good\" }}"));
                    None
                }
            },
        };
        out = out.zip(cv).map(|(mut m, cv)| {
            m.insert(tag, cv);
            m
        });
    }
    out
}
