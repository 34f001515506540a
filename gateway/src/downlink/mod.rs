//! The downlink: operator-signed commands from the twin to the devices.
//!
//! Stages, in pipeline order (each a file of this module or the one named):
//! 1. receive: the MQTT link subscribes to the command topic with manual
//!    acks and hands every message over ([`crate::mqtt::Inbound`]);
//! 2. [`receive`]: admission before anything is read: queue overflow and
//!    the global rate limit drop messages (counted, summarised in the
//!    audit log); the rest queue for the worker;
//! 3. check the message: retained (`retained`), size (`too_large`), the
//!    envelope ([`twin_model::command::Envelope`]);
//! 4. authenticate: the command token and its approvals
//!    ([`crate::command_auth`]: header, key, signature, claims, replay),
//!    then the per-operator rate limit ([`limit`]);
//! 5. decide: the policy ([`crate::policy`], default deny) against the
//!    current values ([`current`]), and the candidate policy beside it
//!    (shadow mode);
//! 6. audit: the decision with the original tokens, written and synced
//!    ([`audit_sink`]) before anything is done; only then is the message
//!    acknowledged to the broker;
//! 7. write: the permit goes to the device's owner task
//!    ([`crate::device::Writers`]), which writes and reads back;
//! 8. report: the outcome is audited, and a signed result is published on
//!    the result topic ([`twin_model::result`]); the read-back reaches the
//!    reported twin with the command id.
//!
//! Every message that reaches stage 3 gets one audit record and one
//! result. The worker takes one message at a time: commands are rare and
//! their order matters more than their rate. The policy folders are
//! checked for changes every `policy_reload_ms`: a valid change is swapped
//! in (rate-limit history kept) and audited; an invalid one is rejected,
//! audited, and the policy in force stays; a removed policy folder (or one
//! without policy files) means no policy: every command is denied.

pub mod audit_sink;
pub mod current;
pub mod limit;
pub mod receive;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use twin_model::audit::{self as record, Event};
use twin_model::command::Envelope;
use twin_model::jws::{b64url, sha256};
use twin_model::result::{CommandResult, Status, RESULT_TYP};
use twin_model::topics::Topics;
use twin_model::{SigningKey, Value};

use crate::clock::now_ms;
use crate::command_auth::{
    OperatorTrustStore, ReplayOptions, ReplayStore, TokenVerifier, VerifiedCommand, VerifierConfig,
};
use crate::config::{CommandsConfig, Config};
use crate::device::Writers;
use crate::mqtt::{Inbound, Outgoing, OutgoingKind};
use crate::policy::{Decision, Engine, Outcome, Policy};
use audit_sink::AuditSink;
use current::CurrentTable;
use limit::PerOperator;
use receive::{Dropped, Work};

/// Counters of the downlink, readable while it runs.
#[derive(Debug, Default)]
pub struct DownlinkStats {
    /// Messages that reached the worker.
    pub handled: AtomicU64,
    pub applied: AtomicU64,
    pub denied: AtomicU64,
    pub failed: AtomicU64,
    pub refused: AtomicU64,
    /// Messages dropped unread (global rate limit, full queue).
    pub dropped: AtomicU64,
    /// Policy loads and rejections since start.
    pub policy_loads: AtomicU64,
    pub policy_rejections: AtomicU64,
    /// Whether a valid policy is in force now.
    pub policy_in_force: std::sync::atomic::AtomicBool,
    /// Alerts by code (summarised occurrences counted).
    pub alerts_by_code: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Results by (status, reason code; `ok` when applied).
    pub by_code: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>,
}

