//! `dovetail serve`: the checked [`ServeConfig`] made of the arguments, and serving an image or
//! the disks of a store (serve loops, the control socket, the metrics endpoint, signals).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dovetail_layout::raw::RawOptions;
use dovetail_layout::{BlockLayout, RawLayout, SECTOR_SIZE};
use dovetail_store::Store;
use log::{info, warn};

use crate::daemon::control;
use crate::daemon::live::{CommandError, EventHub, LiveDisk};
use crate::daemon::proto::ErrorCode;
use crate::daemon::served::{Daemon, FailedDisk, StoreDisks};
pub use crate::daemon::vm::{qemu_command_line, qemu_id};
use crate::device::DeviceConfig;
use crate::disk::SERIAL_LEN;
use crate::face::cli::{DiskSocket, ServeArgs, DEFAULT_IMAGE, DEFAULT_SIZE, DEFAULT_SOCKET};
use crate::face::systemd_serve::Activation;
use crate::face::{CliError, Size};
use crate::metrics;
use crate::server::{self, ListenOn, Shutdown};

/// A fully checked `serve` invocation.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Serve these disks of a store instead of `image`.
    pub store: Option<(PathBuf, Vec<DiskSocket>)>,
    /// The control socket and its mode.
    pub control: Option<(PathBuf, u32)>,
    /// Who may connect to the disks' sockets.
    pub socket_perms: server::SocketPerms,
    /// The group also allowed on the control socket.
    pub control_group: Option<crate::access::Group>,
    /// Where live exports go (an existing directory).
    pub export_dir: Option<PathBuf>,
    /// Where live imports come from (an existing directory).
    pub import_dir: Option<PathBuf>,
    /// Whether the control socket accepts fault rules.
    pub allow_fault_injection: bool,
    /// `--store-faults` (split into rules, checked) and `--store-faults-on`: test builds only.
    pub store_faults: Vec<String>,
    pub store_faults_on: bool,
    /// The journal every Tee keeps (`--tee-journal`), and `--auto-bisect`.
    pub tee_journal: Option<dovetail_migrate::journal::JournalLimits>,
    pub auto_bisect: bool,
    /// Where to serve metrics over HTTP.
    pub metrics: Option<std::net::SocketAddr>,
    pub image: PathBuf,
    pub create_size: Option<u64>,
    pub listen: ListenOn,
    pub read_only: bool,
    /// `--shared-store`: the store opened beside other daemons, one owner per disk.
    pub shared_store: bool,
    /// `--takeover-after`: the lease timeout after which a disk is taken over automatically.
    pub takeover_after: Option<std::time::Duration>,
    /// `--incoming`: disks served before they are owned (a live migration's destination).
    pub incoming: Vec<String>,
    /// `--incoming-timeout`: how long a guest's first request waits for the disk's owner.
    pub incoming_timeout: Option<std::time::Duration>,
    pub queues: u16,
    pub serial: String,
    /// With an image: the disk's name (`--name`; `None`: the image's file name).
    pub name: Option<String>,
    /// How often the tier mover of a parallax-v2 disk runs (`None`: never).
    pub mover_interval: Option<std::time::Duration>,
    /// Accept guest memory not sealed against shrinking (`--allow-unsealed-memory`).
    pub allow_unsealed_memory: bool,
    /// The image's cache mode (`--cache`; `None`: by the image's file type).
    pub cache: Option<dovetail_layout::CacheMode>,
    /// How queues carry out I/O (`--io-engine`).
    pub io_engine: crate::disk::Engine,
    /// How many nice levels the control plane's threads run below the guests' (`--control-nice`).
    pub control_nice: i32,
    /// `--log-level` (`None`: RUST_LOG, else info).
    pub log_level: Option<String>,
    /// `--policy NAME=POLICY`: the Tee policies to set.
    pub policies: Vec<(String, String)>,
    /// The config file the options came from (`--config`), read again on SIGHUP.
    pub config_source: Option<Arc<crate::face::config::ConfigSource>>,
    /// Sockets inherited through systemd socket activation: each disk's by name, and the
    /// control socket's (filled by `run_serve`).
    pub activated: Activation,
    /// Who the daemon becomes once everything is open (`--user`, `--group`).
    pub run_as: Option<crate::sandbox::Identity>,
    /// The seccomp filters' mode (`--seccomp`).
    pub seccomp: crate::sandbox::SeccompMode,
    /// Confine file access with Landlock (`--landlock`).
    pub landlock: bool,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = CliError;

    fn try_from(a: ServeArgs) -> Result<ServeConfig, CliError> {
        // Only the default image gets a default size: an explicit image that does not exist
        // needs an explicit --size, so a typo in a path never creates a fresh empty disk.
        let (image, create_size) = match a.image {
            Some(p) => (p, a.size.map(|s| s.0)),
            None => {
                let size = a
                    .size
                    .unwrap_or(Size::from_str(DEFAULT_SIZE).unwrap_or(Size(1 << 30)));
                (PathBuf::from(DEFAULT_IMAGE), Some(size.0))
            }
        };
        if a.read_only && a.store.is_none() && create_size.is_some() && !image.exists() {
            return Err(CliError::ReadOnlyCreate(image));
        }
        if let Some(size) = create_size {
            if size > dovetail_layout::raw::MAX_FILE_SIZE {
                return Err(CliError::Invalid(format!(
                    "--size {size}: an image file is at most {} bytes (8 EiB - 1)",
                    dovetail_layout::raw::MAX_FILE_SIZE
                )));
            }
        }
        // librados starts its own network threads and reads its config and keyring when it
        // connects: the filters and Landlock rules have no kind for them yet, so they would kill
        // or blind a daemon serving a store on RADOS.
        if let Some(store) = &a.store {
            if store
                .to_str()
                .is_some_and(|s| s.starts_with(dovetail_store::rados::SCHEME))
                && (a.seccomp != crate::sandbox::SeccompMode::Off || a.landlock)
            {
                return Err(CliError::Invalid(format!(
                    "--store {}: --seccomp and --landlock are not supported yet for a store on                      RADOS (librados' threads have no allow-list); serve it with --seccomp off                      and without --landlock",
                    store.display()
                )));
            }
        }
        if let Some(addr) = a.metrics {
            if !addr.ip().is_loopback() {
                return Err(CliError::Invalid(format!(
                    "--metrics {addr}: metrics are served on a loopback address only (e.g. \
                     127.0.0.1:{})",
                    addr.port()
                )));
            }
        }
        if let Some(n) = &a.name {
            dovetail_store::names::check_name(dovetail_store::names::NameKind::Disk, n)
                .map_err(|e| CliError::Invalid(format!("--name: {e}")))?;
        }
        if a.serial.len() > SERIAL_LEN {
            return Err(crate::disk::SerialTooLong::new(&a.serial).into());
        }
        let listen = match (a.socket, a.socket_fd) {
            (_, Some(fd)) => ListenOn::Fd(fd),
            (Some(p), None) => ListenOn::Path(p),
            (None, None) => ListenOn::Path(PathBuf::from(DEFAULT_SOCKET)),
        };
        if let Some(d) = &a.import_dir {
            if !std::fs::metadata(d).is_ok_and(|m| m.is_dir()) {
                return Err(CliError::Invalid(format!(
                    "--import-dir {}: not an existing directory",
                    d.display()
                )));
            }
        }
        if a.auto_bisect && a.tee_journal == 0 {
            return Err(CliError::Invalid(
                "--auto-bisect needs a request journal: give --tee-journal N".into(),
            ));
        }
        if let Some(d) = &a.export_dir {
            if !std::fs::metadata(d).is_ok_and(|m| m.is_dir()) {
                return Err(CliError::Invalid(format!(
                    "--export-dir {}: not an existing directory",
                    d.display()
                )));
            }
        }
        let run_as = a.user.as_ref().map(|u| {
            crate::sandbox::Identity::new(
                u,
                a.group.as_ref(),
                &[a.socket_group.as_ref(), a.control_group.as_ref()],
            )
        });
        if let Some(id) = &run_as {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if euid != 0 && euid != id.uid {
                return Err(CliError::Invalid(format!(
                    "--user {}: only root can become another user (this process runs as uid \
                     {euid})",
                    id.user
                )));
            }
            if let Some(dir) = &a.store {
                id.check_writable("--store", dir)
                    .map_err(|e| CliError::Invalid(format!("--user {}: {e}", id.user)))?;
            }
        }
        // With a group, the group gets what the owner has unless a mode is given.
        let socket_perms = server::SocketPerms {
            mode: a.socket_mode.unwrap_or(match a.socket_group {
                Some(_) => 0o660,
                None => 0o600,
            }),
            group: a.socket_group,
        };
        let control_mode = match (&a.control_group, a.control_mode) {
            (Some(_), crate::daemon::control::DEFAULT_MODE) => 0o660,
            (_, m) => m,
        };
        let store_faults =
            crate::daemon::store_faults::rules(&a.store_faults).map_err(CliError::Invalid)?;
        if !store_faults.is_empty() && (a.store.is_none() || a.shared_store) {
            return Err(CliError::Invalid(
                "--store-faults needs --store (and not --shared-store): it wraps the tier files \
                 of the store this daemon opens"
                    .into(),
            ));
        }
        let store = match a.store {
            Some(dir) => {
                let mut seen = std::collections::HashSet::new();
                for d in &a.disk {
                    if !seen.insert(d.name.clone()) {
                        return Err(CliError::DuplicateDisk(d.name.clone()));
                    }
                }
                Some((dir, a.disk))
            }
            None => None,
        };
        Ok(ServeConfig {
            store,
            control: a.control.map(|p| (p, control_mode)),
            socket_perms,
            control_group: a.control_group,
            export_dir: a.export_dir,
            import_dir: a.import_dir,
            allow_fault_injection: a.allow_fault_injection,
            store_faults,
            store_faults_on: a.store_faults_on,
            tee_journal: (a.tee_journal > 0).then_some(dovetail_migrate::journal::JournalLimits {
                requests: a.tee_journal,
                bytes: usize::try_from(a.tee_journal_bytes.0).unwrap_or(usize::MAX),
            }),
            auto_bisect: a.auto_bisect,
            metrics: a.metrics,
            image,
            create_size,
            listen,
            read_only: a.read_only,
            shared_store: a.shared_store,
            takeover_after: a.takeover_after,
            incoming: a.incoming,
            incoming_timeout: a.incoming_timeout,
            queues: a.queues,
            serial: a.serial,
            name: a.name,
            mover_interval: (a.mover_interval > 0)
                .then(|| std::time::Duration::from_secs(a.mover_interval)),
            allow_unsealed_memory: a.allow_unsealed_memory,
            cache: a.cache,
            io_engine: a.io_engine,
            control_nice: a.control_nice,
            log_level: a.log_level,
            policies: a.policy,
            config_source: None,
            activated: Activation::default(),
            run_as,
            seccomp: a.seccomp,
            landlock: a.landlock,
        })
    }
}

