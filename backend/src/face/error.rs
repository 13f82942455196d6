//! What the faces report when a command fails: [`CliError`], printed with its causes by `main`.

use std::path::PathBuf;

use dovetail_store::StoreError;

use crate::server;

/// Errors from the command line, before anything is served.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot open the disk image")]
    Image(#[source] dovetail_layout::Error),
    #[error(
        "image {path} is {actual} bytes but --size asks for {wanted}; resize it or drop --size"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error("--size cannot create an image when --read-only is given and {0} does not exist")]
    ReadOnlyCreate(PathBuf),
    #[error(transparent)]
    Serial(#[from] crate::disk::SerialTooLong),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("disk {0:?} is named twice")]
    DuplicateDisk(String),
    #[error("disk {name} stopped serving")]
    DiskFailed {
        name: String,
        #[source]
        source: server::ServeError,
    },
    #[error("a disk's serve thread panicked")]
    DiskPanicked,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store {dir} is not consistent: {count} violation(s) (listed above)")]
    Inconsistent { dir: PathBuf, count: usize },
    #[error("cannot {op}")]
    File {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    #[error(transparent)]
    Control(#[from] crate::daemon::control::ControlError),
    #[error("cannot serve metrics")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(
        "store {dir}: not everything could be checked while a daemon serves it (NOT CHECKED above)"
    )]
    NotFullyChecked { dir: PathBuf },
    #[error("{0}")]
    KeptChanging(String),
}
