//! A store on Ceph RADOS served by the real binary, against a one-host cluster this test
//! starts (skipped with a message where Ceph is not installed, except in CI): `store create`,
//! `disk create`, `serve --store rados:POOL/NAME` and `store check` with the `rados:` name; a
//! parallax-v1 disk written through a vhost-user frontend reads back what it wrote, also after
//! a daemon restart; a second daemon on the held store is refused.

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;
mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_bench::fill::Rng;
use dovetail_bench::load::{self, Limit, Pattern, Workload};
use dovetail_bench::verify::VerifyState;

use cli::{dovetail, ok, path};
use common::{pattern, Req, TestDriver};

const STORE: &str = "rados:dovetail/vm";

fn serve(dir: &Path, conf: &Path, log: &str) -> Child {
    serve_disk(dir, conf, log, "a")
}

fn serve_disk(dir: &Path, conf: &Path, log: &str, disk: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["serve", "--store", STORE, "--ceph-conf", path(conf)])
        .args(["--ceph-id", "admin", "--disk"])
        .arg(format!(
            "{disk}={}",
            path(&dir.join(format!("{disk}.sock")))
        ))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).expect("log"))
        .spawn()
        .expect("spawn serve")
}

fn wait_for(child: &mut Child, file: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "the daemon exited ({st}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().expect("wait");
    assert!(st.success(), "serve exits 0 on SIGTERM ({st})");
}

