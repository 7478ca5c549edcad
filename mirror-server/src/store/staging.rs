//! The staging of an epoch being received ([`Staging`]): its verified
//! blocks in `staging/N.data` and `staging/N.log` (the log's format is
//! [`super::log`]'s), written by several data streams at once, resumed
//! after a broken connection or a restart; and the staging directory's
//! files (their names, which epochs have some, removing them). When a
//! staging is published, and what a crash leaves, is [`super::Volume`]'s.
//!
//! # Direct stagings
//!
//! The first epoch of a brand-new volume (nothing published, no snapshot,
//! nothing in the chunk store) is staged *direct*: `N.data` is a sparse
//! file the size of the volume, and each block is written at its own
//! offset (a zero block punches a hole there) instead of appended. So
//! `N.data` is, at any time, the volume as the staged blocks make it on an
//! all-zero image, and publishing can rename it over the image instead of
//! copying every byte a second time (see [`super::Volume`]). The marker
//! `N.direct` is made durable before `N.data` and `N.log` exist, so a log
//! is never read with the wrong meaning of its `data_at`.
//!
//! Two copies of one block (a resend) land in place, so what `N.data`
//! holds there is one of them, not necessarily the one logged last: both
//! are verified copies, and everything that names the published content
//! (the chunk store's digests) hashes what `N.data` holds. Only a block
//! with a single record covering it whole is named by that record's
//! digest without hashing it again, and only while no write went
//! unlogged (`Staging::unlogged`): its bytes were checked against that
//! digest before they were written, and nothing else was written there.
//! On a resume, an
//! entry whose bytes no longer check (a crash lost them, or a later copy
//! overwrote them) is dropped as it always is, and everything no kept
//! entry covers is punched back to zeroes (also bytes whose record never
//! reached the log): the client sends what it needs again. Closing a
//! staging waits for the writes in flight, and no block is written after
//! it, so nothing lands in `N.data` once it is the image.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use ublk_mirror_common::proto::{Digest, Encoding, Writer, MAX_BLOCK, NOT_STAGED};
use ublk_mirror_common::{block, fsutil, RangeSet};

use super::frames::{FrameReader, Frames};
use super::log::{log_header, Entry, LogReader, RECORD};
use crate::error::{Error, Result};

/// The staging directory in a volume's directory.
pub(super) const STAGING: &str = "staging";

pub(super) fn staging_path(dir: &Path, epoch: u64, ext: &str) -> PathBuf {
    dir.join(STAGING).join(format!("{epoch}.{ext}"))
}

/// Whether epoch `epoch`'s staging is direct (its `N.direct` marker).
pub(super) fn is_direct(dir: &Path, epoch: u64) -> bool {
    staging_path(dir, epoch, "direct").exists()
}

/// What an epoch may stage beyond four times its volume's size.
#[cfg(not(test))]
const STAGING_MARGIN: u64 = 256 << 20;
/// (Small in tests, to reach it.)
#[cfg(test)]
const STAGING_MARGIN: u64 = 1 << 20;

