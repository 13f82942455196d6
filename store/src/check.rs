//! `check`: verifies every store-level invariant of a store at rest — header (magic, format
//! version, checksum, geometry), both metadata slots, the catalog (grant table, extent lists,
//! versions, disks, tee records, free-space accounting), the tier table and each tier's data
//! file (present, long enough) — and notes
//! presence map files of versions the catalog no longer holds; then it hands each
//! version to the [`LayoutCheck`] of its layout, if one is supplied, for the invariants inside
//! its extents.

mod rados;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::file::StoreFile;
use crate::format::{validate, Meta, Slot, TeeState, TIER_HEADER_VERSION, UPGRADE_VERSION};
use crate::space::{ExtentId, Result, SharedRef, StoreError, VersionSpace};
use crate::store::{
    format_uuid, human_size, newest, not_a_regular_file, open_files, open_meta_unlocked,
    open_tier_in, read_header, read_slot, slot_name, tier_header_problem, tier_len_problem,
    tier_status, unproven_tier, DiskInfo, Store, StoreInfo, VersionInfo, MAPS_DIR,
};

/// Layout-level checks for one layout (e.g. `parallax-v1`: tree pointers stay inside the
/// version's extents, ...). Supplied by whoever knows the layout; the store only knows extents.
pub trait LayoutCheck: Send + Sync {
    /// The layout this checks, as the catalog names it.
    fn layout(&self) -> &str;
    /// Checks one version through a read-only space (writes, grants and commits are refused).
    /// Returns one sentence per violation; empty when the version is consistent.
    fn check(&self, version: &VersionInfo, space: Arc<dyn VersionSpace>) -> Vec<String>;
    /// The shared blocks the version's committed root record and snapshots reference (each
    /// once), for a store with a shared pool: `check` proves every one of them held by the
    /// version (none can be freed while referenced) and every block it holds referenced (none
    /// leaked). `None` (the default): the layout never references shared blocks; then any hold
    /// of the version is a leak. `Err`: the references could not be read (reported).
    fn shared_refs(
        &self,
        version: &VersionInfo,
        space: Arc<dyn VersionSpace>,
    ) -> std::result::Result<Option<Vec<SharedRef>>, String> {
        let _ = (version, space);
        Ok(None)
    }
}

/// What `check` found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The metadata file checked.
    pub location: PathBuf,
    /// Geometry and state, when the header and a slot could be read.
    pub info: Option<StoreInfo>,
    /// What each slot (A, B) holds, in words.
    pub slots: Vec<String>,
    pub disks: Vec<DiskInfo>,
    pub versions: Vec<VersionInfo>,
    /// Worth knowing, not wrong (a slot torn by a crash, a layout without a checker).
    pub notes: Vec<String>,
    /// Broken invariants: the store is not consistent.
    pub violations: Vec<String>,
    /// What could not be checked, and why ([`check_reader`] beside a writer that kept
    /// committing); `None` when everything was checked.
    pub unchecked: Option<String>,
    /// Checked beside a writer (a daemon serving the store, [`check_reader`]): files outside
    /// the metadata (presence maps, records) may change while they are read.
    pub beside_writer: bool,
}

impl Report {
    /// No violation found.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "store {}", self.location.display())?;
        if let Some(i) = &self.info {
            writeln!(
                f,
                "  format version {}, uuid {}",
                i.format_version,
                format_uuid(&i.uuid)
            )?;
            writeln!(
                f,
                "  {} extents of {} ({}): {} granted, {} free",
                i.extent_count,
                human_size(i.extent_size),
                human_size(i.extent_size * u64::from(i.extent_count)),
                i.extent_count - i.free_extents,
                i.free_extents
            )?;
            for t in &i.tiers {
                writeln!(
                    f,
                    "  tier {}: {}, {} extents ({}) from extent {}: {} granted, {} free",
                    t.name,
                    t.path.display(),
                    t.extents,
                    human_size(i.extent_size * u64::from(t.extents)),
                    t.first_extent,
                    t.extents - t.free,
                    t.free
                )?;
            }
            writeln!(f, "  metadata generation {}", i.generation)?;
        }
        for (i, s) in self.slots.iter().enumerate() {
            writeln!(f, "  slot {}: {s}", slot_name(i))?;
        }
        for d in &self.disks {
            let extents = |k: crate::VersionKey| {
                self.versions
                    .iter()
                    .find(|v| v.key == k)
                    .map_or(0, |v| v.extents.len())
            };
            write!(
                f,
                "  disk {}: {}, {}, trusted {} ({} extents)",
                d.name,
                human_size(d.size),
                d.layout,
                d.trusted,
                extents(d.trusted)
            )?;
            if let Some(c) = d.candidate {
                write!(f, ", candidate {c} ({} extents)", extents(c))?;
            }
            match &d.tee {
                Some(t) if t.state == TeeState::Quarantined => writeln!(
                    f,
                    ", tee {:?} quarantined at {}: {}",
                    t.policy, t.changed, t.reason
                )?,
                Some(t) => writeln!(f, ", tee {:?} active since {}", t.policy, t.changed)?,
                None => writeln!(f)?,
            }
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        for v in &self.violations {
            writeln!(f, "  VIOLATION: {v}")?;
        }
        if let Some(u) = &self.unchecked {
            writeln!(f, "  NOT CHECKED: {u}")?;
        }
        match self.violations.len() {
            0 if self.unchecked.is_some() => write!(
                f,
                "result: no violation in what was checked, but not everything was checked"
            ),
            0 => write!(f, "result: consistent"),
            1 => write!(f, "result: 1 violation"),
            n => write!(f, "result: {n} violations"),
        }
    }
}

