//! The watch: what the gateway sees of the devices' values, of the command
//! flow and of itself, turned into plausibility flags and signed alerts.
//!
//! - [`sensors`]: per-tag checks configured in each tag's `check` table
//!   (engineering range, rate of change, flatline, stale, learned
//!   baseline). Run in the uplink before signing: the flags travel inside
//!   the signed sample.
//! - [`alerts`]: findings from anywhere in the gateway; the downlink task
//!   (which owns the audit log) summarises repeats, records each alert in
//!   the audit log and publishes it signed on the alert topic.
//! - [`flows`]: the command flow and the gateway's own connections (bursts
//!   of denied or refused commands, floods, unreachable devices, failing
//!   broker connections), checked by the downlink task.
//!
//! Every alert code is listed, with what to do about it, in the README
//! ("What the gateway watches").

pub mod alerts;
pub mod flows;
pub mod sensors;
