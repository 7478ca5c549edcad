//! `mirror-server`: the side of ublk-mirror that keeps the mirrors.
//!
//! - [`clients`]: enrolled clients, tokens, revocation;
//! - [`config`]: the settings file, `server.toml`;
//! - [`serve`]: the QUIC server;
//! - [`store`]: volumes on disk — a sparse image holding one published
//!   epoch, and the staging through which the next epoch arrives, verified
//!   and published atomically (a reader never sees half an epoch, also
//!   after a crash mid-commit).

pub mod clients;
pub mod config;
mod error;
pub mod serve;
pub mod store;

pub use error::{Error, Result};