/// The command side, present when `[commands]` is configured.
struct Commands {
    cfg: CommandsConfig,
    config: Arc<Config>,
    /// `None` when the operator keys or the replay store could not be
    /// loaded: every command is refused with that reason.
    verifier: Result<TokenVerifier, (&'static str, String)>,
    engine: Engine,
    policy_fp: Option<String>,
    candidate: Option<Policy>,
    candidate_fp: Option<String>,
    operators: PerOperator,
    current: Arc<CurrentTable>,
    writers: Writers,
}

/// The downlink worker: the audit log's owner, and the command path.
pub struct Downlink {
    config: Arc<Config>,
    gateway_id: String,
    key: Arc<SigningKey>,
    topics: Topics,
    audit: AuditSink,
    commands: Option<Commands>,
    out: mpsc::Sender<Outgoing>,
    stats: Arc<DownlinkStats>,
    notices: Option<mpsc::UnboundedReceiver<crate::device::DeviceNotice>>,
    alerts_rx: Option<mpsc::UnboundedReceiver<crate::watch::alerts::Finding>>,
    summarizer: crate::watch::alerts::Summarizer,
    flows: crate::watch::flows::FlowWatch,
    inventory: crate::inventory::Inventory,
}

/// A message refused before the policy saw it.
struct Refusal {
    code: String,
    detail: String,
}

impl Refusal {
    fn new(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Refusal {
            code: code.into(),
            detail: detail.into(),
        }
    }
}

/// What the downlink needs from the rest of the gateway.
pub struct DownlinkParts {
    pub config: Arc<Config>,
    pub key: Arc<SigningKey>,
    pub topics: Topics,
    pub out: mpsc::Sender<Outgoing>,
    pub current: Arc<CurrentTable>,
    pub writers: Writers,
    /// Security findings of the device drivers, audited as they come.
    pub notices: mpsc::UnboundedReceiver<crate::device::DeviceNotice>,
    pub audit_options: crate::audit::AuditOptions,
    /// Findings of the watch (sensors, flows), summarised, audited and
    /// published here; `alerts` is the sending side for the flow checks.
    pub alerts_rx: mpsc::UnboundedReceiver<crate::watch::alerts::Finding>,
    pub alerts: crate::watch::alerts::Alerts,
    pub device_stats: Vec<(String, Arc<crate::metrics::DeviceStats>)>,
    pub link_stats: Option<Arc<crate::mqtt::LinkStats>>,
}

impl Downlink {
    /// Opens the audit log, records the configuration in force, and (when
    /// commands are configured) loads the operator keys, the replay store
    /// and the policy. Nothing here stops the gateway: what cannot be
    /// loaded makes the downlink refuse commands, with the reason logged
    /// and audited.
    pub async fn start(parts: DownlinkParts) -> (Downlink, Arc<DownlinkStats>) {
        let cfg = parts.config.clone();
        let audit = AuditSink::open(
            cfg.audit.file.clone(),
            parts.key.clone(),
            cfg.gateway.id.clone(),
            parts.audit_options,
            parts.topics.audit(),
            parts.out.clone(),
        )
        .await;
        let stats = Arc::new(DownlinkStats::default());
        let key = parts.key;
        let inventory = crate::inventory::Inventory::new(
            &cfg,
            key.clone(),
            parts.topics.clone(),
            parts.alerts.clone(),
            parts.device_stats.clone(),
        );
        let mut d = Downlink {
            config: cfg.clone(),
            gateway_id: cfg.gateway.id.clone(),
            key,
            topics: parts.topics,
            audit,
            commands: None,
            out: parts.out,
            stats: stats.clone(),
            notices: Some(parts.notices),
            alerts_rx: Some(parts.alerts_rx),
            summarizer: crate::watch::alerts::Summarizer::new(
                &cfg.gateway.id,
                Duration::from_secs(60),
            ),
            inventory,
            flows: crate::watch::flows::FlowWatch::new(
                parts.alerts,
                parts.device_stats,
                parts.link_stats,
                cfg.watch.clone(),
                Some(
                    cfg.gateway
                        .data_dir
                        .join(crate::watch::flows::BASELINE_FILE),
                ),
            ),
        };
        let text = std::fs::read(&cfg.source).unwrap_or_default();
        let tags: usize = cfg.devices.iter().map(|dv| dv.tag_count()).sum();
        let writable: usize = cfg.devices.iter().map(|dv| dv.writable_count()).sum();
        let summary = format!(
            "configuration in force at start: {} device(s), {tags} tag(s), {writable} writable; commands {}",
            cfg.devices.len(),
            if cfg.commands.is_some() { "enabled" } else { "disabled (no [commands] table)" }
        );
        let _ = d
            .audit
            .append(Event::ConfigChanged(record::ConfigChanged {
                source: cfg.source.display().to_string(),
                sha256: b64url(&sha256(&text)),
                summary,
            }))
            .await;
        if let Some(cc) = cfg.commands.clone() {
            let verifier = load_verifier(&cfg, &cc);
            if let Err((code, why)) = &verifier {
                tracing::error!(code, error = %why, "commands are refused until this is fixed and the gateway restarted");
            }
            d.commands = Some(Commands {
                operators: PerOperator::new(cc.operator_rate_per_s, cc.operator_burst),
                cfg: cc,
                config: cfg.clone(),
                verifier,
                engine: Engine::without_policy("not loaded yet"),
                policy_fp: None,
                candidate: None,
                candidate_fp: None,
                current: parts.current,
                writers: parts.writers,
            });
            d.reload(true).await;
        } else {
            tracing::info!("no [commands] table: the gateway accepts no command");
        }
        (d, stats)
    }

