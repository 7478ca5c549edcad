//! Device settings: the TOML device config, command-line overrides, and the
//! validated [`DeviceSpec`] the rest of the program sees.
//!
//! A device config (conventionally `/etc/ublk-mirror/NAME.toml`, which the
//! systemd unit `ublk-mirror@NAME` runs) looks like this; every key but
//! `backing` is optional:
//!
//! ```toml
//! backing = "/var/lib/ublk-mirror/disk.img"  # file (or block device) holding the data
//! size = "20G"                # create a sparse file of this size if missing
//! name = "disk"               # defaults to the config file's name
//! id = 0                      # /dev/ublkb0; default: the first free id
//! queues = 1                  # hardware queues (one thread each)
//! depth = 128                 # requests in flight per queue
//! logical_block_size = 512    # 512 or 4096
//! direct_io = true            # O_DIRECT on the backing file (falls back when refused)
//! tracking = true             # crash-safe change tracking (the write-intent journal)
//! state_dir = "/var/lib/ublk-mirror/disk"  # where the journal lives (default: beside
//!                             # the backing file, FILE.ublk-mirror/; for a block
//!                             # device, /var/lib/ublk-mirror/NAME/)
//! region_size = "4M"          # write-intent region size (power of two, >= 64K)
//! cow_memory = "64M"          # memory for blocks preserved for sealed epochs;
//!                             # beyond it they spill to a file in state_dir
//! mirror = "root"             # mirror to this volume on the enrolled server
//! mirror_interval = "5s"      # least time between cuts shipped to the mirror
//! zstd_level = 3              # compression of shipped blocks (1-19)
//! mirror_bandwidth = "10M"    # bytes per second the mirror may use (default: no limit)
//! mirror_precopy = "256M"     # an epoch this big (a first sync, a resync) travels in
//!                             # pre-copy rounds, without copy-on-write ("0": never)
//! mirror_min_rate = "1M"      # while the device is busy, a pre-copy round reads at
//!                             # most this much a second ("0": full speed always)
//! client_dir = "/var/lib/ublk-mirror/client"  # this machine's enrollment
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ublk_mirror_common::{ByteSize, Span};

use crate::error::{Error, Result};
use crate::yielding::{DEFAULT_MIN_RATE, MIN_MIN_RATE};

/// Most hardware queues a device may have. Each queue is one thread with its
/// own ring; beyond the number of CPUs they only add wake-ups.
pub const MAX_QUEUES: u16 = 32;
/// Deepest queue: the ublk driver's `UBLK_MAX_QUEUE_DEPTH`.
pub const MAX_DEPTH: u16 = 4096;
/// Highest device id the ublk driver hands out (`UBLK_MAX_UBLKS` - 1).
pub const MAX_ID: u32 = (1 << 20) - 1;
/// Most requests in flight over all queues. Each has a buffer of
/// [`MAX_IO_BYTES`](crate::engine::MAX_IO_BYTES) that fills in as it is used,
/// so this bounds the daemon's memory at 2 GiB.
pub const MAX_IN_FLIGHT: u32 = 4096;
/// Default number of hardware queues: one, as ublksrv. A queue thread
/// serves its whole depth asynchronously; `scripts/bench-io` measured two
/// queues no faster than one on 2 CPUs. Raise it for many submitters on
/// NVMe-class storage.
pub const DEFAULT_QUEUES: u16 = 1;
/// Default queue depth: ublksrv's default, enough to keep NVMe busy.
pub const DEFAULT_DEPTH: u16 = 128;

