//! Signing: sequence number, hash chain, JWS, and the persisted position.

use super::state::{ChainState, StateError, StateFile};
use crate::clock::now_ms;
use crate::mqtt::{Outgoing, OutgoingKind};
use twin_model::batch::sign_batch;
use twin_model::{BatchPayload, Sample, SigningKey, WIRE_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot persist the chain state, so no further batch can be signed safely: {0}")]
    State(#[from] StateError),
}

/// Signs batches in chain order.
pub struct Signer {
    key: std::sync::Arc<SigningKey>,
    gateway_id: String,
    topic: String,
    state: ChainState,
    file: StateFile,
}

impl Signer {
    pub fn new(
        key: std::sync::Arc<SigningKey>,
        gateway_id: String,
        topic: String,
        file: StateFile,
    ) -> Result<Self, SignError> {
        let state = file.load()?;
        Ok(Signer {
            key,
            gateway_id,
            topic,
            state,
            file,
        })
    }

    /// Sequence number of the last batch signed (0 before the first).
    pub fn seq(&self) -> u64 {
        self.state.seq
    }

    pub fn state(&self) -> ChainState {
        self.state
    }

    /// Signs `samples` as the next batch and persists the new position
    /// before returning the message.
    pub fn sign(&mut self, samples: Vec<Sample>, twin_version: u64) -> Result<Outgoing, SignError> {
        let payload = BatchPayload {
            v: WIRE_VERSION,
            gateway_id: self.gateway_id.clone(),
            seq: self.state.seq + 1,
            prev_hash: self.state.prev_hash.to_b64url(),
            created_ms: now_ms(),
            samples,
        };
        let (jws, hash) = sign_batch(&self.key, &payload);
        let next = ChainState {
            seq: payload.seq,
            prev_hash: hash,
            twin_version,
        };
        self.file.save(&next)?;
        self.state = next;
        Ok(Outgoing {
            topic: self.topic.clone(),
            payload: jws.into_bytes(),
            retain: false,
            kind: OutgoingKind::Batch {
                seq: payload.seq,
                points: payload.samples.len(),
            },
        })
    }
}
