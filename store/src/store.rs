//! The on-disk store: `DIR/store.meta` (header and two metadata slots, see [`crate::format`])
//! and one data file per tier holding the extents (`DIR/data.0` for a store created without
//! tiers). [`Store`] holds the catalog of disks and versions, grants extents, and hands each
//! version a [`FileSpace`], the [`VersionSpace`] over the real files.
//!
//! Tiers: tier `t` holds the extents `[first, first + count)` (the tiers cover the store's
//! extents in order) and extent `e` of it lies at byte `(e - first) · extent_size` of its data
//! file. Extent ids are global: grants, the catalog and the layouts never see a tier, except
//! through [`VersionSpace::grant_extent_on`], [`VersionSpace::extent_tier`] and
//! [`VersionSpace::tiers`].
//!
//! Format version 1 stores are read as they are by a read-only open and upgraded in place to
//! format version 2 by a read-write one (see `upgrade` and docs/format.md, "Upgrade from format
//! version 1"). Format version 2 stores are read and written as they are (one tier, `default`,
//! at `data.0`); stores are created in format version 3.
//!
//! Invariants kept here:
//! - The in-memory catalog (`MetaState::meta`) always equals the newest durable slot: a change
//!   is built on a copy, committed (written to the older slot and synced), and only then
//!   installed.
//! - The grant cache (`Store::grants`) never allows more than the durable grant table: a grant
//!   enters it after its commit, a freed extent leaves it right after the commit that frees it,
//!   before the catalog lock is released (so it cannot be granted again in between).
//! - A write checks the grant cache under its read lock and holds that lock while it runs, so
//!   once an extent has been taken from a version no write of that version is still in flight.
//!
//! This file holds the types and small helpers; the code lives in one file per concern:
//! `open` (creating and opening), `reader` (reader mode), `files` (the metadata file's header
//! and slots, the tier files), `upgrade` (the upgrades in place), `commit` (the metadata
//! commit), `grants` (grants, ungrant, release), `catalog` (disks, versions, tees), `roots`
//! (root records), `geometry` (tiers and extents), `sync` (syncs and their failure tracking)
//! and `file_space` ([`FileSpace`]).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use log::{debug, error, info, warn};

use crate::file::{lock, LockMode, StoreFile};
use crate::format::{
    attach_problems, check_disk_name, check_geometry, check_layout_name, check_tier_name,
    check_tiers, default_tier, encode_slot, one_line_reason, slot_crc, tee_problems, validate,
    AttachRec, DiskRec, Header, Meta, Slot, TeeRec, TeeState, TierHeader, TierRec, VersionRec,
    ATTACH_VERSION, DISK_ALIGN, EXTENT_ALIGN, HEADER_SIZE, MAX_ROOT, MAX_TIERS, SLOT_HEADER,
    TIER_HEADER_SIZE, TIER_HEADER_VERSION, UPGRADE_VERSION,
};
use crate::space::{ExtentId, Result, StoreError, TierInfo, VersionKey, VersionSpace};

mod catalog;
mod commit;
mod file_space;
mod files;
mod geometry;
mod grants;
mod members;
mod open;
mod owner;
mod pool;
mod rados_open;
mod reader;
mod roots;
mod sync;
mod upgrade;

use files::{free_in, initialize, same_path};
pub(crate) use files::{
    newest, not_a_regular_file, open_files, open_meta_unlocked, open_tier_in, read_header,
    read_slot, slot_name, tier_header_problem, tier_len_problem, tier_status, unproven_tier,
};
pub use open::TierWrap;
pub use owner::{
    disk_lock_name, lease_key, Lease, CHANGE_FILE, CHANGE_LEASE, CHANGE_LOCK, DISK_LOCK_PREFIX,
    LEASE_KEY_PREFIX, LEASE_LEN, LEASE_RENEW, MIN_TAKEOVER_AFTER, OWNERS_DIR,
};
use pool::PoolMem;
pub use pool::PoolStatus;
pub(crate) use upgrade::{upgrade, upgrade_tiers};

