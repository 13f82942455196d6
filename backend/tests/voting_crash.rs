//! kill -9 at the catalog commits of an N-version Tee's membership changes: the real `dovetail
//! serve` binary, built with its crash points (`--features dovetail-backend/failpoints`),
//! serves a disk teed to three members; a `ctl tee-add`, `tee-remove` or `promote` reaches its
//! crash point and the daemon dies there (SIGKILL, by itself). Then `dovetail store check`
//! finds the store consistent, and a daemon restarted with `--store DIR` alone serves the disk
//! through exactly the members the catalog records, with the data flushed before the crash.
//! The offline upgrade to format 7 is killed between its two steps and run again.

mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli::store_daemon::{ctl, ctl_ok, killed_at_crash_point, log, start, store_check, terminate};
use cli::{ok, path, store_create};
use common::{pattern, Req, TestDriver};
use serde_json::Value;

fn sock(dir: &Path) -> PathBuf {
    dir.join("vd.sock")
}

/// The voting Tee's members as `status` reports them: (version key, state).
fn members(dir: &Path) -> Vec<(u64, String)> {
    let status: Value =
        serde_json::from_str(ctl_ok(dir, &["--json", "status", "vd"]).trim()).expect("JSON");
    status["disks"][0]["voting"]["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no voting tee: {status}"))
        .iter()
        .map(|m| {
            (
                m["version"].as_u64().expect("version"),
                m["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

/// The catalog's members: trusted, candidate, then the others.
fn catalog(dir: &Path) -> Vec<u64> {
    let s = dovetail_store::Store::open_reader(&dir.join("st")).expect("open the store");
    let d = s.disk("vd").expect("disk");
    let mut v = vec![d.trusted.0];
    v.extend(d.candidate.map(|k| k.0));
    v.extend(s.members("vd").expect("members").iter().map(|m| m.key));
    v
}

/// Waits until every member is voting (filled).
fn wait_voting(dir: &Path) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = members(dir);
        if m.iter().all(|(_, s)| s == "voting") {
            return m.into_iter().map(|(k, _)| k).collect();
        }
        assert!(
            Instant::now() < deadline,
            "never filled: {m:?}\n{}",
            log(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const DATA_SECTOR: u64 = 64;

/// A format-7 store with disk vd attached and teed to two parallax-v1 candidates, filled,
/// holding flushed data; returns the data and the members.
fn setup(dir: &Path) -> (Vec<u8>, Vec<u64>) {
    let st = dir.join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "vd", "--size", "4M"]);
    ok(&["store", "upgrade", path(&st), "--voting"]);
    {
        let _ = std::fs::remove_file(dir.join("ctl.sock"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
        cmd.args(["serve", "--store", path(&st)])
            .args(["--control", path(&dir.join("ctl.sock"))])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("ctl.sock").exists() {
            assert!(Instant::now() < deadline, "no control socket");
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "serve exited"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ctl_ok(dir, &["attach", "vd", "--socket", path(&sock(dir))]);
        terminate(child);
    }
    let child = start(dir, None, &[sock(dir)]);
    ctl_ok(
        dir,
        &[
            "tee",
            "vd",
            "--candidate",
            "parallax-v1",
            "--candidate",
            "parallax-v1",
            "--policy",
            "sync-read-checks",
        ],
    );
    let data = pattern(27, 64 * 1024);
    {
        let driver = TestDriver::connect(&sock(dir), 1, 4 << 20);
        driver
            .submit(0, &Req::write(DATA_SECTOR, &data))
            .assert_ok(0);
        driver.submit(0, &Req::flush()).assert_ok(0);
    }
    let m = wait_voting(dir);
    assert_eq!(m.len(), 3);
    terminate(child);
    (data, m)
}

/// Restarts the daemon and checks that it serves the catalog's members and the data.
fn restart_and_check(dir: &Path, data: &[u8], context: &str) -> Vec<u64> {
    let want = catalog(dir);
    let child = start(dir, None, &[sock(dir)]);
    let got = wait_voting(dir);
    assert_eq!(got, want, "{context}: served = the catalog's members");
    let driver = TestDriver::connect(&sock(dir), 1, 4 << 20);
    let c = driver.submit(0, &Req::read(DATA_SECTOR, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "{context}: the flushed data");
    driver.submit(0, &Req::flush()).assert_ok(0);
    drop(driver);
    terminate(child);
    store_check(dir, context);
    got
}

#[test]
fn sigkill_at_each_membership_commit_restarts_with_the_catalogs_members() {
    common::init_logging();
    // (crash point, command, whether the change is committed when the daemon dies)
    let cases: &[(&str, &[&str], bool)] = &[
        (
            "store-member-added",
            &["tee-add", "vd", "--candidate", "parallax-v2"],
            true,
        ),
        (
            "store-member-remove",
            &["tee-remove", "vd", "MEMBER2"],
            false,
        ),
        (
            "promote-member",
            &["promote", "vd", "--member", "MEMBER2"],
            true,
        ),
    ];
    for &(point, verb, committed) in cases {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        let (data, before) = setup(dir);
        let context = format!("{} at {point}", verb[0]);
        let m2 = before[2].to_string();
        let args: Vec<&str> = verb
            .iter()
            .map(|a| if *a == "MEMBER2" { m2.as_str() } else { a })
            .collect();
        let mut child = start(dir, Some(&format!("{point}=return")), &[sock(dir)]);
        let out = ctl(dir, &args);
        killed_at_crash_point(dir, &mut child, &out, &context);
        assert!(!out.status.success(), "{context}: no reply after the crash");
        store_check(dir, &format!("{context}, after the crash"));
        let after = restart_and_check(dir, &data, &context);
        let expect: Vec<u64> = match (verb[0], committed) {
            ("tee-add", _) => {
                assert_eq!(after.len(), 4, "{context}: {after:?}");
                before.iter().copied().chain([after[3]]).collect()
            }
            ("tee-remove", false) => before.clone(),
            ("promote", true) => vec![before[2], before[1], before[0]],
            _ => unreachable!(),
        };
        assert_eq!(after, expect, "{context}");
    }
}

#[test]
fn sigkill_inside_the_upgrade_to_format_7_leaves_a_store_that_upgrades_again() {
    let t = tempfile::tempdir().expect("tempdir");
    let st = t.path().join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "vd", "--size", "4M"]);
    let out = Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["store", "upgrade", path(&st), "--voting"])
        .env("FAILPOINTS", "store-upgrade-members=return")
        .output()
        .expect("run");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL),
        "killed at the first step: {out:?}"
    );
    let version = |st: &Path| {
        dovetail_store::Store::open_reader(st)
            .expect("open")
            .info()
            .format_version
    };
    assert_eq!(version(&st), 6, "the first step (5 to 6) is done");
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
    let said = ok(&["store", "upgrade", path(&st), "--voting"]);
    assert!(said.contains("format version 7"), "{said}");
    assert_eq!(version(&st), 7);
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
}
