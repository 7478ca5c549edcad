//! The control socket of a running device: seal, list, read and release
//! epochs from another process (the `ublk-mirror epoch` commands, scripts).
//!
//! # Protocol, version 1
//!
//! The daemon listens on `/run/ublk-mirror/NNNN.sock` (mode 0600: root
//! only). One request per connection: the client writes one JSON line; the
//! daemon answers with one JSON line, `{"ok": ...}` or
//! `{"error": {"message": "...", "kind": "usage"|"device"|"system"|"link"|"refused"|"peer"}}`
//! (the last three: the mirror server could not be reached, refused, or
//! broke the protocol; a client that does not know a kind takes it as
//! "system").
//!
//! ```text
//! {"version":1,"op":"seal","at_flush":true,"timeout_ms":2000}  -> {"ok":{"epoch":N}}
//! {"version":1,"op":"epochs"}                      -> {"ok":{"current":N,"released":R,"sealed":[...]}}
//! {"version":1,"op":"release","epoch":N}           -> {"ok":{"epoch":N,"released":B,"regions_cleared":K,"resync_done":B}}
//! {"version":1,"op":"sync","timeout_ms":T}         -> {"ok":{"released":N}} once all written before is mirrored
//! {"version":1,"op":"read","epoch":N}              -> {"ok":{"epoch":N,"bytes":B}}
//!                                                     then extents, then {"end":true}
//! ```
//!
//! After a `read`'s `ok` line come the extents of everything the epoch
//! changed, ascending, as the device was at its cut: each is a JSON line
//! `{"offset":O,"len":L,"zero":Z}`, followed by `L` raw bytes unless `Z`
//! (the extent reads as zeroes). The stream ends with `{"end":true}`, or
//! `{"error":...}` if the read failed midway. A request with a `version`
//! this daemon does not speak is answered with an error naming its own.
//!
//! A mirrored instant restore refuses `seal` until its replicator has
//! opened the first epoch, which compares the whole device with the
//! mirror (an epoch sealed before would ship the old image plus a few
//! writes: a disk that never was), and answers `sync` at once with an
//! error while it fills.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::replicator::Handle;
use crate::status::STATUS_DIR;
use crate::tracking::{EpochInfo, Released, SealAt, Tracker, MAX_EPOCH_READ};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// Bytes per extent of a read, the unit in which zeroes are recognised.
const EXTENT: u64 = 64 << 10;

/// The control socket of device `id`.
pub fn path(id: u32) -> PathBuf {
    PathBuf::from(format!("{STATUS_DIR}/{id:04}.sock"))
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Seal the current epoch.
    Seal {
        /// Cut at the next FLUSH (else at once).
        at_flush: bool,
        /// How long to wait for a FLUSH before cutting anyway.
        timeout_ms: u64,
    },
    /// The epochs.
    Epochs,
    /// Release the oldest sealed epoch (epochs are released in order).
    Release {
        /// The epoch.
        epoch: u64,
    },
    /// Read what the epoch changed, as the device at its cut.
    Read {
        /// The epoch.
        epoch: u64,
    },
    /// Wait until everything written before this request is on the
    /// mirror (asking the replicator for a cut now).
    Sync {
        /// How long to wait at most.
        timeout_ms: u64,
    },
}

/// The answer to `sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// The last epoch released (on the mirror).
    pub released: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    version: u32,
    #[serde(flatten)]
    request: Request,
}

/// The epochs of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochList {
    /// The current (open) epoch.
    pub current: u64,
    /// The last released epoch.
    pub released: u64,
    /// Sealed, unreleased epochs, oldest first.
    pub sealed: Vec<EpochInfo>,
}

/// The answer to `seal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealReply {
    /// The epoch sealed.
    pub epoch: u64,
}

/// The start of a read's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReply {
    /// The epoch.
    pub epoch: u64,
    /// Bytes the extents cover.
    pub bytes: u64,
}

