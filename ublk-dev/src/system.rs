//! Process-level set-up of the device daemon: its own mount namespace,
//! readiness notification to systemd, and a heap that stays small.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

use crate::error::{Error, Result};

/// Keep the heap small: at most two malloc arenas (glibc), however many
/// threads allocate. glibc gives each thread that meets contention an
/// arena of its own and keeps what was freed in each; with the
/// replicator's data streams on blocking threads that held some 100 MiB
/// after an initial sync, against 45 MiB with two (bench-replication).
/// Call it first thing, before threads start.
pub fn limit_heap_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hand the heap's free memory back to the system (glibc keeps it
/// otherwise), with the kept zstd contexts: after a big epoch, an idle
/// daemon shrinks to its working set.
pub fn return_free_memory() {
    ublk_mirror_common::block::drop_contexts();
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The nice value of the replicator's threads (reading the device,
/// hashing, compressing, sending): when the CPU is short, the device's
/// own I/O comes first (invariant 1: local I/O never pays for the
/// network). A weight of 110 against 1024 for the queue threads, not
/// idle-only, so a busy machine still mirrors.
pub const REPLICATOR_NICE: i32 = 10;

/// Run the calling thread (not the whole process: on Linux the nice value
/// is a thread's) at `nice`, if that is lower priority than it has; a
/// hint, failing quietly.
pub fn lower_this_thread(nice: i32) {
    // SAFETY: getpriority/setpriority with PRIO_PROCESS and 0 read and
    // set the calling thread's nice value; no memory is involved.
    unsafe {
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, 0);
        if *libc::__errno_location() == 0 && now < nice {
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
        }
    }
}

/// The time slice the device's I/O threads (the ublk queues, the
/// copy-on-write threads) ask the scheduler for: what they do between two
/// waits is short.
pub const IO_THREAD_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// `struct sched_attr` as `sched_setattr(2)` takes it (its first version,
/// 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Ask the scheduler to give the calling thread [`IO_THREAD_SLICE`] at a
/// time, keeping its policy and nice value: true if the kernel took it. A
/// thread with a shorter slice than the one running preempts it when it
/// wakes (EEVDF's custom slices, Linux 6.12 and later). Without one, a
/// queue thread whose I/O completed waits for the running thread's slice
/// to end (1.4 ms on 2 CPUs, up to 2.8 ms on more; whatever its nice
/// value), so the replicator's threads at nice 10 still added up to a
/// millisecond to the device's write latency at p99 (`scripts/bench-lag`).
/// Only normal and batch threads are changed (a thread made real-time by
/// its admin is left as it is). A hint: older kernels ignore it, and it
/// fails quietly.
pub fn shorten_this_threads_slice() -> bool {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    const SCHED_FLAG_RESET_ON_FORK: u64 = 1;
    let Some(mut attr) =
        this_threads_attr().filter(|a| matches!(a.policy, SCHED_OTHER | SCHED_BATCH))
    else {
        return false;
    };
    // Only what this first version of the struct can carry (no clamps).
    attr.flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.runtime = u64::try_from(IO_THREAD_SLICE.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: sched_setattr reads `attr`, a valid `struct sched_attr` of
    // `attr.size` bytes, and changes only the calling thread.
    let set = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    set == 0 && this_threads_slice() == Some(attr.runtime)
}

/// The calling thread's scheduling attributes (`sched_getattr`), with
/// `size` set for [`SchedAttr`].
fn this_threads_attr() -> Option<SchedAttr> {
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a
    // `struct sched_attr` of that size; tid 0 is the calling thread.
    let got = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    (got == 0).then_some(SchedAttr { size, ..attr })
}

/// The calling thread's time slice in ns, as the kernel reports it (Linux
/// 6.12 and later; `None` before, where it reports none).
fn this_threads_slice() -> Option<u64> {
    this_threads_attr().map(|a| a.runtime).filter(|&ns| ns != 0)
}

/// Go on in the background: fork; the child (`Ok(None)`) carries on in a
/// session of its own with its stdout a pipe to the parent; the parent
/// waits for the child's first line, prints it and returns `Some(0)`, or,
/// if the child ends before saying anything, returns `Some` of its exit
/// status. Call before any thread is started.
pub fn background() -> Result<Option<i32>> {
    use nix::unistd::{dup2_stdout, fork, setsid, ForkResult};
    use std::io::BufRead;
    let (read, write) = nix::unistd::pipe().map_err(|e| Error::io("making a pipe", e.into()))?;
    // SAFETY: no thread has been started (the caller's contract), so the
    // child may run anything.
    match unsafe { fork() }.map_err(|e| Error::io("forking", e.into()))? {
        ForkResult::Child => {
            drop(read);
            dup2_stdout(&write).map_err(|e| Error::io("redirecting stdout", e.into()))?;
            drop(write);
            let _ = setsid();
            Ok(None)
        }
        ForkResult::Parent { child } => {
            drop(write);
            let mut line = String::new();
            let _ = std::io::BufReader::new(std::fs::File::from(read)).read_line(&mut line);
            if !line.is_empty() {
                print!("{line}");
                return Ok(Some(0));
            }
            let code = match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) if code != 0 => code,
                _ => 1,
            };
            Ok(Some(code))
        }
    }
}

