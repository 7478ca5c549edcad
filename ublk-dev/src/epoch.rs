//! Epochs: consistent cuts of a running device's changes, sans I/O.
//!
//! The changes of the device are collected in the *current* epoch. Sealing
//! it (at a FLUSH, or on request) makes it immutable and opens the next
//! one, without pausing I/O. A sealed epoch is read back as exactly the
//! device's contents at its cut, however the device is written afterwards:
//! before a write touches a chunk that some unreleased sealed epoch still
//! needs, the chunk's content is *preserved* (copy-on-write), in memory up
//! to a limit and in [`Spill`] slots beyond it. Releasing epochs (oldest
//! first) frees what only they needed.
//!
//! # What is and is not I/O here
//!
//! This module reads no file and no clock. Time comes in as a value (ms
//! since the Unix epoch, from the caller's clock) wherever it is recorded:
//! [`Epochs::new`], [`Epochs::record`], [`Epochs::record_carried`],
//! [`Epochs::seal`], [`Epochs::resync_all`]. The content of chunks comes in
//! as bytes the caller read from the backing file
//! ([`Epochs::preserve_run_deferred`]),
//! and backing-file bytes to overlay come in as a buffer
//! ([`Epochs::overlay`]). Preserved chunks beyond the memory limit go to a
//! [`Spill`] the caller provides: this module decides which slot holds
//! which version and when the slots may be given back, the [`Spill`] does
//! the I/O (the device's is [`crate::tracking`]'s unnamed spill file; tests
//! use memory). What it does besides computing: it allocates memory for
//! preserved chunks, and logs (`tracing`) when an epoch breaks.
//!
//! # Why reads are exact
//!
//! Content is preserved per [`CHUNK`]. A *version* of a chunk is its
//! content at the cut of epoch `C` (taken just before the first write to
//! it in epoch `C + 1`). A write in the current epoch `E` preserves the
//! version at cut `E - 1` when it is the first write to the chunk in `E`
//! and the newest unreleased sealed epoch `S` that touched the chunk has
//! no version at a cut `>= S` yet.
//!
//! The content of a chunk at the cut of a sealed epoch `S` that touched it
//! is then the version with the smallest cut `>= S` or, without one, the
//! backing file: any write to the chunk after cut `S` (in an epoch `F > S`)
//! would have preserved the version at cut `F - 1 >= S`, with no write in
//! between. A reader reads the backing file first and then looks for a
//! version, so a write racing with the read is caught either way. Writes
//! in flight at a cut may land on either side of it, as a crash at that
//! instant could leave them: the cut is crash-consistent.
//!
//! The caller ([`crate::tracking::Tracker`]) does the I/O: it asks
//! [`Epochs::to_preserve`] which chunks a write needs preserved, reads them
//! from the backing file, and stores them with
//! [`Epochs::preserve_run_deferred`]
//! (at the cut it was asked for), all before the write is issued. The
//! read need not happen under the caller's lock, as long as no write to
//! those chunks is issued between the question and the store: see
//! [`crate::tracking`].
//!
//! Nor need a spill write: [`Epochs::preserve_run_deferred`] keeps what
//! memory takes at once and *reserves* spill slots for the rest, which
//! the caller writes without the lock and hands back to
//! [`Epochs::spill_written`]; only then is the version there to read.
//! Until then a reader of the cut reads the chunk from the backing file,
//! which is still its content at the cut as long as the caller issues no
//! write to it before [`Epochs::spill_written`] (the same rule as for the
//! read). A reserved slot is nobody else's: it is not reused, and the
//! spill is not given back, until it was handed back.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use ublk_mirror_common::{block, RangeSet};

/// Bytes per preserved chunk.
pub const CHUNK: u64 = 4096;

/// Default memory for preserved chunks before they spill to a file.
pub const DEFAULT_COW_MEMORY: u64 = 64 << 20;

/// Which kind of change a write-class request makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Data written.
    Data,
    /// Discarded or zeroed: reads as zeroes.
    Zeroed,
}

/// The changes of one epoch, in bytes of the device.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Ranges written with data.
    pub data: RangeSet,
    /// Ranges discarded or zeroed (they travel as holes).
    pub zeroed: RangeSet,
    /// Ranges whose changes are not known exactly: the regions found marked
    /// when the journal was opened. The consumer settles them by comparing
    /// hashes with the mirror.
    pub resync: RangeSet,
}

impl Changes {
    /// Record a change: the last kind written to a byte wins.
    pub fn record(&mut self, kind: ChangeKind, range: Range<u64>) {
        match kind {
            ChangeKind::Data => {
                self.zeroed.remove(range.clone());
                self.data.insert(range);
            }
            ChangeKind::Zeroed => {
                self.data.remove(range.clone());
                self.zeroed.insert(range);
            }
        }
    }

    /// Whether any of the three sets meets `range`.
    pub fn touches(&self, range: Range<u64>) -> bool {
        self.data.intersects(range.clone())
            || self.zeroed.intersects(range.clone())
            || self.resync.intersects(range)
    }

    /// The three sets together.
    pub fn touched(&self) -> RangeSet {
        let mut all = self.data.clone();
        all.union_with(&self.zeroed);
        all.union_with(&self.resync);
        all
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.zeroed.is_empty() && self.resync.is_empty()
    }
}

/// A sealed, unreleased epoch.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// Its number.
    pub id: u64,
    /// What changed in it.
    pub changes: Changes,
    /// Whether the cut was taken at a FLUSH (else on request, at an idle
    /// moment or a timeout).
    pub at_flush: bool,
    /// When it was sealed, in milliseconds since the Unix epoch.
    pub sealed_ms: u64,
    /// When its first change was recorded (ms since the Unix epoch), if
    /// it has any: the age of the oldest change not yet released.
    pub first_change_ms: Option<u64>,
    /// Set when a chunk it needs could not be preserved: it can no longer
    /// be read as its cut. Releasing it moves what it changed into the
    /// current epoch's resync ranges, so its regions stay marked and the
    /// next epoch ships their content in full.
    pub broken: Option<String>,
    /// A pre-copy round ([`Epochs::seal_precopy`]): no cut is kept for
    /// it. Nothing is preserved for it, and it reads as the device *now*
    /// (any range of it), never as its cut.
    pub precopy: bool,
    /// Whole chunks (as byte ranges) whose content at the cut the
    /// consumer has read already ([`Epochs::take`]) and will not read
    /// again: nothing more is preserved for them, and reading them as the
    /// cut is refused ([`EpochError::Taken`]).
    pub taken: RangeSet,
}

impl Sealed {
    /// Whether it is read as its cut (so chunks are preserved for it): not
    /// broken, not a pre-copy round.
    pub fn keeps_cut(&self) -> bool {
        self.broken.is_none() && !self.precopy
    }

    /// Whether chunk `r` (its byte range) is still to be read as this
    /// epoch's cut: it keeps its cut, changed the chunk, and its consumer
    /// has not taken the chunk yet.
    fn needs_chunk(&self, r: Range<u64>) -> bool {
        self.keeps_cut() && self.changes.touches(r.clone()) && !self.taken.intersects(r)
    }
}

