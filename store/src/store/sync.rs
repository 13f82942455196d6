//! Syncs of the tiers' data files and the tracking of their failures.

use super::*;

impl TierSync {
    /// The error of a sync of a version whose writes may have been lost.
    pub(super) fn check_lost(&self, key: u64) -> io::Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "an earlier sync of this file failed while version {key} had writes in it that \
                 no sync had covered: they may be lost, and no later sync can make them durable; \
                 reopen the store (restart the daemon) to continue from the last commit"
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
        let done = tier.file.sync();
        if done.is_ok() {
            tier.last_good_sync.store(n, Ordering::SeqCst);
        }
        if let Err(e) = &done {
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            for (key, s) in shared.iter() {
                let ts = &s.tiers[t];
                if ts.started.load(Ordering::Acquire) > ts.synced.load(Ordering::Acquire)
                    && !ts.lost.swap(true, Ordering::AcqRel)
                {
                    error!(
                        "{}: a sync of tier {}'s data file {} failed ({e}) while version {key} \
                         had writes there that no sync had covered: they may be lost, so every \
                         later flush of the version fails until the store is reopened",
                        self.location.display(),
                        self.tiers[t].name,
                        self.tiers[t].path.display()
                    );
                }
            }
        }
        done
    }
}
