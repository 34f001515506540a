//! Signing: sequence number, hash chain, JWS.

use super::state::ChainState;
use crate::clock::now_ms;
use crate::outbox::NewRecord;
use std::sync::Arc;
use twin_model::batch::sign_batch;
use twin_model::{BatchPayload, Sample, SigningKey, WIRE_VERSION};

/// Signs batches in chain order. The position it returns with each batch
/// is persisted by the outbox writer in the same transaction as the batch.
pub struct Signer {
    key: Arc<SigningKey>,
    gateway_id: String,
    state: ChainState,
}

impl Signer {
    /// Continues the chain from `state` (the outbox's committed position).
    pub fn new(key: Arc<SigningKey>, gateway_id: String, state: ChainState) -> Self {
        Signer {
            key,
            gateway_id,
            state,
        }
    }

    /// Sequence number of the last batch signed (0 before the first).
    pub fn seq(&self) -> u64 {
        self.state.seq
    }

    pub fn state(&self) -> ChainState {
        self.state
    }

    /// Signs `samples` as the next batch; returns the record to store and
    /// the chain position after it.
    pub fn sign(&mut self, samples: Vec<Sample>, twin_version: u64) -> (NewRecord, ChainState) {
        let created_ms = now_ms();
        let payload = BatchPayload {
            v: WIRE_VERSION,
            gateway_id: self.gateway_id.clone(),
            seq: self.state.seq + 1,
            prev_hash: self.state.prev_hash.to_b64url(),
            created_ms,
            samples,
        };
        let (jws, hash) = sign_batch(&self.key, &payload);
        self.state = ChainState {
            seq: payload.seq,
            prev_hash: hash,
            twin_version,
        };
        let record = NewRecord {
            seq: payload.seq,
            jws: jws.into_bytes(),
            points: u32::try_from(payload.samples.len()).unwrap_or(u32::MAX),
            created_ms,
        };
        (record, self.state)
    }
}
