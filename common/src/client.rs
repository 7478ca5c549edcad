//! The client side of a connection to `mirror-server`: enrollment, opening
//! volumes, and the async driver of [`EpochSender`] that ships epochs
//! (over several data streams at once, resuming what an interrupted
//! attempt left on the server). What to send, resume, vouch for and send
//! again is decided by the state machine; this module only moves bytes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::block;
use crate::identity::{Fingerprint, Identity};
use crate::proto::{self, Digest, Encoding, Message, Version, Writer};
use crate::session::restore::{
    BlockReader, BlockToWrite, Progress, ReadStep, RestoreInfo, RestoreReader, RestoreStep,
};
pub use crate::session::send::Finish;
use crate::session::send::{DataSender, EpochSender, Held, SendAction, SendEvent};
use crate::session::{unexpected, Pacer};
use crate::{tls, wire, Error, Result};

pub use crate::session::Shipped;

/// A volume as the server has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Size in bytes.
    pub size: u64,
    /// The epoch its image holds (0: none yet).
    pub published_epoch: u64,
    /// Made when the volume was created (another one: another volume).
    pub uuid: [u8; 16],
    /// The device and local epoch the image holds.
    pub writer: Option<Writer>,
}

/// A volume's snapshots as the server lists them
/// ([`Link::list_snapshots`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotListing {
    /// Oldest point in time first.
    pub snapshots: Vec<proto::ListedSnapshot>,
    /// Why the list may lack snapshots, if it may (the server could not
    /// read its chunk store, where snapshots other servers took are).
    pub incomplete: Option<String>,
}

/// A connection to the server.
#[derive(Debug)]
pub struct Link {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// The bandwidth limit, if there is one.
    pacer: Option<SharedPacer>,
}

/// The bandwidth limit, shared by the data streams.
type SharedPacer = Arc<Mutex<Pacer>>;

/// Wait until the limit (if any) lets `bytes` more go.
async fn pace(pacer: &Option<SharedPacer>, bytes: u64) {
    let Some(pacer) = pacer else { return };
    let wait = pacer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .delay(std::time::Instant::now(), bytes);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// Data streams one epoch is sent over at once.
pub const DATA_STREAMS: usize = 4;

/// The blocks of one round of data streams, taken one at a time.
struct Work {
    blocks: Vec<(u64, u32)>,
    next: AtomicUsize,
}

impl Work {
    /// Up to `n` blocks at once (fewer, or none, near the end).
    fn take_many(&self, n: usize) -> Vec<(u64, u32)> {
        let i = self.next.fetch_add(n, Ordering::Relaxed);
        self.blocks
            .get(i.min(self.blocks.len())..(i + n).min(self.blocks.len()))
            .unwrap_or_default()
            .to_vec()
    }

    /// Hand out no more blocks.
    fn stop(&self) {
        self.next.store(usize::MAX / 2, Ordering::Relaxed);
    }
}

/// A stream, both ways, and the protocol version it speaks.
pub type Stream = (quinn::SendStream, quinn::RecvStream, Version);

/// Open a request stream on `conn`, hellos exchanged.
async fn open_stream(conn: &quinn::Connection) -> Result<Stream> {
    open_stream_at(conn, Version::CURRENT).await
}

/// [`open_stream`], offering `version`.
async fn open_stream_at(conn: &quinn::Connection, version: Version) -> Result<Stream> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| Error::Link(format!("opening a stream: {e}")))?;
    wire::send(&mut send, &Message::hello_at(version)).await?;
    let version = match wire::expect(&mut recv).await? {
        Message::Refused { reason } => return Err(Error::Refused(reason)),
        hello => hello.check_hello()?,
    };
    Ok((send, recv, version))
}

