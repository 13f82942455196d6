//! `dovetail ctl upgrade` and SIGUSR2: the daemon replaced by a new binary without closing its
//! sockets (the handover protocol: `daemon::handover`, docs/format.md).
//!
//! The old process starts the new binary with the same arguments and a private channel, waits
//! for its `hello` (same handover format), then stops serving: its serve loops complete the
//! requests in flight and flush, the control socket and the metrics endpoint stop accepting,
//! the disks and the store are closed. Connections arriving meanwhile wait in the listening
//! sockets' backlogs. It hands the listening sockets over (`sockets`), the new process opens
//! the store and the disks and says `ready`, the old one answers `commit` and exits; only then
//! does the new one accept. A new binary that does not say `hello` (it exited, it hung, it speaks
//! another format) leaves the old one serving as before; one that fails after the sockets were
//! handed over (no `ready` within the deadline, or it exited) is killed, and the old process
//! opens its store again and serves on the same sockets: nothing was accepted meanwhile, and
//! every acknowledged write was flushed first.
//!
//! Live vhost-user connections are handed over too (handover format 2): each serve loop pauses
//! its guest's connection and exports it (`crate::handoff`), the old process sends the exports
//! before the sockets ([`send_connections`]) and keeps its own until the commit, so a new
//! process that fails leaves them to this one's reopened serve loops; the guest never
//! reconnects. With `--fallback reconnect`, a new binary speaking another handover format gets
//! no sockets: the old daemon shuts down as on SIGTERM (guests disconnected after their
//! requests in flight) and executes the new binary in its place (same pid, same arguments),
//! which binds the sockets afresh; QEMU reconnects (`reconnect=1`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use log::{info, warn};
use serde_json::{json, Value};

use crate::daemon::handover::{self, Channel, HandoverError, Message, Role, SocketInfo};
use crate::daemon::proto::{CommandError, ErrorCode, UpgradeArgs};
use crate::face::CliError;

/// How long the new binary has for each step (its `hello`; its `ready` once it has the
/// sockets) unless `--deadline` says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// The longest `--deadline`.
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);

/// How long the new process waits for the old one's sockets and for its `commit` (the old one
/// completes its requests in flight and flushes in between; its own deadline bounds the rest).
const NEW_SIDE_WAIT: Duration = Duration::from_secs(600);

/// The binary this daemon was started from, recorded at the start (the file may be replaced
/// by the new release at the same path later: that is the default binary to start).
static EXE: OnceLock<PathBuf> = OnceLock::new();

/// The service manager's notification socket (`$NOTIFY_SOCKET`, which the daemon took out of
/// its environment): given to the new process, and told the new main pid at the commit.
static NOTIFIER: Mutex<Option<Arc<crate::face::systemd::Notifier>>> = Mutex::new(None);

/// Records the daemon's notifier (at each start of serving).
pub fn set_notifier(n: Option<Arc<crate::face::systemd::Notifier>>) {
    *NOTIFIER.lock().unwrap_or_else(|p| p.into_inner()) = n;
}

/// After a failed handover, before serving again: `$NOTIFY_SOCKET` back in the environment, so
/// the daemon notifies (and its watchdog pings) as before.
pub fn restore_notify_env() {
    if let Some(n) = notifier() {
        std::env::set_var("NOTIFY_SOCKET", n.address());
    }
}

fn notifier() -> Option<Arc<crate::face::systemd::Notifier>> {
    NOTIFIER.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// SIGUSR2 asked for an upgrade with the default plan.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// Records the binary this process runs (at `serve`'s start).
pub fn remember_exe() {
    if let Ok(p) = std::env::current_exe() {
        let _ = EXE.set(p);
    }
}

/// SIGUSR2 (from the signal thread): upgrade to the binary at the same path.
pub fn on_signal() {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// What one upgrade does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub exec: PathBuf,
    pub reconnect: bool,
    pub deadline: Duration,
}

impl Plan {
    fn from_args(a: UpgradeArgs) -> Result<Plan, CommandError> {
        let invalid = |m: String| CommandError::new(ErrorCode::Invalid, m);
        let reconnect = match a.fallback.as_deref() {
            None => false,
            Some("reconnect") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "fallback {}: the one fallback is \"reconnect\"",
                    dovetail_store::names::shown(other)
                )))
            }
        };
        let deadline = match a.deadline_ms {
            None => DEFAULT_DEADLINE,
            Some(ms) => {
                let d = Duration::from_millis(ms);
                if d < Duration::from_millis(100) || d > MAX_DEADLINE {
                    return Err(invalid(format!(
                        "deadline_ms {ms}: between 100 and {} ms",
                        MAX_DEADLINE.as_millis()
                    )));
                }
                d
            }
        };
        let exec = match a.exec {
            Some(p) => p,
            None => default_exe()
                .ok_or_else(|| invalid("this daemon's binary is not known: give exec".into()))?,
        };
        if !exec.is_absolute() {
            return Err(invalid(format!(
                "exec {}: an absolute path is needed (the daemon's directory is not yours)",
                exec.display()
            )));
        }
        trusted_binary(&exec).map_err(|why| {
            CommandError::new(
                ErrorCode::Forbidden,
                format!("exec {}: {why}", exec.display()),
            )
        })?;
        Ok(Plan {
            exec,
            reconnect,
            deadline,
        })
    }
}

