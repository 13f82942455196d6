//! Creating a store and opening it: its files, the header and slots read, the format
//! upgrade when one is due, the in-memory state built.

use super::*;

impl Store {
    /// Creates a store in `dir` (created if missing) of `size` bytes cut into extents of
    /// `extent_size` bytes, in one tier, `default`: `DIR/data.0` (sparse; recorded as `data.0`,
    /// inside the store's directory, so the directory can be moved) and `DIR/store.meta`.
    /// Refuses if either file exists. The metadata file is built under a temporary name and
    /// renamed into place, so a crash leaves either no store or a complete one.
    pub fn create(dir: &Path, size: u64, extent_size: u64) -> Result<Arc<Store>> {
        if let Some(url) = crate::rados::RadosUrl::of(dir) {
            return Store::create_rados(&url?, size, extent_size);
        }
        let count = extent_count_for(size, extent_size)?;
        let tier = default_tier(count);
        let path = dir.join(&tier.path);
        Store::create_in(dir, vec![(tier, path)], extent_size)
    }

    /// Creates a store in `dir` (created if missing) made of `tiers`, in order: tier `t` holds
    /// the extents after those of the tiers before it, in its own data file, created at
    /// `path` (exclusively: an existing file is refused with [`StoreError::StoreExists`]) and
    /// sized sparse at `size`, a positive whole number of extents. 1 to 8 tiers, names
    /// `[a-z0-9_-]{1,16}` and paths unique, at most 65536 extents in all. A relative path is
    /// resolved against the current directory now and recorded absolute. The metadata file is
    /// `DIR/store.meta`; a crash during creation leaves no store (a tier file may be left over).
    pub fn create_tiered(dir: &Path, tiers: &[TierSpec], extent_size: u64) -> Result<Arc<Store>> {
        if let Some(url) = crate::rados::RadosUrl::of(dir) {
            return Store::create_rados_tiered(&url?, tiers, extent_size);
        }
        let mut cwd = None;
        let mut absolute = |p: &Path| -> Result<PathBuf> {
            if p.is_absolute() {
                return Ok(p.to_path_buf());
            }
            if cwd.is_none() {
                cwd =
                    Some(std::env::current_dir().map_err(io_err("finding the current directory"))?);
            }
            Ok(cwd.as_deref().unwrap_or(Path::new("/")).join(p))
        };
        let mut planned: Vec<(TierRec, PathBuf)> = Vec::with_capacity(tiers.len());
        for t in tiers {
            check_tier_name(&t.name)?;
            if planned.iter().any(|(o, _)| o.name == t.name) {
                return Err(StoreError::Invalid(format!(
                    "tier name {:?} is used twice",
                    t.name
                )));
            }
            let extents = extents_in(Some(&t.name), t.size, extent_size)?;
            let path = absolute(&t.path)?;
            if let Some((o, _)) = planned.iter().find(|(_, p)| same_path(p, &path)) {
                return Err(StoreError::Invalid(format!(
                    "tiers {} and {} have the same data file {}",
                    o.name,
                    t.name,
                    path.display()
                )));
            }
            planned.push((
                TierRec {
                    name: t.name.clone(),
                    extents,
                    path: path.clone(),
                },
                path,
            ));
        }
        let abs_dir = absolute(dir)?;
        for (t, path) in &planned {
            for own in [META_FILE, META_TMP] {
                if same_path(path, &abs_dir.join(own)) {
                    return Err(StoreError::Invalid(format!(
                        "tier {}'s data file {} would be the store's own {own}",
                        t.name,
                        path.display()
                    )));
                }
            }
        }
        Store::create_in(dir, planned, extent_size)
    }

