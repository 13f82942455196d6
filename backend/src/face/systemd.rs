//! systemd integration, written against the documented protocols (no libsystemd):
//!
//! * socket activation (sd_listen_fds(3)): `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`
//!   hand the daemon listening sockets from fd 3 on; the one named `control` (or bound at the
//!   `--control` path) is the control socket, one named after a disk (or bound at its socket
//!   path) is that disk's socket. Each must be a listening Unix stream socket.
//! * readiness and status (sd_notify(3)): datagrams to `$NOTIFY_SOCKET` (a path, or `@name` in
//!   the abstract namespace): `READY=1` once every disk listens, `STATUS=...`, `RELOADING=1`
//!   with `MONOTONIC_USEC=` while SIGHUP's reload runs, `STOPPING=1` at shutdown.
//! * the watchdog (`WATCHDOG_USEC`, `WATCHDOG_PID`): `WATCHDOG=1` every half interval, but only
//!   while every queue worker and serve loop shows progress ([`crate::heartbeat`]): one
//!   busy for longer than half the interval stops the pings, so systemd restarts the daemon.

use std::os::unix::io::RawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, error, info, warn};

use crate::heartbeat;
use crate::server::Shutdown;

/// The first fd systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// A listening socket inherited through socket activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivatedSocket {
    pub fd: RawFd,
    /// Its `LISTEN_FDNAMES` entry (`unknown` when the unit names none).
    pub name: String,
    /// The path it is bound to, if any (for matching and the log).
    pub path: Option<PathBuf>,
}

/// The sockets passed by systemd, not yet taken by a disk or the control socket.
#[derive(Debug, Default)]
pub struct Activated {
    sockets: Vec<ActivatedSocket>,
}

impl Activated {
    /// Reads `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` (and unsets them, so no child process
    /// takes the sockets for its own). Nothing is passed if `LISTEN_PID` is not this process.
    /// An fd that is not a listening Unix stream socket is an error naming it.
    pub fn from_env() -> Result<Activated, String> {
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        let (Some(pid), Some(fds)) = (pid, fds) else {
            return Ok(Activated::default());
        };
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            debug!("LISTEN_PID={pid} is not this process: the sockets are not for it");
            return Ok(Activated::default());
        }
        let n: RawFd = fds
            .trim()
            .parse()
            .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number of sockets"))?;
        let names: Vec<String> = names
            .map(|n| n.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let mut sockets = Vec::new();
        for i in 0..n.max(0) {
            let fd = LISTEN_FDS_START + i;
            let name = names
                .get(i as usize)
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| "unknown".to_string());
            check_listening_unix_stream(fd)
                .map_err(|why| format!("socket activation: fd {fd} ({name}): {why}"))?;
            // SAFETY: fcntl with F_SETFD only changes the flags of an fd we were handed.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let path = bound_path(fd);
            info!(
                "socket activation: fd {fd} named {name:?}{}",
                path.as_ref()
                    .map_or(String::new(), |p| format!(" on {}", p.display()))
            );
            sockets.push(ActivatedSocket { fd, name, path });
        }
        Ok(Activated { sockets })
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Takes the socket named `name`, or else the one bound at `path`.
    pub fn take(&mut self, name: &str, path: Option<&Path>) -> Option<ActivatedSocket> {
        let at = self
            .sockets
            .iter()
            .position(|s| s.name == name)
            .or_else(|| {
                let path = path?;
                let want = canonical_socket_path(path);
                self.sockets.iter().position(|s| {
                    s.path.as_deref().map(canonical_socket_path) == Some(want.clone())
                })
            })?;
        Some(self.sockets.remove(at))
    }

    /// The sockets left (named after no disk, not the control socket).
    pub fn rest(&mut self) -> Vec<ActivatedSocket> {
        std::mem::take(&mut self.sockets)
    }
}

/// `path` with its directory resolved, to compare two spellings of a socket path.
fn canonical_socket_path(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => path.to_path_buf(),
    }
}

/// Whether `fd` is a listening Unix stream socket, and why not.
fn check_listening_unix_stream(fd: RawFd) -> Result<(), String> {
    let domain = crate::server::socket_option(fd, libc::SO_DOMAIN)
        .map_err(|e| format!("not a socket ({e})"))?;
    if domain != libc::AF_UNIX {
        return Err(format!("not a Unix socket (domain {domain})"));
    }
    if crate::server::socket_option(fd, libc::SO_TYPE).map_err(|e| e.to_string())?
        != libc::SOCK_STREAM
    {
        return Err("not a stream socket (ListenStream= is needed)".into());
    }
    if crate::server::socket_option(fd, libc::SO_ACCEPTCONN).map_err(|e| e.to_string())? == 0 {
        return Err("not listening".into());
    }
    Ok(())
}