/// Settings as written in a device config file or on the command line,
/// before validation. `None` means "not given here".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Backing file path.
    pub backing: Option<PathBuf>,
    /// Size to create the backing file with.
    pub size: Option<ByteSize>,
    /// Device name.
    pub name: Option<String>,
    /// Device id (N in /dev/ublkbN).
    pub id: Option<u32>,
    /// Number of hardware queues.
    pub queues: Option<u16>,
    /// Queue depth.
    pub depth: Option<u16>,
    /// Logical block size in bytes.
    pub logical_block_size: Option<u32>,
    /// Use O_DIRECT on the backing file.
    pub direct_io: Option<bool>,
    /// Track changes in a write-intent journal.
    pub tracking: Option<bool>,
    /// Directory of the journal.
    pub state_dir: Option<PathBuf>,
    /// Write-intent region size.
    pub region_size: Option<ByteSize>,
    /// Memory for preserved chunks of sealed epochs.
    pub cow_memory: Option<ByteSize>,
    /// Mirror to this volume.
    pub mirror: Option<String>,
    /// Least time between cuts shipped to the mirror.
    pub mirror_interval: Option<Span>,
    /// zstd level for shipped blocks.
    pub zstd_level: Option<i32>,
    /// Bytes per second the mirror may use.
    pub mirror_bandwidth: Option<ByteSize>,
    /// Epochs at least this big travel in pre-copy rounds (0: never).
    pub mirror_precopy: Option<ByteSize>,
    /// What a pre-copy round reads a second while the device is busy
    /// (0: no yielding).
    pub mirror_min_rate: Option<ByteSize>,
    /// This machine's enrollment.
    pub client_dir: Option<PathBuf>,
}

/// A TOML error as one line: where (line and column), then what.
fn toml_error(e: &toml::de::Error) -> String {
    let at = e.span().map(|_| {
        // The first line of its Display: "TOML parse error at line L, column C".
        e.to_string()
            .lines()
            .next()
            .and_then(|l| l.split(" at ").nth(1).map(str::to_string))
            .unwrap_or_default()
    });
    match at.filter(|a| !a.is_empty()) {
        Some(at) => format!("{at}: {}", e.message()),
        None => e.message().to_string(),
    }
}

