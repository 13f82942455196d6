//! Resource limits of the real daemon (`dovetail serve` as a child process), measured from its
//! /proc entry before and after: resident memory (VmRSS), open file descriptors, threads and
//! CPU time. Three hostile clients:
//!
//! - a guest that never drains its used ring and keeps resubmitting the same descriptor head,
//!   then publishes an avail index running more than a queue size ahead;
//! - thousands of control-socket connections: left idle, opened and closed, sending garbage,
//!   half lines and over-long lines;
//! - vhost-user messages carrying file descriptors (SCM_RIGHTS) they should not carry.
//!
//! Each test prints one summary line with what it measured.
//!
//! The guest that never drains its ring is run again against every other layout the daemon
//! serves (parallax-v1, parallax-v2, a Tee of parallax-v1 and parallax-v2 under
//! sync-cross-checks, a parallax-v2 disk of a two-tier store; raw on the other cache mode), on
//! both cache modes, one daemon each, all at once. `DOVETAIL_TEST_CACHE` picks one cache mode.

mod common;
#[path = "common/layouts.rs"]
mod layouts;

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{header, pattern, Req, TestDriver};
use dovetail_bench::driver::{DriverOptions, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use serde_json::Value;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------------
// The daemon as a child process, and its /proc numbers.

struct Serve {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Serve {
    /// `dovetail serve --image DIR/disk.img --size 64M --queues 2 --socket DIR/vd.sock
    /// --control DIR/ctl.sock`, logging warnings to DIR/serve.log; returns once both sockets
    /// exist.
    fn start() -> Serve {
        Serve::start_layout("raw", None)
    }

    /// Like [`Serve::start`], with disk `vd` of kind `layout` (the names of
    /// `common/layouts.rs`: a raw image, or a store made with the CLI in DIR/st) and `--cache
    /// MODE` when given.
    fn start_layout(layout: &str, cache: Option<&str>) -> Serve {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = fs::File::create(dir.path().join("serve.log")).expect("log");
        let at = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();
        let st = at("st");
        let cli = |args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_dovetail"))
                .args(args)
                .output()
                .expect("run dovetail");
            assert!(
                out.status.success(),
                "dovetail {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let disk_args: Vec<String> = if layout == "raw" {
            vec![
                "--image".into(),
                at("disk.img"),
                "--size".into(),
                "64M".into(),
                "--socket".into(),
                at("vd.sock"),
            ]
        } else {
            if layout == "tiered" {
                let fast = format!("fast={}:256M", at("fast.data"));
                let slow = format!("slow={}:256M", at("slow.data"));
                cli(&[
                    "store",
                    "create",
                    &st,
                    "--tier",
                    &fast,
                    "--tier",
                    &slow,
                    "--extent-size",
                    "4M",
                ]);
            } else {
                cli(&[
                    "store",
                    "create",
                    &st,
                    "--size",
                    "256M",
                    "--extent-size",
                    "4M",
                ]);
            }
            let trusted = match layout {
                "tee" => "parallax-v1",
                "tiered" => "parallax-v2",
                l => l,
            };
            cli(&[
                "disk", "create", &st, "vd", "--size", "64M", "--layout", trusted,
            ]);
            if layout == "tee" {
                cli(&[
                    "disk",
                    "tee",
                    &st,
                    "vd",
                    "--candidate",
                    "parallax-v2",
                    "--policy",
                    "sync-cross-checks",
                ]);
            }
            vec![
                "--store".into(),
                st.clone(),
                "--disk".into(),
                format!("vd={}", at("vd.sock")),
            ]
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe: the daemon is killed if the test thread goes away first.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .arg("serve")
            .args(&disk_args)
            .args(cache.map(|c| ["--cache", c]).into_iter().flatten())
            // The engine the in-process suites use (scripts/test.sh reruns them with others).
            .args(
                std::env::var("DOVETAIL_TEST_ENGINE")
                    .map(|e| ["--io-engine".to_string(), e])
                    .into_iter()
                    .flatten(),
            )
            .args(["--queues", "2"])
            .arg("--control")
            .arg(dir.path().join("ctl.sock"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dovetail serve");
        let mut s = Serve {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(s.ctl().exists() && s.vd().exists()) {
            if let Some(st) = s.child_mut().try_wait().expect("try_wait") {
                panic!("the daemon exited at start ({st}):\n{}", s.log_tail());
            }
            assert!(Instant::now() < deadline, "sockets never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        s
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the daemon runs")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    fn vd(&self) -> PathBuf {
        self.dir.path().join("vd.sock")
    }

    fn ctl(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Fails the test if the daemon has exited.
    fn assert_alive(&mut self, what: &str) {
        if let Some(st) = self.child_mut().try_wait().expect("try_wait") {
            panic!("{what}: the daemon exited ({st}):\n{}", self.log_tail());
        }
    }

    fn proc_path(&self, what: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{what}", self.pid()))
    }

    /// Open file descriptors.
    fn fds(&self) -> usize {
        fs::read_dir(self.proc_path("fd"))
            .expect("/proc/PID/fd")
            .count()
    }

    /// The daemon's descriptors held for good: the fewest of a few counts 20 ms apart, so a
    /// descriptor open only for a moment (a commit's own io_uring) is not counted, while one
    /// leaked is in every count.
    fn steady_fds(&self) -> usize {
        (0..5)
            .map(|i| {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                self.fds()
            })
            .min()
            .expect("counts")
    }

    /// A field of /proc/PID/status, as its first number (kB for memory).
    fn status_field(&self, field: &str) -> u64 {
        let text = fs::read_to_string(self.proc_path("status")).expect("/proc/PID/status");
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }

    fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS:")
    }

    /// The daemon's own threads: not the kernel's io_uring workers (`iou-wrk-*`, `iou-sqp-*`),
    /// which the kernel starts and ends as it needs them to run blocking submissions.
    fn threads(&self) -> u64 {
        fs::read_dir(self.proc_path("task"))
            .expect("/proc/PID/task")
            .filter_map(|t| t.ok())
            .filter(|t| {
                fs::read_to_string(t.path().join("comm"))
                    .map(|c| !c.starts_with("iou-"))
                    .unwrap_or(false)
            })
            .count() as u64
    }

    /// User + system CPU time, in milliseconds.
    fn cpu_ms(&self) -> u64 {
        let stat = fs::read_to_string(self.proc_path("stat")).expect("/proc/PID/stat");
        let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("stat format");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
        ticks * 1000 / clock_ticks()
    }

    /// CPU the daemon uses over `d` in which nobody asks it anything, in milliseconds.
    fn idle_cpu_ms(&self, d: Duration) -> u64 {
        let before = self.cpu_ms();
        std::thread::sleep(d);
        self.cpu_ms() - before
    }

    /// Waits until the daemon's open descriptors are back to `baseline` (its connection threads
    /// finish asynchronously); returns the last count seen.
    fn settle_fds(&self, baseline: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.fds();
            if n <= baseline || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until descriptors and threads are back to the baseline and stay there for a
    /// while (connections still queued in the listen backlog are accepted meanwhile); returns
    /// the last counts seen.
    fn settle(&self, fds: usize, threads: u64) -> (usize, u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut calm = 0;
        loop {
            let now = (self.fds(), self.threads());
            if now.0 <= fds && now.1 <= threads {
                calm += 1;
                if calm == 5 {
                    return now;
                }
            } else {
                calm = 0;
            }
            if Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: the daemon must exit 0.
    fn terminate(mut self) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid");
        // SAFETY: kill(2) on a child this test spawned and has not reaped; it sends a signal.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let mut child = self.child.take().expect("the daemon runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.success(), "exit status {st}:\n{}", self.log_tail());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// A write and a read-back through `driver`'s queue `q`.
fn serves(driver: &TestDriver, q: usize, seed: u64) {
    let data = pattern(seed, 4096);
    driver
        .submit(q, &Req::write(64 + seed % 64 * 8, &data))
        .assert_ok(0);
    let c = driver.submit(q, &Req::read(64 + seed % 64 * 8, 4096));
    c.assert_ok(4096);
    assert!(c.data == data, "queue {q} read back other data");
}

// ------------------------------------------------------------------------------------------------
// A guest that never drains its used ring.

#[test]
fn a_guest_that_never_drains_its_used_ring_costs_no_memory_or_cpu() {
    never_drained(Serve::start(), "raw", 150_000);
}

/// The same guest against every other layout and cache mode, 16384 requests each (64 times
/// round the ring), every daemon at once.
#[test]
fn every_layout_survives_a_guest_that_never_drains_its_used_ring() {
    let modes: Vec<String> = match std::env::var("DOVETAIL_TEST_CACHE") {
        Ok(m) => vec![m],
        Err(_) => vec!["none".into(), "writeback".into()],
    };
    let default = std::env::var("DOVETAIL_TEST_CACHE").unwrap_or_else(|_| "writeback".into());
    let start = Instant::now();
    let mut runs = Vec::new();
    for cache in &modes {
        for layout in ["raw", "parallax-v1", "parallax-v2", "tee", "tiered"] {
            let the_other_test = layout == "raw" && *cache == default;
            if !the_other_test {
                runs.push((layout, cache.clone()));
            }
        }
    }
    let n = runs.len();
    let threads: Vec<_> = runs
        .into_iter()
        .map(|(layout, cache)| {
            std::thread::spawn(move || {
                let what = format!("{layout}/{cache}");
                never_drained(Serve::start_layout(layout, Some(&cache)), &what, 16_384);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
    }
    println!(
        "limits/never-drained, every layout: runs={n} ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
}

/// 192 copies of one write chain made available at once (more than the worker's 128 slots in
/// flight) on a parallax version served with direct I/O on the default engine: the first copy
/// is mapped onto io_uring and holds its block's stripe, the others go to the pool (the stripe
/// is taken), whose threads wait for that stripe. The worker must go on to submit and reap the
/// ring's write once its slots are full, rather than come back for more chains it has no room
/// for (it once did so forever, and completed none). Every copy completes with status OK and
/// the block reads back as written.
#[test]
fn parallax_with_direct_io_completes_192_copies_of_a_write_chain() {
    for layout in ["parallax-v1", "parallax-v2"] {
        completes_writes_at_once(layout, 512, 4096, 192, false);
    }
}

/// The mechanism alone, from a guest that keeps the rules: 192 distinct sub-block writes
/// (never mapped: the pool takes every one) fill the worker's 128 slots while the ring holds
/// nothing and more chains are available; the pass must wait for the pool's completions then.
#[test]
fn parallax_with_direct_io_completes_192_distinct_pool_writes_at_once() {
    completes_writes_at_once("parallax-v1", 1, 512, 192, true);
}

/// Makes `n` write chains of `len` bytes available at once on a `layout` disk served with
/// direct I/O: `distinct`, each its own descriptors, data and block (`sector` + 8 i); else one
/// chain at `sector` made available `n` times. Every one must complete (used length 1, status
/// OK) within 5 s, the data read back, and the queue serve on.
fn completes_writes_at_once(layout: &str, sector: u64, len: usize, n: u16, distinct: bool) {
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = layouts::open(
        dir.path(),
        layout,
        16 * MIB,
        dovetail_layout::CacheMode::None,
        true,
    );
    let disk = dovetail_backend::Disk::new(opened.layout.clone(), false, common::SERIAL)
        .expect("disk")
        .with_engine(common::test_engine());
    let server = common::TestServer::start(Arc::new(disk), 1);
    let driver = TestDriver::connect_with(
        server.socket(),
        DriverOptions {
            queue_size: 1024,
            ..DriverOptions::new(1, 16 << 20)
        },
    );
    serves(&driver, 0, 1);
    let mut vq = driver.queue(0).expect("queue");
    let (data, room) = vq.data_area();
    let mem = vq.memory().clone();
    let chains = if distinct { n } else { 1 };
    assert!(
        u64::from(chains) * 8192 <= room,
        "room for every chain's buffers"
    );
    let mut expect = Vec::new();
    for i in 0..chains {
        let base = data.0 + u64::from(i) * 8192;
        let (hdr, st, buf) = (base, base + 512, base + 4096);
        let at = sector + 8 * u64::from(i);
        let bytes = pattern(3 + u64::from(i), len);
        mem.write_slice(&header(VIRTIO_BLK_T_OUT, at), GuestAddress(hdr))
            .expect("header");
        mem.write_slice(&bytes, GuestAddress(buf)).expect("data");
        mem.write_slice(&[0xff], GuestAddress(st)).expect("status");
        let d = 3 * i;
        vq.write_desc(d, hdr, 16, VRING_DESC_F_NEXT, d + 1)
            .expect("desc");
        vq.write_desc(d + 1, buf, len as u32, VRING_DESC_F_NEXT, d + 2)
            .expect("desc");
        vq.write_desc(d + 2, st, 1, VRING_DESC_F_WRITE, 0)
            .expect("desc");
        expect.push((at, bytes, st));
    }
    for i in 0..n {
        vq.push(if distinct { 3 * i } else { 0 }).expect("push");
    }
    vq.publish().expect("publish");
    vq.kick().expect("kick");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut done = 0u16;
    while done < n {
        match vq.pop_used().expect("used") {
            Some(u) => {
                assert!(
                    u.id % 3 == 0 && u.id < 3 * u32::from(chains),
                    "{layout}: used id"
                );
                assert_eq!(u.len, 1, "{layout}: used length of chain {}", u.id);
                done += 1;
            }
            None => {
                assert!(
                    Instant::now() < deadline,
                    "{layout}: {done} of {n} completed"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    for (_, _, st) in &expect {
        let status: u8 = mem.read_obj(GuestAddress(*st)).expect("status");
        assert_eq!(status, 0, "{layout}: a write's status");
    }
    drop(vq);
    for (at, bytes, _) in &expect {
        let c = driver.submit(0, &Req::read(*at, len as u32));
        c.assert_ok(len as u32);
        assert!(
            c.data == *bytes,
            "{layout}: sector {at} reads back as written"
        );
    }
    serves(&driver, 0, 2);
    drop(driver);
    server.stop().expect("serve returns Ok");
}

/// A guest that resubmits one write chain `requests` times without ever draining its used
/// ring, then breaks its avail index: the daemon serving `what` keeps its memory, descriptors,
/// threads and idle CPU, and its queues serve again once reset.
fn never_drained(mut serve: Serve, what: &str, requests: u64) {
    const QSIZE: u16 = 256;
    let driver = TestDriver::connect_with(
        &serve.vd(),
        DriverOptions {
            queue_size: QSIZE,
            ..DriverOptions::new(2, 16 << 20)
        },
    );
    serves(&driver, 0, 1);
    serves(&driver, 1, 2);
    let (rss0, fds0, thr0) = (serve.rss_kib(), serve.steady_fds(), serve.threads());
    let cpu_start = serve.cpu_ms();

    // One write chain at descriptors 0..3, made available again and again: the driver never
    // looks at the used ring, so its avail index runs ever further ahead of what it consumed.
    let mut vq = driver.queue(0).expect("queue");
    let (data, _) = vq.data_area();
    let mem = vq.memory().clone();
    let (hdr, buf, st) = (data.0, data.0 + 4096, data.0 + 8192);
    use vm_memory::{Bytes, GuestAddress};
    mem.write_slice(&header(VIRTIO_BLK_T_OUT, 512), GuestAddress(hdr))
        .expect("header");
    mem.write_slice(&pattern(3, 4096), GuestAddress(buf))
        .expect("data");
    vq.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
        .expect("desc");
    vq.write_desc(1, buf, 4096, VRING_DESC_F_NEXT, 2)
        .expect("desc");
    vq.write_desc(2, st, 1, VRING_DESC_F_WRITE, 0)
        .expect("desc");
    let used_start = vq.device_used_idx().expect("used");
    let mut pushed = 0u64;
    let start = Instant::now();
    while pushed < requests {
        // A whole ring's worth at once (the most a driver may have outstanding), then wait for
        // the device to have taken them, without consuming anything.
        for _ in 0..QSIZE {
            vq.push(0).expect("push");
        }
        vq.publish().expect("publish");
        vq.kick().expect("kick");
        pushed += u64::from(QSIZE);
        let target = used_start.wrapping_add(pushed as u16);
        let deadline = Instant::now() + Duration::from_secs(10);
        while vq.device_used_idx().expect("used") != target {
            assert!(
                Instant::now() < deadline,
                "{what}: the device stopped completing ({} of {pushed} done):\n{}",
                vq.device_used_idx().expect("used").wrapping_sub(used_start),
                serve.log_tail()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let elapsed = start.elapsed();
    let busy_cpu = serve.cpu_ms() - cpu_start;
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).expect("status"), 0);
    // Still a valid queue: catch the driver up and use it normally.
    vq.skip_used().expect("skip");
    drop(vq);
    serves(&driver, 0, 3);
    serves(&driver, 1, 4);
    let idle_after_flood = serve.idle_cpu_ms(Duration::from_secs(1));
    let (rss1, fds1, thr1) = (serve.rss_kib(), serve.steady_fds(), serve.threads());

    // Then the avail index jumps more than a queue size ahead: the daemon stops that queue
    // without spinning (it used to, with EVENT_IDX), however often it is kicked.
    {
        let vq = driver.queue(0).expect("queue");
        vq.write_avail_idx_raw(vq.next_avail().wrapping_add(QSIZE + 1))
            .expect("avail idx");
        for _ in 0..1000 {
            vq.kick().expect("kick");
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let idle_broken = serve.idle_cpu_ms(Duration::from_secs(1));
    // Checked now: a spinning worker would also hold its queue's lock, so the GET_VRING_BASE
    // below would never be answered.
    assert!(
        idle_broken <= 50,
        "{what}: {idle_broken} ms CPU per s with a broken ring: spinning"
    );
    serves(&driver, 1, 5);
    driver.stop_queue(0);
    driver.restart_queue(0, true);
    serves(&driver, 0, 6);
    let (rss2, fds2) = (serve.rss_kib(), serve.steady_fds());
    serve.assert_alive("after the flood");
    // What was written before, by the flood and the well-formed writes, reads back.
    for (sector, data) in [
        (512, pattern(3, 4096)),
        (64 + 8, pattern(1, 4096)),
        (64 + 16, pattern(2, 4096)),
        (64 + 40, pattern(5, 4096)),
    ] {
        let c = driver.submit(1, &Req::read(sector, 4096));
        c.assert_ok(4096);
        assert!(
            c.data == data,
            "{what}: sector {sector} read back other data"
        );
    }

    println!(
        "limits/never-drained {what}: requests={pushed} in {:.1}s (daemon cpu {busy_cpu} ms) \
         rss_kib {rss0}->{rss1}->{rss2} fds {fds0}->{fds1}->{fds2} threads {thr0}->{thr1} \
         idle_cpu_ms_per_s after_flood={idle_after_flood} broken_ring={idle_broken}",
        elapsed.as_secs_f64()
    );
    assert!(
        rss1 <= rss0 + 8 * 1024 && rss2 <= rss0 + 8 * 1024,
        "{what}: memory grew: {rss0} -> {rss1} -> {rss2} KiB"
    );
    assert_eq!((fds1, fds2), (fds0, fds0), "{what}: descriptors leaked");
    assert_eq!(thr1, thr0, "{what}: threads changed");
    assert!(
        idle_after_flood <= 50,
        "{what}: {idle_after_flood} ms CPU idle after the flood"
    );
    drop(driver);
    serve.terminate();
}

// ------------------------------------------------------------------------------------------------
// Control-socket connections.

/// One control request on a fresh connection: the reply, or `None` if the daemon closed first.
fn control(path: &Path, line: &str) -> Option<Value> {
    let mut s = UnixStream::connect(path).unwrap_or_else(|e| {
        // The daemon's log sits beside its control socket.
        let log = path.with_file_name("serve.log");
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        panic!(
            "connect to the control socket: {e}; the daemon's log ends:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    });
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The daemon may close before an over-long line is all sent; its reply is still there.
    let _ = s.write_all(line.as_bytes());
    let _ = s.write_all(b"\n");
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    r.read_line(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}

/// `status` until it succeeds (a `busy` reply means: retry); returns the attempts it took.
fn status_ok(path: &Path) -> u32 {
    for attempt in 1..=5 {
        let r = control(path, r#"{"cmd":"status"}"#).expect("a reply");
        if r["ok"] == Value::Bool(true) {
            return attempt;
        }
        assert_eq!(r["error"]["code"], "busy", "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("status refused five times");
}

/// Raises this process's open-file limit to `want` (or its hard limit); returns the limit.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `lim` is.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let target = want.min(lim.rlim_max);
    if lim.rlim_cur < target {
        lim.rlim_cur = target;
        // SAFETY: setrlimit reads one rlimit struct; raising the soft limit up to the hard one
        // is always allowed.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

/// What the daemon wrote on a connection so far (non-blocking): the first line's error code,
/// `"closed"` if it closed without a line, or `None` if it still holds the connection silently.
fn outcome(s: &mut UnixStream) -> Option<String> {
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if buf.is_empty() {
                    return None;
                }
                break;
            }
            Err(_) => break,
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
    if line.is_empty() {
        return Some("closed".into());
    }
    let v: Value = serde_json::from_slice(line).expect("a JSON reply line");
    Some(v["error"]["code"].as_str().unwrap_or("ok").to_string())
}

#[test]
fn thousands_of_control_connections_leave_the_daemon_responsive_and_bounded() {
    const N: usize = 5000;
    let limit = raise_nofile(N as u64 + 1000);
    let n = N.min(limit as usize - 200);
    let mut serve = Serve::start();
    let ctl = serve.ctl();
    assert_eq!(status_ok(&ctl), 1);
    // Let the daemon settle after the first connection thread exits.
    std::thread::sleep(Duration::from_millis(100));
    let (fds0, rss0, thr0) = (serve.fds(), serve.rss_kib(), serve.threads());
    let max_conns = dovetail_backend::daemon::control::MAX_CONNECTIONS as usize;

    // 1. n connections opened and left idle (every fifth sends half a request line).
    let mut idle = Vec::with_capacity(n);
    let mut peak_fds = 0;
    let mut peak_threads = 0;
    for i in 0..n {
        let mut s = UnixStream::connect(&ctl).expect("connect");
        if i % 5 == 0 {
            let _ = s.write_all(br#"{"cmd":"sta"#);
        }
        idle.push(s);
        if i % 500 == 499 {
            peak_fds = peak_fds.max(serve.fds());
            peak_threads = peak_threads.max(serve.threads());
        }
    }
    // The daemon still answers a normal command (a busy reply evicts the longest idle
    // connection, so at most one retry is needed).
    let attempts = status_ok(&ctl);
    peak_fds = peak_fds.max(serve.fds());
    peak_threads = peak_threads.max(serve.threads());
    let (mut held, mut busy, mut evicted, mut closed) = (0, 0, 0, 0);
    for s in &mut idle {
        match outcome(s).as_deref() {
            None => held += 1,
            Some("busy") => busy += 1,
            Some("evicted") => evicted += 1,
            Some("closed") => closed += 1,
            Some(other) => panic!("unexpected reply {other} to an idle connection"),
        }
    }
    let rss_idle = serve.rss_kib();
    drop(idle);
    let (fds_after_idle, _) = serve.settle(fds0, thr0);

    // 2. n connections opened and closed at once.
    for _ in 0..n {
        drop(UnixStream::connect(&ctl).expect("connect"));
    }
    let (fds_after_churn, _) = serve.settle(fds0, thr0);
    assert_eq!(status_ok(&ctl), 1, "after open/close churn");

    // 3. Garbage lines (each answered with bad-json), over-long lines (too-long, closed),
    // half lines left hanging then closed.
    let mut bad_json = 0;
    for i in 0..n / 2 {
        let r = control(&ctl, &format!("garbage {i} \u{1}\u{7f}")).expect("a reply");
        assert_eq!(r["error"]["code"], "bad-json", "{r}");
        bad_json += 1;
    }
    let huge = "x".repeat(dovetail_backend::daemon::control::MAX_LINE + 100);
    let mut too_long = 0;
    for _ in 0..200 {
        let r = control(&ctl, &huge).expect("a reply");
        assert_eq!(r["error"]["code"], "too-long", "{r}");
        too_long += 1;
    }
    let half: Vec<UnixStream> = (0..n / 5)
        .map(|_| {
            let mut s = UnixStream::connect(&ctl).expect("connect");
            let _ = s.write_all(br#"{"cmd": "status", "disk": "#);
            s
        })
        .collect();
    let attempts_half = status_ok(&ctl);
    drop(half);
    let (fds_end, thr_end) = serve.settle(fds0, thr0);
    let rss_end = serve.rss_kib();
    assert_eq!(status_ok(&ctl), 1, "at the end");
    serve.assert_alive("after the control floods");

    println!(
        "limits/control: connections idle={n} (held={held} busy={busy} evicted={evicted} \
         closed={closed}, status after {attempts} attempt(s)) open+close={n} garbage={bad_json} \
         too_long={too_long} half_lines={} (status after {attempts_half}) \
         fds {fds0}->peak {peak_fds}->{fds_after_idle}/{fds_after_churn}/{fds_end} \
         threads {thr0}->peak {peak_threads}->{thr_end} rss_kib {rss0}->{rss_idle}->{rss_end}",
        n / 5
    );
    assert!(
        held <= max_conns,
        "{held} idle connections held, more than {max_conns}"
    );
    assert_eq!(held + busy + evicted + closed, n);
    assert!(attempts <= 2, "status needed {attempts} attempts");
    assert!(attempts_half <= 2, "status needed {attempts_half} attempts");
    // Each connection holds two descriptors (the socket and its reader's clone); evicted ones
    // are on their way out.
    assert!(
        peak_fds <= fds0 + 4 * max_conns + 16,
        "descriptors peaked at {peak_fds} (baseline {fds0})"
    );
    assert!(
        peak_threads <= thr0 + 2 * max_conns as u64 + 4,
        "threads peaked at {peak_threads} (baseline {thr0})"
    );
    assert_eq!(
        (fds_after_idle, fds_after_churn, fds_end),
        (fds0, fds0, fds0),
        "descriptors not back to the baseline after clients closed"
    );
    assert_eq!(thr_end, thr0, "connection threads left behind");
    assert!(
        rss_end <= rss0 + 16 * 1024,
        "memory grew from {rss0} to {rss_end} KiB"
    );
    serve.terminate();
}

// ------------------------------------------------------------------------------------------------
// File descriptors attached to vhost-user messages.

/// Sends `bytes` on `sock` with `fds` attached (SCM_RIGHTS).
fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `cbuf` is 8-byte aligned and `space` bytes long, enough for one control message
    // with `fds.len()` descriptors; CMSG_FIRSTHDR points into it, CMSG_DATA has room for them.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null());
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
    }
    // SAFETY: `msg` points at live buffers (iov, control) for the duration of the call.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A vhost-user message: request, flags (version 1), size, then the payload.
fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Reads until the daemon closes the connection; false if it is still open after 5 s.
fn wait_closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn file_descriptors_attached_to_vhost_user_messages_are_closed() {
    const ROUNDS: usize = 60;
    let mut serve = Serve::start();
    // Warm up: one normal guest comes and goes.
    {
        let d = TestDriver::connect(&serve.vd(), 2, 4 << 20);
        serves(&d, 0, 1);
    }
    std::thread::sleep(Duration::from_millis(200));
    let (fds0, rss0, thr0) = (serve.fds(), serve.rss_kib(), serve.threads());

    // Descriptors to attach: eventfds of this process (the daemon gets its own copies).
    let events: Vec<vmm_sys_util::eventfd::EventFd> = (0..40)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let fds: Vec<RawFd> = events.iter().map(|e| e.as_raw_fd()).collect();
    // SET_MEM_TABLE with one region described but eight descriptors.
    let mut mem_table = Vec::new();
    mem_table.extend_from_slice(&1u32.to_le_bytes());
    mem_table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0x10_0000u64, MIB, 0x7f00_0000_0000, 0] {
        mem_table.extend_from_slice(&v.to_le_bytes());
    }
    // More than vhost's 32 descriptors per message: vmm-sys-util closes them all and reports
    // a retryable error, so vhost drops the message's bytes and reads on; the connection lives
    // (checked below: the next message is answered).
    let mut over = UnixStream::connect(serve.vd()).expect("connect");
    over.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    over.write_all(&message(3, &[])).expect("SET_OWNER");
    send_with_fds(&over, &message(1, &[]), &fds[..40]).expect("sendmsg");
    over.write_all(&message(1, &[])).expect("GET_FEATURES");
    let mut reply = [0u8; 20];
    over.read_exact(&mut reply)
        .expect("GET_FEATURES answered after a message with 40 fds");
    assert_eq!(
        u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]),
        1
    );
    // Exactly one reply: the message that carried 40 descriptors was dropped unanswered.
    over.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    match over.read(&mut reply) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a second reply after the 40-descriptor message: {other:?}"),
    }
    drop(over);
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("GET_FEATURES + 8 fds", message(1, &[]), 8),
        ("GET_FEATURES + 32 fds", message(1, &[]), 32),
        ("GET_QUEUE_NUM + 8 fds", message(17, &[]), 8),
        ("GET_CONFIG + 8 fds", message(24, &[0u8; 12 + 8]), 8),
        (
            "SET_VRING_CALL + 8 fds",
            message(13, &0u64.to_le_bytes()),
            8,
        ),
        (
            "SET_VRING_KICK + 2 fds",
            message(12, &0u64.to_le_bytes()),
            2,
        ),
        ("SET_MEM_TABLE, 1 region + 8 fds", message(5, &mem_table), 8),
    ];
    let mut sent_msgs = 1;
    let mut sent_fds = 40;
    let mut peak = 0;
    for round in 0..ROUNDS {
        for (name, bytes, nfds) in &cases {
            let mut s = UnixStream::connect(serve.vd()).expect("connect");
            // SET_OWNER first, as a frontend does.
            s.write_all(&message(3, &[])).expect("SET_OWNER");
            send_with_fds(&s, bytes, &fds[..*nfds]).expect("sendmsg");
            sent_msgs += 1;
            sent_fds += nfds;
            assert!(
                wait_closed(&mut s),
                "{name}: the daemon kept the connection"
            );
            if round % 10 == 0 {
                peak = peak.max(serve.fds());
            }
        }
    }
    let fds1 = serve.settle_fds(fds0);
    // A well-formed guest is still served.
    let d = TestDriver::connect(&serve.vd(), 2, 4 << 20);
    serves(&d, 0, 2);
    serves(&d, 1, 3);
    drop(d);
    let fds2 = serve.settle_fds(fds0);
    let (rss1, thr1) = (serve.rss_kib(), serve.threads());
    serve.assert_alive("after the messages");
    println!(
        "limits/scm-rights: messages={sent_msgs} fds_attached={sent_fds} daemon_fds \
         {fds0}->peak {peak}->{fds1}->{fds2} threads {thr0}->{thr1} rss_kib {rss0}->{rss1}"
    );
    assert_eq!((fds1, fds2), (fds0, fds0), "attached descriptors leaked");
    assert!(
        peak <= fds0 + 64,
        "descriptors peaked at {peak} (baseline {fds0})"
    );
    assert_eq!(thr1, thr0, "threads left behind");
    assert!(
        rss1 <= rss0 + 8 * 1024,
        "memory grew from {rss0} to {rss1} KiB"
    );
    serve.terminate();
}