/// The checks of [`ServeConfig::try_from`] alone (`config check`, SIGHUP), as a message.
pub fn check_args(args: ServeArgs) -> Result<(), String> {
    ServeConfig::try_from(args)
        .map(|_| ())
        .map_err(|e| dovetail_layout::error_chain(&e))
}

/// The daemon's [`Shutdown`], requested by SIGINT or SIGTERM, and the flag SIGHUP sets: one
/// pair per process, installed by [`run_serve`] before any socket listens (a signal sent as soon
/// as a socket appears must find the handler, not end the process).
static SIGNALS: std::sync::OnceLock<(Arc<Shutdown>, Arc<std::sync::atomic::AtomicBool>)> =
    std::sync::OnceLock::new();

/// [`SIGNALS`], installing the handler on first use.
fn shutdown_on_signals() -> Result<(Arc<Shutdown>, Arc<std::sync::atomic::AtomicBool>), CliError> {
    if let Some(pair) = SIGNALS.get() {
        return Ok(pair.clone());
    }
    let reload = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = Shutdown::new()?;
    let mut signals = signal_hook::iterator::Signals::new([
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGUSR2,
    ])
    .map_err(CliError::Signals)?;
    let sig_shutdown = shutdown.clone();
    let sig_reload = reload.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == libc::SIGHUP {
                    sig_reload.store(true, std::sync::atomic::Ordering::SeqCst);
                    continue;
                }
                if sig == libc::SIGUSR2 {
                    crate::face::upgrade::on_signal();
                    continue;
                }
                if sig_shutdown.is_requested() {
                    info!("signal {sig} received again; still shutting down");
                } else {
                    info!("signal {sig} received: finishing requests in flight and shutting down");
                }
                sig_shutdown.request();
            }
        })
        .map_err(CliError::Signals)?;
    Ok(SIGNALS.get_or_init(|| (shutdown, reload)).clone())
}

