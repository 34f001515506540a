//! Admission: what happens to a command message before anything in it is
//! read. Cheap on purpose, so a flood costs the gateway little.
//!
//! In order: a message the MQTT link could not queue (`overflow`) is
//! counted and acknowledged; one beyond the global rate limit likewise
//! (`rate_limited`); the rest go to the decision worker's bounded queue,
//! and when that is full they are counted and acknowledged too
//! (`queue_full`). Counted drops reach the audit log as one
//! `commands_dropped` record per code and second, not one per message.
//! Retained and oversized messages are passed on (without reading them) so
//! that each is refused and audited with its own reason code.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::limit::Bucket;
use crate::clock::now_ms;
use crate::mqtt::Inbound;

/// Command messages waiting for the decision worker.
pub const WORK_QUEUE: usize = 64;

/// How often counted drops are summarised.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);

/// Drops of one kind since the last summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub code: &'static str,
    pub count: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// What the worker gets.
#[derive(Debug)]
pub enum Work {
    Message(Inbound),
    Dropped(Dropped),
}

/// Runs admission until `stop` is cancelled or the link is gone.
pub async fn run(
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
    work: mpsc::Sender<Work>,
    mut global: Bucket,
    stop: CancellationToken,
) {
    let mut dropped: BTreeMap<&'static str, Dropped> = BTreeMap::new();
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            m = inbound.recv() => {
                let Some(m) = m else { break };
                let now = now_ms();
                let code = if m.overflow {
                    Some("queue_full")
                } else if !global.take(now) {
                    Some("rate_limited")
                } else {
                    None
                };
                let m = match code {
                    None => match work.try_send(Work::Message(m)) {
                        Ok(()) => continue,
                        Err(mpsc::error::TrySendError::Full(Work::Message(m))) => {
                            count(&mut dropped, "queue_full", now);
                            m
                        }
                        Err(_) => break,
                    },
                    Some(code) => {
                        count(&mut dropped, code, now);
                        m
                    }
                };
                m.ack().await;
            }
            _ = tick.tick() => {
                while let Some((code, d)) = dropped.pop_first() {
                    match work.try_send(Work::Dropped(d)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            // Keep counting; summarised when there is room.
                            dropped.insert(code, d);
                            break;
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

fn count(dropped: &mut BTreeMap<&'static str, Dropped>, code: &'static str, now: u64) {
    let d = dropped.entry(code).or_insert(Dropped {
        code,
        count: 0,
        first_ms: now,
        last_ms: now,
    });
    d.count += 1;
    d.last_ms = now;
}
