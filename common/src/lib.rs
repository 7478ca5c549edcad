//! Types shared by every ublk-mirror component: byte sizes and durations as
//! users write them, sets of block ranges, the wire protocol, and the one
//! error type of this crate.
//!
//! The replication wire protocol lives here ([`proto`]), so that the device
//! daemon and the mirror server agree by construction.

pub mod block;
#[cfg(feature = "link")]
pub mod client;
pub mod clock;
pub mod duration;
pub mod fsutil;
pub mod hex;
pub mod identity;
pub mod proto;
pub mod range;
pub mod size;
#[cfg(feature = "link")]
pub mod tls;
pub mod token;
#[cfg(feature = "link")]
pub mod wire;

pub use duration::Span;
pub use range::RangeSet;
pub use size::ByteSize;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A size written by a user could not be understood.
    #[error("invalid size {input:?}: {reason}")]
    InvalidSize {
        /// What the user wrote.
        input: String,
        /// Why it was refused, in words.
        reason: &'static str,
    },
    /// A key or certificate could not be made or used.
    #[error("{0}")]
    Identity(String),
    /// TLS or QUIC set-up failed.
    #[error("{0}")]
    Tls(String),
    /// The connection or a stream failed.
    #[error("{0}")]
    Link(String),
    /// The peer sent something the protocol does not allow.
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
    /// The peer refused the request.
    #[error("the server refused: {0}")]
    Refused(String),
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
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

impl Error {
    /// Wrap an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
