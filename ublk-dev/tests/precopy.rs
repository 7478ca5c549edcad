//! The model test of pre-copy (see `ublk_dev::replicator`): a first sync
//! travels in rounds while a writer never stops, through a lost link, a
//! server that lost what was staged, and a daemon that died mid-run; what
//! the server publishes first must be the device as it was after some
//! prefix of the writes (a consistent cut), and once the writer stops and
//! a sync is asked, the device exactly.
//!
//! The writer is sequential (each write completes before the next), so
//! the device's states are the prefixes of its log; a crash-consistent
//! cut is one of them (the one write in flight at the cut lands on either
//! side, which is another prefix).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ublk_dev::engine::uring::LocalIo;
use ublk_dev::engine::{Op, Request};
use ublk_dev::replicator::{MirrorSettings, Replicator};
use ublk_dev::tracking::Tracker;

use crate::mirror::{enrolled, image, synced, Enrolled};
use crate::support::{Rng, TestServer, TrackedDevice};

const SIZE: u64 = 32 << 20;
const BLOCK: usize = 4096;

/// A write the writer made: data, or a discard (zeroes).
#[derive(Clone)]
struct Written {
    offset: u64,
    data: Option<Vec<u8>>,
    len: u64,
}

/// Mirror to "root" with pre-copy above 1 MiB (so a final cut at 128
/// KiB), cuts only when asked, and a bandwidth limit that makes the first
/// round last a few seconds.
/// With `Trouble::OrdinaryLost`, pre-copy is off.
fn settings(client_dir: &std::path::Path, trouble: Trouble) -> MirrorSettings {
    MirrorSettings {
        volume: "root".into(),
        client_dir: client_dir.to_path_buf(),
        interval: Duration::from_secs(3600),
        zstd_level: 1,
        bandwidth: Some(12 << 20),
        precopy: (!matches!(trouble, Trouble::OrdinaryLost | Trouble::Outage)).then_some(1 << 20),
        min_rate: 0,
        activity: None,
        let_go_after: if trouble == Trouble::Outage {
            Duration::from_secs(1)
        } else {
            ublk_dev::replicator::LET_GO_AFTER
        },
    }
}

/// Write the whole device with random data (the first epoch, 32 MiB).
fn fill(io: &mut LocalIo<'_>, rng: &mut Rng) -> Vec<u8> {
    let mut all = Vec::with_capacity(SIZE as usize);
    for at in (0..SIZE).step_by(256 << 10) {
        let data = rng.bytes(256 << 10);
        io.submit(Request::write(at, 256 << 10), &data).unwrap();
        all.extend_from_slice(&data);
    }
    all
}

/// Write until `stop`, one request at a time (4 KiB to 64 KiB, one in
/// eight a discard), about 1.5 MB/s; every write is logged in order.
fn writer(io: &mut LocalIo<'_>, seed: u64, stop: &AtomicBool, log: &Mutex<Vec<Written>>) {
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::SeqCst) {
        let blocks = 1 + rng.next() % 16;
        let len = blocks * BLOCK as u64;
        let offset = (rng.next() % (SIZE / BLOCK as u64 - blocks)) * BLOCK as u64;
        let w = if rng.next() % 8 == 0 {
            io.submit(Request::new(Op::Discard, offset, len), &[])
                .unwrap();
            Written {
                offset,
                data: None,
                len,
            }
        } else {
            let data = rng.bytes(len as usize);
            io.submit(Request::write(offset, len), &data).unwrap();
            Written {
                offset,
                data: Some(data),
                len,
            }
        };
        log.lock().unwrap().push(w);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `image` is `start` after some prefix of `log`.
fn is_a_prefix_state(start: &[u8], log: &[Written], image: &[u8]) -> Option<usize> {
    let mut state = start.to_vec();
    let differs = |state: &[u8], b: usize| {
        state[b * BLOCK..(b + 1) * BLOCK] != image[b * BLOCK..(b + 1) * BLOCK]
    };
    let blocks = state.len() / BLOCK;
    let mut mismatched = (0..blocks).filter(|&b| differs(&state, b)).count();
    if mismatched == 0 {
        return Some(0);
    }
    for (k, w) in log.iter().enumerate() {
        let range = w.offset as usize / BLOCK..(w.offset + w.len) as usize / BLOCK;
        mismatched -= range.clone().filter(|&b| differs(&state, b)).count();
        let dst = &mut state[w.offset as usize..(w.offset + w.len) as usize];
        match &w.data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
        mismatched += range.filter(|&b| differs(&state, b)).count();
        if mismatched == 0 {
            return Some(k + 1);
        }
    }
    None
}

/// Wait (up to a minute) until `what` holds.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What happens to the run while the writer writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trouble {
    /// Nothing.
    None,
    /// The server restarts mid-first-round (the staging is resumed), and
    /// again after a round, having lost the staging (the rounds are sent
    /// again as the device is then).
    Server,
    /// The daemon dies after a round (its tracker reopened from the
    /// journal: everything unreleased is resynced, and the server's staging
    /// is taken over and vouched for).
    Daemon,
    /// The server publishes the run but its answer is lost: the next
    /// version must still be a cut (checked instead of the first).
    LostCommitted,
    /// An ordinary epoch is sealed (`ublk-mirror epoch seal`) while the
    /// first round is read: it cannot be the cut that ends the run.
    OutsideSeal,
    /// Pre-copy is off: the first sync is one ordinary epoch, whose blocks
    /// are taken as they are read (writes into them no longer wait for
    /// copy-on-write). The server restarts mid-epoch having lost its
    /// staging, so blocks read already are asked for again: the epoch must
    /// go as a pre-copy round, and a cut follow.
    OrdinaryLost,
    /// Pre-copy is off, and the server goes away mid-epoch for longer
    /// than the let-go time (1 s here): the epoch lets go of its cut, so
    /// writes into the blocks not read yet stop waiting for copy-on-write;
    /// once the server is back the epoch goes as a pre-copy round, and a
    /// cut follows.
    Outage,
}

