//! The server config file, `DATA/server.toml`, written by `mirror-server
//! init` with every default spelled out:
//!
//! ```toml
//! listen = "[::]:4747"     # UDP address QUIC listens on
//! ```
//!
//! Port 4747/udp is ublk-mirror's default (unassigned by IANA).

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

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
}

fn default_listen() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_PORT))
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
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
             listen = \"{}\"\n",
            self.listen
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
        };
        c.write_new(dir.path()).unwrap();
        assert_eq!(ServerConfig::load(dir.path()).unwrap(), c);
        assert!(c.write_new(dir.path()).is_err(), "replaced a config");
        std::fs::write(dir.path().join(CONFIG_FILE), "lisen = \"[::]:1\"\n").unwrap();
        let err = ServerConfig::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        assert_eq!(ServerConfig::default().listen.port(), DEFAULT_PORT);
    }
}
