//! The storage daemon under test: `dovetail serve`, or `qemu-storage-daemon` as a control.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::host;

/// Which program serves the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    /// `dovetail serve`, the program under test.
    Dovetail,
    /// `qemu-storage-daemon` exporting the image over vhost-user-blk: the control that proves
    /// the harness and the workloads.
    QemuStorageDaemon,
}

impl DaemonKind {
    /// The daemon the scenarios test: dovetail, unless `DOVETAIL_TEST_DAEMON=qsd` asks for
    /// `qemu-storage-daemon` (to check the harness and the workloads against a known-good server).
    pub fn under_test() -> DaemonKind {
        match std::env::var(host::ENV_DAEMON).as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => DaemonKind::QemuStorageDaemon,
            _ => DaemonKind::Dovetail,
        }
    }

    /// A short name for scenario and log names.
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::Dovetail => "dovetail",
            DaemonKind::QemuStorageDaemon => "qsd",
        }
    }
}

/// Unix socket paths are limited to 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How to start a daemon; see [`Daemon::dovetail`] and [`Daemon::qsd`].
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    kind: DaemonKind,
    image: PathBuf,
    socket: Option<PathBuf>,
    log: Option<PathBuf>,
    size: Option<String>,
    queues: u16,
    read_only: bool,
    serial: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// `dovetail serve --store DIR --disk NAME=DIR/NAME.sock ...` instead of an image.
    store: Option<(PathBuf, Vec<String>)>,
}

impl DaemonBuilder {
    fn new(kind: DaemonKind, image: &Path) -> Self {
        DaemonBuilder {
            kind,
            image: image.to_path_buf(),
            socket: None,
            log: None,
            size: None,
            queues: 1,
            read_only: false,
            serial: None,
            args: Vec::new(),
            env: Vec::new(),
            store: None,
        }
    }

    /// Creates the image at this size (`64M`, `1G`, bytes) if it is missing.
    pub fn size(mut self, size: &str) -> Self {
        self.size = Some(size.to_string());
        self
    }

    /// Number of virtqueues the daemon offers (default 1).
    pub fn queues(mut self, n: u16) -> Self {
        self.queues = n;
        self
    }

    /// Serves the disk read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The disk's serial number (`--serial`; dovetail only).
    pub fn serial(mut self, id: &str) -> Self {
        self.serial = Some(id.to_string());
        self
    }

    /// Socket path (default: the image path with extension `.sock`).
    pub fn socket(mut self, path: impl AsRef<Path>) -> Self {
        self.socket = Some(path.as_ref().to_path_buf());
        self
    }

    /// Log file for the daemon's stdout and stderr (default: `<image stem>.daemon.log` beside the
    /// image).
    pub fn log(mut self, path: impl AsRef<Path>) -> Self {
        self.log = Some(path.as_ref().to_path_buf());
        self
    }

    /// An extra command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// An extra environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the daemon and waits until its socket accepts connections.
    pub fn spawn(mut self) -> Result<Daemon> {
        let dir = self
            .image
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let stem = self
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".to_string());
        let socket = match self.socket.take() {
            Some(s) => s,
            None => short_socket_path(&dir.join(format!("{stem}.sock"))),
        };
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Setup(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes",
                socket.display()
            )));
        }
        self.socket = Some(socket);
        if self.log.is_none() {
            self.log = Some(dir.join(format!("{stem}.daemon.log")));
        }
        let program = match self.kind {
            DaemonKind::Dovetail => dovetail_binary()?,
            DaemonKind::QemuStorageDaemon => {
                host::require_tool("qemu-storage-daemon", "qemu-system-common")?
            }
        };
        let mut d = Daemon {
            cfg: self,
            program,
            child: None,
        };
        d.start()?;
        Ok(d)
    }
}

