//! The server config file, written by `mirror-server init` with every
//! default spelled out. It is `DATA/server.toml`, or the file `--config`
//! names; with the default data directory and no `DATA/server.toml`, it is
//! `/etc/mirror-server/server.toml` when that exists (the Debian package's
//! layout: config under /etc, data under /var/lib). Relative paths in it
//! (the store's `url`) are relative to the data directory.
//!
//! ```toml
//! listen = "[::]:4747"            # UDP address QUIC listens on
//! max_volumes_per_client = 64     # volumes one client may create
//! # max_bytes_per_client = "4TiB" # sum of one client's volume sizes (no limit unless set)
//!
//! [snapshots]                     # the schedule, for every volume
//! every = "1h"                    # a snapshot when something changed ("0s": none)
//! hourly = 24                     # keep one an hour for 24 hours,
//! daily = 30                      # then one a day for 30 days,
//! weekly = 0                      # then one a week (0: forever)
//!
//! [volumes."laptop/root"]         # one volume's own schedule (keys left
//! every = "15m"                   # out are [snapshots]'s)
//!
//! [[exports]]                     # served over iSCSI while the server runs
//!                                 # (each on an address of its own)
//! target = "laptop/root@2026-11-20"   # a snapshot's name, or a date or time (local)
//! listen = "127.0.0.1:3260"       # the default
//! # name = "iqn.…"                # default: made from the names
//! # allow = ["iqn.1993-08.org.debian:01:restore-box"]
//! # writable = false              # true: a throwaway overlay
//! # chap_user = "restore"         # with chap_secret_file, and for mutual
//! # chap_secret_file = "/etc/mirror-server/chap.secret"
//! # mutual_user / mutual_secret_file
//!
//! [metrics]                       # Prometheus, GET /metrics (off without it)
//! listen = "127.0.0.1:9464"
//!
//! [store]                         # every version of every volume (see
//! url = "store"                   # `chunks::backend` for S3 and its keys)
//! pack_size = "32MiB"
//! ```
//!
//! Port 4747/udp is ublk-mirror's default (unassigned by IANA).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use ublk_mirror_common::size::ByteSize;
use ublk_mirror_common::Span;

use crate::snapshots::{Retention, DEFAULT_EVERY};

use crate::chunks::{ChunkStore, StoreConfig};
use crate::error::{Error, Result};
use crate::exports::{ExportSpec, Exports};
use crate::volumes::{Quota, Volumes};
use std::sync::Arc;

/// The default QUIC port.
pub const DEFAULT_PORT: u16 = 4747;

/// File name of the config inside the data directory.
pub const CONFIG_FILE: &str = "server.toml";

/// The data directory when none is given.
pub const DEFAULT_DATA: &str = "/var/lib/mirror-server";

/// The config of the default data directory when that has none of its own
/// (where the Debian package puts it).
pub const SYSTEM_CONFIG: &str = "/etc/mirror-server/server.toml";

/// The config file of data directory `data`: `explicit` when given (the
/// `--config` option); else `DATA/server.toml`, unless `data` is the
/// default data directory, which has no such file, and [`SYSTEM_CONFIG`]
/// exists.
pub fn locate(data: &Path, explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    let own = data.join(CONFIG_FILE);
    if data == Path::new(DEFAULT_DATA) && !own.exists() && Path::new(SYSTEM_CONFIG).exists() {
        return PathBuf::from(SYSTEM_CONFIG);
    }
    own
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Most volumes one client may create.
    #[serde(default = "default_max_volumes")]
    pub max_volumes_per_client: u32,
    /// Most bytes one client's volumes may add up to (their sizes).
    #[serde(default)]
    pub max_bytes_per_client: Option<ByteSize>,
    /// The snapshot schedule and retention of every volume.
    #[serde(default)]
    pub snapshots: SnapshotPolicy,
    /// Volumes (`CLIENT/VOLUME`) with a schedule of their own: each key
    /// given replaces `[snapshots]`'s, the others are `[snapshots]`'s.
    #[serde(default)]
    pub volumes: BTreeMap<String, PolicyOverride>,
    /// iSCSI exports started with the server.
    #[serde(default)]
    pub exports: Vec<ExportConfig>,
    /// Where every version of every volume is kept (the chunk store);
    /// without the section, the directory `store` in the data directory.
    #[serde(default = "StoreConfig::local_default")]
    pub store: StoreConfig,
    /// Prometheus metrics (off without the section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]`: where `GET /metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address (`127.0.0.1:9464`: keep it local or on a management
    /// network; the metrics name clients and volumes).
    pub listen: SocketAddr,
}

