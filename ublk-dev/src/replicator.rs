//! The replicator: ships sealed epochs to the mirror server, in its own
//! thread, so that the network never touches local I/O.
//!
//! The cycle:
//! 1. wait until the interval passed since the last cut (or a `sync` asks,
//!    or much is dirty) and the current epoch has changes;
//! 2. seal it at a FLUSH ([`SealAt::Flush`]) if the device flushed since
//!    the last cut, else at once (a device that does not flush would make
//!    every cut late by the whole wait);
//! 3. read it as the device at its cut, split into blocks of
//!    [`block::BLOCK`] (aligned), hash, compress, send; the server publishes it
//!    as its next epoch. Each block is read as the cut once
//!    ([`Tracker::take_epoch`]): from then on a write into it no longer
//!    waits for copy-on-write, so the device pays for the cut only until
//!    the link has read a block, not until the server has published it;
//! 4. release it: its regions are cleared in the journal (those written
//!    in the last `KEEP_MARKED` (10 s) stay marked while the device writes on:
//!    [`Tracker::release_keeping`]).
//!
//! A broken link leaves the sealed epoch in place (the blocks not yet read
//! stay preserved) and the replicator reconnects with backoff. Should the
//! mirror stay out of reach for [`LET_GO_AFTER`] (a laptop offline for
//! hours), the epochs it sealed let go of their cuts (not those sealed by
//! `ublk-mirror epoch seal`, at a point the user chose): they are demoted
//! to pre-copy rounds ([`Tracker::demote`], which also drops what only
//! they kept), so writes stop waiting for copy-on-write while the mirror
//! is away; once it is back they travel as
//! the first round of a pre-copy run and a new cut follows, as for a
//! block asked for again (below). The mirror keeps its last version
//! meanwhile; the next one is a later cut. If the
//! server had published the epoch before the link broke, the epoch is
//! released without being sent again; if it staged it in part, the rest
//! is sent. Writes meanwhile collect in the current epoch. Should the
//! server ask for a block read once already (it lost what was in flight,
//! or refused it), that read is refused: the epoch is demoted
//! ([`Tracker::demote`]) and goes on as the first round of a pre-copy run
//! (below), read as the device is now, and a new cut follows. What the
//! server staged of it is the cut's, and a block written since the cut is
//! in a later epoch, so the argument below holds for it as for any round.
//!
//! # Pre-copy: big epochs without copy-on-write
//!
//! A first sync, a resync, or a burst of writes makes an epoch too big to
//! hold as a cut: copy-on-write would stall the device's writes for as
//! long as it takes to ship (invariant 1). An epoch of at least
//! [`MirrorSettings::precopy`] bytes travels in *rounds* instead, as live
//! migration pre-copies memory:
//!
//! 1. the current epoch is sealed as a pre-copy round
//!    ([`Tracker::seal_precopy`]): no cut is kept, no chunk preserved;
//!    writes from then on (and those in flight at that instant) are
//!    recorded in the next epoch, as always;
//! 2. its blocks are read *as the device is now* and sent as the server's
//!    next epoch, which the server keeps staged without publishing
//!    (protocol V5's `EndRound`, durable when answered);
//! 3. while the next epoch's changes are more than an eighth of the
//!    threshold and shrink by half or more, it becomes the next round
//!    (at most six rounds); every block of a later round is sent
//!    again, whatever the server holds;
//! 4. then the next epoch is sealed as an ordinary cut (at a FLUSH, with
//!    copy-on-write, but only for what changed since the last round) and
//!    sent as the last part of the same server epoch, which the server
//!    publishes with everything staged, later copies over earlier ones.
//!    A cut must be sealed after the last round's reads ended: an
//!    ordinary epoch sealed before that (by `ublk-mirror epoch seal`, say,
//!    while a round was read) is sent as one more round
//!    ([`Tracker::demote`]), and a new cut follows;
//! 5. only then are the rounds and the cut released.
//!
//! Why the published image is the device at the cut: take any block. If
//! no write touched it after the last round that read it, the bytes that
//! round read are its bytes at the cut, and no later copy is staged. If a
//! write did, that write was recorded in an epoch sealed after the read
//! began (a write in flight when a round was sealed is recorded in the
//! next epoch too), so a later round, or the cut, sends it again, and the
//! cut's copy is the content at the cut. A block no round or cut changed
//! is the image's (a fresh volume's zeroes, or the same block a resync
//! found equal by hash). The server publishes only at the cut's
//! `EndEpoch`, so nothing before the cut is ever visible (invariant 3).
//!
//! What can go wrong meanwhile:
//! - *the link breaks*: the rounds stay sealed (their regions marked) and
//!   the run goes on over the next link; the first round resumes from what
//!   the server staged; a later round is sent whole again;
//! - *the server lost the staging* (a restart before a round was durable,
//!   another server behind the same address): every `BeginEpoch` answers
//!   what the server holds, and what earlier rounds sent and it no longer
//!   holds is sent again as the device is now; if the cut found it so, it
//!   ends as one more round, and another cut follows;
//! - *the server published the cut but the answer was lost*: the next
//!   link sees the run's epoch published, written by its first round's
//!   epoch, and the rounds and the cut are released (a daemon that
//!   restarted meanwhile resyncs them instead);
//! - *the daemon dies*: every unreleased epoch becomes resync ranges; the
//!   next run's first round takes the server's staging over and vouches
//!   for every staged block by hash (the ordinary take-over), so what the
//!   dead run staged is published only where it matches the device;
//! - *a cut breaks* (a chunk could not be preserved): it is sent as one
//!   more round, read as the device is now, and another cut follows;
//! - *a seal comes from elsewhere*: a seal waiting for a FLUSH while a
//!   round is sealed cuts the next epoch instead (a round is no cut), and
//!   an ordinary epoch sealed during a round is sent as a round (above).
//!
//! A block a dead connection was still sending when a round resumed
//! could in theory land after a newer copy of it; a later round sends
//! every block written since, so it would have to outlive that round.
//!
//! The tests in `tests/precopy.rs` check this with a writer that never
//! stops: the first version the server publishes is the device after a
//! prefix of the writes, through all of the above.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ublk_mirror_common::block::{self, split, BLOCK};
use ublk_mirror_common::client::{Finish, Link, VolumeInfo};
use ublk_mirror_common::clock::now_ms;
use ublk_mirror_common::fsutil;
use ublk_mirror_common::hex::{self, encode as hex_encode};
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::proto::Writer;
use ublk_mirror_common::session::send::Held;
use ublk_mirror_common::session::Shipped;
use ublk_mirror_common::RangeSet;

use crate::blocking;
use crate::enrollment::Enrollment;
use crate::epoch::{EpochError, Sealed};
use crate::error::{Error, ErrorKind, Result};
use crate::tracking::{SealAt, Tracker};
use crate::yielding::{Activity, Ticket, Yielder};

/// Take a snapshot of `volume`'s published epoch on the server this
/// machine is enrolled with (`client_dir`), named `name` or after the
/// time; returns its name, epoch and the time that epoch was published.
pub fn take_snapshot(
    client_dir: &Path,
    volume: &str,
    name: Option<&str>,
) -> Result<(String, u64, u64)> {
    with_link(client_dir, async |link| link.snapshot(volume, name).await)
}

/// The snapshots of `volume` on the server this machine is enrolled with
/// (`client_dir`), oldest point in time first, and the server's note if
/// the list may lack some.
pub fn list_snapshots(
    client_dir: &Path,
    volume: &str,
) -> Result<ublk_mirror_common::client::SnapshotListing> {
    with_link(client_dir, async |link| link.list_snapshots(volume).await)
}

/// Run `ask` over a link to the server this machine is enrolled with
/// (`client_dir`), on a runtime of its own; the link is closed after.
fn with_link<T>(
    client_dir: &Path,
    ask: impl AsyncFnOnce(&Link) -> ublk_mirror_common::Result<T>,
) -> Result<T> {
    let enrollment = Enrollment::load(client_dir)?;
    let identity = crate::enrollment::load_identity(client_dir)?;
    let server = enrollment.server()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the network runtime", e))?;
    rt.block_on(async {
        let link = Link::connect(&identity, server, &enrollment.address).await?;
        let answer = ask(&link).await;
        link.close().await;
        answer
    })
    .map_err(Error::Mirror)
}

/// Make the device whose change tracking lives in `state_dir` the writer
/// of `volume` (of `size` bytes) on the server this machine is enrolled
/// with (`client_dir`), so that it goes on mirroring a volume another
/// device wrote (an instant restore with `--mirror`). The volume keeps its
/// history; the device that wrote it before is refused from then on.
///
/// The device's record of what the volume holds of its past is dropped
/// first, so that its first epoch compares the whole device with the
/// volume by hash (what travels is only what differs). Returns the
/// server epoch that holds the change; a device that is the writer
/// already changes nothing on the server.
///
/// Asked for, it is done: until the server took the change, a marker in
/// `state_dir` names the volume to take over, and the device's
/// replicator does that first, before anything of the device ships (a
/// restore started again where the mirror cannot be reached goes on, and
/// takes the volume over once it is filled and the mirror is back). Once
/// the server took it, a record says so until the fill is done: the same
/// restore run again asks nothing more (the volume's writer since may be
/// another restore's device, and stays so).
pub fn take_over(client_dir: &Path, volume: &str, size: u64, state_dir: &Path) -> Result<u64> {
    // Enrolled, before anything changes here.
    Enrollment::load(client_dir)?;
    if let Some(epoch) = take_over_later(state_dir, volume)? {
        return Ok(epoch);
    }
    let device = device_id(state_dir)?;
    let epoch = with_link(client_dir, async |link| {
        let info = link.open_volume(volume, size).await?;
        link.take_over(volume, info.writer, device).await
    })?;
    let done = TakeOver {
        volume: volume.to_string(),
        epoch: Some(epoch),
    };
    write_durably(&state_dir.join(TAKEN_OVER), &done.encode())?;
    fsutil::remove_durably(&state_dir.join(TAKE_OVER))
        .map_err(|e| Error::io("removing the take-over marker", e))?;
    Ok(epoch)
}

