//! The device side: one owner task per device connection.
//!
//! A driver is a typed config plus `run(ctx)`; the [`DeviceContext`] holds
//! everything a driver may touch: the shutdown token, the channel its
//! samples go out on, and the channel its write requests come in on.
//! Drivers never crash on device faults: timeouts, exceptions and lost
//! connections become bad-quality samples, or failed writes.
//!
//! Writes: a [`WriteRequest`] carries a [`WritePermit`], which only the
//! policy decision can create, so no write reaches a device without one.
//! [`Writers`] routes a permit to the owner task of the device that holds
//! the tag; the owner serves it between two poll cycles on the same
//! connection (never two requests in flight), reads the value back, and
//! answers with a [`WriteReport`] or a [`WriteFailure`].

pub mod modbus;
pub mod opcua;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use twin_model::{Sample, Value};

use crate::policy::WritePermit;

/// Samples from one device. A poll cycle may arrive in several parts;
/// `cycle_done` marks the last part of a cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceEvent {
    pub device: String,
    pub samples: Vec<Sample>,
    pub cycle_done: bool,
    /// Set when the samples are the read-back of a confirmed command
    /// write: the reported twin then names the command.
    pub command_id: Option<String>,
}

/// What a device driver may touch.
#[derive(Debug)]
pub struct DeviceContext {
    pub shutdown: CancellationToken,
    pub out: mpsc::Sender<DeviceEvent>,
    /// Write requests for this device's tags (never closed by the sender
    /// while the gateway runs; a driver without writable tags still drains it).
    pub writes: mpsc::Receiver<WriteRequest>,
    /// Where security findings go (to the audit log).
    pub notices: Notices,
    /// The device's counters, for the metrics endpoint.
    pub stats: std::sync::Arc<crate::metrics::DeviceStats>,
}

/// What a device driver tells the rest of the gateway besides samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceNotice {
    /// A security finding of the connection, for the audit log.
    Security {
        device: String,
        /// Stable code, e.g. `opcua_untrusted_certificate`.
        code: &'static str,
        detail: String,
    },
    /// What the device reported about itself after a connection was made
    /// (Modbus FC 43/14, OPC UA BuildInfo), or why it reported nothing
    /// (`Err(status)`, e.g. `not_supported`), for the asset inventory.
    Identity {
        device: String,
        identity: Result<twin_model::inventory::DeviceIdentity, String>,
    },
    /// A reply that came from somebody else than the configured device
    /// (a Modbus reply with another unit id).
    ForeignReply {
        device: String,
        /// What answered, e.g. `unit 7`.
        answered: String,
        detail: String,
    },
}

/// The sending side of device notices; a driver reports a security
/// condition when it starts, not at every retry.
#[derive(Debug, Clone, Default)]
pub struct Notices(Option<mpsc::UnboundedSender<DeviceNotice>>);

impl Notices {
    pub fn new(tx: mpsc::UnboundedSender<DeviceNotice>) -> Self {
        Notices(Some(tx))
    }

    fn send(&self, n: DeviceNotice) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(n);
        }
    }

    /// A security finding (audited as `device_security`).
    pub fn report(&self, device: &str, code: &'static str, detail: impl Into<String>) {
        self.send(DeviceNotice::Security {
            device: device.to_owned(),
            code,
            detail: detail.into(),
        });
    }

    /// The identity the device reported, or why there is none.
    pub fn identity(
        &self,
        device: &str,
        identity: Result<twin_model::inventory::DeviceIdentity, String>,
    ) {
        self.send(DeviceNotice::Identity {
            device: device.to_owned(),
            identity,
        });
    }

    /// A reply from something that is not the configured device.
    pub fn foreign_reply(&self, device: &str, answered: String, detail: impl Into<String>) {
        self.send(DeviceNotice::ForeignReply {
            device: device.to_owned(),
            answered,
            detail: detail.into(),
        });
    }
}