/// Opens (or, the first time, creates) the trusted version of each named disk of the store and
/// serves each on its own socket, with its own queue workers, until SIGINT/SIGTERM.
fn run_serve_store(dir: &Path, disks: &[DiskSocket], cfg: &ServeConfig) -> Result<Ended, CliError> {
    if cfg.shared_store && matches!(cfg.cache, Some(dovetail_layout::CacheMode::None)) {
        let on_rados = dir
            .to_str()
            .is_some_and(|d| d.starts_with(dovetail_store::rados::SCHEME));
        if !on_rados {
            return Err(CliError::Invalid(
                "--shared-store with --cache none is not supported yet on a store directory \
                 (a shared open is buffered): drop one of them"
                    .into(),
            ));
        }
    }
    let store = if !cfg.store_faults.is_empty() {
        // Test builds only (`serve --store-faults`): the tier files through the fault layer.
        let direct = matches!(cfg.cache, Some(dovetail_layout::CacheMode::None));
        crate::daemon::store_faults::open(dir, &cfg.store_faults, cfg.store_faults_on, direct)
            .map_err(CliError::Invalid)?
    } else {
        match cfg.cache {
            _ if cfg.shared_store => Store::open_shared(dir),
            Some(dovetail_layout::CacheMode::None) => Store::open_direct(dir),
            _ => Store::open(dir),
        }
        .map_err(CliError::Store)?
    };
    let disks = disks_to_serve(&store, disks);
    if let Some(n) = cfg
        .incoming
        .iter()
        .find(|n| !disks.iter().any(|(d, _)| d.name == **n))
    {
        return Err(CliError::Invalid(format!(
            "--incoming {n}: not a disk this daemon serves (give it with --disk NAME=SOCKET)"
        )));
    }
    // Before any disk is opened (and starts its threads).
    // The sockets' directories and the store's tier files (which may live elsewhere).
    let socket_dirs = disks.iter().map(|(d, _)| dir_of(&d.socket));
    confine(cfg, socket_dirs.chain(store.tier_paths()).collect())?;
    info!(
        "store {}: cache mode {}, I/O engine {:?}",
        dir.display(),
        if store.direct_io() {
            "none"
        } else {
            "writeback"
        },
        cfg.io_engine
    );
    // Files in maps/ of versions that are no candidate any more (an interrupted promote).
    crate::ops::maps::clean_orphans(&store);
    let events = Arc::new(EventHub::default());
    let mut served = Vec::new();
    let mut failed = Vec::new();
    let mut first_error = None;
    for (d, attach) in &disks {
        // A disk that cannot be opened (damaged, ...) does not stop the others: it is reported
        // as failed and `ctl reopen` retries it.
        let open = if cfg.incoming.contains(&d.name) {
            LiveDisk::open_store_incoming
        } else {
            LiveDisk::open_store_serial
        };
        let live = match open(
            &store,
            &d.name,
            &d.socket,
            cfg.read_only || attach.as_ref().is_some_and(|a| a.read_only),
            attach.as_ref().map(|a| a.serial.as_str()),
            events.clone(),
            cfg.mover_interval,
        ) {
            Ok(live) => live,
            Err(e) => {
                let reason = dovetail_layout::error_chain(&e);
                failed.push(FailedDisk::record(&events, &d.name, &d.socket, reason, 1));
                first_error.get_or_insert(e);
                continue;
            }
        };
        let on = match cfg.activated.disks.get(&d.name) {
            Some(fd) => ListenOn::Fd(*fd),
            None => ListenOn::Path(d.socket.clone()),
        };
        let listener = match (server::listen_with(&on, &cfg.socket_perms), attach) {
            (Ok(l), _) => l,
            (Err(e), None) => return Err(e.into()),
            // An attached disk whose socket cannot be bound is reported as failed, as one
            // that cannot be opened: the others are served.
            (Err(e), Some(_)) => {
                let reason = dovetail_layout::error_chain(&e);
                live.close();
                failed.push(FailedDisk::record(&events, &d.name, &d.socket, reason, 1));
                continue;
            }
        };
        if let Some(a) = attach {
            live.queues
                .store(a.queues, std::sync::atomic::Ordering::Relaxed);
        }
        info!(
            "serving disk {} of {} ({} bytes) on {}",
            d.name,
            dir.display(),
            live.disk.capacity().0 * dovetail_layout::SECTOR_SIZE,
            d.socket.display()
        );
        println!(
            "dovetail: disk {}: attach a VM with:\n{}",
            d.name,
            qemu_command_line(&d.name, &d.socket, queues_of(&live, cfg.queues))
        );
        served.push((live, listener));
    }
    if let Some(e) = first_error {
        if served.is_empty() && cfg.control.is_none() && !disks.is_empty() {
            // Nothing to serve and no control socket to reopen a disk through.
            log::error!("no disk could be opened and there is no control socket (--control) to reopen one: stopping");
            return Err(e.into());
        }
        if cfg.control.is_none() {
            warn!(
                "{} disk(s) not served; without a control socket (--control) they can be \
                 retried only by restarting the daemon",
                failed.len()
            );
        }
    }
    let reopen = StoreDisks {
        store: store.clone(),
        read_only: cfg.read_only,
        mover_interval: cfg.mover_interval,
    };
    run_live(
        served,
        events,
        Some(dir.to_path_buf()),
        cfg,
        Some((reopen, failed)),
    )
}

