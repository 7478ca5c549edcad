//! The one error type of this crate, and its [`ErrorKind`]: what code
//! deciding between retrying and stopping looks at.

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
    /// The peer sent frames that are not the protocol.
    #[error(transparent)]
    Proto(#[from] crate::proto::ProtoError),
    /// The peer sent a valid frame where the protocol allows another, or
    /// contents that cannot be right.
    #[error("the peer broke the protocol: {0}")]
    Peer(String),
    /// The peer refused the request.
    #[error("the server refused: {0}")]
    Refused(String),
    /// The server is too old for the request (it was not asked).
    #[error("{0}")]
    TooOld(String),
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
    /// A time written by a user (`--at`) could not be understood.
    #[error("invalid time {input:?}: {reason} (try `yesterday 18:00`, `2h ago`, `2026-12-02 18:00` or a snapshot's name)")]
    InvalidTime {
        /// What the user wrote.
        input: String,
        /// Why it was refused.
        reason: String,
    },
}

/// What kind of failure an [`Error`] is: what code deciding between
/// retrying and stopping (and the exit code) looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input from a user (a size, a duration).
    Invalid,
    /// Something on this machine: a file, a key, TLS set-up.
    Local,
    /// The connection or a stream failed: worth trying again.
    Link,
    /// The peer broke the protocol.
    Peer,
    /// The peer refused the request, saying why.
    Refused,
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidSize { .. }
            | Error::InvalidDuration { .. }
            | Error::InvalidTime { .. } => ErrorKind::Invalid,
            Error::Identity(_) | Error::Tls(_) | Error::Io { .. } => ErrorKind::Local,
            Error::Link(_) => ErrorKind::Link,
            Error::Proto(_) | Error::Peer(_) => ErrorKind::Peer,
            Error::Refused(_) | Error::TooOld(_) => ErrorKind::Refused,
        }
    }

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
