//! The downlink's side of the audit log: appends records from a blocking
//! thread, forwards every written line to the audit topic, and reopens the
//! log after a failure.
//!
//! While the log cannot be written, [`AuditSink::append`] fails and the
//! downlink refuses commands (`audit_unavailable`); telemetry is not
//! affected. Each later record first tries to reopen the log, which
//! verifies the file and starts a new run in it (or sets a broken file
//! aside), so commands resume once the disk is usable again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use twin_model::audit::Event;
use twin_model::SigningKey;

use crate::audit::{AuditError, AuditLog, AuditOptions};
use crate::mqtt::{Outgoing, OutgoingKind};

/// Owner of the audit log file for the running gateway.
pub struct AuditSink {
    log: Arc<Mutex<Option<AuditLog>>>,
    path: PathBuf,
    key: Arc<SigningKey>,
    gateway_id: String,
    options: AuditOptions,
    topic: String,
    out: mpsc::Sender<Outgoing>,
}

impl AuditSink {
    /// Opens the log (a failure is logged and leaves the sink closed:
    /// commands are then refused until it can be opened).
    pub async fn open(
        path: PathBuf,
        key: Arc<SigningKey>,
        gateway_id: String,
        options: AuditOptions,
        topic: String,
        out: mpsc::Sender<Outgoing>,
    ) -> AuditSink {
        let sink = AuditSink {
            log: Arc::new(Mutex::new(None)),
            path,
            key,
            gateway_id,
            options,
            topic,
            out,
        };
        if let Err(e) = sink.reopen().await {
            tracing::error!(error = %e, "the audit log cannot be opened; commands are refused until it can (telemetry continues)");
        }
        sink
    }

    /// Whether the log is open, after trying to reopen it if it is not.
    pub async fn ensure_open(&self) -> bool {
        self.is_open() || self.reopen().await.is_ok()
    }

    /// Whether the log is open and writable.
    pub fn is_open(&self) -> bool {
        self.log.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    async fn reopen(&self) -> Result<(), AuditError> {
        let (path, key, id, options) = (
            self.path.clone(),
            self.key.clone(),
            self.gateway_id.clone(),
            self.options.clone(),
        );
        let log = self.log.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let opened = AuditLog::open_with(&path, key, &id, options)?;
            let lines: Vec<String> = opened
                .opened()
                .lines
                .iter()
                .map(|l| l.line.clone())
                .collect();
            if let Some((to, bad)) = &opened.opened().set_aside {
                tracing::error!(file = %to.display(), line = bad.line, reason = bad.reason.code(), "the audit log did not verify; it was set aside as evidence and a new log started");
            }
            *log.lock().expect("audit lock") = Some(opened);
            Ok::<_, AuditError>(lines)
        })
        .await
        .map_err(|e| AuditError::Failed {
            path: self.path.clone(),
            cause: format!("audit task: {e}"),
        })??;
        self.forward(opened).await;
        Ok(())
    }

    /// Runs `op` on the open log in a blocking thread, forwards the lines
    /// it wrote, and drops the log after a failure (a failed log refuses
    /// every later record; the next record tries to reopen it).
    async fn with_log<T: Send + 'static>(
        &self,
        what: &'static str,
        op: impl FnOnce(AuditLog) -> (Option<AuditLog>, Result<(T, Vec<String>), AuditError>)
            + Send
            + 'static,
    ) -> Result<T, AuditError> {
        let log = self.log.clone();
        let path = self.path.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut guard = log.lock().expect("audit lock");
            let Some(l) = guard.take() else {
                return Err(AuditError::Failed {
                    path,
                    cause: "the audit log is closed".into(),
                });
            };
            let (back, result) = op(l);
            *guard = if result.is_ok() { back } else { None };
            result
        })
        .await
        .map_err(|e| AuditError::Failed {
            path: self.path.clone(),
            cause: format!("audit task: {e}"),
        })?;
        match done {
            Ok((value, lines)) => {
                self.forward(lines).await;
                Ok(value)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot {what}; commands are refused until the audit log can be written");
                Err(e)
            }
        }
    }

    /// Writes one record (fsynced before this returns `Ok`) and forwards
    /// the written lines; returns the record's index.
    pub async fn append(&self, event: Event) -> Result<u64, AuditError> {
        if !self.is_open() {
            self.reopen().await?;
        }
        self.with_log("write the audit log", move |mut l| {
            let r = l
                .append(&event)
                .map(|r| (r.n, r.lines().map(str::to_owned).collect()));
            (Some(l), r)
        })
        .await
    }

    /// Writes a checkpoint if one is due.
    pub async fn checkpoint_if_due(&self) {
        if !self.is_open() {
            return;
        }
        let _ = self
            .with_log("write an audit checkpoint", |mut l| {
                let r = l
                    .checkpoint_if_due()
                    .map(|w| ((), w.map(|w| w.line).into_iter().collect()));
                (Some(l), r)
            })
            .await;
    }

    /// Closes the log in order (`stopped` and a final checkpoint).
    pub async fn close(&self, reason: &str) {
        if !self.is_open() {
            return;
        }
        let reason = reason.to_owned();
        let _ = self
            .with_log("close the audit log in order", move |l| {
                let r = l
                    .close(&reason)
                    .map(|lines| ((), lines.into_iter().map(|w| w.line).collect()));
                (None, r)
            })
            .await;
    }

    async fn forward(&self, lines: Vec<String>) {
        for line in lines {
            let msg = Outgoing {
                topic: self.topic.clone(),
                payload: line.into_bytes(),
                retain: false,
                kind: OutgoingKind::Audit,
            };
            // The link queues while disconnected; it is gone only at the
            // end of shutdown, and the file keeps every line.
            let _ = self.out.send(msg).await;
        }
    }
}
