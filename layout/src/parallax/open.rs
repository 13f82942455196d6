//! Creating a parallax disk and opening one: the root record read, the tree swept, the
//! allocator and the annotations loaded.

use super::commit::spawn_persister;
use super::*;

impl Parallax {
    /// Creates an empty parallax-v1 disk of `capacity` sectors in `space`, which must hold no
    /// root record.
    pub fn create(space: Arc<dyn VersionSpace>, capacity: Sectors) -> Result<Parallax> {
        Parallax::create_with(space, capacity, ParallaxOptions::default())
    }

    /// [`create`](Parallax::create) with options.
    pub fn create_with(
        space: Arc<dyn VersionSpace>,
        capacity: Sectors,
        opts: ParallaxOptions,
    ) -> Result<Parallax> {
        Parallax::create_layout(space, "parallax-v1", capacity, opts)
    }

    /// Creates an empty disk of `layout` (`parallax-v1` or `parallax-v2`) of `capacity`
    /// sectors in `space`, which must hold no root record.
    pub fn create_layout(
        space: Arc<dyn VersionSpace>,
        layout: &str,
        capacity: Sectors,
        opts: ParallaxOptions,
    ) -> Result<Parallax> {
        if !space.root().is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a root record; open it instead",
                space.key()
            )));
        }
        let record = Parallax::initial_root(layout, capacity, space.tiers().len())?;
        space.commit_root(&record)?;
        log::info!("{layout}: created {} of {capacity}", space.key());
        Parallax::open_with(space, opts)
    }

    /// The root record of an empty disk of `layout` (`parallax-v1` or `parallax-v2`) of
    /// `capacity` sectors in a store of `tiers` tiers: what [`Parallax::create_layout`]
    /// commits. A store can commit it with the disk's catalog record, in the same commit
    /// (`Store::create_disk_with_root`): the disk is then formatted from its creation on, and
    /// its first open has nothing to commit.
    pub fn initial_root(layout: &str, capacity: Sectors, tiers: usize) -> Result<Vec<u8>> {
        if capacity.bytes().is_none() {
            return Err(Error::InvalidArgument(format!(
                "a capacity of {capacity} does not fit in 64-bit bytes"
            )));
        }
        let guest_blocks = disk_blocks(capacity);
        let (tree_capacity, v2) = match layout {
            "parallax-v1" => (capacity, None),
            "parallax-v2" => {
                if guest_blocks > format::MAX_V2_GUEST_BLOCKS {
                    return Err(Error::InvalidArgument(format!(
                        "a capacity of {capacity} is too large: a parallax-v2 disk holds at \
                         most {} blocks of 4 KiB",
                        format::MAX_V2_GUEST_BLOCKS
                    )));
                }
                let blocks = guest_blocks
                    + annotation_pages(guest_blocks)
                    + sumpage::pages_for(guest_blocks);
                let tree = blocks.checked_mul(SECTORS_PER_BLOCK).ok_or_else(|| {
                    Error::InvalidArgument(format!("a capacity of {capacity} is too large"))
                })?;
                (
                    Sectors(tree),
                    Some(V2Ext {
                        guest_capacity: capacity,
                        epoch_base: now_secs(),
                        epoch_secs: EPOCH_SECS,
                        active: 0,
                        labels: Vec::new(),
                        tiering: Some(format::Tiering {
                            policy: TierPolicy::defaults(tiers),
                            groups: Vec::new(),
                        }),
                        sums: true,
                    }),
                )
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown layout {other:?} (known: {})",
                    LAYOUTS.join(", ")
                )))
            }
        };
        if tree_capacity.bytes().is_none() {
            return Err(Error::InvalidArgument(format!(
                "a capacity of {capacity} is too large"
            )));
        }
        let record = RootRecord {
            capacity: tree_capacity,
            depth: depth_for(disk_blocks(tree_capacity)),
            root: NULL,
            gen: 0,
            snapshots: Vec::new(),
            v2,
        };
        Ok(record.encode())
    }

    /// Opens the disk whose root record `space` holds, and sweeps its trees to find free space.
    pub fn open(space: Arc<dyn VersionSpace>) -> Result<Parallax> {
        Parallax::open_with(space, ParallaxOptions::default())
    }

    /// [`open`](Parallax::open) with options.
    pub fn open_with(space: Arc<dyn VersionSpace>, opts: ParallaxOptions) -> Result<Parallax> {
        let inner = Parallax::open_inner(space, &opts)?;
        Parallax::start(inner, &opts)
    }

    /// The disk opened, before its background work starts.
    pub(super) fn open_inner(
        space: Arc<dyn VersionSpace>,
        opts: &ParallaxOptions,
    ) -> Result<Inner> {
        let bytes = space.root();
        if bytes.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} has no root record; create the disk first",
                space.key()
            )));
        }
        let mut record = RootRecord::decode(&bytes)?;
        sums::upgrade(&mut record, space.key());
        let extent_size = space.extent_size();
        let per_extent = extent_size / BLOCK_SIZE as u64;
        if extent_size % BLOCK_SIZE as u64 != 0 || per_extent == 0 || per_extent > 1 << 32 {
            return Err(Error::InvalidArgument(format!(
                "extents of {extent_size} bytes are not a whole number (1 to 2^32) of 4 KiB blocks"
            )));
        }
        let granted = space.extents();
        let (alloc, groups, place) = match &record.v2 {
            None => (Allocator::new(&granted, per_extent), Vec::new(), None),
            Some(v2) => {
                let tiers = space.tiers().len().max(1);
                let (policy, groups) = match &v2.tiering {
                    Some(t) => (t.policy, t.groups.clone()),
                    // Written before tiering: every extent is a group of one, hot data.
                    None => (
                        TierPolicy::defaults(tiers),
                        granted
                            .iter()
                            .map(|&e| format::Group {
                                class: Class::Hot,
                                compressed: false,
                                members: vec![e],
                            })
                            .collect(),
                    ),
                };
                policy
                    .validate(tiers)
                    .map_err(|why| Error::Corrupt(format!("root record: tiering policy: {why}")))?;
                let mut in_group = std::collections::HashSet::new();
                for g in &groups {
                    for m in &g.members {
                        if !granted.contains(m) {
                            return Err(Error::Corrupt(format!(
                                "root record: extent group member {m} is not granted to {}",
                                space.key()
                            )));
                        }
                        in_group.insert(*m);
                    }
                }
                let primaries: Vec<ExtentId> = groups.iter().map(|g| g.members[0]).collect();
                let spare: Vec<ExtentId> = granted
                    .iter()
                    .copied()
                    .filter(|e| !in_group.contains(e))
                    .collect();
                if !spare.is_empty() {
                    log::info!(
                        "parallax-v2: {}: {} granted extents are in no group (a crash came \
                         before they were committed or given back); they are given back after \
                         the next commit",
                        space.key(),
                        spare.len()
                    );
                }
                (
                    Allocator::new(&primaries, per_extent),
                    groups,
                    Some(groups::Placement::new(policy, spare)),
                )
            }
        };
        let ann = record.v2.as_ref().map(|v2| {
            let guest_blocks = disk_blocks(v2.guest_capacity);
            Ann {
                table: Table::new(
                    guest_blocks,
                    Epochs {
                        base: v2.epoch_base,
                        secs: v2.epoch_secs,
                    },
                ),
                at: v2.annotations_at(),
            }
        });
        if let (Some(a), Some(v2)) = (&ann, &record.v2) {
            a.table.set_active_taint(v2.active);
        }
        let sums = record.v2.as_ref().filter(|v2| v2.sums).map(|v2| {
            (
                sumpage::Sums::new(disk_blocks(v2.guest_capacity)),
                v2.sums_at(),
            )
        });
        let plain = ann.is_none() && sums.is_none() && place.is_none();
        let inner = Inner {
            blocks: disk_blocks(record.capacity),
            capacity: record
                .v2
                .as_ref()
                .map_or(record.capacity, |v| v.guest_capacity),
            tree_capacity: record.capacity,
            ann,
            sums,
            depth: record.depth,
            tiered: place.is_some(),
            committing: Mutex::new(()),
            group: Mutex::default(),
            stripes: stripes::Stripes::new(),
            inflight: stripes::Inflight::default(),
            reserve: Arc::default(),
            punches: Arc::default(),
            groups: RwLock::new(groups::GroupMap::new(groups)),
            temps: std::sync::Mutex::new(dovetail_tiering::Temps::default()),
            counters: groups::TierCounters::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
            pool: shared::PoolView::new(&*space, plain),
            grow_watch: Mutex::default(),
            cache: RwLock::new(NodeCache::new((opts.cache_bytes / BLOCK_SIZE).max(16))),
            state: RwLock::new(State {
                root: record.root,
                committed_root: record.root,
                gen: record.gen,
                snapshots: record.snapshots,
                alloc,
                pending: Vec::new(),
                changed: false,
                retry: Vec::new(),
                sweeping: None,
                v2: record.v2,
                place,
                pool_deferred: Vec::new(),
                pool_keep: false,
                persisting: Default::default(),
                moving: Default::default(),
                punching: Default::default(),
            }),
            space,
        };
        {
            let mut st = inner.write();
            let mut cache = inner.cache();
            inner.sweep(&mut st, &mut cache)?;
            if inner.pool.on {
                inner.pool_sweep(&mut st, &mut cache, true);
            }
            // Reads take the cache's lock themselves.
            drop(cache);
            inner.load_annotations(&st)?;
            inner.load_sums(&st)?;
        }
        Ok(inner)
    }

    /// Starts an opened disk's background work (the annotation timer).
    pub(super) fn start(inner: Inner, opts: &ParallaxOptions) -> Result<Parallax> {
        let inner = Arc::new(inner);
        if let (Some(every), Some(_)) = (opts.persist_every, &inner.ann) {
            spawn_persister(Arc::downgrade(&inner), every)?;
        }
        punch::spawn_puncher(&inner)?;
        Ok(Parallax { inner })
    }
}
