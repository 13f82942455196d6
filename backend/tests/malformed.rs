//! Malformed and hostile guests, through the real vhost-user socket: every case of QEMU's
//! vhost-user-blk qtest (tests/qtest/vhost-user-blk-test.c: basic, indirect, idx, nxvirtq,
//! hotplug, multiqueue), plus broken descriptor chains and rings written descriptor by
//! descriptor: loops, chains cut short or longer than allowed, indices and addresses out of
//! range, an avail index running away, missing or misplaced headers and status bytes, data in
//! the wrong direction, huge lengths.
//!
//! Disk A (2 queues) takes the cases on its queue 0; after every case its queue 0 (when the case
//! leaves it valid), its queue 1 and disk B (8 queues, another socket and serve loop) each
//! serve a write and a read-back. A panic hook counts panics on any thread, and a broken ring
//! must not make a queue worker spin.
//!
//! Disk A is, in turn, every layout a disk can be served with (`common/layouts.rs`: raw,
//! parallax-v1, parallax-v2, a Tee of parallax-v1 and parallax-v2 under sync-cross-checks, a
//! parallax-v2 version of a two-tier store) on both cache modes; after every case the data A's
//! earlier well-formed writes left must read back, and all of it at the end of each run.
//! `DOVETAIL_TEST_CACHE` picks one cache mode; unset, both run.

mod common;
#[path = "common/layouts.rs"]
mod layouts;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::{
    header, image_bytes, pattern, raw_disk, test_cache, test_engine, Buf, DriverOptions, RangeSeg,
    Req, TestDriver, TestServer, GUEST_BASE, SERIAL, S_IOERR, S_OK, S_UNSUPP, WRITE_ZEROES_UNMAP,
};
use dovetail_backend::Disk;
use dovetail_bench::driver::{DriverError, Used, POISON, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use dovetail_layout::{CacheMode, Sector};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// The qtest's image size, 64 MiB.
const IMAGE_SIZE: u64 = 64 * MIB;
const CAP: u64 = IMAGE_SIZE / SECTOR;
/// Guest memory of disk A's driver: 40 MiB per queue, room for a 32 MiB read.
const MEM_A: usize = 80 << 20;
/// Queue size of every driver here.
const QSIZE: u16 = 256;
/// A sector no valid request of the suite writes: refused writes aim here, and it must stay 0.
const PROBE: u64 = 100_000;
/// How long to watch for a completion that must not come.
const QUIET: Duration = Duration::from_millis(40);

const NEXT: u16 = VRING_DESC_F_NEXT;
const WRITE: u16 = VRING_DESC_F_WRITE;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

// Offsets in a queue's data area for hand-built chains.
const HDR: u64 = 0;
const TABLE: u64 = 0x1000;
const STATUS: u64 = 0x8000;
const STATUS2: u64 = 0x8100;
const DATA: u64 = 0x1_0000;
const DATA2: u64 = 0x8_0000;

// ------------------------------------------------------------------------------------------------
// Panics on any thread, counted by a hook installed once per test binary.

static PANICS: AtomicUsize = AtomicUsize::new(0);
/// The tests of this file (their threads carry these names).
const TEST_NAMES: [&str; 3] = [
    "malformed_guests_get_answers_and_every_queue_and_disk_keeps_serving",
    "every_layout_answers_malformed_guests_on_both_cache_modes",
    "bad_vhost_user_messages_drop_only_their_connection",
];
static HOOK: Once = Once::new();
/// The tests of this file run one at a time: the CPU check looks at every queue worker.
static SERIAL_TESTS: Mutex<()> = Mutex::new(());
/// The 32 MiB reads of runs going at once take turns.
static BIG_READS: Mutex<()> = Mutex::new(());

fn count_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A failing assertion of a test itself is reported by the harness; any other
            // thread's panic (a queue worker, a serve loop) is the daemon's.
            let name = std::thread::current().name().unwrap_or("").to_string();
            if !TEST_NAMES.contains(&name.as_str()) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

// ------------------------------------------------------------------------------------------------
// CPU time of the daemon's queue workers (threads named `vring_worker`), from /proc.

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// (thread id, utime + stime in ticks) of every `vring_worker` thread of this process.
fn worker_ticks() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() != "vring_worker" {
            continue;
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // Fields after the ")" closing the name: state is field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            out.push((t.file_name().to_string_lossy().into_owned(), ticks));
        }
    }
    out
}

/// Fails if any queue worker burns more than a fifth of a core over half a second in which no
/// guest submits anything. Returns the largest per-thread CPU time seen, in milliseconds.
fn assert_no_spin(what: &str) -> u64 {
    let before = worker_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let after = worker_ticks();
    let hz = clock_ticks();
    let mut worst = 0;
    for (tid, t1) in &after {
        if let Some((_, t0)) = before.iter().find(|(id, _)| id == tid) {
            worst = worst.max((t1 - t0) * 1000 / hz);
        }
    }
    assert!(
        worst <= 50,
        "{what}: a queue worker used {worst} ms of CPU in 500 ms with nothing submitted (spinning)"
    );
    worst
}

// ------------------------------------------------------------------------------------------------
// Hand-built chains.

/// One descriptor: where it points, its length, flags and next index.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

impl Desc {
    fn bytes(self) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&self.addr.to_le_bytes());
        d[8..12].copy_from_slice(&self.len.to_le_bytes());
        d[12..14].copy_from_slice(&self.flags.to_le_bytes());
        d[14..16].copy_from_slice(&self.next.to_le_bytes());
        d
    }
}

/// A `virtio_blk_outhdr` with an I/O priority, as the qtest sends it.
fn header_prio(req_type: u32, ioprio: u32, sector: u64) -> Vec<u8> {
    let mut h = header(req_type, sector);
    h[4..8].copy_from_slice(&ioprio.to_le_bytes());
    h
}

/// 512 bytes starting with "TEST" (the qtest's payload).
fn test_sector() -> Vec<u8> {
    let mut d = vec![0u8; 512];
    d[..4].copy_from_slice(b"TEST");
    d
}

fn segs_bytes(segs: &[RangeSeg]) -> Vec<u8> {
    segs.iter().flat_map(|s| s.to_bytes()).collect()
}

/// Counts of what the suite checked.
#[derive(Debug, Default)]
struct Stats {
    cases: Cell<u64>,
    requests: Cell<u64>,
    statuses: Cell<u64>,
}

impl Stats {
    fn add(c: &Cell<u64>, n: u64) {
        c.set(c.get() + n);
    }
}

/// Disk A (cases) and disk B (another disk that must keep serving), each with its driver.
struct Suite {
    _dir: tempfile::TempDir,
    /// What disk A is: layout and cache mode.
    kind: String,
    /// Disk A's layout, read directly to check what reached the disk.
    disk_a: layouts::Opened,
    /// Disk A's image file, for a raw disk.
    image_a: Option<PathBuf>,
    /// What A's well-formed writes left on the disk, by sector.
    written: RefCell<BTreeMap<u64, Vec<u8>>>,
    server_a: Option<TestServer>,
    server_b: Option<TestServer>,
    a: Option<TestDriver>,
    b: Option<TestDriver>,
    event_idx: bool,
    stats: Stats,
    seed: Cell<u64>,
}

impl Suite {
    fn new(layout: &str, cache: CacheMode, event_idx: bool) -> Suite {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = dir.path().join("a");
        std::fs::create_dir(&at).expect("disk A's directory");
        let disk_a = layouts::open(&at, layout, IMAGE_SIZE, cache, true);
        let image_a = (layout == "raw").then(|| at.join("disk.img"));
        let disk = Disk::new(disk_a.layout.clone(), false, SERIAL)
            .expect("disk")
            .with_engine(test_engine());
        let server_a = TestServer::start(Arc::new(disk), 2);
        let server_b = TestServer::start(raw_disk(&dir.path().join("b.img"), 8 * MIB, false), 8);
        let opts = |queues, mem| DriverOptions {
            event_idx,
            queue_size: QSIZE,
            ..DriverOptions::new(queues, mem)
        };
        let a = TestDriver::connect_with(server_a.socket(), opts(2, MEM_A));
        let b = TestDriver::connect_with(server_b.socket(), opts(8, 8 << 20));
        Suite {
            _dir: dir,
            kind: format!("{layout}/{cache}"),
            disk_a,
            image_a,
            written: RefCell::new(BTreeMap::new()),
            server_a: Some(server_a),
            server_b: Some(server_b),
            a: Some(a),
            b: Some(b),
            event_idx,
            stats: Stats::default(),
            seed: Cell::new(1),
        }
    }

