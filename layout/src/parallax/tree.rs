//! Changing the tree (copy-on-write of paths, writes, zeroing), committing it, and walking it
//! (the sweep that rebuilds free space, and the invariant check).

use super::alloc::{Allocator, Bitmap};
use super::batch::BlockRun;
use super::cache::NodeCache;
use super::format::{show_ptr, span, Node, RootRecord, SnapshotRecord, BLOCK_SIZE, ENTRIES, NULL};
use super::{locate, pieces, Inner, Run, State};
use crate::engine::AlignedBuf;
use crate::{Error, Result};
use dovetail_tiering::Kind;

/// Most problems [`Inner::check`] lists one by one before summarising.
const MAX_PROBLEMS: usize = 64;

/// Most blocks a commit writes with one call ([`Inner::write_captured`]): 1 MiB.
const RUN_BLOCKS: usize = 256;

/// What a commit makes durable, taken under the state lock ([`Inner::capture`]).
pub(super) struct Captured {
    /// The dirty nodes' bytes, by block.
    nodes: Vec<(u64, Box<[u8; BLOCK_SIZE]>)>,
    record: RootRecord,
    /// Blocks (global indexes) the committed tree no longer references, freed once it is.
    pending: Vec<u64>,
    /// Their pointers.
    freed: Vec<u64>,
    /// The store's mark of shared-block holds at the capture: the commit makes durable the
    /// shares and releases of the captured tree only.
    cut: u64,
}

fn lost(ptr: u64) -> Error {
    Error::Corrupt(format!(
        "node at {} left the cache while being changed",
        show_ptr(ptr)
    ))
}

fn entry(cache: &mut NodeCache, node: u64, i: usize) -> Result<u64> {
    Ok(cache.get(node).ok_or_else(|| lost(node))?.entries[i])
}

fn set_entry(cache: &mut NodeCache, node: u64, i: usize, value: u64) -> Result<()> {
    cache.get_mut(node).ok_or_else(|| lost(node))?.entries[i] = value;
    Ok(())
}

impl Inner {
    /// A free block for a tree node (`node`) or for data of tree block `b`, granting a new
    /// extent when every block is in use. parallax-v2 takes it from a group of the block's
    /// class: metadata for nodes and annotation pages, hot for guest data.
    pub(super) fn alloc_block(&self, st: &mut State, node: bool, b: u64) -> Result<u64> {
        if st.place.is_some() {
            let meta = node || self.ann.as_ref().is_some_and(|a| b >= a.at);
            let kind = if meta { Kind::META } else { Kind::HOT };
            let p = self
                .alloc_kind(st, kind, node, false)?
                .ok_or(Error::Store(dovetail_store::StoreError::Full))?;
            self.note_allocated(st, p);
            return Ok(p);
        }
        let take = |a: &mut Allocator| if node { a.alloc_node() } else { a.alloc() };
        if let Some(p) = take(&mut st.alloc) {
            self.note_allocated(st, p);
            return Ok(p);
        }
        let e = self.space.grant_extent()?;
        log::debug!("parallax-v1: {}: granted {e}", self.space.key());
        st.alloc.add_extent(e);
        take(&mut st.alloc)
            .ok_or_else(|| Error::Corrupt(format!("{e}, just granted, has no free block")))
    }

    /// `ptr` is no longer referenced by the live tree: free it now if it is fresh, at the next
    /// commit if no snapshot can reference it, else leave it to the sweep after a deletion.
    fn supersede(&self, st: &mut State, cache: &mut NodeCache, ptr: u64) -> Result<()> {
        if self.is_pool(ptr) {
            return self.release_pool(st, ptr);
        }
        let g = st.alloc.index(ptr)?;
        if st.alloc.fresh.get(g) {
            st.alloc.release(g);
            cache.remove(ptr);
        } else if !st.alloc.shared.get(g) {
            st.pending.push(g);
        } else if let Some(dropped) = st.sweeping.as_mut() {
            // A sweep runs ([`Inner::sweep_concurrent`]): it decides whether a snapshot
            // still holds the block.
            dropped.push(g);
        }
        Ok(())
    }

    /// [`supersede`](Inner::supersede), for the shared pool's code.
    pub(super) fn supersede_ptr(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        ptr: u64,
    ) -> Result<()> {
        self.supersede(st, cache, ptr)
    }

    /// Makes the node at `ptr` (a node of `level` from disk block `base`, or null for a new
    /// one) writable in this epoch: returns it if fresh, else a fresh copy. The result is
    /// dirty, so pinned in the cache until written back.
    fn cow(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        ptr: u64,
        level: u8,
        base: u64,
    ) -> Result<u64> {
        let epoch = st.gen + 1;
        if ptr == NULL {
            let new = self.alloc_block(st, true, 0)?;
            cache.insert(new, Node::empty(level, epoch), true);
            return Ok(new);
        }
        let fresh = st.alloc.is_fresh(ptr);
        let node = self.node(&st.alloc, cache, ptr, level, base, epoch)?;
        if fresh {
            cache.get_mut(ptr).ok_or_else(|| lost(ptr))?;
            return Ok(ptr);
        }
        let mut copy = node.clone();
        copy.gen = epoch;
        let new = self.alloc_block(st, true, 0)?;
        cache.insert(new, copy, true);
        self.supersede(st, cache, ptr)?;
        Ok(new)
    }

