//! The request paths: read, write, flush, discard and write zeroes ([`BlockLayout`] for
//! [`Parallax`]).

use super::*;

/// The disk blocks `[first, end)` that `len` bytes at byte `start` touch.
fn block_span(start: u64, len: u64) -> (u64, u64) {
    let bs = BLOCK_SIZE as u64;
    (start / bs, start.saturating_add(len).div_ceil(bs))
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