    fn a(&self) -> &TestDriver {
        self.a.as_ref().expect("driver A")
    }

    fn b(&self) -> &TestDriver {
        self.b.as_ref().expect("driver B")
    }

    fn mem(&self) -> &GuestMemoryMmap {
        self.a().memory()
    }

    /// Guest address of `off` in the data area of disk A's queue `q`.
    fn at(&self, q: usize, off: u64) -> u64 {
        let vq = self.a().queue(q).expect("queue");
        let (base, len) = vq.data_area();
        assert!(
            off < len,
            "offset {off:#x} outside the data area ({len:#x} bytes)"
        );
        base.0 + off
    }

    /// The first guest address past the end of disk A's guest memory.
    fn mem_end(&self) -> u64 {
        GUEST_BASE + MEM_A as u64
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem()
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest memory");
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem()
            .read_slice(&mut b, GuestAddress(addr))
            .expect("read guest memory");
        b
    }

    fn byte(&self, addr: u64) -> u8 {
        self.get(addr, 1)[0]
    }

    /// Writes `descs` into the descriptor table of disk A's queue `q`, makes `heads` available
    /// at once, kicks, and collects used elements: `want` of them (waiting up to 5 s), plus any
    /// more that arrive in a short quiet period after (so an extra one shows up).
    fn raw(&self, q: usize, descs: &[(u16, Desc)], heads: &[u16], want: usize) -> Vec<Used> {
        let mut vq = self.a().queue(q).expect("queue");
        for (i, d) in descs {
            vq.write_desc(*i, d.addr, d.len, d.flags, d.next)
                .expect("write descriptor");
        }
        for h in heads {
            vq.push(*h).expect("push");
        }
        vq.enable_interrupts().expect("enable interrupts");
        vq.publish().expect("publish");
        vq.kick().expect("kick");
        Stats::add(&self.stats.requests, heads.len() as u64);
        let mut got = Vec::new();
        let mut deadline = Instant::now() + common::TIMEOUT;
        let mut quiet = false;
        loop {
            match vq.pop_used() {
                Ok(Some(u)) => {
                    got.push(u);
                    continue;
                }
                Ok(None) => {}
                Err(e) => panic!("driver: {}", dovetail_layout::error_chain(&e)),
            }
            if got.len() >= want && !quiet {
                quiet = true;
                deadline = Instant::now() + QUIET;
            }
            match vq.wait(deadline) {
                Ok(()) => {}
                Err(DriverError::Timeout { .. }) => break,
                Err(e) => panic!("driver: {}", dovetail_layout::error_chain(&e)),
            }
        }
        got
    }

    /// One hand-built chain headed by `head`: its used length, if the device completed it.
    fn one(&self, q: usize, descs: &[(u16, Desc)], head: u16) -> Option<u32> {
        let used = self.raw(q, descs, &[head], 1);
        assert!(used.len() <= 1, "more used elements than chains: {used:?}");
        used.first().map(|u| {
            assert_eq!(u.id, u32::from(head), "used element names another head");
            u.len
        })
    }

    /// Asserts a case's outcome: used length and status byte.
    #[track_caller]
    fn expect(&self, name: &str, got: (Option<u32>, u8), want: (Option<u32>, u8)) {
        assert_eq!(
            got, want,
            "{name} (event_idx={}): (used length, status byte)",
            self.event_idx
        );
        Stats::add(&self.stats.statuses, 1);
    }

    /// Poisons the status bytes and returns their addresses on queue `q`.
    fn status(&self, q: usize) -> u64 {
        let s = self.at(q, STATUS);
        self.put(s, &[POISON]);
        s
    }

    /// `len` bytes of disk A at byte `offset` (sector aligned), read through its layout (and
    /// for a raw disk checked against the image file too).
    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.disk_a
            .layout
            .read(Sector(offset / SECTOR), &mut b)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: reading disk A: {}",
                    self.kind,
                    dovetail_layout::error_chain(&e)
                )
            });
        if let Some(image) = &self.image_a {
            assert!(
                b == image_bytes(image, offset, len),
                "the image file differs"
            );
        }
        b
    }

    /// The probe sector must still be all zeroes: no refused write reached the disk.
    #[track_caller]
    fn probe_untouched(&self, name: &str) {
        assert!(
            self.disk_bytes(PROBE * SECTOR, 8192)
                .iter()
                .all(|&b| b == 0),
            "{name} ({}): a refused request changed the disk",
            self.kind
        );
    }

    /// One of A's earlier well-formed writes (in turn), or all of them, still reads back on
    /// A's queue `q`.
    #[track_caller]
    fn earlier_data(&self, name: &str, q: usize, all: bool) {
        let written = self.written.borrow();
        let n = written.len();
        let pick = (self.stats.cases.get() as usize) % n.max(1);
        for (k, (sector, data)) in written.iter().enumerate() {
            if !all && k != pick {
                continue;
            }
            let c = self.a().submit(q, &Req::read(*sector, 4096));
            c.assert_ok(4096);
            assert!(
                c.data == *data,
                "{name} ({}): sector {sector}, written before, read back other data",
                self.kind
            );
            Stats::add(&self.stats.requests, 1);
            Stats::add(&self.stats.statuses, 1);
        }
    }

    /// A write and a read-back on `driver`'s queue `q`.
    fn round_trip(&self, what: &str, driver: &TestDriver, q: usize) {
        let seed = self.seed.get();
        self.seed.set(seed + 1);
        let sector = 1024 + (seed % 512) * 8;
        let data = pattern(seed, 4096);
        driver.submit(q, &Req::write(sector, &data)).assert_ok(0);
        let c = driver.submit(q, &Req::read(sector, 4096));
        c.assert_ok(4096);
        assert!(
            c.data == data,
            "{what} ({}): queue {q} read back other data",
            self.kind
        );
        if std::ptr::eq(driver, self.a()) {
            self.written.borrow_mut().insert(sector, data);
        }
        Stats::add(&self.stats.requests, 2);
        Stats::add(&self.stats.statuses, 2);
    }

    /// After a case on disk A's queue `q`: that queue (if the case left it valid), A's other
    /// queue and disk B still serve.
    fn after(&self, name: &str, q: usize, same_valid: bool) {
        Stats::add(&self.stats.cases, 1);
        assert_eq!(
            PANICS.load(Ordering::SeqCst),
            0,
            "{name}: something panicked"
        );
        if same_valid {
            self.round_trip(name, self.a(), q);
        }
        self.round_trip(name, self.a(), 1 - q);
        let bq = (self.stats.cases.get() % 8) as usize;
        self.round_trip(name, self.b(), bq);
        self.earlier_data(name, 1 - q, false);
    }

    fn finish(mut self) {
        drop(self.a.take());
        drop(self.b.take());
        for s in [self.server_a.take(), self.server_b.take()]
            .into_iter()
            .flatten()
        {
            s.stop().expect("serve returns Ok");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The qtest's cases.

fn bit(n: u32) -> u64 {
    1u64 << n
}

/// `basic`: feature negotiation, capacity, 3-descriptor write and read, write-zeroes and
/// discard with their invalid forms, the 2-descriptor (ANY_LAYOUT) framing.
fn qtest_basic(s: &Suite) {
    let a = s.a();
    let offered = a.device_features();
    for f in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ] {
        assert_ne!(offered & bit(f), 0, "feature {f} not offered: {offered:#x}");
    }
    assert_eq!(offered & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        a.acked_features() & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
        s.event_idx
    );
    assert_eq!(a.blk_config().capacity, CAP, "capacity");
    assert_eq!(a.config(0, 8), CAP.to_le_bytes().to_vec(), "config at 0");
    s.after("basic/negotiation+capacity", 0, true);

    // Write and read with the 3-descriptor layout, ioprio 1.
    let c = a.submit(
        0,
        &[
            Buf::Out(header_prio(VIRTIO_BLK_T_OUT, 1, 0)),
            Buf::Out(test_sector()),
            Buf::In(1),
        ],
    );
    s.expect(
        "basic/write",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_OK),
    );
    let c = a.submit(
        0,
        &[
            Buf::Out(header_prio(VIRTIO_BLK_T_IN, 1, 0)),
            Buf::In(512),
            Buf::In(1),
        ],
    );
    s.expect(
        "basic/read",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(513), S_OK),
    );
    assert_eq!(c.data, test_sector(), "basic/read data");
    Stats::add(&s.stats.requests, 2);
    s.after("basic/3-descriptor write+read", 0, true);

    // WRITE_ZEROES on the sector just written, then it reads as zeroes.
    let c = a.submit(0, &Req::write_zeroes(&[RangeSeg::new(0, 1, 0)]));
    s.expect(
        "basic/write-zeroes",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_OK),
    );
    let c = a.submit(0, &Req::read(0, 512));
    c.assert_ok(512);
    assert!(c.data.iter().all(|&b| b == 0), "write-zeroes left data");
    Stats::add(&s.stats.requests, 2);
    s.after("basic/write-zeroes", 0, true);
    invalid_discard_write_zeroes(s, VIRTIO_BLK_T_WRITE_ZEROES);

    // DISCARD of one sector.
    let c = a.submit(0, &Req::discard(&[RangeSeg::new(0, 1, 0)]));
    s.expect(
        "basic/discard",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_OK),
    );
    Stats::add(&s.stats.requests, 1);
    s.after("basic/discard", 0, true);
    invalid_discard_write_zeroes(s, VIRTIO_BLK_T_DISCARD);

    // ANY_LAYOUT: header and data in one descriptor (528 bytes), status in the next; the read
    // has the data and status in one 513-byte device-writable descriptor.
    let mut out = header_prio(VIRTIO_BLK_T_OUT, 1, 1);
    out.extend_from_slice(&test_sector());
    let c = a.submit(0, &[Buf::Out(out), Buf::In(1)]);
    s.expect(
        "basic/2-desc write",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_OK),
    );
    let c = a.submit(
        0,
        &[Buf::Out(header_prio(VIRTIO_BLK_T_IN, 1, 1)), Buf::In(513)],
    );
    s.expect(
        "basic/2-desc read",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(513), S_OK),
    );
    assert_eq!(c.data, test_sector(), "2-descriptor read data");
    Stats::add(&s.stats.requests, 2);
    s.after("basic/2-descriptor layout", 0, true);
}

