//! Register and bit codec: raw Modbus words or bits <-> typed [`Value`]s.
//!
//! Pure functions, no I/O. [`decode`] turns the slice of a read response
//! that belongs to one tag into a [`Sample`] (never panicking on device
//! input: anything that cannot be a value becomes a bad sample with a
//! [`reason`] code); [`encode`] is its inverse, for writes.
//!
//! # Byte order
//! A multi-register value is first brought into big-endian byte order
//! ("canonical") and then read with `from_be_bytes`. [`ByteOrder`] names
//! the wire position of the bytes of a 32-bit value `A B C D`, the same
//! convention as pymodbus' byte order / word order pair:
//!
//! | order | bytes in a register | register order | 0x11223344 on the wire |
//! |---|---|---|---|
//! | `ABCD` | big | big | `[0x1122, 0x3344]` |
//! | `BADC` | little (swapped) | big | `[0x2211, 0x4433]` |
//! | `CDAB` | big | little (reversed) | `[0x3344, 0x1122]` |
//! | `DCBA` | little (swapped) | little (reversed) | `[0x4433, 0x2211]` |
//!
//! 64-bit values apply the same rule to four registers. 16-bit values and
//! strings have no word order: `ABCD`/`CDAB` read each register big-endian,
//! `BADC`/`DCBA` swap the two bytes of each register.
//!
//! # Scaling
//! When a tag sets `scale` or `offset`, a number becomes
//! `Value::Float(raw * scale + offset)` (scale 1 and offset 0 when unset).
//! Otherwise integers keep their exact type: unsigned types give
//! [`Value::UInt`], signed types [`Value::Int`]. Booleans and strings are
//! never scaled.
//!
//! # Strings
//! Two bytes per register, in register order. Trailing NULs and spaces are
//! trimmed; bytes that are not UTF-8 make the sample bad
//! ([`reason::INVALID_STRING`]).

use crate::config::{Area, ByteOrder, DataType, ModbusTag};
use twin_model::sample::{reason, widen_f32};
use twin_model::{Sample, Value};

/// The part of a read response that holds one tag, starting at the tag's
/// first register (or bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw<'a> {
    /// From FC 3 or FC 4.
    Registers(&'a [u16]),
    /// From FC 1 or FC 2.
    Bits(&'a [bool]),
}

/// What a write of one tag puts on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// Registers to write from the tag's address on (FC 6 / FC 16).
    Registers(Vec<u16>),
    /// Bits to write from the tag's address on (FC 5 / FC 15).
    Bits(Vec<bool>),
}

/// Why raw data could not become a value. Each maps to a stable
/// [`reason`] code with [`DecodeError::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The response holds fewer registers (or bits) than the tag needs.
    #[error("the response holds {got} of the {need} registers or bits the tag needs")]
    Short { need: usize, got: usize },
    /// The tag's type cannot live in the area it was read from (a number
    /// in a bit area, or bits for a register tag).
    #[error("data type does not fit the area it was read from")]
    WrongArea,
    /// A float decoded to NaN.
    #[error("value is NaN")]
    Nan,
    /// A float decoded to plus or minus infinity.
    #[error("value is infinite")]
    Infinite,
    /// Scale and offset gave a value that is not finite.
    #[error("scaled value is out of range")]
    OutOfRange,
    /// A string tag's bytes are not valid UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidString,
}

impl DecodeError {
    /// The [`reason`] code a bad sample carries for this error.
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::Short { .. } | DecodeError::WrongArea => reason::PROTOCOL_ERROR,
            DecodeError::Nan => reason::NAN,
            DecodeError::Infinite => reason::INFINITE,
            DecodeError::OutOfRange => reason::OUT_OF_RANGE,
            DecodeError::InvalidString => reason::INVALID_STRING,
        }
    }
}

