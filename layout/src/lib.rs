//! The `BlockLayout` seam: the one trait every on-disk layout, the Tee and the fault-injecting
//! wrapper implement, so any of them can be served, tested and benchmarked the same way.
//!
//! This crate is plain Rust: it knows nothing of virtio, vhost or guest memory. The backend turns
//! guest requests into calls on a `BlockLayout`; everything below that line is testable without a
//! VM.

pub mod engine;
mod error;
pub mod fault;
pub mod iobuf;
pub mod mem;
pub mod parallax;
pub mod raw;
mod units;

pub use engine::{CacheMode, DirectFile, MapGuard, Mapped, MappedPiece};
pub use error::{error_chain, panic_message, Error, Result};
pub use iobuf::{IoBuf, IoBufs};
pub use mem::MemLayout;
pub use parallax::snapshots::SnapshotCommit;
pub use parallax::{Parallax, ParallaxOptions, ParallaxSnapshot, SnapshotInfo};
pub use raw::RawLayout;
pub use units::{check_range, Sector, Sectors, SECTOR_SHIFT, SECTOR_SIZE};

/// A virtual disk: a fixed number of 512-byte sectors that can be read, written, flushed,
/// discarded and zeroed.
///
/// Methods take `&self` so that every queue worker (and later the copy-out thread) can share one
/// `Arc<dyn BlockLayout>`; implementations do their own fine-grained synchronisation.
///
/// Contract, for every implementation:
/// - buffers are a whole number of sectors, and `[at, at + len)` must lie within
///   [`capacity`](BlockLayout::capacity); anything else is an error and touches nothing;
/// - a `write` that returned `Ok` is visible to every later `read`;
/// - a `write` that returned `Ok` before a `flush` that returned `Ok` survives a crash or power
///   loss (the virtio durability rule);
/// - after `discard` the contents of the range are unspecified until written;
/// - after `write_zeroes` the range reads back as zeroes; with `unmap` the layout may free the
///   space behind it.
pub trait BlockLayout: Send + Sync + std::fmt::Debug {
    /// The size of the disk.
    fn capacity(&self) -> Sectors;
    /// Fills `buf` with the contents of the disk starting at `at`.
    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()>;
    /// Writes `buf` to the disk starting at `at`.
    fn write(&self, at: Sector, buf: &[u8]) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Tells the layout that `[at, at + len)` is no longer needed.
    fn discard(&self, at: Sector, len: Sectors) -> Result<()>;
    /// Makes `[at, at + len)` read back as zeroes, freeing its space if `unmap` is set and the
    /// layout can.
    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> Result<()>;

    /// A read that is not the guest's (validation, migration, read-back checks): the same bytes
    /// as [`read`](BlockLayout::read), but a layout that keeps per-block access statistics
    /// (parallax-v2) leaves them alone, and wrappers forward it as such.
    fn read_quiet(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        self.read(at, buf)
    }

    /// Reads `bufs.len()` bytes from `at` into a scatter list of guest buffers. The default reads
    /// into `scratch` (a reusable buffer owned by the caller) and copies; a layout backed by a
    /// file overrides it to read straight into the buffers.
    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> Result<()> {
        let buf = iobuf::scratch(scratch, bufs.len());
        self.read(at, buf)?;
        bufs.copy_from(buf);
        Ok(())
    }