/// An iSCSI export the server starts (what `mirror-server export` takes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// `CLIENT/VOLUME`, `CLIENT/VOLUME@SNAPSHOT` or `CLIENT/VOLUME@TIME`;
    /// without `@`: the volume as it is when the server starts.
    pub target: String,
    /// TCP address the target listens on.
    #[serde(default = "default_export_listen")]
    pub listen: SocketAddr,
    /// Its target name (default: made from the names).
    #[serde(default)]
    pub name: Option<String>,
    /// Initiator names let in (empty: any).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Serve a throwaway copy-on-write overlay.
    #[serde(default)]
    pub writable: bool,
    /// CHAP: the initiator's user name ...
    #[serde(default)]
    pub chap_user: Option<String>,
    /// ... and the file holding its secret.
    #[serde(default)]
    pub chap_secret_file: Option<std::path::PathBuf>,
    /// Mutual CHAP: the target's name ...
    #[serde(default)]
    pub mutual_user: Option<String>,
    /// ... and the file holding its secret.
    #[serde(default)]
    pub mutual_secret_file: Option<std::path::PathBuf>,
}

fn default_export_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::iscsi::DEFAULT_PORT))
}

impl ExportConfig {
    /// The export to start, its secrets read from their files.
    pub fn spec(&self) -> Result<ExportSpec> {
        let (volume, at) = crate::exports::split_target(&self.target);
        let at = at.map(|a| fixed_version(&a)).transpose()?;
        if let Some(name) = &self.name {
            crate::exports::check_iqn(name)?;
        }
        let chap = crate::exports::ChapSpec::from_files(
            self.chap_user.clone(),
            self.chap_secret_file.as_deref(),
            self.mutual_user.clone(),
            self.mutual_secret_file.as_deref(),
        )?;
        Ok(ExportSpec {
            volume,
            at,
            listen: self.listen,
            name: self.name.clone(),
            allow: self.allow.clone(),
            writable: self.writable,
            chap,
        })
    }
}

/// The version a configured export's `@…` names, as the server asks its
/// store for it: a snapshot's name as it is, a date or time in this
/// machine's zone (as `export` reads it) as an instant. A relative time
/// (`yesterday 18:00`, `2h ago`, `now`) is refused: it would name another
/// version at each start.
fn fixed_version(at: &str) -> Result<String> {
    let now = jiff::Zoned::now();
    match ublk_mirror_common::when::parse_at(at, &now) {
        Ok(None) => Ok(at.to_string()),
        Ok(Some(ts)) => {
            if ublk_mirror_common::when::is_relative(at) {
                return Err(Error::Invalid(format!(
                    "export target @{at}: a relative time would name another version at each start; give a snapshot's name or a date and time (2026-11-20 18:00)"
                )));
            }
            Ok(ublk_mirror_common::when::wire(ts))
        }
        Err(e) => Err(Error::Invalid(format!("export target @{at}: {e}"))),
    }
}

/// One volume's `[volumes."CLIENT/VOLUME"]`: the keys of
/// [`SnapshotPolicy`] it changes; those left out are `[snapshots]`'s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverride {
    /// `every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<Span>,
    /// `hourly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly: Option<u32>,
    /// `daily`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    /// `weekly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
}

/// When scheduled snapshots are taken and how long they are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPolicy {
    /// How often a snapshot is taken, when the volume changed since the
    /// last one; 0: never.
    #[serde(default = "default_every")]
    pub every: Span,
    /// How long they are kept.
    #[serde(flatten)]
    pub retention: Retention,
}

fn default_every() -> Span {
    Span(DEFAULT_EVERY)
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy {
            every: default_every(),
            retention: Retention::default(),
        }
    }
}

fn default_max_volumes() -> u32 {
    64
}

fn default_listen() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_PORT))
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            max_volumes_per_client: default_max_volumes(),
            max_bytes_per_client: None,
            snapshots: SnapshotPolicy::default(),
            volumes: BTreeMap::new(),
            exports: Vec::new(),
            store: StoreConfig::local_default(),
            metrics: None,
        }
    }
}

impl ServerConfig {
    /// The per-client limits this file sets.
    pub fn quota(&self) -> Quota {
        Quota {
            max_volumes: self.max_volumes_per_client,
            max_bytes: self.max_bytes_per_client,
        }
    }

    /// Open the chunk store this file names (a directory relative to
    /// `data`, or a bucket): checked, claimed if empty, its index loaded.
    pub fn chunk_store(&self, data: &Path) -> Result<Arc<ChunkStore>> {
        let store = ChunkStore::open(&self.store, data)?;
        tracing::debug!(store = %store.describe(), "chunk store open");
        Ok(Arc::new(store))
    }

