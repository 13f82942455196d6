//! The driver side of a vhost-user-blk device: what a guest's virtio-blk driver and QEMU do
//! together, done by one process over a backend's socket.
//!
//! [`Driver::connect`] owns guest memory (a memfd shared with the backend), negotiates features
//! over the socket as QEMU does, lays out one split virtqueue per queue in that memory, and hands
//! each queue's eventfds to the backend. Each queue is a [`VirtQueue`] behind its own lock, so
//! queues may be driven from different threads at once.
//!
//! Two ways to use a queue:
//! - [`Driver::submit`] / [`Driver::submit_batch`]: whole chains described by [`Buf`]s, copied
//!   into the queue's data area, waited for, and returned as [`Completion`]s (integration tests).
//! - The [`VirtQueue`] primitives (descriptors, avail ring, kick, used ring, call eventfd) for
//!   callers that keep their own buffers in guest memory and many chains in flight (the load
//!   generator in [`crate::load`]).
//!
//! Nothing the backend writes is trusted: used elements naming no chain in flight, more used
//! elements than chains, and a backend that stops answering are errors, never panics.

use std::fs::File;
use std::mem::offset_of;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_UNMAP: u32 = 1;

/// Byte the driver fills device-writable buffers with before submitting, so bytes the device
/// did not write are recognisable.
pub const POISON: u8 = 0xa5;
/// Guest-physical address of the start of guest memory.
pub const GUEST_BASE: u64 = 0x10_0000;
/// How long a wait on the backend may take by default before it is an error.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of one virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;

