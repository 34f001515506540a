//! Typed reads from the spanned TOML tree, collecting every error with its
//! position instead of stopping at the first.
//!
//! [`Reader`] holds the errors found so far. Each read returns a [`Field`]:
//! absent, valid (with its span, for later checks that point back at it), or
//! invalid (already reported). Callers read every field of a table first and
//! combine them afterwards, so one bad value never hides another.

use std::ops::{Range, RangeInclusive};
use std::path::Path;

use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use super::errors::ConfigError;
use super::position::LineIndex;

/// A TOML value with its span.
pub type Value<'i> = Spanned<DeValue<'i>>;

/// A table of the file with where it is and what to call it in messages.
#[derive(Clone)]
pub struct Table<'t, 'i> {
    /// The table's entries.
    pub table: &'t DeTable<'i>,
    /// The table header (or inline table, or the start of the file for the root).
    pub span: Range<usize>,
    /// How messages name it: `[mqtt.tls]`, `device "plc1"`, ...
    pub name: String,
}

impl<'t, 'i> Table<'t, 'i> {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&'t Value<'i>> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The span of the key `key` itself (not of its value).
    pub fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.entry(key).map(|(k, _)| k.span())
    }

    fn entry(&self, key: &str) -> Option<(&'t Spanned<toml::de::DeString<'i>>, &'t Value<'i>)> {
        self.table.iter().find(|(k, _)| k.get_ref().as_ref() == key)
    }
}

/// The result of reading one field.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<T> {
    /// The key is not in the table.
    Absent,
    /// The value is present and valid.
    Valid(Spanned<T>),
    /// The value is present but wrong; the error is already reported.
    Invalid,
}

impl<T> Field<T> {
    /// The value, or `default` when absent; `None` when invalid.
    pub fn or(self, default: T) -> Option<T> {
        match self {
            Field::Absent => Some(default),
            Field::Valid(v) => Some(v.into_inner()),
            Field::Invalid => None,
        }
    }

    /// `Some(Some(v))` when valid, `Some(None)` when absent, `None` when invalid.
    pub fn optional(self) -> Option<Option<T>> {
        match self {
            Field::Absent => Some(None),
            Field::Valid(v) => Some(Some(v.into_inner())),
            Field::Invalid => None,
        }
    }

    /// The value when valid (absent and invalid both give `None`).
    pub fn value(self) -> Option<T> {
        match self {
            Field::Valid(v) => Some(v.into_inner()),
            _ => None,
        }
    }

    /// The spanned value when valid.
    pub fn valid(&self) -> Option<&Spanned<T>> {
        match self {
            Field::Valid(v) => Some(v),
            _ => None,
        }
    }

    /// The value when valid.
    pub fn get(&self) -> Option<&T> {
        self.valid().map(Spanned::get_ref)
    }

    /// The span of the value when valid.
    pub fn span(&self) -> Option<Range<usize>> {
        self.valid().map(Spanned::span)
    }

    /// Applies `f` to a valid value; `f` may reject it (having reported why).
    pub fn and_then<U>(self, f: impl FnOnce(Spanned<T>) -> Option<U>) -> Field<U> {
        match self {
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
            Field::Valid(v) => {
                let span = v.span();
                match f(v) {
                    Some(u) => Field::Valid(Spanned::new(span, u)),
                    None => Field::Invalid,
                }
            }
        }
    }
}

/// Collects errors for one file and offers typed reads.
pub struct Reader<'a> {
    file: &'a Path,
    lines: LineIndex<'a>,
    errors: Vec<ConfigError>,
}

/// Parses a TOML document, reporting every syntax error to `r` (a
/// duplicate key by name, with `duplicate_help`); `None` when there was any.
pub(crate) fn parse_document<'i>(
    r: &mut Reader<'_>,
    text: &'i str,
    duplicate_help: &'static str,
) -> Option<Spanned<DeTable<'i>>> {
    let (root, syntax) = DeTable::parse_recoverable(text);
    if syntax.is_empty() {
        return Some(root);
    }
    for e in syntax {
        let span = e.span().unwrap_or(0..0);
        let mut message = e.message().to_string();
        let mut help = None;
        if message == "duplicate key" {
            if let Some(key) = text.get(span.clone()) {
                message = format!("duplicate key \"{key}\"");
            }
            help = Some(duplicate_help);
        }
        r.error_help(&span, message, help);
    }
    None
}

