//! The asynchronous I/O seam beside [`BlockLayout`]: a submission/completion interface, so a
//! queue worker keeps many requests in flight and completes them as they finish.
//!
//! `BlockLayout` stays the synchronous, simple seam (tests, tools, layouts with metadata). A
//! layout whose data is one plain file offers that file ([`BlockLayout::direct_file`], the raw
//! layout); a queue worker then drives it through an [`Uring`] (io_uring: many reads and writes
//! submitted with one `io_uring_enter`, completions reaped in any order). Every other layout
//! (parallax, the Tee, the fault wrapper), and raw images where the kernel has no io_uring, go
//! through a [`Pool`]: a few threads per queue running the layout's own synchronous calls, so
//! several requests of one queue still run at once.
//!
//! Both engines take a `tag` per request and hand back `(tag, result)`; they never touch
//! memory they were not given, and the caller keeps every buffer (and the guest memory mapping
//! behind it) valid until the request's completion was reaped.
//!
//! Cache modes ([`CacheMode`]): `writeback` goes through the page cache (FLUSH = `fdatasync`);
//! `none` opens the image with `O_DIRECT`, so data bypasses the page cache, which needs buffers
//! aligned in memory ([`DirectFile::mem_align`]): a request whose guest buffers are not gets a
//! bounce buffer ([`AlignedBuf`]), aligned ones go straight between the device and guest memory.
//! FLUSH stays an `fdatasync` (O_DIRECT does not flush the device's volatile cache).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use dovetail_store::aio::AioRead;

use crate::{BlockLayout, IoBuf, IoBufs, Result, Sector};

/// How a disk's data meets the host's page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Buffered I/O through the page cache; FLUSH is `fdatasync`.
    #[default]
    Writeback,
    /// Direct I/O (`O_DIRECT`): no host page cache; FLUSH is `fdatasync` (the device's cache).
    None,
}

impl CacheMode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
        }
    }

    /// Whether files are opened with `O_DIRECT`.
    pub fn direct(self) -> bool {
        self == CacheMode::None
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<CacheMode, String> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            _ => Err(format!(
                "unknown cache mode {s:?}: expected none (direct I/O) or writeback (page cache)"
            )),
        }
    }
}

/// The alignment direct I/O needs in memory when the file system does not say
/// (`statx` `STATX_DIOALIGN`), and the alignment of every [`AlignedBuf`].
pub const DEFAULT_DIO_ALIGN: usize = 4096;

/// What a layout whose data is one plain file offers for direct submission: the descriptor
/// (valid as long as the layout is borrowed) and what its buffers must be aligned to.
#[derive(Debug, Clone, Copy)]
pub struct DirectFile {
    pub fd: RawFd,
    /// Every buffer's address and length must be a multiple of this (1: anything goes).
    pub mem_align: usize,
}

impl DirectFile {
    /// Whether every buffer of `bufs` can go to this file as it is (no bounce buffer).
    pub fn aligned(&self, bufs: &[IoBuf]) -> bool {
        self.mem_align <= 1
            || bufs
                .iter()
                .all(|b| (b.ptr as usize) % self.mem_align == 0 && b.len % self.mem_align == 0)
    }
}

/// One piece of a read mapped by [`BlockLayout::map_direct`]: `len` bytes of the request from
/// its byte `at`, stored at `offset` in the file `fd`, or read asynchronously from a source
/// (`aio`: a store on RADOS), or unwritten (neither: zeros).
#[derive(Debug, Clone)]
pub struct MappedPiece {
    pub at: usize,
    pub len: usize,
    /// The descriptor and file offset (an aligned range; see [`Mapped::mem_align`]), or
    /// `None` for a piece that reads as zeros or from `aio`.
    pub file: Option<(RawFd, u64)>,
    /// For a read only, with `file` `None`: the source a queue worker submits the piece to
    /// ([`Aio`]) and the offset to hand it.
    pub aio: Option<(Arc<dyn AioRead>, u64)>,
}

impl MappedPiece {
    /// Whether the piece needs I/O (a file's or an asynchronous source's), not only zeros.
    pub fn transfers(&self) -> bool {
        self.file.is_some() || self.aio.is_some()
    }
}

