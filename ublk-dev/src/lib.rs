//! `ublk-dev`: the device side of ublk-mirror.
//!
//! A ublk block device (`/dev/ublkbN`) whose every request is carried out on
//! a backing file, as safely and about as fast as the kernel's loop device.
//!
//! - [`config`]: device settings, from a TOML file and the command line;
//! - [`backing`]: opening, creating, locking the backing file;
//! - [`engine`]: the sans-IO I/O engine, and its io_uring execution;
//! - [`journal`]: the crash-safe write-intent journal of changed regions;
//! - [`ublk`]: the glue to the kernel driver (the only module using libublk);
//! - [`system`]: process set-up (mount namespace, systemd notification).

pub mod backing;
pub mod config;
pub mod engine;
mod error;
pub mod journal;
pub mod system;
pub mod ublk;

pub use error::{Error, ErrorKind, Result};
