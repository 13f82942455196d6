//! The read path: which version answers each run of blocks, compared synchronously or checked
//! in the background as the policy says.

use super::*;

impl Inner {
    /// Whether a read of `s` under `p` involves the candidate at all.
    pub(super) fn read_involves_candidate(&self, p: Policy, s: Span) -> bool {
        if self.is_quarantined() || !p.checks_reads() {
            return false;
        }
        (s.first..=s.last).any(|b| self.presence.contains(b))
    }

    /// A read that involves the candidate, into `buf` (Rust-owned memory).
    pub(super) fn read_checked(
        &self,
        p: Policy,
        at: Sector,
        s: Span,
        buf: &mut [u8],
    ) -> dovetail_layout::Result<()> {
        let len = Sectors(buf.len() as u64 / SECTOR_SIZE);
        let req = self.request("read", at, len);
        let _g = self.stripes.lock(s.first, s.last, Mode::Shared);
        if p.candidate_answers_reads() {
            return self.read_from_candidate(p, at, s, buf, &req);
        }
        self.trusted.read(at, buf)?;
        if self.is_quarantined() {
            return Ok(());
        }
        let classify = |b| {
            if self.held_verified(b) {
                Source::Checked
            } else {
                Source::Trusted
            }
        };
        self.runs(s, classify, |off, n, src| {
            if src != Source::Checked || self.is_quarantined() {
                return Ok(());
            }
            let (o, n) = (off as usize, n as usize);
            let run_at = Sector(at.0 + off / SECTOR_SIZE);
            let t = &buf[o..o + n];
            Counters::bump(&self.counters.compared_reads);
            self.counters
                .compared_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            if p == Policy::AsyncOldPrimary {
                let op = Op::CandidateCheck {
                    at: run_at,
                    len: n,
                    hash: xxh3_128(t),
                    request: req.clone(),
                };
                self.stream.push(op, CHECK_COST, &self.counters);
                return Ok(());
            }
            with_scratch(&SCRATCH_B, n, |c| {
                match self.call_candidate(|cand| cand.read(run_at, c)) {
                    Err(f) => self.candidate_failed("read", Some(req.clone()), f),
                    Ok(()) => {
                        if let Some(d) = first_difference(t, c) {
                            self.mismatch(
                                EventKind::Mismatch,
                                "candidate read differs from the trusted version",
                                Some(req.clone()),
                                Some(xxh3_128(t)),
                                Some(xxh3_128(c)),
                                Some(off + d as u64),
                            );
                        }
                    }
                }
            });
            Ok(())
        })
    }

    /// barrier-writes-async and async-new-primary: blocks the candidate holds are answered by
    /// it and checked against the trusted version in the background stream.
    pub(super) fn read_from_candidate(
        &self,
        p: Policy,
        at: Sector,
        s: Span,
        buf: &mut [u8],
        req: &RequestInfo,
    ) -> dovetail_layout::Result<()> {
        let classify = |b| {
            if !self.presence.contains(b) {
                Source::Trusted
            } else if !self.unverified.get(b) {
                Source::Checked
            } else if p == Policy::AsyncNewPrimary {
                // The trusted version may lag behind; the candidate is the primary.
                Source::CandidateOnly
            } else {
                Source::Trusted
            }
        };
        self.runs(s, classify, |off, n, src| {
            let (o, nu) = (off as usize, n as usize);
            let run_at = Sector(at.0 + off / SECTOR_SIZE);
            let out = &mut buf[o..o + nu];
            if src == Source::Trusted || self.is_quarantined() {
                if self.is_quarantined() {
                    self.settle();
                }
                return self.trusted.read(run_at, out);
            }
            match self.call_candidate(|cand| cand.read(run_at, out)) {
                Err(f) => {
                    self.candidate_failed("read", Some(req.clone()), f);
                    self.settle();
                    self.trusted.read(run_at, out)
                }
                Ok(()) => {
                    if src == Source::Checked {
                        Counters::bump(&self.counters.compared_reads);
                        self.counters.compared_bytes.fetch_add(n, Ordering::Relaxed);
                        let op = Op::TrustedCheck {
                            at: run_at,
                            len: nu,
                            hash: xxh3_128(out),
                            request: req.clone(),
                        };
                        self.stream.push(op, CHECK_COST, &self.counters);
                    }
                    Ok(())
                }
            }
        })
    }
}
