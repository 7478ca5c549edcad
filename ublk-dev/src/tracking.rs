//! Change tracking of a running device: every write-class request passes
//! [`Tracker::prepare_write`] (or [`Tracker::before_write`], which waits on
//! its caller's thread) before it reaches the backing file.
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
//!
//! # Copy-on-write off the queue threads
//!
//! A write into a chunk that a sealed, unreleased epoch still needs must
//! not be issued before the chunk's content is preserved (see
//! [`crate::epoch`]). The thread that serves the write never blocks on
//! reading it:
//!
//! - the ublk queues read it themselves, on their rings
//!   ([`Tracker::prepare_write`] answers [`Prepared::Read`]): the
//!   chunks are noted as *being preserved* (with the cut they are
//!   preserved for), the request reads them with an io_uring read while
//!   the queue serves its other requests, hands them over
//!   ([`Tracker::store_read`]) and is prepared again. No thread hop and
//!   no wake-up: with a held epoch, 4 KiB random writes ran 1.5x faster
//!   this way than through the preservers (VM, TCG). What memory takes is
//!   kept at once; for chunks past the memory limit, spill slots are
//!   reserved under the lock, and the request writes them on its ring too
//!   (`ublk.rs`, `spill_on_ring`) before it hands them back
//!   ([`Tracker::spill_written`]). At most [`READ_BUDGET`] bytes are read
//!   this way at once. Callers without a ring do the same on their thread
//!   ([`Tracker::preserve_read`]);
//! - a write whose chunks another request is preserving, or that finds
//!   no budget left, is left to [`PRESERVERS`] threads:
//!   [`Tracker::prepare_write`] notes the chunks it
//!   is the first to need, queues them, and answers [`Prepared::Wait`];
//!   the queue polls the request's [`Wake`] on its ring and serves its
//!   other requests meanwhile, and prepares the request again once woken.
//!   A preserver takes every job queued (up to [`MAX_EPOCH_READ`]), reads
//!   them, and stores them under one hold of the lock: what memory takes
//!   at once, and for the rest spill slots reserved, adjacent ones for
//!   adjacent chunks. It writes those without the lock (one write per run),
//!   so no other request's preparation waits for the disk, and hands them
//!   back under a second hold, which wakes the writes into them.
//!
//! Writes to other chunks, reads, and flushes never wait for a chunk they
//! do not touch.
//!
//! Why the preserved content is exactly the chunk at the cut: from the
//! moment a chunk is noted as being preserved until its content is stored
//! (both under the tracker's lock; for a spilled chunk, until its slot is
//! written and handed back), every write that needs it waits, so
//! no write into it is issued in between, and the bytes read (by the
//! request or a preserver) are the bytes at the cut it was asked for.
//! The tracker's lock is never held for a spill write, and a write waits
//! for no spill write but that of the chunks it writes into (and of the
//! other jobs in their preserver's batch, handed back together): a
//! reserved slot is its writer's alone until handed back, and the spill
//! file is not given back while one is reserved.
//! Cuts taken meanwhile
//! change nothing: with no write in between, the chunk at the later cut is
//! the same, and a write after them that needs a newer version finds the
//! chunk being preserved, waits, and asks again. A write that needs it no
//! longer (every epoch needing it was released or broke meanwhile) goes
//! ahead, and the preserver's bytes, now possibly torn, are dropped:
//! nothing is kept that no unreleased, unbroken epoch sealed at or before
//! its cut touched. A failed read breaks only those epochs; later ones ask
//! for a version of their own. A reader of a sealed epoch reads the backing file
//! and then looks for a preserved version (as before); a chunk still
//! being preserved is untouched in the file (a spilled version is there
//! to read only once its slot is written; until then the file still
//! holds it). Writes in flight at the cut
//! may be seen or not, as before: they are on both sides of it. Memory
//! stays bounded: the queue of chunks to read is at most every request in
//! flight, each preserver holds the reads of one batch (at most
//! [`MAX_EPOCH_READ`], or one request's chunks), and the requests' own
//! reads at most [`READ_BUDGET`] in all; what is kept obeys the
//! copy-on-write memory limit and spills beyond it. A request that gives
//! up before handing its read over (its queue going down) fails those
//! chunks, as a failed read does: the epochs needing them break (they
//! resync), and nothing waits for them forever. One that gives up with a
//! spill write in flight also leaks that buffer (the kernel may still
//! read it), and its slots are not handed out again before the spill
//! file is given back: a late write can only land in slots nobody reads,
//! or in the old, unlinked file. Nothing of this is on disk but the
//! spill, an unnamed file that does not outlive the process.
//!
//! # Chunks the consumer took
//!
//! The replicator reads each block of a sealed epoch once
//! ([`Tracker::take_epoch`]). Under the same lock as the read's check and
//! overlay, the chunks read whole are marked *taken* (a chunk read in part
//! may still be read in its other parts): no write into them waits
//! for copy-on-write any more, and what was kept for them alone is
//! dropped. A write issued after that cannot have changed the bytes read
//! (it was not issued yet), and one issued before had preserved the chunk
//! first, so the read found that version. A taken chunk is never read as
//! the cut again: that read is refused ([`EpochError::Taken`]), and the
//! consumer sends the epoch as a pre-copy round instead (see
//! [`crate::replicator`]). So a write waits only for chunks of an epoch
//! the link has not read yet, instead of until the server published it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ublk_mirror_common::{fsutil, RangeSet};

pub use crate::engine::Ticket;
use crate::engine::{AlignedBuf, ChangeTracking, Errno, Op, Request};
pub use crate::epoch::{ChangeKind, Changes, Sealed, CHUNK, DEFAULT_COW_MEMORY};
use crate::epoch::{EpochError, Epochs, Spill, SpillRun};
use crate::error::{Error, Result};
use crate::journal::{self, Journal, OpenReport, State};
use crate::wake::Wake;
use ublk_mirror_common::clock::now_ms;

/// File name of the journal inside the state directory.
pub const JOURNAL_FILE: &str = "journal";

/// Most marked ranges `status` lists; beyond that it reports the count only.
const MAX_STATUS_RANGES: usize = 4096;

/// Most bytes read from the backing file at once for an epoch read (and
/// by a preserver).
pub const MAX_EPOCH_READ: u64 = 1 << 20;

/// Most bytes of chunks that requests read to preserve themselves at a
/// time ([`Prepared::Read`]); past it they are left to the preservers.
pub const READ_BUDGET: u64 = 4 << 20;

/// Threads that read chunks to preserve (see the module docs).
pub const PRESERVERS: usize = 2;

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

/// Where to cut when sealing an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealAt {
    /// At the next FLUSH the device receives (a point the filesystem made
    /// durable), or at the deadline if none comes (an idle device).
    Flush(Duration),
    /// Right now.
    Now,
}

impl SealAt {
    /// At a FLUSH within `wait`, or right now when `wait` is zero.
    pub fn flush_within(wait: Duration) -> SealAt {
        if wait.is_zero() {
            SealAt::Now
        } else {
            SealAt::Flush(wait)
        }
    }
}

/// A sealed epoch as `status` and the control socket show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochInfo {
    /// Its number.
    pub id: u64,
    /// Bytes written with data.
    pub data_bytes: u64,
    /// Bytes discarded or zeroed.
    pub zeroed_bytes: u64,
    /// Bytes of unknown changes, to settle by hash comparison.
    pub resync_bytes: u64,
    /// Cut at a FLUSH (else on request, at the deadline).
    pub at_flush: bool,
    /// When it was sealed (ms since the Unix epoch).
    pub sealed_ms: u64,
    /// Why it cannot be read as its cut, if it cannot.
    pub broken: Option<String>,
    /// A pre-copy round: shipped as the device is now, published only
    /// with the cut that ends the pre-copy.
    #[serde(default)]
    pub precopy: bool,
}

impl EpochInfo {
    fn of(s: &Sealed) -> EpochInfo {
        EpochInfo {
            id: s.id,
            data_bytes: s.changes.data.len(),
            zeroed_bytes: s.changes.zeroed.len(),
            resync_bytes: s.changes.resync.len(),
            at_flush: s.at_flush,
            sealed_ms: s.sealed_ms,
            broken: s.broken.clone(),
            precopy: s.precopy,
        }
    }
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
    /// Bytes of regions found marked at start, whose changes are not known
    /// exactly and are settled by hash comparison with the mirror.
    pub resync_bytes: u64,
    /// An unclean stop left regions to settle with the mirror by hash comparison.
    pub resync_pending: bool,
    /// The current (open) epoch.
    pub current_epoch: u64,
    /// The oldest sealed epoch not yet released, if any.
    pub oldest_unreleased_epoch: Option<u64>,
    /// The last epoch released.
    pub released_epoch: u64,
    /// The sealed, unreleased epochs.
    pub sealed: Vec<EpochInfo>,
    /// Memory holding preserved (copy-on-write) chunks of sealed epochs.
    pub preserved_memory_bytes: u64,
    /// Preserved chunks spilled to a file.
    pub preserved_spilled_bytes: u64,
    /// Writes waiting now for the chunks they overwrite to be preserved.
    #[serde(default)]
    pub writes_waiting_for_cow: u64,
    /// How many times a write was held back for copy-on-write since the
    /// daemon started (once per wait, however many chunks it waited for).
    #[serde(default)]
    pub cow_waits: u64,
    /// Journal syncs made to mark regions.
    pub journal_syncs: u64,
    /// The marked regions as byte ranges `[start, end)` of the device.
    pub marked: Vec<[u64; 2]>,
}

/// How to open a [`Tracker`].
#[derive(Debug)]
pub struct TrackerOptions<'a> {
    /// Directory of the journal (created if missing).
    pub state_dir: &'a Path,
    /// The backing file's canonical path and inode: the journal's identity.
    pub identity: (&'a Path, u64),
    /// The backing file as the device opened it; sealed epochs read it.
    pub file: &'a File,
    /// Device size in bytes.
    pub device_size: u64,
    /// Region size for a new journal.
    pub region_size: u64,
    /// What is known about the file's past.
    pub history: History,
    /// Memory for preserved chunks before they spill to a file.
    pub cow_memory: u64,
}

/// What a release did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The epoch.
    pub epoch: u64,
    /// False when it had been released before (nothing done).
    pub released: bool,
    /// Regions cleared in the journal.
    pub regions_cleared: u64,
    /// This release settled the resync of an unclean stop.
    pub resync_done: bool,
}

/// The epochs and the write-class requests in flight, under one lock.
#[derive(Debug)]
struct Live {
    epochs: Epochs,
    /// ticket -> what the request changes; carried into the next epoch
    /// when a seal finds it still in flight.
    in_flight: BTreeMap<u64, (ChangeKind, Range<u64>)>,
    next_ticket: u64,
    /// Chunks being preserved (each by one job, which knows its cut): no
    /// write that needs one is issued until it is stored.
    preserving: BTreeSet<u64>,
    /// Writes waiting for chunks being preserved: waiter -> (chunks of
    /// its still being preserved, its wake-up).
    waiting: BTreeMap<u64, (usize, Arc<Wake>)>,
    /// Chunk being preserved -> the waiters waiting for it.
    waiters_of: BTreeMap<u64, Vec<u64>>,
    next_waiter: u64,
    /// The regions epochs released with [`Tracker::release_keeping`]
    /// changed, with when (ms), oldest first: they stay marked while
    /// recent.
    recent: VecDeque<(u64, RangeSet)>,
    /// Bytes of chunks that requests are reading (or spilling) to
    /// preserve themselves ([`Prepared::Read`]): at most [`READ_BUDGET`].
    reading: u64,
    /// How many requests are reading so.
    readers: u64,
}

impl Live {
    /// A write waits for `chunks`, every one of them being preserved.
    fn wait_for(&mut self, chunks: &[u64], wake: Arc<Wake>) {
        let id = self.next_waiter;
        self.next_waiter += 1;
        for &c in chunks {
            debug_assert!(self.preserving.contains(&c));
            self.waiters_of.entry(c).or_default().push(id);
        }
        self.waiting.insert(id, (chunks.len(), wake));
    }

    /// Chunk `c` is preserved (or could not be): wake the writes that
    /// waited for nothing else.
    fn preserved(&mut self, c: u64) {
        self.preserving.remove(&c);
        for id in self.waiters_of.remove(&c).unwrap_or_default() {
            if let Some((left, wake)) = self.waiting.get_mut(&id) {
                *left -= 1;
                if *left == 0 {
                    wake.signal(true);
                    self.waiting.remove(&id);
                }
            }
        }
    }

