//! `mirror-server`: the side of ublk-mirror that keeps the mirrors.
//!
//! - [`identity`]: the server's key and self-signed certificate, pinned
//!   by clients through its fingerprint;
//! - [`config`]: the settings file, `server.toml`;
//! - [`store`]: volumes on disk — a sparse image holding one published
//!   epoch, and the staging through which the next epoch arrives, verified
//!   and published atomically (a reader never sees half an epoch, also
//!   after a crash mid-commit).

pub mod config;
mod error;
pub mod identity;
pub mod store;

pub use error::{Error, Result};
