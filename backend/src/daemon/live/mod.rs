//! The running daemon's disks, as the control socket sees and changes them.
//!
//! Every served disk is a [`LiveDisk`]: the device serves a [`Switch`] whose layout is the
//! trusted version alone or a Tee over the trusted and a candidate version. Control commands
//! (attach a candidate, change its policy, drop it, take a snapshot) prepare everything that
//! takes time first (catalog commits, opening and formatting the candidate, its presence map),
//! then pause the disk's I/O only for the swap itself: requests in flight complete, requests
//! arriving meanwhile wait, none fails. Every change is logged with its pause and published as
//! an event. Changes of one disk are serialised; different disks change independently.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dovetail_layout::parallax::format::MAX_COPIES;
use dovetail_layout::parallax::{Class, Mover, MoverEvent, Parallax, SnapshotInfo, TierStatus};
use dovetail_layout::{error_chain, BlockLayout, SECTOR_SIZE};
use dovetail_migrate::copyout::DEFAULT_RATE;
use dovetail_migrate::presence::MAP_BLOCK;
use dovetail_migrate::record::MigrationRecord;
use dovetail_migrate::verify::{Outcome, VerifyProgress, VerifyStatus, DEFAULT_VERIFY_RATE};
use dovetail_migrate::{
    CopyOut, CopyOutOptions, EventKind, JobState, Pause, PauseStats, Progress, Switch, TeeCounters,
    TeeEvent,
};
use dovetail_store::{Store, TeeState, VersionKey};
use log::{debug, info, warn};
use serde::Serialize;

use crate::disk::Disk;
use crate::metrics::{Exposition, Metered, VersionMetrics};
use crate::ops::teed::{self, Candidate};
use crate::ops::OpsError;

/// How many events the daemon keeps for `events` without `--follow`.
pub const EVENT_RING: usize = 256;
/// How many events a follower's queue holds before later ones are dropped for it.
pub const FOLLOWER_QUEUE: usize = 1024;
/// The shortest time between two pauses of one disk: a client repeating reconfiguration
/// commands in a loop cannot keep a disk paused.
pub const MIN_PAUSE_GAP: Duration = Duration::from_millis(20);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a control command failed; `code` is the machine-readable part of the reply.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: &'static str,
    pub message: String,
}

