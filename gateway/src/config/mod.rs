//! Configuration: `gateway.toml` -> [`Config`].
pub mod model;
pub use model::*;
