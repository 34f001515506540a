//! The device side: one owner task per device connection.
//!
//! A driver is a typed config plus `run(ctx)`; the [`DeviceContext`] holds
//! everything a driver may touch: the shutdown token and the channel its
//! samples go out on. Drivers never crash on device faults: timeouts,
//! exceptions and lost connections become bad-quality samples.

pub mod modbus;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use twin_model::Sample;

/// Samples from one device. A poll cycle may arrive in several parts;
/// `cycle_done` marks the last part of a cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceEvent {
    pub device: String,
    pub samples: Vec<Sample>,
    pub cycle_done: bool,
}

/// What a device driver may touch.
#[derive(Debug, Clone)]
pub struct DeviceContext {
    pub shutdown: CancellationToken,
    pub out: mpsc::Sender<DeviceEvent>,
}