/// Guest page size: rings and data areas start on page boundaries.
pub const PAGE: u64 = 4096;
/// `VRING_DESC_F_NEXT`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// `VRING_AVAIL_F_NO_INTERRUPT`.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`.
const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Largest split-ring size the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Virtio-blk feature bits 0..=23 are device-specific and all understood here (or harmless to
/// accept: they only describe config fields or permit requests the driver is free not to send).
const BLK_FEATURES: u64 = (1 << 24) - 1;
/// Transport features the driver implements. Everything else (packed rings, in-order, platform
/// access, notification data, ...) changes the ring format or semantics and is never acked.
const TRANSPORT_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// Everything that can go wrong between the driver and a backend.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot connect to the vhost-user socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user {message} failed")]
    Message {
        message: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the backend does not offer {0}")]
    MissingFeature(&'static str),
    #[error("the backend has {have} queues; {want} wanted")]
    TooFewQueues { have: u64, want: usize },
    #[error("invalid driver options: {0}")]
    Options(String),
    #[error("cannot set up guest memory")]
    Memory(#[source] std::io::Error),
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    #[error("guest memory access failed")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("eventfd operation failed")]
    EventFd(#[source] std::io::Error),
    #[error("queue {queue} was not set up")]
    NoSuchQueue { queue: usize },
    #[error(
        "queue {queue}: no completion within {timeout:?} ({in_flight} chains in flight, \
         avail index {avail}, used index {used})"
    )]
    Timeout {
        queue: usize,
        timeout: Duration,
        in_flight: u16,
        avail: u16,
        used: u16,
    },
    #[error("queue {queue}: the backend closed the connection")]
    Disconnected { queue: usize },
    #[error("queue {queue}: the used ring names descriptor {id}, which heads no chain in flight")]
    UnknownUsedId { queue: usize, id: u32 },
    #[error("queue {queue}: the used ring holds more elements than chains in flight")]
    TooManyUsed { queue: usize },
    #[error("queue {queue}: a chain of {descriptors} descriptors and {bytes} bytes does not fit in the ring or its {area}-byte data area")]
    ChainTooLarge {
        queue: usize,
        descriptors: usize,
        bytes: u64,
        area: u64,
    },
    #[error("config space is {got} bytes; at least {want} expected")]
    ConfigSize { got: usize, want: usize },
}

fn msg(message: &'static str) -> impl FnOnce(vhost::Error) -> DriverError {
    move |source| DriverError::Message { message, source }
}

// ------------------------------------------------------------------------------------------------
// Requests described as buffers.

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Buf {
    /// Device-readable: these bytes are sent to the device.
    Out(Vec<u8>),
    /// Device-writable: this many bytes the device may fill (pre-filled with [`POISON`]).
    In(u32),
    /// A descriptor naming any guest-physical range (possibly outside guest memory), placed
    /// as given: nothing is written there, and a device-writable one is not read back into the
    /// [`Completion`].
    Raw { addr: u64, len: u32, writable: bool },
}

/// The 16-byte `virtio_blk_outhdr`.
pub fn header(req_type: u32, sector: u64) -> Vec<u8> {
    header_bytes(req_type, sector).to_vec()
}

/// The 16-byte `virtio_blk_outhdr`, as an array.
pub fn header_bytes(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    // ioprio (bytes 4..8) stays 0.
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One `virtio_blk_discard_write_zeroes` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSeg {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl RangeSeg {
    pub fn new(sector: u64, num_sectors: u32, flags: u32) -> RangeSeg {
        RangeSeg {
            sector,
            num_sectors,
            flags,
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// Ready-made chains, laid out the way the Linux driver lays them out.
#[derive(Debug)]
pub struct Req;

impl Req {
    /// IN: header, `len` data bytes, status.
    pub fn read(sector: u64, len: u32) -> Vec<Buf> {
        vec![
            Buf::Out(header(VIRTIO_BLK_T_IN, sector)),
            Buf::In(len),
            Buf::In(1),
        ]
    }

    /// OUT: header, data, status.
    pub fn write(sector: u64, data: &[u8]) -> Vec<Buf> {
        vec![
            Buf::Out(header(VIRTIO_BLK_T_OUT, sector)),
            Buf::Out(data.to_vec()),
            Buf::In(1),
        ]
    }

    pub fn flush() -> Vec<Buf> {
        vec![Buf::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Buf::In(1)]
    }

    /// GET_ID: header, a 20-byte ID buffer, status.
    pub fn get_id() -> Vec<Buf> {
        vec![
            Buf::Out(header(VIRTIO_BLK_T_GET_ID, 0)),
            Buf::In(20),
            Buf::In(1),
        ]
    }

    pub fn discard(segs: &[RangeSeg]) -> Vec<Buf> {
        Self::range_op(VIRTIO_BLK_T_DISCARD, segs)
    }

    pub fn write_zeroes(segs: &[RangeSeg]) -> Vec<Buf> {
        Self::range_op(VIRTIO_BLK_T_WRITE_ZEROES, segs)
    }

    /// A header of any type (including unknown ones) with no data, and a status byte.
    pub fn raw(req_type: u32, sector: u64) -> Vec<Buf> {
        vec![Buf::Out(header(req_type, sector)), Buf::In(1)]
    }

    fn range_op(req_type: u32, segs: &[RangeSeg]) -> Vec<Buf> {
        let payload: Vec<u8> = segs.iter().flat_map(|s| s.to_bytes()).collect();
        vec![Buf::Out(header(req_type, 0)), Buf::Out(payload), Buf::In(1)]
    }
}

/// What the device returned for one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The head descriptor index the used element named.
    pub id: u32,
    /// The length in the used element.
    pub used_len: u32,
    /// The last device-writable byte (the status byte), or `None` if the chain had none.
    pub status: Option<u8>,
    /// Every device-writable byte before the status byte, in chain order.
    pub data: Vec<u8>,
}

impl Completion {
    /// Panics unless the request succeeded with `data_len` bytes of data.
    #[track_caller]
    pub fn assert_ok(&self, data_len: u32) {
        assert_eq!(
            (self.status, self.used_len),
            (Some(S_OK), data_len + 1),
            "request failed: status {:?}, used length {}",
            self.status,
            self.used_len
        );
    }
}

// ------------------------------------------------------------------------------------------------
// The driver.

/// How [`Driver`] sets the device up.
#[derive(Debug, Clone, Copy)]
pub struct DriverOptions {
    /// Queues to configure (at most what the device offers).
    pub num_queues: usize,
    /// Bytes of guest memory, split evenly between the queues (rings first, then data buffers).
    pub mem_size: usize,
    /// Entries per queue (a power of two).
    pub queue_size: u16,
    /// Acknowledge `VIRTIO_RING_F_EVENT_IDX` if the device offers it.
    pub event_idx: bool,
    /// How long any one wait for a completion may take.
    pub timeout: Duration,
    /// Seal the guest memory's memfd against shrinking and growing, as QEMU's
    /// memory-backend-memfd does by default (`seal=on`); the daemon refuses unsealed memory.
    /// `false` only to test that refusal.
    pub seal_memory: bool,
}

impl DriverOptions {
    pub fn new(num_queues: usize, mem_size: usize) -> DriverOptions {
        DriverOptions {
            num_queues,
            mem_size,
            queue_size: 256,
            event_idx: true,
            timeout: DEFAULT_TIMEOUT,
            seal_memory: true,
        }
    }

    /// Bytes of guest memory one queue's rings take with `queue_size` entries (each ring starts
    /// on a page).
    pub fn ring_bytes(queue_size: u16) -> u64 {
        let n = u64::from(queue_size);
        align_up(16 * n, PAGE) + align_up(6 + 2 * n, PAGE) + align_up(6 + 8 * n, PAGE)
    }
}

/// One used-ring element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The head descriptor index of the chain.
    pub id: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// Driver-side state of one split virtqueue and the guest memory given to it.
///
/// The primitives follow the virtio spec's driver side (2.7): descriptors are written with
/// [`VirtQueue::write_desc`], heads made available with [`VirtQueue::push`] and published at once
/// with [`VirtQueue::publish`], and the device kicked only when it asked to be
/// ([`VirtQueue::publish`]'s result). Completions come from [`VirtQueue::pop_used`];
/// [`VirtQueue::wait`] sleeps on the call eventfd until the used ring may have moved.
#[derive(Debug)]
pub struct VirtQueue {
    index: usize,
    size: u16,
    mem: Arc<GuestMemoryMmap>,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    data: GuestAddress,
    data_len: u64,
    kick: EventFd,
    call: EventFd,
    /// The backend's socket, watched for hang-ups while waiting.
    socket: RawFd,
    event_idx: bool,
    timeout: Duration,
    /// The avail index including chains pushed but not yet published.
    next_avail: u16,
    /// The avail index the device has been shown.
    published: u16,
    /// The used index consumed so far.
    last_used: u16,
    /// Chains published over the queue's life.
    submitted: u64,
}

impl VirtQueue {
    /// The queue's index on the device.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Entries in the ring.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The guest memory the queue lives in.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The part of guest memory after the rings that belongs to this queue alone, for buffers.
    pub fn data_area(&self) -> (GuestAddress, u64) {
        (self.data, self.data_len)
    }

    /// Chains published on this queue so far.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Chains made available and not yet seen in the used ring.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// How long one wait may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Writes descriptor `index` of the table.
    pub fn write_desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DriverError> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_obj(d, GuestAddress(self.desc.0 + 16 * u64::from(index)))?;
        Ok(())
    }

    /// Rewrites only the flags of descriptor `index`.
    pub fn set_desc_flags(&self, index: u16, flags: u16) -> Result<(), DriverError> {
        self.mem.write_obj(
            flags.to_le_bytes(),
            GuestAddress(self.desc.0 + 16 * u64::from(index) + 12),
        )?;
        Ok(())
    }

    /// Puts the chain headed by `head` in the next avail ring slot. The device sees it only after
    /// [`VirtQueue::publish`].
    pub fn push(&mut self, head: u16) -> Result<(), DriverError> {
        let slot = self.next_avail % self.size;
        self.mem
            .write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * u64::from(slot)))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Publishes every pushed chain with one store of the avail index and returns whether the
    /// device asked to be kicked for them (its avail event, or the used ring's NO_NOTIFY flag).
    pub fn publish(&mut self) -> Result<bool, DriverError> {
        let old = self.published;
        let new = self.next_avail;
        if old == new {
            return Ok(false);
        }
        // The descriptors and ring entries must be visible before the new index.
        fence(Ordering::Release);
        self.mem
            .store(new, GuestAddress(self.avail.0 + 2), Ordering::Release)?;
        self.published = new;
        self.submitted += u64::from(new.wrapping_sub(old));
        // The index store must be visible before the device's suppression state is read, or
        // both sides could decide the other will act.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event: u16 = self.mem.load(
                GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size)),
                Ordering::Acquire,
            )?;
            Ok(need_event(avail_event, new, old))
        } else {
            let flags: u16 = self
                .mem
                .load(GuestAddress(self.used.0), Ordering::Acquire)?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Notifies the device that chains are available.
    pub fn kick(&self) -> Result<(), DriverError> {
        self.kick.write(1).map_err(DriverError::EventFd)
    }

    /// The device's used index.
    fn used_idx(&self) -> Result<u16, DriverError> {
        Ok(self
            .mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)?)
    }

    /// The next used element, if the device has published one.
    pub fn pop_used(&mut self) -> Result<Option<Used>, DriverError> {
        let used_idx = self.used_idx()?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.next_avail.wrapping_sub(self.last_used) {
            return Err(DriverError::TooManyUsed { queue: self.index });
        }
        let slot = u64::from(self.last_used % self.size);
        let at = GuestAddress(self.used.0 + 4 + 8 * slot);
        let elem: [u8; 8] = self.mem.read_obj(at)?;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(Used {
            id: u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]),
            len: u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]),
        }))
    }

    /// Asks for a notification as soon as the device uses anything past what was consumed
    /// (writes `used_event` with EVENT_IDX; clears NO_INTERRUPT without it).
    pub fn enable_interrupts(&self) -> Result<(), DriverError> {
        if self.event_idx {
            self.mem.store(
                self.last_used,
                GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size)),
                Ordering::Release,
            )?;
        } else {
            self.mem
                .store(0u16, GuestAddress(self.avail.0), Ordering::Release)?;
        }
        Ok(())
    }

    /// Asks the device not to notify (for a driver that polls the used ring). With EVENT_IDX the
    /// used event is put just behind the consumed index, so the device notifies only after the
    /// used index wraps all the way round.
    pub fn disable_interrupts(&self) -> Result<(), DriverError> {
        self.mem.store(
            VRING_AVAIL_F_NO_INTERRUPT,
            GuestAddress(self.avail.0),
            Ordering::Release,
        )?;
        if self.event_idx {
            self.mem.store(
                self.last_used.wrapping_sub(1),
                GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size)),
                Ordering::Release,
            )?;
        }
        Ok(())
    }

    /// Returns once the used ring may hold something new: at once if it already does, otherwise
    /// after the device signals the call eventfd. Fails when `deadline` passes first or the
    /// backend hangs up.
    pub fn wait(&mut self, deadline: Instant) -> Result<(), DriverError> {
        if self.used_idx()? != self.last_used {
            return Ok(());
        }
        self.enable_interrupts()?;
        // The used event must be visible before the used index is read again, or a completion
        // published in between would go unsignalled.
        fence(Ordering::SeqCst);
        if self.used_idx()? != self.last_used {
            return Ok(());
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timeout_error());
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.socket,
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            let ms = libc::c_int::try_from((deadline - now).as_millis().max(1))
                .unwrap_or(libc::c_int::MAX);
            // SAFETY: `fds` is an array of two live pollfds and the count passed is its length.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DriverError::EventFd(e));
            }
            if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(DriverError::Disconnected { queue: self.index });
            }
            if fds[0].revents & libc::POLLIN != 0 {
                // Clear the counter; a notification racing with the read is caught by the
                // caller's next look at the used index.
                let _ = self.call.read();
                return Ok(());
            }
        }
    }

    /// Fails if the backend has hung up (checked without waiting).
    pub fn check_connected(&self) -> Result<(), DriverError> {
        let mut fd = libc::pollfd {
            fd: self.socket,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `fd` is one live pollfd and the count passed is 1.
        let rc = unsafe { libc::poll(&mut fd, 1, 0) };
        if rc > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(DriverError::Disconnected { queue: self.index });
        }
        Ok(())
    }

    // --------------------------------------------------------------------------------------------
    // Raw ring access, for tests that play a broken or hostile driver. None of these keep the
    // driver's bookkeeping consistent by themselves; `resync` puts it back in step.

    /// Guest addresses of the descriptor table, the avail ring and the used ring.
    pub fn ring_addrs(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        (self.desc, self.avail, self.used)
    }

    /// The driver's next avail index (chains pushed, published or not).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The used index the driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// The used index the device has published.
    pub fn device_used_idx(&self) -> Result<u16, DriverError> {
        self.used_idx()
    }

    /// Stores `idx` as the avail ring's index, whatever the driver has pushed: the device sees
    /// entries that were never made available, or loses some. The driver's own indices do not
    /// change.
    pub fn write_avail_idx_raw(&self, idx: u16) -> Result<(), DriverError> {
        fence(Ordering::Release);
        self.mem
            .store(idx, GuestAddress(self.avail.0 + 2), Ordering::Release)?;
        Ok(())
    }

    /// Writes `head` into avail ring slot `slot` (taken modulo the queue size) without making
    /// it available.
    pub fn write_avail_slot_raw(&self, slot: u16, head: u16) -> Result<(), DriverError> {
        let slot = slot % self.size;
        self.mem
            .write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * u64::from(slot)))?;
        Ok(())
    }

    /// Sets `used_event` (EVENT_IDX): the device is asked to notify once its used index moves
    /// past `idx`.
    pub fn set_used_event(&self, idx: u16) -> Result<(), DriverError> {
        self.mem.store(
            idx,
            GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size)),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Whether the device signalled the call eventfd since it was last cleared; clears it.
    /// Never waits.
    pub fn take_call(&self) -> Result<bool, DriverError> {
        match self.call.read() {
            Ok(n) => Ok(n > 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(DriverError::EventFd(e)),
        }
    }

    /// Skips every used element the device has published and the driver has not consumed
    /// (for a driver that stopped draining its used ring); returns how many.
    pub fn skip_used(&mut self) -> Result<u16, DriverError> {
        let used = self.used_idx()?;
        let skipped = used.wrapping_sub(self.last_used);
        self.last_used = used;
        Ok(skipped)
    }

    /// The error for a wait that ran out of time.
    pub fn timeout_error(&self) -> DriverError {
        DriverError::Timeout {
            queue: self.index,
            timeout: self.timeout,
            in_flight: self.in_flight(),
            avail: self.next_avail,
            used: self.used_idx().unwrap_or(self.last_used),
        }
    }
}

