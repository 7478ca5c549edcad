//! Replication end to end without the kernel: the device's I/O path
//! in-process (LocalIo, tracker), the replicator shipping epochs to a
//! mirror server on 127.0.0.1, and the server's image compared with the
//! backing file, across a server restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ublk_dev::engine::uring::LocalIo;
use ublk_dev::engine::{Op, Request};
use ublk_dev::replicator::{MirrorSettings, Replicator};
use ublk_dev::tracking::Tracker;

use crate::support::{Rng, TestServer, TrackedDevice};

pub const SIZE: u64 = 32 << 20;

/// A mirror server on 127.0.0.1 (at a fixed address, to be restarted
/// where the client looks), this machine enrolled as "laptop", and what a
/// device mirrored to its volume "root" held after each step.
pub struct Mirrored {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub listen: String,
    pub client_dir: PathBuf,
    pub server: TestServer,
    pub versions: Vec<Vec<u8>>,
}

/// A mirror server on 127.0.0.1 at a fixed address (so that a restarted
/// server is where the client looks) with its data in `dir`/server, and
/// this machine enrolled with it as "laptop" (`dir`/client).
pub struct Enrolled {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub listen: String,
    pub client_dir: PathBuf,
    pub server: TestServer,
}

pub fn enrolled() -> Enrolled {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let listen = fixed_listen();
    let server = TestServer::start(&data, &listen);
    let client_dir = dir.path().join("client");
    ublk_dev::enrollment::enroll(&client_dir, &server.token(&data, "laptop")).unwrap();
    Enrolled {
        dir,
        data,
        listen,
        client_dir,
        server,
    }
}

/// A new tracked device in `dir`, mirrored to volume "root" as
/// `client_dir` is enrolled.
pub fn mirrored_device(dir: &Path, client_dir: &Path) -> (TrackedDevice, Replicator) {
    let device = TrackedDevice::new(dir, SIZE, 1 << 20);
    let replicator =
        Replicator::start(device.tracker.clone(), settings(client_dir, 3, None)).unwrap();
    (device, replicator)
}

/// For each `(seed, snapshot)`: the workload of `seed` written and on the
/// mirror, then the snapshot taken if named; the device's bytes then.
pub fn mirrored(steps: &[(u64, Option<&str>)]) -> Mirrored {
    let Enrolled {
        dir,
        data,
        listen,
        client_dir,
        server,
    } = enrolled();
    let (device, replicator) = mirrored_device(dir.path(), &client_dir);
    let TrackedDevice {
        backing,
        engine,
        tracker,
    } = &device;
    let mut io = LocalIo::new(engine, backing.file())
        .unwrap()
        .with_tracker(tracker);
    let mut versions = Vec::new();
    for &(seed, snapshot) in steps {
        workload(&mut io, seed);
        assert!(synced(tracker, &replicator), "{:?}", replicator.status());
        versions.push(std::fs::read(backing.path()).unwrap());
        if let Some(name) = snapshot {
            ublk_dev::replicator::take_snapshot(&client_dir, "root", Some(name)).unwrap();
        }
    }
    Mirrored {
        dir,
        data,
        listen,
        client_dir,
        server,
        versions,
    }
}

/// Wait until everything recorded so far is released (on the mirror).
pub fn synced(tracker: &Tracker, replicator: &Replicator) -> bool {
    let mut target = tracker.sync_target();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let released;
        (released, target) = tracker.sync_progress(target);
        if released >= target {
            return true;
        }
        replicator.kick().notify_one();
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn workload(io: &mut LocalIo<'_>, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..60 {
        let block = next() % (SIZE / 4096 - 64);
        let blocks = 1 + next() % 32;
        let (off, len) = (block * 4096, blocks * 4096);
        match i % 7 {
            5 => {
                io.submit(Request::new(Op::Discard, off, len), &[]).unwrap();
            }
            6 => {
                // Compressible text-like data.
                let data: Vec<u8> = (0..len)
                    .map(|j| b"the mirror follows "[(j % 19) as usize])
                    .collect();
                io.submit(Request::write(off, len), &data).unwrap();
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                io.submit(Request::write(off, len), &data).unwrap();
            }
        }
    }
}

