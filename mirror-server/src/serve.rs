//! The QUIC server: authenticates clients by their pinned certificates and
//! takes epochs into their volumes.
//!
//! Each request is one bidirectional stream that starts with an exchange
//! of [`Message::Hello`]s. A client whose certificate is not enrolled may
//! only send [`Message::Enroll`]. Volumes live under the client's own
//! directory (`volumes/CLIENT/VOLUME`), named by the authenticated
//! certificate, never by the request: a client cannot even name another
//! client's volume. A malformed frame ends that connection, with the reason
//! logged; other connections go on. A revoked client's connections are
//! closed within a second.
//!
//! This module owns the transport: the endpoint, connections, hellos,
//! enrollment, the revocation recheck, and the dispatch of each request to
//! its handler; the volumes are [`crate::volumes`]'s, the epochs' and
//! restores' protocol is in `session`. [`run`] starts the server's parts
//! (the admin socket, the configured exports, the snapshot schedule)
//! around it and stops them at shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ublk_mirror_common::identity::{Fingerprint, Identity};
use ublk_mirror_common::proto::{self, Digest, ListedSnapshot, Message, Version, Writer};
use ublk_mirror_common::{tls, wire};

use crate::admin::{self, ServerLock};
use crate::clients::Registry;
use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::exports::Exports;
use crate::metrics::Metrics;
use crate::schedule;
use crate::session::{receive_data, receive_epoch, refuse, serve_restore, Fault, Sender};
use crate::snapshots::Kind;
use crate::volumes::Volumes;
use ublk_mirror_common::session::variant;

/// QUIC close code: the client was revoked.
const CLOSE_REVOKED: u32 = 1;
/// QUIC close code: the peer broke the protocol.
const CLOSE_PROTOCOL: u32 = 2;

/// QUIC close code: the client has too many connections open already.
const CLOSE_TOO_MANY: u32 = 3;

/// How often connections re-check that their client is still allowed.
const RECHECK: Duration = Duration::from_secs(1);

/// Connections one certificate may hold open at once: a machine's
/// daemons (one per device, each with a link) and its commands (restore,
/// snapshots, sync) together, with room to spare for a host of many
/// devices. Each may hold a few streams' buffers (a
/// restore's batch is up to 64 MiB), so that no one client can take the
/// server's memory with connections.
const CONNECTIONS_PER_CLIENT: usize = 128;

/// How long a new stream may take to say hello and ask its request.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    registry: Registry,
    volumes: Arc<Volumes>,
    metrics: Arc<Metrics>,
    /// Connections open, by certificate.
    connections: std::sync::Mutex<std::collections::HashMap<Fingerprint, usize>>,
}

/// One of a certificate's connections, counted while it lives.
struct Counted<'a> {
    shared: &'a Shared,
    fingerprint: Fingerprint,
}

impl Counted<'_> {
    /// Count a connection of `fingerprint`, unless it holds
    /// [`CONNECTIONS_PER_CLIENT`] already.
    fn new(shared: &Shared, fingerprint: Fingerprint) -> Option<Counted<'_>> {
        let mut open = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(fingerprint).or_insert(0);
        if *n >= CONNECTIONS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(Counted {
            shared,
            fingerprint,
        })
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let mut open = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.fingerprint) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.fingerprint);
            }
        }
    }
}

