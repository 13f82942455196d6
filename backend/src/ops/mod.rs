//! Operations, in the middle: opening a disk's versions as the catalog says, and the offline
//! disk operations (`disk import/export/snapshot`, `disk tee/untee`, offline migration and
//! promote, the maps check). They return their own [`OpsError`]; the faces and the daemon
//! call them, they call only the layers below (the request path's metrics, the crates).

pub mod bisect;
pub mod bisect_members;
pub mod diskio;
pub mod maps;
pub mod open;
pub mod teed;
pub mod voting;

use dovetail_store::StoreError;

/// Seed of a faulty candidate's rules (fixed, so a faulty run can be repeated, and a
/// bisection's replay injects the same faults).
pub(crate) const FAULT_SEED: u64 = 1;

/// The layouts a store's disk can be created, served and upgraded as.
pub const STORE_LAYOUTS: &[&str] = dovetail_layout::parallax::LAYOUTS;

/// Why an operation on a store's disk failed. The messages are the command line's: the faces
/// print them as they are, the daemon replies with them (`invalid` for [`OpsError::Invalid`],
/// `failed` for the rest).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("layout {0:?} cannot be served (known: parallax-v1, parallax-v2)")]
    UnknownLayout(String),
    #[error("cannot open disk {name}")]
    OpenDisk {
        name: String,
        #[source]
        source: dovetail_layout::Error,
    },
    #[error("cannot {op}")]
    File {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Serial(#[from] crate::disk::SerialTooLong),
    #[error("{0}")]
    Invalid(String),
}