/// Whether a device that reported `reported` (or nothing) may be read,
/// given the configured `expect_identity`: `Err` says how it differs.
pub fn check_identity(
    expected: Option<&std::collections::BTreeMap<String, String>>,
    reported: Option<&twin_model::inventory::DeviceIdentity>,
) -> Result<(), String> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let Some(reported) = reported else {
        return Err("it does not identify itself, so expect_identity cannot be checked".into());
    };
    let wrong: Vec<String> = reported
        .mismatches(expected)
        .into_iter()
        .map(|(k, want, got)| match got {
            Some(got) => format!("{k} is \"{got}\", expected \"{want}\""),
            None => format!("{k} is not reported, expected \"{want}\""),
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// Device-reported text made fit for the inventory: control characters
/// dropped, at most 255 characters (the most one Modbus object holds).
pub fn printable(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .filter(|c| !c.is_control())
        .take(255)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// One permitted write, on its way to the device that holds the tag.
#[derive(Debug)]
pub struct WriteRequest {
    pub permit: WritePermit,
    /// The value the operator expects the tag to hold now: read first, and
    /// nothing is written when it differs.
    pub expect: Option<Value>,
    pub reply: oneshot::Sender<Result<WriteReport, WriteFailure>>,
}

/// A write the device accepted and that read back as written.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReport {
    /// The value read back after the write (engineering units).
    pub readback: Value,
    /// Write frames sent (one: a multi-register value goes in one FC 16).
    pub frames: u32,
}

/// Why a permitted write did not happen, or was not confirmed. `code` is
/// stable (results and audit records carry it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct WriteFailure {
    pub code: &'static str,
    pub reason: String,
    /// Whether a write frame went out (the device may hold the new value).
    pub written: bool,
    /// The value read back, when one was read.
    pub readback: Option<Value>,
}

impl WriteFailure {
    pub fn new(code: &'static str, reason: impl Into<String>, written: bool) -> Self {
        WriteFailure {
            code,
            reason: reason.into(),
            written,
            readback: None,
        }
    }
}

/// The configured tag a permit names on `device`, if it may be written:
/// defence in depth behind the policy, which already checked both.
pub fn writable_tag<'a, T>(
    device: &str,
    tags: &'a [T],
    permit: &WritePermit,
    name_and_writable: impl Fn(&T) -> (&str, bool),
) -> Result<&'a T, WriteFailure> {
    let Some(tag) = tags.iter().find(|t| name_and_writable(t).0 == permit.tag()) else {
        return Err(WriteFailure::new(
            write_code::UNKNOWN_TAG,
            format!("device `{device}` has no tag `{}`", permit.tag()),
            false,
        ));
    };
    if !name_and_writable(tag).1 {
        return Err(WriteFailure::new(
            write_code::READ_ONLY_TAG,
            format!(
                "tag `{}` is not writable in the device configuration",
                permit.tag()
            ),
            false,
        ));
    }
    Ok(tag)
}

/// Stable codes of [`WriteFailure`].
pub mod write_code {
    /// No device holds the tag (configuration changed underneath).
    pub const UNKNOWN_TAG: &str = "unknown_tag";
    /// The tag is not `writable` in the device configuration.
    pub const READ_ONLY_TAG: &str = "read_only_tag";
    /// The value cannot be encoded for the tag's type.
    pub const ENCODE_ERROR: &str = "encode_error";
    /// The device is not connected.
    pub const DEVICE_UNAVAILABLE: &str = "device_unavailable";
    /// The tag's current value differs from the command's `expect`.
    pub const EXPECT_MISMATCH: &str = "expect_mismatch";
    /// The device answered the write with an exception.
    pub const DEVICE_EXCEPTION: &str = "device_exception";
    /// No answer within the request timeout (the write may have happened).
    pub const TIMEOUT: &str = "timeout";
    /// The connection failed during the write.
    pub const TRANSPORT_ERROR: &str = "transport_error";
    /// The device's answer did not match the request.
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    /// The value read back is not the value written.
    pub const READBACK_MISMATCH: &str = "readback_mismatch";
    /// The device task did not answer within the command's write timeout.
    pub const WRITE_TIMEOUT: &str = "write_timeout";
    /// The device task has stopped.
    pub const DEVICE_STOPPED: &str = "device_stopped";
}

/// Routes write requests to the owner task of each tag's device.
#[derive(Debug, Clone, Default)]
pub struct Writers {
    by_tag: HashMap<String, mpsc::Sender<WriteRequest>>,
}

/// Write requests that may wait for one device.
pub const WRITE_QUEUE: usize = 8;

impl Writers {
    /// Registers the write channel of a device holding `tags`.
    pub fn add<'a>(
        &mut self,
        tags: impl IntoIterator<Item = &'a str>,
        tx: &mpsc::Sender<WriteRequest>,
    ) {
        for t in tags {
            self.by_tag.insert(t.to_owned(), tx.clone());
        }
    }

    /// Sends the permitted write to its device and waits (at most
    /// `timeout`) for the confirmed result.
    pub async fn write(
        &self,
        permit: WritePermit,
        expect: Option<Value>,
        timeout: Duration,
    ) -> Result<WriteReport, WriteFailure> {
        let Some(tx) = self.by_tag.get(permit.tag()) else {
            return Err(WriteFailure::new(
                write_code::UNKNOWN_TAG,
                format!("no device holds tag `{}`", permit.tag()),
                false,
            ));
        };
        let (reply, answer) = oneshot::channel();
        let request = WriteRequest {
            permit,
            expect,
            reply,
        };
        let stopped = || {
            WriteFailure::new(
                write_code::DEVICE_STOPPED,
                "the device task has stopped",
                false,
            )
        };
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, tx.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(stopped()),
            Err(_) => {
                return Err(WriteFailure::new(
                    write_code::WRITE_TIMEOUT,
                    format!("the device did not take the write within {timeout:?} (busy)"),
                    false,
                ))
            }
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(WriteFailure::new(
                write_code::WRITE_TIMEOUT,
                format!(
                    "no confirmation within {timeout:?}; the write may still happen: read the tag before repeating the command"
                ),
                true,
            )),
        }
    }
}
