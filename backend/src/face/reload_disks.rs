//! SIGHUP's changes to the disks the config file names, made with the live verbs' own code:
//! a disk no longer named is detached as `ctl detach NAME` (without `--force`) detaches it, and
//! a disk whose socket changed is detached, then served on its new socket. Neither happens
//! under a connected guest: the disk stays served where it is, and the reload says why.

use std::path::Path;

use crate::daemon::proto::ErrorCode;
use crate::daemon::served::{socket_problem, Daemon};

/// Why disk `name` was not detached: the live verb's refusal, made plain for a reload when it
/// is a connected guest's.
fn refusal(daemon: &Daemon, name: &str, e: crate::daemon::proto::CommandError) -> String {
    let guest = daemon.disk(name).is_ok_and(|d| d.status().guest_connected);
    if e.code == ErrorCode::Conflict && guest {
        format!(
            "a guest is connected to it (shut the VM down first, or `dovetail ctl detach {name} \
             --force` detaches it now: its requests in flight complete, the disk is flushed, \
             the guest loses it)"
        )
    } else {
        e.message
    }
}

/// Disk `name` left the config file: detached (its attachment, if any, leaves the catalog
/// first), or `None` if the daemon did not serve it. Refused while a guest is connected.
pub fn remove(daemon: &Daemon, name: &str) -> Result<Option<String>, String> {
    if daemon.disk(name).is_err() && daemon.failed_disk(name).is_none() {
        return Ok(None);
    }
    match daemon.detach_disk(name, false) {
        Ok(reply) => Ok(Some(
            reply["message"].as_str().unwrap_or("detached").to_string(),
        )),
        Err(e) => Err(refusal(daemon, name, e)),
    }
}

/// Disk `name`'s socket changed in the config file: detached, then served on `socket`. The new
/// socket is checked before anything changes; if the disk cannot be served there after all,
/// it is served on its old socket again.
pub fn relocate(daemon: &Daemon, name: &str, socket: &Path) -> Result<String, String> {
    if let Some(why) = socket_problem(socket) {
        return Err(format!("cannot listen on {}: {why}", socket.display()));
    }
    if let Some(other) = daemon.served().into_iter().find(|d| d.socket == socket) {
        return Err(format!(
            "disk {} is served on {} already: a socket serves one disk",
            other.name,
            socket.display()
        ));
    }
    let old = match daemon.disk(name) {
        Ok(d) => Some(d.socket.clone()),
        Err(_) => daemon.failed_disk(name).map(|f| f.socket),
    };
    remove(daemon, name)?;
    match daemon.serve_new(name, socket) {
        Ok(m) => Ok(format!("detached, then {m}")),
        Err(e) => {
            let back = match &old {
                Some(old) => match daemon.serve_new(name, old) {
                    Ok(_) => format!("served on {} again", old.display()),
                    Err(e2) => format!(
                        "and not on {} again either ({}): not served",
                        old.display(),
                        e2.message
                    ),
                },
                None => "not served".to_string(),
            };
            Err(format!(
                "cannot be served on {}: {}; {back}",
                socket.display(),
                e.message
            ))
        }
    }
}
