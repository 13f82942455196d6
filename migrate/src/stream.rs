//! The ordered background stream: one FIFO per Tee, executed by one worker thread, with a byte
//! budget that gives back-pressure instead of unbounded memory.
//!
//! Operations are pushed under the request's stripe locks, so their order in the stream is the
//! order in which the foreground applied the same requests to the other version: two
//! overlapping requests reach both versions in the same order. Sequence numbers are assigned at
//! push time; `drain` waits until everything pushed before the call has been executed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use dovetail_layout::{Sector, Sectors};

use crate::events::{Counters, RequestInfo};

/// The budget charged for an operation that carries no data (a read check).
pub(crate) const CHECK_COST: usize = 256;

/// One operation of the background stream.
#[derive(Debug)]
pub(crate) enum Op {
    /// Write `data` to the candidate (async-old-primary, lazy-hashes, mirror-only).
    CandidateWrite { at: Sector, data: Vec<u8> },
    /// Zero a range of the candidate.
    CandidateZeroes {
        at: Sector,
        len: Sectors,
        unmap: bool,
    },
    /// Read the candidate and compare with the hash of what the trusted returned
    /// (async-old-primary).
    CandidateCheck {
        at: Sector,
        len: usize,
        hash: u128,
        request: RequestInfo,
    },
    /// Read the trusted version and compare with the hash of what the candidate returned to
    /// the guest (barrier-writes-async, async-new-primary).
    TrustedCheck {
        at: Sector,
        len: usize,
        hash: u128,
        request: RequestInfo,
    },
    /// Write `data` to the trusted version (async-new-primary).
    TrustedWrite {
        at: Sector,
        data: Vec<u8>,
        request: RequestInfo,
    },
    /// Zero a range of the trusted version (async-new-primary).
    TrustedZeroes {
        at: Sector,
        len: Sectors,
        unmap: bool,
        request: RequestInfo,
    },
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<(u64, usize, Op)>,
    /// Bytes charged for operations pushed and not yet completed.
    queued: usize,
    next_seq: u64,
    stop: bool,
}

#[derive(Debug)]
pub(crate) struct Stream {
    state: Mutex<State>,
    /// Every operation with a sequence number below this has been executed.
    done: AtomicU64,
    /// Sequence numbers handed out so far (mirrors `State::next_seq` for lock-free checks).
    pushed: AtomicU64,
    work: Condvar,
    progress: Condvar,
    budget: usize,
    /// Spare data buffers, so the request path does not allocate for every write.
    pool: Mutex<Vec<Vec<u8>>>,
}

const POOL_BUFFERS: usize = 64;
const POOL_MAX_BUFFER: usize = 4 << 20;

impl Stream {
    pub fn new(budget: usize) -> Stream {
        Stream {
            state: Mutex::new(State::default()),
            done: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            work: Condvar::new(),
            progress: Condvar::new(),
            budget: budget.max(1),
            pool: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A zeroed buffer of `len` bytes, from the pool when one is spare.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let spare = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut v = spare.unwrap_or_default();
        v.clear();
        v.resize(len, 0);
        v
    }

    /// Gives a data buffer back to the pool.
    pub fn recycle(&self, v: Vec<u8>) {
        if v.capacity() <= POOL_MAX_BUFFER {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_BUFFERS {
                pool.push(v);
            }
        }
    }

    /// Appends `op`, charging `cost` bytes; waits while the budget is used up (unless the
    /// stream is empty, so one request larger than the budget still goes through). Returns the
    /// operation's sequence number.
    pub fn push(&self, op: Op, cost: usize, counters: &Counters) -> u64 {
        let mut st = self.lock();
        if st.queued > 0 && st.queued.saturating_add(cost) > self.budget {
            Counters::bump(&counters.backpressure_waits);
            while st.queued > 0 && st.queued.saturating_add(cost) > self.budget && !st.stop {
                st = self.progress.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        self.pushed.store(st.next_seq, Ordering::Release);
        st.queued += cost;
        counters
            .queue_high_water
            .fetch_max(st.queued as u64, Ordering::Relaxed);
        st.queue.push_back((seq, cost, op));
        drop(st);
        self.work.notify_one();
        seq
    }

    /// The next operation, waiting for one; `None` once stopped and empty.
    pub fn pop(&self) -> Option<(u64, usize, Op)> {
        let mut st = self.lock();
        loop {
            if let Some(item) = st.queue.pop_front() {
                return Some(item);
            }
            if st.stop {
                return None;
            }
            st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Marks operation `seq` (popped in order) executed and releases its budget.
    pub fn complete(&self, seq: u64, cost: usize) {
        let mut st = self.lock();
        st.queued = st.queued.saturating_sub(cost);
        self.done.store(seq + 1, Ordering::Release);
        drop(st);
        self.progress.notify_all();
    }

    /// The sequence number the next push will get.
    pub fn next_seq(&self) -> u64 {
        self.pushed.load(Ordering::Acquire)
    }

    /// Operations below this sequence number have been executed.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Whether every pushed operation has been executed.
    pub fn idle(&self) -> bool {
        self.done() >= self.next_seq()
    }

    /// Waits until every operation with a sequence number below `seq` has been executed.
    pub fn wait_done(&self, seq: u64) {
        if self.done() >= seq {
            return;
        }
        let mut st = self.lock();
        while self.done() < seq && !(st.stop && st.queue.is_empty() && st.queued == 0) {
            st = self.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until everything pushed before this call has been executed.
    pub fn drain(&self) {
        self.wait_done(self.next_seq());
    }

    /// Lets the worker exit once the queue is empty.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.work.notify_all();
        self.progress.notify_all();
    }
}
