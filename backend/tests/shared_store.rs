//! Two daemons on one store directory (`serve --shared-store`), the real binaries: each disk is
//! served by one of them; the other reports it as failed, naming the owner, and refuses to take
//! it over while the owner runs; after the owner is killed with SIGKILL, `ctl takeover` serves
//! the disk on the other daemon with every flushed write there, and the time from the kill to
//! the first read served is printed (BENCHMARKS.md, *Failover*).

mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{dovetail, ok, path, store_create};
use common::{pattern, Req, TestDriver};

struct Daemon {
    child: Child,
    ctl: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(p: &Path, d: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!(
                "the daemon exited ({st}):\n{}",
                std::fs::read_to_string(&d.log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(dir: &Path, name: &str, disks: &[&str]) -> Daemon {
    start_with(dir, name, disks, &[])
}

fn start_with(dir: &Path, name: &str, disks: &[&str], extra: &[&str]) -> Daemon {
    let st = dir.join("st");
    let ctl = dir.join(format!("{name}-ctl.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
    cmd.args(["serve", "--store", path(&st), "--shared-store"])
        .args(extra);
    for d in disks {
        cmd.arg("--disk").arg(format!(
            "{d}={}",
            path(&dir.join(format!("{name}-{d}.sock")))
        ));
    }
    let child = cmd
        .args(["--control", path(&ctl)])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let mut d = Daemon { child, ctl, log };
    let ctl = d.ctl.clone();
    wait_for(&ctl, &mut d);
    d
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
    wait_for(&d.join("one-a.sock"), &mut one);
    wait_for(&d.join("one-b.sock"), &mut one);
    let mut two = start(d, "two", &["a"]);
    // A daemon holding the store alone is refused beside them.
    let alone = dovetail(&["disk", "create", path(&st), "c", "--size", "16M"]);
    assert!(!alone.status.success());
    assert!(String::from_utf8_lossy(&alone.stderr).contains("in use"));

    // Daemon two could not serve a: daemon one owns it, and says who.
    let status = ok(&["ctl", "--control", path(&two.ctl), "--json", "status"]);
    assert!(status.contains("owned by another daemon"), "{status}");
    assert!(
        status.contains(&format!("pid {}", one.child.id())),
        "{status}"
    );
    let refused = dovetail(&["ctl", "--control", path(&two.ctl), "takeover", "a"]);
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
    one.child.kill().expect("SIGKILL daemon one");
    let killed = Instant::now();
    let _ = one.child.wait();
    let out = ok(&["ctl", "--control", path(&two.ctl), "takeover", "a"]);
    assert!(out.contains("taken over"), "{out}");
    let sock = d.join("two-a.sock");
    wait_for(&sock, &mut two);
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
    let out = ok(&[
        "ctl",
        "--control",
        path(&two.ctl),
        "attach",
        "b",
        "--socket",
        path(&b_sock),
    ]);
    assert!(out.contains("b"), "{out}");
    wait_for(&b_sock, &mut two);
    ok(&["ctl", "--control", path(&two.ctl), "detach", "b"]);
    ok(&["ctl", "--control", path(&two.ctl), "disk-delete", "b"]);
    let listed = ok(&["ctl", "--control", path(&two.ctl), "--json", "status"]);
    assert!(!listed.contains("\"b\""), "{listed}");
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(two.child.id() as i32, libc::SIGTERM) };
    let st = two.child.wait().expect("wait");
    assert!(st.success(), "serve exits 0 on SIGTERM ({st})");
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
    wait_for(&d.join("one-a.sock"), &mut one);
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
    let status = ok(&["ctl", "--control", path(&two.ctl), "--json", "status"]);
    assert!(status.contains("owned by another daemon"), "{status}");
    assert!(!d.join("two-a.sock").exists());
    assert!(
        one.child.try_wait().expect("try_wait").is_none(),
        "one runs"
    );
    let lease_file = std::fs::read(st.join("owners/a.lease")).expect("a's lease record");
    assert_eq!(lease_file.len(), 24);
    assert_eq!(
        u64::from_le_bytes(lease_file[16..24].try_into().expect("8 bytes")),
        u64::from(one.child.id()),
        "the lease names its owner's pid"
    );

    // One hangs: two fences it (the hung process is killed) and serves a.
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(one.child.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let mut two = two;
    let sock = d.join("two-a.sock");
    wait_for(&sock, &mut two);
    let taken = stopped.elapsed();
    // Taken once the lease went unrenewed for 3 s; the last renewal came at most one renewal
    // period (1 s) before the stop.
    assert!(taken >= Duration::from_secs(2), "taken after {taken:?}");
    let ended = one.child.wait().expect("wait one");
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
    let events = ok(&["ctl", "--control", path(&two.ctl), "events"]);
    assert!(events.contains("disk-taken-over"), "{events}");
    let log = std::fs::read_to_string(&two.log).unwrap_or_default();
    assert!(log.contains("renewed no lease"), "{log}");
    assert!(
        log.contains(&format!("pid {}", one.child.id())),
        "the log names the fenced owner: {log}"
    );

    // Failover by the lease alone: two dies, three takes a over.
    let mut three = start_with(d, "three", &["a"], &lease);
    two.child.kill().expect("SIGKILL two");
    let killed = Instant::now();
    let _ = two.child.wait();
    let sock = d.join("three-a.sock");
    wait_for(&sock, &mut three);
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let c = drv.submit(0, &Req::read(64, data.len() as u32));
    let served = killed.elapsed();
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "the flushed write after the failover");
    eprintln!(
        "store directory, --takeover-after 3s: from daemon two's SIGKILL to the first read served by daemon three: {served:?}"
    );
}
