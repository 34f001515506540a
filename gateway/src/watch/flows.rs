//! The command flow, the devices' responses and the gateway's own
//! connections, checked by the downlink task. Every code is listed with
//! what to do about it in the README ("What the gateway watches").
//!
//! Command flow:
//! - `commands_denied_burst`: one operator's commands denied 5 times within
//!   60 s (a probe of the policy, or a confused client);
//! - `commands_refused_burst`: 20 command messages refused before the
//!   policy (bad signatures, unknown keys, replays...) within 60 s;
//! - `commands_flood`: command messages dropped unread by the global rate
//!   limit or a full queue;
//! - `command_new_operator`, `command_new_key`: an authenticated command
//!   from an operator or signed with a key never seen before, once the
//!   learning period (`[watch] learn_days`, from the first command) is over;
//! - `command_outside_hours`: a command outside `[watch] usual_hours`, or,
//!   without them, in an hour of the day (UTC) in which no command came
//!   during the learning period (judged once 20 commands were learned);
//! - `command_unusual_step`: a command that moves a tag more than
//!   `unusual_step_factor` times the largest step permitted for it before
//!   (after 5 permitted commands of that tag).
//!
//! What is learned (operators, keys, hours, steps) is kept in
//! `<data_dir>/command-baseline.json`, so a restart does not start the
//! learning period again.
//!
//! Devices (over the last minute unless said otherwise):
//! - `device_unreachable`: a device disconnected for 30 s (once per outage);
//! - `device_exception_storm`: at least half of the reads of the last 10 s
//!   (at least 5) answered with an exception;
//! - `device_timeouts`: 5 reads without an answer;
//! - `device_slow`: the mean response time is 5 times the learned one and
//!   50 ms more (learned from the first 60 seconds with reads on);
//! - `device_flapping`: 6 connections made within 10 minutes.
//!
//! The broker connection:
//! - `broker_connect_failures`: 3 failed broker connections within 60 s;
//! - `broker_auth_failure`: the TLS handshake failed or the broker refused
//!   the connection (certificates, authentication, authorization);
//! - `broker_session_takeover`: 3 connections lost within 5 minutes less
//!   than 10 s after the broker accepted them: typically a second client
//!   with the gateway's identity (a copied certificate) taking the session
//!   over again and again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use twin_model::alert::Severity;

use super::alerts::{evidence, Alerts, Finding};
use crate::config::WatchConfig;
use crate::metrics::DeviceStats;
use crate::mqtt::LinkStats;

const WINDOW_MS: u64 = 60_000;
const DENIED_BURST: usize = 5;
const REFUSED_BURST: usize = 20;
const UNREACHABLE_MS: u64 = 30_000;
const CONNECT_FAILURES: usize = 3;
/// Commands learned before learned hours are judged.
const HOURS_MIN_HISTORY: u64 = 20;
/// Permitted commands of a tag before its steps are judged.
const STEP_WARMUP: u64 = 5;
/// Exception storm: at least this many reads within [`STORM_WINDOW_MS`],
/// half of them answered with an exception.
const STORM_MIN_READS: u64 = 5;
const STORM_WINDOW_MS: u64 = 10_000;
const TIMEOUTS: u64 = 5;
/// Slow device: this many times the learned response time, and this much more.
const SLOW_FACTOR: f64 = 5.0;
const SLOW_MARGIN_US: f64 = 50_000.0;
/// Seconds with reads before the response time is judged.
const LATENCY_WARMUP: u64 = 60;
const FLAP_WINDOW_MS: u64 = 600_000;
const FLAP_CONNECTS: u64 = 6;
const TAKEOVER_WINDOW_MS: u64 = 300_000;
const TAKEOVER_SHORT_SESSIONS: usize = 3;
/// The file of what the command-flow watch learned, in the data directory.
pub const BASELINE_FILE: &str = "command-baseline.json";

