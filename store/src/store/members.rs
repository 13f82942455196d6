//! The members of a disk's voting Tee beyond its candidate (format version 7; docs/format.md,
//! *Tee members*): adding one (a new version of the disk), changing its state, removing it
//! (its extents freed), and making a member the trusted version. Each is one metadata commit,
//! so a daemon killed at any moment restarts with the membership of the last one.

use super::*;
use crate::format::{MemberRec, MemberState, MAX_EXTRA_MEMBERS, MEMBERS_VERSION, SHARED_VERSION};

impl Store {
    /// Lets this store record tee members beyond the candidate, durably: a format-5 or -6
    /// store is upgraded in place to format 7 (a format-5 store through 6, each step the two
    /// synced writes of every upgrade: docs/format.md, *Upgrade to format version 7*), which
    /// needs this to be the only handle on the store (it is reopened on the same files and
    /// returned). A format-7 store is returned as it is; an older one, or a store on RADOS,
    /// is refused.
    pub fn enable_members(self: Arc<Self>) -> Result<Arc<Store>> {
        self.writable()?;
        self.refuse_members_on_rados()?;
        let from = self.header.version;
        if from >= MEMBERS_VERSION {
            return Ok(self);
        }
        if from != ATTACH_VERSION && from != SHARED_VERSION {
            return Err(StoreError::Invalid(format!(
                "tee members need a store of format version {ATTACH_VERSION} to \
                 {MEMBERS_VERSION}; this one is version {from} (a read-write open upgrades it \
                 to {ATTACH_VERSION} first)"
            )));
        }
        let store = Arc::try_unwrap(self).map_err(|_| {
            StoreError::Invalid(
                "the store is in use (another handle is open): tee members are turned on with \
                 the store to itself (`dovetail store upgrade --voting` while no daemon serves it)"
                    .into(),
            )
        })?;
        let st = store.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let (mut header, mut newest, mut generation) =
            (store.header.clone(), st.newest, st.generation);
        for to in (from + 1)..=MEMBERS_VERSION {
            let (h, n) = upgrade(&*store.meta_file, &header, &st.meta, newest, generation, to)?;
            crate::failpoint::hit("store-upgrade-members");
            header = h;
            newest = n;
            generation += 1;
        }
        info!(
            "{}: upgraded the store from format version {from} to {MEMBERS_VERSION} (tees of \
             up to 5 members)",
            store.location.display()
        );
        let data = store.tiers.into_iter().map(|t| t.file).collect();
        Store::load_as(
            store.meta_file,
            data,
            store.location,
            store.dir,
            false,
            false,
        )
    }

    /// `disk`'s tee members after its candidate (members 2 and up), in member order.
    pub fn members(&self, disk: &str) -> Result<Vec<MemberRec>> {
        self.lock_state()
            .meta
            .disk(disk)
            .map(|d| d.members.clone())
            .ok_or_else(|| StoreError::NoSuchDisk(disk.to_string()))
    }

    /// Adds a new version of `layout` to `disk`'s voting Tee as its last member, in state
    /// `filling`, and returns its key. The disk must be teed (a candidate and a tee record)
    /// and have fewer than five members; the store must be of format version 7.
    pub fn add_member(&self, disk: &str, layout: &str) -> Result<VersionKey> {
        self.writable()?;
        self.refuse_members_on_rados()?;
        check_layout_name(layout)?;
        if self.header.version < MEMBERS_VERSION {
            return Err(StoreError::Invalid(format!(
                "this store is of format version {}, which records no tee members beyond the \
                 candidate; `dovetail store upgrade --voting DIR` (with no daemon serving it) \
                 upgrades it to format version {MEMBERS_VERSION}",
                self.header.version
            )));
        }
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let d = &st.meta.disks[i];
        if d.candidate == 0 || d.tee.is_none() {
            return Err(StoreError::NoTee(disk.to_string()));
        }
        if d.members.len() >= MAX_EXTRA_MEMBERS {
            return Err(StoreError::Invalid(format!(
                "disk {disk:?}'s tee has {} members already, the most a tee takes",
                d.members.len() + 2
            )));
        }
        let mut new = st.meta.clone();
        let key = Store::new_version(&mut new, disk, layout)?;
        new.disks[i].members.push(MemberRec {
            key,
            state: MemberState::Filling,
            changed: now(),
        });
        self.commit(&mut st, new)?;
        crate::failpoint::hit("store-member-added");
        info!("disk {disk:?}: tee member version {key} ({layout}) added, filling");
        Ok(VersionKey(key))
    }

