//! A version of a mirrored volume read on demand: a local file that fills
//! from the mirror server as the device reads it (`ublk-mirror attach`).
//!
//! The device's backing file is a sparse cache the size of the volume.
//! Each [`BLOCK`] of it is in one of three states:
//!
//! | state    | the cache file holds              | may become                 |
//! |----------|-----------------------------------|----------------------------|
//! | `Absent` | nothing meaningful                | `Clean` (fetched), `Dirty` |
//! | `Clean`  | the version's bytes, verified     | `Absent` (evicted), `Dirty`|
//! | `Dirty`  | what the user wrote (`--writable`)| nothing                    |
//!
//! **Reading.** Before the engine issues a request ([`OnDemand::prepare`],
//! on the queue thread, never waiting there), every block it touches must
//! be local. If one is not, the request waits on a [`crate::wake::Wake`]
//! ([`Waiter`]), an eventfd that the queue's own io_uring polls, so other requests of
//! the queue go on meanwhile; the fetcher thread asks the server for the
//! missing blocks and wakes it. Blocks a request is about to read are
//! *pinned* until it completes ([`OnDemand::release`]), so eviction never
//! punches a hole under a read in flight.
//!
//! **Never wrong data.** Every block is checked against its SHA-256
//! before it is written into the cache; a block that fails is fetched
//! again, never served. The fetcher writes a block only while it is still
//! `Absent`, under the same lock that a write takes to make it `Dirty`, so
//! a fetch that lands late never overwrites what the user wrote.
//!
//! **Writing** (`--writable`, a local overlay the mirror never sees): a
//! block wholly covered by a write (or discard) becomes `Dirty` at once,
//! its old content never needed; a block partly covered is fetched first.
//! Dirty blocks are never evicted. Without `--writable` the device is
//! read-only to the kernel and writes are refused with `EROFS`.
//!
//! **Link loss.** The fetcher reconnects with a growing pause (up to
//! [`MAX_BACKOFF`]) and re-opens the same version by its snapshot's name;
//! waiting reads resume. A read that has waited longer than the timeout the
//! user set fails with `EIO`; with no timeout it waits for the link.
//! The server refusing the version (deleted, changed, access revoked) for
//! [`FAIL_AFTER`] fails the reads that wait, and every read of a block
//! not local, at once with `EIO` (instead of hanging them forever), until a
//! fetch succeeds again; the fetcher keeps trying, and `status` says why.
//! A local failure (the target or the cache cannot be written: its file
//! system full) is waited for as a broken link is, said in the log as
//! what it is: freeing space lets the reads go on.
//!
//! **Read-ahead.** A miss right after the previous run fetched doubles the
//! run asked for (up to [`MAX_RUN`] blocks); a random miss asks for
//! [`FIRST_RUN`] blocks. A reader that stays sequential has the next
//! windows asked with it, [`PIPELINE`] runs in flight; so has the fill.
//!
//! **The cache is bounded**: past the limit, clean blocks are evicted
//! (their range punched out of the file) in clock order.
//!
//! Nothing of an attached device persists: the cache file is unlinked as
//! soon as the device has it open, so a killed daemon leaves nothing behind.
//!
//! ## Instant restore
//!
//! `restore --instant` is the same machinery with the restore target as
//! the file ([`FillOptions`]): no eviction, writes allowed, digests of what
//! the target holds sent with each run (so only blocks that differ
//! travel; a block the server calls the same becomes `Clean` where it
//! lies), and, when no read waits, a *fill* walks the absent blocks in
//! order. When every block is local the fill state is removed and the
//! device is an ordinary one; a *finished marker* takes the state's place
//! (`STATE.done`, JSON `{"format":1,"volume":V,"snapshot":S,"target":T,
//! "finished_ms":MS}`, written durably before the state is removed), so
//! that the same `restore --instant` run again, after a reboot say, is
//! refused instead of undoing the writes made since ([`finished`]).
//!
//! **The fill state** (a file, [`FILL_VERSION`]) says which blocks are
//! local, so that after `kill -9` (the device is recoverable) or a reboot
//! the restore goes on where it was:
//!
//! ```text
//! "UMFILL01"  u32 LE n  header: n bytes of JSON (FillHeader)
//! bitmap: one bit per BLOCK (bit i%8 of byte i/8), 1 = local
//! u32 LE crc32c of all the bytes before
//! ```
//!
//! Resumed, it names the version: a restore under way starts again (after
//! a reboot, or `recover`) even where the mirror cannot be reached, with
//! what is local, and reads of other blocks wait for the mirror, whose
//! version is checked (epoch and size) when it is reached.
//!
//! It is replaced whole (temporary file, fsync, rename, fsync of the
//! directory), so it is always one complete version. Its crash argument:
//! a bit is set in a written state only if the block's content is the
//! version's or a write the user made, and that content is durable:
//! [`OnDemand::persist`] takes the bitmap, then `fdatasync`s the target,
//! then writes the state. A fetched block is written before it is marked;
//! a write that makes an absent block local marks it first (so the fill
//! never overwrites it) but is *unsettled* until it completes, and an
//! unsettled block is left out of the bitmap persisted; if no write on it
//! completes well (refused, or failed), it is absent again and fetched
//! (one that does, even a write of part of it, keeps it local: what a
//! failed write leaves is undefined to its writer). So after a crash a
//! block whose bit is clear is fetched (or found the same) again: that
//! loses only a write never flushed, which a crash may lose anyway. A
//! FLUSH persists the state before it completes, and a FUA write whose
//! blocks the state does not hold yet persists it before it completes, so
//! what the file system made durable stays. A block is never overwritten
//! by the fill once local, so a write is never undone while the daemon
//! lives.
//!
//! **A daemon killed while the machine lives** is not a crash to the file
//! system: the device is recovered, and every write that completed is in
//! the target's page cache and must stay. So a second, *live* state (same
//! format, in `/run`, written without syncing) holds what is local and
//! settled, and is written before any write whose blocks it does not hold
//! yet completes. A recovered daemon takes the union of both states; after
//! a reboot the live one is gone and the durable one alone holds.
//!
//! **Mirroring on** (`restore --instant --mirror`). The device takes the
//! volume over first ([`crate::replicator::take_over`]: it becomes the
//! writer; the volume's versions stay; started again where the mirror
//! cannot be reached, a marker says the take-over is still to do, and the
//! replicator does it before anything ships) and tracks its writes from the
//! start, like any mirrored device; its replicator is held until the fill
//! is done ([`crate::replicator::Hold`], [`OnDemand::filled`]). The fill
//! writes the target behind the tracking's back, so the device's first
//! epoch must compare every block with the mirror by hash. It does: the
//! take-over drops the device's record of what the volume holds of its
//! past (`mirror.json`) durably before the device exists, and only a
//! running replicator writes that record again, after it marked the whole
//! device for that comparison; a held replicator never runs. A kill or a
//! reboot mid-fill changes none of this (the record stays dropped; the
//! replicator of the recovered daemon is held too), and a kill after the
//! fill but before the first epoch finds the record dropped as well.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ublk_mirror_common::block::BLOCK;
use ublk_mirror_common::client::{Link, VersionRead};
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::session::restore::{ReadStep, RestoreInfo, MAX_ASK, NO_DIGEST};

use crate::engine::{Errno, Op, Request};
use crate::enrollment::Enrollment;
use crate::error::{Error, Result};
use crate::wake::Wake;

/// Blocks asked for on a random miss.
pub const FIRST_RUN: usize = 2;
/// Most blocks asked for at once (sequential read-ahead).
pub const MAX_RUN: usize = 64;
/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long fetches may fail for anything but the link before reads of
/// blocks not local fail (see the module docs).
pub const FAIL_AFTER: Duration = Duration::from_secs(30);
/// Runs asked at once (the answers stream while the next are asked).
pub const PIPELINE: usize = 4;
/// How often the fill state is written while the fill goes on.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// How long the server may stay silent before the link counts as broken.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// The server forgets an idle reading after 120 s; a reading idle this
/// long is reopened before it is used.
const IDLE_REOPEN: Duration = Duration::from_secs(90);

const ABSENT: u8 = 0;
const CLEAN: u8 = 1;
const DIRTY: u8 = 2;

/// Which version to read, and how.
#[derive(Debug, Clone)]
pub struct OnDemandOptions {
    /// The volume on the server.
    pub volume: String,
    /// A snapshot name or a time (`None`: a snapshot of the mirror as it
    /// is now is taken, so the version stays while it is read).
    pub at: Option<String>,
    /// This machine's enrollment.
    pub client_dir: PathBuf,
    /// Allow writes, kept locally.
    pub writable: bool,
    /// Most bytes of clean (fetched) blocks kept.
    pub cache_limit: u64,
    /// How long a read waits for the mirror before failing (`None`: for
    /// ever).
    pub timeout: Option<Duration>,
    /// An instant restore: the file is the target, filled in full.
    pub fill: Option<FillOptions>,
}

