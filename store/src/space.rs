//! The seam between the store and a layout version: a `VersionSpace` is the part of the shared
//! store one version may use. It hands out extents (each granted to the version's key, durably,
//! before it is returned), reads anywhere in the version's extents, writes only where a grant
//! allows, and keeps one small root record per version that is replaced atomically.
//!
//! A layout (parallax-v1, ...) manages blocks *inside* its extents itself; the store knows
//! extents and grants, never blocks.

use std::fmt;
use std::path::PathBuf;

/// Identifies one version (one layout instance holding one disk's data). Key 0 is never used:
/// on disk it marks a free extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionKey(pub u64);

/// Index of an extent in the store's data file (extent `i` covers bytes
/// `[i * extent_size, (i + 1) * extent_size)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtentId(pub u32);

impl fmt::Display for VersionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "version {}", self.0)
    }
}

impl fmt::Display for ExtentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "extent {}", self.0)
    }
}

/// A shared block of the store's pool (single-instance blocks): block `block` (4096 bytes at
/// `4096 · block`) of `extent`, an extent granted to the pool, never to a version. A version
/// may reference it only while it holds it (handed out by [`VersionSpace::share`]); no version
/// can write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedRef {
    pub extent: ExtentId,
    pub block: u32,
}

impl fmt::Display for SharedRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shared block {} of {}", self.block, self.extent)
    }
}

/// One tier of a store: a data file of its own (a fast and a slow device, say), holding a
/// contiguous range of the store's extents. A store created without tiers has one, `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierInfo {
    /// The tier's name (`[a-z0-9_-]`, 1 to 16 bytes).
    pub name: String,
    /// Extents of the tier.
    pub extents: u32,
    /// Extents of the tier not granted to any version.
    pub free: u32,
}

/// Errors of the store and of a version's space.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A write outside the extents granted to the writing version. Nothing was written.
    #[error("{key} may not write to {extent} (offset {offset} in the extent): not granted to it")]
    GrantViolation {
        key: VersionKey,
        extent: ExtentId,
        offset: u64,
    },
    /// A read or write that does not fit inside one extent, or an extent that does not exist.
    #[error("{extent}+{offset}, {len} bytes, is outside the extent or the store")]
    OutOfBounds {
        extent: ExtentId,
        offset: u64,
        len: usize,
    },
    /// No free extent is left.
    #[error("the store has no free extent left")]
    Full,
    /// No free extent is left in the tier a grant asked for (named); other tiers may have some.
    #[error("tier {0} has no free extent left")]
    TierFull(String),
    /// A tier's data file is missing, or shorter than the tier's extents.
    #[error("tier {tier}: {path} {problem}")]
    TierFile {
        tier: String,
        path: PathBuf,
        problem: String,
    },
    /// The root record does not fit in the space the format reserves for it.
    #[error("root record of {len} bytes is larger than the {max} bytes allowed")]
    RootTooLarge { len: usize, max: usize },
    /// Metadata failed its checksum or is otherwise unreadable.
    #[error("store metadata is corrupt: {0}")]
    Corrupt(String),
    /// The store was written by an incompatible format version.
    #[error("store format version {found} is not supported by this binary (it reads version {supported})")]
    Version { found: u32, supported: u32 },
    /// An I/O error on the store's files.
    #[error("{op} failed")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The metadata file does not start with the store's magic: not a store at all.
    #[error("{path} is not a Dovetail store: {reason}")]
    NotAStore { path: PathBuf, reason: String },
    /// `open` or `check` on a directory without a store.
    #[error("no store at {0} ({META} is missing)", META = crate::META_FILE)]
    NoStore(PathBuf),
    /// `create` on a directory that already holds a store, or files of one.
    #[error("{0} already exists; a store is never created over existing files")]
    StoreExists(PathBuf),
    /// Another process has the store open (an advisory lock on the metadata file).
    #[error("the store at {0} is in use by another process")]
    InUse(PathBuf),
    /// A disk of a shared store another process owns (holds its lock): `owner` names it.
    #[error("disk {} is owned by another daemon ({owner}); `dovetail ctl takeover` fences it and takes the disk over", crate::names::shown(.disk))]
    DiskOwned { disk: String, owner: String },
    /// A request the store cannot carry out as asked (a bad size, name, ...).
    #[error("{0}")]
    Invalid(String),
    /// `create_disk` with a name the catalog already holds.
    #[error("a disk named {0:?} already exists in the store")]
    DiskExists(String),
    /// A disk name the catalog does not hold.
    #[error("the store has no disk named {}", crate::names::shown(.0))]
    NoSuchDisk(String),
    /// A version key the catalog does not hold (never created, or deleted).
    #[error("the store has no {0}")]
    NoSuchVersion(VersionKey),
    /// `add_version` on a disk that already has a candidate version.
    #[error("disk {disk:?} already has a candidate ({key})")]
    CandidateExists { disk: String, key: VersionKey },
    /// `promote`, `drop_candidate`, `set_tee` or `quarantine` on a disk without a candidate
    /// version.
    #[error("disk {0:?} has no candidate version")]
    NoCandidate(String),
    /// `quarantine` on a disk without a tee record.
    #[error("disk {0:?} has no tee record")]
    NoTee(String),
    /// The catalog (versions, disks, root records) has outgrown the metadata slot.
    #[error("the store's metadata would take {needed} bytes, more than the {max} bytes of a metadata slot")]
    MetadataFull { needed: usize, max: usize },
    /// A shared block whose bytes no longer match the checksum recorded when it was written:
    /// damage of the one physical copy every version holding it reads (not a disagreement of
    /// those versions).
    #[error("{block} is corrupt: its checksum is {found:#010x}, {expected:#010x} was recorded when it was written (every version sharing it reads this copy)")]
    SharedCorrupt {
        block: SharedRef,
        expected: u32,
        found: u32,
    },
    /// A change to a store opened read-only.
    #[error("the store is open read-only")]
    ReadOnly,
}

