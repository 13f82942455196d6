//! Large reads on two cores. A read of at least [`SPLIT_BYTES`] is cut in two at a sector
//! boundary: the queue's helper thread moves the second half while the queue's worker moves the
//! first, and the request completes only when both are done, so completions stay in order.
//!
//! Writes are not split: buffered writes to one file serialise on the file's inode lock in the
//! kernel (ext4, xfs and block devices alike), so a second thread only adds contention; measured
//! in BENCHMARKS.md, it raised the CPU per 1 MiB write by half for no gain.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use dovetail_layout::{BlockLayout, IoBuf, IoBufs, Sector, SECTOR_SIZE};
use log::warn;

/// Transfers at least this large are split.
pub const SPLIT_BYTES: usize = 256 << 10;

/// One half of a transfer, for the helper. Its vectors travel back with the reply, so they are
/// reused rather than reallocated.
struct Job {
    layout: Arc<dyn BlockLayout>,
    at: Sector,
    bufs: Vec<IoBuf>,
    write: bool,
    scratch: Vec<u8>,
}

struct Done {
    result: dovetail_layout::Result<()>,
    bufs: Vec<IoBuf>,
    scratch: Vec<u8>,
}

/// A queue's helper thread, started at the queue's first large transfer.
pub struct Helper {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    spare_bufs: Vec<IoBuf>,
    spare_scratch: Vec<u8>,
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper").finish_non_exhaustive()
    }
}

impl Helper {
    /// Starts the helper thread, or `None` (and large transfers stay on one thread) if the
    /// system cannot start one.
    pub fn start(queue: usize) -> Option<Helper> {
        let (jobs, job_rx) = sync_channel::<Job>(1);
        let (done_tx, done) = sync_channel::<Done>(1);
        let thread = std::thread::Builder::new()
            .name(format!("queue{queue}-helper"))
            .spawn(move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Worker);
                while let Ok(mut job) = job_rx.recv() {
                    // SAFETY: the worker that sent this job blocks until it receives the reply
                    // (see `Pending`), and keeps the guest memory behind the buffers mapped
                    // until then.
                    let bufs = unsafe { IoBufs::new(&job.bufs) };
                    let result = run(&*job.layout, job.at, bufs, job.write, &mut job.scratch);
                    let reply = Done {
                        result,
                        bufs: job.bufs,
                        scratch: job.scratch,
                    };
                    if done_tx.send(reply).is_err() {
                        break;
                    }
                }
            });
        match thread {
            Ok(thread) => Some(Helper {
                jobs: Some(jobs),
                done,
                thread: Some(thread),
                spare_bufs: Vec::new(),
                spare_scratch: Vec::new(),
            }),
            Err(e) => {
                warn!("queue {queue}: cannot start a helper thread ({e}); large transfers use one thread");
                None
            }
        }
    }
}

impl Helper {
    /// Shrinks the scratch the helper's half of a transfer grew back to at most `keep` bytes.
    pub fn release_scratch(&mut self, keep: usize) {
        dovetail_layout::iobuf::release_scratch(&mut self.spare_scratch, keep);
    }

    /// The capacity of the helper's scratch, kept between transfers.
    pub fn scratch_capacity(&self) -> usize {
        self.spare_scratch.capacity()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing the job channel ends the thread's loop.
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for the helper's reply when dropped, so no exit from `transfer` (not even a panic in a
/// layout) can leave the helper using buffers the worker has given up.
struct Pending<'a> {
    done: &'a Receiver<Done>,
    reply: Option<Done>,
    waited: bool,
}

impl Pending<'_> {
    fn wait(&mut self) -> Option<Done> {
        if !self.waited {
            self.waited = true;
            self.reply = self.done.recv().ok();
        }
        self.reply.take()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.wait();
    }
}

fn run(
    layout: &dyn BlockLayout,
    at: Sector,
    bufs: IoBufs<'_>,
    write: bool,
    scratch: &mut Vec<u8>,
) -> dovetail_layout::Result<()> {
    if write {
        layout.write_from(at, bufs, scratch)
    } else {
        layout.read_into(at, bufs, scratch)
    }
}

