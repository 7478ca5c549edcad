//! `attach` without the kernel: a version on a mirror server on 127.0.0.1
//! read on demand through [`ublk_dev::ondemand`] exactly as the device's
//! queues read it, checked against the device as it was at the snapshot,
//! with a cache smaller than the volume, across link loss, and with a
//! writable overlay.

use std::path::Path;
use std::time::Duration;

use ublk_dev::control::{Client, Server};
use ublk_dev::engine::Request;
use ublk_dev::ondemand::{Fetcher, OnDemand, OnDemandOptions};

use ublk_dev::replicator::Replicator;
use ublk_dev::tracking::{Tracker, TrackerOptions};
use ublk_mirror_common::client::Link;
use ublk_mirror_common::proto::Writer;

use crate::mirror::{image, mirrored, settings, synced, Mirrored, SIZE};
use crate::support::TestServer;

fn options(client_dir: &Path, at: Option<&str>, cache_limit: u64) -> OnDemandOptions {
    OnDemandOptions {
        volume: "root".into(),
        at: at.map(str::to_string),
        client_dir: client_dir.to_path_buf(),
        writable: false,
        cache_limit,
        timeout: Some(Duration::from_secs(60)),
        fill: None,
    }
}

/// Open `opts` on a cache in `dir` and run its fetcher on a thread.
fn attach(
    dir: &Path,
    opts: OnDemandOptions,
) -> (std::sync::Arc<OnDemand>, std::thread::JoinHandle<()>) {
    let cache = tempfile::tempfile_in(dir).unwrap();
    let fetcher = Fetcher::open(opts, |info| {
        cache.set_len(info.size).unwrap();
        Ok((cache, true))
    })
    .unwrap();
    let od = fetcher.shared().clone();
    (od, std::thread::spawn(move || fetcher.run()))
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Random reads (any alignment a block device allows) equal `expected`.
fn random_reads_match(od: &OnDemand, expected: &[u8], reads: usize, seed: u64) {
    let mut x = seed | 1;
    for _ in 0..reads {
        let sector = next(&mut x) % (SIZE / 512 - 1);
        let len = (512 * (1 + next(&mut x) % 256)).min(SIZE - sector * 512);
        let mut buf = vec![0u8; len as usize];
        let at = sector * 512;
        od.read_blocking(&mut buf, at).unwrap();
        assert!(
            buf == expected[at as usize..(at + len) as usize],
            "{len} bytes at {at} differ from the version"
        );
    }
}

#[test]
fn an_attached_version_reads_as_it_was_through_a_small_cache_and_link_loss() {
    // Snapshot "then"; the device moves on, the mirror follows.
    let Mirrored {
        dir,
        data,
        listen,
        client_dir,
        server,
        versions,
    } = mirrored(&[(1, Some("then")), (2, None)]);
    let [then, now] = <[Vec<u8>; 2]>::try_from(versions).unwrap();
    assert_ne!(then, now);

    // A 2 MiB cache for a 32 MiB volume: blocks are evicted and fetched again.
    let (od, fetching) = attach(dir.path(), options(&client_dir, Some("then"), 2 << 20));
    assert_eq!(od.info().snapshot, "then");
    assert_eq!(od.info().size, SIZE);
    random_reads_match(&od, &then, 300, 7);
    // A whole sequential pass, twice.
    for _ in 0..2 {
        let mut buf = vec![0u8; 512 << 10];
        for at in (0..SIZE).step_by(buf.len()) {
            od.read_blocking(&mut buf, at).unwrap();
            assert!(buf == then[at as usize..at as usize + buf.len()], "at {at}");
        }
    }
    let s = od.status();
    assert!(s.cached_bytes <= 2 << 20, "{s:?}");
    // Its metrics, as `ublk-mirror metrics` renders the status.
    let status = ublk_dev::status::DeviceStatus {
        id: 1,
        pid: 1,
        updated_ms: 0,
        reads: 0,
        writes: 0,
        errors: 0,
        tracking: None,
        mirror: None,
        attach: Some(s.clone()),
    };
    let device = ublk_dev::metrics::Device {
        device: "ublkb1".into(),
        name: "root@then".into(),
        status: Some(status),
    };
    let m = crate::mirror::prom::parse(&ublk_dev::metrics::render(&[device]));
    let value = |name: &str| {
        crate::mirror::prom::value(&m, name, &[("device", "ublkb1"), ("name", "root@then")])
    };
    assert_eq!(
        value("ublk_mirror_attach_fetched_bytes_total"),
        s.fetched_bytes as f64
    );
    assert_eq!(
        value("ublk_mirror_attach_remaining_bytes"),
        s.remaining_bytes as f64
    );
    assert_eq!(value("ublk_mirror_link_up"), 1.0);
    assert!(
        s.fetched_bytes > SIZE,
        "evicted blocks were fetched again: {s:?}"
    );
    assert!(s.link_up);
    assert_eq!(
        (s.snapshot.as_str(), s.waiting, s.timed_out),
        ("then", 0, 0)
    );

    // The server goes away: a read waits, and goes on when it is back.
    drop(server);
    let reader = {
        let od = od.clone();
        let then = then.clone();
        std::thread::spawn(move || random_reads_match(&od, &then, 40, 11))
    };
    std::thread::sleep(Duration::from_secs(3));
    assert!(!reader.is_finished(), "reads went on without the mirror");
    let _server = TestServer::start(&data, &listen);
    reader.join().unwrap();
    assert!(od.status().link_up);
    od.stop();
    fetching.join().unwrap();

    // Now, with no --at: a snapshot of the mirror as it is now.
    let (od, fetching) = attach(dir.path(), options(&client_dir, None, 64 << 20));
    assert!(od.info().snapshot.starts_with("attach-"), "{:?}", od.info());
    random_reads_match(&od, &now, 200, 13);
    od.stop();
    fetching.join().unwrap();
}

#[test]
fn reads_fail_after_the_timeout_and_a_writable_overlay_keeps_writes_locally() {
    let Mirrored {
        dir,
        client_dir,
        server,
        mut versions,
        ..
    } = mirrored(&[(3, Some("v"))]);
    let version = versions.remove(0);

    let mut opts = options(&client_dir, Some("v"), 64 << 20);
    opts.writable = true;
    opts.timeout = Some(Duration::from_secs(2));
    let (od, fetching) = attach(dir.path(), opts);
    // Read-only requests are refused only without --writable.
    let mut expected = version.clone();
    random_writes_and_reads(&od, &mut expected, 100, &mut 5);
    assert!(od.status().dirty_bytes > 0);
    // The mirror never saw the writes.
    let mut whole = vec![0u8; SIZE as usize];
    od.read_blocking(&mut whole, 0).unwrap();
    assert!(whole == expected);
    let fresh = attach(dir.path(), options(&client_dir, Some("v"), 64 << 20));
    let mut again = vec![0u8; SIZE as usize];
    fresh.0.read_blocking(&mut again, 0).unwrap();
    assert!(again == version, "the mirror's version changed");
    fresh.0.stop();
    fresh.1.join().unwrap();
    od.stop();
    fetching.join().unwrap();

    // Without the mirror, a read of what is not local fails after the
    // timeout, with an error and never with other data.
    let (od, fetching) = attach(dir.path(), {
        let mut o = options(&client_dir, Some("v"), 64 << 20);
        o.timeout = Some(Duration::from_secs(2));
        o
    });
    let mut buf = vec![0u8; 4096];
    od.read_blocking(&mut buf, 0).unwrap();
    assert!(
        od.prepare(&Request::write(0, 4096)).is_err(),
        "a read-only version took a write"
    );
    drop(server);
    let started = std::time::Instant::now();
    let err = od.read_blocking(&mut buf, SIZE - 4096).unwrap_err();
    assert!(started.elapsed() >= Duration::from_secs(2), "{err}");
    assert_eq!(od.status().timed_out, 1);
    // What is local still reads.
    od.read_blocking(&mut buf, 0).unwrap();
    assert!(buf == version[..4096]);
    od.stop();
    fetching.join().unwrap();
}

/// An instant restore of version "v" onto `target`, its fill running.
fn instant(
    client_dir: &Path,
    target: &Path,
    state: &Path,
) -> (std::sync::Arc<OnDemand>, std::thread::JoinHandle<()>) {
    instant_at(client_dir, target, state, "v").unwrap()
}

/// An instant restore of version `at` onto `target`, its fill running.
fn instant_at(
    client_dir: &Path,
    target: &Path,
    state: &Path,
    at: &str,
) -> ublk_dev::Result<(std::sync::Arc<OnDemand>, std::thread::JoinHandle<()>)> {
    // The version's few MiB of data in about 6 s: the work below happens
    // while it fills.
    instant_limited(client_dir, target, state, at, 512 << 10)
}

/// An instant restore of version `at` onto `target`, its fill running at
/// most at `rate` bytes per second.
fn instant_limited(
    client_dir: &Path,
    target: &Path,
    state: &Path,
    at: &str,
    rate: u64,
) -> ublk_dev::Result<(std::sync::Arc<OnDemand>, std::thread::JoinHandle<()>)> {
    let opts = OnDemandOptions {
        volume: "root".into(),
        at: Some(at.into()),
        client_dir: client_dir.to_path_buf(),
        writable: true,
        cache_limit: u64::MAX,
        timeout: None,
        fill: Some(ublk_dev::ondemand::FillOptions {
            live: state.with_extension("live"),
            state: state.to_path_buf(),
            target: target.to_path_buf(),
            rate: Some(rate),
        }),
    };
    let fetcher = Fetcher::open(opts, |info| {
        let fresh = !target.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)
            .unwrap();
        if fresh {
            file.set_len(info.size).unwrap();
        }
        Ok((file, fresh))
    })?;
    let od = fetcher.shared().clone();
    Ok((od, std::thread::spawn(move || fetcher.run())))
}

