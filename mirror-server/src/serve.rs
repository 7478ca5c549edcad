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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ublk_mirror_common::identity::{Fingerprint, Identity};
use ublk_mirror_common::proto::Message;
use ublk_mirror_common::{tls, wire, ByteSize};

use crate::admin::{self, ServerLock};
use crate::clients::Registry;
use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::iscsi;
use crate::session::{receive_data, receive_epoch, refuse, serve_restore, variant, Fault};
use crate::snapshots::Kind;
use crate::store::{Volume, VOLUMES_DIR};

/// QUIC close code: the client was revoked.
const CLOSE_REVOKED: u32 = 1;
/// QUIC close code: the peer broke the protocol.
const CLOSE_PROTOCOL: u32 = 2;

/// How often connections re-check that their client is still allowed.
const RECHECK: Duration = Duration::from_secs(1);

/// A volume shared by the connections (and exports) that use it.
pub type SharedVolume = Arc<tokio::sync::Mutex<Volume>>;

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    data: PathBuf,
    config: ServerConfig,
    registry: Registry,
    /// Open volumes by (client, volume), with their size.
    volumes: Mutex<HashMap<(String, String), (u64, SharedVolume)>>,
    /// Running iSCSI exports by target name.
    exports: Mutex<HashMap<String, iscsi::Running>>,
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
    let _lock = ServerLock::take(data).map_err(|_| {
        Error::Invalid(format!(
            "another mirror-server serves {} already",
            data.display()
        ))
    })?;
    let server_config = tls::server_config(&identity).map_err(|e| Error::Invalid(e.to_string()))?;
    recover_all(data)?;
    let endpoint = quinn::Endpoint::server(server_config, config.listen)
        .map_err(|e| Error::io(format!("listening on {} (udp)", config.listen), e))?;
    let local = endpoint
        .local_addr()
        .map_err(|e| Error::io("reading the bound address", e))?;
    tracing::info!(listen = %local, fingerprint = %identity.fingerprint(), "serving");
    on_listening(local);
    let shared = Arc::new(Shared {
        data: data.to_path_buf(),
        config: config.clone(),
        registry: Registry::open(data)?,
        volumes: Mutex::new(HashMap::new()),
        exports: Mutex::new(HashMap::new()),
    });
    let admin = admin_socket(data)?;
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                match admin.accept().await {
                    Ok((stream, _)) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let handled = admin::serve_one(stream, async |op| {
                                admin_request(&shared, op).await
                            })
                            .await;
                            if let Err(e) = handled {
                                tracing::warn!("admin request failed: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::error!("admin socket: {e}");
                        return;
                    }
                }
            }
        });
    }
    start_exports(&shared).await;
    tokio::spawn(schedule(shared.clone()));
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
    tracing::info!("shutting down");
    let exports: Vec<iscsi::Running> = shared
        .exports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, r)| r)
        .collect();
    for running in exports {
        running.stop().await;
    }
    endpoint.close(0u32.into(), b"server shutting down");
    endpoint.wait_idle().await;
    let _ = std::fs::remove_file(data.join(admin::SOCKET));
    Ok(())
}

/// Start the exports `server.toml` lists. One that cannot start (a
/// snapshot gone, a port taken, a secret file missing) is logged as an
/// error and the rest of the server goes on: replication must not stop
/// for an export.
async fn start_exports(shared: &Arc<Shared>) {
    for (i, e) in shared.config.exports.iter().enumerate() {
        let started = match e.request() {
            Ok(op) => admin_request(shared, op).await,
            Err(err) => Err(err),
        };
        match started {
            Ok(_) => {}
            Err(err) => tracing::error!(
                target = %e.target,
                "exports[{i}] in {} did not start: {err}",
                crate::config::CONFIG_FILE
            ),
        }
    }
}