/// Whether `exec` is a binary only root or the daemon's user could have put there: a regular
/// executable file owned by one of them, writable by nobody else, in a directory owned by one of
/// them and writable by nobody else. A control-socket peer of `--control-group` may ask for an
/// upgrade, but must not get the daemon to run a program of its own.
pub fn trusted_binary(exec: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(exec).map_err(|e| format!("cannot resolve it: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let owned_safely = |what: &str, p: &Path| -> Result<std::fs::Metadata, String> {
        let m = std::fs::metadata(p).map_err(|e| format!("{what} {}: {e}", p.display()))?;
        if m.uid() != 0 && m.uid() != me {
            return Err(format!(
                "{what} {} belongs to uid {}, neither root nor the daemon's user",
                p.display(),
                m.uid()
            ));
        }
        if m.mode() & 0o022 != 0 {
            return Err(format!(
                "{what} {} is writable by its group or others (mode {:04o})",
                p.display(),
                m.mode() & 0o7777
            ));
        }
        Ok(m)
    };
    let m = owned_safely("the file", &real)?;
    if !m.is_file() || m.mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", real.display()));
    }
    if let Some(dir) = real.parent() {
        owned_safely("the directory", dir)?;
    }
    Ok(())
}

fn default_exe() -> Option<PathBuf> {
    EXE.get().cloned()
}

/// A request waiting for the serve loop, and where its answer goes (none for SIGUSR2).
struct Req {
    plan: Plan,
    reply: Option<mpsc::SyncSender<Result<Value, CommandError>>>,
}

/// The upgrade requests of one serving daemon: the control socket's hook puts them here, the
/// serve loop takes them ([`Requests::take`]); one runs at a time.
#[derive(Default)]
pub struct Requests {
    slot: Mutex<Option<Req>>,
    busy: AtomicBool,
}

impl std::fmt::Debug for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests")
            .field("busy", &self.busy.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Requests {
    /// Installs the control socket's `upgrade` hook for these requests.
    pub fn install(self: &Arc<Self>) {
        let me = self.clone();
        crate::daemon::upgrade::set_hook(Some(Arc::new(move |a| me.ask(a))));
    }

    /// Removes the hook (the daemon stops serving).
    pub fn uninstall() {
        crate::daemon::upgrade::set_hook(None);
    }

    /// The control thread: queue the request and wait until the new binary said `hello` (or
    /// failed to).
    fn ask(&self, a: UpgradeArgs) -> Result<Value, CommandError> {
        let plan = Plan::from_args(a)?;
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                "an upgrade is running already",
            ));
        }
        let wait = plan.deadline + Duration::from_secs(30);
        let (tx, rx) = mpsc::sync_channel(1);
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Req {
            plan,
            reply: Some(tx),
        });
        rx.recv_timeout(wait).unwrap_or_else(|_| {
            Err(CommandError::new(
                ErrorCode::Failed,
                "the daemon did not start the upgrade",
            ))
        })
    }

    /// The serve loop: the next request (the control socket's, or SIGUSR2's).
    fn take(&self) -> Option<Req> {
        if let Some(r) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Some(r);
        }
        if SIGNALLED.swap(false, Ordering::SeqCst) {
            if self.busy.swap(true, Ordering::SeqCst) {
                warn!("SIGUSR2: an upgrade is running already; ignored");
                return None;
            }
            let plan = match Plan::from_args(UpgradeArgs {
                exec: None,
                fallback: None,
                deadline_ms: None,
            }) {
                Ok(p) => p,
                Err(e) => {
                    warn!("SIGUSR2: no upgrade: {}", e.message);
                    self.busy.store(false, Ordering::SeqCst);
                    return None;
                }
            };
            info!("SIGUSR2: upgrading to {}", plan.exec.display());
            return Some(Req { plan, reply: None });
        }
        None
    }

    /// The upgrade ended (refused, or rolled back): another may start.
    pub fn done(&self) {
        self.busy.store(false, Ordering::SeqCst);
    }
}