/// The virtio `vring_need_event`: whether moving an index from `old` to `new` crosses `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Where one submitted chain's device-writable buffers are.
#[derive(Debug)]
struct Pending {
    head: u16,
    writable: Vec<(GuestAddress, u32)>,
}

/// A vhost-user frontend acting as the guest's virtio-blk driver. Queues may be driven from
/// different threads at once (`&self` methods; each queue has its own lock and memory).
pub struct Driver {
    frontend: Frontend,
    mem: Arc<GuestMemoryMmap>,
    host_base: u64,
    device_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queues: Vec<Mutex<VirtQueue>>,
    options: DriverOptions,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("queues", &self.queues)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Connects, negotiates, shares guest memory and starts `options.num_queues` queues.
    pub fn connect(path: &Path, options: DriverOptions) -> Result<Driver, DriverError> {
        if options.num_queues == 0 {
            return Err(DriverError::Options("at least one queue is needed".into()));
        }
        if !options.queue_size.is_power_of_two() || options.queue_size > MAX_QUEUE_SIZE {
            return Err(DriverError::Options(format!(
                "queue size {} is not a power of two up to {MAX_QUEUE_SIZE}",
                options.queue_size
            )));
        }
        let frontend = Frontend::connect(path, options.num_queues as u64).map_err(|source| {
            DriverError::Connect {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let mut fe = frontend.clone();

        frontend.set_owner().map_err(msg("SET_OWNER"))?;
        let device_features = frontend.get_features().map_err(msg("GET_FEATURES"))?;
        if device_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(DriverError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        if device_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(DriverError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }

        let offered = fe
            .get_protocol_features()
            .map_err(msg("GET_PROTOCOL_FEATURES"))?;
        let protocol_features = offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::LOG_SHMFD);
        fe.set_protocol_features(protocol_features)
            .map_err(msg("SET_PROTOCOL_FEATURES"))?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later message is acknowledged, so a failure shows up at the message that
            // caused it.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let have = fe.get_queue_num().map_err(msg("GET_QUEUE_NUM"))?;
            if have < options.num_queues as u64 {
                return Err(DriverError::TooFewQueues {
                    have,
                    want: options.num_queues,
                });
            }
        } else if options.num_queues != 1 {
            return Err(DriverError::TooFewQueues {
                have: 1,
                want: options.num_queues,
            });
        }

        let mut acked_features = device_features
            & (BLK_FEATURES
                | TRANSPORT_FEATURES
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        if !options.event_idx {
            acked_features &= !(1u64 << VIRTIO_RING_F_EVENT_IDX);
        }
        frontend
            .set_features(acked_features)
            .map_err(msg("SET_FEATURES"))?;

        let (mem, host_base) = guest_memory(options.mem_size, options.seal_memory)?;
        let region = mem
            .find_region(GuestAddress(GUEST_BASE))
            .ok_or(DriverError::GuestMemory(
                vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(GUEST_BASE)),
            ))?;
        let region = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(msg("describing the guest memory region"))?;
        frontend
            .set_mem_table(&[region])
            .map_err(msg("SET_MEM_TABLE"))?;

        let mut driver = Driver {
            frontend,
            mem: Arc::new(mem),
            host_base,
            device_features,
            acked_features,
            protocol_features,
            queues: Vec::new(),
            options,
        };
        let area = (options.mem_size as u64 / options.num_queues as u64) & !(PAGE - 1);
        for index in 0..options.num_queues {
            let base = GuestAddress(GUEST_BASE + index as u64 * area);
            let q = driver.start_queue(&mut fe, index, base, area)?;
            driver.queues.push(Mutex::new(q));
        }
        Ok(driver)
    }

    fn start_queue(
        &self,
        fe: &mut Frontend,
        index: usize,
        base: GuestAddress,
        area: u64,
    ) -> Result<VirtQueue, DriverError> {
        let size = self.options.queue_size;
        let n = u64::from(size);
        let desc = base;
        let avail = GuestAddress(align_up(desc.0 + 16 * n, PAGE));
        let used = GuestAddress(align_up(avail.0 + 6 + 2 * n, PAGE));
        let data = GuestAddress(align_up(used.0 + 6 + 8 * n, PAGE));
        let end = base.0 + area;
        if data.0 + PAGE > end {
            return Err(DriverError::Options(format!(
                "{area} bytes per queue is too little for queue size {size}"
            )));
        }
        let mut q = VirtQueue {
            index,
            size,
            mem: self.mem.clone(),
            desc,
            avail,
            used,
            data,
            data_len: end - data.0,
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::EventFd)?,
            call: EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::EventFd)?,
            socket: self.frontend.as_raw_fd(),
            event_idx: self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            timeout: self.options.timeout,
            next_avail: 0,
            published: 0,
            last_used: 0,
            submitted: 0,
        };
        // The rings start zeroed (a new memfd), as the device expects.
        self.program_queue(fe, &mut q)?;
        Ok(q)
    }

