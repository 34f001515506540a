//! The decision: [`Engine::decide`] turns a [`Command`] into a
//! [`Decision`], either a [`WritePermit`] (which only this module can make)
//! or a [`Denial`] with a stable code, the rule it concerns and a reason in
//! words an OT engineer understands.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::Path;

use twin_model::Value;

use super::command::{Command, CurrentValues};
use super::load::{read_files, DirError, Policy, Warning};
use super::model::{close, InterlockTest, Mode, Place, Rule, TagInfo};
use crate::config::{Config, ConfigErrors};

/// Authentication methods (`amr`, RFC 8176) that show a second factor.
pub const MFA_METHODS: &[&str] = &["mfa", "otp", "hwk", "swk"];

/// Why a command was denied. [`DenyCode::code`] is stable: audit records
/// and the cloud may rely on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenyCode {
    /// No policy is loaded (missing or unreadable folder, no policy file).
    NoPolicy,
    /// The policy files have errors.
    InvalidPolicy,
    /// The tag is not in the device configuration.
    UnknownTag,
    /// The tag is not writable in the device configuration.
    ReadOnlyTag,
    /// The value cannot be written to the tag (wrong kind, out of the
    /// register's range, finer than its resolution).
    InvalidValue,
    /// No rule names the tag: default deny.
    NoRule,
    /// Rules name the tag, but the operator holds none of their roles.
    Role,
    /// The value is outside the rule's min/max.
    OutOfBounds,
    /// The value is not in the rule's allowed list.
    NotAllowedValue,
    /// The change from the current value exceeds the rule's max_step.
    StepTooLarge,
    /// A step limit needs the tag's current value, which is missing or not good.
    NoCurrentValue,
    /// The rule's rate limit is used up.
    RateLimited,
    /// Outside every time window of the rule.
    OutsideWindow,
    /// An interlock on another tag does not hold.
    Interlock,
    /// The rule needs a second factor the token does not show.
    MfaRequired,
    /// Fewer approvals than the rule needs.
    TooFewApprovals,
    /// An operator approved twice, or the requester approved their own command.
    DuplicateApprover,
    /// The policy is in audit mode: nothing is permitted.
    AuditMode,
}

impl DenyCode {
    /// Every code, in evaluation order.
    pub const ALL: [DenyCode; 18] = [
        DenyCode::NoPolicy,
        DenyCode::InvalidPolicy,
        DenyCode::UnknownTag,
        DenyCode::ReadOnlyTag,
        DenyCode::InvalidValue,
        DenyCode::NoRule,
        DenyCode::Role,
        DenyCode::OutOfBounds,
        DenyCode::NotAllowedValue,
        DenyCode::StepTooLarge,
        DenyCode::NoCurrentValue,
        DenyCode::RateLimited,
        DenyCode::OutsideWindow,
        DenyCode::Interlock,
        DenyCode::MfaRequired,
        DenyCode::TooFewApprovals,
        DenyCode::DuplicateApprover,
        DenyCode::AuditMode,
    ];

    /// The stable code string.
    pub fn code(self) -> &'static str {
        match self {
            DenyCode::NoPolicy => "no_policy",
            DenyCode::InvalidPolicy => "invalid_policy",
            DenyCode::UnknownTag => "unknown_tag",
            DenyCode::ReadOnlyTag => "read_only_tag",
            DenyCode::InvalidValue => "invalid_value",
            DenyCode::NoRule => "no_rule",
            DenyCode::Role => "role",
            DenyCode::OutOfBounds => "out_of_bounds",
            DenyCode::NotAllowedValue => "not_allowed_value",
            DenyCode::StepTooLarge => "step_too_large",
            DenyCode::NoCurrentValue => "no_current_value",
            DenyCode::RateLimited => "rate_limited",
            DenyCode::OutsideWindow => "outside_window",
            DenyCode::Interlock => "interlock",
            DenyCode::MfaRequired => "mfa_required",
            DenyCode::TooFewApprovals => "too_few_approvals",
            DenyCode::DuplicateApprover => "duplicate_approver",
            DenyCode::AuditMode => "audit_mode",
        }
    }

    /// The code named by a code string.
    pub fn from_code(s: &str) -> Option<DenyCode> {
        DenyCode::ALL.into_iter().find(|c| c.code() == s)
    }
}