/// Mirror to volume "root", cutting every 100 ms.
pub fn settings(client_dir: &Path, zstd_level: i32, bandwidth: Option<u64>) -> MirrorSettings {
    MirrorSettings {
        volume: "root".into(),
        client_dir: client_dir.to_path_buf(),
        interval: Duration::from_millis(100),
        zstd_level,
        bandwidth,
        precopy: None,
        min_rate: 0,
        activity: None,
        let_go_after: ublk_dev::replicator::LET_GO_AFTER,
    }
}

/// A free UDP address on 127.0.0.1, for a server that is restarted where
/// the client looks for it.
pub fn fixed_listen() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", socket.local_addr().unwrap().port())
}

pub fn image(data: &Path) -> Vec<u8> {
    std::fs::read(data.join("volumes/laptop/root/image")).unwrap()
}

#[test]
fn the_mirror_follows_the_device_across_a_server_restart() {
    let Enrolled {
        dir,
        data,
        listen,
        client_dir,
        server,
    } = enrolled();
    let (device, replicator) = mirrored_device(dir.path(), &client_dir);
    let TrackedDevice {
        backing,
        engine,
        tracker,
    } = &device;
    let mut io = LocalIo::new(engine, backing.file())
        .unwrap()
        .with_tracker(tracker);

    for round in 0..3 {
        workload(&mut io, round);
        assert!(
            synced(tracker, &replicator),
            "round {round}: not synced: {:?}",
            replicator.status()
        );
        assert!(
            image(&data) == std::fs::read(backing.path()).unwrap(),
            "round {round}: the mirror differs from the device"
        );
    }
    let status = replicator.status();
    assert_eq!(status.link, "connected");
    assert!(status.epochs_shipped >= 3, "{status:?}");
    assert_eq!(
        tracker.status().regions_marked,
        0,
        "regions stayed marked after release"
    );

    // The server goes away; writes go on locally; it comes back.
    drop(server);
    workload(&mut io, 10);
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(replicator.status().link, "connected");
    assert!(tracker.status().regions_marked > 0);
    let server = TestServer::start(&data, &listen);
    workload(&mut io, 11);
    assert!(
        synced(tracker, &replicator),
        "not synced after the restart: {:?}",
        replicator.status()
    );
    assert!(
        image(&data) == std::fs::read(backing.path()).unwrap(),
        "the mirror differs from the device after the server restart"
    );
    assert_eq!(replicator.status().link, "connected");

    // The server loses the volume: the device's whole past is shipped again.
    drop(server);
    std::fs::remove_dir_all(data.join("volumes/laptop/root")).unwrap();
    let _server = TestServer::start(&data, &listen);
    workload(&mut io, 12);
    assert!(
        synced(tracker, &replicator),
        "not synced to a new volume: {:?}",
        replicator.status()
    );
    assert!(
        image(&data) == std::fs::read(backing.path()).unwrap(),
        "a volume made anew does not hold the device's past"
    );
    // Its zero blocks were found equal by hash, not sent.
    assert!(
        replicator.status().resync_same_bytes > 0,
        "{:?}",
        replicator.status()
    );
}

