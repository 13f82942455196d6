//! A voting Tee member's writer: one thread, owned by the Tee, that applies the member's share
//! of each mutating request in the order the requests handed them over (a FIFO queue), so a
//! request's members are written in parallel while overlapping requests still reach every
//! member in the same order.
//!
//! The thread is started when the member joins the Tee (never per request: under the daemon's
//! seccomp filter an I/O thread may not start threads) and enters the
//! [`Background`](dovetail_store::thread_kind::ThreadKind::Background) thread kind, as the
//! Tee's vote and lazy threads do. A job handed over after the writer stopped runs on the
//! caller's thread instead (the queue was drained first, so the order holds).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A member's share of one request.
pub(crate) type WriteJob = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<WriteJob>,
    stop: bool,
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

    /// Hands `job` to the writer (behind every job handed over before it); runs it here if the
    /// writer has stopped.
    pub(crate) fn submit(&self, job: WriteJob) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.stop {
            drop(q);
            job();
            return;
        }
        q.jobs.push_back(job);
        drop(q);
        self.inner.cv.notify_one();
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
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}