#[test]
fn a_disk_served_from_a_store_on_rados() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    let conf: PathBuf = cluster.conf.clone();
    let dir = cluster.scratch();
    let c = path(&conf).to_string();
    let with = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--ceph-conf".into(), c.clone()]);
        v
    };
    let run = |args: &[&str]| {
        let v = with(args);
        ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(&[
        "store",
        "create",
        STORE,
        "--size",
        "256M",
        "--extent-size",
        "4M",
    ]);
    assert!(out.contains("created store rados:dovetail/vm"), "{out}");
    assert!(
        out.contains("vm.data.0.*"),
        "the tier is its data objects: {out}"
    );
    run(&["disk", "create", STORE, "a", "--size", "16M"]);
    let listed = run(&["disk", "list", STORE]);
    assert!(listed.contains("parallax-v1"), "{listed}");

    let sock = dir.join("a.sock");
    let mut daemon = serve(&dir, &conf, "serve1.log");
    wait_for(&mut daemon, &sock, &dir.join("serve1.log"));

    // Writes across several extents and objects, flushed, read back.
    let driver = TestDriver::connect(&sock, 1, 8 << 20);
    let mut written = Vec::new();
    for (i, sector) in [0u64, 8, 4096, 9000, 24_000].into_iter().enumerate() {
        let data = pattern(i as u64 + 1, 256 << 10);
        driver.submit(0, &Req::write(sector, &data)).assert_ok(0);
        written.push((sector, data));
    }
    // Later writes win over earlier ones they overlap (sector 8 lies inside the first).
    driver.submit(0, &Req::flush()).assert_ok(0);
    let expect = |sector: u64| -> Vec<u8> {
        let mut img = vec![0u8; 32 << 20];
        for (s, d) in &written {
            let at = (*s as usize) * 512;
            img[at..at + d.len()].copy_from_slice(d);
        }
        img[(sector as usize) * 512..(sector as usize) * 512 + (256 << 10)].to_vec()
    };
    for &(sector, _) in &written {
        let c = driver.submit(0, &Req::read(sector, 256 << 10));
        c.assert_ok(256 << 10);
        assert!(
            c.data == expect(sector),
            "sector {sector} reads back what was written"
        );
    }

    // The store is held: a second daemon is refused, with a message that says so; a check
    // beside the holder works.
    let second = dovetail(
        &with(&["disk", "create", STORE, "b", "--size", "16M"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "{err}");
    let report = run(&["store", "check", STORE]);
    assert!(report.contains("result: consistent"), "{report}");
    assert!(report.contains("held by"), "{report}");

    drop(driver);
    stop(daemon);

    // Restarted: every flushed write is there.
    let mut daemon = serve(&dir, &conf, "serve2.log");
    wait_for(&mut daemon, &sock, &dir.join("serve2.log"));
    let driver = TestDriver::connect(&sock, 1, 8 << 20);
    for &(sector, _) in &written {
        let c = driver.submit(0, &Req::read(sector, 256 << 10));
        c.assert_ok(256 << 10);
        assert!(
            c.data == expect(sector),
            "sector {sector} after the restart"
        );
    }
    drop(driver);
    stop(daemon);
    let report = run(&["store", "check", STORE]);
    assert!(report.contains("result: consistent"), "{report}");

    // kill -9 leaves the store held: a new daemon is refused until `store takeover` fences
    // the dead holder and breaks its lock; then every flushed write is there.
    let mut daemon = serve(&dir, &conf, "serve3.log");
    wait_for(&mut daemon, &sock, &dir.join("serve3.log"));
    let driver = TestDriver::connect(&sock, 1, 8 << 20);
    let late = pattern(99, 64 << 10);
    driver.submit(0, &Req::write(30_000, &late)).assert_ok(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    daemon.kill().expect("kill -9");
    daemon.wait().expect("reaped");
    drop(driver);
    let _ = std::fs::remove_file(&sock);
    let mut refused = serve(&dir, &conf, "serve4.log");
    let st = refused.wait().expect("wait");
    assert!(!st.success(), "a daemon on a held store fails");
    let log = std::fs::read_to_string(dir.join("serve4.log")).unwrap_or_default();
    assert!(log.contains("in use"), "{log}");
    let out = run(&["store", "takeover", STORE]);
    assert!(out.contains("fenced"), "{out}");
    let out = run(&["store", "takeover", STORE]);
    assert!(out.contains("nobody held"), "{out}");

    // The new daemon serves what was flushed. Then it is fenced in turn while serving: its
    // next write and FLUSH fail (IOERR), and nothing it wrote after the fence is visible.
    let mut daemon = serve(&dir, &conf, "serve5.log");
    wait_for(&mut daemon, &sock, &dir.join("serve5.log"));
    let driver = TestDriver::connect(&sock, 1, 8 << 20);
    let c = driver.submit(0, &Req::read(30_000, late.len() as u32));
    c.assert_ok(late.len() as u32);
    assert!(c.data == late, "the write flushed before kill -9 is there");
    let out = run(&["store", "takeover", STORE]);
    assert!(out.contains("fenced"), "{out}");
    let fenced = pattern(123, 64 << 10);
    let w = driver.submit(0, &Req::write(30_000, &fenced));
    let f = driver.submit(0, &Req::flush());
    assert_eq!(
        f.status,
        Some(1),
        "a fenced daemon's FLUSH fails with IOERR (the write: {:?})",
        w.status
    );
    daemon.kill().expect("kill -9");
    daemon.wait().expect("reaped");
    let log = std::fs::read_to_string(dir.join("serve5.log")).unwrap_or_default();
    assert!(
        log.contains("blocklisted"),
        "the fenced daemon says why it fails:\n{log}"
    );
    drop(driver);
    let _ = std::fs::remove_file(&sock);
    let mut daemon = serve(&dir, &conf, "serve6.log");
    wait_for(&mut daemon, &sock, &dir.join("serve6.log"));
    let driver = TestDriver::connect(&sock, 1, 8 << 20);
    let c = driver.submit(0, &Req::read(30_000, late.len() as u32));
    c.assert_ok(late.len() as u32);
    assert!(c.data == late, "nothing the fenced daemon wrote is visible");
    drop(driver);
    stop(daemon);

    // kill -9 under a verifying load (random reads and writes, a FLUSH every 8 writes), at a
    // random moment, twice: after the takeover and a restart, every write a FLUSH covered
    // reads back (asynchronous writes in flight at the kill may or may not be there).
    run(&["disk", "create", STORE, "v", "--size", "16M"]);
    let vsock = dir.join("v.sock");
    let mut state = VerifyState::new(4096, 0, (16 << 20) / 4096);
    let mut rng = Rng::new(29);
    for round in 0..3 {
        let log = format!("verify{round}.log");
        let _ = std::fs::remove_file(&vsock);
        let mut daemon = serve_disk(&dir, &conf, &log, "v");
        wait_for(&mut daemon, &vsock, &dir.join(&log));
        let stop_load = Arc::new(AtomicBool::new(false));
        let mut w = Workload::new(Pattern::RandRw);
        w.read_percent = 30;
        w.block_size = 4096;
        w.iodepth = 8;
        w.limit = Limit::Time(Duration::from_secs(30));
        w.verify = true;
        w.flush_every = 8;
        w.seed = rng.next_u64();
        w.timeout = Duration::from_secs(20);
        w.stop = Some(stop_load.clone());
        let (driver, device) = load::connect(&vsock, &w).expect("connect");
        let c = load::check_after_crash(&driver, &mut state, 16 << 10).expect("check");
        assert!(
            c.lost.is_empty(),
            "round {round}: {} block(s) lost a flushed write; first {}",
            c.lost.len(),
            c.lost[0]
        );
        eprintln!(
            "round {round}: {} blocks checked, {} with a flushed write, {} newer",
            c.checked, c.stable, c.newer
        );
        assert!(
            round == 0 || c.stable > 0,
            "round {round}: no flushed write was checked"
        );
        if round == 2 {
            drop(driver);
            stop(daemon);
            break;
        }
        let kill_after = Duration::from_millis(300 + rng.below(700));
        let loaded = std::thread::scope(|sc| {
            let (driver, device, w, state) = (&driver, &device, &w, &mut state);
            let h = sc.spawn(move || load::run(driver, device, w, Some(state)));
            std::thread::sleep(kill_after);
            daemon.kill().expect("kill -9");
            stop_load.store(true, Ordering::Relaxed);
            h.join().expect("the load thread")
        });
        daemon.wait().expect("reaped");
        if let Ok(r) = loaded {
            let bad = r.verify.as_ref().map_or(0, |v| v.corrupt.len());
            assert_eq!(bad, 0, "round {round}: live reads returned wrong data");
        }
        drop(driver);
        let out = run(&["store", "takeover", STORE]);
        assert!(out.contains("fenced"), "{out}");
    }
    let report = run(&["store", "check", STORE]);
    assert!(report.contains("result: consistent"), "{report}");
}
