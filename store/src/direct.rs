//! Direct I/O (`O_DIRECT`) on a tier's data file: what `serve --store DIR --cache none` opens
//! the tier files with.
//!
//! A [`DirectTierFile`] holds two open file descriptions of one tier file: one with
//! `O_DIRECT`, through which every read and write of the extents goes (no page of guest data is
//! kept or left dirty in the host's page cache, so one version's `fdatasync` of the shared file
//! writes back nothing of another's: tenant isolation), and the plain one the store was opened
//! with, for the tier header past the last extent, the file's size and hole punching.
//!
//! Direct I/O needs the file offset, the length and every buffer's address aligned
//! ([`DirectTierFile::align`], from `statx(STATX_DIOALIGN)`, 4 KiB when not reported). The
//! layouts read and write whole 4 KiB blocks at block offsets, so their transfers are aligned
//! but for their buffers: a transfer whose buffers are not aligned in memory goes through a
//! per-thread aligned bounce buffer (kept between calls, up to [`RETAINED_BOUNCE`], so the hot
//! path allocates nothing); one whose offset or length is not aligned (a part of a block) is
//! read, or read, patched and written back, as the aligned range around it, which is safe
//! because no layout writes one block from two threads at once (a parallax block's writes are
//! serialised by its stripe and state locks). A sync is still an `fdatasync`: it flushes the
//! device's volatile cache and the file's metadata.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

use crate::file::{copy_to_iovecs, iov_len, StoreFile};

/// The largest alignment this file handles (a parallax block: offsets it writes are multiples).
pub const MAX_ALIGN: usize = 4096;

/// What each thread's bounce buffer keeps between calls; a larger transfer grows it for its own
/// duration only.
pub const RETAINED_BOUNCE: usize = 1 << 20;

thread_local! {
    /// This thread's bounce buffer (over-allocated by [`MAX_ALIGN`] to hold an aligned slice).
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on an aligned slice of `len` bytes of this thread's bounce buffer (contents
/// unspecified), releasing what it grew beyond [`RETAINED_BOUNCE`] afterwards.
fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|cell| {
        let Ok(mut v) = cell.try_borrow_mut() else {
            // Not reached (no transfer calls another), but never panic over it.
            let mut own = vec![0u8; len + MAX_ALIGN];
            let skip = own.as_ptr().align_offset(MAX_ALIGN);
            return f(&mut own[skip..skip + len]);
        };
        if v.len() < len + MAX_ALIGN {
            v.resize(len + MAX_ALIGN, 0);
        }
        let skip = v.as_ptr().align_offset(MAX_ALIGN);
        let out = f(&mut v[skip..skip + len]);
        if v.capacity() > RETAINED_BOUNCE + MAX_ALIGN {
            v.truncate(RETAINED_BOUNCE + MAX_ALIGN);
            v.shrink_to(RETAINED_BOUNCE + MAX_ALIGN);
        }
        out
    })
}

/// A tier data file opened for direct I/O (see the module's documentation).
#[derive(Debug)]
pub struct DirectTierFile {
    /// The file as the store opened it (page cache): the tier header, size, hole punching.
    buffered: File,
    /// The same file opened again with `O_DIRECT`: the extents' data.
    direct: File,
    /// What offsets, lengths and buffer addresses of direct transfers must be multiples of.
    align: usize,
    /// The end of the extents (a multiple of [`MAX_ALIGN`]): bytes from here on (the tier
    /// header) go through `buffered`.
    data_end: u64,
}

/// What `statx` (`STATX_DIOALIGN`) says of direct I/O on the open file `fd`: `Some((memory
/// alignment, offset alignment))` (0 for either: the file system cannot do direct I/O on this
/// file), `None` when the kernel or file system does not say. The store's tier files and the
/// raw layout's images (`dovetail_layout::engine::dio_alignment`) both read it here.
pub fn dio_limits(fd: libc::c_int) -> Option<(u32, u32)> {
    // SAFETY: `stx` is plain data statx fills; the path is an empty C string with
    // AT_EMPTY_PATH, so statx looks at `fd` alone and writes only into `stx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// The direct-I/O alignment of `fd` (`statx` `STATX_DIOALIGN`): the larger of the memory and
/// offset alignments, at least 512; [`MAX_ALIGN`] when the kernel does not say.
fn dio_align(fd: libc::c_int) -> io::Result<usize> {
    let Some((mem, offset)) = dio_limits(fd) else {
        return Ok(MAX_ALIGN);
    };
    if mem == 0 || offset == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the file system does not support direct I/O (O_DIRECT) on this file",
        ));
    }
    let align = (mem.max(offset) as usize).max(512);
    if align > MAX_ALIGN || !align.is_power_of_two() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "direct I/O on this file needs {align}-byte alignment, more than a store's \
                 4096-byte blocks"
            ),
        ));
    }
    Ok(align)
}

