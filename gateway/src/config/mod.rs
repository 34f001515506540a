//! Configuration: `gateway.toml` -> [`Config`].
//!
//! [`load`] reads the file and returns either a [`Config`] that the rest of
//! the gateway can trust, or [`ConfigErrors`]: every problem found, each
//! with file:line:col and, where there is one, a suggested fix.
//!
//! - [`model`]: the typed configuration.
//! - `load`: the schema of `gateway.toml`, the rules across values and the
//!   checks of the files it names.
//! - `read`: typed reads from the spanned TOML tree that collect errors.
//! - `registers`: register-map overlap detection.
//! - `position`: byte offsets to line and column.
//! - [`ConfigError`], [`ConfigErrors`]: the errors and how they print.
//!
//! `gateway/gateway.example.toml` documents every option; the broken
//! configurations under `gateway/testdata/config/` document every error,
//! each with the errors it must produce.
pub mod model;
pub use model::*;

mod checks;
mod errors;
mod load;
mod opcua;
mod position;
pub(crate) mod read;
mod registers;
#[cfg(test)]
mod tests;

pub use errors::{ConfigError, ConfigErrors};
pub use load::{load, parse_str};