impl CommandError {
    pub fn new(code: &'static str, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

impl From<OpsError> for CommandError {
    fn from(e: OpsError) -> CommandError {
        let code = match &e {
            OpsError::Invalid(_) => "invalid",
            _ => "failed",
        };
        CommandError::new(code, error_chain(&e))
    }
}

impl From<dovetail_store::StoreError> for CommandError {
    fn from(e: dovetail_store::StoreError) -> CommandError {
        CommandError::new("failed", error_chain(&e))
    }
}

/// One thing that happened in the daemon, as `events` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonEvent {
    /// Per daemon, from 1.
    pub seq: u64,
    pub unix_ms: u64,
    pub disk: String,
    /// `candidate-attached`, `policy-changed`, `candidate-dropped`, `snapshot-taken`,
    /// `snapshot-deleted`, or, for what a Tee reported, the Tee event's kind (`mismatch`,
    /// `quarantined`, ...).
    pub kind: String,
    /// `daemon` or `tee`.
    pub source: &'static str,
    pub message: String,
    /// The pause of the disk's I/O the change took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
    /// The Tee's event with its provenance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tee: Option<TeeEvent>,
}

#[derive(Debug, Default)]
struct HubInner {
    seq: u64,
    ring: VecDeque<DaemonEvent>,
    followers: Vec<SyncSender<DaemonEvent>>,
}

/// The daemon's events: a bounded ring of recent ones and the queues of the clients following.
#[derive(Debug, Default)]
pub struct EventHub {
    inner: Mutex<HubInner>,
    /// Events a slow follower did not get.
    pub dropped: AtomicU64,
    following: AtomicU64,
}

impl EventHub {
    fn lock(&self) -> MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and distributes an event (never blocks on a follower).
    pub fn publish(
        &self,
        disk: &str,
        kind: &str,
        source: &'static str,
        message: String,
        pause: Option<Pause>,
        tee: Option<TeeEvent>,
    ) {
        let mut g = self.lock();
        g.seq += 1;
        let ev = DaemonEvent {
            seq: g.seq,
            unix_ms: unix_ms(),
            disk: disk.to_string(),
            kind: kind.to_string(),
            source,
            message,
            pause,
            tee,
        };
        if g.ring.len() == EVENT_RING {
            g.ring.pop_front();
        }
        g.ring.push_back(ev.clone());
        g.followers.retain(|f| match f.try_send(ev.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// The recent events with a sequence number above `since`, oldest first.
    pub fn recent(&self, since: u64) -> Vec<DaemonEvent> {
        self.lock()
            .ring
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }

    /// The recent events after `since` and a queue of every later one, taken atomically so
    /// none is missed or repeated.
    pub fn follow(self: &Arc<Self>, since: u64) -> (Vec<DaemonEvent>, Follower) {
        let (tx, rx) = std::sync::mpsc::sync_channel(FOLLOWER_QUEUE);
        let mut g = self.lock();
        let backlog = g.ring.iter().filter(|e| e.seq > since).cloned().collect();
        g.followers.push(tx);
        self.following.fetch_add(1, Ordering::SeqCst);
        (
            backlog,
            Follower {
                rx,
                hub: self.clone(),
            },
        )
    }

    /// [`EventHub::follow`] unless `max` clients follow already (then `None`); checked and
    /// counted under the hub's lock, so the bound holds however many ask at once.
    pub fn try_follow(
        self: &Arc<Self>,
        since: u64,
        max: u64,
    ) -> Option<(Vec<DaemonEvent>, Follower)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(FOLLOWER_QUEUE);
        let mut g = self.lock();
        if self.following.load(Ordering::SeqCst) >= max {
            return None;
        }
        let backlog = g.ring.iter().filter(|e| e.seq > since).cloned().collect();
        g.followers.push(tx);
        self.following.fetch_add(1, Ordering::SeqCst);
        Some((
            backlog,
            Follower {
                rx,
                hub: self.clone(),
            },
        ))
    }

    /// Clients following the event stream now.
    pub fn followers(&self) -> u64 {
        self.following.load(Ordering::SeqCst)
    }
}

/// A client's queue of events; dropping it ends the following.
#[derive(Debug)]
pub struct Follower {
    pub rx: Receiver<DaemonEvent>,
    hub: Arc<EventHub>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.hub.following.fetch_sub(1, Ordering::SeqCst);
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
    let dir = maps_dir(store, key);
    match MigrationRecord::read(&dir, key.0) {
        Ok(None) => None,
        Ok(Some((r, version))) => {
            if version != dovetail_migrate::record::RECORD_VERSION {
                match r.write(&dir) {
                    Ok(()) => info!(
                        "upgraded the migration record of {key} from format version {version}"
                    ),
                    Err(e) => warn!(
                        "cannot upgrade the migration record of {key}: {}",
                        error_chain(&e)
                    ),
                }
            }
            Some(r)
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
    let mut r = read_record(store, key)
        .filter(|r| r.blocks == blocks)
        .unwrap_or(MigrationRecord {
            key: key.0,
            mode: None,
            rate: 0,
            blocks,
            verified: 0,
        });
    r.blocks = blocks;
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

/// The default of `serve --mover-interval`.
pub const DEFAULT_MOVER_INTERVAL: Duration = Duration::from_secs(10);

/// One round of the tier mover over the disk, as `tiers` reports the last one.
#[derive(Debug, Clone, Serialize)]
pub struct MoverRound {
    /// When it ended.
    pub unix_ms: u64,
    pub promoted: u64,
    pub demoted: u64,
    pub placed: u64,
    /// Blocks that should have moved but found no room on their tier.
    pub no_room: u64,
    pub secs: f64,
}

/// A failure of the tier mover (it retries after its interval).
#[derive(Debug, Clone, Serialize)]
pub struct MoverError {
    pub unix_ms: u64,
    pub message: String,
}

/// What the tier movers of one disk reported.
#[derive(Debug, Default)]
struct MoverLog {
    rounds: u64,
    last_round: Option<MoverRound>,
    last_error: Option<MoverError>,
}

/// A disk's tier mover as `tiers` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MoverStatus {
    /// `running` or `off`.
    pub state: &'static str,
    /// Why it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds between rounds (`null` when off).
    pub interval_secs: Option<f64>,
    /// Rounds over the disk completed since the daemon started.
    pub rounds: u64,
    pub last_round: Option<MoverRound>,
    pub last_error: Option<MoverError>,
}

/// What a `tiers` request changes or asks for (every part optional; docs/control.md).
#[derive(Debug, Clone, Default)]
pub struct TierChange {
    /// The class `copies`, `tier` and `compress` are for.
    pub class: Option<String>,
    pub copies: Option<u64>,
    /// A tier of the store, by name.
    pub tier: Option<String>,
    pub compress: Option<bool>,
    pub cold_after_secs: Option<u64>,
    pub hot_accesses: Option<u64>,
    pub move_mib_s: Option<u64>,
    /// Run a round of the mover now.
    pub move_now: bool,
    /// Read every copy of the replicated blocks and rewrite the bad ones.
    pub scrub: bool,
}

impl TierChange {
    /// Checks the shape of the request (what needs what), without the disk.
    pub fn check(&self) -> Result<(), CommandError> {
        let per_class = self.copies.is_some() || self.tier.is_some() || self.compress.is_some();
        match (&self.class, per_class) {
            (None, true) => Err(CommandError::new(
                "bad-request",
                "tiers: copies, tier and compress set one class's policy; \"class\" names it                  (metadata, hot or cold)",
            )),
            (Some(c), false) => Err(CommandError::new(
                "bad-request",
                format!(
                    "tiers: class {c:?} is given but nothing to set for it (copies, tier or \
                     compress)"
                ),
            )),
            _ => Ok(()),
        }
    }

    fn changes_policy(&self) -> bool {
        self.class.is_some()
            || self.cold_after_secs.is_some()
            || self.hot_accesses.is_some()
            || self.move_mib_s.is_some()
    }
}

/// What `tiers` did and found.
#[derive(Debug, Clone)]
pub struct TiersReport {
    /// The trusted version's key and layout.
    pub version: Option<u64>,
    pub layout: String,
    pub status: TierStatus,
    pub mover: MoverStatus,
    /// The policy changes made, as `what old -> new`.
    pub changes: Vec<String>,
    /// Copies the scrub rewrote (with `scrub`).
    pub scrub_repairs: Option<u64>,
    /// Whether the mover was told to run a round now.
    pub kicked: bool,
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

    /// Starts the tier mover of `trusted` if it is parallax-v2 and the mover is on; its rounds
    /// and failures become events. `None` when it does not run.
    fn start_mover(&self, trusted: &Arc<Parallax>) -> Option<Mover> {
        let interval = self.mover_interval?;
        if self.disk.read_only() || trusted.tier_status().is_none() {
            return None;
        }
        let (events, name, log) = (
            self.events.clone(),
            self.name.clone(),
            self.mover_log.clone(),
        );
        let relay = move |ev: MoverEvent| match ev {
            MoverEvent::Round {
                promoted,
                demoted,
                placed,
                no_room,
                secs,
            } => {
                {
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    l.rounds += 1;
                    l.last_round = Some(MoverRound {
                        unix_ms: unix_ms(),
                        promoted,
                        demoted,
                        placed,
                        no_room,
                        secs,
                    });
                }
                // A round that moved nothing is not news (one every interval).
                if promoted + demoted + placed + no_room == 0 {
                    return;
                }
                let message = format!(
                    "mover round: {promoted} blocks promoted to hot, {demoted} demoted to cold, \
                     {placed} placed by policy, {no_room} without room ({secs:.1} s)"
                );
                info!("disk {name}: {message}");
                events.publish(&name, "tiers", "daemon", message, None, None);
            }
            MoverEvent::Failed(why) => {
                let message = format!("tier mover failed (retrying in {interval:?}): {why}");
                warn!("disk {name}: {message}");
                log.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(MoverError {
                    unix_ms: unix_ms(),
                    message: why,
                });
                events.publish(&name, "tiers-failed", "daemon", message, None, None);
            }
        };
        match trusted.start_mover(interval, Box::new(relay)) {
            Ok(m) => {
                info!(
                    "disk {}: tier mover running every {:.1} s",
                    self.name,
                    interval.as_secs_f64()
                );
                Some(m)
            }
            Err(e) => {
                warn!(
                    "disk {}: cannot start the tier mover: {}",
                    self.name,
                    error_chain(&e)
                );
                None
            }
        }
    }

    /// The tier mover's state, for `tiers`.
    fn mover_status(&self, set: &VersionSet) -> MoverStatus {
        let l = self.mover_log.lock().unwrap_or_else(|p| p.into_inner());
        let reason = if set.mover.is_some() {
            None
        } else if self.mover_interval.is_none() {
            Some("disabled (serve --mover-interval 0)".to_string())
        } else if self.disk.read_only() {
            Some("the disk is served read-only".to_string())
        } else {
            Some("it could not be started (see the daemon's log)".to_string())
        };
        MoverStatus {
            state: if set.mover.is_some() {
                "running"
            } else {
                "off"
            },
            reason,
            interval_secs: set
                .mover
                .as_ref()
                .and(self.mover_interval)
                .map(|i| i.as_secs_f64()),
            rounds: l.rounds,
            last_round: l.last_round.clone(),
            last_error: l.last_error.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VersionSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self) -> Result<&Arc<Store>, CommandError> {
        match &self.backing {
            Backing::Store { store } => Ok(store),
            Backing::Image { path } => Err(CommandError::new(
                "conflict",
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
                "invalid",
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
                "conflict",
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
                    "failed",
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
            return Err(CommandError::new("failed", e.to_string()));
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
                "conflict",
                format!(
                    "disk {} has no active candidate; `tee` attaches one",
                    self.name
                ),
            ));
        };
        if c.tee.quarantined() {
            return Err(CommandError::new(
                "conflict",
                format!(
                    "disk {}: candidate {} is quarantined; `untee` drops it",
                    self.name, c.key
                ),
            ));
        }
        let old = c.tee.policy();
        let Some(mut rec) = store.tee(&self.name)? else {
            return Err(CommandError::new(
                "failed",
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
        r.map_err(|e| CommandError::new("failed", error_chain(&e)))?;
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
                "conflict",
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
                "invalid",
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
                            |e| CommandError::new("failed", format!("recording the new rate: {e}")),
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
        .map_err(|e| CommandError::new("failed", format!("recording the migration: {e}")))?;
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
                "conflict",
                format!(
                    "disk {} has no active candidate; `tee` attaches one",
                    self.name
                ),
            ));
        };
        if c.tee.quarantined() {
            return Err(CommandError::new(
                "conflict",
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
                            "invalid",
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
                .map_err(|e| CommandError::new("failed", error_chain(&e)))?;
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
                "conflict",
                format!("disk {} has no migration", self.name),
            ));
        };
        let Some(job) = &m.job else {
            return Err(CommandError::new(
                "conflict",
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
                    "invalid",
                    format!("unknown migration action {other:?}"),
                ))
            }
        };
        if !ok {
            return Err(CommandError::new(
                "conflict",
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
        let from = read_record(store, key)
            .filter(|r| r.blocks == blocks)
            .map_or(0, |r| r.verified);
        let progress = Arc::new(VerifyProgress::new(blocks, from, rate));
        {
            let mut slot = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((k, p)) = &*slot {
                let st = p.status();
                if *k == key && st.state == "running" {
                    return Err(CommandError::new(
                        "conflict",
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
                Err(CommandError::new("conflict", message))
            }
            Outcome::Failed(_) | Outcome::Stopped => {
                let message = format!(
                    "disk {}: promote refused: {}",
                    self.name,
                    outcome.describe()
                );
                warn!("{message}");
                Err(CommandError::new("failed", message))
            }
        }
    }

    /// The candidate, if it may be promoted: active, holding every block, without fault rules,
    /// and the trusted version without snapshots.
    fn promotable<'a>(&self, set: &'a VersionSet) -> Result<&'a Candidate, CommandError> {
        let c = self.active_candidate(set)?;
        let (present, total) = (c.tee.presence().count(), c.tee.presence().blocks());
        if present < total {
            return Err(CommandError::new(
                "conflict",
                format!(
                    "disk {}: the candidate holds {present} of {total} blocks; `migrate` brings \
                     the rest over first",
                    self.name
                ),
            ));
        }
        if c.faulty {
            return Err(CommandError::new(
                "conflict",
                format!(
                    "disk {}: the candidate has fault rules injected (testing); it cannot be \
                     promoted",
                    self.name
                ),
            ));
        }
        if let Some(p) = &set.parallax {
            let snaps = p.snapshots();
            if !snaps.is_empty() {
                return Err(CommandError::new(
                    "conflict",
                    format!(
                        "disk {}: the trusted version has {} snapshot(s) ({}), which retire with \
                         it; export and delete them first",
                        self.name,
                        snaps.len(),
                        snaps
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(c)
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
                "conflict",
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
            return Err(CommandError::new("failed", "the candidate went away"));
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
                .map_err(|e| CommandError::new("failed", error_chain(&e)))?;
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
            .map_err(|e| CommandError::new("invalid", e.to_string()))?;
        if trusted.snapshots().iter().any(|s| s.name == name) {
            return Err(CommandError::new(
                "conflict",
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
        let snap = r.map_err(|e| CommandError::new("failed", error_chain(&e)))?;
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
                "conflict",
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
                "invalid",
                format!("disk {} has no taint label named {label:?}", self.name),
            ));
        }
        for (role, p) in versions {
            if !on && !p.labels().iter().any(|l| l.name == label) {
                continue;
            }
            p.set_taint(label, on).map_err(|e| {
                let code = if matches!(e, dovetail_layout::Error::InvalidArgument(_)) {
                    "invalid"
                } else {
                    "failed"
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

    /// The trusted version, if it has block classes (parallax-v2); else why not.
    fn tiered(&self, set: &VersionSet) -> Result<Arc<Parallax>, CommandError> {
        self.store().map_err(|e| {
            CommandError::new(
                "conflict",
                format!("{}; it has no block classes", e.message),
            )
        })?;
        match set.parallax.as_ref() {
            Some(p) if p.tier_status().is_some() => Ok(p.clone()),
            _ => {
                let candidate = set
                    .candidate
                    .as_ref()
                    .filter(|c| c.parallax.tier_status().is_some())
                    .map(|c| {
                        format!(
                            " (its candidate {} is {}: `migrate`, then `promote` it)",
                            c.key, c.layout
                        )
                    })
                    .unwrap_or_default();
                Err(CommandError::new(
                    "conflict",
                    format!(
                        "disk {} is {}, which has no block classes; upgrade it to \
                         parallax-v2{candidate}",
                        self.name, set.trusted_layout
                    ),
                ))
            }
        }
    }

    /// `tiers`: the trusted version's tiering (policy, tiers, usage, counters, mover), after
    /// carrying out `change`: a policy change is validated as a whole against the store's
    /// tiers and committed (a restart keeps it; the mover moves the blocks it concerns), then
    /// the scrub runs, then the mover is told to run a round. Nothing changes when anything is
    /// wrong. No pause.
    pub fn tiers(&self, change: &TierChange) -> Result<TiersReport, CommandError> {
        change.check()?;
        let invalid = |m: String| CommandError::new("invalid", m);
        let set = self.lock();
        let p = self.tiered(&set)?;
        let status = p.tier_status().ok_or_else(|| {
            CommandError::new("failed", format!("disk {}: no tiering status", self.name))
        })?;
        if change.move_now && set.mover.is_none() {
            return Err(CommandError::new(
                "conflict",
                format!(
                    "disk {}: its tier mover is off ({}); nothing to run now",
                    self.name,
                    self.mover_status(&set).reason.unwrap_or_default()
                ),
            ));
        }
        let mut policy = status.policy;
        let mut changes = Vec::new();
        let tier_name = |i: u8| {
            status
                .tiers
                .get(usize::from(i))
                .map_or_else(|| format!("tier {i}"), |t| t.name.clone())
        };
        if let Some(name) = &change.class {
            let class = Class::parse(name).ok_or_else(|| {
                invalid(format!(
                    "unknown block class {}; metadata, hot or cold",
                    dovetail_store::names::shown(name)
                ))
            })?;
            let cn = class.name();
            let cp = &mut policy.classes[class as usize];
            if let Some(n) = change.copies {
                let copies = u8::try_from(n)
                    .ok()
                    .filter(|c| (1..=MAX_COPIES).contains(c))
                    .ok_or_else(|| {
                        invalid(format!("{cn}: {n} copies; 1 to {MAX_COPIES} are allowed"))
                    })?;
                if cp.copies != copies {
                    changes.push(format!("{cn} copies {} -> {copies}", cp.copies));
                    cp.copies = copies;
                }
            }
            if let Some(t) = &change.tier {
                let i = status
                    .tiers
                    .iter()
                    .position(|x| x.name == *t)
                    .and_then(|i| u8::try_from(i).ok())
                    .ok_or_else(|| {
                        invalid(format!(
                            "{cn}: the store has no tier named {t:?} (its tiers: {})",
                            status
                                .tiers
                                .iter()
                                .map(|x| x.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                if cp.tier != i {
                    changes.push(format!("{cn} tier {} -> {t}", tier_name(cp.tier)));
                    cp.tier = i;
                }
            }
            if let Some(c) = change.compress {
                if c && class != Class::Cold {
                    return Err(invalid(format!("{cn}: only cold data can be compressed")));
                }
                if cp.compress != c {
                    changes.push(format!("{cn} compress {} -> {c}", cp.compress));
                    cp.compress = c;
                }
            }
        }
        if let Some(n) = change.cold_after_secs {
            let secs = u32::try_from(n).ok().filter(|&v| v >= 1).ok_or_else(|| {
                invalid(format!("cold_after_secs {n}: 1 to {} seconds", u32::MAX))
            })?;
            if policy.cold_after_secs != secs {
                changes.push(format!(
                    "cold_after_secs {} -> {secs}",
                    policy.cold_after_secs
                ));
                policy.cold_after_secs = secs;
            }
        }
        if let Some(n) = change.hot_accesses {
            let v = u16::try_from(n)
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| invalid(format!("hot_accesses {n}: 1 to {}", u16::MAX)))?;
            if policy.hot_accesses != v {
                changes.push(format!("hot_accesses {} -> {v}", policy.hot_accesses));
                policy.hot_accesses = v;
            }
        }
        if let Some(n) = change.move_mib_s {
            let v = u16::try_from(n)
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| invalid(format!("move_mib_s {n}: 1 to {} MiB/s", u16::MAX)))?;
            if policy.move_mib_s != v {
                changes.push(format!("move_mib_s {} -> {v}", policy.move_mib_s));
                policy.move_mib_s = v;
            }
        }
        if change.changes_policy() && policy != status.policy {
            policy
                .validate(status.tiers.len())
                .map_err(|why| invalid(format!("tiering policy: {why}")))?;
            p.set_tier_policy(policy).map_err(|e| {
                let code = if matches!(e, dovetail_layout::Error::InvalidArgument(_)) {
                    "invalid"
                } else {
                    "failed"
                };
                CommandError::new(code, error_chain(&e))
            })?;
            let message = format!("tiering policy changed: {}", changes.join(", "));
            info!("disk {}: {message}", self.name);
            self.events.publish(
                &self.name,
                "tier-policy-changed",
                "daemon",
                message,
                None,
                None,
            );
        }
        let version = set.trusted_key.map(|k| k.0);
        let layout = set.trusted_layout.clone();
        let kicked = match (&set.mover, change.move_now) {
            (Some(m), true) => {
                m.kick();
                true
            }
            _ => false,
        };
        // The scrub reads every copy of the replicated blocks: not under the disk's control
        // lock, so status and other commands go on meanwhile.
        drop(set);
        let scrub_repairs = change.scrub.then(|| {
            let t = Instant::now();
            let n = p.scrub();
            let message = format!(
                "scrub: {n} bad cop{} rewritten ({:.1} s)",
                if n == 1 { "y" } else { "ies" },
                t.elapsed().as_secs_f64()
            );
            if n > 0 {
                warn!("disk {}: {message}", self.name);
            } else {
                info!("disk {}: {message}", self.name);
            }
            self.events
                .publish(&self.name, "scrubbed", "daemon", message, None, None);
            n
        });
        let status = p.tier_status().ok_or_else(|| {
            CommandError::new("failed", format!("disk {}: no tiering status", self.name))
        })?;
        let mover = self.mover_status(&self.lock());
        Ok(TiersReport {
            version,
            layout,
            status,
            mover,
            changes,
            scrub_repairs,
            kicked,
        })
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, CommandError> {
        Ok(self.parallax(&self.lock())?.snapshots())
    }

    /// The trusted version of a store disk.
    fn parallax(&self, set: &VersionSet) -> Result<Arc<Parallax>, CommandError> {
        self.store()?;
        set.parallax.clone().ok_or_else(|| {
            CommandError::new("conflict", format!("disk {} has no snapshots", self.name))
        })
    }

    /// Deletes a snapshot (no pause: it commits like a FLUSH does).
    pub fn delete_snapshot(&self, name: &str) -> Result<(), CommandError> {
        let set = self.lock();
        let trusted = self.parallax(&set)?;
        trusted
            .delete_snapshot(name)
            .map_err(|e| CommandError::new("failed", error_chain(&e)))?;
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
            .map_err(|e| CommandError::new("invalid", error_chain(&e)))?;
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

/// A disk of the store the daemon was asked to serve but could not open: it is not served
/// (its socket does not listen) until `reopen` opens it.
#[derive(Debug, Clone, Serialize)]
pub struct FailedDisk {
    pub name: String,
    /// The socket it is to be served on once it opens.
    pub socket: PathBuf,
    /// Why the last attempt to open it failed.
    pub reason: String,
    /// When the last attempt failed.
    pub since_unix_ms: u64,
    /// Attempts to open it so far (the daemon's start included).
    pub attempts: u64,
}

impl FailedDisk {
    /// Records that disk `name` could not be opened: a log line naming the disk and the
    /// cause, and a `disk-failed` event.
    pub fn record(
        events: &EventHub,
        name: &str,
        socket: &Path,
        reason: String,
        attempts: u64,
    ) -> FailedDisk {
        log::error!(
            "disk {name}: cannot open it, so it is not served (nothing listens on {}): {reason}; \
             the daemon's other disks are served; repair it, then `dovetail ctl reopen {name}` \
             serves it without a restart",
            socket.display()
        );
        events.publish(
            name,
            "disk-failed",
            "daemon",
            format!("cannot open the disk (attempt {attempts}), not served: {reason}"),
            None,
            None,
        );
        FailedDisk {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            reason,
            since_unix_ms: unix_ms(),
            attempts,
        }
    }
}

/// How the daemon opens the disks of its store, for `reopen`.
#[derive(Debug, Clone)]
pub struct StoreDisks {
    pub store: Arc<Store>,
    pub read_only: bool,
    pub mover_interval: Option<Duration>,
}

/// Starts serving a disk opened while the daemon runs (`reopen`): listens on its socket and
/// runs its serve loop. The serve command provides it.
pub type Launcher = Box<dyn Fn(Arc<LiveDisk>) -> Result<(), CommandError> + Send + Sync>;

/// The daemon's means to start serving a disk while it runs, and its store's, if any.
#[derive(Default)]
struct Reopener {
    store: Option<StoreDisks>,
    launcher: Option<Launcher>,
}

impl std::fmt::Debug for Reopener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopener")
            .field("store", &self.store)
            .field("launcher", &self.launcher.is_some())
            .finish()
    }
}

/// The running daemon as the control socket sees it.
#[derive(Debug)]
pub struct Daemon {
    /// The disks served (a disk reopened while the daemon runs joins them).
    disks: std::sync::RwLock<Vec<Arc<LiveDisk>>>,
    /// The disks that could not be opened, not served.
    failed: Mutex<Vec<FailedDisk>>,
    /// Held while a disk is reopened (one at a time).
    reopener: Mutex<Reopener>,
    pub events: Arc<EventHub>,
    pub store: Option<PathBuf>,
    pub started: Instant,
    /// Control connections open now.
    pub connections: AtomicU64,
    /// Control requests answered, and those that were errors.
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    /// Who may send commands, where exports go, whether fault rules are accepted.
    pub security: crate::access::Security,
}

impl Daemon {
    pub fn new(disks: Vec<Arc<LiveDisk>>, events: Arc<EventHub>, store: Option<PathBuf>) -> Self {
        Daemon {
            disks: std::sync::RwLock::new(disks),
            failed: Mutex::new(Vec::new()),
            reopener: Mutex::new(Reopener::default()),
            events,
            store,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            request_errors: AtomicU64::new(0),
            security: crate::access::Security::default(),
        }
    }

    /// The daemon with `security` instead of the default (only root and the daemon's user
    /// may send commands, no live export, no fault rules).
    pub fn with_security(mut self, security: crate::access::Security) -> Self {
        self.security = security;
        self
    }

    /// The daemon serves the disks of a store: `failed` could not be opened at the start,
    /// `reopen` tries them again through `store`.
    pub fn with_store_disks(self, store: StoreDisks, failed: Vec<FailedDisk>) -> Self {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = failed;
        self.reopener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .store = Some(store);
        self
    }

    /// How `reopen` starts serving a disk it opened.
    pub fn set_launcher(&self, launcher: Launcher) {
        self.reopener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .launcher = Some(launcher);
    }

    /// The disks served now.
    pub fn served(&self) -> Vec<Arc<LiveDisk>> {
        self.disks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The disks that could not be opened (not served).
    pub fn failed(&self) -> Vec<FailedDisk> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Disk `name` if it could not be opened.
    pub fn failed_disk(&self, name: &str) -> Option<FailedDisk> {
        self.failed().into_iter().find(|f| f.name == name)
    }

    pub fn disk(&self, name: &str) -> Result<Arc<LiveDisk>, CommandError> {
        let disks = self.served();
        if let Some(d) = disks.iter().find(|d| d.name == name) {
            return Ok(d.clone());
        }
        if let Some(f) = self.failed_disk(name) {
            return Err(CommandError::new(
                "disk-failed",
                format!(
                    "disk {} is not served: it could not be opened: {}; repair it, then \
                     `reopen` it",
                    dovetail_store::names::shown(name),
                    f.reason
                ),
            ));
        }
        Err(CommandError::new(
            "unknown-disk",
            format!(
                "no disk {} is served here (served: {})",
                dovetail_store::names::shown(name),
                disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// `reopen`: tries to open disk `name`, which could not be opened before, and serves it on
    /// its socket when it opens. A failure is recorded (reason, attempts) and returned.
    pub fn reopen(&self, name: &str) -> Result<String, CommandError> {
        let reopener = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        let Some(failed) = self.failed_disk(name) else {
            return match self.disk(name) {
                Ok(_) => Err(CommandError::new(
                    "conflict",
                    format!("disk {} is served already; only a disk that failed to open can be reopened", dovetail_store::names::shown(name)),
                )),
                Err(e) => Err(e),
            };
        };
        let (Some(sd), Some(launch)) = (&reopener.store, &reopener.launcher) else {
            return Err(CommandError::new(
                "not-available",
                "this daemon cannot open disks while it runs",
            ));
        };
        let attempts = failed.attempts + 1;
        info!("disk {name}: reopening it (attempt {attempts})");
        let opened = LiveDisk::open_store(
            &sd.store,
            name,
            &failed.socket,
            sd.read_only,
            self.events.clone(),
            sd.mover_interval,
        )
        .map_err(|e| CommandError::from(e).message)
        .and_then(|live| match launch(live.clone()) {
            Ok(()) => Ok(live),
            Err(e) => {
                live.close();
                Err(e.message)
            }
        });
        match opened {
            Ok(live) => {
                // Served before it leaves the failed list: a lookup meanwhile finds it in one.
                self.disks
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(live);
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|f| f.name != name);
                let message = format!(
                    "reopened: served on {} (after {attempts} attempts)",
                    failed.socket.display()
                );
                info!("disk {name}: {message}");
                self.events
                    .publish(name, "disk-reopened", "daemon", message.clone(), None, None);
                Ok(message)
            }
            Err(reason) => {
                let f = FailedDisk::record(
                    &self.events,
                    name,
                    &failed.socket,
                    reason.clone(),
                    attempts,
                );
                let mut failed_list = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                for slot in failed_list.iter_mut().filter(|f| f.name == name) {
                    *slot = f.clone();
                }
                Err(CommandError::new(
                    "failed",
                    format!("disk {name}: still cannot open it: {reason}"),
                ))
            }
        }
    }

    /// `deploy`: attaches a `layout` candidate under `policy` to the chosen disks: the named
    /// ones, or a sample of `percent` % of the disks that have no candidate yet, chosen by
    /// `seed` (the same seed picks the same disks). Disks that cannot take one are reported,
    /// not fatal.
    pub fn deploy(
        &self,
        layout: Option<&str>,
        policy: &str,
        disks: Option<&[String]>,
        sample: Option<(f64, u64)>,
    ) -> Result<serde_json::Value, CommandError> {
        crate::ops::teed::parse_policy(policy)?;
        let chosen: Vec<Arc<LiveDisk>> = match (disks, sample) {
            (Some(names), None) => names
                .iter()
                .map(|n| self.disk(n))
                .collect::<Result<_, _>>()?,
            (None, Some((percent, seed))) => {
                if !(percent > 0.0 && percent <= 100.0) {
                    return Err(CommandError::new(
                        "invalid",
                        format!("sample {percent}% is not in (0, 100]"),
                    ));
                }
                let mut eligible: Vec<Arc<LiveDisk>> = self
                    .served()
                    .iter()
                    .filter(|d| d.status().candidate.is_none() && d.store().is_ok())
                    .cloned()
                    .collect();
                eligible.sort_by(|a, b| a.name.cmp(&b.name));
                let n =
                    ((eligible.len() as f64 * percent / 100.0).ceil() as usize).min(eligible.len());
                // Fisher-Yates with a seeded xorshift64*: reproducible choices.
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for i in (1..eligible.len()).rev() {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    let j = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (i as u64 + 1)) as usize;
                    eligible.swap(i, j);
                }
                eligible.truncate(n);
                eligible.sort_by(|a, b| a.name.cmp(&b.name));
                eligible
            }
            _ => {
                return Err(CommandError::new(
                    "bad-request",
                    "deploy: give either \"disks\" or \"sample\"",
                ))
            }
        };
        let mut deployed = Vec::new();
        let mut skipped = Vec::new();
        for d in chosen {
            let layout = layout.map_or_else(|| d.trusted_layout(), str::to_string);
            match d.attach(&layout, policy, &[]) {
                Ok((message, pause)) => deployed.push(serde_json::json!({
                    "disk": d.name, "message": message, "pause": pause
                })),
                Err(e) => skipped.push(serde_json::json!({
                    "disk": d.name, "code": e.code, "reason": e.message
                })),
            }
        }
        Ok(serde_json::json!({ "deployed": deployed, "skipped": skipped }))
    }

    /// Every metric, in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let mut out = Exposition::default();
        for d in &self.served() {
            d.render_metrics(&mut out);
        }
        let served = self.served();
        let failed = self.failed();
        for (name, v) in served
            .iter()
            .map(|d| (d.name.as_str(), 0.0))
            .chain(failed.iter().map(|f| (f.name.as_str(), 1.0)))
        {
            out.gauge(
                "dovetail_disk_failed",
                "1 while a disk the daemon was asked to serve could not be opened (not served; \
                 `ctl reopen` retries it).",
                &[("disk", name)],
                v,
            );
        }
        out.gauge(
            "dovetail_uptime_seconds",
            "Seconds since the daemon started.",
            &[],
            self.started.elapsed().as_secs_f64(),
        );
        out.gauge(
            "dovetail_control_connections",
            "Control socket connections open now.",
            &[],
            self.connections.load(Ordering::Relaxed) as f64,
        );
        out.counter(
            "dovetail_control_requests_total",
            "Control requests answered.",
            &[],
            self.requests.load(Ordering::Relaxed),
        );
        out.counter(
            "dovetail_control_request_errors_total",
            "Control requests answered with an error.",
            &[],
            self.request_errors.load(Ordering::Relaxed),
        );
        out.counter(
            "dovetail_events_dropped_total",
            "Events a slow follower of the event stream did not get.",
            &[],
            self.events.dropped.load(Ordering::Relaxed),
        );
        out.finish()
    }

    pub fn close(&self) {
        for d in &self.served() {
            d.close();
        }
    }
}
