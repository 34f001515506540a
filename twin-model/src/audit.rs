//! The tamper-evident audit log: record types, the hash chain and the verifier.
//!
//! This module does no I/O. The gateway writes the lines it builds here to a
//! file and to the audit topic; an auditor feeds the lines back to
//! [`Verifier`] (or [`verify_bytes`] / [`verify_lines`]).
//!
//! # File format
//! UTF-8 text, one record per line, each line terminated by `\n`. A record is
//! one compact JSON object whose fields appear in this order:
//!
//! ```text
//! {"v":1,"n":<index>,"ts_ms":<ms>,"prev":"<hash>","kind":"<kind>","event":{...}}
//! ```
//!
//! - `v`: format version, [`AUDIT_VERSION`].
//! - `n`: the record index: 1 for the first record of the file, then +1 per line.
//! - `ts_ms`: when the record was written, ms since the Unix epoch (UTC). Not
//!   checked for order (wall clocks step backwards).
//! - `prev`: base64url (no padding) of the SHA-256 of the previous line's
//!   exact bytes, without its `\n`; for the first record, 43 `A`s (32 zero
//!   bytes, [`GENESIS_PREV`]).
//! - `kind` and `event`: one of the [`Kind`]s and its event object
//!   ([`Event`]); a `command_decision` keeps the original signed command
//!   token verbatim.
//!
//! A `checkpoint` record's event is `{"jws":"<compact JWS>"}`: an EdDSA JWS
//! with `typ` [`CHECKPOINT_TYP`], signed by the gateway's key, whose payload
//! is `{"n":<index of the checkpoint record>,"head":"<its prev>","gateway_id":"..."}`
//! ([`CheckpointClaims`]). A checkpoint therefore signs every record before it.
//!
//! A log that was closed in order ends with a `stopped` record followed by a
//! checkpoint.
//!
//! # Invariants a verifier checks, line by line
//! 1. Every line is complete (ends in `\n`), at most [`MAX_LINE_BYTES`] long,
//!    and a strict parse of one record (unknown fields, unknown kinds and a
//!    `v` other than 1 are refused): else `bad_json` (`truncated` for an
//!    incomplete last line).
//! 2. `n` of line *k* is *k*: else `bad_index` (a record deleted, inserted or
//!    moved).
//! 3. `prev` of line *k* is the hash of line *k − 1*: else `bad_prev` (line
//!    *k − 1* was edited, or lines were reordered).
//! 4. Every checkpoint verifies with a trusted key, names its own index, signs
//!    the same `head` as its `prev`, and names the same gateway as the other
//!    checkpoints of the file: else `bad_checkpoint`.
//!
//! Records after the last checkpoint are protected by the chain only: removing
//! whole lines from the end cannot be told from a log that simply stopped
//! there. The report counts them as an unverified tail; a verifier given the
//! latest checkpoint published on the audit topic
//! ([`Verifier::with_published_checkpoint`]) reports such a cut as
//! `truncated`.

use crate::jws::{b64url, b64url_decode, sha256, JwsError, SigningKey, TrustStore};
use crate::sample::Value;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

/// Format version carried in every record as `"v"`.
pub const AUDIT_VERSION: u32 = 1;

/// JWS `typ` of a checkpoint signature.
pub const CHECKPOINT_TYP: &str = "twin-audit-checkpoint+jws";

/// Longest line (without its `\n`) a writer produces or a verifier reads.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// `prev` of the first record: base64url of 32 zero bytes (43 `A`s).
pub const GENESIS_PREV: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// The hash of "no previous line".
pub const GENESIS: [u8; 32] = [0u8; 32];

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    CommandDecision,
    PolicyLoaded,
    PolicyRejected,
    AuthFailure,
    ConfigChanged,
    Checkpoint,
    Started,
    Stopped,
    CommandOutcome,
    CommandsDropped,
    ShadowDifference,
    DeviceSecurity,
    Alert,
}

impl Kind {
    /// The name written in `"kind"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CommandDecision => "command_decision",
            Kind::PolicyLoaded => "policy_loaded",
            Kind::PolicyRejected => "policy_rejected",
            Kind::AuthFailure => "auth_failure",
            Kind::ConfigChanged => "config_changed",
            Kind::Checkpoint => "checkpoint",
            Kind::Started => "started",
            Kind::Stopped => "stopped",
            Kind::CommandOutcome => "command_outcome",
            Kind::CommandsDropped => "commands_dropped",
            Kind::ShadowDifference => "shadow_difference",
            Kind::DeviceSecurity => "device_security",
            Kind::Alert => "alert",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the policy decided about a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Permit,
    Deny,
}

/// `command_decision`: an authenticated command and what was decided.
/// Written (and synced) before the gateway acts on the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandDecision {
    /// The command id (the token's `jti`).
    pub command_id: String,
    /// The requester (the token's `sub`).
    pub operator: String,
    pub tag: String,
    pub value: Value,
    pub decision: Decision,
    /// The stable denial code; `None` when permitted.
    pub reason_code: Option<String>,
    /// The decision explained in words.
    pub reason: String,
    /// The policy rule that permitted, or that the denial names.
    pub rule_id: Option<String>,
    /// The signed command token exactly as received.
    pub token: String,
    /// Signed approval tokens exactly as received (N-person approval).
    pub approval_tokens: Vec<String>,
}

/// `command_outcome`: what became of a permitted command, after acting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandOutcome {
    pub command_id: String,
    pub tag: String,
    /// `applied` or `failed`.
    pub status: String,
    /// Stable failure code (`None` when applied), e.g. `readback_mismatch`.
    pub code: Option<String>,
    pub reason: String,
    /// The value read back after the write.
    pub readback: Option<Value>,
    /// Index of the `command_decision` record this outcome follows.
    pub decision_n: u64,
}

