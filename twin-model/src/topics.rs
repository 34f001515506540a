//! MQTT topic names. Every topic of a gateway lives under
//! `{prefix}/{gateway_id}/`, so one broker ACL pattern confines a gateway to
//! its own topics.

/// Default first topic level.
pub const DEFAULT_PREFIX: &str = "twin";

/// Signed telemetry batches (QoS 1, not retained).
pub const TELEMETRY: &str = "telemetry";
/// The signed reported twin (QoS 1, retained).
pub const REPORTED: &str = "reported";
/// Signed gap records (QoS 1, not retained).
pub const GAPS: &str = "gaps";
/// Signed online/offline status (QoS 1, retained; the offline message is the last will).
pub const STATUS: &str = "status";
/// Operator-signed commands to the gateway (QoS 1, never retained: a
/// retained command is refused).
pub const COMMAND: &str = "command";
/// Signed command results from the gateway (QoS 1, not retained).
pub const RESULT: &str = "result";
/// Signed alerts: findings of the gateway's watch over sensor data,
/// commands and itself (QoS 1, not retained).
pub const ALERTS: &str = "alerts";
/// The gateway's security self-check report (QoS 1, retained).
pub const SELFCHECK: &str = "selfcheck";
/// The signed asset inventory (QoS 1, retained).
pub const INVENTORY: &str = "inventory";
/// The signed index of the software bill of materials (QoS 1, retained);
/// its parts are on `sbom/<index>` (see [`crate::inventory::SbomIndex`]).
pub const SBOM: &str = "sbom";
/// The gateway's audit records, each line exactly as written to its audit
/// log (QoS 1, not retained).
pub const AUDIT: &str = "audit";

/// The topics of one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// Topics for `gateway_id` under `prefix`. Both must be valid topic
    /// levels (see [`valid_level`]); the caller validates configuration first.
    pub fn new(prefix: &str, gateway_id: &str) -> Self {
        Topics {
            base: format!("{prefix}/{gateway_id}"),
        }
    }

    pub fn telemetry(&self) -> String {
        format!("{}/{TELEMETRY}", self.base)
    }
    pub fn reported(&self) -> String {
        format!("{}/{REPORTED}", self.base)
    }
    pub fn gaps(&self) -> String {
        format!("{}/{GAPS}", self.base)
    }
    pub fn status(&self) -> String {
        format!("{}/{STATUS}", self.base)
    }
    pub fn command(&self) -> String {
        format!("{}/{COMMAND}", self.base)
    }
    pub fn result(&self) -> String {
        format!("{}/{RESULT}", self.base)
    }
    pub fn audit(&self) -> String {
        format!("{}/{AUDIT}", self.base)
    }
    pub fn alerts(&self) -> String {
        format!("{}/{ALERTS}", self.base)
    }
    pub fn selfcheck(&self) -> String {
        format!("{}/{SELFCHECK}", self.base)
    }
    pub fn inventory(&self) -> String {
        format!("{}/{INVENTORY}", self.base)
    }
    pub fn sbom(&self) -> String {
        format!("{}/{SBOM}", self.base)
    }
    /// Part `index` (from 0) of the SBOM named by the index on [`Topics::sbom`].
    pub fn sbom_part(&self, index: usize) -> String {
        format!("{}/{SBOM}/{index}", self.base)
    }
    /// Filter matching every topic of this gateway.
    pub fn all(&self) -> String {
        format!("{}/#", self.base)
    }
}

/// Whether `s` can be one topic level and an identifier: 1 to 64 characters
/// from `A-Z a-z 0-9 _ - .`, so it never contains `/`, `+`, `#` or NUL.
pub fn valid_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Splits `{prefix}/{gateway_id}/{kind}` into `(gateway_id, kind)`.
pub fn parse<'a>(prefix: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (gw, kind) = rest.split_once('/')?;
    (valid_level(gw) && !kind.is_empty()).then_some((gw, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_under_the_gateway() {
        let t = Topics::new("twin", "gw-1");
        assert_eq!(t.telemetry(), "twin/gw-1/telemetry");
        assert_eq!(
            parse("twin", "twin/gw-1/reported"),
            Some(("gw-1", "reported"))
        );
        assert_eq!(parse("twin", "other/gw-1/reported"), None);
        assert!(!valid_level("a/b") && !valid_level("+") && !valid_level(""));
    }
}
