//! The write-intent journal: which regions of the device may hold changes
//! that are not yet on the mirror, kept crash-safe in a small file.
//!
//! Like md's write-intent bitmap and DRBD's activity log, a region is marked
//! durably *before* the first write into it is issued, and cleared only when
//! its changes have been durably taken by the consumer. After any crash,
//! every change that reached the backing file therefore lies in a marked
//! region: at worst the journal says too much, never too little.
//!
//! # On-disk format
//!
//! All integers little-endian; the file is a sequence of 4096-byte blocks.
//! This code writes version 2 and reads versions 1 and 2.
//!
//! ```text
//! block 0   header copy A (even sequence numbers)
//! block 1   header copy B (odd sequence numbers)
//! block 2.. bitmap blocks: [crc32c u32][reserved u32 = 0][4088 bytes of bits]
//!           bit k of bitmap block b = region b * 32704 + k (LSB first)
//!
//! header, version 2 (the rest of the block is zeroes, not read):
//!   0  magic          [u8; 8] "UBLKMJNL"
//!   8  version        u32  2
//!  12  flags          u32  bit 0 OPEN: a daemon is or was running (not
//!                          stopped cleanly); bit 1 RESYNC: an unclean stop
//!                          was found and its regions are not settled yet;
//!                          any other bit set: the header is invalid
//!  16  sequence       u64  incremented by every header write
//!  24  region_size    u64  bytes per region, a power of two >= 64 KiB
//!  32  device_size    u64  bytes
//!  40  bitmap_blocks  u64  ceil(ceil(device_size / region_size) / 32704)
//!  48  backing_id     u64  fingerprint of the backing file (path and inode)
//!  56  released_epoch u64  the last epoch the consumer released
//!  64  sealed_epoch   u64  the highest epoch number handed out
//!  72  crc32c         u32  of bytes 0..72
//! ```
//!
//! Versions:
//! - 1: the same header up to `backing_id`, then its crc32c at byte 56
//!   (of bytes 0..56); no epoch numbers.
//! - 2: `released_epoch` and `sealed_epoch` added before the crc (which
//!   moved to byte 72), so that epoch numbers keep rising across restarts
//!   and are never used twice.
//!
//! Versions are told apart by the `version` field, which decides where the
//! crc is read: at byte 56 for version 1, at byte 72 for any other value.
//! A version 1 header is read with both epochs 0. Every header write
//! writes version 2, so a version 1 file becomes version 2 one copy at a
//! time, with the header writes that follow opening it (a device marks its
//! journal open at once). A header whose crc at byte 72 holds but whose
//! version is neither 1 nor 2 is refused as an unsupported version; one
//! whose crc does not hold, as damaged. Opening counts a copy refused for
//! either reason as invalid (see below).
//!
//! The bitmap block crc covers the block's index (u64 LE) followed by its
//! 4088 bytes of bits, so a block written at the wrong place is caught too.
//!
//! # Why it is crash-safe
//!
//! - Header writes alternate between the two copies (even sequence: A, odd:
//!   B) and are synced. A torn header write damages only the copy being
//!   written; the other, with the previous sequence, stays valid. Opening
//!   takes the valid copy with the highest sequence. Both invalid means the
//!   file is not a journal we wrote: it is reported, not trusted. A new
//!   journal writes its bitmap (zeroed; or, for a backing file that existed
//!   before its journal, every region marked, with the resync flag in both
//!   copies), then copy A (sequence 0), then copy B (sequence 1), each
//!   synced before the next; a crash before copy A is whole leaves a file
//!   with no valid header, refused like any other (no write was served yet:
//!   the device starts only once its journal exists). So a journal is
//!   never valid and clean for a file whose history is unknown.
//! - A bitmap block is rewritten whole and synced before the writes it
//!   covers are issued. If a crash tears it, its crc fails and every region
//!   of that block is reported dirty. That over-approximates both kinds of
//!   interrupted update (setting bits before writes, clearing bits after the
//!   consumer took the data), so no change is ever lost; the cost is a
//!   resync of at most 32704 regions.
//! - A release writes `released_epoch` (synced) before it clears the
//!   released regions: a crash in between leaves them marked, which costs
//!   only a resync. `sealed_epoch` is written (synced) before an epoch with
//!   that number is sealed, so a later run never reuses a number.
//! - The `clean` state is written only after the backing file was synced at
//!   a clean stop, and `open` is written (synced) before the first write is
//!   served. A journal found `open` means the daemon did not stop cleanly:
//!   every marked region needs resync, and RESYNC is set until the consumer
//!   settles them.
//! - Opening repairs what it found damaged: torn bitmap blocks are written
//!   back with every bit set (a superset of what they held) and synced
//!   before the header; a damaged header copy is repaired by two header
//!   writes, each synced, so the repair cannot tear both copies.
//! - A bitmap write or sync that fails leaves the file's content unknown:
//!   the journal then refuses every further mark or clear, and refuses to
//!   record a clean stop (fail-stop), so the next start treats the stop as
//!   unclean.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Bytes per journal block.
pub const BLOCK: usize = 4096;
/// Regions covered by one bitmap block.
pub const REGIONS_PER_BLOCK: u64 = ((BLOCK - BITMAP_HEADER) * 8) as u64;
/// Default region size: 4 MiB, DRBD's activity-log extent. A 1 TiB device
/// needs a 32 KiB bitmap; a region is marked once per 4 MiB of fresh
/// writes, so steady-state writes into already-marked regions cost nothing,
/// and a resync after a crash reads at most a few MiB per marked region.
pub const DEFAULT_REGION_SIZE: u64 = 4 << 20;
/// Smallest region size: below this the marking syncs start to show up in
/// random-write workloads.
pub const MIN_REGION_SIZE: u64 = 64 << 10;