/// Serve until `shutdown` resolves. `on_listening` gets the bound address
/// (useful with port 0).
pub async fn run(
    data: &Path,
    config: &ServerConfig,
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let identity = Identity::load(&data.join("identity"))
        .map_err(|e| Error::Invalid(format!("{e} (run `mirror-server init` first)")))?;
    raise_open_files();
    // Not a config error (exit status 1, not 2): the unit tries again, as
    // a command holding the lock for a while (an import, an upgrade) ends.
    let _lock = ServerLock::take(data, "serve").map_err(|e| {
        Error::io(
            "cannot serve".to_string(),
            std::io::Error::other(e.to_string()),
        )
    })?;
    let server_config = tls::server_config(&identity).map_err(|e| Error::Invalid(e.to_string()))?;
    let chunks = tokio::task::block_in_place(|| config.chunk_store(data))?;
    tracing::info!(store = %chunks.describe(), "chunk store open");
    let volumes = Arc::new(Volumes::new(data, config.quota()).with_store(chunks));
    tokio::task::block_in_place(|| volumes.recover_all())?;
    let endpoint = std::net::UdpSocket::bind(config.listen)
        .and_then(|socket| tls::endpoint(socket, Some((server_config, &identity))))
        .map_err(|e| Error::io(format!("listening on {} (udp)", config.listen), e))?;
    let local = endpoint
        .local_addr()
        .map_err(|e| Error::io("reading the bound address", e))?;
    tracing::info!(listen = %local, fingerprint = %identity.fingerprint(), "serving");
    // Every listener is bound before the server says it listens.
    let metrics_listener = match &config.metrics {
        Some(m) => {
            let listener = tokio::net::TcpListener::bind(m.listen)
                .await
                .map_err(|e| Error::io(format!("serving metrics on {} (tcp)", m.listen), e))?;
            tracing::info!(listen = %m.listen, "metrics on GET /metrics");
            Some(listener)
        }
        None => None,
    };
    on_listening(local);
    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared {
        registry: Registry::open(data)?,
        volumes: volumes.clone(),
        metrics: metrics.clone(),
        connections: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    let exports = Arc::new(Exports::new());
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            volumes.clone(),
            exports.clone(),
        ));
    }
    let admin_socket = admin::dispatch::listen(data)?;
    tokio::spawn(admin::dispatch::serve(
        admin_socket,
        volumes.clone(),
        exports.clone(),
    ));
    config.start_exports(&exports, &volumes).await;
    tokio::spawn(schedule::collect(
        volumes.clone(),
        data.to_path_buf(),
        config.store.gc_every.0,
        config.store.gc_window.0,
    ));
    // The last verification, as the metrics show it, is the one this
    // server ran before it was restarted, if any.
    if let Some(ms) = schedule::last_ran(data, schedule::Chore::Verify) {
        metrics.verified_at(ms);
    }
    tokio::spawn(schedule::verify(
        volumes.clone(),
        data.to_path_buf(),
        config.store.verify_every.0,
        metrics.clone(),
    ));
    tokio::spawn(schedule::run(config.clone(), volumes, metrics));
    accept(&endpoint, shared, shutdown).await;
    tracing::info!("shutting down");
    exports.stop_all().await;
    endpoint.close(0u32.into(), b"server shutting down");
    endpoint.wait_idle().await;
    let _ = std::fs::remove_file(data.join(admin::SOCKET));
    Ok(())
}

/// Take connections, each on a task of its own, until `shutdown` resolves
/// or the endpoint closes.
async fn accept(
    endpoint: &quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = connection(shared, incoming).await {
                        tracing::info!(%remote, "connection ended: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
}

/// Every volume, snapshot and connection holds files open: take the hard
/// limit on open files as the soft one (the usual soft 1024 is soon met).
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-files limit from {soft}: {e}");
            }
        }
    }
}

/// A failed QUIC connection or stream.
fn link(e: impl std::fmt::Display) -> Error {
    Error::Link(e.to_string())
}

/// One client's connection: each stream a request, on a task of its own.
async fn connection(shared: Arc<Shared>, incoming: quinn::Incoming) -> Result<()> {
    let conn = incoming.await.map_err(link)?;
    let _counted = shared.metrics.connected();
    let fingerprint = tls::peer_fingerprint(&conn)
        .ok_or_else(|| Error::Invalid("the client presented no certificate".into()))?;
    let Some(_one_of_its) = Counted::new(&shared, fingerprint) else {
        conn.close(
            CLOSE_TOO_MANY.into(),
            format!("too many connections from this client (at most {CONNECTIONS_PER_CLIENT})")
                .as_bytes(),
        );
        return Err(Error::Invalid(format!(
            "{fingerprint}: more than {CONNECTIONS_PER_CLIENT} connections at once; closed"
        )));
    };
    let registry = shared.registry.clone();
    let client = tokio::task::block_in_place(|| registry.who(fingerprint))?;
    tracing::info!(
        remote = %conn.remote_address(),
        client = client.as_deref().unwrap_or("(not enrolled)"),
        "connected"
    );
    // Revocation cuts a client off at once (within RECHECK), also one
    // that enrolled on this very connection.
    tokio::spawn(watch_revocation(
        conn.clone(),
        shared.registry.clone(),
        fingerprint,
    ));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
            Err(e) => return Err(link(e)),
        };
        let shared = shared.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = request(&shared, fingerprint, send, recv).await {
                match e {
                    Fault::Protocol(reason) => {
                        tracing::warn!(remote = %conn.remote_address(), "protocol violation, closing: {reason}");
                        conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
                    }
                    Fault::Other(e) => tracing::info!("request failed: {e}"),
                }
            }
        });
    }
}