/// The disks `serve --store DIR` serves: those named by `--disk` (a one-off run: their
/// attachments are not recorded, the catalog's are ignored), or, without `--disk`, every disk
/// the catalog says is attached, with its attachment record.
fn disks_to_serve(
    store: &Store,
    named: &[DiskSocket],
) -> Vec<(DiskSocket, Option<dovetail_store::AttachRec>)> {
    if !named.is_empty() {
        return named.iter().map(|d| (d.clone(), None)).collect();
    }
    let attached = store.attachments();
    if attached.is_empty() {
        info!(
            "no --disk given and no disk of the store is attached: nothing served until \
             `dovetail ctl attach`"
        );
    }
    attached
        .into_iter()
        .map(|(name, a)| {
            let socket = a.socket.clone();
            (DiskSocket { name, socket }, Some(a))
        })
        .collect()
}

/// The queues disk `live` offers: its attachment's, or the daemon's `--queues`.
fn queues_of(live: &LiveDisk, default: u16) -> u16 {
    match live.queues.load(std::sync::atomic::Ordering::Relaxed) {
        0 => default,
        n => n,
    }
}

/// One disk's serve loop: its own shutdown (`detach` stops one disk) and its thread.
struct DiskLoop {
    name: String,
    shutdown: Arc<Shutdown>,
    thread: DiskThread,
    /// Another fd of its listening socket and the path it is bound at, to hand over
    /// (`dovetail ctl upgrade`).
    listener: Option<(std::os::fd::OwnedFd, PathBuf)>,
}

/// The serve loops of a daemon's disks: started at the start, by `reopen` and by `attach`,
/// stopped one by `detach` or all at shutdown.
struct DiskLoops {
    loops: Mutex<Vec<DiskLoop>>,
    /// The daemon's shutdown: no loop starts once it is requested.
    daemon: Arc<Shutdown>,
    queues: u16,
    perms: server::SocketPerms,
}

impl DiskLoops {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<DiskLoop>> {
        self.loops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `live`'s serve loop on `listener`, with a shutdown of its own.
    fn spawn(
        &self,
        loops: &mut Vec<DiskLoop>,
        live: Arc<LiveDisk>,
        listener: vhost::vhost_user::Listener,
        remove_socket: bool,
    ) -> Result<(), CliError> {
        let shutdown = Shutdown::new()?;
        let config = DeviceConfig {
            num_queues: usize::from(queues_of(&live, self.queues)),
        };
        let name = live.name.clone();
        let kept = {
            use std::os::fd::AsRawFd;
            crate::face::upgrade::dup(listener.as_raw_fd())
                .ok()
                .map(|fd| (fd, live.socket.clone()))
        };
        // Taken here, before the loops of the daemon's first disks are all started (then any
        // connection left is dropped: `crate::handoff::drop_unclaimed`).
        let adopt = crate::handoff::take(&name);
        let thread = start_disk_thread(
            live,
            listener,
            config,
            shutdown.clone(),
            remove_socket,
            adopt,
        )
        .map_err(CliError::Signals)?;
        loops.push(DiskLoop {
            name,
            shutdown,
            thread,
            listener: kept,
        });
        Ok(())
    }

    /// Whether every serve loop has stopped.
    fn all_finished(&self) -> bool {
        self.lock().iter().all(|l| l.thread.is_finished())
    }

    /// Other fds of every serve loop's listening socket, to hand over.
    fn handed(&self) -> Vec<crate::face::upgrade::Handed> {
        use std::os::fd::AsRawFd;
        let mut out = Vec::new();
        for l in self.lock().iter() {
            let Some((fd, path)) = &l.listener else {
                warn!(
                    "upgrade: disk {}: its listening socket is not known",
                    l.name
                );
                continue;
            };
            match crate::face::upgrade::dup(fd.as_raw_fd()) {
                Ok(fd) => out.push((
                    crate::daemon::handover::SocketInfo {
                        role: crate::daemon::handover::Role::Disk,
                        name: l.name.clone(),
                        path: path.display().to_string(),
                    },
                    fd,
                )),
                Err(e) => warn!("upgrade: disk {}: {e}", l.name),
            }
        }
        out
    }

    /// Asks every serve loop to stop (or, `hand_off`, to pause its guest's connection and
    /// export it for an upgrade: `crate::handoff`); returns their threads to join.
    fn stop_all(&self, hand_off: bool) -> Vec<DiskThread> {
        let loops = std::mem::take(&mut *self.lock());
        for l in &loops {
            if hand_off {
                l.shutdown.hand_off();
            } else {
                l.shutdown.request();
            }
        }
        loops.into_iter().map(|l| l.thread).collect()
    }
}

impl crate::daemon::served::Serving for DiskLoops {
    fn start(
        &self,
        live: Arc<LiveDisk>,
        listener: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), CommandError> {
        let mut loops = self.lock();
        if self.daemon.is_requested() {
            return Err(CommandError::new(
                ErrorCode::Failed,
                "the daemon is shutting down",
            ));
        }
        let failed = |e: String| CommandError::new(ErrorCode::Failed, e);
        // A socket handed over belongs to whoever made it: its file is left in place.
        let (listener, remove_socket) = match listener {
            Some(fd) => (
                vhost::vhost_user::Listener::from(std::os::unix::net::UnixListener::from(fd)),
                false,
            ),
            None => (
                server::listen_with(&ListenOn::Path(live.socket.clone()), &self.perms)
                    .map_err(|e| failed(dovetail_layout::error_chain(&e)))?,
                true,
            ),
        };
        info!(
            "serving disk {} ({} bytes) on {} with {} queue(s)",
            live.name,
            live.disk.capacity().0 * dovetail_layout::SECTOR_SIZE,
            live.socket.display(),
            queues_of(&live, self.queues)
        );
        dovetail_store::failpoint::hit("attach-listening");
        let socket = live.socket.clone();
        self.spawn(&mut loops, live, listener, remove_socket)
            .inspect_err(|_| {
                if remove_socket {
                    server::remove_socket(&socket);
                }
            })
            .map_err(|e| failed(format!("cannot start the disk's serve loop: {e}")))
    }