/// What the serve loop knows that decides whether an upgrade may start.
#[derive(Debug, Default)]
pub struct Context {
    /// Disks with a guest connected.
    pub connected: Vec<String>,
    /// Why this daemon cannot start another binary, if it cannot (its sandbox).
    pub cannot_exec: Option<String>,
}

/// An upgrade under way: the serve loop stops serving and hands over, or shuts down and
/// executes the new binary in its place.
#[derive(Debug)]
pub enum Begun {
    Handover(Takeover),
    Reconnect(PathBuf),
}

/// The new process, past its `hello`.
#[derive(Debug)]
pub struct Takeover {
    child: Child,
    chan: Channel,
    plan: Plan,
}

impl Takeover {
    pub fn new_pid(&self) -> u32 {
        self.child.id()
    }
}

/// Takes the next request, if any, and starts it: `Some` once the new binary said `hello` in
/// this build's format; `None` (the daemon serves on) when there was none or it failed, the
/// requester told why.
pub fn poll(requests: &Requests, ctx: impl FnOnce() -> Context) -> Option<Begun> {
    let req = requests.take()?;
    let old = std::process::id();
    let r = begin(&req.plan, &ctx());
    let answer = match &r {
        Ok(Begun::Handover(t)) => {
            let new = t.new_pid();
            crate::daemon::upgrade::set_last(json!({"state": "running", "to": new}));
            info!(
                "upgrade: pid {new} ({}) takes over from pid {old}",
                req.plan.exec.display()
            );
            Ok(json!({
                "message": format!("handing over from pid {old} to pid {new}"),
                "old_pid": old, "new_pid": new, "mode": "handover",
            }))
        }
        Ok(Begun::Reconnect(exec)) => {
            crate::daemon::upgrade::set_last(json!({"state": "running", "to": old}));
            info!(
                "upgrade: {} speaks another handover format: shutting down and starting it in \
                 this process (guests reconnect)",
                exec.display()
            );
            Ok(json!({
                "message": format!(
                    "{} speaks another handover format: this daemon shuts down and starts it \
                     (pid {old}); guests reconnect", exec.display()),
                "old_pid": old, "new_pid": old, "mode": "reconnect",
            }))
        }
        Err(e) => {
            warn!("upgrade refused: {}", e.message);
            crate::daemon::upgrade::set_last(json!({"state": "failed", "reason": e.message}));
            requests.done();
            Err(e.clone())
        }
    };
    if let Some(tx) = req.reply {
        let _ = tx.try_send(answer);
    }
    r.ok()
}

fn begin(plan: &Plan, ctx: &Context) -> Result<Begun, CommandError> {
    let failed = |m: String| CommandError::new(ErrorCode::Failed, m);
    if let Some(why) = &ctx.cannot_exec {
        return Err(CommandError::new(ErrorCode::NotAvailable, why.clone()));
    }
    if !ctx.connected.is_empty() {
        info!(
            "upgrade: the guests of disk(s) {} are handed over connected (handover format {})",
            ctx.connected.join(", "),
            handover::FORMAT
        );
    }
    let (mut child, chan) = spawn(&plan.exec)
        .map_err(|e| failed(format!("cannot start {}: {e}", plan.exec.display())))?;
    let pid = child.id();
    let refused = |child: &mut Child, chan: &Channel, why: String| {
        let _ = chan.send(
            &Message::Abort {
                reason: why.clone(),
            },
            &[],
        );
        reap(child);
        failed(format!(
            "{} (pid {pid}) did not take over: {why}; this daemon serves on",
            plan.exec.display()
        ))
    };
    match chan.recv(plan.deadline) {
        Ok((
            Message::Hello {
                format,
                pid: said,
                version,
            },
            _,
        )) => {
            // (The channel is private to the child: SO_PEERCRED of a socket pair names its
            // creator, this process, so the hello's pid is what is checked.)
            if said != pid {
                let why = format!("its hello names pid {said}, not {pid}");
                return Err(refused(&mut child, &chan, why));
            }
            if format != handover::FORMAT {
                let e = HandoverError::Format {
                    theirs: format,
                    ours: handover::FORMAT,
                };
                let _ = chan.send(
                    &Message::Abort {
                        reason: e.to_string(),
                    },
                    &[],
                );
                reap(&mut child);
                if plan.reconnect {
                    return Ok(Begun::Reconnect(plan.exec.clone()));
                }
                return Err(failed(format!(
                    "{} (release {version}): {e}; this daemon serves on (--fallback reconnect \
                     restarts with it, guests reconnecting)",
                    plan.exec.display()
                )));
            }
            info!("upgrade: pid {pid} says hello (release {version}, handover format {format})");
            Ok(Begun::Handover(Takeover {
                child,
                chan,
                plan: plan.clone(),
            }))
        }
        Ok((other, _)) => {
            let why = format!("a {} message first, not hello", other.kind());
            Err(refused(&mut child, &chan, why))
        }
        Err(HandoverError::Closed) => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(failed(format!(
                "{} (pid {pid}) exited before taking over ({status}); this daemon serves on",
                plan.exec.display()
            )))
        }
        Err(e) => Err(refused(&mut child, &chan, e.to_string())),
    }
}

