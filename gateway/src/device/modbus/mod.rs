//! Modbus TCP driver: polls one device and turns its registers into samples.
//!
//! The stages, in the order a poll cycle runs them:
//! - [`plan`]: which read requests cover the configured tags (coalescing, pure);
//! - `poller`: the connection owner task: connect, send the planned
//!   requests one at a time, each under the request timeout, reconnect with
//!   backoff, and emit one [`DeviceEvent`](super::DeviceEvent) per cycle;
//! - [`codec`]: raw registers and bits <-> typed values, byte orders,
//!   scaling and quality (pure).
//!
//! Faults never stop the driver and never silence a tag: a Modbus exception
//! marks the tags of that request bad, a timeout or a lost connection marks
//! every tag not read bad, and while the device is unreachable every tag is
//! emitted bad with [`reason::DISCONNECTED`] once per poll interval.

pub mod codec;
pub mod plan;
mod poller;
#[cfg(test)]
mod tests;

pub use poller::ModbusDriver;

use tokio_modbus::ExceptionCode;
use twin_model::sample::reason;

/// The [`Sample::reason`](twin_model::Sample::reason) of a tag whose read
/// was answered with a Modbus exception, e.g.
/// `modbus_exception:illegal_data_address`; codes without a name become
/// `modbus_exception:custom_0x0c` (two lowercase hex digits).
pub fn exception_reason(code: ExceptionCode) -> String {
    let name = match code {
        ExceptionCode::IllegalFunction => "illegal_function",
        ExceptionCode::IllegalDataAddress => "illegal_data_address",
        ExceptionCode::IllegalDataValue => "illegal_data_value",
        ExceptionCode::ServerDeviceFailure => "server_device_failure",
        ExceptionCode::Acknowledge => "acknowledge",
        ExceptionCode::ServerDeviceBusy => "server_device_busy",
        ExceptionCode::MemoryParityError => "memory_parity_error",
        ExceptionCode::GatewayPathUnavailable => "gateway_path_unavailable",
        ExceptionCode::GatewayTargetDevice => "gateway_target_device",
        ExceptionCode::Custom(c) => {
            return format!("{}custom_{c:#04x}", reason::MODBUS_EXCEPTION_PREFIX)
        }
    };
    format!("{}{name}", reason::MODBUS_EXCEPTION_PREFIX)
}

#[cfg(test)]
mod reason_tests {
    use super::*;

    #[test]
    fn exception_reasons_are_snake_case_names_or_custom_hex() {
        assert_eq!(
            exception_reason(ExceptionCode::IllegalDataAddress),
            "modbus_exception:illegal_data_address"
        );
        assert_eq!(
            exception_reason(ExceptionCode::ServerDeviceBusy),
            "modbus_exception:server_device_busy"
        );
        assert_eq!(
            exception_reason(ExceptionCode::new(0x0C)),
            "modbus_exception:custom_0x0c"
        );
    }
}
