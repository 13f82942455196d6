//! The vhost-user-blk device: feature negotiation, config space, and one worker per queue.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use dovetail_layout::engine::{Aio, AlignedBuf, Completed, Pool, Uring};
use dovetail_layout::{error_chain, BlockLayout, DirectFile, IoBuf, IoBufs, MapGuard, MappedPiece};

use crate::disk::{Disk, Engine};
use crate::request::{
    Begun, IoKind, Pending, RequestWorker, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGS,
};

mod arm;
mod inflight;

/// Guest memory as the vhost-user library hands it to us: each region carries a dirty-page
/// bitmap that QEMU's log (`VHOST_USER_SET_LOG_BASE`) is installed into during a live
/// migration, so every write through vm-memory's accessors marks its pages (`device/dirty.rs`
/// marks the writes made around them).
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;

/// One guest memory table (the regions and their bitmaps).
pub type GuestMemTable = GuestMemoryMmap<BitmapMmapRegion>;

/// A queue as the vhost-user library hands it to us.
pub type VringRwLock = vhost_user_backend::VringRwLock<GuestMem>;

/// Largest queue size offered to the driver.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest number of queues a disk may have.
pub const MAX_QUEUES: usize = 64;
/// Segments per request the driver may use (QEMU's default queue size, 128, minus header and
/// status).
pub const SEG_MAX: u32 = 126;
/// Sectors per discard/write-zeroes alignment unit (4 KiB, the usual filesystem block).
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Whether guest memory backed by files that cannot be sealed against shrinking is accepted
/// (`serve --allow-unsealed-memory`), daemon-wide. See [`check_guest_memory`].
static ALLOW_UNSEALED_MEMORY: AtomicBool = AtomicBool::new(false);

/// Accepts (or, the default, refuses) guest memory regions whose file carries no
/// `F_SEAL_SHRINK` seal: a frontend that shrinks such a file under a mapping makes the daemon's
/// next access to it raise SIGBUS, which stops the whole process, every disk it serves.
pub fn allow_unsealed_memory(allow: bool) {
    ALLOW_UNSEALED_MEMORY.store(allow, Ordering::Relaxed);
}

/// Checks a memory table a frontend sent (SET_MEM_TABLE) before any queue uses it. A region is
/// mapped from a file the frontend passed; the daemon would die of SIGBUS on touching a page
/// past that file's end, so the file must cover the mapping (`offset + size` within its size)
/// and must be sealed against shrinking (`F_SEAL_SHRINK`, which no one can remove: QEMU's
/// `memory-backend-memfd` sets it by default, `seal=on`). A file that cannot carry seals (a
/// `memory-backend-file`, e.g. on hugetlbfs) or is not sealed is refused unless the daemon was
/// started with `--allow-unsealed-memory`, which accepts that a frontend that shrinks its memory
/// can stop the daemon. Returns the reason for a refusal.
pub fn check_guest_memory(mem: &GuestMemTable) -> Result<(), String> {
    for (i, region) in mem.iter().enumerate() {
        let (gpa, len) = (region.start_addr().0, region.len());
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let fd = fo.file().as_raw_fd();
        // SAFETY: `st` is plain data that fstat fills; `fd` is open (the region owns the file).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; fstat writes only into `st`.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(format!(
                "guest memory region {i} (guest address {gpa:#x}): fstat of its file failed: {}",
                io::Error::last_os_error()
            ));
        }
        let need = fo.start().saturating_add(len);
        if (st.st_size as u64) < need {
            return Err(format!(
                "guest memory region {i} (guest address {gpa:#x}, {len} bytes at file offset {}) \
                 lies past the end of its file ({} bytes)",
                fo.start(),
                st.st_size
            ));
        }
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
            continue;
        }
        let why = if seals < 0 {
            "a file that cannot be sealed (not a memfd or tmpfs/hugetlbfs file)"
        } else {
            "a file not sealed against shrinking (no F_SEAL_SHRINK)"
        };
        if ALLOW_UNSEALED_MEMORY.load(Ordering::Relaxed) {
            warn!(
                "guest memory region {i} (guest address {gpa:#x}, {len} bytes) is backed by {why}; \
                 accepted (--allow-unsealed-memory): a frontend that shrinks it stops the daemon"
            );
            continue;
        }
        return Err(format!(
            "guest memory region {i} (guest address {gpa:#x}, {len} bytes) is backed by {why}: a \
             frontend could shrink it and crash the daemon (SIGBUS). Use QEMU's \
             memory-backend-memfd (it seals by default, seal=on), or start the daemon with \
             --allow-unsealed-memory to accept the risk (memory-backend-file, e.g. on hugetlbfs, \
             cannot be sealed)"
        ));
    }
    Ok(())
}

/// Device settings that do not change while a guest is attached.
#[derive(Debug, Clone, Copy)]
pub struct DeviceConfig {
    pub num_queues: usize,
}

/// State of one queue's worker thread.
#[derive(Debug)]
struct Worker {
    requests: RequestWorker,
    mem: Option<GuestMem>,
    /// The driver published an avail index more than a queue size ahead of the device's: the
    /// ring cannot be trusted, so the queue serves nothing until the driver stops it
    /// (GET_VRING_BASE) and sets it up again. Latched so a broken ring costs no CPU and one
    /// log line, however often the guest kicks.
    broken: bool,
    /// The queue's I/O engines and requests in flight (every engine but `Engine::Sync`).
    engines: Engines,
    /// The queue's inflight tracker, when the frontend shares a region (`device/inflight.rs`).
    inflight: Option<vhost_user_backend::InflightQueue>,
}

/// How a pass over a queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Every available chain was handled.
    Drained,
    /// The ring is broken (see [`Worker::broken`]) or cannot be used: stop until the next kick.
    Stop,
    /// The pass ended at its budget with chains still available: run another (after a pause
    /// of the disk that was waiting for it, if any).
    More,
}

#[derive(Debug)]
struct Inner {
    disk: Arc<Disk>,
    config: DeviceConfig,
    event_idx: AtomicBool,
    /// One per queue, locked only by that queue's worker thread (and briefly by `stop_vring`
    /// and `update_memory`), so queues never contend with each other.
    workers: Vec<Mutex<Worker>>,
    /// The exit events handed to vhost-user-backend, to be closed after it is done with them.
    exit_events: Mutex<Vec<ExitEvent>>,
    /// One heartbeat per queue worker, busy while it handles a kick (the systemd watchdog).
    beats: Vec<Arc<crate::heartbeat::Beat>>,
    /// Whether the frontend acked `VHOST_F_LOG_ALL` (a live migration runs): reads mark the
    /// guest pages they fill (`dirty.rs`).
    dirty: crate::dirty::DirtyLog,
    /// The queues running (a bit per queue: kicked since they were set up), and whether the
    /// disk refused to start them ([`Disk::rings_started`]).
    running: Mutex<Running>,
    /// Signalled when [`Running::acquiring`] ends.
    acquired: std::sync::Condvar,
}

/// Which queues of a connection run ([`Inner::running`]).
#[derive(Debug, Default)]
struct Running {
    queues: u64,
    /// Why the disk cannot serve this guest's requests (they are answered IOERR), if so.
    refused: Option<String>,
    /// The first queue's start is being answered (the disk taken from its owner): the other
    /// queues' first kicks wait on [`Inner::acquired`].
    acquiring: bool,
}

/// A worker's exit-event consumer as handed to vhost-user-backend. Its `VringEpollHandler::new`
/// (0.24) takes the descriptor with `into_raw_fd` and never closes it, which leaked one
/// descriptor per queue per guest connection. The device remembers the number, with a
/// duplicate of its own to recognise it by, and [`BlkDevice::release_exit_events`] closes it
/// once the connection's worker threads are gone.
#[derive(Debug)]
struct ExitEvent {
    /// The descriptor number vhost-user-backend took over.
    raw: RawFd,
    /// The same open file, owned here: `raw` is closed only while it still refers to it.
    mine: OwnedFd,
}

/// The `VhostUserBackend` for one disk and one guest connection.
#[derive(Debug, Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