/// What the command-flow watch has learned; kept across restarts.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct CommandBaseline {
    /// The first authenticated command: the learning period starts here.
    first_ms: Option<u64>,
    /// Operator (`sub`) and key id -> first seen, ms.
    operators: BTreeMap<String, u64>,
    keys: BTreeMap<String, u64>,
    /// Commands learned per hour of the day (UTC).
    hours: [u64; 24],
    /// Per tag: permitted commands and the largest step among them.
    steps: BTreeMap<String, StepStat>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct StepStat {
    n: u64,
    max: f64,
}

/// An authenticated command, as the command-flow watch sees it.
#[derive(Debug, Clone, Copy)]
pub struct CommandSeen<'a> {
    pub operator: &'a str,
    pub kid: &'a str,
    pub tag: &'a str,
    /// |requested - current|, when both are numbers and the current value is good.
    pub step: Option<f64>,
    pub permitted: bool,
}

/// Counters of one device at one tick.
#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    at_ms: u64,
    reads: u64,
    exceptions: u64,
    timeouts: u64,
    read_us: u64,
    connects: u64,
}

impl Snap {
    fn of(s: &DeviceStats, at_ms: u64) -> Snap {
        Snap {
            at_ms,
            reads: s.reads.load(Ordering::Relaxed),
            exceptions: s.exceptions.load(Ordering::Relaxed),
            timeouts: s.timeouts.load(Ordering::Relaxed),
            read_us: s.read_us_total.load(Ordering::Relaxed),
            connects: s.connects.load(Ordering::Relaxed),
        }
    }
}

/// The response-time baseline and recent counters of one device.
#[derive(Debug, Default)]
struct DeviceWatch {
    history: VecDeque<Snap>,
    /// Learned mean response time, µs, over `learned` seconds with reads.
    latency_us: f64,
    learned: u64,
}

impl DeviceWatch {
    /// The snapshot closest to `window_ms` ago (the oldest one if younger).
    fn base(&self, now_ms: u64, window_ms: u64) -> Option<&Snap> {
        let since = now_ms.saturating_sub(window_ms);
        self.history
            .iter()
            .find(|s| s.at_ms >= since)
            .or(self.history.front())
    }
}

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
    cfg: WatchConfig,
    denials: HashMap<String, VecDeque<u64>>,
    refusals: VecDeque<u64>,
    devices: Vec<(String, Arc<DeviceStats>)>,
    device_watch: HashMap<String, DeviceWatch>,
    down_since: HashMap<String, u64>,
    alerted_down: HashSet<String>,
    link: Option<Arc<LinkStats>>,
    connect_failures_seen: u64,
    failures: VecDeque<u64>,
    auth_failures_seen: u64,
    short_sessions_seen: u64,
    short_sessions: VecDeque<u64>,
    baseline: CommandBaseline,
    baseline_file: Option<PathBuf>,
    baseline_dirty: bool,
    /// When each (code, subject) was last raised by a windowed check.
    raised: HashMap<(&'static str, String), u64>,
}

