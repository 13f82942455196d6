//! The running daemon's disks, as the control socket sees and changes them.
//!
//! Every served disk is a [`LiveDisk`]: the device serves a [`Switch`] whose layout is the
//! trusted version alone or a Tee over the trusted and a candidate version. Control commands
//! (attach a candidate, change its policy, drop it, take a snapshot) prepare everything that
//! takes time first (catalog commits, opening and formatting the candidate, its presence map),
//! then pause the disk's I/O only for the swap itself: requests in flight complete, requests
//! arriving meanwhile wait, none fails. Every change is logged with its pause and published as
//! an event. Changes of one disk are serialised; different disks change independently.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dovetail_layout::parallax::format::MAX_COPIES;
use dovetail_layout::parallax::{Class, Mover, MoverEvent, Parallax, SnapshotInfo};
use dovetail_layout::{error_chain, BlockLayout, SECTOR_SIZE};
use dovetail_migrate::copyout::DEFAULT_RATE;
use dovetail_migrate::presence::MAP_BLOCK;
use dovetail_migrate::promote::{self, NotReady};
use dovetail_migrate::record::MigrationRecord;
use dovetail_migrate::verify::{Outcome, VerifyProgress, VerifyStatus, DEFAULT_VERIFY_RATE};
use dovetail_migrate::{
    CopyOut, CopyOutOptions, EventKind, JobState, Pause, PauseStats, Progress, Switch, TeeCounters,
};
use dovetail_store::{Store, TeeState, VersionKey};
use log::{debug, info, warn};
use serde::Serialize;

use crate::disk::Disk;
use crate::metrics::{Exposition, Metered, VersionMetrics};
use crate::ops::teed::{self, Candidate};
use crate::ops::OpsError;

use crate::daemon::events::unix_ms;
pub use crate::daemon::events::{DaemonEvent, EventHub, Follower, EVENT_RING, FOLLOWER_QUEUE};
use crate::daemon::tiers::MoverLog;
pub use crate::daemon::tiers::{
    MoverError, MoverRound, MoverStatus, TierChange, TiersReport, DEFAULT_MOVER_INTERVAL,
};

mod tiers;

/// The shortest time between two pauses of one disk: a client repeating reconfiguration
/// commands in a loop cannot keep a disk paused.
pub const MIN_PAUSE_GAP: Duration = Duration::from_millis(20);

pub use crate::daemon::proto::{CommandError, ErrorCode};

impl From<OpsError> for CommandError {
    fn from(e: OpsError) -> CommandError {
        let code = match &e {
            OpsError::Invalid(_) => ErrorCode::Invalid,
            _ => ErrorCode::Failed,
        };
        CommandError::new(code, error_chain(&e))
    }
}

impl From<dovetail_store::StoreError> for CommandError {
    fn from(e: dovetail_store::StoreError) -> CommandError {
        CommandError::new(ErrorCode::Failed, error_chain(&e))
    }
}

/// Where a disk's data lives.
#[derive(Debug)]
enum Backing {
    /// A raw image file given to `serve --image`: no versions to change.
    Image { path: PathBuf },
    /// A disk of a store: its trusted version is open once, here, and shared by whatever the
    /// switch serves.
    Store { store: Arc<Store> },
}

/// What may change while the disk is served (guarded by the disk's control lock).
#[derive(Debug)]
struct VersionSet {
    /// The trusted version as served (metered).
    trusted: Arc<dyn BlockLayout>,
    /// The trusted version itself (a store disk's), for snapshots.
    parallax: Option<Arc<Parallax>>,
    trusted_metrics: Arc<VersionMetrics>,
    /// The candidate's copy-out, if one was started.
    migration: Option<Migration>,
    trusted_key: Option<VersionKey>,
    trusted_layout: String,
    candidate: Option<Candidate>,
    last_pause: Option<Instant>,
    /// The trusted version's tier mover (parallax-v2 only, unless disabled); dropped (which
    /// stops it) before that version stops being trusted.
    mover: Option<Mover>,
}

/// How a disk's blocks move to its candidate (kept in the migration record).
pub use dovetail_migrate::record::MigrationMode;

/// A migration in progress.
#[derive(Debug)]
struct Migration {
    mode: MigrationMode,
    job: Option<CopyOut>,
}

impl Migration {
    /// Stops the job (a last checkpoint keeps what it copied).
    fn stop(self) {
        if let Some(j) = self.job {
            j.cancel();
        }
    }
}

/// A disk's migration as `status` and `migrate` report it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    /// `copy-out`, `upgrade-on-write`, or `null` when none was started.
    pub mode: Option<&'static str>,
    pub blocks_present: u64,
    pub blocks_total: u64,
    /// The copy-out job's progress.
    pub copy_out: Option<Progress>,
    /// Promote's verification pass: the one running or last run, or what the migration record
    /// says it checkpointed (`state` "checkpointed"); `null` if none ran.
    pub verify: Option<VerifyStatus>,
}

fn unreachable_status(key: VersionKey) -> MigrationStatus {
    warn!("no migration status for {key}");
    MigrationStatus {
        mode: None,
        blocks_present: 0,
        blocks_total: 0,
        copy_out: None,
        verify: None,
    }
}

fn c_present(set: &VersionSet) -> u64 {
    set.candidate
        .as_ref()
        .map_or(0, |c| c.tee.presence().count())
}

fn c_total(set: &VersionSet) -> u64 {
    set.candidate
        .as_ref()
        .map_or(0, |c| c.tee.presence().blocks())
}

