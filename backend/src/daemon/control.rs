//! The control socket: newline-delimited JSON requests and replies, and a followable event
//! stream, on a Unix socket (`dovetail serve --control PATH`, mode 0600 unless told otherwise).
//! The schema is docs/control.md (protocol version [`PROTOCOL`]).
//!
//! Robustness: each connection has its own thread, at most [`MAX_CONNECTIONS`] at a time (the
//! next one gets a `busy` error and is closed, and the connection that has waited longest for a
//! request, if any, is closed with an `evicted` error, so that idle or half-sent connections
//! cannot lock the control plane out: a client that retries gets in); a line longer than
//! [`MAX_LINE`] gets a `too-long` error and the connection is closed; a connection idle for
//! [`IDLE_TIMEOUT`] is closed; a reader that stops reading is dropped after [`WRITE_TIMEOUT`].
//! Malformed, unknown or ill-typed requests get an error reply and change nothing. None of this
//! touches the data path: commands that change a disk pause only that disk, for the swap alone
//! (see `live`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::{json, Value};

use dovetail_annotations::Table;
use dovetail_layout::parallax::{Label, Parallax};

use crate::daemon::live::LiveDisk;
use crate::daemon::proto::{
    self, AnnotationsArgs, CommandError, ErrorCode, NoArgs, Reply, Request, TaintArgs, TiersArgs,
};
pub use crate::daemon::proto::{COMMANDS, PROTOCOL, RESERVED};
use crate::daemon::served::Daemon;
pub use crate::daemon::tiers::tiers_result;
use crate::daemon::tiers::TierChange;

/// The longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Control connections served at once.
pub const MAX_CONNECTIONS: u64 = 64;
/// A connection that sends nothing for this long is closed (followers of the event stream
/// excepted).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not read its replies or events for this long is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default mode of the control socket: the daemon's user only.
pub const DEFAULT_MODE: u32 = 0o600;
/// Connections following events at once (`events` with `follow`): the next one gets `busy`,
/// so followers can never take every connection.
pub const MAX_FOLLOWERS: u64 = 16;

/// Most regions `annotations` returns for `top`.
pub const MAX_TOP: u64 = 10_000;
/// Most buckets of an `annotations` histogram.
pub const MAX_HISTOGRAM: u64 = 4096;
/// Most block ranges of a label one `annotations` reply lists (`ranges_total` counts them all).
pub const MAX_RANGES: usize = 65_536;

/// Errors starting the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("another process is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot listen on control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the control thread")]
    Thread(#[source] std::io::Error),
}

/// The running control socket; dropping it (or [`ControlServer::stop`]) stops accepting and
/// removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// The listening socket (a duplicate of the accept loop's), to wake the loop.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    /// Wakes the accept loop to stop (an eventfd): the listening socket itself is left as it
    /// is, so it can be handed to a new daemon (`dovetail ctl upgrade`) still listening.
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    /// Whether the socket file is ours to remove (not one inherited from systemd).
    remove_file: bool,
    /// Closed until [`ControlServer::open`]: the socket listens from the start (clients
    /// connect and wait in its backlog) but nothing is accepted until the daemon can carry
    /// out every command (its disks served, its launcher installed).
    gate: Arc<Gate>,
}

