//! Engine steps as io_uring submissions.
//!
//! [`sqe`] builds the submission for one [`Step`]; the ublk queues push it on
//! their own ring (the backing file registered as a fixed file), and
//! [`LocalIo`] pushes it on a private ring with a plain descriptor. Both
//! paths therefore issue exactly the same operations on the backing file,
//! which is what lets `cargo test` exercise the device's I/O path without a
//! kernel ublk driver.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};

use super::{
    drive, AlignedBuf, ChangeTracking, Engine, Errno, Request, RequestBuf, Step, ZERO_CHUNK,
};

/// How the submission names the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRef {
    /// An index into the ring's registered files.
    Fixed(u32),
    /// A plain file descriptor.
    Raw(RawFd),
}

/// Where a submission's data goes to or comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufRef {
    /// The request buffer in memory: its address, at least as long as the
    /// request.
    Addr(*mut u8),
    /// The request's pages in the kernel, registered in the ring's buffer
    /// table at `index` (ublk zero copy); addresses are offsets into the
    /// request. Zeroes come from reading `zero_file`, a registered
    /// `/dev/zero`, since this process cannot write into the pages.
    Registered {
        /// The buffer table slot (the request's tag).
        index: u16,
        /// Registered file index of `/dev/zero`.
        zero_file: u32,
    },
}

/// Build the submission for `step`. `zeroes` is a buffer of [`ZERO_CHUNK`]
/// zero bytes. [`Step::FillZeroes`] on a buffer in memory touches no file
/// and has no submission ([`drive`] runs it itself): here it becomes a no-op.
pub fn sqe(step: Step, file: FileRef, buf: BufRef, zeroes: *const u8) -> squeue::Entry {
    macro_rules! on_file {
        (|$fd:ident| $build:expr) => {
            match file {
                FileRef::Fixed(i) => {
                    let $fd = types::Fixed(i);
                    $build
                }
                FileRef::Raw(raw) => {
                    let $fd = types::Fd(raw);
                    $build
                }
            }
        };
    }
    let dsync_flags = |dsync: bool| if dsync { libc::RWF_DSYNC } else { 0 };
    match step {
        Step::Read {
            offset,
            len,
            buf_offset,
        } => match buf.at(buf_offset) {
            (addr, None) => on_file!(|fd| opcode::Read::new(fd, addr, len).offset(offset).build()),
            (addr, Some(index)) => on_file!(|fd| opcode::ReadFixed::new(fd, addr, len, index)
                .offset(offset)
                .build()),
        },
        Step::Write {
            offset,
            len,
            buf_offset,
            dsync,
        } => match buf.at(buf_offset) {
            (addr, None) => on_file!(|fd| opcode::Write::new(fd, addr, len)
                .offset(offset)
                .rw_flags(dsync_flags(dsync))
                .build()),
            (addr, Some(index)) => on_file!(|fd| opcode::WriteFixed::new(fd, addr, len, index)
                .offset(offset)
                .rw_flags(dsync_flags(dsync))
                .build()),
        },
        Step::WriteZeroBuf { offset, len, dsync } => {
            debug_assert!(len as usize <= ZERO_CHUNK);
            on_file!(|fd| opcode::Write::new(fd, zeroes, len)
                .offset(offset)
                .rw_flags(dsync_flags(dsync))
                .build())
        }
        Step::Fallocate { alloc, offset, len } => on_file!(|fd| opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(alloc.mode())
            .build()),
        Step::DataSync => on_file!(|fd| opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()),
        Step::FillZeroes { buf_offset, len } => match buf {
            BufRef::Addr(_) => opcode::Nop::new().build(),
            BufRef::Registered { index, zero_file } => {
                opcode::ReadFixed::new(types::Fixed(zero_file), offset_addr(buf_offset), len, index)
                    .offset(0)
                    .build()
            }
        },
    }
}

impl BufRef {
    /// The address a submission gives for `buf_offset` into the request,
    /// and the buffer table slot when the request is registered.
    fn at(self, buf_offset: u32) -> (*mut u8, Option<u16>) {
        match self {
            BufRef::Addr(base) => (base.wrapping_add(buf_offset as usize), None),
            BufRef::Registered { index, .. } => (offset_addr(buf_offset), Some(index)),
        }
    }
}

/// A kernel-registered buffer is addressed from 0: the "address" of a
/// fixed read or write into it is the offset into the request.
fn offset_addr(buf_offset: u32) -> *mut u8 {
    std::ptr::null_mut::<u8>().wrapping_add(buf_offset as usize)
}

