//! A tier's data space over RADOS objects: the [`StoreFile`] a store on RADOS hands its tiers,
//! so extents, grants and every layout work on it unchanged.
//!
//! Writes are asynchronous (librados aio): `write_at` hands the data to the cluster and returns,
//! so a queue's requests keep many writes in flight, bounded by [`MAX_IN_FLIGHT`] bytes (a
//! write waits for room). `sync` waits for the writes in flight (only those: what the cluster
//! acknowledged is durable) and reports the first that failed since the last sync, as a failed
//! `fdatasync` does, so the store treats it alike (the versions that wrote since their last
//! good sync are reopened from their last commit). A read, a zeroing or a removal of an object
//! waits for that object's writes in flight first, so it sees them (and never overtakes them).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use dovetail_rados::{Pool, WriteOp};

use crate::aio::{AioDone, AioRead};
use crate::file::StoreFile;

/// One tier's bytes, `[0, len)`, cut into objects of `object_size` bytes named
/// `PREFIX` + the object's index in 16 hex digits. Objects are made by the first write to
/// them; a missing object, or the part of one past its end, reads as zeros.
pub struct ObjectFile {
    pool: Arc<Pool>,
    prefix: String,
    object_size: u64,
    len: AtomicU64,
    in_flight: Arc<InFlight>,
    /// What a queue worker reads through asynchronously ([`StoreFile::aio_source`]).
    reader: Arc<ObjectReader>,
}

/// Asynchronous reads of one tier's objects (librados aio), for a queue worker to submit
/// itself: a read's bytes land in a buffer of its own, copied into the worker's buffers on
/// librados' finisher thread when the read completed, then the worker is told.
struct ObjectReader {
    pool: Arc<Pool>,
    prefix: String,
    object_size: u64,
}

impl fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectReader")
            .field("pool", &self.pool.name())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The caller's iovecs, carried to the completion (raw pointers are not `Send`).
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs name memory the submitter keeps valid, and uses for nothing else, until
// the read's `done` was called (`AioRead::aio_read`'s contract); only the completion writes it.
unsafe impl Send for Iovecs {}

impl Iovecs {
    fn all(&self) -> &[libc::iovec] {
        &self.0
    }
}

impl AioRead for ObjectReader {
    /// The range must lie in one object ([`ObjectFile::aio_source`] hands out no other); a
    /// missing object, or the part of one past its end, reads as zeros, as `read_at` does.
    unsafe fn aio_read(&self, offset: u64, iov: &[libc::iovec], done: AioDone) -> io::Result<()> {
        let len = crate::file::iov_len(iov);
        let within = offset % self.object_size;
        if within + len as u64 > self.object_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} cross an object's end"),
            ));
        }
        let oid = format!("{}{:016x}", self.prefix, offset / self.object_size);
        let iov = Iovecs(iov.to_vec());
        let r = self
            .pool
            .aio_read(&oid, within, vec![0u8; len], move |r, mut buf| {
                let r = match r {
                    Ok(got) => {
                        buf[got.min(len)..].fill(0);
                        Ok(())
                    }
                    Err(e) if e.errno() == libc::ENOENT => {
                        buf.fill(0);
                        Ok(())
                    }
                    Err(e) => Err(super::io_error(&e)),
                };
                if r.is_ok() {
                    // SAFETY: the submitter keeps the iovecs valid and unused until `done` is
                    // called, just below (`aio_read`'s contract); `buf` is this read's own.
                    unsafe { crate::file::copy_to_iovecs(&buf, iov.all()) };
                }
                done(r);
            });
        r.map_err(|e| super::io_error(&e))
    }
}

/// Bytes of asynchronous writes one tier keeps in flight at most.
pub const MAX_IN_FLIGHT: u64 = 64 << 20;

/// The writes in flight, told of each completion by librados' finisher thread.
#[derive(Default)]
struct InFlight {
    state: Mutex<Writes>,
    changed: Condvar,
}

#[derive(Default)]
struct Writes {
    /// The sequence numbers of the writes in flight, per object index.
    objects: HashMap<u64, BTreeSet<u64>>,
    /// The last sequence number given to a write.
    seq: u64,
    count: u64,
    bytes: u64,
    /// The first write that failed since the last `sync`.
    failed: Option<io::Error>,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, Writes> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_while<'a>(
        &self,
        g: MutexGuard<'a, Writes>,
        busy: impl Fn(&Writes) -> bool,
    ) -> MutexGuard<'a, Writes> {
        self.changed
            .wait_while(g, |w| busy(w))
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every write to object `index` in flight now has completed (not those
    /// submitted meanwhile: a stream of writes to the object cannot starve the caller).
    fn settle(&self, index: u64) {
        let g = self.lock();
        let upto = g.seq;
        drop(self.wait_while(g, |w| {
            w.objects
                .get(&index)
                .and_then(|s| s.first())
                .is_some_and(|&first| first <= upto)
        }));
    }

    fn done(&self, index: u64, seq: u64, bytes: u64, result: Option<io::Error>) {
        let mut g = self.lock();
        if let Some(set) = g.objects.get_mut(&index) {
            set.remove(&seq);
            if set.is_empty() {
                g.objects.remove(&index);
            }
        }
        g.count -= 1;
        g.bytes -= bytes;
        if let Some(e) = result {
            if g.failed.is_none() {
                g.failed = Some(e);
            }
        }
        drop(g);
        self.changed.notify_all();
    }
}

