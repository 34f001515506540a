//! Policy files -> [`Policy`]: parse, read every table, resolve names
//! against the device configuration and across files, find rules that can
//! never hold.
//!
//! Stages, in order, each reporting everything it finds:
//! 1. syntax, per file (a file with syntax errors is not read further);
//! 2. tables, per file: unknown keys (with did-you-mean), missing keys,
//!    wrong types, bad rates, windows, time zones; tag names against the
//!    device configuration (unknown, read-only, patterns that match nothing
//!    or everything); bounds against what the tags can hold; conditions
//!    that contradict each other;
//! 3. across files: one `[policy]` table, unique role names and rule ids,
//!    rule roles that exist, approvals that enough people could give,
//!    roles no rule uses.
//!
//! Errors reuse the configuration loader's [`Reader`] and [`ConfigError`];
//! warnings are the same records printed as `warning:`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_spanned::Spanned;
use toml::de::DeValue;

use super::model::*;
use crate::config::read::{closest, describe, parse_document, Field, Reader, Table};
use crate::config::{Config, ConfigError, ConfigErrors};

/// A checked policy: every `*.toml` file of a policy folder (except
/// `*.tests.toml`), read together and resolved against the device
/// configuration. Only [`Policy::parse`] and [`Policy::load_dir`] make one.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) mode: Mode,
    pub(crate) roles: Vec<Role>,
    pub(crate) rules: Vec<Rule>,
    pub(crate) tags: BTreeMap<String, TagInfo>,
    pub(crate) files: Vec<PathBuf>,
}

/// Something in a policy that is allowed but probably not meant: the same
/// record as an error, printed as `FILE:LINE:COL: warning: ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning(pub ConfigError);

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_string().replacen(": error: ", ": warning: ", 1))
    }
}

/// Why a policy folder yielded no policy files at all (as opposed to files
/// with errors in them).
pub(crate) enum DirError {
    /// Missing, unreadable, or without any policy file: there is no policy.
    NoPolicy(ConfigErrors),
    /// A policy file could not be read: the policy is invalid.
    Invalid(ConfigErrors),
}

impl DirError {
    pub fn into_errors(self) -> ConfigErrors {
        match self {
            DirError::NoPolicy(e) | DirError::Invalid(e) => e,
        }
    }
}

fn whole_file(file: &Path, message: String, help: Option<&str>) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: 0,
        col: 0,
        message,
        help: help.map(Into::into),
    }
}

/// Reads the files of a folder whose names end in `suffix` (and, for
/// policies, not in `.tests.toml`), sorted by name.
pub(crate) fn read_files(dir: &Path, tests: bool) -> Result<Vec<(PathBuf, String)>, DirError> {
    let no_policy = |message: String, help: &str| {
        DirError::NoPolicy(ConfigErrors {
            errors: vec![whole_file(dir, message, Some(help))],
        })
    };
    let entries = fs::read_dir(dir).map_err(|e| {
        no_policy(
            format!("cannot read the policy folder: {e}"),
            "create the folder and put the policy files (*.toml) in it; without a policy every command is denied",
        )
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            p.is_file() && name.ends_with(".toml") && name.ends_with(".tests.toml") == tests
        })
        .collect();
    paths.sort();
    if paths.is_empty() && !tests {
        return Err(no_policy(
            "the policy folder holds no policy file (*.toml)".into(),
            "write the policy in a .toml file in this folder; without a policy every command is denied",
        ));
    }
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match fs::read_to_string(&p) {
            Ok(text) => files.push((p, text)),
            Err(e) => errors.push(whole_file(
                &p,
                format!("cannot read the file: {e}"),
                Some("policy files must be readable UTF-8 text"),
            )),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(DirError::Invalid(ConfigErrors { errors }))
    }
}

impl Policy {
    /// Reads and checks every policy file (`*.toml` except `*.tests.toml`)
    /// of `dir` against the device configuration: the policy and its
    /// warnings, or every error found.
    pub fn load_dir(dir: &Path, config: &Config) -> Result<(Policy, Vec<Warning>), ConfigErrors> {
        let files = read_files(dir, false).map_err(DirError::into_errors)?;
        Policy::parse(&files, config)
    }

    /// Checks policy files given as `(name for messages, text)`, read
    /// together as one policy.
    pub fn parse(
        files: &[(PathBuf, String)],
        config: &Config,
    ) -> Result<(Policy, Vec<Warning>), ConfigErrors> {
        let tags = TagInfo::all(config);
        let mut cx = Checker {
            files,
            errors: files.iter().map(|(p, t)| Reader::new(p, t)).collect(),
            warnings: files.iter().map(|(p, t)| Reader::new(p, t)).collect(),
            tags: &tags,
            policy_tables: Vec::new(),
            roles: Vec::new(),
            rules: Vec::new(),
            extra_warnings: Vec::new(),
        };
        for (i, (_, text)) in files.iter().enumerate() {
            cx.file(i, text);
        }
        let mode = cx.across_files();
        let Checker {
            errors,
            warnings,
            roles,
            rules,
            mut extra_warnings,
            ..
        } = cx;
        let order = |e: &ConfigError| {
            let f = files.iter().position(|(p, _)| *p == e.file);
            (f, e.line, e.col)
        };
        let mut errors: Vec<ConfigError> =
            errors.into_iter().flat_map(Reader::into_errors).collect();
        errors.sort_by_key(order);
        if !errors.is_empty() {
            return Err(ConfigErrors { errors });
        }
        let mut warn: Vec<ConfigError> =
            warnings.into_iter().flat_map(Reader::into_errors).collect();
        warn.append(&mut extra_warnings);
        warn.sort_by_key(order);
        let policy = Policy {
            mode,
            roles: roles.into_iter().map(|r| r.role).collect(),
            rules: rules.into_iter().filter_map(|r| r.rule).collect(),
            tags,
            files: files.iter().map(|(p, _)| p.clone()).collect(),
        };
        Ok((policy, warn.into_iter().map(Warning).collect()))
    }

