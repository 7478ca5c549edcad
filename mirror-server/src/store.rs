//! Volumes on the server's disk: a sparse image that always holds one
//! published epoch, and the staging through which the next one arrives.
//!
//! # On-disk layout
//!
//! `state.json` is format 1; the staging log is format 2 (format 1 was a
//! postcard index written at commit, which could not be resumed).
//!
//! ```text
//! VOLUME_DIR/
//!   image            sparse file, the volume as of the published epoch
//!   state.json       {"format":1,"size":..,"published_epoch":..,"published_ms":..,
//!                     "uuid":"<hex>","owner":"<device hex>"|null,"writer_epoch":..}
//!   staging/
//!     N.data         decoded bytes of epoch N's data blocks, in arrival order
//!     N.log          32-byte header ("UBMS", format u32 LE = 2, the writer's
//!                    device [16] and epoch u64 LE), then one 52-byte record
//!                    per staged block, appended as it is staged: offset
//!                    u64 LE, len u32 LE, offset in N.data u64 LE (all
//!                    ones: a zero block), sha256 [32]
//!     N.adopted      present while N was taken over from an earlier epoch
//!                    of the same device (its daemon restarted mid-epoch):
//!                    the client must vouch for every staged block
//!     N.commit       written (via rename) once N.data and N.log are
//!                    durable: the epoch is complete and must be published;
//!                    JSON {"device":"<hex>","epoch":<the device's epoch>}
//! ```
//!
//! # Resuming an interrupted epoch
//!
//! An epoch's blocks may come over several streams and several
//! connections. When a connection breaks, the staging stays (in memory and
//! on disk); when the same writer begins the same epoch again, the server
//! tells it which byte ranges it holds already and only the rest travels.
//! After a server restart, the log's blocks are checked against their
//! hashes before they count (the data may not have reached the disk).
//!
//! When the device's daemon restarted mid-epoch, it comes back with
//! another epoch number (an unclean stop turns what was unreleased into
//! resync ranges of its first epoch). Its new epoch *takes over* the
//! staging: the client is told so, asks the staged blocks' digests and
//! sends again only those that differ from its own, plus any staged block
//! it would not have sent; later blocks overwrite earlier ones when the
//! epoch is published, so what is published is the new epoch exactly.
//!
//! # Why a reader never sees half an epoch
//!
//! Blocks are verified (sha256 after decoding) and staged; nothing touches
//! the image until the whole epoch is staged durably and its commit marker
//! exists. Publishing then applies the staged blocks to the image, syncs
//! it, and records the epoch in `state.json` (written to a temporary file,
//! synced, renamed, directory synced), before the staging is removed. If
//! the server dies anywhere in that sequence, opening the volume finds the
//! commit marker of an epoch newer than the published one and applies it
//! again (writing the same bytes to the same places is harmless), so the
//! image ends as exactly that epoch. A staging without a commit marker is
//! an epoch the client never saw acknowledged: it is kept for the client
//! to resume, and dropped when another epoch begins. Readers of snapshots
//! (exports, restores) need no lock on the volume: see
//! [`SnapshotReader`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use ublk_mirror_common::hex::{self, encode as hex_encode};
use ublk_mirror_common::proto::{Digest, Encoding, Writer, MAX_BLOCK, NOT_STAGED};
use ublk_mirror_common::RangeSet;
use ublk_mirror_common::{block, fsutil};

use crate::error::{Error, Result};
use crate::snapshots::{Kind, Pin, Retention, SnapshotInfo, Snapshots, CHUNK as SNAPSHOT_CHUNK};
use ublk_mirror_common::clock::now_ms;

/// Where the volumes live in the data directory: `volumes/CLIENT/VOLUME/`.
pub const VOLUMES_DIR: &str = "volumes";

const STATE_FORMAT: u32 = 1;
const IMAGE: &str = "image";
const STATE: &str = "state.json";
const STAGING: &str = "staging";

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// Format of this file.
    pub format: u32,
    /// Volume size in bytes.
    pub size: u64,
    /// The epoch the image holds (0: none yet, the image is all zeroes).
    pub published_epoch: u64,
    /// When it was published, ms since the Unix epoch (0: never).
    pub published_ms: u64,
    /// Made at creation: a volume made again is another volume (hex).
    pub uuid: String,
    /// The device whose epochs this volume takes (hex), once it sent one.
    pub owner: Option<String>,
    /// That device's own number for the published epoch.
    pub writer_epoch: u64,
}

impl VolumeState {
    /// The uuid as bytes.
    pub fn uuid_bytes(&self) -> [u8; 16] {
        hex::decode(&self.uuid).unwrap_or_default()
    }

    /// The device and local epoch the image holds.
    pub fn writer(&self) -> Option<Writer> {
        let device = hex::decode(self.owner.as_deref()?)?;
        Some(Writer {
            device,
            epoch: self.writer_epoch,
        })
    }
}

/// What a commit marker records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Marker {
    device: [u8; 16],
    epoch: u64,
}

/// A staged block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    offset: u64,
    len: u32,
    /// Offset of its bytes in `N.data`; `None`: zeroes.
    data_at: Option<u64>,
    sha256: Digest,
}

/// What opening a volume found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// An epoch whose commit was interrupted, now published.
    pub completed: Option<u64>,
    /// Incomplete stagings dropped (their clients send them again).
    pub dropped: Vec<u64>,
    /// Incomplete stagings kept: their client resumes them.
    pub resumable: Vec<u64>,
}

/// One volume: its image and state.
#[derive(Debug)]
pub struct Volume {
    dir: PathBuf,
    image: Arc<File>,
    state: VolumeState,
    /// A publication failed: what the image holds is unknown until a
    /// committed staging is applied again (at the next begin or open).
    poisoned: bool,
    /// The epoch being staged (kept when its connection breaks, so that
    /// the client resumes it).
    active: Option<Arc<Staging>>,
    /// Its point-in-time versions, shared with their readers (see
    /// [`SnapshotReader`]).
    snapshots: Arc<RwLock<Snapshots>>,
}