    /// The tracker is going away: fail every waiting write.
    fn fail_waiting(&mut self) {
        for (_, wake) in std::mem::take(&mut self.waiting).into_values() {
            wake.signal(false);
        }
        self.waiters_of.clear();
        self.preserving.clear();
    }
}

/// The preservers' queue of jobs.
#[derive(Debug, Default)]
struct Jobs {
    queue: Mutex<JobQueue>,
    work: Condvar,
}

#[derive(Debug, Default)]
struct JobQueue {
    jobs: VecDeque<Preservation>,
    stop: bool,
    /// Tests hold the preservers to see what waits for them.
    #[cfg(test)]
    paused: bool,
}

impl Jobs {
    fn push(&self, job: Preservation) {
        lock(&self.queue).jobs.push_back(job);
        self.work.notify_one();
    }

    /// The next jobs, as many as are queued up to [`MAX_EPOCH_READ`] of
    /// chunks in all (at least one), or `None` once the tracker stops.
    fn next_batch(&self) -> Option<Vec<Preservation>> {
        let mut q = lock(&self.queue);
        loop {
            if q.stop {
                return None;
            }
            #[cfg(test)]
            let paused = q.paused;
            #[cfg(not(test))]
            let paused = false;
            if !paused && !q.jobs.is_empty() {
                let mut batch = Vec::new();
                let mut bytes = 0;
                while let Some(job) = q.jobs.front() {
                    let len = job.chunks.len() as u64 * CHUNK;
                    if !batch.is_empty() && bytes + len > MAX_EPOCH_READ {
                        break;
                    }
                    bytes += len;
                    batch.extend(q.jobs.pop_front());
                }
                return Some(batch);
            }
            q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What [`Tracker::prepare_write`] decided.
#[derive(Debug)]
pub enum Prepared {
    /// Issue the request; hand the ticket (if any) back to
    /// [`Tracker::after_write`] once it completed.
    Go(Option<Ticket>),
    /// Chunks it overwrites are being preserved: wait for the wake-up,
    /// then prepare it again.
    Wait(Arc<Wake>),
    /// The chunks it overwrites are the caller's to preserve: read them
    /// (as [`Preservation::runs`] says), hand them to
    /// [`Tracker::preserve_read`] (or [`Tracker::store_read`], writing the
    /// spill itself), then prepare it again.
    Read(Preservation),
}

/// Chunks a request preserves itself (see [`Prepared::Read`]). Dropped
/// before it was handed back (its request failed, its queue went down),
/// it counts as a failed read, or write, so that no write waits for its
/// chunks forever.
pub struct Preservation {
    cut: u64,
    chunks: Vec<u64>,
    /// What it counts against [`READ_BUDGET`] (a request's own read; none
    /// for a preserver's job).
    bytes: u64,
    device_size: u64,
    live: Arc<Mutex<Live>>,
    /// [`Preservation::store`] ran.
    stored: bool,
    /// What was read that goes to spill slots reserved for it, to write
    /// without the lock.
    spilling: Vec<(AlignedBuf, Vec<SpillRun>)>,
}

impl std::fmt::Debug for Preservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preservation")
            .field("cut", &self.cut)
            .field("chunks", &self.chunks)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Preservation {
    /// The byte ranges of the backing file to read, in order: its chunks,
    /// adjacent ones in one range of at most [`MAX_EPOCH_READ`].
    pub fn runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for &c in &self.chunks {
            let r = c * CHUNK..((c + 1) * CHUNK).min(self.device_size);
            match runs.last_mut() {
                Some(last) if last.end == r.start && r.end - last.start <= MAX_EPOCH_READ => {
                    last.end = r.end;
                }
                _ => runs.push(r),
            }
        }
        runs
    }

    /// Settling's first step, under the lock: keep what was read
    /// (`reads[i]`: [`Preservation::runs`]'s `i`th range, at least that
    /// long, or why it could not be read), in memory while the limit
    /// allows, reserve spill slots for the rest, to write without the lock
    /// ([`Preservation::write_spill`]), and fail what could not be read
    /// (which breaks the epochs that needed it). The chunks stay noted as
    /// being preserved: no write into them is issued before
    /// [`Preservation::finish`].
    fn store(&mut self, live: &mut Live, reads: Vec<std::io::Result<AlignedBuf>>) {
        let runs = self.runs();
        debug_assert_eq!(runs.len(), reads.len());
        let mut reads = reads.into_iter();
        for run in runs {
            let first = run.start / CHUNK;
            let len = (run.end - run.start) as usize;
            let read = reads
                .next()
                .unwrap_or_else(|| Err(std::io::Error::other("not read")))
                .and_then(|buf| {
                    if buf.as_slice().len() >= len {
                        Ok(buf)
                    } else {
                        Err(std::io::Error::other("a short read"))
                    }
                });
            match read {
                Ok(buf) => {
                    let spill =
                        live.epochs
                            .preserve_run_deferred(first, self.cut, &buf.as_slice()[..len]);
                    if !spill.is_empty() {
                        self.spilling.push((buf, spill));
                    }
                }
                Err(e) => {
                    for c in first..run.end.div_ceil(CHUNK) {
                        live.epochs.preserve_failed_at(
                            c,
                            self.cut,
                            &format!("cannot read the backing file to preserve a chunk: {e}"),
                        );
                    }
                }
            }
        }
        self.stored = true;
    }

    /// The runs [`Preservation::store`] reserved, in order: the first
    /// slot of each, and its bytes.
    fn spill_runs(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.spilling.iter().flat_map(|(buf, runs)| {
            runs.iter()
                .map(|r| (r.first_slot, &buf.as_slice()[r.at.clone()]))
        })
    }

    /// Settling's second step, without the lock: write the runs into
    /// `spill`, one write each.
    fn write_spill(&self, spill: &dyn Spill) -> Vec<std::io::Result<()>> {
        self.spill_runs()
            .map(|(slot, data)| spill.write(slot, data))
            .collect()
    }

    /// The spill writes [`Tracker::store_read`] left to its caller, in
    /// order: where in [`Tracker::spill_file`], and what.
    pub fn spill_writes(&self) -> Vec<(u64, &[u8])> {
        self.spill_runs()
            .map(|(slot, data)| (SpillFile::at(slot), data))
            .collect()
    }

    /// Settling's last step, under the lock: hand back the spill writes
    /// (`written`, in [`Preservation::write_spill`]'s order; missing ones
    /// count as failed) and wake the writes that waited for the chunks.
    fn finish(&mut self, live: &mut Live, written: Vec<std::io::Result<()>>) {
        // Runs are handed back one at a time, from the last: should one
        // panic, those left are still here for the drop to give up.
        let mut at: usize = self.spilling.iter().map(|(_, runs)| runs.len()).sum();
        let mut written: Vec<_> = written.into_iter().map(Some).collect();
        while let Some((_, runs)) = self.spilling.last_mut() {
            let Some(run) = runs.pop() else {
                self.spilling.pop();
                continue;
            };
            at -= 1;
            let result = written
                .get_mut(at)
                .and_then(Option::take)
                .unwrap_or_else(|| Err(std::io::Error::other("not written")));
            live.epochs.spill_written(run, result);
        }
        for c in std::mem::take(&mut self.chunks) {
            live.preserved(c);
        }
        let bytes = std::mem::take(&mut self.bytes);
        if bytes > 0 {
            live.reading -= bytes;
            live.readers -= 1;
        }
    }
}

impl Drop for Preservation {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let live = self.live.clone();
        let mut live = lock(&live);
        if !self.stored {
            // Given up before its read was handed over: a failed read.
            let reads = self
                .runs()
                .iter()
                .map(|_| Err(std::io::Error::other("the request gave up")))
                .collect();
            self.store(&mut live, reads);
        }
        // Given up between storing and finishing, a spill write may be in
        // flight (a queue going down): its buffers are leaked and its
        // slots not used again until the spill is cleared (a write landing
        // late goes to the old, unlinked file then).
        for (buf, runs) in std::mem::take(&mut self.spilling) {
            std::mem::forget(buf);
            for run in runs {
                live.epochs.spill_lost(run);
            }
        }
        self.finish(&mut live, Vec::new());
    }
}

/// Change tracking for one device, shared by all its queues.
#[derive(Debug)]
pub struct Tracker {
    path: PathBuf,
    region_shift: u32,
    regions: u64,
    device_size: u64,
    /// Bit per region: durably marked in the journal (the fast path).
    durable: Vec<AtomicU64>,
    /// Lock order: `journal` before `live`; `live` and the preservers'
    /// queue are never held together.
    journal: Mutex<Journal>,
    live: Arc<Mutex<Live>>,
    /// Signalled when an epoch is sealed.
    sealed: Condvar,
    /// The epoch a seal waits to cut at the next FLUSH (0: none); its
    /// number is in the journal. A FLUSH cuts only that epoch, while it is
    /// the current one.
    seal_requested: AtomicU64,
    /// The device served a FLUSH since the last cut (or pre-copy round).
    flushed: AtomicBool,
    /// The backing file (a duplicate of the device's descriptor).
    file: Arc<File>,
    /// A sync of the backing file failed: some written data may never have
    /// reached the disk, and the kernel reports that only once. Epochs are
    /// still released, but no region is cleared from then on (the next
    /// start compares them with the mirror), until the daemon restarts.
    backing_failed: AtomicBool,
    resync_pending: AtomicBool,
    journal_syncs: AtomicU64,
    cow_waits: AtomicU64,
    jobs: Arc<Jobs>,
    preservers: Vec<JoinHandle<()>>,
    /// The spill of [`Live::epochs`], which the preservers and requests
    /// ([`Tracker::store_read`]) write.
    spill: Arc<SpillFile>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        lock(&self.jobs.queue).stop = true;
        self.jobs.work.notify_all();
        for t in self.preservers.drain(..) {
            let _ = t.join();
        }
        lock(&self.live).fail_waiting();
    }
}

/// A preserver: read the chunks of each batch of jobs from the backing
/// file (no lock held), store them at their jobs' cuts under one hold of
/// the lock, write the spill slots reserved for those past the memory
/// limit (no lock held: other requests' preparation never waits for the
/// disk), and wake their writes under a second hold (see the module
/// docs). A batch that panics drops what it had not settled, which fails
/// those chunks ([`Preservation`]'s drop), so no write waits for them
/// forever; the thread goes on.
fn preserver(live: &Mutex<Live>, file: &File, spill: &SpillFile, jobs: &Jobs) {
    while let Some(mut batch) = jobs.next_batch() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let reads: Vec<Vec<_>> = batch
                .iter()
                .map(|p| p.runs().into_iter().map(|r| read_run(file, r)).collect())
                .collect();
            {
                let mut live = lock(live);
                for (p, reads) in batch.iter_mut().zip(reads) {
                    p.store(&mut live, reads);
                    if p.spilling.is_empty() {
                        // Kept in memory: its writes need not wait for
                        // the others' spill writes.
                        p.finish(&mut live, Vec::new());
                    }
                }
            }
            let written: Vec<_> = batch.iter().map(|p| p.write_spill(spill)).collect();
            let mut live = lock(live);
            for (p, written) in batch.iter_mut().zip(written) {
                p.finish(&mut live, written);
            }
        }));
    }
}