    /// `enforce` or `audit`.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The same policy in another mode (for trying a policy in audit mode).
    pub fn with_mode(mut self, mode: Mode) -> Policy {
        self.mode = mode;
        self
    }

    /// The rule ids, in the order rules are tried.
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }

    /// The files the policy was read from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// A one-paragraph summary for `gateway policy check`.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "policy OK: {} file(s), {} role(s), {} rule(s), mode {}",
            self.files.len(),
            self.roles.len(),
            self.rules.len(),
            self.mode.as_str()
        )?;
        for r in &self.rules {
            let tags: Vec<&str> = r.tags.iter().map(String::as_str).collect();
            writeln!(
                f,
                "  rule \"{}\" ({}): roles {} may write {}",
                r.id,
                r.place,
                r.roles.join(", "),
                tags.join(", ")
            )?;
        }
        Ok(())
    }
}

const TOP_KEYS: &[&str] = &["policy", "roles", "rules"];
const POLICY_KEYS: &[&str] = &["mode"];
const ROLE_KEYS: &[&str] = &["name", "subjects", "claims"];
const RULE_KEYS: &[&str] = &[
    "id",
    "description",
    "roles",
    "tags",
    "min",
    "max",
    "allowed",
    "max_step",
    "rate_per_tag",
    "rate_per_operator",
    "windows",
    "interlocks",
    "require_mfa",
    "approvals",
];
const WINDOW_KEYS: &[&str] = &["days", "from", "to", "tz"];
const INTERLOCK_KEYS: &[&str] = &["tag", "equals", "min", "max"];
const MODES: &[(&str, Mode)] = &[("enforce", Mode::Enforce), ("audit", Mode::Audit)];
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Most approvals a rule may require.
const MAX_APPROVALS: i64 = 10;

struct RawRole {
    file: usize,
    name_span: Range<usize>,
    header: Range<usize>,
    role: Role,
}

struct RawRule {
    file: usize,
    id_span: Range<usize>,
    header: Range<usize>,
    id: String,
    roles: Vec<Spanned<String>>,
    approvals: Option<Spanned<u32>>,
    /// The checked rule, when every field of it was valid.
    rule: Option<Rule>,
}

struct Checker<'a, 'c> {
    files: &'a [(PathBuf, String)],
    errors: Vec<Reader<'a>>,
    warnings: Vec<Reader<'a>>,
    tags: &'c BTreeMap<String, TagInfo>,
    policy_tables: Vec<(usize, Range<usize>, Option<Spanned<Mode>>)>,
    roles: Vec<RawRole>,
    rules: Vec<RawRule>,
    extra_warnings: Vec<ConfigError>,
}

/// The bundled time zone database: the same answers on every machine,
/// including containers without `/usr/share/zoneinfo`.
pub(crate) fn tzdb() -> &'static jiff::tz::TimeZoneDatabase {
    static DB: OnceLock<jiff::tz::TimeZoneDatabase> = OnceLock::new();
    DB.get_or_init(jiff::tz::TimeZoneDatabase::bundled)
}