/// Checks the store in `dir` (store-level invariants only).
pub fn check(dir: &Path) -> Result<Report> {
    check_with(dir, &[])
}

/// Checks the store in `dir`, then each version whose layout has a checker in `layouts`.
/// Takes a shared lock: a store open for writing elsewhere gets [`StoreError::InUse`]. Only
/// I/O failures and a missing store are errors; everything found wrong is in the report.
pub fn check_with(dir: &Path, layouts: &[&dyn LayoutCheck]) -> Result<Report> {
    if let Some(url) = crate::rados::RadosUrl::of(dir) {
        return rados::check(&url?, layouts);
    }
    let (meta, location) = open_files(dir, true)?;
    let mut r = check_inner(Box::new(meta), Files::Dir(dir), location, layouts, false)?;
    if r.info.is_some() {
        r.notes.extend(stray_maps(dir, &r.versions));
    }
    Ok(r)
}

/// Passes [`check_reader`] makes beside a writer before it gives up the layout-level checks.
pub const BESIDE_WRITER_PASSES: u32 = 20;

/// [`check_with`], also while a writer holds the store (a daemon serving it). Beside a writer
/// the last committed metadata is checked (its slot is checksummed, so what is found wrong
/// there is wrong), and a pass's layout-level checks count only if no commit happened during
/// the pass: the blocks of a commit stay as they are until the writer's next commit, so a
/// quiet pass saw one consistent state, never blocks reused under it. After
/// [`BESIDE_WRITER_PASSES`] passes that each saw a commit, the report holds the metadata-level
/// result and [`Report::unchecked`] says that the layouts could not be checked.
pub fn check_reader(dir: &Path, layouts: &[&dyn LayoutCheck]) -> Result<Report> {
    if let Some(url) = crate::rados::RadosUrl::of(dir) {
        return rados::check(&url?, layouts);
    }
    match check_with(dir, layouts) {
        Err(StoreError::InUse(_)) => {}
        r => return r,
    }
    let served = |r: &mut Report, passes: u32| {
        r.beside_writer = true;
        r.notes.push(format!(
            "the store is in use by another process (a daemon serving it): checked its last \
             committed metadata, generation {}, {}",
            r.info.as_ref().map_or(0, |i| i.generation),
            if passes == 1 {
                "during which it committed nothing".to_string()
            } else {
                format!("in pass {passes}: it committed during the earlier ones")
            }
        ));
        r.notes.extend(stray_maps(dir, &r.versions));
    };
    for pass in 1..=BESIDE_WRITER_PASSES {
        let (meta, location) = open_meta_unlocked(dir)?;
        let (probe, _) = open_meta_unlocked(dir)?;
        let before = committed_generation(&probe, &location);
        let mut r = check_inner(
            Box::new(meta),
            Files::Dir(dir),
            location.clone(),
            layouts,
            true,
        )?;
        let after = committed_generation(&probe, &location);
        let read = r.info.as_ref().map(|i| i.generation);
        if before.is_none() || r.info.is_none() {
            // No valid header or slot: nothing a commit in progress explains (it leaves the
            // other slot valid); the report says what is wrong.
            return Ok(r);
        }
        if before == after && read == before {
            served(&mut r, pass);
            return Ok(r);
        }
        std::thread::sleep(std::time::Duration::from_millis(u64::from(pass) * 5));
    }
    let (meta, location) = open_meta_unlocked(dir)?;
    let mut r = check_inner(Box::new(meta), Files::Dir(dir), location, &[], true)?;
    r.unchecked = Some(format!(
        "the layout-level checks (each version's tree): the daemon serving the store committed \
         during each of {BESIDE_WRITER_PASSES} passes, so no pass saw one consistent state; \
         run the check again when the disks are quieter, or with the daemon stopped"
    ));
    served(&mut r, BESIDE_WRITER_PASSES);
    Ok(r)
}

