//! A disk's life cycle while the daemon runs: `disk-create`, `attach`, `detach`,
//! `disk-delete` (docs/control.md). Every change of what is served is committed to the store's
//! catalog (the disk's attachment record, docs/format.md) before it takes effect, so a daemon
//! killed at any moment restarts (`serve --store DIR`) serving the disks the catalog says.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dovetail_store::{AttachRec, StoreError};
use log::{info, warn};
use serde_json::{json, Value};

use super::{Daemon, StoreDisks};
use crate::daemon::live::LiveDisk;
use crate::daemon::proto::{AttachArgs, CommandError, ErrorCode};

/// How long `detach` waits for a guest that is disconnecting to be gone before it refuses.
pub const GUEST_LEAVING: std::time::Duration = std::time::Duration::from_secs(1);

/// The layout `disk-create` gives a disk when none is named.
pub const DEFAULT_LAYOUT: &str = "parallax-v1";

/// A store error as a control error with the code that says what kind of mistake it is.
fn store_error(e: StoreError) -> CommandError {
    let code = match &e {
        StoreError::NoSuchDisk(_) => ErrorCode::UnknownDisk,
        StoreError::DiskExists(_) => ErrorCode::Conflict,
        StoreError::Invalid(_) | StoreError::ReadOnly => ErrorCode::Invalid,
        _ => ErrorCode::Failed,
    };
    CommandError::new(code, dovetail_layout::error_chain(&e))
}

fn shown(name: &str) -> String {
    dovetail_store::names::shown(name)
}

/// Starts and stops the serve loops of disks while the daemon runs (the serve command
/// provides it).
pub trait Serving: Send + Sync {
    /// Serves `live`: on `listener` (a listening Unix socket handed over) if given, else on a
    /// socket bound at `live.socket`; its serve loop runs in a thread of its own.
    fn start(&self, live: Arc<LiveDisk>, listener: Option<OwnedFd>) -> Result<(), CommandError>;
    /// Stops disk `name`'s serve loop and waits for it: a connected guest is disconnected once
    /// its requests in flight completed, then the disk is flushed and its socket removed.
    fn stop(&self, name: &str) -> Result<(), CommandError>;
}

/// Why `path` cannot be a new disk socket, if it cannot: not absolute, too long, in a
/// directory that does not exist, or taken by a file that is not a socket or by a socket
/// something listens on. A socket file nobody listens on (left by a crash) is replaced.
pub fn socket_problem(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let len = path.as_os_str().as_bytes().len();
    if !path.is_absolute() {
        return Some("the path is not absolute (the daemon does not know your directory)".into());
    }
    if len > dovetail_store::format::MAX_ATTACH_SOCKET {
        return Some(format!(
            "the path is {len} bytes; a Unix socket path is at most {}",
            dovetail_store::format::MAX_ATTACH_SOCKET
        ));
    }
    if path.as_os_str().as_bytes().contains(&0) {
        return Some("the path holds a NUL byte".into());
    }
    let dir = path.parent()?;
    if path.file_name().is_none() {
        return Some("the path names no file".into());
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Some(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!("directory {} does not exist", dir.display()))
        }
        Err(e) => return Some(format!("cannot look at {}: {e}", dir.display())),
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Some("a file that is not a socket is in the way".into());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Some("another process is already serving on it".into());
        }
    }
    None
}

