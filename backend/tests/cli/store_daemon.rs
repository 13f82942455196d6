//! A real daemon serving a store directory (`DIR/st`, control socket `DIR/ctl.sock`, log in
//! `DIR/serve.log`), as the crash tests drive it: started with crash points armed, asked over
//! `dovetail ctl`, killed at a crash point, checked with `store check`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{ok, path};

/// Starts `dovetail serve --store DIR/st --control DIR/ctl.sock` (with `FAILPOINTS` set to
/// `failpoints`, if any) and waits until the control socket and every one of `sockets` exist.
pub fn start(dir: &Path, failpoints: Option<&str>, sockets: &[PathBuf]) -> Child {
    let _ = std::fs::remove_file(dir.join("ctl.sock"));
    let mut cmd = logged(dir);
    cmd.args(["serve", "--store", path(&dir.join("st"))])
        .args(["--control", path(&dir.join("ctl.sock"))]);
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
    }
    let mut child = cmd.spawn().expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("ctl.sock").exists() || sockets.iter().any(|s| !s.exists()) {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("the daemon exited at start ({st}):\n{}", log(dir));
        }
        assert!(Instant::now() < deadline, "no sockets:\n{}", log(dir));
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// `dovetail` with `RUST_LOG=info`, its log appended to `DIR/serve.log`.
fn logged(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
    cmd.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .expect("log"),
    );
    cmd
}

/// The last 40 lines of the daemon's log.
pub fn log(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs `dovetail ctl --control DIR/ctl.sock ARGS`.
pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["ctl", "--control", path(&dir.join("ctl.sock"))])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ctl")
}

/// Runs a `ctl` command that must succeed; returns its stdout.
pub fn ctl_ok(dir: &Path, args: &[&str]) -> String {
    let out = ctl(dir, args);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log(dir)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// SIGTERM; the daemon must exit 0.
pub fn terminate(mut child: Child) {
    // SAFETY: kill only sends a signal to the child process this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().expect("wait");
    assert!(st.success(), "serve exits 0 on SIGTERM ({st})");
}

/// `store check DIR/st` must find the store consistent.
pub fn store_check(dir: &Path, context: &str) {
    let report = ok(&["store", "check", path(&dir.join("st"))]);
    assert!(
        report.contains("result: consistent"),
        "{context}: {report}\n{}",
        log(dir)
    );
}

/// Waits (20 s at most) for the daemon to die at its armed crash point, which must kill it
/// with SIGKILL; `out` is what the `ctl` command that led there printed.
pub fn killed_at_crash_point(dir: &Path, child: &mut Child, out: &Output, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let st: ExitStatus = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: the crash point was not reached (ctl said {:?})\n{}",
            String::from_utf8_lossy(&out.stderr),
            log(dir)
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL),
        "{context}: the daemon died at the crash point"
    );
}

/// A running `dovetail` daemon logging to `DIR/serve.log` and asked over `DIR/ctl.sock`:
/// waited for, stopped with SIGTERM (it must exit 0), killed if the test ends first.
pub struct Daemon {
    /// The daemon's process; `None` once it has exited and been waited for.
    pub child: Option<Child>,
    pub dir: PathBuf,
}

impl Daemon {
    /// Runs `dovetail ARGS` (with `RUST_LOG=info`), appending its log to `DIR/serve.log`.
    pub fn spawn(dir: &Path, args: &[String]) -> Daemon {
        let child = logged(dir).args(args).spawn().expect("spawn serve");
        Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
        }
    }

    /// Waits (20 s at most) until every one of `files` exists; the daemon must not exit first.
    pub fn wait_for(&mut self, files: &[PathBuf]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !files.iter().all(|f| f.exists()) {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the daemon exited ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{files:?} never appeared:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// Runs `dovetail ctl --control DIR/ctl.sock ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.dir, args)
    }

    /// A `ctl` command that must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}{}\n--- log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// SIGTERM; the daemon must exit 0. Returns its log.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill only sends a signal to the child process this test spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = child.wait().expect("wait");
        let log = self.log();
        assert!(st.success(), "serve exits 0 on SIGTERM ({st}):\n{log}");
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