impl DeviceConfig {
    /// Read a TOML device config.
    pub fn load(path: &Path) -> Result<DeviceConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut config: DeviceConfig = toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: toml_error(&e),
        })?;
        // A relative backing path in a config file is relative to the file.
        if let (Some(b), Some(dir)) = (&config.backing, path.parent()) {
            if b.is_relative() {
                config.backing = Some(dir.join(b));
            }
        }
        if config.name.is_none() {
            config.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        Ok(config)
    }

    /// These settings, with every value given in `over` taking precedence.
    pub fn overridden_by(self, over: DeviceConfig) -> DeviceConfig {
        DeviceConfig {
            backing: over.backing.or(self.backing),
            size: over.size.or(self.size),
            name: over.name.or(self.name),
            id: over.id.or(self.id),
            queues: over.queues.or(self.queues),
            depth: over.depth.or(self.depth),
            logical_block_size: over.logical_block_size.or(self.logical_block_size),
            direct_io: over.direct_io.or(self.direct_io),
            tracking: over.tracking.or(self.tracking),
            state_dir: over.state_dir.or(self.state_dir),
            region_size: over.region_size.or(self.region_size),
            cow_memory: over.cow_memory.or(self.cow_memory),
            mirror: over.mirror.or(self.mirror),
            mirror_interval: over.mirror_interval.or(self.mirror_interval),
            zstd_level: over.zstd_level.or(self.zstd_level),
            mirror_bandwidth: over.mirror_bandwidth.or(self.mirror_bandwidth),
            mirror_precopy: over.mirror_precopy.or(self.mirror_precopy),
            mirror_min_rate: over.mirror_min_rate.or(self.mirror_min_rate),
            client_dir: over.client_dir.or(self.client_dir),
        }
    }

    /// Check every value and fill in defaults.
    pub fn validate(self) -> Result<DeviceSpec> {
        let invalid = |msg: String| Err(Error::InvalidConfig(msg));
        let Some(backing) = self.backing else {
            return invalid(
                "no backing file: give --backing FILE (or `backing = \"...\"` in the config)"
                    .into(),
            );
        };
        if backing.as_os_str().is_empty() {
            return invalid("the backing file path is empty".into());
        }
        let name = match self.name {
            Some(n) => n,
            None => backing
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid(format!(
                "invalid device name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
            ));
        }
        let queues = self.queues.unwrap_or(DEFAULT_QUEUES);
        if !(1..=MAX_QUEUES).contains(&queues) {
            return invalid(format!(
                "--queues {queues} is out of range: use 1 to {MAX_QUEUES}"
            ));
        }
        let depth = self.depth.unwrap_or(DEFAULT_DEPTH);
        if !(1..=MAX_DEPTH).contains(&depth) {
            return invalid(format!(
                "--depth {depth} is out of range: use 1 to {MAX_DEPTH}"
            ));
        }
        if u32::from(queues) * u32::from(depth) > MAX_IN_FLIGHT {
            return invalid(format!(
                "--queues {queues} x --depth {depth} is more than {MAX_IN_FLIGHT} requests in flight \
                 (each one has a 512 KiB buffer); lower one of them"
            ));
        }
        let logical_block_size = self.logical_block_size.unwrap_or(512);
        if !matches!(logical_block_size, 512 | 4096) {
            return invalid(format!(
                "--logical-block-size {logical_block_size} is not supported: use 512 or 4096"
            ));
        }
        if let Some(id) = self.id {
            if id > MAX_ID {
                return invalid(format!("--id {id} is out of range: use 0 to {MAX_ID}"));
            }
        }
        if let Some(size) = self.size {
            if size.0 == 0 {
                return invalid("--size 0: a device needs at least one block".into());
            }
            if size.0 % u64::from(logical_block_size) != 0 {
                return invalid(format!(
                    "--size {size} is not a multiple of the logical block size ({logical_block_size} bytes)"
                ));
            }
        }
        let region_size = self
            .region_size
            .map_or(crate::journal::DEFAULT_REGION_SIZE, |s| s.0);
        if !region_size.is_power_of_two() || region_size < crate::journal::MIN_REGION_SIZE {
            return invalid(format!(
                "--region-size {} must be a power of two of at least 64KiB",
                ByteSize(region_size)
            ));
        }
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| default_state_dir(&backing, &name));
        let tracking = TrackingSpec {
            // Absolute, so that a recovery started elsewhere finds the same journal.
            state_dir: absolute(state_dir)?,
            region_size,
            enabled: self.tracking.unwrap_or(true),
            cow_memory: self
                .cow_memory
                .map_or(crate::epoch::DEFAULT_COW_MEMORY, |s| s.0),
        };
        // The mirror's settings are checked also without --mirror (a
        // config file may hold them for later): out of range is an error.
        let interval = self
            .mirror_interval
            .map_or(DEFAULT_MIRROR_INTERVAL, |s| s.0);
        if interval < std::time::Duration::from_millis(100) {
            return invalid("--mirror-interval must be at least 100ms".into());
        }
        let zstd_level = self.zstd_level.unwrap_or(DEFAULT_ZSTD_LEVEL);
        if !(1..=19).contains(&zstd_level) {
            return invalid(format!("--zstd-level {zstd_level} is out of range (1-19)"));
        }
        let min_rate = self.mirror_min_rate.map_or(DEFAULT_MIN_RATE, |b| b.0);
        if min_rate > 0 && min_rate < MIN_MIN_RATE {
            return invalid(format!(
                "--mirror-min-rate {} is below {} a second (\"0\" turns the yielding off)",
                ByteSize(min_rate),
                ByteSize(MIN_MIN_RATE)
            ));
        }
        let mirror = match self.mirror {
            None => None,
            Some(volume) => {
                ublk_mirror_common::proto::check_name(&volume)
                    .map_err(|e| Error::InvalidConfig(format!("--mirror: {e}")))?;
                if !tracking.enabled {
                    return invalid("--mirror needs change tracking; drop --no-tracking".into());
                }
                Some(MirrorSpec {
                    volume,
                    client_dir: absolute(
                        self.client_dir.unwrap_or_else(|| {
                            PathBuf::from(crate::enrollment::DEFAULT_CLIENT_DIR)
                        }),
                    )?,
                    interval_ms: interval.as_millis() as u64,
                    zstd_level,
                    bandwidth: self.mirror_bandwidth.map(|b| b.0).filter(|&b| b > 0),
                    precopy: self
                        .mirror_precopy
                        .map_or(Some(DEFAULT_PRECOPY), |b| Some(b.0).filter(|&b| b > 0)),
                    min_rate,
                })
            }
        };
        let backing = absolute(backing)?;
        Ok(DeviceSpec {
            backing,
            size: self.size.map(|s| s.0),
            name,
            id: self.id,
            queues,
            depth,
            logical_block_size,
            direct_io: self.direct_io.unwrap_or(true),
            tracking,
            mirror,
        })
    }
}