impl fmt::Display for DenyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused command.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub code: DenyCode,
    /// The rule the denial concerns: the closest rule for the tag, or the
    /// rule a policy in audit mode would have used.
    pub rule: Option<String>,
    /// Why, in words.
    pub reason: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(r) => write!(f, "deny:{} (rule \"{r}\"): {}", self.code, self.reason),
            None => write!(f, "deny:{}: {}", self.code, self.reason),
        }
    }
}

/// The right to write one value to one tag, once.
///
/// Only [`Engine::decide`] creates one, and it is neither `Clone` nor
/// constructible elsewhere: a device write that takes a `WritePermit` by
/// value can only follow a permit.
#[derive(Debug)]
#[must_use = "a permit is the only way to write to a device"]
pub struct WritePermit {
    tag: String,
    value: Value,
    command_id: String,
    rule: String,
}

impl WritePermit {
    pub fn tag(&self) -> &str {
        &self.tag
    }
    pub fn value(&self) -> &Value {
        &self.value
    }
    pub fn command_id(&self) -> &str {
        &self.command_id
    }
    /// The rule that permitted the write.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

/// The answer to a command.
#[derive(Debug)]
#[must_use]
pub enum Decision {
    Permit(WritePermit),
    Deny(Denial),
}

impl Decision {
    /// What was decided, without the permit itself (for audit records,
    /// reports and comparisons).
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Permit(p) => Outcome::Permit {
                rule: p.rule.clone(),
            },
            Decision::Deny(d) => Outcome::Deny(d.clone()),
        }
    }
}

/// A decision as data: which rule permitted, or the denial.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Permit { rule: String },
    Deny(Denial),
}

impl Outcome {
    /// `permit` or `deny:<code>`, as the test files write it.
    pub fn short(&self) -> String {
        match self {
            Outcome::Permit { .. } => "permit".into(),
            Outcome::Deny(d) => format!("deny:{}", d.code),
        }
    }

    /// The rule that permitted, or that the denial names.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Outcome::Permit { rule } => Some(rule),
            Outcome::Deny(d) => d.rule.as_deref(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Permit { rule } => write!(f, "permit (rule \"{rule}\")"),
            Outcome::Deny(d) => d.fmt(f),
        }
    }
}

/// Where the enforced policy and a candidate decide differently.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// What the engine decides (without counting it).
    pub enforced: Outcome,
    /// What the candidate would decide if it were enforced.
    pub candidate: Outcome,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "enforced: {}; candidate: {}",
            self.enforced, self.candidate
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    Tag(String),
    Operator(String),
}

/// The permits each rate-limited rule gave, per tag and per operator,
/// within its window. Keyed by rule id, so a candidate policy in shadow
/// mode sees the permits of the enforced rule with the same id.
#[derive(Debug, Default)]
struct RateState {
    permits: HashMap<(String, Scope), VecDeque<u64>>,
}

impl RateState {
    fn used(&self, rule: &str, scope: Scope, window_ms: u64, at_ms: u64) -> usize {
        self.permits.get(&(rule.to_string(), scope)).map_or(0, |q| {
            q.iter()
                .filter(|&&t| t.saturating_add(window_ms) > at_ms)
                .count()
        })
    }

    fn record(&mut self, rule: &Rule, cmd: &Command) {
        let limits = [
            (&rule.rate_per_tag, Scope::Tag(cmd.tag.clone())),
            (
                &rule.rate_per_operator,
                Scope::Operator(cmd.operator.clone()),
            ),
        ];
        for (rate, scope) in limits {
            let Some(rate) = rate else { continue };
            let q = self.permits.entry((rule.id.clone(), scope)).or_default();
            q.push_back(cmd.at_ms);
            // At most `count` permits fall in a window, so the queue stays
            // that short.
            q.retain(|&t| t.saturating_add(rate.window_ms) > cmd.at_ms);
        }
    }
}

