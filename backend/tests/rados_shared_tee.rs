//! A teed disk with a copy-out running, taken over between two daemons sharing a store on RADOS
//! (`serve --shared-store`), against a one-host cluster this test starts: daemon one serves
//! disk a teed to a parallax-v2 candidate and copies it out at a limited rate; it hangs
//! (SIGSTOP) mid-way and daemon two takes a over (`ctl takeover a`: one's client for a is
//! fenced); two resumes the copy-out from the presence map and migration record (objects of the
//! store), and one, resumed (SIGCONT), can no longer move them: it stops serving a. Two
//! completes the copy-out and promotes, and the disk reads back what the guest wrote.

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;
mod cli;
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cli::named_daemon::{ceph_store_with_disks, Builder, NamedDaemon};
use common::{pattern, read_disk, Req, TestDriver};

const STORE: &str = "rados:dovetail/st";
const DISK: u64 = 16 << 20;
const BLOCKS: u64 = DISK / 4096;
const CHUNK: usize = 256 << 10;

/// Daemon `name` on `STORE` (`--shared-store`), serving disk a.
fn start(dir: &Path, conf: &Path, name: &str) -> NamedDaemon {
    Builder::new(dir, STORE, name)
        .shared()
        .ceph(conf)
        .disks(&["a"])
        .start()
}

#[test]
fn a_teed_disk_copying_out_is_taken_over_on_rados() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    let conf = cluster.conf.clone();
    let dir = cluster.scratch();
    ceph_store_with_disks(&conf, STORE, "128M", &["a"]);

    let mut one = start(&dir, &conf, "one");
    one.wait_for(&dir.join("one-a.sock"));
    let mut two = start(&dir, &conf, "two");
    let driver = TestDriver::connect(&dir.join("one-a.sock"), 1, 8 << 20);
    let mut model = vec![0u8; DISK as usize];
    for i in 0..DISK as usize / CHUNK {
        if i % 4 != 3 {
            let data = pattern(i as u64 + 7, CHUNK);
            driver
                .submit(0, &Req::write((i * CHUNK / 512) as u64, &data))
                .assert_ok(0);
            model[i * CHUNK..(i + 1) * CHUNK].copy_from_slice(&data);
        }
    }
    driver.submit(0, &Req::flush()).assert_ok(0);
    one.ctl_json(&[
        "tee",
        "a",
        "--candidate",
        "parallax-v2",
        "--policy",
        "sync-cross-checks",
    ]);
    let s = one.ctl_json(&["status", "a"])["disks"][0].clone();
    let candidate = s["candidate"]["version"]
        .as_u64()
        .or_else(|| s["candidate"]["key"].as_u64())
        .unwrap_or_else(|| panic!("a candidate after tee: {s}"));
    let m = one.ctl_json(&["migrate", "a", "--rate", "2M"]);
    assert_eq!(m["migration"]["copy_out"]["state"], "running", "{m}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = one.ctl_json(&["migrate", "a", "--status"]);
        if m["migration"]["blocks_present"].as_u64().unwrap_or(0) > BLOCKS / 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(driver);

    // One hangs mid copy-out; two takes a over and resumes the copy-out.
    one.signal(libc::SIGSTOP);
    let out = two.ctl_ok(&["takeover", "a"]);
    assert!(out.contains("fenced"), "{out}");
    two.wait_for(&dir.join("two-a.sock"));
    let m = two.ctl_json(&["migrate", "a", "--status"]);
    let resumed = m["migration"]["blocks_present"].as_u64().unwrap_or(0);
    assert!(
        resumed > 0 && resumed < BLOCKS,
        "two resumed the copy-out from the persisted map: {m}"
    );
    // One, resumed, finds it lost a: its copy-out can move neither the map nor the record.
    one.signal(libc::SIGCONT);
    one.wait_status(
        Duration::from_secs(10),
        Duration::from_millis(100),
        |st| st.contains("no longer owns"),
        "one still serves a",
    );

    let m = two.ctl_json(&["migrate", "a", "--rate", "0", "--wait"]);
    assert_eq!(m["copy_out"]["state"], "done", "{m}");
    assert_eq!(m["blocks_present"].as_u64(), Some(BLOCKS), "{m}");
    let s = two.ctl_json(&["status", "a"])["disks"][0].clone();
    let cand = &s["candidate"];
    assert!(
        cand["state"] == "active" && cand["counters"]["mismatches"].as_u64() == Some(0),
        "the candidate stays active without mismatches: {s}"
    );
    let drv = TestDriver::connect(&dir.join("two-a.sock"), 1, 8 << 20);
    assert!(
        read_disk(&drv, DISK as usize, CHUNK) == model,
        "after the copy-out on two"
    );
    drop(drv);
    two.ctl_json(&["promote", "a"]);
    let s = two.ctl_json(&["status", "a"])["disks"][0].clone();
    assert_eq!(s["trusted_version"].as_u64(), Some(candidate), "{s}");
    let drv = TestDriver::connect(&dir.join("two-a.sock"), 1, 8 << 20);
    assert!(
        read_disk(&drv, DISK as usize, CHUNK) == model,
        "after promote on two"
    );
    drop(drv);
    let log = one.log();
    assert!(log.contains("no longer owns"), "{log}");
}
