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
    check_disk_name, check_geometry, check_layout_name, check_tier_name, check_tiers, default_tier,
    encode_slot, one_line_reason, slot_crc, tee_problems, validate, DiskRec, Header, Meta, Slot,
    TeeRec, TeeState, TierHeader, TierRec, VersionRec, DISK_ALIGN, EXTENT_ALIGN, HEADER_SIZE,
    MAX_ROOT, MAX_TIERS, SLOT_HEADER, TIER_HEADER_SIZE, TIER_HEADER_VERSION, UPGRADE_VERSION,
};
use crate::space::{ExtentId, Result, StoreError, TierInfo, VersionKey, VersionSpace};

/// The metadata file in a store's directory.
pub const META_FILE: &str = "store.meta";
/// The data file of a store created without tiers (its one tier, `default`), in the store's
/// directory; the only data file of a format version 1 or 2 store.
pub const DATA_FILE: &str = "data.0";
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

/// The uuid in its usual text form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[derive(Debug)]
struct MetaState {
    meta: Meta,
    generation: u64,
    /// The slot (0 = A, 1 = B) holding `generation`.
    newest: usize,
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

impl TierSync {
    /// The error of a sync of a version whose writes may have been lost.
    fn check_lost(&self, key: u64) -> io::Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "an earlier sync of this file failed while version {key} had writes in it that \
                 no sync had covered: they may be lost, and no later sync can make them durable; \
                 reopen the store (restart the daemon) to continue from the last commit"
            )));
        }
        Ok(())
    }
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
}

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

/// Writes a new store's files: each tier's data file at its length, the header, slot A
/// holding an empty catalog at generation 1 and an empty slot B; then syncs them all.
fn initialize(meta: &dyn StoreFile, data: &[&dyn StoreFile], h: &Header) -> Result<()> {
    for (t, file) in data.iter().enumerate() {
        file.set_size(h.tier_file_len(t))
            .and_then(|()| match h.has_tier_headers() {
                true => file.write_at(h.tier_len(t), &TierHeader::expected(h, t).encode()),
                false => Ok(()),
            })
            .and_then(|()| file.sync())
            .map_err(io_err(format!(
                "sizing tier {}'s data file",
                h.tiers[t].name
            )))?;
    }
    let payload = Meta::empty(h.extent_count).encode_for(h.version)?;
    meta.set_size(h.meta_len())
        .and_then(|()| meta.write_at(0, &h.encode()))
        .and_then(|()| meta.write_at(h.slot_offset(0), &encode_slot(h.version, 1, &payload)))
        .and_then(|()| meta.write_at(h.slot_offset(1), &[0u8; SLOT_HEADER]))
        .and_then(|()| meta.sync())
        .map_err(io_err("writing the metadata file"))
}

/// Reads and checks the header of a metadata file.
pub(crate) fn read_header(meta: &dyn StoreFile, location: &Path) -> Result<Header> {
    let size = meta
        .size()
        .map_err(io_err("reading the metadata file's size"))?;
    if size < HEADER_SIZE {
        return Err(StoreError::NotAStore {
            path: location.to_path_buf(),
            reason: format!("{size} bytes, shorter than the 4096-byte header"),
        });
    }
    let mut b = vec![0u8; HEADER_SIZE as usize];
    meta.read_at(0, &mut b)
        .map_err(io_err("reading the metadata header"))?;
    Header::decode(&b, location)
}

/// Reads slot `i` (0 = A, 1 = B) by the rules of the header's format version. Under a
/// version-2 header, a slot whose checksum is a version-1 one is valid too (a slot written
/// before the upgrade, decoded as version 1); under a version-1 header a version-2 slot is
/// not (one written by an upgrade interrupted before it rewrote the header).
pub(crate) fn read_slot(meta: &dyn StoreFile, h: &Header, i: usize) -> Result<Slot> {
    let at = h.slot_offset(i);
    let mut head = [0u8; SLOT_HEADER];
    meta.read_at(at, &mut head)
        .map_err(io_err("reading a metadata slot"))?;
    if head.iter().all(|&b| b == 0) {
        return Ok(Slot::Empty);
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&head[0..8]);
    let generation = u64::from_le_bytes(g);
    let mut l = [0u8; 4];
    l.copy_from_slice(&head[8..12]);
    let len = u32::from_le_bytes(l) as usize;
    l.copy_from_slice(&head[12..16]);
    let stored = u32::from_le_bytes(l);
    if len > h.max_payload() {
        return Ok(Slot::Invalid(format!(
            "payload length {len} exceeds the slot's {} bytes",
            h.max_payload()
        )));
    }
    let mut payload = vec![0u8; len];
    meta.read_at(at + SLOT_HEADER as u64, &mut payload)
        .map_err(io_err("reading a metadata slot"))?;
    // The format an upgrade to the header's version started from, and the one an upgrade from
    // it goes to: a slot of the first is valid (written before the upgrade), one of the second
    // is not (written by an upgrade interrupted before it rewrote the header).
    let (before, after) = match h.version {
        1 => (None, Some(UPGRADE_VERSION)),
        2 => (Some(1), None),
        3 => (None, Some(TIER_HEADER_VERSION)),
        _ => (Some(3), None),
    };
    let version = if slot_crc(h.version, &head[..12], &payload) == stored {
        h.version
    } else if before.is_some_and(|b| slot_crc(b, &head[..12], &payload) == stored) {
        before.unwrap_or(h.version)
    } else if let Some(a) = after.filter(|&a| slot_crc(a, &head[..12], &payload) == stored) {
        return Ok(Slot::Invalid(format!(
            "a format-version-{a} slot under a version-{} header: an upgrade was interrupted",
            h.version
        )));
    } else {
        return Ok(Slot::Invalid("checksum mismatch".into()));
    };
    if generation == 0 {
        return Ok(Slot::Invalid("generation 0".into()));
    }
    Ok(Slot::Valid {
        generation,
        payload,
        version,
    })
}

/// The slot to use: the valid one with the highest generation.
pub(crate) fn newest(slots: &[Slot; 2]) -> Result<usize> {
    match (&slots[0], &slots[1]) {
        (Slot::Valid { generation: a, .. }, Slot::Valid { generation: b, .. }) if a == b => Err(
            StoreError::Corrupt(format!("both metadata slots hold generation {a}")),
        ),
        (Slot::Valid { generation: a, .. }, Slot::Valid { generation: b, .. }) => {
            Ok(if a > b { 0 } else { 1 })
        }
        (Slot::Valid { .. }, _) => Ok(0),
        (_, Slot::Valid { .. }) => Ok(1),
        _ => Err(StoreError::Corrupt("neither metadata slot is valid".into())),
    }
}

pub(crate) fn slot_name(i: usize) -> char {
    if i == 0 {
        'A'
    } else {
        'B'
    }
}

/// Upgrades a version-1 store in place to [`UPGRADE_VERSION`] (2), crash-safely. `newest` and
/// `generation` locate the catalog `meta` read from the newest slot; returns the slot holding
/// the new generation (`generation + 1`). Two steps, each followed by `fdatasync`:
///
/// 1. The catalog, encoded in format 2, goes to the *other* slot as `generation + 1`, with a
///    format-2 checksum. The header still says 1, and under it a format-2 slot is not valid:
///    every reader (this binary or a version-1 one) still sees the old slot and its catalog.
/// 2. The header's first sector is rewritten with version 2 (and its new checksum): one
///    sector, written whole or not at all. Under a version-2 header the new slot is valid and
///    the newer one; the old slot stays valid as a version-1 slot (same catalog, older
///    generation) until the next commit overwrites it.
///
/// A power cut before step 2 is durable leaves a version-1 store with its catalog (the next
/// read-write open upgrades again); after, a version-2 store with the same catalog.
///
/// The upgrade from version 3 to 4 ([`upgrade_tiers`]) writes each tier file's header first,
/// then takes the same two steps with `to` = 4.
pub(crate) fn upgrade(
    meta_file: &dyn StoreFile,
    header: &Header,
    meta: &Meta,
    newest: usize,
    generation: u64,
    to: u32,
) -> Result<(Header, usize)> {
    #[allow(non_snake_case)]
    let TO = to;
    let payload = meta.encode_for(TO)?;
    if payload.len() > header.max_payload() {
        return Err(StoreError::MetadataFull {
            needed: payload.len(),
            max: header.max_payload(),
        });
    }
    let target = 1 - newest;
    let next = generation + 1;
    meta_file
        .write_at(header.slot_offset(target), &encode_slot(TO, next, &payload))
        .and_then(|()| meta_file.sync())
        .map_err(io_err(format!(
            "upgrading the store: writing generation {next} in format version {TO} to slot {}",
            slot_name(target)
        )))?;
    let new = Header {
        version: TO,
        ..header.clone()
    };
    meta_file
        .write_at(0, &new.encode()[..HEADER_SECTOR])
        .and_then(|()| meta_file.sync())
        .map_err(io_err(format!(
            "upgrading the store: rewriting the header with format version {TO}"
        )))?;
    Ok((new, target))
}