enum State {
    NoPolicy(String),
    Invalid(String),
    Ready(Policy),
}

/// The policy in force and the rate-limit state: one per gateway.
pub struct Engine {
    state: State,
    rates: RateState,
}

impl Engine {
    /// An engine enforcing (or auditing) `policy`.
    pub fn new(policy: Policy) -> Engine {
        Engine {
            state: State::Ready(policy),
            rates: RateState::default(),
        }
    }

    /// An engine without a policy: denies everything with `no_policy`.
    pub fn without_policy(why: impl Into<String>) -> Engine {
        Engine {
            state: State::NoPolicy(why.into()),
            rates: RateState::default(),
        }
    }

    /// An engine for a policy with errors: denies everything with
    /// `invalid_policy`.
    pub fn with_invalid_policy(errors: &ConfigErrors) -> Engine {
        let first = errors
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let more = errors.errors.len().saturating_sub(1);
        let why = if more > 0 {
            format!("{first} (and {more} more error(s))")
        } else {
            first
        };
        Engine {
            state: State::Invalid(why),
            rates: RateState::default(),
        }
    }

    /// Loads the policy folder: the engine (which denies everything when
    /// the folder is missing or the policy invalid) and the warnings, or
    /// every error found.
    pub fn load(dir: &Path, config: &Config) -> (Engine, Result<Vec<Warning>, ConfigErrors>) {
        let files = match read_files(dir, false) {
            Ok(files) => files,
            Err(DirError::NoPolicy(e)) => {
                let why = e.errors.first().map(|e| e.to_string()).unwrap_or_default();
                return (Engine::without_policy(why), Err(e));
            }
            Err(DirError::Invalid(e)) => return (Engine::with_invalid_policy(&e), Err(e)),
        };
        match Policy::parse(&files, config) {
            Ok((policy, warnings)) => (Engine::new(policy), Ok(warnings)),
            Err(e) => (Engine::with_invalid_policy(&e), Err(e)),
        }
    }

    /// Takes the policy state of `next` (a reload), keeping the rate-limit
    /// history, so a reload never resets a rate limit.
    pub fn replace(&mut self, next: Engine) {
        self.state = next.state;
    }

    /// The policy in force, if one is loaded.
    pub fn policy(&self) -> Option<&Policy> {
        match &self.state {
            State::Ready(p) => Some(p),
            _ => None,
        }
    }

    /// Decides a command; a permit counts towards the rate limits of the
    /// rule that gave it.
    pub fn decide(&mut self, cmd: &Command, current: &impl CurrentValues) -> Decision {
        let policy = match &self.state {
            State::Ready(p) => p,
            other => return Decision::Deny(unloaded(other)),
        };
        let ev = evaluate(policy, cmd, current, &self.rates);
        if let Some(i) = ev.permit {
            self.rates.record(&policy.rules[i], cmd);
        }
        match with_mode(policy.mode, ev.outcome) {
            Outcome::Permit { rule } => Decision::Permit(WritePermit {
                tag: cmd.tag.clone(),
                value: cmd.value.clone(),
                command_id: cmd.id.clone(),
                rule,
            }),
            Outcome::Deny(d) => Decision::Deny(d),
        }
    }

    /// What [`Engine::decide`] would answer now and why, rule by rule,
    /// without counting it.
    pub fn explain(&self, cmd: &Command, current: &impl CurrentValues) -> Explanation {
        match &self.state {
            State::Ready(p) => explain(p, cmd, current, &self.rates),
            other => Explanation {
                command: cmd.clone(),
                value: cmd.value.to_string(),
                outcome: Outcome::Deny(unloaded(other)),
                mode: None,
                rules: Vec::new(),
                earlier_permits: true,
            },
        }
    }