    /// Creates a store in `dir` of the tiers given with their data files' paths.
    fn create_in(
        dir: &Path,
        tiers: Vec<(TierRec, PathBuf)>,
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        let recs: Vec<TierRec> = tiers.iter().map(|(t, _)| t.clone()).collect();
        check_new_tiers(&recs, extent_size)?;
        let meta_path = dir.join(META_FILE);
        if meta_path.symlink_metadata().is_ok() {
            return Err(StoreError::StoreExists(meta_path));
        }
        for (_, p) in &tiers {
            if p.symlink_metadata().is_ok() {
                return Err(StoreError::StoreExists(p.clone()));
            }
        }
        let dir_existed = dir.symlink_metadata().is_ok();
        std::fs::create_dir_all(dir)
            .map_err(io_err(format!("creating directory {}", dir.display())))?;
        let mut files: Vec<File> = Vec::with_capacity(tiers.len());
        let mut made: Vec<&Path> = Vec::with_capacity(tiers.len());
        let tmp_path = dir.join(META_TMP);
        let built = (|| {
            for (t, path) in &tiers {
                let f = crate::safefs::create_new(path).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => StoreError::StoreExists(path.clone()),
                    _ => StoreError::Io {
                        op: format!("creating tier {}'s data file {}", t.name, path.display()),
                        source: e,
                    },
                })?;
                made.push(path);
                files.push(f);
            }
            // A leftover temporary file is removed (the name, never what a symlink there
            // points to), then created afresh, exclusively, mode 0600.
            let sdir = crate::safefs::Dir::open(dir)
                .map_err(io_err(format!("opening directory {}", dir.display())))?;
            sdir.remove_if_present(META_TMP)
                .map_err(io_err(format!("removing {}", tmp_path.display())))?;
            let meta = sdir
                .create_new(META_TMP)
                .map_err(io_err(format!("creating {}", tmp_path.display())))?;
            if !lock(&meta, LockMode::Exclusive)
                .map_err(io_err(format!("locking {}", tmp_path.display())))?
            {
                return Err(StoreError::InUse(dir.to_path_buf()));
            }
            let header = Header::with_tiers(random_uuid()?, extent_size, recs.clone());
            let data: Vec<&dyn StoreFile> = files.iter().map(|f| f as &dyn StoreFile).collect();
            initialize(&meta, &data, &header)?;
            std::fs::create_dir_all(dir.join(MAPS_DIR)).map_err(io_err(format!(
                "creating directory {}",
                dir.join(MAPS_DIR).display()
            )))?;
            // The tier files' directory entries are durable before the store exists.
            let mut parents: Vec<&Path> = Vec::new();
            for (_, p) in &tiers {
                let parent = match p.parent() {
                    Some(q) if !q.as_os_str().is_empty() => q,
                    _ => Path::new("."),
                };
                if !parents.contains(&parent) {
                    parents.push(parent);
                    File::open(parent)
                        .and_then(|d| d.sync_all())
                        .map_err(io_err(format!("syncing directory {}", parent.display())))?;
                }
            }
            if meta_path.symlink_metadata().is_ok() {
                return Err(StoreError::StoreExists(meta_path.clone()));
            }
            sdir.rename(META_TMP, META_FILE).map_err(io_err(format!(
                "renaming {} into place",
                tmp_path.display()
            )))?;
            sdir.sync()
                .map_err(io_err(format!("syncing directory {}", dir.display())))?;
            Ok(meta)
        })();
        let meta = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                for p in made {
                    let _ = std::fs::remove_file(p);
                }
                if !dir_existed {
                    // Only if empty: nothing but what this call made.
                    let _ = std::fs::remove_dir(dir.join(MAPS_DIR));
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        let data = files
            .into_iter()
            .map(|f| Box::new(f) as Box<dyn StoreFile>)
            .collect();
        let store = Store::load(
            Box::new(meta),
            data,
            meta_path,
            Some(dir.to_path_buf()),
            false,
        )?;
        info!(
            "created store {} ({} extents of {extent_size} bytes; tiers: {})",
            dir.display(),
            store.header.extent_count,
            store
                .tiers
                .iter()
                .map(|t| format!("{} {} extents at {}", t.name, t.extents, t.path.display()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(store)
    }

    /// Opens the store in `dir` for reading and writing. Another process holding it open gets
    /// [`StoreError::InUse`]; a tier's data file that is missing or short gets
    /// [`StoreError::TierFile`].
    ///
    /// Every tier file must carry the tier header its tier table entry expects (format version
    /// 4), or [`StoreError::TierFile`] says which file and what is wrong. A format-3 store is
    /// upgraded to format 4 first: automatically when every tier file is inside the store's
    /// directory (`data.0`), otherwise only by [`Store::open_adopting_tiers`].
    pub fn open(dir: &Path) -> Result<Arc<Store>> {
        Store::open_mode(dir, false, false)
    }

    /// [`Store::open`] with the tier files' extents read and written with direct I/O
    /// (`O_DIRECT`, `serve --store DIR --cache none`; [`crate::direct`]): no page of their data
    /// stays in the host's page cache, so a version's sync writes back nothing another version
    /// wrote. `store.meta`, the maps and the tier headers stay buffered. Fails, naming the
    /// file, where a tier file's file system cannot do direct I/O.
    pub fn open_direct(dir: &Path) -> Result<Arc<Store>> {
        if let Some(url) = crate::rados::RadosUrl::of(dir) {
            // No page cache between the daemon and RADOS: every cache mode is the same there.
            return Store::open_rados(&url?, false, false);
        }
        let (meta, meta_path) = open_files(dir, false)?;
        Store::open_files_with(dir, meta, meta_path, false, false, false, true, None)
    }

    /// [`Store::open`] (`direct`: [`Store::open_direct`]) with each tier's data file passed
    /// through `wrap` (the tier's name, the file as opened) before the store uses it: the
    /// daemon's test-only `serve --store-faults` wraps them in fault files. Not for a store on
    /// RADOS.
    pub fn open_wrapping_tiers(
        dir: &Path,
        direct: bool,
        wrap: &TierWrap<'_>,
    ) -> Result<Arc<Store>> {
        if crate::rados::RadosUrl::of(dir).is_some() {
            return Err(StoreError::Invalid(
                "a store on RADOS has no tier files to wrap".into(),
            ));
        }
        let (meta, meta_path) = open_files(dir, false)?;
        Store::open_files_with(
            dir,
            meta,
            meta_path,
            false,
            false,
            false,
            direct,
            Some(wrap),
        )
    }

    /// Whether the tier files' data goes through direct I/O ([`Store::open_direct`]).
    pub fn direct_io(&self) -> bool {
        self.direct_io.load(Ordering::Relaxed)
    }

    /// [`Store::open`] that also upgrades a format-3 store whose tier files are outside its
    /// directory (`dovetail store upgrade`): the operator vouches that the files the tier
    /// table names are this store's. Each must still be a regular file of exactly the tier's
    /// length (what `create` made). A store of any other format version opens as usual.
    pub fn open_adopting_tiers(dir: &Path) -> Result<Arc<Store>> {
        Store::open_mode(dir, false, true)
    }

    /// Opens the store in `dir` read-only (shared with other readers, not with a writer):
    /// listings and checks. Every change is refused with [`StoreError::ReadOnly`].
    pub fn open_read_only(dir: &Path) -> Result<Arc<Store>> {
        Store::open_mode(dir, true, false)
    }

    pub(super) fn open_mode(dir: &Path, read_only: bool, adopt: bool) -> Result<Arc<Store>> {
        if let Some(url) = crate::rados::RadosUrl::of(dir) {
            return Store::open_rados(&url?, read_only, false);
        }
        let (meta, meta_path) = open_files(dir, read_only)?;
        Store::open_files_as(dir, meta, meta_path, read_only, false, adopt)
    }

    pub(super) fn open_files_as(
        dir: &Path,
        meta: File,
        meta_path: PathBuf,
        read_only: bool,
        beside_writer: bool,
        adopt: bool,
    ) -> Result<Arc<Store>> {
        Store::open_files_with(
            dir,
            meta,
            meta_path,
            read_only,
            beside_writer,
            adopt,
            false,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn open_files_with(
        dir: &Path,
        meta: File,
        meta_path: PathBuf,
        read_only: bool,
        beside_writer: bool,
        adopt: bool,
        direct: bool,
        wrap: Option<&TierWrap<'_>>,
    ) -> Result<Arc<Store>> {
        let header = read_header(&meta, &meta_path)?;
        if !adopt {
            unproven_tier(&header, dir)?;
        }
        let mut data: Vec<Box<dyn StoreFile>> = Vec::with_capacity(header.tiers.len());
        // Tier files inside the store's directory are reached through its descriptor.
        let sdir = crate::safefs::Dir::open(dir)
            .map_err(io_err(format!("opening directory {}", dir.display())))?;
        for t in &header.tiers {
            let path = resolve(Some(dir), &t.path);
            if let Some(problem) = not_a_regular_file(&path) {
                return Err(StoreError::TierFile {
                    tier: t.name.clone(),
                    path,
                    problem,
                });
            }
            match open_tier_in(&sdir, &t.path, &path, read_only)? {
                // Checked again on the open file: the path may have changed in between.
                Some(f) if !f.metadata().is_ok_and(|m| m.is_file()) => {
                    return Err(StoreError::TierFile {
                        tier: t.name.clone(),
                        path,
                        problem: "is not a regular file: a tier's data file is one".into(),
                    })
                }
                Some(f) if direct => {
                    let end = u64::from(t.extents) * header.extent_size;
                    let f = crate::direct::DirectTierFile::new(f, end, read_only).map_err(|e| {
                        StoreError::TierFile {
                            tier: t.name.clone(),
                            path: path.clone(),
                            problem: format!(
                                "cannot be used with direct I/O (--cache none): {e}; its file \
                                 system may not support O_DIRECT: use --cache writeback"
                            ),
                        }
                    })?;
                    data.push(Box::new(f));
                }
                Some(f) => data.push(Box::new(f)),
                None => {
                    return Err(StoreError::TierFile {
                        tier: t.name.clone(),
                        path,
                        problem: "is missing".into(),
                    })
                }
            }
        }
        if let Some(wrap) = wrap {
            data = data
                .into_iter()
                .zip(&header.tiers)
                .map(|(f, t)| wrap(&t.name, f))
                .collect();
        }
        let store = Store::load_as(
            Box::new(meta),
            data,
            meta_path,
            Some(dir.to_path_buf()),
            read_only,
            beside_writer,
        )?;
        store.direct_io.store(direct, Ordering::Relaxed);
        if !read_only {
            // Stores created before presence maps existed have no `maps/` yet.
            make_maps_dir(dir)?;
        }
        Ok(store)
    }

    /// Creates a store over the given files (any [`StoreFile`], e.g. simulated ones) instead
    /// of a directory, of one tier, `default`. The files' previous contents are overwritten.
    pub fn create_on(
        meta: Box<dyn StoreFile>,
        data: Box<dyn StoreFile>,
        size: u64,
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        let count = extent_count_for(size, extent_size)?;
        let header = Header::new(random_uuid()?, extent_size, count);
        initialize(&*meta, &[&*data], &header)?;
        Store::load(meta, vec![data], PathBuf::from("(store)"), None, false)
    }

    /// [`Store::create_on`] with tiers: `(name, data file, extents)` each, in extent order
    /// (the rules of [`Store::create_tiered`]; at least one extent per tier). The header
    /// records tier `t`'s path as `data.<t>`, which names no file: the files are the ones
    /// given, and [`Store::open_on_tiers`] takes them in the same order.
    pub fn create_on_tiers(
        meta: Box<dyn StoreFile>,
        tiers: Vec<(String, Box<dyn StoreFile>, u32)>,
        extent_size: u64,
    ) -> Result<Arc<Store>> {
        let mut recs = Vec::with_capacity(tiers.len());
        let mut data = Vec::with_capacity(tiers.len());
        for (i, (name, file, extents)) in tiers.into_iter().enumerate() {
            recs.push(TierRec {
                name,
                extents,
                path: PathBuf::from(format!("data.{i}")),
            });
            data.push(file);
        }
        check_new_tiers(&recs, extent_size)?;
        let header = Header::with_tiers(random_uuid()?, extent_size, recs);
        let files: Vec<&dyn StoreFile> = data.iter().map(|f| &**f).collect();
        initialize(&*meta, &files, &header)?;
        Store::load(meta, data, PathBuf::from("(store)"), None, false)
    }

    /// Opens a store over the given files, for reading and writing (a version-1 store is
    /// upgraded). Such a store has no directory: see [`Store::map_path`]. A store of several
    /// tiers needs [`Store::open_on_tiers`].
    pub fn open_on(meta: Box<dyn StoreFile>, data: Box<dyn StoreFile>) -> Result<Arc<Store>> {
        Store::open_on_tiers(meta, vec![data])
    }

    /// [`Store::open_on`], with `dir` as the store's directory: the candidates' presence maps
    /// and migration records go in its `maps/` (for tests that wrap a store's files, e.g. in
    /// fault files, and serve teed disks). Takes no lock on `dir`.
    pub fn open_on_in(
        meta: Box<dyn StoreFile>,
        data: Box<dyn StoreFile>,
        dir: &Path,
    ) -> Result<Arc<Store>> {
        Store::load(
            meta,
            vec![data],
            dir.to_path_buf(),
            Some(dir.to_path_buf()),
            false,
        )
    }

    /// Opens a store over the given files, read-only: nothing is ever written to them (a
    /// version-1 store is read as it is).
    pub fn open_on_read_only(
        meta: Box<dyn StoreFile>,
        data: Box<dyn StoreFile>,
    ) -> Result<Arc<Store>> {
        Store::open_on_tiers_read_only(meta, vec![data])
    }

    /// Opens a store over the given files, one data file per tier in the header's order, for
    /// reading and writing. A count that does not match the header's tiers is
    /// [`StoreError::Invalid`].
    pub fn open_on_tiers(
        meta: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
    ) -> Result<Arc<Store>> {
        Store::load(meta, data, PathBuf::from("(store)"), None, false)
    }

    /// [`Store::open_on_tiers`], read-only.
    pub fn open_on_tiers_read_only(
        meta: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
    ) -> Result<Arc<Store>> {
        Store::load(meta, data, PathBuf::from("(store)"), None, true)
    }

    /// Reads the header and the newest valid slot, and refuses a catalog that breaks any
    /// store-level invariant, or data files that do not match the header's tiers (one per
    /// tier, each at least as long as its extents). A version-1 store opened for writing is
    /// upgraded (see [`upgrade`]).
    pub(crate) fn load(
        meta_file: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
        location: PathBuf,
        dir: Option<PathBuf>,
        read_only: bool,
    ) -> Result<Arc<Store>> {
        Store::load_as(meta_file, data, location, dir, read_only, false)
    }

    /// [`Store::load`]; `beside_writer`: read-only, without a lock, while a writer may commit
    /// (a slot it is writing is not valid, which is no sign of damage then).
    pub(crate) fn load_as(
        meta_file: Box<dyn StoreFile>,
        data: Vec<Box<dyn StoreFile>>,
        location: PathBuf,
        dir: Option<PathBuf>,
        read_only: bool,
        beside_writer: bool,
    ) -> Result<Arc<Store>> {
        let mut header = read_header(&*meta_file, &location)?;
        let meta_len = meta_file
            .size()
            .map_err(io_err("reading the metadata file's size"))?;
        if meta_len < header.meta_len() {
            return Err(StoreError::Corrupt(format!(
                "the metadata file is {meta_len} bytes, shorter than the {} its header implies",
                header.meta_len()
            )));
        }
        if data.len() != header.tiers.len() {
            return Err(StoreError::Invalid(format!(
                "the store has {} tier(s) ({}) but {} data file(s) were given",
                header.tiers.len(),
                header
                    .tiers
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                data.len()
            )));
        }
        let mut tiers = Vec::with_capacity(data.len());
        let mut first = 0u32;
        for (i, file) in data.into_iter().enumerate() {
            let rec = &header.tiers[i];
            let path = resolve(dir.as_deref(), &rec.path);
            if let Some(problem) = tier_len_problem(&*file, &header, i)? {
                return Err(StoreError::TierFile {
                    tier: rec.name.clone(),
                    path,
                    problem,
                });
            }
            if header.has_tier_headers() {
                if let Some(problem) = tier_header_problem(&*file, &header, i)? {
                    return Err(StoreError::TierFile {
                        tier: rec.name.clone(),
                        path,
                        problem,
                    });
                }
            }
            tiers.push(Tier {
                name: rec.name.clone(),
                path,
                first,
                extents: rec.extents,
                file,
                sync_lock: Mutex::new(()),
                syncs_started: AtomicU64::new(0),
                last_good_sync: AtomicU64::new(0),
            });
            first += rec.extents;
        }
        let slots = [
            read_slot(&*meta_file, &header, 0)?,
            read_slot(&*meta_file, &header, 1)?,
        ];
        let mut newest = newest(&slots)?;
        let Slot::Valid {
            generation,
            payload,
            version,
        } = &slots[newest]
        else {
            return Err(StoreError::Corrupt("no valid metadata slot".into()));
        };
        let mut generation = *generation;
        let (meta, recorded_free) = Meta::decode(payload, *version)?;
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
        for (i, s) in slots.iter().enumerate().filter(|_| !beside_writer) {
            if let Slot::Invalid(why) = s {
                // Normal after a crash during a commit (the next commit overwrites it), but
                // also what damage to the newest slot looks like: worth an operator's eye.
                warn!(
                    "{}: metadata slot {} is not valid ({why}); using slot {} (generation {generation}), \
                     as after a crash during a commit",
                    location.display(),
                    slot_name(i),
                    slot_name(newest)
                );
            }
        }
        // Each upgrade due, in turn: 1 → 2 (kept), 3 → 4 → 5, 4 → 5.
        while let Some(to) = upgrade_target(header.version).filter(|_| !read_only) {
            let old = header.version;
            if to == TIER_HEADER_VERSION {
                let files: Vec<&dyn StoreFile> = tiers.iter().map(|t| &*t.file).collect();
                let paths: Vec<PathBuf> = tiers.iter().map(|t| t.path.clone()).collect();
                upgrade_tiers(&files, &header, &paths)?;
            }
            let (upgraded, slot) = upgrade(&*meta_file, &header, &meta, newest, generation, to)?;
            header = upgraded;
            newest = slot;
            generation += 1;
            info!(
                "{}: upgraded the store from format version {old} to {to} (generation {generation}, slot {})",
                location.display(),
                slot_name(newest)
            );
        }
        debug!(
            "opened store {} (format version {}) at generation {generation} (slot {})",
            location.display(),
            header.version,
            slot_name(newest)
        );
        let grants = meta.owners.clone();
        let mut pool = PoolMem::from_meta(&meta.pool, tiers.len());
        pool.note_versions(&meta);
        Ok(Arc::new(Store {
            location,
            dir,
            header,
            meta_file,
            tiers,
            read_only,
            beside_writer,
            state: Mutex::new(MetaState {
                meta,
                generation,
                newest,
                change: None,
            }),
            grants: RwLock::new(grants),
            shared: Mutex::new(HashMap::new()),
            granting: Mutex::new(Vec::new()),
            direct_io: AtomicBool::new(false),
            lost_watchers: Mutex::new(Vec::new()),
            rados: None,
            pool: Mutex::new(pool),
            multi: std::sync::OnceLock::new(),
        }))
    }
}

/// The format a read-write open upgrades a store of format `version` to, if any: version 1 to
/// 2 (which is then kept as it is: *Format version 2* in docs/format.md), 3 to 4 (the tier
/// headers), 4 to 5 (the attachment records).
fn upgrade_target(version: u32) -> Option<u32> {
    match version {
        v if v < UPGRADE_VERSION => Some(UPGRADE_VERSION),
        3 => Some(TIER_HEADER_VERSION),
        4 => Some(ATTACH_VERSION),
        _ => None,
    }
}

/// What [`Store::open_wrapping_tiers`] passes each tier's data file through: the tier's name
/// and the file as opened, to the file the store uses.
pub type TierWrap<'a> = dyn Fn(&str, Box<dyn StoreFile>) -> Box<dyn StoreFile> + 'a;