/// `commands_dropped`: command messages refused in bulk, without being
/// read, by the global rate limit or a full queue (a flood is summarised,
/// not written record by record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsDropped {
    /// `rate_limited` or `queue_full`.
    pub code: String,
    pub count: u64,
    /// When the first and last of them arrived, ms since the Unix epoch.
    pub first_ms: u64,
    pub last_ms: u64,
}

/// `shadow_difference`: the candidate policy (shadow mode) would have
/// decided a command differently from the policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowDifference {
    pub command_id: String,
    pub tag: String,
    /// The decision in force: `permit` or `deny:<code>`, with its rule.
    pub enforced: String,
    pub enforced_rule: Option<String>,
    /// What the candidate would have decided.
    pub candidate: String,
    pub candidate_rule: Option<String>,
    /// Where the candidate policy was read from.
    pub candidate_source: String,
}

/// `device_security`: a device connection refused or weakened for a
/// security reason (an untrusted or expired server certificate, no
/// acceptable security policy, a refused login, security None allowed by
/// configuration). Recorded when the condition starts, not at every retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSecurity {
    pub device: String,
    /// Stable code, e.g. `opcua_untrusted_certificate`.
    pub code: String,
    pub detail: String,
}

/// `policy_loaded`: a policy now in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyLoaded {
    /// Where the policy came from (file or folder).
    pub source: String,
    /// Digest of the policy files: base64url SHA-256 over, for each policy
    /// file in name order, its path, a 0 byte, the SHA-256 of its content
    /// and a 0 byte.
    pub sha256: String,
    /// `enforce` or `audit` (or `shadow` for a candidate policy).
    pub mode: String,
    /// Number of rules.
    pub rules: u64,
}

/// `policy_rejected`: a policy that failed to load (the previous one, or
/// none, stays in force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRejected {
    pub source: String,
    /// Digest of the policy files (as in `policy_loaded`); `None` when the
    /// folder is missing or holds no policy file.
    pub sha256: Option<String>,
    /// Every error found, each with its place.
    pub errors: Vec<String>,
}

/// `auth_failure`: a command message refused before the policy saw it.
/// The untrusted message itself is not kept, only its hash and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFailure {
    /// Stable reason code (e.g. `bad_signature`, `expired`, `replayed`).
    pub code: String,
    pub detail: String,
    /// The token's `jti`, when it could be read.
    pub command_id: Option<String>,
    /// The token's `sub`, when it could be read.
    pub subject: Option<String>,
    /// base64url SHA-256 of the message as received.
    pub message_sha256: String,
    pub message_len: u64,
}

/// `config_changed`: a configuration now in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigChanged {
    pub source: String,
    /// base64url SHA-256 of the configuration text.
    pub sha256: String,
    pub summary: String,
}

/// `checkpoint`: a signature over the chain so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Compact JWS, `typ` [`CHECKPOINT_TYP`], payload [`CheckpointClaims`].
    pub jws: String,
}

/// What a checkpoint signs. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointClaims {
    /// Index of the checkpoint record itself.
    pub n: u64,
    /// base64url SHA-256 of the line before the checkpoint (its `prev`).
    pub head: String,
    pub gateway_id: String,
}

/// What the gateway found in its log file when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Previous {
    /// No log file, or an empty one: this file starts here.
    None,
    /// The log ended with `stopped` and a checkpoint.
    Closed,
    /// The log verified but did not end in order (crash or power loss).
    NotClosed,
    /// The log did not verify and was renamed aside; see `set_aside`.
    SetAside,
}

/// A broken log that was renamed aside, and its first bad record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAside {
    /// File name it was renamed to.
    pub file: String,
    /// Line number (from 1) of the first bad record.
    pub line: u64,
    /// Index that line claimed, if it could be read.
    pub n: Option<u64>,
    /// [`BadReason`] code.
    pub reason: String,
    pub detail: String,
    /// Index and hash of the last record that verified (0 and 43 `A`s if none).
    pub last_good_n: u64,
    pub last_good_head: String,
}

/// `started`: the gateway opened the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Started {
    pub gateway_id: String,
    /// Gateway software version.
    pub version: String,
    pub previous: Previous,
    /// Records after the last checkpoint of the log found at start.
    pub unverified_tail: u64,
    pub set_aside: Option<SetAside>,
}

/// `stopped`: the gateway closed the log in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stopped {
    pub reason: String,
}

/// The event of a record; its variant is the record's [`Kind`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    CommandDecision(CommandDecision),
    PolicyLoaded(PolicyLoaded),
    PolicyRejected(PolicyRejected),
    AuthFailure(AuthFailure),
    ConfigChanged(ConfigChanged),
    Checkpoint(Checkpoint),
    Started(Started),
    Stopped(Stopped),
    CommandOutcome(CommandOutcome),
    CommandsDropped(CommandsDropped),
    ShadowDifference(ShadowDifference),
    DeviceSecurity(DeviceSecurity),
    /// An alert, as published on the alert topic.
    Alert(crate::alert::Alert),
}

impl Event {
    pub fn kind(&self) -> Kind {
        match self {
            Event::CommandDecision(_) => Kind::CommandDecision,
            Event::PolicyLoaded(_) => Kind::PolicyLoaded,
            Event::PolicyRejected(_) => Kind::PolicyRejected,
            Event::AuthFailure(_) => Kind::AuthFailure,
            Event::ConfigChanged(_) => Kind::ConfigChanged,
            Event::Checkpoint(_) => Kind::Checkpoint,
            Event::Started(_) => Kind::Started,
            Event::Stopped(_) => Kind::Stopped,
            Event::CommandOutcome(_) => Kind::CommandOutcome,
            Event::CommandsDropped(_) => Kind::CommandsDropped,
            Event::ShadowDifference(_) => Kind::ShadowDifference,
            Event::DeviceSecurity(_) => Kind::DeviceSecurity,
            Event::Alert(_) => Kind::Alert,
        }
    }
}

