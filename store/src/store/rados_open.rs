//! Creating and opening a store on RADOS (`rados:POOL/NAME`, [`crate::rados`]): the same
//! [`Store`] over a metadata object and data objects instead of `store.meta` and tier files.

use super::*;
pub(crate) use crate::rados::RadosMeta;
use crate::rados::{ObjectFile, RadosUrl, OBJECT_SIZE};

/// The data objects' size for extents of `extent_size` bytes: 4 MiB, or the extent size when
/// extents are smaller; larger extents must be a whole number of 4 MiB objects.
pub(crate) fn object_size_for(extent_size: u64) -> Result<u64> {
    if extent_size < OBJECT_SIZE {
        Ok(extent_size)
    } else if extent_size % OBJECT_SIZE == 0 {
        Ok(OBJECT_SIZE)
    } else {
        Err(StoreError::Invalid(format!(
            "extents of {} on RADOS must be smaller than {} or a multiple of it (one object per {} of an extent)",
            human_size(extent_size),
            human_size(OBJECT_SIZE),
            human_size(OBJECT_SIZE)
        )))
    }
}

impl Store {
    /// Creates a store of `size` bytes in extents of `extent_size` at `url` (one tier,
    /// `default`): the tier header written into its data objects, then the metadata object,
    /// exclusively. An existing store there is [`StoreError::StoreExists`].
    pub(crate) fn create_rados(url: &RadosUrl, size: u64, extent_size: u64) -> Result<Arc<Store>> {
        let count = extent_count_for(size, extent_size)?;
        Store::create_rados_with(url, vec![default_tier(count)], extent_size)
    }

    /// Creates a store at `url` made of `tiers` (the rules of [`Store::create_tiered`]), each
    /// tier's data objects in the pool its path names: `rados:POOL`, a pool of its own (which
    /// must exist), or any other path, the store's own pool. Tier `t`'s objects are
    /// `NAME.data.t.*` in its pool.
    pub(crate) fn create_rados_tiered(
        url: &RadosUrl,
        tiers: &[TierSpec],
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        let mut recs: Vec<TierRec> = Vec::with_capacity(tiers.len());
        for t in tiers {
            check_tier_name(&t.name)?;
            if recs.iter().any(|o| o.name == t.name) {
                return Err(StoreError::Invalid(format!(
                    "tier name {:?} is used twice",
                    t.name
                )));
            }
            let pool = url.tier_pool(&t.path)?;
            recs.push(TierRec {
                name: t.name.clone(),
                extents: extents_in(Some(&t.name), t.size, extent_size)?,
                // The store's own pool is recorded as `data.T`, as a one-tier store's is.
                path: if pool == url.pool {
                    PathBuf::from(format!("data.{}", recs.len()))
                } else {
                    PathBuf::from(format!("{}{pool}", crate::rados::SCHEME))
                },
            });
        }
        Store::create_rados_with(url, recs, extent_size)
    }

    fn create_rados_with(
        url: &RadosUrl,
        recs: Vec<TierRec>,
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        check_new_tiers(&recs, extent_size)?;
        let object_size = object_size_for(extent_size)?;
        let rm = RadosMeta::connect(url)?;
        if rm.exists()? {
            return Err(StoreError::StoreExists(url.path()));
        }
        let header = Header::with_tiers(random_uuid()?, extent_size, recs);
        for (t, rec) in header.tiers.iter().enumerate() {
            let pool = rm.data_in(&url.tier_pool(&rec.path)?)?;
            let tier = ObjectFile::new(
                pool,
                url.data_prefix(t),
                object_size,
                header.tier_file_len(t),
            );
            if header.has_tier_headers() {
                tier.write_at(
                    header.tier_len(t),
                    &TierHeader::expected(&header, t).encode(),
                )
                // Written asynchronously: the sync waits for it and reports its failure.
                .and_then(|()| tier.sync())
                .map_err(io_err(format!(
                    "writing the tier header of {url}'s tier {}",
                    rec.name
                )))?;
            }
        }
        let count = header.extent_count;
        let catalog = Meta::empty(count).encode_for(header.version)?;
        rm.create(object_size, &header.encode(), &catalog)?;
        drop(rm);
        info!("created store {url} ({count} extents of {extent_size} bytes, objects of {object_size} bytes)");
        Store::open_rados(url, false, false)
    }

