//! The client side of a connection to `mirror-server`: enrollment, opening
//! volumes, shipping epochs (over several streams at once, resuming what an
//! interrupted attempt left on the server).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::block;
use crate::identity::{Fingerprint, Identity};
use crate::proto::{Digest, Message, Writer};
use crate::{tls, wire, Error, RangeSet, Result};

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

/// Bytes on the wire for one epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Blocks sent (resent ones included).
    pub blocks: u64,
    /// Block bytes before encoding.
    pub bytes: u64,
    /// Block bytes on the wire (after zstd; zero blocks cost none).
    pub wire_bytes: u64,
    /// Bytes of blocks that travelled as holes (all zeroes).
    pub zero_bytes: u64,
    /// Bytes the server held already from an interrupted attempt.
    pub resumed_bytes: u64,
}

impl Shipped {
    fn add(&mut self, other: &Shipped) {
        self.blocks += other.blocks;
        self.bytes += other.bytes;
        self.wire_bytes += other.wire_bytes;
        self.zero_bytes += other.zero_bytes;
        self.resumed_bytes += other.resumed_bytes;
    }
}

/// A connection to the server.
#[derive(Debug)]
pub struct Link {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    pacer: Pacer,
}

/// Keeps block data under a bandwidth limit, across streams.
#[derive(Debug, Clone)]
struct Pacer {
    /// Bytes per second block data may use, if limited.
    rate: Option<u64>,
    /// When the limit lets the next bytes go.
    next_free: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl Pacer {
    /// Wait until the limit lets `bytes` more go.
    async fn pace(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let wait = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let start = (*next).max(now);
            *next = start + std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
            // Up to 100 ms of burst goes at once.
            next.saturating_duration_since(now)
                .saturating_sub(std::time::Duration::from_millis(100))
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Largest piece a staged range this client would not have sent is sent
/// again in (aligned): the replicator's block size.
pub const VOUCH_PIECE: u64 = 64 << 10;

/// Data streams one epoch is sent over at once.
pub const DATA_STREAMS: usize = 4;

/// The blocks of one round of data streams, taken one at a time.
struct Work {
    blocks: Vec<(u64, u32)>,
    next: AtomicUsize,
}

impl Work {
    fn take(&self) -> Option<(u64, u32)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.blocks.get(i).copied()
    }

    /// Hand out no more blocks.
    fn stop(&self) {
        self.next.store(usize::MAX / 2, Ordering::Relaxed);
    }
}

/// Open a request stream on `conn`, hellos exchanged.
async fn open_stream(conn: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| Error::Link(format!("opening a stream: {e}")))?;
    wire::send(&mut send, &Message::hello()).await?;
    match wire::expect(&mut recv).await? {
        Message::Refused { reason } => return Err(Error::Refused(reason)),
        hello => {
            hello.check_hello()?;
        }
    }
    Ok((send, recv))
}

/// After a send failed: the server may have refused and ended the stream
/// while data was still going out; its reason says more.
async fn refusal_or(recv: &mut quinn::RecvStream, err: Error) -> Error {
    let answer = tokio::time::timeout(std::time::Duration::from_secs(2), wire::expect(recv)).await;
    match answer {
        Ok(Ok(Message::Refused { reason })) => Error::Refused(reason),
        _ => err,
    }
}

/// A block ready to go: header, payload, and its length decoded.
type Encoded = (Message, Vec<u8>, u32);

/// Read and encode one block, on a blocking thread.
fn encode_later<R>(
    read: &Arc<R>,
    block: Option<(u64, u32)>,
    level: i32,
) -> Option<tokio::task::JoinHandle<Result<Encoded>>>
where
    R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
{
    let (offset, len) = block?;
    let read = read.clone();
    Some(tokio::task::spawn_blocking(move || {
        let data = read(offset, len)?;
        let (header, payload) = block::encode(offset, &data, level);
        Ok((header, payload, len))
    }))
}

/// One data stream: blocks taken from `work` until none are left, each
/// read and encoded while the one before is sent. Returns the blocks the
/// server refused, and what was shipped.
async fn data_stream<R>(
    conn: quinn::Connection,
    pacer: Pacer,
    volume: String,
    epoch: u64,
    work: Arc<Work>,
    level: i32,
    read: Arc<R>,
) -> Result<(Vec<(u64, u32)>, Shipped)>
where
    R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
{
    let (mut send, mut recv) = open_stream(&conn).await?;
    let sent = async {
        wire::send(&mut send, &Message::EpochData { volume, epoch }).await?;
        let mut shipped = Shipped::default();
        let mut pending = encode_later(&read, work.take(), level);
        while let Some(job) = pending.take() {
            let (header, payload, len) = job
                .await
                .map_err(|e| Error::Link(format!("encoding a block: {e}")))??;
            pending = encode_later(&read, work.take(), level);
            pacer.pace(payload.len() as u64).await;
            wire::send_with_data(&mut send, &header, &payload).await?;
            shipped.blocks += 1;
            shipped.bytes += u64::from(len);
            shipped.wire_bytes += payload.len() as u64;
            if payload.is_empty() {
                shipped.zero_bytes += u64::from(len);
            }
        }
        wire::send(
            &mut send,
            &Message::EndData {
                blocks: shipped.blocks,
            },
        )
        .await?;
        let _ = send.finish();
        match wire::expect(&mut recv).await? {
            Message::Resend { blocks } => Ok((blocks, shipped)),
            Message::Refused { reason } => Err(Error::Refused(reason)),
            other => Err(unexpected(&other)),
        }
    }
    .await;
    match sent {
        Err(Error::Link(e)) => Err(refusal_or(&mut recv, Error::Link(e)).await),
        other => other,
    }
}

/// Resolve `host:port` to its first address.
pub async fn resolve(address: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| Error::io(format!("resolving {address}"), e))?
        .next()
        .ok_or_else(|| Error::Link(format!("{address} resolves to no address")))
}