/// Falls back to a short path under the temp directory when a deep target directory would make
/// the socket path too long for `sun_path`.
fn short_socket_path(wanted: &Path) -> PathBuf {
    if wanted.as_os_str().len() <= MAX_SOCKET_PATH {
        return wanted.to_path_buf();
    }
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "dovetail-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A running (or stopped) storage daemon serving one image on one socket. Dropping it stops the
/// daemon (SIGTERM, then SIGKILL after 5 s).
#[derive(Debug)]
pub struct Daemon {
    cfg: DaemonBuilder,
    program: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// `dovetail serve` on `image`.
    /// Serves the disks `names` of the store in `dir` (which must exist, with those disks), each
    /// on `DIR/NAME.sock`; [`Daemon::socket`] is the first disk's, [`Daemon::socket_of`] any's.
    pub fn dovetail_store(dir: impl AsRef<Path>, names: &[&str]) -> DaemonBuilder {
        let dir = dir.as_ref();
        let first = names.first().copied().unwrap_or("disk");
        let mut b = DaemonBuilder::new(DaemonKind::Dovetail, &dir.join(first));
        b.socket = Some(dir.join(format!("{first}.sock")));
        b.store = Some((
            dir.to_path_buf(),
            names.iter().map(|n| n.to_string()).collect(),
        ));
        b
    }

    /// The socket serving disk `name` of a store daemon.
    pub fn socket_of(&self, name: &str) -> PathBuf {
        match &self.cfg.store {
            Some((dir, _)) => dir.join(format!("{name}.sock")),
            None => self.socket().to_path_buf(),
        }
    }

    pub fn dovetail(image: impl AsRef<Path>) -> DaemonBuilder {
        DaemonBuilder::new(DaemonKind::Dovetail, image.as_ref())
    }

    /// `qemu-storage-daemon` exporting `image` over vhost-user-blk.
    pub fn qsd(image: impl AsRef<Path>) -> DaemonBuilder {
        DaemonBuilder::new(DaemonKind::QemuStorageDaemon, image.as_ref())
    }

    /// The daemon under test ([`DaemonKind::under_test`]) on `image`.
    pub fn under_test(image: impl AsRef<Path>) -> DaemonBuilder {
        DaemonBuilder::new(DaemonKind::under_test(), image.as_ref())
    }

    /// `kind`'s daemon on `image`.
    pub fn of_kind(kind: DaemonKind, image: impl AsRef<Path>) -> DaemonBuilder {
        DaemonBuilder::new(kind, image.as_ref())
    }

    /// Which program this is.
    pub fn kind(&self) -> DaemonKind {
        self.cfg.kind
    }

    /// The vhost-user socket to give QEMU.
    pub fn socket(&self) -> &Path {
        self.cfg.socket.as_deref().unwrap_or(Path::new(""))
    }

    /// The served image file.
    pub fn image(&self) -> &Path {
        &self.cfg.image
    }

    /// The daemon's log (stdout and stderr of every start, with the harness's markers).
    pub fn log_path(&self) -> &Path {
        self.cfg.log.as_deref().unwrap_or(Path::new(""))
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn command(&self) -> Result<Command> {
        let c = &self.cfg;
        let socket = self.socket();
        let mut cmd = Command::new(&self.program);
        match c.kind {
            DaemonKind::Dovetail if c.store.is_some() => {
                let Some((dir, disks)) = &c.store else {
                    unreachable!("checked by the match guard")
                };
                cmd.arg("serve")
                    .arg("--store")
                    .arg(dir)
                    .arg("--queues")
                    .arg(c.queues.to_string());
                for name in disks {
                    let mut spec = std::ffi::OsString::from(format!("{name}="));
                    spec.push(self.socket_of(name));
                    cmd.arg("--disk").arg(spec);
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "info");
                }
                cmd.env("RUST_BACKTRACE", "1");
            }
            DaemonKind::Dovetail => {
                cmd.arg("serve")
                    .arg("--image")
                    .arg(&c.image)
                    .arg("--socket")
                    .arg(socket)
                    .arg("--queues")
                    .arg(c.queues.to_string());
                if let Some(size) = &c.size {
                    cmd.arg("--size").arg(size);
                }
                if c.read_only {
                    cmd.arg("--read-only");
                }
                if let Some(serial) = &c.serial {
                    cmd.arg("--serial").arg(serial);
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "info");
                }
                cmd.env("RUST_BACKTRACE", "1");
            }
            DaemonKind::QemuStorageDaemon => {
                if let Some(size) = &c.size {
                    if !c.image.exists() {
                        let bytes = parse_size(size)?;
                        let f = File::create(&c.image).at("creating", &c.image)?;
                        f.set_len(bytes).at("sizing", &c.image)?;
                    }
                }
                let ro = if c.read_only { "on" } else { "off" };
                // Commas in option values are doubled in QEMU's syntax.
                let image = c.image.to_string_lossy().replace(',', ",,");
                let sock = socket.to_string_lossy().replace(',', ",,");
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f0,filename={image},read-only={ro},discard=unmap"
                ));
                cmd.arg("--blockdev").arg(format!(
                    "driver=raw,node-name=d0,file=f0,read-only={ro},discard=unmap"
                ));
                cmd.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={sock},node-name=d0,writable={},num-queues={}",
                    if c.read_only { "off" } else { "on" },
                    c.queues
                ));
            }
        }
        cmd.args(&c.args);
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    fn note(&self, text: &str) {
        // Best effort: the marker only helps a human reading the log.
        if let Ok(mut f) = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            let _ = writeln!(f, "=== qemu-tests: {text} ===");
        }
    }

    fn start(&mut self) -> Result<()> {
        let mut cmd = self.command()?;
        let log_path = self.log_path().to_path_buf();
        let socket = self.socket().to_path_buf();
        // A socket left by a killed daemon must not count as the new one being ready.
        // Inode numbers are reused at once, so the creation time tells the new socket apart.
        let identity = |m: &std::fs::Metadata| (m.ino(), m.ctime(), m.ctime_nsec());
        let stale = std::fs::symlink_metadata(&socket)
            .ok()
            .map(|m| identity(&m));
        self.note(&format!("starting {}", host::describe(&cmd)));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .at("opening daemon log", &log_path)?;
        let log2 = log.try_clone().at("duplicating", &log_path)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .ctx(|| format!("cannot start `{}`", host::describe(&cmd)))?;
        self.child = Some(child);

        let deadline = Instant::now() + host::scaled(Duration::from_secs(20));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.error(format!("exited during startup ({status})")));
                }
            }
            let ready = std::fs::symlink_metadata(&socket)
                .is_ok_and(|m| m.file_type().is_socket() && Some(identity(&m)) != stale);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.error(format!(
                    "socket {} did not appear within {:?}",
                    socket.display(),
                    host::scaled(Duration::from_secs(20))
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn error(&self, reason: String) -> Error {
        Error::Daemon {
            image: self.cfg.image.display().to_string(),
            reason,
            context: format!(
                "daemon log: {}\n--- last lines ---\n{}",
                self.log_path().display(),
                host::tail_of_file(self.log_path(), 30)
            ),
        }
    }

    /// SIGKILL, as a crash would: no flush, the socket file stays.
    pub fn kill9(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Err(self.error("kill9: not running".into()));
        };
        self.note("SIGKILL");
        child
            .kill()
            .ctx(|| "sending SIGKILL to the daemon".into())?;
        child
            .wait()
            .ctx(|| "waiting for the killed daemon".into())?;
        Ok(())
    }

    /// SIGTERM and wait: the daemon must exit 0 within 30 s; dovetail must also remove its socket.
    pub fn terminate(&mut self) -> Result<()> {
        let status = self.stop(host::scaled(Duration::from_secs(30)))?;
        if !status.success() {
            return Err(self.error(format!("exited with {status} after SIGTERM")));
        }
        if self.cfg.kind == DaemonKind::Dovetail && self.socket().exists() {
            return Err(self.error(format!(
                "left its socket {} behind after SIGTERM",
                self.socket().display()
            )));
        }
        Ok(())
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(self.error("terminate: not running".into()));
        };
        self.note("SIGTERM");
        let pid =
            libc::pid_t::try_from(child.id()).map_err(|_| self.error("pid out of range".into()))?;
        // SAFETY: kill(2) on the pid of a child this struct owns and has not yet reaped, so the
        // pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait().ctx(|| "waiting for the daemon".into())? {
                self.note(&format!("exited: {status}"));
                return Ok(status);
            }
            if Instant::now() > deadline {
                // Best effort: it is being reported as a failure anyway.
                let _ = child.kill();
                let _ = child.wait();
                self.note("no exit within the grace period; SIGKILL");
                return Err(self.error(format!("did not exit within {grace:?} of SIGTERM")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again with the same arguments (after [`Daemon::kill9`] or
    /// [`Daemon::terminate`]; a running daemon is terminated first).
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.terminate()?;
        }
        self.child = None;
        self.start()
    }

    /// Waits until a client (QEMU) holds a connection to the socket, from `/proc/net/unix`.
    pub fn wait_for_client(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + host::scaled(timeout);
        loop {
            if connections(self.socket())? > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.error(format!(
                    "no client connected to {} within {timeout:?}",
                    self.socket().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Errors are already in the log; nothing more to do while dropping.
            let _ = self.stop(Duration::from_secs(5));
        }
    }
}

/// Connected server-side sockets bound to `path`: accepted connections carry the listener's path
/// in `/proc/net/unix` with state 03 (connected); the listener itself is state 01.
fn connections(path: &Path) -> Result<usize> {
    let table =
        std::fs::read_to_string("/proc/net/unix").at("reading", Path::new("/proc/net/unix"))?;
    let want = path.to_string_lossy();
    Ok(table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() >= 8 && f[5] == "03" && f[7] == want
        })
        .count())
}

/// Parses `64M`, `1G`, `512K`, `1T` or a byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(Error::Setup(format!("bad size {s:?}"))),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| Error::Setup(format!("bad size {s:?}")))
}