/// `range` of `file`, read on this thread.
fn read_run(file: &File, range: Range<u64>) -> std::io::Result<AlignedBuf> {
    let mut buf = AlignedBuf::zeroed((range.end - range.start) as usize);
    file.read_exact_at(buf.as_mut_slice(), range.start)?;
    Ok(buf)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracker {
    /// Open (or create) the journal and mark it open. Regions found marked
    /// become the current epoch's resync ranges: what changed in them is
    /// not known exactly.
    pub fn open(opts: &TrackerOptions<'_>) -> Result<(Tracker, Option<OpenReport>)> {
        let state_dir = opts.state_dir;
        let device_size = opts.device_size;
        let path = state_dir.join(JOURNAL_FILE);
        let id = journal::backing_id(opts.identity.0, opts.identity.1);
        if !path.exists() && opts.history == History::Recovering {
            return Err(Error::JournalCorrupt {
                path,
                reason: "it is missing, but the device being recovered was tracked".into(),
            });
        }
        create_dir_durably(state_dir)?;
        let (mut journal, report) = if path.exists() {
            let (mut j, report) = Journal::open(&path, device_size, id)?;
            if opts.history == History::NewFile {
                // A journal left by an earlier file of this name (removed,
                // made anew; the inode number reused): this file holds
                // none of what it says is clean. Every region is compared
                // with the mirror; the device and its epochs go on.
                tracing::warn!(
                    journal = %path.display(),
                    "the backing file is new but a journal of an earlier one is here: every region is marked (compared with the mirror by hash)"
                );
                j.mark_all()?;
            }
            if j.header().region_size != opts.region_size {
                tracing::info!(
                    region_size = j.header().region_size,
                    "keeping the journal's region size (changing it needs a new journal)"
                );
            }
            (j, Some(report))
        } else {
            // An existing backing file's history is unknown: its journal
            // is born with every region marked (never clean, even for a
            // moment a crash could catch).
            let j = if opts.history == History::ExistingFile {
                tracing::info!("new journal for an existing backing file: every region is marked");
                Journal::create_all_marked(&path, device_size, opts.region_size, id)?
            } else {
                Journal::create(&path, device_size, opts.region_size, id)?
            };
            fsutil::sync_dir(state_dir).map_err(|e| sync_dir_failed(state_dir, e))?;
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
        let region_size = header.region_size;
        let durable: Vec<AtomicU64> = (0..regions.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let mut resync = RangeSet::new();
        for r in journal.marked() {
            durable[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::Relaxed);
            resync.insert(r * region_size..((r + 1) * region_size).min(device_size));
        }
        // An open file of its own: its syncs (before each release) must
        // not take a write-back error the device's FLUSH is to report.
        let file = fsutil::reopen(opts.file)
            .map_err(|e| Error::io("opening the backing file again", e))?;
        let spill = Arc::new(SpillFile::new(state_dir));
        let epochs = Epochs::new(
            device_size,
            header.released_epoch,
            header.sealed_epoch,
            resync,
            opts.cow_memory,
            spill.clone(),
            now_ms(),
        );
        let mut tracker = Tracker {
            path,
            region_shift: region_size.trailing_zeros(),
            regions,
            device_size,
            durable,
            resync_pending: AtomicBool::new(header.resync),
            journal: Mutex::new(journal),
            live: Arc::new(Mutex::new(Live {
                epochs,
                in_flight: BTreeMap::new(),
                next_ticket: 0,
                preserving: BTreeSet::new(),
                waiting: BTreeMap::new(),
                waiters_of: BTreeMap::new(),
                next_waiter: 0,
                recent: VecDeque::new(),
                reading: 0,
                readers: 0,
            })),
            sealed: Condvar::new(),
            seal_requested: AtomicU64::new(0),
            flushed: AtomicBool::new(false),
            file: Arc::new(file),
            backing_failed: AtomicBool::new(false),
            journal_syncs: AtomicU64::new(0),
            cow_waits: AtomicU64::new(0),
            jobs: Arc::new(Jobs::default()),
            preservers: Vec::new(),
            spill,
        };
        for i in 0..PRESERVERS {
            let (live, file, spill, jobs) = (
                tracker.live.clone(),
                tracker.file.clone(),
                tracker.spill.clone(),
                tracker.jobs.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("ublk-cow-{i}"))
                .spawn(move || {
                    // Writes wait for it: run it as soon as it can go on.
                    crate::system::shorten_this_threads_slice();
                    preserver(&live, &file, &spill, &jobs)
                })
                .map_err(|e| Error::io("starting a copy-on-write thread", e))?;
            tracker.preservers.push(t);
        }
        Ok((tracker, report))
    }

    /// [`Tracker::prepare_write`], reading chunks to preserve and waiting
    /// for those being preserved on this thread: for callers without a
    /// ring.
    pub fn before_write(&self, req: &Request) -> std::result::Result<Option<Ticket>, Errno> {
        loop {
            match self.prepare_write(req)? {
                Prepared::Go(ticket) => return Ok(ticket),
                Prepared::Wait(wake) => wake.wait_blocking()?,
                Prepared::Read(p) => {
                    let reads = p
                        .runs()
                        .into_iter()
                        .map(|r| read_run(&self.file, r))
                        .collect();
                    self.preserve_read(p, reads);
                }
            }
        }
    }

    /// Record a request before it is issued. Write-class requests have
    /// their regions durably marked first (a failure to mark fails the
    /// request with `EIO`, so no change ever goes unrecorded). A write into
    /// chunks that sealed epochs still need reads them itself
    /// ([`Prepared::Read`]) where no other request is preserving any of
    /// them and [`READ_BUDGET`] has room, else waits
    /// ([`Prepared::Wait`]) until the preservers kept them; either way it
    /// is prepared again after. May block for one journal sync, never for
    /// reading chunks. A FLUSH takes a cut that was asked for. The ticket
    /// of a write-class request goes back to [`Tracker::after_write`] once
    /// it completed.
    pub fn prepare_write(&self, req: &Request) -> std::result::Result<Prepared, Errno> {
        self.prepare(req, true)
    }

    /// [`Tracker::prepare_write`] that leaves every chunk to the
    /// preservers: how tests reach them.
    #[cfg(test)]
    fn prepare_write_leaving_reads(&self, req: &Request) -> std::result::Result<Prepared, Errno> {
        self.prepare(req, false)
    }

    /// Hand over what a [`Prepared::Read`] read: `reads[i]` holds the
    /// bytes of [`Preservation::runs`]'s `i`th range (a buffer at least
    /// that long), or why it could not be read, which breaks the epochs
    /// that needed them (see [`crate::epoch`]). Writes waiting for those
    /// chunks go on.
    pub fn preserve_read(&self, p: Preservation, reads: Vec<std::io::Result<AlignedBuf>>) {
        if let Some(p) = self.store_read(p, reads) {
            let written = p.write_spill(self.spill.as_ref());
            self.spill_written(p, written);
        }
    }

    /// [`Tracker::preserve_read`] for a caller that writes the spill itself
    /// (on its ring): what memory takes is kept at once; if chunks go to
    /// the spill, the preservation is answered, its writes still owed:
    /// write [`Preservation::spill_writes`] into [`Tracker::spill_file`]
    /// and hand the results to [`Tracker::spill_written`]. Until then the
    /// writes into its chunks wait. Dropped before that (its queue going
    /// down), its chunks fail and its slots are not used again: a write
    /// may still be in flight into them.
    pub fn store_read(
        &self,
        mut p: Preservation,
        reads: Vec<std::io::Result<AlignedBuf>>,
    ) -> Option<Preservation> {
        let mut live = lock(&self.live);
        p.store(&mut live, reads);
        if p.spilling.is_empty() {
            p.finish(&mut live, Vec::new());
            return None;
        }
        Some(p)
    }

    /// The file a request writes its chunks to ([`Tracker::store_read`]),
    /// made if there is none yet.
    pub fn spill_file(&self) -> std::io::Result<Arc<File>> {
        self.spill.file()
    }

    /// Hand back the spill writes of a preservation
    /// ([`Tracker::store_read`]): `written[i]` is how
    /// [`Preservation::spill_writes`]'s `i`th write went. Writes waiting
    /// for its chunks go on; those whose write failed break the epochs
    /// that needed them.
    pub fn spill_written(&self, mut p: Preservation, written: Vec<std::io::Result<()>>) {
        let mut live = lock(&self.live);
        p.finish(&mut live, written);
    }

    fn prepare(&self, req: &Request, reader: bool) -> std::result::Result<Prepared, Errno> {
        let kind = match req.op {
            Op::Write => ChangeKind::Data,
            Op::Discard | Op::WriteZeroes => ChangeKind::Zeroed,
            Op::Flush => {
                self.flushed.store(true, Ordering::Release);
                if self.seal_requested.load(Ordering::Acquire) != 0 {
                    let mut live = lock(&self.live);
                    let asked = self.seal_requested.swap(0, Ordering::AcqRel);
                    if asked != 0 && asked == live.epochs.current() {
                        self.seal_locked(&mut live, true);
                    }
                }
                return Ok(Prepared::Go(None));
            }
            Op::Read => return Ok(Prepared::Go(None)),
        };
        if req.len == 0 {
            return Ok(Prepared::Go(None));
        }
        let range = req.offset..req.offset + req.len;
        let first = range.start >> self.region_shift;
        let last = ((range.end - 1) >> self.region_shift).min(self.regions - 1);
        loop {
            if !(first..=last).all(|r| self.is_durable(r)) {
                self.mark(first..=last)?;
            }
            let mut live = lock(&self.live);
            // A release may have cleared a region between the mark and
            // here; under this lock it cannot any more.
            if !(first..=last).all(|r| self.is_durable(r)) {
                continue;
            }
            let chunks = live.epochs.to_preserve(range.clone());
            if !chunks.is_empty() {
                let cut = live.epochs.current() - 1;
                let bytes = chunks.len() as u64 * CHUNK;
                if reader
                    && live.reading + bytes <= READ_BUDGET
                    && chunks.iter().all(|c| !live.preserving.contains(c))
                {
                    for &c in &chunks {
                        live.preserving.insert(c);
                    }
                    live.reading += bytes;
                    live.readers += 1;
                    drop(live);
                    self.cow_waits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Prepared::Read(Preservation {
                        cut,
                        chunks,
                        bytes,
                        device_size: self.device_size,
                        live: self.live.clone(),
                        stored: false,
                        spilling: Vec::new(),
                    }));
                }
                // Before anything is noted: a write that cannot wait
                // leaves nothing behind.
                let wake = Arc::new(Wake::new()?);
                let fresh: Vec<u64> = chunks
                    .iter()
                    .copied()
                    .filter(|c| !live.preserving.contains(c))
                    .collect();
                for &c in &fresh {
                    live.preserving.insert(c);
                }
                live.wait_for(&chunks, wake.clone());
                drop(live);
                self.cow_waits.fetch_add(1, Ordering::Relaxed);
                // In jobs of at most one read each (a discard may span a
                // GiB): a preserver's batch stays within MAX_EPOCH_READ.
                for job in fresh.chunks((MAX_EPOCH_READ / CHUNK) as usize) {
                    self.jobs.push(Preservation {
                        cut,
                        chunks: job.to_vec(),
                        bytes: 0,
                        device_size: self.device_size,
                        live: self.live.clone(),
                        stored: false,
                        spilling: Vec::new(),
                    });
                }
                return Ok(Prepared::Wait(wake));
            }
            live.epochs.record(kind, range.clone(), now_ms());
            let ticket = live.next_ticket;
            live.next_ticket += 1;
            live.in_flight.insert(ticket, (kind, range));
            return Ok(Prepared::Go(Some(Ticket(ticket))));
        }
    }

    /// A write-class request completed (successfully or not).
    pub fn after_write(&self, ticket: Ticket) {
        lock(&self.live).in_flight.remove(&ticket.0);
    }

    fn is_durable(&self, r: u64) -> bool {
        self.durable[(r / 64) as usize].load(Ordering::Acquire) & (1 << (r % 64)) != 0
    }

    fn mark(&self, regions: std::ops::RangeInclusive<u64>) -> std::result::Result<(), Errno> {
        // Whoever holds the lock marks what it needs; a queue that waited
        // for the lock usually finds its regions marked by then.
        let mut journal = lock(&self.journal);
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

    fn seal_locked(&self, live: &mut Live, at_flush: bool) -> u64 {
        // Whatever seal was asked for is answered by this cut.
        self.seal_requested.store(0, Ordering::Release);
        self.flushed.store(false, Ordering::Release);
        let now = now_ms();
        let id = live.epochs.seal(at_flush, now);
        self.carry_in_flight(live, now);
        self.sealed.notify_all();
        tracing::debug!(epoch = id, at_flush, "epoch sealed");
        id
    }

    /// Seal the current epoch as a pre-copy round (see
    /// [`Epochs::seal_precopy`] and [`crate::replicator`]): no cut, no
    /// copy-on-write; it reads as the live device. What is written from
    /// now on is recorded in the next epoch, and so is every write in
    /// flight now (it may land after a round reads its blocks). The
    /// number is recorded in the journal first, as for [`Tracker::seal`].
    pub fn seal_precopy(&self) -> Result<u64> {
        loop {
            let start = lock(&self.live).epochs.current();
            lock(&self.journal).set_sealed(start)?;
            let mut live = lock(&self.live);
            if live.epochs.current() != start {
                continue;
            }
            self.flushed.store(false, Ordering::Release);
            // A seal waiting for a FLUSH meant to cut `start`, sealed now:
            // it tries again, recording the next number first.
            let _ =
                self.seal_requested
                    .compare_exchange(start, 0, Ordering::AcqRel, Ordering::Acquire);
            let now = now_ms();
            let id = live.epochs.seal_precopy(now);
            self.carry_in_flight(&mut live, now);
            // A seal waiting for a FLUSH looks again (this was no cut).
            self.sealed.notify_all();
            tracing::debug!(epoch = id, "pre-copy round sealed");
            return Ok(id);
        }
    }

    fn carry_in_flight(&self, live: &mut Live, now: u64) {
        // Writes still in flight may land on either side of the cut: they
        // belong to the next epoch as well, so that their final content is
        // shipped with it.
        for (kind, range) in live.in_flight.values() {
            live.epochs.record_carried(*kind, range.clone(), now);
        }
    }

    /// Seal the current epoch and return its number. With
    /// [`SealAt::Flush`], the cut is taken at the next FLUSH the device
    /// serves, or at the deadline (then at that instant). If another seal
    /// cuts the epoch meanwhile, that cut is the answer (a pre-copy round
    /// sealed meanwhile is no cut: the next epoch is sealed instead). The
    /// number is recorded in the journal first, so that no later run
    /// reuses it.
    pub fn seal(&self, at: SealAt) -> Result<u64> {
        let deadline = match at {
            SealAt::Now => None,
            SealAt::Flush(wait) => Some(Instant::now() + wait),
        };
        loop {
            if let Some(id) = self.seal_once(deadline)? {
                return Ok(id);
            }
        }
    }

    /// One attempt of [`Tracker::seal`]: `None` when the epoch it meant to
    /// cut became a pre-copy round meanwhile.
    fn seal_once(&self, deadline: Option<Instant>) -> Result<Option<u64>> {
        let start = lock(&self.live).epochs.current();
        lock(&self.journal).set_sealed(start)?;
        let mut live = lock(&self.live);
        let cut_by_another = |live: &Live| {
            let precopy = live.epochs.get(start).is_ok_and(|s| s.precopy);
            (!precopy).then_some(start)
        };
        if live.epochs.current() != start {
            return Ok(cut_by_another(&live));
        }
        let Some(deadline) = deadline else {
            return Ok(Some(self.seal_locked(&mut live, false)));
        };
        // Set under the lock while `start` is current: the FLUSH that
        // answers it seals exactly `start`, whose number is recorded.
        self.seal_requested.store(start, Ordering::Release);
        let answer = loop {
            if live.epochs.current() > start {
                break cut_by_another(&live);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Some(self.seal_locked(&mut live, false));
            }
            live = self
                .sealed
                .wait_timeout(live, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        // However it was answered (a pre-copy round sealed `start` too),
        // no FLUSH may cut for it any more; a later seal's request (for a
        // later epoch) stays.
        let _ = self
            .seal_requested
            .compare_exchange(start, 0, Ordering::AcqRel, Ordering::Acquire);
        Ok(answer)
    }

    /// Release the oldest sealed epoch, `id`: the consumer has durably
    /// taken it. The backing file is synced first (what the consumer took
    /// must also be durable here), then the epoch's preserved chunks are
    /// freed and the regions no unreleased change touches are cleared in
    /// the journal. Releasing an epoch released before does nothing.
    pub fn release(&self, id: u64) -> Result<Released> {
        self.release_keeping(id, Duration::ZERO)
    }

    /// [`Tracker::release`], but while the device goes on writing, the
    /// regions that epochs released in the last `hot` changed stay marked
    /// in the journal (this one's too), as DRBD's activity log keeps its
    /// hot extents: a device that writes where it just wrote then does not
    /// wait for a journal sync to mark them again after every release.
    /// They are cleared by a later release once `hot` has passed, or by
    /// the first release that finds nothing written since the cut (a quiet
    /// device keeps nothing marked). Only a crash meanwhile pays: its
    /// resync compares them with the mirror by hash. Keeping a region
    /// marked longer is always safe: the journal's promise is only that
    /// every change is in a marked region.
    pub fn release_keeping(&self, id: u64, hot: Duration) -> Result<Released> {
        if !self.backing_failed.load(Ordering::SeqCst) {
            if let Err(e) = self.file.sync_data() {
                // The error is reported once: a sync tried again would
                // answer Ok over data that never reached the disk. From
                // now on epochs are released (mirroring goes on) but no
                // region is cleared: a restart compares them all with the
                // mirror.
                self.backing_failed.store(true, Ordering::SeqCst);
                tracing::error!(
                    "syncing the backing file failed ({e}): what was written may not be on the disk; no journal region is cleared until the daemon restarts and compares them with the mirror"
                );
            }
        }
        let keep_all = self.backing_failed.load(Ordering::SeqCst);
        let mut journal = lock(&self.journal);
        let (released, clear, resync_done) = {
            let mut live = lock(&self.live);
            let Some(sealed) = live.epochs.release(id)? else {
                return Ok(Released {
                    epoch: id,
                    released: false,
                    regions_cleared: 0,
                    resync_done: false,
                });
            };
            let now = now_ms();
            let hot = if live.epochs.changes().is_empty() {
                Duration::ZERO
            } else {
                hot
            };
            if !hot.is_zero() {
                // Whole regions: a few ranges however scattered the writes.
                let size = self.region_size();
                let mut regions = RangeSet::new();
                for r in sealed.changes.touched().iter() {
                    regions.insert(r.start / size * size..r.end.div_ceil(size) * size);
                }
                live.recent.push_back((now, regions));
            }
            let clear = if keep_all {
                Vec::new()
            } else {
                self.cold_regions(&mut live, hot, now)
            };
            // Settled when the last epoch carrying resync ranges is taken.
            let resync_done = !keep_all
                && self.resync_pending.load(Ordering::Relaxed)
                && !live.epochs.resync_outstanding();
            (true, clear, resync_done)
        };
        journal.set_released(id, resync_done)?;
        journal.clear(clear.iter().copied())?;
        if resync_done {
            self.resync_pending.store(false, Ordering::Relaxed);
        }
        tracing::debug!(id, cleared = clear.len(), "epoch released");
        Ok(Released {
            epoch: id,
            released,
            regions_cleared: clear.len() as u64,
            resync_done,
        })
    }

    /// Forget the releases older than `hot`, then take out of the
    /// durable bits (and return) the regions that are marked while no
    /// unreleased change and no recent release touches them (with `hot`
    /// zero: every release is old). From then a write into one marks it
    /// again (and waits for the journal lock, so after the caller clears
    /// them). The caller holds the journal lock.
    fn cold_regions(&self, live: &mut Live, hot: Duration, now: u64) -> Vec<u64> {
        let hot_ms = u64::try_from(hot.as_millis()).unwrap_or(u64::MAX);
        while live
            .recent
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) >= hot_ms)
        {
            live.recent.pop_front();
        }
        let mut keep = live.epochs.unreleased();
        for (_, touched) in &live.recent {
            keep.union_with(touched);
        }
        let size = self.region_size();
        let clear: Vec<u64> = (0..self.regions)
            .filter(|&r| self.is_durable(r) && !keep.intersects(r * size..(r + 1) * size))
            .collect();
        for &r in &clear {
            self.durable[(r / 64) as usize].fetch_and(!(1 << (r % 64)), Ordering::AcqRel);
        }
        clear
    }

    /// A sealed, unreleased epoch's changes.
    pub fn epoch(&self, id: u64) -> Result<Sealed> {
        Ok(lock(&self.live).epochs.get(id)?.clone())
    }

    /// Read `buf.len()` bytes at `offset` as the device was at epoch `id`'s
    /// cut. The range must lie in chunks the epoch changed ([`CHUNK`]s
    /// meeting its data, zeroed or resync ranges).
    pub fn read_epoch(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_cut(id, offset, buf, false)
    }

    /// [`Tracker::read_epoch`], by the epoch's consumer for the last time:
    /// from then on the range needs nothing preserved for this epoch
    /// (writes into it no longer wait for copy-on-write), and reading it
    /// again as the cut is refused ([`EpochError::Taken`]). See
    /// [`crate::epoch::Epochs::take`] for why the cut is kept all the same.
    pub fn take_epoch(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_cut(id, offset, buf, true)
    }

    fn read_cut(&self, id: u64, offset: u64, buf: &mut [u8], take: bool) -> Result<()> {
        let check = |live: &Live| {
            live.epochs
                .check_read(id, offset..offset + buf.len() as u64)
        };
        check(&lock(&self.live))?;
        // The file first, then the preserved versions: a write racing
        // with this read preserved its chunk before it was issued.
        let mut aligned = AlignedBuf::zeroed(buf.len().max(1));
        let bytes = &mut aligned.as_mut_slice()[..buf.len()];
        self.file
            .read_exact_at(bytes, offset)
            .map_err(|e| Error::io("reading the backing file for an epoch", e))?;
        {
            let mut live = lock(&self.live);
            check(&live)?;
            live.epochs
                .overlay(id, offset, bytes)
                .map_err(|e| Error::io("reading preserved chunks", e))?;
            if take {
                // Under the same lock: a write into these chunks after this
                // is no longer held back, and the bytes read were the cut's.
                live.epochs.take(id, offset..offset + buf.len() as u64)?;
            }
        }
        buf.copy_from_slice(bytes);
        Ok(())
    }

    /// The parts of `within` that read as zeroes at epoch `id`'s cut,
    /// found without reading a byte: holes of the backing file in chunks
    /// nothing was preserved of since the cut. `within` must lie in what
    /// the epoch changed (as for [`Tracker::read_epoch`]).
    ///
    /// Why it is the cut: the file is asked first, then the preserved
    /// versions. A write after the cut into a chunk the epoch changed
    /// preserves the chunk before it is issued; if it came before the file
    /// was asked, its chunk is found preserved and taken out; if after,
    /// the hole the file showed was still the cut's. A chunk the epoch's
    /// consumer took already is not preserved by later writes, so a hole
    /// there says nothing of the cut: never one (asked again, the block
    /// is refused as taken, and the epoch goes as a pre-copy round).
    pub fn holes_at_cut(&self, id: u64, within: &RangeSet) -> Result<RangeSet> {
        let mut holes = RangeSet::new();
        for r in within.iter() {
            for h in fsutil::holes(&self.file, r) {
                holes.insert(h);
            }
        }
        let live = lock(&self.live);
        if live.epochs.get(id)?.broken.is_some() {
            // A chunk it could not preserve may be a hole now: no hole is
            // known (reading the epoch says it is broken).
            return Ok(RangeSet::new());
        }
        let mut preserved = RangeSet::new();
        for h in holes.iter() {
            preserved.union_with(&live.epochs.preserved(id, h));
        }
        holes.subtract(&preserved);
        holes.subtract(&live.epochs.get(id)?.taken);
        Ok(holes)
    }

    /// Mark every region and make the whole device the current epoch's
    /// resync ranges: for a mirror that cannot be trusted to hold the
    /// device's past (a new volume, another server, an older image). Durable
    /// before it returns.
    pub fn resync_all(&self) -> Result<()> {
        let mut journal = lock(&self.journal);
        journal.mark_all()?;
        for r in 0..self.regions {
            self.durable[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::Release);
        }
        let mut live = lock(&self.live);
        live.epochs.resync_all(now_ms());
        self.resync_pending.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The directory of the journal (and of other per-device state).
    pub fn state_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    /// Make sealed epoch `id` a pre-copy round: it is no longer read as
    /// its cut, nothing more is preserved for it, and it reads as the
    /// device is now (what it kept stays until it is released). For a cut
    /// that could not end a pre-copy run and was sent as a round, and for
    /// cuts the mirror stayed out of reach too long for.
    pub fn demote(&self, id: u64) -> Result<()> {
        lock(&self.live).epochs.demote(id)?;
        Ok(())
    }

    /// The sealed, unreleased epochs, oldest first, and whether each is a
    /// pre-copy round.
    pub fn sealed_epochs(&self) -> Vec<(u64, bool)> {
        lock(&self.live)
            .epochs
            .sealed()
            .map(|s| (s.id, s.precopy))
            .collect()
    }

    /// Bytes the current epoch changed so far (data, zeroed and resync
    /// ranges together): what sealing it now would ship at most.
    pub fn current_change_bytes(&self) -> u64 {
        lock(&self.live).epochs.changes().touched().len()
    }

    /// Read `buf.len()` bytes at `offset` of the device as it is now (the
    /// backing file): for pre-copy rounds.
    pub fn read_live(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.device_size {
            return Err(Error::Epoch(EpochError::OutsideEpoch {
                id: 0,
                start: offset,
                end: offset.saturating_add(buf.len() as u64),
            }));
        }
        let mut aligned = AlignedBuf::zeroed(buf.len().max(1));
        let bytes = &mut aligned.as_mut_slice()[..buf.len()];
        self.file
            .read_exact_at(bytes, offset)
            .map_err(|e| Error::io("reading the backing file for a pre-copy round", e))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    /// Read as [`Tracker::read_epoch`] where epoch `id` changed, and as
    /// the device is now ([`Tracker::read_live`]) elsewhere: for the cut
    /// that ends a pre-copy run, which also sends what the server lost of
    /// earlier rounds (and then becomes a round itself). A broken epoch
    /// still fails.
    ///
    /// The first read elsewhere demotes the epoch ([`Tracker::demote`])
    /// before it reads: bytes read as the device is now are not the cut's,
    /// and a server that staged them must never publish them as the cut,
    /// also when the answer that made the epoch a round is lost and the
    /// epoch is sent again (it then goes as a round, read live, and
    /// another cut follows). What was read as the cut before stands for a
    /// round as well: any write after the cut is in a later epoch.
    pub fn read_cut_or_live(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.read_epoch(id, offset, buf) {
            Err(Error::Epoch(EpochError::OutsideEpoch { .. })) => {
                self.demote(id)?;
                self.read_live(offset, buf)
            }
            other => other,
        }
    }

    /// The oldest sealed, unreleased epoch.
    pub fn oldest_sealed(&self) -> Option<u64> {
        lock(&self.live).epochs.sealed().next().map(|s| s.id)
    }

    /// Journal syncs made to mark regions so far (as in
    /// [`Tracker::status`], without building the rest of it).
    pub fn journal_syncs(&self) -> u64 {
        self.journal_syncs.load(Ordering::Relaxed)
    }

    /// How many times a write was held back for copy-on-write.
    pub fn cow_waits(&self) -> u64 {
        self.cow_waits.load(Ordering::Relaxed)
    }

    /// Whether the device served a FLUSH since the last cut or pre-copy
    /// round. A device that did not (a raw writer, a database on
    /// `O_DIRECT` without `fsync`) is not expected to flush soon, so a cut
    /// that waited for one would only add lag.
    pub fn flushed_since_cut(&self) -> bool {
        self.flushed.load(Ordering::Acquire)
    }

    /// Whether the current epoch has any change (a seal would not be empty).
    pub fn has_changes(&self) -> bool {
        !lock(&self.live).epochs.changes().is_empty()
    }

    /// The epoch every change recorded so far lies in or before: the
    /// current one if it has changes, else the newest sealed one. Once it
    /// is released, all of them are on the mirror.
    /// The current (open) epoch's number: every epoch sealed from now on
    /// has at least this number.
    pub fn current_epoch(&self) -> u64 {
        lock(&self.live).epochs.current()
    }

    pub fn sync_target(&self) -> u64 {
        let live = lock(&self.live);
        let current = live.epochs.current();
        if live.epochs.changes().is_empty() {
            current - 1
        } else {
            current
        }
    }

    /// For a `sync` that began with `target` ([`Tracker::sync_target`]):
    /// the last released epoch, and the epoch it waits for now, `target`
    /// or a later one that holds the changes of a broken epoch up to it
    /// ([`crate::epoch::Epochs::carried_target`]); read together, so that
    /// a broken epoch's release is never seen without where its changes
    /// went.
    pub fn sync_progress(&self, target: u64) -> (u64, u64) {
        let live = lock(&self.live);
        (live.epochs.released(), live.epochs.carried_target(target))
    }

    /// The last released epoch.
    pub fn released_epoch(&self) -> u64 {
        lock(&self.live).epochs.released()
    }

    /// When the oldest change not released yet was recorded (ms since
    /// the Unix epoch), if any.
    pub fn oldest_change_ms(&self) -> Option<u64> {
        lock(&self.live).epochs.oldest_change_ms()
    }

    /// The changes of the current epoch so far.
    pub fn changes(&self) -> Changes {
        lock(&self.live).epochs.changes().clone()
    }

    /// Regions marked in the journal, ascending.
    pub fn marked_regions(&self) -> Vec<u64> {
        (0..self.regions).filter(|&r| self.is_durable(r)).collect()
    }

    /// Bytes per region.
    pub fn region_size(&self) -> u64 {
        1 << self.region_shift
    }

    /// Device size in bytes.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// The state `status` shows.
    pub fn status(&self) -> TrackingStatus {
        // Not the journal lock: writes do not wait for a status.
        let (dirty, zeroed, resync, current, released, sealed, usage, waiting) = {
            let live = lock(&self.live);
            let e = &live.epochs;
            let mut all = e.changes().clone();
            for s in e.sealed() {
                all.data.union_with(&s.changes.data);
                all.zeroed.union_with(&s.changes.zeroed);
                all.resync.union_with(&s.changes.resync);
            }
            (
                all.data.len(),
                all.zeroed.len(),
                all.resync.len(),
                e.current(),
                e.released(),
                e.sealed().map(EpochInfo::of).collect::<Vec<_>>(),
                e.store_usage(),
                live.waiting.len() as u64 + live.readers,
            )
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
            dirty_bytes: dirty,
            zeroed_bytes: zeroed,
            resync_bytes: resync,
            resync_pending: self.resync_pending.load(Ordering::Relaxed),
            current_epoch: current,
            oldest_unreleased_epoch: sealed.first().map(|s| s.id),
            released_epoch: released,
            sealed,
            preserved_memory_bytes: usage.memory_bytes,
            preserved_spilled_bytes: usage.spilled_bytes,
            writes_waiting_for_cow: waiting,
            cow_waits: self.cow_waits.load(Ordering::Relaxed),
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
            .map(|r| r * size..((r + 1) * size).min(self.device_size))
            .collect()
    }

    /// Record a clean stop; call after the backing file was synced.
    pub fn close_clean(&self) -> Result<()> {
        lock(&self.journal).set_state(State::Clean)
    }
}

impl ChangeTracking for Tracker {
    fn before_write(&self, req: &Request) -> std::result::Result<Option<Ticket>, Errno> {
        Tracker::before_write(self, req)
    }

    fn after_write(&self, ticket: Ticket) {
        Tracker::after_write(self, ticket);
    }
}

impl From<EpochError> for Error {
    fn from(e: EpochError) -> Error {
        Error::Epoch(e)
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

/// The [`Spill`] of a device's preserved chunks: an unnamed file in the
/// state directory, created when the first chunk spills and dropped (its
/// space given back) when no chunk is left in it. Its writers hold the
/// inner lock only to find (or make) the file, never while writing.
#[derive(Debug)]
struct SpillFile {
    dir: PathBuf,
    file: Mutex<Option<Arc<File>>>,
    /// Tests hold its writes here.
    #[cfg(test)]
    gate: tests::Gate,
}

impl SpillFile {
    fn new(dir: &Path) -> SpillFile {
        SpillFile {
            dir: dir.to_path_buf(),
            file: Mutex::new(None),
            #[cfg(test)]
            gate: tests::Gate::default(),
        }
    }

    /// Where slot `slot` is in the file.
    fn at(slot: u64) -> u64 {
        slot * CHUNK
    }

    /// The spill file, made by the first write.
    fn file(&self) -> std::io::Result<Arc<File>> {
        let mut file = lock(&self.file);
        if let Some(f) = &*file {
            return Ok(f.clone());
        }
        let f = Arc::new(tempfile::tempfile_in(&self.dir)?);
        tracing::info!(dir = %self.dir.display(), "preserved chunks spill to a file");
        *file = Some(f.clone());
        Ok(f)
    }
}

impl Spill for SpillFile {
    fn write(&self, first: u64, data: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        self.gate.pass()?;
        self.file()?.write_all_at(data, SpillFile::at(first))
    }

    fn read(&self, slot: u64, out: &mut [u8]) -> std::io::Result<()> {
        let file = lock(&self.file)
            .clone()
            .ok_or_else(|| std::io::Error::other("a spilled chunk without a spill file"))?;
        file.read_exact_at(out, SpillFile::at(slot))
    }

    fn clear(&self) {
        *lock(&self.file) = None;
    }
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
        fsutil::sync_dir(p).map_err(|e| sync_dir_failed(p, e))?;
        d = p.parent().filter(|p| !p.as_os_str().is_empty());
    }
    Ok(())
}

/// The error of a failed directory sync.
fn sync_dir_failed(dir: &Path, e: std::io::Error) -> Error {
    Error::io(format!("cannot sync directory {}", dir.display()), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BACKING: (&str, u64) = ("/x/disk.img", 42);

    fn open(dir: &Path, history: History) -> Result<(Tracker, Option<OpenReport>)> {
        open_with(dir, history, DEFAULT_COW_MEMORY)
    }

    fn open_with(
        dir: &Path,
        history: History,
        cow_memory: u64,
    ) -> Result<(Tracker, Option<OpenReport>)> {
        // The backing file goes inside the test's temporary state directory,
        // so that it goes with it; beside a state directory that a test left
        // out (inside that test's own temporary directory).
        let backing = if dir.is_dir() {
            dir.join("backing.img")
        } else {
            dir.with_extension("img")
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(backing)
            .unwrap();
        file.set_len(64 * MIB).unwrap();
        Tracker::open(&TrackerOptions {
            state_dir: dir,
            identity: (Path::new(BACKING.0), BACKING.1),
            file: &file,
            device_size: 64 * MIB,
            region_size: MIB,
            history,
            cow_memory,
        })
    }

    fn tracker(dir: &Path) -> Tracker {
        open(dir, History::NewFile).unwrap().0
    }

    /// A request issued and completed.
    fn apply(t: &Tracker, req: &Request) {
        if let Some(ticket) = t.before_write(req).unwrap() {
            t.after_write(ticket);
        }
    }

    fn epoch_bytes(t: &Tracker, id: u64, range: Range<u64>) -> Vec<u8> {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        t.read_epoch(id, range.start, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_sealed_epoch_reads_as_the_device_at_its_cut() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        let disk = t.file.try_clone().unwrap();
        disk.write_all_at(&[1; 8192], 0).unwrap();
        apply(&t, &Request::write(0, 8192));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 1);
        // Overwrite after the cut: the old content is preserved first.
        apply(&t, &Request::write(4096, 4096));
        disk.write_all_at(&[2; 4096], 4096).unwrap();
        assert_eq!(epoch_bytes(&t, 1, 0..8192), vec![1; 8192]);
        let s = t.status();
        assert_eq!((s.current_epoch, s.oldest_unreleased_epoch), (2, Some(1)));
        assert_eq!(s.preserved_memory_bytes, CHUNK);
        // Outside what the epoch changed, or an epoch that is not sealed.
        let mut buf = [0u8; 512];
        assert!(t.read_epoch(1, 8192, &mut buf).is_err());
        assert!(t.read_epoch(2, 0, &mut buf).is_err());
        // A second cut, then releasing the first: epoch 2 still reads its cut.
        assert_eq!(t.seal(SealAt::Now).unwrap(), 2);
        apply(&t, &Request::new(Op::Discard, 4096, 4096));
        disk.write_all_at(&[0; 4096], 4096).unwrap();
        let released = t.release(1).unwrap();
        assert!(released.released);
        assert_eq!(
            released.regions_cleared, 0,
            "region 0 is still changed by epoch 2"
        );
        assert_eq!(epoch_bytes(&t, 2, 4096..8192), vec![2; 4096]);
        assert!(
            t.read_epoch(1, 0, &mut buf).is_err(),
            "a released epoch read"
        );
    }

    #[test]
    fn release_clears_the_regions_no_later_change_touches() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        apply(&t, &Request::write(0, 4096));
        apply(&t, &Request::write(5 * MIB, 4096));
        t.seal(SealAt::Now).unwrap();
        apply(&t, &Request::write(5 * MIB + 8192, 4096));
        let r = t.release(1).unwrap();
        assert_eq!(r.regions_cleared, 1);
        assert_eq!(t.marked_regions(), vec![5]);
        // A write into the cleared region marks it again.
        apply(&t, &Request::write(100, 10));
        assert_eq!(t.marked_regions(), vec![0, 5]);
        drop(t);
        // The journal on disk agrees, and epoch numbers go on.
        let (t, _) = open(dir.path(), History::Recovering).unwrap();
        assert_eq!(t.marked_regions(), vec![0, 5]);
        assert_eq!(t.status().current_epoch, 2);
        assert_eq!(t.status().released_epoch, 1);
    }

    #[test]
    fn a_cut_at_a_flush_and_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let t = std::sync::Arc::new(tracker(dir.path()));
        let t2 = t.clone();
        let sealer =
            std::thread::spawn(move || t2.seal(SealAt::Flush(Duration::from_secs(60))).unwrap());
        while t.seal_requested.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        apply(&t, &Request::write(0, 4096));
        apply(&t, &Request::flush());
        apply(&t, &Request::write(8192, 4096));
        assert_eq!(sealer.join().unwrap(), 1);
        let e = t.epoch(1).unwrap();
        assert!(e.at_flush);
        assert_eq!(e.changes.data.iter().collect::<Vec<_>>(), vec![0..4096]);
        // No FLUSH comes: the cut is taken at the deadline.
        assert_eq!(t.seal(SealAt::Flush(Duration::from_millis(10))).unwrap(), 2);
        assert!(!t.epoch(2).unwrap().at_flush);
        assert_eq!(t.epoch(2).unwrap().changes.data.len(), 4096);
    }

    /// A seal waiting for a FLUSH whose epoch a pre-copy round sealed
    /// meanwhile asks no more: a FLUSH then cuts nothing until it asks
    /// again, having recorded the next number in the journal first.
    #[test]
    fn a_seal_overtaken_by_a_pre_copy_round_leaves_no_request_behind() {
        let dir = tempfile::tempdir().unwrap();
        let t = std::sync::Arc::new(tracker(dir.path()));
        apply(&t, &Request::write(0, 4096));
        let t2 = t.clone();
        let waiting = std::thread::spawn(move || {
            t2.seal_once(Some(Instant::now() + Duration::from_secs(60)))
                .unwrap()
        });
        while t.seal_requested.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        assert_eq!(t.seal_precopy().unwrap(), 1);
        assert_eq!(t.seal_requested.load(Ordering::Acquire), 0);
        assert_eq!(waiting.join().unwrap(), None, "a round is no cut");
        apply(&t, &Request::write(8192, 4096));
        apply(&t, &Request::flush());
        assert_eq!(
            t.current_epoch(),
            2,
            "a FLUSH cut an epoch nobody asked for"
        );
        assert_eq!(t.seal(SealAt::Flush(Duration::from_millis(10))).unwrap(), 2);
    }

    #[test]
    fn regions_of_recent_releases_stay_marked_while_the_device_writes_on() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        let region = t.region_size();
        let hour = Duration::from_secs(3600);
        apply(&t, &Request::write(0, 4096));
        apply(&t, &Request::write(3 * region, 4096));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 1);
        apply(&t, &Request::write(5 * region, 4096));
        // The device writes on: epoch 1's regions are hot, none cleared.
        let r = t.release_keeping(1, hour).unwrap();
        assert!(r.released);
        assert_eq!(r.regions_cleared, 0);
        assert_eq!(t.marked_regions(), vec![0, 3, 5]);
        // Writing there again costs no journal sync.
        let syncs = t.status().journal_syncs;
        apply(&t, &Request::write(0, 4096));
        assert_eq!(t.status().journal_syncs, syncs);
        assert_eq!(t.seal(SealAt::Now).unwrap(), 2);
        apply(&t, &Request::write(7 * region, 4096));
        // Once `hot` has passed, epoch 1's region 3 (written by no later
        // epoch) is cleared; epoch 2's stay, the device still writing.
        std::thread::sleep(Duration::from_millis(30));
        let r = t.release_keeping(2, Duration::from_millis(20)).unwrap();
        assert_eq!(r.regions_cleared, 1);
        assert_eq!(t.marked_regions(), vec![0, 5, 7]);
        // A release that finds nothing written since the cut keeps
        // nothing marked.
        assert_eq!(t.seal(SealAt::Now).unwrap(), 3);
        let r = t.release_keeping(3, hour).unwrap();
        assert_eq!(r.regions_cleared, 3);
        assert!(t.marked_regions().is_empty());
        // A plain release keeps nothing either.
        apply(&t, &Request::write(region, 4096));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 4);
        apply(&t, &Request::write(2 * region, 4096));
        t.release(4).unwrap();
        assert_eq!(t.marked_regions(), vec![2]);
    }

    #[test]
    fn the_tracker_knows_whether_the_device_flushed_since_the_last_cut() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        assert!(!t.flushed_since_cut());
        apply(&t, &Request::write(0, 4096));
        assert!(!t.flushed_since_cut(), "a write is no FLUSH");
        apply(&t, &Request::flush());
        assert!(t.flushed_since_cut());
        t.seal(SealAt::Now).unwrap();
        assert!(!t.flushed_since_cut(), "a cut starts over");
        apply(&t, &Request::flush());
        t.seal_precopy().unwrap();
        assert!(!t.flushed_since_cut(), "so does a pre-copy round");
        // A FLUSH that takes the cut asked for is the cut's, not the next
        // epoch's.
        apply(&t, &Request::write(0, 4096));
        let t = std::sync::Arc::new(t);
        let t2 = t.clone();
        let sealer =
            std::thread::spawn(move || t2.seal(SealAt::Flush(Duration::from_secs(60))).unwrap());
        while t.seal_requested.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        apply(&t, &Request::flush());
        sealer.join().unwrap();
        assert!(!t.flushed_since_cut());
    }

    #[test]
    fn writes_in_flight_at_the_cut_belong_to_the_next_epoch_too() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        let ticket = t.before_write(&Request::write(0, 4096)).unwrap().unwrap();
        t.seal(SealAt::Now).unwrap();
        // Its content may land after the cut: epoch 2 ships it again.
        assert_eq!(t.changes().data.iter().collect::<Vec<_>>(), vec![0..4096]);
        t.after_write(ticket);
        t.seal(SealAt::Now).unwrap();
        assert!(t.changes().is_empty());
        // A later write into the chunk still preserves it for epoch 2.
        let disk = t.file.try_clone().unwrap();
        disk.write_all_at(&[7; 4096], 0).unwrap();
        apply(&t, &Request::write(0, 512));
        disk.write_all_at(&[8; 512], 0).unwrap();
        assert_eq!(epoch_bytes(&t, 2, 0..4096), vec![7; 4096]);
    }

    #[test]
    fn a_pre_copy_round_reads_the_device_as_it_is_and_never_makes_writes_wait() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        let disk = t.file.try_clone().unwrap();
        apply(&t, &Request::write(0, 8192));
        disk.write_all_at(&[1; 8192], 0).unwrap();
        let in_flight = t
            .before_write(&Request::write(8192, 4096))
            .unwrap()
            .unwrap();
        let round = t.seal_precopy().unwrap();
        assert!(t.status().sealed[0].precopy);
        // The write in flight may land after the round reads: the next
        // epoch has it too.
        assert_eq!(
            t.changes().data.iter().collect::<Vec<_>>(),
            vec![8192..12288]
        );
        t.after_write(in_flight);
        // Writes into what the round changed go at once (no copy kept).
        assert!(matches!(
            t.prepare_write_leaving_reads(&Request::write(0, 4096))
                .unwrap(),
            Prepared::Go(Some(_))
        ));
        disk.write_all_at(&[2; 4096], 0).unwrap();
        assert_eq!(t.status().preserved_memory_bytes, 0);
        // It reads as the device is now, anywhere.
        let mut now = vec![0u8; 8192];
        t.read_epoch(round, 0, &mut now).unwrap();
        assert_eq!(&now[..4096], &[2; 4096][..]);
        assert_eq!(&now[4096..], &[1; 4096][..]);
        let mut far = vec![9u8; 4096];
        t.read_epoch(round, 1 << 20, &mut far).unwrap();
        assert_eq!(far, vec![0; 4096]);
        // The cut that ends the run reads its own changes at the cut, and
        // elsewhere the device as it is.
        let cut = t.seal(SealAt::Now).unwrap();
        apply(&t, &Request::write(0, 4096));
        disk.write_all_at(&[3; 4096], 0).unwrap();
        let mut at = vec![0u8; 4096];
        t.read_cut_or_live(cut, 0, &mut at).unwrap();
        assert_eq!(at, vec![2; 4096]);
        assert_eq!(t.sealed_epochs(), vec![(round, true), (cut, false)]);
        t.read_cut_or_live(cut, 4096, &mut at).unwrap();
        assert_eq!(at, vec![1; 4096]);
        // Read live elsewhere, it is no longer a cut (a server may have
        // staged those bytes): a round, read live everywhere.
        assert_eq!(t.sealed_epochs(), vec![(round, true), (cut, true)]);
        t.read_cut_or_live(cut, 0, &mut at).unwrap();
        assert_eq!(at, vec![3; 4096]);
    }

    #[test]
    fn marked_regions_at_open_are_resynced_with_the_first_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        apply(&t, &Request::write(3 * MIB, 4096));
        drop(t); // crash
        let (t, _) = open(dir.path(), History::Recovering).unwrap();
        assert_eq!(
            t.changes().resync.iter().collect::<Vec<_>>(),
            vec![3 * MIB..4 * MIB]
        );
        assert!(t.status().resync_pending);
        let id = t.seal(SealAt::Now).unwrap();
        assert_eq!(t.epoch(id).unwrap().changes.resync.len(), MIB);
        let r = t.release(id).unwrap();
        assert!(r.resync_done);
        assert!(!t.status().resync_pending);
        assert!(t.marked_regions().is_empty());
    }

    #[test]
    fn writes_mark_their_regions_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        apply(&t, &Request::write(MIB - 4096, 8192)); // spans regions 0 and 1
        assert_eq!(t.marked_regions(), vec![0, 1]);
        assert_eq!(t.status().journal_syncs, 1);
        for i in 0..100 {
            apply(&t, &Request::write(i * 4096, 4096));
        }
        assert_eq!(
            t.status().journal_syncs,
            1,
            "writes into marked regions synced again"
        );
        apply(&t, &Request::read(10 * MIB, 4096));
        apply(&t, &Request::flush());
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
        apply(&t, &Request::write(0, 16384));
        apply(&t, &Request::new(Op::Discard, 4096, 4096));
        apply(&t, &Request::new(Op::WriteZeroes, 3 * MIB, MIB));
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
        apply(&t, &Request::write(5 * MIB, 4096));
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

    /// A backing file made anew where an earlier one's journal was left
    /// (its state directory kept, the inode number reused): nothing the
    /// journal calls clean holds for it, so every region is marked.
    #[test]
    fn a_new_file_with_an_earlier_files_journal_marks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        apply(&t, &Request::write(0, 4096));
        t.close_clean().unwrap();
        drop(t);
        let (t, report) = open(dir.path(), History::NewFile).unwrap();
        assert!(report.is_some());
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
        apply(&t, &Request::write(0, 4096));
        t.close_clean().unwrap();
        drop(t);
        invalidate(dir.path(), (Path::new(BACKING.0), BACKING.1), 64 * MIB).unwrap();
        let (t, report) = open(dir.path(), History::ExistingFile).unwrap();
        assert!(report.unwrap().unclean);
        assert_eq!(t.marked_regions().len(), 64);
    }

    #[test]
    fn the_spill_file_is_made_when_first_needed_and_dropped_when_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::new(dir.path());
        let mut out = [0u8; CHUNK as usize];
        assert!(spill.read(0, &mut out).is_err(), "read without a file");
        spill.write(3, &[7; CHUNK as usize]).unwrap();
        spill.write(0, &[1; 100]).unwrap();
        spill.read(3, &mut out).unwrap();
        assert_eq!(out, [7; CHUNK as usize]);
        spill.read(0, &mut out[..100]).unwrap();
        assert_eq!(out[..100], [1; 100]);
        // Unnamed: nothing shows in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        spill.clear();
        assert!(spill.read(3, &mut out).is_err(), "a cleared slot read");
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
        assert!(matches!(
            t.before_write(&Request::write(0, 4096)),
            Err(Errno::IO)
        ));
        assert!(t.marked_regions().is_empty());
        assert!(
            t.changes().data.is_empty(),
            "a failed mark still recorded the write"
        );
    }

    /// Holds the spill's writes while set, so that a test sees what waits
    /// for them; a write let through fails if told to (a full disk).
    #[derive(Debug, Default)]
    pub(super) struct Gate {
        state: Mutex<GateState>,
        changed: Condvar,
    }

    #[derive(Debug, Default)]
    struct GateState {
        held: bool,
        fail: bool,
        waiting: u32,
    }

    impl Gate {
        fn set(&self, held: bool, fail: bool) {
            let mut g = lock(&self.state);
            (g.held, g.fail) = (held, fail);
            self.changed.notify_all();
        }

        pub(super) fn pass(&self) -> std::io::Result<()> {
            let mut g = lock(&self.state);
            g.waiting += 1;
            self.changed.notify_all();
            while g.held {
                g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.waiting -= 1;
            if g.fail {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }

        /// Hold the writes until the answer is dropped (a failed test
        /// included: the tracker's drop waits for its preservers).
        fn hold(&self) -> impl Drop + '_ {
            struct Held<'a>(&'a Gate);
            impl Drop for Held<'_> {
                fn drop(&mut self) {
                    self.0.set(false, false);
                }
            }
            self.set(true, false);
            Held(self)
        }

        /// Wait (at most 10 s) for a write held at the gate.
        fn writer_held(&self) {
            let mut g = lock(&self.state);
            let start = Instant::now();
            while g.waiting == 0 {
                assert!(start.elapsed() < Duration::from_secs(10), "no spill write");
                g = self
                    .changed
                    .wait_timeout(g, Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }

    /// A tracker with no memory for preserved chunks (they all spill)
    /// whose device was written with ones over `len` bytes at 0 in epoch
    /// 1, sealed; and its backing file.
    fn sealed_spilling(dir: &Path, len: usize) -> (Tracker, File) {
        let t = open_with(dir, History::NewFile, 0).unwrap().0;
        let disk = t.file.try_clone().unwrap();
        disk.write_all_at(&vec![1; len], 0).unwrap();
        apply(&t, &Request::write(0, len as u64));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 1);
        (t, disk)
    }

    /// `req`, left to the preservers, waits for its chunks, whose spill
    /// write is held at the gate until the first answer is dropped.
    fn spill_held<'a>(t: &'a Tracker, req: &Request) -> (impl Drop + 'a, Arc<Wake>) {
        let held = t.spill.gate.hold();
        let w = waits(t.prepare_write_leaving_reads(req).unwrap());
        t.spill.gate.writer_held();
        (held, w)
    }

    #[test]
    fn a_preserver_writes_the_spill_without_holding_back_other_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_spilling(dir.path(), 16384);
        // No room in memory: a preserver reads chunk 0, reserves a spill
        // slot for it, and writes it without the tracker's lock.
        let (held, w) = spill_held(&t, &Request::write(0, 4096));
        assert!(
            t.live.try_lock().is_ok(),
            "the spill is written under the tracker's lock"
        );
        let other = goes(t.prepare_write(&Request::write(MIB, 4096)).unwrap());
        t.after_write(other.unwrap());
        // Writes into chunk 0 wait until its slot is written; the epoch
        // reads as its cut meanwhile (from the file, untouched).
        let w2 = waits(t.prepare_write(&Request::write(512, 512)).unwrap());
        assert!(!w.is_set());
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
        assert_eq!(t.status().preserved_spilled_bytes, 0);
        drop(held);
        woken(&w);
        woken(&w2);
        assert_eq!(t.status().preserved_spilled_bytes, CHUNK);
        let ticket = goes(t.prepare_write(&Request::write(0, 4096)).unwrap());
        disk.write_all_at(&[2; 4096], 0).unwrap();
        t.after_write(ticket.unwrap());
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
        // A spill write that fails breaks the epoch; its writes go on.
        t.spill.gate.set(false, true);
        let w = waits(
            t.prepare_write_leaving_reads(&Request::write(4096, 4096))
                .unwrap(),
        );
        woken(&w);
        assert!(t.epoch(1).unwrap().broken.is_some());
        assert_eq!(t.status().preserved_spilled_bytes, CHUNK);
        t.spill.gate.set(false, false);
        goes(t.prepare_write(&Request::write(4096, 4096)).unwrap());
    }

    #[test]
    fn an_epoch_released_while_its_chunks_spill_gives_the_slots_and_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _disk) = sealed_spilling(dir.path(), 8192);
        let (held, w) = spill_held(&t, &Request::write(0, 8192));
        // Released while the slots are being written: the spill file is
        // not given back under the write (its slots could be handed out
        // again), but once the write is done.
        t.release(1).unwrap();
        drop(held);
        woken(&w);
        let status = t.status();
        assert_eq!(status.preserved_spilled_bytes, 0);
        assert_eq!(status.preserved_memory_bytes, 0);
        assert!(
            lock(&t.spill.file).is_none(),
            "the spill file outlived its last chunk"
        );
    }

    fn pause_preservers(t: &Tracker, paused: bool) {
        lock(&t.jobs.queue).paused = paused;
        t.jobs.work.notify_all();
    }

    fn waits(p: Prepared) -> Arc<Wake> {
        match p {
            Prepared::Wait(w) => w,
            Prepared::Go(_) => panic!("the write went ahead before its chunks were preserved"),
            Prepared::Read(_) => panic!("the write read chunks another request preserves"),
        }
    }

    fn goes(p: Prepared) -> Option<Ticket> {
        match p {
            Prepared::Go(t) => t,
            _ => panic!("the request waited for copy-on-write it does not need"),
        }
    }

    /// Wait for `w` at most 10 s (a test that hangs tells nothing).
    fn woken(w: &Wake) {
        let start = Instant::now();
        while !w.is_set() {
            assert!(start.elapsed() < Duration::from_secs(10), "never woken");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!w.failed(), "woken to fail");
    }

    fn reads(p: Prepared) -> Preservation {
        match p {
            Prepared::Read(p) => p,
            other => panic!("the write did not read its chunks: {other:?}"),
        }
    }

    /// A tracker whose device was written with ones over `len` bytes at 0
    /// in epoch 1, sealed; and its backing file.
    fn sealed_over_ones(dir: &Path, len: usize) -> (Tracker, File) {
        let t = tracker(dir);
        let disk = t.file.try_clone().unwrap();
        disk.write_all_at(&vec![1; len], 0).unwrap();
        apply(&t, &Request::write(0, len as u64));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 1);
        (t, disk)
    }

    #[test]
    fn copy_on_write_makes_only_the_writes_into_its_chunks_wait_and_off_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_over_ones(dir.path(), 16384);
        pause_preservers(&t, true);
        // The first overwrite of chunk 0 after the cut waits for it to be
        // preserved: prepare_write answers at once, without reading it.
        let w1 = waits(
            t.prepare_write_leaving_reads(&Request::write(0, 4096))
                .unwrap(),
        );
        assert!(!w1.is_set());
        assert_eq!(t.status().writes_waiting_for_cow, 1);
        // Another write into the same chunk waits for the same preservation.
        let w2 = waits(
            t.prepare_write_leaving_reads(&Request::write(512, 512))
                .unwrap(),
        );
        assert_eq!(lock(&t.jobs.queue).jobs.len(), 1, "one read per chunk");
        // Everything else goes on: a write the epoch does not need, a
        // read, a flush.
        let other = goes(
            t.prepare_write_leaving_reads(&Request::write(MIB, 4096))
                .unwrap(),
        );
        t.after_write(other.expect("a tracked write has a ticket"));
        assert!(goes(
            t.prepare_write_leaving_reads(&Request::read(0, 4096))
                .unwrap()
        )
        .is_none());
        assert!(goes(t.prepare_write_leaving_reads(&Request::flush()).unwrap()).is_none());
        assert_eq!(t.cow_waits(), 2, "each held-back write is counted");
        // The epoch reads as its cut meanwhile (the chunk is untouched),
        // and a cut taken meanwhile changes nothing.
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
        assert_eq!(t.seal(SealAt::Now).unwrap(), 2);
        pause_preservers(&t, false);
        w1.wait_blocking().unwrap();
        w2.wait_blocking().unwrap();
        let ticket = goes(
            t.prepare_write_leaving_reads(&Request::write(0, 4096))
                .unwrap(),
        );
        disk.write_all_at(&[2; 4096], 0).unwrap();
        t.after_write(ticket.unwrap());
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
        assert_eq!(t.status().preserved_memory_bytes, CHUNK);
        // Preserved once: the second write into chunk 0 needs nothing more.
        apply(&t, &Request::write(512, 512));
        assert_eq!(t.status().preserved_memory_bytes, CHUNK);
        assert_eq!(
            t.status().cow_waits,
            2,
            "writes after the copy wait no more"
        );
    }

    #[test]
    fn a_write_that_reads_its_own_chunks_holds_back_only_the_writes_into_them() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_over_ones(dir.path(), 16384);
        pause_preservers(&t, true);
        // The first overwrite of chunks 1 and 2 reads them itself: one run.
        let p = reads(t.prepare_write(&Request::write(4096, 8192)).unwrap());
        assert_eq!(p.runs(), vec![4096..12288]);
        assert_eq!(lock(&t.live).reading, 8192);
        // A write into chunk 2 waits for that read, whoever asks; one into
        // chunks 2 and 3 too (chunk 3 goes to the preservers, not read
        // twice); writes elsewhere, reads and flushes go on.
        let w1 = waits(t.prepare_write(&Request::write(8192, 512)).unwrap());
        let w2 = waits(t.prepare_write(&Request::write(8192, 8192)).unwrap());
        assert_eq!(lock(&t.jobs.queue).jobs.len(), 1, "chunk 3 only");
        let other = goes(t.prepare_write(&Request::write(MIB, 4096)).unwrap());
        t.after_write(other.unwrap());
        assert!(goes(t.prepare_write(&Request::read(4096, 4096)).unwrap()).is_none());
        assert!(goes(t.prepare_write(&Request::flush()).unwrap()).is_none());
        // The epoch reads as its cut meanwhile.
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
        // The read handed over: the write into chunk 2 alone goes on, the
        // one that also waits for chunk 3 when the preservers did.
        let runs = p.runs().into_iter().map(|r| read_run(&t.file, r)).collect();
        t.preserve_read(p, runs);
        assert_eq!(lock(&t.live).reading, 0);
        woken(&w1);
        assert!(!w2.is_set());
        pause_preservers(&t, false);
        woken(&w2);
        // Each is prepared again and goes; the device changes under the cut.
        for r in [Request::write(4096, 8192), Request::write(8192, 8192)] {
            let ticket = goes(t.prepare_write(&r).unwrap());
            disk.write_all_at(&vec![2; r.len as usize], r.offset)
                .unwrap();
            t.after_write(ticket.unwrap());
        }
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
        assert_eq!(t.status().preserved_memory_bytes, 3 * CHUNK);
        assert_eq!(t.cow_waits(), 3);
    }

    #[test]
    fn a_read_given_up_breaks_only_the_epochs_that_needed_it_and_frees_its_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _disk) = sealed_over_ones(dir.path(), 8192);
        let p = reads(t.prepare_write(&Request::write(0, 4096)).unwrap());
        let w = waits(t.prepare_write(&Request::write(0, 512)).unwrap());
        // The request's queue went down before its read came back.
        drop(p);
        woken(&w);
        assert_eq!(lock(&t.live).reading, 0);
        assert!(t.epoch(1).unwrap().broken.is_some());
        // Nothing waits on a broken epoch's chunks any more; an epoch
        // sealed after it asks for its own copies.
        let ticket = goes(t.prepare_write(&Request::write(0, 512)).unwrap());
        t.after_write(ticket.unwrap());
        assert_eq!(t.seal(SealAt::Now).unwrap(), 2);
        let p = reads(t.prepare_write(&Request::write(0, 4096)).unwrap());
        // A read that failed does the same.
        let err = vec![Err(std::io::Error::from_raw_os_error(libc::EIO))];
        t.preserve_read(p, err);
        assert!(t.epoch(2).unwrap().broken.is_some());
        assert_eq!(t.status().preserved_memory_bytes, 0);
    }

    #[test]
    fn a_request_keeps_what_memory_takes_and_owes_the_spill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let t = open_with(dir.path(), History::NewFile, 2 * CHUNK)
            .unwrap()
            .0;
        let disk = t.file.try_clone().unwrap();
        disk.write_all_at(&[1; 16384], 0).unwrap();
        apply(&t, &Request::write(0, 16384));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 1);
        // Room for two chunks: a request reading two keeps them in memory
        // and owes nothing.
        let p = reads(t.prepare_write(&Request::write(0, 8192)).unwrap());
        let runs = p.runs().into_iter().map(|r| read_run(&t.file, r)).collect();
        assert!(t.store_read(p, runs).is_none());
        assert_eq!(t.status().preserved_memory_bytes, 2 * CHUNK);
        // No room left: the next request's chunks get spill slots, which
        // it writes itself (on its ring, in the daemon), without the lock.
        let p = reads(t.prepare_write(&Request::write(8192, 8192)).unwrap());
        let runs = p.runs().into_iter().map(|r| read_run(&t.file, r)).collect();
        let p = t.store_read(p, runs).expect("spill writes owed");
        let writes: Vec<(u64, Vec<u8>)> = p
            .spill_writes()
            .into_iter()
            .map(|(at, data)| (at, data.to_vec()))
            .collect();
        assert_eq!(writes, [(0, vec![1; 8192])], "one write of two slots");
        // Until handed back, writes into its chunks wait, others go on,
        // and the epoch reads as its cut (the file, untouched).
        let w = waits(t.prepare_write(&Request::write(12288, 512)).unwrap());
        t.after_write(goes(t.prepare_write(&Request::write(MIB, 4096)).unwrap()).unwrap());
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
        assert_eq!(t.status().writes_waiting_for_cow, 2);
        let file = t.spill_file().unwrap();
        let written = writes
            .iter()
            .map(|(at, data)| file.write_all_at(data, *at))
            .collect();
        t.spill_written(p, written);
        woken(&w);
        let status = t.status();
        assert_eq!(status.preserved_memory_bytes, 2 * CHUNK);
        assert_eq!(status.preserved_spilled_bytes, 2 * CHUNK);
        assert_eq!(status.writes_waiting_for_cow, 0);
        let ticket = goes(t.prepare_write(&Request::write(0, 16384)).unwrap());
        disk.write_all_at(&[2; 16384], 0).unwrap();
        t.after_write(ticket.unwrap());
        assert_eq!(epoch_bytes(&t, 1, 0..16384), vec![1; 16384]);
    }

    #[test]
    fn each_spill_write_is_handed_back_to_its_own_run() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_spilling(dir.path(), 16384);
        // Chunk 1 a hole (kept as nothing): runs of chunk 0, then 2-3.
        disk.write_all_at(&[0; 4096], 4096).unwrap();
        let p = reads(t.prepare_write(&Request::write(0, 16384)).unwrap());
        let runs = p.runs().into_iter().map(|r| read_run(&t.file, r)).collect();
        let p = t.store_read(p, runs).expect("spill writes owed");
        let at: Vec<(u64, usize)> = p
            .spill_writes()
            .iter()
            .map(|(at, data)| (*at, data.len()))
            .collect();
        assert_eq!(at, [(0, 4096), (CHUNK, 8192)]);
        // The first failed, the second was written: chunks 2-3 are kept,
        // chunk 0 breaks the epoch.
        let file = t.spill_file().unwrap();
        file.write_all_at(&[1; 8192], CHUNK).unwrap();
        let failed = Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        t.spill_written(p, vec![failed, Ok(())]);
        assert_eq!(t.status().preserved_spilled_bytes, 2 * CHUNK);
        assert!(t.epoch(1).unwrap().broken.is_some());
    }

    #[test]
    fn a_request_gone_with_its_spill_write_owed_breaks_the_epoch_and_its_slots_stay_unused() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_spilling(dir.path(), 16384);
        let owing = |offset| {
            let p = reads(t.prepare_write(&Request::write(offset, 4096)).unwrap());
            let runs = p.runs().into_iter().map(|r| read_run(&t.file, r)).collect();
            t.store_read(p, runs).expect("spill writes owed")
        };
        let pay = |p: &Preservation| -> Vec<std::io::Result<()>> {
            let file = t.spill_file().unwrap();
            p.spill_writes()
                .into_iter()
                .map(|(at, data)| file.write_all_at(data, at))
                .collect()
        };
        let p = owing(0);
        assert_eq!(p.spill_writes()[0].0, 0);
        let q = owing(4096);
        assert_eq!(q.spill_writes()[0].0, CHUNK);
        let written = pay(&q);
        t.spill_written(q, written);
        let w = waits(t.prepare_write(&Request::write(0, 512)).unwrap());
        // Its queue went down with the write in flight: the epoch breaks,
        // the waiting write goes on.
        drop(p);
        woken(&w);
        assert!(t.epoch(1).unwrap().broken.is_some());
        // An epoch sealed after it asks for its own copies, and never gets
        // the slot that late write may still land in.
        apply(&t, &Request::write(0, 16384));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 2);
        let p = owing(8192);
        assert_eq!(
            p.spill_writes()[0].0,
            2 * CHUNK,
            "a lost slot handed out again"
        );
        let written = pay(&p);
        t.spill_written(p, written);
        disk.write_all_at(&[2; 4096], 8192).unwrap();
        assert_eq!(epoch_bytes(&t, 2, 8192..12288), vec![1; 4096]);
        assert_eq!(t.status().preserved_spilled_bytes, 2 * CHUNK);
        // Released: the spill is given back, the lost slot with it.
        assert!(lock(&t.spill.file).is_some());
        t.release(1).unwrap();
        t.release(2).unwrap();
        assert!(lock(&t.spill.file).is_none());
    }

    #[test]
    fn reads_past_the_budget_are_left_to_the_preservers() {
        let dir = tempfile::tempdir().unwrap();
        let budget = READ_BUDGET as usize;
        let (t, _disk) = sealed_over_ones(dir.path(), budget + 8192);
        let p = reads(t.prepare_write(&Request::write(0, READ_BUDGET)).unwrap());
        let w = waits(t.prepare_write(&Request::write(READ_BUDGET, 4096)).unwrap());
        woken(&w);
        // Once the budget is back, a request reads its chunks again.
        let runs = p.runs().into_iter().map(|r| read_run(&t.file, r)).collect();
        t.preserve_read(p, runs);
        let p = reads(
            t.prepare_write(&Request::write(READ_BUDGET + 4096, 4096))
                .unwrap(),
        );
        assert_eq!(p.runs(), vec![READ_BUDGET + 4096..READ_BUDGET + 8192]);
        assert_eq!(t.epoch(1).unwrap().broken, None);
        let runs = p.runs().into_iter().map(|r| read_run(&t.file, r)).collect();
        t.preserve_read(p, runs);
        // A discard of it all is left to the preservers, in jobs of one
        // read each, so that a preserver holds no more at once.
        apply(&t, &Request::write(0, READ_BUDGET + 8192));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 2);
        pause_preservers(&t, true);
        let discard = Request {
            op: Op::Discard,
            ..Request::write(0, READ_BUDGET + 8192)
        };
        let w = waits(t.prepare_write(&discard).unwrap());
        let jobs: Vec<usize> = lock(&t.jobs.queue)
            .jobs
            .iter()
            .map(|p| p.chunks.len())
            .collect();
        let most = (MAX_EPOCH_READ / CHUNK) as usize;
        assert_eq!(jobs, [most, most, most, most, 2]);
        pause_preservers(&t, false);
        woken(&w);
    }

    #[test]
    fn chunks_the_consumer_took_are_not_copied_and_not_read_as_the_cut_again() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_over_ones(dir.path(), 16384);
        pause_preservers(&t, true);
        // A write into chunk 0 waits for its copy; meanwhile the consumer
        // reads chunks 0 and 1 as the cut, for the last time.
        let w1 = waits(
            t.prepare_write_leaving_reads(&Request::write(0, 4096))
                .unwrap(),
        );
        let mut buf = vec![0u8; 8192];
        t.take_epoch(1, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![1; 8192]);
        // A write into chunk 1 goes at once now.
        let ticket = goes(
            t.prepare_write_leaving_reads(&Request::write(4096, 4096))
                .unwrap(),
        );
        disk.write_all_at(&[2; 4096], 4096).unwrap();
        t.after_write(ticket.unwrap());
        // Chunk 0's copy, read once the preservers go on, is not kept.
        pause_preservers(&t, false);
        w1.wait_blocking().unwrap();
        let ticket = goes(
            t.prepare_write_leaving_reads(&Request::write(0, 4096))
                .unwrap(),
        );
        disk.write_all_at(&[3; 4096], 0).unwrap();
        t.after_write(ticket.unwrap());
        assert_eq!(t.status().preserved_memory_bytes, 0);
        // Taken chunks are not read as the cut again; the others are, and
        // a write into them still waits for their copy.
        assert!(matches!(
            t.read_epoch(1, 0, &mut buf),
            Err(Error::Epoch(EpochError::Taken { id: 1, .. }))
        ));
        assert!(t.take_epoch(1, 4096, &mut buf[..4096]).is_err());
        apply(&t, &Request::write(8192, 4096));
        disk.write_all_at(&[4; 4096], 8192).unwrap();
        assert_eq!(epoch_bytes(&t, 1, 8192..16384), vec![1; 8192]);
        assert_eq!(t.cow_waits(), 2, "chunks 0 and 2, not chunk 1");
        // Released as usual.
        t.release(1).unwrap();
        assert_eq!(t.status().preserved_memory_bytes, 0);
    }

    #[test]
    fn a_chunk_preserved_for_an_epoch_released_meanwhile_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_over_ones(dir.path(), 4096);
        release_epoch_1_mid_preservation(&t, &disk);
    }

    /// Chunk 0 waits to be preserved, then epoch 1 is released: no epoch
    /// needs the chunk now, so the write goes ahead at once, and what the
    /// preserver reads later (maybe torn by it) is dropped.
    fn release_epoch_1_mid_preservation(t: &Tracker, disk: &File) {
        pause_preservers(t, true);
        let w = waits(
            t.prepare_write_leaving_reads(&Request::write(0, 4096))
                .unwrap(),
        );
        assert!(t.release(1).unwrap().released);
        let ticket = goes(
            t.prepare_write_leaving_reads(&Request::write(0, 4096))
                .unwrap(),
        );
        disk.write_all_at(&[2; 4096], 0).unwrap();
        t.after_write(ticket.unwrap());
        pause_preservers(t, false);
        w.wait_blocking().unwrap();
        assert_eq!(t.status().preserved_memory_bytes, 0);
    }

    #[test]
    fn a_chunk_read_for_a_later_cut_is_dropped_when_its_epoch_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let (t, disk) = sealed_over_ones(dir.path(), 4096);
        apply(&t, &Request::write(MIB, 4096));
        assert_eq!(t.seal(SealAt::Now).unwrap(), 2);
        // Chunk 0 is read for cut 2 (epoch 1 needs it; epoch 2 did not
        // touch it), then epoch 1 is released: cut 2 is not, but nobody
        // reads chunk 0 at it, and the write no longer waits.
        release_epoch_1_mid_preservation(&t, &disk);
        assert!(t.epoch(2).unwrap().broken.is_none());
    }

    #[test]
    fn concurrent_writers_never_change_a_sealed_epoch() {
        const SPAN: u64 = 64 * CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(tracker(dir.path()));
        let disk = Arc::new(t.file.try_clone().unwrap());
        let writers = 4;
        let rounds = 12;
        let barrier = Arc::new(std::sync::Barrier::new(writers + 1));
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let (t, disk, barrier) = (t.clone(), disk.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for round in 0..rounds {
                        barrier.wait(); // the cut is taken
                        barrier.wait(); // its content is noted
                        for _ in 0..40 {
                            let len = 512 * (1 + next() % 24);
                            let offset = next() % (SPAN - len) / 512 * 512;
                            let byte = (round * writers + w + 1) as u8;
                            let ticket = t.before_write(&Request::write(offset, len)).unwrap();
                            disk.write_all_at(&vec![byte; len as usize], offset)
                                .unwrap();
                            t.after_write(ticket.unwrap());
                        }
                        barrier.wait(); // the round's writes are done
                    }
                })
            })
            .collect();
        // Round 0 writes into a device whose whole span changed in epoch 1.
        apply(&t, &Request::write(0, SPAN));
        for _ in 0..rounds {
            let id = t.seal(SealAt::Now).unwrap();
            barrier.wait();
            let mut cut = vec![0u8; SPAN as usize];
            disk.read_exact_at(&mut cut, 0).unwrap();
            barrier.wait();
            // Read the epoch while the writers overwrite it.
            let changed = t.epoch(id).unwrap().changes.data;
            for _ in 0..3 {
                for r in changed.iter() {
                    assert_eq!(
                        epoch_bytes(&t, id, r.clone()),
                        cut[r.start as usize..r.end as usize],
                        "epoch {id} at {r:?} is not the device at its cut"
                    );
                }
            }
            barrier.wait();
            for r in changed.iter() {
                assert_eq!(
                    epoch_bytes(&t, id, r.clone()),
                    cut[r.start as usize..r.end as usize]
                );
            }
            t.release(id).unwrap();
        }
        for th in threads {
            th.join().unwrap();
        }
    }
}