    fn stop(&self, name: &str) -> Result<(), CommandError> {
        let found = {
            let mut loops = self.lock();
            loops
                .iter()
                .position(|l| l.name == name)
                .map(|i| loops.remove(i))
        };
        let Some(l) = found else {
            return Err(CommandError::new(
                ErrorCode::UnknownDisk,
                format!("no serve loop runs for disk {name}"),
            ));
        };
        l.shutdown.request();
        match l.thread.join() {
            Ok((_, Ok(()))) => Ok(()),
            Ok((_, Err(e))) => Err(CommandError::new(
                ErrorCode::Failed,
                dovetail_layout::error_chain(&e),
            )),
            Err(_) => Err(CommandError::new(
                ErrorCode::Failed,
                "the disk's serve loop panicked",
            )),
        }
    }
}

/// A disk's serve loop's thread: its name and what the loop returned.
type DiskThread = std::thread::JoinHandle<(String, Result<(), server::ServeError>)>;

/// Starts the serve loop of `live` on `listener` in a thread of its own.
fn start_disk_thread(
    live: Arc<LiveDisk>,
    mut listener: vhost::vhost_user::Listener,
    config: DeviceConfig,
    shutdown: Arc<Shutdown>,
    remove_socket: bool,
    adopt: Option<vhost_user_backend::ExportedConnection>,
) -> std::io::Result<DiskThread> {
    let name = live.name.clone();
    std::thread::Builder::new()
        .name(format!("disk-{name}"))
        .spawn(move || {
            crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Serve);
            let on_guest = |connected: bool| {
                if connected {
                    live.guest_arrived();
                    live.guests
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                live.connected
                    .store(connected, std::sync::atomic::Ordering::Relaxed);
            };
            let on_refused = || {
                live.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            };
            let r = server::serve_adopting(
                &name,
                live.disk.clone(),
                config,
                &mut listener,
                &shutdown,
                &on_guest,
                &on_refused,
                adopt,
            );
            if let Some(c) = shutdown.take_exported() {
                crate::handoff::stash(&name, c);
            }
            if let Err(e) = &r {
                log::error!("disk {name} stopped: {}", dovetail_layout::error_chain(e));
            }
            drop(listener);
            if remove_socket {
                server::remove_socket(&live.socket);
            }
            // The other disks keep serving; only a signal stops them.
            (name, r)
        })
}

/// Serves every disk on its own thread, with the control socket and the metrics endpoint if
/// asked for, until SIGINT/SIGTERM; then closes the Tees. `store_disks`: the store the disks
/// come from and the disks that could not be opened, which `ctl reopen` retries.
fn run_live(
    served: Vec<(Arc<LiveDisk>, vhost::vhost_user::Listener)>,
    events: Arc<EventHub>,
    store: Option<PathBuf>,
    cfg: &ServeConfig,
    store_disks: Option<(StoreDisks, Vec<FailedDisk>)>,
) -> Result<Ended, CliError> {
    let security = crate::access::Security {
        control: crate::access::ControlAccess {
            group: cfg.control_group.clone(),
            ..Default::default()
        },
        export_dir: match &cfg.export_dir {
            Some(dir) => {
                Some(
                    crate::access::ExportDir::open(dir).map_err(|source| CliError::File {
                        op: format!("open the export directory {}", dir.display()),
                        source,
                    })?,
                )
            }
            None => None,
        },
        allow_fault_injection: cfg.allow_fault_injection,
        import_dir: match &cfg.import_dir {
            Some(dir) => {
                Some(
                    crate::access::ExportDir::open(dir).map_err(|source| CliError::File {
                        op: format!("open the import directory {}", dir.display()),
                        source,
                    })?,
                )
            }
            None => None,
        },
    };
    // Socket files bound at a path are removed at shutdown (an inherited socket is not ours).
    let remove_sockets = cfg.store.is_some()
        || matches!(cfg.listen, ListenOn::Path(_))
        || cfg.activated.image_socket.is_some();
    let mut daemon = Daemon::new(
        served.iter().map(|(d, _)| d.clone()).collect(),
        events,
        store,
    )
    .with_security(security);
    let store_disks_given = store_disks.is_some();
    if let Some((sd, failed)) = store_disks {
        daemon = daemon.with_store_disks(sd, failed);
    }
    let daemon = Arc::new(daemon);
    let (shutdown, reload) = shutdown_on_signals()?;
    let config = DeviceConfig {
        num_queues: usize::from(cfg.queues),
    };
    // Started by an upgrade: every disk is open; the old daemon commits before anything is
    // accepted here.
    crate::face::upgrade::confirm()?;
    // The control socket and the metrics endpoint first: if one cannot start, nothing has been
    // served yet and the disks' socket files are removed again.
    let started = (|| -> Result<_, CliError> {
        let control = match (&cfg.activated.control, &cfg.control) {
            (Some((fd, path)), _) => {
                let mut c = crate::face::systemd_serve::control_on_fd(*fd, path, daemon.clone())?;
                c.set_remove_file(cfg.activated.owned);
                Some(c)
            }
            (None, Some((path, mode))) => Some(control::start_held(path, *mode, daemon.clone())?),
            (None, None) => None,
        };
        let metrics = match (cfg.activated.metrics, cfg.metrics) {
            (Some(fd), _) => {
                use std::os::fd::FromRawFd;
                let d = daemon.clone();
                // SAFETY: the fd is the metrics listener the replaced daemon handed over,
                // taken once here: nothing else owns it.
                let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
                let server = metrics::serve_http_on(l, Arc::new(move || d.render_metrics()))?;
                info!(
                    "metrics on http://{}/metrics (handed over)",
                    server.local_addr()
                );
                Some(server)
            }
            (None, Some(addr)) => {
                let d = daemon.clone();
                let server = metrics::serve_http(addr, Arc::new(move || d.render_metrics()))?;
                info!("metrics on http://{}/metrics", server.local_addr());
                Some(server)
            }
            (None, None) => None,
        };
        Ok((control, metrics))
    })();
    // Everything is open: drop root (`--user`) before any guest can connect.
    let started = started.and_then(|s| match &cfg.run_as {
        Some(id) => id
            .drop_to()
            .map(|()| {
                info!(
                    "running as user {} (uid {}, gid {}, groups {:?})",
                    id.user, id.uid, id.gid, id.groups
                );
                s
            })
            .map_err(|e| CliError::Invalid(format!("--user {}: {e}", id.user))),
        None => Ok(s),
    });
    let (mut control, metrics) = match started {
        Ok(s) => s,
        Err(e) => {
            if remove_sockets {
                for (live, _) in &served {
                    if !cfg.activated.disks.contains_key(&live.name) || cfg.activated.owned {
                        server::remove_socket(&live.socket);
                    }
                }
            }
            return Err(e);
        }
    };
    dovetail_store::failpoint::hit("serve-control-held");
    let _ = config;
    let disk_loops = Arc::new(DiskLoops {
        loops: Mutex::new(Vec::new()),
        daemon: shutdown.clone(),
        queues: cfg.queues,
        perms: cfg.socket_perms.clone(),
    });
    {
        let mut loops = disk_loops.lock();
        for (live, listener) in served {
            // A socket inherited from systemd is the socket unit's: left in place.
            let remove = remove_sockets
                && (!cfg.activated.disks.contains_key(&live.name) || cfg.activated.owned);
            disk_loops.spawn(&mut loops, live, listener, remove)?;
        }
    }
    // A guest handed over for a disk that is not served now (it failed to open) is
    // disconnected rather than left paused: QEMU reconnects once the disk is served again.
    crate::handoff::drop_unclaimed();
    if store_disks_given {
        daemon.set_serving(disk_loops.clone());
        let stop = shutdown.clone();
        daemon.watch_ownership(move || stop.is_requested());
        let stop = shutdown.clone();
        daemon.keep_leases(cfg.takeover_after, move || stop.is_requested());
    }
    {
        let disk_loops = disk_loops.clone();
        let shutdown = shutdown.clone();
        let queues = cfg.queues;
        let perms = cfg.socket_perms.clone();
        daemon.set_launcher(Box::new(move |live: Arc<LiveDisk>| {
            let mut loops = disk_loops.lock();
            if shutdown.is_requested() {
                return Err(CommandError::new(
                    ErrorCode::Failed,
                    "the daemon is shutting down",
                ));
            }
            let listener = server::listen_with(&ListenOn::Path(live.socket.clone()), &perms)
                .map_err(|e| {
                    CommandError::new(ErrorCode::Failed, dovetail_layout::error_chain(&e))
                })?;
            info!(
                "serving disk {} ({} bytes) on {}",
                live.name,
                live.disk.capacity().0 * dovetail_layout::SECTOR_SIZE,
                live.socket.display()
            );
            println!(
                "dovetail: disk {}: attach a VM with:\n{}",
                live.name,
                qemu_command_line(&live.name, &live.socket, queues_of(&live, queues))
            );
            disk_loops
                .spawn(&mut loops, live, listener, true)
                .map_err(|e| {
                    CommandError::new(
                        ErrorCode::Failed,
                        format!("cannot start the disk's thread: {e}"),
                    )
                })
        }));
    }
    // The daemon can now carry out every command (disks served, the launcher installed): the
    // control socket starts accepting; clients that connected earlier waited in its backlog.
    if let Some(c) = &control {
        c.open();
    }
    // Every disk listens: tell systemd (READY=1), set the policies the options ask for, and
    // watch for SIGHUP (the config file) and the watchdog.
    let metrics = Arc::new(Mutex::new(metrics));
    let live_settings = crate::face::systemd_serve::LiveApply {
        daemon: daemon.clone(),
        metrics: metrics.clone(),
    };
    let mut systemd = crate::face::systemd_serve::Supervision::start(
        &cfg.policies,
        cfg.config_source.clone(),
        &daemon,
        &live_settings,
        &shutdown,
    );
    // Serve until a signal or an upgrade; without a control socket, also until every serve
    // loop stopped (nothing could start another one).
    let upgrades = Arc::new(crate::face::upgrade::Requests::default());
    upgrades.install();
    crate::face::upgrade::set_notifier(systemd.notifier());
    let mut ended = Ended::Stopped;
    while !shutdown.wait(Duration::from_millis(200)) {
        if reload.swap(false, std::sync::atomic::Ordering::SeqCst) {
            systemd.reload(&live_settings);
        }
        if let Some(b) = crate::face::upgrade::poll(&upgrades, || {
            crate::face::upgrade::context(
                &daemon,
                cfg.seccomp != crate::sandbox::SeccompMode::Off,
                cfg.landlock,
            )
        }) {
            if shutdown.is_requested() {
                // SIGTERM came while the new binary started: stop, and take it down with us.
                crate::face::upgrade::abandon(b, "the daemon is shutting down");
                break;
            }
            ended = match b {
                crate::face::upgrade::Begun::Handover(t) => Ended::Handover(t, Vec::new()),
                crate::face::upgrade::Begun::Reconnect(exec) => Ended::Reconnect(exec),
            };
            break;
        }
        if control.is_none() && disk_loops.all_finished() {
            break;
        }
    }
    crate::face::upgrade::Requests::uninstall();
    if let Ended::Handover(_, sockets) = &mut ended {
        crate::face::upgrade::flush_ahead(&daemon);
        // Hand over: the socket files stay; the control socket stops first (no command starts
        // a serve loop meanwhile), then every serve loop completes its requests and flushes.
        crate::server::keep_socket_files(true);
        sockets.extend(disk_loops.handed());
        let m = metrics.lock().unwrap_or_else(|p| p.into_inner());
        sockets.extend(crate::face::upgrade::service_sockets(
            control.as_mut(),
            m.as_ref(),
        ));
        drop(m);
        drop(control.take());
    } else {
        systemd.stopping();
        shutdown.request();
    }
    let paused = std::time::Instant::now();
    let threads = disk_loops.stop_all(matches!(ended, Ended::Handover(..)));
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => failed = Some(CliError::DiskFailed { name, source: e }),
            Err(_) => failed = Some(CliError::DiskPanicked),
        }
    }
    if matches!(ended, Ended::Handover(..)) {
        info!(
            "upgrade: serve loops paused, their requests in flight completed and the disks \
             flushed in {:.1} ms",
            paused.elapsed().as_secs_f64() * 1e3
        );
    }
    drop(control);
    drop(live_settings);
    if let Some(m) = metrics.lock().unwrap_or_else(|p| p.into_inner()).take() {
        m.stop();
    }
    if !matches!(ended, Ended::Stopped) {
        // Control connections hold the daemon, and so the store, and the upgrade's requester
        // still waits for its reply: let them end (the control socket stopped accepting).
        let t = std::time::Instant::now();
        while daemon.connections.load(std::sync::atomic::Ordering::SeqCst) > 0
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let closing = std::time::Instant::now();
    daemon.close();
    info!(
        "stopped (the disks and the store closed in {:.1} ms)",
        closing.elapsed().as_secs_f64() * 1e3
    );
    match (failed, ended) {
        (_, e @ Ended::Handover(..)) => Ok(e),
        (Some(f), _) => Err(f),
        (None, e) => Ok(e),
    }
}