/// Step 0 of the upgrade from format version 3 to 4: gives every tier file its [`TierHeader`],
/// right after the tier's extents, and syncs it. A version-3 file proves nothing, so only a
/// file that looks like what `create` made is adopted: exactly the tier's length (or that plus
/// this very header, or plus 4096 zeros, left by an upgrade interrupted during this step). The header still says 3
/// until [`upgrade`] rewrites it, and a version-3 reader ignores bytes past a tier's extents,
/// so a crash anywhere here leaves the version-3 store as it was.
pub(crate) fn upgrade_tiers(
    files: &[&dyn StoreFile],
    header: &Header,
    paths: &[PathBuf],
) -> Result<()> {
    for (t, file) in files.iter().enumerate() {
        let rec = &header.tiers[t];
        let path = paths.get(t).cloned().unwrap_or_default();
        let want = header.tier_len(t);
        let expected = TierHeader::expected(header, t);
        let len = file.size().map_err(io_err(format!(
            "reading the size of tier {}'s data file",
            rec.name
        )))?;
        let adopted = len == want + TIER_HEADER_SIZE && {
            let mut b = vec![0u8; TIER_HEADER_SIZE as usize];
            file.read_at(want, &mut b)
                .map_err(io_err(format!("reading tier {}'s header", rec.name)))?;
            // This very header, or zeros: the file was extended but the header not yet
            // written when the power went.
            b.iter().all(|&x| x == 0)
                || TierHeader::decode(&b).is_ok_and(|f| expected.mismatch(&f).is_none())
        };
        if len != want && !adopted {
            return Err(StoreError::TierFile {
                tier: rec.name.clone(),
                path,
                problem: format!(
                    "is {len} bytes, not the {want} bytes `store create` made for the tier: the upgrade \
                     to format version {TIER_HEADER_VERSION} does not adopt it as the tier's data file \
                     (format version 3 records no proof that a file belongs to its store)"
                ),
            });
        }
        file.set_size(want + TIER_HEADER_SIZE)
            .and_then(|()| file.write_at(want, &expected.encode()))
            .and_then(|()| file.sync())
            .map_err(io_err(format!(
                "upgrading the store: writing tier {}'s header",
                rec.name
            )))?;
    }
    Ok(())
}

