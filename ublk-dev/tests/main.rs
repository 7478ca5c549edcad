//! Integration tests of `ublk-dev`, in one binary to save link time:
//! the engine driven in-process against real backing files through a real
//! io_uring, and the `ublk-mirror` command line where it needs no kernel
//! driver.

mod attach;
mod cli;
mod control;
mod enroll;
mod local_io;
mod mirror;
mod precopy;
mod support;
