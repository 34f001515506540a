//! Alerts: what the gateway's watch found, signed.
//!
//! An alert names a stable `code` (the README lists every code and what to
//! do about it), a `severity`, the `subject` it concerns (a tag, a device,
//! an operator, the gateway) and the `evidence` (values and thresholds).
//! Repeated findings of the same code and subject are summarised: the first
//! is sent at once, further ones within the summary window are counted and
//! sent as one alert with `count` and the time span.
//!
//! Published on `{prefix}/{gateway_id}/alerts` as a JWS signed by the
//! gateway's telemetry key with `typ` [`ALERT_TYP`], and recorded in the
//! audit log (kind `alert`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// JWS `typ` of an alert.
pub const ALERT_TYP: &str = "twin-alert+jws";

/// How urgent a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// One alert. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    pub v: u32,
    pub gateway_id: String,
    /// Stable code, e.g. `sensor_out_of_range`.
    pub code: String,
    pub severity: Severity,
    /// What it concerns: `tag:<name>`, `device:<name>`, `operator:<sub>` or `gateway`.
    pub subject: String,
    /// What was found, in words.
    pub message: String,
    /// Values and thresholds behind the finding.
    pub evidence: BTreeMap<String, serde_json::Value>,
    /// Occurrences summarised by this alert (1 for a first occurrence).
    pub count: u64,
    /// When the first and the last of them happened, ms since the Unix epoch.
    pub first_ms: u64,
    pub last_ms: u64,
}
