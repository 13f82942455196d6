//! The request paths: read, write, flush, discard and write zeroes ([`BlockLayout`] for
//! [`Parallax`]).

use super::format::make_ptr;
use super::sumpage::block_sum;
use super::*;
use crate::engine::{AlignedBuf, MapGuard, Mapped, MappedPiece};

/// The disk blocks `[first, end)` that `len` bytes at byte `start` touch.
fn block_span(start: u64, len: u64) -> (u64, u64) {
    let bs = BLOCK_SIZE as u64;
    (start / bs, start.saturating_add(len).div_ceil(bs))
}

/// What a read mapped for direct submission holds until its I/O completed, and what it
/// verifies then (parallax-v2).
struct ReadGuard<'a> {
    inner: &'a Inner,
    at: Sector,
    len: usize,
    /// parallax-v2: (tree block, its pointer, its byte in the request) of each whole guest
    /// block read, to verify against its checksum once read.
    checks: Vec<(u64, u64, usize)>,
    _stripes: stripes::Held<'a>,
    _state: RwLockReadGuard<'a, State>,
}

impl MapGuard for ReadGuard<'_> {
    /// Each block read is checked against its checksum, as `read_into` checks it; a block
    /// that fails is read again from its place, verified (an error if it fails again: never
    /// wrong data) and copied over what the guest got. Under the guard's locks, so the
    /// checksums are those of the blocks read.
    fn verify(&mut self, bufs: IoBufs<'_>) -> Result<()> {
        let Some((sums, _)) = &self.inner.sums else {
            return Ok(());
        };
        let mut block = [0u8; BLOCK_SIZE];
        let mut part = Vec::with_capacity(4);
        for &(b, ptr, at) in &self.checks {
            let want = sums.get(b);
            if want == 0 {
                continue;
            }
            part.clear();
            bufs.iovecs(at, BLOCK_SIZE, &mut part);
            let mut k = 0usize;
            for v in &part {
                // SAFETY: each iovec lies within `bufs`, valid for reads while it lives (the
                // contract of `IoBufs::new`), and they cover 4 KiB in all; the guest may write
                // them meanwhile, which the shared-memory copy tolerates.
                unsafe {
                    dovetail_store::shared::copy_from_shared(
                        v.iov_base as *const u8,
                        &mut block[k..k + v.iov_len],
                    )
                };
                k += v.iov_len;
            }
            if block_sum(&block) == want {
                continue;
            }
            self.inner.read_block_checked(ptr, b, want, &mut block)?;
            // SAFETY: as above; `block` is ours and 4 KiB, as long as `part`.
            unsafe { dovetail_store::file::copy_to_iovecs(&block, &part) };
        }
        Ok(())
    }

    fn completed(&mut self, ok: bool, _took: std::time::Duration) {
        if ok {
            self.inner.annotate_read(self.at, self.len);
        }
    }
}

/// What a write mapped for direct submission holds until its I/O completed: its blocks'
/// stripes exclusively (no read sees the new pointers before their data is written) and its
/// place among the data writes in flight (no commit captures the tree before it ended).
struct WriteGuard<'a> {
    inner: &'a Inner,
    at: Sector,
    len: u64,
    /// The runs written (their checksums are forgotten if the write fails).
    runs: Vec<Run>,
    /// The store's tier of each piece submitted (counted as started by the store).
    tiers: Vec<usize>,
    /// parallax-v2: the request's bytes copied out of guest memory, whose checksums were
    /// noted: what the worker writes ([`MapGuard::data`]).
    copy: Option<AlignedBuf>,
    /// Its epoch among the data writes in flight.
    epoch: u64,
    _stripes: stripes::Held<'a>,
}

impl MapGuard for WriteGuard<'_> {
    fn data(&self) -> Option<&[u8]> {
        self.copy.as_ref().map(AlignedBuf::as_slice)
    }

    fn completed(&mut self, ok: bool, _took: std::time::Duration) {
        if !ok {
            // Unknown bytes in the blocks: no checksum of data maybe never written.
            for r in &self.runs {
                self.inner.forget_sums(r.block, (r.len / BLOCK_SIZE) as u64);
            }
            return;
        }
        self.inner.annotate_write(self.at, self.len);
        dovetail_store::failpoint::hit("parallax-write");
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // The store counts the writes ended before any commit can capture (and sync) them,
        // then the commits may go on; the stripes are released last (a field, dropped after
        // this), so a read of the blocks finds their data.
        for &t in &self.tiers {
            self.inner.space.direct_write_done(t);
        }
        self.inner.inflight.end(self.epoch);
    }
}

