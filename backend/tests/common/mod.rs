//! Test plumbing shared by the integration tests and load generators: a daemon running `serve` in
//! a background thread, and an in-process vhost-user frontend that acts as the guest driver.
//!
//! The driver owns guest memory (a memfd shared with the daemon), negotiates over the daemon's
//! socket like QEMU does, lays out one split virtqueue per queue in that memory, and submits
//! descriptor chains on them, waiting for completions on the call eventfd with a timeout.

#![allow(dead_code)]

use std::fs::File;
use std::mem::{offset_of, size_of};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dovetail_backend::{listen, serve, DeviceConfig, Disk, ListenOn, ServeError, Shutdown};
use dovetail_layout::raw::RawOptions;
use dovetail_layout::RawLayout;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
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
/// Serial given to disks made by the helpers below.
pub const SERIAL: &str = "dovetail-test-0001";

/// Byte the driver fills device-writable buffers with before submitting, so bytes the device
/// did not write are recognisable.
pub const POISON: u8 = 0xa5;
/// Guest-physical address of the start of guest memory.
pub const GUEST_BASE: u64 = 0x10_0000;
/// How long any wait on the daemon may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);

const PAGE: u64 = 4096;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Enables `RUST_LOG=...` output in tests (once per process).
pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

// ------------------------------------------------------------------------------------------------
// Disks and the daemon.

/// Creates a zero-filled raw image of `size` bytes at `path` and serves it.
pub fn raw_disk(path: &Path, size: u64, read_only: bool) -> Arc<Disk> {
    let layout = RawLayout::open(
        path,
        RawOptions {
            create_size: Some(size),
            read_only,
        },
    )
    .expect("create raw image");
    Arc::new(Disk::new(Arc::new(layout), read_only, SERIAL).expect("serial fits"))
}

/// Opens an existing raw image.
pub fn open_raw_disk(path: &Path, read_only: bool) -> Arc<Disk> {
    let layout = RawLayout::open(
        path,
        RawOptions {
            create_size: None,
            read_only,
        },
    )
    .expect("open raw image");
    Arc::new(Disk::new(Arc::new(layout), read_only, SERIAL).expect("serial fits"))
}