/// Why tier `t`'s data file does not carry the [`TierHeader`] its entry in `h` expects, if it
/// does not: the rest of a sentence that starts with the file's path. Format version 4 only.
pub(crate) fn tier_header_problem(
    file: &dyn StoreFile,
    h: &Header,
    t: usize,
) -> Result<Option<String>> {
    let at = h.tier_len(t);
    let mut b = vec![0u8; TIER_HEADER_SIZE as usize];
    file.read_at(at, &mut b)
        .map_err(io_err(format!("reading tier {}'s header", h.tiers[t].name)))?;
    Ok(match TierHeader::decode(&b) {
        Err(why) => Some(format!("{why} (at byte {at})")),
        Ok(found) => TierHeader::expected(h, t).mismatch(&found),
    })
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

impl Store {
    /// Creates a store in `dir` (created if missing) of `size` bytes cut into extents of
    /// `extent_size` bytes, in one tier, `default`: `DIR/data.0` (sparse; recorded as `data.0`,
    /// inside the store's directory, so the directory can be moved) and `DIR/store.meta`.
    /// Refuses if either file exists. The metadata file is built under a temporary name and
    /// renamed into place, so a crash leaves either no store or a complete one.
    pub fn create(dir: &Path, size: u64, extent_size: u64) -> Result<Arc<Store>> {
        let count = extent_count_for(size, extent_size)?;
        let tier = default_tier(count);
        let path = dir.join(&tier.path);
        Store::create_in(dir, vec![(tier, path)], extent_size)
    }

    /// Creates a store in `dir` (created if missing) made of `tiers`, in order: tier `t` holds
    /// the extents after those of the tiers before it, in its own data file, created at
    /// `path` (exclusively: an existing file is refused with [`StoreError::StoreExists`]) and
    /// sized sparse at `size`, a positive whole number of extents. 1 to 8 tiers, names
    /// `[a-z0-9_-]{1,16}` and paths unique, at most 65536 extents in all. A relative path is
    /// resolved against the current directory now and recorded absolute. The metadata file is
    /// `DIR/store.meta`; a crash during creation leaves no store (a tier file may be left over).
    pub fn create_tiered(dir: &Path, tiers: &[TierSpec], extent_size: u64) -> Result<Arc<Store>> {
        let mut cwd = None;
        let mut absolute = |p: &Path| -> Result<PathBuf> {
            if p.is_absolute() {
                return Ok(p.to_path_buf());
            }
            if cwd.is_none() {
                cwd =
                    Some(std::env::current_dir().map_err(io_err("finding the current directory"))?);
            }
            Ok(cwd.as_deref().unwrap_or(Path::new("/")).join(p))
        };
        let mut planned: Vec<(TierRec, PathBuf)> = Vec::with_capacity(tiers.len());
        for t in tiers {
            check_tier_name(&t.name)?;
            if planned.iter().any(|(o, _)| o.name == t.name) {
                return Err(StoreError::Invalid(format!(
                    "tier name {:?} is used twice",
                    t.name
                )));
            }
            let extents = extents_in(Some(&t.name), t.size, extent_size)?;
            let path = absolute(&t.path)?;
            if let Some((o, _)) = planned.iter().find(|(_, p)| same_path(p, &path)) {
                return Err(StoreError::Invalid(format!(
                    "tiers {} and {} have the same data file {}",
                    o.name,
                    t.name,
                    path.display()
                )));
            }
            planned.push((
                TierRec {
                    name: t.name.clone(),
                    extents,
                    path: path.clone(),
                },
                path,
            ));
        }
        let abs_dir = absolute(dir)?;
        for (t, path) in &planned {
            for own in [META_FILE, META_TMP] {
                if same_path(path, &abs_dir.join(own)) {
                    return Err(StoreError::Invalid(format!(
                        "tier {}'s data file {} would be the store's own {own}",
                        t.name,
                        path.display()
                    )));
                }
            }
        }
        Store::create_in(dir, planned, extent_size)
    }

    /// Creates a store in `dir` of the tiers given with their data files' paths.
    fn create_in(
        dir: &Path,
        tiers: Vec<(TierRec, PathBuf)>,
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        let recs: Vec<TierRec> = tiers.iter().map(|(t, _)| t.clone()).collect();
        check_new_tiers(&recs, extent_size)?;
        let meta_path = dir.join(META_FILE);
        if meta_path.symlink_metadata().is_ok() {
            return Err(StoreError::StoreExists(meta_path));
        }
        for (_, p) in &tiers {
            if p.symlink_metadata().is_ok() {
                return Err(StoreError::StoreExists(p.clone()));
            }
        }
        let dir_existed = dir.symlink_metadata().is_ok();
        std::fs::create_dir_all(dir)
            .map_err(io_err(format!("creating directory {}", dir.display())))?;
        let mut files: Vec<File> = Vec::with_capacity(tiers.len());
        let mut made: Vec<&Path> = Vec::with_capacity(tiers.len());
        let tmp_path = dir.join(META_TMP);
        let built = (|| {
            for (t, path) in &tiers {
                let f = crate::safefs::create_new(path).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => StoreError::StoreExists(path.clone()),
                    _ => StoreError::Io {
                        op: format!("creating tier {}'s data file {}", t.name, path.display()),
                        source: e,
                    },
                })?;
                made.push(path);
                files.push(f);
            }
            // A leftover temporary file is removed (the name, never what a symlink there
            // points to), then created afresh, exclusively, mode 0600.
            let sdir = crate::safefs::Dir::open(dir)
                .map_err(io_err(format!("opening directory {}", dir.display())))?;
            sdir.remove_if_present(META_TMP)
                .map_err(io_err(format!("removing {}", tmp_path.display())))?;
            let meta = sdir
                .create_new(META_TMP)
                .map_err(io_err(format!("creating {}", tmp_path.display())))?;
            if !lock(&meta, LockMode::Exclusive)
                .map_err(io_err(format!("locking {}", tmp_path.display())))?
            {
                return Err(StoreError::InUse(dir.to_path_buf()));
            }
            let header = Header::with_tiers(random_uuid()?, extent_size, recs.clone());
            let data: Vec<&dyn StoreFile> = files.iter().map(|f| f as &dyn StoreFile).collect();
            initialize(&meta, &data, &header)?;
            std::fs::create_dir_all(dir.join(MAPS_DIR)).map_err(io_err(format!(
                "creating directory {}",
                dir.join(MAPS_DIR).display()
            )))?;
            // The tier files' directory entries are durable before the store exists.
            let mut parents: Vec<&Path> = Vec::new();
            for (_, p) in &tiers {
                let parent = match p.parent() {
                    Some(q) if !q.as_os_str().is_empty() => q,
                    _ => Path::new("."),
                };
                if !parents.contains(&parent) {
                    parents.push(parent);
                    File::open(parent)
                        .and_then(|d| d.sync_all())
                        .map_err(io_err(format!("syncing directory {}", parent.display())))?;
                }
            }
            if meta_path.symlink_metadata().is_ok() {
                return Err(StoreError::StoreExists(meta_path.clone()));
            }
            sdir.rename(META_TMP, META_FILE).map_err(io_err(format!(
                "renaming {} into place",
                tmp_path.display()
            )))?;
            sdir.sync()
                .map_err(io_err(format!("syncing directory {}", dir.display())))?;
            Ok(meta)
        })();
        let meta = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                for p in made {
                    let _ = std::fs::remove_file(p);
                }
                if !dir_existed {
                    // Only if empty: nothing but what this call made.
                    let _ = std::fs::remove_dir(dir.join(MAPS_DIR));
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        let data = files
            .into_iter()
            .map(|f| Box::new(f) as Box<dyn StoreFile>)
            .collect();
        let store = Store::load(
            Box::new(meta),
            data,
            meta_path,
            Some(dir.to_path_buf()),
            false,
        )?;
        info!(
            "created store {} ({} extents of {extent_size} bytes; tiers: {})",
            dir.display(),
            store.header.extent_count,
            store
                .tiers
                .iter()
                .map(|t| format!("{} {} extents at {}", t.name, t.extents, t.path.display()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(store)
    }

    /// Opens the store in `dir` for reading and writing. Another process holding it open gets
    /// [`StoreError::InUse`]; a tier's data file that is missing or short gets
    /// [`StoreError::TierFile`].
    ///
    /// Every tier file must carry the tier header its tier table entry expects (format version
    /// 4), or [`StoreError::TierFile`] says which file and what is wrong. A format-3 store is
    /// upgraded to format 4 first: automatically when every tier file is inside the store's
    /// directory (`data.0`), otherwise only by [`Store::open_adopting_tiers`].
    pub fn open(dir: &Path) -> Result<Arc<Store>> {
        Store::open_mode(dir, false, false)
    }

    /// [`Store::open`] with the tier files' extents read and written with direct I/O
    /// (`O_DIRECT`, `serve --store DIR --cache none`; [`crate::direct`]): no page of their data
    /// stays in the host's page cache, so a version's sync writes back nothing another version
    /// wrote. `store.meta`, the maps and the tier headers stay buffered. Fails, naming the
    /// file, where a tier file's file system cannot do direct I/O.
    pub fn open_direct(dir: &Path) -> Result<Arc<Store>> {
        let (meta, meta_path) = open_files(dir, false)?;
        Store::open_files_with(dir, meta, meta_path, false, false, false, true)
    }

    /// Whether the tier files' data goes through direct I/O ([`Store::open_direct`]).
    pub fn direct_io(&self) -> bool {
        self.direct_io.load(Ordering::Relaxed)
    }

    /// [`Store::open`] that also upgrades a format-3 store whose tier files are outside its
    /// directory (`dovetail store upgrade`): the operator vouches that the files the tier
    /// table names are this store's. Each must still be a regular file of exactly the tier's
    /// length (what `create` made). A store of any other format version opens as usual.
    pub fn open_adopting_tiers(dir: &Path) -> Result<Arc<Store>> {
        Store::open_mode(dir, false, true)
    }

    /// Opens the store in `dir` read-only (shared with other readers, not with a writer):
    /// listings and checks. Every change is refused with [`StoreError::ReadOnly`].
    pub fn open_read_only(dir: &Path) -> Result<Arc<Store>> {
        Store::open_mode(dir, true, false)
    }

    /// Opens the store in `dir` read-only, also while a writer holds it (a daemon serving it,
    /// an offline command changing it): then without a lock, from the last committed metadata.
    /// Both A/B metadata slots are checksummed and a commit writes the older one, so a commit
    /// in progress leaves the last one readable. [`Store::beside_writer`] says which open
    /// happened. Beside a writer, blocks the read commit uses stay as they are until the
    /// writer's next commit: whoever reads them (a tree walk) compares
    /// [`Store::committed_generation`] with the generation it read ([`Store::info`]) after
    /// reading, and reads again if it changed. Every change is refused.
    pub fn open_reader(dir: &Path) -> Result<Arc<Store>> {
        match Store::open_mode(dir, true, false) {
            Err(StoreError::InUse(_)) => {
                let (meta, meta_path) = open_meta_unlocked(dir)?;
                Store::open_files_as(dir, meta, meta_path, true, true, false)
            }
            r => r,
        }
    }

    /// Whether this store was opened beside a writer ([`Store::open_reader`]).
    pub fn beside_writer(&self) -> bool {
        self.beside_writer
    }

    /// The generation of the newest commit in the metadata file now (a writer beside this
    /// reader may have committed since it was opened).
    pub fn committed_generation(&self) -> Result<u64> {
        let slots = [
            read_slot(&*self.meta_file, &self.header, 0)?,
            read_slot(&*self.meta_file, &self.header, 1)?,
        ];
        match &slots[newest(&slots)?] {
            Slot::Valid { generation, .. } => Ok(*generation),
            _ => Err(StoreError::Corrupt("no valid metadata slot".into())),
        }
    }

    fn open_mode(dir: &Path, read_only: bool, adopt: bool) -> Result<Arc<Store>> {
        let (meta, meta_path) = open_files(dir, read_only)?;
        Store::open_files_as(dir, meta, meta_path, read_only, false, adopt)
    }

    fn open_files_as(
        dir: &Path,
        meta: File,
        meta_path: PathBuf,
        read_only: bool,
        beside_writer: bool,
        adopt: bool,
    ) -> Result<Arc<Store>> {
        Store::open_files_with(dir, meta, meta_path, read_only, beside_writer, adopt, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn open_files_with(
        dir: &Path,
        meta: File,
        meta_path: PathBuf,
        read_only: bool,
        beside_writer: bool,
        adopt: bool,
        direct: bool,
    ) -> Result<Arc<Store>> {
        let header = read_header(&meta, &meta_path)?;
        if !adopt {
            unproven_tier(&header, dir)?;
        }
        let mut data: Vec<Box<dyn StoreFile>> = Vec::with_capacity(header.tiers.len());
        // Tier files inside the store's directory are reached through its descriptor.
        let sdir = crate::safefs::Dir::open(dir)
            .map_err(io_err(format!("opening directory {}", dir.display())))?;
        for t in &header.tiers {
            let path = resolve(Some(dir), &t.path);
            if let Some(problem) = not_a_regular_file(&path) {
                return Err(StoreError::TierFile {
                    tier: t.name.clone(),
                    path,
                    problem,
                });
            }
            match open_tier_in(&sdir, &t.path, &path, read_only)? {
                // Checked again on the open file: the path may have changed in between.
                Some(f) if !f.metadata().is_ok_and(|m| m.is_file()) => {
                    return Err(StoreError::TierFile {
                        tier: t.name.clone(),
                        path,
                        problem: "is not a regular file: a tier's data file is one".into(),
                    })
                }
                Some(f) if direct => {
                    let end = u64::from(t.extents) * header.extent_size;
                    let f = crate::direct::DirectTierFile::new(f, end, read_only).map_err(|e| {
                        StoreError::TierFile {
                            tier: t.name.clone(),
                            path: path.clone(),
                            problem: format!(
                                "cannot be used with direct I/O (--cache none): {e}; its file \
                                 system may not support O_DIRECT: use --cache writeback"
                            ),
                        }
                    })?;
                    data.push(Box::new(f));
                }
                Some(f) => data.push(Box::new(f)),
                None => {
                    return Err(StoreError::TierFile {
                        tier: t.name.clone(),
                        path,
                        problem: "is missing".into(),
                    })
                }
            }
        }
        let store = Store::load_as(
            Box::new(meta),
            data,
            meta_path,
            Some(dir.to_path_buf()),
            read_only,
            beside_writer,
        )?;
        store.direct_io.store(direct, Ordering::Relaxed);
        if !read_only {
            // Stores created before presence maps existed have no `maps/` yet.
            make_maps_dir(dir)?;
        }
        Ok(store)
    }

    /// Creates a store over the given files (any [`StoreFile`], e.g. simulated ones) instead
    /// of a directory, of one tier, `default`. The files' previous contents are overwritten.
    pub fn create_on(
        meta: Box<dyn StoreFile>,
        data: Box<dyn StoreFile>,
        size: u64,
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        let count = extent_count_for(size, extent_size)?;
        let header = Header::new(random_uuid()?, extent_size, count);
        initialize(&*meta, &[&*data], &header)?;
        Store::load(meta, vec![data], PathBuf::from("(store)"), None, false)
    }

    /// [`Store::create_on`] with tiers: `(name, data file, extents)` each, in extent order
    /// (the rules of [`Store::create_tiered`]; at least one extent per tier). The header
    /// records tier `t`'s path as `data.<t>`, which names no file: the files are the ones
    /// given, and [`Store::open_on_tiers`] takes them in the same order.
    pub fn create_on_tiers(
        meta: Box<dyn StoreFile>,
        tiers: Vec<(String, Box<dyn StoreFile>, u32)>,
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        let mut recs = Vec::with_capacity(tiers.len());
        let mut data = Vec::with_capacity(tiers.len());
        for (i, (name, file, extents)) in tiers.into_iter().enumerate() {
            recs.push(TierRec {
                name,
                extents,
                path: PathBuf::from(format!("data.{i}")),
            });
            data.push(file);
        }
        check_new_tiers(&recs, extent_size)?;
        let header = Header::with_tiers(random_uuid()?, extent_size, recs);
        let files: Vec<&dyn StoreFile> = data.iter().map(|f| &**f).collect();
        initialize(&*meta, &files, &header)?;
        Store::load(meta, data, PathBuf::from("(store)"), None, false)
    }

    /// Opens a store over the given files, for reading and writing (a version-1 store is
    /// upgraded). Such a store has no directory: see [`Store::map_path`]. A store of several
    /// tiers needs [`Store::open_on_tiers`].
    pub fn open_on(meta: Box<dyn StoreFile>, data: Box<dyn StoreFile>) -> Result<Arc<Store>> {
        Store::open_on_tiers(meta, vec![data])
    }

    /// Opens a store over the given files, read-only: nothing is ever written to them (a
    /// version-1 store is read as it is).
    pub fn open_on_read_only(
        meta: Box<dyn StoreFile>,
        data: Box<dyn StoreFile>,
    ) -> Result<Arc<Store>> {
        Store::open_on_tiers_read_only(meta, vec![data])
    }

    /// Opens a store over the given files, one data file per tier in the header's order, for
    /// reading and writing. A count that does not match the header's tiers is
    /// [`StoreError::Invalid`].
    pub fn open_on_tiers(
        meta: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
    ) -> Result<Arc<Store>> {
        Store::load(meta, data, PathBuf::from("(store)"), None, false)
    }

    /// [`Store::open_on_tiers`], read-only.
    pub fn open_on_tiers_read_only(
        meta: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
    ) -> Result<Arc<Store>> {
        Store::load(meta, data, PathBuf::from("(store)"), None, true)
    }

    /// Reads the header and the newest valid slot, and refuses a catalog that breaks any
    /// store-level invariant, or data files that do not match the header's tiers (one per
    /// tier, each at least as long as its extents). A version-1 store opened for writing is
    /// upgraded (see [`upgrade`]).
    pub(crate) fn load(
        meta_file: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
        location: PathBuf,
        dir: Option<PathBuf>,
        read_only: bool,
    ) -> Result<Arc<Store>> {
        Store::load_as(meta_file, data, location, dir, read_only, false)
    }

    /// [`Store::load`]; `beside_writer`: read-only, without a lock, while a writer may commit
    /// (a slot it is writing is not valid, which is no sign of damage then).
    pub(crate) fn load_as(
        meta_file: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
        location: PathBuf,
        dir: Option<PathBuf>,
        read_only: bool,
        beside_writer: bool,
    ) -> Result<Arc<Store>> {
        let mut header = read_header(&*meta_file, &location)?;
        let meta_len = meta_file
            .size()
            .map_err(io_err("reading the metadata file's size"))?;
        if meta_len < header.meta_len() {
            return Err(StoreError::Corrupt(format!(
                "the metadata file is {meta_len} bytes, shorter than the {} its header implies",
                header.meta_len()
            )));
        }
        if data.len() != header.tiers.len() {
            return Err(StoreError::Invalid(format!(
                "the store has {} tier(s) ({}) but {} data file(s) were given",
                header.tiers.len(),
                header
                    .tiers
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                data.len()
            )));
        }
        let mut tiers = Vec::with_capacity(data.len());
        let mut first = 0u32;
        for (i, file) in data.into_iter().enumerate() {
            let rec = &header.tiers[i];
            let path = resolve(dir.as_deref(), &rec.path);
            if let Some(problem) = tier_len_problem(&*file, &header, i)? {
                return Err(StoreError::TierFile {
                    tier: rec.name.clone(),
                    path,
                    problem,
                });
            }
            if header.has_tier_headers() {
                if let Some(problem) = tier_header_problem(&*file, &header, i)? {
                    return Err(StoreError::TierFile {
                        tier: rec.name.clone(),
                        path,
                        problem,
                    });
                }
            }
            tiers.push(Tier {
                name: rec.name.clone(),
                path,
                first,
                extents: rec.extents,
                file,
                sync_lock: Mutex::new(()),
                syncs_started: AtomicU64::new(0),
                last_good_sync: AtomicU64::new(0),
            });
            first += rec.extents;
        }
        let slots = [
            read_slot(&*meta_file, &header, 0)?,
            read_slot(&*meta_file, &header, 1)?,
        ];
        let mut newest = newest(&slots)?;
        let Slot::Valid {
            generation,
            payload,
            version,
        } = &slots[newest]
        else {
            return Err(StoreError::Corrupt("no valid metadata slot".into()));
        };
        let mut generation = *generation;
        let (meta, recorded_free) = Meta::decode(payload, *version)?;
        let violations = validate(&header, &meta, recorded_free);
        if let Some(first) = violations.first() {
            return Err(StoreError::Corrupt(format!(
                "{first}{}; `dovetail store check` lists every problem",
                match violations.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            )));
        }
        for (i, s) in slots.iter().enumerate().filter(|_| !beside_writer) {
            if let Slot::Invalid(why) = s {
                // Normal after a crash during a commit (the next commit overwrites it), but
                // also what damage to the newest slot looks like: worth an operator's eye.
                warn!(
                    "{}: metadata slot {} is not valid ({why}); using slot {} (generation {generation}), \
                     as after a crash during a commit",
                    location.display(),
                    slot_name(i),
                    slot_name(newest)
                );
            }
        }
        let to = match header.version {
            v if v < UPGRADE_VERSION => Some(UPGRADE_VERSION),
            3 => Some(TIER_HEADER_VERSION),
            _ => None,
        };
        if let Some(to) = to.filter(|_| !read_only) {
            let old = header.version;
            if to == TIER_HEADER_VERSION {
                let files: Vec<&dyn StoreFile> = tiers.iter().map(|t| &*t.file).collect();
                let paths: Vec<PathBuf> = tiers.iter().map(|t| t.path.clone()).collect();
                upgrade_tiers(&files, &header, &paths)?;
            }
            let (upgraded, slot) = upgrade(&*meta_file, &header, &meta, newest, generation, to)?;
            header = upgraded;
            newest = slot;
            generation += 1;
            info!(
                "{}: upgraded the store from format version {old} to {to} (generation {generation}, slot {})",
                location.display(),
                slot_name(newest)
            );
        }
        debug!(
            "opened store {} (format version {}) at generation {generation} (slot {})",
            location.display(),
            header.version,
            slot_name(newest)
        );
        let grants = meta.owners.clone();
        Ok(Arc::new(Store {
            location,
            dir,
            header,
            meta_file,
            tiers,
            read_only,
            beside_writer,
            state: Mutex::new(MetaState {
                meta,
                generation,
                newest,
            }),
            grants: RwLock::new(grants),
            shared: Mutex::new(HashMap::new()),
            granting: Mutex::new(Vec::new()),
            direct_io: AtomicBool::new(false),
        }))
    }

    fn lock_state(&self) -> MutexGuard<'_, MetaState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn grants_read(&self) -> RwLockReadGuard<'_, Vec<u64>> {
        self.grants.read().unwrap_or_else(|p| p.into_inner())
    }

    fn grants_write(&self) -> RwLockWriteGuard<'_, Vec<u64>> {
        self.grants.write().unwrap_or_else(|p| p.into_inner())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Commits `new` as the next generation: the whole payload goes to the slot not holding
    /// the newest generation, then the metadata file is synced; only then does `new` become
    /// the in-memory catalog. If anything fails, the catalog stays as it was (the slot written
    /// to is the older one, so the newest durable state is untouched; the next commit
    /// rewrites that slot whole).
    fn commit(&self, st: &mut MetaState, new: Meta) -> Result<()> {
        self.writable()?;
        let payload = new.encode();
        let max = self.header.max_payload();
        if payload.len() > max {
            return Err(StoreError::MetadataFull {
                needed: payload.len(),
                max,
            });
        }
        let target = 1 - st.newest;
        let generation = st.generation + 1;
        let slot = encode_slot(self.header.version, generation, &payload);
        self.meta_file
            .write_at(self.header.slot_offset(target), &slot)
            .and_then(|()| {
                crate::failpoint::hit("store-commit-unsynced");
                self.meta_file.sync()
            })
            .map_err(io_err(format!(
                "committing metadata generation {generation} to slot {}",
                slot_name(target)
            )))?;
        crate::failpoint::hit("store-commit-synced");
        st.meta = new;
        st.generation = generation;
        st.newest = target;
        Ok(())
    }

    /// Commits `new`, which frees `freed` and drops `dropped` versions; then drops those
    /// extents from the grant cache, releases their space and removes the dropped versions'
    /// presence maps.
    fn commit_freeing(
        &self,
        st: &mut MetaState,
        new: Meta,
        freed: &[u32],
        dropped: &[u64],
    ) -> Result<()> {
        self.commit_dropping(st, new, freed, dropped)?;
        self.release_extents(st, freed);
        Ok(())
    }

    /// The catalog half of [`Store::commit_freeing`]: commits `new`, drops the freed extents
    /// from the grant cache (no space of a dropped version can write them from here on) and
    /// removes the dropped versions' presence maps. The extents' space is not released.
    fn commit_dropping(
        &self,
        st: &mut MetaState,
        new: Meta,
        freed: &[u32],
        dropped: &[u64],
    ) -> Result<()> {
        self.commit(st, new)?;
        {
            let mut g = self.grants_write();
            for &e in freed {
                g[e as usize] = 0;
            }
        }
        for &key in dropped {
            self.remove_map(VersionKey(key));
        }
        Ok(())
    }

    /// Releases the space (punches holes) of extents the catalog lists as free. An extent
    /// granted again since it was freed is skipped: its new owner's grant zeroed it already,
    /// and it may hold the new owner's data by now. Releasing is only about space: a grant
    /// zeroes an extent before handing it out, whatever this did or did not do, and no layout
    /// reads a block of its extent it has not written and synced ([`Store::grant_zeroed`]).
    fn release_extents(&self, st: &MetaState, freed: &[u32]) {
        for &e in freed {
            if st.meta.owners.get(e as usize) != Some(&0) {
                continue;
            }
            let t = self.tier_of(e);
            let tier = &self.tiers[t];
            let at = u64::from(e - tier.first) * self.header.extent_size;
            if let Err(err) = tier.file.zero_range(at, self.header.extent_size) {
                warn!(
                    "could not release the space of freed extent {e} (tier {}, {}): {err}",
                    tier.name,
                    tier.path.display()
                );
            }
        }
    }

    /// Takes extent `extent` back from version `key`, whose layout references no block of it
    /// in any committed root record or snapshot any more (the layout's commit that stopped
    /// naming it must be durable before this is called): one crash-safe catalog commit frees
    /// it, the grant cache forgets it (a later write of the version there is a grant
    /// violation) and its space is released. Refused with [`StoreError::Invalid`] unless the
    /// extent is granted to `key`.
    pub fn ungrant(&self, key: VersionKey, extent: ExtentId) -> Result<()> {
        self.writable()?;
        let mut st = self.lock_state();
        let vi = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        let e = extent.0;
        if st.meta.owners.get(e as usize) != Some(&key.0) {
            return Err(StoreError::Invalid(format!(
                "{extent} is not granted to {key}: it cannot be given back"
            )));
        }
        let mut new = st.meta.clone();
        new.owners[e as usize] = 0;
        new.versions[vi].extents.retain(|&x| x != e);
        crate::failpoint::hit("store-ungrant");
        self.commit_freeing(&mut st, new, &[e], &[])?;
        debug!(
            "{key} gave back extent {e} (tier {})",
            self.tiers[self.tier_of(e)].name
        );
        Ok(())
    }

    /// Releases the space of the extents a [`Store::promote_deferred`] freed (see
    /// [`Freed`]). Extents granted again in the meantime are left alone.
    pub fn release(&self, freed: Freed) {
        if freed.extents.is_empty() || self.read_only {
            return;
        }
        // One extent at a time: the state lock (which a grant needs) is held for one hole
        // punch at most, not for the whole list.
        for &e in &freed.extents {
            let st = self.lock_state();
            self.release_extents(&st, &[e]);
        }
        debug!(
            "released the space of {} freed extents",
            freed.extents.len()
        );
    }

    /// Removes version `key`'s presence map file, if the store has a directory and the file
    /// exists. Failures are logged, not returned: the catalog change that dropped the version
    /// is already committed, and a left-over map file is harmless (keys are never reused).
    fn remove_map(&self, key: VersionKey) {
        if self.dir.is_none() {
            return;
        }
        let path = self.map_path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => debug!("removed presence map {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                "could not remove the presence map {} of dropped {key}: {e}",
                path.display()
            ),
        }
    }

    /// The location of version `key`'s presence map file: `<store dir>/maps/<key>.map`
    /// (docs/format.md, "Presence map"). The store creates the `maps/` directory and removes
    /// the map of every version it drops; the file itself is written by whoever tracks the
    /// version's blocks. A store over given files (`create_on`, `open_on`) has no directory:
    /// its map paths are under a relative `(store)/maps/` that does not exist, and it never
    /// removes any file.
    pub fn map_path(&self, key: VersionKey) -> PathBuf {
        self.dir
            .as_deref()
            .unwrap_or(Path::new("(store)"))
            .join(MAPS_DIR)
            .join(format!("{}.map", key.0))
    }

    /// Where the store lives (its metadata file).
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// Geometry and state, tiers included.
    pub fn info(&self) -> StoreInfo {
        let st = self.lock_state();
        StoreInfo {
            format_version: self.header.version,
            uuid: self.header.uuid,
            extent_size: self.header.extent_size,
            extent_count: self.header.extent_count,
            free_extents: st.meta.free_extents(),
            generation: st.generation,
            tiers: tier_status(&self.header, self.dir.as_deref(), &st.meta.owners),
        }
    }

    /// The tiers, in index (and extent) order, with their free extents now.
    pub fn tiers(&self) -> Vec<TierInfo> {
        let g = self.grants_read();
        self.tiers
            .iter()
            .map(|t| TierInfo {
                name: t.name.clone(),
                extents: t.extents,
                free: free_in(&g, t.range()),
            })
            .collect()
    }

    /// Each tier's data file, in tier order (as [`TierStatus::path`]).
    pub fn tier_paths(&self) -> Vec<PathBuf> {
        self.tiers.iter().map(|t| t.path.clone()).collect()
    }

    /// The index of the tier holding `extent` (the last tier for an extent past the store).
    pub fn extent_tier(&self, extent: ExtentId) -> usize {
        self.tier_of(extent.0)
    }

    fn tier_of(&self, e: u32) -> usize {
        self.tiers
            .iter()
            .position(|t| e < t.first + t.extents)
            .unwrap_or(self.tiers.len() - 1)
    }

    /// Bytes per extent.
    pub fn extent_size(&self) -> u64 {
        self.header.extent_size
    }

    pub(crate) fn disk_info(meta: &Meta, d: &DiskRec) -> DiskInfo {
        DiskInfo {
            name: d.name.clone(),
            size: d.size,
            layout: meta
                .version(d.trusted)
                .map(|v| v.layout.clone())
                .unwrap_or_default(),
            trusted: VersionKey(d.trusted),
            candidate: (d.candidate != 0).then_some(VersionKey(d.candidate)),
            tee: d.tee.clone(),
        }
    }

    pub(crate) fn version_info(v: &VersionRec) -> VersionInfo {
        VersionInfo {
            key: VersionKey(v.key),
            disk: v.disk.clone(),
            layout: v.layout.clone(),
            extents: v.extents.iter().map(|&e| ExtentId(e)).collect(),
            root_len: v.root.len(),
        }
    }

    /// Every disk, by name.
    pub fn disks(&self) -> Vec<DiskInfo> {
        let st = self.lock_state();
        st.meta
            .disks
            .iter()
            .map(|d| Store::disk_info(&st.meta, d))
            .collect()
    }

    /// One disk.
    pub fn disk(&self, name: &str) -> Result<DiskInfo> {
        let st = self.lock_state();
        st.meta
            .disk(name)
            .map(|d| Store::disk_info(&st.meta, d))
            .ok_or_else(|| StoreError::NoSuchDisk(name.to_string()))
    }

    /// Every version, by key.
    pub fn versions(&self) -> Vec<VersionInfo> {
        self.lock_state()
            .meta
            .versions
            .iter()
            .map(Store::version_info)
            .collect()
    }

    /// One version.
    pub fn version(&self, key: VersionKey) -> Result<VersionInfo> {
        self.lock_state()
            .meta
            .version(key.0)
            .map(Store::version_info)
            .ok_or(StoreError::NoSuchVersion(key))
    }

    fn new_version(meta: &mut Meta, disk: &str, layout: &str) -> Result<u64> {
        let key = meta.next_key;
        meta.next_key = key
            .checked_add(1)
            .ok_or_else(|| StoreError::Invalid("version keys are exhausted".into()))?;
        let rec = VersionRec {
            key,
            disk: disk.to_string(),
            layout: layout.to_string(),
            extents: Vec::new(),
            root: Vec::new(),
        };
        match meta.version_index(key) {
            Err(pos) => meta.versions.insert(pos, rec),
            Ok(_) => {
                return Err(StoreError::Corrupt(format!(
                    "version key {key} is already in use"
                )))
            }
        }
        Ok(key)
    }

    /// Adds disk `name` of `size_bytes` (a positive multiple of 4096) and its first version,
    /// trusted, of `layout`, with an empty root record (the layout formats it on first use).
    /// Returns the version's key.
    pub fn create_disk(&self, name: &str, size_bytes: u64, layout: &str) -> Result<VersionKey> {
        self.writable()?;
        check_disk_name(name)?;
        check_layout_name(layout)?;
        if size_bytes == 0 || size_bytes % DISK_ALIGN != 0 {
            return Err(StoreError::Invalid(format!(
                "disk size {size_bytes} is not a positive multiple of {DISK_ALIGN} bytes"
            )));
        }
        let mut st = self.lock_state();
        let Err(pos) = st.meta.disk_index(name) else {
            return Err(StoreError::DiskExists(name.to_string()));
        };
        let mut new = st.meta.clone();
        let key = Store::new_version(&mut new, name, layout)?;
        new.disks.insert(
            pos,
            DiskRec {
                name: name.to_string(),
                size: size_bytes,
                trusted: key,
                candidate: 0,
                tee: None,
            },
        );
        self.commit(&mut st, new)?;
        info!("created disk {name:?} ({size_bytes} bytes), trusted version {key} ({layout})");
        Ok(VersionKey(key))
    }

    /// Adds a candidate version of `layout` to `disk` (which must not have one) and returns
    /// its key.
    pub fn add_version(&self, disk: &str, layout: &str) -> Result<VersionKey> {
        self.writable()?;
        check_layout_name(layout)?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let existing = st.meta.disks[i].candidate;
        if existing != 0 {
            return Err(StoreError::CandidateExists {
                disk: disk.to_string(),
                key: VersionKey(existing),
            });
        }
        let mut new = st.meta.clone();
        let key = Store::new_version(&mut new, disk, layout)?;
        new.disks[i].candidate = key;
        self.commit(&mut st, new)?;
        info!("added candidate version {key} ({layout}) to disk {disk:?}");
        Ok(VersionKey(key))
    }

    /// Makes `disk`'s candidate its trusted version and retires the former trusted version
    /// (removed, its extents freed, its presence map file removed). The disk's tee record, if
    /// any, goes with the candidate role. Returns the retired key.
    pub fn promote(&self, disk: &str) -> Result<VersionKey> {
        let (key, freed) = self.promote_deferred(disk)?;
        self.release(freed);
        Ok(key)
    }

    /// [`Store::promote`] in two steps, for a caller that holds a running disk's I/O while
    /// the roles change: this commits the swap (after it returns the retired version can
    /// write nothing, and its extents are free in the catalog); releasing the freed extents'
    /// space, which takes time proportional to their number, is left to
    /// [`Store::release`], to be called once I/O runs again. Dropping the [`Freed`] instead
    /// only leaves the space allocated in the data file until the extents are granted again.
    pub fn promote_deferred(&self, disk: &str) -> Result<(VersionKey, Freed)> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let d = &st.meta.disks[i];
        if d.candidate == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        let (old, cand) = (d.trusted, d.candidate);
        let mut new = st.meta.clone();
        new.disks[i].trusted = cand;
        new.disks[i].candidate = 0;
        new.disks[i].tee = None;
        let freed = remove_version(&mut new, old);
        crate::failpoint::hit("store-promote");
        self.commit_dropping(&mut st, new, &freed, &[old])?;
        info!(
            "disk {disk:?}: version {cand} promoted, version {old} retired ({} extents freed)",
            freed.len()
        );
        Ok((VersionKey(old), Freed { extents: freed }))
    }

    /// Removes `disk`'s candidate version, its tee record and its presence map file, and
    /// frees its extents. Returns its key.
    pub fn drop_candidate(&self, disk: &str) -> Result<VersionKey> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let cand = st.meta.disks[i].candidate;
        if cand == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        let mut new = st.meta.clone();
        new.disks[i].candidate = 0;
        new.disks[i].tee = None;
        let freed = remove_version(&mut new, cand);
        self.commit_freeing(&mut st, new, &freed, &[cand])?;
        info!(
            "disk {disk:?}: candidate version {cand} dropped ({} extents freed)",
            freed.len()
        );
        Ok(VersionKey(cand))
    }

    /// Deletes `name` and all its versions, freeing their extents and removing their presence
    /// map files. Returns how many extents were freed. Spaces still held for those versions
    /// can no longer write anything.
    pub fn delete_disk(&self, name: &str) -> Result<u32> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(name)
            .map_err(|_| StoreError::NoSuchDisk(name.to_string()))?;
        let mut new = st.meta.clone();
        let d = new.disks.remove(i);
        let mut freed = remove_version(&mut new, d.trusted);
        let mut dropped = vec![d.trusted];
        if d.candidate != 0 {
            freed.extend(remove_version(&mut new, d.candidate));
            dropped.push(d.candidate);
        }
        self.commit_freeing(&mut st, new, &freed, &dropped)?;
        info!("deleted disk {name:?} ({} extents freed)", freed.len());
        Ok(freed.len() as u32)
    }

    /// Sets (or replaces) `disk`'s tee record, in one commit. The disk must have a candidate.
    /// The reason is made one line and cut to 4096 bytes; a record that still breaks the
    /// format's rules (a policy or fault rule over 255 bytes, more than 16 fault rules, an
    /// active record with a reason) is refused with [`StoreError::Invalid`].
    pub fn set_tee(&self, disk: &str, tee: TeeRec) -> Result<()> {
        self.writable()?;
        let tee = TeeRec {
            reason: one_line_reason(&tee.reason),
            ..tee
        };
        let problems = tee_problems(&tee);
        if !problems.is_empty() {
            return Err(StoreError::Invalid(format!(
                "tee record for disk {disk:?} refused: {}",
                problems.join("; ")
            )));
        }
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        if st.meta.disks[i].candidate == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        let mut new = st.meta.clone();
        info!(
            "disk {disk:?}: tee record set (policy {:?}, {} fault rules, {})",
            tee.policy,
            tee.faults.len(),
            tee.state
        );
        new.disks[i].tee = Some(tee);
        self.commit(&mut st, new)
    }

    /// Quarantines `disk`'s candidate: its tee record's state becomes quarantined, with
    /// `reason` (made one line, cut to 4096 bytes; a blank one is recorded as
    /// `no reason given`) and the current time, in one commit. Already quarantined: nothing
    /// changes (the first reason is kept) and `Ok` is returned. A disk without a candidate gets
    /// [`StoreError::NoCandidate`], one without a tee record [`StoreError::NoTee`].
    pub fn quarantine(&self, disk: &str, reason: &str) -> Result<()> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let d = &st.meta.disks[i];
        if d.candidate == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        match &d.tee {
            None => return Err(StoreError::NoTee(disk.to_string())),
            Some(t) if t.state == TeeState::Quarantined => return Ok(()),
            Some(_) => {}
        }
        let cand = d.candidate;
        let mut reason = one_line_reason(reason);
        if reason.is_empty() {
            reason = "no reason given".into();
        }
        let mut new = st.meta.clone();
        if let Some(t) = new.disks[i].tee.as_mut() {
            t.state = TeeState::Quarantined;
            t.reason = reason.clone();
            t.changed = now();
        }
        self.commit(&mut st, new)?;
        warn!("disk {disk:?}: candidate version {cand} quarantined: {reason}");
        Ok(())
    }

    /// `disk`'s tee record, if it has one.
    pub fn tee(&self, disk: &str) -> Result<Option<TeeRec>> {
        self.lock_state()
            .meta
            .disk(disk)
            .map(|d| d.tee.clone())
            .ok_or_else(|| StoreError::NoSuchDisk(disk.to_string()))
    }

    /// The space of version `key`: what its layout reads, writes and commits through.
    pub fn space(self: &Arc<Self>, key: VersionKey) -> Result<Arc<dyn VersionSpace>> {
        Ok(self.file_space(key)?)
    }

    /// [`Store::space`], with the concrete type.
    pub fn file_space(self: &Arc<Self>, key: VersionKey) -> Result<Arc<FileSpace>> {
        self.version(key)?;
        let shared = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.0)
            .or_insert_with(|| {
                Arc::new(Shared {
                    violations: AtomicU64::new(0),
                    tiers: self.tiers.iter().map(|_| TierSync::default()).collect(),
                })
            })
            .clone();
        Ok(Arc::new(FileSpace {
            store: self.clone(),
            key,
            shared,
        }))
    }

    /// Writes refused so far for lack of a grant, by any space of version `key`.
    pub fn grant_violations(&self, key: VersionKey) -> u64 {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.0)
            .map_or(0, |c| c.violations.load(Ordering::Relaxed))
    }

    /// Grants `key` the lowest free extent of the store (`tier` `None`: [`StoreError::Full`]
    /// if there is none) or of tier `tier` ([`StoreError::TierFull`]).
    fn grant(&self, key: VersionKey, tier: Option<usize>) -> Result<ExtentId> {
        self.writable()?;
        let range = match tier {
            None => 0..self.header.extent_count,
            Some(t) => self
                .tiers
                .get(t)
                .ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "the store has no tier {t} (it has {}: {})",
                        self.tiers.len(),
                        self.tiers
                            .iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
                .range(),
        };
        // The extent is chosen under the metadata lock, zeroed without it (other versions'
        // root commits and grants go on meanwhile), then granted under it.
        let e = {
            let st = self.lock_state();
            st.meta
                .version_index(key.0)
                .map_err(|_| StoreError::NoSuchVersion(key))?;
            let mut granting = self.granting.lock().unwrap_or_else(|p| p.into_inner());
            let Some(e) = range
                .clone()
                .find(|&e| st.meta.owners.get(e as usize) == Some(&0) && !granting.contains(&e))
            else {
                return Err(match tier {
                    None => StoreError::Full,
                    Some(t) => StoreError::TierFull(self.tiers[t].name.clone()),
                });
            };
            granting.push(e);
            e
        };
        let done = self.grant_zeroed(key, e);
        self.granting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&g| g != e);
        done?;
        let t = &self.tiers[self.tier_of(e)];
        debug!("granted extent {e} (tier {}) to {key}", t.name);
        Ok(ExtentId(e))
    }

    /// Zeroes extent `e` (a hole: no data written, and not synced), then grants it to `key`
    /// in one metadata commit.
    ///
    /// The zeroing is not synced here: with gigabytes of dirty pages in the tier file an
    /// `fdatasync` takes seconds, and it is not needed. A granted extent reads as zeros at once
    /// (the hole is in the page cache and the file's extent map), so nothing a former owner
    /// wrote shows through while the store is open. After a crash the hole may be lost and the
    /// extent hold the former owner's bytes again, but no reader ever sees them: a layout
    /// reads a block of its extents only through a pointer of its committed tree (or of its
    /// live tree, to data it wrote in this run), and it commits a pointer only after a sync of
    /// the block's tier file that followed the block's write, which followed this zeroing; a
    /// block no pointer names is never read, neither by the guest nor by `store check --data`,
    /// the copy-out, the verification pass or the scrub. docs/format.md (*Grant*) and
    /// SECURITY.md give the whole argument.
    fn grant_zeroed(&self, key: VersionKey, e: u32) -> Result<()> {
        let size = self.header.extent_size;
        let ti = self.tier_of(e);
        let t = &self.tiers[ti];
        t.file
            .zero_range(u64::from(e - t.first) * size, size)
            .map_err(io_err(format!(
                "zeroing extent {e} (tier {}, {}) before granting it",
                t.name,
                t.path.display()
            )))?;
        let mut st = self.lock_state();
        let vi = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        if st.meta.owners.get(e as usize) != Some(&0) {
            return Err(StoreError::Invalid(format!(
                "extent {e} was taken while being zeroed for {key}"
            )));
        }
        let mut new = st.meta.clone();
        new.owners[e as usize] = key.0;
        new.versions[vi].extents.push(e);
        self.commit(&mut st, new)?;
        self.grants_write()[e as usize] = key.0;
        Ok(())
    }

    /// Syncs tier `t`'s data file; the caller holds its `sync_lock`. If the sync fails, every
    /// version with writes to the file that no successful sync covered may have lost them:
    /// each is marked ([`TierSync::lost`]) so that none of its later syncs claims them durable.
    fn sync_tier_locked(&self, t: usize) -> io::Result<()> {
        let tier = &self.tiers[t];
        let n = tier.syncs_started.fetch_add(1, Ordering::SeqCst) + 1;
        let done = tier.file.sync();
        if done.is_ok() {
            tier.last_good_sync.store(n, Ordering::SeqCst);
        }
        if let Err(e) = &done {
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            for (key, s) in shared.iter() {
                let ts = &s.tiers[t];
                if ts.started.load(Ordering::Acquire) > ts.synced.load(Ordering::Acquire)
                    && !ts.lost.swap(true, Ordering::AcqRel)
                {
                    error!(
                        "{}: a sync of tier {}'s data file {} failed ({e}) while version {key} \
                         had writes there that no sync had covered: they may be lost, so every \
                         later flush of the version fails until the store is reopened",
                        self.location.display(),
                        self.tiers[t].name,
                        self.tiers[t].path.display()
                    );
                }
            }
        }
        done
    }

    fn root(&self, key: VersionKey) -> Vec<u8> {
        self.lock_state()
            .meta
            .version(key.0)
            .map(|v| v.root.clone())
            .unwrap_or_default()
    }

    fn commit_root(&self, key: VersionKey, record: &[u8]) -> Result<()> {
        self.writable()?;
        if record.len() > MAX_ROOT {
            return Err(StoreError::RootTooLarge {
                len: record.len(),
                max: MAX_ROOT,
            });
        }
        let mut st = self.lock_state();
        let i = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        let mut new = st.meta.clone();
        new.versions[i].root = record.to_vec();
        self.commit(&mut st, new)
    }

    /// The tier of `extent` and the byte position of `[offset, offset + len)` of the extent in
    /// that tier's data file, if it lies inside the extent.
    fn locate(&self, extent: ExtentId, offset: u64, len: usize) -> Result<(usize, u64)> {
        let oob = StoreError::OutOfBounds {
            extent,
            offset,
            len,
        };
        if extent.0 >= self.header.extent_count {
            return Err(oob);
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.header.extent_size => {
                let t = self.tier_of(extent.0);
                let local = u64::from(extent.0 - self.tiers[t].first);
                Ok((t, local * self.header.extent_size + offset))
            }
            _ => Err(oob),
        }
    }
}

