//! Finding blocks: the node cache and the walks down the tree from a root.

use super::*;

impl Inner {
    pub(super) fn cache(&self) -> RwLockWriteGuard<'_, NodeCache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_shared(&self) -> RwLockReadGuard<'_, NodeCache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    /// [`resolve`](Inner::resolve) under the cache's shared lock when the whole path is cached
    /// (the common case), else under its exclusive lock, reading what is missing.
    pub(super) fn resolve_shared(
        &self,
        alloc: &Allocator,
        root: u64,
        root_gen: u64,
        b: u64,
    ) -> Result<u64> {
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
        // A node missing from the cache is read with no cache lock held, then inserted: the
        // exclusive lock is held for the insert only, never across a read of the store, so a
        // thread loading nodes (a cold cache: every leaf once) neither serialises the other
        // loaders nor holds off the lookups of cached paths (a queue worker's mapped reads).
        // A node that is not cached was written (dirty nodes stay cached until written), and
        // the caller holds the state lock, so no commit frees or reuses its block meanwhile.
        let (mut ptr, mut max_gen, mut base) = (root, root_gen, 0u64);
        for level in (1..=self.depth).rev() {
            if ptr == NULL {
                return Ok(NULL);
            }
            let sp = span(level);
            let i = ((b - base) / sp) as usize;
            let cached = self.cache_shared().peek(ptr, i);
            let (got_level, gen, next) = match cached {
                Some(found) => found,
                None => {
                    let node = self.read_node(alloc, ptr, level, base, max_gen)?;
                    let found = (node.level, node.gen, node.entries[i]);
                    let mut cache = self.cache();
                    // Another thread may have loaded it meanwhile: its copy is kept.
                    match cache.peek(ptr, i) {
                        Some(theirs) => theirs,
                        None => {
                            cache.insert(ptr, node, false);
                            found
                        }
                    }
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

    /// The data block pointer of disk block `b` in the tree at `root` when every node of its
    /// path is cached (`None` otherwise: nothing is read), under the cache's shared lock.
    pub(super) fn resolve_cached(&self, root: u64, b: u64) -> Option<u64> {
        // Without waiting (a queue worker must not: `map_direct`): `None` while a thread
        // inserts a node it loaded, or waits to.
        let cache = match self.cache.try_read() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let (mut ptr, mut base) = (root, 0u64);
        for level in (1..=self.depth).rev() {
            if ptr == NULL {
                return Some(NULL);
            }
            let sp = span(level);
            let i = ((b - base) / sp) as usize;
            match cache.peek(ptr, i) {
                Some((got, _, next)) if got == level => {
                    base += i as u64 * sp;
                    ptr = next;
                }
                _ => return None,
            }
        }
        Some(ptr)
    }

    /// Reads and validates the node at `ptr`, which a node of generation `max_gen` (or the root
    /// record) points at as a node of `level` covering disk blocks from `base`.
    pub(super) fn read_node(
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
            if level == 1 && self.is_pool(e) {
                // A shared block the version holds (checked by `store check`).
                continue;
            }
            alloc.check_ptr(e).map_err(|err| {
                Error::Corrupt(format!("node at {}, entry {i}: {err}", show_ptr(ptr)))
            })?;
        }
        Ok(node)
    }

    /// The node at `ptr`, from the cache or read (and cached).
    pub(super) fn node<'c>(
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
    pub(super) fn resolve(
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
    pub(super) fn read_tree(
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
    pub(super) fn read_tree_into(
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
                if self.is_pool(r.ptr) {
                    // A shared block: verified against its checksum, through a buffer.
                    let mut tmp = vec![0u8; r.len];
                    self.read_pool(r.ptr, r.off, &mut tmp)?;
                    // SAFETY: the iovecs lie within `bufs`, valid for writes while it lives;
                    // `tmp` is ours and as long as the iovecs.
                    unsafe { dovetail_store::file::copy_to_iovecs(&tmp, &iov) };
                    return Ok(());
                }
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
