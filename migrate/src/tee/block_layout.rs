//! The Tee as a [`BlockLayout`]: the guest's requests, gated by the policy lock, into the read,
//! write and flush paths.

use super::*;

impl BlockLayout for Tee {
    fn capacity(&self) -> Sectors {
        self.inner.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> dovetail_layout::Result<()> {
        let inner = &*self.inner;
        let len = buffer_sectors(buf.len())?;
        let s = inner.span(at, len)?;
        let g = inner.gate()?;
        Counters::bump(&inner.counters.reads);
        inner.hint_read(s);
        if buf.is_empty() || !inner.read_involves_candidate(*g, s) {
            if inner.is_quarantined() {
                inner.settle();
            }
            return inner.trusted.read(at, buf);
        }
        inner.read_checked(*g, at, s, buf)
    }

    fn read_into(
        &self,
        at: Sector,
        bufs: IoBufs<'_>,
        scratch: &mut Vec<u8>,
    ) -> dovetail_layout::Result<()> {
        let inner = &*self.inner;
        let len = buffer_sectors(bufs.len())?;
        let s = inner.span(at, len)?;
        let g = inner.gate()?;
        Counters::bump(&inner.counters.reads);
        inner.hint_read(s);
        if bufs.is_empty() || !inner.read_involves_candidate(*g, s) {
            if inner.is_quarantined() {
                inner.settle();
            }
            return inner.trusted.read_into(at, bufs, scratch);
        }
        let buf = dovetail_layout::iobuf::scratch(scratch, bufs.len());
        inner.read_checked(*g, at, s, buf)?;
        bufs.copy_from(buf);
        Ok(())
    }

    fn write(&self, at: Sector, buf: &[u8]) -> dovetail_layout::Result<()> {
        self.inner.write_impl(at, Payload::Borrowed(buf))
    }

    fn write_from(
        &self,
        at: Sector,
        bufs: IoBufs<'_>,
        scratch: &mut Vec<u8>,
    ) -> dovetail_layout::Result<()> {
        let inner = &*self.inner;
        if inner.is_quarantined() || inner.current_policy().candidate_writes_sync() {
            let buf = dovetail_layout::iobuf::scratch(scratch, bufs.len());
            bufs.copy_to(buf);
            return inner.write_impl(at, Payload::Borrowed(buf));
        }
        // The candidate is written from the stream: copy the guest's data once, into the
        // buffer that will be queued.
        let mut v = inner.stream.buffer(bufs.len());
        bufs.copy_to(&mut v);
        inner.write_impl(at, Payload::Owned(v))
    }

    fn flush(&self) -> dovetail_layout::Result<()> {
        self.inner.flush_impl()
    }

    fn discard(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<()> {
        self.inner.write_zeroes_impl(at, len, true, "discard")
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> dovetail_layout::Result<()> {
        self.inner.write_zeroes_impl(at, len, unmap, "write-zeroes")
    }
}
