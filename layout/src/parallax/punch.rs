//! Releasing freed space off the commit's path (parallax-v2): the long runs of blocks a
//! commit frees are punched by a thread of the version's own after the commit is durable,
//! not by the FLUSH (or timer) that committed them.
//!
//! Why it is safe. A punch zeroes a block's host space; it must never reach a block that holds
//! something anyone reads. The blocks a commit frees are referenced by no durable root record
//! once the commit is done (a snapshot's blocks are never freed), and by nothing in memory once
//! `finish` ran. `finish` keeps the blocks it hands to the puncher *allocated* (they are not
//! released to the allocator) until they are punched, so no write of the next epochs can land
//! in them before their punch is over; the puncher releases them under the state lock after
//! the punch. A crash in between loses nothing: the blocks are unreferenced, and an open
//! rebuilds free space from the trees, so they are free again (merely not punched). Three
//! things rebuild or move the allocator and would undo the hold, and each first stops or waits
//! for the puncher: a snapshot's deletion drains it before its sweep (under the commit lock, so
//! no commit queues more meanwhile); a live grow and [`Parallax::close`](super::Parallax::close)
//! set `closed` and wait for a punch in progress (the puncher punches nothing once `closed` is
//! set, and the other handle may then reuse the blocks); dropping the handle does the same.
//! Short runs (fewer than [`MIN_PUNCH_BLOCKS`]) are released at once, unpunched, as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use super::format::split_ptr;
use super::groups::{MIN_PUNCH_BLOCKS, PUNCH_CHUNK_BLOCKS};
use super::{Inner, State};
use crate::{Error, Result};

/// The puncher's queue and state, in the version's [`Inner`].
#[derive(Default)]
pub(super) struct Punches {
    /// Whether a puncher thread serves this version (else commits punch on their own path).
    running: AtomicBool,
    /// Set when the handle is dropped or closed: nothing more is punched.
    stopped: AtomicBool,
    queue: Mutex<Queue>,
    /// Signalled when a job is queued, and when the queue empties.
    wake: Condvar,
    /// Held while blocks are punched (no state lock is held meanwhile).
    punching: Mutex<()>,
}

#[derive(Default)]
struct Queue {
    /// Each job: the pointers of the blocks of one commit's long freed runs, in order.
    jobs: VecDeque<Vec<u64>>,
    /// A job taken off the queue whose blocks are not yet released.
    busy: bool,
}

