//! `ublk-mirror`: the command line of the device daemon.
//!
//! `add` (and `recover`) run the device in the foreground until it is
//! stopped; `list` and `del` manage devices from another shell.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ublk_dev::backing::{Backing, BackingOptions};
use ublk_dev::config::{DeviceConfig, DeviceSpec, TrackingSpec};
use ublk_dev::control::Client;
use ublk_dev::status::DeviceStatus;
use ublk_dev::ublk::{self, DeviceInfo, Ready, Start, TargetRecord};
use ublk_dev::{system, Error, ErrorKind};
use ublk_mirror_common::{fsutil, ByteSize, Span};

/// A ublk block device written through to a backing file.
///
/// `ublk-mirror add --backing disk.img --size 20G` gives you /dev/ublkbN: a
/// real block device whose data lands in disk.img, at local-disk speed. Put a
/// file system or a VM disk on it. The daemon runs in the foreground (like
/// a systemd service); stop it with Ctrl-C or SIGTERM and the device goes
/// away cleanly with the file synced. If the daemon is killed instead, the
/// device stays and applications wait until `ublk-mirror recover ID`.
///
/// Needs root and the kernel's ublk driver (`modprobe ublk_drv`, Linux 6.0+).
///
/// Exit status: 0 done; 1 the system failed; 2 bad usage (nothing changed);
/// 3 the environment is not as needed (driver, files, root, rights, a
/// read-only file system, no enrollment); 4 a device is
/// missing, busy or in the wrong state; 5 the mirror server could not be
/// reached or the link failed (try again); 6 the mirror server refused; 7
/// the mirror server broke the protocol.
#[derive(Debug, Parser)]
#[command(name = "ublk-mirror", version, propagate_version = true)]
struct Cli {
    /// Log as JSON lines instead of text (to stderr).
    #[arg(long, global = true)]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a device on a backing file and serve it (foreground)
    ///
    /// Prints the device path (e.g. /dev/ublkb0) on stdout once it is ready.
    /// If a device for the same backing file was left behind by a killed
    /// daemon, it is recovered instead of created.
    ///
    /// Examples:
    ///   ublk-mirror add --backing /var/lib/disk.img --size 20G
    ///   ublk-mirror add --config /etc/ublk-mirror/laptop.toml
    ///   ublk-mirror add --backing vm.img --queues 2 --logical-block-size 4096
    #[command(verbatim_doc_comment)]
    Add(Box<AddArgs>),

    /// List ublk devices.
    List {
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Show each device's change tracking: dirty bytes, marked regions,
    /// the current and oldest unreleased epoch, whether a resync is pending.
    ///
    /// DIRTY and ZEROED count what changed since the last release; RESYNC
    /// what is left of regions whose changes are not known exactly (found
    /// marked at start, e.g. after a crash), to settle by hash comparison;
    /// OLDEST is the oldest sealed epoch not yet released. A device whose
    /// daemon died shows the last status it published.
    ///
    /// A mirrored device with changes older than --stale that are not on
    /// the mirror yet is named below the table, in words, and the exit
    /// status is 1 (for cron and monitoring scripts).
    Status {
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
        /// Call a mirror stale when changes this old are not on it yet.
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        stale: Span,
    },

    /// Print every device's metrics in Prometheus' text format (from the
    /// status its daemon publishes), or write them for node_exporter's
    /// textfile collector.
    ///
    ///   ublk-mirror metrics --textfile /var/lib/prometheus/node-exporter/ublk-mirror.prom
    ///
    /// systemd/ublk-mirror-metrics.timer runs that every 15 s.
    #[command(verbatim_doc_comment)]
    Metrics {
        /// Write here (atomically) instead of printing.
        #[arg(long, value_name = "FILE")]
        textfile: Option<PathBuf>,
    },

    /// Stop and delete devices; their daemons sync and exit.
    ///
    /// Unmount file systems on the device first: a deleted device fails
    /// all further I/O.
    Del {
        /// Device id (N in /dev/ublkbN).
        #[arg(required_unless_present = "all", conflicts_with = "all", value_parser = device_id)]
        id: Option<u32>,
        /// Delete every ublk-mirror device.
        #[arg(long)]
        all: bool,
        /// Delete a device even while it is mounted or held (file systems
        /// are written back first, but a mounted one then fails every
        /// later write: unmount instead). Also deletes a device left with
        /// no description and no daemon (an `add` killed while setting it
        /// up).
        #[arg(long)]
        force: bool,
    },

    /// Cut, read and release epochs: consistent point-in-time pictures of
    /// a running device's changes.
    ///
    /// The device's changes collect in the current epoch. `seal` cuts it
    /// (at the next FLUSH, a point the filesystem made durable) without
    /// pausing I/O; a sealed epoch reads back as exactly the device at its
    /// cut, however it is written afterwards (blocks overwritten meanwhile
    /// are preserved first). `apply` writes an epoch into a copy of the
    /// device; `release` says the copy has it durably, freeing what the
    /// epoch kept and clearing its regions from the journal. (A mirrored
    /// device's first sync may hold pre-copy rounds: epochs with no cut,
    /// which `read` refuses; its replicator releases them.)
    ///
    /// A copy kept in step with seal, apply (each epoch in order) and
    /// release is the device as it was at the last cut:
    ///   e=$(ublk-mirror epoch seal 0)
    ///   ublk-mirror epoch apply 0 "$e" --to /backup/disk.copy
    ///   ublk-mirror epoch release 0 "$e"
    #[command(verbatim_doc_comment)]
    Epoch {
        #[command(subcommand)]
        command: EpochCommand,
    },

    /// Wait until everything written to a mirrored device before this
    /// command is on the mirror (for scripts and shutdown).
    ///
    /// Asks the replicator for a cut now. Exits 0 once the mirror has it,
    /// 4 if the timeout passes first (the link state is in `status`).
    Sync {
        /// Device id (N in /dev/ublkbN).
        #[arg(value_parser = device_id)]
        id: u32,
        /// How long to wait at most.
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        timeout: Span,
    },

    /// Take a snapshot on the mirror of everything written to the device
    /// before this command: waits until the mirror has it (like `sync`),
    /// then asks the server to keep that epoch until the snapshot is
    /// deleted (`mirror-server delete VOLUME@NAME`).
    Snapshot {
        /// Device id (N in /dev/ublkbN).
        #[arg(value_parser = device_id)]
        id: u32,
        /// Its name [default: the time, e.g. 2026-11-22T16.30.05Z].
        name: Option<String>,
        /// How long to wait for the mirror at most.
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        timeout: Span,
    },

    /// List a volume's snapshots on the mirror: the versions `restore --at`
    /// and `attach --at` take, by name or by a time shown here (a time
    /// picks the newest snapshot at or before that second: of two taken
    /// in the same second, give the older one's name).
    ///
    /// SHOWS is when the snapshot's epoch reached the mirror (the point in
    /// time it holds), in this machine's time zone; KIND says how the
    /// server keeps it: manual (until deleted), scheduled (pruned by the
    /// server's retention), temporary (held while something reads it),
    /// stored (taken by another server on the same chunk store).
    ///
    ///   ublk-mirror snapshots --volume root
    ///   ublk-mirror restore --volume root --at before-upgrade --to /var/tmp/root.img
    #[command(verbatim_doc_comment)]
    Snapshots {
        /// The volume on the mirror server (this machine's).
        #[arg(long)]
        volume: String,
        /// Show times in UTC.
        #[arg(long)]
        utc: bool,
        /// Print one JSON array (name, epoch, epoch_ms, created_ms, kind;
        /// times in ms since the Unix epoch).
        #[arg(long)]
        json: bool,
        /// Where this machine's enrollment is kept.
        #[arg(long, value_name = "DIR", default_value = ublk_dev::enrollment::DEFAULT_CLIENT_DIR, env = "UBLK_MIRROR_CLIENT_DIR")]
        client_dir: PathBuf,
    },

    /// Restore a volume from the mirror: as of a snapshot, a time, or now,
    /// into a file or a block device.
    ///
    /// The target's blocks are compared by hash and only those that differ
    /// travel: restoring onto an older copy (or finishing a restore that
    /// was cut short, by running it again) moves only what changed. A new
    /// file is made sparse. A block device must not be mounted.
    ///
    ///   ublk-mirror restore --volume root --at 'yesterday 18:00' --to /var/tmp/root.img
    ///   ublk-mirror restore --volume root --at '2h ago' --to /var/tmp/root.img
    ///   ublk-mirror restore --volume root --at before-upgrade --to /dev/sdb
    ///
    /// With --instant the target is served at once as a block device
    /// (printed on stdout), to mount and work on while it fills: a read of
    /// a block not yet here fetches it first, a background fill copies the
    /// rest (only blocks that differ from what the target holds), and
    /// writes land on the target and are never overwritten by the fill.
    /// The fill survives `kill -9` (`ublk-mirror recover N`) and reboots
    /// (run the same command again): its state is in --state-dir. When
    /// every block is here it is an ordinary device on the target.
    ///
    ///   dev=$(ublk-mirror restore --instant --volume root --to /var/lib/disk.img --background)
    ///   mount "$dev" /mnt     # at once; `ublk-mirror status` shows the fill
    ///
    /// With --mirror as well, this device becomes the volume's writer (the
    /// device that wrote it before is refused from then on; the volume's
    /// versions are kept; run again where the mirror cannot be reached
    /// before that was done, it is done once the mirror is back, before the
    /// device mirrors) and, once every block is here, goes on mirroring
    /// to it: its writes meanwhile are tracked, and its first epoch sends
    /// only the blocks that differ from the mirror.
    ///
    ///   dev=$(ublk-mirror restore --instant --mirror --volume root --to /var/lib/disk.img --background)
    #[command(verbatim_doc_comment)]
    Restore {
        /// The volume on the mirror server (this machine's).
        #[arg(long)]
        volume: String,
        /// A snapshot's name, or a time for the newest snapshot at or before
        /// it, in this machine's time zone: `yesterday 18:00`, `today 9:30`,
        /// `2h ago`, `2026-12-02 18:00`, an instant with Z or an offset, or
        /// a time as `ublk-mirror snapshots` shows it (with its zone)
        /// [default: the mirror now].
        #[arg(long, value_name = "SNAPSHOT|TIME")]
        at: Option<String>,
        /// Where to: a file (made if missing) or a block device.
        #[arg(long, value_name = "FILE|DEVICE")]
        to: PathBuf,
        /// Where this machine's enrollment is kept.
        #[arg(long, value_name = "DIR", default_value = ublk_dev::enrollment::DEFAULT_CLIENT_DIR, env = "UBLK_MIRROR_CLIENT_DIR")]
        client_dir: PathBuf,
        /// Serve the target as a block device at once and fill it behind.
        #[arg(long)]
        instant: bool,
        /// (--instant) Return once the device is ready (its log goes to
        /// /run/ublk-mirror/NNNN.restoring.log).
        #[arg(long, requires = "instant")]
        background: bool,
        /// (--instant) Where fill states are kept.
        #[arg(
            long,
            value_name = "DIR",
            default_value = "/var/lib/ublk-mirror/restore",
            requires = "instant"
        )]
        state_dir: PathBuf,
        /// (--instant) How long a read waits for an unreachable mirror
        /// before it fails with an I/O error (0: for ever).
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "0s",
            requires = "instant"
        )]
        timeout: Span,
        /// (--instant) Device id to ask for (N in /dev/ublkbN).
        #[arg(long, requires = "instant")]
        id: Option<u32>,
        /// (--instant) Most bytes per second the background fill takes
        /// from the link, as sent (compressed; holes and blocks the target
        /// holds already cost nothing), e.g. 20M; reads that wait are never
        /// held back [default: no limit].
        #[arg(long, value_name = "SIZE", requires = "instant")]
        fill_rate: Option<ByteSize>,
        /// (--instant) Take the volume over and go on mirroring to it once
        /// the fill is done (its change journal goes where `add --backing
        /// TARGET` looks: TARGET.ublk-mirror/, or /var/lib/ublk-mirror/NAME/
        /// for a block device /dev/NAME).
        #[arg(long, requires = "instant")]
        mirror: bool,
    },

    /// Attach a version of a volume on the mirror as a local block device
    /// whose blocks are fetched as they are read (foreground).
    ///
    /// Prints the device (e.g. /dev/ublkb1) on stdout once it is ready; with
    /// --background it then returns and the device keeps being served.
    /// Every block is checked against its SHA-256 before it is served.
    /// Blocks read are kept in a local cache of --cache bytes; sequential
    /// reads are fetched ahead. If the link to the mirror drops, reads wait
    /// and resume; one that waited --timeout fails with an I/O error.
    ///
    /// The device is read-only; mount it with `-o ro` (ext4 whose journal
    /// needs replaying: `-o ro,noload`). --writable keeps writes in a local
    /// overlay that the mirror never sees and that is gone on detach.
    /// Without --at a snapshot of the mirror as it is now is taken first
    /// (named attach-TIME), so the version stays while it is read.
    ///
    ///   dev=$(ublk-mirror attach --volume laptop --at 'yesterday 18:00' --background)
    ///   mount -o ro "$dev" /mnt && cp /mnt/home/me/report.odt ~ && umount /mnt
    ///   ublk-mirror detach "$dev"
    #[command(verbatim_doc_comment)]
    Attach(Box<AttachArgs>),

    /// Stop and delete an attached device (its cache and any local writes
    /// are dropped). Unmount it first.
    Detach {
        /// The device: its id (N in /dev/ublkbN) or its path.
        device: String,
    },

    /// Enroll this machine with a mirror server, once.
    ///
    /// TOKEN is the line `mirror-server client add NAME` printed. This
    /// makes the machine's key and certificate, connects to the server the
    /// token names (trusting only the certificate it pins), and proves the
    /// token's one-time secret; the server records this machine's
    /// certificate from then on.
    Enroll {
        /// The enrollment token (umt1/...).
        token: String,
        /// Where the client's identity and enrollment are kept.
        #[arg(long, value_name = "DIR", default_value = ublk_dev::enrollment::DEFAULT_CLIENT_DIR, env = "UBLK_MIRROR_CLIENT_DIR")]
        client_dir: PathBuf,
    },

    /// Serve again a device whose daemon died (foreground).
    ///
    /// The device kept its I/O waiting; after recovery it continues with no
    /// error seen by applications.
    Recover {
        /// Device id (N in /dev/ublkbN).
        #[arg(value_parser = device_id)]
        id: u32,
    },
    #[command(flatten)]
    Docs(ublk_mirror_common::docs::DocsCommand),
}

