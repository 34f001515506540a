//! The shared vocabulary of the twin gateway and its wire formats.
//!
//! This crate does no I/O and knows nothing of tokio, sockets or files: it turns
//! values into signed bytes and signed bytes back into values, so the gateway,
//! the operator tool and a cloud twin all agree on one definition.
//!
//! # Layout
//! - [`sample`]: one tag value with its quality and source timestamp.
//! - [`batch`]: the signed telemetry batch (sequence number, hash chain, samples).
//! - [`twin`]: the reported twin document (per-tag latest state, version).
//! - [`status`]: the online/offline status message.
//! - [`gap`]: the signed gap record (batches dropped, and why).
//! - [`jws`]: JWS compact serialization with EdDSA (Ed25519), key ids, trust store.
//! - [`verify`]: the batch verifier (signature, sequence continuity, hash chain).
//! - [`topics`]: MQTT topic names.
//! - [`command`]: claims of operator-signed command and approval tokens, and the command message envelope.
//! - [`result`]: the signed result of a command.
//! - [`audit`]: the hash-chained audit log records and their verifier.
//! - [`alert`]: signed alerts of the gateway's watch.
//! - [`inventory`]: the signed asset inventory (gateway, devices and their identities, SBOM hash).
//!
//! The wire format is documented with golden test vectors in `docs/wire-format.md`;
//! the tests in [`golden`] keep the document and the code in step.

pub mod alert;
pub mod audit;
pub mod batch;
pub mod command;
pub mod gap;
pub mod golden;
pub mod inventory;
pub mod jws;
pub mod result;
pub mod sample;
pub mod status;
pub mod topics;
pub mod twin;
pub mod verify;

pub use batch::{BatchHash, BatchPayload, BATCH_TYP};
pub use jws::{JwsError, SigningKey, TrustStore, VerifiedJws};
pub use sample::{Quality, Sample, Value};
pub use twin::{ReportedTwin, TagState};
pub use verify::{ChainVerifier, Continuity, VerifiedBatch, VerifyError};

/// Version number carried in every payload as `"v"`.
pub const WIRE_VERSION: u32 = 1;

/// Largest signed message any verifier in this crate accepts, in bytes.
/// Checked before anything is decoded.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