    /// Makes the path to disk block `b` writable and returns its level-1 node.
    fn leaf_mut(&self, st: &mut State, cache: &mut NodeCache, b: u64) -> Result<u64> {
        self.path_mut(st, cache, b, 1)
    }

    /// Makes the path to disk block `b` writable down to level `stop` and returns that node.
    pub(super) fn path_mut(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        b: u64,
        stop: u8,
    ) -> Result<u64> {
        let root = self.cow(st, cache, st.root, self.depth, 0)?;
        st.root = root;
        let (mut parent, mut base) = (root, 0u64);
        for level in (stop..self.depth).rev() {
            let psp = span(level + 1);
            let i = ((b - base) / psp) as usize;
            base += i as u64 * psp;
            let child = entry(cache, parent, i)?;
            let new = self.cow(st, cache, child, level, base)?;
            if new != child {
                set_entry(cache, parent, i, new)?;
            }
            parent = new;
        }
        Ok(parent)
    }

    /// Where to write disk block `b`: `(new, old)`, with `new == old` when the block is fresh
    /// and is rewritten in place; otherwise `new` is a fresh block already in the tree and
    /// `old` (maybe null) the superseded one, still readable until the next commit.
    fn target(&self, st: &mut State, cache: &mut NodeCache, b: u64) -> Result<(u64, u64)> {
        let leaf = self.leaf_mut(st, cache, b)?;
        let i = (b % ENTRIES as u64) as usize;
        let old = entry(cache, leaf, i)?;
        if old != NULL && st.alloc.is_fresh(old) && !self.is_compressed(old) {
            return Ok((old, old));
        }
        let new = self.alloc_block(st, false, b)?;
        set_entry(cache, leaf, i, new)?;
        if old != NULL {
            self.supersede(st, cache, old)?;
        }
        Ok((new, old))
    }

    /// Points tree block `b` (an annotation or checksum page, which only commits write) at a
    /// block of this epoch and adds it with `bytes` to `out`, the blocks the commit being
    /// captured writes outside the state lock ([`Inner::persist`]). Nothing reads such a page
    /// from the live tree before that commit's end: opens and checks read committed trees,
    /// and the mover copies pages holding the commit lock.
    pub(super) fn place_page(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        b: u64,
        bytes: Box<[u8; BLOCK_SIZE]>,
        out: &mut Vec<(u64, Box<[u8; BLOCK_SIZE]>)>,
    ) -> Result<()> {
        st.changed = true;
        let (new, _) = self.target(st, cache, b)?;
        out.push((new, bytes));
        Ok(())
    }

    fn write_block_bytes(&self, ptr: u64, off: usize, data: &[u8]) -> Result<()> {
        let (extent, index) = locate(ptr)?;
        self.write_copies(
            extent,
            u64::from(index) * BLOCK_SIZE as u64 + off as u64,
            data,
        )
    }

    /// Points disk block `b` of the live tree at `new` (a fresh block holding its data) and
    /// supersedes `old`, the block it pointed at.
    pub(super) fn repoint(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        b: u64,
        new: u64,
        old: u64,
    ) -> Result<()> {
        let leaf = self.leaf_mut(st, cache, b)?;
        let i = (b % ENTRIES as u64) as usize;
        if entry(cache, leaf, i)? != old {
            return Err(Error::Corrupt(format!(
                "block {b} moved while being relocated"
            )));
        }
        set_entry(cache, leaf, i, new)?;
        self.supersede(st, cache, old)
    }

    /// Writes part of a block: in place if fresh, else read-modify-write into a fresh block.
    fn write_partial(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        b: u64,
        off: usize,
        data: Option<&[u8]>,
        len: usize,
    ) -> Result<()> {
        let (new, old) = self.target(st, cache, b)?;
        let zeroes = [0u8; BLOCK_SIZE];
        let data = data.unwrap_or(&zeroes[..len]);
        let mut tmp = [0u8; BLOCK_SIZE];
        if new == old {
            if !self.is_checked(b) {
                return self.write_block_bytes(new, off, data);
            }
            // The block's checksum covers all of it: read it (verified) to recompute it.
            self.read_block_live(new, b, &mut tmp)?;
            tmp[off..off + len].copy_from_slice(data);
            self.note_sum(b, &tmp);
            return self.write_noted(b, 1, new, off, data);
        }
        if old != NULL {
            // Verified: a damaged block is not merged into a new one with a fresh checksum.
            self.read_block_live(old, b, &mut tmp)?;
        }
        tmp[off..off + len].copy_from_slice(data);
        self.note_sum(b, &tmp);
        self.write_noted(b, 1, new, 0, &tmp)
    }