#[derive(Debug, Subcommand)]
enum EpochCommand {
    /// Seal the current epoch and print its number.
    ///
    /// The cut is taken at the next FLUSH the device receives (so it is a
    /// point the filesystem asked to be durable), or at the deadline if
    /// none comes (an idle device), or at once with --now.
    Seal {
        /// Device id (N in /dev/ublkbN).
        #[arg(value_parser = device_id)]
        id: u32,
        /// Cut at once instead of at the next FLUSH.
        #[arg(long)]
        now: bool,
        /// How long to wait for a FLUSH before cutting anyway.
        #[arg(long, default_value = "5s", value_name = "DURATION")]
        timeout: Span,
    },
    /// List the current epoch and the sealed, unreleased ones.
    List {
        /// Device id (N in /dev/ublkbN).
        #[arg(value_parser = device_id)]
        id: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write everything a sealed epoch changed, as the device was at its
    /// cut, into a copy of the device (created sparse if missing).
    ///
    /// Applied to a copy of the device at the previous cut, the copy
    /// becomes the device at this cut. Zeroed ranges become holes.
    Apply {
        /// Device id (N in /dev/ublkbN).
        #[arg(value_parser = device_id)]
        id: u32,
        /// The sealed epoch.
        epoch: u64,
        /// The copy to write into.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Release the oldest sealed epoch: the consumer has it, durably.
    ///
    /// Epochs are released in order. The backing file is synced, what the
    /// epoch preserved is freed, and the regions no later change touches
    /// are cleared from the journal. Releasing an epoch twice is harmless.
    Release {
        /// Device id (N in /dev/ublkbN).
        #[arg(value_parser = device_id)]
        id: u32,
        /// The epoch (the oldest sealed one).
        epoch: u64,
    },
}

#[derive(Debug, Args)]
struct AddArgs {
    /// Device config file (TOML); command-line options override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,

    /// Backing file (or block device) that holds the data.
    #[arg(long, short = 'f', value_name = "FILE")]
    backing: Option<PathBuf>,

    /// Create the backing file as a sparse file of this size if it does not
    /// exist (e.g. 20G, 512M); if it exists, it must have this size. A
    /// block device may be larger: the device is its first SIZE bytes (a
    /// volume restored onto a bigger disk).
    #[arg(long, short = 's')]
    size: Option<ByteSize>,

    /// Device name [default: the config file's or backing file's name].
    #[arg(long, short = 'n')]
    name: Option<String>,

    /// Device id, N in /dev/ublkbN [default: the first free one].
    #[arg(long)]
    id: Option<u32>,

    /// Hardware queues, one thread each, 1-32 [default: 1].
    #[arg(long, short = 'q')]
    queues: Option<u16>,

    /// Requests in flight per queue, 1-4096 [default: 128].
    #[arg(long, short = 'd')]
    depth: Option<u16>,

    /// Logical block size in bytes: 512 or 4096 [default: 512].
    #[arg(long, value_name = "BYTES")]
    logical_block_size: Option<u32>,

    /// Use the page cache instead of O_DIRECT on the backing file.
    #[arg(long)]
    buffered: bool,

    /// Directory of the change journal [default: beside the backing file,
    /// FILE.ublk-mirror/; /var/lib/ublk-mirror/NAME/ for a block device].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Write-intent region size, a power of two >= 64K [default: 4M]: the
    /// first write into a region waits for one journal sync.
    #[arg(long)]
    region_size: Option<ByteSize>,

    /// Memory for blocks preserved for sealed epochs (copy-on-write of
    /// what a cut still needs) before they spill to a file in the state
    /// directory [default: 64M].
    #[arg(long, value_name = "SIZE")]
    cow_memory: Option<ByteSize>,

    /// Do not track changes (no journal; nothing to mirror).
    #[arg(long)]
    no_tracking: bool,

    /// Mirror the device to this volume on the server this machine is
    /// enrolled with (`ublk-mirror enroll`). The mirror follows seconds
    /// behind; local I/O never waits for it.
    #[arg(long, value_name = "VOLUME")]
    mirror: Option<String>,

    /// Least time between cuts shipped to the mirror [default: 5s]; a
    /// cut comes sooner when much is dirty or `ublk-mirror sync` asks.
    #[arg(long, value_name = "DURATION")]
    mirror_interval: Option<Span>,

    /// zstd level for shipped blocks, 1-19 [default: 3].
    #[arg(long, value_name = "N")]
    zstd_level: Option<i32>,

    /// Bytes per second the mirror may use, e.g. 10M [default: no limit].
    #[arg(long, value_name = "RATE")]
    mirror_bandwidth: Option<ByteSize>,

    /// An epoch at least this big (a first sync, a resync) travels in
    /// pre-copy rounds: the device is read as it is, without
    /// copy-on-write, while what changes meanwhile is tracked and sent in
    /// the next round; one small consistent cut ends it, and the server
    /// publishes it all as one version. "0": never [default: 256M].
    #[arg(long, value_name = "SIZE")]
    mirror_precopy: Option<ByteSize>,

    /// While the device is busy (100 requests a second or more), a
    /// pre-copy round (a first sync, a resync) reads at most this much of
    /// it a second, so that the device's own I/O comes first; at full
    /// speed while it is quiet. A floor, like DRBD's c-min-rate: a device
    /// never quiet still gets its
    /// first sync. "0": full speed always [default: 1M].
    #[arg(long, value_name = "RATE")]
    mirror_min_rate: Option<ByteSize>,

    /// This machine's enrollment [default: /var/lib/ublk-mirror/client].
    #[arg(long, value_name = "DIR", env = "UBLK_MIRROR_CLIENT_DIR")]
    client_dir: Option<PathBuf>,
}

impl AddArgs {
    fn to_config(&self) -> DeviceConfig {
        DeviceConfig {
            backing: self.backing.clone(),
            size: self.size,
            name: self.name.clone(),
            id: self.id,
            queues: self.queues,
            depth: self.depth,
            logical_block_size: self.logical_block_size,
            direct_io: self.buffered.then_some(false),
            tracking: self.no_tracking.then_some(false),
            state_dir: self.state_dir.clone(),
            region_size: self.region_size,
            cow_memory: self.cow_memory,
            mirror: self.mirror.clone(),
            mirror_interval: self.mirror_interval,
            zstd_level: self.zstd_level,
            mirror_bandwidth: self.mirror_bandwidth,
            mirror_precopy: self.mirror_precopy,
            mirror_min_rate: self.mirror_min_rate,
            client_dir: self.client_dir.clone(),
        }
    }
}

/// `ublk-mirror restore --instant`.
#[derive(Debug)]
struct InstantArgs {
    volume: String,
    at: Option<String>,
    to: PathBuf,
    client_dir: PathBuf,
    background: bool,
    state_dir: PathBuf,
    timeout: Span,
    id: Option<u32>,
    fill_rate: Option<ByteSize>,
    mirror: bool,
}

/// `ublk-mirror attach`.
#[derive(Debug, clap::Args)]
struct AttachArgs {
    /// The volume on the mirror server (this machine's).
    #[arg(long)]
    volume: String,
    /// A snapshot's name, or a time for the newest snapshot at or before
    /// it, in this machine's time zone: `yesterday 18:00`, `2h ago`,
    /// `2026-12-02 18:00`, or as `ublk-mirror snapshots` shows it (with
    /// its zone) [default: a snapshot of the mirror now].
    #[arg(long, value_name = "SNAPSHOT|TIME")]
    at: Option<String>,
    /// Accept writes, kept in a local overlay (never sent to the mirror).
    #[arg(long)]
    writable: bool,
    /// Most bytes of fetched blocks kept locally; past it, blocks are
    /// dropped in clock order and fetched again if read.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    cache: ByteSize,
    /// How long a read waits for an unreachable mirror before it fails
    /// with an I/O error (0: for ever).
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    timeout: Span,
    /// Where the cache file is made (it is unlinked at once: nothing is
    /// left there, even after a crash).
    #[arg(long, value_name = "DIR", default_value = "/var/cache/ublk-mirror")]
    cache_dir: PathBuf,
    /// Device id to ask for (N in /dev/ublkbN) [default: the next free].
    #[arg(long)]
    id: Option<u32>,
    /// Return once the device is ready, serving it in the background (its
    /// log goes to /run/ublk-mirror/NNNN.attached.log).
    #[arg(long)]
    background: bool,
    /// Where this machine's enrollment is kept.
    #[arg(long, value_name = "DIR", default_value = ublk_dev::enrollment::DEFAULT_CLIENT_DIR, env = "UBLK_MIRROR_CLIENT_DIR")]
    client_dir: PathBuf,
}

fn main() -> ExitCode {
    ublk_dev::system::limit_heap_arenas();
    ublk_mirror_common::docs::quiet_broken_pipe();
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.chain().any(ublk_mirror_common::docs::is_broken_pipe) => {
            // Its reader went away (`| head`): nothing to say.
            ExitCode::from(ublk_mirror_common::docs::BROKEN_PIPE_EXIT)
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "ublk-mirror: error: {e:#}");
            let kind = e.downcast_ref::<Error>().map(Error::kind);
            ExitCode::from(kind.map_or(1, ErrorKind::exit_code))
        }
    }
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,libublk=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    if matches!(
        command,
        Command::Add(_) | Command::Recover { .. } | Command::Attach(_) | Command::Restore { .. }
    ) {
        // Commands that serve a device, before any thread starts.
        system::io_flusher();
    }
    match command {
        Command::Docs(d) => Ok(d.run(<Cli as clap::CommandFactory>::command())?),
        Command::Add(args) => add(&args),
        Command::List { json } => list(json),
        Command::Status { json, stale } => {
            let behind = status(json, stale)?;
            if behind > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Del { id, all, force } => del(id, all, force),
        Command::Metrics { textfile } => metrics(textfile),
        Command::Recover { id } => recover(id),
        Command::Epoch { command } => epoch(command),
        Command::Sync { id, timeout } => {
            require_root("control devices")?;
            let r = sync_with_progress(id, timeout.0)?;
            println!(
                "device {id}: everything written before is on the mirror (epoch {})",
                r.released
            );
            Ok(())
        }
        Command::Snapshot { id, name, timeout } => {
            require_root("control devices")?;
            if let Some(n) = &name {
                ublk_mirror_common::proto::check_name(n)
                    .map_err(|e| Error::InvalidConfig(e.to_string()))?;
            }
            let mirror = ublk::info(id)?
                .record
                .and_then(|r| r.mirror)
                .ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "device {id} is not mirrored (add it with --mirror VOLUME)"
                    ))
                })?;
            Client::for_device(id).sync(timeout.0)?;
            let (name, epoch, _) = ublk_dev::replicator::take_snapshot(
                &mirror.client_dir,
                &mirror.volume,
                name.as_deref(),
            )?;
            println!(
                "device {id}: snapshot {}@{name} holds epoch {epoch}",
                mirror.volume
            );
            Ok(())
        }
        Command::Snapshots {
            volume,
            utc,
            json,
            client_dir,
        } => list_snapshots(&volume, utc, json, &client_dir),
        Command::Restore {
            volume,
            at,
            to,
            client_dir,
            instant: true,
            background,
            state_dir,
            timeout,
            id,
            fill_rate,
            mirror,
        } => instant_restore(InstantArgs {
            volume,
            at,
            to,
            client_dir,
            background,
            state_dir,
            timeout,
            id,
            fill_rate,
            mirror,
        }),
        Command::Restore {
            volume,
            at,
            to,
            client_dir,
            ..
        } => restore(volume, at, to, client_dir),
        Command::Attach(args) => attach(*args),
        Command::Detach { device } => detach(&device),
        Command::Enroll { token, client_dir } => {
            let token: ublk_mirror_common::token::Token = token
                .parse()
                .map_err(|e: ublk_mirror_common::Error| Error::InvalidConfig(e.to_string()))?;
            let saved = ublk_dev::enrollment::enroll(&client_dir, &token)?;
            println!(
                "enrolled as {} with {}; saved in {}",
                token.name,
                token.address,
                saved.display()
            );
            Ok(())
        }
    }
}