/// One extent of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Device offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Reads as zeroes (no bytes follow).
    pub zero: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireError {
    message: String,
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply<T> {
    Ok(T),
    Error(WireError),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum StreamLine {
    Extent(Extent),
    End { end: bool },
    Error { error: WireError },
}

/// Serves the control socket until dropped.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    /// The listening socket, shut down to end the accept loop.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Listen on device `id`'s socket (replacing a stale one). `mirror`
    /// is the replicator's handle, if the device is mirrored.
    pub fn start(id: u32, tracker: Arc<Tracker>, mirror: Option<Handle>) -> Result<Server> {
        Server::start_at(&path(id), tracker, mirror)
    }

    /// Listen on `path`.
    pub fn start_at(path: &Path, tracker: Arc<Tracker>, mirror: Option<Handle>) -> Result<Server> {
        let ctx = |what: &str| format!("{what} control socket {}", path.display());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(ctx("creating the directory of"), e))?;
        }
        // A socket file left by a daemon that died: nobody listens on it.
        if path.exists() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|e| Error::io(ctx("binding"), e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(ctx("restricting"), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accepting = listener
            .try_clone()
            .map_err(|e| Error::io(ctx("duplicating"), e))?;
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in accepting.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    let conn = match conn {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of descriptors, say: do not spin.
                            tracing::warn!("control socket: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    let tracker = tracker.clone();
                    let mirror = mirror.clone();
                    let spawned = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve(conn, &tracker, mirror.as_ref()) {
                                tracing::debug!("control connection ended: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("cannot serve a control connection: {e}");
                    }
                }
            })
            .map_err(|e| Error::io("starting the control thread", e))?;
        Ok(Server {
            path: path.to_path_buf(),
            listener,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, which then sees the flag.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn kind_name(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::Usage => "usage",
        ErrorKind::Device => "device",
        ErrorKind::Environment | ErrorKind::System => "system",
        ErrorKind::Link => "link",
        ErrorKind::Refused => "refused",
        ErrorKind::Peer => "peer",
    }
}

fn wire_error(e: &Error) -> WireError {
    WireError {
        message: e.to_string(),
        kind: kind_name(e).into(),
    }
}

fn send_line(out: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

fn serve(conn: UnixStream, tracker: &Tracker, mirror: Option<&Handle>) -> std::io::Result<()> {
    // A client that connects and says nothing does not hold a thread forever.
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?).take(MAX_REQUEST);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut out = std::io::BufWriter::new(conn);
    let envelope: Envelope = match serde_json::from_str(&line) {
        Ok(e) => e,
        Err(e) => {
            let err = Error::InvalidConfig(format!("bad control request: {e}"));
            return send_line(&mut out, &Reply::<()>::Error(wire_error(&err)));
        }
    };
    if envelope.version != VERSION {
        let err = Error::InvalidConfig(format!(
            "control protocol version {} is not spoken here (this daemon speaks {VERSION})",
            envelope.version
        ));
        return send_line(&mut out, &Reply::<()>::Error(wire_error(&err)));
    }
    fn answer<T: Serialize>(out: &mut impl Write, r: Result<T>) -> std::io::Result<()> {
        match r {
            Ok(v) => send_line(out, &Reply::Ok(v)),
            Err(e) => send_line(out, &Reply::<()>::Error(wire_error(&e))),
        }
    }
    match envelope.request {
        Request::Seal {
            at_flush,
            timeout_ms,
        } => {
            let at = if at_flush {
                SealAt::Flush(Duration::from_millis(timeout_ms))
            } else {
                SealAt::Now
            };
            let sealed = match mirror {
                Some(m) if !m.started() => Err(Error::Daemon {
                    message: "this device is an instant restore whose mirroring has not begun: \
                              its first epoch compares the whole device with the mirror once \
                              every block is local and the mirror is reached, and an epoch \
                              sealed before it would make a version of a disk that never was \
                              (see `ublk-mirror status`)"
                        .into(),
                    kind: ErrorKind::Device,
                }),
                _ => tracker.seal(at).map(|epoch| SealReply { epoch }),
            };
            answer(&mut out, sealed)?;
        }
        Request::Epochs => {
            let s = tracker.status();
            answer(
                &mut out,
                Ok(EpochList {
                    current: s.current_epoch,
                    released: s.released_epoch,
                    sealed: s.sealed,
                }),
            )?;
        }
        Request::Sync { timeout_ms } => {
            answer(
                &mut out,
                sync(tracker, mirror, Duration::from_millis(timeout_ms)),
            )?;
        }
        Request::Release { epoch } => {
            let r: Result<Released> = if mirror.is_some() {
                Err(Error::InvalidConfig(
                    "this device is mirrored: the replicator releases its epochs once the mirror has them".into(),
                ))
            } else {
                tracker.release(epoch)
            };
            answer(&mut out, r)?;
        }
        Request::Read { epoch } => match tracker.epoch(epoch) {
            Err(e) => answer::<()>(&mut out, Err(e))?,
            Ok(sealed) if sealed.precopy => answer::<()>(
                &mut out,
                Err(Error::InvalidConfig(format!(
                    "epoch {epoch} is a pre-copy round of the mirror (the device as it is, not a cut): it cannot be read as a cut"
                ))),
            )?,
            Ok(sealed) => {
                let touched = sealed.changes.touched();
                answer(
                    &mut out,
                    Ok(ReadReply {
                        epoch,
                        bytes: touched.len(),
                    }),
                )?;
                let streamed = touched
                    .iter()
                    .try_for_each(|r| stream_range(&mut out, tracker, epoch, r));
                match streamed {
                    Ok(()) => send_line(&mut out, &StreamLine::End { end: true })?,
                    Err(StreamError::Tracker(e)) => send_line(
                        &mut out,
                        &StreamLine::Error {
                            error: wire_error(&e),
                        },
                    )?,
                    Err(StreamError::Io(e)) => return Err(e),
                }
            }
        },
    }
    out.flush()
}

/// Wait until every change recorded before now is released (on the mirror).
fn sync(tracker: &Tracker, mirror: Option<&Handle>, timeout: Duration) -> Result<SyncReply> {
    let Some(mirror) = mirror else {
        return Err(Error::InvalidConfig(
            "this device is not mirrored (add it with --mirror VOLUME)".into(),
        ));
    };
    if mirror.filling() {
        // Hours, for a big disk: no use waiting out a timeout.
        return Err(Error::Daemon {
            message: "this device is an instant restore not filled yet: it begins mirroring \
                      once every block is local (see `ublk-mirror status`); sync then"
                .into(),
            kind: ErrorKind::Device,
        });
    }
    let mut target = tracker.sync_target();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // An epoch that broke (a chunk could not be kept for its cut) is
        // released unsent, its changes moved into a later epoch: that one
        // is then what holds them.
        let released;
        (released, target) = tracker.sync_progress(target);
        if released >= target {
            return Ok(SyncReply { released });
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Daemon {
                message: format!(
                    "not everything is on the mirror after {} ms (released epoch {released}, waiting for {target}); see `ublk-mirror status`",
                    timeout.as_millis()
                ),
                kind: ErrorKind::Device,
            });
        }
        mirror.kick();
        std::thread::sleep(Duration::from_millis(50));
    }
}

enum StreamError {
    Tracker(Error),
    Io(std::io::Error),
}

fn stream_range(
    out: &mut impl Write,
    tracker: &Tracker,
    epoch: u64,
    range: std::ops::Range<u64>,
) -> std::result::Result<(), StreamError> {
    let mut buf = vec![0u8; MAX_EPOCH_READ as usize];
    let mut at = range.start;
    while at < range.end {
        let len = (range.end - at).min(MAX_EPOCH_READ);
        let piece = &mut buf[..len as usize];
        tracker
            .read_epoch(epoch, at, piece)
            .map_err(StreamError::Tracker)?;
        // A cut the mirror let go of meanwhile (it sends the epoch as a
        // pre-copy round) reads as the device is now: from the moment it
        // was demoted, what is read is no longer the cut. Checked after
        // the read, so a demotion before it is always seen.
        if tracker
            .sealed_epochs()
            .iter()
            .any(|&(id, precopy)| id == epoch && precopy)
        {
            return Err(StreamError::Tracker(Error::InvalidConfig(format!(
                "epoch {epoch} became a pre-copy round of the mirror while it was read (the device as it is, not a cut): what was read is not a cut"
            ))));
        }
        for (i, part) in piece.chunks(EXTENT as usize).enumerate() {
            let zero = ublk_mirror_common::block::is_zero(part);
            let extent = Extent {
                offset: at + i as u64 * EXTENT,
                len: part.len() as u64,
                zero,
            };
            send_line(out, &StreamLine::Extent(extent)).map_err(StreamError::Io)?;
            if !zero {
                out.write_all(part).map_err(StreamError::Io)?;
            }
        }
        at += len;
    }
    Ok(())
}

/// A connection to a device's control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
}

/// What went wrong talking to a daemon.
fn client_error(path: &Path, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Error::Daemon {
            message: format!(
                "no daemon answers at {}: is the device's daemon running, with change tracking on? (see `ublk-mirror list`)",
                path.display()
            ),
            kind: ErrorKind::Device,
        },
        _ => Error::io(format!("talking to the daemon at {}", path.display()), e),
    }
}

