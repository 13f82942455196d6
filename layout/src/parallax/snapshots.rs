//! Snapshots: taken, listed, deleted, and opened as read-only views.

use super::*;

impl Parallax {
    /// Freezes the disk as it is now under `name`: captures the tree with a snapshot record of
    /// it (every write completed before the call is in it), then commits it in the same root
    /// record without holding the state lock, while later writes go on into the next
    /// generation, copying the paths they change. Waits for a commit that runs.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        self.capture_snapshot(name)?.commit()
    }

    /// The first step of [`snapshot`](Parallax::snapshot), for a caller that must capture at a
    /// chosen instant (in a pause of the disk's I/O) and commit after it: captures the tree
    /// and the snapshot record under the state lock (microseconds plus the encoding of the
    /// dirty nodes) and returns the commit to finish with [`SnapshotCommit::commit`]. The
    /// commit lock is held until then, so commits stay published in order (a FLUSH arriving
    /// meanwhile waits for it). Waits for a commit that runs.
    pub fn capture_snapshot(&self, name: &str) -> Result<SnapshotCommit<'_>> {
        check_snapshot_name(name)?;
        let turn = self.inner.turn();
        self.capture_snapshot_in(turn, name)
    }

    /// [`capture_snapshot`](Parallax::capture_snapshot), unless a commit runs now (a FLUSH,
    /// the timer, a mover step): then `Ok(None)` at once, so a caller holding the disk's I/O
    /// paused can resume it, [`wait_commit`](Parallax::wait_commit) and try again.
    pub fn try_capture_snapshot(&self, name: &str) -> Result<Option<SnapshotCommit<'_>>> {
        check_snapshot_name(name)?;
        match self.inner.try_turn() {
            Some(turn) => self.capture_snapshot_in(turn, name).map(Some),
            None => Ok(None),
        }
    }

    /// Waits until no commit runs (it may start another at once).
    pub fn wait_commit(&self) {
        drop(
            self.inner
                .committing
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
    }

    fn capture_snapshot_in<'a>(
        &'a self,
        turn: commit::Turn<'a>,
        name: &str,
    ) -> Result<SnapshotCommit<'a>> {
        let inner = &*self.inner;
        let mut st = inner.write_io();
        let mut cache = inner.cache();
        if st.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot named {name:?} exists already"
            )));
        }
        let mut record = None;
        // parallax-v2: the capture writes the annotation pages into the tree first, so the
        // snapshot holds them (writing them changes the root): the record names the root as
        // it is after them.
        let cap = inner.capture_with(&mut st, &mut cache, |st| {
            let r = SnapshotRecord {
                name: name.to_string(),
                root: st.root,
                gen: st.gen + 1,
                created: now_secs(),
            };
            let mut list = st.snapshots.clone();
            list.push(r.clone());
            record = Some(r);
            list
        })?;
        let record =
            record.ok_or_else(|| Error::Corrupt("snapshot record not captured".to_string()))?;
        // Every block in use now is reachable from the captured tree (so from the new
        // snapshot), from an older snapshot, or pending release by this commit: later writes
        // must copy, never free, the snapshot's blocks (the pending ones are released by the
        // commit all the same). Marked at the capture, not once durable: writes go on
        // meanwhile. If the commit fails, the marks stay: the blocks they cover are only
        // freed by the next sweep (at the next open or snapshot deletion).
        st.alloc.shared = st.alloc.used.clone();
        Ok(SnapshotCommit {
            inner,
            turn: Some(turn),
            cap: Some(cap),
            info: SnapshotInfo::from(&record),
        })
    }

    /// The snapshots, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.inner
            .read()
            .snapshots
            .iter()
            .map(SnapshotInfo::from)
            .collect()
    }

    /// Deletes a snapshot (committing the live tree with the new list, like a FLUSH: requests
    /// go on meanwhile), then sweeps to free the blocks only it referenced
    /// ([`Inner::sweep_concurrent`]: the trees are walked without the state lock).
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let inner = &*self.inner;
        let turn = inner.turn();
        let cap = {
            let mut st = inner.write_io();
            let mut cache = inner.cache();
            let list: Vec<SnapshotRecord> = st
                .snapshots
                .iter()
                .filter(|s| s.name != name)
                .cloned()
                .collect();
            if list.len() == st.snapshots.len() {
                return Err(Error::NoSuchSnapshot(name.to_string()));
            }
            let cap = inner.capture(&mut st, &mut cache, list)?;
            // From this instant on, the blocks marked shared that the live tree stops
            // referencing are the sweep's to judge: it frees those the deleted snapshot
            // alone held (left unrecorded, they would stay allocated until another sweep).
            st.sweeping = Some(Vec::new());
            cap
        };
        // The commit lock stays held through the sweep: no commit frees or reuses a block of
        // the committed trees while they are walked.
        inner.end_turn(&turn, cap, |st| st.sweeping = None)?;
        inner.sweep_concurrent()?;
        drop(turn);
        log::info!(
            "parallax-v1: {}: deleted snapshot {name:?}",
            inner.space.key()
        );
        Ok(())
    }

    /// A read-only view of the snapshot `name`. It fails its reads once the snapshot is deleted.
    pub fn open_snapshot(&self, name: &str) -> Result<ParallaxSnapshot> {
        let st = self.inner.read();
        let record = st
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NoSuchSnapshot(name.to_string()))?;
        Ok(ParallaxSnapshot {
            inner: self.inner.clone(),
            record,
        })
    }
}

