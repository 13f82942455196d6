//! The file I/O a store needs, as a small trait, so the store runs over real files in
//! production and over [`crate::sim::SimFile`] (which models what a power cut keeps) in tests.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Positional I/O on one of a store's files.
pub trait StoreFile: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (an error if the file ends first).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`. Not durable until [`StoreFile::sync`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Sets the file's length (new bytes read as zeros).
    fn set_size(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros, releasing the space where the file system
    /// can (a hole). Not durable until [`StoreFile::sync`].
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Reads exactly the iovecs' total length at `offset` into memory this process does not
    /// own as Rust data (a guest's RAM). The default goes through a temporary buffer; a real
    /// file reads straight into the iovecs with `preadv`.
    ///
    /// # Safety
    ///
    /// Every iovec must be valid for writes of its whole length for the duration of the call.
    unsafe fn read_raw(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let mut tmp = vec![0u8; iov_len(iov)];
        self.read_at(offset, &mut tmp)?;
        // SAFETY: the caller's promise on `iov` is passed on unchanged.
        unsafe { copy_to_iovecs(&tmp, iov) };
        Ok(())
    }
}

/// The total length of `iov`.
pub fn iov_len(iov: &[libc::iovec]) -> usize {
    iov.iter().map(|v| v.iov_len).sum()
}

/// Copies `src` into the iovecs, in order (`src` must be as long as they are together).
///
/// # Safety
///
/// Every iovec must be valid for writes of its whole length, and none may overlap `src`.
pub unsafe fn copy_to_iovecs(src: &[u8], iov: &[libc::iovec]) {
    let mut done = 0;
    for v in iov {
        // SAFETY: the caller promises `v` is valid for writes of `iov_len` bytes and does not
        // overlap `src`; the slice index checks `src` is long enough.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src[done..done + v.iov_len].as_ptr(),
                v.iov_base.cast(),
                v.iov_len,
            )
        };
        done += v.iov_len;
    }
}

/// iovecs per `preadv` call (well under `IOV_MAX`).
const IOV_BATCH: usize = 64;

/// Zeros written per `write_at` when a file system cannot punch holes.
const ZERO_CHUNK: u64 = 1 << 20;

impl StoreFile for File {
    unsafe fn read_raw(&self, mut offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        // Progress: iovec `idx`, `skip` bytes into it.
        let (mut idx, mut skip) = (0usize, 0usize);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        loop {
            while idx < iov.len() && iov[idx].iov_len == skip {
                idx += 1;
                skip = 0;
            }
            if idx == iov.len() {
                return Ok(());
            }
            let mut batch = [empty; IOV_BATCH];
            let mut n = 0;
            for (k, v) in iov[idx..].iter().take(IOV_BATCH).enumerate() {
                let s = if k == 0 { skip } else { 0 };
                batch[k] = libc::iovec {
                    iov_base: v.iov_base.cast::<u8>().wrapping_add(s).cast(),
                    iov_len: v.iov_len - s,
                };
                n = k + 1;
            }
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the first `n` iovecs lie within the caller's, which it promises valid for
            // writes for the duration of this call.
            let rc =
                unsafe { libc::preadv(self.as_raw_fd(), batch.as_ptr(), n as libc::c_int, off) };
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
                    "the file ends before the range read",
                ));
            }
            let mut got = rc as usize;
            offset += got as u64;
            while got > 0 && idx < iov.len() {
                let left = iov[idx].iov_len - skip;
                if got >= left {
                    got -= left;
                    idx += 1;
                    skip = 0;
                } else {
                    skip += got;
                    got = 0;
                }
            }
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `self`
        // and stays open for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
                let mut at = offset;
                let end = offset + len;
                while at < end {
                    let n = (end - at).min(ZERO_CHUNK) as usize;
                    FileExt::write_all_at(self, &zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            _ => Err(err),
        }
    }
}

/// How [`lock`] locks a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    /// One writer: a store opened for changes.
    Exclusive,
    /// Any number of readers: `check`, listings.
    Shared,
}

/// Takes an advisory `flock` on `file` without waiting. `Ok(false)` if another open file
/// description holds a conflicting lock. The lock lives as long as `file` is open.
pub(crate) fn lock(file: &File, mode: LockMode) -> io::Result<bool> {
    let op = match mode {
        LockMode::Exclusive => libc::LOCK_EX,
        LockMode::Shared => libc::LOCK_SH,
    } | libc::LOCK_NB;
    // SAFETY: flock only reads its integer arguments; the descriptor is owned by `file` and
    // stays open for the duration of the call.
    let r = unsafe { libc::flock(file.as_raw_fd(), op) };
    if r == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}