    /// Writes `bufs.len()` bytes from a scatter list of guest buffers to `at`. The default first
    /// copies them into `scratch`, so the layout sees one snapshot even if the guest changes the
    /// buffers meanwhile; a layout that only hands the data to the kernel may write straight
    /// from the buffers.
    fn write_from(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> Result<()> {
        let buf = iobuf::scratch(scratch, bufs.len());
        bufs.copy_to(buf);
        self.write(at, buf)
    }

    /// The plain file holding this layout's data byte for byte (the disk's sector `s` at byte
    /// `s * 512`), for a queue worker to submit reads and writes to directly through an
    /// [`engine::Uring`]; `None` (the default) for layouts that must see every request. The
    /// descriptor is valid while `self` is borrowed. Wrappers that only observe forward it.
    fn direct_file(&self) -> Option<DirectFile> {
        None
    }

    /// Told of each read (`write` false) or write that a queue worker carried out on
    /// [`direct_file`](BlockLayout::direct_file) itself, with its bytes, outcome and duration,
    /// so a wrapper that forwards `direct_file` can still count it (the backend's `Metered`).
    fn direct_completed(&self, write: bool, bytes: u64, ok: bool, took: std::time::Duration) {
        let _ = (write, bytes, ok, took);
    }

    /// Whether [`map_direct`](BlockLayout::map_direct) may map requests now (a queue worker
    /// then sets up an [`engine::Uring`] beside its thread pool). May wait for a lock; asked
    /// once per pass, with no mapping held. `false` (the default).
    fn map_direct_supported(&self) -> bool {
        false
    }

    /// A read of `len` bytes at `at` mapped to pieces of files, for a queue worker to submit
    /// itself (io_uring) instead of calling [`read_into`](BlockLayout::read_into): fills
    /// `pieces` (in request order, covering the request) and returns the guard that keeps them
    /// valid until the worker's reads of them completed. `None` (the default) when this
    /// request cannot be mapped now (a hole the layout must see, data to verify or decompress,
    /// a lock that is taken, a range out of bounds...): the worker then calls `read_into` on
    /// its pool, which reports any error.
    ///
    /// Never waits for a lock another request may hold: the caller holds the guards of the
    /// reads it has in flight, which only it can release (try-locks only; `None` if taken).
    fn map_direct<'a>(
        &'a self,
        at: Sector,
        len: usize,
        pieces: &mut Vec<engine::MappedPiece>,
    ) -> Option<engine::Mapped<'a>> {
        let _ = (at, len, pieces);
        None
    }

    /// A write of the guest buffers `bufs` at `at` mapped to pieces of files, for a queue
    /// worker to submit itself (io_uring) instead of calling
    /// [`write_from`](BlockLayout::write_from): the layout makes its metadata change (the
    /// allocation, the tree's new pointers) now, fills `pieces` (in request order, covering
    /// the request; a piece without a file needs no I/O) and returns the guard that keeps the
    /// change unseen (no read of those blocks, no commit capturing them) until the worker's
    /// writes of the pieces completed and it told the guard how they went
    /// ([`MapGuard::completed`]). Only then is the write visible, so a read never sees a
    /// pointer whose data is not written, and a FLUSH (which waits for the writes completed
    /// before it) covers it.
    ///
    /// `None` (the default) when this request cannot be mapped now (partial blocks, a lock
    /// that is taken...): nothing changed, and the worker calls `write_from` on its pool.
    /// `Some(Err)`: the layout carried the write out itself (its files could not take direct
    /// writes after all) and it failed. Never waits for a lock another request may hold, like
    /// [`map_direct`](BlockLayout::map_direct).
    fn map_direct_write<'a>(
        &'a self,
        at: Sector,
        bufs: IoBufs<'_>,
        pieces: &mut Vec<engine::MappedPiece>,
    ) -> Option<Result<engine::Mapped<'a>>> {
        let _ = (at, bufs, pieces);
        None
    }

    /// Runs `f` with the layout that serves requests now, kept from changing until `f`
    /// returns: `Some(current)` from a layout that can be swapped under its users
    /// (`migrate::Switch`, which holds its swap lock for `f`'s duration, so direct submissions
    /// to the current layout's [`direct_file`](BlockLayout::direct_file) never outlive it);
    /// `None` (the default) means `self` is the layout and never changes. Inside `f`, only the
    /// layout handed in (or `self` for `None`) may be called: the outer one may wait for a
    /// swap that waits for `f`.
    fn run_pinned(&self, f: &mut dyn FnMut(Option<&dyn BlockLayout>)) {
        f(None)
    }

    /// Grows the disk to `capacity` sectors, at once and durably (an error, changing nothing,
    /// for a smaller capacity). The default refuses: only layouts that can grow in place
    /// (raw) and wrappers that forward it implement it; a parallax disk grows as it is
    /// reopened (`Parallax::open_grown`).
    fn grow(&self, capacity: Sectors) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "this layout cannot grow in place (to {capacity})"
        )))
    }

    /// Whether a swap is waiting for the holders of [`run_pinned`](BlockLayout::run_pinned)
    /// to return (`migrate::Switch` during a pause), so a queue worker ends its pass at once
    /// instead of at its bound. Never waits, so it may be called inside `run_pinned`'s `f`
    /// on the outer layout. `false` (the default) for layouts that never change.
    fn pause_wanted(&self) -> bool {
        false
    }
}

/// Checks that a buffer is a whole number of sectors and returns that number.
pub fn buffer_sectors(buf_len: usize) -> Result<Sectors> {
    Sectors::from_bytes_exact(buf_len as u64).ok_or(Error::Unaligned(buf_len))
}