/// After a send failed: the server may have refused and ended the stream
/// while data was still going out; its reason says more.
async fn refusal_or(recv: &mut quinn::RecvStream, err: Error) -> Error {
    // Answers the server sent before it refused (a data stream's
    // `KnownChunks`) come first: passed over.
    let refusal = async {
        loop {
            match wire::recv(recv).await {
                Ok(Some(Message::Refused { reason })) => return Some(reason),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), refusal).await {
        Ok(Some(reason)) => Error::Refused(reason),
        _ => err,
    }
}

/// Blocks a data stream reads, hashes and asks the server about at once
/// (2 MiB of full blocks); a stream holds at most two batches and the
/// compressed copy of one.
pub const QUERY_BATCH: usize = 32;

/// A block read and named, before it is encoded.
struct Read {
    offset: u64,
    data: Vec<u8>,
    digest: Digest,
    zero: bool,
}

/// A batch of blocks read and named; `failed`: the read of the block
/// after the last one failed (the ones before it still go).
#[derive(Default)]
struct Batch {
    blocks: Vec<Read>,
    failed: Option<Error>,
}

/// Blocking threads that read and hash one batch, each a contiguous
/// part of it. A catch-up's blocks are small writes scattered over the
/// device, and the device's backing file is read with `O_DIRECT`: each
/// read waits for the disk, and read one after the other they left it
/// idle between (an 8 GiB catch-up of 20683 4 KiB blocks spent 1.3 s
/// reading).
const READ_PARTS: usize = 4;

/// Read and hash a batch of blocks, in [`READ_PARTS`] parts at once on
/// blocking threads, started at once; [`read_batch`] puts them together.
fn read_later<R>(read: &Arc<R>, blocks: Vec<(u64, u32)>) -> Vec<tokio::task::JoinHandle<Batch>>
where
    R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
{
    let share = blocks.len().div_ceil(READ_PARTS).max(1);
    blocks
        .chunks(share)
        .map(|part| {
            let (read, part) = (read.clone(), part.to_vec());
            tokio::task::spawn_blocking(move || read_part(&*read, part))
        })
        .collect()
}

/// Read and hash `blocks` in order, up to the first that fails.
fn read_part<R>(read: &R, blocks: Vec<(u64, u32)>) -> Batch
where
    R: Fn(u64, u32) -> Result<Vec<u8>>,
{
    let mut batch = Batch::default();
    for (offset, len) in blocks {
        let data = match read(offset, len) {
            Ok(d) => d,
            Err(e) => {
                batch.failed = Some(e);
                break;
            }
        };
        let zero = block::is_zero(&data);
        let digest = if zero {
            block::zero_digest(len)
        } else {
            block::digest(&data)
        };
        batch.blocks.push(Read {
            offset,
            data,
            digest,
            zero,
        });
    }
    batch
}

/// A block ready to go: its header and payload, its length, and whether
/// it goes as a digest the server holds.
struct Encoded {
    header: Message,
    payload: Vec<u8>,
    len: u32,
    known: bool,
}

/// Encoders per data stream: with the other streams', one per core.
fn encoders() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .div_ceil(DATA_STREAMS)
}

/// Encode `blocks` (compressed, or as their digest where `known`) on
/// `n` blocking threads ([`encoders`]), block `i` on thread `i % n`: each is
/// handed on with its index as soon as it is done. A thread per batch,
/// not per block: a block is a few dozen microseconds of work, and a
/// thread woken for each (thousands a second) is CPU the device's own
/// I/O competes with.
fn encode_later(
    blocks: Vec<Read>,
    known: &[bool],
    level: i32,
    n: usize,
) -> tokio::sync::mpsc::UnboundedReceiver<(usize, Encoded)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    if blocks.is_empty() {
        return rx;
    }
    let n = n.min(blocks.len()).max(1);
    let mut shares: Vec<Vec<(usize, Read, bool)>> = (0..n).map(|_| Vec::new()).collect();
    for (i, (b, &k)) in blocks.into_iter().zip(known).enumerate() {
        shares[i % n].push((i, b, k));
    }
    for share in shares {
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            for (i, b, known) in share {
                let len = b.data.len() as u32;
                let e = if known {
                    let header = Message::Block {
                        offset: b.offset,
                        len,
                        sha256: b.digest,
                        encoding: Encoding::Known,
                        data_len: 0,
                    };
                    Encoded {
                        header,
                        payload: Vec::new(),
                        len,
                        known,
                    }
                } else {
                    let (header, payload) = block::encode_owned(b.offset, b.data, b.digest, level);
                    Encoded {
                        header,
                        payload,
                        len,
                        known,
                    }
                };
                if tx.send((i, e)).is_err() {
                    // The stream went away: nobody waits for the rest.
                    return;
                }
            }
        });
    }
    rx
}

/// The batch [`read_later`] read, its parts in order.
async fn read_batch(parts: Vec<tokio::task::JoinHandle<Batch>>) -> Result<Batch> {
    let mut batch = Batch::default();
    for part in parts {
        let part = part
            .await
            .map_err(|e| Error::Link(format!("reading blocks: {e}")))?;
        batch.blocks.extend(part.blocks);
        if part.failed.is_some() {
            // A failed read ends the batch there: what comes after it
            // is dropped.
            batch.failed = part.failed;
            break;
        }
    }
    Ok(batch)
}

/// Ask which blocks of `batch` the server holds (zero blocks are never
/// asked about: they travel as holes); `false` when nothing was asked.
async fn ask_known(send: &mut quinn::SendStream, batch: &[Read]) -> Result<bool> {
    let digests: Vec<Digest> = batch.iter().filter(|b| !b.zero).map(|b| b.digest).collect();
    if digests.is_empty() {
        return Ok(false);
    }
    wire::send(send, &Message::HaveChunks { digests }).await?;
    Ok(true)
}