/// After [`background`]'s child is ready: its output goes to `log`
/// (appended), its input is `/dev/null`, and the parent's pipe is closed.
pub fn detach_output(log: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .or_else(|_| std::fs::OpenOptions::new().write(true).open("/dev/null"));
    let null = std::fs::File::open("/dev/null");
    // SAFETY: dup2 onto the standard descriptors of this process.
    unsafe {
        if let Ok(f) = &opened {
            libc::dup2(f.as_raw_fd(), 1);
            libc::dup2(f.as_raw_fd(), 2);
        }
        if let Ok(n) = &null {
            libc::dup2(n.as_raw_fd(), 0);
        }
    }
}

/// Mark this process as one that writes back memory (PR_SET_IO_FLUSHER:
/// its allocations do no I/O reclaim and it is not throttled as a dirtier),
/// as a driver serving a block device must be: otherwise a copy-on-write
/// thread, the on-demand fetcher or the replicator, short of memory, can
/// wait on writes to the very device that waits on it. Threads inherit
/// it, so it is called before any is started; without CAP_SYS_RESOURCE it
/// is only logged.
pub fn io_flusher() {
    /// `PR_SET_IO_FLUSHER` (linux/prctl.h, since 5.6; not in the libc crate).
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r != 0 {
        tracing::debug!(
            "PR_SET_IO_FLUSHER: {} (memory reclaim may wait on this device's own I/O)",
            std::io::Error::last_os_error()
        );
    }
}

/// Move this process into a mount namespace of its own, with no mount
/// propagation from the host, holding no file system that lives on a ublk
/// device.
///
/// A file system mounted on `/dev/ublkbN` must never stay mounted in the
/// daemon's own namespace: the user's `umount` would not end it, writes
/// would still reach a device being stopped, and the daemon's exit would
/// have to unmount it, which needs I/O that only the exiting daemon could
/// serve (libublk-rs issue #50). A daemon started after the file system was
/// mounted (`recover`) inherits such mounts, so they are detached here;
/// propagation being off, the host's mounts are untouched. A ublk file
/// system that holds one of `keep` (the device's backing file, its state
/// directory: a device stacked on another's file system) stays: the
/// daemon holds it open anyway, and needs its paths.
/// Must be called before any thread is started.
pub fn private_mount_namespace(keep: &[&Path]) -> Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    // Resolved before anything is detached (a state directory not made yet
    // by its parent).
    let keep: Vec<std::path::PathBuf> = keep
        .iter()
        .map(|p| {
            std::fs::canonicalize(p).unwrap_or_else(|_| {
                match (p.parent().map(std::fs::canonicalize), p.file_name()) {
                    (Some(Ok(dir)), Some(name)) => dir.join(name),
                    _ => p.to_path_buf(),
                }
            })
        })
        .collect();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| Error::io("creating a private mount namespace", e.into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::io("making mounts private", e.into()))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    for mount_point in mounts_of(&mountinfo, &ublk_block_devices()) {
        if keep.iter().any(|k| k.starts_with(&mount_point)) {
            tracing::debug!(%mount_point, "kept in the daemon's namespace: the device's files live on it");
            continue;
        }
        match umount2(mount_point.as_str(), MntFlags::MNT_DETACH) {
            Ok(()) => {
                tracing::debug!(%mount_point, "detached a ublk file system from the daemon's namespace")
            }
            Err(e) => {
                tracing::warn!(%mount_point, "cannot detach from the daemon's namespace: {e}")
            }
        }
    }
    Ok(())
}

