//! The metadata commit: the catalog lock, the grant cache's locks, and a new catalog
//! written to the older slot, synced, and installed.

use super::*;

impl Store {
    pub(super) fn grants_read(&self) -> RwLockReadGuard<'_, Vec<u64>> {
        self.grants.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn grants_write(&self) -> RwLockWriteGuard<'_, Vec<u64>> {
        self.grants.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Commits `new` as the next generation: the whole payload goes to the slot not holding
    /// the newest generation, then the metadata file is synced; only then does `new` become
    /// the in-memory catalog. If anything fails, the catalog stays as it was (the slot written
    /// to is the older one, so the newest durable state is untouched; the next commit
    /// rewrites that slot whole).
    pub(super) fn commit(&self, st: &mut MetaState, new: Meta) -> Result<()> {
        self.writable()?;
        // In the header's format: 5, or 2 for a version-2 store kept as it is (whose catalog
        // cannot hold an attachment record: refused here, before anything is written).
        let payload = new.encode_for(self.header.version)?;
        let max = self.header.max_payload();
        if payload.len() > max {
            return Err(StoreError::MetadataFull {
                needed: payload.len(),
                max,
            });
        }
        let generation = st.generation + 1;
        // A shared open: the change lock held, and the disks the change touches owned here.
        let asserted = match self.multi.get() {
            Some(m) => Some((m, m.check_commit(self, st, &new)?)),
            None => None,
        };
        if let Some(r) = self.rados_meta() {
            // One compound operation on the metadata object: no slots.
            match &asserted {
                Some((m, disks)) => {
                    m.rados_commit(r, st.generation, generation, &payload, disks)?
                }
                None => r.commit(st.generation, generation, &payload)?,
            }
            crate::failpoint::hit("store-commit-synced");
            st.meta = new;
            st.generation = generation;
            return Ok(());
        }
        let target = 1 - st.newest;
        let slot = encode_slot(self.header.version, generation, &payload);
        self.meta_file
            .write_at(self.header.slot_offset(target), &slot)
            .and_then(|()| {
                crate::failpoint::hit("store-commit-unsynced");
                self.meta_file.sync()
            })
            .map_err(io_err(format!(
                "committing metadata generation {generation} to slot {}",
                slot_name(target)
            )))?;
        crate::failpoint::hit("store-commit-synced");
        let removed = new.versions.len() < st.meta.versions.len();
        // The pool's lock only when versions come or go (a root commit holds it here).
        let versions_changed = new.versions.len() != st.meta.versions.len()
            || new
                .versions
                .iter()
                .zip(&st.meta.versions)
                .any(|(a, b)| a.key != b.key);
        st.meta = new;
        st.generation = generation;
        st.newest = target;
        if removed {
            self.pool_forget_removed(&st.meta);
        }
        if versions_changed {
            self.pool_mem().note_versions(&st.meta);
        }
        Ok(())
    }

    /// Commits `new`, which frees `freed` and drops `dropped` versions; then drops those
    /// extents from the grant cache, releases their space and removes the dropped versions'
    /// presence maps.
    pub(super) fn commit_freeing(
        &self,
        st: &mut MetaState,
        new: Meta,
        freed: &[u32],
        dropped: &[u64],
    ) -> Result<()> {
        self.commit_dropping(st, new, freed, dropped)?;
        self.release_extents(st, freed);
        Ok(())
    }

    /// The catalog half of [`Store::commit_freeing`]: commits `new`, drops the freed extents
    /// from the grant cache (no space of a dropped version can write them from here on) and
    /// removes the dropped versions' presence maps. The extents' space is not released.
    pub(super) fn commit_dropping(
        &self,
        st: &mut MetaState,
        new: Meta,
        freed: &[u32],
        dropped: &[u64],
    ) -> Result<()> {
        self.commit(st, new)?;
        {
            let mut g = self.grants_write();
            for &e in freed {
                g[e as usize] = 0;
            }
        }
        for &key in dropped {
            self.remove_map(VersionKey(key));
        }
        // A dropped version's write and sync counters go with it (a key is never reused): a
        // daemon creating and deleting disks all day keeps none of them.
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        for key in dropped {
            shared.remove(key);
        }
        Ok(())
    }

    /// Releases the space (punches holes) of extents the catalog lists as free. An extent
    /// granted again since it was freed is skipped: its new owner's grant zeroed it already,
    /// and it may hold the new owner's data by now. Releasing is only about space: a grant
    /// zeroes an extent before handing it out, whatever this did or did not do, and no layout
    /// reads a block of its extent it has not written and synced ([`Store::grant_zeroed`]).
    pub(super) fn release_extents(&self, st: &MetaState, freed: &[u32]) {
        for &e in freed {
            if st.meta.owners.get(e as usize) != Some(&0) {
                continue;
            }
            let t = self.tier_of(e);
            let tier = &self.tiers[t];
            let at = u64::from(e - tier.first) * self.header.extent_size;
            if let Err(err) = tier.file.zero_range(at, self.header.extent_size) {
                warn!(
                    "could not release the space of freed extent {e} (tier {}, {}): {err}",
                    tier.name,
                    tier.path.display()
                );
            }
        }
    }
}
