//! The one error type of the `mirror-server` library, with a small set of
//! kinds a caller can tell apart: a bad request ([`Error::Invalid`]), a
//! block to send again ([`Error::BadBlock`]), damaged files of ours
//! ([`Error::Corrupt`]), a failed system call ([`Error::Io`]) and a lost
//! or silent peer ([`Error::Link`]) and a failed or unreachable chunk store
//! ([`Error::Store`]). A peer that breaks the protocol ends
//! its connection in [`crate::serve`] and never becomes an `Error`.

/// What went wrong, with the context a user needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request that cannot be met as asked (nothing was changed).
    #[error("{0}")]
    Invalid(String),

    /// A block failed its checks (length, place, hash): it was not staged
    /// and must be sent again.
    #[error("block refused: {0}")]
    BadBlock(String),

    /// A file of ours that does not read as we wrote it.
    #[error("damaged volume data: {0}")]
    Corrupt(String),

    /// The connection or a stream to a peer failed, or the peer went
    /// quiet: nothing about the request or the volume was wrong.
    #[error("{0}")]
    Link(String),

    /// The chunk store (a directory or an S3-compatible bucket) failed or
    /// could not be reached: nothing was published; asking again later
    /// may work.
    #[error("chunk store: {0}")]
    Store(String),

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
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
