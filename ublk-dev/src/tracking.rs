//! Change tracking of a running device: every write-class request passes
//! [`Tracker::before_write`] before it reaches the backing file.
//!
//! Two records are kept:
//!
//! - the write-intent [`Journal`] on disk: a region is durably marked before
//!   the first write into it is issued. A fast path of atomic bits makes
//!   writes into regions already marked cost no sync at all; the first write
//!   into a fresh region waits for one `fdatasync` of the journal, and every
//!   other region that waits at that moment (from any queue) rides along on
//!   the same sync;
//! - the exact changed ranges in memory, at byte granularity, data and
//!   zeroed ranges apart (discards and write-zeroes travel as holes).
//!
//! A write is never issued unless its regions are durably marked: if the
//! journal cannot be written, the write fails with `EIO` instead of
//! becoming a change nobody knows about.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use ublk_mirror_common::RangeSet;

use crate::engine::{Errno, Op, Request};
use crate::error::{Error, Result};
use crate::journal::{self, Journal, OpenReport, State};

/// File name of the journal inside the state directory.
pub const JOURNAL_FILE: &str = "journal";

/// Most marked ranges `status` lists; beyond that it reports the count only.
const MAX_STATUS_RANGES: usize = 4096;

/// What is known about the backing file's past, which decides what a
/// journal that does not exist yet must start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// The backing file was just created: nothing changed yet.
    NewFile,
    /// The file existed, with a history nobody recorded: a new journal
    /// starts with every region marked (and a resync flagged).
    ExistingFile,
    /// A device is being recovered: its journal must exist; a missing one
    /// would silently forget the changes of the crash.
    Recovering,
}

/// The exact changes since the last release, in bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Ranges written with data.
    pub data: RangeSet,
    /// Ranges discarded or zeroed: they read as zeroes.
    pub zeroed: RangeSet,
}

/// What `status` shows about tracking (also the form it is published in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingStatus {
    /// The journal file.
    pub journal: PathBuf,
    /// Bytes per region.
    pub region_size: u64,
    /// Regions marked in the journal.
    pub regions_marked: u64,
    /// Bytes changed with data since the last release.
    pub dirty_bytes: u64,
    /// Bytes discarded or zeroed since the last release.
    pub zeroed_bytes: u64,
    /// An unclean stop left regions to settle with the mirror by hash comparison.
    pub resync_pending: bool,
    /// Journal syncs made to mark regions.
    pub journal_syncs: u64,
    /// The marked regions as byte ranges `[start, end)` of the device.
    pub marked: Vec<[u64; 2]>,
}

/// Change tracking for one device, shared by all its queues.
#[derive(Debug)]
pub struct Tracker {
    path: PathBuf,
    region_shift: u32,
    regions: u64,
    /// Bit per region: durably marked in the journal (the fast path).
    durable: Vec<AtomicU64>,
    journal: Mutex<Journal>,
    changes: Mutex<Changes>,
    resync_pending: AtomicBool,
    journal_syncs: AtomicU64,
}

