//! `mirror-server`: the admin command line of the mirror server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mirror_server::config::ServerConfig;
use mirror_server::store;
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::ByteSize;

/// The mirror server of ublk-mirror: keeps every enrolled device's volumes
/// as sparse images, each always one whole published epoch.
///
/// Start with `mirror-server init` on the machine with the big disks.
#[derive(Debug, Parser)]
#[command(name = "mirror-server", version, propagate_version = true)]
struct Cli {
    /// Data directory: identity, config, volumes.
    #[arg(
        long,
        global = true,
        env = "MIRROR_SERVER_DATA",
        default_value = "/var/lib/mirror-server",
        value_name = "DIR"
    )]
    data: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the data directory: the server identity (a key and a
    /// self-signed certificate, which clients pin by fingerprint) and
    /// server.toml with the defaults.
    ///
    /// Prints the certificate's fingerprint. The identity is never
    /// replaced: enrolled clients trust exactly it.
    Init {
        /// UDP address for QUIC to listen on [default: [::]:4747].
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// List the volumes: size, published epoch and when.
    Volumes {
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Init { listen } => init(&cli.data, listen),
        Command::Volumes { json } => volumes(&cli.data, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirror-server: error: {e}");
            ExitCode::from(match e {
                mirror_server::Error::Invalid(_) => 2,
                _ => 1,
            })
        }
    }
}

fn init(data: &Path, listen: Option<std::net::SocketAddr>) -> mirror_server::Result<()> {
    let identity = Identity::create(&data.join("identity"))
        .map_err(|e| mirror_server::Error::Invalid(e.to_string()))?;
    let config = ServerConfig {
        listen: listen.unwrap_or(ServerConfig::default().listen),
    };
    config.write_new(data)?;
    std::fs::create_dir_all(data.join(store::VOLUMES_DIR))
        .map_err(|e| mirror_server::Error::io("creating the volumes directory", e))?;
    println!("initialised {}", data.display());
    println!("  certificate fingerprint: {}", identity.fingerprint());
    println!("  listen: {} (udp)", config.listen);
    Ok(())
}

fn volumes(data: &Path, json: bool) -> mirror_server::Result<()> {
    let list = store::list(data)?;
    let mut out = std::io::stdout().lock();
    let io = |e| mirror_server::Error::io("writing to stdout", e);
    if json {
        let rows: Vec<_> = list
            .iter()
            .map(|(name, s)| {
                serde_json::json!({
                    "volume": name,
                    "size": s.size,
                    "published_epoch": s.published_epoch,
                    "published_ms": s.published_ms,
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &rows)
            .map_err(|e| mirror_server::Error::io("writing JSON", e.into()))?;
        return writeln!(out).map_err(io);
    }
    writeln!(
        out,
        "{:<32} {:>9} {:>7} PUBLISHED",
        "VOLUME", "SIZE", "EPOCH"
    )
    .map_err(io)?;
    for (name, s) in &list {
        let when = if s.published_ms == 0 {
            "never".to_string()
        } else {
            format!("{}s ago", age_seconds(s.published_ms))
        };
        writeln!(
            out,
            "{:<32} {:>9} {:>7} {}",
            name,
            ByteSize(s.size).to_string(),
            s.published_epoch,
            when
        )
        .map_err(io)?;
    }
    Ok(())
}

fn age_seconds(ms: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_sub(ms) / 1000
}
