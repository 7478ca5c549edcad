//! The snapshot schedule of a running server: for every volume whose
//! policy (`server.toml`'s `[snapshots]` and `[volumes."CLIENT/VOLUME"]`)
//! takes them, a snapshot when the volume changed since its last one and
//! `every` has passed since the last scheduled one; then pruning by its
//! retention. What a snapshot is belongs to [`crate::snapshots`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ublk_mirror_common::clock::now_ms;

use crate::config::{ServerConfig, SnapshotPolicy};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::snapshots::Kind;
use crate::volumes::Volumes;

/// Run the schedule of `config` over `volumes`, forever (returns at once
/// when no volume takes scheduled snapshots).
pub async fn run(config: ServerConfig, volumes: Arc<Volumes>, metrics: Arc<Metrics>) {
    let every: Vec<Duration> = config
        .policies()
        .map(|p| p.every.0)
        .filter(|d| !d.is_zero())
        .collect();
    let Some(shortest) = every.iter().min().copied() else {
        return;
    };
    let tick = (shortest / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    let mut clock = ClockWatch::default();
    loop {
        tokio::time::sleep(tick).await;
        let prune = clock.prune_allowed(std::time::Instant::now(), wall_ms());
        for (client, name) in volumes.cached() {
            let policy = config.policy(&format!("{client}/{name}"));
            if policy.every.0.is_zero() {
                continue;
            }
            visit(&volumes, &client, &name, &policy, &metrics, prune).await;
        }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Retention ages snapshots by the wall clock: a clock set months ahead
/// for a while (a bad RTC, a restored VM, before NTP puts it right) would
/// thin every tier at once, for good. The schedule compares the wall
/// clock with the monotonic one between its ticks; after a jump ahead of
/// more than [`CLOCK_JUMP`] nothing is pruned for [`CLOCK_HOLD`], time
/// for the clock to be put right (a jump that was a correction ends the
/// hold when it is over, and pruning catches up).
#[derive(Debug, Default)]
struct ClockWatch {
    last: Option<(std::time::Instant, u64)>,
    hold_until: Option<std::time::Instant>,
}

/// A wall-clock step ahead this much past the monotonic clock is a jump.
const CLOCK_JUMP: Duration = Duration::from_secs(3600);
/// How long pruning waits after a jump.
const CLOCK_HOLD: Duration = Duration::from_secs(6 * 3600);

impl ClockWatch {
    /// Whether pruning may run at `now` (monotonic), the wall clock
    /// saying `wall_ms`.
    fn prune_allowed(&mut self, now: std::time::Instant, wall_ms: u64) -> bool {
        if let Some((then, then_ms)) = self.last {
            let passed = now.duration_since(then).as_millis() as u64;
            let moved = wall_ms.saturating_sub(then_ms);
            if moved > passed + CLOCK_JUMP.as_millis() as u64 {
                tracing::error!(
                    ahead_s = (moved - passed) / 1000,
                    "the wall clock jumped ahead: no snapshot is pruned for {}h, in case it is wrong (retention ages snapshots by it)",
                    CLOCK_HOLD.as_secs() / 3600
                );
                self.hold_until = Some(now + CLOCK_HOLD);
            } else if then_ms > wall_ms + CLOCK_JUMP.as_millis() as u64 {
                tracing::warn!(
                    behind_s = (then_ms - wall_ms) / 1000,
                    "the wall clock went back: snapshots taken since are named by the earlier time"
                );
            }
        }
        self.last = Some((now, wall_ms));
        self.hold_until.is_none_or(|t| now >= t)
    }
}

/// The store-wide chores a server runs on a clock of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chore {
    /// Garbage collection of the chunk store.
    Gc,
    /// Verification of the chunk store.
    Verify,
}

/// When each chore last ran here, and when its clock started (its first
/// start here), so that a restart (an upgrade, a reboot) does not start
/// the clocks again: a server restarted more often than `verify_every`
/// would never verify. `DATA/chores.json`, format 1:
/// `{"format":1,"gc_ms":MS,"verify_ms":MS,"gc_from_ms":MS,"verify_from_ms":MS}`
/// (each absent until known), replaced whole (written to a temporary file,
/// synced, renamed); a missing or unreadable one starts the clocks now,
/// which only delays a run.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Chores {
    #[serde(default)]
    format: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gc_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verify_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gc_from_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verify_from_ms: Option<u64>,
}

const CHORES: &str = "chores.json";
const CHORES_FORMAT: u32 = 1;

impl Chores {
    fn read(data: &Path) -> Chores {
        let path = data.join(CHORES);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "unreadable, the chores' clocks start now: {e}");
                Chores::default()
            }),
            Err(_) => Chores::default(),
        }
    }

    /// When `chore` last ran (`ran`), or its clock started.
    fn slot(&mut self, chore: Chore, ran: bool) -> &mut Option<u64> {
        match (chore, ran) {
            (Chore::Gc, true) => &mut self.gc_ms,
            (Chore::Verify, true) => &mut self.verify_ms,
            (Chore::Gc, false) => &mut self.gc_from_ms,
            (Chore::Verify, false) => &mut self.verify_from_ms,
        }
    }
}

