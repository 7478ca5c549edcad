//! The one error type of the `mirror-server` library.

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