/// The server's answer about `batch` (asked when `asked`): whether each
/// block may travel as [`Encoding::Known`].
async fn known_answer(
    recv: &mut quinn::RecvStream,
    batch: &[Read],
    asked: bool,
) -> Result<Vec<bool>> {
    if !asked {
        return Ok(vec![false; batch.len()]);
    }
    let asked_n = batch.iter().filter(|b| !b.zero).count();
    let flags = match wire::expect(recv).await? {
        Message::KnownChunks { bits } => proto::unpack_bits(&bits, asked_n).ok_or_else(|| {
            Error::Peer(format!(
                "KnownChunks answers {} bytes for {asked_n} digests",
                bits.len()
            ))
        })?,
        Message::Refused { reason } => return Err(Error::Refused(reason)),
        other => return Err(unexpected(&other, "answering HaveChunks")),
    };
    let mut flags = flags.into_iter();
    Ok(batch
        .iter()
        .map(|b| !b.zero && flags.next().unwrap_or(false))
        .collect())
}

/// One data stream: blocks taken from `work` in batches of
/// [`QUERY_BATCH`] until none are left, each batch read and hashed while
/// the one before is compressed and sent. With `dedup` (a V3 server, a
/// first round) the server is asked about the next batch before this
/// one's blocks go, and a block it holds travels as [`Encoding::Known`],
/// without its bytes. Returns the blocks the server refused, and what
/// was shipped.
#[allow(clippy::too_many_arguments)]
async fn data_stream<R>(
    conn: quinn::Connection,
    pacer: Option<SharedPacer>,
    volume: String,
    epoch: u64,
    work: Arc<Work>,
    level: i32,
    dedup: bool,
    read: Arc<R>,
) -> Result<(Vec<(u64, u32)>, Shipped)>
where
    R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
{
    let (mut send, mut recv, version) = open_stream(&conn).await?;
    let (mut stream, first) = DataSender::open(&volume, epoch);
    let dedup = dedup && version >= Version::V3;
    let sent = async {
        wire::send(&mut send, &first).await?;
        let mut batch = read_batch(read_later(&read, work.take_many(QUERY_BATCH))).await?;
        let mut asked = dedup && ask_known(&mut send, &batch.blocks).await?;
        while !batch.blocks.is_empty() || batch.failed.is_some() {
            let failed = batch.failed.take();
            let next = failed
                .is_none()
                .then(|| read_later(&read, work.take_many(QUERY_BATCH)));
            let known = known_answer(&mut recv, &batch.blocks, asked).await?;
            // Compress this batch while the next is read.
            let mut encoded = encode_later(batch.blocks, &known, level, encoders());
            batch = match next {
                Some(next) => read_batch(next).await?,
                None => Batch::default(),
            };
            asked = dedup && ask_known(&mut send, &batch.blocks).await?;
            // In order, each as soon as it and those before it are done.
            let mut done = std::collections::BTreeMap::new();
            for i in 0..known.len() {
                let Encoded {
                    header,
                    payload,
                    len,
                    known,
                } = loop {
                    if let Some(e) = done.remove(&i) {
                        break e;
                    }
                    let (at, e) = encoded.recv().await.ok_or_else(|| {
                        Error::Link("encoding a block: an encoder stopped".to_string())
                    })?;
                    done.insert(at, e);
                };
                pace(&pacer, payload.len() as u64).await;
                let payload_len = payload.len();
                wire::send_with_data(&mut send, &header, payload).await?;
                if known {
                    stream.sent_known(len);
                } else {
                    stream.sent(len, payload_len);
                }
            }
            // What was read before a failed read went; now fail.
            if let Some(e) = failed {
                return Err(e);
            }
        }
        wire::send(&mut send, &stream.end()).await?;
        let _ = send.finish();
        stream.answer(wire::expect(&mut recv).await?)
    }
    .await;
    match sent {
        Err(e @ Error::Link(_)) => Err(refusal_or(&mut recv, e).await),
        other => other,
    }
}

/// Resolve `host:port` to its first address.
pub async fn resolve(address: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| Error::Link(format!("resolving {address}: {e}")))?
        .next()
        .ok_or_else(|| Error::Link(format!("{address} resolves to no address")))
}