/// Note that `chore` ran at `ms`.
fn note(data: &Path, chore: Chore, ms: u64) {
    note_slot(data, chore, true, ms);
}

fn note_slot(data: &Path, chore: Chore, ran: bool, ms: u64) {
    let mut chores = Chores::read(data);
    chores.format = CHORES_FORMAT;
    *chores.slot(chore, ran) = Some(ms);
    let path = data.join(CHORES);
    let written = serde_json::to_vec(&chores)
        .map_err(std::io::Error::other)
        .and_then(|bytes| ublk_mirror_common::fsutil::replace(&path, &bytes));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), "cannot note when {chore:?} ran: {e}");
    }
}

/// How long to wait for the first run of `chore`, which runs `every`: what
/// is left of `every` since it last ran here (none left: at once). Never
/// ran: its clock starts now.
fn first_wait(data: &Path, chore: Chore, every: Duration) -> Duration {
    let now = now_ms();
    let mut chores = Chores::read(data);
    let since = chores.slot(chore, true).or(*chores.slot(chore, false));
    match since {
        // A clock set back leaves a last run "in the future": a whole turn.
        Some(last) if last <= now => every.saturating_sub(Duration::from_millis(now - last)),
        _ => {
            note_slot(data, chore, false, now);
            every
        }
    }
}

/// When `chore` last ran here (ms), if it did.
pub fn last_ran(data: &Path, chore: Chore) -> Option<u64> {
    *Chores::read(data).slot(chore, true)
}

/// Garbage-collect the chunk store every `every`, with the store's window,
/// forever (`every` zero: never), counting from its last run here (kept in
/// the data directory `data`). Another server's run at the same time
/// is refused by the store's lock, and this one tries at its next turn.
pub async fn collect(volumes: Arc<Volumes>, data: PathBuf, every: Duration, window: Duration) {
    let Some(store) = volumes.chunk_store().cloned() else {
        return;
    };
    if every.is_zero() {
        return;
    }
    let mut wait = first_wait(&data, Chore::Gc, every);
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        let store = store.clone();
        let done = tokio::task::spawn_blocking(move || store.gc_at_least(window, |_| {})).await;
        note(&data, Chore::Gc, now_ms());
        match done {
            Ok(Ok(r)) => tracing::info!(?r, "chunk store garbage collection"),
            Ok(Err(e)) => tracing::warn!("chunk store garbage collection: {e}"),
            Err(e) => tracing::error!("chunk store garbage collection panicked: {e}"),
        }
    }
}

/// Verify the chunk store every `every` ("0s": never), counting from its
/// last run here (kept in the data directory `data`), repairing from this
/// server's images what they still hold; damage left is logged as an error
/// and shown in the metrics.
pub async fn verify(volumes: Arc<Volumes>, data: PathBuf, every: Duration, metrics: Arc<Metrics>) {
    if every.is_zero() || volumes.chunk_store().is_none() {
        return;
    }
    let mut wait = first_wait(&data, Chore::Verify, every);
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        let v = volumes.clone();
        let done = tokio::task::spawn_blocking(move || v.verify(None, |_, _| {})).await;
        if let Ok(Ok(r)) = &done {
            let (repaired, unrepaired) = check_images(&volumes).await;
            let unrepaired = r.damaged.len() + r.damaged_segments.len() + unrepaired;
            metrics.verified(r.repaired.len() + repaired, unrepaired);
            note(&data, Chore::Verify, now_ms());
        }
        match done {
            Ok(Ok(r)) if r.is_clean() => {
                tracing::info!(
                    chunks = r.chunks,
                    repaired = r.repaired.len(),
                    "chunk store verified"
                )
            }
            Ok(Ok(r)) => {
                tracing::error!(damaged = ?r.damaged, segments = ?r.damaged_segments, "chunk store verify found damage it cannot repair here")
            }
            Ok(Err(e)) => tracing::warn!("chunk store verify: {e}"),
            Err(e) => tracing::error!("chunk store verify panicked: {e}"),
        }
    }
}

/// Check each image here against the version it holds, repairing what
/// differs ([`Volumes::check_image`]): the blocks repaired, and those left
/// differing.
async fn check_images(volumes: &Volumes) -> (usize, usize) {
    let (mut repaired, mut left) = (0, 0);
    for (name, _) in volumes.states() {
        match volumes.check_image(&name).await {
            Ok(c) => {
                repaired += c.repaired as usize;
                left += (c.damaged - c.repaired) as usize;
                if c.damaged > c.repaired {
                    tracing::error!(volume = %name, ?c, "blocks of the image differ from its version and could not be repaired");
                } else if c.damaged > 0 {
                    tracing::warn!(volume = %name, ?c, "blocks of the image differed from its version: repaired from the chunk store");
                }
            }
            Err(e) => tracing::warn!(volume = %name, "checking the image: {e}"),
        }
    }
    (repaired, left)
}

