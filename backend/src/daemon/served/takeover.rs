//! `takeover` (docs/control.md): on a store shared by several daemons (`serve
//! --shared-store`), a disk another daemon owns is taken over: its owner fenced first, then its
//! lock taken and the disk served here as `reopen` serves a disk that failed to open.

use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use super::{Daemon, FailedDisk};
use crate::daemon::proto::{CommandError, ErrorCode};

/// How often a daemon on a shared store checks that it still owns the disks it serves.
pub const OWNERSHIP_CHECK: Duration = Duration::from_secs(1);

impl Daemon {
    /// On a store shared with other daemons: a thread that checks every [`OWNERSHIP_CHECK`]
    /// that this daemon still owns the disks it serves, and stops serving any it lost (taken
    /// over by another daemon, which fenced this one): its guest disconnected, the disk listed
    /// as failed with why (a `disk-failed` event and an error in the log). The other disks
    /// are served on. Ends when `stop` says so.
    pub fn watch_ownership(self: &Arc<Self>, stop: impl Fn() -> bool + Send + 'static) {
        let Some(store) = self.shared_store() else {
            return;
        };
        let daemon = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("ownership".into())
            .spawn(move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Control);
                while !stop() {
                    std::thread::sleep(OWNERSHIP_CHECK);
                    let Some(daemon) = daemon.upgrade() else {
                        return;
                    };
                    // Each served disk through the handle serving it (on RADOS one per disk).
                    for live in daemon.served() {
                        let s = live.store().map_or_else(|_| store.clone(), Arc::clone);
                        let mut lost = s.check_owned();
                        lost.extend(s.lost_disks());
                        if let Some((_, why)) = lost.into_iter().find(|(d, _)| *d == live.name) {
                            daemon.lose_disk(&live.name, &why);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the ownership check: {e}");
        }
    }

    pub(super) fn shared_store(&self) -> Option<Arc<dovetail_store::Store>> {
        let r = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        r.store
            .as_ref()
            .map(|sd| sd.store.clone())
            .filter(|s| s.is_shared())
    }

    /// Stops serving disk `name`, which another daemon took over, if it is served here.
    fn lose_disk(&self, name: &str, why: &str) {
        let Some(d) = self.served().into_iter().find(|d| d.name == name) else {
            return;
        };
        if let Some(serving) = self.serving() {
            if let Err(e) = serving.stop(name) {
                warn!("disk {name}: stopping its serve loop: {}", e.message);
            }
        }
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|x| !Arc::ptr_eq(x, &d));
        d.close();
        let failed = FailedDisk::record(
            &self.events,
            name,
            &d.socket,
            format!("this daemon no longer owns the disk ({why}); it stopped serving it"),
            1,
        );
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(failed);
    }

    /// Takes disk `name` over from the daemon that owns it, fencing that daemon first, and
    /// serves it on the socket it was to be served on. Only a disk this daemon was to serve and
    /// could not (its owner was another daemon: `status` lists it as failed, naming it).
    pub fn take_over(&self, name: &str) -> Result<String, CommandError> {
        let store = {
            let r = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
            r.store.as_ref().map(|sd| sd.store.clone())
        };
        let Some(store) = store else {
            return Err(CommandError::new(
                ErrorCode::NotAvailable,
                "this daemon serves no store: there is no disk to take over",
            ));
        };
        if !store.is_shared() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                "this daemon holds its store alone (serve --shared-store shares it with other \
                 daemons): every disk of it is this daemon's already",
            ));
        }
        if self.failed_disk(name).is_none() {
            return match self.disk(name) {
                Ok(_) => Err(CommandError::new(
                    ErrorCode::Conflict,
                    format!(
                        "disk {} is served by this daemon already",
                        dovetail_store::names::shown(name)
                    ),
                )),
                Err(e) => Err(e),
            };
        }
        let fenced = store.take_over_disk(name, None)?;
        if !fenced.is_empty() {
            info!("disk {name}: fenced its owner {}", fenced.join(", "));
        }
        let served = self.reopen(name)?;
        Ok(if fenced.is_empty() {
            format!("taken over; {served}")
        } else {
            format!("fenced {} and took it over; {served}", fenced.join(", "))
        })
    }
}

/// On a shared store, takes disk `name`'s lock for a change of it the daemon makes without
/// serving it (`attach` before the disk is open, `disk-delete`); returns whether it was taken
/// here ([`unhold`] gives it back then). A disk another daemon owns: `conflict`, naming it.
pub(super) fn hold(store: &dovetail_store::Store, name: &str) -> Result<bool, CommandError> {
    if !store.is_shared() || store.owns_disk(name) {
        return Ok(false);
    }
    match store.acquire_disk(name) {
        Ok(()) => Ok(true),
        Err(e @ dovetail_store::StoreError::DiskOwned { .. }) => {
            Err(CommandError::new(ErrorCode::Conflict, e.to_string()))
        }
        Err(e) => Err(CommandError::from(e)),
    }
}

/// Gives back a lock [`hold`] took.
pub(super) fn unhold(store: &dovetail_store::Store, name: &str, held: bool) {
    if held {
        if let Err(e) = store.release_disk(name) {
            warn!("disk {name}: {e}");
        }
    }
}
