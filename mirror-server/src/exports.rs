//! The export registry: the one way an iSCSI export of a volume's
//! version is started, stopped and listed, whether the server starts it
//! for `server.toml`'s `[[exports]]`, the admin socket asks for it
//! (`mirror-server export` with a server running), or `mirror-server
//! export` serves it in the foreground. Also what describes an export
//! ([`ExportSpec`], with its target, names and CHAP settings). The iSCSI
//! target itself is [`crate::iscsi`]'s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::iscsi;
use crate::volumes::{split_volume, SharedVolume, Volumes};

/// An export to start: what `mirror-server export` takes, a
/// `server.toml` `[[exports]]` entry says, and the admin protocol carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    /// `CLIENT/VOLUME`.
    pub volume: String,
    /// A snapshot, a time, or `None` for now.
    pub at: Option<String>,
    /// Where the target listens.
    pub listen: std::net::SocketAddr,
    /// Its target name (default: made from the names).
    pub name: Option<String>,
    /// Initiator names allowed (empty: any).
    pub allow: Vec<String>,
    /// Serve a throwaway copy-on-write overlay (writes allowed, the
    /// snapshot untouched).
    #[serde(default)]
    pub writable: bool,
    /// CHAP the initiator must pass.
    #[serde(default)]
    pub chap: Option<ChapSpec>,
}

/// The running exports of a process, by target name.
#[derive(Debug, Default)]
pub struct Exports {
    running: Mutex<HashMap<String, iscsi::Running>>,
}

impl Exports {
    /// None running yet.
    pub fn new() -> Exports {
        Exports::default()
    }

    /// Start `spec`, its volume found in `volumes`; answers what
    /// [`export_json`] shows. A target name exported already is refused.
    pub async fn start(&self, volumes: &Volumes, spec: ExportSpec) -> Result<serde_json::Value> {
        for name in &spec.allow {
            check_initiator(name)?;
        }
        let ExportSpec {
            volume,
            at,
            listen,
            name,
            allow,
            writable,
            chap,
        } = spec;
        let chap = chap.map(ChapSpec::into_chap).transpose()?;
        let (client, vname) = split_volume(&volume)?;
        let v = volumes.open(client, vname, None)?;
        let dir = volumes.dir(client, vname);
        let overlay = writable.then_some(dir.as_path());
        let running = launch(
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
            let mut exports = self.running.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Stop the export named `name`; answers its target name and portal.
    pub async fn stop(&self, name: &str) -> Result<serde_json::Value> {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let Some(running) = running else {
            return Err(Error::Invalid(format!("nothing is exported as {name}")));
        };
        let info = serde_json::json!({"iqn": running.iqn, "portal": running.portal});
        running.stop().await;
        tracing::info!(iqn = %name, "export stopped");
        Ok(info)
    }

    /// The running exports, as [`export_json`] shows them, by target name.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<_> = running.values().map(export_json).collect();
        list.sort_by(|a, b| a["iqn"].as_str().cmp(&b["iqn"].as_str()));
        list
    }

    /// Initiator connections open now on each running export, by target
    /// name.
    pub fn connections(&self) -> Vec<(String, usize)> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .values()
            .map(|r| (r.iqn.clone(), r.connections()))
            .collect()
    }

    /// Stop every export (at shutdown).
    pub async fn stop_all(&self) {
        let exports: Vec<iscsi::Running> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        for running in exports {
            running.stop().await;
        }
    }
}

/// What `mirror-server export` prints about a running export.
pub fn export_json(running: &iscsi::Running) -> serde_json::Value {
    serde_json::json!({
        "iqn": running.iqn,
        "portal": running.portal,
        "volume": running.volume,
        "writable": running.writable,
        "snapshot": running.snapshot.name,
        "kind": running.snapshot.kind,
        "epoch": running.snapshot.epoch,
        "epoch_ms": running.snapshot.epoch_ms,
        "connections": running.connections(),
    })
}

/// Export version `at` of `volume` (of `client`) over iSCSI on `listen`
/// (with `overlay`: writable, its throwaway file made there).
#[allow(clippy::too_many_arguments)]
async fn launch(
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
    let (lun, info) = {
        let mut v = volume.lock().await;
        let uuid = v.state().uuid.clone();
        let (info, pin, source) = tokio::task::block_in_place(|| v.open_version(at))?;
        let lun = iscsi::SnapshotLun::new(volume.clone(), source, info.clone(), pin, &uuid);
        (lun, info)
    };
    let iqn = iqn.unwrap_or_else(|| {
        let shown = if at.is_none() {
            "now"
        } else {
            info.name.as_str()
        };
        iscsi::export_name(client, name, shown)
    });
    let lun = Arc::new(lun);
    match iscsi::start(lun.clone(), overlay, iqn, listen, allow, chap).await {
        Ok(mut running) => {
            running.volume = format!("{client}/{name}");
            Ok(running)
        }
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || lun.release()).await;
            Err(e)
        }
    }
}

/// `CLIENT/VOLUME[@SNAPSHOT|@TIME]` split at the `@`.
pub fn split_target(target: &str) -> (String, Option<String>) {
    match target.split_once('@') {
        Some((v, a)) => (v.to_string(), Some(a.to_string())),
        None => (target.to_string(), None),
    }
}

/// Check an initiator's name (`--allow`): an iSCSI name (iqn., eui. or
/// naa.); any other never matches a login, and would lock everyone out.
pub fn check_initiator(name: &str) -> Result<()> {
    let form = ["iqn.", "eui.", "naa."].iter().any(|p| name.starts_with(p));
    if !form || name.len() > 223 || name.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!(
            "--allow {name:?} is not an initiator's iSCSI name (iqn.YYYY-MM.domain:anything, eui.HEX or naa.HEX; see /etc/iscsi/initiatorname.iscsi on the initiator)"
        )));
    }
    Ok(())
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
            use std::os::unix::fs::PermissionsExt;
            // Whoever reads the secret can read the backup.
            if let Ok(meta) = std::fs::metadata(p) {
                if meta.permissions().mode() & 0o004 != 0 {
                    tracing::warn!(file = %p.display(), "the CHAP secret file can be read by every user: chmod 600 it (or 640 with the server's group)");
                }
            }
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
