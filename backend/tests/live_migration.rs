//! A VM's disk following it between two daemons on one store directory (`serve
//! --shared-store`), the real binaries, a frontend in process standing in for each QEMU: the
//! source's guest writes (some of it not flushed); the destination (`serve --incoming a`) serves
//! the socket at once and its guest connects, but its first request waits for the disk; the
//! source starts dirty logging, writes more, and stops its queue as QEMU does at the end of a
//! migration: the source daemon flushes and releases the disk, the destination takes it,
//! reopened from the last commit, and serves every write; then it writes and reads its own.

mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{ok, path, store_create};
use common::{pattern, Req, TestDriver};

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait_for(p: &Path, d: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("the daemon exited ({st}):\n{}", d.log());
        }
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(dir: &Path, name: &str, extra: &[&str]) -> Daemon {
    let log = dir.join(format!("{name}.log"));
    let sock = dir.join(format!("{name}-a.sock"));
    let child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["serve", "--store", path(&dir.join("st")), "--shared-store"])
        .args(extra)
        .arg("--disk")
        .arg(format!("a={}", path(&sock)))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let mut d = Daemon { child, log };
    wait_for(&sock, &mut d);
    d
}

/// The pid the disk's lease record names (its owner renews it every second).
fn lease_pid(st: &Path) -> u64 {
    let b = std::fs::read(st.join("owners/a.lease")).unwrap_or_default();
    b.get(16..24)
        .map_or(0, |p| u64::from_le_bytes(p.try_into().expect("8 bytes")))
}