/// What keeps a mapping of [`BlockLayout::map_direct`] valid (the layout's locks, held until
/// dropped), told how the I/O went before it is dropped.
pub trait MapGuard {
    /// A mapped read's pieces all completed and its data is in `bufs` (the request's
    /// buffers): a layout that keeps checksums verifies them here, under the guard's locks,
    /// and replaces a block that fails with a good copy, or returns the error (never wrong
    /// data). Called once, before [`completed`](MapGuard::completed), only for a read whose
    /// pieces all succeeded. Wrappers must forward it. Default: nothing to verify.
    fn verify(&mut self, bufs: IoBufs<'_>) -> Result<()> {
        let _ = bufs;
        Ok(())
    }

    /// A mapped write whose data the layout copied out of the guest's buffers (parallax-v2,
    /// whose checksums must be of the bytes written): the worker writes the pieces from this
    /// copy (the request's bytes, aligned for direct I/O, at the same offsets), never from
    /// guest memory. Valid, at the same address, until the guard is dropped. Wrappers must
    /// forward it. Default: none (the guest's buffers are written).
    fn data(&self) -> Option<&[u8]> {
        None
    }

    /// The request's I/O ended (`ok`: every piece read) after `took`; called once, before the
    /// guard is dropped. Wrappers that count requests (the backend's `Metered`) count it here.
    fn completed(&mut self, ok: bool, took: std::time::Duration) {
        let _ = (ok, took);
    }
}

impl MapGuard for () {}

/// A read mapped to files by [`BlockLayout::map_direct`]: the pieces are valid (no write can
/// change them and no commit can free or reuse their blocks) until `guard` is dropped.
pub struct Mapped<'a> {
    pub guard: Box<dyn MapGuard + 'a>,
    /// Every buffer's address and length must be a multiple of this.
    pub mem_align: usize,
}

impl fmt::Debug for Mapped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapped")
            .field("mem_align", &self.mem_align)
            .finish_non_exhaustive()
    }
}

/// A heap buffer aligned to [`DEFAULT_DIO_ALIGN`], for direct I/O of misaligned requests.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is owned memory like a `Vec<u8>`; nothing in it is tied to a thread.
unsafe impl Send for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the alignment, at least one block).
    pub fn new(len: usize) -> AlignedBuf {
        let cap = len.max(1).div_ceil(DEFAULT_DIO_ALIGN) * DEFAULT_DIO_ALIGN;
        let Ok(layout) = Layout::from_size_align(cap, DEFAULT_DIO_ALIGN) else {
            // Only a size near usize::MAX gets here; requests are at most 32 MiB.
            std::alloc::handle_alloc_error(Layout::new::<u8>());
        };
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len }
    }

    /// The usable length.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is an owned allocation of at least `len` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as one scatter-list entry.
    pub fn iobuf(&mut self) -> IoBuf {
        IoBuf {
            ptr: self.ptr.as_ptr(),
            len: self.len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let cap = self.len.max(1).div_ceil(DEFAULT_DIO_ALIGN) * DEFAULT_DIO_ALIGN;
        if let Ok(layout) = Layout::from_size_align(cap, DEFAULT_DIO_ALIGN) {
            // SAFETY: allocated in `new` with this very layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// The direct-I/O memory alignment of the open file `fd`: `statx`'s `STATX_DIOALIGN` where the
/// kernel and file system report it, [`DEFAULT_DIO_ALIGN`] otherwise. `Err` when the file system
/// reports that it cannot do direct I/O on this file at all, or needs file offsets aligned to
/// more than a 512-byte sector (guest requests are sector-aligned, not more).
pub fn dio_alignment(fd: RawFd) -> io::Result<usize> {
    let Some((mem, offset)) = dovetail_store::direct::dio_limits(fd) else {
        return Ok(DEFAULT_DIO_ALIGN);
    };
    if mem == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the file system does not support direct I/O (O_DIRECT) on this file",
        ));
    }
    if offset > 512 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "direct I/O on this file needs offsets aligned to {} bytes, more than a \
                 512-byte sector",
                offset
            ),
        ));
    }
    Ok((mem as usize).max(512))
}

