//! Point-in-time versions of a volume: snapshots that cost space in
//! proportion to what changed after them, on any file system.
//!
//! # How
//!
//! The image always holds the newest published epoch. A snapshot is the
//! image as it was when the snapshot was taken; it keeps only what changed
//! since then, as *backward deltas*: before publishing overwrites 4 KiB
//! units of the image, their old content is copied into the newest
//! snapshot (unless that one holds them already). Reading snapshot `S`
//! at a unit looks in `S`, then in each newer snapshot, then in the image:
//! the first that has the unit holds its content as of `S`. Taking a
//! snapshot is free; the current image is read at full speed; the space a
//! snapshot costs is the units overwritten while it was the newest (a
//! 4 KiB write costs 4 KiB, not the 64 KiB chunk it lands in). Units that
//! were zeroes cost an index record only.
//!
//! Deleting a snapshot hands its units to the next older one (which read
//! through it) where that one lacks them, then removes it.
//!
//! # On-disk layout, format 2
//!
//! ```text
//! VOLUME_DIR/snapshots/
//!   manifest.json   {"format":2,"next_id":N,"snapshots":[{"id":..,"name":"..",
//!                    "epoch":..,"epoch_ms":..,"created_ms":..,"kind":"manual"|"scheduled",
//!                    "by_schedule":true (only when set: a scheduled one kept
//!                    since, for a restore)}, ..]}
//!                   oldest first; replaced whole (write, sync, rename)
//!   ID/data         preserved units, appended: a record's units, 4 KiB each,
//!                   in ascending order, one after the other
//!   ID/index        16-byte records: u64 LE whose low 48 bits are a 64 KiB
//!                   chunk's number and whose high 16 bits are the units of
//!                   the chunk the record does NOT hold (bit i: the 4 KiB at
//!                   i * 4 KiB in the chunk); then the offset of its units'
//!                   bytes in ID/data, u64 LE (all ones: they were all zeroes)
//! ```
//!
//! A chunk's units may be held by several records of one snapshot (each
//! kept by a different publication), never the same unit twice.
//!
//! Format 1 had the same files with whole chunks only: its records have
//! the high 16 bits clear, which reads as every unit, so a format-1
//! snapshot is read as it is. The manifest says format 2 from the first
//! record that holds part of a chunk on (written before that record), so
//! that a server from before this format, which would take such a record
//! for a chunk it has not got, refuses the volume instead.
//!
//! # Crashes
//!
//! Units are kept (data synced, then index records appended and synced)
//! before the image is overwritten there, so a crash leaves each unit in
//! the snapshot or in the image; a record whose data is not there is never
//! written. A manifest whose rename happened but whose directory could
//! not be synced stands in memory (it is what the file says), but no unit
//! is kept for any snapshot, and so the image is not overwritten, until
//! it is synced ([`Snapshots::keep`]): a crash that brings back the old
//! manifest finds the units where that one expects them. A deleted
//! snapshot's files are removed only once the manifest without it is
//! durable; an open drops files no manifest names.
//!
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ublk_mirror_common::proto::check_name;
use ublk_mirror_common::{block, fsutil};

use crate::error::{Error, Result};

/// A name about to be given (a client's, a snapshot's): one the protocol
/// takes ([`check_name`]) that no command reads as an option (a leading
/// `-`). Names given before stay usable.
pub fn check_new_name(name: &str) -> Result<()> {
    check_name(name).map_err(|e| Error::Invalid(e.to_string()))?;
    if name.starts_with('-') {
        return Err(Error::Invalid(format!(
            "{name}: a name may not start with '-' (commands would read it as an option)"
        )));
    }
    Ok(())
}

/// Bytes of a chunk: the index names units by the chunk they are in.
pub const CHUNK: u64 = 64 << 10;

/// Bytes of a unit: what a snapshot keeps at least.
pub const UNIT: u64 = 4 << 10;

/// A chunk's units, as a mask (bit i: the unit at `i * UNIT` in it).
pub type Units = u16;

/// Every unit of a chunk.
pub const WHOLE: Units = Units::MAX;

const DIR: &str = "snapshots";
const MANIFEST: &str = "manifest.json";
/// The format this server writes; it reads format 1 too.
const FORMAT: u32 = 2;
const RECORD: usize = 16;
const ZERO: u64 = u64::MAX;
/// The chunk number's bits in a record's first word (the rest: the units
/// it does not hold).
const CHUNK_BITS: u32 = 48;

/// The units of `chunk` that the bytes `[start, end)` of the volume touch.
pub fn units_of(chunk: u64, start: u64, end: u64) -> Units {
    let from = start.max(chunk * CHUNK);
    let to = end.min((chunk + 1) * CHUNK);
    if from >= to {
        return 0;
    }
    let first = (from - chunk * CHUNK) / UNIT;
    let last = (to - 1 - chunk * CHUNK) / UNIT;
    let span = last - first + 1;
    let mask = if span >= 16 { WHOLE } else { (1 << span) - 1 };
    mask << first
}

/// The runs of consecutive units in `units`: (first unit, how many), in
/// order.
fn runs(units: Units) -> impl Iterator<Item = (u32, u32)> {
    let mut left = u32::from(units);
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let first = left.trailing_zeros();
        let len = (left >> first).trailing_ones();
        left &= !(((1u32 << len) - 1) << first);
        Some((first, len))
    })
}

/// Where unit `unit` of a record holding `units` is in its bytes.
fn rank(units: Units, unit: u32) -> u64 {
    u64::from((units & ((1u32 << unit) - 1) as Units).count_ones()) * UNIT
}

/// Snapshots of one volume taken by hand (also for attaches and instant
/// restores) at most.
pub const MAX_KEPT: usize = 1000;

/// Why a snapshot exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Asked for; kept until deleted.
    Manual,
    /// Taken by the schedule; pruned by the retention rules.
    Scheduled,
    /// Taken for one reader (a restore of "now"), deleted when it is done
    /// (or when the volume is next opened, after a crash).
    Temporary,
    /// Not in this server's cache: a version the chunk store pins under
    /// this name (never written to a manifest; listed and read from the
    /// store).
    Stored,
}

/// One snapshot, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its directory's number.
    pub id: u64,
    /// Its name (unique in the volume).
    pub name: String,
    /// The published epoch it holds.
    pub epoch: u64,
    /// When that epoch was published (ms since the Unix epoch): the point
    /// in time the snapshot shows.
    pub epoch_ms: u64,
    /// When the snapshot was taken.
    pub created_ms: u64,
    /// Manual or scheduled.
    pub kind: Kind,
    /// Taken by the schedule, though kept until deleted since (restored
    /// from): the schedule counts from it as from a scheduled one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_schedule: bool,
}

impl SnapshotInfo {
    /// The point in time it shows, ms since the Unix epoch, as retention
    /// ages it: its epoch's time, or when it was taken if that is later.
    pub fn shows_ms(&self) -> u64 {
        self.epoch_ms.max(self.created_ms)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    next_id: u64,
    snapshots: Vec<SnapshotInfo>,
}

/// Units copied aside for the newest snapshot by
/// [`Snapshots::copy_aside`], not yet part of it ([`Snapshots::keep`]).
/// 24 bytes per chunk.
#[derive(Debug, Default)]
pub struct Aside {
    snapshot: Option<u64>,
    /// (chunk, its units, offset of their bytes in the snapshot's data or
    /// [`ZERO`]).
    placed: Vec<(u64, Units, u64)>,
    /// The units' bytes are on their way to the disk while more are
    /// read (and kept out of the page cache: nobody reads them soon).
    streamed: fsutil::Streamed,
}

impl Aside {
    /// How many records it holds (a chunk's units each).
    pub fn len(&self) -> usize {
        self.placed.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.placed.is_empty()
    }

    /// Go on copying units aside for snapshot `id`: the one it copied
    /// them for so far, if any (else `changed` says what happened).
    fn aim(&mut self, id: u64, changed: impl FnOnce() -> String) -> Result<()> {
        if self.placed.is_empty() {
            self.snapshot = Some(id);
        } else if self.snapshot != Some(id) {
            return Err(Error::Invalid(changed()));
        }
        Ok(())
    }