/// Why an epoch operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    /// Epochs are released oldest first.
    #[error("release epochs in order: the oldest unreleased epoch is {oldest}, not {id}")]
    OutOfOrder {
        /// The epoch asked for.
        id: u64,
        /// The oldest sealed one.
        oldest: u64,
    },
    /// The epoch is not sealed and unreleased.
    #[error("epoch {id} is not a sealed, unreleased epoch (sealed and unreleased: {have})")]
    NotSealed {
        /// The epoch asked for.
        id: u64,
        /// What there is, in words.
        have: String,
    },
    /// The epoch lost a preserved chunk.
    #[error("epoch {id} cannot be read as its cut: {reason}; release it: its changes move into the next epoch as resync ranges")]
    Broken {
        /// The epoch.
        id: u64,
        /// Why.
        reason: String,
    },
    /// A read of chunks whose cut the consumer took already.
    #[error("bytes {start}..{end} of epoch {id} were read by its consumer (the mirror) already and are no longer kept as at its cut")]
    Taken {
        /// The epoch.
        id: u64,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// A read outside what the epoch changed.
    #[error("bytes {start}..{end} are outside what epoch {id} changed")]
    OutsideEpoch {
        /// The epoch.
        id: u64,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
}

/// Storage for preserved chunks beyond the memory limit: slots of
/// [`CHUNK`] bytes, numbered from 0. [`Epochs`] decides which slot holds
/// what and reuses freed slots; the layer that does I/O provides the
/// storage.
///
/// It is shared: [`Epochs`] reads and clears it under its owner's lock,
/// and a caller writes the slots it reserved without that lock. [`Epochs`] never clears it while a slot is reserved, and
/// hands no slot to two writers.
pub trait Spill: std::fmt::Debug + Send + Sync {
    /// Store `data` in the slots from `first` on, [`CHUNK`] bytes each (the
    /// last may be shorter), in one write, creating the storage if there
    /// is none yet.
    fn write(&self, first: u64, data: &[u8]) -> std::io::Result<()>;

    /// Read slot `slot`, written before, into `out` (at most [`CHUNK`] bytes).
    fn read(&self, slot: u64, out: &mut [u8]) -> std::io::Result<()>;

    /// No slot holds anything any more: give the storage back. Slot numbers
    /// start from 0 again after this.
    fn clear(&self);
}

/// Spill slots reserved for a run of adjacent chunks at one cut
/// ([`Epochs::preserve_run_deferred`]): write `data[at]` to the slots from
/// `first_slot` on ([`Spill::write`]), then hand the run and the result to
/// [`Epochs::spill_written`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reserved run must be handed back to Epochs::spill_written"]
pub struct SpillRun {
    /// The run's cut.
    pub cut: u64,
    /// Its first chunk; the others follow it.
    pub first_chunk: u64,
    /// Its first slot; the others follow it.
    pub first_slot: u64,
    /// Chunks (and slots) in the run.
    pub count: u64,
    /// Where its bytes are in the data given to
    /// [`Epochs::preserve_run_deferred`].
    pub at: Range<usize>,
}

/// Where a preserved chunk is.
#[derive(Debug)]
enum Slot {
    /// All zeroes (a hole, typically): nothing to keep.
    Zero,
    Memory(Box<[u8]>),
    /// Index of a [`Spill`] slot.
    Spilled(u64),
}

/// Preserved chunk versions, in memory up to a limit, then in [`Spill`] slots.
#[derive(Debug)]
struct Store {
    /// chunk index -> versions (cut epoch, slot), ascending by cut.
    versions: BTreeMap<u64, Vec<(u64, Slot)>>,
    memory_limit: u64,
    memory: u64,
    spill: Arc<dyn Spill>,
    /// Slots below `spill_slots` that hold nothing (freed, or whose write failed).
    spill_free: Vec<u64>,
    /// Slots handed out since the spill was last cleared.
    spill_slots: u64,
    /// Slots holding a version.
    spilled: u64,
    /// Slots reserved for a write not handed back yet ([`SpillRun`]).
    reserved: u64,
}

impl Store {
    /// Keep the versions at `cut` of `chunks`, each with its bytes in
    /// `data`: zeroes and what memory takes at once; for those bound for
    /// the spill, slots are reserved, adjacent ones for each run of
    /// adjacent chunks, and answered as runs to write
    /// ([`Store::spill_written`]).
    fn put_run(&mut self, cut: u64, data: &[u8], chunks: &[(u64, Range<usize>)]) -> Vec<SpillRun> {
        let mut runs: Vec<SpillRun> = Vec::new();
        for (chunk, r) in chunks {
            let slot = match self.slot_for(&data[r.clone()]) {
                Slot::Spilled(slot) => slot,
                slot => {
                    self.insert(*chunk, cut, slot);
                    continue;
                }
            };
            self.reserved += 1;
            match runs.last_mut() {
                Some(run)
                    if run.first_chunk + run.count == *chunk
                        && run.first_slot + run.count == slot
                        && run.at.end == r.start =>
                {
                    run.count += 1;
                    run.at.end = r.end;
                }
                _ => runs.push(SpillRun {
                    cut,
                    first_chunk: *chunk,
                    first_slot: slot,
                    count: 1,
                    at: r.clone(),
                }),
            }
        }
        runs
    }

    /// `run`'s slots were written: keep the version of its `i`th chunk
    /// where `keep[i]` (all false: the write failed), and free the other
    /// slots.
    fn spill_written(&mut self, run: SpillRun, keep: &[bool]) {
        self.reserved -= run.count;
        for (i, &keep) in (0..run.count).zip(keep) {
            let (chunk, slot) = (run.first_chunk + i, run.first_slot + i);
            if keep {
                self.spilled += 1;
                self.insert(chunk, run.cut, Slot::Spilled(slot));
            } else {
                self.spill_free.push(slot);
            }
        }
        self.clear_if_empty();
    }

    /// `run`'s write may still be in flight, its outcome unknown: its
    /// chunks are not kept, and its slots are not handed out again before
    /// the spill is cleared.
    fn spill_lost(&mut self, run: SpillRun) {
        self.reserved -= run.count;
        self.clear_if_empty();
    }

    /// Keep `slot` as `chunk`'s version at `cut`.
    fn insert(&mut self, chunk: u64, cut: u64, slot: Slot) {
        let list = self.versions.entry(chunk).or_default();
        let at = list.partition_point(|(c, _)| *c < cut);
        list.insert(at, (cut, slot));
    }

    /// Where `data` is to be kept: nowhere (zeroes), in memory while the
    /// limit allows, else a spill slot
    /// (written by the caller).
    fn slot_for(&mut self, data: &[u8]) -> Slot {
        if block::is_zero(data) {
            Slot::Zero
        } else if self.memory + data.len() as u64 <= self.memory_limit {
            self.memory += data.len() as u64;
            Slot::Memory(data.into())
        } else {
            Slot::Spilled(match self.spill_free.pop() {
                Some(i) => i,
                None => {
                    self.spill_slots += 1;
                    self.spill_slots - 1
                }
            })
        }
    }

    /// The version of `chunk` with the smallest cut `>= epoch`, copied into `out`.
    fn get(&self, chunk: u64, epoch: u64, out: &mut [u8]) -> std::io::Result<bool> {
        let Some((_, slot)) = self
            .versions
            .get(&chunk)
            .and_then(|l| l.iter().find(|(c, _)| *c >= epoch))
        else {
            return Ok(false);
        };
        match slot {
            Slot::Zero => out.fill(0),
            Slot::Memory(b) => out.copy_from_slice(&b[..out.len()]),
            Slot::Spilled(i) => self.spill.read(*i, out)?,
        }
        Ok(true)
    }

    fn has_version_since(&self, chunk: u64, epoch: u64) -> bool {
        self.versions
            .get(&chunk)
            .is_some_and(|l| l.last().is_some_and(|(c, _)| *c >= epoch))
    }

    /// Drop `chunk`'s version at `cut`, if kept.
    fn drop_version(&mut self, chunk: u64, cut: u64) {
        let Some(list) = self.versions.get_mut(&chunk) else {
            return;
        };
        let Some(at) = list.iter().position(|(c, _)| *c == cut) else {
            return;
        };
        let (_, slot) = list.remove(at);
        if list.is_empty() {
            self.versions.remove(&chunk);
        }
        self.free(slot);
    }

    /// Give back what `slot` held (memory, or a spill slot to reuse).
    fn free(&mut self, slot: Slot) {
        match slot {
            Slot::Zero => {}
            Slot::Memory(b) => self.memory -= b.len() as u64,
            Slot::Spilled(i) => {
                self.spilled -= 1;
                self.spill_free.push(i);
            }
        }
    }

    /// Drop every version at a cut `<= upto`.
    fn release(&mut self, upto: u64) {
        let mut freed = Vec::new();
        self.versions.retain(|_, list| {
            let at = list.partition_point(|(cut, _)| *cut <= upto);
            freed.extend(list.drain(..at).map(|(_, slot)| slot));
            !list.is_empty()
        });
        for slot in freed {
            self.free(slot);
        }
        self.clear_if_empty();
    }

    /// Give the spill's space back when no slot holds or awaits a version.
    fn clear_if_empty(&mut self) {
        if self.versions.is_empty() && self.reserved == 0 && self.spill_slots > 0 {
            self.spill.clear();
            self.spill_free.clear();
            self.spill_slots = 0;
        }
    }
}

/// What the preserved chunks take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreUsage {
    /// Bytes held in memory.
    pub memory_bytes: u64,
    /// Bytes held in [`Spill`] slots.
    pub spilled_bytes: u64,
}