/// An attach of the volume now whose local file cannot be made says that
/// the snapshot taken for it stays on the server, and how to delete it.
#[test]
fn an_attach_that_fails_locally_names_the_snapshot_it_left() {
    let m = mirrored(&[(4, None)]);
    let Err(err) = Fetcher::open(options(&m.client_dir, None, 1 << 20), |_| {
        Err(ublk_dev::Error::InvalidConfig(
            "no room for the cache".into(),
        ))
    }) else {
        panic!("opened");
    };
    let err = err.to_string();
    assert!(
        err.contains("no room for the cache")
            && err.contains("kept snapshot root@attach-")
            && err.contains("mirror-server delete laptop/root@attach-"),
        "{err}"
    );
}

/// An unfinished restore of one version is not taken for another: run
/// again naming another snapshot, it is refused (it would have gone on
/// with the first, saying nothing); naming the same, it goes on.
#[test]
fn an_unfinished_restore_is_not_taken_for_another_version() {
    let m = mirrored(&[(4, Some("v")), (5, Some("w"))]);
    let (target, state) = (m.dir.path().join("t.img"), m.dir.path().join("t.fill"));
    let (od, fetching) = instant(&m.client_dir, &target, &state);
    od.stop();
    fetching.join().unwrap();
    assert!(state.exists() && !od.status().filled);
    let err = instant_at(&m.client_dir, &target, &state, "w")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unfinished restore of root@v, not of root@w"),
        "{err}"
    );
    let (od, fetching) = instant_at(&m.client_dir, &target, &state, "v").unwrap();
    assert_eq!(od.status().snapshot, "v");
    od.stop();
    fetching.join().unwrap();
}