impl StoreError {
    /// A grant found no free extent: [`StoreError::Full`] (the whole store) or
    /// [`StoreError::TierFull`] (the tier asked for).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full | StoreError::TierFull(_))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The part of the shared store one version may use.
///
/// Durability: `write` is visible to later `read`s at once and durable after `sync`;
/// `grant_extent` and `commit_root` are durable when they return. A layout commits by `sync`
/// (its data and tree blocks) followed by `commit_root` (the record that points at them).
pub trait VersionSpace: Send + Sync + fmt::Debug {
    /// The version this space belongs to.
    fn key(&self) -> VersionKey;
    /// Bytes per extent (a multiple of 4096).
    fn extent_size(&self) -> u64;
    /// The extents granted to this version, in the order they were granted.
    fn extents(&self) -> Vec<ExtentId>;
    /// Grants a free extent to this version, durably, and returns it. It reads as zeros; after
    /// a crash, bytes of it that no `sync` covered since the grant may read as what the extent
    /// held before (a former owner's): a layout must read only blocks it wrote and synced
    /// before committing a pointer to them (docs/format.md, *Grant*).
    fn grant_extent(&self) -> Result<ExtentId>;
    /// Reads `buf.len()` bytes at `offset` in `extent` (any extent of the store).
    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// [`read`](VersionSpace::read) into memory this process does not own as Rust data (a
    /// guest's RAM): the iovecs' total length at `offset` in `extent`. The default goes through
    /// a temporary buffer; a file-backed space reads straight into the iovecs.
    ///
    /// # Safety
    ///
    /// Every iovec must be valid for writes of its whole length for the duration of the call.
    unsafe fn read_raw(&self, extent: ExtentId, offset: u64, iov: &[libc::iovec]) -> Result<()> {
        let mut tmp = vec![0u8; crate::file::iov_len(iov)];
        self.read(extent, offset, &mut tmp)?;
        // SAFETY: the caller's promise on `iov` is passed on unchanged; `tmp` is ours.
        unsafe { crate::file::copy_to_iovecs(&tmp, iov) };
        Ok(())
    }
    /// Whether the space's files are opened for direct I/O, so
    /// [`direct_target`](VersionSpace::direct_target) may give ranges (cheap; a hint only).
    fn direct_io(&self) -> bool {
        false
    }
    /// Where `len` bytes at `offset` in `extent` can be read with I/O submitted by the caller
    /// (a queue worker's io_uring) instead of [`read_raw`](VersionSpace::read_raw):
    /// `Some((descriptor, file offset, alignment))` when the extent lies in a tier file opened
    /// for direct I/O and the range is aligned (buffers must be aligned to the alignment too).
    /// The descriptor stays open while the space lives. `None` (the default): use `read_raw`.
    fn direct_target(
        &self,
        extent: ExtentId,
        offset: u64,
        len: usize,
    ) -> Option<(std::os::unix::io::RawFd, u64, usize)> {
        let _ = (extent, offset, len);
        None
    }
    /// Whether the space's data is read asynchronously, so
    /// [`aio_target`](VersionSpace::aio_target) may give ranges (cheap; a hint only).
    fn aio_reads(&self) -> bool {
        false
    }
    /// Where `len` bytes at `offset` in `extent` can be read asynchronously by the caller (a
    /// queue worker) instead of [`read_raw`](VersionSpace::read_raw): the source and the
    /// offset to hand it (a store on RADOS: the range lies in one object with no write in
    /// flight). The source stays usable while the caller holds it. `None` (the default): use
    /// `read_raw`.
    fn aio_target(
        &self,
        extent: ExtentId,
        offset: u64,
        len: usize,
    ) -> Option<(std::sync::Arc<dyn crate::aio::AioRead>, u64)> {
        let _ = (extent, offset, len);
        None
    }
    /// Writes `buf` at `offset` in `extent`; refused with [`StoreError::GrantViolation`] (and
    /// counted) unless the extent is granted to this version.
    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> Result<()>;
    /// Where a write of `len` bytes at `offset` in `extent` can be submitted by the caller
    /// itself (a queue worker's io_uring) instead of [`write`](VersionSpace::write):
    /// `Some((descriptor, file offset, alignment, tier))` when the extent lies in a tier file
    /// opened for direct I/O, the range is aligned, and a `write` would be accepted now (the
    /// store writable, no lost writes, the extent granted to this version). The write is then
    /// counted as started, as `write` counts it, so that [`sync`](VersionSpace::sync) covers
    /// it: the caller must call [`direct_write_done`](VersionSpace::direct_write_done) with
    /// the tier once it ended (written or not), before it asks for a sync that must cover it.
    /// The caller keeps the extent referenced (so not released) until then. `None` (the
    /// default): use `write`.
    fn direct_write_target(
        &self,
        extent: ExtentId,
        offset: u64,
        len: usize,
    ) -> Option<(std::os::unix::io::RawFd, u64, usize, usize)> {
        let _ = (extent, offset, len);
        None
    }
    /// A write of [`direct_write_target`](VersionSpace::direct_write_target) on `tier` ended.
    fn direct_write_done(&self, tier: usize) {
        let _ = tier;
    }
    /// Makes every completed `write` durable.
    fn sync(&self) -> Result<()>;
    /// Releases the host space of `len` bytes at `offset` in `extent`, which the version no
    /// longer uses (a hole, reading back as zeros): refused like a [`write`] unless the extent
    /// is granted to this version. Only about space: whether the hole survives a crash does
    /// not matter, as nothing reads those bytes before writing them again. The default does
    /// nothing.
    ///
    /// [`write`]: VersionSpace::write
    fn punch(&self, extent: ExtentId, offset: u64, len: u64) -> Result<()> {
        let _ = (extent, offset, len);
        Ok(())
    }
    /// Gives `extent` back to the store, durably: it is no longer granted to this version
    /// (a later write there is a grant violation) and its space is released. Only for an
    /// extent no committed root record or snapshot of the version references any more, after
    /// the commit that stopped referencing it is durable. The default refuses (a space that
    /// cannot take extents back).
    fn release_extent(&self, extent: ExtentId) -> Result<()> {
        Err(StoreError::Invalid(format!(
            "this space cannot take back {extent}"
        )))
    }
    /// The version's last committed root record (empty for a new version).
    fn root(&self) -> Vec<u8>;
    /// Durably and atomically replaces the root record: after a crash, `root()` returns either
    /// the old record or this one, never a mix.
    fn commit_root(&self, record: &[u8]) -> Result<()>;
    /// Writes refused so far for lack of a grant.
    fn grant_violations(&self) -> u64;
    /// The store's tiers, in index order (at least one). The default is one tier, `default`,
    /// whose counts are unknown (zero).
    fn tiers(&self) -> Vec<TierInfo> {
        vec![TierInfo {
            name: "default".to_string(),
            extents: 0,
            free: 0,
        }]
    }
    /// The index of the tier holding `extent`.
    fn extent_tier(&self, _extent: ExtentId) -> usize {
        0
    }
    /// Grants a free extent of tier `tier` to this version, durably, and returns it (the lowest
    /// free one of the tier); [`StoreError::TierFull`] when that tier has none left (whatever
    /// the other tiers have: [`StoreError::is_full`] matches both full errors), and
    /// [`StoreError::Invalid`] for a tier the store does not have. The default serves a store
    /// of one tier through [`VersionSpace::grant_extent`].
    fn grant_extent_on(&self, tier: usize) -> Result<ExtentId> {
        if tier == 0 {
            self.grant_extent()
        } else {
            Err(StoreError::Invalid(format!("the store has no tier {tier}")))
        }
    }

