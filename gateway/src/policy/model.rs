//! The checked policy, as the engine sees it after [`super::Policy::parse`]
//! has read and validated the files: roles, rules with their conditions,
//! and the writable tags of the device configuration they were checked
//! against.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use twin_model::Value;

use crate::config::{Config, DataType, DeviceConfig, ModbusTag};

/// Whether the policy permits commands or only records what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Decisions are acted on (the default).
    #[default]
    Enforce,
    /// Every command is evaluated and denied with `audit_mode`; the reason
    /// says what the policy would have decided. For trying a new policy.
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

/// Where something was written: file and 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A named group of operators.
#[derive(Debug, Clone)]
pub(crate) struct Role {
    pub name: String,
    /// Token `sub` values that hold the role.
    pub subjects: Vec<String>,
    /// Values of the token's roles claim that grant the role.
    pub claims: Vec<String>,
}

impl Role {
    /// Whether an operator with this subject and these role claims holds it.
    pub fn held_by(&self, subject: &str, claims: &[String]) -> bool {
        self.subjects.iter().any(|s| s == subject) || claims.iter().any(|c| self.claims.contains(c))
    }
}

/// A value written in a policy (`allowed`, `equals`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Literal {
    Bool(bool),
    Number(f64),
    Text(String),
}

impl Literal {
    /// Whether a tag value equals this literal (numbers within rounding).
    pub fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Literal::Bool(a), Value::Bool(b)) => a == b,
            (Literal::Text(a), Value::Text(b)) => a == b,
            (Literal::Number(a), v) if !matches!(v, Value::Bool(_) | Value::Text(_)) => {
                v.as_f64().is_some_and(|b| close(*a, b))
            }
            _ => false,
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Number(n) => write!(f, "{n}"),
            Literal::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// Equal within the rounding of scaled register values.
pub(crate) fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// `N` permits per window, e.g. `6/min`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rate {
    pub count: u32,
    pub window_ms: u64,
    /// As written, for messages.
    pub text: String,
}

/// A recurring time window in a time zone.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    /// Monday first. For windows that cross midnight, the day the window
    /// starts on.
    pub days: [bool; 7],
    /// Seconds after local midnight; `to_s` may be 86400 (`24:00`). When
    /// `to_s < from_s` the window crosses midnight.
    pub from_s: u32,
    pub to_s: u32,
    pub tz: jiff::tz::TimeZone,
    /// As written: `mon-fri 06:00-22:00 Europe/Berlin`.
    pub text: String,
}

impl Window {
    /// Whether a local weekday (Monday = 0) and second of the day fall in
    /// the window.
    pub fn contains(&self, weekday: usize, second: u32) -> bool {
        if self.from_s < self.to_s {
            self.days[weekday] && (self.from_s..self.to_s).contains(&second)
        } else {
            let yesterday = (weekday + 6) % 7;
            (self.days[weekday] && second >= self.from_s)
                || (self.days[yesterday] && second < self.to_s)
        }
    }

    /// Whether the instant `ts` falls in the window, and the local time
    /// in words (`Tue 03:12 Europe/Berlin`).
    pub fn at(&self, ts: jiff::Timestamp) -> (bool, String) {
        const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        let z = ts.to_zoned_datetime(self.tz.clone());
        let day = z.weekday().to_monday_zero_offset() as usize % 7;
        let second = (z.hour() as u32) * 3600 + (z.minute() as u32) * 60 + z.second() as u32;
        let text = format!(
            "{} {:02}:{:02} {}",
            WEEKDAYS[day],
            z.hour(),
            z.minute(),
            self.tz.iana_name().unwrap_or("")
        );
        (self.contains(day, second), text)
    }
}

/// A condition on another tag's current value.
#[derive(Debug, Clone)]
pub(crate) struct Interlock {
    pub tag: String,
    pub test: InterlockTest,
}

#[derive(Debug, Clone)]
pub(crate) enum InterlockTest {
    Equals(Literal),
    Range { min: Option<f64>, max: Option<f64> },
}

impl fmt::Display for Interlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.test {
            InterlockTest::Equals(v) => write!(f, "{} = {v}", self.tag),
            InterlockTest::Range { min, max } => match (min, max) {
                (Some(lo), Some(hi)) => write!(f, "{lo} <= {} <= {hi}", self.tag),
                (Some(lo), None) => write!(f, "{} >= {lo}", self.tag),
                (None, Some(hi)) => write!(f, "{} <= {hi}", self.tag),
                (None, None) => write!(f, "{} (any value)", self.tag),
            },
        }
    }
}

