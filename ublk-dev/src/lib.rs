//! `ublk-dev`: the device side of ublk-mirror.
//!
//! A ublk block device (`/dev/ublkbN`) whose every request is carried out on
//! a backing file, as safely and about as fast as the kernel's loop device.
//!
//! - [`config`]: device settings, from a TOML file and the command line;
//! - [`backing`]: opening, creating, locking the backing file;
//! - [`engine`]: the sans-IO I/O engine, and its io_uring execution;
//! - [`journal`]: the crash-safe write-intent journal of changed regions;
//! - [`tracking`]: change tracking in the write path (journal + exact ranges);
//! - [`epoch`]: consistent cuts of the changes, with copy-on-write of what
//!   sealed epochs still need;
//! - [`replicator`]: ships sealed epochs to the mirror server (its own thread);
//! - [`yielding`]: a pre-copy round gives way to the device's own I/O;
//! - [`ondemand`]: a mirror version read on demand (`attach`);
//! - [`restore`]: pull restore of a volume version from the mirror server;
//! - [`ublk`]: the glue to the kernel driver (the only module using libublk);
//! - [`status`]: the status a daemon publishes for `ublk-mirror status`;
//! - [`metrics`]: that status in Prometheus' text format;
//! - [`control`]: the daemon's control socket (seal, read, release epochs);
//! - [`enrollment`]: this machine's identity and the mirror server it pinned;
//! - [`system`]: process set-up (mount namespace, systemd notification).

pub mod backing;
pub mod config;
pub mod control;
pub mod engine;
pub mod enrollment;
pub mod epoch;
mod error;
pub mod journal;
pub mod metrics;
pub mod ondemand;
pub mod replicator;
pub mod restore;
pub mod status;
pub mod system;
pub mod tracking;
pub mod ublk;
pub mod wake;
pub mod yielding;

pub use error::{Error, ErrorKind, Result};

/// Run `f` on a blocking thread (`what`: the worker, for the error if it
/// panicked).
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    joined(what, tokio::task::spawn_blocking(f)).await
}

/// The result of blocking work started earlier ([`blocking`] at once).
pub(crate) async fn joined<T>(
    what: &'static str,
    job: tokio::task::JoinHandle<Result<T>>,
) -> Result<T> {
    job.await
        .map_err(|e| Error::io(what, std::io::Error::other(e.to_string())))?
}
