//! The reported twin: latest state per tag, signed at most every
//! `reported_interval_ms`, published retained.

use crate::clock::now_ms;
use crate::mqtt::{Outgoing, OutgoingKind};
use std::collections::HashMap;
use twin_model::twin::REPORTED_TYP;
use twin_model::{ReportedTwin, Sample, SigningKey};

pub struct Reporter {
    twin: ReportedTwin,
    units: HashMap<String, String>,
    key: std::sync::Arc<SigningKey>,
    topic: String,
    published_version: u64,
    max_message_bytes: usize,
    warned_size: bool,
}

impl Reporter {
    /// `version` continues the persisted version so it never goes back.
    pub fn new(
        gateway_id: &str,
        version: u64,
        units: HashMap<String, String>,
        key: std::sync::Arc<SigningKey>,
        topic: String,
        max_message_bytes: usize,
    ) -> Self {
        let mut twin = ReportedTwin::new(gateway_id);
        twin.version = version;
        Reporter {
            twin,
            units,
            key,
            topic,
            published_version: version,
            max_message_bytes,
            warned_size: false,
        }
    }

    pub fn apply(&mut self, s: &Sample) {
        let unit = self.units.get(&s.tag).map(String::as_str);
        self.twin.apply(s, unit);
    }

    /// Applies the read-back of a confirmed command write: the tag names
    /// the command from now on.
    pub fn apply_command(&mut self, s: &Sample, command_id: &str) {
        let unit = self.units.get(&s.tag).map(String::as_str);
        self.twin.apply_command(s, unit, Some(command_id));
    }

    pub fn version(&self) -> u64 {
        self.twin.version
    }

    pub fn twin(&self) -> &ReportedTwin {
        &self.twin
    }

    /// A signed, retained reported twin if anything changed since the last one.
    pub fn sign_if_changed(&mut self, seq: u64) -> Option<Outgoing> {
        if self.twin.version == self.published_version {
            return None;
        }
        self.twin.seq = seq;
        self.twin.updated_ms = now_ms();
        let json = serde_json::to_vec(&self.twin).expect("reported twin serializes");
        let jws = self.key.sign_compact(REPORTED_TYP, &json);
        if jws.len() + self.topic.len() + 16 > self.max_message_bytes {
            if !self.warned_size {
                tracing::error!(
                    bytes = jws.len(),
                    limit = self.max_message_bytes,
                    "the reported twin is larger than mqtt.max_message_bytes and is not published; telemetry batches are unaffected"
                );
                self.warned_size = true;
            }
            self.published_version = self.twin.version;
            return None;
        }
        self.published_version = self.twin.version;
        Some(Outgoing {
            topic: self.topic.clone(),
            payload: jws.into_bytes(),
            retain: true,
            kind: OutgoingKind::Reported {
                version: self.twin.version,
            },
        })
    }
}
