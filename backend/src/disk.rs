//! A `Disk` is what one guest sees: a layout plus the per-disk settings the device exposes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dovetail_layout::{BlockLayout, Sectors};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use crate::metrics::RequestMetrics;

/// Length of the virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// One guest disk: the layout serving it, whether it is read-only, its serial, and the metrics
/// of the requests its guest makes.
#[derive(Debug)]
pub struct Disk {
    layout: Arc<dyn BlockLayout>,
    /// Sectors the guest may address: the layout's capacity when the disk was made, raised by
    /// [`Disk::grow`] (read by every request's range check and by the config space).
    capacity: AtomicU64,
    /// The connected frontend's backend request channel, if it set one up
    /// (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`): [`Disk::grow`] tells it the config changed.
    frontend: Mutex<Option<Frontend>>,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    metrics: Arc<RequestMetrics>,
    /// What log lines call the disk (`with_name`; default "disk").
    name: String,
    /// How the queue workers carry out reads and writes (`with_engine`).
    engine: Engine,
    /// Why the disk stopped serving data (repeated panics of its requests), once it did.
    failed: std::sync::OnceLock<String>,
    /// Who hears of panics, failure and failed flushes (the daemon: events, recovery).
    notify: std::sync::OnceLock<Watcher>,
    /// Who is told when a guest's queues start and stop (the daemon: the disk's ownership
    /// follows its VM on a shared store, `daemon::live::follow`).
    rings: std::sync::OnceLock<Hook>,
}

/// What a guest's queues starting and stopping mean to whoever serves the disk
/// ([`Disk::set_ring_hook`]): a disk of a store shared by several daemons is owned by the one
/// whose guest runs (a VM live-migrated between two daemons takes its disk along).
pub trait RingHook: Send + Sync {
    /// A queue of the connected guest is about to run its first requests: returns once the
    /// disk can serve them, or why it cannot (they are then answered IOERR). Called on the
    /// queue's worker thread; may wait (bounded) for another daemon to let the disk go.
    fn rings_started(&self) -> Result<(), String>;
    /// Every queue that ran has stopped (the frontend read their bases, GET_VRING_BASE: every
    /// request taken has completed); `migrating`: dirty logging was on (`VHOST_F_LOG_ALL`), so
    /// this is the end of a live migration and the VM goes on elsewhere.
    fn rings_stopped(&self, migrating: bool);
}

/// A [`RingHook`], which has no `Debug` of its own.
struct Hook(Arc<dyn RingHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingHook")
    }
}

/// The frontend's backend request channel (vhost's `Backend` has no `Debug`).
#[derive(Clone)]
struct Frontend(Backend);

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Frontend")
    }
}

/// A [`Notify`], which has no `Debug` of its own.
struct Watcher(Notify);

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

/// What a [`Disk`] tells whoever watches it ([`Disk::set_notify`]). Called on the queue worker
/// thread that saw it: it must not wait for the disk's I/O (hand such work to a thread).
pub type Notify = Box<dyn Fn(Notice) + Send + Sync>;

/// Something a queue worker saw that the daemon reports or acts on.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A request panicked (`what` on `queue`, the panic's message); the `count`th.
    Panicked {
        queue: usize,
        what: String,
        cause: String,
        count: u64,
    },
    /// The disk was marked failed (the reason): it serves no data any more.
    Failed(String),
    /// A FLUSH failed (the error): the daemon checks whether writes may have been lost.
    FlushFailed(String),
}

/// Requests of one disk that may panic (each answered IOERR, counted and logged) before the
/// disk is marked failed: the third panic fails it. A panic is a bug, not a storage error; one
/// may be a rare path, repeated ones say that the version's state can no longer be trusted, so
/// the disk stops serving data (every read, write, flush, discard and write-zeroes gets IOERR)
/// rather than go on from a state a panic may have left half changed. Other disks carry on; a
/// restart of the daemon serves it again.
pub const PANICS_BEFORE_FAILED: u64 = 3;

