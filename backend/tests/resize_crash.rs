//! kill -9 at each step of a live `ctl resize`: the real `dovetail serve` binary, built with its
//! crash points (`--features dovetail-backend/failpoints`), serves a disk holding flushed data,
//! one crash point armed; `ctl resize` reaches the point and the daemon dies there (SIGKILL, by
//! itself): in the catalog's commit of the new size (`store-commit-unsynced`,
//! `store-commit-synced`), right after it (`resize-committed`), as the pause begins (`swap`)
//! and in the grow's commit (`parallax-commit-*`: nodes and pages written, synced, root
//! record committed). Then `dovetail store check --data` finds the store consistent, and a
//! daemon restarted with `--store DIR` alone serves the disk at either its old or its new size,
//! the size the catalog names, with every flushed write read back and, when grown, zeroes past
//! the old end, which takes writes. At the points a guest's own FLUSH cannot reach first
//! (`resize-committed`, `swap`), a guest writes and flushes block after block while the resize
//! runs, and every write a FLUSH acknowledged reads back after the restart.

#![cfg(feature = "failpoints")]

mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dovetail_bench::driver::Driver;

use cli::store_daemon::{ctl, killed_at_crash_point, log};
use cli::{ok, path, store_create};
use common::{pattern, Req, TestDriver};

const MIB: u64 = 1 << 20;
const OLD: u64 = 8 * MIB;
const NEW: u64 = 16 * MIB;
/// Flushed data at the disk's start and in its last 64 KiB before the grow.
const HEAD: u64 = 0;
const TAIL: u64 = (OLD - 64 * 1024) / 512;

/// A daemon this test started, killed if the test fails before it stops it.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        // A child already waited for is not signalled again (std keeps its status).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Serving {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Serving {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

fn start(dir: &Path, failpoints: Option<&str>) -> Serving {
    Serving(cli::store_daemon::start(dir, failpoints, &[sock(dir)]))
}

fn terminate(mut child: Serving) {
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().expect("wait");
    assert!(st.success(), "serve exits 0 on SIGTERM ({st})");
}

fn sock(dir: &Path) -> PathBuf {
    dir.join("d.sock")
}

fn store_check(dir: &Path, context: &str) {
    let report = ok(&["store", "check", path(&dir.join("st")), "--data"]);
    assert!(
        report.contains("result: consistent"),
        "{context}: {report}\n{}",
        log(dir)
    );
}

