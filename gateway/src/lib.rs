//! The twin gateway as a library: the `gateway` binary, the operator tool and
//! the test kit are built on it.
//!
//! # Layout: the two data paths
//! ```text
//! uplink   device/ (poll, decode, quality) -> uplink/ (batch, sign, chain) -> outbox/ -> mqtt/ (publish, mTLS)
//! downlink mqtt/ (subscribe) -> downlink/ (admit, check) -> command_auth/ (token) -> policy/ (decide)
//!          -> audit (before acting) -> device/ (write, read back) -> downlink/ (signed result)
//! ```
//! - [`config`]: `gateway.toml` parsed and validated, every error with file:line:col.
//! - [`device`]: one owner task per device connection; Modbus TCP in [`device::modbus`].
//! - [`uplink`]: batching, signing, the hash chain and the reported twin.
//! - [`mqtt`]: the northbound connection: publish, subscribe, status and last will, reconnect.
//! - [`downlink`]: the command path from the MQTT message to the signed result.
//! - [`command_auth`]: operator-signed command and approval tokens.
//! - [`policy`]: the least-privilege policy OT engineers write; default deny.
//! - [`audit`]: the hash-chained, signed audit log file.
//! - [`tls`]: every TLS client setting in one place.
//! - [`pki`], [`keyfile`]: dev PKI and private key file rules.

pub mod audit;
pub mod backoff;
pub mod clock;
pub mod command_auth;
pub mod config;
pub mod device;
pub mod downlink;
pub mod inventory;
pub mod keyfile;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod pki;
pub mod policy;
pub mod run;
pub mod sbom;
pub mod selfcheck;
pub mod tls;
pub mod uplink;
pub mod watch;