/// The newest valid slot's generation in `meta` now (`None` if none can be read).
fn committed_generation(meta: &std::fs::File, location: &Path) -> Option<u64> {
    let header = read_header(meta, location).ok()?;
    let slots = [
        read_slot(meta, &header, 0).ok()?,
        read_slot(meta, &header, 1).ok()?,
    ];
    match &slots[newest(&slots).ok()?] {
        Slot::Valid { generation, .. } => Some(*generation),
        _ => None,
    }
}

/// Notes for the files in `dir/maps` that are not the presence map of a version in the
/// catalog (left over when removing one failed; harmless, as keys are never reused).
fn stray_maps(dir: &Path, versions: &[VersionInfo]) -> Vec<String> {
    let maps = dir.join(MAPS_DIR);
    let Ok(entries) = std::fs::read_dir(&maps) else {
        return Vec::new();
    };
    let mut notes = Vec::new();
    let mut names: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        // Presence maps (`<key>.map`) and migration records (`<key>.migration`).
        let (key, what) = match (name.strip_suffix(".map"), name.strip_suffix(".migration")) {
            (Some(k), _) => (k.parse::<u64>().ok(), "presence map"),
            (_, Some(k)) => (k.parse::<u64>().ok(), "migration record"),
            _ => (None, ""),
        };
        match key {
            Some(k) if versions.iter().any(|v| v.key.0 == k) => {}
            Some(k) => notes.push(format!(
                "{MAPS_DIR}/{name} is the {what} of version {k}, which is not in the catalog \
                 (left over; safe to delete)"
            )),
            None => notes.push(format!(
                "{MAPS_DIR}/{name} is neither a presence map nor a migration record (expected \
                 <key>.map or <key>.migration)"
            )),
        }
    }
    notes
}

/// [`check_with`] over the given files (e.g. simulated ones), for a store of one tier.
pub fn check_on(
    meta: Box<dyn StoreFile>,
    data: Box<dyn StoreFile>,
    layouts: &[&dyn LayoutCheck],
) -> Result<Report> {
    check_on_tiers(meta, vec![data], layouts)
}

/// [`check_with`] over the given files: one data file per tier, in the header's order.
pub fn check_on_tiers(
    meta: Box<dyn StoreFile>,
    data: Vec<Box<dyn StoreFile>>,
    layouts: &[&dyn LayoutCheck],
) -> Result<Report> {
    check_inner(
        meta,
        Files::Given(data),
        PathBuf::from("(store)"),
        layouts,
        false,
    )
}

/// Where the tiers' data files come from.
enum Files<'a> {
    /// Opened read-only by the header's paths, resolved against this store directory.
    Dir(&'a Path),
    /// Given, one per tier.
    Given(Vec<Box<dyn StoreFile>>),
}