/// Blocks a disk damaged in the server's image cache (the volume now)
/// and in what a snapshot preserved are not restored as the version: the
/// server checks each block it reads from its cache against the chunk
/// store's copy and serves the store's where they differ.
#[test]
fn a_restore_never_gets_blocks_damaged_in_the_server_s_cache() {
    let m = mirrored(&[(1, Some("before")), (2, None)]);
    let vol = m.data.join("volumes/laptop/root");
    let snapshot = mirror_server::snapshots::list(&vol)
        .unwrap()
        .into_iter()
        .find(|(s, _)| s.name == "before")
        .unwrap()
        .0;
    let damage = |path: &Path, at: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let len = f.metadata().unwrap().len();
        assert!(len > at + 4096, "{} is {len} bytes", path.display());
        f.write_all_at(&[0x5A; 4096], at).unwrap();
    };
    // Every 1 MiB of the image (the version now), and the first bytes the
    // snapshot preserved.
    for at in (0..SIZE).step_by(1 << 20) {
        damage(&vol.join("image"), at + 8192);
    }
    damage(&vol.join(format!("snapshots/{}/data", snapshot.id)), 0);
    // And cut short: the blocks past the cut cannot be read at all.
    std::fs::OpenOptions::new()
        .write(true)
        .open(vol.join("image"))
        .unwrap()
        .set_len(SIZE - (3 << 20) + 100)
        .unwrap();
    for (at, want) in [(None, &m.versions[1]), (Some("before"), &m.versions[0])] {
        let target = m.dir.path().join(format!("{}.img", at.unwrap_or("now")));
        let req = ublk_dev::restore::RestoreRequest {
            volume: "root".into(),
            at: at.map(str::to_string),
            to: target.clone(),
            client_dir: m.client_dir.clone(),
        };
        ublk_dev::restore::restore(&req, |_| {}).unwrap();
        assert!(
            std::fs::read(&target).unwrap() == *want,
            "{at:?}: the server's damaged cache was restored"
        );
    }
}