/// Why a value cannot be written to a tag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// The value's kind does not fit the tag's data type.
    #[error("tag `{tag}` holds {expected}, not {got}")]
    TypeMismatch {
        tag: String,
        expected: &'static str,
        got: &'static str,
    },
    /// The value (after scale and offset) does not fit the tag's type.
    #[error("value {value} is out of range for tag `{tag}` ({data_type:?})")]
    OutOfRange {
        tag: String,
        value: String,
        data_type: DataType,
    },
    /// An integer tag without scaling was given a number with a fraction.
    #[error("value {value} for integer tag `{tag}` is not a whole number")]
    NotIntegral { tag: String, value: f64 },
    /// NaN or infinity.
    #[error("value for tag `{tag}` is not a finite number")]
    NotFinite { tag: String },
    /// The UTF-8 text is longer than the tag's registers hold.
    #[error("text of {len} bytes does not fit tag `{tag}` ({max} bytes)")]
    StringTooLong { tag: String, len: usize, max: usize },
    /// The tag's data type cannot live in its area (a number in a bit area).
    #[error("tag `{tag}`: {data_type:?} cannot be stored in {area:?}")]
    WrongArea {
        tag: String,
        data_type: DataType,
        area: Area,
    },
}

/// Decodes one tag into a sample stamped `ts_ms`: good with a value, or bad
/// with the [`reason`] code of the [`DecodeError`].
pub fn decode(tag: &ModbusTag, raw: Raw<'_>, ts_ms: u64) -> Sample {
    match decode_value(tag, raw) {
        Ok(v) => Sample::good(&tag.name, v, ts_ms),
        Err(e) => Sample::bad(&tag.name, e.reason(), ts_ms),
    }
}

/// Decodes one tag into a value (see the module documentation for the
/// rules). `raw` may be longer than the tag; only its first
/// [`DataType::width`] entries are read.
pub fn decode_value(tag: &ModbusTag, raw: Raw<'_>) -> Result<Value, DecodeError> {
    let regs = match (tag.data_type, raw) {
        (DataType::Bool, Raw::Bits(bits)) => {
            let bit = bits.first().ok_or(DecodeError::Short { need: 1, got: 0 })?;
            return Ok(Value::Bool(*bit));
        }
        (_, Raw::Bits(_)) => return Err(DecodeError::WrongArea),
        (_, Raw::Registers(regs)) => regs,
    };
    let order = tag.order;
    match tag.data_type {
        DataType::Bool => {
            let word = regs.first().ok_or(DecodeError::Short { need: 1, got: 0 })?;
            Ok(Value::Bool(*word != 0))
        }
        DataType::U16 => {
            let v = u16::from_be_bytes(canonical(regs, order)?);
            integer(tag, Value::UInt(v.into()), f64::from(v))
        }
        DataType::I16 => {
            let v = i16::from_be_bytes(canonical(regs, order)?);
            integer(tag, Value::Int(v.into()), f64::from(v))
        }
        DataType::U32 => {
            let v = u32::from_be_bytes(canonical(regs, order)?);
            integer(tag, Value::UInt(v.into()), f64::from(v))
        }
        DataType::I32 => {
            let v = i32::from_be_bytes(canonical(regs, order)?);
            integer(tag, Value::Int(v.into()), f64::from(v))
        }
        DataType::U64 => {
            let v = u64::from_be_bytes(canonical(regs, order)?);
            integer(tag, Value::UInt(v), v as f64)
        }
        DataType::I64 => {
            let v = i64::from_be_bytes(canonical(regs, order)?);
            integer(tag, Value::Int(v), v as f64)
        }
        DataType::F32 => float(tag, widen_f32(f32::from_be_bytes(canonical(regs, order)?))),
        DataType::F64 => float(tag, f64::from_be_bytes(canonical(regs, order)?)),
        DataType::String { registers } => {
            let need = usize::from(registers);
            let words = regs.get(..need).ok_or(DecodeError::Short {
                need,
                got: regs.len(),
            })?;
            let swap = swaps_bytes(order);
            let mut bytes: Vec<u8> = words
                .iter()
                .flat_map(|w| if swap { w.swap_bytes() } else { *w }.to_be_bytes())
                .collect();
            while matches!(bytes.last(), Some(0 | b' ')) {
                bytes.pop();
            }
            String::from_utf8(bytes)
                .map(Value::Text)
                .map_err(|_| DecodeError::InvalidString)
        }
    }
}

