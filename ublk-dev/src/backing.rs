//! The backing file: opened read-write, created sparse when asked, locked
//! against a second device, and switched to `O_DIRECT` when the file system
//! allows it for the device's block size.
//!
//! Nothing here changes an existing file: a check that fails leaves the file
//! as it was, and a file this module created is removed again if opening it
//! fails later ([`Backing::discard_if_created`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::engine::AlignedBuf;
use crate::error::{Error, Result};

/// What to open, and how.
#[derive(Debug, Clone)]
pub struct BackingOptions<'a> {
    /// The file (or block device).
    pub path: &'a Path,
    /// The size the file must have, if known (a block device may be
    /// larger: its first `size` bytes are served).
    pub size: Option<u64>,
    /// Create a sparse file of `size` bytes when it does not exist.
    pub create: bool,
    /// The device's logical block size; the file's size must be a multiple.
    pub block_size: u32,
    /// Try `O_DIRECT`.
    pub direct_io: bool,
}

/// An open, locked backing file.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    resolved: PathBuf,
    size: u64,
    direct_io: bool,
    created: bool,
    punches_holes: bool,
}

impl Backing {
    /// Open (or create) the backing file and lock it for this process.
    pub fn open(opts: &BackingOptions<'_>) -> Result<Backing> {
        let path = opts.path;
        let unusable = |reason: String| Error::BackingUnusable {
            path: path.to_path_buf(),
            reason,
        };
        let (file, created) = match std::fs::metadata(path) {
            Ok(meta) => {
                let ft = meta.file_type();
                if !(ft.is_file() || ft.is_block_device()) {
                    return Err(unusable("not a regular file or block device".to_string()));
                }
                (
                    open_rw(path, false, ft.is_block_device()).map_err(|e| open_error(path, e))?,
                    false,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(size) = opts.size.filter(|_| opts.create) else {
                    return Err(Error::BackingMissing(path.to_path_buf()));
                };
                let file = open_rw(path, true, false).map_err(|e| open_error(path, e))?;
                if let Err(e) = file.set_len(size) {
                    let _ = std::fs::remove_file(path);
                    return Err(unusable(format!("cannot make it {size} bytes: {e}")));
                }
                tracing::info!(path = %path.display(), size, "created sparse backing file");
                (file, true)
            }
            Err(e) => return Err(open_error(path, e)),
        };
        // Resolved now: the daemon's own mount namespace, entered later,
        // has no file system that lives on a ublk device, where this file
        // may be (a device stacked on another's file system).
        let resolved = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) => {
                if created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(Error::io(format!("resolving {}", path.display()), e));
            }
        };
        let mut backing = Backing {
            file,
            path: path.to_path_buf(),
            resolved,
            size: 0,
            direct_io: false,
            created,
            punches_holes: false,
        };
        // From here on, a failure must not leave a file we created behind.
        match backing.check_and_lock(opts) {
            Ok(()) => Ok(backing),
            Err(e) => {
                backing.discard_if_created();
                Err(e)
            }
        }
    }

    fn check_and_lock(&mut self, opts: &BackingOptions<'_>) -> Result<()> {
        let path = self.path.clone();
        lock(&self.file).map_err(|e| match e {
            nix::errno::Errno::EWOULDBLOCK => Error::BackingInUse {
                path: path.clone(),
                holder: String::new(),
            },
            e => Error::io(format!("cannot lock {}", path.display()), e.into()),
        })?;
        let mut size = (&self.file)
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("cannot size {}", path.display()), e))?;
        if let Some(wanted) = opts.size {
            // A block device larger than asked serves its first `wanted`
            // bytes (a volume restored onto a bigger disk); a file is
            // exactly its size.
            let block_device = self
                .file
                .metadata()
                .is_ok_and(|m| m.file_type().is_block_device());
            if block_device && wanted > 0 && wanted < size {
                size = wanted;
            }
            if wanted != size {
                return Err(Error::SizeMismatch {
                    path,
                    actual: size,
                    wanted,
                });
            }
        }
        if size == 0 {
            return Err(Error::BackingUnusable {
                path,
                reason: "it is empty; give it a size first (truncate -s 10G FILE)".into(),
            });
        }
        if size % u64::from(opts.block_size) != 0 {
            return Err(Error::BackingUnusable {
                path,
                reason: format!(
                    "its size ({size} bytes) is not a multiple of the logical block size ({} bytes)",
                    opts.block_size
                ),
            });
        }
        self.size = size;
        self.punches_holes = punches_holes(&self.file, size);
        if !self.punches_holes {
            tracing::info!(path = %path.display(), "the backing cannot punch holes: the device offers no discard");
        }
        if opts.direct_io {
            match enable_direct_io(&self.file, opts.block_size) {
                Ok(()) => self.direct_io = true,
                Err(why) => {
                    tracing::warn!(path = %path.display(), "O_DIRECT not possible ({why}); using buffered I/O");
                }
            }
        }
        Ok(())
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its absolute path, symbolic links resolved, as it was when opened.
    pub fn resolved_path(&self) -> &Path {
        &self.resolved
    }

    /// Its size in bytes (the device size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether I/O goes through `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Whether the backing punches holes (`fallocate` `PUNCH_HOLE`), which
    /// is what a DISCARD does: only then is DISCARD offered to the kernel.
    /// A discard is recorded as zeroes for the mirror, so one the backing
    /// ignored would leave the mirror different from the device.
    pub fn punches_holes(&self) -> bool {
        self.punches_holes
    }

    /// Whether this open created the file.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Make everything written durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("cannot fsync {}", self.path.display()), e))
    }

    /// Remove the file if this open created it (used when setting up the
    /// device fails, so that a failed `add` leaves nothing behind).
    pub fn discard_if_created(&mut self) {
        if std::mem::take(&mut self.created) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), "cannot remove the backing file created for this device: {e}");
            }
        }
    }
}

