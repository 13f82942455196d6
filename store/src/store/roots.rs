//! Root records: each version's layout root, read from the catalog and committed.

use super::*;

impl Store {
    pub(super) fn root(&self, key: VersionKey) -> Vec<u8> {
        self.lock_state()
            .meta
            .version(key.0)
            .map(|v| v.root.clone())
            .unwrap_or_default()
    }

    pub(super) fn commit_root(&self, key: VersionKey, record: &[u8]) -> Result<()> {
        self.writable()?;
        if record.len() > MAX_ROOT {
            return Err(StoreError::RootTooLarge {
                len: record.len(),
                max: MAX_ROOT,
            });
        }
        let mut st = self.lock_state();
        let i = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        let mut new = st.meta.clone();
        new.versions[i].root = record.to_vec();
        self.commit(&mut st, new)
    }
}
