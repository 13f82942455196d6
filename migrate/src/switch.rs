//! The switch: what a running disk is served through, so that its version set (trusted alone, or
//! a Tee over trusted and candidate) or its policy can change while the guest keeps doing I/O.
//!
//! A [`Switch`] is a [`BlockLayout`] holding the layout currently serving the disk behind a
//! reader-writer lock. Every operation holds the read side for its duration, so requests on
//! different queues never wait for each other. [`Switch::pause`] takes the write side: it waits
//! for the operations in flight to complete, holds every new one back (they wait; none fails),
//! runs the change with no I/O in flight, and lets them go. The lock prefers writers (the
//! standard library's on Linux does), so a busy guest cannot starve a pause. What a pause cost
//! (the wait for in-flight operations, the change itself) is measured and returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use dovetail_layout::{
    BlockLayout, IoBufs, MapGuard, Mapped, MappedPiece, Result, Sector, Sectors,
};
use serde::Serialize;

/// How long one pause took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pause {
    /// Waiting for the operations in flight to complete.
    pub drain_us: u64,
    /// The change itself, with no I/O in flight.
    pub change_us: u64,
    /// The whole pause: the time a request arriving at its start may have waited.
    pub total_us: u64,
}

impl Pause {
    pub fn total(&self) -> Duration {
        Duration::from_micros(self.total_us)
    }
}

impl std::fmt::Display for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} ms (draining in-flight I/O {:.3} ms, change {:.3} ms)",
            self.total_us as f64 / 1e3,
            self.drain_us as f64 / 1e3,
            self.change_us as f64 / 1e3
        )
    }
}

/// Pause statistics of one switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PauseStats {
    pub pauses: u64,
    pub total_us: u64,
    pub max_us: u64,
    pub last_us: u64,
}

/// A layout whose implementation can be replaced between operations (module docs).
#[derive(Debug)]
pub struct Switch {
    /// The disk's capacity in sectors: every layout swapped in must have it; raised by a grow.
    capacity: std::sync::atomic::AtomicU64,
    current: RwLock<Arc<dyn BlockLayout>>,
    stats: Mutex<PauseStats>,
    /// Operations started through the switch (for tests and status).
    ops: AtomicU64,
    /// Pauses waiting for the swap lock (see [`BlockLayout::pause_wanted`]).
    pausing: AtomicU64,
}

/// A replacement layout whose capacity differs from the disk's.
#[derive(Debug, thiserror::Error)]
#[error("the replacement layout has {got} but the disk has {want}")]
pub struct CapacityMismatch {
    pub want: Sectors,
    pub got: Sectors,
}

impl Switch {
    pub fn new(layout: Arc<dyn BlockLayout>) -> Switch {
        Switch {
            capacity: std::sync::atomic::AtomicU64::new(layout.capacity().0),
            current: RwLock::new(layout),
            stats: Mutex::new(PauseStats::default()),
            ops: AtomicU64::new(0),
            pausing: AtomicU64::new(0),
        }
    }

    fn get(&self) -> RwLockReadGuard<'_, Arc<dyn BlockLayout>> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        // A panic while paused leaves the previous layout in place, which is still valid.
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The layout serving the disk now.
    pub fn current(&self) -> Arc<dyn BlockLayout> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Operations started through the switch so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Pauses the disk's I/O, runs `change` with nothing in flight (it may replace the layout
    /// through the `&mut` it is given), and resumes. Returns what `change` returned and how long
    /// the pause took; the statistics count every pause, failed changes included.
    pub fn pause<T>(&self, change: impl FnOnce(&mut Arc<dyn BlockLayout>) -> T) -> (T, Pause) {
        let start = Instant::now();
        // Queue workers holding the layout for a batch (`run_pinned`) see this and end their
        // batch now rather than at its bound.
        self.pausing.fetch_add(1, Ordering::SeqCst);
        let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
        self.pausing.fetch_sub(1, Ordering::SeqCst);
        let drained = start.elapsed();
        dovetail_store::failpoint::hit("swap");
        let out = change(&mut g);
        let total = start.elapsed();
        drop(g);
        let pause = Pause {
            drain_us: drained.as_micros() as u64,
            change_us: total.saturating_sub(drained).as_micros() as u64,
            total_us: total.as_micros() as u64,
        };
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.pauses += 1;
        s.total_us += pause.total_us;
        s.max_us = s.max_us.max(pause.total_us);
        s.last_us = pause.total_us;
        (out, pause)
    }

