//! Divergence bisection of a served Tee (`dovetail_migrate::bisect`) carried out for a store's
//! disk: the journal's settings `serve` chose, the fresh versions a replay needs (the disk's
//! layouts in a scratch store, the candidate under the same fault rules), where reports are
//! kept, and the automatic policy (bisect when the versions first disagree).
//!
//! # Settings
//!
//! `serve --tee-journal N` makes every Tee the daemon starts keep a journal of its last `N`
//! mutating requests (`--tee-journal-bytes`: the data it may hold); `--auto-bisect` runs a
//! bisection on the first mismatch event of each Tee. They are process-wide (one daemon per
//! process), set once by `serve` before any disk is opened ([`configure`]).
//!
//! # Reports
//!
//! A report is a JSON file (RELIABILITY.md, "Divergence bisection reports") in the store's
//! `bisect/` directory (created 0700 beside `maps/`), named `bisect-DISK-BLOCK-UNIXMS.json`,
//! created 0600 and never over an existing file or through a symlink.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dovetail_layout::fault::{FaultLayout, FaultRule};
use dovetail_layout::BlockLayout;
use dovetail_migrate::bisect::{self, BisectReport, Members};
use dovetail_migrate::journal::JournalLimits;
use dovetail_migrate::mapfile::MapsDir;
use dovetail_migrate::{EventKind, Tee};
use dovetail_store::format::DISK_ALIGN;
use dovetail_store::Store;
use log::{info, warn};

use crate::ops::{open, OpsError};

/// The directory of reports in a store's directory.
pub const REPORTS_DIR: &str = "bisect";

/// Extent size of the scratch stores a replay runs in.
const SCRATCH_EXTENT: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    journal: Option<JournalLimits>,
    auto: bool,
}

static SETTINGS: Mutex<Settings> = Mutex::new(Settings {
    journal: None,
    auto: false,
});

/// Sets the journal every later Tee keeps (`None`: none) and whether it bisects on its own.
pub fn configure(journal: Option<JournalLimits>, auto: bool) {
    *SETTINGS.lock().unwrap_or_else(|p| p.into_inner()) = Settings { journal, auto };
}

/// The journal a new Tee keeps, as `serve` configured it.
pub fn journal_limits() -> Option<JournalLimits> {
    SETTINGS.lock().unwrap_or_else(|p| p.into_inner()).journal
}

pub(crate) fn auto() -> bool {
    SETTINGS.lock().unwrap_or_else(|p| p.into_inner()).auto
}

/// What a replay needs to make fresh versions like a Tee's.
#[derive(Debug, Clone)]
pub struct Shape {
    pub disk: String,
    pub trusted_layout: String,
    pub candidate_layout: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// The candidate's fault rules (testing).
    pub rules: Vec<FaultRule>,
}

impl Shape {
    /// The shape of disk `name`'s Tee, as the store's catalog says.
    pub fn of(store: &Store, name: &str) -> Result<Shape, OpsError> {
        let info = store.disk(name)?;
        let (Some(key), Some(rec)) = (info.candidate, info.tee) else {
            return Err(OpsError::Invalid(format!("disk {name} has no candidate")));
        };
        let rules = dovetail_layout::fault::parse_rules(&rec.faults)
            .map_err(|e| OpsError::Invalid(format!("disk {name}: fault rules: {e}")))?;
        Ok(Shape {
            disk: name.to_string(),
            trusted_layout: info.layout,
            candidate_layout: store.version(key)?.layout,
            size: info.size,
            rules,
        })
    }
}

/// Fresh pairs of versions in scratch stores under `root`, each store removed when the
/// factory is dropped.
#[derive(Debug)]
pub struct Scratch {
    shape: Shape,
    root: PathBuf,
    store_size: u64,
    made: Mutex<Vec<PathBuf>>,
}

static SCRATCH_SEQ: AtomicU64 = AtomicU64::new(0);

