//! Volumes on the server's disk: a sparse image that always holds one
//! published epoch, and the staging through which the next one arrives.
//!
//! This module owns a volume's life ([`Volume`]: create, open and recover,
//! begin an epoch, publish it, its snapshots) and its `state.json`. Its
//! parts: [`staging`] (an epoch being received, [`Staging`]), [`log`] (the
//! staging log's record format), [`reader`] ([`SnapshotReader`], listing
//! the volumes, importing an image).
//!
//! # On-disk layout
//!
//! `state.json` is format 1; the staging log is format 2 (its versions are
//! in [`log`]).
//!
//! ```text
//! VOLUME_DIR/
//!   image            sparse file, the volume as of the published epoch
//!   state.json       {"format":1,"size":..,"published_epoch":..,"published_ms":..,
//!                     "uuid":"<hex>","owner":"<device hex>"|null,"writer_epoch":..,
//!                     "store_seq":..} (the chunk store's version the image holds)
//!   catching-up      {"format":1,"to":SEQ}, written durably before a catch-up
//!                    from the chunk store writes the image, removed once
//!                    state.json records SEQ: while its SEQ is newer than
//!                    store_seq, the image may hold part of two versions
//!                    (see [`Volume::catch_up`])
//!   staging/
//!     N.data         decoded bytes of epoch N's data blocks, in arrival order;
//!                    for a direct staging, a sparse file the size of the
//!                    volume with each block at its own offset
//!     N.direct       present (made durable before N.data and N.log exist)
//!                    when N is staged direct: the first epoch of a volume
//!                    with nothing published (see [`staging`])
//!     N.log          32-byte header ("UBMS", format u32 LE = 2, the writer's
//!                    device [16] and epoch u64 LE), then one 52-byte record
//!                    per staged block, appended as it is staged: offset
//!                    u64 LE, len u32 LE, offset in N.data u64 LE (all
//!                    ones: a zero block), sha256 [32] (see [`log`])
//!     N.adopted      present while N was taken over from an earlier epoch
//!                    of the same device (its daemon restarted mid-epoch):
//!                    the client must vouch for every staged block
//!     (unnamed)      while this process stages N: the zstd frames of its
//!                    blocks that came compressed, for the chunk store
//!                    (see [`frames`]; never named, so never left behind)
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
//! image ends as exactly that epoch.
//!
//! A *direct* staging (a new volume's first epoch, whose image is all
//! zeroes and never published) is already the image the epoch makes:
//! publishing renames `N.data` over the image, after syncing it and with
//! the commit marker in place, so the epoch's bytes are written once. If the
//! server dies after the rename, `N.data` is gone and the image is the
//! epoch: only the state is left to record. While a reader holds the old
//! image (an export of the empty volume, a snapshot), the touched blocks are
//! copied instead, as for any other epoch. A staging without a commit marker is
//! an epoch the client never saw acknowledged: it is kept for the client
//! to resume, and dropped when another epoch begins. Readers of snapshots
//! (exports, restores) need no lock on the volume: see
//! [`SnapshotReader`].
//!
//! # A disk's damage in the image
//!
//! The image and a snapshot's preserved blocks carry no checksums of their
//! own; the chunk store's map of each version names every block by its
//! sha256. So a version read from the cache is checked block by block
//! against that map as it is read ([`CacheCheck`]: a block that differs is
//! served from the store, whose chunks are checked against their names),
//! and `verify` checks the whole image against the version it holds
//! ([`ImageProbe`]) and writes the store's block over each that differs
//! ([`Volume::repair_image`], under the volume's lock: the same bytes as
//! the version, so snapshots reading that block from the image are mended
//! too). A publication also checks each block it patches against the
//! version before it builds on it (see `Volume::rebuild`).

mod frames;
pub mod log;
pub mod reader;
pub mod staging;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use ublk_mirror_common::hex::{self, encode as hex_encode};
use ublk_mirror_common::proto::{Digest, Writer};
use ublk_mirror_common::{block, fsutil};

use self::log::{read_log_header, Entry, LogReader};
pub(crate) use self::reader::subdirs;
pub use self::reader::{import, list, CacheCheck, SnapshotReader, VersionSource};
pub use self::staging::Staging;
use self::staging::{is_direct, remove_staging, staging_epochs, staging_path, STAGING};
use crate::chunks::format::{self, VersionRecord, WriterRecord, HOLE};
use crate::chunks::gc::PinRecord;
use crate::chunks::{blocks_of, ChunkStore, Publication};
use crate::error::{Error, Result};
use crate::snapshots::{
    units_of, Aside, Kind, Pin, Retention, SnapshotInfo, Snapshots, Units, CHUNK as SNAPSHOT_CHUNK,
    HAND_OVER_BATCH, KEEP_AT_ONCE, WHOLE,
};
use ublk_mirror_common::clock::now_ms;

/// Where the volumes live in the data directory: `volumes/CLIENT/VOLUME/`.
pub const VOLUMES_DIR: &str = "volumes";

const STATE_FORMAT: u32 = 1;
const IMAGE: &str = "image";
const STATE: &str = "state.json";
const CATCHING_UP: &str = "catching-up";
const CATCHING_UP_FORMAT: u32 = 1;

/// What `catching-up` holds (see the module docs).
#[derive(Debug, Serialize, Deserialize)]
struct CatchingUp {
    format: u32,
    to: u64,
}

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
    /// The chunk store's version of this volume the image holds (0: none
    /// yet; absent in files written before the chunk store, which are
    /// upgraded when the volume is attached to one).
    #[serde(default)]
    pub store_seq: u64,
    /// The id of the chunk store that version is in (absent: written
    /// before store ids, or a store without one); another store is never
    /// taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
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
    /// The chunk store that keeps its versions, once attached, and the
    /// volume's name there.
    chunks: Option<(Arc<ChunkStore>, String)>,
    /// A catch-up from the chunk store to this version stopped part way
    /// (`catching-up`): the image may hold part of it, so no snapshot is
    /// taken until a catch-up ends.
    catching_up: Option<u64>,
    /// Readers of snapshots only the chunk store keeps, by name: such a
    /// snapshot is not deleted while one reads it.
    stored_readers: BTreeMap<String, Arc<AtomicUsize>>,
    /// When retention last went over the snapshots only the chunk store
    /// keeps (a listing and a read per pin: not at every turn).
    stored_pruned: Option<std::time::Instant>,
}

/// Chunks whose units are preserved for snapshots per hold of the
/// snapshots' lock while an epoch is published (at most 16 MiB).
const PRESERVE_BATCH: usize = 256;

