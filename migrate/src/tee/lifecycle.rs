//! Setting a Tee up (its versions checked, the presence map marked dirty, the resync and
//! background threads started) and shutting it down.

use super::*;

pub(super) fn next_present(presence: &PresenceMap, from: u64) -> Option<u64> {
    // `next_absent` is the map's fast walk; present blocks are found by skipping absent runs.
    let mut b = from;
    while b < presence.blocks() {
        if presence.contains(b) {
            return Some(b);
        }
        b += 1;
    }
    None
}

impl Tee {
    /// Puts `trusted` and `candidate` behind a Tee. Refuses versions of different capacity and
    /// a presence map of the wrong size. Durably marks the map dirty before serving; if it was
    /// not closed cleanly, starts the resync of every present block.
    pub fn new(
        trusted: Arc<dyn BlockLayout>,
        candidate: Arc<dyn BlockLayout>,
        presence: Arc<PresenceMap>,
        opts: TeeOptions,
    ) -> Result<Tee, TeeError> {
        let capacity = trusted.capacity();
        if candidate.capacity() != capacity {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: the candidate has {} but the trusted version {}",
                opts.disk,
                candidate.capacity(),
                capacity
            )));
        }
        let cap_bytes = capacity.bytes().ok_or_else(|| {
            TeeError::InvalidArgument(format!("disk {}: capacity overflows", opts.disk))
        })?;
        let blocks = cap_bytes.div_ceil(BLOCK);
        if presence.blocks() != blocks {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: the presence map has {} blocks, the disk {}",
                opts.disk,
                presence.blocks(),
                blocks
            )));
        }
        let unclean = !presence.was_clean();
        presence.mark_dirty()?;
        let unverified = Unverified::new(blocks);
        if unclean {
            let mut b = 0;
            while let Some(p) = next_present(&presence, b) {
                unverified.set(p);
                b = p + 1;
            }
        }
        let inner = Arc::new(Inner {
            disk: opts.disk.clone(),
            trusted,
            candidate,
            presence,
            capacity,
            cap_bytes,
            blocks,
            policy: RwLock::new(opts.policy),
            policy_now: AtomicU8::new(policy_index(opts.policy)),
            quarantined: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            callbacks: Mutex::new(Vec::new()),
            stripes: Stripes::new(),
            stream: Stream::new(opts.stream_bytes),
            counters: Counters::default(),
            events: EventLog::new(&opts.disk),
            req_seq: AtomicU64::new(0),
            unverified,
            first_failed: AtomicU64::new(u64::MAX),
            trusted_lost: AtomicBool::new(false),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            lazy_interval: opts.lazy_interval,
            lazy_region: opts.lazy_region.max(BLOCK),
            read_hints: ReadHints::new(),
        });
        let tee = Tee {
            inner,
            threads: Mutex::new(Vec::new()),
            journal: opts
                .journal
                .map(|l| Arc::new(crate::journal::Journal::new(l, capacity))),
        };
        tee.spawn("stream", |i| i.worker())?;
        tee.spawn("lazy", crate::lazy::lazy_job)?;
        if tee.inner.unverified.any() {
            log::info!(
                "tee {}: the presence map was not closed cleanly; resyncing {} present blocks",
                tee.inner.disk,
                tee.inner.unverified.count()
            );
            tee.spawn("resync", crate::lazy::resync)?;
        }
        Ok(tee)
    }

    pub(super) fn spawn(
        &self,
        name: &'static str,
        f: impl FnOnce(Arc<Inner>) + Send + 'static,
    ) -> Result<(), TeeError> {
        let inner = self.inner.clone();
        let h = std::thread::Builder::new()
            .name(format!("tee-{name}"))
            .spawn(move || {
                dovetail_store::thread_kind::entered(
                    dovetail_store::thread_kind::ThreadKind::Background,
                );
                f(inner)
            })
            .map_err(|e| TeeError::Thread(name, e))?;
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(h);
        Ok(())
    }

    /// Orderly shutdown: stops the lazy job and the resync, drains the stream, flushes both
    /// versions, and closes the presence map cleanly (left dirty if the candidate is
    /// quarantined or the resync did not finish, so the next start resyncs). Later requests
    /// fail.
    pub fn close(&self) -> Result<(), TeeError> {
        self.stop_background();
        let g = self.inner.policy.write().unwrap_or_else(|e| e.into_inner());
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        drop(g);
        let inner = &self.inner;
        inner.stream.drain();
        inner.trusted_lost_check()?;
        inner.trusted.flush()?;
        if !inner.is_quarantined() {
            if let Err(f) = inner.call_candidate(|c| c.flush()) {
                inner.candidate_failed("flush (close)", None, f);
            }
        }
        if !inner.is_quarantined() {
            if inner.unverified.any() {
                inner.presence.persist()?;
            } else {
                inner.presence.close_clean()?;
            }
        }
        Ok(())
    }

    /// Stops and joins the lazy job and the resync (the stream worker keeps running).
    pub(super) fn stop_background(&self) {
        *self.inner.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.inner.stop_cv.notify_all();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        // The stream worker is the first thread; join the others.
        let keep = threads.len().min(1);
        let rest: Vec<_> = threads.drain(keep..).collect();
        drop(threads);
        for h in rest {
            let _ = h.join();
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.stop_background();
        self.inner.stream.stop();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for h in threads {
            let _ = h.join();
        }
    }
}