fn restore(
    volume: String,
    at: Option<String>,
    to: PathBuf,
    client_dir: PathBuf,
) -> anyhow::Result<()> {
    let at = version_asked(&volume, at.as_deref())?;
    let req = ublk_dev::restore::RestoreRequest {
        volume,
        at,
        to,
        client_dir,
    };
    // Stopped by a signal (Ctrl-C): said, with what the target holds.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("watching for signals")?;
    let target = req.to.display().to_string();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!(
                "\nublk-mirror: the restore was stopped (signal {sig}): {target} may hold part of the version; run the same command again to finish it (it compares what the target holds, and moves only what differs)"
            );
            std::process::exit(128 + sig);
        }
    });
    // A progress bar on a terminal; otherwise (systemd, cron, a pipe) a
    // line in the log every half minute.
    let bar = progress_bar("restoring");
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut logged = std::time::Instant::now();
    let wrote = std::sync::atomic::AtomicBool::new(false);
    let shown = |p: &ublk_dev::restore::Progress| {
        if p.received > 0 {
            wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(format!("{} received", ByteSize(p.received).approx()));
        if !terminal && logged.elapsed() >= std::time::Duration::from_secs(30) && p.done < p.total {
            logged = std::time::Instant::now();
            tracing::info!(
                "restoring: {} of {} compared ({}%), {} received",
                ByteSize(p.done).approx(),
                ByteSize(p.total).approx(),
                p.done * 100 / p.total.max(1),
                ByteSize(p.received).approx()
            );
        }
    };
    let done = ublk_dev::restore::restore(&req, shown);
    bar.finish_and_clear();
    let r = match done {
        // Once under way, it tried again for RETRY_FOR already.
        Err(e) if e.kind() == ErrorKind::Link => {
            return Err(anyhow::Error::new(e).context(format!(
                "the restore to {} stopped: run it again once the mirror can be reached (it compares what the target holds, and moves only what differs; for a time asked for, with --at the snapshot the log names)",
                req.to.display()
            )))
        }
        // Part way: the target is neither what it was nor the version.
        Err(e) if wrote.load(std::sync::atomic::Ordering::Relaxed) => {
            return Err(anyhow::Error::new(e).context(format!(
                "the restore to {} stopped part way: the target holds part of the version; run it again to finish (only what differs moves), or restore another version over it",
                req.to.display()
            )))
        }
        done => done?,
    };
    let version = match &req.at {
        Some(_) => format!("{}@{}", req.volume, r.snapshot),
        None => format!("{} as it is now", req.volume),
    };
    let reconnected = match r.reconnects {
        0 => String::new(),
        1 => ", the link lost and found again once".to_string(),
        n => format!(", the link lost and found again {n} times"),
    };
    println!(
        "restored {version} (epoch {}) to {}: {} blocks received ({} on the wire), {} already the same{reconnected}",
        r.epoch,
        req.to.display(),
        r.blocks_received,
        ByteSize(r.wire_bytes).approx(),
        r.blocks_same
    );
    Ok(())
}