/// One record as read back from a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub n: u64,
    pub ts_ms: u64,
    /// Hash of the previous line.
    pub prev: [u8; 32],
    pub event: Event,
}

/// Why a line is not a well-formed record (reported as `bad_json`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line is {len} bytes, more than the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    #[error("line is not one compact JSON object")]
    NotAnObject,
    #[error("not a valid record: {0}")]
    Json(String),
    #[error("version {0} is not supported (only {AUDIT_VERSION})")]
    Version(u32),
    #[error("prev is not a base64url SHA-256")]
    BadPrevEncoding,
}

/// The record as written and as strictly parsed. Field order is the
/// serialization order.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<P, E> {
    v: u32,
    n: u64,
    ts_ms: u64,
    prev: P,
    kind: Kind,
    event: E,
}

/// Parses one line (without its `\n`) strictly.
pub fn parse_line(line: &[u8]) -> Result<Record, LineError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(LineError::TooLong {
            len: line.len(),
            limit: MAX_LINE_BYTES,
        });
    }
    // No surrounding whitespace (a `\r` from a line-ending conversion, say):
    // the hash covers the exact bytes, so only exact lines are records.
    if line.first() != Some(&b'{') || line.last() != Some(&b'}') {
        return Err(LineError::NotAnObject);
    }
    let head: Line<String, IgnoredAny> =
        serde_json::from_slice(line).map_err(|e| LineError::Json(e.to_string()))?;
    if head.v != AUDIT_VERSION {
        return Err(LineError::Version(head.v));
    }
    let prev = decode_hash(&head.prev).ok_or(LineError::BadPrevEncoding)?;
    let event = match head.kind {
        Kind::CommandDecision => Event::CommandDecision(event_of(line)?),
        Kind::PolicyLoaded => Event::PolicyLoaded(event_of(line)?),
        Kind::PolicyRejected => Event::PolicyRejected(event_of(line)?),
        Kind::AuthFailure => Event::AuthFailure(event_of(line)?),
        Kind::ConfigChanged => Event::ConfigChanged(event_of(line)?),
        Kind::Checkpoint => Event::Checkpoint(event_of(line)?),
        Kind::Started => Event::Started(event_of(line)?),
        Kind::Stopped => Event::Stopped(event_of(line)?),
        Kind::CommandOutcome => Event::CommandOutcome(event_of(line)?),
        Kind::CommandsDropped => Event::CommandsDropped(event_of(line)?),
        Kind::ShadowDifference => Event::ShadowDifference(event_of(line)?),
        Kind::DeviceSecurity => Event::DeviceSecurity(event_of(line)?),
        Kind::Alert => Event::Alert(event_of(line)?),
    };
    Ok(Record {
        n: head.n,
        ts_ms: head.ts_ms,
        prev,
        event,
    })
}

fn event_of<E: DeserializeOwned>(line: &[u8]) -> Result<E, LineError> {
    let full: Line<IgnoredAny, E> =
        serde_json::from_slice(line).map_err(|e| LineError::Json(format!("event: {e}")))?;
    Ok(full.event)
}

fn decode_hash(s: &str) -> Option<[u8; 32]> {
    b64url_decode(s)?.try_into().ok()
}

/// Signs checkpoint claims as a compact JWS.
pub fn sign_checkpoint(key: &SigningKey, claims: &CheckpointClaims) -> String {
    let json = serde_json::to_vec(claims).expect("checkpoint claims serialize");
    key.sign_compact(CHECKPOINT_TYP, &json)
}

/// Verifies a checkpoint JWS against `trust` and returns what it signs.
pub fn verify_checkpoint(jws: &str, trust: &TrustStore) -> Result<CheckpointClaims, JwsError> {
    let verified = trust.verify_compact(jws.as_bytes(), CHECKPOINT_TYP, MAX_LINE_BYTES)?;
    serde_json::from_slice(&verified.payload).map_err(|e| JwsError::BadPayload(e.to_string()))
}

/// The writer's side of the chain: the next index and the hash of the last
/// line. Builds lines; writing them is the caller's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditChain {
    next_n: u64,
    head: [u8; 32],
}

impl Default for AuditChain {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditChain {
    /// The chain of a new, empty file.
    pub fn new() -> Self {
        AuditChain {
            next_n: 1,
            head: GENESIS,
        }
    }

    /// Continues after record `last_n` whose line hashes to `head`.
    pub fn resume(last_n: u64, head: [u8; 32]) -> Self {
        AuditChain {
            next_n: last_n.saturating_add(1),
            head,
        }
    }

    /// Index the next record will get.
    pub fn next_index(&self) -> u64 {
        self.next_n
    }

    /// Hash of the last line (the next record's `prev`).
    pub fn head(&self) -> [u8; 32] {
        self.head
    }

    /// Builds the next record's line (without `\n`) and advances the chain.
    /// Use [`AuditChain::append_checkpoint`] for checkpoints.
    pub fn append(&mut self, event: &Event, ts_ms: u64) -> String {
        let prev = b64url(&self.head);
        let line = serde_json::to_string(&Line {
            v: AUDIT_VERSION,
            n: self.next_n,
            ts_ms,
            prev: prev.as_str(),
            kind: event.kind(),
            event,
        })
        .expect("audit record serializes");
        self.head = sha256(line.as_bytes());
        self.next_n = self.next_n.saturating_add(1);
        line
    }

    /// Builds a checkpoint record signing the chain so far, and advances.
    pub fn append_checkpoint(&mut self, key: &SigningKey, gateway_id: &str, ts_ms: u64) -> String {
        let claims = CheckpointClaims {
            n: self.next_n,
            head: b64url(&self.head),
            gateway_id: gateway_id.into(),
        };
        let jws = sign_checkpoint(key, &claims);
        self.append(&Event::Checkpoint(Checkpoint { jws }), ts_ms)
    }
}

/// What is wrong with the first bad record. [`BadReason::code`] is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadReason {
    /// Not a well-formed record.
    BadJson,
    /// Wrong index: a record was deleted, inserted or moved.
    BadIndex,
    /// `prev` is not the hash of the line before: that line was edited, or
    /// lines were reordered.
    BadPrev,
    /// A checkpoint's signature does not verify, or it signs another head.
    BadCheckpoint,
    /// The log was cut: mid-line, or before a checkpoint published elsewhere.
    Truncated,
}

