//! The status a running daemon publishes for `ublk-mirror status`.
//!
//! The daemon rewrites `/run/ublk-mirror/NNNN.status.json` about once a
//! second (write to a temporary file, then rename, so a reader never sees
//! half a file); `status` reads it. A status whose daemon is gone stays as
//! the last word of that daemon, with its time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::ondemand::{AttachStatus, OnDemand};
use crate::replicator::{MirrorStatus, Replicator};
use crate::tracking::{Tracker, TrackingStatus};

/// Directory of the status files.
pub const STATUS_DIR: &str = "/run/ublk-mirror";

/// How often the daemon refreshes its status file.
const PERIOD: Duration = Duration::from_secs(1);

/// One device's published status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Device id.
    pub id: u32,
    /// The daemon that wrote it.
    pub pid: u32,
    /// Milliseconds since the Unix epoch when this was written.
    pub updated_ms: u64,
    /// Requests served.
    pub reads: u64,
    /// Requests served.
    pub writes: u64,
    /// Failed requests.
    pub errors: u64,
    /// Change tracking, if enabled.
    pub tracking: Option<TrackingStatus>,
    /// The mirror, if the device is mirrored.
    #[serde(default)]
    pub mirror: Option<MirrorStatus>,
    /// The mirror version the device reads on demand, if attached.
    #[serde(default)]
    pub attach: Option<AttachStatus>,
}

/// The status file of device `id`.
pub fn path(id: u32) -> PathBuf {
    PathBuf::from(format!("{STATUS_DIR}/{id:04}.status.json"))
}

/// Read device `id`'s last published status, if any.
pub fn read(id: u32) -> Option<DeviceStatus> {
    let text = std::fs::read_to_string(path(id)).ok()?;
    serde_json::from_str(&text)
        .inspect_err(|e| {
            tracing::warn!(
                "device {id}'s status cannot be read (a daemon of another version?): {e}"
            );
        })
        .ok()
}

fn snapshot(
    id: u32,
    engine: &Engine,
    tracker: Option<&Tracker>,
    replicator: Option<&Replicator>,
    od: Option<&OnDemand>,
) -> DeviceStatus {
    let s = engine.stats();
    DeviceStatus {
        id,
        pid: std::process::id(),
        updated_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        reads: s.reads.load(Ordering::Relaxed),
        writes: s.writes.load(Ordering::Relaxed),
        errors: s.errors.load(Ordering::Relaxed),
        tracking: tracker.map(Tracker::status),
        mirror: replicator.map(Replicator::status),
        attach: od.map(OnDemand::status),
    }
}

fn write(status: &DeviceStatus) -> std::io::Result<()> {
    std::fs::create_dir_all(STATUS_DIR)?;
    let final_path = path(status.id);
    let tmp = final_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)?;
    std::fs::rename(&tmp, &final_path)
}

/// Publishes a device's status until dropped (then once more, finally).
#[derive(Debug)]
pub struct Publisher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// Start publishing device `id`'s status.
    pub fn start(
        id: u32,
        engine: Arc<Engine>,
        tracker: Option<Arc<Tracker>>,
        replicator: Option<Arc<Replicator>>,
        od: Option<Arc<OnDemand>>,
    ) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || loop {
                let last = flag.load(Ordering::SeqCst);
                if let Err(e) = write(&snapshot(
                    id,
                    &engine,
                    tracker.as_deref(),
                    replicator.as_deref(),
                    od.as_deref(),
                )) {
                    tracing::debug!("cannot write the status file: {e}");
                }
                if last {
                    return;
                }
                std::thread::park_timeout(PERIOD);
            })
            .map_err(|e| tracing::warn!("no status publishing: {e}"))
            .ok();
        Publisher { stop, thread }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