    /// Replaces the layout during a pause. The replacement must have the disk's capacity.
    pub fn replace(
        &self,
        with: Arc<dyn BlockLayout>,
    ) -> (
        std::result::Result<Arc<dyn BlockLayout>, CapacityMismatch>,
        Pause,
    ) {
        let want = self.capacity();
        self.pause(|cur| {
            let got = with.capacity();
            if got != want {
                return Err(CapacityMismatch { want, got });
            }
            Ok(std::mem::replace(cur, with))
        })
    }

    /// Raises the disk's capacity to `capacity` (never lowers it), once the layout serving
    /// it was grown or replaced by a grown one (`grow`, or a swap in [`Switch::pause`]).
    pub fn raise_capacity(&self, capacity: Sectors) {
        self.capacity
            .fetch_max(capacity.0, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn pause_stats(&self) -> PauseStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockLayout for Switch {
    fn capacity(&self) -> Sectors {
        Sectors(self.capacity.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Grows the current layout in place, then raises the switch's capacity.
    fn grow(&self, capacity: Sectors) -> Result<()> {
        self.get().grow(capacity)?;
        self.raise_capacity(capacity);
        Ok(())
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        self.get().read(at, buf)
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        self.get().write(at, buf)
    }

    fn flush(&self) -> Result<()> {
        self.get().flush()
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        self.get().discard(at, len)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> Result<()> {
        self.get().write_zeroes(at, len, unmap)
    }

    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> Result<()> {
        self.get().read_into(at, bufs, scratch)
    }

    fn write_from(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> Result<()> {
        self.get().write_from(at, bufs, scratch)
    }

    /// The current layout, held for `f`'s duration like any operation: a pause waits for it.
    fn run_pinned(&self, f: &mut dyn FnMut(Option<&dyn BlockLayout>)) {
        let current = self.get();
        f(Some(&**current))
    }

    fn pause_wanted(&self) -> bool {
        self.pausing.load(Ordering::Relaxed) > 0
    }

    fn map_direct_supported(&self) -> bool {
        // A question, not an operation: not counted in `ops`.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .map_direct_supported()
    }

    /// The current layout's mapping, with the swap lock's read side held in the guard until
    /// the read completed (a pause waits for it as for any operation). Taken without waiting:
    /// `None` while a pause waits for the lock.
    fn map_direct<'a>(
        &'a self,
        at: Sector,
        len: usize,
        pieces: &mut Vec<MappedPiece>,
    ) -> Option<Mapped<'a>> {
        let current = match self.current.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        self.ops.fetch_add(1, Ordering::Relaxed);
        let layout: *const dyn BlockLayout = &**current;
        // SAFETY: the layout behind the read guard `current` is neither replaced nor dropped
        // while that guard is held (a swap takes the write side), and the guard moves into the
        // returned `SwitchRead`, which drops the mapping's guard (the only borrow of `layout`)
        // before it; the switch itself outlives `'a`.
        let layout: &'a dyn BlockLayout = unsafe { &*layout };
        let m = layout.map_direct(at, len, pieces)?;
        Some(Mapped {
            guard: Box::new(SwitchRead {
                inner: Some(m.guard),
                _current: current,
            }),
            mem_align: m.mem_align,
        })
    }

    /// The current layout's mapped write, held like [`map_direct`](Switch::map_direct)'s
    /// read: the swap lock's read side kept in the guard until the writes completed.
    fn map_direct_write<'a>(
        &'a self,
        at: Sector,
        bufs: IoBufs<'_>,
        pieces: &mut Vec<MappedPiece>,
    ) -> Option<Result<Mapped<'a>>> {
        let current = match self.current.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let layout: *const dyn BlockLayout = &**current;
        // SAFETY: as in `map_direct`: the guard `current` keeps the layout, and moves into the
        // returned `SwitchRead`, which drops the mapping's guard before it.
        let layout: &'a dyn BlockLayout = unsafe { &*layout };
        let m = match layout.map_direct_write(at, bufs, pieces)? {
            Ok(m) => m,
            Err(e) => {
                self.ops.fetch_add(1, Ordering::Relaxed);
                return Some(Err(e));
            }
        };
        self.ops.fetch_add(1, Ordering::Relaxed);
        Some(Ok(Mapped {
            guard: Box::new(SwitchRead {
                inner: Some(m.guard),
                _current: current,
            }),
            mem_align: m.mem_align,
        }))
    }
}

/// A mapped read of [`Switch::map_direct`]: the current layout's guard, then the swap lock.
struct SwitchRead<'a> {
    /// Borrows the layout `_current` holds: dropped first (see `Drop`).
    inner: Option<Box<dyn MapGuard + 'a>>,
    _current: RwLockReadGuard<'a, Arc<dyn BlockLayout>>,
}

impl MapGuard for SwitchRead<'_> {
    fn data(&self) -> Option<&[u8]> {
        self.inner.as_ref().and_then(|g| g.data())
    }

    fn verify(&mut self, bufs: IoBufs<'_>) -> Result<()> {
        match self.inner.as_mut() {
            Some(g) => g.verify(bufs),
            None => Ok(()),
        }
    }

    fn completed(&mut self, ok: bool, took: Duration) {
        if let Some(g) = self.inner.as_mut() {
            g.completed(ok, took);
        }
    }
}

impl Drop for SwitchRead<'_> {
    fn drop(&mut self) {
        // Before the swap lock (fields drop in order anyway; explicit, as soundness rests on it).
        self.inner = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Barrier;

    use dovetail_layout::MemLayout;

    use super::*;

    const SECTOR: usize = 512;

    /// A layout whose writes take a while, to have operations in flight during a pause.
    #[derive(Debug)]
    struct Slow {
        inner: MemLayout,
        delay: Duration,
        in_flight: AtomicU64,
    }

    impl BlockLayout for Slow {
        fn capacity(&self) -> Sectors {
            self.inner.capacity()
        }
        fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
            self.inner.read(at, buf)
        }
        fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            let r = self.inner.write(at, buf);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
            self.inner.discard(at, len)
        }
        fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> Result<()> {
            self.inner.write_zeroes(at, len, unmap)
        }
    }

    fn slow(sectors: u64, delay_ms: u64) -> Arc<Slow> {
        Arc::new(Slow {
            inner: MemLayout::new(Sectors(sectors)),
            delay: Duration::from_millis(delay_ms),
            in_flight: AtomicU64::new(0),
        })
    }

    #[test]
    fn a_pause_waits_for_in_flight_operations_and_holds_new_ones() {
        let a = slow(64, 30);
        let b = slow(64, 0);
        let sw = Arc::new(Switch::new(a.clone()));
        let started = Arc::new(Barrier::new(2));
        let writer = {
            let (sw, started) = (sw.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                sw.write(Sector(0), &[1u8; SECTOR]).expect("write");
            })
        };
        started.wait();
        while a.in_flight.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let saw_in_flight = AtomicBool::new(true);
        let (old, pause) = sw.pause(|cur| {
            // Nothing is in flight while the change runs.
            saw_in_flight.store(a.in_flight.load(Ordering::SeqCst) != 0, Ordering::SeqCst);
            std::mem::replace(cur, b.clone())
        });
        writer.join().expect("writer");
        assert!(!saw_in_flight.load(Ordering::SeqCst));
        assert!(Arc::ptr_eq(&old, &(a.clone() as Arc<dyn BlockLayout>)));
        assert!(pause.drain_us >= 10_000, "{pause}: waited for the write");
        // The write completed on the old layout; later I/O goes to the new one.
        let mut buf = [0u8; SECTOR];
        a.read(Sector(0), &mut buf).expect("read");
        assert_eq!(buf, [1u8; SECTOR]);
        sw.write(Sector(1), &[2u8; SECTOR]).expect("write");
        b.read(Sector(1), &mut buf).expect("read");
        assert_eq!(buf, [2u8; SECTOR]);
        let stats = sw.pause_stats();
        assert_eq!(stats.pauses, 1);
        assert_eq!(stats.last_us, pause.total_us);
    }

    #[test]
    fn requests_arriving_during_a_pause_wait_and_succeed() {
        let a = slow(64, 0);
        let b = slow(64, 0);
        let sw = Arc::new(Switch::new(a.clone()));
        let in_change = Arc::new(Barrier::new(2));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (sw, in_change, done) = (sw.clone(), in_change.clone(), done.clone());
            std::thread::spawn(move || {
                in_change.wait();
                sw.write(Sector(3), &[7u8; SECTOR])
                    .expect("write waits, never fails");
                done.store(true, Ordering::SeqCst);
            })
        };
        let ((), pause) = sw.pause(|cur| {
            in_change.wait();
            std::thread::sleep(Duration::from_millis(20));
            assert!(!done.load(Ordering::SeqCst), "a write ran during the pause");
            *cur = b.clone();
        });
        writer.join().expect("writer");
        assert!(pause.change_us >= 20_000, "{pause}");
        let mut buf = [0u8; SECTOR];
        b.read(Sector(3), &mut buf).expect("read");
        assert_eq!(buf, [7u8; SECTOR], "the held write went to the new layout");
        a.read(Sector(3), &mut buf).expect("read");
        assert_eq!(buf, [0u8; SECTOR]);
    }

    /// Direct submissions (a queue's io_uring batch) run inside `run_pinned`: a pause waits
    /// for the batch, and the batch sees the layout current when it started.
    #[test]
    fn a_pause_waits_for_a_pinned_batch() {
        let first: Arc<dyn BlockLayout> = Arc::new(MemLayout::new(Sectors(16)));
        let switch = Arc::new(Switch::new(first.clone()));
        let (inside, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let batch = {
            let (switch, inside, release) = (switch.clone(), inside.clone(), release.clone());
            let first = first.clone();
            std::thread::spawn(move || {
                switch.run_pinned(&mut |pinned| {
                    let l = pinned.expect("a switch hands its current layout");
                    assert!(std::ptr::addr_eq(l, &*first));
                    inside.wait();
                    release.wait();
                    std::thread::sleep(Duration::from_millis(30));
                });
            })
        };
        inside.wait();
        let paused = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let (_, pause) = switch.pause(|_| paused.store(true, Ordering::SeqCst));
                assert!(pause.drain_us >= 20_000, "drained in {} µs", pause.drain_us);
            });
            release.wait();
        });
        assert!(paused.load(Ordering::SeqCst));
        batch.join().expect("batch");
    }

    #[test]
    fn a_replacement_of_another_size_is_refused() {
        let sw = Switch::new(Arc::new(MemLayout::new(Sectors(64))));
        let (r, _) = sw.replace(Arc::new(MemLayout::new(Sectors(32))));
        let e = r.expect_err("smaller layout");
        assert_eq!((e.want, e.got), (Sectors(64), Sectors(32)));
        assert_eq!(sw.current().capacity(), Sectors(64));
    }

    /// A queue worker holding the layout for a batch (`run_pinned`) can tell that a pause waits
    /// for it (`pause_wanted`, asked of the outer switch inside the batch without blocking), so
    /// it ends the batch early; once the pause is done nothing is wanted any more.
    #[test]
    fn a_pause_waiting_for_a_pinned_batch_is_wanted() {
        let a: Arc<dyn BlockLayout> = Arc::new(MemLayout::new(Sectors(8)));
        let b: Arc<dyn BlockLayout> = Arc::new(MemLayout::new(Sectors(8)));
        let sw = Arc::new(Switch::new(a));
        assert!(!sw.pause_wanted());
        let mut pauser = None;
        let mut seen = false;
        sw.run_pinned(&mut |pinned| {
            assert!(pinned.is_some());
            let (sw2, b) = (sw.clone(), b.clone());
            pauser = Some(std::thread::spawn(move || sw2.replace(b).0.is_ok()));
            let deadline = Instant::now() + Duration::from_secs(5);
            while !sw.pause_wanted() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            seen = sw.pause_wanted();
        });
        assert!(
            seen,
            "the waiting pause was not visible to the pinned batch"
        );
        let replaced = pauser.expect("spawned").join().expect("pauser");
        assert!(replaced);
        assert!(!sw.pause_wanted(), "still wanted after the pause");
        assert_eq!(sw.pause_stats().pauses, 1);
    }
}