/// The qtest's `test_invalid_discard_write_zeroes`, adapted to this device's limits (32
/// segments, not QEMU's one), plus a payload that is not whole segments and an empty one.
fn invalid_discard_write_zeroes(s: &Suite, req_type: u32) {
    let name = if req_type == VIRTIO_BLK_T_DISCARD {
        "discard"
    } else {
        "write-zeroes"
    };
    let a = s.a();
    let one = |segs: &[RangeSeg]| {
        let c = a.submit(
            0,
            &[
                Buf::Out(header(req_type, 0)),
                Buf::Out(segs_bytes(segs)),
                Buf::In(1),
            ],
        );
        Stats::add(&s.stats.requests, 1);
        (Some(c.used_len), c.status.unwrap_or(POISON))
    };
    // Two segments are within this device's max_*_seg (32).
    let two = [RangeSeg::new(0, 1, 0), RangeSeg::new(1, 1, 0)];
    s.expect(&format!("{name}/2 segments"), one(&two), (Some(1), S_OK));
    // 33 segments: more than max_*_seg.
    let many: Vec<RangeSeg> = (0..33).map(|i| RangeSeg::new(PROBE + i, 1, 0)).collect();
    s.expect(
        &format!("{name}/33 segments"),
        one(&many),
        (Some(1), S_UNSUPP),
    );
    // num_sectors beyond max_*_sectors.
    s.expect(
        &format!("{name}/num_sectors 0xffffffff"),
        one(&[RangeSeg::new(0, u32::MAX, 0)]),
        (Some(1), S_IOERR),
    );
    // Starting past the capacity, and reaching past it.
    s.expect(
        &format!("{name}/sector capacity+1"),
        one(&[RangeSeg::new(CAP + 1, 1, 0)]),
        (Some(1), S_IOERR),
    );
    s.expect(
        &format!("{name}/across the end"),
        one(&[RangeSeg::new(CAP - 1, 2, 0)]),
        (Some(1), S_IOERR),
    );
    // Reserved flag bits (and, for discard, the unmap flag, which only write-zeroes has).
    s.expect(
        &format!("{name}/reserved flags"),
        one(&[RangeSeg::new(PROBE, 1, !WRITE_ZEROES_UNMAP)]),
        (Some(1), S_UNSUPP),
    );
    if req_type == VIRTIO_BLK_T_DISCARD {
        s.expect(
            "discard/unmap flag",
            one(&[RangeSeg::new(PROBE, 1, WRITE_ZEROES_UNMAP)]),
            (Some(1), S_UNSUPP),
        );
    }
    // A payload that is not whole segments, and none at all.
    let c = a.submit(
        0,
        &[
            Buf::Out(header(req_type, 0)),
            Buf::Out(vec![0u8; 20]),
            Buf::In(1),
        ],
    );
    s.expect(
        &format!("{name}/20-byte payload"),
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_UNSUPP),
    );
    let c = a.submit(0, &Req::raw(req_type, 0));
    s.expect(
        &format!("{name}/no payload"),
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_UNSUPP),
    );
    Stats::add(&s.stats.requests, 2);
    s.after(&format!("basic/invalid {name}"), 0, true);
}

/// `indirect`: a write and a read through two-entry indirect tables.
fn qtest_indirect(s: &Suite) {
    let q = 0;
    let (hdr, data, table, st) = (s.at(q, HDR), s.at(q, DATA), s.at(q, TABLE), s.status(q));
    // Write: [header + data (528 bytes, readable), status (1, writable)].
    let mut out = header_prio(VIRTIO_BLK_T_OUT, 1, 0);
    out.extend_from_slice(&test_sector());
    s.put(hdr, &out);
    s.put(table, &desc(hdr, 528, NEXT, 1).bytes());
    s.put(table + 16, &desc(st, 1, WRITE, 0).bytes());
    let used = s.one(q, &[(0, desc(table, 32, INDIRECT, 0))], 0);
    s.expect("indirect/write", (used, s.byte(st)), (Some(1), S_OK));
    // Read: [header (16), data + status (513, writable)].
    s.put(hdr, &header_prio(VIRTIO_BLK_T_IN, 1, 0));
    s.put(data, &vec![POISON; 513]);
    s.put(table, &desc(hdr, 16, NEXT, 1).bytes());
    s.put(table + 16, &desc(data, 513, WRITE, 0).bytes());
    let used = s.one(q, &[(0, desc(table, 32, INDIRECT, 0))], 0);
    s.expect(
        "indirect/read",
        (used, s.byte(data + 512)),
        (Some(513), S_OK),
    );
    assert_eq!(s.get(data, 512), test_sector(), "indirect read data");
    s.after("indirect", q, true);
}

