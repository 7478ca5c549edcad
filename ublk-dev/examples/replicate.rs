//! Benchmark driver for `scripts/bench-replication`: mirror an existing
//! image file through the real replicator, without the kernel driver.
//!
//! The file is opened as a device's backing file would be, with a new
//! journal (so its whole content is a resync), and the replicator ships it
//! to the enrolled server. Then `--rewrite-percent` of its 4 KiB blocks are
//! rewritten at random through the device's I/O path, and the mirror
//! catches up. Each phase prints one JSON line: wall time, CPU time of this
//! process, bytes read, bytes on the wire.
//!
//! Each line also says this process's memory: its resident set at the
//! end of the phase and its peak during it. A last line, `idle`, is the
//! resident set a second after the catch-up, with nothing to do.
//!
//! ```text
//! replicate --image IMG --client-dir DIR --state-dir DIR --volume NAME
//!           [--rewrite-percent 1] [--server-pid PID] [--cold]
//!     # --cold: the page cache dropped before each phase (needs root)
//! replicate --ceiling IMG [--threads N]  # sha256 + zstd of the same data, no network (N: all cores)
//! replicate --memory-probe SIZE --state-dir DIR [--writes N]
//!     # memory of tracking a sparse device of SIZE (e.g. 1T): resident set
//!     # before, after opening it with a new journal (all of it to resync),
//!     # and after N (10000) scattered 4 KiB writes recorded as changes
//! replicate --lag --image IMG --client-dir DIR --state-dir DIR --volume NAME
//!           [--rate 50M] [--seconds 60] [--interval-ms 5000]
//!     # sustained writes: 64 KiB random writes at --rate for --seconds,
//!     # once mirrored (cuts every --interval-ms, as the daemon's default)
//!     # and once with the mirror detached (tracked, never cut); per phase
//!     # the write latency (p50, p99, max, writes over 100 ms), the rate
//!     # reached, and while mirrored the lag `status` shows, sampled every
//!     # 100 ms (p50, p99, max), and how long the mirror took to catch up
//! ```

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk_dev::backing::{Backing, BackingOptions};
use ublk_dev::engine::uring::LocalIo;
use ublk_dev::engine::{Engine, Geometry, Request, MAX_IO_BYTES};
use ublk_dev::replicator::{MirrorSettings, Replicator};
use ublk_dev::tracking::{History, Tracker, TrackerOptions, DEFAULT_COW_MEMORY};

fn cpu_seconds() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(usage.user_time()) + t(usage.system_time())
}

