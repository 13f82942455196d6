//! The `parallax-v1` and `parallax-v2` layouts: a Parallax-style virtual disk living in a [`VersionSpace`]. The disk
//! is cut into 4 KiB blocks, found through a radix tree of block pointers (4 KiB nodes of 508
//! entries); unwritten blocks have a null pointer, read as zeroes and take no space.
//!
//! Crash safety is by shadow paging: a block reachable from the last committed root or from a
//! snapshot is never overwritten in place. A change copies the block (and the path of nodes above
//! it) to blocks allocated since the last commit (the current epoch), which may be rewritten in
//! place. `flush` writes the changed nodes, syncs the space and commits a root record that points
//! at the new tree; after a crash the version reopens on the last committed tree.
//!
//! Snapshots freeze a committed tree by recording its root; later writes copy the path. Free
//! space is tracked in memory (see [`alloc`]) and rebuilt at open by a sweep from the live root
//! and every snapshot root; a block superseded at run time is freed at the next commit unless a
//! snapshot may still reference it, in which case only the sweep that follows a snapshot's
//! deletion frees it. The format is specified byte by byte in docs/format.md.
//!
//! `parallax-v2` is the same tree, plus per-block annotations (`dovetail_annotations`): read and
//! write counts, last access epochs, the access pattern and taint labels. They are kept in
//! memory, updated by every guest request (a few atomic operations), and stored as annotation
//! pages in tree blocks past the guest's last block, so they are copy-on-write, committed and
//! snapshotted with the data. Dirty pages are written at every commit (each FLUSH that changed
//! anything, each snapshot) and by a timer (every [`ParallaxOptions::persist_every`]), so after
//! a crash the annotations are those of the last commit: they lag by at most one persistence
//! interval, and are never garbage (each page is checksummed; a bad page is reported and reset).
//! The root record names the taint labels and which are on.
//!
//! This file holds the types and the helpers the other files share; the code lives in one
//! file per concern: `open` (create and open), `requests` (read, write, flush, discard, write
//! zeroes), `lookup` (the node cache and the walks from a root), `tree` (changing, committing
//! and sweeping the tree), `commit` (the state's locks, group commit, the persistence timer),
//! `snapshots`, `labels` (annotations and taint labels), `status` (usage and checks) and
//! `check` ([`ParallaxCheck`]); beside them the allocator, node cache, checksums, codec,
//! tiering, replicas, reserve, stripes and mover, each in its own file.

mod alloc;
mod batch;
mod cache;
mod check;
mod codec;
mod commit;
pub mod format;
mod groups;
mod grow;
pub mod grow_live;
mod labels;
mod lookup;
mod mover;
mod open;
mod punch;
mod replicas;
mod requests;
mod reserve;
mod shared;
pub mod snapshots;
mod status;
mod stripes;
mod sumpage;
mod sums;
mod tree;

pub use self::format::Placed;
/// A checksum page's codec (docs/format.md, "Checksum page"), for the fuzz target and tools.
pub use self::sumpage::{
    decode_page as decode_sums_page, encode_page as encode_sums_page, PER_PAGE as SUMS_PER_PAGE,
};
pub use dovetail_tiering::{
    Class, ClassPolicy, ClassUsage, Mover, MoverEvent, PassReport, TierPolicy, TierStatus, Tiered,
};

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use dovetail_annotations::{Epochs, Table};

use dovetail_store::{ExtentId, VersionSpace};

use self::alloc::Allocator;
use self::cache::NodeCache;
use self::format::{
    annotation_pages, depth_for, disk_blocks, show_ptr, span, split_ptr, Node, RootRecord,
    SnapshotRecord, V2Ext, BLOCK_SIZE, MAX_LABELS, NULL, SECTORS_PER_BLOCK,
};
use crate::{
    buffer_sectors, check_range, BlockLayout, Error, IoBufs, Result, Sector, Sectors, SECTOR_SIZE,
};

/// The layout names this module serves.
pub const LAYOUTS: &[&str] = &["parallax-v1", "parallax-v2"];

/// Seconds per annotation epoch of a new parallax-v2 disk (the last-access times' unit).
pub const EPOCH_SECS: u32 = 600;

/// Tuning of a parallax instance (nothing here is persisted).
#[derive(Debug, Clone, Copy)]
pub struct ParallaxOptions {
    /// Memory for clean cached tree nodes, in bytes (dirty nodes come on top, and are written
    /// back once they exceed the same amount).
    pub cache_bytes: usize,
    /// parallax-v2: how often changed annotations are committed when no FLUSH or snapshot did
    /// it (the most they can lag after a crash); `None`: only at commits.
    pub persist_every: Option<Duration>,
}

impl Default for ParallaxOptions {
    fn default() -> ParallaxOptions {
        ParallaxOptions {
            cache_bytes: 16 << 20,
            persist_every: Some(Duration::from_secs(5)),
        }
    }
}