/// `major:minor` of every ublk block device.
fn ublk_block_devices() -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ublkb"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("dev")).ok())
        .map(|d| d.trim().to_string())
        .collect()
}

/// Mount points (deepest first) in `mountinfo` whose device is one of `devices`.
fn mounts_of(mountinfo: &str, devices: &[String]) -> Vec<String> {
    let mut found: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| {
            // mountinfo(5): id parent major:minor root mount-point ...
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            let mount_point = fields.nth(1)?;
            devices
                .iter()
                .any(|d| d == dev)
                .then(|| unescape_mountinfo(mount_point))
        })
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.matches('/').count()));
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| bytes[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(o) => {
                out.push(o.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Tell systemd (when started by it with `Type=notify`) about our state,
/// e.g. `"READY=1\nSTATUS=serving /dev/ublkb0"`. Does nothing outside systemd.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mounts_of_ublk_devices_deepest_first() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 259:0 / /mnt/disk rw,relatime shared:9 - ext4 /dev/ublkb0 rw
31 30 259:1 / /mnt/disk/inner\\040dir rw - xfs /dev/ublkb1 rw
32 22 0:5 / /dev rw - devtmpfs udev rw
";
        let devices = vec!["259:0".to_string(), "259:1".to_string()];
        assert_eq!(
            mounts_of(mountinfo, &devices),
            vec!["/mnt/disk/inner dir".to_string(), "/mnt/disk".to_string()]
        );
        assert!(mounts_of(mountinfo, &[]).is_empty());
    }

    fn nice_of_this_thread() -> i32 {
        // SAFETY: reads the calling thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// The replicator's threads yield to the device's: lowering one
    /// thread leaves the others (the queue threads) as they were, and
    /// never raises a thread already lower.
    #[test]
    fn a_thread_is_lowered_alone_and_never_raised() {
        let before = nice_of_this_thread();
        let (lowered, lower_still) = std::thread::spawn(move || {
            lower_this_thread(before + 5);
            let lowered = nice_of_this_thread();
            lower_this_thread(before + 2);
            (lowered, nice_of_this_thread())
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + 5).min(19));
        assert_eq!(lower_still, lowered, "raised back");
        assert_eq!(nice_of_this_thread(), before, "the other threads changed");
    }

    /// The device's I/O threads ask for a short slice: the thread that asks
    /// gets it alone, and keeps its nice value. Where the kernel reports
    /// slices (6.12 and later), it reads back as asked.
    #[test]
    fn a_threads_slice_is_shortened_alone_keeping_its_nice_value() {
        let default = this_threads_slice();
        let nice = nice_of_this_thread();
        let (took, slice, nice_after) = std::thread::spawn(move || {
            lower_this_thread(nice + 3);
            let took = shorten_this_threads_slice();
            (took, this_threads_slice(), nice_of_this_thread())
        })
        .join()
        .unwrap();
        assert_eq!(nice_after, (nice + 3).min(19), "its nice value changed");
        assert_eq!(this_threads_slice(), default, "another thread's changed");
        match default {
            Some(default) => {
                assert_ne!(default, 100_000, "the default is already as short");
                assert!(took, "a kernel with slices refused one");
                assert_eq!(slice, Some(100_000));
            }
            None => assert!(!took && slice.is_none(), "a slice on a kernel without"),
        }
    }

    #[test]
    fn notifies_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        // The only test that touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        sd_notify("READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