/// Chunks preserved for snapshots per hold of the snapshots' lock while
/// an epoch is published (16 MiB).
const PRESERVE_BATCH: usize = 256;

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

fn sync_dir(dir: &Path) -> Result<()> {
    fsutil::sync_dir(dir).map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

fn staging_path(dir: &Path, epoch: u64, ext: &str) -> PathBuf {
    dir.join(STAGING).join(format!("{epoch}.{ext}"))
}

impl Volume {
    /// Create a volume of `size` bytes in `dir` (which must not exist).
    pub fn create(dir: &Path, size: u64) -> Result<Volume> {
        if dir.exists() {
            return Err(Error::Invalid(format!(
                "volume directory {} exists already",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir.join(STAGING))
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let image = File::create(dir.join(IMAGE))
            .and_then(|f| f.set_len(size).map(|()| f))
            .map_err(|e| Error::io(format!("creating the image in {}", dir.display()), e))?;
        image
            .sync_all()
            .map_err(|e| Error::io("syncing the new image", e))?;
        let mut uuid = [0u8; 16];
        getrandom::fill(&mut uuid)
            .map_err(|e| Error::Invalid(format!("no randomness for the volume's uuid: {e}")))?;
        let state = VolumeState {
            format: STATE_FORMAT,
            size,
            published_epoch: 0,
            published_ms: 0,
            uuid: hex_encode(&uuid),
            owner: None,
            writer_epoch: 0,
        };
        write_state(dir, &state)?;
        // The directories made (VOLUME, CLIENT, volumes), so that the
        // volume survives a power cut.
        for parent in dir.ancestors().skip(1).take(3) {
            sync_dir(parent)?;
        }
        Volume::open(dir).map(|(v, _)| v)
    }

    /// Open a volume, finishing an interrupted publication and dropping
    /// incomplete stagings.
    pub fn open(dir: &Path) -> Result<(Volume, Recovery)> {
        let state = read_state(dir)?;
        if state.format != STATE_FORMAT {
            return Err(Error::Corrupt(format!(
                "{}: format {} is not supported (this is {STATE_FORMAT})",
                dir.join(STATE).display(),
                state.format
            )));
        }
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(IMAGE))
            .map_err(|e| Error::io(format!("opening the image in {}", dir.display()), e))?;
        let mut volume = Volume {
            dir: dir.to_path_buf(),
            image: Arc::new(image),
            state,
            poisoned: false,
            active: None,
            snapshots: Arc::new(RwLock::new(Snapshots::open(dir)?)),
        };
        let recovery = volume.recover()?;
        // Temporary snapshots whose reader a crash took away.
        let temporary: Vec<String> = volume
            .snapshots()
            .list()
            .iter()
            .filter(|s| s.kind == Kind::Temporary)
            .map(|s| s.name.clone())
            .collect();
        for name in temporary {
            volume.snapshots_mut().delete(&name)?;
        }
        Ok((volume, recovery))
    }

    fn recover(&mut self) -> Result<Recovery> {
        let mut recovery = Recovery::default();
        for (epoch, committed) in staging_epochs(&self.dir)? {
            if committed && epoch > self.state.published_epoch {
                tracing::warn!(
                    epoch,
                    "finishing the publication of an epoch interrupted by a crash"
                );
                let marker = read_marker(&staging_path(&self.dir, epoch, "commit"))?;
                self.publish(epoch, marker, None)?;
                recovery.completed = Some(epoch);
            } else if !committed
                && epoch > self.state.published_epoch
                && read_log_header(&staging_path(&self.dir, epoch, "log")).is_ok()
            {
                // Its client may come back for it: kept until then.
                recovery.resumable.push(epoch);
                continue;
            } else if !committed {
                recovery.dropped.push(epoch);
            }
            remove_staging(&self.dir, epoch);
        }
        Ok(recovery)
    }

    /// The volume's state.
    pub fn state(&self) -> &VolumeState {
        &self.state
    }

    /// Its snapshots.
    pub fn snapshots(&self) -> RwLockReadGuard<'_, Snapshots> {
        self.snapshots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshots_mut(&self) -> RwLockWriteGuard<'_, Snapshots> {
        self.snapshots.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader of its snapshots that needs no lock on the volume: exports
    /// and restores read on while epochs are published.
    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader {
            snapshots: self.snapshots.clone(),
            image: self.image.clone(),
            size: self.state.size,
        }
    }

    /// Take a snapshot of the published epoch, named `name` or after the
    /// time.
    pub fn snapshot(&mut self, name: Option<&str>, kind: Kind) -> Result<SnapshotInfo> {
        if self.poisoned {
            // Never a snapshot of half an epoch.
            self.active = None;
            self.recover()?;
            self.poisoned = false;
        }
        self.snapshots_mut().create(
            name,
            self.state.published_epoch,
            self.state.published_ms,
            now_ms(),
            kind,
        )
    }

    /// Delete snapshot `name` (refused while it is read). Its chunks are
    /// handed to the next older one a batch per hold of the snapshots'
    /// lock, so readers of other snapshots go on meanwhile.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<SnapshotInfo> {
        // Planned once; each batch under its own hold of the lock (only
        // this volume's holder changes snapshots, so the plan stays true).
        let plan = self.snapshots().hand_over_plan(name);
        for batch in &plan {
            self.snapshots_mut().hand_over(name, batch)?;
        }
        self.snapshots_mut().delete(name)
    }

    /// Prune scheduled snapshots by `retention`; their names.
    pub fn prune_snapshots(&mut self, retention: &Retention) -> Result<Vec<String>> {
        let names = self.snapshots().prunable(retention, now_ms());
        for name in &names {
            self.delete_snapshot(name)?;
        }
        Ok(names)
    }

    /// Keep snapshot `name` while the pin lives (for readers).
    pub fn pin_snapshot(&mut self, name: &str) -> Result<(SnapshotInfo, Pin)> {
        self.snapshots_mut().pin(name)
    }

    /// Pin the version `at` names for a reader: a snapshot's name, a time
    /// (the newest snapshot at or before it), or `None` for the published
    /// epoch now (a temporary snapshot, which the reader deletes with
    /// [`Volume::done_reading`]).
    pub fn pin_version(&mut self, at: Option<&str>) -> Result<(SnapshotInfo, Pin)> {
        match at {
            None => {
                let name = format!("reader-{}", crate::snapshots::time_name(now_ms()));
                let mut unique = name.clone();
                let mut k = 1;
                while self.snapshots().get(&unique).is_some() {
                    k += 1;
                    unique = format!("{name}-{k}");
                }
                self.snapshot(Some(&unique), Kind::Temporary)?;
                self.snapshots_mut().pin(&unique)
            }
            Some(a) if self.snapshots().get(a).is_some() => self.snapshots_mut().pin(a),
            Some(a) => {
                let Some(ms) = crate::snapshots::parse_time(a) else {
                    return Err(Error::Invalid(format!(
                        "there is no snapshot {a} (name one, or give a time like 2026-11-22T16:30Z)"
                    )));
                };
                let name = self
                    .snapshots()
                    .at(ms)
                    .map(|s| s.name.clone())
                    .ok_or_else(|| Error::Invalid(format!("there is no snapshot as old as {a}")))?;
                self.snapshots_mut().pin(&name)
            }
        }
    }

    /// A reader of `info` is done: a temporary snapshot is deleted.
    pub fn done_reading(&mut self, info: &SnapshotInfo, pin: Pin) -> Result<()> {
        drop(pin);
        if info.kind == Kind::Temporary {
            self.delete_snapshot(&info.name)?;
        }
        Ok(())
    }

    /// Whether snapshot `id` holds data at `offset`, and how far the same
    /// answer goes.
    pub fn snapshot_extent(&self, id: u64, offset: u64) -> Result<(bool, u64)> {
        self.reader().extent(id, offset)
    }

    /// Read snapshot `id` at `offset`.
    pub fn read_snapshot(&self, id: u64, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reader().read(id, buf, offset)
    }

    /// Read the image (the published epoch) at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.state.size)
        {
            return Err(Error::Invalid(format!(
                "read of {} bytes at {offset} is past the end of the volume",
                buf.len()
            )));
        }
        self.image
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("reading the image", e))
    }

    /// The sha256 of each block of the image (the published epoch).
    pub fn hashes(&self, blocks: &[(u64, u32)]) -> Result<Vec<Digest>> {
        let mut buf = Vec::new();
        blocks
            .iter()
            .map(|&(offset, len)| {
                buf.resize(len as usize, 0);
                self.read_at(&mut buf, offset)?;
                Ok(block::digest(&buf))
            })
            .collect()
    }

    /// Start staging `epoch` of `writer`, which must be newer than the
    /// published one. A volume takes epochs from one device only.
    ///
    /// An interrupted attempt at the same epoch of the same writer is
    /// resumed: in memory when this process took it, else from its
    /// `N.log`, whose blocks are checked against their hashes first (what
    /// fails is dropped). Any other staging is dropped. A staging that was
    /// committed but not published (a failed publication) is published
    /// first.
    pub fn begin(&mut self, epoch: u64, writer: Writer) -> Result<Arc<Staging>> {
        if self.poisoned {
            self.active = None;
            self.recover()?;
            self.poisoned = false;
        }
        if let Some(owner) = self.state.writer().map(|w| w.device) {
            if owner != writer.device {
                return Err(Error::Invalid(format!(
                    "this volume is mirrored by another device ({}); mirror this one to another volume name",
                    hex_encode(&owner)
                )));
            }
        }
        if epoch <= self.state.published_epoch {
            return Err(Error::Invalid(format!(
                "epoch {epoch} is not newer than the published epoch {}",
                self.state.published_epoch
            )));
        }
        // This process's staging: the same epoch resumed, or an earlier
        // epoch of the same device taken over.
        let mut verify = true;
        let mut reserved = 0u64;
        if let Some(s) = self.active.take() {
            if s.epoch == epoch && s.writer == writer && s.is_open() {
                self.active = Some(s.clone());
                return Ok(s);
            }
            if s.epoch == epoch && s.writer.device == writer.device {
                if let Some(end) = s.close_for_adoption() {
                    // Its blocks are in this process's page cache: no need
                    // to read them back. Its streams may still be writing
                    // data they reserved: new data goes after all of it.
                    verify = false;
                    reserved = end;
                }
            }
        }
        let log_path = staging_path(&self.dir, epoch, "log");
        let left = (log_path.exists() && !staging_path(&self.dir, epoch, "commit").exists())
            .then(|| read_log_header(&log_path).ok())
            .flatten();
        let resumable = left.is_some_and(|w| w.device == writer.device);
        for (n, _) in staging_epochs(&self.dir)? {
            if !(resumable && n == epoch) {
                remove_staging(&self.dir, n);
            }
        }
        let staging = if resumable {
            if left != Some(writer) {
                // Taken over: marked so (durably) until it is published, so
                // that the client vouches for its blocks on every attempt.
                fsutil::write_durably(&staging_path(&self.dir, epoch, "adopted"), b"")
                    .map_err(|e| Error::io("marking a staging taken over", e))?;
                tracing::info!(
                    epoch,
                    from = left.map_or(0, |w| w.epoch),
                    to = writer.epoch,
                    "a restarted device takes over its earlier epoch's staging"
                );
            }
            Staging::resume(&self.dir, epoch, writer, self.state.size, verify, reserved)?
        } else {
            Staging::create(&self.dir, epoch, writer, self.state.size)?
        };
        let staging = Arc::new(staging);
        self.active = Some(staging.clone());
        Ok(staging)
    }

    /// The epoch being staged, if it is `epoch`: for data streams.
    pub fn staging(&self, epoch: u64) -> Option<Arc<Staging>> {
        self.active
            .as_ref()
            .filter(|s| s.epoch == epoch && s.is_open())
            .cloned()
    }

    /// Publish a fully staged epoch: durable staging, commit marker, apply
    /// to the image, record the state. When this returns, the image is the
    /// epoch, durably. Refused if blocks that failed their checks were not
    /// staged since, or if the staging is not the volume's current one
    /// (another connection took the epoch over).
    pub fn commit(&mut self, staging: &Arc<Staging>) -> Result<()> {
        self.commit_until(staging, None)
    }

    /// [`Volume::commit`], stopping after `stop` as if the process died
    /// there (what is on disk is left as it is); for crash tests.
    fn commit_until(&mut self, staging: &Arc<Staging>, stop: Option<CommitStep>) -> Result<()> {
        if !self
            .active
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, staging))
        {
            return Err(Error::Invalid(format!(
                "epoch {} is no longer being staged here (another connection took it over)",
                staging.epoch
            )));
        }
        staging.close()?;
        self.active = None;
        let result = self.apply(staging, stop);
        if result.is_err() {
            // The image may hold part of the epoch: publish it again
            // before anything else (next begin, or next open).
            self.poisoned = true;
        }
        result
    }

    fn apply(&mut self, staging: &Staging, stop: Option<CommitStep>) -> Result<()> {
        let epoch = staging.epoch;
        staging
            .data
            .sync_all()
            .and_then(|()| staging.log.sync_all())
            .map_err(|e| Error::io("syncing the staged epoch", e))?;
        // The staged files' names durable before the marker that says
        // they are complete.
        sync_dir(&self.dir.join(STAGING))?;
        if stop == Some(CommitStep::Staged) {
            return Ok(());
        }
        let marker = Marker {
            device: staging.writer.device,
            epoch: staging.writer.epoch,
        };
        let marker_json = serde_json::to_vec(&marker).map_err(|e| Error::Corrupt(e.to_string()))?;
        fsutil::write_durably(&staging_path(&self.dir, epoch, "commit"), &marker_json)
            .map_err(|e| Error::io("writing the commit marker", e))?;
        if stop == Some(CommitStep::Marked) {
            return Ok(());
        }
        let limit = match stop {
            Some(CommitStep::HalfApplied) => Some(staging.blocks() / 2),
            _ => None,
        };
        self.publish(epoch, marker, limit)?;
        if stop.is_some() {
            return Ok(());
        }
        remove_staging(&self.dir, epoch);
        Ok(())
    }

    /// Apply the blocks of epoch `epoch`'s log (the first `limit` of them,
    /// for crash tests, which also leave the state unrecorded) to the image
    /// and record the epoch.
    fn publish(&mut self, epoch: u64, marker: Marker, limit: Option<usize>) -> Result<()> {
        let data_path = staging_path(&self.dir, epoch, "data");
        let data = File::open(&data_path)
            .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
        let log_path = staging_path(&self.dir, epoch, "log");
        // What the epoch overwrites is kept for the newest snapshot first.
        if !self.snapshots().list().is_empty() {
            let mut chunks = BTreeSet::new();
            let mut log = LogReader::open(&log_path)?;
            while let Some(e) = log.next_entry()? {
                if e.len > 0 {
                    let end = e.offset.saturating_add(u64::from(e.len)) - 1;
                    chunks.extend(e.offset / SNAPSHOT_CHUNK..=end / SNAPSHOT_CHUNK);
                }
            }
            // In batches, each under the snapshots' write lock: readers
            // of snapshots (exports, restores) go on in between, and see
            // each chunk either still in the image or already preserved.
            // Everything is preserved before the image changes.
            let chunks: Vec<u64> = chunks.into_iter().collect();
            for batch in chunks.chunks(PRESERVE_BATCH) {
                self.snapshots_mut().preserve(
                    &self.image,
                    self.state.size,
                    &batch.iter().copied().collect(),
                )?;
            }
        }
        let mut log = LogReader::open(&log_path)?;
        let mut buf = Vec::new();
        let mut applied = 0usize;
        while let Some(e) = log.next_entry()? {
            if limit.is_some_and(|l| applied >= l) {
                break;
            }
            if e.offset
                .checked_add(u64::from(e.len))
                .is_none_or(|end| end > self.state.size)
            {
                return Err(Error::Corrupt(format!(
                    "{}: a block at {} is past the end of the volume",
                    log_path.display(),
                    e.offset
                )));
            }
            match e.data_at {
                Some(at) => {
                    buf.resize(e.len as usize, 0);
                    data.read_exact_at(&mut buf, at).map_err(|err| {
                        Error::io(format!("reading {}", data_path.display()), err)
                    })?;
                    self.image
                        .write_all_at(&buf, e.offset)
                        .map_err(|err| Error::io("writing the image", err))?;
                }
                None => fsutil::punch_or_zero(&self.image, e.offset, u64::from(e.len))
                    .map_err(|err| Error::io("punching a hole in the image", err))?,
            }
            applied += 1;
        }
        self.image
            .sync_all()
            .map_err(|e| Error::io("syncing the image", e))?;
        if limit.is_some() {
            return Ok(());
        }
        let state = VolumeState {
            published_epoch: epoch,
            published_ms: now_ms(),
            owner: Some(hex_encode(&marker.device)),
            writer_epoch: marker.epoch,
            ..self.state.clone()
        };
        write_state(&self.dir, &state)?;
        self.state = state;
        tracing::info!(epoch, blocks = applied, "epoch published");
        Ok(())
    }
}