/// [`take_over`] without the server (known to be out of reach): what it
/// does here, and the take-over of `volume` marked to do (`None`), or the
/// server epoch of the take-over done before (`Some`: nothing to do).
pub fn take_over_later(state_dir: &Path, volume: &str) -> Result<Option<u64>> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| Error::io(format!("making {}", state_dir.display()), e))?;
    if let Some(done) = TakeOver::read(&state_dir.join(TAKEN_OVER))? {
        if done.volume == volume {
            return Ok(done.epoch);
        }
    }
    device_id(state_dir)?;
    // Until the fill is done this device must not mirror, whoever runs
    // it (`add --backing TARGET` too): its unfilled blocks are not the
    // disk yet.
    write_durably(&state_dir.join(RESTORING), b"")?;
    let asked = TakeOver {
        volume: volume.to_string(),
        epoch: None,
    };
    write_durably(&state_dir.join(TAKE_OVER), &asked.encode())?;
    Association::forget(state_dir)?;
    Ok(None)
}

/// In a device's state directory while taking a volume over was asked
/// for ([`take_over`]) and the server has not taken it yet: the
/// replicator does it first (only for the volume it names).
const TAKE_OVER: &str = "take-over";

/// In a device's state directory once the server took the volume over,
/// until the restore is filled ([`restore_filled`]).
const TAKEN_OVER: &str = "taken-over";

/// What [`TAKE_OVER`] and [`TAKEN_OVER`] hold, as JSON (format 1):
/// `{"volume":V}` to take over, `{"volume":V,"epoch":E}` taken over at
/// server epoch `E`. Written whole and durably (temporary file, rename).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TakeOver {
    volume: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
}

impl TakeOver {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The marker at `path`, if there is one.
    fn read(path: &Path) -> Result<Option<TakeOver>> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::JournalCorrupt {
                        path: path.to_path_buf(),
                        reason: format!("not a take-over marker: {e}"),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
}

/// In a device's state directory while it is an instant restore that
/// will mirror and is not yet filled ([`take_over`] makes it,
/// [`restore_filled`] removes it): its replicator does not ship.
const RESTORING: &str = "restoring";

/// The instant restore of the device whose state is in `state_dir` is
/// filled: it may mirror. Durable before it returns.
pub fn restore_filled(state_dir: &Path) -> Result<()> {
    fsutil::remove_durably(&state_dir.join(RESTORING))
        .map_err(|e| Error::io("removing the restore marker", e))?;
    // A later restore onto the same disk takes the volume over anew.
    fsutil::remove_durably(&state_dir.join(TAKEN_OVER))
        .map_err(|e| Error::io("removing the take-over record", e))
}

/// The blocks of `candidates` whose content at `epoch` differs from the
/// mirror's digests `theirs` (in the same order).
fn differing(
    tracker: &Tracker,
    epoch: u64,
    candidates: &[(u64, u32)],
    theirs: &[ublk_mirror_common::proto::Digest],
) -> Result<Vec<(u64, u32)>> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for (&(offset, len), their) in candidates.iter().zip(theirs) {
        buf.resize(len as usize, 0);
        tracker.read_epoch(epoch, offset, &mut buf)?;
        if block::digest(&buf) != *their {
            out.push((offset, len));
        }
    }
    Ok(out)
}

/// How a shipped epoch's blocks are read.
#[derive(Debug, Clone)]
enum Reading {
    /// As the device was at the epoch's cut, each block for the last time
    /// ([`Tracker::take_epoch`]): once read, its chunks are no longer kept
    /// for copy-on-write, so writes into them stop waiting. A block asked
    /// for again (the server lost it, or vouches for a dead run's copy) is
    /// refused and `again` set: the epoch then travels as a pre-copy round.
    TakeCut {
        /// Set when a block was asked for a second time.
        again: Arc<AtomicBool>,
    },
    /// At the cut where the epoch changed, as the device is now elsewhere
    /// (the cut that ends a pre-copy run).
    CutOrLive,
    /// As the device is now (a pre-copy round).
    Live,
}

/// The reader of epoch `epoch`'s blocks that a link sends from.
fn block_reader(
    tracker: Arc<Tracker>,
    epoch: u64,
    how: Reading,
    yielder: Option<Ticket>,
    sending: Arc<Sending>,
) -> impl Fn(u64, u32) -> ublk_mirror_common::Result<Vec<u8>> + Send + Sync + 'static {
    move |offset, len| {
        let buf = read_block(&tracker, epoch, &how, yielder.as_ref(), offset, len)?;
        sending.read(u64::from(len));
        Ok(buf)
    }
}