/// A latch the accept loop waits on before its first accept.
#[derive(Debug, Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    cond: std::sync::Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }

    /// Waits until opened or `stop` is set; false when stopped.
    fn wait(&self, stop: &AtomicBool) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            open = self
                .cond
                .wait_timeout(open, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl ControlServer {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stop(mut self) {
        self.shut();
    }

    /// Starts accepting: called once the daemon can carry out every command. Clients that
    /// connected before waited in the socket's backlog, so none is refused for being early.
    pub fn open(&self) {
        self.gate.open();
    }

    /// The listening socket (a duplicate of the accept loop's), to hand it to a new daemon.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Whether the socket file is removed when the server stops (not while it is handed over,
    /// and once a handed-over socket is this process's own).
    pub fn set_remove_file(&mut self, remove: bool) {
        self.remove_file = remove;
    }

    fn shut(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept loop, which polls this eventfd beside the listening socket.
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd this server owns.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        self.gate.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.remove_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Binds the control socket at `path` with permissions `mode` and serves it on a thread.
pub fn start(path: &Path, mode: u32, daemon: Arc<Daemon>) -> Result<ControlServer, ControlError> {
    let server = start_held(path, mode, daemon)?;
    server.open();
    Ok(server)
}

/// [`start`], but nothing is accepted until [`ControlServer::open`]: the daemon binds its
/// control socket early (before it drops root) and opens it once it can carry out every
/// command, so a client that connects during the start waits instead of being refused.
pub fn start_held(
    path: &Path,
    mode: u32,
    daemon: Arc<Daemon>,
) -> Result<ControlServer, ControlError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        info!("replacing stale control socket {}", path.display());
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // The socket file has its mode (and group) from the instant it exists: nothing is
    // changed by path after bind, so no window and no symlink swapped in gets the mode.
    let group = daemon.security.control.group.clone();
    let listener = crate::access::bind_socket(path, mode, group.as_ref()).map_err(bind_err)?;
    let how = format!(
        "mode {mode:04o}{}",
        group.map_or(String::new(), |g| format!(", group {} ({})", g.name, g.gid))
    );
    serve_on(listener, path, daemon, &how, true)
}

/// Serves the control socket on `listener`, a listening socket inherited from systemd (socket
/// activation) and bound at `path` (shown in logs). Its file is left in place at shutdown:
/// the socket unit owns it. Held like [`start_held`] until [`ControlServer::open`].
pub fn start_inherited(
    listener: UnixListener,
    path: &Path,
    daemon: Arc<Daemon>,
) -> Result<ControlServer, ControlError> {
    let how = "inherited from systemd or the daemon this one replaced";
    serve_on(listener, path, daemon, how, false)
}

/// Starts the control thread's accept loop on `listener` (bound at `path`, described by
/// `how` in the log); `remove_file` says whether the socket's file goes at shutdown.
fn serve_on(
    listener: UnixListener,
    path: &Path,
    daemon: Arc<Daemon>,
    how: &str,
    remove_file: bool,
) -> Result<ControlServer, ControlError> {
    let wake_listener = listener.try_clone().map_err(ControlError::Thread)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let wake = Arc::new(wake_event().map_err(ControlError::Thread)?);
    let wake2 = wake.clone();
    let gate = Arc::new(Gate::default());
    let gate2 = gate.clone();
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Control);
            if gate2.wait(&stop2) {
                accept_loop(listener, daemon, stop2, &wake2)
            }
        })
        .map_err(ControlError::Thread)?;
    info!(
        "control socket on {} ({how}, protocol {PROTOCOL})",
        path.display()
    );
    Ok(ControlServer {
        path: path.to_path_buf(),
        listener: wake_listener,
        stop,
        wake,
        thread: Some(thread),
        remove_file,
        gate,
    })
}

/// What a connection's thread is doing, for eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Waiting for (the rest of) a request line since this instant: may be evicted.
    Waiting(Instant),
    /// Carrying out a request or writing its reply.
    Busy,
    /// Streaming events to a follower.
    Following,
    /// Closed by [`Conns::evict_longest_waiting`]; the thread is on its way out.
    Evicted,
}

#[derive(Debug)]
struct Slot {
    /// The connection's socket. Valid while the slot exists: the thread removes its slot before
    /// it closes the socket (see [`SlotGuard`]).
    fd: RawFd,
    state: ConnState,
}

/// The connections being served, so the accept loop can close the one waiting longest.
#[derive(Debug, Default)]
struct Conns {
    next: u64,
    slots: HashMap<u64, Slot>,
}

type SharedConns = Arc<Mutex<Conns>>;