fn check_inner(
    meta: Box<dyn StoreFile>,
    files: Files<'_>,
    location: PathBuf,
    layouts: &[&dyn LayoutCheck],
    beside_writer: bool,
) -> Result<Report> {
    let mut r = Report {
        location: location.clone(),
        ..Report::default()
    };
    let header = match read_header(&*meta, &location) {
        Ok(h) => h,
        Err(e @ StoreError::Io { .. }) => return Err(e),
        Err(e) => {
            r.violations.push(format!("header: {e}"));
            return Ok(r);
        }
    };
    let meta_len = meta.size().map_err(|source| StoreError::Io {
        op: "reading the metadata file's size".into(),
        source,
    })?;
    if meta_len < header.meta_len() {
        r.violations.push(format!(
            "the metadata file is {meta_len} bytes, shorter than the {} its header implies",
            header.meta_len()
        ));
        return Ok(r);
    }
    if header.version < UPGRADE_VERSION {
        r.notes.push(format!(
            "format version {}: read as it is; the store is upgraded in place to format version \
             {UPGRADE_VERSION} the next time it is opened for writing",
            header.version
        ));
    }
    if header.version == 3 {
        r.notes.push(format!(
            "format version 3: its tier files carry no tier header; a read-write open upgrades the store \
             to format version {TIER_HEADER_VERSION}, which writes one into each"
        ));
    }
    if header.version == 4 {
        r.notes.push(format!(
            "format version 4: read as it is; a read-write open upgrades the store to format \
             version {}, which records the disks' attachments",
            crate::format::ATTACH_VERSION
        ));
    }
    let slots = [
        read_slot(&*meta, &header, 0)?,
        read_slot(&*meta, &header, 1)?,
    ];
    for (i, s) in slots.iter().enumerate() {
        r.slots.push(match s {
            Slot::Empty => "empty".to_string(),
            Slot::Invalid(why) => format!("not valid ({why})"),
            Slot::Valid {
                generation,
                payload,
                version,
            } if *version != header.version => format!(
                "generation {generation}, {} payload bytes, format version {version} (written before the upgrade)",
                payload.len()
            ),
            Slot::Valid {
                generation,
                payload,
                ..
            } => format!("generation {generation}, {} payload bytes", payload.len()),
        });
        if let Slot::Invalid(why) = s {
            r.notes.push(format!(
                "slot {} is not valid ({why}): a commit interrupted by a crash leaves this, and the next commit \
                 overwrites it; without a crash it means the metadata file was damaged and the slot's commit is lost",
                slot_name(i)
            ));
        }
    }
    let newest = match newest(&slots) {
        Ok(n) => n,
        Err(e) => {
            r.violations.push(format!("metadata: {e}"));
            return Ok(r);
        }
    };
    let Slot::Valid {
        generation,
        payload,
        version,
    } = &slots[newest]
    else {
        r.violations.push("metadata: no valid slot".into());
        return Ok(r);
    };
    let (m, recorded_free) = match Meta::decode(payload, *version) {
        Ok(x) => x,
        Err(e) => {
            r.violations
                .push(format!("metadata slot {}: {e}", slot_name(newest)));
            return Ok(r);
        }
    };
    r.violations.extend(validate(&header, &m, recorded_free));
    let dir = match &files {
        Files::Dir(d) => Some(*d),
        Files::Given(_) => None,
    };
    let tiers = tier_status(&header, dir, &m.owners);
    r.info = Some(StoreInfo {
        format_version: header.version,
        uuid: header.uuid,
        extent_size: header.extent_size,
        extent_count: header.extent_count,
        free_extents: m.free_extents(),
        generation: *generation,
        tiers: tiers.clone(),
    });
    r.disks = m.disks.iter().map(|d| Store::disk_info(&m, d)).collect();
    r.versions = m.versions.iter().map(Store::version_info).collect();

    // Each tier's data file: there, and long enough for the tier's extents.
    let data: Vec<Option<Box<dyn StoreFile>>> = match files {
        Files::Dir(d) => {
            // Not even read: a file that may not be the store's own is not opened.
            if let Err(e) = unproven_tier(&header, d) {
                r.violations.push(e.to_string());
                return Ok(r);
            }
            let mut v = Vec::with_capacity(tiers.len());
            let sdir = crate::safefs::Dir::open(d).map_err(|source| StoreError::Io {
                op: format!("opening directory {}", d.display()),
                source,
            })?;
            for (t, rec) in tiers.iter().zip(&header.tiers) {
                if let Some(problem) = not_a_regular_file(&t.path) {
                    r.violations.push(format!(
                        "tier {}: its data file {} {problem}",
                        t.name,
                        t.path.display()
                    ));
                    return Ok(r);
                }
                v.push(
                    open_tier_in(&sdir, &rec.path, &t.path, true)?
                        .map(|f| Box::new(f) as Box<dyn StoreFile>),
                );
            }
            v
        }
        Files::Given(v) if v.len() == tiers.len() => v.into_iter().map(Some).collect(),
        Files::Given(v) => {
            r.violations.push(format!(
                "the header names {} tier(s) but {} data file(s) were given",
                tiers.len(),
                v.len()
            ));
            return Ok(r);
        }
    };
    for (i, (t, file)) in tiers.iter().zip(&data).enumerate() {
        match file {
            None => r.violations.push(format!(
                "tier {}: its data file {} is missing",
                t.name,
                t.path.display()
            )),
            Some(f) => {
                let problem = match tier_len_problem(&**f, &header, i)? {
                    None if header.has_tier_headers() => tier_header_problem(&**f, &header, i)?,
                    p => p,
                };
                if let Some(problem) = problem {
                    r.violations.push(format!(
                        "tier {}: its data file {} {problem}",
                        t.name,
                        t.path.display()
                    ));
                }
            }
        }
    }
    if !r.violations.is_empty() {
        return Ok(r);
    }
    let data: Vec<Box<dyn StoreFile>> = data.into_iter().flatten().collect();

    // Layout-level checks, over a read-only store.
    let mut unchecked = BTreeSet::new();
    let mut work = Vec::new();
    for v in &r.versions {
        match layouts.iter().find(|c| c.layout() == v.layout) {
            Some(c) => work.push((v.clone(), *c)),
            None => {
                unchecked.insert(v.layout.clone());
            }
        }
    }
    for l in unchecked {
        r.notes.push(format!(
            "no layout-level check for {l}: only store-level invariants were checked for its versions"
        ));
    }
    if work.is_empty() && m.pool.is_empty() {
        return Ok(r);
    }
    let store = Store::load_as(
        meta,
        data,
        location,
        dir.map(Path::to_path_buf),
        true,
        beside_writer,
    )?;
    check_pool(&m, &store, &mut r);
    for (v, c) in work {
        let space = store.space(v.key)?;
        for problem in c.check(&v, space.clone()) {
            r.violations.push(format!(
                "{} (disk {:?}, {}): {problem}",
                v.key, v.disk, v.layout
            ));
        }
        if m.pool.is_empty() {
            continue;
        }
        let held: BTreeSet<SharedRef> = pool_refs(&m, v.key.0).into_iter().collect();
        let refs: BTreeSet<SharedRef> = match c.shared_refs(&v, space) {
            Ok(x) => x.unwrap_or_default().into_iter().collect(),
            Err(e) => {
                r.violations.push(format!(
                    "{} (disk {:?}, {}): its shared-block references cannot be read: {e}",
                    v.key, v.disk, v.layout
                ));
                continue;
            }
        };
        for b in refs.difference(&held) {
            r.violations.push(format!(
                "{} (disk {:?}, {}): its committed tree references {b}, which it does not hold \
                 (the block may be freed and rewritten while referenced)",
                v.key, v.disk, v.layout
            ));
        }
        for b in held.difference(&refs) {
            r.violations.push(format!(
                "{} (disk {:?}, {}): it holds {b}, which none of its committed trees references \
                 (a leaked shared block)",
                v.key, v.disk, v.layout
            ));
        }
    }
    Ok(r)
}

