//! Garbage collection of the chunk store, and the pins that keep
//! versions: nothing any kept version needs is ever deleted, also while
//! other servers publish.
//!
//! # What is kept
//!
//! A volume keeps its newest two versions and every version a pin names
//! (`vol/CLIENT/VOLUME/pins/NAME`: a snapshot of the volume, JSON
//! `{"seq":N}`, with `"scheduled_ms":T` for a scheduled snapshot, which
//! retention prunes, showing the volume at T ms since the Unix epoch; a
//! pin without it, such as those written before it, is never pruned).
//! Other version records are deleted at once: a record is
//! whole once written, no publication builds on any but the newest, and a
//! server whose image holds a deleted version catches up by comparing
//! every block instead of the changed segments. Kept versions make their map segments
//! live, and those their chunks, and a live chunk stored as a patch its
//! base (down the chain); a pack with no live chunk is dead (so is one
//! whose index was never written: its server died between the two), and so
//! is a condemned pack whose live chunks were all stored again in packs
//! that are not condemned (a partly dead pack is kept whole: repacking is
//! not done yet).
//!
//! # Condemn, then delete (`gc/state`, format 1, JSON)
//!
//! A publication uploads packs and segments before the version record
//! that references them, and deduplicates against what it believes the
//! store holds: a collector that deleted whatever looks dead at one
//! instant could delete what a publication in flight is about to
//! reference. So a run only *condemns* dead objects, recording them with
//! the time in `gc/state` (`{"format":1,"generation":G,"nonce":"HEX",
//! "window_ms":W,"packs":{"ID":ms},"segments":{"ID":ms}}`; the nonce is
//! new at each write; nonce and window are absent in states written before
//! them), and deletes an object only when
//! 1. it was condemned at least the window ago, and
//! 2. it is dead again at this run's mark.
//!
//! A server's scheduled run never goes by a window shorter than the one
//! the state recorded (publications judged by that one; another server
//! on the store may have a longer `gc_window`), and records the window it
//! went by; only `mirror-server gc --window`, asked for by hand, goes by
//! exactly the window given. A copy of a chunk that verify found damaged
//! does not count as holding it elsewhere.
//!
//! Every publication reads `gc/state` first and never relies on a
//! condemned object: a chunk only a condemned pack holds is stored again
//! (in a new pack: pack names are random), a segment whose name is
//! condemned is written under a salted name. And it reads the state again
//! when it finishes, before its version record (a publication longer than
//! the window, such as the first upload of a very big volume, may see its
//! own packs condemned, then deleted), and refuses to publish if a chunk
//! it names is gone, or in a pack condemned so long ago (the window the
//! run recorded, `window_ms`, less a margin) that a run could delete it
//! before the record exists; it is then made again. A pack condemned
//! lately (a run while the publication went on: its packs were named by
//! nothing yet) is still relied on: no run deletes it before a window has
//! passed, and by then the version names it, so that run finds it live.
//! So every object a version names is live at any run that could delete
//! it. A server that sees a new
//! generation rebuilds its chunk index from `idx/`, forgetting deleted
//! packs. An index is deleted before its pack.
//!
//! One run at a time: `gc/lock` (JSON `{"server":S,"started_ms":T,
//! "nonce":HEX}`) is created (create-only) for the run and deleted after.
//! The run keeps it fresh: at each step, and at least every minute while it
//! deletes or marks, it reads the lock back and writes it again; a lock not
//! written for an hour is taken as abandoned, and another run may take it.
//! A run that finds the lock is no longer its own (its nonce) stops at
//! once, before deleting anything more or writing the state, and never
//! deletes a lock that is not its own.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use ublk_mirror_common::clock::now_ms;
use ublk_mirror_common::proto::Digest;

use super::format::{self, HOLE};
use super::{store_err, ChunkStore};
use crate::error::{Error, Result};

