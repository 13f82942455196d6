//! A disk's ownership following its VM (QEMU live migration between two daemons on one shared
//! store, `serve --shared-store`).
//!
//! The destination daemon serves the disk's socket before it owns the disk
//! ([`LiveDisk::open_store_incoming`], `serve --incoming NAME`): QEMU started with `-incoming`
//! connects at once, negotiates and sets up memory, but starts the queues only when the VM
//! resumes there, after the migration. The request path tells the daemon when a guest's queues
//! start and stop (`disk::RingHook`):
//!
//! - the source, when every running queue stopped while dirty logging was on (the end of a
//!   migration: QEMU reads the rings' bases once the VM stopped, after every request taken was
//!   completed), stops the tier mover, flushes the disk (every write acknowledged is durable
//!   and committed) and releases the disk's lock (`disk-released`);
//! - the destination, at the first kick of a queue, takes the disk's lock, waiting up to
//!   [`acquire_wait`] (`serve --incoming-timeout`, 15 s by default) for the source to release it, then reopens the trusted version from its
//!   last commit (what the source committed) and serves it (`disk-acquired`); if it cannot, the
//!   guest's requests fail with IOERR and a `disk-acquire-failed` event says why;
//! - a migration that fails after the source released the disk restarts the source's queues:
//!   the source takes the disk back the same way (nobody else wrote it).
//!
//! A disk with a candidate (a Tee, a voting Tee) does not follow its VM yet: opening it before
//! it is owned is refused, and so is taking it over when its queues start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dovetail_layout::{error_chain, BlockLayout};
use dovetail_store::{Store, StoreError};
use log::{error, info, warn};

use super::{Backing, LiveDisk};
use crate::daemon::events::EventHub;
use crate::disk::RingHook;
use crate::metrics::Metered;
use crate::ops::OpsError;

/// How long a disk whose guest starts waits for the daemon owning it to let it go, unless
/// `serve --incoming-timeout` says otherwise.
pub const ACQUIRE_WAIT: Duration = Duration::from_secs(15);
/// The wait in force, in milliseconds (0: [`ACQUIRE_WAIT`]).
static WAIT_MS: AtomicU64 = AtomicU64::new(0);

/// Sets how long a disk whose guest starts waits for its owner (`serve --incoming-timeout`).
pub fn set_acquire_wait(wait: Duration) {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    WAIT_MS.store(ms, Ordering::Relaxed);
}

/// How long a disk whose guest starts waits for its owner to let it go.
pub fn acquire_wait() -> Duration {
    match WAIT_MS.load(Ordering::Relaxed) {
        0 => ACQUIRE_WAIT,
        ms => Duration::from_millis(ms),
    }
}

/// Parses a duration option: a whole number followed by `ms`, `s` or `m` (`s` if none).
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 15s, 500ms, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: the unit must be ms, s or m")),
    }
}

/// Parses `--incoming-timeout` (e.g. 15s, 500ms, 2m; from 100 ms to 10 minutes).
pub fn parse_incoming_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_span(s)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
        return Err(format!("{s:?}: the timeout must be from 100ms to 10m"));
    }
    Ok(d)
}

/// How often the wait tries again.
const ACQUIRE_RETRY: Duration = Duration::from_millis(20);

/// The hook the request path calls (holds the live disk weakly: the disk owns the hook).
struct Follow(Weak<LiveDisk>);

impl RingHook for Follow {
    fn rings_started(&self) -> Result<(), String> {
        match self.0.upgrade() {
            Some(live) => live.take_ownership(),
            None => Err("the disk is being closed".into()),
        }
    }

    fn rings_stopped(&self, migrating: bool) {
        if !migrating {
            // A VM paused, rebooted or reconnecting keeps its disk here.
            return;
        }
        if let Some(live) = self.0.upgrade() {
            live.let_go();
        }
    }
}

impl LiveDisk {
    /// A disk of a shared store served before this daemon owns it: the destination of a live
    /// migration. Its socket is served (QEMU `-incoming` connects and reads the config space);
    /// the disk is taken over, and its trusted version reopened from the last commit, when the
    /// guest's queues start. Refused on a store not opened shared, and for a disk with a
    /// candidate.
    pub fn open_store_incoming(
        store: &Arc<Store>,
        name: &str,
        socket: &std::path::Path,
        read_only: bool,
        serial: Option<&str>,
        events: Arc<EventHub>,
        mover_interval: Option<Duration>,
    ) -> Result<Arc<LiveDisk>, OpsError> {
        if !store.is_shared() {
            return Err(OpsError::Invalid(format!(
                "disk {name}: --incoming needs a store shared with other daemons (--shared-store)"
            )));
        }
        let info = store.disk(name)?;
        if info.candidate.is_some() {
            return Err(OpsError::Invalid(format!(
                "disk {name} has a candidate (a Tee): it cannot be served --incoming (a live \
                 migration of a teed disk is not supported yet)"
            )));
        }
        let own;
        let store = if store.on_rados() {
            own = store.open_shared_again()?;
            &own
        } else {
            store
        };
        let live = LiveDisk::open_owned(
            store,
            name,
            socket,
            read_only,
            serial,
            events,
            mover_interval,
            store.owns_disk(name),
        )?;
        info!(
            "disk {name}: served before it is owned (--incoming): taken over from its owner \
             when a guest starts its queues"
        );
        Ok(live)
    }

