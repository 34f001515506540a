//! Watching the twin: every message verified, every anomaly reported.

use std::collections::BTreeMap;
use twin_model::gap::{GapRecord, GAP_TYP};
use twin_model::status::{Status, STATUS_TYP};
use twin_model::topics;
use twin_model::twin::REPORTED_TYP;
use twin_model::{ChainVerifier, Continuity, Quality, ReportedTwin, TrustStore, Value};

/// Latest state of one tag as seen by the watcher.
#[derive(Debug, Clone, PartialEq)]
pub struct TagView {
    pub value: Option<Value>,
    pub quality: Quality,
    pub reason: Option<String>,
    pub ts_ms: u64,
}

/// What the watcher knows of one gateway.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayView {
    pub tags: BTreeMap<String, TagView>,
    pub latest_seq: u64,
    pub batches: u64,
    pub points: u64,
    pub duplicates: u64,
    /// Missing sequence ranges reported so far, `(from, to)` inclusive.
    pub gaps: Vec<(u64, u64)>,
    pub rejected: u64,
    /// The latest verified reported twin.
    pub reported: Option<ReportedTwin>,
    pub status: Option<Status>,
    /// Verified gap records, by gap id: batches the gateway dropped, and why.
    pub gap_records: BTreeMap<u64, GapRecord>,
    /// Points of every batch received (for exact loss accounting).
    pub batch_points: std::collections::HashMap<u64, u64>,
}

impl GatewayView {
    /// Number of batches reported missing.
    pub fn missing(&self) -> u64 {
        self.gaps.iter().map(|(a, b)| b - a + 1).sum()
    }

    fn accounted(&self, seq: u64) -> bool {
        self.gap_records.values().any(|g| g.contains(seq))
    }

    /// Missing batches that no gap record accounts for: lost without
    /// explanation, or not yet arrived.
    pub fn unexplained(&self) -> u64 {
        self.gaps
            .iter()
            .map(|&(a, b)| (a..=b).filter(|s| !self.accounted(*s)).count() as u64)
            .sum()
    }

    /// Points the gateway dropped and accounted for, less any of those
    /// batches that arrived after all (e.g. delivered just before the drop).
    /// `None` when a gap record does not know its points.
    pub fn lost_points(&self) -> Option<u64> {
        let mut total = 0u64;
        for g in self.gap_records.values() {
            total += g.points?;
        }
        let arrived: u64 = self
            .batch_points
            .iter()
            .filter(|(seq, _)| self.accounted(**seq))
            .map(|(_, p)| *p)
            .sum();
        Some(total.saturating_sub(arrived))
    }
}

/// One thing the watcher saw.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Batch {
        gateway: String,
        seq: u64,
        points: usize,
        continuity: Continuity,
    },
    Reported {
        gateway: String,
        version: u64,
    },
    /// A verified gap record: batches dropped and accounted for.
    Gap {
        gateway: String,
        record: GapRecord,
    },
    Status {
        gateway: String,
        status: Status,
    },
    /// A message that failed verification: never applied to the twin.
    Rejected {
        topic: String,
        code: String,
        message: String,
    },
    /// A message on a topic the watcher does not know.
    Ignored {
        topic: String,
    },
}

impl WatchEvent {
    /// Whether a person should be alerted.
    pub fn is_alarm(&self) -> bool {
        matches!(self, WatchEvent::Rejected { .. } | WatchEvent::Gap { .. })
            || matches!(
                self,
                WatchEvent::Batch {
                    continuity: Continuity::Gap { .. },
                    ..
                }
            )
    }
}

/// Verifies and folds messages into per-gateway views.
pub struct Watcher {
    prefix: String,
    trust: TrustStore,
    chain: ChainVerifier,
    pub gateways: BTreeMap<String, GatewayView>,
    /// Messages refused, across gateways (including ones whose gateway is unknown).
    pub rejected: u64,
}

impl Watcher {
    pub fn new(prefix: &str, trust: TrustStore) -> Self {
        Watcher {
            prefix: prefix.into(),
            chain: ChainVerifier::new(trust.clone()),
            trust,
            gateways: BTreeMap::new(),
            rejected: 0,
        }
    }

