//! The server config file, `DATA/server.toml`, written by `mirror-server
//! init` with every default spelled out:
//!
//! ```toml
//! listen = "[::]:4747"            # UDP address QUIC listens on
//! max_volumes_per_client = 64     # volumes one client may create
//! # max_bytes_per_client = "4TiB" # sum of one client's volume sizes (no limit unless set)
//! ```
//!
//! Port 4747/udp is ublk-mirror's default (unassigned by IANA).

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use ublk_mirror_common::size::ByteSize;

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

    /// Write this config as `DATA/server.toml`, refusing to replace one.
    pub fn write_new(&self, data: &Path) -> Result<()> {
        let path = data.join(CONFIG_FILE);
        let text = format!(
            "# mirror-server settings (see `mirror-server --help`)\n\
             # UDP address QUIC listens on; 4747 is ublk-mirror's default port\n\
             listen = \"{}\"\n\
             # volumes one client may create\n\
             max_volumes_per_client = {}\n\
             # sum of one client's volume sizes; no limit unless set\n\
             {}max_bytes_per_client = \"{}\"\n",
            self.listen,
            self.max_volumes_per_client,
            if self.max_bytes_per_client.is_some() {
                ""
            } else {
                "# "
            },
            self.max_bytes_per_client.unwrap_or(ByteSize(4 << 40)),
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
