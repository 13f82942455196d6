//! Scatter lists of buffers in memory shared with an untrusted party (a guest's RAM).
//!
//! Such memory can change under us at any time, so no Rust reference (`&[u8]`) is ever formed to
//! it: layouts either hand the buffers to the kernel (`preadv`/`pwritev`) or copy them to or from
//! memory of their own with [`IoBufs::copy_from`] / [`IoBufs::copy_to`]. A layout that must look
//! at the data (compare, checksum, mirror) copies it first, so it sees one consistent snapshot.

use std::marker::PhantomData;

/// One buffer: a host address and a length. Plain numbers; only [`IoBufs::new`] vouches for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoBuf {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: an `IoBuf` is only an address and a length; it is dereferenced only through `IoBufs`,
// whose (unsafe) constructor is where validity is promised, on whichever thread that happens.
unsafe impl Send for IoBuf {}

/// A scatter list of buffers, valid for reads and writes for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct IoBufs<'a> {
    bufs: &'a [IoBuf],
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

impl<'a> IoBufs<'a> {
    /// Wraps `bufs`.
    ///
    /// # Safety
    ///
    /// Every buffer must be mapped, readable and writable for its whole length for as long as
    /// `'a` lasts, and must not overlap memory this process treats as Rust-owned data.
    pub unsafe fn new(bufs: &'a [IoBuf]) -> IoBufs<'a> {
        IoBufs {
            bufs,
            len: bufs.iter().map(|b| b.len).sum(),
            _mem: PhantomData,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers, for handing to the kernel as iovecs.
    pub fn as_slice(&self) -> &'a [IoBuf] {
        self.bufs
    }

    /// Copies `src` into the buffers, from their start. `src` must not be longer than `len()`.
    pub fn copy_from(&self, src: &[u8]) {
        let mut done = 0;
        for b in self.bufs {
            if done == src.len() {
                break;
            }
            let n = b.len.min(src.len() - done);
            // SAFETY: `b` is valid for writes of `b.len >= n` bytes for 'a (the contract of
            // `new`), and `src` is Rust-owned memory, so the two cannot overlap. The guest may
            // read or write `b` meanwhile: `copy_to_shared` stores to it with volatile word
            // writes (never memcpy), so that is no data race (dovetail_store::shared).
            unsafe { dovetail_store::shared::copy_to_shared(&src[done..done + n], b.ptr) };
            done += n;
        }
        debug_assert_eq!(done, src.len(), "source longer than the scatter list");
    }

    /// Copies the buffers, from their start, into `dst`. `dst` must not be longer than `len()`.
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut done = 0;
        for b in self.bufs {
            if done == dst.len() {
                break;
            }
            let n = b.len.min(dst.len() - done);
            // SAFETY: `b` is valid for reads of `b.len >= n` bytes for 'a (the contract of
            // `new`), and `dst` is Rust-owned memory, so the two cannot overlap. The guest may
            // write `b` meanwhile: `copy_from_shared` loads it with volatile word reads, each
            // done exactly once (never memcpy), so that is no data race and `dst` holds one
            // snapshot, possibly mixing old and new guest bytes (dovetail_store::shared).
            unsafe { dovetail_store::shared::copy_from_shared(b.ptr, &mut dst[done..done + n]) };
            done += n;
        }
        debug_assert_eq!(done, dst.len(), "destination longer than the scatter list");
    }
}

impl IoBufs<'_> {
    /// Appends to `out` the iovecs covering bytes `[at, at + len)` of the scatter list (clamped
    /// to its end), for handing to the kernel.
    pub fn iovecs(&self, at: usize, len: usize, out: &mut Vec<libc::iovec>) {
        let (mut pos, end) = (0usize, at.saturating_add(len));
        for b in self.bufs {
            let (lo, hi) = (pos.max(at), (pos + b.len).min(end));
            if lo < hi {
                out.push(libc::iovec {
                    iov_base: b.ptr.wrapping_add(lo - pos).cast(),
                    iov_len: hi - lo,
                });
            }
            pos += b.len;
            if pos >= end {
                break;
            }
        }
    }

    /// Zeroes bytes `[at, at + len)` of the scatter list (clamped to its end).
    pub fn zero(&self, at: usize, len: usize) {
        let (mut pos, end) = (0usize, at.saturating_add(len));
        for b in self.bufs {
            let (lo, hi) = (pos.max(at), (pos + b.len).min(end));
            if lo < hi {
                // SAFETY: `[lo - pos, hi - pos)` lies within `b`, which is valid for writes for
                // 'a (the contract of `new`); the guest may access it meanwhile, so the zeros are
                // volatile stores (dovetail_store::shared).
                unsafe {
                    dovetail_store::shared::zero_shared(b.ptr.wrapping_add(lo - pos), hi - lo)
                };
            }
            pos += b.len;
            if pos >= end {
                break;
            }
        }
    }
}

/// What a reusable scratch buffer keeps between requests: requests up to this size (the usual
/// ones: Linux guests send at most 1 MiB by default) reuse it without allocating; a larger one
/// grows it for its own duration, and [`release_scratch`] gives the excess back afterwards, so a
/// burst of 32 MiB requests does not pin 32 MiB per queue for the life of the connection.
pub const RETAINED_SCRATCH: usize = 1 << 20;

/// Shrinks `buf` back to at most `keep` bytes of capacity if it grew beyond (the memory goes back
/// to the allocator); a buffer already within the bound is left alone, so the hot path does not
/// allocate.
pub fn release_scratch(buf: &mut Vec<u8>, keep: usize) {
    if buf.capacity() > keep {
        buf.truncate(keep);
        buf.shrink_to(keep);
    }
}

/// The first `len` bytes of a reusable scratch buffer, growing it only when it is too small.
pub fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_across_scattered_buffers() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let list = [
            IoBuf {
                ptr: a.as_mut_ptr(),
                len: a.len(),
            },
            IoBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            },
        ];
        // SAFETY: both arrays live until the end of the test and are not otherwise accessed
        // while `bufs` is used.
        let bufs = unsafe { IoBufs::new(&list) };
        assert_eq!(bufs.len(), 8);
        bufs.copy_from(&[1, 2, 3, 4, 5, 6, 7]);
        let mut back = [0u8; 8];
        bufs.copy_to(&mut back);
        assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(a, [1, 2, 3]);
        assert_eq!(b, [4, 5, 6, 7, 0]);
        bufs.zero(2, 3);
        assert_eq!(a, [1, 2, 0]);
        assert_eq!(b, [0, 0, 6, 7, 0]);
        let mut iov = Vec::new();
        bufs.iovecs(1, 4, &mut iov);
        assert_eq!(iov.len(), 2);
        assert_eq!(
            (iov[0].iov_base.cast::<u8>(), iov[0].iov_len),
            (a.as_mut_ptr().wrapping_add(1), 2)
        );
        assert_eq!(
            (iov[1].iov_base.cast::<u8>(), iov[1].iov_len),
            (b.as_mut_ptr(), 2)
        );
    }
}
