//! The background stream worker: executes the queued candidate writes and read checks (or
//! the trusted writes of `async-new-primary`) in request order, and the background threads'
//! sleep and stop.

use super::quarantine::panic_message;
use super::*;

impl Inner {
    pub(super) fn run_op(&self, seq: u64, op: Op) {
        match op {
            Op::CandidateWrite { at, data } => {
                if !self.is_quarantined() {
                    if let Err(f) = self.call_candidate(|c| c.write(at, &data)) {
                        let len = Sectors(data.len() as u64 / SECTOR_SIZE);
                        let req = self.request("write", at, len);
                        self.candidate_failed("write (background)", Some(req), f);
                    }
                }
                self.stream.recycle(data);
            }
            Op::CandidateZeroes { at, len, unmap } => {
                if !self.is_quarantined() {
                    if let Err(f) = self.call_candidate(|c| c.write_zeroes(at, len, unmap)) {
                        let req = self.request("write-zeroes", at, len);
                        self.candidate_failed("write-zeroes (background)", Some(req), f);
                    }
                }
            }
            Op::CandidateCheck {
                at,
                len,
                hash,
                request,
            } => {
                if self.is_quarantined() {
                    return;
                }
                let mut buf = self.stream.buffer(len);
                match self.call_candidate(|c| c.read(at, &mut buf)) {
                    Err(f) => self.candidate_failed("read (background check)", Some(request), f),
                    Ok(()) => {
                        let h = xxh3_128(&buf);
                        if h != hash {
                            self.mismatch(
                                EventKind::Mismatch,
                                "candidate read differs from the trusted version (background check)",
                                Some(request),
                                Some(hash),
                                Some(h),
                                None,
                            );
                        }
                    }
                }
                self.stream.recycle(buf);
            }
            Op::TrustedCheck {
                at,
                len,
                hash,
                request,
            } => {
                if self.is_quarantined() {
                    return;
                }
                let mut buf = self.stream.buffer(len);
                let r = catch_unwind(AssertUnwindSafe(|| self.trusted.read(at, &mut buf)));
                match r {
                    Ok(Ok(())) => {
                        let h = xxh3_128(&buf);
                        if h != hash {
                            self.first_failed.fetch_min(seq, Ordering::AcqRel);
                            self.mismatch(
                                EventKind::Mismatch,
                                "the read the candidate answered differs from the trusted version",
                                Some(request),
                                Some(h),
                                Some(hash),
                                None,
                            );
                        }
                    }
                    other => {
                        let what = match other {
                            Ok(Err(e)) => error_chain(&e),
                            Err(p) => format!("panic: {}", panic_message(&*p)),
                            Ok(Ok(())) => String::new(),
                        };
                        self.first_failed.fetch_min(seq, Ordering::AcqRel);
                        self.trusted_background_error("read (background check)", &request, what);
                        self.quarantine(
                            "a read the candidate answered could not be verified",
                            Some(request),
                        );
                    }
                }
                self.stream.recycle(buf);
            }
            Op::TrustedWrite { at, data, request } => {
                let r = catch_unwind(AssertUnwindSafe(|| self.trusted.write(at, &data)));
                self.trusted_result("write (background)", &request, r);
                self.stream.recycle(data);
            }
            Op::TrustedZeroes {
                at,
                len,
                unmap,
                request,
            } => {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    self.trusted.write_zeroes(at, len, unmap)
                }));
                self.trusted_result("write-zeroes (background)", &request, r);
            }
        }
    }

    pub(super) fn trusted_result(
        &self,
        what: &str,
        request: &RequestInfo,
        r: std::thread::Result<dovetail_layout::Result<()>>,
    ) {
        let msg = match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => error_chain(&e),
            Err(p) => format!("panic: {}", panic_message(&*p)),
        };
        self.trusted_lost.store(true, Ordering::Release);
        self.trusted_background_error(what, request, msg);
    }

    pub(super) fn trusted_background_error(&self, what: &str, request: &RequestInfo, msg: String) {
        Counters::bump(&self.counters.trusted_background_errors);
        let mut r = Report::new(
            EventKind::TrustedBackgroundError,
            format!("trusted {what} failed"),
        );
        r.request = Some(request.clone());
        r.trusted = Some(msg);
        self.emit(r);
    }

    pub(super) fn worker(self: Arc<Self>) {
        while let Some((seq, cost, op)) = self.stream.pop() {
            self.run_op(seq, op);
            self.stream.complete(seq, cost);
        }
    }

    /// Sleeps up to `d`; returns `true` if the Tee is stopping.
    pub fn sleep(&self, d: Duration) -> bool {
        let g = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if *g {
            return true;
        }
        let (g, _) = self
            .stop_cv
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    pub fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }
}