fn lock_conns(conns: &Mutex<Conns>) -> MutexGuard<'_, Conns> {
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conns {
    /// Closes the connection that has waited longest for a request, telling it why; returns
    /// whether there was one. Connections carrying out a request or following events are
    /// never closed.
    fn evict_longest_waiting(&mut self) -> bool {
        let oldest = self
            .slots
            .iter_mut()
            .filter_map(|(_, slot)| match slot.state {
                ConnState::Waiting(since) => Some((since, slot)),
                _ => None,
            })
            .min_by_key(|(since, _)| *since);
        let Some((since, slot)) = oldest else {
            return false;
        };
        slot.state = ConnState::Evicted;
        let reply = error_reply(
            Value::Null,
            &CommandError::new(
                ErrorCode::Evicted,
                format!(
                    "closed after waiting {} s for a request: {MAX_CONNECTIONS} control \
                     connections were open and another client needed one",
                    since.elapsed().as_secs()
                ),
            ),
        );
        // SAFETY: `slot.fd` is the socket of a live connection (its thread removes the slot,
        // under this lock, before closing it); send with MSG_DONTWAIT never blocks, and
        // shutdown only ends the connection, which makes the thread's read return.
        unsafe {
            libc::send(
                slot.fd,
                reply.as_ptr().cast(),
                reply.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            libc::shutdown(slot.fd, libc::SHUT_RDWR);
        }
        true
    }
}

/// A connection's registration in [`Conns`]; dropping it removes the slot. Declared after the
/// connection's sockets, so it is dropped (and the slot gone) before they are closed.
struct SlotGuard {
    conns: SharedConns,
    id: u64,
}

impl SlotGuard {
    fn new(conns: SharedConns, fd: RawFd, since: Instant) -> SlotGuard {
        let id = {
            let mut c = lock_conns(&conns);
            c.next += 1;
            let id = c.next;
            c.slots.insert(
                id,
                Slot {
                    fd,
                    state: ConnState::Waiting(since),
                },
            );
            id
        };
        SlotGuard { conns, id }
    }

    /// Moves the connection to `state`; false if it was evicted meanwhile (then it must stop).
    fn set(&self, state: ConnState) -> bool {
        let mut c = lock_conns(&self.conns);
        match c.slots.get_mut(&self.id) {
            Some(slot) if slot.state != ConnState::Evicted => {
                slot.state = state;
                true
            }
            _ => false,
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        lock_conns(&self.conns).slots.remove(&self.id);
    }
}

/// A non-blocking eventfd.
fn wake_event() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments; a new fd is returned or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Waits until `listener` has a connection (true), or `wake` is signalled or the wait failed
/// (false: the caller checks whether it was told to stop, and otherwise waits again).
fn wait_for_connection(listener: &UnixListener, wake: &OwnedFd) -> bool {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs and its length is passed.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // The caller looks at its stop flag and comes back: only a stop ends the loop.
            warn!("control: waiting for a connection failed: {e}");
            std::thread::sleep(Duration::from_millis(10));
            return false;
        }
        if fds[1].revents != 0 {
            let mut count = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live 8-byte buffer from the eventfd this
            // server owns (non-blocking: an empty one returns EAGAIN).
            let n = unsafe { libc::read(wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            if n != 8 {
                // Not a wake-up the stop wrote (a broken eventfd): do not spin on it.
                std::thread::sleep(Duration::from_millis(10));
            }
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

fn accept_loop(listener: UnixListener, daemon: Arc<Daemon>, stop: Arc<AtomicBool>, wake: &OwnedFd) {
    let conns: SharedConns = Arc::default();
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if !wait_for_connection(&listener, wake) {
            // Woken (by a stop, looked at above) or a failed wait: never the end by itself,
            // or the control socket would stop answering while the daemon serves on.
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = listener.accept().map(|(s, _)| s);
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                warn!("control: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let accepted = Instant::now();
        let open = daemon.connections.fetch_add(1, Ordering::SeqCst) + 1;
        if open > MAX_CONNECTIONS {
            daemon.connections.fetch_sub(1, Ordering::SeqCst);
            // Make room for the next attempt: close the connection waiting longest.
            let evicted = lock_conns(&conns).evict_longest_waiting();
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let message = if evicted {
                format!(
                    "{MAX_CONNECTIONS} control connections are open already; the one idle \
                     longest was closed, so retry"
                )
            } else {
                format!("{MAX_CONNECTIONS} control connections are open already, all busy")
            };
            let reply = error_reply(Value::Null, &CommandError::new(ErrorCode::Busy, message));
            let _ = stream.write_all(reply.as_bytes());
            debug!(
                "control: refused a connection: {MAX_CONNECTIONS} open (evicted one: {evicted})"
            );
            continue;
        }
        let d = daemon.clone();
        let stop = stop.clone();
        let conns = conns.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Control);
                connection(stream, &d, &stop, conns, accepted);
                d.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            daemon.connections.fetch_sub(1, Ordering::SeqCst);
            warn!("control: cannot start a connection thread: {e}");
        }
    }
    // Connections waiting for their next request would wait out the idle timeout, holding the
    // daemon (and its store) meanwhile: end their reading side (a request being carried out
    // still gets its reply).
    for slot in lock_conns(&conns).slots.values() {
        // SAFETY: `slot.fd` is a live connection's socket (its thread removes the slot, under
        // this lock, before closing it); shutdown only ends its reading side.
        unsafe { libc::shutdown(slot.fd, libc::SHUT_RD) };
    }
    debug!("control: stopped accepting");
}

/// What a request asks the connection to do after the reply.
enum Then {
    Nothing,
    /// Stream events (after the reply, which carried the backlog).
    Follow(crate::daemon::live::Follower),
}

fn connection(
    stream: UnixStream,
    daemon: &Daemon,
    stop: &AtomicBool,
    conns: SharedConns,
    accepted: Instant,
) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let passed: Arc<Mutex<Vec<OwnedFd>>> = Arc::default();
    let mut reader = BufReader::new(FdReader {
        sock: read_half,
        fds: passed.clone(),
    });
    let mut out = stream;
    // After the sockets: dropped first, so the slot is gone before they are closed.
    let slot = SlotGuard::new(conns, out.as_raw_fd(), accepted);
    let mut line = Vec::new();
    // Being able to connect is not enough: the peer's user must be allowed (SO_PEERCRED).
    let allowed = crate::access::peer(out.as_raw_fd())
        .map_err(|e| format!("cannot tell who connected (SO_PEERCRED): {e}"))
        .and_then(|peer| daemon.security.control.check(&peer));
    if let Err(why) = allowed {
        daemon.request_errors.fetch_add(1, Ordering::Relaxed);
        warn!("control: refused a connection: {why}");
        // Answer the first request (briefly waited for, never carried out), so the client
        // reads why instead of a broken pipe.
        let _ = reader
            .get_ref()
            .sock
            .set_read_timeout(Some(Duration::from_secs(1)));
        let _ = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line);
        let id = serde_json::from_slice::<Value>(&line)
            .ok()
            .and_then(|mut v| v.get_mut("id").map(Value::take))
            .unwrap_or(Value::Null);
        let reply = error_reply(id, &CommandError::new(ErrorCode::Forbidden, why));
        let _ = out.write_all(reply.as_bytes());
        return;
    }
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(e) => {
                debug!("control: connection closed: {e}");
                return;
            }
        };
        if n == 0 {
            return;
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        if body.len() > MAX_LINE {
            daemon.request_errors.fetch_add(1, Ordering::Relaxed);
            let reply = error_reply(
                Value::Null,
                &CommandError::new(
                    ErrorCode::TooLong,
                    format!("a request line is at most {MAX_LINE} bytes; closing the connection"),
                ),
            );
            let _ = out.write_all(reply.as_bytes());
            warn!("control: a request longer than {MAX_LINE} bytes; connection closed");
            return;
        }
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if !slot.set(ConnState::Busy) {
            debug!("control: an evicted connection's request was not carried out");
            return;
        }
        let (reply, then) = handle_passing(daemon, body, &passed);
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
        if let Then::Follow(f) = then {
            slot.set(ConnState::Following);
            follow(&mut out, &f, stop);
            return;
        }
        slot.set(ConnState::Waiting(Instant::now()));
    }
}

/// The most file descriptors one read takes from a control connection; more are closed by
/// the kernel (a request passes at most one: `attach`'s listening socket).
const MAX_PASSED_FDS: usize = 4;

/// A control connection's reading side: reads with `recvmsg`, keeping the file descriptors
/// that come with the bytes (SCM_RIGHTS, close-on-exec) for the request being read.
struct FdReader {
    sock: UnixStream,
    fds: Arc<Mutex<Vec<OwnedFd>>>,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let space = {
            // SAFETY: CMSG_SPACE only computes a size.
            unsafe { libc::CMSG_SPACE((MAX_PASSED_FDS * std::mem::size_of::<RawFd>()) as u32) }
        } as usize;
        // u64 words, so the control buffer is aligned for cmsghdr.
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid value of the plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * 8;
        // SAFETY: `msg` points at `iov` (over `buf`, live and writable for its length) and at
        // `control` (live, `msg_controllen` bytes); both outlive the call.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut got = Vec::new();
        // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in, within
        // `msg_controllen`; each SCM_RIGHTS payload is an array of fds this process now owns.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        got.push(<OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if !got.is_empty() {
            self.fds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(got);
        }
        Ok(n as usize)
    }
}