impl BlkDevice {
    /// A device for `disk` with `config.num_queues` queues (clamped to 1..=MAX_QUEUES by the CLI).
    pub fn new(disk: Arc<Disk>, config: DeviceConfig) -> BlkDevice {
        let dirty = crate::dirty::DirtyLog::new();
        let workers = (0..config.num_queues)
            .map(|_| {
                let mut requests = RequestWorker::new();
                requests.set_dirty_log(dirty.clone());
                Mutex::new(Worker {
                    requests,
                    mem: None,
                    broken: false,
                    engines: Engines::default(),
                    inflight: None,
                })
            })
            .collect();
        let beats = (0..config.num_queues)
            .map(|q| crate::heartbeat::register(format!("{} queue {q}", disk.name())))
            .collect();
        BlkDevice {
            inner: Arc::new(Inner {
                disk,
                config,
                event_idx: AtomicBool::new(false),
                workers,
                exit_events: Mutex::new(Vec::new()),
                beats,
                dirty,
                running: Mutex::new(Running::default()),
                acquired: std::sync::Condvar::new(),
            }),
        }
    }

    /// Closes the exit-event descriptors vhost-user-backend took and does not close (see
    /// [`ExitEvent`]). Call only after the `VhostUserDaemon` serving this device was dropped:
    /// its worker threads are joined and its epoll instances closed, so nothing uses them.
    /// A descriptor is closed only if it still refers to the event created for it (`kcmp`), so
    /// a library that closes them itself cannot make this close someone else's descriptor.
    pub fn release_exit_events(&self) {
        let events = std::mem::take(
            &mut *self
                .inner
                .exit_events
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for ev in events {
            if same_open_file(ev.raw, ev.mine.as_raw_fd()) {
                // SAFETY: `ev.raw` refers to the exit event this device created and handed to
                // vhost-user-backend, which gave up ownership without closing it (into_raw_fd)
                // and, its threads joined, no longer uses it; nothing else knows the number.
                unsafe { libc::close(ev.raw) };
            } else {
                debug!("exit event {} was closed already", ev.raw);
            }
        }
    }

    fn worker(&self, index: usize) -> Option<MutexGuard<'_, Worker>> {
        let m = self.inner.workers.get(index)?;
        // A poisoned lock means a worker panicked mid-request; its buffers are still usable.
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The virtio-blk config space, as the driver reads it.
    pub fn config_space(&self) -> Vec<u8> {
        let disk = &self.inner.disk;
        let mut c = vec![0u8; size_of::<virtio_blk_config>()];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(virtio_blk_config, capacity),
            &disk.capacity().0.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &512u32.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &(self.inner.config.num_queues as u16).to_le_bytes(),
        );
        if disk.supports_discard() {
            for (field, value) in [
                (
                    offset_of!(virtio_blk_config, max_discard_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_discard_seg),
                    MAX_DISCARD_SEGS as u32,
                ),
                (
                    offset_of!(virtio_blk_config, discard_sector_alignment),
                    DISCARD_ALIGNMENT_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_write_zeroes_seg),
                    MAX_DISCARD_SEGS as u32,
                ),
            ] {
                put(field, &value.to_le_bytes());
            }
            put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        }
        c
    }

    /// Drains the queue: pops every available chain, runs it, and publishes the completions.
    fn process_queue(&self, vring: &VringRwLock, worker: &mut Worker, queue: usize) -> Pass {
        if self.inner.disk.engine() != Engine::Sync {
            return self.process_queue_engine(vring, worker, queue);
        }
        if worker.broken {
            debug!("queue {queue}: kicked, but its ring is broken; ignored until it is reset");
            return Pass::Stop;
        }
        let Some(atomic) = worker.mem.as_ref() else {
            warn!("queue {queue}: kicked before the guest memory table was set; ignored");
            return Pass::Stop;
        };
        let mem = atomic.memory();
        let disk = &*self.inner.disk;
        let size = vring.get_ref().get_queue().size();
        let mut completed = 0usize;
        let mut pass = Pass::Drained;
        let track = worker.inflight.as_ref();
        loop {
            let chain = inflight::pop(vring, &*mem, track);
            let Some(chain) = chain else {
                // Nothing to pop: the ring is empty, or virtio-queue refused it.
                if let Some(ahead) = avail_overrun(vring, &mem, size) {
                    error!(
                        "queue {queue}: the driver's avail index is {ahead} entries ahead of \
                         the device's, more than the queue size {size}: the ring is broken; \
                         the queue stops until the driver resets it"
                    );
                    worker.broken = true;
                    pass = Pass::Stop;
                }
                break;
            };
            let head = chain.head_index();
            if head >= size {
                // Not a descriptor: there is nothing to execute and no used element can name
                // it. Skipped, so the chains after it are still served.
                warn!("queue {queue}: avail ring entry names descriptor {head}, past the queue size {size}; skipped");
                continue;
            }
            // Two clock reads and a few relaxed atomics per request.
            let start = Instant::now();
            let done = worker.requests.process(disk, &*mem, chain, queue);
            done.record(disk.metrics(), start.elapsed());
            // Through the memory this worker was given (checked), never vhost-user-backend's
            // own copy of the table, which holds a table before it is checked.
            if let Err(e) = inflight::put(vring, &*mem, track, head, done.used_len) {
                // The used ring lies outside guest memory: nothing more can be completed.
                error!("queue {queue}: cannot add to the used ring: {e}");
                pass = Pass::Stop;
                break;
            }
            completed += 1;
        }
        if completed > 0 {
            let notify = vring
                .get_mut()
                .get_queue_mut()
                .needs_notification(&*mem)
                .unwrap_or_else(|e| {
                warn!("queue {queue}: reading the used event index failed ({e}); notifying anyway");
                true
            });
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    warn!("queue {queue}: signalling the guest failed: {e}");
                }
            }
        }
        pass
    }
}

impl BlkDevice {
    /// Queue `queue` is kicked: the first kick since it was set up tells the disk
    /// ([`Disk::rings_started`], which may wait for the disk's ownership). That wait runs with
    /// no lock held, on the first kicked queue's worker thread: the other queues' stops
    /// (GET_VRING_BASE on the frontend's thread) go on meanwhile, and their first kicks wait
    /// on their own threads for the same answer (their requests stay in the ring until then).
    fn queue_starts(&self, queue: usize) -> Result<(), String> {
        let bit = 1u64 << (queue % 64);
        let running = &self.inner.running;
        let mut r = running.lock().unwrap_or_else(|p| p.into_inner());
        if r.queues & bit == 0 {
            let first = r.queues == 0 && !r.acquiring;
            r.queues |= bit;
            if first && self.inner.disk.has_ring_hook() {
                r.acquiring = true;
                r.refused = None;
                drop(r);
                let answer = self.inner.disk.rings_started().err();
                r = running.lock().unwrap_or_else(|p| p.into_inner());
                r.acquiring = false;
                r.refused = answer;
                self.inner.acquired.notify_all();
                if r.queues == 0 && r.refused.is_none() {
                    // Every queue stopped while the disk was being taken.
                    drop(r);
                    self.inner.disk.rings_stopped(self.inner.dirty.on());
                    return Ok(());
                }
                return r.refused.clone().map_or(Ok(()), Err);
            }
        }
        while r.acquiring {
            r = self
                .inner
                .acquired
                .wait(r)
                .unwrap_or_else(|p| p.into_inner());
        }
        r.refused.clone().map_or(Ok(()), Err)
    }

    /// Whether queue `queue` has a request to serve: one in the avail ring past the device's
    /// index, or one of a crashed daemon's requests to run again. Asked only until the queue
    /// runs (a running queue's events are handled as they come).
    fn has_work(&self, vring: &VringRwLock, queue: usize) -> bool {
        let bit = 1u64 << (queue % 64);
        let running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queues;
        if running & bit != 0 {
            return true;
        }
        let Some(w) = self.worker(queue) else {
            return true;
        };
        if w.inflight
            .as_ref()
            .is_some_and(|i| i.resubmit_pending() > 0)
        {
            return true;
        }
        let Some(mem) = w.mem.as_ref().map(|m| m.memory()) else {
            // Handled (and logged) by the pass.
            return true;
        };
        let state = vring.get_ref();
        let q = state.get_queue();
        match q.avail_idx(&*mem, Ordering::Acquire) {
            Ok(avail) => avail.0 != q.next_avail(),
            Err(_) => true,
        }
    }