/// Starts `exec` with this process's arguments and the new end of a handover channel.
fn spawn(exec: &Path) -> std::io::Result<(Child, Channel)> {
    let (old, new) = Channel::pair()?;
    let fd: RawFd = new.raw_fd();
    let mut cmd = Command::new(exec);
    cmd.args(std::env::args_os().skip(1))
        .env(handover::ENV_FD, fd.to_string())
        // The watchdog's pid is this process's; the new one pings once it is the main pid.
        .env_remove("WATCHDOG_PID");
    if let Some(n) = notifier() {
        cmd.env("NOTIFY_SOCKET", n.address());
    }
    // SAFETY: the closure runs in the child between fork and exec and calls only fcntl, which
    // is async-signal-safe; it makes the channel's new end (close-on-exec in this process, so
    // no other child inherits it) survive the exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // The child has its end: with ours closed, its exit closes the channel.
    drop(new);
    Ok((child, old))
}

/// Ends a new process that is not taking over (it is this process's child).
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Gives up an upgrade that began (the daemon is stopping instead): the new process is told
/// and ended.
pub fn abandon(b: Begun, why: &str) {
    if let Begun::Handover(mut t) = b {
        let _ = t.chan.send(
            &Message::Abort {
                reason: why.to_string(),
            },
            &[],
        );
        reap(&mut t.child);
        crate::daemon::upgrade::set_last(json!({"state": "failed", "reason": why}));
    }
}

/// The old process, before its guests' queues pause for the handover: every served disk
/// flushed with I/O still running, so the flush inside the pause (which the guest waits for)
/// finds only what was written since (for a raw image, the page cache's dirty pages written
/// back by `fdatasync`; for a parallax version, the tree changed since its last commit). Only
/// time moves: the pause's flush still covers everything acknowledged. A failure is logged and
/// left to that flush, which reports it as before.
pub fn flush_ahead(daemon: &crate::daemon::served::Daemon) {
    let t = std::time::Instant::now();
    let disks = daemon.served();
    for d in &disks {
        if let Err(e) = d.disk.layout().flush() {
            warn!(
                "upgrade: disk {}: flush ahead of the handover failed: {}",
                d.name,
                dovetail_layout::error_chain(&e)
            );
        }
    }
    info!(
        "upgrade: {} disk(s) flushed ahead of the pause in {:.1} ms",
        disks.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// A listening socket to hand over and its fd (a duplicate the old process keeps until the
/// new one commits, to serve on again if it does not).
pub type Handed = (SocketInfo, OwnedFd);

/// Another fd of `fd`, close-on-exec.
pub fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd (or -1) without touching memory.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `n` is a new fd nobody else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(n) })
}