/// An epoch being received: verified blocks, staged on disk. Shared by
/// the data streams that carry it: blocks are decoded and verified outside
/// its lock, which covers only the bookkeeping.
#[derive(Debug)]
pub struct Staging {
    pub(super) epoch: u64,
    pub(super) writer: Writer,
    size: u64,
    /// `N.data`: the staged blocks' decoded bytes.
    pub(super) data: File,
    /// `N.log`: a record per staged block (see [`super::log`]).
    pub(super) log: File,
    /// Taken over from an earlier epoch of the device.
    adopted: bool,
    /// Blocks are written at their own offset in `N.data` (see the module
    /// docs).
    pub(super) direct: bool,
    /// Held shared by each [`Staging::add`] from its check that the
    /// staging is open until its block is logged, and exclusively to
    /// close it: once closed, no block is written any more (a direct
    /// staging's `N.data` becomes the image).
    writes: RwLock<()>,
    /// A write to `N.data` failed, or its record did not reach `N.log`:
    /// `N.data` may hold bytes no record names (see [`Staging::unlogged`]).
    unlogged: AtomicBool,
    /// A direct staging's `N.data` (a first sync's, the size of the
    /// volume) is written back behind the writers and kept out of the page
    /// cache. Another's is read again soon (stored, then applied), then
    /// removed, which frees its cache.
    streamed: fsutil::Streamed,
    /// The blocks this process staged, as they came, for the chunk store
    /// and for copies later in the epoch (see [`super::frames`]); `None`
    /// without a chunk store.
    frames: Option<Frames>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The digest of each staged block still whole: a block staged later
    /// over part of another makes that one's digest unknown.
    digests: BTreeMap<(u64, u32), Digest>,
    /// Where the next block's bytes go in `N.data`.
    data_len: u64,
    /// Where the next record goes in `N.log`.
    log_len: u64,
    /// Records in `N.log`.
    blocks: usize,
    /// Bytes reserved in the frames file.
    frames_len: u64,
    /// Bytes of the volume the staged blocks cover.
    staged: RangeSet,
    /// Blocks refused and not staged since.
    failed: BTreeSet<(u64, u32)>,
    /// Committing: nothing more is staged.
    closed: bool,
    /// It staged all it may ([`Staging::most`]): the next attempt at the
    /// epoch starts over instead of resuming it.
    overflowed: bool,
}

impl Inner {
    /// Record a staged block's digest, forgetting those of other blocks it
    /// overlaps (their content is no longer theirs alone).
    fn stage_digest(&mut self, offset: u64, len: u32, sha256: Digest) {
        let end = offset + u64::from(len);
        let from = offset.saturating_sub(u64::from(MAX_BLOCK));
        let stale: Vec<(u64, u32)> = self
            .digests
            .range((from, 0)..(end, 0))
            .map(|(&k, _)| k)
            .filter(|&(o, l)| o + u64::from(l) > offset && (o, l) != (offset, len))
            .collect();
        for k in stale {
            self.digests.remove(&k);
        }
        self.digests.insert((offset, len), sha256);
    }
}