/// What makes an on-demand device an instant restore.
#[derive(Debug, Clone)]
pub struct FillOptions {
    /// The fill state file (resumed if it exists).
    pub state: PathBuf,
    /// The live fill state: on a file system that does not outlive the
    /// machine (`/run`), read back only after a daemon died and the
    /// machine did not.
    pub live: PathBuf,
    /// The target's path (recorded in the state).
    pub target: PathBuf,
    /// Bytes per second the background fill may take from the link, as
    /// sent (`None`: as fast as it can); holes and blocks the target holds
    /// already cost nothing, and reads that wait are never held back.
    pub rate: Option<u64>,
}

/// Version of the fill state's layout (see the module docs).
pub const FILL_VERSION: u32 = 1;
const FILL_MAGIC: &[u8; 8] = b"UMFILL01";

/// The fill state's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillHeader {
    /// [`FILL_VERSION`] of the writer.
    pub version: u32,
    /// The volume restored.
    pub volume: String,
    /// The snapshot restored.
    pub snapshot: String,
    /// The epoch it holds.
    pub epoch: u64,
    /// When that epoch was published (ms since the Unix epoch; 0 in a
    /// state written before this field).
    #[serde(default)]
    pub epoch_ms: u64,
    /// The volume's size.
    pub size: u64,
    /// Bytes per bit.
    pub block: u64,
    /// The target.
    pub target: PathBuf,
}

