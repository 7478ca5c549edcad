//! The one error type of the `ublk-dev` library, with a small stable
//! [`ErrorKind`] that callers (the CLI's exit codes, tests) can match on.

use std::path::PathBuf;

use ublk_mirror_common::ErrorKind as MirrorKind;

/// What went wrong, with the context a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range or contradicts another one.
    #[error("{0}")]
    InvalidConfig(String),

    /// This machine is not enrolled with a mirror server (no enrollment in
    /// the client directory).
    #[error("this machine is not enrolled with a mirror server ({0} does not exist): run `ublk-mirror enroll TOKEN` with the line `mirror-server client add NAME` printed (or give --client-dir where it was enrolled)")]
    NotEnrolled(PathBuf),

    /// The device config file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The backing file does not exist and no size was given to create it.
    #[error("backing file {0} does not exist; give --size (e.g. --size 10G) to create it as a sparse file")]
    BackingMissing(PathBuf),

    /// The backing file's size disagrees with `--size`.
    #[error("backing file {path} is {actual} bytes but the device size is {wanted} bytes (--size, or `size` in the config); drop the size to use the file as it is, or resize the file yourself (truncate -s)")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The size asked for.
        wanted: u64,
    },

    /// The backing file is locked by another process.
    #[error("backing file {path} is in use (locked by another process{holder})")]
    BackingInUse {
        /// The file.
        path: PathBuf,
        /// Who holds it, when known (": ublk-mirror device 3, ..."), else empty.
        holder: String,
    },

    /// The backing file cannot be used (permissions, read-only, wrong type, bad size).
    #[error("backing file {path}: {reason}")]
    BackingUnusable {
        /// The file.
        path: PathBuf,
        /// Why, in words.
        reason: String,
    },

    /// The change journal is damaged beyond what it can repair, or is not ours.
    #[error("journal {path}: {reason}; it cannot be trusted: move it away to start over with a full resync")]
    JournalCorrupt {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Creating block devices needs root.
    #[error("ublk-mirror must run as root to {0} (the ublk driver's control device needs CAP_SYS_ADMIN)")]
    NotRoot(&'static str),

    /// The kernel has no ublk driver loaded.
    #[error("the ublk driver is not available ({control} is missing): load it with `modprobe ublk_drv` (Linux 6.0 or later built with CONFIG_BLK_DEV_UBLK)")]
    NoDriver {
        /// The control node that was looked for.
        control: PathBuf,
    },

    /// No ublk device has this id.
    #[error("there is no ublk device {0} (see `ublk-mirror list`)")]
    NoSuchDevice(u32),

    /// The device exists but is in the wrong state for the request.
    #[error("device {id}: {reason}")]
    DeviceState {
        /// The device id.
        id: u32,
        /// What is wrong, and what to do.
        reason: String,
    },

    /// The ublk driver refused a request.
    #[error("ublk driver: {context}: {error}")]
    Driver {
        /// What we were doing.
        context: String,
        /// libublk's error, kept as text so that libublk types stay in one module.
        error: Box<dyn std::error::Error + Send + Sync>,
    },

    /// An epoch request cannot be met (not sealed, released, broken).
    #[error(transparent)]
    Epoch(crate::epoch::EpochError),

    /// A device's daemon refused or failed a control request.
    #[error("{message}")]
    Daemon {
        /// Its words.
        message: String,
        /// How it classified the error.
        kind: ErrorKind,
    },

    /// Talking to the mirror server failed: the link, a refusal, or a
    /// server that broke the protocol (its kind says which).
    #[error("mirror server: {0}")]
    Mirror(ublk_mirror_common::Error),

    /// An operating-system call failed. (The error is part of the message,
    /// not a `source`: printed as a chain it would show twice.)
    #[error("{context}: {error}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        error: std::io::Error,
    },
}

/// A coarse classification of [`Error`], stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user asked for something invalid; nothing was changed.
    Usage,
    /// The environment (driver, files, permissions) is not as needed.
    Environment,
    /// A device is missing, busy or in the wrong state.
    Device,
    /// The system failed underneath us.
    System,
    /// The mirror server could not be reached, or the link failed: try
    /// again later.
    Link,
    /// The mirror server refused, saying why.
    Refused,
    /// The mirror server broke the protocol (a bug or another program).
    Peer,
}

impl ErrorKind {
    /// The process exit status for this kind (documented in `--help`).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::System => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Environment => 3,
            ErrorKind::Device => 4,
            ErrorKind::Link => 5,
            ErrorKind::Refused => 6,
            ErrorKind::Peer => 7,
        }
    }
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidConfig(_) | Error::ConfigFile { .. } | Error::SizeMismatch { .. } => {
                ErrorKind::Usage
            }
            Error::BackingMissing(_)
            | Error::BackingUnusable { .. }
            | Error::NoDriver { .. }
            | Error::NotRoot(_)
            | Error::JournalCorrupt { .. }
            | Error::BackingInUse { .. }
            | Error::NotEnrolled(_) => ErrorKind::Environment,
            Error::Mirror(e) => match e.kind() {
                MirrorKind::Link => ErrorKind::Link,
                MirrorKind::Refused => ErrorKind::Refused,
                MirrorKind::Peer => ErrorKind::Peer,
                MirrorKind::Invalid => ErrorKind::Usage,
                MirrorKind::Local => ErrorKind::System,
            },
            Error::NoSuchDevice(_) | Error::DeviceState { .. } | Error::Epoch(_) => {
                ErrorKind::Device
            }
            // What the system refused for want of rights, or a file
            // system mounted read-only, is this machine's setting; a busy
            // device (mounted, in use) is a device's state.
            Error::Io { error, .. } => match error.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                    ErrorKind::Environment
                }
                std::io::ErrorKind::ResourceBusy => ErrorKind::Device,
                _ => ErrorKind::System,
            },
            Error::Driver { .. } => ErrorKind::System,
            Error::Daemon { kind, .. } => *kind,
        }
    }

    /// Wrap an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            error: source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_failures_keep_their_kind_to_the_exit_code() {
        use ublk_mirror_common::Error as M;
        let kinds: Vec<(ErrorKind, u8)> = [
            M::Link("timed out".into()),
            M::Refused("quota".into()),
            M::Peer("stray frame".into()),
            M::io("reading", std::io::Error::other("x")),
        ]
        .into_iter()
        .map(|e| {
            let k = Error::Mirror(e).kind();
            (k, k.exit_code())
        })
        .collect();
        assert_eq!(
            kinds,
            vec![
                (ErrorKind::Link, 5),
                (ErrorKind::Refused, 6),
                (ErrorKind::Peer, 7),
                (ErrorKind::System, 1)
            ]
        );
    }

    #[test]
    fn a_system_call_refused_for_rights_or_a_busy_device_says_so_in_its_exit_code() {
        let code = |errno| Error::io("opening t", std::io::Error::from_raw_os_error(errno)).kind();
        assert_eq!(code(libc::EACCES), ErrorKind::Environment);
        assert_eq!(code(libc::EPERM), ErrorKind::Environment);
        assert_eq!(code(libc::EROFS), ErrorKind::Environment);
        assert_eq!(code(libc::EBUSY), ErrorKind::Device);
        assert_eq!(code(libc::EIO), ErrorKind::System);
        assert_eq!(
            Error::NotEnrolled("/x/server.json".into())
                .kind()
                .exit_code(),
            3
        );
    }

    #[test]
    fn an_io_error_is_told_once() {
        let e = anyhow::Error::from(Error::io(
            "reading x",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
        let shown = format!("{e:#}");
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
    }
}