/// `preadv`/`pwritev` of every byte of `iov` past its first `skip` bytes, at `offset + skip`:
/// finishes a transfer an engine completed short.
pub fn rw_all(
    fd: RawFd,
    iov: &[libc::iovec],
    mut skip: usize,
    offset: u64,
    write: bool,
) -> io::Result<()> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut rest: Vec<libc::iovec> = Vec::with_capacity(iov.len());
    while skip < total {
        rest.clear();
        let mut pos = 0usize;
        for v in iov {
            let (lo, hi) = (pos.max(skip), pos + v.iov_len);
            if lo < hi {
                rest.push(libc::iovec {
                    iov_base: v.iov_base.cast::<u8>().wrapping_add(lo - pos).cast(),
                    iov_len: hi - lo,
                });
            }
            pos = hi;
        }
        let n = rest.len().min(1024);
        let off = libc::off_t::try_from(offset + skip as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the iovecs point into buffers the caller keeps valid for this call (the
        // engine's contract); the kernel checks them.
        let rc = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), n as libc::c_int, off)
            } else {
                libc::preadv(fd, rest.as_ptr(), n as libc::c_int, off)
            }
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended early",
            ));
        }
        skip += rc as usize;
    }
    Ok(())
}

/// One finished request: its tag and what came of it (for reads and writes, the bytes moved).
#[derive(Debug)]
pub struct Completed {
    pub tag: u64,
    pub result: io::Result<usize>,
}

/// The tag of a [`Uring::push_poll`], never a request's.
pub const POLL_TAG: u64 = u64::MAX;
/// The tag of a [`Uring::cancel_poll`], never a request's.
pub const CANCEL_TAG: u64 = u64::MAX - 1;
/// The tag of a [`Uring::push_wake_poll`], never a request's.
pub const WAKE_TAG: u64 = u64::MAX - 2;

/// The io_uring engine of one queue worker.
pub struct Uring {
    ring: IoUring,
    in_flight: usize,
    /// Pushed but not yet handed to the kernel.
    queued: usize,
    /// Polls armed and not yet finished (at most one in practice): a multishot poll stays
    /// armed until it is cancelled or the kernel ends it.
    polls: usize,
    /// A poll completed since the last [`Uring::take_poll_fired`].
    poll_fired: bool,
    /// The kernel refused a multishot poll (before 5.13): none is armed again.
    poll_unsupported: bool,
    /// Poll cancellations submitted and not yet completed.
    cancels: usize,
    /// Wake polls (a thread pool's completion eventfd) armed and not finished.
    wake_polls: usize,
}

impl fmt::Debug for Uring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .field("queued", &self.queued)
            .finish()
    }
}