/// Carry out an admin request in the server.
async fn admin_request(shared: &Arc<Shared>, op: admin::Op) -> Result<serde_json::Value> {
    match op {
        admin::Op::Unexport { name } => {
            let running = shared
                .exports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
            let Some(running) = running else {
                return Err(Error::Invalid(format!("nothing is exported as {name}")));
            };
            let info = serde_json::json!({"iqn": running.iqn, "portal": running.portal});
            running.stop().await;
            tracing::info!(iqn = %name, "export stopped");
            Ok(info)
        }
        admin::Op::Export {
            volume,
            at,
            listen,
            name,
            allow,
            writable,
            chap,
        } => {
            let chap = chap.map(admin::ChapSpec::into_chap).transpose()?;
            let (client, vname) = split_volume(&volume)?;
            let v = open_volume(shared, client, vname, None)?;
            let dir = shared.data.join(VOLUMES_DIR).join(client).join(vname);
            let overlay = writable.then_some(dir.as_path());
            let running = export(
                v,
                client,
                vname,
                at.as_deref(),
                listen,
                name,
                allow,
                overlay,
                chap,
            )
            .await?;
            let info = export_json(&running);
            tracing::info!(iqn = %running.iqn, portal = %running.portal, snapshot = %running.snapshot.name, "exported");
            let refused = {
                let mut exports = shared.exports.lock().unwrap_or_else(|p| p.into_inner());
                if exports.contains_key(&running.iqn) {
                    Some(running)
                } else {
                    exports.insert(running.iqn.clone(), running);
                    None
                }
            };
            if let Some(running) = refused {
                running.stop().await;
                return Err(Error::Invalid(
                    "that target name is exported already".into(),
                ));
            }
            Ok(info)
        }
        op => {
            let volume = admin::volume_of(&op).unwrap_or_default().to_string();
            let (client, name) = split_volume(&volume)?;
            let v = open_volume(shared, client, name, None)?;
            let mut v = v.lock().await;
            let done = tokio::task::block_in_place(|| admin::apply(&mut v, &op));
            if let Ok(info) = &done {
                tracing::info!(?op, snapshot = %info.name, "admin request done");
            }
            done.map(|info| admin::snapshot_json(&info))
        }
    }
}

/// What `mirror-server export` prints about a running export.
pub fn export_json(running: &iscsi::Running) -> serde_json::Value {
    serde_json::json!({
        "iqn": running.iqn,
        "portal": running.portal,
        "snapshot": running.snapshot.name,
        "epoch": running.snapshot.epoch,
        "epoch_ms": running.snapshot.epoch_ms,
    })
}

/// Export version `at` of `volume` (of `client`) over iSCSI on `listen`
/// (with `overlay`: writable, its throwaway file made there).
#[allow(clippy::too_many_arguments)]
pub async fn export(
    volume: SharedVolume,
    client: &str,
    name: &str,
    at: Option<&str>,
    listen: std::net::SocketAddr,
    iqn: Option<String>,
    allow: Vec<String>,
    overlay: Option<&Path>,
    chap: Option<iscsi::target::Chap>,
) -> Result<iscsi::Running> {
    let (info, pin, reader, uuid) = {
        let mut v = volume.lock().await;
        let (info, pin) = tokio::task::block_in_place(|| v.pin_version(at))?;
        (info, pin, v.reader(), v.state().uuid.clone())
    };
    let iqn = iqn.unwrap_or_else(|| {
        let shown = if at.is_none() {
            "now"
        } else {
            info.name.as_str()
        };
        iscsi::export_name(client, name, shown)
    });
    let lun = Arc::new(iscsi::SnapshotLun::new(
        volume.clone(),
        reader,
        info,
        pin,
        &uuid,
    ));
    match iscsi::start(lun.clone(), overlay, iqn, listen, allow, chap).await {
        Ok(running) => Ok(running),
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || lun.release()).await;
            Err(e)
        }
    }
}

/// Listen on `DATA/admin.sock`, for root only.
fn admin_socket(data: &Path) -> Result<tokio::net::UnixListener> {
    let path = data.join(admin::SOCKET);
    // We hold the server lock: a socket left there is a dead server's.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| Error::io(format!("restricting {}", path.display()), e))?;
    Ok(listener)
}

