//! The client side of a connection to `mirror-server`: enrollment, opening
//! volumes, shipping epochs.

use std::net::SocketAddr;

use sha2::{Digest as _, Sha256};

use crate::identity::{Fingerprint, Identity};
use crate::proto::{Digest, Encoding, Message, Writer};
use crate::{tls, wire, Error, Result};

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
}

/// A connection to the server.
#[derive(Debug)]
pub struct Link {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// Bytes per second block data may use, if limited.
    bandwidth: Option<u64>,
    /// When the limit lets the next bytes go.
    next_free: std::sync::Mutex<tokio::time::Instant>,
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
            bandwidth: None,
            next_free: std::sync::Mutex::new(tokio::time::Instant::now()),
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
        self.bandwidth = bytes_per_second.filter(|&b| b > 0);
    }

    /// Wait until the bandwidth limit lets `bytes` more go.
    async fn pace(&self, bytes: u64) {
        let Some(rate) = self.bandwidth else { return };
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

    /// Open a request stream, hellos exchanged: for tools and tests that
    /// speak the protocol themselves.
    pub async fn stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let (mut send, mut recv) = self
            .conn
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
    /// hashed, compressed at zstd `level` when that pays, and sent; blocks
    /// the server refuses are read and sent again. Returns once the server
    /// has published the epoch.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_epoch(
        &self,
        volume: &str,
        epoch: u64,
        writer: Writer,
        blocks: &[(u64, u32)],
        level: i32,
        mut read: impl FnMut(u64, u32) -> Result<Vec<u8>>,
    ) -> Result<Shipped> {
        let (mut send, mut recv) = self.stream().await?;
        wire::send(
            &mut send,
            &Message::BeginEpoch {
                volume: volume.to_string(),
                epoch,
                writer,
            },
        )
        .await?;
        let mut shipped = Shipped::default();
        let sent = self
            .send_blocks(
                &mut send,
                &mut recv,
                epoch,
                blocks,
                level,
                &mut read,
                &mut shipped,
            )
            .await;
        match sent {
            Err(Error::Link(e)) => {
                // The server may have refused and ended the stream while
                // blocks were still going out: its reason says more.
                let answer = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    wire::expect(&mut recv),
                )
                .await;
                match answer {
                    Ok(Ok(Message::Refused { reason })) => Err(Error::Refused(reason)),
                    _ => Err(Error::Link(e)),
                }
            }
            other => other.map(|()| shipped),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_blocks(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        epoch: u64,
        blocks: &[(u64, u32)],
        level: i32,
        read: &mut impl FnMut(u64, u32) -> Result<Vec<u8>>,
        shipped: &mut Shipped,
    ) -> Result<()> {
        let mut todo: Vec<(u64, u32)> = blocks.to_vec();
        for _attempt in 0..3 {
            for &(offset, len) in &todo {
                let data = read(offset, len)?;
                let (header, payload) = encode_block(offset, &data, level);
                self.pace(payload.len() as u64).await;
                wire::send_with_data(send, &header, &payload).await?;
                shipped.blocks += 1;
                shipped.bytes += u64::from(len);
                shipped.wire_bytes += payload.len() as u64;
            }
            wire::send(
                send,
                &Message::EndEpoch {
                    blocks: shipped.blocks,
                },
            )
            .await?;
            match wire::expect(recv).await? {
                Message::Committed { epoch: e } if e == epoch => {
                    let _ = send.finish();
                    return Ok(());
                }
                Message::Resend { blocks } => {
                    tracing::warn!(
                        blocks = blocks.len(),
                        "the server refused blocks; sending them again"
                    );
                    todo = blocks;
                }
                Message::Refused { reason } => return Err(Error::Refused(reason)),
                other => return Err(unexpected(&other)),
            }
        }
        Err(Error::Link(format!(
            "epoch {epoch}: blocks kept failing their checks on the server"
        )))
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

/// The header and payload of one block: a zero block travels as a hole,
/// others compressed when that makes them smaller.
pub fn encode_block(offset: u64, data: &[u8], level: i32) -> (Message, Vec<u8>) {
    let len = data.len() as u32;
    if data.iter().all(|&b| b == 0) {
        let sha256 = zero_digest(len);
        let header = Message::Block {
            offset,
            len,
            sha256,
            encoding: Encoding::Zero,
            data_len: 0,
        };
        return (header, Vec::new());
    }
    let sha256: [u8; 32] = Sha256::digest(data).into();
    let (encoding, payload) = match zstd::bulk::compress(data, level) {
        Ok(z) if z.len() < data.len() => (Encoding::Zstd, z),
        _ => (Encoding::Raw, data.to_vec()),
    };
    let header = Message::Block {
        offset,
        len,
        sha256,
        encoding,
        data_len: payload.len() as u32,
    };
    (header, payload)
}

/// SHA-256 of `len` zero bytes (the common 64 KiB case computed once).
pub fn zero_digest(len: u32) -> Digest {
    static BLOCK_64K: std::sync::OnceLock<Digest> = std::sync::OnceLock::new();
    let compute = |len: u32| -> Digest {
        let mut h = Sha256::new();
        let zeroes = [0u8; 4096];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(zeroes.len());
            h.update(&zeroes[..n]);
            left -= n;
        }
        h.finalize().into()
    };
    if len == 64 << 10 {
        *BLOCK_64K.get_or_init(|| compute(len))
    } else {
        compute(len)
    }
}
