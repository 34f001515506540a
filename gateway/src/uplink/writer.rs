//! Persisting: signed batches into the outbox, in group commits.
//!
//! The writer runs on its own thread. It takes every batch waiting for it
//! and stores them in one durable transaction (one fsync), so under load a
//! commit carries many batches and at low rates each batch is stored at
//! once. After each commit it wakes the MQTT link. If a commit fails (disk
//! full, I/O error) the batches are counted as dropped and a signed gap
//! record (`storage_error`) names them with the next commit that succeeds;
//! the reported twin keeps flowing meanwhile.

use super::state::ChainState;
use crate::outbox::{NewRecord, Outbox};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// A signed batch and the chain position after it.
#[derive(Debug)]
pub struct WriteJob {
    pub record: NewRecord,
    pub chain: ChainState,
}

/// How often the chain position is also written to the checkpoint file.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// Most batches in one commit.
const MAX_GROUP: usize = 256;

/// Runs until `jobs` is closed and drained; then writes a final checkpoint.
/// Without an outbox (degraded start) every batch is dropped and counted.
pub fn run(outbox: Option<Arc<Outbox>>, jobs: mpsc::Receiver<WriteJob>, wake: Arc<Notify>) {
    match outbox {
        Some(outbox) => store(outbox, jobs, wake),
        None => discard(jobs),
    }
}

fn discard(mut jobs: mpsc::Receiver<WriteJob>) {
    let mut dropped = 0u64;
    let mut last_log: Option<Instant> = None;
    while let Some(job) = jobs.blocking_recv() {
        dropped += u64::from(job.record.points);
        if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            tracing::error!(
                dropped_points = dropped,
                "DEGRADED: no outbox; telemetry batches are not published"
            );
            last_log = Some(Instant::now());
        }
    }
}

fn store(outbox: Arc<Outbox>, mut jobs: mpsc::Receiver<WriteJob>, wake: Arc<Notify>) {
    let mut failed: Vec<(u64, u32)> = Vec::new();
    let mut last_checkpoint = Instant::now();
    let mut last_error_log: Option<Instant> = None;
    while let Some(first) = jobs.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let chain = group
            .last()
            .map(|j| j.chain)
            .expect("the group holds at least one job");
        let records: Vec<NewRecord> = group.into_iter().map(|j| j.record).collect();
        match outbox.append(&records, chain, &failed, crate::clock::now_ms()) {
            Ok(()) => {
                failed.clear();
                wake.notify_one();
            }
            Err(e) => {
                outbox.stats.storage_errors.fetch_add(1, Ordering::Relaxed);
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::error!(error = %e, "cannot store signed batches in the outbox; they are dropped and will be accounted by a gap record once storage works again");
                    last_error_log = Some(Instant::now());
                }
                failed.extend(records.iter().map(|r| (r.seq, r.points)));
            }
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            last_checkpoint = Instant::now();
            if let Err(e) = outbox.checkpoint() {
                tracing::warn!(error = %e, "cannot write the chain checkpoint");
            }
        }
    }
    if let Err(e) = outbox.checkpoint() {
        tracing::warn!(error = %e, "cannot write the chain checkpoint at shutdown");
    }
}
