//! A voting Tee member's writer: one thread, owned by the Tee, that applies the member's share
//! of a mutating request while the request's thread writes another member, so a request's
//! members are written in parallel. Jobs run in the order they were handed over (a FIFO
//! queue, of one job at most: a busy writer takes none, [`MemberWriter::offer`]); overlapping
//! requests reach every member in the same order because the Tee holds their blocks' stripes
//! until every member answered.
//!
//! The thread is started when the member joins the Tee (never per request: under the daemon's
//! seccomp filter an I/O thread may not start threads) and enters the
//! [`Background`](dovetail_store::thread_kind::ThreadKind::Background) thread kind, as the
//! Tee's vote and lazy threads do. A job offered after the writer stopped runs on the caller's
//! thread instead (the queue was drained first).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A member's share of one request: does the work and returns what tells the request (run
/// once the writer is idle again, so that the request's next share finds it idle).
pub(crate) type WriteJob = Box<dyn FnOnce() -> Answer + Send>;
/// Tells a request its share is done.
pub(crate) type Answer = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<WriteJob>,
    stop: bool,
    /// A job is running.
    busy: bool,
}

#[derive(Default)]
struct Inner {
    queue: Mutex<Queue>,
    cv: Condvar,
}

/// One member's writer thread and its queue; stopped (after running what is queued) by
/// [`MemberWriter::stop`] or when dropped.
pub(crate) struct MemberWriter {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MemberWriter {
    /// Starts the writer thread, named `name`.
    pub(crate) fn start(name: String) -> std::io::Result<MemberWriter> {
        let inner = Arc::new(Inner::default());
        let i = inner.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            dovetail_store::thread_kind::entered(
                dovetail_store::thread_kind::ThreadKind::Background,
            );
            run(&i)
        })?;
        Ok(MemberWriter {
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands `job` to the writer if it is idle (nothing queued nor running); gives it back
    /// if not (or if the writer stopped), for the caller to run on its own thread. A busy
    /// writer is serving another request (on other blocks: overlapping requests are kept
    /// apart by the Tee's stripes), which it would make wait; several requests in flight
    /// thus each write such a member themselves, as they did before the writers.
    pub(crate) fn offer(&self, job: WriteJob) -> Result<(), WriteJob> {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.stop || q.busy || !q.jobs.is_empty() {
            return Err(job);
        }
        q.jobs.push_back(job);
        drop(q);
        self.inner.cv.notify_one();
        Ok(())
    }

    /// Runs what is queued, then stops the thread and waits for it (not from the writer
    /// thread itself).
    pub(crate) fn stop(&self) {
        {
            let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.stop = true;
        }
        self.inner.cv.notify_all();
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for MemberWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(inner: &Inner) {
    loop {
        let job = {
            let mut q = inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    q.busy = true;
                    break j;
                }
                if q.stop {
                    return;
                }
                q = inner.cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        // A job catches its member's panics itself (and reports them); one that escapes
        // must not end the thread, whose queue later requests wait on.
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        inner.queue.lock().unwrap_or_else(|p| p.into_inner()).busy = false;
        if let Ok(answer) = answer {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(answer));
        }
    }
}
