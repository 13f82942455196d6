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

mod alloc;
mod cache;
mod codec;
pub mod format;
mod groups;
mod mover;
mod replicas;
mod reserve;
mod stripes;
mod sums;
mod tree;

pub use self::mover::Placed;
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
    sums: Option<(sums::Sums, u64)>,
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
    /// parallax-v2: epochs and labels (the root record's extension).
    v2: Option<V2Ext>,
    /// parallax-v2: the tiering policy and spare extents.
    place: Option<groups::Placement>,
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

/// The disk blocks `[first, end)` that `len` bytes at byte `start` touch.
fn block_span(start: u64, len: u64) -> (u64, u64) {
    let bs = BLOCK_SIZE as u64;
    (start / bs, start.saturating_add(len).div_ceil(bs))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Parallax {
    /// Creates an empty parallax-v1 disk of `capacity` sectors in `space`, which must hold no
    /// root record.
    pub fn create(space: Arc<dyn VersionSpace>, capacity: Sectors) -> Result<Parallax> {
        Parallax::create_with(space, capacity, ParallaxOptions::default())
    }

    /// [`create`](Parallax::create) with options.
    pub fn create_with(
        space: Arc<dyn VersionSpace>,
        capacity: Sectors,
        opts: ParallaxOptions,
    ) -> Result<Parallax> {
        Parallax::create_layout(space, "parallax-v1", capacity, opts)
    }

    /// Creates an empty disk of `layout` (`parallax-v1` or `parallax-v2`) of `capacity`
    /// sectors in `space`, which must hold no root record.
    pub fn create_layout(
        space: Arc<dyn VersionSpace>,
        layout: &str,
        capacity: Sectors,
        opts: ParallaxOptions,
    ) -> Result<Parallax> {
        if !space.root().is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a root record; open it instead",
                space.key()
            )));
        }
        if capacity.bytes().is_none() {
            return Err(Error::InvalidArgument(format!(
                "a capacity of {capacity} does not fit in 64-bit bytes"
            )));
        }
        let guest_blocks = disk_blocks(capacity);
        let (tree_capacity, v2) = match layout {
            "parallax-v1" => (capacity, None),
            "parallax-v2" => {
                let blocks =
                    guest_blocks + annotation_pages(guest_blocks) + sums::pages_for(guest_blocks);
                let tree = blocks.checked_mul(SECTORS_PER_BLOCK).ok_or_else(|| {
                    Error::InvalidArgument(format!("a capacity of {capacity} is too large"))
                })?;
                (
                    Sectors(tree),
                    Some(V2Ext {
                        guest_capacity: capacity,
                        epoch_base: now_secs(),
                        epoch_secs: EPOCH_SECS,
                        active: 0,
                        labels: Vec::new(),
                        tiering: Some(format::Tiering {
                            policy: TierPolicy::defaults(space.tiers().len()),
                            groups: Vec::new(),
                        }),
                        sums: true,
                    }),
                )
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown layout {other:?} (known: {})",
                    LAYOUTS.join(", ")
                )))
            }
        };
        if tree_capacity.bytes().is_none() {
            return Err(Error::InvalidArgument(format!(
                "a capacity of {capacity} is too large"
            )));
        }
        let record = RootRecord {
            capacity: tree_capacity,
            depth: depth_for(disk_blocks(tree_capacity)),
            root: NULL,
            gen: 0,
            snapshots: Vec::new(),
            v2,
        };
        space.commit_root(&record.encode())?;
        log::info!(
            "{layout}: created {} of {capacity} (tree depth {})",
            space.key(),
            record.depth
        );
        Parallax::open_with(space, opts)
    }

    /// Opens the disk whose root record `space` holds, and sweeps its trees to find free space.
    pub fn open(space: Arc<dyn VersionSpace>) -> Result<Parallax> {
        Parallax::open_with(space, ParallaxOptions::default())
    }

    /// [`open`](Parallax::open) with options.
    pub fn open_with(space: Arc<dyn VersionSpace>, opts: ParallaxOptions) -> Result<Parallax> {
        let bytes = space.root();
        if bytes.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} has no root record; create the disk first",
                space.key()
            )));
        }
        let mut record = RootRecord::decode(&bytes)?;
        sums::upgrade(&mut record, space.key());
        let extent_size = space.extent_size();
        let per_extent = extent_size / BLOCK_SIZE as u64;
        if extent_size % BLOCK_SIZE as u64 != 0 || per_extent == 0 || per_extent > 1 << 32 {
            return Err(Error::InvalidArgument(format!(
                "extents of {extent_size} bytes are not a whole number (1 to 2^32) of 4 KiB blocks"
            )));
        }
        let granted = space.extents();
        let (alloc, groups, place) = match &record.v2 {
            None => (Allocator::new(&granted, per_extent), Vec::new(), None),
            Some(v2) => {
                let tiers = space.tiers().len().max(1);
                let (policy, groups) = match &v2.tiering {
                    Some(t) => (t.policy, t.groups.clone()),
                    // Written before tiering: every extent is a group of one, hot data.
                    None => (
                        TierPolicy::defaults(tiers),
                        granted
                            .iter()
                            .map(|&e| format::Group {
                                class: Class::Hot,
                                compressed: false,
                                members: vec![e],
                            })
                            .collect(),
                    ),
                };
                policy
                    .validate(tiers)
                    .map_err(|why| Error::Corrupt(format!("root record: tiering policy: {why}")))?;
                let mut in_group = std::collections::HashSet::new();
                for g in &groups {
                    for m in &g.members {
                        if !granted.contains(m) {
                            return Err(Error::Corrupt(format!(
                                "root record: extent group member {m} is not granted to {}",
                                space.key()
                            )));
                        }
                        in_group.insert(*m);
                    }
                }
                let primaries: Vec<ExtentId> = groups.iter().map(|g| g.members[0]).collect();
                let spare: Vec<ExtentId> = granted
                    .iter()
                    .copied()
                    .filter(|e| !in_group.contains(e))
                    .collect();
                if !spare.is_empty() {
                    log::info!(
                        "parallax-v2: {}: {} granted extents are in no group (a crash came \
                         before they were committed or given back); they are given back after \
                         the next commit",
                        space.key(),
                        spare.len()
                    );
                }
                (
                    Allocator::new(&primaries, per_extent),
                    groups,
                    Some(groups::Placement::new(policy, spare)),
                )
            }
        };
        let ann = record.v2.as_ref().map(|v2| {
            let guest_blocks = disk_blocks(v2.guest_capacity);
            Ann {
                table: Table::new(
                    guest_blocks,
                    Epochs {
                        base: v2.epoch_base,
                        secs: v2.epoch_secs,
                    },
                ),
                at: v2.annotations_at(),
            }
        });
        if let (Some(a), Some(v2)) = (&ann, &record.v2) {
            a.table.set_active_taint(v2.active);
        }
        let sums = record.v2.as_ref().filter(|v2| v2.sums).map(|v2| {
            (
                sums::Sums::new(disk_blocks(v2.guest_capacity)),
                v2.sums_at(),
            )
        });
        let inner = Inner {
            blocks: disk_blocks(record.capacity),
            capacity: record
                .v2
                .as_ref()
                .map_or(record.capacity, |v| v.guest_capacity),
            tree_capacity: record.capacity,
            ann,
            sums,
            depth: record.depth,
            tiered: place.is_some(),
            committing: Mutex::new(()),
            group: Mutex::default(),
            stripes: stripes::Stripes::new(),
            inflight: stripes::Inflight::default(),
            reserve: Arc::default(),
            groups: RwLock::new(groups::GroupMap::new(groups)),
            temps: std::sync::Mutex::new(dovetail_tiering::Temps::default()),
            counters: groups::TierCounters::default(),
            cache: RwLock::new(NodeCache::new((opts.cache_bytes / BLOCK_SIZE).max(16))),
            state: RwLock::new(State {
                root: record.root,
                committed_root: record.root,
                gen: record.gen,
                snapshots: record.snapshots,
                alloc,
                pending: Vec::new(),
                changed: false,
                retry: Vec::new(),
                v2: record.v2,
                place,
            }),
            space,
        };
        {
            let mut st = inner.write();
            let mut cache = inner.cache();
            inner.sweep(&mut st, &mut cache)?;
            // Reads take the cache's lock themselves.
            drop(cache);
            inner.load_annotations(&st)?;
            inner.load_sums(&st)?;
        }
        let inner = Arc::new(inner);
        if let (Some(every), Some(_)) = (opts.persist_every, &inner.ann) {
            spawn_persister(Arc::downgrade(&inner), every)?;
        }
        Ok(Parallax { inner })
    }

    /// The layout's name: `parallax-v1` or `parallax-v2`.
    pub fn layout(&self) -> &'static str {
        if self.inner.ann.is_some() {
            "parallax-v2"
        } else {
            "parallax-v1"
        }
    }

    /// parallax-v2: the disk's annotations (`None` for parallax-v1).
    pub fn annotations(&self) -> Option<&Table> {
        self.inner.ann.as_ref().map(|a| &a.table)
    }

    /// parallax-v2: the taint labels (empty for parallax-v1).
    pub fn labels(&self) -> Vec<Label> {
        labels_of(self.inner.read().v2.as_ref())
    }

    /// parallax-v2: turns taint label `name` on (every block written from now on gets it) or
    /// off, defining it on first use (at most [`MAX_LABELS`]). Committed before it returns, so
    /// the label and whether it is on survive a crash. Returns the label.
    pub fn set_taint(&self, name: &str, on: bool) -> Result<Label> {
        self.change_label(name, Some(on))
    }

    /// parallax-v2: defines taint label `name` (off) if the disk does not have it yet.
    pub fn define_label(&self, name: &str) -> Result<Label> {
        self.change_label(name, None)
    }

    /// Turns label `name` on or off (`None`: leaves it as it is), defining it if needed; turning
    /// off a label the disk does not have is an error.
    fn change_label(&self, name: &str, on: Option<bool>) -> Result<Label> {
        let inner = &*self.inner;
        let Some(ann) = &inner.ann else {
            return Err(Error::InvalidArgument(format!(
                "{} is a parallax-v1 disk, which keeps no annotations",
                inner.space.key()
            )));
        };
        dovetail_store::names::check_name(dovetail_store::names::NameKind::Label, name)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut st = inner.write();
        let mut cache = inner.cache();
        let before = st.v2.clone();
        let Some(v2) = st.v2.as_mut() else {
            return Err(Error::Corrupt("parallax-v2 state lost".to_string()));
        };
        let bit = match v2.labels.iter().position(|l| l == name) {
            Some(i) => i,
            None if on == Some(false) => {
                return Err(Error::InvalidArgument(format!(
                    "the disk has no taint label named {name:?}"
                )))
            }
            None if v2.labels.len() < MAX_LABELS => {
                v2.labels.push(name.to_string());
                v2.labels.len() - 1
            }
            None => {
                return Err(Error::InvalidArgument(format!(
                    "taint label {name:?}: the disk has {MAX_LABELS} labels already"
                )))
            }
        };
        match on {
            Some(true) => v2.active |= 1 << bit,
            Some(false) => v2.active &= !(1u16 << bit),
            None => {}
        }
        let active = v2.active;
        if Some(&v2.clone()) == before.as_ref() {
            // Nothing changes: no commit.
            return Ok(Label {
                name: name.to_string(),
                bit: bit as u8,
                active: active & (1 << bit) != 0,
            });
        }
        let list = st.snapshots.clone();
        if let Err(e) = inner.commit(&mut st, &mut cache, list) {
            st.v2 = before;
            return Err(e);
        }
        ann.table.set_active_taint(active);
        log::info!(
            "parallax-v2: {}: taint label {name:?} {}",
            inner.space.key(),
            match on {
                Some(true) => "on",
                Some(false) => "off",
                None => "defined",
            }
        );
        Ok(Label {
            name: name.to_string(),
            bit: bit as u8,
            active: active & (1 << bit) != 0,
        })
    }

    /// parallax-v2: the annotations as snapshot `name` froze them (with its labels).
    pub fn snapshot_annotations(&self, name: &str) -> Result<(Table, Vec<Label>)> {
        let inner = &*self.inner;
        let Some(ann) = &inner.ann else {
            return Err(Error::InvalidArgument(format!(
                "{} is a parallax-v1 disk, which keeps no annotations",
                inner.space.key()
            )));
        };
        let st = inner.read();
        let snap = st
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NoSuchSnapshot(name.to_string()))?;
        let table = Table::new(ann.table.blocks(), ann.table.epochs());
        let mut buf = vec![0u8; BLOCK_SIZE];
        for page in 0..table.pages() {
            inner.read_tree(
                &st,
                snap.root,
                snap.gen,
                (ann.at + page) * BLOCK_SIZE as u64,
                &mut buf,
            )?;
            table
                .load_page(page, &buf, u16::MAX)
                .map_err(|e| Error::Corrupt(format!("snapshot {name:?}: {e}")))?;
        }
        // Labels defined since keep their bits; the snapshot's blocks carry only older ones.
        Ok((table, labels_of(st.v2.as_ref())))
    }

    /// Freezes the disk as it is now under `name`: commits, then records the committed root as
    /// a snapshot (in the same root record). Later writes copy the paths they change.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        dovetail_store::names::check_name(dovetail_store::names::NameKind::Snapshot, name)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let inner = &*self.inner;
        let mut st = inner.write();
        let mut cache = inner.cache();
        if st.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot named {name:?} exists already"
            )));
        }
        // parallax-v2: the annotation pages go into the tree first, so the snapshot holds
        // them (writing them changes the root).
        inner.write_annotations(&mut st, &mut cache)?;
        let record = SnapshotRecord {
            name: name.to_string(),
            root: st.root,
            gen: st.gen + 1,
            created: now_secs(),
        };
        let mut list = st.snapshots.clone();
        list.push(record.clone());
        dovetail_store::failpoint::hit("parallax-snapshot");
        inner.commit(&mut st, &mut cache, list)?;
        // Every block in use is now reachable from the committed root (so from the new
        // snapshot) or from an older snapshot.
        st.alloc.shared = st.alloc.used.clone();
        log::info!(
            "parallax-v1: {}: snapshot {name:?} at generation {}",
            inner.space.key(),
            record.gen
        );
        Ok(SnapshotInfo::from(&record))
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner
            .read()
            .snapshots
            .iter()
            .map(SnapshotInfo::from)
            .collect()
    }

    /// Deletes a snapshot (committing the live tree with the new list), then sweeps to free the
    /// blocks only it referenced.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let inner = &*self.inner;
        let mut st = inner.write();
        let mut cache = inner.cache();
        let list: Vec<SnapshotRecord> = st
            .snapshots
            .iter()
            .filter(|s| s.name != name)
            .cloned()
            .collect();
        if list.len() == st.snapshots.len() {
            return Err(Error::NoSuchSnapshot(name.to_string()));
        }
        inner.commit(&mut st, &mut cache, list)?;
        inner.sweep(&mut st, &mut cache)?;
        log::info!(
            "parallax-v1: {}: deleted snapshot {name:?}",
            inner.space.key()
        );
        Ok(())
    }

    /// A read-only view of the snapshot `name`. It fails its reads once the snapshot is deleted.
    pub fn open_snapshot(&self, name: &str) -> Result<ParallaxSnapshot> {
        let st = self.inner.read();
        let record = st
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NoSuchSnapshot(name.to_string()))?;
        Ok(ParallaxSnapshot {
            inner: self.inner.clone(),
            record,
        })
    }

    /// Checks the layout's invariants and returns every violation found (empty when sound):
    /// every tree pointer inside the version's extents, node checksums, levels and generations
    /// valid, no block referenced twice from one tree, every reachable block allocated, every
    /// allocated block reachable or waiting for the next commit, used + free = total.
    pub fn check(&self) -> Vec<String> {
        let inner = &*self.inner;
        let st = inner.read_settled();
        let mut cache = inner.cache();
        let mut problems = inner.check(&st, &mut cache);
        drop(cache);
        problems.extend(inner.check_annotations(&st));
        problems.extend(inner.check_copies(&st));
        problems
    }

    /// parallax-v2: verifies every copy of every guest data block of the live tree and of
    /// every snapshot against its checksum, and returns one sentence per bad block (empty
    /// when every block with a checksum holds what was written; parallax-v1 keeps none).
    pub fn check_data(&self) -> Vec<String> {
        let inner = &*self.inner;
        let st = inner.read_settled();
        inner.check_data(&st)
    }

    /// parallax-v2: whether the disk keeps a checksum of every data block (extension
    /// version 3).
    pub fn has_data_checksums(&self) -> bool {
        self.inner.sums.is_some()
    }

    /// Space accounting.
    pub fn usage(&self) -> Usage {
        let st = self.inner.read();
        Usage {
            extents: st.alloc.extents().len(),
            total: st.alloc.total(),
            used: st.alloc.total() - st.alloc.free(),
            free: st.alloc.free(),
            pending: st.pending.len() as u64,
        }
    }

    /// The last committed generation.
    pub fn generation(&self) -> u64 {
        self.inner.read().gen
    }

    /// The tree depth.
    pub fn depth(&self) -> u8 {
        self.inner.depth
    }
}