/// Where a simulated crash stops [`Volume::commit`] (crash tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum CommitStep {
    /// Data and index durable, no commit marker.
    Staged,
    /// Commit marker written, image untouched.
    Marked,
    /// Half the blocks applied to the image, state not recorded.
    HalfApplied,
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
    let dirs = |p: &Path| -> Result<Vec<(String, PathBuf)>> {
        let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(p)
            .map_err(|e| Error::io(format!("listing {}", p.display()), e))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut out = Vec::new();
    for (client, cdir) in dirs(&root)? {
        for (volume, vdir) in dirs(&cdir)? {
            out.push((format!("{client}/{volume}"), read_state(&vdir)?));
        }
    }
    Ok(out)
}

/// Make volume `dir` from the image file `from` (seeding a mirror with a
/// copy brought by other means): its size, its content as published epoch
/// 1, owned by no device yet (the first device to mirror to it compares
/// by hash and sends only what differs). Built under a hidden name and
/// renamed into place when whole, so no client sees it half made.
/// `progress` gets the bytes copied so far.
pub fn import(dir: &Path, from: &Path, mut progress: impl FnMut(u64, u64)) -> Result<VolumeState> {
    if dir.exists() {
        return Err(Error::Invalid(format!(
            "volume directory {} exists already",
            dir.display()
        )));
    }
    let source =
        File::open(from).map_err(|e| Error::io(format!("opening {}", from.display()), e))?;
    // A block device's length is its end, not its metadata.
    let size = std::io::Seek::seek(&mut &source, std::io::SeekFrom::End(0))
        .map_err(|e| Error::io(format!("sizing {}", from.display()), e))?;
    if size == 0 {
        return Err(Error::Invalid(format!("{} is empty", from.display())));
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

/// A volume's `state.json`, read only (no recovery).
pub fn read_state(dir: &Path) -> Result<VolumeState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

/// An epoch being received: verified blocks, staged on disk. Shared by
/// the data streams that carry it: blocks are decoded and verified outside
/// its lock, which covers only the bookkeeping.
#[derive(Debug)]
pub struct Staging {
    epoch: u64,
    writer: Writer,
    size: u64,
    data: File,
    log: File,
    /// Taken over from an earlier epoch of the device.
    adopted: bool,
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
    /// Bytes of the volume the staged blocks cover.
    staged: RangeSet,
    /// Blocks refused and not staged since.
    failed: BTreeSet<(u64, u32)>,
    /// Committing: nothing more is staged.
    closed: bool,
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

    fn create(dir: &Path, epoch: u64, writer: Writer, size: u64) -> Result<Staging> {
        let data = Staging::open_file(&staging_path(dir, epoch, "data"), true)?;
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
    fn resume(
        dir: &Path,
        epoch: u64,
        writer: Writer,
        size: u64,
        verify: bool,
        reserved: u64,
    ) -> Result<Staging> {
        let data_path = staging_path(dir, epoch, "data");
        let log_path = staging_path(dir, epoch, "log");
        let data = Staging::open_file(&data_path, false)?;
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
                None => e.sha256 == zero_digest(e.len),
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
            "resuming an interrupted epoch"
        );
        Ok(Staging {
            epoch,
            writer,
            size,
            data,
            log,
            adopted,
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

    /// Stop staging so that a later epoch of the device takes the files
    /// over; the end of the data reserved so far, or `None` if it was
    /// closed already (being committed).
    fn close_for_adoption(&self) -> Option<u64> {
        let mut inner = self.lock();
        (!std::mem::replace(&mut inner.closed, true)).then_some(inner.data_len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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

    fn is_open(&self) -> bool {
        !self.lock().closed
    }

    /// Stop staging, for the commit; refused while blocks that failed
    /// their checks were not staged since.
    fn close(&self) -> Result<()> {
        let mut inner = self.lock();
        if let Some(&(offset, _)) = inner.failed.iter().next() {
            return Err(Error::Invalid(format!(
                "epoch {}: {} blocks failed their checks and were not sent again (the first at {offset})",
                self.epoch,
                inner.failed.len()
            )));
        }
        inner.closed = true;
        Ok(())
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
        let checked = self.check(offset, len, sha256, encoding, bytes);
        let plain = match checked {
            Ok(plain) => plain,
            Err(e) => {
                if matches!(e, Error::BadBlock(_)) {
                    self.lock().failed.insert((offset, len));
                }
                return Err(e);
            }
        };
        let closed = || Error::Invalid(format!("epoch {} is no longer being staged", self.epoch));
        let data_at = match &plain {
            Some(p) => {
                let at = {
                    let mut inner = self.lock();
                    if inner.closed {
                        return Err(closed());
                    }
                    let at = inner.data_len;
                    inner.data_len += u64::from(len);
                    at
                };
                self.data
                    .write_all_at(p, at)
                    .map_err(|e| Error::io("staging a block", e))?;
                Some(at)
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
        if inner.closed {
            return Err(closed());
        }
        self.log
            .write_all_at(&entry.record(), inner.log_len)
            .map_err(|e| Error::io("logging a staged block", e))?;
        inner.log_len += RECORD as u64;
        inner.blocks += 1;
        inner.staged.insert(offset..offset + u64::from(len));
        inner.stage_digest(offset, len, *sha256);
        inner.failed.remove(&(offset, len));
        Ok(())
    }

    /// The decoded bytes of a block, once they match its hash (`None`: a
    /// zero block).
    fn check(
        &self,
        offset: u64,
        len: u32,
        sha256: &Digest,
        encoding: Encoding,
        bytes: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        // A block that cannot be right is the sender's bug, not the
        // link's: not asked for again.
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.size)
        {
            return Err(Error::Invalid(format!(
                "block of {len} bytes at {offset} is past the end of the volume ({} bytes)",
                self.size
            )));
        }
        let plain = block::decode(len, sha256, encoding, bytes).map_err(|e| {
            if e.is_damage() {
                Error::BadBlock(format!("block at {offset}: {e}"))
            } else {
                Error::Invalid(e.to_string())
            }
        })?;
        Ok(plain)
    }
}

/// Bytes of `N.log`'s header: [`LOG_MAGIC`], format (u32 LE), the writer's
/// device and epoch (u64 LE).
const LOG_HEADER: usize = 32;
/// Bytes of one `N.log` record (see [`Entry::record`]).
const RECORD: usize = 52;
const LOG_MAGIC: [u8; 4] = *b"UBMS";
const LOG_FORMAT: u32 = 2;

fn log_header(writer: Writer) -> [u8; LOG_HEADER] {
    let mut h = [0u8; LOG_HEADER];
    h[..4].copy_from_slice(&LOG_MAGIC);
    h[4..8].copy_from_slice(&LOG_FORMAT.to_le_bytes());
    h[8..24].copy_from_slice(&writer.device);
    h[24..32].copy_from_slice(&writer.epoch.to_le_bytes());
    h
}

fn read_log_header(path: &Path) -> Result<Writer> {
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

impl Entry {
    /// The entry as an `N.log` record: offset (u64 LE), len (u32 LE),
    /// offset in `N.data` (u64 LE, all ones for a zero block), sha256.
    fn record(&self) -> [u8; RECORD] {
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
struct LogReader {
    file: std::io::BufReader<File>,
}

impl LogReader {
    fn open(path: &Path) -> Result<LogReader> {
        read_log_header(path)?;
        let mut file = File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(LOG_HEADER as u64))
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(LogReader { file })
    }

    fn next_entry(&mut self) -> Result<Option<Entry>> {
        let mut r = [0u8; RECORD];
        match std::io::Read::read_exact(&mut self.file, &mut r) {
            Ok(()) => Ok(Some(Entry::from_record(&r))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(Error::io("reading a staging log", e)),
        }
    }
}

/// The epochs with files in the staging directory, and whether each has
/// its commit marker; sorted.
fn staging_epochs(dir: &Path) -> Result<Vec<(u64, bool)>> {
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

pub use ublk_mirror_common::block::zero_digest;

fn read_marker(path: &Path) -> Result<Marker> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

fn remove_staging(dir: &Path, epoch: u64) {
    for ext in [
        "commit",
        "commit.tmp",
        "log",
        "log.tmp",
        "data",
        "adopted",
        "adopted.tmp",
    ] {
        let _ = std::fs::remove_file(staging_path(dir, epoch, ext));
    }
}

fn write_state(dir: &Path, state: &VolumeState) -> Result<()> {
    let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Corrupt(e.to_string()))?;
    fsutil::write_durably(&dir.join(STATE), &text)
        .map_err(|e| Error::io(format!("writing {}", dir.join(STATE).display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn block(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add((i % 253) as u8))
            .collect()
    }

    fn me(epoch: u64) -> Writer {
        Writer {
            device: [1; 16],
            epoch,
        }
    }

    fn digest(b: &[u8]) -> Digest {
        use sha2::Digest as _;
        sha2::Sha256::digest(b).into()
    }

    /// A thread checking reads while the test changes the volume: at
    /// least 50, and on until stopped.
    struct Checker {
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<u64>,
    }

    impl Checker {
        /// Call `check(read number, place, length)` on pseudo-random
        /// places (xorshift from `seed`) inside `size`, each 1 to `blocks`
        /// 4 KiB blocks long.
        fn start(
            seed: u64,
            blocks: u64,
            size: u64,
            check: impl Fn(u64, u64, usize) + Send + 'static,
        ) -> Checker {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = stop.clone();
            let thread = std::thread::spawn(move || {
                let (mut reads, mut x) = (0u64, seed);
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) || reads < 50 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 4096 * (1 + (x % blocks));
                    check(reads, (x >> 20) % (size - len), len as usize);
                    reads += 1;
                }
                reads
            });
            Checker { stop, thread }
        }

        /// Stop, and check that it read at least 50 times.
        fn stop(self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(self.thread.join().unwrap() >= 50);
        }
    }

    /// Publish epoch `epoch` of `v` as `image`, whole, in 1 MiB blocks.
    fn publish_whole(v: &mut Volume, epoch: u64, image: &[u8]) {
        let s = v.begin(epoch, me(epoch)).unwrap();
        for at in (0..image.len()).step_by(1 << 20) {
            let b = &image[at..][..1 << 20];
            s.add(at as u64, 1 << 20, &digest(b), Encoding::Raw, b)
                .unwrap();
        }
        v.commit(&s).unwrap();
    }

    /// Snapshot readers (exports, restores) need no volume lock: while
    /// epochs that overwrite everything are published, concurrent reads
    /// of older snapshots always return those snapshots exactly.
    #[test]
    fn snapshot_readers_see_their_version_while_epochs_publish() {
        const BIG: u64 = 24 << 20; // 384 chunks: two preserve batches
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::create(&dir.path().join("vol"), BIG).unwrap();
        let publish = |v: &mut Volume, epoch: u64| -> Vec<u8> {
            let image: Vec<u8> = (0..BIG as usize)
                .map(|i| (i / 4096) as u8 ^ (epoch as u8).wrapping_mul(37))
                .collect();
            publish_whole(v, epoch, &image);
            image
        };
        let one = publish(&mut v, 1);
        let first = v.snapshot(Some("one"), Kind::Manual).unwrap();
        let two = publish(&mut v, 2);
        let second = v.snapshot(Some("two"), Kind::Manual).unwrap();
        let reader = v.reader();
        let checker = Checker::start(12345, 128, BIG, move |read, at, len| {
            let mut buf = vec![0u8; len];
            let (id, want) = if read % 2 == 0 {
                (first.id, &one)
            } else {
                (second.id, &two)
            };
            reader.read(id, &mut buf, at).unwrap();
            assert!(
                buf == want[at as usize..at as usize + len],
                "read {read}: {len} bytes at {at} of snapshot {id} are not as they were"
            );
        });
        for epoch in 3..=5 {
            publish(&mut v, epoch);
        }
        checker.stop();
    }

    /// Deleting a newer snapshot (its chunks handed to the older one, a
    /// batch per hold of the lock) while the older one is read: every
    /// read still returns the older snapshot exactly, and its extents
    /// never call its data a hole.
    #[test]
    fn deleting_a_newer_snapshot_leaves_readers_of_an_older_one_exact() {
        const BIG: u64 = 24 << 20;
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::create(&dir.path().join("vol"), BIG).unwrap();
        let one: Vec<u8> = (0..BIG as usize)
            .map(|i| (i / 4096) as u8 ^ 37 | 1)
            .collect();
        publish_whole(&mut v, 1, &one);
        let first = v.snapshot(Some("one"), Kind::Manual).unwrap();
        v.snapshot(Some("two"), Kind::Manual).unwrap();
        // "two" is the newest: the next epochs' old chunks go to it, and
        // "one" reads through it.
        for epoch in 2..=3 {
            publish_whole(&mut v, epoch, &vec![epoch as u8; BIG as usize]);
        }
        let reader = v.reader();
        let checker = Checker::start(99, 64, BIG, move |_, at, len| {
            let mut buf = vec![0u8; len];
            reader.read(first.id, &mut buf, at).unwrap();
            assert!(
                buf == one[at as usize..at as usize + len],
                "{len} bytes at {at} of snapshot one are not as they were"
            );
            let (mapped, _) = reader.extent(first.id, at).unwrap();
            assert!(mapped, "snapshot one's data at {at} reported as a hole");
        });
        v.delete_snapshot("two").unwrap();
        checker.stop();
        assert!(v.snapshots().get("two").is_none());
    }

    #[test]
    fn epochs_are_verified_staged_and_published() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        assert_eq!(v.state().published_epoch, 0);
        let s = v.begin(1, me(1)).unwrap();
        let a = block(1, 8192);
        s.add(0, 8192, &digest(&a), Encoding::Raw, &a).unwrap();
        let b = block(2, 4096);
        let z = zstd::bulk::compress(&b, 3).unwrap();
        s.add(65536, 4096, &digest(&b), Encoding::Zstd, &z).unwrap();
        // Refused blocks: nothing staged, the epoch goes on.
        let err = s.add(0, 8192, &digest(&b), Encoding::Raw, &a).unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(s
            .add(0, 4096, &digest(&b), Encoding::Zstd, b"junk")
            .is_err());
        assert!(s
            .add(SIZE - 4096, 8192, &digest(&a), Encoding::Raw, &a)
            .is_err());
        assert_eq!(s.blocks(), 2);
        // Not visible before the commit.
        let mut buf = vec![0u8; 8192];
        v.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        // Blocks refused and not sent again keep the epoch from publishing.
        let err = v.commit(&s).unwrap_err().to_string();
        assert!(err.contains("2 blocks failed their checks"), "{err}");
        let s = v.begin(1, me(1)).unwrap();
        assert_eq!(s.ranges(), [(0, 8192), (65536, 4096)], "not resumed");
        s.add(0, 4096, &digest(&b), Encoding::Zstd, &z).unwrap();
        s.add(0, 8192, &digest(&a), Encoding::Raw, &a).unwrap();
        v.commit(&s).unwrap();
        assert!(
            s.add(0, 8192, &digest(&a), Encoding::Raw, &a).is_err(),
            "staged after the commit"
        );
        v.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, a);
        assert_eq!(v.state().published_epoch, 1);
        // A zero block becomes a hole.
        let s = v.begin(2, me(2)).unwrap();
        s.add(0, 4096, &zero_digest(4096), Encoding::Zero, &[])
            .unwrap();
        v.commit(&s).unwrap();
        v.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0) && buf[4096..] == a[4096..]);
        assert!(v.begin(2, me(3)).is_err(), "an old epoch was accepted");
        // Another device's epochs are refused.
        let other = Writer {
            device: [9; 16],
            epoch: 1,
        };
        let err = v.begin(3, other).unwrap_err().to_string();
        assert!(err.contains("another device"), "{err}");
        assert_eq!(v.state().writer(), Some(me(2)));
        drop(v);
        let (v, recovery) = Volume::open(&vdir).unwrap();
        assert_eq!(recovery, Recovery::default());
        assert_eq!(v.state().published_epoch, 2);
    }

    #[test]
    fn an_interrupted_epoch_resumes_after_a_restart_keeping_only_blocks_that_check() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        let s = v.begin(1, me(7)).unwrap();
        let (a, b, c) = (block(1, 4096), block(2, 4096), block(3, 4096));
        s.add(0, 4096, &digest(&a), Encoding::Raw, &a).unwrap();
        s.add(8192, 4096, &digest(&b), Encoding::Raw, &b).unwrap();
        s.add(16384, 4096, &zero_digest(4096), Encoding::Zero, &[])
            .unwrap();
        // The server dies; b's bytes never reached the disk.
        drop((s, v));
        let data = OpenOptions::new()
            .write(true)
            .open(staging_path(&vdir, 1, "data"))
            .unwrap();
        data.write_all_at(&[0xee; 16], 4096).unwrap();
        // A torn record at the end of the log.
        let log = OpenOptions::new()
            .append(true)
            .open(staging_path(&vdir, 1, "log"))
            .unwrap();
        std::io::Write::write_all(&mut &log, &[1, 2, 3]).unwrap();
        let (mut v, recovery) = Volume::open(&vdir).unwrap();
        assert_eq!(recovery.resumable, [1]);
        // Another writer's epoch would not resume it; the same one does.
        let s = v.begin(1, me(7)).unwrap();
        assert_eq!(s.ranges(), [(0, 4096), (16384, 4096)]);
        s.add(8192, 4096, &digest(&b), Encoding::Raw, &b).unwrap();
        s.add(4096, 4096, &digest(&c), Encoding::Raw, &c).unwrap();
        v.commit(&s).unwrap();
        let mut image = vec![0u8; 20480];
        v.read_at(&mut image, 0).unwrap();
        assert_eq!(image[..4096], a);
        assert_eq!(image[4096..8192], c);
        assert_eq!(image[8192..12288], b);
        assert!(image[12288..].iter().all(|&x| x == 0));
        // A crash between the marker and the publication: the log is what
        // is published again.
        let s = v.begin(2, me(8)).unwrap();
        s.add(0, 4096, &digest(&c), Encoding::Raw, &c).unwrap();
        v.commit_until(&s, Some(CommitStep::Marked)).unwrap();
        drop((s, v));
        let (v, recovery) = Volume::open(&vdir).unwrap();
        assert_eq!(recovery.completed, Some(2));
        v.read_at(&mut image, 0).unwrap();
        assert_eq!(image[..4096], c);
        // A later epoch of the same device takes the staging over, marked
        // so across a restart; its digests answer for the client.
        let mut v = v;
        let s = v.begin(3, me(9)).unwrap();
        assert!(!s.adopted());
        s.add(0, 4096, &digest(&a), Encoding::Raw, &a).unwrap();
        drop(s);
        let s = v.begin(3, me(10)).unwrap();
        assert!(s.adopted());
        assert_eq!(s.ranges(), [(0, 4096)]);
        assert_eq!(s.digests(&[(0, 4096), (0, 8192)]), [digest(&a), NOT_STAGED]);
        // A block staged over part of another: that one's digest is no
        // longer its content's.
        s.add(
            0,
            8192,
            &digest(&[a.clone(), a.clone()].concat()),
            Encoding::Raw,
            &[a.clone(), a.clone()].concat(),
        )
        .unwrap();
        s.add(4096, 4096, &digest(&c), Encoding::Raw, &c).unwrap();
        assert_eq!(
            s.digests(&[(0, 8192), (4096, 4096)]),
            [NOT_STAGED, digest(&c)]
        );
        drop((s, v));
        let (mut v, _) = Volume::open(&vdir).unwrap();
        let s = v.begin(3, me(10)).unwrap();
        assert!(s.adopted(), "the take-over was forgotten by a restart");
        v.commit(&s).unwrap();
        assert!(!staging_path(&vdir, 3, "adopted").exists());
        // Another device's staging is dropped (a volume nobody owns yet).
        let fresh = dir.path().join("fresh");
        let mut f = Volume::create(&fresh, SIZE).unwrap();
        let s = f.begin(1, me(1)).unwrap();
        s.add(0, 4096, &digest(&a), Encoding::Raw, &a).unwrap();
        drop(s);
        let other = Writer {
            device: [2; 16],
            epoch: 1,
        };
        let s = f.begin(1, other).unwrap();
        assert!(s.ranges().is_empty() && !s.adopted());
    }

    #[derive(Debug, Clone)]
    enum Blk {
        Data {
            at: u64,
            blocks: u64,
            seed: u8,
            zstd: bool,
        },
        Zero {
            at: u64,
            blocks: u64,
        },
    }

    fn blk() -> impl Strategy<Value = Blk> {
        let place = (0..SIZE / 4096).prop_flat_map(|b| (Just(b), 1..=(SIZE / 4096 - b).min(16)));
        prop_oneof![
            3 => (place.clone(), any::<u8>(), any::<bool>())
                .prop_map(|((at, blocks), seed, zstd)| Blk::Data { at, blocks, seed, zstd }),
            1 => place.prop_map(|(at, blocks)| Blk::Zero { at, blocks }),
        ]
    }

    fn crash() -> impl Strategy<Value = Option<CommitStep>> {
        prop_oneof![
            4 => Just(None),
            1 => Just(Some(CommitStep::Staged)),
            1 => Just(Some(CommitStep::Marked)),
            1 => Just(Some(CommitStep::HalfApplied)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Whatever point a commit dies at, the reopened volume is exactly
        /// one published epoch: the new one once its marker exists, else
        /// the one before.
        #[test]
        fn the_image_is_always_a_published_epoch(
            epochs in proptest::collection::vec(
                (proptest::collection::vec(blk(), 1..8), crash(), any::<bool>()), 1..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let vdir = dir.path().join("vol");
            let mut v = Volume::create(&vdir, SIZE).unwrap();
            let mut published = vec![0u8; SIZE as usize];
            // Snapshots taken on the way, with the image they must show
            // (also after a crash mid-publication and its redo).
            let mut snaps: Vec<(u64, Vec<u8>)> = Vec::new();
            for (n, (blocks, crash, snap)) in epochs.into_iter().enumerate() {
                if snap {
                    let info = v.snapshot(None, Kind::Manual).unwrap();
                    snaps.push((info.id, published.clone()));
                }
                let epoch = v.state().published_epoch + 1;
                let mut next = published.clone();
                // Each attempt another writer epoch: what a crash left
                // staged is not resumed (that is tested apart).
                let s = v.begin(epoch, me(n as u64 + 1)).unwrap();
                if s.adopted() {
                    // What the crashed attempt staged is taken over: the
                    // client vouches for it with this epoch's content.
                    for (o, l) in s.ranges() {
                        let bytes = &published[o as usize..][..l as usize];
                        s.add(o, l as u32, &digest(bytes), Encoding::Raw, bytes).unwrap();
                    }
                }
                for b in &blocks {
                    match *b {
                        Blk::Data { at, blocks, seed, zstd } => {
                            let data = block(seed.wrapping_add(n as u8), (blocks * 4096) as usize);
                            let len = data.len() as u32;
                            if zstd {
                                let z = zstd::bulk::compress(&data, 1).unwrap();
                                s.add(at * 4096, len, &digest(&data), Encoding::Zstd, &z).unwrap();
                            } else {
                                s.add(at * 4096, len, &digest(&data), Encoding::Raw, &data).unwrap();
                            }
                            next[(at * 4096) as usize..][..data.len()].copy_from_slice(&data);
                        }
                        Blk::Zero { at, blocks } => {
                            let len = (blocks * 4096) as u32;
                            s.add(at * 4096, len, &zero_digest(len), Encoding::Zero, &[]).unwrap();
                            next[(at * 4096) as usize..][..len as usize].fill(0);
                        }
                    }
                }
                v.commit_until(&s, crash).unwrap();
                if crash.is_some() {
                    drop(v);
                    let (reopened, recovery) = Volume::open(&vdir).unwrap();
                    v = reopened;
                    if crash == Some(CommitStep::Staged) {
                        prop_assert_eq!(recovery.resumable, vec![epoch]);
                        prop_assert_eq!(v.state().published_epoch, epoch - 1);
                    } else {
                        prop_assert_eq!(recovery.completed, Some(epoch));
                    }
                }
                if v.state().published_epoch == epoch {
                    published = next;
                }
                let mut image = vec![0u8; SIZE as usize];
                v.read_at(&mut image, 0).unwrap();
                prop_assert!(image == published, "the image is not published epoch {}", v.state().published_epoch);
                if crash != Some(CommitStep::Staged) {
                    prop_assert!(std::fs::read_dir(vdir.join(STAGING)).unwrap().next().is_none(), "staging left behind");
                }
                for (id, model) in &snaps {
                    let mut seen = vec![0u8; SIZE as usize];
                    v.read_snapshot(*id, &mut seen, 0).unwrap();
                    prop_assert!(seen == *model, "snapshot {} is not the image it was taken of", id);
                }
            }
        }
    }
}