impl BadReason {
    pub fn code(self) -> &'static str {
        match self {
            BadReason::BadJson => "bad_json",
            BadReason::BadIndex => "bad_index",
            BadReason::BadPrev => "bad_prev",
            BadReason::BadCheckpoint => "bad_checkpoint",
            BadReason::Truncated => "truncated",
        }
    }
}

impl std::fmt::Display for BadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// The first record that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Line number, from 1.
    pub line: u64,
    /// The index the line claims, if it could be read.
    pub n: Option<u64>,
    pub reason: BadReason,
    /// What exactly is wrong, in words.
    pub detail: String,
}

/// The outcome of verifying a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines read (including a bad or partial one).
    pub lines: u64,
    /// Records that verified, all before the first bad one.
    pub records: u64,
    /// Checkpoints among them.
    pub checkpoints: u64,
    /// Index of the last checkpoint that verified.
    pub last_checkpoint_n: Option<u64>,
    /// Index of the last record that verified (0 if none).
    pub last_n: u64,
    /// Hash of the last line that verified ([`GENESIS`] if none).
    pub head: [u8; 32],
    /// Gateway named by the checkpoints.
    pub gateway_id: Option<String>,
    /// Records after the last checkpoint: protected by the chain only.
    pub unverified_tail: u64,
    /// The log ends with `stopped` and a checkpoint.
    pub closed: bool,
    /// Index of the published checkpoint the log was compared with, if any.
    pub published_checkpoint_n: Option<u64>,
    /// The first bad record; `None` when everything read verified.
    pub first_bad: Option<BadRecord>,
}

impl VerifyReport {
    /// True when no record is bad (warnings aside).
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }

    /// Things an auditor should know about a log that verified.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.first_bad.is_some() {
            return out;
        }
        if self.unverified_tail > 0 {
            let after = match self.last_checkpoint_n {
                Some(n) => format!("the last checkpoint (n={n})"),
                None => "the start (there is no checkpoint)".into(),
            };
            out.push(format!(
                "unverified tail: {} records after {after}; lines removed from the end \
                 cannot be detected without the latest checkpoint published on the audit topic",
                self.unverified_tail
            ));
        }
        if !self.closed {
            out.push(
                "missing final checkpoint: the log does not end with `stopped` and a checkpoint \
                 (the gateway is running, stopped abnormally, or the end of the log was removed)"
                    .into(),
            );
        }
        out
    }

    /// The chain to continue writing after the last good record; `None`
    /// when a record is bad.
    pub fn resume(&self) -> Option<AuditChain> {
        self.is_ok()
            .then(|| AuditChain::resume(self.last_n, self.head))
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.first_bad {
            None => {
                write!(
                    f,
                    "OK: {} records, {} checkpoints, last record n={}",
                    self.records, self.checkpoints, self.last_n
                )?;
                if let Some(gw) = &self.gateway_id {
                    write!(f, ", gateway {gw}")?;
                }
                if self.closed {
                    write!(f, ", closed in order")?;
                }
                if let Some(n) = self.published_checkpoint_n {
                    write!(f, ", matches the published checkpoint n={n}")?;
                }
                for w in self.warnings() {
                    write!(f, "\nwarning: {w}")?;
                }
                Ok(())
            }
            Some(bad) => {
                write!(f, "FAILED at line {}", bad.line)?;
                if let Some(n) = bad.n {
                    write!(f, " (record n={n})")?;
                }
                write!(f, ": {}: {}", bad.reason, bad.detail)?;
                write!(
                    f,
                    "\n{} records before it verified (last good record n={}, {} checkpoints)",
                    self.records, self.last_n, self.checkpoints
                )
            }
        }
    }
}

/// Checks a log line by line. Feed complete lines with
/// [`Verifier::push_line`], an incomplete last line with
/// [`Verifier::push_partial`], then [`Verifier::finish`]. Stops judging at the
/// first bad record (later lines are only counted).
#[derive(Debug)]
pub struct Verifier<'t> {
    trust: &'t TrustStore,
    published: Option<CheckpointClaims>,
    published_matched: bool,
    lines: u64,
    records: u64,
    checkpoints: u64,
    last_checkpoint_n: Option<u64>,
    last_n: u64,
    head: [u8; 32],
    /// Kinds of the two last good records: (before last, last).
    last_kinds: (Option<Kind>, Option<Kind>),
    gateway_id: Option<String>,
    first_bad: Option<BadRecord>,
}

impl<'t> Verifier<'t> {
    pub fn new(trust: &'t TrustStore) -> Self {
        Verifier {
            trust,
            published: None,
            published_matched: false,
            lines: 0,
            records: 0,
            checkpoints: 0,
            last_checkpoint_n: None,
            last_n: 0,
            head: GENESIS,
            last_kinds: (None, None),
            gateway_id: None,
            first_bad: None,
        }
    }

    /// Compares the log with the latest checkpoint published elsewhere (the
    /// audit topic): a log that ends before it, or differs at it, is bad.
    pub fn with_published_checkpoint(mut self, jws: &str) -> Result<Self, JwsError> {
        self.published = Some(verify_checkpoint(jws, self.trust)?);
        Ok(self)
    }

    fn bad(&mut self, n: Option<u64>, reason: BadReason, detail: String) {
        if self.first_bad.is_none() {
            self.first_bad = Some(BadRecord {
                line: self.lines,
                n,
                reason,
                detail,
            });
        }
    }