    /// Copy the content of `chunk`'s `units` (their bytes one after the
    /// other; `None`: zeroes, which take no data) to the end of `delta`'s
    /// data, not yet named by its index.
    fn place(
        &mut self,
        delta: &mut Delta,
        chunk: u64,
        units: Units,
        content: Option<&[u8]>,
    ) -> Result<()> {
        if self.placed.is_empty() {
            // The first copy of this batch of work: whatever an earlier
            // one left unkept is written over.
            delta.reclaim();
        }
        let at = match content {
            Some(bytes) => {
                let at = delta.append(bytes)?;
                self.streamed.moved(&delta.data, bytes.len() as u64);
                at
            }
            None => ZERO,
        };
        self.placed.push((chunk, units, at));
        Ok(())
    }
}

/// Some units of a chunk that a snapshot holds, and where their bytes
/// are (one after the other, in ascending order; [`ZERO`]: zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    units: Units,
    at: u64,
}

impl Piece {
    /// Where unit `unit`'s bytes are in the data, if this piece holds it
    /// (`Some(ZERO)`: it is zeroes).
    fn find(self, unit: u32) -> Option<u64> {
        if self.units & (1 << unit) == 0 {
            None
        } else if self.at == ZERO {
            Some(ZERO)
        } else {
            Some(self.at + rank(self.units, unit))
        }
    }
}

/// Units of a chunk and their content, one after the other (`None`:
/// all zeroes), as [`Delta::add`] saves them.
type Record = (u64, Units, Option<Vec<u8>>);

/// One snapshot's preserved units.
#[derive(Debug)]
struct Delta {
    data: File,
    index: File,
    /// Chunk number → the first record of its units.
    chunks: HashMap<u64, Piece>,
    /// Chunk number → its further records, for the few chunks whose units
    /// were kept by more than one publication.
    more: HashMap<u64, Vec<Piece>>,
    /// Where the next units' bytes go.
    data_len: u64,
    /// The end of the bytes the index names: what lies between it and
    /// `data_len` was copied aside and never kept (the publication or
    /// deletion failed), and is written over by the next copy
    /// ([`Delta::reclaim`]) instead of taking space for good.
    named_len: u64,
    index_len: u64,
}

impl Delta {
    fn open(dir: &Path, create: bool) -> Result<Delta> {
        if create {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))
        };
        let data = open("data")?;
        let index = open("index")?;
        let bytes = std::fs::read(dir.join("index"))
            .map_err(|e| Error::io(format!("reading {}", dir.join("index").display()), e))?;
        let mut delta = Delta {
            data,
            index,
            chunks: HashMap::new(),
            more: HashMap::new(),
            data_len: 0,
            named_len: 0,
            index_len: (bytes.len() - bytes.len() % RECORD) as u64,
        };
        // A torn last record is ignored (its units were not overwritten).
        for r in bytes.chunks_exact(RECORD) {
            let word = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
            let at = u64::from_le_bytes(r[8..].try_into().unwrap_or_default());
            let chunk = word & ((1 << CHUNK_BITS) - 1);
            let units = !((word >> CHUNK_BITS) as Units);
            if at != ZERO && units != 0 {
                let end = at.saturating_add(u64::from(units.count_ones()) * UNIT);
                delta.named_len = delta.named_len.max(end);
            }
            delta.hold(chunk, Piece { units, at });
        }
        // Bytes past the last named (copied aside, never kept) are free.
        delta.data_len = delta.named_len;
        Ok(delta)
    }

    /// Remember that `piece` of `chunk` is held.
    fn hold(&mut self, chunk: u64, piece: Piece) {
        if piece.units == 0 {
            return;
        }
        match self.chunks.entry(chunk) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(piece);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(chunk).or_default().push(piece)
            }
        }
    }

    /// The records of `chunk`, first first.
    fn pieces(&self, chunk: u64) -> impl Iterator<Item = Piece> + '_ {
        let first = self.chunks.get(&chunk);
        let more = first
            .filter(|_| !self.more.is_empty())
            .and_then(|_| self.more.get(&chunk));
        first.into_iter().chain(more.into_iter().flatten()).copied()
    }

    /// The units of `chunk` this snapshot holds.
    fn units(&self, chunk: u64) -> Units {
        self.pieces(chunk).fold(0, |held, p| held | p.units)
    }

    /// Save `records` (chunk, units, their content or `None` for zeroes)
    /// durably: data synced before the index records that name it.
    fn add(&mut self, records: &[Record]) -> Result<()> {
        self.reclaim();
        let mut placed = Vec::with_capacity(records.len());
        for (chunk, units, content) in records {
            let at = match content {
                Some(bytes) => self.append(bytes)?,
                None => ZERO,
            };
            placed.push((*chunk, *units, at));
        }
        self.name(&placed)
    }

    /// Drop what was copied aside and never kept: the next bytes go where
    /// the named ones end. Only when no copy aside into this snapshot is
    /// still to be kept (one publication or deletion at a time, under the
    /// volume's lock: a new one begins after the last was kept, or
    /// failed).
    fn reclaim(&mut self) {
        if self.data_len == self.named_len {
            return;
        }
        // Records a failed `name` may have left past `index_len` name the
        // bytes about to be written over: gone first, or nothing is.
        if self
            .index
            .set_len(self.index_len)
            .and_then(|()| self.index.sync_all())
            .is_ok()
        {
            self.data_len = self.named_len;
        }
    }

    /// Write some units' content at the end of `data`, not synced and not
    /// yet named by the index ([`Delta::name`] does both): where it went.
    fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.data_len;
        self.data
            .write_all_at(bytes, at)
            .map_err(|e| Error::io("preserving a chunk for a snapshot", e))?;
        self.data_len += (bytes.len() as u64).next_multiple_of(UNIT);
        Ok(at)
    }

    /// Make `placed` (chunk, units, offset in `data` or [`ZERO`]) part of
    /// the snapshot, durably: `data` synced before the index records that
    /// name its bytes are written, the index synced before this returns
    /// (and so before the image is overwritten there).
    fn name(&mut self, placed: &[(u64, Units, u64)]) -> Result<()> {
        if placed.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(placed.len() * RECORD);
        for &(chunk, units, at) in placed {
            let word = chunk | (u64::from(!units) << CHUNK_BITS);
            records.extend_from_slice(&word.to_le_bytes());
            records.extend_from_slice(&at.to_le_bytes());
        }
        self.data
            .sync_all()
            .map_err(|e| Error::io("syncing a snapshot's data", e))?;
        self.index
            .write_all_at(&records, self.index_len)
            .and_then(|()| self.index.sync_all())
            .map_err(|e| Error::io("writing a snapshot's index", e))?;
        self.index_len += records.len() as u64;
        self.named_len = self.data_len;
        for &(chunk, units, at) in placed {
            self.hold(chunk, Piece { units, at });
        }
        Ok(())
    }

    /// The content of `units` of `chunk`, which this snapshot holds, one
    /// after the other (`None`: all zeroes).
    fn read_units(&self, chunk: u64, units: Units) -> Result<Option<Vec<u8>>> {
        let sources = resolve(&[self], chunk);
        let mut out = vec![0u8; units.count_ones() as usize * UNIT as usize];
        let mut filled = 0usize;
        for (first, len) in runs(units) {
            let (mut unit, end) = (first as usize, (first + len) as usize);
            while unit < end {
                let Some((_, at)) = sources[unit] else {
                    return Err(Error::Corrupt(format!(
                        "a snapshot lost unit {unit} of chunk {chunk}"
                    )));
                };
                // Units stored one after the other are read at once.
                let mut run = 1;
                while unit + run < end
                    && continues(sources[unit], sources[unit + run], run as u64 * UNIT)
                {
                    run += 1;
                }
                let bytes = run * UNIT as usize;
                if at != ZERO {
                    self.data
                        .read_exact_at(&mut out[filled..filled + bytes], at)
                        .map_err(|e| Error::io("reading a snapshot", e))?;
                }
                filled += bytes;
                unit += run;
            }
        }
        Ok((!block::is_zero(&out)).then_some(out))
    }
}

/// Give `to` (the next older snapshot) the units of `from` it reads
/// through it, in batches (bounded memory: at most 16 MiB at a time).
fn hand_over(from: &Delta, to: &mut Delta) -> Result<()> {
    for batch in missing(from, to).chunks(HAND_OVER_BATCH) {
        to.add(&read_units(from, batch)?)?;
    }
    Ok(())
}