/// One block of [`block_reader`].
fn read_block(
    tracker: &Tracker,
    epoch: u64,
    how: &Reading,
    yielder: Option<&Ticket>,
    offset: u64,
    len: u32,
) -> ublk_mirror_common::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let read = match how {
        Reading::TakeCut { again } => {
            let read = tracker.take_epoch(epoch, offset, &mut buf);
            if let Err(Error::Epoch(EpochError::Taken { .. })) = &read {
                again.store(true, Ordering::SeqCst);
            }
            read
        }
        Reading::CutOrLive => tracker.read_cut_or_live(epoch, offset, &mut buf),
        Reading::Live => {
            if yielder.is_some_and(|y| !y.before_read(u64::from(len))) {
                return Err(ublk_mirror_common::Error::io(
                    format!("reading epoch {epoch} at {offset}"),
                    std::io::Error::other("the link it was read for is gone"),
                ));
            }
            tracker.read_live(offset, &mut buf)
        }
    };
    read.map_err(|e| {
        ublk_mirror_common::Error::io(
            format!("reading epoch {epoch} at {offset}"),
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(buf)
}

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a cut waits for a FLUSH (a point the file system made
/// durable) before it is taken anyway. Only a device that flushed since
/// the last cut is waited for ([`flush_wait`]): one that does not flush
/// would make every cut late by this much, and the mirror's lag with it.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The same when a `sync` is waiting for the cut.
const FORCED_FLUSH_WAIT: Duration = Duration::from_millis(250);

/// How long the journal regions a released epoch changed stay marked
/// while the device goes on writing ([`Tracker::release_keeping`]): a
/// write into them meanwhile needs no journal sync; a crash resyncs them.
const KEEP_MARKED: Duration = Duration::from_secs(10);

/// Dirty bytes that trigger a cut before the interval is over.
const DIRTY_TRIGGER: u64 = 256 << 20;

/// How to mirror a device.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// The volume on the server.
    pub volume: String,
    /// Where this machine's enrollment is.
    pub client_dir: PathBuf,
    /// Least time between cuts.
    pub interval: Duration,
    /// zstd level.
    pub zstd_level: i32,
    /// Bytes per second the mirror may use (`None`: no limit).
    pub bandwidth: Option<u64>,
    /// Epochs of at least this many bytes travel in pre-copy rounds
    /// (`None`: never); see the module docs.
    pub precopy: Option<u64>,
    /// Bytes per second a pre-copy round reads while the device is busy
    /// (0: full speed always); see [`crate::yielding`].
    pub min_rate: u64,
    /// The device's request count, to tell when it is busy (`None`: a
    /// pre-copy round never yields).
    pub activity: Option<Activity>,
    /// How long the mirror may be out of reach before the epochs sealed
    /// for it let go of their cuts ([`LET_GO_AFTER`]; see the module
    /// docs).
    pub let_go_after: Duration,
}

/// How long the mirror may be out of reach (counted from when the link
/// was found down) before the sealed epochs let go of their cuts.
pub const LET_GO_AFTER: Duration = Duration::from_secs(10);

/// The least time between a failed attempt to mirror and the next, even
/// when asked for a sync meanwhile (see [`MirrorStatus::failures`]).
pub const RETRY_FLOOR: Duration = Duration::from_secs(1);

/// What `status` shows about the mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// The volume.
    pub volume: String,
    /// The server's address.
    pub server: String,
    /// `connecting`, `connected`, or `disconnected`.
    pub link: String,
    /// The last failure of mirroring (the link, or the server refusing
    /// what was shipped): kept while it fails again and again, also
    /// across reconnections, and cleared once an epoch is published or
    /// nothing is left to ship.
    pub last_error: Option<String>,
    /// The epoch the server's image holds.
    pub server_epoch: u64,
    /// Age of the oldest change not yet on the mirror, ms (0: none).
    pub lag_ms: u64,
    /// Bytes changed and not yet on the mirror.
    pub bytes_behind: u64,
    /// Bytes per second of the last epoch shipped.
    pub throughput_bps: u64,
    /// Bytes on the wire for the last epoch (after compression).
    pub last_wire_bytes: u64,
    /// Epochs shipped by this daemon.
    pub epochs_shipped: u64,
    /// Bytes on the wire for all of them.
    pub wire_bytes_total: u64,
    /// Bytes a resync found already equal on the mirror (not sent).
    pub resync_same_bytes: u64,
    /// Bytes the server held already from an interrupted attempt at an
    /// epoch (not sent again).
    #[serde(default)]
    pub resumed_bytes: u64,
    /// Bytes the server held already as chunks of this client's volumes
    /// (sent as their digests only).
    #[serde(default)]
    pub known_bytes: u64,
    /// Pre-copy rounds staged on the server and not yet published (0: no
    /// pre-copy run in progress).
    #[serde(default)]
    pub precopy_rounds: u64,
    /// Whether pre-copy reads are held to the minimum rate now, the
    /// device being busy ([`crate::yielding`]).
    #[serde(default)]
    pub yielding: bool,
    /// Milliseconds of pre-copy reading held to the minimum rate so far
    /// (the time the bytes read while the device was busy take at that
    /// rate).
    #[serde(default)]
    pub yielded_ms: u64,
    /// Sealed epochs that let go of their cuts because the mirror was out
    /// of reach too long (sent as pre-copy rounds instead).
    #[serde(default)]
    pub cuts_let_go: u64,
    /// Bytes of the epoch (or pre-copy round) being sent now, 0 when none
    /// is: with [`MirrorStatus::sending_done`], the progress of one
    /// epoch, where `bytes_behind` only falls once it is published (a
    /// first sync's rounds and cut all at once).
    #[serde(default)]
    pub sending_bytes: u64,
    /// How much of [`MirrorStatus::sending_bytes`] has been read and sent.
    #[serde(default)]
    pub sending_done: u64,
    /// Times mirroring failed and was tried again (the link lost, the
    /// server refused) since the daemon started: retries come at most
    /// once a second ([`RETRY_FLOOR`]), however often `sync` asks.
    #[serde(default)]
    pub failures: u64,
}

/// How far the epoch being sent has got: its size and what of it was
/// read, bumped by the block readers of its data streams.
#[derive(Debug, Default)]
struct Sending {
    bytes: AtomicU64,
    done: AtomicU64,
}

impl Sending {
    /// An epoch of `bytes` is being sent until the guard goes (however
    /// its send ends: done, failed or dropped).
    fn start(&self, bytes: u64) -> SendingGuard<'_> {
        self.done.store(0, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        SendingGuard(self)
    }

    fn read(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (size, done), the done part never above the size (a block asked
    /// for again is read twice).
    fn now(&self) -> (u64, u64) {
        let bytes = self.bytes.load(Ordering::Relaxed);
        (bytes, self.done.load(Ordering::Relaxed).min(bytes))
    }
}

/// See [`Sending::start`]: nothing is being sent once it is dropped.
struct SendingGuard<'a>(&'a Sending);

impl Drop for SendingGuard<'_> {
    fn drop(&mut self) {
        self.0.bytes.store(0, Ordering::Relaxed);
        self.0.done.store(0, Ordering::Relaxed);
    }
}

/// Says whether the replicator must still wait before it connects (an
/// instant restore's fill that is not done: the device is not yet what
/// it will be, and its first epoch compares it whole with the mirror).
pub type Hold = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the control socket may ask of a device's replicator: a cut now,
/// and whether epochs sealed now would ship as versions.
#[derive(Debug, Clone)]
pub struct Handle {
    kick: Arc<tokio::sync::Notify>,
    started: Arc<AtomicBool>,
    filling: Arc<AtomicBool>,
}

impl Handle {
    /// Ask for a cut now.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Whether an epoch sealed now ships as a version of the device.
    /// Not yet for an instant restore before its first epoch (which
    /// compares the whole device with the mirror) is open: an epoch sealed
    /// before it would publish the old image plus a few writes, a disk
    /// that never was.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Whether the replicator waits for an instant restore's fill (or,
    /// started as an ordinary device on an unfilled restore, for the
    /// restore to be run again).
    pub fn filling(&self) -> bool {
        self.filling.load(Ordering::SeqCst)
    }
}

/// A running replicator; stops when dropped.
#[derive(Debug)]
pub struct Replicator {
    tracker: Arc<Tracker>,
    /// How pre-copy reads give way to the device, if they do.
    yielder: Option<Yielder>,
    /// How far the epoch being sent has got.
    sending: Arc<Sending>,
    status: Arc<Mutex<MirrorStatus>>,
    kick: Arc<tokio::sync::Notify>,
    /// See [`Handle::started`].
    started: Arc<AtomicBool>,
    /// See [`Handle::filling`].
    filling: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stopped: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replicator {
    /// Start mirroring `tracker`'s device per `settings`. Fails only if this
    /// machine is not enrolled; the network is never waited for here.
    pub fn start(tracker: Arc<Tracker>, settings: MirrorSettings) -> Result<Replicator> {
        Self::start_held(tracker, settings, None)
    }

    /// [`Replicator::start`], connecting only once `hold` says no more
    /// (checked every second); writes meanwhile collect in the current
    /// epoch, and nothing is cut.
    pub fn start_held(
        tracker: Arc<Tracker>,
        settings: MirrorSettings,
        hold: Option<Hold>,
    ) -> Result<Replicator> {
        let enrollment = Enrollment::load(&settings.client_dir)?;
        let identity = crate::enrollment::load_identity(&settings.client_dir)?;
        let server = enrollment.server()?;
        let status = Arc::new(Mutex::new(MirrorStatus {
            volume: settings.volume.clone(),
            server: enrollment.address.clone(),
            link: "connecting".into(),
            ..MirrorStatus::default()
        }));
        let kick = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(tokio::sync::Notify::new());
        let started = Arc::new(AtomicBool::new(false));
        let filling = Arc::new(AtomicBool::new(
            hold.is_some() || tracker.state_dir().join(RESTORING).exists(),
        ));
        let device = device_id(tracker.state_dir())?;
        let yielder = settings
            .activity
            .clone()
            .filter(|_| settings.min_rate > 0)
            .map(|a| Yielder::new(settings.min_rate, a));
        let sending = Arc::new(Sending::default());
        let ctx = Context {
            yielder: yielder.clone(),
            sending: sending.clone(),
            device,
            tracker: tracker.clone(),
            settings,
            identity,
            server,
            address: enrollment.address,
            status: status.clone(),
            kick: kick.clone(),
            stop: stop.clone(),
            stopped: stopped.clone(),
            hold,
            started: started.clone(),
            filling: filling.clone(),
            run: Mutex::new(None),
            own_cuts: Mutex::new(Vec::new()),
        };
        let thread = std::thread::Builder::new()
            .name("replicator".into())
            .spawn(move || {
                // This thread and the blocking ones it hashes and
                // compresses on yield the CPU to the device's I/O.
                crate::system::lower_this_thread(crate::system::REPLICATOR_NICE);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_start(|| {
                        crate::system::lower_this_thread(crate::system::REPLICATOR_NICE)
                    })
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("replicator cannot start: {e}");
                        return;
                    }
                };
                rt.block_on(ctx.run());
            })
            .map_err(|e| Error::io("starting the replicator thread", e))?;
        Ok(Replicator {
            tracker,
            yielder,
            sending,
            status,
            kick,
            stop,
            stopped,
            started,
            filling,
            thread: Some(thread),
        })
    }

    /// The mirror's state now.
    pub fn status(&self) -> MirrorStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let t = self.tracker.status();
        s.bytes_behind = t.dirty_bytes + t.zeroed_bytes + t.resync_bytes;
        s.lag_ms = self
            .tracker
            .oldest_change_ms()
            .map_or(0, |t| now_ms().saturating_sub(t));
        if let Some(y) = &self.yielder {
            s.yielding = y.busy();
            s.yielded_ms = y.held().as_millis() as u64;
        }
        (s.sending_bytes, s.sending_done) = self.sending.now();
        s
    }

    /// Ask for a cut now (a `sync` waits for everything written before it).
    pub fn kick(&self) -> Arc<tokio::sync::Notify> {
        self.kick.clone()
    }

    /// What the control socket needs of it.
    pub fn handle(&self) -> Handle {
        Handle {
            kick: self.kick.clone(),
            started: self.started.clone(),
            filling: self.filling.clone(),
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(y) = &self.yielder {
            y.call_off();
        }
        self.kick.notify_one();
        // A transfer in progress is abandoned (a permit is kept if none is).
        self.stopped.notify_one();
        if let Some(t) = self.thread.take() {
            // The thread checks the flag at every wait; a transfer in
            // progress is abandoned (the epoch stays unreleased, its
            // regions marked).
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("the replicator did not stop in time; leaving it");
            }
        }
    }
}

struct Context {
    /// This device's id (made once, kept in its state directory).
    device: [u8; 16],
    /// How pre-copy reads give way to the device, if they do.
    yielder: Option<Yielder>,
    /// How far the epoch being sent has got (shown by `status`).
    sending: Arc<Sending>,
    tracker: Arc<Tracker>,
    settings: MirrorSettings,
    identity: Identity,
    server: ublk_mirror_common::identity::Fingerprint,
    address: String,
    status: Arc<Mutex<MirrorStatus>>,
    kick: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    /// Told when the replicator stops.
    stopped: Arc<tokio::sync::Notify>,
    /// Wait while it says so.
    hold: Option<Hold>,
    /// See [`Handle::started`].
    started: Arc<AtomicBool>,
    /// See [`Handle::filling`].
    filling: Arc<AtomicBool>,
    /// The pre-copy run in progress, if any.
    run: Mutex<Option<Run>>,
    /// The ordinary epochs this replicator sealed (cuts of its own, not
    /// `ublk-mirror epoch seal`'s): those it may let go of.
    own_cuts: Mutex<Vec<u64>>,
}