impl fmt::Debug for ObjectFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectFile")
            .field("pool", &self.pool.name())
            .field("prefix", &self.prefix)
            .field("object_size", &self.object_size)
            .finish_non_exhaustive()
    }
}

impl ObjectFile {
    pub fn new(pool: Arc<Pool>, prefix: String, object_size: u64, len: u64) -> ObjectFile {
        assert!(object_size > 0, "objects of 0 bytes");
        let reader = Arc::new(ObjectReader {
            pool: pool.clone(),
            prefix: prefix.clone(),
            object_size,
        });
        ObjectFile {
            pool,
            prefix,
            object_size,
            len: AtomicU64::new(len),
            in_flight: Arc::default(),
            reader,
        }
    }

    /// Writes in flight now.
    pub fn writes_in_flight(&self) -> u64 {
        self.in_flight.lock().count
    }

    /// The object holding byte `offset`.
    pub fn oid(&self, offset: u64) -> String {
        format!("{}{:016x}", self.prefix, offset / self.object_size)
    }

    /// `[offset, offset + len)` cut at object boundaries: `(object, offset in it, bytes,
    /// offset in the range)` each.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (String, u64, u64, u64)> + '_ {
        let mut at = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let within = at % self.object_size;
            let n = (self.object_size - within).min(end - at);
            let piece = (self.oid(at), within, n, at - offset);
            at += n;
            Some(piece)
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len.load(Ordering::Relaxed) => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} are past the end of the tier's objects ({} bytes)",
                    self.len.load(Ordering::Relaxed)
                ),
            )),
        }
    }

    /// The pool the objects live in.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for ObjectFile {
    /// Waits for the writes in flight: none may outlive the connection they were sent on.
    fn drop(&mut self) {
        let g = self.in_flight.lock();
        drop(self.in_flight.wait_while(g, |w| w.count > 0));
    }
}

impl StoreFile for ObjectFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for (oid, within, n, at) in self.pieces(offset, buf.len() as u64) {
            let part = &mut buf[at as usize..(at + n) as usize];
            self.in_flight.settle((offset + at) / self.object_size);
            let got = match self.pool.read(&oid, within, part) {
                Ok(got) => got.min(part.len()),
                Err(e) if e.errno() == libc::ENOENT => 0,
                Err(e) => return Err(super::io_error(&e)),
            };
            part[got..].fill(0);
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for (oid, within, n, at) in self.pieces(offset, buf.len() as u64) {
            let index = (offset + at) / self.object_size;
            let part = buf[at as usize..(at + n) as usize].to_vec();
            let seq = {
                let g = self.in_flight.lock();
                let mut g = self
                    .in_flight
                    .wait_while(g, |w| w.count > 0 && w.bytes + n > MAX_IN_FLIGHT);
                g.seq += 1;
                let seq = g.seq;
                g.objects.entry(index).or_default().insert(seq);
                g.count += 1;
                g.bytes += n;
                seq
            };
            let flight = self.in_flight.clone();
            let submitted = self.pool.aio_write(&oid, within, part, move |r, _buf| {
                flight.done(index, seq, n, r.err().map(|e| super::io_error(&e)));
            });
            if let Err(e) = submitted {
                // Refused at submission: the completion never runs.
                self.in_flight.done(index, seq, n, None);
                return Err(super::io_error(&e));
            }
        }
        Ok(())
    }

    /// Waits for the writes in flight (the cluster acknowledges only what it made durable);
    /// fails if one of them, or of those since the last sync, failed.
    fn aio_reads(&self) -> bool {
        true
    }

    /// A range within one object that no write in flight touches the object of: a read
    /// started now sees every write completed before it (`read_at` waits for such writes
    /// instead; a queue worker must not wait, so it reads those the synchronous way).
    fn aio_source(&self, offset: u64, len: usize) -> Option<(Arc<dyn AioRead>, u64)> {
        self.check_range(offset, len as u64).ok()?;
        let index = offset / self.object_size;
        if len == 0 || (offset + len as u64 - 1) / self.object_size != index {
            return None;
        }
        if self.in_flight.lock().objects.contains_key(&index) {
            return None;
        }
        Some((self.reader.clone() as Arc<dyn AioRead>, offset))
    }

    fn sync(&self) -> io::Result<()> {
        let g = self.in_flight.lock();
        let mut g = self.in_flight.wait_while(g, |w| w.count > 0);
        match g.failed.take() {
            None => Ok(()),
            Some(e) => Err(io::Error::new(
                e.kind(),
                format!("a write to the tier's objects failed: {e}"),
            )),
        }
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Relaxed))
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        self.len.store(len, Ordering::Relaxed);
        Ok(())
    }

    /// Whole objects in the range are removed; parts of objects are zeroed.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        for (oid, within, n, at) in self.pieces(offset, len) {
            self.in_flight.settle((offset + at) / self.object_size);
            let r = if within == 0 && n == self.object_size {
                self.pool.remove(&oid).map(|_| ())
            } else {
                // An object that does not exist reads as zeros already (ENOENT, ignored below).
                self.pool
                    .operate(&oid, WriteOp::new().assert_exists().zero(within, n))
                    .map(|_| ())
            };
            match r {
                Err(e) if e.errno() != libc::ENOENT => return Err(super::io_error(&e)),
                _ => {}
            }
        }
        Ok(())
    }
}
