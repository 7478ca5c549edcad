//! Types shared by every ublk-mirror component: byte sizes and durations as
//! users write them, sets of block ranges, the wire protocol, and the one
//! error type of this crate.
//!
//! The replication wire protocol lives here ([`proto`]), so that the device
//! daemon and the mirror server agree by construction.

pub mod duration;
pub mod fsutil;
pub mod proto;
pub mod range;
pub mod size;

pub use duration::Span;
pub use range::RangeSet;
pub use size::ByteSize;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A size written by a user could not be understood.
    #[error("invalid size {input:?}: {reason}")]
    InvalidSize {
        /// What the user wrote.
        input: String,
        /// Why it was refused, in words.
        reason: &'static str,
    },
    /// A duration written by a user could not be understood.
    #[error("invalid duration {input:?}: {reason}")]
    InvalidDuration {
        /// What the user wrote.
        input: String,
        /// Why it was refused, in words.
        reason: &'static str,
    },
}