impl<'a> Checker<'a, '_> {
    fn file(&mut self, i: usize, text: &'a str) {
        let r = &mut self.errors[i];
        let Some(root) = parse_document(
            r,
            text,
            "a key may be set only once; repeated tables are written [[rules]] or [[roles]]",
        ) else {
            return;
        };
        let top = Table {
            table: root.get_ref(),
            span: 0..0,
            name: "the top level".into(),
        };
        r.unknown_keys(&top, TOP_KEYS);
        if let Field::Valid(p) = r.table(&top, "policy", "[policy]") {
            let p = p.into_inner();
            r.unknown_keys(&p, POLICY_KEYS);
            let mode = r.choice(&p, "mode", MODES);
            self.policy_tables
                .push((i, p.span.clone(), mode.valid().cloned()));
        }
        if let Field::Valid(roles) = r.array_of_tables(&top, "roles") {
            for (table, span) in roles.into_inner() {
                let t = Table {
                    table,
                    span: span.clone(),
                    name: "[[roles]]".into(),
                };
                self.role(i, &t);
            }
        }
        if let Field::Valid(rules) = self.errors[i].array_of_tables(&top, "rules") {
            for (table, span) in rules.into_inner() {
                let t = Table {
                    table,
                    span: span.clone(),
                    name: "[[rules]]".into(),
                };
                self.rule(i, &t);
            }
        }
    }

    fn role(&mut self, i: usize, t: &Table<'_, '_>) {
        let r = &mut self.errors[i];
        r.unknown_keys(t, ROLE_KEYS);
        let name = r.non_empty(t, "name");
        let name = r.required(t, "name", "\"shift-operator\"", name);
        let subjects = strings(r, t, "subjects");
        let claims = strings(r, t, "claims");
        let Field::Valid(name) = name else { return };
        let (name_span, name) = (name.span(), name.into_inner());
        if matches!(subjects, Field::Absent) && matches!(claims, Field::Absent) {
            r.error_help(
                &t.span,
                format!("role \"{name}\" has neither subjects nor claims: nobody holds it"),
                Some("add `subjects = [\"alice@plant1\"]` (token subjects) or `claims = [\"plant1-operators\"]` (values of the token's roles claim)"),
            );
        }
        let list = |f: Field<Vec<Spanned<String>>>| {
            f.value()
                .unwrap_or_default()
                .into_iter()
                .map(Spanned::into_inner)
                .collect()
        };
        self.roles.push(RawRole {
            file: i,
            name_span,
            header: t.span.clone(),
            role: Role {
                name,
                subjects: list(subjects),
                claims: list(claims),
            },
        });
    }

    fn rule(&mut self, i: usize, t: &Table<'_, '_>) {
        let tags = self.tags;
        let r = &mut self.errors[i];
        let w = &mut self.warnings[i];
        let id = r.non_empty(t, "id");
        let id = r.required(t, "id", "\"tank1-setpoint\"", id).and_then(|s| {
            let ok = s.get_ref().len() <= 64
                && s.get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            if !ok {
                r.error_help(
                    &s.span(),
                    format!("rule id \"{}\" is not a valid id", s.get_ref()),
                    Some("use 1-64 characters of A-Z a-z 0-9 _ - ."),
                );
            }
            ok.then(|| s.into_inner())
        });
        let id_ok = matches!(id, Field::Valid(_));
        let (id, id_span) = match &id {
            Field::Valid(s) => (s.get_ref().clone(), s.span()),
            _ => (String::new(), t.span.clone()),
        };
        let t = &Table {
            table: t.table,
            span: t.span.clone(),
            name: if id.is_empty() {
                "[[rules]]".into()
            } else {
                format!("rule \"{id}\"")
            },
        };
        r.unknown_keys(t, RULE_KEYS);
        let description = r.string(t, "description");
        let roles = strings(r, t, "roles");
        let roles = r.required(t, "roles", "[\"shift-operator\"]", roles);
        let names = strings(r, t, "tags");
        let names = r.required(t, "tags", "[\"tank1.level_setpoint\"]", names);
        for (key, f) in [("roles", &roles), ("tags", &names)] {
            if let Field::Valid(v) = f {
                if v.get_ref().is_empty() {
                    r.error(
                        &v.span(),
                        format!("\"{key}\" in {} is empty: the rule can never apply", t.name),
                    );
                }
            }
        }
        let min = r.number(t, "min");
        let max = r.number(t, "max");
        let allowed = literals(r, t, "allowed");
        let max_step = r.number(t, "max_step").and_then(|s| {
            if *s.get_ref() > 0.0 {
                Some(s.into_inner())
            } else {
                r.error_help(
                    &s.span(),
                    format!("\"max_step\" in {} must be greater than 0", t.name),
                    Some("max_step is the largest change allowed in one command; leave it out for no limit"),
                );
                None
            }
        });
        let rate_per_tag = r
            .string(t, "rate_per_tag")
            .and_then(|s| rate(r, t, "rate_per_tag", s));
        let rate_per_operator = r
            .string(t, "rate_per_operator")
            .and_then(|s| rate(r, t, "rate_per_operator", s));
        let windows = match r.array_of_tables(t, "windows") {
            Field::Valid(ws) => {
                let mut out = Some(Vec::new());
                for (table, span) in ws.into_inner() {
                    let wt = Table {
                        table,
                        span,
                        name: format!("a window of {}", t.name),
                    };
                    let w = window(r, &wt);
                    out = out.zip(w).map(|(mut v, w)| {
                        v.push(w);
                        v
                    });
                }
                out
            }
            Field::Absent => Some(Vec::new()),
            Field::Invalid => None,
        };
        let interlocks = match r.array_of_tables(t, "interlocks") {
            Field::Valid(ls) => {
                let mut out = Some(Vec::new());
                for (table, span) in ls.into_inner() {
                    let lt = Table {
                        table,
                        span: span.clone(),
                        name: format!("an interlock of {}", t.name),
                    };
                    let l = interlock(r, &lt, tags);
                    out = out.zip(l).map(|(mut v, l)| {
                        v.push((span, l));
                        v
                    });
                }
                out
            }
            Field::Absent => Some(Vec::new()),
            Field::Invalid => None,
        };
        if let Some(ls) = &interlocks {
            contradicting_interlocks(r, t, ls);
        }
        let require_mfa = r.boolean(t, "require_mfa");
        let approvals = r.integer::<u32>(t, "approvals", 0..=MAX_APPROVALS);

        // Tags: names against the device configuration, patterns against
        // its writable tags.
        let mut matched = BTreeSet::new();
        let writable: Vec<&str> = tags
            .iter()
            .filter(|(_, i)| i.writable)
            .map(|(n, _)| n.as_str())
            .collect();
        let mut tags_ok = matches!(names, Field::Valid(_));
        for name in names.get().map(|v| v.as_slice()).unwrap_or_default() {
            let (span, n) = (name.span(), name.get_ref());
            if is_pattern(n) {
                let hits: Vec<&str> = writable.iter().copied().filter(|w| glob(n, w)).collect();
                if hits.is_empty() {
                    let read_only = tags.keys().filter(|k| glob(n, k)).count();
                    let message = if read_only > 0 {
                        format!("pattern \"{n}\" in {} matches only read-only tags: the rule never applies to them", t.name)
                    } else {
                        format!(
                            "pattern \"{n}\" in {} matches no tag of the device configuration",
                            t.name
                        )
                    };
                    w.error_help(
                        &span,
                        message,
                        Some(format!("writable tags are: {}", writable.join(", "))),
                    );
                } else if hits.len() == writable.len() && writable.len() > 1 {
                    w.error_help(
                        &span,
                        format!("pattern \"{n}\" in {} matches every writable tag", t.name),
                        Some("least privilege: name the tags this rule is for"),
                    );
                }
                matched.extend(hits.into_iter().map(String::from));
            } else {
                match tags.get(n) {
                    None => {
                        tags_ok = false;
                        let all: Vec<&str> = tags.keys().map(String::as_str).collect();
                        let help = match closest(n, &all) {
                            Some(c) => format!("did you mean \"{c}\"?"),
                            None => format!("writable tags are: {}", writable.join(", ")),
                        };
                        r.error_help(
                            &span,
                            format!("{} names unknown tag \"{n}\": it is not in the device configuration", t.name),
                            Some(help),
                        );
                    }
                    Some(info) if !info.writable => {
                        tags_ok = false;
                        r.error_help(
                            &span,
                            format!("{} names tag \"{n}\", which is read-only in the device configuration", t.name),
                            Some("commands can only write tags with `writable = true` in gateway.toml; remove the tag from this rule"),
                        );
                    }
                    Some(_) => {
                        matched.insert(n.clone());
                    }
                }
            }
        }

        bounds(r, w, t, tags, &matched, &min, &max, &allowed, &max_step);

        let place = Place {
            file: self.files[i].0.clone(),
            line: r.line(&t.span),
        };
        let roles_list = roles.get().cloned().unwrap_or_default();
        let rule = (|| {
            if !id_ok || !tags_ok {
                return None;
            }
            Some(Rule {
                id: id.clone(),
                description: description.optional()?,
                place,
                roles: roles_list.iter().map(|s| s.get_ref().clone()).collect(),
                tags: matched,
                min: min.optional()?,
                max: max.optional()?,
                allowed: allowed
                    .optional()?
                    .map(|v| v.into_iter().map(Spanned::into_inner).collect()),
                max_step: max_step.optional()?,
                rate_per_tag: rate_per_tag.optional()?,
                rate_per_operator: rate_per_operator.optional()?,
                windows: windows?,
                interlocks: interlocks?.into_iter().map(|(_, l)| l).collect(),
                require_mfa: require_mfa.or(false)?,
                approvals: approvals.clone().or(0)?,
            })
        })();
        self.rules.push(RawRule {
            file: i,
            id_span,
            header: t.span.clone(),
            id,
            roles: roles_list,
            approvals: approvals.valid().cloned(),
            rule,
        });
    }

    /// Checks that need every file: returns the policy mode.
    fn across_files(&mut self) -> Mode {
        let mut mode = Mode::Enforce;
        if let Some((first, rest)) = self.policy_tables.split_first() {
            let first_place = Place {
                file: self.files[first.0].0.clone(),
                line: self.errors[first.0].line(&first.1),
            };
            for (f, span, _) in rest {
                self.errors[*f].error_help(
                    span,
                    format!("[policy] is already set at {first_place}"),
                    Some("keep one [policy] table for the whole policy folder"),
                );
            }
            if let Some(m) = &first.2 {
                mode = *m.get_ref();
                if mode == Mode::Audit {
                    self.warnings[first.0].error_help(
                        &m.span(),
                        "the policy is in audit mode: every command is denied with audit_mode, and the reason says what the policy would have decided",
                        Some("set mode = \"enforce\" once the audit records show the policy decides as intended"),
                    );
                }
            }
        }

        let mut role_at: BTreeMap<&str, usize> = BTreeMap::new();
        for (k, role) in self.roles.iter().enumerate() {
            if let Some(&j) = role_at.get(role.role.name.as_str()) {
                let first = &self.roles[j];
                let at = Place {
                    file: self.files[first.file].0.clone(),
                    line: self.errors[first.file].line(&first.header),
                };
                self.errors[role.file].error_help(
                    &role.name_span,
                    format!("duplicate role \"{}\" (first defined at {at})", role.role.name),
                    Some("role names are unique across all policy files; merge the two or rename one"),
                );
            } else {
                role_at.insert(&role.role.name, k);
            }
        }
        let role_names: Vec<&str> = role_at.keys().copied().collect();

        let mut rule_at: BTreeMap<&str, usize> = BTreeMap::new();
        let mut used: BTreeSet<&str> = BTreeSet::new();
        for (k, rule) in self.rules.iter().enumerate() {
            if !rule.id.is_empty() {
                if let Some(&j) = rule_at.get(rule.id.as_str()) {
                    let first = &self.rules[j];
                    let at = Place {
                        file: self.files[first.file].0.clone(),
                        line: self.errors[first.file].line(&first.header),
                    };
                    self.errors[rule.file].error_help(
                        &rule.id_span,
                        format!("duplicate rule id \"{}\" (first defined at {at})", rule.id),
                        Some("rule ids name the rule in every decision and audit record, across all policy files; rename one"),
                    );
                } else {
                    rule_at.insert(&rule.id, k);
                }
            }
            for name in &rule.roles {
                let n = name.get_ref().as_str();
                if role_at.contains_key(n) {
                    used.insert(n);
                    continue;
                }
                let help = match closest(n, &role_names) {
                    Some(c) => format!("did you mean \"{c}\"?"),
                    None if role_names.is_empty() => {
                        "declare it in a [[roles]] table with its subjects or claims".to_string()
                    }
                    None => format!("declared roles are: {}", role_names.join(", ")),
                };
                self.errors[rule.file].error_help(
                    &name.span(),
                    format!("rule \"{}\" names unknown role \"{n}\"", rule.id),
                    Some(help),
                );
            }
            // Approvals: the requester and N others, each holding a role
            // of the rule. Claims can be held by anyone the identity
            // provider grants them to, so only subject-only roles bound it.
            if let Some(a) = &rule.approvals {
                let need = *a.get_ref() as usize;
                let held: Vec<&RawRole> = rule
                    .roles
                    .iter()
                    .filter_map(|n| role_at.get(n.get_ref().as_str()).map(|&j| &self.roles[j]))
                    .collect();
                let open = held.iter().any(|r| !r.role.claims.is_empty());
                let people: BTreeSet<&str> = held
                    .iter()
                    .flat_map(|r| r.role.subjects.iter().map(String::as_str))
                    .collect();
                if need > 0 && !open && held.len() == rule.roles.len() && people.len() < need + 1 {
                    self.errors[rule.file].error_help(
                        &a.span(),
                        format!(
                            "rule \"{}\" needs {need} approval(s) besides the requester, but its roles name only {} person(s): it can never permit",
                            rule.id,
                            people.len()
                        ),
                        Some(format!("lower approvals to at most {}, or add people (or claims) to the rule's roles", people.len().saturating_sub(1))),
                    );
                }
            }
        }
        for role in &self.roles {
            if !used.contains(role.role.name.as_str())
                && role_at.contains_key(role.role.name.as_str())
            {
                self.warnings[role.file].error_help(
                    &role.name_span,
                    format!("role \"{}\" is used by no rule", role.role.name),
                    Some("remove it, or name it in the roles of a rule"),
                );
            }
        }
        if self.rules.is_empty() {
            if let Some((f, _)) = self.files.first() {
                self.extra_warnings.push(whole_file(
                    f,
                    "the policy has no rules: every command is denied".into(),
                    Some("add [[rules]] tables that name who may write which tags"),
                ));
            }
        }
        mode
    }
}

