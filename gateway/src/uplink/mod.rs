//! The uplink: device samples in, signed messages out.
//!
//! Stages, in pipeline order:
//! 1. [`batcher`]: collects samples from every device into batches; a batch is
//!    closed when a poll cycle completes or `flush_interval_ms` after its
//!    first sample, whichever comes first, and never grows past the
//!    configured message size.
//! 2. [`signer`]: gives each batch the next sequence number and the hash of
//!    the previous batch, and signs it (JWS, EdDSA).
//! 3. [`writer`]: stores signed batches and the chain position in the
//!    durable outbox ([`crate::outbox`]), one fsync per group commit, then
//!    wakes the MQTT link, which publishes from the outbox.
//! 4. [`reported`]: folds every signed batch into the reported twin and
//!    signs a new version at most every `reported_interval_ms`; it goes to
//!    the MQTT link directly (retained, latest wins), not through the outbox.
//!
//! [`state`] holds the chain position type and the checkpoint file.

pub mod batcher;
pub mod reported;
pub mod signer;
pub mod state;
pub mod writer;

use crate::device::DeviceEvent;
use crate::mqtt::Outgoing;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

/// Counters of the uplink, readable while it runs.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub points: AtomicU64,
    pub batches: AtomicU64,
    pub last_seq: AtomicU64,
    pub reported_versions: AtomicU64,
}

/// The stages of the uplink, ready to run.
pub struct Uplink {
    pub batcher: batcher::Batcher,
    pub signer: signer::Signer,
    pub reported: reported::Reporter,
    pub flush_interval: Duration,
    pub reported_interval: Duration,
    pub stats: Arc<UplinkStats>,
    /// Current values for the command policy (only when commands are
    /// configured).
    pub current: Option<Arc<crate::downlink::current::CurrentTable>>,
    /// Plausibility checks of the tags that have them (flags before signing).
    pub sensors: Option<crate::watch::sensors::SensorWatch>,
}

/// The uplink task. Ends when every device sender is dropped (devices
/// stopped), after flushing what is buffered and signing a final reported
/// twin; then drops `store` and `out`, which lets the writer and the MQTT
/// link finish.
pub async fn run(
    uplink: Uplink,
    mut input: mpsc::Receiver<DeviceEvent>,
    store: mpsc::Sender<writer::WriteJob>,
    out: mpsc::Sender<Outgoing>,
) {
    let Uplink {
        mut batcher,
        mut signer,
        mut reported,
        flush_interval,
        reported_interval,
        stats,
        current,
        mut sensors,
    } = uplink;
    let mut watch_tick = tokio::time::interval(Duration::from_secs(1));
    watch_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut twin_tick = tokio::time::interval(reported_interval);
    twin_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deadline: Option<Instant> = None;
    loop {
        let flush_at = deadline;
        tokio::select! {
            ev = input.recv() => match ev {
                Some(mut ev) => {
                    if let Some(w) = sensors.as_mut() {
                        for s in &mut ev.samples {
                            w.check(s);
                        }
                    }
                    let cycle_done = ev.cycle_done;
                    if let Some(current) = &current {
                        current.update(&ev.samples);
                    }
                    if let Some(id) = &ev.command_id {
                        for s in &ev.samples {
                            reported.apply_command(s, id);
                        }
                    }
                    for full in batcher.push(ev.samples) {
                        emit(&mut signer, &mut reported, &store, full, &stats).await;
                    }
                    if cycle_done {
                        if let Some(b) = batcher.take() {
                            emit(&mut signer, &mut reported, &store, b, &stats).await;
                        }
                        deadline = None;
                    } else if deadline.is_none() && !batcher.is_empty() {
                        deadline = Some(Instant::now() + flush_interval);
                    }
                }
                None => break,
            },
            _ = async { tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)).await }, if flush_at.is_some() => {
                if let Some(b) = batcher.take() {
                    emit(&mut signer, &mut reported, &store, b, &stats).await;
                }
                deadline = None;
            }
            _ = watch_tick.tick(), if sensors.is_some() => {
                if let Some(w) = sensors.as_mut() {
                    w.tick(crate::clock::now_ms());
                }
            }
            _ = twin_tick.tick() => {
                if let Some(msg) = reported.sign_if_changed(signer.seq()) {
                    stats.reported_versions.fetch_add(1, Ordering::Relaxed);
                    if out.send(msg).await.is_err() { break; }
                }
            }
        }
    }
    if let Some(b) = batcher.take() {
        emit(&mut signer, &mut reported, &store, b, &stats).await;
    }
    if let Some(msg) = reported.sign_if_changed(signer.seq()) {
        let _ = out.send(msg).await;
    }
}

async fn emit(
    signer: &mut signer::Signer,
    reported: &mut reported::Reporter,
    store: &mpsc::Sender<writer::WriteJob>,
    samples: Vec<twin_model::Sample>,
    stats: &UplinkStats,
) {
    for s in &samples {
        reported.apply(s);
    }
    let n = samples.len() as u64;
    let (record, chain) = signer.sign(samples, reported.version());
    stats.points.fetch_add(n, Ordering::Relaxed);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.last_seq.store(signer.seq(), Ordering::Relaxed);
    // The writer only goes away at shutdown, after this task has ended.
    let _ = store.send(writer::WriteJob { record, chain }).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::OutgoingKind;
    use std::collections::HashMap;
    use twin_model::{Sample, SigningKey, Value};

    fn uplink(flush: Duration) -> Uplink {
        let key = Arc::new(SigningKey::from_seed(&[5; 32]).unwrap());
        let signer = signer::Signer::new(key.clone(), "gw".into(), state::ChainState::GENESIS);
        Uplink {
            batcher: batcher::Batcher::new("gw", 17, 131_072),
            signer,
            reported: reported::Reporter::new(
                "gw",
                0,
                HashMap::new(),
                key,
                "twin/gw/reported".into(),
                131_072,
            ),
            flush_interval: flush,
            reported_interval: Duration::from_secs(3600),
            stats: Arc::new(UplinkStats::default()),
            current: None,
            sensors: None,
        }
    }

    fn event(n: usize, cycle_done: bool) -> DeviceEvent {
        DeviceEvent {
            device: "d".into(),
            samples: (0..n)
                .map(|i| Sample::good(format!("t{i}"), Value::Int(i as i64), 1))
                .collect(),
            cycle_done,
            command_id: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_completed_cycle_flushes_at_once_and_a_partial_one_after_the_flush_interval() {
        let (tx, rx) = mpsc::channel(8);
        let (out_tx, mut out) = mpsc::channel(8);
        let (store_tx, mut store) = mpsc::channel(8);
        let task = tokio::spawn(run(uplink(Duration::from_millis(5)), rx, store_tx, out_tx));

        tx.send(event(3, true)).await.unwrap();
        let j = store.recv().await.unwrap();
        assert_eq!((j.record.seq, j.record.points, j.chain.seq), (1, 3, 1));

        let sent = Instant::now();
        tx.send(event(2, false)).await.unwrap();
        let j = store.recv().await.unwrap();
        assert_eq!((j.record.seq, j.record.points), (2, 2));
        assert_eq!(
            sent.elapsed(),
            Duration::from_millis(5),
            "flushed by the timer, not before"
        );

        // Closing the input ends the task after a final reported twin.
        drop(tx);
        let last = out.recv().await.unwrap();
        assert!(
            matches!(last.kind, OutgoingKind::Reported { version: 3 }),
            "{:?}",
            last.kind
        );
        task.await.unwrap();
        assert!(
            store.recv().await.is_none(),
            "the writer's input is closed at the end"
        );
    }
}
