//! What the policy decides about: a command, already authenticated, and the
//! current values of the plant.

use std::collections::{BTreeMap, HashMap};

use twin_model::{Quality, Value};

/// A write request from an authenticated operator, as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The command id (the token's `jti`); carried into the permit.
    pub id: String,
    /// The tag to write.
    pub tag: String,
    /// The value to write, in engineering units.
    pub value: Value,
    /// The requester: the token's `sub`.
    pub operator: String,
    /// Values of the token's roles claim.
    pub roles: Vec<String>,
    /// The token's `amr` (authentication methods).
    pub amr: Vec<String>,
    /// Verified approvals of this command by other operators.
    pub approvers: Vec<Approver>,
    /// When the command was issued, in milliseconds since the Unix epoch (UTC).
    pub at_ms: u64,
}

/// One verified approval: who approved, and the roles claim of their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    pub subject: String,
    pub roles: Vec<String>,
}

impl Approver {
    /// An approver known by subject only (their roles come from the
    /// policy's `subjects` lists).
    pub fn subject(subject: impl Into<String>) -> Self {
        Approver {
            subject: subject.into(),
            roles: Vec::new(),
        }
    }
}

/// The current value of a tag and how far it can be trusted.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentValue {
    /// `None` when the last read gave no value.
    pub value: Option<Value>,
    pub quality: Quality,
}

impl CurrentValue {
    /// A value read with good quality.
    pub fn good(value: Value) -> Self {
        CurrentValue {
            value: Some(value),
            quality: Quality::Good,
        }
    }

    /// The value, only when its quality is good.
    pub fn good_value(&self) -> Option<&Value> {
        self.value
            .as_ref()
            .filter(|_| self.quality == Quality::Good)
    }
}

/// Where the engine looks up current values (for step limits and
/// interlocks): the latest sample of each tag.
pub trait CurrentValues {
    /// The current value of `tag`, or `None` when it was never read.
    fn current(&self, tag: &str) -> Option<CurrentValue>;
}

impl CurrentValues for HashMap<String, CurrentValue> {
    fn current(&self, tag: &str) -> Option<CurrentValue> {
        self.get(tag).cloned()
    }
}

impl CurrentValues for BTreeMap<String, CurrentValue> {
    fn current(&self, tag: &str) -> Option<CurrentValue> {
        self.get(tag).cloned()
    }
}

/// No current values at all.
impl CurrentValues for () {
    fn current(&self, _tag: &str) -> Option<CurrentValue> {
        None
    }
}