/// A pre-copy run in progress (see the module docs): rounds staged on
/// the server as one epoch, not yet published.
#[derive(Debug, Clone)]
struct Run {
    /// The server's epoch being staged.
    remote: u64,
    /// The writer's epoch the server knows the staging by: the first
    /// round's.
    first: u64,
    /// Local epochs staged as rounds, oldest first.
    rounds: Vec<u64>,
    /// The bytes they sent.
    held: RangeSet,
    /// Bytes the last round changed: a next round must be much smaller to
    /// be worth it.
    last_bytes: u64,
    /// The tracker's current epoch when the last round was staged: an
    /// epoch sealed before it was sealed while a round was still read, so
    /// it cannot be the cut that ends the run (it is sent as a round).
    min_cut: u64,
    /// The cut sent to end the run, once sent: if the server published it
    /// but the answer was lost, the rounds and it are released.
    cut: Option<u64>,
    /// The server address the rounds were staged on: tried first, and if
    /// the run goes on elsewhere, what that server holds of it is not
    /// trusted (it may be an older round's copy).
    server: Option<std::net::SocketAddr>,
}

/// Most pre-copy rounds before the cut that ends a run.
const MAX_ROUNDS: usize = 6;

/// A pre-copy run ends with a cut once the changes since the last round
/// are at most this part of the pre-copy threshold (or stop halving).
const FINAL_CUT_PART: u64 = 8;