impl Uring {
    /// A ring for `depth` requests in flight. `Err` where the kernel has no io_uring (or it is
    /// disabled, `kernel.io_uring_disabled`): use a [`Pool`] then.
    pub fn new(depth: u32) -> io::Result<Uring> {
        // COOP_TASKRUN (5.19): completions that arrive while the worker runs are handled at
        // its next io_uring_enter, which comes soon, instead of interrupting it (an IPI, dear in
        // a VM); a worker asleep in its wait is still woken at once. Older kernels refuse the
        // flag: a plain ring then.
        let ring = match IoUring::builder().setup_coop_taskrun().build(depth.max(1)) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(depth.max(1))?,
            Err(e) => return Err(e),
        };
        Ok(Uring {
            ring,
            in_flight: 0,
            queued: 0,
            polls: 0,
            poll_fired: false,
            poll_unsupported: false,
            cancels: 0,
            wake_polls: 0,
        })
    }

    /// Polls armed and not completed.
    pub fn polls(&self) -> usize {
        self.polls
    }

    /// Whether an armed poll completed since the last call.
    pub fn take_poll_fired(&mut self) -> bool {
        std::mem::take(&mut self.poll_fired)
    }

    /// Whether a multishot poll can be armed (the kernel did not refuse one).
    pub fn poll_supported(&self) -> bool {
        !self.poll_unsupported
    }

    /// Queues a multishot poll for `fd` becoming readable (a queue's kick eventfd), so a wait
    /// for completions also ends when the guest makes new requests available: one
    /// `io_uring_enter` waits for both. It stays armed (one completion per wake-up of `fd`, none
    /// while `fd` merely stays readable) until [`Uring::cancel_poll`], the ring's end, or the
    /// kernel ends it (then [`Uring::polls`] drops to 0 and it may be armed again). Its
    /// completions are not a request's: [`Uring::reap`] only notes them
    /// ([`Uring::take_poll_fired`]).
    ///
    /// # Safety
    ///
    /// `fd` must be open when the poll is handed to the kernel (the next submission), which
    /// then holds its own reference to the file.
    pub unsafe fn push_poll(&mut self, fd: RawFd) -> bool {
        if self.room() == 0 || self.poll_unsupported {
            return false;
        }
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(POLL_TAG);
        // SAFETY: a poll names no memory; the caller keeps `fd` open until it is submitted.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return false;
        }
        self.polls += 1;
        self.queued += 1;
        true
    }

    /// Queues a multishot poll for `fd` (a [`Pool`]'s completion eventfd, [`Pool::wake_fd`])
    /// becoming readable, so a wait for completions also ends when a pool thread finishes a
    /// request: one wait for both engines. Its completions are only counted (none is a
    /// request's); it stays armed until the ring ends or the kernel ends it
    /// ([`Uring::wake_polls`] drops to 0: arm it again). `false` if nothing was queued.
    ///
    /// # Safety
    ///
    /// `fd` must be open when the poll is handed to the kernel (the next submission).
    pub unsafe fn push_wake_poll(&mut self, fd: RawFd) -> bool {
        if self.room() == 0 || self.poll_unsupported {
            return false;
        }
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(WAKE_TAG);
        // SAFETY: a poll names no memory; the caller keeps `fd` open until it is submitted.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return false;
        }
        self.wake_polls += 1;
        self.queued += 1;
        true
    }

    /// Wake polls armed and not finished.
    pub fn wake_polls(&self) -> usize {
        self.wake_polls
    }

    /// Hands what is queued to the kernel and waits for one completion, a request's or a
    /// poll's (so also for a kick or a pool's wake-up, if those polls are armed).
    pub fn submit_and_wait_one(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(n) => {
                    self.queued = self.queued.saturating_sub(n);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Cancels the armed poll (if any): its file is no longer the one to watch. The poll's
    /// last completion is reaped like any other.
    pub fn cancel_poll(&mut self) {
        if self.polls == 0 {
            return;
        }
        let sqe = opcode::PollRemove::new(POLL_TAG)
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancellation names no memory.
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            self.queued += 1;
            self.cancels += 1;
        }
    }

    /// Requests submitted (or queued) and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Entries queued and not yet handed to the kernel.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Requests that fit before the ring is full.
    pub fn room(&self) -> usize {
        (self.ring.params().sq_entries() as usize)
            .saturating_sub(self.in_flight + self.polls + self.cancels + self.wake_polls)
    }

    /// Queues a `readv`/`writev` of `n` iovecs at `iov` on `fd` at `offset`. Returns `false`
    /// (nothing queued) when the ring is full.
    ///
    /// # Safety
    ///
    /// `iov[..n]` and every buffer it names must stay valid (and, for a read, not be used
    /// otherwise) until this tag's completion is reaped, and `fd` must stay open until then.
    pub unsafe fn push_rw(
        &mut self,
        tag: u64,
        fd: RawFd,
        iov: *const libc::iovec,
        n: u32,
        offset: u64,
        write: bool,
    ) -> bool {
        if self.room() == 0 {
            return false;
        }
        let sqe = if write {
            opcode::Writev::new(types::Fd(fd), iov, n)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), iov, n)
                .offset(offset)
                .build()
        }
        .user_data(tag);
        // SAFETY: the caller keeps the iovecs, buffers and descriptor valid until completion.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return false;
        }
        self.in_flight += 1;
        self.queued += 1;
        true
    }

    /// Hands every queued request to the kernel with one `io_uring_enter` (none if nothing is
    /// queued) and, with `wait`, blocks until at least one completion is ready.
    pub fn submit(&mut self, wait: bool) -> io::Result<()> {
        let want = usize::from(wait && self.in_flight > 0);
        if self.queued == 0 && want == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => {
                    self.queued = self.queued.saturating_sub(n);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: reap first.
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves every ready completion to `out`.
    pub fn reap(&mut self, out: &mut Vec<Completed>) {
        for cqe in self.ring.completion() {
            if cqe.user_data() == POLL_TAG {
                if !io_uring::cqueue::more(cqe.flags()) {
                    // Ended (cancelled, or the kernel stopped it): no more from this one.
                    self.polls = self.polls.saturating_sub(1);
                    if cqe.result() == -libc::EINVAL {
                        self.poll_unsupported = true;
                    }
                }
                if cqe.result() >= 0 {
                    self.poll_fired = true;
                }
                continue;
            }
            if cqe.user_data() == WAKE_TAG {
                if !io_uring::cqueue::more(cqe.flags()) {
                    self.wake_polls = self.wake_polls.saturating_sub(1);
                    if cqe.result() == -libc::EINVAL {
                        self.poll_unsupported = true;
                    }
                }
                continue;
            }
            if cqe.user_data() == CANCEL_TAG {
                self.cancels = self.cancels.saturating_sub(1);
                continue;
            }
            self.in_flight = self.in_flight.saturating_sub(1);
            let r = cqe.result();
            out.push(Completed {
                tag: cqe.user_data(),
                result: if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as usize)
                },
            });
        }
    }
}