impl Staging {
    fn open_file(path: &Path, create: bool) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))
    }

    /// Start staging `epoch` afresh; `direct`: as a direct staging (see
    /// the module docs).
    pub(super) fn create(
        dir: &Path,
        epoch: u64,
        writer: Writer,
        size: u64,
        direct: bool,
        keep_frames: bool,
    ) -> Result<Staging> {
        if direct {
            fsutil::write_durably(&staging_path(dir, epoch, "direct"), b"")
                .map_err(|e| Error::io("marking a direct staging", e))?;
        }
        let data = Staging::open_file(&staging_path(dir, epoch, "data"), true)?;
        if direct {
            data.set_len(size)
                .map_err(|e| Error::io("sizing a direct staging", e))?;
        }
        let log_path = staging_path(dir, epoch, "log");
        let log = Staging::open_file(&log_path, true)?;
        let header = log_header(writer);
        log.write_all_at(&header, 0)
            .map_err(|e| Error::io(format!("writing {}", log_path.display()), e))?;
        Ok(Staging {
            epoch,
            writer,
            size,
            data,
            log,
            adopted: false,
            direct,
            writes: RwLock::new(()),
            unlogged: AtomicBool::new(false),
            streamed: fsutil::Streamed::new(),
            frames: keep_frames
                .then(|| Frames::new(&dir.join(STAGING)))
                .flatten(),
            inner: Mutex::new(Inner {
                log_len: header.len() as u64,
                ..Inner::default()
            }),
        })
    }

    /// Take up an interrupted staging from disk (with `verify`, every
    /// block is checked against its hash first: a crash may have lost data
    /// the log names), the log rewritten with the blocks kept and the
    /// header naming `writer`.
    pub(super) fn resume(
        dir: &Path,
        epoch: u64,
        writer: Writer,
        size: u64,
        verify: bool,
        reserved: u64,
        keep_frames: bool,
    ) -> Result<Staging> {
        let data_path = staging_path(dir, epoch, "data");
        let log_path = staging_path(dir, epoch, "log");
        let data = Staging::open_file(&data_path, false)?;
        let direct = is_direct(dir, epoch);
        let mut reader = LogReader::open(&log_path)?;
        let mut kept = log_header(writer).to_vec();
        let mut inner = Inner::default();
        let mut buf = Vec::new();
        let mut dropped = 0usize;
        while let Some(e) = reader.next_entry()? {
            let inside = e
                .offset
                .checked_add(u64::from(e.len))
                .is_some_and(|end| end <= size);
            let mut intact = || match e.data_at {
                // A direct staging's zero block is a hole punched in place,
                // which a crash may have lost.
                None if direct => {
                    buf.resize(e.len as usize, 0);
                    e.sha256 == block::zero_digest(e.len)
                        && data.read_exact_at(&mut buf, e.offset).is_ok()
                        && block::is_zero(&buf)
                }
                None => e.sha256 == block::zero_digest(e.len),
                Some(at) => {
                    buf.resize(e.len as usize, 0);
                    data.read_exact_at(&mut buf, at).is_ok() && block::digest(&buf) == e.sha256
                }
            };
            if !inside || (verify && !intact()) {
                dropped += 1;
                continue;
            }
            if let Some(at) = e.data_at {
                inner.data_len = inner.data_len.max(at + u64::from(e.len));
            }
            kept.extend_from_slice(&e.record());
            inner.blocks += 1;
            inner.staged.insert(e.offset..e.offset + u64::from(e.len));
            inner.stage_digest(e.offset, e.len, e.sha256);
        }
        inner.data_len = inner.data_len.max(reserved);
        if direct {
            // What no kept entry vouches for reads as zeroes again, as on
            // the all-zero image this staging stands for: entries dropped,
            // and bytes written whose record never made it to the log. A
            // power cut may have lost the file's length too.
            data.set_len(size)
                .map_err(|e| Error::io(format!("sizing {}", data_path.display()), e))?;
            let mut unvouched = RangeSet::new();
            unvouched.insert(0..size);
            unvouched.subtract(&inner.staged);
            for r in unvouched.iter() {
                fsutil::punch_or_zero(&data, r.start, r.end - r.start)
                    .map_err(|e| Error::io(format!("clearing {}", data_path.display()), e))?;
            }
            data.sync_all()
                .map_err(|e| Error::io(format!("syncing {}", data_path.display()), e))?;
        }
        fsutil::write_durably(&log_path, &kept)
            .map_err(|e| Error::io(format!("rewriting {}", log_path.display()), e))?;
        let log = Staging::open_file(&log_path, false)?;
        inner.log_len = kept.len() as u64;
        let adopted = staging_path(dir, epoch, "adopted").exists();
        tracing::info!(
            epoch,
            blocks = inner.blocks,
            bytes = inner.staged.len(),
            dropped,
            adopted,
            direct,
            "resuming an interrupted epoch"
        );
        Ok(Staging {
            epoch,
            writer,
            size,
            data,
            log,
            adopted,
            direct,
            writes: RwLock::new(()),
            unlogged: AtomicBool::new(false),
            streamed: fsutil::Streamed::new(),
            frames: keep_frames
                .then(|| Frames::new(&dir.join(STAGING)))
                .flatten(),
            inner: Mutex::new(inner),
        })
    }

    /// Whether this staging was taken over from an earlier epoch of its
    /// device (the client must vouch for its blocks).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The digest of each of `blocks` as staged ([`NOT_STAGED`] for a
    /// block not staged with that offset and length).
    pub fn digests(&self, blocks: &[(u64, u32)]) -> Vec<Digest> {
        let inner = self.lock();
        blocks
            .iter()
            .map(|b| inner.digests.get(b).copied().unwrap_or(NOT_STAGED))
            .collect()
    }

    /// The digest of every block staged whole (what the epoch names, for
    /// deduplication once it is published).
    pub fn staged_digests(&self) -> Vec<Digest> {
        self.lock().digests.values().copied().collect()
    }

    /// Stop staging so that a later epoch of the device takes the files
    /// over; the end of the data reserved so far, or `None` if it was
    /// closed already (being committed).
    pub(super) fn close_for_adoption(&self) -> Option<u64> {
        let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
        let mut inner = self.lock();
        (!std::mem::replace(&mut inner.closed, true)).then_some(inner.data_len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a block's bytes may have reached `N.data` without their
    /// record reaching `N.log` (a write or the log failed): then the log
    /// does not tell what every block of `N.data` holds. A resume with
    /// `verify` clears it (what no record vouches for is dropped).
    pub(super) fn unlogged(&self) -> bool {
        self.unlogged.load(Ordering::Relaxed)
    }

    /// The epoch staged.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Blocks staged so far.
    pub fn blocks(&self) -> usize {
        self.lock().blocks
    }

    /// `(offset, len)` of the byte ranges staged so far.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.lock()
            .staged
            .iter()
            .map(|r| (r.start, r.end - r.start))
            .collect()
    }

    pub(super) fn is_open(&self) -> bool {
        !self.lock().closed
    }

    /// The most bytes an epoch of a `size`-byte volume stages: four times
    /// the volume (a pre-copy run's rounds sum to less than twice; blocks
    /// sent again after a lost link) and a margin. A client sending
    /// blocks over and over would fill the server's disk.
    pub(super) fn most(size: u64) -> u64 {
        size.saturating_mul(4).saturating_add(STAGING_MARGIN)
    }

    /// It staged all it may: the next attempt starts the epoch over.
    pub(super) fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Stop staging, for the commit; refused while blocks that failed
    /// their checks were not staged since.
    pub(super) fn close(&self) -> Result<()> {
        let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
        let mut inner = self.lock();
        Self::check_complete(&inner, self.epoch)?;
        inner.closed = true;
        Ok(())
    }

    fn check_complete(inner: &Inner, epoch: u64) -> Result<()> {
        if let Some(&(offset, _)) = inner.failed.iter().next() {
            return Err(Error::Invalid(format!(
                "epoch {epoch}: {} blocks failed their checks and were not sent again (the first at {offset})",
                inner.failed.len()
            )));
        }
        Ok(())
    }

    /// Make what is staged durable (its data, its log, and their names in
    /// `dir`'s staging directory), staying open for more: the end of a
    /// pre-copy round (protocol V5's `EndRound`). Refused, as a commit
    /// is, while blocks that failed their checks were not staged since.
    pub fn sync_round(&self, dir: &Path) -> Result<()> {
        Self::check_complete(&self.lock(), self.epoch)?;
        self.data
            .sync_all()
            .and_then(|()| self.log.sync_all())
            .map_err(|e| Error::io("syncing a staged round", e))?;
        let staging = dir.join(STAGING);
        fsutil::sync_dir(&staging)
            .map_err(|e| Error::io(format!("syncing {}", staging.display()), e))
    }

    /// Decode, verify and stage one block. A block whose hash does not
    /// match is refused with [`Error::BadBlock`] and nothing is staged: the
    /// sender sends it again. Safe to call from several threads at once.
    pub fn add(
        &self,
        offset: u64,
        len: u32,
        sha256: &Digest,
        encoding: Encoding,
        bytes: &[u8],
    ) -> Result<()> {
        self.add_decoded(
            offset,
            len,
            sha256,
            self.check(offset, len, sha256, encoding, bytes),
            encoding,
            bytes,
        )
    }

    /// Stage a block as [`Staging::add`] does, once decoded (`checked`:
    /// its plain bytes, or why it cannot be staged); `encoding` and
    /// `bytes` as it came, for its frame.
    fn add_decoded(
        &self,
        offset: u64,
        len: u32,
        sha256: &Digest,
        checked: Result<Option<Cow<'_, [u8]>>>,
        encoding: Encoding,
        bytes: &[u8],
    ) -> Result<()> {
        let plain = match checked {
            Ok(plain) => plain,
            Err(e) => {
                if matches!(e, Error::BadBlock(_)) {
                    self.lock().failed.insert((offset, len));
                }
                return Err(e);
            }
        };
        // Closing waits for this guard: the staging stays open until the
        // block is logged.
        let _writing = self.writes.read().unwrap_or_else(|p| p.into_inner());
        {
            let mut inner = self.lock();
            if inner.closed {
                return Err(Error::Invalid(format!(
                    "epoch {} is no longer being staged",
                    self.epoch
                )));
            }
            // The same bytes at the same place as the copy staged last
            // there (nothing staged over any of it since): staging them
            // again changes nothing, and would only grow `N.data` (a
            // client repeating a 50-byte `Known` block would make 64 KiB
            // of it each time).
            if !self.direct && inner.digests.get(&(offset, len)) == Some(sha256) {
                // A copy of it that failed its check since is answered.
                inner.failed.remove(&(offset, len));
                return Ok(());
            }
        }
        let data_at = match &plain {
            Some(p) => {
                let at = if self.direct {
                    offset
                } else {
                    let mut inner = self.lock();
                    if inner.data_len + u64::from(len) > Staging::most(self.size) {
                        // Starting over is left to the next attempt.
                        inner.overflowed = true;
                        return Err(Error::Invalid(format!(
                            "epoch {} has staged {} bytes of a {}-byte volume: no more is taken (it starts over at the next attempt)",
                            self.epoch, inner.data_len, self.size
                        )));
                    }
                    inner.data_len += u64::from(len);
                    inner.data_len - u64::from(len)
                };
                self.data.write_all_at(p, at).map_err(|e| {
                    self.unlogged.store(true, Ordering::Relaxed);
                    Error::io("staging a block", e)
                })?;
                if self.direct {
                    self.streamed.moved(&self.data, p.len() as u64);
                }
                Some(at)
            }
            None if self.direct => {
                fsutil::punch_or_zero(&self.data, offset, u64::from(len)).map_err(|e| {
                    self.unlogged.store(true, Ordering::Relaxed);
                    Error::io("staging a zero block", e)
                })?;
                None
            }
            None => None,
        };
        let entry = Entry {
            offset,
            len,
            data_at,
            sha256: *sha256,
        };
        let mut inner = self.lock();
        self.log
            .write_all_at(&entry.record(), inner.log_len)
            .map_err(|e| {
                self.unlogged.store(true, Ordering::Relaxed);
                Error::io("logging a staged block", e)
            })?;
        // The frame's place is taken in the log's order (see
        // `super::frames`), its bytes written once the lock is let go.
        let frame = match (&self.frames, encoding) {
            (Some(frames), Encoding::Zstd | Encoding::Raw)
                if frames.room(inner.frames_len + Frames::space(bytes.len())) =>
            {
                let at = inner.frames_len;
                inner.frames_len += Frames::space(bytes.len());
                Some((frames, at, inner.blocks as u64))
            }
            _ => None,
        };
        inner.log_len += RECORD as u64;
        inner.blocks += 1;
        inner.staged.insert(offset..offset + u64::from(len));
        inner.stage_digest(offset, len, *sha256);
        inner.failed.remove(&(offset, len));
        drop(inner);
        if let Some((frames, at, record)) = frame {
            frames.write(at, record, encoding == Encoding::Raw, bytes, sha256);
        }
        Ok(())
    }

    /// Whether a block named `sha256` was staged earlier in this epoch by
    /// this process, with its frame remembered: [`Staging::add_again`]
    /// can stage it again without its bytes (see the `frames` module).
    pub fn holds(&self, sha256: &Digest) -> bool {
        self.frames.as_ref().is_some_and(|f| f.holds(sha256))
    }

    /// Stage a block named `sha256` from the frame of one staged before
    /// ([`Staging::holds`]), decoded (not hashed again: that frame was
    /// checked against `sha256` before it was written, and frames are
    /// never changed). Refused with [`Error::BadBlock`] if that frame
    /// cannot be read any more or is not `len` bytes (the sender then
    /// sends the block's bytes).
    pub fn add_again(&self, offset: u64, len: u32, sha256: &Digest) -> Result<()> {
        self.fits(offset, len)?;
        let gone = || {
            Error::BadBlock(format!(
                "block at {offset}: no earlier copy of it in this epoch to stage again"
            ))
        };
        let Some((raw, frame)) = self.frames.as_ref().and_then(|f| f.get(sha256)) else {
            return self.add_decoded(offset, len, sha256, Err(gone()), Encoding::Known, &[]);
        };
        let plain = if raw {
            Some(Cow::Borrowed(&frame[..]))
        } else {
            block::decompress(&frame, len as usize).ok().map(Cow::Owned)
        };
        let checked = match plain {
            Some(p) if p.len() == len as usize => Ok(Some(p)),
            _ => Err(gone()),
        };
        // No frame of its own: the store step packs the first copy's, and
        // finds this one's chunk packed by then.
        self.add_decoded(offset, len, sha256, checked, Encoding::Known, &[])
    }

    /// The frames of the blocks staged, by log record, once the staging is
    /// closed (see [`super::frames`]); `None` if none were kept.
    pub(super) fn frames(&self) -> Option<FrameReader<'_>> {
        let inner = self.lock();
        if !inner.closed {
            return None;
        }
        self.frames.as_ref()?.reader(inner.frames_len)
    }

    /// A block that does not fit the volume is the sender's bug, not the
    /// link's: refused, and not asked for again.
    fn fits(&self, offset: u64, len: u32) -> Result<()> {
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.size)
        {
            return Err(Error::Invalid(format!(
                "block of {len} bytes at {offset} is past the end of the volume ({} bytes)",
                self.size
            )));
        }
        Ok(())
    }

    /// The decoded bytes of a block, once they match its hash (`None`: a
    /// zero block).
    fn check<'a>(
        &self,
        offset: u64,
        len: u32,
        sha256: &Digest,
        encoding: Encoding,
        bytes: &'a [u8],
    ) -> Result<Option<Cow<'a, [u8]>>> {
        self.fits(offset, len)?;
        let plain = block::decode_borrowed(len, sha256, encoding, bytes).map_err(|e| {
            if e.is_damage() {
                Error::BadBlock(format!("block at {offset}: {e}"))
            } else {
                Error::Invalid(e.to_string())
            }
        })?;
        Ok(plain)
    }
}

/// The epochs with files in the staging directory, and whether each has
/// its commit marker; sorted.
pub(super) fn staging_epochs(dir: &Path) -> Result<Vec<(u64, bool)>> {
    let staging = dir.join(STAGING);
    let mut epochs: Vec<(u64, bool)> = Vec::new();
    let entries = std::fs::read_dir(&staging)
        .map_err(|e| Error::io(format!("listing {}", staging.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((n, ext)) = name.split_once('.') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match epochs.iter_mut().find(|(e, _)| *e == n) {
            Some(e) => e.1 |= ext == "commit",
            None => epochs.push((n, ext == "commit")),
        }
    }
    epochs.sort_unstable();
    Ok(epochs)
}

/// Remove epoch `epoch`'s staging files, whatever is there.
pub(super) fn remove_staging(dir: &Path, epoch: u64) {
    for ext in [
        "commit",
        "commit.tmp",
        "log",
        "log.tmp",
        "data",
        "adopted",
        "adopted.tmp",
        "direct",
        "direct.tmp",
    ] {
        let _ = std::fs::remove_file(staging_path(dir, epoch, ext));
    }
}
