//! Reading volumes without owning them: [`SnapshotReader`], which reads a
//! volume's snapshots without the volume's lock while epochs are
//! published; [`VersionSource`], a version to read wherever it is, whose
//! cache reads are checked against the chunk store ([`CacheCheck`]);
//! [`list`], the volumes of a data directory as their
//! `state.json` says, with no recovery; and [`import`], which makes a
//! volume from an image file.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use ublk_mirror_common::block::{self, BLOCK};
use ublk_mirror_common::clock::now_ms;
use ublk_mirror_common::proto::Digest;

use super::{block_len, read_state, sync_dir, write_state, Volume, VolumeState, VOLUMES_DIR};
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
        /// The chunk store's copy of the same version, which each block
        /// read from the cache is checked against (none: the store has no
        /// such version, or could not be read when it was opened).
        check: Option<Box<CacheCheck>>,
    },
    /// A version in the chunk store (every chunk checked as it is read).
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
            VersionSource::Cache {
                reader,
                id,
                check: Some(check),
            } => check.read(reader, *id, buf, offset).map(|_| ()),
            VersionSource::Cache { reader, id, .. } => reader.read(*id, buf, offset),
            VersionSource::Store(r) => r.read_at(buf, offset),
        }
    }

    /// The `len` bytes at `offset` with their sha256 where it is known
    /// without hashing them again: a whole block of the store's, or one
    /// the cache check hashed.
    pub fn read_block(&self, offset: u64, len: u32) -> Result<(Vec<u8>, Option<Digest>)> {
        let mut buf = vec![0u8; len as usize];
        let whole = offset % BLOCK == 0 && u64::from(len) == block_len(self.size(), offset / BLOCK);
        let known = match self {
            VersionSource::Cache {
                reader,
                id,
                check: Some(check),
            } => check.read(reader, *id, &mut buf, offset)?.filter(|_| whole),
            VersionSource::Cache { reader, id, .. } => {
                reader.read(*id, &mut buf, offset)?;
                None
            }
            VersionSource::Store(r) => {
                r.read_at(&mut buf, offset)?;
                if whole {
                    Some(stored_digest(r.digest(offset / BLOCK)?, len))
                } else {
                    None
                }
            }
        };
        Ok((buf, known))
    }

    /// Blocks of the cache found differing from the chunk store's copy of
    /// the version so far (served from the store instead).
    pub fn damaged(&self) -> u64 {
        match self {
            VersionSource::Cache {
                check: Some(check), ..
            } => check
                .damaged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len() as u64,
            _ => 0,
        }
    }

    /// Whether the cache's blocks are checked against the chunk store.
    pub fn checked(&self) -> bool {
        match self {
            VersionSource::Cache { check, .. } => check.as_ref().is_some_and(|c| !c.off()),
            VersionSource::Store(_) => true,
        }
    }

    /// Whether the bytes at `offset` hold data or a hole, and how far that
    /// answer goes.
    pub fn extent(&self, offset: u64) -> Result<(bool, u64)> {
        match self {
            // The version's map says, not the cache's files: a hole the
            // disk made where data was would have a reader skip the data.
            VersionSource::Cache {
                check: Some(check),
                reader,
                id,
            } => match check.extent(offset) {
                Some(answer) => Ok(answer),
                None => reader.extent(*id, offset),
            },
            VersionSource::Cache { reader, id, .. } => reader.extent(*id, offset),
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

/// The sha256 of a block of `len` bytes the chunk store names `d`
/// ([`HOLE`](crate::chunks::format::HOLE): zeroes).
fn stored_digest(d: Digest, len: u32) -> Digest {
    if d == crate::chunks::format::HOLE {
        block::zero_digest(len)
    } else {
        d
    }
}

/// Whether `data`, a whole block, is what the version's map names
/// `want` ([`HOLE`](crate::chunks::format::HOLE): zeroes), and its sha256
/// (a hole's without hashing it).
pub(super) fn holds(data: &[u8], want: Digest) -> (bool, Digest) {
    if want == crate::chunks::format::HOLE {
        (block::is_zero(data), block::zero_digest(data.len() as u32))
    } else {
        let d = block::digest(data);
        (d == want, d)
    }
}

/// What a cache snapshot's blocks are checked against as they are read:
/// the chunk store's copy of the same version. The image and a
/// snapshot's preserved blocks are plain files with no checksums of
/// their own; a block a disk damaged there would be served as the
/// version (a restore checks what it receives against the digest the
/// server sends, which the server would compute from the damaged bytes).
/// So each block is hashed the first time it is read and compared with
/// the version's map; one that differs is read from the store instead
/// (whose chunks are checked against their names), counted and logged;
/// one that matches is not hashed again for this reader (a bit each:
/// 2 MiB for 1 TiB). The store's map out of reach does not stop the
/// reading: the cache is then served unchecked for a while (said in the
/// log), and checked again once the map can be read.
#[derive(Debug)]
pub struct CacheCheck {
    store: crate::chunks::VersionReader,
    /// `CLIENT/VOLUME@SNAPSHOT`, for the log.
    label: String,
    /// The blocks found right, one bit each.
    right: Mutex<Vec<u64>>,
    /// The blocks found damaged (read from the store at each read).
    damaged: Mutex<BTreeSet<u64>>,
    /// The store's map could not be read for a check: unchecked until
    /// then.
    off_until: Mutex<Option<std::time::Instant>>,
}

/// How long the cache is served unchecked after the store's map could not
/// be read.
const UNCHECKED_FOR: std::time::Duration = std::time::Duration::from_secs(30);

impl CacheCheck {
    /// Checks against `store`, the chunk store's reader of the version
    /// (`label` names it in the log).
    pub fn new(store: crate::chunks::VersionReader, label: String) -> Self {
        let words = crate::chunks::blocks_of(store.size()).div_ceil(64) as usize;
        CacheCheck {
            store,
            label,
            right: Mutex::new(vec![0; words]),
            damaged: Mutex::new(BTreeSet::new()),
            off_until: Mutex::new(None),
        }
    }

    /// Whether the cache is served unchecked now (the store's map could
    /// not be read lately).
    fn off(&self) -> bool {
        let mut off = self.off_until.lock().unwrap_or_else(|p| p.into_inner());
        match *off {
            Some(until) if std::time::Instant::now() < until => true,
            Some(_) => {
                *off = None;
                false
            }
            None => false,
        }
    }

    fn is_damaged(&self, n: u64) -> bool {
        self.damaged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&n)
    }

    fn is_right(&self, n: u64) -> bool {
        let right = self.right.lock().unwrap_or_else(|p| p.into_inner());
        right
            .get((n / 64) as usize)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    fn set_right(&self, n: u64) {
        let mut right = self.right.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = right.get_mut((n / 64) as usize) {
            *w |= 1 << (n % 64);
        }
    }

    /// Whether the version holds data at `offset` (a block its map does
    /// not call a hole), and how far the same answer goes (to the end of
    /// the map segment at most); `None` while the map cannot be read.
    fn extent(&self, offset: u64) -> Option<(bool, u64)> {
        let size = self.store.size();
        // Past the end: the cache's answer (its bounds check).
        if offset >= size || self.off() {
            return None;
        }
        let n = offset / BLOCK;
        let hole = crate::chunks::format::HOLE;
        let mapped = match self.store.digest(n) {
            Ok(d) => d != hole,
            Err(e) => {
                self.pause(&e);
                return None;
            }
        };
        let segment = crate::chunks::format::SEGMENT_BLOCKS as u64;
        let last = ((n / segment + 1) * segment).min(crate::chunks::blocks_of(size));
        let mut m = n + 1;
        while m < last && self.store.digest(m).is_ok_and(|d| (d != hole) == mapped) {
            m += 1;
        }
        Some((mapped, (m * BLOCK).min(size) - offset))
    }

    /// The store's map could not be read: the cache is served unchecked
    /// for [`UNCHECKED_FOR`].
    fn pause(&self, e: &Error) {
        *self.off_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now() + UNCHECKED_FOR);
        tracing::warn!(
            "{}: the chunk store's map cannot be read to check the image cache's blocks ({e}): served unchecked for {}s",
            self.label,
            UNCHECKED_FOR.as_secs()
        );
    }

    /// Read snapshot `id` of `reader` at `offset`, each block not yet
    /// found right checked (read whole for it). The sha256 of the bytes
    /// read where they are one block this call hashed.
    fn read(
        &self,
        reader: &SnapshotReader,
        id: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<Option<Digest>> {
        let size = reader.size();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::Invalid(format!("read at {offset} is past the end of the volume"))
            })?;
        let mut hashed = None;
        let mut at = offset;
        while at < end {
            let n = at / BLOCK;
            let start = n * BLOCK;
            let len = block_len(size, n);
            let to = end.min(start + len);
            let dst = &mut buf[(at - offset) as usize..(to - offset) as usize];
            if self.is_damaged(n) {
                let whole = self.store_block(n, len as usize)?;
                dst.copy_from_slice(&whole[(at - start) as usize..(to - start) as usize]);
                if at == start && to == start + len {
                    // The store's block is the one its map names.
                    hashed = self
                        .store
                        .digest(n)
                        .ok()
                        .map(|d| stored_digest(d, len as u32));
                }
            } else if self.is_right(n) || self.off() {
                if let Err(e) = reader.read(id, dst, at) {
                    if self.off() {
                        return Err(e);
                    }
                    // Read right before, unreadable now (the disk).
                    let whole = self.unreadable(n, len as usize, &e)?;
                    dst.copy_from_slice(&whole[(at - start) as usize..(to - start) as usize]);
                }
            } else if at == start && to == start + len {
                hashed = match reader.read(id, dst, start) {
                    Ok(()) => self.check(n, dst)?,
                    Err(e) => {
                        dst.copy_from_slice(&self.unreadable(n, len as usize, &e)?);
                        self.store
                            .digest(n)
                            .ok()
                            .map(|d| stored_digest(d, len as u32))
                    }
                };
            } else {
                let mut whole = vec![0u8; len as usize];
                match reader.read(id, &mut whole, start) {
                    Ok(()) => {
                        self.check(n, &mut whole)?;
                    }
                    Err(e) => whole = self.unreadable(n, len as usize, &e)?,
                }
                dst.copy_from_slice(&whole[(at - start) as usize..(to - start) as usize]);
            }
            at = to;
        }
        Ok(hashed.filter(|_| offset % BLOCK == 0 && end - offset <= BLOCK))
    }

    /// Check block `n` as the cache holds it (`data`, the whole block)
    /// against the version's map: made the store's where it differs. Its
    /// sha256, if hashed.
    fn check(&self, n: u64, data: &mut [u8]) -> Result<Option<Digest>> {
        let want = match self.store.digest(n) {
            Ok(d) => d,
            Err(e) => {
                self.pause(&e);
                return Ok(None);
            }
        };
        let (right, hashed) = holds(data, want);
        if right {
            self.set_right(n);
            return Ok(Some(hashed));
        }
        self.note_damaged(
            n,
            "differs from the version in the chunk store (damaged on this server's disk?)",
        );
        data.copy_from_slice(&self.store_block(n, data.len())?);
        Ok(Some(stored_digest(want, data.len() as u32)))
    }

    /// Block `n` (`len` bytes) could not be read from the cache (`e`: a
    /// short image, a disk's read error): counted as damaged, and read
    /// from the store.
    fn unreadable(&self, n: u64, len: usize, e: &Error) -> Result<Vec<u8>> {
        self.note_damaged(n, &format!("cannot be read ({e})"));
        self.store_block(n, len)
    }

    /// Block `n` of the cache is damaged (`how`): read from the store
    /// from now on, said the first time.
    fn note_damaged(&self, n: u64, how: &str) {
        let first = self
            .damaged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n);
        if first {
            tracing::error!(
                "{}: block {n} of the image cache {how}: served from the store (`mirror-server verify` repairs the image; a block a snapshot preserved is read from the store each time)",
                self.label
            );
        }
    }

    /// Block `n` (`len` bytes) from the chunk store (checked there against
    /// its name).
    fn store_block(&self, n: u64, len: usize) -> Result<Vec<u8>> {
        match self.store.blocks(&[n])?.remove(0) {
            Some(good) if good.len() == len => Ok(good),
            Some(good) => Err(Error::Corrupt(format!(
                "{}: block {n} is {} bytes in the chunk store, not {len}",
                self.label,
                good.len()
            ))),
            None => Ok(vec![0u8; len]),
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