/// The asynchronous-read engine of one queue worker: reads of the pieces a layout mapped to an
/// [`AioRead`] source (a store on RADOS, librados aio) are started here and complete on the
/// source's own thread, which hands `(tag, result)` back through a channel and writes an
/// eventfd (a [`Pool`]'s, [`Pool::wake_fd`], which the worker's ring polls: one wait for
/// every engine). So a queue keeps many reads in flight with no thread of its own per read.
pub struct Aio {
    tx: Sender<(u64, io::Result<()>)>,
    rx: Receiver<(u64, io::Result<()>)>,
    /// A duplicate of the eventfd to write after each completion, shared with the reads in
    /// flight (so it stays open until the last of them completed).
    wake: Option<Arc<std::os::fd::OwnedFd>>,
    in_flight: usize,
}

impl fmt::Debug for Aio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aio")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Aio {
    /// An engine whose completions also write `wake` (an eventfd: it is duplicated, the
    /// caller's stays the caller's); `None`: completions are only sent.
    pub fn new(wake: Option<RawFd>) -> Aio {
        let wake = wake.and_then(|fd| {
            use std::os::fd::FromRawFd;
            // SAFETY: `fd` is an open descriptor of the caller's; F_DUPFD_CLOEXEC makes a
            // new one this engine owns (checked below).
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            // SAFETY: `dup` was just made and is owned by nothing else.
            (dup >= 0).then(|| Arc::new(unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) }))
        });
        let (tx, rx) = channel();
        Aio {
            tx,
            rx,
            wake,
            in_flight: 0,
        }
    }

    /// Reads started and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts a read of the iovecs' total length at `offset` of `source`; its completion comes
    /// back from [`Aio::reap`] with `tag`. `Err`: refused at submission (nothing in flight).
    ///
    /// # Safety
    ///
    /// Every iovec must stay valid for writes of its whole length, and not be used otherwise,
    /// until this tag's completion was reaped.
    pub unsafe fn submit(
        &mut self,
        tag: u64,
        source: &dyn AioRead,
        offset: u64,
        iov: &[libc::iovec],
    ) -> io::Result<()> {
        let tx = self.tx.clone();
        let wake = self.wake.clone();
        let done = Box::new(move |r: io::Result<()>| {
            // The worker is gone only after every read it started was reaped: never here.
            let _ = tx.send((tag, r));
            if let Some(w) = wake {
                use std::os::fd::AsRawFd;
                let one = 1u64;
                // SAFETY: writes 8 bytes from `one` to this engine's duplicate of the eventfd,
                // kept open by the `Arc` this closure holds.
                let _ = unsafe { libc::write(w.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }
        });
        // SAFETY: the caller keeps the iovecs valid and unused until the completion was
        // reaped, which comes after `done` ran.
        unsafe { source.aio_read(offset, iov, done) }?;
        self.in_flight += 1;
        Ok(())
    }

    /// Moves finished reads to `out`; with `wait`, blocks for at least one if any is in flight.
    pub fn reap(&mut self, wait: bool, out: &mut Vec<Completed>) {
        let mut take = |(tag, r): (u64, io::Result<()>), n: &mut usize| {
            *n -= 1;
            out.push(Completed {
                tag,
                result: r.map(|()| 0),
            });
        };
        if wait && self.in_flight > 0 {
            if let Ok(c) = self.rx.recv() {
                take(c, &mut self.in_flight);
            }
        }
        while let Ok(c) = self.rx.try_recv() {
            take(c, &mut self.in_flight);
        }
    }
}

impl Drop for Aio {
    /// Waits for the reads in flight: their buffers are the caller's.
    fn drop(&mut self) {
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            self.reap(true, &mut sink);
            sink.clear();
        }
    }
}

/// A job for a [`Pool`] thread.
struct Job {
    tag: u64,
    at: Sector,
    write: bool,
    bufs: Vec<IoBuf>,
}