    /// Runs until `stop` is cancelled, then closes the audit log in order.
    pub async fn run(mut self, mut work: Option<mpsc::Receiver<Work>>, stop: CancellationToken) {
        let reload_every = self
            .commands
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.cfg.policy_reload);
        let mut reload = tokio::time::interval(reload_every);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checkpoint = tokio::time::interval(Duration::from_secs(1));
        // The security self-check at start and then hourly.
        let mut selfcheck = tokio::time::interval(Duration::from_secs(3600));
        // The SBOM does not change while the gateway runs: once, retained.
        for msg in self.inventory.sbom(self.config.mqtt.max_message_bytes) {
            let _ = self.out.send(msg).await;
        }
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                w = async {
                    match work.as_mut() {
                        Some(w) => w.recv().await,
                        None => std::future::pending().await,
                    }
                } => match w {
                    Some(Work::Message(m)) => self.handle(m).await,
                    Some(Work::Dropped(x)) => self.dropped(x).await,
                    None => work = None,
                },
                n = async {
                    match self.notices.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match n {
                    Some(n) => self.notice(n).await,
                    None => self.notices = None,
                },
                f = async {
                    match self.alerts_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match f {
                    Some(f) => {
                        if let Some(alert) = self.summarizer.push(f) {
                            self.emit_alert(alert).await;
                        }
                    }
                    None => self.alerts_rx = None,
                },
                _ = reload.tick() => self.reload(false).await,
                _ = selfcheck.tick() => self.selfcheck().await,
                _ = checkpoint.tick() => {
                    let now = now_ms();
                    self.flows.tick(now);
                    if let Some(msg) = self.inventory.due(now) {
                        let _ = self.out.send(msg).await;
                    }
                    for alert in self.summarizer.flush(now) {
                        self.emit_alert(alert).await;
                    }
                    self.audit.checkpoint_if_due().await;
                }
            }
        }
        self.audit.close("shutdown").await;
    }

    /// A device driver's notice: security findings are audited, identities
    /// and foreign replies go to the inventory.
    async fn notice(&mut self, n: crate::device::DeviceNotice) {
        use crate::device::DeviceNotice;
        match n {
            DeviceNotice::Security {
                device,
                code,
                detail,
            } => {
                self.flows.device_security(&device, code, &detail, now_ms());
                let _ = self
                    .audit
                    .append(Event::DeviceSecurity(record::DeviceSecurity {
                        device,
                        code: code.to_owned(),
                        detail,
                    }))
                    .await;
            }
            DeviceNotice::Identity { device, identity } => {
                self.inventory.identity(&device, identity, now_ms());
            }
            DeviceNotice::ForeignReply {
                device,
                answered,
                detail,
            } => self
                .inventory
                .foreign_reply(&device, &answered, &detail, now_ms()),
        }
    }