/// `idx`: with EVENT_IDX, `used_event` set so the device notifies only after the third
/// request: the second completes silently, the third brings one notification for both.
fn qtest_idx(s: &Suite) {
    if !s.event_idx {
        return;
    }
    let q = 0;
    s.a().submit(q, &Req::write(0, &test_sector())).assert_ok(0);
    Stats::add(&s.stats.requests, 1);
    let (hdr, data, st) = (s.at(q, HDR), s.at(q, DATA), s.status(q));
    let (hdr2, data2, st2) = (s.at(q, HDR + 0x100), s.at(q, DATA2), s.at(q, STATUS2));
    let mut vq = s.a().queue(q).expect("queue");
    let u = vq.last_used();
    assert_eq!(vq.device_used_idx().expect("used idx"), u, "all consumed");
    let _ = vq.take_call().expect("clear call");
    // Notify only once the used index moves past u + 1.
    vq.set_used_event(u.wrapping_add(1)).expect("used_event");

    s.put(hdr, &header(VIRTIO_BLK_T_OUT, 1));
    s.put(data, &test_sector());
    vq.write_desc(0, hdr, 16, NEXT, 1).expect("desc");
    vq.write_desc(1, data, 512, NEXT, 2).expect("desc");
    vq.write_desc(2, st, 1, WRITE, 0).expect("desc");
    vq.push(0).expect("push");
    vq.publish().expect("publish");
    vq.kick().expect("kick");
    let deadline = Instant::now() + common::TIMEOUT;
    while vq.device_used_idx().expect("used idx") != u.wrapping_add(1) {
        assert!(
            Instant::now() < deadline,
            "idx: second request never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !vq.take_call().expect("call"),
        "idx: the device notified although used_event asked it not to"
    );
    assert_eq!(s.byte(st), S_OK, "idx: second request's status");
    Stats::add(&s.stats.statuses, 1);

    s.put(hdr2, &header(VIRTIO_BLK_T_IN, 1));
    s.put(data2, &vec![POISON; 512]);
    s.put(st2, &[POISON]);
    vq.write_desc(3, hdr2, 16, NEXT, 4).expect("desc");
    vq.write_desc(4, data2, 512, NEXT | WRITE, 5).expect("desc");
    vq.write_desc(5, st2, 1, WRITE, 0).expect("desc");
    vq.push(3).expect("push");
    vq.publish().expect("publish");
    vq.kick().expect("kick");
    let deadline = Instant::now() + common::TIMEOUT;
    while !vq.take_call().expect("call") {
        assert!(
            Instant::now() < deadline,
            "idx: no notification after the third request"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let first = vq.pop_used().expect("pop").expect("second request used");
    let second = vq.pop_used().expect("pop").expect("third request used");
    assert_eq!((first.id, first.len), (0, 1));
    assert_eq!((second.id, second.len), (3, 513));
    assert_eq!(s.byte(st2), S_OK, "idx: third request's status");
    assert_eq!(s.get(data2, 512), test_sector(), "idx: read data");
    Stats::add(&s.stats.statuses, 1);
    Stats::add(&s.stats.requests, 2);
    drop(vq);
    s.after("idx (used_event suppression)", q, true);
}

/// `multiqueue` (and `hotplug`: disk B is a second device served beside A): disk B offers MQ
/// with 8 queues, and every queue serves.
fn qtest_multiqueue(s: &Suite) {
    let b = s.b();
    assert_ne!(b.device_features() & bit(VIRTIO_BLK_F_MQ), 0, "MQ offered");
    assert_eq!(b.blk_config().num_queues, 8, "num_queues");
    for q in 0..8 {
        s.round_trip("multiqueue", b, q);
    }
    s.after("multiqueue", 0, true);
}

/// From virtio-blk-test: unknown request types, requests past the capacity, GET_ID, FLUSH.
fn qtest_types_range_id_flush(s: &Suite) {
    let a = s.a();
    // Request types this device does not implement (SCSI, GET_LIFETIME, SECURE_ERASE, zoned
    // commands, garbage).
    for t in [
        2u32,
        3,
        10,
        14,
        15,
        16,
        17,
        18,
        19,
        0xff,
        0x8000_0000,
        u32::MAX,
    ] {
        let c = a.submit(0, &Req::raw(t, 0));
        s.expect(
            &format!("type {t:#x}"),
            (Some(c.used_len), c.status.unwrap_or(POISON)),
            (Some(1), S_UNSUPP),
        );
        Stats::add(&s.stats.requests, 1);
    }
    s.after("unsupported request types", 0, true);

    for (name, sector, len) in [
        ("read at the capacity", CAP, 512u32),
        ("read across the end", CAP - 1, 1024),
        ("read at sector u64::MAX", u64::MAX, 512),
        ("read at sector 2^55", 1 << 55, 512),
    ] {
        let c = a.submit(0, &Req::read(sector, len));
        s.expect(
            name,
            (Some(c.used_len), c.status.unwrap_or(POISON)),
            (Some(1), S_IOERR),
        );
        assert!(c.data.iter().all(|&b| b == POISON), "{name}: data written");
        Stats::add(&s.stats.requests, 1);
    }
    for (name, sector) in [
        ("write at the capacity", CAP),
        ("write across the end", CAP - 4),
    ] {
        let before = s.disk_bytes((CAP - 8) * SECTOR, 4096);
        let c = a.submit(0, &Req::write(sector, &pattern(99, 4096)));
        s.expect(
            name,
            (Some(c.used_len), c.status.unwrap_or(POISON)),
            (Some(1), S_IOERR),
        );
        assert_eq!(s.disk_bytes((CAP - 8) * SECTOR, 4096), before, "{name}");
        if let Some(image) = &s.image_a {
            assert_eq!(
                std::fs::metadata(image).expect("image").len(),
                IMAGE_SIZE,
                "{name}: the image grew"
            );
        }
        Stats::add(&s.stats.requests, 1);
    }
    // The last sector is readable.
    let c = a.submit(0, &Req::read(CAP - 1, 512));
    s.expect(
        "read the last sector",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(513), S_OK),
    );
    Stats::add(&s.stats.requests, 1);
    s.after("beyond capacity", 0, true);

    let mut id = SERIAL.as_bytes().to_vec();
    id.resize(20, 0);
    let c = a.submit(0, &Req::get_id());
    s.expect(
        "GET_ID",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(21), S_OK),
    );
    assert_eq!(c.data, id, "serial");
    // A short ID buffer gets the serial's first bytes.
    let c = a.submit(
        0,
        &[
            Buf::Out(header(VIRTIO_BLK_T_GET_ID, 0)),
            Buf::In(8),
            Buf::In(1),
        ],
    );
    s.expect(
        "GET_ID/8-byte buffer",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(9), S_OK),
    );
    assert_eq!(c.data, id[..8].to_vec());
    let c = a.submit(0, &Req::flush());
    s.expect(
        "FLUSH",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_OK),
    );
    Stats::add(&s.stats.requests, 3);
    s.after("GET_ID and FLUSH", 0, true);
}

// ------------------------------------------------------------------------------------------------
// Broken chains and rings.

/// An OUT request to the probe sector: header, 512 bytes of data, status, in guest memory of
/// queue `q`. Returns (header, data, status) addresses.
fn probe_write(s: &Suite, q: usize) -> (u64, u64, u64) {
    let (hdr, data, st) = (s.at(q, HDR), s.at(q, DATA), s.status(q));
    s.put(hdr, &header(VIRTIO_BLK_T_OUT, PROBE));
    s.put(data, &pattern(77, 512));
    (hdr, data, st)
}

/// An IN request: header at HDR, `len` poisoned bytes at DATA, status. Returns the addresses.
fn plain_read(s: &Suite, q: usize, sector: u64, len: usize) -> (u64, u64, u64) {
    let (hdr, data, st) = (s.at(q, HDR), s.at(q, DATA), s.status(q));
    s.put(hdr, &header(VIRTIO_BLK_T_IN, sector));
    s.put(data, &vec![POISON; len]);
    (hdr, data, st)
}

