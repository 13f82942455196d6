//! What a live disk does when its requests panic or a sync fails: events, and the reopen of
//! a version that may have lost writes from its last commit, in process.

use super::*;

use crate::disk::Notice;

impl LiveDisk {
    /// Listens to the disk's queue workers: panics and a failed disk become events; a failed
    /// FLUSH starts [`LiveDisk::recover`] on a thread of its own (the queue worker that saw it
    /// must not wait for a pause of its own disk).
    pub(super) fn watch_disk(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let events = self.events.clone();
        let name = self.name.clone();
        if let Backing::Store { store } = &self.backing {
            // A failed sync marks every version with writes it did not cover, this disk's
            // among them even if another's FLUSH (or a commit of the timer or the mover)
            // synced: recover at once, not at this disk's next FLUSH (its writes fail meanwhile).
            let weak = weak.clone();
            store.watch_lost(Box::new(move |key| {
                if let Some(live) = weak.upgrade() {
                    live.start_recovery(format!("a sync that covered writes of {key} failed"));
                }
            }));
        }
        self.disk.set_notify(Box::new(move |notice| match notice {
            Notice::Panicked {
                queue,
                what,
                cause,
                count,
            } => events.publish(
                &name,
                "request-panicked",
                "daemon",
                format!(
                    "queue {queue}: {what} panicked ({cause}); answered IOERR (panic {count} \
                     of this disk; at {} the disk is failed)",
                    crate::disk::PANICS_BEFORE_FAILED
                ),
                None,
                None,
            ),
            Notice::Failed(reason) => {
                events.publish(&name, "disk-failed", "daemon", reason, None, None)
            }
            Notice::FlushFailed(error) => {
                if let Some(live) = weak.upgrade() {
                    live.start_recovery(error);
                }
            }
        }));
    }