/// One rule: who may write which tags, and under which conditions.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub id: String,
    pub description: Option<String>,
    pub place: Place,
    /// Names of the roles that may use the rule (all declared).
    pub roles: Vec<String>,
    /// The writable tags the rule's names and patterns match.
    pub tags: BTreeSet<String>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub allowed: Option<Vec<Literal>>,
    pub max_step: Option<f64>,
    pub rate_per_tag: Option<Rate>,
    pub rate_per_operator: Option<Rate>,
    pub windows: Vec<Window>,
    pub interlocks: Vec<Interlock>,
    pub require_mfa: bool,
    pub approvals: u32,
}

/// What a tag can hold, from the device configuration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TagKind {
    /// On/off (coils and `bool` registers).
    Bool,
    /// A number: engineering value = raw * scale + offset.
    Number {
        /// Raw range of an integer register type; `None` for floats.
        raw: Option<(f64, f64)>,
        /// Largest magnitude of a float type.
        float_max: f64,
        scale: f64,
        offset: f64,
    },
    /// Text of at most this many bytes.
    Text { max_bytes: usize },
}

/// A tag of the device configuration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TagInfo {
    pub writable: bool,
    pub kind: TagKind,
    pub unit: Option<String>,
}

impl TagInfo {
    fn from_opcua(t: &crate::config::OpcUaTag) -> Self {
        use crate::config::OpcUaType as T;
        let int = |lo: f64, hi: f64| TagKind::Number {
            raw: Some((lo, hi)),
            float_max: f64::MAX,
            scale: 1.0,
            offset: 0.0,
        };
        let float = |max: f64| TagKind::Number {
            raw: None,
            float_max: max,
            scale: 1.0,
            offset: 0.0,
        };
        let kind = match t.data_type {
            T::Bool => TagKind::Bool,
            T::SByte => int(f64::from(i8::MIN), f64::from(i8::MAX)),
            T::Byte => int(0.0, f64::from(u8::MAX)),
            T::Int16 => int(f64::from(i16::MIN), f64::from(i16::MAX)),
            T::UInt16 => int(0.0, f64::from(u16::MAX)),
            T::Int32 => int(f64::from(i32::MIN), f64::from(i32::MAX)),
            T::UInt32 => int(0.0, f64::from(u32::MAX)),
            T::Int64 => int(i64::MIN as f64, i64::MAX as f64),
            T::UInt64 => int(0.0, u64::MAX as f64),
            T::Float => float(f64::from(f32::MAX)),
            T::Double => float(f64::MAX),
            T::String => TagKind::Text { max_bytes: 65_535 },
        };
        TagInfo {
            writable: t.writable,
            kind,
            unit: t.unit.clone(),
        }
    }

    fn from_modbus(t: &ModbusTag) -> Self {
        let scale = t.scale.unwrap_or(1.0);
        let offset = t.offset.unwrap_or(0.0);
        let int = |lo: f64, hi: f64| TagKind::Number {
            raw: Some((lo, hi)),
            float_max: f64::MAX,
            scale,
            offset,
        };
        let kind = match t.data_type {
            DataType::Bool => TagKind::Bool,
            DataType::U16 => int(0.0, f64::from(u16::MAX)),
            DataType::I16 => int(f64::from(i16::MIN), f64::from(i16::MAX)),
            DataType::U32 => int(0.0, f64::from(u32::MAX)),
            DataType::I32 => int(f64::from(i32::MIN), f64::from(i32::MAX)),
            DataType::U64 => int(0.0, u64::MAX as f64),
            DataType::I64 => int(i64::MIN as f64, i64::MAX as f64),
            DataType::F32 => TagKind::Number {
                raw: None,
                float_max: f64::from(f32::MAX),
                scale,
                offset,
            },
            DataType::F64 => TagKind::Number {
                raw: None,
                float_max: f64::MAX,
                scale,
                offset,
            },
            DataType::String { registers } => TagKind::Text {
                max_bytes: usize::from(registers) * 2,
            },
        };
        TagInfo {
            writable: t.writable,
            kind,
            unit: t.unit.clone(),
        }
    }

