//! The `raw` layout: the disk is a plain image file, byte for byte. This is the trusted
//! baseline every other layout is compared against.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{debug, error, info};

use crate::engine::{dio_alignment, AlignedBuf, CacheMode, DirectFile};
use crate::{
    buffer_sectors, check_range, BlockLayout, Error, IoBuf, IoBufs, Result, Sector, Sectors,
    SECTOR_SIZE,
};

/// How to open a raw image.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawOptions {
    /// Create the image at this many bytes if it does not exist. Without it a missing image is an
    /// error.
    pub create_size: Option<u64>,
    /// Open the image read-only; every write-like call fails with [`Error::ReadOnly`].
    pub read_only: bool,
    /// Page cache or direct I/O; `None`: direct I/O (`none`) for a block device, the page
    /// cache (`writeback`) for a file.
    pub cache: Option<CacheMode>,
}

/// A disk stored as a plain file (or block device) of `capacity * 512` bytes.
#[derive(Debug)]
pub struct RawLayout {
    file: File,
    path: PathBuf,
    /// Sectors served: the file's size when opened, raised by [`RawLayout::grow_image`].
    capacity: std::sync::atomic::AtomicU64,
    read_only: bool,
    /// The cache mode the image was opened with.
    cache: CacheMode,
    /// What buffers must be aligned to in memory (1 with the page cache; the file system's
    /// direct-I/O alignment with `O_DIRECT`).
    mem_align: usize,
    /// An `fdatasync` of the image failed. The writes it was to make durable may be lost for
    /// good (Linux may drop the dirty pages of a failed writeback and reports the error once,
    /// so a later `fdatasync` succeeds without them): every later flush fails, until the image
    /// is opened again.
    sync_failed: AtomicBool,
}

/// The largest file size Linux can express (`off_t` is signed).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// Creates the image `path` at `size` bytes, or nothing: the file is made under a temporary
/// name in the same directory, sized and synced there, and only then linked to `path` (never
/// replacing a file that appeared meanwhile), so a size the file system refuses (or any other
/// failure) leaves no file behind, and a later open never finds a half-made, 0-byte image.
fn create_image(path: &Path, size: u64) -> Result<File> {
    let shown = path.display();
    if size < SECTOR_SIZE || size % SECTOR_SIZE != 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot create image {shown} at {size} bytes: the size must be a positive whole \
             number of 512-byte sectors"
        )));
    }
    if size > MAX_FILE_SIZE {
        return Err(Error::InvalidArgument(format!(
            "cannot create image {shown} at {size} bytes: a file is at most {MAX_FILE_SIZE} \
             bytes"
        )));
    }
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "cannot create image {shown}: the path names no file"
        ))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".creating-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let io = |op: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| Error::Io { op, path, source }
    };
    use std::os::unix::fs::OpenOptionsExt;
    // Readable by the daemon's user only: it will hold a guest's data.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let made = (|| -> Result<()> {
        file.set_len(size).map_err(|e| {
            if e.raw_os_error() == Some(libc::EFBIG) || e.kind() == std::io::ErrorKind::InvalidInput
            {
                Error::InvalidArgument(format!(
                    "cannot create image {shown} at {size} bytes: the file system of {} does \
                     not allow a file that large ({e})",
                    dir.display()
                ))
            } else {
                Error::Io {
                    op: "resize",
                    path: tmp.display().to_string(),
                    source: e,
                }
            }
        })?;
        file.sync_all().map_err(io("sync", &tmp))?;
        // A hard link never replaces an existing file.
        std::fs::hard_link(&tmp, path).map_err(io("create", path))?;
        Ok(())
    })();
    // The temporary name goes whatever happened (after a link, the image keeps the file).
    let removed = std::fs::remove_file(&tmp);
    made?;
    removed.map_err(io("remove", &tmp))?;
    if let Ok(d) = File::open(dir) {
        d.sync_all().map_err(io("sync", dir))?;
    }
    info!("created image {} ({} bytes)", path.display(), size);
    Ok(file)
}

/// A block of zeroes used when the filesystem cannot zero a range for us.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

