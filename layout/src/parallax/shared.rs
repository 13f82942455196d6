//! Single-instance data blocks (the store's shared pool, docs/format.md *Shared pool*) in a
//! `parallax-v1` tree.
//!
//! On a store with single-instance blocks on, a whole-block write asks the store for a pool
//! block holding exactly its bytes ([`VersionSpace::share`]) and points the tree's entry at it
//! instead of writing a block of its own: identical blocks of the versions of a Tee (and the
//! blocks a copy-out carries from the trusted version to the candidate) are stored once. A
//! pool pointer has the ordinary pointer encoding; it is told apart by its extent, which is
//! granted to the pool, never to this version. The store refuses any write there, so a shared
//! block is never changed in place: a write to it goes to a fresh block of the version's own
//! (copy-on-write, as for any committed block), and the pool block's hold is released.
//!
//! Holds follow the tree: the store makes a version's shares and releases durable only with
//! its root record, and a commit passes the store's mark taken at its capture
//! ([`VersionSpace::shared_cut`]), so what it commits is exactly what the captured tree
//! references. A version references each pool block from one place at most (the store hands a
//! block it already holds to no second place), so a superseded pool pointer is referenced by no
//! live entry any more; if a snapshot may still reference it, its release waits for the sweep
//! after a snapshot's deletion (or the next open), which releases the pool blocks no committed
//! tree reaches.
//!
//! Reads of a pool block verify its recorded crc32c ([`VersionSpace::read_shared`]): a damaged
//! shared block is reported as such ([`dovetail_store::StoreError::SharedCorrupt`]), never
//! returned. parallax-v2 keeps writing blocks of its own (its checksums, replicas and tiering
//! address its own extents).

use std::collections::BTreeSet;

use dovetail_store::SharedRef;

use super::cache::NodeCache;
use super::format::{make_ptr, split_ptr, ENTRIES, NULL};
use super::*;

/// The pool extents a version's tree may point into (those of the blocks it holds), and
/// whether its whole-block writes share.
#[derive(Debug, Default)]
pub(super) struct PoolView {
    /// Sharing is on: parallax-v1 on a store with single-instance blocks on.
    pub(super) on: bool,
    extents: RwLock<Vec<u32>>,
}

impl PoolView {
    /// This view's extents moved into a new view (a live grow's new handle); this one keeps
    /// none.
    pub(super) fn take(&self) -> PoolView {
        let mut v = self.extents.write().unwrap_or_else(|p| p.into_inner());
        PoolView {
            on: self.on,
            extents: RwLock::new(std::mem::take(&mut *v)),
        }
    }

    /// The view of a version opened on `space` (`plain`: a parallax-v1 tree, without
    /// annotations, checksums or extent groups).
    pub(super) fn new(space: &dyn VersionSpace, plain: bool) -> PoolView {
        let mut extents: Vec<u32> = space.held_shared().iter().map(|r| r.extent.0).collect();
        extents.dedup();
        PoolView {
            on: plain && space.single_instance(),
            extents: RwLock::new(extents),
        }
    }

    fn knows(&self, e: u32) -> bool {
        self.extents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .binary_search(&e)
            .is_ok()
    }

    fn learn(&self, e: u32) {
        if self.knows(e) {
            return;
        }
        let mut v = self.extents.write().unwrap_or_else(|p| p.into_inner());
        if let Err(i) = v.binary_search(&e) {
            v.insert(i, e);
        }
    }
}

fn as_ref(ptr: u64) -> Option<SharedRef> {
    split_ptr(ptr).map(|(extent, block)| SharedRef { extent, block })
}

impl Inner {
    /// Whether `ptr` points into the shared pool (not at a block of this version).
    pub(super) fn is_pool(&self, ptr: u64) -> bool {
        ptr != NULL && split_ptr(ptr).is_some_and(|(e, _)| self.pool.knows(e.0))
    }

