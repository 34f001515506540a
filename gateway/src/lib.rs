//! The twin gateway as a library: the `gateway` binary, the operator tool and
//! the test kit are built on it.
//!
//! # Layout: the two data paths
//! ```text
//! uplink   device/ (poll, decode, quality) -> uplink/ (batch, sign, chain) -> mqtt/ (publish, mTLS)
//! downlink (commands) arrives with a later release; see ARCHITECTURE.md
//! ```
//! - [`config`]: `gateway.toml` parsed and validated, every error with file:line:col.
//! - [`device`]: one owner task per device connection; Modbus TCP in [`device::modbus`].
//! - [`uplink`]: batching, signing, the hash chain and the reported twin.
//! - [`mqtt`]: the northbound connection: publish, status and last will, reconnect.
//! - [`tls`]: every TLS client setting in one place.
//! - [`pki`], [`keyfile`]: dev PKI and private key file rules.

pub mod audit;
pub mod backoff;
pub mod clock;
pub mod command_auth;
pub mod config;
pub mod device;
pub mod keyfile;
pub mod logging;
pub mod mqtt;
pub mod outbox;
pub mod pki;
pub mod policy;
pub mod run;
pub mod tls;
pub mod uplink;
