//! A built-in iSCSI target (RFC 7143) that serves a version of a volume
//! as a disk any initiator can attach: read-only, so that nothing can
//! change a backup (the WP bit set, every write-class command answered
//! DATA PROTECT), thin (holes reported by GET LBA STATUS, so copies skip
//! them), with a stable NAA identifier per export.
//!
//! - [`pdu`]: PDUs on the wire (headers, data segments, CRC32C digests);
//! - [`text`]: login and text keys, negotiation;
//! - [`scsi`]: the SCSI command set over a [`scsi::Lun`], sans-IO;
//! - [`unit`](mod@unit): the logical unit its initiators share (reservations,
//!   software write protect, unit attentions), sans-IO;
//! - [`target`]: connections, login, discovery, the full feature phase.
//!
//! `--writable` serves a throwaway copy-on-write overlay instead
//! ([`OverlayLun`]): writes land in an unnamed file that is gone when the
//! export ends; the snapshot is never touched.
//!
//! An export reads a pinned snapshot without the volume's lock (so
//! publishing goes on meanwhile; see [`SnapshotReader`](crate::store::SnapshotReader)), and the
//! snapshot is never pruned under it; an
//! export of "now" pins a temporary snapshot, removed when the export
//! ends.

pub mod pdu;
pub mod scsi;
pub mod target;
pub mod text;
pub mod unit;

use std::net::SocketAddr;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::snapshots::{Pin, SnapshotInfo};
use crate::store::{VersionSource, Volume};

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
    /// For letting go of the snapshot at the end.
    volume: Arc<tokio::sync::Mutex<Volume>>,
    /// For reading it, without the volume's lock.
    source: VersionSource,
    info: SnapshotInfo,
    size: u64,
    id: u64,
    pin: std::sync::Mutex<Option<Pin>>,
}

fn lun_id(uuid: &str, name: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(uuid.as_bytes());
    h.update([0]);
    h.update(name.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

impl SnapshotLun {
    /// Serve `info` (pinned by `pin`) of `volume`, read through `reader`;
    /// the volume's uuid makes the unit's identifier together with the
    /// snapshot's name.
    pub fn new(
        volume: Arc<tokio::sync::Mutex<Volume>>,
        source: VersionSource,
        info: SnapshotInfo,
        pin: Option<Pin>,
        uuid: &str,
    ) -> SnapshotLun {
        let size = source.size();
        SnapshotLun {
            volume,
            source,
            id: lun_id(uuid, &info.name),
            info,
            size: size - size % scsi::BLOCK,
            pin: std::sync::Mutex::new(pin),
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
            Some(pin) => self
                .volume
                .blocking_lock()
                .done_reading(&self.info, Some(pin)),
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
        self.source.read(buf, offset).map_err(io)
    }

    fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        self.source.extent(offset).map_err(io)
    }

    fn id(&self) -> u64 {
        self.id
    }
}

/// A throwaway copy-on-write overlay over a [`SnapshotLun`]: writes go to
/// an unnamed sparse file (gone when the export ends), reads take what
/// was written from it and the rest from the snapshot, which is never
/// touched. To boot or fsck a restored system without changing the backup.
#[derive(Debug)]
pub struct OverlayLun {
    base: Arc<SnapshotLun>,
    file: std::fs::File,
    /// Byte ranges whose content is the overlay's.
    written: std::sync::Mutex<ublk_mirror_common::RangeSet>,
}

impl OverlayLun {
    /// An overlay over `base`, its file made unnamed in `dir`.
    pub fn new(base: Arc<SnapshotLun>, dir: &std::path::Path) -> crate::Result<OverlayLun> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_TMPFILE.bits())
            .mode(0o600)
            .open(dir)
            .map_err(|e| {
                crate::Error::io(format!("making an overlay file in {}", dir.display()), e)
            })?;
        file.set_len(scsi::Lun::size(&*base))
            .map_err(|e| crate::Error::io("sizing the overlay file", e))?;
        Ok(OverlayLun {
            base,
            file,
            written: std::sync::Mutex::new(ublk_mirror_common::RangeSet::new()),
        })
    }

    /// The snapshot under it.
    pub fn base(&self) -> &Arc<SnapshotLun> {
        &self.base
    }

    fn written(&self) -> std::sync::MutexGuard<'_, ublk_mirror_common::RangeSet> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl scsi::Lun for OverlayLun {
    fn size(&self) -> u64 {
        scsi::Lun::size(&*self.base)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = offset + buf.len() as u64;
        let pieces: Vec<std::ops::Range<u64>> = self.written().intersection(offset..end).collect();
        let mut at = offset;
        for piece in pieces.iter().cloned().chain(std::iter::once(end..end)) {
            if at < piece.start {
                let b = &mut buf[(at - offset) as usize..(piece.start - offset) as usize];
                scsi::Lun::read(&*self.base, at, b)?;
            }
            if piece.start < piece.end {
                let b = &mut buf[(piece.start - offset) as usize..(piece.end - offset) as usize];
                self.file.read_exact_at(b, piece.start)?;
            }
            at = at.max(piece.end);
        }
        Ok(())
    }

    fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        let size = scsi::Lun::size(self);
        let written = self.written();
        if written.contains(offset) {
            // What was written counts as data (zeroed ranges too: safe).
            let end = written
                .intersection(offset..size)
                .next()
                .map_or(offset + 1, |r| r.end);
            return Ok((true, end - offset));
        }
        let next = written
            .intersection(offset..size)
            .next()
            .map_or(size, |r| r.start);
        drop(written);
        let (mapped, len) = scsi::Lun::extent(&*self.base, offset)?;
        Ok((mapped, len.min(next - offset).max(1)))
    }

    fn id(&self) -> u64 {
        // Another unit than the snapshot itself.
        scsi::Lun::id(&*self.base) ^ 0x0f0f_0f0f_0f0f_0f0f
    }

    fn writable(&self) -> bool {
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let fs = nix::sys::statvfs::fstatvfs(&self.file).map_err(std::io::Error::from)?;
        let free = fs.blocks_available() * fs.fragment_size();
        let total = fs.blocks() * fs.fragment_size();
        if !overlay_may_take(data.len() as u64, free, total) {
            // The overlay lives beside the mirrors: a guest writing on
            // must not fill the disk that replication needs.
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        self.file.write_all_at(data, offset)?;
        self.written().insert(offset..offset + data.len() as u64);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        ublk_mirror_common::fsutil::punch_or_zero(&self.file, offset, len)?;
        self.written().insert(offset..offset + len);
        Ok(())
    }
}