/// Chunks' units handed over at a time (at most 16 MiB).
pub const HAND_OVER_BATCH: usize = 256;

/// Chunks' units copied aside (for a publication, or handed over by a
/// deletion) that are kept with one sync, at most: 1 GiB of data, 384 KiB
/// of what [`Aside`] remembers meanwhile.
pub const KEEP_AT_ONCE: usize = 16384;

/// The units of `from` that `to` lacks (chunk, units), in chunk order.
fn missing(from: &Delta, to: &Delta) -> Vec<(u64, Units)> {
    let mut todo: Vec<(u64, Units)> = from
        .chunks
        .keys()
        .map(|&c| (c, from.units(c) & !to.units(c)))
        .filter(|&(_, units)| units != 0)
        .collect();
    todo.sort_unstable();
    todo
}

/// The content of `records` (chunk, units) of `from`, as [`Delta::add`]
/// takes it.
fn read_units(from: &Delta, records: &[(u64, Units)]) -> Result<Vec<Record>> {
    records
        .iter()
        .map(|&(chunk, units)| Ok((chunk, units, from.read_units(chunk, units)?)))
        .collect()
}

/// Retention rules for scheduled snapshots (Time Machine's by default):
/// one an hour for `hourly` hours, one a day for `daily` days, one a week
/// for `weekly` weeks (0: forever). Manual snapshots are never pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Hours in which one snapshot an hour is kept.
    #[serde(default = "default_hourly")]
    pub hourly: u32,
    /// Days (after those hours) in which one snapshot a day is kept.
    #[serde(default = "default_daily")]
    pub daily: u32,
    /// Weeks (after those days) in which one snapshot a week is kept;
    /// 0: every week, forever.
    #[serde(default)]
    pub weekly: u32,
}

fn default_hourly() -> u32 {
    24
}

fn default_daily() -> u32 {
    30
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            hourly: default_hourly(),
            daily: default_daily(),
            weekly: 0,
        }
    }
}

impl Retention {
    /// The scheduled snapshots (of `all`, as `(id, point in time ms)`) to
    /// prune at `now_ms`: in each hour, day or week bucket of its tier only
    /// the newest stays; what is older than every tier goes; the newest
    /// snapshot of all always stays.
    pub fn prune(&self, all: &[(u64, u64)], now_ms: u64) -> Vec<u64> {
        const HOUR: u64 = 3600 * 1000;
        const DAY: u64 = 24 * HOUR;
        const WEEK: u64 = 7 * DAY;
        let hours_end = u64::from(self.hourly) * HOUR;
        let days_end = hours_end + u64::from(self.daily) * DAY;
        let weeks_end = (self.weekly > 0).then(|| days_end + u64::from(self.weekly) * WEEK);
        let mut sorted = all.to_vec();
        // Newest first: the first seen in a bucket is the one kept.
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        let mut seen: BTreeSet<(u8, u64)> = BTreeSet::new();
        let mut prune = Vec::new();
        for (i, &(id, at)) in sorted.iter().enumerate() {
            if i == 0 {
                continue;
            }
            let age = now_ms.saturating_sub(at);
            let bucket = if age < hours_end {
                Some((0, at / HOUR))
            } else if age < days_end {
                Some((1, at / DAY))
            } else if weeks_end.is_none_or(|end| age < end) {
                // Weeks counted from the Unix epoch (a Thursday).
                Some((2, at / WEEK))
            } else {
                None
            };
            match bucket {
                Some(b) if seen.insert(b) => {}
                _ => prune.push(id),
            }
        }
        prune
    }
}

/// A volume's snapshots.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    manifest: Manifest,
    deltas: HashMap<u64, Delta>,
    /// Readers (exports, restores) of each snapshot, by id: a snapshot
    /// being read is never deleted.
    pins: HashMap<u64, Arc<AtomicUsize>>,
    /// The manifest in place may not be durable (its directory's sync
    /// failed, [`Written::InPlace`]): synced before anything is kept for
    /// a snapshot ([`Snapshots::keep`]), so that the image is never
    /// overwritten on the word of a manifest a crash could take back.
    unsynced: bool,
    /// Tests: syncing the directory after the manifest's rename fails.
    #[cfg(test)]
    fail_dir_sync: bool,
}

/// What [`Snapshots::write_manifest`] did when it did not fail outright.
#[derive(Debug)]
enum Written {
    /// The new manifest is in place, durably.
    Durably,
    /// The new manifest is in place (it is what the file holds now), but
    /// its directory could not be synced: a crash may bring the old one
    /// back.
    InPlace(Error),
}

/// Keeps a snapshot from being deleted while it is read.
#[derive(Debug)]
pub struct Pin(Arc<AtomicUsize>);