    /// [`Self::write_block_bytes`] of `blocks` guest blocks from `b` whose checksums were just
    /// noted: if the write fails, what they hold is unknown (old, new or a mix), so their
    /// checksums are forgotten and a later read returns them unverified instead of failing on
    /// a checksum of data never written. Their next write gives them one again.
    fn write_noted(&self, b: u64, blocks: u64, ptr: u64, off: usize, data: &[u8]) -> Result<()> {
        let written = self.write_block_bytes(ptr, off, data);
        if written.is_err() {
            self.forget_sums(b, blocks);
        }
        written
    }

    /// Writes `buf` at byte `start` of the live tree.
    pub(super) fn write_tree(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        start: u64,
        buf: &[u8],
    ) -> Result<()> {
        // Whole blocks `[from, to)` already point at fresh blocks whose data is not written yet.
        let mut unwritten: Option<(u64, u64)> = None;
        let r = self.write_tree_data(st, cache, start, buf, &mut unwritten);
        if let (Err(_), Some((from, to))) = (&r, unwritten) {
            // The request failed part way: those blocks hold unknown bytes; keep no checksum
            // of data never written (a partial block whose old data failed its checksum keeps
            // that failure: it is not among them).
            self.forget_sums(from, to - from);
        }
        r
    }

    fn write_tree_data(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        start: u64,
        buf: &[u8],
        unwritten: &mut Option<(u64, u64)>,
    ) -> Result<()> {
        st.changed = true;
        let written = |unwritten: &mut Option<(u64, u64)>, r: &Run| {
            let end = r.block + (r.len / BLOCK_SIZE) as u64;
            *unwritten = unwritten.and_then(|(_, to)| (end < to).then_some((end, to)));
        };
        // Whole blocks that land consecutively in the store are written with one call.
        let mut run: Option<Run> = None;
        for p in pieces(start, buf.len()) {
            if p.len < BLOCK_SIZE {
                self.write_partial(
                    st,
                    cache,
                    p.block,
                    p.off,
                    Some(&buf[p.at..p.at + p.len]),
                    p.len,
                )?;
                continue;
            }
            let (new, _) = self.target(st, cache, p.block)?;
            *unwritten = Some((unwritten.map_or(p.block, |u| u.0), p.block + 1));
            self.note_sum(p.block, &buf[p.at..p.at + p.len]);
            if let Some(r) = &mut run {
                if r.extends_to(&p, new) {
                    r.len += p.len;
                    continue;
                }
                self.write_block_bytes(r.ptr, 0, &buf[r.at..r.at + r.len])?;
                written(unwritten, r);
            }
            run = Some(Run {
                ptr: new,
                block: p.block,
                off: 0,
                at: p.at,
                len: p.len,
            });
        }
        if let Some(r) = &run {
            self.write_block_bytes(r.ptr, 0, &buf[r.at..r.at + r.len])?;
            written(unwritten, r);
        }
        self.relieve(st, cache)
    }

    /// The tree change of a write of whole blocks: points blocks `start / 4 KiB ..` at fresh
    /// blocks (or the fresh blocks already holding them), notes their checksums, and returns
    /// in `runs` where their data goes, for the caller to write after releasing the state lock
    /// (holding the blocks' stripes). On an error, `runs` holds the blocks changed before it.
    pub(super) fn place_whole(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        start: u64,
        buf: &[u8],
        runs: &mut Vec<Run>,
    ) -> Result<()> {
        self.place_blocks(
            st,
            cache,
            start,
            buf.len(),
            Some(buf),
            runs,
            |b, at, len| self.note_sum(b, &buf[at..at + len]),
        )
    }