fn loops_and_cut_chains(s: &Suite) {
    let q = 0;
    // header -> data -> status -> header ...: a loop, so there is no last descriptor.
    let (hdr, data, st) = probe_write(s, q);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 512, NEXT, 2)),
            (2, desc(st, 1, WRITE | NEXT, 0)),
        ],
        0,
    );
    s.expect("loop of three", (used, s.byte(st)), (Some(0), POISON));
    s.probe_untouched("loop of three");
    s.after("descriptor loop (next back to the head)", q, true);

    // A descriptor whose next is itself.
    let used = s.one(q, &[(0, desc(hdr, 16, NEXT, 0))], 0);
    s.expect("self loop", (used, s.byte(st)), (Some(0), POISON));
    s.after("descriptor pointing at itself", q, true);

    // A read whose writable tail loops: data -> status -> data ...
    let (hdr, data, st) = plain_read(s, q, 0, 512);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 512, WRITE | NEXT, 2)),
            (2, desc(st, 1, WRITE | NEXT, 1)),
        ],
        0,
    );
    s.expect("writable loop", (used, s.byte(st)), (Some(0), POISON));
    assert!(
        s.get(data, 512).iter().all(|&b| b == POISON),
        "loop: data written"
    );
    s.after("loop among device-writable descriptors", q, true);

    // next index past the queue size (256) and exactly at it.
    for bad in [QSIZE, 300, u16::MAX] {
        let (hdr, data, st) = probe_write(s, q);
        let used = s.one(
            q,
            &[
                (0, desc(hdr, 16, NEXT, 1)),
                (1, desc(data, 512, NEXT, bad)),
                (2, desc(st, 1, WRITE, 0)),
            ],
            0,
        );
        s.expect(
            &format!("next = {bad}"),
            (used, s.byte(st)),
            (Some(0), POISON),
        );
        s.probe_untouched("next past the table");
    }
    s.after("next index >= queue size", q, true);

    // A direct chain of exactly the queue size is valid: header, 254 x 512 bytes, status.
    let data: Vec<u8> = pattern(5, 254 * 512);
    let mut bufs = vec![Buf::Out(header(VIRTIO_BLK_T_OUT, 20_000))];
    bufs.extend(data.chunks(512).map(|c| Buf::Out(c.to_vec())));
    bufs.push(Buf::In(1));
    assert_eq!(bufs.len(), usize::from(QSIZE));
    let c = s.a().submit(q, &bufs);
    s.expect(
        "chain of queue size",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_OK),
    );
    let c = s.a().submit(q, &Req::read(20_000, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "256-descriptor write read back wrong");
    Stats::add(&s.stats.requests, 2);
    s.after("chain exactly the queue size", q, true);
}

fn indirect_tables(s: &Suite) {
    let q = 0;
    let table = s.at(q, TABLE);
    // An indirect table that loops: [header -> data -> status -> header].
    let (hdr, data, st) = probe_write(s, q);
    for (i, d) in [
        desc(hdr, 16, NEXT, 1),
        desc(data, 512, NEXT, 2),
        desc(st, 1, WRITE | NEXT, 0),
    ]
    .iter()
    .enumerate()
    {
        s.put(table + 16 * i as u64, &d.bytes());
    }
    let used = s.one(q, &[(0, desc(table, 48, INDIRECT, 0))], 0);
    s.expect("indirect loop", (used, s.byte(st)), (Some(0), POISON));
    s.probe_untouched("indirect loop");
    s.after("indirect table that loops", q, true);

    // An entry whose next is past the table.
    s.put(table + 32, &desc(st, 1, WRITE | NEXT, 3).bytes());
    let used = s.one(q, &[(0, desc(table, 48, INDIRECT, 0))], 0);
    s.expect(
        "indirect next past the table",
        (used, s.byte(st)),
        (Some(0), POISON),
    );
    s.probe_untouched("indirect next past the table");

    // An indirect descriptor inside an indirect table.
    s.put(table, &desc(table, 48, INDIRECT, 0).bytes());
    let used = s.one(q, &[(0, desc(table, 48, INDIRECT, 0))], 0);
    s.expect("nested indirect", (used, s.byte(st)), (Some(0), POISON));

    // Table lengths that are not whole descriptors, zero, and tables outside guest memory.
    for (name, addr, len) in [
        ("indirect length 40", table, 40u32),
        ("indirect length 0", table, 0),
        ("indirect table outside memory", s.mem_end() + 4096, 48),
        ("indirect table across the end", s.mem_end() - 16, 48),
    ] {
        let used = s.one(q, &[(0, desc(addr, len, INDIRECT, 0))], 0);
        s.expect(name, (used, s.byte(st)), (Some(0), POISON));
    }
    // A direct header whose next is a broken indirect descriptor.
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(s.mem_end() + 4096, 48, INDIRECT, 0)),
        ],
        0,
    );
    s.expect(
        "direct then broken indirect",
        (used, s.byte(st)),
        (Some(0), POISON),
    );
    s.probe_untouched("broken indirect tables");
    s.after("malformed indirect tables", q, true);

    // Longer than a queue may be: FLUSH, 1100 empty readable descriptors, status (an indirect
    // table may hold 65535; the device takes at most 1024, as QEMU).
    let flush = s.at(q, HDR);
    s.put(flush, &header(VIRTIO_BLK_T_FLUSH, 0));
    let n = 1102u64;
    let mut t = Vec::with_capacity(n as usize * 16);
    t.extend_from_slice(&desc(flush, 16, NEXT, 1).bytes());
    for i in 1..n - 1 {
        t.extend_from_slice(&desc(flush, 0, NEXT, (i + 1) as u16).bytes());
    }
    t.extend_from_slice(&desc(st, 1, WRITE, 0).bytes());
    s.put(table, &t);
    let used = s.one(q, &[(0, desc(table, (n * 16) as u32, INDIRECT, 0))], 0);
    s.expect(
        "indirect chain of 1102",
        (used, s.byte(st)),
        (Some(1), S_UNSUPP),
    );
    // 1024 is still accepted.
    let n = 1024u64;
    t.truncate((n as usize - 1) * 16);
    t.extend_from_slice(&desc(st, 1, WRITE, 0).bytes());
    s.put(table, &t);
    s.put(st, &[POISON]);
    let used = s.one(q, &[(0, desc(table, (n * 16) as u32, INDIRECT, 0))], 0);
    s.expect(
        "indirect chain of 1024",
        (used, s.byte(st)),
        (Some(1), S_OK),
    );
    s.after("indirect chain longer than any queue", q, true);
}

fn ring_indices(s: &Suite) {
    let q = 0;
    // Avail ring entries naming descriptors past the table, made available with a good FLUSH:
    // the bad entries are skipped (nothing can be completed for them) and the FLUSH completes.
    for bad in [QSIZE, 300, u16::MAX] {
        let hdr = s.at(q, HDR);
        let st = s.status(q);
        s.put(hdr, &header(VIRTIO_BLK_T_FLUSH, 0));
        let used = s.raw(
            q,
            &[(0, desc(hdr, 16, NEXT, 1)), (1, desc(st, 1, WRITE, 0))],
            &[bad, 0],
            1,
        );
        let got: Vec<(u32, u32)> = used.iter().map(|u| (u.id, u.len)).collect();
        assert_eq!(
            got,
            vec![(0, 1)],
            "avail entry {bad}: only the FLUSH is used"
        );
        s.expect(
            &format!("avail entry {bad}"),
            (Some(used[0].len), s.byte(st)),
            (Some(1), S_OK),
        );
    }
    s.after("avail ring entries >= queue size", q, true);

    // The avail index jumps more than a queue size ahead: the ring is broken. Nothing is
    // completed, the worker does not spin (with EVENT_IDX it used to), other queues and disks
    // serve, and the queue serves again once the driver resets it.
    let hdr = s.at(q, HDR);
    let st = s.status(q);
    s.put(hdr, &header(VIRTIO_BLK_T_FLUSH, 0));
    {
        let vq = s.a().queue(q).expect("queue");
        vq.write_desc(0, hdr, 16, NEXT, 1).expect("desc");
        vq.write_desc(1, st, 1, WRITE, 0).expect("desc");
        for slot in 0..QSIZE {
            vq.write_avail_slot_raw(slot, 0).expect("slot");
        }
        let used_before = vq.device_used_idx().expect("used");
        vq.write_avail_idx_raw(vq.next_avail().wrapping_add(QSIZE + 1))
            .expect("avail idx");
        vq.enable_interrupts().expect("interrupts");
        for _ in 0..100 {
            vq.kick().expect("kick");
        }
        std::thread::sleep(QUIET);
        assert_eq!(
            vq.device_used_idx().expect("used"),
            used_before,
            "a broken ring completed something"
        );
        Stats::add(&s.stats.requests, 1);
    }
    assert_eq!(s.byte(st), POISON, "avail index jump: status written");
    Stats::add(&s.stats.statuses, 1);
    assert_no_spin("avail index more than a queue size ahead");
    s.after("avail idx > queue size ahead (queue stopped)", q, false);
    // The driver resets the queue (GET_VRING_BASE, fresh rings): it serves again.
    s.a().stop_queue(q);
    s.a().restart_queue(q, true);
    s.after("queue reset after a broken ring", q, true);
}