impl Pin {
    /// A pin counted in `readers` (a version kept elsewhere, such as one
    /// only the chunk store keeps).
    pub fn on(readers: &Arc<AtomicUsize>) -> Pin {
        readers.fetch_add(1, Ordering::AcqRel);
        Pin(readers.clone())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Snapshots {
    /// The snapshots of the volume in `volume_dir`, cleaning up what an
    /// interrupted create or delete left.
    pub fn open(volume_dir: &Path) -> Result<Snapshots> {
        let dir = volume_dir.join(DIR);
        let path = dir.join(MANIFEST);
        let manifest = match std::fs::read(&path) {
            Ok(bytes) => {
                let m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
                if !(1..=FORMAT).contains(&m.format) {
                    return Err(Error::Corrupt(format!(
                        "{}: format {} is not supported (this is {FORMAT})",
                        path.display(),
                        m.format
                    )));
                }
                m
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest {
                format: FORMAT,
                next_id: 1,
                snapshots: Vec::new(),
            },
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let mut deltas = HashMap::new();
        for s in &manifest.snapshots {
            deltas.insert(s.id, Delta::open(&dir.join(s.id.to_string()), false)?);
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(id) = name.parse::<u64>() {
                if !deltas.contains_key(&id) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(Snapshots {
            dir,
            manifest,
            deltas,
            pins: HashMap::new(),
            unsynced: false,
            #[cfg(test)]
            fail_dir_sync: false,
        })
    }

    /// Every snapshot, oldest first.
    pub fn list(&self) -> &[SnapshotInfo] {
        &self.manifest.snapshots
    }

    /// The snapshot called `name`.
    pub fn get(&self, name: &str) -> Option<&SnapshotInfo> {
        self.manifest.snapshots.iter().find(|s| s.name == name)
    }

    /// The newest snapshot showing the volume at or before `ms`.
    pub fn at(&self, ms: u64) -> Option<&SnapshotInfo> {
        self.manifest
            .snapshots
            .iter()
            .filter(|s| s.epoch_ms <= ms)
            .max_by_key(|s| (s.epoch_ms, s.id))
    }

    /// Write the manifest (a temporary file, synced, renamed over it, the
    /// directory synced). `Err`: the old manifest stands, and memory is
    /// to go back to it; [`Written::InPlace`]: the new one stands, and
    /// memory must stay with it, though a crash may bring the old one back
    /// (so nothing it no longer names may be removed yet).
    fn write_manifest(&mut self) -> Result<Written> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("creating {}", self.dir.display()), e))?;
        let bytes =
            serde_json::to_vec_pretty(&self.manifest).map_err(|e| Error::Corrupt(e.to_string()))?;
        let path = self.dir.join(MANIFEST);
        fsutil::replace(&path, &bytes)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        self.unsynced = true;
        Ok(match self.settle() {
            Ok(()) => Written::Durably,
            Err(e) => Written::InPlace(e),
        })
    }

    /// Make the manifest in place durable if it may not be (see
    /// [`Snapshots::unsynced`]).
    fn settle(&mut self) -> Result<()> {
        if !self.unsynced {
            return Ok(());
        }
        #[cfg(test)]
        if self.fail_dir_sync {
            return Err(Error::io(
                format!("syncing {}", self.dir.display()),
                std::io::Error::other("injected"),
            ));
        }
        fsutil::sync_dir(&self.dir)
            .map_err(|e| Error::io(format!("syncing {}", self.dir.display()), e))?;
        self.unsynced = false;
        Ok(())
    }

    /// Take a snapshot of the image as it is (published `epoch` at
    /// `epoch_ms`), named `name` or after the time.
    pub fn create(
        &mut self,
        name: Option<&str>,
        epoch: u64,
        epoch_ms: u64,
        now_ms: u64,
        kind: Kind,
    ) -> Result<SnapshotInfo> {
        self.create_beside(name, epoch, epoch_ms, now_ms, kind, &BTreeSet::new())
    }

    /// [`Snapshots::create`], where `elsewhere` names snapshots of the
    /// volume kept elsewhere (pinned in the chunk store, by another server
    /// on it): a name given that is one of them is refused, a name made
    /// from the time steps around them, as around this volume's own (else
    /// the new snapshot's pin would take the place of the other's).
    pub fn create_beside(
        &mut self,
        name: Option<&str>,
        epoch: u64,
        epoch_ms: u64,
        now_ms: u64,
        kind: Kind,
        elsewhere: &BTreeSet<String>,
    ) -> Result<SnapshotInfo> {
        let taken = |s: &Self, n: &str| s.get(n).is_some() || elsewhere.contains(n);
        let name = match name {
            Some(n) => {
                check_new_name(n)?;
                // `--at` and `VOLUME@…` read such a name as a time, so it
                // could never be asked for by name.
                if !matches!(
                    ublk_mirror_common::when::parse_at(n, &jiff::Zoned::now()),
                    Ok(None)
                ) {
                    return Err(Error::Invalid(format!(
                        "a snapshot cannot be called {n}: `--at {n}` would be read as a time (add a word: before-{n})"
                    )));
                }
                n.to_string()
            }
            None => {
                let mut n = time_name(now_ms);
                let mut k = 1;
                while taken(self, &n) {
                    k += 1;
                    n = format!("{}-{k}", time_name(now_ms));
                }
                n
            }
        };
        if taken(self, &name) {
            return Err(Error::Invalid(format!(
                "there is a snapshot called {name} already"
            )));
        }
        // Each holds two open files while its volume is open: a client
        // asking for snapshots in a loop would take the server's files.
        // (Scheduled ones are pruned; a reader's own go when it is done.)
        let kept = self
            .list()
            .iter()
            .filter(|s| s.kind == Kind::Manual)
            .count();
        if kind == Kind::Manual && kept >= MAX_KEPT {
            return Err(Error::Invalid(format!(
                "volume has {kept} snapshots taken by hand (or for attaches and instant restores; at most {MAX_KEPT}): delete some first (`mirror-server snapshots`, `mirror-server delete`)"
            )));
        }
        let id = self.manifest.next_id;
        let delta = Delta::open(&self.dir.join(id.to_string()), true)?;
        // Its files' names durable before the manifest names it.
        let own = self.dir.join(id.to_string());
        for d in [
            Some(own.as_path()),
            Some(self.dir.as_path()),
            self.dir.parent(),
        ]
        .into_iter()
        .flatten()
        {
            fsutil::sync_dir(d).map_err(|e| Error::io(format!("syncing {}", d.display()), e))?;
        }
        let info = SnapshotInfo {
            id,
            name,
            epoch,
            epoch_ms,
            created_ms: now_ms,
            kind,
            by_schedule: false,
        };
        self.manifest.next_id += 1;
        self.manifest.snapshots.push(info.clone());
        match self.write_manifest() {
            Err(e) => {
                self.manifest.snapshots.pop();
                self.manifest.next_id -= 1;
                Err(e)
            }
            Ok(written) => {
                // The manifest names it: epochs keep what they overwrite
                // for it from now on, whatever the answer.
                self.deltas.insert(id, delta);
                match written {
                    Written::Durably => Ok(info),
                    Written::InPlace(e) => Err(e),
                }
            }
        }
    }

    /// Keep scheduled snapshot `name` until it is deleted (it becomes a
    /// manual one): a version a device restores or attaches by name or
    /// time, whose fill may take days across reboots and lost links,
    /// must not be pruned before it ends. `false`: nothing to change (not
    /// a scheduled snapshot, or none of that name).
    pub fn keep_until_deleted(&mut self, name: &str) -> Result<bool> {
        let Some(i) = self
            .manifest
            .snapshots
            .iter()
            .position(|s| s.name == name && s.kind == Kind::Scheduled)
        else {
            return Ok(false);
        };
        self.manifest.snapshots[i].kind = Kind::Manual;
        self.manifest.snapshots[i].by_schedule = true;
        match self.write_manifest() {
            Err(e) => {
                self.manifest.snapshots[i].kind = Kind::Scheduled;
                self.manifest.snapshots[i].by_schedule = false;
                Err(e)
            }
            Ok(Written::Durably) => Ok(true),
            Ok(Written::InPlace(e)) => Err(e),
        }
    }

    /// Before the image's `units` (chunk, its units) are overwritten: keep
    /// their content in the newest snapshot (where it lacks them),
    /// durably.
    pub fn preserve(&mut self, image: &File, size: u64, units: &[(u64, Units)]) -> Result<()> {
        let mut aside = Aside::default();
        self.copy_aside(image, size, units, &mut aside)?;
        self.keep(aside)
    }

    /// The first half of [`Snapshots::preserve`], which a caller may do in
    /// parts (each under its own hold of the lock, so that readers go on
    /// in between) before one [`Snapshots::keep`]: copy the content of the
    /// image's `units` (chunk, its units) that the newest snapshot lacks
    /// to the end of its data, not synced and not named by its index.
    /// Until `keep`, readers read those units in the image, which must not
    /// change there before (nor may snapshots be taken or deleted: the
    /// publication that calls this holds the volume).
    pub fn copy_aside(
        &mut self,
        image: &File,
        size: u64,
        units: &[(u64, Units)],
        aside: &mut Aside,
    ) -> Result<()> {
        let Some(newest) = self.manifest.snapshots.last().map(|s| s.id) else {
            return Ok(());
        };
        aside.aim(newest, || {
            "the newest snapshot changed while chunks were preserved for it".into()
        })?;
        let Some(delta) = self.deltas.get_mut(&newest) else {
            return Ok(());
        };
        let mut buf = vec![0u8; CHUNK as usize];
        for &(chunk, wanted) in units {
            let lacking = wanted & !delta.units(chunk);
            if lacking == 0 {
                continue;
            }
            let len = read_image_units(image, size, chunk, lacking, &mut buf)?;
            let bytes = &buf[..len];
            aside.place(
                delta,
                chunk,
                lacking,
                (!block::is_zero(bytes)).then_some(bytes),
            )?;
        }
        Ok(())
    }

    /// The second half of [`Snapshots::preserve`]: the units copied aside
    /// become the newest snapshot's, durably (one sync of its data, then
    /// one of its index, however many). After it the image may be
    /// overwritten there.
    pub fn keep(&mut self, aside: Aside) -> Result<()> {
        let Some(id) = aside.snapshot else {
            return Ok(());
        };
        self.settle()?;
        if self.manifest.format < FORMAT && aside.placed.iter().any(|p| p.1 != WHOLE) {
            // A server that reads only whole chunks must refuse the
            // volume from the first record that holds part of one.
            self.manifest.format = FORMAT;
            if let Written::InPlace(e) = self.write_manifest()? {
                return Err(e);
            }
        }
        let delta = self.deltas.get_mut(&id).ok_or_else(|| {
            Error::Invalid("the snapshot chunks were preserved for is gone".into())
        })?;
        delta.name(&aside.placed)
    }

    /// Read snapshot `id` at `offset` (the image is the newest state).
    pub fn read(
        &self,
        id: u64,
        image: &File,
        size: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::Invalid(format!(
                "read of {} bytes at {offset} is past the end of the volume",
                buf.len()
            )));
        }
        let chain = self.chain(id)?;
        let mut done = 0usize;
        let mut resolved: Option<(u64, [Source; 16])> = None;
        while done < buf.len() {
            let at = offset + done as u64;
            let chunk = at / CHUNK;
            let unit = ((at % CHUNK) / UNIT) as usize;
            let within = at % UNIT;
            let units = match resolved {
                Some((c, units)) if c == chunk => units,
                _ => {
                    let units = resolve(&chain, chunk);
                    resolved = Some((chunk, units));
                    units
                }
            };
            // A run of units from the same place, read at once.
            let from = units[unit];
            let mut n = (UNIT - within) as usize;
            let mut next = unit + 1;
            while next < 16
                && done + n < buf.len()
                && continues(from, units[next], (next - unit) as u64 * UNIT)
            {
                n += UNIT as usize;
                next += 1;
            }
            let n = n.min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match from {
                Some((_, ZERO)) => piece.fill(0),
                Some((delta, data_at)) => delta
                    .data
                    .read_exact_at(piece, data_at + within)
                    .map_err(|e| Error::io("reading a snapshot", e))?,
                None => image
                    .read_exact_at(piece, at)
                    .map_err(|e| Error::io("reading the image", e))?,
            }
            done += n;
        }
        Ok(())
    }

    /// The deltas a read of snapshot `id` looks in, in order: its own, then
    /// each newer one's (the image comes after them).
    fn chain(&self, id: u64) -> Result<Vec<&Delta>> {
        let pos = self
            .manifest
            .snapshots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| Error::Invalid(format!("there is no snapshot {id}")))?;
        Ok(self.manifest.snapshots[pos..]
            .iter()
            .filter_map(|s| self.deltas.get(&s.id))
            .collect())
    }

