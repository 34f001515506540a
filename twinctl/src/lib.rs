//! The operator tool as a library: the `twinctl` binary, the local twin and
//! the end-to-end tests all watch the twin through [`watch::Watcher`].
//!
//! - [`watch`]: verifies every message (signature, chain, gaps, duplicates)
//!   and keeps the live twin of each gateway. No I/O.
//! - [`render`]: the twin as a text table for people, or JSON lines.
//! - [`client`]: the operator's mutual-TLS MQTT connection.
//! - [`operator`]: operator keys, command and approval tokens, sending a
//!   command and verifying its result, following results and the audit log.
//! - [`inventory`]: a gateway's asset inventory and SBOM, verified and
//!   reassembled.

pub mod client;
pub mod inventory;
pub mod operator;
pub mod render;
pub mod watch;
