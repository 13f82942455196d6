//! Block allocation inside a version's extents, in memory only: the persistent truth is the set
//! of blocks reachable from the committed root and the snapshots, rebuilt by a sweep at open.
//!
//! Every block of every extent granted to the version has a global index
//! (`position of its extent in the grant order * blocks per extent + index in the extent`) and
//! three bits:
//! - `used`: not available for allocation (reachable from the live tree, the committed tree or a
//!   snapshot, or superseded and waiting for the next commit to be freed);
//! - `fresh`: allocated since the last commit, so reachable from no committed root and from no
//!   snapshot: it may be rewritten in place, and freed at once when superseded;
//! - `shared`: reachable from a snapshot: never freed without a sweep.

use std::collections::HashMap;

use dovetail_store::ExtentId;

use super::format::{make_ptr, show_ptr, split_ptr, NULL};
use crate::{Error, Result};

/// A growable bitmap.
#[derive(Debug, Clone, Default)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; returns whether it was already set.
    pub fn set(&mut self, i: u64) -> bool {
        let w = (i / 64) as usize;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let was = self.words[w] & (1 << (i % 64)) != 0;
        self.words[w] |= 1 << (i % 64);
        was
    }

    pub fn clear(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The last clear bit below `end`.
    fn last_clear(&self, end: u64) -> Option<u64> {
        let mut i = end;
        while i > 0 {
            let w = self
                .words
                .get(((i - 1) / 64) as usize)
                .copied()
                .unwrap_or(0);
            let base = (i - 1) / 64 * 64;
            // Only bits below `i` count: treat the ones above as set.
            let upto = i - base;
            let masked = if upto == 64 {
                w
            } else {
                w | (u64::MAX << upto)
            };
            if masked != u64::MAX {
                return Some(base + 63 - u64::from(masked.leading_ones()));
            }
            i = base;
        }
        None
    }

    /// The first clear bit in `[from, end)`.
    fn first_clear(&self, from: u64, end: u64) -> Option<u64> {
        let mut i = from;
        while i < end {
            let w = self.words.get((i / 64) as usize).copied().unwrap_or(0);
            let masked = w | ((1u64 << (i % 64)) - 1);
            if masked != u64::MAX {
                let bit = (i / 64) * 64 + u64::from(masked.trailing_ones());
                return (bit < end).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }
}

/// The allocator of one version's blocks.
#[derive(Debug, Clone)]
pub struct Allocator {
    extents: Vec<ExtentId>,
    position: HashMap<u32, u64>,
    per_extent: u64,
    pub used: Bitmap,
    pub fresh: Bitmap,
    pub shared: Bitmap,
    fresh_list: Vec<u64>,
    free: u64,
    cursor: u64,
    /// Free blocks per extent position.
    pfree: Vec<u64>,
}

impl Allocator {
    /// An allocator over `extents` (all blocks free), `per_extent` blocks each.
    pub fn new(extents: &[ExtentId], per_extent: u64) -> Allocator {
        let mut a = Allocator {
            extents: Vec::new(),
            position: HashMap::new(),
            per_extent,
            used: Bitmap::default(),
            fresh: Bitmap::default(),
            shared: Bitmap::default(),
            fresh_list: Vec::new(),
            free: 0,
            cursor: 0,
            pfree: Vec::new(),
        };
        for &e in extents {
            a.add_extent(e);
        }
        a
    }

    /// Adds a newly granted extent, all its blocks free.
    pub fn add_extent(&mut self, e: ExtentId) {
        if self.position.contains_key(&e.0) {
            return;
        }
        self.position.insert(e.0, self.extents.len() as u64);
        self.extents.push(e);
        self.free += self.per_extent;
        self.pfree.push(self.per_extent);
    }

    /// The position of extent `e` in this allocator, if it holds it.
    pub fn position(&self, e: ExtentId) -> Option<u64> {
        self.position.get(&e.0).copied()
    }

    /// Free blocks of the extent at `pos`.
    pub fn free_at(&self, pos: u64) -> u64 {
        self.pfree.get(pos as usize).copied().unwrap_or(0)
    }

    /// Allocates a free block of the extent at `pos` (data upwards from the bottom, nodes
    /// downwards from the top), marking it used and fresh.
    pub fn alloc_at(&mut self, pos: u64, node: bool) -> Option<u64> {
        if self.free_at(pos) == 0 {
            return None;
        }
        let (lo, hi) = (pos * self.per_extent, (pos + 1) * self.per_extent);
        let g = if node {
            self.used.last_clear(hi).filter(|&g| g >= lo)?
        } else {
            self.used
                .first_clear(self.cursor.clamp(lo, hi), hi)
                .or_else(|| self.used.first_clear(lo, hi))?
        };
        if !node {
            self.cursor = g + 1;
        }
        Some(self.take(g))
    }

    pub fn extents(&self) -> &[ExtentId] {
        &self.extents
    }

    pub fn total(&self) -> u64 {
        self.extents.len() as u64 * self.per_extent
    }

    pub fn free(&self) -> u64 {
        self.free
    }

    /// Global index of a pointer, or an error if it does not name a block of this version.
    pub fn index(&self, ptr: u64) -> Result<u64> {
        let bad = || {
            Error::Corrupt(format!(
                "pointer {} is outside the version's extents",
                show_ptr(ptr)
            ))
        };
        let (e, i) = split_ptr(ptr).ok_or_else(bad)?;
        let pos = self.position.get(&e.0).ok_or_else(bad)?;
        if u64::from(i) >= self.per_extent {
            return Err(bad());
        }
        Ok(pos * self.per_extent + u64::from(i))
    }

    /// The pointer of a global index.
    pub fn ptr(&self, g: u64) -> u64 {
        let e = self.extents[(g / self.per_extent) as usize];
        make_ptr(e, (g % self.per_extent) as u32)
    }

    /// Whether `ptr` (non-null, valid) may be rewritten in place.
    pub fn is_fresh(&self, ptr: u64) -> bool {
        self.index(ptr).is_ok_and(|g| self.fresh.get(g))
    }

    /// Allocates a free block for data, marking it used and fresh; `None` if every block is
    /// used. Data blocks are taken upwards from a cursor, so a disk written sequentially is
    /// stored sequentially (and read back with few, large, aligned reads).
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let total = self.total();
        let g = self
            .used
            .first_clear(self.cursor, total)
            .or_else(|| self.used.first_clear(0, self.cursor.min(total)))?;
        self.cursor = g + 1;
        Some(self.take(g))
    }

    /// Allocates a free block for a tree node. Nodes are taken downwards from the end of the
    /// last extent, so they gather there instead of breaking up runs of data blocks.
    pub fn alloc_node(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let g = self.used.last_clear(self.total())?;
        Some(self.take(g))
    }

    fn take(&mut self, g: u64) -> u64 {
        self.used.set(g);
        self.fresh.set(g);
        self.fresh_list.push(g);
        self.free -= 1;
        if let Some(f) = self.pfree.get_mut((g / self.per_extent) as usize) {
            *f -= 1;
        }
        self.ptr(g)
    }

    /// Returns a used block to the free pool.
    pub fn release(&mut self, g: u64) {
        if self.used.get(g) {
            self.used.clear(g);
            self.free += 1;
            if let Some(f) = self.pfree.get_mut((g / self.per_extent) as usize) {
                *f += 1;
            }
        }
        self.fresh.clear(g);
        self.shared.clear(g);
    }

    /// Whether a block was allocated since the last commit (and is not released).
    pub fn has_fresh(&self) -> bool {
        self.fresh_list.iter().any(|&g| self.fresh.get(g))
    }

    /// The commit made every fresh block part of the committed tree.
    pub fn end_epoch(&mut self) {
        for g in std::mem::take(&mut self.fresh_list) {
            self.fresh.clear(g);
        }
    }

    /// Marks fresh again used block `g`, allocated before the last commit but referenced by
    /// no committed tree and no snapshot (a copy the mover made, which the tree points at
    /// only now): it belongs to the epoch under way, like a block allocated in it.
    pub fn refresh(&mut self, g: u64) {
        if self.used.get(g) && !self.fresh.get(g) {
            self.fresh.set(g);
            self.fresh_list.push(g);
            self.shared.clear(g);
        }
    }

    /// Replaces the used and shared sets with the result of a sweep (nothing is fresh after it).
    pub fn reset(&mut self, used: Bitmap, shared: Bitmap) {
        self.end_epoch();
        self.free = self.total() - used.count();
        for (pos, f) in self.pfree.iter_mut().enumerate() {
            let lo = pos as u64 * self.per_extent;
            *f = (lo..lo + self.per_extent).filter(|&g| !used.get(g)).count() as u64;
        }
        self.used = used;
        self.shared = shared;
        self.fresh = Bitmap::default();
        self.cursor = 0;
    }

    /// [`reset`](Allocator::reset) with the sets of a sweep of the committed trees made while
    /// the next epoch went on: the blocks allocated since stay used and fresh.
    pub fn reset_keeping_fresh(&mut self, mut used: Bitmap, shared: Bitmap) {
        let list = std::mem::take(&mut self.fresh_list);
        let fresh = std::mem::take(&mut self.fresh);
        let list: Vec<u64> = list.into_iter().filter(|&g| fresh.get(g)).collect();
        for &g in &list {
            used.set(g);
        }
        self.reset(used, shared);
        self.fresh = fresh;
        self.fresh_list = list;
    }

    /// Forgets the extents `gone` (given back to the store; every block of each free), called
    /// right after a commit, when nothing is fresh: the other extents keep their order, so
    /// global indexes above a forgotten extent shift down, with their used and shared bits.
    pub fn forget(&mut self, gone: &[ExtentId]) {
        let keep: Vec<(u64, ExtentId)> = self
            .extents
            .iter()
            .enumerate()
            .filter(|(_, e)| !gone.contains(e))
            .map(|(pos, &e)| (pos as u64, e))
            .collect();
        if keep.len() == self.extents.len() {
            return;
        }
        self.end_epoch();
        let per = self.per_extent;
        let mut a = Allocator::new(&keep.iter().map(|k| k.1).collect::<Vec<_>>(), per);
        let (mut used, mut shared) = (Bitmap::default(), Bitmap::default());
        for (new_pos, &(old_pos, _)) in keep.iter().enumerate() {
            for i in 0..per {
                let (old, new) = (old_pos * per + i, new_pos as u64 * per + i);
                if self.used.get(old) {
                    used.set(new);
                }
                if self.shared.get(old) {
                    shared.set(new);
                }
            }
        }
        a.reset(used, shared);
        *self = a;
    }

    /// A pointer that must be null or a block of this version.
    pub fn check_ptr(&self, ptr: u64) -> Result<()> {
        if ptr == NULL {
            Ok(())
        } else {
            self.index(ptr).map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_first_clear_skips_full_words() {
        let mut b = Bitmap::default();
        for i in 0..130 {
            b.set(i);
        }
        assert_eq!(b.first_clear(0, 200), Some(130));
        assert_eq!(b.first_clear(0, 130), None);
        assert_eq!(b.first_clear(131, 200), Some(131));
        b.clear(5);
        assert_eq!(b.first_clear(0, 200), Some(5));
        assert_eq!(b.count(), 129);
        assert_eq!(b.last_clear(200), Some(199));
        assert_eq!(b.last_clear(130), Some(5));
        assert_eq!(b.last_clear(5), None);
        b.set(5);
        assert_eq!(b.last_clear(130), None);
        assert_eq!(b.last_clear(64), None);
    }

    #[test]
    fn forgetting_an_extent_keeps_the_others_blocks() {
        let mut a = Allocator::new(&[ExtentId(7), ExtentId(3), ExtentId(9)], 4);
        let ptrs: Vec<u64> = (0..12).map(|_| a.alloc().expect("free block")).collect();
        a.end_epoch();
        // Free all of extent 3 (position 1) and one block of extent 9.
        for g in 4..8 {
            a.release(g);
        }
        a.release(9);
        a.shared.set(10);
        a.forget(&[ExtentId(3)]);
        assert_eq!(a.extents(), &[ExtentId(7), ExtentId(9)]);
        assert_eq!(a.total(), 8);
        assert_eq!(a.free(), 1);
        assert!(
            a.index(ptrs[4]).is_err(),
            "a forgotten extent's pointers are not ours"
        );
        assert_eq!(a.index(ptrs[10]).expect("ours"), 6);
        assert!(a.used.get(6) && a.shared.get(6) && !a.used.get(5));
        assert_eq!(a.free_at(1), 1);
        let again = a.alloc().expect("the freed block");
        assert_eq!(a.index(again).expect("ours"), 5);
        a.forget(&[ExtentId(42)]);
        assert_eq!(a.total(), 8);
    }

    #[test]
    fn nodes_come_from_the_top_and_data_from_the_bottom() {
        let mut a = Allocator::new(&[ExtentId(0), ExtentId(1)], 100);
        let n = a.alloc_node().expect("node");
        let d = a.alloc().expect("data");
        assert_eq!(a.index(n).expect("ours"), 199);
        assert_eq!(a.index(d).expect("ours"), 0);
        let n2 = a.alloc_node().expect("node");
        assert_eq!(a.index(n2).expect("ours"), 198);
        assert_eq!(a.free(), 197);
    }

    #[test]
    fn allocates_every_block_once_then_reuses_released_ones() {
        let mut a = Allocator::new(&[ExtentId(4), ExtentId(1)], 3);
        let got: Vec<u64> = (0..6).map(|_| a.alloc().expect("free block")).collect();
        assert_eq!(a.alloc(), None);
        let mut idx: Vec<u64> = got.iter().map(|&p| a.index(p).expect("ours")).collect();
        idx.sort_unstable();
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 5]);
        assert!(a.is_fresh(got[2]));
        a.end_epoch();
        assert!(!a.is_fresh(got[2]));
        a.release(4);
        assert_eq!(a.free(), 1);
        let again = a.alloc().expect("reused");
        assert_eq!(a.index(again).expect("ours"), 4);
        assert!(a.index(make_ptr(ExtentId(2), 0)).is_err());
        assert!(a.index(make_ptr(ExtentId(1), 3)).is_err());
    }
}