/// The thread-pool engine of one queue worker: each request runs the layout's synchronous
/// `read_into`/`write_from` on one of the pool's threads, so a queue keeps as many requests in
/// flight as it has threads.
pub struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<(u64, Result<()>, Vec<IoBuf>)>,
    threads: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    /// Written (1) by a thread after each completion it sends: what a worker waiting in an
    /// io_uring polls ([`Uring::push_wake_poll`]). `None` if no eventfd could be made.
    wake: Option<std::os::fd::OwnedFd>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Pool {
    /// Starts `threads` threads running requests on `layout`; `name` labels them.
    pub fn new(layout: Arc<dyn BlockLayout>, threads: usize, name: &str) -> io::Result<Pool> {
        let (jobs, rx) = channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        let wake = (efd >= 0).then(|| {
            use std::os::fd::FromRawFd;
            // SAFETY: `efd` was just opened and is owned by nothing else.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(efd) }
        });
        let wake_fd = wake.as_ref().map(|w| {
            use std::os::fd::AsRawFd;
            w.as_raw_fd()
        });
        let (done_tx, done) = channel();
        let mut handles = Vec::new();
        let retained = (crate::iobuf::RETAINED_SCRATCH / threads.max(1)).max(64 << 10);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let done_tx = done_tx.clone();
            let layout = layout.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("{name}-io{i}"))
                    .spawn(move || {
                        dovetail_store::thread_kind::entered(
                            dovetail_store::thread_kind::ThreadKind::Engine,
                        );
                        let mut scratch = Vec::new();
                        loop {
                            let job = {
                                let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                                rx.recv()
                            };
                            let Ok(job) = job else { return };
                            // SAFETY: whoever submitted the job keeps its buffers valid until
                            // its completion is received (`Pool::submit`'s contract).
                            let bufs = unsafe { IoBufs::new(&job.bufs) };
                            // A panic is the request's error (`Error::Panicked`), not the
                            // end of the thread: its queue would wait for it forever.
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                if job.write {
                                    layout.write_from(job.at, bufs, &mut scratch)
                                } else {
                                    layout.read_into(job.at, bufs, &mut scratch)
                                }
                            }))
                            .unwrap_or_else(|p| {
                                Err(crate::Error::Panicked(crate::panic_message(&*p)))
                            });
                            // The queue's threads together keep what one worker would.
                            crate::iobuf::release_scratch(&mut scratch, retained);
                            if done_tx.send((job.tag, r, job.bufs)).is_err() {
                                return;
                            }
                            if let Some(fd) = wake_fd {
                                let one = 1u64;
                                // SAFETY: writes 8 bytes from `one` to the pool's eventfd,
                                // open until the pool is dropped, which joins this thread
                                // first. A full counter (never in practice) only fails it.
                                let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
                            }
                        }
                    })?,
            );
        }
        Ok(Pool {
            jobs: Some(jobs),
            done,
            threads: handles,
            in_flight: 0,
            wake,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The eventfd written after each completion (for [`Uring::push_wake_poll`]); open while
    /// the pool lives.
    pub fn wake_fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        self.wake.as_ref().map(|w| w.as_raw_fd())
    }

    /// Hands a read or write of `bufs` at `at` to a pool thread; `Err(bufs)` if the pool's
    /// threads are gone (nothing was queued).
    ///
    /// # Safety
    ///
    /// Every buffer of `bufs` must stay valid for reads and writes until this tag's completion
    /// was received from [`Pool::reap`].
    pub unsafe fn submit(
        &mut self,
        tag: u64,
        at: Sector,
        write: bool,
        bufs: Vec<IoBuf>,
    ) -> std::result::Result<(), Vec<IoBuf>> {
        let Some(jobs) = self.jobs.as_ref() else {
            return Err(bufs);
        };
        let job = Job {
            tag,
            at,
            write,
            bufs,
        };
        match jobs.send(job) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => Err(e.0.bufs),
        }
    }

    /// Moves finished requests to `out` (their buffer lists too, for reuse); with `wait`, blocks
    /// for at least one if any is in flight.
    pub fn reap(&mut self, wait: bool, out: &mut Vec<(u64, Result<()>, Vec<IoBuf>)>) {
        if wait && self.in_flight > 0 {
            if let Ok(c) = self.done.recv() {
                self.in_flight -= 1;
                out.push(c);
            }
        }
        while let Ok(c) = self.done.try_recv() {
            self.in_flight -= 1;
            out.push(c);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Whatever is still in flight finishes first (its buffers are the caller's), then the
        // threads see the closed channel and stop.
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            self.reap(true, &mut sink);
            sink.clear();
        }
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_modes_parse_and_print() {
        assert_eq!("none".parse::<CacheMode>(), Ok(CacheMode::None));
        assert_eq!("writeback".parse::<CacheMode>(), Ok(CacheMode::Writeback));
        let e = "direct".parse::<CacheMode>().expect_err("unknown");
        assert!(e.contains("expected none"), "{e}");
        assert_eq!(CacheMode::None.to_string(), "none");
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [1, 512, 4096, 5000, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.iobuf().ptr as usize % DEFAULT_DIO_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[len - 1] = 7;
        }
    }

    /// One multishot poll on an eventfd ends a wait for completions each time the eventfd is
    /// written, twice without re-arming (the eventfd is never read, as a queue's kick is left
    /// for the event loop), while a read that cannot finish stays in flight; a cancelled poll
    /// is gone and the read still completes when its data comes.
    #[test]
    fn a_multishot_poll_ends_each_wait_while_a_read_is_in_flight() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let Ok(mut ring) = Uring::new(8) else {
            eprintln!("no io_uring here; skipped");
            return;
        };
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(efd >= 0, "eventfd: {}", io::Error::last_os_error());
        let kick = move |n: u64| {
            // SAFETY: writes 8 bytes from `n` to the eventfd this test owns.
            let rc = unsafe { libc::write(efd, (&n as *const u64).cast(), 8) };
            assert_eq!(rc, 8);
        };
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        let mut buf = vec![0u8; 64];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov`, `buf` and `ours` outlive the reaping below.
        assert!(unsafe { ring.push_rw(1, ours.as_raw_fd(), &iov, 1, 0, false) });
        // SAFETY: `efd` stays open until the end of the test.
        assert!(unsafe { ring.push_poll(efd) });
        assert!(ring.poll_supported());
        let mut out = Vec::new();
        ring.submit(false).expect("submit");
        ring.reap(&mut out);
        assert!(
            out.is_empty() && !ring.take_poll_fired(),
            "nothing happened yet"
        );
        for round in 0..2 {
            let writer = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                kick(1);
            });
            let t = std::time::Instant::now();
            ring.submit(true).expect("wait");
            ring.reap(&mut out);
            writer.join().expect("writer");
            assert!(
                ring.take_poll_fired(),
                "round {round}: the wait ended without the poll"
            );
            assert!(
                out.is_empty(),
                "round {round}: the read cannot have completed"
            );
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            assert_eq!(ring.polls(), 1, "round {round}: still armed");
        }
        ring.cancel_poll();
        while ring.polls() > 0 {
            // Waits for a completion: the cancellation's or the poll's last one.
            ring.submit(true).expect("cancel");
            ring.reap(&mut out);
        }
        theirs.write_all(b"data").expect("send");
        while ring.in_flight() > 0 {
            ring.submit(true).expect("wait");
            ring.reap(&mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].tag, out[0].result.as_ref().ok()), (1, Some(&4)));
        assert_eq!(&buf[..4], b"data");
        // SAFETY: `efd` is this test's and no longer used by the ring (its poll was cancelled).
        unsafe { libc::close(efd) };
    }

    #[test]
    fn uring_reads_and_writes_a_file_out_of_order() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let Ok(mut ring) = Uring::new(8) else {
            eprintln!("no io_uring here; skipped");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("create");
        f.set_len(1 << 20).expect("size");
        let mut bufs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
        let iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        for (i, v) in iovs.iter().enumerate() {
            // SAFETY: `iovs` and `bufs` outlive the reaping below; `f` stays open.
            let ok = unsafe { ring.push_rw(i as u64, f.as_raw_fd(), v, 1, i as u64 * 8192, true) };
            assert!(ok);
        }
        assert_eq!(ring.in_flight(), 4);
        let mut out = Vec::new();
        while ring.in_flight() > 0 {
            ring.submit(true).expect("submit");
            ring.reap(&mut out);
        }
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, [0, 1, 2, 3]);
        assert!(out.iter().all(|c| matches!(c.result, Ok(4096))));
        let mut back = [0u8; 4096];
        f.read_exact_at(&mut back, 3 * 8192).expect("read");
        assert!(back.iter().all(|&b| b == 4));
    }
}
