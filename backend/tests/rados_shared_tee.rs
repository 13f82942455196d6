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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use cli::{ok, path};
use common::{pattern, Req, TestDriver};

const STORE: &str = "rados:dovetail/st";
const DISK: u64 = 16 << 20;
const BLOCKS: u64 = DISK / 4096;
const CHUNK: usize = 256 << 10;

struct Daemon {
    child: Child,
    ctl: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill only sends signals to the child process this test spawned.
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

fn start(dir: &Path, conf: &Path, name: &str) -> Daemon {
    let ctl = dir.join(format!("{name}-ctl.sock"));
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["serve", "--store", STORE, "--shared-store"])
        .args(["--ceph-conf", path(conf), "--ceph-id", "admin"])
        .arg("--disk")
        .arg(format!("a={}", path(&dir.join(format!("{name}-a.sock")))))
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

/// A `ctl --json` command that must succeed: the last JSON line it printed.
fn ctl(d: &Daemon, args: &[&str]) -> Value {
    let out = ok(&[&["ctl", "--control", path(&d.ctl), "--json"], args].concat());
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

#[test]
fn a_teed_disk_copying_out_is_taken_over_on_rados() {
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

    let mut one = start(&dir, &conf, "one");
    wait_for(&dir.join("one-a.sock"), &mut one);
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
    ctl(
        &one,
        &[
            "tee",
            "a",
            "--candidate",
            "parallax-v2",
            "--policy",
            "sync-cross-checks",
        ],
    );
    let s = ctl(&one, &["status", "a"])["disks"][0].clone();
    let candidate = s["candidate"]["version"]
        .as_u64()
        .or_else(|| s["candidate"]["key"].as_u64())
        .unwrap_or_else(|| panic!("a candidate after tee: {s}"));
    let m = ctl(&one, &["migrate", "a", "--rate", "2M"]);
    assert_eq!(m["migration"]["copy_out"]["state"], "running", "{m}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = ctl(&one, &["migrate", "a", "--status"]);
        if m["migration"]["blocks_present"].as_u64().unwrap_or(0) > BLOCKS / 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(driver);

    // One hangs mid copy-out; two takes a over and resumes the copy-out.
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(one.child.id() as i32, libc::SIGSTOP) };
    let out = ok(&["ctl", "--control", path(&two.ctl), "takeover", "a"]);
    assert!(out.contains("fenced"), "{out}");
    wait_for(&dir.join("two-a.sock"), &mut two);
    let m = ctl(&two, &["migrate", "a", "--status"]);
    let resumed = m["migration"]["blocks_present"].as_u64().unwrap_or(0);
    assert!(
        resumed > 0 && resumed < BLOCKS,
        "two resumed the copy-out from the persisted map: {m}"
    );
    // One, resumed, finds it lost a: its copy-out can move neither the map nor the record.
    // SAFETY: as above.
    unsafe { libc::kill(one.child.id() as i32, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = ok(&["ctl", "--control", path(&one.ctl), "--json", "status"]);
        if st.contains("no longer owns") {
            break;
        }
        assert!(Instant::now() < deadline, "one still serves a: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let m = ctl(&two, &["migrate", "a", "--rate", "0", "--wait"]);
    assert_eq!(m["copy_out"]["state"], "done", "{m}");
    assert_eq!(m["blocks_present"].as_u64(), Some(BLOCKS), "{m}");
    let s = ctl(&two, &["status", "a"])["disks"][0].clone();
    let cand = &s["candidate"];
    assert!(
        cand["state"] == "active" && cand["counters"]["mismatches"].as_u64() == Some(0),
        "the candidate stays active without mismatches: {s}"
    );
    let drv = TestDriver::connect(&dir.join("two-a.sock"), 1, 8 << 20);
    assert!(read_disk(&drv) == model, "after the copy-out on two");
    drop(drv);
    ctl(&two, &["promote", "a"]);
    let s = ctl(&two, &["status", "a"])["disks"][0].clone();
    assert_eq!(s["trusted_version"].as_u64(), Some(candidate), "{s}");
    let drv = TestDriver::connect(&dir.join("two-a.sock"), 1, 8 << 20);
    assert!(read_disk(&drv) == model, "after promote on two");
    drop(drv);
    let log = std::fs::read_to_string(&one.log).unwrap_or_default();
    assert!(log.contains("no longer owns"), "{log}");
}