const STATE: &str = "gc/state";
const LOCK: &str = "gc/lock";
const STATE_FORMAT: u32 = 1;
/// A run's lock not written for this long is abandoned.
const STALE_LOCK: Duration = Duration::from_secs(3600);
/// How often a run writes its lock again, at least.
const KEEP_LOCK: Duration = Duration::from_secs(60);

/// A run's hold on `gc/lock`.
struct RunLock {
    /// Random: tells this run's lock from any other's.
    nonce: String,
    started_ms: u64,
    /// When the lock was last written.
    kept: std::cell::Cell<std::time::Instant>,
}

/// The default window: longer than any publication, and than the time a
/// server takes to notice a new generation.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600 + 5 * 60);

/// Condemned objects and when each was condemned (ms).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Condemned {
    /// Packs.
    pub packs: BTreeMap<Digest, u64>,
    /// Map segments.
    pub segments: BTreeMap<Digest, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateRecord {
    format: u32,
    generation: u64,
    /// Random, new at each write: two runs that overlapped (the second
    /// took a lock it judged abandoned) both write `generation + 1`, and
    /// a server must see the second state too. Absent (empty) in states
    /// written before it was added.
    #[serde(default)]
    nonce: String,
    /// The window the run used, ms (0, or absent: the default): how soon
    /// after its condemnation an object may go (see
    /// [`Publication::finish`](super::Publication::finish)).
    #[serde(default)]
    window_ms: u64,
    packs: BTreeMap<String, u64>,
    segments: BTreeMap<String, u64>,
}

fn to_hex(m: &BTreeMap<Digest, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(k, v)| (format::hex(k), *v)).collect()
}

fn from_hex(m: &BTreeMap<String, u64>) -> Result<BTreeMap<Digest, u64>> {
    m.iter()
        .map(|(k, v)| {
            ublk_mirror_common::hex::decode::<32>(k)
                .map(|d| (d, *v))
                .ok_or_else(|| Error::Corrupt(format!("{STATE}: bad id {k:?}")))
        })
        .collect()
}

/// A snapshot's pin of a version (`vol/CLIENT/VOLUME/pins/NAME`; see
/// the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// The version kept.
    pub seq: u64,
    /// For a scheduled snapshot (one retention prunes, whichever server
    /// took it): when it shows the volume, ms since the Unix epoch.
    /// `None` for the others, and in pins from before this field: never
    /// pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_ms: Option<u64>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Version records deleted.
    pub versions_deleted: u64,
    /// Versions kept.
    pub versions_kept: u64,
    /// Packs (and their indexes) deleted.
    pub packs_deleted: u64,
    /// Their stored bytes.
    pub bytes_freed: u64,
    /// Map segments deleted.
    pub segments_deleted: u64,
    /// Packs condemned now (deleted by a run at least a window later if
    /// still dead).
    pub packs_condemned: u64,
    /// Segments condemned now.
    pub segments_condemned: u64,
}

fn pin_path(volume: &str, name: &str) -> ObjPath {
    ObjPath::from(format!("vol/{volume}/pins/{name}"))
}

impl ChunkStore {
    /// Keep version `seq` of `volume` as long as the pin `name` (a
    /// snapshot's name) exists; `scheduled_ms`: see
    /// [`PinRecord::scheduled_ms`].
    pub fn pin(&self, volume: &str, name: &str, seq: u64, scheduled_ms: Option<u64>) -> Result<()> {
        let body = serde_json::to_vec(&PinRecord { seq, scheduled_ms })
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let path = pin_path(volume, name);
        self.run(self.store.put(&path, PutPayload::from(body)))
            .map_err(|e| store_err(format!("writing {}/{path}", self.describe), e))?;
        Ok(())
    }

