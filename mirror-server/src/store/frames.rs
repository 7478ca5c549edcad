//! Frames kept for the chunk store: the blocks a staging received, as the
//! client sent them (zstd frames, or raw where zstd did not pay), so that
//! the store step packs them as they are instead of reading each block
//! back and compressing it a second time.
//!
//! A first sync sends every block of a disk compressed (zstd level 3 on
//! the client). The server decodes each block to check its hash and stage
//! it, and the store step used to read it back from `N.data` and compress
//! it again (level 1) into a pack: a second compression of everything, on
//! the same server cores that decode and hash, plus a read of every staged
//! block from disk (`N.data` of a first sync is kept out of the page
//! cache). With the frames kept, a block whose frame is here is packed as
//! that frame (`Codec::Zstd`, which is what a pack's reader expects: any
//! zstd frame of the chunk's bytes), and a block that came raw is packed
//! raw without trying zstd again (the client's level did not shrink it).
//!
//! # Format (in memory of this process only)
//!
//! An unnamed file (`O_TMPFILE`) in the staging directory, never named,
//! never synced: records back to back, in the order of the staging log's
//! records they belong to,
//!
//! ```text
//! record u64 LE (the staging log's record number) | len u32 LE | bytes [len]
//! ```
//!
//! where the top bit of `len` says the bytes are the block raw, else a
//! zstd frame of it; zero blocks and blocks named by their digest only
//! have none.
//!
//! # Deduplication within an epoch
//!
//! The frames also answer for blocks staged earlier in the same epoch: a
//! client asks about each batch's digests before it compresses them
//! (`HaveChunks`), and a block whose digest a frame here holds (the
//! newest [`REMEMBERED`] of them) is answered as held, so the client sends
//! its digest only and the server stages that frame again for it
//! ([`super::Staging::add_again`]), decoded and checked like any block. A
//! disk whose first sync holds the same block many times (copies of
//! files, the same image twice, a pattern written over and over) is
//! compressed and sent once. Frames are written once and never changed, so a
//! frame found by its digest is still that block's.
//!
//! # Space
//!
//! The frames take the staging disk's space beside `N.data` until the
//! epoch is stored: up to the compressed size of what the epoch sends
//! (a first sync: the disk's used blocks, compressed), beside the other
//! volumes' stagings, and the packs the store step makes of them take
//! about as much again before the staging is removed. So a staging keeps
//! frames only while its file system's free space covers the frames kept
//! so far (their packs to come) and a twentieth of the file system
//! besides (looked at every [`CHECK_EVERY`] of frames, [`Frames::room`]);
//! once it does not, it keeps no more, and the blocks past that are
//! compressed again when stored, as before.
//!
//! # Why it is safe
//!
//! A frame is written only after its block was decoded and matched its
//! sha256 ([`super::Staging::add`]), and after the log record naming that
//! digest was written; its place is reserved under the same lock that
//! numbers the log's records, so the file is in record order. The store
//! step reads it only after the staging is closed (no write in flight).
//! Nothing about it is on disk under a name: a server that restarts, or a
//! staging resumed from disk, starts with no frames, and the store step
//! reads and compresses those blocks as before. A frame that cannot be
//! written or read turns the frames off for that staging, never the
//! block: the block is on disk in `N.data` either way. A pack's reader
//! checks every chunk's sha256 after decoding, so a frame damaged on the
//! way to the pack is found as any damaged chunk is.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use ublk_mirror_common::proto::Digest;

use crate::chunks::format::Sent;

/// Bytes before each frame.
const HEADER: u64 = 12;

/// Bytes of frames between two looks at the file system's free space.
const CHECK_EVERY: u64 = 64 << 20;

/// Whether a file system with `free` of `total` bytes free may take
/// [`CHECK_EVERY`] more bytes of frames where `kept` are kept already:
/// what is left covers the packs of those (about as big) and a twentieth
/// of the file system.
fn keeps_room(free: u64, total: u64, kept: u64) -> bool {
    free.saturating_sub(CHECK_EVERY) >= kept + total / 20
}

/// The bit of a frame's length that says it is the block raw.
const RAW: u32 = 1 << 31;

/// Most digests whose frames are remembered for deduplication within an
/// epoch: the newest 8 GiB of distinct 64 KiB blocks, in about 10 MiB
/// (a map entry and a place in the order, 80 bytes each).
const REMEMBERED: usize = 1 << 17;

/// The frames of one staging (see the module docs).
#[derive(Debug)]
pub(super) struct Frames {
    file: File,
    /// Frames may go up to here before the file system is looked at
    /// again ([`Frames::room`]).
    next_check: AtomicU64,
    /// The file system had too little room: no more frames.
    full: AtomicBool,
    /// A write failed: the file has a gap; nothing is read from it.
    broken: AtomicBool,
    /// Where the frame of each digest remembered is, newest last.
    remembered: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    at: HashMap<Digest, u64>,
    order: VecDeque<Digest>,
}