    /// Queue `queue` stopped (GET_VRING_BASE): when it was the last one running, the disk is
    /// told, with whether a live migration is ending (dirty logging on).
    fn queue_stopped(&self, queue: usize) {
        let bit = 1u64 << (queue % 64);
        let mut r = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        if r.queues & bit == 0 {
            return;
        }
        r.queues &= !bit;
        if r.queues == 0 && !r.acquiring {
            // (While the disk is being taken, the taking queue tells the disk when done.)
            let refused = r.refused.take();
            if refused.is_none() {
                self.inner.disk.rings_stopped(self.inner.dirty.on());
            }
        }
    }

    /// Answers every available chain of a queue whose disk refused to start with IOERR, so the
    /// guest sees errors instead of a hang.
    fn refuse_queue(&self, vring: &VringRwLock, queue: usize, why: &str) -> io::Result<()> {
        let Some(mut worker) = self.worker(queue) else {
            return Ok(());
        };
        let Some(mem) = worker.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mut n = 0u32;
        let track = worker.inflight.take();
        while let Some(chain) = inflight::pop(vring, &*mem, track.as_ref()) {
            let head = chain.head_index();
            let status = chain
                .clone()
                .filter(|d| d.is_write_only() && d.len() > 0)
                .last()
                .and_then(|d| d.addr().0.checked_add(u64::from(d.len()) - 1))
                .map(vm_memory::GuestAddress);
            if let Some(at) = status {
                use vm_memory::Bytes;
                let _ = mem.write_obj(virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8, at);
            }
            if inflight::put(vring, &*mem, track.as_ref(), head, 1).is_err() {
                break;
            }
            n += 1;
        }
        worker.inflight = track;
        if n > 0 {
            warn!("queue {queue}: {n} request(s) answered IOERR: {why}");
            let _ = vring.signal_used_queue();
        }
        Ok(())
    }
}

/// The layout's flush inside the panic boundary: a panic is the FLUSH's error (counted and
/// logged by the disk), and the queue carries on.
fn flush_caught(disk: &Disk, layout: &dyn BlockLayout, queue: usize) -> Result<(), String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| layout.flush())) {
        Ok(r) => r.map_err(|e| {
            let e = error_chain(&e);
            disk.flush_failed(&e);
            e
        }),
        Err(payload) => {
            let cause = dovetail_layout::panic_message(&*payload);
            disk.request_panicked(queue, "flush", &cause);
            Err(format!("panicked: {cause}"))
        }
    }
}

/// Whether descriptors `a` and `b` of this process refer to the same open file (`kcmp`
/// KCMP_FILE); false when they do not or the kernel cannot tell.
fn same_open_file(a: RawFd, b: RawFd) -> bool {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: kcmp only compares two descriptors of this process; it reads nothing of ours.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    rc == 0
}

/// How far the driver's avail index runs ahead of the device's next one, if that is more than
/// the queue size (which no correct driver does: it would be making entries available twice).
/// virtio-queue refuses to pop from such a ring, but its `enable_notification` still reports
/// work pending, so without this check an EVENT_IDX queue would spin.
fn avail_overrun(vring: &VringRwLock, mem: &GuestMemTable, size: u16) -> Option<u16> {
    let state = vring.get_ref();
    let q = state.get_queue();
    let avail = q.avail_idx(mem, Ordering::Acquire).ok()?;
    let ahead = avail.0.wrapping_sub(q.next_avail());
    (ahead > size).then_some(ahead)
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.config.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            // Live migration: dirty pages are logged while the frontend asks (`dirty.rs`).
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        debug!("guest acked features {features:#x}");
        let log = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if log != self.inner.dirty.on() {
            log::info!(
                "{}: dirty-page logging {} (live migration)",
                self.inner.disk.name(),
                if log { "on" } else { "off" }
            );
        }
        self.inner.dirty.set(log);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            // Split queues only (no VIRTIO_F_RING_PACKED is offered): `device/inflight.rs`.
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // The dirty log arrives as a shared memory file (SET_LOG_BASE).
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        // A resize tells the frontend through it (`Disk::grow`).
        debug!("the frontend set up its backend request channel");
        self.inner.disk.set_frontend(Some(backend));
    }

    fn reset_device(&self) {
        debug!("device reset");
        self.inner.event_idx.store(false, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= config.len() => config[start..end].to_vec(),
            _ => {
                warn!(
                    "config read at {offset}+{size} past the {}-byte config space",
                    config.len()
                );
                Vec::new()
            }
        }
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        // vhost-user-backend has already installed the table in the vrings' memory handle:
        // the workers never use that handle (every ring access goes through `Worker::mem`),
        // so an unchecked table is never touched. A checked table is handed to them as a
        // handle of its own.
        let table: GuestMemTable = (*mem.memory()).clone();
        if self.inner.dirty.on() {
            // vhost-user-backend installed the dirty log in the new regions (patches/README.md).
            log::info!(
                "{}: guest memory table replaced during a live migration ({} region(s)); the \
                 dirty log covers it",
                self.inner.disk.name(),
                table.num_regions()
            );
        }
        let checked = match check_guest_memory(&table) {
            Ok(()) => Some(GuestMemoryAtomic::new(table)),
            Err(why) => {
                error!("refusing the guest's memory table: {why}; the connection is dropped");
                None
            }
        };
        for i in 0..self.inner.workers.len() {
            if let Some(mut w) = self.worker(i) {
                w.mem = checked.clone();
            }
        }
        match checked {
            Some(_) => Ok(()),
            None => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "guest memory table refused (see the log)",
            )),
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue: queue i is handled by thread i alone.
        (0..self.inner.config.num_queues)
            .map(|i| 1u64 << i)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok((consumer, notifier)) => {
                let raw = consumer.as_raw_fd();
                // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor for an open one; the result
                // is checked and owned below.
                let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
                if dup >= 0 {
                    // SAFETY: `dup` was just created and nothing else owns it.
                    let mine = unsafe { OwnedFd::from_raw_fd(dup) };
                    self.inner
                        .exit_events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(ExitEvent { raw, mine });
                } else {
                    warn!(
                        "cannot track a worker exit event ({}); it stays open after the guest leaves",
                        io::Error::last_os_error()
                    );
                }
                Some((consumer, notifier))
            }
            Err(e) => {
                error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn set_inflight_queue(
        &self,
        queue_index: u16,
        inflight: Option<vhost_user_backend::InflightQueue>,
    ) {
        // Before the queue starts: the heads to run again are taken by its next pass.
        if let Some(mut w) = self.worker(usize::from(queue_index)) {
            w.inflight = inflight;
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready; taking its worker's lock waits for the request
        // batch in progress (if any) to complete before QEMU reads the ring base. A stopped
        // queue is set up afresh before it runs again, so a broken ring is forgotten.
        if let Some(mut w) = self.worker(queue_index as usize) {
            w.broken = false;
            // The kick eventfd is closed next and a new one (maybe under the same number)
            // comes with the restart: the ring's poll on the old file goes with the ring.
            // Between passes nothing is in flight, so the ring is dropped and made again.
            if w.engines.uring.as_ref().is_some_and(|u| u.in_flight() == 0) {
                w.engines.uring = None;
            } else if let Some(u) = w.engines.uring.as_mut() {
                u.cancel_poll();
            }
            w.engines.poll_fd = None;
        }
        debug!("queue {queue_index} stopped");
        self.queue_stopped(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            warn!("queue {thread_id}: event for unknown vring {device_event}");
            return Ok(());
        };
        // Busy until the ring is drained: a worker wedged in here stops the watchdog's pings.
        let _busy = self.inner.beats.get(thread_id).map(|b| b.busy());
        dovetail_store::failpoint::hit("queue-kick");
        crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Worker);
        if dovetail_store::failpoint::armed("sandbox-forbidden-call") {
            let made = crate::sandbox::forbidden_call_for_tests();
            log::error!("queue {thread_id}: made a forbidden system call (a socket): {made:?}");
        }
        if !self.has_work(vring, thread_id) && !self.arm_idle_queue(vring, thread_id) {
            // An event without a request (a queue set up and never used, a frontend leaving):
            // nothing to serve, and no reason to take the disk; notifications are on for this
            // device's index (`device/arm.rs`).
            return Ok(());
        }
        if let Err(why) = self.queue_starts(thread_id) {
            // Every request of this guest fails until its queues are set up again.
            return self.refuse_queue(vring, thread_id, &why);
        }
        let Some(mut worker) = self.worker(thread_id) else {
            warn!("event on unknown worker thread {thread_id}");
            return Ok(());
        };
        let queue = thread_id;
        if self.inner.event_idx.load(Ordering::Relaxed) {
            // Process until the ring stays empty after notifications are re-enabled, so a
            // request added in between is never missed.
            loop {
                if !vring.get_ref().get_queue().ready() {
                    // Stopped (GET_VRING_BASE, or paused for a handover) while requests wait:
                    // they are left in the ring for whoever starts it again.
                    break;
                }
                let Some(mem) = worker.mem.as_ref().map(|m| m.memory()) else {
                    warn!("queue {queue}: kicked before the guest memory table was set; ignored");
                    break;
                };
                if let Err(e) = vring.get_mut().get_queue_mut().disable_notification(&*mem) {
                    warn!("queue {queue}: disabling notifications failed: {e}");
                }
                drop(mem);
                let pass = self.process_queue(vring, &mut worker, queue);
                if pass == Pass::Stop && worker.broken {
                    // Notifications stay disabled: a broken ring is not looked at again.
                    break;
                }
                if pass == Pass::More {
                    continue;
                }
                let Some(mem) = worker.mem.as_ref().map(|m| m.memory()) else {
                    break;
                };
                match vring.get_mut().get_queue_mut().enable_notification(&*mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        warn!("queue {queue}: enabling notifications failed: {e}");
                        break;
                    }
                }
            }
        } else {
            while self.process_queue(vring, &mut worker, queue) == Pass::More {}
        }
        Ok(())
    }
}

