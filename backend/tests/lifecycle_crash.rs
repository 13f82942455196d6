//! kill -9 at each step of each life-cycle verb: the real `dovetail serve` binary, built with
//! its crash points (`--features dovetail-backend/failpoints`), is started over a store with
//! disks attached, one crash point armed; a `ctl disk-create`, `attach`, `detach` or
//! `disk-delete` reaches the point and the daemon dies there (SIGKILL, by itself). Then
//! `dovetail store check` finds the store consistent, and a daemon restarted with `--store DIR`
//! alone serves exactly the disks the catalog says are attached, each on its socket, with the
//! data flushed before the crash.

mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cli::store_daemon::{ctl, ctl_ok, killed_at_crash_point, start, store_check, terminate};
use cli::{ok, path, store_create};
use common::{pattern, Req, TestDriver};
use serde_json::Value;

fn sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The catalog's attachments, by name.
fn attached(dir: &Path) -> Vec<String> {
    dovetail_store::Store::open_reader(&dir.join("st"))
        .expect("open the store")
        .attachments()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

const DATA_SECTOR: u64 = 128;

/// A store with disks `keep` and `old` attached (`keep` holding flushed data), `new` and
/// `gone` created but not attached; returns `keep`'s data.
fn setup(dir: &Path) -> Vec<u8> {
    let st = dir.join("st");
    store_create(&st);
    for d in ["keep", "old", "new", "gone"] {
        ok(&["disk", "create", path(&st), d, "--size", "16M"]);
    }
    let child = start(dir, None, &[]);
    for d in ["keep", "old"] {
        ctl_ok(dir, &["attach", d, "--socket", path(&sock(dir, d))]);
    }
    let data = pattern(17, 64 * 1024);
    {
        let driver = TestDriver::connect(&sock(dir, "keep"), 1, 4 << 20);
        driver
            .submit(0, &Req::write(DATA_SECTOR, &data))
            .assert_ok(0);
        driver.submit(0, &Req::flush()).assert_ok(0);
    }
    terminate(child);
    data
}

/// Restarts the daemon with `--store` alone and checks it serves what the catalog says.
fn restart_and_check(dir: &Path, data: &[u8], context: &str) {
    let want = attached(dir);
    let child = start(dir, None, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !want.iter().all(|d| sock(dir, d).exists()) {
        assert!(
            Instant::now() < deadline,
            "{context}: sockets of {want:?} never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status: Value =
        serde_json::from_str(ctl_ok(dir, &["--json", "status"]).trim()).expect("JSON");
    let mut served: Vec<String> = status["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["name"].as_str().expect("name").to_string())
        .collect();
    served.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(
        served, want_sorted,
        "{context}: served = the catalog's attachments"
    );
    assert_eq!(status["failed"], Value::Array(Vec::new()), "{context}");
    assert!(
        want.contains(&"keep".to_string()),
        "{context}: keep stays attached"
    );
    let driver = TestDriver::connect(&sock(dir, "keep"), 1, 4 << 20);
    let c = driver.submit(0, &Req::read(DATA_SECTOR, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "{context}: keep's flushed data");
    drop(driver);
    for d in want.iter().filter(|d| *d != "keep") {
        let driver = TestDriver::connect(&sock(dir, d), 1, 4 << 20);
        driver.submit(0, &Req::flush()).assert_ok(0);
    }
    terminate(child);
    store_check(dir, context);
}

#[test]
fn sigkill_at_each_step_of_each_lifecycle_verb_restarts_to_the_catalogs_disks() {
    let commits = ["store-commit-unsynced", "store-commit-synced"];
    let mut cases: Vec<(&str, Vec<String>)> = Vec::new();
    for p in commits.iter().chain(&["disk-create-done"]) {
        cases.push((
            p,
            vec![
                "disk-create".into(),
                "fresh".into(),
                "--size".into(),
                "16M".into(),
            ],
        ));
    }
    for p in commits.iter().chain(&[
        "store-set-attachment",
        "attach-recorded",
        "attach-listening",
    ]) {
        cases.push((
            p,
            vec![
                "attach".into(),
                "new".into(),
                "--socket".into(),
                "NEW".into(),
            ],
        ));
    }
    for p in commits
        .iter()
        .chain(&["store-set-attachment", "detach-recorded"])
    {
        cases.push((p, vec!["detach".into(), "old".into()]));
    }
    for p in commits {
        cases.push((p, vec!["disk-delete".into(), "gone".into()]));
    }
    for (point, verb) in cases {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        let context = format!("{} at {point}", verb[0]);
        let data = setup(dir);
        let new_sock = sock(dir, "new");
        let verb: Vec<String> = verb
            .into_iter()
            .map(|a| {
                if a == "NEW" {
                    path(&new_sock).to_string()
                } else {
                    a
                }
            })
            .collect();
        let args: Vec<&str> = verb.iter().map(String::as_str).collect();
        let mut child = start(dir, Some(&format!("{point}=return")), &[]);
        let out = ctl(dir, &args);
        killed_at_crash_point(dir, &mut child, &out, &context);
        assert!(!out.status.success(), "{context}: no reply after the crash");
        store_check(dir, &format!("{context}, after the crash"));
        restart_and_check(dir, &data, &context);
    }
}

/// A command sent while the daemon is still starting (its control socket already connectable)
/// waits for the start to finish and is carried out, never refused for being early: the
/// daemon is held at `serve-control-held` for a second, between binding the socket and
/// installing what `attach` needs.
#[test]
fn a_command_sent_during_the_start_waits_and_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "early", "--size", "16M"]);
    let child = start(dir.path(), Some("serve-control-held=sleep(1000)"), &[]);
    let t = Instant::now();
    let out = ctl(
        dir.path(),
        &[
            "attach",
            "early",
            "--socket",
            path(&sock(dir.path(), "early")),
        ],
    );
    assert!(
        out.status.success(),
        "attach during the start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "the attach was answered after {:?}: the daemon was not held at the point",
        t.elapsed()
    );
    let driver = TestDriver::connect(&sock(dir.path(), "early"), 1, 1 << 20);
    let data = pattern(3, 4096);
    driver.submit(0, &Req::write(0, &data)).assert_ok(0);
    terminate(child);
}