/// How [`run_live`] ended.
enum Ended {
    /// A signal (or every serve loop stopped).
    Stopped,
    /// An upgrade: everything is closed; hand these sockets to the new process.
    Handover(
        crate::face::upgrade::Takeover,
        Vec<crate::face::upgrade::Handed>,
    ),
    /// An upgrade across handover formats: everything is closed; execute the new binary.
    Reconnect(PathBuf),
}

/// Opens the image, starts listening, and serves until SIGINT/SIGTERM.
pub fn run_serve(mut cfg: ServeConfig) -> Result<(), CliError> {
    if let Some(level) = &cfg.log_level {
        crate::face::config::set_log_level(Some(level));
    }
    crate::face::upgrade::remember_exe();
    cfg.activated = match crate::face::upgrade::take_over()? {
        Some(sockets) => crate::face::upgrade::activation(
            sockets,
            &mut cfg.control,
            &mut cfg.listen,
            cfg.store.is_some(),
        ),
        None => crate::face::systemd_serve::take_activated(
            cfg.store.as_mut().map(|(_, disks)| disks),
            &mut cfg.control,
            &mut cfg.listen,
            cfg.name.as_deref(),
        )?,
    };
    check_sockets(&cfg)?;
    // Each thread kind installs its seccomp filter as it starts, over the control kind's,
    // which the main thread takes now: every thread the daemon ever starts (the signal thread,
    // a library's timer) inherits at least that one.
    // Before any thread starts and before the filters: control threads below the guests'.
    if crate::priority::configure(cfg.control_nice, cfg.run_as.is_some()).is_some() {
        dovetail_store::thread_kind::set_hook(crate::sandbox::enter);
    }
    crate::sandbox::enable_seccomp(cfg.seccomp);
    crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Control);
    // Before any socket listens: a SIGTERM sent once a socket appears stops the daemon cleanly.
    shutdown_on_signals()?;
    crate::device::allow_unsealed_memory(cfg.allow_unsealed_memory);
    crate::disk::set_default_engine(cfg.io_engine);
    if let Some(wait) = cfg.incoming_timeout {
        crate::daemon::live::set_acquire_wait(wait);
    }
    crate::ops::bisect::configure(cfg.tee_journal, cfg.auto_bisect);
    loop {
        let ended = match &cfg.store {
            Some((dir, disks)) => run_serve_store(dir, disks, &cfg)?,
            None => run_image(&cfg)?,
        };
        match ended {
            Ended::Stopped => return Ok(()),
            Ended::Reconnect(exec) => return Err(crate::face::upgrade::exec_in_place(&exec)),
            Ended::Handover(t, sockets) => match crate::face::upgrade::hand_over(t, &sockets) {
                Ok(()) => return Ok(()),
                Err(why) => {
                    // Serve again, on the same sockets: nothing was accepted meanwhile.
                    warn!("upgrade failed: {why}; serving again");
                    cfg.activated = crate::face::upgrade::activation(
                        sockets,
                        &mut cfg.control,
                        &mut cfg.listen,
                        cfg.store.is_some(),
                    );
                    crate::server::keep_socket_files(false);
                    crate::face::upgrade::restore_notify_env();
                }
            },
        }
    }
}