fn addresses(s: &Suite) {
    let q = 0;
    let end = s.mem_end();
    // A header outside guest memory.
    let st = s.status(q);
    let used = s.one(
        q,
        &[
            (0, desc(end + 0x1000, 16, NEXT, 1)),
            (1, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect(
        "header outside memory",
        (used, s.byte(st)),
        (Some(1), S_IOERR),
    );
    // Header below guest memory (guest-physical 0).
    let st = s.status(q);
    let used = s.one(
        q,
        &[(0, desc(0, 16, NEXT, 1)), (1, desc(st, 1, WRITE, 0))],
        0,
    );
    s.expect(
        "header at address 0",
        (used, s.byte(st)),
        (Some(1), S_IOERR),
    );
    // Header straddling the end of memory.
    let st = s.status(q);
    let used = s.one(
        q,
        &[(0, desc(end - 8, 16, NEXT, 1)), (1, desc(st, 1, WRITE, 0))],
        0,
    );
    s.expect(
        "header across the end",
        (used, s.byte(st)),
        (Some(1), S_IOERR),
    );
    s.after("header outside guest memory", q, true);

    // Read data outside, straddling the end (the part inside must stay untouched), and at an
    // address that overflows.
    let tail = end - 2048;
    for (name, addr) in [
        ("read into memory outside", end + 0x10_0000),
        ("read across the end of memory", tail),
        ("read at an overflowing address", u64::MAX - 100),
    ] {
        let (hdr, _, st) = plain_read(s, q, 0, 0);
        s.put(tail, &[POISON; 2048]);
        let used = s.one(
            q,
            &[
                (0, desc(hdr, 16, NEXT, 1)),
                (1, desc(addr, 4096, WRITE | NEXT, 2)),
                (2, desc(st, 1, WRITE, 0)),
            ],
            0,
        );
        s.expect(name, (used, s.byte(st)), (Some(1), S_IOERR));
        assert!(
            s.get(tail, 2048).iter().all(|&b| b == POISON),
            "{name}: guest memory written"
        );
    }
    // Write data outside and straddling: the disk is unchanged.
    for (name, addr) in [
        ("write from memory outside", end + 0x10_0000),
        ("write across the end of memory", tail),
        ("write from an overflowing address", u64::MAX - 100),
    ] {
        let (hdr, _, st) = probe_write(s, q);
        let used = s.one(
            q,
            &[
                (0, desc(hdr, 16, NEXT, 1)),
                (1, desc(addr, 4096, NEXT, 2)),
                (2, desc(st, 1, WRITE, 0)),
            ],
            0,
        );
        s.expect(name, (used, s.byte(st)), (Some(1), S_IOERR));
        s.probe_untouched(name);
    }
    s.after("data outside guest memory", q, true);

    // Status byte outside memory, across the end, at an overflowing address: the request
    // cannot be answered, so it is not executed; completed with used length 0.
    for (name, addr, len) in [
        ("status outside memory", end + 0x1000, 1u32),
        ("status across the end", end - 1, 2),
        ("status at u64::MAX", u64::MAX, 1),
        ("status past u64::MAX", u64::MAX - 1, 4),
    ] {
        let (hdr, data, _) = probe_write(s, q);
        let used = s.one(
            q,
            &[
                (0, desc(hdr, 16, NEXT, 1)),
                (1, desc(data, 512, NEXT, 2)),
                (2, desc(addr, len, WRITE, 0)),
            ],
            0,
        );
        assert_eq!(used, Some(0), "{name}: used length");
        Stats::add(&s.stats.statuses, 1);
        s.probe_untouched(name);
    }
    s.after("status byte outside guest memory", q, true);
}

fn headers_status_directions(s: &Suite) {
    let q = 0;
    let hdr = s.at(q, HDR);
    s.put(hdr, &header(VIRTIO_BLK_T_IN, 0));
    // Zero-length and too-short headers.
    for (name, lens) in [
        ("zero-length header", vec![0u32]),
        ("15-byte header", vec![15]),
        ("8 + 0 + 7-byte header", vec![8, 0, 7]),
    ] {
        let st = s.status(q);
        let mut descs = Vec::new();
        let mut off = 0u64;
        for (i, &l) in lens.iter().enumerate() {
            descs.push((i as u16, desc(hdr + off, l, NEXT, i as u16 + 1)));
            off += u64::from(l);
        }
        descs.push((lens.len() as u16, desc(st, 1, WRITE, 0)));
        let used = s.one(q, &descs, 0);
        s.expect(name, (used, s.byte(st)), (Some(1), S_UNSUPP));
    }
    // A header split over three descriptors (one empty) is fine.
    let (hdr, data, st) = plain_read(s, q, 0, 512);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 10, NEXT, 1)),
            (1, desc(hdr + 10, 0, NEXT, 2)),
            (2, desc(hdr + 10, 6, NEXT, 3)),
            (3, desc(data, 512, WRITE | NEXT, 4)),
            (4, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect("split header", (used, s.byte(st)), (Some(513), S_OK));
    s.after("zero-length and short headers", q, true);

    // No status descriptor at all, a device-readable one, and an empty writable one: a write
    // that cannot be answered is not executed.
    for (name, st_flags, st_len) in [
        ("no status descriptor", None, 0u32),
        ("read-only status descriptor", Some(0u16), 1),
        ("zero-length status descriptor", Some(WRITE), 0),
    ] {
        let (hdr, data, st) = probe_write(s, q);
        let mut descs = vec![(0, desc(hdr, 16, NEXT, 1))];
        match st_flags {
            None => descs.push((1, desc(data, 512, 0, 0))),
            Some(f) => {
                descs.push((1, desc(data, 512, NEXT, 2)));
                descs.push((2, desc(st, st_len, f, 0)));
            }
        }
        let used = s.one(q, &descs, 0);
        s.expect(name, (used, s.byte(st)), (Some(0), POISON));
        s.probe_untouched(name);
    }
    // A read whose status descriptor is device-readable: a readable descriptor after a
    // writable one. UNSUPP goes in the last device-writable byte; nothing else is written.
    let (hdr, data, st) = plain_read(s, q, 0, 512);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 512, WRITE | NEXT, 2)),
            (2, desc(st, 1, 0, 0)),
        ],
        0,
    );
    s.expect(
        "read with read-only status",
        (used, s.byte(data + 511)),
        (Some(1), S_UNSUPP),
    );
    assert!(
        s.get(data, 511).iter().all(|&b| b == POISON),
        "data written"
    );
    assert_eq!(s.byte(st), POISON, "the read-only status byte was written");
    s.after("status descriptor missing or read-only", q, true);

    // Data in the wrong direction.
    let (hdr, data, st) = probe_write(s, q);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 512, WRITE | NEXT, 2)),
            (2, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect(
        "write from a writable buffer",
        (used, s.byte(st)),
        (Some(1), S_UNSUPP),
    );
    assert_eq!(
        s.get(data, 512),
        pattern(77, 512),
        "the write's buffer was written"
    );
    s.probe_untouched("write from a writable buffer");
    let (hdr, data, st) = plain_read(s, q, 0, 512);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 512, NEXT, 2)),
            (2, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect(
        "read into a readable buffer",
        (used, s.byte(st)),
        (Some(1), S_UNSUPP),
    );
    assert!(
        s.get(data, 512).iter().all(|&b| b == POISON),
        "readable buffer written"
    );
    for (name, t, payload_flags) in [
        ("GET_ID into a readable buffer", VIRTIO_BLK_T_GET_ID, 0u16),
        (
            "DISCARD from a writable buffer",
            VIRTIO_BLK_T_DISCARD,
            WRITE,
        ),
        (
            "WRITE_ZEROES from a writable buffer",
            VIRTIO_BLK_T_WRITE_ZEROES,
            WRITE,
        ),
    ] {
        let (hdr, data, st) = (s.at(q, HDR), s.at(q, DATA), s.status(q));
        s.put(hdr, &header(t, 0));
        s.put(data, &RangeSeg::new(PROBE, 8, 0).to_bytes());
        let used = s.one(
            q,
            &[
                (0, desc(hdr, 16, NEXT, 1)),
                (1, desc(data, 20, payload_flags | NEXT, 2)),
                (2, desc(st, 1, WRITE, 0)),
            ],
            0,
        );
        s.expect(name, (used, s.byte(st)), (Some(1), S_UNSUPP));
    }
    // The header in a device-writable descriptor: the device reads no header at all.
    let (hdr, _, st) = plain_read(s, q, 0, 0);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, WRITE | NEXT, 1)),
            (1, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect("writable header", (used, s.byte(st)), (Some(1), S_UNSUPP));
    s.probe_untouched("wrong directions");
    s.after("data in the wrong direction", q, true);
}

