//! The `parallax-v1` layout: a Parallax-style virtual disk living in a [`VersionSpace`]. The disk
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

mod alloc;
mod cache;
pub mod format;
mod tree;

use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use dovetail_store::{ExtentId, VersionSpace};

use self::alloc::Allocator;
use self::cache::NodeCache;
use self::format::{
    check_name, depth_for, disk_blocks, show_ptr, span, split_ptr, Node, RootRecord,
    SnapshotRecord, BLOCK_SIZE, NULL,
};
use crate::{
    buffer_sectors, check_range, BlockLayout, Error, IoBufs, Result, Sector, Sectors, SECTOR_SIZE,
};

/// Tuning of a parallax-v1 instance (nothing here is persisted).
#[derive(Debug, Clone, Copy)]
pub struct ParallaxOptions {
    /// Memory for clean cached tree nodes, in bytes (dirty nodes come on top, and are written
    /// back once they exceed the same amount).
    pub cache_bytes: usize,
}

impl Default for ParallaxOptions {
    fn default() -> ParallaxOptions {
        ParallaxOptions {
            cache_bytes: 16 << 20,
        }
    }
}

/// A snapshot, as listed by [`ParallaxV1::snapshots`].
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
pub struct ParallaxV1 {
    inner: Arc<Inner>,
}

/// A read-only view of one snapshot; every write-like call fails with [`Error::ReadOnly`].
pub struct ParallaxSnapshot {
    inner: Arc<Inner>,
    record: SnapshotRecord,
}

struct Inner {
    space: Arc<dyn VersionSpace>,
    capacity: Sectors,
    /// Blocks of the disk (the last one may be partly past the capacity).
    blocks: u64,
    depth: u8,
    /// Lock order: `state`, then `cache`. Readers look nodes up under the cache's shared lock
    /// and take it exclusively only to insert a node they had to read.
    state: RwLock<State>,
    cache: RwLock<NodeCache>,
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
}

impl fmt::Debug for ParallaxV1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParallaxV1")
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

impl ParallaxV1 {
    /// Creates an empty disk of `capacity` sectors in `space`, which must hold no root record.
    pub fn create(space: Arc<dyn VersionSpace>, capacity: Sectors) -> Result<ParallaxV1> {
        ParallaxV1::create_with(space, capacity, ParallaxOptions::default())
    }

    /// [`create`](ParallaxV1::create) with options.
    pub fn create_with(
        space: Arc<dyn VersionSpace>,
        capacity: Sectors,
        opts: ParallaxOptions,
    ) -> Result<ParallaxV1> {
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
        let record = RootRecord {
            capacity,
            depth: depth_for(disk_blocks(capacity)),
            root: NULL,
            gen: 0,
            snapshots: Vec::new(),
        };
        space.commit_root(&record.encode())?;
        log::info!(
            "parallax-v1: created {} of {capacity} (tree depth {})",
            space.key(),
            record.depth
        );
        ParallaxV1::open_with(space, opts)
    }

    /// Opens the disk whose root record `space` holds, and sweeps its trees to find free space.
    pub fn open(space: Arc<dyn VersionSpace>) -> Result<ParallaxV1> {
        ParallaxV1::open_with(space, ParallaxOptions::default())
    }

