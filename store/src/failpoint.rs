//! Crash points: named places in the code where a test can make the process die (as `kill -9`
//! would), panic or stall, to prove that what was acknowledged survives a crash *there*.
//!
//! Built on the `fail` crate and compiled in only with this crate's `failpoints` feature (the
//! daemon's `failpoints` feature turns it on; `scripts/test.sh` builds the tests with it).
//! Without the feature [`hit`] is an empty inline function.
//!
//! At start-up the daemon calls [`setup_from_env`], which reads `FAILPOINTS`, the `fail`
//! crate's list `NAME=ACTIONS;NAME=ACTIONS`. The action `return` means *die here*: the process
//! sends itself `SIGKILL`, so nothing after the point runs and nothing is flushed or unwound.
//! Other actions are `fail`'s own: `panic`, `sleep(MS)`, `off`, with counts and probabilities
//! (`3*off->return`: pass the first three hits, die at the fourth; `10%return`).
//!
//! Every point is listed in [`POINTS`] (with where it is), so a test can choose among them and
//! the documentation stays in one place.

/// Every crash point in the code: name and what the code has done when it is hit.
pub const POINTS: &[(&str, &str)] = &[
    (
        "store-commit-unsynced",
        "store: a catalog generation written to its slot, not yet synced",
    ),
    (
        "store-commit-synced",
        "store: a catalog generation synced, not yet the in-memory catalog",
    ),
    (
        "store-promote",
        "store: a promote about to commit (candidate becomes trusted)",
    ),
    (
        "store-ungrant",
        "store: an extent a version gave back about to be freed in the catalog",
    ),
    (
        "store-set-attachment",
        "store: a disk's attachment record about to be committed (attach, detach)",
    ),
    (
        "attach-recorded",
        "attach: the attachment committed to the catalog, the disk not yet listening",
    ),
    (
        "attach-listening",
        "attach: the disk listening on its socket, its serve loop not yet started",
    ),
    (
        "detach-recorded",
        "detach: the attachment removed from the catalog, the disk still served",
    ),
    (
        "serve-control-held",
        "serve: the control socket bound and connectable, the daemon not yet accepting commands",
    ),
    (
        "disk-create-done",
        "disk-create: the new disk committed to the catalog, no reply sent yet",
    ),
    (
        "parallax-write",
        "parallax: a guest write's data and tree path written, not committed",
    ),
    (
        "parallax-flush",
        "parallax: a FLUSH about to commit the tree",
    ),
    (
        "parallax-commit-unsynced",
        "parallax: dirty tree nodes written back, not synced",
    ),
    (
        "parallax-commit-synced",
        "parallax: tree synced, root record not yet committed",
    ),
    (
        "parallax-commit-done",
        "parallax: root record committed, old blocks not yet released",
    ),
    (
        "parallax-snapshot",
        "parallax: a snapshot about to be committed",
    ),
    (
        "tier-move",
        "parallax-v2 mover: blocks copied to their new groups, pointers switched, not committed",
    ),
    (
        "upgrade-on-write",
        "tee: a guest write migrated a block to the candidate, presence bit not yet set",
    ),
    (
        "copyout-batch",
        "copy-out: a batch written to the candidate, presence bits not yet set",
    ),
    (
        "copyout-checkpoint",
        "copy-out: candidate flushed, presence map not yet persisted",
    ),
    (
        "presence-persist",
        "presence map: the new map written, not yet synced",
    ),
    (
        "swap",
        "switch: I/O paused for a version swap (tee, untee, promote), change not yet made",
    ),
    (
        "promote-verify",
        "promote: the verification pass compared a piece of both versions (cursor maybe not \
         yet checkpointed)",
    ),
    (
        "queue-kick",
        "queue worker: kicked by the guest, about to drain its ring (`sleep(MS)` wedges it: \
         the systemd watchdog's pings must stop)",
    ),
    (
        "sandbox-forbidden-call",
        "queue worker: kicked by the guest, makes a system call its seccomp filter forbids \
         (`return`: tests that `serve --seccomp trap` stops it)",
    ),
    (
        "promote-retire",
        "promote: the candidate committed as trusted, the old version not yet retired",
    ),
    (
        "resize-committed",
        "resize: the catalog's new size committed, the version not yet grown (the next open \
         grows it)",
    ),
    (
        "control-request",
        "control socket: a request parsed, about to be carried out (its `panic` action tests \
         the control plane's panic boundary: an error reply and an event)",
    ),
    (
        "store-upgrade-members",
        "store upgrade --voting: one step of the upgrade to format 7 done (header and slot synced)",
    ),
    (
        "store-member-added",
        "tee-add (and tee with several candidates): a member committed to the catalog as \
         filling, not yet in the Tee",
    ),
    (
        "store-member-remove",
        "tee-remove: a member's removal about to be committed (it is still in the Tee)",
    ),
    (
        "promote-member",
        "promote of a voting Tee: the role swap committed and made in the Tee, the pause not \
         yet over",
    ),
    (
        "upgrade-handed-over",
        "upgrade: the old daemon sent its guests' connections and its sockets, not yet the new \
         one's ready",
    ),
    (
        "upgrade-before-commit",
        "upgrade: the old daemon handed its sockets over and got the new one's ready, not yet \
         its commit",
    ),
    (
        "upgrade-committed",
        "upgrade: the old daemon sent its commit, not yet exited",
    ),
];

/// Whether crash points are compiled in (the `failpoints` feature).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Crash point `name`: dies, panics or sleeps here if `FAILPOINTS` says so; otherwise (and
/// always without the `failpoints` feature) does nothing.
#[inline(always)]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        die(name);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Whether crash point `name` is armed with `return` (a point that does something other than
/// dying: the caller acts on it). Always false without the `failpoints` feature.
#[inline(always)]
pub fn armed(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    return fail::eval(name, |_| ()).is_some();
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

#[cfg(feature = "failpoints")]
fn die(name: &str) -> ! {
    // Best effort: the log line may not reach its file, which is fine (it is a crash).
    log::error!("crash point {name}: killing the process (SIGKILL)");
    // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; this is not reached.
    std::process::abort()
}

/// Reads `FAILPOINTS` and arms the crash points it names (with the `failpoints` feature; a
/// warning without). Returns how many points were configured; an unknown name is an error, so
/// a misspelt point never silently does nothing.
pub fn setup_from_env() -> Result<usize, String> {
    #[cfg(feature = "failpoints")]
    {
        let Ok(spec) = std::env::var("FAILPOINTS") else {
            return Ok(0);
        };
        let mut n = 0;
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, actions)) = part.split_once('=') else {
                return Err(format!("FAILPOINTS: {part:?} is not NAME=ACTIONS"));
            };
            let name = name.trim();
            if !POINTS.iter().any(|(p, _)| *p == name) {
                return Err(format!("FAILPOINTS: no crash point named {name:?}"));
            }
            fail::cfg(name, actions.trim()).map_err(|e| format!("FAILPOINTS: {name}: {e}"))?;
            n += 1;
        }
        Ok(n)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        if std::env::var_os("FAILPOINTS").is_some() {
            log::warn!(
                "FAILPOINTS is set, but this build has no crash points (they need \
                 --features dovetail-backend/failpoints); ignoring it"
            );
        }
        Ok(0)
    }
}
