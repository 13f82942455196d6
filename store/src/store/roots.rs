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

    /// Commits version `key`'s root record, with every share and release of shared blocks it
    /// made so far ([`Store::commit_root_cut`]).
    pub(super) fn commit_root(&self, key: VersionKey, record: &[u8]) -> Result<()> {
        self.commit_root_cut(key, record, u64::MAX)
    }
}
