use crate::{Sector, Sectors};

/// Errors a layout reports. The backend maps every one of them to `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request reaches past the end of the disk (or overflows).
    #[error("range {at}+{len} is outside the disk ({capacity})")]
    OutOfRange {
        at: Sector,
        len: Sectors,
        capacity: Sectors,
    },
    /// A buffer whose length is not a whole number of sectors.
    #[error("buffer of {0} bytes is not a whole number of sectors")]
    Unaligned(usize),
    /// The layout was opened read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The backing file failed.
    #[error("{op} on {path} failed")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Metadata read from the store failed validation (bad magic, checksum, level, generation,
    /// or a pointer outside the version's extents).
    #[error("layout metadata is corrupt: {0}")]
    Corrupt(String),
    /// The store beneath the layout failed.
    #[error("the store failed")]
    Store(#[from] dovetail_store::StoreError),
    /// A request the layout cannot carry out as asked (not a guest I/O error).
    #[error("{0}")]
    InvalidArgument(String),
    /// No snapshot of that name (or it was deleted).
    #[error("no snapshot named {}", dovetail_store::names::shown(.0))]
    NoSuchSnapshot(String),
    /// The call panicked (a bug) and the panic was caught: the panic's message.
    #[error("panicked: {0}")]
    Panicked(String),
}

/// The message of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An error followed by each of its sources, `: `-separated, for one log line or message.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