/// Encodes a value for a write of `tag`: the inverse of [`decode_value`],
/// with the inverse of scale and offset applied (rounded to the nearest
/// raw integer for integer types) and every range checked.
pub fn encode(tag: &ModbusTag, value: &Value) -> Result<Encoded, EncodeError> {
    let mismatch = |expected: &'static str| EncodeError::TypeMismatch {
        tag: tag.name.clone(),
        expected,
        got: kind(value),
    };
    if tag.area.is_bits() {
        return match (tag.data_type, value) {
            (DataType::Bool, Value::Bool(b)) => Ok(Encoded::Bits(vec![*b])),
            (DataType::Bool, _) => Err(mismatch("a boolean")),
            (data_type, _) => Err(EncodeError::WrongArea {
                tag: tag.name.clone(),
                data_type,
                area: tag.area,
            }),
        };
    }
    let order = tag.order;
    let regs = match tag.data_type {
        DataType::Bool => match value {
            Value::Bool(b) => vec![u16::from(*b)],
            _ => return Err(mismatch("a boolean")),
        },
        DataType::U16 => from_canonical(&int::<u16>(tag, value)?.to_be_bytes(), order),
        DataType::I16 => from_canonical(&int::<i16>(tag, value)?.to_be_bytes(), order),
        DataType::U32 => from_canonical(&int::<u32>(tag, value)?.to_be_bytes(), order),
        DataType::I32 => from_canonical(&int::<i32>(tag, value)?.to_be_bytes(), order),
        DataType::U64 => from_canonical(&int::<u64>(tag, value)?.to_be_bytes(), order),
        DataType::I64 => from_canonical(&int::<i64>(tag, value)?.to_be_bytes(), order),
        DataType::F32 => {
            let x = unscale(tag, value)?;
            if x.abs() > f64::from(f32::MAX) {
                return Err(out_of_range(tag, value));
            }
            from_canonical(&(x as f32).to_be_bytes(), order)
        }
        DataType::F64 => from_canonical(&unscale(tag, value)?.to_be_bytes(), order),
        DataType::String { registers } => {
            let Value::Text(text) = value else {
                return Err(mismatch("text"));
            };
            let max = usize::from(registers) * 2;
            if text.len() > max {
                return Err(EncodeError::StringTooLong {
                    tag: tag.name.clone(),
                    len: text.len(),
                    max,
                });
            }
            let mut bytes = text.as_bytes().to_vec();
            bytes.resize(max, 0);
            let swap = swaps_bytes(order);
            bytes
                .chunks_exact(2)
                .map(|pair| {
                    let w = u16::from_be_bytes([
                        pair.first().copied().unwrap_or(0),
                        pair.get(1).copied().unwrap_or(0),
                    ]);
                    if swap {
                        w.swap_bytes()
                    } else {
                        w
                    }
                })
                .collect()
        }
    };
    Ok(Encoded::Registers(regs))
}

/// `(scale, offset)` when the tag scales its numbers.
fn scaling(tag: &ModbusTag) -> Option<(f64, f64)> {
    if tag.scale.is_none() && tag.offset.is_none() {
        return None;
    }
    Some((tag.scale.unwrap_or(1.0), tag.offset.unwrap_or(0.0)))
}

fn integer(tag: &ModbusTag, exact: Value, raw: f64) -> Result<Value, DecodeError> {
    match scaling(tag) {
        None => Ok(exact),
        Some((scale, offset)) => finite(raw * scale + offset),
    }
}

fn float(tag: &ModbusTag, raw: f64) -> Result<Value, DecodeError> {
    if raw.is_nan() {
        return Err(DecodeError::Nan);
    }
    if raw.is_infinite() {
        return Err(DecodeError::Infinite);
    }
    match scaling(tag) {
        None => Ok(Value::Float(raw)),
        Some((scale, offset)) => finite(raw * scale + offset),
    }
}

fn finite(x: f64) -> Result<Value, DecodeError> {
    if x.is_finite() {
        Ok(Value::Float(x))
    } else {
        Err(DecodeError::OutOfRange)
    }
}

/// Whether the order reverses the registers of a multi-register number.
fn reverses_words(order: ByteOrder) -> bool {
    matches!(order, ByteOrder::Cdab | ByteOrder::Dcba)
}

/// Whether the order swaps the two bytes inside each register.
fn swaps_bytes(order: ByteOrder) -> bool {
    matches!(order, ByteOrder::Badc | ByteOrder::Dcba)
}