impl Client {
    /// The daemon of device `id`.
    pub fn for_device(id: u32) -> Client {
        Client { path: path(id) }
    }

    /// The daemon listening on `path`.
    pub fn at(path: &Path) -> Client {
        Client {
            path: path.to_path_buf(),
        }
    }

    fn request(&self, request: Request) -> Result<BufReader<UnixStream>> {
        let io = |e| client_error(&self.path, e);
        let mut conn = UnixStream::connect(&self.path).map_err(io)?;
        send_line(
            &mut conn,
            &Envelope {
                version: VERSION,
                request,
            },
        )
        .map_err(io)?;
        Ok(BufReader::new(conn))
    }

    fn reply<T: for<'de> Deserialize<'de>>(&self, conn: &mut BufReader<UnixStream>) -> Result<T> {
        let mut line = String::new();
        conn.read_line(&mut line)
            .map_err(|e| client_error(&self.path, e))?;
        let bad = |e: serde_json::Error| {
            client_error(
                &self.path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer: {e}")),
            )
        };
        match serde_json::from_str::<Reply<T>>(&line).map_err(bad)? {
            Reply::Ok(v) => Ok(v),
            Reply::Error(e) => Err(remote_error(e)),
        }
    }

    /// Seal the current epoch (at the next FLUSH within `flush_wait`, or
    /// at once when `None`); returns its number.
    pub fn seal(&self, flush_wait: Option<Duration>) -> Result<u64> {
        let mut conn = self.request(Request::Seal {
            at_flush: flush_wait.is_some(),
            timeout_ms: flush_wait.map_or(0, |d| d.as_millis() as u64),
        })?;
        Ok(self.reply::<SealReply>(&mut conn)?.epoch)
    }

