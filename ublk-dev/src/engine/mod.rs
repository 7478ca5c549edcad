//! The I/O engine: what one block request means for the backing file.
//!
//! This module is sans-IO. A [`Request`] (decoded from the kernel's ublk I/O
//! descriptor by the glue in `crate::ublk`, or built by a test) is checked
//! against the device [`Geometry`] by [`Engine::start`], which returns an
//! [`Io`]: a small state machine that says which [`Step`] to run on the
//! backing file next and, fed each step's result, when the request is done
//! and with which result. Who runs the steps is not its business: the ublk
//! queues turn them into io_uring SQEs on the queue's own ring
//! ([`uring::sqe`]); tests and tools run them on a private ring
//! ([`uring::LocalIo`]); unit tests run them against a fake. The engine
//! uses nothing from the layers above it: change tracking, which must see
//! every request before it is issued, comes in as a [`ChangeTracking`].
//!
//! Semantics follow the kernel loop driver and ublksrv's loop target, not
//! libublk's example (whose FLUSH makes nothing durable):
//!
//! | request        | backing file                                               |
//! |----------------|------------------------------------------------------------|
//! | READ           | `read`; a short read at end of file is zero-filled          |
//! | WRITE          | `write`, with `RWF_DSYNC` when the request carries FUA      |
//! | FLUSH          | `fdatasync`                                                 |
//! | DISCARD        | punch a hole (offered only where the backing can); a range |
//! |                | the backing refuses is zeroed by hand, as the mirror is     |
//! | WRITE_ZEROES   | punch a hole, or zero the range in place with NOUNMAP;      |
//! |                | writes zeroes where the file system cannot do either        |
//!
//! Interrupted (`EINTR`) and `EAGAIN` steps are retried a bounded number of
//! times; partial reads and writes continue where they stopped.

pub mod uring;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in a kernel sector, the unit of ublk I/O descriptors.
pub const SECTOR_SIZE: u64 = 512;

/// Largest single I/O, in bytes: the size of each per-tag buffer and the
/// device's `max_sectors`. 512 KiB is the ublk default and what the kernel
/// loop driver splits into as well; larger buffers cost memory per tag
/// (depth × queues × this) without measurable gain.
pub const MAX_IO_BYTES: u32 = 512 * 1024;

/// Size of the zero buffer used to write zeroes where the file system cannot
/// punch holes or zero ranges. Write-zeroes requests are split into writes of
/// at most this size.
pub const ZERO_CHUNK: usize = 256 * 1024;

/// How often an `EAGAIN`/`EINTR` step is retried before the request fails
/// with `EIO`. Regular files on io_uring practically never return these;
/// the bound only keeps a misbehaving file system from spinning a queue.
const MAX_RETRIES: u32 = 8;

/// Kernel ublk operation codes (`include/uapi/linux/ublk_cmd.h`); the glue
/// checks at compile time that they match libublk's bindings.
pub mod abi {
    /// `UBLK_IO_OP_READ`
    pub const OP_READ: u32 = 0;
    /// `UBLK_IO_OP_WRITE`
    pub const OP_WRITE: u32 = 1;
    /// `UBLK_IO_OP_FLUSH`
    pub const OP_FLUSH: u32 = 2;
    /// `UBLK_IO_OP_DISCARD`
    pub const OP_DISCARD: u32 = 3;
    /// `UBLK_IO_OP_WRITE_ZEROES`
    pub const OP_WRITE_ZEROES: u32 = 5;
    /// `UBLK_IO_F_FUA`: write through to stable storage before completing.
    pub const F_FUA: u32 = 1 << 13;
    /// `UBLK_IO_F_NOUNMAP`: write-zeroes must keep the range allocated.
    pub const F_NOUNMAP: u32 = 1 << 15;
}

/// A negated-errno result as ublk and io_uring use them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// `EINVAL`: the request is malformed.
    pub const INVAL: Errno = Errno(libc::EINVAL);
    /// `EIO`: the backing file failed.
    pub const IO: Errno = Errno(libc::EIO);
    /// `EOPNOTSUPP`: the operation is not supported.
    pub const NOTSUPP: Errno = Errno(libc::EOPNOTSUPP);

    /// The value to hand back to the kernel (negative).
    pub fn negated(self) -> i32 {
        -self.0
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read blocks into the request buffer.
    Read,
    /// Write blocks from the request buffer.
    Write,
    /// Make every completed write durable.
    Flush,
    /// The range is no longer needed.
    Discard,
    /// The range must read back as zeroes.
    WriteZeroes,
}