/// Free entries of the grant table `owners` in `range`.
fn free_in(owners: &[u64], range: Range<u32>) -> u32 {
    owners
        .get(range.start as usize..range.end as usize)
        .map_or(0, |r| r.iter().filter(|&&o| o == 0).count() as u32)
}

/// The tiers of `header` as [`TierStatus`], free counts from the grant table `owners`.
pub(crate) fn tier_status(header: &Header, dir: Option<&Path>, owners: &[u64]) -> Vec<TierStatus> {
    let mut first = 0u32;
    header
        .tiers
        .iter()
        .map(|t| {
            let s = TierStatus {
                name: t.name.clone(),
                path: resolve(dir, &t.path),
                first_extent: first,
                extents: t.extents,
                free: free_in(owners, first..first + t.extents),
            };
            first += t.extents;
            s
        })
        .collect()
}

/// Whether two paths name the same file, as far as their text says (`a/./b` and `a//b/` are
/// `a/b`; no link is followed).
fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

/// Why tier `t`'s data file (of header `h`) cannot hold the tier's extents, if it cannot: the
/// rest of a sentence that starts with the file's path.
pub(crate) fn tier_len_problem(
    file: &dyn StoreFile,
    h: &Header,
    t: usize,
) -> Result<Option<String>> {
    let len = file.size().map_err(io_err(format!(
        "reading the size of tier {}'s data file",
        h.tiers[t].name
    )))?;
    let want = h.tier_file_len(t);
    Ok((len < want).then(|| {
        format!(
            "is {len} bytes, shorter than the tier's {} extents of {} {}({want} bytes)",
            h.tiers[t].extents,
            human_size(h.extent_size),
            if h.has_tier_headers() {
                "and its tier header "
            } else {
                ""
            }
        )
    }))
}