/// How a disk's queue workers carry out reads, writes and flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// io_uring straight to the file of a layout that offers one (raw), many requests in
    /// flight per queue; a thread pool per queue for every other layout and where the kernel
    /// has no io_uring.
    #[default]
    Auto,
    /// A thread pool per queue running the layout's synchronous calls, whatever the layout.
    Threads,
    /// One request at a time per queue, in order, on the queue's worker thread.
    Sync,
}

/// The engine of disks made from now on (`serve --io-engine`): 0 auto, 1 threads, 2 sync.
static DEFAULT_ENGINE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the engine every [`Disk`] made from now on starts with.
pub fn set_default_engine(engine: Engine) {
    let v = match engine {
        Engine::Auto => 0,
        Engine::Threads => 1,
        Engine::Sync => 2,
    };
    DEFAULT_ENGINE.store(v, std::sync::atomic::Ordering::Relaxed);
}

fn default_engine() -> Engine {
    match DEFAULT_ENGINE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Engine::Threads,
        2 => Engine::Sync,
        _ => Engine::Auto,
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "auto" => Ok(Engine::Auto),
            "threads" => Ok(Engine::Threads),
            "sync" => Ok(Engine::Sync),
            _ => Err(format!(
                "unknown I/O engine {s:?}: expected auto (io_uring, else threads), threads or sync"
            )),
        }
    }
}

/// A serial longer than `VIRTIO_BLK_ID_BYTES`.
#[derive(Debug, thiserror::Error)]
#[error("serial {0:?} is {1} bytes; at most {SERIAL_LEN} fit in a virtio-blk ID")]
pub struct SerialTooLong(String, usize);

impl SerialTooLong {
    pub(crate) fn new(serial: &str) -> SerialTooLong {
        SerialTooLong(serial.to_string(), serial.len())
    }
}

impl Disk {
    /// Wraps `layout`. The serial is what GET_ID returns, zero-padded to 20 bytes.
    pub fn new(
        layout: Arc<dyn BlockLayout>,
        read_only: bool,
        serial: &str,
    ) -> Result<Disk, SerialTooLong> {
        let bytes = serial.as_bytes();
        if bytes.len() > SERIAL_LEN {
            return Err(SerialTooLong::new(serial));
        }
        let mut id = [0u8; SERIAL_LEN];
        id[..bytes.len()].copy_from_slice(bytes);
        Ok(Disk {
            capacity: AtomicU64::new(layout.capacity().0),
            frontend: Mutex::new(None),
            layout,
            read_only,
            serial: id,
            metrics: Arc::new(RequestMetrics::new()),
            name: "disk".to_string(),
            engine: default_engine(),
            failed: std::sync::OnceLock::new(),
            notify: std::sync::OnceLock::new(),
            rings: std::sync::OnceLock::new(),
        })
    }

    pub fn layout(&self) -> &dyn BlockLayout {
        &*self.layout
    }

    /// Sets who is told of the guest's queues starting and stopping (once; later calls are
    /// ignored).
    pub fn set_ring_hook(&self, hook: Arc<dyn RingHook>) {
        let _ = self.rings.set(Hook(hook));
    }

    /// Whether a [`RingHook`] was set (a queue's start may then wait).
    pub fn has_ring_hook(&self) -> bool {
        self.rings.get().is_some()
    }

    /// A guest's queue starts: what the hook says (no hook: ready).
    pub fn rings_started(&self) -> Result<(), String> {
        self.rings.get().map_or(Ok(()), |h| h.0.rings_started())
    }

    /// Every running queue of the guest stopped; `migrating`: at the end of a live migration.
    pub fn rings_stopped(&self, migrating: bool) {
        if let Some(h) = self.rings.get() {
            h.0.rings_stopped(migrating);
        }
    }

    /// The layout as a shared handle, for work handed to another thread.
    pub fn layout_arc(&self) -> &Arc<dyn BlockLayout> {
        &self.layout
    }

    pub fn capacity(&self) -> Sectors {
        Sectors(self.capacity.load(Ordering::Acquire))
    }