#[test]
fn a_disk_follows_its_vm_to_another_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);

    // `--incoming` needs a shared store, and a disk it serves.
    let refused = cli::dovetail(&["serve", "--store", path(&st), "--incoming", "a"]);
    assert!(!refused.status.success());

    let one = start(d, "one", &[]);
    let stray = cli::dovetail(&[
        "serve",
        "--store",
        path(&st),
        "--shared-store",
        "--incoming",
        "b",
        "--disk",
        &format!("a={}", path(&d.join("x.sock"))),
    ]);
    assert!(!stray.status.success());
    let err = String::from_utf8_lossy(&stray.stderr);
    assert!(err.contains("--incoming b"), "{err}");
    // The destination serves a's socket though one owns a.
    let two = start(d, "two", &["--incoming", "a"]);
    assert_eq!(lease_pid(&st), u64::from(one.child.id()));

    let src = TestDriver::connect(&d.join("one-a.sock"), 1, 4 << 20);
    let flushed = pattern(1, 128 << 10);
    src.submit(0, &Req::write(64, &flushed)).assert_ok(0);
    src.submit(0, &Req::flush()).assert_ok(0);
    // Acknowledged, not flushed by the guest: the source's flush at the switch makes it durable.
    let unflushed = pattern(2, 64 << 10);
    src.submit(0, &Req::write(4096, &unflushed)).assert_ok(0);

    // QEMU -incoming connects at once; its first request waits until the disk is handed over.
    let dst = TestDriver::connect(&d.join("two-a.sock"), 1, 4 << 20);
    let reader = std::thread::spawn(move || {
        let c = dst.submit(0, &Req::read(64, 128 << 10));
        (dst, c, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !reader.is_finished(),
        "the destination served before the source let go"
    );

    // Migration: dirty logging on, one more write (its pages marked), then the VM stops.
    let log = src.start_dirty_log().expect("dirty log");
    let during = pattern(3, 32 << 10);
    src.submit(0, &Req::write(8192, &during)).assert_ok(0);
    let stopped = Instant::now();
    src.stop_queue(0);
    let (dst, first, served) = reader.join().expect("reader");
    first.assert_ok(128 << 10);
    assert!(
        first.data == flushed,
        "the flushed write is missing on the destination"
    );
    eprintln!(
        "store directory: from the source's queue stop to the destination's first read served: {:?}",
        served.saturating_duration_since(stopped)
    );
    drop(log);

    let c = dst.submit(0, &Req::read(4096, 64 << 10));
    c.assert_ok(64 << 10);
    assert!(
        c.data == unflushed,
        "an acknowledged write not flushed by the guest is missing"
    );
    let c = dst.submit(0, &Req::read(8192, 32 << 10));
    c.assert_ok(32 << 10);
    assert!(
        c.data == during,
        "the write made during the migration is missing"
    );
    let after = pattern(4, 64 << 10);
    dst.submit(0, &Req::write(12288, &after)).assert_ok(0);
    dst.submit(0, &Req::flush()).assert_ok(0);
    let c = dst.submit(0, &Req::read(12288, 64 << 10));
    c.assert_ok(64 << 10);
    assert!(c.data == after);

    // Daemon two owns a now: it renews a's lease; one said it let a go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_pid(&st) != u64::from(two.child.id()) {
        assert!(
            Instant::now() < deadline,
            "daemon two never renewed a's lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(one.log().contains("released"), "{}", one.log());
    assert!(
        two.log().contains("taken over as its guest started"),
        "{}",
        two.log()
    );
    drop(src);
    drop(dst);

    // What two wrote is in the store: stopped, the store reads it back offline.
    drop(two);
    drop(one);
    let out = d.join("a.img");
    ok(&["disk", "export", path(&st), "a", "--to", path(&out)]);
    let img = std::fs::read(&out).expect("export");
    let at = |s: usize, n: usize| &img[s * 512..s * 512 + n];
    assert!(at(64, 128 << 10) == flushed.as_slice());
    assert!(at(4096, 64 << 10) == unflushed.as_slice());
    assert!(at(8192, 32 << 10) == during.as_slice());
    assert!(at(12288, 64 << 10) == after.as_slice());
}

/// A migration that fails after the source let the disk go (the destination QEMU died before
/// the VM resumed there): QEMU starts the source's queues again, and the source daemon takes
/// the disk back, reopened from its last commit, with every write there; the destination,
/// whose guest never started, never owned it.
#[test]
fn a_failed_migration_gives_the_disk_back_to_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);
    let one = start(d, "one", &[]);
    let two = start(d, "two", &["--incoming", "a"]);

    let src = TestDriver::connect_with(
        &d.join("one-a.sock"),
        common::DriverOptions {
            timeout: Duration::from_secs(20),
            ..common::DriverOptions::new(1, 4 << 20)
        },
    );
    let data = pattern(5, 64 << 10);
    src.submit(0, &Req::write(256, &data)).assert_ok(0);
    {
        // The destination QEMU connects, then dies before the VM resumes there.
        let _dst = TestDriver::connect(&d.join("two-a.sock"), 1, 4 << 20);
    }
    let _log = src.start_dirty_log().expect("dirty log");
    src.stop_queue(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !one.log().contains("released") {
        assert!(
            Instant::now() < deadline,
            "one never released a:\n{}",
            one.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // QEMU resumes the VM on the source: logging off, the queue started again.
    src.stop_dirty_log().expect("stop the log");
    src.restart_queue(0, false);
    let c = match dovetail_bench::driver::Driver::submit(&src, 0, &Req::read(256, 64 << 10)) {
        Ok(c) => c,
        Err(e) => panic!("{e}\nONE:\n{}\nTWO:\n{}", one.log(), two.log()),
    };
    if c.status != Some(0) {
        panic!("IOERR\nONE:\n{}\nTWO:\n{}", one.log(), two.log());
    }
    c.assert_ok(64 << 10);
    assert!(
        c.data == data,
        "the source lost a write across the failed migration"
    );
    let more = pattern(6, 32 << 10);
    src.submit(0, &Req::write(1024, &more)).assert_ok(0);
    src.submit(0, &Req::flush()).assert_ok(0);
    assert!(
        one.log().contains("taken over as its guest started"),
        "{}",
        one.log()
    );
    assert!(!two.log().contains("acquired disk a"), "{}", two.log());
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_pid(&st) != u64::from(one.child.id()) {
        assert!(
            Instant::now() < deadline,
            "daemon one does not renew a's lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(src);
    drop(two);
    drop(one);
    let out = d.join("a.img");
    ok(&["disk", "export", path(&st), "a", "--to", path(&out)]);
    let img = std::fs::read(&out).expect("export");
    assert!(&img[256 * 512..256 * 512 + (64 << 10)] == data.as_slice());
    assert!(&img[1024 * 512..1024 * 512 + (32 << 10)] == more.as_slice());
}

/// A daemon serving `disks` (each on `NAME-DISK.sock`) with a control socket `NAME-ctl.sock`.
fn start_disks(dir: &Path, name: &str, disks: &[&str], extra: &[&str]) -> Daemon {
    let log = dir.join(format!("{name}.log"));
    let ctl = dir.join(format!("{name}-ctl.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
    cmd.args(["serve", "--store", path(&dir.join("st")), "--shared-store"])
        .args(extra)
        .args(["--control", path(&ctl)]);
    for disk in disks {
        cmd.arg("--disk").arg(format!(
            "{disk}={}",
            path(&dir.join(format!("{name}-{disk}.sock")))
        ));
    }
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let mut d = Daemon { child, log };
    for disk in disks {
        wait_for(&dir.join(format!("{name}-{disk}.sock")), &mut d);
    }
    wait_for(&ctl, &mut d);
    d
}

/// While the destination's first request waits for the source to let the disk go, nothing
/// else of that guest's device waits with it: another queue is stopped and set up again at
/// once (QEMU's GET_VRING_BASE), and once the disk is handed over both queues serve it.
#[test]
fn waiting_for_the_disk_blocks_no_other_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);
    let _one = start_disks(d, "one", &["a"], &[]);
    let _two = start_disks(d, "two", &["a"], &["--incoming", "a", "--queues", "2"]);

    let src = TestDriver::connect(&d.join("one-a.sock"), 1, 4 << 20);
    let data = pattern(7, 64 << 10);
    src.submit(0, &Req::write(128, &data)).assert_ok(0);
    let dst = TestDriver::connect(&d.join("two-a.sock"), 2, 4 << 20);
    std::thread::scope(|s| {
        let reader = s.spawn(|| dst.submit(0, &Req::read(128, 64 << 10)));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!reader.is_finished(), "served before the source let go");
        // Queue 1 stops and starts again while queue 0 waits for the disk.
        let t = Instant::now();
        dst.stop_queue(1);
        dst.restart_queue(1, false);
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "stopping another queue waited {took:?} for the disk"
        );
        assert!(!reader.is_finished(), "served before the source let go");
        let _log = src.start_dirty_log().expect("dirty log");
        src.stop_queue(0);
        let c = reader.join().expect("reader");
        c.assert_ok(64 << 10);
        assert!(c.data == data, "the source's write is missing");
    });
    let c = dst.submit(1, &Req::read(128, 64 << 10));
    c.assert_ok(64 << 10);
    assert!(c.data == data, "queue 1 reads another disk's bytes");
}

/// The source never lets the disk go: after `--incoming-timeout` the destination's requests
/// fail with IOERR, the event `disk-acquire-failed` says why, and the daemon's other disk
/// serves on; the source keeps the disk and every write.
#[test]
fn an_incoming_disk_never_released_fails_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);
    ok(&["disk", "create", path(&st), "b", "--size", "16M"]);
    let bad = cli::dovetail(&[
        "serve",
        "--store",
        path(&st),
        "--shared-store",
        "--incoming-timeout",
        "10ms",
        "--disk",
        &format!("a={}", path(&d.join("x.sock"))),
    ]);
    assert!(!bad.status.success());
    let one = start_disks(d, "one", &["a"], &[]);
    let two = start_disks(
        d,
        "two",
        &["a", "b"],
        &["--incoming", "a", "--incoming-timeout", "500ms"],
    );
    let src = TestDriver::connect(&d.join("one-a.sock"), 1, 4 << 20);
    let data = pattern(8, 32 << 10);
    src.submit(0, &Req::write(64, &data)).assert_ok(0);

    let dst = TestDriver::connect(&d.join("two-a.sock"), 1, 4 << 20);
    let t = Instant::now();
    let c = dst.submit(0, &Req::read(64, 32 << 10));
    let took = t.elapsed();
    assert_eq!(c.status, Some(1), "not IOERR after the timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "answered after {took:?} with a 500 ms timeout"
    );
    // Every later request of this guest fails the same way, at once.
    let c = dst.submit(0, &Req::read(0, 4096));
    assert_eq!(c.status, Some(1));
    let ctl = d.join("two-ctl.sock");
    let events = ok(&["ctl", "--control", path(&ctl), "events"]);
    assert!(events.contains("disk-acquire-failed"), "{events}");

    // b, served by the same daemon, serves on.
    let other = TestDriver::connect(&d.join("two-b.sock"), 1, 4 << 20);
    let more = pattern(9, 16 << 10);
    other.submit(0, &Req::write(0, &more)).assert_ok(0);
    let c = other.submit(0, &Req::read(0, 16 << 10));
    c.assert_ok(16 << 10);
    assert!(c.data == more);
    // The source still owns a and serves it.
    let c = src.submit(0, &Req::read(64, 32 << 10));
    c.assert_ok(32 << 10);
    assert!(c.data == data);
    assert_eq!(lease_pid(&st), u64::from(one.child.id()));
    assert!(two.log().contains("could not be taken"), "{}", two.log());
}

/// `ctl attach DISK --socket PATH --incoming` on a running daemon: the socket is served at
/// once, the disk stays its owner's (not taken, its record unchanged) until a guest starts its
/// queues here; detached before that, nothing of the owner's changes; attached again, the
/// migration hands the disk over as with `serve --incoming`. Refused on a store not shared.
#[test]
fn ctl_attach_incoming_serves_before_the_disk_is_owned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);
    ok(&["disk", "create", path(&st), "b", "--size", "16M"]);
    let one = start_disks(d, "one", &["a"], &[]);
    let two = start_disks(d, "two", &["b"], &[]);
    let ctl = d.join("two-ctl.sock");
    let sock = d.join("two-a.sock");
    let attach = [
        "ctl",
        "--control",
        path(&ctl),
        "attach",
        "a",
        "--socket",
        path(&sock),
        "--incoming",
    ];
    // Without --incoming, one's disk cannot be attached here.
    let refused = cli::dovetail(&attach[..attach.len() - 1]);
    assert!(!refused.status.success());
    let out = ok(&attach);
    assert!(out.contains("not recorded in the catalog"), "{out}");
    assert!(sock.exists());
    assert_eq!(lease_pid(&st), u64::from(one.child.id()));
    // Detached before any guest started: one's disk and record are untouched.
    ok(&["ctl", "--control", path(&ctl), "detach", "a"]);
    assert!(!sock.exists());
    assert_eq!(lease_pid(&st), u64::from(one.child.id()));
    let out = ok(&attach);
    assert!(out.contains("incoming"), "{out}");

    let src = TestDriver::connect(&d.join("one-a.sock"), 1, 4 << 20);
    let data = pattern(10, 64 << 10);
    src.submit(0, &Req::write(512, &data)).assert_ok(0);
    let dst = TestDriver::connect(&sock, 1, 4 << 20);
    let reader = std::thread::spawn(move || {
        let c = dst.submit(0, &Req::read(512, 64 << 10));
        (dst, c)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!reader.is_finished(), "served before the source let go");
    assert_eq!(lease_pid(&st), u64::from(one.child.id()));
    let _log = src.start_dirty_log().expect("dirty log");
    src.stop_queue(0);
    let (dst, c) = reader.join().expect("reader");
    c.assert_ok(64 << 10);
    assert!(c.data == data, "the source's write is missing");
    let more = pattern(11, 16 << 10);
    dst.submit(0, &Req::write(0, &more)).assert_ok(0);
    dst.submit(0, &Req::flush()).assert_ok(0);
    let events = ok(&["ctl", "--control", path(&ctl), "events"]);
    assert!(events.contains("disk-acquired"), "{events}");
    assert!(two.log().contains("taken over as its guest started"));

    // A daemon whose store is not shared refuses --incoming, and records nothing.
    drop(dst);
    drop(src);
    drop(two);
    drop(one);
    let log = d.join("three.log");
    let ctl3 = d.join("three-ctl.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["serve", "--store", path(&st), "--control", path(&ctl3)])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let mut three = Daemon { child, log };
    wait_for(&ctl3, &mut three);
    let sock3 = d.join("three-a.sock");
    let refused = cli::dovetail(&[
        "ctl",
        "--control",
        path(&ctl3),
        "attach",
        "a",
        "--socket",
        path(&sock3),
        "--incoming",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("shared"), "{err}");
    assert!(!sock3.exists());
}
