//! Changing volumes while the server runs: the `mirror-server` commands
//! that change a volume (snapshot, delete) ask the running server over a
//! unix socket, `DATA/admin.sock` (mode 0600), so that one process owns
//! each volume; with no server running they do it themselves, holding
//! `DATA/server.lock` as the server would.
//!
//! # Protocol, version 1
//!
//! One JSON request per connection, one line, answered with one line:
//!
//! ```text
//! -> {"v":1,"op":"snapshot","volume":"laptop/root","name":null}
//! -> {"v":1,"op":"delete","volume":"laptop/root","snapshot":"before-upgrade"}
//! -> {"v":1,"op":"export","volume":"laptop/root","at":"before-upgrade",
//!     "listen":"127.0.0.1:3260","name":null,"allow":[]}
//! -> {"v":1,"op":"unexport","name":"iqn.2026-11.org.ublk-mirror:laptop.root.before-upgrade"}
//! <- {"ok":{"id":3,"name":"..","epoch":..,"epoch_ms":..,"created_ms":..,"kind":"manual"}}
//! <- {"ok":{"iqn":"..","portal":"127.0.0.1:3260","snapshot":"..","epoch":..}}
//! <- {"error":"there is no snapshot x"}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::snapshots::{Kind, SnapshotInfo};
use crate::store::{Volume, VOLUMES_DIR};

/// The socket's file name in the data directory.
pub const SOCKET: &str = "admin.sock";
/// The lock the server holds while it runs.
pub const LOCK: &str = "server.lock";
const VERSION: u32 = 1;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Take a manual snapshot.
    Snapshot {
        /// `CLIENT/VOLUME`.
        volume: String,
        /// Its name (`None`: after the time).
        name: Option<String>,
    },
    /// Delete a snapshot.
    Delete {
        /// `CLIENT/VOLUME`.
        volume: String,
        /// The snapshot.
        snapshot: String,
    },
    /// Export a version over iSCSI (read-only) until unexported.
    Export {
        /// `CLIENT/VOLUME`.
        volume: String,
        /// A snapshot, a time, or `None` for now.
        at: Option<String>,
        /// Where the target listens.
        listen: std::net::SocketAddr,
        /// Its target name (default: made from the names).
        name: Option<String>,
        /// Initiator names allowed (empty: any).
        allow: Vec<String>,
        /// Serve a throwaway copy-on-write overlay (writes allowed, the
        /// snapshot untouched).
        #[serde(default)]
        writable: bool,
        /// CHAP the initiator must pass.
        #[serde(default)]
        chap: Option<ChapSpec>,
    },
    /// Stop an export.
    Unexport {
        /// Its target name.
        name: String,
    },
}

/// `CLIENT/VOLUME[@SNAPSHOT|@TIME]` split at the `@`.
pub fn split_target(target: &str) -> (String, Option<String>) {
    match target.split_once('@') {
        Some((v, a)) => (v.to_string(), Some(a.to_string())),
        None => (target.to_string(), None),
    }
}

/// Refuse what is not an iSCSI qualified name.
pub fn check_iqn(iqn: &str) -> Result<()> {
    if !iqn.starts_with("iqn.") || iqn.len() > 223 || iqn.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!(
            "{iqn:?} is not an iSCSI name (iqn.YYYY-MM.domain:anything, at most 223 characters)"
        )));
    }
    Ok(())
}

/// CHAP settings of an export, as the admin protocol carries them (over
/// the root-only socket).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapSpec {
    /// The initiator's CHAP name.
    pub user: String,
    /// Its secret.
    pub secret: String,
    /// Mutual CHAP: the target's name and secret.
    pub mutual: Option<(String, String)>,
}