/// `snapshots`: the volume's snapshots, as the server lists them.
fn list_snapshots(volume: &str, utc: bool, json: bool, client_dir: &Path) -> anyhow::Result<()> {
    ublk_mirror_common::proto::check_name(volume)
        .map_err(|e| Error::InvalidConfig(e.to_string()))?;
    let listing = ublk_dev::replicator::list_snapshots(client_dir, volume)?;
    if let Some(note) = &listing.incomplete {
        // Said whatever the log's settings, also beside --json.
        eprintln!("ublk-mirror: warning: {note}");
    }
    let mut out = std::io::stdout().lock();
    if json {
        // The wire's own record is the row (name, epoch, times, kind).
        serde_json::to_writer_pretty(&mut out, &listing.snapshots)?;
        writeln!(out)?;
        return Ok(());
    }
    if listing.snapshots.is_empty() {
        eprintln!(
            "volume {volume} has no snapshots yet: `ublk-mirror snapshot N` takes one (N: the device mirrored to it); a restore without --at restores the mirror as it is now"
        );
        return Ok(());
    }
    writeln!(
        out,
        "{:<28} {:>7} {:<24} KIND",
        "SNAPSHOT", "EPOCH", "SHOWS"
    )?;
    for s in &listing.snapshots {
        writeln!(
            out,
            "{:<28} {:>7} {:<24} {}",
            s.name,
            s.epoch,
            ublk_mirror_common::when::show(s.epoch_ms, utc),
            s.kind
        )?;
    }
    Ok(())
}

/// The volume's name checked, and `--at` made an instant in this
/// machine's time zone (a snapshot's name stays as it is; `now` is no
/// `--at`).
fn version_asked(volume: &str, at: Option<&str>) -> anyhow::Result<Option<String>> {
    ublk_mirror_common::proto::check_name(volume)
        .map_err(|e| Error::InvalidConfig(e.to_string()))?;
    // `now` is the mirror as it is now, as no --at asks (the newest
    // snapshot at or before now would be an older version).
    if at.is_some_and(|a| a.trim().eq_ignore_ascii_case("now")) {
        return Ok(None);
    }
    Ok(at
        .map(ublk_mirror_common::when::resolve_at)
        .transpose()
        .map_err(|e| Error::InvalidConfig(e.to_string()))?)
}

/// Before an on-demand device is made: root and the driver checked, then
/// (with `background`) the process forked, the parent returning with the
/// device's path or the child's failure, then the daemon's own mount
/// namespace. Before any thread exists.
fn start_on_demand_daemon(background: bool) -> anyhow::Result<()> {
    require_root("create block devices")?;
    ublk::check_driver()?;
    if background {
        if let Some(code) = system::background()? {
            std::process::exit(code);
        }
    }
    system::private_mount_namespace(&[])?;
    Ok(())
}

fn attach(args: AttachArgs) -> anyhow::Result<()> {
    use ublk_dev::ondemand::{Fetcher, OnDemandOptions};
    let at = version_asked(&args.volume, args.at.as_deref())?;
    start_on_demand_daemon(args.background)?;
    std::fs::create_dir_all(&args.cache_dir)
        .with_context(|| format!("making {}", args.cache_dir.display()))?;
    let cache_path =
        args.cache_dir
            .join(format!("attach-{}-{}.img", args.volume, std::process::id()));
    let made = std::cell::Cell::new(false);
    let opened = Fetcher::open(
        OnDemandOptions {
            volume: args.volume.clone(),
            at,
            client_dir: args.client_dir.clone(),
            writable: args.writable,
            cache_limit: args.cache.0,
            timeout: (!args.timeout.0.is_zero()).then_some(args.timeout.0),
            fill: None,
        },
        // Made once the server has answered (which may take long), not
        // before: interrupted meanwhile, nothing is left behind. The
        // volume's data: its owner's alone, like the disk it comes from.
        |info| {
            let cache = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&cache_path)
                .map_err(|e| Error::io(format!("making the cache {}", cache_path.display()), e))?;
            made.set(true);
            cache
                .set_len(info.size)
                .map_err(|e| Error::io("sizing the cache", e))?;
            Ok((cache, true))
        },
    );
    let fetcher = match opened {
        Ok(f) => f,
        Err(e) => {
            // Only this one's own (another's of that name stays).
            if made.get() {
                let _ = std::fs::remove_file(&cache_path);
            }
            return Err(e.into());
        }
    };
    let info = fetcher.shared().info().clone();
    // The device opens the cache by its path, which then goes: a killed
    // daemon leaves nothing behind.
    let backing = Backing::open(&BackingOptions {
        path: &cache_path,
        size: Some(info.size),
        create: false,
        block_size: 512,
        direct_io: false,
    });
    let _ = std::fs::remove_file(&cache_path);
    let record = ublk::AttachRecord {
        volume: args.volume.clone(),
        snapshot: info.snapshot.clone(),
        writable: args.writable,
        fill_state: None,
        client_dir: Some(args.client_dir.clone()),
        timeout_ms: None,
        fill_rate: None,
    };
    serve_on_demand(OnDemandRun {
        spec: on_demand_spec(
            &cache_path,
            info.size,
            format!("{}@{}", args.volume, info.snapshot),
            args.id,
        ),
        backing: backing?,
        fetcher,
        record,
        start: Start::Add,
        background: args.background,
        verb: "attached",
    })
}

/// The settings of a device served on demand.
fn on_demand_spec(backing: &Path, size: u64, name: String, id: Option<u32>) -> DeviceSpec {
    DeviceSpec {
        backing: backing.to_path_buf(),
        size: Some(size),
        name,
        id,
        queues: 1,
        depth: 64,
        logical_block_size: 512,
        direct_io: false,
        tracking: TrackingSpec {
            state_dir: PathBuf::from("/nonexistent"),
            region_size: 1 << 20,
            enabled: false,
            cow_memory: 0,
        },
        mirror: None,
    }
}

/// A device served on demand, ready to start.
struct OnDemandRun {
    spec: DeviceSpec,
    backing: Backing,
    fetcher: ublk_dev::ondemand::Fetcher,
    record: ublk::AttachRecord,
    start: Start,
    background: bool,
    verb: &'static str,
}

fn serve_on_demand(run: OnDemandRun) -> anyhow::Result<()> {
    let od = run.fetcher.shared().clone();
    let info = od.info().clone();
    let fetcher = run.fetcher;
    let fetching = std::thread::Builder::new()
        .name("fetcher".into())
        .spawn(move || fetcher.run())
        .context("starting the fetcher")?;
    let background = run.background;
    let verb = run.verb;
    let summary = format!(
        "{}@{} (epoch {}, {}){}",
        run.record.volume,
        info.snapshot,
        info.epoch,
        ByteSize(info.size).approx(),
        if run.record.writable && run.record.fill_state.is_none() {
            ", writable"
        } else {
            ""
        }
    );
    let progress_od = od.clone();
    let filling = run.record.fill_state.is_some();
    let on_ready = move |ready: &Ready| {
        tracing::info!("{verb} {summary} as {}", ready.device.display());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", ready.device.display());
        let _ = out.flush();
        drop(out);
        if background {
            let log = PathBuf::from(format!(
                "{}/{:04}.{verb}.log",
                ublk_dev::status::STATUS_DIR,
                ready.id
            ));
            system::detach_output(&log);
        } else if filling {
            show_fill_progress(progress_od);
        }
        system::sd_notify(&format!(
            "READY=1\nSTATUS={verb} {}",
            ready.device.display()
        ));
    };
    let served = ublk::serve_on_demand(
        &run.spec,
        &run.backing,
        run.start,
        od.clone(),
        run.record,
        on_ready,
    );
    od.stop();
    let _ = fetching.join();
    served.with_context(|| format!("{verb} {}", run.spec.name))?;
    Ok(())
}

/// A progress bar for a fill in the foreground, on a terminal.
fn show_fill_progress(od: std::sync::Arc<ublk_dev::ondemand::OnDemand>) {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let bar = progress_bar("filling");
            loop {
                let s = od.status();
                bar.set_length(s.size);
                bar.set_position(s.size - s.remaining_bytes);
                bar.set_message(format!(
                    "{} fetched, {}/s",
                    ByteSize(s.fetched_bytes).approx(),
                    ByteSize(s.rate).approx()
                ));
                if s.filled {
                    bar.finish_with_message("every block is local");
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        });
}

/// Where an instant restore of `target` keeps its fill state: a readable
/// name, and a checksum of the whole path (two paths never share one).
fn fill_state_path(state_dir: &Path, target: &Path) -> PathBuf {
    let path = target.to_string_lossy();
    let name: String = path
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let sum = crc32c::crc32c(path.as_bytes());
    state_dir.join(format!("{name}-{sum:08x}.fill"))
}

