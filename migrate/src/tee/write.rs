//! The write path: writes and write-zeroes to both versions in one order, partial blocks
//! completed from the trusted version, the barrier of `barrier-writes-async` and the
//! background trusted writes of `async-new-primary`.

use super::*;

impl Inner {
    /// The parts of the edge blocks of `s` the request does not cover and the candidate does
    /// not hold: `[(start, end)]` in bytes, at most two.
    pub(super) fn fills(&self, s: Span) -> [Option<(u64, u64)>; 2] {
        let mut out = [None, None];
        let head = s.first * BLOCK;
        if s.start > head && !self.presence.contains(s.first) {
            out[0] = Some((head, s.start));
        }
        let tail = self.block_end(s.last);
        if s.end < tail && !self.presence.contains(s.last) {
            out[1] = Some((s.end, tail));
        }
        out
    }

    /// Marks the blocks of a candidate write present, and verified where the write covered
    /// them whole (`[from, to)` in bytes is what the candidate now has from this request).
    pub(super) fn mark_written(&self, s: Span, from: u64, to: u64) {
        dovetail_store::failpoint::hit("upgrade-on-write");
        self.presence.insert_range(s.first, s.last - s.first + 1);
        if self.unverified.any() {
            let first = from.div_ceil(BLOCK);
            let last_excl = if to == self.cap_bytes {
                to.div_ceil(BLOCK)
            } else {
                to / BLOCK
            };
            if last_excl > first {
                self.unverified.clear(first, last_excl - 1);
            }
        }
    }

    /// After a failed trusted write the versions may differ on these blocks: stop comparing them.
    pub(super) fn mark_trusted_failed(&self, s: Span) {
        for b in s.first..=s.last {
            if self.presence.contains(b) {
                self.unverified.set(b);
            }
        }
    }

    pub(super) fn write_impl(
        &self,
        at: Sector,
        payload: Payload<'_>,
    ) -> dovetail_layout::Result<()> {
        let data = payload.bytes();
        let len = buffer_sectors(data.len())?;
        let s = self.span(at, len)?;
        let g = self.gate()?;
        let p = *g;
        Counters::bump(&self.counters.writes);
        if data.is_empty() {
            return self.trusted.write(at, data);
        }
        let req = self.request("write", at, len);
        let _stripes = self.stripes.lock(s.first, s.last, Mode::Exclusive);
        if self.is_quarantined() {
            self.settle();
            return self.trusted.write(at, data);
        }
        match p {
            Policy::AsyncNewPrimary => return self.write_new_primary(at, s, data, &req),
            Policy::BarrierWritesAsync => self.barrier(&req)?,
            _ => {}
        }
        if let Err(e) = self.trusted.write(at, data) {
            self.mark_trusted_failed(s);
            return Err(e);
        }
        if self.is_quarantined() {
            return Ok(());
        }
        let fills = self.fills(s);
        let from = fills[0].map_or(s.start, |f| f.0);
        let to = fills[1].map_or(s.end, |f| f.1);
        let ext_at = Sector(from / SECTOR_SIZE);
        let ext_len = (to - from) as usize;
        let head = (s.start - from) as usize;
        if p.candidate_writes_sync() {
            let verify = p == Policy::SyncCrossChecks;
            if fills == [None, None] {
                self.candidate_write_sync(ext_at, data, verify, &req);
            } else {
                with_scratch(&SCRATCH_A, ext_len, |ext| -> dovetail_layout::Result<()> {
                    self.fill_from_trusted(ext, from, fills)?;
                    ext[head..head + data.len()].copy_from_slice(data);
                    self.candidate_write_sync(ext_at, ext, verify, &req);
                    Ok(())
                })?;
            }
        } else {
            let ext = match payload {
                // The common case: the guest's data, copied once, goes on the stream as it is.
                Payload::Owned(v) if fills == [None, None] => v,
                _ => {
                    let mut ext = self.stream.buffer(ext_len);
                    self.fill_from_trusted(&mut ext, from, fills)?;
                    ext[head..head + data.len()].copy_from_slice(data);
                    ext
                }
            };
            let op = Op::CandidateWrite {
                at: ext_at,
                data: ext,
            };
            self.stream.push(op, ext_len, &self.counters);
        }
        self.mark_written(s, from, to);
        Ok(())
    }

