//! The shared block store: a data file cut into fixed-size extents, each extent granted to one
//! version key, with the grant checked on every write (the isolation layer), plus a small
//! crash-safe metadata area holding the grants, the catalog and each version's root record.
//!
//! [`VersionSpace`] is the seam a layout sees. [`Store`] is the on-disk store (a directory
//! holding `store.meta` and `maps/`, and one data file per tier, `data.0` for a store created
//! without tiers; format in docs/format.md) and hands out
//! [`FileSpace`]s; it also keeps each disk's tee record ([`TeeRec`]);
//! [`check()`] verifies a store at rest.
//!
//! The test harnesses are compiled only with the `test-utils` feature (the crates'
//! dev-dependencies, bench/ and fuzz/ turn it on; production builds never do): `mem::MemSpace`,
//! an in-memory, crash-simulating space for layout tests; `sim::SimFile`, which lets a whole
//! [`Store`] run over simulated files that model what a power cut keeps; `logwrites`, which
//! records every write and sync and rebuilds any power-cut state; `faultfile`, which injects I/O
//! errors.

pub mod aio;
pub mod check;
pub mod direct;
pub mod failpoint;
// Also with `failpoints`: `serve --store-faults` (test builds of the daemon only).
#[cfg(any(test, feature = "test-utils", feature = "failpoints"))]
pub mod faultfile;
pub mod file;
pub mod format;
pub mod le;
#[cfg(any(test, feature = "test-utils"))]
pub mod logwrites;
#[cfg(any(test, feature = "test-utils"))]
pub mod mem;
pub mod names;
pub mod rados;
pub mod rng;
pub mod rules;
pub mod safefs;
pub mod shared;
#[cfg(any(test, feature = "test-utils"))]
pub mod sim;
pub mod space;
pub mod store;
pub mod thread_kind;

pub use aio::{AioDone, AioRead};
pub use check::{
    check, check_on, check_on_tiers, check_reader, check_with, LayoutCheck, Report,
    BESIDE_WRITER_PASSES,
};
pub use file::StoreFile;
pub use format::{AttachRec, MemberRec, MemberState, TeeRec, TeeState};
pub use space::{ExtentId, Result, SharedRef, StoreError, TierInfo, VersionKey, VersionSpace};
pub use store::{
    extent_count_for, format_uuid, human_size, DiskInfo, FileSpace, Freed, PoolStatus, Store,
    StoreInfo, TierSpec, TierStatus, VersionInfo, DATA_FILE, DEFAULT_EXTENT_SIZE, MAPS_DIR,
    META_FILE,
};
pub use store::{Lease, LEASE_RENEW, MIN_TAKEOVER_AFTER};