    /// Whether snapshot `id` holds data at `offset` (else it reads as
    /// zeroes), and how many bytes from there have the same answer (in
    /// whole chunks, at most 1 GiB, so that the answer stays quick).
    pub fn extent(&self, id: u64, image: &File, size: u64, offset: u64) -> Result<(bool, u64)> {
        let chain = self.chain(id)?;
        // Data where a unit is in some delta's data, or read from the
        // image where the image has data in that chunk (a file system
        // that cannot tell says data): zeroes only where sure.
        let mapped_at = |chunk: u64| -> bool {
            let mut from_image = false;
            for source in resolve(&chain, chunk) {
                match source {
                    Some((_, ZERO)) => {}
                    Some(_) => return true,
                    None => from_image = true,
                }
            }
            let start = chunk * CHUNK;
            from_image && image_has_data(image, start, (start + CHUNK).min(size))
        };
        let first = offset / CHUNK;
        let mapped = mapped_at(first);
        let last = size.div_ceil(CHUNK);
        let cap = first + (1 << 30) / CHUNK;
        let mut end = first + 1;
        while end < last.min(cap) && mapped_at(end) == mapped {
            end += 1;
        }
        Ok((mapped, (end * CHUNK).min(size) - offset))
    }

    /// Keep snapshot `name` from being deleted while the pin lives.
    pub fn pin(&mut self, name: &str) -> Result<(SnapshotInfo, Pin)> {
        let info = self
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("there is no snapshot {name}")))?;
        let count = self.pins.entry(info.id).or_default().clone();
        count.fetch_add(1, Ordering::AcqRel);
        Ok((info, Pin(count)))
    }

    fn pinned(&self, id: u64) -> bool {
        self.pins
            .get(&id)
            .is_some_and(|c| c.load(Ordering::Acquire) > 0)
    }

    /// What deleting snapshot `name` hands to the next older one: the
    /// units (chunk, its units) that one lacks, to pass to
    /// [`Snapshots::hand_over`] a batch at a time before
    /// [`Snapshots::delete`], which is then quick. Nothing when it is the
    /// oldest, being read, or unknown.
    pub fn hand_over_plan(&self, name: &str) -> Vec<Vec<(u64, Units)>> {
        let Some(pos) = self.manifest.snapshots.iter().position(|s| s.name == name) else {
            return Vec::new();
        };
        let id = self.manifest.snapshots[pos].id;
        if pos == 0 || self.pinned(id) {
            return Vec::new();
        }
        let older = self.manifest.snapshots[pos - 1].id;
        let (Some(from), Some(to)) = (self.deltas.get(&id), self.deltas.get(&older)) else {
            return Vec::new();
        };
        missing(from, to)
            .chunks(HAND_OVER_BATCH)
            .map(<[_]>::to_vec)
            .collect()
    }

    /// Copy `batch` (of [`Snapshots::hand_over_plan`]) of snapshot `name`
    /// to the end of the next older one's data, not yet named there: one
    /// [`Snapshots::keep`] then makes many batches that one's (as
    /// [`Snapshots::copy_aside`] does for a publication). Between batches
    /// a reader of an older snapshot finds each chunk in either, with the
    /// same content: a caller that lets readers in between (a lock per
    /// batch) keeps them going while a big snapshot is deleted.
    pub fn hand_over(
        &mut self,
        name: &str,
        batch: &[(u64, Units)],
        aside: &mut Aside,
    ) -> Result<()> {
        let pos = self
            .manifest
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .filter(|&p| p > 0)
            .ok_or_else(|| Error::Invalid(format!("there is no snapshot {name} to hand over")))?;
        let (id, older) = (
            self.manifest.snapshots[pos].id,
            self.manifest.snapshots[pos - 1].id,
        );
        aside.aim(older, || {
            format!("the snapshot before {name} changed while chunks were handed to it")
        })?;
        let from = self
            .deltas
            .get(&id)
            .ok_or_else(|| Error::Corrupt(format!("snapshot {name} has no data")))?;
        let moved = read_units(from, batch)?;
        let to = self
            .deltas
            .get_mut(&older)
            .ok_or_else(|| Error::Corrupt(format!("snapshot {name} has no older data")))?;
        for (chunk, units, content) in moved {
            aside.place(to, chunk, units, content.as_deref())?;
        }
        Ok(())
    }

    /// Delete snapshot `name`: its chunks go to the next older snapshot
    /// (where that one lacks them), then it is gone. Refused while it is
    /// being read.
    pub fn delete(&mut self, name: &str) -> Result<SnapshotInfo> {
        let pos = self
            .manifest
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::Invalid(format!("there is no snapshot {name}")))?;
        let info = self.manifest.snapshots[pos].clone();
        if self.pinned(info.id) {
            return Err(Error::Invalid(format!(
                "snapshot {name} is being read (an export or a restore); try again when it is done"
            )));
        }
        if pos > 0 {
            let older = self.manifest.snapshots[pos - 1].id;
            let Some(from) = self.deltas.remove(&info.id) else {
                return Err(Error::Corrupt(format!("snapshot {name} has no data")));
            };
            let merged = match self.deltas.get_mut(&older) {
                Some(to) => hand_over(&from, to),
                None => Err(Error::Corrupt(format!("snapshot {name} has no older data"))),
            };
            self.deltas.insert(info.id, from);
            merged?;
        }
        self.manifest.snapshots.remove(pos);
        let written = match self.write_manifest() {
            Ok(w) => w,
            Err(e) => {
                self.manifest.snapshots.insert(pos, info);
                return Err(e);
            }
        };
        // The manifest no longer names it: gone, whatever the answer (its
        // units were handed to the older one first).
        self.deltas.remove(&info.id);
        self.pins.remove(&info.id);
        match written {
            Written::Durably => {
                let _ = std::fs::remove_dir_all(self.dir.join(info.id.to_string()));
                Ok(info)
            }
            // An old manifest that a crash brings back names its data,
            // kept: the next open drops it if the manifest does not.
            Written::InPlace(e) => Err(e),
        }
    }

    /// Delete the scheduled snapshots `retention` no longer keeps at
    /// `now_ms` (never one being read); returns their names.
    pub fn prune(&mut self, retention: &Retention, now_ms: u64) -> Result<Vec<String>> {
        let mut pruned = Vec::new();
        for name in self.prunable(retention, now_ms) {
            self.delete(&name)?;
            pruned.push(name);
        }
        Ok(pruned)
    }

    /// The scheduled snapshots `retention` no longer keeps at `now_ms`
    /// (never one being read), oldest first.
    pub fn prunable(&self, retention: &Retention, now_ms: u64) -> Vec<String> {
        self.prunable_with(retention, now_ms, &[])
    }

    /// [`Snapshots::prunable`], counting `others` too: scheduled snapshots
    /// (name, point in time ms) kept elsewhere (only the chunk store has
    /// them: taken on another server on the store), which fill retention's
    /// buckets as this volume's own do. Those of them to prune are named
    /// too; whether one is being read is for the caller to check.
    pub fn prunable_with(
        &self,
        retention: &Retention,
        now_ms: u64,
        others: &[(String, u64)],
    ) -> Vec<String> {
        // (id, point in time, name, whether this volume's own)
        let own = self
            .manifest
            .snapshots
            .iter()
            .filter(|s| s.kind == Kind::Scheduled)
            .map(|s| (s.id, s.shows_ms(), s.name.as_str(), true));
        // Ids of their own for the others, past any of this volume's.
        let others = others
            .iter()
            .enumerate()
            .filter(|(_, (name, _))| self.get(name).is_none())
            .map(|(i, (name, at))| (u64::MAX - i as u64, *at, name.as_str(), false));
        let all: Vec<(u64, u64, &str, bool)> = own.chain(others).collect();
        let times: Vec<(u64, u64)> = all.iter().map(|a| (a.0, a.1)).collect();
        // This volume's newest stays, whatever the others' times (a
        // server whose clock runs ahead would else have it pruned, and the
        // schedule take another, at every turn).
        let newest_own = all
            .iter()
            .filter(|a| a.3)
            .max_by_key(|a| (a.1, a.0))
            .map(|a| a.0);
        // Newest first from `prune`.
        let mut names: Vec<String> = retention
            .prune(&times, now_ms)
            .into_iter()
            .filter(|&id| !self.pinned(id) && Some(id) != newest_own)
            .filter_map(|id| all.iter().find(|a| a.0 == id).map(|a| a.2.to_string()))
            .collect();
        names.reverse();
        names
    }

    /// Bytes the snapshots take on disk (data files).
    pub fn bytes(&self) -> u64 {
        self.deltas.values().map(|d| d.data_len).sum()
    }

    /// When the newest scheduled snapshot taken at or before `now_ms` was
    /// taken (one "after" now: the clock went back since), counting one
    /// the schedule took and a restore kept since.
    pub fn last_scheduled_ms_by(&self, now_ms: u64) -> Option<u64> {
        self.manifest
            .snapshots
            .iter()
            .filter(|s| (s.kind == Kind::Scheduled || s.by_schedule) && s.created_ms <= now_ms)
            .map(|s| s.created_ms)
            .max()
    }
}