    /// One complete line, without its `\n`.
    pub fn push_line(&mut self, line: &[u8]) {
        self.lines = self.lines.saturating_add(1);
        if self.first_bad.is_some() {
            return;
        }
        let rec = match parse_line(line) {
            Ok(rec) => rec,
            Err(e) => return self.bad(claimed_index(line), BadReason::BadJson, e.to_string()),
        };
        let n = Some(rec.n);
        let expected = self.last_n.saturating_add(1);
        if rec.n != expected {
            let detail = if rec.n > expected {
                let missing = if rec.n - 1 == expected {
                    format!("record {expected} is")
                } else {
                    format!("records {expected}..={} are", rec.n - 1)
                };
                format!(
                    "expected n={expected}, found n={}: {missing} missing (deleted), \
                     or lines were moved",
                    rec.n
                )
            } else {
                format!(
                    "expected n={expected}, found n={}: an index repeats or goes back \
                     (a line was inserted, duplicated or moved)",
                    rec.n
                )
            };
            return self.bad(n, BadReason::BadIndex, detail);
        }
        if rec.prev != self.head {
            let detail = if self.last_n == 0 {
                "the first record must have prev = 43 'A's".to_string()
            } else {
                format!(
                    "prev is not the hash of line {} (n={}): that line was edited after it \
                     was written, or this line's prev was",
                    self.lines.saturating_sub(1),
                    self.last_n
                )
            };
            return self.bad(n, BadReason::BadPrev, detail);
        }
        if let Event::Checkpoint(cp) = &rec.event {
            if let Err(detail) = self.check_checkpoint(rec.n, cp) {
                return self.bad(n, BadReason::BadCheckpoint, detail);
            }
        }
        if let Some(p) = &self.published {
            if p.n == rec.n {
                let is_checkpoint = matches!(rec.event, Event::Checkpoint(_));
                if !is_checkpoint || p.head != b64url(&self.head) {
                    let detail = format!(
                        "the published checkpoint n={} signs head {}, but here record n={} is a \
                         {} after a line hashing to {}",
                        p.n,
                        p.head,
                        rec.n,
                        rec.event.kind(),
                        b64url(&self.head)
                    );
                    return self.bad(n, BadReason::BadCheckpoint, detail);
                }
                self.published_matched = true;
            }
        }
        self.records += 1;
        self.last_n = rec.n;
        self.head = sha256(line);
        self.last_kinds = (self.last_kinds.1, Some(rec.event.kind()));
    }

    fn check_checkpoint(&mut self, n: u64, cp: &Checkpoint) -> Result<(), String> {
        let claims = verify_checkpoint(&cp.jws, self.trust)
            .map_err(|e| format!("signature: {e} ({})", e.code()))?;
        if claims.n != n {
            return Err(format!(
                "signed for record n={}, stored as n={n} (a checkpoint copied from elsewhere)",
                claims.n
            ));
        }
        let head = b64url(&self.head);
        if claims.head != head {
            return Err(format!(
                "head mismatch: signs {}, but the previous line hashes to {head}",
                claims.head
            ));
        }
        match &self.gateway_id {
            Some(gw) if *gw != claims.gateway_id => {
                return Err(format!(
                    "signed for gateway {:?}, earlier checkpoints for {gw:?}",
                    claims.gateway_id
                ))
            }
            Some(_) => {}
            None => self.gateway_id = Some(claims.gateway_id),
        }
        self.checkpoints += 1;
        self.last_checkpoint_n = Some(n);
        Ok(())
    }

    /// The last line of the input, which has no `\n`: a record cut short.
    pub fn push_partial(&mut self, bytes: &[u8]) {
        self.lines = self.lines.saturating_add(1);
        let detail = format!(
            "the last line is incomplete ({} bytes without a newline): the log was cut \
             in the middle of a record",
            bytes.len()
        );
        self.bad(claimed_index(bytes), BadReason::Truncated, detail);
    }

    /// A line longer than [`MAX_LINE_BYTES`] that the caller did not read whole.
    pub fn push_too_long(&mut self) {
        self.lines = self.lines.saturating_add(1);
        let detail = format!("line is longer than the limit of {MAX_LINE_BYTES} bytes");
        self.bad(None, BadReason::BadJson, detail);
    }

    pub fn finish(mut self) -> VerifyReport {
        if let Some(p) = &self.published {
            if self.first_bad.is_none() && !self.published_matched {
                let missing = self.last_n.saturating_add(1);
                self.first_bad = Some(BadRecord {
                    line: self.lines.saturating_add(1),
                    n: Some(missing),
                    reason: BadReason::Truncated,
                    detail: format!(
                        "the log ends at n={}, but checkpoint n={} was published: records \
                         {missing}..={} were removed from the end",
                        self.last_n, p.n, p.n
                    ),
                });
            }
        }
        let closed = self.last_kinds == (Some(Kind::Stopped), Some(Kind::Checkpoint));
        VerifyReport {
            lines: self.lines,
            records: self.records,
            checkpoints: self.checkpoints,
            last_checkpoint_n: self.last_checkpoint_n,
            last_n: self.last_n,
            head: self.head,
            gateway_id: self.gateway_id,
            unverified_tail: self
                .last_n
                .saturating_sub(self.last_checkpoint_n.unwrap_or(0)),
            closed,
            published_checkpoint_n: self
                .published
                .as_ref()
                .filter(|_| self.published_matched)
                .map(|p| p.n),
            first_bad: self.first_bad,
        }
    }
}

/// The `n` a bad line claims, for the report, if it can be read at all.
fn claimed_index(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct OnlyN {
        n: u64,
    }
    serde_json::from_slice::<OnlyN>(line).ok().map(|o| o.n)
}

/// Verifies a whole log held in memory: lines end in `\n`; bytes after the
/// last `\n` are an incomplete record (`truncated`).
pub fn verify_bytes(data: &[u8], trust: &TrustStore) -> VerifyReport {
    let mut v = Verifier::new(trust);
    let mut parts = data.split(|b| *b == b'\n').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_some() {
            v.push_line(part);
        } else if !part.is_empty() {
            v.push_partial(part);
        }
    }
    v.finish()
}

