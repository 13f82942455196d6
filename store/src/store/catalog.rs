//! The catalog of disks, versions and tees: reading it and changing it, one commit each.

use super::*;

impl Store {
    /// Removes version `key`'s presence map file, if the store has a directory and the file
    /// exists. Failures are logged, not returned: the catalog change that dropped the version
    /// is already committed, and a left-over map file is harmless (keys are never reused).
    pub(super) fn remove_map(&self, key: VersionKey) {
        if let Some(r) = &self.rados {
            let name = format!("{}.map", key.0);
            match crate::rados::RadosDir::of_records(r.records.clone()).remove(&name) {
                Ok(true) => debug!("removed presence map {name} of {}", r.url),
                Ok(false) => {}
                Err(e) => warn!(
                    "could not remove the presence map {name} of dropped {key} from {}: {e}",
                    r.url
                ),
            }
            return;
        }
        if self.dir.is_none() {
            return;
        }
        let path = self.map_path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => debug!("removed presence map {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                "could not remove the presence map {} of dropped {key}: {e}",
                path.display()
            ),
        }
    }

    /// The location of version `key`'s presence map file: `<store dir>/maps/<key>.map`
    /// (docs/format.md, "Presence map"). The store creates the `maps/` directory and removes
    /// the map of every version it drops; the file itself is written by whoever tracks the
    /// version's blocks. A store over given files (`create_on`, `open_on`) has no directory:
    /// its map paths are under a relative `(store)/maps/` that does not exist, and it never
    /// removes any file.
    ///
    /// A store on RADOS answers `rados:POOL/NAME/maps/<key>.map`: its records are objects
    /// (`dovetail_store::rados::RadosDir`), written through this handle's client.
    pub fn map_path(&self, key: VersionKey) -> PathBuf {
        if let Some(r) = &self.rados {
            crate::rados::register_records(&r.records, Some(key.0));
            return r
                .url
                .path()
                .join(crate::rados::MAPS)
                .join(format!("{}.map", key.0));
        }
        self.dir
            .as_deref()
            .unwrap_or(Path::new("(store)"))
            .join(MAPS_DIR)
            .join(format!("{}.map", key.0))
    }

    pub(crate) fn disk_info(meta: &Meta, d: &DiskRec) -> DiskInfo {
        DiskInfo {
            name: d.name.clone(),
            size: d.size,
            layout: meta
                .version(d.trusted)
                .map(|v| v.layout.clone())
                .unwrap_or_default(),
            trusted: VersionKey(d.trusted),
            candidate: (d.candidate != 0).then_some(VersionKey(d.candidate)),
            tee: d.tee.clone(),
        }
    }

    pub(crate) fn version_info(v: &VersionRec) -> VersionInfo {
        VersionInfo {
            key: VersionKey(v.key),
            disk: v.disk.clone(),
            layout: v.layout.clone(),
            extents: v.extents.iter().map(|&e| ExtentId(e)).collect(),
            root_len: v.root.len(),
        }
    }

    /// Every disk, by name.
    pub fn disks(&self) -> Vec<DiskInfo> {
        let st = self.lock_state();
        st.meta
            .disks
            .iter()
            .map(|d| Store::disk_info(&st.meta, d))
            .collect()
    }

    /// One disk.
    pub fn disk(&self, name: &str) -> Result<DiskInfo> {
        let st = self.lock_state();
        st.meta
            .disk(name)
            .map(|d| Store::disk_info(&st.meta, d))
            .ok_or_else(|| StoreError::NoSuchDisk(name.to_string()))
    }

    /// Every version, by key.
    pub fn versions(&self) -> Vec<VersionInfo> {
        self.lock_state()
            .meta
            .versions
            .iter()
            .map(Store::version_info)
            .collect()
    }

    /// One version.
    pub fn version(&self, key: VersionKey) -> Result<VersionInfo> {
        self.lock_state()
            .meta
            .version(key.0)
            .map(Store::version_info)
            .ok_or(StoreError::NoSuchVersion(key))
    }

    pub(super) fn new_version(meta: &mut Meta, disk: &str, layout: &str) -> Result<u64> {
        let key = meta.next_key;
        meta.next_key = key
            .checked_add(1)
            .ok_or_else(|| StoreError::Invalid("version keys are exhausted".into()))?;
        let rec = VersionRec {
            key,
            disk: disk.to_string(),
            layout: layout.to_string(),
            extents: Vec::new(),
            root: Vec::new(),
        };
        match meta.version_index(key) {
            Err(pos) => meta.versions.insert(pos, rec),
            Ok(_) => {
                return Err(StoreError::Corrupt(format!(
                    "version key {key} is already in use"
                )))
            }
        }
        Ok(key)
    }

    /// Adds disk `name` of `size_bytes` (a positive multiple of 4096) and its first version,
    /// trusted, of `layout`, with an empty root record (the layout formats it on first use).
    /// Returns the version's key.
    pub fn create_disk(&self, name: &str, size_bytes: u64, layout: &str) -> Result<VersionKey> {
        self.create_disk_with_root(name, size_bytes, layout, &[])
    }

    /// [`Store::create_disk`] with the first version's root record `root` (its layout's
    /// empty disk: `Parallax::initial_root`) in the same commit: one sync makes the disk
    /// durable and formatted, and its first open commits nothing. An empty `root` is
    /// [`Store::create_disk`]'s unformatted version.
    pub fn create_disk_with_root(
        &self,
        name: &str,
        size_bytes: u64,
        layout: &str,
        root: &[u8],
    ) -> Result<VersionKey> {
        self.writable()?;
        if root.len() > MAX_ROOT {
            return Err(StoreError::RootTooLarge {
                len: root.len(),
                max: MAX_ROOT,
            });
        }
        check_disk_name(name)?;
        check_layout_name(layout)?;
        if size_bytes == 0 || size_bytes % DISK_ALIGN != 0 {
            return Err(StoreError::Invalid(format!(
                "disk size {size_bytes} is not a positive multiple of {DISK_ALIGN} bytes"
            )));
        }
        let mut st = self.lock_state();
        let Err(pos) = st.meta.disk_index(name) else {
            return Err(StoreError::DiskExists(name.to_string()));
        };
        let mut new = st.meta.clone();
        let key = Store::new_version(&mut new, name, layout)?;
        if let Ok(v) = new.version_index(key) {
            new.versions[v].root = root.to_vec();
        }
        new.disks.insert(
            pos,
            DiskRec {
                name: name.to_string(),
                size: size_bytes,
                trusted: key,
                candidate: 0,
                tee: None,
                attach: None,
                members: Vec::new(),
            },
        );
        self.commit(&mut st, new)?;
        info!("created disk {name:?} ({size_bytes} bytes), trusted version {key} ({layout})");
        Ok(VersionKey(key))
    }

    /// Sets disk `name`'s size to `size_bytes` (a multiple of 4096, not below its size, at
    /// most the store's whole capacity: extent size times extents) in one commit, and returns
    /// the size it had. The catalog's size is the disk's intended size: every open of its
    /// versions grows them to it (`Parallax::open_grown`), so a grow interrupted after this
    /// commit completes at the next open (docs/format.md, *Growing a disk*). The same size is
    /// a no-op; shrinking is refused.
    pub fn resize_disk(&self, name: &str, size_bytes: u64) -> Result<u64> {
        self.writable()?;
        if size_bytes == 0 || size_bytes % DISK_ALIGN != 0 {
            return Err(StoreError::Invalid(format!(
                "disk size {size_bytes} is not a positive multiple of {DISK_ALIGN} bytes"
            )));
        }
        let whole = self
            .header
            .extent_size
            .saturating_mul(u64::from(self.info().extent_count));
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(name)
            .map_err(|_| StoreError::NoSuchDisk(name.to_string()))?;
        let old = st.meta.disks[i].size;
        if size_bytes < old {
            return Err(StoreError::Invalid(format!(
                "disk {name:?} is {old} bytes: shrinking it to {size_bytes} bytes is not \
                 supported (only growing)"
            )));
        }
        if size_bytes > whole {
            return Err(StoreError::Invalid(format!(
                "disk {name:?} cannot grow to {size_bytes} bytes: the store holds {whole} bytes \
                 in all (add a tier or use another store)"
            )));
        }
        if size_bytes == old {
            return Ok(old);
        }
        if st.meta.disks[i].candidate != 0 {
            self.refuse_teed_size_on_rados(name, size_bytes)?;
        }
        let mut new = st.meta.clone();
        new.disks[i].size = size_bytes;
        self.commit(&mut st, new)?;
        info!("disk {name:?}: size {old} -> {size_bytes} bytes");
        crate::failpoint::hit("resize-committed");
        Ok(old)
    }

    /// Adds a candidate version of `layout` to `disk` (which must not have one) and returns
    /// its key.
    pub fn add_version(&self, disk: &str, layout: &str) -> Result<VersionKey> {
        self.writable()?;
        check_layout_name(layout)?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let existing = st.meta.disks[i].candidate;
        if existing != 0 {
            return Err(StoreError::CandidateExists {
                disk: disk.to_string(),
                key: VersionKey(existing),
            });
        }
        self.refuse_teed_size_on_rados(disk, st.meta.disks[i].size)?;
        let mut new = st.meta.clone();
        let key = Store::new_version(&mut new, disk, layout)?;
        new.disks[i].candidate = key;
        self.commit(&mut st, new)?;
        info!("added candidate version {key} ({layout}) to disk {disk:?}");
        Ok(VersionKey(key))
    }

    /// Makes `disk`'s candidate its trusted version and retires the former trusted version
    /// (removed, its extents freed, its presence map file removed). The disk's tee record, if
    /// any, goes with the candidate role. Returns the retired key.
    pub fn promote(&self, disk: &str) -> Result<VersionKey> {
        let (key, freed) = self.promote_deferred(disk)?;
        self.release(freed);
        Ok(key)
    }

    /// [`Store::promote`] in two steps, for a caller that holds a running disk's I/O while
    /// the roles change: this commits the swap (after it returns the retired version can
    /// write nothing, and its extents are free in the catalog); releasing the freed extents'
    /// space, which takes time proportional to their number, is left to
    /// [`Store::release`], to be called once I/O runs again. Dropping the [`Freed`] instead
    /// only leaves the space allocated in the data file until the extents are granted again.
    pub fn promote_deferred(&self, disk: &str) -> Result<(VersionKey, Freed)> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let d = &st.meta.disks[i];
        if d.candidate == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        if !d.members.is_empty() {
            return Err(StoreError::Invalid(format!(
                "disk {disk:?} is teed to {} members (a voting tee): `dovetail ctl promote \
                 --member KEY` promotes one while the daemon serves it",
                d.members.len() + 2
            )));
        }
        let (old, cand) = (d.trusted, d.candidate);
        let mut new = st.meta.clone();
        new.disks[i].trusted = cand;
        new.disks[i].candidate = 0;
        new.disks[i].tee = None;
        let freed = remove_version(&mut new, old);
        crate::failpoint::hit("store-promote");
        self.commit_dropping(&mut st, new, &freed, &[old])?;
        info!(
            "disk {disk:?}: version {cand} promoted, version {old} retired ({} extents freed)",
            freed.len()
        );
        Ok((VersionKey(old), Freed { extents: freed }))
    }

    /// Removes `disk`'s candidate version, its tee record and its presence map file, and
    /// frees its extents. Returns its key.
    pub fn drop_candidate(&self, disk: &str) -> Result<VersionKey> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let cand = st.meta.disks[i].candidate;
        if cand == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        let mut new = st.meta.clone();
        new.disks[i].candidate = 0;
        new.disks[i].tee = None;
        let mut freed = remove_version(&mut new, cand);
        let mut dropped = vec![cand];
        for m in std::mem::take(&mut new.disks[i].members) {
            freed.extend(remove_version(&mut new, m.key));
            dropped.push(m.key);
        }
        self.commit_freeing(&mut st, new, &freed, &dropped)?;
        info!(
            "disk {disk:?}: candidate version {cand} dropped ({} extents freed)",
            freed.len()
        );
        Ok(VersionKey(cand))
    }

    /// Deletes `name` and all its versions, freeing their extents and removing their presence
    /// map files. Returns how many extents were freed. Spaces still held for those versions
    /// can no longer write anything.
    pub fn delete_disk(&self, name: &str) -> Result<u32> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(name)
            .map_err(|_| StoreError::NoSuchDisk(name.to_string()))?;
        let mut new = st.meta.clone();
        let d = new.disks.remove(i);
        let mut freed = remove_version(&mut new, d.trusted);
        let mut dropped = vec![d.trusted];
        if d.candidate != 0 {
            freed.extend(remove_version(&mut new, d.candidate));
            dropped.push(d.candidate);
        }
        for m in &d.members {
            freed.extend(remove_version(&mut new, m.key));
            dropped.push(m.key);
        }
        self.commit_freeing(&mut st, new, &freed, &dropped)?;
        info!("deleted disk {name:?} ({} extents freed)", freed.len());
        Ok(freed.len() as u32)
    }

    /// Sets (or replaces) `disk`'s tee record, in one commit. The disk must have a candidate.
    /// The reason is made one line and cut to 4096 bytes; a record that still breaks the
    /// format's rules (a policy or fault rule over 255 bytes, more than 16 fault rules, an
    /// active record with a reason) is refused with [`StoreError::Invalid`].
    pub fn set_tee(&self, disk: &str, tee: TeeRec) -> Result<()> {
        self.writable()?;
        let tee = TeeRec {
            reason: one_line_reason(&tee.reason),
            ..tee
        };
        let problems = tee_problems(&tee);
        if !problems.is_empty() {
            return Err(StoreError::Invalid(format!(
                "tee record for disk {disk:?} refused: {}",
                problems.join("; ")
            )));
        }
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        if st.meta.disks[i].candidate == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        let mut new = st.meta.clone();
        info!(
            "disk {disk:?}: tee record set (policy {:?}, {} fault rules, {})",
            tee.policy,
            tee.faults.len(),
            tee.state
        );
        new.disks[i].tee = Some(tee);
        self.commit(&mut st, new)
    }

    /// Quarantines `disk`'s candidate: its tee record's state becomes quarantined, with
    /// `reason` (made one line, cut to 4096 bytes; a blank one is recorded as
    /// `no reason given`) and the current time, in one commit. Already quarantined: nothing
    /// changes (the first reason is kept) and `Ok` is returned. A disk without a candidate gets
    /// [`StoreError::NoCandidate`], one without a tee record [`StoreError::NoTee`].
    pub fn quarantine(&self, disk: &str, reason: &str) -> Result<()> {
        self.writable()?;
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        let d = &st.meta.disks[i];
        if d.candidate == 0 {
            return Err(StoreError::NoCandidate(disk.to_string()));
        }
        match &d.tee {
            None => return Err(StoreError::NoTee(disk.to_string())),
            Some(t) if t.state == TeeState::Quarantined => return Ok(()),
            Some(_) => {}
        }
        let cand = d.candidate;
        let mut reason = one_line_reason(reason);
        if reason.is_empty() {
            reason = "no reason given".into();
        }
        let mut new = st.meta.clone();
        if let Some(t) = new.disks[i].tee.as_mut() {
            t.state = TeeState::Quarantined;
            t.reason = reason.clone();
            t.changed = now();
        }
        self.commit(&mut st, new)?;
        warn!("disk {disk:?}: candidate version {cand} quarantined: {reason}");
        Ok(())
    }

    /// Records where the daemon serves `disk` (`Some`), or that it is not attached (`None`),
    /// in one commit. A record that breaks the format's rules, or whose socket another disk's
    /// record names already, is refused with [`StoreError::Invalid`]; so is any record in a
    /// store of a format before 5 (a version-2 store, kept as it is, records none).
    pub fn set_attachment(&self, disk: &str, attach: Option<AttachRec>) -> Result<()> {
        self.writable()?;
        if self.header.version < ATTACH_VERSION && attach.is_some() {
            return Err(StoreError::Invalid(format!(
                "this store is of format version {}, which records no attachments; a store \
                 made by `dovetail store create` (format version {ATTACH_VERSION}) does",
                self.header.version
            )));
        }
        if let Some(a) = &attach {
            let problems = attach_problems(a);
            if !problems.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "attachment of disk {disk:?} refused: {}",
                    problems.join("; ")
                )));
            }
        }
        let mut st = self.lock_state();
        let i = st
            .meta
            .disk_index(disk)
            .map_err(|_| StoreError::NoSuchDisk(disk.to_string()))?;
        if let Some(a) = &attach {
            if let Some(other) =
                st.meta.disks.iter().find(|o| {
                    o.name != disk && o.attach.as_ref().is_some_and(|b| b.socket == a.socket)
                })
            {
                return Err(StoreError::Invalid(format!(
                    "disk {:?} is attached on {} already: a socket serves one disk",
                    other.name,
                    a.socket.display()
                )));
            }
        }
        let mut new = st.meta.clone();
        new.disks[i].attach = attach.clone();
        crate::failpoint::hit("store-set-attachment");
        self.commit(&mut st, new)?;
        match &attach {
            Some(a) => info!(
                "disk {disk:?}: attachment recorded (socket {}, {} queue(s){})",
                a.socket.display(),
                a.queues,
                if a.read_only { ", read-only" } else { "" }
            ),
            None => info!("disk {disk:?}: attachment removed"),
        }
        Ok(())
    }

    /// `disk`'s attachment record, if it is attached.
    pub fn attachment(&self, disk: &str) -> Result<Option<AttachRec>> {
        self.lock_state()
            .meta
            .disk(disk)
            .map(|d| d.attach.clone())
            .ok_or_else(|| StoreError::NoSuchDisk(disk.to_string()))
    }

    /// Every attached disk and its attachment record, by name.
    pub fn attachments(&self) -> Vec<(String, AttachRec)> {
        self.lock_state()
            .meta
            .disks
            .iter()
            .filter_map(|d| Some((d.name.clone(), d.attach.clone()?)))
            .collect()
    }

    /// `disk`'s tee record, if it has one.
    pub fn tee(&self, disk: &str) -> Result<Option<TeeRec>> {
        self.lock_state()
            .meta
            .disk(disk)
            .map(|d| d.tee.clone())
            .ok_or_else(|| StoreError::NoSuchDisk(disk.to_string()))
    }
}