impl Inner {
    /// The extents holding the copies of `extent`'s blocks (itself alone outside extent
    /// groups), for a write of them; `None` if compressed (written by the layout itself) or
    /// if the groups' lock is taken (the caller must not wait).
    fn write_copies_of(&self, extent: ExtentId) -> Option<Vec<ExtentId>> {
        if !self.tiered {
            return Some(vec![extent]);
        }
        let groups = match self.groups.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        match groups.members(extent) {
            None => Some(vec![extent]),
            Some(m) if m.kind.compressed => None,
            Some(m) => Some(m.all().to_vec()),
        }
    }

    /// Whether blocks of `extent` are stored once, uncompressed (so a read of them can be
    /// mapped to their place); `None` if the groups' lock is taken (the caller must not wait).
    fn single_copy(&self, extent: ExtentId) -> Option<bool> {
        if !self.tiered {
            return Some(true);
        }
        let groups = match self.groups.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(
            groups
                .members(extent)
                .is_none_or(|m| !m.kind.compressed && m.all().len() == 1),
        )
    }
}

impl BlockLayout for Parallax {
    fn capacity(&self) -> Sectors {
        self.inner.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let (first, end) = block_span(at.0 * SECTOR_SIZE, buf.len() as u64);
        let _stripes = self.inner.stripes.shared(first, end);
        let st = self.inner.read();
        self.inner
            .read_tree(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, buf)?;
        drop(st);
        self.inner.annotate_read(at, buf.len());
        Ok(())
    }

    fn read_quiet(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let (first, end) = block_span(at.0 * SECTOR_SIZE, buf.len() as u64);
        let _stripes = self.inner.stripes.shared(first, end);
        let st = self.inner.read();
        self.inner
            .read_tree(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, buf)
    }

