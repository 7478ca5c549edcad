//! The control socket end to end, in-process: a tracker behind a real
//! socket, written through the device's I/O path, and a consumer that keeps
//! a copy with seal, read and release.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use ublk_dev::backing::Backing;
use ublk_dev::control::{Client, Server};

use crate::support::{Rng, TrackedDevice};
use ublk_dev::engine::uring::LocalIo;
use ublk_dev::engine::{Engine, Op, Request};
use ublk_dev::tracking::{SealAt, Tracker};
use ublk_mirror_common::RangeSet;

const SIZE: u64 = 8 << 20;

struct Setup {
    dir: tempfile::TempDir,
    backing: Backing,
    engine: Engine,
    tracker: Arc<Tracker>,
    _server: Server,
    client: Client,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let TrackedDevice {
        backing,
        engine,
        tracker,
    } = TrackedDevice::new(dir.path(), SIZE, 64 << 10);
    let sock = dir.path().join("ctl.sock");
    let server = Server::start_at(&sock, tracker.clone(), None).unwrap();
    Setup {
        client: Client::at(&sock),
        _server: server,
        dir,
        backing,
        engine,
        tracker,
    }
}

fn apply(client: &Client, epoch: u64, copy: &std::fs::File) -> u64 {
    client
        .read(epoch, |x, data| {
            let zeroes;
            let bytes = match data {
                Some(d) => d,
                None => {
                    zeroes = vec![0u8; x.len as usize];
                    &zeroes
                }
            };
            copy.write_all_at(bytes, x.offset).unwrap();
            Ok(())
        })
        .unwrap()
}