/// One block request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes (0 for FLUSH).
    pub len: u64,
    /// Forced unit access: durable before completion.
    pub fua: bool,
    /// For WRITE_ZEROES: keep the range allocated.
    pub no_unmap: bool,
}

impl Request {
    /// Decode the fields of a kernel `ublksrv_io_desc`.
    pub fn decode(op_flags: u32, start_sector: u64, nr_sectors: u32) -> Result<Request, Errno> {
        let op = match op_flags & 0xff {
            abi::OP_READ => Op::Read,
            abi::OP_WRITE => Op::Write,
            abi::OP_FLUSH => Op::Flush,
            abi::OP_DISCARD => Op::Discard,
            abi::OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => return Err(Errno::NOTSUPP),
        };
        if op == Op::Flush {
            // A flush carries no range; its sector field is not meaningful
            // (the block layer leaves it at whatever the request had).
            return Ok(Request::flush());
        }
        let offset = start_sector.checked_mul(SECTOR_SIZE).ok_or(Errno::INVAL)?;
        Ok(Request {
            op,
            offset,
            len: u64::from(nr_sectors) * SECTOR_SIZE,
            fua: op_flags & abi::F_FUA != 0,
            no_unmap: op_flags & abi::F_NOUNMAP != 0,
        })
    }

    /// A read of `len` bytes at `offset`.
    pub fn read(offset: u64, len: u64) -> Request {
        Request::new(Op::Read, offset, len)
    }

    /// A write of `len` bytes at `offset`.
    pub fn write(offset: u64, len: u64) -> Request {
        Request::new(Op::Write, offset, len)
    }

    /// A flush.
    pub fn flush() -> Request {
        Request::new(Op::Flush, 0, 0)
    }

    /// A request of any kind, without FUA or NOUNMAP.
    pub fn new(op: Op, offset: u64, len: u64) -> Request {
        Request {
            op,
            offset,
            len,
            fua: false,
            no_unmap: false,
        }
    }
}

/// What records the device's changes (the tracker, a layer above the
/// engine): whoever runs requests ([`uring::LocalIo`], the ublk queues)
/// shows it every request before issuing it, and hands back the ticket of a
/// write-class one once that completed.
pub trait ChangeTracking {
    /// `req` is about to be issued. `Err`: fail the request with this errno
    /// instead (nothing is issued). A ticket: the request must be reported
    /// to [`ChangeTracking::after_write`] once it completed.
    fn before_write(&self, req: &Request) -> Result<Option<Ticket>, Errno>;

    /// The request `ticket` was given for completed (successfully or not).
    fn after_write(&self, ticket: Ticket);
}

/// A shared tracker tracks as the tracker does.
impl<T: ChangeTracking + ?Sized> ChangeTracking for std::sync::Arc<T> {
    fn before_write(&self, req: &Request) -> Result<Option<Ticket>, Errno> {
        (**self).before_write(req)
    }

    fn after_write(&self, ticket: Ticket) {
        (**self).after_write(ticket);
    }
}

/// A write-class request in flight, as [`ChangeTracking::before_write`]
/// numbered it: give it back to [`ChangeTracking::after_write`] when it
/// completed.
#[derive(Debug)]
#[must_use = "a ticket must be returned to after_write"]
pub struct Ticket(pub(crate) u64);

/// Shape of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Device size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Largest READ/WRITE, the size of the request buffer.
    pub max_io: u32,
    /// The backing punches holes, so DISCARD is offered to the kernel
    /// ([`crate::backing::Backing::punches_holes`]).
    pub discard: bool,
}

/// How to change allocation with `fallocate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate, reads return zeroes.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`: zeroes, stays allocated.
    ZeroRange,
}

