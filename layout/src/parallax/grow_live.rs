//! Growing a served disk without reopening it, so that the guest's pause does not depend on
//! the disk's size.
//!
//! [`Parallax::open_grown`] (docs/format.md, *Growing a disk*) reopens the version grown: it reads
//! every annotation and checksum page back, copies the tables into tables of the new size and
//! writes every page at its new place, all of it while the guest waits. The live grow splits
//! the same change in three steps, with only the second one inside the pause:
//!
//! 1. [`Parallax::prepare_grow`], I/O running: the new size is checked, the tables of the new
//!    size are allocated and the old tables copied into them, while a watch records the pages
//!    whose dirty marks the version's commits take meanwhile.
//! 2. [`Parallax::grow_prepared`], in the pause (no request in flight): the pages changed since
//!    their copy (those the watch saw, and those dirty now) are copied again, the version's
//!    state, node cache and extent groups move into a new handle of the new shape (this one is
//!    closed: it commits nothing more), and the live tree is reshaped in memory (levels added,
//!    parallax-v2's old page blocks dropped so the guest's new blocks read as zeroes). Nothing
//!    is read from the store or written to it but the few tree levels' nodes, into the cache.
//! 3. [`Parallax::finish_grow`], I/O running again (the guest not yet told): every page is
//!    written at its new place in small batches, each under the state lock for an instant,
//!    then one commit makes it durable with the new root record.
//!
//! Crash safety is the reopening grow's: nothing reachable from the committed root changes
//! before the commit of step 3 (every change is copy-on-write into the next epoch), so a crash
//! before it leaves the old disk, whose next open grows it to the catalog's size
//! (`Parallax::open_grown`), and a crash after it the grown disk. A commit that a guest's
//! FLUSH makes between steps 2 and 3's end writes the pages not written yet itself (they are
//! dirty), so every root record of the new shape has all its pages.

use super::*;

/// A live grow prepared by [`Parallax::prepare_grow`], for [`Parallax::grow_prepared`].
pub struct GrowPlan {
    geometry: grow::Geometry,
    old_capacity: Sectors,
    ann: Option<Table>,
    sums: Option<sumpage::Sums>,
    /// The version whose commits the watch follows: a plan dropped unused stops the watch.
    watched: Weak<Inner>,
}

impl Drop for GrowPlan {
    fn drop(&mut self) {
        if let Some(inner) = self.watched.upgrade() {
            inner
                .grow_watch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
    }
}

impl fmt::Debug for GrowPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrowPlan")
            .field("from", &self.old_capacity)
            .field("to", &self.geometry.capacity)
            .field("depth", &self.geometry.depth)
            .finish_non_exhaustive()
    }
}

impl GrowPlan {
    /// The capacity the disk grows to.
    pub fn capacity(&self) -> Sectors {
        self.geometry.capacity
    }
}

/// Pages written per batch by [`Parallax::finish_grow`] (each batch holds the state lock).
const BATCH_PAGES: u64 = 16;

impl Inner {
    /// Records pages whose dirty marks a commit took, while a live grow watches.
    pub(super) fn watch_taken(&self, ann: &[u64], sums: &[u64]) {
        if ann.is_empty() && sums.is_empty() {
            return;
        }
        let mut w = self.grow_watch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = w.as_mut() {
            w.ann.extend_from_slice(ann);
            w.sums.extend_from_slice(sums);
        }
    }
}

impl Parallax {
    /// Step 1 of a live grow (module `grow_live`): checks that the disk can grow to
    /// `capacity` sectors (more than it has: the checks of [`Parallax::open_grown`]) and
    /// prepares the tables of the new size, with I/O running. Changes nothing of the disk.
    pub fn prepare_grow(&self, capacity: Sectors) -> Result<GrowPlan> {
        let inner = &*self.inner;
        if capacity <= inner.capacity {
            return Err(Error::InvalidArgument(format!(
                "{} is {}; growing it to {capacity} is not growing it",
                inner.space.key(),
                inner.capacity
            )));
        }
        let geometry = inner.geometry(capacity)?;
        let old_guest = disk_blocks(inner.capacity);
        let guest = geometry.guest;
        // Armed before the copy: an update after a block's copy marks its page dirty after
        // the update, so the page is dirty at the pause or a commit took it (and the watch
        // saw it).
        *inner.grow_watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(GrowWatch::default());
        let ann = inner.ann.as_ref().map(|a| {
            let table = Table::new(guest, a.table.epochs());
            for b in 0..old_guest {
                table.set(b, a.table.get(b));
            }
            for p in 0..table.pages() {
                table.mark_dirty(p);
            }
            table
        });
        let sums = inner.sums.as_ref().map(|(s, _)| {
            let n = sumpage::Sums::new(guest);
            for b in 0..old_guest {
                n.set(b, s.get(b));
            }
            for p in 0..n.pages() {
                n.mark_dirty(p);
            }
            n
        });
        Ok(GrowPlan {
            geometry,
            old_capacity: inner.capacity,
            ann,
            sums,
            watched: Arc::downgrade(&self.inner),
        })
    }