/// Streams events to a follower until it goes away or the daemon stops.
fn follow(out: &mut UnixStream, f: &crate::daemon::live::Follower, stop: &AtomicBool) {
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match f.rx.recv_timeout(Duration::from_millis(500)) {
            Ok(ev) => {
                let line = proto::event_line(&ev);
                if out.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if peer_gone(out) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// True when the peer closed (or half-closed) the connection; checked without blocking.
fn peer_gone(s: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `fd` is one live pollfd for a socket this function borrows; timeout 0 never
    // blocks.
    let rc = unsafe { libc::poll(&mut fd, 1, 0) };
    rc < 0 || fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

fn error_reply(id: Value, e: &CommandError) -> String {
    Reply::error(id, e).line()
}

/// [`handle`] for the fuzz target `control_request` (`crate::fuzzing`): one request line in, the
/// reply line out (a follow request's stream is dropped).
#[doc(hidden)]
pub fn handle_line(daemon: &Daemon, line: &[u8]) -> String {
    handle(daemon, line).0
}

/// Parses and carries out one request line; returns the reply line.
fn handle(daemon: &Daemon, line: &[u8]) -> (String, Then) {
    handle_passing(daemon, line, &Mutex::default())
}

/// [`handle`] on a connection that may pass file descriptors: `passed` holds those that came
/// with the request line (SCM_RIGHTS). An `attach` with `"fd": true` takes the first; the
/// others, and any sent with another request, are closed.
fn handle_passing(daemon: &Daemon, line: &[u8], passed: &Mutex<Vec<OwnedFd>>) -> (String, Then) {
    daemon.requests.fetch_add(1, Ordering::Relaxed);
    let (id, request) = proto::parse_request(line);
    let mut fds = std::mem::take(&mut *passed.lock().unwrap_or_else(|p| p.into_inner()));
    let r = request.and_then(|request| {
        let cmd = request.name();
        // A panic carrying out a request is its error reply and an event, never the end of
        // the connection's thread or the daemon.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dovetail_store::failpoint::hit("control-request");
            match request {
                Request::Attach(a) if a.fd => {
                    let fd = (!fds.is_empty()).then(|| fds.remove(0));
                    daemon.attach_disk(&a, fd).map(|v| (v, Then::Nothing))
                }
                request => run(daemon, request),
            }
        }))
        .unwrap_or_else(|p| {
            let cause = dovetail_layout::panic_message(&*p);
            log::error!("control: {cmd} panicked: {cause}");
            daemon.events.publish(
                "",
                "control-panicked",
                "daemon",
                format!("control request {cmd} panicked: {cause}"),
                None,
                None,
            );
            Err(CommandError::new(
                ErrorCode::Failed,
                format!("{cmd} panicked: {cause} (a bug; the daemon carries on)"),
            ))
        });
        if !fds.is_empty() {
            debug!(
                "control: closed {} file descriptor(s) no request took",
                fds.len()
            );
        }
        if let Err(e) = &r {
            debug!("control: {cmd}: {}: {}", e.code, e.message);
        }
        r
    });
    match r {
        Ok((result, then)) => (Reply::ok(id, result).line(), then),
        Err(e) => {
            daemon.request_errors.fetch_add(1, Ordering::Relaxed);
            (error_reply(id, &e), Then::Nothing)
        }
    }
}

/// What an `annotations` request asks for besides the totals (docs/control.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnotationQuery {
    /// The hottest regions, at most [`MAX_TOP`].
    pub top: Option<u64>,
    /// Blocks per `top` region (≥ 1; default 1).
    pub region_blocks: Option<u64>,
    /// Buckets of the histogram, `1..=MAX_HISTOGRAM`.
    pub histogram: Option<u64>,
    /// List the block ranges carrying this taint label.
    pub label: Option<String>,
    /// One block's record.
    pub block: Option<u64>,
}