    /// One command message, from check to result.
    async fn handle(&mut self, m: Inbound) {
        self.stats.handled.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let digest = b64url(&sha256(&m.payload));
        let Some(c) = self.commands.as_mut() else {
            m.ack().await;
            return;
        };
        if m.retain {
            let r = Refusal::new(
                "retained",
                "a retained message on the command topic is never executed",
            );
            return self.refuse(&m, &digest, r, None).await;
        }
        if m.len > c.cfg.max_message_bytes {
            let r = Refusal::new(
                "too_large",
                format!(
                    "message is {} bytes, more than the limit of {}",
                    m.len, c.cfg.max_message_bytes
                ),
            );
            return self.refuse(&m, &digest, r, None).await;
        }
        let envelope = match Envelope::parse(&m.payload) {
            Ok(e) => e,
            Err(e) => {
                let r = Refusal::new(e.code(), e.to_string());
                return self.refuse(&m, &digest, r, None).await;
            }
        };
        // Before the token's id is spent: no audit, no command.
        if !self.audit.ensure_open().await {
            let r = Refusal::new(
                "audit_unavailable",
                "the audit log cannot be written, so no command is accepted",
            );
            return self.refuse(&m, &digest, r, None).await;
        }
        let Some(c) = self.commands.as_mut() else {
            return;
        };
        let verifier = match &c.verifier {
            Ok(v) => v,
            Err((code, why)) => {
                let r = Refusal::new(*code, why.clone());
                return self.refuse(&m, &digest, r, None).await;
            }
        };
        let cmd = match verifier.verify(envelope.command.as_bytes(), now) {
            Ok(cmd) => cmd,
            Err(e) => {
                let r = Refusal::new(e.code(), e.to_string());
                return self.refuse(&m, &digest, r, None).await;
            }
        };
        let mut approvals = Vec::with_capacity(envelope.approvals.len());
        for a in &envelope.approvals {
            match verifier.verify_approval(a.as_bytes(), &cmd, now) {
                Ok(v) => approvals.push(v),
                Err(e) => {
                    let r = Refusal::new(
                        format!("approval_{}", e.code()),
                        format!("an approval was refused: {e}"),
                    );
                    return self.refuse(&m, &digest, r, Some(&cmd)).await;
                }
            }
        }
        if !c.operators.take(&cmd.operator, now) {
            let r = Refusal::new(
                "operator_rate_limited",
                format!(
                    "operator `{}` sent more than {} command(s) per second (burst {})",
                    cmd.operator, c.cfg.operator_rate_per_s, c.cfg.operator_burst
                ),
            );
            return self.refuse(&m, &digest, r, Some(&cmd)).await;
        }
        let mut pc = cmd.to_policy_command(&approvals);
        // Windows and rate limits use the gateway's clock, not the
        // operator's claim of when the token was made.
        pc.at_ms = now;
        let shadow = c
            .candidate
            .as_ref()
            .and_then(|p| c.engine.shadow(p, &pc, &*c.current));
        let decision = c.engine.decide(&pc, &*c.current);
        let outcome = decision.outcome();
        let step = cmd.value.as_f64().and_then(|to| {
            let now = crate::policy::CurrentValues::current(&*c.current, &cmd.tag)?;
            Some((to - now.good_value()?.as_f64()?).abs())
        });
        self.flows.command(
            crate::watch::flows::CommandSeen {
                operator: &cmd.operator,
                kid: &cmd.kid,
                tag: &cmd.tag,
                step,
                permitted: matches!(outcome, Outcome::Permit { .. }),
            },
            now,
        );
        let (kind, code, reason) = match &outcome {
            Outcome::Permit { rule } => (
                record::Decision::Permit,
                None,
                format!("permitted by rule \"{rule}\""),
            ),
            Outcome::Deny(d) => (
                record::Decision::Deny,
                Some(d.code.code().to_owned()),
                d.reason.clone(),
            ),
        };
        let event = Event::CommandDecision(record::CommandDecision {
            command_id: cmd.jti.clone(),
            operator: cmd.operator.clone(),
            tag: cmd.tag.clone(),
            value: cmd.value.clone(),
            decision: kind,
            reason_code: code.clone(),
            reason: reason.clone(),
            rule_id: outcome.rule().map(str::to_owned),
            token: cmd.token.clone(),
            approval_tokens: approvals.iter().map(|a| a.token.clone()).collect(),
        });
        let decision_n = match self.audit.append(event).await {
            Ok(n) => n,
            Err(e) => {
                // The permit is dropped unused: nothing is written.
                drop(decision);
                let r = Refusal::new(
                    "audit_unavailable",
                    format!("the decision could not be audited, so it is not carried out: {e}"),
                );
                return self.refuse(&m, &digest, r, Some(&cmd)).await;
            }
        };
        m.ack().await;
        if let (Some(diff), Some(c)) = (shadow, self.commands.as_ref()) {
            let source = c
                .cfg
                .candidate_policy_dir
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            tracing::info!(command = %cmd.jti, %diff, "the candidate policy would decide differently");
            let _ = self
                .audit
                .append(Event::ShadowDifference(record::ShadowDifference {
                    command_id: cmd.jti.clone(),
                    tag: cmd.tag.clone(),
                    enforced: diff.enforced.short(),
                    enforced_rule: diff.enforced.rule().map(str::to_owned),
                    candidate: diff.candidate.short(),
                    candidate_rule: diff.candidate.rule().map(str::to_owned),
                    candidate_source: source,
                }))
                .await;
        }
        let rule = outcome.rule().map(str::to_owned);
        let mut result = self.result(&digest, Some(&cmd), Status::Denied, code, reason);
        result.rule_id = rule;
        result.audit_n = Some(decision_n);
        let permit = match decision {
            Decision::Deny(d) => {
                tracing::info!(command = %cmd.jti, operator = %cmd.operator, tag = %cmd.tag, code = d.code.code(), "command denied");
                self.flows.denied(&cmd.operator, d.code.code(), now);
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                return self.publish(result).await;
            }
            Decision::Permit(p) => p,
        };
        let Some(c) = self.commands.as_ref() else {
            return;
        };
        let written = c
            .writers
            .write(permit, cmd.expect.clone(), c.cfg.write_timeout)
            .await;
        let (status, code, reason, readback) = match written {
            Ok(report) => (
                Status::Applied,
                None,
                format!("written and read back as {}", report.readback),
                Some(report.readback),
            ),
            Err(f) => {
                tracing::warn!(command = %cmd.jti, tag = %cmd.tag, code = f.code, reason = %f.reason, "permitted command failed");
                (
                    Status::Failed,
                    Some(f.code.to_owned()),
                    f.reason,
                    f.readback,
                )
            }
        };
        let _ = self
            .audit
            .append(Event::CommandOutcome(record::CommandOutcome {
                command_id: cmd.jti.clone(),
                tag: cmd.tag.clone(),
                status: status.as_str().to_owned(),
                code: code.clone(),
                reason: reason.clone(),
                readback: readback.clone(),
                decision_n,
            }))
            .await;
        match status {
            Status::Applied => &self.stats.applied,
            _ => &self.stats.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        result.status = status;
        result.code = code;
        result.reason = reason;
        result.readback = readback;
        self.publish(result).await;
    }

    /// Audits a refusal, acknowledges the message, publishes the result.
    async fn refuse(
        &mut self,
        m: &Inbound,
        digest: &str,
        r: Refusal,
        cmd: Option<&VerifiedCommand>,
    ) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        self.flows.refused(&r.code, now_ms());
        tracing::warn!(code = %r.code, detail = %r.detail, "command message refused");
        let n = self
            .audit
            .append(Event::AuthFailure(record::AuthFailure {
                code: r.code.clone(),
                detail: r.detail.clone(),
                command_id: cmd.map(|c| c.jti.clone()),
                subject: cmd.map(|c| c.operator.clone()),
                message_sha256: digest.to_owned(),
                message_len: m.len as u64,
            }))
            .await
            .ok();
        m.ack().await;
        let mut result = self.result(digest, cmd, Status::Refused, Some(r.code), r.detail);
        result.audit_n = n;
        self.publish(result).await;
    }