/// Where a unit is for a read: the delta that holds it and where in its
/// data ([`ZERO`]: zeroes); `None`: in the image.
type Source<'a> = Option<(&'a Delta, u64)>;

/// Whether a unit found at `next`, `step` bytes after one found at
/// `from`, is read with it at once: both in the image, both zeroes of the
/// same delta, or one after the other in the same delta's data.
fn continues(from: Source, next: Source, step: u64) -> bool {
    match (from, next) {
        (None, None) => true,
        (Some((d, ZERO)), Some((e, ZERO))) => std::ptr::eq(d, e),
        (Some((d, a)), Some((e, b))) => std::ptr::eq(d, e) && a != ZERO && b == a + step,
        _ => false,
    }
}

/// Where each unit of `chunk` is for a read through `chain` (a snapshot's
/// delta, then each newer one's): the first delta that holds it. One
/// lookup per delta, however many units.
fn resolve<'a>(chain: &[&'a Delta], chunk: u64) -> [Source<'a>; 16] {
    let mut out = [None; 16];
    let mut left = WHOLE;
    for d in chain {
        for p in d.pieces(chunk) {
            let mut take = p.units & left;
            while take != 0 {
                let unit = take.trailing_zeros();
                out[unit as usize] = p.find(unit).map(|at| (*d, at));
                take &= take - 1;
            }
            left &= !p.units;
        }
        if left == 0 {
            break;
        }
    }
    out
}

/// Read `units` of the image's `chunk` into `buf`, one after the other
/// (zeroes past its `size`): how many bytes that is.
fn read_image_units(
    image: &File,
    size: u64,
    chunk: u64,
    units: Units,
    buf: &mut [u8],
) -> Result<usize> {
    let mut filled = 0usize;
    for (unit, run) in runs(units) {
        let at = chunk * CHUNK + u64::from(unit) * UNIT;
        let len = (u64::from(run) * UNIT) as usize;
        let have = (len as u64).min(size.saturating_sub(at)) as usize;
        let piece = &mut buf[filled..filled + len];
        piece[have..].fill(0);
        image
            .read_exact_at(&mut piece[..have], at)
            .map_err(|e| Error::io("reading the image for a snapshot", e))?;
        filled += len;
    }
    Ok(filled)
}

/// Whether `file` has data (not a hole) anywhere in `[start, end)`; a file
/// system that cannot tell says data.
fn image_has_data(file: &File, start: u64, end: u64) -> bool {
    let holes = ublk_mirror_common::fsutil::holes(file, start..end);
    holes.first() != Some(&(start..end))
}

/// A volume's snapshots as listed (read only: safe while a server runs),
/// each with the bytes of data it keeps.
pub fn list(volume_dir: &Path) -> Result<Vec<(SnapshotInfo, u64)>> {
    let dir = volume_dir.join(DIR);
    let path = dir.join(MANIFEST);
    let manifest: Manifest = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    Ok(manifest
        .snapshots
        .into_iter()
        .map(|s| {
            let bytes =
                std::fs::metadata(dir.join(s.id.to_string()).join("data")).map_or(0, |m| m.len());
            (s, bytes)
        })
        .collect())
}

/// A snapshot's name from its time: `2026-11-22T16.30.05Z` (characters a
/// name may have).
pub fn time_name(ms: u64) -> String {
    match jiff::Timestamp::from_millisecond(ms as i64) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H.%M.%SZ").to_string(),
        Err(_) => format!("t{ms}"),
    }
}

/// Parse what [`time_name`] writes, or `YYYY-MM-DD[THH:MM[:SS]][Z]` (UTC:
/// clients send times so, having made the user's local time an instant),
/// into ms since the Unix epoch.
pub fn parse_time(text: &str) -> Option<u64> {
    let t = text.strip_suffix('Z').unwrap_or(text);
    let (date, time) = match t.split_once(['T', ' ']) {
        Some((d, tm)) => (d, tm.replace('.', ":")),
        None => (t, "00:00".to_string()),
    };
    let dt: jiff::civil::DateTime = format!("{date}T{time}").parse().ok()?;
    let ts = dt.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    u64::try_from(ts.as_millisecond()).ok()
}

