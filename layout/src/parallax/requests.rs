//! The request paths: read, write, flush, discard and write zeroes ([`BlockLayout`] for
//! [`Parallax`]).

use super::*;
use crate::engine::{MapGuard, Mapped, MappedPiece};

/// The disk blocks `[first, end)` that `len` bytes at byte `start` touch.
fn block_span(start: u64, len: u64) -> (u64, u64) {
    let bs = BLOCK_SIZE as u64;
    (start / bs, start.saturating_add(len).div_ceil(bs))
}

/// What a read mapped for direct submission holds until its I/O completed.
struct ReadGuard<'a> {
    _stripes: stripes::Held<'a>,
    _state: RwLockReadGuard<'a, State>,
}

impl MapGuard for ReadGuard<'_> {}

impl Inner {
    /// Whether reads may be mapped to the store's files ([`BlockLayout::map_direct`]):
    /// parallax-v1 (no checksums to verify, no annotations to count, no extent groups) on a
    /// store whose tier files are open for direct I/O.
    fn direct_mappable(&self) -> bool {
        self.ann.is_none() && self.sums.is_none() && !self.tiered && self.space.direct_io()
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

    /// parallax-v1 on a store opened for direct I/O: the data blocks of a read, for the queue
    /// worker's io_uring (tree nodes are looked up in the cache only: a miss, like a v2 disk's
    /// checksums and annotations, leaves the read to `read_into`).
    fn map_direct_supported(&self) -> bool {
        self.inner.direct_mappable()
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
        if inner.ann.is_some() || inner.sums.is_some() || inner.tiered || len == 0 {
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
        let mut emit = |r: &Run, out: &mut Vec<MappedPiece>| -> Option<()> {
            if inner.is_pool(r.ptr) {
                // A shared block is verified against its checksum: `read_into` reads it.
                return None;
            }
            let (extent, index) = split_ptr(r.ptr)?;
            let offset = u64::from(index) * BLOCK_SIZE as u64 + r.off as u64;
            let (fd, file_offset, a) = inner.space.direct_target(extent, offset, r.len)?;
            align = align.max(a);
            out.push(MappedPiece {
                at: r.at,
                len: r.len,
                file: Some((fd, file_offset)),
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
                    Some(last) if last.file.is_none() && last.at + last.len == p.at => {
                        last.len += p.len
                    }
                    _ => out.push(MappedPiece {
                        at: p.at,
                        len: p.len,
                        file: None,
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
                _stripes: stripes,
                _state: st,
            }),
            mem_align: align,
        })
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
                inner.inflight.begin();
                placed
            };
            let written = inner.write_runs(&runs, buf);
            inner.inflight.end();
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
