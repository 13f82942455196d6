//! The serve loop: accept one guest at a time on a Unix socket, serve it until it disconnects,
//! then wait for the next one; stop cleanly when asked.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{BlkDevice, DeviceConfig};
use crate::disk::Disk;
use dovetail_layout::error_chain;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum ListenOn {
    /// Bind a new socket at this path (replacing a stale socket file).
    Path(PathBuf),
    /// An already-listening Unix socket inherited from the parent process.
    Fd(RawFd),
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("another process is already serving on {0}")]
    InUse(PathBuf),
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: VhostUserError,
    },
    #[error("file descriptor {fd} is not a listening Unix socket")]
    BadFd {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the shutdown event")]
    Event(#[source] std::io::Error),
    #[error("waiting for a connection failed")]
    Poll(#[source] std::io::Error),
    /// (The vhost-user library's error type does not implement `std::error::Error`.)
    #[error("cannot start serving a guest: {0}")]
    Daemon(String),
    #[error("flushing the disk at shutdown failed")]
    Flush(#[source] dovetail_layout::Error),
}

/// Opens the listening socket; a socket bound at a path gets mode 0600 (the daemon's user
/// only).
pub fn listen(on: &ListenOn) -> Result<Listener, ServeError> {
    listen_with(on, &SocketPerms::default())
}

/// Who may connect to a disk socket bound at a path (`serve --socket-mode/--socket-group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permissions of the socket file (connecting needs write permission).
    pub mode: u32,
    /// The socket file's group, if not the daemon's.
    pub group: Option<crate::access::Group>,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms {
            mode: 0o600,
            group: None,
        }
    }
}

/// [`listen`] with the socket file's permissions and group: it has them from the instant it
/// exists (`access::bind_socket`). Such a socket file is not removed when the listener is
/// dropped: [`remove_socket`] does that.
pub fn listen_with(on: &ListenOn, perms: &SocketPerms) -> Result<Listener, ServeError> {
    match on {
        ListenOn::Path(path) => listen_path(path, perms),
        ListenOn::Fd(fd) => listen_fd(*fd),
    }
}

/// While set, [`remove_socket`] leaves socket files in place: their listening sockets are being
/// handed to a new daemon (`dovetail ctl upgrade`), which keeps serving on them.
static KEEP_SOCKET_FILES: AtomicBool = AtomicBool::new(false);

/// Keeps (true) or again removes (false) socket files at shutdown: see [`KEEP_SOCKET_FILES`].
pub fn keep_socket_files(keep: bool) {
    KEEP_SOCKET_FILES.store(keep, Ordering::SeqCst);
}

/// Removes the socket file at `path` if it still is a socket (at shutdown), unless its socket
/// is being handed over ([`keep_socket_files`]).
pub fn remove_socket(path: &Path) {
    if KEEP_SOCKET_FILES.load(Ordering::SeqCst) {
        return;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

fn listen_path(path: &Path, perms: &SocketPerms) -> Result<Listener, ServeError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        info!("replacing stale socket {}", path.display());
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |e| ServeError::Bind {
        path: path.to_path_buf(),
        source: VhostUserError::SocketError(e),
    };
    let listener =
        crate::access::bind_socket(path, perms.mode, perms.group.as_ref()).map_err(bind_err)?;
    Ok(Listener::from(listener))
}

/// An integer socket option of `fd` (SOL_SOCKET level).
pub(crate) fn socket_option(fd: RawFd, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is a live c_int; an
    // invalid fd only makes it return an error.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn listen_fd(fd: RawFd) -> Result<Listener, ServeError> {
    let bad = |source| ServeError::BadFd { fd, source };
    let invalid = |what| bad(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    if socket_option(fd, libc::SO_ACCEPTCONN).map_err(bad)? == 0 {
        return Err(invalid("socket is not listening"));
    }
    if socket_option(fd, libc::SO_DOMAIN).map_err(bad)? != libc::AF_UNIX {
        return Err(invalid("socket is not a Unix socket"));
    }
    // SAFETY: the fd is a listening Unix socket (checked above) handed to this process by its
    // parent for it to own; nothing else in the process uses it.
    let listener = unsafe { Listener::from_raw_fd(fd) };
    // SAFETY: fcntl with F_SETFD only changes the fd's flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

/// Asks a running [`serve`] loop to stop: from a signal thread, a test, or a control command.
pub struct Shutdown {
    requested: AtomicBool,
    event: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
    /// The guest's connection is to be kept open and handed over (`crate::handoff`).
    handing_off: AtomicBool,
    /// The connection the serve loop exported for a handover.
    exported: Mutex<Option<vhost_user_backend::ExportedConnection>>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("requested", &self.is_requested())
            .finish_non_exhaustive()
    }
}

impl Shutdown {
    pub fn new() -> Result<Arc<Shutdown>, ServeError> {
        Ok(Arc::new(Shutdown {
            requested: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK).map_err(ServeError::Event)?,
            connection: Mutex::new(None),
            handing_off: AtomicBool::new(false),
            exported: Mutex::new(None),
        }))
    }

    /// Stops accepting guests and disconnects the current one, if any. In-flight requests still
    /// complete: the queue workers finish their batch before they exit.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        if let Some(h) = self.lock().as_ref() {
            h.shutdown();
        }
    }

    /// Stops accepting guests, and pauses the current guest's connection without closing it:
    /// the serve loop exports it ([`Shutdown::take_exported`]) and ends (`crate::handoff`).
    pub fn hand_off(&self) {
        self.handing_off.store(true, Ordering::SeqCst);
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        if let Some(h) = self.lock().as_ref() {
            h.pause();
        }
    }

    /// The connection the serve loop exported after [`Shutdown::hand_off`], if a guest was
    /// connected (call once the serve loop returned).
    pub fn take_exported(&self) -> Option<vhost_user_backend::ExportedConnection> {
        self.exported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for a shutdown request; true once one was made.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        if self.is_requested() {
            return true;
        }
        let mut fds = [libc::pollfd {
            fd: self.event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a live array of one pollfd struct and its length is passed with it.
        // The event is not read, so it stays readable for every other waiter.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        self.is_requested()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Waits until the listener has a connection (true) or a shutdown was requested (false).
fn wait_for_guest(listener: &Listener, shutdown: &Shutdown) -> Result<bool, ServeError> {
    loop {
        if shutdown.is_requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shutdown.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs and its length is passed with it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ServeError::Poll(e));
        }
        if fds[1].revents != 0 || shutdown.is_requested() {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

/// Serves `disk` to one guest after another until `shutdown` is requested, then flushes it.
pub fn serve(
    disk: Arc<Disk>,
    config: DeviceConfig,
    listener: &mut Listener,
    shutdown: &Shutdown,
) -> Result<(), ServeError> {
    // Logs name the disk by its serial.
    let serial = disk.serial();
    let len = serial.iter().position(|&b| b == 0).unwrap_or(serial.len());
    let name = String::from_utf8_lossy(&serial[..len]).into_owned();
    serve_observed(&name, disk, config, listener, shutdown, &|_| {}, &|| {})
}

/// How long after logging a refused connection the next one is logged again (a frontend
/// that reconnects every second must not flood the log); the count is kept meanwhile.
pub const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a new connection waits, while a guest is connected, for that guest to turn out to
/// have left (its close not yet seen) before it is refused.
pub const REFUSAL_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// While a guest is connected, accepts every other connection on `listener` and closes it at
/// once (a disk serves one guest at a time: the second frontend gets an immediate error
/// instead of waiting silently for the first to leave), until `stop` is signalled.
fn refuse_while_connected(
    name: &str,
    guest: u64,
    listener: &Listener,
    stop: &EventFd,
    on_refused: &(dyn Fn() + Sync),
) {
    let mut refused = 0u64;
    let mut unlogged = 0u64;
    let mut last_log: Option<std::time::Instant> = None;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs and its length is passed with it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn!("disk {name}: cannot watch the socket for other frontends: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // A frontend that just closed its connection and reconnects at once (a restarted
        // QEMU, a test) must not be refused because the daemon has not seen the close yet:
        // give the connected guest a moment to turn out to be gone.
        let mut grace = [libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = libc::c_int::try_from(REFUSAL_GRACE.as_millis()).unwrap_or(1000);
        // SAFETY: `grace` is a live array of one pollfd struct and its length is passed.
        if unsafe { libc::poll(grace.as_mut_ptr(), 1, ms) } > 0 {
            // The guest left: the serve loop takes the new connection.
            return;
        }
        match listener.accept() {
            Ok(Some(stream)) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                drop(stream);
                refused += 1;
                unlogged += 1;
                on_refused();
                if last_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    warn!(
                        "disk {name}: refused a connection from another frontend ({unlogged} \
                         since the last such message, {refused} while guest {guest} is \
                         connected): guest {guest} is already connected and a disk serves one \
                         guest at a time; the connection was closed at once"
                    );
                    unlogged = 0;
                    last_log = Some(std::time::Instant::now());
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!("disk {name}: accepting (to refuse) another frontend failed: {e}");
                // Do not spin on a persistent error.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// [`serve`], calling `on_guest(true)` when a guest connects and `on_guest(false)` when it
/// has left (after its requests completed), and `on_refused()` for each connection refused
/// because a guest was connected already. `name` names the disk in logs.
pub fn serve_observed(
    name: &str,
    disk: Arc<Disk>,
    config: DeviceConfig,
    listener: &mut Listener,
    shutdown: &Shutdown,
    on_guest: &dyn Fn(bool),
    on_refused: &(dyn Fn() + Sync),
) -> Result<(), ServeError> {
    serve_adopting(
        name, disk, config, listener, shutdown, on_guest, on_refused, None,
    )
}

/// [`serve_observed`], serving first the connection `adopt` another serve loop (of this
/// process or the one it took over from) exported, without waiting for a guest
/// (`crate::handoff`).
#[allow(clippy::too_many_arguments)]
pub fn serve_adopting(
    name: &str,
    disk: Arc<Disk>,
    config: DeviceConfig,
    listener: &mut Listener,
    shutdown: &Shutdown,
    on_guest: &dyn Fn(bool),
    on_refused: &(dyn Fn() + Sync),
    mut adopt: Option<vhost_user_backend::ExportedConnection>,
) -> Result<(), ServeError> {
    let mut guests = 0u64;
    let who = disk.name().to_string();
    // Busy while a guest's connection is set up and torn down (not while it waits for one or
    // serves one): a serve loop wedged there stops the systemd watchdog's pings.
    let beat = crate::heartbeat::register(format!("disk {name} serve loop"));
    loop {
        let adopted = adopt.take();
        if adopted.is_none() && !wait_for_guest(listener, shutdown)? {
            break;
        }
        let setup = beat.busy();
        guests += 1;
        let device = BlkDevice::new(disk.clone(), config);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("dovetail".into(), device.clone(), mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let was_adopted = adopted.is_some();
        let paused_for = adopted.as_ref().and_then(crate::handoff::paused_for);
        let started = match adopted {
            Some(c) => daemon.start_adopted(c),
            None => daemon.start(listener),
        };
        if let Err(e) = started {
            warn!("{who}: guest {guests}: connection failed before it started: {e}");
            drop(daemon);
            device.release_exit_events();
            continue;
        }
        if was_adopted {
            let pause = match paused_for {
                Some(d) => format!("; its queues stood still {:.1} ms", d.as_secs_f64() * 1e3),
                None => String::new(),
            };
            info!(
                "{who}: guest {guests} connected (its connection handed over, not reconnected{pause})"
            );
        } else {
            info!("{who}: guest {guests} connected");
        }
        on_guest(true);
        *shutdown.lock() = daemon.shutdown_handle();
        if shutdown.handing_off.load(Ordering::SeqCst) {
            if let Some(h) = daemon.shutdown_handle() {
                h.pause();
            }
        } else if shutdown.is_requested() {
            // The request raced with the connection: make sure this guest is disconnected too.
            daemon.request_shutdown();
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ServeError::Event)?;
        drop(setup);
        let shared: &Listener = listener;
        let waited = std::thread::scope(|scope| {
            let refuser = std::thread::Builder::new()
                .name(format!("refuse-{name}"))
                .spawn_scoped(scope, || {
                    refuse_while_connected(name, guests, shared, &stop, on_refused)
                });
            if let Err(e) = &refuser {
                warn!("disk {name}: cannot start refusing other frontends: {e}");
            }
            let r = daemon.wait();
            let _ = stop.write(1);
            r
        });
        let _teardown = beat.busy();
        if daemon.is_paused() {
            *shutdown.lock() = None;
            match crate::handoff::export(&who, guests, &mut daemon) {
                Some(c) => {
                    *shutdown.exported.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
                    disk.set_frontend(None);
                    daemon.hand_off();
                    device.release_exit_events();
                    on_guest(false);
                    continue;
                }
                None => {
                    // Not handed over: the guest is disconnected (it reconnects).
                    daemon.request_shutdown();
                    let _ = daemon.wait();
                }
            }
        }
        match waited {
            Ok(()) => info!("{who}: guest {guests} disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("{who}: guest {guests} disconnected"),
            Err(e) => warn!("{who}: guest {guests} dropped after a protocol error: {e}"),
        }
        *shutdown.lock() = None;
        // The guest's backend request channel went with it.
        disk.set_frontend(None);
        // Dropping the daemon joins the queue workers, which finish their requests first.
        drop(daemon);
        device.release_exit_events();
        on_guest(false);
        if let Err(e) = disk.layout().flush() {
            warn!(
                "{who}: flush after guest {guests} left failed: {}",
                error_chain(&e)
            );
        }
        debug!("ready for the next guest");
    }
    info!("{who}: shutting down: flushing the disk");
    disk.layout().flush().map_err(ServeError::Flush)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::IntoRawFd;
    use std::os::unix::net::UnixListener;

    use super::*;

    /// The error of a listen that must fail (a `Listener` has no `Debug`, so no `expect_err`).
    fn refused(r: Result<Listener, ServeError>, why: &str) -> ServeError {
        match r {
            Ok(_) => panic!("listen succeeded but must fail: {why}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        // A socket file nobody listens on any more (std does not unlink on drop).
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let listener = listen(&ListenOn::Path(path.clone())).expect("replace stale socket");
        UnixStream::connect(&path).expect("the new socket accepts connections");
        drop(listener);
        remove_socket(&path);
        assert!(!path.exists(), "the socket is removed at shutdown");
    }

    #[test]
    fn a_socket_has_its_mode_from_the_start() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let _l = listen(&ListenOn::Path(path.clone())).expect("listen");
        let mode = std::fs::symlink_metadata(&path).expect("lstat").mode();
        assert_eq!(
            mode & 0o7777,
            0o600,
            "the default is the daemon's user only"
        );
        let other = dir.path().join("t.sock");
        let perms = SocketPerms {
            mode: 0o660,
            group: None,
        };
        let _m = listen_with(&ListenOn::Path(other.clone()), &perms).expect("listen");
        let mode = std::fs::symlink_metadata(&other).expect("lstat").mode();
        assert_eq!(mode & 0o7777, 0o660);
    }

    #[test]
    fn a_live_socket_is_not_stolen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let _other = UnixListener::bind(&path).expect("bind");
        let err = refused(listen(&ListenOn::Path(path.clone())), "in use");
        assert!(matches!(err, ServeError::InUse(_)), "{err}");
        assert!(path.exists());
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("precious");
        std::fs::write(&path, b"data").expect("write");
        let err = refused(listen(&ListenOn::Path(path.clone())), "not a socket");
        assert!(matches!(err, ServeError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), b"data");
    }

    #[test]
    fn socket_fd_must_be_a_listening_unix_socket() {
        let file = tempfile::tempfile().expect("tempfile");
        let err = refused(
            listen(&ListenOn::Fd(file.as_raw_fd())),
            "a file is not a socket",
        );
        assert!(matches!(err, ServeError::BadFd { .. }), "{err}");
        let err = refused(listen(&ListenOn::Fd(987_654)), "closed fd");
        assert!(matches!(err, ServeError::BadFd { .. }), "{err}");
        let (a, _b) = UnixStream::pair().expect("pair");
        let err = refused(
            listen(&ListenOn::Fd(a.as_raw_fd())),
            "connected, not listening",
        );
        assert!(matches!(err, ServeError::BadFd { .. }), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inherited.sock");
        let fd = UnixListener::bind(&path).expect("bind").into_raw_fd();
        let _listener = listen(&ListenOn::Fd(fd)).expect("inherited listening socket");
        UnixStream::connect(&path).expect("connect through the inherited socket");
    }
}