/// How long one address may take to answer a connection before the next
/// one of a server list is tried.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// How long the last (or only) address may take: a slow link (a lossy or
/// bufferbloated one, with a handshake packet or two lost) still connects.
pub const LAST_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Link {
    /// Connect to the server at `address`, trusting only `server`.
    ///
    /// `address` may name several interchangeable servers, comma-separated
    /// (`a.example:4747,b.example:4747`), and each name may resolve to
    /// several addresses: they are tried in order, each for at most
    /// [`CONNECT_TIMEOUT`] (the last for [`LAST_CONNECT_TIMEOUT`]), and the
    /// first that answers (with the pinned certificate) is used.
    pub async fn connect(identity: &Identity, server: Fingerprint, address: &str) -> Result<Link> {
        Link::connect_preferring(identity, server, address, None).await
    }

    /// [`Link::connect`], trying `prefer` first when `address` resolves to
    /// it (the server a pre-copy run is staged on, so that a run does not
    /// move between servers with every reconnect).
    pub async fn connect_preferring(
        identity: &Identity,
        server: Fingerprint,
        address: &str,
        prefer: Option<SocketAddr>,
    ) -> Result<Link> {
        let mut last = None;
        let mut all: Vec<(&str, SocketAddr)> = Vec::new();
        for one in address.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match tokio::net::lookup_host(one).await {
                Ok(a) => {
                    let before = all.len();
                    all.extend(a.map(|addr| (one, addr)));
                    if all.len() == before {
                        last = Some(Error::Link(format!("{one} resolves to no address")));
                    }
                }
                Err(e) => {
                    // Offline, or the name service down: the link, as an
                    // address that does not answer.
                    last = Some(Error::Link(format!("resolving {one}: {e}")));
                }
            }
        }
        if let Some(p) = prefer {
            // Stable: the rest keep their order.
            all.sort_by_key(|&(_, a)| a != p);
        }
        let count = all.len();
        for (i, (one, addr)) in all.into_iter().enumerate() {
            let timeout = if i + 1 == count {
                LAST_CONNECT_TIMEOUT
            } else {
                CONNECT_TIMEOUT
            };
            match tokio::time::timeout(timeout, Link::connect_to(identity, server, one, addr)).await
            {
                Ok(Ok(link)) => return Ok(link),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(Error::Link(format!(
                        "connecting to {one} ({addr}): no answer in {}s (is UDP port {} blocked on this network?)",
                        timeout.as_secs(),
                        addr.port()
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Link(format!("{address:?} names no server address"))))
    }

    /// The address of the server this link reached.
    pub fn server_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    async fn connect_to(
        identity: &Identity,
        server: Fingerprint,
        address: &str,
        addr: SocketAddr,
    ) -> Result<Link> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().map_err(|e| Error::Link(format!("{e}")))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|e| Error::Link(format!("{e}")))?
        };
        let mut endpoint = std::net::UdpSocket::bind(bind)
            .and_then(|socket| tls::endpoint(socket, None))
            .map_err(|e| Error::io("opening a UDP socket", e))?;
        endpoint.set_default_client_config(tls::client_config(identity, server)?);
        let conn = endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| Error::Link(format!("connecting to {address}: {e}")))?
            .await
            .map_err(|e| {
                let said = e.to_string();
                if said.contains(tls::NOT_PINNED) {
                    // Not the network: trying again will not help.
                    Error::Refused(format!(
                        "{address} ({addr}) is not the server this machine enrolled with: its identity changed (`mirror-server init` anew, or another server at that address); enroll again (`ublk-mirror enroll`) if it is meant to be"
                    ))
                } else {
                    Error::Link(format!("connecting to {address}: {e}"))
                }
            })?;
        Ok(Link {
            endpoint,
            conn,
            pacer: None,
        })
    }

    /// Move the connection to a new local UDP socket bound at `addr`, as
    /// when a laptop changes networks: QUIC migrates the connection, and
    /// requests go on.
    pub fn rebind(&self, addr: SocketAddr) -> Result<()> {
        let socket =
            std::net::UdpSocket::bind(addr).map_err(|e| Error::io(format!("binding {addr}"), e))?;
        self.endpoint
            .rebind(socket)
            .map_err(|e| Error::io("moving the connection to a new socket", e))
    }

    /// The local address the connection uses.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|e| Error::io("reading the local address", e))
    }

    /// Limit block data to `bytes_per_second` (`None`: no limit).
    pub fn set_bandwidth(&mut self, bytes_per_second: Option<u64>) {
        self.pacer = bytes_per_second
            .filter(|&b| b > 0)
            .map(|rate| Arc::new(Mutex::new(Pacer::new(Some(rate)))));
    }

    /// Open a request stream, hellos exchanged: for tools and tests that
    /// speak the protocol themselves.
    pub async fn stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let (send, recv, _) = open_stream(&self.conn).await?;
        Ok((send, recv))
    }

    /// A request stream that offers `version` (as an older client would):
    /// the stream and the version the server answered with.
    pub async fn stream_at(&self, version: Version) -> Result<Stream> {
        open_stream_at(&self.conn, version).await
    }

    async fn ask(&self, request: Message) -> Result<Message> {
        let (mut send, mut recv) = self.stream().await?;
        wire::send(&mut send, &request).await?;
        let _ = send.finish();
        match wire::expect(&mut recv).await? {
            Message::Refused { reason } => Err(Error::Refused(reason)),
            answer => Ok(answer),
        }
    }

    /// Enroll this client's certificate as `name` with a token's secret.
    pub async fn enroll(&self, name: &str, secret: [u8; 32]) -> Result<String> {
        match self
            .ask(Message::Enroll {
                name: name.to_string(),
                secret,
            })
            .await?
        {
            Message::Enrolled { name } => Ok(name),
            other => Err(unexpected(&other, "as an answer")),
        }
    }

    /// Open (or create) one of this client's volumes.
    pub async fn open_volume(&self, volume: &str, size: u64) -> Result<VolumeInfo> {
        match self
            .ask(Message::OpenVolume {
                volume: volume.to_string(),
                size,
            })
            .await?
        {
            Message::VolumeInfo {
                size,
                published_epoch,
                uuid,
                writer,
                ..
            } => Ok(VolumeInfo {
                size,
                published_epoch,
                uuid,
                writer,
            }),
            other => Err(unexpected(&other, "as an answer")),
        }
    }

    /// Take a snapshot of `volume`'s published epoch; its name, epoch and
    /// the time that epoch was published.
    pub async fn snapshot(&self, volume: &str, name: Option<&str>) -> Result<(String, u64, u64)> {
        match self
            .ask(Message::TakeSnapshot {
                volume: volume.to_string(),
                name: name.map(str::to_string),
            })
            .await?
        {
            Message::SnapshotTaken {
                name,
                epoch,
                epoch_ms,
            } => Ok((name, epoch, epoch_ms)),
            other => Err(unexpected(&other, "as an answer")),
        }
    }

    /// The snapshots of `volume` (V6), oldest point in time first, and
    /// the server's note if the list may lack some (its chunk store out
    /// of reach). A server that speaks only V5 or older is refused here,
    /// with what to do, before it is asked anything it cannot read.
    pub async fn list_snapshots(&self, volume: &str) -> Result<SnapshotListing> {
        let (mut send, mut recv, version) = open_stream(&self.conn).await?;
        if version < Version::V6 {
            let _ = send.finish();
            return Err(Error::TooOld(format!(
                "the mirror server speaks protocol {version:?}, and listing snapshots needs {:?}: upgrade mirror-server there (its own `mirror-server snapshots CLIENT/{volume}` lists them meanwhile)",
                Version::V6
            )));
        }
        wire::send(
            &mut send,
            &Message::ListSnapshots {
                volume: volume.to_string(),
            },
        )
        .await?;
        let _ = send.finish();
        let mut listing = SnapshotListing::default();
        loop {
            match wire::expect(&mut recv).await? {
                Message::SnapshotList {
                    snapshots,
                    done,
                    incomplete,
                } => {
                    listing.snapshots.extend(snapshots);
                    if done {
                        listing.incomplete = incomplete;
                        return Ok(listing);
                    }
                }
                Message::Refused { reason } => return Err(Error::Refused(reason)),
                other => return Err(unexpected(&other, "in a list of snapshots")),
            }
        }
    }

    /// Make `device` the writer of `volume`, whose writer is `from` now
    /// (as [`Link::open_volume`] said): the server publishes an empty
    /// epoch of `device` and refuses other devices' epochs from then on.
    /// Returns that epoch. Refused if the volume moved on meanwhile.
    pub async fn take_over(
        &self,
        volume: &str,
        from: Option<Writer>,
        device: [u8; 16],
    ) -> Result<u64> {
        match self
            .ask(Message::TakeOver {
                volume: volume.to_string(),
                from,
                device,
            })
            .await?
        {
            Message::Committed { epoch } => Ok(epoch),
            other => Err(unexpected(&other, "as an answer")),
        }
    }

    /// The sha256 of blocks of the volume's image (any number; asked in
    /// batches of [`crate::proto::MAX_HASH_BLOCKS`]).
    pub async fn hashes(&self, volume: &str, blocks: &[(u64, u32)]) -> Result<Vec<Digest>> {
        let mut out = Vec::with_capacity(blocks.len());
        for batch in blocks.chunks(crate::proto::MAX_HASH_BLOCKS) {
            match self
                .ask(Message::HashRequest {
                    volume: volume.to_string(),
                    blocks: batch.to_vec(),
                })
                .await?
            {
                Message::Hashes { digests } if digests.len() == batch.len() => out.extend(digests),
                other => return Err(unexpected(&other, "as an answer")),
            }
        }
        Ok(out)
    }

    /// Ship epoch `epoch` of `volume`, `writer`'s (a device and its local
    /// epoch): each of `blocks` (`(offset, len)`) is read with `read`,
    /// hashed, compressed at zstd `level` when that pays, and sent over
    /// [`DATA_STREAMS`] streams at once (reading and encoding on blocking
    /// threads, so that they run in parallel), as an [`EpochSender`]
    /// decides: blocks the server holds already from an interrupted
    /// attempt do not travel, a taken-over staging is vouched for, refused
    /// blocks are read and sent again. Returns once the server has
    /// published the epoch. `read` fails with a local error
    /// ([`Error::Io`]) when the device cannot be read.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_epoch<R>(
        &self,
        volume: &str,
        epoch: u64,
        writer: Writer,
        blocks: &[(u64, u32)],
        level: i32,
        read: R,
    ) -> Result<Shipped>
    where
        R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
    {
        let sender = EpochSender::new(volume, epoch, writer, blocks.to_vec());
        match self.send_with(sender, level, read).await? {
            (Finish::Publish, shipped) => Ok(shipped),
            (Finish::Round, _) => Err(Error::Link(format!(
                "epoch {epoch} was staged but not published (a driver bug)"
            ))),
        }
    }

    /// Send `blocks` as a pre-copy round of epoch `epoch` (V5; see
    /// [`crate::session::send`]): ended as `finish` says, `held` the bytes
    /// earlier rounds of the same epoch and writer sent (`None`: the
    /// first round). Returns how it ended ([`Finish::Round`] also when a
    /// round that was to publish found earlier rounds' blocks missing on
    /// the server and sent them, as `read` has them now), and what went.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_round<R>(
        &self,
        volume: &str,
        epoch: u64,
        writer: Writer,
        blocks: &[(u64, u32)],
        level: i32,
        finish: Finish,
        held: Option<Held>,
        read: R,
    ) -> Result<(Finish, Shipped)>
    where
        R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
    {
        let sender = EpochSender::round(volume, epoch, writer, blocks.to_vec(), finish, held);
        self.send_with(sender, level, read).await
    }

    async fn send_with<R>(
        &self,
        mut sender: EpochSender,
        level: i32,
        read: R,
    ) -> Result<(Finish, Shipped)>
    where
        R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
    {
        let (mut send, mut recv) = self.stream().await?;
        let read = Arc::new(read);
        let sent = self
            .drive_epoch(&mut sender, &mut send, &mut recv, level, &read)
            .await;
        match sent {
            Err(e @ Error::Link(_)) => Err(refusal_or(&mut recv, e).await),
            Ok(shipped) => Ok((sender.finish(), shipped)),
            Err(e) => Err(e),
        }
    }

    /// Do what `sender` says until it has published or failed.
    async fn drive_epoch<R>(
        &self,
        sender: &mut EpochSender,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        level: i32,
        read: &Arc<R>,
    ) -> Result<Shipped>
    where
        R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
    {
        let volume = sender.volume().to_string();
        let epoch = sender.epoch();
        let mut next = Some(sender.start());
        // The first round asks the server which blocks it holds; a resend
        // carries the bytes (the server could not produce them).
        let mut first_round = true;
        loop {
            let event = match next {
                // Wait for the next control message.
                None => SendEvent::Control(wire::expect(recv).await?),
                Some(SendAction::Control(m)) => {
                    wire::send(send, &m).await?;
                    SendEvent::Control(wire::expect(recv).await?)
                }
                Some(SendAction::Compare(batch)) => {
                    let theirs = self.staged_hashes(&volume, epoch, &batch).await?;
                    let mine = local_digests(read, batch).await?;
                    SendEvent::Compared { theirs, mine }
                }
                Some(SendAction::Round(blocks)) => {
                    let dedup = std::mem::replace(&mut first_round, false);
                    let (count, started) = (blocks.len(), std::time::Instant::now());
                    let (refused, shipped) = self
                        .send_data(&volume, epoch, blocks, level, dedup, read.clone())
                        .await?;
                    tracing::debug!(
                        volume,
                        epoch,
                        blocks = count,
                        ms = started.elapsed().as_millis() as u64,
                        "an epoch's blocks are sent"
                    );
                    SendEvent::RoundDone { refused, shipped }
                }
                Some(SendAction::Published(shipped) | SendAction::RoundStaged(shipped)) => {
                    let _ = send.finish();
                    return Ok(shipped);
                }
            };
            next = sender.handle(event)?;
        }
    }

    /// The server's digests of blocks of the epoch being staged.
    async fn staged_hashes(
        &self,
        volume: &str,
        epoch: u64,
        batch: &[(u64, u32)],
    ) -> Result<Vec<Digest>> {
        match self
            .ask(Message::StagedHashes {
                volume: volume.to_string(),
                epoch,
                blocks: batch.to_vec(),
            })
            .await?
        {
            Message::Hashes { digests } => Ok(digests),
            other => Err(unexpected(&other, "answering StagedHashes")),
        }
    }

    /// Send `blocks` over up to [`DATA_STREAMS`] data streams (`dedup`:
    /// asking which the server holds); returns the blocks the server
    /// refused, and what went.
    async fn send_data<R>(
        &self,
        volume: &str,
        epoch: u64,
        blocks: Vec<(u64, u32)>,
        level: i32,
        dedup: bool,
        read: Arc<R>,
    ) -> Result<(Vec<(u64, u32)>, Shipped)>
    where
        R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
    {
        let streams = DATA_STREAMS.min(blocks.len().div_ceil(4)).max(1);
        let work = Arc::new(Work {
            blocks,
            next: AtomicUsize::new(0),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..streams {
            tasks.spawn(data_stream(
                self.conn.clone(),
                self.pacer.clone(),
                volume.to_string(),
                epoch,
                work.clone(),
                level,
                dedup,
                read.clone(),
            ));
        }
        let mut refused = Vec::new();
        let mut shipped = Shipped::default();
        let mut failure = None;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok((r, s))) => {
                    refused.extend(r);
                    shipped.add(&s);
                }
                Ok(Err(e)) => {
                    // The first failure says why; the others follow from it.
                    if failure.is_none() {
                        failure = Some(e);
                        work.stop();
                    }
                }
                Err(e) => failure = failure.or(Some(Error::Link(format!("a sender failed: {e}")))),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((refused, shipped)),
        }
    }

    /// Start restoring `volume` as of `at` (a snapshot's name or a time;
    /// `None`: now): the server pins that version while the returned
    /// [`Restoring`] lives.
    pub async fn restore(&self, volume: &str, at: Option<&str>) -> Result<Restoring> {
        let (mut send, mut recv) = self.stream().await?;
        wire::send(&mut send, &RestoreReader::request(volume, at)).await?;
        let reader = RestoreReader::new(wire::expect(&mut recv).await?)?;
        Ok(Restoring {
            send: Some(send),
            recv,
            reader,
        })
    }

    /// Start reading chosen blocks of `volume` as of `at` (a snapshot's
    /// name or a time; `None`: now), in any order: the server pins that
    /// version while the returned [`VersionRead`] lives.
    pub async fn read_version(&self, volume: &str, at: Option<&str>) -> Result<VersionRead> {
        let (mut send, mut recv) = self.stream().await?;
        wire::send(&mut send, &RestoreReader::request(volume, at)).await?;
        let reader = BlockReader::new(wire::expect(&mut recv).await?)?;
        Ok(VersionRead { send, recv, reader })
    }

    /// Resolves when the connection ends, with why.
    pub async fn closed(&self) -> Error {
        Error::Link(format!(
            "the connection ended: {}",
            self.conn.closed().await
        ))
    }

    /// Whether the server closed the connection, and why.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.close_reason().map(|r| r.to_string())
    }

    /// Close the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// This epoch's digests of `batch`, read and hashed on a blocking thread.