/// A list of strings (a single string is refused with a fix).
fn strings(r: &mut Reader<'_>, t: &Table<'_, '_>, key: &str) -> Field<Vec<Spanned<String>>> {
    let Some(v) = t.get(key) else {
        return Field::Absent;
    };
    let DeValue::Array(items) = v.get_ref() else {
        let help = match v.get_ref() {
            DeValue::String(s) => Some(format!("write a list: {key} = [\"{s}\"]")),
            _ => None,
        };
        r.error_help(
            &v.span(),
            format!(
                "\"{key}\" in {} must be a list of strings, found {}",
                t.name,
                describe(v.get_ref())
            ),
            help,
        );
        return Field::Invalid;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for item in items.iter() {
        match item.get_ref() {
            DeValue::String(s) if !s.trim().is_empty() => {
                out.push(Spanned::new(item.span(), s.to_string()))
            }
            other => {
                ok = false;
                r.error(
                    &item.span(),
                    format!(
                        "\"{key}\" in {} must be a list of non-empty strings, found {}",
                        t.name,
                        describe(other)
                    ),
                );
            }
        }
    }
    if ok {
        Field::Valid(Spanned::new(v.span(), out))
    } else {
        Field::Invalid
    }
}

/// A TOML scalar as a policy value.
pub(crate) fn literal(v: &DeValue<'_>) -> Option<Literal> {
    match v {
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| Literal::Number(n as f64)),
        DeValue::Float(f) => f
            .as_str()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Literal::Number),
        DeValue::Boolean(b) => Some(Literal::Bool(*b)),
        DeValue::String(s) => Some(Literal::Text(s.to_string())),
        _ => None,
    }
}