    /// Evaluates `candidate` beside the policy in force (as if the
    /// candidate were enforced, seeing the permits the engine has counted)
    /// and reports when they decide differently: permit against deny, or
    /// two different deny codes. Changes no state.
    pub fn shadow(
        &self,
        candidate: &Policy,
        cmd: &Command,
        current: &impl CurrentValues,
    ) -> Option<Difference> {
        let enforced = match &self.state {
            State::Ready(p) => with_mode(p.mode, evaluate(p, cmd, current, &self.rates).outcome),
            other => Outcome::Deny(unloaded(other)),
        };
        let candidate = evaluate(candidate, cmd, current, &self.rates).outcome;
        let same = match (&enforced, &candidate) {
            (Outcome::Permit { .. }, Outcome::Permit { .. }) => true,
            (Outcome::Deny(a), Outcome::Deny(b)) => a.code == b.code,
            _ => false,
        };
        (!same).then_some(Difference {
            enforced,
            candidate,
        })
    }
}

fn unloaded(state: &State) -> Denial {
    match state {
        State::NoPolicy(why) => Denial {
            code: DenyCode::NoPolicy,
            rule: None,
            reason: format!("no policy is loaded, so every command is denied ({why})"),
        },
        State::Invalid(why) => Denial {
            code: DenyCode::InvalidPolicy,
            rule: None,
            reason: format!("the policy has errors, so every command is denied ({why})"),
        },
        State::Ready(_) => Denial {
            code: DenyCode::InvalidPolicy,
            rule: None,
            reason: "internal: policy state".into(),
        },
    }
}

/// An enforced outcome as the policy's mode reports it.
fn with_mode(mode: Mode, outcome: Outcome) -> Outcome {
    match (mode, outcome) {
        (Mode::Enforce, o) => o,
        (Mode::Audit, Outcome::Permit { rule }) => Outcome::Deny(Denial {
            code: DenyCode::AuditMode,
            reason: format!("audit mode: would permit by rule \"{rule}\""),
            rule: Some(rule),
        }),
        (Mode::Audit, Outcome::Deny(d)) => Outcome::Deny(Denial {
            code: DenyCode::AuditMode,
            reason: format!("audit mode: would deny ({}): {}", d.code, d.reason),
            rule: d.rule,
        }),
    }
}

/// One condition of one rule, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked: `role`, `value`, `step`, `window`, `interlocks`,
    /// `mfa`, `approvals`, `rate`.
    pub name: &'static str,
    /// `None` when the condition holds.
    pub failed: Option<DenyCode>,
    pub text: String,
}

/// Every condition of one rule that names the tag, in evaluation order.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleTrace {
    pub rule: String,
    pub place: Place,
    pub description: Option<String>,
    pub checks: Vec<Check>,
}

impl RuleTrace {
    /// How many conditions hold before the first that fails.
    fn progress(&self) -> usize {
        self.checks
            .iter()
            .position(|c| c.failed.is_some())
            .unwrap_or(self.checks.len())
    }
}

struct Evaluation {
    outcome: Outcome,
    /// The index of the permitting rule.
    permit: Option<usize>,
    rules: Vec<RuleTrace>,
}

fn deny(code: DenyCode, rule: Option<&str>, reason: String) -> Outcome {
    Outcome::Deny(Denial {
        code,
        rule: rule.map(String::from),
        reason,
    })
}

