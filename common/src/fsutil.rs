//! Small file operations both sides need.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Make `len` bytes at `offset` read as zeroes: a hole where the file
/// system can punch one, zeroes written where it cannot. The file keeps
/// its size.
pub fn punch_or_zero(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let punched = nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    );
    if punched.is_ok() {
        return Ok(());
    }
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeroes.len() as u64);
        file.write_all_at(&zeroes[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// The holes of `file` in `range` (`SEEK_DATA`/`SEEK_HOLE`), ascending:
/// parts that read as zeroes without being stored. Beyond the end of the
/// file counts as a hole. A file system (or block device) that cannot tell
/// has none: everything is data, which is never wrong, only slower. The
/// file offset moves (nothing here uses it: reads are positional).
pub fn holes(file: &File, range: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let data = match lseek(file, at as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data from `at` to the end of the file.
            Err(nix::errno::Errno::ENXIO) => range.end,
            Err(_) => return Vec::new(),
        };
        if data > at {
            out.push(at..data.min(range.end));
        }
        if data >= range.end {
            break;
        }
        at = match lseek(file, data as i64, Whence::SeekHole) {
            Ok(h) if h as u64 > data => h as u64,
            // A hole must follow data (the end of the file is one).
            _ => return Vec::new(),
        };
    }
    out
}

/// An exclusive `flock` on `path` (made if missing), held until the
/// returned lock is dropped; with `wait: false`, `WouldBlock` when another
/// holds it.
pub fn lock_file(path: &Path, wait: bool) -> std::io::Result<nix::fcntl::Flock<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let how = if wait {
        nix::fcntl::FlockArg::LockExclusive
    } else {
        nix::fcntl::FlockArg::LockExclusiveNonblock
    };
    nix::fcntl::Flock::lock(file, how).map_err(|(_, e)| std::io::Error::from(e))
}

/// Replace `path` with `bytes` so that a crash leaves either the old or
/// the new content, durably: [`replace`], then the directory synced.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes)?;
    sync_dir(parent_of(path))
}

/// Replace `path` with `bytes` whole: a temporary file, synced, renamed
/// over it. Once this returns, `path` holds the new bytes; they are
/// durable once its directory is synced ([`write_durably`] does both).
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Remove `path`, durably (its directory synced); a path that is not
/// there is removed already.
pub fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent_of(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Drop `file`'s clean pages from the page cache, and start writing its
/// dirty ones back without waiting for them (`POSIX_FADV_DONTNEED` does
/// both). A hint: nothing is made durable, nothing fails.
pub fn drop_cached(file: &File) {
    let _ = nix::fcntl::posix_fadvise(
        file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Start reading `len` bytes of `file` at `offset` into the page cache
/// without waiting (`POSIX_FADV_WILLNEED`): scattered reads made in turn
/// then find their pages there, the disk having had many in flight. A
/// hint: nothing fails.
pub fn will_need(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        file,
        offset,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
}

/// Keeps a big stream of I/O on one file that nothing reads again soon
/// (a first sync's blocks on the server, a pack) out of the page cache:
/// every [`Streamed::EVERY`] bytes, what was written back since the last
/// time is dropped and the rest is sent on its way ([`drop_cached`]). The
/// cache it holds stays near two steps (128 MiB), however big the stream.
///
/// Why: the cache is for what is read; a server taking a 1 TiB first sync
/// must not push out every other volume's hot blocks for it. And growing
/// the cache costs a page allocation, and a first touch, per 4 KiB: on a
/// virtual machine whose idle memory went back to its host, measured at
/// 3.4 CPU seconds of the kernel's per GiB written (2 GiB in 1 MiB
/// writes), against 0.3 when the cache recycles its own pages.
#[derive(Debug)]
pub struct Streamed {
    bytes: std::sync::atomic::AtomicU64,
    step: u64,
}

impl Default for Streamed {
    fn default() -> Streamed {
        Streamed::every(Streamed::EVERY)
    }
}

impl Streamed {
    /// How many bytes between two drops.
    pub const EVERY: u64 = 64 << 20;

    pub fn new() -> Streamed {
        Streamed::default()
    }

    /// One that drops every `step` bytes.
    pub fn every(step: u64) -> Streamed {
        Streamed {
            bytes: 0.into(),
            step: step.max(1),
        }
    }

    /// Note `n` bytes written to (or read from) `file`. Safe from several
    /// threads at once.
    pub fn moved(&self, file: &File, n: u64) {
        let before = self
            .bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if before / self.step != (before + n) / self.step {
            drop_cached(file);
        }
    }
}

/// Make the names in directory `dir` durable (fsync of the directory).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punched_ranges_read_as_zeroes_and_keep_the_size() {
        let file = tempfile_in_tmp();
        file.write_all_at(&[7u8; 16384], 0).unwrap();
        punch_or_zero(&file, 4096, 8192).unwrap();
        let mut buf = vec![0u8; 16384];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 7));
        assert_eq!(file.metadata().unwrap().len(), 16384);
    }

    #[test]
    fn durable_writes_replace_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_durably(&path, b"one").unwrap();
        write_durably(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a temporary file was left"
        );
    }

    fn tempfile_in_tmp() -> File {
        tempfile::tempfile().unwrap()
    }

    /// How many of `file`'s first `len` bytes' pages are in the page
    /// cache.
    fn resident_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a shared read-only mapping of `len` bytes of an open
        // file (at least that long), only passed to mincore with a vector
        // of one byte per page, then unmapped; nothing reads through it.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn streamed_io_drops_what_was_written_back_at_each_step_and_only_then() {
        const MIB: usize = 1 << 20;
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("stream"))
            .unwrap();
        let s = Streamed::every(4 * MIB as u64);
        let block = vec![7u8; MIB];
        for i in 0..3 {
            file.write_all_at(&block, (i * MIB) as u64).unwrap();
            s.moved(&file, MIB as u64);
        }
        file.sync_data().unwrap();
        // Short of a step: all of it is still cached.
        assert_eq!(resident_pages(&file, 3 * MIB), 3 * MIB / 4096);
        file.write_all_at(&block, (3 * MIB) as u64).unwrap();
        file.sync_data().unwrap();
        s.moved(&file, MIB as u64);
        // A step crossed: what was written back is gone from the cache,
        // and still reads back.
        assert_eq!(resident_pages(&file, 4 * MIB), 0);
        let mut back = vec![0u8; MIB];
        file.read_exact_at(&mut back, (2 * MIB) as u64).unwrap();
        assert_eq!(back, block);
    }

    #[test]
    fn holes_are_what_reads_as_zeroes_unstored_and_data_is_never_one() {
        const MIB: u64 = 1 << 20;
        let file = tempfile_in_tmp();
        file.set_len(8 * MIB).unwrap();
        let data = [MIB..MIB + 65536, 3 * MIB..3 * MIB + 4096];
        for r in &data {
            file.write_all_at(&vec![9u8; (r.end - r.start) as usize], r.start)
                .unwrap();
        }
        let holes = holes(&file, 0..8 * MIB);
        for h in &holes {
            assert!(h.start < h.end && h.end <= 8 * MIB, "{holes:?}");
            for d in &data {
                assert!(
                    h.end <= d.start || d.end <= h.start,
                    "data in a hole: {holes:?}"
                );
            }
            let mut buf = vec![1u8; (h.end - h.start) as usize];
            file.read_exact_at(&mut buf, h.start).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "a hole that is not zero");
        }
        let total: u64 = holes.iter().map(|h| h.end - h.start).sum();
        // ext4 (this machine's, CI's) tells holes at its block size.
        assert_eq!(total, 8 * MIB - 65536 - 4096, "{holes:?}");
        // A range inside one hole, one inside data, and past the end.
        assert_eq!(
            super::holes(&file, 5 * MIB..6 * MIB),
            vec![5 * MIB..6 * MIB]
        );
        assert!(super::holes(&file, MIB + 4096..MIB + 8192).is_empty());
        assert_eq!(
            super::holes(&file, 8 * MIB..9 * MIB),
            vec![8 * MIB..9 * MIB]
        );
    }
}