/// Random writes and reads through `od` (an overlay, or a restore while it
/// fills); `expected` is the version with the writes made so far.
fn random_writes_and_reads(od: &OnDemand, expected: &mut [u8], ops: usize, x: &mut u64) {
    for _ in 0..ops {
        let at = 512 * (next(x) % (SIZE / 512 - 300));
        let len = 512 * (1 + next(x) % 300) as usize;
        if next(x) % 2 == 0 {
            let bytes: Vec<u8> = (0..len).map(|_| next(x) as u8).collect();
            od.write_blocking(&bytes, at).unwrap();
            expected[at as usize..at as usize + len].copy_from_slice(&bytes);
        } else {
            let mut buf = vec![0u8; len];
            od.read_blocking(&mut buf, at).unwrap();
            assert!(
                buf == expected[at as usize..at as usize + len],
                "{len} at {at}"
            );
        }
    }
}

/// A limited fill is charged what it takes from the link: the version's
/// holes (most of it) cost nothing, so it is filled in about its data's
/// time at the rate, not the volume's; and the limit holds for the data.
#[test]
fn a_limited_fill_is_charged_what_it_sends_not_the_holes() {
    let m = mirrored(&[(4, Some("v"))]);
    let (target, state) = (m.dir.path().join("t.img"), m.dir.path().join("t.fill"));
    let rate = 1 << 20;
    let started = std::time::Instant::now();
    let (od, fetching) = instant_limited(&m.client_dir, &target, &state, "v", rate).unwrap();
    wait_filled(&od);
    let took = started.elapsed().as_secs_f64();
    let s = od.status();
    od.stop();
    fetching.join().unwrap();
    assert!(std::fs::read(&target).unwrap() == m.versions[0]);
    // The volume at the rate would take 32 s; its data about 3.
    let volume_time = SIZE as f64 / rate as f64;
    let data_time = s.wire_bytes as f64 / rate as f64;
    assert!(
        s.wire_bytes > 1 << 20 && data_time < volume_time / 4.0,
        "the version is not mostly holes: {s:?}"
    );
    assert!(
        took < volume_time / 2.0,
        "the holes were charged: filled in {took:.1} s; {s:?}"
    );
    // The first run goes at once; each later one waits for the bytes
    // before it.
    let last_run = (rate / 4) as f64 / rate as f64;
    assert!(
        took >= data_time - 2.0 * last_run,
        "the rate was not kept: {} bytes in {took:.1} s",
        s.wire_bytes
    );
}