impl Tracker {
    /// Open (or create) the journal in `state_dir` of the device whose
    /// backing file is `backing` (canonical path, inode), and mark it open.
    pub fn open(
        state_dir: &Path,
        backing: (&Path, u64),
        device_size: u64,
        region_size: u64,
        history: History,
    ) -> Result<(Tracker, Option<OpenReport>)> {
        let path = state_dir.join(JOURNAL_FILE);
        let id = journal::backing_id(backing.0, backing.1);
        if !path.exists() && history == History::Recovering {
            return Err(Error::JournalCorrupt {
                path,
                reason: "it is missing, but the device being recovered was tracked".into(),
            });
        }
        create_dir_durably(state_dir)?;
        let (mut journal, report) = if path.exists() {
            let (j, report) = Journal::open(&path, device_size, id)?;
            if j.header().region_size != region_size {
                tracing::info!(
                    region_size = j.header().region_size,
                    "keeping the journal's region size (changing it needs a new journal)"
                );
            }
            (j, Some(report))
        } else {
            let mut j = Journal::create(&path, device_size, region_size, id)?;
            sync_dir(state_dir)?;
            if history == History::ExistingFile {
                tracing::info!("new journal for an existing backing file: every region is marked");
                j.mark_all()?;
            }
            (j, None)
        };
        if let Some(r) = &report {
            if r.unclean {
                tracing::warn!(
                    marked = journal.marked().count(),
                    "the last daemon did not stop cleanly: marked regions need a resync"
                );
            }
            if !r.damaged_blocks.is_empty() || !r.damaged_headers.is_empty() {
                tracing::warn!(
                    blocks = ?r.damaged_blocks,
                    headers = ?r.damaged_headers,
                    "journal damage repaired; every region of a damaged block is marked"
                );
            }
        }
        journal.set_state(State::Open)?;
        let header = *journal.header();
        let regions = header.regions();
        let durable: Vec<AtomicU64> = (0..regions.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        for r in journal.marked() {
            durable[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::Relaxed);
        }
        let tracker = Tracker {
            path,
            region_shift: header.region_size.trailing_zeros(),
            regions,
            durable,
            resync_pending: AtomicBool::new(header.resync),
            journal: Mutex::new(journal),
            changes: Mutex::new(Changes::default()),
            journal_syncs: AtomicU64::new(0),
        };
        Ok((tracker, report))
    }

    /// Record a request before it is issued. Write-class requests have
    /// their regions durably marked first; a failure to mark fails the
    /// request (`EIO`), so no change ever goes unrecorded. May block for
    /// one journal sync.
    pub fn before_write(&self, req: &Request) -> std::result::Result<(), Errno> {
        if !matches!(req.op, Op::Write | Op::Discard | Op::WriteZeroes) || req.len == 0 {
            return Ok(());
        }
        let end = req.offset + req.len;
        let first = req.offset >> self.region_shift;
        let last = ((end - 1) >> self.region_shift).min(self.regions - 1);
        if !(first..=last).all(|r| self.is_durable(r)) {
            self.mark(first..=last)?;
        }
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if req.op == Op::Write {
            changes.zeroed.remove(req.offset..end);
            changes.data.insert(req.offset..end);
        } else {
            changes.data.remove(req.offset..end);
            changes.zeroed.insert(req.offset..end);
        }
        Ok(())
    }

    fn is_durable(&self, r: u64) -> bool {
        self.durable[(r / 64) as usize].load(Ordering::Acquire) & (1 << (r % 64)) != 0
    }

    fn mark(&self, regions: std::ops::RangeInclusive<u64>) -> std::result::Result<(), Errno> {
        // Whoever holds the lock marks what it needs; a queue that waited
        // for the lock usually finds its regions marked by then.
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let needed: Vec<u64> = regions.filter(|&r| !self.is_durable(r)).collect();
        if needed.is_empty() {
            return Ok(());
        }
        match journal.mark(needed.iter().copied()) {
            Ok(wrote) => {
                if wrote {
                    self.journal_syncs.fetch_add(1, Ordering::Relaxed);
                }
                for r in needed {
                    self.durable[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::Release);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!("cannot mark regions in the journal, failing the write: {e}");
                Err(Errno::IO)
            }
        }
    }

    /// A copy of the exact changes recorded so far.
    pub fn changes(&self) -> Changes {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Regions marked in the journal, ascending.
    pub fn marked_regions(&self) -> Vec<u64> {
        (0..self.regions).filter(|&r| self.is_durable(r)).collect()
    }

    /// Bytes per region.
    pub fn region_size(&self) -> u64 {
        1 << self.region_shift
    }

    /// The state `status` shows.
    pub fn status(&self) -> TrackingStatus {
        // Neither the journal lock nor a copy of the changes: writes do not
        // wait for a status.
        let (dirty_bytes, zeroed_bytes) = {
            let c = self.changes.lock().unwrap_or_else(|p| p.into_inner());
            (c.data.len(), c.zeroed.len())
        };
        let regions_marked = self
            .durable
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        TrackingStatus {
            journal: self.path.clone(),
            region_size: self.region_size(),
            regions_marked,
            dirty_bytes,
            zeroed_bytes,
            resync_pending: self.resync_pending.load(Ordering::Relaxed),
            journal_syncs: self.journal_syncs.load(Ordering::Relaxed),
            marked: self
                .marked_ranges()
                .iter()
                .take(MAX_STATUS_RANGES)
                .map(|r| [r.start, r.end])
                .collect(),
        }
    }

    /// The marked regions as byte ranges of the device.
    pub fn marked_ranges(&self) -> RangeSet {
        let size = self.region_size();
        self.marked_regions()
            .into_iter()
            .map(|r| r * size..(r + 1) * size)
            .collect()
    }

    /// Record a clean stop; call after the backing file was synced.
    pub fn close_clean(&self) -> Result<()> {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.set_state(State::Clean)
    }
}

/// A journal left by a device that ran with tracking off no longer covers
/// what was written meanwhile: mark every region of it (and flag a resync)
/// so that turning tracking on again cannot trust it.
pub fn invalidate(state_dir: &Path, backing: (&Path, u64), device_size: u64) -> Result<()> {
    let path = state_dir.join(JOURNAL_FILE);
    if !path.exists() {
        return Ok(());
    }
    let id = journal::backing_id(backing.0, backing.1);
    let (mut j, _) = Journal::open(&path, device_size, id)?;
    j.set_state(State::Open)?;
    j.mark_all()?;
    tracing::warn!(journal = %path.display(), "tracking is off: the existing journal is marked entirely");
    Ok(())
}

/// Create a directory (and parents) so that it survives a power cut.
fn create_dir_durably(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::io(
            format!("cannot create state directory {}", dir.display()),
            e,
        )
    })?;
    let mut d = Some(dir);
    while let Some(p) = d {
        sync_dir(p)?;
        d = p.parent().filter(|p| !p.as_os_str().is_empty());
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("cannot sync directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BACKING: (&str, u64) = ("/x/disk.img", 42);

    fn open(dir: &Path, history: History) -> Result<(Tracker, Option<OpenReport>)> {
        Tracker::open(
            dir,
            (Path::new(BACKING.0), BACKING.1),
            64 * MIB,
            MIB,
            history,
        )
    }

    fn tracker(dir: &Path) -> Tracker {
        open(dir, History::NewFile).unwrap().0
    }

    #[test]
    fn writes_mark_their_regions_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        t.before_write(&Request::write(MIB - 4096, 8192)).unwrap(); // spans regions 0 and 1
        assert_eq!(t.marked_regions(), vec![0, 1]);
        assert_eq!(t.status().journal_syncs, 1);
        for i in 0..100 {
            t.before_write(&Request::write(i * 4096, 4096)).unwrap();
        }
        assert_eq!(
            t.status().journal_syncs,
            1,
            "writes into marked regions synced again"
        );
        t.before_write(&Request::read(10 * MIB, 4096)).unwrap();
        t.before_write(&Request::flush()).unwrap();
        assert_eq!(
            t.marked_regions(),
            vec![0, 1],
            "reads or flushes marked regions"
        );
    }

    #[test]
    fn data_and_holes_are_tracked_apart() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        t.before_write(&Request::write(0, 16384)).unwrap();
        t.before_write(&Request::new(Op::Discard, 4096, 4096))
            .unwrap();
        t.before_write(&Request::new(Op::WriteZeroes, 3 * MIB, MIB))
            .unwrap();
        let c = t.changes();
        assert_eq!(
            c.data.iter().collect::<Vec<_>>(),
            vec![0..4096, 8192..16384]
        );
        assert_eq!(
            c.zeroed.iter().collect::<Vec<_>>(),
            vec![4096..8192, 3 * MIB..4 * MIB]
        );
        let s = t.status();
        assert_eq!((s.dirty_bytes, s.zeroed_bytes), (12288, 4096 + MIB));
        assert_eq!(t.marked_regions(), vec![0, 3]);
    }

    #[test]
    fn marks_survive_a_crash_and_a_crash_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        t.before_write(&Request::write(5 * MIB, 4096)).unwrap();
        drop(t); // no close_clean: a crash
        let (t, report) = open(dir.path(), History::Recovering).unwrap();
        assert!(report.unwrap().unclean);
        assert!(t.status().resync_pending);
        assert_eq!(t.marked_regions(), vec![5]);
        t.close_clean().unwrap();
        drop(t);
        let (t, report) = open(dir.path(), History::ExistingFile).unwrap();
        assert!(!report.unwrap().unclean);
        assert!(
            t.status().resync_pending,
            "a clean stop forgot the pending resync"
        );
    }