    /// Opens the store at `url`: for writing (taking its lock: held by another process,
    /// [`StoreError::InUse`]) or read-only; `beside_writer`, read-only without caring whether
    /// a writer holds it.
    pub(crate) fn open_rados(
        url: &RadosUrl,
        read_only: bool,
        beside_writer: bool,
    ) -> Result<Arc<Store>> {
        Store::open_rados_as(url, read_only, beside_writer, false)
    }

    /// [`Store::open_rados`]; `shared`: for writing without the store's lock, beside other
    /// shared opens (`owner`: every change then takes the change lock).
    pub(crate) fn open_rados_as(
        url: &RadosUrl,
        read_only: bool,
        beside_writer: bool,
        shared: bool,
    ) -> Result<Arc<Store>> {
        let mut rm = RadosMeta::connect(url)?;
        let location = url.path();
        let mut loaded = rm.load()?;
        if !read_only && !shared {
            // Read again under the lock: whoever held it before may have committed since.
            rm.lock()?;
            loaded = rm.load()?;
        }
        let header = Header::decode(&loaded.header, &location)?;
        if header.version != crate::format::FORMAT_VERSION {
            return Err(StoreError::Version {
                found: header.version,
                supported: crate::format::FORMAT_VERSION,
            });
        }
        if loaded.object_size != object_size_for(header.extent_size)? {
            return Err(StoreError::Corrupt(format!(
                "objects of {} bytes do not fit extents of {} bytes",
                loaded.object_size, header.extent_size
            )));
        }
        if loaded.catalog.len() > header.max_payload() {
            return Err(StoreError::Corrupt(format!(
                "the catalog is {} bytes, more than the {} the header allows",
                loaded.catalog.len(),
                header.max_payload()
            )));
        }
        let (meta, recorded_free) = Meta::decode(&loaded.catalog, header.version)?;
        let violations = validate(&header, &meta, recorded_free);
        if let Some(first) = violations.first() {
            return Err(StoreError::Corrupt(format!(
                "{first}{}; `dovetail store check` lists every problem",
                match violations.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            )));
        }
        let mut tiers = Vec::with_capacity(header.tiers.len());
        let mut first = 0u32;
        for (t, rec) in header.tiers.iter().enumerate() {
            let pool = rm.data_in(&url.tier_pool(&rec.path)?)?;
            let file = ObjectFile::new(
                pool.clone(),
                url.data_prefix(t),
                loaded.object_size,
                header.tier_file_len(t),
            );
            if let Some(problem) = tier_header_problem(&file, &header, t)? {
                return Err(StoreError::TierFile {
                    tier: rec.name.clone(),
                    path: location.clone(),
                    problem,
                });
            }
            tiers.push(Tier {
                name: rec.name.clone(),
                path: PathBuf::from(format!(
                    "{}{}*",
                    tier_place(&pool, &url.pool),
                    url.data_prefix(t)
                )),
                first,
                extents: rec.extents,
                file: Box::new(file),
                sync_lock: Mutex::new(()),
                syncs_started: AtomicU64::new(0),
                last_good_sync: AtomicU64::new(0),
            });
            first += rec.extents;
        }
        debug!(
            "opened store {url} at generation {}{}",
            loaded.generation,
            if read_only { " (read-only)" } else { "" }
        );
        let grants = meta.owners.clone();
        let mut pool = PoolMem::from_meta(&meta.pool, tiers.len());
        pool.note_versions(&meta);
        Ok(Arc::new(Store {
            location,
            dir: None,
            header,
            meta_file: Box::new(NoMetaFile),
            tiers,
            read_only,
            beside_writer,
            state: Mutex::new(MetaState {
                meta,
                generation: loaded.generation,
                newest: 0,
                change: None,
            }),
            grants: RwLock::new(grants),
            shared: Mutex::new(HashMap::new()),
            granting: Mutex::new(Vec::new()),
            direct_io: AtomicBool::new(false),
            lost_watchers: Mutex::new(Vec::new()),
            rados: Some(rm),
            pool: Mutex::new(pool),
            multi: std::sync::OnceLock::new(),
        }))
    }