#[test]
fn a_copy_kept_by_seal_apply_release_is_the_device_at_each_cut() {
    let s = setup();
    let mut io = LocalIo::new(&s.engine, s.backing.file())
        .unwrap()
        .with_tracker(&s.tracker);
    let copy_path = s.dir.path().join("copy.img");
    let copy = std::fs::File::create(&copy_path).unwrap();
    copy.set_len(SIZE).unwrap();

    io.submit(Request::write(0, 65536), &[0xaa; 65536]).unwrap();
    io.submit(Request::write(3 << 20, 8192), &[0xbb; 8192])
        .unwrap();
    // Cut at a FLUSH: the sealer waits until one comes.
    let client = Client::at(&s.dir.path().join("ctl.sock"));
    let sealer = std::thread::spawn(move || client.seal(Some(Duration::from_secs(60))));
    while s.tracker.status().sealed.is_empty() {
        io.submit(Request::flush(), &[]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let epoch = sealer.join().unwrap().unwrap();
    assert_eq!(epoch, 1);
    let at_cut = std::fs::read(s.backing.path()).unwrap();
    // Overwrites and a discard after the cut do not reach the epoch.
    io.submit(Request::write(4096, 4096), &[0xcc; 4096])
        .unwrap();
    io.submit(Request::new(Op::Discard, 3 << 20, 4096), &[])
        .unwrap();
    let list = s.client.epochs().unwrap();
    assert_eq!((list.current, list.sealed.len()), (2, 1));
    assert!(list.sealed[0].at_flush);
    assert_eq!(list.sealed[0].data_bytes, 65536 + 8192);

    assert_eq!(apply(&s.client, epoch, &copy), 65536 + 8192);
    assert!(std::fs::read(&copy_path).unwrap() == at_cut);
    let released = s.client.release(epoch).unwrap();
    assert!(released.released);
    // Both regions of epoch 1 were written again in epoch 2: kept marked.
    assert_eq!(released.regions_cleared, 0);
    assert_eq!(s.tracker.status().regions_marked, 2);

    // The next epoch, cut at once, brings the copy to the device now.
    let epoch = s.client.seal(None).unwrap();
    assert_eq!(epoch, 2);
    apply(&s.client, epoch, &copy);
    s.client.release(epoch).unwrap();
    assert!(std::fs::read(&copy_path).unwrap() == std::fs::read(s.backing.path()).unwrap());
    assert_eq!(s.tracker.status().regions_marked, 0);
}

#[test]
fn bad_requests_get_clear_answers() {
    let s = setup();
    let err = s.client.release(7).unwrap_err().to_string();
    assert!(
        err.contains("epoch 7 is not a sealed, unreleased epoch"),
        "{err}"
    );
    let err = s.client.read(1, |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("not a sealed"), "{err}");
    // A request in a protocol version this daemon does not speak.
    use std::io::{BufRead, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(s.dir.path().join("ctl.sock")).unwrap();
    conn.write_all(b"{\"version\":99,\"op\":\"epochs\"}\n")
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(conn).read_line(&mut line).unwrap();
    assert!(line.contains("version 99 is not spoken here"), "{line}");
    // Nobody listening.
    let err = Client::at(&s.dir.path().join("nothing.sock"))
        .epochs()
        .unwrap_err()
        .to_string();
    assert!(err.contains("is the device's daemon running"), "{err}");
}

#[test]
fn holes_at_a_cut_read_as_zeroes_at_the_cut_whatever_came_after() {
    let s = setup();
    let mut io = LocalIo::new(&s.engine, s.backing.file())
        .unwrap()
        .with_tracker(&s.tracker);
    let (a, b, c) = (1u64 << 20, 4u64 << 20, 6u64 << 20);
    io.submit(Request::write(a, 65536), &[0xaa; 65536]).unwrap();
    io.submit(Request::write(b, 65536), &[0xbb; 65536]).unwrap();
    // The whole device is the epoch, as for a first sync.
    s.tracker.resync_all().unwrap();
    let epoch = s.tracker.seal(SealAt::Now).unwrap();
    // After the cut, the data at `a` is discarded (a hole in the file
    // now) and a hole at `c` is written.
    io.submit(Request::new(Op::Discard, a, 65536), &[]).unwrap();
    io.submit(Request::write(c, 4096), &[0xcc; 4096]).unwrap();
    assert!(
        ublk_mirror_common::fsutil::holes(s.backing.file(), a..a + 65536).first()
            == Some(&(a..a + 65536)),
        "the discard made no hole: this test tests nothing"
    );
    let mut all = RangeSet::new();
    all.insert(0..SIZE);
    let holes = s.tracker.holes_at_cut(epoch, &all).unwrap();
    assert!(
        !holes.intersects(a..a + 65536),
        "data at the cut taken for a hole"
    );
    assert!(!holes.intersects(b..b + 65536), "data taken for a hole");
    for h in holes.iter() {
        let mut buf = vec![1u8; (h.end - h.start) as usize];
        s.tracker.read_epoch(epoch, h.start, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "{h:?} is not zero at the cut");
    }
    // The rest of the device is holes (the write at `c` filled one).
    assert_eq!(holes.len(), SIZE - 2 * 65536 - 4096, "{holes:?}");
    // The data at `b`, read once by the mirror (its cut let go), is then
    // discarded: a hole in the file that says nothing of the cut.
    let mut buf = vec![0u8; 65536];
    s.tracker.take_epoch(epoch, b, &mut buf).unwrap();
    io.submit(Request::new(Op::Discard, b, 65536), &[]).unwrap();
    let holes = s.tracker.holes_at_cut(epoch, &all).unwrap();
    assert!(
        !holes.intersects(b..b + 65536),
        "a block read once, then discarded, taken for a hole at the cut"
    );
    s.tracker.release(epoch).unwrap();
}

/// An epoch demoted to a pre-copy round while it is read (the mirror sends
/// a hand-sealed epoch as a round during a pre-copy run) no longer reads as
/// its cut: the read fails from there on instead of going on with the
/// device as it is.
#[test]
fn a_read_fails_once_its_epoch_is_no_longer_a_cut() {
    let s = setup();
    let mut io = LocalIo::new(&s.engine, s.backing.file())
        .unwrap()
        .with_tracker(&s.tracker);
    let data = Rng(0x9e37_79b9_7f4a_7c15).bytes(SIZE as usize);
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        io.submit(Request::write(i as u64 * (256 << 10), 256 << 10), piece)
            .unwrap();
    }
    let epoch = s.tracker.seal(SealAt::Now).unwrap();
    // The whole device (8 MiB) is far more than the socket holds: most of
    // it is read after the demotion.
    let mut demoted = false;
    let mut after = 0u64;
    let read = s.client.read(epoch, |x, _| {
        if demoted {
            after += x.len;
        } else {
            s.tracker.demote(epoch).unwrap();
            demoted = true;
        }
        Ok(())
    });
    let e = read.expect_err("an epoch read on after it stopped being a cut");
    assert!(e.to_string().contains("not a cut"), "{e}");
    assert!(after < SIZE / 2, "{after} bytes came after the demotion");
}