/// The metadata file in a store's directory.
pub const META_FILE: &str = "store.meta";
pub use crate::format::{format_uuid, DATA_FILE};
/// Where `create` builds the metadata file before renaming it into place.
const META_TMP: &str = "store.meta.tmp";
/// The directory in a store's directory holding the candidate versions' presence maps
/// (`maps/<key>.map`, see [`Store::map_path`]).
pub const MAPS_DIR: &str = "maps";
/// Bytes of the header rewritten by the upgrade: the first sector, which holds every field.
const HEADER_SECTOR: usize = 512;
/// Extent size when none is given.
pub const DEFAULT_EXTENT_SIZE: u64 = 64 << 20;

/// A disk of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    /// Bytes the guest sees.
    pub size: u64,
    /// The trusted version's layout.
    pub layout: String,
    /// The version serving the guest.
    pub trusted: VersionKey,
    /// The version being validated beside it, if any.
    pub candidate: Option<VersionKey>,
    /// The disk's tee (served through both versions), if any; only with a candidate.
    pub tee: Option<TeeRec>,
}

/// A version of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub key: VersionKey,
    pub disk: String,
    pub layout: String,
    /// Granted extents, in grant order.
    pub extents: Vec<ExtentId>,
    /// Bytes in its committed root record.
    pub root_len: usize,
}

/// A store's geometry and state at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// The format version of the store's files (its header's).
    pub format_version: u32,
    pub uuid: [u8; 16],
    pub extent_size: u64,
    pub extent_count: u32,
    pub free_extents: u32,
    /// Generation of the newest committed metadata.
    pub generation: u64,
    /// The tiers, in extent order (one, `default`, for a store created without tiers).
    pub tiers: Vec<TierStatus>,
}

/// One tier of a store, as [`Store::info`] and `check` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStatus {
    pub name: String,
    /// The tier's data file: the recorded path, resolved against the store's directory when
    /// it is relative (a store over given files shows it as recorded).
    pub path: PathBuf,
    /// The tier's first extent; it holds `[first_extent, first_extent + extents)`.
    pub first_extent: u32,
    pub extents: u32,
    /// Extents of the tier not granted to any version.
    pub free: u32,
}

/// One tier of a store to create: `name` (`[a-z0-9_-]`, 1 to 16 bytes, unique), its data file
/// `path` (created; must not exist), and `size` in bytes (a positive whole number of extents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSpec {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

/// `bytes` in the largest binary unit that divides it exactly (`64 MiB`, `10 GiB`), else in
/// bytes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[derive(Debug)]
struct MetaState {
    meta: Meta,
    generation: u64,
    /// The slot (0 = A, 1 = B) holding `generation`.
    newest: usize,
    /// On a shared open, while a change is under way: whether the store's change lock was
    /// taken and the catalog read again (`owner`), or why not.
    change: Option<std::result::Result<(), String>>,
}

/// One tier of an open store: its extents and its data file.
struct Tier {
    name: String,
    /// Where the data file is (the header's path, resolved against the store's directory when
    /// relative).
    path: PathBuf,
    /// The tier's first extent.
    first: u32,
    extents: u32,
    file: Box<dyn StoreFile>,
    /// Serialises every sync of `file` (by any version, or by a grant), so that a failed one
    /// is seen before any later one can claim success: see [`TierSync::lost`].
    sync_lock: Mutex<()>,
    /// Syncs of `file` started so far (each numbered, from 1, under `sync_lock`), and the
    /// number of the last one that succeeded: a version waiting for the lock whose writes a
    /// sync started after they completed has made durable needs no sync of its own.
    syncs_started: AtomicU64,
    last_good_sync: AtomicU64,
}

impl Tier {
    fn range(&self) -> Range<u32> {
        self.first..self.first + self.extents
    }
}

/// What every space of one version shares: its refused-write counter and, per tier, what it
/// has written and made durable (so that `sync` only syncs the tier files it wrote to).
#[derive(Debug)]
struct Shared {
    violations: AtomicU64,
    tiers: Vec<TierSync>,
}