    /// Straight from the store's data file into the guest's buffers (one `preadv` per run of
    /// blocks stored consecutively), with no copy of our own.
    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, _scratch: &mut Vec<u8>) -> Result<()> {
        check_range(at, buffer_sectors(bufs.len())?, self.inner.capacity)?;
        let len = bufs.len();
        let (first, end) = block_span(at.0 * SECTOR_SIZE, len as u64);
        let _stripes = self.inner.stripes.shared(first, end);
        let st = self.inner.read();
        self.inner
            .read_tree_into(&st, st.root, st.gen + 1, at.0 * SECTOR_SIZE, bufs)?;
        drop(st);
        self.inner.annotate_read(at, len);
        Ok(())
    }

    /// A store opened for direct I/O: the data blocks of a read, for the queue worker's
    /// io_uring (tree nodes are looked up in the cache only: a miss leaves the read to
    /// `read_into`; parallax-v2's checksums are verified when the read completed, its blocks
    /// kept in several copies or compressed are left to `read_into`).
    fn map_direct_supported(&self) -> bool {
        self.inner.space.direct_io() || self.inner.space.aio_reads()
    }

    /// The read's blocks under the same locks `read_into` holds across its data read: the
    /// blocks' stripes shared (no write to them is between its new pointer and its data) and
    /// the state lock shared (no commit frees a block the read still reads, so none is reused),
    /// both taken without waiting and kept in the guard until the worker's reads completed.
    fn map_direct<'a>(
        &'a self,
        at: Sector,
        len: usize,
        out: &mut Vec<MappedPiece>,
    ) -> Option<Mapped<'a>> {
        let inner = &*self.inner;
        // The store's files are asked per piece (`direct_target`); no extents list here.
        if len == 0 {
            return None;
        }
        check_range(at, buffer_sectors(len).ok()?, inner.capacity).ok()?;
        let start = at.0 * SECTOR_SIZE;
        let (first, end) = block_span(start, len as u64);
        let stripes = inner.stripes.try_shared(first, end)?;
        let st = match inner.state.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        out.clear();
        let mut align = 1usize;
        let mut checks = Vec::new();
        let mut emit = |r: &Run, out: &mut Vec<MappedPiece>| -> Option<()> {
            if inner.is_pool(r.ptr) {
                // A shared block is verified against its checksum: `read_into` reads it.
                return None;
            }
            let (extent, index) = split_ptr(r.ptr)?;
            if !inner.single_copy(extent)? {
                return None;
            }
            if inner.is_checked(r.block) {
                // Only whole blocks can be verified where they land.
                if r.off != 0 || r.len % BLOCK_SIZE != 0 {
                    return None;
                }
                for k in 0..r.len / BLOCK_SIZE {
                    checks.push((
                        r.block + k as u64,
                        make_ptr(extent, index + k as u32),
                        r.at + k * BLOCK_SIZE,
                    ));
                }
            }
            let offset = u64::from(index) * BLOCK_SIZE as u64 + r.off as u64;
            if let Some((fd, file_offset, a)) = inner.space.direct_target(extent, offset, r.len) {
                align = align.max(a);
                out.push(MappedPiece {
                    at: r.at,
                    len: r.len,
                    file: Some((fd, file_offset)),
                    aio: None,
                });
                return Some(());
            }
            // A store on RADOS: the worker starts the read itself (librados aio).
            let source = inner.space.aio_target(extent, offset, r.len)?;
            out.push(MappedPiece {
                at: r.at,
                len: r.len,
                file: None,
                aio: Some(source),
            });
            Some(())
        };
        let mut run: Option<Run> = None;
        for p in pieces(start, len) {
            let ptr = inner.resolve_cached(st.root, p.block)?;
            if let Some(r) = &mut run {
                if r.extends_to(&p, ptr) {
                    r.len += p.len;
                    continue;
                }
                emit(r, out)?;
                run = None;
            }
            if ptr == NULL {
                match out.last_mut() {
                    Some(last) if !last.transfers() && last.at + last.len == p.at => {
                        last.len += p.len
                    }
                    _ => out.push(MappedPiece {
                        at: p.at,
                        len: p.len,
                        file: None,
                        aio: None,
                    }),
                }
            } else {
                run = Some(Run {
                    ptr,
                    block: p.block,
                    off: p.off,
                    at: p.at,
                    len: p.len,
                });
            }
        }
        if let Some(r) = &run {
            emit(r, out)?;
        }
        // Each piece lies at an aligned place of the buffers too (a hole before a block, in a
        // read starting inside a block, could leave the block's piece misaligned in memory).
        if out.iter().any(|p| p.at % align != 0 || p.len % align != 0) {
            return None;
        }
        Some(Mapped {
            guard: Box::new(ReadGuard {
                inner,
                at,
                len,
                checks,
                _stripes: stripes,
                _state: st,
            }),
            mem_align: align,
        })
    }

    /// A store opened for direct I/O, a write of whole blocks: the tree change made now under
    /// the state lock (taken without waiting), as `write` makes it, and the data left to the
    /// worker's io_uring, under the blocks' stripes held exclusively until it completed (see
    /// [`WriteGuard`]): parallax-v1 straight from the guest's buffers, parallax-v2 from a copy
    /// of them whose checksums it noted (a guest changing its buffers meanwhile cannot make
    /// the checksum disagree with the bytes written), every copy of an extent group's block.
    fn map_direct_write<'a>(
        &'a self,
        at: Sector,
        bufs: IoBufs<'_>,
        out: &mut Vec<MappedPiece>,
    ) -> Option<Result<Mapped<'a>>> {
        let inner = &*self.inner;
        let len = bufs.len();
        // A store with single-instance blocks: the write goes the synchronous way, which
        // may make it a reference to a block the shared pool holds (`try_share`).
        if !inner.space.direct_io() || len == 0 || inner.pool.on {
            return None;
        }
        check_range(at, buffer_sectors(len).ok()?, inner.capacity).ok()?;
        let start = at.0 * SECTOR_SIZE;
        let bs = BLOCK_SIZE as u64;
        if start % bs != 0 || len as u64 % bs != 0 {
            return None;
        }
        let (first, end) = block_span(start, len as u64);
        let stripes = inner.stripes.try_exclusive(first, end)?;
        let copy = inner.sums.is_some().then(|| {
            let mut c = AlignedBuf::new(len);
            bufs.copy_to(c.as_mut_slice());
            c
        });
        let mut st = match inner.state.try_write() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let mut runs = Vec::new();
        let placed = {
            let mut cache = inner.cache();
            let placed = match &copy {
                Some(c) => inner.place_blocks(
                    &mut st,
                    &mut cache,
                    start,
                    len,
                    None,
                    &mut runs,
                    |b, at, n| inner.note_sum(b, &c.as_slice()[at..at + n]),
                ),
                None => inner.place_blocks(
                    &mut st,
                    &mut cache,
                    start,
                    len,
                    None,
                    &mut runs,
                    |_, _, _| {},
                ),
            };
            let epoch = inner.inflight.begin();
            (placed, epoch)
        };
        let (placed, epoch) = placed;
        drop(st);
        out.clear();
        let mut tiers = Vec::with_capacity(runs.len());
        let mut align = 1usize;
        let mut direct = placed.is_ok();
        for r in &runs {
            if !direct {
                break;
            }
            let Some((extent, index)) = split_ptr(r.ptr) else {
                direct = false;
                break;
            };
            let Some(copies) = inner.write_copies_of(extent) else {
                direct = false;
                break;
            };
            let offset = u64::from(index) * BLOCK_SIZE as u64;
            for e in copies {
                let Some((fd, file_offset, a, tier)) =
                    inner.space.direct_write_target(e, offset, r.len)
                else {
                    direct = false;
                    break;
                };
                tiers.push(tier);
                align = align.max(a);
                out.push(MappedPiece {
                    at: r.at,
                    len: r.len,
                    file: Some((fd, file_offset)),
                    aio: None,
                });
            }
        }
        if direct && out.iter().any(|p| p.at % align != 0 || p.len % align != 0) {
            direct = false;
        }
        let guard = WriteGuard {
            inner,
            at,
            len: len as u64,
            runs,
            tiers,
            copy,
            epoch,
            _stripes: stripes,
        };
        if direct {
            return Some(Ok(Mapped {
                guard: Box::new(guard),
                mem_align: align,
            }));
        }
        // The tree changed but the data cannot go to the ring (a failed placement, or a
        // file the store will not hand out): written here, as `write` writes it.
        out.clear();
        let written = match &guard.copy {
            Some(c) => inner.write_runs(&guard.runs, c.as_slice()),
            None => {
                let mut buf = vec![0u8; len];
                bufs.copy_to(&mut buf);
                inner.write_runs(&guard.runs, &buf)
            }
        };
        let mut guard = guard;
        let r = placed.and(written);
        guard.completed(r.is_ok(), std::time::Duration::ZERO);
        drop(guard);
        Some(r.map(|()| Mapped {
            guard: Box::new(()),
            mem_align: 1,
        }))
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let inner = &*self.inner;
        let start = at.0 * SECTOR_SIZE;
        let (first, end) = block_span(start, buf.len() as u64);
        let _stripes = inner.stripes.exclusive(first, end);
        let bs = BLOCK_SIZE as u64;
        if start % bs != 0 || buf.len() as u64 % bs != 0 {
            // A partial block is merged with what the block holds: under the lock.
            let mut st = inner.write_io();
            let mut cache = inner.cache();
            inner.write_tree(&mut st, &mut cache, start, buf)?;
        } else {
            // The tree change under the state lock, the data write after it, under the
            // blocks' stripes alone: writes to other blocks and commits proceed meanwhile.
            let mut runs = Vec::new();
            let placed = {
                let mut st = inner.state_write();
                let mut cache = inner.cache();
                let placed = inner.place_whole(&mut st, &mut cache, start, buf, &mut runs);
                let epoch = inner.inflight.begin();
                (placed, epoch)
            };
            let (placed, epoch) = placed;
            let written = inner.write_runs(&runs, buf);
            inner.inflight.end(epoch);
            placed?;
            written?;
        }
        inner.annotate_write(at, buf.len() as u64);
        dovetail_store::failpoint::hit("parallax-write");
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.inner.commit_concurrent(Some("parallax-flush"))
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        // Discarded blocks lose their pointers, so they read back as zeroes, like a punched hole.
        self.write_zeroes(at, len, true)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, _unmap: bool) -> Result<()> {
        check_range(at, len, self.inner.capacity)?;
        let inner = &*self.inner;
        let (first, end) = block_span(at.0 * SECTOR_SIZE, len.0 * SECTOR_SIZE);
        let _stripes = inner.stripes.exclusive(first, end);
        let mut st = inner.write_io();
        let mut cache = inner.cache();
        // In range, so the byte offsets fit (the capacity's bytes fit in a u64).
        inner.zero_tree(&mut st, &mut cache, at.0 * SECTOR_SIZE, len.0 * SECTOR_SIZE)?;
        inner.annotate_write(at, len.0 * SECTOR_SIZE);
        Ok(())
    }
}