    /// Takes over the store at `dir` (`rados:POOL/NAME`) from a dead or hung holder: the holder
    /// is fenced first (its client address blocklisted, so the cluster refuses whatever it
    /// still sends, for `expire` or for good), then its lock is broken, then the store is
    /// opened for writing from its last commit. A store nobody holds is just opened.
    pub fn take_over(dir: &Path, expire: Option<std::time::Duration>) -> Result<Arc<Store>> {
        let Some(url) = RadosUrl::of(dir) else {
            return Err(StoreError::Invalid(format!(
                "{} is a store directory: a file store's holder is a process on this host,                  stop it instead",
                dir.display()
            )));
        };
        let url = url?;
        let rm = RadosMeta::connect(&url)?;
        let fenced = rm.fence_holder(expire)?;
        drop(rm);
        if !fenced.is_empty() {
            info!("{url}: took over from {}", fenced.join(", "));
        }
        Store::open_rados(&url, false, false)
    }

    /// The members of an N-version Tee after its candidate (store format 7) are not on RADOS
    /// yet (a store on RADOS holds one candidate per disk: tee, copy-out, promote): refused
    /// there, clearly, before anything is committed.
    pub(crate) fn refuse_members_on_rados(&self) -> Result<()> {
        match &self.rados {
            Some(r) => Err(StoreError::Invalid(format!(
                "{} is a store on RADOS, which holds one candidate per disk (tee, migrate, \
                 promote) but not the further members of a voting tee yet",
                r.url
            ))),
            None => Ok(()),
        }
    }

    /// A teed disk's presence map on RADOS is one object written whole at its creation (and
    /// when it grows), at most [`crate::rados::MAX_RECORD_WRITE`] bytes: a disk over
    /// [`crate::rados::MAX_TEED_DISK`] cannot have a candidate there. Refused before anything
    /// is committed.
    pub(crate) fn refuse_teed_size_on_rados(&self, disk: &str, size: u64) -> Result<()> {
        match &self.rados {
            Some(r) if size > crate::rados::MAX_TEED_DISK => Err(StoreError::Invalid(format!(
                "disk {disk:?} of {size} bytes cannot have a candidate on {}: a teed disk on \
                 RADOS is at most {} bytes (2 TiB; its presence map is one object)",
                r.url,
                crate::rados::MAX_TEED_DISK
            ))),
            _ => Ok(()),
        }
    }

    /// The store's RADOS metadata, for a store on RADOS.
    pub(crate) fn rados_meta(&self) -> Option<&RadosMeta> {
        self.rados.as_ref()
    }

    /// Whether the store lives on RADOS (`rados:POOL/NAME`).
    pub fn on_rados(&self) -> bool {
        self.rados.is_some()
    }
}

/// Where a tier's objects are, for messages and listings: `POOL/` for a pool other than the
/// store's, nothing for the store's own.
fn tier_place(pool: &dovetail_rados::Pool, own: &str) -> String {
    if pool.name() == own {
        String::new()
    } else {
        format!("{}/", pool.name())
    }
}

/// A store on RADOS has no metadata file: its metadata is in the metadata object, and every
/// path that would use the file goes there instead. Any call here is a bug, answered with an
/// error rather than a panic.
#[derive(Debug)]
pub(crate) struct NoMetaFile;

impl StoreFile for NoMetaFile {
    fn read_at(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Err(no_meta_file())
    }
    fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(no_meta_file())
    }
    fn sync(&self) -> io::Result<()> {
        Err(no_meta_file())
    }
    fn size(&self) -> io::Result<u64> {
        Err(no_meta_file())
    }
    fn set_size(&self, _: u64) -> io::Result<()> {
        Err(no_meta_file())
    }
    fn zero_range(&self, _: u64, _: u64) -> io::Result<()> {
        Err(no_meta_file())
    }
}

fn no_meta_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "a store on RADOS keeps its metadata in its metadata object, not a file",
    )
}