/// The old process, once it stopped serving and closed its store: hands `sockets` to the new
/// one and waits for its `ready`, then commits. On failure the new process is ended and the
/// reason returned: the caller serves again on its sockets.
pub fn hand_over(mut t: Takeover, sockets: &[Handed]) -> Result<(), String> {
    let pid = t.new_pid();
    let infos: Vec<SocketInfo> = sockets.iter().map(|(i, _)| i.clone()).collect();
    let fds: Vec<RawFd> = sockets.iter().map(|(_, f)| f.as_raw_fd()).collect();
    let r = (|| {
        send_connections(&t.chan)?;
        t.chan.send(&Message::Sockets { sockets: infos }, &fds)?;
        dovetail_store::failpoint::hit("upgrade-handed-over");
        match t.chan.recv(t.plan.deadline)? {
            (Message::Ready, _) => {}
            (Message::Abort { reason }, _) => return Err(HandoverError::Aborted(reason)),
            (other, _) => {
                return Err(HandoverError::Bad(format!(
                    "a {} message, not ready",
                    other.kind()
                )))
            }
        }
        // The service manager follows the new process before it starts serving (and notifying).
        crate::face::systemd::notify(
            &notifier(),
            &format!("MAINPID={pid}\nSTATUS=upgraded: pid {pid} serves"),
        );
        dovetail_store::failpoint::hit("upgrade-before-commit");
        t.chan.send(&Message::Commit, &[]).inspect_err(|_| {
            crate::face::systemd::notify(&notifier(), &format!("MAINPID={}", std::process::id()))
        })
    })();
    match r {
        Ok(()) => {
            dovetail_store::failpoint::hit("upgrade-committed");
            info!("upgrade: pid {pid} serves; this process exits");
            Ok(())
        }
        Err(e) => {
            let _ = t.chan.send(
                &Message::Abort {
                    reason: e.to_string(),
                },
                &[],
            );
            reap(&mut t.child);
            let why = format!(
                "{} (pid {pid}) did not take over: {e}",
                t.plan.exec.display()
            );
            crate::daemon::upgrade::set_last(json!({"state": "failed", "reason": why}));
            Err(why)
        }
    }
}

/// The old process: every live connection its serve loops exported (`crate::handoff`), one
/// `connection` message each and its files in `connection-fds` messages. They stay pending
/// here: if the new process does not take over, this one serves them again.
fn send_connections(chan: &Channel) -> Result<(), HandoverError> {
    crate::handoff::with_pending(|pending| {
        for (disk, c) in pending {
            let (state, fds) = crate::daemon::handover_conn::export(c);
            chan.send(
                &Message::Connection {
                    disk: disk.clone(),
                    state: Box::new(state),
                    fds: fds.len() as u32,
                },
                &[],
            )?;
            for chunk in fds.chunks(handover::MAX_FDS) {
                chan.send(
                    &Message::ConnectionFds {
                        count: chunk.len() as u32,
                    },
                    chunk,
                )?;
            }
            info!(
                "upgrade: disk {disk}: its guest's connection handed over ({} files)",
                fds.len()
            );
        }
        Ok(())
    })
}

/// The new process: the live connections before the `sockets` message (kept for each disk's
/// serve loop: `crate::handoff`); returns the first message after them. A connection whose
/// files do not come, or come other than described, is refused (and the handover with it).
fn recv_connections(chan: &Channel) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    loop {
        let (msg, fds) = chan.recv(NEW_SIDE_WAIT)?;
        let Message::Connection {
            disk,
            state,
            fds: n,
        } = msg
        else {
            return Ok((msg, fds));
        };
        crate::daemon::handover_conn::check_disk_name(&disk).map_err(HandoverError::Bad)?;
        let n = n as usize;
        if n != state.file_count() {
            return Err(HandoverError::Bad(format!(
                "disk {}: a connection of {} files announced with {n}",
                dovetail_store::names::shown(&disk),
                state.file_count()
            )));
        }
        let mut files = Vec::with_capacity(n);
        while files.len() < n {
            match chan.recv(NEW_SIDE_WAIT)? {
                (Message::ConnectionFds { count }, got) if count as usize <= n - files.len() => {
                    files.extend(got)
                }
                (other, _) => {
                    return Err(HandoverError::Bad(format!(
                        "a {} message where the files of disk {}'s connection belong",
                        other.kind(),
                        dovetail_store::names::shown(&disk)
                    )))
                }
            }
        }
        let c = crate::daemon::handover_conn::import(&state, files).map_err(|why| {
            HandoverError::Bad(format!(
                "disk {}: {why}",
                dovetail_store::names::shown(&disk)
            ))
        })?;
        info!("upgrade: disk {disk}: its guest's connection taken over");
        crate::handoff::stash(&disk, c);
    }
}

/// The new process's channel, between the sockets and the commit.
static NEW_SIDE: Mutex<Option<Channel>> = Mutex::new(None);