impl AnnotationQuery {
    /// Checks what can be checked without the disk: the bounds of `top`, `region_blocks` and
    /// `histogram`.
    pub fn check(&self) -> Result<(), CommandError> {
        let invalid = |m: String| Err(CommandError::new(ErrorCode::Invalid, m));
        if let Some(n) = self.top.filter(|&n| n > MAX_TOP) {
            return invalid(format!("top {n}: at most {MAX_TOP} regions"));
        }
        match (self.region_blocks, self.top) {
            (Some(0), _) => return invalid("region_blocks must be at least 1".into()),
            (Some(_), None) => {
                return invalid("region_blocks sizes the top regions; it needs top".into())
            }
            _ => {}
        }
        if let Some(b) = self.histogram.filter(|b| !(1..=MAX_HISTOGRAM).contains(b)) {
            return invalid(format!(
                "histogram {b}: between 1 and {MAX_HISTOGRAM} buckets"
            ));
        }
        Ok(())
    }
}

/// One version's annotations as `annotations` reports them (live, or offline by
/// `dovetail disk annotations`).
#[derive(Debug)]
pub struct AnnotatedView<'a> {
    pub disk: &'a str,
    /// The version's layout (`parallax-v2`).
    pub layout: &'a str,
    /// The version's key in the store's catalog.
    pub version: Option<u64>,
    /// `trusted` or `candidate`.
    pub role: &'a str,
    /// The snapshot the table was read from (`None`: the live annotations).
    pub snapshot: Option<&'a str>,
    pub table: &'a Table,
    pub labels: &'a [Label],
}

fn label_json(l: &Label) -> Value {
    json!({"name": l.name, "bit": l.bit, "active": l.active})
}

fn labels_json(labels: &[Label]) -> Value {
    Value::Array(labels.iter().map(label_json).collect())
}

