//! The file I/O a store needs, as a small trait, so the store runs over real files in
//! production and over `sim::SimFile` (feature `test-utils`, which models what a power cut keeps) in tests.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::aio::AioRead;

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

    /// Where `len` bytes at `offset` can be read by whoever submits the I/O itself (a queue
    /// worker's io_uring): `Some((descriptor, alignment))` when the range lies in a file opened
    /// for direct I/O and `offset` and `len` are multiples of the alignment (every buffer's
    /// address and length must be too). The descriptor is valid while `self` lives. `None`
    /// (the default): only this trait's calls reach the file.
    fn direct_target(&self, offset: u64, len: usize) -> Option<(RawFd, usize)> {
        let _ = (offset, len);
        None
    }

    /// Whether [`aio_source`](StoreFile::aio_source) may hand out ranges (cheap; a hint).
    fn aio_reads(&self) -> bool {
        false
    }

    /// Where `len` bytes at `offset` can be read asynchronously by whoever submits the read
    /// itself (a queue worker), instead of [`read_raw`](StoreFile::read_raw): the source and
    /// the offset to hand it, when the file's data lives behind an asynchronous interface
    /// (RADOS objects) and a read started now sees every write completed before it. `None`
    /// (the default): only this trait's calls reach the data.
    fn aio_source(&self, offset: u64, len: usize) -> Option<(Arc<dyn AioRead>, u64)> {
        let _ = (offset, len);
        None
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
        // overlap `src`; the slice index checks `src` is long enough. The iovecs may be a
        // guest's memory, written concurrently: `copy_to_shared` writes it with volatile word
        // stores, so that is no data race (crate::shared).
        unsafe { crate::shared::copy_to_shared(&src[done..done + v.iov_len], v.iov_base.cast()) };
        done += v.iov_len;
    }
}

/// iovecs per `preadv` call (well under `IOV_MAX`).
const IOV_BATCH: usize = 64;

/// Zeros written per `write_at` when a file system cannot punch holes.
const ZERO_CHUNK: u64 = 1 << 20;

/// Production I/O on real files. Every transfer loops until it is complete: `pread`/`preadv`
/// and `pwrite` may move fewer bytes than asked (a signal, a file system's limits, a device
/// filling up), and any call may fail with `EINTR` before moving anything. `read_at` and
/// `write_at` are std's `read_exact_at`/`write_all_at`, which retry `EINTR` and continue after
/// a partial transfer, failing only on a real error (a write that stops short because the
/// device is full returns that error, `ENOSPC`, never `Ok`; a read past the end of the file is
/// `UnexpectedEof`); `read_raw` does the same over iovecs; `sync` (std's `sync_data`) and
/// `set_size` retry `EINTR`; `zero_range` retries `fallocate` on `EINTR`.
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
        match punch_hole(self, offset, len) {
            Ok(()) => Ok(()),
            Err(err) if punch_unsupported(&err) => {
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
            Err(err) => Err(err),
        }
    }
}

/// Punches a hole over `[offset, offset + len)` of `file` (`fallocate`, keeping its size),
/// retrying `EINTR`.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    loop {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `file` and stays open for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // A signal can interrupt fallocate before it did anything: try again.
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether [`punch_hole`] failed because the file system cannot punch holes (then zeros are
/// written instead).
pub(crate) fn punch_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    /// Set (to a file path) only in the child process of
    /// [`a_short_pwrite_is_continued_then_reported_never_ok`].
    const CHILD: &str = "DOVETAIL_FILE_SHORT_WRITE_CHILD";
    /// The child's file size limit: a write crossing it is cut short by the kernel.
    const LIMIT: u64 = 6000;

    /// Runs in a child process of its own (file size limits are per process): with
    /// `RLIMIT_FSIZE` at [`LIMIT`] and `SIGXFSZ` ignored, a `pwrite` crossing the limit writes
    /// up to it and returns the short count, and the next one fails with `EFBIG`: a real short
    /// write followed by an error, like a device filling up.
    #[test]
    #[ignore = "runs in the child process of a_short_pwrite_is_continued_then_reported_never_ok"]
    fn short_write_child() {
        let path = std::env::var_os(CHILD).expect("run by its parent test, which sets the path");
        let lim = libc::rlimit {
            rlim_cur: LIMIT,
            rlim_max: LIMIT,
        };
        // SAFETY: setrlimit reads the struct we pass; signal installs the SIG_IGN disposition.
        // Both act on this process alone, which runs this one test.
        unsafe {
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("create the file");
        // One pwrite writes 6000 of the 8192 bytes; the loop goes on and gets EFBIG.
        let err = StoreFile::write_at(&f, 0, &[7u8; 8192]).expect_err("cut short by the limit");
        assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
        assert_eq!(StoreFile::size(&f).expect("size"), LIMIT);
        // Under the limit, writes complete.
        StoreFile::write_at(&f, 5000, &[9u8; 1000]).expect("fits under the limit");
        // A read past the end is an error, not a short success.
        let mut buf = vec![0u8; 100];
        let err = StoreFile::read_at(&f, LIMIT - 50, &mut buf).expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_short_pwrite_is_continued_then_reported_never_ok() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "file::tests::short_write_child",
                "--include-ignored",
                "--test-threads=1",
            ])
            .env(CHILD, &path)
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&path).expect("read the file");
        assert_eq!(bytes.len() as u64, LIMIT);
        assert!(bytes[..5000].iter().all(|&b| b == 7));
        assert!(bytes[5000..].iter().all(|&b| b == 9));
    }

    #[test]
    fn read_raw_continues_over_many_iovecs_and_fails_past_the_end() {
        let f = tempfile::tempfile().expect("tempfile");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        StoreFile::write_at(&f, 0, &data).expect("write");
        // 150 iovecs of 100 bytes: more than one preadv call (IOV_BATCH per call).
        let mut out = vec![0u8; 15_000];
        let iov: Vec<libc::iovec> = out
            .chunks_mut(100)
            .map(|c| libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: c.len(),
            })
            .collect();
        // SAFETY: every iovec covers a distinct part of `out`, which outlives the call.
        unsafe { StoreFile::read_raw(&f, 1000, &iov) }.expect("read");
        assert!(out[..] == data[1000..16_000]);
        // Crossing the end of the file: the partial preadv is followed by EOF, an error.
        let mut tail = vec![0u8; 200];
        let iov = [libc::iovec {
            iov_base: tail.as_mut_ptr().cast(),
            iov_len: tail.len(),
        }];
        // SAFETY: `iov` covers `tail`, which outlives the call.
        let err = unsafe { StoreFile::read_raw(&f, 19_900, &iov) }.expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn zero_range_reads_back_as_zeros() {
        let f = tempfile::tempfile().expect("tempfile");
        StoreFile::write_at(&f, 0, &[5u8; 3 * 4096]).expect("write");
        StoreFile::zero_range(&f, 4096, 4096).expect("zero");
        let mut b = vec![1u8; 3 * 4096];
        StoreFile::read_at(&f, 0, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 5));
        assert!(b[4096..8192].iter().all(|&x| x == 0));
        assert!(b[8192..].iter().all(|&x| x == 5));
        assert_eq!(
            StoreFile::size(&f).expect("size"),
            3 * 4096,
            "the size is kept"
        );
    }
}