    /// The device's epochs.
    pub fn epochs(&self) -> Result<EpochList> {
        let mut conn = self.request(Request::Epochs)?;
        self.reply(&mut conn)
    }

    /// Wait until everything written before this call is on the mirror.
    pub fn sync(&self, timeout: Duration) -> Result<SyncReply> {
        let mut conn = self.request(Request::Sync {
            timeout_ms: timeout.as_millis() as u64,
        })?;
        self.reply(&mut conn)
    }

    /// Release the oldest sealed epoch, `epoch`.
    pub fn release(&self, epoch: u64) -> Result<Released> {
        let mut conn = self.request(Request::Release { epoch })?;
        self.reply(&mut conn)
    }

    /// Read everything `epoch` changed, as the device at its cut: `each`
    /// gets every extent with its bytes (`None` for zeroes), ascending.
    /// Returns the bytes covered.
    pub fn read(
        &self,
        epoch: u64,
        mut each: impl FnMut(Extent, Option<&[u8]>) -> Result<()>,
    ) -> Result<u64> {
        let mut conn = self.request(Request::Read { epoch })?;
        let head: ReadReply = self.reply(&mut conn)?;
        let io = |e| client_error(&self.path, e);
        let mut buf = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if conn.read_line(&mut line).map_err(io)? == 0 {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the daemon closed the stream midway",
                )));
            }
            let parsed: StreamLine = serde_json::from_str(&line).map_err(|e| {
                io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad stream line: {e}"),
                ))
            })?;
            match parsed {
                StreamLine::End { .. } => return Ok(head.bytes),
                StreamLine::Error { error } => return Err(remote_error(error)),
                StreamLine::Extent(x) if x.zero => each(x, None)?,
                StreamLine::Extent(x) => {
                    if x.len > MAX_EPOCH_READ {
                        return Err(io(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "an extent larger than the protocol allows",
                        )));
                    }
                    buf.resize(x.len as usize, 0);
                    conn.read_exact(&mut buf).map_err(io)?;
                    each(x, Some(&buf))?;
                }
            }
        }
    }
}

fn remote_error(e: WireError) -> Error {
    let kind = match e.kind.as_str() {
        "usage" => ErrorKind::Usage,
        "device" => ErrorKind::Device,
        "link" => ErrorKind::Link,
        "refused" => ErrorKind::Refused,
        "peer" => ErrorKind::Peer,
        _ => ErrorKind::System,
    };
    Error::Daemon {
        message: e.message,
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_pinned() {
        let line = serde_json::to_string(&Envelope {
            version: VERSION,
            request: Request::Seal {
                at_flush: true,
                timeout_ms: 2000,
            },
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"op":"seal","at_flush":true,"timeout_ms":2000}"#
        );
        let line = serde_json::to_string(&Envelope {
            version: VERSION,
            request: Request::Read { epoch: 3 },
        })
        .unwrap();
        assert_eq!(line, r#"{"version":1,"op":"read","epoch":3}"#);
    }
}