    /// Runs [`LiveDisk::recover`] on a thread of its own, unless one runs already (or the disk
    /// is an image file): the thread that saw the failure may be the disk's own queue worker,
    /// or hold a lock of the store, and the recovery pauses the disk and opens the version.
    fn start_recovery(self: &Arc<Self>, error: String) {
        if !matches!(self.backing, Backing::Store { .. })
            || self.recovering.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let live = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("recover-{}", self.name))
            .spawn(move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Background);
                let mut error = error;
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    // A failure while the last reopen ran (its notice was dropped): again.
                    while live.recover(&error) && live.still_lost() {
                        error = "a sync failed again while the version was reopened".into();
                    }
                }));
                if let Err(p) = caught {
                    let cause = dovetail_layout::panic_message(&*p);
                    log::error!(
                        "disk {}: the recovery after a failed sync panicked: {cause}",
                        live.name
                    );
                    live.events.publish(
                        &live.name,
                        "recovery-failed",
                        "daemon",
                        format!("the recovery after a failed sync panicked: {cause}"),
                        None,
                        None,
                    );
                }
                live.recovering.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            warn!("disk {}: cannot start the recovery: {e}", self.name);
            self.recovering.store(false, Ordering::Release);
        }
    }

    /// After a failed FLUSH: if the store says a failed sync may have lost writes of the
    /// trusted version, reopens that version from its last commit (every write of which was
    /// synced before the commit), in process, and serves it in place of the old instance
    /// during a pause. Nothing is retried or replayed: the writes since the last successful
    /// flush are reported (an event, `sync-failed`) as of unknown durability, and the disk
    /// goes on from its last commit. A FLUSH that failed for another reason changes nothing.
    /// A candidate is quarantined first (it may hold writes the reopened version would not).
    /// Returns whether it reopened the version.
    pub(super) fn recover(&self, error: &str) -> bool {
        let Backing::Store { store } = &self.backing else {
            return false;
        };
        let mut set = self.lock();
        let Some(key) = set.trusted_key else {
            return false;
        };
        if !store.lost_writes(key) && !self.reopen_owed.load(Ordering::Acquire) {
            return false;
        }
        if set.voting.is_some() {
            // The voting Tee quarantined the member whose flush failed and serves from the
            // others; reopening the trusted version alone would drop them from the I/O.
            warn!(
                "disk {}: a sync of {key} failed ({error}); the disk is served by a voting tee,                  which carries on with its other members (not reopened)",
                self.name
            );
            return false;
        }
        let unknown = set.trusted_metrics.unsynced();
        let what = format!(
            "a sync of {key} failed ({error}): the writes since its last successful \
             flush may be lost; {} change(s), {} bytes, of unknown durability, within sectors \
             {}..{}",
            unknown.changes, unknown.bytes, unknown.first_sector, unknown.end_sector
        );
        warn!("disk {}: {what}", self.name);
        // A candidate may hold writes the reopened trusted version will not have: it is
        // quarantined (recorded in the catalog, as the Tee records its own quarantines), its
        // migration stops, and the trusted version serves alone; `untee` drops it.
        let mut old_tee = None;
        if let Some(c) = set.candidate.take() {
            if let Some(m) = set.migration.take() {
                m.stop();
            }
            let reason = format!(
                "the trusted version {key} was reopened from its last commit after a failed \
                 sync: the candidate may hold writes it no longer has"
            );
            if let Err(e) = store.quarantine(&self.name, &reason) {
                warn!(
                    "disk {}: cannot record the quarantine of candidate {}: {}",
                    self.name,
                    c.key,
                    error_chain(&e)
                );
            }
            old_tee = Some(c);
        }
        // The old instance's mover stops before the version is reopened under it.
        drop(set.mover.take());
        store.renew_version(key);
        let started = Instant::now();
        let fresh = match crate::ops::open::open_disk(store, &self.name) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                let message = format!(
                    "{what}; reopening it from its last commit failed: {} (its writes and \
                     FLUSHes fail; the next failed FLUSH tries again)",
                    error_chain(&e)
                );
                log::error!("disk {}: {message}", self.name);
                self.events
                    .publish(&self.name, "sync-failed", "daemon", message, None, None);
                self.reopen_owed.store(true, Ordering::Release);
                return false;
            }
        };
        if !self.disk.read_only() {
            if let Err(e) = fresh.start_reserve() {
                warn!("disk {}: no extent reserve: {e}", self.name);
            }
        }
        let opened = started.elapsed();
        let served: Arc<dyn BlockLayout> =
            Arc::new(Metered::new(fresh.clone(), set.trusted_metrics.clone()));
        Self::pace(&mut set);
        let ((), pause) = self.switch.pause(|cur| *cur = served.clone());
        self.reopen_owed.store(false, Ordering::Release);
        let lost = set.trusted_metrics.forget_unsynced();
        let quarantined = old_tee.map(|c| {
            // Its trusted side is the old instance: closing flushes it, which fails.
            if let Err(e) = c.tee.close() {
                debug!(
                    "disk {}: closing the Tee of candidate {} after the failed sync: {}",
                    self.name,
                    c.key,
                    error_chain(&e)
                );
            }
            c.key
        });
        set.trusted = served;
        set.parallax = Some(fresh.clone());
        set.mover = self.start_mover(&fresh);
        let message = format!(
            "{what}; reopened from its last commit in {:.1} ms ({} change(s) since the last \
             successful flush dropped with it){}; serving again",
            opened.as_secs_f64() * 1e3,
            lost.changes,
            quarantined.map_or_else(String::new, |k| format!(
                "; candidate {k} quarantined (it may hold writes the trusted version no longer \
                 has; `untee` drops it)"
            ))
        );
        self.changed(&mut set, "sync-failed", message, pause);
        true
    }

    /// Whether the trusted version (as served now) is marked as having maybe lost writes.
    fn still_lost(&self) -> bool {
        let Backing::Store { store } = &self.backing else {
            return false;
        };
        let key = self.lock().trusted_key;
        key.is_some_and(|k| store.lost_writes(k))
    }
}