impl std::fmt::Debug for ChapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapSpec")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ChapSpec {
    /// CHAP settings from a user name and a secret file (one line), with
    /// mutual CHAP when both of those are given too; `None` without a
    /// user. The secrets are checked here, so that a bad one is told
    /// before anything runs.
    pub fn from_files(
        user: Option<String>,
        secret_file: Option<&Path>,
        mutual_user: Option<String>,
        mutual_secret_file: Option<&Path>,
    ) -> Result<Option<ChapSpec>> {
        let read = |p: &Path| -> Result<String> {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
            Ok(text.trim_end_matches(['\n', '\r']).to_string())
        };
        let (user, file) = match (user, secret_file) {
            (Some(user), Some(file)) => (user, file),
            (None, None) => return Ok(None),
            _ => {
                return Err(Error::Invalid(
                    "CHAP needs both a user and a secret file".into(),
                ))
            }
        };
        let mutual = match (mutual_user, mutual_secret_file) {
            (Some(u), Some(f)) => Some((u, read(f)?)),
            (None, None) => None,
            _ => {
                return Err(Error::Invalid(
                    "mutual CHAP needs both a user and a secret file".into(),
                ))
            }
        };
        let spec = ChapSpec {
            user,
            secret: read(file)?,
            mutual,
        };
        spec.clone().into_chap()?;
        Ok(Some(spec))
    }

    /// Check the secrets (RFC 7143 asks for at least 96 bits; initiators
    /// such as open-iscsi take 12 to 16 characters) and make the target's
    /// settings.
    pub fn into_chap(self) -> Result<crate::iscsi::target::Chap> {
        let check = |what: &str, secret: &str| {
            if (12..=255).contains(&secret.len()) {
                Ok(secret.as_bytes().to_vec())
            } else {
                Err(Error::Invalid(format!(
                    "the {what} secret must have 12 to 255 characters (initiators such as open-iscsi take 12 to 16)"
                )))
            }
        };
        if self.user.is_empty() {
            return Err(Error::Invalid("the CHAP user name is empty".into()));
        }
        let secret = check("CHAP", &self.secret)?;
        let mutual = match self.mutual {
            Some((user, s)) => {
                if s == self.secret {
                    return Err(Error::Invalid(
                        "the mutual secret must differ from the initiator's".into(),
                    ));
                }
                Some((user, check("mutual CHAP", &s)?))
            }
            None => None,
        };
        Ok(crate::iscsi::target::Chap {
            user: self.user,
            secret,
            mutual,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    v: u32,
    #[serde(flatten)]
    op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Reply {
    Ok(serde_json::Value),
    Error(String),
}

/// Where volume `CLIENT/VOLUME` lives, checked to be one.
pub fn volume_dir(data: &Path, volume: &str) -> Result<PathBuf> {
    let (client, name) = volume.split_once('/').ok_or_else(|| {
        Error::Invalid(format!(
            "{volume:?}: name a volume as CLIENT/VOLUME (see `mirror-server volumes`)"
        ))
    })?;
    for part in [client, name] {
        ublk_mirror_common::proto::check_name(part).map_err(|e| Error::Invalid(e.to_string()))?;
    }
    let dir = data.join(VOLUMES_DIR).join(client).join(name);
    if !dir.join("state.json").exists() {
        return Err(Error::Invalid(format!(
            "there is no volume {volume} (see `mirror-server volumes`)"
        )));
    }
    Ok(dir)
}

/// Carry out a snapshot or delete `op` on an open volume.
pub fn apply(volume: &mut Volume, op: &Op) -> Result<SnapshotInfo> {
    match op {
        Op::Snapshot { name, .. } => volume.snapshot(name.as_deref(), Kind::Manual),
        Op::Delete { snapshot, .. } => volume.delete_snapshot(snapshot),
        Op::Export { .. } | Op::Unexport { .. } => {
            Err(Error::Invalid("exports run in a server process".into()))
        }
    }
}

/// The volume `op` is about, if any.
pub fn volume_of(op: &Op) -> Option<&str> {
    match op {
        Op::Snapshot { volume, .. } | Op::Delete { volume, .. } | Op::Export { volume, .. } => {
            Some(volume)
        }
        Op::Unexport { .. } => None,
    }
}

/// Whether a server answers on `data`'s admin socket.
pub fn server_running(data: &Path) -> bool {
    UnixStream::connect(data.join(SOCKET)).is_ok()
}

/// A snapshot as the admin protocol shows it.
pub fn snapshot_json(info: &SnapshotInfo) -> serde_json::Value {
    serde_json::to_value(info).unwrap_or_default()
}

/// Serve one admin connection's request with `handle`.
pub async fn serve_one(
    stream: tokio::net::UnixStream,
    handle: impl AsyncFnOnce(Op) -> Result<serde_json::Value>,
) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read).take(64 << 10);
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| Error::io("reading an admin request", e))?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(r) if r.v == VERSION => match handle(r.op).await {
            Ok(info) => Reply::Ok(info),
            Err(e) => Reply::Error(e.to_string()),
        },
        Ok(r) => Reply::Error(format!(
            "admin protocol {} is not spoken here ({VERSION} is)",
            r.v
        )),
        Err(e) => Reply::Error(format!("malformed admin request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).map_err(|e| Error::Corrupt(e.to_string()))?;
    out.push(b'\n');
    write
        .write_all(&out)
        .await
        .map_err(|e| Error::io("answering an admin request", e))
}

/// Carry out `op`: through the running server, or here when none runs
/// (snapshot and delete; an export without a server is the caller's to
/// run in the foreground).
pub fn request(data: &Path, op: Op) -> Result<serde_json::Value> {
    if let Some(volume) = volume_of(&op) {
        volume_dir(data, volume)?;
    }
    match UnixStream::connect(data.join(SOCKET)) {
        Ok(mut stream) => {
            let mut line = serde_json::to_vec(&Request { v: VERSION, op })
                .map_err(|e| Error::Corrupt(e.to_string()))?;
            line.push(b'\n');
            stream
                .write_all(&line)
                .map_err(|e| Error::io("asking the server", e))?;
            let mut answer = String::new();
            BufReader::new(stream)
                .read_line(&mut answer)
                .map_err(|e| Error::io("reading the server's answer", e))?;
            match serde_json::from_str::<Reply>(&answer) {
                Ok(Reply::Ok(info)) => Ok(info),
                Ok(Reply::Error(e)) => Err(Error::Invalid(e)),
                Err(_) => Err(Error::Invalid(format!(
                    "the server gave no answer ({:?})",
                    answer.trim()
                ))),
            }
        }
        Err(_) => {
            // No server: do it here, as the server would, holding its lock.
            let Some(name) = volume_of(&op) else {
                return Err(Error::Invalid(format!(
                    "no mirror-server serves {} (nothing is exported)",
                    data.display()
                )));
            };
            let _lock = ServerLock::take(data)?;
            let (mut volume, _) = Volume::open(&volume_dir(data, name)?)?;
            apply(&mut volume, &op).map(|info| snapshot_json(&info))
        }
    }
}

/// The data directory's lock: one process at a time changes volumes.
#[derive(Debug)]
pub struct ServerLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl ServerLock {
    /// Take it, or say who has it.
    pub fn take(data: &Path) -> Result<ServerLock> {
        let path = data.join(LOCK);
        match ublk_mirror_common::fsutil::lock_file(&path, false) {
            Ok(lock) => Ok(ServerLock(lock)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(Error::Invalid(format!(
                "another mirror-server is using {} (its admin socket does not answer: is it starting?)",
                data.display()
            ))),
            Err(e) => Err(Error::io(format!("locking {}", path.display()), e)),
        }
    }
}
