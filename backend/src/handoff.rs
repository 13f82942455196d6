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
    let at = monotonic_ns();
    match daemon.export() {
        Ok(c) => {
            note_paused(&c, at);
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

/// Drops the connections no serve loop took (their disks are not served), each with a warning:
/// the frontend's connection closes once no process holds it, and the guest reconnects.
pub fn drop_unclaimed() {
    drop_left(std::mem::take(&mut *pending()));
}

fn drop_left(left: std::collections::BTreeMap<String, ExportedConnection>) {
    for disk in left.keys() {
        warn!(
            "disk {disk}: its guest's connection was handed over but the disk is not served; \
             the connection is closed (the guest reconnects once it is served again)"
        );
    }
}

/// Drops every pending connection (closing this process's files of them; the frontend's
/// connection stays open if another process holds it).
pub fn forget_all() {
    pending().clear();
}

/// When each exported connection was paused (`CLOCK_MONOTONIC`, ns, the same clock in every
/// process of the host), by its socket's inode (the same in every process holding it): the
/// serve loop that resumes it logs how long the guest's queues stood still.
static PAUSED: std::sync::Mutex<std::collections::BTreeMap<u64, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The inode of a connection's socket.
fn inode(conn: &std::os::unix::net::UnixStream) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let fd = std::os::fd::AsFd::as_fd(conn).try_clone_to_owned().ok()?;
    std::fs::File::from(fd).metadata().ok().map(|m| m.ino())
}

/// Now on `CLOCK_MONOTONIC`, in ns.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`, a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

fn paused() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<u64, u64>> {
    PAUSED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records when `c` was paused (`at`: [`monotonic_ns`]).
pub fn note_paused(c: &ExportedConnection, at: u64) {
    if let Some(i) = inode(&c.conn) {
        paused().insert(i, at);
    }
}

/// When `c` was paused, if known.
pub fn paused_at(c: &ExportedConnection) -> Option<u64> {
    inode(&c.conn).and_then(|i| paused().get(&i).copied())
}

/// How long ago `c` was paused, forgetting it.
pub(crate) fn paused_for(c: &ExportedConnection) -> Option<std::time::Duration> {
    let at = inode(&c.conn).and_then(|i| paused().remove(&i))?;
    Some(std::time::Duration::from_nanos(
        monotonic_ns().saturating_sub(at),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn bare(conn: UnixStream) -> ExportedConnection {
        ExportedConnection {
            conn,
            negotiated: Default::default(),
            owned: true,
            features_acked: false,
            acked_features: 0,
            acked_protocol_features: 0,
            regions: Vec::new(),
            vrings: Vec::new(),
            inflight: None,
            backend_req: None,
        }
    }

    #[test]
    fn a_connection_no_serve_loop_took_is_closed_and_its_pause_known() {
        let (ours, mut frontend) = UnixStream::pair().expect("pair");
        let c = bare(ours);
        let at = monotonic_ns();
        note_paused(&c, at);
        assert_eq!(paused_at(&c), Some(at));
        // (The process's pending map is shared by the tests running in parallel: a map of
        // this test's own.)
        drop_left([("unserved-disk".to_string(), c)].into_iter().collect());
        // The last holder closed it: the frontend reads end of file (it reconnects).
        let mut b = [0u8; 1];
        assert_eq!(frontend.read(&mut b).expect("read"), 0);
    }

    #[test]
    fn the_pause_is_known_by_the_socket_in_any_of_its_descriptors() {
        let (ours, _frontend) = UnixStream::pair().expect("pair");
        let other = ours.try_clone().expect("dup");
        let c = bare(ours);
        note_paused(&c, monotonic_ns().saturating_sub(5_000_000));
        let d = paused_for(&bare(other)).expect("known through another descriptor");
        assert!(d >= std::time::Duration::from_millis(5), "{d:?}");
        assert!(paused_for(&c).is_none(), "forgotten once read");
    }
}
