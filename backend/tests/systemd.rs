//! The daemon as systemd runs it, through the real `dovetail` binary: socket activation (with
//! `systemd-socket-activate`, as these machines do not run systemd as PID 1), the sd_notify
//! protocol on a NOTIFY_SOCKET the test listens on (READY, STATUS, RELOADING on SIGHUP,
//! STOPPING on SIGTERM, and WATCHDOG pings that stop while a queue worker is wedged), the
//! config file (`config check`, the command line over the file, SIGHUP with a changed and with
//! a broken file, SIGHUP detaching removed disks and moving changed sockets unless a guest is
//! connected), and the unit files in contrib/systemd (`systemd-analyze verify` and
//! `security --offline=true`).

mod cli;
mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli::{ok, path};
use common::{pattern, Req, TestDriver};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dovetail")
}

/// Whether `tool` is installed; if not, says why the test is skipped.
fn have(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "SKIPPED {test}: {tool} is not installed (Debian's `systemd` package has it; \
             scripts/test-deps.sh installs it)"
        );
    }
    found
}

/// A store in DIR/st with parallax disks vm1 and vm2 of 64 MiB.
fn store(dir: &Path) -> PathBuf {
    let st = dir.join("st");
    ok(&["store", "create", path(&st), "--size", "512M"]);
    for d in ["vm1", "vm2"] {
        ok(&["disk", "create", path(&st), d, "--size", "64M"]);
    }
    st
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

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Waits for `child` to exit; kills it after `timeout`.
fn exit_status(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("the daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctl(control: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(["ctl", "--control", path(control)])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ctl");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Datagrams received on a NOTIFY_SOCKET, with when they came.
#[derive(Clone)]
struct Notifications(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notifications {
    /// Listens on `sock` (bound by the caller) on a thread of its own.
    fn listen(sock: UnixDatagram) -> Notifications {
        let got = Notifications(Arc::new(Mutex::new(Vec::new())));
        let g = got.clone();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        g.0.lock().expect("lock").push((Instant::now(), text));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if Arc::strong_count(&g.0) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        got
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.0.lock().expect("lock").clone()
    }

    /// Waits for a message holding `line` as one of its lines, after the first `skip`
    /// messages; returns its index.
    fn wait_line(&self, skip: usize, line: &str, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            if let Some(i) = self
                .all()
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, (_, m))| m.lines().any(|l| l == line))
                .map(|(i, _)| i)
            {
                return i;
            }
            assert!(
                start.elapsed() < timeout,
                "no {line:?} within {timeout:?}; got {:?}",
                self.all().iter().map(|(_, m)| m).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn message(&self, i: usize) -> String {
        self.all()[i].1.clone()
    }
}

#[test]
fn socket_activation_serves_disks_and_the_control_socket_by_name() {
    if !have(
        "systemd-socket-activate",
        "socket_activation_serves_disks_and_the_control_socket_by_name",
    ) {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let st = store(dir);
    let (control, vm1, vm2) = (
        dir.join("ctl.sock"),
        dir.join("vm1.sock"),
        dir.join("vm2.sock"),
    );
    let log = std::fs::File::create(dir.join("serve.log")).expect("log");
    // vm1 is named on the command line too (its socket path is the activated one); vm2 comes
    // only from the socket's name.
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", path(&control), "--fdname=control"])
        .args(["-l", path(&vm1), "--fdname=vm1"])
        .args(["-l", path(&vm2), "--fdname=vm2"])
        .args(["-E", "RUST_LOG=info", bin(), "serve", "--store", path(&st)])
        .args(["--disk", &format!("vm1={}", path(&vm1))])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run systemd-socket-activate");
    wait_for("the activated sockets", Duration::from_secs(10), || {
        control.exists() && vm1.exists() && vm2.exists()
    });
    // The first connection starts the daemon on the sockets (systemd-socket-activate execs it).
    let status = ctl(&control, &["status"]);
    let log_text = || std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    assert!(
        status.contains("vm1") && status.contains("vm2"),
        "{status}\n{}",
        log_text()
    );
    io_works(&vm1, 1);
    io_works(&vm2, 2);
    let text = log_text();
    assert!(text.contains("fd 3 named \"control\""), "{text}");
    assert!(text.contains("inherited from systemd"), "{text}");
    signal(&child, libc::SIGTERM);
    let s = exit_status(&mut child, Duration::from_secs(20));
    assert!(s.success(), "exit: {s}\n{}", log_text());
    // The sockets are the socket unit's: the daemon leaves them in place.
    assert!(control.exists() && vm1.exists() && vm2.exists());
}

#[test]
fn activation_refuses_a_socket_that_is_not_a_listening_stream() {
    if !have(
        "systemd-socket-activate",
        "activation_refuses_a_socket_that_is_not_a_listening_stream",
    ) {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let st = store(dir);
    let vm1 = dir.join("vm1.sock");
    let out = Command::new("systemd-socket-activate")
        .args(["--datagram", "-l", path(&vm1), "--fdname=vm1"])
        .args([bin(), "serve", "--store", path(&st)])
        .args(["--disk", &format!("vm1={}", path(&vm1))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    // A datagram socket activates its service on the first datagram.
    wait_for("the socket", Duration::from_secs(10), || vm1.exists());
    UnixDatagram::unbound()
        .expect("socket")
        .send_to(b"x", &vm1)
        .expect("send");
    let out = out.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("fd 3 (vm1): not a stream socket"),
        "{stderr}"
    );
}

/// The daemon of the config-file tests, with a NOTIFY_SOCKET the test listens on.
struct Served {
    child: Child,
    log: PathBuf,
    notes: Notifications,
}

impl Served {
    fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
        let notify = dir.join("notify.sock");
        let notes = Notifications::listen(UnixDatagram::bind(&notify).expect("bind notify"));
        let log = dir.join("serve.log");
        let child = Command::new(bin())
            .arg("serve")
            .args(args)
            .env("NOTIFY_SOCKET", &notify)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("run dovetail serve");
        Served { child, log, notes }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, text: &str) {
        let start = Instant::now();
        while !self.log().contains(text) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {text:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_applies_a_changed_config_and_a_broken_one_changes_nothing_with_notifications() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let st = store(dir);
    // vm1 gets a candidate whose policy the file sets.
    ok(&[
        "disk",
        "tee",
        path(&st),
        "vm1",
        "--policy",
        "sync-cross-checks",
    ]);
    let (control, vm1, vm2) = (
        dir.join("ctl.sock"),
        dir.join("vm1.sock"),
        dir.join("vm2.sock"),
    );
    let conf = dir.join("dovetail.toml");
    let first = format!(
        "# the daemon of the test\nstore = \"{}\"\ndisk = [\"vm1={}\"]\ncontrol = \"{}\"\n\
         queues = 2\npolicy = [\"vm1=lazy-hashes\"]\n",
        path(&st),
        path(&vm1),
        path(&control)
    );
    std::fs::write(&conf, &first).expect("write config");
    let mut d = Served::start(dir, &["--config", path(&conf)], &[]);
    // READY=1 only once the disk listens.
    let ready = d.notes.wait_line(0, "READY=1", Duration::from_secs(20));
    assert!(
        std::os::unix::net::UnixStream::connect(&vm1).is_ok(),
        "READY=1 before the disk listens"
    );
    assert!(
        d.notes
            .message(ready)
            .lines()
            .any(|l| l == "STATUS=serving 1 disk(s)"),
        "{}",
        d.notes.message(ready)
    );
    let status = ctl(&control, &["status"]);
    assert!(
        status.contains("lazy-hashes"),
        "--policy from the file:\n{status}"
    );

    // A changed file: a disk added, metrics, the log level, another policy, and queues (which
    // needs a restart).
    let changed = format!(
        "store = \"{}\"\ndisk = [\"vm1={}\", \"vm2={}\"]\ncontrol = \"{}\"\nqueues = 3\n\
         policy = [\"vm1=mirror-only\"]\nmetrics = \"127.0.0.1:0\"\nlog-level = \"debug\"\n",
        path(&st),
        path(&vm1),
        path(&vm2),
        path(&control)
    );
    std::fs::write(&conf, &changed).expect("write config");
    let before = d.notes.all().len();
    signal(&d.child, libc::SIGHUP);
    let reloading = d
        .notes
        .wait_line(before, "RELOADING=1", Duration::from_secs(20));
    let usec = d
        .notes
        .message(reloading)
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC=").map(str::to_string))
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{usec}");
    let ready = d
        .notes
        .wait_line(reloading, "READY=1", Duration::from_secs(20));
    let note = d.notes.message(ready);
    assert!(
        note.contains("STATUS=serving 2 disk(s); reloaded") && note.contains("1 need a restart"),
        "{note}"
    );
    let text = d.log();
    assert!(text.contains("config: disk vm2 added"), "{text}");
    assert!(
        text.contains("config: queues: 2 -> 3: takes effect at the next restart"),
        "{text}"
    );
    assert!(
        text.contains("config: log-level: (unset) -> debug"),
        "{text}"
    );
    let status = ctl(&control, &["status"]);
    assert!(status.contains("vm2"), "{status}");
    assert!(status.contains("mirror-only"), "{status}");
    io_works(&vm2, 3);
    // Metrics on the new address.
    let addr = text
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|r| r.split('/').next())
        .expect("metrics address in the log")
        .to_string();
    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).expect("metrics connect");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("get");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body
    };
    assert!(
        scrape().contains("disk=\"vm2\""),
        "metrics of the added disk"
    );

    // A broken file changes nothing, says where it is wrong, and the daemon still serves.
    std::fs::write(
        &conf,
        changed.replace(
            "metrics = \"127.0.0.1:0\"",
            "metrics = \"127.0.0.1:0\"\nqueues = \"many\"",
        ),
    )
    .expect("write config");
    let before = d.notes.all().len();
    signal(&d.child, libc::SIGHUP);
    let reloading = d
        .notes
        .wait_line(before, "RELOADING=1", Duration::from_secs(20));
    let ready = d
        .notes
        .wait_line(reloading, "READY=1", Duration::from_secs(20));
    assert!(
        d.notes.message(ready).contains("reload failed"),
        "{}",
        d.notes.message(ready)
    );
    d.wait_log("not applied, nothing changed");
    let text = d.log();
    assert!(
        text.contains(&format!("{}:", conf.display())) && text.contains("duplicate key"),
        "the error with its place:\n{text}"
    );
    assert!(ctl(&control, &["status"]).contains("vm2"));
    assert!(scrape().contains("disk=\"vm1\""), "metrics still served");

    // SIGTERM: STOPPING=1, exit 0.
    let before = d.notes.all().len();
    signal(&d.child, libc::SIGTERM);
    d.notes
        .wait_line(before, "STOPPING=1", Duration::from_secs(20));
    let s = exit_status(&mut d.child, Duration::from_secs(20));
    assert!(s.success(), "{s}\n{}", d.log());
}

impl Served {
    /// Writes `conf`, sends SIGHUP and returns the READY=1 notification that ends the reload.
    fn reload(&self, file: &Path, conf: &str) -> String {
        std::fs::write(file, conf).expect("write config");
        let before = self.notes.all().len();
        signal(&self.child, libc::SIGHUP);
        let reloading = self
            .notes
            .wait_line(before, "RELOADING=1", Duration::from_secs(20));
        let ready = self
            .notes
            .wait_line(reloading, "READY=1", Duration::from_secs(20));
        self.notes.message(ready)
    }
}

/// The catalog's attachments, read beside the daemon.
fn attachments(st: &Path) -> Vec<String> {
    dovetail_store::Store::open_reader(st)
        .expect("open the store beside the daemon")
        .attachments()
        .into_iter()
        .map(|(n, a)| format!("{n}={}", a.socket.display()))
        .collect()
}

/// The disk names `ctl status --json` lists as served.
fn served_disks(control: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&ctl(control, &["status", "--json"])).expect("status json");
    v["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .map(|d| d["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn sighup_detaches_removed_disks_and_moves_sockets_but_not_under_a_guest() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let st = store(dir);
    let control = dir.join("ctl.sock");
    let (vm1, vm1b, vm2) = (
        dir.join("vm1.sock"),
        dir.join("vm1b.sock"),
        dir.join("vm2.sock"),
    );
    let conf = dir.join("dovetail.toml");
    let with = |disks: &[(&str, &Path)]| {
        let list: Vec<String> = disks
            .iter()
            .map(|(n, s)| format!("\"{n}={}\"", path(s)))
            .collect();
        format!(
            "store = \"{}\"\ncontrol = \"{}\"\ndisk = [{}]\n",
            path(&st),
            path(&control),
            list.join(", ")
        )
    };
    std::fs::write(&conf, with(&[("vm1", &vm1), ("vm2", &vm2)])).expect("write config");
    let d = Served::start(dir, &["--config", path(&conf)], &[]);
    d.notes.wait_line(0, "READY=1", Duration::from_secs(20));
    assert_eq!(served_disks(&control), ["vm1", "vm2"]);
    // A guest on vm1, none on vm2.
    let guest = TestDriver::connect(&vm1, 1, 4 << 20);
    let data = pattern(11, 64 * 1024);
    guest.submit(0, &Req::write(128, &data)).assert_ok(0);

    // Both leave the file: vm2 is detached, vm1 (its guest connected) stays served.
    let note = d.reload(&conf, &with(&[]));
    assert!(
        note.contains("STATUS=serving 1 disk(s); reloaded")
            && note.contains("1 change(s) applied")
            && note.contains("1 not applied (tried again at the next SIGHUP): disk vm1 stays on")
            && note.contains("a guest is connected"),
        "{note}"
    );
    let text = d.log();
    assert!(
        text.contains("config: disk vm2 is no longer in the file: detached: disk vm2"),
        "{text}"
    );
    assert!(
        text.contains("config: disk vm1 is no longer in the file but stays served")
            && text.contains("`dovetail ctl detach vm1 --force`"),
        "{text}"
    );
    assert!(!vm2.exists(), "vm2's socket is still there");
    assert!(vm1.exists(), "vm1's socket went with its guest connected");
    assert_eq!(served_disks(&control), ["vm1"]);
    assert!(attachments(&st).is_empty(), "{:?}", attachments(&st));
    // The guest did not notice.
    let c = guest.submit(0, &Req::read(128, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "the guest's disk changed under it");

    // vm1's socket changes while its guest is connected: refused, still served where it was.
    let moved = with(&[("vm1", &vm1b)]);
    let note = d.reload(&conf, &moved);
    assert!(
        note.contains("0 change(s) applied")
            && note.contains("1 not applied")
            && note.contains("a guest is connected"),
        "{note}"
    );
    assert!(
        d.log().contains("config: disk vm1: not moved to"),
        "{}",
        d.log()
    );
    assert!(vm1.exists() && !vm1b.exists());
    guest.submit(0, &Req::flush()).assert_ok(0);

    // The guest leaves; the next SIGHUP moves the disk, its data with it.
    drop(guest);
    let note = d.reload(&conf, &moved);
    assert!(
        note.contains("STATUS=serving 1 disk(s); reloaded")
            && note.contains("1 change(s) applied")
            && !note.contains("not applied"),
        "{note}"
    );
    d.wait_log("config: disk vm1: socket");
    assert!(!vm1.exists(), "the old socket is still there");
    assert_eq!(served_disks(&control), ["vm1"]);
    let status: serde_json::Value =
        serde_json::from_str(&ctl(&control, &["status", "--json"])).expect("status json");
    assert_eq!(
        status["disks"][0]["socket"].as_str(),
        Some(path(&vm1b)),
        "{status}"
    );
    let driver = TestDriver::connect(&vm1b, 1, 4 << 20);
    let c = driver.submit(0, &Req::read(128, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "the moved disk lost what was written");
    drop(driver);
    // The file's disks are not recorded in the catalog (as `--disk`'s are not).
    assert!(attachments(&st).is_empty(), "{:?}", attachments(&st));

    // A socket that cannot be listened on: refused before anything changes.
    let nowhere = dir.join("missing").join("vm1.sock");
    let note = d.reload(&conf, &with(&[("vm1", &nowhere)]));
    assert!(
        note.contains("0 change(s) applied")
            && note.contains("1 not applied")
            && note.contains("does not exist"),
        "{note}"
    );
    assert!(
        vm1b.exists(),
        "the disk left its socket for one it cannot have"
    );
    io_works(&vm1b, 12);

    // Removed with no guest: detached at once.
    let note = d.reload(&conf, &with(&[]));
    assert!(
        note.contains("STATUS=serving 0 disk(s); reloaded") && !note.contains("not applied"),
        "{note}"
    );
    assert!(!vm1b.exists());
    assert!(served_disks(&control).is_empty());
}

#[test]
fn watchdog_pings_stop_while_a_queue_worker_is_wedged() {
    if !dovetail_store::failpoint::ENABLED {
        eprintln!(
            "SKIPPED watchdog_pings_stop_while_a_queue_worker_is_wedged: needs --features \
             dovetail-backend/failpoints (to wedge a worker)"
        );
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let sock = dir.join("d.sock");
    let img = dir.join("d.img");
    // The notify socket in the abstract namespace this time.
    let name = format!("dovetail-test-{}", std::process::id());
    let addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr")
    };
    let notes = Notifications::listen(UnixDatagram::bind_addr(&addr).expect("bind"));
    let log = dir.join("serve.log");
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--image",
            path(&img),
            "--size",
            "16M",
            "--socket",
            path(&sock),
        ])
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("WATCHDOG_USEC", "1000000")
        .env("RUST_LOG", "info")
        // The first kick of a queue wedges its worker for 4 s.
        .env("FAILPOINTS", "queue-kick=1*sleep(4000)")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    notes.wait_line(0, "READY=1", Duration::from_secs(20));
    // Pings every half interval while idle.
    let first = notes.wait_line(0, "WATCHDOG=1", Duration::from_secs(5));
    notes.wait_line(first + 1, "WATCHDOG=1", Duration::from_secs(5));
    let driver = TestDriver::connect(&sock, 1, 4 << 20);
    let before = notes.all().len();
    let data = pattern(7, 4096);
    let submitted = Instant::now();
    let c = driver.submit(0, &Req::write(8, &data));
    let completed = Instant::now();
    c.assert_ok(0);
    assert!(
        completed - submitted >= Duration::from_secs(3),
        "the worker was not wedged:\n{}",
        log_text()
    );
    let all = notes.all();
    let stuck = all
        .iter()
        .skip(before)
        .position(|(_, m)| m.starts_with("STATUS=stuck: disk d.img queue 0"))
        .map(|i| i + before)
        .unwrap_or_else(|| panic!("no stuck status: {all:?}\n{}", log_text()));
    let stuck_at = all[stuck].0;
    assert!(
        stuck_at < completed,
        "stuck noticed only after the request completed"
    );
    let pings_while_stuck: Vec<_> = all
        .iter()
        .skip(stuck + 1)
        .filter(|(at, m)| *at < completed && m == "WATCHDOG=1")
        .collect();
    assert!(
        pings_while_stuck.is_empty(),
        "pinged while a worker was wedged: {pings_while_stuck:?}"
    );
    assert!(
        completed - stuck_at >= Duration::from_secs(2),
        "no pings for {:?} only",
        completed - stuck_at
    );
    // Pings again once the worker moves.
    let after = notes.all().len();
    notes.wait_line(after, "WATCHDOG=1", Duration::from_secs(5));
    assert!(
        log_text().contains("watchdog: stuck: disk d.img queue 0"),
        "{}",
        log_text()
    );
    drop(driver);
    signal(&child, libc::SIGTERM);
    let s = exit_status(&mut child, Duration::from_secs(20));
    assert!(s.success(), "{s}\n{}", log_text());
}

#[test]
fn config_check_names_line_and_column_and_the_command_line_overrides_the_file() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "store = \"/srv/store\"\n\nqueues = 0\nsocket_mode = \"0660\"\nread-only = \"yes\"\n\
         disk = [\"vm1\"]\n",
    )
    .expect("write");
    let out = cli::dovetail(&["config", "check", path(&bad)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let b = bad.display();
    for line in [
        format!("{b}:3:10: queues = \"0\": 0 is not in 1..=64"),
        format!("{b}:4:1: unknown key \"socket_mode\": did you mean \"socket-mode\"?"),
        format!("{b}:5:13: read-only: a switch: true or false"),
        format!("{b}:6:9: disk = \"vm1\": \"vm1\" is not NAME=SOCKET"),
    ] {
        assert!(
            stderr.lines().any(|l| l == line),
            "no {line:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("4 error(s)"), "{stderr}");
    // Not TOML at all.
    std::fs::write(&bad, "store = [\n").expect("write");
    let stderr = cli::fails(&["config", "check", path(&bad)]);
    assert!(
        stderr.contains(&format!("{b}:1:10: not valid TOML")),
        "{stderr}"
    );
    // Options that do not go together, with the key's place.
    std::fs::write(
        &bad,
        "store = \"/x\"\nmetrics = \"10.0.0.1:9187\"\ndisk = [\"a=/a.sock\"]\n",
    )
    .expect("write");
    let stderr = cli::fails(&["config", "check", path(&bad)]);
    assert!(
        stderr.contains(&format!(
            "{b}:2:1: --metrics 10.0.0.1:9187: metrics are served on a loopback"
        )),
        "{stderr}"
    );
    // `serve` refuses the file too, serving nothing.
    let stderr = cli::fails(&["serve", "--config", path(&bad)]);
    assert!(stderr.contains("nothing served"), "{stderr}");

    // The example config checks.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/dovetail.toml");
    let out = ok(&["config", "check", path(&example)]);
    assert!(out.contains("good"), "{out}");

    // A good file, and the command line over it: the QEMU line printed shows the queues.
    let st = store(dir);
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!(
            "store = \"{}\"\ndisk = [\"vm1={}\"]\nqueues = 4\n",
            path(&st),
            path(&dir.join("vm1.sock"))
        ),
    )
    .expect("write");
    let out = ok(&["config", "check", path(&good)]);
    assert!(
        out.contains("good: sets 3 option(s): store, disk, queues"),
        "{out}"
    );
    for (extra, want) in [(None, "num-queues=4"), (Some("2"), "num-queues=2")] {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config", path(&good)]);
        if let Some(q) = extra {
            cmd.args(["--queues", q]);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve");
        wait_for("the disk's socket", Duration::from_secs(20), || {
            dir.join("vm1.sock").exists()
        });
        signal(&child, libc::SIGTERM);
        let s = exit_status(&mut child, Duration::from_secs(20));
        assert!(s.success());
        let mut stdout = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout)
            .expect("read");
        assert!(stdout.contains(want), "{extra:?}: {stdout}");
    }
}

/// The unit files: `systemd-analyze verify` finds nothing wrong, and `systemd-analyze
/// security --offline=true` rates the service's exposure at most as README.md records it.
#[test]
fn unit_files_verify_and_are_hardened() {
    if !have("systemd-analyze", "unit_files_verify_and_are_hardened") {
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let t = tempfile::tempdir().expect("tempdir");
    // verify wants the ExecStart binary to exist: point the units at the test's binary.
    let dir = t.path();
    for f in [
        "dovetail.service",
        "dovetail.socket",
        "dovetail-disk@.socket",
    ] {
        let text = std::fs::read_to_string(units.join(f)).expect("unit file");
        std::fs::write(dir.join(f), text.replace("/usr/bin/dovetail", bin())).expect("copy");
    }
    // An instance of the template is verified through a link to it.
    std::os::unix::fs::symlink(
        dir.join("dovetail-disk@.socket"),
        dir.join("dovetail-disk@vm1.socket"),
    )
    .expect("link the template instance");
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("dovetail.service"))
        .arg(dir.join("dovetail.socket"))
        .arg(dir.join("dovetail-disk@vm1.socket"))
        .current_dir(dir)
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // Lines about the units themselves (not about the host's own units, which verify also
    // loads and this test does not judge).
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("dovetail")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{said}");

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dir.join("dovetail.service"))
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("→ Overall exposure level for dovetail.service: ")
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level:\n{text}{}",
                String::from_utf8_lossy(&security.stderr)
            )
        });
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README");
    let recorded: f64 = readme
        .lines()
        .find_map(|l| l.split("exposure level of ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| {
            s.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .expect("README records the exposure level (\"exposure level of N.N\")");
    eprintln!("systemd-analyze security: dovetail.service exposure {score}");
    assert!(
        score <= recorded,
        "exposure {score} is worse than the {recorded} README.md records:\n{text}"
    );
}