    /// Sets the state of `disk`'s tee member `key` (one of the members after the candidate:
    /// the candidate's state is the tee record's, [`Store::quarantine`]). The same state is a
    /// no-op; a quarantined member stays quarantined.
    pub fn set_member_state(&self, disk: &str, key: VersionKey, state: MemberState) -> Result<()> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let Some(j) = st.meta.disks[i].members.iter().position(|m| m.key == key.0) else {
            return Err(StoreError::Invalid(format!(
                "disk {disk:?} has no tee member {key} after its candidate"
            )));
        };
        let old = st.meta.disks[i].members[j].state;
        if old == state || old == MemberState::Quarantined {
            return Ok(());
        }
        let mut new = st.meta.clone();
        new.disks[i].members[j].state = state;
        new.disks[i].members[j].changed = now();
        self.commit(&mut st, new)?;
        info!("disk {disk:?}: tee member {key} {old} -> {state}");
        Ok(())
    }

    /// Removes tee member `key` of `disk` (its version dropped, extents freed, presence map
    /// removed) in one commit. The candidate may be removed when members follow it: the first
    /// of them becomes the candidate (its state the tee record's: quarantined stays
    /// quarantined, anything else is active; the tee record's fault rules, which were the
    /// removed candidate's, are cleared). The trusted version is not a member one can
    /// remove (promote another member first); a tee keeps at least its candidate (`untee`
    /// drops the whole Tee).
    pub fn remove_member(&self, disk: &str, key: VersionKey) -> Result<()> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let d = &st.meta.disks[i];
        if key.0 == d.trusted {
            return Err(StoreError::Invalid(format!(
                "{key} is disk {disk:?}'s trusted version: promote another member first"
            )));
        }
        let mut new = st.meta.clone();
        let nd = &mut new.disks[i];
        if key.0 == nd.candidate && nd.candidate != 0 {
            if nd.members.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "{key} is disk {disk:?}'s last candidate: `untee` drops the Tee"
                )));
            }
            let next = nd.members.remove(0);
            nd.candidate = next.key;
            if let Some(t) = nd.tee.as_mut() {
                // The fault rules were the removed candidate's (testing).
                t.faults.clear();
                if next.state == MemberState::Quarantined {
                    t.state = TeeState::Quarantined;
                    if t.reason.is_empty() {
                        t.reason = "quarantined while a later member of a voting tee".into();
                    }
                } else {
                    t.state = TeeState::Active;
                    t.reason.clear();
                }
                t.changed = now();
            }
        } else if let Some(j) = nd.members.iter().position(|m| m.key == key.0) {
            nd.members.remove(j);
        } else {
            return Err(StoreError::Invalid(format!(
                "{key} is not a member of disk {disk:?}'s tee"
            )));
        }
        let freed = remove_version(&mut new, key.0);
        crate::failpoint::hit("store-member-remove");
        self.commit_freeing(&mut st, new, &freed, &[key.0])?;
        info!(
            "disk {disk:?}: tee member {key} removed ({} extents freed)",
            freed.len()
        );
        Ok(())
    }

    /// Makes tee member `key` (the candidate or a later member) `disk`'s trusted version in
    /// one commit; the former trusted version takes the member's place, in the member's
    /// state. The caller checks that the member holds every block. The catalog swap only:
    /// the versions keep their extents.
    pub fn promote_member(&self, disk: &str, key: VersionKey) -> Result<()> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let mut new = st.meta.clone();
        let nd = &mut new.disks[i];
        let old = nd.trusted;
        if key.0 == old {
            return Ok(());
        }
        if key.0 == nd.candidate && nd.candidate != 0 {
            nd.candidate = old;
        } else if let Some(m) = nd.members.iter_mut().find(|m| m.key == key.0) {
            m.key = old;
            m.state = MemberState::Voting;
            m.changed = now();
        } else {
            return Err(StoreError::Invalid(format!(
                "{key} is not a member of disk {disk:?}'s tee"
            )));
        }
        nd.trusted = key.0;
        self.commit(&mut st, new)?;
        info!("disk {disk:?}: tee member {key} is the trusted version, {old} a member");
        Ok(())
    }
}