impl Frames {
    /// An empty, unnamed file in `dir`; `None` where the file system
    /// cannot make one (the store step then compresses as before).
    pub(super) fn new(dir: &Path) -> Option<Frames> {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_TMPFILE.bits())
            .mode(0o600)
            .open(dir)
        {
            Ok(file) => Some(Frames {
                file,
                next_check: AtomicU64::new(0),
                full: AtomicBool::new(false),
                broken: AtomicBool::new(false),
                remembered: Mutex::default(),
            }),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "no unnamed file for frames: blocks are compressed again when stored");
                None
            }
        }
    }

    /// Bytes that a frame of `len` bytes takes in the file.
    pub(super) fn space(len: usize) -> u64 {
        HEADER + len as u64
    }

    /// Whether a frame ending at `end` (bytes into the file) may be kept
    /// ([`keeps_room`], looked at again each [`CHECK_EVERY`]; once not,
    /// never again for this staging).
    pub(super) fn room(&self, end: u64) -> bool {
        if self.full.load(Ordering::Relaxed) {
            return false;
        }
        if end > self.next_check.load(Ordering::Relaxed) {
            let roomy = nix::sys::statvfs::fstatvfs(&self.file).is_ok_and(|fs| {
                keeps_room(
                    fs.blocks_available() * fs.fragment_size(),
                    fs.blocks() * fs.fragment_size(),
                    end,
                )
            });
            if !roomy {
                tracing::info!(
                    kept = end,
                    "the staging disk has too little room for more frames: this epoch's further blocks are compressed again when stored"
                );
                self.full.store(true, Ordering::Relaxed);
                return false;
            }
            self.next_check.store(end + CHECK_EVERY, Ordering::Relaxed);
        }
        true
    }

    /// Write the frame of log record `record` at `at` (reserved with
    /// [`Frames::space`] under the lock that numbered the record): `frame`
    /// is the block itself if `raw`, else a zstd frame of it; the block's
    /// sha256 is `digest`.
    pub(super) fn write(&self, at: u64, record: u64, raw: bool, frame: &[u8], digest: &Digest) {
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(&record.to_le_bytes());
        let len = frame.len() as u32 | if raw { RAW } else { 0 };
        header[8..].copy_from_slice(&len.to_le_bytes());
        let written = self
            .file
            .write_all_at(&header, at)
            .and_then(|()| self.file.write_all_at(frame, at + HEADER));
        if let Err(e) = written {
            tracing::warn!(error = %e, "keeping a block's frame failed: this epoch's blocks are compressed again when stored");
            self.broken.store(true, Ordering::Relaxed);
            return;
        }
        let mut r = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if r.at.insert(*digest, at).is_none() {
            r.order.push_back(*digest);
            if r.order.len() > REMEMBERED {
                if let Some(old) = r.order.pop_front() {
                    r.at.remove(&old);
                }
            }
        }
    }

    /// Whether a frame of the block named `digest` is remembered.
    pub(super) fn holds(&self, digest: &Digest) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && self
                .remembered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .at
                .contains_key(digest)
    }

    /// The frame of the block named `digest`, if one is remembered and
    /// can be read: whether it is the block raw, and its bytes.
    pub(super) fn get(&self, digest: &Digest) -> Option<(bool, Vec<u8>)> {
        if self.broken.load(Ordering::Relaxed) {
            return None;
        }
        let at = *self
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .at
            .get(digest)?;
        let mut header = [0u8; HEADER as usize];
        self.file.read_exact_at(&mut header, at).ok()?;
        let len = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
        let mut frame = vec![0u8; (len & !RAW) as usize];
        self.file.read_exact_at(&mut frame, at + HEADER).ok()?;
        Some((len & RAW != 0, frame))
    }

    /// A reader of the first `len` bytes (everything reserved), in record
    /// order; `None` if a write failed.
    pub(super) fn reader(&self, len: u64) -> Option<FrameReader<'_>> {
        (!self.broken.load(Ordering::Relaxed)).then_some(FrameReader {
            file: &self.file,
            pos: 0,
            end: len,
            next: None,
        })
    }
}

/// Reads [`Frames`] in record order ([`FrameReader::take`]).
#[derive(Debug)]
pub(super) struct FrameReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
    /// The next frame's record, where its bytes are, and its length.
    next: Option<(u64, u64, u32)>,
}