fn wait_filled(od: &OnDemand) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !od.status().filled {
        assert!(
            std::time::Instant::now() < deadline,
            "not filled: {:?}",
            od.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_instant_restore_is_the_version_plus_the_writes_across_a_daemon_kill_and_a_server_restart() {
    let Mirrored {
        dir,
        data,
        listen,
        client_dir,
        server,
        mut versions,
    } = mirrored(&[(4, Some("v"))]);
    let version = versions.remove(0);

    let target = dir.path().join("restored.img");
    let state = dir.path().join("restored.fill");
    let mut expected = version.clone();
    let mut x = 17u64;
    let (od, fetching) = instant(&client_dir, &target, &state);
    assert!(state.exists(), "no fill state before the first write");
    random_writes_and_reads(&od, &mut expected, 60, &mut x);
    // The file system flushes; then the daemon dies (its fill state as
    // last persisted, its target as written).
    assert!(matches!(
        od.prepare(&Request::flush()),
        Ok(ublk_dev::ondemand::Prepared::Go(_))
    ));
    od.stop();
    fetching.join().unwrap();
    assert!(state.exists());
    assert!(!od.status().filled);

    // A new daemon resumes from the fill state; the server restarts under it.
    let (od, fetching) = instant(&client_dir, &target, &state);
    let before = od.status();
    assert!(
        before.remaining_bytes < SIZE,
        "nothing was resumed: {before:?}"
    );
    random_writes_and_reads(&od, &mut expected, 30, &mut x);
    drop(server);
    std::thread::sleep(Duration::from_secs(1));
    let server = TestServer::start(&data, &listen);
    random_writes_and_reads(&od, &mut expected, 30, &mut x);
    wait_filled(&od);
    // An ordinary device now: writes and reads go straight to the target.
    random_writes_and_reads(&od, &mut expected, 20, &mut x);
    assert!(!state.exists(), "the fill state outlived the fill");
    assert!(
        std::fs::read(&target).unwrap() == expected,
        "the target is not the version plus the writes"
    );
    od.stop();
    fetching.join().unwrap();
    // The same restore run again (after a reboot, say) is refused: it
    // would undo the writes; with the marker removed, it restores.
    let why = ublk_dev::ondemand::finished(&state, &target).expect("not refused");
    assert!(why.contains("root@v") && why.contains("undo"), "{why}");
    std::fs::remove_file(ublk_dev::ondemand::finished_marker(&state)).unwrap();
    assert_eq!(ublk_dev::ondemand::finished(&state, &target), None);

    // Restoring the version again onto that target moves only the blocks
    // the writes changed.
    let (od, fetching) = instant(&client_dir, &target, &state);
    wait_filled(&od);
    let s = od.status();
    assert!(std::fs::read(&target).unwrap() == version);
    let changed = version
        .chunks(64 << 10)
        .zip(expected.chunks(64 << 10))
        .filter(|(a, b)| a != b)
        .count() as u64;
    assert_eq!(s.fetched_bytes, changed * (64 << 10), "{s:?}");
    od.stop();
    fetching.join().unwrap();
    drop(server);
}

/// An instant restore under way starts again without the mirror (a
/// reboot away from the network): what is local is served at once, a read
/// of a block not here waits for the mirror, and once it is back the fill
/// ends as the version. Asked for by a time, which only the mirror can
/// say is the same snapshot, it is refused with what to do.
#[test]
fn an_instant_restore_under_way_starts_again_without_the_mirror() {
    let Mirrored {
        dir,
        data,
        listen,
        client_dir,
        server,
        mut versions,
    } = mirrored(&[(4, Some("v"))]);
    let version = versions.remove(0);
    let target = dir.path().join("restored.img");
    let state = dir.path().join("restored.fill");
    let (od, fetching) = instant(&client_dir, &target, &state);
    let epoch_ms = od.status().epoch_ms;
    assert!(epoch_ms > 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while od.status().remaining_bytes > SIZE - (2 << 20) {
        assert!(std::time::Instant::now() < deadline, "{:?}", od.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    od.stop();
    fetching.join().unwrap();
    drop(server);

    let Err(err) = instant_at(&client_dir, &target, &state, "2026-12-01T00:00:00Z") else {
        panic!("a time was taken for the snapshot without the mirror");
    };
    assert_eq!(err.kind(), ublk_dev::ErrorKind::Link, "{err}");
    assert!(err.to_string().contains("without --at"), "{err}");

    let (od, fetching) = instant(&client_dir, &target, &state);
    let s = od.status();
    assert!(!s.link_up, "{s:?}");
    assert_eq!(s.epoch_ms, epoch_ms, "the version's time was lost");
    assert!(s.remaining_bytes < SIZE, "nothing resumed: {s:?}");
    // The fill walks from the start: the first block is here.
    let mut buf = vec![0u8; 4096];
    od.read_blocking(&mut buf, 0).unwrap();
    assert!(buf == version[..4096]);
    // The last is not: its read waits for the mirror.
    let waiting = {
        let od = od.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            od.read_blocking(&mut buf, SIZE - 4096).map(|()| buf)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(!waiting.is_finished(), "a block not here was served");
    let _server = TestServer::start(&data, &listen);
    let last = waiting.join().unwrap().unwrap();
    assert!(last == version[SIZE as usize - 4096..]);
    wait_filled(&od);
    assert!(od.status().link_up);
    assert!(std::fs::read(&target).unwrap() == version);
    od.stop();
    fetching.join().unwrap();
}

/// A restore that starts over (its target and fill state removed) takes
/// nothing from the live fill state an earlier one left when its daemon
/// was killed: recovered, it is the version, whole.
#[test]
fn a_restore_started_over_takes_nothing_from_an_earlier_live_state() {
    let m = mirrored(&[(4, Some("v"))]);
    let (version, client_dir) = (&m.versions[0], &m.client_dir);
    let (target, state) = (m.dir.path().join("t.img"), m.dir.path().join("t.fill"));
    let (od, fetching) = instant(client_dir, &target, &state);
    let mut expected = version.clone();
    let mut x = 5u64;
    random_writes_and_reads(&od, &mut expected, 40, &mut x);
    od.stop();
    fetching.join().unwrap();
    assert!(state.with_extension("live").exists(), "no live state left");
    std::fs::remove_file(&target).unwrap();
    std::fs::remove_file(&state).unwrap();
    // Started over, and killed before its first write; then recovered.
    let (od, fetching) = instant(client_dir, &target, &state);
    od.stop();
    fetching.join().unwrap();
    let (od, fetching) = instant(client_dir, &target, &state);
    wait_filled(&od);
    assert!(
        std::fs::read(&target).unwrap() == *version,
        "blocks the earlier restore wrote were taken as local"
    );
    od.stop();
    fetching.join().unwrap();
}

/// Change tracking on a restore target, as `restore --instant --mirror`
/// opens it (`history`: a new target, or the same after a daemon kill).
fn tracked_target(target: &Path, history: ublk_dev::tracking::History) -> std::sync::Arc<Tracker> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .unwrap();
    let (tracker, _) = Tracker::open(&TrackerOptions {
        state_dir: &target.with_extension("ublk-mirror"),
        identity: (target, 1),
        file: &file,
        device_size: SIZE,
        region_size: 1 << 20,
        history,
        cow_memory: ublk_dev::epoch::DEFAULT_COW_MEMORY,
    })
    .unwrap();
    std::sync::Arc::new(tracker)
}

/// Writes through the restore and its tracking, as the device's queues
/// make them: tracked before they land.
fn tracked_writes(od: &OnDemand, tracker: &Tracker, expected: &mut [u8], ops: usize, x: &mut u64) {
    for _ in 0..ops {
        let at = 4096 * (next(x) % (SIZE / 4096 - 40));
        let len = 4096 * (1 + next(x) % 40) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next(x) as u8).collect();
        let ticket = tracker
            .before_write(&Request::write(at, len as u64))
            .unwrap();
        od.write_blocking(&bytes, at).unwrap();
        if let Some(t) = ticket {
            tracker.after_write(t);
        }
        expected[at as usize..at as usize + len].copy_from_slice(&bytes);
    }
}

#[test]
fn an_instant_restore_that_mirrors_takes_the_volume_over_and_ships_only_what_differs() {
    // The old laptop wrote "v", then more; its disk is lost.
    let Mirrored {
        dir,
        data,
        client_dir,
        server,
        versions,
        ..
    } = mirrored(&[(4, Some("v")), (9, None)]);
    let (version, newest) = (&versions[0], &versions[1]);
    assert!(version != newest);
    let old_device = ublk_dev::replicator::device_id(&dir.path().join("state")).unwrap();

    let target = dir.path().join("restored.img");
    let state = dir.path().join("restored.fill");
    let tracking = target.with_extension("ublk-mirror");
    let mut expected = version.clone();
    let mut x = 29u64;
    let (od, fetching) = instant(&client_dir, &target, &state);
    // The new device becomes the writer before its first write.
    let epoch = ublk_dev::replicator::take_over(&client_dir, "root", SIZE, &tracking).unwrap();
    assert_eq!(
        ublk_dev::replicator::take_over(&client_dir, "root", SIZE, &tracking).unwrap(),
        epoch,
        "a retried take-over is not the same"
    );
    let hold = |od: &std::sync::Arc<OnDemand>| {
        let od = od.clone();
        Some(std::sync::Arc::new(move || !od.filled()) as ublk_dev::replicator::Hold)
    };
    let tracker = tracked_target(&target, ublk_dev::tracking::History::NewFile);
    let replicator =
        Replicator::start_held(tracker.clone(), settings(&client_dir, 3, None), hold(&od)).unwrap();
    tracked_writes(&od, &tracker, &mut expected, 20, &mut x);
    assert_eq!(replicator.status().link, "waiting for the fill");
    // From outside, no epoch is sealed before the whole-device comparison
    // (it would publish the old image plus these writes), and a sync says
    // at once why it cannot be done yet.
    let sock = dir.path().join("control.sock");
    let control = Server::start_at(&sock, tracker.clone(), Some(replicator.handle())).unwrap();
    let err = Client::at(&sock).seal(None).unwrap_err().to_string();
    assert!(err.contains("mirroring has not begun"), "{err}");
    let asked = std::time::Instant::now();
    let err = Client::at(&sock)
        .sync(Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not filled yet"), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(30), "sync waited");
    assert_eq!(tracker.status().current_epoch, 1, "an epoch was sealed");
    drop(control);

    // The daemon dies mid-fill; a new one goes on, tracking and holding.
    drop(replicator);
    drop(tracker);
    od.stop();
    fetching.join().unwrap();
    assert!(
        state.exists(),
        "filled before the kill: make the fill slower"
    );
    // Added as an ordinary mirrored device instead, the unfilled disk is
    // not shipped over the volume.
    let tracker = tracked_target(&target, ublk_dev::tracking::History::Recovering);
    let plain = Replicator::start(tracker.clone(), settings(&client_dir, 3, None)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while plain.status().link != "not filled" {
        assert!(std::time::Instant::now() < deadline, "{:?}", plain.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(plain
        .status()
        .last_error
        .unwrap()
        .contains("restore --instant --mirror"));
    assert!(!plain.handle().started(), "an unfilled disk takes seals");
    assert!(
        plain.handle().filling(),
        "a sync on an unfilled disk would wait"
    );
    drop(plain);
    drop(tracker);
    let (od, fetching) = instant(&client_dir, &target, &state);
    let tracker = tracked_target(&target, ublk_dev::tracking::History::Recovering);
    let replicator =
        Replicator::start_held(tracker.clone(), settings(&client_dir, 3, None), hold(&od)).unwrap();
    tracked_writes(&od, &tracker, &mut expected, 20, &mut x);
    wait_filled(&od);
    // Mirroring now: the first epoch compares the device with the volume
    // (the newest version, not "v") and sends what differs.
    tracked_writes(&od, &tracker, &mut expected, 10, &mut x);
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    assert!(replicator.handle().started() && !replicator.handle().filling());
    assert!(std::fs::read(&target).unwrap() == expected);
    assert!(
        image(&data) == expected,
        "the mirror is not the restored device"
    );
    let s = replicator.status();
    assert!(s.server_epoch > epoch, "{s:?}");
    assert!(
        s.resync_same_bytes > SIZE / 4,
        "blocks the same travelled: {s:?}"
    );

    assert!(
        !tracking.join("restoring").exists(),
        "the restore marker outlived the fill"
    );
    // The volume's history is kept; the old device is refused.
    let (v, reading) = attach(dir.path(), options(&client_dir, Some("v"), u64::MAX));
    random_reads_match(&v, version, 50, 3);
    v.stop();
    reading.join().unwrap();
    let err = refused_epoch(&client_dir, old_device);
    assert!(err.contains("another device"), "{err}");
    drop(replicator);
    od.stop();
    fetching.join().unwrap();
    drop(server);
}

/// Taking the volume over, asked for where the mirror cannot be reached
/// (a restore with --mirror started again away from the network), is
/// done by the device's replicator when it can, before anything of the
/// device ships: the mirror ends as the restored device, and the old
/// device is refused.
#[test]
fn a_take_over_asked_without_the_mirror_is_done_before_the_device_mirrors() {
    let Mirrored {
        dir,
        data,
        listen,
        client_dir,
        server,
        versions,
    } = mirrored(&[(4, Some("v"))]);
    let old_device = ublk_dev::replicator::device_id(&dir.path().join("state")).unwrap();
    let target = dir.path().join("restored.img");
    let state = dir.path().join("restored.fill");
    let tracking = target.with_extension("ublk-mirror");
    let (od, fetching) = instant(&client_dir, &target, &state);
    drop(server);
    let err = ublk_dev::replicator::take_over(&client_dir, "root", SIZE, &tracking).unwrap_err();
    assert_eq!(err.kind(), ublk_dev::ErrorKind::Link, "{err}");
    assert!(
        tracking.join("take-over").exists(),
        "the take-over is not marked to do"
    );

    let _server = TestServer::start(&data, &listen);
    let tracker = tracked_target(&target, ublk_dev::tracking::History::NewFile);
    let filled = {
        let od = od.clone();
        std::sync::Arc::new(move || !od.filled()) as ublk_dev::replicator::Hold
    };
    let replicator = Replicator::start_held(
        tracker.clone(),
        settings(&client_dir, 3, None),
        Some(filled),
    )
    .unwrap();
    let mut expected = versions[0].clone();
    let mut x = 41u64;
    tracked_writes(&od, &tracker, &mut expected, 20, &mut x);
    wait_filled(&od);
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    assert!(
        !tracking.join("take-over").exists(),
        "the take-over marker stayed"
    );
    assert!(
        image(&data) == expected,
        "the mirror is not the restored device"
    );
    let err = refused_epoch(&client_dir, old_device);
    assert!(err.contains("another device"), "{err}");
    drop(replicator);
    od.stop();
    fetching.join().unwrap();
}

/// What the server answers an epoch of `device` on volume "root".
fn refused_epoch(client_dir: &Path, device: [u8; 16]) -> String {
    let enrollment = ublk_dev::enrollment::Enrollment::load(client_dir).unwrap();
    let identity = ublk_mirror_common::identity::Identity::load(client_dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let link = Link::connect(&identity, enrollment.server().unwrap(), &enrollment.address)
            .await
            .unwrap();
        let info = link.open_volume("root", SIZE).await.unwrap();
        let writer = Writer { device, epoch: 99 };
        let sent = link
            .send_epoch(
                "root",
                info.published_epoch + 1,
                writer,
                &[(0, 4096)],
                3,
                |_, len| Ok(vec![1u8; len as usize]),
            )
            .await;
        link.close().await;
        sent.map(|_| "published").unwrap_err().to_string()
    })
}