/// `serve` running in a background thread on a socket in a temporary directory.
#[derive(Debug)]
pub struct TestServer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    shutdown: Arc<Shutdown>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    /// Listens on a fresh socket and serves `disk` with `num_queues` queues.
    pub fn start(disk: Arc<Disk>, num_queues: usize) -> TestServer {
        init_logging();
        let dir = tempfile::tempdir().expect("socket tempdir");
        let socket = dir.path().join("vhost-user-blk.sock");
        // Bound before the thread starts, so a frontend may connect as soon as this returns.
        let mut listener = listen(&ListenOn::Path(socket.clone())).expect("listen");
        let shutdown = Shutdown::new().expect("shutdown event");
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || serve(disk, DeviceConfig { num_queues }, &mut listener, &stop))
            .expect("spawn serve thread");
        TestServer {
            dir,
            socket,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The socket a frontend connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Asks `serve` to stop and returns what it returned; fails the test if it does not return
    /// within [`TIMEOUT`].
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown.request();
        let thread = self.thread.take().expect("server still running");
        let deadline = Instant::now() + TIMEOUT;
        while !thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "serve did not return within {TIMEOUT:?} of a shutdown request"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        thread.join().expect("serve thread panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Reached only when a test failed before `stop`: do not hang the test binary on it.
        if let Some(thread) = self.thread.take() {
            self.shutdown.request();
            let deadline = Instant::now() + TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Requests.

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
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&req_type.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
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
    /// Fails the test unless the request succeeded with `data_len` bytes of data.
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

/// How [`TestDriver`] sets the device up.
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
}

impl DriverOptions {
    pub fn new(num_queues: usize, mem_size: usize) -> DriverOptions {
        DriverOptions {
            num_queues,
            mem_size,
            queue_size: 256,
            event_idx: true,
        }
    }
}

/// Driver-side state of one split virtqueue.
#[derive(Debug)]
struct DriverQueue {
    index: usize,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    data: GuestAddress,
    data_len: u64,
    kick: EventFd,
    call: EventFd,
    /// The avail index published so far.
    next_avail: u16,
    /// The used index consumed so far.
    last_used: u16,
    /// Chains submitted over the queue's life.
    submitted: u64,
}

/// Where one submitted chain's device-writable buffers are.
#[derive(Debug)]
struct Pending {
    head: u16,
    writable: Vec<(GuestAddress, u32)>,
}

/// A vhost-user frontend acting as the guest's virtio-blk driver. Queues may be driven from
/// different threads at once (`&self` methods; each queue has its own lock and memory).
pub struct TestDriver {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    host_base: u64,
    device_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queues: Vec<Mutex<DriverQueue>>,
    options: DriverOptions,
}

impl std::fmt::Debug for TestDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDriver")
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("queues", &self.queues)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl TestDriver {
    /// Connects with default options: queue size 256, EVENT_IDX on.
    pub fn connect(path: &Path, num_queues: usize, mem_size: usize) -> TestDriver {
        Self::connect_with(path, DriverOptions::new(num_queues, mem_size))
    }

    /// Connects, negotiates, shares guest memory and starts `options.num_queues` queues.
    pub fn connect_with(path: &Path, options: DriverOptions) -> TestDriver {
        assert!(options.num_queues > 0, "at least one queue");
        assert!(
            options.queue_size.is_power_of_two(),
            "queue size must be a power of two"
        );
        let frontend = Frontend::connect(path, options.num_queues as u64)
            .expect("connect to the daemon socket");
        let mut fe = frontend.clone();

        frontend.set_owner().expect("SET_OWNER");
        let device_features = frontend.get_features().expect("GET_FEATURES");
        assert_ne!(
            device_features & (1 << VIRTIO_F_VERSION_1),
            0,
            "device does not offer VIRTIO_F_VERSION_1: {device_features:#x}"
        );
        assert_ne!(
            device_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "device does not offer VHOST_USER_F_PROTOCOL_FEATURES: {device_features:#x}"
        );

        let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let protocol_features = offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(protocol_features)
            .expect("SET_PROTOCOL_FEATURES");
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later message is acknowledged, so a failure shows up at the message that
            // caused it.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num().expect("GET_QUEUE_NUM");
            assert!(
                n >= options.num_queues as u64,
                "device has {n} queues, {} wanted",
                options.num_queues
            );
        } else {
            assert_eq!(options.num_queues, 1, "device has no MQ protocol feature");
        }

        let mut acked_features = device_features;
        if !options.event_idx {
            acked_features &= !(1u64 << VIRTIO_RING_F_EVENT_IDX);
        }
        frontend.set_features(acked_features).expect("SET_FEATURES");

        let (mem, host_base) = guest_memory(options.mem_size);
        let region = VhostUserMemoryRegionInfo::from_guest_region(
            mem.find_region(GuestAddress(GUEST_BASE))
                .expect("guest memory region"),
        )
        .expect("guest memory region is backed by the memfd");
        frontend.set_mem_table(&[region]).expect("SET_MEM_TABLE");

        let mut driver = TestDriver {
            frontend,
            mem,
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
            let q = driver.start_queue(&mut fe, index, base, area);
            driver.queues.push(Mutex::new(q));
        }
        driver
    }

    fn start_queue(
        &self,
        fe: &mut Frontend,
        index: usize,
        base: GuestAddress,
        area: u64,
    ) -> DriverQueue {
        let size = self.options.queue_size;
        let n = u64::from(size);
        let desc = base;
        let avail = GuestAddress(align_up(desc.0 + 16 * n, PAGE));
        let used = GuestAddress(align_up(avail.0 + 6 + 2 * n, PAGE));
        let data = GuestAddress(align_up(used.0 + 6 + 8 * n, PAGE));
        let end = base.0 + area;
        assert!(
            data.0 + PAGE <= end,
            "{area} bytes per queue is too little for queue size {size}"
        );
        let mut q = DriverQueue {
            index,
            size,
            desc,
            avail,
            used,
            data,
            data_len: end - data.0,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd"),
            next_avail: 0,
            last_used: 0,
            submitted: 0,
        };
        // The rings start zeroed (a new memfd), as the device expects.
        self.program_queue(fe, &mut q);
        q
    }

    /// Sends the queue's size, ring addresses, base (the driver's avail index) and fresh
    /// eventfds, and enables it.
    fn program_queue(&self, fe: &mut Frontend, q: &mut DriverQueue) {
        let index = q.index;
        fe.set_vring_num(index, q.size).expect("SET_VRING_NUM");
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
        .expect("SET_VRING_ADDR");
        fe.set_vring_base(index, q.next_avail)
            .expect("SET_VRING_BASE");
        q.call = EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd");
        q.kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd");
        fe.set_vring_call(index, &q.call).expect("SET_VRING_CALL");
        fe.set_vring_kick(index, &q.kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(index, true).expect("SET_VRING_ENABLE");
    }

    fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.host_base + (gpa.0 - GUEST_BASE)
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

    /// The shared guest memory, for tests that build chains by hand.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Reads `len` bytes of the device config space from `offset` (GET_CONFIG).
    pub fn config(&self, offset: u32, len: u32) -> Vec<u8> {
        let mut fe = self.frontend.clone();
        let (_, data) = fe
            .get_config(
                offset,
                len,
                VhostUserConfigFlags::empty(),
                &vec![0u8; len as usize],
            )
            .expect("GET_CONFIG");
        data
    }

    /// The whole `virtio_blk_config`, decoded.
    pub fn blk_config(&self) -> BlkConfig {
        BlkConfig::parse(&self.config(0, size_of::<virtio_blk_config>() as u32))
    }

    /// Submits one chain on `queue` and waits for its completion.
    pub fn submit(&self, queue: usize, bufs: &[Buf]) -> Completion {
        self.submit_batch(queue, &[bufs])
            .pop()
            .expect("one completion")
    }

    /// Makes every chain available on `queue` at once (one kick per group that fits in the ring
    /// and the queue's data area), waits for all of them, and returns their completions in
    /// submission order.
    pub fn submit_batch<R: AsRef<[Buf]>>(&self, queue: usize, requests: &[R]) -> Vec<Completion> {
        let mut q = self.queue(queue);
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
            assert!(
                end > start,
                "request {start} on queue {queue} does not fit in the ring or its {}-byte data area",
                q.data_len
            );
            out.extend(self.run_group(&mut q, &requests[start..end]));
            start = end;
        }
        out
    }

    fn queue(&self, queue: usize) -> MutexGuard<'_, DriverQueue> {
        self.queues
            .get(queue)
            .unwrap_or_else(|| panic!("queue {queue} was not set up"))
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Places a group of chains (descriptors from index 0, buffers from the start of the data
    /// area: the previous group has completed), publishes them, kicks and waits.
    fn run_group<R: AsRef<[Buf]>>(&self, q: &mut DriverQueue, requests: &[R]) -> Vec<Completion> {
        let mem = &self.mem;
        let mut next_desc: u16 = 0;
        let mut data = q.data;
        let mut pending = Vec::with_capacity(requests.len());
        for (k, bufs) in requests.iter().enumerate() {
            let bufs = bufs.as_ref();
            assert!(!bufs.is_empty(), "a chain needs at least one descriptor");
            let head = next_desc;
            let mut writable = Vec::new();
            for (i, buf) in bufs.iter().enumerate() {
                let (addr, len, mut flags) = match buf {
                    Buf::Out(bytes) => {
                        mem.write_slice(bytes, data).expect("write Out buffer");
                        (data, buf_len(buf), 0)
                    }
                    Buf::In(n) => {
                        mem.write_slice(&vec![POISON; *n as usize], data)
                            .expect("poison In buffer");
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
                let at = GuestAddress(q.desc.0 + 16 * u64::from(next_desc));
                write_desc(mem, at, addr.0, len, flags, next_desc.wrapping_add(1));
                next_desc += 1;
                data = GuestAddress(data.0 + align_up(u64::from(data_len(buf)), 16));
            }
            let slot = q.next_avail.wrapping_add(k as u16) % q.size;
            mem.write_obj(head, GuestAddress(q.avail.0 + 4 + 2 * u64::from(slot)))
                .expect("write avail ring entry");
            pending.push(Pending { head, writable });
        }
        let event_idx = self.event_idx();
        if event_idx {
            // Ask for a notification as soon as anything is used.
            self.set_used_event(q, q.last_used);
        }
        // The descriptors and ring entries must be visible before the new index.
        fence(Ordering::Release);
        q.next_avail = q.next_avail.wrapping_add(requests.len() as u16);
        mem.store(q.next_avail, GuestAddress(q.avail.0 + 2), Ordering::Release)
            .expect("publish avail index");
        q.submitted += requests.len() as u64;
        // Always kick: with EVENT_IDX this may be more often than avail_event asks for, which
        // the spec allows.
        fence(Ordering::SeqCst);
        q.kick.write(1).expect("kick");

        let used = self.wait_used(q, requests.len());
        let mut done: Vec<Option<Completion>> = vec![None; requests.len()];
        for (id, used_len) in used {
            let k = pending
                .iter()
                .position(|p| u32::from(p.head) == id)
                .unwrap_or_else(|| {
                    panic!(
                        "queue {}: used element names descriptor {id}, which heads no chain",
                        q.index
                    )
                });
            assert!(
                done[k].is_none(),
                "queue {}: chain {id} completed twice",
                q.index
            );
            let mut bytes = Vec::new();
            for &(addr, len) in &pending[k].writable {
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, addr).expect("read In buffer");
                bytes.extend_from_slice(&b);
            }
            let status = bytes.pop();
            done[k] = Some(Completion {
                id,
                used_len,
                status,
                data: bytes,
            });
        }
        done.into_iter()
            .map(|c| c.expect("every chain completed"))
            .collect()
    }

    fn event_idx(&self) -> bool {
        self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn set_used_event(&self, q: &DriverQueue, value: u16) {
        let at = GuestAddress(q.avail.0 + 4 + 2 * u64::from(q.size));
        self.mem
            .store(value, at, Ordering::Release)
            .expect("write used_event");
    }

    fn used_idx(&self, q: &DriverQueue) -> u16 {
        self.mem
            .load(GuestAddress(q.used.0 + 2), Ordering::Acquire)
            .expect("read used index")
    }

    /// Waits for `want` used elements, returning (id, len) of each.
    fn wait_used(&self, q: &mut DriverQueue, want: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::with_capacity(want);
        loop {
            let used_idx = self.used_idx(q);
            while q.last_used != used_idx {
                let slot = u64::from(q.last_used % q.size);
                let at = GuestAddress(q.used.0 + 4 + 8 * slot);
                let id: u32 = self.mem.read_obj(at).expect("read used id");
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(at.0 + 4))
                    .expect("read used len");
                got.push((id, len));
                q.last_used = q.last_used.wrapping_add(1);
            }
            assert!(
                got.len() <= want,
                "queue {}: {} used elements for {want} chains",
                q.index,
                got.len()
            );
            if got.len() == want {
                return got;
            }
            if self.event_idx() {
                self.set_used_event(q, q.last_used);
                fence(Ordering::SeqCst);
                if self.used_idx(q) != q.last_used {
                    continue;
                }
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "queue {}: timed out after {TIMEOUT:?} with {} of {want} chains completed \
                 (avail idx {}, used idx {})",
                q.index,
                got.len(),
                q.next_avail,
                used_idx
            );
            wait_readable(q.call.as_raw_fd(), deadline - now);
            // Clear the counter; a notification that raced with the read is seen on the next
            // pass through the used index.
            let _ = q.call.read();
        }
    }

    /// Chains submitted on `queue` so far.
    pub fn submitted(&self, queue: usize) -> u64 {
        self.queue(queue).submitted
    }

    /// Stops `queue` as QEMU does when the guest stops (GET_VRING_BASE) and returns the
    /// device's next avail index.
    pub fn stop_queue(&self, queue: usize) -> u16 {
        let _q = self.queue(queue);
        let base = self.frontend.get_vring_base(queue).expect("GET_VRING_BASE");
        u16::try_from(base).expect("vring base fits in u16")
    }

    /// Starts a stopped `queue` again. With `fresh`, the rings are zeroed and indices start from
    /// 0, as after a guest driver reload; without it, the rings and indices carry on, as when a
    /// stopped guest resumes.
    pub fn restart_queue(&self, queue: usize, fresh: bool) {
        let mut q = self.queue(queue);
        if fresh {
            let rings = (q.data.0 - q.desc.0) as usize;
            self.mem
                .write_slice(&vec![0u8; rings], q.desc)
                .expect("zero the rings");
            q.next_avail = 0;
            q.last_used = 0;
        }
        let mut fe = self.frontend.clone();
        self.program_queue(&mut fe, &mut q);
    }
}

/// The fields of `virtio_blk_config` the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity: u64,
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
    pub fn parse(c: &[u8]) -> BlkConfig {
        assert_eq!(c.len(), size_of::<virtio_blk_config>(), "config space size");
        let u32_at = |off: usize| u32::from_le_bytes(c[off..off + 4].try_into().expect("4 bytes"));
        BlkConfig {
            capacity: u64::from_le_bytes(
                c[offset_of!(virtio_blk_config, capacity)..][..8]
                    .try_into()
                    .expect("8 bytes"),
            ),
            seg_max: u32_at(offset_of!(virtio_blk_config, seg_max)),
            blk_size: u32_at(offset_of!(virtio_blk_config, blk_size)),
            num_queues: u16::from_le_bytes(
                c[offset_of!(virtio_blk_config, num_queues)..][..2]
                    .try_into()
                    .expect("2 bytes"),
            ),
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
        }
    }
}

fn buf_len(buf: &Buf) -> u32 {
    match buf {
        Buf::Out(b) => u32::try_from(b.len()).expect("buffer fits a descriptor"),
        Buf::In(n) => *n,
        Buf::Raw { len, .. } => *len,
    }
}

/// Bytes of the queue's data area a buffer takes.
fn data_len(buf: &Buf) -> u32 {
    match buf {
        Buf::Raw { .. } => 0,
        _ => buf_len(buf),
    }
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn write_desc(mem: &GuestMemoryMmap, at: GuestAddress, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, at).expect("write descriptor");
}

/// A memfd of `size` bytes mapped as guest memory at [`GUEST_BASE`]. Returns the memory and the
/// host address of its start.
fn guest_memory(size: usize) -> (GuestMemoryMmap, u64) {
    let name = c"dovetail-guest";
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create only reads it.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).expect("size guest memory");
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(GUEST_BASE),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("map guest memory");
    let host = mem
        .get_host_address(GuestAddress(GUEST_BASE))
        .expect("host address of guest memory") as u64;
    (mem, host)
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one live pollfd and the count passed is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll: {e}");
    }
}

/// A deterministic, non-repeating-per-sector byte pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Reads `len` bytes of the image file at `offset`.
pub fn image_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("open image");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).expect("read image");
    b
}
