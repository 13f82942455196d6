//! A guest's vhost-user connection handed from one serve loop to another without a
//! disconnect: the old loop pauses it between two messages ([`crate::server::Shutdown::hand_off`]),
//! stops its queues in place (requests in flight complete first) and exports it
//! ([`vhost_user_backend::ExportedConnection`]: the socket, negotiated features, guest memory,
//! each vring's addresses, indexes and eventfds, the inflight region, the backend request
//! channel); the new loop ([`crate::server::serve_adopting`]), in this process or in the one
//! replacing it (`ctl upgrade`), serves it from where the old one stopped.

use log::{info, warn};
use vhost_user_backend::{ExportedConnection, VhostUserDaemon};

use crate::device::BlkDevice;

/// Exports the paused connection of `daemon` (`who`'s guest `guest`); `None` (logged) when it
/// cannot be: the caller disconnects the guest, which reconnects.
pub(crate) fn export(
    who: &str,
    guest: u64,
    daemon: &mut VhostUserDaemon<BlkDevice>,
) -> Option<ExportedConnection> {
    match daemon.export() {
        Ok(c) => {
            let started = c.vrings.iter().filter(|v| v.started).count();
            info!(
                "{who}: guest {guest}: connection paused and exported for a handover ({started} \
                 queue(s) started, {} memory region(s), {} fds)",
                c.regions.len(),
                c.file_count()
            );
            Some(c)
        }
        Err(e) => {
            warn!(
                "{who}: guest {guest}: its connection cannot be handed over ({e}); it is \
                 disconnected instead and the guest reconnects"
            );
            None
        }
    }
}

/// Connections exported for a handover and not yet served again, by disk name: the old
/// process keeps its own until the new one commits (to serve them again if it does not), the
/// new one those it received until each disk's serve loop adopts its own.
static PENDING: std::sync::Mutex<std::collections::BTreeMap<String, ExportedConnection>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn pending(
) -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, ExportedConnection>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps `disk`'s exported connection until its next serve loop adopts it.
pub fn stash(disk: &str, c: ExportedConnection) {
    if pending().insert(disk.to_string(), c).is_some() {
        warn!("disk {disk}: a second connection handed over; the first is closed");
    }
}

/// The connection `disk`'s serve loop is to serve first, if one was handed over.
pub fn take(disk: &str) -> Option<ExportedConnection> {
    pending().remove(disk)
}

/// Calls `f` with every pending connection (to send them), keeping them.
pub fn with_pending<R>(
    f: impl FnOnce(&std::collections::BTreeMap<String, ExportedConnection>) -> R,
) -> R {
    f(&pending())
}

/// Drops every pending connection (closing this process's files of them; the frontend's
/// connection stays open if another process holds it).
pub fn forget_all() {
    pending().clear();
}
