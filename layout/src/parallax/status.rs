//! A disk's status: its layout, usage, generation and depth, and its checks.

use super::*;

impl Parallax {
    /// The layout's name: `parallax-v1` or `parallax-v2`.
    pub fn layout(&self) -> &'static str {
        if self.inner.ann.is_some() {
            "parallax-v2"
        } else {
            "parallax-v1"
        }
    }

    /// Checks the layout's invariants and returns every violation found (empty when sound):
    /// every tree pointer inside the version's extents, node checksums, levels and generations
    /// valid, no block referenced twice from one tree, every reachable block allocated, every
    /// allocated block reachable or waiting for the next commit, used + free = total.
    pub fn check(&self) -> Vec<String> {
        let inner = &*self.inner;
        // Blocks a commit freed are held allocated until the puncher released them: with the
        // commit lock no commit queues more, so once the puncher is drained every allocated
        // block is reachable or pending free again.
        let commit = inner.committing.lock().unwrap_or_else(|p| p.into_inner());
        inner.punches.drain();
        let st = inner.read_settled();
        drop(commit);
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
