//! Panic boundaries, through the real daemon: a guest request whose layout call panics (the
//! crash point `parallax-write` armed with `fail`'s `panic` action, `FAILPOINTS`) is answered
//! IOERR, counted (`dovetail_request_panics_total`, `ctl status`), logged with its disk, queue
//! and sector, and reported in an event; the next request on the same queue succeeds and the
//! other disk is untouched. The third panic of a disk fails it: every read and write gets IOERR,
//! `ctl status` and `dovetail_disk_failed` say why, the other disk still serves.
//!
//! `cargo test -p dovetail-backend --features failpoints --test panics`

mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{ok, path, store_create};
use common::{pattern, Req, TestDriver, S_IOERR};
use serde_json::Value;

/// `dovetail serve --store DIR/st --disk a=... --disk b=... --control DIR/ctl.sock` with
/// `FAILPOINTS` set to `failpoints`, logging to `DIR/serve.log`.
struct Serving {
    child: Child,
    dir: PathBuf,
}

impl Serving {
    fn start(dir: &Path, failpoints: &str) -> Serving {
        Serving::start_with(dir, failpoints, &[])
    }

    /// [`Serving::start`] with more arguments for `serve`.
    fn start_with(dir: &Path, failpoints: &str, extra: &[&str]) -> Serving {
        let mut args = vec![
            "serve".to_string(),
            "--store".into(),
            path(&dir.join("st")).into(),
            "--control".into(),
            path(&dir.join("ctl.sock")).into(),
            "--queues".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        for d in ["a", "b"] {
            args.push("--disk".into());
            args.push(format!("{d}={}", path(&dir.join(format!("{d}.sock")))));
        }
        let child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(&args)
            .env("RUST_LOG", "info")
            .env("FAILPOINTS", failpoints)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log")).expect("log"))
            .spawn()
            .expect("spawn serve");
        let s = Serving {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for f in ["a.sock", "b.sock", "ctl.sock"] {
            while !dir.join(f).exists() {
                assert!(
                    Instant::now() < deadline,
                    "{f} never appeared:\n{}",
                    s.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(["ctl", "--control", path(&self.dir.join("ctl.sock"))])
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run dovetail ctl");
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}\n--- log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn disk_status(&self, name: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ctl(&["status", "--json"])).expect("json");
        v["disks"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no disk {name} in {v}"))
    }

    fn metric(&self, line_start: &str) -> Option<f64> {
        self.ctl(&["metrics"])
            .lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store `DIR/st` with parallax-v1 disks `a` and `b` of 16 MiB.
fn two_disks(dir: &Path) {
    let st = dir.join("st");
    store_create(&st);
    for d in ["a", "b"] {
        ok(&["disk", "create", path(&st), d, "--size", "16M"]);
    }
}

/// Disk `b` takes a write, a flush and a read back.
fn b_serves(dir: &Path, seed: u64) {
    let b = TestDriver::connect(&dir.join("b.sock"), 1, 4 << 20);
    let data = pattern(seed, 64 << 10);
    b.submit(0, &Req::write(128, &data)).assert_ok(0);
    b.submit(0, &Req::flush()).assert_ok(0);
    let c = b.submit(0, &Req::read(128, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "disk b reads back what it wrote");
}

#[test]
fn a_panicking_request_gets_ioerr_and_the_queue_carries_on() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir);
    // The first guest write of the daemon panics inside the layout (on a pool thread: parallax
    // is served through the queue's thread pool), after its data was written.
    let s = Serving::start(dir, "parallax-write=1*panic");
    let a = TestDriver::connect(&dir.join("a.sock"), 2, 4 << 20);
    let first = pattern(1, 8 << 10);
    let c = a.submit(0, &Req::write(64, &first));
    assert_eq!(c.status, Some(S_IOERR), "the panicking write gets IOERR");
    assert_eq!(c.used_len, 1);
    // The same queue serves the next requests; so does the other queue and the other disk.
    let data = pattern(2, 64 << 10);
    a.submit(0, &Req::write(256, &data)).assert_ok(0);
    a.submit(0, &Req::flush()).assert_ok(0);
    let r = a.submit(0, &Req::read(256, data.len() as u32));
    r.assert_ok(data.len() as u32);
    assert!(
        r.data == data,
        "queue 0 reads back what it wrote after the panic"
    );
    a.submit(1, &Req::write(64, &first)).assert_ok(0);
    let r = a.submit(1, &Req::read(64, first.len() as u32));
    r.assert_ok(first.len() as u32);
    assert!(
        r.data == first,
        "the block of the panicking write can be written again"
    );
    b_serves(dir, 3);

    let st = s.disk_status("a");
    assert_eq!(st["request_panics"], 1, "{st}");
    assert!(
        st.get("failed").is_none(),
        "one panic does not fail the disk: {st}"
    );
    assert_eq!(s.disk_status("b")["request_panics"], 0);
    assert_eq!(
        s.metric("dovetail_request_panics_total{disk=\"a\"} "),
        Some(1.0)
    );
    assert_eq!(
        s.metric("dovetail_request_panics_total{disk=\"b\"} "),
        Some(0.0)
    );
    assert_eq!(s.metric("dovetail_disk_failed{disk=\"a\"} "), Some(0.0));
    let log = s.log();
    assert!(
        log.contains("disk a: queue 0: write at sector 64 PANICKED"),
        "the log names the disk, queue and sector:\n{log}"
    );
    let events = s.ctl(&["events", "--json"]);
    assert!(
        events.contains("request-panicked"),
        "an event reports the panic:\n{events}"
    );
}

#[test]
fn on_the_one_at_a_time_engine_a_panicking_request_gets_ioerr_too() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir);
    // The layout's write runs on the queue's worker thread, inside `RequestWorker::begin`.
    let s = Serving::start_with(dir, "parallax-write=1*panic", &["--io-engine", "sync"]);
    let a = TestDriver::connect(&dir.join("a.sock"), 1, 4 << 20);
    let data = pattern(40, 8 << 10);
    let c = a.submit(0, &Req::write(32, &data));
    assert_eq!(c.status, Some(S_IOERR), "the panicking write gets IOERR");
    assert_eq!(c.used_len, 1);
    a.submit(0, &Req::write(32, &data)).assert_ok(0);
    a.submit(0, &Req::flush()).assert_ok(0);
    let r = a.submit(0, &Req::read(32, data.len() as u32));
    r.assert_ok(data.len() as u32);
    assert!(r.data == data);
    b_serves(dir, 41);
    assert_eq!(s.disk_status("a")["request_panics"], 1);
    let log = s.log();
    assert!(
        log.contains("disk a: queue 0: write at sector 32 PANICKED"),
        "{log}"
    );
}

#[test]
fn repeated_panics_fail_the_disk_and_spare_the_others() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir);
    let s = Serving::start(dir, "parallax-write=3*panic");
    let a = TestDriver::connect(&dir.join("a.sock"), 1, 4 << 20);
    let data = pattern(4, 4 << 10);
    for i in 0..3u64 {
        let c = a.submit(0, &Req::write(8 * i, &data));
        assert_eq!(c.status, Some(S_IOERR), "write {i} panics");
    }
    // Failed: the crash point is spent, yet reads, writes and flushes get IOERR.
    for req in [Req::write(512, &data), Req::read(512, 4096), Req::flush()] {
        let c = a.submit(0, &req);
        assert_eq!(c.status, Some(S_IOERR), "a failed disk serves no data");
    }
    b_serves(dir, 5);
    let st = s.disk_status("a");
    assert_eq!(st["request_panics"], 3, "{st}");
    let why = st["failed"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("3 requests panicked"), "{st}");
    assert!(s.disk_status("b").get("failed").is_none());
    assert_eq!(s.metric("dovetail_disk_failed{disk=\"a\"} "), Some(1.0));
    assert_eq!(s.metric("dovetail_disk_failed{disk=\"b\"} "), Some(0.0));
    let text = s.ctl(&["status"]);
    assert!(
        text.contains("disk a: FAILED: 3 requests panicked"),
        "ctl status says why:\n{text}"
    );
    let events = s.ctl(&["events", "--json"]);
    assert!(events.contains("disk-failed"), "{events}");
}

#[test]
fn a_panicking_control_request_is_an_error_reply_and_an_event() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir);
    let s = Serving::start(dir, "control-request=1*panic");
    let out = Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["ctl", "--control", path(&dir.join("ctl.sock")), "status"])
        .output()
        .expect("run dovetail ctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the panicking request fails");
    assert!(
        err.contains("status panicked") && err.contains("the daemon carries on"),
        "{err}"
    );
    // The daemon, its control socket and its disks carry on.
    let status = s.ctl(&["status"]);
    assert!(status.contains('a') && status.contains('b'), "{status}");
    b_serves(dir, 6);
    let events = s.ctl(&["events", "--json"]);
    assert!(events.contains("control-panicked"), "{events}");
}

