//! The reported twin: per-tag latest state, signed and retained.

use crate::sample::{Quality, Sample, Value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// JWS `typ` of a reported twin document.
pub const REPORTED_TYP: &str = "twin-reported+jws";

/// Latest known state of one tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    pub quality: Quality,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Source timestamp of the latest sample, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Engineering unit from the device configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The id of the command whose confirmed write set the tag last (kept
    /// until another command writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
}

/// The reported twin document. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedTwin {
    pub v: u32,
    pub gateway_id: String,
    /// Increases by one on every change of any tag's value or quality, and
    /// never goes back, also across gateway restarts.
    pub version: u64,
    /// Sequence number of the latest telemetry batch reflected here.
    pub seq: u64,
    /// When this document was signed, ms since the Unix epoch.
    pub updated_ms: u64,
    pub tags: BTreeMap<String, TagState>,
}

impl ReportedTwin {
    pub fn new(gateway_id: impl Into<String>) -> Self {
        ReportedTwin {
            v: crate::WIRE_VERSION,
            gateway_id: gateway_id.into(),
            version: 0,
            seq: 0,
            updated_ms: 0,
            tags: BTreeMap::new(),
        }
    }

    /// Applies one sample; returns whether the tag's value, quality or reason
    /// changed (and the version was increased). A sample older than the
    /// state already held is ignored.
    pub fn apply(&mut self, sample: &Sample, unit: Option<&str>) -> bool {
        self.apply_command(sample, unit, None)
    }

    /// [`ReportedTwin::apply`] for the read-back of a confirmed command
    /// write: the tag then names `command_id` (`None` keeps the id the tag
    /// had).
    pub fn apply_command(
        &mut self,
        sample: &Sample,
        unit: Option<&str>,
        command_id: Option<&str>,
    ) -> bool {
        let mut next = TagState {
            value: sample.value.clone(),
            quality: sample.quality,
            reason: sample.reason.clone(),
            ts_ms: sample.ts_ms,
            unit: unit.map(str::to_owned),
            command_id: command_id.map(str::to_owned),
        };
        match self.tags.get_mut(&sample.tag) {
            Some(cur) if cur.ts_ms > sample.ts_ms => false,
            Some(cur) => {
                if next.command_id.is_none() {
                    next.command_id.clone_from(&cur.command_id);
                }
                let changed = cur.value != next.value
                    || cur.quality != next.quality
                    || cur.reason != next.reason
                    || cur.command_id != next.command_id;
                *cur = next;
                if changed {
                    self.version += 1;
                }
                changed
            }
            None => {
                self.tags.insert(sample.tag.clone(), next);
                self.version += 1;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_increases_on_change_only() {
        let mut t = ReportedTwin::new("gw");
        assert!(t.apply(&Sample::good("a", Value::Int(1), 1), Some("m")));
        assert_eq!(t.version, 1);
        assert!(!t.apply(&Sample::good("a", Value::Int(1), 2), Some("m")));
        assert_eq!(t.version, 1);
        assert_eq!(t.tags["a"].ts_ms, 2);
        assert!(t.apply(&Sample::bad("a", "timeout", 3), Some("m")));
        assert_eq!(t.version, 2);
        // an older sample never overwrites a newer one
        assert!(!t.apply(&Sample::good("a", Value::Int(9), 1), None));
        assert_eq!(t.tags["a"].quality, Quality::Bad);
    }
}
