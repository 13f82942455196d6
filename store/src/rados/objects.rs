//! A tier's data space over RADOS objects: the [`StoreFile`] a store on RADOS hands its tiers,
//! so extents, grants and every layout work on it unchanged.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dovetail_rados::{Pool, WriteOp};

use crate::file::StoreFile;

/// One tier's bytes, `[0, len)`, cut into objects of `object_size` bytes named
/// `PREFIX` + the object's index in 16 hex digits. Objects are made by the first write to
/// them; a missing object, or the part of one past its end, reads as zeros.
pub struct ObjectFile {
    pool: Arc<Pool>,
    prefix: String,
    object_size: u64,
    len: AtomicU64,
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
        ObjectFile {
            pool,
            prefix,
            object_size,
            len: AtomicU64::new(len),
        }
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

impl StoreFile for ObjectFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for (oid, within, n, at) in self.pieces(offset, buf.len() as u64) {
            let part = &mut buf[at as usize..(at + n) as usize];
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
            let part = &buf[at as usize..(at + n) as usize];
            self.pool
                .operate(&oid, WriteOp::new().write(within, part))
                .map_err(|e| super::io_error(&e))?;
        }
        Ok(())
    }

    /// Every write was acknowledged by the cluster, which acknowledges only what it made
    /// durable: nothing is left to do.
    fn sync(&self) -> io::Result<()> {
        Ok(())
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
        for (oid, within, n, _) in self.pieces(offset, len) {
            let r = if within == 0 && n == self.object_size {
                self.pool.remove(&oid).map(|_| ())
            } else {
                match self.pool.stat(&oid) {
                    Ok(None) => Ok(()),
                    Ok(Some(_)) => self
                        .pool
                        .operate(&oid, WriteOp::new().assert_exists().zero(within, n))
                        .map(|_| ()),
                    Err(e) => Err(e),
                }
            };
            match r {
                Err(e) if e.errno() != libc::ENOENT => return Err(super::io_error(&e)),
                _ => {}
            }
        }
        Ok(())
    }
}