    /// Whole-block write of tree block `b` with `data` (4 KiB) through the pool: points the
    /// block at a pool block holding `data` and supersedes what it pointed at. `false` when
    /// the block is to be written to a block of the version's own (sharing off, the pool full,
    /// the version already holding a block with these bytes, or the pool failing: logged).
    pub(super) fn try_share(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        b: u64,
        data: &[u8],
    ) -> Result<bool> {
        if !self.pool.on || b >= self.blocks {
            return Ok(false);
        }
        let r = match self.space.share(data) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(false),
            Err(e) => {
                log::debug!(
                    "parallax-v1: {}: block {b} not shared ({e}): written to a block of its own",
                    self.space.key()
                );
                return Ok(false);
            }
        };
        self.pool.learn(r.extent.0);
        let ptr = make_ptr(r.extent, r.block);
        let placed = (|| {
            let leaf = self.path_mut(st, cache, b, 1)?;
            let i = (b % ENTRIES as u64) as usize;
            let node = cache
                .get_mut(leaf)
                .ok_or_else(|| Error::Corrupt(format!("node of block {b} left the cache")))?;
            let old = std::mem::replace(&mut node.entries[i], ptr);
            if old != NULL {
                self.supersede_ptr(st, cache, old)?;
            }
            Ok(())
        })();
        if placed.is_err() {
            // Not referenced: the hold goes with the next commit.
            let _ = self.space.release_shared(r);
        }
        placed.map(|()| true)
    }

    /// `ptr`, a pool pointer, is no longer referenced by the live tree: its hold is released
    /// (durably with the next commit, which no longer references it), unless a snapshot may
    /// reference it: then the sweep after a snapshot's deletion decides.
    pub(super) fn release_pool(&self, st: &mut State, ptr: u64) -> Result<()> {
        let r = as_ref(ptr).ok_or_else(|| Error::Corrupt(format!("malformed pointer {ptr:#x}")))?;
        if !st.snapshots.is_empty() || st.pool_keep || st.sweeping.is_some() {
            st.pool_deferred.push(ptr);
            return Ok(());
        }
        Ok(self.space.release_shared(r)?)
    }

    /// Reads `buf` from byte `off` of the pool blocks starting at `ptr` (consecutive blocks of
    /// one pool extent), each verified against its recorded checksum.
    pub(super) fn read_pool(&self, ptr: u64, off: usize, buf: &mut [u8]) -> Result<()> {
        let r = as_ref(ptr).ok_or_else(|| Error::Corrupt(format!("malformed pointer {ptr:#x}")))?;
        let mut tmp = [0u8; BLOCK_SIZE];
        let (mut block, mut within, mut done) = (r.block, off, 0usize);
        while done < buf.len() {
            let one = SharedRef {
                extent: r.extent,
                block,
            };
            self.space.read_shared(one, &mut tmp)?;
            let n = (BLOCK_SIZE - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&tmp[within..within + n]);
            done += n;
            within = 0;
            block += 1;
        }
        Ok(())
    }

    /// The pool blocks the trees at `roots` (root, generation) reference.
    pub(super) fn pool_reach(
        &self,
        st: &State,
        cache: &mut NodeCache,
        roots: &[(u64, u64)],
    ) -> Result<BTreeSet<u64>> {
        let mut found = BTreeSet::new();
        for &(root, gen) in roots {
            self.walk_data(&st.alloc, cache, root, gen, &mut |_, ptr| {
                if self.is_pool(ptr) {
                    found.insert(ptr);
                }
                Ok(())
            })?;
        }
        Ok(found)
    }

    /// After the trees were swept (at open, or after a snapshot's deletion): releases the
    /// deferred pool blocks, and (at open, `all`) every pool block the version holds, that
    /// neither the committed tree nor a snapshot references. Returns how many.
    pub(super) fn pool_sweep(&self, st: &mut State, cache: &mut NodeCache, all: bool) -> usize {
        if !self.pool.on && st.pool_deferred.is_empty() && !all {
            return 0;
        }
        let mut roots: Vec<(u64, u64)> = st.snapshots.iter().map(|s| (s.root, s.gen)).collect();
        roots.push((st.committed_root, st.gen));
        if st.root != st.committed_root {
            roots.push((st.root, st.gen + 1));
        }
        let reach = match self.pool_reach(st, cache, &roots) {
            Ok(r) => r,
            Err(e) => {
                log::warn!(
                    "parallax-v1: {}: the shared blocks its trees reference could not be \
                     listed ({}): none released",
                    self.space.key(),
                    crate::error_chain(&e)
                );
                return 0;
            }
        };
        let mut candidates: Vec<u64> = std::mem::take(&mut st.pool_deferred);
        if all {
            candidates.extend(
                self.space
                    .held_shared()
                    .into_iter()
                    .map(|r| make_ptr(r.extent, r.block)),
            );
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut released = 0;
        for ptr in candidates {
            if reach.contains(&ptr) {
                if !all {
                    // Still a snapshot's: it waits for the next deletion.
                    st.pool_deferred.push(ptr);
                }
                continue;
            }
            if let Some(r) = as_ref(ptr) {
                if self.space.holds_shared(r) && self.space.release_shared(r).is_ok() {
                    released += 1;
                }
            }
        }
        if released > 0 {
            st.changed = true;
        }
        released
    }
}

impl Parallax {
    /// The shared blocks the committed tree and the snapshots reference (each once, ascending):
    /// what `store check` compares with the blocks the version holds.
    pub fn shared_refs(&self) -> Result<Vec<SharedRef>> {
        let inner = &*self.inner;
        let st = inner.read_settled();
        let mut roots: Vec<(u64, u64)> = st.snapshots.iter().map(|s| (s.root, s.gen)).collect();
        roots.push((st.committed_root, st.gen));
        let mut cache = inner.cache();
        let reach = inner.pool_reach(&st, &mut cache, &roots)?;
        Ok(reach.into_iter().filter_map(as_ref).collect())
    }

    /// Whether this version's whole-block writes go through the store's shared pool.
    pub fn shares_blocks(&self) -> bool {
        self.inner.pool.on
    }
}
