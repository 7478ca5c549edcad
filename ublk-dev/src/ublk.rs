//! The glue to the kernel's ublk driver, and the only module that sees
//! libublk's types.
//!
//! [`serve`] adds (or recovers) a device and runs its queues until the device
//! is stopped: one thread per hardware queue, one async task per tag, each
//! request carried out by the [`crate::engine::Engine`] with its
//! steps submitted on the queue's own io_uring, where the backing file is
//! registered as fixed file 1 (`/dev/ublkcN` is 0).
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! when the daemon dies, the driver keeps `/dev/ublkbN`, parks new I/O and
//! requeues what was in flight (state QUIESCED) until a new daemon recovers
//! the device; re-issued writes are harmless because they write the same
//! data to the same place.
//!
//! What the daemon needs to recover a device is kept in libublk's per-device
//! JSON (`/run/ublksrvd/NNNN.json`) under `target_data`, as a
//! [`TargetRecord`].
//!
//! **Zero copy.** Where the driver has `UBLK_F_AUTO_BUF_REG` (Linux 6.16 and
//! later; not 6.12), a new device is created with it: the kernel registers
//! each request's pages in the queue ring's buffer table at the request's
//! tag, and READ and WRITE go between those pages and the backing file with
//! fixed-buffer reads and writes, never through this process's memory.
//! Nothing here needs the data itself: change tracking records the
//! request's range, and copy-on-write reads the old content from the backing
//! file before the write is issued, exactly as on the copying path. Zeroes
//! for a short read at the end of the file come from a registered
//! `/dev/zero` (fixed file 2). A recovered device keeps the flags it was
//! created with. `UBLK_MIRROR_ZERO_COPY=0` in the environment turns it off
//! for new devices.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, UblkError, UblkFlags, UblkUringData};
use serde::{Deserialize, Serialize};

use crate::backing::Backing;
use crate::config::{DeviceSpec, MirrorSpec, TrackingSpec};
use crate::control;
use crate::engine::{self, uring, AlignedBuf, Engine, Geometry, Request, RequestBuf, ZERO_CHUNK};
use crate::error::{Error, Result};
use crate::ondemand::{OnDemand, Pinned, Prepared};
use crate::replicator::{MirrorSettings, Replicator};
use crate::status::Publisher;
use crate::tracking::{self, History, Ticket, Tracker, TrackerOptions};
use crate::wake::Wake;

/// Target type written in libublk's device JSON; `list` and `recover` only
/// touch devices of this type.
pub const TARGET_TYPE: &str = "ublk-mirror";

/// The ublk control node; present when `ublk_drv` is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Version of [`TargetRecord`]'s layout.
///
/// - 1: first version (name, backing, size, block size, direct I/O, config).
/// - 2: change tracking (state directory, region size).
/// - 3: attached versions (`attached`).
const RECORD_VERSION: u32 = 3;

// The engine decodes descriptors with its own copy of the ublk ABI numbers.
const _: () = {
    assert!(engine::abi::OP_READ == sys::UBLK_IO_OP_READ);
    assert!(engine::abi::OP_WRITE == sys::UBLK_IO_OP_WRITE);
    assert!(engine::abi::OP_FLUSH == sys::UBLK_IO_OP_FLUSH);
    assert!(engine::abi::OP_DISCARD == sys::UBLK_IO_OP_DISCARD);
    assert!(engine::abi::OP_WRITE_ZEROES == sys::UBLK_IO_OP_WRITE_ZEROES);
    assert!(engine::abi::F_FUA == sys::UBLK_IO_F_FUA);
    assert!(engine::abi::F_NOUNMAP == sys::UBLK_IO_F_NOUNMAP);
};

/// What a running device records about itself for `list` and `recover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// `RECORD_VERSION` of the writer.
    pub version: u32,
    /// Device name.
    pub name: String,
    /// Backing file, as an absolute path.
    pub backing: PathBuf,
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Whether the backing file is used with O_DIRECT (false when asked
    /// for buffered I/O, or when the file system refused O_DIRECT).
    pub direct_io: bool,
    /// The device config file it was started from, if any.
    pub config: Option<PathBuf>,
    /// Change tracking, if enabled (absent in version 1 records).
    #[serde(default)]
    pub tracking: Option<TrackingSpec>,
    /// Mirroring, if asked for.
    #[serde(default)]
    pub mirror: Option<MirrorSpec>,
    /// The mirror version this device reads on demand (`attach`); its
    /// backing file is an unlinked cache.
    #[serde(default)]
    pub attached: Option<AttachRecord>,
}

/// What an attached device reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRecord {
    /// The volume.
    pub volume: String,
    /// The snapshot.
    pub snapshot: String,
    /// Whether writes are allowed (kept locally).
    pub writable: bool,
    /// An instant restore: its fill state (the backing file is the
    /// target; the device is recoverable).
    #[serde(default)]
    pub fill_state: Option<PathBuf>,
    /// The enrollment it reads with.
    #[serde(default)]
    pub client_dir: Option<PathBuf>,
    /// How long a read waits for the mirror (ms; `None`: for ever).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The fill's limit, bytes per second.
    #[serde(default)]
    pub fill_rate: Option<u64>,
}

/// The driver's state of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Added but not started, or stopped.
    Dead,
    /// Serving I/O.
    Live,
    /// Its daemon is gone; I/O waits for `recover`.
    Quiesced,
    /// Its daemon is gone; I/O fails.
    FailIo,
    /// A state this version does not know.
    Unknown,
}

impl DeviceState {
    fn from_raw(state: u16) -> DeviceState {
        match u32::from(state) {
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Unknown,
        }
    }

    /// The state as `list` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Dead => "dead",
            DeviceState::Live => "live",
            DeviceState::Quiesced => "quiesced",
            DeviceState::FailIo => "fail_io",
            DeviceState::Unknown => "unknown",
        }
    }
}

/// One ublk device as the driver and its JSON describe it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// N in /dev/ublkbN.
    pub id: u32,
    /// The block device.
    pub device: PathBuf,
    /// The driver's state.
    pub state: DeviceState,
    /// The daemon's pid (the last one, if the state is quiesced).
    pub pid: i32,
    /// Hardware queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// Target type (`ublk-mirror` for ours).
    pub target: Option<String>,
    /// Our record, for our devices.
    #[serde(flatten)]
    pub record: Option<TargetRecord>,
    /// Whether the device can be recovered after its daemon died.
    pub recoverable: bool,
}

impl DeviceInfo {
    /// Whether this is a ublk-mirror device.
    pub fn is_ours(&self) -> bool {
        self.target.as_deref() == Some(TARGET_TYPE) && self.record.is_some()
    }

