//! The batch verifier a cloud twin runs on every telemetry message.
//!
//! [`ChainVerifier::verify`] checks, in order: size, JWS shape and header,
//! key id in the trust store, signature, strict payload parse, wire version,
//! gateway id (the signer's key must be the one registered for it when one
//! is), and then places the batch in its gateway's chain:
//!
//! | situation | result |
//! |---|---|
//! | first batch seen from a gateway | `Ok`, [`Continuity::First`] |
//! | `seq` = last + 1 and `prev_hash` = hash of last | `Ok`, [`Continuity::InOrder`] |
//! | `seq` > last + 1 | `Ok`, [`Continuity::Gap`] naming the missing range |
//! | `seq` already seen, same bytes | `Ok`, [`Continuity::Duplicate`] (drop it: at-least-once delivery) |
//! | `seq` = last + 1 but `prev_hash` differs | `Err`, [`VerifyError::ChainBroken`] |
//! | `seq` already seen, other bytes | `Err`, [`VerifyError::Conflict`] |
//! | `seq` older than the remembered window | `Err`, [`VerifyError::Replayed`] |
//!
//! Refused batches never change the chain state.

use crate::batch::{BatchHash, BatchPayload, BATCH_TYP};
use crate::jws::{JwsError, TrustStore};
use std::collections::{BTreeMap, HashMap};

/// How many recent batch hashes per gateway are kept to recognise duplicates.
pub const DEFAULT_WINDOW: usize = 4096;

/// Where a verified batch stands in its gateway's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuity {
    First,
    InOrder,
    /// Batches `from..=to` are missing (lost, or not yet arrived).
    Gap {
        from: u64,
        to: u64,
    },
    /// Already seen with identical content.
    Duplicate,
}

/// A batch that passed verification.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedBatch {
    pub payload: BatchPayload,
    pub kid: String,
    pub hash: BatchHash,
    pub continuity: Continuity,
}

/// Why a batch was refused. Each variant has a stable [`VerifyError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Jws(#[from] JwsError),
    #[error("payload is not a valid batch: {0}")]
    BadPayload(String),
    #[error("unsupported wire version {0}")]
    BadVersion(u32),
    #[error("batch names gateway {gateway:?} but is signed by key {kid:?}, which is not that gateway's key")]
    WrongSigner { gateway: String, kid: String },
    #[error("batch {seq} of {gateway:?} does not chain to batch {prev}: prev_hash differs")]
    ChainBroken {
        gateway: String,
        seq: u64,
        prev: u64,
    },
    #[error("batch {seq} of {gateway:?} was seen before with different content")]
    Conflict { gateway: String, seq: u64 },
    #[error("batch {seq} of {gateway:?} is older than the last {window} batches (latest is {latest}): replayed")]
    Replayed {
        gateway: String,
        seq: u64,
        latest: u64,
        window: usize,
    },
}

impl VerifyError {
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Jws(e) => e.code(),
            VerifyError::BadPayload(_) => "bad_payload",
            VerifyError::BadVersion(_) => "bad_version",
            VerifyError::WrongSigner { .. } => "wrong_signer",
            VerifyError::ChainBroken { .. } => "chain_broken",
            VerifyError::Conflict { .. } => "conflict",
            VerifyError::Replayed { .. } => "replayed",
        }
    }
}

#[derive(Debug, Default)]
struct Chain {
    latest: u64,
    /// seq -> hash for the most recent `window` batches.
    recent: BTreeMap<u64, BatchHash>,
}

/// Verifies batches of any number of gateways and tracks each chain.
#[derive(Debug)]
pub struct ChainVerifier {
    trust: TrustStore,
    /// gateway id -> key id it must be signed with, when pinned.
    pinned: HashMap<String, String>,
    chains: HashMap<String, Chain>,
    window: usize,
    max_len: usize,
}

impl ChainVerifier {
    pub fn new(trust: TrustStore) -> Self {
        ChainVerifier {
            trust,
            pinned: HashMap::new(),
            chains: HashMap::new(),
            window: DEFAULT_WINDOW,
            max_len: crate::MAX_MESSAGE_BYTES,
        }
    }

    /// Only accept batches of `gateway_id` signed with key `kid`.
    pub fn pin(&mut self, gateway_id: impl Into<String>, kid: impl Into<String>) {
        self.pinned.insert(gateway_id.into(), kid.into());
    }

    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// Continue a chain from a known point (e.g. a twin's persisted state).
    pub fn resume(&mut self, gateway_id: impl Into<String>, seq: u64, hash: BatchHash) {
        let mut chain = Chain {
            latest: seq,
            ..Chain::default()
        };
        chain.recent.insert(seq, hash);
        self.chains.insert(gateway_id.into(), chain);
    }