/// Close `conn` once `fingerprint`'s client is revoked (checked every
/// [`RECHECK`]), or return when it closes.
async fn watch_revocation(conn: quinn::Connection, registry: Registry, fingerprint: Fingerprint) {
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            () = tokio::time::sleep(RECHECK) => {}
        }
        if tokio::task::block_in_place(|| registry.revoked(fingerprint)).unwrap_or(false) {
            tracing::warn!(%fingerprint, "client revoked: closing its connection");
            conn.close(CLOSE_REVOKED.into(), b"revoked");
            return;
        }
    }
}

/// One request's stream: the hellos, then enrollment, or a request of an
/// enrolled client.
async fn request(
    shared: &Shared,
    fingerprint: Fingerprint,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    // A stream that says nothing does not stay open for good.
    let (version, req) = tokio::time::timeout(HELLO_TIMEOUT, async {
        let version = hello(&mut send, &mut recv).await?;
        let req = wire::expect(&mut recv).await?;
        Ok::<_, Fault>((version, req))
    })
    .await
    .map_err(|_| Fault::Other(Error::Link("a stream asked nothing in time".into())))??;
    req.check_version(version)
        .map_err(|e| Fault::Protocol(e.to_string()))?;
    if let Message::Enroll { name, secret } = &req {
        return enroll(shared, fingerprint, name, secret, &mut send).await;
    }
    // Who the client is, now: enrolled on this connection, or revoked.
    let registry = shared.registry.clone();
    let client = tokio::task::block_in_place(|| registry.who(fingerprint))?;
    let Some(client) = client.as_deref() else {
        let revoked = tokio::task::block_in_place(|| registry.revoked(fingerprint))?;
        let why = if revoked {
            "this machine's enrollment was revoked on the server (`mirror-server client revoke`, or another machine enrolled in its place with `client add --replace`): ask the server's admin"
        } else {
            "this client is not enrolled: run `ublk-mirror enroll TOKEN` with a token from `mirror-server client add`"
        };
        return refuse(&mut send, why.into()).await;
    };
    let to = Handler {
        volumes: &shared.volumes,
        metrics: &shared.metrics,
        client,
        version,
    };
    dispatch(to, req, &mut send, &mut recv).await
}

