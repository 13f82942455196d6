//! A daemon SIGKILLed with requests in flight, and a restarted daemon given the same inflight
//! region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), as QEMU does on a `reconnect=1`
//! reconnection: every request completes exactly once, with its data on disk.
//!
//! The frontend here is QEMU's part by hand over vhost's `Frontend`: guest memory in a sealed
//! memfd kept across the daemon's death, one split queue, GET_INFLIGHT_FD once, SET_INFLIGHT_FD on every connection, and on a
//! reconnection SET_VRING_BASE with the used index (QEMU's `virtio_queue_restore_last_avail_idx`
//! when GET_VRING_BASE could not be asked).

mod cli;
#[allow(dead_code)]
mod serve;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::InflightRegion;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
/// Requests per round: a write per two descriptors (header and data in one, status), and a
/// FLUSH last.
const REQS: u16 = 96;
const WRITE: u64 = 64 * 1024;
const MEM: usize = 16 << 20;
const DISK: u64 = 8 << 20;
const DATA_BASE: u64 = 0x10_0000;
const STATUS_BASE: u64 = 0xf_0000;
const ROUNDS: usize = 3;

/// The split queue's rings in guest memory (each on its own page: virtio-queue's
/// `MockSplitQueue` places the used ring over the avail ring's second half for queues this
/// large).
struct Rings<'m> {
    mem: &'m GuestMemoryMmap,
}

const DESC: u64 = 0;
const AVAIL: u64 = 0x1_0000;
const USED: u64 = 0x2_0000;

impl Rings<'_> {
    fn desc(&self, i: u16, d: Descriptor) {
        self.mem
            .write_obj(
                RawDescriptor::from(d),
                GuestAddress(DESC + 16 * u64::from(i)),
            )
            .expect("guest memory");
    }
    fn avail_slot(&self, slot: u16, head: u16) {
        let a = AVAIL + 4 + 2 * u64::from(slot % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(a))
            .expect("guest memory");
    }
    fn set_avail_idx(&self, idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
            .expect("guest memory");
    }
    fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(USED + 2))
                .expect("guest memory"),
        )
    }
    fn used_id(&self, i: u16) -> u32 {
        let a = USED + 4 + 8 * u64::from(i % QSIZE);
        u32::from_le(self.mem.read_obj(GuestAddress(a)).expect("guest memory"))
    }
}

fn guest_memory() -> (GuestMemoryMmap, File) {
    // SAFETY: a constant NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"guest".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM as u64).expect("set len");
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on the memfd `file` owns.
    let sealed = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(sealed, 0, "sealing the guest memory");
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file.try_clone().expect("try clone"), 0)),
    )])
    .expect("mapped");
    (mem, file)
}