/// Where the journals of block-device backings live: `/var/lib/ublk-mirror/NAME/`.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/ublk-mirror";

/// A regular backing file keeps its state beside it (`FILE.ublk-mirror/`):
/// it moves with the file, and two files of the same name never share a
/// journal. A block device's directory (`/dev`) cannot hold state, so it
/// goes to `/var/lib/ublk-mirror/NAME/`.
fn default_state_dir(backing: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let is_block_device = std::fs::metadata(backing).is_ok_and(|m| m.file_type().is_block_device());
    if is_block_device {
        Path::new(DEFAULT_STATE_ROOT).join(name)
    } else {
        let mut dir = backing.as_os_str().to_owned();
        dir.push(".ublk-mirror");
        PathBuf::from(dir)
    }
}

/// Validated change-tracking settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingSpec {
    /// Directory holding the journal (absolute).
    pub state_dir: PathBuf,
    /// Write-intent region size in bytes.
    pub region_size: u64,
    /// Whether changes are tracked. When not, an existing journal in
    /// `state_dir` is invalidated (every region marked), since it no longer
    /// covers what the device writes.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Memory for chunks preserved for sealed epochs before they spill to
    /// a file in `state_dir`.
    #[serde(default = "cow_memory")]
    pub cow_memory: u64,
}

fn enabled() -> bool {
    true
}

fn cow_memory() -> u64 {
    crate::epoch::DEFAULT_COW_MEMORY
}

fn absolute(path: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&path).map_err(|e| Error::io(format!("resolving {}", path.display()), e))
}

/// Validated device settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Backing file path.
    pub backing: PathBuf,
    /// Size to create the backing file with, if it does not exist.
    pub size: Option<u64>,
    /// Device name.
    pub name: String,
    /// Requested device id; `None` lets the driver choose.
    pub id: Option<u32>,
    /// Hardware queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// Logical block size (512 or 4096).
    pub logical_block_size: u32,
    /// Whether to try O_DIRECT on the backing file.
    pub direct_io: bool,
    /// Change tracking.
    pub tracking: TrackingSpec,
    /// Mirroring, if asked for.
    #[serde(default)]
    pub mirror: Option<MirrorSpec>,
}

/// Default least time between cuts shipped to the mirror.
pub const DEFAULT_MIRROR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// Default zstd level for shipped blocks.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Validated mirroring settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSpec {
    /// The volume on the server.
    pub volume: String,
    /// This machine's enrollment (absolute).
    pub client_dir: PathBuf,
    /// Least time between cuts, ms.
    pub interval_ms: u64,
    /// zstd level.
    pub zstd_level: i32,
    /// Bytes per second the mirror may use (`None`: no limit).
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Epochs of at least this many bytes travel in pre-copy rounds
    /// (`None`: never).
    #[serde(default = "default_precopy")]
    pub precopy: Option<u64>,
    /// Bytes per second a pre-copy round reads while the device is busy
    /// (0: full speed always).
    #[serde(default = "default_min_rate")]
    pub min_rate: u64,
}

/// Epochs this big (a first sync, a resync, a burst) travel in pre-copy
/// rounds by default.
pub const DEFAULT_PRECOPY: u64 = 256 << 20;

fn default_precopy() -> Option<u64> {
    Some(DEFAULT_PRECOPY)
}

