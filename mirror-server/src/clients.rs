//! Enrolled clients: who may connect, and as whom.
//!
//! One JSON file per client in `DATA/clients/NAME.json` (format 1):
//!
//! ```text
//! {"format":1,"name":"laptop-7","created_ms":..,
//!  "token":{"secret_sha256":"<hex>","expires_ms":..} | null,
//!  "fingerprint":"<hex of the client certificate's sha256>" | null,
//!  "revoked":false, "retired":["<hex>", ...]}
//! ```
//!
//! `retired` (absent in files written before it: none) lists certificates
//! the name had before `client add NAME --replace` (a new machine for the
//! same client, the old one lost or stolen): they are cut off like a
//! revoked client's, at once, and the name's volumes go to whoever enrolls
//! with the new token.
//!
//! `client add` writes a pending client with a token (the secret itself is
//! printed once and never stored); `enroll` consumes the token and records
//! the client's certificate fingerprint; `revoke` marks it revoked, which
//! the server notices within a second and cuts the client off.
//!
//! The server and the `client` commands are different processes: every
//! read-modify-write takes an exclusive `flock` on `clients/.lock`, and
//! each file is replaced whole (written, synced, renamed). The server
//! answers "who is this certificate" from a copy in memory, read again
//! when the directory changes (its mtime; a change less than a second old
//! is never trusted to be the last, the way git treats racy index entries).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use ublk_mirror_common::fsutil;
use ublk_mirror_common::hex::encode as hex;
use ublk_mirror_common::identity::Fingerprint;
use ublk_mirror_common::proto::check_name;

use crate::error::{Error, Result};
use ublk_mirror_common::clock::now_ms;

/// Directory of the client files in the data directory.
pub const CLIENTS_DIR: &str = "clients";

/// How long a token is good for, unless told otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

const FORMAT: u32 = 1;

/// A pending enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingToken {
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// When it stops being accepted, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// One client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// Format of the file.
    pub format: u32,
    /// Its name (also its directory of volumes).
    pub name: String,
    /// When `client add` made it.
    pub created_ms: u64,
    /// The token not used yet, if any.
    pub token: Option<PendingToken>,
    /// Its certificate, once enrolled (SHA-256, hex).
    pub fingerprint: Option<String>,
    /// Cut off for good.
    pub revoked: bool,
    /// Certificates it had before a `--replace` (cut off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<String>,
}

impl Client {
    /// `pending`, `enrolled` or `revoked`.
    pub fn state(&self) -> &'static str {
        if self.revoked {
            "revoked"
        } else if self.fingerprint.is_some() {
            "enrolled"
        } else {
            "pending"
        }
    }
}

/// The client files of a data directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
    /// Every client as of the directory's mtime.
    cache: Arc<Mutex<Option<Snapshot>>>,
}

/// The clients as read at the directory's mtime.
type Snapshot = (SystemTime, Arc<Vec<Client>>);

/// Held while a client file is read, changed and written.
struct WriteLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl Registry {
    /// The registry in `data` (its directory is created if missing).
    pub fn open(data: &Path) -> Result<Registry> {
        let dir = data.join(CLIENTS_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Registry {
            dir,
            cache: Arc::new(Mutex::new(None)),
        })
    }

    fn lock(&self) -> Result<WriteLock> {
        let path = self.dir.join(".lock");
        fsutil::lock_file(&path, true)
            .map(WriteLock)
            .map_err(|e| Error::io(format!("locking {}", path.display()), e))
    }