    /// Makes the disk's ownership follow its guest's queues (a disk of a shared store).
    pub(super) fn follow_rings(self: &Arc<Self>) {
        if let Backing::Store { store } = &self.backing {
            if store.is_shared() {
                self.disk
                    .set_ring_hook(Arc::new(Follow(Arc::downgrade(self))));
            }
        }
    }

    /// The guest's queues start: the disk is taken (waiting for its owner to let it go) and its
    /// trusted version reopened from its last commit, unless this daemon owns it already.
    fn take_ownership(&self) -> Result<(), String> {
        let Backing::Store { store } = &self.backing else {
            return Ok(());
        };
        if store.owns_disk(&self.name) {
            return Ok(());
        }
        let started = Instant::now();
        let deadline = started + acquire_wait();
        let mut tries = 0u32;
        loop {
            tries += 1;
            match store.acquire_disk(&self.name) {
                Ok(()) => break,
                Err(StoreError::DiskOwned { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(ACQUIRE_RETRY);
                }
                Err(e) => {
                    let message = format!(
                        "a guest started its queues, but the disk could not be taken from its \
                         owner in {:.1} s ({tries} tries): {}; its requests fail until it is \
                         (`ctl takeover` once the owner is gone)",
                        started.elapsed().as_secs_f64(),
                        error_chain(&e)
                    );
                    error!("disk {}: {message}", self.name);
                    self.events.publish(
                        &self.name,
                        "disk-acquire-failed",
                        "daemon",
                        message.clone(),
                        None,
                        None,
                    );
                    return Err(message);
                }
            }
        }
        let waited = started.elapsed();
        match self.reopen_taken(store, waited) {
            Ok(()) => Ok(()),
            Err(why) => {
                if let Err(e) = store.release_disk(&self.name) {
                    warn!("disk {}: {}", self.name, error_chain(&e));
                }
                error!("disk {}: {why}", self.name);
                self.events.publish(
                    &self.name,
                    "disk-acquire-failed",
                    "daemon",
                    why.clone(),
                    None,
                    None,
                );
                Err(why)
            }
        }
    }

    /// Serves the trusted version as last committed (by the daemon that owned the disk) in
    /// place of the instance opened before, during a pause.
    fn reopen_taken(&self, store: &Arc<Store>, waited: Duration) -> Result<(), String> {
        let mut set = self.lock();
        if set.candidate.is_some() || set.voting.is_some() {
            return Err("a disk with a candidate (a Tee) cannot follow its VM yet".into());
        }
        let opened = Instant::now();
        let fresh = crate::ops::open::open_disk(store, &self.name)
            .map(Arc::new)
            .map_err(|e| {
                format!(
                    "the disk was taken, but its trusted version could not be opened from its \
                     last commit: {}",
                    error_chain(&e)
                )
            })?;
        if !self.disk.read_only() {
            if let Err(e) = fresh.start_reserve() {
                warn!("disk {}: no extent reserve: {e}", self.name);
            }
        }
        let opened = opened.elapsed();
        let served: Arc<dyn BlockLayout> =
            Arc::new(Metered::new(fresh.clone(), set.trusted_metrics.clone()));
        drop(set.mover.take());
        Self::pace(&mut set);
        let ((), pause) = self.switch.pause(|cur| *cur = served.clone());
        set.trusted = served;
        set.parallax = Some(fresh.clone());
        set.mover = self.start_mover(&fresh);
        let message = format!(
            "taken over as its guest started (waited {:.1} ms for the owner to let it go); \
             version {} reopened from its last commit in {:.1} ms",
            waited.as_secs_f64() * 1e3,
            set.trusted_key.map_or(0, |k| k.0),
            opened.as_secs_f64() * 1e3
        );
        self.changed(&mut set, "disk-acquired", message, pause);
        Ok(())
    }

    /// The end of a live migration here (the source): the guest's queues stopped with dirty
    /// logging on. The tier mover stops, the disk is flushed (every acknowledged write durable
    /// and committed), then its lock is released for the destination. A flush that fails keeps
    /// the lock: the destination's wait ends in a clear error rather than in lost writes.
    fn let_go(&self) {
        let Backing::Store { store } = &self.backing else {
            return;
        };
        if !store.owns_disk(&self.name) {
            return;
        }
        let started = Instant::now();
        drop(self.lock().mover.take());
        if let Err(e) = self.switch.flush() {
            let message = format!(
                "the VM migrated away, but flushing the disk failed ({}): the disk is kept \
                 here, so the destination cannot take it",
                error_chain(&e)
            );
            error!("disk {}: {message}", self.name);
            self.events.publish(
                &self.name,
                "disk-release-failed",
                "daemon",
                message,
                None,
                None,
            );
            return;
        }
        match store.release_disk(&self.name) {
            Ok(_) => {
                let message = format!(
                    "the VM's queues stopped at the end of a live migration: flushed and \
                     released in {:.1} ms, for the destination to serve",
                    started.elapsed().as_secs_f64() * 1e3
                );
                info!("disk {}: {message}", self.name);
                self.events
                    .publish(&self.name, "disk-released", "daemon", message, None, None);
            }
            Err(e) => {
                let message = format!("releasing the disk failed: {}", error_chain(&e));
                error!("disk {}: {message}", self.name);
                self.events.publish(
                    &self.name,
                    "disk-release-failed",
                    "daemon",
                    message,
                    None,
                    None,
                );
            }
        }
    }
}
