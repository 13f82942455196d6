//! What the control plane costs the disks it does not touch. `serve --control-nice N`: the
//! control plane's threads run N nice levels below the threads serving guests, and a disk
//! attached live (its serve loop started from a control thread, which a new thread inherits
//! its nice value from) still serves at the daemon's own priority: read off /proc as the
//! kernel sees each thread, with the seccomp filters on (a thread setting its priority must not
//! be killed by them). A disk created live is formatted in the commit that creates it.

mod cli;
mod common;

use std::path::Path;

use cli::store_daemon::Daemon;
use cli::{path, store_create};
use common::{pattern, Req, TestDriver};

/// A thread's name and nice value, from its stat file (field 19).
fn name_and_nice(stat: &str) -> (String, i32) {
    let close = stat.rfind(')').expect(")");
    let name = stat[stat.find('(').expect("(") + 1..close].to_string();
    let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // rest[0] is field 3 (state): field 19 (nice) is rest[16].
    (name, rest[16].parse().expect("nice"))
}

/// Each thread of `pid`: its name and nice value, the main thread's first.
fn threads(pid: u32) -> Vec<(String, i32)> {
    let main = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).expect("stat");
    let mut out = vec![name_and_nice(&main)];
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads") {
        let t = t.expect("a thread");
        if t.file_name().to_str() == Some(&pid.to_string()) {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) {
            out.push(name_and_nice(&stat)); // else it ended meanwhile
        }
    }
    out
}

/// This process's nice value, which the daemon starts with.
fn own_nice() -> i32 {
    // SAFETY: a plain system call about the calling thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// `ctl attach NAME --socket SOCK`, once the daemon installed its disk loops (its control
/// socket listens a moment before: `attach` is refused as not available until then).
fn attach(d: &Daemon, name: &str, sock: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = d.ctl(&["attach", name, "--socket", path(sock)]);
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains("cannot start serving disks while it runs")
                && std::time::Instant::now() < deadline,
            "attach {name}: {err}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A daemon serving disk vm1 attached live, a guest's write and FLUSH gone through it.
fn serving(dir: &Path, extra: &[&str]) -> Daemon {
    store_create(&dir.join("st"));
    let ctl = dir.join("ctl.sock");
    let mut args: Vec<String> = ["serve", "--store", path(&dir.join("st")), "--control"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(path(&ctl).to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut d = Daemon::spawn(dir, &args);
    d.wait_for(&[ctl]);
    d.ctl_ok(&["disk-create", "vm1", "--size", "16M"]);
    {
        // Formatted by the commit that created it: the attach below has no format to commit.
        let st = dovetail_store::Store::open_reader(&dir.join("st")).expect("open beside");
        let key = st.disk("vm1").expect("vm1").trusted;
        assert!(
            st.version(key).expect("version").root_len > 0,
            "vm1 is not formatted"
        );
    }
    let sock = dir.join("vm1.sock");
    attach(&d, "vm1", &sock);
    let driver = TestDriver::connect(&sock, 1, 4 << 20);
    let data = pattern(7, 64 * 1024);
    driver.submit(0, &Req::write(64, &data)).assert_ok(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    let c = driver.submit(0, &Req::read(64, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "read back differs from what was written");
    // The driver stays connected while the threads are looked at: its queue's workers live.
    std::mem::forget(driver);
    d
}

fn nice_of<'a>(ts: &'a [(String, i32)], name: &str) -> Vec<&'a i32> {
    ts.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn control_threads_run_below_the_threads_serving_a_disk_attached_live() {
    let t = tempfile::tempdir().expect("tempdir");
    let base = own_nice();
    let control = (base + 10).min(19);
    let d = serving(t.path(), &["--seccomp", "trap"]);
    let pid = d.child.as_ref().expect("running").id();
    let ts = threads(pid);
    let log = d.log();
    assert!(
        log.contains(&format!(
            "control threads at nice {control}, guest-serving threads at nice {base}"
        )),
        "{log}"
    );
    // The main thread and the control socket's accept loop: the control plane.
    assert_eq!(ts[0].1, control, "the main thread: {ts:?}");
    assert_eq!(nice_of(&ts, "control"), vec![&control], "{ts:?}");
    // The disk attached by a control thread: its serve loop and its queue's workers back up.
    assert_eq!(nice_of(&ts, "disk-vm1"), vec![&base], "{ts:?}");
    let workers = nice_of(&ts, "vring_worker");
    assert!(!workers.is_empty(), "no queue worker: {ts:?}");
    assert!(workers.iter().all(|&&n| n == base), "{ts:?}");
    // The layout's own threads (commits, extent reserve) serve the guest's writes too.
    let reserve: Vec<_> = ts
        .iter()
        .filter(|(n, _)| n.starts_with("reserve-"))
        .collect();
    assert!(!reserve.is_empty(), "no reserve thread: {ts:?}");
    assert!(reserve.iter().all(|(_, n)| *n == base), "{ts:?}");
    d.stop();
}

#[test]
fn control_nice_0_keeps_every_thread_at_the_daemons_priority() {
    let t = tempfile::tempdir().expect("tempdir");
    let base = own_nice();
    let d = serving(t.path(), &["--control-nice", "0"]);
    let pid = d.child.as_ref().expect("running").id();
    let ts = threads(pid);
    assert!(ts.iter().all(|(_, n)| *n == base), "{ts:?}");
    assert!(d.log().contains("--control-nice 0"), "{}", d.log());
    d.stop();
}

/// The catalog's extents of disk `name`'s trusted version, read beside the daemon.
fn extents(dir: &Path, name: &str) -> usize {
    let st = dovetail_store::Store::open_reader(&dir.join("st")).expect("open beside");
    let key = st.disk(name).expect("disk").trusted;
    st.version(key).expect("version").extents.len()
}

#[test]
fn a_disk_grants_extents_ahead_from_its_first_guest_on_and_not_before() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    store_create(&dir.join("st"));
    let ctl = dir.join("ctl.sock");
    let args: Vec<String> = [
        "serve",
        "--store",
        path(&dir.join("st")),
        "--control",
        path(&ctl),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut d = Daemon::spawn(dir, &args);
    d.wait_for(&[ctl]);
    // Attached and detached with no guest (a host's churn): no grant, nothing to free.
    d.ctl_ok(&["disk-create", "idle", "--size", "16M"]);
    let idle = dir.join("idle.sock");
    attach(&d, "idle", &idle);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(extents(dir, "idle"), 0, "granted with no guest");
    d.ctl_ok(&["detach", "idle"]);
    let out = d.ctl_ok(&["disk-delete", "idle"]);
    assert!(out.contains("(0 extents freed)"), "{out}");
    // A guest connects: the reserve grants before its first write.
    d.ctl_ok(&["disk-create", "vm1", "--size", "16M"]);
    let sock = dir.join("vm1.sock");
    attach(&d, "vm1", &sock);
    assert_eq!(extents(dir, "vm1"), 0);
    let driver = TestDriver::connect(&sock, 1, 4 << 20);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while extents(dir, "vm1") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no extent granted ahead after a guest connected:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let data = pattern(3, 4096);
    driver.submit(0, &Req::write(0, &data)).assert_ok(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    let c = driver.submit(0, &Req::read(0, 4096));
    c.assert_ok(4096);
    assert!(c.data == data, "read back differs");
    drop(driver);
    d.stop();
}