/// Whether an overlay may take `len` more bytes on a file system with
/// `free` of `total` bytes free: it always leaves 5% of the file system,
/// and at most 1 GiB, to the mirror server.
fn overlay_may_take(len: u64, free: u64, total: u64) -> bool {
    let reserve = (total / 20).min(1 << 30);
    free.saturating_sub(len) >= reserve
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
    /// `CLIENT/VOLUME` (set by whoever started it; empty if none did).
    pub volume: String,
    /// Writes go to a throwaway overlay.
    pub writable: bool,
    target: Arc<target::Target>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Initiator connections open now (its readers).
    pub fn connections(&self) -> usize {
        self.target.connections()
    }

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

/// Serve `base` (or an overlay over it, when `overlay` names a directory
/// for its file) as target `iqn` on `listen`, letting initiators named in
/// `allowed` in (empty: any).
pub async fn start(
    base: Arc<SnapshotLun>,
    overlay: Option<&std::path::Path>,
    iqn: String,
    listen: SocketAddr,
    allowed: Vec<String>,
    chap: Option<target::Chap>,
) -> crate::Result<Running> {
    let lun = base;
    let unit: Arc<dyn scsi::Lun> = match overlay {
        Some(dir) => Arc::new(OverlayLun::new(lun.clone(), dir)?),
        None => lun.clone(),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| crate::Error::io(format!("listening on {listen} (tcp)"), e))?;
    let portal = listener
        .local_addr()
        .map_err(|e| crate::Error::io("reading the bound address", e))?;
    let export = Arc::new(target::Export {
        iqn: iqn.clone(),
        unit: Arc::new(unit::Unit::new(unit)),
        allowed,
        chap,
    });
    let target = Arc::new(target::Target::new(vec![export]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let snapshot = lun.info().clone();
    let served = target.clone();
    let task = tokio::spawn(async move {
        target::serve(listener, served, async {
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
        volume: String::new(),
        writable: overlay.is_some(),
        target,
        stop: Some(stop),
        task: Some(task),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_leaves_room_to_the_mirrors() {
        // 100 GiB file system: 1 GiB is kept.
        let total = 100 << 30;
        assert!(overlay_may_take(1 << 20, 2 << 30, total));
        assert!(!overlay_may_take(1 << 20, 1 << 30, total));
        assert!(!overlay_may_take(2 << 30, (2 << 30) + 1, total));
        // 10 GiB: 5%, 512 MiB.
        let total = 10 << 30;
        assert!(overlay_may_take(1 << 20, 600 << 20, total));
        assert!(!overlay_may_take(1 << 20, 512 << 20, total));
    }
}
