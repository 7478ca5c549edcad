//! `mirror-server`: the side of ublk-mirror that keeps the mirrors.
//!
//! - [`config`]: the settings file, `server.toml`;
//! - [`store`]: volumes on disk — a sparse image holding one published
//!   epoch, and the staging through which the next epoch arrives, verified
//!   and published atomically (a reader never sees half an epoch, also
//!   after a crash mid-commit).

pub mod config;
mod error;
pub mod store;

pub use error::{Error, Result};
