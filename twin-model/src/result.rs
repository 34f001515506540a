//! The signed result of a command message, published by the gateway on the
//! result topic.
//!
//! Every command message that reaches the gateway's decision gets exactly
//! one result: `refused` (the message or its token failed a check before the
//! policy saw it), `denied` (the policy said no), `applied` (written and
//! confirmed by reading the value back) or `failed` (permitted, but the
//! write or its confirmation did not succeed). Messages dropped by the
//! global rate limit get none; they are counted and audited in summary.
//!
//! The document is signed by the gateway's telemetry key as a JWS with
//! `typ` [`RESULT_TYP`], like every other message it publishes.

use crate::Value;
use serde::{Deserialize, Serialize};

/// JWS `typ` of a command result.
pub const RESULT_TYP: &str = "twin-result+jws";

/// What became of a command message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Written to the device and confirmed by reading it back.
    Applied,
    /// The policy refused it; nothing was written.
    Denied,
    /// Permitted, but the write or its confirmation failed.
    Failed,
    /// Refused before the policy: size, shape, signature, claims, replay,
    /// rate limit or audit unavailable; nothing was written.
    Refused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Denied => "denied",
            Status::Failed => "failed",
            Status::Refused => "refused",
        }
    }
}

/// The result document. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    pub v: u32,
    pub gateway_id: String,
    /// The command id (the token's `jti`); `None` when the message was
    /// refused before its claims could be trusted.
    pub command_id: Option<String>,
    /// The requesting operator (`sub`), once authenticated.
    pub operator: Option<String>,
    pub tag: Option<String>,
    /// The value the command asked for.
    pub value: Option<Value>,
    pub status: Status,
    /// Stable reason code; `None` when applied.
    pub code: Option<String>,
    /// The policy rule that permitted or that the denial names.
    pub rule_id: Option<String>,
    /// The outcome in words.
    pub reason: String,
    /// The value read back after the write.
    pub readback: Option<Value>,
    /// base64url SHA-256 of the command message as received, so a sender
    /// can match a refusal to what it sent.
    pub message_sha256: String,
    /// Index of the audit record of the decision, when one was written.
    pub audit_n: Option<u64>,
    /// When the result was decided, ms since the Unix epoch.
    pub ts_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_round_trips_and_refuses_unknown_members() {
        let r = CommandResult {
            v: 1,
            gateway_id: "gw".into(),
            command_id: Some("c1".into()),
            operator: Some("alice".into()),
            tag: Some("t".into()),
            value: Some(Value::Float(1.5)),
            status: Status::Applied,
            code: None,
            rule_id: Some("r".into()),
            reason: "applied".into(),
            readback: Some(Value::Float(1.5)),
            message_sha256: "x".into(),
            audit_n: Some(7),
            ts_ms: 1,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""status":"applied""#), "{json}");
        let back: CommandResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let extra = json.replacen('{', r#"{"x":1,"#, 1);
        assert!(serde_json::from_str::<CommandResult>(&extra).is_err());
    }
}
