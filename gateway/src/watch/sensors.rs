//! Plausibility of sensor values, per tag, as configured in the tag's
//! `check` table. Runs in the uplink before signing: flags are set on the
//! sample (inside the signature) and findings go to the alerts.
//!
//! Checks on numeric values of good or uncertain samples, in this order:
//! - range: outside `min .. max` -> `out_of_range` / `sensor_out_of_range`;
//! - rate: more than `max_rate_per_s` since the previous value ->
//!   `rate_of_change` / `sensor_rate_of_change`;
//! - flatline: a value that has moved before, then stays exactly the same
//!   for `flatline_s` -> `flatline` / `sensor_flatline` (once per episode);
//! - baseline: after `baseline_warmup` samples, further than
//!   `baseline_sigma` standard deviations from the exponentially weighted
//!   mean (one per hour of the day with `baseline_per_hour`) -> `outlier` /
//!   `sensor_outlier`; outliers do not update the baseline;
//! - stale (any value type): no good sample for `stale_s` -> `sensor_stale`
//!   (once per episode), checked by [`SensorWatch::tick`].
//!
//! Tags read by an OPC UA subscription get a sample only when their value
//! changes. For them ([`SensorWatch::with_liveness`]) a value whose last
//! sample was good stays current while the device's session stands (the
//! driver refreshes `DeviceStats::last_seen_ms` every publishing
//! interval): it is not stale, and [`SensorWatch::tick`] raises
//! `sensor_flatline` when it has not changed for `flatline_s` (no sample
//! arrives to carry the flag).

use std::collections::{BTreeMap, HashMap};

use serde_json::json;
use twin_model::alert::Severity;
use twin_model::sample::flag;
use twin_model::{Quality, Sample};

use super::alerts::{evidence, Alerts, Finding};
use crate::config::TagChecks;

/// Exponentially weighted mean and variance.
#[derive(Debug, Clone, Default)]
struct Baseline {
    n: u64,
    mean: f64,
    var: f64,
}

impl Baseline {
    fn learn(&mut self, x: f64, warmup: u64) {
        self.n += 1;
        // Plain running mean while warming up, then a window of about
        // `warmup` samples.
        let alpha = 1.0 / (self.n.min(warmup.max(1)) as f64);
        let d = x - self.mean;
        self.mean += alpha * d;
        self.var = (1.0 - alpha) * (self.var + alpha * d * d);
    }

    fn std(&self) -> f64 {
        // A perfectly constant signal still tolerates rounding.
        self.var.sqrt().max(1e-9 * self.mean.abs().max(1.0))
    }
}

#[derive(Debug)]
struct TagWatch {
    checks: TagChecks,
    previous: Option<(f64, u64)>,
    /// Since when the value has not changed, and whether it ever did.
    unchanged_since: Option<u64>,
    moved: bool,
    flat: bool,
    last_good_ms: Option<u64>,
    /// Whether the latest sample was good or uncertain.
    good_now: bool,
    stale: bool,
    baselines: Vec<Baseline>,
    /// For tags that get samples only on change: the device's liveness.
    alive: Option<std::sync::Arc<crate::metrics::DeviceStats>>,
    /// Since when every value has been an outlier.
    outlier_since: Option<u64>,
}

/// The sensor checks of every tag that has a `check` table.
#[derive(Debug)]
pub struct SensorWatch {
    tags: HashMap<String, TagWatch>,
    alerts: Alerts,
}

fn raise(
    alerts: &Alerts,
    code: &'static str,
    tag: &str,
    message: String,
    at_ms: u64,
    ev: BTreeMap<String, serde_json::Value>,
) {
    alerts.raise(Finding {
        code,
        severity: match code {
            "sensor_stale" => Severity::High,
            "sensor_baseline_relearned" => Severity::Low,
            _ => Severity::Medium,
        },
        subject: format!("tag:{tag}"),
        message,
        evidence: ev,
        at_ms,
    });
}