/// The new process: when started by an upgrade ([`handover::ENV_FD`]), says hello and waits for
/// the old process's sockets. `None` when not started by an upgrade.
pub fn take_over() -> Result<Option<Vec<Handed>>, CliError> {
    let bad = |e: HandoverError| CliError::Invalid(format!("upgrade: {e}"));
    let Some(chan) = Channel::from_env().map_err(bad)? else {
        return Ok(None);
    };
    // Until the old process commits, nothing this process does may remove the socket files.
    crate::server::keep_socket_files(true);
    chan.send(
        &Message::Hello {
            format: handover::FORMAT,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
        &[],
    )
    .map_err(bad)?;
    let (msg, fds) = match recv_connections(&chan) {
        Ok(next) => next,
        Err(e) => {
            let _ = chan.send(
                &Message::Abort {
                    reason: e.to_string(),
                },
                &[],
            );
            return Err(bad(e));
        }
    };
    let sockets = match msg {
        Message::Sockets { sockets } => sockets,
        Message::Abort { reason } => return Err(bad(HandoverError::Aborted(reason))),
        other => {
            let e = HandoverError::Bad(format!("a {} message, not sockets", other.kind()));
            let _ = chan.send(
                &Message::Abort {
                    reason: e.to_string(),
                },
                &[],
            );
            return Err(bad(e));
        }
    };
    info!("upgrade: took {} socket(s) over", sockets.len());
    *NEW_SIDE.lock().unwrap_or_else(|p| p.into_inner()) = Some(chan);
    Ok(Some(sockets.into_iter().zip(fds).collect()))
}

/// The new process, with the store and every disk open and nothing accepted yet: `ready`, then
/// wait for the old process's `commit`. Nothing to do when not started by an upgrade.
pub fn confirm() -> Result<(), CliError> {
    let Some(chan) = NEW_SIDE.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Ok(());
    };
    let bad = |e: HandoverError| CliError::Invalid(format!("upgrade: {e}"));
    // The old process sends the sockets only once it stopped serving (its requests in flight
    // completed and flushed, its store closed): if it is gone now (killed), nothing else
    // serves them, whether it went before or after this `ready`.
    let said = chan.send(&Message::Ready, &[]);
    let heard = match said {
        Ok(()) => chan.recv(NEW_SIDE_WAIT),
        Err(HandoverError::Closed) => Err(HandoverError::Closed),
        Err(e) => return Err(bad(e)),
    };
    match heard {
        Ok((Message::Commit, _)) => info!("upgrade: the old daemon committed; serving"),
        // The old process is gone without a word (killed): nothing else serves these sockets.
        Err(HandoverError::Closed) => {
            warn!("upgrade: the old daemon went away before committing; serving")
        }
        Ok((Message::Abort { reason }, _)) => return Err(bad(HandoverError::Aborted(reason))),
        Ok((other, _)) => {
            return Err(bad(HandoverError::Bad(format!(
                "a {} message, not commit",
                other.kind()
            ))))
        }
        Err(e) => return Err(bad(e)),
    }
    crate::server::keep_socket_files(false);
    Ok(())
}

/// [`sort_sockets`]' result: disk name → (fd, path), the control socket's (fd, path), the
/// metrics listener's fd.
pub type Sorted = (
    std::collections::BTreeMap<String, (RawFd, PathBuf)>,
    Option<(RawFd, PathBuf)>,
    Option<RawFd>,
);

/// The sockets handed over, by role: (disk name → fd, control (fd, path), metrics fd); any
/// other is closed with a warning.
pub fn sort_sockets(sockets: Vec<Handed>) -> Sorted {
    use std::os::fd::IntoRawFd;
    let mut disks = std::collections::BTreeMap::new();
    let mut control = None;
    let mut metrics = None;
    for (info, fd) in sockets {
        match info.role {
            Role::Disk if !disks.contains_key(&info.name) => {
                disks.insert(info.name, (fd.into_raw_fd(), PathBuf::from(info.path)));
            }
            Role::Control if control.is_none() => {
                control = Some((fd.into_raw_fd(), PathBuf::from(info.path)))
            }
            Role::Metrics if metrics.is_none() => metrics = Some(fd.into_raw_fd()),
            _ => warn!(
                "upgrade: a second {:?} socket {:?}: closed",
                info.role, info.name
            ),
        }
    }
    (disks, control, metrics)
}

/// The control socket's and the metrics listener's sockets to hand over (other fds of them);
/// the control socket's file is left in place when its server stops.
pub fn service_sockets(
    control: Option<&mut crate::daemon::control::ControlServer>,
    metrics: Option<&crate::metrics::MetricsServer>,
) -> Vec<Handed> {
    let mut out = Vec::new();
    if let Some(c) = control {
        c.set_remove_file(false);
        match dup(c.listener_fd()) {
            Ok(fd) => out.push((
                SocketInfo {
                    role: Role::Control,
                    name: String::new(),
                    path: c.path().display().to_string(),
                },
                fd,
            )),
            Err(e) => warn!("upgrade: the control socket: {e}"),
        }
    }
    if let Some(m) = metrics {
        match m.dup_listener() {
            Ok(fd) => out.push((
                SocketInfo {
                    role: Role::Metrics,
                    name: String::new(),
                    path: String::new(),
                },
                fd,
            )),
            Err(e) => warn!("upgrade: the metrics listener: {e}"),
        }
    }
    out
}