impl<'a> Reader<'a> {
    /// A reader for `text`, naming `file` in its errors.
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Reader {
            file,
            lines: LineIndex::new(text),
            errors: Vec::new(),
        }
    }

    /// The 1-based line on which a span starts.
    pub fn line(&self, span: &Range<usize>) -> usize {
        self.lines.line(span)
    }

    /// Reports an error at the start of `span`.
    pub fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.error_help(span, message, None::<String>);
    }

    /// Reports an error at the start of `span` with a suggested fix.
    pub fn error_help(
        &mut self,
        span: &Range<usize>,
        message: impl Into<String>,
        help: Option<impl Into<String>>,
    ) {
        let (line, col) = self.lines.start(span);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            message: message.into(),
            help: help.map(Into::into),
        });
    }

    /// The errors reported so far.
    pub fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }

    /// Reports every key of `t` that is not in `known`, suggesting the
    /// closest known key.
    pub fn unknown_keys(&mut self, t: &Table<'_, '_>, known: &[&str]) {
        for (k, _) in t.table.iter() {
            let key: &str = k.get_ref();
            if known.contains(&key) {
                continue;
            }
            let help = match closest(key, known) {
                Some(s) => format!("did you mean \"{s}\"?"),
                None => format!("the keys of {} are: {}", t.name, known.join(", ")),
            };
            self.error_help(
                &k.span(),
                format!("unknown key \"{key}\" in {}", t.name),
                Some(help),
            );
        }
    }

    /// Reports a missing required key at the table header.
    pub fn missing(&mut self, t: &Table<'_, '_>, key: &str, what: &str) {
        self.error_help(
            &t.span,
            format!("missing required key \"{key}\" in {}", t.name),
            Some(format!("add `{key} = {what}`")),
        );
    }

    /// Makes an absent field invalid, reporting it as missing.
    pub fn required<T>(
        &mut self,
        t: &Table<'_, '_>,
        key: &str,
        what: &str,
        f: Field<T>,
    ) -> Field<T> {
        match f {
            Field::Absent => {
                self.missing(t, key, what);
                Field::Invalid
            }
            f => f,
        }
    }

    fn wrong_type(&mut self, t: &Table<'_, '_>, key: &str, expected: &str, v: &Value<'_>) {
        self.error(
            &v.span(),
            format!(
                "\"{key}\" in {} must be {expected}, found {}",
                t.name,
                describe(v.get_ref())
            ),
        );
    }

    /// A string.
    pub fn string(&mut self, t: &Table<'_, '_>, key: &str) -> Field<String> {
        let Some(v) = t.get(key) else {
            return Field::Absent;
        };
        match v.get_ref() {
            DeValue::String(s) => Field::Valid(Spanned::new(v.span(), s.to_string())),
            _ => {
                self.wrong_type(t, key, "a string", v);
                Field::Invalid
            }
        }
    }

    /// A string that must not be empty.
    pub fn non_empty(&mut self, t: &Table<'_, '_>, key: &str) -> Field<String> {
        self.string(t, key).and_then(|s| {
            if s.get_ref().trim().is_empty() {
                self.error(
                    &s.span(),
                    format!("\"{key}\" in {} must not be empty", t.name),
                );
                None
            } else {
                Some(s.into_inner())
            }
        })
    }

    /// A non-empty string of a given shape: `problem` names what is wrong
    /// with it (reported with `what` and `help`), or `None` when it fits.
    pub fn shaped(
        &mut self,
        t: &Table<'_, '_>,
        key: &str,
        what: &str,
        problem: impl Fn(&str) -> Option<&'static str>,
        help: &str,
    ) -> Field<String> {
        self.non_empty(t, key)
            .and_then(|s| match problem(s.get_ref()) {
                None => Some(s.into_inner()),
                Some(problem) => {
                    self.error_help(
                        &s.span(),
                        format!("{key} \"{}\" is not {what}: {problem}", s.get_ref()),
                        Some(help),
                    );
                    None
                }
            })
    }

    /// A boolean.
    pub fn boolean(&mut self, t: &Table<'_, '_>, key: &str) -> Field<bool> {
        let Some(v) = t.get(key) else {
            return Field::Absent;
        };
        match v.get_ref() {
            DeValue::Boolean(b) => Field::Valid(Spanned::new(v.span(), *b)),
            _ => {
                self.wrong_type(t, key, "true or false", v);
                Field::Invalid
            }
        }
    }

    /// An integer in `range`, converted to `T` (which must hold the range).
    pub fn integer<T: TryFrom<i64>>(
        &mut self,
        t: &Table<'_, '_>,
        key: &str,
        range: RangeInclusive<i64>,
    ) -> Field<T> {
        let Some(v) = t.get(key) else {
            return Field::Absent;
        };
        let DeValue::Integer(i) = v.get_ref() else {
            self.wrong_type(t, key, "an integer", v);
            return Field::Invalid;
        };
        let n = i64::from_str_radix(i.as_str(), i.radix()).ok();
        match n.filter(|n| range.contains(n)).map(T::try_from) {
            Some(Ok(n)) => Field::Valid(Spanned::new(v.span(), n)),
            _ => {
                self.error(
                    &v.span(),
                    format!(
                        "\"{key}\" in {} must be between {} and {}, found {i}",
                        t.name,
                        range.start(),
                        range.end()
                    ),
                );
                Field::Invalid
            }
        }
    }

    /// A finite number (integer or float).
    pub fn number(&mut self, t: &Table<'_, '_>, key: &str) -> Field<f64> {
        let Some(v) = t.get(key) else {
            return Field::Absent;
        };
        let n = match v.get_ref() {
            // Integers beyond 2^53 lose precision, as any float would.
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|n| n as f64),
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            _ => {
                self.wrong_type(t, key, "a number", v);
                return Field::Invalid;
            }
        };
        match n.filter(|n| n.is_finite()) {
            Some(n) => Field::Valid(Spanned::new(v.span(), n)),
            None => {
                self.error(
                    &v.span(),
                    format!("\"{key}\" in {} must be a finite number", t.name),
                );
                Field::Invalid
            }
        }
    }

    /// One of a fixed set of names, mapped to its value.
    pub fn choice<T: Copy>(
        &mut self,
        t: &Table<'_, '_>,
        key: &str,
        choices: &[(&str, T)],
    ) -> Field<T> {
        self.string(t, key).and_then(|s| {
            if let Some((_, c)) = choices.iter().find(|(n, _)| *n == s.get_ref()) {
                return Some(*c);
            }
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            let listed = names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let help = closest(s.get_ref(), &names).map(|c| format!("did you mean \"{c}\"?"));
            self.error_help(
                &s.span(),
                format!(
                    "unknown {key} \"{}\" in {}; expected one of {listed}",
                    s.get_ref(),
                    t.name
                ),
                help,
            );
            None
        })
    }

    /// A sub-table (a `[header]` table or an inline table), named `name` in
    /// later messages.
    pub fn table<'t, 'i>(
        &mut self,
        t: &Table<'t, 'i>,
        key: &str,
        name: &str,
    ) -> Field<Table<'t, 'i>> {
        let Some(v) = t.get(key) else {
            return Field::Absent;
        };
        match v.get_ref() {
            DeValue::Table(sub) => Field::Valid(Spanned::new(
                v.span(),
                Table {
                    table: sub,
                    span: v.span(),
                    name: name.to_string(),
                },
            )),
            _ => {
                self.wrong_type(t, key, &format!("a table {name}"), v);
                Field::Invalid
            }
        }
    }

    /// An array of tables (`[[key]]`), each with its span.
    pub fn array_of_tables<'t, 'i>(
        &mut self,
        t: &Table<'t, 'i>,
        key: &str,
    ) -> Field<Vec<(&'t DeTable<'i>, Range<usize>)>> {
        let Some(v) = t.get(key) else {
            return Field::Absent;
        };
        let expected = format!("an array of tables ([[{key}]])");
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(t, key, &expected, v);
            return Field::Invalid;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::Table(sub) => out.push((sub, item.span())),
                _ => {
                    self.error(
                        &item.span(),
                        format!(
                            "\"{key}\" in {} must be {expected}, found {}",
                            t.name,
                            describe(item.get_ref())
                        ),
                    );
                    return Field::Invalid;
                }
            }
        }
        Field::Valid(Spanned::new(v.span(), out))
    }
}