/// The epochs of one device: the current one, the sealed and unreleased
/// ones, and the chunks they preserve.
#[derive(Debug)]
pub struct Epochs {
    device_size: u64,
    current: u64,
    changes: Changes,
    /// What requests issued in the current epoch wrote (`changes` may also
    /// hold writes carried over from the previous epoch, which were in
    /// flight at its cut and do not stand for a write after the cut).
    written: RangeSet,
    /// When the current epoch's first change was recorded.
    first_change_ms: Option<u64>,
    sealed: VecDeque<Sealed>,
    released: u64,
    /// Broken epochs released lately, and the epoch their changes moved
    /// into (at most [`CARRIED_KEPT`], the newest): what a `sync` waits
    /// for ([`Epochs::carried_target`]).
    carried: BTreeMap<u64, u64>,
    store: Store,
}

/// Broken epochs whose new home [`Epochs::carried_target`] remembers.
const CARRIED_KEPT: usize = 64;

impl Epochs {
    /// Start after epoch `released` (the last one released) and every
    /// number up to `sealed` (the highest a past run may have used), with
    /// the current epoch's changes set to `resync` ranges of unknown content,
    /// found at `now_ms` (ms since the Unix epoch). Preserved chunks use up
    /// to `memory_limit` bytes of memory, then slots of `spill`.
    pub fn new(
        device_size: u64,
        released: u64,
        sealed: u64,
        resync: RangeSet,
        memory_limit: u64,
        spill: Arc<dyn Spill>,
        now_ms: u64,
    ) -> Epochs {
        let first_change_ms = (!resync.is_empty()).then_some(now_ms);
        Epochs {
            device_size,
            current: released.max(sealed) + 1,
            changes: Changes {
                resync,
                ..Changes::default()
            },
            written: RangeSet::new(),
            first_change_ms,
            sealed: VecDeque::new(),
            released,
            carried: BTreeMap::new(),
            store: Store {
                versions: BTreeMap::new(),
                memory_limit,
                memory: 0,
                spill,
                spill_free: Vec::new(),
                spill_slots: 0,
                spilled: 0,
                reserved: 0,
            },
        }
    }

    /// The current (open) epoch's number.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// The last released epoch (0: none).
    pub fn released(&self) -> u64 {
        self.released
    }

    /// The current epoch's changes so far.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// The sealed, unreleased epochs, oldest first.
    pub fn sealed(&self) -> impl Iterator<Item = &Sealed> {
        self.sealed.iter()
    }