/// How often the schedule takes a snapshot, unless told otherwise.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: u64 = 3600 * 1000;
    const DAY: u64 = 24 * HOUR;

    #[test]
    fn names_and_times_round_trip() {
        let ms = 1_795_365_005_000; // 2026-11-22T16:30:05Z (date -u +%s)
        assert_eq!(time_name(ms), "2026-11-22T16.30.05Z");
        assert_eq!(parse_time(&time_name(ms)), Some(ms));
        assert_eq!(parse_time("2026-11-22T16:30:05Z"), Some(ms));
        assert_eq!(
            parse_time("2026-11-22"),
            Some(ms - (16 * 3600 + 30 * 60 + 5) * 1000)
        );
        assert_eq!(parse_time("2026-13-01"), None);
        assert_eq!(parse_time("yesterday"), None);
        check_name(&time_name(ms)).unwrap();
    }

    #[test]
    fn retention_keeps_one_an_hour_then_a_day_then_a_week() {
        let r = Retention {
            hourly: 24,
            daily: 30,
            weekly: 4,
        };
        let now = 400 * DAY;
        // One every 15 minutes for 60 days.
        let all: Vec<(u64, u64)> = (0..60 * 24 * 4).map(|i| (i, now - i * HOUR / 4)).collect();
        let pruned: BTreeSet<u64> = r.prune(&all, now).into_iter().collect();
        let kept: Vec<u64> = all
            .iter()
            .filter(|(id, _)| !pruned.contains(id))
            .map(|&(_, at)| at)
            .collect();
        let in_hours = kept.iter().filter(|&&at| now - at < 24 * HOUR).count();
        let in_days = kept
            .iter()
            .filter(|&&at| (24 * HOUR..24 * HOUR + 30 * DAY).contains(&(now - at)))
            .count();
        let older = kept.len() - in_hours - in_days;
        assert!((24..=25).contains(&in_hours), "{in_hours} in the last day");
        assert!((30..=31).contains(&in_days), "{in_days} daily");
        assert!((4..=5).contains(&older), "{older} weekly");
        // The newest is always kept; pruning again prunes nothing.
        assert!(!pruned.contains(&0));
        let left: Vec<(u64, u64)> = all
            .iter()
            .copied()
            .filter(|(id, _)| !pruned.contains(id))
            .collect();
        assert!(r.prune(&left, now).is_empty());
    }

    fn image(dir: &Path, size: u64) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("image"))
            .unwrap();
        f.set_len(size).unwrap();
        f
    }

    /// The units `len` bytes at `at` touch, as a publication finds them.
    fn units_at(at: u64, len: usize) -> Vec<(u64, Units)> {
        let end = at + len as u64;
        (at / CHUNK..=(end - 1) / CHUNK)
            .map(|c| (c, units_of(c, at, end)))
            .collect()
    }

    /// What publishing does: preserve (copied aside in two parts, kept at
    /// once), then overwrite.
    fn write(s: &mut Snapshots, img: &File, size: u64, at: u64, data: &[u8]) {
        let units = units_at(at, data.len());
        let (first, later) = units.split_at(1);
        let mut aside = Aside::default();
        s.copy_aside(img, size, first, &mut aside).unwrap();
        s.copy_aside(img, size, later, &mut aside).unwrap();
        s.keep(aside).unwrap();
        img.write_all_at(data, at).unwrap();
    }

    fn read_all(s: &Snapshots, id: u64, img: &File, size: u64) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        s.read(id, img, size, &mut buf, 0).unwrap();
        buf
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any mix of writes, snapshots, deletes and reopenings: every
        /// snapshot reads back exactly as the image was when it was taken.
        #[test]
        fn every_snapshot_reads_as_the_image_was(
            ops in proptest::collection::vec(
                prop_oneof![
                    4 => (0u64..(5 * CHUNK), 1usize..(3 * CHUNK as usize), any::<u8>())
                        .prop_map(|(at, len, b)| (0u8, at, len, b)),
                    // Small writes: parts of chunks, at any byte.
                    4 => (0u64..(5 * CHUNK), 1usize..(3 * UNIT as usize), any::<u8>())
                        .prop_map(|(at, len, b)| (0u8, at, len, b)),
                    2 => Just((1u8, 0, 0, 0)),
                    1 => (0u64..8).prop_map(|k| (2u8, k, 0, 0)),
                    1 => Just((3u8, 0, 0, 0)),
                    1 => (0u64..(5 * CHUNK), 1usize..(3 * CHUNK as usize))
                        .prop_map(|(at, len)| (4u8, at, len, 0)),
                    1 => (0u64..8).prop_map(|k| (5u8, k, 0, 0)),
                ],
                1..48,
            )
        ) {
            let size = 5 * CHUNK + 1000;
            let dir = tempfile::tempdir().unwrap();
            let img = image(dir.path(), size);
            let mut s = Snapshots::open(dir.path()).unwrap();
            let mut current = vec![0u8; size as usize];
            let mut models: Vec<(u64, Vec<u8>)> = Vec::new();
            for (i, (op, at, len, b)) in ops.into_iter().enumerate() {
                match op {
                    0 => {
                        let len = len.min((size - at) as usize);
                        // Zero writes too: a hole's chunk costs no data.
                        let data = vec![if b % 3 == 0 { 0 } else { b }; len];
                        write(&mut s, &img, size, at, &data);
                        current[at as usize..][..len].copy_from_slice(&data);
                    }
                    1 => {
                        let info = s.create(None, i as u64, i as u64, i as u64 * 1000, Kind::Manual).unwrap();
                        models.push((info.id, current.clone()));
                    }
                    2 if !models.is_empty() => {
                        let k = at as usize % models.len();
                        let (id, _) = models.remove(k);
                        let name = s.list().iter().find(|x| x.id == id).unwrap().name.clone();
                        if at % 2 == 0 {
                            // As the volume deletes: handed over a batch
                            // at a time, kept at once, then deleted.
                            let mut aside = Aside::default();
                            for batch in s.hand_over_plan(&name) {
                                s.hand_over(&name, &batch, &mut aside).unwrap();
                            }
                            s.keep(aside).unwrap();
                        }
                        s.delete(&name).unwrap();
                    }
                    5 if !models.is_empty() => {
                        // The server dies while a deletion hands chunks
                        // over, before they are kept: nothing is deleted.
                        let (id, _) = models[at as usize % models.len()];
                        let name = s.list().iter().find(|x| x.id == id).unwrap().name.clone();
                        let mut aside = Aside::default();
                        for batch in s.hand_over_plan(&name) {
                            s.hand_over(&name, &batch, &mut aside).unwrap();
                        }
                        drop(aside);
                        s = Snapshots::open(dir.path()).unwrap();
                    }
                    4 => {
                        // The server dies after chunks were copied aside,
                        // before they were kept (and so before the image
                        // changed): they are not the snapshot's.
                        let len = len.min((size - at) as usize);
                        let mut aside = Aside::default();
                        s.copy_aside(&img, size, &units_at(at, len), &mut aside).unwrap();
                        drop(aside);
                        s = Snapshots::open(dir.path()).unwrap();
                    }
                    _ => s = Snapshots::open(dir.path()).unwrap(),
                }
                for (id, model) in &models {
                    prop_assert!(read_all(&s, *id, &img, size) == *model, "snapshot {} differs", id);
                    // What an export maps as a hole reads as zeroes.
                    let mut off = 0;
                    while off < size {
                        let (mapped, len) = s.extent(*id, &img, size, off).unwrap();
                        prop_assert!(len > 0);
                        prop_assert!(
                            mapped || block::is_zero(&model[off as usize..(off + len) as usize]),
                            "snapshot {} has data in a hole at {}", id, off
                        );
                        off += len;
                    }
                }
            }
        }
    }

    /// Units copied aside and never kept (the publication failed after
    /// copying, and is tried again, again and again) take no space: the
    /// next copy writes over them, also after a restart.
    #[test]
    fn a_name_that_reads_as_a_time_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Snapshots::open(dir.path()).unwrap();
        for name in [
            "2026-11-20",
            "2026-11-20-pre-upgrade",
            "today",
            "2hago",
            "now",
        ] {
            let err = s
                .create(Some(name), 1, 1000, 1000, Kind::Manual)
                .unwrap_err()
                .to_string();
            assert!(err.contains("read as a time"), "{name}: {err}");
        }
        for name in [
            "before-2026-11-20",
            "nightly",
            "chicago",
            "2026-11-22T16.30.05Z",
        ] {
            s.create(Some(name), 1, 1000, 1000, Kind::Manual).unwrap();
        }
    }

    #[test]
    fn units_copied_aside_and_never_kept_take_no_space() {
        let size = 16 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), size);
        let mut s = Snapshots::open(dir.path()).unwrap();
        write(&mut s, &img, size, 0, &vec![1u8; size as usize]);
        let a = s.create(Some("a"), 1, 1000, 1000, Kind::Manual).unwrap();
        for _ in 0..5 {
            let mut aside = Aside::default();
            s.copy_aside(&img, size, &units_at(0, 4 * CHUNK as usize), &mut aside)
                .unwrap();
            drop(aside);
        }
        assert_eq!(s.bytes(), 4 * CHUNK, "the last try's copies only");
        drop(s);
        let mut s = Snapshots::open(dir.path()).unwrap();
        assert_eq!(s.bytes(), 0, "copies never kept count after a restart");
        write(&mut s, &img, size, 0, &vec![2u8; 2 * CHUNK as usize]);
        assert_eq!(s.bytes(), 2 * CHUNK);
        assert!(read_all(&s, a.id, &img, size).iter().all(|&b| b == 1));
        drop(s);
        let s = Snapshots::open(dir.path()).unwrap();
        assert_eq!(s.bytes(), 2 * CHUNK);
        assert!(read_all(&s, a.id, &img, size).iter().all(|&b| b == 1));
    }

    /// A manifest renamed into place whose directory could not be synced
    /// stands (memory follows it), but nothing is kept for a snapshot, and
    /// so the image is not overwritten, until it is durable; a deleted
    /// snapshot's data stays until then (a crash may bring back the
    /// manifest that names it).
    #[test]
    fn a_manifest_not_known_durable_holds_back_the_image() {
        let size = 16 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), size);
        let mut s = Snapshots::open(dir.path()).unwrap();
        write(&mut s, &img, size, 0, &vec![1u8; size as usize]);
        s.create(Some("a"), 1, 1000, 1000, Kind::Manual).unwrap();
        write(&mut s, &img, size, 0, &vec![2u8; CHUNK as usize]);
        let b = s.create(Some("b"), 2, 2000, 2000, Kind::Manual).unwrap();
        s.fail_dir_sync = true;
        let err = s.delete("b").unwrap_err().to_string();
        assert!(err.contains("injected"), "{err}");
        assert_eq!(
            s.list().iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        let data_of_b = dir.path().join(DIR).join(b.id.to_string());
        assert!(data_of_b.exists(), "b's data went");
        let err = s
            .create(Some("c"), 3, 3000, 3000, Kind::Manual)
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(s.list().len(), 2, "c stands, as the manifest says");
        let mut aside = Aside::default();
        s.copy_aside(&img, size, &units_at(0, CHUNK as usize), &mut aside)
            .unwrap();
        assert!(s.keep(aside).is_err(), "kept on an unsynced manifest");
        s.fail_dir_sync = false;
        write(&mut s, &img, size, 0, &vec![3u8; CHUNK as usize]);
        drop(s);
        let s = Snapshots::open(dir.path()).unwrap();
        assert_eq!(
            s.list().iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert!(!data_of_b.exists(), "b's data stayed");
    }

    #[test]
    fn space_follows_change_and_readers_keep_their_snapshot() {
        let size = 64 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), size);
        let mut s = Snapshots::open(dir.path()).unwrap();
        write(&mut s, &img, size, 0, &vec![7u8; (32 * CHUNK) as usize]);
        let a = s.create(Some("a"), 1, 1000, 1000, Kind::Manual).unwrap();
        assert_eq!(s.bytes(), 0, "taking a snapshot cost space");
        // Two chunks change: two chunks of space.
        write(
            &mut s,
            &img,
            size,
            3 * CHUNK,
            &vec![9u8; (2 * CHUNK) as usize],
        );
        assert_eq!(s.bytes(), 2 * CHUNK);
        // Writing them again costs nothing more; a hole costs no data.
        write(
            &mut s,
            &img,
            size,
            3 * CHUNK,
            &vec![8u8; (2 * CHUNK) as usize],
        );
        write(&mut s, &img, size, 40 * CHUNK, &[1u8; 100]);
        assert_eq!(s.bytes(), 2 * CHUNK);
        // A 4 KiB write costs 4 KiB, and 100 bytes across two units 8.
        write(
            &mut s,
            &img,
            size,
            10 * CHUNK + 3 * UNIT,
            &[2u8; UNIT as usize],
        );
        assert_eq!(s.bytes(), 2 * CHUNK + UNIT);
        write(&mut s, &img, size, 11 * CHUNK + 2 * UNIT - 50, &[3u8; 100]);
        assert_eq!(s.bytes(), 2 * CHUNK + 3 * UNIT);
        // The rest of that chunk later: the units it lacks only.
        write(&mut s, &img, size, 11 * CHUNK, &vec![4u8; CHUNK as usize]);
        assert_eq!(s.bytes(), 3 * CHUNK + UNIT);
        let mut back = vec![0u8; (2 * CHUNK) as usize];
        s.read(a.id, &img, size, &mut back, 10 * CHUNK).unwrap();
        assert!(back.iter().all(|&b| b == 7), "snapshot a reads wrong");
        let (_, pin) = s.pin("a").unwrap();
        let err = s.delete("a").unwrap_err().to_string();
        assert!(err.contains("being read"), "{err}");
        let retention = Retention {
            hourly: 0,
            daily: 0,
            weekly: 1,
        };
        let kept = s.create(None, 1, 1500, 1500, Kind::Scheduled).unwrap();
        s.create(None, 2, 2000, 2000, Kind::Scheduled).unwrap();
        s.create(None, 3, 3000, 3000, Kind::Scheduled).unwrap();
        // One a device restores from is kept until deleted (a manual
        // one); asked again, nothing changes.
        assert!(s.keep_until_deleted(&kept.name).unwrap());
        assert!(!s.keep_until_deleted(&kept.name).unwrap());
        assert!(!s.keep_until_deleted("nope").unwrap());
        assert_eq!(
            s.prune(&retention, 100 * DAY).unwrap().len(),
            1,
            "the newest is kept, and the one restored from"
        );
        assert!(s.get(&kept.name).is_some_and(|k| k.kind == Kind::Manual));
        drop(pin);
        s.delete("a").unwrap();
        assert!(s.get("a").is_none() && s.list().len() == 2);
        // The schedule counts from the newest it took, kept or not (else
        // a restore from it would bring the next one early), across an
        // open.
        let newest = s.create(None, 4, 4000, 4000, Kind::Scheduled).unwrap();
        assert!(s.keep_until_deleted(&newest.name).unwrap());
        let s = Snapshots::open(dir.path()).unwrap();
        assert_eq!(s.last_scheduled_ms_by(10_000), Some(4000));
        assert!(s
            .get(&newest.name)
            .is_some_and(|k| k.kind == Kind::Manual && k.by_schedule));
    }

    #[test]
    fn units_of_a_range() {
        assert_eq!(units_of(0, 0, 1), 0b1);
        assert_eq!(units_of(0, 4095, 4097), 0b11);
        assert_eq!(units_of(1, 0, CHUNK), 0, "another chunk");
        assert_eq!(units_of(1, 0, CHUNK + 1), 0b1);
        assert_eq!(units_of(2, 2 * CHUNK + 15 * UNIT, 9 * CHUNK), 1 << 15);
        assert_eq!(units_of(3, 0, u64::MAX), WHOLE);
        assert_eq!(rank(0b1011_0000, 7), 2 * UNIT);
        assert_eq!(rank(WHOLE, 0), 0);
        assert_eq!(runs(0).count(), 0);
        assert_eq!(runs(WHOLE).collect::<Vec<_>>(), [(0, 16)]);
        assert_eq!(
            runs(0b1100_0000_0111_0001).collect::<Vec<_>>(),
            [(0, 1), (4, 3), (14, 2)]
        );
    }

    /// A volume whose snapshots a server of format 1 kept (whole chunks,
    /// manifest format 1) reads as it did; the first part of a chunk kept
    /// makes the manifest say format 2 (which that server refuses).
    #[test]
    fn format_1_snapshots_are_read_and_upgraded_when_parts_are_kept() {
        let size = 8 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), size);
        img.write_all_at(&vec![5u8; size as usize], 0).unwrap();
        let snaps = dir.path().join(DIR);
        std::fs::create_dir_all(snaps.join("1")).unwrap();
        // Snapshot 1 kept chunk 2 (all 6) and chunk 5 (zeroes) whole.
        std::fs::write(snaps.join("1/data"), vec![6u8; CHUNK as usize]).unwrap();
        let mut index = Vec::new();
        for (chunk, at) in [(2u64, 0u64), (5, ZERO)] {
            index.extend_from_slice(&chunk.to_le_bytes());
            index.extend_from_slice(&at.to_le_bytes());
        }
        std::fs::write(snaps.join("1/index"), &index).unwrap();
        std::fs::write(
            snaps.join(MANIFEST),
            r#"{"format":1,"next_id":2,"snapshots":[{"id":1,"name":"old","epoch":1,
               "epoch_ms":1000,"created_ms":1000,"kind":"manual"}]}"#,
        )
        .unwrap();
        let mut expect = vec![5u8; size as usize];
        expect[(2 * CHUNK) as usize..][..CHUNK as usize].fill(6);
        expect[(5 * CHUNK) as usize..][..CHUNK as usize].fill(0);
        let mut s = Snapshots::open(dir.path()).unwrap();
        assert!(read_all(&s, 1, &img, size) == expect);
        // Whole chunks keep format 1; a part of one needs format 2.
        write(&mut s, &img, size, 3 * CHUNK, &vec![1u8; CHUNK as usize]);
        let format = || -> u64 {
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(snaps.join(MANIFEST)).unwrap()).unwrap();
            m["format"].as_u64().unwrap()
        };
        assert_eq!(format(), 1);
        write(&mut s, &img, size, 2 * CHUNK + 100, &[9u8; 10]);
        write(&mut s, &img, size, 6 * CHUNK + 100, &[9u8; 10]);
        assert_eq!(format(), 2);
        let s = Snapshots::open(dir.path()).unwrap();
        assert!(read_all(&s, 1, &img, size) == expect, "snapshot 1 differs");
    }
}