    /// Remember the hashes of the last `window` batches per gateway (older
    /// sequence numbers are refused as replays).
    pub fn with_window(mut self, window: usize) -> Self {
        self.chain = self.chain.with_window(window);
        self
    }

    /// Accept batches of `gateway` only when signed with key `kid`.
    pub fn pin(&mut self, gateway: &str, kid: &str) {
        self.chain.pin(gateway, kid);
    }

    pub fn view(&self, gateway: &str) -> Option<&GatewayView> {
        self.gateways.get(gateway)
    }

    fn reject(
        &mut self,
        topic: &str,
        gateway: Option<&str>,
        code: &str,
        message: String,
    ) -> WatchEvent {
        self.rejected += 1;
        if let Some(gw) = gateway {
            self.gateways.entry(gw.to_owned()).or_default().rejected += 1;
        }
        WatchEvent::Rejected {
            topic: topic.into(),
            code: code.into(),
            message,
        }
    }

    /// Verifies one message and applies it.
    pub fn handle(&mut self, topic: &str, payload: &[u8]) -> WatchEvent {
        let Some((gw, kind)) = topics::parse(&self.prefix, topic) else {
            return WatchEvent::Ignored {
                topic: topic.into(),
            };
        };
        let gw = gw.to_owned();
        match kind {
            topics::TELEMETRY => match self.chain.verify(payload) {
                Ok(b) => {
                    if b.payload.gateway_id != gw {
                        return self.reject(
                            topic,
                            Some(&gw),
                            "wrong_topic",
                            format!(
                                "batch of gateway {:?} on the topic of {gw:?}",
                                b.payload.gateway_id
                            ),
                        );
                    }
                    let view = self.gateways.entry(gw.clone()).or_default();
                    if let Continuity::Gap { from, to } = b.continuity {
                        if from <= view.latest_seq {
                            // A late arrival fills part of a reported gap.
                            shrink_gaps(&mut view.gaps, from);
                        } else {
                            view.gaps.push((from, to));
                        }
                    }
                    if b.continuity == Continuity::Duplicate {
                        view.duplicates += 1;
                    } else {
                        view.batches += 1;
                        view.points += b.payload.samples.len() as u64;
                        view.batch_points
                            .insert(b.payload.seq, b.payload.samples.len() as u64);
                        view.latest_seq = view.latest_seq.max(b.payload.seq);
                        for s in &b.payload.samples {
                            let newer = view.tags.get(&s.tag).is_none_or(|t| t.ts_ms <= s.ts_ms);
                            if newer {
                                view.tags.insert(
                                    s.tag.clone(),
                                    TagView {
                                        value: s.value.clone(),
                                        quality: s.quality,
                                        reason: s.reason.clone(),
                                        ts_ms: s.ts_ms,
                                    },
                                );
                            }
                        }
                    }
                    WatchEvent::Batch {
                        gateway: gw,
                        seq: b.payload.seq,
                        points: b.payload.samples.len(),
                        continuity: b.continuity,
                    }
                }
                Err(e) => self.reject(topic, Some(&gw), e.code(), e.to_string()),
            },
            topics::REPORTED => {
                let parsed = verify_json::<ReportedTwin>(
                    &self.trust,
                    payload,
                    REPORTED_TYP,
                    twin_model::MAX_MESSAGE_BYTES,
                );
                match parsed {
                    Ok(t) if t.gateway_id == gw => {
                        let held = self
                            .gateways
                            .get(&gw)
                            .and_then(|v| v.reported.as_ref())
                            .map_or(0, |r| r.version);
                        if held > t.version {
                            let message = format!("reported twin version {} is older than the version {held} already held", t.version);
                            return self.reject(topic, Some(&gw), "stale_version", message);
                        }
                        let version = t.version;
                        self.gateways.entry(gw.clone()).or_default().reported = Some(t);
                        WatchEvent::Reported {
                            gateway: gw,
                            version,
                        }
                    }
                    Ok(t) => self.reject(
                        topic,
                        Some(&gw),
                        "wrong_topic",
                        format!("twin of gateway {:?} on the topic of {gw:?}", t.gateway_id),
                    ),
                    Err((code, message)) => self.reject(topic, Some(&gw), &code, message),
                }
            }
            topics::STATUS => {
                let parsed = verify_json::<Status>(&self.trust, payload, STATUS_TYP, 64 * 1024);
                match parsed {
                    Ok(s) if s.gateway_id == gw => {
                        self.gateways.entry(gw.clone()).or_default().status = Some(s.clone());
                        WatchEvent::Status {
                            gateway: gw,
                            status: s,
                        }
                    }
                    Ok(s) => self.reject(
                        topic,
                        Some(&gw),
                        "wrong_topic",
                        format!(
                            "status of gateway {:?} on the topic of {gw:?}",
                            s.gateway_id
                        ),
                    ),
                    Err((code, message)) => self.reject(topic, Some(&gw), &code, message),
                }
            }
            topics::GAPS => {
                let parsed = verify_json::<GapRecord>(&self.trust, payload, GAP_TYP, 1024 * 1024);
                match parsed {
                    Ok(g) if g.gateway_id == gw => {
                        self.gateways
                            .entry(gw.clone())
                            .or_default()
                            .gap_records
                            .insert(g.gap_id, g.clone());
                        WatchEvent::Gap {
                            gateway: gw,
                            record: g,
                        }
                    }
                    Ok(g) => self.reject(
                        topic,
                        Some(&gw),
                        "wrong_topic",
                        format!(
                            "gap record of gateway {:?} on the topic of {gw:?}",
                            g.gateway_id
                        ),
                    ),
                    Err((code, message)) => self.reject(topic, Some(&gw), &code, message),
                }
            }
            _ => WatchEvent::Ignored {
                topic: topic.into(),
            },
        }
    }
}