/// The live fill state beside `state` (on /run: gone at a reboot).
fn live_fill_state_path(state: &Path) -> PathBuf {
    let dir = PathBuf::from(ublk_dev::status::STATUS_DIR).join("restore");
    let _ = std::fs::create_dir_all(&dir);
    let name = state
        .file_name()
        .map_or_else(|| "fill".into(), |n| n.to_string_lossy().into_owned());
    dir.join(format!("{name}.live"))
}

/// `path` resolved as the device records its backing file (`recover`
/// finds the restore by it): symlinks followed (`/dev/vg/lv`,
/// `/dev/disk/by-id/...`), or, for a file not made yet, its directory's.
fn resolved_target(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    match std::fs::canonicalize(&absolute) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (Some(dir), Some(name)) = (absolute.parent(), absolute.file_name()) else {
                anyhow::bail!("{}: not a file's path", path.display());
            };
            let dir = std::fs::canonicalize(dir)
                .with_context(|| format!("the directory of {}", path.display()))?;
            Ok(dir.join(name))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("resolving {}", path.display()))),
    }
}

/// `restore --instant`: the target served at once, filled from the mirror.
fn instant_restore(args: InstantArgs) -> anyhow::Result<()> {
    use ublk_dev::ondemand::{Fetcher, FillOptions, OnDemandOptions};
    let at = version_asked(&args.volume, args.at.as_deref())?;
    let target = resolved_target(&args.to)?;
    start_on_demand_daemon(args.background)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("making {}", args.state_dir.display()))?;
    let state = fill_state_path(&args.state_dir, &target);
    if let Some(why) = ublk_dev::ondemand::finished(&state, &target) {
        return Err(Error::InvalidConfig(why).into());
    }
    let timeout = (!args.timeout.0.is_zero()).then_some(args.timeout.0);
    let mut opened_backing = None;
    let fetcher = Fetcher::open(
        OnDemandOptions {
            volume: args.volume.clone(),
            at,
            client_dir: args.client_dir.clone(),
            writable: true,
            cache_limit: u64::MAX,
            timeout,
            fill: Some(FillOptions {
                live: live_fill_state_path(&state),
                state: state.clone(),
                target: target.clone(),
                rate: args.fill_rate.map(|r| r.0),
            }),
        },
        |info| {
            // An empty file (made for the restore) is a new target, as a
            // missing one is: sized, all zeroes.
            let empty = std::fs::metadata(&target).is_ok_and(|m| m.is_file() && m.len() == 0);
            if empty {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&target)
                    .and_then(|f| f.set_len(info.size))
                    .map_err(|e| Error::io(format!("sizing {}", target.display()), e))?;
            }
            let backing = open_backing(
                &on_demand_spec(&target, info.size, String::new(), None),
                true,
            )
            .map_err(|e| Error::InvalidConfig(format!("{e:#}")))?;
            // An open file of its own (see `fsutil::reopen`): the fill
            // state's syncs and the device's FLUSH each see a write-back
            // error.
            let file = ublk_mirror_common::fsutil::reopen(backing.file())
                .map_err(|e| Error::io("opening the target", e))?;
            let fresh = backing.created() || empty;
            opened_backing = Some(backing);
            Ok((file, fresh))
        },
    )?;
    let backing = opened_backing.context("the target was not opened")?;
    let info = fetcher.shared().info().clone();
    let record = ublk::AttachRecord {
        volume: args.volume.clone(),
        snapshot: info.snapshot.clone(),
        writable: true,
        fill_state: Some(state),
        client_dir: Some(args.client_dir.clone()),
        timeout_ms: timeout.map(|t| t.as_millis() as u64),
        fill_rate: args.fill_rate.map(|r| r.0),
    };
    let name = format!("restore-{}", args.volume);
    let mut spec = on_demand_spec(&target, info.size, name, args.id);
    if args.mirror {
        // Tracked from the first write, and the volume's writer before
        // the device exists: the device that wrote it is fenced off.
        // Its journal where `add --backing TARGET --mirror VOLUME` finds
        // it later (the same device, the volume's writer).
        let mirrored = DeviceConfig {
            backing: Some(target.clone()),
            mirror: Some(args.volume.clone()),
            client_dir: Some(args.client_dir.clone()),
            ..DeviceConfig::default()
        }
        .validate()?;
        spec.tracking = mirrored.tracking;
        spec.mirror = mirrored.mirror;
        // Started again where the mirror cannot be reached (the fetcher
        // found so): no second wait for it. Either way, the take-over is
        // marked to do until the server took it, and the replicator does
        // it before this device mirrors.
        let taken = if fetcher.shared().status().link_up {
            ublk_dev::replicator::take_over(
                &args.client_dir,
                &args.volume,
                info.size,
                &spec.tracking.state_dir,
            )
            .map(Some)
        } else {
            ublk_dev::replicator::take_over_later(&spec.tracking.state_dir, &args.volume)
        };
        let later = "this device takes it over when it can, before it mirrors";
        match taken {
            Ok(Some(epoch)) => tracing::info!(
                volume = %args.volume,
                epoch,
                "this device is the volume's writer; it mirrors once every block is here"
            ),
            Ok(None) => tracing::warn!(
                volume = %args.volume,
                "the mirror cannot be reached to take the volume over: {later}"
            ),
            Err(e) if e.kind() == ublk_dev::ErrorKind::Link => tracing::warn!(
                volume = %args.volume,
                "the mirror cannot be reached to take the volume over ({e}): {later}"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    serve_on_demand(OnDemandRun {
        spec,
        backing,
        fetcher,
        record,
        start: Start::Add,
        background: args.background,
        verb: "restoring",
    })
}

/// Recover an instant restore whose daemon died: the fill goes on from
/// its state; a restore that had finished is an ordinary device.
fn recover_instant(
    id: u32,
    record: TargetRecord,
    attach: ublk::AttachRecord,
) -> anyhow::Result<()> {
    use ublk_dev::ondemand::{Fetcher, FillOptions, OnDemandOptions};
    let info = ublk::info(id)?;
    let Some(state) = attach.fill_state.clone() else {
        anyhow::bail!("device {id} is not an instant restore");
    };
    // A restore that mirrors keeps its tracking and mirror settings.
    let spec = if record.mirror.is_some() {
        spec_for_recovery(id, &record, &info)
    } else {
        let mut spec = on_demand_spec(&record.backing, record.size, record.name.clone(), Some(id));
        spec.queues = info.queues;
        spec.depth = info.depth;
        spec
    };
    let backing = open_backing(&spec, false)?;
    system::private_mount_namespace(&[backing.resolved_path(), &spec.tracking.state_dir])?;
    if !state.exists() {
        // Filled before the daemon died: an ordinary device, mirrored if
        // it was to be.
        if spec.mirror.is_some() {
            ublk_dev::replicator::restore_filled(&spec.tracking.state_dir)?;
        }
        let served = Arc::new(AtomicBool::new(false));
        return run_device(&spec, &backing, Start::Recover(id), None, served);
    }
    let file = ublk_mirror_common::fsutil::reopen(backing.file())?;
    let fetcher = Fetcher::open(
        OnDemandOptions {
            volume: attach.volume.clone(),
            at: Some(attach.snapshot.clone()),
            client_dir: attach
                .client_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(ublk_dev::enrollment::DEFAULT_CLIENT_DIR)),
            writable: true,
            cache_limit: u64::MAX,
            timeout: attach.timeout_ms.map(std::time::Duration::from_millis),
            fill: Some(FillOptions {
                live: live_fill_state_path(&state),
                state,
                target: record.backing.clone(),
                rate: attach.fill_rate,
            }),
        },
        |_| Ok((file, false)),
    )?;
    serve_on_demand(OnDemandRun {
        spec,
        backing,
        fetcher,
        record: attach,
        start: Start::Recover(id),
        background: false,
        verb: "restoring",
    })
}

/// A device named by its id (`3`) or its path (`/dev/ublkb3`, as `add`
/// prints it).
fn device_id(s: &str) -> Result<u32, String> {
    s.strip_prefix("/dev/ublkb")
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("{s:?}: give a device id (N) or its path, /dev/ublkbN"))
}

fn detach(device: &str) -> anyhow::Result<()> {
    require_root("delete block devices")?;
    let id = device_id(device).map_err(Error::InvalidConfig)?;
    let d = ublk::info(id)?;
    if d.record
        .as_ref()
        .and_then(|r| r.attached.as_ref())
        .is_none()
    {
        return Err(Error::DeviceState {
            id,
            reason: "it is not an attached version (see `ublk-mirror list`; `del` deletes devices)"
                .into(),
        }
        .into());
    }
    ublk::delete(id)?;
    println!("detached {}", d.device.display());
    Ok(())
}