const MAGIC: &[u8; 8] = b"UBLKMJNL";
const VERSION: u32 = 2;
const BITMAP_HEADER: usize = 8;
/// Header bytes covered by the crc (everything before the crc field).
const HEADER_CRC_AT: usize = 8 + 4 + 4 + 8 * 7;
/// Where version 1 kept its crc (it had no released epoch).
const HEADER_CRC_AT_V1: usize = 8 + 4 + 4 + 8 * 5;

/// Whether the last daemon stopped cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Stopped cleanly: the bitmap is exact.
    Clean,
    /// A daemon is running, or died: marked regions need resync.
    Open,
}

const FLAG_OPEN: u32 = 1;
const FLAG_RESYNC: u32 = 2;

/// The header of a journal file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Clean or open.
    pub state: State,
    /// An unclean stop was found and its marked regions still need a
    /// resync (by hash comparison with the mirror); survives clean stops
    /// until [`Journal::resync_done`].
    pub resync: bool,
    /// Write counter; picks the newer of the two copies.
    pub sequence: u64,
    /// Bytes per region.
    pub region_size: u64,
    /// Device size in bytes.
    pub device_size: u64,
    /// Number of bitmap blocks.
    pub bitmap_blocks: u64,
    /// Fingerprint of the backing file this journal belongs to.
    pub backing_id: u64,
    /// The last epoch the consumer released (0: none yet).
    pub released_epoch: u64,
    /// The highest epoch number that may have been sealed: a new run
    /// numbers its epochs after it.
    pub sealed_epoch: u64,
}

/// Why bytes are not a valid header or bitmap block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not a ublk-mirror journal at all.
    #[error("not a ublk-mirror journal (bad magic)")]
    Foreign,
    /// Written by a newer version.
    #[error("journal format version {0} is not supported (this is version {VERSION})")]
    Version(u32),
    /// Checksum mismatch: torn or corrupted.
    #[error("checksum mismatch")]
    Checksum,
    /// Values that cannot be right.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// Shorter than a block.
    #[error("truncated")]
    Truncated,
}

impl Header {
    /// A header for a device of `device_size` bytes in regions of `region_size`.
    pub fn new(device_size: u64, region_size: u64, backing_id: u64) -> Header {
        Header {
            state: State::Clean,
            resync: false,
            sequence: 0,
            region_size,
            device_size,
            bitmap_blocks: regions(device_size, region_size).div_ceil(REGIONS_PER_BLOCK),
            backing_id,
            released_epoch: 0,
            sealed_epoch: 0,
        }
    }

    /// Number of regions.
    pub fn regions(&self) -> u64 {
        regions(self.device_size, self.region_size)
    }