    // Single-instance blocks (docs/format.md, *Shared pool*). A version with them on asks the
    // store to keep a whole 4 KiB block once: `share` returns a pool block holding exactly
    // those bytes, which the version then references instead of writing a block of its own.
    // The hold is pending until the version's next `commit_root` (which makes it durable in
    // the same atomic metadata commit as the root record that references it); `release_shared`
    // drops it, also at the next `commit_root`. A pool block held by no version is free.

    /// Whether this version may share blocks (the store's single-instance flag). The default:
    /// no.
    fn single_instance(&self) -> bool {
        false
    }
    /// A pool block holding exactly `data` (4096 bytes), now held by this version (pending
    /// until its next [`commit_root`](VersionSpace::commit_root)): an existing one with the
    /// same bytes (compared byte for byte, not only by hash), or a new one written with them.
    /// `None` when the version should write a block of its own instead: single-instance off,
    /// the pool full, or the version already holding a block with these bytes (a version
    /// references each pool block from one place at most). The default: `None`.
    fn share(&self, data: &[u8]) -> Result<Option<SharedRef>> {
        let _ = data;
        Ok(None)
    }
    /// Drops this version's hold on `block` at its next `commit_root` (call it when the root
    /// about to be committed no longer references the block). Refused unless the version holds
    /// it.
    fn release_shared(&self, block: SharedRef) -> Result<()> {
        Err(StoreError::Invalid(format!(
            "this space holds no shared block ({block})"
        )))
    }
    /// Whether this version holds `block` now (committed or pending).
    fn holds_shared(&self, block: SharedRef) -> bool {
        let _ = block;
        false
    }
    /// The shared blocks this version holds now (committed or pending), ascending.
    fn held_shared(&self) -> Vec<SharedRef> {
        Vec::new()
    }
    /// Reads shared `block` (4096 bytes) and checks it against the checksum recorded when it
    /// was written: [`StoreError::SharedCorrupt`] when they differ. The default reads without
    /// checking.
    fn read_shared(&self, block: SharedRef, buf: &mut [u8]) -> Result<()> {
        self.read(block.extent, u64::from(block.block) * 4096, buf)
    }
    /// A mark in this version's sequence of `share`/`release_shared` calls: a
    /// [`commit_root_cut`](VersionSpace::commit_root_cut) with it commits the calls made before
    /// the mark only (a layout whose commit captures its tree while requests go on takes the
    /// mark at the capture).
    fn shared_cut(&self) -> u64 {
        0
    }
    /// [`commit_root`](VersionSpace::commit_root), making durable only the shares and releases
    /// made before `cut` (from [`shared_cut`](VersionSpace::shared_cut)); later ones stay
    /// pending. The default commits the root.
    fn commit_root_cut(&self, record: &[u8], cut: u64) -> Result<()> {
        let _ = cut;
        self.commit_root(record)
    }
}
