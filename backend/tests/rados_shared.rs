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

use std::path::Path;
use std::time::{Duration, Instant};

use cli::named_daemon::{ceph_store_with_disks, Builder, NamedDaemon};
use common::{pattern, Req, TestDriver};

const STORE: &str = "rados:dovetail/sh";

/// Daemon `name` on `STORE` (`--shared-store`), serving `disks`.
fn start(dir: &Path, conf: &Path, name: &str, disks: &[&str]) -> NamedDaemon {
    start_with(dir, conf, name, disks, &[])
}

fn start_with(dir: &Path, conf: &Path, name: &str, disks: &[&str], extra: &[&str]) -> NamedDaemon {
    Builder::new(dir, STORE, name)
        .shared()
        .args(extra)
        .ceph(conf)
        .disks(disks)
        .start()
}

#[test]
fn two_daemons_on_rados_fence_and_fail_over() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    let conf = cluster.conf.clone();
    let dir = cluster.scratch();
    ceph_store_with_disks(&conf, STORE, "128M", &["a", "b", "c"]);

    // Daemon one serves a and b, daemon three c; daemon two is to serve a and c.
    let mut one = start(&dir, &conf, "one", &["a", "b"]);
    one.wait_for(&dir.join("one-a.sock"));
    one.wait_for(&dir.join("one-b.sock"));
    let mut three = start(&dir, &conf, "three", &["c"]);
    three.wait_for(&dir.join("three-c.sock"));
    let mut two = start(&dir, &conf, "two", &["a", "c"]);
    let st = two.status();
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
    one.signal(libc::SIGSTOP);
    let out = two.ctl_ok(&["takeover", "a"]);
    assert!(out.contains("fenced"), "{out}");
    let sock = dir.join("two-a.sock");
    two.wait_for(&sock);
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let got = drv.submit(0, &Req::read(100, da.len() as u32));
    got.assert_ok(da.len() as u32);
    assert!(got.data == da, "a's flushed write after the takeover");
    drop(drv);
    // Resumed, one finds it lost a and stops serving it, saying why.
    one.signal(libc::SIGCONT);
    one.wait_status(
        Duration::from_secs(5),
        Duration::from_millis(100),
        |st| st.contains("no longer owns"),
        "one still serves a",
    );
    let log = one.log();
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
    let killed = Instant::now();
    three.kill9();
    let out = two.ctl(&["takeover", "c"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("fenced"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = dir.join("two-c.sock");
    two.wait_for(&sock);
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
    ceph_store_with_disks(&conf, STORE, "64M", &["a"]);
    let lease = ["--takeover-after", "3s"];
    let mut one = start_with(&dir, &conf, "one", &["a"], &lease);
    one.wait_for(&dir.join("one-a.sock"));
    let mut two = start_with(&dir, &conf, "two", &["a"], &lease);
    let data = pattern(11, 128 << 10);
    {
        let drv = TestDriver::connect(&dir.join("one-a.sock"), 1, 4 << 20);
        drv.submit(0, &Req::write(32, &data)).assert_ok(0);
        drv.submit(0, &Req::flush()).assert_ok(0);
    }
    // One renews: after longer than the timeout, a is still one's.
    std::thread::sleep(Duration::from_millis(4500));
    let st = two.status();
    assert!(st.contains("owned by another daemon"), "{st}");
    assert!(!dir.join("two-a.sock").exists());

    // One hangs: two fences it and serves a.
    one.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let sock = dir.join("two-a.sock");
    two.wait_for(&sock);
    let taken = stopped.elapsed();
    // The lease went unrenewed for 3 s; its last renewal came at most 1 s before the stop.
    assert!(taken >= Duration::from_secs(2), "taken after {taken:?}");
    let drv = TestDriver::connect(&sock, 1, 4 << 20);
    let got = drv.submit(0, &Req::read(32, data.len() as u32));
    got.assert_ok(data.len() as u32);
    assert!(got.data == data, "a's flushed write after the takeover");
    drop(drv);
    let events = two.ctl_ok(&["events"]);
    assert!(
        events.contains("disk-taken-over") && events.contains("fenced"),
        "{events}"
    );
    let log = two.log();
    assert!(log.contains("renewed no lease"), "{log}");

    // Resumed, one finds it was fenced and stops serving a.
    one.signal(libc::SIGCONT);
    one.wait_status(
        Duration::from_secs(5),
        Duration::from_millis(100),
        |st| st.contains("no longer owns"),
        "one still serves a",
    );
    // Two dies: one takes a back by the lease alone (fencing two's client).
    let killed = Instant::now();
    two.kill9();
    one.wait_status(
        Duration::from_secs(15),
        Duration::from_millis(20),
        |st| !st.contains("no longer owns") && st.contains("\"a\""),
        "one never took a back",
    );
    let drv = TestDriver::connect(&dir.join("one-a.sock"), 1, 4 << 20);
    let got = drv.submit(0, &Req::read(32, data.len() as u32));
    let served = killed.elapsed();
    got.assert_ok(data.len() as u32);
    assert!(got.data == data, "a's flushed write after the failover");
    eprintln!(
        "RADOS, --takeover-after 3s: from daemon two's SIGKILL to the first read of a served by daemon one: {served:?}"
    );
}
