//! This machine's enrollment with a mirror server: its identity (key and
//! self-signed certificate) and the server it pinned.
//!
//! Files in the client directory (default `/var/lib/ublk-mirror/client/`):
//! `key.pem` (0600), `cert.pem`, and `server.json` (format 1):
//! `{"format":1,"name":"laptop-7","address":"host:4747","fingerprint":"<hex>"}`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ublk_mirror_common::client::Link;
use ublk_mirror_common::identity::{Fingerprint, Identity};
use ublk_mirror_common::token::Token;
use ublk_mirror_common::{fsutil, hex};

use crate::error::{Error, Result};

/// The default client directory.
pub const DEFAULT_CLIENT_DIR: &str = "/var/lib/ublk-mirror/client";

const SERVER_FILE: &str = "server.json";
const FORMAT: u32 = 1;

/// The server this machine is enrolled with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// Format of the file.
    pub format: u32,
    /// This client's name on the server.
    pub name: String,
    /// The server's address (`host:port`).
    pub address: String,
    /// The server certificate's SHA-256, hex.
    pub fingerprint: String,
}

impl Enrollment {
    /// The pinned server certificate.
    pub fn server(&self) -> Result<Fingerprint> {
        hex::decode(&self.fingerprint)
            .map(Fingerprint)
            .ok_or_else(|| Error::InvalidConfig(format!("{SERVER_FILE}: bad fingerprint")))
    }

    /// Read the enrollment in `dir`.
    pub fn load(dir: &Path) -> Result<Enrollment> {
        let path = dir.join(SERVER_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotEnrolled(path.clone()),
            _ => Error::io(
                format!(
                    "reading {} (enroll first: `ublk-mirror enroll TOKEN`)",
                    path.display()
                ),
                e,
            ),
        })?;
        let e: Enrollment = serde_json::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if e.format > FORMAT {
            return Err(Error::ConfigFile {
                path,
                reason: format!(
                    "format {} is a newer ublk-mirror's (this one reads {FORMAT}): run that one",
                    e.format
                ),
            });
        }
        Ok(e)
    }
}

/// This machine's identity (its key and certificate, made when it
/// enrolled) from `dir`: missing, this machine is not enrolled there.
pub fn load_identity(dir: &Path) -> Result<Identity> {
    let key = dir.join("key.pem");
    match std::fs::metadata(&key) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotEnrolled(key));
        }
        Err(e) => {
            return Err(Error::io(
                format!("reading this machine's key {}", key.display()),
                e,
            ))
        }
        Ok(_) => {}
    }
    Identity::load(dir).map_err(|e| match e {
        // Unreadable (not root?): what the system said, by its kind.
        ublk_mirror_common::Error::Io { source, .. } => Error::io(
            format!("reading this machine's identity in {}", dir.display()),
            source,
        ),
        other => Error::ConfigFile {
            path: key.clone(),
            reason: format!("{other}: enroll this machine anew (`ublk-mirror enroll TOKEN` with a new --client-dir)"),
        },
    })
}

fn common_error(e: ublk_mirror_common::Error) -> Error {
    Error::io("enrolling", std::io::Error::other(e.to_string()))
}

/// Enroll with the server a token names: make this machine's identity (once),
/// prove the token's secret over a connection that pins the server, and
/// record the server. Returns where it was saved.
pub fn enroll(dir: &Path, token: &Token) -> Result<PathBuf> {
    let path = dir.join(SERVER_FILE);
    if path.exists() {
        return Err(Error::InvalidConfig(format!(
            "this machine is enrolled already ({}); remove the directory {} to enroll anew",
            path.display(),
            dir.display()
        )));
    }
    let identity = if dir.join("key.pem").exists() {
        Identity::load(dir).map_err(common_error)?
    } else {
        Identity::create(dir).map_err(common_error)?
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let name = runtime
        .block_on(async {
            let link = Link::connect(&identity, token.server, &token.address)
                .await
                .map_err(|e| match e {
                    // Pinning failed: not yet enrolled, so nothing "changed".
                    ublk_mirror_common::Error::Refused(_) => {
                        ublk_mirror_common::Error::Refused(format!(
                            "the server at {} is not the one that made this token (its certificate is not the one the token names): the token's address may be another server's (`mirror-server client add --address HOST:PORT` makes one with the right address), or that server's identity was made anew since the token was made (make a new one there)",
                            token.address
                        ))
                    }
                    e => e,
                })?;
            let name = link.enroll(&token.name, token.secret).await;
            link.close().await;
            name
        })
        .map_err(Error::Mirror)?;
    let enrollment = Enrollment {
        format: FORMAT,
        name,
        address: token.address.clone(),
        fingerprint: hex::encode(&token.server.0),
    };
    let text = serde_json::to_vec_pretty(&enrollment)
        .map_err(|e| Error::io("encoding the enrollment", std::io::Error::other(e)))?;
    fsutil::write_durably(&path, &text)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}
