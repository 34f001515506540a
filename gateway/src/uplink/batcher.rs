//! Batching: samples in, batches out, each batch small enough that its
//! signed message stays within `mqtt.max_message_bytes`.

use twin_model::batch::{jws_len, sample_json_len};
use twin_model::sample::Quality;
use twin_model::{BatchHash, BatchPayload, Sample};

/// Reason code of a sample replaced because it alone exceeds the message size.
pub const OVERSIZED: &str = "oversized";

#[derive(Debug)]
pub struct Batcher {
    pending: Vec<Sample>,
    pending_bytes: usize,
    /// Largest sum of sample sizes that fits one message.
    budget: usize,
}

impl Batcher {
    /// A batcher for `gateway_id` whose messages, published on a topic of
    /// `topic_len` bytes, stay within `max_message_bytes`.
    pub fn new(gateway_id: &str, topic_len: usize, max_message_bytes: usize) -> Self {
        Batcher {
            pending: Vec::new(),
            pending_bytes: 0,
            budget: sample_budget(gateway_id, topic_len, max_message_bytes),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds samples; returns the batches that filled up.
    pub fn push(&mut self, samples: Vec<Sample>) -> Vec<Vec<Sample>> {
        let mut full = Vec::new();
        for mut s in samples {
            let mut len = sample_json_len(&s);
            if len > self.budget {
                s = Sample {
                    value: None,
                    quality: Quality::Bad,
                    reason: Some(OVERSIZED.into()),
                    ..s
                };
                len = sample_json_len(&s);
            }
            if self.pending_bytes + len > self.budget && !self.pending.is_empty() {
                full.push(std::mem::take(&mut self.pending));
                self.pending_bytes = 0;
            }
            self.pending_bytes += len;
            self.pending.push(s);
        }
        full
    }

    /// Takes what is pending as a batch, if anything is.
    pub fn take(&mut self) -> Option<Vec<Sample>> {
        if self.pending.is_empty() {
            return None;
        }
        self.pending_bytes = 0;
        Some(std::mem::take(&mut self.pending))
    }
}

/// Bytes of an MQTT 3.1.1 PUBLISH packet around the payload: fixed header
/// (up to 5), topic length (2) and packet id (2).
const MQTT_OVERHEAD: usize = 9;

/// The largest total of `sample_json_len` that keeps the signed message
/// within `max_message_bytes`, computed with the largest possible numbers
/// in the envelope so it holds for every batch.
pub fn sample_budget(gateway_id: &str, topic_len: usize, max_message_bytes: usize) -> usize {
    let envelope = BatchPayload {
        v: twin_model::WIRE_VERSION,
        gateway_id: gateway_id.into(),
        seq: u64::MAX,
        prev_hash: BatchHash::GENESIS.to_b64url(),
        created_ms: u64::MAX,
        samples: vec![],
    };
    let envelope_len = serde_json::to_vec(&envelope)
        .map(|v| v.len())
        .unwrap_or(usize::MAX / 4);
    // Header: {"alg":"EdDSA","kid":"<43>","typ":"twin-batch+jws"}
    let header_len = 64 + 43;
    let available = max_message_bytes.saturating_sub(MQTT_OVERHEAD + topic_len);
    // Find the largest sample total whose JWS fits (jws_len is monotonic).
    let (mut lo, mut hi) = (0usize, available);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if jws_len(header_len, envelope_len + mid) <= available {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use twin_model::batch::sign_batch;
    use twin_model::{SigningKey, Value};

    #[test]
    fn batches_never_exceed_the_message_size() {
        let key = Arc::new(SigningKey::from_seed(&[1; 32]).unwrap());
        for max in [1024usize, 4096, 131_072] {
            let topic = "twin/gw-1/telemetry";
            let mut b = Batcher::new("gw-1", topic.len(), max);
            let samples: Vec<Sample> = (0..5000)
                .map(|i| {
                    Sample::good(
                        format!("tag.{i}"),
                        Value::Text("x".repeat(i % 200)),
                        u64::MAX,
                    )
                })
                .collect();
            let mut batches = b.push(samples);
            batches.extend(b.take());
            assert!(batches.len() > 1);
            let total: usize = batches.iter().map(Vec::len).sum();
            assert_eq!(total, 5000, "no sample lost");
            for batch in batches {
                let p = BatchPayload {
                    v: 1,
                    gateway_id: "gw-1".into(),
                    seq: u64::MAX,
                    prev_hash: BatchHash::GENESIS.to_b64url(),
                    created_ms: u64::MAX,
                    samples: batch,
                };
                let (jws, _) = sign_batch(&key, &p);
                assert!(
                    jws.len() + topic.len() + MQTT_OVERHEAD <= max,
                    "{} > {max}",
                    jws.len()
                );
            }
        }
    }

    #[test]
    fn a_sample_too_large_for_any_message_becomes_bad_quality() {
        let mut b = Batcher::new("gw", 16, 1024);
        let out = b.push(vec![Sample::good("big", Value::Text("x".repeat(2000)), 1)]);
        assert!(out.is_empty());
        let batch = b.take().unwrap();
        assert_eq!(batch[0].reason.as_deref(), Some(OVERSIZED));
    }
}