impl DirectTierFile {
    /// Opens `file` (a tier data file, read-write unless `read_only`) a second time with
    /// `O_DIRECT` (through `/proc/self/fd`, so it is the same file whatever its path names
    /// now); `data_end` is where its extents end.
    pub fn new(file: File, data_end: u64, read_only: bool) -> io::Result<DirectTierFile> {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let direct = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening it with O_DIRECT: {e}")))?;
        let (a, b) = (file.metadata()?, direct.metadata()?);
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(io::Error::other(
                "reopening it with O_DIRECT through /proc/self/fd gave another file",
            ));
        }
        let align = dio_align(direct.as_raw_fd())?;
        let data_end = data_end - data_end % MAX_ALIGN as u64;
        let f = DirectTierFile {
            buffered: file,
            direct,
            align,
            data_end,
        };
        // One read proves the file system takes O_DIRECT here (some accept the flag at open
        // and fail every transfer).
        if f.data_end > 0 {
            with_bounce(f.align, |b| f.direct.read_exact_at(b, 0))
                .map_err(|e| io::Error::new(e.kind(), format!("a direct-I/O read failed: {e}")))?;
        }
        Ok(f)
    }

    /// The alignment direct transfers need (offsets, lengths, buffer addresses).
    pub fn align(&self) -> usize {
        self.align
    }

    /// Whether `[offset, offset + len)` lies in the extents (else it goes through the page
    /// cache: the tier header).
    fn in_data(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.data_end)
    }

    fn is_aligned(&self, x: u64) -> bool {
        x % self.align as u64 == 0
    }

    /// The aligned range around `[offset, offset + len)` (inside the extents, since their end
    /// is aligned): its start and length.
    fn widen(&self, offset: u64, len: usize) -> (u64, usize) {
        let a = self.align as u64;
        let lo = offset - offset % a;
        let hi = (offset + len as u64).div_ceil(a) * a;
        (lo, (hi - lo) as usize)
    }

    /// A direct write of `buf` at `offset`; the caller checked that it is in the extents.
    fn write_data(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let len = buf.len();
        if self.is_aligned(offset) && self.is_aligned(len as u64) {
            if self.is_aligned(buf.as_ptr() as u64) {
                return self.direct.write_all_at(buf, offset);
            }
            return with_bounce(len, |b| {
                b.copy_from_slice(buf);
                self.direct.write_all_at(b, offset)
            });
        }
        // Part of an aligned unit: read it, patch it, write it back.
        let (lo, n) = self.widen(offset, len);
        with_bounce(n, |b| {
            self.direct.read_exact_at(b, lo)?;
            let at = (offset - lo) as usize;
            b[at..at + len].copy_from_slice(buf);
            self.direct.write_all_at(b, lo)
        })
    }
}

