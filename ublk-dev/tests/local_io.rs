//! The device's I/O path without the kernel: [`LocalIo`] issues the same
//! io_uring operations as the ublk queues, on a real backing file.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use proptest::prelude::*;
use ublk_dev::backing::{Backing, BackingOptions};
use ublk_dev::engine::uring::LocalIo;
use ublk_dev::engine::{Engine, Errno, Geometry, Op, Request, MAX_IO_BYTES};

const MIB: u64 = 1 << 20;

struct Device {
    _dir: tempfile::TempDir,
    backing: Backing,
    engine: Engine,
}

fn device(size: u64, block_size: u32, direct_io: bool) -> Device {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let backing = Backing::open(&BackingOptions {
        path: &path,
        size: Some(size),
        create: true,
        block_size,
        direct_io,
    })
    .unwrap();
    let engine = Engine::new(Geometry {
        size,
        block_size,
        max_io: MAX_IO_BYTES,
        discard: true,
    });
    Device {
        _dir: dir,
        backing,
        engine,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

fn allocated(d: &Device) -> u64 {
    d.backing.file().metadata().unwrap().blocks() * 512
}

#[test]
fn writes_read_back_and_land_in_the_file() {
    let d = device(8 * MIB, 512, true);
    assert!(
        d.backing.direct_io(),
        "O_DIRECT should work on this file system"
    );
    let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap();
    let data = pattern(1, 64 * 1024);
    io.submit(Request::write(MIB, data.len() as u64), &data)
        .unwrap();
    io.submit(Request::flush(), &[]).unwrap();
    assert_eq!(
        io.submit(Request::read(MIB, data.len() as u64), &[])
            .unwrap(),
        data
    );
    let on_disk = std::fs::read(d.backing.path()).unwrap();
    assert_eq!(&on_disk[MIB as usize..][..data.len()], &data[..]);
    assert!(on_disk[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn fua_writes_complete() {
    let d = device(MIB, 4096, true);
    let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap();
    let data = pattern(2, 4096);
    let req = Request {
        fua: true,
        ..Request::write(0, 4096)
    };
    io.submit(req, &data).unwrap();
    assert_eq!(io.submit(Request::read(0, 4096), &[]).unwrap(), data);
}

#[test]
fn discard_punches_holes_and_reads_zeroes() {
    let d = device(8 * MIB, 512, true);
    let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap();
    let data = pattern(3, MAX_IO_BYTES as usize);
    for i in 0..8 {
        io.submit(
            Request::write(i * u64::from(MAX_IO_BYTES), data.len() as u64),
            &data,
        )
        .unwrap();
    }
    io.submit(Request::flush(), &[]).unwrap();
    let before = allocated(&d);
    assert!(before >= 4 * MIB, "{before}");
    io.submit(Request::new(Op::Discard, 0, 2 * MIB), &[])
        .unwrap();
    let after = allocated(&d);
    assert!(after <= before - 2 * MIB, "allocation {before} -> {after}");
    assert!(io
        .submit(Request::read(0, 65536), &[])
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    // Data outside the discarded range is untouched.
    let rest = io
        .submit(Request::read(2 * MIB, data.len() as u64), &[])
        .unwrap();
    assert_eq!(rest, data);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let d = device(4 * MIB, 512, true);
    let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap();
    let data = pattern(4, MAX_IO_BYTES as usize);
    io.submit(Request::write(0, data.len() as u64), &data)
        .unwrap();
    io.submit(Request::write(MIB, data.len() as u64), &data)
        .unwrap();
    io.submit(Request::flush(), &[]).unwrap();
    let full = allocated(&d);

    // NOUNMAP: zeroes in place, stays allocated.
    let keep = Request {
        no_unmap: true,
        ..Request::new(Op::WriteZeroes, 0, 65536)
    };
    io.submit(keep, &[]).unwrap();
    assert!(io
        .submit(Request::read(0, 65536), &[])
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(allocated(&d), full);

    // Without NOUNMAP: a hole.
    io.submit(
        Request::new(Op::WriteZeroes, MIB, u64::from(MAX_IO_BYTES)),
        &[],
    )
    .unwrap();
    assert!(io
        .submit(Request::read(MIB, 4096), &[])
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert!(allocated(&d) < full, "write-zeroes did not deallocate");
}

#[test]
fn misaligned_and_out_of_range_requests_fail_cleanly() {
    let d = device(MIB, 4096, true);
    let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap();
    let data = vec![9u8; 4096];
    assert_eq!(
        io.submit(Request::write(512, 4096), &data).unwrap_err(),
        Errno::INVAL
    );
    assert_eq!(
        io.submit(Request::write(MIB, 4096), &data).unwrap_err(),
        Errno::INVAL
    );
    assert_eq!(
        io.submit(Request::read(0, 512), &[]).unwrap_err(),
        Errno::INVAL
    );
    // Nothing was written.
    assert!(std::fs::read(d.backing.path())
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn buffered_mode_works_too() {
    let d = device(MIB, 512, false);
    assert!(!d.backing.direct_io());
    let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap();
    let data = pattern(5, 512);
    io.submit(Request::write(512, 512), &data).unwrap();
    assert_eq!(io.submit(Request::read(512, 512), &[]).unwrap(), data);
}

/// One step of a random workload.
#[derive(Debug, Clone)]
enum Action {
    Write {
        block: u64,
        blocks: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        block: u64,
        blocks: u64,
    },
    Discard {
        block: u64,
        blocks: u64,
    },
    Zeroes {
        block: u64,
        blocks: u64,
        no_unmap: bool,
    },
    Flush,
}

const BLOCKS: u64 = 512; // of 4096 bytes: a 2 MiB device
const BS: u64 = 4096;

fn action() -> impl Strategy<Value = Action> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(128)));
    prop_oneof![
        4 => (range.clone(), any::<u8>(), any::<bool>())
            .prop_map(|((block, blocks), seed, fua)| Action::Write { block, blocks, seed, fua }),
        3 => range.clone().prop_map(|(block, blocks)| Action::Read { block, blocks }),
        1 => range.clone().prop_map(|(block, blocks)| Action::Discard { block, blocks }),
        1 => (range, any::<bool>())
            .prop_map(|((block, blocks), no_unmap)| Action::Zeroes { block, blocks, no_unmap }),
        1 => Just(Action::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any sequence of requests leaves the device reading back exactly what
    /// a plain byte array would hold, and the backing file equal to it.
    #[test]
    fn the_device_behaves_like_memory(actions in proptest::collection::vec(action(), 1..40)) {
        let d = device(BLOCKS * BS, 4096, true);
        let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap();
        let mut model = vec![0u8; (BLOCKS * BS) as usize];
        for a in actions {
            match a {
                Action::Write { block, blocks, seed, fua } => {
                    let data = pattern(seed, (blocks * BS) as usize);
                    let req = Request { fua, ..Request::write(block * BS, blocks * BS) };
                    io.submit(req, &data).unwrap();
                    model[(block * BS) as usize..][..data.len()].copy_from_slice(&data);
                }
                Action::Read { block, blocks } => {
                    let got = io.submit(Request::read(block * BS, blocks * BS), &[]).unwrap();
                    prop_assert_eq!(&got[..], &model[(block * BS) as usize..][..got.len()]);
                }
                Action::Discard { block, blocks } | Action::Zeroes { block, blocks, .. } => {
                    let req = match a {
                        Action::Zeroes { no_unmap, .. } => Request {
                            no_unmap,
                            ..Request::new(Op::WriteZeroes, block * BS, blocks * BS)
                        },
                        _ => Request::new(Op::Discard, block * BS, blocks * BS),
                    };
                    io.submit(req, &[]).unwrap();
                    // Punched holes read as zeroes on every Linux file system
                    // that supports them; the model follows.
                    model[(block * BS) as usize..][..(blocks * BS) as usize].fill(0);
                }
                Action::Flush => {
                    io.submit(Request::flush(), &[]).unwrap();
                }
            }
        }
        io.submit(Request::flush(), &[]).unwrap();
        prop_assert!(std::fs::read(d.backing.path()).unwrap() == model);
    }
}

mod tracking {
    //! Change tracking and epochs on the in-process I/O path, against a
    //! reference model (invariants 2 and 3):
    //!
    //! - a consumer that applies each sealed epoch's changes, read as the
    //!   device at its cut, onto a copy ends with exactly the device at
    //!   that cut, however the device was written meanwhile;
    //! - after a crash at any point, every block that differs from the
    //!   device at the last released cut lies in a marked region.

    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;
    use ublk_dev::tracking::{History, SealAt, Tracker, TrackerOptions};

    const REGION: u64 = 64 << 10; // the smallest, to have many regions

    /// One step of the model test: a device request or an epoch operation.
    #[derive(Debug, Clone)]
    enum Step {
        Io(Action),
        Seal,
        /// Read every byte the `n`th sealed epoch changed.
        ReadEpoch(usize),
        /// Release up to the `n`th sealed epoch, applying them to the copy.
        Release(usize),
        /// The daemon dies (no clean stop) and starts again.
        Crash,
    }

    /// Short requests over a small part of the device: many overlap, and
    /// many share a preserved chunk without overlapping.
    fn short_action() -> impl Strategy<Value = Action> {
        let range = (0..256u64).prop_flat_map(|b| (Just(b), 1..=16u64));
        prop_oneof![
            4 => (range.clone(), any::<u8>(), any::<bool>())
                .prop_map(|((block, blocks), seed, fua)| Action::Write { block, blocks, seed, fua }),
            1 => range.clone().prop_map(|(block, blocks)| Action::Discard { block, blocks }),
            1 => (range, any::<bool>())
                .prop_map(|((block, blocks), no_unmap)| Action::Zeroes { block, blocks, no_unmap }),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            5 => action().prop_map(Step::Io),
            5 => short_action().prop_map(Step::Io),
            2 => Just(Step::Seal),
            2 => (0usize..4).prop_map(Step::ReadEpoch),
            2 => (0usize..4).prop_map(Step::Release),
            1 => Just(Step::Crash),
        ]
    }

    fn open(
        state: &Path,
        file: &std::fs::File,
        history: History,
        cow_memory: u64,
    ) -> (Tracker, Option<ublk_dev::journal::OpenReport>) {
        Tracker::open(&TrackerOptions {
            state_dir: state,
            identity: (Path::new("/test/disk.img"), 1),
            file,
            device_size: BLOCKS * BS,
            region_size: REGION,
            history,
            cow_memory,
        })
        .unwrap()
    }

    /// Everything epoch `id` changed, read as the device at its cut.
    fn read_epoch(t: &Tracker, id: u64) -> Vec<(std::ops::Range<u64>, Vec<u8>)> {
        let touched = t.epoch(id).unwrap().changes.touched();
        touched
            .iter()
            .map(|r| {
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                t.read_epoch(id, r.start, &mut buf).unwrap();
                (r, buf)
            })
            .collect()
    }

    /// Carry out a device request, and on the model; offsets and lengths
    /// in units of `unit` bytes.
    fn run(model: &mut [u8], io: &mut LocalIo<'_>, a: &Action, unit: u64) {
        match *a {
            Action::Write {
                block,
                blocks,
                seed,
                fua,
            } => {
                let data = pattern(seed, (blocks * unit) as usize);
                let req = Request {
                    fua,
                    ..Request::write(block * unit, blocks * unit)
                };
                io.submit(req, &data).unwrap();
                model[(block * unit) as usize..][..data.len()].copy_from_slice(&data);
            }
            Action::Discard { block, blocks } | Action::Zeroes { block, blocks, .. } => {
                let req = match *a {
                    Action::Zeroes { no_unmap, .. } => Request {
                        no_unmap,
                        ..Request::new(Op::WriteZeroes, block * unit, blocks * unit)
                    },
                    _ => Request::new(Op::Discard, block * unit, blocks * unit),
                };
                io.submit(req, &[]).unwrap();
                model[(block * unit) as usize..][..(blocks * unit) as usize].fill(0);
            }
            Action::Read { block, blocks } => {
                io.submit(Request::read(block * unit, blocks * unit), &[])
                    .unwrap();
            }
            Action::Flush => {
                io.submit(Request::flush(), &[]).unwrap();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn epochs_read_as_their_cut_and_crashes_lose_no_change(
            steps in proptest::collection::vec(step(), 1..60),
            cow_memory in prop_oneof![Just(0u64), Just(16 << 10), Just(64 << 20)],
            // 512: requests smaller than a preserved chunk, and not aligned to one.
            unit in prop_oneof![Just(512u64), Just(BS)],
        ) {
            let d = device(BLOCKS * BS, 512, true);
            let state = tempfile::tempdir().unwrap();
            // The device now, at each unreleased cut, and the consumer's copy
            // (the device at the last released cut).
            let mut model = vec![0u8; (BLOCKS * BS) as usize];
            let mut cuts: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut copy = model.clone();
            let mut tracker = open(state.path(), d.backing.file(), History::NewFile, cow_memory).0;
            for s in steps {
                match s {
                    Step::Io(a) => {
                        let mut io = LocalIo::new(&d.engine, d.backing.file()).unwrap().with_tracker(&tracker);
                        run(&mut model, &mut io, &a, unit);
                    }
                    Step::Seal => {
                        let id = tracker.seal(SealAt::Now).unwrap();
                        prop_assert!(cuts.keys().all(|&k| k < id), "epoch numbers went back");
                        cuts.insert(id, model.clone());
                    }
                    Step::ReadEpoch(n) => {
                        let Some((&id, cut)) = cuts.iter().nth(n) else { continue };
                        for (r, bytes) in read_epoch(&tracker, id) {
                            prop_assert!(bytes[..] == cut[r.start as usize..r.end as usize],
                                "epoch {} does not read as its cut at {:?}", id, r);
                        }
                    }
                    Step::Release(n) => {
                        let Some(&upto) = cuts.keys().nth(n) else { continue };
                        // The consumer applies each epoch in order and
                        // releases it once applied.
                        for (&id, cut) in cuts.range(..=upto) {
                            for (r, bytes) in read_epoch(&tracker, id) {
                                copy[r.start as usize..r.end as usize].copy_from_slice(&bytes);
                            }
                            prop_assert!(copy == *cut, "the copy after epoch {} is not the device at its cut", id);
                            // Some releases keep recent regions marked
                            // (as the replicator's do), for 0 to 2 ms.
                            let released = if id % 2 == 0 {
                                tracker.release(id)
                            } else {
                                tracker.release_keeping(id, Duration::from_millis(id % 3))
                            };
                            prop_assert!(released.unwrap().released);
                        }
                        cuts = cuts.split_off(&(upto + 1));
                    }
                    Step::Crash => {
                        drop(tracker);
                        let (t, report) = open(state.path(), d.backing.file(), History::Recovering, cow_memory);
                        prop_assert!(report.unwrap().unclean);
                        tracker = t;
                        cuts.clear();
                        // No lost change: every block that differs from the
                        // last released cut is in a marked region.
                        let marked = tracker.marked_ranges();
                        for (i, (a, b)) in copy.chunks(BS as usize).zip(model.chunks(BS as usize)).enumerate() {
                            if a != b {
                                let off = i as u64 * BS;
                                prop_assert!(marked.contains_range(off..off + BS),
                                    "block {} changed since the last release but its region is not marked", i);
                            }
                        }
                    }
                }
            }
            // The file is the device.
            prop_assert!(std::fs::read(d.backing.path()).unwrap() == model);
        }
    }
}
