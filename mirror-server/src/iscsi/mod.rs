//! A built-in iSCSI target (RFC 7143) that serves a version of a volume
//! as a disk any initiator can attach: read-only, so that nothing can
//! change a backup (the WP bit set, every write-class command answered
//! DATA PROTECT), thin (holes reported by GET LBA STATUS, so copies skip
//! them), with a stable NAA identifier per export.
//!
//! - [`pdu`]: PDUs on the wire (headers, data segments, CRC32C digests);
//! - [`text`]: login and text keys, negotiation;
//! - [`scsi`]: the SCSI command set over a [`scsi::Lun`], sans-IO;
//! - [`target`]: connections, login, discovery, the full feature phase.
//!
//! An export reads a pinned snapshot through the volume (so publishing
//! goes on meanwhile, and the snapshot is never pruned under it); an
//! export of "now" pins a temporary snapshot, removed when the export
//! ends.

pub mod pdu;
pub mod scsi;
pub mod target;
pub mod text;

use std::net::SocketAddr;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::snapshots::{Pin, SnapshotInfo};
use crate::store::Volume;

/// iSCSI's port.
pub const DEFAULT_PORT: u16 = 3260;

/// The IQN prefix of exports.
pub const IQN_PREFIX: &str = "iqn.2026-11.org.ublk-mirror";

/// The target name of an export of `client/volume@snapshot`: lower case,
/// and only the characters an IQN may have.
pub fn export_name(client: &str, volume: &str, snapshot: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
                _ => '-',
            })
            .collect()
    };
    let mut name = format!(
        "{IQN_PREFIX}:{}.{}.{}",
        clean(client),
        clean(volume),
        clean(snapshot)
    );
    name.truncate(223);
    name
}

/// A snapshot of a volume as a logical unit.
#[derive(Debug)]
pub struct SnapshotLun {
    volume: Arc<tokio::sync::Mutex<Volume>>,
    info: SnapshotInfo,
    size: u64,
    id: u64,
    pin: std::sync::Mutex<Option<Pin>>,
}

impl SnapshotLun {
    /// Serve `info` (pinned by `pin`) of `volume`, whose uuid makes the
    /// unit's identifier together with the snapshot's name.
    pub fn new(
        volume: Arc<tokio::sync::Mutex<Volume>>,
        info: SnapshotInfo,
        pin: Pin,
        size: u64,
        uuid: &str,
    ) -> SnapshotLun {
        let mut h = Sha256::new();
        h.update(uuid.as_bytes());
        h.update([0]);
        h.update(info.name.as_bytes());
        let d = h.finalize();
        let id = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        SnapshotLun {
            volume,
            info,
            size: size - size % scsi::BLOCK,
            id,
            pin: std::sync::Mutex::new(Some(pin)),
        }
    }

    /// The snapshot served.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Let go of the snapshot (a temporary one is deleted).
    pub fn release(&self) -> crate::Result<()> {
        let pin = self.pin.lock().unwrap_or_else(|p| p.into_inner()).take();
        match pin {
            Some(pin) => self.volume.blocking_lock().done_reading(&self.info, pin),
            None => Ok(()),
        }
    }
}

fn io(e: crate::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl scsi::Lun for SnapshotLun {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.volume
            .blocking_lock()
            .read_snapshot(self.info.id, buf, offset)
            .map_err(io)
    }

    fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        self.volume
            .blocking_lock()
            .snapshot_extent(self.info.id, offset)
            .map_err(io)
    }

    fn id(&self) -> u64 {
        self.id
    }
}

/// A running export.
#[derive(Debug)]
pub struct Running {
    /// Its target name.
    pub iqn: String,
    /// Where it listens.
    pub portal: SocketAddr,
    /// The snapshot it serves.
    pub snapshot: SnapshotInfo,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stop serving; the snapshot is let go of once connections end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Serve `lun` as target `iqn` on `listen`, letting initiators named in
/// `allowed` in (empty: any).
pub async fn start(
    lun: Arc<SnapshotLun>,
    iqn: String,
    listen: SocketAddr,
    allowed: Vec<String>,
) -> crate::Result<Running> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| crate::Error::io(format!("listening on {listen} (tcp)"), e))?;
    let portal = listener
        .local_addr()
        .map_err(|e| crate::Error::io("reading the bound address", e))?;
    let export = Arc::new(target::Export {
        iqn: iqn.clone(),
        lun: lun.clone(),
        allowed,
    });
    let target = Arc::new(target::Target::new(vec![export]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let snapshot = lun.info().clone();
    let task = tokio::spawn(async move {
        target::serve(listener, target, async {
            let _ = stopped.await;
        })
        .await;
        let done = tokio::task::spawn_blocking(move || lun.release()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!("after an export: {e}");
        }
    });
    Ok(Running {
        iqn,
        portal,
        snapshot,
        stop: Some(stop),
        task: Some(task),
    })
}
