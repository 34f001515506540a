//! The metrics and health endpoint: Prometheus text exposition on
//! `GET /metrics`, readiness on `GET /health`.
//!
//! It listens only where `[metrics] listen` says (127.0.0.1:9464 by
//! default when the table is present; no listener without it), answers
//! one request per connection, reads at most 8 KiB of request within 5 s,
//! and serves nothing else: it is the gateway's only listening port and it
//! accepts no input beyond the request line.
//!
//! Every value is read from the counters the stages keep anyway
//! ([`crate::uplink::UplinkStats`], [`crate::mqtt::LinkStats`],
//! [`crate::downlink::DownlinkStats`], the outbox's, and each device's
//! [`DeviceStats`]); nothing is counted twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::downlink::DownlinkStats;
use crate::mqtt::{LinkState, LinkStats};
use crate::outbox::Outbox;
use crate::uplink::UplinkStats;

/// Counters of one device, kept by its driver.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Completed read cycles (Modbus polls, OPC UA notifications or reads).
    pub reads: AtomicU64,
    /// Reads that failed (timeouts, transport or protocol errors, exceptions).
    pub errors: AtomicU64,
    /// Sum of read durations, microseconds (with `reads`, the mean).
    pub read_us_total: AtomicU64,
    /// Whether the device is connected now.
    pub connected: AtomicBool,
    /// Writes served, and those that failed.
    pub writes: AtomicU64,
    pub write_failures: AtomicU64,
    /// Reads answered with a Modbus exception (part of `errors`).
    pub exceptions: AtomicU64,
    /// Reads that got no answer in time (part of `errors`).
    pub timeouts: AtomicU64,
    /// Connections made (the first and every reconnect).
    pub connects: AtomicU64,
    /// The last time the device answered (a read cycle without a transport,
    /// timeout or protocol failure; for OPC UA subscriptions, while the
    /// session stands), ms since the Unix epoch (0: never).
    pub last_seen_ms: AtomicU64,
}