/// The decision of an enforced policy, with every rule's trace.
fn evaluate(
    policy: &Policy,
    cmd: &Command,
    current: &impl CurrentValues,
    rates: &RateState,
) -> Evaluation {
    let early = |outcome| Evaluation {
        outcome,
        permit: None,
        rules: Vec::new(),
    };
    let tag = &cmd.tag;
    let Some(info) = policy.tags.get(tag) else {
        return early(deny(
            DenyCode::UnknownTag,
            None,
            format!("tag \"{tag}\" is not in the device configuration"),
        ));
    };
    if !info.writable {
        return early(deny(
            DenyCode::ReadOnlyTag,
            None,
            format!(
                "tag \"{tag}\" is read-only: the device configuration does not mark it writable"
            ),
        ));
    }
    if let Some(why) = info.reject(&cmd.value) {
        return early(deny(
            DenyCode::InvalidValue,
            None,
            format!("{why} (tag \"{tag}\")"),
        ));
    }
    let candidates: Vec<usize> = (0..policy.rules.len())
        .filter(|&i| policy.rules[i].tags.contains(tag))
        .collect();
    if candidates.is_empty() {
        return early(deny(
            DenyCode::NoRule,
            None,
            format!("no rule permits writing \"{tag}\"; what the policy does not permit is denied"),
        ));
    }
    let traces: Vec<RuleTrace> = candidates
        .iter()
        .map(|&i| trace(policy, &policy.rules[i], info, cmd, current, rates))
        .collect();
    if let Some(k) = traces.iter().position(|t| t.progress() == t.checks.len()) {
        let rule = &policy.rules[candidates[k]];
        return Evaluation {
            outcome: Outcome::Permit {
                rule: rule.id.clone(),
            },
            permit: Some(candidates[k]),
            rules: traces,
        };
    }
    // The closest rule: the one that got furthest; the first of equals.
    let mut best = 0;
    for (k, t) in traces.iter().enumerate() {
        if t.progress() > traces[best].progress() {
            best = k;
        }
    }
    let t = &traces[best];
    let failed = &t.checks[t.progress()];
    let outcome = deny(
        failed.failed.unwrap_or(DenyCode::NoRule),
        Some(&t.rule),
        failed.text.clone(),
    );
    Evaluation {
        outcome,
        permit: None,
        rules: traces,
    }
}

type CheckResult = Result<String, (DenyCode, String)>;

