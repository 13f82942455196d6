//! FLUSH: both versions made durable, then the presence map persisted.

use super::*;

impl Inner {
    pub(super) fn flush_impl(&self) -> dovetail_layout::Result<()> {
        let g = self.gate()?;
        let p = *g;
        Counters::bump(&self.counters.flushes);
        if self.is_quarantined() {
            self.settle();
            self.trusted_lost_check()?;
            return self.trusted.flush();
        }
        if p == Policy::AsyncNewPrimary {
            if let Err(f) = self.call_candidate(|c| c.flush()) {
                let req = self.request("flush", Sector(0), Sectors(0));
                self.candidate_failed("flush", Some(req), f);
            }
            self.stream.drain();
            self.trusted_lost_check()?;
            self.trusted.flush()?;
        } else {
            self.trusted.flush()?;
            self.stream.drain();
            if !self.is_quarantined() {
                if let Err(f) = self.call_candidate(|c| c.flush()) {
                    let req = self.request("flush", Sector(0), Sectors(0));
                    self.candidate_failed("flush", Some(req), f);
                }
            }
        }
        if !self.is_quarantined() {
            if let Err(e) = self.presence.persist() {
                self.quarantine(
                    &format!(
                        "the presence map could not be persisted: {}",
                        error_chain(&e)
                    ),
                    None,
                );
            }
        }
        Ok(())
    }

    /// async-new-primary: a trusted write the guest was told had completed failed in the
    /// background; the next flush reports it (like a writeback error at fsync).
    pub(super) fn trusted_lost_check(&self) -> dovetail_layout::Result<()> {
        if self.trusted_lost.swap(false, Ordering::AcqRel) {
            return Err(Error::Io {
                op: "flush",
                path: format!("tee of disk {}", self.disk),
                source: std::io::Error::other(
                    "a write applied to the trusted version in the background failed",
                ),
            });
        }
        Ok(())
    }
}