fn sync_dir(dir: &Path) -> Result<()> {
    fsutil::sync_dir(dir).map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// The largest volume (1 PiB): its image, its staging's bookkeeping and
/// its map must fit on a server.
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

impl Volume {
    /// Create a volume of `size` bytes in `dir` (which must not exist).
    pub fn create(dir: &Path, size: u64) -> Result<Volume> {
        if dir.exists() {
            return Err(Error::Invalid(format!(
                "volume directory {} exists already",
                dir.display()
            )));
        }
        if size == 0 || size > MAX_VOLUME_SIZE {
            return Err(Error::Invalid(format!(
                "a volume of {size} bytes: volumes are 1 byte to {} (1 PiB)",
                MAX_VOLUME_SIZE
            )));
        }
        std::fs::create_dir_all(dir.join(STAGING))
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let made = Volume::make(dir, size);
        if made.is_err() {
            // Nothing of it stays: the name is free to try again (a
            // directory without its state would be refused for good).
            let _ = std::fs::remove_dir_all(dir);
        }
        made
    }

    /// [`Volume::create`]'s work once its directory is made.
    fn make(dir: &Path, size: u64) -> Result<Volume> {
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
            store_seq: 0,
            store_id: None,
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
        let image = open_rw(&dir.join(IMAGE))?;
        let mut volume = Volume {
            dir: dir.to_path_buf(),
            image: Arc::new(image),
            state,
            poisoned: false,
            active: None,
            snapshots: Arc::new(RwLock::new(Snapshots::open(dir)?)),
            chunks: None,
            catching_up: None,
            stored_readers: BTreeMap::new(),
            stored_pruned: None,
        };
        volume.catching_up = read_catching_up(dir)?.filter(|&to| to > volume.state.store_seq);
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
        let staging = self.dir.join(STAGING);
        if !staging.exists() {
            // Removed by hand (or lost): nothing was being staged, and
            // nothing could be staged without it.
            tracing::warn!(dir = %staging.display(), "the staging directory was missing: made again");
            std::fs::create_dir_all(&staging)
                .map_err(|e| Error::io(format!("making {}", staging.display()), e))?;
        }
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

    /// After a publication failed ([`Volume::poisoned`]), publish the
    /// committed staging again, so that the image is a published epoch.
    fn unpoison(&mut self) -> Result<()> {
        if self.poisoned {
            self.active = None;
            self.recover()?;
            self.poisoned = false;
        }
        Ok(())
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
        SnapshotReader::new(self.snapshots.clone(), self.image.clone(), self.state.size)
    }

    /// Take a snapshot of the published epoch, named `name` or after the
    /// time.
    pub fn snapshot(&mut self, name: Option<&str>, kind: Kind) -> Result<SnapshotInfo> {
        // Never a snapshot of half an epoch.
        self.unpoison()?;
        // Nor of a stale image: another server on the store may have
        // published since (the client moved there); nor of half a
        // catch-up. The image catches up first (a head check when this
        // server is the writer; nothing when no store is attached).
        let refreshed = self.refresh();
        if let Some(to) = self.catching_up {
            let why = refreshed.err().map_or_else(
                || "the chunk store is not attached".to_string(),
                |e| e.to_string(),
            );
            return Err(Error::Store(format!(
                "the image is part way through catching up with version {to} of the chunk store, and cannot be snapshotted until that ends: {why}"
            )));
        }
        refreshed.map_err(|e| {
            Error::Store(format!(
                "the chunk store cannot be checked for a newer version of this volume (another server may have published one), so no version is taken now: {e}"
            ))
        })?;
        // Never the name of a snapshot another server on the store took
        // (its pin would be overwritten, its version left unkept).
        let elsewhere = match &self.chunks {
            Some((store, volume)) if kind != Kind::Temporary => {
                store.pin_names(volume).map_err(|e| {
                    Error::Store(format!(
                        "the chunk store's snapshots of this volume cannot be listed (a new one must not take another's name), so no version is taken now: {e}"
                    ))
                })?
            }
            _ => BTreeSet::new(),
        };
        let info = self.snapshots_mut().create_beside(
            name,
            self.state.published_epoch,
            self.state.published_ms,
            now_ms(),
            kind,
            &elsewhere,
        )?;
        // A snapshot pins its version in the chunk store (a reader's
        // temporary one needs none: it reads the cache).
        if let Some((store, volume)) = &self.chunks {
            if kind != Kind::Temporary && self.state.store_seq > 0 {
                // Retention prunes a scheduled one by its time, also on
                // other servers on the store.
                let scheduled = (kind == Kind::Scheduled).then(|| info.shows_ms());
                if let Err(e) = store.pin(volume, &info.name, self.state.store_seq, scheduled) {
                    let _ = self.snapshots_mut().delete(&info.name);
                    return Err(e);
                }
            }
        }
        Ok(info)
    }

    /// Delete snapshot `name` (refused while it is read). Its chunks are
    /// handed to the next older one a batch per hold of the snapshots'
    /// lock, so readers of other snapshots go on meanwhile, and kept there
    /// with one sync per [`KEEP_AT_ONCE`] chunks.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<SnapshotInfo> {
        if self.snapshots().get(name).is_none() {
            if let Some(info) = self.delete_stored(name)? {
                return Ok(info);
            }
        }
        // Planned once; each batch under its own hold of the lock (only
        // this volume's holder changes snapshots, so the plan stays true).
        let plan = self.snapshots().hand_over_plan(name);
        let per_keep = (KEEP_AT_ONCE / HAND_OVER_BATCH).max(1);
        for group in plan.chunks(per_keep) {
            let mut aside = Aside::default();
            for batch in group {
                self.snapshots_mut().hand_over(name, batch, &mut aside)?;
            }
            self.snapshots_mut().keep(aside)?;
        }
        let listed = |v: &Self| v.snapshots().list().iter().any(|s| s.name == name);
        let existed = listed(self);
        let deleted = self.snapshots_mut().delete(name);
        // Gone also when the answer is an error that left it gone (the
        // manifest without it in place, its durability unknown): its pin
        // goes too, or the store would go on serving it by name.
        let gone = deleted.is_ok() || existed && !listed(self);
        if let (true, Some((store, volume))) = (gone, &self.chunks) {
            // A pin left behind only keeps a version longer.
            if let Err(e) = store.unpin(volume, name) {
                tracing::warn!(volume = %volume, snapshot = name, "cannot unpin the snapshot's version: {e}");
            }
        }
        deleted
    }

    /// Delete snapshot `name` that only the chunk store keeps (taken on
    /// another server on the store, or before this cache was rebuilt):
    /// its pin goes, and the store's GC frees what no other version needs.
    /// `None`: the store has no such snapshot either.
    fn delete_stored(&mut self, name: &str) -> Result<Option<SnapshotInfo>> {
        let Some((store, volume)) = &self.chunks else {
            return Ok(None);
        };
        let Some(&seq) = store.pins(volume)?.get(name) else {
            return Ok(None);
        };
        if self.stored_being_read(name) {
            return Err(Error::Invalid(format!(
                "snapshot {name} is being read (an export or a restore); try again when it is done"
            )));
        }
        let info = stored_info(name, &store.version(volume, seq)?);
        store.unpin(volume, name)?;
        tracing::info!(volume = %volume, snapshot = name, "deleted a snapshot only the chunk store kept");
        Ok(Some(info))
    }

    /// Prune scheduled snapshots by `retention`, this server's own and
    /// those only the chunk store keeps (taken on another server on the
    /// store, or before this cache was rebuilt: else nothing ever pruned
    /// those), counted together; their names. The store's are looked at
    /// once per `stored_every` (a listing and a read per pin), and only
    /// this server's own otherwise, by themselves (which prunes no more
    /// than counting all would); so too while the store is out of reach.
    /// Never one being read here; one a reader on another server reads
    /// from the store may go (its version then lasts until that store's
    /// garbage collection). Every server prunes by its own retention:
    /// where they differ, the one keeping least wins.
    pub fn prune_snapshots(
        &mut self,
        retention: &Retention,
        stored_every: std::time::Duration,
    ) -> Result<Vec<String>> {
        let due = self
            .stored_pruned
            .is_none_or(|at| at.elapsed() >= stored_every);
        let stored = if due && self.chunks.is_some() {
            self.stored_pruned = Some(std::time::Instant::now());
            match self.stored_scheduled() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(
                        "pruning snapshots: those only the chunk store keeps are left for now: {e}"
                    );
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let names = self.snapshots().prunable_with(retention, now_ms(), &stored);
        let mut pruned = Vec::with_capacity(names.len());
        for name in names {
            if self.snapshots().get(&name).is_some() {
                self.delete_snapshot(&name)?;
            } else if !self.prune_stored(&name)? {
                continue;
            }
            pruned.push(name);
        }
        Ok(pruned)
    }

    /// Prune snapshot `name`, which only the chunk store keeps: its pin
    /// goes (gone already, as where another server pruned it meanwhile,
    /// is as good). False if it is being read here.
    fn prune_stored(&mut self, name: &str) -> Result<bool> {
        let Some((store, volume)) = &self.chunks else {
            return Ok(false);
        };
        if self.stored_being_read(name) {
            return Ok(false);
        }
        store.unpin(volume, name)?;
        tracing::info!(volume = %volume, snapshot = name, "pruned a scheduled snapshot only the chunk store kept");
        Ok(true)
    }

    /// The scheduled snapshots the chunk store pins, as (name, point in
    /// time ms): those of a name here are this server's own, which
    /// [`Snapshots::prunable_with`] counts as such.
    fn stored_scheduled(&self) -> Result<Vec<(String, u64)>> {
        let Some((store, volume)) = &self.chunks else {
            return Ok(Vec::new());
        };
        Ok(store
            .pin_records(volume)?
            .into_iter()
            .filter_map(|(name, pin)| pin.scheduled_ms.map(|at| (name, at)))
            .collect())
    }

    /// Whether snapshot `name`, which only the chunk store keeps, is
    /// being read here.
    fn stored_being_read(&self, name: &str) -> bool {
        self.stored_readers
            .get(name)
            .is_some_and(|n| n.load(std::sync::atomic::Ordering::Acquire) > 0)
    }

    /// Keep scheduled snapshot `name` until it is deleted (see
    /// [`Snapshots::keep_until_deleted`]), here and in its pin, so that no
    /// server's retention takes it (one only the store keeps too):
    /// whether it was scheduled. The pin is best effort (warned): a
    /// restore from this server's own snapshot goes on with the store out
    /// of reach.
    pub fn keep_snapshot(&mut self, name: &str) -> Result<bool> {
        let mut kept = self.snapshots_mut().keep_until_deleted(name)?;
        if let Some((store, volume)) = &self.chunks {
            let unmarked = store.pin_record(volume, name).and_then(|pin| match pin {
                Some(PinRecord {
                    seq,
                    scheduled_ms: Some(_),
                }) => store.pin(volume, name, seq, None).map(|()| true),
                _ => Ok(false),
            });
            match unmarked {
                Ok(u) => kept |= u,
                Err(e) => {
                    tracing::warn!(volume = %volume, snapshot = name, "the snapshot's pin in the chunk store still says scheduled: {e}")
                }
            }
        }
        Ok(kept)
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
                // Times come to the second (as `snapshots` shows them): a
                // snapshot of 16:30:05.734 is "as old as 16:30:05".
                let name = self
                    .snapshots()
                    .at(ms.saturating_add(999))
                    .map(|s| s.name.clone())
                    .ok_or_else(|| Error::Invalid(format!("there is no snapshot as old as {a}")))?;
                self.snapshots_mut().pin(&name)
            }
        }
    }

    /// A reader of `info` is done: a temporary snapshot is deleted.
    pub fn done_reading(&mut self, info: &SnapshotInfo, pin: Option<Pin>) -> Result<()> {
        let Some(pin) = pin else {
            return Ok(());
        };
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

    /// Where checking the image against the chunk store's version it
    /// holds starts ([`ImageProbe`]); none where there is nothing to
    /// check against: no chunk store, no version stored yet, or the image
    /// being caught up to a newer one (it holds parts of two).
    pub fn image_probe(&self) -> Result<Option<ImageProbe>> {
        let Some((store, volume)) = &self.chunks else {
            return Ok(None);
        };
        if self.state.store_seq == 0 || self.catching_up.is_some() || self.poisoned {
            return Ok(None);
        }
        let seq = self.state.store_seq;
        let record = match store.version(volume, seq) {
            Ok(r) => r,
            // Collected (the volume went on on another server, whose newer
            // versions this image has not caught up with): nothing to
            // check against until it is opened for a client again.
            Err(_) if !store.versions(volume)?.contains(&seq) => return Ok(None),
            Err(e) => return Err(e),
        };
        if record.epoch != self.state.published_epoch {
            tracing::warn!(
                "{volume}: the chunk store's version {seq} holds epoch {}, the image {}: not checked",
                record.epoch,
                self.state.published_epoch
            );
            return Ok(None);
        }
        Ok(Some(ImageProbe {
            image: self.image.clone(),
            size: self.state.size,
            store: store.reader(&record)?,
            label: format!("{volume}@{}", record.seq),
        }))
    }

    /// Blocks `suspects` of the image (an [`ImageProbe::scan`]'s) checked
    /// again against the version it holds now (under the volume's lock:
    /// no publication writes it meanwhile), and each that still differs
    /// made the version's from the chunk store (whose chunks are checked
    /// against their names). The same bytes as the version: snapshots that
    /// read the block from the image are mended with it.
    pub fn repair_image(&mut self, suspects: &[u64]) -> Result<ImageCheck> {
        let mut check = ImageCheck::default();
        if suspects.is_empty() {
            return Ok(check);
        }
        let Some(probe) = self.image_probe()? else {
            return Ok(check);
        };
        // A short image (cut by a disk's trouble) is made whole first: its
        // blocks past the cut are then holes, put right below.
        let len = self
            .image
            .metadata()
            .map_err(|e| Error::io("reading the image's size", e))?
            .len();
        if len < self.state.size {
            tracing::warn!(
                "{}: the image is {len} bytes, not {}: extended",
                probe.label,
                self.state.size
            );
            if let Err(e) = self.image.set_len(self.state.size) {
                tracing::error!("{}: the image cannot be extended: {e}", probe.label);
            }
        }
        let mut buf = Vec::new();
        for &n in suspects {
            if probe.differs(n, &mut buf)?.is_none() {
                continue;
            }
            check.damaged += 1;
            let good = match probe.store.blocks(&[n]) {
                Ok(mut b) => b.remove(0),
                Err(e) => {
                    tracing::error!("{}: block {n} of the image differs from the version and the chunk store cannot give it: {e}", probe.label);
                    continue;
                }
            };
            let len = block_len(self.state.size, n) as usize;
            let written = match good {
                // A hole stays one.
                None => fsutil::punch_or_zero(&self.image, n * block::BLOCK, len as u64),
                Some(good) if good.len() != len => {
                    tracing::error!(
                        "{}: block {n} is {} bytes in the chunk store, not {len}",
                        probe.label,
                        good.len()
                    );
                    continue;
                }
                Some(good) => self.image.write_all_at(&good, n * block::BLOCK),
            };
            // One that cannot be written (a read-only or failing disk) is
            // left damaged, said; the others go on.
            if let Err(e) = written {
                tracing::error!("{}: block {n} of the image differs from the version and cannot be written: {e}", probe.label);
                continue;
            }
            check.repaired += 1;
            tracing::warn!("{}: block {n} of the image differed from the version (damaged on this disk?): made the chunk store's again", probe.label);
        }
        if check.repaired > 0 {
            if let Err(e) = self.image.sync_data() {
                tracing::error!("{}: the repaired image cannot be synced: {e}", probe.label);
                check.repaired = 0;
            }
        }
        Ok(check)
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
        if epoch == u64::MAX {
            // No epoch could follow it (a take-over numbers the next).
            return Err(Error::Invalid(format!("epoch {epoch} is out of range")));
        }
        self.unpoison()?;
        // Another server on the same store may have published since. A
        // store out of reach does not stop the staging: the epoch's blocks
        // are taken, and its commit waits for the store (it checks again
        // that the store did not move on).
        if let Err(e) = self.refresh() {
            tracing::warn!(
                epoch,
                "the chunk store cannot be read now; staging anyway: {e}"
            );
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
        // A staging that staged all it may starts over (resumed, it would
        // refuse every attempt).
        let mut overflowed = false;
        if let Some(s) = self.active.take() {
            overflowed = s.overflowed();
            if s.epoch == epoch && s.writer == writer && s.is_open() && !overflowed {
                self.active = Some(s.clone());
                return Ok(s);
            }
            if overflowed {
                let _ = s.close_for_adoption();
            } else if s.epoch == epoch && s.writer.device == writer.device {
                if let Some(end) = s.close_for_adoption() {
                    // Its blocks are in this process's page cache: no need
                    // to read them back (unless a write went unlogged).
                    // Its streams may still be writing data they
                    // reserved: new data goes after all of it.
                    verify = s.unlogged();
                    reserved = end;
                }
            }
        }
        let log_path = staging_path(&self.dir, epoch, "log");
        let left = (log_path.exists() && !staging_path(&self.dir, epoch, "commit").exists())
            .then(|| read_log_header(&log_path).ok())
            .flatten();
        // A direct staging stands for the all-zero image it was begun on:
        // one begun before the image got content (caught up from the store)
        // is dropped. And a staging is resumed only by the same device, at
        // the same epoch or a later one (a daemon that restarted numbers
        // on; an earlier epoch is one sealed before the staged one and
        // sent after it, which must not vouch for its blocks).
        let data_len =
            std::fs::metadata(staging_path(&self.dir, epoch, "data")).map_or(0, |m| m.len());
        let resumable = left.is_some_and(|w| w.device == writer.device && w.epoch <= writer.epoch)
            && (!is_direct(&self.dir, epoch) || self.is_new())
            && !overflowed
            && (is_direct(&self.dir, epoch)
                || data_len + u64::from(ublk_mirror_common::proto::MAX_BLOCK)
                    <= Staging::most(self.state.size));
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
            Staging::resume(
                &self.dir,
                epoch,
                writer,
                self.state.size,
                verify,
                reserved,
                self.chunks.is_some(),
            )?
        } else {
            let direct = self.is_new() && self.snapshots().list().is_empty();
            Staging::create(
                &self.dir,
                epoch,
                writer,
                self.state.size,
                direct,
                self.chunks.is_some(),
            )?
        };
        let staging = Arc::new(staging);
        self.active = Some(staging.clone());
        Ok(staging)
    }

    /// Make `device` the volume's writer, if its writer is `from` now
    /// (compare and swap; protocol V4's `TakeOver`): an empty epoch written
    /// by `device` (its local epoch 0) is published, so that the change is
    /// a version like any other, made by the chunk store's create-only
    /// write of the version record (of two servers racing, one wins; the
    /// other sees the volume moved on). Any staging of the old writer is
    /// dropped, and its epochs are refused from then on ([`Volume::begin`]).
    /// Returns the epoch that holds the change; a device that is the
    /// writer already gets the published epoch (a retried take-over).
    pub fn take_over(&mut self, from: Option<Writer>, device: [u8; 16]) -> Result<u64> {
        self.unpoison()?;
        // A compare and swap must compare with the newest.
        self.refresh()?;
        let now = self.state.writer();
        let taken = Writer { device, epoch: 0 };
        // Only the take-over's own epoch is a retry: a device whose
        // journal began again (its local epochs from 1 again) gets a new
        // one, so that none of its epochs looks published already.
        if now == Some(taken) {
            return Ok(self.state.published_epoch);
        }
        if now != from {
            return Err(Error::Invalid(format!(
                "the volume moved on (now at epoch {}, written by {}): look again and retry",
                self.state.published_epoch,
                now.map_or_else(|| "no device".into(), |w| hex_encode(&w.device))
            )));
        }
        self.active = None;
        for (n, _) in staging_epochs(&self.dir)? {
            remove_staging(&self.dir, n);
        }
        let epoch = self.state.published_epoch.checked_add(1).ok_or_else(|| {
            Error::Invalid(format!(
                "volume at epoch {}: no epoch can follow",
                self.state.published_epoch
            ))
        })?;
        let staging = Arc::new(Staging::create(
            &self.dir,
            epoch,
            taken,
            self.state.size,
            false,
            false,
        )?);
        self.active = Some(staging.clone());
        self.commit(&staging)?;
        tracing::info!(
            epoch,
            from = %from.map_or_else(|| "none".into(), |w| hex_encode(&w.device)),
            to = %hex_encode(&device),
            "a device took the volume over"
        );
        Ok(epoch)
    }

    /// Nothing was ever published here, in the image or the chunk store:
    /// the image is all zeroes, and a first epoch may be staged direct.
    fn is_new(&self) -> bool {
        self.state.published_epoch == 0 && self.state.store_seq == 0
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// End a pre-copy round of `staging` (protocol V5's `EndRound`): its
    /// blocks durable, the staging kept open for the same writer. Refused
    /// if it is no longer the volume's current staging (taken over,
    /// dropped, or being committed).
    pub fn sync_round(&self, staging: &Arc<Staging>) -> Result<()> {
        let current = self
            .active
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, staging) && a.is_open());
        if !current {
            return Err(Error::Invalid(format!(
                "epoch {} is no longer being staged here (another connection took it over)",
                staging.epoch
            )));
        }
        staging.sync_round(&self.dir)
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
        if staging.direct && !self.is_new() {
            // The image got content while the epoch was staged (caught
            // up from the chunk store): the staging no longer stands for
            // it. The client sends the epoch again.
            self.active = None;
            remove_staging(&self.dir, staging.epoch);
            return Err(Error::Invalid(format!(
                "epoch {}: the volume was published elsewhere while it was staged; send it again",
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
        if let (Some(to), None) = (self.catching_up, &self.chunks) {
            // Not published on an image holding part of another version
            // (attached, the store refuses it: it moved on).
            return Err(Error::Store(format!(
                "the image is part way through catching up with version {to} of the chunk store, which is not attached: the epoch waits, staged"
            )));
        }
        // The epoch becomes a version in the chunk store before anything
        // here says it is complete: if the store fails, the staging stays
        // and the client resumes it; if this process dies after, opening
        // the volume catches the image up from the store.
        let stored = self.store_epoch_preserving(staging)?;
        let marker_json = serde_json::to_vec(&marker).map_err(|e| Error::Corrupt(e.to_string()))?;
        fsutil::write_durably(&staging_path(&self.dir, epoch, "commit"), &marker_json)
            .map_err(|e| Error::io("writing the commit marker", e))?;
        // Only now does the image stand for the stored version: with no
        // marker (it could not be written), the image is still the one
        // before, and so must be what a snapshot pins until the next
        // refresh catches the image up to the store's newest.
        if let Some(seq) = stored {
            self.state.store_seq = seq;
            self.state.store_id = self
                .chunks
                .as_ref()
                .and_then(|(store, _)| store.id().map(str::to_string));
        }
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
        if is_direct(&self.dir, epoch) {
            return self.publish_direct(epoch, marker, limit);
        }
        let (data, data_path, log_path) = self.staged_files(epoch)?;
        self.preserve_for(&log_path)?;
        let mut log = LogReader::open(&log_path)?;
        let mut buf = Vec::new();
        let mut applied = 0usize;
        // A big epoch (a resync) is written to the image without filling
        // the page cache (exports and snapshots read it, if anyone does).
        let to_image = fsutil::Streamed::new();
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
                    to_image.moved(&self.image, buf.len() as u64);
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
        self.record_published(epoch, marker, Some(applied))
    }

    /// [`Volume::store_epoch`], and meanwhile, on a thread of its own, what
    /// the epoch will overwrite in the image kept for the newest snapshot
    /// ([`Volume::preserve_for`], which [`Volume::publish`] then finds
    /// done). Both only read the image, which nothing changes before the
    /// commit marker: the store step mostly hashes, the preservation
    /// mostly writes. Keeping chunks the epoch is then never published
    /// over (the store refused it, the server died) costs their space
    /// only: each holds what the image held since the snapshot was taken.
    fn store_epoch_preserving(&self, staging: &Staging) -> Result<Option<u64>> {
        if is_direct(&self.dir, staging.epoch) || self.snapshots().list().is_empty() {
            return self.store_epoch(staging);
        }
        let log_path = staging_path(&self.dir, staging.epoch, "log");
        std::thread::scope(|scope| {
            let preserving = std::thread::Builder::new()
                .name("preserve".into())
                .spawn_scoped(scope, || self.preserve_for(&log_path))
                .map_err(|e| Error::io("starting a thread", e))?;
            let stored = self.store_epoch(staging);
            let preserved = preserving
                .join()
                .expect("preserving chunks for a snapshot panicked");
            let seq = stored?;
            preserved?;
            Ok(seq)
        })
    }

    /// What the epoch logged in `log_path` overwrites, kept for the newest
    /// snapshot first (if there is one).
    fn preserve_for(&self, log_path: &Path) -> Result<()> {
        if self.snapshots().list().is_empty() {
            return Ok(());
        }
        // The 4 KiB units each extent touches, by chunk: a 4 KiB write
        // keeps 4 KiB, not its 64 KiB chunk.
        let mut units: BTreeMap<u64, Units> = BTreeMap::new();
        let mut log = LogReader::open(log_path)?;
        while let Some(e) = log.next_entry()? {
            if e.len > 0 {
                let end = e.offset.saturating_add(u64::from(e.len));
                for chunk in e.offset / SNAPSHOT_CHUNK..=(end - 1) / SNAPSHOT_CHUNK {
                    *units.entry(chunk).or_default() |= units_of(chunk, e.offset, end);
                }
            }
        }
        self.preserve_units(&units.into_iter().collect::<Vec<_>>())
    }

    /// Keep `units` (chunk, its units; ascending) of the image for the
    /// newest snapshot before the image changes there. Copied aside in
    /// batches, each under the snapshots' write lock: readers of snapshots
    /// (exports, restores) go on in between, and read each chunk in the
    /// image until it is kept, which happens for up to [`KEEP_AT_ONCE`]
    /// chunks at once, with one sync of the snapshot's data and one of its
    /// index. Meanwhile the data is on its way to the disk as it is
    /// written (a sync per batch left the disk idle while the next batch
    /// was read).
    fn preserve_units(&self, units: &[(u64, Units)]) -> Result<()> {
        for group in units.chunks(KEEP_AT_ONCE) {
            let mut aside = Aside::default();
            for batch in group.chunks(PRESERVE_BATCH) {
                self.snapshots_mut()
                    .copy_aside(&self.image, self.state.size, batch, &mut aside)?;
            }
            self.snapshots_mut().keep(aside)?;
        }
        Ok(())
    }

    /// Publish a direct staging (see [`staging`]'s module docs): its
    /// `N.data` is the image this epoch makes of the all-zero one. With
    /// nobody reading the image (no reader handed out, no snapshot), it is
    /// renamed over the image: the epoch's bytes are written once. Else the
    /// blocks it touches are copied, as a staging in arrival order is.
    ///
    /// Crash argument: the commit marker exists before the rename, so a
    /// restart comes back here; `N.data` gone means the rename happened
    /// (a rename is atomic, and the directory is synced before the state
    /// records the epoch), so only the state is left to write.
    fn publish_direct(&mut self, epoch: u64, marker: Marker, limit: Option<usize>) -> Result<()> {
        let data_path = staging_path(&self.dir, epoch, "data");
        let log_path = staging_path(&self.dir, epoch, "log");
        let read_by_others =
            Arc::strong_count(&self.image) > 1 || !self.snapshots().list().is_empty();
        let applied = if !data_path.exists() {
            // Renamed already (the process died, or failed, after it): the
            // image is the epoch; this handle may still be the old file's.
            self.image = Arc::new(open_rw(&self.dir.join(IMAGE))?);
            None
        } else if read_by_others {
            self.preserve_for(&log_path)?;
            let image = self.image.clone();
            let touched = each_direct_block(&data_path, &log_path, self.state.size, |n, buf| {
                let at = n * block::BLOCK;
                if block::is_zero(buf) {
                    fsutil::punch_or_zero(&image, at, buf.len() as u64)
                        .map_err(|e| Error::io("punching a hole in the image", e))
                } else {
                    image
                        .write_all_at(buf, at)
                        .map_err(|e| Error::io("writing the image", e))
                }
            })?;
            self.image
                .sync_all()
                .map_err(|e| Error::io("syncing the image", e))?;
            Some(touched)
        } else {
            // Opened for writing before the rename, so that the image is
            // never left behind on the file it replaces.
            let image = open_rw(&data_path)?;
            image
                .sync_all()
                .map_err(|e| Error::io(format!("syncing {}", data_path.display()), e))?;
            std::fs::rename(&data_path, self.dir.join(IMAGE))
                .map_err(|e| Error::io("renaming a direct staging to the image", e))?;
            self.image = Arc::new(image);
            sync_dir(&self.dir)?;
            None
        };
        if limit.is_some() {
            return Ok(());
        }
        self.record_published(epoch, marker, applied)
    }

    /// Record in the state that the image is `epoch`, written by `marker`
    /// (`applied`: the blocks written to the image; `None`: it was
    /// renamed into place).
    fn record_published(
        &mut self,
        epoch: u64,
        marker: Marker,
        applied: Option<usize>,
    ) -> Result<()> {
        let state = VolumeState {
            published_epoch: epoch,
            published_ms: now_ms(),
            owner: Some(hex_encode(&marker.device)),
            writer_epoch: marker.epoch,
            ..self.state.clone()
        };
        write_state(&self.dir, &state)?;
        self.state = state;
        // An interrupted catch-up to the version this epoch is (stored by
        // this server, its answer lost): the epoch wrote every block that
        // version changed, so the image is that version.
        if self
            .catching_up
            .is_some_and(|to| self.state.store_seq >= to)
        {
            self.caught_up();
        }
        tracing::info!(epoch, blocks = applied, "epoch published");
        Ok(())
    }
}

/// The chunk store's side of a volume: attaching (upgrading, catching up,
/// rebuilding) and storing each epoch.
impl Volume {
    /// Keep this volume's versions in `store` as `name` (`CLIENT/VOLUME`).
    ///
    /// When the store is ahead of the image (another server published, or
    /// this one died between storing and applying, or the image was made
    /// new because the cache was lost), the image catches up from the
    /// store. When the store has no version of a volume that has data (a
    /// data directory from before the chunk store), the image is stored as
    /// the first version: the upgrade.
    pub fn attach(&mut self, store: Arc<ChunkStore>, name: &str) -> Result<()> {
        self.chunks = Some((store, name.to_string()));
        match self.refresh() {
            Ok(()) => Ok(()),
            // Out of reach now: the image serves as it is, and staging
            // goes on; the store is read again before each epoch and
            // checked at each commit.
            Err(Error::Store(e)) => {
                tracing::warn!(volume = name, "the chunk store cannot be read now: {e}");
                Ok(())
            }
            Err(e) => {
                self.chunks = None;
                Err(e)
            }
        }
    }

    /// Catch the image up with the chunk store if the store moved on
    /// (another server published: the servers on one store are
    /// interchangeable), or store it first (the upgrade). A no-op when not
    /// attached.
    pub fn refresh(&mut self) -> Result<()> {
        let Some((store, name)) = self.chunks.clone() else {
            return Ok(());
        };
        // An epoch whose publication failed part way is finished first: a
        // catch-up writes only the blocks that differ from the version the
        // state names, and the image must be that version.
        self.unpoison()?;
        if let (Some(mine), Some(theirs)) = (self.state.store_id.as_deref(), store.id()) {
            if mine != theirs {
                return Err(Error::Corrupt(format!(
                    "volume {name} is kept in the chunk store {mine}, but {} is the store {theirs}: is [store] in server.toml the right one? (to keep the volume in this store from now on: `mirror-server upgrade --move-to-this-store`, with the server stopped)",
                    store.describe()
                )));
            }
        }
        let head = store.head(&name)?;
        match head {
            None if self.state.store_seq > 0 => {
                // Stored before, and this store has none of it: not the
                // store it was kept in (or one emptied). Storing the image
                // here as a first version would go on silently elsewhere.
                return Err(Error::Corrupt(format!(
                    "volume {name}: this image holds version {} of a chunk store, but {} has no version of it: is [store] in server.toml the right one, and reachable? (to keep the volume in this store from now on: `mirror-server upgrade --move-to-this-store`, with the server stopped)",
                    self.state.store_seq,
                    store.describe()
                )));
            }
            None if !self.is_new() => {
                tracing::info!(volume = %name, "storing the image as the volume's first version (upgrade)");
                let seq = self.store_image(&store, &name)?;
                self.state.store_seq = seq;
                self.state.store_id = store.id().map(str::to_string);
                write_state(&self.dir, &self.state)?;
            }
            None => {}
            Some(h) if h.size != self.state.size => {
                return Err(Error::Corrupt(format!(
                    "volume {name} is {} bytes in the store {} but {} here",
                    h.size,
                    store.describe(),
                    self.state.size
                )));
            }
            Some(h) if h.seq == self.state.store_seq => {}
            Some(h) if h.seq > self.state.store_seq => {
                let old = match self.state.store_seq {
                    // An interrupted catch-up wrote blocks of another
                    // version, which the changes to this one may not
                    // cover: every block is written.
                    _ if self.catching_up.is_some() => None,
                    0 => None,
                    seq => store.version(&name, seq).ok(),
                };
                self.catch_up(&store, old.as_ref(), &h)?;
            }
            Some(h) => {
                return Err(Error::Corrupt(format!(
                    "volume {name}: this image holds version {} of the store {} but the store's newest is {} (a store restored from an older copy?)",
                    self.state.store_seq,
                    store.describe(),
                    h.seq
                )));
            }
        }
        if self.state.store_seq > 0 && self.state.store_id.as_deref() != store.id() {
            // Named from now on (a state from before store ids).
            self.state.store_id = store.id().map(str::to_string);
            write_state(&self.dir, &self.state)?;
        }
        Ok(())
    }

    /// Version `at` of the volume to read (see [`Volume::pin_version`]),
    /// from the cache's snapshots, or from the chunk store for a snapshot
    /// only it keeps (by name, or the newest at or before a time whichever
    /// server took it). The pin (for the store's, one that keeps it from
    /// being deleted here while read) goes back with
    /// [`Volume::done_reading`].
    pub fn open_version(
        &mut self,
        at: Option<&str>,
    ) -> Result<(SnapshotInfo, Option<Pin>, VersionSource)> {
        // A time: the newest snapshot at or before it, whichever server
        // took it (one the chunk store pins, taken on another server on
        // the store or before this cache was rebuilt, may be newer than
        // any here).
        if let Some(ms) = at
            .filter(|a| self.snapshots().get(a).is_none())
            .and_then(crate::snapshots::parse_time)
        {
            let limit = ms.saturating_add(999);
            let here = self.snapshots().at(limit).map(|s| s.epoch);
            let stored = match self.stored_at(limit) {
                Ok(s) => s,
                // The store out of reach: this server's own answer, said so.
                Err(e) if here.is_some() => {
                    tracing::warn!("looking for snapshots only the chunk store keeps: {e}; answered from this server's own");
                    None
                }
                Err(e) => return Err(e),
            };
            if let Some((reader, info)) = stored {
                // The newer version wins (the store's time is when the
                // version got there, a little after its epoch).
                if here.is_none_or(|h| info.epoch > h) {
                    let pin = self.pin_stored(&info.name);
                    return Ok((info, Some(pin), VersionSource::Store(reader)));
                }
            }
        }
        match self.pin_version(at) {
            Ok((info, pin)) => {
                let source = VersionSource::Cache {
                    reader: self.reader(),
                    id: info.id,
                    check: self.cache_check(&info).map(Box::new),
                };
                Ok((info, Some(pin), source))
            }
            Err(e) => match at
                .map(|name| self.stored_snapshot(name))
                .transpose()?
                .flatten()
            {
                Some((reader, info)) => {
                    let pin = self.pin_stored(&info.name);
                    Ok((info, Some(pin), VersionSource::Store(reader)))
                }
                None => Err(e),
            },
        }
    }

    /// What the cache's blocks of snapshot `info` are checked against as
    /// they are read ([`reader::CacheCheck`]): the chunk store's version
    /// it holds (its pin; for a temporary snapshot of the head, the
    /// version the image holds, unless the image is being caught up to a
    /// newer one). None where the store has no such version, or cannot be
    /// read now (said: the cache serves unchecked).
    fn cache_check(&self, info: &SnapshotInfo) -> Option<reader::CacheCheck> {
        let (store, volume) = self.chunks.as_ref()?;
        let label = format!("{volume}@{}", info.name);
        let seq = if info.kind == Kind::Temporary {
            (self.state.store_seq > 0 && self.catching_up.is_none()).then_some(self.state.store_seq)
        } else {
            match store.pin_record(volume, &info.name) {
                Ok(pin) => pin.map(|p| p.seq),
                Err(e) => {
                    tracing::warn!("{label}: the chunk store cannot be read to check the image cache's blocks ({e}): served unchecked");
                    None
                }
            }
        };
        let Some(seq) = seq else {
            tracing::debug!("{label}: the chunk store keeps no version of it: the image cache's blocks are served unchecked");
            return None;
        };
        match store
            .version(volume, seq)
            .and_then(|r| Ok((r.epoch, store.reader(&r)?)))
        {
            Ok((epoch, reader)) if epoch == info.epoch => {
                Some(reader::CacheCheck::new(reader, label))
            }
            Ok((epoch, _)) => {
                tracing::warn!("{label}: the chunk store's version {seq} holds epoch {epoch}, not {}: the image cache's blocks are served unchecked", info.epoch);
                None
            }
            Err(e) => {
                tracing::warn!("{label}: the chunk store cannot be read to check the image cache's blocks ({e}): served unchecked");
                None
            }
        }
    }

    /// Keep snapshot `name`, which only the chunk store keeps, from being
    /// deleted here while the pin lives.
    fn pin_stored(&mut self, name: &str) -> Pin {
        self.stored_readers
            .retain(|_, n| n.load(std::sync::atomic::Ordering::Acquire) > 0);
        Pin::on(self.stored_readers.entry(name.to_string()).or_default())
    }

    /// Snapshot `name` as the chunk store keeps it (its pin), if it does.
    fn stored_snapshot(
        &self,
        name: &str,
    ) -> Result<Option<(crate::chunks::VersionReader, SnapshotInfo)>> {
        let Some((store, volume)) = &self.chunks else {
            return Ok(None);
        };
        let Some(&seq) = store.pins(volume)?.get(name) else {
            return Ok(None);
        };
        let record = store.version(volume, seq)?;
        let info = stored_info(name, &record);
        Ok(Some((store.reader(&record)?, info)))
    }

    /// The newest snapshot only the chunk store keeps (a pin with no
    /// snapshot of that name here) that shows the volume at or before
    /// `ms`, if any.
    fn stored_at(&self, ms: u64) -> Result<Option<(crate::chunks::VersionReader, SnapshotInfo)>> {
        let Some((store, volume)) = &self.chunks else {
            return Ok(None);
        };
        let mut best: Option<(VersionRecord, SnapshotInfo)> = None;
        let here = |name: &str| self.snapshots().get(name).is_some();
        let stored = stored_snapshots(store, volume, here)?;
        // A pin that cannot be read may be the one asked for: no answer
        // rather than an older snapshot's.
        if let Some((_, e)) = stored.unreadable.into_iter().next() {
            return Err(e);
        }
        for (info, record) in stored.found {
            if info.epoch_ms <= ms
                && best
                    .as_ref()
                    .is_none_or(|(_, b)| (info.epoch_ms, info.epoch) > (b.epoch_ms, b.epoch))
            {
                best = Some((record, info));
            }
        }
        best.map(|(record, info)| Ok((store.reader(&record)?, info)))
            .transpose()
    }

    /// Where a listing of the volume's snapshots starts, taken under the
    /// volume's lock: this server's own, and the chunk store to look in
    /// for the rest ([`Listing::finish`], without the lock: on an object
    /// store that is a request per snapshot, and epochs wait for the lock).
    pub fn listing(&self) -> Listing {
        Listing {
            own: self.snapshots().list().to_vec(),
            store: self.chunks.clone(),
        }
    }

    /// The chunk store version the image holds, if attached.
    pub fn stored(&self) -> Option<(&Arc<ChunkStore>, &str, u64)> {
        self.chunks
            .as_ref()
            .map(|(s, n)| (s, n.as_str(), self.state.store_seq))
    }

    /// Store the whole image as the next version.
    fn store_image(&self, store: &ChunkStore, name: &str) -> Result<u64> {
        let base = store.head(name)?;
        let mut p = store.publication(name, base.as_ref(), self.state.size)?;
        let mut buf = vec![0u8; block::BLOCK as usize];
        for n in 0..blocks_of(self.state.size) {
            let offset = n * block::BLOCK;
            let len = (self.state.size - offset).min(block::BLOCK) as usize;
            self.read_at(&mut buf[..len], offset)?;
            let data = &buf[..len];
            if block::is_zero(data) {
                p.put(n, None, HOLE)?;
            } else {
                p.put(n, Some(data), block::digest(data))?;
            }
        }
        let writer = self.state.writer().map(|w| WriterRecord {
            device: w.device,
            epoch: w.epoch,
        });
        Ok(
            p.finish(self.state.published_epoch, writer, &self.state.uuid)?
                .record
                .seq,
        )
    }

    /// Bring the image from version `old` of the store (`None`: unknown,
    /// every block is written) to `new`, keeping what it overwrites for
    /// the newest snapshot first, and record `new`'s epoch.
    ///
    /// Crash argument: the image is written only between `catching-up`
    /// made durable and `state.json` recording `new`. Stopped between
    /// them (a store error, a crash), the image holds `old` with some of
    /// `new`'s blocks: the marker says so across a restart, no snapshot
    /// is taken meanwhile ([`Volume::snapshot`] finishes the catch-up
    /// first or refuses), no epoch is published on it (the store is
    /// ahead of the state, so [`Volume::store_epoch`] refuses; with no
    /// store attached, the commit refuses), and the
    /// next catch-up writes every block, since the blocks written may
    /// not be among those that differ between `old` and a later head.
    fn catch_up(
        &mut self,
        store: &Arc<ChunkStore>,
        old: Option<&VersionRecord>,
        new: &VersionRecord,
    ) -> Result<()> {
        tracing::info!(
            from = old.map_or(0, |o| o.seq),
            to = new.seq,
            "catching the image up from the chunk store"
        );
        let reader = store.reader(new)?;
        let old_reader = old.map(|o| store.reader(o)).transpose()?;
        let segments = new.segments.len();
        let mut changed = Vec::new();
        for s in 0..segments {
            if old.is_some_and(|o| o.segments.get(s) == Some(&new.segments[s])) {
                continue;
            }
            let now = reader.segment(s)?;
            let was = old_reader.as_ref().map(|r| r.segment(s)).transpose()?;
            for (slot, d) in now.iter().enumerate() {
                if was.as_ref().is_none_or(|w| w.get(slot) != Some(d)) {
                    changed.push((s * crate::chunks::format::SEGMENT_BLOCKS + slot) as u64);
                }
            }
        }
        if !self.snapshots().list().is_empty() {
            // Whole blocks change: their chunks' every unit.
            let units: Vec<(u64, Units)> = changed
                .iter()
                .map(|n| n * block::BLOCK / SNAPSHOT_CHUNK)
                .collect::<BTreeSet<u64>>()
                .into_iter()
                .map(|chunk| (chunk, WHOLE))
                .collect();
            self.preserve_units(&units)?;
        }
        // From here the image may hold part of `new`: marked durably
        // first, so that however this ends (an error, a crash), no
        // snapshot is taken of it and the next catch-up writes every
        // block, until one ends.
        let marker = serde_json::to_vec(&CatchingUp {
            format: CATCHING_UP_FORMAT,
            to: new.seq,
        })
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        fsutil::write_durably(&self.dir.join(CATCHING_UP), &marker)
            .map_err(|e| Error::io("marking the image as catching up", e))?;
        self.catching_up = Some(new.seq);
        let streamed = fsutil::Streamed::new();
        for batch in changed.chunks(256) {
            for (&n, data) in batch.iter().zip(reader.blocks(batch)?) {
                let offset = n * block::BLOCK;
                match data {
                    Some(d) => {
                        self.image
                            .write_all_at(&d, offset)
                            .map_err(|e| Error::io("writing the image", e))?;
                        streamed.moved(&self.image, d.len() as u64);
                    }
                    None => {
                        let len = (self.state.size - offset).min(block::BLOCK);
                        fsutil::punch_or_zero(&self.image, offset, len)
                            .map_err(|e| Error::io("punching a hole in the image", e))?
                    }
                }
            }
        }
        self.image
            .sync_all()
            .map_err(|e| Error::io("syncing the image", e))?;
        let state = VolumeState {
            published_epoch: new.epoch,
            published_ms: new.created_ms,
            owner: new
                .writer
                .map(|w| hex_encode(&w.device))
                .or(self.state.owner.clone()),
            writer_epoch: new.writer.map_or(self.state.writer_epoch, |w| w.epoch),
            store_seq: new.seq,
            store_id: store.id().map(str::to_string),
            uuid: if new.uuid.is_empty() {
                self.state.uuid.clone()
            } else {
                new.uuid.clone()
            },
            ..self.state.clone()
        };
        write_state(&self.dir, &state)?;
        self.state = state;
        self.caught_up();
        tracing::info!(blocks = changed.len(), seq = new.seq, "image caught up");
        Ok(())
    }

    /// The image is the version the state names again: no catch-up is
    /// part way. A marker left behind (its removal lost in a crash) names
    /// a version no newer than the state's, and is ignored.
    fn caught_up(&mut self) {
        self.catching_up = None;
        if let Err(e) = fsutil::remove_durably(&self.dir.join(CATCHING_UP)) {
            tracing::warn!("removing {}: {e}", self.dir.join(CATCHING_UP).display());
        }
    }

    /// Store a complete staging as the next version (when attached): its
    /// sequence number. A staging stored already (its answer lost) is not
    /// stored twice.
    fn store_epoch(&self, staging: &Staging) -> Result<Option<u64>> {
        let Some((store, name)) = &self.chunks else {
            return Ok(None);
        };
        let writer = WriterRecord {
            device: staging.writer.device,
            epoch: staging.writer.epoch,
        };
        let head = store.head(name)?;
        if let Some(h) = &head {
            if h.writer == Some(writer) && h.epoch == staging.epoch {
                return Ok(Some(h.seq));
            }
        }
        if head.is_none() && !self.is_new() {
            // The image has data the store never got (its first upload,
            // [`Volume::refresh`], could not run when the epoch began): a
            // version with no base would call all of it holes. The epoch
            // waits, staged, for the upload at its next begin.
            return Err(Error::Store(format!(
                "volume {name} has data that is not in the store {} yet (its first upload has not run): the epoch is kept staged until it has",
                store.describe()
            )));
        }
        let head_seq = head.as_ref().map_or(0, |h| h.seq);
        if head_seq != self.state.store_seq {
            return Err(Error::Invalid(format!(
                "volume {name} moved on in the store {} (version {head_seq}, this image holds {}): another server took it; reconnect",
                store.describe(),
                self.state.store_seq
            )));
        }
        let mut p = store.publication(name, head.as_ref(), self.state.size)?;
        let size = self.state.size;
        if staging.direct {
            // `N.data` holds each touched block as the epoch leaves it (on
            // an all-zero image); named by what it holds (see the staging's
            // module docs on resends).
            let path = |ext| staging_path(&self.dir, staging.epoch, ext);
            let (data_path, log_path) = (path("data"), path("log"));
            let data = File::open(&data_path)
                .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
            let direct = DirectLog::read(&log_path, size, !staging.unlogged())?;
            let mut buf = Vec::new();
            let streamed = fsutil::Streamed::new();
            // A block the log names is stored under the digest checked on
            // arrival, and read only if the store lacks it: packed as the
            // client sent it where its frame was kept, else read and
            // compressed.
            let mut frames = staging.frames();
            let mut log = LogReader::open(&log_path)?;
            while let Some((record, e)) = log.next_numbered()? {
                let Some(n) = direct.named(&e) else { continue };
                if e.sha256 == block::zero_digest(e.len) {
                    p.put(n, None, HOLE)?;
                } else if !p.needs(&e.sha256) {
                    p.put_known(n, e.sha256)?;
                } else if let Some(sent) = frames.as_mut().and_then(|f| f.take(record, e.len)) {
                    p.put_sent(n, sent, e.sha256)?;
                } else {
                    read_block(&data, &data_path, size, n, &mut buf)?;
                    streamed.moved(&data, buf.len() as u64);
                    p.put(n, Some(&buf), e.sha256)?;
                }
            }
            // The others are read and hashed.
            for n in direct.blocks().filter(|&n| direct.unsure(n)) {
                read_block(&data, &data_path, size, n, &mut buf)?;
                streamed.moved(&data, buf.len() as u64);
                if block::is_zero(&buf) {
                    p.put(n, None, HOLE)?;
                } else {
                    p.put(n, Some(&buf), block::digest(&buf))?;
                }
            }
            return Ok(Some(
                p.finish(staging.epoch, Some(writer), &self.state.uuid)?
                    .record
                    .seq,
            ));
        }
        let (data, data_path, log_path) = self.staged_files(staging.epoch)?;
        let block_len = |n: u64| block_len(size, n);
        // The protocol allows any extent; a store version is whole blocks.
        // A block some extent covers only in part is made from the image
        // (which holds the store's newest version) and every extent on it,
        // in order, one block at a time (scattered 4 KiB writes make one
        // of those per write: held all at once, 1.3 GiB for 1% of an
        // 8 GiB volume); the others are stored as they come.
        let mut partial: BTreeMap<u64, Vec<Piece>> = BTreeMap::new();
        let mut log = LogReader::open(&log_path)?;
        while let Some(e) = log.next_entry()? {
            for (n, from, to) in pieces(e.offset, e.len, size) {
                if to - from != block_len(n) {
                    partial.entry(n).or_default();
                }
            }
        }
        let mut log = LogReader::open(&log_path)?;
        let (mut buf, mut whole) = (Vec::new(), Vec::new());
        let mut frames = staging.frames();
        while let Some((record, e)) = log.next_numbered()? {
            whole.clear();
            whole.extend(pieces(e.offset, e.len, size).filter(|&(n, from, to)| {
                match partial.get_mut(&n) {
                    Some(on) => {
                        // Where the piece's bytes are in `N.data`.
                        let at = e.data_at.map(|at| at + (from - e.offset));
                        on.push(Piece { from, to, at });
                        false
                    }
                    None => true,
                }
            }));
            if whole.is_empty() {
                continue;
            }
            // A block that came whole is packed as it came, or not at all
            // where its chunk is there already (a copy of an earlier one).
            if let [(n, from, to)] = whole[..] {
                if e.data_at.is_some() && from == e.offset && to - from == u64::from(e.len) {
                    if !p.needs(&e.sha256) {
                        p.put_known(n, e.sha256)?;
                        continue;
                    }
                    if let Some(sent) = frames.as_mut().and_then(|f| f.take(record, e.len)) {
                        p.put_sent(n, sent, e.sha256)?;
                        continue;
                    }
                }
            }
            if let Some(at) = e.data_at {
                buf.resize(e.len as usize, 0);
                data.read_exact_at(&mut buf, at)
                    .map_err(|err| Error::io(format!("reading {}", data_path.display()), err))?;
            }
            for &(n, from, to) in &whole {
                if e.data_at.is_none() {
                    p.put(n, None, HOLE)?;
                    continue;
                }
                let d = &buf[(from - e.offset) as usize..(to - e.offset) as usize];
                let hash = if from == e.offset && u64::from(e.len) == to - from {
                    e.sha256
                } else {
                    block::digest(d)
                };
                p.put(n, Some(d), hash)?;
            }
        }
        let mut differ = 0u64;
        // The image's blocks are read, mostly from disk (a catch-up of
        // scattered writes touches blocks nothing read lately), then
        // checked and hashed: on every core, without waiting for each
        // other. Each block is asked of the disk when its job is handed
        // out, [`REBUILD_AHEAD`] blocks before the publication takes it,
        // so that the disk has many reads in flight instead of one; the
        // publication takes them in order, on this thread.
        let mut blocks = partial.iter();
        let next = |p: &mut Publication<'_>| -> Result<Option<Rebuild<'_>>> {
            let Some((&n, on)) = blocks.next() else {
                return Ok(None);
            };
            fsutil::will_need(&self.image, n * block::BLOCK, block_len(n));
            let mut ranges = Vec::new();
            changed_ranges(on, n * block::BLOCK, &mut ranges);
            // What the version had there, where a patch on it may do (the
            // publication reads it from the store's records).
            let base = if format::patchable(block_len(n) as usize, &ranges) {
                Some(p.base_digest(n)?).filter(|&was| was != HOLE)
            } else {
                None
            };
            Ok(Some(Rebuild {
                n,
                on,
                ranges,
                base,
            }))
        };
        in_order(
            &mut p,
            REBUILD_AHEAD,
            next,
            |job| self.rebuild(job, &data, &data_path, store, name),
            |p, job, (block, hash, differed)| {
                differ += u64::from(differed);
                match job.base {
                    Some(base) => p.put_patched(job.n, &block, hash, base, &job.ranges),
                    None => p.put(job.n, Some(&block), hash),
                }
            },
        )?;
        if differ > 0 {
            tracing::warn!(
                volume = %name,
                blocks = differ,
                "blocks of the image differ from the store's version they should hold (its disk?): the store's were used"
            );
        }
        Ok(Some(
            p.finish(staging.epoch, Some(writer), &self.state.uuid)?
                .record
                .seq,
        ))
    }
}

impl Volume {
    /// Epoch `epoch`'s staged data (open) with its path, and its log's
    /// path.
    fn staged_files(&self, epoch: u64) -> Result<(File, PathBuf, PathBuf)> {
        let data_path = staging_path(&self.dir, epoch, "data");
        let data = File::open(&data_path)
            .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
        Ok((data, data_path, staging_path(&self.dir, epoch, "log")))
    }

    /// Block `job.n` as the epoch leaves it: the image's block (which
    /// holds the store's newest version) with every piece the epoch wrote
    /// on it, and its digest; and whether the image's block differed from
    /// the version's chunk it should hold (`job.base`), in which case the
    /// block is made from that chunk (read from `store`, where the volume
    /// is `name`) instead, so that a patch on it stays true.
    fn rebuild(
        &self,
        job: &Rebuild<'_>,
        data: &File,
        data_path: &Path,
        store: &ChunkStore,
        name: &str,
    ) -> Result<Rebuilt> {
        let start = job.n * block::BLOCK;
        let len = block_len(self.state.size, job.n) as usize;
        let mut block = vec![0u8; len];
        self.read_at(&mut block, start)?;
        // The bytes before the first changed range are the same in the
        // image's block and in the new one: hashed once, for both digests
        // (a random 4 KiB write saves half of a hash on average).
        let same = job.ranges.first().map_or(len, |&(at, _)| at as usize);
        let shared = same.min(len) / SHA256_BLOCK * SHA256_BLOCK;
        let mut prefix = Sha256::new();
        prefix.update(&block[..shared]);
        let mut differed = false;
        if let Some(was) = job.base {
            let mut image = prefix.clone();
            image.update(&block[shared..]);
            if <[u8; 32]>::from(image.finalize()) != was {
                differed = true;
                // Made again from another block: nothing is shared.
                prefix = Sha256::new();
                block = store.chunks(&[was])?.remove(0);
                if block.len() != len {
                    return Err(Error::Corrupt(format!(
                        "block {} of {name} is {} bytes in the store, not {len}",
                        job.n,
                        block.len()
                    )));
                }
            }
        }
        for piece in job.on {
            let dst = &mut block[(piece.from - start) as usize..(piece.to - start) as usize];
            match piece.at {
                Some(at) => data
                    .read_exact_at(dst, at)
                    .map_err(|err| Error::io(format!("reading {}", data_path.display()), err))?,
                None => dst.fill(0),
            }
        }
        prefix.update(&block[if differed { 0 } else { shared }..]);
        Ok((block, prefix.finalize().into(), differed))
    }
}

/// What checking a volume's image against the chunk store's version it
/// holds found ([`Volume::image_probe`], [`Volume::repair_image`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCheck {
    /// Blocks read and checked.
    pub blocks: u64,
    /// Blocks that differed from the version.
    pub damaged: u64,
    /// Of those, made the version's again from the chunk store.
    pub repaired: u64,
}

/// The image of a volume checked against the chunk store's version it
/// holds, read without the volume's lock ([`ImageProbe::scan`]): the
/// image and the chunk store have no checksums in common but the
/// version's map, so each block is hashed and compared with it. A
/// publication meanwhile may make a block differ for a moment (the image
/// gets the next version's blocks after the store does): what differs is
/// checked again under the lock ([`Volume::repair_image`]).
#[derive(Debug)]
pub struct ImageProbe {
    image: Arc<File>,
    size: u64,
    store: crate::chunks::VersionReader,
    /// `CLIENT/VOLUME@SEQ`, for the log.
    label: String,
}

impl ImageProbe {
    /// The blocks of the image that differ from the version; `progress`
    /// gets the bytes checked so far and the image's size.
    pub fn scan(&self, mut progress: impl FnMut(u64, u64)) -> Result<(u64, Vec<u64>)> {
        let blocks = blocks_of(self.size);
        let mut suspects = Vec::new();
        let mut buf = Vec::new();
        for n in 0..blocks {
            if n % 256 == 0 {
                fsutil::will_need(&self.image, n * block::BLOCK, 256 * block::BLOCK);
                progress(n * block::BLOCK, self.size);
            }
            if self.differs(n, &mut buf)?.is_some() {
                suspects.push(n);
            }
        }
        progress(self.size, self.size);
        Ok((blocks, suspects))
    }

    /// Whether block `n` of the image differs from the version (read into
    /// `buf`): the version's digest if it does.
    fn differs(&self, n: u64, buf: &mut Vec<u8>) -> Result<Option<Digest>> {
        buf.resize(block_len(self.size, n) as usize, 0);
        let want = self.store.digest(n)?;
        // A block that cannot be read (a short image, a disk's read
        // error) differs: writing it again is the repair.
        if let Err(e) = self.image.read_exact_at(buf, n * block::BLOCK) {
            tracing::debug!("{}: block {n} of the image cannot be read: {e}", self.label);
            return Ok(Some(want));
        }
        Ok((!reader::holds(buf, want).0).then_some(want))
    }
}

/// A volume's snapshots being listed ([`Volume::listing`]).
#[derive(Debug)]
pub struct Listing {
    own: Vec<SnapshotInfo>,
    store: Option<(Arc<ChunkStore>, String)>,
}

impl Listing {
    /// Every snapshot a restore of the volume may name, in the order
    /// `mirror-server snapshots` shows them (oldest point in time first):
    /// this server's own and those only the chunk store keeps; and what
    /// of the store could not be read (its snapshots are missing here).
    pub fn finish(self) -> (Vec<SnapshotInfo>, Vec<Error>) {
        let Listing { mut own, store } = self;
        let mut problems = Vec::new();
        if let Some((store, volume)) = store {
            let names: BTreeSet<String> = own.iter().map(|s| s.name.clone()).collect();
            match stored_snapshots(&store, &volume, |n| names.contains(n)) {
                Ok(stored) => {
                    own.extend(stored.found.into_iter().map(|(info, _)| info));
                    problems.extend(stored.unreadable.into_iter().map(|(_, e)| e));
                }
                Err(e) => problems.push(e),
            }
        }
        own.sort_by_key(|s| (s.epoch_ms, s.created_ms));
        (own, problems)
    }
}

/// The snapshots only the chunk store keeps of a volume
/// ([`stored_snapshots`]).
#[derive(Debug, Default)]
pub struct StoredSnapshots {
    /// As listed, with their versions.
    pub found: Vec<(SnapshotInfo, VersionRecord)>,
    /// Pins that could not be read, or whose version could not: their
    /// names, and why.
    pub unreadable: Vec<(String, Error)>,
}

/// The snapshots only the chunk store keeps of `volume` (a pin whose name
/// `here` does not know: taken on another server on the store, or before
/// this server's cache was rebuilt). Only those pins are read; one gone
/// since the store was listed (another server's retention) is passed
/// over, one that cannot be read is said apart from the rest. Fails only
/// if the store cannot be listed.
pub fn stored_snapshots(
    store: &ChunkStore,
    volume: &str,
    here: impl Fn(&str) -> bool,
) -> Result<StoredSnapshots> {
    let mut stored = StoredSnapshots::default();
    for name in store.pin_names(volume)? {
        if here(&name) {
            continue;
        }
        let read = store
            .pin_record(volume, &name)
            .and_then(|pin| pin.map(|p| store.version(volume, p.seq)).transpose());
        match read {
            Ok(Some(record)) => stored.found.push((stored_info(&name, &record), record)),
            Ok(None) => {}
            Err(e) => stored.unreadable.push((name, e)),
        }
    }
    Ok(stored)
}

/// A snapshot only the chunk store keeps, as listed: pin `name` of
/// version `record`.
pub fn stored_info(name: &str, record: &VersionRecord) -> SnapshotInfo {
    SnapshotInfo {
        id: 0,
        name: name.to_string(),
        epoch: record.epoch,
        epoch_ms: record.created_ms,
        created_ms: record.created_ms,
        kind: Kind::Stored,
        by_schedule: false,
    }
}

/// The length of block `n` of a volume of `size` bytes (the last may be
/// short).
fn block_len(size: u64, n: u64) -> u64 {
    size.saturating_sub(n * block::BLOCK).min(block::BLOCK)
}

/// What a direct staging's log (`N.log`) says of the blocks of a volume
/// of `size` bytes: which its entries touch, in part or whole, and which
/// of those the log names, two bits per block of the volume (4 MiB for
/// 1 TiB). The log names a block that exactly one entry touches, that
/// block exactly, when it is trusted (no write to `N.data` went
/// unlogged, [`Staging::unlogged`]): that entry's bytes were verified
/// against its digest before they were written, and nothing else was
/// written there. A block with two entries holds one of them, not
/// necessarily the one logged last (see [`staging`]), and one covered in
/// part holds several: those are *unsure*, read and hashed.
struct DirectLog {
    size: u64,
    touched: Vec<u64>,
    unsure: Vec<u64>,
}

impl DirectLog {
    fn read(log_path: &Path, size: u64, trusted: bool) -> Result<DirectLog> {
        let words = size.div_ceil(block::BLOCK).div_ceil(64) as usize;
        let mut d = DirectLog {
            size,
            touched: vec![0; words],
            unsure: vec![0; words],
        };
        let mut log = LogReader::open(log_path)?;
        while let Some(e) = log.next_entry()? {
            for (n, _, _) in pieces(e.offset, e.len, size) {
                let (w, bit) = ((n / 64) as usize, 1 << (n % 64));
                if !trusted || d.touched[w] & bit != 0 || d.whole(&e) != Some(n) {
                    d.unsure[w] |= bit;
                }
                d.touched[w] |= bit;
            }
        }
        Ok(d)
    }

    /// The block `e` is, no more and no less.
    fn whole(&self, e: &Entry) -> Option<u64> {
        let n = e.offset / block::BLOCK;
        (e.offset == n * block::BLOCK
            && n < self.size.div_ceil(block::BLOCK)
            && u64::from(e.len) == block_len(self.size, n))
        .then_some(n)
    }

    /// The block `e` names (see the type's docs), if any.
    fn named(&self, e: &Entry) -> Option<u64> {
        self.whole(e).filter(|&n| !self.unsure(n))
    }

    fn unsure(&self, n: u64) -> bool {
        self.unsure[(n / 64) as usize] & (1 << (n % 64)) != 0
    }

    /// The blocks touched, ascending.
    fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.touched.iter().enumerate().flat_map(|(i, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }
}

/// Read block `n` (of a volume of `size` bytes) from `data` into `buf`.
fn read_block(data: &File, data_path: &Path, size: u64, n: u64, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(block_len(size, n) as usize, 0);
    data.read_exact_at(buf, n * block::BLOCK)
        .map_err(|e| Error::io(format!("reading {}", data_path.display()), e))
}

/// Call `f` with each block that a direct staging's log (`log_path`)
/// touches ([`DirectLog`]), ascending, and its bytes as its `N.data`
/// (`data_path`) holds them: the block as the epoch leaves it. Returns
/// how many there were.
fn each_direct_block(
    data_path: &Path,
    log_path: &Path,
    size: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<usize> {
    let direct = DirectLog::read(log_path, size, false)?;
    let data = File::open(data_path)
        .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
    let mut buf = Vec::new();
    let mut count = 0;
    for n in direct.blocks() {
        read_block(&data, data_path, size, n, &mut buf)?;
        f(n, &buf)?;
        count += 1;
    }
    Ok(count)
}

/// Open `path` (an image) for reading and writing.
fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// The blocks an extent of `len` bytes at `offset` touches: (block, from,
/// to) with the byte range of the volume it covers in each.
fn pieces(offset: u64, len: u32, size: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let end = (offset + u64::from(len)).min(size);
    let first = offset / block::BLOCK;
    let last = if end > offset {
        (end - 1) / block::BLOCK
    } else {
        first.saturating_sub(1)
    };
    (first..=last).filter(move |_| end > offset).map(move |n| {
        let start = n * block::BLOCK;
        (n, offset.max(start), end.min(start + block::BLOCK))
    })
}

/// Part of a block that an extent of a staging covers: `from..to` of the
/// volume, its bytes at `at` in `N.data` (`None`: zeroes).
#[derive(Debug, Clone, Copy)]
struct Piece {
    from: u64,
    to: u64,
    at: Option<u64>,
}

/// Blocks covered in part that a catch-up hands out to be rebuilt and
/// does not yet hold in its publication, at most: asked of the disk that
/// far ahead, and 16 MiB of blocks held.
const REBUILD_AHEAD: usize = 256;

/// The bytes SHA-256 takes at a time: a hash's state after a multiple of
/// them can be carried on with different bytes.
const SHA256_BLOCK: usize = 64;

/// A block an epoch covers in part, to rebuild ([`Volume::rebuild`]).
struct Rebuild<'a> {
    n: u64,
    /// The epoch's pieces on it, in the order written.
    on: &'a [Piece],
    /// The changed ranges in it ([`changed_ranges`]).
    ranges: Vec<(u32, u32)>,
    /// The chunk the version has there, where the block is to be a patch
    /// on it ([`format::patchable`]).
    base: Option<Digest>,
}

/// A rebuilt block ([`Volume::rebuild`]): its bytes, its digest, and
/// whether the image's block differed from the version's.
type Rebuilt = (Vec<u8>, Digest, bool);

/// Threads one publication rebuilds blocks on, at most: a server
/// publishes many volumes' epochs at once.
const REBUILD_THREADS: usize = 4;

/// What a rebuilding thread hands back: the job, and its result or its
/// panic (resumed on the calling thread, once the others have stopped).
type Done<J, T> = (usize, J, std::thread::Result<Result<T>>);

/// The jobs [`in_order`] handed out and not yet begun, and whether no
/// more come.
type Queue<J> = std::sync::Mutex<(std::collections::VecDeque<(usize, J)>, bool)>;

/// Tells [`in_order`]'s threads that no more jobs come, however the
/// calling thread leaves (done, an error, or a panic of `next` or
/// `take`): else they would wait for jobs forever, and the scope for
/// them. What is left in the queue is dropped; a thread finishes the job
/// it holds.
struct Closing<'a, J>(&'a Queue<J>, &'a std::sync::Condvar);

impl<J> Drop for Closing<'_, J> {
    fn drop(&mut self) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.0.clear();
        q.1 = true;
        drop(q);
        self.1.notify_all();
    }
}

/// `work` done on each job `next` hands out (until `None`), spread over
/// the machine's cores (up to [`REBUILD_THREADS`], no thread waiting for
/// another), while this thread hands out jobs and `take`s each job's
/// result in the order they were handed out. At most `ahead` jobs are
/// out and not yet taken: what bounds the memory held. `state` is lent
/// to `next` and `take` in turn. Stops at the first error.
fn in_order<S, J: Send, T: Send>(
    state: &mut S,
    ahead: usize,
    mut next: impl FnMut(&mut S) -> Result<Option<J>>,
    work: impl Fn(&J) -> Result<T> + Sync,
    mut take: impl FnMut(&mut S, J, T) -> Result<()>,
) -> Result<()> {
    // No thread is started for nothing (most epochs cover no block in
    // part).
    let Some(first) = next(state)? else {
        return Ok(());
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(REBUILD_THREADS);
    if threads <= 1 {
        let mut job = first;
        loop {
            let done = work(&job)?;
            take(state, job, done)?;
            match next(state)? {
                Some(j) => job = j,
                None => return Ok(()),
            }
        }
    }
    let queue: Queue<J> = std::sync::Mutex::new((std::collections::VecDeque::new(), false));
    let handed = std::sync::Condvar::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Done<J, T>>();
    std::thread::scope(|scope| {
        // Before the threads: one that fails to start panics here.
        let closing = Closing(&queue, &handed);
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let (queue, handed, work) = (&queue, &handed, &work);
            scope.spawn(move || loop {
                let job = {
                    let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if let Some(job) = q.0.pop_front() {
                            break Some(job);
                        }
                        if q.1 {
                            break None;
                        }
                        q = handed.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                };
                let Some((i, job)) = job else { return };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&job)));
                if done_tx.send((i, job, result)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let mut panicked = None;
        let mut first = Some(first);
        let result = (|| {
            let (mut out, mut taken, mut more) = (0usize, 0usize, true);
            let mut finished = BTreeMap::new();
            loop {
                while more && out - taken < ahead {
                    let job = match first.take() {
                        Some(job) => Some(job),
                        None => next(state)?,
                    };
                    match job {
                        Some(job) => {
                            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                            q.0.push_back((out, job));
                            handed.notify_one();
                            out += 1;
                        }
                        None => more = false,
                    }
                }
                if taken == out {
                    return Ok(());
                }
                let (i, job, result) = done_rx
                    .recv()
                    .expect("a job is out, so a rebuilding thread holds it");
                finished.insert(i, (job, result));
                while let Some((job, result)) = finished.remove(&taken) {
                    match result {
                        Ok(done) => take(state, job, done?)?,
                        Err(panic) => {
                            panicked = Some(panic);
                            return Ok(());
                        }
                    }
                    taken += 1;
                }
            }
        })();
        drop(closing);
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
        result
    })
}

/// The ranges of a block (at `start`) that `pieces` cover, in order and
/// merged where they touch or overlap, as (offset in the block, length).
fn changed_ranges(pieces: &[Piece], start: u64, out: &mut Vec<(u32, u32)>) {
    out.clear();
    let mut spans: Vec<(u64, u64)> = pieces.iter().map(|p| (p.from, p.to)).collect();
    spans.sort_unstable();
    for (from, to) in spans {
        match out.last_mut() {
            Some((at, len)) if u64::from(*at + *len) + start >= from => {
                let end = (u64::from(*at + *len) + start).max(to);
                *len = (end - start) as u32 - *at;
            }
            _ => out.push(((from - start) as u32, (to - from) as u32)),
        }
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

/// A volume's `state.json`, read only (no recovery).
pub fn read_state(dir: &Path) -> Result<VolumeState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

pub use ublk_mirror_common::block::zero_digest;

/// The version an interrupted catch-up was writing (`catching-up`), if
/// its marker is there.
fn read_catching_up(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(CATCHING_UP);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let c: CatchingUp = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
    if c.format != CATCHING_UP_FORMAT {
        return Err(Error::Corrupt(format!(
            "{}: format {} is not supported (this is {CATCHING_UP_FORMAT})",
            path.display(),
            c.format
        )));
    }
    Ok(Some(c.to))
}

fn read_marker(path: &Path) -> Result<Marker> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

/// Let the volume in `dir` be kept in `store` from now on, which holds
/// no version of it (`name`): its image is stored there as its first
/// version when it is next opened. Refused when the store has a version
/// of it (it may be the store it was in; nothing is changed then). For
/// `mirror-server upgrade --move-to-this-store`, with the server stopped.
pub fn move_to_store(dir: &Path, store: &ChunkStore, name: &str) -> Result<bool> {
    // Only in the store (no image here): nothing to move.
    if !dir.join(STATE).exists() {
        return Ok(false);
    }
    let mut state = read_state(dir)?;
    if state.store_seq == 0 && state.store_id.is_none() {
        return Ok(false);
    }
    if let Some(h) = store.head(name)? {
        if state.store_id.is_some() && state.store_id.as_deref() == store.id() {
            // Moved already (or kept here all along).
            return Ok(false);
        }
        return Err(Error::Invalid(format!(
            "volume {name}: {} holds version {} of it already: not moved (is it the store it is kept in?)",
            store.describe(),
            h.seq
        )));
    }
    state.store_seq = 0;
    state.store_id = None;
    write_state(dir, &state)?;
    Ok(true)
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
    use ublk_mirror_common::proto::{Encoding, NOT_STAGED};

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

    /// Version `head` of a volume of `size` bytes, whole, as the store
    /// `on` reads it (holes as zeroes).
    fn read_version(on: &Arc<ChunkStore>, head: &VersionRecord, size: u64) -> Vec<u8> {
        let ns: Vec<u64> = (0..size.div_ceil(block::BLOCK)).collect();
        on.reader(head)
            .unwrap()
            .blocks(&ns)
            .unwrap()
            .into_iter()
            .zip(&ns)
            .flat_map(|(b, &n)| b.unwrap_or_else(|| vec![0; block_len(size, n) as usize]))
            .collect()
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

    /// A time given to the second, as `snapshots` shows it, picks the
    /// snapshot taken within that second (not the one before it).
    #[test]
    fn a_time_to_the_second_picks_the_snapshot_of_that_second() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::create(&dir.path().join("vol"), 1 << 20).unwrap();
        publish_whole(&mut v, 1, &vec![1u8; 1 << 20]);
        let one = v.snapshot(Some("one"), Kind::Manual).unwrap();
        // The next one in another second.
        std::thread::sleep(std::time::Duration::from_millis(
            1000 - one.epoch_ms % 1000 + 10,
        ));
        publish_whole(&mut v, 2, &vec![2u8; 1 << 20]);
        let two = v.snapshot(Some("two"), Kind::Manual).unwrap();
        assert_ne!(one.epoch_ms / 1000, two.epoch_ms / 1000);
        let shown = |ms: u64| {
            jiff::Timestamp::from_millisecond(ms as i64)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        };
        for want in [&one, &two] {
            let (got, pin) = v.pin_version(Some(&shown(want.epoch_ms))).unwrap();
            assert_eq!(
                got.name,
                want.name,
                "{} given as {}",
                want.epoch_ms,
                shown(want.epoch_ms)
            );
            v.done_reading(&got, Some(pin)).unwrap();
        }
        // A second before the first: none.
        assert!(v.pin_version(Some(&shown(one.epoch_ms - 1000))).is_err());
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
    fn pre_copy_rounds_stay_staged_across_a_restart_and_the_last_copy_wins() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        let (old, new) = (block(1, 8192), block(2, 8192));
        let s = v.begin(1, me(1)).unwrap();
        s.add(0, 8192, &digest(&old), Encoding::Raw, &old).unwrap();
        s.add(65536, 8192, &digest(&old), Encoding::Raw, &old)
            .unwrap();
        // A round ends: durable, open, nothing published.
        v.sync_round(&s).unwrap();
        assert!(s.is_open());
        assert_eq!(v.state().published_epoch, 0);
        // The next round of the same writer finds it, and sends a block again.
        let again = v.begin(1, me(1)).unwrap();
        assert!(Arc::ptr_eq(&s, &again));
        again
            .add(0, 8192, &digest(&new), Encoding::Raw, &new)
            .unwrap();
        v.sync_round(&again).unwrap();
        // The server restarts: the rounds are still there, as they were.
        drop((s, again, v));
        let (mut v, _) = Volume::open(&vdir).unwrap();
        let s = v.begin(1, me(1)).unwrap();
        assert_eq!(s.ranges(), [(0, 8192), (65536, 8192)]);
        assert!(!s.adopted());
        v.commit(&s).unwrap();
        let mut buf = vec![0u8; 8192];
        v.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, new, "the later round's copy is published");
        v.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, old);
        // A round with a block that failed its check is not ended.
        let s = v.begin(2, me(2)).unwrap();
        assert!(s.add(0, 8192, &digest(&old), Encoding::Raw, &new).is_err());
        let err = v.sync_round(&s).unwrap_err().to_string();
        assert!(err.contains("failed their checks"), "{err}"); // A staging another begin took over is no longer ours to end.
        let other = v.begin(2, me(3)).unwrap();
        assert!(!Arc::ptr_eq(&s, &other));
        let err = v.sync_round(&s).unwrap_err().to_string();
        assert!(err.contains("no longer being staged"), "{err}");
    }

    /// An epoch that staged all it may (blocks sent over and over) is
    /// refused more, and the next attempt at it starts over instead of
    /// resuming what would refuse it again, in this process or after a
    /// restart.
    #[test]
    fn an_epoch_that_staged_all_it_may_starts_over() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        // Not direct (a snapshot exists): blocks go to the data file.
        v.snapshot(Some("s"), Kind::Manual).unwrap();
        let most = staging::Staging::most(SIZE);
        let s = v.begin(1, me(1)).unwrap();
        let mut refused = None;
        for i in 0..(most / B + 2) {
            let b = block((i % 250) as u8 + 1, B as usize);
            if let Err(e) = s.add(0, B as u32, &digest(&b), Encoding::Raw, &b) {
                refused = Some((i, e.to_string()));
                break;
            }
        }
        let (i, err) = refused.expect("never refused");
        assert!(err.contains("no more is taken"), "{err}");
        assert_eq!(i, most / B, "refused at {i}");
        // The same writer again: a fresh staging takes blocks.
        let s = v.begin(1, me(1)).unwrap();
        let b = block(7, B as usize);
        s.add(0, B as u32, &digest(&b), Encoding::Raw, &b).unwrap();
        // Filled again, then the server restarts: not resumed either.
        for i in 0u64.. {
            let b = block((i % 250) as u8 + 2, B as usize);
            if s.add(0, B as u32, &digest(&b), Encoding::Raw, &b).is_err() {
                break;
            }
        }
        drop(s);
        drop(v);
        let (mut v, _) = Volume::open(&vdir).unwrap();
        let s = v.begin(1, me(1)).unwrap();
        s.add(0, B as u32, &digest(&b), Encoding::Raw, &b).unwrap();
    }

    /// A client's numbers out of range are refused, leaving nothing: a
    /// volume bigger than 1 PiB (or of 0 bytes), an epoch with no
    /// successor.
    #[test]
    fn sizes_and_epochs_out_of_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0, MAX_VOLUME_SIZE + 1, u64::MAX] {
            let vdir = dir.path().join(format!("v{size}"));
            let err = Volume::create(&vdir, size).err().unwrap().to_string();
            assert!(err.contains("1 PiB"), "{err}");
            assert!(!vdir.exists(), "a refused volume left its directory");
        }
        let mut v = Volume::create(&dir.path().join("v"), SIZE).unwrap();
        let err = v.begin(u64::MAX, me(u64::MAX)).err().unwrap().to_string();
        assert!(err.contains("out of range"), "{err}");
        assert_eq!(v.state().published_epoch, 0);
    }

    #[test]
    fn a_take_over_fences_the_old_writer_and_keeps_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        let image = block(5, SIZE as usize);
        publish_whole(&mut v, 1, &image);
        v.snapshot(Some("before"), Kind::Manual).unwrap();
        let new = [7u8; 16];
        // The old writer has an epoch half staged.
        let half = v.begin(2, me(2)).unwrap();
        let a = block(9, 4096);
        half.add(0, 4096, &digest(&a), Encoding::Raw, &a).unwrap();
        // A swap against a writer that is not the volume's is refused.
        let err = v.take_over(None, new).unwrap_err().to_string();
        assert!(err.contains("moved on"), "{err}");
        assert_eq!(v.take_over(Some(me(1)), new).unwrap(), 2);
        let mine = Writer {
            device: new,
            epoch: 0,
        };
        assert_eq!(v.state().writer(), Some(mine));
        assert_eq!(v.state().published_epoch, 2);
        // The image and the history are as they were.
        let mut buf = vec![0u8; SIZE as usize];
        v.read_at(&mut buf, 0).unwrap();
        assert!(buf == image, "the image changed");
        assert_eq!(v.snapshots().list().len(), 1);
        // The old writer's staging is gone, and its epochs are refused.
        assert!(
            v.commit(&half).is_err(),
            "a fenced writer's epoch published"
        );
        let err = v.begin(3, me(3)).unwrap_err().to_string();
        assert!(err.contains("another device"), "{err}");
        // Retried (the answer was lost): the same epoch, nothing new.
        assert_eq!(v.take_over(Some(me(1)), new).unwrap(), 2);
        // The new writer's epochs are taken, also after a restart.
        drop(v);
        let (mut v, _) = Volume::open(&vdir).unwrap();
        assert_eq!(v.state().writer(), Some(mine));
        let s = v
            .begin(
                3,
                Writer {
                    device: new,
                    epoch: 1,
                },
            )
            .unwrap();
        s.add(0, 4096, &digest(&a), Encoding::Raw, &a).unwrap();
        v.commit(&s).unwrap();
        v.read_at(&mut buf[..4096], 0).unwrap();
        assert_eq!(&buf[..4096], &a[..]);
        // Taken over again by the same device (its journal began again):
        // a new epoch, so that its local epoch 1 is not taken as published.
        let first = Writer {
            device: new,
            epoch: 1,
        };
        assert_eq!(v.take_over(Some(first), new).unwrap(), 4);
        assert_eq!(v.state().writer(), Some(mine));
    }

    #[test]
    fn a_new_volumes_first_epoch_lands_in_place_and_becomes_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (block(1, 8192), block(2, 4096), block(3, 4096));
        // Staged blocks: a over 0..8192, then a later copy of 4096..8192
        // (c), then b at 65536 and a zero block over it, then b again at
        // 131072.
        let stage = |v: &mut Volume| {
            let s = v.begin(1, me(1)).unwrap();
            assert!(s.direct, "a new volume's first epoch is staged direct");
            s.add(0, 8192, &digest(&a), Encoding::Raw, &a).unwrap();
            s.add(4096, 4096, &digest(&c), Encoding::Raw, &c).unwrap();
            s.add(65536, 4096, &digest(&b), Encoding::Raw, &b).unwrap();
            s.add(65536, 4096, &zero_digest(4096), Encoding::Zero, &[])
                .unwrap();
            s.add(131072, 4096, &digest(&b), Encoding::Raw, &b).unwrap();
            s
        };
        let check = |v: &Volume| {
            let mut image = vec![0u8; SIZE as usize];
            v.read_at(&mut image, 0).unwrap();
            let mut want = vec![0u8; SIZE as usize];
            want[..4096].copy_from_slice(&a[..4096]);
            want[4096..8192].copy_from_slice(&c);
            want[131072..135168].copy_from_slice(&b);
            assert!(image == want, "the image is not the epoch");
            assert_eq!(v.state().published_epoch, 1);
            assert!(staging_epochs(&v.dir).unwrap().is_empty());
        };
        // Nobody reads the image: the staging is renamed over it; a crash
        // right after the rename publishes on the next open.
        let vdir = dir.path().join("renamed");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        let s = stage(&mut v);
        let data = staging_path(&vdir, 1, "data");
        assert_eq!(std::fs::metadata(&data).unwrap().len(), SIZE);
        v.commit_until(&s, Some(CommitStep::HalfApplied)).unwrap();
        assert!(!data.exists(), "the staged data was not renamed");
        assert_eq!(v.state().published_epoch, 0);
        drop((s, v));
        let (v, recovery) = Volume::open(&vdir).unwrap();
        assert_eq!(recovery.completed, Some(1));
        check(&v);
        // A reader of the empty image is handed out meanwhile: the blocks
        // are copied (the reader's handle stays the image's).
        let vdir = dir.path().join("copied");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        let s = stage(&mut v);
        let reader = v.reader();
        v.commit(&s).unwrap();
        check(&v);
        let mut got = vec![0u8; 4096];
        v.read_at(&mut got, 131072).unwrap();
        assert_eq!(got, b);
        drop(reader);
        // The next epoch is staged as usual, in arrival order.
        let s = v.begin(2, me(2)).unwrap();
        assert!(!s.direct);
        // A resume after a crash: an entry whose bytes no longer check is
        // dropped, and what no kept entry covers reads as zeroes again; a
        // zero block whose hole was lost is dropped too.
        let vdir = dir.path().join("resumed");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        let s = stage(&mut v);
        drop((s, v));
        let data = OpenOptions::new()
            .write(true)
            .open(staging_path(&vdir, 1, "data"))
            .unwrap();
        data.write_all_at(&[0xee; 16], 0).unwrap();
        data.write_all_at(&[0xee; 16], 65536).unwrap();
        // Bytes whose record never reached the log, and a length a power
        // cut lost.
        data.write_all_at(&[0xee; 16], 262144).unwrap();
        data.set_len(262144 + 16).unwrap();
        let (mut v, recovery) = Volume::open(&vdir).unwrap();
        assert_eq!(recovery.resumable, [1]);
        let s = v.begin(1, me(1)).unwrap();
        assert!(s.direct);
        assert_eq!(s.ranges(), [(4096, 4096), (131072, 4096)]);
        let mut got = vec![0u8; 4096];
        s.data.read_exact_at(&mut got, 0).unwrap();
        assert!(block::is_zero(&got), "a dropped entry's bytes stayed");
        s.data.read_exact_at(&mut got, 262144).unwrap();
        assert!(block::is_zero(&got), "unlogged bytes stayed");
        assert_eq!(s.data.metadata().unwrap().len(), SIZE);
        // The client sends what is missing again.
        s.add(0, 4096, &digest(&a[..4096]), Encoding::Raw, &a[..4096])
            .unwrap();
        s.add(65536, 4096, &zero_digest(4096), Encoding::Zero, &[])
            .unwrap();
        v.commit(&s).unwrap();
        check(&v);
    }

    /// With a chunk store attached, an epoch published over a snapshot
    /// keeps what it overwrites for the snapshot while the store takes the
    /// epoch: the snapshot reads as it was, the image and the store's
    /// version as the epoch. When the store refuses the next epoch
    /// (another server moved the volume on), what was kept for it costs
    /// space only: the snapshot and the image read as before.
    #[test]
    fn a_snapshot_keeps_what_an_epoch_overwrites_while_the_store_takes_it() {
        const BIG: u64 = 4 << 20;
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = Arc::new(ChunkStore::with(memory, "test".into(), 1 << 20).unwrap());
        let mut v = Volume::create(&dir.path().join("vol"), BIG).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let one: Vec<u8> = (0..BIG as usize).map(|i| (i / 4096) as u8 | 1).collect();
        publish_whole(&mut v, 1, &one);
        let snap = v.snapshot(Some("one"), Kind::Manual).unwrap();
        // A 4 KiB write in every other block (even ones in even epochs),
        // staged.
        let scattered = |v: &mut Volume, epoch: u64, model: &mut Vec<u8>| {
            let s = v.begin(epoch, me(epoch)).unwrap();
            for k in (epoch % 2..BIG / B).step_by(2) {
                let at = k * B + 8192;
                let b = block(k as u8 ^ epoch as u8, 4096);
                s.add(at, 4096, &digest(&b), Encoding::Raw, &b).unwrap();
                model[at as usize..][..4096].copy_from_slice(&b);
            }
            s
        };
        let read = |v: &Volume| {
            let mut snapshot = vec![0u8; BIG as usize];
            v.reader().read(snap.id, &mut snapshot, 0).unwrap();
            let mut image = vec![0u8; BIG as usize];
            v.read_at(&mut image, 0).unwrap();
            (snapshot, image)
        };
        let mut two = one.clone();
        let s = scattered(&mut v, 2, &mut two);
        v.commit(&s).unwrap();
        let (snapshot, image) = read(&v);
        assert!(snapshot == one, "the snapshot changed");
        assert!(image == two, "the image is not the epoch");
        let head = store.head("c/vol").unwrap().unwrap();
        assert_eq!(head.epoch, 2);
        assert!(
            read_version(&store, &head, BIG) == two,
            "the stored version is not the epoch"
        );
        // 4 KiB kept per 4 KiB written, not the 64 KiB chunk.
        assert_eq!(v.snapshots().bytes(), BIG / B / 2 * crate::snapshots::UNIT);
        // Another server publishes a version of the volume while epoch 3
        // is staged here.
        let mut three = two.clone();
        let s = scattered(&mut v, 3, &mut three);
        let mut p = store.publication("c/vol", Some(&head), BIG).unwrap();
        let b = block(99, B as usize);
        p.put(1, Some(&b), digest(&b)).unwrap();
        p.finish(7, None, "").unwrap();
        let err = v.commit(&s).unwrap_err().to_string();
        assert!(err.contains("another server took it"), "{err}");
        let (snapshot, image) = read(&v);
        assert!(snapshot == one, "a refused epoch changed the snapshot");
        assert!(image == two, "a refused epoch changed the image");
        // The blocks it would have overwritten were kept meanwhile.
        assert_eq!(v.snapshots().bytes(), BIG / B * crate::snapshots::UNIT);
    }

    /// Blocks are packed as the client sent them: compressed (here at
    /// level 19, which the server never uses) or raw (even where the
    /// server's zstd would shrink it: the client's did not), in a first
    /// sync (direct) and in a later epoch. Blocks staged before a restart have no frame (the
    /// frames of a process are not on disk under a name): they are packed
    /// as the server compresses them, and the frames staged after the
    /// resume still go with their own blocks. Every version reads back
    /// exactly.
    #[test]
    fn blocks_sent_compressed_are_packed_as_sent() {
        const B: u64 = block::BLOCK;
        const N: u64 = SIZE / B;
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = Arc::new(ChunkStore::with(memory, "test".into(), 1 << 20).unwrap());
        let text = |k: u64, epoch: u64| -> Vec<u8> {
            let words = format!("block {k} of epoch {epoch}, a line that repeats. ");
            words.bytes().cycle().take(B as usize).collect()
        };
        // Incompressible: digests of counters, back to back.
        let noise = |seed: u64| -> Vec<u8> {
            (0..B / 32)
                .flat_map(|i| digest(&[seed, i].map(u64::to_le_bytes).concat()))
                .collect()
        };
        let sent = |b: &[u8]| zstd::bulk::compress(b, 19).unwrap();
        // What the server's own compression stores of a block.
        let server = |b: &[u8]| match block::compress(b, 1) {
            Ok(c) if c.len() < b.len() => c.len() as u64,
            _ => b.len() as u64,
        };
        let mut model = vec![0u8; SIZE as usize];
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        // Epoch 1, a first sync: half of it staged, then the server stops.
        let s = v.begin(1, me(1)).unwrap();
        assert!(s.direct);
        let mut expect = 0u64;
        for k in 0..N / 2 {
            let b = text(k, 1);
            s.add(k * B, B as u32, &digest(&b), Encoding::Zstd, &sent(&b))
                .unwrap();
            model[(k * B) as usize..][..B as usize].copy_from_slice(&b);
            expect += server(&b);
        }
        drop(s);
        drop(v);
        let (mut v, _) = Volume::open(&vdir).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let s = v.begin(1, me(1)).unwrap();
        assert!(s.direct);
        assert_eq!(s.blocks() as u64, N / 2, "resumed");
        for k in N / 2..N {
            let b = if k == N - 1 { noise(k) } else { text(k, 1) };
            let (encoding, payload) = if k == N - 1 {
                expect += B;
                (Encoding::Raw, b.clone())
            } else {
                expect += sent(&b).len() as u64;
                (Encoding::Zstd, sent(&b))
            };
            s.add(k * B, B as u32, &digest(&b), encoding, &payload)
                .unwrap();
            model[(k * B) as usize..][..B as usize].copy_from_slice(&b);
        }
        v.commit(&s).unwrap();
        assert_eq!(store.usage().stored_bytes, expect, "{:?}", store.usage());
        let head = store.head("c/vol").unwrap().unwrap();
        assert!(
            read_version(&store, &head, SIZE) == model,
            "epoch 1 reads back wrong"
        );
        // Level 19 and the server's level 1 differ here, or this proves
        // nothing.
        let (a, b) = (text(3, 1), text(3, 2));
        assert_ne!(sent(&a).len() as u64, server(&a));
        assert_ne!(sent(&b).len() as u64, server(&b));
        // Epoch 2, not direct: every other block again, whole; one of
        // them raw.
        let s = v.begin(2, me(2)).unwrap();
        assert!(!s.direct);
        for k in (0..N).step_by(2) {
            let b = text(k, 2);
            if k == 2 {
                s.add(k * B, B as u32, &digest(&b), Encoding::Raw, &b)
                    .unwrap();
                expect += B;
            } else {
                s.add(k * B, B as u32, &digest(&b), Encoding::Zstd, &sent(&b))
                    .unwrap();
                expect += sent(&b).len() as u64;
            }
            model[(k * B) as usize..][..B as usize].copy_from_slice(&b);
        }
        v.commit(&s).unwrap();
        assert_eq!(store.usage().stored_bytes, expect, "{:?}", store.usage());
        let head = store.head("c/vol").unwrap().unwrap();
        assert_eq!(head.epoch, 2);
        assert!(
            read_version(&store, &head, SIZE) == model,
            "epoch 2 reads back wrong"
        );
        let mut image = vec![0u8; SIZE as usize];
        v.read_at(&mut image, 0).unwrap();
        assert!(image == model, "the image is not epoch 2");
    }

    /// A block staged earlier in the epoch is staged again from its frame
    /// for a copy named by its digest only; a copy of a block this epoch
    /// never staged is refused as damaged (the client sends its bytes),
    /// and the epoch cannot be committed until it is. Without a chunk
    /// store no frames are kept, and nothing is held.
    #[test]
    fn a_block_is_staged_again_from_an_earlier_copy_in_the_epoch() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let mut bare = Volume::create(&dir.path().join("bare"), SIZE).unwrap();
        let b = block(5, B as usize);
        let s = bare.begin(1, me(1)).unwrap();
        s.add(0, B as u32, &digest(&b), Encoding::Raw, &b).unwrap();
        assert!(!s.holds(&digest(&b)), "no store, no frames");
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = Arc::new(ChunkStore::with(memory, "test".into(), 1 << 20).unwrap());
        let mut v = Volume::create(&dir.path().join("vol"), SIZE).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let mut model = vec![0u8; SIZE as usize];
        for epoch in 1..=2 {
            let s = v.begin(epoch, me(epoch)).unwrap();
            let text = block(epoch as u8, B as usize);
            let z = zstd::bulk::compress(&text, 3).unwrap();
            s.add(0, B as u32, &digest(&text), Encoding::Zstd, &z)
                .unwrap();
            let noise: Vec<u8> = (0..B).map(|i| (i * i % 251) as u8 ^ epoch as u8).collect();
            s.add(B, B as u32, &digest(&noise), Encoding::Raw, &noise)
                .unwrap();
            assert!(s.holds(&digest(&text)) && s.holds(&digest(&noise)));
            s.add_again(5 * B, B as u32, &digest(&text)).unwrap();
            s.add_again(7 * B, B as u32, &digest(&noise)).unwrap();
            for (k, b) in [(0, &text), (1, &noise), (5, &text), (7, &noise)] {
                model[(k * B) as usize..][..B as usize].copy_from_slice(b);
            }
            let never = block(200, B as usize);
            assert!(!s.holds(&digest(&never)));
            let err = s.add_again(9 * B, B as u32, &digest(&never)).unwrap_err();
            assert!(matches!(err, Error::BadBlock(_)), "{err}");
            // A copy that would not fit the volume is the sender's bug.
            let err = s
                .add_again(SIZE - 4096, B as u32, &digest(&text))
                .unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{err}");
            // One of another length is refused as damaged.
            let err = s.add_again(9 * B, 4096, &digest(&text)).unwrap_err();
            assert!(matches!(err, Error::BadBlock(_)), "{err}");
            let refused = v.commit(&s).unwrap_err().to_string();
            assert!(refused.contains("failed their checks"), "{refused}");
            let s = v.begin(epoch, me(epoch)).unwrap();
            s.add(9 * B, B as u32, &digest(&never), Encoding::Raw, &never)
                .unwrap();
            let refused = v.commit(&s).unwrap_err().to_string();
            assert!(refused.contains("failed their checks"), "{refused}");
            let s = v.begin(epoch, me(epoch)).unwrap();
            let head = &text[..4096];
            s.add(9 * B, 4096, &digest(head), Encoding::Raw, head)
                .unwrap();
            model[(9 * B) as usize..][..B as usize].copy_from_slice(&never);
            model[(9 * B) as usize..][..4096].copy_from_slice(head);
            v.commit(&s).unwrap();
            let mut image = vec![0u8; SIZE as usize];
            v.read_at(&mut image, 0).unwrap();
            assert!(image == model, "epoch {epoch}: the image differs");
            let head = store.head("c/vol").unwrap().unwrap();
            assert!(
                read_version(&store, &head, SIZE) == model,
                "epoch {epoch}: the store differs"
            );
        }
    }

    /// An epoch of extents smaller than a store block (scattered 4 KiB
    /// writes, zeroes, one across two blocks, one over a block written
    /// whole in the same epoch) is stored as whole blocks made from the
    /// image and every extent on them in order (as patches where the
    /// extents are small).
    #[test]
    fn partial_extents_are_stored_as_whole_blocks_merged_in_order() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = Arc::new(ChunkStore::with(memory.clone(), "test".into(), 1 << 20).unwrap());
        let mut v = Volume::create(&dir.path().join("vol"), SIZE).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let mut model: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 + 1).collect();
        publish_whole(&mut v, 1, &model);
        let s = v.begin(2, me(2)).unwrap();
        assert!(!s.direct);
        let mut put = |at: u64, bytes: Option<Vec<u8>>, len: usize| {
            let range = at as usize..at as usize + len;
            match &bytes {
                Some(b) => {
                    s.add(at, len as u32, &digest(b), Encoding::Raw, b).unwrap();
                    model[range].copy_from_slice(b);
                }
                None => {
                    s.add(
                        at,
                        len as u32,
                        &zero_digest(len as u32),
                        Encoding::Zero,
                        &[],
                    )
                    .unwrap();
                    model[range].fill(0);
                }
            }
        };
        put(0, Some(block(7, B as usize)), B as usize);
        put(4096, Some(block(8, 4096)), 4096);
        put(B + 8192, Some(block(9, 4096)), 4096);
        put(B + 8192, None, 4096);
        put(B + 12288, Some(block(10, 4096)), 4096);
        put(3 * B - 4096, Some(block(11, 8192)), 8192);
        put(5 * B, Some(block(12, B as usize)), B as usize);
        put(7 * B + 512, Some(block(13, 1024)), 1024);
        v.commit(&s).unwrap();
        let head = store.head("c/vol").unwrap().unwrap();
        assert_eq!((head.seq, head.epoch), (2, 2));
        // The version `head` as the store `on` reads it.
        assert!(
            read_version(&store, &head, SIZE) == model,
            "the stored version is not the epoch"
        );
        let mut image = vec![0u8; SIZE as usize];
        v.read_at(&mut image, 0).unwrap();
        assert!(image == model, "the image is not the epoch");
        // Blocks 1, 2, 3 and 7 changed by a quarter or less: patches on
        // version 1's chunks; block 0 (written whole, then in part) whole.
        assert_eq!(store.usage().patches, 4, "{:?}", store.usage());
        let again = Arc::new(ChunkStore::with(memory, "again".into(), 1 << 20).unwrap());
        assert!(
            read_version(&again, &head, SIZE) == model,
            "another server reads the patches otherwise"
        );
        // The image's block 7 rots on disk: the next small write to it is
        // made on the store's chunk, not the image's block (the store
        // keeps what the device wrote). It rots before the write and after
        // it (the bytes before the first change are hashed once for both
        // the image's block and the new one).
        let image = OpenOptions::new()
            .write(true)
            .open(dir.path().join("vol").join(IMAGE))
            .unwrap();
        image.write_all_at(&[0xEE], 7 * B + 100).unwrap();
        image.write_all_at(&[0xEE], 7 * B + 9000).unwrap();
        let s = v.begin(3, me(3)).unwrap();
        let bytes = block(14, 4096);
        s.add(7 * B + 4096, 4096, &digest(&bytes), Encoding::Raw, &bytes)
            .unwrap();
        model[(7 * B + 4096) as usize..(7 * B + 8192) as usize].copy_from_slice(&bytes);
        v.commit(&s).unwrap();
        assert_eq!(store.usage().patches, 5, "{:?}", store.usage());
        let head = store.head("c/vol").unwrap().unwrap();
        let mut got = vec![0u8; B as usize];
        store
            .reader(&head)
            .unwrap()
            .read_at(&mut got, 7 * B)
            .unwrap();
        assert!(got[..] == model[(7 * B) as usize..(8 * B) as usize]);
    }

    /// Blocks covered in part are rebuilt on several threads while the
    /// ones before are put: many windows' worth, each its own
    /// patch on its block's chunk, make the epoch exactly, in the store and
    /// in the image.
    #[test]
    fn many_partial_blocks_are_rebuilt_in_batches_in_order() {
        const B: u64 = block::BLOCK;
        const BIG: u64 = 1024 * B;
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = Arc::new(ChunkStore::with(memory, "test".into(), 1 << 20).unwrap());
        let mut v = Volume::create(&dir.path().join("vol"), BIG).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let mut model: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8 + 1).collect();
        publish_whole(&mut v, 1, &model);
        let s = v.begin(2, me(2)).unwrap();
        let touched: Vec<u64> = (0..BIG / B).filter(|n| n % 5 != 0).collect();
        assert!(touched.len() > 3 * REBUILD_AHEAD);
        for &n in &touched {
            // One 4 KiB write in each, at a place that varies.
            let at = n * B + (n % 15) * 4096;
            let bytes = block(n as u8, 4096);
            s.add(at, 4096, &digest(&bytes), Encoding::Raw, &bytes)
                .unwrap();
            model[at as usize..][..4096].copy_from_slice(&bytes);
        }
        v.commit(&s).unwrap();
        let head = store.head("c/vol").unwrap().unwrap();
        assert!(
            read_version(&store, &head, BIG) == model,
            "the stored version is not the epoch"
        );
        let mut image = vec![0u8; BIG as usize];
        v.read_at(&mut image, 0).unwrap();
        assert!(image == model, "the image is not the epoch");
        assert_eq!(store.usage().patches, touched.len() as u64);
    }

    /// Jobs that finish out of order are taken in the order they were
    /// handed out, with never more than `ahead` of them out.
    #[test]
    fn rebuilt_blocks_are_taken_in_order_with_a_bounded_number_out() {
        let (ahead, jobs) = (8usize, 200usize);
        // (handed out, taken, the most out at once)
        let mut seen = (0usize, Vec::new(), 0usize);
        in_order(
            &mut seen,
            ahead,
            |s| {
                if s.0 == jobs {
                    return Ok(None);
                }
                s.0 += 1;
                s.2 = s.2.max(s.0 - s.1.len());
                Ok(Some(s.0 - 1))
            },
            |&i| {
                // Later jobs often finish first.
                std::thread::sleep(std::time::Duration::from_micros((i % 7 * 150) as u64));
                Ok(i * 2)
            },
            |s, i, doubled| {
                assert_eq!(doubled, i * 2);
                s.1.push(i);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen.1, (0..jobs).collect::<Vec<_>>());
        assert!(seen.2 <= ahead, "{} out at once", seen.2);
        assert!(seen.2 > 1, "nothing was rebuilt beside another");
    }

    /// The first error stops the rebuilding: what comes before it is
    /// taken, nothing after it; a panic comes back to the caller.
    #[test]
    fn rebuilding_stops_at_the_first_error_or_panic() {
        let mut taken = Vec::new();
        let mut given = 0usize;
        let err = in_order(
            &mut taken,
            4,
            |_| {
                given += 1;
                Ok((given <= 100).then_some(given - 1))
            },
            |&i| match i {
                37 => Err(Error::Corrupt("block 37 rotted".into())),
                _ => Ok(i),
            },
            |t: &mut Vec<usize>, i, _| {
                t.push(i);
                Ok(())
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("block 37 rotted"), "{err}");
        assert_eq!(taken, (0..37).collect::<Vec<_>>());
        assert!(given < 100, "jobs were handed out after the error");
        // A panic in a job comes back to the caller.
        let panicked = panic_of(|i| (i == 9).then_some("job 9 panicked"), |_| None);
        assert_eq!(panicked.downcast_ref::<&str>(), Some(&"job 9 panicked"));
        // A panic on the calling thread (taking a job) stops the threads
        // too, instead of leaving them waiting for jobs.
        let panicked = panic_of(|_| None, |i| (i == 5).then_some("taking 5 panicked"));
        assert_eq!(panicked.downcast_ref::<&str>(), Some(&"taking 5 panicked"));
    }

    /// The panic of [`in_order`] over jobs 1 to 20, 4 out at once, where
    /// doing job `i` panics with what `in_work(i)` says, and taking it
    /// with what `in_take(i)` says.
    fn panic_of(
        in_work: impl Fn(usize) -> Option<&'static str> + Sync,
        in_take: impl Fn(usize) -> Option<&'static str>,
    ) -> Box<dyn std::any::Any + Send> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut n = 0usize;
            in_order(
                &mut n,
                4,
                |n| {
                    *n += 1;
                    Ok((*n <= 20).then_some(*n))
                },
                |&i| match in_work(i) {
                    Some(why) => std::panic::panic_any(why),
                    None => Ok(i),
                },
                |_, i, _| match in_take(i) {
                    Some(why) => std::panic::panic_any(why),
                    None => Ok(()),
                },
            )
        }))
        .unwrap_err()
    }

    #[test]
    fn a_volume_whose_staging_directory_was_removed_opens_and_takes_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("v");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        publish_whole(&mut v, 1, &block(1, SIZE as usize));
        drop(v);
        std::fs::remove_dir_all(vdir.join(STAGING)).unwrap();
        let (mut v, recovery) = Volume::open(&vdir).unwrap();
        assert_eq!(recovery, Recovery::default());
        assert_eq!(v.state().published_epoch, 1);
        let image = block(2, SIZE as usize);
        publish_whole(&mut v, 2, &image);
        let mut got = vec![0u8; SIZE as usize];
        v.read_at(&mut got, 0).unwrap();
        assert!(got == image);
    }

    /// Incompressible bytes (digests of counters, back to back).
    fn noise(seed: u64, len: u64) -> Vec<u8> {
        (0..len / 32)
            .flat_map(|i| digest(&[seed, i].map(u64::to_le_bytes).concat()))
            .collect()
    }

    /// A store of 1 MiB packs in memory, with its objects at hand.
    fn memory_store() -> (Arc<object_store::memory::InMemory>, Arc<ChunkStore>) {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = Arc::new(ChunkStore::with(memory.clone(), "test".into(), 1 << 20).unwrap());
        (memory, store)
    }

    /// A volume with data the store never got (its first upload could
    /// not run when the epoch began: the store was out of reach) does not
    /// store the epoch as its first version, which would call the rest of
    /// the image holes: the commit is refused and the staging kept; when
    /// the client resumes, the image is uploaded first and the epoch
    /// stored on it.
    #[test]
    fn an_epoch_waits_for_the_first_upload_of_the_image() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::create(&dir.path().join("vol"), SIZE).unwrap();
        let one = block(1, SIZE as usize);
        publish_whole(&mut v, 1, &one);
        let (_, store) = memory_store();
        // Epoch 2 begins while the store is out of reach...
        let s = v.begin(2, me(2)).unwrap();
        let b = block(7, 4096);
        s.add(B + 4096, 4096, &digest(&b), Encoding::Raw, &b)
            .unwrap();
        let mut two = one.clone();
        two[(B + 4096) as usize..][..4096].copy_from_slice(&b);
        // ...and the store is there when it commits.
        v.chunks = Some((store.clone(), "c/vol".into()));
        let err = v.commit(&s).unwrap_err().to_string();
        assert!(err.contains("first upload"), "{err}");
        assert!(
            store.head("c/vol").unwrap().is_none(),
            "a version was stored"
        );
        let mut image = vec![0u8; SIZE as usize];
        v.read_at(&mut image, 0).unwrap();
        assert!(image == one, "a refused epoch changed the image");
        // The client resumes: the image goes first, then the epoch.
        let s = v.begin(2, me(2)).unwrap();
        assert_eq!(s.ranges(), vec![(B + 4096, 4096)], "the staging was lost");
        v.commit(&s).unwrap();
        let head = store.head("c/vol").unwrap().unwrap();
        assert_eq!((head.seq, head.epoch), (2, 2));
        assert!(
            read_version(&store, &head, SIZE) == two,
            "the stored version is not the epoch"
        );
        v.read_at(&mut image, 0).unwrap();
        assert!(image == two);
    }

    /// The image cache and a snapshot's preserved blocks are plain files:
    /// a block a disk damaged there is not served as the version. Each
    /// block read from the cache is checked against the chunk store's map
    /// of the same version, and one that differs is read from the store
    /// instead and counted; its digest is the version's. A block checked
    /// once is not hashed again. With no version in the store to check
    /// against, the cache is read as it is.
    #[test]
    fn a_block_damaged_in_the_image_cache_is_served_from_the_store() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = memory_store();
        let vdir = dir.path().join("vol");
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let one = block(1, SIZE as usize);
        publish_whole(&mut v, 1, &one);
        let kept = v.snapshot(Some("one"), Kind::Manual).unwrap();
        let mut two = one.clone();
        two[(3 * B) as usize..(5 * B) as usize].copy_from_slice(&block(2, 2 * B as usize));
        two[(8 * B) as usize..(9 * B) as usize].fill(0); // a hole in the map
        publish_whole(&mut v, 2, &two);
        // A disk flips bytes: in the image (block 1, the head's) and in
        // what the snapshot preserved (its first unit).
        let damage = |path: &Path, at: u64| {
            let f = OpenOptions::new().write(true).open(path).unwrap();
            f.write_all_at(&[0xEE; 100], at).unwrap();
        };
        damage(&vdir.join("image"), B + 10);
        // And a hole where the head has data (a reader that skips holes
        // would skip it).
        let image = OpenOptions::new()
            .write(true)
            .open(vdir.join("image"))
            .unwrap();
        fsutil::punch_or_zero(&image, 6 * B, B).unwrap();
        drop(image);
        damage(
            &vdir
                .join("snapshots")
                .join(kept.id.to_string())
                .join("data"),
            10,
        );

        for (at, want) in [(None, &two), (Some("one"), &one)] {
            // Read a block at a time as a restore does: each comes with
            // its digest, the version's.
            let (info, pin, source) = v.open_version(at).unwrap();
            assert!(source.checked(), "{at:?}");
            for n in 0..SIZE / B {
                let (bytes, known) = source.read_block(n * B, B as u32).unwrap();
                assert!(
                    bytes == want[(n * B) as usize..][..B as usize],
                    "{at:?} {n}"
                );
                assert_eq!(known, Some(digest(&bytes)), "{at:?}: block {n}");
            }
            let damaged = if at.is_none() { 2 } else { 1 };
            assert_eq!(source.damaged(), damaged, "{at:?}");
            // Where the data is, as the version's map says.
            let (data, hole) = match at {
                None => ((true, 2 * B), (false, B)),
                Some(_) => ((true, SIZE - 6 * B), (true, SIZE - 8 * B)),
            };
            assert_eq!(source.extent(6 * B).unwrap(), data, "{at:?}");
            assert_eq!(source.extent(8 * B).unwrap(), hole, "{at:?}");
            assert_eq!(source.extent(9 * B + 7).unwrap(), (true, SIZE - 9 * B - 7));
            // Asked past the end: the cache's answer, and the checks go on.
            let _ = source.extent(SIZE);
            assert!(
                source.checked(),
                "{at:?}: a question past the end paused the checks"
            );
            v.done_reading(&info, pin).unwrap();
            let (info, pin, source) = v.open_version(at).unwrap();
            // A small read inside a damaged block, then the whole volume
            // in odd pieces.
            let mut small = vec![0u8; 512];
            source.read(&mut small, B + 1024).unwrap();
            assert!(small == want[(B + 1024) as usize..][..512], "{at:?}");
            let mut got = vec![0u8; SIZE as usize];
            for (i, piece) in got.chunks_mut(96 << 10).enumerate() {
                source.read(piece, i as u64 * (96 << 10)).unwrap();
            }
            assert!(&got == want, "{at:?}: the damage was served");
            assert_eq!(source.damaged(), damaged, "{at:?}");
            // Read again, the blocks found right are not hashed again (no
            // digest comes with them); the damaged one still comes from
            // the store, with the version's digest.
            let mut hashed = Vec::new();
            for n in 0..SIZE / B {
                let (bytes, known) = source.read_block(n * B, B as u32).unwrap();
                assert!(bytes == want[(n * B) as usize..][..B as usize]);
                if let Some(d) = known {
                    assert_eq!(d, digest(&bytes), "block {n}");
                    hashed.push(n);
                }
            }
            assert_eq!(hashed.len(), damaged as usize, "{at:?}: {hashed:?}");
            assert_eq!(source.damaged(), damaged, "{at:?}");
            v.done_reading(&info, pin).unwrap();
        }
        // A volume whose last block is short: checked as it is.
        let odd = SIZE - 3 * 4096;
        let mut short = Volume::create(&dir.path().join("short"), odd).unwrap();
        short.attach(store.clone(), "c/short").unwrap();
        let bytes = block(9, odd as usize);
        let s = short.begin(1, me(1)).unwrap();
        s.add(0, odd as u32, &digest(&bytes), Encoding::Raw, &bytes)
            .unwrap();
        short.commit(&s).unwrap();
        damage(&dir.path().join("short").join("image"), odd - 200);
        let (info, pin, source) = short.open_version(None).unwrap();
        assert!(source.checked());
        let last = (odd / B) * B;
        let (got, known) = source.read_block(last, (odd - last) as u32).unwrap();
        assert!(
            got == bytes[last as usize..],
            "the short block's damage was served"
        );
        assert_eq!(known, Some(digest(&got)));
        let mut tail = vec![0u8; 300];
        source.read(&mut tail, odd - 300).unwrap();
        assert!(tail == bytes[(odd - 300) as usize..]);
        assert_eq!(source.damaged(), 1);
        short.done_reading(&info, pin).unwrap();

        // A volume the store does not keep: read as the cache holds it.
        let mut plain = Volume::create(&dir.path().join("plain"), SIZE).unwrap();
        publish_whole(&mut plain, 1, &one);
        damage(&dir.path().join("plain").join("image"), 10);
        let (info, pin, source) = plain.open_version(None).unwrap();
        assert!(!source.checked());
        let mut got = vec![0u8; SIZE as usize];
        source.read(&mut got, 0).unwrap();
        assert!(got[10..110] == [0xEE; 100]);
        plain.done_reading(&info, pin).unwrap();
    }

    /// Retention prunes the scheduled snapshots only the chunk store
    /// keeps (taken on another server on the store) with this server's
    /// own, counted in the same buckets; never a manual one (nor a pin
    /// from before pins said which they were, nor one kept for a restore
    /// since), nor one being read, nor this server's newest (whatever
    /// another server's clock says); and it reads the store's pins once
    /// per turn it is given, not at every call.
    #[test]
    fn retention_prunes_scheduled_snapshots_other_servers_took() {
        const HOUR: u64 = 3600 * 1000;
        const DAY: u64 = 24 * HOUR;
        use std::time::Duration;
        const ALWAYS: Duration = Duration::ZERO;
        let dir = tempfile::tempdir().unwrap();
        let (memory, store) = memory_store();
        let mut v = Volume::create(&dir.path().join("vol"), SIZE).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        publish_whole(&mut v, 1, &block(1, SIZE as usize));
        let seq = v.state().store_seq;
        // Another server's, as it pins them: three in one hour two hours
        // ago (one day bucket: the newest stays), two a month old (older
        // than every tier), a manual one and an unmarked one as old, and
        // two a second or two from now (its clock is ahead: in this hour,
        // newer than this server's newest).
        let now = now_ms();
        let two_hours_ago = (now / HOUR) * HOUR - 2 * HOUR;
        for (name, at) in [
            ("b-first", Some(two_hours_ago + 30_000)),
            ("b-kept", Some(two_hours_ago + 60_000)),
            ("b-late", Some(two_hours_ago + 120_000)),
            ("b-month", Some(now - 30 * DAY)),
            ("b-read", Some(now - 31 * DAY)),
            ("b-manual", None),
            ("b-ahead", Some(now + 2000)),
            ("b-ahead2", Some(now + 1000)),
        ] {
            store.pin("c/vol", name, seq, at).unwrap();
        }
        use object_store::ObjectStoreExt as _;
        let legacy = object_store::path::Path::from("vol/c/vol/pins/b-legacy");
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(memory.put(&legacy, br#"{"seq":1}"#.to_vec().into()))
            .unwrap();
        // This server's own, now: pinned as scheduled at its time.
        let own = v.snapshot(None, Kind::Scheduled).unwrap();
        let pinned = store.pin_records("c/vol").unwrap();
        assert_eq!(
            pinned[&own.name].scheduled_ms,
            Some(own.epoch_ms.max(own.created_ms))
        );
        assert_eq!(pinned["b-manual"].scheduled_ms, None);
        // One of the other server's is being read (an export), one was
        // restored from (kept from now on: its pin says so).
        let (info, reading, _) = v.open_version(Some("b-read")).unwrap();
        assert_eq!(info.kind, Kind::Stored);
        assert!(v.keep_snapshot("b-kept").unwrap());
        assert_eq!(
            store
                .pin_record("c/vol", "b-kept")
                .unwrap()
                .unwrap()
                .scheduled_ms,
            None
        );
        let retention = Retention {
            hourly: 1,
            daily: 1,
            weekly: 1,
        };
        let pruned = v.prune_snapshots(&retention, ALWAYS).unwrap();
        assert_eq!(pruned, ["b-month", "b-first"], "oldest first");
        let left: Vec<String> = store.pins("c/vol").unwrap().into_keys().collect();
        assert_eq!(
            left,
            [
                own.name.as_str(),
                "b-ahead",
                "b-ahead2",
                "b-kept",
                "b-late",
                "b-legacy",
                "b-manual",
                "b-read"
            ]
        );
        assert!(v.snapshots().get(&own.name).is_some(), "its own was pruned");
        // Once read, it goes too; but only when the store's pins are
        // looked at again.
        drop(reading);
        let hour = Duration::from_secs(3600);
        assert!(v.prune_snapshots(&retention, hour).unwrap().is_empty());
        assert_eq!(v.prune_snapshots(&retention, ALWAYS).unwrap(), ["b-read"]);
        assert!(v.prune_snapshots(&retention, ALWAYS).unwrap().is_empty());
        assert_eq!(store.pins("c/vol").unwrap().len(), 7);
        // A new snapshot never takes another server's name (its pin would
        // take the place of the other's): given, it is refused; made from
        // the time, it steps around it.
        let err = v.snapshot(Some("b-manual"), Kind::Manual).unwrap_err();
        assert!(err.to_string().contains("already"), "{err}");
        v.delete_snapshot(&own.name).unwrap();
        let now = now_ms();
        let theirs: Vec<String> = (0..60)
            .map(|s| crate::snapshots::time_name(now + s * 1000))
            .collect();
        for name in &theirs {
            store.pin("c/vol", name, seq, Some(now)).unwrap();
        }
        let mine = v.snapshot(None, Kind::Scheduled).unwrap();
        assert!(!theirs.contains(&mine.name), "{} taken over", mine.name);
        assert_eq!(store.pin_records("c/vol").unwrap().len(), 6 + 60 + 1);
    }

    /// An epoch stored in the chunk store whose commit marker could not
    /// be written (the staging disk failed) is not what the image holds: a
    /// snapshot taken then catches the image up to the stored epoch first
    /// (as it does whenever the store has a newer version), and pins the
    /// version the image then holds.
    #[test]
    fn a_snapshot_after_a_failed_commit_marker_pins_what_the_image_holds() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let (_, store) = memory_store();
        let mut v = Volume::create(&vdir, SIZE).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let one = block(1, SIZE as usize);
        publish_whole(&mut v, 1, &one);
        let s = v.begin(2, me(2)).unwrap();
        let b = block(9, B as usize);
        s.add(2 * B, B as u32, &digest(&b), Encoding::Raw, &b)
            .unwrap();
        let mut two = one.clone();
        two[(2 * B) as usize..][..B as usize].copy_from_slice(&b);
        // The marker cannot be renamed into place.
        let blocker = staging_path(&vdir, 2, "commit");
        std::fs::create_dir_all(blocker.join("x")).unwrap();
        let err = v.commit(&s).unwrap_err().to_string();
        assert!(err.contains("commit marker"), "{err}");
        assert_eq!(store.head("c/vol").unwrap().unwrap().epoch, 2, "not stored");
        std::fs::remove_dir_all(&blocker).unwrap();
        let snap = v.snapshot(Some("s"), Kind::Manual).unwrap();
        assert_eq!(snap.epoch, 2);
        assert_eq!(
            store.pins("c/vol").unwrap().get("s"),
            Some(&2),
            "the snapshot pins a version its image does not hold"
        );
        let mut image = vec![0u8; SIZE as usize];
        v.reader().read(snap.id, &mut image, 0).unwrap();
        assert!(image == two, "the snapshot is not the stored epoch");
        // The client comes back for epoch 2: the store has it, and so has
        // the image (the client is told it is published).
        let err = v.begin(2, me(2)).unwrap_err().to_string();
        assert!(err.contains("not newer"), "{err}");
        assert_eq!(v.state().published_epoch, 2);
        v.read_at(&mut image, 0).unwrap();
        assert!(image == two, "the image did not catch up");
    }

    /// A block staged again, same bytes, same place, nothing staged over
    /// it since, is not staged twice: a client repeating a 50-byte
    /// `Known` block cannot grow the staging by 64 KiB each time. Staged
    /// after something else landed on part of it, it is (the last copy
    /// wins).
    #[test]
    fn a_block_staged_again_unchanged_takes_no_more_room() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = memory_store();
        let mut v = Volume::create(&dir.path().join("vol"), SIZE).unwrap();
        v.attach(store, "c/vol").unwrap();
        let mut model = block(1, SIZE as usize);
        publish_whole(&mut v, 1, &model);
        let s = v.begin(2, me(2)).unwrap();
        let a = block(7, B as usize);
        s.add(B, B as u32, &digest(&a), Encoding::Raw, &a).unwrap();
        assert!(s.holds(&digest(&a)));
        for _ in 0..100 {
            s.add_again(B, B as u32, &digest(&a)).unwrap();
            s.add(B, B as u32, &digest(&a), Encoding::Raw, &a).unwrap();
        }
        assert_eq!(s.blocks(), 1, "staged again and again");
        // A copy that fails its check, then a good one: the epoch commits.
        let bad = block(8, B as usize);
        let err = s
            .add(B, B as u32, &digest(&a), Encoding::Raw, &bad)
            .unwrap_err();
        assert!(matches!(err, Error::BadBlock(_)), "{err}");
        s.add(B, B as u32, &digest(&a), Encoding::Raw, &a).unwrap();
        let c = block(9, 4096);
        s.add(B + 4096, 4096, &digest(&c), Encoding::Raw, &c)
            .unwrap();
        s.add_again(B, B as u32, &digest(&a)).unwrap();
        assert_eq!(s.blocks(), 3);
        model[B as usize..][..B as usize].copy_from_slice(&a);
        v.commit(&s).unwrap();
        let mut image = vec![0u8; SIZE as usize];
        v.read_at(&mut image, 0).unwrap();
        assert!(image == model, "the last copy did not win");
    }

    /// A publication that failed part way (the image holds half the epoch)
    /// is finished before the image catches up with a newer version in
    /// the store (another server's), which writes only what differs from
    /// the epoch the publication was making: else the half not written
    /// stayed behind.
    #[test]
    fn a_failed_publication_is_finished_before_a_catch_up() {
        const B: u64 = block::BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = memory_store();
        let mut v = Volume::create(&dir.path().join("vol"), SIZE).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let one = block(1, SIZE as usize);
        publish_whole(&mut v, 1, &one);
        let s = v.begin(2, me(2)).unwrap();
        let mut image = one.clone();
        for (k, seed) in [(3u64, 30u8), (9, 90)] {
            let b = block(seed, B as usize);
            s.add(k * B, B as u32, &digest(&b), Encoding::Raw, &b)
                .unwrap();
            image[(k * B) as usize..][..B as usize].copy_from_slice(&b);
        }
        // Stored, marked, half applied, and then the image write failed.
        v.commit_until(&s, Some(CommitStep::HalfApplied)).unwrap();
        v.poisoned = true;
        // Another server publishes version 3 on it.
        let head = store.head("c/vol").unwrap().unwrap();
        assert_eq!(head.epoch, 2);
        let mut p = store.publication("c/vol", Some(&head), SIZE).unwrap();
        let c = block(5, B as usize);
        p.put(12, Some(&c), digest(&c)).unwrap();
        p.finish(3, None, "").unwrap();
        image[(12 * B) as usize..][..B as usize].copy_from_slice(&c);
        // A client opens the volume: the image catches up.
        v.refresh().unwrap();
        assert_eq!(v.state().published_epoch, 3);
        let mut got = vec![0u8; SIZE as usize];
        v.read_at(&mut got, 0).unwrap();
        assert!(got == image, "the image is not version 3");
    }

    /// A catch-up from the chunk store that stops part way (a pack out of
    /// reach) leaves the image holding blocks of two versions: it is
    /// marked so, across a restart; no snapshot is taken of it; and the
    /// next catch-up writes every block, also one that a later version
    /// changed back (which the changes between the two versions would
    /// miss).
    #[test]
    fn an_interrupted_catch_up_is_finished_before_any_snapshot() {
        const B: u64 = block::BLOCK;
        const BIG: u64 = 320 * B; // two batches of the catch-up's reads
        let dir = tempfile::tempdir().unwrap();
        let vdir = dir.path().join("vol");
        let (memory, store) = memory_store();
        let mut v = Volume::create(&vdir, BIG).unwrap();
        v.attach(store.clone(), "c/vol").unwrap();
        let one = noise(1, BIG);
        publish_whole(&mut v, 1, &one);
        let v1 = store.head("c/vol").unwrap().unwrap();
        // Another server publishes versions 2 (blocks 0 to 259 new) and
        // 3 (blocks 260 to 299): the packs of 3 are then out of reach.
        let publish =
            |base: &VersionRecord, epoch: u64, blocks: std::ops::Range<u64>, from: &[u8]| {
                let mut image = from.to_vec();
                let mut p = store.publication("c/vol", Some(base), BIG).unwrap();
                for n in blocks {
                    let b = noise(epoch * 1000 + n, B);
                    p.put(n, Some(&b), digest(&b)).unwrap();
                    image[(n * B) as usize..][..B as usize].copy_from_slice(&b);
                }
                (p.finish(epoch, None, "").unwrap().record, image)
            };
        use futures::TryStreamExt as _;
        use object_store::{ObjectStore as _, ObjectStoreExt as _};
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let packs = || {
            rt.block_on(memory.list(Some(&"packs".into())).try_collect::<Vec<_>>())
                .unwrap()
                .into_iter()
                .map(|m| m.location)
                .collect::<BTreeSet<_>>()
        };
        let (v2, two) = publish(&v1, 2, 0..260, &one);
        let before = packs();
        let (v3, three) = publish(&v2, 3, 260..300, &two);
        let mut hidden = Vec::new();
        for path in packs().difference(&before) {
            let bytes = rt
                .block_on(async { memory.get(path).await?.bytes().await })
                .unwrap();
            rt.block_on(memory.delete(path)).unwrap();
            hidden.push((path.clone(), bytes));
        }
        assert!(!hidden.is_empty());
        assert!(v.refresh().is_err(), "the catch-up did not fail");
        let mut image = vec![0u8; BIG as usize];
        v.read_at(&mut image, 0).unwrap();
        assert!(
            image[..B as usize] == two[..B as usize],
            "the first batch was not written"
        );
        assert!(image != three);
        assert_eq!(v.catching_up, Some(3));
        let err = v.snapshot(Some("s"), Kind::Manual).unwrap_err().to_string();
        assert!(err.contains("catching up with version 3"), "{err}");
        assert!(v.snapshots().list().is_empty());
        // Across a restart too, with the store not attached.
        drop(v);
        let (mut v, _) = Volume::open(&vdir).unwrap();
        assert_eq!(v.catching_up, Some(3));
        let err = v.snapshot(None, Kind::Temporary).unwrap_err().to_string();
        assert!(err.contains("not attached"), "{err}");
        // Version 4 changes block 10 back to what version 1 had: the
        // changes from 1 to 4 do not name it, but the image holds 2's.
        let (v4, mut four) = publish(&v3, 4, 0..0, &three);
        let mut p = store.publication("c/vol", Some(&v4), BIG).unwrap();
        let was = &one[(10 * B) as usize..][..B as usize];
        p.put(10, Some(was), digest(was)).unwrap();
        p.finish(5, None, "").unwrap();
        four[(10 * B) as usize..][..B as usize].copy_from_slice(was);
        for (path, bytes) in hidden {
            rt.block_on(memory.put(&path, bytes.into())).unwrap();
        }
        v.attach(store.clone(), "c/vol").unwrap();
        assert_eq!(v.catching_up, None);
        assert_eq!(v.state().published_epoch, 5);
        v.read_at(&mut image, 0).unwrap();
        assert!(image == four, "the image is not the store's newest version");
        assert!(!vdir.join(CATCHING_UP).exists());
        v.snapshot(Some("s"), Kind::Manual).unwrap();
    }

    /// Each block a direct staging's log touches, ascending, with the
    /// digest it names it by (what store_epoch trusts).
    fn direct_blocks(log: &Path, size: u64, trusted: bool) -> Result<Vec<(u64, Option<Digest>)>> {
        let direct = DirectLog::read(log, size, trusted)?;
        let mut named = BTreeMap::new();
        let mut entries = LogReader::open(log)?;
        while let Some(e) = entries.next_entry()? {
            if let Some(n) = direct.named(&e) {
                named.insert(n, e.sha256);
            }
        }
        Ok(direct
            .blocks()
            .map(|n| (n, named.get(&n).copied()))
            .collect())
    }

    #[test]
    fn a_direct_stagings_log_names_only_blocks_staged_once_and_whole() {
        // What store_epoch trusts without hashing N.data again.
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::create(&dir.path().join("v"), SIZE).unwrap();
        let s = v.begin(1, me(1)).unwrap();
        assert!(s.direct);
        let n = block::BLOCK;
        let (whole, other, part) = (block(1, n as usize), block(2, n as usize), block(3, 4096));
        // Block 0 once, whole; block 1 twice (a resend); block 2 in part;
        // block 3 once, as a zero block; blocks 4 and 5 in one entry.
        s.add(0, n as u32, &digest(&whole), Encoding::Raw, &whole)
            .unwrap();
        for _ in 0..2 {
            s.add(n, n as u32, &digest(&other), Encoding::Raw, &other)
                .unwrap();
        }
        s.add(2 * n, 4096, &digest(&part), Encoding::Raw, &part)
            .unwrap();
        s.add(3 * n, n as u32, &zero_digest(n as u32), Encoding::Zero, &[])
            .unwrap();
        let two = block(4, 2 * n as usize);
        s.add(4 * n, 2 * n as u32, &digest(&two), Encoding::Raw, &two)
            .unwrap();
        assert!(!s.unlogged());
        let log = staging_path(&v.dir, 1, "log");
        assert_eq!(
            direct_blocks(&log, SIZE, true).unwrap(),
            [
                (0, Some(digest(&whole))),
                (1, None),
                (2, None),
                (3, Some(zero_digest(n as u32))),
                (4, None),
                (5, None)
            ]
        );
        // A write that went unlogged: nothing is trusted.
        assert_eq!(
            direct_blocks(&log, SIZE, false).unwrap(),
            [
                (0, None),
                (1, None),
                (2, None),
                (3, None),
                (4, None),
                (5, None)
            ]
        );
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
        // The server dies; b's bytes never reached the disk (wherever the
        // log says they are: a first epoch is staged direct).
        drop((s, v));
        let mut log = LogReader::open(&staging_path(&vdir, 1, "log")).unwrap();
        let b_at = std::iter::from_fn(|| log.next_entry().unwrap())
            .find(|e| e.offset == 8192)
            .and_then(|e| e.data_at)
            .unwrap();
        let data = OpenOptions::new()
            .write(true)
            .open(staging_path(&vdir, 1, "data"))
            .unwrap();
        data.write_all_at(&[0xee; 16], b_at).unwrap();
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
        // An earlier epoch of the device is no restart (a restarted daemon
        // numbers on): it does not take over a later one's staging, whose
        // blocks it would have to vouch for (an epoch sealed by hand just
        // before a pre-copy round, sent after it); the staging is dropped.
        let s = v.begin(4, me(12)).unwrap();
        s.add(0, 4096, &digest(&a), Encoding::Raw, &a).unwrap();
        drop(s);
        let s = v.begin(4, me(11)).unwrap();
        assert!(s.ranges().is_empty() && !s.adopted());
        drop(s);
        drop((v,));
        let (mut v, _) = Volume::open(&vdir).unwrap();
        let s = v.begin(4, me(11)).unwrap();
        assert!(s.ranges().is_empty() && !s.adopted(), "dropped on disk too");
        drop(s);
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
