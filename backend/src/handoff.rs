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