fn labels_of(v2: Option<&V2Ext>) -> Vec<Label> {
    v2.map(|v| {
        v.labels
            .iter()
            .enumerate()
            .map(|(i, name)| Label {
                name: name.clone(),
                bit: i as u8,
                active: v.active & (1 << i) != 0,
            })
            .collect()
    })
    .unwrap_or_default()
}

/// parallax-v2: commits changed annotations every `every` while the disk is open.
fn spawn_persister(inner: Weak<Inner>, every: Duration) -> Result<()> {
    let name = inner
        .upgrade()
        .map(|i| format!("annotations-{}", i.space.key()))
        .unwrap_or_default();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(every);
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                if !inner.annotations_dirty() {
                    continue;
                }
                match inner.commit_concurrent(None) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        log::warn!(
                            "parallax-v2: {}: committing annotations failed (retrying every \
                             {every:?}): {}",
                            inner.space.key(),
                            crate::error_chain(&e)
                        );
                    }
                    Err(_) => {}
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Io {
            op: "starting the annotation persister",
            path: String::new(),
            source: e,
        })
}

impl Inner {
    /// parallax-v2: whether annotations changed since the last commit.
    fn annotations_dirty(&self) -> bool {
        self.ann.as_ref().is_some_and(|a| a.table.dirty_pages() > 0)
    }

