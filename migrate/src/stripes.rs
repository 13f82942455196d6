//! A striped reader-writer lock table over 4 KiB block indices: what keeps overlapping requests
//! in the same order on both versions.
//!
//! Block `b` is covered by stripe `b % STRIPES`. A request locks the distinct stripes of its
//! blocks in ascending stripe order (all of them if it spans at least `STRIPES` blocks), so two
//! requests never deadlock, and a guard releases exactly what it took without allocating.
//!
//! Each stripe is one `AtomicU32`: a writer bit, a waiters bit and a reader count. The
//! uncontended path is one compare-and-swap per stripe; a contended locker spins briefly, then
//! sleeps on one of a few condition variables, woken by the releaser when the waiters bit is set.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Number of stripes.
pub const STRIPES: u64 = 1024;
const SLEEPERS: usize = 16;

const WRITER: u32 = 1 << 31;
const WAITERS: u32 = 1 << 30;
const READERS: u32 = WAITERS - 1;

#[derive(Debug)]
pub(crate) struct Stripes {
    state: Box<[AtomicU32]>,
    sleepers: Box<[(Mutex<()>, Condvar)]>,
}

/// Shared (reads) or exclusive (writes) access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
}

/// The stripes of blocks `first..=last`, locked; released on drop.
#[derive(Debug)]
pub(crate) struct StripeGuard<'a> {
    stripes: &'a Stripes,
    lo: (u64, u64),
    hi: Option<(u64, u64)>,
    mode: Mode,
}

impl Stripes {
    pub fn new() -> Stripes {
        Stripes {
            state: (0..STRIPES).map(|_| AtomicU32::new(0)).collect(),
            sleepers: (0..SLEEPERS)
                .map(|_| (Mutex::new(()), Condvar::new()))
                .collect(),
        }
    }

    /// Locks the stripes of blocks `first..=last` (`first <= last`).
    pub fn lock(&self, first: u64, last: u64, mode: Mode) -> StripeGuard<'_> {
        let n = last.saturating_sub(first).saturating_add(1);
        // Ascending, distinct stripe ranges (inclusive).
        let (lo, hi) = if n >= STRIPES {
            ((0, STRIPES - 1), None)
        } else {
            let (s0, s1) = (first % STRIPES, last % STRIPES);
            if s0 <= s1 {
                ((s0, s1), None)
            } else {
                ((0, s1), Some((s0, STRIPES - 1)))
            }
        };
        for s in lo.0..=lo.1 {
            self.acquire(s as usize, mode);
        }
        if let Some(h) = hi {
            for s in h.0..=h.1 {
                self.acquire(s as usize, mode);
            }
        }
        StripeGuard {
            stripes: self,
            lo,
            hi,
            mode,
        }
    }

    fn try_acquire(&self, i: usize, mode: Mode) -> bool {
        let st = &self.state[i];
        let mut s = st.load(Ordering::Relaxed);
        loop {
            let next = match mode {
                Mode::Shared if s & WRITER == 0 && s & READERS < READERS => s + 1,
                Mode::Exclusive if s & !WAITERS == 0 => s | WRITER,
                _ => return false,
            };
            match st.compare_exchange_weak(s, next, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    fn acquire(&self, i: usize, mode: Mode) {
        for _ in 0..64 {
            if self.try_acquire(i, mode) {
                return;
            }
            std::hint::spin_loop();
        }
        let (m, cv) = &self.sleepers[i % SLEEPERS];
        loop {
            if self.try_acquire(i, mode) {
                return;
            }
            let g = m.lock().unwrap_or_else(|p| p.into_inner());
            self.state[i].fetch_or(WAITERS, Ordering::SeqCst);
            if self.try_acquire(i, mode) {
                return;
            }
            // The releaser clears WAITERS and notifies under `m`, so no wake-up is lost; the
            // timeout is only a safety net.
            let _ = cv.wait_timeout(g, Duration::from_millis(50));
        }
    }

    fn release(&self, i: usize, mode: Mode) {
        let st = &self.state[i];
        let prev = match mode {
            Mode::Shared => st.fetch_sub(1, Ordering::SeqCst),
            Mode::Exclusive => st.fetch_and(!WRITER, Ordering::SeqCst),
        };
        if prev & WAITERS != 0 {
            let (m, cv) = &self.sleepers[i % SLEEPERS];
            let _g = m.lock().unwrap_or_else(|p| p.into_inner());
            st.fetch_and(!WAITERS, Ordering::SeqCst);
            cv.notify_all();
        }
    }
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        for s in self.lo.0..=self.lo.1 {
            self.stripes.release(s as usize, self.mode);
        }
        if let Some(h) = self.hi {
            for s in h.0..=h.1 {
                self.stripes.release(s as usize, self.mode);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let s = Arc::new(Stripes::new());
        let inside = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..4u64 {
            let s = s.clone();
            let inside = inside.clone();
            threads.push(std::thread::spawn(move || {
                for i in 0..2000u64 {
                    // Every range holds a block of stripe 1023 (so they all exclude each
                    // other); some wrap around the table, some span all of it.
                    let first = 1024 * (t + i % 5) + 1023 - (i % 10);
                    let len = if i % 97 == 0 { 5000 } else { 10 + i % 40 };
                    let g = s.lock(first, first + len, Mode::Exclusive);
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                    let _r = s.lock(i, i + 3, Mode::Shared);
                }
            }));
        }
        // Two shared holders at once.
        let a = s.lock(5, 6, Mode::Shared);
        let b = s.lock(6, 7, Mode::Shared);
        drop((a, b));
        for t in threads {
            t.join().expect("thread");
        }
        for st in s.state.iter() {
            assert_eq!(st.load(Ordering::SeqCst) & !WAITERS, 0);
        }
    }
}