/// The first `N / 2` registers as `N` big-endian bytes.
fn canonical<const N: usize>(regs: &[u16], order: ByteOrder) -> Result<[u8; N], DecodeError> {
    let need = N / 2;
    let words = regs.get(..need).ok_or(DecodeError::Short {
        need,
        got: regs.len(),
    })?;
    let swap = swaps_bytes(order);
    let mut out = [0u8; N];
    let put = |(chunk, word): (&mut [u8], &u16)| {
        let w = if swap { word.swap_bytes() } else { *word };
        chunk.copy_from_slice(&w.to_be_bytes());
    };
    if reverses_words(order) {
        out.chunks_exact_mut(2)
            .zip(words.iter().rev())
            .for_each(put);
    } else {
        out.chunks_exact_mut(2).zip(words.iter()).for_each(put);
    }
    Ok(out)
}

/// Big-endian bytes (even length) as wire registers: the inverse of [`canonical`].
fn from_canonical(bytes: &[u8], order: ByteOrder) -> Vec<u16> {
    let swap = swaps_bytes(order);
    let mut words: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| {
            let w = u16::from_be_bytes([
                pair.first().copied().unwrap_or(0),
                pair.get(1).copied().unwrap_or(0),
            ]);
            if swap {
                w.swap_bytes()
            } else {
                w
            }
        })
        .collect();
    if reverses_words(order) {
        words.reverse();
    }
    words
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "a boolean",
        Value::Int(_) | Value::UInt(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Text(_) => "text",
    }
}

fn out_of_range(tag: &ModbusTag, value: &Value) -> EncodeError {
    EncodeError::OutOfRange {
        tag: tag.name.clone(),
        value: value.to_string(),
        data_type: tag.data_type,
    }
}

/// The number to store for a float tag: `(value - offset) / scale`, finite.
fn unscale(tag: &ModbusTag, value: &Value) -> Result<f64, EncodeError> {
    let x = match value {
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => value.as_f64().unwrap_or(f64::NAN),
        Value::Bool(_) | Value::Text(_) => {
            return Err(EncodeError::TypeMismatch {
                tag: tag.name.clone(),
                expected: "a number",
                got: kind(value),
            })
        }
    };
    if !x.is_finite() {
        return Err(EncodeError::NotFinite {
            tag: tag.name.clone(),
        });
    }
    let raw = match scaling(tag) {
        None => x,
        Some((scale, offset)) => (x - offset) / scale,
    };
    if raw.is_finite() {
        Ok(raw)
    } else {
        Err(out_of_range(tag, value))
    }
}