    async fn dropped(&mut self, d: Dropped) {
        self.stats.dropped.fetch_add(d.count, Ordering::Relaxed);
        self.flows.dropped(d.code, d.count, d.last_ms);
        tracing::warn!(
            code = d.code,
            count = d.count,
            "command messages dropped unread"
        );
        let _ = self
            .audit
            .append(Event::CommandsDropped(record::CommandsDropped {
                code: d.code.to_owned(),
                count: d.count,
                first_ms: d.first_ms,
                last_ms: d.last_ms,
            }))
            .await;
    }

    fn result(
        &self,
        digest: &str,
        cmd: Option<&VerifiedCommand>,
        status: Status,
        code: Option<String>,
        reason: String,
    ) -> CommandResult {
        CommandResult {
            v: twin_model::WIRE_VERSION,
            gateway_id: self.gateway_id.clone(),
            command_id: cmd.map(|c| c.jti.clone()),
            operator: cmd.map(|c| c.operator.clone()),
            tag: cmd.map(|c| c.tag.clone()),
            value: cmd.map(|c| c.value.clone()),
            status,
            code,
            rule_id: None,
            reason,
            readback: None::<Value>,
            message_sha256: digest.to_owned(),
            audit_n: None,
            ts_ms: now_ms(),
        }
    }

