//! Growing a disk: a larger guest capacity, committed as one new root record.
//!
//! The tree gains levels when the new size needs them (a new root node whose first entry is
//! the old root, once per level), and parallax-v2's annotation and checksum pages, which live
//! in the tree blocks right after the guest's last block, move to their places after the new
//! last block: the tree's pointers to the old pages are dropped (so the guest's new blocks
//! read as zeroes) and every page is written again, from the tables in memory, at its new
//! place. All of it is copy-on-write into blocks of the next epoch, and the new root record
//! (capacity, depth, root, parallax-v2's guest capacity) is committed at once: a crash before
//! that commit leaves the old disk as it was, after it the grown one (docs/format.md, *Growing
//! a disk*).

use super::*;

impl Parallax {
    /// Opens the disk in `space` (as [`Parallax::open_with`]) and, if its guest capacity is
    /// below `capacity`, grows it to `capacity` sectors and commits that before returning.
    /// A capacity below the disk's is refused (shrinking is not supported); so are sizes the
    /// tree cannot address and, while the disk has snapshots, a growth that adds a tree level
    /// or moves parallax-v2's pages (a snapshot's tree keeps the old shape, which its record
    /// does not describe). On error the disk is unchanged.
    pub fn open_grown(
        space: Arc<dyn VersionSpace>,
        capacity: Sectors,
        opts: ParallaxOptions,
    ) -> Result<Parallax> {
        let inner = Parallax::open_inner(space, &opts)?;
        let inner = if capacity > inner.capacity {
            inner.grown(capacity)?
        } else if capacity < inner.capacity {
            return Err(Error::InvalidArgument(format!(
                "{} is {}; shrinking it to {capacity} is not supported",
                inner.space.key(),
                inner.capacity
            )));
        } else {
            inner
        };
        Parallax::start(inner, &opts)
    }

    /// The tree blocks a disk of `capacity` sectors of `layout` needs, and the tree depth
    /// they take; an error if the tree cannot address them.
    pub fn tree_size(layout: &str, capacity: Sectors) -> Result<(u64, u8)> {
        let guest = disk_blocks(capacity);
        let blocks = match layout {
            "parallax-v1" => Some(guest),
            _ => Some(guest)
                .filter(|&g| g <= format::MAX_V2_GUEST_BLOCKS)
                .and_then(|g| g.checked_add(annotation_pages(g)))
                .and_then(|b| b.checked_add(sumpage::pages_for(guest))),
        };
        let blocks = blocks
            .filter(|b| b.checked_mul(SECTORS_PER_BLOCK).is_some())
            .filter(|b| b.checked_mul(BLOCK_SIZE as u64).is_some())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("a capacity of {capacity} is too large"))
            })?;
        Ok((blocks, depth_for(blocks)))
    }
}

impl Parallax {
    /// Stops this handle from committing anything more (flush it first): its root record
    /// commits, the annotation timer's included, fail from now on. For a version about to be
    /// reopened by another handle (a live grow), so the old one cannot overwrite the new
    /// root record.
    pub fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.punches.stop();
    }
}

impl Drop for Parallax {
    /// Nothing of this handle punches after it is gone: a handle opened next on the version
    /// may allocate the blocks it held for its puncher ([`punch`](super::punch)).
    fn drop(&mut self) {
        self.inner.punches.stop();
    }
}

/// The shape of a grown disk ([`Inner::geometry`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) capacity: Sectors,
    pub(super) tree_capacity: Sectors,
    /// Tree blocks: the guest's, then parallax-v2's annotation and checksum pages.
    pub(super) tree: u64,
    pub(super) guest: u64,
    pub(super) depth: u8,
}