impl StoreFile for DirectTierFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        if len == 0 {
            return Ok(());
        }
        if !self.in_data(offset, len) {
            return self.buffered.read_exact_at(buf, offset);
        }
        if self.is_aligned(offset)
            && self.is_aligned(len as u64)
            && self.is_aligned(buf.as_ptr() as u64)
        {
            return self.direct.read_exact_at(buf, offset);
        }
        let (lo, n) = self.widen(offset, len);
        with_bounce(n, |b| {
            self.direct.read_exact_at(b, lo)?;
            let at = (offset - lo) as usize;
            buf.copy_from_slice(&b[at..at + len]);
            Ok(())
        })
    }

    unsafe fn read_raw(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len = iov_len(iov);
        if len == 0 {
            return Ok(());
        }
        if !self.in_data(offset, len) {
            // SAFETY: the caller's promise on `iov` is passed on unchanged.
            return unsafe { self.buffered.read_raw(offset, iov) };
        }
        if self.is_aligned(offset)
            && iov
                .iter()
                .all(|v| self.is_aligned(v.iov_base as u64) && self.is_aligned(v.iov_len as u64))
        {
            // SAFETY: as above.
            return unsafe { self.direct.read_raw(offset, iov) };
        }
        let (lo, n) = self.widen(offset, len);
        with_bounce(n, |b| {
            self.direct.read_exact_at(b, lo)?;
            let at = (offset - lo) as usize;
            // SAFETY: the caller promises the iovecs valid for writes; they are guest memory
            // or the caller's, never this thread's bounce buffer.
            unsafe { copy_to_iovecs(&b[at..at + len], iov) };
            Ok(())
        })
    }

    fn direct_target(&self, offset: u64, len: usize) -> Option<(std::os::unix::io::RawFd, usize)> {
        (len > 0
            && self.in_data(offset, len)
            && self.is_aligned(offset)
            && self.is_aligned(len as u64))
        .then(|| (self.direct.as_raw_fd(), self.align))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if !self.in_data(offset, buf.len()) {
            return self.buffered.write_all_at(buf, offset);
        }
        self.write_data(offset, buf)
    }

    fn sync(&self) -> io::Result<()> {
        // One inode: this flushes what the plain descriptor wrote too (the tier header).
        self.direct.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        StoreFile::size(&self.buffered)
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        StoreFile::set_size(&self.buffered, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match crate::file::punch_hole(&self.buffered, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if crate::file::punch_unsupported(&e) => {
                // Zeros written like any data (direct I/O in the extents).
                const CHUNK: u64 = 1 << 20;
                let zeros = vec![0u8; CHUNK.min(len) as usize];
                let end = offset + len;
                let mut at = offset;
                while at < end {
                    let n = (end - at).min(CHUNK) as usize;
                    self.write_at(at, &zeros[..n])?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The transfers a [`DirectTierFile`] makes, over any [`StoreFile`]: in the extents (below
/// `data_end`), a read or write whose offset or length is not a multiple of `align` becomes
/// the aligned read (and, for a write, the patched aligned write) around it; everything else
/// passes through as it is. The power-loss suite runs the store over recording files wrapped
/// in this (`DOVETAIL_TEST_CACHE=none`), so its crash states are the ones direct I/O's
/// read-modify-writes can leave (memory alignment, the other half of what `DirectTierFile`
/// does, is invisible to the device).
#[derive(Debug)]
pub struct Widened<F> {
    inner: F,
    align: u64,
    data_end: u64,
}

impl<F: StoreFile> Widened<F> {
    /// `align` must be a power of two of at most [`MAX_ALIGN`].
    pub fn new(inner: F, align: usize, data_end: u64) -> Widened<F> {
        assert!(align.is_power_of_two() && align <= MAX_ALIGN);
        Widened {
            inner,
            align: align as u64,
            data_end: data_end - data_end % MAX_ALIGN as u64,
        }
    }

    /// The aligned range around `[offset, offset + len)` if the transfer is in the extents and
    /// not aligned already.
    fn widen(&self, offset: u64, len: usize) -> Option<(u64, usize)> {
        let end = offset.checked_add(len as u64)?;
        if end > self.data_end || (offset % self.align == 0 && len as u64 % self.align == 0) {
            return None;
        }
        let lo = offset - offset % self.align;
        let hi = end.div_ceil(self.align) * self.align;
        Some((lo, (hi - lo) as usize))
    }
}

impl<F: StoreFile> StoreFile for Widened<F> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some((lo, n)) = self.widen(offset, buf.len()) else {
            return self.inner.read_at(offset, buf);
        };
        let mut b = vec![0u8; n];
        self.inner.read_at(lo, &mut b)?;
        let at = (offset - lo) as usize;
        buf.copy_from_slice(&b[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let Some((lo, n)) = self.widen(offset, buf.len()) else {
            return self.inner.write_at(offset, buf);
        };
        let mut b = vec![0u8; n];
        self.inner.read_at(lo, &mut b)?;
        let at = (offset - lo) as usize;
        b[at..at + buf.len()].copy_from_slice(buf);
        self.inner.write_at(lo, &b)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        self.inner.set_size(len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: u64) -> (tempfile::TempDir, DirectTierFile) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data.0");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        f.set_len(len + 4096).expect("size");
        let d = DirectTierFile::new(f, len, false).expect("direct");
        (dir, d)
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
            .collect()
    }

    /// Aligned, memory-misaligned, and sub-block transfers all land where a buffered file
    /// would put them, and neighbouring bytes stay as they were.
    #[test]
    fn every_shape_of_transfer_round_trips() {
        let (_dir, f) = file(1 << 20);
        assert!(f.align() >= 512 && f.align() <= MAX_ALIGN);
        let mut model = vec![0u8; 1 << 20];
        // (offset, length, skew of the source buffer in memory)
        let shapes: [(u64, usize, usize); 7] = [
            (0, 4096, 0),
            (8192, 16384, 0),
            (32768, 8192, 1),
            (65536 + 512, 512, 0),
            (131072 + 100, 3000, 3),
            (200_000, 10_000, 5),
            (4096 * 100 - 7, 14, 0),
        ];
        for (k, &(off, len, skew)) in shapes.iter().enumerate() {
            let data = pattern(k as u64, len);
            let mut src = vec![0u8; len + 8192];
            let base = src.as_ptr().align_offset(4096) + skew;
            src[base..base + len].copy_from_slice(&data);
            f.write_at(off, &src[base..base + len]).expect("write");
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        for (k, &(off, len, skew)) in shapes.iter().enumerate() {
            let mut dst = vec![0u8; len + 8192];
            let base = dst.as_ptr().align_offset(4096) + skew;
            f.read_at(off, &mut dst[base..base + len]).expect("read");
            assert!(dst[base..base + len] == pattern(k as u64, len), "shape {k}");
        }
        let mut all = vec![0u8; 1 << 20];
        f.read_at(0, &mut all).expect("read all");
        assert!(all == model, "the file differs from the model");
        // What a buffered reader sees is the same (nothing stale in the page cache).
        let mut plain = vec![0u8; 1 << 20];
        f.buffered
            .read_exact_at(&mut plain, 0)
            .expect("buffered read");
        assert!(plain == model);
    }

    /// `read_raw` into iovecs: aligned ones straight from the device, misaligned ones through
    /// the bounce buffer.
    #[test]
    fn read_raw_aligned_and_misaligned_iovecs() {
        let (_dir, f) = file(1 << 20);
        let data = pattern(9, 16384);
        f.write_at(4096, &data).expect("write");
        for skew in [0usize, 8] {
            let mut mem = vec![0u8; 16384 + 8192];
            let base = mem.as_ptr().align_offset(4096) + skew;
            let (a, b) = mem[base..base + 16384].split_at_mut(4096);
            let iov = [
                libc::iovec {
                    iov_base: a.as_mut_ptr().cast(),
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                },
            ];
            // SAFETY: both iovecs cover distinct parts of `mem`, which outlives the call.
            unsafe { f.read_raw(4096, &iov) }.expect("read_raw");
            assert!(mem[base..base + 16384] == data[..], "skew {skew}");
        }
    }

    /// The tier header past the extents goes through the page cache at any offset and length;
    /// zeroing a range reads back as zeros; a sync succeeds.
    #[test]
    fn header_area_zeroing_and_sync() {
        let (_dir, f) = file(64 << 10);
        f.write_at(64 << 10, &[7u8; 100]).expect("header write");
        let mut h = [0u8; 100];
        f.read_at(64 << 10, &mut h).expect("header read");
        assert_eq!(h, [7u8; 100]);
        f.write_at(0, &[5u8; 3 * 4096]).expect("write");
        f.zero_range(4096, 4096).expect("zero");
        let mut b = vec![1u8; 3 * 4096];
        f.read_at(0, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 5));
        assert!(b[4096..8192].iter().all(|&x| x == 0));
        assert!(b[8192..].iter().all(|&x| x == 5));
        f.sync().expect("sync");
        assert_eq!(f.size().expect("size"), (64 << 10) + 4096);
    }

    /// Writes through the direct descriptor leave no dirty page in the page cache: after the
    /// writes, the file has no pages cached at all (`mincore` over a mapping of it).
    #[test]
    fn direct_writes_leave_nothing_in_the_page_cache() {
        let (_dir, f) = file(1 << 20);
        for i in 0..64u64 {
            f.write_at(i * 4096, &pattern(i, 4096)).expect("write");
        }
        let len = 1usize << 20;
        // SAFETY: a fresh read-only shared mapping of the file's first MiB, unmapped below;
        // mincore writes one byte per page into `vec`, which has that many.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.buffered.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut vec = vec![0u8; len / 4096];
            assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
            libc::munmap(p, len);
            let cached = vec.iter().filter(|&&b| b & 1 == 1).count();
            assert_eq!(
                cached, 0,
                "{cached} pages of the file are in the page cache"
            );
        }
    }

    /// `Widened` over an in-memory file turns a partial-block write into a read and a whole
    /// aligned write, leaving the neighbouring bytes as they were; aligned ones pass through.
    #[test]
    fn widened_transfers_read_modify_write_partial_blocks() {
        let inner = crate::logwrites::MemFile::new();
        inner.set_size(3 * 4096 + 100).expect("size");
        let w = Widened::new(inner.clone(), 4096, 3 * 4096);
        w.write_at(0, &[1u8; 3 * 4096]).expect("aligned write");
        w.write_at(4096 + 512, &[2u8; 1000]).expect("partial write");
        w.write_at(3 * 4096 + 10, &[3u8; 10])
            .expect("header write, as it is");
        let mut all = vec![0u8; 3 * 4096 + 100];
        inner.read_at(0, &mut all).expect("read");
        assert!(all[..4096 + 512].iter().all(|&b| b == 1));
        assert!(all[4096 + 512..4096 + 1512].iter().all(|&b| b == 2));
        assert!(all[4096 + 1512..3 * 4096].iter().all(|&b| b == 1));
        assert!(all[3 * 4096 + 10..3 * 4096 + 20].iter().all(|&b| b == 3));
        let mut part = [0u8; 7];
        w.read_at(4096 + 510, &mut part).expect("partial read");
        assert_eq!(part, [1, 1, 2, 2, 2, 2, 2]);
    }
}