/// The directory holding candidate `key`'s presence map and migration record (`maps/`).
fn maps_dir(store: &Store, key: VersionKey) -> PathBuf {
    let map = store.map_path(key);
    map.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Reads the migration record of candidate `key` (docs/format.md): `None` if there is none or
/// it is unreadable (logged loudly: the operator starts the migration again). A version 1
/// record is rewritten as version 2.
fn read_record(store: &Store, key: VersionKey) -> Option<MigrationRecord> {
    match MigrationRecord::load(&maps_dir(store, key), key.0) {
        Ok(None) => None,
        Ok(Some(loaded)) => {
            match loaded.upgraded {
                None => {}
                Some(Ok(version)) => {
                    info!("upgraded the migration record of {key} from format version {version}")
                }
                Some(Err(e)) => warn!(
                    "cannot upgrade the migration record of {key}: {}",
                    error_chain(&e)
                ),
            }
            Some(loaded.record)
        }
        Err(e) => {
            warn!(
                "IGNORING the migration record of {key}: {}; a migration it recorded is not \
                 resumed (start it again with `ctl migrate`)",
                error_chain(&e)
            );
            None
        }
    }
}

/// Changes candidate `key`'s migration record (a new one if there is none) and writes it.
fn update_record(
    store: &Store,
    key: VersionKey,
    blocks: u64,
    change: impl FnOnce(&mut MigrationRecord),
) -> Result<(), String> {
    let mut r = MigrationRecord::for_candidate(read_record(store, key), key.0, blocks);
    change(&mut r);
    r.write(&maps_dir(store, key)).map_err(|e| error_chain(&e))
}

fn write_record(
    store: &Store,
    key: VersionKey,
    blocks: u64,
    mode: MigrationMode,
    rate: u64,
) -> Result<(), String> {
    update_record(store, key, blocks, |r| {
        r.mode = Some(mode);
        r.rate = rate;
    })
}

fn remove_record(store: &Store, key: VersionKey) {
    if let Err(e) = MigrationRecord::remove(&maps_dir(store, key), key.0) {
        warn!(
            "cannot remove the migration record of {key}: {}",
            error_chain(&e)
        );
    }
}

/// One served disk.
#[derive(Debug)]
pub struct LiveDisk {
    pub name: String,
    /// The vhost-user socket it is served on.
    pub socket: PathBuf,
    /// What the device serves (its layout is the switch).
    pub disk: Arc<Disk>,
    pub switch: Arc<Switch>,
    backing: Backing,
    set: Mutex<VersionSet>,
    events: Arc<EventHub>,
    /// Guests that connected so far, and whether one is connected now.
    pub guests: AtomicU64,
    pub connected: std::sync::atomic::AtomicBool,
    /// Connections refused because a guest was connected already.
    pub refused: AtomicU64,
    /// How often the trusted version's tier mover runs (`None`: it does not).
    mover_interval: Option<Duration>,
    /// What the tier movers of this disk reported.
    mover_log: Arc<Mutex<MoverLog>>,
    /// Promote's verification pass running or last run (with the candidate's key).
    verify: Mutex<Option<(VersionKey, Arc<VerifyProgress>)>>,
    /// Set at shutdown: a verification pass stops.
    stopping: std::sync::atomic::AtomicBool,
}

/// A candidate as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateStatus {
    pub version: u64,
    pub layout: String,
    pub policy: String,
    /// `active` or `quarantined`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// 4 KiB blocks the candidate holds, of `blocks_total`.
    pub blocks_present: u64,
    pub blocks_total: u64,
    pub counters: Option<TeeCounters>,
}

/// One disk as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    pub name: String,
    pub socket: PathBuf,
    pub size: u64,
    pub read_only: bool,
    /// The trusted version's key (absent for an image file).
    pub trusted_version: Option<u64>,
    pub trusted_layout: String,
    pub candidate: Option<CandidateStatus>,
    pub guest_connected: bool,
    pub guests: u64,
    /// Connections refused because a guest was connected already.
    pub refused_connections: u64,
    pub requests: crate::metrics::RequestSnapshot,
    pub pauses: PauseStats,
    /// The candidate's migration (`null` without a candidate).
    pub migration: Option<MigrationStatus>,
}

impl LiveDisk {
    /// A disk of a store, opened as its catalog says (trusted alone, or teed). A parallax-v2
    /// trusted version runs its tier mover every `mover_interval` (`None`: never; nor when the
    /// disk is served read-only).
    pub fn open_store(
        store: &Arc<Store>,
        name: &str,
        socket: &Path,
        read_only: bool,
        events: Arc<EventHub>,
        mover_interval: Option<Duration>,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        let info = store.disk(name)?;
        let trusted = Arc::new(crate::ops::open::open_disk(store, name)?);
        if !read_only {
            // Extents granted ahead of need, so requests rarely wait for a grant.
            if let Err(e) = trusted.start_reserve() {
                log::warn!("disk {name}: no extent reserve: {e}");
            }
        }
        let trusted_metrics = Arc::new(VersionMetrics::default());
        let served: Arc<dyn BlockLayout> =
            Arc::new(Metered::new(trusted.clone(), trusted_metrics.clone()));
        let candidate = teed::attach_candidate(store, name, served.clone())?;
        info!("disk {name}: {}", teed::describe(&info, candidate.as_ref()));
        let current: Arc<dyn BlockLayout> = match &candidate {
            Some(c) => c.tee.clone(),
            None => served.clone(),
        };
        let set = VersionSet {
            trusted: served,
            parallax: Some(trusted),
            trusted_metrics,
            migration: None,
            trusted_key: Some(info.trusted),
            trusted_layout: info.layout.clone(),
            candidate,
            last_pause: None,
            mover: None,
        };
        let live = LiveDisk::new(
            name,
            socket,
            current,
            read_only,
            Backing::Store {
                store: store.clone(),
            },
            set,
            events,
            mover_interval,
        )?;
        {
            let mut set = live.lock();
            set.mover = set.parallax.clone().and_then(|p| live.start_mover(&p));
            if let Some(c) = &set.candidate {
                live.forward_tee_events(c);
                let rec = read_record(store, c.key);
                if let Some(r) = rec.filter(|r| r.verified > 0) {
                    info!(
                        "disk {name}: promote's verification pass checkpointed {} of {} blocks; \
                         the next `promote` resumes it there",
                        r.verified, r.blocks
                    );
                }
                if let Some((mode, rate)) = rec.and_then(|r| Some((r.mode?, r.rate))) {
                    info!(
                        "disk {name}: resuming the migration by {} ({} of {} blocks in the \
                         candidate)",
                        mode.name(),
                        c.tee.presence().count(),
                        c.tee.presence().blocks()
                    );
                    match live.start_migration(&set, mode, rate) {
                        Ok(m) => set.migration = Some(m),
                        Err(e) => warn!("disk {name}: cannot resume the migration: {}", e.message),
                    }
                }
            }
        }
        Ok(live)
    }

