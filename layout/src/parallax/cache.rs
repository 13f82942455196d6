//! The node cache: decoded tree nodes by address, bounded in size, with CLOCK-style eviction of
//! clean nodes. Dirty nodes (changed since they were last written, always fresh blocks) are
//! pinned until they are written back, at the next commit or when too many have piled up.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

use super::format::Node;

/// A multiplicative hasher for block pointers: they are already well spread, so SipHash's
/// protection buys nothing on this hot path.
#[derive(Debug, Default, Clone, Copy)]
pub struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type PtrMap<V> = HashMap<u64, V, BuildHasherDefault<PtrHasher>>;

#[derive(Debug)]
struct Slot {
    node: Node,
    dirty: bool,
    /// Captured by a commit whose write of it may not be done yet: kept (not evicted) until
    /// the commit ends, since the store may not hold it yet.
    pinned: bool,
    /// Used since the last eviction pass; atomic so that readers sharing the cache can set it.
    hot: AtomicBool,
}

impl Slot {
    fn touch(&self) {
        // A load first: the line is written only when the bit changes.
        if !self.hot.load(Ordering::Relaxed) {
            self.hot.store(true, Ordering::Relaxed);
        }
    }
}

/// Cached nodes, at most `cap` clean ones (dirty ones are counted apart).
#[derive(Debug)]
pub struct NodeCache {
    map: PtrMap<Slot>,
    cap: usize,
    dirty: usize,
    pinned: usize,
}

impl NodeCache {
    pub fn new(cap: usize) -> NodeCache {
        NodeCache {
            map: PtrMap::default(),
            cap: cap.max(16),
            dirty: 0,
            pinned: 0,
        }
    }

    pub fn get(&self, ptr: u64) -> Option<&Node> {
        self.map.get(&ptr).map(|s| {
            s.touch();
            &s.node
        })
    }

    /// The node for changing: marks it dirty.
    pub fn get_mut(&mut self, ptr: u64) -> Option<&mut Node> {
        let s = self.map.get_mut(&ptr)?;
        if !s.dirty {
            s.dirty = true;
            self.dirty += 1;
        }
        *s.hot.get_mut() = true;
        Some(&mut s.node)
    }

    pub fn is_dirty(&self, ptr: u64) -> bool {
        self.map.get(&ptr).is_some_and(|s| s.dirty)
    }

    /// The level, generation and entry `i` of the node at `ptr`, if cached. Takes `&self`, so
    /// that readers can look up under a shared lock.
    #[inline]
    pub fn peek(&self, ptr: u64, i: usize) -> Option<(u8, u64, u64)> {
        let s = self.map.get(&ptr)?;
        s.touch();
        Some((s.node.level, s.node.gen, s.node.entries[i]))
    }

    pub fn contains(&self, ptr: u64) -> bool {
        self.map.contains_key(&ptr)
    }

    /// Inserts a node read from the store (clean) or just made (dirty), and returns it.
    pub fn insert(&mut self, ptr: u64, node: Node, dirty: bool) -> &mut Node {
        if self.map.len() >= self.cap + self.dirty + self.pinned {
            self.evict();
        }
        self.remove(ptr);
        if dirty {
            self.dirty += 1;
        }
        &mut self
            .map
            .entry(ptr)
            .or_insert(Slot {
                node,
                dirty,
                pinned: false,
                hot: AtomicBool::new(true),
            })
            .node
    }

    /// Forgets a node (its block was freed).
    pub fn remove(&mut self, ptr: u64) {
        if let Some(old) = self.map.remove(&ptr) {
            if old.dirty {
                self.dirty -= 1;
            }
            if old.pinned {
                self.pinned -= 1;
            }
        }
    }

    #[cfg(test)]
    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// Whether enough dirty nodes have piled up that they should be written back.
    pub fn too_dirty(&self) -> bool {
        self.dirty > self.cap
    }

    /// The dirty nodes, for writing back.
    pub fn dirty_nodes(&self) -> impl Iterator<Item = (u64, &Node)> {
        self.map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&p, s)| (p, &s.node))
    }

    /// Marks every node clean (after they were all written).
    pub fn mark_all_clean(&mut self) {
        for s in self.map.values_mut() {
            s.dirty = false;
        }
        self.dirty = 0;
    }

    /// A commit captured every dirty node (their encoded bytes): they become clean but stay
    /// pinned until [`unpin`](NodeCache::unpin), after the commit wrote them.
    pub fn pin_dirty(&mut self) {
        for s in self.map.values_mut() {
            if s.dirty {
                s.dirty = false;
                if !s.pinned {
                    s.pinned = true;
                    self.pinned += 1;
                }
            }
        }
        self.dirty = 0;
    }

    /// The commit that captured the node at `ptr` wrote it (or gave up): it may be evicted.
    pub fn unpin(&mut self, ptr: u64) {
        if let Some(s) = self.map.get_mut(&ptr) {
            if s.pinned {
                s.pinned = false;
                self.pinned -= 1;
            }
        }
    }

    /// Drops about an eighth of the clean nodes, those not used since the last pass first.
    fn evict(&mut self) {
        let target = (self.cap / 8).max(1);
        let mut dropped = 0;
        for _pass in 0..2 {
            self.map.retain(|_, s| {
                if dropped >= target || s.dirty || s.pinned {
                    return true;
                }
                if *s.hot.get_mut() {
                    *s.hot.get_mut() = false;
                    true
                } else {
                    dropped += 1;
                    false
                }
            });
            if dropped >= target {
                break;
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_nodes_are_bounded_and_dirty_ones_pinned() {
        let mut c = NodeCache::new(16);
        for p in 1..=10u64 {
            c.insert(p, Node::empty(1, 0), true);
        }
        for p in 100..200u64 {
            c.insert(p, Node::empty(1, 0), false);
        }
        assert!(c.len() <= 16 + 10, "{}", c.len());
        for p in 1..=10u64 {
            assert!(c.is_dirty(p), "dirty node {p} evicted");
        }
        assert_eq!(c.dirty_nodes().count(), 10);
        c.mark_all_clean();
        assert_eq!(c.dirty_count(), 0);
        c.remove(1);
        assert!(c.get(1).is_none());
    }
}