/// The engine run in-process on a private io_uring, one request at a time:
/// the device's I/O path without the kernel's ublk driver. Used by tests and
/// by tools that need to read or write a backing file the way the device does.
pub struct LocalIo<'e> {
    engine: &'e Engine,
    file: &'e File,
    ring: IoUring,
    zeroes: AlignedBuf,
    buf: AlignedBuf,
    /// Change tracking, as on the device.
    tracker: Option<&'e dyn ChangeTracking>,
    /// Set when the ring failed in a way that may leave a submission behind:
    /// its completion could be mistaken for a later request's, so no more.
    broken: bool,
}

impl<'e> LocalIo<'e> {
    /// Run `engine`'s requests against `file` (opened as the device would).
    pub fn new(engine: &'e Engine, file: &'e File) -> std::io::Result<LocalIo<'e>> {
        Ok(LocalIo {
            engine,
            file,
            ring: IoUring::new(4)?,
            zeroes: AlignedBuf::zeroed(ZERO_CHUNK),
            buf: AlignedBuf::zeroed(engine.geometry().max_io as usize),
            broken: false,
            tracker: None,
        })
    }

    /// Record every request with `tracker` first, as the device does.
    pub fn with_tracker(mut self, tracker: &'e dyn ChangeTracking) -> LocalIo<'e> {
        self.tracker = Some(tracker);
        self
    }

    /// Carry out `req`. For a write, `data` holds the bytes to write; for a
    /// read, the bytes read are returned. Errors come back as the errno the
    /// kernel would have seen.
    pub fn submit(&mut self, req: Request, data: &[u8]) -> Result<Vec<u8>, Errno> {
        if self.broken {
            return Err(Errno::IO);
        }
        let io = self.engine.start(req)?;
        let len = req.len as usize;
        if req.op == super::Op::Write {
            if data.len() != len {
                return Err(Errno::INVAL);
            }
            self.buf.as_mut_slice()[..len].copy_from_slice(data);
        }
        let ticket = match self.tracker {
            Some(t) => t.before_write(io.request())?,
            None => None,
        };
        let fd = FileRef::Raw(self.file.as_raw_fd());
        let zeroes = self.zeroes.as_slice().as_ptr();
        let ring = &mut self.ring;
        let broken = &mut self.broken;
        let fut = drive(
            io,
            RequestBuf::Memory(self.buf.as_mut_slice()),
            |step, base| {
                // A buffer in memory: drive always hands its address.
                let buf = BufRef::Addr(base.unwrap_or(std::ptr::null_mut()));
                let res = run_one(ring, sqe(step, fd, buf, zeroes));
                std::future::ready(res.unwrap_or_else(|e| {
                    *broken = true;
                    e
                }))
            },
        );
        let res = block_on_ready(fut);
        if let (Some(t), Some(ticket)) = (self.tracker, ticket) {
            t.after_write(ticket);
        }
        if res < 0 {
            return Err(Errno(-res));
        }
        Ok(match req.op {
            super::Op::Read => self.buf.as_slice()[..len].to_vec(),
            _ => Vec::new(),
        })
    }
}

impl std::fmt::Debug for LocalIo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIo")
            .field("engine", &self.engine)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// Marks LocalIo's submissions, to recognise their completions.
const LOCAL_TAG: u64 = 0x6c6f_6361_6c69_6f00;

/// Submit one entry and wait for its completion. `Err` (a negated errno)
/// means the ring itself failed and the entry's fate is unknown.
fn run_one(ring: &mut IoUring, entry: squeue::Entry) -> Result<i32, i32> {
    let entry = entry.user_data(LOCAL_TAG);
    // SAFETY: the buffers the entry points to (the request buffer and the
    // zero buffer owned by LocalIo) outlive this call, which waits for the
    // completion before returning; if waiting fails, LocalIo is marked
    // broken and never reuses the buffers for another request.
    if unsafe { ring.submission().push(&entry) }.is_err() {
        return Err(-libc::EBUSY);
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(-e.raw_os_error().unwrap_or(libc::EIO)),
        }
        if let Some(c) = ring.completion().next() {
            return if c.user_data() == LOCAL_TAG {
                Ok(c.result())
            } else {
                Err(-libc::EIO)
            };
        }
    }
}

/// Poll a future whose every await point is immediately ready.
fn block_on_ready<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}