/// A restore that loses its server (stopped part way, started again a
/// little later) goes on by itself once the server is back: the same
/// snapshot, from where it was (the batches done are not compared
/// again), and the target ends as the snapshot.
#[test]
fn a_restore_goes_on_where_it_was_across_a_server_restart() {
    let Enrolled {
        dir,
        data,
        listen,
        client_dir,
        server,
    } = enrolled();
    // Random bytes everywhere: a batch's answer is more than the link
    // holds in flight, so the restore sees the server go.
    let snapshot = {
        let (device, replicator) = mirrored_device(dir.path(), &client_dir);
        let mut io = LocalIo::new(&device.engine, device.backing.file())
            .unwrap()
            .with_tracker(&device.tracker);
        fill_random(&mut io, &mut Rng(0x5851_f42d_4c95_7f2d));
        assert!(synced(&device.tracker, &replicator));
        ublk_dev::replicator::take_snapshot(&client_dir, "root", Some("before")).unwrap();
        let then = std::fs::read(device.backing.path()).unwrap();
        workload(&mut io, 2);
        assert!(synced(&device.tracker, &replicator));
        then
    };
    let target = dir.path().join("restored.img");
    let req = ublk_dev::restore::RestoreRequest {
        volume: "root".into(),
        at: Some("before".into()),
        to: target.clone(),
        client_dir: client_dir.clone(),
    };
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let restoring = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let noted = &mut seen;
        let restored = ublk_dev::restore::restore(&req, move |p| {
            if noted.is_empty() {
                // Held here until the server is gone.
                first_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            noted.push(p.done);
        });
        (restored, seen)
    });
    first_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    drop(server);
    go_tx.send(()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _server = TestServer::start(&data, &listen);
    let (restored, seen) = restoring.join().unwrap();
    let r = restored.unwrap();
    assert_eq!(r.snapshot, "before");
    assert!(r.reconnects >= 1, "the server's stop went unseen: {r:?}");
    assert!(
        std::fs::read(&target).unwrap() == snapshot,
        "the restore is not the snapshot"
    );
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "compared again from the start: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&SIZE), "{seen:?}");
    let blocks = SIZE / ublk_mirror_common::block::BLOCK;
    assert_eq!(r.blocks_same + r.blocks_received, blocks, "{r:?}");
    // A volume the client does not have: said at once (no retrying), with
    // the volumes it has; no target is made.
    let nope = dir.path().join("nope.img");
    let err = ublk_dev::restore::restore(
        &ublk_dev::restore::RestoreRequest {
            volume: "nope".into(),
            at: None,
            to: nope.clone(),
            client_dir,
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("client laptop has no volume nope") && err.contains("its volumes: root"),
        "{err}"
    );
    assert!(!nope.exists());
}

#[test]
fn a_snapshot_asked_by_the_device_holds_what_was_written_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = TestServer::start(&data, "127.0.0.1:0");
    let client_dir = dir.path().join("client");
    ublk_dev::enrollment::enroll(&client_dir, &server.token(&data, "laptop")).unwrap();
    let TrackedDevice {
        backing,
        engine,
        tracker,
    } = TrackedDevice::new(dir.path(), SIZE, 1 << 20);
    let replicator = Replicator::start(tracker.clone(), settings(&client_dir, 3, None)).unwrap();
    let mut io = LocalIo::new(&engine, backing.file())
        .unwrap()
        .with_tracker(&tracker);
    workload(&mut io, 1);
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    let before = std::fs::read(backing.path()).unwrap();
    let (name, epoch, _) =
        ublk_dev::replicator::take_snapshot(&client_dir, "root", Some("before")).unwrap();
    assert_eq!(name, "before");
    assert_eq!(epoch, replicator.status().server_epoch);
    // Named after the time when no name is given; a name taken is refused.
    let (auto, _, _) = ublk_dev::replicator::take_snapshot(&client_dir, "root", None).unwrap();
    assert!(auto.starts_with("20") && auto.ends_with('Z'), "{auto}");
    let err = ublk_dev::replicator::take_snapshot(&client_dir, "root", Some("before"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already"), "{err}");
    workload(&mut io, 2);
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    let now = std::fs::read(backing.path()).unwrap();

    // Restore the snapshot into a new file: only data travels.
    let restore = |at: Option<&str>, to: &Path| {
        ublk_dev::restore::restore(
            &ublk_dev::restore::RestoreRequest {
                volume: "root".into(),
                at: at.map(str::to_string),
                to: to.to_path_buf(),
                client_dir: client_dir.clone(),
            },
            |_| {},
        )
    };
    let copy = dir.path().join("restored.img");
    let r = restore(Some("before"), &copy).unwrap();
    assert!(
        std::fs::read(&copy).unwrap() == before,
        "the restore is not the snapshot"
    );
    assert_eq!(r.snapshot, "before");
    // Onto that older copy, the mirror as it is now: only what differs.
    let r = restore(None, &copy).unwrap();
    assert!(
        std::fs::read(&copy).unwrap() == now,
        "the restore is not the mirror now"
    );
    assert!(r.blocks_same > r.blocks_received, "{r:?}");
    // A restore cut short is finished by running it again: here a few
    // blocks of the target are wrong, and only they travel.
    {
        let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        use std::os::unix::fs::FileExt;
        for at in [0u64, 5 << 16, 100 << 16] {
            f.write_all_at(&[0xa5; 4096], at).unwrap();
        }
    }
    let r = restore(None, &copy).unwrap();
    assert_eq!(r.blocks_received, 3, "{r:?}");
    assert!(std::fs::read(&copy).unwrap() == now);
    // `--at` is read in the user's own time zone (TZ), on the command
    // line: a minute from now in Tokyo finds the newest snapshot (the
    // unnamed one, taken right after "before"); an hour ago in Tokyo is
    // before every snapshot (read as UTC it would be eight hours ahead).
    let tokyo = |offset: &str| {
        let out = std::process::Command::new("date")
            .env("TZ", "Asia/Tokyo")
            .args(["-d", offset, "+%Y-%m-%d %H:%M"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let cli_restore = |at: &str, to: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
            .env("TZ", "Asia/Tokyo")
            .args(["restore", "--volume", "root", "--at", at, "--to"])
            .arg(to)
            .arg("--client-dir")
            .arg(&client_dir)
            .output()
            .unwrap()
    };
    let at_copy = dir.path().join("at.img");
    let out = cli_restore(&tokyo("+1 min"), &at_copy);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&auto),
        "{out:?}"
    );
    assert!(std::fs::read(&at_copy).unwrap() == before);
    let out = cli_restore(&tokyo("-1 hour"), &at_copy);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshot as old as"),
        "{out:?}"
    );
    let out = cli_restore("yesterday 25:00", &at_copy);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid time"),
        "{out:?}"
    );
    // Bad requests say what is wrong and change nothing.
    // The server's refusal stays a refusal; the target's size is bad usage.
    let err = restore(Some("nope"), &copy).unwrap_err();
    assert_eq!(err.kind(), ublk_dev::ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("no snapshot nope"), "{err}");
    let small = dir.path().join("small.img");
    std::fs::write(&small, b"x").unwrap();
    let err = restore(None, &small).unwrap_err();
    assert_eq!(err.kind(), ublk_dev::ErrorKind::Usage, "{err}");
    assert!(err.to_string().contains("is 1 bytes"), "{err}");
    assert_eq!(std::fs::read(&small).unwrap(), b"x");
    // The restore of "now" left no snapshot behind.
    let listed = mirror_server::snapshots::list(&data.join("volumes/laptop/root")).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    drop(replicator);
    drop(server);
    let (volume, _) =
        mirror_server::store::Volume::open(&data.join("volumes/laptop/root")).unwrap();
    let id = volume.snapshots().get("before").unwrap().id;
    let mut seen = vec![0u8; SIZE as usize];
    volume.read_snapshot(id, &mut seen, 0).unwrap();
    assert!(seen == before, "the snapshot is not the device as it was");
    assert!(image(&data) == std::fs::read(backing.path()).unwrap());
    assert!(image(&data) != before, "the workload changed nothing");
}

