//! Reading volumes without owning them: [`SnapshotReader`], which reads a
//! volume's snapshots without the volume's lock while epochs are
//! published; [`list`], the volumes of a data directory as their
//! `state.json` says, with no recovery; and [`import`], which makes a
//! volume from an image file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use ublk_mirror_common::clock::now_ms;

use super::{read_state, sync_dir, write_state, Volume, VolumeState, VOLUMES_DIR};
use crate::error::{Error, Result};
use crate::snapshots::Snapshots;

/// Reads a volume's snapshots without the volume's lock, while epochs are
/// published: publishing first preserves, in the newest snapshot and
/// under the snapshots' write lock, every chunk the epoch overwrites, and
/// only then writes the image; a read holds the read lock throughout, so
/// it sees each chunk either untouched in the image or preserved — the
/// snapshot as it was. (Snapshots are created, and temporary ones made,
/// under the volume's lock, which a publication holds: never mid-epoch.)
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    snapshots: Arc<RwLock<Snapshots>>,
    image: Arc<File>,
    size: u64,
}

impl SnapshotReader {
    /// A reader of `snapshots` over `image`, of a volume of `size` bytes.
    pub(super) fn new(snapshots: Arc<RwLock<Snapshots>>, image: Arc<File>, size: u64) -> Self {
        SnapshotReader {
            snapshots,
            image,
            size,
        }
    }

    fn snapshots(&self) -> RwLockReadGuard<'_, Snapshots> {
        self.snapshots.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read snapshot `id` at `offset`.
    pub fn read(&self, id: u64, buf: &mut [u8], offset: u64) -> Result<()> {
        self.snapshots()
            .read(id, &self.image, self.size, buf, offset)
    }

    /// Whether snapshot `id` holds data at `offset`, and how far the same
    /// answer goes.
    pub fn extent(&self, id: u64, offset: u64) -> Result<(bool, u64)> {
        self.snapshots().extent(id, &self.image, self.size, offset)
    }
}

/// The directories in `p` (not hidden ones), by name, sorted: a data
/// directory's clients, or a client's volumes.
pub(crate) fn subdirs(p: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(p)
        .map_err(|e| Error::io(format!("listing {}", p.display()), e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Every volume under `data`, as `CLIENT/VOLUME` with its state, sorted.
/// Reads only (no recovery): a volume whose commit was interrupted shows
/// the epoch published before it until the server opens it.
pub fn list(data: &Path) -> Result<Vec<(String, VolumeState)>> {
    let root = data.join(VOLUMES_DIR);
    if !root.is_dir() {
        return Err(Error::Invalid(format!(
            "{} holds no volumes directory: is it the data directory? (`mirror-server init --data {}` makes one)",
            data.display(),
            data.display()
        )));
    }
    // A stray or damaged directory is skipped (and said), so that one
    // does not hide every other volume from listings and metrics.
    let mut out = Vec::new();
    for (client, cdir) in subdirs(&root)? {
        let volumes = match subdirs(&cdir) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("skipped: {e}");
                continue;
            }
        };
        for (volume, vdir) in volumes {
            match read_state(&vdir) {
                Ok(state) => out.push((format!("{client}/{volume}"), state)),
                Err(e) => tracing::warn!(
                    "skipped {}: not a volume that can be read: {e}",
                    vdir.display()
                ),
            }
        }
    }
    Ok(out)
}

/// A version of a volume to read, wherever it is: a snapshot of the
/// image cache, or a version the chunk store keeps (a snapshot this
/// server's cache does not have: taken on another server on the same
/// store, or before the cache was rebuilt).
#[derive(Debug)]
pub enum VersionSource {
    /// Snapshot `id` of the cache.
    Cache {
        /// The cache's snapshots.
        reader: SnapshotReader,
        /// Which one.
        id: u64,
    },
    /// A version in the chunk store.
    Store(crate::chunks::VersionReader),
}

impl VersionSource {
    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            VersionSource::Cache { reader, .. } => reader.size(),
            VersionSource::Store(r) => r.size(),
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            VersionSource::Cache { reader, id } => reader.read(*id, buf, offset),
            VersionSource::Store(r) => r.read_at(buf, offset),
        }
    }

    /// Whether the bytes at `offset` hold data or a hole, and how far that
    /// answer goes.
    pub fn extent(&self, offset: u64) -> Result<(bool, u64)> {
        match self {
            VersionSource::Cache { reader, id } => reader.extent(*id, offset),
            VersionSource::Store(r) => {
                let block = ublk_mirror_common::block::BLOCK;
                let n = offset / block;
                let end = ((n + 1) * block).min(r.size());
                let mapped = r.digest(n)? != crate::chunks::format::HOLE;
                Ok((mapped, end - offset))
            }
        }
    }
}

/// Make volume `dir` from `source`, the image file (or disk) `from` (to
/// seed a mirror with a copy brought by other means), opened by the
/// caller as whoever runs the command (a root-only disk still opens once
/// the command acts as the data's owner): its size, its content as published epoch
/// 1, owned by no device yet (the first device to mirror to it compares
/// by hash and sends only what differs). Built under a hidden name and
/// renamed into place when whole, so no client sees it half made.
/// `progress` gets the bytes copied so far.
pub fn import(
    dir: &Path,
    source: File,
    from: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<VolumeState> {
    if dir.exists() {
        return Err(Error::Invalid(format!(
            "volume directory {} exists already",
            dir.display()
        )));
    }
    // A block device's length is its end, not its metadata.
    let size = std::io::Seek::seek(&mut &source, std::io::SeekFrom::End(0))
        .map_err(|e| Error::io(format!("sizing {}", from.display()), e))?;
    if size == 0 {
        return Err(Error::Invalid(format!("{} is empty", from.display())));
    }
    if size % 512 != 0 {
        // A disk is whole sectors; a device of this size could not be
        // restored onto one, nor exported.
        return Err(Error::Invalid(format!(
            "{} is {size} bytes, not a multiple of 512: not a disk image",
            from.display()
        )));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.with_file_name(format!(".{name}.importing"));
    let _ = std::fs::remove_dir_all(&tmp);
    let volume = Volume::create(&tmp, size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        source
            .read_exact_at(&mut buf[..n], at)
            .map_err(|e| Error::io(format!("reading {}", from.display()), e))?;
        // Zeroes stay holes.
        if buf[..n].iter().any(|&b| b != 0) {
            volume
                .image
                .write_all_at(&buf[..n], at)
                .map_err(|e| Error::io("writing the image", e))?;
        }
        at += n as u64;
        progress(at, size);
    }
    volume
        .image
        .sync_all()
        .map_err(|e| Error::io("syncing the image", e))?;
    let state = VolumeState {
        published_epoch: 1,
        published_ms: now_ms(),
        ..volume.state.clone()
    };
    write_state(&tmp, &state)?;
    drop(volume);
    std::fs::rename(&tmp, dir)
        .map_err(|e| Error::io(format!("moving the import into {}", dir.display()), e))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(state)
}
