//! Copy-on-read: the queue through which guest reads report the blocks the candidate does not
//! hold to the migration job.

use super::*;

/// The queue through which guest reads tell a copy-on-read migration which absent blocks they
/// touched. Reporting never blocks a read: when the queue is full the hint is dropped (a
/// copy-out still gets every block; copy-on-read gets it at a later read).
#[derive(Debug)]
pub(crate) struct ReadHints {
    on: AtomicBool,
    tx: crossbeam_channel::Sender<(u64, u64)>,
    pub rx: crossbeam_channel::Receiver<(u64, u64)>,
}

/// Runs of blocks a copy-on-read migration may have waiting.
const READ_HINTS: usize = 4096;

impl ReadHints {
    pub(super) fn new() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(READ_HINTS);
        ReadHints {
            on: AtomicBool::new(false),
            tx,
            rx,
        }
    }

    /// Starts (or stops) reporting reads; stopping empties the queue.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Release);
        if !on {
            while self.rx.try_recv().is_ok() {}
        }
    }
}

impl Inner {
    /// Copy-on-read: reports a read's blocks the candidate does not hold to the migration job.
    /// One atomic load when copy-on-read is off.
    pub(super) fn hint_read(&self, s: Span) {
        if !self.read_hints.on.load(Ordering::Acquire) {
            return;
        }
        if let Some(b) = self.presence.next_absent(s.first) {
            if b <= s.last {
                let _ = self.read_hints.tx.try_send((b, s.last));
            }
        }
    }
}