    /// Whether `del` may delete this device: one of ours; or, with
    /// `force`, one its daemon left with no description at all and no
    /// process serving it (an `add` killed while setting its device up).
    /// Another program's devices are never touched. Err: why not.
    pub fn deletable(&self, force: bool) -> std::result::Result<(), String> {
        if self.is_ours() {
            return Ok(());
        }
        let described = self.target.is_some() || self.record.is_some();
        let served = self.pid > 0 && pid_alive(self.pid);
        match (described, served, force) {
            (false, false, true) => Ok(()),
            (false, false, false) => Err(
                "it has no description (its daemon died while setting it up, or it is another program's) and no process serves it: if it is one `ublk-mirror add` left, `del --force` deletes it".into(),
            ),
            (false, true, _) => Err(format!(
                "it has no description yet and process {} ({}) serves it (a device being set up?); not touching it",
                self.pid,
                std::fs::read_to_string(format!("/proc/{}/comm", self.pid))
                    .map_or_else(|_| "?".to_string(), |c| c.trim().to_string())
            )),
            (true, ..) => Err("it is not a ublk-mirror device; not touching it".into()),
        }
    }
}

/// The errno inside a libublk error, if it carries one (positive).
fn errno_of(e: &UblkError) -> Option<i32> {
    match e {
        UblkError::OtherError(c) | UblkError::UringIOError(c) => Some(c.abs()),
        UblkError::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

fn driver_error(context: impl Into<String>, e: UblkError) -> Error {
    let source: Box<dyn std::error::Error + Send + Sync> = match errno_of(&e) {
        Some(errno) => Box::new(std::io::Error::from_raw_os_error(errno)),
        None => Box::new(e),
    };
    Error::Driver {
        context: context.into(),
        error: source,
    }
}

/// Fail with a clear message unless the ublk driver is loaded.
pub fn check_driver() -> Result<()> {
    if Path::new(CONTROL_PATH).exists() {
        Ok(())
    } else {
        Err(Error::NoDriver {
            control: CONTROL_PATH.into(),
        })
    }
}

/// Ids of all ublk devices, ascending.
fn device_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// Every ublk device on this machine (ours and others).
pub fn list() -> Result<Vec<DeviceInfo>> {
    check_driver()?;
    Ok(device_ids()
        .into_iter()
        .filter_map(|id| match info(id) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::debug!(id, "skipping device: {e}");
                None
            }
        })
        .collect())
}

fn open_ctrl(id: u32) -> Result<UblkCtrl> {
    check_driver()?;
    if !device_exists(id) {
        return Err(Error::NoSuchDevice(id));
    }
    // libublk prints "device reload json failed" for devices without a
    // JSON file (other programs' devices); that is not news to our users.
    let json = format!("{}/{id:04}.json", UblkCtrl::run_dir());
    let opened = if Path::new(&json).exists() {
        UblkCtrl::new_simple(id as i32)
    } else {
        with_stderr_silenced(|| UblkCtrl::new_simple(id as i32))
    };
    opened.map_err(|e| match errno_of(&e) {
        Some(libc::ENODEV) | Some(libc::ENOENT) => Error::NoSuchDevice(id),
        _ => driver_error(format!("reading device {id}"), e),
    })
}

/// Run `f` with file descriptor 2 pointing at /dev/null. Only for short,
/// single-threaded moments (listing devices): other threads' messages
/// would be lost meanwhile.
fn with_stderr_silenced<T>(f: impl FnOnce() -> T) -> T {
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return f();
    };
    // SAFETY: dup/dup2/close on descriptor 2 and descriptors we own; the
    // saved copy is restored and closed before returning.
    unsafe {
        let saved = libc::dup(2);
        if saved < 0 {
            return f();
        }
        libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 2);
        let out = f();
        libc::dup2(saved, 2);
        libc::close(saved);
        out
    }
}

fn describe(id: u32, ctrl: &UblkCtrl) -> DeviceInfo {
    let di = ctrl.dev_info();
    let record = ctrl
        .get_target_data_from_json()
        .and_then(|v| serde_json::from_value::<TargetRecord>(v).ok())
        .filter(|_| {
            let path = ctrl.run_path();
            let trusted = record_trusted(Path::new(&path));
            if !trusted {
                tracing::warn!(
                    "{path} is not root's alone (owner or mode): its record is not trusted"
                );
            }
            trusted
        });
    DeviceInfo {
        id,
        device: PathBuf::from(ctrl.get_bdev_path()),
        state: DeviceState::from_raw(di.state),
        pid: di.ublksrv_pid,
        queues: di.nr_hw_queues,
        depth: di.queue_depth,
        target: ctrl.get_target_type_from_json().ok(),
        record,
        recoverable: di.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0,
    }
}

/// One device.
pub fn info(id: u32) -> Result<DeviceInfo> {
    let ctrl = open_ctrl(id)?;
    Ok(describe(id, &ctrl))
}

