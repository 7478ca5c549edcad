//! A wake-up that a request waits for without blocking its queue: an
//! eventfd that the queue polls on its own io_uring (`POLL_ADD`, see
//! `crate::ublk`), so the queue serves its other requests meanwhile, and
//! that whichever thread did the awaited work sets ([`Wake::signal`]): the
//! fetcher of [`crate::ondemand`] (blocks made local) and the preservers of
//! [`crate::tracking`] (chunks preserved before a write). Tools and tests
//! that run requests without a ring wait with `poll(2)`
//! ([`Wake::wait_blocking`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::engine::Errno;

const WAITING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

/// One wait: set once, to ready (prepare the request again) or failed
/// (fail it with `EIO`).
#[derive(Debug)]
pub struct Wake {
    fd: OwnedFd,
    outcome: AtomicU8,
}

impl Wake {
    /// A new, unset wake-up (one eventfd).
    pub fn new() -> Result<Wake, Errno> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Errno(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            ));
        }
        Ok(Wake {
            // SAFETY: a fresh fd nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            outcome: AtomicU8::new(WAITING),
        })
    }

    /// The eventfd to poll: readable once set.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether the wait failed (the request fails with `EIO`).
    pub fn failed(&self) -> bool {
        self.outcome.load(Ordering::SeqCst) == FAILED
    }

    /// Whether it was set (either way).
    pub fn is_set(&self) -> bool {
        self.outcome.load(Ordering::SeqCst) != WAITING
    }

    /// Set it: `ok` (go on) or not (fail the request).
    pub fn signal(&self, ok: bool) {
        self.outcome
            .store(if ok { READY } else { FAILED }, Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to our eventfd.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Block this thread until it is set (for callers with no ring to poll
    /// on); `Err(EIO)` if it failed.
    pub fn wait_blocking(&self) -> Result<(), Errno> {
        while !self.is_set() {
            let mut fds = [libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
        }
        if self.failed() {
            Err(Errno::IO)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_wait_ends_when_another_thread_signals_and_says_how() {
        let w = Arc::new(Wake::new().unwrap());
        assert!(!w.is_set());
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w2.signal(true);
        });
        assert_eq!(w.wait_blocking(), Ok(()));
        t.join().unwrap();
        let f = Wake::new().unwrap();
        f.signal(false);
        assert!(f.failed());
        assert_eq!(f.wait_blocking(), Err(Errno::IO));
    }
}