    /// Reads the fill ranges of an extended buffer starting at byte `from` from the trusted.
    pub(super) fn fill_from_trusted(
        &self,
        ext: &mut [u8],
        from: u64,
        fills: [Option<(u64, u64)>; 2],
    ) -> dovetail_layout::Result<()> {
        for (a, b) in fills.into_iter().flatten() {
            let o = (a - from) as usize;
            let n = (b - a) as usize;
            self.trusted
                .read_quiet(Sector(a / SECTOR_SIZE), &mut ext[o..o + n])?;
        }
        Ok(())
    }

    /// Writes `data` to the candidate now; under sync-cross-checks reads it back and compares.
    pub(super) fn candidate_write_sync(
        &self,
        at: Sector,
        data: &[u8],
        verify: bool,
        req: &RequestInfo,
    ) {
        if let Err(f) = self.call_candidate(|c| c.write(at, data)) {
            self.candidate_failed("write", Some(req.clone()), f);
            return;
        }
        if verify {
            with_scratch(&SCRATCH_B, data.len(), |back| {
                match self.call_candidate(|c| c.read_quiet(at, back)) {
                    Err(f) => self.candidate_failed("read-back", Some(req.clone()), f),
                    Ok(()) => {
                        if let Some(d) = first_difference(data, back) {
                            self.mismatch(
                                EventKind::Mismatch,
                                "candidate read-back differs from what was written",
                                Some(req.clone()),
                                Some(xxh3_128(data)),
                                Some(xxh3_128(back)),
                                Some(d as u64),
                            );
                        }
                    }
                }
            });
        }
    }

    /// barrier-writes-async: waits (under the write's stripes) for every read check queued
    /// before this write; refuses the write if one of them failed.
    pub(super) fn barrier(&self, req: &RequestInfo) -> dovetail_layout::Result<()> {
        let upto = self.stream.next_seq();
        self.stream.wait_done(upto);
        let failed = self.first_failed.load(Ordering::Acquire);
        if failed < upto {
            Counters::bump(&self.counters.barrier_refused_writes);
            let mut r = Report::new(
                EventKind::BarrierRefusedWrite,
                "write refused: a read answered before it failed verification".to_string(),
            );
            r.request = Some(req.clone());
            self.emit(r);
            return Err(io_error(
                "write refused: an earlier read answered by the candidate failed verification",
            ));
        }
        Ok(())
    }

    pub(super) fn write_new_primary(
        &self,
        at: Sector,
        s: Span,
        data: &[u8],
        req: &RequestInfo,
    ) -> dovetail_layout::Result<()> {
        let fills = self.fills(s);
        let from = fills[0].map_or(s.start, |f| f.0);
        let to = fills[1].map_or(s.end, |f| f.1);
        if fills != [None, None] {
            // The trusted version is current for blocks the candidate does not hold, but make
            // sure nothing queued is still on its way there.
            self.stream.drain();
        }
        let head = (s.start - from) as usize;
        let r = with_scratch(&SCRATCH_A, (to - from) as usize, |ext| {
            let src: &[u8] = if fills == [None, None] {
                data
            } else {
                self.fill_from_trusted(ext, from, fills)?;
                ext[head..head + data.len()].copy_from_slice(data);
                ext
            };
            Ok::<_, Error>(self.call_candidate(|c| c.write(Sector(from / SECTOR_SIZE), src)))
        })?;
        if let Err(f) = r {
            self.candidate_failed("write", Some(req.clone()), f);
            self.settle();
            return self.trusted.write(at, data);
        }
        self.mark_written(s, from, to);
        let mut copy = self.stream.buffer(data.len());
        copy.copy_from_slice(data);
        let op = Op::TrustedWrite {
            at,
            data: copy,
            request: req.clone(),
        };
        self.stream.push(op, data.len(), &self.counters);
        Ok(())
    }