/// Serves the image of `cfg` until a signal or an upgrade.
fn run_image(cfg: &ServeConfig) -> Result<Ended, CliError> {
    confine(cfg, Vec::new())?;
    let created = cfg.create_size.is_some() && std::fs::symlink_metadata(&cfg.image).is_err();
    let layout = RawLayout::open(
        &cfg.image,
        RawOptions {
            create_size: cfg.create_size,
            read_only: cfg.read_only,
            cache: cfg.cache,
        },
    )
    .map_err(CliError::Image)?;
    info!(
        "image {}: cache mode {}, I/O engine {:?}",
        cfg.image.display(),
        layout.cache(),
        cfg.io_engine
    );
    let image = cfg.image.clone();
    let guests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let result = serve_image(layout, cfg.clone(), guests.clone());
    // An image this run created that no guest ever saw holds only zeroes: a failure to get it
    // served leaves no file behind (a retry creates it again).
    if result.is_err() && created && guests.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        match std::fs::remove_file(&image) {
            Ok(()) => info!("removed {}, created by this run", image.display()),
            Err(e) => log::warn!("cannot remove {}: {e}", image.display()),
        }
    }
    result
}

/// With `--landlock`, confines this thread and those it starts (every disk's, the control
/// socket's, ...) to the store, the sockets' directories (`sockets`: the disks'), the export
/// and import directories and the image's directory; read-only, the config file, /proc and
/// the user and group databases.
fn confine(cfg: &ServeConfig, rw: Vec<PathBuf>) -> Result<(), CliError> {
    if !cfg.landlock {
        return Ok(());
    }
    let mut paths = crate::sandbox::Paths::default();
    paths.rw.extend(rw);
    match &cfg.store {
        Some((dir, _)) => paths.rw.push(dir.clone()),
        None => {
            paths.rw.push(dir_of(&cfg.image));
            if let ListenOn::Path(p) = &cfg.listen {
                paths.rw.push(dir_of(p));
            }
        }
    }
    if let Some((p, _)) = &cfg.control {
        paths.rw.push(dir_of(p));
    }
    paths.rw.extend(cfg.export_dir.iter().cloned());
    paths.rw.extend(cfg.import_dir.iter().cloned());
    if let Some(src) = &cfg.config_source {
        paths.ro.push(src.file.clone());
    }
    paths.ro.push(PathBuf::from("/proc"));
    paths.ro.push(PathBuf::from("/dev/urandom"));
    // Re-reading the config (SIGHUP) looks `user`, `group`, `socket-group` up again: the
    // user and group databases through NSS's files.
    for f in ["/etc/nsswitch.conf", "/etc/passwd", "/etc/group"] {
        paths.ro.push(PathBuf::from(f));
    }
    crate::sandbox::landlock(&paths).map_err(CliError::Invalid)
}