    /// Runs the security self-check, logs its findings and publishes the
    /// report signed and retained on the self-check topic.
    async fn selfcheck(&self) {
        let cfg = self.config.clone();
        let report = tokio::task::spawn_blocking(move || {
            let mut opts = crate::selfcheck::CheckOptions::at(now_ms());
            opts.dev_profile = cfg.gateway.dev_profile;
            crate::selfcheck::check(&cfg, &opts)
        })
        .await;
        let Ok(report) = report else {
            return;
        };
        for f in &report.findings {
            if f.severity >= crate::selfcheck::Severity::Medium {
                tracing::warn!(code = f.code, severity = %f.severity, subject = %f.subject, fix = %f.fix, "security self-check: {}", f.message);
            } else {
                tracing::info!(code = f.code, severity = %f.severity, subject = %f.subject, "security self-check: {}", f.message);
            }
        }
        let json = serde_json::to_vec(&report).expect("report serializes");
        let msg = Outgoing {
            topic: self.topics.selfcheck(),
            payload: self
                .key
                .sign_compact(crate::selfcheck::REPORT_TYP, &json)
                .into_bytes(),
            retain: true,
            kind: OutgoingKind::Alert,
        };
        let _ = self.out.send(msg).await;
    }

    /// Records an alert in the audit log and publishes it signed.
    async fn emit_alert(&self, alert: twin_model::alert::Alert) {
        tracing::warn!(code = %alert.code, severity = alert.severity.as_str(), subject = %alert.subject, count = alert.count, "{}", alert.message);
        if let Ok(mut m) = self.stats.alerts_by_code.lock() {
            *m.entry(alert.code.clone()).or_default() += alert.count;
        }
        let json = serde_json::to_vec(&alert).expect("alert serializes");
        let _ = self.audit.append(Event::Alert(alert)).await;
        let msg = Outgoing {
            topic: self.topics.alerts(),
            payload: self
                .key
                .sign_compact(twin_model::alert::ALERT_TYP, &json)
                .into_bytes(),
            retain: false,
            kind: OutgoingKind::Alert,
        };
        let _ = self.out.send(msg).await;
    }

    async fn publish(&self, r: CommandResult) {
        if let Ok(mut m) = self.stats.by_code.lock() {
            let code = r.code.clone().unwrap_or_else(|| "ok".into());
            *m.entry((r.status.as_str().to_owned(), code)).or_default() += 1;
        }
        let json = serde_json::to_vec(&r).expect("result serializes");
        let msg = Outgoing {
            topic: self.topics.result(),
            payload: self.key.sign_compact(RESULT_TYP, &json).into_bytes(),
            retain: false,
            kind: OutgoingKind::Result,
        };
        let _ = self.out.send(msg).await;
    }

