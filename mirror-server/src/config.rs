//! The server config file, `DATA/server.toml`, written by `mirror-server
//! init` with every default spelled out:
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
//! every = "15m"                   # out take the defaults above)
//! ```
//!
//! Port 4747/udp is ublk-mirror's default (unassigned by IANA).

use std::net::SocketAddr;
use std::path::Path;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use ublk_mirror_common::size::ByteSize;
use ublk_mirror_common::Span;

use crate::snapshots::{Retention, DEFAULT_EVERY};

use crate::error::{Error, Result};

/// The default QUIC port.
pub const DEFAULT_PORT: u16 = 4747;

/// File name of the config inside the data directory.
pub const CONFIG_FILE: &str = "server.toml";

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
    /// Volumes (`CLIENT/VOLUME`) with a schedule of their own.
    #[serde(default)]
    pub volumes: BTreeMap<String, SnapshotPolicy>,
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
        }
    }
}

impl ServerConfig {
    /// Read `DATA/server.toml`.
    pub fn load(data: &Path) -> Result<ServerConfig> {
        let path = data.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        toml::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {}", path.display(), e.message())))
    }

    /// The snapshot policy of volume `CLIENT/VOLUME`.
    pub fn policy(&self, volume: &str) -> SnapshotPolicy {
        self.volumes.get(volume).copied().unwrap_or(self.snapshots)
    }

    /// Write this config as `DATA/server.toml`, refusing to replace one.
    pub fn write_new(&self, data: &Path) -> Result<()> {
        let path = data.join(CONFIG_FILE);
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
             # every = \"15m\"\n",
            listen = self.listen,
            volumes = self.max_volumes_per_client,
            every = self.snapshots.every,
            hourly = self.snapshots.retention.hourly,
            daily = self.snapshots.retention.daily,
            weekly = self.snapshots.retention.weekly,
        );
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_configs_read_back_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = ServerConfig {
            listen: "127.0.0.1:9000".parse().unwrap(),
            ..ServerConfig::default()
        };
        c.write_new(dir.path()).unwrap();
        assert_eq!(ServerConfig::load(dir.path()).unwrap(), c);
        let limited = tempfile::tempdir().unwrap();
        let l = ServerConfig {
            max_volumes_per_client: 3,
            max_bytes_per_client: Some(ByteSize(1 << 30)),
            ..c.clone()
        };
        l.write_new(limited.path()).unwrap();
        assert_eq!(ServerConfig::load(limited.path()).unwrap(), l);
        std::fs::write(
            limited.path().join(CONFIG_FILE),
            "max_bytes_per_client = \"2G\"\n",
        )
        .unwrap();
        assert_eq!(
            ServerConfig::load(limited.path())
                .unwrap()
                .max_bytes_per_client,
            Some(ByteSize(2 << 30))
        );
        assert!(c.write_new(dir.path()).is_err(), "replaced a config");
        std::fs::write(dir.path().join(CONFIG_FILE), "lisen = \"[::]:1\"\n").unwrap();
        let err = ServerConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        assert_eq!(ServerConfig::default().listen.port(), DEFAULT_PORT);
    }
}
