//! [`FileSpace`], the [`VersionSpace`] of one version over the store's real files.

use super::*;

impl Store {
    /// The space of version `key`: what its layout reads, writes and commits through.
    pub fn space(self: &Arc<Self>, key: VersionKey) -> Result<Arc<dyn VersionSpace>> {
        Ok(self.file_space(key)?)
    }

    /// [`Store::space`], with the concrete type.
    pub fn file_space(self: &Arc<Self>, key: VersionKey) -> Result<Arc<FileSpace>> {
        self.version(key)?;
        let shared = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.0)
            .or_insert_with(|| {
                Arc::new(Shared {
                    violations: AtomicU64::new(0),
                    tiers: self.tiers.iter().map(|_| TierSync::default()).collect(),
                })
            })
            .clone();
        Ok(Arc::new(FileSpace {
            store: self.clone(),
            key,
            shared,
        }))
    }
}

impl std::fmt::Debug for FileSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSpace")
            .field("store", &self.store.location)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl FileSpace {
    /// The store this space belongs to.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Refuses a read of a version that may have lost writes (a failed sync or a failed write
    /// marked it: [`TierSync::lost`]): its tree may point at blocks that do not hold what it
    /// says (a write placed but not written, a write a failed sync lost), so a read could
    /// return another block's old data. It fails until the layout is reopened from its last
    /// commit over a new space. `what` describes the read for the error.
    fn check_readable(&self, what: impl FnOnce() -> String) -> Result<()> {
        match self
            .shared
            .tiers
            .iter()
            .find_map(|ts| ts.check_lost(self.key.0).err())
        {
            Some(source) => Err(StoreError::Io {
                op: format!("{} for {}", what(), self.key),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Makes every write of this version to tier `t` counted so far durable, syncing the
    /// tier's file unless a sync that finished already covers them.
    fn sync_tier(&self, t: usize) -> io::Result<()> {
        let ts = &self.shared.tiers[t];
        ts.check_lost(self.key.0)?;
        let want = ts.written.load(Ordering::Acquire);
        if ts.synced.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let tier = &self.store.tiers[t];
        // Every sync numbered above this one starts after the writes counted in `want`.
        let before = tier.syncs_started.load(Ordering::SeqCst);
        let _one = tier.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        ts.check_lost(self.key.0)?;
        if ts.synced.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        if tier.last_good_sync.load(Ordering::SeqCst) > before {
            // Another version's sync covered them while this one waited.
            ts.synced.fetch_max(want, Ordering::AcqRel);
            return Ok(());
        }
        let covered = ts.written.load(Ordering::Acquire);
        self.store.sync_tier_locked(t)?;
        ts.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }
}

impl VersionSpace for FileSpace {
    fn key(&self) -> VersionKey {
        self.key
    }

    fn extent_size(&self) -> u64 {
        self.store.header.extent_size
    }

    fn extents(&self) -> Vec<ExtentId> {
        self.store
            .version(self.key)
            .map(|v| v.extents)
            .unwrap_or_default()
    }

    fn grant_extent(&self) -> Result<ExtentId> {
        self.store.grant(self.key, None)
    }

    fn tiers(&self) -> Vec<TierInfo> {
        self.store.tiers()
    }

    fn extent_tier(&self, extent: ExtentId) -> usize {
        self.store.extent_tier(extent)
    }

    fn grant_extent_on(&self, tier: usize) -> Result<ExtentId> {
        self.store.grant(self.key, Some(tier))
    }

    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (t, at) = self.store.locate(extent, offset, buf.len())?;
        self.check_readable(|| format!("reading {} bytes at {extent}+{offset}", buf.len()))?;
        self.store.tiers[t]
            .file
            .read_at(at, buf)
            .map_err(|source| StoreError::Io {
                op: format!(
                    "reading {} bytes at {extent}+{offset} for {}",
                    buf.len(),
                    self.key
                ),
                source,
            })
    }

    unsafe fn read_raw(&self, extent: ExtentId, offset: u64, iov: &[libc::iovec]) -> Result<()> {
        let len = crate::file::iov_len(iov);
        let (t, at) = self.store.locate(extent, offset, len)?;
        self.check_readable(|| format!("reading {len} bytes at {extent}+{offset}"))?;
        // SAFETY: the caller's promise on `iov` is passed on unchanged.
        unsafe { self.store.tiers[t].file.read_raw(at, iov) }.map_err(|source| StoreError::Io {
            op: format!("reading {len} bytes at {extent}+{offset} for {}", self.key),
            source,
        })
    }

    fn direct_io(&self) -> bool {
        self.store.direct_io()
    }

    fn direct_target(
        &self,
        extent: ExtentId,
        offset: u64,
        len: usize,
    ) -> Option<(std::os::unix::io::RawFd, u64, usize)> {
        let (t, at) = self.store.locate(extent, offset, len).ok()?;
        // What `read_raw` refuses is left to it (it reports why).
        self.check_readable(String::new).ok()?;
        let (fd, align) = self.store.tiers[t].file.direct_target(at, len)?;
        Some((fd, at, align))
    }

    fn aio_reads(&self) -> bool {
        self.store.tiers.iter().any(|t| t.file.aio_reads())
    }

    fn aio_target(
        &self,
        extent: ExtentId,
        offset: u64,
        len: usize,
    ) -> Option<(std::sync::Arc<dyn crate::aio::AioRead>, u64)> {
        let (t, at) = self.store.locate(extent, offset, len).ok()?;
        // What `read` refuses is left to it (it reports why).
        self.check_readable(String::new).ok()?;
        self.store.tiers[t].file.aio_source(at, len)
    }

    fn direct_write_target(
        &self,
        extent: ExtentId,
        offset: u64,
        len: usize,
    ) -> Option<(std::os::unix::io::RawFd, u64, usize, usize)> {
        let (t, at) = self.store.locate(extent, offset, len).ok()?;
        self.store.writable().ok()?;
        // What `write` refuses is left to it (it reports why).
        if self
            .shared
            .tiers
            .iter()
            .any(|ts| ts.check_lost(self.key.0).is_err())
        {
            return None;
        }
        let (fd, align) = self.store.tiers[t].file.direct_target(at, len)?;
        // The grant is checked, not held through the write (a queue worker holding the grants
        // lock across its I/O could wait for itself): the caller keeps the extent in use until
        // `direct_write_done`, and only this version gives its extents back.
        if self.store.grants_read()[extent.0 as usize] != self.key.0 {
            return None;
        }
        self.shared.tiers[t].started.fetch_add(1, Ordering::AcqRel);
        Some((fd, at, align, t))
    }

    fn direct_write_done(&self, tier: usize) {
        if let Some(ts) = self.shared.tiers.get(tier) {
            ts.written.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> Result<()> {
        let (t, at) = self.store.locate(extent, offset, buf.len())?;
        self.store.writable()?;
        // A version that may have lost writes takes no more: its layout is to be reopened
        // from its last commit (`Store::renew_version`), which would drop these too.
        for ts in &self.shared.tiers {
            ts.check_lost(self.key.0).map_err(|source| StoreError::Io {
                op: format!(
                    "writing {} bytes at {extent}+{offset} for {}",
                    buf.len(),
                    self.key
                ),
                source,
            })?;
        }
        // Held through the write: an extent cannot be taken away while a write to it runs.
        let grants = self.store.grants_read();
        if grants[extent.0 as usize] != self.key.0 {
            let n = self.shared.violations.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 10 || n % 1000 == 0 {
                warn!(
                    "refused a write of {} bytes by {} to {extent} at offset {offset}: not granted to it ({n} refused so far)",
                    buf.len(),
                    self.key
                );
            }
            return Err(StoreError::GrantViolation {
                key: self.key,
                extent,
                offset,
            });
        }
        // Counted before the write (a sync failing while it runs may lose it) and after it,
        // written or not (a failed write may have written part).
        self.shared.tiers[t].started.fetch_add(1, Ordering::AcqRel);
        let done = self.store.tiers[t].file.write_at(at, buf);
        self.shared.tiers[t].written.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = &done {
            drop(grants);
            // The layout has already pointed its tree at this place (copy-on-write places a
            // block before writing it): it now holds part of the data, or whatever was there
            // before (another block's old data). That tree must never be committed, nor served
            // on: marked like a version whose writes a failed sync lost, the version takes no
            // more writes nor syncs and is reopened from its last commit.
            self.store
                .write_failed(self.key, &self.shared.tiers[t], t, e);
        }
        done.map_err(|source| StoreError::Io {
            op: format!(
                "writing {} bytes at {extent}+{offset} for {}",
                buf.len(),
                self.key
            ),
            source,
        })
    }

    fn punch(&self, extent: ExtentId, offset: u64, len: u64) -> Result<()> {
        let n = usize::try_from(len).map_err(|_| StoreError::OutOfBounds {
            extent,
            offset,
            len: usize::MAX,
        })?;
        let (t, at) = self.store.locate(extent, offset, n)?;
        self.store.writable()?;
        // Held through the punch, as for a write: the extent stays this version's meanwhile.
        let grants = self.store.grants_read();
        if grants[extent.0 as usize] != self.key.0 {
            self.shared.violations.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::GrantViolation {
                key: self.key,
                extent,
                offset,
            });
        }
        self.store.tiers[t]
            .file
            .zero_range(at, len)
            .map_err(|source| StoreError::Io {
                op: format!(
                    "releasing {len} bytes at {extent}+{offset} for {}",
                    self.key
                ),
                source,
            })
    }

    /// Syncs the data file of every tier this version (through any of its spaces) wrote to
    /// since a sync covering those writes; a tier it did not write to is left alone. Fails for
    /// good once a sync of a tier's file failed while this version had unsynced writes there
    /// (see [`TierSync::lost`]).
    fn sync(&self) -> Result<()> {
        for (t, tier) in self.store.tiers.iter().enumerate() {
            self.sync_tier(t).map_err(io_err(format!(
                "syncing tier {}'s data file {}",
                tier.name,
                tier.path.display()
            )))?;
        }
        Ok(())
    }

    fn root(&self) -> Vec<u8> {
        self.store.root(self.key)
    }

    fn commit_root(&self, record: &[u8]) -> Result<()> {
        self.store.commit_root(self.key, record)
    }

    fn grant_violations(&self) -> u64 {
        self.shared.violations.load(Ordering::Relaxed)
    }

    fn release_extent(&self, extent: ExtentId) -> Result<()> {
        self.store.ungrant(self.key, extent)
    }

    fn single_instance(&self) -> bool {
        self.store.single_instance()
    }

    fn share(&self, data: &[u8]) -> Result<Option<crate::SharedRef>> {
        self.store.share(self.key, data)
    }

    fn release_shared(&self, block: crate::SharedRef) -> Result<()> {
        self.store.release_shared(self.key, block)
    }

    fn holds_shared(&self, block: crate::SharedRef) -> bool {
        self.store.holds_shared(self.key, block)
    }

    fn held_shared(&self) -> Vec<crate::SharedRef> {
        self.store.held_shared(self.key)
    }

    fn read_shared(&self, block: crate::SharedRef, buf: &mut [u8]) -> Result<()> {
        self.store.read_shared(block, buf)
    }

    fn shared_cut(&self) -> u64 {
        self.store.shared_cut()
    }

    fn commit_root_cut(&self, record: &[u8], cut: u64) -> Result<()> {
        self.store.commit_root_cut(self.key, record, cut)
    }
}