fn trace(
    policy: &Policy,
    rule: &Rule,
    info: &TagInfo,
    cmd: &Command,
    current: &impl CurrentValues,
    rates: &RateState,
) -> RuleTrace {
    let results: [(&'static str, CheckResult); 8] = [
        ("role", role(policy, rule, cmd)),
        ("value", value(rule, info, cmd)),
        ("step", step(rule, info, cmd, current)),
        ("window", window(rule, cmd)),
        ("interlocks", interlocks(rule, current)),
        ("mfa", mfa(rule, cmd)),
        ("approvals", approvals(policy, rule, cmd)),
        ("rate", rate(rule, cmd, rates)),
    ];
    RuleTrace {
        rule: rule.id.clone(),
        place: rule.place.clone(),
        description: rule.description.clone(),
        checks: results
            .into_iter()
            .map(|(name, r)| match r {
                Ok(text) => Check {
                    name,
                    failed: None,
                    text,
                },
                Err((code, text)) => Check {
                    name,
                    failed: Some(code),
                    text,
                },
            })
            .collect(),
    }
}

fn role(policy: &Policy, rule: &Rule, cmd: &Command) -> CheckResult {
    let held: Vec<&str> = policy
        .roles
        .iter()
        .filter(|r| rule.roles.contains(&r.name) && r.held_by(&cmd.operator, &cmd.roles))
        .map(|r| r.name.as_str())
        .collect();
    if held.is_empty() {
        Err((
            DenyCode::Role,
            format!(
                "{} holds none of the roles of rule \"{}\" ({})",
                cmd.operator,
                rule.id,
                rule.roles.join(", ")
            ),
        ))
    } else {
        Ok(format!("{} holds role {}", cmd.operator, held.join(", ")))
    }
}

fn value(rule: &Rule, info: &TagInfo, cmd: &Command) -> CheckResult {
    let v = &cmd.value;
    let shown = info.show(v);
    if let Some(allowed) = &rule.allowed {
        let list: Vec<String> = allowed.iter().map(|l| l.to_string()).collect();
        // A 0/1 written to an on/off tag is the same as false/true.
        let as_bool = match v {
            Value::Int(n) if matches!(info.kind, super::model::TagKind::Bool) => {
                Some(Value::Bool(*n == 1))
            }
            Value::UInt(n) if matches!(info.kind, super::model::TagKind::Bool) => {
                Some(Value::Bool(*n == 1))
            }
            _ => None,
        };
        let v = as_bool.as_ref().unwrap_or(v);
        return if allowed.iter().any(|l| l.matches(v)) {
            Ok(format!(
                "{shown} is one of the allowed values {}",
                list.join(", ")
            ))
        } else {
            Err((
                DenyCode::NotAllowedValue,
                format!(
                    "{shown} is not one of the allowed values {}",
                    list.join(", ")
                ),
            ))
        };
    }
    let x = v.as_f64().unwrap_or(f64::NAN);
    // NaN compares as neither: it is out of every bound.
    use std::cmp::Ordering::{Equal, Greater, Less};
    if let Some(lo) = rule
        .min
        .filter(|&lo| !matches!(x.partial_cmp(&lo), Some(Greater | Equal)))
    {
        return Err((
            DenyCode::OutOfBounds,
            format!("{shown} is below the minimum {}", info.show(lo)),
        ));
    }
    if let Some(hi) = rule
        .max
        .filter(|&hi| !matches!(x.partial_cmp(&hi), Some(Less | Equal)))
    {
        return Err((
            DenyCode::OutOfBounds,
            format!("{shown} is above the maximum {}", info.show(hi)),
        ));
    }
    Ok(match (rule.min, rule.max) {
        (Some(lo), Some(hi)) => format!("{shown} is within {lo} .. {}", info.show(hi)),
        (Some(lo), None) => format!("{shown} is at least {}", info.show(lo)),
        (None, Some(hi)) => format!("{shown} is at most {}", info.show(hi)),
        (None, None) => format!("{shown}: the rule sets no bounds"),
    })
}

fn step(rule: &Rule, info: &TagInfo, cmd: &Command, current: &impl CurrentValues) -> CheckResult {
    let Some(max_step) = rule.max_step else {
        return Ok("no step limit".into());
    };
    let cur = current.current(&cmd.tag);
    let Some(now) = cur
        .as_ref()
        .and_then(|c| c.good_value())
        .and_then(Value::as_f64)
    else {
        let why = match &cur {
            None => "is unknown".to_string(),
            Some(c) => format!("has {} quality", c.quality.as_str()),
        };
        return Err((
            DenyCode::NoCurrentValue,
            format!(
                "the current value of \"{}\" {why}, so the step limit of {} cannot be checked",
                cmd.tag,
                info.show(max_step)
            ),
        ));
    };
    let new = cmd.value.as_f64().unwrap_or(f64::NAN);
    let change = (new - now).abs();
    if change <= max_step || close(change, max_step) {
        Ok(format!(
            "the change from {} is {}, within the step limit {}",
            info.show(now),
            info.show(round(change)),
            info.show(max_step)
        ))
    } else {
        Err((
            DenyCode::StepTooLarge,
            format!(
                "the change from {} to {} is {}, more than the step limit {}",
                info.show(now),
                info.show(new),
                info.show(round(change)),
                info.show(max_step)
            ),
        ))
    }
}

/// Rounds away float noise for messages.
fn round(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}

fn window(rule: &Rule, cmd: &Command) -> CheckResult {
    if rule.windows.is_empty() {
        return Ok("no time window: any time".into());
    }
    let Ok(ts) = i64::try_from(cmd.at_ms)
        .map_err(|_| ())
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).map_err(|_| ()))
    else {
        return Err((
            DenyCode::OutsideWindow,
            format!("the command time {} ms is out of range", cmd.at_ms),
        ));
    };
    let mut local = None;
    for w in &rule.windows {
        let (inside, at) = w.at(ts);
        if inside {
            return Ok(format!("{at} is inside the window {}", w.text));
        }
        local.get_or_insert(at);
    }
    let texts: Vec<&str> = rule.windows.iter().map(|w| w.text.as_str()).collect();
    Err((
        DenyCode::OutsideWindow,
        format!(
            "{} is outside the time window(s) {}",
            local.unwrap_or_default(),
            texts.join("; ")
        ),
    ))
}

