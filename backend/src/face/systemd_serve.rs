//! `serve` under a service manager: the sockets systemd hands over (socket activation), the
//! readiness, reload and stop notifications and the watchdog (`face::systemd`), SIGHUP's
//! reload of the config file (`face::config`), and the live changes a reload makes.

use std::os::unix::io::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::{info, warn};

use crate::daemon::control::{self, ControlServer};
use crate::daemon::served::Daemon;
use crate::face::cli::DiskSocket;
use crate::face::config::{ConfigSource, LiveSettings, Reloader};
use crate::face::systemd::{self, Activated, Notifier};
use crate::face::CliError;
use crate::metrics::{self, MetricsServer};
use crate::server::{ListenOn, Shutdown};

/// The sockets `serve` took from systemd (socket activation), by what they serve.
#[derive(Debug, Clone, Default)]
pub struct Activation {
    /// Disk name → the inherited listening socket.
    pub disks: std::collections::BTreeMap<String, std::os::unix::io::RawFd>,
    /// The control socket's, and the path it is bound at.
    pub control: Option<(std::os::unix::io::RawFd, PathBuf)>,
    /// The metrics endpoint's listener (handed over by `dovetail ctl upgrade`).
    pub metrics: Option<std::os::unix::io::RawFd>,
    /// The sockets are this daemon's own (handed over by the daemon it replaced, not
    /// systemd's): their files are removed at shutdown as if it had bound them.
    pub owned: bool,
    /// With an image: the path its handed-over socket is bound at.
    pub image_socket: Option<PathBuf>,
}

/// Takes the sockets systemd passed (if any): the control socket (named `control`, or bound at
/// the `--control` path; `control` is set to it if not given), each `--disk`'s (named after
/// the disk, or bound at its socket path) and, with a store (`disks`), a socket named after
/// a disk of the store not given with `--disk` serves that disk too (added to `disks`); with
/// an image, the one other socket (or the one named after it, or `disk`) serves it (`listen`).
pub fn take_activated(
    disks: Option<&mut Vec<DiskSocket>>,
    control: &mut Option<(PathBuf, u32)>,
    listen: &mut ListenOn,
    image_name: Option<&str>,
) -> Result<Activation, CliError> {
    let mut activated = Activation::default();
    let mut act = Activated::from_env().map_err(CliError::Invalid)?;
    if act.is_empty() {
        return Ok(activated);
    }
    let control_path = control.as_ref().map(|(p, _)| p.clone());
    if let Some(s) = act.take("control", control_path.as_deref()) {
        let path = s
            .path
            .clone()
            .or_else(|| control_path.clone())
            .unwrap_or_else(|| PathBuf::from(format!("fd:{}", s.fd)));
        if control.is_none() {
            *control = Some((path.clone(), control::DEFAULT_MODE));
        }
        activated.control = Some((s.fd, path));
    }
    match disks {
        Some(disks) => {
            for d in disks.iter() {
                if let Some(s) = act.take(&d.name, Some(&d.socket)) {
                    activated.disks.insert(d.name.clone(), s.fd);
                }
            }
            for s in act.rest() {
                let named = dovetail_store::names::check_name(
                    dovetail_store::names::NameKind::Disk,
                    &s.name,
                );
                if s.name == "unknown" || named.is_err() {
                    warn!(
                        "socket activation: fd {} ({:?}) names no disk (FileDescriptorName= a \
                         disk's name, or `control`): closed",
                        s.fd, s.name
                    );
                    // SAFETY: the fd was handed to this process and nothing else uses it.
                    unsafe { libc::close(s.fd) };
                    continue;
                }
                let socket = s
                    .path
                    .unwrap_or_else(|| PathBuf::from(format!("fd:{}", s.fd)));
                disks.push(DiskSocket {
                    name: s.name.clone(),
                    socket,
                });
                activated.disks.insert(s.name, s.fd);
            }
        }
        None => {
            let mut rest = act.rest();
            let name = image_name.unwrap_or("disk").to_string();
            let at = rest
                .iter()
                .position(|s| s.name == name || s.name == "disk")
                .or(if rest.len() == 1 { Some(0) } else { None });
            match at {
                Some(i) => {
                    let s = rest.remove(i);
                    *listen = ListenOn::Fd(s.fd);
                }
                None if !rest.is_empty() => {
                    return Err(CliError::Invalid(format!(
                        "socket activation: {} sockets but none named {name:?} or \"disk\" \
                         to serve the image on",
                        rest.len()
                    )))
                }
                None => {}
            }
            for s in rest {
                warn!(
                    "socket activation: fd {} ({:?}) not used: closed",
                    s.fd, s.name
                );
                // SAFETY: the fd was handed to this process and nothing else uses it.
                unsafe { libc::close(s.fd) };
            }
        }
    }
    Ok(activated)
}

/// The control socket on an inherited listening socket.
pub fn control_on_fd(
    fd: std::os::unix::io::RawFd,
    path: &Path,
    daemon: Arc<Daemon>,
) -> Result<ControlServer, CliError> {
    // SAFETY: `fd` is a listening Unix stream socket systemd handed to this process (checked
    // by `Activated::from_env`), taken once: nothing else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    Ok(control::start_inherited(listener, path, daemon)?)
}