    /// Raises the capacity the guest may address to `capacity` (the layout must already hold
    /// it; a smaller value is ignored), then tells the connected frontend, if it set up a
    /// backend request channel, that the config space changed
    /// (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`: QEMU re-reads it and the guest sees the new
    /// capacity). Returns whether a frontend was told; a failure to tell it is returned as its
    /// message (the capacity is raised all the same).
    pub fn grow(&self, capacity: Sectors) -> Result<bool, String> {
        self.capacity.fetch_max(capacity.0, Ordering::AcqRel);
        let frontend = self
            .frontend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match frontend {
            None => Ok(false),
            Some(f) => match f.0.handle_config_change() {
                Ok(_) => Ok(true),
                Err(e) => Err(format!(
                    "cannot tell the frontend that the config changed: {e}"
                )),
            },
        }
    }

    /// Remembers (or, with `None`, forgets) the connected frontend's backend request channel.
    pub fn set_frontend(&self, frontend: Option<Backend>) {
        *self.frontend.lock().unwrap_or_else(|p| p.into_inner()) = frontend.map(Frontend);
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// DISCARD and WRITE_ZEROES are offered only on writable disks.
    pub fn supports_discard(&self) -> bool {
        !self.read_only
    }

    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// Per-operation counts, bytes and latencies of this disk's guest requests, recorded by the
    /// queue workers. Shared, so an exporter can keep reading it.
    pub fn metrics(&self) -> &Arc<RequestMetrics> {
        &self.metrics
    }

    /// Names the disk in the serve loop's log lines ("disk vm1: guest 1 connected").
    pub fn with_name(mut self, name: &str) -> Disk {
        self.name = format!("disk {name}");
        self
    }

    /// What log lines call the disk: "disk NAME", or "disk" when it was given no name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Carries out reads and writes with `engine` (default [`Engine::Auto`]).
    pub fn with_engine(mut self, engine: Engine) -> Disk {
        self.engine = engine;
        self
    }

    /// How the queue workers carry out reads and writes.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Records into `metrics` instead of the fresh counters `new` made, so counters can outlive
    /// one `Disk` (e.g. across a reopen of the same guest disk).
    pub fn with_metrics(mut self, metrics: Arc<RequestMetrics>) -> Disk {
        self.metrics = metrics;
        self
    }

    /// Records that a request of this disk panicked (`what`: the request and where; `cause`:
    /// the panic's message): counted in `dovetail_request_panics_total`, logged, and at the
    /// [`PANICS_BEFORE_FAILED`]th the disk is marked failed. Returns the panics so far.
    pub fn request_panicked(&self, queue: usize, what: &str, cause: &str) -> u64 {
        let n = self.metrics.panicked();
        log::error!(
            "{}: queue {queue}: {what} PANICKED ({cause}); answered IOERR, the queue carries on              (panic {n} of this disk)",
            self.name
        );
        if n >= PANICS_BEFORE_FAILED {
            let reason = format!(
                "{n} requests panicked (the last: {what} on queue {queue}: {cause}); the disk                  serves no data until it is reopened"
            );
            if self.failed.set(reason.clone()).is_ok() {
                log::error!("{}: FAILED: {reason}", self.name);
                self.tell(Notice::Failed(reason));
            }
        }
        self.tell(Notice::Panicked {
            queue,
            what: what.to_string(),
            cause: cause.to_string(),
            count: n,
        });
        n
    }

    /// A FLUSH of this disk failed with `error` (told to the watcher, which may recover).
    pub fn flush_failed(&self, error: &str) {
        self.tell(Notice::FlushFailed(error.to_string()));
    }

    /// Installs the disk's watcher (once; a second is ignored).
    pub fn set_notify(&self, notify: Notify) {
        let _ = self.notify.set(Watcher(notify));
    }

    fn tell(&self, notice: Notice) {
        if let Some(w) = self.notify.get() {
            (w.0)(notice);
        }
    }

    /// Why the disk serves no data any more (`None` while it does).
    pub fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }
}

pub use dovetail_layout::panic_message;