impl FrameReader<'_> {
    /// The frame of log record `record` (a block of `len` bytes), if it
    /// has one. Records must be asked for in increasing order (frames of
    /// records skipped are passed over). A read that fails ends the
    /// frames (`None` from then on, with a warning): the caller reads the
    /// block instead.
    pub(super) fn take(&mut self, record: u64, len: u32) -> Option<Sent> {
        let (raw, frame) = self.take_bytes(record)?;
        Some(if raw {
            Sent::Raw(frame)
        } else {
            Sent::Zstd { frame, raw: len }
        })
    }

    fn take_bytes(&mut self, record: u64) -> Option<(bool, Vec<u8>)> {
        loop {
            let (rec, at, len) = match self.next {
                Some(n) => n,
                None => {
                    if self.pos + HEADER > self.end {
                        return None;
                    }
                    let mut header = [0u8; HEADER as usize];
                    if let Err(e) = self.file.read_exact_at(&mut header, self.pos) {
                        return self.fail(e);
                    }
                    let rec = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
                    let len = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
                    let n = (rec, self.pos + HEADER, len);
                    self.pos += HEADER + u64::from(len & !RAW);
                    self.next = Some(n);
                    n
                }
            };
            if rec > record {
                return None;
            }
            self.next = None;
            if rec == record {
                let mut frame = vec![0u8; (len & !RAW) as usize];
                if let Err(e) = self.file.read_exact_at(&mut frame, at) {
                    return self.fail(e);
                }
                return Some((len & RAW != 0, frame));
            }
        }
    }

    fn fail(&mut self, e: std::io::Error) -> Option<(bool, Vec<u8>)> {
        tracing::warn!(error = %e, "reading a kept frame failed: the rest of this epoch's blocks are compressed again");
        self.end = 0;
        self.pos = 0;
        self.next = None;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_by_record_in_order_and_skipped_ones_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let frames = Frames::new(dir.path()).expect("tmpfs and ext4 make unnamed files");
        let mut at = 0;
        for (record, raw, frame) in [
            (0u64, false, &b"zero"[..]),
            (2, true, b"two!!"),
            (3, false, b""),
            (7, true, b"seven"),
        ] {
            frames.write(at, record, raw, frame, &[record as u8; 32]);
            at += Frames::space(frame.len());
        }
        // Nothing in the directory: the file has no name.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let zstd = |f: &[u8], raw| {
            Some(Sent::Zstd {
                frame: f.to_vec(),
                raw,
            })
        };
        let mut r = frames.reader(at).unwrap();
        assert_eq!(r.take(0, 100), zstd(b"zero", 100));
        assert_eq!(r.take(1, 100), None, "record 1 has no frame");
        assert_eq!(r.take(3, 7), zstd(b"", 7), "2 passed over");
        assert_eq!(r.take(5, 100), None);
        assert_eq!(r.take(7, 5), Some(Sent::Raw(b"seven".to_vec())));
        assert_eq!(r.take(8, 100), None, "past the end");
        let mut r = frames.reader(at).unwrap();
        assert_eq!(r.take(2, 5), Some(Sent::Raw(b"two!!".to_vec())));
        // By digest, for deduplication.
        assert_eq!(frames.get(&[7; 32]), Some((true, b"seven".to_vec())));
        assert_eq!(frames.get(&[0; 32]), Some((false, b"zero".to_vec())));
        assert!(frames.holds(&[3; 32]) && !frames.holds(&[1; 32]));
        assert_eq!(frames.get(&[1; 32]), None);
        // Only what was reserved is read: a reader of less stops there.
        let mut short = frames.reader(Frames::space(4)).unwrap();
        assert_eq!(short.take(0, 1), zstd(b"zero", 1));
        assert_eq!(short.take(2, 5), None);
    }

    #[test]
    fn frames_leave_room_for_their_packs_and_a_twentieth() {
        const G: u64 = 1 << 30;
        assert!(keeps_room(30 * G, 100 * G, 0));
        assert!(keeps_room(30 * G, 100 * G, 24 * G));
        assert!(
            !keeps_room(30 * G, 100 * G, 25 * G),
            "the next 64 MiB would cross it"
        );
        assert!(!keeps_room(5 * G, 100 * G, 0));
        assert!(!keeps_room(0, 100 * G, 0));
        assert!(keeps_room(G, 2 * G, 0));
        // As the file system the frames are on says now.
        let dir = tempfile::tempdir().unwrap();
        let frames = Frames::new(dir.path()).unwrap();
        let fs = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let roomy = keeps_room(
            fs.blocks_available() * fs.fragment_size(),
            fs.blocks() * fs.fragment_size(),
            1,
        );
        assert_eq!(frames.room(1), roomy);
        // Not looked at again before the next 64 MiB; a full one stays so.
        assert_eq!(frames.room(2), roomy);
        frames.full.store(true, Ordering::Relaxed);
        assert!(!frames.room(3));
    }

    #[test]
    fn a_failed_write_turns_the_frames_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut frames = Frames::new(dir.path()).unwrap();
        frames.write(0, 0, false, b"ok", &[0; 32]);
        // A read-only handle makes the next write fail.
        frames.file = File::open("/dev/null").unwrap();
        assert!(frames.holds(&[0; 32]));
        frames.write(Frames::space(2), 1, true, b"lost", &[1; 32]);
        assert!(frames.reader(Frames::space(2) * 2).is_none());
        assert!(!frames.holds(&[0; 32]) && !frames.holds(&[1; 32]));
        assert_eq!(frames.get(&[0; 32]), None);
    }
}