/// The raw integer to store for an integer tag, range-checked for `T`.
fn int<T: TryFrom<i128>>(tag: &ModbusTag, value: &Value) -> Result<T, EncodeError> {
    let wide: i128 = match (scaling(tag), value) {
        (None, Value::Int(i)) => i128::from(*i),
        (None, Value::UInt(u)) => i128::from(*u),
        (None, Value::Float(f)) => {
            if !f.is_finite() {
                return Err(EncodeError::NotFinite {
                    tag: tag.name.clone(),
                });
            }
            if f.fract() != 0.0 {
                return Err(EncodeError::NotIntegral {
                    tag: tag.name.clone(),
                    value: *f,
                });
            }
            // Beyond 2^100 no integer type fits anyway; keep the cast exact.
            if f.abs() > 1e30 {
                return Err(out_of_range(tag, value));
            }
            *f as i128
        }
        (Some(_), _) => {
            let raw = unscale(tag, value)?.round();
            if raw.abs() > 1e30 {
                return Err(out_of_range(tag, value));
            }
            raw as i128
        }
        (None, Value::Bool(_) | Value::Text(_)) => {
            return Err(EncodeError::TypeMismatch {
                tag: tag.name.clone(),
                expected: "a number",
                got: kind(value),
            })
        }
    };
    T::try_from(wide).map_err(|_| out_of_range(tag, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tag(data_type: DataType, order: ByteOrder) -> ModbusTag {
        ModbusTag {
            name: "t".into(),
            area: Area::HoldingRegister,
            address: 0,
            data_type,
            order,
            scale: None,
            offset: None,
            unit: None,
            writable: true,
        }
    }

    fn value(t: &ModbusTag, regs: &[u16]) -> Result<Value, DecodeError> {
        decode_value(t, Raw::Registers(regs))
    }

    const ORDERS: [ByteOrder; 4] = [
        ByteOrder::Abcd,
        ByteOrder::Badc,
        ByteOrder::Cdab,
        ByteOrder::Dcba,
    ];

    #[test]
    fn thirty_two_bit_orders_follow_the_pymodbus_convention() {
        let cases = [
            (ByteOrder::Abcd, [0x1122, 0x3344]),
            (ByteOrder::Badc, [0x2211, 0x4433]),
            (ByteOrder::Cdab, [0x3344, 0x1122]),
            (ByteOrder::Dcba, [0x4433, 0x2211]),
        ];
        for (order, regs) in cases {
            let t = tag(DataType::U32, order);
            assert_eq!(value(&t, &regs), Ok(Value::UInt(0x1122_3344)), "{order:?}");
            assert_eq!(
                encode(&t, &Value::UInt(0x1122_3344)),
                Ok(Encoded::Registers(regs.to_vec()))
            );
        }
    }

    #[test]
    fn sixty_four_bit_orders_extend_the_same_rule_to_four_registers() {
        let cases = [
            (ByteOrder::Abcd, [0x1122, 0x3344, 0x5566, 0x7788]),
            (ByteOrder::Badc, [0x2211, 0x4433, 0x6655, 0x8877]),
            (ByteOrder::Cdab, [0x7788, 0x5566, 0x3344, 0x1122]),
            (ByteOrder::Dcba, [0x8877, 0x6655, 0x4433, 0x2211]),
        ];
        for (order, regs) in cases {
            let t = tag(DataType::U64, order);
            assert_eq!(
                value(&t, &regs),
                Ok(Value::UInt(0x1122_3344_5566_7788)),
                "{order:?}"
            );
        }
    }

    #[test]
    fn sixteen_bit_values_only_swap_bytes() {
        for (order, expected) in [
            (ByteOrder::Abcd, 0x1234),
            (ByteOrder::Cdab, 0x1234),
            (ByteOrder::Badc, 0x3412),
            (ByteOrder::Dcba, 0x3412),
        ] {
            assert_eq!(
                value(&tag(DataType::U16, order), &[0x1234]),
                Ok(Value::UInt(expected))
            );
        }
        assert_eq!(
            value(&tag(DataType::I16, ByteOrder::Abcd), &[0xFFFE]),
            Ok(Value::Int(-2))
        );
    }

    #[test]
    fn floats_decode_and_nan_or_infinity_are_bad() {
        let t = tag(DataType::F32, ByteOrder::Abcd);
        // 1.5f32 = 0x3FC00000
        assert_eq!(value(&t, &[0x3FC0, 0x0000]), Ok(Value::Float(1.5)));
        assert_eq!(value(&t, &[0x7FC0, 0x0000]), Err(DecodeError::Nan));
        assert_eq!(value(&t, &[0xFF80, 0x0000]), Err(DecodeError::Infinite));
        let t = tag(DataType::F64, ByteOrder::Abcd);
        assert_eq!(value(&t, &[0x7FF0, 0, 0, 0]), Err(DecodeError::Infinite));
        assert_eq!(
            decode(&t, Raw::Registers(&[0x7FF8, 0, 0, 1]), 7)
                .reason
                .as_deref(),
            Some(reason::NAN)
        );
    }

    #[test]
    fn scale_and_offset_make_a_float_and_overflow_is_out_of_range() {
        let mut t = tag(DataType::I16, ByteOrder::Abcd);
        t.scale = Some(0.1);
        assert_eq!(
            value(&t, &[(-215i16) as u16]),
            Ok(Value::Float(-215.0 * 0.1))
        );
        t.scale = None;
        t.offset = Some(-40.0);
        assert_eq!(value(&t, &[100]), Ok(Value::Float(60.0)));
        let mut t = tag(DataType::F64, ByteOrder::Abcd);
        t.scale = Some(1e300);
        // f64::MAX = 0x7FEF_FFFF_FFFF_FFFF
        let s = decode(&t, Raw::Registers(&[0x7FEF, 0xFFFF, 0xFFFF, 0xFFFF]), 1);
        assert_eq!(s.reason.as_deref(), Some(reason::OUT_OF_RANGE));
        assert_eq!(s.value, None);
    }

    #[test]
    fn strings_trim_trailing_nuls_and_spaces_and_reject_bad_utf8() {
        let t = tag(DataType::String { registers: 4 }, ByteOrder::Abcd);
        // "B-7 " then NULs
        assert_eq!(
            value(&t, &[0x422D, 0x3720, 0x0000, 0x0000]),
            Ok(Value::Text("B-7".into()))
        );
        let t = tag(DataType::String { registers: 2 }, ByteOrder::Badc);
        assert_eq!(value(&t, &[0x2D42, 0x0037]), Ok(Value::Text("B-7".into())));
        let s = decode(&t, Raw::Registers(&[0xFFFF, 0x0000]), 3);
        assert_eq!(s.reason.as_deref(), Some(reason::INVALID_STRING));
    }

    #[test]
    fn short_responses_and_wrong_areas_are_protocol_errors_not_panics() {
        let t = tag(DataType::F64, ByteOrder::Dcba);
        assert_eq!(
            value(&t, &[1, 2]),
            Err(DecodeError::Short { need: 4, got: 2 })
        );
        let s = decode(&t, Raw::Bits(&[true]), 1);
        assert_eq!(s.reason.as_deref(), Some(reason::PROTOCOL_ERROR));
        let b = tag(DataType::Bool, ByteOrder::Abcd);
        assert_eq!(
            decode_value(&b, Raw::Bits(&[])),
            Err(DecodeError::Short { need: 1, got: 0 })
        );
        assert_eq!(value(&b, &[]), Err(DecodeError::Short { need: 1, got: 0 }));
        let s = tag(DataType::String { registers: 3 }, ByteOrder::Abcd);
        assert_eq!(
            value(&s, &[0x4141]),
            Err(DecodeError::Short { need: 3, got: 1 })
        );
    }

    #[test]
    fn encode_checks_ranges_types_and_lengths() {
        let t = tag(DataType::U16, ByteOrder::Abcd);
        assert!(matches!(
            encode(&t, &Value::Int(-1)),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&t, &Value::UInt(65_536)),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&t, &Value::Float(1.5)),
            Err(EncodeError::NotIntegral { .. })
        ));
        assert!(matches!(
            encode(&t, &Value::Float(f64::NAN)),
            Err(EncodeError::NotFinite { .. })
        ));
        assert!(matches!(
            encode(&t, &Value::Text("1".into())),
            Err(EncodeError::TypeMismatch { .. })
        ));
        assert_eq!(
            encode(&t, &Value::Float(7.0)),
            Ok(Encoded::Registers(vec![7]))
        );
        let mut s = tag(DataType::U16, ByteOrder::Abcd);
        s.scale = Some(0.01);
        assert_eq!(
            encode(&s, &Value::Float(2.5)),
            Ok(Encoded::Registers(vec![250]))
        );
        assert!(matches!(
            encode(&s, &Value::Float(655.36)),
            Err(EncodeError::OutOfRange { .. })
        ));
        let f = tag(DataType::F32, ByteOrder::Abcd);
        assert!(matches!(
            encode(&f, &Value::Float(1e39)),
            Err(EncodeError::OutOfRange { .. })
        ));
        let st = tag(DataType::String { registers: 1 }, ByteOrder::Abcd);
        assert!(matches!(
            encode(&st, &Value::Text("abc".into())),
            Err(EncodeError::StringTooLong { .. })
        ));
        let mut coil = tag(DataType::Bool, ByteOrder::Abcd);
        coil.area = Area::Coil;
        assert_eq!(
            encode(&coil, &Value::Bool(true)),
            Ok(Encoded::Bits(vec![true]))
        );
        coil.data_type = DataType::U16;
        assert!(matches!(
            encode(&coil, &Value::UInt(1)),
            Err(EncodeError::WrongArea { .. })
        ));
    }

    fn any_order() -> impl Strategy<Value = ByteOrder> {
        proptest::sample::select(ORDERS.to_vec())
    }

    /// A data type with a value of that type (unscaled).
    fn typed_value() -> impl Strategy<Value = (DataType, Value)> {
        prop_oneof![
            any::<bool>().prop_map(|b| (DataType::Bool, Value::Bool(b))),
            any::<u16>().prop_map(|v| (DataType::U16, Value::UInt(v.into()))),
            any::<i16>().prop_map(|v| (DataType::I16, Value::Int(v.into()))),
            any::<u32>().prop_map(|v| (DataType::U32, Value::UInt(v.into()))),
            any::<i32>().prop_map(|v| (DataType::I32, Value::Int(v.into()))),
            any::<u64>().prop_map(|v| (DataType::U64, Value::UInt(v))),
            any::<i64>().prop_map(|v| (DataType::I64, Value::Int(v))),
            any::<f32>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|v| (DataType::F32, Value::Float(widen_f32(v)))),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|v| (DataType::F64, Value::Float(v))),
            ("([ -~é€]{0,9}[!-~é€])?", 15u16..20)
                .prop_map(|(s, registers)| { (DataType::String { registers }, Value::Text(s)) }),
        ]
    }

    proptest! {
        #[test]
        fn decode_of_encode_gives_back_every_unscaled_value(
            (data_type, v) in typed_value(),
            order in any_order(),
            bits in any::<bool>(),
        ) {
            let mut t = tag(data_type, order);
            if bits && data_type == DataType::Bool {
                t.area = Area::DiscreteInput;
            }
            let back = match encode(&t, &v).expect("the value fits its own type") {
                Encoded::Registers(regs) => {
                    prop_assert_eq!(regs.len(), usize::from(data_type.width()));
                    decode_value(&t, Raw::Registers(&regs))
                }
                Encoded::Bits(b) => decode_value(&t, Raw::Bits(&b)),
            };
            prop_assert_eq!(back, Ok(v));
        }

        #[test]
        fn decode_of_encode_gives_back_scaled_integers(
            raw in -(1i64 << 40)..(1i64 << 40),
            data_type in proptest::sample::select(vec![
                DataType::I16, DataType::U16, DataType::I32, DataType::U32, DataType::I64, DataType::U64,
            ]),
            order in any_order(),
            scale in proptest::sample::select(vec![0.1, 0.01, 0.001, 2.0, 10.0, -0.5]),
            offset in proptest::sample::select(vec![0.0, -40.0, 273.15]),
        ) {
            let mut t = tag(data_type, order);
            t.scale = Some(scale);
            t.offset = Some(offset);
            let x = Value::Float(raw as f64 * scale + offset);
            match encode(&t, &x) {
                Ok(Encoded::Registers(regs)) => {
                    prop_assert_eq!(decode_value(&t, Raw::Registers(&regs)), Ok(x));
                }
                Ok(Encoded::Bits(_)) => prop_assert!(false, "registers expected"),
                // Raw values beyond the type's range are refused, never wrapped.
                Err(EncodeError::OutOfRange { .. }) => {
                    let fits = match data_type {
                        DataType::I16 => i16::try_from(raw).is_ok(),
                        DataType::U16 => u16::try_from(raw).is_ok(),
                        DataType::I32 => i32::try_from(raw).is_ok(),
                        DataType::U32 => u32::try_from(raw).is_ok(),
                        _ => raw >= 0 || data_type == DataType::I64,
                    };
                    prop_assert!(!fits, "{raw} fits {data_type:?} but was refused");
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        #[test]
        fn decode_of_encode_keeps_scaled_floats_close(
            raw in -1e6f64..1e6,
            order in any_order(),
            wide in any::<bool>(),
            scale in proptest::sample::select(vec![0.1, 0.001, 2.0, 10.0]),
            offset in proptest::sample::select(vec![0.0, -40.0, 273.15]),
        ) {
            let mut t = tag(if wide { DataType::F64 } else { DataType::F32 }, order);
            t.scale = Some(scale);
            t.offset = Some(offset);
            let x = raw * scale + offset;
            let Ok(Encoded::Registers(regs)) = encode(&t, &Value::Float(x)) else {
                return Err(TestCaseError::fail("encode failed"));
            };
            let Ok(Value::Float(y)) = decode_value(&t, Raw::Registers(&regs)) else {
                return Err(TestCaseError::fail("decode failed"));
            };
            let tolerance = if wide { 1e-9 } else { 1e-6 } * (x.abs() + scale.abs() * raw.abs() + 1.0);
            prop_assert!((x - y).abs() <= tolerance, "{x} -> {y}");
        }

        #[test]
        fn decode_never_panics_on_device_bytes(
            regs in proptest::collection::vec(any::<u16>(), 0..10),
            (data_type, _) in typed_value(),
            order in any_order(),
        ) {
            let _ = decode(&tag(data_type, order), Raw::Registers(&regs), 0);
        }
    }
}
