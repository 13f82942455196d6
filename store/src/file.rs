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
}

/// Zeros written per `write_at` when a file system cannot punch holes.
const ZERO_CHUNK: u64 = 1 << 20;

impl StoreFile for File {
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