/// `--at 'yesterday 18:00'` means six in the evening of the day before, in
/// the time zone of the user who types it (TZ). Two snapshots are dated,
/// while the server is down, an hour before yesterday 18:00 in Tokyo and
/// an hour before yesterday 18:00 in New York (their manifest's times, as
/// an old volume would have them); then the same words restore, in each
/// zone, that zone's snapshot, whatever the time of day the test runs.
#[test]
fn at_yesterday_18_00_restores_the_snapshot_of_that_evening_in_the_user_s_zone() {
    let Mirrored {
        dir,
        data,
        listen,
        client_dir,
        server,
        versions: states,
    } = mirrored(&[(1, Some("five-pm")), (2, Some("seven-pm")), (3, None)]);
    drop(server);

    // "yesterday 18:00" in each zone, in ms since the epoch, as `date`
    // says. Tokyo's is 14 h before New York's, or (while Tokyo is already
    // a day ahead) 10 h after it: either way the zones disagree, and each
    // must get the snapshot taken an hour before its own.
    let zone_ms = |tz: &str, when: &str| -> u64 {
        let out = std::process::Command::new("date")
            .env("TZ", tz)
            .args(["-d", when, "+%s"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
            * 1000
    };
    let mut zones = [
        ("Asia/Tokyo", zone_ms("Asia/Tokyo", "yesterday 18:00")),
        (
            "America/New_York",
            zone_ms("America/New_York", "yesterday 18:00"),
        ),
    ];
    zones.sort_by_key(|&(_, ms)| ms);
    let hour = 3_600_000;
    let manifest = data.join("volumes/laptop/root/snapshots/manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for s in m["snapshots"].as_array_mut().unwrap() {
        let ms = match s["name"].as_str().unwrap() {
            "five-pm" => zones[0].1 - hour,
            "seven-pm" => zones[1].1 - hour,
            other => panic!("unexpected snapshot {other}"),
        };
        s["epoch_ms"] = ms.into();
        s["created_ms"] = ms.into();
        // As the schedule would have taken them.
        s["kind"] = "scheduled".into();
    }
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let _server = TestServer::start(&data, &listen);
    let restore_at = |tz: &str, at: &str, to: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
            .env("TZ", tz)
            .args(["restore", "--volume", "root", "--at", at, "--to"])
            .arg(to)
            .arg("--client-dir")
            .arg(&client_dir)
            .output()
            .unwrap()
    };
    for ((tz, _), want, state) in [
        (zones[0], "five-pm", &states[0]),
        (zones[1], "seven-pm", &states[1]),
    ] {
        let to = dir.path().join(format!("{want}.img"));
        let out = restore_at(tz, "yesterday 18:00", &to);
        assert!(out.status.success(), "{tz}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(want),
            "{tz}: {out:?}"
        );
        assert!(
            std::fs::read(&to).unwrap() == *state,
            "{tz}: not {want}'s data"
        );
    }
    // Restored from, both are kept from now on (retention no longer
    // takes them).
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for s in m["snapshots"].as_array().unwrap() {
        assert_eq!(s["kind"], "manual", "{s}");
    }
    // Before both: nothing to restore, and it says so.
    let out = restore_at(zones[0].0, "yesterday 16:00", &dir.path().join("none.img"));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshot as old as"),
        "{out:?}"
    );
}