/// What a reload (or the `--policy` options at the start) changes in the running daemon.
pub struct LiveApply {
    pub daemon: Arc<Daemon>,
    pub metrics: Arc<Mutex<Option<MetricsServer>>>,
}

impl std::fmt::Debug for LiveApply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveApply").finish_non_exhaustive()
    }
}

impl LiveSettings for LiveApply {
    fn set_metrics(&self, addr: Option<std::net::SocketAddr>) -> Result<String, String> {
        let mut slot = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        let Some(addr) = addr else {
            if let Some(m) = slot.take() {
                m.stop();
            }
            return Ok("metrics no longer served".into());
        };
        // The new address first: if it cannot be served, the old one stays.
        let old = slot.take();
        let d = self.daemon.clone();
        match metrics::serve_http(addr, Arc::new(move || d.render_metrics())) {
            Ok(server) => {
                let at = server.local_addr();
                if let Some(o) = old {
                    o.stop();
                }
                *slot = Some(server);
                Ok(format!("metrics on http://{at}/metrics"))
            }
            Err(e) => {
                *slot = old;
                Err(dovetail_layout::error_chain(&e))
            }
        }
    }

    fn set_policy(&self, name: &str, policy: &str) -> Result<Option<String>, String> {
        let disk = self.daemon.disk(name).map_err(|e| e.message)?;
        let wanted = crate::ops::teed::parse_policy(policy)
            .map_err(|e| e.to_string())?
            .to_string();
        match disk.status().candidate.map(|c| c.policy) {
            None => Err(format!(
                "disk {name} has no candidate to apply it to (`ctl tee` attaches one)"
            )),
            Some(p) if p == wanted => Ok(None),
            Some(_) => disk
                .set_policy(&wanted)
                .map(|(m, _)| Some(m))
                .map_err(|e| e.message),
        }
    }

    fn add_disk(&self, name: &str, socket: &Path) -> Result<Option<String>, String> {
        // A disk served already (from a socket systemd named after it) is left as it is.
        if let Ok(d) = self.daemon.disk(name) {
            return if d.socket == socket {
                Ok(None)
            } else {
                Err(format!(
                    "served already, on {}; its socket changes at the next restart",
                    d.socket.display()
                ))
            };
        }
        self.daemon
            .serve_new(name, socket)
            .map(Some)
            .map_err(|e| e.message)
    }

    fn remove_disk(&self, name: &str) -> Result<Option<String>, String> {
        crate::face::reload_disks::remove(&self.daemon, name)
    }

    fn move_disk(&self, name: &str, socket: &Path) -> Result<String, String> {
        crate::face::reload_disks::relocate(&self.daemon, name, socket)
    }
}

/// The service manager's side of a running `serve`: notifications, the watchdog, reloads.
#[derive(Debug)]
pub struct Supervision {
    notifier: Option<Arc<Notifier>>,
    reloader: Option<Reloader>,
}

/// `STATUS=` text for the disks served.
fn status(daemon: &Daemon) -> String {
    let failed = daemon.failed().len();
    format!(
        "serving {} disk(s){}",
        daemon.served().len(),
        if failed > 0 {
            format!(", {failed} failed to open")
        } else {
            String::new()
        }
    )
}

impl Supervision {
    /// Once every disk listens: sets `--policy`'s policies, notifies READY=1 and starts the
    /// watchdog if systemd asks for one.
    pub fn start(
        policies: &[(String, String)],
        config_source: Option<Arc<ConfigSource>>,
        daemon: &Daemon,
        live: &LiveApply,
        shutdown: &Arc<Shutdown>,
    ) -> Supervision {
        for (name, policy) in policies {
            match live.set_policy(name, policy) {
                Ok(Some(m)) => info!("disk {name}: {m} (--policy)"),
                Ok(None) => {}
                Err(e) => warn!("disk {name}: --policy {policy} not applied: {e}"),
            }
        }
        let reloader = config_source.and_then(Reloader::new);
        let notifier = Notifier::from_env();
        if let Some(n) = &notifier {
            n.notify(&format!("READY=1\nSTATUS={}", status(daemon)));
            if let Some(interval) = systemd::watchdog_interval() {
                if let Err(e) = systemd::start_watchdog(n.clone(), interval, shutdown.clone()) {
                    warn!("cannot start the watchdog thread: {e}");
                }
            }
        }
        Supervision { notifier, reloader }
    }

    /// SIGHUP: RELOADING=1, the reload, READY=1 with its outcome.
    pub fn reload(&mut self, live: &LiveApply) {
        systemd::notify(
            &self.notifier,
            &format!(
                "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the config file",
                systemd::monotonic_usec()
            ),
        );
        let summary = match &mut self.reloader {
            Some(r) => r.reload(live),
            None => {
                info!("SIGHUP: no config file (--config) to read again; nothing changed");
                "SIGHUP: no config file; nothing changed".to_string()
            }
        };
        systemd::notify(
            &self.notifier,
            &format!("READY=1\nSTATUS={}; {summary}", status(&live.daemon)),
        );
    }

    /// The service manager's notification socket, if the daemon runs under one.
    pub fn notifier(&self) -> Option<Arc<Notifier>> {
        self.notifier.clone()
    }

    /// Shutting down: STOPPING=1.
    pub fn stopping(&self) {
        systemd::notify(
            &self.notifier,
            "STOPPING=1\nSTATUS=stopping: finishing the requests in flight",
        );
    }
}