async fn local_digests<R>(read: &Arc<R>, batch: Vec<(u64, u32)>) -> Result<Vec<Digest>>
where
    R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
{
    let read = read.clone();
    tokio::task::spawn_blocking(move || {
        batch
            .iter()
            .map(|&(offset, len)| Ok(block::digest(&read(offset, len)?)))
            .collect()
    })
    .await
    .map_err(|e| Error::Link(format!("hashing blocks: {e}")))?
}

/// A restore in progress: the driver of a [`RestoreReader`] over its
/// stream. Ask with [`Restoring::next_batch`] and [`Restoring::have`],
/// take with [`Restoring::next`] until [`Restoring::is_done`], then
/// [`Restoring::finish`].
#[derive(Debug)]
pub struct Restoring {
    send: Option<quinn::SendStream>,
    recv: quinn::RecvStream,
    reader: RestoreReader,
}

impl Restoring {
    /// What is being restored.
    pub fn info(&self) -> &RestoreInfo {
        self.reader.info()
    }

    /// The next batch of blocks to compare, when the window allows one.
    pub fn next_batch(&mut self) -> Option<Vec<(u64, u32)>> {
        self.reader.next_batch()
    }

    /// The batch [`Restoring::next_batch`] gives next, once the window
    /// allows: to hash it ahead.
    pub fn upcoming(&self) -> Option<Vec<(u64, u32)>> {
        self.reader.upcoming()
    }

