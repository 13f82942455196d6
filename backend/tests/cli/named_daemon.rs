//! A real `dovetail serve` daemon among several on one store, as the shared-store and RADOS
//! tests drive them: named `NAME`, it serves each disk `D` on `DIR/NAME-D.sock`, is asked over
//! `DIR/NAME-ctl.sock` and logs (`RUST_LOG=info`) to `DIR/NAME.log`; waited for (it must not
//! exit first), signalled, killed with SIGKILL or stopped with SIGTERM (it must exit 0), and
//! killed if the test ends first.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{dovetail, ok, path};

/// What to start: `dovetail serve --store STORE [--shared-store] EXTRA [--ceph-conf CONF
/// --ceph-id admin] --disk D=SOCK... --control CTL`, with `ENV` set.
pub struct Builder {
    store: String,
    shared: bool,
    ceph_conf: Option<PathBuf>,
    disks: Vec<(String, PathBuf)>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    ctl: PathBuf,
    log: PathBuf,
    dir: PathBuf,
    name: String,
    timeout: Duration,
}

impl Builder {
    /// Daemon `name` on `store` (a store directory's path or `rados:POOL/NAME`), its sockets
    /// and log in `dir`; waits take 20 s at most.
    pub fn new(dir: &Path, store: &str, name: &str) -> Builder {
        Builder {
            store: store.to_string(),
            shared: false,
            ceph_conf: None,
            disks: Vec::new(),
            extra: Vec::new(),
            env: Vec::new(),
            ctl: dir.join(format!("{name}-ctl.sock")),
            log: dir.join(format!("{name}.log")),
            dir: dir.to_path_buf(),
            name: name.to_string(),
            timeout: Duration::from_secs(20),
        }
    }

    /// `--shared-store`.
    pub fn shared(mut self) -> Builder {
        self.shared = true;
        self
    }

    /// `--ceph-conf CONF --ceph-id admin`.
    pub fn ceph(mut self, conf: &Path) -> Builder {
        self.ceph_conf = Some(conf.to_path_buf());
        self
    }

    /// Serves each of `disks` on `DIR/NAME-D.sock`.
    pub fn disks(mut self, disks: &[&str]) -> Builder {
        for d in disks {
            let sock = self.dir.join(format!("{}-{d}.sock", self.name));
            self.disks.push((d.to_string(), sock));
        }
        self
    }

    /// Serves `disk` on `sock`.
    pub fn disk_at(mut self, disk: &str, sock: &Path) -> Builder {
        self.disks.push((disk.to_string(), sock.to_path_buf()));
        self
    }

    /// The control socket at `ctl` instead of `DIR/NAME-ctl.sock`.
    pub fn control(mut self, ctl: &Path) -> Builder {
        self.ctl = ctl.to_path_buf();
        self
    }

    /// The log at `log` instead of `DIR/NAME.log`.
    pub fn log(mut self, log: &Path) -> Builder {
        self.log = log.to_path_buf();
        self
    }

    /// More arguments, after `--store` (and `--shared-store`).
    pub fn args(mut self, extra: &[&str]) -> Builder {
        self.extra.extend(extra.iter().map(|a| a.to_string()));
        self
    }

    /// `KEY=VALUE` in the daemon's environment.
    pub fn env(mut self, key: &str, value: &str) -> Builder {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// How long each wait on the daemon may take.
    pub fn timeout(mut self, timeout: Duration) -> Builder {
        self.timeout = timeout;
        self
    }

    /// Spawns the daemon (its log file truncated) and waits for its control socket.
    pub fn start(self) -> NamedDaemon {
        let ctl = self.ctl.clone();
        let mut d = self.spawn();
        d.wait_for(&ctl);
        d
    }

    /// Spawns the daemon, first removing stale sockets, and waits for its control socket and
    /// every disk's socket.
    pub fn start_serving(self) -> NamedDaemon {
        let mut files: Vec<PathBuf> = self.disks.iter().map(|(_, s)| s.clone()).collect();
        files.push(self.ctl.clone());
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
        let mut d = self.spawn();
        d.wait_for_all(&files);
        d
    }

    fn spawn(self) -> NamedDaemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
        cmd.args(["serve", "--store", &self.store]);
        if self.shared {
            cmd.arg("--shared-store");
        }
        cmd.args(&self.extra);
        if let Some(conf) = &self.ceph_conf {
            cmd.args(["--ceph-conf", path(conf), "--ceph-id", "admin"]);
        }
        for (d, sock) in &self.disks {
            cmd.arg("--disk").arg(format!("{d}={}", path(sock)));
        }
        cmd.args(["--control", path(&self.ctl)])
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).expect("log"));
        let child = cmd.spawn().expect("spawn serve");
        NamedDaemon {
            pid: child.id(),
            child,
            ended: None,
            ctl: self.ctl,
            log: self.log,
            timeout: self.timeout,
        }
    }
}