/// Whether `path` names something other than a regular file (a device, a directory, a FIFO;
/// a symlink is followed): what a tier file never is. The rest of a sentence after the path.
pub(crate) fn not_a_regular_file(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Some(format!(
            "is not a regular file ({}): a tier's data file is one",
            kind_of(&m)
        )),
        _ => None,
    }
}

fn kind_of(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// A format-3 store names its tier files by path and they carry nothing that proves they are
/// its own: one inside the store's directory (a plain file name, like `data.0`, not a symlink)
/// is the store's
/// (the directory came with `store.meta`), but one elsewhere could be any host file the
/// metadata was edited to name. Such a store is opened (to be upgraded, which writes into the
/// files) only when the operator says so ([`Store::open_adopting_tiers`]).
pub(crate) fn unproven_tier(h: &Header, dir: &Path) -> Result<()> {
    if h.version != 3 {
        return Ok(());
    }
    // A plain file name, and not a symlink (which could lead anywhere).
    let inside = |p: &Path| {
        let mut c = p.components();
        matches!(
            (c.next(), c.next()),
            (Some(std::path::Component::Normal(_)), None)
        ) && !std::fs::symlink_metadata(dir.join(p)).is_ok_and(|m| m.file_type().is_symlink())
    };
    match h.tiers.iter().find(|t| !inside(&t.path)) {
        None => Ok(()),
        Some(t) => Err(StoreError::TierFile {
            tier: t.name.clone(),
            path: resolve(Some(dir), &t.path),
            problem: format!(
                "is outside the store's directory, and this format-3 store cannot prove the file is \
                 its own (format 4 writes a header into each tier file). If the tier table names \
                 this store's files (`dovetail store check` lists them), run `dovetail store upgrade {}` \
                 once to adopt them",
                dir.display()
            ),
        }),
    }
}

/// Opens a tier's data file (read-write unless `read_only`); `None` if it does not exist. A
/// symlink or anything but a regular file there is refused.
pub(crate) fn open_tier_file(path: &Path, read_only: bool) -> Result<Option<File>> {
    match crate::safefs::open_file(path, !read_only) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io {
            op: format!("opening {}", path.display()),
            source: e,
        }),
    }
}

