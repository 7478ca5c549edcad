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
//! -> {"v":1,"op":"exports"}
//! -> {"v":1,"op":"check-image","volume":"laptop/root"}
//! <- {"ok":{"id":3,"name":"..","epoch":..,"epoch_ms":..,"created_ms":..,"kind":"manual"}}
//! <- {"ok":{"iqn":"..","portal":"127.0.0.1:3260","snapshot":"..","epoch":..}}
//! <- {"ok":[{"iqn":"..","portal":"..","volume":"..","snapshot":"..",..},..]}
//! <- {"ok":{"blocks":4096,"damaged":1,"repaired":1}}
//! <- {"error":"there is no snapshot x"}
//! ```
//!
//! This module is the protocol, the commands' side of it
//! ([`request`]) and the lock; [`dispatch`] is the running server's side.

pub mod dispatch;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::exports::ExportSpec;
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
    /// Export a version over iSCSI until unexported (its fields beside
    /// `op`, as [`ExportSpec`] has them).
    Export(ExportSpec),
    /// Stop an export.
    Unexport {
        /// Its target name.
        name: String,
    },
    /// List the running exports (an older server answers that it does not
    /// know the op).
    Exports,
    /// Check a volume's image against the chunk store's version it holds
    /// and repair what differs (`verify`); answered with an
    /// [`ImageCheck`](crate::store::ImageCheck).
    #[serde(rename = "check-image")]
    CheckImage {
        /// `CLIENT/VOLUME`.
        volume: String,
    },
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
        Op::Export(_) | Op::Unexport { .. } | Op::Exports => {
            Err(Error::Invalid("exports run in a server process".into()))
        }
        Op::CheckImage { .. } => Err(Error::Invalid(
            "an image is checked by `verify` or the server".into(),
        )),
    }
}

/// The volume `op` is about, if any.
pub fn volume_of(op: &Op) -> Option<&str> {
    match op {
        Op::Snapshot { volume, .. } | Op::Delete { volume, .. } | Op::CheckImage { volume } => {
            Some(volume)
        }
        Op::Export(spec) => Some(&spec.volume),
        Op::Unexport { .. } | Op::Exports => None,
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

/// Carry out `op`: through the running server, or here when none runs
/// (snapshot and delete; an export without a server is the caller's to
/// run in the foreground).
pub fn request(data: &Path, cfg: &Path, op: Op) -> Result<serde_json::Value> {
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
        Err(e) => {
            // No server: do it here, as the server would, holding its lock.
            if op == Op::Exports {
                return match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        Ok(serde_json::Value::Array(Vec::new()))
                    }
                    _ => Err(Error::io(
                        format!("asking the server on {}", data.join(SOCKET).display()),
                        e,
                    )),
                };
            }
            let Some(name) = volume_of(&op) else {
                let holder = ServerLock::holder(data).map_or(String::new(), |h| {
                    format!("; {h} holds it: a foreground `export` stops with Ctrl-C there")
                });
                return Err(Error::Invalid(format!(
                    "no mirror-server serves {} (nothing is exported){holder}",
                    data.display()
                )));
            };
            let _lock = ServerLock::take(data, &format!("{op:?}"))?;
            let (mut volume, _) = Volume::open(&volume_dir(data, name)?)?;
            // With its chunk store, as the server has it: a snapshot pins
            // its version there (else GC would take it), is of the store's
            // newest version, and a delete unpins it.
            let store = crate::config::ServerConfig::load(cfg)?.chunk_store(data)?;
            volume.attach(store, name)?;
            if let Op::CheckImage { .. } = op {
                // Nothing else writes the image while the lock is held.
                let Some(probe) = volume.image_probe()? else {
                    return Ok(serde_json::json!(crate::store::ImageCheck::default()));
                };
                let (blocks, suspects) = probe.scan(|_, _| {})?;
                let mut check = volume.repair_image(&suspects)?;
                check.blocks = blocks;
                return Ok(serde_json::json!(check));
            }
            apply(&mut volume, &op).map(|info| snapshot_json(&info))
        }
    }
}

/// The data directory's lock: one process at a time changes volumes.
///
/// The lock file (`DATA/server.lock`) also says who holds it, for the
/// message another process gives: one line, `pid N: WHAT` (written by the holder
/// once it has the lock; an older build left it empty). It means nothing
/// once its holder is gone.
#[derive(Debug)]
pub struct ServerLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl ServerLock {
    /// Take it for `what` (`serve`, `export laptop/root@x`, …), or say who
    /// has it.
    pub fn take(data: &Path, what: &str) -> Result<ServerLock> {
        let path = data.join(LOCK);
        match ublk_mirror_common::fsutil::lock_file(&path, false) {
            Ok(lock) => {
                // Who holds it, for the others' messages: best effort.
                let line = format!("pid {}: {what}\n", std::process::id());
                let _ = lock
                    .set_len(0)
                    .and_then(|()| std::os::unix::fs::FileExt::write_all_at(&*lock, line.as_bytes(), 0));
                Ok(ServerLock(lock))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(Error::Invalid(format!(
                "{} is in use by {}: one mirror-server process at a time changes its volumes; stop that one, or try again once it is done",
                data.display(),
                holder_of(&path)
            ))),
            Err(e) => Err(Error::io(format!("locking {}", path.display()), e)),
        }
    }

    /// Who holds the lock of `data` now, if someone does.
    pub fn holder(data: &Path) -> Option<String> {
        let path = data.join(LOCK);
        match ublk_mirror_common::fsutil::lock_file(&path, false) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(holder_of(&path)),
            _ => None,
        }
    }
}

/// The holder a lock file names, in words.
fn holder_of(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) if text.starts_with("pid ") => {
            format!("another mirror-server ({})", text.trim())
        }
        _ => "another mirror-server".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_request_has_its_fields_beside_the_op() {
        let spec = ExportSpec {
            volume: "laptop/root".into(),
            at: Some("before-upgrade".into()),
            listen: "127.0.0.1:3260".parse().unwrap(),
            name: None,
            allow: vec![],
            writable: false,
            chap: None,
        };
        let req = Request {
            v: VERSION,
            op: Op::Export(spec.clone()),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":1,"op":"export","volume":"laptop/root","at":"before-upgrade","listen":"127.0.0.1:3260","name":null,"allow":[],"writable":false,"chap":null}"#
        );
        // As the module doc shows it: writable and chap may be left out.
        let read: Request = serde_json::from_str(
            r#"{"v":1,"op":"export","volume":"laptop/root","at":"before-upgrade","listen":"127.0.0.1:3260","name":null,"allow":[]}"#,
        )
        .unwrap();
        assert_eq!(read.op, Op::Export(spec));
    }
}
