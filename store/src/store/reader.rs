//! Reader mode: a store opened read-only beside a writer, without the lock.

use super::*;

impl Store {
    /// Opens the store in `dir` read-only, also while a writer holds it (a daemon serving it,
    /// an offline command changing it): then without a lock, from the last committed metadata.
    /// Both A/B metadata slots are checksummed and a commit writes the older one, so a commit
    /// in progress leaves the last one readable. [`Store::beside_writer`] says which open
    /// happened. Beside a writer, blocks the read commit uses stay as they are until the
    /// writer's next commit: whoever reads them (a tree walk) compares
    /// [`Store::committed_generation`] with the generation it read ([`Store::info`]) after
    /// reading, and reads again if it changed. Every change is refused.
    pub fn open_reader(dir: &Path) -> Result<Arc<Store>> {
        if let Some(url) = crate::rados::RadosUrl::of(dir) {
            // Read-only needs no lock on RADOS: a commit replaces the catalog atomically.
            return Store::open_rados(&url?, true, true);
        }
        match Store::open_mode(dir, true, false) {
            Err(StoreError::InUse(_)) => {
                let (meta, meta_path) = open_meta_unlocked(dir)?;
                Store::open_files_as(dir, meta, meta_path, true, true, false)
            }
            r => r,
        }
    }

    /// Whether this store was opened beside a writer ([`Store::open_reader`]).
    pub fn beside_writer(&self) -> bool {
        self.beside_writer
    }

    /// The generation of the newest commit in the metadata file now (a writer beside this
    /// reader may have committed since it was opened).
    pub fn committed_generation(&self) -> Result<u64> {
        if let Some(r) = self.rados_meta() {
            return r.generation();
        }
        let slots = [
            read_slot(&*self.meta_file, &self.header, 0)?,
            read_slot(&*self.meta_file, &self.header, 1)?,
        ];
        match &slots[newest(&slots)?] {
            Slot::Valid { generation, .. } => Ok(*generation),
            _ => Err(StoreError::Corrupt("no valid metadata slot".into())),
        }
    }
}
