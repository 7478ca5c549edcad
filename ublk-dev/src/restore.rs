//! Pull restore: a volume, as of a snapshot, a time or now, written to a
//! file or block device over the enrolled QUIC link.
//!
//! The target's blocks are hashed here and the digests sent; the server
//! answers with only the blocks whose content differs (zero blocks as
//! holes), so restoring onto an older copy moves only what changed, and a
//! restore that was interrupted is finished by running it again. A new
//! file is made sparse and counts as all zeroes, so only the data travels.
//! Up to [`IN_FLIGHT`] batches are asked for at once.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ublk_mirror_common::block::{self, BLOCK};
use ublk_mirror_common::client::Link;
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::proto::{Digest, Encoding, Message, MAX_HASH_BLOCKS};
use ublk_mirror_common::{fsutil, wire};

use crate::enrollment::Enrollment;
use crate::error::{Error, Result};

/// Blocks per batch ([`Message::Have`]).
const BATCH: usize = 256;
/// Batches asked for at once.
pub const IN_FLIGHT: usize = 4;

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

/// How far a restore is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the volume compared and written so far.
    pub done: u64,
    /// The volume's size.
    pub total: u64,
    /// Block bytes received (after compression).
    pub received: u64,
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
}

fn link_err(e: ublk_mirror_common::Error) -> Error {
    Error::Mirror(e.to_string())
}

/// Open (or make) the target for a volume of `size` bytes; `true` when it
/// is new (all zeroes).
fn open_target(path: &Path, size: u64) -> Result<(File, bool)> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
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

/// The digests of the target's blocks `[offset, offset + n × BLOCK)`,
/// clipped to `size` (a new target is all zeroes).
fn local_digests(
    file: &File,
    fresh: bool,
    offset: u64,
    n: usize,
    size: u64,
) -> Result<Vec<Digest>> {
    let mut buf = vec![0u8; BLOCK as usize];
    block::run(offset, n, size)
        .map(|(at, len)| {
            if fresh {
                return Ok(block::zero_digest(len));
            }
            let bytes = &mut buf[..len as usize];
            file.read_exact_at(bytes, at)
                .map_err(|e| Error::io("reading the restore target", e))?;
            Ok(block::digest(bytes))
        })
        .collect()
}

/// Restore per `req`, calling `progress` after each batch.
pub fn restore(req: &RestoreRequest, progress: impl FnMut(&Progress) + Send) -> Result<Restored> {
    let enrollment = Enrollment::load(&req.client_dir)?;
    let identity = Identity::load(&req.client_dir).map_err(|e| {
        Error::InvalidConfig(format!("{e} (enroll first: `ublk-mirror enroll TOKEN`)"))
    })?;
    let server = enrollment.server()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the network runtime", e))?;
    rt.block_on(async {
        let link = Link::connect(&identity, server, &enrollment.address)
            .await
            .map_err(link_err)?;
        let done = run(&link, req, progress).await;
        link.close().await;
        done
    })
}

async fn run(
    link: &Link,
    req: &RestoreRequest,
    mut progress: impl FnMut(&Progress) + Send,
) -> Result<Restored> {
    let (mut send, mut recv) = link.stream().await.map_err(link_err)?;
    wire::send(
        &mut send,
        &Message::Restore {
            volume: req.volume.clone(),
            at: req.at.clone(),
        },
    )
    .await
    .map_err(link_err)?;
    let (size, snapshot, epoch, epoch_ms) = match wire::expect(&mut recv).await.map_err(link_err)? {
        Message::RestoreInfo {
            size,
            snapshot,
            epoch,
            epoch_ms,
        } => (size, snapshot, epoch, epoch_ms),
        Message::Refused { reason } => return Err(Error::Mirror(reason)),
        other => return Err(Error::Mirror(format!("unexpected answer {other:?}"))),
    };
    let to = req.to.clone();
    let (file, fresh) = tokio::task::spawn_blocking(move || open_target(&to, size))
        .await
        .map_err(|e| Error::Mirror(e.to_string()))??;
    let file = Arc::new(file);
    let batch = BATCH.min(MAX_HASH_BLOCKS);
    let batches = size.div_ceil(BLOCK * batch as u64);
    let window = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));

    // Ask: the target's digests, batch after batch, a few ahead.
    let asking = {
        let file = file.clone();
        let window = window.clone();
        async move {
            for b in 0..batches {
                window
                    .acquire()
                    .await
                    .map_err(|e| Error::Mirror(e.to_string()))?
                    .forget();
                let offset = b * BLOCK * batch as u64;
                let f = file.clone();
                let digests = tokio::task::spawn_blocking(move || {
                    local_digests(&f, fresh, offset, batch, size)
                })
                .await
                .map_err(|e| Error::Mirror(e.to_string()))??;
                wire::send(
                    &mut send,
                    &Message::Have {
                        offset,
                        len: BLOCK as u32,
                        digests,
                    },
                )
                .await
                .map_err(link_err)?;
            }
            let _ = send.finish();
            Ok::<(), Error>(())
        }
    };
    // Take: blocks that differ, verified, written in place.
    let taking = async {
        let mut out = Restored {
            snapshot: snapshot.clone(),
            epoch,
            epoch_ms,
            size,
            blocks_same: 0,
            blocks_received: 0,
            wire_bytes: 0,
        };
        let mut p = Progress {
            total: size,
            ..Progress::default()
        };
        let mut finished = 0u64;
        while finished < batches {
            match wire::expect(&mut recv).await.map_err(link_err)? {
                Message::Block {
                    offset,
                    len,
                    sha256,
                    encoding,
                    data_len,
                } => {
                    let payload = wire::recv_data(&mut recv, data_len)
                        .await
                        .map_err(link_err)?;
                    if offset
                        .checked_add(u64::from(len))
                        .is_none_or(|end| end > size)
                    {
                        return Err(Error::Mirror(format!(
                            "a block at {offset} is past the volume's end"
                        )));
                    }
                    let f = file.clone();
                    tokio::task::spawn_blocking(move || {
                        write_block(&f, offset, len, &sha256, encoding, &payload)
                    })
                    .await
                    .map_err(|e| Error::Mirror(e.to_string()))??;
                    out.blocks_received += 1;
                    out.wire_bytes += u64::from(data_len);
                    p.received += u64::from(data_len);
                }
                Message::HaveDone { same } => {
                    out.blocks_same += same;
                    finished += 1;
                    p.done = (finished * BLOCK * batch as u64).min(size);
                    progress(&p);
                    window.add_permits(1);
                }
                Message::Refused { reason } => return Err(Error::Mirror(reason)),
                other => return Err(Error::Mirror(format!("unexpected answer {other:?}"))),
            }
        }
        Ok(out)
    };
    let ((), out) = tokio::try_join!(asking, taking)?;
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .map_err(|e| Error::Mirror(e.to_string()))?
        .map_err(|e| Error::io("syncing the restore target", e))?;
    Ok(out)
}

/// Decode and verify one block, then write it (a hole for zeroes).
fn write_block(
    file: &File,
    offset: u64,
    len: u32,
    sha256: &Digest,
    encoding: Encoding,
    payload: &[u8],
) -> Result<()> {
    let plain = block::decode(len, sha256, encoding, payload)
        .map_err(|e| Error::Mirror(format!("block at {offset}: {e}")))?;
    match plain {
        Some(p) => file
            .write_all_at(&p, offset)
            .map_err(|e| Error::io("writing the restore target", e)),
        None => fsutil::punch_or_zero(file, offset, u64::from(len))
            .map_err(|e| Error::io("zeroing in the restore target", e)),
    }
}