/// Serialises a value of ours; our types always serialise.
fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The `annotations` result for `view` and `q` (docs/control.md): the totals, and what `q`
/// asks for. `q` is checked here too; a block past the end or an unknown label is `invalid`.
pub fn annotations_result(
    view: &AnnotatedView<'_>,
    q: &AnnotationQuery,
) -> Result<Value, CommandError> {
    q.check()?;
    let t = view.table;
    let epochs = t.epochs();
    let mut r = json!({
        "disk": view.disk,
        "layout": view.layout,
        "version": view.version,
        "role": view.role,
        "snapshot": view.snapshot,
        "blocks": t.blocks(),
        "epoch_secs": epochs.secs,
        "epoch_base": epochs.base,
        "labels": labels_json(view.labels),
        "totals": to_json(&t.totals()),
    });
    if let Some(b) = q.block {
        if b >= t.blocks() {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!(
                    "block {b} is past the end of disk {} ({} blocks)",
                    view.disk,
                    t.blocks()
                ),
            ));
        }
    }
    let label_bit = match &q.label {
        Some(name) => Some(
            view.labels
                .iter()
                .find(|l| &l.name == name)
                .map(|l| l.bit)
                .ok_or_else(|| {
                    CommandError::new(
                        ErrorCode::Invalid,
                        format!(
                            "disk {} has no taint label {} (labels: {})",
                            view.disk,
                            dovetail_store::names::shown(name),
                            if view.labels.is_empty() {
                                "none".to_string()
                            } else {
                                view.labels
                                    .iter()
                                    .map(|l| l.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    )
                })?,
        ),
        None => None,
    };
    if let Some(n) = q.top {
        let regions = t.top(n as usize, q.region_blocks.unwrap_or(1));
        r["top"] = to_json(&regions);
        r["region_blocks"] = json!(q.region_blocks.unwrap_or(1));
    }
    if let Some(b) = q.histogram {
        r["histogram"] = to_json(&t.histogram(b as usize));
    }
    if let Some(bit) = label_bit {
        let all = t.ranges_with(1u16 << bit);
        let blocks: u64 = all.iter().map(|(a, b)| b - a).sum();
        r["label"] = json!(q.label);
        r["ranges_total"] = json!(all.len());
        r["label_blocks"] = json!(blocks);
        r["ranges"] = Value::Array(
            all.iter()
                .take(MAX_RANGES)
                .map(|(a, b)| json!({"first_block": a, "end_block": b}))
                .collect(),
        );
    }
    if let Some(b) = q.block {
        let a = t.get(b);
        let names: Vec<&str> = view
            .labels
            .iter()
            .filter(|l| a.taint & (1u16 << l.bit) != 0)
            .map(|l| l.name.as_str())
            .collect();
        r["block"] = json!({
            "block": b,
            "annotation": to_json(&a),
            "class": to_json(&a.class()),
            "labels": names,
        });
    }
    Ok(r)
}

/// Chooses the version of `d` an `annotations` request reads: `role` if given, else the
/// trusted version if it keeps annotations, else the candidate.
fn annotated_version(
    d: &LiveDisk,
    role: Option<&str>,
) -> Result<(&'static str, std::sync::Arc<Parallax>), CommandError> {
    let versions = d.annotated_versions();
    let conflict = |m: String| CommandError::new(ErrorCode::Conflict, m);
    let Some(first) = versions.first() else {
        return Err(conflict(format!(
            "disk {} has no parallax-v2 version, which is what keeps annotations; `tee \
             --candidate parallax-v2` adds one",
            d.name
        )));
    };
    let Some(role) = role else {
        return Ok(first.clone());
    };
    if let Some(v) = versions.iter().find(|(r, _)| *r == role) {
        return Ok(v.clone());
    }
    let st = d.status();
    Err(conflict(match (role, &st.candidate) {
        ("trusted", _) => format!(
            "disk {}: the trusted version is {}, which keeps no annotations",
            d.name, st.trusted_layout
        ),
        (_, None) => format!("disk {} has no candidate", d.name),
        (_, Some(c)) if c.state == "quarantined" => format!(
            "disk {}: the candidate is quarantined; its annotations are not kept up to date",
            d.name
        ),
        (_, Some(c)) => format!(
            "disk {}: the candidate is {}, which keeps no annotations",
            d.name, c.layout
        ),
    }))
}

fn annotations(daemon: &Daemon, a: AnnotationsArgs) -> Result<Value, CommandError> {
    let q = AnnotationQuery {
        top: a.top,
        region_blocks: a.region_blocks,
        histogram: a.histogram,
        label: a.label,
        block: a.block,
    };
    q.check()?;
    if let Some(v) = a.version.as_deref() {
        if v != "trusted" && v != "candidate" {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!("version {v:?}: \"trusted\" or \"candidate\""),
            ));
        }
    }
    let d = daemon.disk(&a.disk)?;
    let (role, p) = annotated_version(&d, a.version.as_deref())?;
    let st = d.status();
    let key = match role {
        "trusted" => st.trusted_version,
        _ => st.candidate.as_ref().map(|c| c.version),
    };
    let frozen;
    let (table, labels) = match &a.snapshot {
        Some(name) => {
            frozen = p.snapshot_annotations(name).map_err(|e| {
                let code = match e {
                    dovetail_layout::Error::NoSuchSnapshot(_)
                    | dovetail_layout::Error::InvalidArgument(_) => ErrorCode::Invalid,
                    _ => ErrorCode::Failed,
                };
                CommandError::new(
                    code,
                    format!(
                        "disk {} ({role}): {}",
                        a.disk,
                        dovetail_layout::error_chain(&e)
                    ),
                )
            })?;
            (&frozen.0, frozen.1.clone())
        }
        None => (
            p.annotations().ok_or_else(|| {
                CommandError::new(
                    ErrorCode::Conflict,
                    format!("disk {}: no annotations", a.disk),
                )
            })?,
            p.labels(),
        ),
    };
    annotations_result(
        &AnnotatedView {
            disk: &a.disk,
            layout: p.layout(),
            version: key,
            role,
            snapshot: a.snapshot.as_deref(),
            table,
            labels: &labels,
        },
        &q,
    )
}

