//! Pull restore: a volume, as of a snapshot, a time or now, written to a
//! file or block device over the enrolled QUIC link.
//!
//! The target's blocks are hashed here and the digests sent; the server
//! answers with only the blocks whose content differs (zero blocks as
//! holes), so restoring onto an older copy moves only what changed, and a
//! restore that was interrupted is finished by running it again. One that
//! loses the mirror under way tries again by itself for [`RETRY_FOR`],
//! going on from the last batch done, with the same version. A new
//! file is made sparse and counts as all zeroes, so only the data travels.
//! What to ask and what to accept is decided by
//! [`ublk_mirror_common::session::restore::RestoreReader`] (up to
//! [`IN_FLIGHT`] batches asked at once); this module opens the target,
//! hashes, and writes.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk_mirror_common::block::{self, BLOCK};
use ublk_mirror_common::client::{Link, Restoring, Taken};
use ublk_mirror_common::fsutil;
use ublk_mirror_common::proto::Digest;
use ublk_mirror_common::session::restore::BlockToWrite;
pub use ublk_mirror_common::session::restore::{Progress, IN_FLIGHT};
use ublk_mirror_common::ByteSize;

use crate::enrollment::Enrollment;
use crate::error::{Error, ErrorKind, Result};
use crate::{blocking, joined};

/// What to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The volume on the server.
    pub volume: String,
    /// A snapshot name or a time; `None`: the mirror as it is now.
    pub at: Option<String>,
    /// A file (made if missing) or a block device.
    pub to: PathBuf,
    /// This machine's enrollment.
    pub client_dir: PathBuf,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The snapshot read.
    pub snapshot: String,
    /// The epoch it holds.
    pub epoch: u64,
    /// When that epoch was published (ms since the Unix epoch).
    pub epoch_ms: u64,
    /// The volume's size.
    pub size: u64,
    /// Blocks the target held already.
    pub blocks_same: u64,
    /// Blocks received and written.
    pub blocks_received: u64,
    /// Their bytes on the wire.
    pub wire_bytes: u64,
    /// Times the link was lost under way and the restore went on.
    pub reconnects: u64,
}

fn link_err(e: ublk_mirror_common::Error) -> Error {
    Error::Mirror(e)
}

/// Open (or make) the target for a volume of `size` bytes; `true` when it
/// is new (all zeroes). It is locked as a device's backing file is
/// (`flock`): a restore onto the backing file of a running device, or onto
/// the target of an instant restore, is refused.
fn open_target(path: &Path, size: u64) -> Result<(File, bool)> {
    let (file, fresh) = open_target_unlocked(path, size)?;
    match crate::backing::lock(&file) {
        Ok(()) => Ok((file, fresh)),
        Err(nix::errno::Errno::EWOULDBLOCK) => Err(Error::BackingInUse {
            path: path.to_path_buf(),
            holder: ": a ublk-mirror device serves it (`ublk-mirror list`: delete that device \
                     first), or another restore writes it (let it finish)"
                .into(),
        }),
        Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
    }
}

fn open_target_unlocked(path: &Path, size: u64) -> Result<(File, bool)> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A whole disk: readable by its owner only, as the device is.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
            file.set_len(size)
                .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
            return Ok((file, true));
        }
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    if meta.file_type().is_block_device() {
        // O_EXCL: refused while the device is mounted or otherwise held.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
            .map_err(|e| {
                Error::io(
                    format!("opening {} (is it mounted or in use?)", path.display()),
                    e,
                )
            })?;
        let have = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
        if have < size {
            return Err(Error::InvalidConfig(format!(
                "{} holds {have} bytes; the volume is {size}",
                path.display()
            )));
        }
        return Ok((file, false));
    }
    if !meta.is_file() {
        return Err(Error::InvalidConfig(format!(
            "{} is neither a file nor a block device",
            path.display()
        )));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    match meta.len() {
        0 => {
            file.set_len(size)
                .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
            Ok((file, true))
        }
        n if n == size => Ok((file, false)),
        n => Err(Error::InvalidConfig(format!(
            "{} is {n} bytes and the volume {size}: restore to a new file, or onto an older copy of this volume",
            path.display()
        ))),
    }
}

/// The digests of the target's `blocks` (a new target is all zeroes).
fn local_digests(
    file: &File,
    fresh: bool,
    blocks: &[(u64, u32)],
    streamed: &fsutil::Streamed,
) -> Result<Vec<Digest>> {
    let mut buf = vec![0u8; BLOCK as usize];
    blocks
        .iter()
        .map(|&(at, len)| {
            if fresh {
                return Ok(block::zero_digest(len));
            }
            let bytes = &mut buf[..len as usize];
            file.read_exact_at(bytes, at)
                .map_err(|e| Error::io("reading the restore target", e))?;
            streamed.moved(file, u64::from(len));
            Ok(block::digest(bytes))
        })
        .collect()
}

