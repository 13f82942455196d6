//! Heartbeats of the threads that must keep moving for the daemon to be healthy: each queue
//! worker and each disk's serve loop. A thread marks itself busy while it carries out work (a
//! queue's pass over its ring, a guest's connection being set up or torn down) and idle while
//! it waits for more (an idle thread waits on the guest, which is no fault of the daemon). The
//! systemd watchdog (`face::systemd`) pings only while no thread has been busy for longer than
//! its limit: a worker wedged in a request stops the pings, and systemd restarts the daemon.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// One thread's heartbeat.
#[derive(Debug)]
pub struct Beat {
    /// What the thread is, for the log (`disk vm1 queue 0`, `disk vm1 serve loop`).
    pub name: String,
    /// Milliseconds since [`epoch`] plus 1 at which the thread became busy; 0 while idle.
    busy_since: AtomicU64,
    /// Units of work done (passes, connections), to show progress.
    pub beats: AtomicU64,
}

/// The process's time origin for [`Beat::busy_since`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1)
}

fn registry() -> &'static Mutex<Vec<Weak<Beat>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<Beat>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

/// A new heartbeat, watched until it is dropped.
pub fn register(name: impl Into<String>) -> Arc<Beat> {
    let beat = Arc::new(Beat {
        name: name.into(),
        busy_since: AtomicU64::new(0),
        beats: AtomicU64::new(0),
    });
    let mut all = registry().lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&beat));
    beat
}

impl Beat {
    /// Marks the thread busy until the guard is dropped.
    pub fn busy(&self) -> Busy<'_> {
        // Nested guards keep the outer start.
        let _ =
            self.busy_since
                .compare_exchange(0, now_ms() + 1, Ordering::Relaxed, Ordering::Relaxed);
        Busy { beat: self }
    }

    /// How long the thread has been busy (`None`: idle).
    pub fn busy_for(&self) -> Option<Duration> {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(now_ms().saturating_sub(since - 1))),
        }
    }
}

/// [`Beat::busy`]'s guard: idle again (and one more beat) when dropped.
#[derive(Debug)]
pub struct Busy<'a> {
    beat: &'a Beat,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.beat.busy_since.store(0, Ordering::Relaxed);
        self.beat.beats.fetch_add(1, Ordering::Relaxed);
    }
}

/// The threads busy for longer than `limit`, with how long: none means every thread is making
/// progress or waiting for work.
pub fn stuck(limit: Duration) -> Vec<(String, Duration)> {
    let all = registry().lock().unwrap_or_else(|p| p.into_inner());
    all.iter()
        .filter_map(Weak::upgrade)
        .filter_map(|b| {
            b.busy_for()
                .filter(|d| *d > limit)
                .map(|d| (b.name.clone(), d))
        })
        .collect()
}

/// How many heartbeats are watched (threads alive).
pub fn watched() -> usize {
    let all = registry().lock().unwrap_or_else(|p| p.into_inner());
    all.iter().filter(|w| w.strong_count() > 0).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_busy_past_the_limit_is_stuck_until_it_is_idle_again() {
        let beat = register("test queue");
        assert!(beat.busy_for().is_none());
        let guard = beat.busy();
        std::thread::sleep(Duration::from_millis(30));
        assert!(stuck(Duration::from_millis(10))
            .iter()
            .any(|(n, d)| n == "test queue" && *d >= Duration::from_millis(10)));
        assert!(!stuck(Duration::from_secs(60))
            .iter()
            .any(|(n, _)| n == "test queue"));
        drop(guard);
        assert!(beat.busy_for().is_none());
        assert_eq!(beat.beats.load(Ordering::Relaxed), 1);
        assert!(!stuck(Duration::ZERO).iter().any(|(n, _)| n == "test queue"));
        drop(beat);
    }
}