impl Context {
    fn set(&self, f: impl FnOnce(&mut MirrorStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleep up to `d`, woken early by a kick once `floor` has passed (after
    /// a failure [`RETRY_FLOOR`]: a `sync` waiting asks every 50 ms, and a
    /// server that refuses, its disk full say, is not asked twenty times a
    /// second). False when stopping.
    async fn pause_at_least(&self, d: Duration, floor: Duration) -> bool {
        let start = tokio::time::Instant::now();
        let floor = start + d.min(floor);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(start + d) => return !self.stopping(),
                () = self.kick.notified() => {
                    if self.stopping() {
                        return false;
                    }
                    if tokio::time::Instant::now() >= floor {
                        return true;
                    }
                }
            }
        }
    }

    /// Sleep up to `d`, woken early by a kick; false when stopping.
    async fn pause(&self, d: Duration) -> bool {
        self.pause_at_least(d, Duration::ZERO).await
    }

    async fn run(self) {
        if let Some(hold) = &self.hold {
            if hold() {
                tracing::info!("mirroring starts when every block is local");
                self.set(|s| s.link = "waiting for the fill".into());
            }
            while hold() {
                if !self.pause(Duration::from_secs(1)).await {
                    return;
                }
            }
            self.filling.store(false, Ordering::SeqCst);
            let dir = self.tracker.state_dir().to_path_buf();
            if let Err(e) = blocking("a replicator worker", move || restore_filled(&dir)).await {
                tracing::error!("mirroring cannot start: {e}");
                self.set(|s| s.last_error = Some(e.to_string()));
                return;
            }
        } else if self.tracker.state_dir().join(RESTORING).exists() {
            let why = "this disk is an instant restore that is not filled yet: run the same \
                       `ublk-mirror restore --instant --mirror` again to finish it (or \
                       `ublk-mirror recover N` if its device is still there); it mirrors then";
            tracing::error!("not mirroring: {why}");
            self.set(|s| {
                s.link = "not filled".into();
                s.last_error = Some(why.into());
            });
            while self.tracker.state_dir().join(RESTORING).exists() {
                if !self.pause(Duration::from_secs(5)).await {
                    return;
                }
            }
            self.filling.store(false, Ordering::SeqCst);
        } else if !self.tracker.state_dir().join(TAKE_OVER).exists() {
            // No whole-device comparison to wait for: what is sealed from
            // now on ships as it is. (A take-over still to do drops the
            // device's past: the session starts after it.)
            self.started.store(true, Ordering::SeqCst);
        }
        let mut backoff = Backoff::default();
        // Since when the mirror is out of reach, and whether the cuts were
        // let go of since.
        let mut down_since: Option<Instant> = None;
        let mut let_go = false;
        while !self.stopping() {
            if !let_go && down_since.is_some_and(|t| t.elapsed() >= self.settings.let_go_after) {
                self.let_go_of_cuts().await;
                let_go = true;
            }
            self.set(|s| s.link = "connecting".into());
            let mut connected = false;
            let ended = self.session(&mut connected).await;
            // The link got somewhere (an epoch shipped, or nothing left to
            // ship) since the last failure: that failure's error is gone.
            // A link that comes up and is refused at once did not.
            let progressed = connected
                && self
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last_error
                    .is_none();
            // Readers of a round still sleeping for the device read no
            // more: their link is gone.
            if let Some(y) = &self.yielder {
                y.call_off();
            }
            let Err(e) = ended else {
                return;
            };
            if connected || down_since.is_none() {
                down_since = Some(Instant::now());
                let_go = false;
            }
            let mut wait = backoff.after(e.kind(), progressed);
            if let (false, Some(t)) = (let_go, down_since) {
                // Not past the time to let go of the cuts.
                wait = wait.min(self.settings.let_go_after.saturating_sub(t.elapsed()));
            }
            match e.kind() {
                ErrorKind::Link => {
                    tracing::warn!(server = %self.address, "mirror link down: {e}; retrying in {wait:?}")
                }
                _ => {
                    tracing::error!(server = %self.address, "mirroring stopped: {e}; trying again in {wait:?}")
                }
            }
            self.set(|s| {
                s.link = "disconnected".into();
                s.last_error = Some(e.to_string());
                s.failures += 1;
            });
            if !self.pause_at_least(wait, RETRY_FLOOR).await {
                return;
            }
        }
    }

    /// The mirror has been out of reach for [`MirrorSettings::let_go_after`]:
    /// every ordinary epoch it sealed becomes a pre-copy round
    /// ([`Tracker::demote`]), so that writes into the blocks the link had
    /// not read stop waiting for copy-on-write while the mirror is away.
    /// Once it is back, they travel as the first round of a pre-copy run
    /// and a new cut ends it (see the module docs).
    async fn let_go_of_cuts(&self) {
        // An epoch sealed by `ublk-mirror epoch seal` (at a point the user
        // chose, an fsfreeze say) keeps its cut: the mirror's version of it
        // is that point.
        let ids: Vec<u64> = {
            let sealed = self.tracker.sealed_epochs();
            let mut own = self.own_cuts_lock();
            own.retain(|id| sealed.iter().any(|(s, _)| s == id));
            sealed
                .iter()
                .filter(|&&(id, precopy)| !precopy && own.contains(&id))
                .map(|&(id, _)| id)
                .collect()
        };
        let tracker = self.tracker.clone();
        let let_go = blocking("a replicator worker", move || {
            for &id in &ids {
                tracker.demote(id)?;
            }
            Ok(ids)
        })
        .await;
        match let_go {
            Ok(ids) if ids.is_empty() => {}
            Ok(ids) => {
                tracing::info!(
                    epochs = ?ids,
                    "the mirror is out of reach: the sealed epochs let go of their cuts (writes no longer wait for copy-on-write); they travel as a pre-copy round once it is back"
                );
                self.set(|s| s.cuts_let_go += ids.len() as u64);
            }
            Err(e) => tracing::error!("letting go of the sealed epochs' cuts: {e}"),
        }
    }

    fn own_cuts_lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.own_cuts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check that the volume holds this device's past; if it cannot be
    /// trusted to (a new volume, another server, an image older than what
    /// it confirmed), the whole device is shipped again.
    async fn associate(&self, info: &VolumeInfo) -> Result<()> {
        let dir = self.tracker.state_dir().to_path_buf();
        let here = Association {
            format: 1,
            server: hex_encode(&self.server.0),
            volume: self.settings.volume.clone(),
            uuid: hex_encode(&info.uuid),
            confirmed_epoch: info.published_epoch,
        };
        match trust(&here, info, self.device, Association::load(&dir).as_ref())? {
            Trust::Trusted => Ok(()),
            Trust::ShipAll => {
                tracing::warn!(
                    volume = %self.settings.volume,
                    "the mirror does not hold this device's past (new volume, other server, or an older image): shipping the whole device (zero blocks as holes)"
                );
                let tracker = self.tracker.clone();
                blocking("a replicator worker", move || tracker.resync_all()).await?;
                here.save(&dir)
            }
        }
    }

    /// One connection's life: ship epochs until stopped or the link fails.
    async fn session(&self, connected: &mut bool) -> Result<()> {
        let staged_on = self.run_lock().as_ref().and_then(|r| r.server);
        // A stop does not wait for a connection attempt (up to 10 s on a
        // slow or dead link).
        let connecting =
            Link::connect_preferring(&self.identity, self.server, &self.address, staged_on);
        let mut link = tokio::select! {
            link = connecting => link.map_err(Error::Mirror)?,
            () = self.stopped.notified() => return Ok(()),
        };
        link.set_bandwidth(self.settings.bandwidth);
        let size = self.tracker.device_size();
        let mut info = link
            .open_volume(&self.settings.volume, size)
            .await
            .map_err(Error::Mirror)?;
        let take_over = self.tracker.state_dir().join(TAKE_OVER);
        if let Some(asked) = TakeOver::read(&take_over)? {
            // Asked for where the mirror could not be reached: done
            // before anything of this device ships; only of the volume
            // the restore named.
            if asked.volume != self.settings.volume {
                return Err(Error::InvalidConfig(format!(
                    "this disk was restored to take volume {} over, not {}: mirror it to {} (or remove {} to mirror it to another volume as a new device would)",
                    asked.volume,
                    self.settings.volume,
                    asked.volume,
                    take_over.display()
                )));
            }
            let epoch = link
                .take_over(&self.settings.volume, info.writer, self.device)
                .await
                .map_err(Error::Mirror)?;
            blocking("a replicator worker", move || {
                fsutil::remove_durably(&take_over)
                    .map_err(|e| Error::io("removing the take-over marker", e))
            })
            .await?;
            tracing::info!(
                volume = %self.settings.volume,
                epoch,
                "this device took the volume over (asked while the mirror could not be reached)"
            );
            info = link
                .open_volume(&self.settings.volume, size)
                .await
                .map_err(Error::Mirror)?;
        }
        *connected = true;
        self.associate(&info).await?;
        // A restore's first epoch (the whole device, compared) is open now.
        self.started.store(true, Ordering::SeqCst);
        tracing::info!(
            volume = %self.settings.volume,
            server = %self.address,
            server_epoch = info.published_epoch,
            "mirror link up"
        );
        self.set(|s| {
            // last_error stays until this link gets somewhere: a server
            // that takes the link and then refuses every epoch is failing.
            s.link = "connected".into();
            s.server_epoch = info.published_epoch;
        });
        let mut last_cut = Instant::now();
        // A `sync` asked for a cut now.
        let mut forced = false;
        loop {
            if self.stopping() {
                link.close().await;
                return Ok(());
            }
            let run = self.current_run(&info, &self.tracker.sealed_epochs())?;
            let sealed = self.tracker.sealed_epochs();
            let next = sealed
                .iter()
                .find(|(id, _)| run.as_ref().is_none_or(|r| !r.rounds.contains(id)))
                .copied();
            let (epoch, round) = match (next, &run) {
                (Some((id, precopy)), _) => (id, precopy || run.is_some()),
                (None, Some(r)) => {
                    // Every round is staged: another round while the
                    // changes since shrink, else the cut that ends the run.
                    let bytes = self.tracker.current_change_bytes();
                    let final_cut = self.settings.precopy.unwrap_or(0) / FINAL_CUT_PART;
                    let again = bytes > final_cut
                        && r.rounds.len() < MAX_ROUNDS
                        && bytes < r.last_bytes / 2;
                    // Nothing written since the last round: its reads are
                    // the device now, and the cut need not wait for a FLUSH.
                    let at = if bytes == 0 {
                        SealAt::Now
                    } else {
                        SealAt::flush_within(flush_wait(
                            FLUSH_WAIT,
                            self.tracker.flushed_since_cut(),
                        ))
                    };
                    let tracker = self.tracker.clone();
                    let id = blocking("a replicator worker", move || {
                        if again {
                            tracker.seal_precopy()
                        } else {
                            tracker.seal(at)
                        }
                    })
                    .await?;
                    if !again {
                        self.own_cuts_lock().push(id);
                    }
                    last_cut = Instant::now();
                    (id, true)
                }
                (None, None) => {
                    let cut = Cut::decide(
                        Instant::now(),
                        last_cut,
                        self.settings.interval,
                        self.tracker.status().dirty_bytes,
                        self.tracker.has_changes(),
                        self.tracker.flushed_since_cut(),
                        forced,
                    );
                    forced = false;
                    let flush_wait = match cut {
                        Cut::Wait(wait) => {
                            // Nothing left to ship: no failure stands.
                            self.set(|s| s.last_error = None);
                            tokio::select! {
                                () = tokio::time::sleep(wait) => {}
                                () = self.kick.notified() => forced = true,
                                e = link.closed() => return Err(Error::Mirror(e)),
                            }
                            continue;
                        }
                        Cut::Seal { flush_wait } => flush_wait,
                    };
                    last_cut = Instant::now();
                    // A big epoch (a first sync, a resync) is not frozen
                    // under copy-on-write: it travels in pre-copy rounds.
                    let precopy = self
                        .settings
                        .precopy
                        .is_some_and(|min| self.tracker.current_change_bytes() >= min);
                    let tracker = self.tracker.clone();
                    let id = blocking("a replicator worker", move || {
                        if precopy {
                            tracker.seal_precopy()
                        } else {
                            tracker.seal(SealAt::flush_within(flush_wait))
                        }
                    })
                    .await?;
                    if !precopy {
                        self.own_cuts_lock().push(id);
                    }
                    (id, precopy)
                }
            };
            // Another seal (`ublk-mirror epoch seal`, a FLUSH that carried
            // out a seal asked for earlier) may have come between the look
            // at the sealed epochs and this one's: the oldest unshipped
            // epoch always goes first, or a version would hold a later
            // epoch's writes without an earlier one's.
            let skipped = self
                .tracker
                .sealed_epochs()
                .iter()
                .any(|(e, _)| *e < epoch && run.as_ref().is_none_or(|r| !r.rounds.contains(e)));
            if skipped {
                continue;
            }
            // A stop abandons the transfer (the epoch stays sealed and its
            // regions marked; the server keeps what it staged).
            let shipping = async {
                if round {
                    self.ship_round(&link, &mut info, epoch, size).await
                } else {
                    self.ship(&link, &mut info, epoch, size).await
                }
            };
            tokio::select! {
                shipped = shipping => shipped?,
                () = self.stopped.notified() => {
                    link.close().await;
                    return Ok(());
                }
            }
        }
    }

    /// Ship sealed epoch `epoch` (or release it, if the server has it),
    /// then release it.
    async fn ship(&self, link: &Link, info: &mut VolumeInfo, epoch: u64, size: u64) -> Result<()> {
        let me = Writer {
            device: self.device,
            epoch,
        };
        let sealed = self.tracker.epoch(epoch)?;
        let holes = self.fresh_holes(info, epoch, &sealed).await?;
        let (mut blocks, candidates, unknown, fresh, skipped) =
            match plan(info, me, &sealed, size, &holes) {
                // Published before the link broke (the server says whose
                // epoch its image holds), or no longer readable as its cut
                // (its changes move into the current epoch as resync ranges).
                Plan::AlreadyPublished => {
                    // Confirmed before its regions go, as after an answer.
                    self.confirm(info.published_epoch).await?;
                    return self.release(epoch).await;
                }
                Plan::Broken => return self.release(epoch).await,
                Plan::Ship {
                    blocks,
                    candidates,
                    unknown,
                    fresh,
                    skipped,
                } => (blocks, candidates, unknown, fresh, skipped),
            };
        if skipped > 0 {
            tracing::info!(
                epoch,
                skipped,
                "first sync: holes of the device are not read nor sent (the new volume is zeroes there)"
            );
        }
        match self
            .add_differing(link, epoch, &mut blocks, candidates, unknown)
            .await
        {
            Ok(()) => {}
            Err(Error::Epoch(EpochError::Taken { .. })) => {
                // A retry: blocks found different last time were read
                // then, and their cut is no longer kept, so they cannot be
                // compared again as the cut. As for a block asked for
                // again: a pre-copy round, read as the device is now, and
                // a new cut follows (retrying as it was failed for good).
                return self.goes_as_round(
                    epoch,
                    "blocks compared and read before the link broke are no longer kept as the cut",
                );
            }
            Err(e) => return Err(e),
        }
        let remote = info.published_epoch + 1;
        let started = Instant::now();
        // On failure the server may have published it all the same: the
        // next session sees it as the image's writer.
        let again = Arc::new(AtomicBool::new(false));
        let reading = Reading::TakeCut {
            again: again.clone(),
        };
        let sending = self
            .sending
            .start(blocks.iter().map(|&(_, l)| u64::from(l)).sum());
        let sent = link
            .send_epoch(
                &self.settings.volume,
                remote,
                me,
                &blocks,
                self.settings.zstd_level,
                block_reader(
                    self.tracker.clone(),
                    epoch,
                    reading,
                    None,
                    self.sending.clone(),
                ),
            )
            .await;
        drop(sending);
        let shipped = match sent {
            Ok(shipped) => shipped,
            Err(e) if again.load(Ordering::SeqCst) => {
                // Blocks read once were asked for again: their cut is no
                // longer kept. What the server staged stays (it is the
                // cut's); the epoch goes on as a pre-copy round, read as
                // the device is now, and a new cut follows (module docs).
                return self.goes_as_round(
                    epoch,
                    &format!("blocks already read were asked for again ({e})"),
                );
            }
            Err(e) => return Err(Error::Mirror(e)),
        };
        if fresh {
            // Zero blocks of a fresh volume are what a resync by hash
            // would have found the same.
            self.set(|s| s.resync_same_bytes += shipped.zero_bytes + skipped);
        }
        info.published_epoch = remote;
        info.writer = Some(me);
        self.confirm(remote).await?;
        // The status first: whoever sees the epoch released sees its
        // figures.
        self.count_shipped(&shipped, started);
        self.set(|s| {
            s.server_epoch = remote;
            s.epochs_shipped += 1;
            s.last_error = None;
        });
        self.release(epoch).await?;
        // The epoch's buffers are free now: give them back, so that an
        // idle daemon is small again after a big epoch.
        crate::system::return_free_memory();
        tracing::debug!(
            epoch,
            remote,
            blocks = blocks.len(),
            bytes = shipped.bytes,
            wire = shipped.wire_bytes,
            known = shipped.known_bytes,
            "epoch mirrored"
        );
        Ok(())
    }

    /// Ordinary epoch `epoch` can no longer be read as its cut (`why`):
    /// it goes on as a pre-copy round, read as the device is now, and a new
    /// cut follows (module docs).
    fn goes_as_round(&self, epoch: u64, why: &str) -> Result<()> {
        tracing::info!(
            epoch,
            "{why}: the epoch goes as a pre-copy round, then a new cut"
        );
        self.tracker.demote(epoch)
    }

    /// Release `epoch` (see [`Tracker::release_keeping`]) off this thread:
    /// its sync of the backing file can take long under write-back
    /// pressure, and this thread drives the link (no ACKs or keep-alives
    /// would go meanwhile, and the server would drop it).
    async fn release(&self, epoch: u64) -> Result<()> {
        let tracker = self.tracker.clone();
        blocking("releasing an epoch", move || {
            tracker.release_keeping(epoch, KEEP_MARKED).map(drop)
        })
        .await
    }

    /// Record that the server published `epoch` (`mirror.json`, synced),
    /// off this thread as [`Self::release`] is.
    async fn confirm(&self, epoch: u64) -> Result<()> {
        let dir = self.tracker.state_dir().to_path_buf();
        blocking("recording the published epoch", move || {
            Association::confirm(&dir, epoch)
        })
        .await
    }

    /// For a fresh volume (zeroes), what `sealed` changed that is a hole
    /// at its cut: it need not travel, nor be read (a sparse disk's first
    /// sync reads its data only). Nothing otherwise.
    async fn fresh_holes(
        &self,
        info: &VolumeInfo,
        epoch: u64,
        sealed: &Sealed,
    ) -> Result<RangeSet> {
        if !fresh(info) || sealed.broken.is_some() {
            return Ok(RangeSet::new());
        }
        let changed = sealed.changes.touched();
        let tracker = self.tracker.clone();
        blocking("a replicator worker", move || {
            tracker.holes_at_cut(epoch, &changed)
        })
        .await
    }

    /// Add to `blocks` those of `candidates` (ranges of unknown change,
    /// `unknown` bytes) whose content at epoch `epoch` differs from the
    /// mirror's image, by hash; what is the same is counted as such.
    async fn add_differing(
        &self,
        link: &Link,
        epoch: u64,
        blocks: &mut Vec<(u64, u32)>,
        candidates: Vec<(u64, u32)>,
        unknown: u64,
    ) -> Result<()> {
        if candidates.is_empty() {
            return Ok(());
        }
        let theirs = link
            .hashes(&self.settings.volume, &candidates)
            .await
            .map_err(Error::Mirror)?;
        let tracker = self.tracker.clone();
        let differ = blocking("a replicator worker", move || {
            differing(&tracker, epoch, &candidates, &theirs)
        })
        .await?;
        let same = unknown - differ.iter().map(|&(_, l)| u64::from(l)).sum::<u64>();
        blocks.extend(differ);
        blocks.sort_unstable();
        tracing::info!(
            epoch,
            compared = unknown,
            same,
            "resync: only blocks that differ from the mirror travel"
        );
        self.set(|s| s.resync_same_bytes += same);
        Ok(())
    }

    /// What an epoch (or a round) shipped, since `started`, into the status.
    fn count_shipped(&self, shipped: &Shipped, started: Instant) {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        self.set(|s| {
            s.throughput_bps = (shipped.bytes as f64 / secs) as u64;
            s.last_wire_bytes = shipped.wire_bytes;
            s.wire_bytes_total += shipped.wire_bytes;
            s.resumed_bytes += shipped.resumed_bytes;
            s.known_bytes += shipped.known_bytes;
        });
    }

    fn run_lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pre-copy run in progress, unless the server or the tracker
    /// moved on without it (the server published its epoch, or its
    /// rounds were released): then it is forgotten, and what is still
    /// sealed travels again (a first round of a published run finds
    /// itself published and is released).
    fn current_run(&self, info: &VolumeInfo, sealed: &[(u64, bool)]) -> Result<Option<Run>> {
        let mut run = self.run_lock();
        let me = |r: &Run| Writer {
            device: self.device,
            epoch: r.first,
        };
        let published = run.as_ref().is_some_and(|r| {
            r.cut.is_some() && info.published_epoch == r.remote && info.writer == Some(me(r))
        });
        if published {
            // The run was published, the answer lost: all of it is there.
            if let Some(r) = run.take() {
                tracing::info!(
                    remote = r.remote,
                    "the pre-copy run was published before the link broke"
                );
                Association::confirm(self.tracker.state_dir(), r.remote)?;
                for id in r.rounds.iter().copied().chain(r.cut) {
                    self.tracker.release_keeping(id, KEEP_MARKED)?;
                }
            }
            self.set(|s| s.precopy_rounds = 0);
            return Ok(None);
        }
        let stale = run.as_ref().is_some_and(|r| {
            r.remote != info.published_epoch + 1
                || sealed.first().map(|s| s.0) != Some(r.first)
                || !r.rounds.iter().all(|id| sealed.iter().any(|s| s.0 == *id))
        });
        if stale {
            tracing::info!("the server or the device moved on: the pre-copy run begins again");
            *run = None;
        }
        self.set(|s| s.precopy_rounds = run.as_ref().map_or(0, |r| r.rounds.len() as u64));
        Ok(run.clone())
    }

    /// Ship sealed epoch `epoch` as a round of the pre-copy run (which it
    /// begins, if none is in progress): a pre-copy epoch, read as the
    /// device is now, is kept staged on the server; a cut (an ordinary
    /// epoch) ends the run, and the server publishes every round and the
    /// cut as one epoch. Then the rounds and the cut are released.
    async fn ship_round(
        &self,
        link: &Link,
        info: &mut VolumeInfo,
        epoch: u64,
        size: u64,
    ) -> Result<()> {
        let sealed = self.tracker.epoch(epoch)?;
        let mut run = self.run_lock().clone().unwrap_or_else(|| Run {
            remote: info.published_epoch + 1,
            first: epoch,
            rounds: Vec::new(),
            held: RangeSet::new(),
            last_bytes: u64::MAX,
            min_cut: 0,
            cut: None,
            server: None,
        });
        let me = Writer {
            device: self.device,
            epoch: run.first,
        };
        // A cut that broke, or that was sealed while a round was still
        // read (its cut is before reads of that round), is sent as one more
        // round (read as the device is now), and another cut follows.
        let finish = if sealed.precopy || sealed.broken.is_some() || epoch < run.min_cut {
            Finish::Round
        } else {
            Finish::Publish
        };
        if finish == Finish::Round && !sealed.precopy {
            self.tracker.demote(epoch)?;
        }
        run.cut = (finish == Finish::Publish).then_some(epoch);
        *self.run_lock() = Some(run.clone()).filter(|r| !r.rounds.is_empty() || r.cut.is_some());
        let first_round = run.rounds.is_empty();
        let (blocks, skipped) = if first_round {
            // As an ordinary epoch: the holes of a fresh volume stay
            // behind, ranges of unknown change go where they differ (a
            // first round is a pre-copy epoch, which never breaks).
            let holes = self.fresh_holes(info, epoch, &sealed).await?;
            match plan(info, me, &sealed, size, &holes) {
                Plan::AlreadyPublished => {
                    *self.run_lock() = None;
                    self.confirm(info.published_epoch).await?;
                    return self.release(epoch).await;
                }
                Plan::Broken => {
                    *self.run_lock() = None;
                    return self.release(epoch).await;
                }
                Plan::Ship {
                    mut blocks,
                    candidates,
                    unknown,
                    skipped,
                    ..
                } => {
                    self.add_differing(link, epoch, &mut blocks, candidates, unknown)
                        .await?;
                    (blocks, skipped)
                }
            }
        } else {
            // A later round: every change travels (a hole or a block the
            // mirror's image has may be staged otherwise by an earlier
            // round).
            (split(&sealed.changes.touched(), size), 0)
        };
        let here = link.server_address();
        let held = (!first_round).then(|| Held {
            ranges: run.held.clone(),
            here: run.server == Some(here),
        });
        let bytes = blocks.iter().map(|&(_, l)| u64::from(l)).sum::<u64>();
        tracing::info!(
            epoch,
            round = run.rounds.len() + 1,
            bytes,
            skipped,
            last = finish == Finish::Publish,
            "pre-copy round"
        );
        let started = Instant::now();
        let reading = match finish {
            Finish::Round => Reading::Live,
            Finish::Publish => Reading::CutOrLive,
        };
        let sending = self.sending.start(bytes);
        let sent = link
            .send_round(
                &self.settings.volume,
                run.remote,
                me,
                &blocks,
                self.settings.zstd_level,
                finish,
                held,
                block_reader(
                    self.tracker.clone(),
                    epoch,
                    reading,
                    self.yielder.as_ref().map(Yielder::ticket),
                    self.sending.clone(),
                ),
            )
            .await;
        drop(sending);
        let (ended, shipped) = sent.map_err(Error::Mirror)?;
        self.count_shipped(&shipped, started);
        if first_round && fresh(info) {
            // Zero blocks of a fresh volume are what a resync by hash
            // would have found the same.
            self.set(|s| s.resync_same_bytes += shipped.zero_bytes + skipped);
        }
        if ended == Finish::Round {
            if finish == Finish::Publish {
                // A cut the server could not publish as one (it lost
                // earlier rounds): a round now.
                self.tracker.demote(epoch)?;
            }
            run.cut = None;
            run.min_cut = self.tracker.current_epoch();
            run.server = Some(here);
            run.rounds.push(epoch);
            for &(offset, len) in &blocks {
                run.held.insert(offset..offset + u64::from(len));
            }
            run.last_bytes = sealed.changes.touched().len();
            self.set(|s| {
                s.precopy_rounds = run.rounds.len() as u64;
                // Staged: the link gets somewhere.
                s.last_error = None;
            });
            *self.run_lock() = Some(run);
            return Ok(());
        }
        info.published_epoch = run.remote;
        info.writer = Some(me);
        self.confirm(run.remote).await?;
        self.set(|s| {
            s.server_epoch = run.remote;
            s.epochs_shipped += 1;
            s.precopy_rounds = 0;
            s.last_error = None;
        });
        *self.run_lock() = None;
        tracing::info!(
            epoch,
            remote = run.remote,
            rounds = run.rounds.len(),
            "pre-copy run published"
        );
        for id in run.rounds {
            self.release(id).await?;
        }
        self.release(epoch).await?;
        crate::system::return_free_memory();
        Ok(())
    }
}

// The replicator's decisions, as plain functions over state (time is a
// value), so that each can be tested on its own.

/// Whether to cut now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Not yet: wait this long (or for a kick).
    Wait(Duration),
    /// Seal now, at a FLUSH if one comes within `flush_wait`.
    Seal {
        /// How long to look for a FLUSH.
        flush_wait: Duration,
    },
}