/// Opens a tier's data file as the header records it (`recorded`; `path` is it resolved
/// against the store's directory `dir`): a relative path through the directory's descriptor,
/// following no symlink on the way ([`crate::safefs::Dir::open_below`]), an absolute one (a
/// file on another device) by path without following a symlink at its last component
/// ([`open_tier_file`]). `None` if it does not exist.
pub(crate) fn open_tier_in(
    dir: &crate::safefs::Dir,
    recorded: &Path,
    path: &Path,
    read_only: bool,
) -> Result<Option<File>> {
    if recorded.is_absolute() {
        return open_tier_file(path, read_only);
    }
    match dir.open_below(recorded, !read_only) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io {
            op: format!("opening {}", path.display()),
            source: e,
        }),
    }
}

/// Opens `dir`'s metadata file read-only without any lock (beside a writer), through the
/// directory's descriptor, never following a symlink, a regular file only.
pub(crate) fn open_meta_unlocked(dir: &Path) -> Result<(File, PathBuf)> {
    let meta_path = dir.join(META_FILE);
    let meta = crate::safefs::Dir::open(dir)
        .and_then(|d| d.open_file(META_FILE, false))
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NoStore(dir.to_path_buf()),
            _ => StoreError::Io {
                op: format!("opening {}", meta_path.display()),
                source: e,
            },
        })?;
    Ok((meta, meta_path))
}

