//! The command policy: which operator may write which tag, to which
//! values, when, and under which conditions. Default deny.
//!
//! A policy is every `*.toml` file of a folder except `*.tests.toml`,
//! written by OT engineers (`policies/README.md` documents the language;
//! `policies/tank1.toml` is an example). [`Policy::load_dir`] checks it
//! against the device configuration and reports every error and warning at
//! once with file:line:col, using the configuration loader's
//! [`ConfigError`](crate::config::ConfigError).
//!
//! [`Engine::decide`] turns an authenticated [`Command`] into a
//! [`Decision`]: a [`WritePermit`], which nothing outside this module can
//! make (so a device write that takes one by value can only follow a
//! permit), or a [`Denial`] with a stable [`DenyCode`], the rule it concerns
//! and a reason in words.
//!
//! # Evaluation order
//! 1. policy state: no policy loaded -> `no_policy`; policy with errors ->
//!    `invalid_policy`;
//! 2. the tag: not in the device configuration -> `unknown_tag`; not
//!    `writable` there -> `read_only_tag` (whatever the policy says); the
//!    value cannot be written to it (wrong kind, outside the register's
//!    range, finer than its resolution) -> `invalid_value`;
//! 3. the rules that name the tag, in file-name order and then file order;
//!    none -> `no_rule` (default deny);
//! 4. for each such rule, its conditions in this order: role (`role`),
//!    value (`out_of_bounds`, `not_allowed_value`), step from the current
//!    value (`no_current_value`, `step_too_large`), time windows
//!    (`outside_window`), interlocks on current values (`interlock`),
//!    second factor (`mfa_required`), approvals (`duplicate_approver`,
//!    `too_few_approvals`), rate limits (`rate_limited`);
//! 5. the first rule whose conditions all hold permits, and the permit is
//!    counted towards that rule's rate limits (only permits count);
//! 6. when none permits, the denial is that of the closest rule, the one
//!    whose conditions held longest in the order above (the first of
//!    equals), with the first condition it failed;
//! 7. a policy in `audit` mode decides as if enforced, then denies with
//!    `audit_mode`, the would-be decision in the reason.
//!
//! # Modules
//! - [`model`]: the checked policy (roles, rules, windows, interlocks).
//! - `load`: policy files -> [`Policy`], with every check.
//! - `command`: [`Command`], [`CurrentValues`].
//! - `decide`: [`Engine`], [`Decision`], [`dry_run`], shadow comparison.
//! - `cases`: test cases next to the policy (`*.tests.toml`), [`run_tests`].

pub mod model;

mod cases;
mod command;
mod decide;
pub(crate) mod load;
#[cfg(test)]
mod tests;

pub use cases::{
    parse_cases, run_cases, run_tests, Assume, CaseResult, Expect, TestCase, TestReport,
};
pub use command::{Approver, Command, CurrentValue, CurrentValues};
pub use decide::{
    dry_run, Check, Decision, Denial, DenyCode, Difference, Engine, Explanation, Outcome,
    RuleTrace, WritePermit, MFA_METHODS,
};
pub use load::{Policy, Warning};
pub use model::{Mode, Place};