/// Read a fill state (`None`: there is none).
pub fn read_fill_state(path: &Path) -> Result<Option<(FillHeader, Vec<u8>)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let bad =
        |why: &str| Error::InvalidConfig(format!("the fill state {} is {why}", path.display()));
    if bytes.len() < 16 || &bytes[..8] != FILL_MAGIC {
        return Err(bad("not one (bad magic)"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(bad("damaged (checksum)"));
    }
    let n = u32::from_le_bytes(body[8..12].try_into().map_err(|_| bad("short"))?) as usize;
    let json = body.get(12..12 + n).ok_or_else(|| bad("short"))?;
    let header: FillHeader = serde_json::from_slice(json).map_err(|_| bad("damaged (header)"))?;
    if header.version != FILL_VERSION || header.block != BLOCK {
        return Err(bad("of another version"));
    }
    let bitmap = body[12 + n..].to_vec();
    if bitmap.len() as u64 != header.size.div_ceil(BLOCK).div_ceil(8) {
        return Err(bad("damaged (bitmap size)"));
    }
    Ok(Some((header, bitmap)))
}

/// The writes in flight on a block they made local (see
/// [`State::unsettled`]).
#[derive(Debug, Default)]
struct Unsettled {
    writes: u32,
    done_well: bool,
}

/// One bit per block: local, and not made so by a write still in flight.
fn settled_bitmap(s: &State) -> Vec<u8> {
    let mut bitmap = vec![0u8; s.blocks.len().div_ceil(8)];
    for (i, &state) in s.blocks.iter().enumerate() {
        if state != ABSENT && !s.unsettled.contains_key(&(i as u64)) {
            bitmap[i / 8] |= 1 << (i % 8);
        }
    }
    bitmap
}

fn encode_fill_state(header: &FillHeader, bitmap: &[u8]) -> Result<Vec<u8>> {
    let json =
        serde_json::to_vec(header).map_err(|e| Error::io("encoding the fill state", e.into()))?;
    let mut bytes = Vec::with_capacity(16 + json.len() + bitmap.len());
    bytes.extend_from_slice(FILL_MAGIC);
    bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(bitmap);
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Replace the live fill state at `path` (a temporary file renamed over
/// it, not synced: it only has to outlive this process, not the machine).
fn write_fill_state_quickly(path: &Path, header: &FillHeader, bitmap: &[u8]) -> Result<()> {
    let bytes = encode_fill_state(header, bitmap)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Replace the fill state at `path` whole (see the module docs).
pub fn write_fill_state(path: &Path, header: &FillHeader, bitmap: &[u8]) -> Result<()> {
    let bytes = encode_fill_state(header, bitmap)?;
    ublk_mirror_common::fsutil::write_durably(path, &bytes)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// What an attached device shows in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachStatus {
    /// The volume.
    pub volume: String,
    /// The snapshot read.
    pub snapshot: String,
    /// The epoch it holds.
    pub epoch: u64,
    /// When that epoch was published (ms since the Unix epoch).
    pub epoch_ms: u64,
    /// Whether writes are allowed (kept locally).
    pub writable: bool,
    /// The volume's size.
    pub size: u64,
    /// Bytes fetched from the mirror so far (decoded).
    pub fetched_bytes: u64,
    /// Their bytes on the wire.
    pub wire_bytes: u64,
    /// Bytes of fetched blocks held in the cache now.
    pub cached_bytes: u64,
    /// Bytes written locally.
    pub dirty_bytes: u64,
    /// Bytes not held locally.
    pub remaining_bytes: u64,
    /// Fetch rate over the last second or so, bytes per second.
    pub rate: u64,
    /// Whether the link to the mirror is up.
    pub link_up: bool,
    /// Requests waiting for blocks now.
    pub waiting: u64,
    /// Requests failed because the mirror could not be reached in time.
    pub timed_out: u64,
    /// An instant restore: its target (filled in full).
    #[serde(default)]
    pub restore_target: Option<PathBuf>,
    /// An instant restore whose every block is local.
    #[serde(default)]
    pub filled: bool,
    /// Why fetching fails, while it does (absent in older daemons').
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A request waiting for blocks: the queue polls its [`Wake`] on its
/// ring; the fetcher sets it when the blocks are local, or when the wait
/// timed out.
#[derive(Debug)]
pub struct Waiter {
    wake: Wake,
    blocks: Vec<u64>,
    deadline: Option<Instant>,
}

impl Waiter {
    /// What the request waits on.
    pub fn wake(&self) -> &Wake {
        &self.wake
    }
}

/// Blocks pinned for a request in flight; give back with
/// [`OnDemand::release`].
#[derive(Debug)]
#[must_use]
pub struct Pinned {
    blocks: std::ops::Range<u64>,
    /// Blocks a write made local from absent, settled when it completes.
    unsettled: Vec<u64>,
    /// The blocks a write touched (its fill-state bits must be saved
    /// before it completes).
    written: std::ops::Range<u64>,
    fua: bool,
}

impl Pinned {
    fn none() -> Pinned {
        Pinned {
            blocks: 0..0,
            unsettled: Vec::new(),
            written: 0..0,
            fua: false,
        }
    }
}

/// What [`OnDemand::prepare`] decided.
#[derive(Debug)]
pub enum Prepared {
    /// Issue the request; release the pin when it completes.
    Go(Pinned),
    /// Wait for the waiter's eventfd, then prepare again.
    Wait(Arc<Waiter>),
}

#[derive(Debug)]
struct State {
    blocks: Vec<u8>,
    pins: HashMap<u64, u32>,
    wanted: VecDeque<u64>,
    waiters: Vec<Arc<Waiter>>,
    clean: u64,
    dirty: u64,
    hand: u64,
    stop: bool,
    /// Blocks made local by writes in flight: the writes on each (the
    /// one that made it local and any since), and whether one of them
    /// completed well. If none did, the block is absent again: nothing
    /// the user wrote is there, and the version's content is fetched.
    unsettled: HashMap<u64, Unsettled>,
    /// Local blocks.
    local: u64,
    /// The bitmap changed since it was last persisted.
    changed: bool,
    /// Where the fill looks next.
    cursor: u64,
    /// The bitmap last written to the durable fill state.
    saved_durable: Vec<u8>,
    /// The bitmap last written to the live fill state.
    saved_live: Vec<u8>,
    /// Why fetching fails, since when, and whether reads of blocks not
    /// local fail at once (it failed for more than [`FAIL_AFTER`], for
    /// anything but the link).
    failing: Option<Failing>,
}

#[derive(Debug)]
struct Failing {
    why: String,
    /// When fetches began failing for anything but the link (`None`: the
    /// link is what fails).
    since: Option<Instant>,
    /// Reads of blocks not local fail at once.
    failed: bool,
}

#[derive(Debug, Default)]
struct Counters {
    fetched: AtomicU64,
    wire: AtomicU64,
    timed_out: AtomicU64,
    link_up: AtomicBool,
}

/// The finished marker of the fill state `state` (see the module docs).
pub fn finished_marker(state: &Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".done");
    PathBuf::from(p)
}

/// An instant restore with fill state `state` onto `target` finished
/// before, and its target (there still) has been an ordinary disk since:
/// restoring onto it again would undo every write made since. `None`
/// when a restore may go on (a fill state to resume, no marker, or no
/// target: a new one is made); else what to tell the user.
pub fn finished(state: &Path, target: &Path) -> Option<String> {
    let marker = finished_marker(state);
    if state.exists() || !marker.exists() || !target.exists() {
        return None;
    }
    let recorded = std::fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    // A disk bigger than the volume serves the volume's size: say it.
    let size = recorded
        .as_ref()
        .and_then(|v| v["size"].as_u64())
        .filter(|_| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device())
        })
        .map_or_else(String::new, |n| {
            format!(" --size {}", ublk_mirror_common::size::ByteSize(n))
        });
    let what = recorded
        .map(|v| {
            let at = v["finished_ms"]
                .as_i64()
                .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                .map_or_else(String::new, |t| format!(" at {t:.0}"));
            format!(
                "of {}@{}{at}",
                v["volume"].as_str().unwrap_or("?"),
                v["snapshot"].as_str().unwrap_or("?")
            )
        })
        .unwrap_or_default();
    Some(format!(
        "{} finished an instant restore {what}: it is an ordinary disk since, and restoring \
         onto it again would undo every write made to it since. Serve it with \
         `ublk-mirror add --backing {}{size}` (with `--mirror VOLUME` to keep mirroring it); to \
         restore over it all the same, remove {} first",
        target.display(),
        target.display(),
        marker.display()
    ))
}

/// The shared state of an on-demand device: the queue threads prepare and
/// release requests; the fetcher thread fills blocks.
#[derive(Debug)]
pub struct OnDemand {
    file: File,
    opts: OnDemandOptions,
    info: RestoreInfo,
    state: Mutex<State>,
    work: Condvar,
    counters: Counters,
    rate: Mutex<(Instant, u64, u64)>,
    /// The fill state's header (instant restore).
    fill: Option<FillHeader>,
    /// One persist at a time.
    persisting: Mutex<()>,
    fill_path: Option<PathBuf>,
    live_path: Option<PathBuf>,
    /// Every block local: an ordinary device.
    filled: AtomicBool,
    /// The target was new (all zeroes) when this daemon opened it.
    fresh: bool,
}

fn block_len(size: u64, index: u64) -> u64 {
    (size - index * BLOCK).min(BLOCK)
}

impl OnDemand {
    /// The shared state for `info` read into `file` (`fresh`: all zeroes;
    /// `resumed`: the bitmap of a fill state).
    fn new(
        opts: OnDemandOptions,
        info: RestoreInfo,
        file: File,
        fresh: bool,
        resumed: Option<&[u8]>,
    ) -> OnDemand {
        let blocks = info.size.div_ceil(BLOCK) as usize;
        let mut state = State {
            blocks: vec![ABSENT; blocks],
            pins: HashMap::new(),
            wanted: VecDeque::new(),
            waiters: Vec::new(),
            clean: 0,
            dirty: 0,
            hand: 0,
            stop: false,
            unsettled: HashMap::new(),
            local: 0,
            changed: true,
            cursor: 0,
            saved_durable: resumed.map_or_else(|| vec![0; blocks.div_ceil(8)], <[u8]>::to_vec),
            saved_live: resumed.map_or_else(|| vec![0; blocks.div_ceil(8)], <[u8]>::to_vec),
            failing: None,
        };
        if let Some(bitmap) = resumed {
            for b in 0..blocks {
                if bitmap[b / 8] & (1 << (b % 8)) != 0 {
                    state.blocks[b] = CLEAN;
                    state.clean += block_len(info.size, b as u64);
                    state.local += 1;
                }
            }
        }
        let fill = opts.fill.as_ref().map(|f| FillHeader {
            version: FILL_VERSION,
            volume: opts.volume.clone(),
            snapshot: info.snapshot.clone(),
            epoch: info.epoch,
            epoch_ms: info.epoch_ms,
            size: info.size,
            block: BLOCK,
            target: f.target.clone(),
        });
        let fill_path = opts.fill.as_ref().map(|f| f.state.clone());
        let live_path = opts.fill.as_ref().map(|f| f.live.clone());
        OnDemand {
            file,
            info,
            state: Mutex::new(state),
            work: Condvar::new(),
            counters: Counters::default(),
            rate: Mutex::new((Instant::now(), 0, 0)),
            fill,
            persisting: Mutex::new(()),
            fill_path,
            live_path,
            filled: AtomicBool::new(false),
            fresh: fresh && resumed.is_none(),
            opts,
        }
    }

    /// The version being read.
    pub fn info(&self) -> &RestoreInfo {
        &self.info
    }

    /// The volume.
    pub fn volume(&self) -> &str {
        &self.opts.volume
    }

    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        self.opts.writable
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range_blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = (offset + len).min(self.info.size);
        offset / BLOCK..end.div_ceil(BLOCK)
    }

    /// Decide whether `req` may be issued now (its blocks pinned, and for
    /// a write its blocks made `Dirty`), or must wait for blocks.
    pub fn prepare(&self, req: &Request) -> std::result::Result<Prepared, Errno> {
        if self.filled.load(Ordering::Acquire) {
            return Ok(Prepared::Go(Pinned::none()));
        }
        let writes = match req.op {
            Op::Flush => {
                // What the file system made durable must stay local.
                if let Err(e) = self.persist() {
                    tracing::error!("cannot persist the fill state: {e}");
                    return Err(Errno::IO);
                }
                return Ok(Prepared::Go(Pinned::none()));
            }
            Op::Read => false,
            Op::Write | Op::Discard | Op::WriteZeroes => true,
        };
        if writes && !self.opts.writable {
            return Err(Errno(libc::EROFS));
        }
        let range = self.range_blocks(req.offset, req.len);
        let mut s = self.lock();
        let mut missing = Vec::new();
        for b in range.clone() {
            if s.blocks[b as usize] != ABSENT {
                continue;
            }
            let start = b * BLOCK;
            let len = block_len(self.info.size, b);
            let covered = writes && req.offset <= start && req.offset + req.len >= start + len;
            if !covered {
                missing.push(b);
            }
        }
        if !missing.is_empty() {
            if s.stop {
                // No fetcher any more: nothing would wake a wait.
                return Err(Errno::IO);
            }
            if s.failing.as_ref().is_some_and(|f| f.failed) {
                // The server refuses: the read fails at once, and what it
                // wanted is asked for again (a success ends the failure).
                for b in missing {
                    if !s.wanted.contains(&b) {
                        s.wanted.push_back(b);
                    }
                }
                drop(s);
                self.work.notify_all();
                return Err(Errno::IO);
            }
            let waiter = Arc::new(Waiter {
                wake: Wake::new()?,
                blocks: missing.clone(),
                deadline: self.opts.timeout.map(|t| Instant::now() + t),
            });
            for b in missing {
                if !s.wanted.contains(&b) {
                    s.wanted.push_back(b);
                }
            }
            s.waiters.push(waiter.clone());
            drop(s);
            self.work.notify_all();
            return Ok(Prepared::Wait(waiter));
        }
        let mut unsettled = Vec::new();
        for b in range.clone() {
            if writes {
                let len = block_len(self.info.size, b);
                match s.blocks[b as usize] {
                    CLEAN => s.clean -= len,
                    DIRTY => {
                        // Made local by a write still in flight: this one
                        // settles it too, if it completes well.
                        if let Some(u) = s.unsettled.get_mut(&b) {
                            u.writes += 1;
                            unsettled.push(b);
                        }
                        continue;
                    }
                    _ => {
                        unsettled.push(b);
                        s.unsettled.entry(b).or_default().writes += 1;
                        s.local += 1;
                        s.changed = true;
                    }
                }
                s.blocks[b as usize] = DIRTY;
                s.dirty += len;
            } else {
                *s.pins.entry(b).or_insert(0) += 1;
            }
        }
        // Dirty blocks are never evicted: a write pins nothing.
        let (blocks, written) = if writes { (0..0, range) } else { (range, 0..0) };
        Ok(Prepared::Go(Pinned {
            blocks,
            unsettled,
            written,
            fua: req.fua,
        }))
    }

    /// A request prepared with [`Prepared::Go`] completed. `false` when
    /// the fill state that had to say its blocks are here (the live one;
    /// for FUA the durable one too) could not be written: the request must
    /// fail (`EIO`), or after a crash the fill would write over it.
    pub fn release(&self, pinned: Pinned) -> bool {
        self.release_as(pinned, true)
    }

    /// A request prepared with [`Prepared::Go`] failed, or was never
    /// issued: a block it alone made local (absent before it) is absent
    /// again, and fetched; what a failed write leaves there is undefined
    /// to the writer, and the version's content is as good as any.
    pub fn release_failed(&self, pinned: Pinned) {
        self.release_as(pinned, false);
    }

    fn release_as(&self, pinned: Pinned, ok: bool) -> bool {
        if pinned.blocks.is_empty() && pinned.written.is_empty() {
            return true;
        }
        let mut s = self.lock();
        for b in pinned.blocks {
            if let Some(n) = s.pins.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    s.pins.remove(&b);
                }
            }
        }
        for &b in &pinned.unsettled {
            let Some(u) = s.unsettled.get_mut(&b) else {
                continue;
            };
            u.writes -= 1;
            u.done_well |= ok;
            if u.writes > 0 {
                continue;
            }
            let done_well = u.done_well;
            s.unsettled.remove(&b);
            if !done_well {
                s.blocks[b as usize] = ABSENT;
                s.local -= 1;
                s.dirty -= block_len(self.info.size, b);
                s.changed = true;
            }
        }
        // Before the write completes, its blocks must be local in the saved
        // states: in the live one (a daemon killed and recovered must not
        // fill them again: the kernel saw the write complete), and for FUA
        // in the durable one. A failed one leaves nothing of the user's to
        // keep (a block still made local by another write in flight is
        // saved when that one completes).
        let fill = ok && self.fill.is_some() && !self.filled.load(Ordering::Acquire);
        let unsaved = |saved: &[u8]| {
            pinned
                .written
                .clone()
                .any(|b| saved[(b / 8) as usize] & (1 << (b % 8)) == 0)
        };
        let live = fill && unsaved(&s.saved_live);
        let durable = fill && pinned.fua && unsaved(&s.saved_durable);
        if durable {
            s.changed = true;
        }
        drop(s);
        let mut saved = true;
        if live {
            if let Err(e) = self.save_live() {
                tracing::error!("cannot save the fill state (the write fails): {e}");
                saved = false;
            }
        }
        if durable {
            if let Err(e) = self.persist() {
                tracing::error!("cannot persist the fill state (the write fails): {e}");
                saved = false;
            }
        }
        if !pinned.unsettled.is_empty() {
            // The fill may be waiting for writes to settle.
            self.work.notify_all();
        }
        saved
    }

    /// Write the fill state (instant restore; see the module docs), if it
    /// changed since it was last written.
    pub fn persist(&self) -> Result<()> {
        let Some(header) = &self.fill else {
            return Ok(());
        };
        let _one = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        // Filled: the state is gone for good (and must not come back).
        if self.filled.load(Ordering::Acquire) {
            return Ok(());
        }
        let bitmap = {
            let mut s = self.lock();
            if !s.changed {
                return Ok(());
            }
            // Unsettled blocks go in a later persist.
            s.changed = !s.unsettled.is_empty();
            settled_bitmap(&s)
        };
        let written = self
            .file
            .sync_data()
            .map_err(|e| Error::io("syncing the restore target", e))
            .and_then(|()| {
                write_fill_state(
                    self.fill_path.as_deref().unwrap_or(Path::new("")),
                    header,
                    &bitmap,
                )
            });
        let mut s = self.lock();
        match &written {
            Ok(()) => s.saved_durable = bitmap,
            Err(_) => s.changed = true,
        }
        written
    }

    /// Write the live fill state (see the module docs): what is local
    /// now, valid while the page cache lives; no sync.
    fn save_live(&self) -> Result<()> {
        let (Some(header), Some(path)) = (&self.fill, &self.live_path) else {
            return Ok(());
        };
        let _one = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        if self.filled.load(Ordering::Acquire) {
            return Ok(());
        }
        let bitmap = settled_bitmap(&self.lock());
        write_fill_state_quickly(path, header, &bitmap)?;
        self.lock().saved_live = bitmap;
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` as the device would (waiting
    /// for blocks on this thread): for tests and tools.
    pub fn read_blocking(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let pin = self.wait_blocking(&Request::read(offset, buf.len() as u64))?;
        let read = self.file.read_exact_at(buf, offset);
        self.release(pin);
        read.map_err(|e| Error::io("reading the cache", e))
    }

    /// Write `data` at `offset` as the device would (`--writable`): for
    /// tests and tools.
    pub fn write_blocking(&self, data: &[u8], offset: u64) -> Result<()> {
        let pin = self.wait_blocking(&Request::write(offset, data.len() as u64))?;
        let written = self.file.write_all_at(data, offset);
        if written.is_ok() {
            self.release(pin);
        } else {
            self.release_failed(pin);
        }
        written.map_err(|e| Error::io("writing the cache", e))
    }

    fn wait_blocking(&self, req: &Request) -> Result<Pinned> {
        let failed =
            |errno: i32| Error::io("on-demand I/O", std::io::Error::from_raw_os_error(errno));
        loop {
            match self.prepare(req).map_err(|e| failed(e.0))? {
                Prepared::Go(pin) => return Ok(pin),
                Prepared::Wait(w) => w.wake().wait_blocking().map_err(|e| failed(e.0))?,
            }
        }
    }

    /// Whether every block is local (an instant restore's fill is done).
    pub fn filled(&self) -> bool {
        self.filled.load(Ordering::Relaxed)
    }

    /// What `status` shows.
    pub fn status(&self) -> AttachStatus {
        let (cached, dirty, waiting, last_error) = {
            let s = self.lock();
            (
                s.clean,
                s.dirty,
                s.waiters.len() as u64,
                s.failing.as_ref().map(|f| f.why.clone()),
            )
        };
        let fetched = self.counters.fetched.load(Ordering::Relaxed);
        let rate = {
            let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let secs = now.duration_since(r.0).as_secs_f64();
            if secs >= 0.5 {
                r.2 = (fetched.saturating_sub(r.1) as f64 / secs) as u64;
                *r = (now, fetched, r.2);
            }
            r.2
        };
        AttachStatus {
            volume: self.opts.volume.clone(),
            snapshot: self.info.snapshot.clone(),
            epoch: self.info.epoch,
            epoch_ms: self.info.epoch_ms,
            writable: self.opts.writable,
            size: self.info.size,
            fetched_bytes: fetched,
            wire_bytes: self.counters.wire.load(Ordering::Relaxed),
            cached_bytes: cached,
            dirty_bytes: dirty,
            remaining_bytes: self.info.size.saturating_sub(cached + dirty),
            rate,
            link_up: self.counters.link_up.load(Ordering::Relaxed),
            waiting,
            timed_out: self.counters.timed_out.load(Ordering::Relaxed),
            restore_target: self.fill.as_ref().map(|h| h.target.clone()),
            filled: self.filled.load(Ordering::Relaxed),
            last_error,
        }
    }

    /// Stop the fetcher; waiting requests fail.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stop = true;
        for w in s.waiters.drain(..) {
            w.wake.signal(false);
        }
        drop(s);
        self.work.notify_all();
    }

    /// The next run to fetch: the oldest wanted block still absent, and
    /// the absent blocks after it up to the read-ahead window.
    fn next_run(
        &self,
        s: &mut State,
        last_end: &mut u64,
        window: &mut usize,
    ) -> Option<(u64, usize)> {
        while let Some(&b) = s.wanted.front() {
            if s.blocks[b as usize] == ABSENT {
                break;
            }
            s.wanted.pop_front();
        }
        let &first = s.wanted.front()?;
        *window = if first == *last_end {
            (*window * 2).min(MAX_RUN)
        } else {
            FIRST_RUN
        };
        let total = s.blocks.len() as u64;
        let mut count = 1;
        while count < (*window).min(MAX_ASK) {
            let b = first + count as u64;
            if b >= total || s.blocks[b as usize] != ABSENT {
                break;
            }
            count += 1;
        }
        *last_end = first + count as u64;
        Some((first * BLOCK, count))
    }

    /// The absent blocks from block `first` on, at most `most`, if
    /// `first` is absent.
    fn absent_run(&self, s: &State, first: u64, most: usize) -> Option<(u64, usize)> {
        let total = s.blocks.len() as u64;
        if first >= total || s.blocks[first as usize] != ABSENT {
            return None;
        }
        let mut count = 1;
        while count < most.min(MAX_ASK)
            && first + (count as u64) < total
            && s.blocks[(first + count as u64) as usize] == ABSENT
        {
            count += 1;
        }
        Some((first * BLOCK, count))
    }

    /// Keep a verified block (`None`: zeroes) if it is still absent.
    fn store(&self, offset: u64, data: Option<&[u8]>, len: u32) -> Result<()> {
        let b = offset / BLOCK;
        let mut s = self.lock();
        if s.blocks[b as usize] != ABSENT {
            return Ok(());
        }
        match data {
            Some(bytes) => self
                .file
                .write_all_at(bytes, offset)
                .map_err(|e| Error::io("writing the cache", e))?,
            // The cache is sparse: zeroes are a hole, punched in case the
            // block held data before it was evicted.
            None => punch(&self.file, offset, u64::from(len))?,
        }
        s.blocks[b as usize] = CLEAN;
        s.clean += u64::from(len);
        s.local += 1;
        s.changed = true;
        Ok(())
    }

    /// Blocks the server called the same as the target holds are local
    /// where they lie (instant restore), if still absent.
    fn same(&self, blocks: &[(u64, u32)], received: &[u64]) {
        let mut s = self.lock();
        for &(offset, len) in blocks {
            let b = (offset / BLOCK) as usize;
            if s.blocks[b] == ABSENT && !received.contains(&offset) {
                s.blocks[b] = CLEAN;
                s.clean += u64::from(len);
                s.local += 1;
                s.changed = true;
            }
        }
    }

    /// The next run for the fill: absent blocks from the cursor on, at
    /// most `most`.
    fn next_fill(&self, s: &mut State, most: usize) -> Option<(u64, usize)> {
        let total = s.blocks.len() as u64;
        if s.local >= total {
            return None;
        }
        for pass in 0..2 {
            let mut b = if pass == 0 { s.cursor } else { 0 };
            while b < total && s.blocks[b as usize] != ABSENT {
                b += 1;
            }
            if b < total {
                let mut count = 1;
                while count < most
                    && b + (count as u64) < total
                    && s.blocks[(b + count as u64) as usize] == ABSENT
                {
                    count += 1;
                }
                s.cursor = b + count as u64;
                return Some((b * BLOCK, count));
            }
        }
        None
    }

    /// The target's digests of `count` blocks from `offset` (an attached
    /// cache holds nothing: [`NO_DIGEST`]).
    fn digests(&self, offset: u64, count: usize) -> Result<Vec<ublk_mirror_common::proto::Digest>> {
        use ublk_mirror_common::block;
        let runs: Vec<(u64, u32)> = block::run(offset, count, self.info.size).collect();
        if self.fill.is_none() {
            return Ok(vec![NO_DIGEST; runs.len()]);
        }
        if self.fresh {
            return Ok(runs
                .iter()
                .map(|&(_, len)| block::zero_digest(len))
                .collect());
        }
        let mut buf = vec![0u8; BLOCK as usize];
        runs.iter()
            .map(|&(at, len)| {
                let bytes = &mut buf[..len as usize];
                self.file
                    .read_exact_at(bytes, at)
                    .map_err(|e| Error::io("reading the restore target", e))?;
                Ok(block::digest(bytes))
            })
            .collect()
    }

    /// Every block is local and no write is unsettled: make the target
    /// durable, drop the fill state, and serve as an ordinary device.
    fn finish_fill(&self) -> Result<bool> {
        let Some(path) = &self.fill_path else {
            return Ok(false);
        };
        {
            let s = self.lock();
            if s.local < s.blocks.len() as u64 || !s.unsettled.is_empty() {
                return Ok(false);
            }
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("syncing the restore target", e))?;
        // No persist may write the state after it is removed; the device
        // is ordinary only once the removal is durable.
        let _one = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        // The marker first: a crash before the state goes resumes the fill
        // (nothing left to fetch) and finishes again.
        let marker = serde_json::json!({
            "format": 1,
            "volume": self.opts.volume,
            "snapshot": self.info.snapshot,
            "target": self.fill.as_ref().map(|f| f.target.display().to_string()),
            "size": self.info.size,
            "finished_ms": ublk_mirror_common::clock::now_ms(),
        });
        ublk_mirror_common::fsutil::write_durably(
            &finished_marker(path),
            marker.to_string().as_bytes(),
        )
        .map_err(|e| Error::io("writing the restore's finished marker", e))?;
        for p in [Some(path), self.live_path.as_ref()].into_iter().flatten() {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", p.display()), e)),
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            ublk_mirror_common::fsutil::sync_dir(dir)
                .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
        }
        self.filled.store(true, Ordering::Release);
        Ok(true)
    }

    /// A fetch failed with `e`: note why, and once it has failed for
    /// anything but the link for [`FAIL_AFTER`], fail the reads that wait
    /// (and, until a fetch succeeds, every read of a block not local).
    fn failed_fetch(&self, s: &mut State, e: &Error) {
        // Only the server saying no (the version deleted or changed,
        // access revoked) counts; a link down (offline, no name service),
        // or anything else, only makes reads wait.
        let link = !matches!(
            e.kind(),
            crate::error::ErrorKind::Refused | crate::error::ErrorKind::Usage
        );
        let now = Instant::now();
        let since = match &s.failing {
            // What was refused stays failed until a fetch succeeds.
            Some(Failing {
                since: Some(t),
                failed: true,
                ..
            }) => Some(*t),
            _ if link => None,
            Some(Failing { since: Some(t), .. }) => Some(*t),
            _ => Some(now),
        };
        let failed = since.is_some_and(|t| now.duration_since(t) >= FAIL_AFTER);
        if failed && !s.failing.as_ref().is_some_and(|f| f.failed) {
            tracing::error!(
                "the mirror has refused this restore for {}s ({e}): reads of blocks not here fail (EIO) until it can be read again",
                FAIL_AFTER.as_secs()
            );
        }
        if failed {
            // What they wanted stays wanted: the fetcher keeps trying it,
            // and its first success ends the failure.
            for w in s.waiters.drain(..) {
                w.wake.signal(false);
            }
        }
        s.failing = Some(Failing {
            why: e.to_string(),
            since,
            failed,
        });
    }

    /// After a run: wake the waiters whose blocks are all local, fail
    /// those past their deadline, and evict down to the limit.
    fn settle(&self, s: &mut State, keep: std::ops::Range<u64>) {
        let now = Instant::now();
        let blocks = &s.blocks;
        let mut timed_out = 0;
        s.waiters.retain(|w| {
            if w.blocks.iter().all(|&b| blocks[b as usize] != ABSENT) {
                w.wake.signal(true);
                false
            } else if w.deadline.is_some_and(|d| now >= d) {
                w.wake.signal(false);
                timed_out += 1;
                false
            } else {
                true
            }
        });
        self.counters
            .timed_out
            .fetch_add(timed_out, Ordering::Relaxed);
        // The blocks someone waits for: never evicted, and asked for again
        // if they went (evicted before the waiter woke) or were dropped.
        let awaited: std::collections::HashSet<u64> = s
            .waiters
            .iter()
            .flat_map(|w| w.blocks.iter().copied())
            .collect();
        if timed_out > 0 {
            // What nobody waits for any more need not be fetched.
            s.wanted.retain(|b| awaited.contains(b));
        }
        let mut again: Vec<u64> = awaited
            .iter()
            .copied()
            .filter(|&b| s.blocks[b as usize] == ABSENT && !s.wanted.contains(&b))
            .collect();
        again.sort_unstable();
        s.wanted.extend(again);
        let total = s.blocks.len() as u64;
        let mut looked = 0;
        while s.clean > self.opts.cache_limit && looked < 2 * total {
            let b = s.hand;
            s.hand = (s.hand + 1) % total;
            looked += 1;
            if s.blocks[b as usize] != CLEAN
                || s.pins.contains_key(&b)
                || keep.contains(&b)
                || awaited.contains(&b)
            {
                continue;
            }
            let len = block_len(self.info.size, b);
            if let Err(e) = punch(&self.file, b * BLOCK, len) {
                tracing::warn!("cannot evict from the cache: {e}");
                break;
            }
            s.blocks[b as usize] = ABSENT;
            s.clean -= len;
        }
    }
}

fn punch(file: &File, offset: u64, len: u64) -> Result<()> {
    ublk_mirror_common::fsutil::punch_or_zero(file, offset, len)
        .map_err(|e| Error::io("zeroing a block of the cache", e))
}

/// The connection the fetcher keeps.
struct Session {
    link: Link,
    read: Option<(VersionRead, Instant)>,
}

/// The on-demand device's fetcher, with what it shares with the queues.
pub struct Fetcher {
    shared: Arc<OnDemand>,
    rt: tokio::runtime::Runtime,
    identity: Identity,
    enrollment: Enrollment,
    session: Option<Session>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("shared", &self.shared)
            .finish()
    }
}

fn mirror_err(e: ublk_mirror_common::Error) -> Error {
    Error::Mirror(e)
}

impl Fetcher {
    /// Connect, open the version `opts` names (for an instant restore
    /// whose fill state exists, the version it names, resumed), and open
    /// the file with `open_file` once the version's size is known: the
    /// cache, sized, or the restore target, and whether it is new (all
    /// zeroes).
    pub fn open(
        opts: OnDemandOptions,
        open_file: impl FnOnce(&RestoreInfo) -> Result<(File, bool)>,
    ) -> Result<Fetcher> {
        let enrollment = Enrollment::load(&opts.client_dir)?;
        let identity = crate::enrollment::load_identity(&opts.client_dir)?;
        let mut resumed = match &opts.fill {
            Some(f) => read_fill_state(&f.state)?,
            None => None,
        };
        if let (Some(f), Some((h, bitmap))) = (&opts.fill, resumed.as_mut()) {
            if !same_path(&h.target, &f.target) {
                return Err(Error::InvalidConfig(format!(
                    "the fill state {} is for {}, not {}",
                    f.state.display(),
                    h.target.display(),
                    f.target.display()
                )));
            }
            // A daemon that died while this machine lived left what its
            // writes made local in the live state too.
            match read_fill_state(&f.live) {
                Ok(Some((live, more))) if live == *h => {
                    for (b, m) in bitmap.iter_mut().zip(more) {
                        *b |= m;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("ignoring the live fill state: {e}"),
            }
        }
        // The fill state, for the messages that say to remove it.
        let state_shown = opts
            .fill
            .as_ref()
            .map_or(String::new(), |f| f.state.display().to_string());
        if let Some((h, _)) = &resumed {
            if h.volume != opts.volume {
                return Err(Error::InvalidConfig(format!(
                    "{} holds an unfinished restore of {}@{}, not of {}: finish that one, or remove the fill state {}",
                    h.target.display(),
                    h.volume,
                    h.snapshot,
                    opts.volume,
                    state_shown
                )));
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the network runtime", e))?;
        let server = enrollment.server()?;
        let connected = rt.block_on(async {
            let link = Link::connect(&identity, server, &enrollment.address)
                .await
                .map_err(mirror_err)?;
            let at = match (&resumed, &opts.at) {
                (Some((h, _)), Some(asked)) if *asked != h.snapshot => {
                    // A time, say, that may name the same snapshot: what
                    // it names now decides.
                    let read = link
                        .read_version(&opts.volume, Some(asked))
                        .await
                        .map_err(mirror_err)?;
                    let names = read.info().snapshot.clone();
                    read.finish();
                    if names != h.snapshot {
                        return Err(Error::InvalidConfig(format!(
                            "{} holds an unfinished restore of {}@{}, not of {}@{names}: run the restore without --at (or with --at {}) to finish it, or remove the fill state {} to start over",
                            h.target.display(),
                            h.volume,
                            h.snapshot,
                            opts.volume,
                            h.snapshot,
                            state_shown
                        )));
                    }
                    h.snapshot.clone()
                }
                (Some((h, _)), _) => h.snapshot.clone(),
                (None, Some(at)) => at.clone(),
                (None, None) => {
                    // A version that stays while it is read.
                    let what = if opts.fill.is_some() {
                        "restore"
                    } else {
                        "attach"
                    };
                    let name = format!(
                        "{what}-{}",
                        jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ")
                    );
                    link.snapshot(&opts.volume, Some(&name))
                        .await
                        .map_err(mirror_err)?
                        .0
                }
            };
            let read = link
                .read_version(&opts.volume, Some(&at))
                .await
                .map_err(mirror_err)?;
            Ok::<_, Error>((link, read))
        });
        let (session, info) = match connected {
            Ok((link, read)) => {
                let info = read.info().clone();
                let session = Session {
                    link,
                    read: Some((read, Instant::now())),
                };
                (Some(session), info)
            }
            // A restore under way goes on with what is here when the
            // mirror cannot be reached (a reboot away from the network):
            // its fill state names the version; the fetcher connects when
            // it can and checks the version is still that one.
            Err(e) if e.kind() == crate::error::ErrorKind::Link => {
                let Some((h, _)) = &resumed else {
                    return Err(e);
                };
                if opts.at.as_ref().is_some_and(|a| *a != h.snapshot) {
                    return Err(Error::Mirror(ublk_mirror_common::Error::Link(format!(
                        "{e}; to go on with the restore of {}@{} without the mirror, run it without --at (or with --at {})",
                        h.volume, h.snapshot, h.snapshot
                    ))));
                }
                tracing::warn!(
                    "the mirror cannot be reached ({e}): serving what is here of {}@{}; reads of blocks not here wait for it",
                    h.volume,
                    h.snapshot
                );
                let info = RestoreInfo {
                    size: h.size,
                    snapshot: h.snapshot.clone(),
                    epoch: h.epoch,
                    epoch_ms: h.epoch_ms,
                };
                (None, info)
            }
            Err(e) => return Err(e),
        };
        if let Some((h, _)) = &resumed {
            if h.epoch != info.epoch || h.size != info.size {
                return Err(Error::InvalidConfig(format!(
                    "snapshot {}@{} changed on the server since this restore began",
                    h.volume, h.snapshot
                )));
            }
        }
        let auto = resumed.is_none() && opts.at.is_none();
        let (file, fresh) = open_file(&info).map_err(|e| {
            if !auto {
                return e;
            }
            // The snapshot taken for this read stays on the server (no
            // client may delete one): say so, rather than leave it unknown.
            let note = format!(
                " (the server kept snapshot {}@{} taken for it: `mirror-server delete {}/{}@{}` there, or name a version with --at next time)",
                opts.volume, info.snapshot, enrollment.name, opts.volume, info.snapshot
            );
            match e {
                Error::InvalidConfig(m) => Error::InvalidConfig(m + &note),
                Error::Io { context, error } => Error::Io {
                    context: context + &note,
                    error,
                },
                other => other,
            }
        })?;
        if let (false, Some((h, _))) = (fresh, &resumed) {
            tracing::info!(
                "resuming the restore of {}@{} from its fill state",
                h.volume,
                h.snapshot
            );
        }
        if fresh && resumed.is_some() {
            // The target was made anew: what the state says is local is not.
            tracing::warn!(
                "the restore target is new: its old fill state no longer holds; starting over"
            );
            resumed = None;
        }
        if let (Some(f), None) = (&opts.fill, &resumed) {
            // A restore that starts over takes nothing from a live state
            // an earlier one left (killed, or between the two removals of
            // a finished fill): its header would match this one's, and its
            // blocks be taken as local by a recovery.
            match std::fs::remove_file(&f.live) {
                Ok(()) => {
                    tracing::info!(path = %f.live.display(), "an earlier restore's live fill state removed")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("removing the earlier live fill state {}", f.live.display()),
                        e,
                    ))
                }
            }
        }
        let bitmap = resumed.as_ref().map(|(_, b)| b.as_slice());
        let shared = Arc::new(OnDemand::new(opts, info, file, fresh, bitmap));
        // The version is recorded before anything is written to the target.
        shared.persist()?;
        shared
            .counters
            .link_up
            .store(session.is_some(), Ordering::Relaxed);
        Ok(Fetcher {
            shared,
            rt,
            identity,
            enrollment,
            session,
        })
    }

    /// What the queues share with the fetcher.
    pub fn shared(&self) -> &Arc<OnDemand> {
        &self.shared
    }

    /// Fetch what is wanted until [`OnDemand::stop`].
    pub fn run(mut self) {
        let od = self.shared.clone();
        let mut last_end = u64::MAX;
        let mut window = FIRST_RUN;
        let mut backoff = Duration::from_millis(100);
        let mut persisted = Instant::now();
        let rate = od
            .opts
            .fill
            .as_ref()
            .and_then(|f| f.rate)
            .filter(|&r| r > 0);
        // A quarter of a second's worth per run when the fill is limited.
        // Fill runs stay small enough that a read that comes meanwhile
        // waits behind little.
        let base_run = rate.map_or(MAX_RUN, |r| ((r / 4 / BLOCK) as usize).clamp(1, MAX_RUN));
        // Runs that cost the link next to nothing (holes, blocks the
        // target holds) grow, so that walking them is not one round trip
        // per few blocks; one that carried data starts small again.
        let mut fill_run = base_run;
        let mut fill_not_before = Instant::now();
        // A limited fill is charged what its runs took from the link, once
        // they are answered (holes and blocks the target holds already
        // cost nothing): the next run waits for its turn.
        let mut charge: Option<(Instant, u64)> = None;
        // A limited fill asks one run at a time.
        let fill_pipeline = if rate.is_some() { 1 } else { PIPELINE };
        loop {
            let run = {
                let mut s = od.lock();
                loop {
                    if s.stop {
                        break None;
                    }
                    if let Some(run) = od.next_run(&mut s, &mut last_end, &mut window) {
                        let mut runs = vec![run];
                        // A sequential reader: the next windows too.
                        while window == MAX_RUN && runs.len() < PIPELINE {
                            let Some(ahead) = od.absent_run(&s, last_end, MAX_RUN) else {
                                break;
                            };
                            last_end = ahead.0 / BLOCK + ahead.1 as u64;
                            runs.push(ahead);
                        }
                        break Some(runs);
                    }
                    // Nothing waits: the fill's turn (instant restore).
                    if od.fill.is_some() && !od.filled.load(Ordering::Acquire) {
                        let now = Instant::now();
                        if now < fill_not_before {
                            s = od
                                .work
                                .wait_timeout(s, fill_not_before - now)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                            continue;
                        }
                        if let Some(run) = od.next_fill(&mut s, fill_run) {
                            let mut runs = vec![run];
                            while runs.len() < fill_pipeline {
                                match od.next_fill(&mut s, fill_run) {
                                    Some(r) if r.0 > run.0 => runs.push(r),
                                    _ => break,
                                }
                            }
                            if rate.is_some() {
                                charge = Some((now, od.counters.wire.load(Ordering::Relaxed)));
                            }
                            break Some(runs);
                        }
                        drop(s);
                        match od.finish_fill() {
                            Ok(true) => {
                                let st = od.status();
                                tracing::info!(
                                    fetched = st.fetched_bytes,
                                    wire = st.wire_bytes,
                                    "restore of {}@{} complete: every block is local; an ordinary device from now on",
                                    od.opts.volume,
                                    od.info.snapshot
                                );
                            }
                            Ok(false) => {}
                            Err(e) => tracing::error!("finishing the restore: {e}"),
                        }
                        s = od.lock();
                    }
                    od.settle(&mut s, 0..0);
                    s = od
                        .work
                        .wait_timeout(s, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            };
            let Some(runs) = run else {
                break;
            };
            let fetched = self.fetch(&runs);
            if let (Some((asked, wire)), Some(r)) = (charge.take(), rate) {
                let took = od
                    .counters
                    .wire
                    .load(Ordering::Relaxed)
                    .saturating_sub(wire);
                fill_not_before = asked + Duration::from_secs_f64(took as f64 / r as f64);
                let asked_bytes: u64 = runs.iter().map(|r| r.1 as u64 * BLOCK).sum();
                fill_run = if took.saturating_mul(8) < asked_bytes {
                    (fill_run * 2).min(MAX_RUN)
                } else {
                    base_run
                };
            }
            match fetched {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    od.counters.link_up.store(true, Ordering::Relaxed);
                    if od.lock().failing.take().is_some_and(|f| f.failed) {
                        tracing::info!("the mirror can be read again: reads of blocks not here wait for them again");
                    }
                    if persisted.elapsed() >= PERSIST_EVERY {
                        persisted = Instant::now();
                        if let Err(e) = od.persist() {
                            tracing::warn!("cannot persist the fill state: {e}");
                        }
                    }
                }
                Err(e) => {
                    let local = matches!(
                        e.kind(),
                        crate::error::ErrorKind::System | crate::error::ErrorKind::Environment
                    );
                    if od.counters.link_up.swap(false, Ordering::Relaxed) {
                        if local {
                            tracing::warn!("a fetch failed here, not on the link ({e}): reads of blocks not here wait until it works again; retrying");
                        } else {
                            tracing::warn!("the mirror cannot be read ({e}); retrying");
                        }
                    } else {
                        tracing::debug!("a fetch failed: {e}");
                    }
                    self.session = None;
                    let mut s = od.lock();
                    od.failed_fetch(&mut s, &e);
                    od.settle(&mut s, 0..0);
                    if !s.stop {
                        let _ = od.work.wait_timeout(s, backoff);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // The run is asked again from what is still wanted.
                    last_end = u64::MAX;
                }
            }
        }
        // What is local now stays so for the next daemon (after a clean
        // stop the target is synced; its state is written here).
        if let Err(e) = od.persist() {
            tracing::warn!("cannot persist the fill state: {e}");
        }
        if let Some(session) = self.session.take() {
            if let Some((read, _)) = session.read {
                read.finish();
            }
            self.rt.block_on(session.link.close());
        }
    }

    /// Fetch runs (asked all at once, answered in order) and keep their
    /// blocks.
    fn fetch(&mut self, runs: &[(u64, usize)]) -> Result<()> {
        let od = self.shared.clone();
        let Fetcher {
            rt,
            identity,
            enrollment,
            session,
            ..
        } = self;
        let silent = || {
            Error::Mirror(ublk_mirror_common::Error::Link(format!(
                "no answer in {}s",
                RUN_TIMEOUT.as_secs()
            )))
        };
        rt.block_on(async {
            {
                let read = tokio::time::timeout(
                    RUN_TIMEOUT,
                    open_reading(session, identity, enrollment, &od),
                )
                .await
                .map_err(|_| silent())??;
                for &(offset, count) in runs {
                    let digests = od.digests(offset, count)?;
                    read.ask(offset, digests.len(), digests)
                        .await
                        .map_err(mirror_err)?;
                }
                let mut answered = 0;
                loop {
                    // The link counts as broken when it goes quiet, not when
                    // a slow one takes long over many runs.
                    let next = tokio::time::timeout(RUN_TIMEOUT, read.next())
                        .await
                        .map_err(|_| silent())?;
                    match next.map_err(mirror_err)? {
                        ReadStep::Block(block) => {
                            let data = block.decode().map_err(mirror_err)?;
                            od.counters
                                .wire
                                .fetch_add(block.wire_len(), Ordering::Relaxed);
                            od.counters
                                .fetched
                                .fetch_add(u64::from(block.len), Ordering::Relaxed);
                            let (at, len) = (block.offset, block.len);
                            od.store(at, data.as_deref(), len)?;
                        }
                        ReadStep::Answered { blocks, received } => {
                            if od.fill.is_some() {
                                od.same(&blocks, &received);
                            }
                            answered += 1;
                            if answered == runs.len() {
                                return Ok::<(), Error>(());
                            }
                            // Readers waiting on this run go on now.
                            let mut s = od.lock();
                            od.settle(&mut s, 0..0);
                        }
                        ReadStep::ReadData(_) => unreachable!("VersionRead::next reads data"),
                    }
                }
            }
        })?;
        let mut s = od.lock();
        let first = runs.iter().map(|r| r.0 / BLOCK).min().unwrap_or(0);
        let end = runs
            .iter()
            .map(|r| r.0 / BLOCK + r.1 as u64)
            .max()
            .unwrap_or(0);
        od.settle(&mut s, first..end);
        Ok(())
    }
}

/// The reading of the version, (re)connected and (re)opened as needed.
async fn open_reading<'a>(
    session: &'a mut Option<Session>,
    identity: &Identity,
    enrollment: &Enrollment,
    od: &OnDemand,
) -> Result<&'a mut VersionRead> {
    if session
        .as_ref()
        .is_some_and(|s| s.link.close_reason().is_some())
    {
        *session = None;
    }
    if session.is_none() {
        let link = Link::connect(identity, enrollment.server()?, &enrollment.address)
            .await
            .map_err(mirror_err)?;
        *session = Some(Session { link, read: None });
    }
    let Some(s) = session.as_mut() else {
        unreachable!("connected above")
    };
    if s.read
        .as_ref()
        .is_some_and(|(_, used)| used.elapsed() > IDLE_REOPEN)
    {
        if let Some((read, _)) = s.read.take() {
            read.finish();
        }
    }
    if s.read.is_none() {
        let read = s
            .link
            .read_version(&od.opts.volume, Some(&od.info.snapshot))
            .await
            .map_err(mirror_err)?;
        let info = read.info();
        if info.size != od.info.size || info.epoch != od.info.epoch {
            return Err(Error::InvalidConfig(format!(
                "snapshot {} of {} changed on the server (epoch {} of {} bytes, was epoch {} of {})",
                od.info.snapshot, od.opts.volume, info.epoch, info.size, od.info.epoch, od.info.size
            )));
        }
        s.read = Some((read, Instant::now()));
    }
    let Some((read, used)) = s.read.as_mut() else {
        unreachable!("opened above")
    };
    *used = Instant::now();
    Ok(read)
}

/// Whether `a` and `b` name the same file: equal, or equal once
/// resolved (a restore's target may be named through a symlink, as
/// `/dev/vg/lv` or `/dev/disk/by-id/...` are, and is recorded resolved).
fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 8 * BLOCK + 4096;

    /// A fill state recorded with a target's path through a symlink (by an
    /// earlier build) is the same target as its resolved path.
    #[test]
    fn a_target_named_through_a_symlink_is_the_same_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("disk");
        std::fs::write(&real, b"").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        assert!(same_path(
            &dir.path().join("link"),
            &real.canonicalize().unwrap()
        ));
        assert!(same_path(&real, &real));
        assert!(!same_path(&real, &dir.path().join("other")));
    }

    fn od(dir: &Path, fill: bool, writable: bool, cache_limit: u64) -> OnDemand {
        let file = tempfile::tempfile_in(dir).unwrap();
        file.set_len(SIZE).unwrap();
        let opts = OnDemandOptions {
            volume: "root".into(),
            at: None,
            client_dir: dir.to_path_buf(),
            writable,
            cache_limit,
            timeout: None,
            fill: fill.then(|| FillOptions {
                live: dir.join("live"),
                state: dir.join("fill"),
                target: dir.join("target"),
                rate: None,
            }),
        };
        let info = RestoreInfo {
            size: SIZE,
            snapshot: "v".into(),
            epoch: 3,
            epoch_ms: 4,
        };
        OnDemand::new(opts, info, file, false, None)
    }

    fn go(p: std::result::Result<Prepared, Errno>) -> Pinned {
        match p {
            Ok(Prepared::Go(pin)) => pin,
            other => panic!("expected to go: {other:?}"),
        }
    }

    /// Whether block `b` is local in the fill state file `name` of `dir`.
    fn bit_in(dir: &Path, name: &str, b: usize) -> bool {
        let (_, bitmap) = read_fill_state(&dir.join(name)).unwrap().unwrap();
        bitmap[b / 8] & (1 << (b % 8)) != 0
    }

    /// ... in the durable one.
    fn bit(dir: &Path, b: usize) -> bool {
        bit_in(dir, "fill", b)
    }

    /// A write that made an absent block local and then failed (or was
    /// refused) leaves it absent: it is fetched, never kept as local with
    /// what the target held before the restore. One that completed well
    /// beside it keeps it local.
    #[test]
    fn a_failed_write_leaves_its_block_to_be_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let od = od(dir.path(), true, true, u64::MAX);
        let pin = go(od.prepare(&Request::write(BLOCK, BLOCK)));
        assert_eq!(od.status().dirty_bytes, BLOCK);
        od.release_failed(pin);
        assert_eq!(od.status().dirty_bytes, 0);
        assert!(
            matches!(
                od.prepare(&Request::read(BLOCK, 4096)),
                Ok(Prepared::Wait(_))
            ),
            "the block counts as local"
        );
        // A failed write and a good one on the same block, in flight at
        // once: the good one's.
        let first = go(od.prepare(&Request::write(2 * BLOCK, BLOCK)));
        let second = go(od.prepare(&Request::write(2 * BLOCK, 4096)));
        od.release(second);
        od.release_failed(first);
        assert_eq!(od.status().dirty_bytes, BLOCK);
        od.release(go(od.prepare(&Request::read(2 * BLOCK, 4096))));
        od.persist().unwrap();
        assert!(bit(dir.path(), 2) && !bit(dir.path(), 1));
    }

    /// A server that refuses the version (deleted, say) for longer than
    /// [`FAIL_AFTER`] fails the reads waiting for it, and later reads of
    /// blocks not local, at once; a broken link never does (reads wait for
    /// it); a fetch that succeeds again makes reads wait again.
    #[test]
    fn reads_fail_once_the_server_refuses_the_version_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let od = od(dir.path(), false, true, u64::MAX);
        let Ok(Prepared::Wait(waiter)) = od.prepare(&Request::read(BLOCK, 4096)) else {
            panic!("an absent block's read went");
        };
        let refused = Error::Mirror(ublk_mirror_common::Error::Refused(
            "there is no snapshot v of root".into(),
        ));
        let link = Error::Mirror(ublk_mirror_common::Error::Link("timed out".into()));
        // Not the server's answer either: a local error (a full disk).
        let local = Error::io(
            "writing the target",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        // A link down for long: the read waits.
        {
            let mut s = od.lock();
            od.failed_fetch(&mut s, &link);
            s.failing.as_mut().unwrap().since = None;
            od.failed_fetch(&mut s, &link);
            od.failed_fetch(&mut s, &local);
            assert_eq!(s.failing.as_ref().unwrap().since, None);
        }
        assert!(!waiter.wake().is_set());
        // Refused, lately: still waits; status says why.
        od.failed_fetch(&mut od.lock(), &refused);
        assert!(!waiter.wake().is_set());
        assert!(od.status().last_error.unwrap().contains("no snapshot v"));
        // Refused for longer than FAIL_AFTER: the read fails, and so do the
        // next ones of blocks not here; local blocks still read.
        {
            let mut s = od.lock();
            s.failing.as_mut().unwrap().since = Some(Instant::now() - FAIL_AFTER);
            od.failed_fetch(&mut s, &refused);
        }
        assert!(waiter.wake().is_set() && waiter.wake().failed());
        assert_eq!(
            od.prepare(&Request::read(2 * BLOCK, 4096)).unwrap_err(),
            Errno::IO
        );
        // What the reads wanted is still asked for: the fetcher keeps
        // trying, and its first success ends the failure.
        assert!(od.lock().wanted.contains(&1) && od.lock().wanted.contains(&2));
        od.store(3 * BLOCK, Some(&[1u8; BLOCK as usize]), BLOCK as u32)
            .unwrap();
        od.release(go(od.prepare(&Request::read(3 * BLOCK, 4096))));
        // A broken link meanwhile keeps what was refused failing.
        od.failed_fetch(&mut od.lock(), &link);
        assert!(od.lock().failing.as_ref().unwrap().failed);
        // Fetched again: reads wait again.
        od.lock().failing = None;
        assert!(matches!(
            od.prepare(&Request::read(2 * BLOCK, 4096)),
            Ok(Prepared::Wait(_))
        ));
        assert_eq!(od.status().last_error, None);
    }

    #[test]
    fn a_fetch_that_lands_after_a_write_never_overwrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let od = od(dir.path(), false, true, u64::MAX);
        // A whole-block write of an absent block goes at once.
        let pin = go(od.prepare(&Request::write(BLOCK, BLOCK)));
        od.file.write_all_at(&[7u8; BLOCK as usize], BLOCK).unwrap();
        od.release(pin);
        // The fetch of that block, asked before the write, lands now.
        od.store(BLOCK, Some(&[1u8; BLOCK as usize]), BLOCK as u32)
            .unwrap();
        let mut buf = vec![0u8; BLOCK as usize];
        od.read_blocking(&mut buf, BLOCK).unwrap();
        assert!(buf.iter().all(|&b| b == 7), "the fetch overwrote the write");
        // A partial write of an absent block waits for it.
        assert!(matches!(
            od.prepare(&Request::write(3 * BLOCK, 4096)),
            Ok(Prepared::Wait(_))
        ));
        // Reads of local blocks go; a read-only device refuses writes.
        od.release(go(od.prepare(&Request::read(BLOCK, 4096))));
        let ro = super::tests::od(dir.path(), false, false, u64::MAX);
        assert_eq!(
            ro.prepare(&Request::write(0, 4096)).unwrap_err(),
            Errno(libc::EROFS)
        );
    }

    #[test]
    fn a_write_in_flight_is_not_persisted_as_local_until_it_completes() {
        let dir = tempfile::tempdir().unwrap();
        let od = od(dir.path(), true, true, u64::MAX);
        od.persist().unwrap();
        assert!(!bit(dir.path(), 2));
        let pin = go(od.prepare(&Request::write(2 * BLOCK, BLOCK)));
        // A FLUSH while the write is in flight: the block is left out.
        od.release(go(od.prepare(&Request::flush())));
        assert!(
            !bit(dir.path(), 2),
            "an unsettled write was persisted as local"
        );
        od.release(pin);
        od.release(go(od.prepare(&Request::flush())));
        assert!(
            bit(dir.path(), 2),
            "a completed write was not persisted at FLUSH"
        );
        // A fetched block is persisted; the short last block too.
        od.store(8 * BLOCK, Some(&[5u8; 4096]), 4096).unwrap();
        od.persist().unwrap();
        assert!(bit(dir.path(), 8));
        // A FUA write that makes a block local persists it before it completes.
        let mut fua = Request::write(5 * BLOCK, BLOCK);
        fua.fua = true;
        let pin = go(od.prepare(&fua));
        assert!(od.release(pin));
        assert!(bit(dir.path(), 5));
        // One whose block cannot be saved as here (the state cannot be
        // written) fails: after a crash the fill would write over it.
        std::fs::create_dir(dir.path().join("fill.tmp")).unwrap();
        let mut fua = Request::write(6 * BLOCK, BLOCK);
        fua.fua = true;
        assert!(
            !od.release(go(od.prepare(&fua))),
            "a FUA write not saved went well"
        );
        assert!(!bit(dir.path(), 6));
    }

    /// ... in the live one.
    fn live_bit(dir: &Path, b: usize) -> bool {
        bit_in(dir, "live", b)
    }

    #[test]
    fn a_write_is_in_the_live_state_before_it_completes() {
        let dir = tempfile::tempdir().unwrap();
        let od = od(dir.path(), true, true, u64::MAX);
        od.persist().unwrap();
        // A whole absent block written: live at completion, durable only
        // at the next FLUSH.
        let pin = go(od.prepare(&Request::write(2 * BLOCK, BLOCK)));
        od.release(pin);
        assert!(
            live_bit(dir.path(), 2),
            "a completed write is not in the live state"
        );
        assert!(!bit(dir.path(), 2));
        // A fetched block, then written: the write saves it too (a
        // recovered daemon must not fetch it over the write).
        od.store(4 * BLOCK, Some(&[3u8; BLOCK as usize]), BLOCK as u32)
            .unwrap();
        assert!(!live_bit(dir.path(), 4));
        let pin = go(od.prepare(&Request::write(4 * BLOCK, 4096)));
        od.release(pin);
        assert!(live_bit(dir.path(), 4));
        od.release(go(od.prepare(&Request::flush())));
        assert!(bit(dir.path(), 2) && bit(dir.path(), 4));
    }

    #[test]
    fn the_fill_state_reads_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let header = FillHeader {
            version: FILL_VERSION,
            volume: "root".into(),
            snapshot: "v".into(),
            epoch: 9,
            epoch_ms: 1_796_000_000_000,
            size: 20 * BLOCK,
            block: BLOCK,
            target: "/dev/sdb".into(),
        };
        let bitmap = vec![0b1010_0001, 0xff, 0x0f];
        write_fill_state(&path, &header, &bitmap).unwrap();
        assert_eq!(
            read_fill_state(&path).unwrap(),
            Some((header.clone(), bitmap))
        );
        assert_eq!(read_fill_state(&dir.path().join("none")).unwrap(), None);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 6;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_fill_state(&path).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn eviction_keeps_the_limit_and_never_takes_a_pinned_block() {
        let dir = tempfile::tempdir().unwrap();
        let od = od(dir.path(), false, false, 2 * BLOCK);
        for b in 0..4 {
            od.store(
                b * BLOCK,
                Some(&[b as u8 + 1; BLOCK as usize]),
                BLOCK as u32,
            )
            .unwrap();
        }
        let pin = go(od.prepare(&Request::read(0, 4096)));
        {
            let mut s = od.lock();
            od.settle(&mut s, 3..4);
            assert!(s.clean <= 2 * BLOCK);
            assert_eq!(s.blocks[0], CLEAN, "a pinned block was evicted");
            assert_eq!(s.blocks[3], CLEAN, "the block just fetched was evicted");
            assert_eq!(s.blocks[1..3], [ABSENT, ABSENT]);
        }
        od.release(pin);
        // Evicted blocks read as holes in the cache, never as old data.
        let mut buf = vec![9u8; BLOCK as usize];
        od.file.read_exact_at(&mut buf, BLOCK).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
