//! Snapshots: taken, listed, deleted, and opened as read-only views.

use super::*;

impl Parallax {
    /// Freezes the disk as it is now under `name`: commits, then records the committed root as
    /// a snapshot (in the same root record). Later writes copy the paths they change.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        dovetail_store::names::check_name(dovetail_store::names::NameKind::Snapshot, name)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let inner = &*self.inner;
        let mut st = inner.write();
        let mut cache = inner.cache();
        if st.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot named {name:?} exists already"
            )));
        }
        // parallax-v2: the annotation pages go into the tree first, so the snapshot holds
        // them (writing them changes the root).
        inner.write_annotations(&mut st, &mut cache)?;
        let record = SnapshotRecord {
            name: name.to_string(),
            root: st.root,
            gen: st.gen + 1,
            created: now_secs(),
        };
        let mut list = st.snapshots.clone();
        list.push(record.clone());
        dovetail_store::failpoint::hit("parallax-snapshot");
        inner.commit(&mut st, &mut cache, list)?;
        // Every block in use is now reachable from the committed root (so from the new
        // snapshot) or from an older snapshot.
        st.alloc.shared = st.alloc.used.clone();
        log::info!(
            "parallax-v1: {}: snapshot {name:?} at generation {}",
            inner.space.key(),
            record.gen
        );
        Ok(SnapshotInfo::from(&record))
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

    /// Deletes a snapshot (committing the live tree with the new list), then sweeps to free the
    /// blocks only it referenced.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let inner = &*self.inner;
        let mut st = inner.write();
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
        inner.commit(&mut st, &mut cache, list)?;
        inner.sweep(&mut st, &mut cache)?;
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