fn literals(r: &mut Reader<'_>, t: &Table<'_, '_>, key: &str) -> Field<Vec<Spanned<Literal>>> {
    let Some(v) = t.get(key) else {
        return Field::Absent;
    };
    let DeValue::Array(items) = v.get_ref() else {
        r.error_help(
            &v.span(),
            format!(
                "\"{key}\" in {} must be a list of values, found {}",
                t.name,
                describe(v.get_ref())
            ),
            Some(format!("write a list: {key} = [0, 1]")),
        );
        return Field::Invalid;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for item in items.iter() {
        match literal(item.get_ref()) {
            Some(l) => out.push(Spanned::new(item.span(), l)),
            None => {
                ok = false;
                r.error(
                    &item.span(),
                    format!(
                        "\"{key}\" in {} must list numbers, true/false or strings, found {}",
                        t.name,
                        describe(item.get_ref())
                    ),
                );
            }
        }
    }
    if !ok {
        return Field::Invalid;
    }
    if out.is_empty() {
        r.error_help(
            &v.span(),
            format!(
                "\"{key}\" in {} is empty: the rule can never permit",
                t.name
            ),
            Some("list the values that may be written, or leave the key out"),
        );
        return Field::Invalid;
    }
    Field::Valid(Spanned::new(v.span(), out))
}

/// `N/period`: `6/min`, `20/h`, `100/d`, `1/10s`.
pub(crate) fn parse_rate(s: &str) -> Option<Rate> {
    let (n, period) = s.trim().split_once('/')?;
    let count: u32 = n.trim().parse().ok().filter(|&n| n >= 1)?;
    let period = period.trim();
    let digits = period.chars().take_while(char::is_ascii_digit).count();
    let (k, unit) = period.split_at(digits);
    let k: u64 = if k.is_empty() {
        1
    } else {
        k.parse().ok().filter(|&k| k >= 1)?
    };
    let unit_ms: u64 = match unit.trim() {
        "s" | "sec" => 1_000,
        "min" => 60_000,
        "h" | "hour" => 3_600_000,
        "d" | "day" => 86_400_000,
        _ => return None,
    };
    let window_ms = k.checked_mul(unit_ms).filter(|&w| w <= 366 * 86_400_000)?;
    Some(Rate {
        count,
        window_ms,
        text: s.trim().to_string(),
    })
}

fn rate(r: &mut Reader<'_>, t: &Table<'_, '_>, key: &str, s: Spanned<String>) -> Option<Rate> {
    let rate = parse_rate(s.get_ref());
    if rate.is_none() {
        r.error_help(
            &s.span(),
            format!("\"{key}\" in {} is not a rate: \"{}\"", t.name, s.get_ref()),
            Some("write a count of at least 1 and a period: \"6/min\", \"20/h\", \"100/d\" or \"1/10s\" (periods s, min, h, d, at most a year)"),
        );
    }
    rate
}

/// `HH:MM` as seconds after midnight; `24:00` only when `end`.
fn clock_time(s: &str, end: bool) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    let ok = (h < 24 && m < 60) || (end && h == 24 && m == 0);
    ok.then_some(h * 3600 + m * 60)
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri`, `daily`.
fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    let day = |d: &str| -> Result<usize, String> {
        let d = d.trim().to_ascii_lowercase();
        let short = d.get(..3).unwrap_or(&d);
        let full = [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ];
        match DAYS.iter().position(|&n| n == short) {
            Some(i) if d.len() == 3 || full[i] == d => Ok(i),
            _ => Err(match closest(&d, &DAYS) {
                Some(c) => format!("unknown day \"{d}\"; did you mean \"{c}\"?"),
                None => format!("unknown day \"{d}\""),
            }),
        }
    };
    for part in s.split(',') {
        let part = part.trim();
        if matches!(part, "daily" | "*" | "all") {
            days = [true; 7];
            continue;
        }
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut i = a;
                loop {
                    days[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

pub(crate) fn window(r: &mut Reader<'_>, t: &Table<'_, '_>) -> Option<Window> {
    r.unknown_keys(t, WINDOW_KEYS);
    let days_help = "write days like \"mon-fri\", \"sat,sun\", \"mon,wed-fri\" or \"daily\"";
    let days = r
        .string(t, "days")
        .and_then(|s| match parse_days(s.get_ref()) {
            Ok(d) => Some((d, s.get_ref().trim().to_string())),
            Err(e) => {
                r.error_help(
                    &s.span(),
                    format!("\"days\" in {}: {e}", t.name),
                    Some(days_help),
                );
                None
            }
        });
    let time = |r: &mut Reader<'_>, key: &str, end: bool| {
        let f = r.string(t, key);
        let f = r.required(t, key, if end { "\"22:00\"" } else { "\"06:00\"" }, f);
        f.and_then(|s| {
            let v = clock_time(s.get_ref(), end);
            if v.is_none() {
                r.error_help(
                    &s.span(),
                    format!(
                        "\"{key}\" in {} is not a time of day: \"{}\"",
                        t.name,
                        s.get_ref()
                    ),
                    Some(if end {
                        "write HH:MM in 24-hour time, 00:00 to 24:00"
                    } else {
                        "write HH:MM in 24-hour time, 00:00 to 23:59"
                    }),
                );
            }
            v
        })
    };
    let from = time(r, "from", false);
    let to = time(r, "to", true);
    let tz = r.non_empty(t, "tz");
    let tz = r.required(t, "tz", "\"Europe/Berlin\"", tz).and_then(|s| match tzdb().get(s.get_ref()) {
        Ok(z) => Some((z, s.get_ref().clone())),
        Err(_) => {
            let names: Vec<String> = tzdb().available().map(|n| n.as_str().to_string()).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let help = match closest(s.get_ref(), &refs) {
                Some(c) => format!("did you mean \"{c}\"?"),
                None => "use an IANA time zone name such as \"Europe/Berlin\", \"America/Chicago\" or \"UTC\"".into(),
            };
            r.error_help(&s.span(), format!("unknown time zone \"{}\" in {}", s.get_ref(), t.name), Some(help));
            None
        }
    });
    if let (Some(f), Some(to_s)) = (from.get(), to.get()) {
        if f == to_s {
            r.error_help(
                &t.span,
                format!(
                    "{} starts and ends at the same time: it is never open",
                    t.name
                ),
                Some("for the whole day write from = \"00:00\", to = \"24:00\""),
            );
            return None;
        }
    }
    let (from_s, to_s) = (from.value()?, to.value()?);
    let (days, days_text) = days.or(([true; 7], "daily".into()))?;
    let (tz, tz_name) = tz.value()?;
    Some(Window {
        days,
        from_s,
        to_s,
        tz,
        text: format!(
            "{days_text} {:02}:{:02}-{:02}:{:02} {tz_name}",
            from_s / 3600,
            from_s % 3600 / 60,
            to_s / 3600,
            to_s % 3600 / 60
        ),
    })
}

fn interlock(
    r: &mut Reader<'_>,
    t: &Table<'_, '_>,
    tags: &BTreeMap<String, TagInfo>,
) -> Option<Interlock> {
    r.unknown_keys(t, INTERLOCK_KEYS);
    let tag = r.non_empty(t, "tag");
    let tag = r.required(t, "tag", "\"tank1.mode\"", tag);
    let equals = match t.get("equals") {
        None => Field::Absent,
        Some(v) => match literal(v.get_ref()) {
            Some(l) => Field::Valid(Spanned::new(v.span(), l)),
            None => {
                r.error(
                    &v.span(),
                    format!(
                        "\"equals\" in {} must be a number, true/false or a string, found {}",
                        t.name,
                        describe(v.get_ref())
                    ),
                );
                Field::Invalid
            }
        },
    };
    let min = r.number(t, "min");
    let max = r.number(t, "max");
    let tag = tag.and_then(|s| {
        let name = s.get_ref();
        match tags.get(name) {
            Some(info) => Some((name.clone(), info.clone())),
            None => {
                let all: Vec<&str> = tags.keys().map(String::as_str).collect();
                let help = closest(name, &all).map(|c| format!("did you mean \"{c}\"?"));
                r.error_help(
                    &s.span(),
                    format!(
                        "{} names unknown tag \"{name}\": it is not in the device configuration",
                        t.name
                    ),
                    help,
                );
                None
            }
        }
    });
    let has_range = !matches!((&min, &max), (Field::Absent, Field::Absent));
    match (&equals, has_range) {
        (Field::Absent, false) => {
            r.error_help(
                &t.span,
                format!("{} has no condition", t.name),
                Some("add `equals = ...`, or `min = ...` and/or `max = ...`"),
            );
            return None;
        }
        (Field::Valid(e), true) => {
            r.error_help(
                &e.span(),
                format!("{} has both equals and min/max", t.name),
                Some("use either equals, or min and/or max"),
            );
            return None;
        }
        _ => {}
    }
    if let (Some(lo), Some(hi)) = (min.get(), max.get()) {
        if lo > hi {
            let span = min.span().unwrap_or(t.span.clone());
            r.error_help(
                &span,
                format!(
                    "{} can never hold: min {lo} is greater than max {hi}",
                    t.name
                ),
                Some("swap min and max"),
            );
            return None;
        }
    }
    let (name, info) = tag.value()?;
    if let Field::Valid(e) = &equals {
        let fits = matches!(
            (&info.kind, e.get_ref()),
            (TagKind::Bool, Literal::Bool(_))
                | (TagKind::Number { .. }, Literal::Number(_))
                | (TagKind::Text { .. }, Literal::Text(_))
        );
        if !fits {
            r.error_help(
                &e.span(),
                format!(
                    "{} compares tag \"{name}\" with {}, which it can never hold",
                    t.name,
                    e.get_ref()
                ),
                Some(kind_help(&info.kind)),
            );
            return None;
        }
    }
    if has_range && !info.is_number() {
        let span = min.span().or(max.span()).unwrap_or(t.span.clone());
        r.error_help(
            &span,
            format!(
                "{}: min and max apply to numbers, but tag \"{name}\" is not a number",
                t.name
            ),
            Some(kind_help(&info.kind)),
        );
        return None;
    }
    let test = match equals.value() {
        Some(l) => InterlockTest::Equals(l),
        None => InterlockTest::Range {
            min: min.optional()?,
            max: max.optional()?,
        },
    };
    Some(Interlock { tag: name, test })
}

fn kind_help(kind: &TagKind) -> &'static str {
    match kind {
        TagKind::Bool => "the tag is on/off: compare with true or false",
        TagKind::Number { .. } => "the tag is a number: compare with a number",
        TagKind::Text { .. } => "the tag is text: compare with a string",
    }
}

/// Two interlocks on the same tag that cannot both hold.
fn contradicting_interlocks(
    r: &mut Reader<'_>,
    t: &Table<'_, '_>,
    ls: &[(Range<usize>, Interlock)],
) {
    let range = |l: &InterlockTest| match l {
        InterlockTest::Equals(Literal::Number(n)) => Some((*n, *n)),
        InterlockTest::Range { min, max } => {
            Some((min.unwrap_or(f64::MIN), max.unwrap_or(f64::MAX)))
        }
        _ => None,
    };
    for (j, (span, b)) in ls.iter().enumerate() {
        for (_, a) in &ls[..j] {
            if a.tag != b.tag {
                continue;
            }
            let never = match (&a.test, &b.test) {
                (InterlockTest::Equals(x), InterlockTest::Equals(y))
                    if !matches!((x, y), (Literal::Number(_), Literal::Number(_))) =>
                {
                    x != y
                }
                (x, y) => match (range(x), range(y)) {
                    (Some((lo1, hi1)), Some((lo2, hi2))) => lo1.max(lo2) > hi1.min(hi2),
                    _ => false,
                },
            };
            if never {
                r.error_help(
                    span,
                    format!("{}: interlocks \"{a}\" and \"{b}\" can never both hold: the rule can never permit", t.name),
                    Some("remove one of them, or correct the values"),
                );
            }
        }
    }
}

/// The value conditions of a rule against the kinds and ranges of its tags.
#[allow(clippy::too_many_arguments)]
fn bounds(
    r: &mut Reader<'_>,
    w: &mut Reader<'_>,
    t: &Table<'_, '_>,
    tags: &BTreeMap<String, TagInfo>,
    matched: &BTreeSet<String>,
    min: &Field<f64>,
    max: &Field<f64>,
    allowed: &Field<Vec<Spanned<Literal>>>,
    max_step: &Field<f64>,
) {
    let infos: Vec<(&str, &TagInfo)> = matched
        .iter()
        .filter_map(|n| tags.get(n).map(|i| (n.as_str(), i)))
        .collect();
    let not_numbers: Vec<&str> = infos
        .iter()
        .filter(|(_, i)| !i.is_number())
        .map(|(n, _)| *n)
        .collect();
    let numbers: Vec<(&str, &TagInfo)> = infos
        .iter()
        .filter(|(_, i)| i.is_number())
        .copied()
        .collect();

    for (key, f) in [("min", min), ("max", max), ("max_step", max_step)] {
        if let (Some(span), false) = (f.span(), not_numbers.is_empty()) {
            r.error_help(
                &span,
                format!("\"{key}\" in {} applies to numbers, but {} not a number", t.name, list_tags(&not_numbers)),
                Some("for on/off tags use allowed = [true] or allowed = [false]; or write a separate rule for the numeric tags"),
            );
        }
    }
    if let (Some(lo), Some(hi)) = (min.get(), max.get()) {
        if lo > hi {
            r.error_help(
                &min.span().unwrap_or(t.span.clone()),
                format!(
                    "{} can never permit: min {lo} is greater than max {hi}",
                    t.name
                ),
                Some("swap min and max"),
            );
            return;
        }
    }
    if let Some(values) = allowed.get() {
        for v in values {
            let lit = v.get_ref();
            if let Literal::Number(x) = lit {
                let below = min.get().is_some_and(|lo| x < lo);
                let above = max.get().is_some_and(|hi| x > hi);
                if below || above {
                    r.error_help(
                        &v.span(),
                        format!("allowed value {x} in {} is outside min .. max, so it can never be written", t.name),
                        Some("remove the value, or widen min/max"),
                    );
                    continue;
                }
            }
            // The value must fit at least one tag of the rule.
            let fits = infos.iter().any(|(_, i)| match (&i.kind, lit) {
                (TagKind::Bool, Literal::Bool(_)) => true,
                (TagKind::Text { max_bytes }, Literal::Text(s)) => s.len() <= *max_bytes,
                (TagKind::Number { .. }, Literal::Number(x)) => {
                    i.reject(&twin_model::Value::Float(*x)).is_none()
                }
                _ => false,
            });
            if !fits && !infos.is_empty() {
                let names: Vec<&str> = infos.iter().map(|(n, _)| *n).collect();
                r.error_help(
                    &v.span(),
                    format!(
                        "allowed value {lit} in {} cannot be written to {}",
                        t.name,
                        list_tags(&names)
                    ),
                    Some(kind_help(&infos[0].1.kind)),
                );
            }
        }
    }
    for (name, info) in &numbers {
        let Some((lo, hi)) = info.range() else {
            continue;
        };
        let above = min.get().filter(|&&m| m > hi);
        let below = max.get().filter(|&&m| m < lo);
        if let Some(m) = above.or(below) {
            let span = if above.is_some() {
                min.span()
            } else {
                max.span()
            };
            r.error_help(
                &span.unwrap_or(t.span.clone()),
                format!(
                    "{} can never permit a value for \"{name}\": {m} is outside what the tag can hold ({} .. {})",
                    t.name,
                    info.show(lo),
                    info.show(hi)
                ),
                Some("correct min/max to the tag's engineering units"),
            );
        }
    }
    let unbounded = matches!(min, Field::Absent)
        && matches!(max, Field::Absent)
        && matches!(allowed, Field::Absent);
    if unbounded && !numbers.is_empty() {
        let names: Vec<&str> = numbers.iter().map(|(n, _)| *n).collect();
        w.error_help(
            &t.span,
            format!("{} permits any value for {}", t.name, list_tags(&names)),
            Some("add min and max (engineering units), or allowed = [...]"),
        );
    }
}

fn list_tags(names: &[&str]) -> String {
    match names {
        [one] => format!("tag \"{one}\" is"),
        many => format!(
            "tags {} are",
            many.iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_name_a_count_and_a_period() {
        assert_eq!(
            parse_rate("6/min").map(|r| (r.count, r.window_ms)),
            Some((6, 60_000))
        );
        assert_eq!(parse_rate("20/h").map(|r| r.window_ms), Some(3_600_000));
        assert_eq!(parse_rate("1/10s").map(|r| r.window_ms), Some(10_000));
        assert!(parse_rate("0/min").is_none());
        assert!(parse_rate("6 per minute").is_none());
        assert!(parse_rate("6/fortnight").is_none());
    }

    #[test]
    fn days_accept_ranges_lists_and_wrap_around() {
        assert_eq!(
            parse_days("mon-fri"),
            Ok([true, true, true, true, true, false, false])
        );
        assert_eq!(
            parse_days("sat,sun"),
            Ok([false, false, false, false, false, true, true])
        );
        assert_eq!(
            parse_days("fri-mon"),
            Ok([true, false, false, false, true, true, true])
        );
        assert_eq!(
            parse_days("Monday"),
            Ok([true, false, false, false, false, false, false])
        );
        assert!(parse_days("mon-fir").is_err());
    }
}