/// A taint label of a parallax-v2 disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub name: String,
    /// Its bit in a block's taint set.
    pub bit: u8,
    /// Blocks written now get it.
    pub active: bool,
}

/// A snapshot, as listed by [`Parallax::snapshots`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// The commit generation the snapshot froze.
    pub generation: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

impl From<&SnapshotRecord> for SnapshotInfo {
    fn from(s: &SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            name: s.name.clone(),
            generation: s.gen,
            created: s.created,
        }
    }
}

/// Space accounting, in 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Extents granted to the version.
    pub extents: usize,
    /// Blocks in those extents.
    pub total: u64,
    /// Blocks not available for allocation (live, committed, snapshot or pending-free).
    pub used: u64,
    /// Blocks available for allocation.
    pub free: u64,
    /// Superseded blocks that the next commit frees.
    pub pending: u64,
}

/// A parallax-v1 disk, writable. See the [module documentation](self).
pub struct Parallax {
    inner: Arc<Inner>,
}

/// A read-only view of one snapshot; every write-like call fails with [`Error::ReadOnly`].
pub struct ParallaxSnapshot {
    inner: Arc<Inner>,
    record: SnapshotRecord,
}

struct Inner {
    space: Arc<dyn VersionSpace>,
    /// What the guest sees.
    capacity: Sectors,
    /// What the tree covers: the guest's blocks, then (parallax-v2) the annotation pages.
    tree_capacity: Sectors,
    /// Blocks of the tree (the last guest block may be partly past the capacity).
    blocks: u64,
    /// parallax-v2: the annotations.
    ann: Option<Ann>,
    /// parallax-v2 (extension version 3): the live tree's data block checksums, and the tree
    /// block of checksum page 0.
    sums: Option<(sumpage::Sums, u64)>,
    depth: u8,
    /// Held by every commit from its capture to its end, so commits are published in order.
    /// Lock order: `committing`, `stripes`, `state`, `cache`.
    committing: Mutex<()>,
    /// Group commit: which commits started their capture, and which are durable.
    group: Mutex<GroupCommit>,
    /// A request holds its blocks' stripes (see [`stripes`]).
    stripes: stripes::Stripes,
    /// Whole-block writes between their tree change and the end of their data write.
    inflight: stripes::Inflight,
    /// Extents granted ahead of need ([`Parallax::start_reserve`]).
    reserve: Arc<reserve::Reserve>,
    /// parallax-v2: the freed runs punched after their commit, off its path ([`punch`]).
    punches: Arc<punch::Punches>,
    /// Lock order: `state`, then `cache`. Readers look nodes up under the cache's shared lock
    /// and take it exclusively only to insert a node they had to read.
    state: RwLock<State>,
    cache: RwLock<NodeCache>,
    /// parallax-v2: blocks live in extent groups (block classes, replication).
    tiered: bool,
    /// The extent groups (lock order: after `state` and `cache`; held only briefly).
    groups: RwLock<groups::GroupMap>,
    /// The mover's view of block temperatures.
    temps: std::sync::Mutex<dovetail_tiering::Temps>,
    counters: groups::TierCounters,
    /// Set by [`Parallax::close`]: nothing more is committed (the version was reopened, e.g.
    /// grown, by another handle).
    closed: std::sync::atomic::AtomicBool,
    /// Single-instance blocks: the pool extents the tree may point into ([`shared`]).
    pool: shared::PoolView,
    /// While a live grow prepares its tables ([`grow_live`]): the annotation and checksum
    /// pages whose dirty marks commits took meanwhile.
    grow_watch: Mutex<Option<GrowWatch>>,
}

struct State {
    /// Root of the live tree (equal to the committed root right after a commit).
    root: u64,
    /// Root of the last committed tree.
    committed_root: u64,
    /// The last committed generation; nodes written now carry `gen + 1`.
    gen: u64,
    snapshots: Vec<SnapshotRecord>,
    alloc: Allocator,
    /// Blocks (global indexes) superseded since the last commit, freed by the next one.
    pending: Vec<u64>,
    /// Whether anything changed since the last commit.
    changed: bool,
    /// Nodes a commit captured but failed to make durable: the next commit writes them.
    retry: Vec<(u64, Box<[u8; BLOCK_SIZE]>)>,
    /// While a sweep walks the committed trees without the state lock
    /// ([`Inner::sweep_concurrent`]): the blocks marked shared that the live tree stopped
    /// referencing meanwhile.
    sweeping: Option<Vec<u64>>,
    /// parallax-v2: epochs and labels (the root record's extension).
    v2: Option<V2Ext>,
    /// parallax-v2: the tiering policy and spare extents.
    place: Option<groups::Placement>,
    /// Pool pointers the live tree stopped referencing while a snapshot might still
    /// reference them: released by the next sweep ([`shared`]).
    pool_deferred: Vec<u64>,
    /// A commit in flight records snapshots: pool releases wait for the sweep ([`shared`]).
    pool_keep: bool,
    /// The blocks (pointers) the commit in flight writes or releases without the state lock
    /// once captured: its nodes, annotation and checksum pages, and the blocks it frees.
    /// Set by the capture, emptied by `finish`; in use and no longer fresh meanwhile, their
    /// copies hold what they held before, so the scrub and the check leave them alone
    /// (RELIABILITY.md, *The scrub beside a commit*).
    persisting: std::collections::HashSet<u64>,
    /// parallax-v2: the blocks the mover allocated for its copies and has neither pointed the
    /// tree at nor given back yet. A commit may end their epoch meanwhile (they are then in
    /// no tree and not fresh): a sweep must keep them ([`Inner::sweep_concurrent`]).
    moving: std::collections::HashSet<u64>,
    /// parallax-v2: freed blocks held allocated until the puncher punched and released them
    /// ([`punch`]); their copies may differ meanwhile, so the scrub leaves them alone too.
    punching: std::collections::HashSet<u64>,
}