impl FlowWatch {
    /// `baseline_file`: where what is learned about commands is kept
    /// (`None`: in memory only).
    pub fn new(
        alerts: Alerts,
        devices: Vec<(String, Arc<DeviceStats>)>,
        link: Option<Arc<LinkStats>>,
        cfg: WatchConfig,
        baseline_file: Option<PathBuf>,
    ) -> Self {
        let baseline = baseline_file
            .as_deref()
            .map(load_baseline)
            .unwrap_or_default();
        FlowWatch {
            alerts,
            cfg,
            denials: HashMap::new(),
            refusals: VecDeque::new(),
            devices,
            device_watch: HashMap::new(),
            down_since: HashMap::new(),
            alerted_down: HashSet::new(),
            link,
            connect_failures_seen: 0,
            failures: VecDeque::new(),
            auth_failures_seen: 0,
            short_sessions_seen: 0,
            short_sessions: VecDeque::new(),
            baseline,
            baseline_file,
            baseline_dirty: false,
            raised: HashMap::new(),
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
        self.raise_as(Severity::High, code, subject, message, now_ms, ev);
    }

    fn raise_as(
        &self,
        severity: Severity,
        code: &'static str,
        subject: String,
        message: String,
        now_ms: u64,
        ev: std::collections::BTreeMap<String, serde_json::Value>,
    ) {
        self.alerts.raise(Finding {
            code,
            severity,
            subject,
            message,
            evidence: ev,
            at_ms: now_ms,
        });
    }

    /// Whether `(code, subject)` may be raised again (at most once per
    /// `every_ms`); records it when so.
    fn once_per(&mut self, code: &'static str, subject: &str, every_ms: u64, now_ms: u64) -> bool {
        let key = (code, subject.to_owned());
        match self.raised.get(&key) {
            Some(t) if now_ms < t + every_ms => false,
            _ => {
                self.raised.insert(key, now_ms);
                true
            }
        }
    }

    fn learning(&self, now_ms: u64) -> bool {
        match self.baseline.first_ms {
            None => true,
            Some(first) => now_ms < first.saturating_add(self.cfg.learn.as_millis() as u64),
        }
    }

    /// An authenticated command and whether the policy permitted it.
    pub fn command(&mut self, c: CommandSeen<'_>, now_ms: u64) {
        let first = *self.baseline.first_ms.get_or_insert(now_ms);
        let learning = self.learning(now_ms);
        let subject = format!("operator:{}", c.operator);
        for (code, kind, name, known) in [
            (
                "command_new_operator",
                "operator",
                c.operator,
                &mut self.baseline.operators,
            ),
            ("command_new_key", "key", c.kid, &mut self.baseline.keys),
        ] {
            if known.contains_key(name) {
                continue;
            }
            let count = known.len();
            known.insert(name.to_owned(), now_ms);
            self.baseline_dirty = true;
            if !learning {
                self.alerts.raise(Finding {
                    code,
                    severity: Severity::Medium,
                    subject: subject.clone(),
                    message: format!(
                        "a command came from {kind} `{name}`, never seen before (learning ended; {count} known)"
                    ),
                    evidence: evidence([
                        (kind, json!(name)),
                        ("known", json!(count)),
                        ("tag", json!(c.tag)),
                        ("learning_since_ms", json!(first)),
                    ]),
                    at_ms: now_ms,
                });
            }
        }
        self.hours(c, &subject, learning, now_ms);
        if let Some(step) = c.step.filter(|s| s.is_finite() && *s >= 0.0) {
            let st = self.baseline.steps.entry(c.tag.to_owned()).or_default();
            let limit = st.max * self.cfg.step_factor;
            if st.n >= STEP_WARMUP && step > limit {
                let (n, max) = (st.n, st.max);
                self.raise_as(
                    Severity::Medium,
                    "command_unusual_step",
                    subject.clone(),
                    format!(
                        "a command moves tag {} by {step}, more than {} times the largest step permitted before ({max})",
                        c.tag, self.cfg.step_factor
                    ),
                    now_ms,
                    evidence([
                        ("tag", json!(c.tag)),
                        ("step", json!(step)),
                        ("largest_step", json!(max)),
                        ("factor", json!(self.cfg.step_factor)),
                        ("learned_commands", json!(n)),
                        ("permitted", json!(c.permitted)),
                    ]),
                );
            }
            if c.permitted {
                let st = self.baseline.steps.entry(c.tag.to_owned()).or_default();
                st.n += 1;
                st.max = st.max.max(step);
                self.baseline_dirty = true;
            }
        }
    }

    fn hours(&mut self, c: CommandSeen<'_>, subject: &str, learning: bool, now_ms: u64) {
        let Ok(ts) = jiff::Timestamp::from_millisecond(now_ms.min(i64::MAX as u64) as i64) else {
            return;
        };
        let hour = ((now_ms / 3_600_000) % 24) as usize;
        if let Some(w) = &self.cfg.usual_hours {
            let (inside, local) = w.at(ts);
            if !inside {
                self.raise_as(
                    Severity::Medium,
                    "command_outside_hours",
                    subject.to_owned(),
                    format!(
                        "a command for tag {} came at {local}, outside the usual hours {}",
                        c.tag, w.text
                    ),
                    now_ms,
                    evidence([
                        ("local_time", json!(local)),
                        ("usual_hours", json!(w.text)),
                        ("tag", json!(c.tag)),
                    ]),
                );
            }
            return;
        }
        let learned: u64 = self.baseline.hours.iter().sum();
        let seen_in_hour = self.baseline.hours.get(hour).copied().unwrap_or(0);
        if learning {
            if let Some(h) = self.baseline.hours.get_mut(hour) {
                *h += 1;
                self.baseline_dirty = true;
            }
        } else if learned >= HOURS_MIN_HISTORY && seen_in_hour == 0 {
            let usual: Vec<usize> = (0..24)
                .filter(|h| self.baseline.hours.get(*h).is_some_and(|n| *n > 0))
                .collect();
            self.raise_as(
                Severity::Medium,
                "command_outside_hours",
                subject.to_owned(),
                format!(
                    "a command for tag {} came at {:02}:xx UTC, an hour in which none of the {learned} learned commands came",
                    c.tag, hour
                ),
                now_ms,
                evidence([
                    ("utc_hour", json!(hour)),
                    ("learned_commands", json!(learned)),
                    ("usual_utc_hours", json!(usual)),
                    ("tag", json!(c.tag)),
                ]),
            );
        }
    }

    /// Stores what was learned, when it changed (atomically: temporary
    /// file, fsync, rename).
    fn save_baseline(&mut self) {
        if !self.baseline_dirty {
            return;
        }
        self.baseline_dirty = false;
        let Some(path) = &self.baseline_file else {
            return;
        };
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let tmp = path.with_extension("json.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&self.baseline).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %path.display(), error = %e, "cannot store the command baseline; it is kept in memory");
        }
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

    /// A device connection refused for a security reason (certificates,
    /// policies, login): `device_security_failure`.
    /// (`opcua_security_none` is a configured choice, reported by the
    /// self-check, not a failure.)
    pub fn device_security(&mut self, device: &str, code: &str, detail: &str, now_ms: u64) {
        if code == "opcua_security_none" {
            return;
        }
        self.raise(
            "device_security_failure",
            format!("device:{device}"),
            format!(
                "the connection to device {device} failed for a security reason ({code}): {detail}"
            ),
            now_ms,
            evidence([("code", json!(code)), ("detail", json!(detail))]),
        );
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

    /// Connection and response checks, once a second.
    pub fn tick(&mut self, now_ms: u64) {
        self.device_responses(now_ms);
        self.broker(now_ms);
        self.save_baseline();
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

impl FlowWatch {
    /// Exception storms, timeouts, slow answers and flapping connections.
    fn device_responses(&mut self, now_ms: u64) {
        let mut found = Vec::new();
        for (name, stats) in &self.devices {
            let w = self.device_watch.entry(name.clone()).or_default();
            let snap = Snap::of(stats, now_ms);
            // Response time of the last second, learned while the device
            // is not slow.
            let last = w.history.back().copied();
            w.history.push_back(snap);
            while w
                .history
                .front()
                .is_some_and(|s| s.at_ms + FLAP_WINDOW_MS < now_ms)
            {
                w.history.pop_front();
            }
            let Some(minute) = w.base(now_ms, WINDOW_MS).copied() else {
                continue;
            };
            let reads = snap.reads.saturating_sub(minute.reads);
            let timeouts = snap.timeouts.saturating_sub(minute.timeouts);
            let burst = w.base(now_ms, STORM_WINDOW_MS).copied().unwrap_or(minute);
            let burst_reads = snap.reads.saturating_sub(burst.reads);
            let exceptions = snap.exceptions.saturating_sub(burst.exceptions);
            let mean_us = if reads > 0 {
                snap.read_us.saturating_sub(minute.read_us) as f64 / reads as f64
            } else {
                0.0
            };
            if burst_reads >= STORM_MIN_READS && exceptions * 2 >= burst_reads {
                found.push((
                    "device_exception_storm",
                    Severity::High,
                    name.clone(),
                    format!("{exceptions} of the last {burst_reads} reads of device {name} were answered with an exception"),
                    evidence([
                        ("exceptions", json!(exceptions)),
                        ("reads", json!(burst_reads)),
                        ("window_s", json!(STORM_WINDOW_MS / 1000)),
                    ]),
                ));
            }
            if timeouts >= TIMEOUTS {
                found.push((
                    "device_timeouts",
                    Severity::High,
                    name.clone(),
                    format!(
                        "{timeouts} reads of device {name} got no answer within the last minute"
                    ),
                    evidence([
                        ("timeouts", json!(timeouts)),
                        ("reads", json!(reads)),
                        ("window_s", json!(60)),
                    ]),
                ));
            }
            let slow = w.learned >= LATENCY_WARMUP
                && reads > 0
                && mean_us > w.latency_us * SLOW_FACTOR
                && mean_us > w.latency_us + SLOW_MARGIN_US;
            if slow {
                found.push((
                    "device_slow",
                    Severity::Medium,
                    name.clone(),
                    format!(
                        "device {name} answers in {:.1} ms on average over the last minute; it usually takes {:.1} ms",
                        mean_us / 1000.0,
                        w.latency_us / 1000.0
                    ),
                    evidence([
                        ("mean_ms", json!(mean_us / 1000.0)),
                        ("usual_ms", json!(w.latency_us / 1000.0)),
                        ("factor", json!(SLOW_FACTOR)),
                    ]),
                ));
            } else if let Some(last) = last {
                let r = snap.reads.saturating_sub(last.reads);
                if r > 0 {
                    let us = snap.read_us.saturating_sub(last.read_us) as f64 / r as f64;
                    w.learned += 1;
                    // A running mean while warming up, then a slow-moving one.
                    let weight = 1.0 / (w.learned.min(600) as f64);
                    w.latency_us += (us - w.latency_us) * weight;
                }
            }
            if let Some(ten) = w.base(now_ms, FLAP_WINDOW_MS) {
                let connects = snap.connects.saturating_sub(ten.connects);
                if connects >= FLAP_CONNECTS {
                    found.push((
                        "device_flapping",
                        Severity::Medium,
                        name.clone(),
                        format!("device {name} was connected {connects} times within 10 minutes"),
                        evidence([("connects", json!(connects)), ("window_s", json!(600))]),
                    ));
                }
            }
        }
        for (code, severity, device, message, ev) in found {
            let subject = format!("device:{device}");
            let every = if code == "device_flapping" {
                FLAP_WINDOW_MS
            } else {
                WINDOW_MS
            };
            if self.once_per(code, &subject, every, now_ms) {
                self.raise_as(severity, code, subject, message, now_ms, ev);
            }
        }
    }

    /// TLS and authentication failures, and session takeovers.
    fn broker(&mut self, now_ms: u64) {
        let Some(link) = self.link.clone() else {
            return;
        };
        let auth = link.auth_failures.load(Ordering::Relaxed);
        let new_auth = auth.saturating_sub(self.auth_failures_seen);
        self.auth_failures_seen = auth;
        if new_auth > 0 && self.once_per("broker_auth_failure", "gateway", WINDOW_MS, now_ms) {
            self.raise(
                "broker_auth_failure",
                "gateway".into(),
                format!("{new_auth} broker connection(s) failed in TLS or were refused by the broker (certificates, authentication or authorization)"),
                now_ms,
                evidence([("failures", json!(new_auth)), ("total", json!(auth))]),
            );
        }
        let short = link.lost_short.load(Ordering::Relaxed);
        for _ in 0..short.saturating_sub(self.short_sessions_seen).min(16) {
            self.short_sessions.push_back(now_ms);
        }
        self.short_sessions_seen = short;
        while self
            .short_sessions
            .front()
            .is_some_and(|t| t + TAKEOVER_WINDOW_MS <= now_ms)
        {
            self.short_sessions.pop_front();
        }
        let n = self.short_sessions.len();
        if n >= TAKEOVER_SHORT_SESSIONS
            && self.once_per(
                "broker_session_takeover",
                "gateway",
                TAKEOVER_WINDOW_MS,
                now_ms,
            )
        {
            self.raise(
                "broker_session_takeover",
                "gateway".into(),
                format!(
                    "{n} broker connections ended within 10 s of being accepted in the last 5 minutes: another client may be using the gateway's identity"
                ),
                now_ms,
                evidence([
                    ("short_sessions", json!(n)),
                    ("window_s", json!(TAKEOVER_WINDOW_MS / 1000)),
                    ("lost_total", json!(link.lost.load(Ordering::Relaxed))),
                ]),
            );
        }
    }
}

/// What was learned before; an unreadable file is set aside and learning
/// starts again (logged).
fn load_baseline(path: &std::path::Path) -> CommandBaseline {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            let aside = path.with_extension("json.unreadable");
            let _ = std::fs::rename(path, &aside);
            tracing::error!(file = %path.display(), set_aside = %aside.display(), error = %e, "the command baseline is not valid; learning starts again");
            CommandBaseline::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => CommandBaseline::default(),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read the command baseline; learning starts again");
            CommandBaseline::default()
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
        let mut w = FlowWatch::new(
            Alerts::new(tx),
            vec![("plc1".into(), dev.clone())],
            None,
            WatchConfig::default(),
            None,
        );
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

    const DAY: u64 = 86_400_000;
    const HOUR: u64 = 3_600_000;
    /// 2026-01-05 00:00 UTC, a Monday.
    const MONDAY: u64 = 1_767_571_200_000;

    fn drain(rx: &mut mpsc::UnboundedReceiver<Finding>) -> Vec<&'static str> {
        let mut v = Vec::new();
        while let Ok(f) = rx.try_recv() {
            v.push(f.code);
        }
        v
    }

    fn watch(
        cfg: WatchConfig,
        devices: Vec<(String, Arc<DeviceStats>)>,
        link: Option<Arc<LinkStats>>,
    ) -> (FlowWatch, mpsc::UnboundedReceiver<Finding>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            FlowWatch::new(Alerts::new(tx), devices, link, cfg, None),
            rx,
        )
    }

    fn cmd<'a>(operator: &'a str, kid: &'a str, step: f64) -> CommandSeen<'a> {
        CommandSeen {
            operator,
            kid,
            tag: "tank1.setpoint",
            step: Some(step),
            permitted: true,
        }
    }

    /// Two weeks of day-shift commands by alice and bob (08:00-17:00 UTC,
    /// steps up to 0.5): the learning week and a second week.
    fn day_shift(w: &mut FlowWatch, rx: &mut mpsc::UnboundedReceiver<Finding>) {
        for day in 0..14 {
            for (i, hour) in [8u64, 10, 13, 16].into_iter().enumerate() {
                let who = if i % 2 == 0 { "alice" } else { "bob" };
                let kid = if i % 2 == 0 { "key-a" } else { "key-b" };
                let step = 0.1 + 0.1 * i as f64;
                w.command(cmd(who, kid, step), MONDAY + day * DAY + hour * HOUR);
            }
        }
        assert_eq!(
            drain(rx),
            Vec::<&str>::new(),
            "the clean trace raises nothing"
        );
    }

    #[test]
    fn a_clean_command_trace_raises_nothing_and_the_faults_raise_their_codes() {
        let (mut w, mut rx) = watch(WatchConfig::default(), vec![], None);
        day_shift(&mut w, &mut rx);
        let t = MONDAY + 15 * DAY;
        // Commands at 3 a.m.
        w.command(cmd("alice", "key-a", 0.2), t + 3 * HOUR);
        assert_eq!(drain(&mut rx), vec!["command_outside_hours"]);
        // A new operator with a new key, at a usual hour.
        w.command(cmd("mallory", "key-m", 0.2), t + 10 * HOUR);
        assert_eq!(
            drain(&mut rx),
            vec!["command_new_operator", "command_new_key"]
        );
        // Known now: no repeat.
        w.command(cmd("mallory", "key-m", 0.2), t + 10 * HOUR + 60_000);
        assert_eq!(drain(&mut rx), Vec::<&str>::new());
        // A step far beyond the largest permitted one (0.4).
        w.command(cmd("alice", "key-a", 5.0), t + 13 * HOUR);
        assert_eq!(drain(&mut rx), vec!["command_unusual_step"]);
        // A denied request does not widen what is usual.
        w.command(
            CommandSeen {
                permitted: false,
                ..cmd("bob", "key-b", 50.0)
            },
            t + 16 * HOUR,
        );
        assert_eq!(drain(&mut rx), vec!["command_unusual_step"]);
        w.command(cmd("bob", "key-b", 20.0), t + DAY + 8 * HOUR);
        assert_eq!(
            drain(&mut rx),
            vec!["command_unusual_step"],
            "5.0 was permitted, 50 was not"
        );
    }

    #[test]
    fn configured_usual_hours_judge_from_the_first_command() {
        let cfg = WatchConfig {
            usual_hours: Some(crate::policy::model::Window {
                days: [true, true, true, true, true, false, false],
                from_s: 6 * 3600,
                to_s: 22 * 3600,
                tz: crate::policy::load::tzdb()
                    .get("Europe/Berlin")
                    .expect("bundled zone"),
                text: "mon-fri 06:00-22:00 Europe/Berlin".into(),
            }),
            ..WatchConfig::default()
        };
        let (mut w, mut rx) = watch(cfg, vec![], None);
        // Monday 09:00 UTC = 10:00 in Berlin: usual.
        w.command(cmd("alice", "key-a", 0.1), MONDAY + 9 * HOUR);
        assert_eq!(drain(&mut rx), Vec::<&str>::new());
        // Tuesday 02:00 UTC = 03:00 in Berlin.
        w.command(cmd("alice", "key-a", 0.1), MONDAY + DAY + 2 * HOUR);
        assert_eq!(drain(&mut rx), vec!["command_outside_hours"]);
        // Saturday noon.
        w.command(cmd("alice", "key-a", 0.1), MONDAY + 5 * DAY + 12 * HOUR);
        assert_eq!(drain(&mut rx), vec!["command_outside_hours"]);
    }

    fn persisted(tx: mpsc::UnboundedSender<Finding>, file: &std::path::Path) -> FlowWatch {
        let cfg = WatchConfig::default();
        FlowWatch::new(Alerts::new(tx), vec![], None, cfg, Some(file.to_path_buf()))
    }

    #[test]
    fn what_was_learned_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(BASELINE_FILE);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = persisted(tx.clone(), &file);
        day_shift(&mut w, &mut rx);
        w.tick(MONDAY + 14 * DAY);
        drop(w);
        let mut w = persisted(tx, &file);
        w.command(cmd("alice", "key-a", 0.2), MONDAY + 15 * DAY + 10 * HOUR);
        assert_eq!(
            drain(&mut rx),
            Vec::<&str>::new(),
            "alice, her key and the hour are known"
        );
        w.command(cmd("eve", "key-e", 0.2), MONDAY + 15 * DAY + 3 * HOUR);
        assert_eq!(
            drain(&mut rx),
            vec![
                "command_new_operator",
                "command_new_key",
                "command_outside_hours"
            ]
        );
        // A damaged file is set aside and learning starts again.
        std::fs::write(&file, b"{not json").unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = persisted(tx, &file);
        w.command(cmd("eve", "key-e", 0.2), MONDAY + 3 * HOUR);
        assert_eq!(drain(&mut rx), Vec::<&str>::new());
        assert!(file.with_extension("json.unreadable").exists());
    }

    /// One simulated device: `secs` seconds of one read per 100 ms with the
    /// given response time, exceptions and timeouts per second.
    fn run_device(
        w: &mut FlowWatch,
        dev: &DeviceStats,
        start_s: u64,
        secs: u64,
        read_ms: u64,
        exceptions_per_s: u64,
        timeouts_per_s: u64,
    ) {
        for s in start_s..start_s + secs {
            for i in 0..10 {
                let exception = i < exceptions_per_s;
                let timeout = i >= 10 - timeouts_per_s;
                dev.read(Duration::from_millis(read_ms), !(exception || timeout));
                if exception {
                    dev.exceptions.fetch_add(1, Ordering::Relaxed);
                }
                if timeout {
                    dev.timeouts.fetch_add(1, Ordering::Relaxed);
                }
            }
            w.tick(MONDAY + s * 1000);
        }
    }

    use std::time::Duration;

    #[test]
    fn device_response_traces_raise_storms_timeouts_slowness_and_flapping() {
        let dev = Arc::new(DeviceStats::default());
        dev.connected.store(true, Ordering::Relaxed);
        dev.connects.store(1, Ordering::Relaxed);
        let (mut w, mut rx) = watch(
            WatchConfig::default(),
            vec![("plc1".into(), dev.clone())],
            None,
        );
        // Ten clean minutes, response times 2-4 ms, an exception now and then.
        for m in 0..10 {
            run_device(&mut w, &dev, m * 60, 60, 2 + m % 3, 0, 0);
            dev.exceptions.fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(
            drain(&mut rx),
            Vec::<&str>::new(),
            "the clean trace raises nothing"
        );
        // An exception storm: 8 of 10 reads refused for 20 s.
        run_device(&mut w, &dev, 600, 20, 3, 8, 0);
        assert_eq!(
            drain(&mut rx),
            vec!["device_exception_storm"],
            "once, not every second"
        );
        run_device(&mut w, &dev, 620, 120, 3, 0, 0);
        drain(&mut rx);
        // Timeouts: one read in ten unanswered.
        run_device(&mut w, &dev, 740, 10, 3, 0, 1);
        assert_eq!(drain(&mut rx), vec!["device_timeouts"]);
        run_device(&mut w, &dev, 750, 120, 3, 0, 0);
        drain(&mut rx);
        // Slow answers: 400 ms instead of ~3 ms.
        run_device(&mut w, &dev, 870, 30, 400, 0, 0);
        assert_eq!(drain(&mut rx), vec!["device_slow"]);
        run_device(&mut w, &dev, 900, 120, 3, 0, 0);
        drain(&mut rx);
        // Flapping: a reconnect every 30 s.
        for k in 0..8 {
            dev.connects.fetch_add(1, Ordering::Relaxed);
            run_device(&mut w, &dev, 1020 + k * 30, 30, 3, 0, 0);
        }
        assert_eq!(drain(&mut rx), vec!["device_flapping"]);
    }

    #[test]
    fn broker_traces_raise_auth_failures_and_session_takeovers() {
        let link = Arc::new(LinkStats::default());
        let (mut w, mut rx) = watch(WatchConfig::default(), vec![], Some(link.clone()));
        // A clean hour with one broker restart (one long session lost).
        for s in 0..3600u64 {
            if s == 1800 {
                link.lost.fetch_add(1, Ordering::Relaxed);
                link.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            w.tick(MONDAY + s * 1000);
        }
        assert_eq!(drain(&mut rx), Vec::<&str>::new());
        // The broker refuses the certificate.
        link.auth_failures.fetch_add(1, Ordering::Relaxed);
        w.tick(MONDAY + 3_601_000);
        assert_eq!(drain(&mut rx), vec!["broker_auth_failure"]);
        // Another client with our identity: sessions end seconds after they start.
        for k in 0..4u64 {
            link.lost.fetch_add(1, Ordering::Relaxed);
            link.lost_short.fetch_add(1, Ordering::Relaxed);
            w.tick(MONDAY + 3_700_000 + k * 5000);
        }
        assert_eq!(drain(&mut rx), vec!["broker_session_takeover"]);
    }
}
