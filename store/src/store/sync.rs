//! Syncs of the tiers' data files and the tracking of their failures.

use super::*;

impl TierSync {
    /// The error of a sync of a version whose writes may have been lost.
    pub(super) fn check_lost(&self, key: u64) -> io::Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "an earlier sync of this file failed while version {key} had writes in it that \
                 no sync had covered, or a write of it failed: they may be lost, and no later \
                 sync can make them durable; the version takes no more reads, writes nor syncs \
                 and is to be reopened from its last commit (the daemon does it in process; or \
                 restart it)"
            )));
        }
        Ok(())
    }
}

impl Store {
    /// Syncs tier `t`'s data file; the caller holds its `sync_lock`. If the sync fails, every
    /// version with writes to the file that no successful sync covered may have lost them:
    /// each is marked ([`TierSync::lost`]) so that none of its later syncs claims them durable.
    pub(super) fn sync_tier_locked(&self, t: usize) -> io::Result<()> {
        let tier = &self.tiers[t];
        let n = tier.syncs_started.fetch_add(1, Ordering::SeqCst) + 1;
        // The shared pool's blocks in this file are covered by any sync of it: the pool writes
        // done before it started are durable after it (a root commit then needs no sync of
        // its own for them), and lost with it if it fails.
        let pool_written = self.pool_mem().written.get(t).copied().unwrap_or(0);
        let done = tier.file.sync();
        self.pool_synced(t, pool_written, done.is_ok());
        if done.is_ok() {
            tier.last_good_sync.store(n, Ordering::SeqCst);
        }
        if let Err(e) = &done {
            let mut marked = Vec::new();
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            for (key, s) in shared.iter() {
                let ts = &s.tiers[t];
                if ts.started.load(Ordering::Acquire) > ts.synced.load(Ordering::Acquire)
                    && !ts.lost.swap(true, Ordering::AcqRel)
                {
                    marked.push(VersionKey(*key));
                    error!(
                        "{}: a sync of tier {}'s data file {} failed ({e}) while version {key} \
                         had writes there that no sync had covered: they may be lost, so the \
                         version takes no more writes and every later flush of it fails until \
                         it is reopened from its last commit",
                        self.location.display(),
                        self.tiers[t].name,
                        self.tiers[t].path.display()
                    );
                }
            }
            drop(shared);
            for key in marked {
                self.tell_lost(key);
            }
        }
        done
    }

    /// A write of version `key` to tier `t`'s data file failed (`ts`: the version's record of
    /// that file): its layout may point at a block that does not hold the data, so the version
    /// is marked as a failed sync marks it (it takes no more writes, its syncs fail) and the
    /// watchers are told, once, to reopen it from its last commit.
    pub(super) fn write_failed(&self, key: VersionKey, ts: &TierSync, t: usize, e: &io::Error) {
        if ts.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        error!(
            "{}: a write of version {key} to tier {}'s data file {} failed ({e}): its layout \
             may point at a block that does not hold the data, so the version takes no more \
             writes and every later flush of it fails until it is reopened from its last commit",
            self.location.display(),
            self.tiers[t].name,
            self.tiers[t].path.display()
        );
        self.tell_lost(key);
    }

    /// Tells every watcher ([`Store::watch_lost`]) that version `key` was marked.
    fn tell_lost(&self, key: VersionKey) {
        let watchers = self.lost_watchers.lock().unwrap_or_else(|p| p.into_inner());
        for w in watchers.iter() {
            w(key);
        }
    }

    /// Calls `watcher` with every version a failed sync marks as having maybe lost writes
    /// (see [`TierSync::lost`]) from now on: the daemon reopens it from its last commit.
    pub fn watch_lost(&self, watcher: LostWatcher) {
        self.lost_watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
    }
}

impl Store {
    /// How many versions the store keeps write and sync counters for (one per version a
    /// space was made of, until the version is dropped): what a daemon holds per disk.
    pub fn tracked_versions(&self) -> usize {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether a failed sync of a tier file may have lost writes of version `key` (then every
    /// later sync and write of its spaces fails: see [`TierSync::lost`]).
    pub fn lost_writes(&self, key: VersionKey) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared
            .get(&key.0)
            .is_some_and(|s| s.tiers.iter().any(|t| t.lost.load(Ordering::Acquire)))
    }

    /// Lets version `key` start again after a failed sync lost some of its writes: spaces
    /// made from now on ([`Store::space`]) carry no mark, so a layout reopened over one from
    /// the version's last commit (whose writes were all synced before it was committed) serves
    /// and syncs again. Spaces made before keep the mark: the layout instance that may hold
    /// pointers to lost writes can never sync them, write more or commit. Returns whether the
    /// version was marked; nothing changes if it was not.
    pub fn renew_version(&self, key: VersionKey) -> bool {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let lost = shared
            .get(&key.0)
            .is_some_and(|s| s.tiers.iter().any(|t| t.lost.load(Ordering::Acquire)));
        if lost {
            shared.remove(&key.0);
        }
        lost
    }
}