    /// A sealed, unreleased epoch.
    pub fn get(&self, id: u64) -> Result<&Sealed, EpochError> {
        self.sealed
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| EpochError::NotSealed {
                id,
                have: self.sealed_words(),
            })
    }

    fn sealed_words(&self) -> String {
        match (self.sealed.front(), self.sealed.back()) {
            (Some(a), Some(b)) if a.id == b.id => format!("{}", a.id),
            (Some(a), Some(b)) => format!("{}..={}", a.id, b.id),
            _ => "none".into(),
        }
    }

    /// Memory and spill slots taken by preserved chunks.
    pub fn store_usage(&self) -> StoreUsage {
        StoreUsage {
            memory_bytes: self.store.memory,
            spilled_bytes: self.store.spilled * CHUNK,
        }
    }

    /// The chunks of `range` (as byte ranges) a read of epoch `id` takes
    /// from preserved versions: written since its cut.
    pub fn preserved(&self, id: u64, range: Range<u64>) -> RangeSet {
        let mut out = RangeSet::new();
        let chunks = range.start / CHUNK..range.end.div_ceil(CHUNK);
        for (&c, list) in self.store.versions.range(chunks) {
            if list.iter().any(|(cut, _)| *cut >= id) {
                out.insert(self.chunk_range(c));
            }
        }
        out
    }

    /// The byte range of chunk `c`.
    pub fn chunk_range(&self, c: u64) -> Range<u64> {
        c * CHUNK..((c + 1) * CHUNK).min(self.device_size)
    }

    /// The chunks (by index) whose content a write into `range` in the
    /// current epoch must preserve before it is issued.
    pub fn to_preserve(&self, range: Range<u64>) -> Vec<u64> {
        if self.sealed.is_empty() || range.is_empty() {
            return Vec::new();
        }
        // Whole chunks: a chunk the write touches is preserved whole, also
        // when the sealed epoch changed another part of it than the write.
        let range =
            range.start / CHUNK * CHUNK..range.end.min(self.device_size).div_ceil(CHUNK) * CHUNK;
        // Only chunks some sealed epoch touched can need preserving: walk
        // those, not every chunk of a large discard.
        let mut candidates = RangeSet::new();
        for s in self.sealed.iter().filter(|s| !s.precopy) {
            for set in [&s.changes.data, &s.changes.zeroed, &s.changes.resync] {
                for r in set.intersection(range.clone()) {
                    candidates.insert(r.start / CHUNK * CHUNK..r.end.div_ceil(CHUNK) * CHUNK);
                }
            }
        }
        candidates
            .iter()
            .flat_map(|r| r.start / CHUNK..r.end / CHUNK)
            .filter(|&c| {
                let r = self.chunk_range(c);
                // Written in this epoch already: preserved then, if needed.
                if self.written.intersects(r.clone()) {
                    return false;
                }
                // A broken epoch is resynced, never read as its cut: it
                // needs nothing kept (and a chunk whose preservation
                // failed is not asked for again); nor does a pre-copy
                // round, read live.
                // Nor does an epoch whose consumer took the chunk already.
                match self.sealed.iter().rev().find(|s| s.needs_chunk(r.clone())) {
                    Some(s) => !self.store.has_version_since(c, s.id),
                    None => false,
                }
            })
            .collect()
    }

    /// [`Epochs::preserve_run_at`] of one chunk at the cut of the last
    /// sealed epoch.
    #[cfg(test)]
    fn preserve(&mut self, c: u64, data: &[u8]) {
        self.preserve_run_at(c, self.current - 1, data);
    }

    /// [`Epochs::preserve_run_deferred`], its spill writes made here.
    #[cfg(test)]
    fn preserve_run_at(&mut self, first: u64, cut: u64, data: &[u8]) {
        for run in self.preserve_run_deferred(first, cut, data) {
            let result = self
                .store
                .spill
                .write(run.first_slot, &data[run.at.clone()]);
            self.spill_written(run, result);
        }
    }

    /// Keep `data`, the content at the cut of epoch `cut` of the adjacent
    /// chunks from `first` on (whole chunks; the device's last may be
    /// short), for the sealed epochs that need them. `cut` is the last
    /// sealed epoch when [`Epochs::to_preserve`] asked for them: a caller
    /// that read them since, with no write to them issued in between, may
    /// store them after later cuts. Nothing is kept of a chunk no epoch
    /// reads any more (those sealed up to `cut` that touched it were
    /// released or broke meanwhile): its bytes may be torn by a write that
    /// no longer had to wait.
    ///
    /// What memory takes is kept at once. For the rest, spill slots are
    /// reserved and answered as runs (adjacent slots for adjacent chunks):
    /// the caller writes each ([`Spill::write`]), with no write to its
    /// chunks issued meanwhile, and hands it back to
    /// [`Epochs::spill_written`]. Until then the run's chunks read from
    /// the backing file (see the module docs).
    pub fn preserve_run_deferred(&mut self, first: u64, cut: u64, data: &[u8]) -> Vec<SpillRun> {
        let mut chunks = Vec::new();
        let (mut at, mut c) = (0, first);
        while at < data.len() {
            let r = self.chunk_range(c);
            let end = (at + (r.end - r.start) as usize).min(data.len());
            debug_assert_eq!(end - at, (r.end - r.start) as usize, "whole chunks");
            if self.needs(c, cut) {
                chunks.push((c, at..end));
            }
            at = end;
            c += 1;
        }
        self.store.put_run(cut, data, &chunks)
    }

    /// `run`, reserved by [`Epochs::preserve_run_deferred`], may still be
    /// being written, its outcome unknown (its writer went away): its
    /// chunks are lost to the epochs that needed them, as by a failed
    /// write, and its slots are not used again until the spill is cleared.
    pub fn spill_lost(&mut self, run: SpillRun) {
        let (cut, chunks) = (run.cut, run.first_chunk..run.first_chunk + run.count);
        self.store.spill_lost(run);
        for c in chunks {
            self.preserve_failed_at(c, cut, "a chunk's spill write was given up");
        }
    }

    /// `run`, reserved by [`Epochs::preserve_run_deferred`], was written
    /// (or not: `result`): its chunks' versions are kept where an epoch
    /// still needs them; a failed write breaks the epochs that needed its
    /// chunks, as a failed read does.
    pub fn spill_written(&mut self, run: SpillRun, result: std::io::Result<()>) {
        let (cut, chunks) = (run.cut, run.first_chunk..run.first_chunk + run.count);
        let keep: Vec<bool> = chunks
            .clone()
            .map(|c| result.is_ok() && self.needs(c, cut))
            .collect();
        self.store.spill_written(run, &keep);
        if let Err(e) = result {
            for c in chunks {
                self.preserve_failed_at(c, cut, &format!("cannot preserve a chunk: {e}"));
            }
        }
    }

    /// Whether an unreleased epoch that is not broken, sealed at or before
    /// `cut`, touched chunk `c`: only those read its version at `cut`.
    /// Drop the versions of `chunks` that no epoch needs any more.
    fn drop_unneeded(&mut self, chunks: impl std::ops::RangeBounds<u64>) {
        let unneeded: Vec<(u64, u64)> = self
            .store
            .versions
            .range(chunks)
            .flat_map(|(&c, list)| list.iter().map(move |(cut, _)| (c, *cut)))
            .filter(|&(c, cut)| !self.needs(c, cut))
            .collect();
        for (c, cut) in unneeded {
            self.store.drop_version(c, cut);
        }
    }

    fn needs(&self, c: u64, cut: u64) -> bool {
        let r = self.chunk_range(c);
        self.sealed
            .iter()
            .any(|s| s.id <= cut && s.needs_chunk(r.clone()))
    }

    /// A chunk that needed preserving could not be read or kept: the
    /// epochs that needed it cannot be read as their cut any more.
    pub fn preserve_failed(&mut self, c: u64, reason: &str) {
        self.preserve_failed_at(c, u64::MAX, reason);
    }

    /// Chunk `c`'s version at `cut` could not be read or kept: the epochs
    /// sealed at or before `cut` that needed it cannot be read as their cut
    /// any more (later ones ask for a version of their own). One whose
    /// consumer took the chunk already has what it needed of it.
    pub fn preserve_failed_at(&mut self, c: u64, cut: u64, reason: &str) {
        let r = self.chunk_range(c);
        for s in self.sealed.iter_mut().filter(|s| s.id <= cut) {
            if s.needs_chunk(r.clone()) {
                tracing::error!(epoch = s.id, "{reason}; the epoch will need a resync");
                s.broken = Some(reason.to_string());
            }
        }
    }

    /// Record a write-class request of the current epoch (after
    /// [`Epochs::to_preserve`]'s chunks were preserved), issued at `now_ms`.
    pub fn record(&mut self, kind: ChangeKind, range: Range<u64>, now_ms: u64) {
        self.written.insert(range.clone());
        self.changes.record(kind, range);
        self.first_change_ms.get_or_insert(now_ms);
    }

    /// Record, in the current epoch, a request of the previous one that was
    /// still in flight at the cut: its final content must be shipped with
    /// this epoch. Its chunks are not counted as written in this epoch, so
    /// the next write to them still preserves them for the sealed epoch.
    /// `now_ms`: the time of the cut.
    pub fn record_carried(&mut self, kind: ChangeKind, range: Range<u64>, now_ms: u64) {
        self.changes.record(kind, range);
        self.first_change_ms.get_or_insert(now_ms);
    }

    /// The age of the oldest change not released yet, in ms since the
    /// Unix epoch (`None`: nothing unreleased). Resync ranges count from
    /// when they were found.
    pub fn oldest_change_ms(&self) -> Option<u64> {
        self.sealed
            .iter()
            .filter_map(|s| s.first_change_ms)
            .chain(self.first_change_ms)
            .min()
    }

    /// Seal the current epoch at this instant and open the next one;
    /// returns the sealed epoch's number.
    pub fn seal(&mut self, at_flush: bool, now_ms: u64) -> u64 {
        self.seal_as(at_flush, false, now_ms)
    }

    /// Seal the current epoch as a *pre-copy round*: its changes are
    /// closed and the next epoch opens (what is written from now on is
    /// recorded there), but no cut is kept: nothing is preserved for it,
    /// and it reads as the live device ([`Sealed::precopy`]). Returns its
    /// number.
    pub fn seal_precopy(&mut self, now_ms: u64) -> u64 {
        self.seal_as(false, true, now_ms)
    }

    /// Make sealed epoch `id` a pre-copy round (see
    /// [`Epochs::seal_precopy`]): nothing more is preserved for it, it
    /// reads live, and the versions only it needed are dropped.
    pub fn demote(&mut self, id: u64) -> Result<(), EpochError> {
        self.get(id)?;
        let Some(s) = self.sealed.iter_mut().find(|s| s.id == id) else {
            return Ok(());
        };
        if s.precopy {
            return Ok(());
        }
        s.precopy = true;
        self.drop_unneeded(..);
        Ok(())
    }

    fn seal_as(&mut self, at_flush: bool, precopy: bool, now_ms: u64) -> u64 {
        let id = self.current;
        self.sealed.push_back(Sealed {
            id,
            changes: std::mem::take(&mut self.changes),
            at_flush,
            sealed_ms: now_ms,
            first_change_ms: self.first_change_ms.take(),
            broken: None,
            precopy,
            taken: RangeSet::new(),
        });
        self.written.clear();
        self.current += 1;
        id
    }

    /// Release the oldest sealed epoch, `id`: the consumer has durably
    /// taken it. Releasing an epoch released before is a no-op (`None`).
    /// What a broken epoch changed moves into the current epoch's resync
    /// ranges: the consumer could not take it as its cut.
    pub fn release(&mut self, id: u64) -> Result<Option<Sealed>, EpochError> {
        if id <= self.released {
            return Ok(None);
        }
        let Some(oldest) = self.sealed.front() else {
            return Err(EpochError::NotSealed {
                id,
                have: self.sealed_words(),
            });
        };
        if oldest.id != id {
            if self.sealed.iter().any(|s| s.id == id) {
                return Err(EpochError::OutOfOrder {
                    id,
                    oldest: oldest.id,
                });
            }
            return Err(EpochError::NotSealed {
                id,
                have: self.sealed_words(),
            });
        }
        let released = self.sealed.pop_front();
        if let Some(s) = released.as_ref().filter(|s| s.broken.is_some()) {
            self.changes.resync.union_with(&s.changes.touched());
            if let Some(t) = s.first_change_ms {
                self.first_change_ms = Some(self.first_change_ms.map_or(t, |c| c.min(t)));
            }
            self.carried.insert(id, self.current);
            if self.carried.len() > CARRIED_KEPT {
                self.carried.pop_first();
            }
        }
        self.released = id;
        self.store.release(id);
        Ok(released)
    }

    /// The epoch to wait for so that every change of the epochs up to
    /// `target` is released: `target`, or later where a broken epoch up
    /// to it was released and its changes moved into a later epoch (and
    /// so on, should that one break too). A broken epoch released before
    /// the caller's `target` was taken moved its changes into an epoch no
    /// later than it. Remembers the newest 64 breaks (`CARRIED_KEPT`).
    pub fn carried_target(&self, mut target: u64) -> u64 {
        for (&id, &into) in &self.carried {
            if id <= target {
                target = target.max(into);
            }
        }
        target
    }

    /// Everything some unreleased epoch (sealed or current) changed: the
    /// regions under it must stay marked.
    pub fn unreleased(&self) -> RangeSet {
        let mut all = self.changes.touched();
        for s in &self.sealed {
            all.union_with(&s.changes.touched());
        }
        all
    }

    /// The whole device becomes the current epoch's resync ranges, at `now_ms`.
    pub fn resync_all(&mut self, now_ms: u64) {
        self.changes.resync.insert(0..self.device_size);
        self.first_change_ms.get_or_insert(now_ms);
    }

    /// Whether some unreleased epoch still carries resync ranges.
    pub fn resync_outstanding(&self) -> bool {
        !self.changes.resync.is_empty() || self.sealed.iter().any(|s| !s.changes.resync.is_empty())
    }

    /// Check that `range` can be read at epoch `id`'s cut: the epoch is
    /// sealed, unbroken, and the range lies in chunks it touched (or, for
    /// a pre-copy round, read live, anywhere on the device).
    pub fn check_read(&self, id: u64, range: Range<u64>) -> Result<(), EpochError> {
        let s = self.get(id)?;
        if s.precopy {
            if range.end > self.device_size {
                return Err(EpochError::OutsideEpoch {
                    id,
                    start: range.start,
                    end: range.end,
                });
            }
            return Ok(());
        }
        if let Some(reason) = &s.broken {
            return Err(EpochError::Broken {
                id,
                reason: reason.clone(),
            });
        }
        let outside = EpochError::OutsideEpoch {
            id,
            start: range.start,
            end: range.end,
        };
        if range.end > self.device_size {
            return Err(outside);
        }
        let first = range.start / CHUNK;
        let last = range.end.div_ceil(CHUNK);
        if !(first..last).all(|c| s.changes.touches(self.chunk_range(c))) {
            return Err(outside);
        }
        if s.taken.intersects(range.clone()) {
            return Err(EpochError::Taken {
                id,
                start: range.start,
                end: range.end,
            });
        }
        Ok(())
    }

    /// The consumer of sealed epoch `id` has read `range` as its cut
    /// (after [`Epochs::check_read`] and [`Epochs::overlay`], under the
    /// same lock) and will not read it again: the chunks it covers whole
    /// need nothing more preserved for this epoch, and versions no epoch
    /// needs any more are dropped. No-op for an epoch that keeps no cut.
    ///
    /// Why nothing is lost: a write into a taken chunk is issued only
    /// after this, so the bytes read were the cut's. Should the consumer
    /// need them again after all (the link broke before the server kept
    /// them), the read is refused, and the epoch can only travel as a
    /// pre-copy round ([`Epochs::demote`]) followed by a new cut.
    pub fn take(&mut self, id: u64, range: Range<u64>) -> Result<(), EpochError> {
        self.get(id)?;
        let Some(s) = self.sealed.iter_mut().find(|s| s.id == id) else {
            return Ok(());
        };
        // Only chunks read whole (the device's last one may be short): a
        // chunk read in part may be read again in its other parts (the
        // changes of an epoch are exact ranges, so two small writes into
        // one chunk are two reads), and stays kept until then.
        let first = range.start.div_ceil(CHUNK);
        let end = if range.end >= self.device_size {
            self.device_size.div_ceil(CHUNK)
        } else {
            range.end / CHUNK
        };
        if !s.keeps_cut() || first >= end {
            return Ok(());
        }
        let chunks = first..end;
        s.taken
            .insert(chunks.start * CHUNK..(chunks.end * CHUNK).min(self.device_size));
        self.drop_unneeded(chunks);
        Ok(())
    }

    /// Overlay preserved versions onto `buf`, which holds the backing
    /// file's bytes at `offset` read *before* this call: afterwards `buf`
    /// holds the device at epoch `id`'s cut. Call [`Epochs::check_read`]
    /// under the same lock first.
    pub fn overlay(&self, id: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.get(id).is_ok_and(|s| s.precopy) {
            // Read live: the backing file's bytes are the answer.
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        // Under the tracker's lock: a chunk's worth of memory only when a
        // version is kept.
        let mut chunk = Vec::new();
        for c in offset / CHUNK..end.div_ceil(CHUNK) {
            if !self.store.has_version_since(c, id) {
                continue;
            }
            let r = self.chunk_range(c);
            chunk.resize(CHUNK as usize, 0);
            let piece = &mut chunk[..(r.end - r.start) as usize];
            if self.store.get(c, id, piece)? {
                let from = r.start.max(offset);
                let to = r.end.min(end);
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&piece[(from - r.start) as usize..(to - r.start) as usize]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Spill slots in memory, shared with the test that made them.
    #[derive(Debug, Default, Clone)]
    struct MemSpill(Arc<Mutex<MemSlots>>);

    #[derive(Debug, Default)]
    struct MemSlots {
        slots: BTreeMap<u64, Vec<u8>>,
        /// Writes fail (a full disk) while set.
        fail_writes: bool,
        /// How often the storage was given back.
        clears: u32,
        /// Calls that wrote slots.
        writes: u32,
    }

    impl MemSpill {
        fn slots(&self) -> std::sync::MutexGuard<'_, MemSlots> {
            self.0.lock().unwrap()
        }
    }

    impl Spill for MemSpill {
        fn write(&self, first: u64, data: &[u8]) -> std::io::Result<()> {
            let mut s = self.slots();
            if s.fail_writes {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            s.writes += 1;
            for (i, piece) in data.chunks(CHUNK as usize).enumerate() {
                s.slots.insert(first + i as u64, piece.to_vec());
            }
            Ok(())
        }

        fn read(&self, slot: u64, out: &mut [u8]) -> std::io::Result<()> {
            let s = self.slots();
            let data = s
                .slots
                .get(&slot)
                .ok_or_else(|| std::io::Error::other("slot never written"))?;
            out.copy_from_slice(&data[..out.len()]);
            Ok(())
        }

        fn clear(&self) {
            let mut s = self.slots();
            s.slots.clear();
            s.clears += 1;
        }
    }

    fn epochs(limit: u64) -> (Epochs, MemSpill) {
        let spill = MemSpill::default();
        let e = Epochs::new(
            64 * CHUNK,
            0,
            0,
            RangeSet::new(),
            limit,
            Arc::new(spill.clone()),
            0,
        );
        (e, spill)
    }

    /// `chunks` chunks of `byte`.
    fn fill(byte: u8, chunks: usize) -> Vec<u8> {
        vec![byte; chunks * CHUNK as usize]
    }

    /// Chunk `c` as epoch `id` reads it where the backing file holds
    /// `file` bytes.
    fn chunk_at_cut(e: &Epochs, id: u64, c: u64, file: u8) -> Vec<u8> {
        let mut buf = vec![file; CHUNK as usize];
        e.overlay(id, c * CHUNK, &mut buf).unwrap();
        buf
    }

    #[test]
    fn only_chunks_a_sealed_epoch_needs_are_preserved_once() {
        let (mut e, _d) = epochs(1 << 20);
        e.record(ChangeKind::Data, 0..2 * CHUNK, 0);
        assert!(e.to_preserve(0..CHUNK).is_empty(), "nothing sealed yet");
        assert_eq!(e.seal(false, 0), 1);
        // Chunk 0 and 1 were changed by epoch 1; chunk 5 was not.
        assert_eq!(e.to_preserve(0..6 * CHUNK), vec![0, 1]);
        e.preserve(0, &[1; CHUNK as usize]);
        e.record(ChangeKind::Data, 0..100, 0);
        assert_eq!(e.to_preserve(0..CHUNK), Vec::<u64>::new());
        // A second seal: chunk 0 has a version for epoch 1 and epoch 2
        // changed it again, so it needs the version at cut 2.
        assert_eq!(e.seal(true, 0), 2);
        assert_eq!(e.to_preserve(0..2 * CHUNK), vec![0, 1]);
        e.preserve(0, &[2; CHUNK as usize]);
        let mut buf = vec![0u8; CHUNK as usize];
        e.overlay(1, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![1; CHUNK as usize]);
        e.overlay(2, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![2; CHUNK as usize]);
        // Chunk 1 untouched since epoch 1: its (missing) version is the file.
        assert!(matches!(e.release(2), Err(EpochError::OutOfOrder { .. })));
        assert_eq!(e.release(1).unwrap().unwrap().id, 1);
        assert_eq!(e.store_usage().memory_bytes, CHUNK);
        assert_eq!(e.release(2).unwrap().unwrap().id, 2);
        assert_eq!(e.store_usage(), StoreUsage::default());
        assert!(
            e.release(2).unwrap().is_none(),
            "a second release is a no-op"
        );
        assert!(matches!(e.release(3), Err(EpochError::NotSealed { .. })));
    }

    #[test]
    fn a_run_of_chunks_spills_in_one_write_per_stretch_of_adjacent_slots() {
        let (mut e, spill) = epochs(CHUNK);
        e.record(ChangeKind::Data, 0..8 * CHUNK, 0);
        e.record(ChangeKind::Data, 10 * CHUNK..12 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        // Chunk i holds i + 1, but chunk 3 is a hole; 8 and 9 were not
        // changed by epoch 1 and need no copy.
        let data: Vec<u8> = (0..12u8)
            .flat_map(|i| vec![if i == 3 { 0 } else { i + 1 }; CHUNK as usize])
            .collect();
        e.preserve_run_at(0, 1, &data[..8 * CHUNK as usize]);
        // Chunk 0 in memory (the limit), 1-2 and 4-7 spilled in a write
        // each, the hole kept as nothing; then 10-11 in one more.
        assert_eq!(spill.slots().writes, 2);
        assert_eq!(e.store_usage().spilled_bytes, 6 * CHUNK);
        e.preserve_run_at(10, 1, &data[10 * CHUNK as usize..]);
        assert_eq!(spill.slots().writes, 3);
        assert_eq!(e.store_usage().spilled_bytes, 8 * CHUNK);
        // Each chunk reads back as the cut, whatever the file holds now.
        for c in (0..8).chain(10..12) {
            let want = &data[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
            assert_eq!(chunk_at_cut(&e, 1, c, 9), want, "chunk {c}");
        }
        // A spill that fails breaks the epoch and keeps nothing.
        let (mut e, spill) = epochs(0);
        e.record(ChangeKind::Data, 0..4 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        spill.slots().fail_writes = true;
        e.preserve_run_at(0, 1, &data[..4 * CHUNK as usize]);
        assert!(e.get(1).unwrap().broken.is_some());
        assert_eq!(e.store_usage(), StoreUsage::default());
    }

    #[test]
    fn chunks_spilled_into_reused_slots_read_back_as_theirs() {
        let (mut e, spill) = epochs(0);
        e.record(ChangeKind::Data, 0..4 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        e.record(ChangeKind::Data, 10 * CHUNK..12 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 2);
        e.preserve_run_at(0, 1, &fill(1, 4));
        e.preserve_run_at(10, 2, &fill(2, 2));
        assert_eq!(spill.slots().writes, 2);
        // Epoch 1's slots are given back and handed out again, not in
        // ascending order: each chunk of the next run is a write of its own.
        e.release(1).unwrap();
        e.record(ChangeKind::Data, 20 * CHUNK..23 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 3);
        let data: Vec<u8> = (0..3u8)
            .flat_map(|i| vec![10 + i; CHUNK as usize])
            .collect();
        e.preserve_run_at(20, 3, &data);
        assert_eq!(spill.slots().writes, 5);
        for (c, want) in [(20, 10), (21, 11), (22, 12), (10, 2), (11, 2)] {
            let id = if c < 20 { 2 } else { 3 };
            let buf = chunk_at_cut(&e, id, c, 0);
            assert_eq!(buf, vec![want; CHUNK as usize], "chunk {c}");
        }
    }

    #[test]
    fn reserved_spill_slots_are_nobody_elses_until_handed_back() {
        let (mut e, spill) = epochs(0);
        e.record(ChangeKind::Data, 0..4 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        // Chunks 0-3 get slots 0-3, in one run; nothing is written yet,
        // and a reader of the cut reads the file's bytes (still the cut).
        let mut runs = e.preserve_run_deferred(0, 1, &fill(1, 4));
        assert_eq!(
            runs,
            [SpillRun {
                cut: 1,
                first_chunk: 0,
                first_slot: 0,
                count: 4,
                at: 0..4 * CHUNK as usize,
            }]
        );
        assert_eq!(spill.slots().writes, 0);
        assert_eq!(
            chunk_at_cut(&e, 1, 0, 9),
            fill(9, 1),
            "a version read before it was written"
        );
        // Another epoch's chunks get other slots.
        e.record(ChangeKind::Data, 10 * CHUNK..11 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 2);
        let other = e.preserve_run_deferred(10, 2, &fill(2, 1));
        assert_eq!(other[0].first_slot, 4);
        // Epoch 1 released meanwhile: its slots are not given back, nor
        // the spill, until its write is handed back.
        let run = runs.remove(0);
        e.release(1).unwrap();
        e.spill_written(run, Ok(()));
        for run in other {
            spill.write(run.first_slot, &fill(2, 1)).unwrap();
            e.spill_written(run, Ok(()));
        }
        assert_eq!(spill.slots().clears, 0);
        assert_eq!(e.store_usage().spilled_bytes, CHUNK);
        assert_eq!(chunk_at_cut(&e, 2, 10, 9), fill(2, 1));
        // Released: nothing holds or awaits a slot, the spill is given back.
        e.release(2).unwrap();
        assert_eq!(spill.slots().clears, 1);
        assert_eq!(e.store_usage(), StoreUsage::default());
        // A write that failed breaks the epoch that needed it.
        e.record(ChangeKind::Data, 0..CHUNK, 0);
        assert_eq!(e.seal(false, 0), 3);
        for run in e.preserve_run_deferred(0, 3, &fill(3, 1)) {
            e.spill_written(run, Err(std::io::Error::other("a full disk")));
        }
        assert!(e.get(3).unwrap().broken.is_some());
        assert_eq!(e.store_usage(), StoreUsage::default());
    }

    #[test]
    fn a_chunk_its_consumer_took_needs_no_copy_and_is_not_read_again() {
        // Spill past one chunk of memory: freed slots are counted too.
        let (mut e, spill) = epochs(CHUNK);
        e.record(ChangeKind::Data, 0..4 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        // Chunks 0 and 1 are overwritten before the consumer read them:
        // preserved, one in memory, one spilled.
        assert_eq!(e.to_preserve(0..2 * CHUNK), vec![0, 1]);
        e.preserve(0, &[1; CHUNK as usize]);
        e.preserve(1, &[1; CHUNK as usize]);
        e.record(ChangeKind::Data, 0..2 * CHUNK, 0);
        assert_eq!(e.store_usage().spilled_bytes, CHUNK);
        // Reads of parts of chunks take nothing: the rest of each may be
        // read later (two small writes into one chunk are two reads).
        e.take(1, CHUNK + 100..3 * CHUNK - 100).unwrap();
        e.take(1, 3 * CHUNK..3 * CHUNK + 512).unwrap();
        assert_eq!(e.to_preserve(0..4 * CHUNK), vec![2, 3]);
        e.check_read(1, CHUNK + 100..3 * CHUNK - 100).unwrap();
        // The consumer reads chunks 1 and 2 whole, once.
        e.check_read(1, CHUNK..3 * CHUNK).unwrap();
        e.take(1, CHUNK..3 * CHUNK).unwrap();
        // What only it needed is dropped (chunk 1's spilled version), and
        // a write into chunk 2 no longer waits; chunk 3 still does.
        assert_eq!(
            e.store_usage(),
            StoreUsage {
                memory_bytes: CHUNK,
                spilled_bytes: 0
            }
        );
        assert_eq!(e.to_preserve(0..4 * CHUNK), vec![3]);
        // A taken chunk is not read as the cut again, whole or in part;
        // the others still are.
        for range in [CHUNK..2 * CHUNK, 2 * CHUNK + 5..2 * CHUNK + 6, 0..4 * CHUNK] {
            assert!(
                matches!(
                    e.check_read(1, range.clone()),
                    Err(EpochError::Taken { id: 1, .. })
                ),
                "{range:?}"
            );
        }
        e.check_read(1, 0..CHUNK).unwrap();
        e.check_read(1, 3 * CHUNK..4 * CHUNK).unwrap();
        // Epoch 2 changed chunk 2 after epoch 1 took it: a write in epoch 3
        // preserves it for epoch 2, whose consumer has not read it.
        e.record(ChangeKind::Data, 2 * CHUNK..2 * CHUNK + 1, 0);
        assert_eq!(e.seal(false, 0), 2);
        assert_eq!(e.to_preserve(2 * CHUNK..3 * CHUNK), vec![2]);
        // A taking of a round, or of an unknown epoch, changes nothing.
        e.demote(1).unwrap();
        e.take(1, 3 * CHUNK..4 * CHUNK).unwrap();
        assert!(e.check_read(1, 3 * CHUNK..4 * CHUNK).is_ok());
        assert!(matches!(e.take(9, 0..1), Err(EpochError::NotSealed { .. })));
        assert_eq!(spill.slots().clears, 0);
    }

    #[test]
    fn a_demoted_epoch_drops_what_only_it_kept() {
        let (mut e, _spill) = epochs(1 << 20);
        e.record(ChangeKind::Data, 0..2 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        // Chunk 0 is kept for epoch 1, then changed again and sealed in
        // epoch 2; a write after that keeps chunk 0 for epoch 2 too.
        assert_eq!(e.to_preserve(0..CHUNK), vec![0]);
        e.preserve(0, &[1; CHUNK as usize]);
        e.record(ChangeKind::Data, 0..CHUNK, 0);
        assert_eq!(e.seal(false, 0), 2);
        assert_eq!(e.to_preserve(0..CHUNK), vec![0]);
        e.preserve(0, &[2; CHUNK as usize]);
        assert_eq!(e.store_usage().memory_bytes, 2 * CHUNK);
        // Epoch 1 lets go of its cut: its version goes, epoch 2's stays,
        // and a write into chunk 1 (epoch 1's alone) waits for nothing.
        e.demote(1).unwrap();
        assert_eq!(e.store_usage().memory_bytes, CHUNK);
        assert!(e.to_preserve(CHUNK..2 * CHUNK).is_empty());
        let mut buf = vec![0u8; CHUNK as usize];
        e.check_read(2, 0..CHUNK).unwrap();
        e.overlay(2, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![2; CHUNK as usize]);
        // Again: nothing changes.
        e.demote(1).unwrap();
        assert_eq!(e.store_usage().memory_bytes, CHUNK);
    }

    #[test]
    fn a_pre_copy_round_keeps_no_cut_and_reads_live_anywhere() {
        let (mut e, _d) = epochs(1 << 20);
        e.record(ChangeKind::Data, 0..4 * CHUNK, 0);
        assert_eq!(e.seal_precopy(0), 1);
        assert!(e.get(1).unwrap().precopy);
        // Writes into what the round changed wait for nothing.
        assert!(e.to_preserve(0..4 * CHUNK).is_empty());
        e.record(ChangeKind::Data, 0..CHUNK, 0);
        // It reads anywhere on the device, as the file has it.
        e.check_read(1, 10 * CHUNK..12 * CHUNK).unwrap();
        assert!(e.check_read(1, 63 * CHUNK..65 * CHUNK).is_err());
        // A cut after it (the end of a run) keeps its own chunks only,
        // and a version kept for it is no round's.
        assert_eq!(e.seal(true, 0), 2);
        assert_eq!(e.to_preserve(0..4 * CHUNK), vec![0]);
        e.preserve(0, &[9; CHUNK as usize]);
        let mut buf = vec![5u8; CHUNK as usize];
        e.overlay(1, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![5; CHUNK as usize], "a round reads the file");
        e.overlay(2, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![9; CHUNK as usize], "the cut reads its version");
        // A failure to preserve breaks the cut, never the round.
        e.preserve_failed(1, "disk gone");
        assert!(e.get(1).unwrap().broken.is_none());
        assert_eq!(e.release(1).unwrap().unwrap().id, 1);
        assert_eq!(e.release(2).unwrap().unwrap().id, 2);
        assert_eq!(e.store_usage(), StoreUsage::default());
    }

    #[test]
    fn preserved_chunks_spill_past_the_memory_limit() {
        let (mut e, spill) = epochs(CHUNK);
        e.record(ChangeKind::Zeroed, 0..8 * CHUNK, 0);
        e.seal(false, 0);
        for c in 0..8 {
            e.preserve(c, &[c as u8 + 1; CHUNK as usize]);
        }
        assert_eq!(
            e.store_usage(),
            StoreUsage {
                memory_bytes: CHUNK,
                spilled_bytes: 7 * CHUNK
            }
        );
        let mut buf = vec![0u8; 8 * CHUNK as usize];
        e.check_read(1, 0..8 * CHUNK).unwrap();
        e.overlay(1, 0, &mut buf).unwrap();
        for c in 0..8 {
            assert!(buf[c * CHUNK as usize..][..CHUNK as usize]
                .iter()
                .all(|&b| b == c as u8 + 1));
        }
        assert_eq!(spill.slots().slots.len(), 7);
        e.release(1).unwrap();
        assert_eq!(e.store_usage(), StoreUsage::default());
        assert_eq!(spill.slots().clears, 1, "the spill was not given back");
        assert!(spill.slots().slots.is_empty());
    }

    #[test]
    fn a_chunk_the_spill_cannot_take_breaks_the_epochs_that_need_it() {
        let (mut e, spill) = epochs(0);
        e.record(ChangeKind::Data, 0..CHUNK, 0);
        e.seal(false, 0);
        e.record(ChangeKind::Data, CHUNK..2 * CHUNK, 0);
        e.seal(false, 0);
        spill.slots().fail_writes = true;
        e.preserve(0, &[1; CHUNK as usize]);
        assert!(matches!(
            e.check_read(1, 0..CHUNK),
            Err(EpochError::Broken { .. })
        ));
        assert!(e.check_read(2, CHUNK..2 * CHUNK).is_ok());
        assert_eq!(e.store_usage(), StoreUsage::default());
        // A broken epoch asks nothing kept, and nothing is kept for it.
        assert!(e.to_preserve(0..CHUNK).is_empty());
        spill.slots().fail_writes = false;
        e.preserve(0, &[1; CHUNK as usize]);
        assert_eq!(e.store_usage(), StoreUsage::default());
        // The slot of the failed write is used again.
        e.preserve(1, &[2; CHUNK as usize]);
        assert_eq!(
            spill.slots().slots.keys().copied().collect::<Vec<_>>(),
            vec![0]
        );
        assert_eq!(e.store_usage().spilled_bytes, CHUNK);
    }

    #[test]
    fn change_ages_follow_the_time_given() {
        let spill = Arc::new(MemSpill::default());
        let mut resync = RangeSet::new();
        resync.insert(0..CHUNK);
        let mut e = Epochs::new(64 * CHUNK, 0, 0, resync, 0, spill, 1_000);
        // Resync ranges count from when they were found.
        assert_eq!(e.oldest_change_ms(), Some(1_000));
        assert_eq!(e.seal(false, 2_000), 1);
        let s = e.get(1).unwrap();
        assert_eq!((s.sealed_ms, s.first_change_ms), (2_000, Some(1_000)));
        assert_eq!(e.oldest_change_ms(), Some(1_000));
        // The current epoch's age is its first change's, not a later one's.
        e.record(ChangeKind::Data, CHUNK..2 * CHUNK, 3_000);
        e.record(ChangeKind::Zeroed, 4 * CHUNK..5 * CHUNK, 4_000);
        e.release(1).unwrap();
        assert_eq!(e.oldest_change_ms(), Some(3_000));
        // A request carried over a cut counts from the cut.
        assert_eq!(e.seal(true, 5_000), 2);
        e.record_carried(ChangeKind::Data, CHUNK..2 * CHUNK, 5_000);
        e.release(2).unwrap();
        assert_eq!(e.oldest_change_ms(), Some(5_000));
        assert_eq!(e.seal(false, 6_000), 3);
        e.release(3).unwrap();
        assert_eq!(e.oldest_change_ms(), None, "nothing unreleased");
        // A broken epoch's changes move on with their age.
        e.record(ChangeKind::Data, 0..CHUNK, 7_000);
        e.seal(false, 8_000);
        e.preserve_failed(0, "disk full");
        e.resync_all(9_000);
        e.release(4).unwrap();
        assert_eq!(e.oldest_change_ms(), Some(7_000));
        e.seal(false, 10_000);
        e.release(5).unwrap();
        e.resync_all(11_000);
        assert_eq!(e.oldest_change_ms(), Some(11_000));
    }

    /// A `sync` waits for the changes of a broken epoch where they went:
    /// released unsent, they are in a later epoch (which may break too).
    #[test]
    fn a_broken_epochs_changes_are_waited_for_where_they_moved() {
        let (mut e, _d) = epochs(1 << 20);
        e.record(ChangeKind::Data, 0..CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        e.record(ChangeKind::Data, 2 * CHUNK..3 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 2);
        // A sync now waits for epoch 2.
        assert_eq!(e.carried_target(2), 2);
        e.release(1).unwrap();
        assert_eq!(e.carried_target(2), 2, "epoch 1 was sent");
        e.preserve_failed(2, "disk full");
        e.release(2).unwrap();
        assert_eq!(e.released(), 2);
        assert_eq!(
            e.changes().resync.iter().collect::<Vec<_>>(),
            vec![2 * CHUNK..3 * CHUNK]
        );
        assert_eq!(e.carried_target(2), 3, "epoch 2's changes are in epoch 3");
        assert_eq!(e.carried_target(1), 1, "epoch 1's are not");
        // Epoch 3 breaks too: 4 holds them.
        assert_eq!(e.seal(false, 0), 3);
        e.preserve_failed(2, "disk full");
        e.release(3).unwrap();
        assert_eq!(e.carried_target(2), 4);
        // A sync that began later, with its own target, waits for no less.
        assert_eq!(e.carried_target(5), 5);
    }

    /// A chunk that could not be kept breaks the epochs still to read it,
    /// not one whose consumer took it already (a resync for nothing).
    #[test]
    fn a_failed_copy_breaks_only_epochs_that_still_need_the_chunk() {
        let (mut e, _d) = epochs(1 << 20);
        e.record(ChangeKind::Data, 0..2 * CHUNK, 0);
        assert_eq!(e.seal(false, 0), 1);
        e.check_read(1, 0..CHUNK).unwrap();
        e.take(1, 0..CHUNK).unwrap();
        e.preserve_failed(0, "disk full");
        assert!(
            e.get(1).unwrap().broken.is_none(),
            "broken by a chunk it took"
        );
        e.preserve_failed(1, "disk full");
        assert!(e.get(1).unwrap().broken.is_some());
    }

    #[test]
    fn a_write_beside_the_change_in_a_chunk_preserves_it() {
        let (mut e, _d) = epochs(1 << 20);
        e.record(ChangeKind::Data, 10 * CHUNK + 1024..10 * CHUNK + 2048, 0);
        e.seal(false, 0);
        // The write misses the changed bytes but shares their chunk.
        assert_eq!(e.to_preserve(10 * CHUNK..10 * CHUNK + 512), vec![10]);
        // And the last, partial chunk of the device.
        e.record(ChangeKind::Data, 64 * CHUNK - 100..64 * CHUNK, 0);
        e.seal(false, 0);
        assert_eq!(e.to_preserve(63 * CHUNK..63 * CHUNK + 1), vec![63]);
    }

    #[test]
    fn zero_chunks_cost_nothing_to_preserve() {
        let (mut e, _d) = epochs(0);
        e.record(ChangeKind::Zeroed, 0..4 * CHUNK, 0);
        e.seal(false, 0);
        for c in 0..4 {
            e.preserve(c, &[0; CHUNK as usize]);
        }
        assert_eq!(e.store_usage(), StoreUsage::default());
        assert!(e.to_preserve(0..4 * CHUNK).is_empty(), "preserved twice");
        let mut buf = vec![9u8; 4 * CHUNK as usize];
        e.overlay(1, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn reads_are_limited_to_what_the_epoch_changed() {
        let (mut e, _d) = epochs(1 << 20);
        e.record(ChangeKind::Data, CHUNK..CHUNK + 10, 0);
        e.seal(false, 0);
        e.check_read(1, CHUNK..2 * CHUNK).unwrap();
        assert!(matches!(
            e.check_read(1, 0..2 * CHUNK),
            Err(EpochError::OutsideEpoch { .. })
        ));
        assert!(matches!(
            e.check_read(2, CHUNK..2 * CHUNK),
            Err(EpochError::NotSealed { .. })
        ));
        e.preserve_failed(1, "disk full");
        assert!(matches!(
            e.check_read(1, CHUNK..2 * CHUNK),
            Err(EpochError::Broken { .. })
        ));
        // Releasing the broken epoch keeps its changes, as resync ranges.
        e.release(1).unwrap();
        assert_eq!(
            e.changes().resync.iter().collect::<Vec<_>>(),
            vec![CHUNK..CHUNK + 10]
        );
        assert!(e.unreleased().contains_range(CHUNK..CHUNK + 10));
    }
}