    /// The chunk store `[store]` names, opened only to list its versions
    /// ([`ChunkStore::open_for_listing`]).
    pub fn chunk_store_for_listing(&self, data: &Path) -> Result<ChunkStore> {
        ChunkStore::open_for_listing(&self.store, data)
    }

    /// Start the exports this file lists. One that cannot start (a
    /// snapshot gone, a port taken, a secret file missing) is logged as an
    /// error and the rest goes on: replication must not stop for an
    /// export.
    pub async fn start_exports(&self, exports: &Exports, volumes: &Volumes) {
        for (i, e) in self.exports.iter().enumerate() {
            let started = match e.spec() {
                Ok(spec) => exports.start(volumes, spec).await,
                Err(err) => Err(err),
            };
            if let Err(err) = started {
                tracing::error!(
                    target = %e.target,
                    "exports[{i}] in {CONFIG_FILE} did not start: {err}"
                );
            }
        }
    }

    /// Read the config file at `path` (see [`locate`]).
    pub fn load(path: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Invalid(format!(
                    "{} does not exist: run `mirror-server init` (with the same --data) first, or give --config",
                    path.display()
                ))
            } else {
                Error::io(format!("reading {}", path.display()), e)
            }
        })?;
        let config: ServerConfig = toml::from_str(&text).map_err(|e| {
            // "TOML parse error at line L, column C": where, then what.
            let first = e.to_string();
            let at = first
                .lines()
                .next()
                .and_then(|l| l.split(" at ").nth(1))
                .map(|a| format!("{a}: "))
                .unwrap_or_default();
            Error::Invalid(format!("{}: {at}{}", path.display(), e.message()))
        })?;
        config
            .check()
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// What the file format cannot say: each export on its own address
    /// (each has a listener of its own), its target a volume's name.
    fn check(&self) -> std::result::Result<(), String> {
        for (i, e) in self.exports.iter().enumerate() {
            let (volume, _) = crate::exports::split_target(&e.target);
            if volume.split('/').count() != 2 || volume.split('/').any(str::is_empty) {
                return Err(format!(
                    "exports[{i}]: target {:?} is not CLIENT/VOLUME[@SNAPSHOT|@TIME]",
                    e.target
                ));
            }
            if let Some(j) = self.exports[..i].iter().position(|o| o.listen == e.listen) {
                return Err(format!(
                    "exports[{j}] and exports[{i}] both listen on {} (each export needs its own address or port)",
                    e.listen
                ));
            }
        }
        Ok(())
    }

    /// The snapshot policy of volume `CLIENT/VOLUME`.
    pub fn policy(&self, volume: &str) -> SnapshotPolicy {
        let base = self.snapshots;
        match self.volumes.get(volume) {
            None => base,
            Some(o) => SnapshotPolicy {
                every: o.every.unwrap_or(base.every),
                retention: Retention {
                    hourly: o.hourly.unwrap_or(base.retention.hourly),
                    daily: o.daily.unwrap_or(base.retention.daily),
                    weekly: o.weekly.unwrap_or(base.retention.weekly),
                },
            },
        }
    }

    /// Every schedule in use: `[snapshots]`'s and each volume's.
    pub fn policies(&self) -> impl Iterator<Item = SnapshotPolicy> + '_ {
        std::iter::once(self.snapshots).chain(self.volumes.keys().map(|v| self.policy(v)))
    }

    /// Write this config as the file `path`, refusing to replace one.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let limit = match self.max_bytes_per_client {
            Some(max) => format!("max_bytes_per_client = \"{max}\""),
            None => "# max_bytes_per_client = \"4TiB\"".to_string(),
        };
        let text = format!(
            "# mirror-server settings (see `mirror-server --help`)\n\
             # UDP address QUIC listens on; 4747 is ublk-mirror's default port\n\
             listen = \"{listen}\"\n\
             # volumes one client may create\n\
             max_volumes_per_client = {volumes}\n\
             # sum of one client's volume sizes; no limit unless set\n\
             {limit}\n\
             \n\
             # Scheduled snapshots of every volume (Time Machine's rules): one\n\
             # `every` while the volume changes (\"0s\": none), kept one an hour for\n\
             # `hourly` hours, one a day for `daily` days, then one a week for\n\
             # `weekly` weeks (0: forever). Manual snapshots stay until deleted.\n\
             [snapshots]\n\
             every = \"{every}\"\n\
             hourly = {hourly}\n\
             daily = {daily}\n\
             weekly = {weekly}\n\
             \n\
             # One volume's own schedule (keys left out take the built-in defaults):\n\
             # [volumes.\"laptop/root\"]\n\
             # every = \"15m\"\n\
             \n\
             # iSCSI exports served while the server runs (as `mirror-server export`\n\
             # takes them; target without @: the volume as it is at start):\n\
             # [[exports]]\n\
             # target = \"laptop/root@2026-11-20\"\n\
             # listen = \"127.0.0.1:3260\"\n\
             # allow = [\"iqn.1993-08.org.debian:01:restore-box\"]\n\
             # writable = false\n\
             # chap_user = \"restore\"\n\
             # chap_secret_file = \"/etc/mirror-server/chap.secret\"\n\
             \n\
             # Prometheus metrics on GET /metrics, over TCP (off unless set; keep it\n\
             # on localhost or a management network: it names clients and volumes):\n\
             {metrics}\n\
             \n\
             # Where every version of every volume is kept, deduplicated: a directory\n\
             # (relative: in this data directory), file:///PATH, or s3://BUCKET/PREFIX\n\
             # on any S3-compatible store with conditional writes. The images under\n\
             # volumes/ are a cache of it, rebuilt from it when missing.\n\
             [store]\n\
             url = \"{store_url}\"\n\
             # endpoint = \"https://s3.example.net\"    # else AWS, or $AWS_ENDPOINT\n\
             # region = \"us-east-1\"                   # else $AWS_REGION\n\
             # path_style = true                        # bucket in the path, not the host\n\
             # credentials_file = \"/etc/mirror-server/s3.credentials\"  # else $AWS_ACCESS_KEY_ID...\n\
             pack_size = \"{pack}\"\n\
             # Garbage collection while serving: how often, and how long a dead object\n\
             # waits before it goes (longer than any publication; 1445m = 24h5m).\n\
             gc_every = \"{gc_every}\"\n\
             gc_window = \"{gc_window}\"\n\
             # Re-read and re-hash every stored chunk this often (repairs from the images\n\
             # here what they still hold; `mirror-server verify` does it now).\n\
             verify_every = \"{verify_every}\"\n",
            listen = self.listen,
            metrics = match &self.metrics {
                Some(m) => format!("[metrics]\nlisten = \"{}\"", m.listen),
                None => "# [metrics]\n# listen = \"127.0.0.1:9464\"".to_string(),
            },
            volumes = self.max_volumes_per_client,
            every = self.snapshots.every,
            hourly = self.snapshots.retention.hourly,
            daily = self.snapshots.retention.daily,
            weekly = self.snapshots.retention.weekly,
            store_url = self.store.url,
            pack = self.store.pack_size,
            gc_every = self.store.gc_every,
            gc_window = self.store.gc_window,
            verify_every = self.store.verify_every,
        );
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Debian package's /etc/mirror-server/server.toml is what `init`
    /// writes: the same defaults, the same comments.
    #[test]
    fn the_packaged_config_is_the_one_init_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        ServerConfig::default().write_new(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            include_str!("../debian/server.toml"),
            "mirror-server/debian/server.toml is stale: make it again with \
             `mirror-server --data $(mktemp -d) --config mirror-server/debian/server.toml init` \
             (remove it first)"
        );
        assert_eq!(locate(dir.path(), None), path);
        assert_eq!(
            locate(dir.path(), Some(Path::new("/x.toml"))),
            Path::new("/x.toml")
        );
    }

    #[test]
    fn a_volume_s_own_schedule_changes_only_the_keys_it_gives() {
        let c: ServerConfig = toml::from_str(
            "[snapshots]\nevery = \"2h\"\ndaily = 90\nweekly = 52\n\n[volumes.\"laptop/root\"]\nevery = \"15m\"\n",
        )
        .unwrap();
        let p = c.policy("laptop/root");
        assert_eq!(p.every.0, std::time::Duration::from_secs(15 * 60));
        assert_eq!(
            (p.retention.hourly, p.retention.daily, p.retention.weekly),
            (24, 90, 52),
            "[snapshots]' keys, not the built-in ones"
        );
        assert_eq!(
            c.policy("laptop/home").every.0,
            std::time::Duration::from_secs(7200)
        );
        assert!(toml::from_str::<ServerConfig>("[volumes.\"a/b\"]\neverry = \"1h\"\n").is_err());
    }

    #[test]
    fn written_configs_read_back_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = ServerConfig {
            listen: "127.0.0.1:9000".parse().unwrap(),
            ..ServerConfig::default()
        };
        c.write_new(&dir.path().join(CONFIG_FILE)).unwrap();
        assert_eq!(
            ServerConfig::load(&dir.path().join(CONFIG_FILE)).unwrap(),
            c
        );
        let limited = tempfile::tempdir().unwrap();
        let l = ServerConfig {
            max_volumes_per_client: 3,
            max_bytes_per_client: Some(ByteSize(1 << 30)),
            ..c.clone()
        };
        l.write_new(&limited.path().join(CONFIG_FILE)).unwrap();
        assert_eq!(
            ServerConfig::load(&limited.path().join(CONFIG_FILE)).unwrap(),
            l
        );
        std::fs::write(
            limited.path().join(CONFIG_FILE),
            "max_bytes_per_client = \"2G\"\n",
        )
        .unwrap();
        assert_eq!(
            ServerConfig::load(&limited.path().join(CONFIG_FILE))
                .unwrap()
                .max_bytes_per_client,
            Some(ByteSize(2 << 30))
        );
        assert!(
            c.write_new(&dir.path().join(CONFIG_FILE)).is_err(),
            "replaced a config"
        );
        std::fs::write(dir.path().join(CONFIG_FILE), "lisen = \"[::]:1\"\n").unwrap();
        let err = ServerConfig::load(&dir.path().join(CONFIG_FILE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
        assert_eq!(ServerConfig::default().listen.port(), DEFAULT_PORT);
    }

    #[test]
    fn the_written_export_example_works_once_uncommented() {
        let dir = tempfile::tempdir().unwrap();
        ServerConfig::default()
            .write_new(&dir.path().join(CONFIG_FILE))
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
        let secret = dir.path().join("chap.secret");
        std::fs::write(&secret, "twelve-chars-ok\n").unwrap();
        let mut on = false;
        let uncommented: String = text
            .lines()
            .map(|l| {
                on |= l == "# [[exports]]";
                on &= !l.is_empty();
                let l = if on { l.trim_start_matches("# ") } else { l };
                l.replace("/etc/mirror-server/chap.secret", secret.to_str().unwrap()) + "\n"
            })
            .collect();
        std::fs::write(dir.path().join(CONFIG_FILE), uncommented).unwrap();
        let c = ServerConfig::load(&dir.path().join(CONFIG_FILE)).unwrap();
        assert_eq!(c.exports.len(), 1);
        let e = &c.exports[0];
        assert_eq!(e.listen, "127.0.0.1:3260".parse().unwrap());
        let spec = e.spec().unwrap();
        assert_eq!(spec.volume, "laptop/root");
        // A date is local midnight here, as `export` reads it.
        assert_eq!(
            spec.at,
            Some(ublk_mirror_common::when::resolve_at("2026-11-20").unwrap())
        );
        assert!(spec.at.unwrap().ends_with('Z'));
        // A snapshot's name stays a name; a relative time is refused.
        let named = ExportConfig {
            target: "laptop/root@before-upgrade".into(),
            ..e.clone()
        };
        assert_eq!(named.spec().unwrap().at.as_deref(), Some("before-upgrade"));
        for relative in ["yesterday 18:00", "2h ago", "now"] {
            let r = ExportConfig {
                target: format!("laptop/root@{relative}"),
                ..e.clone()
            };
            let err = r.spec().unwrap_err().to_string();
            assert!(err.contains("relative time"), "{relative}: {err}");
        }
        assert_eq!(spec.chap.unwrap().secret, "twelve-chars-ok");
        // A secret file that is not there, or half a CHAP setting: told.
        let missing = ExportConfig {
            chap_secret_file: Some(dir.path().join("nope")),
            ..e.clone()
        };
        assert!(missing.spec().unwrap_err().to_string().contains("nope"));
        let half = ExportConfig {
            chap_secret_file: None,
            ..e.clone()
        };
        assert!(half.spec().is_err());
        let bad_name = ExportConfig {
            name: Some("not an iqn".into()),
            ..e.clone()
        };
        assert!(bad_name.spec().is_err());
        // Two exports on one address, or a target that is no volume: the
        // file is refused as a whole.
        let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
        let twice = text.clone() + "\n[[exports]]\ntarget = \"laptop/home\"\n";
        std::fs::write(dir.path().join(CONFIG_FILE), twice).unwrap();
        let err = ServerConfig::load(&dir.path().join(CONFIG_FILE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both listen on 127.0.0.1:3260"), "{err}");
        let odd = text + "\n[[exports]]\ntarget = \"laptop\"\nlisten = \"127.0.0.1:3261\"\n";
        std::fs::write(dir.path().join(CONFIG_FILE), odd).unwrap();
        let err = ServerConfig::load(&dir.path().join(CONFIG_FILE))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not CLIENT/VOLUME"), "{err}");
    }
}