    /// Every tag of every device, by name.
    pub fn all(config: &Config) -> BTreeMap<String, TagInfo> {
        let mut out = BTreeMap::new();
        for d in &config.devices {
            match d {
                DeviceConfig::Modbus(m) => {
                    for t in &m.tags {
                        out.insert(t.name.clone(), TagInfo::from_modbus(t));
                    }
                }
                DeviceConfig::OpcUa(o) => {
                    for t in &o.tags {
                        out.insert(t.name.clone(), TagInfo::from_opcua(t));
                    }
                }
            }
        }
        out
    }

    pub fn is_number(&self) -> bool {
        matches!(self.kind, TagKind::Number { .. })
    }

    /// The engineering values the tag can hold, for numbers.
    pub fn range(&self) -> Option<(f64, f64)> {
        match self.kind {
            TagKind::Number {
                raw,
                float_max,
                scale,
                offset,
            } => {
                let (lo, hi) = raw.unwrap_or((-float_max, float_max));
                let (a, b) = (lo * scale + offset, hi * scale + offset);
                Some((a.min(b), a.max(b)))
            }
            _ => None,
        }
    }

    /// Why `v` cannot be written to this tag, if it cannot.
    pub fn reject(&self, v: &Value) -> Option<String> {
        match &self.kind {
            TagKind::Bool => match v {
                Value::Bool(_) => None,
                Value::Int(0 | 1) | Value::UInt(0 | 1) => None,
                _ => Some(format!("{v} is not on/off: write true or false")),
            },
            TagKind::Text { max_bytes } => match v {
                Value::Text(s) if s.len() <= *max_bytes => None,
                Value::Text(s) => Some(format!(
                    "the text is {} bytes long; the tag holds at most {max_bytes}",
                    s.len()
                )),
                _ => Some(format!("{v} is not text; the tag holds text")),
            },
            TagKind::Number {
                raw,
                float_max,
                scale,
                offset,
            } => {
                let x = match v {
                    Value::Int(_) | Value::UInt(_) | Value::Float(_) => v.as_f64()?,
                    _ => return Some(format!("{v} is not a number; the tag holds a number")),
                };
                let r = (x - offset) / scale;
                let (lo, hi) = self.range().unwrap_or((f64::MIN, f64::MAX));
                match raw {
                    None if r.abs() > *float_max || !r.is_finite() => Some(format!(
                        "{x} is outside what the tag can hold ({lo} .. {hi})"
                    )),
                    None => None,
                    Some((rlo, rhi)) if r < rlo - 1e-6 || r > rhi + 1e-6 => Some(format!(
                        "{x} is outside what the tag can hold ({lo} .. {hi})"
                    )),
                    Some(_) if (r - r.round()).abs() > 1e-6 => Some(format!(
                        "{x} is not a multiple of the tag's resolution {}",
                        scale.abs()
                    )),
                    Some(_) => None,
                }
            }
        }
    }

    /// A value with the tag's unit, for messages.
    pub fn show(&self, v: impl fmt::Display) -> String {
        match &self.unit {
            Some(u) => format!("{v} {u}"),
            None => v.to_string(),
        }
    }
}

/// Whether a tag name matches a pattern: `*` any run of characters
/// (dots included), `?` any one character; everything else literally.
pub(crate) fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

pub(crate) fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_stars_match_any_run_and_question_marks_one_character() {
        assert!(glob("tank1.*", "tank1.pump"));
        assert!(glob("*", "x"));
        assert!(glob("tank?.mode", "tank1.mode"));
        assert!(glob("*.mode", "tank1.mode"));
        assert!(glob("t*k*e", "tank1.mode"));
        assert!(!glob("tank1.*", "tank2.pump"));
        assert!(!glob("tank?.mode", "tank10.mode"));
        assert!(glob("tank1.pump", "tank1.pump"));
    }

    #[test]
    fn windows_crossing_midnight_belong_to_the_day_they_start() {
        let w = Window {
            days: [false, false, false, false, true, false, false], // fri
            from_s: 22 * 3600,
            to_s: 6 * 3600,
            tz: jiff::tz::TimeZone::UTC,
            text: String::new(),
        };
        assert!(w.contains(4, 23 * 3600)); // fri 23:00
        assert!(w.contains(5, 5 * 3600)); // sat 05:00
        assert!(!w.contains(5, 23 * 3600)); // sat 23:00
        assert!(!w.contains(4, 5 * 3600)); // fri 05:00
    }
}