fn run(trouble: Trouble) {
    let Enrolled {
        dir,
        data,
        listen,
        client_dir,
        server,
    } = enrolled();
    let mut server = Some(server);
    let mut rng = Rng(0x5eed);
    let device = TrackedDevice::new(dir.path(), SIZE, 1 << 20);
    let start = {
        let mut io = LocalIo::new(&device.engine, device.backing.file())
            .unwrap()
            .with_tracker(&*device.tracker);
        fill(&mut io, &mut rng)
    };
    let log = Mutex::new(Vec::new());
    let mut device = Some(device);
    if trouble == Trouble::LostCommitted {
        mirror_server::faults::drop_next_committed(&data);
    }
    let mut most_rounds = 0;
    // Each life of the daemon: a device, its replicator, and the writer.
    for life in 0..2 {
        let d = device
            .take()
            .unwrap_or_else(|| TrackedDevice::reopen(dir.path(), SIZE, 1 << 20));
        let replicator =
            Replicator::start(d.tracker.clone(), settings(&client_dir, trouble)).unwrap();
        replicator.kick().notify_one();
        let stop = AtomicBool::new(false);
        // A failed check stops the writer too (the scope waits for it).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let crashed = std::thread::scope(|s| {
            let _stop = StopOnDrop(&stop);
            let writes = s.spawn(|| {
                let mut io = LocalIo::new(&d.engine, d.backing.file())
                    .unwrap()
                    .with_tracker(&*d.tracker);
                writer(&mut io, 7 + life, &stop, &log);
            });
            let status = || replicator.status();
            match (trouble, life) {
                (Trouble::Server, 0) => {
                    // Mid-first-round: some bytes went, no round is staged.
                    // (32 MiB at 12 MiB/s: about three seconds.)
                    wait_for("the link up", || status().link == "connected");
                    std::thread::sleep(Duration::from_millis(1200));
                    assert_eq!(status().precopy_rounds, 0, "{:?}", status());
                    drop(server.take());
                    std::thread::sleep(Duration::from_millis(300));
                    server = Some(TestServer::start(&data, &listen));
                    // After a round: the server comes back without it.
                    wait_for("a round staged", || status().precopy_rounds >= 1);
                    most_rounds = most_rounds.max(status().precopy_rounds);
                    drop(server.take());
                    let staging = data.join("volumes/laptop/root/staging");
                    let mut lost = 0;
                    for f in std::fs::read_dir(&staging).unwrap() {
                        std::fs::remove_file(f.unwrap().path()).unwrap();
                        lost += 1;
                    }
                    assert!(lost > 0, "nothing was staged");
                    server = Some(TestServer::start(&data, &listen));
                }
                (Trouble::OrdinaryLost, 0) => {
                    wait_for("the link up", || status().link == "connected");
                    std::thread::sleep(Duration::from_millis(1200));
                    assert_eq!(status().precopy_rounds, 0, "{:?}", status());
                    assert_eq!(d.tracker.sealed_epochs(), vec![(1, false)]);
                    drop(server.take());
                    let staging = data.join("volumes/laptop/root/staging");
                    for f in std::fs::read_dir(&staging).unwrap() {
                        std::fs::remove_file(f.unwrap().path()).unwrap();
                    }
                    server = Some(TestServer::start(&data, &listen));
                }
                (Trouble::Outage, 0) => {
                    wait_for("the link up", || status().link == "connected");
                    std::thread::sleep(Duration::from_millis(1200));
                    assert_eq!(d.tracker.sealed_epochs(), vec![(1, false)]);
                    drop(server.take());
                    wait_for("the cut let go of", || status().cuts_let_go >= 1);
                    assert_eq!(status().cuts_let_go, 1, "{:?}", status());
                    assert_eq!(d.tracker.sealed_epochs(), vec![(1, true)]);
                    // The writer goes on, and no write waits for a copy.
                    let before = d.tracker.status().cow_waits;
                    std::thread::sleep(Duration::from_millis(1000));
                    assert_eq!(
                        d.tracker.status().cow_waits,
                        before,
                        "writes waited for copy-on-write after the cut was let go of"
                    );
                    server = Some(TestServer::start(&data, &listen));
                }
                (Trouble::OutsideSeal, 0) => {
                    wait_for("the link up", || status().link == "connected");
                    std::thread::sleep(Duration::from_millis(800));
                    assert_eq!(status().precopy_rounds, 0, "{:?}", status());
                    d.tracker.seal(ublk_dev::tracking::SealAt::Now).unwrap();
                }
                (Trouble::Daemon, 0) => {
                    wait_for("a round staged", || status().precopy_rounds >= 1);
                    most_rounds = most_rounds.max(status().precopy_rounds);
                    stop.store(true, Ordering::SeqCst);
                    writes.join().unwrap();
                    return true;
                }
                _ => {}
            }
            wait_for("the first version published", || {
                most_rounds = most_rounds.max(status().precopy_rounds);
                status().server_epoch >= 1
            });
            if trouble == Trouble::LostCommitted {
                // The run was released whole (nothing cut since: the
                // interval is an hour); the first version is a cut, and so
                // is the next one, asked for now.
                let first = image(&data);
                let log = log.lock().unwrap().clone();
                assert!(
                    is_a_prefix_state(&start, &log, &first).is_some(),
                    "the first version is not a cut"
                );
                wait_for("the run released", || d.tracker.sealed_epochs().is_empty());
                assert_eq!(status().epochs_shipped, 0, "the answer was not lost");
                replicator.kick().notify_one();
                wait_for("the second version published", || {
                    status().server_epoch >= 2
                });
            }
            // A moment more of writes after the cut, then stop.
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::SeqCst);
            writes.join().unwrap();
            false
        });
        if crashed {
            // The daemon dies: no clean close; the journal stays.
            drop(replicator);
            drop(d);
            continue;
        }
        // The version is a cut of the writes, whatever happened.
        let first = image(&data);
        let log = log.lock().unwrap();
        let k = is_a_prefix_state(&start, &log, &first);
        assert!(
            k.is_some(),
            "{trouble:?}: the first version is not the device after any prefix of its {} writes",
            log.len()
        );
        assert!(most_rounds >= 1, "{trouble:?}: no pre-copy round was seen");
        // Writes went on during the rounds, and landed after the cut too.
        assert!(
            k.unwrap() > 0 && k.unwrap() < log.len(),
            "{trouble:?}: cut at {k:?} of {}",
            log.len()
        );
        drop(log);
        // Now in sync: the device, exactly.
        assert!(synced(&d.tracker, &replicator), "{:?}", replicator.status());
        assert!(
            image(&data) == std::fs::read(d.backing.path()).unwrap(),
            "{trouble:?}: the mirror differs from the device after a sync"
        );
        assert_eq!(d.tracker.status().regions_marked, 0);
        assert_eq!(replicator.status().precopy_rounds, 0);
        no_copy_on_write_left(&d.tracker);
        return;
    }
    panic!("{trouble:?}: the second life ended without returning");
}