impl Alloc {
    /// The `fallocate` mode bits.
    pub fn mode(self) -> i32 {
        match self {
            Alloc::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Alloc::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// One operation on the backing file (or the request buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read `len` bytes at file `offset` into the request buffer at `buf_offset`.
    Read {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Where in the request buffer.
        buf_offset: u32,
    },
    /// Write `len` bytes from the request buffer at `buf_offset` to file `offset`.
    Write {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Where in the request buffer.
        buf_offset: u32,
        /// Durable before completion (`RWF_DSYNC`).
        dsync: bool,
    },
    /// Write `len` (≤ [`ZERO_CHUNK`]) zero bytes at file `offset` from the zero buffer.
    WriteZeroBuf {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Durable before completion (`RWF_DSYNC`).
        dsync: bool,
    },
    /// Fill the request buffer with zeroes (no file access).
    FillZeroes {
        /// Where in the request buffer.
        buf_offset: u32,
        /// Bytes.
        len: u32,
    },
    /// `fallocate` on the file.
    Fallocate {
        /// What to do.
        alloc: Alloc,
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `fdatasync` the file.
    DataSync,
}

/// Counters of what the engine did, shared by all queues.
#[derive(Debug, Default)]
pub struct Stats {
    /// READ requests completed.
    pub reads: AtomicU64,
    /// WRITE requests completed.
    pub writes: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// FLUSH requests completed.
    pub flushes: AtomicU64,
    /// DISCARD and WRITE_ZEROES requests completed.
    pub discards: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Discards the backing refused (zeroed by hand instead).
    pub discards_unsupported: AtomicU64,
}

impl Stats {
    /// Requests of every kind completed (failed ones included).
    pub fn requests(&self) -> u64 {
        [
            &self.reads,
            &self.writes,
            &self.flushes,
            &self.discards,
            &self.errors,
        ]
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
    }
}

/// The engine of one device: validates requests and plans their steps.
#[derive(Debug)]
pub struct Engine {
    geometry: Geometry,
    stats: Stats,
}

impl Engine {
    /// An engine for a device of this shape.
    pub fn new(geometry: Geometry) -> Engine {
        Engine {
            geometry,
            stats: Stats::default(),
        }
    }

    /// The device shape.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// What the engine has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Check a request and return the state machine that carries it out.
    pub fn start(&self, req: Request) -> Result<Io<'_>, Errno> {
        let g = self.geometry;
        let bs = u64::from(g.block_size);
        let in_range = req
            .offset
            .checked_add(req.len)
            .is_some_and(|end| end <= g.size);
        let aligned = req.offset % bs == 0 && req.len % bs == 0;
        let phase = match req.op {
            Op::Flush => Phase::Sync,
            _ if !in_range || !aligned => return Err(self.fail(Errno::INVAL)),
            Op::Read | Op::Write if req.len == 0 || req.len > u64::from(g.max_io) => {
                return Err(self.fail(Errno::INVAL))
            }
            Op::Read | Op::Write => Phase::Transfer { done: 0 },
            Op::Discard | Op::WriteZeroes if req.len == 0 => Phase::Done,
            Op::Discard => Phase::Allocate(Alloc::PunchHole),
            Op::WriteZeroes if req.no_unmap => Phase::Allocate(Alloc::ZeroRange),
            Op::WriteZeroes => Phase::Allocate(Alloc::PunchHole),
        };
        Ok(Io {
            engine: self,
            req,
            phase,
            retries: 0,
        })
    }

    fn fail(&self, e: Errno) -> Errno {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        e
    }

    fn finish(&self, req: &Request) -> i32 {
        let s = &self.stats;
        match req.op {
            Op::Read => {
                s.reads.fetch_add(1, Ordering::Relaxed);
                s.bytes_read.fetch_add(req.len, Ordering::Relaxed);
            }
            Op::Write => {
                s.writes.fetch_add(1, Ordering::Relaxed);
                s.bytes_written.fetch_add(req.len, Ordering::Relaxed);
            }
            Op::Flush => {
                s.flushes.fetch_add(1, Ordering::Relaxed);
            }
            Op::Discard | Op::WriteZeroes => {
                s.discards.fetch_add(1, Ordering::Relaxed);
            }
        }
        match req.op {
            // ublk completes READ/WRITE by the byte count; the rest by 0.
            Op::Read | Op::Write => req.len as i32,
            _ => 0,
        }
    }
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading or writing; `done` bytes are through.
    Transfer { done: u64 },
    /// Past end of file: zero the rest of the read buffer from `done`.
    ZeroFill { done: u64 },
    /// One `fallocate` covering the request.
    Allocate(Alloc),
    /// Writing zeroes by hand; `done` bytes are through.
    ZeroWrite { done: u64 },
    /// `fdatasync` (FLUSH, or FUA after a DISCARD/WRITE_ZEROES).
    Sync,
    /// Nothing left to do.
    Done,
}

/// One request being carried out. Ask [`Io::step`] what to run, run it,
/// hand its result to [`Io::advance`]; repeat until `advance` returns the
/// request's result.
#[derive(Debug)]
pub struct Io<'e> {
    engine: &'e Engine,
    req: Request,
    phase: Phase,
    retries: u32,
}

impl Io<'_> {
    /// The request.
    pub fn request(&self) -> &Request {
        &self.req
    }