impl Inner {
    /// The shape of this disk grown to `capacity` sectors (more than it has), or why it
    /// cannot grow to it: a size the tree cannot address, or snapshots whose trees keep the
    /// old shape while the growth adds a tree level or moves parallax-v2's pages.
    pub(super) fn geometry(&self, capacity: Sectors) -> Result<Geometry> {
        let key = self.space.key();
        let old_capacity = self.capacity;
        let old_guest = disk_blocks(old_capacity);
        let guest = disk_blocks(capacity);
        let st = self.read();
        let v2 = st.v2.is_some();
        let sums_on = st.v2.as_ref().is_some_and(|v| v.sums);
        let tree = match v2 {
            false => guest,
            true => Some(guest)
                .filter(|&g| g <= format::MAX_V2_GUEST_BLOCKS)
                .and_then(|g| g.checked_add(annotation_pages(g)))
                .and_then(|b| {
                    b.checked_add(if sums_on {
                        sumpage::pages_for(guest)
                    } else {
                        0
                    })
                })
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("a capacity of {capacity} is too large"))
                })?,
        };
        // parallax-v1's record holds the guest's capacity itself; parallax-v2's the tree's.
        let tree_capacity = tree
            .checked_mul(SECTORS_PER_BLOCK)
            .map(|t| if v2 { t } else { capacity.0 })
            .map(Sectors)
            .filter(|c| c.bytes().is_some())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("a capacity of {capacity} is too large"))
            })?;
        let depth = depth_for(tree);
        let moves_pages = v2 && guest != old_guest;
        if !st.snapshots.is_empty() && (depth != self.depth || moves_pages) {
            return Err(Error::InvalidArgument(format!(
                "{key} has {} snapshot(s), whose trees keep the disk's old shape: growing \
                 it from {old_capacity} to {capacity} {}; delete its snapshots first",
                st.snapshots.len(),
                if depth != self.depth {
                    "adds a tree level"
                } else {
                    "moves its annotation and checksum pages"
                }
            )));
        }
        Ok(Geometry {
            capacity,
            tree_capacity,
            tree,
            guest,
            depth,
        })
    }

    /// This disk grown to `capacity` sectors (more than it has), committed.
    fn grown(self, capacity: Sectors) -> Result<Inner> {
        let key = self.space.key();
        let old_capacity = self.capacity;
        let old_guest = disk_blocks(old_capacity);
        let old_tree = self.blocks;
        let g = self.geometry(capacity)?;
        let guest = g.guest;
        let v2 = self.read().v2.is_some();
        // The annotations and checksums of the old blocks, in tables of the new size; every
        // page is written at its new place by the commit below.
        let ann = self.ann.as_ref().map(|a| {
            let table = Table::new(guest, a.table.epochs());
            for b in 0..old_guest {
                table.set(b, a.table.get(b));
            }
            table.set_active_taint(a.table.active_taint());
            for p in 0..table.pages() {
                table.mark_dirty(p);
            }
            Ann { table, at: guest }
        });
        let new_sums = self.sums.as_ref().map(|(s, _)| {
            let n = sumpage::Sums::new(guest);
            for b in 0..old_guest {
                n.set(b, s.get(b));
            }
            for p in 0..n.pages() {
                n.mark_dirty(p);
            }
            (n, guest + annotation_pages(guest))
        });
        let Inner {
            space,
            capacity: _,
            tree_capacity: _,
            blocks: _,
            ann: _,
            sums: _,
            depth: old_depth,
            committing,
            group,
            stripes,
            inflight,
            reserve,
            punches,
            state,
            cache,
            tiered,
            groups,
            temps,
            counters,
            closed,
            pool,
            grow_watch,
        } = self;
        let inner = Inner {
            space,
            capacity,
            tree_capacity: g.tree_capacity,
            blocks: g.tree,
            ann,
            sums: new_sums,
            depth: g.depth,
            committing,
            group,
            stripes,
            inflight,
            reserve,
            punches,
            state,
            cache,
            tiered,
            groups,
            temps,
            counters,
            closed,
            pool,
            grow_watch,
        };
        inner.grow_tree(old_depth, old_guest, old_tree, capacity)?;
        log::info!(
            "{}: {key} grown from {old_capacity} to {capacity} (tree depth {old_depth} -> {})",
            if v2 { "parallax-v2" } else { "parallax-v1" },
            g.depth,
        );
        Ok(inner)
    }

    /// Reshapes the live tree for the grown size and commits it: levels added above the old
    /// root, parallax-v2's old page blocks dropped (the new pages are written by the commit).
    fn grow_tree(
        &self,
        old_depth: u8,
        old_guest: u64,
        old_tree: u64,
        capacity: Sectors,
    ) -> Result<()> {
        // A whole-version change: its own turn, the tree captured under the state lock, then
        // written and published (nothing else runs on a version being opened).
        let turn = self.turn();
        let mut st = self.write_io();
        let mut cache = self.cache();
        self.reshape(
            &mut st, &mut cache, old_depth, old_guest, old_tree, capacity,
        )?;
        let snapshots = st.snapshots.clone();
        let cap = self.capture(&mut st, &mut cache, snapshots)?;
        drop(cache);
        drop(st);
        self.end_turn(&turn, cap, |_| {})
    }

    /// The live tree's change for the grown size (this handle's geometry), in memory and
    /// copy-on-write into blocks of the next epoch: levels added above the old root,
    /// parallax-v2's guest capacity raised and its old page blocks dropped, so the guest's new
    /// blocks read as zeroes (the pages at their new places are written before the next
    /// commit's root record, by that commit at the latest: they are all dirty).
    pub(super) fn reshape(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        old_depth: u8,
        old_guest: u64,
        old_tree: u64,
        capacity: Sectors,
    ) -> Result<()> {
        let epoch = st.gen + 1;
        for level in old_depth + 1..=self.depth {
            if st.root == NULL {
                break;
            }
            let ptr = self.alloc_block(st, true, 0)?;
            let mut node = Node::empty(level, epoch);
            node.entries[0] = st.root;
            cache.insert(ptr, node, true);
            st.root = ptr;
        }
        if let Some(v2) = st.v2.as_mut() {
            v2.guest_capacity = capacity;
        }
        if self.ann.is_some() && old_tree > old_guest {
            let root = st.root;
            let new_root = self.drop_range(st, cache, root, self.depth, 0, old_guest, old_tree)?;
            st.root = new_root;
        }
        st.changed = true;
        Ok(())
    }
}
