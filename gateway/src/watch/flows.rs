//! The command flow and the gateway's own connections, checked by the
//! downlink task:
//! - `commands_denied_burst`: one operator's commands denied 5 times within
//!   60 s (a probe of the policy, or a confused client);
//! - `commands_refused_burst`: 20 command messages refused before the
//!   policy (bad signatures, unknown keys, replays...) within 60 s;
//! - `commands_flood`: command messages dropped unread by the global rate
//!   limit or a full queue;
//! - `device_unreachable`: a device disconnected for 30 s (once per outage);
//! - `broker_connect_failures`: 3 failed broker connections within 60 s
//!   (TLS or authentication problems, an unreachable broker).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::json;
use twin_model::alert::Severity;

use super::alerts::{evidence, Alerts, Finding};
use crate::metrics::DeviceStats;
use crate::mqtt::LinkStats;

const WINDOW_MS: u64 = 60_000;
const DENIED_BURST: usize = 5;
const REFUSED_BURST: usize = 20;
const UNREACHABLE_MS: u64 = 30_000;
const CONNECT_FAILURES: usize = 3;

/// Keeps the events of the last minute; true when `limit` is reached.
fn within(q: &mut VecDeque<u64>, now_ms: u64, limit: usize) -> bool {
    q.push_back(now_ms);
    while q.front().is_some_and(|t| t + WINDOW_MS <= now_ms) {
        q.pop_front();
    }
    q.len() >= limit
}

pub struct FlowWatch {
    alerts: Alerts,
    denials: HashMap<String, VecDeque<u64>>,
    refusals: VecDeque<u64>,
    devices: Vec<(String, Arc<DeviceStats>)>,
    down_since: HashMap<String, u64>,
    alerted_down: HashSet<String>,
    link: Option<Arc<LinkStats>>,
    connect_failures_seen: u64,
    failures: VecDeque<u64>,
}

impl FlowWatch {
    pub fn new(
        alerts: Alerts,
        devices: Vec<(String, Arc<DeviceStats>)>,
        link: Option<Arc<LinkStats>>,
    ) -> Self {
        FlowWatch {
            alerts,
            denials: HashMap::new(),
            refusals: VecDeque::new(),
            devices,
            down_since: HashMap::new(),
            alerted_down: HashSet::new(),
            link,
            connect_failures_seen: 0,
            failures: VecDeque::new(),
        }
    }

    fn raise(
        &self,
        code: &'static str,
        subject: String,
        message: String,
        now_ms: u64,
        ev: std::collections::BTreeMap<String, serde_json::Value>,
    ) {
        self.alerts.raise(Finding {
            code,
            severity: Severity::High,
            subject,
            message,
            evidence: ev,
            at_ms: now_ms,
        });
    }

    /// A command of `operator` denied by the policy.
    pub fn denied(&mut self, operator: &str, code: &str, now_ms: u64) {
        if self.denials.len() > 10_000 && !self.denials.contains_key(operator) {
            self.denials
                .retain(|_, q| q.back().is_some_and(|t| t + WINDOW_MS > now_ms));
        }
        let q = self.denials.entry(operator.to_owned()).or_default();
        if within(q, now_ms, DENIED_BURST) {
            let n = q.len();
            self.raise(
                "commands_denied_burst",
                format!("operator:{operator}"),
                format!("{n} commands of {operator} denied within 60 s (latest: {code})"),
                now_ms,
                evidence([
                    ("denied", json!(n)),
                    ("window_s", json!(60)),
                    ("latest_code", json!(code)),
                ]),
            );
        }
    }

    /// A command message refused before the policy.
    pub fn refused(&mut self, code: &str, now_ms: u64) {
        if within(&mut self.refusals, now_ms, REFUSED_BURST) {
            let n = self.refusals.len();
            self.raise(
                "commands_refused_burst",
                "gateway".into(),
                format!("{n} command messages refused within 60 s (latest: {code})"),
                now_ms,
                evidence([
                    ("refused", json!(n)),
                    ("window_s", json!(60)),
                    ("latest_code", json!(code)),
                ]),
            );
        }
    }

    /// Command messages dropped unread.
    pub fn dropped(&mut self, code: &str, count: u64, now_ms: u64) {
        self.raise(
            "commands_flood",
            "gateway".into(),
            format!("{count} command messages dropped unread ({code})"),
            now_ms,
            evidence([("dropped", json!(count)), ("code", json!(code))]),
        );
    }

    /// Connection checks, once a second.
    pub fn tick(&mut self, now_ms: u64) {
        for (name, stats) in &self.devices {
            if stats.connected.load(Ordering::Relaxed) {
                self.down_since.remove(name);
                self.alerted_down.remove(name);
                continue;
            }
            let since = *self.down_since.entry(name.clone()).or_insert(now_ms);
            if now_ms.saturating_sub(since) >= UNREACHABLE_MS
                && self.alerted_down.insert(name.clone())
            {
                self.raise(
                    "device_unreachable",
                    format!("device:{name}"),
                    format!(
                        "device {name} has been unreachable for {} s",
                        (now_ms - since) / 1000
                    ),
                    now_ms,
                    evidence([
                        ("down_s", json!((now_ms - since) / 1000)),
                        ("errors", json!(stats.errors.load(Ordering::Relaxed))),
                    ]),
                );
            }
        }
        if let Some(link) = &self.link {
            let failures = link.connect_failures.load(Ordering::Relaxed);
            let new = failures.saturating_sub(self.connect_failures_seen);
            self.connect_failures_seen = failures;
            for _ in 0..new.min(CONNECT_FAILURES as u64) {
                if within(&mut self.failures, now_ms, CONNECT_FAILURES) {
                    let n = self.failures.len();
                    self.raise(
                        "broker_connect_failures",
                        "gateway".into(),
                        format!("{n} broker connections failed within 60 s"),
                        now_ms,
                        evidence([("failures", json!(n)), ("window_s", json!(60))]),
                    );
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[test]
    fn bursts_of_denials_and_refusals_and_a_long_outage_raise_their_codes() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let dev = Arc::new(DeviceStats::default());
        dev.connected.store(true, Ordering::Relaxed);
        let mut w = FlowWatch::new(Alerts::new(tx), vec![("plc1".into(), dev.clone())], None);
        let codes = |rx: &mut mpsc::UnboundedReceiver<Finding>| {
            let mut v = Vec::new();
            while let Ok(f) = rx.try_recv() {
                v.push((f.code, f.subject));
            }
            v
        };
        // Normal use: a denial now and then, the device up.
        for i in 0..10u64 {
            w.denied("alice", "no_rule", i * 30_000);
            w.tick(i * 30_000);
        }
        assert!(codes(&mut rx).is_empty());
        // A burst from one operator.
        for i in 0..5u64 {
            w.denied("mallory", "role", 1_000_000 + i * 1000);
        }
        assert_eq!(
            codes(&mut rx),
            vec![("commands_denied_burst", "operator:mallory".to_string())]
        );
        // Forged messages.
        for i in 0..20u64 {
            w.refused("bad_signature", 2_000_000 + i * 100);
        }
        assert_eq!(
            codes(&mut rx),
            vec![("commands_refused_burst", "gateway".to_string())]
        );
        // A device down for 30 s: once.
        dev.connected.store(false, Ordering::Relaxed);
        for s in 0..60u64 {
            w.tick(3_000_000 + s * 1000);
        }
        assert_eq!(
            codes(&mut rx),
            vec![("device_unreachable", "device:plc1".to_string())]
        );
    }
}
