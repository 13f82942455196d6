//! The daemon's set of disks: the served ones, the ones that could not be opened (`reopen`
//! retries them), deployment over several disks, the daemon's metrics and its shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dovetail_store::Store;
use log::info;
use serde::Serialize;

use crate::daemon::events::{unix_ms, EventHub};
use crate::daemon::live::LiveDisk;
use crate::daemon::proto::{CommandError, ErrorCode};
use crate::metrics::Exposition;

/// A disk of the store the daemon was asked to serve but could not open: it is not served
/// (its socket does not listen) until `reopen` opens it.
#[derive(Debug, Clone, Serialize)]
pub struct FailedDisk {
    pub name: String,
    /// The socket it is to be served on once it opens.
    pub socket: PathBuf,
    /// Why the last attempt to open it failed.
    pub reason: String,
    /// When the last attempt failed.
    pub since_unix_ms: u64,
    /// Attempts to open it so far (the daemon's start included).
    pub attempts: u64,
}

impl FailedDisk {
    /// Records that disk `name` could not be opened: a log line naming the disk and the
    /// cause, and a `disk-failed` event.
    pub fn record(
        events: &EventHub,
        name: &str,
        socket: &Path,
        reason: String,
        attempts: u64,
    ) -> FailedDisk {
        log::error!(
            "disk {name}: cannot open it, so it is not served (nothing listens on {}): {reason}; \
             the daemon's other disks are served; repair it, then `dovetail ctl reopen {name}` \
             serves it without a restart",
            socket.display()
        );
        events.publish(
            name,
            "disk-failed",
            "daemon",
            format!("cannot open the disk (attempt {attempts}), not served: {reason}"),
            None,
            None,
        );
        FailedDisk {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            reason,
            since_unix_ms: unix_ms(),
            attempts,
        }
    }
}

/// How the daemon opens the disks of its store, for `reopen`.
#[derive(Debug, Clone)]
pub struct StoreDisks {
    pub store: Arc<Store>,
    pub read_only: bool,
    pub mover_interval: Option<Duration>,
}

/// Starts serving a disk opened while the daemon runs (`reopen`): listens on its socket and
/// runs its serve loop. The serve command provides it.
pub type Launcher = Box<dyn Fn(Arc<LiveDisk>) -> Result<(), CommandError> + Send + Sync>;

mod lease;
mod lifecycle;
mod takeover;

pub use lease::parse_takeover_after;
pub use lifecycle::{socket_problem, Serving, DEFAULT_LAYOUT};

/// The daemon's means to start serving a disk while it runs, and its store's, if any.
#[derive(Default)]
struct Reopener {
    store: Option<StoreDisks>,
    launcher: Option<Launcher>,
    /// Starts and stops serve loops for `attach` and `detach`.
    serving: Option<Arc<dyn Serving>>,
}

impl std::fmt::Debug for Reopener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopener")
            .field("store", &self.store)
            .field("launcher", &self.launcher.is_some())
            .finish()
    }
}

/// The running daemon as the control socket sees it.
#[derive(Debug)]
pub struct Daemon {
    /// The disks served (a disk reopened while the daemon runs joins them).
    disks: std::sync::RwLock<Vec<Arc<LiveDisk>>>,
    /// The disks that could not be opened, not served.
    failed: Mutex<Vec<FailedDisk>>,
    /// Held while a disk is reopened (one at a time).
    reopener: Mutex<Reopener>,
    pub events: Arc<EventHub>,
    pub store: Option<PathBuf>,
    pub started: Instant,
    /// Control connections open now.
    pub connections: AtomicU64,
    /// Control requests answered, and those that were errors.
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    /// Who may send commands, where exports go, whether fault rules are accepted.
    pub security: crate::access::Security,
}

impl Daemon {
    pub fn new(disks: Vec<Arc<LiveDisk>>, events: Arc<EventHub>, store: Option<PathBuf>) -> Self {
        Daemon {
            disks: std::sync::RwLock::new(disks),
            failed: Mutex::new(Vec::new()),
            reopener: Mutex::new(Reopener::default()),
            events,
            store,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            request_errors: AtomicU64::new(0),
            security: crate::access::Security::default(),
        }
    }

    /// The daemon with `security` instead of the default (only root and the daemon's user
    /// may send commands, no live export, no fault rules).
    pub fn with_security(mut self, security: crate::access::Security) -> Self {
        self.security = security;
        self
    }

    /// The daemon serves the disks of a store: `failed` could not be opened at the start,
    /// `reopen` tries them again through `store`.
    pub fn with_store_disks(self, store: StoreDisks, failed: Vec<FailedDisk>) -> Self {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = failed;
        self.reopener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .store = Some(store);
        self
    }