    pub(super) fn write_zeroes_impl(
        &self,
        at: Sector,
        len: Sectors,
        unmap: bool,
        op: &'static str,
    ) -> dovetail_layout::Result<()> {
        let s = self.span(at, len)?;
        let g = self.gate()?;
        let p = *g;
        Counters::bump(&self.counters.writes);
        if len.0 == 0 {
            return self.trusted.write_zeroes(at, len, unmap);
        }
        let req = self.request(op, at, len);
        let _stripes = self.stripes.lock(s.first, s.last, Mode::Exclusive);
        if self.is_quarantined() {
            self.settle();
            return self.trusted.write_zeroes(at, len, unmap);
        }
        if p == Policy::BarrierWritesAsync {
            self.barrier(&req)?;
        }
        let fills = self.fills(s);
        let from = fills[0].map_or(s.start, |f| f.0);
        let to = fills[1].map_or(s.end, |f| f.1);
        if p == Policy::AsyncNewPrimary {
            if fills != [None, None] {
                self.stream.drain();
            }
            if let Err(f) = self.candidate_zeroes_sync(at, len, unmap, fills, false) {
                self.candidate_failed(op, Some(req.clone()), f);
                self.settle();
                return self.trusted.write_zeroes(at, len, unmap);
            }
            self.mark_written(s, from, to);
            let op = Op::TrustedZeroes {
                at,
                len,
                unmap,
                request: req,
            };
            self.stream.push(op, CHECK_COST, &self.counters);
            return Ok(());
        }
        if let Err(e) = self.trusted.write_zeroes(at, len, unmap) {
            self.mark_trusted_failed(s);
            return Err(e);
        }
        if self.is_quarantined() {
            return Ok(());
        }
        if p.candidate_writes_sync() {
            let verify = p == Policy::SyncCrossChecks;
            match self.candidate_zeroes_sync(at, len, unmap, fills, verify) {
                Err(f) => self.candidate_failed(op, Some(req.clone()), f),
                Ok(Some(d)) => self.mismatch(
                    EventKind::Mismatch,
                    "candidate read-back of zeroed range is not zero",
                    Some(req.clone()),
                    None,
                    None,
                    Some(d),
                ),
                Ok(None) => {}
            }
        } else {
            self.stream.push(
                Op::CandidateZeroes { at, len, unmap },
                CHECK_COST,
                &self.counters,
            );
            for (a, b) in fills.into_iter().flatten() {
                let mut v = self.stream.buffer((b - a) as usize);
                self.trusted.read_quiet(Sector(a / SECTOR_SIZE), &mut v)?;
                let op = Op::CandidateWrite {
                    at: Sector(a / SECTOR_SIZE),
                    data: v,
                };
                self.stream.push(op, (b - a) as usize, &self.counters);
            }
        }
        self.mark_written(s, from, to);
        Ok(())
    }

    /// Zeroes a range of the candidate now, completing partial blocks it did not hold from the
    /// trusted version; with `verify`, reads the range back and returns the offset of the first
    /// non-zero byte.
    pub(super) fn candidate_zeroes_sync(
        &self,
        at: Sector,
        len: Sectors,
        unmap: bool,
        fills: [Option<(u64, u64)>; 2],
        verify: bool,
    ) -> Result<Option<u64>, CandidateFailure> {
        self.call_candidate(|c| c.write_zeroes(at, len, unmap))?;
        for (a, b) in fills.into_iter().flatten() {
            let fill_at = Sector(a / SECTOR_SIZE);
            with_scratch(&SCRATCH_A, (b - a) as usize, |v| {
                // A trusted read error here leaves the candidate's block partly unknown: report
                // it as the candidate's problem would be wrong, so mark it unverified instead.
                match self.trusted.read_quiet(fill_at, v) {
                    Ok(()) => self.call_candidate(|c| c.write(fill_at, v)),
                    Err(_) => {
                        self.unverified.set(a / BLOCK);
                        Ok(())
                    }
                }
            })?;
        }
        if !verify {
            return Ok(None);
        }
        let start = at.0 * SECTOR_SIZE;
        let end = start + len.0 * SECTOR_SIZE;
        let mut off = start;
        while off < end {
            let n = (end - off).min(PIECE) as usize;
            let found = with_scratch(&SCRATCH_B, n, |back| {
                self.call_candidate(|c| c.read_quiet(Sector(off / SECTOR_SIZE), back))
                    .map(|()| back.iter().position(|&x| x != 0))
            })?;
            if let Some(d) = found {
                return Ok(Some(off - start + d as u64));
            }
            off += n as u64;
        }
        Ok(None)
    }
}