    /// Send the target's digests of `batch`.
    pub async fn have(&mut self, batch: &[(u64, u32)], digests: Vec<Digest>) -> Result<()> {
        let send = self
            .send
            .as_mut()
            .ok_or_else(|| Error::Link("the restore's stream is finished".into()))?;
        wire::send(send, &RestoreReader::have(batch, digests)).await
    }

    /// Whether every batch was answered.
    pub fn is_done(&self) -> bool {
        self.reader.is_done()
    }

    /// The counts so far.
    pub fn progress(&self) -> Progress {
        self.reader.progress()
    }

    /// Go on from an earlier restore of this same version that was cut
    /// short (see [`RestoreReader::resume`]).
    pub fn resume(&mut self, earlier: Progress) {
        self.reader.resume(earlier);
    }

    /// End the restore: the server lets go of the version it pinned.
    pub fn finish(mut self) {
        if let Some(mut send) = self.send.take() {
            let _ = send.finish();
        }
    }

    /// The next block to write (its data read and checked for place, not
    /// yet for content: [`BlockToWrite::decode`]), or the progress after a
    /// batch.
    pub async fn next(&mut self) -> Result<Taken> {
        let mut step = self
            .reader
            .on_message(wire::expect(&mut self.recv).await?)?;
        if let RestoreStep::ReadData(len) = step {
            let data = wire::recv_data(&mut self.recv, len).await?;
            step = self.reader.on_data(data)?;
        }
        match step {
            RestoreStep::Write(block) => Ok(Taken::Write(block)),
            RestoreStep::Progress(p) => Ok(Taken::Progress(p)),
            RestoreStep::ReadData(_) => Err(Error::Link(
                "block data announced twice (a driver bug)".into(),
            )),
        }
    }
}

