//! A live disk's snapshots: taken in a pause, listed, deleted and exported while the guest runs.

use super::*;

/// Pauses a `snapshot` ends at once because a commit runs, before one waits for it inside.
const SNAPSHOT_TRIES: u32 = 3;

impl LiveDisk {
    /// `snapshot`: freezes the trusted version as it is after every request completed so far.
    pub fn snapshot(&self, name: &str) -> Result<(SnapshotInfo, Pause), CommandError> {
        let mut set = self.lock();
        let trusted = self.parallax(&set)?;
        // Refuse a bad or duplicate name without pausing (the layout checks again, paused).
        dovetail_store::names::check_name(dovetail_store::names::NameKind::Snapshot, name)
            .map_err(|e| CommandError::new(ErrorCode::Invalid, e.to_string()))?;
        if trusted.snapshots().iter().any(|s| s.name == name) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: a snapshot named {name:?} exists already",
                    self.name
                ),
            ));
        }
        Self::pace(&mut set);
        let tee = set.candidate.as_ref().map(|c| c.tee.clone());
        // Bring the Tee's background stream up to date before the pause, so the drain inside
        // it has only the last moment's writes to forward.
        if let Some(t) = &tee {
            t.drain();
        }
        let held = set
            .migration
            .as_ref()
            .and_then(|m| m.job.as_ref())
            .map(CopyOut::hold);
        // The pause only captures the tree and the snapshot record (no write back, no sync):
        // the commit runs after it, while the guest's I/O goes on. A commit that runs (a
        // FLUSH, the timer, a mover step) would make the capture wait inside the pause: the
        // pause then ends at once, the commit is waited for with I/O running, and the pause is
        // tried again (the last try waits in it).
        let mut tries = 0;
        let (r, pause) = loop {
            let last = tries == SNAPSHOT_TRIES;
            let (r, pause) = self.switch.pause(|_| {
                if let Some(t) = &tee {
                    t.drain();
                }
                if last {
                    trusted.capture_snapshot(name).map(Some)
                } else {
                    trusted.try_capture_snapshot(name)
                }
            });
            match r {
                Ok(None) => {
                    tries += 1;
                    trusted.wait_commit();
                }
                Ok(Some(captured)) => break (Ok(captured), pause),
                Err(e) => break (Err(e), pause),
            }
        };
        if held == Some(true) {
            if let Some(job) = set.migration.as_ref().and_then(|m| m.job.as_ref()) {
                job.resume();
            }
        }
        let snap = r
            .and_then(|captured| captured.commit())
            .map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
        let message = format!("snapshot {} of generation {}", snap.name, snap.generation);
        self.changed(&mut set, "snapshot-taken", message, pause);
        Ok((snap, pause))
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, CommandError> {
        Ok(self.parallax(&self.lock())?.snapshots())
    }

    /// The trusted version of a store disk.
    pub(super) fn parallax(&self, set: &VersionSet) -> Result<Arc<Parallax>, CommandError> {
        self.store()?;
        set.parallax.clone().ok_or_else(|| {
            CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no snapshots", self.name),
            )
        })
    }

    /// Deletes a snapshot (no pause: it commits like a FLUSH does).
    pub fn delete_snapshot(&self, name: &str) -> Result<(), CommandError> {
        let set = self.lock();
        let trusted = self.parallax(&set)?;
        trusted
            .delete_snapshot(name)
            .map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
        self.events.publish(
            &self.name,
            "snapshot-deleted",
            "daemon",
            format!("deleted snapshot {name}"),
            None,
            None,
        );
        Ok(())
    }

    /// Writes snapshot `name` to a new sparse raw image: `out`, created (empty) at `to`.
    pub fn export_snapshot(
        &self,
        name: &str,
        out: std::fs::File,
        to: &Path,
    ) -> Result<u64, CommandError> {
        let trusted = self.parallax(&self.lock())?;
        let view = trusted
            .open_snapshot(name)
            .map_err(|e| CommandError::new(ErrorCode::Invalid, error_chain(&e)))?;
        let c = crate::ops::diskio::export_into(&view, out, to, false)?;
        info!(
            "disk {}: exported snapshot {name} to {} ({} bytes of data)",
            self.name,
            to.display(),
            c.data
        );
        Ok(c.data)
    }
}