fn interlocks(rule: &Rule, current: &impl CurrentValues) -> CheckResult {
    let mut held = Vec::new();
    for l in &rule.interlocks {
        let cur = current.current(&l.tag);
        let Some(v) = cur.as_ref().and_then(|c| c.good_value()) else {
            let why = match &cur {
                None => "is unknown".to_string(),
                Some(c) => format!("has {} quality", c.quality.as_str()),
            };
            return Err((
                DenyCode::Interlock,
                format!(
                    "interlock \"{l}\" cannot be confirmed: the current value of \"{}\" {why}",
                    l.tag
                ),
            ));
        };
        let holds = match &l.test {
            InterlockTest::Equals(lit) => lit.matches(v),
            InterlockTest::Range { min, max } => v
                .as_f64()
                .is_some_and(|x| min.is_none_or(|lo| x >= lo) && max.is_none_or(|hi| x <= hi)),
        };
        if !holds {
            return Err((
                DenyCode::Interlock,
                format!("interlock \"{l}\" does not hold: \"{}\" is {v}", l.tag),
            ));
        }
        held.push(format!("{l} ({v})"));
    }
    Ok(if held.is_empty() {
        "no interlocks".into()
    } else {
        format!("interlocks hold: {}", held.join(", "))
    })
}

fn mfa(rule: &Rule, cmd: &Command) -> CheckResult {
    if !rule.require_mfa {
        return Ok("no second factor required".into());
    }
    match cmd.amr.iter().find(|m| MFA_METHODS.contains(&m.as_str())) {
        Some(m) => Ok(format!("second factor shown (amr \"{m}\")")),
        None => Err((
            DenyCode::MfaRequired,
            format!(
                "the rule requires a second factor, but the token's authentication methods ({}) show none of {}",
                if cmd.amr.is_empty() { "none".to_string() } else { cmd.amr.join(", ") },
                MFA_METHODS.join(", ")
            ),
        )),
    }
}

