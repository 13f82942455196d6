//! The Tee as a [`BlockLayout`]: the guest's requests, gated by the policy lock, into the read,
//! write and flush paths.

use super::*;
use dovetail_layout::{MapGuard, Mapped, MappedPiece};

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

    /// Whether the trusted version's reads can be mapped (the candidate's never are).
    fn map_direct_supported(&self) -> bool {
        self.inner.trusted.map_direct_supported()
    }

    /// A read the trusted version alone answers (the policy does not check reads, or no block
    /// of it was copied to the candidate yet), mapped by the trusted version, with the policy
    /// lock's read side held until it completed (as `read_into` holds it across the read):
    /// a policy change waits for it. Reads that involve the candidate, a quarantined or
    /// closed Tee, and a policy lock a change waits for leave the read to `read_into`.
    fn map_direct<'a>(
        &'a self,
        at: Sector,
        len: usize,
        pieces: &mut Vec<MappedPiece>,
    ) -> Option<Mapped<'a>> {
        let inner = &*self.inner;
        if len == 0 || inner.closed.load(Ordering::Relaxed) || inner.is_quarantined() {
            return None;
        }
        let s = inner.span(at, buffer_sectors(len).ok()?).ok()?;
        let g = match inner.policy.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if inner.read_involves_candidate(*g, s) {
            return None;
        }
        let m = inner.trusted.map_direct(at, len, pieces)?;
        Counters::bump(&inner.counters.reads);
        inner.hint_read(s);
        Some(Mapped {
            guard: Box::new(TrustedRead {
                inner: m.guard,
                _policy: g,
            }),
            mem_align: m.mem_align,
        })
    }

    fn write(&self, at: Sector, buf: &[u8]) -> dovetail_layout::Result<()> {
        let _j = self.journal.as_ref().map(|j| j.write(at, buf));
        self.inner.write_impl(at, Payload::Borrowed(buf))
    }

    fn write_from(
        &self,
        at: Sector,
        bufs: IoBufs<'_>,
        scratch: &mut Vec<u8>,
    ) -> dovetail_layout::Result<()> {
        let inner = &*self.inner;
        if let Some(j) = &self.journal {
            // One copy of the guest's data, journaled and written: the guest may change its
            // buffers meanwhile, and the journal must hold what the versions got.
            let mut v = inner.stream.buffer(bufs.len());
            bufs.copy_to(&mut v);
            let _j = j.write(at, &v);
            return inner.write_impl(at, Payload::Owned(v));
        }
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
        let _j = self.journal.as_ref().map(|j| j.flush());
        self.inner.flush_impl()
    }

    fn discard(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<()> {
        let _j = self.journal.as_ref().map(|j| j.zeroes(at, len, true, true));
        self.inner.write_zeroes_impl(at, len, true, "discard")
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> dovetail_layout::Result<()> {
        let _j = self
            .journal
            .as_ref()
            .map(|j| j.zeroes(at, len, unmap, false));
        self.inner.write_zeroes_impl(at, len, unmap, "write-zeroes")
    }
}

/// A trusted-only read of [`Tee::map_direct`]: the trusted version's guard, then the policy
/// lock (fields drop in declaration order).
struct TrustedRead<'a> {
    inner: Box<dyn MapGuard + 'a>,
    _policy: RwLockReadGuard<'a, Policy>,
}

impl MapGuard for TrustedRead<'_> {
    fn verify(&mut self, bufs: IoBufs<'_>) -> dovetail_layout::Result<()> {
        self.inner.verify(bufs)
    }

    fn completed(&mut self, ok: bool, took: std::time::Duration) {
        self.inner.completed(ok, took);
    }
}