/// How long a restore under way whose link to the mirror fails keeps
/// trying again, counted from the first failure since it last moved on:
/// it reconnects and goes on where it was (the same version, the batches
/// done not compared again), so that a dropped link or a server restart
/// does not end an hours-long restore. (A mirror out of reach when the
/// restore starts is an error at once.)
pub const RETRY_FOR: Duration = Duration::from_secs(600);

/// The longest wait between two tries.
const RETRY_WAIT_MAX: Duration = Duration::from_secs(30);

/// Where a restore whose link failed was: the version it read, and how
/// far it got.
#[derive(Debug, Clone)]
struct Resume {
    /// The snapshot read (asked for by name on the next try when the
    /// user named a version: a time is read again as another instant).
    snapshot: String,
    epoch: u64,
    size: u64,
    /// The target was new (all zeroes) when the restore began: past
    /// `progress.done` it still is, or holds this version's blocks.
    fresh: bool,
    progress: Progress,
    /// The target, kept open (and locked) between tries: nothing else
    /// writes it meanwhile.
    file: Arc<File>,
}

/// Restore per `req`, calling `progress` after each batch. A failed link
/// is tried again for [`RETRY_FOR`] (said in the log), going on where the
/// restore was.
pub fn restore(
    req: &RestoreRequest,
    mut progress: impl FnMut(&Progress) + Send,
) -> Result<Restored> {
    let enrollment = Enrollment::load(&req.client_dir)?;
    let identity = crate::enrollment::load_identity(&req.client_dir)?;
    let server = enrollment.server()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the network runtime", e))?;
    rt.block_on(async {
        let mut resume: Option<Resume> = None;
        let mut reconnects = 0;
        let mut failing: Option<(Instant, u64)> = None;
        let mut wait = Duration::from_secs(1);
        loop {
            let tried = async {
                let link = Link::connect(&identity, server, &enrollment.address)
                    .await
                    .map_err(link_err)?;
                let done = run(&link, req, &mut resume, &mut progress).await;
                link.close().await;
                done
            }
            .await;
            // A mirror out of reach from the start is said at once; one
            // lost under way is waited for.
            let e = match tried {
                Err(e) if e.kind() == ErrorKind::Link && resume.is_some() => e,
                Ok(r) => return Ok(Restored { reconnects, ..r }),
                Err(e) => return Err(e),
            };
            let done = resume.as_ref().map_or(0, |r| r.progress.done);
            // Counted from the first failure since the restore moved on.
            let since = match failing {
                Some((since, at)) if at == done => since,
                _ => {
                    // A loss (tries that fail meanwhile are not counted).
                    reconnects += 1;
                    wait = Duration::from_secs(1);
                    Instant::now()
                }
            };
            failing = Some((since, done));
            if since.elapsed() >= RETRY_FOR {
                // A time asked for would name another snapshot later.
                if let (Some(_), Some(r)) = (&req.at, &resume) {
                    tracing::warn!(
                        "to finish this restore, run it again with --at {}: the snapshot it read",
                        r.snapshot
                    );
                }
                return Err(e);
            }
            tracing::warn!(
                "the restore lost the mirror ({e}); trying again in {}s, going on from {}",
                wait.as_secs(),
                ByteSize(done)
            );
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_WAIT_MAX);
        }
    })
}