    /// Step 2 of a live grow: call it with no request in flight on this handle (inside the
    /// disk's pause). Returns the grown disk, a new handle serving the same version (its
    /// annotation timer started with `opts`); this handle is closed (it commits nothing more
    /// and takes no requests). The grown shape is not committed yet:
    /// [`finish_grow`](Parallax::finish_grow) does it, and until then a crash leaves the old
    /// disk. This handle commits what it holds first; after an error it may be closed, and
    /// the version is to be reopened (its committed tree holds everything).
    pub fn grow_prepared(&self, mut plan: GrowPlan, opts: &ParallaxOptions) -> Result<Parallax> {
        let old = &*self.inner;
        let (g, old_capacity, ann, new_sums) = (
            plan.geometry,
            plan.old_capacity,
            plan.ann.take(),
            plan.sums.take(),
        );
        if !std::ptr::eq(plan.watched.as_ptr(), old) {
            return Err(Error::InvalidArgument(format!(
                "{}: the grow was prepared for another handle",
                old.space.key()
            )));
        }
        if old_capacity != old.capacity || old.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::InvalidArgument(format!(
                "{}: the grow was prepared for another state of the disk",
                old.space.key()
            )));
        }
        // Everything this handle holds is committed first (nothing to do after the caller's
        // flush): should the change below fail, the committed tree is the disk.
        old.commit_concurrent(None)?;
        // The commit lock, the state lock and no write in flight: nothing of the old handle
        // runs while its state moves.
        let mut ex = old.write();
        let watch = old
            .grow_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let old_guest = disk_blocks(old.capacity);
        let ann = match (ann, &old.ann) {
            (Some(table), Some(a)) => {
                let mut pages = watch.ann;
                pages.extend(a.table.take_dirty());
                pages.sort_unstable();
                pages.dedup();
                for p in pages {
                    for b in a.table.page_blocks(p) {
                        table.set(b, a.table.get(b));
                    }
                }
                table.set_active_taint(a.table.active_taint());
                Some(Ann { table, at: g.guest })
            }
            _ => None,
        };
        let new_sums = match (new_sums, &old.sums) {
            (Some(n), Some((s, _))) => {
                let mut pages = watch.sums;
                pages.extend(s.take_dirty());
                pages.sort_unstable();
                pages.dedup();
                for p in pages {
                    let lo = p * sumpage::PER_PAGE;
                    for b in lo..(lo + sumpage::PER_PAGE).min(old_guest) {
                        n.set(b, s.get(b));
                    }
                }
                Some((n, g.guest + annotation_pages(g.guest)))
            }
            _ => None,
        };
        // The old handle keeps an empty state (it is closed: nothing reads it but a status
        // racing with the swap, which sees an empty disk).
        let per_extent = old.space.extent_size() / BLOCK_SIZE as u64;
        let gen = ex.gen;
        let mut state = std::mem::replace(
            &mut *ex,
            State {
                root: NULL,
                committed_root: NULL,
                gen,
                snapshots: Vec::new(),
                alloc: Allocator::new(&[], per_extent.max(1)),
                pending: Vec::new(),
                changed: false,
                retry: Vec::new(),
                sweeping: None,
                v2: None,
                place: None,
                pool_deferred: Vec::new(),
                pool_keep: false,
                persisting: Default::default(),
                moving: Default::default(),
                punching: Default::default(),
            },
        );
        let cache = std::mem::replace(&mut *old.cache(), NodeCache::new(16));
        let groups = std::mem::take(&mut *old.groups.write().unwrap_or_else(|p| p.into_inner()));
        let temps = std::mem::take(&mut *old.temps.lock().unwrap_or_else(|p| p.into_inner()));
        old.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        // The old handle's puncher punches nothing from now on: the blocks it held are free
        // for the new handle.
        old.punches.stop();
        for ptr in std::mem::take(&mut state.punching) {
            if let Ok(i) = state.alloc.index(ptr) {
                state.alloc.release(i);
            }
        }
        let inner = Inner {
            space: old.space.clone(),
            capacity: g.capacity,
            tree_capacity: g.tree_capacity,
            blocks: g.tree,
            ann,
            sums: new_sums,
            depth: g.depth,
            committing: Mutex::new(()),
            group: Mutex::default(),
            stripes: stripes::Stripes::new(),
            inflight: stripes::Inflight::default(),
            reserve: Arc::default(),
            punches: Arc::default(),
            state: RwLock::new(state),
            cache: RwLock::new(cache),
            tiered: old.tiered,
            groups: RwLock::new(groups),
            temps: std::sync::Mutex::new(temps),
            counters: groups::TierCounters::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
            pool: old.pool.take(),
            grow_watch: Mutex::default(),
        };
        {
            let mut st = inner.state_write();
            let mut cache = inner.cache();
            let reshaped = inner.reshape(
                &mut st, &mut cache, old.depth, old_guest, old.blocks, g.capacity,
            );
            if let Err(e) = reshaped {
                // The tree's change was in memory only and the committed tree holds
                // everything (committed first, above): the caller reopens the version.
                log::warn!(
                    "{}: growing in place failed ({}); the version must be reopened",
                    inner.space.key(),
                    crate::error_chain(&e)
                );
                return Err(e);
            }
        }
        drop(ex);
        log::info!(
            "{}: {} grown in place from {old_capacity} to {} (tree depth {} -> {}); its pages \
             are written next",
            if inner.ann.is_some() {
                "parallax-v2"
            } else {
                "parallax-v1"
            },
            inner.space.key(),
            g.capacity,
            old.depth,
            g.depth,
        );
        Parallax::start(inner, opts)
    }

    /// Step 3 of a live grow, on the handle [`grow_prepared`](Parallax::grow_prepared)
    /// returned, with I/O running: writes the annotation and checksum pages at their new
    /// places, a few at a time under the state lock, then commits (the grown shape is durable
    /// when this returns).
    pub fn finish_grow(&self) -> Result<()> {
        let inner = &*self.inner;
        if let Some(a) = &inner.ann {
            inner.write_pages_batched(
                a.table.pages(),
                a.at,
                |p| a.table.take_dirty_page(p),
                |p, buf| a.table.encode_page(p, buf),
                |p| a.table.mark_dirty(p),
            )?;
        }
        if let Some((s, at)) = &inner.sums {
            inner.write_pages_batched(
                s.pages(),
                *at,
                |p| s.take_dirty_page(p),
                |p, buf| s.encode(p, buf),
                |p| s.mark_dirty(p),
            )?;
        }
        BlockLayout::flush(self)
    }
}

impl Inner {
    /// Writes pages `0..pages` that are dirty (`take` clears a page's mark) at tree blocks
    /// from `at`, [`BATCH_PAGES`] per hold of the state lock; a page that fails is marked
    /// dirty again (`mark`), so the next commit writes it.
    fn write_pages_batched(
        &self,
        pages: u64,
        at: u64,
        take: impl Fn(u64) -> bool,
        encode: impl Fn(u64, &mut [u8]),
        mark: impl Fn(u64),
    ) -> Result<()> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut first = 0;
        while first < pages {
            let end = (first + BATCH_PAGES).min(pages);
            let mut st = self.write_io();
            let mut cache = self.cache();
            for p in first..end {
                if !take(p) {
                    continue;
                }
                encode(p, &mut buf);
                if let Err(e) =
                    self.write_tree(&mut st, &mut cache, (at + p) * BLOCK_SIZE as u64, &buf)
                {
                    mark(p);
                    return Err(e);
                }
            }
            first = end;
        }
        Ok(())
    }
}
