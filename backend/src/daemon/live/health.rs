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
                let Some(live) = weak.upgrade() else { return };
                if !matches!(live.backing, Backing::Store { .. })
                    || live.recovering.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                let spawned = std::thread::Builder::new()
                    .name(format!("recover-{}", live.name))
                    .spawn({
                        let live = live.clone();
                        move || {
                            let caught =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    live.recover(&error)
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
                        }
                    });
                if let Err(e) = spawned {
                    warn!("disk {}: cannot start the recovery: {e}", live.name);
                    live.recovering.store(false, Ordering::Release);
                }
            }
        }));
    }

    /// After a failed FLUSH: if the store says a failed sync may have lost writes of the
    /// trusted version, reopens that version from its last commit (every write of which was
    /// synced before the commit), in process, and serves it in place of the old instance
    /// during a pause. Nothing is retried or replayed: the writes since the last successful
    /// flush are reported (an event, `sync-failed`) as of unknown durability, and the disk
    /// goes on from its last commit. A FLUSH that failed for another reason changes nothing.
    /// A disk with a candidate is not reopened (the Tee's candidate holds blocks the reopened
    /// version would not): the event says so, and its writes and FLUSHes keep failing until
    /// the candidate is dropped and the daemon restarted.
    pub(super) fn recover(&self, error: &str) {
        let Backing::Store { store } = &self.backing else {
            return;
        };
        let mut set = self.lock();
        let Some(key) = set.trusted_key else { return };
        if !store.lost_writes(key) {
            return;
        }
        let unknown = set.trusted_metrics.unsynced();
        let what = format!(
            "a sync of {key} failed ({error}): the writes since its last successful \
             flush may be lost; {} change(s), {} bytes, of unknown durability, within sectors \
             {}..{}",
            unknown.changes, unknown.bytes, unknown.first_sector, unknown.end_sector
        );
        warn!("disk {}: {what}", self.name);
        if set.candidate.is_some() {
            let message = format!(
                "{what}; not reopened in process because the disk has a candidate: its writes \
                 and FLUSHes fail until the candidate is dropped and the daemon restarted"
            );
            self.events
                .publish(&self.name, "sync-failed", "daemon", message, None, None);
            return;
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
                return;
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
        let lost = set.trusted_metrics.forget_unsynced();
        set.trusted = served;
        set.parallax = Some(fresh.clone());
        set.mover = self.start_mover(&fresh);
        let message = format!(
            "{what}; reopened from its last commit in {:.1} ms ({} change(s) since the last \
             successful flush dropped with it); serving again",
            opened.as_secs_f64() * 1e3,
            lost.changes
        );
        self.changed(&mut set, "sync-failed", message, pause);
    }
}
