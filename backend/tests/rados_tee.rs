//! The Tee, copy-out and promote through `dovetail ctl` on a disk served from a store on Ceph
//! RADOS (a one-host cluster this test starts; skipped with a message where Ceph is not
//! installed, except in CI): a parallax-v1 disk written by a vhost-user frontend is teed to a
//! parallax-v2 candidate, written through the Tee, copied out at a limited rate and the daemon
//! killed (-9) mid-way; after `store takeover` a new daemon resumes the copy-out from the
//! persisted presence map and migration record (objects of the store), completes it, promotes,
//! and the disk reads back what the guest wrote; `store check` finds the store consistent.

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;
mod cli;
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cli::named_daemon::{ceph_store_with_disks, ok_ceph, Builder, NamedDaemon};
use common::{pattern, read_disk, Req, TestDriver};

const STORE: &str = "rados:dovetail/tv";
const DISK: u64 = 16 << 20;
const BLOCKS: u64 = DISK / 4096;
const CHUNK: usize = 256 << 10;

/// The daemon on `STORE` serving disk a on `DIR/a.sock`, asked over `DIR/ctl.sock`, logging
/// to `DIR/LOG`; waited for until both sockets exist.
fn start(dir: &Path, conf: &Path, log: &str) -> NamedDaemon {
    Builder::new(dir, STORE, "serve")
        .ceph(conf)
        .disk_at("a", &dir.join("a.sock"))
        .control(&dir.join("ctl.sock"))
        .log(&dir.join(log))
        .timeout(Duration::from_secs(30))
        .start_serving()
}

fn write(driver: &TestDriver, model: &mut [u8], chunk: usize, seed: u64) {
    let data = pattern(seed, CHUNK);
    driver
        .submit(0, &Req::write((chunk * CHUNK / 512) as u64, &data))
        .assert_ok(0);
    model[chunk * CHUNK..(chunk + 1) * CHUNK].copy_from_slice(&data);
}

#[test]
fn tee_copy_out_resumed_after_kill_and_promote_on_rados() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    let conf = cluster.conf.clone();
    let dir = cluster.scratch();
    let run = |args: &[&str]| ok_ceph(&conf, args);
    ceph_store_with_disks(&conf, STORE, "128M", &["a"]);

    // The guest writes most of the disk (every fourth chunk left a hole), then the disk is
    // teed and written through the Tee.
    let mut daemon = start(&dir, &conf, "serve1.log");
    let driver = TestDriver::connect(&dir.join("a.sock"), 1, 8 << 20);
    let mut model = vec![0u8; DISK as usize];
    for i in 0..DISK as usize / CHUNK {
        if i % 4 != 3 {
            write(&driver, &mut model, i, i as u64 + 1);
        }
    }
    driver.submit(0, &Req::flush()).assert_ok(0);
    let t = daemon.ctl_json(&[
        "tee",
        "a",
        "--candidate",
        "parallax-v2",
        "--policy",
        "sync-cross-checks",
    ]);
    let s = daemon.ctl_json(&["status", "a"])["disks"][0].clone();
    let trusted = s["trusted_version"].as_u64().expect("trusted key");
    let candidate = s["candidate"]["version"]
        .as_u64()
        .or_else(|| s["candidate"]["key"].as_u64())
        .unwrap_or_else(|| panic!("a candidate after tee ({t}): {s}"));
    for (i, seed) in [(0usize, 900u64), (5, 901), (31, 902), (63, 903)] {
        write(&driver, &mut model, i, seed);
    }
    driver.submit(0, &Req::flush()).assert_ok(0);
    assert!(
        read_disk(&driver, DISK as usize, CHUNK) == model,
        "the teed disk reads the model"
    );

    // Copy-out at 2 MiB/s (12 MiB of data: ~6 s), killed once a quarter of it is persisted.
    let m = daemon.ctl_json(&["migrate", "a", "--rate", "2M"]);
    assert_eq!(m["migration"]["copy_out"]["state"], "running", "{m}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = daemon.ctl_json(&["migrate", "a", "--status"]);
        let present = m["migration"]["blocks_present"].as_u64().unwrap_or(0);
        if present > BLOCKS / 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy-out made no progress: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(driver);
    daemon.kill9();

    // A new daemon after the takeover resumes the copy-out by itself (the migration record).
    let out = run(&["store", "takeover", STORE]);
    assert!(out.contains("fenced"), "{out}");
    let daemon = start(&dir, &conf, "serve2.log");
    let m = daemon.ctl_json(&["migrate", "a", "--status"]);
    let resumed_at = m["migration"]["blocks_present"].as_u64().unwrap_or(0);
    assert!(
        resumed_at > 0 && resumed_at < BLOCKS,
        "resumed from the persisted map: {m}"
    );
    let m = daemon.ctl_json(&["migrate", "a", "--rate", "0", "--wait"]);
    assert_eq!(m["copy_out"]["state"], "done", "{m}");
    assert_eq!(m["blocks_present"].as_u64(), Some(BLOCKS), "{m}");
    let driver = TestDriver::connect(&dir.join("a.sock"), 1, 8 << 20);
    assert!(
        read_disk(&driver, DISK as usize, CHUNK) == model,
        "after the copy-out"
    );
    drop(driver);
    // `store check` reads the candidate's map object beside the daemon.
    let report = run(&["store", "check", STORE]);
    assert!(
        report.contains(&format!(
            "presence map of candidate {candidate}: {BLOCKS} of {BLOCKS} blocks present"
        )),
        "{report}"
    );

    // Promote: the candidate is the trusted version, with the same bytes; the old one and
    // the candidate's records are gone.
    let r = daemon.ctl_json(&["promote", "a"]);
    assert!(r["pause"]["total_us"].as_u64().is_some(), "{r}");
    let s = daemon.ctl_json(&["status", "a"])["disks"][0].clone();
    assert_eq!(s["trusted_version"].as_u64(), Some(candidate), "{s}");
    assert!(s["candidate"].is_null(), "{s}");
    let driver = TestDriver::connect(&dir.join("a.sock"), 1, 8 << 20);
    assert!(
        read_disk(&driver, DISK as usize, CHUNK) == model,
        "after promote"
    );
    drop(driver);
    daemon.terminate();
    let list = run(&["disk", "list", STORE]);
    assert!(list.contains("parallax-v2"), "{list}");
    let report = run(&["store", "check", STORE]);
    assert!(report.contains("result: consistent"), "{report}");
    assert!(
        !report.contains(&format!("{trusted}.map")),
        "no record of the retired version is left: {report}"
    );
}