    /// How `reopen` starts serving a disk it opened.
    pub fn set_launcher(&self, launcher: Launcher) {
        self.reopener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .launcher = Some(launcher);
    }

    /// How `attach` and `detach` start and stop serve loops.
    pub fn set_serving(&self, serving: Arc<dyn Serving>) {
        self.reopener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .serving = Some(serving);
    }

    fn serving(&self) -> Option<Arc<dyn Serving>> {
        self.reopener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .serving
            .clone()
    }

    /// The disks served now.
    pub fn served(&self) -> Vec<Arc<LiveDisk>> {
        self.disks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The disks that could not be opened (not served).
    pub fn failed(&self) -> Vec<FailedDisk> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Disk `name` if it could not be opened.
    pub fn failed_disk(&self, name: &str) -> Option<FailedDisk> {
        self.failed().into_iter().find(|f| f.name == name)
    }

    pub fn disk(&self, name: &str) -> Result<Arc<LiveDisk>, CommandError> {
        let disks = self.served();
        if let Some(d) = disks.iter().find(|d| d.name == name) {
            return Ok(d.clone());
        }
        if let Some(f) = self.failed_disk(name) {
            return Err(CommandError::new(
                ErrorCode::DiskFailed,
                format!(
                    "disk {} is not served: it could not be opened: {}; repair it, then \
                     `reopen` it",
                    dovetail_store::names::shown(name),
                    f.reason
                ),
            ));
        }
        Err(CommandError::new(
            ErrorCode::UnknownDisk,
            format!(
                "no disk {} is served here (served: {})",
                dovetail_store::names::shown(name),
                disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }

    /// `reopen`: tries to open disk `name`, which could not be opened before, and serves it on
    /// its socket when it opens. A failure is recorded (reason, attempts) and returned.
    pub fn reopen(&self, name: &str) -> Result<String, CommandError> {
        let reopener = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        let Some(failed) = self.failed_disk(name) else {
            return match self.disk(name) {
                Ok(_) => Err(CommandError::new(
                    ErrorCode::Conflict,
                    format!("disk {} is served already; only a disk that failed to open can be reopened", dovetail_store::names::shown(name)),
                )),
                Err(e) => Err(e),
            };
        };
        let (Some(sd), Some(launch)) = (&reopener.store, &reopener.launcher) else {
            return Err(CommandError::new(
                ErrorCode::NotAvailable,
                "this daemon cannot open disks while it runs",
            ));
        };
        let attempts = failed.attempts + 1;
        info!("disk {name}: reopening it (attempt {attempts})");
        // As the disk's attachment asks, if it has one (queues, serial, read-only).
        let attach = sd.store.attachment(name).ok().flatten();
        let opened = LiveDisk::open_store_serial(
            &sd.store,
            name,
            &failed.socket,
            sd.read_only || attach.as_ref().is_some_and(|a| a.read_only),
            attach.as_ref().map(|a| a.serial.as_str()),
            self.events.clone(),
            sd.mover_interval,
        )
        .map_err(|e| CommandError::from(e).message)
        .inspect(|live| {
            if let Some(a) = &attach {
                live.queues.store(a.queues, Ordering::Relaxed);
            }
        })
        .and_then(|live| match launch(live.clone()) {
            Ok(()) => Ok(live),
            Err(e) => {
                live.close();
                Err(e.message)
            }
        });
        match opened {
            Ok(live) => {
                // Served before it leaves the failed list: a lookup meanwhile finds it in one.
                self.disks
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(live);
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|f| f.name != name);
                let message = format!(
                    "reopened: served on {} (after {attempts} attempts)",
                    failed.socket.display()
                );
                info!("disk {name}: {message}");
                self.events
                    .publish(name, "disk-reopened", "daemon", message.clone(), None, None);
                Ok(message)
            }
            Err(reason) => {
                let f = FailedDisk::record(
                    &self.events,
                    name,
                    &failed.socket,
                    reason.clone(),
                    attempts,
                );
                let mut failed_list = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                for slot in failed_list.iter_mut().filter(|f| f.name == name) {
                    *slot = f.clone();
                }
                Err(CommandError::new(
                    ErrorCode::Failed,
                    format!("disk {name}: still cannot open it: {reason}"),
                ))
            }
        }
    }

    /// Opens disk `name` of the store and serves it on `socket`: a disk added to the config
    /// file, on SIGHUP.
    pub fn serve_new(&self, name: &str, socket: &Path) -> Result<String, CommandError> {
        let reopener = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        if self.disk(name).is_ok() || self.failed_disk(name).is_some() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} is known to the daemon already",
                    dovetail_store::names::shown(name)
                ),
            ));
        }
        let (Some(sd), Some(launch)) = (&reopener.store, &reopener.launcher) else {
            return Err(CommandError::new(
                ErrorCode::NotAvailable,
                "this daemon cannot open disks while it runs",
            ));
        };
        let live = LiveDisk::open_store(
            &sd.store,
            name,
            socket,
            sd.read_only,
            self.events.clone(),
            sd.mover_interval,
        )?;
        if let Err(e) = launch(live.clone()) {
            live.close();
            return Err(e);
        }
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(live);
        let message = format!("served on {}", socket.display());
        self.events
            .publish(name, "disk-added", "daemon", message.clone(), None, None);
        Ok(message)
    }

    /// `deploy`: attaches a `layout` candidate under `policy` to the chosen disks: the named
    /// ones, or a sample of `percent` % of the disks that have no candidate yet, chosen by
    /// `seed` (the same seed picks the same disks). Disks that cannot take one are reported,
    /// not fatal.
    pub fn deploy(
        &self,
        layout: Option<&str>,
        policy: &str,
        disks: Option<&[String]>,
        sample: Option<(f64, u64)>,
    ) -> Result<serde_json::Value, CommandError> {
        crate::ops::teed::parse_policy(policy)?;
        let chosen: Vec<Arc<LiveDisk>> = match (disks, sample) {
            (Some(names), None) => names
                .iter()
                .map(|n| self.disk(n))
                .collect::<Result<_, _>>()?,
            (None, Some((percent, seed))) => {
                if !dovetail_migrate::deploy::valid_percent(percent) {
                    return Err(CommandError::new(
                        ErrorCode::Invalid,
                        format!("sample {percent}% is not in (0, 100]"),
                    ));
                }
                let mut eligible: Vec<Arc<LiveDisk>> = self
                    .served()
                    .iter()
                    .filter(|d| d.status().candidate.is_none() && d.store().is_ok())
                    .cloned()
                    .collect();
                eligible.sort_by(|a, b| a.name.cmp(&b.name));
                dovetail_migrate::deploy::sample(eligible.len(), percent, seed)
                    .into_iter()
                    .map(|i| eligible[i].clone())
                    .collect()
            }
            _ => {
                return Err(CommandError::new(
                    ErrorCode::BadRequest,
                    "deploy: give either \"disks\" or \"sample\"",
                ))
            }
        };
        let mut deployed = Vec::new();
        let mut skipped = Vec::new();
        for d in chosen {
            let layout = layout.map_or_else(|| d.trusted_layout(), str::to_string);
            match d.attach(&layout, policy, &[]) {
                Ok((message, pause)) => deployed.push(serde_json::json!({
                    "disk": d.name, "message": message, "pause": pause
                })),
                Err(e) => skipped.push(serde_json::json!({
                    "disk": d.name, "code": e.code, "reason": e.message
                })),
            }
        }
        Ok(serde_json::json!({ "deployed": deployed, "skipped": skipped }))
    }

    /// Every metric, in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let mut out = Exposition::default();
        for d in &self.served() {
            d.render_metrics(&mut out);
        }
        let served = self.served();
        let failed = self.failed();
        for (name, v) in served
            .iter()
            .map(|d| {
                (
                    d.name.as_str(),
                    f64::from(u8::from(d.disk.failed().is_some())),
                )
            })
            .chain(failed.iter().map(|f| (f.name.as_str(), 1.0)))
        {
            out.gauge(
                "dovetail_disk_failed",
                "1 while a disk the daemon was asked to serve could not be opened (not served; \
                 `ctl reopen` retries it) or was failed by repeated panics of its requests \
                 (served, every data request IOERR; `ctl status` says why).",
                &[("disk", name)],
                v,
            );
        }
        out.gauge(
            "dovetail_uptime_seconds",
            "Seconds since the daemon started.",
            &[],
            self.started.elapsed().as_secs_f64(),
        );
        out.gauge(
            "dovetail_control_connections",
            "Control socket connections open now.",
            &[],
            self.connections.load(Ordering::Relaxed) as f64,
        );
        out.counter(
            "dovetail_control_requests_total",
            "Control requests answered.",
            &[],
            self.requests.load(Ordering::Relaxed),
        );
        out.counter(
            "dovetail_control_request_errors_total",
            "Control requests answered with an error.",
            &[],
            self.request_errors.load(Ordering::Relaxed),
        );
        out.counter(
            "dovetail_events_dropped_total",
            "Events a slow follower of the event stream did not get.",
            &[],
            self.events.dropped.load(Ordering::Relaxed),
        );
        out.finish()
    }

    pub fn close(&self) {
        for d in &self.served() {
            d.close();
        }
    }
}