/// How long `delete` waits for a daemon to sync and remove its device.
const DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Stop and delete a device; returns once it is gone.
///
/// A device with a live daemon is only stopped here: the daemon sees its
/// queues go down, syncs the backing file and deletes the device itself, so
/// the id stays taken until then (and nobody else's new device can be
/// deleted by mistake). A device without a daemon is deleted directly.
pub fn delete(id: u32) -> Result<()> {
    let ctrl = open_ctrl(id)?;
    let info = describe(id, &ctrl);
    // Not live: a daemon setting the device up, or the pid of one that
    // died (which another process may have by now: it must be ours).
    let daemon_alive =
        pid_alive(info.pid) && (info.state == DeviceState::Live || is_our_daemon(info.pid));
    if !daemon_alive {
        return ctrl
            .del_dev()
            .map(drop)
            .map_err(|e| driver_error(format!("deleting device {id}"), e));
    }
    let on_demand = info.record.as_ref().is_some_and(|r| r.attached.is_some());
    // A daemon still setting its device up (not live yet) is asked too:
    // it stops the device once it is up, never under its set-up.
    if on_demand || info.state != DeviceState::Live {
        // Its daemon stops it: it first fails the reads that wait for the
        // mirror, which the driver would otherwise wait for.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(info.pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| Error::io(format!("stopping device {id}'s daemon"), e.into()))?;
    } else {
        flush_before_stop(id);
        ctrl.kill_dev()
            .map_err(|e| driver_error(format!("stopping device {id}"), e))?;
    }
    let started = std::time::Instant::now();
    while started.elapsed() < DELETE_TIMEOUT {
        if !device_exists(id) {
            return Ok(());
        }
        if !pid_alive(info.pid) {
            // The daemon exited without deleting (it failed to): finish its
            // job, unless the id already belongs to someone else.
            return match open_ctrl(id) {
                Ok(c) if c.dev_info().ublksrv_pid == info.pid => c
                    .del_dev()
                    .map(drop)
                    .map_err(|e| driver_error(format!("deleting device {id}"), e)),
                _ => Ok(()),
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(Error::DeviceState {
        id,
        reason: format!(
            "stopped, but its daemon (pid {}) has not removed it after {} s",
            info.pid,
            DELETE_TIMEOUT.as_secs()
        ),
    })
}

fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

fn pid_alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` runs ublk-mirror (also a binary an upgrade
/// replaced: "ublk-mirror (deleted)").
fn is_our_daemon(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ublk-mirror"))
    })
}

/// How [`serve`] gets its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Add a new device (with the spec's id, or one the driver picks).
    Add,
    /// Take over device `id`, whose daemon died (state quiesced).
    Recover(u32),
}

/// Told to the caller once the device serves I/O.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Device id.
    pub id: u32,
    /// The block device, e.g. `/dev/ublkb0`.
    pub device: PathBuf,
    /// Whether this was a recovery.
    pub recovered: bool,
    /// Whether request data goes between the kernel's pages and the backing
    /// file without a copy (`UBLK_F_AUTO_BUF_REG`).
    pub zero_copy: bool,
}

/// The kernel's release, as `uname -r` prints it.
fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|r| r.trim().to_owned())
}

/// A ublk driver bug that this kernel's version number says it has, and
/// what to do about it.
///
/// CVE-2025-37906 ("ublk: fix race between io_uring_cmd_complete_in_task and
/// ublk_cancel_cmd", upstream f40139fde527 with its follow-up dd24f87f65c9):
/// when the daemon dies (kill -9, OOM) while requests keep arriving, the
/// driver can complete a queue thread's command a second time while its
/// task work is still queued; the ring is freed, and the exiting thread's
/// task work then dereferences it (`io_fallback_tw`, a NULL pointer
/// dereference, then RCU stalls: the machine is lost). Linux 6.7 to 6.12.113,
/// 6.13, and 6.14 before 6.14.6 have it; 6.12.114, 6.14.6 and 6.15 fixed it.
/// A distribution may have backported the fix without the version saying
/// so: this only reads the number.
pub fn known_driver_bug(release: &str) -> Option<&'static str> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return None;
    };
    let patch = parts.next().flatten().unwrap_or(0);
    let affected = match (major, minor) {
        (6, 7..=11) | (6, 13) => true,
        (6, 12) => patch < 114,
        (6, 14) => patch < 6,
        _ => false,
    };
    affected.then_some(
        "its ublk driver can crash the kernel when this daemon is killed (kill -9, \
         the OOM killer) with I/O in flight (CVE-2025-37906, fixed in 6.12.114, 6.14.6 \
         and 6.15): stop devices with `ublk-mirror del` or SIGTERM, never SIGKILL, \
         and update the kernel",
    )
}

/// Whether to ask for zero copy on a new device: when the driver offers
/// `UBLK_F_AUTO_BUF_REG`, unless `UBLK_MIRROR_ZERO_COPY=0`.
fn zero_copy_offered() -> bool {
    if std::env::var_os("UBLK_MIRROR_ZERO_COPY").is_some_and(|v| v == "0") {
        return false;
    }
    UblkCtrl::get_features().is_some_and(|f| f & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0)
}

/// Check that device `id` can be recovered by us and return its record.
pub fn recoverable(id: u32) -> Result<TargetRecord> {
    let ctrl = open_ctrl(id)?;
    let info = describe(id, &ctrl);
    let state_err = |reason: String| Error::DeviceState { id, reason };
    let Some(record) = info
        .record
        .filter(|_| info.target.as_deref() == Some(TARGET_TYPE))
    else {
        return Err(state_err("it is not a ublk-mirror device".into()));
    };
    if !info.recoverable {
        return Err(state_err("it was created without user recovery".into()));
    }
    match info.state {
        DeviceState::Quiesced => Ok(record),
        DeviceState::Live => Err(state_err(format!(
            "it is live, served by pid {}; nothing to recover",
            info.pid
        ))),
        s => Err(state_err(format!(
            "it is {}, not quiesced; delete it with `ublk-mirror del {id}` and add it again",
            s.as_str()
        ))),
    }
}

/// Shared between the signal thread and the device: who to stop, and
/// whether a stop was asked for before the device existed.
#[derive(Default)]
struct StopState {
    id: AtomicI64,
    requested: AtomicBool,
    /// Whoever sets it carries the stop out (the signal thread, or
    /// `when_up` for a stop asked during set-up): once.
    claimed: AtomicBool,
    /// Run first on a stop: an on-demand device fails the requests that
    /// wait for the mirror, or the queues could never drain.
    first: std::sync::Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for StopState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopState")
            .field("id", &self.id)
            .field("requested", &self.requested)
            .finish()
    }
}

impl StopState {
    fn new() -> StopState {
        StopState {
            id: AtomicI64::new(-1),
            requested: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            first: std::sync::Mutex::new(None),
        }
    }

    /// Stop the device (called on SIGTERM/SIGINT): at once if it is up,
    /// else `when_up` does once it is. The request is marked before the
    /// id is read, and `when_up` stores the id before it reads the mark,
    /// so one of the two sees the other.
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let id = self.id.load(Ordering::SeqCst);
        if id >= 0 {
            self.carry_out(id as u32);
        }
    }

    /// The stop itself, once: what is written to the device is written
    /// back while everything (the on-demand fetcher too) still serves,
    /// then the `first` hook, then the driver is told.
    fn carry_out(&self, id: u32) {
        if self.claimed.swap(true, Ordering::SeqCst) {
            return;
        }
        flush_before_stop(id);
        if let Some(first) = self
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            first();
        }
        kill(id);
    }
}

/// Whether `/dev/ublkbN` is held: mounted (in any mount namespace), or
/// claimed by a device mapper, md or another exclusive opener. Only asked
/// of a live device (an open of a quiesced one could wait on its I/O).
pub fn in_use(id: u32) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(format!("/dev/ublkb{id}"));
    matches!(opened, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

/// How long a stop waits for file systems to write back before it goes on.
const SYNC_BEFORE_STOP: std::time::Duration = std::time::Duration::from_secs(60);

/// Before a live device is stopped: what is written to it but still in
/// memory is written back while the queues still serve. A device with
/// user recovery fails every new request once stopping begins, before the
/// kernel would flush a mounted file system itself, so a file system
/// still mounted (a stop without `umount`) would lose its dirty pages.
/// Its mounts may be in other namespaces, so all file systems are synced
/// (for at most [`SYNC_BEFORE_STOP`]: a hung network mount does not hold
/// the stop); the device's own cache is synced in any case.
fn flush_before_stop(id: u32) {
    // Only a live device: I/O to a quiesced one (a recovery under way or
    // failed) would wait until it is live again.
    let live = UblkCtrl::new_simple(id as i32)
        .is_ok_and(|c| DeviceState::from_raw(c.dev_info().state) == DeviceState::Live);
    if !live {
        return;
    }
    let mounted = in_use(id);
    if mounted {
        tracing::warn!(
            id,
            "/dev/ublkb{id} is in use (mounted, or held by another device): writing back file systems before it stops; unmount it first next time"
        );
    }
    let (done, wait) = std::sync::mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || {
            if mounted {
                // SAFETY: sync(2) takes no arguments and cannot fail.
                unsafe { libc::sync() };
            } else if let Ok(dev) = std::fs::File::open(format!("/dev/ublkb{id}")) {
                let _ = dev.sync_all();
            }
            let _ = done.send(());
        });
    if wait.recv_timeout(SYNC_BEFORE_STOP).is_err() {
        tracing::warn!(
            id,
            "still writing back after {SYNC_BEFORE_STOP:?}: stopping anyway"
        );
    }
}

/// Ask the driver to stop device `id` from a thread other than the one that
/// added it (the control ring is per thread; `new_simple` makes one here).
fn kill(id: u32) {
    match UblkCtrl::new_simple(id as i32).and_then(|c| c.kill_dev()) {
        Ok(_) => tracing::info!(id, "stopping device"),
        Err(e) => tracing::warn!(id, "cannot stop device: {e}"),
    }
}

/// Run the device until it is stopped (SIGTERM, SIGINT, `ublk-mirror del`).
///
/// `on_ready` runs once the block device serves I/O. On a clean stop the
/// backing file is synced and the device deleted. If the daemon is killed
/// instead, the device stays (quiesced) for [`Start::Recover`]; so does a
/// device whose recovery failed: its I/O keeps waiting rather than failing.
pub fn serve<R>(
    spec: &DeviceSpec,
    backing: &Backing,
    start: Start,
    config: Option<PathBuf>,
    on_ready: R,
) -> Result<()>
where
    R: FnOnce(&Ready) + Send + Sync + 'static,
{
    check_driver()?;
    if let Some(release) = kernel_release() {
        if let Some(bug) = known_driver_bug(&release) {
            tracing::warn!("this kernel ({release}): {bug}");
        }
    }
    // Signals first: a stop asked for while the device is being set up is
    // carried out as soon as there is a device to stop.
    let stop = Arc::new(StopState::new());
    let signals = watch_signals(stop.clone())?;
    let result = serve_device(spec, backing, start, config, None, on_ready, &stop);
    signals.close();
    result
}

/// Run a device whose blocks come on demand from `od` until it is
/// stopped: `attach` (read-only unless `od` allows writes; never
/// recoverable: the cache dies with the daemon, so its I/O fails rather
/// than waits) or an instant restore (recoverable: the target and its fill
/// state outlive the daemon).
pub fn serve_on_demand<R>(
    spec: &DeviceSpec,
    backing: &Backing,
    start: Start,
    od: Arc<OnDemand>,
    record: AttachRecord,
    on_ready: R,
) -> Result<()>
where
    R: FnOnce(&Ready) + Send + Sync + 'static,
{
    check_driver()?;
    let stop = Arc::new(StopState::new());
    let signals = watch_signals(stop.clone())?;
    let result = serve_device(
        spec,
        backing,
        start,
        None,
        Some((od, record)),
        on_ready,
        &stop,
    );
    signals.close();
    result
}

fn serve_device<R>(
    spec: &DeviceSpec,
    backing: &Backing,
    start: Start,
    config: Option<PathBuf>,
    on_demand: Option<(Arc<OnDemand>, AttachRecord)>,
    on_ready: R,
    stop: &Arc<StopState>,
) -> Result<()>
where
    R: FnOnce(&Ready) + Send + Sync + 'static,
{
    let restoring = on_demand
        .as_ref()
        .is_some_and(|(_, r)| r.fill_state.is_some());
    // An attached device's cache is unlinked once open; a restore's target
    // is a real path.
    let mut record = target_record(spec, backing, config, on_demand.is_none() || restoring)?;
    let read_only = on_demand.as_ref().is_some_and(|(o, _)| !o.writable());
    let od = on_demand.map(|(o, r)| {
        // An instant restore that goes on mirroring tracks its writes from
        // the start; other devices served on demand track nothing.
        if !spec.tracking.enabled {
            record.tracking = None;
        }
        record.attached = Some(r);
        let stopping = o.clone();
        *stop.first.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Box::new(move || stopping.stop()));
        o
    });
    let geometry = Geometry {
        size: backing.size(),
        block_size: spec.logical_block_size,
        max_io: engine::MAX_IO_BYTES,
        discard: backing.punches_holes(),
    };
    let engine = Arc::new(Engine::new(geometry));
    // The journal is opened (and marked open) before any write can arrive;
    // a journal that cannot be trusted stops us before the device exists.
    let tracker = if od.is_some() && !spec.tracking.enabled {
        None
    } else {
        open_tracking(spec, backing, start, &record.backing)?
    };
    // A restore's device mirrors only once it is whole: until then it is
    // not yet what the user will have.
    let hold = od.as_ref().filter(|_| restoring).map(|o| {
        let o = o.clone();
        Arc::new(move || !o.filled()) as crate::replicator::Hold
    });
    // Not enrolled stops us here, before the device exists; the network
    // itself is never waited for.
    let activity = {
        let engine = engine.clone();
        crate::yielding::Activity::new(move || engine.stats().requests())
    };
    let replicator = start_replicator(spec, tracker.as_ref(), hold, activity)?;

    let ctrl = create_device(spec, start, od.is_none() || restoring)?;
    let dev_id = ctrl.dev_info().dev_id;
    let _span = tracing::info_span!("device", id = dev_id, name = %spec.name).entered();
    // (The id is handed to the signal thread once the device is up, in
    // `when_up`: a stop sent to a device the driver has not started yet
    // would cancel its queues while START_DEV goes on.)
    // A new device asked to stop during set-up is not started. A device
    // being recovered is: a file system may be mounted on it with pages
    // to write back, which `when_up` does before it stops it.
    if start == Start::Add && stop.requested.load(Ordering::SeqCst) {
        tracing::info!("stop requested during set-up; not starting");
        return leave(&ctrl, start, Ok(()));
    }

    let _status = Publisher::start(
        dev_id,
        engine.clone(),
        tracker.clone(),
        replicator.clone(),
        od.clone(),
    );
    // The device works without its control socket; only epochs cannot be
    // handled from outside then.
    let _control = tracker.as_ref().and_then(|t| {
        control::Server::start(dev_id, t.clone(), replicator.as_ref().map(|r| r.handle()))
            .map_err(|e| tracing::warn!("no control socket: {e}"))
            .ok()
    });
    let backing_fd = std::os::fd::AsRawFd::as_raw_fd(backing.file());
    // Zero copy reads zeroes from here into the kernel's pages; it stays
    // open while the queues run.
    let dev_zero =
        std::fs::File::open("/dev/zero").map_err(|e| Error::io("opening /dev/zero", e))?;
    let zero_fd = std::os::fd::AsRawFd::as_raw_fd(&dev_zero);
    let record_json = serde_json::to_value(&record)
        .map_err(|e| Error::io("encoding the device record", std::io::Error::other(e)))?;
    let tgt_init = move |dev: &mut UblkDev| {
        init_target(dev, [backing_fd, zero_fd], geometry, read_only, record_json)
    };
    let recovered = matches!(start, Start::Recover(_));
    let device_up = when_up(on_ready, recovered, stop.clone());
    let run = run_queues(&ctrl, tgt_init, &engine, tracker.as_ref(), od, device_up);
    finish(&ctrl, start, backing, &engine, tracker.as_deref(), run)
}

/// What the daemon records in libublk's device JSON to recover the device.
fn target_record(
    spec: &DeviceSpec,
    backing: &Backing,
    config: Option<PathBuf>,
    canonical: bool,
) -> Result<TargetRecord> {
    // An attached device's cache is unlinked once open: its path is only
    // a name then.
    let backing_path = if canonical {
        backing.resolved_path()
    } else {
        backing.path()
    }
    .to_path_buf();
    Ok(TargetRecord {
        version: RECORD_VERSION,
        name: spec.name.clone(),
        backing: backing_path,
        size: backing.size(),
        logical_block_size: spec.logical_block_size,
        direct_io: backing.direct_io(),
        config,
        tracking: Some(spec.tracking.clone()),
        mirror: spec.mirror.clone(),
        attached: None,
    })
}

/// Open the device's change tracking (its journal marked open), or, with
/// tracking off, invalidate a journal a tracked run left.
/// `canonical_backing` is the backing file's canonical path.
fn open_tracking(
    spec: &DeviceSpec,
    backing: &Backing,
    start: Start,
    canonical_backing: &Path,
) -> Result<Option<Arc<Tracker>>> {
    let inode = std::os::unix::fs::MetadataExt::ino(
        &backing
            .file()
            .metadata()
            .map_err(|e| Error::io("reading the backing file's metadata", e))?,
    );
    let identity = (canonical_backing, inode);
    let t = &spec.tracking;
    if !t.enabled {
        tracking::invalidate(&t.state_dir, identity, backing.size())?;
        return Ok(None);
    }
    let history = match start {
        Start::Recover(_) => History::Recovering,
        Start::Add if backing.created() => History::NewFile,
        Start::Add => History::ExistingFile,
    };
    let (tracker, _) = Tracker::open(&TrackerOptions {
        state_dir: &t.state_dir,
        identity,
        file: backing.file(),
        device_size: backing.size(),
        region_size: t.region_size,
        history,
        cow_memory: t.cow_memory,
    })?;
    Ok(Some(Arc::new(tracker)))
}

/// Start shipping epochs to the mirror, when one is set up and changes
/// are tracked.
fn start_replicator(
    spec: &DeviceSpec,
    tracker: Option<&Arc<Tracker>>,
    hold: Option<crate::replicator::Hold>,
    activity: crate::yielding::Activity,
) -> Result<Option<Arc<Replicator>>> {
    let (Some(m), Some(t)) = (&spec.mirror, tracker) else {
        return Ok(None);
    };
    let replicator = Replicator::start_held(
        t.clone(),
        MirrorSettings {
            volume: m.volume.clone(),
            client_dir: m.client_dir.clone(),
            interval: std::time::Duration::from_millis(m.interval_ms),
            zstd_level: m.zstd_level,
            bandwidth: m.bandwidth,
            precopy: m.precopy,
            min_rate: m.min_rate,
            activity: Some(activity),
            let_go_after: crate::replicator::LET_GO_AFTER,
        },
        hold,
    )?;
    Ok(Some(Arc::new(replicator)))
}

/// Make sure the directory of device records is root's alone. libublk
/// makes `/run/ublksrvd` mode 0777 (no sticky bit) when it is missing,
/// where any user could replace a record that `recover`, `del` and a
/// restart trust (its backing file, state directory, mirror enrollment).
fn secure_run_dir() -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = Path::new(RUN_DIR);
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o755)
            .create(dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| Error::io(format!("creating {RUN_DIR}"), e))?,
        Err(e) => return Err(Error::io(format!("looking at {RUN_DIR}"), e)),
        Ok(m) if !m.is_dir() || m.uid() != 0 => {
            return Err(Error::io(
                format!(
                "{RUN_DIR} is not a directory of root's (uid {}): someone else made it; remove it",
                m.uid()
            ),
                std::io::ErrorKind::PermissionDenied.into(),
            ))
        }
        Ok(m) if m.mode() & 0o022 != 0 => {
            tracing::info!("{RUN_DIR} was writable by others: made 0755");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io(format!("securing {RUN_DIR}"), e))?;
        }
        Ok(_) => {}
    }
    Ok(())
}

/// Where libublk keeps device records (`NNNN.json`).
const RUN_DIR: &str = "/run/ublksrvd";

/// Whether the device record at `path` can be trusted: root's, and
/// writable by root alone. (Its directory may still be libublk's 0777
/// from before a daemon of ours secured it; the next start does.)
fn record_trusted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
}

/// Add the device to the driver, or take over a quiesced one to recover it.
/// A device that is not `recoverable` fails its I/O when its daemon dies.
fn create_device(spec: &DeviceSpec, start: Start, recoverable: bool) -> Result<UblkCtrl> {
    secure_run_dir()?;
    let mut ctrl_flags = if recoverable {
        u64::from(sys::UBLK_F_USER_RECOVERY) | u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE)
    } else {
        0
    };
    // A recovery takes the flags the device was created with from the driver.
    if start == Start::Add && zero_copy_offered() {
        ctrl_flags |= u64::from(sys::UBLK_F_AUTO_BUF_REG);
    }
    let (id, dev_flags) = match start {
        Start::Add => (
            spec.id.map_or(-1, |i| i as i32),
            UblkFlags::UBLK_DEV_F_ADD_DEV,
        ),
        Start::Recover(id) => {
            let simple = open_ctrl(id)?;
            simple
                .start_user_recover()
                .map_err(|e| driver_error(format!("starting recovery of device {id}"), e))?;
            (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        }
    };
    UblkCtrlBuilder::default()
        .name(TARGET_TYPE)
        .id(id)
        .nr_queues(spec.queues)
        .depth(spec.depth)
        .io_buf_bytes(engine::MAX_IO_BYTES)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| match errno_of(&e) {
            Some(libc::EEXIST) => Error::DeviceState {
                id: id as u32,
                reason: "a device with this id already exists (see `ublk-mirror list`)".into(),
            },
            _ => driver_error("creating the device", e),
        })
}

/// What runs once the block device serves I/O: the queue threads may move
/// between CPUs, `on_ready` is told, and a stop asked for meanwhile is
/// carried out.
fn when_up<R>(
    on_ready: R,
    recovered: bool,
    stop: Arc<StopState>,
) -> impl FnOnce(&UblkCtrl) + Send + Sync + 'static
where
    R: FnOnce(&Ready) + Send + Sync + 'static,
{
    move |ctrl: &UblkCtrl| {
        unpin_queue_threads(ctrl);
        // From now on a signal stops the device itself; one that came
        // before (it only marked the stop as asked) is carried out below.
        stop.id
            .store(i64::from(ctrl.dev_info().dev_id), Ordering::SeqCst);
        on_ready(&Ready {
            id: ctrl.dev_info().dev_id,
            device: PathBuf::from(ctrl.get_bdev_path()),
            recovered,
            zero_copy: ctrl.dev_info().flags & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0,
        });
        if stop.requested.load(Ordering::SeqCst) {
            stop.carry_out(ctrl.dev_info().dev_id);
        }
    }
}

/// Start the device and serve its queues until it is stopped. A queue that
/// ended in an error makes the stop unclean.
fn run_queues(
    ctrl: &UblkCtrl,
    tgt_init: impl FnOnce(&mut UblkDev) -> std::result::Result<(), UblkError>,
    engine: &Arc<Engine>,
    tracker: Option<&Arc<Tracker>>,
    od: Option<Arc<OnDemand>>,
    device_up: impl FnOnce(&UblkCtrl) + Send + Sync + 'static,
) -> Result<()> {
    let dev_id = ctrl.dev_info().dev_id;
    let queue_engine = engine.clone();
    let queue_tracker = tracker.cloned();
    let queue_failed = Arc::new(AtomicBool::new(false));
    let any_queue_failed = queue_failed.clone();
    ctrl.run_target(
        tgt_init,
        move |qid, dev: &UblkDev| {
            if !serve_queue(
                qid,
                dev,
                &queue_engine,
                queue_tracker.as_deref(),
                od.as_deref(),
            ) {
                queue_failed.store(true, Ordering::SeqCst);
            }
        },
        device_up,
    )
    .map(drop)
    .map_err(|e| driver_error("running the device", e))
    .and_then(|()| {
        // A queue that ended in an error may have left I/O in flight:
        // the stop is not clean.
        if any_queue_failed.load(Ordering::SeqCst) {
            Err(Error::DeviceState {
                id: dev_id,
                reason: "a queue failed; see the log".into(),
            })
        } else {
            Ok(())
        }
    })
}

/// After the queues are down: make what was written durable, record a
/// clean stop if it was one, and decide the device's fate ([`leave`]).
fn finish(
    ctrl: &UblkCtrl,
    start: Start,
    backing: &Backing,
    engine: &Engine,
    tracker: Option<&Tracker>,
    run: Result<()>,
) -> Result<()> {
    // The queues are down: whatever was written is in the backing file's
    // page cache or on disk. Make it durable before the device goes away.
    let synced = backing.sync();
    let clean = run.and(synced).and_then(|()| match tracker {
        // Only a clean stop, with the backing file synced, is recorded clean.
        Some(t) => t.close_clean(),
        None => Ok(()),
    });
    let result = leave(ctrl, start, clean);
    let s = engine.stats();
    tracing::info!(
        reads = s.reads.load(Ordering::Relaxed),
        writes = s.writes.load(Ordering::Relaxed),
        flushes = s.flushes.load(Ordering::Relaxed),
        discards = s.discards.load(Ordering::Relaxed),
        errors = s.errors.load(Ordering::Relaxed),
        "device stopped; backing file synced"
    );
    result
}

/// Let every queue thread run on any CPU this process may use.
///
/// libublk pins each queue's thread to the CPUs the block layer maps to
/// that queue, so the thread serving a request shares its CPU with the
/// program that submitted it. With few CPUs that halves throughput (measured
/// by `scripts/bench-io` on 2 vCPUs: 9k vs 20k 4k-randwrite IOPS); the
/// scheduler does better when it may move the thread.
fn unpin_queue_threads(ctrl: &UblkCtrl) {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let Ok(all) = sched_getaffinity(Pid::from_raw(0)) else {
        return;
    };
    for qid in 0..ctrl.dev_info().nr_hw_queues {
        if let Ok(tid) = ctrl.get_queue_tid(u32::from(qid)) {
            if let Err(e) = sched_setaffinity(Pid::from_raw(tid), &all) {
                tracing::debug!(qid, tid, "cannot widen queue thread affinity: {e}");
            }
        }
    }
}

/// Decide the device's fate when the daemon is done with it: deleted after a
/// clean stop or a failed add; left quiesced after a failed recovery, so
/// that the I/O waiting in it is not failed under a mounted file system.
fn leave(ctrl: &UblkCtrl, start: Start, result: Result<()>) -> Result<()> {
    let id = ctrl.dev_info().dev_id;
    match (&result, start) {
        (Err(e), Start::Recover(_)) => {
            tracing::error!(
                "recovery failed ({e}); device {id} stays quiesced with its I/O waiting: \
                 retry `ublk-mirror recover {id}`, or `ublk-mirror del {id}` to fail it"
            );
        }
        _ => {
            if let Err(e) = ctrl.del_dev() {
                tracing::debug!("deleting device {id}: {e}");
            }
        }
    }
    // Deletion is decided above; the control handle must not repeat it on drop.
    ctrl.disown();
    result
}

/// Handle SIGTERM/SIGINT by stopping the device. SIGHUP (the terminal of
/// a foreground daemon closed, an ssh session lost) and SIGQUIT are
/// logged and ignored: dying of them would leave the device quiesced,
/// its I/O waiting, and stopping would pull it from under its users. The
/// returned handle ends the watcher thread when closed.
fn watch_signals(stop: Arc<StopState>) -> Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT])
        .map_err(|e| Error::io("installing signal handlers", e))?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP || sig == SIGQUIT {
                    tracing::info!(
                        signal = sig,
                        "ignored: the device keeps serving (stop it with `ublk-mirror del` or SIGTERM)"
                    );
                    continue;
                }
                tracing::info!(signal = sig, "stop requested");
                stop.request();
            }
        })
        .map_err(|e| Error::io("starting the signal thread", e))?;
    Ok(handle)
}

/// Whether this is the device's first panic since the machine started:
/// a recovery reissues the request that panicked, and a panic that comes
/// back each time must not make the daemon end and recover for good (the
/// second one is answered EIO). Marked in /run (gone at reboot).
fn first_panic(id: u32) -> bool {
    let dir = Path::new("/run/ublk-mirror");
    let marker = dir.join(format!("panicked.{id}"));
    if marker.exists() {
        return false;
    }
    let _ = std::fs::create_dir_all(dir);
    std::fs::write(&marker, b"").is_ok()
}

/// Whether this kernel's ublk driver is one [`known_driver_bug`] names.
static DRIVER_BUG: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| kernel_release().is_none_or(|r| known_driver_bug(&r).is_some()));

/// Registered file index of the backing file (0 is `/dev/ublkcN`).
const BACKING_FILE: u32 = 1;
/// Registered file index of `/dev/zero` (zero copy's zero fill).
const ZERO_FILE: u32 = 2;

/// Describe the device to the driver: size, block sizes, cache and discard
/// support, and register the backing file and `/dev/zero` as fixed files
/// [`BACKING_FILE`] and [`ZERO_FILE`].
fn init_target(
    dev: &mut UblkDev,
    fds: [i32; 2],
    g: Geometry,
    read_only: bool,
    record: serde_json::Value,
) -> std::result::Result<(), UblkError> {
    let tgt = &mut dev.tgt;
    for (fd, index) in fds.into_iter().zip([BACKING_FILE, ZERO_FILE]) {
        let slot = tgt.nr_fds as usize;
        if slot != index as usize || slot >= tgt.fds.len() {
            return Err(UblkError::InvalidVal);
        }
        tgt.fds[slot] = fd;
        tgt.nr_fds += 1;
    }
    tgt.dev_size = g.size;
    let lbs_shift = g.block_size.trailing_zeros() as u8;
    // Discard and write-zeroes requests are bounded by what one fallocate
    // comfortably does; the block layer splits larger ones. No discard
    // where the backing cannot punch holes (the kernel then refuses them,
    // and file systems stop asking); write-zeroes always, zeroed by hand
    // where need be.
    let max_write_zeroes_sectors = (1u32 << 30) >> 9;
    let max_discard_sectors = if g.discard {
        max_write_zeroes_sectors
    } else {
        0
    };
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE
                | sys::UBLK_ATTR_FUA
                | if read_only {
                    sys::UBLK_ATTR_READ_ONLY
                } else {
                    0
                },
            logical_bs_shift: lbs_shift,
            physical_bs_shift: lbs_shift.max(12),
            io_opt_shift: lbs_shift.max(12),
            io_min_shift: lbs_shift,
            max_sectors: g.max_io >> 9,
            dev_sectors: g.size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: g.block_size.max(4096),
            max_discard_sectors,
            max_write_zeroes_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    dev.set_target_json(record);
    Ok(())
}

/// The body of one queue thread: a task per tag, all driven by the queue's
/// ring. Returns false if the queue ended in an error.
fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    engine: &Engine,
    tracker: Option<&Tracker>,
    od: Option<&OnDemand>,
) -> bool {
    // Its work between two waits is short: run it as soon as its I/O
    // completes, not after the replicator's slice.
    let short = crate::system::shorten_this_threads_slice();
    tracing::debug!(qid, short, "queue thread started");
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, "cannot set up queue: {e}");
            // Wake the thread starting the device, which waits for every
            // queue to register its buffers: it fails instead of hanging.
            dev.notify_buffer_registration_complete(true);
            return false;
        }
    };
    let failed_cell = std::cell::Cell::new(false);
    let failed = &failed_cell;
    let zeroes = Rc::new(AlignedBuf::zeroed(ZERO_CHUNK));
    let exe = Rc::new(smol::LocalExecutor::new());
    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let q = queue.clone();
            let zeroes = zeroes.clone();
            exe.spawn(async move {
                match serve_tag(&q, tag, engine, tracker, od, &zeroes).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => {
                        tracing::error!(qid, tag, "I/O task failed: {e}");
                        failed.set(true);
                    }
                }
            })
        })
        .collect();
    let ticker = exe.clone();
    smol::block_on(exe.run(async {
        let run_ops = || while ticker.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await {
            tracing::error!(qid, "queue stopped with an error: {e}");
            failed.set(true);
        }
    }));
    !failed_cell.get()
}

/// Serve one tag forever: fetch a request, carry it out, commit its result.
///
/// With zero copy the request's data stays in the kernel's pages,
/// registered at index `tag` of the ring's buffer table from the fetch to
/// the commit; otherwise it is copied into and out of a buffer of our own.
async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    engine: &Engine,
    tracker: Option<&Tracker>,
    od: Option<&OnDemand>,
    zeroes: &AlignedBuf,
) -> std::result::Result<(), UblkError> {
    let mut buf = (!q.support_auto_buf_zc())
        .then(|| IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize));
    let auto_reg = sys::ublk_auto_buf_reg {
        index: tag,
        ..Default::default()
    };
    fn desc(buf: &Option<IoBuf<u8>>, auto_reg: sys::ublk_auto_buf_reg) -> BufDesc<'_> {
        match buf {
            Some(b) => BufDesc::Slice(b.as_slice()),
            None => BufDesc::AutoReg(auto_reg),
        }
    }
    q.submit_io_prep_cmd(tag, desc(&buf, auto_reg), 0, buf.as_ref())
        .await?;
    let zero_ptr = zeroes.as_slice().as_ptr();
    loop {
        // A bug that panics while a request is handled must not leave it
        // unanswered: the kernel would wait for it for good, and a later
        // stop with it. It is answered EIO, and said loudly.
        let res = {
            let handled = std::pin::pin!(async {
                let iod = q.get_iod(tag);
                // Tracking marks the write's regions durably before it is issued;
                // this may block the queue for one journal sync, only on the first
                // write into a region.
                let started = Request::decode(iod.op_flags, iod.start_sector, iod.nr_sectors)
                    .and_then(|req| engine.start(req));
                // An attached device's blocks are made local first; the request
                // waits on the ring meanwhile, not the queue.
                let (started, pinned) = match (started, od) {
                    (Ok(io), Some(od)) => match local(od, io.request()).await {
                        Ok(pin) => (Ok(io), Some(pin)),
                        Err(e) => (Err(e), None),
                    },
                    (started, _) => (started, None),
                };
                let started = match (started, tracker) {
                    (Ok(io), Some(t)) => tracked(t, io.request()).await.map(|ticket| (io, ticket)),
                    (started, _) => started.map(|io| (io, None)),
                };
                match started {
                    Err(e) => {
                        tracing::debug!(tag, "refused request: {e:?}");
                        if let (Some(od), Some(pin)) = (od, pinned) {
                            od.release_failed(pin);
                        }
                        e.negated()
                    }
                    Ok((io, ticket)) => {
                        let request_buf = match buf.as_mut() {
                            Some(b) => RequestBuf::Memory(b.as_mut_slice()),
                            None => RequestBuf::Registered,
                        };
                        let res = engine::drive(io, request_buf, |step, base| {
                            let target = match base {
                                Some(addr) => uring::BufRef::Addr(addr),
                                None => uring::BufRef::Registered {
                                    index: tag,
                                    zero_file: ZERO_FILE,
                                },
                            };
                            let sqe = uring::sqe(
                                step,
                                uring::FileRef::Fixed(BACKING_FILE),
                                target,
                                zero_ptr,
                            );
                            async move {
                                ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
                                    .await
                                    .unwrap_or(-libc::EIO)
                            }
                        })
                        .await;
                        if let (Some(t), Some(ticket)) = (tracker, ticket) {
                            t.after_write(ticket);
                        }
                        let mut res = res;
                        if let (Some(od), Some(pin)) = (od, pinned) {
                            if res < 0 {
                                od.release_failed(pin);
                            } else if !od.release(pin) {
                                // Its blocks are not saved as here: after a crash
                                // the fill would write over it.
                                res = -libc::EIO;
                            }
                        }
                        res
                    }
                }
            });
            let mut handled = handled;
            std::future::poll_fn(|cx| {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    std::future::Future::poll(handled.as_mut(), cx)
                })) {
                    Ok(p) => p,
                    Err(_) => {
                        let recoverable = q.dev.dev_info.flags
                            & u64::from(sys::UBLK_F_USER_RECOVERY)
                            != 0;
                        if recoverable && !*DRIVER_BUG && first_panic(q.dev.dev_info.dev_id) {
                            // Tracking may be half way through this
                            // request: the daemon ends, the device stays
                            // quiesced, and a restart (systemd's, or
                            // `recover`) reissues the request and rebuilds
                            // tracking from the journal. Users see a pause.
                            tracing::error!(
                                tag,
                                "handling a request panicked (a bug): the daemon ends for a recovery"
                            );
                            std::process::abort();
                        }
                        // A device that fails its I/O when its daemon
                        // dies, a kernel whose driver crashes then, or a
                        // panic that came back after a recovery: the
                        // request fails instead.
                        tracing::error!(
                            tag,
                            "handling a request panicked (a bug): answered EIO; stop the device (`ublk-mirror del`, after umount) and start it again"
                        );
                        std::task::Poll::Ready(-libc::EIO)
                    }
                }
            })
            .await
        };
        q.submit_io_commit_cmd(tag, desc(&buf, auto_reg), res)
            .await?;
    }
}

/// Wait until the blocks `req` touches are local (see
/// [`crate::ondemand`]), polling the waiter's eventfd on the queue's ring.
async fn local(od: &OnDemand, req: &Request) -> std::result::Result<Pinned, engine::Errno> {
    loop {
        match od.prepare(req)? {
            Prepared::Go(pin) => return Ok(pin),
            Prepared::Wait(waiter) => woken(waiter.wake()).await?,
        }
    }
}

/// Record `req` with tracking, waiting (on the queue's ring, not the
/// thread) while chunks it overwrites are preserved (see
/// [`crate::tracking`]).
async fn tracked(
    tracker: &Tracker,
    req: &Request,
) -> std::result::Result<Option<Ticket>, engine::Errno> {
    loop {
        match tracker.prepare_write(req)? {
            tracking::Prepared::Go(ticket) => return Ok(ticket),
            tracking::Prepared::Wait(wake) => woken(&wake).await?,
            tracking::Prepared::Read(p) => {
                let mut reads = Vec::new();
                for run in p.runs() {
                    reads.push(read_on_ring(run).await);
                }
                if let Some(p) = tracker.store_read(p, reads) {
                    spill_on_ring(tracker, p).await;
                }
            }
        }
    }
}

/// Write the chunks a request keeps past the memory limit into the spill
/// file on the queue's ring (owed since [`Tracker::store_read`]), and
/// hand them back ([`Tracker::spill_written`]). Should the request be dropped while a
/// write is in flight, the preservation's drop leaks its buffers and
/// gives up its slots, and the file stays open.
async fn spill_on_ring(tracker: &Tracker, p: tracking::Preservation) {
    struct InFlight(Option<tracking::Preservation>, Option<Arc<std::fs::File>>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            std::mem::forget(self.1.take());
        }
    }
    let file = match tracker.spill_file() {
        Ok(f) => f,
        Err(e) => {
            let n = p.spill_writes().len();
            let failed = (0..n)
                .map(|_| Err(std::io::Error::new(e.kind(), e.to_string())))
                .collect();
            return tracker.spill_written(p, failed);
        }
    };
    let fd = file.as_raw_fd();
    let mut held = InFlight(Some(p), Some(file));
    let writes: Vec<(u64, *const u8, usize)> = held
        .0
        .as_ref()
        .expect("held")
        .spill_writes()
        .into_iter()
        .map(|(at, data)| (at, data.as_ptr(), data.len()))
        .collect();
    let mut written = Vec::new();
    for (at, ptr, len) in writes {
        written.push(write_on_ring(fd, at, ptr, len).await);
    }
    let p = held.0.take().expect("held");
    drop(held.1.take());
    tracker.spill_written(p, written);
}

/// Write `len` bytes from `ptr` at `at` of `fd` on the queue's ring; the
/// caller keeps both alive until it answers (or leaks them).
async fn write_on_ring(fd: i32, at: u64, ptr: *const u8, len: usize) -> std::io::Result<()> {
    let (mut done, mut retries) = (0, 0);
    while done < len {
        // SAFETY: within the caller's buffer, kept alive as documented.
        let from = unsafe { ptr.add(done) };
        let sqe = io_uring::opcode::Write::new(io_uring::types::Fd(fd), from, (len - done) as u32)
            .offset(at + done as u64)
            .build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        match res {
            n if n > 0 => done += n as usize,
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n if (n == -libc::EINTR || n == -libc::EAGAIN) && retries < RING_RETRIES => {
                retries += 1
            }
            n => return Err(std::io::Error::from_raw_os_error(-n)),
        }
    }
    Ok(())
}

/// How often an interrupted read of chunks to preserve, or write of them
/// to the spill, is tried again.
const RING_RETRIES: u32 = 8;

/// Read `range` of the backing file on the queue's ring into a new
/// buffer (aligned for `O_DIRECT`). Should the request be dropped while
/// the read is in flight (the queue going down), the buffer is leaked
/// rather than freed under the kernel's feet.
async fn read_on_ring(range: std::ops::Range<u64>) -> std::io::Result<AlignedBuf> {
    struct InFlight(Option<AlignedBuf>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            std::mem::forget(self.0.take());
        }
    }
    let len = (range.end - range.start) as usize;
    let mut buf = InFlight(Some(AlignedBuf::zeroed(len)));
    let (mut done, mut retries) = (0, 0);
    while done < len {
        let to = &mut buf.0.as_mut().expect("held until done").as_mut_slice()[done..];
        let sqe = io_uring::opcode::Read::new(
            io_uring::types::Fixed(BACKING_FILE),
            to.as_mut_ptr(),
            to.len() as u32,
        )
        .offset(range.start + done as u64)
        .build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        // Not in flight any more: an error frees the buffer.
        let err = match res {
            n if n > 0 => {
                done += n as usize;
                continue;
            }
            0 => std::io::ErrorKind::UnexpectedEof.into(),
            n if (n == -libc::EINTR || n == -libc::EAGAIN) && retries < RING_RETRIES => {
                retries += 1;
                continue;
            }
            n => std::io::Error::from_raw_os_error(-n),
        };
        drop(buf.0.take());
        return Err(err);
    }
    Ok(buf.0.take().expect("held until done"))
}

/// Wait for `wake` on the queue's ring: the queue serves its other
/// requests meanwhile.
async fn woken(wake: &Wake) -> std::result::Result<(), engine::Errno> {
    while !wake.is_set() {
        let sqe =
            io_uring::opcode::PollAdd::new(io_uring::types::Fd(wake.fd()), libc::POLLIN as u32)
                .build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        if res < 0 && res != -libc::EINTR && !wake.is_set() {
            // The ring cannot poll (the queue is going down): fail the
            // request rather than spin.
            tracing::debug!(
                "cannot wait on the ring: {}",
                std::io::Error::from_raw_os_error(-res)
            );
            return Err(engine::Errno::IO);
        }
    }
    if wake.failed() {
        Err(engine::Errno::IO)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{known_driver_bug, DeviceInfo, DeviceState};

    #[test]
    fn del_takes_an_undescribed_device_only_with_force_and_no_daemon() {
        let gone = DeviceInfo {
            id: 3,
            device: "/dev/ublkb3".into(),
            state: DeviceState::Dead,
            pid: -1,
            queues: 1,
            depth: 64,
            target: None,
            record: None,
            recoverable: false,
        };
        assert!(gone.deletable(false).unwrap_err().contains("--force"));
        assert_eq!(gone.deletable(true), Ok(()));
        // A process serves it: perhaps a daemon setting it up.
        let served = DeviceInfo {
            pid: std::process::id() as i32,
            ..gone.clone()
        };
        assert!(served.deletable(true).is_err());
        // Another program's device, even without a daemon: never.
        let theirs = DeviceInfo {
            target: Some("loop".into()),
            ..gone
        };
        assert!(theirs
            .deletable(true)
            .unwrap_err()
            .contains("not a ublk-mirror device"));
    }

    #[test]
    fn the_cancel_race_is_known_by_kernel_version() {
        for affected in [
            "6.7.0",
            "6.11.11-amd64",
            "6.12.95+deb12-amd64",
            "6.12.113",
            "6.13.2",
            "6.14.5-300.fc42.x86_64",
        ] {
            assert!(known_driver_bug(affected).is_some(), "{affected}");
        }
        for fixed in [
            "6.6.90",
            "6.12.114",
            "6.12.117+deb13-amd64",
            "6.14.6",
            "6.15.0-rc4",
            "7.3.4+deb13-amd64",
            "",
            "weird",
        ] {
            assert!(known_driver_bug(fixed).is_none(), "{fixed}");
        }
    }
}
