//! Guest I/O ahead of management: the CPU priority of each kind of thread (`serve
//! --control-nice N`).
//!
//! The control plane's threads (the main thread, the control socket's accept loop and
//! connections, which run every verb: a `disk-create`, an `attach` formatting a new disk, the
//! catalog commits; the metrics endpoint) run N nice levels below the daemon's own priority;
//! every other kind (serve loops, queue workers, I/O engines, the layouts' commit and reserve
//! threads, the background movers and streams) runs at the daemon's own. On 2 busy cores a
//! burst of disk creations then waits for the running disks' queues, not the reverse.
//!
//! Linux keeps a nice value per thread, and a new thread inherits its creator's: an `attach`
//! starts the new disk's serve loop from a control thread, and the loop starts its queue
//! workers. So every kind *sets* its level as it starts ([`entered`], from the thread-kind
//! hook every long-lived thread calls), lowering or restoring. Restoring a higher priority is
//! refused to an unprivileged process whose RLIMIT_NICE does not allow it: [`configure`]
//! checks that a thread can go down and back up before lowering any, and otherwise leaves
//! every thread at the daemon's priority (and says so in the log): a guest's thread must never
//! be left at the control plane's level.

use std::sync::OnceLock;

use dovetail_store::thread_kind::ThreadKind;
use log::{info, warn};

/// The default of `serve --control-nice`: the control plane's threads get about a tenth of
/// the CPU time of a busy queue worker they compete with (the kernel's weight of nice 10
/// against nice 0 is 110 against 1024).
pub const DEFAULT_CONTROL_NICE: i32 = 10;

/// The daemon's levels, once [`configure`] set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels {
    /// The nice value of guest-serving threads: the daemon's own when it started.
    pub base: i32,
    /// The nice value of the control plane's threads.
    pub control: i32,
}

static LEVELS: OnceLock<Option<Levels>> = OnceLock::new();

/// The calling thread's nice value.
pub fn current_nice() -> std::io::Result<i32> {
    // getpriority may return -1 as a value: errno tells it from an error.
    // SAFETY: __errno_location returns this thread's errno, a valid pointer for its life.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: a plain system call; PRIO_PROCESS with 0 names the calling thread.
    let v = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    // SAFETY: as above.
    let errno = unsafe { *libc::__errno_location() };
    if v == -1 && errno != 0 {
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    Ok(v)
}

/// Sets the calling thread's nice value (only this thread's: with PRIO_PROCESS, Linux takes
/// the thread id 0 as the calling thread, not the whole process).
pub fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: a plain system call on the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises RLIMIT_NICE so that a thread may come back up to nice `base` (the limit allows
/// nice values down to 20 minus it) if it does not already, as far as the process may: the
/// limit stays when the daemon drops root (`serve --user`), so its threads started later, as
/// that user, still come back up. Not above `base`: no thread can go above the daemon's own
/// priority.
/// Returns whether the limit (now) lets a thread come back up to `base` without privilege.
fn room_to_come_back(base: i32) -> bool {
    let want = (20 - base).clamp(1, 40) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } != 0 {
        return false;
    }
    if lim.rlim_cur >= want {
        return true;
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads one rlimit from `raised`, a live local; refused (no
    // CAP_SYS_RESOURCE for the hard limit) it changes nothing, and the probe then tells.
    if unsafe { libc::setrlimit(libc::RLIMIT_NICE, &raised) } != 0 {
        let soft = libc::rlimit {
            rlim_cur: want.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NICE, &soft) } != 0 {
            return false;
        }
        return soft.rlim_cur >= want;
    }
    true
}

/// Whether a thread at `base` can go to `control` and back to `base`: tried on a thread of
/// its own, which ends with the answer.
fn reversible(base: i32, control: i32) -> Result<(), String> {
    std::thread::Builder::new()
        .name("nice-probe".into())
        .spawn(move || {
            set_nice(base).map_err(|e| format!("cannot set nice {base}: {e}"))?;
            set_nice(control).map_err(|e| format!("cannot lower to nice {control}: {e}"))?;
            set_nice(base).map_err(|e| format!("cannot come back to nice {base}: {e}"))?;
            match current_nice() {
                Ok(n) if n == base => Ok(()),
                Ok(n) => Err(format!("came back to nice {n}, not {base}")),
                Err(e) => Err(format!("cannot read the nice value: {e}")),
            }
        })
        .map_err(|e| format!("cannot start a thread to try it: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the thread trying it panicked".into()))
}

/// Sets the levels for this process (once; the first call wins) from the calling thread's
/// nice value and `control_nice` (0: every thread at the daemon's priority). `drops_root`: the
/// daemon will run as another user (`serve --user`), losing CAP_SYS_NICE; its threads then
/// come back up only within RLIMIT_NICE, so without enough of it none is lowered. Returns
/// the levels in force, `None` if every thread stays at the daemon's priority.
pub fn configure(control_nice: i32, drops_root: bool) -> Option<Levels> {
    *LEVELS.get_or_init(|| {
        if control_nice <= 0 {
            info!("priority: control threads at the daemon's priority (--control-nice 0)");
            return None;
        }
        let base = match current_nice() {
            Ok(n) => n,
            Err(e) => {
                warn!("priority: cannot read the daemon's nice value ({e}): every thread stays at it");
                return None;
            }
        };
        let control = (base + control_nice).min(19);
        let room = room_to_come_back(base);
        if drops_root && !room {
            warn!(
                "priority: control threads stay at the daemon's priority (nice {base}): once \
                 it runs as another user (--user), a thread lowered could not come back up \
                 (RLIMIT_NICE below {} and it cannot be raised); give it room (systemd: \
                 LimitNICE=, or `ulimit -e` before starting it)",
                20 - base
            );
            return None;
        }
        if control == base {
            info!("priority: the daemon runs at nice {base}, the lowest: control threads cannot go lower");
            return None;
        }
        match reversible(base, control) {
            Ok(()) => {
                info!(
                    "priority: control threads at nice {control}, guest-serving threads at nice {base}"
                );
                Some(Levels { base, control })
            }
            Err(why) => {
                warn!(
                    "priority: control threads stay at the daemon's priority (nice {base}): a \
                     thread started by one could not get back to it ({why}); give the daemon \
                     RLIMIT_NICE room (systemd: LimitNICE=) or CAP_SYS_NICE"
                );
                None
            }
        }
    })
}

/// The levels [`configure`] set, if control threads run lower.
pub fn levels() -> Option<Levels> {
    LEVELS.get().copied().flatten()
}

/// The nice value a thread of `kind` runs at under `levels`.
pub fn nice_of(kind: ThreadKind, levels: Levels) -> i32 {
    match kind {
        ThreadKind::Control | ThreadKind::Metrics => levels.control,
        ThreadKind::Worker | ThreadKind::Engine | ThreadKind::Background | ThreadKind::Serve => {
            levels.base
        }
    }
}

thread_local! {
    static SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The calling thread starts doing `kind`'s work: sets its nice value to its kind's, once per
/// thread like its seccomp filter (a queue worker enters on every kick: no system call after
/// its first); nothing unless [`configure`] set levels.
pub fn entered(kind: ThreadKind) {
    let Some(levels) = levels() else {
        return;
    };
    if SET.with(|s| s.replace(true)) {
        return;
    }
    let nice = nice_of(kind, levels);
    if let Err(e) = set_nice(nice) {
        // configure checked the way back up; a failure here means the limits changed since.
        warn!("priority: cannot set this {kind:?} thread's nice value to {nice}: {e}");
    }
}