/// A store with disk `d` of `layout` attached, holding flushed data at its start and end.
fn setup(dir: &Path, layout: &str) -> (Vec<u8>, Vec<u8>) {
    let st = dir.join("st");
    store_create(&st);
    ok(&[
        "disk",
        "create",
        path(&st),
        "d",
        "--size",
        "8M",
        "--layout",
        layout,
    ]);
    // `attach` commits the attachment: every later start serves `d` on its socket.
    let _ = std::fs::remove_file(dir.join("ctl.sock"));
    let mut child = Serving(
        Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(["serve", "--store", path(&st)])
            .args(["--control", path(&dir.join("ctl.sock"))])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("ctl.sock").exists() {
        assert!(child.try_wait().expect("try_wait").is_none(), "serve died");
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = ctl(dir, &["attach", "d", "--socket", path(&sock(dir))]);
    assert!(out.status.success(), "attach: {out:?}");
    let head = pattern(31, 64 * 1024);
    let tail = pattern(32, 64 * 1024);
    {
        let driver = TestDriver::connect(&sock(dir), 1, 4 << 20);
        driver.submit(0, &Req::write(HEAD, &head)).assert_ok(0);
        driver.submit(0, &Req::write(TAIL, &tail)).assert_ok(0);
        driver.submit(0, &Req::flush()).assert_ok(0);
    }
    terminate(child);
    (head, tail)
}

fn read(driver: &TestDriver, sector: u64, len: usize) -> Vec<u8> {
    let c = driver.submit(0, &Req::read(sector, len as u32));
    c.assert_ok(len as u32);
    c.data
}

/// Restarts the daemon and checks the disk: old or new size, the catalog's, data intact.
/// Returns whether it was grown.
fn restart_and_check(
    dir: &Path,
    head: &[u8],
    tail: &[u8],
    busy: Option<&Written>,
    context: &str,
) -> bool {
    let catalog = dovetail_store::Store::open_reader(&dir.join("st"))
        .expect("open the store")
        .disk("d")
        .expect("disk d")
        .size;
    assert!(
        catalog == OLD || catalog == NEW,
        "{context}: the catalog says {catalog} bytes"
    );
    let child = start(dir, None);
    let driver = TestDriver::connect(&sock(dir), 1, 4 << 20);
    let served = driver.blk_config().capacity * 512;
    assert_eq!(served, catalog, "{context}: served at the catalog's size");
    assert!(read(&driver, HEAD, head.len()) == head, "{context}: head");
    assert!(read(&driver, TAIL, tail.len()) == tail, "{context}: tail");
    if let Some(w) = busy {
        check_busy(&driver, w, context);
    }
    if served == NEW {
        let past = OLD / 512;
        assert!(
            read(&driver, past, 64 * 1024).iter().all(|&b| b == 0),
            "{context}: the new blocks read as zeroes"
        );
        let last = (NEW - 4096) / 512;
        let data = pattern(33, 4096);
        driver.submit(0, &Req::write(last, &data)).assert_ok(0);
        driver.submit(0, &Req::flush()).assert_ok(0);
        assert!(read(&driver, last, 4096) == data, "{context}: the new end");
    }
    drop(driver);
    terminate(child);
    store_check(dir, &format!("{context}, after the restart"));
    served == NEW
}

/// The points a live resize passes, in order; `parallax-commit-*` are the grow's commit (the
/// flush before it has nothing to commit: the data was flushed before the daemon started, and
/// no guest writes at these points).
const POINTS: &[&str] = &[
    "store-commit-unsynced",
    "store-commit-synced",
    "resize-committed",
    "swap",
    "parallax-commit-unsynced",
    "parallax-commit-synced",
    "parallax-commit-done",
];

/// Where the guest writes while the resize runs: 16 blocks of 4 KiB from 1 MiB on.
const BUSY: u64 = MIB / 512;
const BUSY_BLOCKS: u64 = 16;

/// What the busy guest did: per block, the seed of its last write a FLUSH acknowledged, and
/// the write sent after the last acknowledged FLUSH (it may or may not have reached the disk).
#[derive(Debug, Default)]
struct Written {
    flushed: Vec<Option<u64>>,
    pending: Option<(u64, u64)>,
    flushes: u64,
}

/// A guest writing one block after another, each followed by a FLUSH, until the daemon dies.
fn busy_guest(dir: &Path) -> (Arc<Mutex<Written>>, JoinHandle<()>) {
    let driver = TestDriver::connect(&sock(dir), 1, 4 << 20);
    let written = Arc::new(Mutex::new(Written {
        flushed: vec![None; BUSY_BLOCKS as usize],
        ..Written::default()
    }));
    let w = written.clone();
    let t = std::thread::spawn(move || {
        for n in 0u64.. {
            let block = n % BUSY_BLOCKS;
            let seed = 1000 + n;
            let sector = BUSY + block * 8;
            w.lock().expect("lock").pending = Some((block, seed));
            let done = Driver::submit(&driver, 0, &Req::write(sector, &pattern(seed, 4096)))
                .and_then(|c| {
                    c.assert_ok(0);
                    Driver::submit(&driver, 0, &Req::flush())
                });
            match done {
                Ok(c) => {
                    c.assert_ok(0);
                    let mut w = w.lock().expect("lock");
                    w.flushed[block as usize] = Some(seed);
                    w.pending = None;
                    w.flushes += 1;
                }
                // The daemon died: what was sent last stays pending.
                Err(_) => return,
            }
        }
    });
    (written, t)
}

/// Every block the busy guest wrote holds its last flushed write, or the one pending.
fn check_busy(driver: &TestDriver, w: &Written, context: &str) {
    for (block, flushed) in w.flushed.iter().enumerate() {
        let got = read(driver, BUSY + block as u64 * 8, 4096);
        let mut allowed: Vec<Vec<u8>> = Vec::new();
        match flushed {
            Some(seed) => allowed.push(pattern(*seed, 4096)),
            None => allowed.push(vec![0; 4096]),
        }
        if let Some((b, seed)) = w.pending {
            if b == block as u64 {
                allowed.push(pattern(seed, 4096));
            }
        }
        assert!(
            allowed.contains(&got),
            "{context}: block {block} of the busy guest lost its flushed write ({flushed:?})"
        );
    }
}

fn sigkill_at_each_step_of_a_live_resize(layout: &str) {
    let mut grown = Vec::new();
    for point in POINTS {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        let context = format!("{layout}: resize killed at {point}");
        let (head, tail) = setup(dir, layout);
        let mut child = start(dir, Some(&format!("{point}=return")));
        // A guest writes and flushes while the resize runs, but for the points its own
        // FLUSHes would reach first.
        let busy = (!point.starts_with("parallax-") && !point.starts_with("store-"))
            .then(|| busy_guest(dir));
        if let Some((w, _)) = &busy {
            let deadline = Instant::now() + Duration::from_secs(10);
            while w.lock().expect("lock").flushes < 20 {
                assert!(Instant::now() < deadline, "{context}: the guest's FLUSHes");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let out = ctl(dir, &["resize", "d", "16M"]);
        killed_at_crash_point(dir, &mut child, &out, &context);
        assert!(!out.status.success(), "{context}: no reply after the crash");
        let busy = busy.map(|(w, t)| {
            t.join().expect("the busy guest");
            let w = std::mem::take(&mut *w.lock().expect("lock"));
            assert!(w.flushes >= 20, "{context}: the guest flushed");
            w
        });
        store_check(dir, &format!("{context}, after the crash"));
        if restart_and_check(dir, &head, &tail, busy.as_ref(), &context) {
            grown.push(*point);
        }
    }
    // Past the catalog's synced commit the grow is decided: the next open finishes it.
    for p in &POINTS[1..] {
        assert!(
            grown.contains(p),
            "{layout}: killed at {p}, the disk is grown"
        );
    }
}

#[test]
fn sigkill_at_each_step_of_a_live_resize_of_a_parallax_v1_disk() {
    sigkill_at_each_step_of_a_live_resize("parallax-v1");
}

#[test]
fn sigkill_at_each_step_of_a_live_resize_of_a_parallax_v2_disk() {
    sigkill_at_each_step_of_a_live_resize("parallax-v2");
}
