//! Types shared by every ublk-mirror component: byte sizes and durations as
//! users write them, sets of block ranges, the block codec, the wire
//! protocol and its state machines, and the one error type of this crate.
//!
//! - [`proto`]: the wire protocol's messages and framing, so that the
//!   device daemon and the mirror server agree by construction.
//! - [`block`]: the block codec (block size, digest, encode,
//!   decode-and-verify), the same on every side.
//! - [`session`]: the protocol's decisions as sans-IO state machines.
//! - [`when`]: times as people write them (`--at yesterday 18:00`) and
//!   as they are shown, in the local time zone.
//! - With the `link` feature: `client` (the client's async drivers over
//!   QUIC), `wire` (frames over QUIC streams) and `tls`; without it
//!   this crate needs neither quinn nor tokio.

pub mod block;
#[cfg(feature = "link")]
pub mod client;
pub mod clock;
pub mod docs;
pub mod duration;
mod error;
pub mod exposition;
pub mod fsutil;
pub mod hex;
pub mod identity;
pub mod proto;
pub mod range;
pub mod session;
pub mod size;
#[cfg(feature = "link")]
pub mod tls;
pub mod token;
pub mod when;
#[cfg(feature = "link")]
pub mod wire;

pub use duration::Span;
pub use error::{Error, ErrorKind, Result};
pub use range::RangeSet;
pub use size::ByteSize;