fn check_snapshot_name(name: &str) -> Result<()> {
    dovetail_store::names::check_name(dovetail_store::names::NameKind::Snapshot, name)
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// A snapshot captured by [`Parallax::capture_snapshot`], committed by
/// [`commit`](SnapshotCommit::commit). Dropped without it, the capture is kept for the next
/// commit to write (as after a failed commit), without the snapshot.
pub struct SnapshotCommit<'a> {
    inner: &'a Inner,
    turn: Option<commit::Turn<'a>>,
    cap: Option<tree::Captured>,
    info: SnapshotInfo,
}

impl fmt::Debug for SnapshotCommit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotCommit")
            .field("key", &self.inner.space.key())
            .field("snapshot", &self.info)
            .finish_non_exhaustive()
    }
}

impl SnapshotCommit<'_> {
    /// The snapshot as it will be listed.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Writes the captured nodes, syncs the space and commits the root record that lists the
    /// snapshot (without the state lock), then frees the blocks the commit superseded.
    pub fn commit(mut self) -> Result<SnapshotInfo> {
        let (Some(turn), Some(cap)) = (self.turn.take(), self.cap.take()) else {
            return Err(Error::Corrupt("snapshot committed twice".to_string()));
        };
        let inner = self.inner;
        dovetail_store::failpoint::hit("parallax-snapshot");
        inner.end_turn(&turn, cap, |_| {})?;
        drop(turn);
        log::info!(
            "parallax-v1: {}: snapshot {:?} at generation {}",
            inner.space.key(),
            self.info.name,
            self.info.generation
        );
        Ok(self.info.clone())
    }
}

impl Drop for SnapshotCommit<'_> {
    fn drop(&mut self) {
        if let (Some(turn), Some(cap)) = (self.turn.take(), self.cap.take()) {
            let abandoned = Err(Error::InvalidArgument(format!(
                "snapshot {:?} abandoned before its commit",
                self.info.name
            )));
            let _ = self.inner.end_turn_with(&turn, cap, abandoned, |_| {});
        }
    }
}

impl ParallaxSnapshot {
    /// The snapshot this view reads.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo::from(&self.record)
    }
}

impl BlockLayout for ParallaxSnapshot {
    fn capacity(&self) -> Sectors {
        self.inner.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        let st = self.inner.read();
        // The snapshot's blocks stay allocated only while it exists.
        if !st.snapshots.contains(&self.record) {
            return Err(Error::NoSuchSnapshot(self.record.name.clone()));
        }
        self.inner.read_tree(
            &st,
            self.record.root,
            self.record.gen,
            at.0 * SECTOR_SIZE,
            buf,
        )
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        check_range(at, buffer_sectors(buf.len())?, self.inner.capacity)?;
        Err(Error::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        check_range(at, len, self.inner.capacity)?;
        Err(Error::ReadOnly)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, _unmap: bool) -> Result<()> {
        check_range(at, len, self.inner.capacity)?;
        Err(Error::ReadOnly)
    }
}