/// Chosen blocks of one version being read: the driver of a
/// [`BlockReader`] over its stream. [`VersionRead::ask`] for a run, then
/// [`VersionRead::next`] until it is [`ReadStep::Answered`]; runs are
/// answered in the order asked.
#[derive(Debug)]
pub struct VersionRead {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: BlockReader,
}

impl VersionRead {
    /// The version being read.
    pub fn info(&self) -> &RestoreInfo {
        self.reader.info()
    }

    /// Ask for `count` blocks from `offset` (a multiple of
    /// [`block::BLOCK`]), with the reader's digests of them
    /// ([`crate::session::restore::NO_DIGEST`] for none).
    pub async fn ask(&mut self, offset: u64, count: usize, digests: Vec<Digest>) -> Result<()> {
        let message = self.reader.ask(offset, count, digests)?;
        wire::send(&mut self.send, &message).await
    }

    /// The next block of the oldest run asked for (checked for place, not
    /// yet for content: [`BlockToWrite::decode`]), or that run's end.
    /// Never [`ReadStep::ReadData`].
    pub async fn next(&mut self) -> Result<ReadStep> {
        let mut step = self
            .reader
            .on_message(wire::expect(&mut self.recv).await?)?;
        if let ReadStep::ReadData(len) = step {
            let data = wire::recv_data(&mut self.recv, len).await?;
            step = self.reader.on_data(data)?;
        }
        if let ReadStep::ReadData(_) = step {
            return Err(Error::Link(
                "block data announced twice (a driver bug)".into(),
            ));
        }
        Ok(step)
    }