    /// The block image of this header.
    pub fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let mut flags = 0;
        if self.state == State::Open {
            flags |= FLAG_OPEN;
        }
        if self.resync {
            flags |= FLAG_RESYNC;
        }
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        b[24..32].copy_from_slice(&self.region_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.device_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.bitmap_blocks.to_le_bytes());
        b[48..56].copy_from_slice(&self.backing_id.to_le_bytes());
        b[56..64].copy_from_slice(&self.released_epoch.to_le_bytes());
        b[64..72].copy_from_slice(&self.sealed_epoch.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and check a header block.
    pub fn decode(b: &[u8]) -> std::result::Result<Header, FormatError> {
        if b.len() < BLOCK {
            return Err(FormatError::Truncated);
        }
        if &b[0..8] != MAGIC {
            return Err(FormatError::Foreign);
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        // The version decides where the crc is. A newer one (a small
        // number past ours: a newer ublk-mirror wrote it, and may have
        // moved the crc) is said as such before the crc is looked at.
        let version = u32_at(8);
        if version > VERSION && version < 1 << 16 {
            return Err(FormatError::Version(version));
        }
        let crc_at = if version == 1 {
            HEADER_CRC_AT_V1
        } else {
            HEADER_CRC_AT
        };
        if u32_at(crc_at) != crc32c::crc32c(&b[..crc_at]) {
            return Err(FormatError::Checksum);
        }
        if version != VERSION && version != 1 {
            return Err(FormatError::Version(version));
        }
        let flags = u32_at(12);
        if flags & !(FLAG_OPEN | FLAG_RESYNC) != 0 {
            return Err(FormatError::Invalid("flags"));
        }
        let h = Header {
            state: if flags & FLAG_OPEN != 0 {
                State::Open
            } else {
                State::Clean
            },
            resync: flags & FLAG_RESYNC != 0,
            sequence: u64_at(16),
            region_size: u64_at(24),
            device_size: u64_at(32),
            bitmap_blocks: u64_at(40),
            backing_id: u64_at(48),
            released_epoch: if version == 1 { 0 } else { u64_at(56) },
            sealed_epoch: if version == 1 { 0 } else { u64_at(64) },
        };
        if !h.region_size.is_power_of_two() || h.region_size < MIN_REGION_SIZE {
            return Err(FormatError::Invalid("region size"));
        }
        if h.bitmap_blocks != Header::new(h.device_size, h.region_size, 0).bitmap_blocks {
            return Err(FormatError::Invalid("bitmap size"));
        }
        Ok(h)
    }
}

/// The fingerprint of a backing file stored in its journal: a hash
/// (FNV-1a, stable across versions) of its canonical path and its inode
/// number. A file deleted and created again at the same path is another
/// file, whose history this journal does not know. (The device number is
/// left out: it can change across reboots.)
pub fn backing_id(canonical_path: &Path, inode: u64) -> u64 {
    canonical_path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain(&inode.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

fn regions(device_size: u64, region_size: u64) -> u64 {
    device_size.div_ceil(region_size)
}

/// The block image of bitmap block `index` holding `bits` (≤ 4088 bytes).
pub fn encode_bitmap_block(index: u64, bits: &[u8]) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[BITMAP_HEADER..BITMAP_HEADER + bits.len()].copy_from_slice(bits);
    let crc = bitmap_crc(index, &b[BITMAP_HEADER..]);
    b[0..4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The bits of bitmap block `index`, if its checksum holds.
pub fn decode_bitmap_block(index: u64, b: &[u8]) -> std::result::Result<&[u8], FormatError> {
    if b.len() < BLOCK {
        return Err(FormatError::Truncated);
    }
    let crc = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if crc != bitmap_crc(index, &b[BITMAP_HEADER..BLOCK]) {
        return Err(FormatError::Checksum);
    }
    Ok(&b[BITMAP_HEADER..BLOCK])
}

fn bitmap_crc(index: u64, bits: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), bits)
}

/// What opening a journal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// The last daemon did not stop cleanly: marked regions need resync.
    pub unclean: bool,
    /// Bitmap blocks that were torn or missing: all their regions were
    /// marked dirty.
    pub damaged_blocks: Vec<u64>,
    /// Header copies that were invalid (0, 1 or both; both is an error).
    pub damaged_headers: Vec<u64>,
}

/// A journal file, open for one device.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    header: Header,
    /// The bitmap as on disk (after the last successful sync).
    bits: Vec<u8>,
    /// A write or sync failed: what is on disk is unknown, so the journal
    /// refuses every further update (fail-stop) rather than trust it.
    failed: bool,
}

impl Journal {
    /// Create a new, clean journal with no region marked. Fails if the file exists.
    pub fn create(
        path: &Path,
        device_size: u64,
        region_size: u64,
        backing_id: u64,
    ) -> Result<Journal> {
        Self::create_as(path, device_size, region_size, backing_id, false)
    }

    /// Create a new journal with every region marked and a resync flagged:
    /// for a backing file whose history is unknown (it existed before its
    /// journal did). The marks are in the file before either header copy
    /// is valid, so no crash can leave a journal that looks clean.
    pub fn create_all_marked(
        path: &Path,
        device_size: u64,
        region_size: u64,
        backing_id: u64,
    ) -> Result<Journal> {
        Self::create_as(path, device_size, region_size, backing_id, true)
    }