impl RawLayout {
    /// Opens (or creates, see [`RawOptions::create_size`]) the image at `path`.
    ///
    /// The disk's capacity is the file's size rounded down to whole sectors; trailing bytes are
    /// left untouched.
    pub fn open(path: &Path, opts: RawOptions) -> Result<RawLayout> {
        let io = |op: &'static str| {
            let path = path.display().to_string();
            move |source| Error::Io { op, path, source }
        };
        let exists = path.exists();
        let file = match (exists, opts.create_size) {
            (true, _) => OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(path)
                .map_err(io("open"))?,
            (false, Some(size)) => create_image(path, size)?,
            (false, None) => {
                return Err(Error::Io {
                    op: "open",
                    path: path.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "image does not exist and no size was given to create it",
                    ),
                })
            }
        };
        let len = device_or_file_len(&file).map_err(io("stat"))?;
        if len < SECTOR_SIZE {
            return Err(Error::InvalidArgument(format!(
                "image {} is {len} bytes: a disk of no sectors cannot be served (give it a \
                 size, e.g. truncate -s 1G, or remove it so that a size creates it)",
                path.display()
            )));
        }
        if len % SECTOR_SIZE != 0 {
            log::warn!(
                "image {} is {} bytes, not a whole number of sectors; the last {} bytes are not served",
                path.display(),
                len,
                len % SECTOR_SIZE
            );
        }
        let block_device = file
            .metadata()
            .map(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_block_device()
            })
            .unwrap_or(false);
        let cache = opts.cache.unwrap_or(if block_device {
            CacheMode::None
        } else {
            CacheMode::Writeback
        });
        let mem_align = if cache.direct() {
            set_direct(&file).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot open image {} for direct I/O (--cache none): {e}; its file system \
                     may not support O_DIRECT: use --cache writeback",
                    path.display()
                ))
            })?
        } else {
            1
        };
        Ok(RawLayout {
            file,
            path: path.to_path_buf(),
            capacity: std::sync::atomic::AtomicU64::new(Sectors::from_bytes_floor(len).0),
            read_only: opts.read_only,
            cache,
            mem_align,
            sync_failed: AtomicBool::new(false),
        })
    }

    /// Grows the disk to `capacity` sectors: the image file is extended (the new range reads
    /// as zeroes, a hole where the file system has them) and its new size made durable
    /// (`fsync`) before the layout serves it. A capacity below the current one is refused,
    /// as are block devices (their size is the device's), read-only images and sizes the
    /// file system cannot hold (its message says why); on error nothing changed.
    pub fn grow_image(&self, capacity: Sectors) -> Result<()> {
        self.check_writable()?;
        let now = self.capacity();
        if capacity < now {
            return Err(Error::InvalidArgument(format!(
                "image {} is {now}; shrinking it to {capacity} is not supported",
                self.path.display()
            )));
        }
        let bytes = capacity
            .bytes()
            .filter(|&b| b <= MAX_FILE_SIZE)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{capacity} is more than an image file can hold ({MAX_FILE_SIZE} bytes)"
                ))
            })?;
        let io = |op: &'static str| {
            let path = self.path.display().to_string();
            move |source| Error::Io { op, path, source }
        };
        let meta = self.file.metadata().map_err(io("stat"))?;
        {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_block_device() {
                return Err(Error::InvalidArgument(format!(
                    "{} is a block device: its size is the device's (grow the device, then                      serve it again)",
                    self.path.display()
                )));
            }
        }
        // Extend only: a file longer than the capacity (trailing bytes not a whole sector)
        // keeps its bytes.
        if meta.len() < bytes {
            self.file.set_len(bytes).map_err(io("extend"))?;
            self.file.sync_all().map_err(io("fsync"))?;
        }
        self.capacity.fetch_max(capacity.0, Ordering::AcqRel);
        log::info!(
            "image {}: grown from {now} to {capacity}",
            self.path.display()
        );
        Ok(())
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cache mode the image was opened with.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// Whether `bufs` can go to the file as they are (always, with the page cache).
    fn aligned(&self, bufs: &[IoBuf]) -> bool {
        DirectFile {
            fd: self.file.as_raw_fd(),
            mem_align: self.mem_align,
        }
        .aligned(bufs)
    }

    /// A read or write through an aligned bounce buffer (direct I/O of a misaligned buffer).
    fn bounced(&self, bufs: IoBufs<'_>, offset: u64, write: bool) -> std::io::Result<()> {
        let mut bounce = AlignedBuf::new(bufs.len());
        if write {
            bufs.copy_to(bounce.as_mut_slice());
        }
        let one = [bounce.iobuf()];
        // SAFETY: `one` names `bounce`, owned here and alive for the call.
        self.transfer(unsafe { IoBufs::new(&one) }, offset, write)?;
        if !write {
            bufs.copy_from(bounce.as_slice());
        }
        Ok(())
    }

    /// `transfer`, through a bounce buffer when direct I/O cannot take `bufs` as they are.
    fn transfer_any(&self, bufs: IoBufs<'_>, offset: u64, write: bool) -> std::io::Result<()> {
        if self.aligned(bufs.as_slice()) {
            self.transfer(bufs, offset, write)
        } else {
            self.bounced(bufs, offset, write)
        }
    }

    /// A Rust slice as a one-entry scatter list, for `transfer_any`.
    fn slice_buf(buf: &[u8]) -> [IoBuf; 1] {
        [IoBuf {
            ptr: buf.as_ptr().cast_mut(),
            len: buf.len(),
        }]
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            op,
            path: self.path.display().to_string(),
            source,
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Byte range of a checked request.
    fn byte_range(&self, at: Sector, len: Sectors) -> Result<(u64, u64)> {
        check_range(at, len, self.capacity())?;
        // check_range guarantees at+len <= capacity, and capacity*512 fits (it came from a u64
        // byte length), so neither multiplication can overflow.
        Ok((at.0 * SECTOR_SIZE, len.0 * SECTOR_SIZE))
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file and
        // open for the whole call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, mut len: u64) -> Result<()> {
        if self.cache.direct() {
            let zeroes = AlignedBuf::new(ZEROES.len());
            while len > 0 {
                let n = len.min(ZEROES.len() as u64) as usize;
                let one = Self::slice_buf(&zeroes.as_slice()[..n]);
                // SAFETY: `one` names `zeroes`, alive for the call; a write only reads it.
                self.transfer(unsafe { IoBufs::new(&one) }, offset, true)
                    .map_err(self.io_err("write zeroes to"))?;
                offset += n as u64;
                len -= n as u64;
            }
            return Ok(());
        }
        while len > 0 {
            let n = len.min(ZEROES.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROES[..n], offset)
                .map_err(self.io_err("write zeroes to"))?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }
}

impl RawLayout {
    /// `preadv`/`pwritev` between the file at `offset` and the scatter list, until every byte
    /// has moved. Up to `BATCH` buffers go to the kernel per call.
    fn transfer(&self, bufs: IoBufs<'_>, mut offset: u64, write: bool) -> std::io::Result<()> {
        const BATCH: usize = 64;
        let list = bufs.as_slice();
        // Progress: buffer `idx`, `skip` bytes into it.
        let (mut idx, mut skip) = (0usize, 0usize);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        loop {
            while idx < list.len() && list[idx].len == skip {
                idx += 1;
                skip = 0;
            }
            if idx == list.len() {
                return Ok(());
            }
            let mut iov = [empty; BATCH];
            let mut n = 0;
            for (k, b) in list[idx..].iter().take(BATCH).enumerate() {
                let s = if k == 0 { skip } else { 0 };
                iov[k] = libc::iovec {
                    iov_base: b.ptr.wrapping_add(s).cast(),
                    iov_len: b.len - s,
                };
                n = k + 1;
            }
            let off = libc::off_t::try_from(offset)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            let fd = self.file.as_raw_fd();
            // SAFETY: the first `n` iovecs point into buffers that `IoBufs` guarantees valid for
            // reads and writes for the duration of this call; the kernel checks the rest.
            let rc = unsafe {
                if write {
                    libc::pwritev(fd, iov.as_ptr(), n as libc::c_int, off)
                } else {
                    libc::preadv(fd, iov.as_ptr(), n as libc::c_int, off)
                }
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Err(std::io::Error::new(
                    if write {
                        std::io::ErrorKind::WriteZero
                    } else {
                        std::io::ErrorKind::UnexpectedEof
                    },
                    "the image ended early",
                ));
            }
            let mut done = rc as usize;
            offset += done as u64;
            while done > 0 {
                let rest = list[idx].len - skip;
                if done >= rest {
                    done -= rest;
                    idx += 1;
                    skip = 0;
                } else {
                    skip += done;
                    done = 0;
                }
            }
        }
    }
}

/// Turns on `O_DIRECT` for `file` and returns the memory alignment its buffers need.
fn set_direct(file: &File) -> std::io::Result<usize> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and set the open file's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    dio_alignment(fd)
}

