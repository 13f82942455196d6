//! A coarse wall clock for the request path.
//!
//! Reading the wall clock costs 20 to 70 ns on virtual machines, as much as recording a request.
//! So `Table::record_read` / `record_write` read unix seconds from an atomic that a background
//! thread (`dovetail-annot-clock`, one per process) refreshes every [`TICK`]. The thread starts
//! with the first live `Table` and exits within a tick after the last one is dropped. As a safety
//! net (should the thread be missing), the request path also refreshes the clock itself once
//! every [`FALLBACK_EVERY`] requests.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::epochs::unix_now;

/// How often the ticker refreshes the clock.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Requests between two refreshes made by the request path itself (a power of two).
pub(crate) const FALLBACK_EVERY: usize = 1024;

static NOW_SECS: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static TICKING: AtomicBool = AtomicBool::new(false);

/// Reads the wall clock into the coarse clock.
pub(crate) fn refresh() {
    NOW_SECS.store(unix_now(), Ordering::Relaxed);
}

/// Unix seconds, at most about one tick old.
pub(crate) fn coarse_secs() -> u64 {
    NOW_SECS.load(Ordering::Relaxed)
}

/// Held by every `Table`: keeps the ticker running while any table lives.
#[derive(Debug)]
pub(crate) struct Registration(());

impl Registration {
    pub(crate) fn new() -> Registration {
        LIVE.fetch_add(1, Ordering::SeqCst);
        refresh();
        if !TICKING.swap(true, Ordering::SeqCst) {
            let spawned = std::thread::Builder::new()
                .name("dovetail-annot-clock".into())
                .spawn(ticker);
            if spawned.is_err() {
                // The request path's fallback refresh keeps the clock moving.
                TICKING.store(false, Ordering::SeqCst);
            }
        }
        Registration(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn ticker() {
    loop {
        refresh();
        std::thread::sleep(TICK);
        if LIVE.load(Ordering::SeqCst) == 0 {
            TICKING.store(false, Ordering::SeqCst);
            // A table made between the load and the store saw TICKING still set and started no
            // ticker: carry on for it, unless another ticker has started since.
            if LIVE.load(Ordering::SeqCst) == 0 || TICKING.swap(true, Ordering::SeqCst) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_follows_the_wall_clock() {
        let r = Registration::new();
        let now = unix_now();
        let c = coarse_secs();
        assert!(c + 1 >= now && c <= now + 1, "{c} vs {now}");
        assert!(TICKING.load(Ordering::SeqCst));
        drop(r);
    }
}
