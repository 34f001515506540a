//! One tag value as it leaves the device side: value, quality, source timestamp.

use serde::{Deserialize, Serialize};

/// A decoded, normalized tag value.
///
/// On the wire a value is a plain JSON scalar: `true`, `42`, `-7`,
/// `18446744073709551615`, `21.5`, `"PUMP-A"`. Integers are exact 64-bit
/// integers (consumers must not read them as doubles); floats always carry a
/// decimal point or exponent. NaN and infinities are never values: a register
/// that decodes to one becomes a sample with no value and bad quality.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
}

/// Equality as on the wire: `Int(5)` equals `UInt(5)` (JSON has one
/// integer type); floats compare by value, so NaN (never a value) is not
/// equal to itself.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::UInt(a), Value::UInt(b)) => a == b,
            (Value::Int(a), Value::UInt(b)) | (Value::UInt(b), Value::Int(a)) => {
                u64::try_from(*a) == Ok(*b)
            }
            (Value::Float(a), Value::Float(b)) => a == b,
            (Value::Text(a), Value::Text(b)) => a == b,
            _ => false,
        }
    }
}

impl Value {
    /// The value as a float, for numeric comparison; `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// Widens a 32-bit float to the double nearest to its shortest decimal
/// form, so a register holding `2.38` is published as `2.38`, not as
/// `2.380000114440918`. Narrowing the result back with `as f32` gives the
/// original value exactly.
pub fn widen_f32(x: f32) -> f64 {
    if !x.is_finite() {
        return f64::from(x);
    }
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// How far a sample can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Good,
    Uncertain,
    Bad,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Uncertain => "uncertain",
            Quality::Bad => "bad",
        }
    }
}

/// Stable reason codes carried in [`Sample::reason`]. A cloud twin may rely on
/// these strings; new codes may be added, existing ones never change meaning.
pub mod reason {
    /// The device did not answer within the request timeout.
    pub const TIMEOUT: &str = "timeout";
    /// No connection to the device (refused, reset, unreachable).
    pub const DISCONNECTED: &str = "disconnected";
    /// The device answered with something that is not a valid reply.
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    /// The device does not identify itself as the configured
    /// `expect_identity` says: it is not read.
    pub const IDENTITY_MISMATCH: &str = "identity_mismatch";
    /// A register pair or quad decoded to NaN.
    pub const NAN: &str = "nan";
    /// A register pair or quad decoded to +/- infinity.
    pub const INFINITE: &str = "infinite";
    /// A string tag's bytes are not valid UTF-8.
    pub const INVALID_STRING: &str = "invalid_string";
    /// Scale and offset pushed the value out of the representable range.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// Prefix of Modbus exception reasons, e.g. `modbus_exception:illegal_data_address`.
    pub const MODBUS_EXCEPTION_PREFIX: &str = "modbus_exception:";
}

/// Plausibility flags carried in [`Sample::flags`]: the device said so, and
/// the gateway's checks of the tag find it implausible. Stable strings.
pub mod flag {
    /// Outside the tag's configured engineering range.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// Changed faster than the tag's configured maximum rate.
    pub const RATE_OF_CHANGE: &str = "rate_of_change";
    /// Has not moved for longer than the tag's flatline time, although it
    /// normally moves.
    pub const FLATLINE: &str = "flatline";
    /// Far outside the learned baseline (rolling mean and spread).
    pub const OUTLIER: &str = "outlier";
}

/// One tag value at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// Tag name, unique within a gateway.
    pub tag: String,
    /// The value; absent when quality is bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    pub quality: Quality,
    /// Why the quality is not good (a [`reason`] code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Source timestamp: when the value was read from the device, in
    /// milliseconds since the Unix epoch (UTC). For OPC UA, the server's
    /// SourceTimestamp (or its ServerTimestamp when the server gives no
    /// source timestamp).
    pub ts_ms: u64,
    /// For OPC UA: the server's ServerTimestamp, when it gave one, ms since
    /// the Unix epoch. Absent for Modbus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_ts_ms: Option<u64>,
    /// Plausibility flags ([`flag`]), inside the signature like the value;
    /// absent when the value passed every configured check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

impl Sample {
    pub fn good(tag: impl Into<String>, value: Value, ts_ms: u64) -> Self {
        Sample {
            tag: tag.into(),
            value: Some(value),
            quality: Quality::Good,
            reason: None,
            ts_ms,
            server_ts_ms: None,
            flags: Vec::new(),
        }
    }

    pub fn bad(tag: impl Into<String>, reason: impl Into<String>, ts_ms: u64) -> Self {
        Sample {
            tag: tag.into(),
            value: None,
            quality: Quality::Bad,
            reason: Some(reason.into()),
            ts_ms,
            server_ts_ms: None,
            flags: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_with_their_json_type() {
        for (v, json) in [
            (Value::Bool(true), "true"),
            (Value::Int(-7), "-7"),
            (Value::UInt(u64::MAX), "18446744073709551615"),
            (Value::Float(21.0), "21.0"),
            (Value::Text("PUMP-A".into()), "\"PUMP-A\""),
        ] {
            assert_eq!(serde_json::to_string(&v).unwrap(), json);
            assert_eq!(serde_json::from_str::<Value>(json).unwrap(), v);
        }
        // Non-negative integers that fit i64 come back as Int, equal to UInt.
        assert!(matches!(
            serde_json::from_str::<Value>("42").unwrap(),
            Value::Int(42)
        ));
        assert_eq!(Value::Int(42), Value::UInt(42));
        assert_ne!(Value::Int(-1), Value::UInt(u64::MAX));
        assert_ne!(Value::Float(1.0), Value::Int(1));
    }

    #[test]
    fn widened_f32_keeps_its_short_decimal_and_narrows_back_exactly() {
        assert_eq!(widen_f32(2.38), 2.38);
        assert_eq!(widen_f32(-1234.5625), -1234.5625);
        for x in [0.1f32, 1.0e-38, 3.4028235e38, -7.0e-45, 123456.79] {
            assert_eq!(widen_f32(x) as f32, x);
        }
        assert!(widen_f32(f32::NAN).is_nan());
    }

    #[test]
    fn bad_sample_has_no_value_on_the_wire() {
        let s = Sample::bad("t", reason::TIMEOUT, 5);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"tag":"t","quality":"bad","reason":"timeout","ts_ms":5}"#
        );
    }
}