/// Pages whose dirty marks a commit took while a live grow copied the tables
/// ([`grow_live`]).
#[derive(Debug, Default)]
struct GrowWatch {
    ann: Vec<u64>,
    sums: Vec<u64>,
}

/// Group commit ([`Inner::commit_concurrent`]): commits are numbered in the order their
/// capture starts (under the commit lock, before the state lock is taken for the capture).
#[derive(Default)]
struct GroupCommit {
    /// Captures started so far.
    started: u64,
    /// The highest-numbered commit that is durable (its root record committed).
    durable: u64,
}

/// The state lock taken with the commit lock and no data write in flight ([`Inner::write`]).
struct Exclusive<'a> {
    st: RwLockWriteGuard<'a, State>,
    _commit: MutexGuard<'a, ()>,
}

impl std::ops::Deref for Exclusive<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.st
    }
}

impl std::ops::DerefMut for Exclusive<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.st
    }
}

/// A parallax-v2 disk's annotations: the table, and where its pages live in the tree.
struct Ann {
    table: Table,
    /// Tree block of page 0.
    at: u64,
}

impl fmt::Debug for Parallax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parallax")
            .field("key", &self.inner.space.key())
            .field("capacity", &self.inner.capacity)
            .field("depth", &self.inner.depth)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ParallaxSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParallaxSnapshot")
            .field("key", &self.inner.space.key())
            .field("name", &self.record.name)
            .field("generation", &self.record.gen)
            .finish_non_exhaustive()
    }
}

/// One piece of a request: the part of disk block `block` at byte `off`, `len` bytes long, that
/// maps to `buf[at..at + len]`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    block: u64,
    off: usize,
    len: usize,
    at: usize,
}

/// The pieces of a request of `len` bytes at byte `start` of the disk.
fn pieces(start: u64, len: usize) -> impl Iterator<Item = Piece> {
    let mut pos = start;
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let block = pos / BLOCK_SIZE as u64;
        let off = (pos % BLOCK_SIZE as u64) as usize;
        let n = (BLOCK_SIZE - off).min(len - at);
        let p = Piece {
            block,
            off,
            len: n,
            at,
        };
        pos += n as u64;
        at += n;
        Some(p)
    })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes of consecutive blocks of one extent that map to consecutive bytes of a request: `len`
/// bytes from byte `off` of block `ptr`, for `buf[at..at + len]`.
#[derive(Debug, Clone, Copy)]
struct Run {
    ptr: u64,
    /// The tree block of the run's first byte.
    block: u64,
    off: usize,
    at: usize,
    len: usize,
}

impl Run {
    /// Whether piece `p`, stored at `ptr`, continues this run on the disk, in the store and in
    /// the buffer.
    fn extends_to(&self, p: &Piece, ptr: u64) -> bool {
        let end = self.off + self.len;
        p.off == 0
            && end % BLOCK_SIZE == 0
            && self.at + self.len == p.at
            && match (split_ptr(self.ptr), split_ptr(ptr)) {
                (Some((e1, i1)), Some((e2, i2))) => {
                    e1 == e2 && u64::from(i1) + (end / BLOCK_SIZE) as u64 == u64::from(i2)
                }
                _ => false,
            }
    }
}

fn locate(ptr: u64) -> Result<(ExtentId, u32)> {
    split_ptr(ptr).ok_or_else(|| Error::Corrupt(format!("malformed pointer {ptr:#x}")))
}

/// The check `dovetail store check` runs on every version of a parallax layout: open it
/// (which verifies the root record and every node's magic, checksum, level and pointers; for
/// parallax-v2 also every annotation page), check that the root record is of the layout the
/// catalog names, and run [`Parallax::check`]. One per layout: [`ParallaxCheck::ALL`].
#[derive(Debug, Clone, Copy)]
pub struct ParallaxCheck {
    layout: &'static str,
    /// Also verify every data block against its checksum ([`Parallax::check_data`]).
    data: bool,
}