/// Writes the pieces of a mapped write from the guest buffers `bufs` here, through one aligned
/// copy (the pieces are whole blocks at block offsets of the request): for a mapped write the
/// ring has no room for, which the layout has already made visible once its guard is told.
fn mapped_write_sync(bufs: &[IoBuf], pieces: &[MappedPiece]) -> Result<(), String> {
    let len = bufs.iter().map(|b| b.len).sum();
    let mut b = AlignedBuf::new(len);
    // SAFETY: resolved by vm-memory within the mapping the pass keeps.
    unsafe { IoBufs::new(bufs) }.copy_to(b.as_mut_slice());
    let base = b.iobuf().ptr;
    for pc in pieces {
        let Some((fd, offset)) = pc.file else {
            continue;
        };
        let iov = [libc::iovec {
            iov_base: base.wrapping_add(pc.at).cast(),
            iov_len: pc.len,
        }];
        dovetail_layout::engine::rw_all(fd, &iov, 0, offset, true).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether the request of `chain` is one [`RequestWorker::begin`] leaves to the caller (IN,
/// OUT, FLUSH), by its header's type; `false` when that cannot be read (`begin` reports it).
fn deferred_type<M, C>(mem: &M, chain: &C) -> bool
where
    M: vm_memory::GuestMemory,
    C: Iterator<Item = virtio_queue::desc::split::Descriptor> + Clone,
{
    use vm_memory::Bytes;
    let Some(d) = chain.clone().next() else {
        return false;
    };
    if d.len() < 4 || d.is_write_only() {
        return false;
    }
    match mem.read_obj::<u32>(d.addr()) {
        Ok(t) => matches!(
            u32::from_le(t),
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN
                | virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT
                | virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH
        ),
        Err(_) => false,
    }
}

/// Requests a queue's io_uring keeps in flight at most.
const URING_DEPTH: u32 = 128;

/// Entries queued on the ring after which a pass hands them to the kernel before popping more
/// chains: a long batch (a guest refilling 32 requests at once) reaches the device as it is
/// mapped, not only after its last request was.
const SUBMIT_EARLY: usize = 8;
/// How long a pass of a busy queue may go on popping past its budget (4 × the queue size
/// chains) when no pause waits for it: what a shutdown or a queue stop may wait, besides the
/// requests in flight.
const PASS_TIME: std::time::Duration = std::time::Duration::from_millis(500);
/// Threads of a queue's pool (layouts without a direct file, or no io_uring).
const POOL_THREADS: usize = 8;

/// A request of a queue in flight on its engine.
struct Slot {
    head: u16,
    pending: Option<Pending>,
    /// The request's guest buffers (host addresses resolved by `begin`).
    bufs: Vec<IoBuf>,
    /// What was handed to io_uring: `bufs`, or the bounce buffer.
    iov: Vec<libc::iovec>,
    /// An aligned copy of a misaligned request's data (direct I/O).
    bounce: Option<AlignedBuf>,
    start: Instant,
    /// A mapped read ([`BlockLayout::map_direct`]): its pieces, each one's iovecs in `iov`
    /// (start, count), the pieces still in flight and the first error.
    pieces: Vec<MappedPiece>,
    ranges: Vec<(usize, usize)>,
    left: usize,
    err: Option<String>,
}

// SAFETY: the raw pointers in `bufs` and `iov` are addresses of guest memory (or of `bounce`)
// that only the queue's worker thread and, while the request is in flight, the kernel or a pool
// thread use; a slot moves between threads only inside its `Worker`'s mutex.
unsafe impl Send for Slot {}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            head: 0,
            pending: None,
            bufs: Vec::new(),
            iov: Vec::new(),
            bounce: None,
            start: Instant::now(),
            pieces: Vec::new(),
            ranges: Vec::new(),
            left: 0,
            err: None,
        }
    }
}

/// A mapped request queued on the ring: its layout's guard and its pieces in flight.
type Submitted<'l> = (Box<dyn MapGuard + 'l>, usize);