/// CPU seconds a process (the server) used so far, from /proc.
fn cpu_of(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the
    // 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// This process's resident set and its peak since the last
/// [`reset_peak`], in bytes (from /proc/self/status).
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Start counting the peak resident set again (Linux: clear_refs 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// `path` opened as a device's backing file (made sparse at `create`'s
/// size when given), with a new journal in `state_dir`: all of it to resync.
fn open_tracked(path: &Path, create: Option<u64>, state_dir: &Path) -> (Backing, Tracker) {
    let backing = Backing::open(&BackingOptions {
        path,
        size: create,
        create: create.is_some(),
        block_size: 4096,
        direct_io: true,
    })
    .expect("open the backing file");
    let (tracker, _) = Tracker::open(&TrackerOptions {
        state_dir,
        identity: (path, 1),
        file: backing.file(),
        device_size: backing.size(),
        region_size: 4 << 20,
        history: History::ExistingFile,
        cow_memory: DEFAULT_COW_MEMORY,
    })
    .expect("open the journal");
    (backing, tracker)
}

/// The engine of a device of `size` bytes with 4 KiB blocks, as the
/// daemon makes it.
fn engine(size: u64) -> Engine {
    Engine::new(Geometry {
        size,
        block_size: 4096,
        max_io: MAX_IO_BYTES,
        discard: true,
    })
}

/// A xorshift64 generator: cheap, repeatable offsets and data.
fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// `--memory-probe`: what tracking a sparse device of `size` costs.
fn memory_probe(size: u64, state_dir: &Path, writes: u64) {
    std::fs::create_dir_all(state_dir).expect("state dir");
    let path = state_dir.join("probe.img");
    let _ = std::fs::remove_file(&path);
    let (before, _) = memory();
    let (backing, tracker) = open_tracked(&path, Some(size), &state_dir.join("journal"));
    let (opened, _) = memory();
    let engine = engine(size);
    let tracker = Arc::new(tracker);
    let mut io = LocalIo::new(&engine, backing.file())
        .expect("io")
        .with_tracker(&tracker);
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let data = vec![0x5au8; 4096];
    for _ in 0..writes {
        io.submit(Request::write((next() % (size / 4096)) * 4096, 4096), &data)
            .expect("write");
    }
    let (written, peak) = memory();
    println!(
        "{{\"phase\":\"memory-probe\",\"device_bytes\":{size},\"rss_before\":{before},\"rss_opened\":{opened},\"rss_after_writes\":{written},\"peak_rss_bytes\":{peak},\"writes\":{writes},\"regions\":{}}}",
        tracker.status().regions_marked
    );
    drop(io);
    drop(tracker);
    let _ = std::fs::remove_file(&path);
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Wait until everything recorded is released (on the mirror).
fn sync(tracker: &Tracker, replicator: &Replicator) {
    let mut target = tracker.sync_target();
    loop {
        let released;
        (released, target) = tracker.sync_progress(target);
        if released >= target {
            return;
        }
        replicator.kick().notify_one();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// sha256 + zstd (level 3) of every 64 KiB block of `image` but its holes
/// (zero blocks hashed, not compressed, as the replicator does), on
/// `threads` threads
/// each taking a contiguous part: what the CPUs allow, with no network and
/// no store.
fn ceiling(image: &Path, threads: usize) {
    use sha2::{Digest as _, Sha256};
    let size = std::fs::metadata(image).expect("stat image").len();
    let part = size.div_ceil(threads as u64).div_ceil(64 << 10) * (64 << 10);
    let started = Instant::now();
    let cpu = cpu_seconds();
    let wire: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads as u64)
            .map(|i| {
                scope.spawn(move || {
                    let f = std::fs::File::open(image).expect("open image");
                    let mut buf = vec![0u8; 64 << 10];
                    let mut wire = 0u64;
                    let mut at = i * part;
                    let end = ((i + 1) * part).min(size);
                    // The holes are skipped unread, as the first sync does.
                    let holes = ublk_mirror_common::fsutil::holes(&f, at.min(end)..end);
                    while at < end {
                        if let Some(h) = holes.iter().find(|h| h.contains(&at)) {
                            at = h.end;
                            continue;
                        }
                        let n = (size - at).min(buf.len() as u64) as usize;
                        f.read_exact_at(&mut buf[..n], at).expect("read");
                        let block = &buf[..n];
                        let _digest: [u8; 32] = Sha256::digest(block).into();
                        if block.iter().any(|&b| b != 0) {
                            wire += ublk_mirror_common::block::compress(block, 3)
                                .expect("zstd")
                                .len()
                                .min(n) as u64;
                        }
                        at += n as u64;
                    }
                    wire
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"phase\":\"ceiling\",\"threads\":{threads},\"seconds\":{secs:.3},\"cpu_seconds\":{:.3},\"bytes\":{size},\"wire_bytes\":{wire},\"mib_per_s\":{:.1}}}",
        cpu_seconds() - cpu,
        size as f64 / (1 << 20) as f64 / secs
    );
}

/// The value at quantile `q` (0..=1) of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// One phase of `--lag`: 64 KiB random writes at `rate` bytes per second
/// for `seconds`, paced open-loop (a write that falls behind its slot goes
/// at once, so a stall shows as latency, not as a slower schedule). Prints
/// the phase's line; with a replicator, also the lag `status` showed.
/// The writes of `--lag`: at `rate` bytes per second for `seconds` on a
/// device of `size` bytes.
#[derive(Clone, Copy)]
struct Load {
    size: u64,
    rate: u64,
    seconds: u64,
}

fn sustained(
    label: &str,
    io: &mut LocalIo<'_>,
    Load {
        size,
        rate,
        seconds,
    }: Load,
    tracker: &Tracker,
    replicator: Option<&Replicator>,
    seed: u64,
) {
    const WRITE: u64 = 64 << 10;
    let count = rate * seconds / WRITE;
    let period = Duration::from_secs_f64(WRITE as f64 / rate as f64);
    let mut next = xorshift(seed);
    let mut data = vec![0u8; WRITE as usize];
    let mut latencies = Vec::with_capacity(count as usize);
    // Writes during which the journal was synced: a region marked again
    // (one cleared by a release, the mirror's doing) before the write.
    let mut marking = Vec::new();
    // Writes held back until the chunks they overwrite were preserved for
    // the sealed epoch being shipped (copy-on-write), and the others.
    let mut cow = Vec::new();
    let mut other = Vec::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let lags = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut lags = Vec::new();
            while let Some(r) = replicator {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                lags.push(r.status().lag_ms as f64 / 1000.0);
                std::thread::sleep(Duration::from_millis(100));
            }
            lags
        });
        // The writer is what a queue thread of the daemon would be.
        ublk_dev::system::shorten_this_threads_slice();
        let started = Instant::now();
        for i in 0..count {
            let slot = started + period * i as u32;
            if let Some(wait) = slot.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let at = (next() % (size / WRITE)) * WRITE;
            for word in data.chunks_mut(8) {
                word.copy_from_slice(&next().to_le_bytes());
            }
            let syncs = tracker.journal_syncs();
            let waits = tracker.cow_waits();
            let t = Instant::now();
            io.submit(Request::write(at, WRITE), &data).expect("write");
            let took = t.elapsed().as_secs_f64() * 1000.0;
            latencies.push(took);
            let marked = tracker.journal_syncs() != syncs;
            if marked {
                marking.push(took);
            }
            if tracker.cow_waits() != waits {
                cow.push(took);
            } else if !marked {
                other.push(took);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut lags = sampler.join().expect("the lag sampler");
        lags.sort_by(f64::total_cmp);
        (lags, elapsed)
    });
    let (lags, elapsed) = lags;
    // How long the mirror takes to hold everything written.
    let drain = replicator.map_or(0.0, |r| {
        let t = Instant::now();
        sync(tracker, r);
        t.elapsed().as_secs_f64()
    });
    let stalls = latencies.iter().filter(|&&l| l > 100.0).count();
    latencies.sort_by(f64::total_cmp);
    marking.sort_by(f64::total_cmp);
    cow.sort_by(f64::total_cmp);
    other.sort_by(f64::total_cmp);
    println!(
        "{{\"phase\":\"{label}\",\"writes\":{count},\"mb_per_s\":{:.1},\"latency_ms_p50\":{:.3},\"latency_ms_p99\":{:.3},\"latency_ms_max\":{:.3},\"writes_over_100ms\":{stalls},\"writes_marking\":{},\"latency_ms_p99_marking\":{:.3},\"writes_cow\":{},\"latency_ms_p99_cow\":{:.3},\"latency_ms_p99_other\":{:.3},\"lag_s_p50\":{:.2},\"lag_s_p99\":{:.2},\"lag_s_max\":{:.2},\"drain_seconds\":{drain:.2}}}",
        (count * WRITE) as f64 / 1e6 / elapsed,
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0),
        marking.len(),
        quantile(&marking, 0.99),
        cow.len(),
        quantile(&cow, 0.99),
        quantile(&other, 0.99),
        quantile(&lags, 0.5),
        quantile(&lags, 0.99),
        lags.last().copied().unwrap_or(0.0),
    );
}

/// `--lag`: sustained writes with the mirror attached, then without.
fn lag(args: &[String]) {
    let need = |n: &str| arg(args, n).unwrap_or_else(|| panic!("{n} is required (see the source)"));
    let image = PathBuf::from(need("--image"));
    let rate: ublk_mirror_common::ByteSize = arg(args, "--rate")
        .unwrap_or_else(|| "50M".into())
        .parse()
        .expect("--rate SIZE");
    // --rate counts as the benchmark's MB/s: decimal megabytes.
    let rate = rate.bytes() * 1_000_000 / (1 << 20);
    let seconds: u64 = arg(args, "--seconds").map_or(60, |s| s.parse().expect("--seconds N"));
    let interval: u64 =
        arg(args, "--interval-ms").map_or(5000, |s| s.parse().expect("--interval-ms N"));
    let (backing, tracker) = open_tracked(&image, None, Path::new(&need("--state-dir")));
    let size = backing.size();
    let tracker = Arc::new(tracker);
    let engine = engine(size);
    let mut io = LocalIo::new(&engine, backing.file())
        .expect("io")
        .with_tracker(&*tracker);
    let replicator = Replicator::start(
        tracker.clone(),
        MirrorSettings {
            volume: need("--volume"),
            client_dir: PathBuf::from(need("--client-dir")),
            interval: Duration::from_millis(interval),
            zstd_level: 3,
            bandwidth: None,
            precopy: Some(ublk_dev::config::DEFAULT_PRECOPY),
            // Nothing else uses the device while it syncs.
            min_rate: 0,
            activity: None,
            let_go_after: ublk_dev::replicator::LET_GO_AFTER,
        },
    )
    .expect("start the replicator");
    // The device on the mirror first, so that only the writes are behind.
    let t = Instant::now();
    sync(&tracker, &replicator);
    println!(
        "{{\"phase\":\"initial\",\"seconds\":{:.3},\"bytes\":{size}}}",
        t.elapsed().as_secs_f64()
    );
    let load = Load {
        size,
        rate,
        seconds,
    };
    sustained("mirrored", &mut io, load, &tracker, Some(&replicator), 1);
    drop(replicator);
    sustained("detached", &mut io, load, &tracker, None, 2);
}

/// With `--cold`, before a timed phase: everything written reaches the
/// disk and the page cache is emptied, as for a disk that is not in
/// memory (needs root).
fn drop_caches(cold: bool) {
    if cold {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", "3")
            .expect("--cold: dropping the page cache (needs root)");
    }
}

fn main() {
    // as the daemon does
    ublk_dev::system::limit_heap_arenas();
    // RUST_LOG=debug shows where an epoch's time goes (on stderr).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(image) = arg(&args, "--ceiling") {
        let threads = arg(&args, "--threads").map_or_else(
            || std::thread::available_parallelism().map_or(1, usize::from),
            |t| t.parse().expect("--threads N"),
        );
        return ceiling(Path::new(&image), threads.max(1));
    }
    if args.iter().any(|a| a == "--lag") {
        return lag(&args);
    }
    if let Some(size) = arg(&args, "--memory-probe") {
        let size: ublk_mirror_common::ByteSize = size.parse().expect("--memory-probe SIZE");
        let state_dir = PathBuf::from(arg(&args, "--state-dir").expect("--state-dir"));
        let writes = arg(&args, "--writes").map_or(10_000, |w| w.parse().expect("--writes N"));
        return memory_probe(size.bytes(), &state_dir, writes);
    }
    let need =
        |n: &str| arg(&args, n).unwrap_or_else(|| panic!("{n} is required (see the source)"));
    let image = PathBuf::from(need("--image"));
    let client_dir = PathBuf::from(need("--client-dir"));
    let state_dir = PathBuf::from(need("--state-dir"));
    let volume = need("--volume");
    let percent: f64 = arg(&args, "--rewrite-percent").map_or(1.0, |p| p.parse().expect("percent"));
    let server = arg(&args, "--server-pid").map(|p| p.parse::<u32>().expect("pid"));
    let cold = args.iter().any(|a| a == "--cold");

    let (backing, tracker) = open_tracked(&image, None, &state_dir);
    let size = backing.size();
    let tracker = Arc::new(tracker);
    let replicator = Replicator::start(
        tracker.clone(),
        MirrorSettings {
            volume,
            client_dir,
            // Cuts only when asked (below), as a peer sees the final file.
            interval: Duration::from_secs(3600),
            zstd_level: 3,
            bandwidth: None,
            precopy: Some(ublk_dev::config::DEFAULT_PRECOPY),
            // Nothing else uses the device while it syncs.
            min_rate: 0,
            activity: None,
            let_go_after: ublk_dev::replicator::LET_GO_AFTER,
        },
    )
    .expect("start the replicator");

    // Phase 1: the initial sync (the whole file is a resync).
    drop_caches(cold);
    reset_peak();
    let started = Instant::now();
    let cpu = cpu_seconds();
    let server_cpu = cpu_of(server);
    sync(&tracker, &replicator);
    let s = replicator.status();
    let (rss, peak) = memory();
    println!(
        "{{\"phase\":\"initial\",\"seconds\":{:.3},\"cpu_seconds\":{:.3},\"server_cpu_seconds\":{:.3},\"bytes\":{size},\"wire_bytes\":{},\"same_bytes\":{},\"known_bytes\":{},\"rss_bytes\":{rss},\"peak_rss_bytes\":{peak}}}",
        started.elapsed().as_secs_f64(),
        cpu_seconds() - cpu,
        cpu_of(server) - server_cpu,
        s.wire_bytes_total,
        s.resync_same_bytes,
        s.known_bytes
    );

    // Phase 2: rewrite a share of the 4 KiB blocks at random, catch up.
    let engine = engine(size);
    let mut io = LocalIo::new(&engine, backing.file())
        .expect("io")
        .with_tracker(&tracker);
    let blocks = size / 4096;
    let count = ((blocks as f64) * percent / 100.0) as u64;
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    let mut data = vec![0u8; 4096];
    for _ in 0..count {
        let b = next() % blocks;
        for chunk in data.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        io.submit(Request::write(b * 4096, 4096), &data)
            .expect("rewrite");
    }
    drop_caches(cold);
    reset_peak();
    let started = Instant::now();
    let cpu = cpu_seconds();
    let server_cpu = cpu_of(server);
    let before = replicator.status();
    sync(&tracker, &replicator);
    let s = replicator.status();
    let (rss, peak) = memory();
    println!(
        "{{\"phase\":\"catch-up\",\"seconds\":{:.3},\"cpu_seconds\":{:.3},\"server_cpu_seconds\":{:.3},\"bytes\":{},\"wire_bytes\":{},\"epochs\":{},\"rss_bytes\":{rss},\"peak_rss_bytes\":{peak}}}",
        started.elapsed().as_secs_f64(),
        cpu_seconds() - cpu,
        cpu_of(server) - server_cpu,
        count * 4096,
        s.wire_bytes_total - before.wire_bytes_total,
        s.epochs_shipped - before.epochs_shipped
    );

    // Idle: mirrored, nothing to do.
    std::thread::sleep(Duration::from_secs(1));
    let (rss, _) = memory();
    println!("{{\"phase\":\"idle\",\"rss_bytes\":{rss}}}");
}