    /// The step to run now, or `None` when the request is already complete
    /// (an empty discard): then call [`Io::advance`] with 0.
    pub fn step(&self) -> Option<Step> {
        let req = &self.req;
        // Casts to u32 below are bounded by MAX_IO/ZERO_CHUNK: transfers are
        // checked against `max_io` (a u32) in `Engine::start`.
        Some(match self.phase {
            Phase::Transfer { done } => {
                let offset = req.offset + done;
                let len = (req.len - done) as u32;
                let buf_offset = done as u32;
                match req.op {
                    Op::Read => Step::Read {
                        offset,
                        len,
                        buf_offset,
                    },
                    _ => Step::Write {
                        offset,
                        len,
                        buf_offset,
                        dsync: req.fua,
                    },
                }
            }
            Phase::ZeroFill { done } => Step::FillZeroes {
                buf_offset: done as u32,
                len: (req.len - done) as u32,
            },
            Phase::Allocate(alloc) => Step::Fallocate {
                alloc,
                offset: req.offset,
                len: req.len,
            },
            Phase::ZeroWrite { done } => Step::WriteZeroBuf {
                offset: req.offset + done,
                len: (req.len - done).min(ZERO_CHUNK as u64) as u32,
                dsync: req.fua,
            },
            Phase::Sync => Step::DataSync,
            Phase::Done => return None,
        })
    }

    /// Feed the result of the last step (bytes, or a negated errno).
    /// Returns the request's result once it is complete.
    pub fn advance(&mut self, res: i32) -> Option<i32> {
        let engine = self.engine;
        if res == -libc::EAGAIN || res == -libc::EINTR {
            self.retries += 1;
            if self.retries > MAX_RETRIES {
                return Some(engine.fail(Errno::IO).negated());
            }
            return None;
        }
        self.retries = 0;
        let req = self.req;
        let next = match (self.phase, res) {
            (Phase::Done, _) => Phase::Done,
            // EINVAL: a block device under us refuses ranges that are not
            // multiples of its logical block size (a 4Kn disk under a
            // device of 512-byte blocks). Both mean: not this way.
            (Phase::Allocate(_), e) if e == -libc::EOPNOTSUPP || e == -libc::EINVAL => {
                // DISCARD is offered only where the backing punches holes,
                // so this is a range it refused. A discard is recorded as
                // zeroes for the mirror: data kept here would leave the
                // device and its mirror different, so the range is zeroed
                // by hand, as for WRITE_ZEROES.
                if req.op == Op::Discard {
                    engine
                        .stats
                        .discards_unsupported
                        .fetch_add(1, Ordering::Relaxed);
                }
                Phase::ZeroWrite { done: 0 }
            }
            (_, e) if e < 0 => return Some(engine.fail(Errno(-e)).negated()),
            (Phase::Transfer { done }, n) => {
                let done = done + n as u64;
                if done >= req.len {
                    Phase::Done
                } else if n == 0 && req.op == Op::Read {
                    // End of file: the backing file is shorter than the
                    // device (truncated under us); read zeroes like loop.
                    Phase::ZeroFill { done }
                } else if n == 0 {
                    return Some(engine.fail(Errno::IO).negated());
                } else {
                    Phase::Transfer { done }
                }
            }
            (Phase::ZeroFill { done }, n) => {
                // With zero copy the fill is a read of /dev/zero, which
                // may come back short (a signal, a reschedule): the rest
                // is filled by another, never taken as filled.
                let done = done + n as u64;
                if done >= req.len {
                    Phase::Done
                } else if n == 0 {
                    return Some(engine.fail(Errno::IO).negated());
                } else {
                    Phase::ZeroFill { done }
                }
            }
            (Phase::ZeroWrite { done }, n) => {
                let done = done + n as u64;
                if n == 0 {
                    return Some(engine.fail(Errno::IO).negated());
                } else if done >= req.len {
                    Phase::Done
                } else {
                    Phase::ZeroWrite { done }
                }
            }
            (Phase::Allocate(_), _) => self.after_allocation(),
            (Phase::Sync, _) => Phase::Done,
        };
        self.phase = next;
        (next == Phase::Done).then(|| engine.finish(&req))
    }

