//! What lets writes to different blocks of one version run in parallel: striped block locks
//! and the count of data writes in flight.
//!
//! A whole-block write holds its blocks' stripes exclusively from before it changes the tree
//! until its data is written; the tree change itself (allocation, copy-on-write of the path,
//! the new pointer) is made under the version's state lock, which is released before the data
//! `pwrite`. A read holds its blocks' stripes shared across the lookup and the data read, so it
//! never sees a pointer whose data is not yet written, and waits only for writes to its own
//! blocks. Whoever needs every pointer of the tree backed by its data (a commit, the mover, a
//! partial write reading a neighbour's block) takes the state lock and then waits for
//! [`Inflight`] to drain: writes still in their data phase need no lock to finish, and no new
//! one can start its tree change meanwhile.

use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Number of stripes (block `b` is guarded by stripe `b % STRIPES`).
pub const STRIPES: usize = 1024;

/// The stripe locks of one version.
pub struct Stripes {
    locks: Vec<RwLock<()>>,
}

/// Stripes held (released on drop). One block's stripe (a 4 KiB request, the common case on
/// the request path) is held without allocating.
pub enum Held<'a> {
    Shared(#[allow(dead_code)] Vec<RwLockReadGuard<'a, ()>>),
    Exclusive(#[allow(dead_code)] Vec<RwLockWriteGuard<'a, ()>>),
    SharedOne(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    ExclusiveOne(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

impl Stripes {
    pub fn new() -> Stripes {
        Stripes {
            locks: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }

    /// The stripes of blocks `[first, end)`, ascending (the lock order), each once.
    fn indexes(first: u64, end: u64) -> Vec<usize> {
        let n = end.saturating_sub(first);
        if n >= STRIPES as u64 {
            return (0..STRIPES).collect();
        }
        let mut v: Vec<usize> = (first..end)
            .map(|b| (b % STRIPES as u64) as usize)
            .collect();
        v.sort_unstable();
        v
    }

    /// The stripe of block `first` when `[first, end)` is that one block.
    fn one(first: u64, end: u64) -> Option<usize> {
        (end == first.wrapping_add(1)).then_some((first % STRIPES as u64) as usize)
    }

    /// Holds the stripes of blocks `[first, end)` shared (reads).
    pub fn shared(&self, first: u64, end: u64) -> Held<'_> {
        if let Some(i) = Stripes::one(first, end) {
            return Held::SharedOne(self.locks[i].read().unwrap_or_else(|p| p.into_inner()));
        }
        Held::Shared(
            Stripes::indexes(first, end)
                .into_iter()
                .map(|i| self.locks[i].read().unwrap_or_else(|p| p.into_inner()))
                .collect(),
        )
    }

    /// [`shared`](Stripes::shared) if every stripe can be taken now, `None` otherwise (a
    /// write holds one, or waits for it): for callers that must not wait.
    pub fn try_shared(&self, first: u64, end: u64) -> Option<Held<'_>> {
        if let Some(i) = Stripes::one(first, end) {
            return match self.locks[i].try_read() {
                Ok(g) => Some(Held::SharedOne(g)),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(Held::SharedOne(p.into_inner())),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
        }
        let mut held = Vec::new();
        for i in Stripes::indexes(first, end) {
            match self.locks[i].try_read() {
                Ok(g) => held.push(g),
                Err(std::sync::TryLockError::Poisoned(p)) => held.push(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        }
        Some(Held::Shared(held))
    }

    /// Holds the stripes of the blocks `blocks` (in any order) shared: what the mover holds
    /// while it copies them, so that no write to them runs until it has repointed them.
    pub fn shared_blocks(&self, blocks: &[u64]) -> Held<'_> {
        let mut v: Vec<usize> = blocks
            .iter()
            .map(|b| (b % STRIPES as u64) as usize)
            .collect();
        v.sort_unstable();
        v.dedup();
        Held::Shared(
            v.into_iter()
                .map(|i| self.locks[i].read().unwrap_or_else(|p| p.into_inner()))
                .collect(),
        )
    }

    /// [`exclusive`](Stripes::exclusive) if every stripe can be taken now, `None` otherwise:
    /// for callers that must not wait.
    pub fn try_exclusive(&self, first: u64, end: u64) -> Option<Held<'_>> {
        if let Some(i) = Stripes::one(first, end) {
            return match self.locks[i].try_write() {
                Ok(g) => Some(Held::ExclusiveOne(g)),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    Some(Held::ExclusiveOne(p.into_inner()))
                }
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
        }
        let mut held = Vec::new();
        for i in Stripes::indexes(first, end) {
            match self.locks[i].try_write() {
                Ok(g) => held.push(g),
                Err(std::sync::TryLockError::Poisoned(p)) => held.push(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        }
        Some(Held::Exclusive(held))
    }

    /// Holds the stripes of blocks `[first, end)` exclusively (writes).
    pub fn exclusive(&self, first: u64, end: u64) -> Held<'_> {
        if let Some(i) = Stripes::one(first, end) {
            return Held::ExclusiveOne(self.locks[i].write().unwrap_or_else(|p| p.into_inner()));
        }
        Held::Exclusive(
            Stripes::indexes(first, end)
                .into_iter()
                .map(|i| self.locks[i].write().unwrap_or_else(|p| p.into_inner()))
                .collect(),
        )
    }
}

/// Data writes whose pointers are in the tree but whose data may not be written yet.
#[derive(Default)]
pub struct Inflight {
    count: Mutex<Epochs>,
    idle: Condvar,
}

/// Writes in flight by the epoch their tree change was made in: a commit's capture starts a
/// new epoch, and the commit waits for the writes of the one it captured before its sync
/// (outside the state lock), not during the capture.
#[derive(Default)]
struct Epochs {
    epoch: u64,
    /// Writes in flight of epoch `e`, at `e % 2`.
    n: [u64; 2],
}

impl Inflight {
    fn counts(&self) -> std::sync::MutexGuard<'_, Epochs> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more (called under the state lock, with the tree change); returns its epoch, for
    /// [`end`](Inflight::end).
    pub fn begin(&self) -> u64 {
        let mut c = self.counts();
        let e = c.epoch;
        c.n[(e % 2) as usize] += 1;
        e
    }

    /// One fewer of epoch `epoch` (its data is written, or failed).
    pub fn end(&self, epoch: u64) {
        let mut c = self.counts();
        let i = (epoch % 2) as usize;
        c.n[i] = c.n[i].saturating_sub(1);
        if c.n[i] == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until none is in flight (called under the exclusive state lock, so none starts).
    pub fn drain(&self) {
        let mut c = self.counts();
        while c.n != [0, 0] {
            c = self.idle.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Starts the next epoch and returns the one that ends (called by a capture, under the
    /// exclusive state lock). The new epoch shares its count with the one two back, which the
    /// commit before waited for; if that commit never did (abandoned), this waits for it.
    pub fn next_epoch(&self) -> u64 {
        let mut c = self.counts();
        let reused = ((c.epoch + 1) % 2) as usize;
        while c.n[reused] != 0 {
            c = self.idle.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        let old = c.epoch;
        c.epoch += 1;
        old
    }

    /// Waits until no write of epoch `epoch` is in flight (a commit, before its sync).
    pub fn wait_epoch(&self, epoch: u64) {
        let mut c = self.counts();
        let i = (epoch % 2) as usize;
        while c.epoch <= epoch + 1 && c.n[i] != 0 {
            c = self.idle.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_indexes_are_sorted_unique_and_wrap() {
        assert_eq!(Stripes::indexes(5, 8), vec![5, 6, 7]);
        assert_eq!(Stripes::indexes(1022, 1026), vec![0, 1, 1022, 1023]);
        assert_eq!(Stripes::indexes(7, 7 + 5000).len(), STRIPES);
        assert!(Stripes::indexes(3, 3).is_empty());
    }

    #[test]
    fn try_shared_fails_only_on_a_stripe_held_exclusively() {
        let s = Stripes::new();
        let read = s.shared(3, 5);
        assert!(s.try_shared(3, 5).is_some(), "shared with a reader");
        drop(read);
        let write = s.exclusive(4, 5);
        assert!(s.try_shared(1, 4).is_some(), "other stripes");
        assert!(s.try_shared(3, 5).is_none(), "stripe 4 is a writer's");
        assert!(s
            .try_shared(4 + STRIPES as u64, 5 + STRIPES as u64)
            .is_none());
        drop(write);
        assert!(s.try_shared(3, 5).is_some());
    }

    #[test]
    fn one_block_takes_its_own_stripe_only() {
        let s = Stripes::new();
        let w = s.try_exclusive(5, 6).expect("free");
        assert!(matches!(w, Held::ExclusiveOne(_)));
        assert!(s.try_shared(5, 6).is_none(), "held exclusively");
        assert!(s
            .try_exclusive(5 + STRIPES as u64, 6 + STRIPES as u64)
            .is_none());
        assert!(s.try_shared(4, 6).is_none(), "a range through it");
        assert!(matches!(s.try_shared(6, 7), Some(Held::SharedOne(_))));
        drop(w);
        let r = s.shared(5, 6);
        assert!(matches!(r, Held::SharedOne(_)));
        assert!(s.try_exclusive(5, 6).is_none(), "held shared");
        assert!(s.try_shared(5, 6).is_some());
        drop(r);
        assert!(matches!(s.exclusive(5, 6), Held::ExclusiveOne(_)));
    }

    #[test]
    fn drain_waits_for_every_write_in_flight() {
        let f = std::sync::Arc::new(Inflight::default());
        let a = f.begin();
        let b = f.begin();
        let g = f.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            g.end(a);
            g.end(b);
        });
        let start = std::time::Instant::now();
        f.drain();
        assert!(start.elapsed() >= std::time::Duration::from_millis(25));
        t.join().expect("join");
    }

    #[test]
    fn a_commit_waits_for_the_writes_of_the_epoch_it_captured_only() {
        let f = std::sync::Arc::new(Inflight::default());
        let old = f.begin();
        let captured = f.next_epoch();
        assert_eq!(captured, old);
        // A write of the next epoch, never ended: the captured epoch's wait ignores it.
        let new = f.begin();
        assert_ne!(new, old);
        let g = f.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            g.end(old);
        });
        let start = std::time::Instant::now();
        f.wait_epoch(captured);
        assert!(start.elapsed() >= std::time::Duration::from_millis(25));
        t.join().expect("join");
        f.end(new);
        f.drain();
    }
}