fn default_min_rate() -> u64 {
    DEFAULT_MIN_RATE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> DeviceConfig {
        DeviceConfig {
            backing: Some("/tmp/disk.img".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let spec = base().validate().unwrap();
        assert_eq!(spec.name, "disk");
        assert_eq!(spec.depth, DEFAULT_DEPTH);
        assert_eq!(spec.logical_block_size, 512);
        assert!(spec.direct_io);
        assert_eq!(spec.queues, DEFAULT_QUEUES);
        assert_eq!(spec.id, None);
        let t = spec.tracking;
        assert_eq!(t.state_dir, Path::new("/tmp/disk.img.ublk-mirror"));
        assert_eq!(t.region_size, 4 << 20);
        assert!(t.enabled);
        let off = DeviceConfig {
            tracking: Some(false),
            ..base()
        }
        .validate()
        .unwrap();
        assert!(!off.tracking.enabled);
        let relative = DeviceConfig {
            backing: Some("disk.img".into()),
            ..Default::default()
        };
        let spec = relative.validate().unwrap();
        assert!(spec.backing.is_absolute() && spec.tracking.state_dir.is_absolute());
    }

    #[test]
    fn the_minimum_rate_of_a_first_sync_defaults_and_can_be_turned_off() {
        let mirrored = |rate: Option<&str>| DeviceConfig {
            mirror: Some("root".into()),
            mirror_min_rate: rate.map(|r| r.parse().unwrap()),
            ..base()
        };
        let rate = |c: DeviceConfig| c.validate().unwrap().mirror.unwrap().min_rate;
        assert_eq!(rate(mirrored(None)), DEFAULT_MIN_RATE);
        assert_eq!(rate(mirrored(Some("8M"))), 8 << 20);
        assert_eq!(rate(mirrored(Some("0"))), 0);
        let low = mirrored(Some("4K")).validate().unwrap_err().to_string();
        assert!(low.contains("below 256KiB"), "{low}");
        // A spec written before the setting existed (a device recovered
        // after an upgrade) yields at the default rate.
        let old: MirrorSpec = serde_json::from_str(
            r#"{"volume":"root","client_dir":"/c","interval_ms":5000,"zstd_level":3}"#,
        )
        .unwrap();
        assert_eq!(old.min_rate, DEFAULT_MIN_RATE);
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_range() {
        let cases: Vec<(DeviceConfig, &str)> = vec![
            (
                DeviceConfig {
                    queues: Some(0),
                    ..base()
                },
                "1 to 32",
            ),
            (
                DeviceConfig {
                    queues: Some(33),
                    ..base()
                },
                "1 to 32",
            ),
            (
                DeviceConfig {
                    depth: Some(0),
                    ..base()
                },
                "1 to 4096",
            ),
            (
                DeviceConfig {
                    logical_block_size: Some(1000),
                    ..base()
                },
                "512 or 4096",
            ),
            (
                DeviceConfig {
                    id: Some(MAX_ID + 1),
                    ..base()
                },
                "0 to",
            ),
            (
                DeviceConfig {
                    size: Some(ByteSize(0)),
                    ..base()
                },
                "at least one block",
            ),
            (
                DeviceConfig {
                    size: Some(ByteSize(1000)),
                    ..base()
                },
                "multiple of the logical block size",
            ),
            (
                DeviceConfig {
                    name: Some("a b".into()),
                    ..base()
                },
                "invalid device name",
            ),
            (DeviceConfig::default(), "no backing file"),
        ];
        for (config, want) in cases {
            let err = config.clone().validate().unwrap_err().to_string();
            assert!(err.contains(want), "{config:?}: {err}");
        }
    }

    #[test]
    fn command_line_overrides_the_file() {
        let file = DeviceConfig {
            queues: Some(2),
            depth: Some(64),
            ..base()
        };
        let cli = DeviceConfig {
            depth: Some(32),
            ..Default::default()
        };
        let merged = file.overridden_by(cli);
        assert_eq!((merged.queues, merged.depth), (Some(2), Some(32)));
    }

    #[test]
    fn config_files_parse_and_name_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("laptop.toml");
        std::fs::write(
            &path,
            "backing = \"disk.img\"\nsize = \"1G\"\nqueues = 2\nlogical_block_size = 4096\n",
        )
        .unwrap();
        let spec = DeviceConfig::load(&path).unwrap().validate().unwrap();
        assert_eq!(spec.name, "laptop");
        assert_eq!(spec.backing, dir.path().join("disk.img"));
        assert_eq!(spec.size, Some(1 << 30));
        assert_eq!(spec.logical_block_size, 4096);

        std::fs::write(&path, "backing = \"x\"\nqueus = 2\n").unwrap();
        let err = DeviceConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `queus`"), "{err}");
    }
}
