//! `mirror-server`: the side of ublk-mirror that keeps the mirrors.
//!
//! - [`admin`]: the running server's admin socket (volume changes from
//!   the command line);
//! - [`clients`]: enrolled clients, tokens, revocation;
//! - [`config`]: the settings file, `server.toml`;
//! - [`iscsi`]: the built-in iSCSI target that exports volume versions;
//! - [`serve`]: the QUIC server;
//! - [`snapshots`]: point-in-time versions of a volume, as backward deltas
//!   that cost space in proportion to what changed;
//! - [`store`]: volumes on disk — a sparse image holding one published
//!   epoch, and the staging through which the next epoch arrives, verified
//!   and published atomically (a reader never sees half an epoch, also
//!   after a crash mid-commit).

pub mod admin;
pub mod clients;
pub mod config;
mod error;
pub mod iscsi;
pub mod serve;
mod session;
pub mod snapshots;
pub mod store;

pub use error::{Error, Result};