/// The shared blocks version `key` holds in catalog `m`.
fn pool_refs(m: &Meta, key: u64) -> Vec<SharedRef> {
    m.pool
        .holder(key)
        .map(|h| {
            h.blocks()
                .filter_map(|p| m.pool.place(p))
                .map(|(e, i)| SharedRef {
                    extent: ExtentId(e),
                    block: i,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The shared pool: every block some version holds still has the bytes its recorded crc32c
/// was computed over (a block that fails is damage every holder reads), and holds of versions
/// no layout check covers are noted.
fn check_pool(m: &Meta, store: &Store, r: &mut Report) {
    if m.pool.is_empty() {
        return;
    }
    let mut used = 0u64;
    let mut refs = 0u64;
    let mut buf = vec![0u8; crate::format::SHARED_BLOCK as usize];
    for p in 0..m.pool.blocks() {
        let n = m.pool.holders_of(p);
        if n == 0 {
            continue;
        }
        used += 1;
        refs += n as u64;
        let Some((e, i)) = m.pool.place(p) else {
            continue;
        };
        let b = SharedRef {
            extent: ExtentId(e),
            block: i,
        };
        match store.read_shared(b, &mut buf) {
            Ok(()) => {}
            Err(e @ StoreError::SharedCorrupt { .. }) => {
                r.violations.push(format!("shared pool: {e}"))
            }
            Err(e) => r.violations.push(format!("shared pool: reading {b}: {e}")),
        }
    }
    r.notes.push(format!(
        "shared pool (single-instance blocks {}): {} extents, {used} blocks in use, {refs} holds \
         ({} blocks saved)",
        if m.pool.enabled { "on" } else { "off" },
        m.pool.extents.len(),
        refs - used
    ));
}