/// The engines of one queue and its requests in flight.
#[derive(Default)]
struct Engines {
    uring: Option<Uring>,
    /// io_uring could not be set up: the pool serves this queue from now on.
    uring_failed: bool,
    pool: Option<Pool>,
    /// Reads of mapped pieces on an asynchronous source (a store on RADOS), beside the ring.
    aio: Option<Aio>,
    aio_done: Vec<Completed>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    reaped: Vec<Completed>,
    pool_done: Vec<(u64, dovetail_layout::Result<()>, Vec<IoBuf>)>,
    /// Used-ring entries (head, used length) ready to publish.
    used: Vec<(u16, u32)>,
    /// The kick eventfd the ring's multishot poll watches, while one is armed.
    poll_fd: Option<RawFd>,
    /// Mapped reads in flight on the ring (each holds its layout's guard).
    mapped: usize,
    /// The queue's index, for log lines.
    queue: usize,
    /// Requests whose I/O panicked on a pool thread since the last publish (what and why),
    /// for the disk to count and log ([`Disk::request_panicked`]).
    panicked: Vec<(String, String)>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("uring", &self.uring)
            .field("pool", &self.pool)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Engines {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another request may be submitted now (`mapped`: the ring serves mapped reads
    /// beside the pool, which takes what cannot be mapped or does not fit).
    fn room(&self, direct: bool, mapped: bool) -> bool {
        if direct {
            self.uring.as_ref().is_some_and(|u| u.room() > 0)
        } else if mapped {
            self.in_flight() < URING_DEPTH as usize
        } else {
            self.in_flight() < MAX_QUEUE_SIZE
        }
    }

    /// Maps the read or write of slot `idx` (its guest buffers resolved, `p` pending) through
    /// `layout` and queues its pieces on the ring: `Some(Ok((its guard, pieces in flight)))`
    /// (0: nothing to transfer, the holes zeroed), `None` when it cannot be mapped or does not
    /// fit in the ring (the pool takes it; nothing was queued or changed), `Some(Err)` for a
    /// write the layout carried out itself and that failed.
    fn submit_mapped<'l>(
        &mut self,
        idx: usize,
        layout: &'l dyn BlockLayout,
        p: &Pending,
    ) -> Option<Result<Submitted<'l>, String>> {
        let write = p.kind == IoKind::Write;
        let uring = self.uring.as_mut()?;
        let slot = self.slots.get_mut(idx)?;
        let m = if write {
            // A write changes the layout's tree as it is mapped, so it should fit: the pieces
            // of the layouts that map writes are whole 4 KiB blocks (else written below).
            let blocks = p.len.div_ceil(4096);
            if blocks > uring.room() {
                return None;
            }
            // SAFETY: resolved by vm-memory within the mapping the pass keeps until every
            // request it submitted completed.
            let io = unsafe { IoBufs::new(&slot.bufs) };
            match layout.map_direct_write(p.at, io, &mut slot.pieces)? {
                Ok(m) => m,
                Err(e) => return Some(Err(error_chain(&e))),
            }
        } else {
            layout.map_direct(p.at, p.len, &mut slot.pieces)?
        };
        // The layout's own copy of a write's data, if it made one: written instead of the
        // guest's buffers (stable until the guard, kept until the completion, is dropped).
        let own = if write {
            m.guard
                .data()
                .filter(|d| d.len() >= p.len)
                .map(|d| d.as_ptr())
        } else {
            None
        };
        let files = slot.pieces.iter().filter(|x| x.file.is_some()).count();
        let aios = slot.pieces.iter().filter(|x| x.aio.is_some()).count();
        if aios > 0 && (write || self.aio.is_none()) {
            // Asynchronous sources are read only, by a worker that has the engine.
            return None;
        }
        if files > uring.room() {
            if write {
                // More pieces than blocks (copies of an extent group) and no room: carried
                // out here rather than lost.
                let mut m = m;
                let r = match m.guard.data() {
                    Some(d) => mapped_write_sync(
                        &[IoBuf {
                            ptr: d.as_ptr().cast_mut(),
                            len: p.len.min(d.len()),
                        }],
                        &slot.pieces,
                    ),
                    None => mapped_write_sync(&slot.bufs, &slot.pieces),
                };
                m.guard.completed(r.is_ok(), slot.start.elapsed());
                drop(m);
                return Some(r.map(|()| (Box::new(()) as Box<dyn MapGuard>, 0)));
            }
            return None;
        }
        let align = m.mem_align.max(1);
        let aligned = slot
            .bufs
            .iter()
            .all(|b| (b.ptr as usize) % align == 0 && b.len % align == 0);
        // Zeroed: holes need nothing more.
        slot.bounce = (!aligned && own.is_none()).then(|| AlignedBuf::new(p.len));
        // SAFETY: resolved by vm-memory within the mapping the pass keeps until every request
        // it submitted completed.
        let io = unsafe { IoBufs::new(&slot.bufs) };
        if let (true, Some(b)) = (write, slot.bounce.as_mut()) {
            io.copy_to(b.as_mut_slice());
        }
        slot.iov.clear();
        slot.ranges.clear();
        for pc in &slot.pieces {
            let lo = slot.iov.len();
            if let (Some(_), Some(d)) = (pc.file, own) {
                slot.iov.push(libc::iovec {
                    iov_base: d.wrapping_add(pc.at).cast_mut().cast(),
                    iov_len: pc.len,
                });
                slot.ranges.push((lo, 1));
                continue;
            }
            match (pc.transfers(), slot.bounce.as_mut()) {
                (false, None) if !write => io.zero(pc.at, pc.len),
                (false, None) => {}
                (false, Some(_)) => {}
                (true, None) => io.iovecs(pc.at, pc.len, &mut slot.iov),
                (true, Some(b)) => {
                    let one = b.iobuf();
                    slot.iov.push(libc::iovec {
                        iov_base: one.ptr.wrapping_add(pc.at).cast(),
                        iov_len: pc.len,
                    });
                }
            }
            slot.ranges.push((lo, slot.iov.len() - lo));
        }
        slot.left = files + aios;
        slot.err = None;
        for (i, pc) in slot.pieces.iter().enumerate() {
            if let (Some((source, offset)), Some(aio)) = (&pc.aio, self.aio.as_mut()) {
                let (lo, n) = slot.ranges[i];
                let tag = idx as u64 | ((i as u64) << 32);
                // SAFETY: the iovecs name guest memory the pass keeps mapped (or the slot's
                // bounce buffer) until every piece's completion was reaped, which the pass
                // waits for before it returns; nothing else uses them for a read meanwhile.
                let r = unsafe { aio.submit(tag, &**source, *offset, &slot.iov[lo..lo + n]) };
                if let Err(e) = r {
                    slot.err.get_or_insert_with(|| e.to_string());
                    slot.left -= 1;
                }
                continue;
            }
            let Some((fd, offset)) = pc.file else {
                continue;
            };
            let (lo, n) = slot.ranges[i];
            let tag = idx as u64 | ((i as u64) << 32);
            // SAFETY: the iovecs (in the slot, not changed until its completion) and the
            // buffers they name (guest memory kept mapped by the pass, the slot's bounce
            // buffer, or the layout's copy owned by the guard) stay valid until every piece's
            // completion was reaped, which the pass waits for before it returns (and before
            // it drops the guard); `fd` is a file of the layout, open while the guard (kept
            // until then) holds the mapping.
            let pushed = unsafe {
                uring.push_rw(
                    tag,
                    fd,
                    slot.iov.as_ptr().wrapping_add(lo),
                    n as u32,
                    offset,
                    write,
                )
            };
            if !pushed {
                // `room` said there was: transfer it here rather than lose it.
                let r =
                    dovetail_layout::engine::rw_all(fd, &slot.iov[lo..lo + n], 0, offset, write);
                if let Err(e) = r {
                    slot.err.get_or_insert_with(|| e.to_string());
                }
                slot.left -= 1;
            }
        }
        Some(Ok((m.guard, slot.left)))
    }

    /// Completes mapped read `idx` whose pieces all ended: the bounce buffer copied out, the
    /// guard told and dropped (its locks released), status written, used entry queued.
    fn finish_mapped<M: vm_memory::GuestMemory>(
        &mut self,
        idx: usize,
        requests: &mut RequestWorker,
        mem: &M,
        metrics: &crate::metrics::RequestMetrics,
        guards: &mut [Option<Box<dyn MapGuard + '_>>],
    ) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        let Some(p) = slot.pending.take() else {
            return;
        };
        let mut r = match slot.err.take() {
            None => Ok(()),
            Some(e) => Err(e),
        };
        let read = p.kind != IoKind::Write;
        if let (Ok(()), Some(b), true) = (&r, slot.bounce.as_ref(), read) {
            // SAFETY: `bufs` was resolved by vm-memory within the mapping `mem` keeps.
            unsafe { IoBufs::new(&slot.bufs) }.copy_from(b.as_slice());
        }
        slot.bounce = None;
        let mut guard = guards.get_mut(idx).and_then(Option::take);
        if let (Ok(()), Some(g), true) = (&r, guard.as_mut(), read) {
            // What the layout checks of the data read (parallax-v2's checksums), in place.
            // SAFETY: as above.
            if let Err(e) = g.verify(unsafe { IoBufs::new(&slot.bufs) }) {
                r = Err(error_chain(&e));
            }
        }
        let took = slot.start.elapsed();
        // Told and dropped before the request completes: a mapped write is visible (and
        // counted for the next sync) before the guest learns it completed.
        if let Some(mut g) = guard {
            g.completed(r.is_ok(), took);
        }
        self.mapped = self.mapped.saturating_sub(1);
        let done = requests.finish(mem, &p, &slot.bufs, r);
        done.record(metrics, took);
        self.used.push((slot.head, done.used_len));
        self.free.push(idx);
    }