fn taint(daemon: &Daemon, a: TaintArgs) -> Result<Value, CommandError> {
    let d = daemon.disk(&a.disk)?;
    let changed = d.set_taint(&a.label, a.on)?;
    let labels = d
        .annotated_versions()
        .first()
        .map(|(_, p)| p.labels())
        .unwrap_or_default();
    Ok(json!({
        "message": format!(
            "taint label {:?} {} in the {} version{}",
            a.label,
            if a.on { "on" } else { "off" },
            changed.join(" and "),
            if changed.len() == 1 { "" } else { "s" }
        ),
        "versions": changed,
        "labels": labels_json(&labels),
    }))
}

fn tiers(daemon: &Daemon, a: TiersArgs) -> Result<Value, CommandError> {
    let change = TierChange {
        class: a.class,
        copies: a.copies,
        tier: a.tier,
        compress: a.compress,
        cold_after_secs: a.cold_after_secs,
        hot_accesses: a.hot_accesses,
        move_mib_s: a.move_mib_s,
        move_now: a.move_now,
        scrub: a.scrub,
    };
    change.check()?;
    let r = daemon.disk(&a.disk)?.tiers(&change)?;
    Ok(tiers_result(&a.disk, &r))
}

fn snapshot_json(s: &dovetail_layout::parallax::SnapshotInfo) -> Value {
    json!({"name": s.name, "generation": s.generation, "created": s.created})
}

