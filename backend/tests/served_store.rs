//! A daemon serving a store, as an operator meets it through the real binaries: a damaged disk
//! among healthy ones (served apart, reported, reopened once repaired), a second frontend on a
//! busy disk socket, and the read-only commands (`disk list`, `store check`, ...) run while the
//! store is served.

mod cli;
mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cli::store_daemon::Daemon;
use cli::{dovetail, ok, path, store_create};
use common::{pattern, Req, TestDriver};
use serde_json::Value;

/// `dovetail serve --store DIR/st --disk NAME=DIR/NAME.sock ... [--control DIR/ctl.sock]`,
/// logging to `DIR/serve.log` (a fresh one).
fn spawn(dir: &Path, disks: &[&str], control: bool) -> Daemon {
    let mut args = vec![
        "serve".to_string(),
        "--store".into(),
        path(&dir.join("st")).into(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(format!("{d}={}", path(&dir.join(format!("{d}.sock")))));
    }
    if control {
        args.push("--control".into());
        args.push(path(&dir.join("ctl.sock")).into());
    }
    let _ = std::fs::remove_file(dir.join("serve.log"));
    Daemon::spawn(dir, &args)
}

/// Starts the daemon and waits for the control socket and each of `ready`'s sockets.
fn start(dir: &Path, disks: &[&str], ready: &[&str]) -> Daemon {
    let mut s = spawn(dir, disks, true);
    let mut wanted: Vec<PathBuf> = ready
        .iter()
        .map(|d| dir.join(format!("{d}.sock")))
        .collect();
    wanted.push(dir.join("ctl.sock"));
    s.wait_for(&wanted);
    s
}

/// A store `DIR/st` with parallax-v1 disks `a` and `b` of 16 MiB; `b` holds `data` (imported).
fn two_disks(dir: &Path, data: &[u8]) {
    let st = dir.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);
    ok(&["disk", "create", path(&st), "b", "--size", "16M"]);
    let img = dir.join("b.img");
    std::fs::write(&img, data).expect("image");
    ok(&["disk", "import", path(&st), "b", "--from", path(&img)]);
}

/// Damages every tree node of disk `name`'s trusted version (one byte inside each, so its
/// checksum fails); returns what to write back to repair it: (offset in data.0, bytes).
fn damage_tree(dir: &Path, name: &str) -> Vec<(u64, Vec<u8>)> {
    let st = dir.join("st");
    let (extents, extent_size) = {
        let store = dovetail_store::Store::open_reader(&st).expect("open store");
        let key = store.disk(name).expect("disk").trusted;
        let v = store.version(key).expect("version");
        (v.extents, store.info().extent_size)
    };
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(st.join("data.0"))
        .expect("data.0");
    let mut saved = Vec::new();
    let mut magic = [0u8; 8];
    for e in extents {
        let base = u64::from(e.0) * extent_size;
        for off in (base..base + extent_size).step_by(4096) {
            data.read_exact_at(&mut magic, off).expect("read");
            if &magic == b"DVPXNODE" {
                let mut old = vec![0u8; 8];
                data.read_exact_at(&mut old, off + 100).expect("read");
                let bad: Vec<u8> = old.iter().map(|b| !b).collect();
                data.write_all_at(&bad, off + 100).expect("damage");
                saved.push((off + 100, old));
            }
        }
    }
    assert!(!saved.is_empty(), "disk {name} has tree nodes to damage");
    data.sync_all().expect("sync");
    saved
}

fn repair(dir: &Path, saved: &[(u64, Vec<u8>)]) {
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("st").join("data.0"))
        .expect("data.0");
    for (off, bytes) in saved {
        data.write_all_at(bytes, *off).expect("repair");
    }
    data.sync_all().expect("sync");
}