/// What decides whether an upgrade may start now: the disks with a guest connected, and
/// whether the daemon's sandbox (`--seccomp`, `--landlock`) forbids starting another binary.
pub fn context(daemon: &crate::daemon::served::Daemon, seccomp: bool, landlock: bool) -> Context {
    let connected = daemon
        .served()
        .iter()
        .filter(|d| d.connected.load(Ordering::Relaxed))
        .map(|d| d.name.clone())
        .collect();
    let cannot_exec = if seccomp {
        Some(
            "this daemon runs under --seccomp: its filters do not allow starting another \
             binary; restart it instead"
                .to_string(),
        )
    } else if landlock {
        Some(
            "this daemon runs under --landlock: its rules do not allow executing another \
             binary; restart it instead"
                .to_string(),
        )
    } else {
        None
    };
    Context {
        connected,
        cannot_exec,
    }
}

/// The sockets an upgrade handed over (to a new process, or back to this one when the new one
/// did not take over) as the sockets `serve` listens on: the control socket (`control` set to
/// its path if not given), each disk's by name (`store`), or the image's (`listen`).
pub fn activation(
    sockets: Vec<Handed>,
    control: &mut Option<(PathBuf, u32)>,
    listen: &mut crate::server::ListenOn,
    store: bool,
) -> crate::face::systemd_serve::Activation {
    let (disks, control_socket, metrics) = sort_sockets(sockets);
    let mut a = crate::face::systemd_serve::Activation {
        owned: true,
        metrics,
        ..Default::default()
    };
    if let Some((fd, path)) = control_socket {
        if control.is_none() {
            *control = Some((path.clone(), crate::daemon::control::DEFAULT_MODE));
        }
        a.control = Some((fd, path));
    }
    if store {
        a.disks = disks.into_iter().map(|(n, (fd, _))| (n, fd)).collect();
        return a;
    }
    let mut disks = disks.into_iter();
    if let Some((_, (fd, path))) = disks.next() {
        *listen = crate::server::ListenOn::Fd(fd);
        a.image_socket = Some(path);
    }
    for (n, (fd, _)) in disks {
        warn!("upgrade: a second image socket ({n}): closed");
        // SAFETY: the fd was handed to this process and nothing else uses it.
        unsafe { libc::close(fd) };
    }
    a
}