/// The dovetail binary: `DOVETAIL_BIN`, or built with `cargo build -p dovetail-backend --bin
/// dovetail` once per test process.
pub fn dovetail_binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find_or_build().map_err(|e| format!("{e:?}")))
        .clone()
        .map_err(Error::Setup)
}

/// Runs `dovetail ARGS...` (an offline command such as `store create` or `disk tee`) and
/// returns its stdout and stderr; a non-zero exit is a check failure quoting them.
pub fn dovetail_cli(args: &[&std::ffi::OsStr]) -> Result<String> {
    let bin = dovetail_binary()?;
    let out = Command::new(&bin)
        .args(args)
        .output()
        .map_err(|e| Error::Setup(format!("running {}: {e}", bin.display())))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(Error::Check(format!("dovetail {args:?} failed: {text}")))
    }
}

/// Creates a store of `size` in `dir` (`dovetail store create`) holding the parallax-v1 disks
/// `(name, size)` (`dovetail disk create`).
pub fn create_store(dir: &Path, size: &str, disks: &[(&str, &str)]) -> Result<()> {
    let st = dir.as_os_str();
    dovetail_cli(&[
        "store".as_ref(),
        "create".as_ref(),
        st,
        "--size".as_ref(),
        size.as_ref(),
    ])?;
    for (name, disk_size) in disks {
        dovetail_cli(&[
            "disk".as_ref(),
            "create".as_ref(),
            st,
            name.as_ref(),
            "--size".as_ref(),
            disk_size.as_ref(),
        ])?;
    }
    Ok(())
}