    /// End the reading: the server lets go of the version it pinned.
    pub fn finish(mut self) {
        let _ = self.send.finish();
    }
}

/// What [`Restoring::next`] took from the server.
#[derive(Debug)]
pub enum Taken {
    /// A block to verify and write.
    Write(BlockToWrite),
    /// A batch was answered.
    Progress(Progress),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block comes out of the encoders once, with its own index,
    /// encoded as asked (a digest the server holds, a hole, or
    /// compressed), however many encoders share the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_encoders_hand_on_every_block_once_as_asked() {
        const N: usize = 37;
        for encoders in [1, 3, 8, 64] {
            let blocks: Vec<Read> = (0..N as u64)
                .map(|i| {
                    let data = if i % 5 == 0 {
                        vec![0u8; block::BLOCK as usize]
                    } else {
                        vec![i as u8; block::BLOCK as usize]
                    };
                    Read {
                        offset: i * block::BLOCK,
                        digest: block::digest(&data),
                        zero: i % 5 == 0,
                        data,
                    }
                })
                .collect();
            let known: Vec<bool> = (0..N).map(|i| i % 3 == 1).collect();
            let mut rx = encode_later(blocks, &known, 3, encoders);
            let mut seen = [false; N];
            while let Some((i, e)) = rx.recv().await {
                assert!(!seen[i], "block {i} twice ({encoders} encoders)");
                seen[i] = true;
                let Message::Block {
                    offset, encoding, ..
                } = e.header
                else {
                    panic!("not a block header");
                };
                assert_eq!(offset, i as u64 * block::BLOCK);
                assert_eq!(e.known, known[i]);
                let want = if known[i] {
                    Encoding::Known
                } else if i % 5 == 0 {
                    Encoding::Zero
                } else {
                    Encoding::Zstd
                };
                assert_eq!(encoding, want, "block {i} ({encoders} encoders)");
            }
            assert!(
                seen.iter().all(|&s| s),
                "every block came out ({encoders} encoders)"
            );
        }
        // Nothing to encode: the channel just ends.
        assert!(encode_later(Vec::new(), &[], 3, 2).recv().await.is_none());
    }
}