/// Executes `exec` in this process (same pid, same arguments): `--fallback reconnect` across
/// handover formats, once everything is closed. Returns only if the exec failed.
pub fn exec_in_place(exec: &Path) -> CliError {
    info!("upgrade: executing {} in this process", exec.display());
    let e = Command::new(exec).args(std::env::args_os().skip(1)).exec();
    CliError::Invalid(format!("upgrade: cannot execute {}: {e}", exec.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    /// A connection of `queues` started vrings (kick, call and err eventfds each) over a
    /// socket pair, one memfd region; the frontend's end returned beside it.
    fn connection(queues: u16) -> (vhost_user_backend::ExportedConnection, UnixStream) {
        use vhost_user_backend::{ExportedConnection, ExportedRegion, ExportedVring};
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let eventfd = || {
            // SAFETY: eventfd(2) creates a new descriptor; checked and owned below.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: `fd` was just created and nothing else owns it.
            Some(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        };
        let region = tempfile::tempfile().expect("region file");
        region.set_len(1 << 20).expect("size");
        let c = ExportedConnection {
            conn: ours,
            negotiated: Default::default(),
            owned: true,
            features_acked: true,
            acked_features: 1 << 32,
            acked_protocol_features: 0,
            regions: vec![ExportedRegion {
                guest_phys_addr: 0,
                memory_size: 1 << 20,
                user_addr: 0x7f00_0000_0000,
                mmap_offset: 0,
                file: region,
            }],
            vrings: (0..queues)
                .map(|index| ExportedVring {
                    index,
                    size: 256,
                    desc_table: 0x7f00_0000_0000,
                    avail_ring: 0x7f00_0000_1000,
                    used_ring: 0x7f00_0000_2000,
                    next_avail: index,
                    next_used: index,
                    started: true,
                    enabled: true,
                    kick: eventfd(),
                    call: eventfd(),
                    err: eventfd(),
                })
                .collect(),
            inflight: None,
            backend_req: None,
        };
        (c, theirs)
    }

    #[test]
    fn a_connection_of_more_files_than_one_message_carries_crosses_in_several() {
        let (old, new) = Channel::pair().expect("pair");
        // 100 vrings of 3 eventfds: 302 files, two connection-fds messages.
        let (c, mut frontend) = connection(100);
        assert!(c.file_count() > handover::MAX_FDS);
        crate::handoff::stash("vm-big", c);
        send_connections(&old).expect("send");
        old.send(&Message::Sockets { sockets: vec![] }, &[])
            .expect("sockets");
        let (next, _) = recv_connections(&new).expect("received");
        assert_eq!(next, Message::Sockets { sockets: vec![] });
        // The old process keeps its own; the received one is pending under the same name.
        let got = crate::handoff::take("vm-big").expect("taken over");
        assert_eq!(got.vrings.len(), 100);
        assert_eq!(got.vrings[99].next_avail, 99);
        assert!(got
            .vrings
            .iter()
            .all(|v| v.kick.is_some() && v.err.is_some()));
        // The connection received is the same socket: what the frontend sends arrives there.
        use std::io::{Read, Write};
        frontend.write_all(b"ping").expect("write");
        let mut b = [0u8; 4];
        (&got.conn).read_exact(&mut b).expect("read");
        assert_eq!(&b, b"ping");
        crate::handoff::forget_all();
    }

    #[test]
    fn a_connection_with_missing_or_foreign_files_is_refused() {
        let refused = |msgs: &[(Message, Vec<RawFd>)]| {
            let (old, new) = Channel::pair().expect("pair");
            for (m, fds) in msgs {
                old.send(m, fds).expect("send");
            }
            match recv_connections(&new) {
                Err(HandoverError::Bad(why)) => why,
                other => panic!("accepted: {other:?}"),
            }
        };
        let (c, _frontend) = connection(1);
        let (state, fds) = crate::daemon::handover_conn::export(&c);
        let announce = |disk: &str, n: usize| Message::Connection {
            disk: disk.into(),
            state: Box::new(state.clone()),
            fds: n as u32,
        };
        let files = |fds: Vec<RawFd>| {
            (
                Message::ConnectionFds {
                    count: fds.len() as u32,
                },
                fds,
            )
        };
        // Fewer files announced than the state names.
        let why = refused(&[(announce("vm1", 2), vec![])]);
        assert!(why.contains("announced"), "{why}");
        // The sockets message where the files belong.
        let why = refused(&[
            (announce("vm1", fds.len()), vec![]),
            (Message::Sockets { sockets: vec![] }, vec![]),
        ]);
        assert!(why.contains("belong"), "{why}");
        // A regular file where the connection's socket belongs.
        let mut swapped = fds.clone();
        swapped.swap(0, 1);
        let why = refused(&[(announce("vm1", fds.len()), vec![]), files(swapped)]);
        assert!(why.contains("not a Unix stream socket"), "{why}");
        // A disk name that is a path.
        let why = refused(&[(announce("../vm1", fds.len()), vec![])]);
        assert!(why.contains("a connection for disk"), "{why}");
        assert!(crate::handoff::take("vm1").is_none());
    }

    #[test]
    fn only_binaries_no_one_else_could_plant_are_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("dovetail");
        std::fs::write(&bin, b"#!/bin/sh\n").expect("write");
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        mode(&bin, 0o755);
        mode(dir.path(), 0o755);
        trusted_binary(&bin).expect("ours, 0755, in a 0755 directory of ours");
        mode(&bin, 0o775);
        assert!(trusted_binary(&bin)
            .expect_err("refused")
            .contains("writable"));
        mode(&bin, 0o644);
        assert!(trusted_binary(&bin)
            .expect_err("refused")
            .contains("not an executable"));
        mode(&bin, 0o755);
        mode(dir.path(), 0o777);
        assert!(trusted_binary(&bin)
            .expect_err("refused")
            .contains("the directory"));
        mode(dir.path(), 0o755);
        assert!(
            trusted_binary(dir.path()).is_err(),
            "a directory is no binary"
        );
        assert!(trusted_binary(&dir.path().join("missing")).is_err());
        // World-writable /tmp holds nothing the daemon runs.
        let planted = Path::new("/tmp").join(format!("dovetail-planted-{}", std::process::id()));
        std::fs::write(&planted, b"#!/bin/sh\n").expect("write");
        mode(&planted, 0o755);
        let e = trusted_binary(&planted).expect_err("refused");
        std::fs::remove_file(&planted).expect("rm");
        assert!(e.contains("the directory"), "{e}");
    }
}
