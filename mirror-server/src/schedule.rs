//! The snapshot schedule of a running server: for every volume whose
//! policy (`server.toml`'s `[snapshots]` and `[volumes."CLIENT/VOLUME"]`)
//! takes them, a snapshot when the volume changed since its last one and
//! `every` has passed since the last scheduled one; then pruning by its
//! retention. What a snapshot is belongs to [`crate::snapshots`].

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ServerConfig, SnapshotPolicy};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::snapshots::Kind;
use crate::volumes::Volumes;

/// Run the schedule of `config` over `volumes`, forever (returns at once
/// when no volume takes scheduled snapshots).
pub async fn run(config: ServerConfig, volumes: Arc<Volumes>, metrics: Arc<Metrics>) {
    let every: Vec<Duration> = std::iter::once(config.snapshots.every.0)
        .chain(config.volumes.values().map(|p| p.every.0))
        .filter(|d| !d.is_zero())
        .collect();
    let Some(shortest) = every.iter().min().copied() else {
        return;
    };
    let tick = (shortest / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        tokio::time::sleep(tick).await;
        for (client, name) in volumes.cached() {
            let policy = config.policy(&format!("{client}/{name}"));
            if policy.every.0.is_zero() {
                continue;
            }
            visit(&volumes, &client, &name, &policy, &metrics).await;
        }
    }
}

/// Garbage-collect the chunk store every `every`, with the store's window,
/// forever (`every` zero: never). Another server's run at the same time
/// is refused by the store's lock, and this one tries at its next turn.
pub async fn collect(volumes: Arc<Volumes>, every: Duration, window: Duration) {
    let Some(store) = volumes.chunk_store().cloned() else {
        return;
    };
    if every.is_zero() {
        return;
    }
    loop {
        tokio::time::sleep(every).await;
        let store = store.clone();
        let done = tokio::task::spawn_blocking(move || store.gc(window, |_| {})).await;
        match done {
            Ok(Ok(r)) => tracing::info!(?r, "chunk store garbage collection"),
            Ok(Err(e)) => tracing::warn!("chunk store garbage collection: {e}"),
            Err(e) => tracing::error!("chunk store garbage collection panicked: {e}"),
        }
    }
}

/// Verify the chunk store every `every` ("0s": never), repairing from this
/// server's images what they still hold; damage left is logged as an error
/// and shown in the metrics.
pub async fn verify(volumes: Arc<Volumes>, every: Duration, metrics: Arc<Metrics>) {
    if every.is_zero() || volumes.chunk_store().is_none() {
        return;
    }
    loop {
        tokio::time::sleep(every).await;
        let v = volumes.clone();
        let done = tokio::task::spawn_blocking(move || v.verify(None, |_, _| {})).await;
        if let Ok(Ok(r)) = &done {
            let unrepaired = r.damaged.len() + r.damaged_segments.len();
            metrics.verified(r.repaired.len(), unrepaired);
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

/// One volume's turn: its snapshot if one is due, then its pruning.
async fn visit(
    volumes: &Volumes,
    client: &str,
    name: &str,
    policy: &SnapshotPolicy,
    metrics: &Metrics,
) {
    let Ok(v) = volumes.open(client, name, None) else {
        return;
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
    let due = v
        .snapshots()
        .last_scheduled_ms()
        .is_none_or(|last| now.saturating_sub(last) >= policy.every.0.as_millis() as u64);
    let done = tokio::task::block_in_place(|| -> Result<()> {
        if changed && due {
            let info = v.snapshot(None, Kind::Scheduled)?;
            tracing::info!(volume = %format!("{client}/{name}"), snapshot = %info.name, epoch = info.epoch, "scheduled snapshot");
        }
        let pruned = v.prune_snapshots(&policy.retention)?;
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