/// The path a Unix socket is bound to (`None`: unnamed or abstract).
fn bound_path(fd: RawFd) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, which is that large.
    let rc =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    let offset = std::mem::size_of::<libc::sa_family_t>();
    let n = (len as usize)
        .saturating_sub(offset)
        .min(addr.sun_path.len());
    let bytes: Vec<u8> = addr.sun_path[..n].iter().map(|&c| c as u8).collect();
    if bytes.first().is_none_or(|&b| b == 0) {
        return None;
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes[..end])))
}

/// The `$NOTIFY_SOCKET` of the service manager, if the daemon runs under one.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    shown: String,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (unset afterwards, so children do not talk to the manager as if
    /// they were the service). `None` without one or when it cannot be used (logged).
    pub fn from_env() -> Option<Arc<Notifier>> {
        use std::os::linux::net::SocketAddrExt;
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        std::env::remove_var("NOTIFY_SOCKET");
        let shown = path.to_string_lossy().into_owned();
        let addr = match shown.strip_prefix('@') {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
            None if shown.starts_with('/') => std::os::unix::net::SocketAddr::from_pathname(&path),
            None => {
                warn!("NOTIFY_SOCKET={shown:?} is neither a path nor @abstract: not notifying");
                return None;
            }
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                warn!("NOTIFY_SOCKET={shown:?}: {e}: not notifying");
                return None;
            }
        };
        match UnixDatagram::unbound() {
            Ok(socket) => Some(Arc::new(Notifier {
                socket,
                addr,
                shown,
            })),
            Err(e) => {
                warn!("cannot make a socket to notify {shown}: {e}");
                None
            }
        }
    }

    /// Sends one notification (`KEY=VALUE` lines); a failure is logged, never fatal.
    /// `$NOTIFY_SOCKET` as it was given (a path, or `@name`).
    pub fn address(&self) -> &str {
        &self.shown
    }

    pub fn notify(&self, state: &str) {
        debug!("sd_notify: {}", state.replace('\n', " "));
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            warn!("cannot notify the service manager at {}: {e}", self.shown);
        }
    }
}

/// Notifies if there is a service manager.
pub fn notify(notifier: &Option<Arc<Notifier>>, state: &str) {
    if let Some(n) = notifier {
        n.notify(state);
    }
}

/// `CLOCK_MONOTONIC` in microseconds (for `RELOADING=1`'s `MONOTONIC_USEC=`).
pub fn monotonic_usec() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a live timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, if `WATCHDOG_PID` is unset or
/// this process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(0) | Err(_) => {
            warn!("WATCHDOG_USEC={usec:?} is not a positive number of microseconds: no watchdog");
            None
        }
        Ok(us) => Some(Duration::from_micros(us)),
    }
}

/// Starts the watchdog thread: every `interval / 2`, `WATCHDOG=1` if no heartbeat has been
/// busy for longer than `interval / 2`; otherwise no ping (and a log line and a status naming
/// the stuck threads) until they move again. Stops with `shutdown`.
pub fn start_watchdog(
    notifier: Arc<Notifier>,
    interval: Duration,
    shutdown: Arc<Shutdown>,
) -> std::io::Result<()> {
    let period = interval / 2;
    info!(
        "watchdog: pinging systemd every {} ms while every queue worker and serve loop makes \
         progress (one busy for over {} ms stops the pings)",
        period.as_millis(),
        period.as_millis()
    );
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Control);
            let mut stuck_before = false;
            loop {
                let stuck = heartbeat::stuck(period);
                if stuck.is_empty() {
                    if stuck_before {
                        info!("watchdog: every thread makes progress again; pinging again");
                        notifier.notify("STATUS=serving");
                        stuck_before = false;
                    }
                    notifier.notify("WATCHDOG=1");
                } else if !stuck_before {
                    let list = stuck
                        .iter()
                        .map(|(n, d)| format!("{n} (busy {} ms)", d.as_millis()))
                        .collect::<Vec<_>>()
                        .join(", ");
                    error!("watchdog: stuck: {list}; not pinging systemd until they move");
                    notifier.notify(&format!("STATUS=stuck: {list}"));
                    stuck_before = true;
                }
                if shutdown.wait(period) {
                    return;
                }
            }
        })
        .map(|_| ())
}