    /// Sends the queue's size, ring addresses, base (the driver's avail index) and fresh
    /// eventfds, and enables it.
    fn program_queue(&self, fe: &mut Frontend, q: &mut VirtQueue) -> Result<(), DriverError> {
        let index = q.index;
        fe.set_vring_num(index, q.size)
            .map_err(msg("SET_VRING_NUM"))?;
        fe.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: self.host_addr(q.desc),
                used_ring_addr: self.host_addr(q.used),
                avail_ring_addr: self.host_addr(q.avail),
                log_addr: None,
            },
        )
        .map_err(msg("SET_VRING_ADDR"))?;
        fe.set_vring_base(index, q.next_avail)
            .map_err(msg("SET_VRING_BASE"))?;
        q.call = EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::EventFd)?;
        q.kick = EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::EventFd)?;
        fe.set_vring_call(index, &q.call)
            .map_err(msg("SET_VRING_CALL"))?;
        fe.set_vring_kick(index, &q.kick)
            .map_err(msg("SET_VRING_KICK"))?;
        fe.set_vring_enable(index, true)
            .map_err(msg("SET_VRING_ENABLE"))?;
        Ok(())
    }

    fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.host_base + (gpa.0 - GUEST_BASE)
    }

    /// Starts dirty-page logging as QEMU does when a live migration begins: a shared log of
    /// one bit per 4 KiB guest page (by guest physical address), handed over with
    /// `SET_LOG_BASE`, then `VHOST_F_LOG_ALL` acked with `SET_FEATURES`. Needs the device to
    /// offer both (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
    pub fn start_dirty_log(&self) -> Result<DirtyLog, DriverError> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
            || self.device_features & VhostUserVirtioFeatures::LOG_ALL.bits() == 0
        {
            return Err(DriverError::MissingFeature(
                "VHOST_F_LOG_ALL with VHOST_USER_PROTOCOL_F_LOG_SHMFD",
            ));
        }
        let pages = (GUEST_BASE + self.options.mem_size as u64).div_ceil(PAGE);
        let size = align_up(pages.div_ceil(8), PAGE);
        let name = c"dovetail-dirty-log";
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create only reads it.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(DriverError::Memory(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(DriverError::Memory)?;
        let map = vm_memory::MmapRegion::<()>::from_file(FileOffset::new(file, 0), size as usize)
            .map_err(|e| DriverError::Memory(std::io::Error::other(e.to_string())))?;
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: map.file_offset().map_or(-1, |f| f.file().as_raw_fd()),
        };
        self.frontend
            .set_log_base(0, Some(region))
            .map_err(msg("SET_LOG_BASE"))?;
        self.frontend
            .set_features(self.acked_features | VhostUserVirtioFeatures::LOG_ALL.bits())
            .map_err(msg("SET_FEATURES"))?;
        Ok(DirtyLog { map })
    }

    /// Sends every queue's ring addresses again with `VHOST_VRING_F_LOG` set (`on`) or clear,
    /// the used ring's guest address as the log address: what QEMU's `vhost_dev_set_log` does
    /// right after `SET_FEATURES` when a migration starts or ends, on queues that are running.
    pub fn log_vring_addrs(&self, on: bool) -> Result<(), DriverError> {
        let fe = self.frontend.clone();
        for q in &self.queues {
            let q = q.lock().unwrap_or_else(|p| p.into_inner());
            fe.set_vring_addr(
                q.index,
                &VringConfigData {
                    queue_max_size: q.size,
                    queue_size: q.size,
                    flags: if on {
                        VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
                    } else {
                        0
                    },
                    desc_table_addr: self.host_addr(q.desc),
                    used_ring_addr: self.host_addr(q.used),
                    avail_ring_addr: self.host_addr(q.avail),
                    log_addr: on.then_some(q.used.0),
                },
            )
            .map_err(msg("SET_VRING_ADDR"))?;
        }
        Ok(())
    }

    /// Sends the memory table again (`SET_MEM_TABLE`, the same region), as QEMU's
    /// `vhost_commit` does on running queues whenever the guest's memory map changes, a
    /// migration running or not.
    pub fn resend_mem_table(&self) -> Result<(), DriverError> {
        let region =
            self.mem
                .find_region(GuestAddress(GUEST_BASE))
                .ok_or(DriverError::GuestMemory(
                    vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(GUEST_BASE)),
                ))?;
        let region = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(msg("describing the guest memory region"))?;
        self.frontend
            .set_mem_table(&[region])
            .map_err(msg("SET_MEM_TABLE"))?;
        Ok(())
    }

    /// Enables or disables `queue` (`SET_VRING_ENABLE`), as QEMU's `vhost_dev_stop` disables
    /// every queue before it stops them. Does not wait for the queue's submitter.
    pub fn set_queue_enabled(&self, queue: usize, on: bool) -> Result<(), DriverError> {
        let mut fe = self.frontend.clone();
        fe.set_vring_enable(queue, on)
            .map_err(msg("SET_VRING_ENABLE"))
    }

    /// Stops dirty-page logging (`SET_FEATURES` without `VHOST_F_LOG_ALL`), as QEMU does when
    /// a migration is cancelled.
    pub fn stop_dirty_log(&self) -> Result<(), DriverError> {
        self.frontend
            .set_features(self.acked_features)
            .map_err(msg("SET_FEATURES"))
    }

    /// The feature bits the device offered.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The feature bits this driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The shared guest memory, for callers that build chains by hand.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Reads `len` bytes of the device config space from `offset` (GET_CONFIG).
    pub fn config(&self, offset: u32, len: u32) -> Result<Vec<u8>, DriverError> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(DriverError::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        let mut fe = self.frontend.clone();
        let (_, data) = fe
            .get_config(
                offset,
                len,
                VhostUserConfigFlags::empty(),
                &vec![0u8; len as usize],
            )
            .map_err(msg("GET_CONFIG"))?;
        Ok(data)
    }

    /// Sets up the backend request channel (SET_BACKEND_REQ_FD) and returns what arrives on
    /// it: the device's config-change notifications (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`),
    /// answered as QEMU answers them (with REPLY_ACK, a zero reply). A thread serves the
    /// channel until the device closes it.
    pub fn config_changes(&self) -> Result<ConfigChanges, DriverError> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            return Err(DriverError::MissingFeature(
                "VHOST_USER_PROTOCOL_F_BACKEND_REQ",
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut handler =
            vhost::vhost_user::FrontendReqHandler::new(Arc::new(Mutex::new(ConfigNotices(tx))))
                .map_err(|e| {
                    DriverError::Options(format!("cannot create the backend request channel: {e}"))
                })?;
        handler.set_reply_ack_flag(
            self.protocol_features
                .contains(VhostUserProtocolFeatures::REPLY_ACK),
        );
        let mut fe = self.frontend.clone();
        fe.set_backend_request_fd(&RawDescriptor(handler.get_tx_raw_fd()))
            .map_err(msg("SET_BACKEND_REQ_FD"))?;
        std::thread::Builder::new()
            .name("backend-req".into())
            .spawn(move || while handler.handle_request().is_ok() {})
            .map_err(|e| DriverError::Options(format!("cannot start the channel's thread: {e}")))?;
        Ok(ConfigChanges { rx })
    }

    /// The virtio-blk config space up to the write-zeroes fields ([`BLK_CONFIG_LEN`] bytes),
    /// decoded.
    pub fn blk_config(&self) -> Result<BlkConfig, DriverError> {
        BlkConfig::parse(&self.config(0, BLK_CONFIG_LEN as u32)?)
    }

    /// Locks `queue` for the caller's exclusive use.
    pub fn queue(&self, queue: usize) -> Result<MutexGuard<'_, VirtQueue>, DriverError> {
        Ok(self
            .queues
            .get(queue)
            .ok_or(DriverError::NoSuchQueue { queue })?
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    /// Submits one chain on `queue` and waits for its completion.
    pub fn submit(&self, queue: usize, bufs: &[Buf]) -> Result<Completion, DriverError> {
        let mut done = self.submit_batch(queue, &[bufs])?;
        done.pop().ok_or(DriverError::TooManyUsed { queue })
    }

    /// Makes every chain available on `queue` at once (one kick per group that fits in the ring
    /// and the queue's data area), waits for all of them, and returns their completions in
    /// submission order.
    pub fn submit_batch<R: AsRef<[Buf]>>(
        &self,
        queue: usize,
        requests: &[R],
    ) -> Result<Vec<Completion>, DriverError> {
        let mut q = self.queue(queue)?;
        let mut out = Vec::with_capacity(requests.len());
        let mut start = 0;
        while start < requests.len() {
            // The largest group starting at `start` that fits in the descriptor table and the
            // data area.
            let (mut descs, mut bytes, mut end) = (0u64, 0u64, start);
            while end < requests.len() {
                let bufs = requests[end].as_ref();
                let d = bufs.len() as u64;
                let b: u64 = bufs
                    .iter()
                    .map(|b| align_up(u64::from(data_len(b)), 16))
                    .sum();
                if descs + d > u64::from(q.size) || bytes + b > q.data_len {
                    break;
                }
                descs += d;
                bytes += b;
                end += 1;
            }
            if end == start {
                let bufs = requests[start].as_ref();
                return Err(DriverError::ChainTooLarge {
                    queue,
                    descriptors: bufs.len(),
                    bytes: bufs.iter().map(|b| u64::from(data_len(b))).sum(),
                    area: q.data_len,
                });
            }
            out.extend(self.run_group(&mut q, &requests[start..end])?);
            start = end;
        }
        Ok(out)
    }

    /// Places a group of chains (descriptors from index 0, buffers from the start of the data
    /// area: the previous group has completed), publishes them, kicks and waits.
    fn run_group<R: AsRef<[Buf]>>(
        &self,
        q: &mut VirtQueue,
        requests: &[R],
    ) -> Result<Vec<Completion>, DriverError> {
        let mem = &*self.mem;
        let mut next_desc: u16 = 0;
        let mut data = q.data;
        let mut pending = Vec::with_capacity(requests.len());
        for bufs in requests {
            let bufs = bufs.as_ref();
            if bufs.is_empty() {
                return Err(DriverError::Options(
                    "a chain needs at least one descriptor".into(),
                ));
            }
            let head = next_desc;
            let mut writable = Vec::new();
            for (i, buf) in bufs.iter().enumerate() {
                let (addr, len, mut flags) = match buf {
                    Buf::Out(bytes) => {
                        mem.write_slice(bytes, data)?;
                        (data, buf_len(buf)?, 0)
                    }
                    Buf::In(n) => {
                        mem.write_slice(&vec![POISON; *n as usize], data)?;
                        writable.push((data, *n));
                        (data, *n, VRING_DESC_F_WRITE)
                    }
                    Buf::Raw {
                        addr,
                        len,
                        writable,
                    } => {
                        let flags = if *writable { VRING_DESC_F_WRITE } else { 0 };
                        (GuestAddress(*addr), *len, flags)
                    }
                };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                q.write_desc(next_desc, addr.0, len, flags, next_desc.wrapping_add(1))?;
                next_desc += 1;
                data = GuestAddress(data.0 + align_up(u64::from(data_len(buf)), 16));
            }
            q.push(head)?;
            pending.push(Pending { head, writable });
        }
        // Ask for a notification as soon as anything is used.
        q.enable_interrupts()?;
        q.publish()?;
        // Always kick: with EVENT_IDX this may be more often than avail_event asks for, which
        // the spec allows.
        q.kick()?;

        let mut done: Vec<Option<Completion>> = vec![None; requests.len()];
        let mut remaining = requests.len();
        let deadline = Instant::now() + q.timeout;
        while remaining > 0 {
            let Some(used) = q.pop_used()? else {
                q.wait(deadline)?;
                continue;
            };
            let k = pending
                .iter()
                .position(|p| u32::from(p.head) == used.id)
                .filter(|&k| done[k].is_none())
                .ok_or(DriverError::UnknownUsedId {
                    queue: q.index,
                    id: used.id,
                })?;
            let mut bytes = Vec::new();
            for &(addr, len) in &pending[k].writable {
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, addr)?;
                bytes.extend_from_slice(&b);
            }
            let status = bytes.pop();
            done[k] = Some(Completion {
                id: used.id,
                used_len: used.len,
                status,
                data: bytes,
            });
            remaining -= 1;
        }
        Ok(done.into_iter().flatten().collect())
    }

    /// Chains submitted on `queue` so far.
    pub fn submitted(&self, queue: usize) -> Result<u64, DriverError> {
        Ok(self.queue(queue)?.submitted)
    }

    /// Stops `queue` as QEMU does when the guest stops (GET_VRING_BASE) and returns the
    /// device's next avail index.
    pub fn stop_queue(&self, queue: usize) -> Result<u16, DriverError> {
        let _q = self.queue(queue)?;
        let base = self
            .frontend
            .get_vring_base(queue)
            .map_err(msg("GET_VRING_BASE"))?;
        // The index is 16 bits on a split ring; anything above is the backend's error.
        Ok(base as u16)
    }

    /// Starts a stopped `queue` again. With `fresh`, the rings are zeroed and indices start from
    /// 0, as after a guest driver reload; without it, the rings and indices carry on, as when a
    /// stopped guest resumes.
    pub fn restart_queue(&self, queue: usize, fresh: bool) -> Result<(), DriverError> {
        let mut q = self.queue(queue)?;
        if fresh {
            let rings = (q.data.0 - q.desc.0) as usize;
            self.mem.write_slice(&vec![0u8; rings], q.desc)?;
            q.next_avail = 0;
            q.published = 0;
            q.last_used = 0;
        }
        let mut fe = self.frontend.clone();
        self.program_queue(&mut fe, &mut q)
    }

    /// Gives running queue `queue` a new call eventfd (QEMU switches a running queue's between
    /// its own handler and KVM's irqfd), then waits up to `wait` for the backend to signal it
    /// with nothing submitted, as libvhost-user does so that a completion signalled on the old
    /// fd is not lost. Whether it did; the queue keeps the new fd.
    pub fn replace_call(&self, queue: usize, wait: Duration) -> Result<bool, DriverError> {
        let mut q = self.queue(queue)?;
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(DriverError::EventFd)?;
        let fe = self.frontend.clone();
        fe.set_vring_call(q.index, &call)
            .map_err(msg("SET_VRING_CALL"))?;
        q.call = call;
        let mut fd = libc::pollfd {
            fd: q.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd, and the count passed is 1.
        let rc = unsafe { libc::poll(&mut fd, 1, ms) };
        if rc < 0 {
            return Err(DriverError::EventFd(std::io::Error::last_os_error()));
        }
        Ok(rc > 0 && q.call.read().is_ok())
    }
}

/// Bytes of `virtio_blk_config` up to and including `write_zeroes_may_unmap` and its padding.
/// Later fields (secure erase, zoned) are newer than some backends: qemu-storage-daemon 7.2
/// refuses a GET_CONFIG longer than this.
pub const BLK_CONFIG_LEN: usize = offset_of!(virtio_blk_config, write_zeroes_may_unmap) + 4;

/// The fields of `virtio_blk_config` the driver looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    pub fn parse(c: &[u8]) -> Result<BlkConfig, DriverError> {
        if c.len() < BLK_CONFIG_LEN {
            return Err(DriverError::ConfigSize {
                got: c.len(),
                want: BLK_CONFIG_LEN,
            });
        }
        let u32_at = |off: usize| u32::from_le_bytes([c[off], c[off + 1], c[off + 2], c[off + 3]]);
        let cap = offset_of!(virtio_blk_config, capacity);
        let nq = offset_of!(virtio_blk_config, num_queues);
        let mut capacity = [0u8; 8];
        capacity.copy_from_slice(&c[cap..cap + 8]);
        Ok(BlkConfig {
            capacity: u64::from_le_bytes(capacity),
            size_max: u32_at(offset_of!(virtio_blk_config, size_max)),
            seg_max: u32_at(offset_of!(virtio_blk_config, seg_max)),
            blk_size: u32_at(offset_of!(virtio_blk_config, blk_size)),
            num_queues: u16::from_le_bytes([c[nq], c[nq + 1]]),
            max_discard_sectors: u32_at(offset_of!(virtio_blk_config, max_discard_sectors)),
            max_discard_seg: u32_at(offset_of!(virtio_blk_config, max_discard_seg)),
            discard_sector_alignment: u32_at(offset_of!(
                virtio_blk_config,
                discard_sector_alignment
            )),
            max_write_zeroes_sectors: u32_at(offset_of!(
                virtio_blk_config,
                max_write_zeroes_sectors
            )),
            max_write_zeroes_seg: u32_at(offset_of!(virtio_blk_config, max_write_zeroes_seg)),
            write_zeroes_may_unmap: c[offset_of!(virtio_blk_config, write_zeroes_may_unmap)],
        })
    }
}