impl DeviceStats {
    /// Records one read cycle.
    pub fn read(&self, took: Duration, ok: bool) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_us_total
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if ok {
            self.last_seen_ms
                .store(crate::clock::now_ms(), Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Everything the endpoint reports.
#[derive(Clone)]
pub struct Sources {
    pub uplink: Arc<UplinkStats>,
    pub link: Arc<LinkStats>,
    pub link_state: watch::Receiver<LinkState>,
    pub downlink: Arc<DownlinkStats>,
    pub outbox: Option<Arc<Outbox>>,
    /// Device name and its counters, in configuration order.
    pub devices: Vec<(String, Arc<DeviceStats>)>,
    /// Whether `[commands]` is configured (readiness then needs a policy).
    pub commands: bool,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values come from configuration names and stable codes (ASCII
/// letters, digits, `_ . - :`), escaped anyway.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Resident memory of this process in bytes (Linux), if known.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

impl Sources {
    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);

        // One sample per device of each: name, type, help, value.
        type Pick = fn(&DeviceStats) -> String;
        fn count(a: &AtomicU64) -> String {
            a.load(Ordering::Relaxed).to_string()
        }
        let per_device: [(&str, &str, &str, Pick); 7] = [
            (
                "twin_device_reads_total",
                "counter",
                "Read cycles per device (Modbus polls, OPC UA notifications or reads).",
                |s| count(&s.reads),
            ),
            (
                "twin_device_read_errors_total",
                "counter",
                "Failed reads per device (timeouts, transport and protocol errors, exceptions).",
                |s| count(&s.errors),
            ),
            (
                "twin_device_read_seconds_total",
                "counter",
                "Time spent reading per device; divided by twin_device_reads_total, the mean latency.",
                |s| format!("{:.6}", s.read_us_total.load(Ordering::Relaxed) as f64 / 1e6),
            ),
            (
                "twin_device_connected",
                "gauge",
                "1 when the device is connected.",
                |s| u8::from(s.connected.load(Ordering::Relaxed)).to_string(),
            ),
            (
                "twin_device_exceptions_total",
                "counter",
                "Reads answered with a Modbus exception, per device.",
                |s| count(&s.exceptions),
            ),
            (
                "twin_device_timeouts_total",
                "counter",
                "Reads that got no answer in time, per device.",
                |s| count(&s.timeouts),
            ),
            (
                "twin_device_connects_total",
                "counter",
                "Connections made per device (the first and every reconnect).",
                |s| count(&s.connects),
            ),
        ];
        for (name, kind, help, pick) in per_device {
            metric(&mut o, name, kind, help);
            for (d, s) in &self.devices {
                let _ = writeln!(o, "{name}{{device=\"{}\"}} {}", esc(d), pick(s));
            }
        }
        metric(
            &mut o,
            "twin_device_writes_total",
            "counter",
            "Command writes served per device, and those that failed.",
        );
        for (d, s) in &self.devices {
            let _ = writeln!(
                o,
                "twin_device_writes_total{{device=\"{}\",result=\"ok\"}} {}",
                esc(d),
                ld(&s.writes).saturating_sub(ld(&s.write_failures))
            );
            let _ = writeln!(
                o,
                "twin_device_writes_total{{device=\"{}\",result=\"failed\"}} {}",
                esc(d),
                ld(&s.write_failures)
            );
        }

        metric(
            &mut o,
            "twin_points_total",
            "counter",
            "Points signed into batches.",
        );
        let _ = writeln!(o, "twin_points_total {}", ld(&self.uplink.points));
        metric(
            &mut o,
            "twin_batches_signed_total",
            "counter",
            "Batches signed.",
        );
        let _ = writeln!(o, "twin_batches_signed_total {}", ld(&self.uplink.batches));
        metric(
            &mut o,
            "twin_last_seq",
            "gauge",
            "Sequence number of the latest signed batch.",
        );
        let _ = writeln!(o, "twin_last_seq {}", ld(&self.uplink.last_seq));
        metric(
            &mut o,
            "twin_batches_published_total",
            "counter",
            "Batches handed to the broker (re-sends included).",
        );
        let _ = writeln!(
            o,
            "twin_batches_published_total {}",
            ld(&self.link.batches_sent)
        );
        metric(
            &mut o,
            "twin_mqtt_acks_total",
            "counter",
            "PUBACKs received.",
        );
        let _ = writeln!(o, "twin_mqtt_acks_total {}", ld(&self.link.acked));
        metric(
            &mut o,
            "twin_mqtt_connects_total",
            "counter",
            "Broker connections made, and attempts that failed.",
        );
        let _ = writeln!(
            o,
            "twin_mqtt_connects_total{{result=\"ok\"}} {}",
            ld(&self.link.connects)
        );
        let _ = writeln!(
            o,
            "twin_mqtt_connects_total{{result=\"failed\"}} {}",
            ld(&self.link.connect_failures)
        );
        metric(
            &mut o,
            "twin_mqtt_connected",
            "gauge",
            "1 when connected to the broker.",
        );
        let connected = matches!(*self.link_state.borrow(), LinkState::Connected);
        let _ = writeln!(o, "twin_mqtt_connected {}", u8::from(connected));

        if let Some(ob) = &self.outbox {
            let s = &ob.stats;
            metric(
                &mut o,
                "twin_outbox_batches",
                "gauge",
                "Batches stored and not yet acknowledged.",
            );
            let _ = writeln!(o, "twin_outbox_batches {}", ld(&s.records));
            metric(
                &mut o,
                "twin_outbox_bytes",
                "gauge",
                "Bytes of stored batches.",
            );
            let _ = writeln!(o, "twin_outbox_bytes {}", ld(&s.bytes));
            metric(
                &mut o,
                "twin_outbox_dropped_batches_total",
                "counter",
                "Batches dropped at a bound (each accounted by a signed gap record).",
            );
            let _ = writeln!(
                o,
                "twin_outbox_dropped_batches_total {}",
                ld(&s.dropped_batches)
            );
            metric(
                &mut o,
                "twin_outbox_dropped_points_total",
                "counter",
                "Points in dropped batches.",
            );
            let _ = writeln!(
                o,
                "twin_outbox_dropped_points_total {}",
                ld(&s.dropped_points)
            );
            metric(
                &mut o,
                "twin_outbox_storage_errors_total",
                "counter",
                "Failed outbox writes.",
            );
            let _ = writeln!(
                o,
                "twin_outbox_storage_errors_total {}",
                ld(&s.storage_errors)
            );
        }

        let dl = &self.downlink;
        metric(
            &mut o,
            "twin_commands_total",
            "counter",
            "Command messages by outcome and reason code.",
        );
        let by_code: BTreeMap<(String, String), u64> =
            dl.by_code.lock().map(|m| m.clone()).unwrap_or_default();
        for ((status, code), n) in &by_code {
            let _ = writeln!(
                o,
                "twin_commands_total{{status=\"{}\",code=\"{}\"}} {n}",
                esc(status),
                esc(code)
            );
        }
        metric(
            &mut o,
            "twin_commands_dropped_total",
            "counter",
            "Command messages dropped unread (global rate limit, full queue).",
        );
        let _ = writeln!(o, "twin_commands_dropped_total {}", ld(&dl.dropped));
        metric(
            &mut o,
            "twin_policy_loads_total",
            "counter",
            "Policies loaded, and policy changes rejected.",
        );
        let _ = writeln!(
            o,
            "twin_policy_loads_total{{result=\"loaded\"}} {}",
            ld(&dl.policy_loads)
        );
        let _ = writeln!(
            o,
            "twin_policy_loads_total{{result=\"rejected\"}} {}",
            ld(&dl.policy_rejections)
        );
        metric(
            &mut o,
            "twin_policy_in_force",
            "gauge",
            "1 when a valid policy is in force.",
        );
        let _ = writeln!(
            o,
            "twin_policy_in_force {}",
            u8::from(dl.policy_in_force.load(Ordering::Relaxed))
        );

        metric(
            &mut o,
            "twin_alerts_total",
            "counter",
            "Alerts by code (summarised repeats counted).",
        );
        let alerts: BTreeMap<String, u64> = dl
            .alerts_by_code
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        for (code, n) in &alerts {
            let _ = writeln!(o, "twin_alerts_total{{code=\"{}\"}} {n}", esc(code));
        }

        if let Some(rss) = resident_bytes() {
            metric(
                &mut o,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the gateway process.",
            );
            let _ = writeln!(o, "process_resident_memory_bytes {rss}");
        }
        o
    }

    /// Ready when the broker is connected, every device is connected and,
    /// with commands configured, a policy is in force; otherwise the
    /// reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if !matches!(*self.link_state.borrow(), LinkState::Connected) {
            why.push("broker not connected".to_string());
        }
        for (d, s) in &self.devices {
            if !s.connected.load(Ordering::Relaxed) {
                why.push(format!("device {d} not connected"));
            }
        }
        if self.commands && !self.downlink.policy_in_force.load(Ordering::Relaxed) {
            why.push("no valid command policy in force".to_string());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }
}

/// Serves `/metrics` and `/health` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, sources: Sources, stop: CancellationToken) {
    loop {
        let (mut conn, _) = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let line = head.lines().next().unwrap_or_default();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", sources.render()),
                ("GET", "/health") => match sources.readiness() {
                    Ok(()) => ("200 OK", "ready\n".to_string()),
                    Err(why) => (
                        "503 Service Unavailable",
                        format!("not ready: {}\n", why.join("; ")),
                    ),
                },
                ("GET", _) => ("404 Not Found", "not found\n".to_string()),
                _ => ("405 Method Not Allowed", "GET only\n".to_string()),
            };
            let content_type = if path == "/metrics" {
                "text/plain; version=0.0.4; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(5), conn.write_all(response.as_bytes()))
                    .await;
            let _ = conn.shutdown().await;
        });
    }
}