impl SensorWatch {
    /// Watches the tags of `checks`; `now_ms` starts the stale clocks.
    pub fn new(checks: &BTreeMap<String, TagChecks>, alerts: Alerts, now_ms: u64) -> Self {
        let tags = checks
            .iter()
            .map(|(name, c)| {
                let n = c
                    .baseline
                    .as_ref()
                    .map_or(0, |b| if b.per_hour { 24 } else { 1 });
                (
                    name.clone(),
                    TagWatch {
                        checks: c.clone(),
                        previous: None,
                        unchanged_since: None,
                        moved: false,
                        flat: false,
                        last_good_ms: Some(now_ms),
                        good_now: false,
                        stale: false,
                        baselines: vec![Baseline::default(); n],
                        alive: None,
                        outlier_since: None,
                    },
                )
            })
            .collect();
        SensorWatch { tags, alerts }
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Tags that get samples only when they change (OPC UA subscriptions),
    /// with the counters of their device.
    pub fn with_liveness(
        mut self,
        tags: impl IntoIterator<Item = (String, std::sync::Arc<crate::metrics::DeviceStats>)>,
    ) -> Self {
        for (tag, stats) in tags {
            if let Some(w) = self.tags.get_mut(&tag) {
                w.alive = Some(stats);
            }
        }
        self
    }

    /// Checks one sample, adding its flags.
    pub fn check(&mut self, s: &mut Sample) {
        let Some(w) = self.tags.get_mut(&s.tag) else {
            return;
        };
        if s.quality == Quality::Bad {
            w.good_now = false;
            return;
        }
        w.good_now = true;
        w.last_good_ms = Some(w.last_good_ms.map_or(s.ts_ms, |l| l.max(s.ts_ms)));
        if w.stale {
            w.stale = false;
        }
        let Some(x) = s.value.as_ref().and_then(|v| v.as_f64()) else {
            return;
        };
        let at = s.ts_ms;
        let c = &w.checks;
        let mut flags = Vec::new();
        if c.min.is_some_and(|lo| x < lo) || c.max.is_some_and(|hi| x > hi) {
            flags.push(flag::OUT_OF_RANGE);
            raise(
                &self.alerts,
                "sensor_out_of_range",
                &s.tag,
                format!("{} = {x} is outside its engineering range", s.tag),
                at,
                evidence([
                    ("value", json!(x)),
                    ("min", json!(c.min)),
                    ("max", json!(c.max)),
                ]),
            );
        }
        if let (Some(max), Some((prev, prev_ts))) = (c.max_rate_per_s, w.previous) {
            let dt = at.saturating_sub(prev_ts) as f64 / 1000.0;
            if dt > 0.0 {
                let rate = (x - prev).abs() / dt;
                if rate > max {
                    flags.push(flag::RATE_OF_CHANGE);
                    raise(
                        &self.alerts,
                        "sensor_rate_of_change",
                        &s.tag,
                        format!("{} changed at {rate:.3}/s, faster than {max}/s", s.tag),
                        at,
                        evidence([
                            ("value", json!(x)),
                            ("previous", json!(prev)),
                            ("rate_per_s", json!(rate)),
                            ("max_rate_per_s", json!(max)),
                        ]),
                    );
                }
            }
        }
        let changed = w.previous.is_none_or(|(p, _)| p != x);
        if changed {
            if w.previous.is_some() {
                w.moved = true;
            }
            w.unchanged_since = Some(at);
            w.flat = false;
        } else if let (Some(limit), Some(since)) = (c.flatline, w.unchanged_since) {
            let for_ms = at.saturating_sub(since);
            if w.moved && for_ms >= limit.as_millis() as u64 {
                flags.push(flag::FLATLINE);
                if !w.flat {
                    w.flat = true;
                    raise(
                        &self.alerts,
                        "sensor_flatline",
                        &s.tag,
                        format!(
                            "{} has stayed at {x} for {} s although it moved before",
                            s.tag,
                            for_ms / 1000
                        ),
                        at,
                        evidence([
                            ("value", json!(x)),
                            ("unchanged_s", json!(for_ms / 1000)),
                            ("flatline_s", json!(limit.as_secs())),
                        ]),
                    );
                }
            }
        }
        if let Some(b) = &c.baseline {
            let i = if b.per_hour {
                ((at / 3_600_000) % 24) as usize
            } else {
                0
            };
            if let Some(base) = w.baselines.get_mut(i) {
                let mut outlier =
                    base.n >= b.warmup && (x - base.mean).abs() > b.sigma * base.std();
                if !outlier {
                    w.outlier_since = None;
                } else {
                    let since = *w.outlier_since.get_or_insert(at);
                    if let Some(relearn) = b.relearn {
                        let for_ms = at.saturating_sub(since);
                        if for_ms >= relearn.as_millis() as u64 {
                            // A lasting new operating point: learn it.
                            raise(
                                &self.alerts,
                                "sensor_baseline_relearned",
                                &s.tag,
                                format!(
                                    "{} has been far from its baseline for {} s; the baseline is learned again from the new values",
                                    s.tag,
                                    for_ms / 1000
                                ),
                                at,
                                evidence([
                                    ("value", json!(x)),
                                    ("old_mean", json!(base.mean)),
                                    ("old_std", json!(base.std())),
                                    ("outlier_s", json!(for_ms / 1000)),
                                ]),
                            );
                            *base = Baseline::default();
                            w.outlier_since = None;
                            outlier = false;
                        }
                    }
                }
                if outlier {
                    flags.push(flag::OUTLIER);
                    raise(
                        &self.alerts,
                        "sensor_outlier",
                        &s.tag,
                        format!("{} = {x} is far from its learned baseline", s.tag),
                        at,
                        evidence([
                            ("value", json!(x)),
                            ("mean", json!(base.mean)),
                            ("std", json!(base.std())),
                            ("sigma", json!(b.sigma)),
                        ]),
                    );
                } else {
                    base.learn(x, b.warmup);
                }
            }
        }
        w.previous = Some((x, at));
        s.flags.extend(flags.into_iter().map(str::to_owned));
    }

    /// Stale checks at `now_ms` (and flatline for tags with liveness).
    pub fn tick(&mut self, now_ms: u64) {
        for (tag, w) in &mut self.tags {
            if let (true, Some(stats)) = (w.good_now, &w.alive) {
                let alive = stats
                    .last_seen_ms
                    .load(std::sync::atomic::Ordering::Relaxed);
                if w.last_good_ms.is_some_and(|l| alive > l) {
                    w.last_good_ms = Some(alive);
                    w.stale = false;
                }
                Self::flat_while_alive(&self.alerts, tag, w, alive);
            }
            let (Some(limit), Some(last)) = (w.checks.stale, w.last_good_ms) else {
                continue;
            };
            let age = now_ms.saturating_sub(last);
            if !w.stale && age >= limit.as_millis() as u64 {
                w.stale = true;
                raise(
                    &self.alerts,
                    "sensor_stale",
                    tag,
                    format!("{tag} has had no good value for {} s", age / 1000),
                    now_ms,
                    evidence([
                        ("age_s", json!(age / 1000)),
                        ("stale_s", json!(limit.as_secs())),
                    ]),
                );
            }
        }
    }
}

impl SensorWatch {
    /// A value that gets no new sample while its device is alive: flat
    /// once `flatline_s` have passed since it last changed.
    fn flat_while_alive(alerts: &Alerts, tag: &str, w: &mut TagWatch, alive_ms: u64) {
        let (Some(limit), Some(since), Some((x, _))) =
            (w.checks.flatline, w.unchanged_since, w.previous)
        else {
            return;
        };
        let for_ms = alive_ms.saturating_sub(since);
        if w.moved && !w.flat && for_ms >= limit.as_millis() as u64 {
            w.flat = true;
            raise(
                alerts,
                "sensor_flatline",
                tag,
                format!(
                    "{tag} has stayed at {x} for {} s although it moved before (no change reported by the subscription)",
                    for_ms / 1000
                ),
                alive_ms,
                evidence([
                    ("value", json!(x)),
                    ("unchanged_s", json!(for_ms / 1000)),
                    ("flatline_s", json!(limit.as_secs())),
                ]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BaselineCheck;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use twin_model::Value;

    fn watch(c: TagChecks) -> (SensorWatch, mpsc::UnboundedReceiver<Finding>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let checks = BTreeMap::from([("t".to_string(), c)]);
        (SensorWatch::new(&checks, Alerts::new(tx), 0), rx)
    }

    /// Replays `trace` (value per 100 ms), returns the flags per sample and
    /// the alert codes raised.
    fn replay(
        w: &mut SensorWatch,
        rx: &mut mpsc::UnboundedReceiver<Finding>,
        trace: &[f64],
    ) -> (Vec<Vec<String>>, Vec<&'static str>) {
        let mut flags = Vec::new();
        for (i, x) in trace.iter().enumerate() {
            let mut s = Sample::good("t", Value::Float(*x), 1_000_000 + i as u64 * 100);
            w.check(&mut s);
            w.tick(s.ts_ms);
            flags.push(s.flags);
        }
        let mut codes = Vec::new();
        while let Ok(f) = rx.try_recv() {
            codes.push(f.code);
        }
        (flags, codes)
    }

    /// A plausible level: a slow wave with a little noise.
    fn level(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| 2.5 + 0.5 * (i as f64 / 50.0).sin() + 0.001 * ((i * 7919) % 13) as f64)
            .collect()
    }

    fn all_checks() -> TagChecks {
        TagChecks {
            min: Some(0.0),
            max: Some(5.0),
            max_rate_per_s: Some(1.0),
            flatline: Some(Duration::from_secs(10)),
            stale: Some(Duration::from_secs(5)),
            baseline: Some(BaselineCheck {
                sigma: 8.0,
                warmup: 100,
                per_hour: false,
                relearn: None,
            }),
        }
    }

    #[test]
    fn a_subscription_value_that_does_not_change_is_current_while_the_session_stands_and_flat_after_flatline_s(
    ) {
        use crate::metrics::DeviceStats;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let stats = Arc::new(DeviceStats::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let checks = BTreeMap::from([("t".to_string(), all_checks())]);
        let mut w = SensorWatch::new(&checks, Alerts::new(tx), 0)
            .with_liveness([("t".to_string(), stats.clone())]);
        let codes = |rx: &mut mpsc::UnboundedReceiver<Finding>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|f| f.code)
                .collect::<Vec<_>>()
        };
        // Changes for a while, then none: the session keeps standing.
        let mut t = 1_000_000;
        for x in [2.5, 2.6, 2.7] {
            w.check(&mut Sample::good("t", Value::Float(x), t));
            t += 1000;
        }
        for _ in 0..8 {
            stats.last_seen_ms.store(t, Ordering::Relaxed);
            w.tick(t);
            t += 1000;
        }
        assert!(codes(&mut rx).is_empty(), "not stale: the session stands");
        for _ in 0..4 {
            stats.last_seen_ms.store(t, Ordering::Relaxed);
            w.tick(t);
            t += 1000;
        }
        assert_eq!(codes(&mut rx), vec!["sensor_flatline"], "once, after 10 s");
        // The session is gone (no liveness): stale after stale_s.
        for _ in 0..6 {
            w.tick(t);
            t += 1000;
        }
        assert_eq!(codes(&mut rx), vec!["sensor_stale"]);
        // A bad sample: liveness no longer makes it current.
        w.check(&mut Sample::good("t", Value::Float(2.8), t));
        w.check(&mut Sample::bad("t", "disconnected", t + 1));
        for _ in 0..6 {
            t += 1000;
            stats.last_seen_ms.store(t, Ordering::Relaxed);
            w.tick(t);
        }
        assert_eq!(codes(&mut rx), vec!["sensor_stale"]);
    }

    #[test]
    fn a_lasting_new_operating_point_is_relearned_only_when_configured() {
        let baseline_only = |relearn: Option<Duration>| TagChecks {
            baseline: Some(BaselineCheck {
                sigma: 8.0,
                warmup: 100,
                per_hour: false,
                relearn,
            }),
            ..TagChecks::default()
        };
        // 500 samples around 2.5, then the plant runs at 7.5 (600 samples =
        // 60 s at 100 ms).
        let mut trace = level(500);
        trace.extend(level(600).iter().map(|x| x + 5.0));
        let (mut w, mut rx) = watch(baseline_only(None));
        let (flags, codes) = replay(&mut w, &mut rx, &trace);
        assert!(flags[500..]
            .iter()
            .all(|f| f == &vec!["outlier".to_string()]));
        assert!(
            !codes.contains(&"sensor_baseline_relearned"),
            "never without relearn"
        );

        let (mut w, mut rx) = watch(baseline_only(Some(Duration::from_secs(20))));
        let (flags, codes) = replay(&mut w, &mut rx, &trace);
        // Flagged for 20 s, then learned again: the rest is the new normal.
        assert!(flags[500..700]
            .iter()
            .all(|f| f == &vec!["outlier".to_string()]));
        assert!(
            flags[701..].iter().all(Vec::is_empty),
            "{:?}",
            &flags[700..710]
        );
        assert_eq!(
            codes
                .iter()
                .filter(|c| **c == "sensor_baseline_relearned")
                .count(),
            1
        );
        // A short excursion is not relearned.
        let mut trace = level(500);
        for x in &mut trace[300..350] {
            *x += 5.0;
        }
        let (mut w, mut rx) = watch(baseline_only(Some(Duration::from_secs(20))));
        let (_, codes) = replay(&mut w, &mut rx, &trace);
        assert!(!codes.contains(&"sensor_baseline_relearned"));
    }

    #[test]
    fn a_clean_trace_raises_nothing() {
        let (mut w, mut rx) = watch(all_checks());
        let (flags, codes) = replay(&mut w, &mut rx, &level(2000));
        assert!(codes.is_empty(), "{codes:?}");
        assert!(flags.iter().all(Vec::is_empty));
    }

    #[test]
    fn a_spike_is_out_of_range_too_fast_and_an_outlier() {
        let (mut w, mut rx) = watch(all_checks());
        let mut t = level(500);
        t[400] = 9.0;
        let (flags, codes) = replay(&mut w, &mut rx, &t);
        assert_eq!(
            flags[400],
            vec!["out_of_range", "rate_of_change", "outlier"]
        );
        assert!(codes.contains(&"sensor_out_of_range"));
        assert!(codes.contains(&"sensor_rate_of_change"));
        assert!(codes.contains(&"sensor_outlier"));
        assert!(flags[399].is_empty() && flags[402].is_empty());
    }

    #[test]
    fn an_impossible_rate_within_range_is_flagged() {
        let (mut w, mut rx) = watch(TagChecks {
            max_rate_per_s: Some(1.0),
            ..Default::default()
        });
        let mut t = level(100);
        t[50] = t[49] + 0.5; // 5/s
        let (flags, codes) = replay(&mut w, &mut rx, &t);
        assert_eq!(flags[50], vec!["rate_of_change"]);
        assert_eq!(codes.first(), Some(&"sensor_rate_of_change"));
    }

    #[test]
    fn a_stuck_sensor_is_a_flatline_after_its_time() {
        let (mut w, mut rx) = watch(all_checks());
        let mut t = level(300);
        t.extend(std::iter::repeat_n(t[299], 200)); // 20 s stuck
        let (flags, codes) = replay(&mut w, &mut rx, &t);
        // Unchanged since sample 299; flagged once that is 10 s ago, alerted once.
        assert!(flags[398].is_empty());
        assert_eq!(flags[399], vec!["flatline"], "{:?}", &flags[395..405]);
        assert_eq!(flags[499], vec!["flatline"]);
        assert_eq!(codes.iter().filter(|c| **c == "sensor_flatline").count(), 1);
        // A value that never moved is not a flatline.
        let (mut w, mut rx) = watch(all_checks());
        let (_, codes) = replay(&mut w, &mut rx, &[1.0; 300]);
        assert!(!codes.contains(&"sensor_flatline"), "{codes:?}");
    }

    #[test]
    fn a_tag_without_good_values_goes_stale_once() {
        let (mut w, mut rx) = watch(all_checks());
        let (_, codes) = replay(&mut w, &mut rx, &level(10));
        assert!(codes.is_empty());
        for ms in (0..20).map(|i| 1_001_000 + i * 1000) {
            let mut bad = Sample::bad("t", "timeout", ms);
            w.check(&mut bad);
            w.tick(ms);
        }
        let mut codes = Vec::new();
        while let Ok(f) = rx.try_recv() {
            codes.push(f.code);
        }
        assert_eq!(codes, vec!["sensor_stale"]);
    }
}
