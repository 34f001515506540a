//! The gateway's status message, retained on the status topic.
//!
//! On connect the gateway publishes a signed `online` status and registers a
//! signed `offline` status, made at the same moment, as its MQTT last will;
//! on clean shutdown it publishes `offline` itself. Both carry the same
//! `session` so a watcher can pair them.

use serde::{Deserialize, Serialize};

/// JWS `typ` of a status message.
pub const STATUS_TYP: &str = "twin-status+jws";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Online,
    Offline,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub v: u32,
    pub gateway_id: String,
    pub state: State,
    /// Connection session: ms since the Unix epoch when the MQTT session began.
    pub session: u64,
    /// Last telemetry sequence number signed before this status was made.
    pub seq: u64,
}