fn split_volume(volume: &str) -> Result<(&str, &str)> {
    let (client, name) = volume
        .split_once('/')
        .ok_or_else(|| Error::Invalid(format!("{volume:?}: name a volume as CLIENT/VOLUME")))?;
    for part in [client, name] {
        ublk_mirror_common::proto::check_name(part).map_err(|e| Error::Invalid(e.to_string()))?;
    }
    Ok((client, name))
}

/// Every `CLIENT/VOLUME` in the data directory.
fn all_volumes(data: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let root = data.join(VOLUMES_DIR);
    for client in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for volume in std::fs::read_dir(client.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let hidden = volume.file_name().to_string_lossy().starts_with('.');
            if !hidden && volume.path().join("state.json").exists() {
                out.push((
                    client.file_name().to_string_lossy().into_owned(),
                    volume.file_name().to_string_lossy().into_owned(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// The snapshot schedule: for every volume whose policy takes them, a
/// snapshot when the volume changed since its last one and `every` has
/// passed since the last scheduled one; then pruning by its retention.
async fn schedule(shared: Arc<Shared>) {
    let every: Vec<Duration> = std::iter::once(shared.config.snapshots.every.0)
        .chain(shared.config.volumes.values().map(|p| p.every.0))
        .filter(|d| !d.is_zero())
        .collect();
    let Some(shortest) = every.iter().min().copied() else {
        return;
    };
    let tick = (shortest / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        tokio::time::sleep(tick).await;
        for (client, name) in all_volumes(&shared.data) {
            let policy = shared.config.policy(&format!("{client}/{name}"));
            if policy.every.0.is_zero() {
                continue;
            }
            let Ok(v) = open_volume(&shared, &client, &name, None) else {
                continue;
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
                }
                Ok(())
            });
            if let Err(e) = done {
                tracing::error!(volume = %format!("{client}/{name}"), "snapshot schedule: {e}");
            }
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

/// Open every volume once, finishing publications a crash interrupted,
/// so that no image is left half-applied until its client comes back.
fn recover_all(data: &Path) -> Result<()> {
    let root = data.join(VOLUMES_DIR);
    if !root.is_dir() {
        return Ok(());
    }
    for client in std::fs::read_dir(&root)
        .map_err(|e| Error::io(format!("listing {}", root.display()), e))?
        .flatten()
    {
        for volume in std::fs::read_dir(client.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|v| !v.file_name().to_string_lossy().starts_with('.'))
        {
            match Volume::open(&volume.path()) {
                Ok((_, r)) if r != Default::default() => {
                    tracing::warn!(volume = %volume.path().display(), recovery = ?r, "volume recovered");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(volume = %volume.path().display(), "cannot open volume: {e}");
                }
            }
        }
    }
    Ok(())
}

/// A failed QUIC connection or stream.
fn link(e: impl std::fmt::Display) -> Error {
    Error::Link(e.to_string())
}

async fn connection(shared: Arc<Shared>, incoming: quinn::Incoming) -> Result<()> {
    let conn = incoming.await.map_err(link)?;
    let fingerprint = tls::peer_fingerprint(&conn)
        .ok_or_else(|| Error::Invalid("the client presented no certificate".into()))?;
    let registry = shared.registry.clone();
    let client = tokio::task::block_in_place(|| registry.who(fingerprint))?;
    tracing::info!(
        remote = %conn.remote_address(),
        client = client.as_deref().unwrap_or("(not enrolled)"),
        "connected"
    );
    // Revocation cuts a client off at once (within RECHECK), also one
    // that enrolled on this very connection.
    {
        let watched = conn.clone();
        let registry = shared.registry.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = watched.closed() => return,
                    () = tokio::time::sleep(RECHECK) => {}
                }
                if tokio::task::block_in_place(|| registry.revoked(fingerprint)).unwrap_or(false) {
                    tracing::warn!(%fingerprint, "client revoked: closing its connection");
                    watched.close(CLOSE_REVOKED.into(), b"revoked");
                    return;
                }
            }
        });
    }
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

async fn request(
    shared: &Shared,
    fingerprint: Fingerprint,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let hello = wire::expect(&mut recv).await?;
    if let Err(e) = hello.check_hello() {
        refuse(&mut send, e.to_string()).await?;
        return Err(Fault::Protocol(e.to_string()));
    }
    wire::send(&mut send, &Message::hello()).await?;
    let req = wire::expect(&mut recv).await?;
    if let Message::Enroll { name, secret } = &req {
        let registry = shared.registry.clone();
        let enrolled = tokio::task::block_in_place(|| registry.enroll(name, secret, fingerprint));
        return match enrolled {
            Ok(()) => {
                tracing::info!(client = %name, %fingerprint, "client enrolled");
                wire::send(&mut send, &Message::Enrolled { name: name.clone() }).await?;
                let _ = send.finish();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(client = %name, "enrollment refused");
                refuse(&mut send, e.to_string()).await
            }
        };
    }
    // Who the client is, now: enrolled on this connection, or revoked.
    let registry = shared.registry.clone();
    let client = tokio::task::block_in_place(|| registry.who(fingerprint))?;
    let Some(client) = client.as_deref() else {
        return refuse(
            &mut send,
            "this client is not enrolled: run `ublk-mirror enroll TOKEN` with a token from `mirror-server client add`".into(),
        )
        .await;
    };
    match req {
        Message::OpenVolume { volume, size } => {
            let opened = open_volume(shared, client, &volume, Some(size));
            match opened {
                Ok(v) => {
                    let state = v.lock().await.state().clone();
                    wire::send(
                        &mut send,
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
                Err(e) => refuse(&mut send, e.to_string()).await,
            }
        }
        Message::BeginEpoch {
            volume,
            epoch,
            writer,
        } => {
            let v = match open_volume(shared, client, &volume, None) {
                Ok(v) => v,
                Err(e) => return refuse(&mut send, e.to_string()).await,
            };
            receive_epoch(&v, epoch, writer, &mut send, &mut recv).await
        }
        Message::EpochData { volume, epoch } => {
            let staging = match open_volume(shared, client, &volume, None) {
                Ok(v) => v.lock().await.staging(epoch),
                Err(e) => return refuse(&mut send, e.to_string()).await,
            };
            match staging {
                Some(staging) => receive_data(&staging, &mut send, &mut recv).await,
                None => {
                    refuse(
                        &mut send,
                        format!("epoch {epoch} of {volume} is not being staged: begin it first"),
                    )
                    .await
                }
            }
        }
        Message::StagedHashes {
            volume,
            epoch,
            blocks,
        } => {
            let staging = match open_volume(shared, client, &volume, None) {
                Ok(v) => v.lock().await.staging(epoch),
                Err(e) => return refuse(&mut send, e.to_string()).await,
            };
            let Some(staging) = staging else {
                return refuse(
                    &mut send,
                    format!("epoch {epoch} of {volume} is not being staged"),
                )
                .await;
            };
            let digests = staging.digests(&blocks);
            wire::send(&mut send, &Message::Hashes { digests }).await?;
            let _ = send.finish();
            Ok(())
        }
        Message::Restore { volume, at } => {
            let v = match open_volume(shared, client, &volume, None) {
                Ok(v) => v,
                Err(e) => return refuse(&mut send, e.to_string()).await,
            };
            let pinned = {
                let mut v = v.lock().await;
                tokio::task::block_in_place(|| v.pin_version(at.as_deref()))
            };
            let (info, pin) = match pinned {
                Ok(p) => p,
                Err(e) => return refuse(&mut send, e.to_string()).await,
            };
            tracing::info!(client, volume, snapshot = %info.name, "restore started");
            let served = serve_restore(&v, &info, &mut send, &mut recv).await;
            let mut locked = v.lock().await;
            if let Err(e) = tokio::task::block_in_place(|| locked.done_reading(&info, pin)) {
                tracing::warn!(client, volume, "after a restore: {e}");
            }
            tracing::info!(client, volume, snapshot = %info.name, ok = served.is_ok(), "restore ended");
            served
        }
        Message::TakeSnapshot { volume, name } => {
            let v = match open_volume(shared, client, &volume, None) {
                Ok(v) => v,
                Err(e) => return refuse(&mut send, e.to_string()).await,
            };
            let mut v = v.lock().await;
            let taken = tokio::task::block_in_place(|| v.snapshot(name.as_deref(), Kind::Manual));
            match taken {
                Ok(info) => {
                    tracing::info!(client, volume, snapshot = %info.name, epoch = info.epoch, "snapshot taken");
                    wire::send(
                        &mut send,
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
                Err(e) => refuse(&mut send, e.to_string()).await,
            }
        }
        Message::HashRequest { volume, blocks } => {
            let v = match open_volume(shared, client, &volume, None) {
                Ok(v) => v,
                Err(e) => return refuse(&mut send, e.to_string()).await,
            };
            let v = v.lock().await;
            let digests = tokio::task::block_in_place(|| v.hashes(&blocks));
            match digests {
                Ok(digests) => {
                    wire::send(&mut send, &Message::Hashes { digests }).await?;
                    let _ = send.finish();
                    Ok(())
                }
                Err(e) => refuse(&mut send, e.to_string()).await,
            }
        }
        other => Err(Fault::Protocol(format!(
            "a request cannot start with {}",
            variant(&other)
        ))),
    }
}

/// The volume `client/volume`, opened once (finishing an interrupted
/// commit) and shared; created when `size` is given and it is new.
fn open_volume(
    shared: &Shared,
    client: &str,
    volume: &str,
    size: Option<u64>,
) -> Result<SharedVolume> {
    let key = (client.to_string(), volume.to_string());
    let mut volumes = shared.volumes.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((have, v)) = volumes.get(&key) {
        if let Some(size) = size.filter(|s| s != have) {
            return Err(size_mismatch(volume, *have, size));
        }
        return Ok(v.clone());
    }
    let dir = shared.data.join(VOLUMES_DIR).join(client).join(volume);
    let opened = if dir.exists() {
        let (v, recovery) = tokio::task::block_in_place(|| Volume::open(&dir))?;
        if recovery != Default::default() {
            tracing::warn!(client, volume, ?recovery, "volume recovered");
        }
        if let Some(size) = size {
            if v.state().size != size {
                return Err(size_mismatch(volume, v.state().size, size));
            }
        }
        v
    } else {
        let Some(size) = size else {
            return Err(Error::Invalid(format!(
                "there is no volume {volume}: open it first"
            )));
        };
        tokio::task::block_in_place(|| check_quota(shared, client, size))?;
        tracing::info!(client, volume, size, "new volume");
        tokio::task::block_in_place(|| Volume::create(&dir, size))?
    };
    let have = opened.state().size;
    let v = Arc::new(tokio::sync::Mutex::new(opened));
    volumes.insert(key, (have, v.clone()));
    Ok(v)
}

/// Refuse a new volume of `size` that would take `client` past the
/// server's limits.
fn check_quota(shared: &Shared, client: &str, size: u64) -> Result<()> {
    let cdir = shared.data.join(VOLUMES_DIR).join(client);
    let mut count = 0u32;
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(&cdir).into_iter().flatten().flatten() {
        if let Ok(state) = crate::store::read_state(&entry.path()) {
            count += 1;
            bytes = bytes.saturating_add(state.size);
        }
    }
    let limits = &shared.config;
    if count >= limits.max_volumes_per_client {
        return Err(Error::Invalid(format!(
            "client {client} has {count} volumes, the most this server allows (max_volumes_per_client in server.toml)"
        )));
    }
    if let Some(max) = limits.max_bytes_per_client {
        if bytes.saturating_add(size) > max.0 {
            return Err(Error::Invalid(format!(
                "a volume of {} would take client {client} past its {} (it has {} in volumes; max_bytes_per_client in server.toml)",
                ByteSize(size),
                max,
                ByteSize(bytes)
            )));
        }
    }
    Ok(())
}

fn size_mismatch(volume: &str, have: u64, asked: u64) -> Error {
    Error::Invalid(format!(
        "volume {volume} is {have} bytes on the server, not {asked}: a volume's size never changes (use another volume name)"
    ))
}