/// A version's writes to one tier's data file, against its syncs.
#[derive(Debug, Default)]
struct TierSync {
    /// Writes issued (counted before the write starts).
    started: AtomicU64,
    /// Writes completed (counted after the write returns).
    written: AtomicU64,
    /// `written` as it was just before the start of the last `fdatasync` that succeeded: every
    /// write counted up to it is durable.
    synced: AtomicU64,
    /// A sync of the tier's data file failed while this version had writes there that no
    /// successful sync covered. Those writes may be gone for good: after a failed `fsync`,
    /// Linux may drop (or mark clean) the dirty pages, and reports the error once, so the next
    /// `fsync` succeeds without having written them. No later sync of this version can make
    /// them durable, so every later sync fails, until the store is reopened (the version then
    /// starts again from its last commit, whose writes were all synced).
    lost: AtomicBool,
}

/// A store: the catalog, the grants, and the tiers' data files. Share it as `Arc<Store>`.
pub struct Store {
    location: PathBuf,
    /// The store's directory; `None` for a store over given files (`create_on`, `open_on`).
    dir: Option<PathBuf>,
    header: Header,
    meta_file: Box<dyn StoreFile>,
    /// The tiers, in extent order (at least one).
    tiers: Vec<Tier>,
    read_only: bool,
    /// Opened read-only without a lock while a writer holds the store ([`Store::open_reader`]).
    beside_writer: bool,
    state: Mutex<MetaState>,
    /// The grant cache: `grants[e]` is the key extent `e` is granted to (0 = free).
    grants: RwLock<Vec<u64>>,
    /// Per version key, what its spaces share.
    shared: Mutex<HashMap<u64, Arc<Shared>>>,
    /// Extents being zeroed for a grant (outside `state`'s lock): no other grant takes them.
    granting: Mutex<Vec<u32>>,
    /// The tier files' data goes through direct I/O ([`Store::open_direct`]).
    direct_io: AtomicBool,
    /// Told of each version a failed sync may have lost writes of ([`Store::watch_lost`]).
    lost_watchers: Mutex<Vec<LostWatcher>>,
    /// A store on RADOS: its metadata object, which commits go to (`meta_file` is unused).
    rados: Option<rados_open::RadosMeta>,
    /// The shared pool's in-memory state (`pool`); taken after `state` when both are.
    pool: Mutex<PoolMem>,
    /// Set on a shared open ([`Store::open_shared`]): the disks this handle owns (`owner`).
    multi: std::sync::OnceLock<owner::Multi>,
}

/// What [`Store::watch_lost`] calls with a version a failed sync may have lost writes of. It
/// runs on the thread whose sync failed, with the tier file's sync lock held: it must not wait
/// for the store or any layout (hand the work to another thread).
pub type LostWatcher = Box<dyn Fn(VersionKey) + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location)
            .field("header", &self.header)
            .field(
                "tiers",
                &self
                    .tiers
                    .iter()
                    .map(|t| (&t.name, &t.path))
                    .collect::<Vec<_>>(),
            )
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let op = op.into();
    move |source| StoreError::Io { op, source }
}

/// Checks a store's size and extent size and returns the number of extents.
pub fn extent_count_for(size: u64, extent_size: u64) -> Result<u32> {
    let count = extents_in(None, size, extent_size)?;
    check_geometry(extent_size, count)?;
    Ok(count)
}

/// The extents in `size` bytes of the store (`tier` `None`) or of one tier: a positive whole
/// number of extents of a valid size, or an error saying what is wrong.
fn extents_in(tier: Option<&str>, size: u64, extent_size: u64) -> Result<u32> {
    if extent_size == 0 || extent_size % EXTENT_ALIGN != 0 {
        return Err(StoreError::Invalid(format!(
            "extent size {extent_size} is not a positive multiple of {EXTENT_ALIGN} bytes"
        )));
    }
    let (a, the) = match tier {
        None => ("a store".to_string(), "store".to_string()),
        Some(t) => (format!("tier {t}"), format!("tier {t}'s")),
    };
    if size < extent_size {
        return Err(StoreError::Invalid(format!(
            "{a} of {} is too small: it must hold at least one extent of {}",
            human_size(size),
            human_size(extent_size)
        )));
    }
    if size % extent_size != 0 {
        return Err(StoreError::Invalid(format!(
            "{the} size {} is not a whole number of {} extents",
            human_size(size),
            human_size(extent_size)
        )));
    }
    u32::try_from(size / extent_size).map_err(|_| {
        StoreError::Invalid(format!(
            "{a} of {} has too many extents of {}; use larger extents",
            human_size(size),
            human_size(extent_size)
        ))
    })
}