/// The directory `p` is in (`.` for a bare name).
fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Refuses, before anything is created, socket paths `serve` could not listen on: each disk's
/// socket (`--socket`, `--disk NAME=SOCKET`) and the control socket must be short enough for
/// a Unix socket address, in an existing directory this process may create files in, not
/// another kind of file, not served by a running process, and not shared by two disks.
fn check_sockets(cfg: &ServeConfig) -> Result<(), CliError> {
    let mut sockets: Vec<(String, &Path)> = Vec::new();
    match &cfg.store {
        Some((_, disks)) => {
            sockets.extend(
                disks
                    .iter()
                    .filter(|d| !cfg.activated.disks.contains_key(&d.name))
                    .map(|d| (format!("disk {}", d.name), &*d.socket)),
            );
        }
        None => {
            if let ListenOn::Path(p) = &cfg.listen {
                sockets.push(("the disk's --socket".to_string(), p));
            }
        }
    }
    if let (Some((p, _)), None) = (&cfg.control, &cfg.activated.control) {
        sockets.push(("--control".to_string(), p));
    }
    let mut seen: Vec<(PathBuf, &str)> = Vec::new();
    for (who, path) in &sockets {
        check_socket_path(who, path)?;
        let key = same_file_key(path);
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(CliError::Invalid(format!(
                "{first} and {who} are both given the socket {}: every disk and the control \
                 socket need a socket path of their own",
                path.display()
            )));
        }
        seen.push((key, who));
    }
    Ok(())
}

/// `path` with its directory resolved (symbolic links, `..`), so two spellings of one socket
/// compare equal.
fn same_file_key(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => path.to_path_buf(),
    }
}

/// One socket path of [`check_sockets`]; `who` names its use in the message.
fn check_socket_path(who: &str, path: &Path) -> Result<(), CliError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let bad = |why: String| {
        CliError::Invalid(format!(
            "cannot listen on {} ({who}): {why}",
            path.display()
        ))
    };
    // sockaddr_un holds 108 bytes, the terminating NUL included.
    const SUN_PATH: usize = 108;
    let len = path.as_os_str().as_bytes().len();
    if len >= SUN_PATH {
        return Err(bad(format!(
            "the path is {len} bytes; a Unix socket path is at most {} (use a shorter or \
             relative path)",
            SUN_PATH - 1
        )));
    }
    if path.file_name().is_none() {
        return Err(bad("the path names no file".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(format!("directory {} does not exist", dir.display())))
        }
        Err(e) => return Err(bad(format!("cannot look at {}: {e}", dir.display()))),
    }
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| bad("the path holds a NUL byte".into()))?;
    // SAFETY: `c_dir` is a NUL-terminated string that outlives the call; access only reads it.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(bad(format!(
            "cannot create files in directory {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bad("a file that is not a socket is in the way".into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(bad("another process is already serving on it".into()));
        }
    }
    Ok(())
}

/// The rest of [`run_serve`] for a raw image, once it is open; `guests` counts the guests that
/// connected.
fn serve_image(
    layout: RawLayout,
    cfg: ServeConfig,
    guests: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Ended, CliError> {
    let actual = layout.capacity().0 * SECTOR_SIZE;
    if let Some(wanted) = cfg.create_size {
        if wanted != actual {
            return Err(CliError::SizeMismatch {
                path: cfg.image,
                actual,
                wanted,
            });
        }
    }
    let name = cfg.name.clone().unwrap_or_else(|| {
        cfg.image
            .file_name()
            .map_or_else(|| "image".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let socket = match (&cfg.listen, &cfg.activated.image_socket) {
        (ListenOn::Path(p), _) => p.clone(),
        // Handed over by the daemon this one replaced: its file is this daemon's.
        (ListenOn::Fd(_), Some(p)) => p.clone(),
        (ListenOn::Fd(fd), None) => PathBuf::from(format!("fd:{fd}")),
    };
    let events = Arc::new(EventHub::default());
    let live = LiveDisk::open_image(
        &name,
        &cfg.image,
        Arc::new(layout),
        &socket,
        cfg.read_only,
        &cfg.serial,
        events.clone(),
    )?;
    let listener = server::listen_with(&cfg.listen, &cfg.socket_perms)?;
    info!(
        "serving {} ({} bytes{}) on {} with {} queue(s), serial {:?}",
        cfg.image.display(),
        actual,
        if cfg.read_only { ", read-only" } else { "" },
        match &cfg.listen {
            ListenOn::Path(p) => p.display().to_string(),
            ListenOn::Fd(fd) => format!("inherited fd {fd}"),
        },
        cfg.queues,
        cfg.serial
    );
    if let ListenOn::Path(p) = &cfg.listen {
        println!(
            "dovetail: attach a VM with:\n{}",
            qemu_command_line(&name, p, cfg.queues)
        );
    }
    let r = run_live(vec![(live.clone(), listener)], events, None, &cfg, None);
    guests.store(
        live.guests.load(std::sync::atomic::Ordering::Relaxed),
        std::sync::atomic::Ordering::Relaxed,
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_ids_differ_per_disk_and_are_ones_qemu_takes() {
        assert_eq!(qemu_id("vm1"), "dovetail-vm1");
        assert_eq!(qemu_id("my disk.img"), "dovetail-my_disk.img");
        assert_eq!(qemu_id("a,b=c"), "dovetail-a_b_c");
        let line = qemu_command_line("vm1", Path::new("/x/vm1.sock"), 2);
        assert!(
            line.contains("-chardev socket,id=dovetail-vm1,path=/x/vm1.sock"),
            "{line}"
        );
        assert!(line.contains("chardev=dovetail-vm1,num-queues=2"), "{line}");
        assert!(!line.contains("dovetail0"), "{line}");
    }
}