    /// [`complete`](Engines::complete) of a mapped pass: reads on the ring and requests on the
    /// pool, one wait for both (the pool's wake eventfd is polled in the ring).
    fn complete_mapped<M: vm_memory::GuestMemory>(
        &mut self,
        requests: &mut RequestWorker,
        mem: &M,
        metrics: &crate::metrics::RequestMetrics,
        guards: &mut [Option<Box<dyn MapGuard + '_>>],
        wait: bool,
    ) {
        let queue = self.queue;
        let (Some(uring), Some(pool)) = (self.uring.as_mut(), self.pool.as_mut()) else {
            return;
        };
        if uring.wake_polls() == 0 {
            if let Some(fd) = pool.wake_fd() {
                // SAFETY: the pool's eventfd is open while the pool lives, which is as long as
                // this worker's engines (and the kernel takes its own reference when the poll
                // is submitted just below). A poll names no memory.
                let _ = unsafe { uring.push_wake_poll(fd) };
            }
        }
        pool.reap(false, &mut self.pool_done);
        let aio = self.aio.as_mut();
        let aio_busy = aio.as_ref().is_some_and(|a| a.in_flight() > 0);
        if let Some(a) = aio {
            a.reap(false, &mut self.aio_done);
        }
        let wait = wait && self.pool_done.is_empty() && self.aio_done.is_empty();
        // The ring's wait ends for anything in flight: its reads, and a pool's or an
        // asynchronous read's completion once the wake poll is armed (both write the pool's
        // eventfd; without the poll, a wait blocks on whichever engine is busy).
        let ring_wakes = uring.in_flight() > 0 || uring.wake_polls() > 0;
        let r = if wait && ring_wakes {
            uring.submit_and_wait_one()
        } else {
            uring.submit(false)
        };
        if let Err(e) = r {
            warn!("queue {queue}: io_uring submission failed: {e}; retrying");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if wait && !ring_wakes {
            match (pool.in_flight() > 0, self.aio.as_mut()) {
                (false, Some(a)) if aio_busy => a.reap(true, &mut self.aio_done),
                (true, Some(_)) if aio_busy => {
                    // Both busy and no poll to wait on both (kernels before 5.13): a short nap.
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                _ => pool.reap(true, &mut self.pool_done),
            }
        }
        uring.reap(&mut self.reaped);
        let _ = uring.take_poll_fired();
        pool.reap(false, &mut self.pool_done);
        if let Some(a) = self.aio.as_mut() {
            a.reap(false, &mut self.aio_done);
        }
        let mut reaped = std::mem::take(&mut self.reaped);
        let mut pool_done = std::mem::take(&mut self.pool_done);
        for c in reaped.drain(..) {
            let idx = (c.tag & 0xffff_ffff) as usize;
            let piece = (c.tag >> 32) as usize;
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            if slot.pending.is_none() {
                continue;
            }
            let (Some(pc), Some(&(lo, n))) = (slot.pieces.get(piece), slot.ranges.get(piece))
            else {
                continue;
            };
            let Some((fd, offset)) = pc.file else {
                continue;
            };
            let write = slot.pending.is_some_and(|p| p.kind == IoKind::Write);
            let r = match c.result {
                Ok(k) if k >= pc.len => Ok(()),
                // A short transfer: the rest synchronously.
                Ok(k) => {
                    dovetail_layout::engine::rw_all(fd, &slot.iov[lo..lo + n], k, offset, write)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                slot.err.get_or_insert_with(|| e.to_string());
            }
            slot.left = slot.left.saturating_sub(1);
            if slot.left == 0 {
                self.finish_mapped(idx, requests, mem, metrics, guards);
            }
        }
        self.reaped = reaped;
        let mut aio_done = std::mem::take(&mut self.aio_done);
        for c in aio_done.drain(..) {
            let idx = (c.tag & 0xffff_ffff) as usize;
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            if slot.pending.is_none() {
                continue;
            }
            if let Err(e) = c.result {
                slot.err.get_or_insert_with(|| e.to_string());
            }
            slot.left = slot.left.saturating_sub(1);
            if slot.left == 0 {
                self.finish_mapped(idx, requests, mem, metrics, guards);
            }
        }
        self.aio_done = aio_done;
        for (tag, r, bufs) in pool_done.drain(..) {
            let idx = tag as usize;
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            slot.bufs = bufs;
            let Some(p) = slot.pending.take() else {
                continue;
            };
            let done = requests.finish(mem, &p, &slot.bufs, r.map_err(|e| error_chain(&e)));
            done.record(metrics, slot.start.elapsed());
            self.used.push((slot.head, done.used_len));
            self.free.push(idx);
        }
        self.pool_done = pool_done;
    }

    /// Waits for at least one request in flight to finish (`wait`) and completes every finished
    /// one: status byte written, metrics recorded, used-ring entry queued in `self.used`.
    #[allow(clippy::too_many_arguments)]
    fn complete<M: vm_memory::GuestMemory>(
        &mut self,
        requests: &mut RequestWorker,
        mem: &M,
        metrics: &crate::metrics::RequestMetrics,
        layout: &dyn BlockLayout,
        direct: Option<DirectFile>,
        mapped: bool,
        guards: &mut [Option<Box<dyn MapGuard + '_>>],
        wait: bool,
    ) {
        if mapped {
            return self.complete_mapped(requests, mem, metrics, guards, wait);
        }
        let queue = self.queue;
        if let (Some(df), Some(uring)) = (direct, self.uring.as_mut()) {
            if let Err(e) = uring.submit(wait) {
                warn!("queue {queue}: io_uring submission failed: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            uring.reap(&mut self.reaped);
            for c in self.reaped.drain(..) {
                let idx = c.tag as usize;
                let Some(slot) = self.slots.get_mut(idx) else {
                    continue;
                };
                let Some(p) = slot.pending.take() else {
                    continue;
                };
                let write = p.kind == IoKind::Write;
                let offset = p.at.0 * dovetail_layout::SECTOR_SIZE;
                let r = match c.result {
                    Ok(n) if n >= p.len => Ok(()),
                    // A short transfer: the rest synchronously.
                    Ok(n) => dovetail_layout::engine::rw_all(df.fd, &slot.iov, n, offset, write)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let (Ok(()), false, Some(b)) = (&r, write, slot.bounce.as_ref()) {
                    // SAFETY: `bufs` was resolved by vm-memory within the mapping `mem` keeps.
                    unsafe { IoBufs::new(&slot.bufs) }.copy_from(b.as_slice());
                }
                slot.bounce = None;
                let took = slot.start.elapsed();
                layout.direct_completed(write, p.len as u64, r.is_ok(), took);
                let done = requests.finish(mem, &p, &slot.bufs, r);
                done.record(metrics, took);
                self.used.push((slot.head, done.used_len));
                self.free.push(idx);
            }
        } else if let Some(pool) = self.pool.as_mut() {
            pool.reap(wait, &mut self.pool_done);
            for (tag, r, bufs) in self.pool_done.drain(..) {
                let idx = tag as usize;
                let Some(slot) = self.slots.get_mut(idx) else {
                    continue;
                };
                slot.bufs = bufs;
                let Some(p) = slot.pending.take() else {
                    continue;
                };
                if let Err(dovetail_layout::Error::Panicked(cause)) = &r {
                    let what = if p.kind == IoKind::Write {
                        "write"
                    } else {
                        "read"
                    };
                    self.panicked
                        .push((format!("{what} at sector {}", p.at.0), cause.clone()));
                }
                let done = requests.finish(mem, &p, &slot.bufs, r.map_err(|e| error_chain(&e)));
                done.record(metrics, slot.start.elapsed());
                self.used.push((slot.head, done.used_len));
                self.free.push(idx);
            }
        }
    }
}

impl BlkDevice {
    /// [`process_queue`](BlkDevice::process_queue) with many requests in flight: io_uring on
    /// the file of a layout that offers one (the current layout pinned for the pass, so a
    /// pause waits for it), a thread pool otherwise.
    fn process_queue_engine(&self, vring: &VringRwLock, worker: &mut Worker, queue: usize) -> Pass {
        let disk = &*self.inner.disk;
        let mut pass = None;
        if disk.engine() == Engine::Auto && !worker.engines.uring_failed {
            disk.layout().run_pinned(&mut |pinned| {
                let l = pinned.unwrap_or(disk.layout());
                let Some(df) = l.direct_file() else {
                    return;
                };
                if worker.engines.uring.is_none() {
                    match Uring::new(URING_DEPTH) {
                        Ok(u) => {
                            debug!(
                                "queue {queue}: io_uring, up to {URING_DEPTH} requests in flight"
                            );
                            worker.engines.uring = Some(u);
                        }
                        Err(e) => {
                            warn!(
                                "queue {queue}: io_uring is not available ({e}); serving \
                                 through a thread pool"
                            );
                            worker.engines.uring_failed = true;
                            return;
                        }
                    }
                }
                pass = Some(self.engine_pass(vring, worker, queue, l, Some(df), false));
            });
        }
        if pass.is_none()
            && disk.engine() == Engine::Auto
            && !worker.engines.uring_failed
            && disk.layout().map_direct_supported()
        {
            // Reads mapped to the store's direct-I/O files go on the ring, the rest on the
            // pool; the outer layout is used (no pinning: each mapped read's guard holds what
            // keeps it valid, a pause waiting for those like for any operation).
            if worker.engines.uring.is_none() {
                match Uring::new(URING_DEPTH) {
                    Ok(u) => {
                        debug!("queue {queue}: io_uring for mapped reads, beside the pool");
                        worker.engines.uring = Some(u);
                    }
                    Err(e) => {
                        warn!(
                            "queue {queue}: io_uring is not available ({e}); serving \
                             through a thread pool"
                        );
                        worker.engines.uring_failed = true;
                    }
                }
            }
            if worker.engines.uring.is_some() {
                pass = Some(self.engine_pass(vring, worker, queue, disk.layout(), None, true));
            }
        }
        match pass {
            Some(p) => p,
            None => self.engine_pass(vring, worker, queue, disk.layout(), None, false),
        }
    }

    /// One pass: pop and submit every available chain (up to the engine's room), wait for
    /// completions, publish them with one notification per batch, until nothing is available
    /// or in flight. FLUSH is a barrier: every request popped before it completes first, then
    /// the layout flushes, so it covers every write completed before it (and more).
    fn engine_pass(
        &self,
        vring: &VringRwLock,
        worker: &mut Worker,
        queue: usize,
        layout: &dyn BlockLayout,
        direct: Option<DirectFile>,
        mapped: bool,
    ) -> Pass {
        if worker.broken {
            return Pass::Stop;
        }
        let Some(atomic) = worker.mem.clone() else {
            warn!("queue {queue}: kicked before the guest memory table was set; ignored");
            return Pass::Stop;
        };
        let mem = atomic.memory();
        let disk = &*self.inner.disk;
        let metrics = &**disk.metrics();
        let size = vring.get_ref().get_queue().size();
        // Bounded, so a pause of the disk (which waits for the pinned pass) is not held off
        // by a guest that keeps its queue full.
        let budget = 4 * usize::from(size.max(1));
        let (mut popped, mut pass, mut dead) = (0usize, Pass::Drained, false);
        // Ending a pass empties the device's queue (everything in flight completes first), so
        // a busy queue's pass goes on past its budget for up to `PASS_TIME` unless a pause is
        // waiting for it (the outer layout's `pause_wanted`, which never blocks).
        let started = Instant::now();
        let outer = disk.layout();
        let may_pop = |popped: usize| {
            !outer.pause_wanted() && (popped < budget || started.elapsed() < PASS_TIME)
        };
        let mut popping = may_pop(0);
        let Worker {
            requests,
            engines,
            broken,
            inflight: track,
            ..
        } = worker;
        let track = track.as_ref();
        engines.queue = queue;
        // The guards of mapped reads in flight, by slot (dropped as each completes).
        let mut guards: Vec<Option<Box<dyn MapGuard + '_>>> = Vec::new();
        let ring = direct.is_some() || mapped;
        if let (Some(uring), true) = (engines.uring.as_mut(), ring) {
            // Completions of the kick poll posted since the last pass (the kick that started
            // this one): taken now, so the first wait below is not ended by them.
            uring.reap(&mut engines.reaped);
            let _ = uring.take_poll_fired();
            if uring.polls() == 0 {
                engines.poll_fd = None;
            }
        }
        if direct.is_none() && engines.pool.is_none() {
            match Pool::new(
                disk.layout_arc().clone(),
                POOL_THREADS,
                &format!("q{queue}"),
            ) {
                Ok(p) => engines.pool = Some(p),
                Err(e) => {
                    error!("queue {queue}: cannot start its I/O threads ({e})");
                    return Pass::Stop;
                }
            }
        }
        if mapped && engines.aio.is_none() {
            // Completions write the pool's eventfd, which the ring polls.
            engines.aio = Some(Aio::new(engines.pool.as_ref().and_then(Pool::wake_fd)));
        }
        let publish = |engines: &mut Engines, dead: &mut bool| {
            for (what, cause) in engines.panicked.drain(..) {
                disk.request_panicked(queue, &what, &cause);
            }
            if engines.used.is_empty() {
                return;
            }
            for (head, len) in engines.used.drain(..) {
                if *dead {
                    continue;
                }
                if let Err(e) = inflight::put(vring, &*mem, track, head, len) {
                    error!("queue {queue}: cannot add to the used ring: {e}");
                    *dead = true;
                }
            }
            let notify = vring
                .get_mut()
                .get_queue_mut()
                .needs_notification(&*mem)
                .unwrap_or(true);
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    warn!("queue {queue}: signalling the guest failed: {e}");
                }
            }
        };
        loop {
            // A queue stopped while this pass runs (GET_VRING_BASE, or paused for a handover,
            // which then waits for the pass) is not popped again: virtio-queue refuses to pop a
            // ring that is not ready, while its `enable_notification` still reports requests
            // waiting, so the wait below would go back to popping forever. The requests in
            // flight complete; those waiting stay in the ring for whoever starts it again.
            popping = popping && may_pop(popped) && vring.get_ref().get_queue().ready();
            while !dead && popping && engines.room(direct.is_some(), mapped) {
                if let Some(uring) = engines
                    .uring
                    .as_mut()
                    .filter(|u| ring && u.queued() >= SUBMIT_EARLY)
                {
                    if let Err(e) = uring.submit(false) {
                        debug!("queue {queue}: early io_uring submission failed: {e}");
                    }
                }
                let chain = inflight::pop(vring, &*mem, track);
                let Some(chain) = chain else {
                    if let Some(ahead) = avail_overrun(vring, &mem, size) {
                        error!(
                            "queue {queue}: the driver's avail index is {ahead} entries ahead \
                             of the device's, more than the queue size {size}: the ring is \
                             broken; the queue stops until the driver resets it"
                        );
                        *broken = true;
                        pass = Pass::Stop;
                        dead = true;
                    }
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                if head >= size {
                    warn!("queue {queue}: avail ring entry names descriptor {head}, past the queue size {size}; skipped");
                    continue;
                }
                let start = Instant::now();
                if engines.mapped > 0 && !deferred_type(&*mem, &chain) {
                    // Carried out at once on this thread (DISCARD, WRITE_ZEROES...), which may
                    // take the locks the mapped reads in flight hold: those complete first.
                    while engines.mapped > 0 {
                        engines.complete(
                            requests,
                            &*mem,
                            metrics,
                            layout,
                            direct,
                            mapped,
                            &mut guards,
                            true,
                        );
                    }
                }
                let p = match requests.begin(disk, layout, &*mem, chain, queue, true) {
                    Begun::Done(c) => {
                        c.record(metrics, start.elapsed());
                        engines.used.push((head, c.used_len));
                        continue;
                    }
                    Begun::Io(p) => p,
                };
                if p.kind == IoKind::Flush {
                    while engines.in_flight() > 0 {
                        engines.complete(
                            requests,
                            &*mem,
                            metrics,
                            layout,
                            direct,
                            mapped,
                            &mut guards,
                            true,
                        );
                    }
                    let r = flush_caught(disk, layout, queue);
                    let c = requests.finish(&*mem, &p, &[], r);
                    c.record(metrics, start.elapsed());
                    engines.used.push((head, c.used_len));
                    continue;
                }
                let idx = engines.free.pop().unwrap_or_else(|| {
                    engines.slots.push(Slot::default());
                    engines.slots.len() - 1
                });
                let slot = &mut engines.slots[idx];
                requests.take_iobufs(&mut slot.bufs);
                slot.head = head;
                slot.start = start;
                slot.pending = Some(p);
                let write = p.kind == IoKind::Write;
                if mapped {
                    if guards.len() < engines.slots.len() {
                        guards.resize_with(engines.slots.len(), || None);
                    }
                    match engines.submit_mapped(idx, layout, &p) {
                        Some(Ok((guard, 0))) => {
                            // Holes only, or a write the layout carried out: nothing to do.
                            guards[idx] = Some(guard);
                            engines.mapped += 1;
                            engines.finish_mapped(idx, requests, &*mem, metrics, &mut guards);
                            continue;
                        }
                        Some(Ok((guard, _))) => {
                            guards[idx] = Some(guard);
                            engines.mapped += 1;
                            continue;
                        }
                        Some(Err(e)) => {
                            let slot = &mut engines.slots[idx];
                            slot.pending = None;
                            let c = requests.finish(&*mem, &p, &slot.bufs, Err(e));
                            c.record(metrics, start.elapsed());
                            engines.used.push((head, c.used_len));
                            engines.free.push(idx);
                            continue;
                        }
                        None => {}
                    }
                }
                let slot = &mut engines.slots[idx];
                slot.bounce = None;
                match (direct, engines.uring.as_mut()) {
                    (Some(df), Some(uring)) => {
                        slot.iov.clear();
                        if df.aligned(&slot.bufs) {
                            slot.iov.extend(slot.bufs.iter().map(|b| libc::iovec {
                                iov_base: b.ptr.cast(),
                                iov_len: b.len,
                            }));
                        } else {
                            let mut b = AlignedBuf::new(p.len);
                            if write {
                                // SAFETY: resolved by vm-memory within the mapping `mem` keeps.
                                unsafe { IoBufs::new(&slot.bufs) }.copy_to(b.as_mut_slice());
                            }
                            let one = b.iobuf();
                            slot.iov.push(libc::iovec {
                                iov_base: one.ptr.cast(),
                                iov_len: one.len,
                            });
                            slot.bounce = Some(b);
                        }
                        let offset = p.at.0 * dovetail_layout::SECTOR_SIZE;
                        // SAFETY: the iovecs (in the slot) and the buffers they name (guest
                        // memory kept mapped by `mem`, or the slot's bounce buffer) stay valid
                        // until this slot's completion is reaped, which this pass waits for
                        // before it returns; `df.fd` stays open while `layout` is pinned.
                        let pushed = unsafe {
                            uring.push_rw(
                                idx as u64,
                                df.fd,
                                slot.iov.as_ptr(),
                                slot.iov.len() as u32,
                                offset,
                                write,
                            )
                        };
                        if !pushed {
                            // `room` said there was: do it here rather than lose it.
                            let r =
                                dovetail_layout::engine::rw_all(df.fd, &slot.iov, 0, offset, write)
                                    .map_err(|e| e.to_string());
                            let took = start.elapsed();
                            layout.direct_completed(write, p.len as u64, r.is_ok(), took);
                            if let (Ok(()), false, Some(b)) = (&r, write, slot.bounce.as_ref()) {
                                // SAFETY: as above.
                                unsafe { IoBufs::new(&slot.bufs) }.copy_from(b.as_slice());
                            }
                            slot.bounce = None;
                            slot.pending = None;
                            let c = requests.finish(&*mem, &p, &slot.bufs, r);
                            c.record(metrics, start.elapsed());
                            engines.used.push((head, c.used_len));
                            engines.free.push(idx);
                        }
                    }
                    _ => {
                        let bufs = std::mem::take(&mut slot.bufs);
                        let refused = match engines.pool.as_mut() {
                            // SAFETY: the buffers are guest memory kept mapped by `mem` until
                            // this pass has reaped every request it submitted.
                            Some(pool) => unsafe { pool.submit(idx as u64, p.at, write, bufs) },
                            None => Err(bufs),
                        };
                        if let Err(bufs) = refused {
                            // No thread to take it: carried out here.
                            slot.bufs = bufs;
                            // SAFETY: as above.
                            let io = unsafe { IoBufs::new(&slot.bufs) };
                            let mut scratch = Vec::new();
                            let r = if write {
                                layout.write_from(p.at, io, &mut scratch)
                            } else {
                                layout.read_into(p.at, io, &mut scratch)
                            };
                            slot.pending = None;
                            let c = requests.finish(
                                &*mem,
                                &p,
                                &slot.bufs,
                                r.map_err(|e| error_chain(&e)),
                            );
                            c.record(metrics, start.elapsed());
                            engines.used.push((head, c.used_len));
                            engines.free.push(idx);
                        }
                    }
                }
            }
            if engines.in_flight() == 0 {
                break;
            }
            // Whether the pop loop above would take another chain: the same test, so a pass
            // whose slots are full (the pool holding some of them, the ring still with room)
            // goes on to reap instead of coming back here without popping, forever.
            let may_take = popping && engines.room(direct.is_some(), mapped);
            if let (Some(uring), false) = (engines.uring.as_mut().filter(|_| ring), dead) {
                // While waiting for completions, also wake when the guest makes more requests
                // available: notifications on, and a poll on the kick eventfd in the ring.
                if self.inner.event_idx.load(Ordering::Relaxed) {
                    // Bound first: the vring's lock must not be held across the arms, which
                    // take it again.
                    let more = vring.get_mut().get_queue_mut().enable_notification(&*mem);
                    if let (Ok(true), true) = (more, may_take) {
                        // Pop them now; what was popped so far is submitted with them, by the
                        // one io_uring_enter of the wait below.
                        let _ = vring.get_mut().get_queue_mut().disable_notification(&*mem);
                        continue;
                    }
                }
                let kick = vring.get_ref().get_kick().as_ref().map(|k| k.as_raw_fd());
                if engines.poll_fd != kick {
                    // A different kick eventfd (or none): the armed poll watches the old file.
                    uring.cancel_poll();
                    engines.poll_fd = None;
                }
                // One multishot poll, armed once and left armed between passes: every kick
                // posts a completion that ends the wait below, so a request made available
                // while others are in flight is started at once, not after them. The kick
                // itself is left for the event loop to consume (it reads it, blocking, when
                // epoll reported it: reading it here could leave that read waiting forever).
                if let (Some(fd), None, 0) = (kick, engines.poll_fd, uring.polls()) {
                    // SAFETY: the kick eventfd is open now and the poll is handed to the
                    // kernel by the submission just below, which takes its own reference to
                    // the file: a later close of the vring's descriptor cannot make the poll
                    // name another file (and `poll_fd` no longer matches, so it is
                    // cancelled). A poll names no memory.
                    if unsafe { uring.push_poll(fd) } {
                        engines.poll_fd = Some(fd);
                    }
                }
            }
            // What completed without the engine (GET_ID, DISCARD, a FLUSH, a refused
            // submission) is published before sleeping, not held until a read or write ends.
            publish(engines, &mut dead);
            // One io_uring_enter for everything popped above and the wait; then whatever
            // finished (or a kick: the loop pops again).
            engines.complete(
                requests,
                &*mem,
                metrics,
                layout,
                direct,
                mapped,
                &mut guards,
                true,
            );
            if let Some(uring) = engines.uring.as_mut() {
                let _ = uring.take_poll_fired();
                if uring.polls() == 0 {
                    // The kernel ended it (or it was cancelled): arm another next time.
                    engines.poll_fd = None;
                }
            }
            if self.inner.event_idx.load(Ordering::Relaxed) && ring {
                let _ = vring.get_mut().get_queue_mut().disable_notification(&*mem);
            }
            publish(engines, &mut dead);
        }
        publish(engines, &mut dead);
        if dead && pass != Pass::Stop {
            pass = Pass::Stop;
        } else if pass == Pass::Drained && !popping {
            pass = Pass::More;
        }
        pass
    }
}