/// Checks a tier table for a new store (names, paths, counts, total geometry).
fn check_new_tiers(tiers: &[TierRec], extent_size: u64) -> Result<()> {
    if tiers.len() > MAX_TIERS || tiers.is_empty() {
        return Err(StoreError::Invalid(format!(
            "a store has 1 to {MAX_TIERS} tiers, not {}",
            tiers.len()
        )));
    }
    for t in tiers {
        check_tier_name(&t.name)?;
    }
    check_tiers(tiers).map_err(StoreError::Invalid)?;
    let total: u64 = tiers.iter().map(|t| u64::from(t.extents)).sum();
    let total = u32::try_from(total).map_err(|_| {
        StoreError::Invalid(format!(
            "{total} extents is more than the {} a store may have; use larger extents",
            crate::format::MAX_EXTENTS
        ))
    })?;
    check_geometry(extent_size, total)
}

/// Where a tier's data file is: `recorded` as it is when absolute (or when the store has no
/// directory), else inside the store's directory.
fn resolve(dir: Option<&Path>, recorded: &Path) -> PathBuf {
    match dir {
        Some(d) if recorded.is_relative() => d.join(recorded),
        _ => recorded.to_path_buf(),
    }
}

fn random_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    let f = File::open("/dev/urandom").map_err(io_err("opening /dev/urandom"))?;
    StoreFile::read_at(&f, 0, &mut u).map_err(io_err("reading /dev/urandom"))?;
    u[6] = (u[6] & 0x0f) | 0x40; // version 4 (random)
    u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
    Ok(u)
}

/// A random 64-bit number (lock cookies).
pub(crate) fn random_u64() -> u64 {
    random_uuid().map_or_else(
        |_| u64::from(std::process::id()) ^ now(),
        |u| u64::from_le_bytes([u[0], u[1], u[2], u[3], u[4], u[5], u[7], u[9]]),
    )
}

/// Unix time in seconds.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Creates `dir/maps` if it is missing, and makes its entry durable.
fn make_maps_dir(dir: &Path) -> Result<()> {
    let maps = dir.join(MAPS_DIR);
    match std::fs::create_dir(&maps) {
        Ok(()) => File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("syncing directory {}", dir.display()))),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Io {
            op: format!("creating directory {}", maps.display()),
            source: e,
        }),
    }
}

/// Removes version `key` from `meta` and frees its extents; returns them.
fn remove_version(meta: &mut Meta, key: u64) -> Vec<u32> {
    let Ok(i) = meta.version_index(key) else {
        return Vec::new();
    };
    let v = meta.versions.remove(i);
    // Its holds on shared blocks go in the same commit: blocks no one else holds are free.
    if let Some(j) = meta.pool.holders.iter().position(|h| h.key == key) {
        let h = meta.pool.holders.remove(j);
        for p in h.blocks() {
            if meta.pool.holders_of(p) == 0 {
                if let Some(c) = meta.pool.crcs.get_mut(p as usize) {
                    *c = 0;
                }
            }
        }
    }
    for &e in &v.extents {
        if let Some(o) = meta.owners.get_mut(e as usize) {
            *o = 0;
        }
    }
    v.extents
}

/// Extents a catalog commit freed whose space is still allocated in the data file (see
/// [`Store::promote_deferred`]); [`Store::release`] releases it.
#[derive(Debug, Default)]
#[must_use = "the freed extents' space stays allocated until `Store::release`"]
pub struct Freed {
    extents: Vec<u32>,
}

impl Freed {
    /// How many extents were freed.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }
}

/// One version's space in a [`Store`]: reads anywhere in the store, writes only to the
/// extents granted to its key (checked against the grant cache on every write), each in its
/// tier's data file; `sync` syncs the tier files this version wrote to since their last sync.
pub struct FileSpace {
    store: Arc<Store>,
    key: VersionKey,
    /// Shared by every space of the key.
    shared: Arc<Shared>,
}