/// How a value is named in "found ..." messages.
pub(crate) fn describe(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("string \"{s}\""),
        DeValue::Integer(i) => format!("integer {i}"),
        DeValue::Float(f) => format!("float {f}"),
        DeValue::Boolean(b) => format!("boolean {b}"),
        DeValue::Datetime(d) => format!("datetime {d}"),
        DeValue::Array(_) => "an array".into(),
        DeValue::Table(_) => "a table".into(),
    }
}

/// The candidate closest to `word` if it is close enough to be a likely
/// typo: a small edit distance, the same word in another case, or one
/// containing the other.
pub fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let lower = word.to_ascii_lowercase();
    candidates
        .iter()
        .filter_map(|&c| {
            let d = edit_distance(&lower, &c.to_ascii_lowercase());
            let limit = (c.len().max(word.len()) / 3).clamp(1, 3);
            let contains = word.len() >= 4 && (c.contains(word) || word.contains(c));
            (d <= limit || contains).then_some((d, c))
        })
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("poll_intervall_ms", "poll_interval_ms"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_suggests_typos_and_case_but_not_strangers() {
        let keys = ["poll_interval_ms", "request_timeout_ms", "unit_id"];
        assert_eq!(
            closest("poll_intervall_ms", &keys),
            Some("poll_interval_ms")
        );
        assert_eq!(closest("poll_interval", &keys), Some("poll_interval_ms"));
        assert_eq!(closest("unitid", &keys), Some("unit_id"));
        assert_eq!(closest("colour", &keys), None);
        assert_eq!(closest("abcd", &["ABCD", "BADC"]), Some("ABCD"));
    }
}