/// Nothing preserved is left once every epoch is released.
fn no_copy_on_write_left(tracker: &Tracker) {
    let s = tracker.status();
    assert_eq!(s.sealed.len(), 0, "{s:?}");
}

#[test]
fn a_first_sync_travels_in_rounds_while_written_and_publishes_a_cut() {
    run(Trouble::None);
}

#[test]
fn pre_copy_survives_a_server_restart_and_a_lost_staging() {
    run(Trouble::Server);
}

#[test]
fn pre_copy_survives_the_daemon_dying_mid_run() {
    run(Trouble::Daemon);
}

#[test]
fn a_run_published_with_its_answer_lost_is_released_whole() {
    run(Trouble::LostCommitted);
}

#[test]
fn an_epoch_lets_go_of_its_cut_while_the_mirror_is_away() {
    run(Trouble::Outage);
}

#[test]
fn an_outside_seal_during_a_round_is_sent_as_a_round() {
    run(Trouble::OutsideSeal);
}

#[test]
fn an_ordinary_epoch_whose_read_blocks_were_lost_goes_as_a_round() {
    run(Trouble::OrdinaryLost);
}

/// A first sync gives way to a device that is busy (more than 100
/// requests a second): its pre-copy round reads at the minimum rate, so
/// after 3 s of writes it has read a fraction of the device and published
/// nothing; `status` says it yields. Once the writes stop, it goes on at
/// full speed, and the mirror ends up equal to the device.
#[test]
fn a_first_sync_gives_way_to_a_busy_device_and_goes_on_when_it_is_quiet() {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    let Enrolled {
        dir,
        data,
        client_dir,
        server: _server,
        ..
    } = enrolled();
    let mut rng = Rng(0xb5);
    let d = TrackedDevice::new(dir.path(), SIZE, 1 << 20);
    let requests = Arc::new(AtomicU64::new(0));
    {
        let mut io = LocalIo::new(&d.engine, d.backing.file())
            .unwrap()
            .with_tracker(&*d.tracker);
        fill(&mut io, &mut rng);
    }
    // 32 MiB at 1 MiB/s while busy: half a minute; at full speed, a
    // moment.
    let mut settings = settings(&client_dir, Trouble::None);
    settings.bandwidth = None;
    settings.min_rate = 1 << 20;
    settings.activity = Some({
        let requests = requests.clone();
        ublk_dev::yielding::Activity::new(move || requests.load(Ordering::Relaxed))
    });
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // About 500 small writes a second, counted as the device's requests.
        let writes = s.spawn(|| {
            let mut io = LocalIo::new(&d.engine, d.backing.file())
                .unwrap()
                .with_tracker(&*d.tracker);
            let mut rng = Rng(0x77);
            while !stop.load(Ordering::SeqCst) {
                let offset = (rng.next() % (SIZE / BLOCK as u64)) * BLOCK as u64;
                io.submit(Request::write(offset, BLOCK as u64), &rng.bytes(BLOCK))
                    .unwrap();
                requests.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let replicator = Replicator::start(d.tracker.clone(), settings).unwrap();
        replicator.kick().notify_one();
        let status = || replicator.status();
        wait_for("the link up", || status().link == "connected");
        std::thread::sleep(Duration::from_secs(3));
        let busy = status();
        stop.store(true, Ordering::SeqCst);
        writes.join().unwrap();
        assert_eq!(
            busy.server_epoch, 0,
            "the first sync did not give way to the busy device: {busy:?}"
        );
        assert_eq!(busy.precopy_rounds, 0, "{busy:?}");
        assert!(
            busy.yielding,
            "status does not say the sync yields: {busy:?}"
        );
        assert!(busy.yielded_ms > 1000, "{busy:?}");
        // What the round has sent so far shows, though nothing is
        // published yet (a sync's bar follows it).
        assert!(
            busy.sending_bytes >= 32 << 20,
            "the round being sent is not shown: {busy:?}"
        );
        assert!(
            busy.sending_done > 0 && busy.sending_done < busy.sending_bytes,
            "the round's progress is not shown: {busy:?}"
        );
        // And to monitoring.
        let device = ublk_dev::metrics::Device {
            device: "ublkb5".into(),
            name: "root".into(),
            status: Some(ublk_dev::status::DeviceStatus {
                id: 5,
                pid: std::process::id(),
                updated_ms: ublk_mirror_common::clock::now_ms(),
                reads: 0,
                writes: 0,
                errors: 0,
                tracking: None,
                attach: None,
                mirror: Some(busy.clone()),
            }),
        };
        let m = crate::mirror::prom::parse(&ublk_dev::metrics::render(&[device]));
        let value = |name: &str| {
            crate::mirror::prom::value(&m, name, &[("device", "ublkb5"), ("name", "root")])
        };
        assert_eq!(
            value("ublk_mirror_sending_bytes"),
            busy.sending_bytes as f64
        );
        assert_eq!(
            value("ublk_mirror_sending_done_bytes"),
            busy.sending_done as f64
        );
        // Quiet now: the rest goes at full speed, then a sync.
        wait_for("the yielding over", || !status().yielding);
        assert!(synced(&d.tracker, &replicator), "{:?}", status());
        assert!(
            image(&data) == std::fs::read(d.backing.path()).unwrap(),
            "the mirror differs from the device after a sync"
        );
        assert!(!status().yielding, "{:?}", status());
        assert_eq!(
            status().sending_bytes,
            0,
            "nothing is being sent after a sync"
        );
    });
}
