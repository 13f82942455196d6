//! `dovetail serve` as a child process over a test directory, for the crash tests: the store in
//! `DIR/st`, disk `vd` on `DIR/vd.sock`, the control socket `DIR/ctl.sock`, every run's log
//! appended to `DIR/serve.log` under a `=== TAG: ... ===` line; and `dovetail ctl` against it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cli::path;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dovetail")
}

/// A seeded test's seed: `DOVETAIL_SEED`, or from the clock.
#[allow(dead_code)]
pub fn seed() -> u64 {
    match std::env::var("DOVETAIL_SEED") {
        Ok(s) => s.trim().parse().expect("DOVETAIL_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// Creates the store `DIR/st` on two tiers, `fast` and `slow` (files `DIR/fast.data` and
/// `DIR/slow.data`, `tier_size` each), and in it disk `vd` of `disk_size` with `layout`.
#[allow(dead_code)]
pub fn two_tier_store(
    dir: &Path,
    tier_size: &str,
    extent_size: &str,
    disk_size: &str,
    layout: &str,
) {
    let st = dir.join("st");
    crate::cli::ok(&[
        "store",
        "create",
        path(&st),
        "--tier",
        &format!("fast={}:{tier_size}", path(&dir.join("fast.data"))),
        "--tier",
        &format!("slow={}:{tier_size}", path(&dir.join("slow.data"))),
        "--extent-size",
        extent_size,
    ]);
    crate::cli::ok(&[
        "disk",
        "create",
        path(&st),
        "vd",
        "--size",
        disk_size,
        "--layout",
        layout,
    ]);
}

/// `dovetail store check DIR/st` on the stopped daemon's store: must find it consistent.
#[allow(dead_code)]
pub fn store_check(dir: &Path, context: &str) {
    let report = crate::cli::ok(&["store", "check", path(&dir.join("st"))]);
    assert!(
        report.contains("result: consistent"),
        "{context}: store check:\n{report}\n--- daemon log ---\n{}",
        log_tail(dir, 60)
    );
}

/// The last `n` lines of the daemons' log, for failure messages.
pub fn log_tail(dir: &Path, n: usize) -> String {
    let text = fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `dovetail ctl --control DIR/ctl.sock ARGS`.
pub fn ctl_output(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(["ctl", "--control", path(&dir.join("ctl.sock"))])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run dovetail ctl")
}

/// A `ctl` command that must succeed: its stdout.
pub fn ctl_ok(dir: &Path, args: &[&str]) -> String {
    let out = ctl_output(dir, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ctl {args:?} failed ({}): {stdout}{}\n--- daemon log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log_tail(dir, 40)
    );
    stdout
}

/// `--cache MODE` when `DOVETAIL_TEST_CACHE` is set (scripts/test.sh runs the crash suites
/// again with `none`: the store's tier files with direct I/O), else nothing (the default,
/// writeback).
pub fn test_cache_args() -> Vec<String> {
    match std::env::var("DOVETAIL_TEST_CACHE") {
        Ok(mode) => vec!["--cache".into(), mode],
        Err(_) => Vec::new(),
    }
}

/// `--seccomp trap --landlock` when `DOVETAIL_TEST_SANDBOX` is set (the crash suites under the
/// daemon's sandbox), else nothing.
pub fn test_sandbox_args() -> Vec<String> {
    match std::env::var_os("DOVETAIL_TEST_SANDBOX") {
        Some(_) => vec!["--seccomp".into(), "trap".into(), "--landlock".into()],
        None => Vec::new(),
    }
}

/// One run of `dovetail serve` over the test's store.
pub struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    tag: &'static str,
}

impl Daemon {
    /// Starts `dovetail serve` with `extra` arguments after the store, disk and control ones;
    /// returns once both sockets exist. `tag` names the test in the log, `what` this run.
    pub fn start(dir: &Path, tag: &'static str, what: &str, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(dir, tag, what, extra, &[])
    }

    /// [`Daemon::start`] with extra environment variables (e.g. `FAILPOINTS`).
    pub fn start_with_env(
        dir: &Path,
        tag: &'static str,
        what: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::try_start_with_env(dir, tag, what, extra, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Daemon::start_with_env`], but a daemon that exits before its sockets appear is an
    /// `Err` with its status and log (a crash point may kill it while it starts).
    pub fn try_start_with_env(
        dir: &Path,
        tag: &'static str,
        what: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        // A killed daemon leaves its sockets behind; the new one replaces them, but this
        // waits for them to appear, so remove them first.
        for s in ["ctl.sock", "vd.sock"] {
            let _ = fs::remove_file(dir.join(s));
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .expect("daemon log");
        writeln!(log, "=== {tag}: start ({what}) ===").expect("write log");
        let child = Command::new(bin())
            .args([
                "serve",
                "--store",
                path(&dir.join("st")),
                "--disk",
                &format!("vd={}", path(&dir.join("vd.sock"))),
                "--control",
                path(&dir.join("ctl.sock")),
            ])
            .args(extra)
            .args(test_cache_args())
            .args(test_sandbox_args())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dovetail serve");
        let mut d = Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
            tag,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(dir.join("ctl.sock").exists() && dir.join("vd.sock").exists()) {
            if let Some(st) = d.child_mut().try_wait().expect("try_wait") {
                d.child = None;
                return Err(format!(
                    "the daemon exited at start ({st}):\n{}",
                    log_tail(dir, 40)
                ));
            }
            assert!(
                Instant::now() < deadline,
                "the daemon's sockets never appeared:\n{}",
                log_tail(dir, 40)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the daemon runs")
    }

    fn signal(&mut self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child_mut().id()).expect("pid fits");
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet (the
        // pid cannot have been reused); it only sends a signal.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Whether the daemon has exited by itself (e.g. a crash point killed it): its status.
    #[allow(dead_code)]
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child_mut().try_wait().expect("try_wait")
    }

    /// Reaps a daemon that exited by itself ([`Daemon::exited`]), noting it in the log.
    #[allow(dead_code)]
    pub fn reap(mut self, why: &str) {
        let mut child = self.child.take().expect("the daemon ran");
        let st = child.wait().expect("wait for the daemon");
        self.not_stopped_by_seccomp(st);
        let mut log = OpenOptions::new()
            .append(true)
            .open(self.dir.join("serve.log"))
            .expect("daemon log");
        let _ = writeln!(log, "=== {}: {why} ===", self.tag);
    }

    /// SIGKILL, as a crash: nothing is flushed or closed.
    #[allow(dead_code)]
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let mut child = self.child.take().expect("the daemon runs");
        let st = child.wait().expect("wait for the killed daemon");
        self.not_stopped_by_seccomp(st);
        let mut log = OpenOptions::new()
            .append(true)
            .open(self.dir.join("serve.log"))
            .expect("daemon log");
        let _ = writeln!(log, "=== {}: SIGKILL ===", self.tag);
    }

    /// A daemon that died of SIGSYS made a system call its seccomp filter forbids (under
    /// `DOVETAIL_TEST_SANDBOX`): a failure, never to be taken for a crash point's kill.
    fn not_stopped_by_seccomp(&self, st: std::process::ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        assert_ne!(
            st.signal(),
            Some(libc::SIGSYS),
            "the daemon made a forbidden system call:\n{}",
            log_tail(&self.dir, 40)
        );
    }

    /// SIGTERM: the daemon must finish, flush and exit 0.
    pub fn terminate(mut self) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("the daemon runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within 30 s of SIGTERM:\n{}",
                    log_tail(&self.dir, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            st.success(),
            "the daemon exits 0 on SIGTERM, not {st}:\n{}",
            log_tail(&self.dir, 40)
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only reached when the test failed with the daemon running.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