    #[test]
    fn a_new_journal_for_an_existing_file_marks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (t, report) = open(dir.path(), History::ExistingFile).unwrap();
        assert!(report.is_none());
        assert_eq!(t.marked_regions().len(), 64);
        assert!(t.status().resync_pending);
    }

    #[test]
    fn recovery_without_its_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(&dir.path().join("state"), History::Recovering).unwrap_err();
        assert!(err.to_string().contains("it is missing"), "{err}");
    }

    #[test]
    fn running_untracked_invalidates_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        t.before_write(&Request::write(0, 4096)).unwrap();
        t.close_clean().unwrap();
        drop(t);
        invalidate(dir.path(), (Path::new(BACKING.0), BACKING.1), 64 * MIB).unwrap();
        let (t, report) = open(dir.path(), History::ExistingFile).unwrap();
        assert!(report.unwrap().unclean);
        assert_eq!(t.marked_regions().len(), 64);
    }

    #[test]
    fn a_journal_that_cannot_be_written_fails_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        // Replace the journal's file by one opened read-only.
        {
            let mut j = t.journal.lock().unwrap();
            let path = j.path().to_path_buf();
            j.replace_file_for_test(std::fs::File::open(&path).unwrap());
        }
        assert_eq!(t.before_write(&Request::write(0, 4096)), Err(Errno::IO));
        assert!(t.marked_regions().is_empty());
        assert!(
            t.changes().data.is_empty(),
            "a failed mark still recorded the write"
        );
    }
}
