//! A commit's blocks written together. With the store's tier files on direct I/O, a write is
//! a synchronous trip to the device: a commit of a hundred scattered node, annotation and
//! checksum blocks written one after another spent most of its time there (measured: 8.6 ms
//! of a 13 ms parallax-v1 commit, 34 ms of a 40 ms parallax-v2 one, FLUSH every 32 writes).
//! Here every run of the commit is handed to the device at once through an io_uring made for
//! the commit (setting one up costs tens of microseconds against a commit's millisecond sync;
//! a ring kept per thread would hold a descriptor on every thread that ever committed), and
//! the commit waits for all of them. Without direct I/O (the page cache takes each write at
//! memory speed) or without a ring, the runs are written one by one.

use std::os::unix::io::RawFd;

use super::*;
use crate::engine::{rw_all, AlignedBuf, Completed, Uring};

/// Writes a commit keeps in flight at most.
const DEPTH: u32 = 64;

/// Consecutive blocks of one extent a commit writes: `len` bytes of the buffer from `at`, to
/// block `index` of `extent` (and of every copy of its group).
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockRun {
    pub extent: ExtentId,
    pub index: u32,
    pub at: usize,
    pub len: usize,
}

/// One write of a run to one copy: descriptor, file offset, bytes of the buffer, tier.
#[derive(Debug, Clone, Copy)]
struct Target {
    fd: RawFd,
    offset: u64,
    at: usize,
    len: usize,
    tier: usize,
}

impl Inner {
    /// Writes `runs` of `buf` to their blocks (every copy), all at once where the store hands
    /// out direct targets for them, else one write after another.
    pub(super) fn write_block_runs(&self, buf: AlignedBuf, runs: &[BlockRun]) -> Result<()> {
        // The kernel may refuse a ring (no io_uring, a limit): the runs are written one by one.
        let ring = if self.space.direct_io() {
            Uring::new(DEPTH).ok()
        } else {
            None
        };
        if let Some(mut ring) = ring {
            if let Some(targets) = self.direct_targets(runs) {
                let r = submit_all(&mut ring, buf, &targets);
                // Ended, written or not (a write not submitted is simply not there).
                for t in &targets {
                    self.space.direct_write_done(t.tier);
                }
                return match r {
                    Ok(()) => Ok(()),
                    Err((e, in_flight)) => {
                        if in_flight.is_none() {
                            // Writes that could not be waited for may still read the (leaked)
                            // buffer: the ring is leaked with it rather than torn down under
                            // them.
                            std::mem::forget(ring);
                        }
                        Err(Error::Io {
                            op: "writing a commit's blocks",
                            path: self.space.key().to_string(),
                            source: e,
                        })
                    }
                };
            }
        }
        let data = buf.as_slice();
        for r in runs {
            self.write_copies(
                r.extent,
                u64::from(r.index) * BLOCK_SIZE as u64,
                &data[r.at..r.at + r.len],
            )?;
        }
        Ok(())
    }

    /// The direct targets of every copy of every run, counted as started by the store; `None`
    /// (nothing counted) if one is not handed out.
    fn direct_targets(&self, runs: &[BlockRun]) -> Option<Vec<Target>> {
        let mut targets = Vec::with_capacity(runs.len());
        let undo = |targets: &[Target]| {
            for t in targets {
                self.space.direct_write_done(t.tier);
            }
        };
        for r in runs {
            let single = [r.extent];
            let members = self.members(r.extent);
            let copies = members.as_ref().map_or(&single[..], |m| m.all());
            let offset = u64::from(r.index) * BLOCK_SIZE as u64;
            for &e in copies {
                let Some((fd, file_offset, align, tier)) =
                    self.space.direct_write_target(e, offset, r.len)
                else {
                    undo(&targets);
                    return None;
                };
                targets.push(Target {
                    fd,
                    offset: file_offset,
                    at: r.at,
                    len: r.len,
                    tier,
                });
                // The buffer is aligned to 4 KiB and the runs are whole blocks.
                if align > BLOCK_SIZE || file_offset % align as u64 != 0 {
                    undo(&targets);
                    return None;
                }
            }
        }
        Some(targets)
    }
}

/// Submits every target's write and waits for all of them; a short write is finished with
/// `pwritev`. On an error with writes still in flight that cannot be waited for, the buffer
/// and the iovecs are leaked (the kernel may still read them) and the ring must be leaked too
/// (`Err((e, None))`); `Err((e, Some(())))`: every write ended, some failed.
fn submit_all(
    ring: &mut Uring,
    buf: AlignedBuf,
    targets: &[Target],
) -> std::result::Result<(), (std::io::Error, Option<()>)> {
    let base = buf.as_slice().as_ptr();
    // One iovec per target, never moved until every write ended.
    let iov: Vec<libc::iovec> = targets
        .iter()
        .map(|t| libc::iovec {
            iov_base: base.wrapping_add(t.at) as *mut libc::c_void,
            iov_len: t.len,
        })
        .collect();
    let mut next = 0usize;
    let mut pending = 0usize;
    let mut first_err: Option<std::io::Error> = None;
    let mut done: Vec<Completed> = Vec::new();
    while next < targets.len() || pending > 0 {
        while next < targets.len() {
            let t = &targets[next];
            // SAFETY: the iovec and the buffer it names live until every write pushed here
            // completed (this loop waits for them; on a failure that cannot wait both are
            // leaked below), and the descriptor is the store's tier file, open while the
            // version's space lives (the caller holds it).
            if !unsafe { ring.push_rw(next as u64, t.fd, &iov[next], 1, t.offset, true) } {
                break;
            }
            next += 1;
            pending += 1;
        }
        if let Err(e) = ring.submit(true) {
            if pending > 0 {
                std::mem::forget(iov);
                std::mem::forget(buf);
                return Err((e, None));
            }
            return Err((e, Some(())));
        }
        done.clear();
        ring.reap(&mut done);
        for c in &done {
            let Some(t) = usize::try_from(c.tag).ok().and_then(|i| targets.get(i)) else {
                continue;
            };
            pending = pending.saturating_sub(1);
            let i = c.tag as usize;
            let r = match &c.result {
                Ok(n) if *n >= t.len => Ok(()),
                Ok(n) => rw_all(t.fd, &iov[i..i + 1], *n, t.offset, true),
                Err(e) => Err(std::io::Error::from_raw_os_error(
                    e.raw_os_error().unwrap_or(libc::EIO),
                )),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err((e, Some(()))),
    }
}