/// The path a listening Unix socket is bound at, or why it cannot serve a disk.
fn listening_path(fd: &OwnedFd) -> Result<PathBuf, String> {
    use std::os::unix::ffi::OsStrExt;
    let raw = fd.as_raw_fd();
    let opt = |o: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `l` bytes into `v`, a live c_int; a bad fd only
        // makes it fail.
        let rc = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                o,
                (&mut v as *mut libc::c_int).cast(),
                &mut l,
            )
        };
        if rc == 0 {
            Ok(v)
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    };
    if opt(libc::SO_DOMAIN).map_err(|e| format!("not a socket ({e})"))? != libc::AF_UNIX {
        return Err("not a Unix socket".into());
    }
    if opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err("not a listening socket".into());
    }
    // SAFETY: an all-zero sockaddr_un is a valid value of the plain C struct.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, which is that large.
    let rc =
        unsafe { libc::getsockname(raw, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if rc != 0 {
        return Err(format!(
            "cannot read its address: {}",
            std::io::Error::last_os_error()
        ));
    }
    let offset = std::mem::size_of::<libc::sa_family_t>();
    let n = (len as usize).saturating_sub(offset);
    let bytes: Vec<u8> = addr.sun_path[..n.min(addr.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    if bytes.is_empty() {
        return Err(
            "it is bound to no path (unnamed or abstract): the catalog records a path, so a \
             restarted daemon can listen there again"
                .into(),
        );
    }
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
}

impl Daemon {
    /// How this daemon opens its store's disks, or why it cannot change them while it runs.
    fn store_for_lifecycle(&self, what: &str) -> Result<StoreDisks, CommandError> {
        let reopener = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        match &reopener.store {
            Some(sd) => Ok(sd.clone()),
            None => Err(CommandError::new(
                ErrorCode::NotAvailable,
                format!("{what}: this daemon serves an image, not a store (`serve --store DIR`)"),
            )),
        }
    }

    fn writable_store(&self, what: &str) -> Result<StoreDisks, CommandError> {
        let sd = self.store_for_lifecycle(what)?;
        if sd.read_only {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!("{what}: this daemon serves its store read-only (`serve --read-only`)"),
            ));
        }
        Ok(sd)
    }

    /// Whether disk `name` is served or failed to open (attached, in either case).
    fn attached_here(&self, name: &str) -> Option<PathBuf> {
        if let Some(d) = self.served().into_iter().find(|d| d.name == name) {
            return Some(d.socket.clone());
        }
        self.failed_disk(name).map(|f| f.socket)
    }

    /// `disk-create`: adds disk `name` of `size` bytes to the store (committed before the
    /// reply). It is not served until it is attached.
    pub fn disk_create(
        &self,
        name: &str,
        size: u64,
        layout: Option<&str>,
    ) -> Result<Value, CommandError> {
        let sd = self.writable_store("disk-create")?;
        let layout = layout.unwrap_or(DEFAULT_LAYOUT);
        if !crate::ops::STORE_LAYOUTS.contains(&layout) {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!(
                    "disk-create: layout {} is not one a store disk can have ({})",
                    shown(layout),
                    crate::ops::STORE_LAYOUTS.join(", ")
                ),
            ));
        }
        // Formatted in the catalog commit that creates it: one sync, and its attach has no
        // format to commit.
        // (A size the store refuses gets its error from the store: no root to make.)
        let root = if size > 0 && size % dovetail_store::format::DISK_ALIGN == 0 {
            dovetail_layout::parallax::Parallax::initial_root(
                layout,
                dovetail_layout::Sectors(size / dovetail_layout::SECTOR_SIZE),
                sd.store.tiers().len(),
            )
            .map_err(|e| {
                CommandError::new(
                    ErrorCode::Invalid,
                    format!("disk-create: {}", dovetail_layout::error_chain(&e)),
                )
            })?
        } else {
            Vec::new()
        };
        let _serial = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        let key = sd
            .store
            .create_disk_with_root(name, size, layout, &root)
            .map_err(store_error)?;
        dovetail_store::failpoint::hit("disk-create-done");
        let message = format!("created disk {name} ({size} bytes, {layout}): trusted {key}");
        info!("{message}");
        self.events
            .publish(name, "disk-created", "daemon", message.clone(), None, None);
        Ok(
            json!({"message": message, "disk": name, "size": size, "layout": layout, "version": key.0}),
        )
    }

    /// `attach`: records disk `name`'s attachment in the catalog, then opens the disk and
    /// serves it on the socket (`listener`, a listening socket handed over, or one bound at
    /// `a.socket`). If it cannot be served, the attachment is removed again.
    pub fn attach_disk(
        &self,
        a: &AttachArgs,
        listener: Option<OwnedFd>,
    ) -> Result<Value, CommandError> {
        let sd = self.writable_store("attach")?;
        let name = a.disk.as_str();
        let invalid = |m: String| CommandError::new(ErrorCode::Invalid, format!("attach: {m}"));
        let socket = match (&listener, &a.socket) {
            (Some(fd), given) => {
                let bound = listening_path(fd)
                    .map_err(|m| invalid(format!("the socket passed with the request: {m}")))?;
                if given.as_ref().is_some_and(|g| g != &bound) {
                    return Err(invalid(format!(
                        "the socket passed is bound at {}, not at the socket given, {}",
                        bound.display(),
                        given.as_deref().unwrap_or(Path::new("")).display()
                    )));
                }
                bound
            }
            (None, Some(p)) => p.clone(),
            (None, None) => {
                return Err(if a.fd {
                    invalid("the request says a socket comes with it (fd), but none came".into())
                } else {
                    invalid(
                        "give the socket to serve the disk on (socket), or pass one (fd)".into(),
                    )
                })
            }
        };
        let rec = AttachRec {
            socket: socket.clone(),
            queues: a.queues.unwrap_or(1),
            read_only: a.read_only,
            serial: a.serial.clone().unwrap_or_default(),
        };
        let problems = dovetail_store::format::attach_problems(&rec);
        if let Some(p) = problems.first() {
            return Err(invalid(format!(
                "the attachment of disk {}: {p}",
                shown(name)
            )));
        }
        let Some(serving) = self.serving() else {
            return Err(CommandError::new(
                ErrorCode::NotAvailable,
                "attach: this daemon cannot start serving disks while it runs",
            ));
        };
        let _serial = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        let info = sd.store.disk(name).map_err(store_error)?;
        if let Some(on) = self.attached_here(name) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "attach: disk {} is attached already (on {}); detach it first",
                    shown(name),
                    on.display()
                ),
            ));
        }
        if let Some(other) = self.served().into_iter().find(|d| d.socket == socket) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "attach: disk {} is served on {} already: a socket serves one disk",
                    shown(&other.name),
                    socket.display()
                ),
            ));
        }
        if listener.is_none() {
            if let Some(why) = socket_problem(&socket) {
                return Err(invalid(format!(
                    "cannot listen on {}: {why}",
                    socket.display()
                )));
            }
        }
        if a.incoming && !sd.store.is_shared() {
            return Err(invalid(
                "--incoming needs a store shared with other daemons (`serve --shared-store`)"
                    .into(),
            ));
        }
        // An incoming attachment is not recorded: the disk's record is its owner's to change
        // (the source's, until a guest starts here), and a restarted daemon must not serve a
        // disk it has no guest for yet (attach it again).
        let held = if a.incoming {
            false
        } else {
            // On a shared store, the disk's lock before its record changes.
            let held = super::takeover::hold(&sd.store, name)?;
            // The catalog first: from here a restarted daemon serves the disk.
            if let Err(e) = sd.store.set_attachment(name, Some(rec.clone())) {
                super::takeover::unhold(&sd.store, name, held);
                return Err(store_error(e));
            }
            dovetail_store::failpoint::hit("attach-recorded");
            held
        };
        let open = if a.incoming {
            LiveDisk::open_store_incoming
        } else {
            LiveDisk::open_store_serial
        };
        let started = open(
            &sd.store,
            name,
            &socket,
            sd.read_only || rec.read_only,
            Some(&rec.serial),
            self.events.clone(),
            sd.mover_interval,
        )
        .map_err(CommandError::from)
        .and_then(|live| {
            live.queues.store(rec.queues, Ordering::Relaxed);
            match serving.start(live.clone(), listener) {
                Ok(()) => Ok(live),
                Err(e) => {
                    live.close();
                    Err(e)
                }
            }
        });
        let live = match started {
            Ok(live) => live,
            Err(e) if a.incoming => {
                return Err(CommandError::new(
                    e.code,
                    format!("attach: disk {}: {}", shown(name), e.message),
                ));
            }
            Err(e) => {
                if let Err(undo) = sd.store.set_attachment(name, None) {
                    warn!(
                        "disk {name}: could not remove the attachment of a disk that could not \
                         be served: {}; a restarted daemon will try to serve it",
                        dovetail_layout::error_chain(&undo)
                    );
                }
                super::takeover::unhold(&sd.store, name, held);
                return Err(CommandError::new(
                    e.code,
                    format!("attach: disk {}: {}", shown(name), e.message),
                ));
            }
        };
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(live);
        let message = format!(
            "attached: disk {name} ({} bytes) served on {} with {} queue(s){}{}",
            info.size,
            socket.display(),
            rec.queues,
            if rec.read_only { ", read-only" } else { "" },
            if a.incoming {
                " before it is owned (incoming, not recorded in the catalog): taken from its \
                 owner when a guest starts its queues"
            } else {
                ""
            }
        );
        info!("{message}");
        self.events
            .publish(name, "disk-attached", "daemon", message.clone(), None, None);
        Ok(json!({
            "message": message,
            "socket": socket,
            "qemu": crate::daemon::vm::qemu_command_line(name, &socket, rec.queues),
            "libvirt": crate::daemon::vm::libvirt_disk_xml(name, &socket, "vdb", rec.queues),
        }))
    }

    /// `detach`: removes disk `name`'s attachment from the catalog, then stops serving it.
    /// Refused while a guest is connected (unless `force`: its requests in flight complete,
    /// the disk is flushed and the connection closed) and while the disk has a candidate.
    pub fn detach_disk(&self, name: &str, force: bool) -> Result<Value, CommandError> {
        let sd = self.writable_store("detach")?;
        let serving = self.serving();
        let _serial = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = self.failed_disk(name) {
            sd.store.set_attachment(name, None).map_err(store_error)?;
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|x| x.name != name);
            let message = format!(
                "detached: disk {name}, which could not be opened, is no longer to be served on {}",
                f.socket.display()
            );
            info!("{message}");
            self.events
                .publish(name, "disk-detached", "daemon", message.clone(), None, None);
            return Ok(json!({ "message": message }));
        }
        let d = match self.served().into_iter().find(|d| d.name == name) {
            Some(d) => d,
            None => {
                // Known to the store but not served here, or not known at all.
                return Err(match sd.store.disk(name) {
                    Ok(_) => CommandError::new(
                        ErrorCode::Conflict,
                        format!("detach: disk {} is not attached", shown(name)),
                    ),
                    Err(e) => store_error(e),
                });
            }
        };
        let status = d.status();
        if let Some(c) = &status.candidate {
            let migrating = status
                .migration
                .as_ref()
                .is_some_and(|m| m.copy_out.is_some() || m.mode.is_some());
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "detach: disk {} is {} (candidate version {}, {}): `untee` it or `promote` \
                     the candidate first",
                    shown(name),
                    if migrating { "migrating" } else { "teed" },
                    c.version,
                    c.layout
                ),
            ));
        }
        // A guest that just left may not be seen gone yet: give it a moment.
        let deadline = std::time::Instant::now() + GUEST_LEAVING;
        while !force && d.connected.load(Ordering::Relaxed) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let status = d.status();
        if status.guest_connected && !force {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "detach: a guest is connected to disk {}; shut the VM down (or detach the \
                     disk in it) first, or force it (its requests in flight complete, the disk \
                     is flushed, the connection is closed)",
                    shown(name)
                ),
            ));
        }
        let Some(serving) = serving else {
            return Err(CommandError::new(
                ErrorCode::NotAvailable,
                "detach: this daemon cannot stop serving disks while it runs",
            ));
        };
        // The catalog first: from here a restarted daemon does not serve the disk. Through the
        // disk's own store handle, the one holding its lock on a shared store. A disk of a
        // shared store this daemon does not own (attached `--incoming`, its guest not started)
        // has no record of this daemon's: its owner's stays.
        let own = d.store().unwrap_or(&sd.store);
        if !own.is_shared() || own.owns_disk(name) {
            own.set_attachment(name, None).map_err(store_error)?;
        }
        dovetail_store::failpoint::hit("detach-recorded");
        let stopped = serving.stop(name);
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|x| !Arc::ptr_eq(x, &d));
        d.close();
        let message = format!(
            "detached: disk {name} is no longer served on {}{}",
            d.socket.display(),
            if status.guest_connected {
                " (its guest was disconnected after its requests in flight completed)"
            } else {
                ""
            }
        );
        if let Err(e) = stopped {
            return Err(CommandError::new(
                e.code,
                format!("detach: disk {}: {}", shown(name), e.message),
            ));
        }
        info!("{message}");
        self.events
            .publish(name, "disk-detached", "daemon", message.clone(), None, None);
        Ok(json!({ "message": message }))
    }

    /// `import`: writes the raw image `from` (a plain name in the `--import-dir` directory,
    /// opened without following a symlink) into disk `name`, which must not be attached
    /// (created at the image's size if it does not exist).
    pub fn import_disk(&self, name: &str, from: &Path) -> Result<Value, CommandError> {
        let sd = self.writable_store("import")?;
        let Some(dir) = &self.security.import_dir else {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                "import: live import is off: the daemon reads images only from the directory \
                 `serve --import-dir DIR` names (or stop it and use `dovetail disk import`)",
            ));
        };
        let file_name = dir.name_of(from).map_err(|_| {
            CommandError::new(
                ErrorCode::Invalid,
                format!(
                    "import: \"from\" must be a plain file name (no '/', not . or ..) in the \
                     import directory {}, not {}",
                    dir.path.display(),
                    from.display()
                ),
            )
        })?;
        let path = dir.path.join(file_name);
        let _serial = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        dovetail_store::names::check_name(dovetail_store::names::NameKind::Disk, name)
            .map_err(|e| CommandError::new(ErrorCode::Invalid, format!("import: {e}")))?;
        let attached = match sd.store.attachment(name) {
            Ok(a) => a.map(|a| a.socket),
            Err(StoreError::NoSuchDisk(_)) => None,
            Err(e) => return Err(store_error(e)),
        };
        if let Some(on) = self.attached_here(name).or(attached) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "import: disk {} is attached (on {}); detach it first (an import writes the \
                     whole disk under its guest)",
                    shown(name),
                    on.display()
                ),
            ));
        }
        let file = dir.open_file(file_name).map_err(|e| {
            let why = match e.raw_os_error() {
                Some(libc::ELOOP) => "it is a symlink".to_string(),
                Some(libc::ENOENT) => "it does not exist".to_string(),
                _ => e.to_string(),
            };
            CommandError::new(
                ErrorCode::Invalid,
                format!("import: cannot read {}: {why}", path.display()),
            )
        })?;
        let copied = crate::ops::diskio::import_file(&sd.store, name, &file, &path, false)
            .map_err(|e| {
                let c = CommandError::from(e);
                CommandError::new(c.code, format!("import: {}", c.message))
            })?;
        let message = format!(
            "imported {} into disk {name} ({} bytes, {} of data)",
            path.display(),
            copied.bytes,
            copied.data
        );
        info!("{message}");
        self.events
            .publish(name, "disk-imported", "daemon", message.clone(), None, None);
        Ok(json!({"message": message, "bytes": copied.bytes, "data_bytes": copied.data}))
    }

    /// `disk-delete`: deletes disk `name` and its versions from the store. Refused while it is
    /// attached, teed or migrating.
    pub fn disk_delete(&self, name: &str) -> Result<Value, CommandError> {
        let sd = self.writable_store("disk-delete")?;
        let _serial = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
        let info = sd.store.disk(name).map_err(store_error)?;
        let attached = sd.store.attachment(name).map_err(store_error)?;
        if let Some(on) = self.attached_here(name).or(attached.map(|a| a.socket)) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk-delete: disk {} is attached (on {}); detach it first",
                    shown(name),
                    on.display()
                ),
            ));
        }
        if let Some(c) = info.candidate {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk-delete: disk {} is teed or migrating (candidate {c}); drop the \
                     candidate first (`dovetail disk untee` offline, or attach it and `untee`)",
                    shown(name)
                ),
            ));
        }
        let held = super::takeover::hold(&sd.store, name)?;
        let freed = sd.store.delete_disk(name).map_err(store_error);
        super::takeover::unhold(&sd.store, name, held);
        let freed = freed?;
        let message = format!("deleted disk {name} ({freed} extents freed)");
        info!("{message}");
        self.events
            .publish(name, "disk-deleted", "daemon", message.clone(), None, None);
        Ok(json!({ "message": message, "extents_freed": freed }))
    }
}