    fn create_as(
        path: &Path,
        device_size: u64,
        region_size: u64,
        backing_id: u64,
        all_marked: bool,
    ) -> Result<Journal> {
        if !region_size.is_power_of_two() || region_size < MIN_REGION_SIZE {
            return Err(Error::InvalidConfig(format!(
                "region size {region_size} must be a power of two of at least {MIN_REGION_SIZE} bytes"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create journal {}", path.display()), e))?;
        let mut header = Header::new(device_size, region_size, backing_id);
        header.resync = all_marked;
        let per_block = BLOCK - BITMAP_HEADER;
        let mut bits = vec![0; header.bitmap_blocks as usize * per_block];
        if all_marked {
            for r in 0..header.regions() {
                bits[(r / 8) as usize] |= 1 << (r % 8);
            }
        }
        let mut journal = Journal {
            file,
            path: path.to_path_buf(),
            header,
            bits,
            failed: false,
        };
        for b in 0..header.bitmap_blocks {
            let block =
                encode_bitmap_block(b, &journal.bits[b as usize * per_block..][..per_block]);
            journal.write_block(2 + b, &block)?;
        }
        // Both header copies valid from the start, one synced before the
        // other is written, so that no crash can tear both.
        journal.sync()?;
        journal.write_block(0, &header.encode())?;
        journal.sync()?;
        journal.header.sequence = 1;
        journal.write_block(1, &journal.header.encode())?;
        journal.sync()?;
        Ok(journal)
    }

    /// Open an existing journal for a device of `device_size` bytes. Torn
    /// bitmap blocks are reported (their regions count as marked); a file
    /// that is not a journal, or is for another device, is an error.
    pub fn open(path: &Path, device_size: u64, backing_id: u64) -> Result<(Journal, OpenReport)> {
        let corrupt = |reason: String| Error::JournalCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open journal {}", path.display()), e))?;
        let mut block = vec![0u8; BLOCK];
        let mut copies = Vec::new();
        let mut damaged_headers = Vec::new();
        let mut first_error = None;
        for i in 0..2u64 {
            let read = read_block(&file, i, &mut block)
                .map_err(|e| Error::io(format!("cannot read journal {}", path.display()), e))?;
            match Header::decode(&block[..read]) {
                Ok(h) => copies.push(h),
                Err(e) => {
                    damaged_headers.push(i);
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(header) = copies.into_iter().max_by_key(|h| h.sequence) else {
            if let Some(FormatError::Version(v)) = first_error {
                return Err(Error::InvalidConfig(format!(
                    "journal {}: written by a newer ublk-mirror (journal format {v}; this one reads up to {VERSION}): run that one, or move the journal away to start over with a full resync",
                    path.display()
                )));
            }
            return Err(corrupt(format!(
                "no valid header ({})",
                first_error.map_or_else(|| "empty".into(), |e| e.to_string())
            )));
        };
        if header.backing_id != backing_id {
            return Err(corrupt(
                "it belongs to another backing file (was the file moved or renamed?)".into(),
            ));
        }
        if header.device_size != device_size {
            return Err(corrupt(format!(
                "it belongs to a device of {} bytes, not {device_size}",
                header.device_size
            )));
        }
        let per_block = BLOCK - BITMAP_HEADER;
        let mut bits = vec![0u8; header.bitmap_blocks as usize * per_block];
        let mut damaged_blocks = Vec::new();
        for b in 0..header.bitmap_blocks {
            let read = read_block(&file, 2 + b, &mut block)
                .map_err(|e| Error::io(format!("cannot read journal {}", path.display()), e))?;
            let dst = &mut bits[b as usize * per_block..][..per_block];
            match decode_bitmap_block(b, &block[..read]) {
                Ok(src) => dst.copy_from_slice(src),
                Err(_) => {
                    // Torn or missing: every region of the block may have changed.
                    dst.fill(0xff);
                    damaged_blocks.push(b);
                }
            }
        }
        let mut journal = Journal {
            file,
            path: path.to_path_buf(),
            header,
            bits,
            failed: false,
        };
        journal.clear_bits_past_end();
        let report = OpenReport {
            unclean: header.state == State::Open,
            damaged_blocks,
            damaged_headers,
        };
        let mut header_dirty = !report.damaged_headers.is_empty();
        let mut repaired = journal.header;
        if (report.unclean || !report.damaged_blocks.is_empty()) && !repaired.resync {
            repaired.resync = true;
            header_dirty = true;
        }
        // Rewrite what was damaged, so the file is whole again (the marks
        // it now holds are a superset of what it held).
        for &b in &report.damaged_blocks {
            journal.write_bitmap_block(b)?;
        }
        journal.sync()?;
        if header_dirty {
            // Both copies, so that a damaged one is whole again: one at a
            // time, synced, so that the repair cannot tear both.
            journal.commit_header(repaired)?;
            journal.commit_header(repaired)?;
        }
        Ok((journal, report))
    }

    /// The header as last written.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether region `r` is marked.
    pub fn is_marked(&self, r: u64) -> bool {
        r < self.header.regions() && self.bits[(r / 8) as usize] & (1 << (r % 8)) != 0
    }

    /// Every marked region, ascending.
    pub fn marked(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.header.regions()).filter(|&r| self.is_marked(r))
    }

    /// Durably mark regions: on return, after a crash, they are reported.
    /// Writes and syncs only the bitmap blocks that change; returns whether
    /// anything was written.
    pub fn mark(&mut self, regions: impl IntoIterator<Item = u64>) -> Result<bool> {
        self.update(regions, true)
    }

    /// Durably clear regions whose changes the consumer has durably taken.
    pub fn clear(&mut self, regions: impl IntoIterator<Item = u64>) -> Result<bool> {
        self.update(regions, false)
    }

    /// Record the daemon's state: [`State::Open`] before serving the first
    /// write, [`State::Clean`] after the final sync of the backing file.
    /// Opening a journal found open sets the resync flag, which stays until
    /// [`Journal::resync_done`].
    pub fn set_state(&mut self, state: State) -> Result<()> {
        if self.failed && state == State::Clean {
            return Err(Error::io(
                format!(
                    "journal {} failed earlier; not recording a clean stop",
                    self.path.display()
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let mut h = self.header;
        h.state = state;
        self.commit_header(h)
    }

    /// Mark every region and flag a resync: for a backing file whose
    /// history is unknown (it existed before its journal did).
    pub fn mark_all(&mut self) -> Result<()> {
        let n = self.header.regions();
        self.mark(0..n)?;
        let mut h = self.header;
        h.resync = true;
        self.commit_header(h)
    }

    /// The regions of an unclean stop have been settled with the mirror.
    pub fn resync_done(&mut self) -> Result<()> {
        let mut h = self.header;
        h.resync = false;
        self.commit_header(h)
    }

    /// Record that the consumer released every epoch up to `epoch`, and
    /// whether the regions of an unclean stop are settled with it. Written
    /// before the released regions are cleared: a crash in between leaves
    /// them marked, which only costs a resync.
    pub fn set_released(&mut self, epoch: u64, resync_done: bool) -> Result<()> {
        let mut h = self.header;
        h.released_epoch = epoch;
        if resync_done {
            h.resync = false;
        }
        if (h.released_epoch, h.resync) == (self.header.released_epoch, self.header.resync) {
            return Ok(());
        }
        self.commit_header(h)
    }

    /// Record that epoch numbers up to `epoch` may be in use, before the
    /// epoch is sealed, so that a later run never hands one out again.
    pub fn set_sealed(&mut self, epoch: u64) -> Result<()> {
        if epoch <= self.header.sealed_epoch {
            return Ok(());
        }
        let mut h = self.header;
        h.sealed_epoch = epoch;
        self.commit_header(h)
    }

    /// Swap the file under the journal (tests of write failures).
    #[cfg(test)]
    pub(crate) fn replace_file_for_test(&mut self, file: File) {
        self.file = file;
    }

    fn update(&mut self, regions: impl IntoIterator<Item = u64>, set: bool) -> Result<bool> {
        if self.failed {
            return Err(Error::io(
                format!("journal {} failed earlier", self.path.display()),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let n = self.header.regions();
        let regions: Vec<u64> = regions.into_iter().collect();
        if let Some(r) = regions.iter().find(|&&r| r >= n) {
            return Err(Error::InvalidConfig(format!(
                "region {r} is past the end of the device ({n} regions)"
            )));
        }
        let mut touched = std::collections::BTreeSet::new();
        let mut changed = Vec::new();
        for r in regions {
            let (byte, bit) = ((r / 8) as usize, 1u8 << (r % 8));
            let before = self.bits[byte];
            self.bits[byte] = if set { before | bit } else { before & !bit };
            if self.bits[byte] != before {
                touched.insert(r / REGIONS_PER_BLOCK);
                changed.push(r);
            }
        }
        let written = touched
            .iter()
            .try_for_each(|&b| self.write_bitmap_block(b))
            .and_then(|()| {
                if touched.is_empty() {
                    Ok(())
                } else {
                    self.sync()
                }
            });
        if let Err(e) = written {
            // What is on disk is unknown now (a cleared bit may or may not
            // have reached it): no later update may rely on it. Undo the
            // change in memory and stop.
            for &r in &changed {
                let (byte, bit) = ((r / 8) as usize, 1u8 << (r % 8));
                self.bits[byte] ^= bit;
            }
            self.failed = true;
            return Err(e);
        }
        Ok(!touched.is_empty())
    }

    fn clear_bits_past_end(&mut self) {
        let n = self.header.regions();
        for r in n..(self.bits.len() as u64 * 8) {
            self.bits[(r / 8) as usize] &= !(1 << (r % 8));
        }
    }

    fn write_bitmap_block(&mut self, b: u64) -> Result<()> {
        let per_block = BLOCK - BITMAP_HEADER;
        let bits = &self.bits[b as usize * per_block..][..per_block];
        let image = encode_bitmap_block(b, bits);
        self.write_block(2 + b, &image)
    }

    /// Write `h` as the next header sequence into the copy it belongs
    /// to, and sync; only then is it the header. A failed write or sync
    /// stops the journal (as a failed bitmap update does): what is on disk
    /// is unknown, and the header in memory stays the last one written, so
    /// a retry writes it again instead of taking it as done (and the next
    /// sequence never goes over the last good copy).
    fn commit_header(&mut self, mut h: Header) -> Result<()> {
        if self.failed {
            return Err(Error::io(
                format!("journal {} failed earlier", self.path.display()),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        h.sequence = self.header.sequence + 1;
        let written = self
            .write_block(h.sequence % 2, &h.encode())
            .and_then(|()| self.sync());
        match written {
            Ok(()) => {
                self.header = h;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn write_block(&self, index: u64, image: &[u8; BLOCK]) -> Result<()> {
        self.file
            .write_all_at(image, index * BLOCK as u64)
            .map_err(|e| Error::io(format!("cannot write journal {}", self.path.display()), e))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("cannot sync journal {}", self.path.display()), e))
    }
}

/// Read block `index` into `buf`; returns how many bytes were there (less
/// than a block at the end of a truncated file).
fn read_block(file: &File, index: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], index * BLOCK as u64 + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const GIB: u64 = 1 << 30;
    const ID: u64 = 0x1234_5678_9abc_def0;

    fn journal(dir: &Path, device_size: u64) -> (Journal, PathBuf) {
        let path = dir.join("disk.journal");
        (
            Journal::create(&path, device_size, DEFAULT_REGION_SIZE, ID).unwrap(),
            path,
        )
    }

    fn corrupt_byte(path: &Path, offset: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, offset).unwrap();
    }

    /// A header that cannot be written stops the journal and is not
    /// taken as written: the epoch it was to seal is not recorded, a retry
    /// fails too (it did nothing before), and the copy on disk stays the
    /// last good one.
    #[test]
    fn a_header_that_cannot_be_written_stops_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, path) = journal(dir.path(), GIB);
        j.set_sealed(3).unwrap();
        let good = *j.header();
        j.replace_file_for_test(File::open(&path).unwrap());
        assert!(j.set_sealed(4).is_err());
        assert_eq!(
            *j.header(),
            good,
            "a header not written was taken as written"
        );
        assert!(j.set_sealed(4).is_err(), "a retry took the seal as done");
        assert!(j.mark([1]).is_err());
        drop(j);
        let (j, _) = Journal::open(&path, GIB, ID).unwrap();
        assert_eq!(j.header().sealed_epoch, 3);
    }

    #[test]
    fn header_bytes_are_pinned() {
        let h = Header {
            state: State::Open,
            resync: true,
            sequence: 7,
            region_size: DEFAULT_REGION_SIZE,
            device_size: GIB,
            bitmap_blocks: 1,
            backing_id: ID,
            released_epoch: 12,
            sealed_epoch: 14,
        };
        let b = h.encode();
        assert_eq!(&b[..8], b"UBLKMJNL");
        assert_eq!(b[8..12], [2, 0, 0, 0]); // version 2
        assert_eq!(b[12..16], [3, 0, 0, 0]); // open + resync
        assert_eq!(b[16..24], 7u64.to_le_bytes());
        assert_eq!(b[24..32], (4u64 << 20).to_le_bytes());
        assert_eq!(b[32..40], GIB.to_le_bytes());
        assert_eq!(b[40..48], 1u64.to_le_bytes());
        assert_eq!(b[48..56], ID.to_le_bytes());
        assert_eq!(b[56..64], 12u64.to_le_bytes());
        assert_eq!(b[64..72], 14u64.to_le_bytes());
        assert_eq!(b[72..76], crc32c::crc32c(&b[..72]).to_le_bytes());
        assert!(b[76..].iter().all(|&x| x == 0));
        assert_eq!(Header::decode(&b), Ok(h));
    }

    #[test]
    fn version_1_headers_are_read() {
        // A version 1 header, as version 1 wrote it: no released epoch.
        let mut b = [0u8; BLOCK];
        b[..8].copy_from_slice(b"UBLKMJNL");
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[16..24].copy_from_slice(&3u64.to_le_bytes());
        b[24..32].copy_from_slice(&DEFAULT_REGION_SIZE.to_le_bytes());
        b[32..40].copy_from_slice(&GIB.to_le_bytes());
        b[40..48].copy_from_slice(&1u64.to_le_bytes());
        b[48..56].copy_from_slice(&ID.to_le_bytes());
        let crc = crc32c::crc32c(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        let h = Header::decode(&b).unwrap();
        assert_eq!(
            (h.state, h.sequence, h.released_epoch),
            (State::Clean, 3, 0)
        );
        assert_eq!(h.backing_id, ID);
        // An unknown version with a valid crc is reported as such.
        b[8..12].copy_from_slice(&9u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Header::decode(&b), Err(FormatError::Version(9)));
        // Also with its crc elsewhere (a newer format may move it).
        b[72..76].copy_from_slice(&[0; 4]);
        assert_eq!(Header::decode(&b), Err(FormatError::Version(9)));
    }

    #[test]
    fn marks_survive_a_crash_and_the_crash_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, path) = journal(dir.path(), 10 * GIB);
        j.set_state(State::Open).unwrap();
        assert!(j.mark([0, 5, 2559]).unwrap());
        assert!(!j.mark([5]).unwrap(), "marking a marked region wrote again");
        j.clear([0]).unwrap();
        drop(j); // a crash: no clean state written
        let (mut j, report) = Journal::open(&path, 10 * GIB, ID).unwrap();
        assert!(report.unclean);
        assert!(j.header().resync);
        // The resync flag survives a clean stop until the resync is done.
        j.set_state(State::Clean).unwrap();
        drop(j);
        let (mut j, report) = Journal::open(&path, 10 * GIB, ID).unwrap();
        assert!(!report.unclean && j.header().resync);
        j.resync_done().unwrap();
        assert!(!j.header().resync);
        assert!(report.damaged_blocks.is_empty() && report.damaged_headers.is_empty());
        assert_eq!(j.marked().collect::<Vec<_>>(), vec![5, 2559]);
    }

    #[test]
    fn a_journal_for_an_existing_file_is_born_marked() {
        // Two bitmap blocks' worth of regions, the last one partial.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.journal");
        let size = 200 * GIB + 1;
        let j = Journal::create_all_marked(&path, size, DEFAULT_REGION_SIZE, ID).unwrap();
        let regions = j.header().regions();
        assert!(j.header().bitmap_blocks >= 2);
        drop(j); // a crash right after creation
        let (j, report) = Journal::open(&path, size, ID).unwrap();
        assert!(j.header().resync, "a resync is flagged from the start");
        assert!(report.damaged_blocks.is_empty());
        assert_eq!(j.marked().count() as u64, regions);
        assert!(j.is_marked(regions - 1) && !j.is_marked(regions));
    }

    #[test]
    fn a_region_past_the_end_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = journal(dir.path(), GIB); // 256 regions
        assert!(j.mark([1, 256]).is_err());
        assert_eq!(j.marked().count(), 0);
    }

    #[test]
    fn a_clean_stop_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, path) = journal(dir.path(), GIB);
        j.set_state(State::Open).unwrap();
        j.mark([3]).unwrap();
        j.set_state(State::Clean).unwrap();
        let (j, report) = Journal::open(&path, GIB, ID).unwrap();
        assert!(!report.unclean);
        assert_eq!(j.marked().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn a_torn_header_falls_back_to_the_other_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, path) = journal(dir.path(), GIB);
        j.set_state(State::Open).unwrap(); // sequence 2: copy A
        drop(j);
        corrupt_byte(&path, 20); // copy A's sequence field
        let (j, report) = Journal::open(&path, GIB, ID).unwrap();
        assert_eq!(report.damaged_headers, vec![0]);
        // Copy B (sequence 1, clean) is what was there before the torn write.
        assert!(!report.unclean);
        drop(j);
        // The damaged copy was rewritten: a second open finds both valid.
        let (_, report) = Journal::open(&path, GIB, ID).unwrap();
        assert!(report.damaged_headers.is_empty());
    }

    #[test]
    fn both_headers_bad_or_a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (j, path) = journal(dir.path(), GIB);
        drop(j);
        corrupt_byte(&path, 30);
        corrupt_byte(&path, BLOCK as u64 + 30);
        let err = Journal::open(&path, GIB, ID).unwrap_err().to_string();
        assert!(err.contains("no valid header (checksum mismatch)"), "{err}");

        let foreign = dir.path().join("foreign");
        std::fs::write(&foreign, vec![0x42u8; 3 * BLOCK]).unwrap();
        let err = Journal::open(&foreign, GIB, ID).unwrap_err().to_string();
        assert!(err.contains("not a ublk-mirror journal"), "{err}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let err = Journal::open(&empty, GIB, ID).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn a_journal_for_another_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (j, path) = journal(dir.path(), GIB);
        drop(j);
        let err = Journal::open(&path, 2 * GIB, ID).unwrap_err().to_string();
        assert!(
            err.contains("belongs to a device of 1073741824 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_torn_or_truncated_bitmap_block_marks_all_its_regions() {
        let dir = tempfile::tempdir().unwrap();
        // 200 GiB in 4 MiB regions: 51200 regions, two bitmap blocks.
        let size = 200 * GIB;
        let (mut j, path) = journal(dir.path(), size);
        assert_eq!(j.header().bitmap_blocks, 2);
        j.mark([1, 40_000]).unwrap();
        drop(j);
        corrupt_byte(&path, 2 * BLOCK as u64 + 100); // first bitmap block
        let (j, report) = Journal::open(&path, size, ID).unwrap();
        assert_eq!(report.damaged_blocks, vec![0]);
        assert_eq!(
            j.marked().filter(|&r| r < REGIONS_PER_BLOCK).count() as u64,
            REGIONS_PER_BLOCK
        );
        assert!(j.is_marked(40_000) && !j.is_marked(40_001));
        drop(j);

        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(3 * BLOCK as u64 + 100).unwrap(); // cut the second bitmap block
        drop(f);
        let (j, report) = Journal::open(&path, size, ID).unwrap();
        assert_eq!(report.damaged_blocks, vec![1]);
        assert_eq!(j.marked().count() as u64, j.header().regions());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Mark(Vec<u64>),
        Clear(Vec<u64>),
        CleanStop,
        Crash,
    }

    fn step() -> impl Strategy<Value = Step> {
        let regions = proptest::collection::vec(0u64..600, 1..8);
        prop_oneof![
            4 => regions.clone().prop_map(Step::Mark),
            2 => regions.prop_map(Step::Clear),
            1 => Just(Step::CleanStop),
            1 => Just(Step::Crash),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever happens, reopening yields exactly the regions marked and
        /// not cleared, and reports a crash exactly when there was one.
        #[test]
        fn reopening_yields_exactly_what_was_marked(steps in proptest::collection::vec(step(), 1..30)) {
            let dir = tempfile::tempdir().unwrap();
            let size = 600 * DEFAULT_REGION_SIZE - 12345;
            let (mut j, path) = journal(dir.path(), size);
            j.set_state(State::Open).unwrap();
            let mut model = BTreeSet::new();
            for s in steps {
                match s {
                    Step::Mark(r) => { j.mark(r.iter().copied()).unwrap(); model.extend(r); }
                    Step::Clear(r) => { j.clear(r.iter().copied()).unwrap(); for x in r { model.remove(&x); } }
                    Step::CleanStop | Step::Crash => {
                        let clean = matches!(s, Step::CleanStop);
                        if clean { j.set_state(State::Clean).unwrap(); }
                        drop(j);
                        let (reopened, report) = Journal::open(&path, size, ID).unwrap();
                        prop_assert_eq!(report.unclean, !clean);
                        prop_assert!(report.damaged_blocks.is_empty());
                        prop_assert_eq!(reopened.marked().collect::<BTreeSet<_>>(), model.clone());
                        j = reopened;
                        j.set_state(State::Open).unwrap();
                    }
                }
            }
            prop_assert_eq!(j.marked().collect::<BTreeSet<_>>(), model);
        }
    }
}