#[test]
fn an_initial_sync_cut_short_by_a_daemon_restart_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = TestServer::start(&data, "127.0.0.1:0");
    let client_dir = dir.path().join("client");
    ublk_dev::enrollment::enroll(&client_dir, &server.token(&data, "laptop")).unwrap();
    let settings = |bandwidth| settings(&client_dir, 1, bandwidth);
    {
        let TrackedDevice {
            backing,
            engine,
            tracker,
        } = TrackedDevice::new(dir.path(), SIZE, 1 << 20);
        let mut io = LocalIo::new(&engine, backing.file())
            .unwrap()
            .with_tracker(&tracker);
        fill_random(&mut io, &mut Rng(0x2545_f491_4f6c_dd1d));
        // 32 MiB at 8 MiB/s: the daemon stops once the server staged
        // 8 MiB of it.
        let replicator = Replicator::start(tracker.clone(), settings(Some(8 << 20))).unwrap();
        let staged = data.join("volumes/laptop/root/staging/1.data");
        let deadline = Instant::now() + Duration::from_secs(30);
        // A new volume's first epoch is staged in place in a sparse file:
        // what is staged is what is allocated.
        let allocated = |m: std::fs::Metadata| std::os::unix::fs::MetadataExt::blocks(&m) * 512;
        while std::fs::metadata(&staged).map_or(0, allocated) < 8 << 20 {
            assert!(
                Instant::now() < deadline,
                "nothing staged: {:?}",
                replicator.status()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = replicator.status();
        assert!(
            status.wire_bytes_total == 0,
            "the sync ended already: {status:?}"
        );
        drop(replicator);
    }
    // The daemon comes back (its journal says every region is marked).
    let TrackedDevice {
        backing, tracker, ..
    } = TrackedDevice::reopen(dir.path(), SIZE, 1 << 20);
    let replicator = Replicator::start(tracker.clone(), settings(None)).unwrap();
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    let status = replicator.status();
    assert!(status.resumed_bytes >= 4 << 20, "{status:?}");
    assert!(
        status.wire_bytes_total < SIZE - (4 << 20),
        "everything travelled again: {status:?}"
    );
    assert!(image(&data) == std::fs::read(backing.path()).unwrap());
}

/// A resync (the daemon died: the regions it had marked are compared
/// with the mirror by hash) whose link breaks after blocks found different
/// were read: their cut is let go once read, so the retry cannot compare
/// them as the cut again. It goes on as a pre-copy round and a new cut,
/// instead of failing the same way for good.
#[test]
fn a_resync_cut_short_after_its_blocks_were_read_goes_on() {
    let Enrolled {
        dir,
        data,
        listen,
        client_dir,
        server,
    } = enrolled();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    {
        let device = TrackedDevice::new(dir.path(), SIZE, 1 << 20);
        let tracker = &device.tracker;
        let mut io = LocalIo::new(&device.engine, device.backing.file())
            .unwrap()
            .with_tracker(tracker);
        fill_random(&mut io, &mut rng);
        let replicator =
            Replicator::start(tracker.clone(), settings(&client_dir, 1, None)).unwrap();
        assert!(synced(tracker, &replicator), "{:?}", replicator.status());
        drop(replicator);
        // Unmirrored writes all over, and the daemon dies.
        for i in 0..SIZE >> 17 {
            let chunk = rng.bytes(1 << 16);
            io.submit(Request::write(i << 17, 1 << 16), &chunk).unwrap();
        }
    }
    let TrackedDevice {
        backing, tracker, ..
    } = TrackedDevice::reopen(dir.path(), SIZE, 1 << 20);
    assert!(tracker.status().regions_marked > 0);
    // 16 MiB differ, sent at 4 MiB/s: the link breaks after 1 MiB.
    let replicator =
        Replicator::start(tracker.clone(), settings(&client_dir, 1, Some(4 << 20))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while replicator.status().sending_done < 1 << 20 {
        assert!(Instant::now() < deadline, "{:?}", replicator.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(replicator.status().epochs_shipped, 0, "sent already");
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    let _server = TestServer::start(&data, &listen);
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    assert!(image(&data) == std::fs::read(backing.path()).unwrap());
}

/// Data that does not compress, all over the device, 128 KiB at a time.
fn fill_random(io: &mut LocalIo<'_>, rng: &mut Rng) {
    for i in 0..SIZE >> 17 {
        let chunk = rng.bytes(1 << 17);
        io.submit(Request::write(i << 17, 1 << 17), &chunk).unwrap();
    }
}

#[path = "../../mirror-server/tests/common/prom.rs"]
pub mod prom;

#[test]
fn device_metrics_parse_as_prometheus_and_follow_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = TestServer::start(&data, "127.0.0.1:0");
    let client_dir = dir.path().join("client");
    ublk_dev::enrollment::enroll(&client_dir, &server.token(&data, "laptop")).unwrap();
    let TrackedDevice {
        backing,
        engine,
        tracker,
    } = TrackedDevice::new(dir.path(), SIZE, 1 << 20);
    let replicator = Replicator::start(tracker.clone(), settings(&client_dir, 3, None)).unwrap();
    let mut io = LocalIo::new(&engine, backing.file())
        .unwrap()
        .with_tracker(&tracker);
    // The metrics of the status a daemon would publish now.
    let now = || {
        let status = ublk_dev::status::DeviceStatus {
            id: 3,
            pid: std::process::id(),
            updated_ms: ublk_mirror_common::clock::now_ms(),
            reads: 0,
            writes: 7,
            errors: 0,
            tracking: Some(tracker.status()),
            attach: None,
            mirror: Some(replicator.status()),
        };
        let device = ublk_dev::metrics::Device {
            device: "ublkb3".into(),
            name: "root".into(),
            status: Some(status),
        };
        prom::parse(&ublk_dev::metrics::render(&[device]))
    };
    let value = |m: &[prom::Sample], name: &str| {
        prom::value(m, name, &[("device", "ublkb3"), ("name", "root")])
    };
    workload(&mut io, 1);
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    let first = now();
    assert_eq!(value(&first, "ublk_mirror_link_up"), 1.0);
    assert_eq!(value(&first, "ublk_mirror_lag_seconds"), 0.0);
    assert_eq!(value(&first, "ublk_mirror_behind_bytes"), 0.0);
    let shipped = value(&first, "ublk_mirror_epochs_shipped_total");
    let wire = value(&first, "ublk_mirror_sent_wire_bytes_total");
    assert!(shipped >= 1.0 && wire > 0.0, "{first:?}");
    assert!(value(&first, "ublk_mirror_status_updated_timestamp_seconds") > 1.7e9);
    // More writes: the dirty bytes show before the mirror has them, the
    // counters move once it has.
    workload(&mut io, 2);
    let pending = now();
    assert!(
        value(&pending, "ublk_mirror_dirty_bytes") > 0.0
            || value(&pending, "ublk_mirror_epochs_shipped_total") > shipped,
        "{pending:?}"
    );
    assert!(synced(&tracker, &replicator), "{:?}", replicator.status());
    let second = now();
    assert!(value(&second, "ublk_mirror_epochs_shipped_total") > shipped);
    assert!(value(&second, "ublk_mirror_sent_wire_bytes_total") > wire);
    assert_eq!(
        value(&second, "ublk_mirror_server_epoch"),
        replicator.status().server_epoch as f64
    );
    drop(replicator);
}

/// A server that refuses every attempt (here: the volume is over the
/// client's quota) while a `sync` waits, kicking the replicator every
/// 50 ms: the replicator tries again at most once a second (its backoff's
/// floor), not at every kick, and says why it failed.
#[test]
fn a_sync_waiting_on_a_refusing_server_retries_at_most_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let server = TestServer::start_with(
        &data,
        mirror_server::config::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_bytes_per_client: Some(ublk_mirror_common::size::ByteSize(SIZE / 2)),
            ..mirror_server::config::ServerConfig::default()
        },
    );
    let client_dir = dir.path().join("client");
    ublk_dev::enrollment::enroll(&client_dir, &server.token(&data, "laptop")).unwrap();
    let (device, replicator) = mirrored_device(dir.path(), &client_dir);
    let mut io = LocalIo::new(&device.engine, device.backing.file())
        .unwrap()
        .with_tracker(&device.tracker);
    workload(&mut io, 1);
    // The first failure, then 3 s of a sync asking.
    let deadline = Instant::now() + Duration::from_secs(30);
    while replicator.status().failures == 0 && Instant::now() < deadline {
        replicator.kick().notify_one();
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = replicator.status();
    assert!(first.failures > 0, "never refused: {first:?}");
    let asking = Instant::now();
    while asking.elapsed() < Duration::from_secs(3) {
        replicator.kick().notify_one();
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = replicator.status();
    let tries = after.failures - first.failures;
    // 60 kicks; at most one try per second of them (and the one the
    // first failure's wait may end in).
    assert!(
        (1..=4).contains(&tries),
        "{tries} tries in 3 s of kicks: {after:?}"
    );
    let why = after.last_error.unwrap_or_default();
    assert!(why.contains("max_bytes_per_client"), "{why}");
    assert_eq!(device.tracker.released_epoch(), 0);
}

/// `ublk-mirror snapshots` on the laptop lists the volume's snapshots as
/// the server keeps them, and a time it shows, pasted into `restore --at`,
/// restores that snapshot; a volume the client does not have is refused
/// with the ones it has.
#[test]
fn the_laptop_lists_its_snapshots_and_restores_one_by_the_time_shown() {
    let m = mirrored(&[(1, Some("first")), (2, Some("second")), (3, None)]);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
            .env("TZ", "Europe/Berlin")
            .args(args)
            .arg("--client-dir")
            .arg(&m.client_dir)
            .output()
            .unwrap()
    };
    let out = cli(&["snapshots", "--volume", "root"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(rows[0], ["SNAPSHOT", "EPOCH", "SHOWS", "KIND"], "{text}");
    // NAME EPOCH DATE TIME ZONE KIND
    assert!(
        rows[1..].iter().all(|r| r.len() == 6 && r[5] == "manual"),
        "{text}"
    );
    assert_eq!((rows[1][0], rows[2][0]), ("first", "second"), "{text}");
    assert!(rows[2][4] == "CET" || rows[2][4] == "CEST", "{text}");

    let out = cli(&["snapshots", "--volume", "root", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let epochs: Vec<(String, u64)> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["epoch"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(epochs.len(), 2, "{json}");
    assert!(epochs[0].1 < epochs[1].1, "{json}");
    assert_eq!(rows[2][1], epochs[1].1.to_string(), "{text}");

    // The newest snapshot's time, as shown, restores it.
    let shown = rows[2][2..5].join(" ");
    let to = m.dir.path().join("second.img");
    let out = cli(&[
        "restore",
        "--volume",
        "root",
        "--at",
        &shown,
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{shown}: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("second"),
        "{out:?}"
    );
    assert!(std::fs::read(&to).unwrap() == m.versions[1]);
    // `--at now` is the mirror now, as no --at (not the newest snapshot).
    let now = m.dir.path().join("now.img");
    let out = cli(&[
        "restore",
        "--volume",
        "root",
        "--at",
        "now",
        "--to",
        now.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&now).unwrap() == m.versions[2]);

    // Not this client's volume: refused (exit 6), naming the ones it has;
    // a name no volume may have is bad usage (exit 2), asked of no one.
    let out = cli(&["snapshots", "--volume", "nope"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no volume nope") && err.contains("root"),
        "{err}"
    );
    let out = cli(&["snapshots", "--volume", "a/b"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