/// One volume's turn: its snapshot if one is due, then its pruning.
async fn visit(
    volumes: &Volumes,
    client: &str,
    name: &str,
    policy: &SnapshotPolicy,
    metrics: &Metrics,
    prune: bool,
) {
    let v = match volumes.open(client, name, None) {
        Ok(v) => v,
        Err(e) => {
            // No snapshot and no pruning for it: said, each turn.
            tracing::error!(volume = %format!("{client}/{name}"), "snapshot schedule: the volume cannot be opened: {e}");
            return;
        }
    };
    let mut v = v.lock().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let published = v.state().published_epoch;
    let changed = published > 0
        && v.snapshots()
            .list()
            .last()
            .is_none_or(|s| s.epoch < published);
    // Counted from the newest taken by now: ones "in the future" (the
    // clock went back) neither stop the schedule until the clock catches
    // up with them, nor make every turn take one.
    let due = v
        .snapshots()
        .last_scheduled_ms_by(now)
        .is_none_or(|last| now.saturating_sub(last) >= policy.every.0.as_millis() as u64);
    let done = tokio::task::block_in_place(|| -> Result<()> {
        if changed && due {
            let info = v.snapshot(None, Kind::Scheduled)?;
            tracing::info!(volume = %format!("{client}/{name}"), snapshot = %info.name, epoch = info.epoch, "scheduled snapshot");
        }
        if !prune {
            return Ok(());
        }
        // The store's snapshots once per `every`, as they are taken (an
        // hour where none are).
        let stored_every = Some(policy.every.0)
            .filter(|e| !e.is_zero())
            .unwrap_or(Duration::from_secs(3600));
        let pruned = v.prune_snapshots(&policy.retention, stored_every)?;
        if !pruned.is_empty() {
            tracing::info!(volume = %format!("{client}/{name}"), ?pruned, "snapshots pruned");
            metrics.pruned(&format!("{client}/{name}"), pruned.len());
        }
        Ok(())
    });
    if let Err(e) = done {
        tracing::error!(volume = %format!("{client}/{name}"), "snapshot schedule: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_chores_clocks_go_on_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let week = Duration::from_secs(7 * 86400);
        let day = Duration::from_secs(86400);
        // Never ran: a whole turn, and the clock starts now (a restart
        // tomorrow waits six days, not seven).
        assert_eq!(first_wait(data, Chore::Verify, week), week);
        assert!(
            last_ran(data, Chore::Verify).is_none(),
            "a clock started is no run"
        );
        let left = first_wait(data, Chore::Verify, week);
        assert!(
            left <= week && left > week - Duration::from_secs(60),
            "{left:?}"
        );
        assert!(
            last_ran(data, Chore::Gc).is_none(),
            "one chore's clock is not the other's"
        );
        note(data, Chore::Verify, now_ms() - 6 * 86_400_000);
        let left = first_wait(data, Chore::Verify, week);
        assert!(
            left <= day && left > day - Duration::from_secs(60),
            "{left:?}"
        );
        // Overdue: at once.
        note(data, Chore::Verify, now_ms() - 8 * 86_400_000);
        assert_eq!(first_wait(data, Chore::Verify, week), Duration::ZERO);
        // GC's own clock, untouched by verify's.
        assert_eq!(first_wait(data, Chore::Gc, day), day);
        // A last run "in the future" (the clock was set back): a whole turn.
        note(data, Chore::Verify, now_ms() + 86_400_000);
        assert_eq!(first_wait(data, Chore::Verify, week), week);
        // An unreadable file only starts the clocks again.
        std::fs::write(data.join(CHORES), b"{oops").unwrap();
        assert_eq!(first_wait(data, Chore::Verify, week), week);
        assert!(last_ran(data, Chore::Verify).is_none());
    }

    #[test]
    fn a_wall_clock_jump_ahead_holds_pruning_off_for_a_while() {
        let t0 = Instant::now();
        let day = 24 * 3600 * 1000u64;
        let w0 = 1_800_000_000_000u64;
        let mut c = ClockWatch::default();
        assert!(c.prune_allowed(t0, w0));
        // 30 s later, the clock says 30 s later: fine.
        let t1 = t0 + Duration::from_secs(30);
        assert!(c.prune_allowed(t1, w0 + 30_000));
        // 30 s later, the clock says 90 days later: held.
        let t2 = t1 + Duration::from_secs(30);
        assert!(!c.prune_allowed(t2, w0 + 90 * day));
        // Still held an hour on, whatever the clock says now...
        let t3 = t2 + Duration::from_secs(3600);
        assert!(!c.prune_allowed(t3, w0 + 60_000 + 3_600_000));
        // ...and allowed once the hold is over.
        let t4 = t2 + CLOCK_HOLD;
        assert!(c.prune_allowed(t4, w0 + 60_000 + CLOCK_HOLD.as_millis() as u64));
        // A clock that goes back does not stop pruning.
        let t5 = t4 + Duration::from_secs(30);
        assert!(c.prune_allowed(t5, w0 - day));
    }
}
