//! Grants: an extent given to a version (zeroed and committed), taken back (ungrant), and
//! the freed extents' space released.

use super::*;

impl Store {
    /// Takes extent `extent` back from version `key`, whose layout references no block of it
    /// in any committed root record or snapshot any more (the layout's commit that stopped
    /// naming it must be durable before this is called): one crash-safe catalog commit frees
    /// it, the grant cache forgets it (a later write of the version there is a grant
    /// violation) and its space is released. Refused with [`StoreError::Invalid`] unless the
    /// extent is granted to `key`.
    pub fn ungrant(&self, key: VersionKey, extent: ExtentId) -> Result<()> {
        self.writable()?;
        let mut st = self.lock_state();
        let vi = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        let e = extent.0;
        if st.meta.owners.get(e as usize) != Some(&key.0) {
            return Err(StoreError::Invalid(format!(
                "{extent} is not granted to {key}: it cannot be given back"
            )));
        }
        let mut new = st.meta.clone();
        new.owners[e as usize] = 0;
        new.versions[vi].extents.retain(|&x| x != e);
        crate::failpoint::hit("store-ungrant");
        self.commit_freeing(&mut st, new, &[e], &[])?;
        debug!(
            "{key} gave back extent {e} (tier {})",
            self.tiers[self.tier_of(e)].name
        );
        Ok(())
    }

    /// Releases the space of the extents a [`Store::promote_deferred`] freed (see
    /// [`Freed`]). Extents granted again in the meantime are left alone.
    pub fn release(&self, freed: Freed) {
        if freed.extents.is_empty() || self.read_only {
            return;
        }
        // One extent at a time: the state lock (which a grant needs) is held for one hole
        // punch at most, not for the whole list.
        for &e in &freed.extents {
            let st = self.lock_state();
            self.release_extents(&st, &[e]);
        }
        debug!(
            "released the space of {} freed extents",
            freed.extents.len()
        );
    }

    /// Writes refused so far for lack of a grant, by any space of version `key`.
    pub fn grant_violations(&self, key: VersionKey) -> u64 {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.0)
            .map_or(0, |c| c.violations.load(Ordering::Relaxed))
    }

    /// Grants `key` the lowest free extent of the store (`tier` `None`: [`StoreError::Full`]
    /// if there is none) or of tier `tier` ([`StoreError::TierFull`]).
    pub(super) fn grant(&self, key: VersionKey, tier: Option<usize>) -> Result<ExtentId> {
        self.writable()?;
        let range = match tier {
            None => 0..self.header.extent_count,
            Some(t) => self
                .tiers
                .get(t)
                .ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "the store has no tier {t} (it has {}: {})",
                        self.tiers.len(),
                        self.tiers
                            .iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
                .range(),
        };
        if self.is_shared() {
            return self.grant_shared(key, range, tier);
        }
        // The extent is chosen under the metadata lock, zeroed without it (other versions'
        // root commits and grants go on meanwhile), then granted under it.
        let e = {
            let st = self.lock_state();
            st.meta
                .version_index(key.0)
                .map_err(|_| StoreError::NoSuchVersion(key))?;
            let mut granting = self.granting.lock().unwrap_or_else(|p| p.into_inner());
            let Some(e) = range
                .clone()
                .find(|&e| st.meta.owners.get(e as usize) == Some(&0) && !granting.contains(&e))
            else {
                return Err(match tier {
                    None => StoreError::Full,
                    Some(t) => StoreError::TierFull(self.tiers[t].name.clone()),
                });
            };
            granting.push(e);
            e
        };
        let done = self.grant_zeroed(key, e);
        self.granting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&g| g != e);
        done?;
        let t = &self.tiers[self.tier_of(e)];
        debug!("granted extent {e} (tier {}) to {key}", t.name);
        Ok(ExtentId(e))
    }

    /// Zeroes extent `e` (a hole: no data written, and not synced), then grants it to `key`
    /// in one metadata commit.
    ///
    /// The zeroing is not synced here: with gigabytes of dirty pages in the tier file an
    /// `fdatasync` takes seconds, and it is not needed. A granted extent reads as zeros at once
    /// (the hole is in the page cache and the file's extent map), so nothing a former owner
    /// wrote shows through while the store is open. After a crash the hole may be lost and the
    /// extent hold the former owner's bytes again, but no reader ever sees them: a layout
    /// reads a block of its extents only through a pointer of its committed tree (or of its
    /// live tree, to data it wrote in this run), and it commits a pointer only after a sync of
    /// the block's tier file that followed the block's write, which followed this zeroing; a
    /// block no pointer names is never read, neither by the guest nor by `store check --data`,
    /// the copy-out, the verification pass or the scrub. docs/format.md (*Grant*) and
    /// SECURITY.md give the whole argument.
    fn grant_zeroed(&self, key: VersionKey, e: u32) -> Result<()> {
        let size = self.header.extent_size;
        let ti = self.tier_of(e);
        let t = &self.tiers[ti];
        t.file
            .zero_range(u64::from(e - t.first) * size, size)
            .map_err(io_err(format!(
                "zeroing extent {e} (tier {}, {}) before granting it",
                t.name,
                t.path.display()
            )))?;
        let mut st = self.lock_state();
        let vi = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        if st.meta.owners.get(e as usize) != Some(&0) {
            return Err(StoreError::Invalid(format!(
                "extent {e} was taken while being zeroed for {key}"
            )));
        }
        let mut new = st.meta.clone();
        new.owners[e as usize] = key.0;
        new.versions[vi].extents.push(e);
        self.commit(&mut st, new)?;
        self.grants_write()[e as usize] = key.0;
        Ok(())
    }
}