/// A running daemon started by [`Builder`].
pub struct NamedDaemon {
    child: Child,
    pid: u32,
    /// How it ended, once waited for.
    ended: Option<ExitStatus>,
    pub ctl: PathBuf,
    log: PathBuf,
    timeout: Duration,
}

impl NamedDaemon {
    /// The daemon's process id (also once it has ended).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until `file` exists; the daemon must not exit first.
    pub fn wait_for(&mut self, file: &Path) {
        self.wait_for_all(&[file.to_path_buf()]);
    }

    /// Waits until every one of `files` exists; the daemon must not exit first.
    pub fn wait_for_all(&mut self, files: &[PathBuf]) {
        let deadline = Instant::now() + self.timeout;
        while !files.iter().all(|f| f.exists()) {
            if let Some(st) = self.try_wait() {
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

    /// How the daemon ended, if it has.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.ended.is_none() {
            self.ended = self.child.try_wait().expect("try_wait");
        }
        self.ended
    }

    /// Waits for the daemon to end.
    pub fn wait(&mut self) -> ExitStatus {
        if self.ended.is_none() {
            self.ended = Some(self.child.wait().expect("wait"));
        }
        self.ended.expect("ended")
    }

    /// Sends `signal` (SIGSTOP, SIGCONT...) to the running daemon.
    pub fn signal(&self, signal: i32) {
        assert!(self.ended.is_none(), "signal to a daemon that has ended");
        // SAFETY: kill only sends a signal to the child process this test spawned, which has
        // not been reaped (so its pid is not reused).
        unsafe { libc::kill(self.pid as i32, signal) };
    }

    /// SIGKILL, and waits for it to end.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        let st = self.wait();
        assert_eq!(st.signal(), Some(libc::SIGKILL), "killed with SIGKILL");
    }

    /// SIGTERM; the daemon must exit 0. Returns its log.
    pub fn terminate(mut self) -> String {
        self.signal(libc::SIGTERM);
        let st = self.wait();
        let log = self.log();
        assert!(st.success(), "serve exits 0 on SIGTERM ({st}):\n{log}");
        log
    }

    /// The daemon's whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `dovetail ctl --control CTL ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        dovetail(&[&["ctl", "--control", path(&self.ctl)], args].concat())
    }

    /// A `ctl` command that must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        ok(&[&["ctl", "--control", path(&self.ctl)], args].concat())
    }

    /// A `ctl --json` command that must succeed: the last JSON line it printed.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let out = self.ctl_ok(&[&["--json"], args].concat());
        let last = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .expect("ctl printed a reply");
        serde_json::from_str(last).expect("ctl --json prints JSON")
    }

    /// `ctl --json status`, as printed.
    pub fn status(&self) -> String {
        self.ctl_ok(&["--json", "status"])
    }

    /// Asks `ctl --json status` every `poll` until `until` holds of it (`timeout` at most: then
    /// fails saying `context` and the last status).
    pub fn wait_status(
        &self,
        timeout: Duration,
        poll: Duration,
        until: impl Fn(&str) -> bool,
        context: &str,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status();
            if until(&st) {
                return;
            }
            assert!(Instant::now() < deadline, "{context}: {st}");
            std::thread::sleep(poll);
        }
    }
}

impl Drop for NamedDaemon {
    fn drop(&mut self) {
        if self.ended.is_none() {
            // A stopped daemon is resumed so that it dies at once.
            self.signal(libc::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `dovetail ARGS --ceph-conf CONF`, which must succeed; returns its stdout.
pub fn ok_ceph(conf: &Path, args: &[&str]) -> String {
    ok(&[args, &["--ceph-conf", path(conf)]].concat())
}

/// `store create STORE --size SIZE --extent-size 4M`, then `disk create STORE D --size 16M` for
/// each of `disks`, on the cluster of `conf`.
pub fn ceph_store_with_disks(conf: &Path, store: &str, size: &str, disks: &[&str]) {
    let args = ["store", "create", store, "--size", size];
    ok_ceph(conf, &[&args[..], &["--extent-size", "4M"]].concat());
    for d in disks {
        ok_ceph(conf, &["disk", "create", store, d, "--size", "16M"]);
    }
}