fn device_or_file_len(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        Ok(meta.len())
    } else {
        // Block devices report 0 in metadata; seeking to the end gives their size.
        let mut f = file;
        f.seek(SeekFrom::End(0))
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

impl BlockLayout for RawLayout {
    fn capacity(&self) -> Sectors {
        Sectors(self.capacity.load(Ordering::Acquire))
    }

    fn grow(&self, capacity: Sectors) -> Result<()> {
        self.grow_image(capacity)
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        let (offset, _) = self.byte_range(at, buffer_sectors(buf.len())?)?;
        if self.cache.direct() {
            let one = Self::slice_buf(buf);
            // SAFETY: `one` names `buf`, borrowed mutably for the call.
            return self
                .transfer_any(unsafe { IoBufs::new(&one) }, offset, false)
                .map_err(self.io_err("read"));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.io_err("read"))
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        let (offset, _) = self.byte_range(at, buffer_sectors(buf.len())?)?;
        if self.cache.direct() {
            let one = Self::slice_buf(buf);
            // SAFETY: `one` names `buf`, borrowed for the call; a write only reads it.
            return self
                .transfer_any(unsafe { IoBufs::new(&one) }, offset, true)
                .map_err(self.io_err("write"));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(self.io_err("write"))
    }

    fn direct_file(&self) -> Option<DirectFile> {
        Some(DirectFile {
            fd: self.file.as_raw_fd(),
            mem_align: self.mem_align,
        })
    }

    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, _scratch: &mut Vec<u8>) -> Result<()> {
        let (offset, _) = self.byte_range(at, buffer_sectors(bufs.len())?)?;
        self.transfer_any(bufs, offset, false)
            .map_err(self.io_err("read"))
    }

    /// Straight from the guest's buffers to the file: the raw layout only hands the data to the
    /// kernel, so it needs no snapshot of its own.
    fn write_from(&self, at: Sector, bufs: IoBufs<'_>, _scratch: &mut Vec<u8>) -> Result<()> {
        self.check_writable()?;
        let (offset, _) = self.byte_range(at, buffer_sectors(bufs.len())?)?;
        self.transfer_any(bufs, offset, true)
            .map_err(self.io_err("write"))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(self.io_err("fdatasync")(std::io::Error::other(
                "an earlier fdatasync of the image failed: the writes it was to make durable \
                 may be lost, and no later one can make them durable; reopen the image",
            )));
        }
        self.file.sync_data().map_err(|e| {
            if !self.sync_failed.swap(true, Ordering::AcqRel) {
                error!(
                    "{}: fdatasync failed ({e}): writes since the last good one may be lost; \
                     every later flush fails until the image is reopened",
                    self.path.display()
                );
            }
            self.io_err("fdatasync")(e)
        })
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        self.check_writable()?;
        let (offset, bytes) = self.byte_range(at, len)?;
        if bytes == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            bytes,
        ) {
            Ok(()) => Ok(()),
            // Discard is a hint: a filesystem that cannot punch holes simply keeps the data.
            Err(e) if unsupported(&e) => {
                debug!(
                    "{}: punch hole unsupported, discard ignored",
                    self.path.display()
                );
                Ok(())
            }
            Err(e) => Err(self.io_err("punch hole in")(e)),
        }
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> Result<()> {
        self.check_writable()?;
        let (offset, bytes) = self.byte_range(at, len)?;
        if bytes == 0 {
            return Ok(());
        }
        let modes: &[libc::c_int] = if unmap {
            &[
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ]
        } else {
            &[libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE]
        };
        for &mode in modes {
            match self.fallocate(mode, offset, bytes) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => continue,
                Err(e) => return Err(self.io_err("zero range of")(e)),
            }
        }
        self.write_zero_bytes(offset, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoBuf;

    fn open_new(dir: &tempfile::TempDir, size: u64) -> RawLayout {
        RawLayout::open(
            &dir.path().join("disk.img"),
            RawOptions {
                create_size: Some(size),
                read_only: false,
                cache: None,
            },
        )
        .expect("create image")
    }

    fn open_cache(dir: &tempfile::TempDir, size: u64, cache: CacheMode) -> RawLayout {
        RawLayout::open(
            &dir.path().join("disk.img"),
            RawOptions {
                create_size: Some(size),
                read_only: false,
                cache: Some(cache),
            },
        )
        .expect("create image")
    }

    /// Direct I/O takes aligned and misaligned buffers alike (the latter through a bounce
    /// buffer), through every entry point, and the bytes reach the file.
    #[test]
    fn cache_none_round_trips_aligned_and_misaligned_buffers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_cache(&dir, 1 << 20, CacheMode::None);
        assert_eq!(disk.cache(), CacheMode::None);
        let align = disk.direct_file().expect("a plain file").mem_align;
        assert!(align >= 512, "direct I/O alignment {align}");
        // A Vec's data is rarely 4 KiB aligned; an offset of 512 into an aligned buffer is not.
        let mut store = AlignedBuf::new(8192 + 512);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        store.as_mut_slice()[512..].copy_from_slice(&data);
        let mis = [IoBuf {
            ptr: store.iobuf().ptr.wrapping_add(512),
            len: 8192,
        }];
        // SAFETY: `mis` lies inside `store`, alive until the end of the test.
        let bufs = unsafe { IoBufs::new(&mis) };
        assert!(!disk.aligned(&mis) || align == 512);
        disk.write_from(Sector(8), bufs, &mut Vec::new())
            .expect("misaligned write");
        disk.flush().expect("flush");
        let mut back = vec![0u8; 8192];
        disk.read(Sector(8), &mut back).expect("read into a Vec");
        assert!(back == data);
        store.as_mut_slice().fill(0);
        disk.read_into(Sector(8), bufs, &mut Vec::new())
            .expect("misaligned read");
        assert!(store.as_slice()[512..] == data[..]);
        // Zeroing without fallocate's help still works with O_DIRECT.
        disk.write_zero_bytes(8 * 512, 4096).expect("zero bytes");
        disk.read(Sector(8), &mut back).expect("read");
        assert!(back[..4096].iter().all(|&b| b == 0) && back[4096..] == data[4096..]);
        drop(disk);
        let on_disk = std::fs::read(dir.path().join("disk.img")).expect("read file");
        assert!(on_disk[8 * 512 + 4096..8 * 512 + 8192] == data[4096..]);
    }

    #[test]
    fn after_a_failed_fdatasync_no_flush_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_new(&dir, 1 << 20);
        disk.write(Sector(0), &[1; 512]).expect("write");
        disk.flush().expect("flush");
        // What a failed fdatasync leaves behind (a real one cannot be provoked here).
        disk.sync_failed.store(true, Ordering::Release);
        disk.write(Sector(0), &[2; 512]).expect("writes still work");
        let err = disk
            .flush()
            .expect_err("no flush may claim durability any more");
        assert!(crate::error_chain(&err).contains("may be lost"), "{err}");
        assert!(disk.flush().is_err(), "still failing");
        // Opened again, the image flushes as usual.
        drop(disk);
        let disk = open_new(&dir, 1 << 20);
        disk.flush().expect("a fresh open");
    }

    #[test]
    fn grows_in_place_and_refuses_shrinking_and_read_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_new(&dir, 1 << 20);
        let data = vec![0x5au8; 4096];
        disk.write(Sector(2048 - 8), &data)
            .expect("write the last block");
        assert!(disk.write(Sector(2048), &data).is_err(), "past the end");
        disk.grow(Sectors(4096)).expect("grow");
        assert_eq!(disk.capacity(), Sectors(4096));
        let path = dir.path().join("disk.img");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 2 << 20);
        let mut back = vec![0xffu8; 8192];
        disk.read(Sector(2048 - 8), &mut back)
            .expect("read across the old end");
        assert_eq!(&back[..4096], &data[..]);
        assert!(
            back[4096..].iter().all(|&b| b == 0),
            "the new range reads as zeroes"
        );
        disk.write(Sector(4096 - 8), &data)
            .expect("write the new last block");
        let err = disk.grow(Sectors(2048)).expect_err("shrink");
        assert!(err.to_string().contains("shrinking"), "{err}");
        assert_eq!(disk.capacity(), Sectors(4096));
        let err = disk.grow(Sectors(u64::MAX)).expect_err("too large");
        assert!(err.to_string().contains("more than an image file"), "{err}");
        drop(disk);
        let ro = RawLayout::open(
            &path,
            RawOptions {
                create_size: None,
                read_only: true,
                cache: None,
            },
        )
        .expect("open read-only");
        assert_eq!(ro.capacity(), Sectors(4096), "the grown size is the file's");
        assert!(matches!(ro.grow(Sectors(8192)), Err(Error::ReadOnly)));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 2 << 20);
    }

    #[test]
    fn creates_image_at_size_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_new(&dir, 1 << 20);
        assert_eq!(disk.capacity(), Sectors(2048));
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        disk.write(Sector(10), &data).expect("write");
        disk.flush().expect("flush");
        let mut back = vec![0u8; 4096];
        disk.read(Sector(10), &mut back).expect("read");
        assert_eq!(back, data);
        let on_disk = std::fs::read(dir.path().join("disk.img")).expect("read file");
        assert_eq!(on_disk.len(), 1 << 20);
        assert_eq!(&on_disk[5120..5120 + 4096], &data[..]);
    }

    #[test]
    fn missing_image_without_size_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = RawLayout::open(&dir.path().join("nope.img"), RawOptions::default())
            .expect_err("must fail");
        assert!(err.to_string().contains("nope.img"), "{err}");
        assert!(!dir.path().join("nope.img").exists());
    }

    /// The names in `dir`, sorted.
    fn names(dir: &tempfile::TempDir) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_size_no_file_can_have_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("i.img");
        let create = |size| {
            RawLayout::open(
                &path,
                RawOptions {
                    create_size: Some(size),
                    read_only: false,
                    cache: None,
                },
            )
        };
        // Past off_t: refused before anything is made.
        let err = create(1 << 63).expect_err("2^63 bytes");
        let msg = crate::error_chain(&err);
        assert!(
            msg.contains("9223372036854775808 bytes")
                && msg.contains("at most 9223372036854775807"),
            "{msg}"
        );
        // 8191 TiB fits off_t but no common file system (ext4: 16 TiB, xfs/btrfs: 8 EiB are
        // fine, so accept either outcome, but a failure leaves nothing behind).
        match create(8191 << 40) {
            Err(e) => {
                let msg = crate::error_chain(&e);
                assert!(msg.contains("does not allow a file that large"), "{msg}");
                assert!(names(&dir).is_empty(), "{:?}", names(&dir));
            }
            Ok(disk) => {
                assert_eq!(disk.capacity().0, (8191u64 << 40) / 512);
                drop(disk);
                std::fs::remove_file(&path).expect("remove");
            }
        }
        for bad in [0, 100, 1000] {
            let err = create(bad).expect_err("not whole sectors");
            assert!(err.to_string().contains("512-byte sectors"), "{err}");
        }
        assert!(names(&dir).is_empty(), "{:?}", names(&dir));
        // A good size leaves exactly the image.
        create(1 << 20).expect("1 MiB");
        assert_eq!(names(&dir), ["i.img"]);
    }

    #[test]
    fn an_image_of_no_sectors_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for len in [0u64, 511] {
            let path = dir.path().join("empty.img");
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(len))
                .expect("make image");
            let err = RawLayout::open(&path, RawOptions::default()).expect_err("no sectors");
            assert!(
                err.to_string()
                    .contains(&format!("empty.img is {len} bytes: a disk of no sectors")),
                "{err}"
            );
        }
    }

    #[test]
    fn rejects_out_of_range_and_unaligned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_new(&dir, 64 * 1024);
        let mut buf = vec![0u8; 512];
        assert!(matches!(
            disk.read(Sector(128), &mut buf),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write(Sector(u64::MAX), &buf),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read(Sector(0), &mut buf[..100]),
            Err(Error::Unaligned(100))
        ));
        assert!(matches!(
            disk.discard(Sector(100), Sectors(29)),
            Err(Error::OutOfRange { .. })
        ));
        // The last sector is fine.
        disk.write(Sector(127), &buf).expect("last sector");
    }

    #[test]
    fn write_zeroes_and_discard_read_back_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_new(&dir, 1 << 20);
        let ones = vec![0xffu8; 1 << 20];
        disk.write(Sector(0), &ones).expect("fill");
        disk.write_zeroes(Sector(8), Sectors(8), false)
            .expect("zero");
        disk.write_zeroes(Sector(64), Sectors(64), true)
            .expect("zero+unmap");
        disk.discard(Sector(512), Sectors(512)).expect("discard");
        let mut back = vec![0u8; 1 << 20];
        disk.read(Sector(0), &mut back).expect("read");
        assert!(back[..4096].iter().all(|&b| b == 0xff));
        assert!(back[4096..8192].iter().all(|&b| b == 0));
        assert!(back[8192..32768].iter().all(|&b| b == 0xff));
        assert!(back[32768..65536].iter().all(|&b| b == 0));
        // The raw layout discards by punching a hole, so the range reads back as zeroes.
        assert!(back[262144..524288].iter().all(|&b| b == 0));
        assert!(back[524288..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn scattered_reads_and_writes_go_straight_to_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = open_new(&dir, 1 << 20);
        // 132 buffers (more than one kernel batch), of uneven sizes, some empty.
        let sizes: Vec<usize> = (0..132)
            .map(|i| match i % 4 {
                0 => 0,
                1 => 100,
                2 => 924,
                _ => 1024,
            })
            .collect();
        let total: usize = sizes.iter().sum();
        assert_eq!(total % 512, 0);
        let data: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
        let mut src = data.clone();
        let mut list = Vec::new();
        let mut at = 0;
        for &n in &sizes {
            list.push(IoBuf {
                ptr: src[at..].as_mut_ptr(),
                len: n,
            });
            at += n;
        }
        // SAFETY: every buffer lies inside `src`, which outlives `bufs` and is not otherwise
        // touched while it is in use.
        let bufs = unsafe { IoBufs::new(&list) };
        let mut scratch = Vec::new();
        disk.write_from(Sector(3), bufs, &mut scratch)
            .expect("write_from");
        assert!(scratch.is_empty(), "the raw layout needs no bounce buffer");
        let file = std::fs::read(dir.path().join("disk.img")).expect("read file");
        assert_eq!(&file[1536..1536 + total], &data[..]);

        let mut dst = vec![0u8; total];
        let mut list = Vec::new();
        let mut at = 0;
        for &n in &sizes {
            list.push(IoBuf {
                ptr: dst[at..].as_mut_ptr(),
                len: n,
            });
            at += n;
        }
        // SAFETY: as above, for `dst`.
        let bufs = unsafe { IoBufs::new(&list) };
        disk.read_into(Sector(3), bufs, &mut scratch)
            .expect("read_into");
        assert_eq!(dst, data);

        // Past the end: refused before any I/O.
        // SAFETY: as above.
        let bufs = unsafe { IoBufs::new(&list) };
        assert!(matches!(
            disk.read_into(Sector(2047), bufs, &mut scratch),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn read_only_refuses_every_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open_new(&dir, 64 * 1024));
        let disk = RawLayout::open(
            &dir.path().join("disk.img"),
            RawOptions {
                create_size: None,
                read_only: true,
                cache: None,
            },
        )
        .expect("open ro");
        let buf = vec![1u8; 512];
        assert!(matches!(disk.write(Sector(0), &buf), Err(Error::ReadOnly)));
        assert!(matches!(
            disk.discard(Sector(0), Sectors(1)),
            Err(Error::ReadOnly)
        ));
        assert!(matches!(
            disk.write_zeroes(Sector(0), Sectors(1), true),
            Err(Error::ReadOnly)
        ));
        disk.flush().expect("flush of a read-only disk is a no-op");
        let on_disk = std::fs::read(dir.path().join("disk.img")).expect("read file");
        assert!(on_disk.iter().all(|&b| b == 0));
    }
}