    /// Latest sequence number seen for `gateway_id`.
    pub fn latest(&self, gateway_id: &str) -> Option<u64> {
        self.chains.get(gateway_id).map(|c| c.latest)
    }

    pub fn verify(&mut self, msg: &[u8]) -> Result<VerifiedBatch, VerifyError> {
        let jws = self.trust.verify_compact(msg, BATCH_TYP, self.max_len)?;
        let payload: BatchPayload = serde_json::from_slice(&jws.payload)
            .map_err(|e| VerifyError::BadPayload(e.to_string()))?;
        if payload.v != crate::WIRE_VERSION {
            return Err(VerifyError::BadVersion(payload.v));
        }
        if payload.seq == 0 {
            return Err(VerifyError::BadPayload("seq must be at least 1".into()));
        }
        let prev = BatchHash::from_b64url(&payload.prev_hash).ok_or_else(|| {
            VerifyError::BadPayload("prev_hash is not a base64url SHA-256".into())
        })?;
        if let Some(kid) = self.pinned.get(&payload.gateway_id) {
            if *kid != jws.header.kid {
                return Err(VerifyError::WrongSigner {
                    gateway: payload.gateway_id,
                    kid: jws.header.kid,
                });
            }
        }
        let hash = BatchHash::of(msg);
        let seq = payload.seq;
        let gateway = payload.gateway_id.clone();
        let window = self.window;
        let continuity = match self.chains.get_mut(&gateway) {
            None => {
                let mut chain = Chain {
                    latest: seq,
                    ..Chain::default()
                };
                chain.recent.insert(seq, hash);
                self.chains.insert(gateway, chain);
                Continuity::First
            }
            Some(chain) => {
                if seq <= chain.latest {
                    match chain.recent.get(&seq) {
                        Some(h) if *h == hash => Continuity::Duplicate,
                        Some(_) => return Err(VerifyError::Conflict { gateway, seq }),
                        None if chain.latest - seq < window as u64 => {
                            // Inside the window but never seen: a late arrival
                            // of a batch reported as a gap. Accept it; it fills
                            // part of that gap.
                            chain.recent.insert(seq, hash);
                            Continuity::Gap { from: seq, to: seq }
                        }
                        None => {
                            return Err(VerifyError::Replayed {
                                gateway,
                                seq,
                                latest: chain.latest,
                                window,
                            })
                        }
                    }
                } else if seq == chain.latest + 1 {
                    let last = chain.recent.get(&chain.latest).copied();
                    if last.is_some_and(|h| h != prev) {
                        return Err(VerifyError::ChainBroken {
                            gateway,
                            seq,
                            prev: chain.latest,
                        });
                    }
                    chain.latest = seq;
                    chain.recent.insert(seq, hash);
                    Continuity::InOrder
                } else {
                    let from = chain.latest + 1;
                    chain.latest = seq;
                    chain.recent.insert(seq, hash);
                    Continuity::Gap { from, to: seq - 1 }
                }
            }
        };
        if let Some(chain) = self.chains.get_mut(&payload.gateway_id) {
            while chain.recent.len() > window {
                chain.recent.pop_first();
            }
        }
        Ok(VerifiedBatch {
            payload,
            kid: jws.header.kid,
            hash,
            continuity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::sign_batch;
    use crate::jws::SigningKey;
    use crate::sample::{Sample, Value};

    struct Gw {
        key: SigningKey,
        seq: u64,
        prev: BatchHash,
    }

    impl Gw {
        fn new(seed: u8) -> Self {
            Gw {
                key: SigningKey::from_seed(&[seed; 32]).unwrap(),
                seq: 0,
                prev: BatchHash::GENESIS,
            }
        }
        fn next(&mut self) -> String {
            self.seq += 1;
            let p = BatchPayload {
                v: 1,
                gateway_id: "gw".into(),
                seq: self.seq,
                prev_hash: self.prev.to_b64url(),
                created_ms: 1000 + self.seq,
                samples: vec![Sample::good(
                    "t",
                    Value::Int(self.seq as i64),
                    1000 + self.seq,
                )],
            };
            let (jws, h) = sign_batch(&self.key, &p);
            self.prev = h;
            jws
        }
    }

    fn verifier(gw: &Gw) -> ChainVerifier {
        let mut t = TrustStore::new();
        t.add(gw.key.public_key());
        ChainVerifier::new(t)
    }

    #[test]
    fn plausibility_flags_are_inside_the_signature() {
        let gw = Gw::new(3);
        let mut flagged = Sample::good("t", Value::Float(9.0), 1001);
        flagged.flags = vec![crate::sample::flag::OUT_OF_RANGE.into()];
        let p = BatchPayload {
            v: 1,
            gateway_id: "gw".into(),
            seq: 1,
            prev_hash: BatchHash::GENESIS.to_b64url(),
            created_ms: 1001,
            samples: vec![flagged],
        };
        let (jws, _) = sign_batch(&gw.key, &p);
        let ok = verifier(&gw).verify(jws.as_bytes()).unwrap();
        assert_eq!(ok.payload.samples[0].flags, vec!["out_of_range"]);
        // Remove the flag and keep the signature: refused.
        let parts: Vec<&str> = jws.split('.').collect();
        let payload = crate::jws::b64url_decode(parts[1]).unwrap();
        let text = String::from_utf8(payload).unwrap();
        let stripped = text.replace(r#","flags":["out_of_range"]"#, "");
        assert_ne!(stripped, text);
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            crate::jws::b64url(stripped.as_bytes()),
            parts[2]
        );
        assert!(verifier(&gw).verify(forged.as_bytes()).is_err());
    }

    #[test]
    fn in_order_chain_verifies() {
        let mut gw = Gw::new(1);
        let mut v = verifier(&gw);
        assert_eq!(
            v.verify(gw.next().as_bytes()).unwrap().continuity,
            Continuity::First
        );
        for _ in 0..10 {
            assert_eq!(
                v.verify(gw.next().as_bytes()).unwrap().continuity,
                Continuity::InOrder
            );
        }
        assert_eq!(v.latest("gw"), Some(11));
    }

    #[test]
    fn gap_duplicate_and_late_arrival_are_reported() {
        let mut gw = Gw::new(1);
        let mut v = verifier(&gw);
        let b1 = gw.next();
        let b2 = gw.next();
        let b3 = gw.next();
        v.verify(b1.as_bytes()).unwrap();
        assert_eq!(
            v.verify(b3.as_bytes()).unwrap().continuity,
            Continuity::Gap { from: 2, to: 2 }
        );
        assert_eq!(
            v.verify(b3.as_bytes()).unwrap().continuity,
            Continuity::Duplicate
        );
        assert_eq!(
            v.verify(b2.as_bytes()).unwrap().continuity,
            Continuity::Gap { from: 2, to: 2 }
        );
        assert_eq!(
            v.verify(b2.as_bytes()).unwrap().continuity,
            Continuity::Duplicate
        );
    }

    #[test]
    fn forged_chain_and_replay_are_refused() {
        let mut gw = Gw::new(1);
        let mut v = verifier(&gw).with_window(4);
        let old = gw.next();
        v.verify(old.as_bytes()).unwrap();
        for _ in 0..10 {
            v.verify(gw.next().as_bytes()).unwrap();
        }
        assert_eq!(v.verify(old.as_bytes()).unwrap_err().code(), "replayed");

        // A batch with the right seq but a made-up prev_hash, signed by the right key.
        let mut forger = Gw {
            key: SigningKey::from_seed(&[1; 32]).unwrap(),
            seq: gw.seq,
            prev: BatchHash([9; 32]),
        };
        assert_eq!(
            v.verify(forger.next().as_bytes()).unwrap_err().code(),
            "chain_broken"
        );
        // The same seq with different content after the real one arrived.
        v.verify(gw.next().as_bytes()).unwrap();
        forger.seq = gw.seq - 1;
        assert_eq!(
            v.verify(forger.next().as_bytes()).unwrap_err().code(),
            "conflict"
        );
    }

    #[test]
    fn pinned_gateway_refuses_another_trusted_key() {
        let gw = Gw::new(1);
        let mut other = Gw::new(2);
        let mut t = TrustStore::new();
        t.add(gw.key.public_key());
        t.add(other.key.public_key());
        let mut v = ChainVerifier::new(t);
        v.pin("gw", gw.key.kid());
        assert_eq!(
            v.verify(other.next().as_bytes()).unwrap_err().code(),
            "wrong_signer"
        );
    }

    #[test]
    fn tampered_payload_is_refused() {
        let mut gw = Gw::new(1);
        let mut v = verifier(&gw);
        let b = gw.next();
        let mut parts: Vec<&str> = b.split('.').collect();
        let payload = crate::jws::b64url_decode(parts[1]).unwrap();
        let tampered = String::from_utf8(payload)
            .unwrap()
            .replace("\"value\":1", "\"value\":2");
        let enc = crate::jws::b64url(tampered.as_bytes());
        parts[1] = &enc;
        assert_eq!(
            v.verify(parts.join(".").as_bytes()).unwrap_err().code(),
            "bad_signature"
        );
    }
}
