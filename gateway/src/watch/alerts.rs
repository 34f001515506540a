//! Findings and their summaries.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::sync::mpsc;
use twin_model::alert::{Alert, Severity};

/// One observation of something wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Stable code, e.g. `sensor_out_of_range`.
    pub code: &'static str,
    pub severity: Severity,
    /// `tag:<name>`, `device:<name>`, `operator:<sub>` or `gateway`.
    pub subject: String,
    pub message: String,
    pub evidence: BTreeMap<String, serde_json::Value>,
    /// When it was observed, ms since the Unix epoch.
    pub at_ms: u64,
}

/// Where findings are sent (cheap to clone; does nothing when unset).
#[derive(Debug, Clone, Default)]
pub struct Alerts(Option<mpsc::UnboundedSender<Finding>>);

impl Alerts {
    pub fn new(tx: mpsc::UnboundedSender<Finding>) -> Self {
        Alerts(Some(tx))
    }

    pub fn raise(&self, f: Finding) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(f);
        }
    }
}

/// Evidence from name/value pairs.
pub fn evidence<const N: usize>(
    pairs: [(&str, serde_json::Value); N],
) -> BTreeMap<String, serde_json::Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

struct Open {
    latest: Finding,
    first_ms: u64,
    /// Occurrences not yet reported.
    unsent: u64,
    /// When the window of this (code, subject) ends.
    until_ms: u64,
}

/// Summarises repeats: the first finding of a (code, subject) is an alert
/// at once; later ones within `window` are counted and become one summary
/// alert when the window ends.
pub struct Summarizer {
    gateway_id: String,
    window_ms: u64,
    open: HashMap<(&'static str, String), Open>,
}

impl Summarizer {
    pub fn new(gateway_id: &str, window: Duration) -> Self {
        Summarizer {
            gateway_id: gateway_id.to_owned(),
            window_ms: window.as_millis() as u64,
            open: HashMap::new(),
        }
    }

    fn alert(&self, f: &Finding, count: u64, first_ms: u64) -> Alert {
        Alert {
            v: twin_model::WIRE_VERSION,
            gateway_id: self.gateway_id.clone(),
            code: f.code.to_owned(),
            severity: f.severity,
            subject: f.subject.clone(),
            message: f.message.clone(),
            evidence: f.evidence.clone(),
            count,
            first_ms,
            last_ms: f.at_ms,
        }
    }

    /// A finding: the alert to send now, if it is the first of its window.
    pub fn push(&mut self, f: Finding) -> Option<Alert> {
        let key = (f.code, f.subject.clone());
        if let Some(open) = self.open.get_mut(&key) {
            open.unsent += 1;
            if open.unsent == 1 {
                open.first_ms = f.at_ms;
            }
            open.latest = f;
            return None;
        }
        let alert = self.alert(&f, 1, f.at_ms);
        self.open.insert(
            key,
            Open {
                until_ms: f.at_ms.saturating_add(self.window_ms),
                first_ms: f.at_ms,
                unsent: 0,
                latest: f,
            },
        );
        Some(alert)
    }

    /// Summaries of the windows that ended by `now_ms`; a window without
    /// repeats just closes (the next finding is again sent at once).
    pub fn flush(&mut self, now_ms: u64) -> Vec<Alert> {
        let mut out = Vec::new();
        let mut reopened = Vec::new();
        let ended: Vec<_> = self
            .open
            .iter()
            .filter(|(_, o)| o.until_ms <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for key in ended {
            let Some(o) = self.open.remove(&key) else {
                continue;
            };
            if o.unsent > 0 {
                out.push(self.alert(&o.latest, o.unsent, o.first_ms));
                // Still going: keep summarising instead of alerting at once.
                reopened.push((
                    key,
                    Open {
                        until_ms: now_ms.saturating_add(self.window_ms),
                        first_ms: now_ms,
                        unsent: 0,
                        latest: o.latest,
                    },
                ));
            }
        }
        self.open.extend(reopened);
        out.sort_by(|a, b| (a.first_ms, &a.code).cmp(&(b.first_ms, &b.code)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(code: &'static str, subject: &str, at_ms: u64) -> Finding {
        Finding {
            code,
            severity: Severity::Medium,
            subject: subject.into(),
            message: "m".into(),
            evidence: BTreeMap::new(),
            at_ms,
        }
    }

    #[test]
    fn the_first_finding_is_sent_at_once_and_repeats_are_summarised() {
        let mut s = Summarizer::new("gw", Duration::from_secs(60));
        let first = s.push(f("c", "tag:a", 1_000)).expect("first at once");
        assert_eq!((first.count, first.first_ms), (1, 1_000));
        assert!(s.push(f("c", "tag:b", 1_001)).is_some(), "another subject");
        for t in 0..100 {
            assert!(s.push(f("c", "tag:a", 2_000 + t)).is_none());
        }
        assert!(s.flush(30_000).is_empty(), "window not over");
        let summary = s.flush(61_000);
        assert_eq!(summary.len(), 1, "tag:b had no repeats: {summary:?}");
        assert_eq!(
            (summary[0].count, summary[0].first_ms, summary[0].last_ms),
            (100, 2_000, 2_099)
        );
        // Quiet for a window: the next one is again sent at once.
        assert!(s.flush(200_000).is_empty());
        assert!(s.push(f("c", "tag:a", 300_000)).is_some());
    }
}