async fn run(
    link: &Link,
    req: &RestoreRequest,
    resume: &mut Option<Resume>,
    progress: &mut (impl FnMut(&Progress) + Send),
) -> Result<Restored> {
    // A version named by the user is asked for again by the snapshot's
    // name (a time would be read as another instant now); the mirror
    // "now" is asked for again, and gone on with where it is the same
    // epoch.
    let at = match (&req.at, resume.as_ref()) {
        (Some(_), Some(r)) => Some(r.snapshot.clone()),
        _ => req.at.clone(),
    };
    let mut restoring = link
        .restore(&req.volume, at.as_deref())
        .await
        .map_err(link_err)?;
    let info = restoring.info().clone();
    let size = info.size;
    // The target an earlier try kept open (a volume whose size changed
    // meanwhile: opened again, and refused for its size).
    let prior = resume.take().filter(|r| r.size == size);
    let (file, fresh) = match &prior {
        Some(r) => (r.file.clone(), false),
        None => {
            let to = req.to.clone();
            let (f, fresh) = blocking("a restore worker", move || open_target(&to, size)).await?;
            (Arc::new(f), fresh)
        }
    };
    // Another version than an earlier try's (the mirror moved on) is
    // compared from the start (the target, no longer new, holds part of
    // that one).
    let earlier = prior.as_ref().map(|r| r.epoch);
    let same = prior
        .filter(|r| r.epoch == info.epoch && (req.at.is_none() || r.snapshot == info.snapshot));
    if let (Some(was), None) = (earlier, &same) {
        tracing::warn!(
            "the mirror now is another version (epoch {}, was {was}): comparing the target from the start",
            info.epoch
        );
    }
    let fresh = match &same {
        Some(r) => {
            restoring.resume(r.progress);
            r.fresh
        }
        None => fresh,
    };
    let mut state = same.unwrap_or_else(|| Resume {
        snapshot: info.snapshot.clone(),
        epoch: info.epoch,
        size,
        fresh,
        progress: Progress::default(),
        file: file.clone(),
    });
    state.progress = restoring.progress();
    // Kept where the next try finds it, moving on with each batch.
    let state = resume.insert(state);
    exchange(&mut restoring, &file, fresh, progress, &mut state.progress).await?;
    let last = state.progress;
    restoring.finish();
    let f = file.clone();
    blocking("a restore worker", move || {
        f.sync_all()
            .map_err(|e| Error::io("syncing the restore target", e))
    })
    .await?;
    Ok(Restored {
        snapshot: info.snapshot,
        epoch: info.epoch,
        epoch_ms: info.epoch_ms,
        size,
        blocks_same: last.blocks_same,
        blocks_received: last.blocks_received,
        wire_bytes: last.received,
        reconnects: 0,
    })
}

/// Ask (the target's digests, a window of batches ahead) and take (the
/// blocks that differ, verified, written in place) until every batch is
/// answered, keeping the progress in `last`. The batch to ask next is hashed on a
/// blocking thread while blocks are taken, so reading the target and
/// writing it overlap.
async fn exchange(
    restoring: &mut Restoring,
    file: &Arc<File>,
    fresh: bool,
    progress: &mut (impl FnMut(&Progress) + Send),
    last: &mut Progress,
) -> Result<()> {
    // A whole volume passes through: it is kept out of the page cache.
    let streamed = Arc::new(fsutil::Streamed::new());
    let hash = |batch: Vec<(u64, u32)>| {
        let (f, s) = (file.clone(), streamed.clone());
        tokio::task::spawn_blocking(move || local_digests(&f, fresh, &batch, &s))
    };
    let mut ahead = restoring.upcoming().map(hash);
    loop {
        while let Some(batch) = restoring.next_batch() {
            // Hashed ahead: `upcoming` was this batch.
            let job = ahead.take().unwrap_or_else(|| hash(batch.clone()));
            let digests = joined("a restore worker", job).await?;
            restoring.have(&batch, digests).await.map_err(link_err)?;
            ahead = restoring.upcoming().map(hash);
        }
        if restoring.is_done() {
            return Ok(());
        }
        match restoring.next().await.map_err(link_err)? {
            Taken::Write(block) => {
                let (f, s) = (file.clone(), streamed.clone());
                blocking("a restore worker", move || write_block(&f, &block, &s)).await?;
            }
            Taken::Progress(p) => {
                *last = p;
                progress(&p);
            }
        }
    }
}

/// Decode and verify one block, then write it (a hole for zeroes).
fn write_block(file: &File, block: &BlockToWrite, streamed: &fsutil::Streamed) -> Result<()> {
    let (offset, len) = (block.offset, block.len);
    match block.decode().map_err(link_err)? {
        Some(p) => {
            file.write_all_at(&p, offset)
                .map_err(|e| Error::io("writing the restore target", e))?;
            streamed.moved(file, p.len() as u64);
            Ok(())
        }
        None => fsutil::punch_or_zero(file, offset, u64::from(len))
            .map_err(|e| Error::io("zeroing in the restore target", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target that a device holds (the backing file's `flock`) is
    /// refused, and nothing is written to it; free, it opens.
    #[test]
    fn a_target_a_device_holds_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let held = crate::backing::Backing::open(&crate::backing::BackingOptions {
            path: &path,
            size: None,
            create: false,
            block_size: 512,
            direct_io: false,
        })
        .unwrap();
        let e = open_target(&path, 8192).unwrap_err();
        assert!(matches!(e, Error::BackingInUse { .. }), "{e}");
        assert!(e.to_string().contains("delete that device"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 8192]);
        drop(held);
        let (_, fresh) = open_target(&path, 8192).unwrap();
        assert!(!fresh);
    }
}