impl Scratch {
    /// A factory for `shape` whose replays hold at most `limits` of the journal.
    pub fn new(shape: Shape, root: &Path, limits: JournalLimits) -> Scratch {
        Self::sized(shape, root, limits, 2)
    }

    /// A factory for `shape` making `versions` versions per replay.
    pub(crate) fn sized(
        shape: Shape,
        root: &Path,
        limits: JournalLimits,
        versions: u64,
    ) -> Scratch {
        // Per version: the journal's data, a tree path per request (parallax's copy-on-write
        // keeps the old one until the next commit), and room for the trees' roots. The files
        // are sparse: only what the replay writes takes space.
        let per_version = (limits.bytes as u64)
            .saturating_mul(2)
            .saturating_add((limits.requests as u64).saturating_mul(32 << 10))
            .saturating_add(256 << 20);
        let store_size = per_version
            .saturating_mul(versions)
            .div_ceil(SCRATCH_EXTENT)
            .min(60_000)
            * SCRATCH_EXTENT;
        Scratch {
            shape,
            root: root.to_path_buf(),
            store_size,
            made: Mutex::new(Vec::new()),
        }
    }

    /// A fresh pair: both versions empty, the candidate under the shape's fault rules.
    pub fn make(&self) -> Result<Members, String> {
        let rules = &self.shape.rules;
        let mut v = self.make_versions(&[
            ("t", &self.shape.trusted_layout, &[]),
            ("c", &self.shape.candidate_layout, rules),
        ])?;
        let c = v.pop().ok_or("no candidate made")?;
        let t = v.pop().ok_or("no trusted version made")?;
        Ok((t, c))
    }

    /// Fresh, empty versions in one new scratch store, one per `(name, layout, fault rules)`.
    pub(crate) fn make_versions(
        &self,
        specs: &[(&str, &str, &[FaultRule])],
    ) -> Result<Vec<Arc<dyn BlockLayout>>, String> {
        let n = SCRATCH_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join(format!("dovetail-bisect-{}-{n}", std::process::id()));
        // 0700: the replay writes the guest's data there.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create the scratch store {}: {e}", dir.display()))?;
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.clone());
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!("scratch store {}: {what}: {e}", dir.display())
        };
        let store = Store::create(&dir, self.store_size, SCRATCH_EXTENT)
            .map_err(|e| fail("create", &dovetail_layout::error_chain(&e)))?;
        let size = self.shape.size.div_ceil(DISK_ALIGN) * DISK_ALIGN;
        let open_one = |name: &str,
                        layout: &str,
                        rules: &[FaultRule]|
         -> Result<Arc<dyn BlockLayout>, String> {
            let key = store
                .create_disk(name, size, layout)
                .map_err(|e| fail(name, &dovetail_layout::error_chain(&e)))?;
            let v = open::open_version(&store, name, key, layout, size)
                .map_err(|e| fail(name, &dovetail_layout::error_chain(&e)))?;
            let v: Arc<dyn BlockLayout> = Arc::new(v);
            if !rules.is_empty() {
                let space = store
                    .space(key)
                    .map_err(|e| fail(name, &dovetail_layout::error_chain(&e)))?;
                return Ok(Arc::new(
                    FaultLayout::new(v, rules.to_vec(), crate::ops::FAULT_SEED).with_space(space),
                ));
            }
            Ok(v)
        };
        specs
            .iter()
            .map(|(name, layout, rules)| open_one(name, layout, rules))
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for d in self
            .made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            if let Err(e) = std::fs::remove_dir_all(&d) {
                warn!("cannot remove the scratch store {}: {e}", d.display());
            }
        }
    }
}

/// Where scratch stores go: `$TMPDIR` (or /tmp).
pub fn scratch_root() -> PathBuf {
    std::env::temp_dir()
}

