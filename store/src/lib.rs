//! The shared block store: a data file cut into fixed-size extents, each extent granted to one
//! version key, with the grant checked on every write (the isolation layer), plus a small
//! crash-safe metadata area holding the grants, the catalog and each version's root record.
//!
//! [`VersionSpace`] is the seam a layout sees; [`mem::MemSpace`] is an in-memory, crash-simulating
//! implementation for layout tests.

pub mod mem;
pub mod space;

pub use space::{ExtentId, Result, StoreError, VersionKey, VersionSpace};