    /// Loads the policy (and the candidate) when their files changed, or
    /// at start.
    async fn reload(&mut self, at_start: bool) {
        let Some(c) = self.commands.as_mut() else {
            return;
        };
        let mut events = Vec::new();
        let fp = fingerprint(&c.cfg.policy_dir);
        if at_start || fp != c.policy_fp {
            c.policy_fp = fp.clone();
            let dir = c.cfg.policy_dir.clone();
            let source = dir.display().to_string();
            let (engine, loaded) = Engine::load(&dir, &c.config);
            match loaded {
                Ok(warnings) => {
                    let (mode, rules) = engine
                        .policy()
                        .map(|p| (p.mode().as_str().to_owned(), p.rule_ids().count() as u64))
                        .unwrap_or_default();
                    tracing::info!(policy = %source, %mode, rules, warnings = warnings.len(), "policy in force");
                    for w in &warnings {
                        tracing::warn!(warning = %w.0, "policy warning");
                    }
                    c.engine.replace(engine);
                    self.inventory.set_policy(fp.clone());
                    self.stats.policy_loads.fetch_add(1, Ordering::Relaxed);
                    events.push(Event::PolicyLoaded(record::PolicyLoaded {
                        source,
                        sha256: fp.unwrap_or_default(),
                        mode,
                        rules,
                    }));
                }
                Err(errors) => {
                    let keep = !at_start && fp.is_some() && c.engine.policy().is_some();
                    if keep {
                        tracing::error!(policy = %source, errors = errors.errors.len(), "policy change REJECTED; the previous policy stays in force");
                    } else {
                        tracing::error!(policy = %source, errors = errors.errors.len(), "no valid policy: every command is denied");
                        c.engine.replace(engine);
                        self.inventory.set_policy(None);
                    }
                    for e in &errors.errors {
                        tracing::error!("{e}");
                    }
                    self.stats.policy_rejections.fetch_add(1, Ordering::Relaxed);
                    events.push(Event::PolicyRejected(record::PolicyRejected {
                        source,
                        sha256: fp,
                        errors: errors.errors.iter().map(|e| e.to_string()).collect(),
                    }));
                }
            }
        }
        if let Some(dir) = c.cfg.candidate_policy_dir.clone() {
            let fp = fingerprint(&dir);
            if at_start || fp != c.candidate_fp {
                c.candidate_fp = fp.clone();
                let source = dir.display().to_string();
                match Policy::load_dir(&dir, &c.config) {
                    Ok((p, _)) => {
                        tracing::info!(policy = %source, "candidate policy evaluated beside the policy in force (shadow mode)");
                        events.push(Event::PolicyLoaded(record::PolicyLoaded {
                            source,
                            sha256: fp.unwrap_or_default(),
                            mode: "shadow".into(),
                            rules: p.rule_ids().count() as u64,
                        }));
                        c.candidate = Some(p);
                    }
                    Err(errors) => {
                        tracing::error!(policy = %source, errors = errors.errors.len(), "candidate policy rejected; no shadow evaluation");
                        c.candidate = None;
                        events.push(Event::PolicyRejected(record::PolicyRejected {
                            source,
                            sha256: fp,
                            errors: errors.errors.iter().map(|e| e.to_string()).collect(),
                        }));
                    }
                }
            }
        }
        if let Some(c) = self.commands.as_ref() {
            let in_force = c
                .engine
                .policy()
                .is_some_and(|p| p.mode() == crate::policy::Mode::Enforce);
            self.stats
                .policy_in_force
                .store(in_force, std::sync::atomic::Ordering::Relaxed);
        }
        for e in events {
            let _ = self.audit.append(e).await;
        }
    }
}

/// Loads the operator keys and the replay store.
fn load_verifier(
    cfg: &Config,
    cc: &CommandsConfig,
) -> Result<TokenVerifier, (&'static str, String)> {
    let trust = OperatorTrustStore::load_dir(&cc.operator_keys_dir).map_err(|e| {
        (
            "operator_keys_unavailable",
            format!(
                "{}: cannot load the operator keys: {e}",
                cc.operator_keys_dir.display()
            ),
        )
    })?;
    if trust.is_empty() {
        tracing::warn!(dir = %cc.operator_keys_dir.display(), "no operator key (*.pem) in the folder: every command is refused as unknown_kid");
    }
    let mut vc = VerifierConfig::new(cfg.gateway.id.clone(), cc.issuer.clone());
    vc.max_token_bytes = cc.max_message_bytes;
    vc.leeway_ms = cc.clock_leeway.as_millis() as u64;
    vc.max_lifetime_ms = cc.max_token_lifetime.as_millis() as u64;
    let replay = ReplayStore::open(
        &cfg.gateway.data_dir,
        ReplayOptions {
            capacity: cc.replay_capacity,
            leeway_ms: vc.leeway_ms,
        },
    )
    .map_err(|e| {
        (
            "replay_store_unavailable",
            format!("the replay store cannot be opened: {e}"),
        )
    })?;
    Ok(TokenVerifier::new(trust, vc, replay))
}

/// A digest of the policy files of `dir` (names and contents), or `None`
/// when the folder is missing or holds no policy file.
fn fingerprint(dir: &Path) -> Option<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.ends_with(".toml") && !name.ends_with(".tests.toml")
        })
        .collect();
    if files.is_empty() {
        return None;
    }
    files.sort();
    let mut all = Vec::new();
    for f in files {
        all.extend_from_slice(f.to_string_lossy().as_bytes());
        all.push(0);
        // An unreadable file changes the digest too (and fails the load).
        match std::fs::read(&f) {
            Ok(bytes) => all.extend_from_slice(&sha256(&bytes)),
            Err(e) => all.extend_from_slice(e.to_string().as_bytes()),
        }
        all.push(0);
    }
    Some(b64url(&sha256(&all)))
}