/// Opens a store directory's metadata file, locked.
pub(crate) fn open_files(dir: &Path, read_only: bool) -> Result<(File, PathBuf)> {
    let meta_path = dir.join(META_FILE);
    // Through the directory's descriptor, never following a symlink, a regular file only.
    let meta = crate::safefs::Dir::open(dir)
        .and_then(|d| d.open_file(META_FILE, !read_only))
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NoStore(dir.to_path_buf()),
            _ => StoreError::Io {
                op: format!("opening {}", meta_path.display()),
                source: e,
            },
        })?;
    let mode = if read_only {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    if !lock(&meta, mode).map_err(io_err(format!("locking {}", meta_path.display())))? {
        return Err(StoreError::InUse(dir.to_path_buf()));
    }
    Ok((meta, meta_path))
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

impl std::fmt::Debug for FileSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSpace")
            .field("store", &self.store.location)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl FileSpace {
    /// The store this space belongs to.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes every write of this version to tier `t` counted so far durable, syncing the
    /// tier's file unless a sync that finished already covers them.
    fn sync_tier(&self, t: usize) -> io::Result<()> {
        let ts = &self.shared.tiers[t];
        ts.check_lost(self.key.0)?;
        let want = ts.written.load(Ordering::Acquire);
        if ts.synced.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let tier = &self.store.tiers[t];
        // Every sync numbered above this one starts after the writes counted in `want`.
        let before = tier.syncs_started.load(Ordering::SeqCst);
        let _one = tier.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        ts.check_lost(self.key.0)?;
        if ts.synced.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        if tier.last_good_sync.load(Ordering::SeqCst) > before {
            // Another version's sync covered them while this one waited.
            ts.synced.fetch_max(want, Ordering::AcqRel);
            return Ok(());
        }
        let covered = ts.written.load(Ordering::Acquire);
        self.store.sync_tier_locked(t)?;
        ts.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }
}

impl VersionSpace for FileSpace {
    fn key(&self) -> VersionKey {
        self.key
    }

    fn extent_size(&self) -> u64 {
        self.store.header.extent_size
    }

    fn extents(&self) -> Vec<ExtentId> {
        self.store
            .version(self.key)
            .map(|v| v.extents)
            .unwrap_or_default()
    }

    fn grant_extent(&self) -> Result<ExtentId> {
        self.store.grant(self.key, None)
    }

    fn tiers(&self) -> Vec<TierInfo> {
        self.store.tiers()
    }

    fn extent_tier(&self, extent: ExtentId) -> usize {
        self.store.extent_tier(extent)
    }

    fn grant_extent_on(&self, tier: usize) -> Result<ExtentId> {
        self.store.grant(self.key, Some(tier))
    }

    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (t, at) = self.store.locate(extent, offset, buf.len())?;
        self.store.tiers[t]
            .file
            .read_at(at, buf)
            .map_err(|source| StoreError::Io {
                op: format!(
                    "reading {} bytes at {extent}+{offset} for {}",
                    buf.len(),
                    self.key
                ),
                source,
            })
    }

    unsafe fn read_raw(&self, extent: ExtentId, offset: u64, iov: &[libc::iovec]) -> Result<()> {
        let len = crate::file::iov_len(iov);
        let (t, at) = self.store.locate(extent, offset, len)?;
        // SAFETY: the caller's promise on `iov` is passed on unchanged.
        unsafe { self.store.tiers[t].file.read_raw(at, iov) }.map_err(|source| StoreError::Io {
            op: format!("reading {len} bytes at {extent}+{offset} for {}", self.key),
            source,
        })
    }

    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> Result<()> {
        let (t, at) = self.store.locate(extent, offset, buf.len())?;
        self.store.writable()?;
        // Held through the write: an extent cannot be taken away while a write to it runs.
        let grants = self.store.grants_read();
        if grants[extent.0 as usize] != self.key.0 {
            let n = self.shared.violations.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 10 || n % 1000 == 0 {
                warn!(
                    "refused a write of {} bytes by {} to {extent} at offset {offset}: not granted to it ({n} refused so far)",
                    buf.len(),
                    self.key
                );
            }
            return Err(StoreError::GrantViolation {
                key: self.key,
                extent,
                offset,
            });
        }
        // Counted before the write (a sync failing while it runs may lose it) and after it,
        // written or not (a failed write may have written part).
        self.shared.tiers[t].started.fetch_add(1, Ordering::AcqRel);
        let done = self.store.tiers[t].file.write_at(at, buf);
        self.shared.tiers[t].written.fetch_add(1, Ordering::AcqRel);
        done.map_err(|source| StoreError::Io {
            op: format!(
                "writing {} bytes at {extent}+{offset} for {}",
                buf.len(),
                self.key
            ),
            source,
        })
    }

    fn punch(&self, extent: ExtentId, offset: u64, len: u64) -> Result<()> {
        let n = usize::try_from(len).map_err(|_| StoreError::OutOfBounds {
            extent,
            offset,
            len: usize::MAX,
        })?;
        let (t, at) = self.store.locate(extent, offset, n)?;
        self.store.writable()?;
        // Held through the punch, as for a write: the extent stays this version's meanwhile.
        let grants = self.store.grants_read();
        if grants[extent.0 as usize] != self.key.0 {
            self.shared.violations.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::GrantViolation {
                key: self.key,
                extent,
                offset,
            });
        }
        self.store.tiers[t]
            .file
            .zero_range(at, len)
            .map_err(|source| StoreError::Io {
                op: format!(
                    "releasing {len} bytes at {extent}+{offset} for {}",
                    self.key
                ),
                source,
            })
    }

    /// Syncs the data file of every tier this version (through any of its spaces) wrote to
    /// since a sync covering those writes; a tier it did not write to is left alone. Fails for
    /// good once a sync of a tier's file failed while this version had unsynced writes there
    /// (see [`TierSync::lost`]).
    fn sync(&self) -> Result<()> {
        for (t, tier) in self.store.tiers.iter().enumerate() {
            self.sync_tier(t).map_err(io_err(format!(
                "syncing tier {}'s data file {}",
                tier.name,
                tier.path.display()
            )))?;
        }
        Ok(())
    }

    fn root(&self) -> Vec<u8> {
        self.store.root(self.key)
    }

    fn commit_root(&self, record: &[u8]) -> Result<()> {
        self.store.commit_root(self.key, record)
    }

    fn grant_violations(&self) -> u64 {
        self.shared.violations.load(Ordering::Relaxed)
    }

    fn release_extent(&self, extent: ExtentId) -> Result<()> {
        self.store.ungrant(self.key, extent)
    }
}
