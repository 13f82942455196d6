//! Quarantine: every call into the candidate is wrapped (`catch_unwind`); an error, a panic, a
//! mismatch or a grant refusal raises an event with provenance, bumps the counters, runs the
//! `on_quarantine` callbacks (once) and cuts the candidate off (module docs of [`super`]).

use super::*;

/// Why a call into the candidate failed.
#[derive(Debug)]
pub(crate) enum CandidateFailure {
    Error(Error),
    Panic(String),
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl Inner {
    pub fn emit(&self, r: Report) -> TeeEvent {
        self.events.emit(self.current_policy(), r, &self.counters)
    }

    /// Calls into the candidate, catching panics.
    pub fn call_candidate<R>(
        &self,
        f: impl FnOnce(&dyn BlockLayout) -> dovetail_layout::Result<R>,
    ) -> Result<R, CandidateFailure> {
        let c = &*self.candidate;
        match catch_unwind(AssertUnwindSafe(|| f(c))) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(CandidateFailure::Error(e)),
            Err(p) => Err(CandidateFailure::Panic(panic_message(&*p))),
        }
    }

    /// Reports a candidate failure and quarantines the candidate.
    pub fn candidate_failed(&self, what: &str, request: Option<RequestInfo>, f: CandidateFailure) {
        let (kind, candidate) = match &f {
            CandidateFailure::Error(e @ Error::Store(StoreError::GrantViolation { .. })) => {
                Counters::bump(&self.counters.grant_refusals);
                (EventKind::GrantRefused, error_chain(e))
            }
            CandidateFailure::Error(e) => {
                Counters::bump(&self.counters.candidate_errors);
                (EventKind::CandidateError, error_chain(e))
            }
            CandidateFailure::Panic(m) => {
                Counters::bump(&self.counters.candidate_panics);
                (EventKind::CandidatePanic, format!("panic: {m}"))
            }
        };
        let message = match kind {
            EventKind::GrantRefused => {
                format!("candidate {what} refused by the store's grant check")
            }
            EventKind::CandidatePanic => format!("candidate panicked during {what}"),
            _ => format!("candidate {what} failed"),
        };
        let mut r = Report::new(kind, message.clone());
        r.request = request.clone();
        r.candidate = Some(candidate);
        self.emit(r);
        self.quarantine(&message, request);
    }

    /// Reports a data mismatch and quarantines the candidate.
    #[allow(clippy::too_many_arguments)]
    pub fn mismatch(
        &self,
        kind: EventKind,
        what: &str,
        request: Option<RequestInfo>,
        trusted_hash: Option<u128>,
        candidate_hash: Option<u128>,
        first_difference: Option<u64>,
    ) {
        Counters::bump(&self.counters.mismatches);
        let mut r = Report::new(kind, what.to_string());
        r.request = request.clone();
        r.trusted = trusted_hash.map(hash_hex);
        r.candidate = candidate_hash.map(hash_hex);
        r.first_difference = first_difference;
        self.emit(r);
        self.quarantine(what, request);
    }

    /// Quarantines the candidate (once): event, counters, callbacks. Never blocks on I/O.
    pub fn quarantine(&self, reason: &str, request: Option<RequestInfo>) {
        if self.quarantined.swap(true, Ordering::AcqRel) {
            return;
        }
        // Reads answered by the candidate whose checks are still queued can no longer be
        // verified: writes waiting for them at the barrier are refused.
        self.first_failed
            .fetch_min(self.stream.done(), Ordering::AcqRel);
        Counters::bump(&self.counters.quarantines);
        let mut r = Report::new(
            EventKind::Quarantined,
            format!("candidate quarantined: {reason}; serving the trusted version alone"),
        );
        r.request = request;
        let ev = self.emit(r);
        let callbacks = self.callbacks.lock().unwrap_or_else(|p| p.into_inner());
        for cb in callbacks.iter() {
            cb(&ev);
        }
    }
}