fn run(daemon: &Daemon, request: Request) -> Result<(Value, Then), CommandError> {
    let done = |v: Value| Ok((v, Then::Nothing));
    match request {
        Request::Hello(NoArgs {}) => done(json!({
            "protocol": PROTOCOL,
            "version": env!("CARGO_PKG_VERSION"),
            "store": daemon.store,
            "disks": daemon.served().iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
            "failed": daemon.failed().iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
            "commands": COMMANDS,
            "pid": std::process::id(),
            "upgrade": crate::daemon::upgrade::last(),
        })),
        Request::Status(a) => {
            let (disks, failed) = match a.disk {
                Some(name) => match daemon.failed_disk(&name) {
                    Some(f) => (Vec::new(), vec![f]),
                    None => (vec![daemon.disk(&name)?.status()], Vec::new()),
                },
                None => (
                    daemon.served().iter().map(|d| d.status()).collect(),
                    daemon.failed(),
                ),
            };
            done(json!({ "disks": disks, "failed": failed }))
        }
        Request::Reopen(a) => {
            let message = daemon.reopen(&a.disk)?;
            done(json!({ "message": message }))
        }
        Request::Takeover(a) => {
            let message = daemon.take_over(&a.disk)?;
            done(json!({ "message": message }))
        }
        Request::Tee(a) => {
            if !a.faults.is_empty() && !daemon.security.allow_fault_injection {
                return Err(CommandError::new(
                    ErrorCode::Forbidden,
                    "tee: fault rules are for testing and this daemon was not started with \
                     --allow-fault-injection; attach the candidate without faults",
                ));
            }
            let d = daemon.disk(&a.disk)?;
            let layout = match a.candidate {
                Some(l) => l,
                None => d.trusted_layout(),
            };
            let (message, pause) = if a.more_candidates.is_empty() {
                d.attach(&layout, &a.policy, &a.faults)?
            } else {
                let layouts: Vec<String> =
                    std::iter::once(layout).chain(a.more_candidates).collect();
                d.attach_voting(&layouts, &a.policy, &a.faults)?
            };
            done(json!({"message": message, "pause": pause}))
        }
        Request::TeeAdd(a) => {
            let (message, pause) = daemon.disk(&a.disk)?.tee_add(&a.candidate)?;
            done(json!({"message": message, "pause": pause}))
        }
        Request::TeeRemove(a) => {
            let (message, pause) = daemon.disk(&a.disk)?.tee_remove(a.member)?;
            done(json!({"message": message, "pause": pause}))
        }
        Request::Policy(a) => {
            let (message, pause) = daemon.disk(&a.disk)?.set_policy(&a.policy)?;
            done(json!({"message": message, "pause": pause}))
        }
        Request::Untee(a) | Request::Abort(a) => {
            let (message, pause) = daemon.disk(&a.disk)?.detach()?;
            done(json!({"message": message, "pause": pause}))
        }
        Request::Migrate(a) => {
            let d = daemon.disk(&a.disk)?;
            let status = match a.action() {
                "start" => d.migrate(a.mode(), a.rate)?,
                "status" => d.status().migration.ok_or_else(|| {
                    CommandError::new(
                        ErrorCode::Conflict,
                        format!("disk {} has no candidate", a.disk),
                    )
                })?,
                other => d.migration_action(other)?,
            };
            done(json!({ "migration": status }))
        }
        Request::Promote(a) => {
            let (message, pause) =
                daemon
                    .disk(&a.disk)?
                    .promote_member(a.no_verify, a.verify_rate, a.member)?;
            done(json!({"message": message, "pause": pause}))
        }
        Request::Deploy(a) => {
            let r = daemon.deploy(
                a.layout.as_deref(),
                &a.policy,
                a.disks.as_deref(),
                a.sample.map(|p| (p, a.seed.unwrap_or(0))),
            )?;
            done(r)
        }
        Request::Snapshot(a) => {
            let name = a.name.unwrap_or_else(|| {
                format!(
                    "snap-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                )
            });
            let (snap, pause) = daemon.disk(&a.disk)?.snapshot(&name)?;
            done(json!({"snapshot": snapshot_json(&snap), "pause": pause}))
        }
        Request::Snapshots(a) => {
            let list: Vec<Value> = daemon
                .disk(&a.disk)?
                .snapshots()?
                .iter()
                .map(snapshot_json)
                .collect();
            done(json!({ "snapshots": list }))
        }
        Request::DeleteSnapshot(a) => {
            daemon.disk(&a.disk)?.delete_snapshot(&a.name)?;
            done(json!({"message": format!("deleted snapshot {}", a.name)}))
        }
        Request::Export(a) => {
            let Some(dir) = &daemon.security.export_dir else {
                return Err(CommandError::new(
                    ErrorCode::Forbidden,
                    "export: live export is off: the daemon creates exports only in the \
                     directory `serve --export-dir DIR` names (or stop it and use `dovetail \
                     disk export`)",
                ));
            };
            let name = dir
                .name_of(&a.to)
                .map_err(|m| CommandError::new(ErrorCode::Invalid, m))?;
            let disk = daemon.disk(&a.disk)?;
            let to = dir.path.join(name);
            let out = dir.create(name).map_err(|e| {
                let why = match e.raw_os_error() {
                    Some(libc::EEXIST) => "it exists already (a file or a symlink)".to_string(),
                    Some(libc::ELOOP) => "it is a symlink".to_string(),
                    _ => e.to_string(),
                };
                CommandError::new(
                    ErrorCode::Invalid,
                    format!("export: cannot create {}: {why}", to.display()),
                )
            })?;
            let data = disk
                .export_snapshot(&a.snapshot, out, &to)
                .inspect_err(|_| {
                    let _ = dir.remove(name);
                })?;
            done(json!({"to": to, "data_bytes": data}))
        }
        Request::Events(a) => {
            if a.follow {
                let Some((backlog, rx)) = daemon.events.try_follow(a.since, MAX_FOLLOWERS) else {
                    return Err(CommandError::new(
                        ErrorCode::Busy,
                        format!(
                            "{MAX_FOLLOWERS} clients follow events already; follow later, or \
                             poll with `events` and `since`"
                        ),
                    ));
                };
                Ok((json!({ "events": backlog }), Then::Follow(rx)))
            } else {
                done(json!({ "events": daemon.events.recent(a.since) }))
            }
        }
        Request::Metrics(NoArgs {}) => done(json!({ "text": daemon.render_metrics() })),
        Request::Taint(a) => done(taint(daemon, a)?),
        Request::Annotations(a) => done(annotations(daemon, a)?),
        Request::Tiers(a) => done(tiers(daemon, a)?),
        Request::Resize(a) => done(daemon.disk(&a.disk)?.resize(a.size)?),
        Request::DiskCreate(a) => done(daemon.disk_create(&a.disk, a.size, a.layout.as_deref())?),
        // A socket passed with the request is taken by `handle_passing`; here none came.
        Request::Attach(a) => done(daemon.attach_disk(&a, None)?),
        Request::Detach(a) => done(daemon.detach_disk(&a.disk, a.force)?),
        Request::DiskDelete(a) => done(daemon.disk_delete(&a.disk)?),
        Request::Import(a) => done(daemon.import_disk(&a.disk, &a.from)?),
        Request::Bisect(a) => done(daemon.disk(&a.disk)?.bisect(a.block)?),
        Request::Upgrade(a) => done(crate::daemon::upgrade::request(a)?),
        Request::StoreFaults(a) => done(crate::daemon::store_faults::command(a.action.as_deref())?),
    }
}