    fn after_allocation(&self) -> Phase {
        // fallocate changes metadata only; FUA asks for it to be durable.
        if self.req.fua {
            Phase::Sync
        } else {
            Phase::Done
        }
    }
}

/// Where a request's data lives while [`drive`] carries it out.
#[derive(Debug)]
pub enum RequestBuf<'a> {
    /// In this process's memory (the kernel copies it in and out).
    Memory(&'a mut [u8]),
    /// In the kernel's request pages, registered in the ring's buffer table
    /// (ublk zero copy, `UBLK_F_AUTO_BUF_REG`): this process cannot touch
    /// the bytes, so every step, [`Step::FillZeroes`] too, is submitted.
    Registered,
}

/// Carry out one request: run each step with `submit` (or, for
/// [`Step::FillZeroes`] on a buffer in memory, on `buf` directly) until the
/// request completes. Returns the result to hand back to the kernel: bytes
/// for READ/WRITE, 0 for the rest, or a negated errno.
///
/// `submit` receives the step and the address of the buffer in memory
/// (`None` for [`RequestBuf::Registered`]), which stays valid and untouched
/// by anything else until its future completes.
pub async fn drive<F, Fut>(mut io: Io<'_>, mut buf: RequestBuf<'_>, mut submit: F) -> i32
where
    F: FnMut(Step, Option<*mut u8>) -> Fut,
    Fut: std::future::Future<Output = i32>,
{
    loop {
        let res = match (io.step(), &mut buf) {
            (None, _) => 0,
            (Some(Step::FillZeroes { buf_offset, len }), RequestBuf::Memory(mem)) => {
                let start = buf_offset as usize;
                match mem.get_mut(start..start + len as usize) {
                    Some(range) => {
                        range.fill(0);
                        len as i32
                    }
                    None => -libc::EINVAL,
                }
            }
            (Some(step), RequestBuf::Memory(mem)) => submit(step, Some(mem.as_mut_ptr())).await,
            (Some(step), RequestBuf::Registered) => submit(step, None).await,
        };
        if let Some(done) = io.advance(res) {
            return done;
        }
    }
}

/// A heap buffer aligned for `O_DIRECT` (4096 bytes), zero-initialised.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