/// Writes `report` as `name` in the store's reports directory, records where (or why not) in
/// `saved`, and returns the file's path for the report's event.
pub fn save_report(
    store: &Store,
    saved: &Mutex<Result<PathBuf, String>>,
    name: &str,
    report: &impl serde::Serialize,
) -> Result<String, String> {
    let out = match reports_dir(store) {
        Ok(Some(d)) => bisect::write_report(&d, name, report)
            .map(|()| d.path().join(name))
            .map_err(|e| format!("cannot write {name}: {e}")),
        Ok(None) => Err("the store has no directory".to_string()),
        Err(e) => Err(format!("cannot open the reports directory: {e}")),
    };
    *saved.lock().unwrap_or_else(|p| p.into_inner()) = out.clone();
    out.map(|p| p.display().to_string())
}

/// The store's reports directory (created 0700 if missing), or `None` for a store without a
/// directory.
pub fn reports_dir(store: &Store) -> std::io::Result<Option<MapsDir>> {
    // The map path of any version is `DIR/maps/K.map`.
    let map = store.map_path(dovetail_store::VersionKey(0));
    let Some(dir) = map.parent().and_then(Path::parent) else {
        return Ok(None);
    };
    if !dir.is_dir() {
        return Ok(None);
    }
    let path = dir.join(REPORTS_DIR);
    match std::fs::DirBuilder::new().mode(0o700).create(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    MapsDir::open(&path).map(Some)
}

/// A bisection's result: the report and the file it was saved in.
#[derive(Debug, Clone)]
pub struct Bisected {
    pub report: BisectReport,
    /// Where the report was saved, or why it was not.
    pub file: Result<PathBuf, String>,
}

/// Bisects `tee` (disk `disk` of `store`) for `block` (or the block its first mismatch
/// names), saves the report in the store's reports directory and emits the `bisected` event
/// naming the file.
pub fn run(store: &Store, tee: &Tee, disk: &str, block: Option<u64>) -> Result<Bisected, String> {
    let limits = tee.journal().map(|j| j.limits()).ok_or_else(|| {
        "the tee keeps no request journal: serve with --tee-journal N (the requests it keeps), \
         then tee the disk again"
            .to_string()
    })?;
    let shape = Shape::of(store, disk).map_err(|e| dovetail_layout::error_chain(&e))?;
    let scratch = Scratch::new(shape, &scratch_root(), limits);
    let fresh = || scratch.make();
    let saved: Mutex<Result<PathBuf, String>> = Mutex::new(Err("not saved".to_string()));
    let save = |r: &BisectReport| save_report(store, &saved, &bisect::report_name(r), r);
    let report = tee.bisect(block, &fresh, Some(&save))?;
    drop(scratch);
    let file = saved.into_inner().unwrap_or_else(|p| p.into_inner());
    match &file {
        Ok(f) => info!("disk {disk}: {} (report: {})", report.verdict, f.display()),
        Err(why) => warn!("disk {disk}: {} (report not saved: {why})", report.verdict),
    }
    Ok(Bisected { report, file })
}

/// With `--auto-bisect`, bisects `tee` once, on a thread, when it first reports a mismatch.
/// The thread holds the Tee weakly and ends when the Tee is dropped.
pub fn watch(store: &Arc<Store>, tee: &Arc<Tee>, disk: &str) {
    if !auto() || tee.journal().is_none() {
        return;
    }
    let rx = tee.subscribe();
    let weak: Weak<Tee> = Arc::downgrade(tee);
    let store = store.clone();
    let name = disk.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("bisect-{name}"))
        .spawn(move || {
            let mut done = false;
            while let Ok(ev) = rx.recv() {
                if done || !matches!(ev.kind, EventKind::Mismatch | EventKind::LazyMismatch) {
                    continue;
                }
                done = true;
                let Some(tee) = weak.upgrade() else { return };
                info!("disk {name}: the versions disagree: bisecting the request journal");
                if let Err(e) = run(&store, &tee, &name, None) {
                    warn!("disk {name}: automatic bisection failed: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        warn!("disk {disk}: cannot start the automatic bisection: {e}");
    }
}
