//! The staging log, `N.log`: the on-disk record of the blocks staged for
//! epoch `N` (their bytes are in `N.data`), appended to as each block is
//! staged, and read back to publish the epoch or to resume its staging.
//!
//! # Format
//!
//! A 32-byte header, then one 52-byte record per staged block, all
//! integers little-endian:
//!
//! ```text
//! header  "UBMS"          magic [4]
//!         format          u32 = 2
//!         device          [16]  the writer's device
//!         epoch           u64   the writer's own number for the epoch
//! record  offset          u64   where the block goes in the volume
//!         len             u32   its length
//!         data_at         u64   where its bytes are in N.data (all ones: a
//!                               zero block, nothing in N.data)
//!         sha256          [32]  of its decoded bytes
//! ```
//!
//! Versions:
//! - 1: a postcard index written at commit, which could not be resumed;
//! - 2: the header and one record appended per block staged (resumable).
//!
//! # Crashes
//!
//! A record is written after its block's bytes (at their reserved place
//! in `N.data`; in a direct staging, at the block's own offset, see
//! [`super::staging`]), and the log is only trusted as a whole once the commit
//! marker, written after both files are synced, exists. Before that, a
//! crash may leave a torn last record, which the log reader takes as the
//! end of the log, and records whose data never reached the disk: a
//! staging resumed after a restart checks every block against its sha256
//! before it counts (see [`super::staging`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ublk_mirror_common::proto::{Digest, Writer};

use crate::error::{Error, Result};

/// Bytes of `N.log`'s header: [`LOG_MAGIC`], [`LOG_FORMAT`] (u32 LE), the
/// writer's device and epoch (u64 LE).
const LOG_HEADER: usize = 32;
/// Bytes of one `N.log` record (see [`Entry::record`]).
pub(super) const RECORD: usize = 52;
/// What `N.log` starts with.
const LOG_MAGIC: [u8; 4] = *b"UBMS";
/// The log's format (see the module's doc for each one).
const LOG_FORMAT: u32 = 2;

pub(super) fn log_header(writer: Writer) -> [u8; LOG_HEADER] {
    let mut h = [0u8; LOG_HEADER];
    h[..4].copy_from_slice(&LOG_MAGIC);
    h[4..8].copy_from_slice(&LOG_FORMAT.to_le_bytes());
    h[8..24].copy_from_slice(&writer.device);
    h[24..32].copy_from_slice(&writer.epoch.to_le_bytes());
    h
}

pub(super) fn read_log_header(path: &Path) -> Result<Writer> {
    let mut h = [0u8; LOG_HEADER];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut h, 0))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if h[..4] != LOG_MAGIC || h[4..8] != LOG_FORMAT.to_le_bytes() {
        return Err(Error::Corrupt(format!(
            "{}: not a staging log of format {LOG_FORMAT}",
            path.display()
        )));
    }
    let mut device = [0u8; 16];
    device.copy_from_slice(&h[8..24]);
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&h[24..32]);
    Ok(Writer {
        device,
        epoch: u64::from_le_bytes(epoch),
    })
}

/// A staged block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    /// Where the block goes in the volume.
    pub(super) offset: u64,
    /// Its length in bytes.
    pub(super) len: u32,
    /// Offset of its bytes in `N.data`; `None`: zeroes.
    pub(super) data_at: Option<u64>,
    /// The sha256 of its decoded bytes.
    pub(super) sha256: Digest,
}

impl Entry {
    /// The entry as an `N.log` record: offset (u64 LE), len (u32 LE),
    /// offset in `N.data` (u64 LE, all ones for a zero block), sha256.
    pub(super) fn record(&self) -> [u8; RECORD] {
        let mut r = [0u8; RECORD];
        r[..8].copy_from_slice(&self.offset.to_le_bytes());
        r[8..12].copy_from_slice(&self.len.to_le_bytes());
        r[12..20].copy_from_slice(&self.data_at.unwrap_or(u64::MAX).to_le_bytes());
        r[20..].copy_from_slice(&self.sha256);
        r
    }

    fn from_record(r: &[u8; RECORD]) -> Entry {
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&r[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(&r[8..12]);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&r[20..]);
        let data_at = u64_at(12);
        Entry {
            offset: u64_at(0),
            len: u32::from_le_bytes(len),
            data_at: (data_at != u64::MAX).then_some(data_at),
            sha256,
        }
    }
}

/// Reads `N.log`'s records in order; a torn last record (a crash while
/// it was written) ends the log.
pub(super) struct LogReader {
    file: std::io::BufReader<File>,
    /// Records read so far.
    read: u64,
}

impl LogReader {
    pub(super) fn open(path: &Path) -> Result<LogReader> {
        read_log_header(path)?;
        let mut file = File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(LOG_HEADER as u64))
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(LogReader { file, read: 0 })
    }

    pub(super) fn next_entry(&mut self) -> Result<Option<Entry>> {
        let mut r = [0u8; RECORD];
        match std::io::Read::read_exact(&mut self.file, &mut r) {
            Ok(()) => {
                self.read += 1;
                Ok(Some(Entry::from_record(&r)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(Error::io("reading a staging log", e)),
        }
    }

    /// The next record with its number in the log (the first is 0), as
    /// frames are numbered (see `super::frames`).
    pub(super) fn next_numbered(&mut self) -> Result<Option<(u64, Entry)>> {
        let record = self.read;
        Ok(self.next_entry()?.map(|e| (record, e)))
    }
}