fn epoch(command: EpochCommand) -> anyhow::Result<()> {
    require_root("control devices")?;
    match command {
        EpochCommand::Seal { id, now, timeout } => {
            let epoch = Client::for_device(id).seal((!now).then_some(timeout.0))?;
            println!("{epoch}");
        }
        EpochCommand::List { id, json } => {
            let list = Client::for_device(id).epochs()?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &list)?;
                writeln!(out)?;
                return Ok(());
            }
            writeln!(
                out,
                "current epoch {}, last released {}",
                list.current, list.released
            )?;
            let rows = list.sealed.iter().map(|e| {
                [
                    e.id.to_string(),
                    ByteSize(e.data_bytes).approx(),
                    ByteSize(e.zeroed_bytes).approx(),
                    ByteSize(e.resync_bytes).approx(),
                    if e.at_flush { "flush" } else { "at once" }.to_string(),
                    e.broken
                        .as_deref()
                        .map_or_else(|| "ok".to_string(), |b| format!("broken: {b}")),
                ]
            });
            print_table(
                &mut out,
                ["EPOCH", "DATA", "ZEROED", "RESYNC", "CUT AT", "STATE"],
                [5, 10, 10, 10, -7, 0],
                rows,
            )?;
        }
        EpochCommand::Apply { id, epoch, to } => apply_epoch(id, epoch, &to)?,
        EpochCommand::Release { id, epoch } => {
            let r = Client::for_device(id).release(epoch)?;
            if !r.released {
                println!("epoch {epoch} was released before; nothing to do");
            } else {
                println!(
                    "released epoch {epoch}; {} regions cleared{}",
                    r.regions_cleared,
                    if r.resync_done {
                        "; the resync is settled"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}

fn apply_epoch(id: u32, epoch: u64, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let size = ublk::info(id)?
        .record
        .map(|r| r.size)
        .with_context(|| format!("device {id} is not a ublk-mirror device"))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("opening {}", to.display()))?;
    let have = file.metadata()?.len();
    if have == 0 {
        file.set_len(size)?;
    } else if have != size {
        anyhow::bail!(
            "{} is {have} bytes but the device is {size}: not a copy of it",
            to.display()
        );
    }
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut done = 0u64;
    let mut last = std::time::Instant::now();
    let bytes = Client::for_device(id).read(epoch, |x, data| {
        let io = |e| Error::io(format!("writing {}", to.display()), e);
        match data {
            Some(d) => file.write_all_at(d, x.offset).map_err(io)?,
            None => fsutil::punch_or_zero(&file, x.offset, x.len).map_err(io)?,
        }
        done += x.len;
        if progress && last.elapsed() >= std::time::Duration::from_millis(500) {
            last = std::time::Instant::now();
            eprint!("\r{} applied", ByteSize(done).approx());
        }
        Ok(())
    })?;
    file.sync_all()
        .with_context(|| format!("syncing {}", to.display()))?;
    if progress {
        eprint!("\r");
    }
    println!(
        "epoch {epoch}: {} applied to {}",
        ByteSize(bytes).approx(),
        to.display()
    );
    Ok(())
}

fn add(args: &AddArgs) -> anyhow::Result<()> {
    let file_config = match &args.config {
        Some(path) => DeviceConfig::load(path)?,
        None => DeviceConfig::default(),
    };
    let spec = file_config.overridden_by(args.to_config()).validate()?;
    require_root("create block devices")?;
    let config = args
        .config
        .as_deref()
        .map(std::path::absolute)
        .transpose()?;
    if let Some((id, record, info)) = leftover_device(&spec)? {
        tracing::info!(
            id,
            "found this device left behind by a stopped daemon: recovering it"
        );
        let recovered = spec_for_recovery(id, &record, &info);
        warn_if_changed(&spec, &recovered);
        let backing = open_backing(&recovered, false)?;
        let served = Arc::new(AtomicBool::new(false));
        return run_device(&recovered, &backing, Start::Recover(id), config, served);
    }
    let mut backing = open_backing(&spec, true)?;
    let new_state_dir =
        Some(spec.tracking.state_dir.clone()).filter(|dir| spec.tracking.enabled && !dir.exists());
    let served = Arc::new(AtomicBool::new(false));
    let result = ublk::check_driver()
        .map_err(anyhow::Error::from)
        .and_then(|()| run_device(&spec, &backing, Start::Add, config, served.clone()));
    // A backing file created for a device that never came up holds nothing.
    if result.is_err() && !served.load(Ordering::SeqCst) {
        backing.discard_if_created();
        // So is the journal made for it.
        if let Some(dir) = new_state_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    result
}

fn recover(id: u32) -> anyhow::Result<()> {
    require_root("recover block devices")?;
    let record = ublk::recoverable(id)?;
    if let Some(attach) = record.attached.clone() {
        return recover_instant(id, record, attach);
    }
    let spec = spec_for_recovery(id, &record, &ublk::info(id)?);
    let backing = open_backing(&spec, false)?;
    let served = Arc::new(AtomicBool::new(false));
    run_device(&spec, &backing, Start::Recover(id), record.config, served)
}

fn require_root(action: &'static str) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot(action).into())
    }
}

/// A recovered device keeps what the kernel and its record say: its queues,
/// depth, block size and size cannot change while it exists.
fn spec_for_recovery(id: u32, record: &TargetRecord, info: &DeviceInfo) -> DeviceSpec {
    DeviceSpec {
        backing: record.backing.clone(),
        size: Some(record.size),
        name: record.name.clone(),
        id: Some(id),
        queues: info.queues,
        depth: info.depth,
        logical_block_size: record.logical_block_size,
        direct_io: record.direct_io,
        // A record from before tracking (version 1) had none.
        tracking: record.tracking.clone().unwrap_or_else(|| TrackingSpec {
            state_dir: PathBuf::from(format!("{}.ublk-mirror", record.backing.display())),
            region_size: ublk_dev::journal::DEFAULT_REGION_SIZE,
            enabled: false,
            cow_memory: ublk_dev::epoch::DEFAULT_COW_MEMORY,
        }),
        mirror: record.mirror.clone(),
    }
}

fn warn_if_changed(asked: &DeviceSpec, kept: &DeviceSpec) {
    let pairs = [
        ("queues", u64::from(asked.queues), u64::from(kept.queues)),
        ("depth", u64::from(asked.depth), u64::from(kept.depth)),
        (
            "logical block size",
            u64::from(asked.logical_block_size),
            u64::from(kept.logical_block_size),
        ),
    ];
    for (what, a, k) in pairs {
        if a != k {
            tracing::warn!("the recovered device keeps its {what} {k} (asked for {a}); delete and add it again to change it");
        }
    }
}

/// Open the backing file (creating it only if `create`), naming the device
/// that holds it if it is locked.
fn open_backing(spec: &DeviceSpec, create: bool) -> anyhow::Result<Backing> {
    let opened = Backing::open(&BackingOptions {
        path: &spec.backing,
        size: spec.size,
        create,
        block_size: spec.logical_block_size,
        direct_io: spec.direct_io,
    });
    let holder = |d: DeviceInfo| {
        format!(
            ": ublk-mirror device {}, {}, pid {}",
            d.id,
            d.device.display(),
            d.pid
        )
    };
    match opened {
        Err(Error::BackingInUse { path, .. }) => {
            let holder = holder_of(&path).map(holder).unwrap_or_default();
            Err(Error::BackingInUse { path, holder }.into())
        }
        // A block device another of our devices holds is refused by its
        // exclusive open (EBUSY) before the lock: say who holds it too.
        Err(Error::BackingUnusable { path, reason }) if reason.starts_with("it is in use") => {
            Err(match holder_of(&path) {
                Some(d) => Error::BackingInUse {
                    holder: holder(d),
                    path,
                },
                None => Error::BackingUnusable { path, reason },
            }
            .into())
        }
        other => Ok(other?),
    }
}

fn holder_of(path: &Path) -> Option<DeviceInfo> {
    let path = std::fs::canonicalize(path).ok()?;
    ublk::list()
        .ok()?
        .into_iter()
        .find(|d| d.record.as_ref().is_some_and(|r| r.backing == path))
}

/// A quiesced ublk-mirror device on this backing file, left by a killed
/// daemon. Paths are compared canonically, so another name for the same file
/// still finds it.
fn leftover_device(spec: &DeviceSpec) -> anyhow::Result<Option<(u32, TargetRecord, DeviceInfo)>> {
    if ublk::check_driver().is_err() {
        return Ok(None);
    }
    // A device can only be recovered onto the file it was using.
    let backing = std::fs::canonicalize(&spec.backing).ok();
    let same = |d: &DeviceInfo| {
        d.record
            .as_ref()
            .is_some_and(|r| Some(&r.backing) == backing.as_ref())
    };
    let candidate = match spec.id {
        Some(id) => match ublk::info(id) {
            Err(Error::NoSuchDevice(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
            Ok(d) if d.is_ours() && same(&d) => d,
            Ok(d) => {
                return Err(Error::DeviceState {
                    id,
                    reason: format!(
                        "the id is taken by another device ({}, {}); pick another --id",
                        d.record.map_or_else(
                            || d.target.unwrap_or_else(|| "unknown".into()),
                            |r| r.backing.display().to_string()
                        ),
                        d.state.as_str()
                    ),
                }
                .into())
            }
        },
        None if backing.is_none() => return Ok(None),
        None => match ublk::list()?.into_iter().find(|d| {
            d.is_ours() && same(d) && d.state == ublk::DeviceState::Quiesced && d.recoverable
        }) {
            Some(d) => d,
            None => return Ok(None),
        },
    };
    if candidate.state == ublk::DeviceState::Live {
        // Its daemon holds the file: opening it will say who.
        return Ok(None);
    }
    let record = ublk::recoverable(candidate.id)?;
    Ok(Some((candidate.id, record, candidate)))
}

fn run_device(
    spec: &DeviceSpec,
    backing: &Backing,
    start: Start,
    config: Option<PathBuf>,
    served: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    system::private_mount_namespace(&[backing.resolved_path(), &spec.tracking.state_dir])?;
    let direct = if backing.direct_io() {
        "O_DIRECT"
    } else {
        "buffered"
    };
    let summary = format!(
        "{} on {} ({}, {} bytes, {}-byte blocks, {} queues x {})",
        spec.name,
        backing.path().display(),
        direct,
        backing.size(),
        spec.logical_block_size,
        spec.queues,
        spec.depth
    );
    let on_ready = move |ready: &Ready| {
        served.store(true, Ordering::SeqCst);
        let verb = if ready.recovered {
            "recovered"
        } else {
            "serving"
        };
        let copy = if ready.zero_copy {
            "zero copy"
        } else {
            "copying"
        };
        tracing::info!("{verb} {} as {}, {copy}", summary, ready.device.display());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", ready.device.display());
        let _ = out.flush();
        system::sd_notify(&format!(
            "READY=1\nSTATUS={verb} {}",
            ready.device.display()
        ));
    };
    ublk::serve(spec, backing, start, config, on_ready)
        .with_context(|| format!("device {}", spec.name))?;
    system::sd_notify("STOPPING=1");
    Ok(())
}

fn list(json: bool) -> anyhow::Result<()> {
    require_root("list devices")?;
    let devices = ublk::list()?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &devices)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows = devices.iter().map(|d| {
        let (name, size, backing) = match &d.record {
            Some(r) => (
                r.name.clone(),
                ByteSize(r.size).to_string(),
                r.backing.display().to_string(),
            ),
            None => (
                format!("({})", d.target.as_deref().unwrap_or("other")),
                "-".into(),
                "-".into(),
            ),
        };
        let state = d.state.as_str().to_string();
        [
            d.id.to_string(),
            d.device.display().to_string(),
            name,
            state,
            d.pid.to_string(),
            size,
            backing,
        ]
    });
    print_table(
        &mut out,
        ["ID", "DEVICE", "NAME", "STATE", "PID", "SIZE", "BACKING"],
        [-4, -13, -16, -9, 8, 9, 0],
        rows,
    )
}

/// Print aligned columns: a width per column (negative: left-aligned; 0:
/// as wide as it is, for the last one).
fn print_table<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    widths: [i32; N],
    rows: impl Iterator<Item = [String; N]>,
) -> anyhow::Result<()> {
    let line = |out: &mut dyn Write, cells: [&str; N]| -> std::io::Result<()> {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| {
                let width = w.unsigned_abs() as usize;
                if w < 0 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        writeln!(out, "{}", parts.join(" "))
    };
    line(out, header)?;
    for row in rows {
        line(out, row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

/// The MIRROR cell of `status`: the link, how much of the epoch or round
/// being sent has gone, and whether a first sync or resync is held back
/// for the device's own I/O.
fn mirror_cell(m: &ublk_dev::replicator::MirrorStatus) -> String {
    let mut notes = Vec::new();
    if m.sending_bytes > 0 {
        let done = m.sending_done.min(m.sending_bytes);
        notes.push(format!(
            "sending {}%",
            done as u128 * 100 / u128::from(m.sending_bytes)
        ));
    }
    if m.yielding {
        notes.push("sync yields".to_string());
    }
    if notes.is_empty() {
        m.link.clone()
    } else {
        format!("{} ({})", m.link, notes.join(", "))
    }
}

/// `ublk-mirror metrics`: every device's status as Prometheus metrics.
fn metrics(textfile: Option<PathBuf>) -> anyhow::Result<()> {
    require_root("read device status")?;
    let devices: Vec<ublk_dev::metrics::Device> = ublk::list()?
        .into_iter()
        .filter(DeviceInfo::is_ours)
        .map(|d| ublk_dev::metrics::Device {
            device: d.device.file_name().map_or_else(
                || d.device.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            name: d
                .record
                .as_ref()
                .map_or_else(String::new, |r| r.name.clone()),
            status: ublk_dev::status::read(d.id),
        })
        .collect();
    let text = ublk_dev::metrics::render(&devices);
    match textfile {
        Some(path) => ublk_dev::metrics::write_textfile(&path, &text)
            .with_context(|| format!("writing {}", path.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// A bar of bytes for long work, drawn on stderr when it is a terminal
/// (hidden otherwise: logs and scripts see only the result).
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {percent:>3}% of {total_bytes}  {binary_bytes_per_sec}  {eta} left  {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}

/// `sync`, with a bar of the bytes the mirror still lacks (from the
/// device's published status) while it waits.
fn sync_with_progress(
    id: u32,
    timeout: std::time::Duration,
) -> anyhow::Result<ublk_dev::control::SyncReply> {
    let bar = progress_bar("syncing");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (bar, done) = (bar.clone(), done.clone());
        std::thread::spawn(move || {
            let mut total = 0;
            while !done.load(Ordering::Acquire) {
                let mirror = ublk_dev::status::read(id).and_then(|s| s.mirror);
                let (length, done) = sync_bar(mirror.as_ref(), &mut total);
                bar.set_length(length);
                bar.set_position(done);
                bar.set_message(mirror.as_ref().map_or_else(String::new, sync_note));
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        })
    };
    let r = Client::for_device(id).sync(timeout);
    done.store(true, Ordering::Release);
    let _ = watcher.join();
    bar.finish_and_clear();
    Ok(r?)
}

/// The sync bar's length and position: the epoch (or pre-copy round)
/// being sent and how much of it went, while one is; otherwise the most
/// the mirror lacked since the sync began (`most`) and what of it it has
/// since (what is not published yet stays behind until the epoch that
/// carries it is: a first sync's rounds and cut all at once).
fn sync_bar(m: Option<&ublk_dev::replicator::MirrorStatus>, most: &mut u64) -> (u64, u64) {
    let behind = m.map_or(0, |m| m.bytes_behind);
    *most = (*most).max(behind);
    match m {
        Some(m) if m.sending_bytes > 0 => (m.sending_bytes, m.sending_done.min(m.sending_bytes)),
        _ => (*most, *most - behind),
    }
}

/// Why a sync goes slower than the link could, for its bar: the mirror
/// out of reach, or a first sync (or resync) giving way to the device's
/// own I/O; how many pre-copy rounds wait on the server for the cut
/// that publishes them. Empty when there is nothing to say.
fn sync_note(m: &ublk_dev::replicator::MirrorStatus) -> String {
    if m.link != "connected" {
        return match &m.last_error {
            Some(why) => format!("mirror {}: {why}", m.link),
            None => format!("mirror {}", m.link),
        };
    }
    let rounds = match m.precopy_rounds {
        0 => None,
        1 => Some("1 pre-copy round staged".to_string()),
        n => Some(format!("{n} pre-copy rounds staged")),
    };
    let yields = m
        .yielding
        .then_some("giving way to the device's I/O (--mirror-min-rate)");
    // Connected, but what it ships failed since the last publication.
    let failing = m.last_error.as_ref().map(|e| format!("last failure: {e}"));
    rounds
        .into_iter()
        .chain(yields.map(String::from))
        .chain(failing)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How long changes of a mirrored device have waited for the mirror, as
/// of now: the lag it last published plus the time since (its daemon may
/// have died meanwhile); `None` when it is not mirrored.
fn mirror_behind_ms(s: &DeviceStatus, now_ms: u64) -> Option<u64> {
    let m = s.mirror.as_ref()?;
    if m.lag_ms == 0 && m.bytes_behind == 0 {
        return Some(0);
    }
    Some(m.lag_ms + now_ms.saturating_sub(s.updated_ms))
}

/// Show the devices (see the command's help); how many mirrors are stale.
fn status(json: bool, stale: Span) -> anyhow::Result<usize> {
    require_root("read device status")?;
    let now = ublk_mirror_common::clock::now_ms();
    let limit = stale.0.as_millis() as u64;
    let devices: Vec<(DeviceInfo, Option<DeviceStatus>)> = ublk::list()?
        .into_iter()
        .filter(DeviceInfo::is_ours)
        .map(|d| {
            let s = ublk_dev::status::read(d.id);
            (d, s)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<serde_json::Value> = devices
            .iter()
            .map(|(d, s)| {
                let behind = s.as_ref().and_then(|s| mirror_behind_ms(s, now));
                serde_json::json!({
                    "id": d.id,
                    "device": d.device,
                    "name": d.record.as_ref().map(|r| &r.name),
                    "state": d.state.as_str(),
                    "status": s,
                    "mirror_behind_ms": behind,
                    "stale": behind.is_some_and(|b| b >= limit),
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(rows.iter().filter(|r| r["stale"] == true).count());
    }
    let rows = devices.iter().map(|(d, s)| {
        let name = d
            .record
            .as_ref()
            .map_or("-", |r| r.name.as_str())
            .to_string();
        let (link, lag) = match s.as_ref().and_then(|s| s.mirror.as_ref()) {
            Some(m) => (mirror_cell(m), format!("{:.1}s", m.lag_ms as f64 / 1000.0)),
            None => ("-".to_string(), "-".to_string()),
        };
        let [dirty, zeroed, regions, epoch, oldest, resync, journal] =
            match s.as_ref().map(|s| &s.tracking) {
                Some(Some(t)) => [
                    ByteSize(t.dirty_bytes).approx(),
                    ByteSize(t.zeroed_bytes).approx(),
                    t.regions_marked.to_string(),
                    t.current_epoch.to_string(),
                    t.oldest_unreleased_epoch
                        .map_or_else(|| "-".into(), |e| e.to_string()),
                    match (t.resync_bytes, t.resync_pending) {
                        (0, false) => "no".into(),
                        (0, true) => "pending".into(),
                        (n, _) => ByteSize(n).approx(),
                    },
                    t.journal.display().to_string(),
                ],
                Some(None) if s.as_ref().is_some_and(|s| s.attach.is_some()) => {
                    ["-", "-", "-", "-", "-", "-", "(attached: below)"].map(String::from)
                }
                Some(None) => ["-", "-", "-", "-", "-", "-", "(tracking off)"].map(String::from),
                None => ["?", "?", "?", "?", "?", "?", "(no status published)"].map(String::from),
            };
        let state = d.state.as_str().to_string();
        [
            d.id.to_string(),
            d.device.display().to_string(),
            name,
            state,
            dirty,
            zeroed,
            regions,
            epoch,
            oldest,
            resync,
            link,
            lag,
            journal,
        ]
    });
    print_table(
        &mut out,
        [
            "ID", "DEVICE", "NAME", "STATE", "DIRTY", "ZEROED", "REGIONS", "EPOCH", "OLDEST",
            "RESYNC", "MIRROR", "LAG", "JOURNAL",
        ],
        [-4, -13, -16, -9, 10, 10, 8, 6, 6, 7, -12, 7, 0],
        rows,
    )?;
    let attached: Vec<_> = devices
        .iter()
        .filter_map(|(d, s)| Some((d, s.as_ref()?.attach.as_ref()?)))
        .collect();
    if !attached.is_empty() {
        writeln!(out)?;
        let rows = attached.iter().map(|(d, a)| {
            [
                d.id.to_string(),
                d.device.display().to_string(),
                format!("{}@{}", a.volume, a.snapshot),
                match (&a.restore_target, a.filled, a.writable) {
                    (Some(_), true, _) => "filled",
                    (Some(_), false, _) => "filling",
                    (None, _, true) => "writable",
                    (None, _, false) => "read-only",
                }
                .to_string(),
                ByteSize(a.fetched_bytes).approx(),
                ByteSize(a.cached_bytes).approx(),
                ByteSize(a.dirty_bytes).approx(),
                ByteSize(a.remaining_bytes).approx(),
                format!("{}/s", ByteSize(a.rate).approx()),
                if a.link_up { "up" } else { "DOWN" }.to_string(),
                a.waiting.to_string(),
                a.timed_out.to_string(),
            ]
        });
        print_table(
            &mut out,
            [
                "ID",
                "DEVICE",
                "ATTACHED",
                "MODE",
                "FETCHED",
                "CACHED",
                "WRITTEN",
                "REMAINING",
                "RATE",
                "LINK",
                "WAITING",
                "TIMED-OUT",
            ],
            [-4, -13, -24, -9, 9, 9, 9, 10, 10, -5, 8, 0],
            rows,
        )?;
        for (d, a) in &attached {
            if let Some(e) = &a.last_error {
                writeln!(
                    out,
                    "{}: fetching from the mirror fails: {e}",
                    d.device.display()
                )?;
            }
        }
    }
    let mut behind = 0;
    for (d, s) in &devices {
        let Some(s) = s else { continue };
        let name = d.record.as_ref().map_or("-", |r| r.name.as_str());
        let Some(ms) = mirror_behind_ms(s, now).filter(|&ms| ms >= limit) else {
            // Not behind for long yet, but say why mirroring fails.
            if let Some((link, e)) = s
                .mirror
                .as_ref()
                .and_then(|m| Some((&m.link, m.last_error.as_ref()?)))
            {
                writeln!(
                    out,
                    "{} ({name}): mirror {link}, last failure: {e}",
                    d.device.display()
                )?;
            }
            continue;
        };
        behind += 1;
        let why = s
            .mirror
            .as_ref()
            .and_then(|m| m.last_error.clone())
            .map_or_else(String::new, |e| format!(" (last error: {e})"));
        writeln!(
            out,
            "{} ({name}): NOT BACKED UP for {}: changes that old are only on this machine{why}",
            d.device.display(),
            Span(std::time::Duration::from_millis(ms)).approx(),
        )?;
    }
    Ok(behind)
}

fn del(id: Option<u32>, all: bool, force: bool) -> anyhow::Result<()> {
    require_root("delete block devices")?;
    let ids: Vec<u32> = if all {
        ublk::list()?
            .into_iter()
            .filter(DeviceInfo::is_ours)
            .map(|d| d.id)
            .collect()
    } else {
        let id = id.context("give a device id or --all")?;
        let d = ublk::info(id)?;
        if let Err(reason) = d.deletable(force) {
            return Err(Error::DeviceState { id, reason }.into());
        }
        vec![id]
    };
    if !force {
        // Nothing is deleted when one of them is in use.
        for &id in &ids {
            let live = ublk::info(id).is_ok_and(|d| d.state == ublk::DeviceState::Live);
            if live && ublk::in_use(id) {
                return Err(Error::DeviceState {
                    id,
                    reason: format!(
                        "/dev/ublkb{id} is in use (mounted, or held by LVM, md or a VM): unmount it first (or --force, and the file system fails its later writes)"
                    ),
                }
                .into());
            }
        }
    }
    for id in ids {
        ublk::delete(id)?;
        println!("deleted /dev/ublkb{id}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublk_dev::replicator::MirrorStatus;

    /// A restore's target is recorded as the device records its backing
    /// file (resolved), whether it exists yet or not, so that `recover`
    /// finds its fill state.
    #[test]
    fn a_restore_target_is_resolved_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("vg")).unwrap();
        std::fs::write(real.join("vg/lv-real"), b"").unwrap();
        std::os::unix::fs::symlink(real.join("vg/lv-real"), real.join("vg/lv")).unwrap();
        std::os::unix::fs::symlink(real.join("vg"), real.join("link")).unwrap();
        assert_eq!(
            resolved_target(&real.join("link/lv")).unwrap(),
            real.join("vg/lv-real")
        );
        assert_eq!(
            resolved_target(&real.join("link/new.img")).unwrap(),
            real.join("vg/new.img"),
            "a target not made yet"
        );
        assert!(resolved_target(&real.join("none/new.img")).is_err());
    }

    /// The sync bar follows the epoch being sent while one is (what is
    /// behind falls only once it is published), and what is behind
    /// otherwise.
    #[test]
    fn the_sync_bar_follows_the_epoch_being_sent() {
        let m = |behind, sending, done| MirrorStatus {
            bytes_behind: behind,
            sending_bytes: sending,
            sending_done: done,
            ..Default::default()
        };
        let mut most = 0;
        assert_eq!(sync_bar(Some(&m(800, 0, 0)), &mut most), (800, 0));
        assert_eq!(sync_bar(Some(&m(900, 600, 150)), &mut most), (600, 150));
        assert_eq!(sync_bar(Some(&m(900, 600, 700)), &mut most), (600, 600));
        // Between epochs: against the most that was behind.
        assert_eq!(sync_bar(Some(&m(300, 0, 0)), &mut most), (900, 600));
        assert_eq!(sync_bar(None, &mut most), (900, 900));
    }

    /// `status` says how far the epoch being sent is, and that a first
    /// sync yields, beside the link.
    #[test]
    fn the_status_mirror_cell_says_how_far_a_send_is() {
        let m = |sending, done, yielding| MirrorStatus {
            link: "connected".into(),
            sending_bytes: sending,
            sending_done: done,
            yielding,
            ..Default::default()
        };
        assert_eq!(mirror_cell(&m(0, 0, false)), "connected");
        assert_eq!(mirror_cell(&m(0, 0, true)), "connected (sync yields)");
        assert_eq!(
            mirror_cell(&m(8 << 30, 3 << 30, false)),
            "connected (sending 37%)"
        );
        assert_eq!(
            mirror_cell(&m(1000, 2000, true)),
            "connected (sending 100%, sync yields)"
        );
    }

    /// The sync bar says what holds a sync back, and nothing when nothing
    /// does.
    #[test]
    fn the_sync_bar_says_why_a_sync_is_slow() {
        let m = |link: &str, rounds, yielding| MirrorStatus {
            link: link.into(),
            precopy_rounds: rounds,
            yielding,
            ..Default::default()
        };
        assert_eq!(sync_note(&m("connected", 0, false)), "");
        assert_eq!(
            sync_note(&m("connected", 0, true)),
            "giving way to the device's I/O (--mirror-min-rate)"
        );
        assert_eq!(
            sync_note(&m("connected", 2, true)),
            "2 pre-copy rounds staged, giving way to the device's I/O (--mirror-min-rate)"
        );
        assert_eq!(
            sync_note(&m("connected", 1, false)),
            "1 pre-copy round staged"
        );
        let mut down = m("disconnected", 3, true);
        assert_eq!(sync_note(&down), "mirror disconnected");
        down.last_error = Some("connection refused".into());
        assert_eq!(sync_note(&down), "mirror disconnected: connection refused");
        let mut refused = m("connected", 1, false);
        refused.last_error = Some("the server's disk is full".into());
        assert_eq!(
            sync_note(&refused),
            "1 pre-copy round staged, last failure: the server's disk is full"
        );
    }

    #[test]
    fn a_mirror_is_behind_by_its_lag_plus_the_time_its_daemon_was_silent() {
        let at = |lag_ms, bytes_behind| DeviceStatus {
            id: 0,
            pid: 1,
            updated_ms: 10_000,
            reads: 0,
            writes: 0,
            errors: 0,
            tracking: None,
            mirror: Some(MirrorStatus {
                lag_ms,
                bytes_behind,
                ..MirrorStatus::default()
            }),
            attach: None,
        };
        // Nothing to ship: never behind, however old the status.
        assert_eq!(mirror_behind_ms(&at(0, 0), 99_000), Some(0));
        // Changes 5 s old when written, read 20 s later.
        assert_eq!(mirror_behind_ms(&at(5_000, 4096), 30_000), Some(25_000));
        let mut plain = at(0, 0);
        plain.mirror = None;
        assert_eq!(mirror_behind_ms(&plain, 30_000), None);
    }
}