/// Runs `dovetail ctl --control CONTROL ARGS...` against a running daemon's control socket
/// (`serve --control`) and returns its stdout (with `--json` among `args`, one JSON object per
/// line); a non-zero exit is a check failure quoting the `dovetail: CODE: message` it printed.
pub fn dovetail_ctl(control: &Path, args: &[&str]) -> Result<String> {
    let bin = dovetail_binary()?;
    let out = Command::new(&bin)
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Setup(format!("running {}: {e}", bin.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(Error::Check(format!(
            "dovetail ctl {args:?} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// The unsigned number of the first `"key":N` in compact JSON such as `dovetail ctl --json`
/// prints, e.g. `json_u64(reply, "total_us")`; `None` if the key is missing or not a number.
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let start = json.find(&pat)? + pat.len();
    let digits: String = json[start..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn find_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(host::ENV_BIN).filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(Error::Setup(format!(
                "{}={} does not exist",
                host::ENV_BIN,
                bin.display()
            )))
        };
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "dovetail-backend",
        "--bin",
        "dovetail",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(host::workspace_dir());
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = host::run(&mut cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| l.contains("\"name\":\"dovetail\"") && l.contains("\"kind\":[\"bin\"]"))
        .find_map(|l| json_string_field(l, "executable"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let profile = if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            };
            host::target_dir().join(profile).join("dovetail")
        });
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::Setup(format!(
            "cargo built dovetail but {} does not exist",
            bin.display()
        )))
    }
}

/// The value of `"key":"value"` in one line of cargo's JSON (paths carry no escapes here).
fn json_string_field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = &line[start..];
    let end = rest.find('"')?;
    Some(rest[..end].replace("\\\\", "\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").ok(), Some(64 << 20));
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("2k").ok(), Some(2048));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn json_numbers() {
        let reply = r#"{"message":"x","pause":{"change_us":168,"drain_us":5,"total_us":174}}"#;
        assert_eq!(json_u64(reply, "total_us"), Some(174));
        assert_eq!(json_u64(reply, "drain_us"), Some(5));
        assert_eq!(json_u64(reply, "message"), None);
        assert_eq!(json_u64(reply, "absent"), None);
    }

    #[test]
    fn cargo_json_executable() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"dovetail"},"executable":"/w/target/debug/dovetail","fresh":true}"#;
        assert_eq!(
            json_string_field(line, "executable").as_deref(),
            Some("/w/target/debug/dovetail")
        );
        assert_eq!(json_string_field(line, "missing"), None);
    }

    #[test]
    fn counts_connected_sockets_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        assert_eq!(connections(&path).expect("proc"), 0);
        let _client = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        assert_eq!(connections(&path).expect("proc"), 1);
    }
}