/// Moves `len` bytes between `layout` at `at` and the guest buffers `bufs` (which must total
/// `len`), on two threads when it is a large read and a helper is available.
///
/// # Safety
///
/// Every entry of `bufs` must be valid for reads and writes for the whole call, as for
/// [`IoBufs::new`].
pub unsafe fn transfer(
    layout: &Arc<dyn BlockLayout>,
    helper: Option<&mut Helper>,
    at: Sector,
    len: usize,
    bufs: &mut Vec<IoBuf>,
    write: bool,
    scratch: &mut Vec<u8>,
) -> dovetail_layout::Result<()> {
    let Some(helper) = helper.filter(|_| len >= SPLIT_BYTES && !write) else {
        // SAFETY: the caller's promise.
        return run(&**layout, at, unsafe { IoBufs::new(bufs) }, write, scratch);
    };
    let half = (len / 2) & !(SECTOR_SIZE as usize - 1);
    let mut tail = std::mem::take(&mut helper.spare_bufs);
    split_at(bufs, half, &mut tail);
    let job = Job {
        layout: layout.clone(),
        at: Sector(at.0 + (half as u64 / SECTOR_SIZE)),
        bufs: tail,
        write,
        scratch: std::mem::take(&mut helper.spare_scratch),
    };
    let sent = match helper.jobs.as_ref() {
        Some(jobs) => jobs.send(job).map_err(|e| e.0),
        None => Err(job),
    };
    let first = match sent {
        Ok(()) => {
            let mut pending = Pending {
                done: &helper.done,
                reply: None,
                waited: false,
            };
            // SAFETY: the caller's promise covers the first half as well.
            let mine = run(&**layout, at, unsafe { IoBufs::new(bufs) }, write, scratch);
            let Some(reply) = pending.wait() else {
                warn!("helper thread stopped; finishing the transfer on the worker");
                return mine.and(Err(helper_gone()));
            };
            helper.spare_bufs = reply.bufs;
            helper.spare_scratch = reply.scratch;
            return mine.and(reply.result);
        }
        Err(job) => job,
    };
    // The helper is gone: do the second half here too.
    // SAFETY: both halves are parts of the caller's buffers.
    run(&**layout, at, unsafe { IoBufs::new(bufs) }, write, scratch)?;
    // SAFETY: as above.
    let second = unsafe { IoBufs::new(&first.bufs) };
    run(&**layout, first.at, second, write, scratch)
}

fn helper_gone() -> dovetail_layout::Error {
    dovetail_layout::Error::Io {
        op: "transfer",
        path: "helper thread".into(),
        source: std::io::Error::other("the helper thread stopped mid-transfer"),
    }
}

/// Cuts the scatter list at byte `at`: `bufs` keeps the first `at` bytes, `tail` (cleared first)
/// gets the rest.
pub fn split_at(bufs: &mut Vec<IoBuf>, at: usize, tail: &mut Vec<IoBuf>) {
    tail.clear();
    let mut acc = 0;
    let mut i = 0;
    while i < bufs.len() && acc + bufs[i].len <= at {
        acc += bufs[i].len;
        i += 1;
    }
    if i == bufs.len() {
        return;
    }
    let inside = at - acc;
    if inside > 0 {
        let b = bufs[i];
        tail.push(IoBuf {
            ptr: b.ptr.wrapping_add(inside),
            len: b.len - inside,
        });
        bufs[i].len = inside;
        i += 1;
    }
    tail.extend_from_slice(&bufs[i..]);
    bufs.truncate(i);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(lens: &[usize]) -> Vec<IoBuf> {
        let mut at = 0x1000usize;
        lens.iter()
            .map(|&len| {
                let b = IoBuf {
                    ptr: at as *mut u8,
                    len,
                };
                at += 0x10000;
                b
            })
            .collect()
    }

    fn lens(v: &[IoBuf]) -> Vec<usize> {
        v.iter().map(|b| b.len).collect()
    }

    #[test]
    fn split_inside_a_buffer() {
        let mut a = list(&[100, 300, 200]);
        let mut t = Vec::new();
        split_at(&mut a, 250, &mut t);
        assert_eq!(lens(&a), [100, 150]);
        assert_eq!(lens(&t), [150, 200]);
        assert_eq!(t[0].ptr as usize, 0x11000 + 150);
    }

    #[test]
    fn split_on_a_boundary_and_at_the_ends() {
        let mut a = list(&[100, 0, 300]);
        let mut t = vec![IoBuf {
            ptr: std::ptr::null_mut(),
            len: 9,
        }];
        split_at(&mut a, 100, &mut t);
        assert_eq!(lens(&a), [100, 0]);
        assert_eq!(lens(&t), [300]);

        let mut a = list(&[100, 300]);
        split_at(&mut a, 400, &mut t);
        assert_eq!(lens(&a), [100, 300]);
        assert!(t.is_empty());

        let mut a = list(&[100, 300]);
        split_at(&mut a, 0, &mut t);
        assert!(a.is_empty());
        assert_eq!(lens(&t), [100, 300]);
    }
}
