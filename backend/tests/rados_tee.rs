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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use cli::{ok, path};
use common::{pattern, Req, TestDriver};

const STORE: &str = "rados:dovetail/tv";
const DISK: u64 = 16 << 20;
const BLOCKS: u64 = DISK / 4096;
const CHUNK: usize = 256 << 10;

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, conf: &Path, log: &str) -> Daemon {
        for s in ["a.sock", "ctl.sock"] {
            let _ = std::fs::remove_file(dir.join(s));
        }
        let log = dir.join(log);
        let mut child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(["serve", "--store", STORE, "--ceph-conf", path(conf)])
            .args([
                "--ceph-id",
                "admin",
                "--control",
                path(&dir.join("ctl.sock")),
            ])
            .arg("--disk")
            .arg(format!("a={}", path(&dir.join("a.sock"))))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(dir.join("a.sock").exists() && dir.join("ctl.sock").exists()) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "the daemon exited ({st}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the daemon's sockets never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, log }
    }

    fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }

    fn stop(mut self) {
        // SAFETY: kill only sends a signal to the child process this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().expect("wait");
        assert!(
            st.success(),
            "serve exits 0 on SIGTERM ({st}):\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

/// A `ctl --json` command that must succeed: the last JSON line it printed.
fn ctl(dir: &Path, args: &[&str]) -> Value {
    let sock = dir.join("ctl.sock");
    let out = ok(&[&["ctl", "--control", path(&sock), "--json"], args].concat());
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .expect("ctl printed a reply");
    serde_json::from_str(last).expect("ctl --json prints JSON")
}

fn read_disk(driver: &TestDriver) -> Vec<u8> {
    let mut out = Vec::with_capacity(DISK as usize);
    for i in 0..DISK as usize / CHUNK {
        let c = driver.submit(0, &Req::read((i * CHUNK / 512) as u64, CHUNK as u32));
        c.assert_ok(CHUNK as u32);
        out.extend_from_slice(&c.data);
    }
    out
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
    let c = path(&conf).to_string();
    let run = |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--ceph-conf", c.as_str()]);
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

    // The guest writes most of the disk (every fourth chunk left a hole), then the disk is
    // teed and written through the Tee.
    let daemon = Daemon::start(&dir, &conf, "serve1.log");
    let driver = TestDriver::connect(&dir.join("a.sock"), 1, 8 << 20);
    let mut model = vec![0u8; DISK as usize];
    for i in 0..DISK as usize / CHUNK {
        if i % 4 != 3 {
            write(&driver, &mut model, i, i as u64 + 1);
        }
    }
    driver.submit(0, &Req::flush()).assert_ok(0);
    let t = ctl(
        &dir,
        &[
            "tee",
            "a",
            "--candidate",
            "parallax-v2",
            "--policy",
            "sync-cross-checks",
        ],
    );
    let s = ctl(&dir, &["status", "a"])["disks"][0].clone();
    let trusted = s["trusted_version"].as_u64().expect("trusted key");
    let candidate = s["candidate"]["version"]
        .as_u64()
        .or_else(|| s["candidate"]["key"].as_u64())
        .unwrap_or_else(|| panic!("a candidate after tee ({t}): {s}"));
    for (i, seed) in [(0usize, 900u64), (5, 901), (31, 902), (63, 903)] {
        write(&driver, &mut model, i, seed);
    }
    driver.submit(0, &Req::flush()).assert_ok(0);
    assert!(read_disk(&driver) == model, "the teed disk reads the model");

    // Copy-out at 2 MiB/s (12 MiB of data: ~6 s), killed once a quarter of it is persisted.
    let m = ctl(&dir, &["migrate", "a", "--rate", "2M"]);
    assert_eq!(m["migration"]["copy_out"]["state"], "running", "{m}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = ctl(&dir, &["migrate", "a", "--status"]);
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
    let daemon = Daemon::start(&dir, &conf, "serve2.log");
    let m = ctl(&dir, &["migrate", "a", "--status"]);
    let resumed_at = m["migration"]["blocks_present"].as_u64().unwrap_or(0);
    assert!(
        resumed_at > 0 && resumed_at < BLOCKS,
        "resumed from the persisted map: {m}"
    );
    let m = ctl(&dir, &["migrate", "a", "--rate", "0", "--wait"]);
    assert_eq!(m["copy_out"]["state"], "done", "{m}");
    assert_eq!(m["blocks_present"].as_u64(), Some(BLOCKS), "{m}");
    let driver = TestDriver::connect(&dir.join("a.sock"), 1, 8 << 20);
    assert!(read_disk(&driver) == model, "after the copy-out");
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
    let r = ctl(&dir, &["promote", "a"]);
    assert!(r["pause"]["total_us"].as_u64().is_some(), "{r}");
    let s = ctl(&dir, &["status", "a"])["disks"][0].clone();
    assert_eq!(s["trusted_version"].as_u64(), Some(candidate), "{s}");
    assert!(s["candidate"].is_null(), "{s}");
    let driver = TestDriver::connect(&dir.join("a.sock"), 1, 8 << 20);
    assert!(read_disk(&driver) == model, "after promote");
    drop(driver);
    daemon.stop();
    let list = run(&["disk", "list", STORE]);
    assert!(list.contains("parallax-v2"), "{list}");
    let report = run(&["store", "check", STORE]);
    assert!(report.contains("result: consistent"), "{report}");
    assert!(
        !report.contains(&format!("{trusted}.map")),
        "no record of the retired version is left: {report}"
    );
}