/// Whether `fallocate(PUNCH_HOLE)` works on the backing. A regular file is
/// asked with a hole past its end (which changes nothing: `KEEP_SIZE`); a
/// block device punches holes by writing zeroes without a fallback, so it
/// can if its queue offers WRITE_ZEROES (sysfs, its disk's for a
/// partition). Anything unclear answers no: the device then offers no
/// discard, which costs a file system nothing but trimming.
fn punches_holes(file: &File, size: u64) -> bool {
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let dev = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
        return ["queue", "../queue"].iter().any(|q| {
            std::fs::read_to_string(format!("{dev}/{q}/write_zeroes_max_bytes"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        });
    }
    let past_end = size.next_multiple_of(4096);
    // SAFETY: fallocate on an open descriptor; the range lies past the end
    // of the file and KEEP_SIZE keeps its size, so no byte of it changes.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            past_end as libc::off_t,
            4096,
        )
    };
    r == 0
}

/// Open read-write; a block device exclusively (`O_EXCL`: refused while a
/// file system is mounted on it, or on one of its partitions, or another
/// program holds it so), as writing under a mounted file system corrupts it.
fn open_rw(path: &Path, create: bool, block_device: bool) -> std::io::Result<File> {
    let excl = if block_device { libc::O_EXCL } else { 0 };
    // A whole disk: made readable by its owner only (0600), like the
    // disk it stands for.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | excl)
        .open(path)
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    let reason = match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied: the device needs to read and write it".to_string()
        }
        Some(libc::EROFS) => "it is on a read-only file system".to_string(),
        Some(libc::ETXTBSY) => "it is busy (an executable being run?)".to_string(),
        Some(libc::EBUSY) => {
            "it is in use: mounted (it or one of its partitions), or held by another program \
             (a RAID, LVM, swap, another device)"
                .to_string()
        }
        Some(libc::ENOENT) => "its directory does not exist".to_string(),
        _ => return Error::io(format!("cannot open {}", path.display()), e),
    };
    Error::BackingUnusable {
        path: path.to_path_buf(),
        reason,
    }
}

