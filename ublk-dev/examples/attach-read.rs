//! Benchmark driver for `scripts/bench-attach`: read a version of a volume
//! on demand as an attached device does ([`ublk_dev::ondemand`], the real
//! fetcher and a real mirror-server; no kernel driver needed).
//!
//! Prints one JSON line per measure:
//! - `first_byte`: from nothing (connect, pin the version) to the first
//!   4 KiB read at the middle of the volume;
//! - `random_cold`: 200 random 4 KiB reads of blocks not yet local
//!   (latency p50 and p99);
//! - `sequential_cold`: the whole volume in 512 KiB reads (the kernel's
//!   largest request), fetched as read;
//! - `sequential_cached`: the same again, from the local cache;
//! - with `--instant TARGET`, an instant restore into a new file:
//!   `instant_usable`, the time until its first block (where a file
//!   system's superblock lies) reads, and `instant_filled`, the time
//!   until every block is local.
//!
//! ```text
//! attach-read --client-dir DIR --volume NAME [--at SNAPSHOT] [--cache-dir DIR]
//!             [--instant TARGET]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ublk_dev::ondemand::{Fetcher, OnDemandOptions};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let client_dir = PathBuf::from(arg(&args, "--client-dir").expect("--client-dir DIR"));
    let volume = arg(&args, "--volume").expect("--volume NAME");
    let cache_dir = PathBuf::from(arg(&args, "--cache-dir").unwrap_or_else(|| "/var/tmp".into()));
    let started = Instant::now();
    let cache = tempfile::tempfile_in(&cache_dir).expect("a cache file");
    let fetcher = Fetcher::open(
        OnDemandOptions {
            volume,
            at: arg(&args, "--at"),
            client_dir,
            writable: false,
            cache_limit: u64::MAX,
            timeout: Some(Duration::from_secs(60)),
            fill: None,
        },
        |info| {
            cache.set_len(info.size).expect("sizing the cache");
            Ok((cache, true))
        },
    )
    .expect("opening the version");
    let od = fetcher.shared().clone();
    let fetching = std::thread::spawn(move || fetcher.run());
    let size = od.info().size;
    let mut page = vec![0u8; 4096];
    od.read_blocking(&mut page, size / 2 / 4096 * 4096)
        .expect("first read");
    let first = started.elapsed();
    println!(
        "{{\"phase\":\"first_byte\",\"seconds\":{:.4},\"size\":{size}}}",
        first.as_secs_f64()
    );

    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lat = Vec::new();
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = x % (size / 4096) * 4096;
        let t = Instant::now();
        od.read_blocking(&mut page, at).expect("random read");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "{{\"phase\":\"random_cold\",\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    for phase in ["sequential_cold", "sequential_cached"] {
        let before = od.status().fetched_bytes;
        let mut buf = vec![0u8; 512 << 10];
        let t = Instant::now();
        let mut at = 0;
        while at < size {
            let len = (size - at).min(buf.len() as u64) as usize;
            od.read_blocking(&mut buf[..len], at)
                .expect("sequential read");
            at += len as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        let s = od.status();
        println!(
            "{{\"phase\":\"{phase}\",\"seconds\":{secs:.3},\"mib_per_s\":{:.1},\"fetched_bytes\":{},\"wire_bytes\":{}}}",
            size as f64 / secs / 1048576.0,
            s.fetched_bytes - before,
            s.wire_bytes
        );
    }
    od.stop();
    fetching.join().expect("the fetcher");

    let Some(target) = arg(&args, "--instant").map(PathBuf::from) else {
        return;
    };
    let started = Instant::now();
    let fetcher = Fetcher::open(
        OnDemandOptions {
            volume: od.volume().to_string(),
            at: Some(od.info().snapshot.clone()),
            client_dir: PathBuf::from(arg(&args, "--client-dir").expect("--client-dir DIR")),
            writable: true,
            cache_limit: u64::MAX,
            timeout: Some(Duration::from_secs(60)),
            fill: Some(ublk_dev::ondemand::FillOptions {
                live: target.with_extension("live"),
                state: target.with_extension("fill"),
                target: target.clone(),
                rate: None,
            }),
        },
        |info| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&target)
                .expect("a new target");
            file.set_len(info.size).expect("sizing the target");
            Ok((file, true))
        },
    )
    .expect("opening the instant restore");
    let restoring = fetcher.shared().clone();
    let fetching = std::thread::spawn(move || fetcher.run());
    restoring
        .read_blocking(&mut page, 0)
        .expect("reading the first block");
    println!(
        "{{\"phase\":\"instant_usable\",\"seconds\":{:.4}}}",
        started.elapsed().as_secs_f64()
    );
    while !restoring.status().filled {
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = restoring.status();
    println!(
        "{{\"phase\":\"instant_filled\",\"seconds\":{:.3},\"fetched_bytes\":{},\"wire_bytes\":{}}}",
        started.elapsed().as_secs_f64(),
        s.fetched_bytes,
        s.wire_bytes
    );
    restoring.stop();
    fetching.join().expect("the fetcher");
}