    /// [`place_whole`](Inner::place_whole) for `len` bytes, with `sum(block, byte of the
    /// request, length)` called for each block placed (to note its checksum). With `share`
    /// (the request's bytes), a block the store's shared pool already holds becomes a
    /// reference to it instead (`try_share`) and gets no run.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn place_blocks(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        start: u64,
        len: usize,
        share: Option<&[u8]>,
        runs: &mut Vec<Run>,
        mut sum: impl FnMut(u64, usize, usize),
    ) -> Result<()> {
        st.changed = true;
        for p in pieces(start, len) {
            if let Some(buf) = share {
                if self.try_share(st, cache, p.block, &buf[p.at..p.at + p.len])? {
                    continue;
                }
            }
            let (new, _) = self.target(st, cache, p.block)?;
            sum(p.block, p.at, p.len);
            if let Some(r) = runs.last_mut() {
                if r.extends_to(&p, new) {
                    r.len += p.len;
                    continue;
                }
            }
            runs.push(Run {
                ptr: new,
                block: p.block,
                off: 0,
                at: p.at,
                len: p.len,
            });
        }
        self.relieve(st, cache)
    }

    /// Writes the data of runs [`place_whole`](Inner::place_whole) returned.
    /// If one fails, the blocks of that run and of those not written after it hold unknown
    /// bytes: their checksums are forgotten ([`write_noted`](Inner::write_noted)).
    pub(super) fn write_runs(&self, runs: &[Run], buf: &[u8]) -> Result<()> {
        for (i, r) in runs.iter().enumerate() {
            if let Err(e) = self.write_block_bytes(r.ptr, 0, &buf[r.at..r.at + r.len]) {
                for r in &runs[i..] {
                    self.forget_sums(r.block, (r.len / BLOCK_SIZE) as u64);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes `len` bytes at byte `start` of the live tree read as zeroes: whole blocks lose
    /// their pointers, partial ones are rewritten.
    pub(super) fn zero_tree(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        start: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        st.changed = true;
        let bs = BLOCK_SIZE as u64;
        let end = start + len;
        let head = start / bs;
        let head_end = end.min((head + 1) * bs);
        if head_end - start < bs {
            self.zero_partial(
                st,
                cache,
                head,
                (start % bs) as usize,
                (head_end - start) as usize,
            )?;
        }
        let tail = end / bs;
        if end % bs != 0 && tail != head {
            self.zero_partial(st, cache, tail, 0, (end % bs) as usize)?;
        }
        let (first_full, end_full) = (start.div_ceil(bs), end / bs);
        if first_full < end_full {
            st.root = self.drop_range(st, cache, st.root, self.depth, 0, first_full, end_full)?;
        }
        self.relieve(st, cache)
    }

    /// Zeroes `len` bytes at `off` of disk block `b`, unless the block is unwritten.
    fn zero_partial(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        b: u64,
        off: usize,
        len: usize,
    ) -> Result<()> {
        let ptr = self.resolve(&st.alloc, cache, st.root, st.gen + 1, b)?;
        if ptr == NULL {
            return Ok(());
        }
        self.write_partial(st, cache, b, off, None, len)
    }

    /// Drops the pointers of disk blocks `[lo, hi)` from the subtree at `ptr`; returns the
    /// subtree's new root (null once it holds nothing).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn drop_range(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        ptr: u64,
        level: u8,
        base: u64,
        lo: u64,
        hi: u64,
    ) -> Result<u64> {
        if ptr == NULL {
            return Ok(NULL);
        }
        let sp = span(level);
        let cover_end = base
            .saturating_add(sp.saturating_mul(ENTRIES as u64))
            .min(self.blocks);
        if lo <= base && hi >= cover_end {
            self.free_subtree(st, cache, ptr, level, base)?;
            return Ok(NULL);
        }
        let i0 = ((lo.max(base) - base) / sp) as usize;
        let i1 = ((hi.min(cover_end) - base).div_ceil(sp) as usize).min(ENTRIES);
        let node = self.node(&st.alloc, cache, ptr, level, base, st.gen + 1)?;
        if node.entries[i0..i1].iter().all(|&e| e == NULL) {
            return Ok(ptr);
        }
        let p = self.cow(st, cache, ptr, level, base)?;
        for i in i0..i1 {
            let child = entry(cache, p, i)?;
            if child == NULL {
                continue;
            }
            let new = if level == 1 {
                self.supersede(st, cache, child)?;
                NULL
            } else {
                let cbase = base + i as u64 * sp;
                self.drop_range(st, cache, child, level - 1, cbase, lo, hi)?
            };
            if new != child {
                set_entry(cache, p, i, new)?;
            }
        }
        let empty = cache
            .get(p)
            .ok_or_else(|| lost(p))?
            .entries
            .iter()
            .all(|&e| e == NULL);
        if empty {
            self.supersede(st, cache, p)?;
            return Ok(NULL);
        }
        Ok(p)
    }

    /// Supersedes every block of the subtree at `ptr`.
    fn free_subtree(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        ptr: u64,
        level: u8,
        base: u64,
    ) -> Result<()> {
        let g = st.alloc.index(ptr)?;
        if st.alloc.shared.get(g) {
            // A snapshot holds this node, hence everything below it.
            return Ok(());
        }
        let entries = self
            .node(&st.alloc, cache, ptr, level, base, st.gen + 1)?
            .entries
            .clone();
        let sp = span(level);
        for (i, &e) in entries.iter().enumerate() {
            if e == NULL {
                continue;
            }
            if level == 1 {
                self.supersede(st, cache, e)?;
            } else {
                self.free_subtree(st, cache, e, level - 1, base + i as u64 * sp)?;
            }
        }
        self.supersede(st, cache, ptr)
    }

    /// Writes dirty nodes back early when too many have piled up (they are fresh, so this is
    /// allowed at any time).
    fn relieve(&self, st: &State, cache: &mut NodeCache) -> Result<()> {
        if cache.too_dirty() {
            self.write_back(&st.alloc, cache)?;
        }
        Ok(())
    }

    /// Writes every dirty node to its block.
    fn write_back(&self, alloc: &Allocator, cache: &mut NodeCache) -> Result<()> {
        let mut buf = [0u8; BLOCK_SIZE];
        for (ptr, node) in cache.dirty_nodes() {
            // Shadow paging: only blocks of this epoch are ever written in place.
            if !alloc.is_fresh(ptr) {
                return Err(Error::Corrupt(format!(
                    "refusing to overwrite committed node at {}",
                    show_ptr(ptr)
                )));
            }
            node.encode(ptr, &mut buf);
            self.write_block_bytes(ptr, 0, &buf)?;
        }
        cache.mark_all_clean();
        Ok(())
    }

    /// The first step of a commit, under the state lock (with no data write in flight):
    /// places the annotation and checksum pages in the tree, takes their and the dirty nodes' bytes,
    /// the root record and the blocks the commit frees, and starts the next epoch. Writes made
    /// after it (to fresh blocks of the next epoch, copying the captured tree's blocks) belong
    /// to the next commit, so [`persist`](Inner::persist) may run without the lock.
    pub(super) fn capture(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        snapshots: Vec<SnapshotRecord>,
    ) -> Result<Captured> {
        self.capture_with(st, cache, |_| snapshots)
    }

    /// [`capture`](Inner::capture), with the snapshot list made by `snapshots` once the
    /// annotation and checksum pages are in the tree (a snapshot taken in this commit records
    /// the root as it is then).
    pub(super) fn capture_with(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        snapshots: impl FnOnce(&State) -> Vec<SnapshotRecord>,
    ) -> Result<Captured> {
        // Nodes a failed commit captured first: they were never written for sure.
        let mut nodes = std::mem::take(&mut st.retry);
        // Then the annotation and checksum pages, placed in the tree now and written with
        // the nodes; if placing one fails, those placed are written by the next commit.
        if let Err(e) = self.write_annotations(st, cache, &mut nodes) {
            st.retry = nodes;
            return Err(e);
        }
        let snapshots = snapshots(st);
        st.pool_keep |= !snapshots.is_empty();
        for (ptr, node) in cache.dirty_nodes() {
            // Shadow paging: only blocks of this epoch are ever written in place.
            if !st.alloc.is_fresh(ptr) {
                st.retry = nodes;
                return Err(Error::Corrupt(format!(
                    "refusing to overwrite committed node at {}",
                    show_ptr(ptr)
                )));
            }
            let mut buf = Box::new([0u8; BLOCK_SIZE]);
            node.encode(ptr, &mut buf);
            nodes.push((ptr, buf));
        }
        cache.pin_dirty();
        let gen = st.gen + 1;
        let record = RootRecord {
            capacity: self.tree_capacity,
            depth: self.depth,
            root: st.root,
            gen,
            snapshots,
            v2: st.v2.clone().map(|mut v| {
                v.tiering = self.tiering(st);
                v
            }),
        };
        let pending = std::mem::take(&mut st.pending);
        let freed: Vec<u64> = pending.iter().map(|&g| st.alloc.ptr(g)).collect();
        // Written (or punched) without the state lock from now on, until `finish`.
        st.persisting = nodes
            .iter()
            .map(|(p, _)| *p)
            .chain(freed.iter().copied())
            .collect();
        // Every block of the captured tree is now copied before it changes.
        st.alloc.end_epoch();
        st.gen = gen;
        st.changed = false;
        Ok(Captured {
            nodes,
            record,
            pending,
            freed,
            cut: self.space.shared_cut(),
        })
    }

    /// The second step of a commit, with or without the state lock: writes the captured
    /// nodes, syncs the space, then replaces the root record.
    pub(super) fn persist(&self, cap: &Captured) -> Result<()> {
        let t0 = std::time::Instant::now();
        self.write_captured(&cap.nodes)?;
        dovetail_store::failpoint::hit("parallax-commit-unsynced");
        let t1 = std::time::Instant::now();
        self.space.sync()?;
        dovetail_store::failpoint::hit("parallax-commit-synced");
        let t2 = std::time::Instant::now();
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::InvalidArgument(format!(
                "{} was closed (reopened by another handle): nothing more is committed",
                self.space.key()
            )));
        }
        self.space.commit_root_cut(&cap.record.encode(), cap.cut)?;
        dovetail_store::failpoint::hit("parallax-commit-done");
        let t3 = std::time::Instant::now();
        // Nothing committed references them any more (a snapshot's blocks are never pending),
        // and they are not allocatable before `finish`: their space is released here, outside
        // the state lock (one hole per run of blocks, maybe thousands after a timer commit).
        let mut freed = cap.freed.clone();
        self.punch_freed(&mut freed);
        // What a commit costs, step by step (`RUST_LOG=dovetail_layout::commit=debug`).
        log::debug!(
            target: "dovetail_layout::commit",
            "{}: generation {}: {} blocks written in {:?}, data synced in {:?}, root \
             committed in {:?}, {} freed blocks released in {:?}",
            self.space.key(),
            cap.record.gen,
            cap.nodes.len(),
            t1 - t0,
            t2 - t1,
            t3 - t2,
            cap.freed.len(),
            t3.elapsed()
        );
        Ok(())
    }

    /// Writes a commit's blocks (nodes, and parallax-v2's annotation and checksum pages): one
    /// write per run of consecutive blocks of one extent, at most [`RUN_BLOCKS`] long, in
    /// block order, all submitted at once on direct I/O ([`Inner::write_block_runs`]). Where a block is listed twice (a retried block written again since), the later
    /// bytes win, as they would writing the list in order.
    fn write_captured(&self, blocks: &[(u64, Box<[u8; BLOCK_SIZE]>)]) -> Result<()> {
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        // Stable: of two entries for one block, the later stays after the earlier.
        order.sort_by_key(|&i| blocks[i].0);
        let mut last: Vec<usize> = Vec::with_capacity(order.len());
        for i in order {
            match last.last_mut() {
                Some(l) if blocks[*l].0 == blocks[i].0 => *l = i,
                _ => last.push(i),
            }
        }
        let mut buf = AlignedBuf::new(last.len() * BLOCK_SIZE);
        let mut runs: Vec<BlockRun> = Vec::new();
        let out = buf.as_mut_slice();
        for (j, &i) in last.iter().enumerate() {
            let (extent, index) = locate(blocks[i].0)?;
            let at = j * BLOCK_SIZE;
            out[at..at + BLOCK_SIZE].copy_from_slice(&blocks[i].1[..]);
            match runs.last_mut() {
                Some(r)
                    if r.extent == extent
                        && u64::from(r.index) + (r.len / BLOCK_SIZE) as u64 == u64::from(index)
                        && r.len < RUN_BLOCKS * BLOCK_SIZE =>
                {
                    r.len += BLOCK_SIZE
                }
                _ => runs.push(BlockRun {
                    extent,
                    index,
                    at,
                    len: BLOCK_SIZE,
                }),
            }
        }
        self.write_block_runs(buf, &runs)
    }

    /// The last step of a commit, under the state lock: on success the captured tree is the
    /// committed one and the blocks it no longer references are freed; on failure they stay
    /// pending and the captured nodes are written again by the next commit.
    pub(super) fn finish(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        cap: Captured,
        done: Result<()>,
    ) -> Result<()> {
        // Written and synced, or failed (its nodes then wait in `retry`): no longer in flight.
        st.persisting.clear();
        if let Err(e) = done {
            // The captured nodes stay pinned in the cache until a commit writes them: the
            // store may not hold them (a read must find them in the cache, not read a block
            // never written).
            st.pending.extend(cap.pending);
            st.retry.extend(cap.nodes);
            st.changed = true;
            return Err(e);
        }
        for (ptr, _) in &cap.nodes {
            cache.unpin(*ptr);
        }
        st.snapshots = cap.record.snapshots;
        st.pool_keep = !st.snapshots.is_empty();
        st.committed_root = cap.record.root;
        for g in cap.pending {
            cache.remove(st.alloc.ptr(g));
            st.alloc.release(g);
        }
        // Emptied extent groups go back to the store only at a quiet moment: their removal
        // re-indexes the allocator, so nothing of the next epoch may be under way (no fresh
        // block, no block pending release, no captured node to retry).
        if st.pending.is_empty() && st.retry.is_empty() && !st.alloc.has_fresh() {
            self.release_empty(st);
        }
        Ok(())
    }

    /// Walks the tree at `root` (generation at most `root_gen`), reading clean nodes from the
    /// store (validated) and dirty ones from the cache. `visit(ptr, global index, level)` is
    /// called on every node (level >= 1) and data block (level 0); a node is descended only if
    /// it returns true.
    fn walk(
        &self,
        alloc: &Allocator,
        cache: &mut NodeCache,
        root: u64,
        root_gen: u64,
        visit: &mut dyn FnMut(u64, u64, u8) -> Result<bool>,
    ) -> Result<()> {
        if root == NULL {
            return Ok(());
        }
        let mut stack = vec![(root, self.depth, 0u64, root_gen)];
        while let Some((ptr, level, base, max_gen)) = stack.pop() {
            let g = alloc.index(ptr)?;
            if !visit(ptr, g, level)? {
                continue;
            }
            let node = if cache.is_dirty(ptr) {
                let n = cache.get(ptr).ok_or_else(|| lost(ptr))?.clone();
                if n.level != level || n.gen > max_gen {
                    return Err(Error::Corrupt(format!(
                        "cached node at {} has level {} generation {}, expected level {level} \
                         generation at most {max_gen}",
                        show_ptr(ptr),
                        n.level,
                        n.gen
                    )));
                }
                n
            } else {
                self.read_node(alloc, ptr, level, base, max_gen)?
            };
            let sp = span(level);
            for (i, &e) in node.entries.iter().enumerate() {
                if e == NULL {
                    continue;
                }
                if level == 1 {
                    if self.is_pool(e) {
                        // A shared block: the store's, not in this version's extents.
                        continue;
                    }
                    let g = alloc.index(e)?;
                    visit(e, g, 0)?;
                } else {
                    stack.push((e, level - 1, base + i as u64 * sp, node.gen));
                }
            }
        }
        Ok(())
    }

    /// Walks the tree at `root` like [`walk`](Inner::walk), calling `visit(disk block,
    /// pointer)` on every data block, in ascending block order.
    pub(super) fn walk_data(
        &self,
        alloc: &Allocator,
        cache: &mut NodeCache,
        root: u64,
        root_gen: u64,
        visit: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        if root == NULL {
            return Ok(());
        }
        let mut stack = vec![(root, self.depth, 0u64, root_gen)];
        while let Some((ptr, level, base, max_gen)) = stack.pop() {
            alloc.index(ptr)?;
            let node = if cache.is_dirty(ptr) {
                cache.get(ptr).ok_or_else(|| lost(ptr))?.clone()
            } else {
                self.read_node(alloc, ptr, level, base, max_gen)?
            };
            let sp = span(level);
            if level == 1 {
                for (i, &e) in node.entries.iter().enumerate() {
                    if e != NULL {
                        visit(base + i as u64, e)?;
                    }
                }
                continue;
            }
            // Pushed last to first, so popped in ascending order.
            for (i, &e) in node.entries.iter().enumerate().rev() {
                if e != NULL {
                    stack.push((e, level - 1, base + i as u64 * sp, node.gen));
                }
            }
        }
        Ok(())
    }

    /// Rebuilds free space from the committed tree and the snapshots (called right after a
    /// commit or at open, when the live tree is the committed one).
    pub(super) fn sweep(&self, st: &mut State, cache: &mut NodeCache) -> Result<()> {
        let mut used = Bitmap::default();
        let mut shared = Bitmap::default();
        let snapshots = st.snapshots.clone();
        let trees = snapshots
            .iter()
            .map(|s| (format!("snapshot {:?}", s.name), s.root, s.gen, true))
            .chain(std::iter::once((
                "the live tree".to_string(),
                st.root,
                st.gen,
                false,
            )));
        for (name, root, gen, is_snapshot) in trees {
            let mut this = Bitmap::default();
            let mut visit = |ptr: u64, g: u64, _level: u8| -> Result<bool> {
                if this.set(g) {
                    return Err(Error::Corrupt(format!(
                        "{name}: block {} is referenced twice",
                        show_ptr(ptr)
                    )));
                }
                if is_snapshot {
                    shared.set(g);
                }
                // Reached already from another tree: what lies below was marked then.
                Ok(!used.set(g))
            };
            self.walk(&st.alloc, cache, root, gen, &mut visit)?;
        }
        st.alloc.reset(used, shared);
        st.pending.clear();
        Ok(())
    }

    /// Rebuilds free space after a snapshot's deletion while requests go on. The caller holds
    /// the commit lock, right after a commit: no commit frees or reuses a block of the
    /// committed trees and nothing re-indexes the allocator meanwhile. The committed tree and
    /// the snapshots are walked from the store without the state lock (their blocks are never
    /// written in place); then, in an instant under it, the used set becomes what they reach
    /// plus what was allocated since (the next epoch's fresh blocks), the shared set what the
    /// snapshots reach, and the blocks the live tree stopped referencing meanwhile while they
    /// were marked shared go pending (the next commit frees them) unless a snapshot holds them.
    pub(super) fn sweep_concurrent(&self) -> Result<()> {
        let (alloc, trees) = {
            let mut st = self.state_write();
            st.sweeping.get_or_insert_with(Vec::new);
            let trees: Vec<(String, u64, u64, bool)> = st
                .snapshots
                .iter()
                .map(|s| (format!("snapshot {:?}", s.name), s.root, s.gen, true))
                .chain(std::iter::once((
                    "the committed tree".to_string(),
                    st.committed_root,
                    st.gen,
                    false,
                )))
                .collect();
            (st.alloc.clone(), trees)
        };
        let walked = self.reach(&alloc, trees);
        let mut st = self.write_io();
        let dropped = st.sweeping.take().unwrap_or_default();
        let (mut used, shared) = walked?;
        // The mover's copies in flight: allocated, maybe before a commit that ended their
        // epoch (so neither fresh nor in a committed tree), and about to be pointed at.
        for &p in &st.moving {
            used.set(st.alloc.index(p)?);
        }
        for g in dropped {
            if used.get(g) && !shared.get(g) {
                st.pending.push(g);
            }
        }
        st.alloc.reset_keeping_fresh(used, shared);
        let mut cache = self.cache();
        self.pool_sweep(&mut st, &mut cache, false);
        Ok(())
    }

    /// The blocks the trees `(name, root, generation, is a snapshot)` reach, and those the
    /// snapshots reach, every node read from the store (none of them may be dirty).
    fn reach(
        &self,
        alloc: &Allocator,
        trees: Vec<(String, u64, u64, bool)>,
    ) -> Result<(Bitmap, Bitmap)> {
        let mut used = Bitmap::default();
        let mut shared = Bitmap::default();
        let mut none = NodeCache::new(0);
        for (name, root, gen, is_snapshot) in trees {
            let mut this = Bitmap::default();
            let mut visit = |ptr: u64, g: u64, _level: u8| -> Result<bool> {
                if this.set(g) {
                    return Err(Error::Corrupt(format!(
                        "{name}: block {} is referenced twice",
                        show_ptr(ptr)
                    )));
                }
                if is_snapshot {
                    shared.set(g);
                }
                // Reached already from another tree: what lies below was marked then.
                Ok(!used.set(g))
            };
            self.walk(alloc, &mut none, root, gen, &mut visit)?;
        }
        Ok((used, shared))
    }

    /// See [`Parallax::check`](super::Parallax::check).
    pub(super) fn check(&self, st: &State, cache: &mut NodeCache) -> Vec<String> {
        let mut problems = Vec::new();
        let alloc = &st.alloc;
        let mut reach = Bitmap::default();
        let mut reach_snap = Bitmap::default();
        let mut reach_committed = Bitmap::default();
        let mut trees: Vec<(String, u64, u64, u8)> = st
            .snapshots
            .iter()
            .map(|s| (format!("snapshot {:?}", s.name), s.root, s.gen, 0))
            .collect();
        trees.push(("the live tree".to_string(), st.root, st.gen + 1, 1));
        if st.committed_root != st.root {
            trees.push((
                "the committed tree".to_string(),
                st.committed_root,
                st.gen,
                2,
            ));
        }
        for (name, root, gen, kind) in trees {
            let mut this = Bitmap::default();
            let mut found = Vec::new();
            let mut visit = |ptr: u64, g: u64, _level: u8| -> Result<bool> {
                if this.set(g) {
                    found.push(format!(
                        "{name}: block {} is referenced twice",
                        show_ptr(ptr)
                    ));
                    return Ok(false);
                }
                match kind {
                    0 => {
                        reach_snap.set(g);
                        reach.set(g);
                    }
                    1 => {
                        reach.set(g);
                    }
                    _ => {
                        reach_committed.set(g);
                    }
                }
                if !alloc.used.get(g) {
                    found.push(format!(
                        "{name}: block {} is reachable but marked free",
                        show_ptr(ptr)
                    ));
                }
                Ok(true)
            };
            if let Err(e) = self.walk(alloc, cache, root, gen, &mut visit) {
                found.push(format!("{name}: {}", crate::error_chain(&e)));
            }
            problems.extend(found);
        }
        let mut pending = Bitmap::default();
        for &g in &st.pending {
            if pending.set(g) {
                problems.push(format!(
                    "block {} is pending free twice",
                    show_ptr(alloc.ptr(g))
                ));
            }
            if reach.get(g) {
                problems.push(format!(
                    "block {} is pending free but still reachable",
                    show_ptr(alloc.ptr(g))
                ));
            }
        }
        let mut moving = Bitmap::default();
        for &p in &st.moving {
            if let Ok(g) = alloc.index(p) {
                moving.set(g);
            }
        }
        let (mut leaked, mut unshared, mut stale_fresh) = (0u64, 0u64, 0u64);
        for g in 0..alloc.total() {
            let accounted =
                reach.get(g) || reach_committed.get(g) || pending.get(g) || moving.get(g);
            if alloc.used.get(g) && !accounted {
                leaked += 1;
            }
            if reach_snap.get(g) && !alloc.shared.get(g) {
                unshared += 1;
            }
            if alloc.fresh.get(g) && !reach.get(g) && !moving.get(g) {
                stale_fresh += 1;
            }
        }
        if leaked > 0 {
            problems.push(format!(
                "{leaked} blocks are marked used but are neither reachable nor pending free"
            ));
        }
        if unshared > 0 {
            problems.push(format!(
                "{unshared} blocks reachable from a snapshot are not protected as shared"
            ));
        }
        if stale_fresh > 0 {
            problems.push(format!(
                "{stale_fresh} blocks allocated in this epoch are not in the live tree"
            ));
        }
        let used = alloc.used.count();
        if used + alloc.free() != alloc.total() {
            problems.push(format!(
                "used {used} + free {} != total {} blocks",
                alloc.free(),
                alloc.total()
            ));
        }
        if problems.len() > MAX_PROBLEMS {
            let more = problems.len() - MAX_PROBLEMS;
            problems.truncate(MAX_PROBLEMS);
            problems.push(format!("... and {more} more"));
        }
        problems
    }
}
