//! `mirror-server`: the admin command line of the mirror server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mirror_server::clients::Registry;
use mirror_server::config::{self, ServerConfig};
use mirror_server::exports::{self, Exports};
use mirror_server::store::ImageCheck;
use mirror_server::volumes::{Quota, Volumes};
use mirror_server::{admin, snapshots, store};
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::token::Token;
use ublk_mirror_common::{ByteSize, Span};

/// The mirror server of ublk-mirror: keeps every enrolled device's volumes,
/// each always one whole published epoch, and every epoch as a version in
/// a deduplicated chunk store (a directory, or an S3-compatible bucket
/// that several servers can share); the images in the data directory are
/// its cache.
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
        default_value = config::DEFAULT_DATA,
        value_name = "DIR"
    )]
    data: PathBuf,

    /// Config file [default: DATA/server.toml; with the default data
    /// directory and no DATA/server.toml, /etc/mirror-server/server.toml
    /// when it exists, as the Debian package installs it].
    #[arg(long, global = true, env = "MIRROR_SERVER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the data directory: the server identity (a key and a
    /// self-signed certificate, which clients pin by fingerprint) and
    /// server.toml with the defaults (a config that exists already, such
    /// as the Debian package's /etc/mirror-server/server.toml, is kept).
    ///
    /// Prints the certificate's fingerprint. The identity is never
    /// replaced: enrolled clients trust exactly it.
    Init {
        /// UDP address for QUIC to listen on [default: [::]:4747].
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Serve: listen on QUIC (server.toml's `listen`) and take the
    /// enrolled clients' epochs into their volumes, until SIGTERM/SIGINT.
    /// Takes scheduled snapshots and prunes them, and serves the iSCSI
    /// exports server.toml lists (`[[exports]]`).
    ///
    /// Prints "listening on ADDR" on stdout once it listens.
    Serve {
        /// Listen here instead of server.toml's address.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Enroll, list and revoke clients.
    #[command(subcommand)]
    Client(ClientCommand),
    /// List the volumes: size, published epoch and how long ago.
    ///
    /// For cron and monitoring: `--stale 24h` flags every volume whose
    /// newest publication is older than that (or that never published)
    /// and exits with status 1 when any is.
    Volumes {
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
        /// Flag volumes not published for this long (`36h`, `2d`); exit
        /// status 1 when any is.
        #[arg(long, value_name = "DURATION")]
        stale: Option<Span>,
        /// Also read the chunk store's version records: volumes that other
        /// servers on the same store serve, and publications they made
        /// (what a fleet with interchangeable servers should watch).
        #[arg(long)]
        store: bool,
    },
    /// Take a snapshot of a volume now: its published epoch, kept until
    /// deleted (scheduled ones follow server.toml's [snapshots]).
    ///
    /// A snapshot costs no space when taken; afterwards, what publishing
    /// overwrites is kept for it (in 4 KiB units). Works with the server
    /// running (it asks it) or not.
    Snapshot {
        /// The volume, as CLIENT/VOLUME (see `mirror-server volumes`).
        volume: String,
        /// Its name [default: the time, e.g. 2026-11-22T16.30.05Z].
        name: Option<String>,
    },
    /// List a volume's snapshots, oldest first: the epoch and time each
    /// shows, and the space it keeps.
    Snapshots {
        /// The volume, as CLIENT/VOLUME.
        volume: String,
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
        /// Show times in UTC [default: this machine's time zone].
        #[arg(long)]
        utc: bool,
    },
    /// Serve a version of a volume as an iSCSI disk, read-only: any
    /// initiator can attach it (Linux open-iscsi, qemu, Windows, macOS)
    /// and nothing it does can change the backup.
    ///
    /// With the server running, the server serves it until `mirror-server
    /// unexport NAME` (or it stops); otherwise this command serves it in
    /// the foreground until Ctrl-C. The version is kept (never pruned)
    /// while exported. Attach it with, for example:
    ///   iscsiadm -m discovery -t st -p 127.0.0.1:3260 && iscsiadm -m node --login
    ///   qemu-img convert -p -O raw iscsi://127.0.0.1:3260/IQN/0 disk.img
    /// Exports the server should always serve go in server.toml instead:
    ///   [[exports]]
    ///   target = "laptop/root@before-upgrade"   # and listen, allow, chap_user, ...
    #[command(verbatim_doc_comment)]
    Export {
        /// CLIENT/VOLUME, CLIENT/VOLUME@SNAPSHOT, or CLIENT/VOLUME@TIME
        /// (the newest snapshot at or before it; local time: `@yesterday
        /// 18:00`, `@2h ago`, `@2026-12-02 18:00`, or an instant with Z or
        /// an offset); without @: the volume as it is now.
        #[arg(value_name = "VOLUME[@SNAPSHOT|@TIME]")]
        target: String,
        /// TCP address the target listens on (0.0.0.0:3260 for the network).
        #[arg(long, default_value = "127.0.0.1:3260", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// Its target name [default: iqn.2026-11.org.ublk-mirror:CLIENT.VOLUME.SNAPSHOT].
        #[arg(long, value_name = "IQN")]
        name: Option<String>,
        /// Let in only this initiator name (repeat for several) [default: any].
        #[arg(long = "allow", value_name = "INITIATOR")]
        allow: Vec<String>,
        /// Serve a throwaway copy-on-write overlay: the initiator may
        /// write (to boot or fsck a restored system); the writes are gone
        /// when the export ends, and the snapshot is never touched. The
        /// overlay lives in the volume's directory, and its writes are
        /// refused (DATA PROTECT, space allocation failed) before they
        /// leave less than 5% (at most 1 GiB) of that file system free.
        #[arg(long)]
        writable: bool,
        /// Require CHAP: the initiator logs in as USER ...
        #[arg(long, value_name = "USER", requires = "chap_secret_file")]
        chap_user: Option<String>,
        /// ... with the secret in this file (12 to 16 characters for
        /// open-iscsi; one line).
        #[arg(long, value_name = "FILE", requires = "chap_user")]
        chap_secret_file: Option<PathBuf>,
        /// Mutual CHAP: the target proves itself as NAME ...
        #[arg(long, value_name = "NAME", requires_all = ["mutual_secret_file", "chap_user"])]
        mutual_user: Option<String>,
        /// ... with the secret in this file.
        #[arg(long, value_name = "FILE", requires = "mutual_user")]
        mutual_secret_file: Option<PathBuf>,
    },
    /// Make a volume from an image file: to seed a mirror with a copy
    /// brought by other means (a disk shipped, an old backup), or to serve
    /// an image over iSCSI.
    ///
    /// The volume holds the image as its first epoch. A device that then
    /// mirrors to it compares by hash and sends only the blocks that
    /// differ. Zero blocks stay holes.
    Import {
        /// The new volume, as CLIENT/VOLUME.
        volume: String,
        /// The image file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
    /// Show the chunk store (server.toml's [store]): where it is, what it
    /// holds — distinct chunks, their bytes before and after compression,
    /// packs, objects — and each volume's versions (and damage verify
    /// found).
    ///
    /// Every published epoch of every volume is a version in the store;
    /// a block stored once is never stored again, whichever client sends
    /// it.
    Store {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Collect the chunk store's garbage now: delete the versions no
    /// snapshot pins (a volume keeps its newest two), then the packs and
    /// map segments no kept version needs and that a run at least the
    /// window ago condemned already. The
    /// running server does it every `gc_every` (server.toml's [store]).
    Gc {
        /// How long a dead object stays condemned before it goes
        /// [default: server.toml's gc_window, 1445m]. Shorter is only safe
        /// when no server publishes meanwhile.
        #[arg(long, value_name = "DURATION")]
        window: Option<Span>,
    },
    /// Verify the chunk store and this server's images: re-read every
    /// chunk and map segment that a volume's versions need and check each
    /// against its sha256; then check each image here against the version
    /// it holds.
    ///
    /// A damaged chunk that this server's image of the volume still holds
    /// is stored again (repaired). Any other is reported with the versions
    /// that need it, recorded in the store, never served and never
    /// deduplicated against: the next time a device sends that content it
    /// is stored again. A block of an image that differs from its version
    /// (this disk's damage) is made the version's again from the store
    /// (restores and exports do not serve it meanwhile: they check each
    /// block they read from the image while the store can be read). Exit
    /// status 1 when damage is left.
    /// The running server does it every `verify_every` (server.toml's
    /// [store]); run while it serves, the images are checked through it.
    Verify {
        /// Only this volume (CLIENT/VOLUME) [default: all].
        volume: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store every volume of a data directory written before the chunk
    /// store as the volume's first version, and catch images up with the
    /// store. The server does the same for each volume when it is first
    /// opened; this does them all now, volume by volume, and says what it
    /// did. Refused while the server runs.
    Upgrade {
        /// Keep every volume in the chunk store server.toml names from
        /// now on, though it was kept in another (a store moved, or
        /// lost): each image is stored there as its volume's first
        /// version. A volume this store has other versions of is refused
        /// (not moved). Without it, a volume kept in another store is
        /// refused (a mistyped [store] would otherwise fill a new store
        /// unnoticed).
        #[arg(long)]
        move_to_this_store: bool,
    },
    /// List the exports the running server serves: each one's volume,
    /// the version it shows, where it listens, whether writes go to a
    /// throwaway overlay, the initiators connected now, and its target
    /// name (what `unexport` takes).
    ///
    /// With no server running, nothing is exported (said on stderr; the
    /// list is empty, status 0).
    Exports {
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
        /// Show times in UTC instead of the local time zone.
        #[arg(long)]
        utc: bool,
    },
    /// Stop an export the running server serves.
    Unexport {
        /// Its target name (as `export` printed it).
        #[arg(value_name = "IQN")]
        name: String,
    },
    /// Delete a snapshot. Refused while it is exported or restored from.
    ///
    /// Its space is freed, except the chunks an older snapshot needs,
    /// which move to that one.
    Delete {
        /// CLIENT/VOLUME@SNAPSHOT.
        #[arg(value_name = "VOLUME@SNAPSHOT")]
        target: String,
    },
    #[command(flatten)]
    Docs(ublk_mirror_common::docs::DocsCommand),
}

#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Make an enrollment token for a new client and print it (one line).
    ///
    /// On the client: `ublk-mirror enroll TOKEN`. The token is good once,
    /// until it expires; it carries the server's address and certificate
    /// fingerprint, and a secret the server keeps only a hash of.
    Add {
        /// The client's name (1-64 of A-Z a-z 0-9 . _ -).
        name: String,
        /// Address clients reach this server at [default: this host's
        /// name and the listen port]. Servers that share one chunk store
        /// (and this server's identity and clients) are interchangeable:
        /// list them all, comma-separated, and the client tries them in
        /// order (a name that resolves to several addresses works too).
        #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
        address: Option<String>,
        /// How long the token is good for.
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        ttl: Span,
        /// A new machine for a client that exists (its laptop lost or
        /// stolen): the token enrolls the new machine as NAME, with NAME's
        /// volumes; the certificate NAME has now is cut off at once.
        #[arg(long)]
        replace: bool,
    },
    /// List clients: pending, enrolled or revoked.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cut a client off for good: its connections are closed within a
    /// second and it cannot connect again. Its volumes stay.
    Revoke {
        /// The client's name.
        name: String,
    },
}

fn main() -> ExitCode {
    ublk_mirror_common::docs::quiet_broken_pipe();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours on a terminal only (not in journald or a log file).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    // What the command names outside the data directory (an image or a
    // disk to import, CHAP secret files) is opened as whoever runs it,
    // before it acts as the data's owner: a disk (root:disk) or a file
    // only root reads still opens.
    let mut import_source = match &cli.command {
        Command::Import { from, .. } => Some(
            std::fs::File::open(from)
                .map_err(|e| mirror_server::Error::io(format!("opening {}", from.display()), e)),
        ),
        _ => None,
    };
    let mut chap = match &cli.command {
        Command::Export {
            chap_user,
            chap_secret_file,
            mutual_user,
            mutual_secret_file,
            ..
        } => Some(exports::ChapSpec::from_files(
            chap_user.clone(),
            chap_secret_file.as_deref(),
            mutual_user.clone(),
            mutual_secret_file.as_deref(),
        )),
        _ => None,
    };
    if !matches!(cli.command, Command::Docs(_)) {
        if let Err(e) = act_as_data_owner(&cli.data) {
            eprintln!("mirror-server: error: {e}");
            return ExitCode::from(exit_code(&e));
        }
    }
    let cfg = config::locate(&cli.data, cli.config.as_deref());
    let cfg = cfg.as_path();
    let result = match cli.command {
        Command::Docs(d) => d
            .run(<Cli as clap::CommandFactory>::command())
            .map_err(|e| mirror_server::Error::io("writing the documentation", e)),
        Command::Init { listen } => init(&cli.data, cfg, listen),
        Command::Volumes { json, stale, store } => {
            match volumes(&cli.data, cfg, json, stale, store) {
                // Stale volumes are an answer, not an error: status 1.
                Ok(n) if n > 0 => {
                    eprintln!(
                        "mirror-server: {n} volumes have published nothing for {} or more",
                        stale.unwrap_or_default()
                    );
                    return ExitCode::from(1);
                }
                other => other.map(drop),
            }
        }
        Command::Serve { listen } => serve(&cli.data, cfg, listen),
        Command::Client(c) => client(&cli.data, cfg, c),
        Command::Snapshot { volume, name } => {
            admin::request(&cli.data, cfg, admin::Op::Snapshot { volume: volume.clone(), name })
                .and_then(snapshot_info)
                .map(|info| {
                    println!(
                        "{volume}@{}: epoch {}, published {}",
                        info.name,
                        info.epoch,
                        snapshots::time_name(info.epoch_ms)
                    )
                })
        }
        Command::Export {
            target,
            listen,
            name,
            allow,
            writable,
            ..
        } => chap
            .take()
            .expect("read before")
            .and_then(|chap| export(&cli.data, cfg, &target, listen, name, allow, writable, chap)),
        Command::Import { volume, from } => import_source
            .take()
            .expect("opened before")
            .and_then(|source| import(&cli.data, cfg, &volume, source, &from)),
        Command::Store { json } => store_info(&cli.data, cfg, json),
        Command::Upgrade { move_to_this_store } => upgrade(&cli.data, cfg, move_to_this_store),
        Command::Gc { window } => gc(&cli.data, cfg, window),
        Command::Verify { volume, json } => verify(&cli.data, cfg, volume.as_deref(), json),
        Command::Exports { json, utc } => list_exports(&cli.data, cfg, json, utc),
        Command::Unexport { name } => admin::request(&cli.data, cfg, admin::Op::Unexport { name: name.clone() })
            .map(|_| println!("stopped exporting {name}")),
        Command::Snapshots { volume, json, utc } => {
            list_snapshots(&cli.data, cfg, &volume, json, utc)
        }
        Command::Delete { target } => match target.split_once('@') {
            Some((volume, snapshot)) => admin::request(
                &cli.data,
                cfg,
                admin::Op::Delete {
                    volume: volume.to_string(),
                    snapshot: snapshot.to_string(),
                },
            )
            .and_then(snapshot_info)
            .map(|info| println!("deleted {volume}@{}", info.name)),
            None => Err(mirror_server::Error::Invalid(format!(
                "{target:?}: name the snapshot as CLIENT/VOLUME@SNAPSHOT (see `mirror-server snapshots VOLUME`)"
            ))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(mirror_server::Error::Io {
            ref context,
            ref source,
        }) if context.contains("stdout") && source.kind() == std::io::ErrorKind::BrokenPipe => {
            // Its reader went away (`| head`): nothing to say.
            ExitCode::from(ublk_mirror_common::docs::BROKEN_PIPE_EXIT)
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "mirror-server: error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit status of a command that failed with `e`: 2 for a request
/// that cannot be met as asked (usage, names, refusals), 1 for the rest (a
/// lost link, a system call, damaged data).
/// Run as root on a data directory that belongs to another user (the
/// package's `mirror-server` system user), become that user first, so that
/// what an admin's command writes (clients, snapshots, the store) stays
/// readable and writable by the server.
fn act_as_data_owner(data: &Path) -> mirror_server::Result<()> {
    use nix::unistd::{Gid, Uid};
    use std::os::unix::fs::MetadataExt;
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(data) else {
        return Ok(()); // not made yet: `init` makes it as the caller
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let (uid, gid) = (Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()));
    let drop = || -> nix::Result<()> {
        nix::unistd::setgroups(&[gid])?;
        nix::unistd::setgid(gid)?;
        nix::unistd::setuid(uid)
    };
    drop().map_err(|e| {
        mirror_server::Error::io(
            format!("becoming {}'s owner (uid {uid})", data.display()),
            e.into(),
        )
    })?;
    tracing::debug!("acting as uid {uid}, the owner of {}", data.display());
    Ok(())
}

fn exit_code(e: &mirror_server::Error) -> u8 {
    use mirror_server::Error;
    match e {
        Error::Invalid(_) => 2,
        Error::Link(_)
        | Error::Store(_)
        | Error::BadBlock(_)
        | Error::Corrupt(_)
        | Error::Io { .. } => 1,
    }
}

fn init(
    data: &Path,
    cfg: &Path,
    listen: Option<std::net::SocketAddr>,
) -> mirror_server::Result<()> {
    // A config already there (the package's, under /etc) is used as it
    // is; otherwise one is written with the defaults.
    let existing = cfg.exists();
    let config = if existing {
        ServerConfig::load(cfg)?
    } else {
        ServerConfig {
            listen: listen.unwrap_or(ServerConfig::default().listen),
            ..ServerConfig::default()
        }
    };
    if existing && listen.is_some_and(|l| l != config.listen) {
        return Err(mirror_server::Error::Invalid(format!(
            "--listen: {} exists already and says listen = \"{}\"; change it there",
            cfg.display(),
            config.listen
        )));
    }
    let identity = Identity::create(&data.join("identity"))
        .map_err(|e| mirror_server::Error::Invalid(e.to_string()))?;
    if !existing {
        config.write_new(cfg)?;
    }
    std::fs::create_dir_all(data.join(store::VOLUMES_DIR))
        .map_err(|e| mirror_server::Error::io("creating the volumes directory", e))?;
    println!("initialised {}", data.display());
    println!("  certificate fingerprint: {}", identity.fingerprint());
    let how = if existing { "kept" } else { "written" };
    println!("  config: {} ({how})", cfg.display());
    println!("  listen: {} (udp)", config.listen);
    Ok(())
}

/// One row of `mirror-server volumes`.
struct VolumeRow {
    size: u64,
    published_epoch: u64,
    /// Newest publication (ms since the Unix epoch; 0: never).
    published_ms: u64,
    /// Only in the chunk store (another server serves it).
    store_only: bool,
}

fn volumes(
    data: &Path,
    cfg: &Path,
    json: bool,
    stale: Option<Span>,
    with_store: bool,
) -> mirror_server::Result<usize> {
    let mut rows: std::collections::BTreeMap<String, VolumeRow> = store::list(data)?
        .into_iter()
        .map(|(name, s)| {
            let row = VolumeRow {
                size: s.size,
                published_epoch: s.published_epoch,
                published_ms: s.published_ms,
                store_only: false,
            };
            (name, row)
        })
        .collect();
    if with_store {
        let config = ServerConfig::load(cfg)?;
        let chunks = config.chunk_store_for_listing(data)?;
        for name in chunks.volumes()? {
            let Some(head) = chunks.head(&name)? else {
                continue;
            };
            let row = rows.entry(name).or_insert(VolumeRow {
                size: head.size,
                published_epoch: 0,
                published_ms: 0,
                store_only: true,
            });
            if head.created_ms > row.published_ms {
                row.published_ms = head.created_ms;
            }
            row.published_epoch = row.published_epoch.max(head.epoch);
        }
    }
    let limit = stale.map(|s| s.0.as_secs());
    let age = |r: &VolumeRow| (r.published_ms > 0).then(|| age_seconds(r.published_ms));
    let is_stale = |r: &VolumeRow| limit.is_some_and(|l| age(r).is_none_or(|a| a >= l));
    let stale_count = rows.values().filter(|r| is_stale(r)).count();
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|(name, r)| {
                let mut v = serde_json::json!({
                    "volume": name,
                    "size": r.size,
                    "published_epoch": r.published_epoch,
                    "published_ms": r.published_ms,
                    "age_seconds": age(r),
                });
                if r.store_only {
                    v["only_in_store"] = true.into();
                }
                if limit.is_some() {
                    v["stale"] = is_stale(r).into();
                }
                v
            })
            .collect();
        print_json(&out)?;
    } else {
        let mut out = std::io::stdout().lock();
        let io = |e| mirror_server::Error::io("writing to stdout", e);
        writeln!(
            out,
            "{:<32} {:>9} {:>7} PUBLISHED",
            "VOLUME", "SIZE", "EPOCH"
        )
        .map_err(io)?;
        for (name, r) in &rows {
            let mut when = match age(r) {
                None => "never".to_string(),
                Some(a) => format!("{} ago", Span(std::time::Duration::from_secs(a)).approx()),
            };
            if r.store_only {
                when.push_str(" (in the store only)");
            }
            if is_stale(r) {
                when.push_str("  STALE");
            }
            writeln!(
                out,
                "{:<32} {:>9} {:>7} {}",
                name,
                ByteSize(r.size).to_string(),
                r.published_epoch,
                when
            )
            .map_err(io)?;
        }
    }
    Ok(stale_count)
}

fn import(
    data: &Path,
    cfg: &Path,
    volume: &str,
    source: std::fs::File,
    from: &Path,
) -> mirror_server::Result<()> {
    let (client, name) = volume.split_once('/').ok_or_else(|| {
        mirror_server::Error::Invalid(format!("{volume:?}: name the volume as CLIENT/VOLUME"))
    })?;
    for part in [client, name] {
        ublk_mirror_common::proto::check_name(part)
            .map_err(|e| mirror_server::Error::Invalid(e.to_string()))?;
    }
    if !data.join(store::VOLUMES_DIR).is_dir() {
        return Err(mirror_server::Error::Invalid(format!(
            "{} is not a data directory (`mirror-server init` makes one)",
            data.display()
        )));
    }
    let client_file = data
        .join(mirror_server::clients::CLIENTS_DIR)
        .join(format!("{client}.json"));
    if !client_file.exists() {
        // Seeding a volume before its client is added is fine; a typo is
        // worth a word.
        eprintln!(
            "mirror-server: note: there is no client {client} yet (`mirror-server client list`): the volume is theirs once `client add {client}` enrolls"
        );
    }
    // With no server running, the volume is made and stored here under
    // the server's lock; under a running server it is only made (put in
    // place whole), and the server stores it when it first opens it: two
    // processes never store one volume at once.
    let running = admin::server_running(data);
    let _lock = if running {
        None
    } else {
        Some(admin::ServerLock::take(data, &format!("import {volume}"))?)
    };
    // A volume the chunk store has (kept by another server of the fleet,
    // or this one's cache lost) is not new: its versions would replace
    // the import when it is first opened.
    let config = ServerConfig::load(cfg);
    if let Some(Ok(Some(head))) = config.as_ref().ok().map(|c| {
        c.chunk_store_for_listing(data)
            .and_then(|store| store.head(volume))
    }) {
        return Err(mirror_server::Error::Invalid(format!(
            "the chunk store holds volume {volume} already (version {}, epoch {}): import a new name",
            head.seq, head.epoch
        )));
    }
    let dir = data.join(store::VOLUMES_DIR).join(client).join(name);
    // A progress bar on a terminal; nothing otherwise.
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "importing [{bar:30}] {percent:>3}% of {total_bytes}  {binary_bytes_per_sec}  {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let state = store::import(&dir, source, from, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let state = state?;
    println!(
        "imported {} as {volume} ({}), epoch {}",
        from.display(),
        ByteSize(state.size),
        state.published_epoch
    );
    if running {
        println!(
            "  the running server stores it in the chunk store when it first opens it (a client's link, an export, its schedule)"
        );
        return Ok(());
    }
    // Into the chunk store at once (the image here is its cache): what
    // other servers serve, and what survives this machine.
    let stored = config.and_then(|config| {
        runtime()?.block_on(async {
            let volumes = Volumes::new(data, Quota::none()).with_store(config.chunk_store(data)?);
            let v = volumes.open(client, name, None)?;
            let v = v.lock().await;
            Ok(v.stored().map_or(0, |(_, _, seq)| seq))
        })
    });
    match stored {
        Ok(seq) => println!("  stored as version {seq} in the chunk store"),
        Err(e) => eprintln!(
            "mirror-server: warning: {volume} is not in the chunk store yet ({e}); the server stores it when it first opens the volume, or run `mirror-server upgrade`"
        ),
    }
    Ok(())
}

fn snapshot_info(v: serde_json::Value) -> mirror_server::Result<snapshots::SnapshotInfo> {
    serde_json::from_value(v)
        .map_err(|e| mirror_server::Error::Invalid(format!("the server's answer: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn export(
    data: &Path,
    cfg: &Path,
    target: &str,
    listen: std::net::SocketAddr,
    name: Option<String>,
    allow: Vec<String>,
    writable: bool,
    chap: Option<exports::ChapSpec>,
) -> mirror_server::Result<()> {
    let (volume, at) = exports::split_target(target);
    let at = at
        .map(|a| ublk_mirror_common::when::resolve_at(&a))
        .transpose()
        .map_err(|e| mirror_server::Error::Invalid(e.to_string()))?;
    if let Some(iqn) = &name {
        exports::check_iqn(iqn)?;
    }
    for initiator in &allow {
        exports::check_initiator(initiator)?;
    }
    let show = |info: &serde_json::Value| {
        let iqn = info["iqn"].as_str().unwrap_or_default();
        let portal = info["portal"].as_str().unwrap_or_default();
        println!(
            "exported {volume}@{} (epoch {}, published {}) {}",
            info["snapshot"].as_str().unwrap_or_default(),
            info["epoch"],
            snapshots::time_name(info["epoch_ms"].as_u64().unwrap_or(0)),
            if writable {
                "with a throwaway writable overlay"
            } else {
                "read-only"
            }
        );
        println!("  target {iqn}");
        println!("  portal {portal}");
        println!("  iscsi://{portal}/{iqn}/0");
        let _ = std::io::stdout().flush();
    };
    let spec = exports::ExportSpec {
        volume: volume.clone(),
        at,
        listen,
        name,
        allow,
        writable,
        chap,
    };
    if admin::server_running(data) {
        let info = admin::request(data, cfg, admin::Op::Export(spec))?;
        show(&info);
        println!(
            "the server serves it until `mirror-server unexport {}`",
            info["iqn"].as_str().unwrap_or_default()
        );
        return Ok(());
    }
    // No server: serve it here until Ctrl-C, as the server would.
    let _lock = admin::ServerLock::take(
        data,
        &format!("export {volume} (in the foreground, until Ctrl-C)"),
    )?;
    admin::volume_dir(data, &volume)?;
    let chunks = ServerConfig::load(cfg)?.chunk_store(data)?;
    runtime()?.block_on(async {
        let volumes = Volumes::new(data, Quota::none()).with_store(chunks);
        let running = Exports::new();
        let info = running.start(&volumes, spec).await?;
        show(&info);
        println!("serving until Ctrl-C (or SIGTERM)");
        let _ = std::io::stdout().flush();
        stop_asked().await;
        running.stop_all().await;
        Ok(())
    })
}

fn store_info(data: &Path, cfg: &Path, json: bool) -> mirror_server::Result<()> {
    let config = ServerConfig::load(cfg)?;
    let store = config.chunk_store(data)?;
    let usage = store.usage();
    let mut rows = Vec::new();
    let mut referenced = 0u64;
    for name in store.volumes()? {
        let versions = store.versions(&name)?;
        let head = match versions.last() {
            Some(&seq) => Some(store.version(&name, seq)?),
            None => None,
        };
        if let Some(h) = &head {
            referenced += h.size;
        }
        let damaged = store.damaged_versions(&name)?;
        rows.push(serde_json::json!({
            "volume": name,
            "versions": versions.len(),
            "damaged": damaged,
            "head": head.as_ref().map(|h| h.seq),
            "epoch": head.as_ref().map(|h| h.epoch),
            "size": head.as_ref().map(|h| h.size),
            // ms since the Unix epoch, as `volumes --json` has it.
            "published_ms": head.as_ref().map(|h| h.created_ms),
        }));
    }
    let (objects, object_bytes) = store.objects()?;
    if json {
        let out = serde_json::json!({
            "store": store.describe(),
            "objects": objects,
            "object_bytes": object_bytes,
            "chunks": usage.chunks,
            "raw_bytes": usage.raw_bytes,
            "stored_bytes": usage.stored_bytes,
            "patches": usage.patches,
            "packs": usage.packs,
            "volumes": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    println!("store        {}", store.describe());
    println!(
        "chunks       {} ({} of data, {} stored after compression, in {} packs; {} as patches on another)",
        usage.chunks,
        human(usage.raw_bytes),
        human(usage.stored_bytes),
        usage.packs,
        usage.patches
    );
    println!("objects      {objects} ({} in all)", human(object_bytes));
    println!(
        "volumes      {} ({} of volume size)",
        rows.len(),
        human(referenced)
    );
    for r in &rows {
        println!(
            "  {:<32} {:>4} versions, newest {} (epoch {}, {}){}",
            r["volume"].as_str().unwrap_or_default(),
            r["versions"],
            r["head"],
            r["epoch"],
            r["published_ms"].as_u64().map_or_else(
                || "-".to_string(),
                |ms| ublk_mirror_common::when::show(ms, false)
            ),
            match r["damaged"].as_array() {
                Some(d) if !d.is_empty() => format!("; DAMAGED versions {}", r["damaged"]),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

/// `bytes` for people: 1023 B, 96.1 MiB, 2.0 GiB.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// What `verify` found of the images here.
#[derive(Debug, Default, serde::Serialize)]
struct ImagesChecked {
    /// Images checked.
    volumes: u64,
    /// Their blocks.
    blocks: u64,
    /// The images with blocks that differed from their versions: how
    /// many, and how many of those were repaired.
    differed: std::collections::BTreeMap<String, ImageCheck>,
    /// The images that could not be checked, and why.
    unchecked: std::collections::BTreeMap<String, String>,
}

fn verify(data: &Path, cfg: &Path, volume: Option<&str>, json: bool) -> mirror_server::Result<()> {
    if let Some(v) = volume {
        mirror_server::volumes::split_volume(v)?;
    }
    let config = ServerConfig::load(cfg)?;
    let volumes = Volumes::new(data, Quota::none()).with_store(config.chunk_store(data)?);
    let mut last = std::time::Instant::now();
    let r = volumes.verify(volume, |done, total| {
        if last.elapsed() >= std::time::Duration::from_secs(2) || done == total {
            eprintln!("verify: {done}/{total} chunks");
            last = std::time::Instant::now();
        }
    })?;
    if let (Some(v), 0) = (volume, r.versions) {
        // Nothing of it in the store: a misspelt name is not "clean".
        return Err(mirror_server::Error::Invalid(format!(
            "the chunk store holds no version of {v} (`mirror-server volumes` lists them)"
        )));
    }
    // The images here, each against the version it holds: through the
    // running server, which owns them, or here holding its lock.
    let here: Vec<String> = match volume {
        Some(v) => vec![v.to_string()],
        // None (the images lost, a store read elsewhere): none to check.
        None => mirror_server::store::list(data)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, _)| name)
            .collect(),
    };
    let mut images = ImagesChecked::default();
    for name in here {
        if admin::volume_dir(data, &name).is_err() {
            continue; // only in the store (another server's)
        }
        eprintln!("verify: checking the image of {name} against its version");
        let checked = admin::request(
            data,
            cfg,
            admin::Op::CheckImage {
                volume: name.clone(),
            },
        )
        .and_then(|v| {
            serde_json::from_value::<ImageCheck>(v).map_err(|e| {
                mirror_server::Error::Invalid(format!("the server's answer on {name}'s image: {e}"))
            })
        });
        // One image that cannot be checked does not hide the others.
        let check = match checked {
            Ok(c) => c,
            Err(e) => {
                eprintln!("verify: the image of {name} was not checked: {e}");
                images.unchecked.insert(name, e.to_string());
                continue;
            }
        };
        images.volumes += 1;
        images.blocks += check.blocks;
        if check.damaged > 0 {
            images.differed.insert(name, check);
        }
    }
    let unrepaired: u64 = images
        .differed
        .values()
        .map(|c| c.damaged - c.repaired)
        .sum();
    if json {
        let mut out = serde_json::to_value(&r).unwrap_or_default();
        out["images"] = serde_json::to_value(&images).unwrap_or_default();
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!(
            "{} versions, {} chunks ({}) read and checked; {} repaired from the images here; {} damaged, {} map segments damaged",
            r.versions,
            r.chunks,
            human(r.bytes),
            r.repaired.len(),
            r.damaged.len(),
            r.damaged_segments.len()
        );
        for (chunk, versions) in r.damaged.iter().chain(&r.damaged_segments) {
            println!("  damaged {chunk}: needed by {}", versions.join(", "));
        }
        println!(
            "{} images here ({} blocks) checked against their versions: {} blocks differed, {} made the version's again from the store",
            images.volumes,
            images.blocks,
            images.differed.values().map(|c| c.damaged).sum::<u64>(),
            images.differed.values().map(|c| c.repaired).sum::<u64>(),
        );
        for (name, c) in &images.differed {
            println!(
                "  image of {name}: {} blocks differed, {} repaired",
                c.damaged, c.repaired
            );
        }
        for (name, why) in &images.unchecked {
            println!("  image of {name}: not checked: {why}");
        }
    }
    if unrepaired > 0 {
        return Err(mirror_server::Error::Corrupt(format!(
            "{unrepaired} blocks of the images here differ from their versions and could not be made the version's (the chunk store could not give them; see above)"
        )));
    }
    if !images.unchecked.is_empty() && r.is_clean() {
        return Err(mirror_server::Error::Corrupt(format!(
            "the chunk store is sound, but {} images here could not be checked (see above)",
            images.unchecked.len()
        )));
    }
    if r.is_clean() {
        Ok(())
    } else {
        Err(mirror_server::Error::Corrupt(format!(
            "{} chunks and {} map segments are damaged; the versions that need them are marked so (a device that sends that content again repairs it)",
            r.damaged.len(),
            r.damaged_segments.len()
        )))
    }
}

fn gc(data: &Path, cfg: &Path, window: Option<Span>) -> mirror_server::Result<()> {
    let config = ServerConfig::load(cfg)?;
    let store = config.chunk_store(data)?;
    let progress = |step: &str| eprintln!("gc: {step}");
    let exact = window.is_some();
    // Asked for: that window exactly (its help says when a shorter one is
    // safe); else the server's, never shorter than the store recorded.
    let (window, r) = match window {
        Some(w) => (w, store.gc(w.0, progress)?),
        None => {
            let w = config.store.gc_window;
            (w, store.gc_at_least(w.0, progress)?)
        }
    };
    println!(
        "versions: {} deleted, {} kept; packs: {} deleted ({} freed), {} condemned; map segments: {} deleted, {} condemned (condemned objects go at a run {window}{} or more from now if still unused)",
        r.versions_deleted,
        r.versions_kept,
        r.packs_deleted,
        human(r.bytes_freed),
        r.packs_condemned,
        r.segments_deleted,
        r.segments_condemned,
        if exact {
            ""
        } else {
            " (or the longer window the store recorded)"
        }
    );
    Ok(())
}

fn upgrade(data: &Path, cfg: &Path, move_to_this_store: bool) -> mirror_server::Result<()> {
    let _lock = admin::ServerLock::take(data, "upgrade")?;
    let config = ServerConfig::load(cfg)?;
    runtime()?.block_on(async {
        let store = config.chunk_store(data)?;
        println!("chunk store: {}", store.describe());
        let volumes = Volumes::new(data, Quota::none()).with_store(store.clone());
        let mut failed = 0;
        for (client, volume) in volumes.all() {
            let name = format!("{client}/{volume}");
            if move_to_this_store {
                let dir = volumes.dir(&client, &volume);
                match tokio::task::block_in_place(|| {
                    mirror_server::store::move_to_store(&dir, &store, &name)
                }) {
                    Ok(true) => println!("{name}: to be kept in this store"),
                    Ok(false) => {}
                    Err(e) => {
                        failed += 1;
                        eprintln!("{name}: {e}");
                        continue;
                    }
                }
            }
            match volumes.open(&client, &volume, None) {
                Ok(v) => {
                    let v = v.lock().await;
                    let seq = v.stored().map_or(0, |(_, _, seq)| seq);
                    println!(
                        "{name}: version {seq} in the store (epoch {})",
                        v.state().published_epoch
                    );
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("{name}: {e}");
                }
            }
        }
        match failed {
            0 => Ok(()),
            n => Err(mirror_server::Error::Invalid(format!(
                "{n} volumes could not be upgraded (see above)"
            ))),
        }
    })
}

fn list_snapshots(
    data: &Path,
    cfg: &Path,
    volume: &str,
    json: bool,
    utc: bool,
) -> mirror_server::Result<()> {
    let mut list = snapshots::list(&admin::volume_dir(data, volume)?)?;
    // Snapshots the chunk store pins that this cache does not have (taken
    // on another server on the store, or before the cache was rebuilt):
    // exports and restores read them from the store. Shown as kind
    // "stored", keeping nothing here.
    if let Ok(store) = ServerConfig::load(cfg).and_then(|c| c.chunk_store(data)) {
        let here = |name: &str| list.iter().any(|(s, _)| s.name == name);
        match mirror_server::store::stored_snapshots(&store, volume, here) {
            Ok(stored) => {
                for (name, e) in stored.unreadable {
                    eprintln!("mirror-server: snapshot {name}, kept only in the chunk store, is not listed: {e}");
                }
                list.extend(stored.found.into_iter().map(|(info, _)| (info, 0)));
            }
            Err(e) => {
                eprintln!("mirror-server: snapshots only the chunk store keeps are not listed: {e}")
            }
        }
        list.sort_by_key(|(s, _)| (s.epoch_ms, s.created_ms));
    }
    let mut out = std::io::stdout().lock();
    let io = |e| mirror_server::Error::io("writing to stdout", e);
    if json {
        let rows: Vec<_> = list
            .iter()
            .map(|(s, bytes)| {
                serde_json::json!({
                    "name": s.name,
                    "epoch": s.epoch,
                    "epoch_ms": s.epoch_ms,
                    "created_ms": s.created_ms,
                    "kind": s.kind,
                    "bytes": bytes,
                })
            })
            .collect();
        return print_json(&rows);
    }
    writeln!(
        out,
        "{:<28} {:>7} {:<24} {:<10} {:>9}",
        "SNAPSHOT", "EPOCH", "SHOWS", "KIND", "KEEPS"
    )
    .map_err(io)?;
    for (s, bytes) in &list {
        writeln!(
            out,
            "{:<28} {:>7} {:<24} {:<10} {:>9}",
            s.name,
            s.epoch,
            ublk_mirror_common::when::show(s.epoch_ms, utc),
            format!("{:?}", s.kind).to_lowercase(),
            ByteSize(*bytes).to_string()
        )
        .map_err(io)?;
    }
    Ok(())
}

fn list_exports(data: &Path, cfg: &Path, json: bool, utc: bool) -> mirror_server::Result<()> {
    let answer = admin::request(data, cfg, admin::Op::Exports)?;
    if !admin::server_running(data) {
        match admin::ServerLock::holder(data) {
            Some(holder) => eprintln!(
                "mirror-server: no server runs on {}; {holder} holds it (what a foreground `export` serves is listed by nothing else, and stops with it)",
                data.display()
            ),
            None => eprintln!(
                "mirror-server: no server runs on {}: nothing is exported",
                data.display()
            ),
        }
    }
    let rows = match answer {
        serde_json::Value::Array(rows) => rows,
        other => {
            return Err(mirror_server::Error::Invalid(format!(
                "the server answered {other} to a list of exports"
            )))
        }
    };
    if json {
        return print_json(&rows);
    }
    let mut out = std::io::stdout().lock();
    let io = |e| mirror_server::Error::io("writing to stdout", e);
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<20} {:<24} {:<21} {:<9} {:>5}  IQN",
        "VOLUME", "VERSION", "SHOWS", "PORTAL", "MODE", "CONNS"
    )
    .map_err(io)?;
    for r in &rows {
        let text = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        writeln!(
            out,
            "{:<24} {:<20} {:<24} {:<21} {:<9} {:>5}  {}",
            text("volume"),
            // "now" is the published epoch when it was exported, held by
            // a snapshot of its own.
            if r["kind"] == "temporary" {
                "now".to_string()
            } else {
                text("snapshot")
            },
            ublk_mirror_common::when::show(r["epoch_ms"].as_u64().unwrap_or(0), utc),
            r["portal"]
                .as_str()
                .map_or_else(|| r["portal"].to_string(), str::to_string),
            if r["writable"].as_bool() == Some(true) {
                "writable"
            } else {
                "read-only"
            },
            r["connections"].as_u64().unwrap_or(0),
            text("iqn"),
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

fn runtime() -> mirror_server::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| mirror_server::Error::io("starting the async runtime", e))
}

/// Resolves at SIGTERM or Ctrl-C.
async fn stop_asked() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `value` as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) -> mirror_server::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)
        .map_err(|e| mirror_server::Error::io("writing JSON", e.into()))?;
    writeln!(out).map_err(|e| mirror_server::Error::io("writing to stdout", e))
}

fn serve(
    data: &Path,
    cfg: &Path,
    listen: Option<std::net::SocketAddr>,
) -> mirror_server::Result<()> {
    let mut config = ServerConfig::load(cfg)?;
    if let Some(l) = listen {
        config.listen = l;
    }
    tracing::info!(config = %cfg.display(), "settings read");
    let system = Path::new(config::SYSTEM_CONFIG);
    if cfg != system && system.exists() {
        // A hand install moved to the package: edits in /etc would do
        // nothing, silently.
        tracing::warn!(
            "{} is not read: {} is (the data directory's own file wins; merge them, and remove one)",
            system.display(),
            cfg.display()
        );
    }
    runtime()?.block_on(async {
        let shutdown = stop_asked();
        mirror_server::serve::run(
            data,
            &config,
            |addr| {
                println!("listening on {addr}");
                let _ = std::io::stdout().flush();
            },
            shutdown,
        )
        .await
    })
}

fn client(data: &Path, cfg: &Path, command: ClientCommand) -> mirror_server::Result<()> {
    // A mistyped --data is said, not made into an empty registry.
    if !data.join("identity").is_dir() {
        return Err(mirror_server::Error::Invalid(format!(
            "{} is not a data directory (it has no identity/): check --data, or run `mirror-server init --data {}` first",
            data.display(),
            data.display()
        )));
    }
    let registry = Registry::open(data)?;
    match command {
        ClientCommand::Add {
            name,
            address,
            ttl,
            replace,
        } => {
            let identity = Identity::load(&data.join("identity")).map_err(|e| {
                mirror_server::Error::Invalid(format!("{e} (run `mirror-server init` first)"))
            })?;
            if ttl.0 < std::time::Duration::from_secs(60) {
                return Err(mirror_server::Error::Invalid(format!(
                    "--ttl {ttl} is too short to enroll with: give at least 1m (default 24h)"
                )));
            }
            let address = match address {
                Some(a) => {
                    ublk_mirror_common::token::check_addresses(&a)
                        .map_err(|e| mirror_server::Error::Invalid(format!("--address: {e}")))?;
                    a
                }
                None => {
                    let port = ServerConfig::load(cfg)?.listen.port();
                    let host = nix::unistd::gethostname()
                        .map_err(|e| mirror_server::Error::io("reading the host name", e.into()))?;
                    let a = format!("{}:{port}", host.to_string_lossy());
                    eprintln!(
                        "clients will connect to {a} (this host's name and the listen port); give --address HOST:PORT if they reach this server another way"
                    );
                    a
                }
            };
            let before = registry.get(&name)?;
            let secret = registry.add(&name, ttl.0, replace)?;
            match before.as_ref().map(|c| c.state()) {
                Some("pending") => eprintln!(
                    "the token issued before for {name} no longer works: this one replaces it"
                ),
                Some(state) => eprintln!(
                    "client {name} was {state}: its certificate is cut off now; the machine that enrolls with this token is {name}, with its volumes"
                ),
                None => {}
            }
            let token = Token {
                name: name.clone(),
                secret,
                server: identity.fingerprint(),
                address,
            };
            println!("{token}");
            eprintln!(
                "token for client {name}, good once for {ttl}: on the client run `ublk-mirror enroll TOKEN`"
            );
            Ok(())
        }
        ClientCommand::List { json } => {
            let list = registry.list()?;
            let mut out = std::io::stdout().lock();
            let io = |e| mirror_server::Error::io("writing to stdout", e);
            if json {
                // What a listing needs, not the file: a pending token's
                // hash stays in the data directory.
                let listed: Vec<serde_json::Value> = list
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "state": c.state(),
                            "created_ms": c.created_ms,
                            "fingerprint": c.fingerprint,
                            "token_expires_ms": c.token.as_ref().map(|t| t.expires_ms),
                            "revoked": c.revoked,
                            "retired": c.retired,
                        })
                    })
                    .collect();
                return print_json(&listed);
            }
            writeln!(out, "{:<24} {:<9} CERTIFICATE", "CLIENT", "STATE").map_err(io)?;
            for c in &list {
                let fp = c.fingerprint.as_deref().map_or_else(
                    || "-".to_string(),
                    |f| format!("sha256:{}", &f[..16.min(f.len())]),
                );
                writeln!(out, "{:<24} {:<9} {}", c.name, c.state(), fp).map_err(io)?;
            }
            Ok(())
        }
        ClientCommand::Revoke { name } => {
            registry.revoke(&name)?;
            println!(
                "revoked client {name}; a running server closes its connections within a second"
            );
            Ok(())
        }
    }
}