fn huge(s: &Suite) {
    let q = 0;
    let end = s.mem_end();
    // A read claiming 1 GiB, and u32::MAX bytes, through one descriptor that starts in guest
    // memory: refused before any byte is touched.
    for (name, len) in [
        ("read of 1 GiB", 1u32 << 30),
        ("read of u32::MAX - 64 bytes", u32::MAX - 64),
    ] {
        let (hdr, data, st) = plain_read(s, q, 0, 4096);
        let used = s.one(
            q,
            &[
                (0, desc(hdr, 16, NEXT, 1)),
                (1, desc(data, len, WRITE | NEXT, 2)),
                (2, desc(st, 1, WRITE, 0)),
            ],
            0,
        );
        s.expect(name, (used, s.byte(st)), (Some(1), S_UNSUPP));
        assert!(
            s.get(data, 4096).iter().all(|&b| b == POISON),
            "{name}: data written"
        );
    }
    // A write of 1 GiB.
    let (hdr, data, st) = probe_write(s, q);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 1 << 30, NEXT, 2)),
            (2, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect("write of 1 GiB", (used, s.byte(st)), (Some(1), S_UNSUPP));
    s.probe_untouched("write of 1 GiB");
    // Descriptors adding up to more than 4 GiB: virtio-queue cuts the chain; no answer.
    let (hdr, data, st) = plain_read(s, q, 0, 4096);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 0x8000_0000, WRITE | NEXT, 2)),
            (2, desc(data, 0x8000_0000, WRITE | NEXT, 3)),
            (3, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect("chain over 4 GiB", (used, s.byte(st)), (Some(0), POISON));
    assert!(
        s.get(data, 4096).iter().all(|&b| b == POISON),
        "over 4 GiB: data written"
    );
    // A discard whose payload claims 1 GiB of segments.
    let (hdr, data, st) = (s.at(q, HDR), s.at(q, DATA), s.status(q));
    s.put(hdr, &header(VIRTIO_BLK_T_DISCARD, 0));
    s.put(data, &RangeSeg::new(PROBE, 8, 0).to_bytes());
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 1 << 30, NEXT, 2)),
            (2, desc(st, 1, WRITE, 0)),
        ],
        0,
    );
    s.expect(
        "discard with 1 GiB of segments",
        (used, s.byte(st)),
        (Some(1), S_UNSUPP),
    );
    // GET_ID into a 1 GiB buffer reaching past the end of memory: its last byte, the status,
    // is outside, so it cannot be answered.
    let (hdr, data, _) = (s.at(q, HDR), s.at(q, DATA), s.status(q));
    s.put(hdr, &header(VIRTIO_BLK_T_GET_ID, 0));
    s.put(data, &[POISON; 20]);
    let used = s.one(
        q,
        &[
            (0, desc(hdr, 16, NEXT, 1)),
            (1, desc(data, 1 << 30, WRITE, 0)),
        ],
        0,
    );
    assert_eq!(used, Some(0), "GET_ID into 1 GiB: used length");
    assert!(
        s.get(data, 20).iter().all(|&b| b == POISON),
        "GET_ID into 1 GiB: written"
    );
    Stats::add(&s.stats.statuses, 1);
    assert!(
        data + (1 << 30) > end,
        "the 1 GiB GET_ID buffer must reach past the end of guest memory"
    );
    s.after("huge lengths", q, true);

    // The largest read accepted (32 MiB, split over two threads) and one sector more. One run
    // at a time: runs going at once would otherwise share the CPU for it past the timeout.
    let _big = BIG_READS.lock().unwrap_or_else(|p| p.into_inner());
    let max = 32u32 << 20;
    let c = s.a().submit(q, &Req::read(0, max));
    s.expect(
        "read of 32 MiB",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(max + 1), S_OK),
    );
    assert!(
        c.data == s.disk_bytes(0, max as usize),
        "32 MiB read differs from the image"
    );
    let c = s.a().submit(q, &Req::read(0, max + 512));
    s.expect(
        "read of 32 MiB + 512",
        (Some(c.used_len), c.status.unwrap_or(POISON)),
        (Some(1), S_UNSUPP),
    );
    Stats::add(&s.stats.requests, 2);
    s.after("32 MiB limit", q, true);
}

/// Every case on a fresh suite, then the checks of its end (refused writes left no trace,
/// every earlier write reads back).
fn run_cases(s: &Suite) {
    qtest_basic(s);
    qtest_indirect(s);
    qtest_idx(s);
    qtest_multiqueue(s);
    qtest_types_range_id_flush(s);
    loops_and_cut_chains(s);
    indirect_tables(s);
    ring_indices(s);
    addresses(s);
    headers_status_directions(s);
    huge(s);
    s.probe_untouched("end of suite");
    s.earlier_data("end of suite", 1, true);
}

fn run_suite(layout: &str, cache: CacheMode, event_idx: bool) -> Stats {
    let s = Suite::new(layout, cache, event_idx);
    run_cases(&s);
    assert_no_spin("end of suite");
    let stats = Stats {
        cases: Cell::new(s.stats.cases.get()),
        requests: Cell::new(s.stats.requests.get()),
        statuses: Cell::new(s.stats.statuses.get()),
    };
    s.finish();
    stats
}

#[test]
fn malformed_guests_get_answers_and_every_queue_and_disk_keeps_serving() {
    count_panics();
    let _one = SERIAL_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();
    let mut total = (0, 0, 0);
    for event_idx in [true, false] {
        let st = run_suite("raw", test_cache(), event_idx);
        total.0 += st.cases.get();
        total.1 += st.requests.get();
        total.2 += st.statuses.get();
    }
    let panics = PANICS.load(Ordering::SeqCst);
    println!(
        "malformed: cases={} requests={} statuses={} panics={panics} ({:.1} s, both EVENT_IDX modes)",
        total.0,
        total.1,
        total.2,
        start.elapsed().as_secs_f64()
    );
    assert_eq!(panics, 0);
}