impl Cut {
    /// At `now`, with the last cut at `last_cut`: cut when there are
    /// changes and the interval passed, much is dirty, or a `sync` asked
    /// (`forced`: then a FLUSH is looked for only briefly, since the user
    /// waits for the cut). A FLUSH is looked for only if the device
    /// `flushed` since the last cut ([`flush_wait`]).
    fn decide(
        now: Instant,
        last_cut: Instant,
        interval: Duration,
        dirty_bytes: u64,
        has_changes: bool,
        flushed: bool,
        forced: bool,
    ) -> Cut {
        let since = now.saturating_duration_since(last_cut);
        let due = forced || since >= interval || dirty_bytes >= DIRTY_TRIGGER;
        if due && has_changes {
            let wait = if forced {
                FORCED_FLUSH_WAIT
            } else {
                FLUSH_WAIT
            };
            return Cut::Seal {
                flush_wait: flush_wait(wait, flushed),
            };
        }
        Cut::Wait(interval.saturating_sub(since).max(MIN_WAIT))
    }
}

/// How long a cut looks for a FLUSH: `wait` on a device that `flushed`
/// since the last cut (a file system commits its journal every few
/// seconds, so the next FLUSH is near), none on one that did not (it is
/// not expected to flush now, and waiting would only delay the mirror).
fn flush_wait(wait: Duration, flushed: bool) -> Duration {
    if flushed {
        wait
    } else {
        Duration::ZERO
    }
}