    /// Drop the pin `name` of `volume` (no error if there is none).
    pub fn unpin(&self, volume: &str, name: &str) -> Result<()> {
        let path = pin_path(volume, name);
        match self.run(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(format!("deleting {}/{path}", self.describe), e)),
        }
    }

    /// The pins of `volume`: name → version.
    pub fn pins(&self, volume: &str) -> Result<BTreeMap<String, u64>> {
        Ok(self
            .pin_records(volume)?
            .into_iter()
            .map(|(name, pin)| (name, pin.seq))
            .collect())
    }

    /// The names of `volume`'s pins (a listing; no pin is read).
    pub fn pin_names(&self, volume: &str) -> Result<BTreeSet<String>> {
        let prefix = format!("vol/{volume}/pins");
        Ok(self
            .run(self.list(&prefix))?
            .into_iter()
            .filter_map(|path| path.filename().map(str::to_string))
            .collect())
    }

    /// The pin `name` of `volume`, if there is one.
    pub fn pin_record(&self, volume: &str, name: &str) -> Result<Option<PinRecord>> {
        let path = pin_path(volume, name);
        match self.run(self.store.get(&path)) {
            Ok(r) => {
                let bytes = self
                    .run(r.bytes())
                    .map_err(|e| store_err(format!("reading {}/{path}", self.describe), e))?;
                self.parse_pin(&path, &bytes).map(Some)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(format!("reading {}/{path}", self.describe), e)),
        }
    }

    /// The pins of `volume`, whole: name → record.
    pub fn pin_records(&self, volume: &str) -> Result<BTreeMap<String, PinRecord>> {
        self.pin_names(volume)?
            .into_iter()
            .map(|name| {
                let path = pin_path(volume, &name);
                let bytes = self.run(self.get(&path))?;
                Ok((name, self.parse_pin(&path, &bytes)?))
            })
            .collect()
    }

    fn parse_pin(&self, path: &ObjPath, bytes: &[u8]) -> Result<PinRecord> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("{}/{path}: {e}", self.describe)))
    }

    /// Read `gc/state` and apply it to the index if it changed: whether
    /// it had.
    pub(super) fn sync_gc(&self) -> Result<bool> {
        let (generation, condemned, window_ms) = self.run(self.read_state())?;
        let known = self.index().generation.clone();
        if known.as_ref() == Some(&generation) {
            return Ok(false);
        }
        // One rebuild at a time; one that finished meanwhile may have
        // applied this generation already.
        let _one = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        let known = self.index().generation.clone();
        if known.as_ref() == Some(&generation) {
            return Ok(false);
        }
        // What is condemned first, so that the indexes read again place
        // each chunk in a pack that is not.
        {
            let mut index = self.index();
            index.condemned = condemned;
            index.gc_window_ms = window_ms;
        }
        if known.is_some() || generation.0 > 0 {
            // Packs may have been deleted since the index was read.
            self.rebuild_index()?;
        }
        self.index().generation = Some(generation);
        Ok(true)
    }

    /// The state's generation and nonce, what it condemns, and its window
    /// (ms; 0: the default).
    async fn read_state(&self) -> Result<((u64, String), Condemned, u64)> {
        match self.store.get(&ObjPath::from(STATE)).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| store_err(STATE, e))?;
                let rec: StateRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Corrupt(format!("{}/{STATE}: {e}", self.describe)))?;
                if rec.format != STATE_FORMAT {
                    return Err(Error::Corrupt(format!(
                        "{}/{STATE}: format {} (this server reads {STATE_FORMAT})",
                        self.describe, rec.format
                    )));
                }
                Ok((
                    (rec.generation, rec.nonce),
                    Condemned {
                        packs: from_hex(&rec.packs)?,
                        segments: from_hex(&rec.segments)?,
                    },
                    rec.window_ms,
                ))
            }
            Err(object_store::Error::NotFound { .. }) => {
                Ok(((0, String::new()), Condemned::default(), 0))
            }
            Err(e) => Err(store_err(format!("reading {}/{STATE}", self.describe), e)),
        }
    }

    /// Take the run's lock, or say who holds it.
    async fn lock(&self) -> Result<RunLock> {
        let path = ObjPath::from(LOCK);
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        let lock = RunLock {
            nonce: ublk_mirror_common::hex::encode(&nonce),
            started_ms: now_ms(),
            kept: std::cell::Cell::new(std::time::Instant::now()),
        };
        if self.create(&path, self.lock_body(&lock)).await? {
            return Ok(lock);
        }
        let meta = self
            .store
            .head(&path)
            .await
            .map_err(|e| store_err(LOCK, e))?;
        let age = now_ms().saturating_sub(meta.last_modified.timestamp_millis().max(0) as u64);
        if age < STALE_LOCK.as_millis() as u64 {
            let holder = self.get(&path).await.unwrap_or_default();
            return Err(Error::Invalid(format!(
                "a garbage collection of {} is running already ({})",
                self.describe,
                String::from_utf8_lossy(&holder)
            )));
        }
        tracing::warn!(
            "taking over an abandoned garbage collection lock (not written for {} min)",
            age / 60_000
        );
        let _ = self.store.delete(&path).await;
        if self.create(&path, self.lock_body(&lock)).await? {
            Ok(lock)
        } else {
            Err(Error::Invalid(
                "another garbage collection took the lock".into(),
            ))
        }
    }

    fn lock_body(&self, lock: &RunLock) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "server": self.server,
                "started_ms": lock.started_ms,
                "nonce": lock.nonce,
            })
            .to_string(),
        )
    }

    /// Whether the lock in the store is `lock` (its nonce), and its
    /// version (e-tag) when the store has one.
    async fn holds(&self, lock: &RunLock) -> Result<(bool, Option<String>)> {
        let path = ObjPath::from(LOCK);
        match self.store.get(&path).await {
            Ok(r) => {
                let e_tag = r.meta.e_tag.clone();
                let bytes = r.bytes().await.map_err(|e| store_err(LOCK, e))?;
                let held: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let ours = held.get("nonce").and_then(|n| n.as_str()) == Some(lock.nonce.as_str());
                Ok((ours, e_tag))
            }
            Err(object_store::Error::NotFound { .. }) => Ok((false, None)),
            Err(e) => Err(store_err(format!("reading {}/{LOCK}", self.describe), e)),
        }
    }

    /// Keep the run's lock fresh (write it again), at once if `now`, else
    /// at most once a minute; an error if it is no longer this run's.
    fn keep_lock(&self, lock: &RunLock, now: bool) -> Result<()> {
        if !now && lock.kept.get().elapsed() < KEEP_LOCK {
            return Ok(());
        }
        let lost = || {
            Error::Invalid(format!(
                "garbage collection of {} stopped: another run took its lock \
                 (this one was taken for abandoned); nothing more was deleted",
                self.describe
            ))
        };
        let (ours, e_tag) = self.run(self.holds(lock))?;
        if !ours {
            return Err(lost());
        }
        // Written only over the version just read (If-Match): a run that
        // took the lock in between is not written over.
        let path = ObjPath::from(LOCK);
        let body = || PutPayload::from(self.lock_body(lock));
        let opts = PutOptions {
            mode: PutMode::Update(object_store::UpdateVersion {
                e_tag,
                version: None,
            }),
            ..Default::default()
        };
        match self.run(self.store.put_opts(&path, body(), opts)) {
            Ok(_) => {}
            Err(object_store::Error::Precondition { .. }) => return Err(lost()),
            // A store without conditional updates (a local directory:
            // one machine) is written over.
            Err(object_store::Error::NotImplemented { .. }) => {
                self.run(self.store.put(&path, body()))
                    .map_err(|e| store_err(format!("writing {}/{LOCK}", self.describe), e))?;
            }
            Err(e) => return Err(store_err(format!("writing {}/{LOCK}", self.describe), e)),
        }
        lock.kept.set(std::time::Instant::now());
        Ok(())
    }

    /// One garbage collection run with safety window `window` exactly (see
    /// the module docs), as an administrator asks for one (`mirror-server
    /// gc --window`): shorter than the window publications go by is only
    /// safe when no server publishes meanwhile. `progress` is told what the
    /// run is doing.
    pub fn gc(&self, window: Duration, progress: impl FnMut(&str)) -> Result<Report> {
        self.gc_run(window, true, progress)
    }

    /// [`ChunkStore::gc`] with a window of at least `window`, and never
    /// shorter than the one the store's state recorded, which publications
    /// judged what they rely on by (another server's longer `gc_window`):
    /// what a server's schedule runs.
    pub fn gc_at_least(&self, window: Duration, progress: impl FnMut(&str)) -> Result<Report> {
        self.gc_run(window, false, progress)
    }

    fn gc_run(
        &self,
        window: Duration,
        exact: bool,
        mut progress: impl FnMut(&str),
    ) -> Result<Report> {
        let lock = self.run(self.lock())?;
        let result = self.gc_locked(window, exact, &lock, &mut progress);
        // Only this run's own lock is deleted.
        if let Ok((true, _)) = self.run(self.holds(&lock)) {
            let _ = self.run(self.store.delete(&ObjPath::from(LOCK)));
        }
        result
    }

    fn gc_locked(
        &self,
        window: Duration,
        exact: bool,
        lock: &RunLock,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Report> {
        let mut report = Report::default();
        let ((generation, _), before, recorded_window_ms) = self.run(self.read_state())?;
        // Publications judged what they rely on by the window the state
        // recorded: unless asked for exactly, nothing they judged safe is
        // deleted under a shorter one (another server's gc_window).
        let now = now_ms();
        let window_ms = if exact {
            window.as_millis() as u64
        } else {
            (window.as_millis() as u64).max(recorded_window_ms)
        };
        let old = now.saturating_sub(window_ms);
        // Mark: the versions kept, their segments, their chunks.
        progress("marking");
        self.keep_lock(lock, true)?;
        let mut live_segments: HashSet<Digest> = HashSet::new();
        for volume in self.volumes()? {
            self.keep_lock(lock, false)?;
            let seqs = self.versions(&volume)?;
            let pins: HashSet<u64> = self.pins(&volume)?.into_values().collect();
            let newest: Vec<u64> = seqs.iter().rev().take(2).copied().collect();
            for seq in seqs {
                if newest.contains(&seq) || pins.contains(&seq) {
                    report.versions_kept += 1;
                    for id in self.version(&volume, seq)?.segment_ids()? {
                        live_segments.insert(id);
                    }
                } else {
                    let path = super::version_path(&volume, seq);
                    self.run(self.store.delete(&path))
                        .map_err(|e| store_err(format!("deleting {}/{path}", self.describe), e))?;
                    report.versions_deleted += 1;
                }
            }
        }
        let mut live_chunks: HashSet<Digest> = HashSet::new();
        for id in &live_segments {
            self.keep_lock(lock, false)?;
            for d in self.segment(id)? {
                if d != HOLE {
                    live_chunks.insert(d);
                }
            }
        }
        // The packs and segments there are, with their age.
        self.rebuild_index()?;
        let packs: Vec<(Digest, Vec<Digest>, u64)> = {
            let index = self.index();
            // The base of a live patch is live, down every chain (any
            // copy of a live chunk may be the one read).
            let mut bases: std::collections::HashMap<Digest, Vec<Digest>> =
                std::collections::HashMap::new();
            for info in index.packs.values() {
                for (chunk, base) in &info.patches {
                    bases.entry(*chunk).or_default().push(*base);
                }
            }
            let mut todo: Vec<Digest> = live_chunks
                .iter()
                .filter(|h| bases.contains_key(*h))
                .copied()
                .collect();
            while let Some(h) = todo.pop() {
                for b in bases.get(&h).into_iter().flatten() {
                    if live_chunks.insert(*b) && bases.contains_key(b) {
                        todo.push(*b);
                    }
                }
            }
            index
                .packs
                .iter()
                .map(|(id, p)| (*id, p.hashes.clone(), p.stored))
                .collect()
        };
        // A pack whose index was never written (its server died between
        // the two, or the index's upload failed) holds nothing any version
        // names: dead, as any other pack no live chunk keeps. Only just
        // uploaded, its publication's index follows within moments, long
        // before a run a window later could delete it.
        let indexed: HashSet<Digest> = packs.iter().map(|(id, _, _)| *id).collect();
        let mut packs = packs;
        for path in self.run(self.list("packs"))? {
            if let Some(id) = path
                .filename()
                .and_then(ublk_mirror_common::hex::decode::<32>)
            {
                if !indexed.contains(&id) {
                    packs.push((id, Vec::new(), 0));
                }
            }
        }
        let segments: Vec<Digest> = self
            .run(self.list("maps"))?
            .iter()
            .filter_map(|p| ublk_mirror_common::hex::decode::<32>(p.filename()?))
            .collect();
        // Sweep: delete what was condemned a window ago and is still dead;
        // condemn what is dead now.
        progress("sweeping");
        self.keep_lock(lock, true)?;
        let mut condemned = super::gc::Condemned::default();
        // A live chunk also held by a pack that is not condemned does not
        // keep a condemned pack (a publication stored it again).
        // A copy verify found damaged holds nothing.
        let damaged: HashSet<(Digest, Digest)> =
            self.run(self.read_damaged())?.into_iter().collect();
        let mut held_elsewhere: HashSet<Digest> = HashSet::new();
        for (id, hashes, _) in &packs {
            if !before.packs.contains_key(id) {
                held_elsewhere.extend(
                    hashes
                        .iter()
                        .filter(|h| !damaged.contains(&(**h, *id)))
                        .copied(),
                );
            }
        }
        for (id, hashes, bytes) in packs {
            self.keep_lock(lock, false)?;
            let needed = |h: &Digest| {
                live_chunks.contains(h)
                    && (!before.packs.contains_key(&id) || !held_elsewhere.contains(h))
            };
            if hashes.iter().any(needed) {
                continue;
            }
            match before.packs.get(&id) {
                Some(&at) if at <= old => {
                    for dir in ["idx", "packs"] {
                        let path = ObjPath::from(format::spread(dir, &id));
                        match self.run(self.store.delete(&path)) {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => {
                                return Err(store_err(
                                    format!("deleting {}/{path}", self.describe),
                                    e,
                                ))
                            }
                        }
                    }
                    report.packs_deleted += 1;
                    report.bytes_freed += bytes;
                }
                Some(&at) => {
                    condemned.packs.insert(id, at);
                }
                None => {
                    condemned.packs.insert(id, now);
                    report.packs_condemned += 1;
                }
            }
        }
        for id in segments {
            self.keep_lock(lock, false)?;
            if live_segments.contains(&id) {
                continue;
            }
            match before.segments.get(&id) {
                Some(&at) if at <= old => {
                    let path = ObjPath::from(format::spread("maps", &id));
                    match self.run(self.store.delete(&path)) {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => {
                            return Err(store_err(format!("deleting {}/{path}", self.describe), e))
                        }
                    }
                    report.segments_deleted += 1;
                }
                Some(&at) => {
                    condemned.segments.insert(id, at);
                }
                None => {
                    condemned.segments.insert(id, now);
                    report.segments_condemned += 1;
                }
            }
        }
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(format!("no randomness: {e}")))?;
        let record = StateRecord {
            format: STATE_FORMAT,
            generation: generation + 1,
            nonce: ublk_mirror_common::hex::encode(&nonce),
            window_ms,
            packs: to_hex(&condemned.packs),
            segments: to_hex(&condemned.segments),
        };
        let body = serde_json::to_vec(&record).map_err(|e| Error::Corrupt(e.to_string()))?;
        // The state is written only by the run that holds the lock.
        self.keep_lock(lock, true)?;
        let opts = PutOptions {
            mode: PutMode::Overwrite,
            ..Default::default()
        };
        self.run(
            self.store
                .put_opts(&ObjPath::from(STATE), PutPayload::from(body), opts),
        )
        .map_err(|e| store_err(format!("writing {}/{STATE}", self.describe), e))?;
        self.sync_gc()?;
        progress("done");
        Ok(report)
    }
}