    /// A raw image file (`serve --image`).
    pub fn open_image(
        name: &str,
        path: &Path,
        layout: Arc<dyn BlockLayout>,
        socket: &Path,
        read_only: bool,
        serial: &str,
        events: Arc<EventHub>,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        let trusted_metrics = Arc::new(VersionMetrics::default());
        let served: Arc<dyn BlockLayout> = Arc::new(Metered::new(layout, trusted_metrics.clone()));
        let set = VersionSet {
            trusted: served.clone(),
            parallax: None,
            trusted_metrics,
            migration: None,
            trusted_key: None,
            trusted_layout: "raw".into(),
            candidate: None,
            last_pause: None,
            mover: None,
        };
        let live = LiveDisk::new_with_serial(
            name,
            socket,
            served,
            read_only,
            serial,
            Backing::Image {
                path: path.to_path_buf(),
            },
            set,
            events,
            None,
        )?;
        Ok(live)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        socket: &Path,
        current: Arc<dyn BlockLayout>,
        read_only: bool,
        backing: Backing,
        set: VersionSet,
        events: Arc<EventHub>,
        mover_interval: Option<Duration>,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        // The serial is the disk's name, cut to what fits in a virtio-blk ID.
        let serial: String = name
            .chars()
            .scan(0, |n, c| {
                *n += c.len_utf8();
                (*n <= crate::disk::SERIAL_LEN).then_some(c)
            })
            .collect();
        LiveDisk::new_with_serial(
            name,
            socket,
            current,
            read_only,
            &serial,
            backing,
            set,
            events,
            mover_interval,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new_with_serial(
        name: &str,
        socket: &Path,
        current: Arc<dyn BlockLayout>,
        read_only: bool,
        serial: &str,
        backing: Backing,
        set: VersionSet,
        events: Arc<EventHub>,
        mover_interval: Option<Duration>,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        let switch = Arc::new(Switch::new(current));
        let disk = Arc::new(Disk::new(switch.clone(), read_only, serial)?.with_name(name));
        Ok(Arc::new(LiveDisk {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            disk,
            switch,
            backing,
            set: Mutex::new(set),
            events,
            guests: AtomicU64::new(0),
            connected: std::sync::atomic::AtomicBool::new(false),
            refused: AtomicU64::new(0),
            mover_interval: mover_interval.filter(|i| !i.is_zero()),
            mover_log: Arc::default(),
            verify: Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, VersionSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn store(&self) -> Result<&Arc<Store>, CommandError> {
        match &self.backing {
            Backing::Store { store } => Ok(store),
            Backing::Image { path } => Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} is the image file {}, served outside a store: it has no versions \
                     to change or snapshot",
                    self.name,
                    path.display()
                ),
            )),
        }
    }

    /// Relays what the candidate's Tee reports into the daemon's events, on a thread that ends
    /// when the Tee is dropped.
    fn forward_tee_events(&self, c: &Candidate) {
        let rx = c.tee.subscribe();
        let events = self.events.clone();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("events-{name}"))
            .spawn(move || {
                while let Ok(ev) = rx.recv() {
                    // The daemon reports policy changes itself, with their pause.
                    if ev.kind == EventKind::PolicyChanged {
                        continue;
                    }
                    let kind = serde_json::to_value(ev.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("{:?}", ev.kind));
                    events.publish(&name, &kind, "tee", ev.message.clone(), None, Some(ev));
                }
            });
        if let Err(e) = spawned {
            warn!("disk {}: cannot relay the Tee's events: {e}", self.name);
        }
    }

    /// Waits, if needed, so that pauses of this disk are at least [`MIN_PAUSE_GAP`] apart.
    fn pace(set: &mut VersionSet) {
        if let Some(last) = set.last_pause {
            let since = last.elapsed();
            if since < MIN_PAUSE_GAP {
                std::thread::sleep(MIN_PAUSE_GAP - since);
            }
        }
    }

    fn changed(&self, set: &mut VersionSet, kind: &str, message: String, pause: Pause) {
        set.last_pause = Some(Instant::now());
        info!("disk {}: {message}; I/O paused {pause}", self.name);
        self.events
            .publish(&self.name, kind, "daemon", message, Some(pause), None);
    }

    /// `tee`: attaches a new, empty candidate of `layout` validated under `policy`.
    pub fn attach(
        &self,
        layout: &str,
        policy: &str,
        faults: &[String],
    ) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        if !crate::ops::STORE_LAYOUTS.contains(&layout) {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!(
                    "unknown layout {layout:?}; one of: {}",
                    crate::ops::STORE_LAYOUTS.join(", ")
                ),
            ));
        }
        teed::parse_policy(policy)?;
        let mut set = self.lock();
        let info = store.disk(&self.name)?;
        if let Some(k) = info.candidate {
            let state = match &info.tee {
                Some(t) if t.state == TeeState::Quarantined => {
                    format!("quarantined: {}", t.reason)
                }
                _ => "active".to_string(),
            };
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} already has candidate {k} ({state}); `untee` drops it, `policy` \
                     changes its policy",
                    self.name
                ),
            ));
        }
        // Prepare everything before pausing: the catalog, the candidate, its presence map.
        teed::tee_disk(store, &self.name, layout, policy, faults)?;
        let candidate = match teed::attach_candidate(store, &self.name, set.trusted.clone()) {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(CommandError::new(
                    ErrorCode::Failed,
                    format!("disk {}: the candidate was not attached", self.name),
                ))
            }
            Err(e) => {
                let err = CommandError::from(e);
                if let Err(e2) = store.drop_candidate(&self.name) {
                    warn!(
                        "disk {}: cannot drop the candidate that failed to start: {}",
                        self.name,
                        error_chain(&e2)
                    );
                }
                return Err(err);
            }
        };
        Self::pace(&mut set);
        let tee: Arc<dyn BlockLayout> = candidate.tee.clone();
        let (swapped, pause) = self.switch.replace(tee);
        if let Err(e) = swapped {
            let _ = candidate.tee.close();
            drop(candidate);
            let _ = store.drop_candidate(&self.name);
            return Err(CommandError::new(ErrorCode::Failed, e.to_string()));
        }
        self.forward_tee_events(&candidate);
        let message = format!(
            "attached candidate {} ({}), policy {}{}",
            candidate.key,
            candidate.layout,
            candidate.tee.policy(),
            if faults.is_empty() {
                String::new()
            } else {
                format!(", faults {}", faults.join(" "))
            }
        );
        set.candidate = Some(candidate);
        self.changed(&mut set, "candidate-attached", message.clone(), pause);
        Ok((message, pause))
    }

    /// `policy`: changes the candidate's validation policy.
    pub fn set_policy(&self, policy: &str) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        let p = teed::parse_policy(policy)?;
        let mut set = self.lock();
        let Some(c) = &set.candidate else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} has no active candidate; `tee` attaches one",
                    self.name
                ),
            ));
        };
        if c.tee.quarantined() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: candidate {} is quarantined; `untee` drops it",
                    self.name, c.key
                ),
            ));
        }
        let old = c.tee.policy();
        let Some(mut rec) = store.tee(&self.name)? else {
            return Err(CommandError::new(
                ErrorCode::Failed,
                format!("disk {}: the catalog has no tee record", self.name),
            ));
        };
        rec.policy = p.to_string();
        rec.changed = unix_ms() / 1000;
        store.set_tee(&self.name, rec)?;
        let tee = c.tee.clone();
        Self::pace(&mut set);
        // A copy-out holds the Tee's locks while it copies a batch or checkpoints: park it
        // first, so the pause does not wait behind it.
        let held = set
            .migration
            .as_ref()
            .and_then(|m| m.job.as_ref())
            .map(CopyOut::hold);
        let (r, pause) = self.switch.pause(|_| tee.set_policy(p));
        if held == Some(true) {
            if let Some(job) = set.migration.as_ref().and_then(|m| m.job.as_ref()) {
                job.resume();
            }
        }
        r.map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
        let message = format!("policy changed from {old} to {p}");
        self.changed(&mut set, "policy-changed", message.clone(), pause);
        Ok((message, pause))
    }

    /// `untee` (and `abort`): drops the candidate and frees its extents; the trusted version
    /// serves the disk alone.
    pub fn detach(&self) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        let mut set = self.lock();
        let info = store.disk(&self.name)?;
        if info.candidate.is_none() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no candidate", self.name),
            ));
        }
        if let Some(m) = set.migration.take() {
            m.stop();
        }
        if let Some(c) = &set.candidate {
            remove_record(store, c.key);
        }
        Self::pace(&mut set);
        let trusted = set.trusted.clone();
        let candidate = set.candidate.take();
        let ((), pause) = self.switch.pause(|cur| {
            if let Some(c) = &candidate {
                // Under async-new-primary the trusted version lags: bring it up to date
                // before it serves alone.
                c.tee.drain();
            }
            *cur = trusted;
        });
        if let Some(c) = candidate {
            if let Err(e) = c.tee.close() {
                warn!(
                    "disk {}: closing the Tee of candidate {}: {}",
                    self.name,
                    c.key,
                    error_chain(&e)
                );
            }
        }
        let before = store.info().free_extents;
        let key = store.drop_candidate(&self.name)?;
        let freed = store.info().free_extents.saturating_sub(before);
        let message = format!("dropped candidate {key}, {freed} extent(s) freed");
        self.changed(&mut set, "candidate-dropped", message.clone(), pause);
        Ok((message, pause))
    }

    /// `migrate`: starts migrating every block to the candidate. `copy-out` runs the background
    /// job (and resumes it after a restart); `upgrade-on-write` lets guest writes alone bring
    /// blocks over (the Tee always does that). A copy-out already running gets the new rate.
    pub fn migrate(&self, mode: &str, rate: Option<u64>) -> Result<MigrationStatus, CommandError> {
        let store = self.store()?;
        let mut set = self.lock();
        let c = self.active_candidate(&set)?;
        let Some(mode) = MigrationMode::parse(mode) else {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!(
                    "unknown migration mode {mode:?}; copy-out, copy-on-read or upgrade-on-write"
                ),
            ));
        };
        let key = c.key;
        if let Some(m) = &set.migration {
            if let (Some(job), true) = (&m.job, m.mode == mode) {
                let complete = c.tee.presence().count() == c.tee.presence().blocks();
                if !job.state().finished() || (job.state() == JobState::Done && complete) {
                    if let Some(r) = rate {
                        // A restart resumes the copy-out at the new rate.
                        write_record(store, key, c.tee.presence().blocks(), mode, r).map_err(
                            |e| {
                                CommandError::new(
                                    ErrorCode::Failed,
                                    format!("recording the new rate: {e}"),
                                )
                            },
                        )?;
                        job.set_rate(r);
                        info!(
                            "disk {}: {} rate changed to {}",
                            self.name,
                            mode.name(),
                            dovetail_migrate::copyout::rate_text(r)
                        );
                    }
                    return Ok(self
                        .migration_of(&set)
                        .unwrap_or_else(|| unreachable_status(key)));
                }
            }
        }
        write_record(
            store,
            key,
            c.tee.presence().blocks(),
            mode,
            rate.unwrap_or(DEFAULT_RATE),
        )
        .map_err(|e| {
            CommandError::new(ErrorCode::Failed, format!("recording the migration: {e}"))
        })?;
        // A job of another mode stops first (what it copied stays).
        if let Some(old) = set.migration.take() {
            old.stop();
        }
        let migration = self.start_migration(&set, mode, rate.unwrap_or(DEFAULT_RATE))?;
        set.migration = Some(migration);
        let message = format!(
            "migration by {} started ({} of {} blocks in the candidate)",
            mode.name(),
            c_present(&set),
            c_total(&set)
        );
        info!("disk {}: {message}", self.name);
        self.events.publish(
            &self.name,
            "migration-started",
            "daemon",
            message,
            None,
            None,
        );
        Ok(self
            .migration_of(&set)
            .unwrap_or_else(|| unreachable_status(key)))
    }

    fn active_candidate<'a>(&self, set: &'a VersionSet) -> Result<&'a Candidate, CommandError> {
        let Some(c) = &set.candidate else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} has no active candidate; `tee` attaches one",
                    self.name
                ),
            ));
        };
        if c.tee.quarantined() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: candidate {} is quarantined; `untee` drops it",
                    self.name, c.key
                ),
            ));
        }
        Ok(c)
    }

    fn start_migration(
        &self,
        set: &VersionSet,
        mode: MigrationMode,
        rate: u64,
    ) -> Result<Migration, CommandError> {
        let c = self.active_candidate(set)?;
        let job = match mode {
            MigrationMode::UpgradeOnWrite => None,
            MigrationMode::CopyOut | MigrationMode::CopyOnRead => {
                let upgrade: Arc<dyn dovetail_migrate::Upgrade> = Arc::from(
                    dovetail_migrate::upgrade::for_versions(
                        &set.trusted_layout,
                        set.parallax.clone(),
                        &c.parallax,
                    )
                    .ok_or_else(|| {
                        CommandError::new(
                            ErrorCode::Invalid,
                            format!(
                                "no upgrade from {} to {} is known",
                                set.trusted_layout, c.layout
                            ),
                        )
                    })?,
                );
                let (events, name) = (self.events.clone(), self.name.clone());
                let opts = CopyOutOptions {
                    rate,
                    scope: if mode == MigrationMode::CopyOnRead {
                        dovetail_migrate::Scope::ReadBlocks
                    } else {
                        dovetail_migrate::Scope::Everything
                    },
                    ..CopyOutOptions::default()
                };
                let job = CopyOut::start(
                    &c.tee,
                    upgrade,
                    opts,
                    Box::new(move |state, message| {
                        let kind = match state {
                            JobState::Done => "migration-done",
                            JobState::Cancelled => "migration-cancelled",
                            _ => "migration-stopped",
                        };
                        events.publish(&name, kind, "daemon", message, None, None);
                    }),
                )
                .map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
                Some(job)
            }
        };
        Ok(Migration { mode, job })
    }

    /// `migrate --pause/--resume/--cancel`.
    pub fn migration_action(&self, action: &str) -> Result<MigrationStatus, CommandError> {
        let store = self.store()?;
        let mut set = self.lock();
        let Some(m) = &set.migration else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no migration", self.name),
            ));
        };
        let Some(job) = &m.job else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} migrates by upgrade-on-write: there is no job to {action}",
                    self.name
                ),
            ));
        };
        let ok = match action {
            "pause" => job.pause(),
            "resume" => job.resume(),
            "cancel" => {
                job.cancel();
                true
            }
            other => {
                return Err(CommandError::new(
                    ErrorCode::Invalid,
                    format!("unknown migration action {other:?}"),
                ))
            }
        };
        if !ok {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: the copy-out is {:?}; cannot {action} it",
                    self.name,
                    job.state()
                ),
            ));
        }
        let status = self.migration_of(&set);
        if action == "cancel" {
            if let Some(c) = &set.candidate {
                remove_record(store, c.key);
            }
            set.migration = None;
        }
        self.events.publish(
            &self.name,
            match action {
                "pause" => "migration-paused",
                "resume" => "migration-resumed",
                _ => "migration-cancelled",
            },
            "daemon",
            format!("copy-out {action}"),
            None,
            None,
        );
        Ok(status.unwrap_or_else(|| unreachable_status(VersionKey(0))))
    }

    fn migration_of(&self, set: &VersionSet) -> Option<MigrationStatus> {
        let c = set.candidate.as_ref()?;
        let m = set.migration.as_ref();
        Some(MigrationStatus {
            mode: m.map(|m| m.mode.name()),
            blocks_present: c.tee.presence().count(),
            blocks_total: c.tee.presence().blocks(),
            copy_out: m.and_then(|m| m.job.as_ref()).map(CopyOut::progress),
            verify: self.verify_status(c),
        })
    }

    /// Promote's verification pass of candidate `c`, as `migrate --status` shows it.
    fn verify_status(&self, c: &Candidate) -> Option<VerifyStatus> {
        let slot = self.verify.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, p)) = &*slot {
            if *k == c.key {
                return Some(p.status());
            }
        }
        drop(slot);
        let Backing::Store { store } = &self.backing else {
            return None;
        };
        let (r, _) = MigrationRecord::read(&maps_dir(store, c.key), c.key.0).ok()??;
        (r.verified > 0).then(|| VerifyStatus {
            state: "checkpointed",
            blocks_verified: r.verified,
            blocks_total: r.blocks,
            resumed_from: 0,
            mismatched_blocks: 0,
            first_mismatches: Vec::new(),
            rate_limit: 0,
            error: None,
        })
    }

    /// Runs promote's verification pass over the disk's candidate (docs: README, "Migrating a
    /// disk"), without holding the disk's control lock (guest I/O and `status` go on), from the
    /// cursor the migration record checkpointed. `Ok(key)`: every block of candidate `key`
    /// equals the trusted version. A mismatch is an error naming the blocks, logged and
    /// published as a `verify-mismatch` event; the disk stays teed.
    fn verify_candidate(&self, store: &Arc<Store>, rate: u64) -> Result<VersionKey, CommandError> {
        let (tee, key, blocks) = {
            let set = self.lock();
            let c = self.promotable(&set)?;
            (c.tee.clone(), c.key, c.tee.presence().blocks())
        };
        let from = MigrationRecord::verify_from(read_record(store, key).as_ref(), blocks);
        let progress = Arc::new(VerifyProgress::new(blocks, from, rate));
        {
            let mut slot = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((k, p)) = &*slot {
                let st = p.status();
                if *k == key && st.state == "running" {
                    return Err(CommandError::new(
                        ErrorCode::Conflict,
                        format!(
                            "disk {}: promote's verification pass is already running ({} of {} \
                             blocks); `migrate --status` shows it",
                            self.name, st.blocks_verified, st.blocks_total
                        ),
                    ));
                }
            }
            *slot = Some((key, progress.clone()));
        }
        info!(
            "disk {}: verifying every block of candidate {key} against the trusted version \
             before promoting it ({}{})",
            self.name,
            dovetail_migrate::copyout::rate_text(rate),
            if from > 0 {
                format!("; resuming at block {from} of {blocks}")
            } else {
                String::new()
            }
        );
        let outcome = dovetail_migrate::verify::run(
            &tee,
            &progress,
            &mut |v| update_record(store, key, blocks, |r| r.verified = v),
            &|| self.stopping.load(Ordering::Relaxed),
        );
        match outcome {
            Outcome::Passed => {
                let message = format!(
                    "verification pass: every block of candidate {key} equals the trusted \
                     version ({blocks} blocks, {:.1} s)",
                    progress.elapsed().as_secs_f64()
                );
                info!("disk {}: {message}", self.name);
                self.events
                    .publish(&self.name, "verify-passed", "daemon", message, None, None);
                Ok(key)
            }
            Outcome::Mismatch { .. } => {
                let message = format!(
                    "disk {}: promote refused: {}; the disk stays teed and serving (`untee` drops \
                     the candidate)",
                    self.name,
                    outcome.describe()
                );
                warn!("{message}");
                self.events.publish(
                    &self.name,
                    "verify-mismatch",
                    "daemon",
                    message.clone(),
                    None,
                    None,
                );
                Err(CommandError::new(ErrorCode::Conflict, message))
            }
            Outcome::Failed(_) | Outcome::Stopped => {
                let message = format!(
                    "disk {}: promote refused: {}",
                    self.name,
                    outcome.describe()
                );
                warn!("{message}");
                Err(CommandError::new(ErrorCode::Failed, message))
            }
        }
    }

    /// The candidate, if it may be promoted: active, holding every block, without fault rules,
    /// and the trusted version without snapshots.
    fn promotable<'a>(&self, set: &'a VersionSet) -> Result<&'a Candidate, CommandError> {
        let c = self.active_candidate(set)?;
        let snapshots = || {
            set.parallax
                .as_ref()
                .map(|p| p.snapshots().into_iter().map(|s| s.name).collect())
                .unwrap_or_default()
        };
        let ready = promote::check_candidate(
            c.tee.presence().count(),
            c.tee.presence().blocks(),
            c.faulty,
        )
        .and_then(|()| promote::check_snapshots(snapshots()));
        let why = match ready {
            Ok(()) => return Ok(c),
            Err(NotReady::Incomplete { present, total }) => format!(
                "disk {}: the candidate holds {present} of {total} blocks; `migrate` brings \
                 the rest over first",
                self.name
            ),
            Err(NotReady::FaultInjected) => format!(
                "disk {}: the candidate has fault rules injected (testing); it cannot be \
                 promoted",
                self.name
            ),
            Err(NotReady::Snapshots(names)) => format!(
                "disk {}: the trusted version has {} snapshot(s) ({}), which retire with \
                 it; export and delete them first",
                self.name,
                names.len(),
                names.join(", ")
            ),
        };
        Err(CommandError::new(ErrorCode::Conflict, why))
    }

    /// `promote`: once the candidate holds every block, and (unless `no_verify`) the
    /// verification pass found every block equal to the trusted version (at `verify_rate`
    /// bytes per second of each, default [`DEFAULT_VERIFY_RATE`]; 0: no limit), makes it the
    /// trusted version and retires the old one (its grants revoked, its extents freed).
    pub fn promote(
        &self,
        no_verify: bool,
        verify_rate: Option<u64>,
    ) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        let verified = if no_verify {
            warn!(
                "disk {}: promoting without the verification pass (--no-verify): the presence \
                 map is trusted as it is",
                self.name
            );
            None
        } else {
            Some(self.verify_candidate(store, verify_rate.unwrap_or(DEFAULT_VERIFY_RATE))?)
        };
        let mut set = self.lock();
        let c = self.promotable(&set)?;
        if verified.is_some_and(|k| k != c.key) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: the candidate changed during the verification pass; promote again",
                    self.name
                ),
            ));
        }
        if let Some(m) = set.migration.take() {
            m.stop();
        }
        Self::pace(&mut set);
        let Some(c) = set.candidate.take() else {
            return Err(CommandError::new(
                ErrorCode::Failed,
                "the candidate went away",
            ));
        };
        let new_trusted: Arc<dyn BlockLayout> =
            Arc::new(Metered::new(c.parallax.clone(), c.metrics.clone()));
        // Flush both versions before pausing, so the flush inside the pause has little left.
        if let Err(e) = c.tee.flush() {
            warn!(
                "disk {}: flush before promotion: {}",
                self.name,
                error_chain(&e)
            );
        }
        // The old trusted version's tier mover stops (joined) before that version is retired:
        // it must not move blocks into extents about to be freed.
        drop(set.mover.take());
        let (r, pause) = self.switch.pause(|cur| -> Result<_, CommandError> {
            // Every write so far reaches both versions durably, the map is closed cleanly; then
            // one catalog commit swaps the roles. Releasing the old extents' space waits
            // until I/O runs again.
            c.tee
                .close()
                .map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
            let swapped = store.promote_deferred(&self.name)?;
            dovetail_store::failpoint::hit("promote-retire");
            *cur = new_trusted.clone();
            Ok(swapped)
        });
        let old = match r {
            Ok((old, freed)) => {
                let t = Instant::now();
                let n = freed.len();
                store.release(freed);
                debug!(
                    "disk {}: released the space of {n} extents of {old} in {:.3} ms, after the pause",
                    self.name,
                    t.elapsed().as_secs_f64() * 1e3
                );
                old
            }
            Err(e) => {
                // The catalog was not changed: the Tee is closed, serve the trusted version.
                let trusted = set.trusted.clone();
                self.switch.pause(|cur| *cur = trusted);
                set.mover = set.parallax.clone().and_then(|p| self.start_mover(&p));
                warn!(
                    "disk {}: promotion failed ({}); serving the trusted version alone, the \
                     candidate stays in the catalog",
                    self.name, e.message
                );
                return Err(e);
            }
        };
        if let Some(path) = c.tee.presence().path() {
            let _ = dovetail_migrate::presence::PresenceMap::remove(path);
        }
        remove_record(store, c.key);
        set.trusted = new_trusted;
        set.parallax = Some(c.parallax.clone());
        set.mover = self.start_mover(&c.parallax);
        set.trusted_metrics = c.metrics.clone();
        set.trusted_key = Some(c.key);
        set.trusted_layout = c.layout.clone();
        let message = format!(
            "promoted candidate {} ({}) to trusted; {old} retired, its extents freed",
            c.key, c.layout
        );
        self.changed(&mut set, "promoted", message.clone(), pause);
        Ok((message, pause))
    }

    /// `snapshot`: freezes the trusted version as it is after every request completed so far.
    pub fn snapshot(&self, name: &str) -> Result<(SnapshotInfo, Pause), CommandError> {
        let mut set = self.lock();
        let trusted = self.parallax(&set)?;
        // Refuse a bad or duplicate name without pausing (the layout checks again, paused).
        dovetail_store::names::check_name(dovetail_store::names::NameKind::Snapshot, name)
            .map_err(|e| CommandError::new(ErrorCode::Invalid, e.to_string()))?;
        if trusted.snapshots().iter().any(|s| s.name == name) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: a snapshot named {name:?} exists already",
                    self.name
                ),
            ));
        }
        // Commit what the guest wrote so far before pausing, so the commit inside the pause
        // has only the last moment's changes to write.
        if let Err(e) = trusted.flush() {
            warn!(
                "disk {}: flush before the snapshot: {}",
                self.name,
                error_chain(&e)
            );
        }
        Self::pace(&mut set);
        let tee = set.candidate.as_ref().map(|c| c.tee.clone());
        let held = set
            .migration
            .as_ref()
            .and_then(|m| m.job.as_ref())
            .map(CopyOut::hold);
        let (r, pause) = self.switch.pause(|_| {
            if let Some(t) = &tee {
                t.drain();
            }
            trusted.snapshot(name)
        });
        if held == Some(true) {
            if let Some(job) = set.migration.as_ref().and_then(|m| m.job.as_ref()) {
                job.resume();
            }
        }
        let snap = r.map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
        let message = format!("snapshot {} of generation {}", snap.name, snap.generation);
        self.changed(&mut set, "snapshot-taken", message, pause);
        Ok((snap, pause))
    }

    /// The disk's versions that keep annotations (parallax-v2), with their role (`trusted`,
    /// `candidate`), trusted first. A quarantined candidate is left out.
    pub fn annotated_versions(&self) -> Vec<(&'static str, Arc<Parallax>)> {
        let set = self.lock();
        let mut out = Vec::new();
        if let Some(p) = set.parallax.as_ref().filter(|p| p.annotations().is_some()) {
            out.push(("trusted", p.clone()));
        }
        if let Some(c) = set
            .candidate
            .as_ref()
            .filter(|c| !c.tee.quarantined() && c.parallax.annotations().is_some())
        {
            out.push(("candidate", c.parallax.clone()));
        }
        out
    }

    /// `taint`: turns taint label `label` on or off in every parallax-v2 version of the disk
    /// (trusted and candidate), so blocks written meanwhile carry it in both, and it survives
    /// promotion. Each version commits the change before this returns.
    pub fn set_taint(&self, label: &str, on: bool) -> Result<Vec<String>, CommandError> {
        let versions = self.annotated_versions();
        if versions.is_empty() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} has no parallax-v2 version, which is what keeps annotations and \
                     taint labels; `tee --candidate parallax-v2` adds one",
                    self.name
                ),
            ));
        }
        let mut done = Vec::new();
        if !on
            && !versions
                .iter()
                .any(|(_, p)| p.labels().iter().any(|l| l.name == label))
        {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!("disk {} has no taint label named {label:?}", self.name),
            ));
        }
        for (role, p) in versions {
            if !on && !p.labels().iter().any(|l| l.name == label) {
                continue;
            }
            p.set_taint(label, on).map_err(|e| {
                let code = if matches!(e, dovetail_layout::Error::InvalidArgument(_)) {
                    ErrorCode::Invalid
                } else {
                    ErrorCode::Failed
                };
                CommandError::new(code, format!("{role}: {}", error_chain(&e)))
            })?;
            done.push(role.to_string());
        }
        let message = format!(
            "taint label {label:?} {} in the {} version(s)",
            if on { "on" } else { "off" },
            done.join(" and ")
        );
        info!("disk {}: {message}", self.name);
        self.events.publish(
            &self.name,
            if on { "taint-on" } else { "taint-off" },
            "daemon",
            message,
            None,
            None,
        );
        Ok(done)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, CommandError> {
        Ok(self.parallax(&self.lock())?.snapshots())
    }

    /// The trusted version of a store disk.
    fn parallax(&self, set: &VersionSet) -> Result<Arc<Parallax>, CommandError> {
        self.store()?;
        set.parallax.clone().ok_or_else(|| {
            CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no snapshots", self.name),
            )
        })
    }

    /// Deletes a snapshot (no pause: it commits like a FLUSH does).
    pub fn delete_snapshot(&self, name: &str) -> Result<(), CommandError> {
        let set = self.lock();
        let trusted = self.parallax(&set)?;
        trusted
            .delete_snapshot(name)
            .map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
        self.events.publish(
            &self.name,
            "snapshot-deleted",
            "daemon",
            format!("deleted snapshot {name}"),
            None,
            None,
        );
        Ok(())
    }

    /// Writes snapshot `name` to a new sparse raw image: `out`, created (empty) at `to`.
    pub fn export_snapshot(
        &self,
        name: &str,
        out: std::fs::File,
        to: &Path,
    ) -> Result<u64, CommandError> {
        let trusted = self.parallax(&self.lock())?;
        let view = trusted
            .open_snapshot(name)
            .map_err(|e| CommandError::new(ErrorCode::Invalid, error_chain(&e)))?;
        let c = crate::ops::diskio::export_into(&view, out, to, false)?;
        info!(
            "disk {}: exported snapshot {name} to {} ({} bytes of data)",
            self.name,
            to.display(),
            c.data
        );
        Ok(c.data)
    }

    /// The trusted version's layout (`raw` for an image file).
    pub fn trusted_layout(&self) -> String {
        self.lock().trusted_layout.clone()
    }

    pub fn status(&self) -> DiskStatus {
        let set = self.lock();
        let candidate = match &self.backing {
            Backing::Image { .. } => None,
            Backing::Store { store, .. } => store.disk(&self.name).ok().and_then(|info| {
                let key = info.candidate?;
                let rec = info.tee.clone();
                let layout = store.version(key).map(|v| v.layout).unwrap_or_default();
                let live = set.candidate.as_ref().filter(|c| c.key == key);
                let quarantined = live.map_or(
                    rec.as_ref()
                        .is_some_and(|r| r.state == TeeState::Quarantined),
                    |c| c.tee.quarantined(),
                );
                Some(CandidateStatus {
                    version: key.0,
                    layout,
                    policy: live.map_or_else(
                        || rec.as_ref().map(|r| r.policy.clone()).unwrap_or_default(),
                        |c| c.tee.policy().to_string(),
                    ),
                    state: if quarantined { "quarantined" } else { "active" },
                    reason: rec.map(|r| r.reason).unwrap_or_default(),
                    blocks_present: live.map_or(0, |c| c.tee.presence().count()),
                    blocks_total: info.size.div_ceil(MAP_BLOCK),
                    counters: live.map(|c| c.tee.counters()),
                })
            }),
        };
        DiskStatus {
            name: self.name.clone(),
            socket: self.socket.clone(),
            size: self.disk.capacity().0 * SECTOR_SIZE,
            read_only: self.disk.read_only(),
            trusted_version: set.trusted_key.map(|k| k.0),
            trusted_layout: set.trusted_layout.clone(),
            candidate,
            guest_connected: self.connected.load(Ordering::Relaxed),
            guests: self.guests.load(Ordering::Relaxed),
            refused_connections: self.refused.load(Ordering::Relaxed),
            requests: self.disk.metrics().snapshot(),
            pauses: self.switch.pause_stats(),
            migration: self.migration_of(&set),
        }
    }

    /// This disk's samples for the Prometheus exposition.
    pub fn render_metrics(&self, out: &mut Exposition) {
        let name = self.name.as_str();
        self.disk.metrics().render(name, out);
        let set = self.lock();
        let trusted_version = set
            .trusted_key
            .map_or_else(|| "image".to_string(), |k| k.0.to_string());
        set.trusted_metrics
            .render(name, &trusted_version, "trusted", &set.trusted_layout, out);
        if let Some(c) = &set.candidate {
            let version = c.key.0.to_string();
            c.metrics
                .render(name, &version, "candidate", &c.layout, out);
        }
        if let Backing::Store { store, .. } = &self.backing {
            let mut keys: Vec<(VersionKey, &str)> = Vec::new();
            if let Some(k) = set.trusted_key {
                keys.push((k, "trusted"));
            }
            if let Some(c) = &set.candidate {
                keys.push((c.key, "candidate"));
            }
            for (k, role) in keys {
                let v = k.0.to_string();
                out.counter(
                    "dovetail_grant_refusals_total",
                    "Writes of a version refused because they fell outside its granted extents.",
                    &[("disk", name), ("version", &v), ("role", role)],
                    store.grant_violations(k),
                );
            }
        }
        let pauses = self.switch.pause_stats();
        out.counter(
            "dovetail_pauses_total",
            "Pauses of a disk's I/O for a live change.",
            &[("disk", name)],
            pauses.pauses,
        );
        out.gauge(
            "dovetail_pause_last_seconds",
            "Length of the disk's last pause.",
            &[("disk", name)],
            pauses.last_us as f64 / 1e6,
        );
        out.gauge(
            "dovetail_pause_max_seconds",
            "Length of the disk's longest pause.",
            &[("disk", name)],
            pauses.max_us as f64 / 1e6,
        );
        out.gauge(
            "dovetail_guest_connected",
            "1 while a guest is attached to the disk.",
            &[("disk", name)],
            if self.connected.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        out.counter(
            "dovetail_guest_refused_total",
            "Connections to the disk's socket refused (closed at once) because a guest was \
             connected already.",
            &[("disk", name)],
            self.refused.load(Ordering::Relaxed),
        );
        if let Some(c) = &set.candidate {
            let t = c.tee.counters();
            let labels = [("disk", name)];
            for (metric, help, v) in [
                (
                    "dovetail_tee_compared_reads_total",
                    "Guest reads compared between the trusted and the candidate version.",
                    t.compared_reads,
                ),
                (
                    "dovetail_tee_compared_bytes_total",
                    "Bytes compared between the trusted and the candidate version.",
                    t.compared_bytes,
                ),
                (
                    "dovetail_tee_mismatches_total",
                    "Reads where the candidate's data differed from the trusted version's.",
                    t.mismatches,
                ),
                (
                    "dovetail_tee_candidate_errors_total",
                    "I/O errors of the candidate.",
                    t.candidate_errors,
                ),
                (
                    "dovetail_tee_candidate_panics_total",
                    "Panics of the candidate.",
                    t.candidate_panics,
                ),
                (
                    "dovetail_tee_grant_refusals_total",
                    "Candidate writes the store refused as outside its grants.",
                    t.grant_refusals,
                ),
                (
                    "dovetail_tee_quarantines_total",
                    "Quarantines of the candidate.",
                    t.quarantines,
                ),
                (
                    "dovetail_tee_backpressure_waits_total",
                    "Requests that waited for the background stream to make room.",
                    t.backpressure_waits,
                ),
                (
                    "dovetail_tee_lazy_regions_checked_total",
                    "Pieces compared by the lazy hash job.",
                    t.lazy_regions_checked,
                ),
            ] {
                out.counter(metric, help, &labels, v);
            }
            out.gauge(
                "dovetail_tee_quarantined",
                "1 when the disk's candidate is quarantined.",
                &labels,
                if c.tee.quarantined() { 1.0 } else { 0.0 },
            );
            out.gauge(
                "dovetail_candidate_blocks",
                "4 KiB blocks the candidate holds (migration progress).",
                &labels,
                c.tee.presence().count() as f64,
            );
            out.gauge(
                "dovetail_disk_blocks",
                "4 KiB blocks of the disk.",
                &labels,
                (self.disk.capacity().0 * SECTOR_SIZE).div_ceil(MAP_BLOCK) as f64,
            );
        }
    }

    /// Closes the Tee at shutdown (drains, flushes both versions, closes the presence map
    /// cleanly so the next start needs no re-synchronisation).
    pub fn close(&self) {
        // A verification pass running stops at its next piece (its cursor checkpointed).
        self.stopping.store(true, Ordering::Relaxed);
        let mut set = self.lock();
        // The tier mover finishes its current step (each is committed) and stops.
        drop(set.mover.take());
        if let Some(m) = set.migration.take() {
            m.stop();
        }
        if let Some(c) = &set.candidate {
            match c.tee.close() {
                Ok(()) => info!(
                    "disk {}: Tee closed cleanly ({})",
                    self.name,
                    serde_json::to_string(&c.tee.counters()).unwrap_or_default()
                ),
                Err(e) => warn!(
                    "disk {}: closing the Tee failed: {}",
                    self.name,
                    error_chain(&e)
                ),
            }
        }
    }
}