impl Punches {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a commit's freed runs go to the puncher (else the commit punches them).
    pub(super) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire) && !self.stopped.load(Ordering::Acquire)
    }

    /// Stops punching and waits for a punch in progress to end: from the return on, nothing
    /// of this handle punches (the blocks it held may be reused by another handle).
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_all();
        drop(self.punching.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Blocks (jobs queued or in hand) not yet released: waits until there are none. The
    /// caller holds the commit lock (no commit queues more) and not the state lock (the
    /// puncher takes it to release).
    pub(super) fn drain(&self) {
        let mut q = self.queue();
        while (!q.jobs.is_empty() || q.busy) && self.running.load(Ordering::Acquire) {
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn push(&self, job: Vec<u64>) {
        self.queue().jobs.push_back(job);
        self.wake.notify_all();
    }
}

/// Of the freed blocks `freed` (pointers), those in runs of at least [`MIN_PUNCH_BLOCKS`]
/// consecutive blocks of one extent, sorted: what a commit punches.
pub(super) fn long_runs(freed: &[u64]) -> Vec<u64> {
    let mut sorted: Vec<u64> = freed.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::new();
    let mut run: Vec<u64> = Vec::new();
    let mut last: Option<(dovetail_store::ExtentId, u32)> = None;
    for ptr in sorted {
        let Some((e, i)) = split_ptr(ptr) else {
            continue;
        };
        let continues = matches!(last, Some((le, li)) if le == e && li.checked_add(1) == Some(i));
        if !continues {
            if run.len() >= MIN_PUNCH_BLOCKS as usize {
                out.append(&mut run);
            }
            run.clear();
        }
        run.push(ptr);
        last = Some((e, i));
    }
    if run.len() >= MIN_PUNCH_BLOCKS as usize {
        out.append(&mut run);
    }
    out
}

impl Inner {
    /// In `finish` of a durable commit (under the state lock): releases the freed blocks
    /// `pending` (global indexes) to the allocator, except those the puncher is to punch
    /// first, which stay allocated and are queued.
    pub(super) fn release_freed(&self, st: &mut State, pending: Vec<u64>, freed: &[u64]) {
        let held: std::collections::HashSet<u64> = if self.tiered && self.punches.running() {
            long_runs(freed).into_iter().collect()
        } else {
            Default::default()
        };
        let mut job = Vec::with_capacity(held.len());
        for g in pending {
            let ptr = st.alloc.ptr(g);
            if held.contains(&ptr) {
                st.punching.insert(ptr);
                job.push(ptr);
            } else {
                st.alloc.release(g);
            }
        }
        if !job.is_empty() {
            job.sort_unstable();
            self.punches.push(job);
        }
    }

    /// Whether `persist` punches the commit's freed runs itself (no puncher thread).
    pub(super) fn punches_inline(&self) -> bool {
        !(self.tiered && self.punches.running())
    }

    /// Punches one job's blocks (no lock of the layout held), then releases them.
    fn punch_job(&self, job: Vec<u64>) {
        let t0 = std::time::Instant::now();
        {
            let _p = self
                .punches
                .punching
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // One call per piece of one run (at most 4 MiB), so that a stop takes effect
            // between pieces.
            let mut piece: Vec<u64> = Vec::new();
            let flush = |piece: &mut Vec<u64>| {
                if !piece.is_empty() && !self.punch_stopped() {
                    self.punch_freed(piece);
                }
                piece.clear();
            };
            for &ptr in &job {
                let joins = piece.last().is_some_and(|&l| {
                    matches!((split_ptr(l), split_ptr(ptr)), (Some((le, li)), Some((e, i)))
                        if le == e && li.checked_add(1) == Some(i))
                });
                // `punch_freed` cuts a piece into holes of PUNCH_CHUNK_BLOCKS itself; a piece
                // is a few of them, so a stop takes effect soon.
                if !joins || piece.len() >= 4 * PUNCH_CHUNK_BLOCKS as usize {
                    flush(&mut piece);
                }
                piece.push(ptr);
            }
            flush(&mut piece);
        }
        let t1 = std::time::Instant::now();
        if self.punch_stopped() {
            return;
        }
        let mut st = self.state_write();
        let mut extents: Vec<dovetail_store::ExtentId> = Vec::new();
        for &ptr in &job {
            st.punching.remove(&ptr);
            match st.alloc.index(ptr) {
                Ok(g) => st.alloc.release(g),
                Err(e) => log::warn!(
                    "parallax-v2: {}: a punched block left the allocator: {}",
                    self.space.key(),
                    crate::error_chain(&e)
                ),
            }
            if let Some((e, _)) = split_ptr(ptr) {
                if extents.last() != Some(&e) {
                    extents.push(e);
                }
            }
        }
        // A group these blocks leave empty is taken out by the next commit's `finish`
        // (`release_empty`): make sure there is one.
        let per = self.space.extent_size() / super::format::BLOCK_SIZE as u64;
        if extents.iter().any(|&e| {
            st.alloc
                .position(e)
                .is_some_and(|pos| st.alloc.free_at(pos) == per)
        }) {
            st.changed = true;
        }
        drop(st);
        log::debug!(
            target: "dovetail_layout::commit",
            "{}: {} freed blocks released in {:?} (off the commit's path)",
            self.space.key(),
            job.len(),
            t1 - t0
        );
    }

    fn punch_stopped(&self) -> bool {
        self.punches.stopped.load(Ordering::Acquire)
            || self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Starts the puncher of a writable parallax-v2 version.
pub(super) fn spawn_puncher(inner: &Arc<Inner>) -> Result<()> {
    if !inner.tiered {
        return Ok(());
    }
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let punches = Arc::clone(&inner.punches);
    let name = format!("punch-{}", inner.space.key());
    punches.running.store(true, Ordering::Release);
    let started = std::thread::Builder::new().name(name).spawn(move || {
        dovetail_store::thread_kind::entered(dovetail_store::thread_kind::ThreadKind::Background);
        puncher_loop(&weak, &punches);
    });
    match started {
        Ok(_) => Ok(()),
        Err(e) => {
            inner.punches.running.store(false, Ordering::Release);
            Err(Error::Io {
                op: "starting the puncher",
                path: String::new(),
                source: e,
            })
        }
    }
}

fn puncher_loop(weak: &Weak<Inner>, punches: &Punches) {
    loop {
        let job = {
            let mut q = punches.queue();
            loop {
                if punches.stopped.load(Ordering::Acquire) || weak.strong_count() == 0 {
                    q.jobs.clear();
                    q.busy = false;
                    punches.running.store(false, Ordering::Release);
                    punches.wake.notify_all();
                    return;
                }
                if let Some(j) = q.jobs.pop_front() {
                    q.busy = true;
                    break j;
                }
                // A timeout, so a handle dropped without `stop` still ends the thread.
                q = punches
                    .wake
                    .wait_timeout(q, std::time::Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        if let Some(inner) = weak.upgrade() {
            inner.punch_job(job);
        }
        let mut q = punches.queue();
        q.busy = false;
        punches.wake.notify_all();
    }
}

impl super::Parallax {
    /// Waits until the space of every block freed by a durable commit is released (punched by
    /// the puncher, and the blocks free for allocation again). For tests and tools that look
    /// at the host's allocation right after a FLUSH; the request path never waits for it.
    pub fn settle_punches(&self) {
        let inner = &*self.inner;
        let _commit = inner.committing.lock().unwrap_or_else(|p| p.into_inner());
        inner.punches.drain();
    }
}