/// Verifies a signed message of type `typ` and parses its JSON payload;
/// on failure, the reason code and message. Every signed message the
/// operator tool reads (twin, status, gap records, command results) goes
/// through here.
pub fn verify_json<T: serde::de::DeserializeOwned>(
    trust: &TrustStore,
    payload: &[u8],
    typ: &str,
    max_len: usize,
) -> Result<T, (String, String)> {
    let jws = trust
        .verify_compact(payload, typ, max_len)
        .map_err(|e| (e.code().to_owned(), e.to_string()))?;
    serde_json::from_slice(&jws.payload).map_err(|e| ("bad_payload".to_owned(), e.to_string()))
}

fn shrink_gaps(gaps: &mut Vec<(u64, u64)>, seq: u64) {
    let mut out = Vec::with_capacity(gaps.len() + 1);
    for &(a, b) in gaps.iter() {
        if seq < a || seq > b {
            out.push((a, b));
        } else {
            if a < seq {
                out.push((a, seq - 1));
            }
            if seq < b {
                out.push((seq + 1, b));
            }
        }
    }
    *gaps = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_messages_build_the_twin() {
        let mut trust = TrustStore::new();
        trust.add(twin_model::golden::key().public_key());
        let mut w = Watcher::new("twin", trust);
        for (_, jws) in twin_model::golden::batches() {
            let ev = w.handle("twin/plant1-gw1/telemetry", jws.as_bytes());
            assert!(matches!(ev, WatchEvent::Batch { .. }), "{ev:?}");
        }
        let (_, rep) = twin_model::golden::reported();
        assert!(matches!(
            w.handle("twin/plant1-gw1/reported", rep.as_bytes()),
            WatchEvent::Reported { version: 8, .. }
        ));
        let v = w.view("plant1-gw1").unwrap();
        assert_eq!(v.tags["tank1.level"].value, Some(Value::Float(2.625)));
        assert_eq!(v.points, 8);
        // The same batch on another gateway's topic is refused.
        let (_, b1) = &twin_model::golden::batches()[0];
        assert!(w.handle("twin/other/telemetry", b1.as_bytes()).is_alarm());
    }

    #[test]
    fn late_arrival_shrinks_a_gap() {
        let mut g = vec![(2, 5)];
        shrink_gaps(&mut g, 3);
        assert_eq!(g, vec![(2, 2), (4, 5)]);
    }
}