/// Verifies lines whose `\n` was already removed (e.g. records received from
/// the audit topic). A last line that is not even JSON is taken as cut short
/// (`truncated`); anywhere else it is `bad_json`.
pub fn verify_lines<'a, I>(lines: I, trust: &TrustStore) -> VerifyReport
where
    I: IntoIterator<Item = &'a str>,
{
    let mut v = Verifier::new(trust);
    let mut it = lines.into_iter().peekable();
    while let Some(line) = it.next() {
        let last = it.peek().is_none();
        if last && serde_json::from_str::<IgnoredAny>(line).is_err() {
            v.push_partial(line.as_bytes());
        } else {
            v.push_line(line.as_bytes());
        }
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden;

    const GW: &str = "plant1-gw1";
    const T0: u64 = 1_767_225_600_000;

    fn trust() -> TrustStore {
        let mut t = TrustStore::new();
        t.add(golden::key().public_key());
        t
    }

    fn decision(id: &str) -> Event {
        Event::CommandDecision(CommandDecision {
            command_id: id.into(),
            operator: "alice".into(),
            tag: "tank1.setpoint".into(),
            value: Value::Float(2.5),
            decision: Decision::Permit,
            reason_code: None,
            reason: "permitted by rule \"tank-level\"".into(),
            rule_id: Some("tank-level".into()),
            token: "eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJjbWQtMSJ9.c2ln".into(),
            approval_tokens: vec![],
        })
    }

    fn started() -> Event {
        Event::Started(Started {
            gateway_id: GW.into(),
            version: "0.1.0".into(),
            previous: Previous::None,
            unverified_tail: 0,
            set_aside: None,
        })
    }

    /// The golden log: started, checkpoint, three decisions, checkpoint,
    /// stopped, checkpoint (8 lines).
    fn golden_log() -> Vec<String> {
        let key = golden::key();
        let mut chain = AuditChain::new();
        let mut t = T0;
        let mut tick = || {
            t += 1000;
            t
        };
        let mut lines = vec![chain.append(&started(), tick())];
        lines.push(chain.append_checkpoint(&key, GW, tick()));
        for id in ["cmd-1", "cmd-2", "cmd-3"] {
            lines.push(chain.append(&decision(id), tick()));
        }
        lines.push(chain.append_checkpoint(&key, GW, tick()));
        lines.push(chain.append(
            &Event::Stopped(Stopped {
                reason: "shutdown".into(),
            }),
            tick(),
        ));
        lines.push(chain.append_checkpoint(&key, GW, tick()));
        lines
    }

    fn text(lines: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        out
    }

    fn first_bad(lines: &[String]) -> BadRecord {
        verify_bytes(&text(lines), &trust())
            .first_bad
            .expect("a bad record")
    }

    #[test]
    fn golden_first_record_and_log_hash_are_stable() {
        let lines = golden_log();
        assert_eq!(
            lines[0],
            r#"{"v":1,"n":1,"ts_ms":1767225601000,"prev":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","kind":"started","event":{"gateway_id":"plant1-gw1","version":"0.1.0","previous":"none","unverified_tail":0,"set_aside":null}}"#
        );
        assert_eq!(
            lines[2],
            format!(
                r#"{{"v":1,"n":3,"ts_ms":1767225603000,"prev":"{}","kind":"command_decision","event":{{"command_id":"cmd-1","operator":"alice","tag":"tank1.setpoint","value":2.5,"decision":"permit","reason_code":null,"reason":"permitted by rule \"tank-level\"","rule_id":"tank-level","token":"eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJjbWQtMSJ9.c2ln","approval_tokens":[]}}}}"#,
                b64url(&sha256(lines[1].as_bytes()))
            )
        );
        // Ed25519 is deterministic: the whole log, signatures included, is fixed.
        assert_eq!(b64url(&sha256(&text(&lines))), GOLDEN_LOG_SHA256);
        let claims = match parse_line(lines[1].as_bytes()).unwrap().event {
            Event::Checkpoint(cp) => verify_checkpoint(&cp.jws, &trust()).unwrap(),
            other => panic!("not a checkpoint: {other:?}"),
        };
        assert_eq!(
            claims,
            CheckpointClaims {
                n: 2,
                head: b64url(&sha256(lines[0].as_bytes())),
                gateway_id: GW.into()
            }
        );
    }

    const GOLDEN_LOG_SHA256: &str = "CYcCkanOk7UCaOraWRxF6zfwnGMlhfbVaH5ntVhsgPg";

    #[test]
    fn genesis_prev_is_43_zero_hash_characters() {
        assert_eq!(GENESIS_PREV, b64url(&GENESIS));
        assert_eq!(GENESIS_PREV.len(), 43);
    }

    #[test]
    fn untouched_closed_log_verifies_with_no_warnings() {
        let r = verify_bytes(&text(&golden_log()), &trust());
        assert!(r.is_ok(), "{r}");
        assert_eq!((r.records, r.checkpoints, r.last_n), (8, 3, 8));
        assert_eq!(r.unverified_tail, 0);
        assert!(r.closed);
        assert!(r.warnings().is_empty());
        assert_eq!(r.gateway_id.as_deref(), Some(GW));
        assert_eq!(
            r.to_string(),
            "OK: 8 records, 3 checkpoints, last record n=8, gateway plant1-gw1, closed in order"
        );
    }

    #[test]
    fn every_event_kind_round_trips_through_a_line() {
        let events = [
            started(),
            decision("cmd-9"),
            Event::PolicyLoaded(PolicyLoaded {
                source: "policies/".into(),
                sha256: b64url(&sha256(b"p")),
                mode: "enforce".into(),
                rules: 3,
            }),
            Event::PolicyRejected(PolicyRejected {
                source: "policies/".into(),
                sha256: None,
                errors: vec!["tank.toml:3:1: unknown tag".into()],
            }),
            Event::AuthFailure(AuthFailure {
                code: "bad_signature".into(),
                detail: "signature does not verify".into(),
                command_id: Some("cmd-x".into()),
                subject: None,
                message_sha256: b64url(&sha256(b"m")),
                message_len: 1,
            }),
            Event::ConfigChanged(ConfigChanged {
                source: "gateway.toml".into(),
                sha256: b64url(&sha256(b"c")),
                summary: "poll_interval_ms 500 -> 250".into(),
            }),
            Event::Started(Started {
                gateway_id: GW.into(),
                version: "0.1.0".into(),
                previous: Previous::SetAside,
                unverified_tail: 2,
                set_aside: Some(SetAside {
                    file: "audit.jsonl.broken-1".into(),
                    line: 4,
                    n: Some(4),
                    reason: "bad_prev".into(),
                    detail: "x".into(),
                    last_good_n: 3,
                    last_good_head: GENESIS_PREV.into(),
                }),
            }),
            Event::Stopped(Stopped {
                reason: "shutdown".into(),
            }),
        ];
        let mut chain = AuditChain::new();
        for (i, e) in events.iter().enumerate() {
            let line = chain.append(e, T0);
            let rec = parse_line(line.as_bytes()).unwrap();
            assert_eq!(rec.n, i as u64 + 1);
            assert_eq!(&rec.event, e);
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn an_edited_field_is_named_at_the_next_line_as_bad_prev() {
        let mut lines = golden_log();
        lines[2] = lines[2].replace("alice", "mallory");
        let bad = first_bad(&lines);
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (4, Some(4), BadReason::BadPrev)
        );
        assert!(bad.detail.contains("line 3 (n=3)"), "{}", bad.detail);
    }

    #[test]
    fn an_edited_index_or_prev_is_named_at_that_line() {
        let mut lines = golden_log();
        lines[3] = lines[3].replace(r#""n":4,"#, r#""n":5,"#);
        let bad = first_bad(&lines);
        assert_eq!((bad.line, bad.reason), (4, BadReason::BadIndex));
        let mut lines = golden_log();
        let prev = b64url(&sha256(lines[2].as_bytes()));
        lines[3] = lines[3].replace(&prev, GENESIS_PREV);
        assert_eq!(first_bad(&lines).reason, BadReason::BadPrev);
    }

    #[test]
    fn a_deleted_line_is_named_as_bad_index_where_the_gap_starts() {
        let mut lines = golden_log();
        lines.remove(2);
        let bad = first_bad(&lines);
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (3, Some(4), BadReason::BadIndex)
        );
        assert!(bad.detail.contains("expected n=3"), "{}", bad.detail);
    }

    #[test]
    fn a_forged_line_with_the_right_index_and_prev_is_caught_at_the_next_line() {
        let mut lines = golden_log();
        // The forger knows the format and the chain up to line 2.
        let mut chain = AuditChain::resume(2, sha256(lines[1].as_bytes()));
        let forged = chain.append(&decision("cmd-forged"), T0);
        lines.insert(2, forged);
        let bad = first_bad(&lines);
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (4, Some(3), BadReason::BadIndex)
        );
    }

    #[test]
    fn a_naively_forged_line_is_named_itself() {
        let mut lines = golden_log();
        lines.insert(3, lines[3].replace("cmd-2", "cmd-forged"));
        let bad = first_bad(&lines);
        assert_eq!((bad.line, bad.reason), (5, BadReason::BadIndex));
        let mut lines = golden_log();
        lines.insert(3, "{\"n\":4}".into());
        let bad = first_bad(&lines);
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (4, Some(4), BadReason::BadJson)
        );
    }

    #[test]
    fn two_swapped_lines_are_named_at_the_first_of_them() {
        let mut lines = golden_log();
        lines.swap(2, 3);
        let bad = first_bad(&lines);
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (3, Some(4), BadReason::BadIndex)
        );
    }

    #[test]
    fn a_line_cut_in_the_middle_is_truncated() {
        let mut data = text(&golden_log());
        data.truncate(data.len() - 20);
        let r = verify_bytes(&data, &trust());
        let bad = r.first_bad.clone().unwrap();
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (8, None, BadReason::Truncated)
        );
        assert_eq!(r.records, 7);
        // Only the newline missing: still an incomplete write.
        let mut data = text(&golden_log());
        data.pop();
        assert_eq!(
            verify_bytes(&data, &trust()).first_bad.unwrap().reason,
            BadReason::Truncated
        );
        // Lines without their newlines: a last line that is not JSON is cut.
        let lines = golden_log();
        let mut refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let cut = &lines[7][..30];
        refs[7] = cut;
        let bad = verify_lines(refs, &trust()).first_bad.unwrap();
        assert_eq!((bad.line, bad.reason), (8, BadReason::Truncated));
    }

    #[test]
    fn a_cut_at_a_line_boundary_is_an_unverified_tail_locally() {
        let mut lines = golden_log();
        lines.truncate(5); // the three decisions after the first checkpoint
        let r = verify_bytes(&text(&lines), &trust());
        assert!(r.is_ok());
        assert_eq!(r.unverified_tail, 3);
        assert!(!r.closed);
        let w = r.warnings();
        assert_eq!(w.len(), 2);
        assert!(w[0].starts_with("unverified tail: 3 records after the last checkpoint (n=2)"));
        assert!(w[1].starts_with("missing final checkpoint"));
        assert!(r
            .to_string()
            .contains("\nwarning: unverified tail: 3 records"));
    }

    #[test]
    fn a_cut_at_a_line_boundary_is_truncated_against_the_published_checkpoint() {
        let full = golden_log();
        let published = match parse_line(full[5].as_bytes()).unwrap().event {
            Event::Checkpoint(cp) => cp.jws,
            _ => unreachable!("line 6 is a checkpoint"),
        };
        let trust = trust();
        let check = |lines: &[String]| {
            let mut v = Verifier::new(&trust)
                .with_published_checkpoint(&published)
                .unwrap();
            for l in lines {
                v.push_line(l.as_bytes());
            }
            v.finish()
        };
        let r = check(&full);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.published_checkpoint_n, Some(6));
        let bad = check(&full[..4]).first_bad.unwrap();
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (5, Some(5), BadReason::Truncated)
        );
        assert!(bad.detail.contains("records 5..=6 were removed"));
    }

    #[test]
    fn a_checkpoint_signed_by_another_key_is_bad_checkpoint() {
        let mut lines = golden_log();
        let other = SigningKey::from_seed(&[9u8; 32]).unwrap();
        let mut chain = AuditChain::resume(5, sha256(lines[4].as_bytes()));
        lines[5] = chain.append_checkpoint(&other, GW, T0);
        let bad = first_bad(&lines);
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (6, Some(6), BadReason::BadCheckpoint)
        );
        assert!(bad.detail.contains("unknown_key"), "{}", bad.detail);
        // A trusted key over a tampered payload: the signature fails.
        let mut lines = golden_log();
        let rec = parse_line(lines[5].as_bytes()).unwrap();
        let Event::Checkpoint(cp) = rec.event else {
            unreachable!("line 6 is a checkpoint")
        };
        let parts: Vec<&str> = cp.jws.split('.').collect();
        let forged_payload = b64url(
            format!(
                r#"{{"n":6,"head":"{}","gateway_id":"other"}}"#,
                b64url(&sha256(lines[4].as_bytes()))
            )
            .as_bytes(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        lines[5] = lines[5].replace(&cp.jws, &forged);
        let bad = first_bad(&lines);
        assert_eq!((bad.line, bad.reason), (6, BadReason::BadCheckpoint));
        assert!(bad.detail.contains("bad_signature"), "{}", bad.detail);
    }

    #[test]
    fn a_checkpoint_over_another_head_is_bad_checkpoint() {
        let key = golden::key();
        let mut lines = golden_log();
        // Validly signed, but over a head that is not the previous line's.
        let claims = CheckpointClaims {
            n: 6,
            head: b64url(&sha256(b"something else")),
            gateway_id: GW.into(),
        };
        let jws = sign_checkpoint(&key, &claims);
        let mut chain = AuditChain::resume(5, sha256(lines[4].as_bytes()));
        lines[5] = chain.append(&Event::Checkpoint(Checkpoint { jws }), T0);
        let bad = first_bad(&lines);
        assert_eq!(
            (bad.line, bad.n, bad.reason),
            (6, Some(6), BadReason::BadCheckpoint)
        );
        assert!(bad.detail.starts_with("head mismatch"), "{}", bad.detail);
        // A checkpoint copied to another position names its own index.
        let mut lines = golden_log();
        let copied = parse_line(lines[1].as_bytes()).unwrap().event;
        let mut chain = AuditChain::resume(5, sha256(lines[4].as_bytes()));
        lines[5] = chain.append(&copied, T0);
        let bad = first_bad(&lines);
        assert_eq!((bad.line, bad.reason), (6, BadReason::BadCheckpoint));
        assert!(
            bad.detail.contains("signed for record n=2"),
            "{}",
            bad.detail
        );
    }

    #[test]
    fn malformed_lines_are_bad_json_and_never_panic() {
        let good = golden_log();
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"{".to_vec(),
            b"[]".to_vec(),
            b"\xff\xfe".to_vec(),
            format!("{}\r", good[0]).into_bytes(),
            good[0].replace(r#""v":1"#, r#""v":2"#).into_bytes(),
            good[0].replace("started", "rebooted").into_bytes(),
            good[0]
                .replace(r#""event":{"#, r#""event":{"x":1,"#)
                .into_bytes(),
            good[0].replace(r#""v":1,"#, r#""v":1,"v":1,"#).into_bytes(),
            good[0].replace(GENESIS_PREV, "AAAA").into_bytes(),
            vec![b'{'; MAX_LINE_BYTES + 1],
        ];
        for case in cases {
            let mut data = case.clone();
            data.push(b'\n');
            let bad = verify_bytes(&data, &trust()).first_bad.unwrap();
            assert_eq!(
                (bad.line, bad.reason),
                (1, BadReason::BadJson),
                "{:?}",
                String::from_utf8_lossy(&case[..case.len().min(80)])
            );
        }
    }

    #[test]
    fn a_log_not_starting_at_genesis_is_bad_prev() {
        let lines = golden_log();
        let mut chain = AuditChain::new();
        chain.head = sha256(b"elsewhere");
        let bad = first_bad(&[chain.append(&started(), T0)]);
        assert_eq!((bad.line, bad.reason), (1, BadReason::BadPrev));
        let bad = first_bad(&lines[1..]);
        assert_eq!((bad.line, bad.reason), (1, BadReason::BadIndex));
    }

    #[test]
    fn a_failure_report_names_line_index_and_reason() {
        let mut lines = golden_log();
        lines.remove(2);
        let r = verify_bytes(&text(&lines), &trust());
        assert_eq!(
            r.to_string().lines().next().unwrap(),
            "FAILED at line 3 (record n=4): bad_index: expected n=3, found n=4: record 3 is \
             missing (deleted), or lines were moved"
        );
        assert!(r.resume().is_none());
    }

    #[test]
    fn resuming_a_verified_log_continues_its_chain() {
        let key = golden::key();
        let mut lines = golden_log();
        let r = verify_bytes(&text(&lines), &trust());
        let mut chain = r.resume().unwrap();
        lines.push(chain.append(&started(), T0));
        lines.push(chain.append_checkpoint(&key, GW, T0));
        let r = verify_bytes(&text(&lines), &trust());
        assert!(r.is_ok(), "{r}");
        assert_eq!((r.last_n, r.checkpoints), (10, 4));
    }
}