/// Alignment of [`AlignedBuf`]: a page, enough for any `O_DIRECT` file.
const BUF_ALIGN: usize = 4096;

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` > 0).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (max(len, 1)) and a valid
        // power-of-two alignment.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        // A failure here means `len` is within BUF_ALIGN of isize::MAX, which
        // no caller can allocate anyway.
        std::alloc::Layout::from_size_align(len.max(1), BUF_ALIGN)
            .unwrap_or_else(|_| panic!("buffer of {len} bytes is too large"))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to `len` initialised bytes owned exclusively by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: AlignedBuf owns its allocation like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through &self.
unsafe impl Sync for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn engine() -> Engine {
        Engine::new(Geometry {
            size: 4 * MIB,
            block_size: 512,
            max_io: MAX_IO_BYTES,
            discard: true,
        })
    }

    /// Run a request against a scripted executor; returns the steps seen and the result.
    fn run(
        engine: &Engine,
        req: Request,
        mut answer: impl FnMut(&Step) -> i32,
    ) -> (Vec<Step>, i32) {
        let mut io = match engine.start(req) {
            Ok(io) => io,
            Err(e) => return (vec![], e.negated()),
        };
        let mut steps = vec![];
        loop {
            let step = io.step();
            let res = step.as_ref().map_or(0, &mut answer);
            steps.extend(step);
            if let Some(r) = io.advance(res) {
                return (steps, r);
            }
        }
    }

    fn full(step: &Step) -> i32 {
        match *step {
            Step::Read { len, .. } | Step::Write { len, .. } | Step::WriteZeroBuf { len, .. } => {
                len as i32
            }
            Step::FillZeroes { len, .. } => len as i32,
            Step::Fallocate { .. } | Step::DataSync => 0,
        }
    }

    #[test]
    fn decodes_kernel_descriptors() {
        let r = Request::decode(abi::OP_WRITE | abi::F_FUA, 8, 16).unwrap();
        assert_eq!(
            r,
            Request {
                op: Op::Write,
                offset: 4096,
                len: 8192,
                fua: true,
                no_unmap: false
            }
        );
        let z = Request::decode(abi::OP_WRITE_ZEROES | abi::F_NOUNMAP, 0, 8).unwrap();
        assert!(z.no_unmap && !z.fua);
        assert_eq!(
            Request::decode(4 /* WRITE_SAME */, 0, 8),
            Err(Errno::NOTSUPP)
        );
        assert_eq!(
            Request::decode(abi::OP_READ, u64::MAX / 2, 8),
            Err(Errno::INVAL)
        );
    }

    #[test]
    fn write_with_fua_is_a_dsync_write() {
        let e = engine();
        let req = Request {
            fua: true,
            ..Request::write(4096, 8192)
        };
        let (steps, res) = run(&e, req, full);
        assert_eq!(
            steps,
            vec![Step::Write {
                offset: 4096,
                len: 8192,
                buf_offset: 0,
                dsync: true
            }]
        );
        assert_eq!(res, 8192);
    }

    #[test]
    fn flush_is_fdatasync() {
        let (steps, res) = run(&engine(), Request::flush(), full);
        assert_eq!(steps, vec![Step::DataSync]);
        assert_eq!(res, 0);
    }

    #[test]
    fn partial_transfers_continue_where_they_stopped() {
        let mut first = true;
        let (steps, res) = run(&engine(), Request::write(0, 16384), |s| {
            if std::mem::take(&mut first) {
                4096
            } else {
                full(s)
            }
        });
        assert_eq!(res, 16384);
        assert_eq!(
            steps[1],
            Step::Write {
                offset: 4096,
                len: 12288,
                buf_offset: 4096,
                dsync: false
            }
        );
    }

    #[test]
    fn short_read_at_end_of_file_is_zero_filled() {
        let mut calls = 0;
        let (steps, res) = run(&engine(), Request::read(0, 8192), |s| {
            calls += 1;
            match (calls, s) {
                (1, _) => 4096,
                (2, Step::Read { .. }) => 0,
                _ => full(s),
            }
        });
        assert_eq!(res, 8192);
        assert_eq!(
            steps.last(),
            Some(&Step::FillZeroes {
                buf_offset: 4096,
                len: 4096
            })
        );
    }

    /// A zero fill that comes back short (zero copy: a read of /dev/zero,
    /// cut short by a signal) fills the rest with another; one that fills
    /// nothing fails the read, never completes it with stale bytes.
    #[test]
    fn a_short_zero_fill_fills_the_rest() {
        let mut calls = 0;
        let (steps, res) = run(&engine(), Request::read(0, 16384), |s| {
            calls += 1;
            match (calls, s) {
                (1, _) => 0,
                (2, Step::FillZeroes { .. }) => 4096,
                _ => full(s),
            }
        });
        assert_eq!(res, 16384);
        assert_eq!(
            steps.last(),
            Some(&Step::FillZeroes {
                buf_offset: 4096,
                len: 12288
            })
        );
        let mut calls = 0;
        let (_, res) = run(&engine(), Request::read(0, 8192), |_| {
            calls += 1;
            0
        });
        assert_eq!(res, -libc::EIO);
        assert_eq!(calls, 2, "a fill of nothing is not retried");
    }

    #[test]
    fn a_write_that_makes_no_progress_fails() {
        let (_, res) = run(&engine(), Request::write(0, 4096), |_| 0);
        assert_eq!(res, -libc::EIO);
    }

    #[test]
    fn eagain_is_retried_then_gives_up() {
        let mut n = 0;
        let (_, res) = run(&engine(), Request::read(0, 4096), |s| {
            n += 1;
            if n < 3 {
                -libc::EAGAIN
            } else {
                full(s)
            }
        });
        assert_eq!(res, 4096);
        let (_, res) = run(&engine(), Request::read(0, 4096), |_| -libc::EINTR);
        assert_eq!(res, -libc::EIO);
    }

    #[test]
    fn errors_are_passed_up_and_counted() {
        let e = engine();
        let (_, res) = run(&e, Request::write(0, 4096), |_| -libc::ENOSPC);
        assert_eq!(res, -libc::ENOSPC);
        assert_eq!(e.stats().errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn discard_punches_a_hole() {
        let (steps, res) = run(&engine(), Request::new(Op::Discard, 8192, 65536), full);
        assert_eq!(
            steps,
            vec![Step::Fallocate {
                alloc: Alloc::PunchHole,
                offset: 8192,
                len: 65536
            }]
        );
        assert_eq!(res, 0);
    }

    #[test]
    fn a_discard_the_backing_refuses_zeroes_the_range_and_is_counted() {
        // The mirror records a discard as zeroes: the device must read them.
        let e = engine();
        let (steps, res) = run(&e, Request::new(Op::Discard, 0, 4096), |s| match s {
            Step::Fallocate { .. } => -libc::EOPNOTSUPP,
            s => full(s),
        });
        assert_eq!(res, 0);
        assert_eq!(e.stats().discards_unsupported.load(Ordering::Relaxed), 1);
        assert!(matches!(
            steps[1],
            Step::WriteZeroBuf {
                offset: 0,
                len: 4096,
                ..
            }
        ));
        // A block device that refuses the range (a 4Kn disk under 512-byte
        // blocks): the same, for discards and write-zeroes.
        for op in [Op::Discard, Op::WriteZeroes] {
            let (steps, res) = run(&e, Request::new(op, 512, 512), |s| match s {
                Step::Fallocate { .. } => -libc::EINVAL,
                s => full(s),
            });
            assert_eq!(res, 0);
            assert!(matches!(
                steps[1],
                Step::WriteZeroBuf {
                    offset: 512,
                    len: 512,
                    ..
                }
            ));
        }
        assert_eq!(e.stats().discards_unsupported.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn write_zeroes_punches_or_zeroes_in_place() {
        let req = Request::new(Op::WriteZeroes, 0, 4096);
        let (steps, _) = run(&engine(), req, full);
        assert!(matches!(
            steps[0],
            Step::Fallocate {
                alloc: Alloc::PunchHole,
                ..
            }
        ));
        let (steps, _) = run(
            &engine(),
            Request {
                no_unmap: true,
                ..req
            },
            full,
        );
        assert!(matches!(
            steps[0],
            Step::Fallocate {
                alloc: Alloc::ZeroRange,
                ..
            }
        ));
    }

    #[test]
    fn write_zeroes_falls_back_to_writing_zeroes() {
        let len = 3 * ZERO_CHUNK as u64 / 2;
        let req = Request {
            fua: true,
            ..Request::new(Op::WriteZeroes, 4096, len)
        };
        let (steps, res) = run(&engine(), req, |s| match s {
            Step::Fallocate { .. } => -libc::EOPNOTSUPP,
            s => full(s),
        });
        assert_eq!(res, 0);
        assert_eq!(
            &steps[1..],
            &[
                Step::WriteZeroBuf {
                    offset: 4096,
                    len: ZERO_CHUNK as u32,
                    dsync: true
                },
                Step::WriteZeroBuf {
                    offset: 4096 + ZERO_CHUNK as u64,
                    len: ZERO_CHUNK as u32 / 2,
                    dsync: true
                }
            ]
        );
    }

    #[test]
    fn fua_discard_syncs_after_the_hole() {
        let req = Request {
            fua: true,
            ..Request::new(Op::Discard, 0, 4096)
        };
        let (steps, _) = run(&engine(), req, full);
        assert_eq!(steps.last(), Some(&Step::DataSync));
    }

    #[test]
    fn bad_requests_are_refused() {
        let e = engine();
        let cases = [
            Request::read(100, 512),                         // unaligned offset
            Request::read(0, 100),                           // unaligned length
            Request::read(4 * MIB - 512, 1024),              // past the end
            Request::write(u64::MAX - 511, 512),             // wraps
            Request::read(0, 0),                             // empty transfer
            Request::read(0, u64::from(MAX_IO_BYTES) + 512), // larger than the buffer
            Request::new(Op::Discard, 4 * MIB, 512),         // discard past the end
        ];
        for req in cases {
            assert_eq!(e.start(req).err(), Some(Errno::INVAL), "{req:?}");
        }
        assert_eq!(e.stats().errors.load(Ordering::Relaxed), cases.len() as u64);
    }

    #[test]
    fn empty_discard_completes_at_once() {
        let (steps, res) = run(&engine(), Request::new(Op::Discard, 0, 0), full);
        assert!(steps.is_empty());
        assert_eq!(res, 0);
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(10_000);
        assert_eq!(b.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 7;
        assert_eq!(b.as_slice()[9_999], 7);
    }
}
