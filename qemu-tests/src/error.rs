//! The harness's error type.

use std::fmt;
use std::path::Path;

/// Why a VM test could not run or did not pass.
#[derive(thiserror::Error)]
pub enum Error {
    /// A file or process operation on the host failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A host command ran and failed.
    #[error("`{command}` failed ({status})\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    /// The machine lacks something the VM tests need.
    #[error("{0}")]
    Setup(String),
    /// The guest timed out, crashed or reported failures.
    #[error("guest `{guest}`: {reason}\n{context}")]
    Guest {
        guest: String,
        reason: String,
        context: String,
    },
    /// The daemon did not start, died, or exited badly.
    #[error("daemon for {image}: {reason}\n{context}")]
    Daemon {
        image: String,
        reason: String,
        context: String,
    },
    /// A host-side check on the outcome failed.
    #[error("{0}")]
    Check(String),
}

/// Result with the harness's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

// Test functions that return `Err` print it with `{:?}`: show the message and its causes, not the
// derived struct dump.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\n  caused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Adds a description to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
    fn at(self, verb: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }

    fn at(self, verb: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(format!("{verb} {}", path.display()), e))
    }
}
