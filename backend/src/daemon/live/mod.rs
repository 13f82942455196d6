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

use dovetail_layout::parallax::{Parallax, SnapshotInfo};
use dovetail_layout::{error_chain, BlockLayout, SECTOR_SIZE};
use dovetail_migrate::copyout::DEFAULT_RATE;
use dovetail_migrate::presence::MAP_BLOCK;
use dovetail_migrate::promote::{self, NotReady};
use dovetail_migrate::record::MigrationRecord;
use dovetail_migrate::verify::{Outcome, VerifyProgress, VerifyStatus, DEFAULT_VERIFY_RATE};
use dovetail_migrate::{
    CopyOut, CopyOutOptions, EventKind, JobState, Pause, PauseStats, Progress, Switch, TeeCounters,
    TeeEvent, TeeEvents,
};
use dovetail_store::{Store, TeeState, VersionKey};
use dovetail_tiering::{Class, Mover, MoverEvent, MAX_COPIES};
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

mod annotations;
mod bisect;
mod follow;
mod health;
mod migrate_voting;
mod migration;
mod resize;
mod resize_voting;
mod snapshots;
mod status;
mod tiers;
mod voting;

pub use follow::{acquire_wait, parse_incoming_timeout, parse_span, set_acquire_wait};
pub use voting::{MemberReport, VotingStatus};

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
    /// The N-version Tee, when the disk is teed to several candidates (then `candidate` is
    /// `None`).
    voting: Option<crate::ops::voting::Voting>,
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
    /// A recovery after a failed sync is running (`recover`).
    recovering: std::sync::atomic::AtomicBool,
    /// The last reopen after a failed sync failed: the served instance is still the one that
    /// may have lost writes (the store no longer marks the version: its mark was cleared for
    /// the reopen), so the next failure tries again.
    reopen_owed: std::sync::atomic::AtomicBool,
    /// Virtqueues offered to its guests, as its attachment asks (0: the daemon's `--queues`).
    pub queues: std::sync::atomic::AtomicU16,
    /// The trusted version whose extent reserve starts when the first guest connects
    /// ([`LiveDisk::guest_arrived`]): a disk attached with no guest yet (a VM still being
    /// defined, or a host's churn of disks) grants nothing, commits nothing, and leaves no
    /// extent to free when it is deleted.
    reserve_on_guest: Mutex<Option<std::sync::Weak<Parallax>>>,
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
    /// Requests of this disk that panicked (each answered IOERR).
    pub request_panics: u64,
    /// Why the disk serves no data (absent while it does): its requests panicked
    /// [`crate::disk::PANICS_BEFORE_FAILED`] times.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// The N-version Tee's members and counters (absent unless the disk has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voting: Option<VotingStatus>,
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
        LiveDisk::open_store_serial(store, name, socket, read_only, None, events, mover_interval)
    }

    /// [`LiveDisk::open_store`] with the virtio-blk serial `serial` (`None` or empty: the
    /// disk's name, cut to 20 bytes), as an attachment record asks.
    pub fn open_store_serial(
        store: &Arc<Store>,
        name: &str,
        socket: &Path,
        read_only: bool,
        serial: Option<&str>,
        events: Arc<EventHub>,
        mover_interval: Option<Duration>,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        // On a store on RADOS shared with other daemons, each disk has a handle (a client) of
        // its own: a takeover fences the client of this disk alone.
        let own;
        let store = if store.is_shared() && store.on_rados() {
            own = store.open_shared_again()?;
            if store.owns_disk(name) {
                store.hand_over_disk(name, &own)?;
            }
            &own
        } else {
            store
        };
        // On a store shared with other daemons, the disk is served only by its owner.
        let had = store.owns_disk(name);
        if store.is_shared() {
            store.acquire_disk(name)?;
        }
        let opened = LiveDisk::open_owned(
            store,
            name,
            socket,
            read_only,
            serial,
            events,
            mover_interval,
            true,
        );
        if opened.is_err() && store.is_shared() && !had {
            let _ = store.release_disk(name);
        }
        opened
    }

    /// Opens a disk as its catalog says; `owned`: this daemon owns it (a disk opened before
    /// it is owned, `open_store_incoming`, starts no reserve or mover: they change the store).
    #[allow(clippy::too_many_arguments)]
    fn open_owned(
        store: &Arc<Store>,
        name: &str,
        socket: &Path,
        read_only: bool,
        serial: Option<&str>,
        events: Arc<EventHub>,
        mover_interval: Option<Duration>,
        owned: bool,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        let info = store.disk(name)?;
        let trusted = Arc::new(crate::ops::open::open_disk(store, name)?);
        // Extents granted ahead of need, so requests rarely wait for a grant: from the first
        // guest's connection on (its queues start after it, so the grant is ready before its
        // first write, off the request path).
        let reserve = (!read_only && owned).then(|| Arc::downgrade(&trusted));
        let trusted_metrics = Arc::new(VersionMetrics::default());
        let served: Arc<dyn BlockLayout> =
            Arc::new(Metered::new(trusted.clone(), trusted_metrics.clone()));
        let voting =
            crate::ops::voting::open_voting(store, name, served.clone(), trusted_metrics.clone())?;
        let candidate = match voting {
            Some(_) => None,
            None => teed::attach_candidate(store, name, served.clone())?,
        };
        if voting.is_none() {
            info!("disk {name}: {}", teed::describe(&info, candidate.as_ref()));
        }
        let current: Arc<dyn BlockLayout> = match (&candidate, &voting) {
            (_, Some(v)) => v.tee.clone(),
            (Some(c), None) => c.tee.clone(),
            (None, None) => served.clone(),
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
            voting,
        };
        let live = LiveDisk::new(
            name,
            socket,
            current,
            read_only,
            serial.filter(|s| !s.is_empty()),
            Backing::Store {
                store: store.clone(),
            },
            set,
            events,
            mover_interval,
        )?;
        *live
            .reserve_on_guest
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reserve;
        live.follow_rings();
        {
            let mut set = live.lock();
            if owned {
                set.mover = set.parallax.clone().and_then(|p| live.start_mover(&p));
            }
            live.resume_voting(&set);
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
            voting: None,
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
        serial: Option<&str>,
        backing: Backing,
        set: VersionSet,
        events: Arc<EventHub>,
        mover_interval: Option<Duration>,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        // The serial is the one given, or the disk's name cut to what fits in a virtio-blk ID.
        let serial: String = serial.map(str::to_string).unwrap_or_else(|| {
            name.chars()
                .scan(0, |n, c| {
                    *n += c.len_utf8();
                    (*n <= crate::disk::SERIAL_LEN).then_some(c)
                })
                .collect()
        });
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
        let live = Arc::new(LiveDisk {
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
            recovering: std::sync::atomic::AtomicBool::new(false),
            reopen_owed: std::sync::atomic::AtomicBool::new(false),
            queues: std::sync::atomic::AtomicU16::new(0),
            reserve_on_guest: Mutex::new(None),
        });
        live.watch_disk();
        Ok(live)
    }

    fn lock(&self) -> MutexGuard<'_, VersionSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guest connected: the trusted version's extent reserve starts, the first time (a
    /// version reopened since, by a recovery or a grow, started its own).
    pub fn guest_arrived(&self) {
        let pending = self
            .reserve_on_guest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = pending.and_then(|w| w.upgrade()) {
            if let Err(e) = p.start_reserve() {
                log::warn!("disk {}: no extent reserve: {e}", self.name);
            }
        }
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
        self.relay_events(c.tee.subscribe(), "the Tee's", |ev| ev.message.clone());
    }

    /// Relays a Tee's events (`rx`) into the daemon's, each message as `message` words it, on
    /// a thread that ends when the Tee is dropped. Policy changes are left out: the daemon
    /// reports those itself, with their pause.
    fn relay_events(
        &self,
        rx: TeeEvents,
        whose: &str,
        message: impl Fn(&TeeEvent) -> String + Send + 'static,
    ) {
        let events = self.events.clone();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("events-{name}"))
            .spawn(move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Background);
                while let Ok(ev) = rx.recv() {
                    if ev.kind == EventKind::PolicyChanged {
                        continue;
                    }
                    let kind = serde_json::to_value(ev.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("{:?}", ev.kind));
                    let text = message(&ev);
                    events.publish(&name, &kind, "tee", text, None, Some(ev));
                }
            });
        if let Err(e) = spawned {
            warn!("disk {}: cannot relay {whose} events: {e}", self.name);
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

    /// What opening a new Tee over this disk gave, or an error; a Tee that did not start has
    /// its candidates (`what`) dropped from the catalog again, so the command leaves no trace.
    fn started<T>(
        &self,
        store: &Store,
        opened: Result<Option<T>, OpsError>,
        what: &str,
    ) -> Result<T, CommandError> {
        let err = match opened {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => CommandError::new(
                ErrorCode::Failed,
                format!("disk {}: {what} was not started", self.name),
            ),
            Err(e) => CommandError::from(e),
        };
        if let Err(e2) = store.drop_candidate(&self.name) {
            warn!(
                "disk {}: cannot drop {what} that failed to start: {}",
                self.name,
                error_chain(&e2)
            );
        }
        Err(err)
    }

    /// Puts a new Tee in front of the disk in one pause; if it cannot (its capacity is not
    /// the disk's), it is closed and its candidates dropped from the catalog.
    fn swap_in(
        &self,
        store: &Store,
        tee: Arc<dyn BlockLayout>,
        close: impl FnOnce(),
    ) -> Result<Pause, CommandError> {
        let (swapped, pause) = self.switch.replace(tee);
        if let Err(e) = swapped {
            close();
            let _ = store.drop_candidate(&self.name);
            return Err(CommandError::new(ErrorCode::Failed, e.to_string()));
        }
        Ok(pause)
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
        store_layout(layout)?;
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
        let opened = teed::attach_candidate(store, &self.name, set.trusted.clone());
        let candidate = self.started(store, opened, "the candidate")?;
        Self::pace(&mut set);
        let pause = self.swap_in(store, candidate.tee.clone(), || {
            let _ = candidate.tee.close();
        })?;
        self.forward_tee_events(&candidate);
        let message = format!(
            "attached candidate {} ({}), policy {}{}",
            candidate.key,
            candidate.layout,
            candidate.tee.policy(),
            faults_note(faults, "")
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
        if set.voting.is_some() {
            return self.set_voting_policy(&mut set, store, p);
        }
        let c = self.active_candidate(&set)?;
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
        if set.voting.is_some() {
            return self.detach_voting(&mut set, store);
        }
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
        // Under async-new-primary the trusted version lags: bring it up to date before it
        // serves alone. The stream is drained with the guest's I/O running first, so the
        // drain inside the pause (which cuts the stream over) has only the last moment's
        // writes to forward.
        if let Some(c) = &candidate {
            c.tee.drain();
        }
        let ((), pause) = self.switch.pause(|cur| {
            if let Some(c) = &candidate {
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
        if let Some(v) = &set.voting {
            match v.tee.close() {
                Ok(()) => info!("disk {}: voting Tee closed cleanly", self.name),
                Err(e) => warn!(
                    "disk {}: closing the voting Tee failed: {}",
                    self.name,
                    error_chain(&e)
                ),
            }
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
        drop(set);
        // Stopped here, the disk is free for another daemon to serve (ownership follows it).
        if let Backing::Store { store } = &self.backing {
            if store.is_shared() {
                if let Err(e) = store.release_disk(&self.name) {
                    warn!("disk {}: {}", self.name, error_chain(&e));
                }
            }
        }
    }
}

/// Checks that `layout` is one a store disk can have, before anything is changed.
fn store_layout(layout: &str) -> Result<(), CommandError> {
    if crate::ops::STORE_LAYOUTS.contains(&layout) {
        return Ok(());
    }
    Err(CommandError::new(
        ErrorCode::Invalid,
        format!(
            "unknown layout {layout:?}; one of: {}",
            crate::ops::STORE_LAYOUTS.join(", ")
        ),
    ))
}

/// How a reply names the fault rules a new candidate was given (nothing when none).
fn faults_note(faults: &[String], whose: &str) -> String {
    if faults.is_empty() {
        return String::new();
    }
    format!(", faults {}{whose}", faults.join(" "))
}
