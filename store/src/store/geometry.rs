//! The store's geometry: its location, extent size, tiers, and where an extent lies.

use super::*;

impl Store {
    /// Where the store lives (its metadata file).
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// Geometry and state, tiers included.
    pub fn info(&self) -> StoreInfo {
        let st = self.lock_state();
        StoreInfo {
            format_version: self.header.version,
            uuid: self.header.uuid,
            extent_size: self.header.extent_size,
            extent_count: self.header.extent_count,
            free_extents: st.meta.free_extents(),
            generation: st.generation,
            tiers: tier_status(&self.header, self.dir.as_deref(), &st.meta.owners)
                .into_iter()
                .zip(&self.tiers)
                // The path the tier was opened by (the same for a file store; the data
                // objects' names for a store on RADOS).
                .map(|(s, t)| TierStatus {
                    path: t.path.clone(),
                    ..s
                })
                .collect(),
        }
    }

    /// The tiers, in index (and extent) order, with their free extents now.
    pub fn tiers(&self) -> Vec<TierInfo> {
        let g = self.grants_read();
        self.tiers
            .iter()
            .map(|t| TierInfo {
                name: t.name.clone(),
                extents: t.extents,
                free: free_in(&g, t.range()),
            })
            .collect()
    }

    /// Each tier's data file, in tier order (as [`TierStatus::path`]).
    pub fn tier_paths(&self) -> Vec<PathBuf> {
        self.tiers.iter().map(|t| t.path.clone()).collect()
    }

    /// The index of the tier holding `extent` (the last tier for an extent past the store).
    pub fn extent_tier(&self, extent: ExtentId) -> usize {
        self.tier_of(extent.0)
    }

    pub(super) fn tier_of(&self, e: u32) -> usize {
        self.tiers
            .iter()
            .position(|t| e < t.first + t.extents)
            .unwrap_or(self.tiers.len() - 1)
    }

    /// Bytes per extent.
    pub fn extent_size(&self) -> u64 {
        self.header.extent_size
    }

    /// The tier of `extent` and the byte position of `[offset, offset + len)` of the extent in
    /// that tier's data file, if it lies inside the extent.
    pub(super) fn locate(&self, extent: ExtentId, offset: u64, len: usize) -> Result<(usize, u64)> {
        let oob = StoreError::OutOfBounds {
            extent,
            offset,
            len,
        };
        if extent.0 >= self.header.extent_count {
            return Err(oob);
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.header.extent_size => {
                let t = self.tier_of(extent.0);
                let local = u64::from(extent.0 - self.tiers[t].first);
                Ok((t, local * self.header.extent_size + offset))
            }
            _ => Err(oob),
        }
    }
}
