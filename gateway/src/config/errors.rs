//! Configuration errors: each one names the file, the line and the column of
//! the offending key or value, says what is wrong and, where there is an
//! obvious fix, how to fix it.
//!
//! ```text
//! gateway.toml:12:9: error: duplicate tag name "tank1.level" (first defined at line 5)
//!   help: tag names are the keys of the twin; rename one of the two tags
//! ```

use std::path::PathBuf;

/// One problem in a configuration file.
///
/// `line` and `col` are 1-based (columns count characters, not bytes). Both
/// are 0 when the error concerns the whole file, for example when it cannot
/// be read; the position is then left out of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(self))]
pub struct ConfigError {
    /// The configuration file, as it was named to the loader.
    pub file: PathBuf,
    /// 1-based line, or 0 for the whole file.
    pub line: usize,
    /// 1-based column in characters, or 0 for the whole file.
    pub col: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is a fix to suggest.
    pub help: Option<String>,
}

fn render(e: &ConfigError) -> String {
    let mut out = if e.line == 0 {
        format!("{}: error: {}", e.file.display(), e.message)
    } else {
        format!(
            "{}:{}:{}: error: {}",
            e.file.display(),
            e.line,
            e.col,
            e.message
        )
    };
    if let Some(help) = &e.help {
        out.push_str("\n  help: ");
        out.push_str(help);
    }
    out
}

/// Every problem found in a configuration file, sorted by position.
///
/// Displays one error per block (the error line, then its `help:` line if
/// any), each block ending with a newline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_all(&self.errors))]
pub struct ConfigErrors {
    /// The errors, sorted by line and column. Never empty.
    pub errors: Vec<ConfigError>,
}

fn render_all(errors: &[ConfigError]) -> String {
    errors.iter().fold(String::new(), |mut out, e| {
        out.push_str(&e.to_string());
        out.push('\n');
        out
    })
}

impl ConfigErrors {
    /// Wraps a list of errors, sorted by position (stable for equal positions).
    pub fn new(mut errors: Vec<ConfigError>) -> Self {
        errors.sort_by_key(|e| (e.line, e.col));
        ConfigErrors { errors }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: usize, col: usize, message: &str, help: Option<&str>) -> ConfigError {
        ConfigError {
            file: PathBuf::from("gateway.toml"),
            line,
            col,
            message: message.into(),
            help: help.map(Into::into),
        }
    }

    #[test]
    fn errors_render_with_position_and_help_sorted_by_position() {
        let all = ConfigErrors::new(vec![
            err(12, 9, "second", Some("do this")),
            err(0, 0, "whole file", None),
            err(3, 1, "first", None),
        ]);
        assert_eq!(
            all.to_string(),
            "gateway.toml: error: whole file\n\
             gateway.toml:3:1: error: first\n\
             gateway.toml:12:9: error: second\n  help: do this\n"
        );
    }
}
