//! `mirror-server`: the side of ublk-mirror that keeps the mirrors.
//!
//! - [`admin`]: the admin socket's protocol, the commands' side of it and
//!   the running server's ([`admin::dispatch`]);
//! - [`chunks`]: the chunk store — every version of every volume as
//!   deduplicated chunks in packs, on a directory or an S3-compatible
//!   bucket, published with one create-only write;
//! - [`clients`]: enrolled clients, tokens, revocation;
//! - [`config`]: the settings file, `server.toml`;
//! - [`exports`]: the export registry — starting, stopping and listing
//!   iSCSI exports, however asked for;
//! - [`iscsi`]: the built-in iSCSI target that exports volume versions;
//! - [`metrics`]: Prometheus metrics on `GET /metrics` (`[metrics]`);
//! - [`schedule`]: scheduled snapshots and their pruning;
//! - [`serve`]: the QUIC server — connections, hellos, revocation, and
//!   the dispatch of requests (whose epoch and restore protocol is in the
//!   private `session` module);
//! - [`snapshots`]: point-in-time versions of a volume, as backward deltas
//!   that cost space in proportion to what changed;
//! - [`store`]: volumes on disk — a sparse image holding one published
//!   epoch, and the staging through which the next epoch arrives, verified
//!   and published atomically (a reader never sees half an epoch, also
//!   after a crash mid-commit);
//! - [`volumes`]: the volume registry — opening, creating within quotas,
//!   sharing open volumes, recovery at start-up.

pub mod admin;
pub mod chunks;
pub mod clients;
pub mod config;
mod error;
pub mod exports;
pub mod iscsi;
pub mod metrics;
pub mod schedule;
pub mod serve;
mod session;
pub mod snapshots;
pub mod store;
pub mod volumes;

pub use error::{Error, Result};

/// Faults a test can inject into a server running in its process (inert
/// unless a test sets them).
#[doc(hidden)]
pub mod faults {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static DROP_NEXT_COMMITTED: Mutex<Option<PathBuf>> = Mutex::new(None);

    /// The next epoch published under `dir` (a data directory) ends its
    /// control stream without answering `Committed`, as a link lost at
    /// that instant would.
    pub fn drop_next_committed(dir: &Path) {
        *DROP_NEXT_COMMITTED
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
    }

    /// Whether the answer for an epoch of the volume in `volume_dir` is to
    /// be dropped (once).
    pub(crate) fn take_drop_committed(volume_dir: &Path) -> bool {
        let mut f = DROP_NEXT_COMMITTED
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let hit = f.as_ref().is_some_and(|d| volume_dir.starts_with(d));
        if hit {
            *f = None;
        }
        hit
    }
}