impl Link {
    /// Connect to the server at `address`, trusting only `server`.
    pub async fn connect(identity: &Identity, server: Fingerprint, address: &str) -> Result<Link> {
        let addr = resolve(address).await?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().map_err(|e| Error::Link(format!("{e}")))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|e| Error::Link(format!("{e}")))?
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| Error::io("opening a UDP socket", e))?;
        endpoint.set_default_client_config(tls::client_config(identity, server)?);
        let conn = endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| Error::Link(format!("connecting to {address}: {e}")))?
            .await
            .map_err(|e| Error::Link(format!("connecting to {address}: {e}")))?;
        Ok(Link {
            endpoint,
            conn,
            pacer: Pacer {
                rate: None,
                next_free: Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())),
            },
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
        self.pacer.rate = bytes_per_second.filter(|&b| b > 0);
    }

    /// Open a request stream, hellos exchanged: for tools and tests that
    /// speak the protocol themselves.
    pub async fn stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        open_stream(&self.conn).await
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
            other => Err(unexpected(&other)),
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
            other => Err(unexpected(&other)),
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
            other => Err(unexpected(&other)),
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
                other => return Err(unexpected(&other)),
            }
        }
        Ok(out)
    }

    /// Ship epoch `epoch` of `volume`, `writer`'s (a device and its local
    /// epoch): each of `blocks` (`(offset, len)`) is read with `read`,
    /// hashed, compressed at zstd `level` when that pays, and sent over
    /// [`DATA_STREAMS`] streams at once (reading and encoding on blocking
    /// threads, so that they run in parallel). Blocks the server holds
    /// already from an interrupted attempt at the same epoch do not travel;
    /// blocks it refuses are read and sent again. Returns once the server
    /// has published the epoch.
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
        let (mut send, mut recv) = self.stream().await?;
        let sent = self
            .run_epoch(
                &mut send,
                &mut recv,
                volume,
                epoch,
                writer,
                blocks,
                level,
                Arc::new(read),
            )
            .await;
        match sent {
            Err(Error::Link(e)) => Err(refusal_or(&mut recv, Error::Link(e)).await),
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_epoch<R>(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        volume: &str,
        epoch: u64,
        writer: Writer,
        blocks: &[(u64, u32)],
        level: i32,
        read: Arc<R>,
    ) -> Result<Shipped>
    where
        R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
    {
        wire::send(
            send,
            &Message::BeginEpoch {
                volume: volume.to_string(),
                epoch,
                writer,
            },
        )
        .await?;
        // What the server holds already of this epoch.
        let mut staged = RangeSet::new();
        let mut adopted = false;
        loop {
            match wire::expect(recv).await? {
                Message::Staged {
                    ranges,
                    adopted: a,
                    done,
                } => {
                    adopted |= a;
                    for (offset, len) in ranges {
                        staged.insert(offset..offset + len);
                    }
                    if done {
                        break;
                    }
                }
                Message::Refused { reason } => return Err(Error::Refused(reason)),
                other => return Err(unexpected(&other)),
            }
        }
        let mut shipped = Shipped::default();
        let todo = if adopted {
            self.vouch(volume, epoch, blocks, &staged, &read, &mut shipped)
                .await?
        } else {
            let mut todo: Vec<(u64, u32)> = Vec::with_capacity(blocks.len());
            for &(offset, len) in blocks {
                if staged.contains_range(offset..offset + u64::from(len)) {
                    shipped.resumed_bytes += u64::from(len);
                } else {
                    todo.push((offset, len));
                }
            }
            todo
        };
        if shipped.resumed_bytes > 0 {
            tracing::info!(
                epoch,
                bytes = shipped.resumed_bytes,
                adopted,
                "resuming: the server holds part of this epoch already"
            );
        }
        let mut todo = todo;
        for _attempt in 0..3 {
            if todo.is_empty() {
                break;
            }
            let refused = self
                .send_data(volume, epoch, todo, level, read.clone(), &mut shipped)
                .await?;
            if !refused.is_empty() {
                tracing::warn!(
                    blocks = refused.len(),
                    "the server refused blocks; sending them again"
                );
            }
            todo = refused;
        }
        if !todo.is_empty() {
            return Err(Error::Link(format!(
                "epoch {epoch}: blocks kept failing their checks on the server"
            )));
        }
        wire::send(send, &Message::EndEpoch).await?;
        match wire::expect(recv).await? {
            Message::Committed { epoch: e } if e == epoch => {
                let _ = send.finish();
                Ok(shipped)
            }
            Message::Refused { reason } => Err(Error::Refused(reason)),
            other => Err(unexpected(&other)),
        }
    }

    /// The blocks to send when the server took over a staging left by an
    /// earlier epoch of this device: it publishes every staged block unless
    /// sent again, so each must match this epoch. Blocks of `blocks` wholly
    /// staged are compared by digest (read and hashed here) and skipped
    /// when equal; staged bytes outside `blocks` are sent too (read at this
    /// epoch, in aligned pieces of at most [`VOUCH_PIECE`]).
    async fn vouch<R>(
        &self,
        volume: &str,
        epoch: u64,
        blocks: &[(u64, u32)],
        staged: &RangeSet,
        read: &Arc<R>,
        shipped: &mut Shipped,
    ) -> Result<Vec<(u64, u32)>>
    where
        R: Fn(u64, u32) -> Result<Vec<u8>> + Send + Sync + 'static,
    {
        let mut todo = Vec::with_capacity(blocks.len());
        let mut check = Vec::new();
        let mut covered = RangeSet::new();
        for &(offset, len) in blocks {
            let range = offset..offset + u64::from(len);
            covered.insert(range.clone());
            if staged.contains_range(range) {
                check.push((offset, len));
            } else {
                todo.push((offset, len));
            }
        }
        // Staged, and not ours to send: sent again as this epoch has it.
        let mut extra = staged.clone();
        extra.subtract(&covered);
        for r in extra.iter() {
            let mut at = r.start;
            while at < r.end {
                let end = ((at / VOUCH_PIECE + 1) * VOUCH_PIECE).min(r.end);
                todo.push((at, (end - at) as u32));
                at = end;
            }
        }
        for batch in check.chunks(crate::proto::MAX_HASH_BLOCKS) {
            let theirs = match self
                .ask(Message::StagedHashes {
                    volume: volume.to_string(),
                    epoch,
                    blocks: batch.to_vec(),
                })
                .await?
            {
                Message::Hashes { digests } if digests.len() == batch.len() => digests,
                other => return Err(unexpected(&other)),
            };
            let read = read.clone();
            let batch_owned = batch.to_vec();
            let mine = tokio::task::spawn_blocking(move || -> Result<Vec<Digest>> {
                batch_owned
                    .iter()
                    .map(|&(offset, len)| Ok(block::digest(&read(offset, len)?)))
                    .collect()
            })
            .await
            .map_err(|e| Error::Link(format!("hashing blocks: {e}")))??;
            for ((&(offset, len), m), t) in batch.iter().zip(&mine).zip(&theirs) {
                if m == t {
                    shipped.resumed_bytes += u64::from(len);
                } else {
                    todo.push((offset, len));
                }
            }
        }
        todo.sort_unstable();
        Ok(todo)
    }

    /// Send `blocks` over up to [`DATA_STREAMS`] data streams; returns the
    /// blocks the server refused.
    async fn send_data<R>(
        &self,
        volume: &str,
        epoch: u64,
        blocks: Vec<(u64, u32)>,
        level: i32,
        read: Arc<R>,
        shipped: &mut Shipped,
    ) -> Result<Vec<(u64, u32)>>
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
                read.clone(),
            ));
        }
        let mut refused = Vec::new();
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
            None => Ok(refused),
        }
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

fn unexpected(m: &Message) -> Error {
    let name = format!("{m:?}");
    Error::Link(format!(
        "unexpected answer from the server: {}",
        name.split([' ', '{', '(']).next().unwrap_or("?")
    ))
}