    /// Every client, from memory while the directory has not changed.
    fn snapshot(&self) -> Result<Arc<Vec<Client>>> {
        let mtime = std::fs::metadata(&self.dir)
            .and_then(|m| m.modified())
            .map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?;
        let settled = SystemTime::now()
            .duration_since(mtime)
            .is_ok_and(|age| age > Duration::from_secs(1));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((when, clients)) = cache.as_ref() {
            if *when == mtime && settled {
                return Ok(clients.clone());
            }
        }
        let clients = Arc::new(self.list()?);
        *cache = Some((mtime, clients.clone()));
        Ok(clients)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Read one client.
    pub fn get(&self, name: &str) -> Result<Option<Client>> {
        check_name(name).map_err(|e| Error::Invalid(e.to_string()))?;
        let path = self.path(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let c: Client = serde_json::from_str(&text)
                    .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
                if c.format > FORMAT {
                    return Err(Error::Corrupt(format!(
                        "{}: format {} is a newer mirror-server's (this one reads {FORMAT})",
                        path.display(),
                        c.format
                    )));
                }
                Ok(Some(c))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    fn put(&self, client: &Client) -> Result<()> {
        let path = self.path(&client.name);
        let text = serde_json::to_vec_pretty(client).map_err(|e| Error::Corrupt(e.to_string()))?;
        fsutil::write_durably(&path, &text)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Every client, by name.
    pub fn list(&self) -> Result<Vec<Client>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("listing {}", self.dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                // One damaged file must not lock every client out.
                match self.get(name) {
                    Ok(Some(c)) => out.push(c),
                    Ok(None) => {}
                    Err(e) => tracing::error!("skipping client {name}: {e}"),
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Add a client, or give a pending one a new token; returns the secret
    /// (shown once). An enrolled or revoked client is not touched.
    ///
    /// With `replace`, an enrolled or revoked client gets a token too (a
    /// new machine for the same name and its volumes): the certificate it
    /// had is cut off at once (`retired`), and the name is pending until
    /// the new token enrolls.
    pub fn add(&self, name: &str, ttl: Duration, replace: bool) -> Result<[u8; 32]> {
        crate::snapshots::check_new_name(name)?;
        let _lock = self.lock()?;
        let mut client = match self.get(name)? {
            Some(c) if c.state() != "pending" && !replace => {
                return Err(Error::Invalid(format!(
                    "client {name} is {} already; pick another name, or give --replace to enroll a new machine as {name} (the one it has now is cut off)",
                    c.state()
                )))
            }
            Some(mut c) => {
                if let Some(old) = c.fingerprint.take() {
                    c.retired.push(old);
                }
                c.revoked = false;
                c
            }
            None => Client {
                format: FORMAT,
                name: name.to_string(),
                created_ms: now_ms(),
                token: None,
                fingerprint: None,
                revoked: false,
                retired: Vec::new(),
            },
        };
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)
            .map_err(|e| Error::Invalid(format!("no randomness for the secret: {e}")))?;
        client.token = Some(PendingToken {
            secret_sha256: hex(&Sha256::digest(secret)),
            expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
        });
        self.put(&client)?;
        Ok(secret)
    }

    /// Consume `name`'s token with `secret` and record `fingerprint` as
    /// its certificate. Wrong, expired, used tokens and unknown names are
    /// refused alike.
    pub fn enroll(&self, name: &str, secret: &[u8; 32], fingerprint: Fingerprint) -> Result<()> {
        let refused = || {
            Error::Invalid(format!(
                "enrollment of {name:?} refused: unknown name, or a wrong, used or expired token"
            ))
        };
        let _lock = self.lock()?;
        let Some(mut client) = self.get(name).map_err(|_| refused())? else {
            return Err(refused());
        };
        let fp = hex(&fingerprint.0);
        // The answer to an enrollment that went through may have been lost:
        // the same certificate enrolling again as the same name is fine.
        if !client.revoked && client.fingerprint.as_deref() == Some(fp.as_str()) {
            return Ok(());
        }
        if self
            .list()?
            .iter()
            .any(|c| !c.revoked && c.fingerprint.as_deref() == Some(fp.as_str()))
        {
            return Err(Error::Invalid(
                "this certificate is enrolled under another name already".into(),
            ));
        }
        if self.list()?.iter().any(|c| c.retired.contains(&fp)) {
            // A machine a --replace cut off, under any name.
            return Err(refused());
        }
        let Some(token) = client.token.as_ref().filter(|_| !client.revoked) else {
            return Err(refused());
        };
        let offered = hex(&Sha256::digest(secret));
        if !constant_time_eq(offered.as_bytes(), token.secret_sha256.as_bytes())
            || token.expires_ms < now_ms()
        {
            return Err(refused());
        }
        client.token = None;
        client.fingerprint = Some(fp);
        self.put(&client)
    }

    /// Mark a client revoked: it can connect no more.
    pub fn revoke(&self, name: &str) -> Result<()> {
        let _lock = self.lock()?;
        let Some(mut client) = self.get(name)? else {
            return Err(Error::Invalid(format!("there is no client {name}")));
        };
        client.revoked = true;
        client.token = None;
        self.put(&client)
    }

    /// Whether this certificate belongs to a revoked client, or was
    /// replaced (`client add --replace`).
    pub fn revoked(&self, fingerprint: Fingerprint) -> Result<bool> {
        let fp = hex(&fingerprint.0);
        Ok(self.snapshot()?.iter().any(|c| {
            (c.revoked && c.fingerprint.as_deref() == Some(fp.as_str())) || c.retired.contains(&fp)
        }))
    }

    /// The enrolled, unrevoked client with this certificate.
    pub fn who(&self, fingerprint: Fingerprint) -> Result<Option<String>> {
        let fp = hex(&fingerprint.0);
        Ok(self
            .snapshot()?
            .iter()
            .find(|c| !c.revoked && c.fingerprint.as_deref() == Some(fp.as_str()))
            .map(|c| c.name.clone()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client enrolled on a machine that was lost: --replace gives its
    /// name a new token, the old certificate is cut off at once (and can
    /// never enroll again), and the new machine enrolls as the same name.
    #[test]
    fn a_replaced_client_is_cut_off_and_its_name_enrolls_anew() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        let secret = r.add("laptop", DEFAULT_TOKEN_TTL, false).unwrap();
        let (old, new) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
        r.enroll("laptop", &secret, old).unwrap();
        let err = r
            .add("laptop", DEFAULT_TOKEN_TTL, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--replace"), "{err}");
        let secret = r.add("laptop", DEFAULT_TOKEN_TTL, true).unwrap();
        assert_eq!(r.get("laptop").unwrap().unwrap().state(), "pending");
        assert_eq!(r.who(old).unwrap(), None);
        assert!(r.revoked(old).unwrap(), "the lost machine is not cut off");
        assert!(
            r.enroll("laptop", &secret, old).is_err(),
            "the lost machine enrolled again"
        );
        let other = r.add("desk", DEFAULT_TOKEN_TTL, false).unwrap();
        assert!(
            r.enroll("desk", &other, old).is_err(),
            "the lost machine enrolled as another"
        );
        r.enroll("laptop", &secret, new).unwrap();
        assert_eq!(r.who(new).unwrap().as_deref(), Some("laptop"));
        assert!(!r.revoked(new).unwrap());
        assert!(r.revoked(old).unwrap());
        // A revoked client too.
        r.revoke("laptop").unwrap();
        let secret = r.add("laptop", DEFAULT_TOKEN_TTL, true).unwrap();
        let third = Fingerprint([3; 32]);
        r.enroll("laptop", &secret, third).unwrap();
        assert_eq!(r.who(third).unwrap().as_deref(), Some("laptop"));
        assert!(r.revoked(new).unwrap() && r.revoked(old).unwrap());
    }

    #[test]
    fn a_token_enrolls_once_and_revocation_cuts_off() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        let secret = r.add("laptop", DEFAULT_TOKEN_TTL, false).unwrap();
        assert_eq!(r.get("laptop").unwrap().unwrap().state(), "pending");
        let fp = Fingerprint([7; 32]);
        assert!(
            r.enroll("laptop", &[0; 32], fp).is_err(),
            "a wrong secret enrolled"
        );
        assert!(
            r.enroll("other", &secret, fp).is_err(),
            "an unknown name enrolled"
        );
        r.enroll("laptop", &secret, fp).unwrap();
        assert!(
            r.enroll("laptop", &secret, Fingerprint([8; 32])).is_err(),
            "a token was reused"
        );
        assert_eq!(r.who(fp).unwrap().as_deref(), Some("laptop"));
        assert!(
            r.add("laptop", DEFAULT_TOKEN_TTL, false).is_err(),
            "an enrolled client got a new token"
        );
        assert!(!r.revoked(fp).unwrap());
        r.revoke("laptop").unwrap();
        assert_eq!(r.who(fp).unwrap(), None);
        assert!(r.revoked(fp).unwrap());
        assert_eq!(r.list().unwrap()[0].state(), "revoked");
        // An expired token is refused.
        let s = r.add("old", Duration::ZERO, false).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.enroll("old", &s, fp).is_err());
        assert!(r.get("../etc").is_err(), "a path as a name");
    }

    #[test]
    fn another_process_s_changes_are_seen_at_once_and_none_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let server = Registry::open(dir.path()).unwrap();
        let secret = server.add("laptop", DEFAULT_TOKEN_TTL, false).unwrap();
        let fp = Fingerprint([3; 32]);
        server.enroll("laptop", &secret, fp).unwrap();
        assert_eq!(server.who(fp).unwrap().as_deref(), Some("laptop"));
        // `client revoke` in another process: the cached answer is not
        // trusted past the change, even within the mtime's granularity.
        let cli = Registry::open(dir.path()).unwrap();
        cli.revoke("laptop").unwrap();
        assert_eq!(server.who(fp).unwrap(), None);
        assert!(server.revoked(fp).unwrap());
        // Writers at once (threads standing in for processes; the lock is
        // the same flock): every one of them lands.
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let r = Registry::open(dir.path()).unwrap();
                std::thread::spawn(move || {
                    let name = format!("c{i}");
                    let s = r.add(&name, DEFAULT_TOKEN_TTL, false).unwrap();
                    r.enroll(&name, &s, Fingerprint([i as u8 + 10; 32]))
                        .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let enrolled = server
            .list()
            .unwrap()
            .iter()
            .filter(|c| c.state() == "enrolled")
            .count();
        assert_eq!(enrolled, 8);
    }
}