/// Take the client's `Hello` and answer with the version the stream
/// speaks (the older of the client's and ours); one that speaks no
/// version we do is refused, and its connection ends.
async fn hello(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<Version, Fault> {
    let hello = wire::expect(recv).await?;
    let version = match hello.check_hello() {
        Ok(v) => v,
        Err(e) => {
            refuse(send, e.to_string()).await?;
            return Err(Fault::Protocol(e.to_string()));
        }
    };
    wire::send(send, &Message::hello_at(version)).await?;
    Ok(version)
}

/// Enroll the certificate `fingerprint` as client `name`, with the
/// token's `secret`.
async fn enroll(
    shared: &Shared,
    fingerprint: Fingerprint,
    name: &str,
    secret: &[u8; 32],
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Fault> {
    let registry = shared.registry.clone();
    let enrolled = tokio::task::block_in_place(|| registry.enroll(name, secret, fingerprint));
    match enrolled {
        Ok(()) => {
            tracing::info!(client = %name, %fingerprint, "client enrolled");
            wire::send(
                send,
                &Message::Enrolled {
                    name: name.to_string(),
                },
            )
            .await?;
            let _ = send.finish();
            Ok(())
        }
        Err(e) => {
            tracing::warn!(client = %name, "enrollment refused");
            refuse(send, e.to_string()).await
        }
    }
}

/// Who a request is for: the registries, the enrolled client, and the
/// version its stream speaks.
#[derive(Clone, Copy)]
struct Handler<'a> {
    volumes: &'a Volumes,
    metrics: &'a Metrics,
    client: &'a str,
    version: Version,
}

/// Hand an enrolled client's request to its handler.
async fn dispatch(
    to: Handler<'_>,
    req: Message,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let Handler {
        volumes,
        metrics,
        client,
        version,
    } = to;
    match req {
        Message::OpenVolume { volume, size } => {
            open_volume(volumes, client, volume, size, send).await
        }
        Message::BeginEpoch {
            volume,
            epoch,
            writer,
        } => begin_epoch(to, &volume, epoch, writer, send, recv).await,
        Message::EpochData { volume, epoch } => {
            let from = Sender {
                client,
                version,
                volumes,
                metrics,
            };
            epoch_data(volumes, from, &volume, epoch, send, recv).await
        }
        Message::StagedHashes {
            volume,
            epoch,
            blocks,
        } => staged_hashes(volumes, client, &volume, epoch, &blocks, send).await,
        Message::Restore { volume, at } => {
            restore(volumes, client, &volume, at.as_deref(), send, recv).await
        }
        Message::TakeSnapshot { volume, name } => {
            take_snapshot(volumes, client, &volume, name.as_deref(), send).await
        }
        Message::ListSnapshots { volume } => list_snapshots(volumes, client, &volume, send).await,
        Message::HashRequest { volume, blocks } => {
            hash_request(volumes, client, &volume, &blocks, send).await
        }
        Message::TakeOver {
            volume,
            from,
            device,
        } => take_over(volumes, client, &volume, from, device, send).await,
        other => Err(Fault::Protocol(format!(
            "a request cannot start with {}",
            variant(&other)
        ))),
    }
}

/// `OpenVolume`: open (or create, within the quota) the client's volume
/// and answer what it is.
async fn open_volume(
    volumes: &Volumes,
    client: &str,
    volume: String,
    size: u64,
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Fault> {
    let opened = volumes.open(client, &volume, Some(size));
    match opened {
        Ok(v) => {
            let mut v = v.lock().await;
            match tokio::task::block_in_place(|| v.refresh()) {
                Ok(()) => {}
                // The cache answers; the commit waits for the store.
                Err(Error::Store(e)) => {
                    tracing::warn!(client, volume, "the chunk store cannot be read now: {e}")
                }
                Err(e) => return refuse(send, e.to_string()).await,
            }
            let state = v.state().clone();
            drop(v);
            wire::send(
                send,
                &Message::VolumeInfo {
                    volume,
                    size: state.size,
                    published_epoch: state.published_epoch,
                    uuid: state.uuid_bytes(),
                    writer: state.writer(),
                },
            )
            .await?;
            let _ = send.finish();
            Ok(())
        }
        Err(e) => refuse(send, e.to_string()).await,
    }
}

/// `BeginEpoch`: the epoch's control stream.
async fn begin_epoch(
    to: Handler<'_>,
    volume: &str,
    epoch: u64,
    writer: Writer,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let v = match to.volumes.open(to.client, volume, None) {
        Ok(v) => v,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let published = |digests| {
        to.volumes.published(to.client, digests);
        to.metrics.published(to.client);
    };
    receive_epoch(&v, published, epoch, writer, send, recv).await
}

/// `EpochData`: one data stream of an epoch being staged.
async fn epoch_data(
    volumes: &Volumes,
    from: Sender<'_>,
    volume: &str,
    epoch: u64,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let staging = match volumes.open(from.client, volume, None) {
        Ok(v) => v.lock().await.staging(epoch),
        Err(e) => return refuse(send, e.to_string()).await,
    };
    match staging {
        Some(staging) => receive_data(&staging, from, send, recv).await,
        None => {
            refuse(
                send,
                format!("epoch {epoch} of {volume} is not being staged: begin it first"),
            )
            .await
        }
    }
}

/// `StagedHashes`: the digests of blocks an epoch has staged.
async fn staged_hashes(
    volumes: &Volumes,
    client: &str,
    volume: &str,
    epoch: u64,
    blocks: &[(u64, u32)],
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Fault> {
    let staging = match volumes.open(client, volume, None) {
        Ok(v) => v.lock().await.staging(epoch),
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let Some(staging) = staging else {
        return refuse(
            send,
            format!("epoch {epoch} of {volume} is not being staged"),
        )
        .await;
    };
    let digests = staging.digests(blocks);
    wire::send(send, &Message::Hashes { digests }).await?;
    let _ = send.finish();
    Ok(())
}

/// `Restore`: pin the version asked for, serve it, and let it go.
async fn restore(
    volumes: &Volumes,
    client: &str,
    volume: &str,
    at: Option<&str>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let v = match volumes.open(client, volume, None) {
        Ok(v) => v,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let opened = {
        let mut v = v.lock().await;
        tokio::task::block_in_place(|| {
            let opened = v.open_version(at)?;
            // A version asked for by name or time is kept from now on:
            // an attach or instant restore reads it for as long as its
            // fill takes, across reboots and lost links, and retention
            // must not take it meanwhile.
            if at.is_some() && v.keep_snapshot(&opened.0.name)? {
                tracing::info!(client, volume, snapshot = %opened.0.name, "restored from: kept as a manual snapshot from now on");
            }
            Ok::<_, Error>(opened)
        })
    };
    let (info, pin, source) = match opened {
        Ok(p) => p,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    tracing::info!(client, volume, snapshot = %info.name, from_store = matches!(source, crate::store::VersionSource::Store(_)), checked = source.checked(), "restore started");
    let served = serve_restore(&source, &info, send, recv).await;
    let mut locked = v.lock().await;
    if let Err(e) = tokio::task::block_in_place(|| locked.done_reading(&info, pin)) {
        tracing::warn!(client, volume, "after a restore: {e}");
    }
    tracing::info!(client, volume, snapshot = %info.name, ok = served.is_ok(), damaged_in_cache = source.damaged(), "restore ended");
    served
}

/// `TakeSnapshot`: a manual snapshot of the volume, now.
async fn take_snapshot(
    volumes: &Volumes,
    client: &str,
    volume: &str,
    name: Option<&str>,
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Fault> {
    let v = match volumes.open(client, volume, None) {
        Ok(v) => v,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let mut v = v.lock().await;
    let taken = tokio::task::block_in_place(|| v.snapshot(name, Kind::Manual));
    // Not held while the answer waits for the client to read it: a client
    // that never reads would hold the volume (and the schedule) for good.
    drop(v);
    match taken {
        Ok(info) => {
            tracing::info!(client, volume, snapshot = %info.name, epoch = info.epoch, "snapshot taken");
            wire::send(
                send,
                &Message::SnapshotTaken {
                    name: info.name,
                    epoch: info.epoch,
                    epoch_ms: info.epoch_ms,
                },
            )
            .await?;
            let _ = send.finish();
            Ok(())
        }
        Err(e) => refuse(send, e.to_string()).await,
    }
}

/// `ListSnapshots`: the volume's snapshots, as many frames as they take
/// (V6).
async fn list_snapshots(
    volumes: &Volumes,
    client: &str,
    volume: &str,
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Fault> {
    let v = match volumes.open(client, volume, None) {
        Ok(v) => v,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    // The chunk store is read without the volume's lock (epochs wait for
    // it), by the rules a restore's `at` is resolved by.
    let listing = v.lock().await.listing();
    let (list, problems) = tokio::task::block_in_place(|| listing.finish());
    for e in &problems {
        tracing::warn!(client, volume, "listing snapshots: {e}");
    }
    // What the store said stays in this log: its paths are not the
    // client's business.
    let incomplete = (!problems.is_empty()).then(|| {
        "the server could not read its chunk store: snapshots only it keeps (taken on another server) may be missing from this list (the server's log says why)".to_string()
    });
    let listed: Vec<ListedSnapshot> = list
        .into_iter()
        .map(|s| ListedSnapshot {
            kind: format!("{:?}", s.kind).to_lowercase(),
            name: s.name,
            epoch: s.epoch,
            epoch_ms: s.epoch_ms,
            created_ms: s.created_ms,
        })
        .collect();
    // At least one frame: an empty list is a `done` one.
    let mut pieces: Vec<&[ListedSnapshot]> = listed.chunks(proto::MAX_LISTED).collect();
    if pieces.is_empty() {
        pieces.push(&[]);
    }
    let last = pieces.len() - 1;
    for (i, piece) in pieces.into_iter().enumerate() {
        wire::send(
            send,
            &Message::SnapshotList {
                snapshots: piece.to_vec(),
                done: i == last,
                incomplete: if i == last { incomplete.clone() } else { None },
            },
        )
        .await?;
    }
    let _ = send.finish();
    Ok(())
}

/// `TakeOver`: make `device` the volume's writer (V4).
async fn take_over(
    volumes: &Volumes,
    client: &str,
    volume: &str,
    from: Option<Writer>,
    device: [u8; 16],
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Fault> {
    let v = match volumes.open(client, volume, None) {
        Ok(v) => v,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let mut v = v.lock().await;
    let taken = tokio::task::block_in_place(|| v.take_over(from, device));
    drop(v);
    match taken {
        Ok(epoch) => {
            tracing::info!(client, volume, epoch, "volume taken over by a new device");
            wire::send(send, &Message::Committed { epoch }).await?;
            let _ = send.finish();
            Ok(())
        }
        Err(e) => refuse(send, e.to_string()).await,
    }
}

/// `HashRequest`: the digests of blocks of the published image.
async fn hash_request(
    volumes: &Volumes,
    client: &str,
    volume: &str,
    blocks: &[(u64, u32)],
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Fault> {
    let v = match volumes.open(client, volume, None) {
        Ok(v) => v,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let v = v.lock().await;
    let digests: Result<Vec<Digest>> = tokio::task::block_in_place(|| v.hashes(blocks));
    drop(v);
    match digests {
        Ok(digests) => {
            wire::send(send, &Message::Hashes { digests }).await?;
            let _ = send.finish();
            Ok(())
        }
        Err(e) => refuse(send, e.to_string()).await,
    }
}