#[test]
fn a_panicking_copy_out_ends_failed_and_reported_while_the_disk_serves() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    two_disks(dir);
    // Some data to copy, so the copy-out has batches.
    {
        let a = pattern(7, 1 << 20);
        let img = dir.join("a.img");
        std::fs::write(&img, &a).expect("image");
        ok(&[
            "disk",
            "import",
            path(&dir.join("st")),
            "a",
            "--from",
            path(&img),
        ]);
    }
    let s = Serving::start(dir, "copyout-batch=1*panic");
    s.ctl(&[
        "tee",
        "a",
        "--candidate",
        "parallax-v2",
        "--policy",
        "sync-cross-checks",
    ]);
    s.ctl(&["migrate", "a"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let progress = loop {
        let st = s.disk_status("a");
        let p = st["migration"]["copy_out"].clone();
        if p["state"] == "failed" {
            break p;
        }
        assert!(Instant::now() < deadline, "the copy-out never failed: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let why = progress["error"].as_str().unwrap_or_default();
    assert!(why.contains("panicked"), "{progress}");
    let events = s.ctl(&["events", "--json"]);
    assert!(events.contains("copy-out stopped: it panicked"), "{events}");
    // The disk serves through its Tee; the daemon answers.
    let a = TestDriver::connect(&dir.join("a.sock"), 1, 4 << 20);
    let data = pattern(8, 16 << 10);
    a.submit(0, &Req::write(0, &data)).assert_ok(0);
    a.submit(0, &Req::flush()).assert_ok(0);
    let r = a.submit(0, &Req::read(0, data.len() as u32));
    r.assert_ok(data.len() as u32);
    assert!(r.data == data);
    b_serves(dir, 9);
}