fn buf_len(buf: &Buf) -> Result<u32, DriverError> {
    match buf {
        Buf::Out(b) => u32::try_from(b.len()).map_err(|_| {
            DriverError::Options(format!("a {}-byte buffer exceeds a descriptor", b.len()))
        }),
        Buf::In(n) => Ok(*n),
        Buf::Raw { len, .. } => Ok(*len),
    }
}

/// Bytes of the queue's data area a buffer takes.
fn data_len(buf: &Buf) -> u32 {
    match buf {
        Buf::Raw { .. } => 0,
        Buf::Out(b) => u32::try_from(b.len()).unwrap_or(u32::MAX),
        Buf::In(n) => *n,
    }
}

/// `v` rounded up to a multiple of `to`.
pub fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// A memfd of `size` bytes mapped as guest memory at [`GUEST_BASE`], sealed (`seal`) against
/// shrinking, growing and further sealing as QEMU's memory-backend-memfd seals it. Returns the
/// memory and the host address of its start.
fn guest_memory(size: usize, seal: bool) -> Result<(GuestMemoryMmap, u64), DriverError> {
    let name = c"dovetail-guest";
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create only reads it.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(DriverError::Memory(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).map_err(DriverError::Memory)?;
    if seal {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS only changes the seals of the memfd `file` owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(DriverError::Memory(std::io::Error::last_os_error()));
        }
    }
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(GUEST_BASE),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(DriverError::Mmap)?;
    let host = mem.get_host_address(GuestAddress(GUEST_BASE))? as u64;
    Ok((mem, host))
}