/// An exclusive `flock`, held as long as the file stays open in this
/// process: a second device (or a second daemon for the same device) is
/// refused, and a killed daemon releases it with its last descriptor.
pub(crate) fn lock(file: &File) -> nix::Result<()> {
    // SAFETY: flock on a descriptor we own; it touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

/// Switch the file to `O_DIRECT` if direct I/O of one logical block is
/// allowed on it; on any refusal, leave it buffered and say why.
///
/// The alignment the file system needs comes from `statx(STATX_DIOALIGN)`
/// (Linux 6.1+). A probe read backs it up, but cannot decide alone: reads
/// of holes skip the alignment check, and a new backing file is all holes.
fn enable_direct_io(file: &File, block_size: u32) -> std::result::Result<(), String> {
    match dio_offset_align(file) {
        Some(0) => return Err("the file system does not support direct I/O".into()),
        Some(align) if align > block_size => {
            return Err(format!(
                "the file system needs direct I/O aligned to {align} bytes, more than the \
                 {block_size}-byte logical block; --logical-block-size {align} keeps O_DIRECT"
            ))
        }
        _ => {}
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on our own descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
        return Err(format!(
            "the file system refuses it: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut probe = AlignedBuf::zeroed(block_size as usize);
    let res = nix::sys::uio::pread(file, probe.as_mut_slice(), 0);
    if let Err(e) = res {
        // SAFETY: restoring the flags read above on our own descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        return Err(if e == nix::errno::Errno::EINVAL {
            format!(
                "the file system needs direct I/O aligned to more than {block_size} bytes; \
                 --logical-block-size 4096 keeps O_DIRECT"
            )
        } else {
            format!("probe read failed: {e}")
        });
    }
    Ok(())
}

/// The file offset alignment direct I/O needs, if the kernel says
/// (0: direct I/O is not supported).
fn dio_offset_align(file: &File) -> Option<u32> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx on our own descriptor (empty path + AT_EMPTY_PATH)
    // writes at most size_of::<statx>() bytes into the buffer we own.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded; the buffer started zeroed and was filled in.
    let stx = unsafe { stx.assume_init() };
    (stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some(stx.stx_dio_offset_align)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(path: &Path) -> BackingOptions<'_> {
        BackingOptions {
            path,
            size: None,
            create: true,
            block_size: 512,
            direct_io: true,
        }
    }

    #[test]
    fn the_hole_probe_changes_nothing_and_agrees_with_a_real_punch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        let b = Backing::open(&BackingOptions {
            create: false,
            ..opts(&path)
        })
        .unwrap();
        let says = b.punches_holes();
        drop(b);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            data,
            "the probe changed the file"
        );
        // Whatever this file system is, the probe's answer is what a punch
        // inside a file does.
        let scratch = File::options().read(true).write(true).open(&path).unwrap();
        // SAFETY: fallocate on a descriptor we own, inside the file.
        let r = unsafe {
            libc::fallocate(
                scratch.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                4096,
            )
        };
        assert_eq!(says, r == 0, "the probe said {says}, a punch returned {r}");
    }

    #[test]
    fn creates_a_sparse_file_of_the_given_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let b = Backing::open(&BackingOptions {
            size: Some(1 << 30),
            ..opts(&path)
        })
        .unwrap();
        assert!(b.created());
        assert_eq!(b.size(), 1 << 30);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        // A whole disk: its owner's alone, whatever the umask.
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    #[test]
    fn a_missing_file_without_size_is_refused_and_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.img");
        let err = Backing::open(&opts(&path)).unwrap_err();
        assert!(matches!(err, Error::BackingMissing(_)), "{err}");
        assert!(err.to_string().contains("--size"));
        assert!(!path.exists());
    }

    #[test]
    fn size_mismatch_is_refused_and_the_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let err = Backing::open(&BackingOptions {
            size: Some(4096),
            ..opts(&path)
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    actual: 8192,
                    wanted: 4096,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 8192]);
    }

    #[test]
    fn a_second_open_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = Backing::open(&opts(&path)).unwrap();
        let err = Backing::open(&opts(&path)).unwrap_err();
        assert!(matches!(err, Error::BackingInUse { .. }), "{err}");
        drop(first);
        Backing::open(&opts(&path)).unwrap();
    }

    #[test]
    fn empty_odd_sized_and_non_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let err = Backing::open(&opts(&empty)).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");

        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let err = Backing::open(&opts(&odd)).unwrap_err().to_string();
        assert!(err.contains("not a multiple"), "{err}");

        let err = Backing::open(&opts(dir.path())).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_file_created_here_is_removed_when_a_later_check_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        // 1000 bytes is not a multiple of 4096: created, then refused.
        let err = Backing::open(&BackingOptions {
            size: Some(1000),
            block_size: 4096,
            ..opts(&path)
        })
        .unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
        assert!(!path.exists());
    }
}