/// Shortest wait between looks at the tracker.
const MIN_WAIT: Duration = Duration::from_millis(200);

/// Reconnection delays: doubling from 1 s up to [`MAX_BACKOFF`], back to
/// 1 s once a link came up, after a lost link or a refusal (an admin may
/// lift it at any moment); a server that broke the protocol, or a local
/// failure (the journal, the backing file), waits the longest at once:
/// trying again soon will not help.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// How long to wait after a failure of `kind`; `progressed`: the link
    /// had got somewhere before it failed (a server that takes the link
    /// and refuses at once is not tried every second). The wait is jittered
    /// (half to all of it), so that a fleet cut off by one server restart
    /// does not come back in step.
    fn after(&mut self, kind: ErrorKind, progressed: bool) -> Duration {
        if progressed {
            self.next = Duration::from_secs(1);
        }
        let wait = match kind {
            ErrorKind::Link | ErrorKind::Refused => self.next,
            _ => MAX_BACKOFF,
        };
        self.next = (self.next * 2).min(MAX_BACKOFF);
        jitter(wait)
    }
}

/// `wait` made between half of it and all of it, at random.
fn jitter(wait: Duration) -> Duration {
    let mut r = [0u8; 2];
    if getrandom::fill(&mut r).is_err() {
        return wait;
    }
    let part = u32::from(u16::from_le_bytes(r)) + 65536;
    wait.mul_f64(f64::from(part) / 131072.0)
}

/// Whether the mirror holds this device's past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// Yes: ship the sealed epochs as they are.
    Trusted,
    /// No (a new volume, another server, an image older than what it
    /// confirmed): ship the whole device, by hash.
    ShipAll,
}

/// Whether the volume described by `info` (as `here` names it) holds the
/// past of device `device`, given what it last confirmed (`known`); a
/// volume another device writes is refused.
fn trust(
    here: &Association,
    info: &VolumeInfo,
    device: [u8; 16],
    known: Option<&Association>,
) -> Result<Trust> {
    if let Some(w) = info.writer.filter(|w| w.device != device) {
        return Err(Error::Mirror(ublk_mirror_common::Error::Refused(format!(
            "volume {} is mirrored by another device ({}); mirror this one to another volume",
            here.volume,
            hex_encode(&w.device)
        ))));
    }
    let trusted = known.is_some_and(|a| {
        a.server == here.server
            && a.volume == here.volume
            && a.uuid == here.uuid
            && info.published_epoch >= a.confirmed_epoch
    });
    Ok(if trusted {
        Trust::Trusted
    } else {
        Trust::ShipAll
    })
}

/// What to do with a sealed epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// The server's image is this epoch already: release it.
    AlreadyPublished,
    /// It cannot be read as its cut: release it (its changes move into
    /// the current epoch as resync ranges).
    Broken,
    /// Ship `blocks`, and those of `candidates` whose content differs
    /// from the mirror's (`unknown`: their bytes). A `fresh` volume
    /// (never written) has no candidates: every block travels, zero ones
    /// as holes, so the device is read once, except whole blocks that
    /// are holes at the cut (`skipped` bytes): a fresh volume is zeroes
    /// there already, and they are not even read.
    Ship {
        blocks: Vec<(u64, u32)>,
        candidates: Vec<(u64, u32)>,
        unknown: u64,
        fresh: bool,
        skipped: u64,
    },
}

/// Whether the volume was never written (its image is all zeroes).
fn fresh(info: &VolumeInfo) -> bool {
    info.published_epoch == 0 && info.writer.is_none()
}

/// The whole blocks (of the [`BLOCK`] grid, the last one short) of
/// `ranges`, on a device of `size` bytes.
fn whole_blocks(ranges: &RangeSet, size: u64) -> RangeSet {
    let mut out = RangeSet::new();
    for r in ranges.iter() {
        let start = r.start.div_ceil(BLOCK) * BLOCK;
        let end = if r.end >= size {
            size
        } else {
            r.end / BLOCK * BLOCK
        };
        if start < end {
            out.insert(start..end);
        }
    }
    out
}

/// The plan for sealed epoch `sealed` of writer `me`, for the volume as
/// `info` describes it, of `size` bytes; `holes` read as zeroes at the cut
/// (used for a fresh volume only).
fn plan(info: &VolumeInfo, me: Writer, sealed: &Sealed, size: u64, holes: &RangeSet) -> Plan {
    if info.writer == Some(me) {
        return Plan::AlreadyPublished;
    }
    if sealed.broken.is_some() {
        return Plan::Broken;
    }
    // Known changes travel; ranges of unknown change (after a crash, or a
    // mirror that lost the device's past) travel only where the server's
    // image differs.
    let mut known = sealed.changes.data.clone();
    known.union_with(&sealed.changes.zeroed);
    let mut unknown = sealed.changes.resync.clone();
    unknown.subtract(&known);
    if fresh(info) {
        let mut all = known;
        all.union_with(&unknown);
        let before = all.len();
        all.subtract(&whole_blocks(holes, size));
        return Plan::Ship {
            blocks: split(&all, size),
            candidates: Vec::new(),
            unknown: unknown.len(),
            fresh: true,
            skipped: before - all.len(),
        };
    }
    Plan::Ship {
        blocks: split(&known, size),
        candidates: split(&unknown, size),
        unknown: unknown.len(),
        fresh: false,
        skipped: 0,
    }
}

/// The device's id: 16 random bytes in `STATE_DIR/device-id` (hex), made
/// the first time the device is mirrored.
pub fn device_id(state_dir: &Path) -> Result<[u8; 16]> {
    let path = state_dir.join("device-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return hex::decode(text.trim()).ok_or(Error::JournalCorrupt {
            path,
            reason: "not a device id".into(),
        });
    }
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|e| Error::io("making a device id", std::io::Error::other(e.to_string())))?;
    write_durably(&path, hex_encode(&id).as_bytes())?;
    Ok(id)
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    fsutil::write_durably(path, bytes)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Which volume on which server holds this device's past, up to which
/// server epoch (`STATE_DIR/mirror.json`, format 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Association {
    format: u32,
    /// The server certificate's fingerprint (hex).
    server: String,
    volume: String,
    /// The volume's uuid (hex).
    uuid: String,
    /// The newest server epoch known published with this device's data.
    confirmed_epoch: u64,
}

impl Association {
    fn path(dir: &Path) -> PathBuf {
        dir.join("mirror.json")
    }