/// `file` opened again, as a new open file of its own (same access and
/// `O_DIRECT`/`O_DSYNC`/`O_SYNC` flags), through `/proc/self/fd`: also
/// an unlinked file. Not a duplicate descriptor: the kernel reports a
/// write-back error once per open file, so two parts that each sync the
/// same file (the device's FLUSH, the tracker's syncs before a release)
/// must not share one, or whichever syncs first takes the error and the
/// other is told all is durable. An error where `/proc` is not mounted
/// (a duplicate would share the error, unseen).
pub fn reopen(file: &File) -> std::io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    let writable = flags & OFlag::O_ACCMODE == OFlag::O_RDWR;
    let kept = flags & (OFlag::O_DIRECT | OFlag::O_DSYNC | OFlag::O_SYNC);
    match std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(kept.bits())
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
    {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(std::io::Error::new(
            e.kind(),
            "reopening a file needs /proc mounted (/proc/self/fd)",
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod reopen_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Reopened: another open file (its own offset and errors), the same
    /// data, the same flags; also once unlinked.
    #[test]
    fn a_file_reopened_is_a_new_open_file_of_the_same_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        std::fs::remove_file(&path).unwrap();
        let g = reopen(&f).unwrap();
        let mut buf = [0u8; 5];
        g.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        g.write_all_at(b"J", 0).unwrap();
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"Jello");
        // Not a duplicate: closing one leaves the other, and their
        // offsets (of the open file) are their own.
        use std::io::{Read, Seek};
        let mut f2 = &f;
        let mut g2 = &g;
        f2.seek(std::io::SeekFrom::Start(3)).unwrap();
        let mut one = [0u8; 1];
        g2.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"J", "the offset is shared: a duplicate");
        assert_ne!(f.as_raw_fd(), g.as_raw_fd());
        // O_DIRECT goes with it (where the file system has it).
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("d"));
        if let Ok(d) = direct {
            let again = reopen(&d).unwrap();
            let flags = OFlag::from_bits_truncate(fcntl(&again, FcntlArg::F_GETFL).unwrap());
            assert!(flags.contains(OFlag::O_DIRECT));
            assert_eq!(flags & OFlag::O_ACCMODE, OFlag::O_RDWR);
        }
    }
}