fn approvals(policy: &Policy, rule: &Rule, cmd: &Command) -> CheckResult {
    let need = rule.approvals as usize;
    if need == 0 {
        return Ok("no approvals required".into());
    }
    if cmd.approvers.iter().any(|a| a.subject == cmd.operator) {
        return Err((
            DenyCode::DuplicateApprover,
            format!(
                "{} approved their own command; approvals must come from other people",
                cmd.operator
            ),
        ));
    }
    for (i, a) in cmd.approvers.iter().enumerate() {
        if cmd.approvers[..i].iter().any(|b| b.subject == a.subject) {
            return Err((
                DenyCode::DuplicateApprover,
                format!(
                    "{} approved more than once; each person counts once",
                    a.subject
                ),
            ));
        }
    }
    let roles: Vec<_> = policy
        .roles
        .iter()
        .filter(|r| rule.roles.contains(&r.name))
        .collect();
    let (ok, other): (Vec<_>, Vec<_>) = cmd
        .approvers
        .iter()
        .partition(|a| roles.iter().any(|r| r.held_by(&a.subject, &a.roles)));
    let names = |v: &[&super::command::Approver]| {
        v.iter()
            .map(|a| a.subject.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if ok.len() >= need {
        return Ok(format!("approved by {}", names(&ok)));
    }
    let mut reason = format!(
        "the rule needs {need} approval(s) from people holding {}; {} given{}",
        rule.roles.join(", "),
        ok.len(),
        if ok.is_empty() {
            String::new()
        } else {
            format!(" ({})", names(&ok))
        }
    );
    if !other.is_empty() {
        reason.push_str(&format!("; {} hold(s) none of these roles", names(&other)));
    }
    Err((DenyCode::TooFewApprovals, reason))
}

fn rate(rule: &Rule, cmd: &Command, rates: &RateState) -> CheckResult {
    let mut texts = Vec::new();
    let limits = [
        (
            &rule.rate_per_tag,
            Scope::Tag(cmd.tag.clone()),
            format!("tag \"{}\"", cmd.tag),
        ),
        (
            &rule.rate_per_operator,
            Scope::Operator(cmd.operator.clone()),
            cmd.operator.clone(),
        ),
    ];
    for (rate, scope, who) in limits {
        let Some(rate) = rate else { continue };
        let used = rates.used(&rule.id, scope, rate.window_ms, cmd.at_ms);
        if used >= rate.count as usize {
            return Err((
                DenyCode::RateLimited,
                format!(
                    "{who} used all {} permits of rule \"{}\" ({})",
                    rate.count, rule.id, rate.text
                ),
            ));
        }
        texts.push(format!("{who}: {used} of {}", rate.text));
    }
    Ok(if texts.is_empty() {
        "no rate limit".into()
    } else {
        format!("rate limits not reached ({})", texts.join(", "))
    })
}

/// A decision explained: the outcome and, for every rule that names the
/// tag, each condition and whether it holds. Displays as a report for OT
/// engineers (`gateway policy test`, dry runs).
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    pub command: Command,
    /// The value with its unit.
    pub value: String,
    pub outcome: Outcome,
    /// The policy's mode; `None` when no valid policy is loaded.
    pub mode: Option<Mode>,
    pub rules: Vec<RuleTrace>,
    /// Whether rate limits counted earlier permits (false in a dry run,
    /// which starts with none).
    pub earlier_permits: bool,
}

fn explain(
    policy: &Policy,
    cmd: &Command,
    current: &impl CurrentValues,
    rates: &RateState,
) -> Explanation {
    let ev = evaluate(policy, cmd, current, rates);
    let value = match policy.tags.get(&cmd.tag) {
        Some(info) => info.show(&cmd.value),
        None => cmd.value.to_string(),
    };
    Explanation {
        command: cmd.clone(),
        value,
        outcome: with_mode(policy.mode, ev.outcome),
        mode: Some(policy.mode),
        rules: ev.rules,
        earlier_permits: true,
    }
}

/// Explains what `policy` decides for `cmd`, starting with no earlier
/// permits (so no rate limit is reached). For `gateway policy test` and
/// dry runs: `println!("{}", dry_run(&policy, &cmd, &current))`.
pub fn dry_run(policy: &Policy, cmd: &Command, current: &impl CurrentValues) -> Explanation {
    let mut e = explain(policy, cmd, current, &RateState::default());
    e.earlier_permits = false;
    e
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.command;
        let at = i64::try_from(c.at_ms)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .map_or_else(|| format!("{} ms", c.at_ms), |t| t.to_string());
        writeln!(
            f,
            "command \"{}\": set \"{}\" to {}, requested by {} at {at}",
            c.id, c.tag, self.value, c.operator
        )?;
        match &self.outcome {
            Outcome::Permit { rule } => {
                let place = self
                    .rules
                    .iter()
                    .find(|t| &t.rule == rule)
                    .map(|t| format!(" ({})", t.place));
                writeln!(
                    f,
                    "decision: PERMIT by rule \"{rule}\"{}",
                    place.unwrap_or_default()
                )?;
            }
            Outcome::Deny(d) => {
                writeln!(f, "decision: DENY ({})", d.code)?;
                if let Some(r) = &d.rule {
                    let place = self
                        .rules
                        .iter()
                        .find(|t| &t.rule == r)
                        .map(|t| format!(" ({})", t.place));
                    writeln!(f, "  closest rule: \"{r}\"{}", place.unwrap_or_default())?;
                }
                writeln!(f, "  because: {}", d.reason)?;
            }
        }
        if self.rules.is_empty() {
            return Ok(());
        }
        writeln!(f, "rules for \"{}\", in the order they are tried:", c.tag)?;
        for t in &self.rules {
            let verdict = if t.progress() == t.checks.len() {
                "all conditions hold"
            } else {
                "does not permit"
            };
            writeln!(f, "  rule \"{}\" ({}): {verdict}", t.rule, t.place)?;
            if let Some(d) = &t.description {
                writeln!(f, "    {d}")?;
            }
            for check in &t.checks {
                let mark = if check.failed.is_some() {
                    "FAIL"
                } else {
                    "ok  "
                };
                writeln!(f, "    {mark} {:<10} {}", check.name, check.text)?;
            }
        }
        if !self.earlier_permits {
            writeln!(f, "(dry run: rate limits start with no earlier permits)")?;
        }
        Ok(())
    }
}