    /// The record, if there is one that can be read: one that cannot
    /// (damaged, or a newer ublk-mirror's) means a comparison of the whole
    /// device with the mirror, which is said.
    fn load(dir: &Path) -> Option<Association> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str::<Association>(&text) {
            Ok(a) if a.format <= 1 => Some(a),
            Ok(a) => {
                tracing::warn!(
                    "{}: format {} is a newer ublk-mirror's: not read, so the device is compared with the mirror whole",
                    path.display(),
                    a.format
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    "{}: cannot be read ({e}), so the device is compared with the mirror whole",
                    path.display()
                );
                None
            }
        }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io("encoding mirror.json", std::io::Error::other(e)))?;
        write_durably(&Self::path(dir), &bytes)
    }

    /// Drop the record: the device's next session ships it whole (by
    /// hash). Durable before it returns.
    fn forget(dir: &Path) -> Result<()> {
        fsutil::remove_durably(&Self::path(dir)).map_err(|e| Error::io("removing mirror.json", e))
    }

    fn confirm(dir: &Path, epoch: u64) -> Result<()> {
        match Self::load(dir) {
            Some(mut a) => {
                a.confirmed_epoch = epoch;
                a.save(dir)
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::Changes;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_cut_waits_for_the_interval_a_sync_or_much_dirt_and_needs_changes() {
        let t0 = Instant::now();
        let interval = 10 * SEC;
        // Early, nothing forced: wait for the rest of the interval.
        assert_eq!(
            Cut::decide(t0 + 4 * SEC, t0, interval, 1, true, true, false),
            Cut::Wait(6 * SEC)
        );
        // Due, with changes: seal, looking for a FLUSH for a while.
        assert_eq!(
            Cut::decide(t0 + interval, t0, interval, 1, true, true, false),
            Cut::Seal {
                flush_wait: FLUSH_WAIT
            }
        );
        // Due, nothing changed: look again soon.
        assert_eq!(
            Cut::decide(t0 + 20 * SEC, t0, interval, 0, false, true, false),
            Cut::Wait(MIN_WAIT)
        );
        // A sync: at once, a FLUSH looked for only briefly.
        assert_eq!(
            Cut::decide(t0, t0, interval, 1, true, true, true),
            Cut::Seal {
                flush_wait: FORCED_FLUSH_WAIT
            }
        );
        // ... but not without changes.
        assert_eq!(
            Cut::decide(t0, t0, interval, 0, false, true, true),
            Cut::Wait(interval)
        );
        // A device that did not flush since the last cut is cut at once,
        // on the interval as on a sync: no FLUSH is coming to wait for.
        for forced in [false, true] {
            assert_eq!(
                Cut::decide(t0 + interval, t0, interval, 1, true, false, forced),
                Cut::Seal {
                    flush_wait: Duration::ZERO
                }
            );
        }
        // Much dirty: before the interval.
        assert!(matches!(
            Cut::decide(t0 + SEC, t0, interval, DIRTY_TRIGGER, true, true, false),
            Cut::Seal { .. }
        ));
    }

    #[test]
    fn backoff_doubles_on_failures_and_resets_after_the_link_got_somewhere() {
        // Each wait is half to all of the doubling one.
        let within = |got: Duration, full: Duration| got <= full && got >= full / 2;
        let mut b = Backoff::default();
        for full in [1, 2, 4, 8, 16, 30, 30] {
            let got = b.after(ErrorKind::Link, false);
            assert!(within(got, full * SEC), "{got:?} for {full} s");
        }
        assert!(within(b.after(ErrorKind::Link, true), SEC));
        // A refusal (also right after the link came up) backs off as
        // much; a broken server or a local failure: no hammering.
        let mut b = Backoff::default();
        assert!(within(b.after(ErrorKind::Refused, false), SEC));
        assert!(within(b.after(ErrorKind::Refused, false), 2 * SEC));
        assert!(within(b.after(ErrorKind::Peer, false), MAX_BACKOFF));
        assert!(within(b.after(ErrorKind::System, true), MAX_BACKOFF));
        assert!(within(b.after(ErrorKind::Link, false), 2 * SEC));
        // Not all in step.
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::default().after(ErrorKind::Link, false))
            .collect();
        assert!(waits.len() > 1, "no jitter");
    }

    fn volume(published_epoch: u64, writer: Option<Writer>) -> VolumeInfo {
        VolumeInfo {
            size: 1 << 30,
            published_epoch,
            uuid: [3; 16],
            writer,
        }
    }

    fn assoc(confirmed_epoch: u64) -> Association {
        Association {
            format: 1,
            server: "aa".into(),
            volume: "root".into(),
            uuid: hex_encode(&[3; 16]),
            confirmed_epoch,
        }
    }

    #[test]
    fn the_mirror_is_trusted_only_with_the_same_server_volume_and_a_newer_image() {
        let me = [1; 16];
        let w = |device| Some(Writer { device, epoch: 9 });
        let here = assoc(5);
        let info = volume(5, w(me));
        assert_eq!(
            trust(&here, &info, me, Some(&assoc(5))).unwrap(),
            Trust::Trusted
        );
        // Nothing known: ship all.
        assert_eq!(trust(&here, &info, me, None).unwrap(), Trust::ShipAll);
        // The image is older than what was confirmed (restored server).
        assert_eq!(
            trust(&here, &info, me, Some(&assoc(6))).unwrap(),
            Trust::ShipAll
        );
        // Another server, another volume, a volume made again.
        for other in [
            Association {
                server: "bb".into(),
                ..assoc(5)
            },
            Association {
                volume: "home".into(),
                ..assoc(5)
            },
            Association {
                uuid: hex_encode(&[4; 16]),
                ..assoc(5)
            },
        ] {
            assert_eq!(
                trust(&here, &info, me, Some(&other)).unwrap(),
                Trust::ShipAll
            );
        }
        // Another device's volume is refused.
        let e = trust(&here, &volume(5, w([2; 16])), me, Some(&assoc(5))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
    }

    fn sealed(data: RangeSet, resync: RangeSet, broken: bool) -> Sealed {
        Sealed {
            id: 4,
            changes: Changes {
                data,
                zeroed: RangeSet::new(),
                resync,
            },
            at_flush: true,
            sealed_ms: 0,
            first_change_ms: None,
            broken: broken.then(|| "lost".to_string()),
            taken: RangeSet::new(),
            precopy: false,
        }
    }

    #[test]
    fn an_epoch_is_released_shipped_or_resynced_by_what_the_mirror_holds() {
        let none = RangeSet::new();
        let me = Writer {
            device: [1; 16],
            epoch: 4,
        };
        let mut data = RangeSet::new();
        data.insert(0..100);
        let mut resync = RangeSet::new();
        resync.insert(50..BLOCK + 10);
        let s = sealed(data.clone(), resync.clone(), false);
        // The server holds it already.
        assert_eq!(
            plan(&volume(7, Some(me)), me, &s, 1 << 30, &none),
            Plan::AlreadyPublished
        );
        // It cannot be read as its cut.
        let broken = sealed(data.clone(), resync.clone(), true);
        assert_eq!(
            plan(&volume(7, None), me, &broken, 1 << 30, &none),
            Plan::Broken
        );
        // A volume with a past: known changes travel, the rest is compared.
        let older = Writer { epoch: 3, ..me };
        assert_eq!(
            plan(&volume(7, Some(older)), me, &s, 1 << 30, &none),
            Plan::Ship {
                blocks: vec![(0, 100)],
                candidates: vec![(100, (BLOCK - 100) as u32), (BLOCK, 10)],
                unknown: BLOCK + 10 - 100,
                fresh: false,
                skipped: 0,
            }
        );
        // A fresh volume: everything travels, nothing is compared.
        assert_eq!(
            plan(&volume(0, None), me, &s, 1 << 30, &none),
            Plan::Ship {
                blocks: vec![(0, BLOCK as u32), (BLOCK, 10)],
                candidates: vec![],
                unknown: BLOCK + 10 - 100,
                fresh: true,
                skipped: 0,
            }
        );
        // Except whole blocks that are holes at the cut (a part of one
        // travels: the block is not all hole); holes count on a volume
        // with a past only by comparing.
        let mut whole = RangeSet::new();
        whole.insert(0..8 * BLOCK);
        let all = sealed(RangeSet::new(), whole, false);
        let mut holes = RangeSet::new();
        holes.insert(BLOCK / 2..3 * BLOCK);
        holes.insert(6 * BLOCK + 1..8 * BLOCK);
        assert_eq!(
            plan(&volume(0, None), me, &all, 8 * BLOCK, &holes),
            Plan::Ship {
                blocks: vec![
                    (0, BLOCK as u32),
                    (3 * BLOCK, BLOCK as u32),
                    (4 * BLOCK, BLOCK as u32),
                    (5 * BLOCK, BLOCK as u32),
                    (6 * BLOCK, BLOCK as u32),
                ],
                candidates: vec![],
                unknown: 8 * BLOCK,
                fresh: true,
                skipped: 3 * BLOCK,
            }
        );
        // The device's last, short block is whole when the hole reaches
        // its end.
        let Plan::Ship {
            blocks, skipped, ..
        } = plan(&volume(0, None), me, &all, 7 * BLOCK + 5, &holes)
        else {
            panic!("not shipped")
        };
        assert_eq!((blocks.len(), skipped), (5, 2 * BLOCK + 5));
        assert!(matches!(
            plan(&volume(7, Some(older)), me, &all, 8 * BLOCK, &holes),
            Plan::Ship { skipped: 0, ref candidates, .. } if candidates.len() == 8
        ));
        // Nothing past the device's end.
        let Plan::Ship { candidates, .. } = plan(&volume(7, Some(older)), me, &s, BLOCK, &none)
        else {
            panic!("not shipped")
        };
        assert_eq!(candidates, vec![(100, (BLOCK - 100) as u32)]);
    }
}
