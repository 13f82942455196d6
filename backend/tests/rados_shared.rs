//! Two daemons on one store on RADOS (`serve --store rados:POOL/NAME --shared-store`), the real
//! binaries against a one-host cluster this test starts: a disk is served by one daemon, the
//! other reports it as failed naming the owner; `ctl takeover` on the other daemon while the
//! owner hangs (SIGSTOP) fences it, serves the disk with every flushed write, and the fenced
//! daemon, resumed, stops serving the disk with a clear error (status, `disk-failed`) and serves
//! its other disk on; then the
//! failover of a disk whose daemon got SIGKILL (its client fenced), timed from the kill to the first read served (BENCHMARKS.md,
//! *Failover*).

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;
mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{dovetail, ok, path};
use common::{pattern, Req, TestDriver};

const STORE: &str = "rados:dovetail/sh";

struct Daemon {
    child: Child,
    ctl: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to the child process this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(p: &Path, d: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
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

fn start(dir: &Path, conf: &Path, name: &str, disks: &[&str]) -> Daemon {
    start_with(dir, conf, name, disks, &[])
}

fn start_with(dir: &Path, conf: &Path, name: &str, disks: &[&str], extra: &[&str]) -> Daemon {
    let ctl = dir.join(format!("{name}-ctl.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
    cmd.args(["serve", "--store", STORE, "--shared-store"])
        .args(extra)
        .args(["--ceph-conf", path(conf), "--ceph-id", "admin"]);
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

fn status(d: &Daemon) -> String {
    ok(&["ctl", "--control", path(&d.ctl), "--json", "status"])
}

#[test]
fn two_daemons_on_rados_fence_and_fail_over() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    let conf = cluster.conf.clone();
    let dir = cluster.scratch();
    let c = path(&conf).to_string();
    let run = |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--ceph-conf", &c]);
        ok(&v)
    };
    run(&[
        "store",
        "create",
        STORE,
        "--size",
        "128M",
        "--extent-size",
        "4M",
    ]);
    run(&["disk", "create", STORE, "a", "--size", "16M"]);
    run(&["disk", "create", STORE, "b", "--size", "16M"]);
    run(&["disk", "create", STORE, "c", "--size", "16M"]);

    // Daemon one serves a and b, daemon three c; daemon two is to serve a and c.
    let mut one = start(&dir, &conf, "one", &["a", "b"]);
    wait_for(&dir.join("one-a.sock"), &mut one);
    wait_for(&dir.join("one-b.sock"), &mut one);
    let mut three = start(&dir, &conf, "three", &["c"]);
    wait_for(&dir.join("three-c.sock"), &mut three);
    let mut two = start(&dir, &conf, "two", &["a", "c"]);
    let st = status(&two);
    assert!(
        st.contains("owned by another daemon") && st.contains("client."),
        "{st}"
    );

    // The guests write and flush a (on one) and c (on three).
    let da = pattern(3, 128 << 10);
    let db = pattern(4, 128 << 10);
    for (sock, data) in [("one-a", &da), ("three-c", &db)] {
        let drv = TestDriver::connect(&dir.join(format!("{sock}.sock")), 1, 4 << 20);
        drv.submit(0, &Req::write(100, data)).assert_ok(0);
        drv.submit(0, &Req::flush()).assert_ok(0);
    }

    // One hangs; two takes a over, fencing it.
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(one.child.id() as i32, libc::SIGSTOP) };
    let out = ok(&["ctl", "--control", path(&two.ctl), "takeover", "a"]);
    assert!(out.contains("fenced"), "{out}");
    let sock = dir.join("two-a.sock");
    wait_for(&sock, &mut two);
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let got = drv.submit(0, &Req::read(100, da.len() as u32));
    got.assert_ok(da.len() as u32);
    assert!(got.data == da, "a's flushed write after the takeover");
    drop(drv);
    // Resumed, one finds it lost a and stops serving it, saying why.
    // SAFETY: as above.
    unsafe { libc::kill(one.child.id() as i32, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status(&one);
        if st.contains("no longer owns") {
            break;
        }
        assert!(Instant::now() < deadline, "one still serves a: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&one.log).unwrap_or_default();
    assert!(log.contains("no longer owns"), "{log}");
    // ... and serves b on: each disk has a client of its own, and only a's was fenced.
    let drv = TestDriver::connect(&dir.join("one-b.sock"), 1, 4 << 20);
    let dbb = pattern(5, 64 << 10);
    drv.submit(0, &Req::write(8, &dbb)).assert_ok(0);
    drv.submit(0, &Req::flush()).assert_ok(0);
    let got = drv.submit(0, &Req::read(8, dbb.len() as u32));
    got.assert_ok(dbb.len() as u32);
    assert!(got.data == dbb, "b on the fenced daemon");
    drop(drv);

    // Failover: three is killed; two takes c over, fencing three's client.
    three.child.kill().expect("SIGKILL");
    let killed = Instant::now();
    let _ = three.child.wait();
    let out = dovetail(&["ctl", "--control", path(&two.ctl), "takeover", "c"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("fenced"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = dir.join("two-c.sock");
    wait_for(&sock, &mut two);
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let got = drv.submit(0, &Req::read(100, db.len() as u32));
    let served = killed.elapsed();
    got.assert_ok(db.len() as u32);
    assert!(got.data == db, "c's flushed write after the failover");
    eprintln!(
        "RADOS: from daemon three's SIGKILL to the first read of c served by daemon two: {served:?}"
    );
}

/// `serve --takeover-after` on RADOS: daemon two wants disk a, which daemon one serves and
/// renews the lease of. Not taken while one renews; once one hangs (SIGSTOP), two fences it
/// (blocklists its client for a), serves a with the flushed write, and one, resumed, stops
/// serving a with a clear error; then two is killed with SIGKILL and one takes a back by the
/// lease alone, timed from the kill to the first read served (BENCHMARKS.md, *Failover*).
#[test]
fn a_hung_or_dead_owner_on_rados_is_taken_over_after_the_lease_timeout() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    let conf = cluster.conf.clone();
    let dir = cluster.scratch();
    let c = path(&conf).to_string();
    let run = |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--ceph-conf", &c]);
        ok(&v)
    };
    run(&[
        "store",
        "create",
        STORE,
        "--size",
        "64M",
        "--extent-size",
        "4M",
    ]);
    run(&["disk", "create", STORE, "a", "--size", "16M"]);
    let lease = ["--takeover-after", "3s"];
    let mut one = start_with(&dir, &conf, "one", &["a"], &lease);
    wait_for(&dir.join("one-a.sock"), &mut one);
    let mut two = start_with(&dir, &conf, "two", &["a"], &lease);
    let data = pattern(11, 128 << 10);
    {
        let drv = TestDriver::connect(&dir.join("one-a.sock"), 1, 4 << 20);
        drv.submit(0, &Req::write(32, &data)).assert_ok(0);
        drv.submit(0, &Req::flush()).assert_ok(0);
    }
    // One renews: after longer than the timeout, a is still one's.
    std::thread::sleep(Duration::from_millis(4500));
    let st = status(&two);
    assert!(st.contains("owned by another daemon"), "{st}");
    assert!(!dir.join("two-a.sock").exists());

    // One hangs: two fences it and serves a.
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(one.child.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let sock = dir.join("two-a.sock");
    wait_for(&sock, &mut two);
    let taken = stopped.elapsed();
    // The lease went unrenewed for 3 s; its last renewal came at most 1 s before the stop.
    assert!(taken >= Duration::from_secs(2), "taken after {taken:?}");
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let got = drv.submit(0, &Req::read(32, data.len() as u32));
    got.assert_ok(data.len() as u32);
    assert!(got.data == data, "a's flushed write after the takeover");
    drop(drv);
    let events = ok(&["ctl", "--control", path(&two.ctl), "events"]);
    assert!(
        events.contains("disk-taken-over") && events.contains("fenced"),
        "{events}"
    );
    let log = std::fs::read_to_string(&two.log).unwrap_or_default();
    assert!(log.contains("renewed no lease"), "{log}");

    // Resumed, one finds it was fenced and stops serving a.
    // SAFETY: as above.
    unsafe { libc::kill(one.child.id() as i32, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = status(&one);
        if st.contains("no longer owns") {
            break;
        }
        assert!(Instant::now() < deadline, "one still serves a: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Two dies: one takes a back by the lease alone (fencing two's client).
    two.child.kill().expect("SIGKILL two");
    let killed = Instant::now();
    let _ = two.child.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = status(&one);
        if !st.contains("no longer owns") && st.contains("\"a\"") {
            break;
        }
        assert!(Instant::now() < deadline, "one never took a back: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let drv = TestDriver::connect(&dir.join("one-a.sock"), 1, 4 << 20);
    let got = drv.submit(0, &Req::read(32, data.len() as u32));
    let served = killed.elapsed();
    got.assert_ok(data.len() as u32);
    assert!(got.data == data, "a's flushed write after the failover");
    eprintln!(
        "RADOS, --takeover-after 3s: from daemon two's SIGKILL to the first read of a served by daemon one: {served:?}"
    );
}