fn spawn(dir: &Path) -> Child {
    let sock = dir.join("vd.sock");
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .expect("serve.log");
    let child = Command::new(serve::bin())
        .args([
            "serve",
            "--image",
            cli::path(&dir.join("disk.img")),
            "--size",
            "8M",
        ])
        .args(["--socket", cli::path(&sock)])
        // scripts/test.sh's runs of the in-process suites on the other engines.
        .args(match std::env::var("DOVETAIL_TEST_ENGINE") {
            Ok(e) => vec!["--io-engine".to_string(), e],
            Err(_) => Vec::new(),
        })
        .args(serve::test_cache_args())
        .args(serve::test_sandbox_args())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn dovetail serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// One connection, set up as QEMU's vhost-user-blk does on start: the inflight region before
/// the rings; `base` is where the avail ring resumes (0, or the used index after a crash).
struct Conn {
    fe: Frontend,
    kick: EventFd,
    _call: EventFd,
}

fn connect(
    dir: &Path,
    mem: &GuestMemoryMmap,
    inflight: Option<(&VhostUserInflight, &File)>,
    base: u16,
) -> (Conn, Option<(VhostUserInflight, File)>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fe = loop {
        match Frontend::connect(dir.join("vd.sock"), 1) {
            Ok(fe) => break fe,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    fe.set_owner().expect("set owner");
    let features = fe.get_features().expect("get features");
    let proto = fe.get_protocol_features().expect("get protocol features");
    assert!(
        proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD not offered: {proto:?}"
    );
    fe.set_protocol_features(
        VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .expect("set protocol features");
    let acked = (1u64 << VIRTIO_F_VERSION_1) | (1 << 30);
    assert_eq!(features & acked, acked);
    fe.set_features(acked).expect("set features");
    let got = match inflight {
        Some(_) => None,
        None => {
            let (msg, file) = fe
                .get_inflight_fd(&VhostUserInflight {
                    num_queues: 1,
                    queue_size: QSIZE,
                    ..Default::default()
                })
                .expect("GET_INFLIGHT_FD");
            Some((msg, file))
        }
    };
    let (msg, file) = match (&got, inflight) {
        (Some((m, f)), _) => (*m, f),
        (None, Some((m, f))) => (*m, f),
        (None, None) => unreachable!(),
    };
    fe.set_inflight_fd(&msg, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    let region = mem.find_region(GuestAddress(0)).expect("guest memory");
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("from guest region");
    fe.set_mem_table(&[info]).expect("set mem table");
    let (kick, call) = program_queue(&mut fe, mem, base);
    (
        Conn {
            fe,
            kick,
            _call: call,
        },
        got,
    )
}

/// Sets queue 0 up and enables it, the avail ring resuming at `base`; returns its kick and
/// call eventfds.
fn program_queue(fe: &mut Frontend, mem: &GuestMemoryMmap, base: u16) -> (EventFd, EventFd) {
    let host = mem.get_host_address(GuestAddress(0)).expect("guest memory") as u64;
    fe.set_vring_num(0, QSIZE).expect("set vring num");
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host + DESC,
            used_ring_addr: host + USED,
            avail_ring_addr: host + AVAIL,
            log_addr: None,
        },
    )
    .expect("set vring addr");
    fe.set_vring_base(0, base).expect("set vring base");
    let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    fe.set_vring_call(0, &call).expect("set vring call");
    fe.set_vring_kick(0, &kick).expect("set vring kick");
    fe.set_vring_enable(0, true).expect("set vring enable");
    (kick, call)
}

fn pattern(round: usize, req: u16) -> Vec<u8> {
    let mut x = (round as u64) << 32 | u64::from(req) | 0x9e37_79b9_0000_0000;
    (0..WRITE as usize)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Makes one round of requests available: request `r` is head `2r` (header + data, then the
/// status byte at `2r + 1`), writing `pattern(round, r)` at 64 KiB slot `r`; the last is a
/// FLUSH. Returns the avail index after it.
fn make_available(mem: &GuestMemoryMmap, vq: &Rings<'_>, round: usize, avail: u16) -> u16 {
    for r in 0..REQS {
        let head = 2 * r;
        let buf = DATA_BASE + u64::from(r) * (WRITE + 16);
        let flush = r == REQS - 1;
        let t = if flush {
            VIRTIO_BLK_T_FLUSH
        } else {
            VIRTIO_BLK_T_OUT
        };
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        let sector = u64::from(r) * WRITE / 512;
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(buf))
            .expect("guest memory");
        let len = if flush {
            16
        } else {
            mem.write_slice(&pattern(round, r), GuestAddress(buf + 16))
                .expect("guest memory");
            16 + WRITE as u32
        };
        let status = STATUS_BASE + u64::from(r);
        mem.write_obj(0xffu8, GuestAddress(status))
            .expect("guest memory");
        vq.desc(head, Descriptor::new(buf, len, 1, head + 1));
        vq.desc(head + 1, Descriptor::new(status, 1, 2, 0));
        vq.avail_slot(avail.wrapping_add(r), head);
    }
    let next = avail.wrapping_add(REQS);
    vq.set_avail_idx(next);
    next
}

fn used_idx(vq: &Rings<'_>) -> u16 {
    vq.used_idx()
}

fn wait_used(vq: &Rings<'_>, want: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while used_idx(vq) != want {
        assert!(
            Instant::now() < deadline,
            "{what}: used index {} never reached {want}",
            used_idx(vq)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigkill_with_requests_in_flight_completes_each_exactly_once_after_a_restart() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (mem, _memfd) = guest_memory();
    let vq = Rings { mem: &mem };
    let mut child = spawn(dir);
    let (mut conn, got) = connect(dir, &mem, None, 0);
    let (msg, region_file) = got.expect("a new region");
    assert_eq!(msg.num_queues, 1);
    assert_eq!(msg.queue_size, QSIZE);
    // The test reads the region as the frontend holds it.
    let region = Arc::new(
        InflightRegion::adopt(region_file.try_clone().expect("try clone"), &msg).expect("mapped"),
    );
    let tracker = region.queue(0).expect("queue 0");

    let (mut avail, mut used_before) = (0u16, 0u16);
    let (mut resubmitted_total, mut kills, mut tries) = (0usize, 0usize, 0usize);
    let mut rounds = 0usize;
    while rounds < ROUNDS {
        tries += 1;
        assert!(
            tries <= 40,
            "no kill caught a request in flight in 40 tries"
        );
        let round = tries;
        avail = make_available(&mem, &vq, round, avail);
        conn.kick.write(1).expect("kick");
        // Let the daemon take some of them, then SIGKILL it mid-round.
        std::thread::sleep(Duration::from_micros(300 + 700 * (tries as u64 % 4)));
        child.kill().expect("kill");
        child.wait().expect("wait");
        drop(conn);
        kills += 1;
        let in_flight = tracker.in_flight();
        let used_at_kill = used_idx(&vq);
        // Every request is in the used ring, in flight, or still available (never taken).
        let taken = used_at_kill.wrapping_sub(used_before) as usize + in_flight.len();
        assert!(
            taken <= REQS as usize,
            "round {round}: {taken} taken of {REQS}; log: {}",
            std::fs::read_to_string(dir.join("serve.log")).expect("serve.log")
        );

        child = spawn(dir);
        // QEMU restores last_avail_idx to the used index when the backend is gone.
        conn = connect(dir, &mem, Some((&msg, &region_file)), used_at_kill).0;
        let want = used_before.wrapping_add(REQS);
        wait_used(&vq, want, "after the restart");
        // Nothing more comes: no request completed twice.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            used_idx(&vq),
            want,
            "round {round}: a request completed twice"
        );
        let mut heads: Vec<u32> = (0..REQS)
            .map(|i| vq.used_id(used_before.wrapping_add(i)))
            .collect();
        heads.sort_unstable();
        let expect: Vec<u32> = (0..u32::from(REQS)).map(|r| 2 * r).collect();
        assert_eq!(heads, expect, "round {round}: each head exactly once");
        for r in 0..REQS {
            let s: u8 = mem
                .read_obj(GuestAddress(STATUS_BASE + u64::from(r)))
                .expect("read");
            assert_eq!(s, 0, "round {round}: request {r} status");
        }
        assert!(
            tracker.in_flight().is_empty(),
            "round {round}: region clean"
        );
        let image = File::open(dir.join("disk.img")).expect("disk.img");
        for r in 0..REQS - 1 {
            let mut b = vec![0u8; WRITE as usize];
            image
                .read_exact_at(&mut b, u64::from(r) * WRITE)
                .expect("read");
            assert!(
                b == pattern(round, r),
                "round {round}: write {r} not on disk"
            );
        }
        if !in_flight.is_empty() {
            // The restarted daemon ran them again, oldest first.
            // The restarted daemon ran them again, oldest first (less the one whose completion
            // reached the used ring just before the kill, if any).
            let log = std::fs::read_to_string(dir.join("serve.log")).expect("serve.log");
            let at = log
                .rfind("in flight resubmitted (heads [")
                .unwrap_or_else(|| panic!("round {round}: no resubmission in the log"));
            let rest = &log[at + "in flight resubmitted (heads [".len()..];
            let list: Vec<u16> = rest[..rest.find(']').expect("a list")]
                .split(", ")
                .filter(|x| !x.is_empty())
                .map(|x| x.parse().expect("parse"))
                .collect();
            let mut left = in_flight.clone();
            left.retain(|h| !list.contains(h));
            let kept: Vec<u16> = in_flight
                .iter()
                .copied()
                .filter(|h| list.contains(h))
                .collect();
            assert_eq!(kept, list, "round {round}: resubmitted in their order");
            assert!(
                left.len() <= 1,
                "round {round}: {left:?} in flight not resubmitted"
            );
            resubmitted_total += list.len();
            rounds += 1;
        }
        used_before = want;
    }
    // A clean stop and start within the connection (GET_VRING_BASE, then the queue set up
    // again with that index): the frontend's index stands, nothing is run again, a new round
    // completes once.
    let base = conn.fe.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(
        base,
        u32::from(avail),
        "the stopped queue took every request"
    );
    let (kick, call) = program_queue(&mut conn.fe, &mem, avail);
    // The started queue signals the driver once with nothing to complete: after a crash, a
    // completion the dead daemon wrote but did not signal would otherwise wait forever.
    let deadline = Instant::now() + Duration::from_secs(5);
    while call.read().is_err() {
        assert!(
            Instant::now() < deadline,
            "the queue's start was not signalled"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    conn.kick = kick;
    conn._call = call;
    let round = tries + 1;
    avail = make_available(&mem, &vq, round, avail);
    conn.kick.write(1).expect("kick");
    let want = used_before.wrapping_add(REQS);
    wait_used(&vq, want, "after a clean queue restart");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        used_idx(&vq),
        want,
        "after a clean queue restart: a request completed twice"
    );
    let mut heads: Vec<u32> = (0..REQS)
        .map(|i| vq.used_id(used_before.wrapping_add(i)))
        .collect();
    heads.sort_unstable();
    let expect: Vec<u32> = (0..u32::from(REQS)).map(|r| 2 * r).collect();
    assert_eq!(heads, expect, "after a clean queue restart: each head once");
    assert!(tracker.in_flight().is_empty());
    assert_eq!(avail, want);
    let _ = conn.fe.set_vring_enable(0, false);
    drop(conn);
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(DISK >= u64::from(REQS) * WRITE);
    eprintln!(
        "inflight restart: {kills} SIGKILLs, {rounds} with requests in flight, \
         {resubmitted_total} resubmitted, every request completed once ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// The pid answering `hello` on `control`, if any.
fn control_pid(control: &Path) -> Option<u32> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(control).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"{\"cmd\":\"hello\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    v["result"]["pid"].as_u64().map(|p| p as u32)
}

#[test]
fn a_live_handover_with_requests_in_flight_keeps_the_inflight_region_and_the_connection() {
    if !serve::test_sandbox_args().is_empty() {
        eprintln!("SKIPPED: a sandboxed daemon cannot start another binary");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let control = dir.join("ctl.sock");
    let sock = dir.join("vd.sock");
    let log = std::fs::File::create(dir.join("serve.log")).expect("serve.log");
    let mut child = Command::new(serve::bin())
        .args(["serve", "--image", cli::path(&dir.join("disk.img"))])
        .args(["--size", "8M", "--socket", cli::path(&sock)])
        .args(["--control", cli::path(&control)])
        .args(serve::test_cache_args())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn dovetail serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while control_pid(&control).is_none() {
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let old = child.id();
    let (mem, _memfd) = guest_memory();
    let vq = Rings { mem: &mem };
    let (conn, got) = connect(dir, &mem, None, 0);
    let (msg, region_file) = got.expect("a new region");
    let region = Arc::new(
        InflightRegion::adopt(region_file.try_clone().expect("try clone"), &msg).expect("mapped"),
    );
    let tracker = region.queue(0).expect("queue 0");

    // SIGUSR2, and rounds of requests made available one after another meanwhile: the old
    // daemon pauses in the middle of one (it completes what it took), the new one completes the
    // rest from the same ring, through the same inflight region.
    // SAFETY: kill(2) of the daemon this test started.
    assert_eq!(unsafe { libc::kill(old as libc::pid_t, libc::SIGUSR2) }, 0);
    let (mut avail, mut round, mut after) = (0u16, 0usize, 0usize);
    while after < 2 {
        round += 1;
        assert!(round < 2000, "the old daemon never handed over");
        let start = avail;
        avail = make_available(&mem, &vq, round, avail);
        conn.kick.write(1).expect("kick");
        wait_used(&vq, avail, "a round across the handover");
        let mut heads: Vec<u32> = (0..REQS)
            .map(|i| vq.used_id(start.wrapping_add(i)))
            .collect();
        heads.sort_unstable();
        let expect: Vec<u32> = (0..u32::from(REQS)).map(|r| 2 * r).collect();
        assert_eq!(heads, expect, "round {round}: each head once");
        if after > 0 || child.try_wait().expect("try_wait").is_some() {
            after += 1;
        }
    }
    assert!(child.wait().expect("the old daemon").success());
    let new = control_pid(&control).expect("the new daemon answers");
    assert_ne!(new, old);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(&vq), avail, "a request completed twice");
    eprintln!("{round} rounds of {REQS} requests across the handover");
    assert!(tracker.in_flight().is_empty(), "the region is clean");
    let image = File::open(dir.join("disk.img")).expect("disk.img");
    for r in 0..REQS - 1 {
        let mut b = vec![0u8; WRITE as usize];
        image
            .read_exact_at(&mut b, u64::from(r) * WRITE)
            .expect("read");
        assert!(
            b == pattern(round, r),
            "write {r} of the last round not on disk"
        );
    }
    let log = std::fs::read_to_string(dir.join("serve.log")).expect("serve.log");
    assert!(
        log.contains("its connection handed over, not reconnected"),
        "{log}"
    );
    // The inflight region went with it: conn, memory, kick, call, the region's memfd.
    assert!(log.contains("1 memory region(s), 5 fds"), "{log}");
    drop(conn);
    // SAFETY: kill(2) of the daemon the test's daemon handed over to.
    unsafe { libc::kill(new as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let running = || {
        std::fs::read_to_string(format!("/proc/{new}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
    };
    while running() {
        assert!(Instant::now() < deadline, "the new daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}