/// The whole battery against every layout on every cache mode (the raw disk on the default
/// cache mode is the test above, in both EVENT_IDX modes); EVENT_IDX alternates between runs.
/// Each run has its own disks, driver and thread, all at once (the cases mostly wait for
/// completions that must not come); then, with every run's queues idle, no queue worker of
/// any of them may spin.
#[test]
fn every_layout_answers_malformed_guests_on_both_cache_modes() {
    count_panics();
    let _one = SERIAL_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();
    let mut runs = Vec::new();
    for cache in layouts::modes() {
        for layout in layouts::LAYOUTS {
            if !(layout == "raw" && cache == test_cache()) {
                runs.push((layout, cache, runs.len() % 2 == 0));
            }
        }
    }
    let threads: Vec<_> = runs
        .iter()
        .map(|&(layout, cache, event_idx)| {
            std::thread::Builder::new()
                // A name of this file's tests: its failed assertions are not the daemon's panics.
                .name(TEST_NAMES[1].into())
                .spawn(move || {
                    let t = Instant::now();
                    let s = Suite::new(layout, cache, event_idx);
                    run_cases(&s);
                    (s, t.elapsed())
                })
                .expect("spawn a run")
        })
        .collect();
    let suites: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect();
    let worst = assert_no_spin("every layout, end of the runs");
    for (s, took) in suites {
        println!(
            "malformed {} event_idx={}: cases={} requests={} statuses={} ({:.1} s)",
            s.kind,
            s.event_idx,
            s.stats.cases.get(),
            s.stats.requests.get(),
            s.stats.statuses.get(),
            took.as_secs_f64()
        );
        s.finish();
    }
    let panics = PANICS.load(Ordering::SeqCst);
    println!(
        "malformed, every layout: runs={} panics={panics} worst idle worker cpu {worst} ms ({:.1} s)",
        runs.len(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(panics, 0);
}

// ------------------------------------------------------------------------------------------------
// The vhost-user protocol: the qtest's `nxvirtq` and other bad messages, on disk C, while disk A
// keeps serving.

/// Waits until the daemon closes `stream` (read returns 0 or fails); false on timeout.
fn closed_by_daemon(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + common::TIMEOUT;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn msg_header(request: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

/// Sends GET_CONFIG for `size` bytes at `offset` on `fe`'s socket directly (vhost's frontend
/// waits forever for a payload when the backend refuses one) and returns the size the reply
/// gives: 0 is the backend's refusal. Then checks the connection still answers GET_FEATURES.
fn raw_get_config(fe: &Frontend, offset: u32, size: u32) -> u32 {
    // SAFETY: dup only creates a new descriptor for the same socket; it is owned below.
    let fd = unsafe { libc::dup(fe.as_raw_fd()) };
    assert!(fd >= 0, "dup failed");
    // SAFETY: `fd` was just returned by dup and nothing else owns it.
    let mut sock = unsafe { UnixStream::from_raw_fd(fd) };
    sock.set_read_timeout(Some(common::TIMEOUT))
        .expect("timeout");
    let mut m = msg_header(24, 12 + size);
    m.extend_from_slice(&offset.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.resize(m.len() + size as usize, 0);
    sock.write_all(&m).expect("send GET_CONFIG");
    let mut reply = [0u8; 24];
    sock.read_exact(&mut reply).expect("GET_CONFIG reply");
    let got = u32::from_le_bytes([reply[16], reply[17], reply[18], reply[19]]);
    let mut payload = vec![0u8; got as usize];
    sock.read_exact(&mut payload).expect("GET_CONFIG payload");
    // GET_FEATURES still answers on this connection.
    sock.write_all(&msg_header(1, 0))
        .expect("send GET_FEATURES");
    let mut r = [0u8; 20];
    sock.read_exact(&mut r)
        .expect("GET_FEATURES reply after GET_CONFIG");
    assert_eq!(
        u32::from_le_bytes([r[0], r[1], r[2], r[3]]),
        1,
        "reply to GET_FEATURES"
    );
    got
}

/// Ring addresses for SET_VRING_ADDR (nothing is mapped there).
fn test_ring() -> VringConfigData {
    VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: 0x1000,
        used_ring_addr: 0x3000,
        avail_ring_addr: 0x2000,
        log_addr: None,
    }
}

/// Disk C must accept a normal frontend and serve a write and a read.
fn c_serves(socket: &Path, seed: u64) {
    let d = TestDriver::connect(socket, 1, 4 << 20);
    let data = pattern(seed, 4096);
    d.submit(0, &Req::write(8, &data)).assert_ok(0);
    let c = d.submit(0, &Req::read(8, 4096));
    c.assert_ok(4096);
    assert!(c.data == data, "disk C read back other data");
}

#[test]
fn bad_vhost_user_messages_drop_only_their_connection() {
    count_panics();
    let _one = SERIAL_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let server_a = TestServer::start(raw_disk(&dir.path().join("a.img"), 8 * MIB, false), 2);
    let server_c = TestServer::start(raw_disk(&dir.path().join("c.img"), 8 * MIB, false), 1);
    let a = TestDriver::connect(server_a.socket(), 2, 8 << 20);
    let sock = server_c.socket().to_path_buf();
    let mut cases = 0u64;
    let mut refused = 0u64;
    let a_serves = |seed: u64| {
        for q in 0..2 {
            let data = pattern(seed * 2 + q as u64, 4096);
            a.submit(q, &Req::write(16, &data)).assert_ok(0);
            let c = a.submit(q, &Req::read(16, 4096));
            c.assert_ok(4096);
            assert!(c.data == data);
        }
    };

    // nxvirtq and friends: requests naming queues the device does not have, impossible queue
    // sizes, config reads past the config space, vring addresses with no memory table. Each is
    // refused with an error reply (REPLY_ACK). vhost-user-backend then ends the connection (any
    // refused request does, in 0.24); the daemon takes the next one.
    type Bad = fn(&mut Frontend) -> bool;
    let bad: Vec<(&str, Bad)> = vec![
        ("SET_VRING_ADDR on queue 2 (nxvirtq)", |fe| {
            fe.set_vring_addr(2, &test_ring()).is_err()
        }),
        ("SET_VRING_ADDR on queue 15", |fe| {
            fe.set_vring_addr(15, &test_ring()).is_err()
        }),
        ("SET_VRING_ADDR without a memory table", |fe| {
            fe.set_vring_addr(0, &test_ring()).is_err()
        }),
        ("SET_VRING_NUM 0", |fe| fe.set_vring_num(0, 0).is_err()),
        ("SET_VRING_NUM 4096", |fe| {
            fe.set_vring_num(0, 4096).is_err()
        }),
        ("SET_VRING_NUM on queue 9", |fe| {
            fe.set_vring_num(9, 256).is_err()
        }),
        ("SET_VRING_BASE on queue 7", |fe| {
            fe.set_vring_base(7, 0).is_err()
        }),
        ("SET_VRING_ENABLE on queue 3", |fe| {
            fe.set_vring_enable(3, true).is_err()
        }),
        ("GET_CONFIG of 2048 bytes", |fe| {
            raw_get_config(fe, 0, 2048) == 0
        }),
        ("GET_CONFIG at offset 1000", |fe| {
            raw_get_config(fe, 1000, 8) == 0
        }),
        ("GET_CONFIG across the end", |fe| {
            raw_get_config(fe, 90, 16) == 0
        }),
    ];
    let mut dropped = 0u64;
    for (name, f) in bad {
        let mut fe = Frontend::connect(&sock, 16).expect("connect to disk C");
        fe.set_owner().expect("SET_OWNER");
        let features = fe.get_features().expect("GET_FEATURES");
        fe.set_features(features).expect("SET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(pf.contains(VhostUserProtocolFeatures::REPLY_ACK));
        fe.set_protocol_features(
            VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ,
        )
        .expect("SET_PROTOCOL_FEATURES");
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert!(f(&mut fe), "{name}: accepted");
        refused += 1;
        cases += 1;
        if fe.get_features().is_err() {
            dropped += 1;
        }
        drop(fe);
        a_serves(cases);
        c_serves(&sock, 100 + cases);
    }

    // Raw garbage: the daemon drops the connection and takes the next one.
    let raw_cases: Vec<(&str, Vec<u8>)> = vec![
        ("1 KiB of 0xff", vec![0xff; 1024]),
        ("unknown request 9999", msg_header(9999, 0)),
        (
            "GET_FEATURES with a 256 MiB payload size",
            msg_header(1, 256 << 20),
        ),
        ("SET_FEATURES without its payload", msg_header(2, 8)),
        ("version 0 header", {
            let mut h = msg_header(1, 0);
            h[4..8].copy_from_slice(&0u32.to_le_bytes());
            h
        }),
        ("half a header", msg_header(1, 0)[..6].to_vec()),
    ];
    for (name, bytes) in raw_cases {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.write_all(&bytes).expect("send");
        if name == "half a header" || name == "SET_FEATURES without its payload" {
            // The daemon waits for the rest; the client gives up.
            std::thread::sleep(Duration::from_millis(50));
            drop(s);
        } else {
            assert!(
                closed_by_daemon(&mut s),
                "{name}: the daemon kept the connection"
            );
            refused += 1;
        }
        cases += 1;
        a_serves(cases);
        c_serves(&sock, 200 + cases);
    }
    // Connections that close at once.
    for _ in 0..50 {
        drop(UnixStream::connect(&sock).expect("connect"));
    }
    cases += 1;
    a_serves(cases);
    c_serves(&sock, 300);

    drop(a);
    server_a.stop().expect("serve A returns Ok");
    server_c.stop().expect("serve C returns Ok");
    let panics = PANICS.load(Ordering::SeqCst);
    println!(
        "malformed-protocol: cases={cases} refused={refused} connections_dropped_after_refusal={dropped} panics={panics}"
    );
    assert_eq!(panics, 0);
}