/// Writes a pattern through a frontend and reads it back.
fn io_works(socket: &Path, seed: u64) {
    let driver = TestDriver::connect(socket, 1, 4 << 20);
    let data = pattern(seed, 64 * 1024);
    driver.submit(0, &Req::write(64, &data)).assert_ok(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    let c = driver.submit(0, &Req::read(64, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "read back differs from what was written");
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_damaged_disk_is_reported_and_reopened_while_the_others_serve() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let data = pattern(7, 1 << 20);
    two_disks(dir, &data);
    let saved = damage_tree(dir, "b");

    let s = start(dir, &["a", "b"], &["a"]);
    // The healthy disk serves; the damaged one's socket does not listen.
    io_works(&dir.join("a.sock"), 1);
    assert!(!dir.join("b.sock").exists(), "a failed disk has no socket");

    let log = s.log();
    assert!(
        log.contains("disk b: cannot open it, so it is not served") && log.contains("checksum"),
        "{log}"
    );
    let status = s.ctl_ok(&["status"]);
    assert!(
        status.contains("disk b: FAILED, not served") && status.contains("checksum"),
        "{status}"
    );
    assert!(status.contains("ctl reopen b"), "{status}");
    let json: Value = serde_json::from_str(&s.ctl_ok(&["status", "--json"])).expect("json");
    assert_eq!(json["disks"].as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json["disks"][0]["name"], "a", "{json}");
    assert_eq!(json["failed"][0]["name"], "b", "{json}");
    assert_eq!(json["failed"][0]["attempts"], 1, "{json}");
    assert!(
        json["failed"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("checksum")),
        "{json}"
    );
    let one: Value = serde_json::from_str(&s.ctl_ok(&["status", "b", "--json"])).expect("json");
    assert_eq!(one["failed"][0]["name"], "b", "{one}");
    let metrics = s.ctl_ok(&["metrics"]);
    assert_eq!(
        metric(&metrics, "dovetail_disk_failed{disk=\"b\"} "),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "dovetail_disk_failed{disk=\"a\"} "),
        Some(0.0),
        "{metrics}"
    );
    let events = s.ctl_ok(&["events"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains(" b ") && l.contains("disk-failed")),
        "{events}"
    );
    // Commands on the failed disk say why it is not there.
    let out = s.ctl(&["snapshots", "b"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disk-failed") && err.contains("reopen"),
        "{err}"
    );

    // Reopening before the repair fails again and counts the attempt.
    let out = s.ctl(&["reopen", "b"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still cannot open it"), "{err}");
    let json: Value = serde_json::from_str(&s.ctl_ok(&["status", "--json"])).expect("json");
    assert_eq!(json["failed"][0]["attempts"], 2, "{json}");
    // Reopening a served disk is refused.
    let out = s.ctl(&["reopen", "a"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("served already"));

    // Repaired, it reopens and serves what was imported, while `a` keeps serving.
    repair(dir, &saved);
    let reopened = s.ctl_ok(&["reopen", "b"]);
    assert!(reopened.contains("disk b: reopened"), "{reopened}");
    assert!(dir.join("b.sock").exists(), "the reopened disk listens");
    {
        let driver = TestDriver::connect(&dir.join("b.sock"), 1, 4 << 20);
        let c = driver.submit(0, &Req::read(0, data.len() as u32));
        c.assert_ok(data.len() as u32);
        assert!(c.data == data, "the reopened disk serves its data");
    }
    io_works(&dir.join("b.sock"), 2);
    io_works(&dir.join("a.sock"), 3);
    let json: Value = serde_json::from_str(&s.ctl_ok(&["status", "--json"])).expect("json");
    assert_eq!(json["disks"].as_array().map(Vec::len), Some(2), "{json}");
    assert_eq!(json["failed"].as_array().map(Vec::len), Some(0), "{json}");
    let metrics = s.ctl_ok(&["metrics"]);
    assert_eq!(
        metric(&metrics, "dovetail_disk_failed{disk=\"b\"} "),
        Some(0.0),
        "{metrics}"
    );
    assert!(s.ctl_ok(&["events"]).contains("disk-reopened"));
    let log = s.stop();
    assert!(log.contains("disk b: reopened"), "{log}");
    assert!(
        !dir.join("b.sock").exists(),
        "the socket is removed at shutdown"
    );

    // Both open at the next start; the data written through each is there.
    let s = start(dir, &["a", "b"], &["a", "b"]);
    let json: Value = serde_json::from_str(&s.ctl_ok(&["status", "--json"])).expect("json");
    assert_eq!(json["failed"].as_array().map(Vec::len), Some(0), "{json}");
    s.stop();
    let report = ok(&["store", "check", path(&dir.join("st"))]);
    assert!(report.contains("result: consistent"), "{report}");
}

#[test]
fn when_every_disk_fails_the_control_socket_still_serves_else_serve_exits_1() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir, &pattern(9, 256 * 1024));
    let saved = damage_tree(dir, "b");

    // No control socket: nothing could ever be served, so serve stops with the disk's error.
    let mut s = spawn(dir, &["b"], false);
    let child = s.child.as_mut().expect("child");
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    s.child = None;
    assert_eq!(st.code(), Some(1), "{}", s.log());
    assert!(s.log().contains("checksum"), "{}", s.log());

    // With a control socket it keeps running, so that the disk can be reopened once repaired.
    let s = start(dir, &["b"], &[]);
    let status = s.ctl_ok(&["status"]);
    assert!(status.contains("disk b: FAILED"), "{status}");
    repair(dir, &saved);
    s.ctl_ok(&["reopen", "b"]);
    io_works(&dir.join("b.sock"), 4);
    s.stop();
}

#[test]
fn a_second_frontend_on_a_busy_disk_is_refused_at_once() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir, &pattern(3, 64 * 1024));
    let s = start(dir, &["a"], &["a"]);
    let sock = dir.join("a.sock");
    let first = TestDriver::connect(&sock, 1, 4 << 20);
    let data = pattern(11, 32 * 1024);
    first.submit(0, &Req::write(8, &data)).assert_ok(0);

    // The second frontend's setup fails quickly (the daemon closes its connection) instead of
    // hanging until the first leaves.
    let started = Instant::now();
    let second = dovetail_bench::driver::Driver::connect(
        &sock,
        dovetail_bench::driver::DriverOptions::new(1, 4 << 20),
    );
    let took = started.elapsed();
    assert!(second.is_err(), "a second frontend must be refused");
    eprintln!("the second frontend was refused after {took:?}");
    assert!(took < Duration::from_secs(3), "refused after {took:?}");

    // The first frontend's I/O is unaffected.
    let c = first.submit(0, &Req::read(8, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data);
    let json: Value = serde_json::from_str(&s.ctl_ok(&["status", "a", "--json"])).expect("json");
    assert!(
        json["disks"][0]["refused_connections"].as_u64() >= Some(1),
        "{json}"
    );
    assert!(s
        .ctl_ok(&["metrics"])
        .contains("dovetail_guest_refused_total{disk=\"a\"} "));
    let log = s.log();
    assert!(
        log.contains("disk a: refused a connection from another frontend")
            && log.contains("already connected"),
        "{log}"
    );

    // Once the first leaves, a new frontend gets the disk.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let json: Value =
            serde_json::from_str(&s.ctl_ok(&["status", "a", "--json"])).expect("json");
        if json["disks"][0]["guest_connected"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the first guest never left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = TestDriver::connect(&sock, 1, 4 << 20);
    let c = again.submit(0, &Req::read(8, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data);
    drop(again);
    s.stop();
}

#[test]
fn read_only_commands_work_on_a_served_store_and_check_stays_truthful() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir, &pattern(5, 512 * 1024));
    let st = dir.join("st");
    ok(&["disk", "snapshot", path(&st), "b", "--name", "before"]);
    let s = start(dir, &["a", "b"], &["a", "b"]);

    // What the README shows right after `serve`.
    let list = ok(&["disk", "list", path(&st)]);
    assert!(list.contains('a') && list.contains('b'), "{list}");
    let snaps = ok(&["disk", "snapshots", path(&st), "b"]);
    assert!(snaps.contains("before"), "{snaps}");
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
    assert!(
        report.contains("in use by another process (a daemon serving it)"),
        "{report}"
    );
    assert!(!report.contains("no layout-level check"), "{report}");

    // A guest writing and flushing all the time: every check is either consistent or says
    // what it could not check, never a violation.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let done = std::sync::Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = stop.clone();
        let done = done.clone();
        let sock = dir.join("a.sock");
        std::thread::spawn(move || {
            let driver = TestDriver::connect(&sock, 1, 4 << 20);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = pattern(i, 4096);
                driver
                    .submit(0, &Req::write((i * 8 * 37) % (16 << 11), &data))
                    .assert_ok(0);
                driver.submit(0, &Req::flush()).assert_ok(0);
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
            i
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.load(Ordering::Relaxed) < 20 {
        assert!(
            Instant::now() < deadline,
            "the guest's writes never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut checked = 0;
    for _ in 0..5 {
        let out = dovetail(&["store", "check", path(&st)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stdout.contains("VIOLATION"),
            "a false violation:\n{stdout}"
        );
        if out.status.success() {
            assert!(stdout.contains("result: consistent"), "{stdout}");
            checked += 1;
        } else {
            assert!(
                stdout.contains("NOT CHECKED")
                    && stderr.contains("not everything could be checked"),
                "{stdout}{stderr}"
            );
        }
        let list = ok(&["disk", "list", path(&st)]);
        assert!(list.contains('a'), "{list}");
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    assert!(writes > 0);
    eprintln!("{checked} of 5 checks under {writes} flushed writes were complete");

    // A real inconsistency is still found while the store is served: a damaged tree node of
    // the disk that is not written (b's snapshot keeps its nodes).
    s.stop();
    let s = start(dir, &["a"], &["a"]);
    let saved = damage_tree(dir, "b");
    let out = dovetail(&["store", "check", path(&st)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("VIOLATION") && stdout.contains("checksum mismatch"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not consistent"), "{stderr}");
    repair(dir, &saved);
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
    s.stop();
}

#[test]
fn tee_defaults_to_a_candidate_the_disk_can_migrate_to_and_refuses_one_it_cannot() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let st = dir.join("st");
    store_create(&st);
    ok(&[
        "disk",
        "create",
        path(&st),
        "a",
        "--size",
        "16M",
        "--layout",
        "parallax-v2",
    ]);
    ok(&["disk", "create", path(&st), "b", "--size", "16M"]);

    // Offline: no upgrade leads from parallax-v2 to parallax-v1: refused, naming the way.
    let out = dovetail(&[
        "disk",
        "tee",
        path(&st),
        "a",
        "--candidate",
        "parallax-v1",
        "--policy",
        "mirror-only",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no known upgrade from its trusted layout parallax-v2 to a parallax-v1")
            && err.contains("possible candidates: parallax-v2"),
        "{err}"
    );
    assert!(
        !ok(&["disk", "list", path(&st)]).contains("mirror-only"),
        "nothing was attached"
    );
    // The default is the disk's own layout.
    ok(&["disk", "tee", path(&st), "a", "--policy", "mirror-only"]);
    // Without --candidate, a second tee changes the policy of the candidate attached.
    ok(&[
        "disk",
        "tee",
        path(&st),
        "a",
        "--policy",
        "sync-cross-checks",
    ]);
    ok(&["disk", "untee", path(&st), "a"]);
    // parallax-v1 disks may still go to parallax-v2.
    ok(&[
        "disk",
        "tee",
        path(&st),
        "b",
        "--candidate",
        "parallax-v2",
        "--policy",
        "mirror-only",
    ]);
    ok(&["disk", "untee", path(&st), "b"]);

    // Live: the same through the daemon.
    let s = start(dir, &["a", "b"], &["a", "b"]);
    let out = s.ctl(&[
        "tee",
        "a",
        "--candidate",
        "parallax-v1",
        "--policy",
        "mirror-only",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no known upgrade") && err.contains("possible candidates: parallax-v2"),
        "{err}"
    );
    s.ctl_ok(&["tee", "a", "--policy", "mirror-only"]);
    s.ctl_ok(&["tee", "b", "--policy", "mirror-only"]);
    let json: Value = serde_json::from_str(&s.ctl_ok(&["status", "--json"])).expect("json");
    let layout_of = |name: &str| {
        json["disks"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == name))
            .map(|d| d["candidate"]["layout"].clone())
    };
    assert_eq!(layout_of("a"), Some(Value::from("parallax-v2")), "{json}");
    assert_eq!(layout_of("b"), Some(Value::from("parallax-v1")), "{json}");
    // The default candidate migrates (the dead end was a candidate no upgrade leads to).
    let done = s.ctl_ok(&["migrate", "a", "--rate", "0", "--wait"]);
    assert!(done.contains("copy-out done"), "{done}");
    s.ctl_ok(&["untee", "a"]);
    s.ctl_ok(&["untee", "b"]);
    // deploy: per disk, by default its own layout; a layout a disk cannot reach skips it.
    let out = s.ctl_ok(&[
        "deploy",
        "--layout",
        "parallax-v1",
        "--policy",
        "mirror-only",
        "--disks",
        "a,b",
        "--json",
    ]);
    let r: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(r["deployed"][0]["disk"], "b", "{r}");
    assert_eq!(r["skipped"][0]["disk"], "a", "{r}");
    assert!(
        r["skipped"][0]["reason"]
            .as_str()
            .is_some_and(|m| m.contains("no known upgrade")),
        "{r}"
    );
    s.stop();
}
