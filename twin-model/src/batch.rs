//! The signed telemetry batch.
//!
//! A batch is a JWS (see [`crate::jws`]) with `typ` [`BATCH_TYP`] whose payload
//! is a [`BatchPayload`]. Batches of one gateway form a chain: `seq` increases
//! by exactly one from batch to batch (across restarts of the gateway), and
//! `prev_hash` is the SHA-256 of the previous batch's complete compact JWS
//! text. The first batch a gateway ever signs has seq 1 and a `prev_hash` of
//! 32 zero bytes. A verifier that holds the chain can therefore tell a lost,
//! duplicated, reordered or forged batch from a good one.

use crate::jws::{b64url, b64url_decode, sha256, SigningKey};
use crate::sample::Sample;
use serde::{Deserialize, Serialize};

/// JWS `typ` of a telemetry batch.
pub const BATCH_TYP: &str = "twin-batch+jws";

/// SHA-256 of a batch's compact JWS text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BatchHash(pub [u8; 32]);

impl BatchHash {
    /// The `prev_hash` of the first batch of a chain.
    pub const GENESIS: BatchHash = BatchHash([0u8; 32]);

    /// Hash of a batch as sent.
    pub fn of(compact_jws: &[u8]) -> Self {
        BatchHash(sha256(compact_jws))
    }

    pub fn to_b64url(self) -> String {
        b64url(&self.0)
    }

    pub fn from_b64url(s: &str) -> Option<Self> {
        let bytes = b64url_decode(s)?;
        Some(BatchHash(bytes.try_into().ok()?))
    }
}

/// The payload of a telemetry batch. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPayload {
    /// Wire version, [`crate::WIRE_VERSION`].
    pub v: u32,
    pub gateway_id: String,
    /// 1 for the first batch a gateway signs, then +1 per batch, forever.
    pub seq: u64,
    /// base64url SHA-256 of the previous batch's compact JWS.
    pub prev_hash: String,
    /// When the batch was signed, ms since the Unix epoch.
    pub created_ms: u64,
    pub samples: Vec<Sample>,
}

/// Signs a batch; returns the compact JWS and its hash (the next batch's `prev_hash`).
pub fn sign_batch(key: &SigningKey, payload: &BatchPayload) -> (String, BatchHash) {
    let json = serde_json::to_vec(payload).expect("batch payload serializes");
    let jws = key.sign_compact(BATCH_TYP, &json);
    let hash = BatchHash::of(jws.as_bytes());
    (jws, hash)
}

/// Size in bytes of the JSON encoding of `sample` plus its separating comma,
/// to keep batches under a message size limit without encoding them twice.
pub fn sample_json_len(sample: &Sample) -> usize {
    serde_json::to_vec(sample)
        .map(|v| v.len() + 1)
        .unwrap_or(usize::MAX / 4)
}

/// Size of a compact JWS whose payload JSON is `payload_json_len` bytes long,
/// for a header of `header_json_len` bytes: base64url grows 4/3, plus two dots
/// and an 86-character Ed25519 signature.
pub fn jws_len(header_json_len: usize, payload_json_len: usize) -> usize {
    let b64 = |n: usize| (n * 4).div_ceil(3);
    b64(header_json_len) + 1 + b64(payload_json_len) + 1 + 86
}