/// The dirty-page log a frontend shares with the device ([`Driver::start_dirty_log`]).
#[derive(Debug)]
pub struct DirtyLog {
    map: vm_memory::MmapRegion<()>,
}

impl DirtyLog {
    /// Whether the 4 KiB guest page holding `gpa` is marked dirty.
    pub fn dirty(&self, gpa: GuestAddress) -> bool {
        let page = gpa.0 / PAGE;
        let byte = (page / 8) as usize;
        if byte >= self.map.size() {
            return false;
        }
        // SAFETY: `byte` is within the mapping, which lives as long as `self`; the device sets
        // bits concurrently with atomic ORs, so the byte is read volatile.
        let v = unsafe { std::ptr::read_volatile(self.map.as_ptr().add(byte)) };
        v & (1 << (page % 8)) != 0
    }

    /// The dirty pages of `gpa..gpa + len` (counted in 4 KiB pages).
    pub fn dirty_pages(&self, gpa: GuestAddress, len: u64) -> u64 {
        let first = gpa.0 / PAGE;
        let last = (gpa.0 + len.max(1) - 1) / PAGE;
        (first..=last)
            .filter(|p| self.dirty(GuestAddress(p * PAGE)))
            .count() as u64
    }

    /// Clears every bit, as QEMU does after it copied the pages.
    pub fn clear(&self) {
        // SAFETY: the whole mapping, owned by `self`.
        unsafe { std::ptr::write_bytes(self.map.as_ptr(), 0, self.map.size()) };
    }
}

/// A descriptor number, to hand to an API that takes `&dyn AsRawFd`.
struct RawDescriptor(RawFd);

impl AsRawFd for RawDescriptor {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// What the backend request channel's thread reports.
struct ConfigNotices(std::sync::mpsc::Sender<()>);

impl vhost::vhost_user::VhostUserFrontendReqHandlerMut for ConfigNotices {
    fn handle_config_change(&mut self) -> vhost::vhost_user::HandlerResult<u64> {
        let _ = self.0.send(());
        Ok(0)
    }
}

/// The config-change notifications a device sent ([`Driver::config_changes`]).
#[derive(Debug)]
pub struct ConfigChanges {
    rx: std::sync::mpsc::Receiver<()>,
}

impl ConfigChanges {
    /// Waits up to `timeout` for the next notification; whether one came.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.rx.recv_timeout(timeout).is_ok()
    }

    /// Notifications received and not yet waited for.
    pub fn pending(&self) -> usize {
        self.rx.try_iter().count()
    }
}