    /// [`open`](ParallaxV1::open) with options.
    pub fn open_with(space: Arc<dyn VersionSpace>, opts: ParallaxOptions) -> Result<ParallaxV1> {
        let bytes = space.root();
        if bytes.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} has no root record; create the disk first",
                space.key()
            )));
        }
        let record = RootRecord::decode(&bytes)?;
        let extent_size = space.extent_size();
        let per_extent = extent_size / BLOCK_SIZE as u64;
        if extent_size % BLOCK_SIZE as u64 != 0 || per_extent == 0 || per_extent > 1 << 32 {
            return Err(Error::InvalidArgument(format!(
                "extents of {extent_size} bytes are not a whole number (1 to 2^32) of 4 KiB blocks"
            )));
        }
        let alloc = Allocator::new(&space.extents(), per_extent);
        let inner = Inner {
            blocks: disk_blocks(record.capacity),
            capacity: record.capacity,
            depth: record.depth,
            cache: RwLock::new(NodeCache::new((opts.cache_bytes / BLOCK_SIZE).max(16))),
            state: RwLock::new(State {
                root: record.root,
                committed_root: record.root,
                gen: record.gen,
                snapshots: record.snapshots,
                alloc,
                pending: Vec::new(),
                changed: false,
            }),
            space,
        };
        {
            let mut st = inner.write();
            let mut cache = inner.cache();
            inner.sweep(&mut st, &mut cache)?;
        }
        Ok(ParallaxV1 {
            inner: Arc::new(inner),
        })
    }

    /// Freezes the disk as it is now under `name`: commits, then records the committed root as
    /// a snapshot (in the same root record). Later writes copy the paths they change.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        check_name(name)
            .map_err(|why| Error::InvalidArgument(format!("snapshot name {name:?}: {why}")))?;
        let inner = &*self.inner;
        let mut st = inner.write();
        let mut cache = inner.cache();
        if st.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot named {name:?} exists already"
            )));
        }
        let record = SnapshotRecord {
            name: name.to_string(),
            root: st.root,
            gen: st.gen + 1,
            created: now_secs(),
        };
        let mut list = st.snapshots.clone();
        list.push(record.clone());
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
        let st = inner.read();
        let mut cache = inner.cache();
        inner.check(&st, &mut cache)
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

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
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
        let Some((extent, index)) = split_ptr(ptr) else {
            return Err(Error::Corrupt(format!("malformed pointer {ptr:#x}")));
        };
        let mut buf = [0u8; BLOCK_SIZE];
        self.space
            .read(extent, u64::from(index) * BLOCK_SIZE as u64, &mut buf)?;
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
        self.map_runs(
            st,
            (root, root_gen),
            start,
            len,
            |r| self.read_run(r, &mut buf.borrow_mut()),
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
        self.map_runs(
            st,
            (root, root_gen),
            start,
            bufs.len(),
            |r| {
                iov.clear();
                bufs.iovecs(r.at, r.len, &mut iov);
                let (extent, index) = locate(r.ptr)?;
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

    fn read_run(&self, r: &Run, buf: &mut [u8]) -> Result<()> {
        let (extent, index) = locate(r.ptr)?;
        self.space.read(
            extent,
            u64::from(index) * BLOCK_SIZE as u64 + r.off as u64,
            &mut buf[r.at..r.at + r.len],
        )?;
        Ok(())
    }
}

/// Bytes of consecutive blocks of one extent that map to consecutive bytes of a request: `len`
/// bytes from byte `off` of block `ptr`, for `buf[at..at + len]`.
#[derive(Debug, Clone, Copy)]
struct Run {
    ptr: u64,
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

impl BlockLayout for ParallaxV1 {
    fn capacity(&self) -> Sectors {
        self.inner.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let st = self.inner.read();
        self.inner
            .read_tree(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, buf)
    }

    /// Straight from the store's data file into the guest's buffers (one `preadv` per run of
    /// blocks stored consecutively), with no copy of our own.
    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, _scratch: &mut Vec<u8>) -> Result<()> {
        check_range(at, buffer_sectors(bufs.len())?, self.inner.capacity)?;
        let st = self.inner.read();
        self.inner
            .read_tree_into(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, bufs)
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let inner = &*self.inner;
        let mut st = inner.write();
        let mut cache = inner.cache();
        inner.write_tree(&mut st, &mut cache, at.0 * SECTOR_SIZE, buf)
    }

    fn flush(&self) -> Result<()> {
        let inner = &*self.inner;
        let mut st = inner.write();
        if !st.changed {
            return Ok(());
        }
        let mut cache = inner.cache();
        let list = st.snapshots.clone();
        inner.commit(&mut st, &mut cache, list)
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        // Discarded blocks lose their pointers, so they read back as zeroes, like a punched hole.
        self.write_zeroes(at, len, true)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, _unmap: bool) -> Result<()> {
        check_range(at, len, self.inner.capacity)?;
        let inner = &*self.inner;
        let mut st = inner.write();
        let mut cache = inner.cache();
        // In range, so the byte offsets fit (the capacity's bytes fit in a u64).
        inner.zero_tree(&mut st, &mut cache, at.0 * SECTOR_SIZE, len.0 * SECTOR_SIZE)
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

/// The parallax-v1 check `dovetail store check` runs on every parallax-v1 version: open it
/// read-only (which verifies every node's magic, checksum, level and pointers) and run
/// [`ParallaxV1::check`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ParallaxCheck;

impl dovetail_store::check::LayoutCheck for ParallaxCheck {
    fn layout(&self) -> &str {
        "parallax-v1"
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
        match ParallaxV1::open(space) {
            Ok(layout) => layout.check(),
            Err(e) => vec![format!("cannot open: {}", crate::error_chain(&e))],
        }
    }
}
