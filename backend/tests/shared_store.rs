//! Two daemons on one store directory (`serve --shared-store`), the real binaries: each disk is
//! served by one of them; the other reports it as failed, naming the owner, and refuses to take
//! it over while the owner runs; after the owner is killed with SIGKILL, `ctl takeover` serves
//! the disk on the other daemon with every flushed write there, and the time from the kill to
//! the first read served is printed (BENCHMARKS.md, *Failover*).

mod cli;
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cli::named_daemon::{Builder, NamedDaemon};
use cli::{dovetail, ok, path, store_create};
use common::{pattern, Req, TestDriver};

/// Daemon `name` on the store `DIR/st` (`--shared-store`), serving `disks`.
fn start(dir: &Path, name: &str, disks: &[&str]) -> NamedDaemon {
    start_with(dir, name, disks, &[])
}

fn start_with(dir: &Path, name: &str, disks: &[&str], extra: &[&str]) -> NamedDaemon {
    Builder::new(dir, path(&dir.join("st")), name)
        .shared()
        .args(extra)
        .disks(disks)
        .timeout(Duration::from_secs(10))
        .start()
}

#[test]
fn two_daemons_share_a_store_directory_and_fail_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);
    ok(&["disk", "create", path(&st), "b", "--size", "16M"]);

    let refused = dovetail(&[
        "serve",
        "--store",
        path(&st),
        "--shared-store",
        "--cache",
        "none",
        "--disk",
        &format!("a={}", path(&d.join("x.sock"))),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--cache none"));

    let mut one = start(d, "one", &["a", "b"]);
    one.wait_for(&d.join("one-a.sock"));
    one.wait_for(&d.join("one-b.sock"));
    let mut two = start(d, "two", &["a"]);
    // A daemon holding the store alone is refused beside them.
    let alone = dovetail(&["disk", "create", path(&st), "c", "--size", "16M"]);
    assert!(!alone.status.success());
    assert!(String::from_utf8_lossy(&alone.stderr).contains("in use"));

    // Daemon two could not serve a: daemon one owns it, and says who.
    let status = two.status();
    assert!(status.contains("owned by another daemon"), "{status}");
    assert!(status.contains(&format!("pid {}", one.pid())), "{status}");
    let refused = two.ctl(&["takeover", "a"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("stop it"), "{err}");

    // The guest of daemon one writes and flushes.
    let data = pattern(7, 256 << 10);
    {
        let drv = TestDriver::connect(&d.join("one-a.sock"), 1, 4 << 20);
        drv.submit(0, &Req::write(2048, &data)).assert_ok(0);
        drv.submit(0, &Req::flush()).assert_ok(0);
    }
    let killed = Instant::now();
    one.kill9();
    let out = two.ctl_ok(&["takeover", "a"]);
    assert!(out.contains("taken over"), "{out}");
    let sock = d.join("two-a.sock");
    two.wait_for(&sock);
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let c = drv.submit(0, &Req::read(2048, data.len() as u32));
    let served = killed.elapsed();
    c.assert_ok(data.len() as u32);
    assert!(
        c.data == data,
        "a flushed write is missing after the failover"
    );
    eprintln!("store directory: from daemon one's SIGKILL to the first read served by daemon two: {served:?}");
    drop(drv);
    // b, whose owner died too, is attached on daemon two (which takes its lock first) and
    // deleted only once detached (the lock taken for the delete, then given back).
    let b_sock = d.join("two-b.sock");
    let out = two.ctl_ok(&["attach", "b", "--socket", path(&b_sock)]);
    assert!(out.contains("b"), "{out}");
    two.wait_for(&b_sock);
    two.ctl_ok(&["detach", "b"]);
    two.ctl_ok(&["disk-delete", "b"]);
    let listed = two.status();
    assert!(!listed.contains("\"b\""), "{listed}");
    two.terminate();
}

/// `serve --takeover-after`: daemon two wants disk a, which daemon one serves and renews the
/// lease of: it is not taken while one renews; once one hangs (SIGSTOP), two fences it (kills
/// the process holding the lock) and serves a with the flushed write; then two is killed with
/// SIGKILL and daemon three takes a over by the lease alone, timed from the kill to the first
/// read served (BENCHMARKS.md, *Failover*).
#[test]
fn a_hung_or_dead_owner_is_taken_over_after_the_lease_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);

    let mut one = start(d, "one", &["a"]);
    one.wait_for(&d.join("one-a.sock"));
    let lease = ["--takeover-after", "3s"];
    let two = start_with(d, "two", &["a"], &lease);
    let data = pattern(9, 128 << 10);
    {
        let drv = TestDriver::connect(&d.join("one-a.sock"), 1, 4 << 20);
        drv.submit(0, &Req::write(64, &data)).assert_ok(0);
        drv.submit(0, &Req::flush()).assert_ok(0);
    }
    // One renews: after longer than the timeout, a is still one's, and one still serves it.
    std::thread::sleep(Duration::from_millis(4500));
    let status = two.status();
    assert!(status.contains("owned by another daemon"), "{status}");
    assert!(!d.join("two-a.sock").exists());
    assert!(one.try_wait().is_none(), "one runs");
    let lease_file = std::fs::read(st.join("owners/a.lease")).expect("a's lease record");
    assert_eq!(lease_file.len(), 24);
    assert_eq!(
        u64::from_le_bytes(lease_file[16..24].try_into().expect("8 bytes")),
        u64::from(one.pid()),
        "the lease names its owner's pid"
    );

    // One hangs: two fences it (the hung process is killed) and serves a.
    one.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let mut two = two;
    let sock = d.join("two-a.sock");
    two.wait_for(&sock);
    let taken = stopped.elapsed();
    // Taken once the lease went unrenewed for 3 s; the last renewal came at most one renewal
    // period (1 s) before the stop.
    assert!(taken >= Duration::from_secs(2), "taken after {taken:?}");
    let ended = one.wait();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        ended.signal(),
        Some(libc::SIGKILL),
        "one was fenced: {ended}"
    );
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let c = drv.submit(0, &Req::read(64, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "the flushed write after the takeover");
    drop(drv);
    let events = two.ctl_ok(&["events"]);
    assert!(events.contains("disk-taken-over"), "{events}");
    let log = two.log();
    assert!(log.contains("renewed no lease"), "{log}");
    assert!(
        log.contains(&format!("pid {}", one.pid())),
        "the log names the fenced owner: {log}"
    );

    // Failover by the lease alone: two dies, three takes a over.
    let mut three = start_with(d, "three", &["a"], &lease);
    let killed = Instant::now();
    two.kill9();
    let sock = d.join("three-a.sock");
    three.wait_for(&sock);
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let c = drv.submit(0, &Req::read(64, data.len() as u32));
    let served = killed.elapsed();
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "the flushed write after the failover");
    eprintln!(
        "store directory, --takeover-after 3s: from daemon two's SIGKILL to the first read served by daemon three: {served:?}"
    );
}