    /// parallax-v2: loads every annotation page of the live tree into the table. A page that
    /// fails validation is reported, reset to zeros and rewritten at the next commit: the
    /// annotations are never garbage, and the disk's data stays available.
    fn load_annotations(&self, st: &State) -> Result<()> {
        let Some(ann) = &self.ann else {
            return Ok(());
        };
        let mask = label_mask(st.v2.as_ref());
        let mut buf = vec![0u8; BLOCK_SIZE];
        for page in 0..ann.table.pages() {
            self.read_tree(
                st,
                st.root,
                st.gen + 1,
                (ann.at + page) * BLOCK_SIZE as u64,
                &mut buf,
            )?;
            if let Err(e) = ann.table.load_page(page, &buf, mask) {
                log::warn!(
                    "parallax-v2: {}: annotation page {page} is bad ({e}); its blocks' \
                     annotations start again from zero",
                    self.space.key()
                );
                ann.table.mark_dirty(page);
            }
        }
        Ok(())
    }

    /// parallax-v2: writes the dirty annotation pages and checksum pages into the tree
    /// (before a commit).
    fn write_annotations(&self, st: &mut State, cache: &mut NodeCache) -> Result<()> {
        self.write_sums(st, cache)?;
        let Some(ann) = &self.ann else {
            return Ok(());
        };
        let pages = ann.table.take_dirty();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for (i, &page) in pages.iter().enumerate() {
            ann.table.encode_page(page, &mut buf);
            if let Err(e) = self.write_tree(st, cache, (ann.at + page) * BLOCK_SIZE as u64, &buf) {
                for &p in &pages[i..] {
                    ann.table.mark_dirty(p);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// parallax-v2: checks every annotation page of the live tree.
    fn check_annotations(&self, st: &State) -> Vec<String> {
        let Some(ann) = &self.ann else {
            return Vec::new();
        };
        let scratch = Table::new(ann.table.blocks(), ann.table.epochs());
        let mask = label_mask(st.v2.as_ref());
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut problems = Vec::new();
        for page in 0..scratch.pages() {
            let at = (ann.at + page) * BLOCK_SIZE as u64;
            let r = self
                .read_tree(st, st.committed_root, st.gen, at, &mut buf)
                .map_err(|e| crate::error_chain(&e))
                .and_then(|()| {
                    scratch
                        .load_page(page, &buf, mask)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = r {
                problems.push(format!("annotation page {page}: {e}"));
            }
        }
        problems
    }

    fn annotate_read(&self, at: Sector, len: usize) {
        if let Some(a) = &self.ann {
            a.table.record_read(at.0 * SECTOR_SIZE, len as u64);
        }
    }

    fn annotate_write(&self, at: Sector, len: u64) {
        if let Some(a) = &self.ann {
            a.table.record_write(at.0 * SECTOR_SIZE, len);
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The state lock shared, once every data write in flight is done: every pointer of the
    /// live tree then has its data (no write can start its tree change meanwhile).
    fn read_settled(&self) -> RwLockReadGuard<'_, State> {
        let st = self.read();
        self.inflight.drain();
        st
    }

    /// Everything to itself: the commit lock, the state lock, and no data write in flight
    /// (for commits, snapshots, the mover and other changes of the whole version).
    fn write(&self) -> Exclusive<'_> {
        let commit = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        Exclusive {
            st: self.write_io(),
            _commit: commit,
        }
    }

    /// The state lock with no data write in flight, for a request that changes the tree and
    /// writes data under it (partial writes, zeroing): a commit's persisting step may run.
    fn write_io(&self) -> RwLockWriteGuard<'_, State> {
        let st = self.state_write();
        self.inflight.drain();
        st
    }

    /// The state lock alone (writes in their data phase may still be in flight).
    fn state_write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn group(&self) -> MutexGuard<'_, GroupCommit> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits what was written before the call without holding the state lock while the
    /// nodes are written, the space synced and the root record committed: requests go on
    /// meanwhile, into the next epoch. Returns without committing when nothing changed.
    ///
    /// Group commit: calls that wait while a commit runs (FLUSHes from several queues) share
    /// the next one. A call notes how many captures had started when it arrived; once it holds
    /// the commit lock, if a commit numbered above that is durable, that commit's capture began
    /// after this call did, so after every write completed before it (a write's tree change is
    /// made under the state lock, which the capture takes after taking its number, and the
    /// capture waits for data writes in flight): the call returns without a commit of its own.
    /// A commit that fails covers nobody; the next call commits again.
    pub(super) fn commit_concurrent(&self, failpoint: Option<&str>) -> Result<()> {
        let arrived = self.group().started;
        let _commit = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        let mine = {
            let mut g = self.group();
            if g.durable > arrived {
                return Ok(());
            }
            g.started += 1;
            g.started
        };
        let durable = |r: Result<()>| {
            if r.is_ok() {
                let mut g = self.group();
                g.durable = g.durable.max(mine);
            }
            r
        };
        let cap = {
            let mut st = self.write_io();
            if !st.changed && !self.annotations_dirty() && st.retry.is_empty() {
                // Everything captured now is durable already.
                return durable(Ok(()));
            }
            if let Some(name) = failpoint {
                dovetail_store::failpoint::hit(name);
            }
            let mut cache = self.cache();
            let list = st.snapshots.clone();
            self.capture(&mut st, &mut cache, list)?
        };
        let done = self.persist(&cap);
        let mut st = self.state_write();
        let mut cache = self.cache();
        durable(self.finish(&mut st, &mut cache, cap, done))
    }

    fn cache(&self) -> RwLockWriteGuard<'_, NodeCache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_shared(&self) -> RwLockReadGuard<'_, NodeCache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    /// [`resolve`](Inner::resolve) under the cache's shared lock when the whole path is cached
    /// (the common case), else under its exclusive lock, reading what is missing.
    fn resolve_shared(&self, alloc: &Allocator, root: u64, root_gen: u64, b: u64) -> Result<u64> {
        {
            let cache = self.cache_shared();
            let (mut ptr, mut base) = (root, 0u64);
            let mut hit = true;
            for level in (1..=self.depth).rev() {
                if ptr == NULL {
                    return Ok(NULL);
                }
                let sp = span(level);
                let i = ((b - base) / sp) as usize;
                match cache.peek(ptr, i) {
                    Some((got, _, next)) if got == level => {
                        base += i as u64 * sp;
                        ptr = next;
                    }
                    _ => {
                        hit = false;
                        break;
                    }
                }
            }
            if hit {
                return Ok(ptr);
            }
        }
        self.resolve(alloc, &mut self.cache(), root, root_gen, b)
    }

    /// Reads and validates the node at `ptr`, which a node of generation `max_gen` (or the root
    /// record) points at as a node of `level` covering disk blocks from `base`.
    fn read_node(
        &self,
        alloc: &Allocator,
        ptr: u64,
        level: u8,
        base: u64,
        max_gen: u64,
    ) -> Result<Node> {
        alloc.index(ptr)?;
        let mut buf = [0u8; BLOCK_SIZE];
        self.read_node_bytes(ptr, level, max_gen, &mut buf)?;
        let node = Node::decode(&buf, ptr, level, max_gen)?;
        let sp = span(level);
        for (i, &e) in node.entries.iter().enumerate() {
            if e == NULL {
                continue;
            }
            if base.saturating_add((i as u64).saturating_mul(sp)) >= self.blocks {
                return Err(Error::Corrupt(format!(
                    "node at {}: entry {i} lies past the end of the disk",
                    show_ptr(ptr)
                )));
            }
            alloc.check_ptr(e).map_err(|err| {
                Error::Corrupt(format!("node at {}, entry {i}: {err}", show_ptr(ptr)))
            })?;
        }
        Ok(node)
    }

    /// The node at `ptr`, from the cache or read (and cached).
    fn node<'c>(
        &self,
        alloc: &Allocator,
        cache: &'c mut NodeCache,
        ptr: u64,
        level: u8,
        base: u64,
        max_gen: u64,
    ) -> Result<&'c Node> {
        if cache.contains(ptr) {
            let n = cache
                .get(ptr)
                .ok_or_else(|| Error::Corrupt("node cache lost a node".to_string()))?;
            if n.level != level {
                return Err(Error::Corrupt(format!(
                    "node at {} is of level {}, reached as level {level}",
                    show_ptr(ptr),
                    n.level
                )));
            }
            return Ok(n);
        }
        let node = self.read_node(alloc, ptr, level, base, max_gen)?;
        Ok(cache.insert(ptr, node, false))
    }

    /// The data block pointer of disk block `b` in the tree at `root`.
    fn resolve(
        &self,
        alloc: &Allocator,
        cache: &mut NodeCache,
        root: u64,
        root_gen: u64,
        b: u64,
    ) -> Result<u64> {
        let (mut ptr, mut max_gen, mut base) = (root, root_gen, 0u64);
        for level in (1..=self.depth).rev() {
            if ptr == NULL {
                return Ok(NULL);
            }
            let sp = span(level);
            let i = ((b - base) / sp) as usize;
            // One hash lookup per level when the path is cached.
            let (got_level, gen, next) = match cache.peek(ptr, i) {
                Some(found) => found,
                None => {
                    let node = self.read_node(alloc, ptr, level, base, max_gen)?;
                    let found = (node.level, node.gen, node.entries[i]);
                    cache.insert(ptr, node, false);
                    found
                }
            };
            if got_level != level {
                return Err(Error::Corrupt(format!(
                    "node at {} is of level {got_level}, reached as level {level}",
                    show_ptr(ptr)
                )));
            }
            max_gen = gen;
            base += i as u64 * sp;
            ptr = next;
        }
        Ok(ptr)
    }

    /// Maps `len` bytes from byte `start` of the tree at `root` to the store: calls `data` for
    /// each run of consecutive blocks stored consecutively, and `hole(at, len)` for each piece
    /// of the request that is unwritten (reads as zeroes).
    fn map_runs(
        &self,
        st: &State,
        (root, root_gen): (u64, u64),
        start: u64,
        len: usize,
        mut data: impl FnMut(&Run) -> Result<()>,
        mut hole: impl FnMut(usize, usize),
    ) -> Result<()> {
        let mut run: Option<Run> = None;
        for p in pieces(start, len) {
            // The cache is locked per block, never across a read of data.
            let ptr = self.resolve_shared(&st.alloc, root, root_gen, p.block)?;
            if let Some(r) = &mut run {
                if r.extends_to(&p, ptr) {
                    r.len += p.len;
                    continue;
                }
                data(r)?;
                run = None;
            }
            if ptr == NULL {
                hole(p.at, p.len);
            } else {
                run = Some(Run {
                    ptr,
                    block: p.block,
                    off: p.off,
                    at: p.at,
                    len: p.len,
                });
            }
        }
        if let Some(r) = &run {
            data(r)?;
        }
        Ok(())
    }

    /// Reads `buf` from byte `start` of the tree at `root`.
    fn read_tree(
        &self,
        st: &State,
        root: u64,
        root_gen: u64,
        start: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let len = buf.len();
        let buf = std::cell::RefCell::new(buf);
        let src = self.sums_source(st, root, root_gen);
        self.map_runs(
            st,
            (root, root_gen),
            start,
            len,
            |r| self.read_run_checked(st, src, r, &mut buf.borrow_mut()[r.at..r.at + r.len]),
            |at, n| buf.borrow_mut()[at..at + n].fill(0),
        )
    }

    /// Reads from byte `start` of the tree at `root` straight into a guest's buffers.
    fn read_tree_into(
        &self,
        st: &State,
        root: u64,
        root_gen: u64,
        start: u64,
        bufs: IoBufs<'_>,
    ) -> Result<()> {
        let mut iov = Vec::with_capacity(8);
        let src = self.sums_source(st, root, root_gen);
        self.map_runs(
            st,
            (root, root_gen),
            start,
            bufs.len(),
            |r| {
                iov.clear();
                bufs.iovecs(r.at, r.len, &mut iov);
                let (extent, index) = locate(r.ptr)?;
                if self.is_checked(r.block) {
                    // Every guest block with a checksum is verified after the read.
                    return self.read_run_into_checked(st, src, r, bufs, &iov);
                }
                if let Some(m) = self.members(extent) {
                    if m.kind.compressed || m.all().len() > 1 {
                        // Decompressed, or from a good copy: through a buffer of ours.
                        let mut tmp = vec![0u8; r.len];
                        self.read_data(r.ptr, r.off, &mut tmp)?;
                        // SAFETY: as below; `tmp` is ours and as long as the iovecs.
                        unsafe { dovetail_store::file::copy_to_iovecs(&tmp, &iov) };
                        return Ok(());
                    }
                }
                // SAFETY: the iovecs lie within `bufs`, valid for writes while it lives (the
                // contract of `IoBufs::new`), which outlasts this call.
                unsafe {
                    self.space.read_raw(
                        extent,
                        u64::from(index) * BLOCK_SIZE as u64 + r.off as u64,
                        &iov,
                    )
                }?;
                Ok(())
            },
            |at, n| bufs.zero(at, n),
        )
    }
}

/// The bits of the labels a disk defines.
fn label_mask(v2: Option<&V2Ext>) -> u16 {
    match v2.map_or(0, |v| v.labels.len()) {
        n if n >= 16 => u16::MAX,
        n => (1u16 << n) - 1,
    }
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

impl BlockLayout for Parallax {
    fn capacity(&self) -> Sectors {
        self.inner.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let (first, end) = block_span(at.0 * SECTOR_SIZE, buf.len() as u64);
        let _stripes = self.inner.stripes.shared(first, end);
        let st = self.inner.read();
        self.inner
            .read_tree(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, buf)?;
        drop(st);
        self.inner.annotate_read(at, buf.len());
        Ok(())
    }

    fn read_quiet(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let (first, end) = block_span(at.0 * SECTOR_SIZE, buf.len() as u64);
        let _stripes = self.inner.stripes.shared(first, end);
        let st = self.inner.read();
        self.inner
            .read_tree(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, buf)
    }

    /// Straight from the store's data file into the guest's buffers (one `preadv` per run of
    /// blocks stored consecutively), with no copy of our own.
    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, _scratch: &mut Vec<u8>) -> Result<()> {
        check_range(at, buffer_sectors(bufs.len())?, self.inner.capacity)?;
        let len = bufs.len();
        let (first, end) = block_span(at.0 * SECTOR_SIZE, len as u64);
        let _stripes = self.inner.stripes.shared(first, end);
        let st = self.inner.read();
        self.inner
            .read_tree_into(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, bufs)?;
        drop(st);
        self.inner.annotate_read(at, len);
        Ok(())
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let inner = &*self.inner;
        let start = at.0 * SECTOR_SIZE;
        let (first, end) = block_span(start, buf.len() as u64);
        let _stripes = inner.stripes.exclusive(first, end);
        let bs = BLOCK_SIZE as u64;
        if start % bs != 0 || buf.len() as u64 % bs != 0 {
            // A partial block is merged with what the block holds: under the lock.
            let mut st = inner.write_io();
            let mut cache = inner.cache();
            inner.write_tree(&mut st, &mut cache, start, buf)?;
        } else {
            // The tree change under the state lock, the data write after it, under the
            // blocks' stripes alone: writes to other blocks and commits proceed meanwhile.
            let mut runs = Vec::new();
            let placed = {
                let mut st = inner.state_write();
                let mut cache = inner.cache();
                let placed = inner.place_whole(&mut st, &mut cache, start, buf, &mut runs);
                inner.inflight.begin();
                placed
            };
            let written = inner.write_runs(&runs, buf);
            inner.inflight.end();
            placed?;
            written?;
        }
        inner.annotate_write(at, buf.len() as u64);
        dovetail_store::failpoint::hit("parallax-write");
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.inner.commit_concurrent(Some("parallax-flush"))
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        // Discarded blocks lose their pointers, so they read back as zeroes, like a punched hole.
        self.write_zeroes(at, len, true)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, _unmap: bool) -> Result<()> {
        check_range(at, len, self.inner.capacity)?;
        let inner = &*self.inner;
        let (first, end) = block_span(at.0 * SECTOR_SIZE, len.0 * SECTOR_SIZE);
        let _stripes = inner.stripes.exclusive(first, end);
        let mut st = inner.write_io();
        let mut cache = inner.cache();
        // In range, so the byte offsets fit (the capacity's bytes fit in a u64).
        inner.zero_tree(&mut st, &mut cache, at.0 * SECTOR_SIZE, len.0 * SECTOR_SIZE)?;
        inner.annotate_write(at, len.0 * SECTOR_SIZE);
        Ok(())
    }
}

impl ParallaxSnapshot {
    /// The snapshot this view reads.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo::from(&self.record)
    }
}

impl BlockLayout for ParallaxSnapshot {
    fn capacity(&self) -> Sectors {
        self.inner.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let st = self.inner.read();
        // The snapshot's blocks stay allocated only while it exists.
        if !st.snapshots.contains(&self.record) {
            return Err(Error::NoSuchSnapshot(self.record.name.clone()));
        }
        self.inner.read_tree(
            &st,
            self.record.root,
            self.record.gen,
            at.0 * SECTOR_SIZE,
            buf,
        )
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        Err(Error::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        check_range(at, len, self.inner.capacity)?;
        Err(Error::ReadOnly)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, _unmap: bool) -> Result<()> {
        check_range(at, len, self.inner.capacity)?;
        Err(Error::ReadOnly)
    }
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

impl ParallaxCheck {
    pub const V1: ParallaxCheck = ParallaxCheck {
        layout: "parallax-v1",
        data: false,
    };
    pub const V2: ParallaxCheck = ParallaxCheck {
        layout: "parallax-v2",
        data: false,
    };
    /// parallax-v2, verifying every data block's checksum too (`store check --data`).
    pub const V2_DATA: ParallaxCheck = ParallaxCheck {
        layout: "parallax-v2",
        data: true,
    };
    /// The checks of every parallax layout.
    pub const ALL: [&'static dyn dovetail_store::check::LayoutCheck; 2] =
        [&ParallaxCheck::V1, &ParallaxCheck::V2];
    /// [`ALL`](ParallaxCheck::ALL), with every parallax-v2 data block verified against its
    /// checksum (parallax-v1 keeps none: its data cannot be verified).
    pub const ALL_DATA: [&'static dyn dovetail_store::check::LayoutCheck; 2] =
        [&ParallaxCheck::V1, &ParallaxCheck::V2_DATA];
}

impl dovetail_store::check::LayoutCheck for ParallaxCheck {
    fn layout(&self) -> &str {
        self.layout
    }

    fn check(
        &self,
        version: &dovetail_store::VersionInfo,
        space: Arc<dyn VersionSpace>,
    ) -> Vec<String> {
        if version.root_len == 0 {
            // Created but never served: no tree yet.
            return Vec::new();
        }
        let opts = ParallaxOptions {
            persist_every: None,
            ..ParallaxOptions::default()
        };
        match Parallax::open_with(space, opts) {
            Ok(layout) if layout.layout() != self.layout => vec![format!(
                "the catalog says {}, its root record is of {}",
                self.layout,
                layout.layout()
            )],
            Ok(layout) => {
                let mut problems = layout.check();
                if self.data {
                    problems.extend(layout.check_data());
                }
                problems
            }
            Err(e) => vec![format!("cannot open: {}", crate::error_chain(&e))],
        }
    }
}
