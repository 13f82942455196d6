//! The daemon's security boundaries, attacked through the real `dovetail` binary (SECURITY.md
//! lists what each test proves): who may use the control socket, where a live export may
//! write, fault rules from the control socket, event followers, the sockets' modes and groups,
//! symlinks planted in a store, and the mode of every file the daemon creates.

mod cli;
#[allow(dead_code)]
mod serve;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cli::{fails, ok, path};
use serve::{ctl_ok, ctl_output, Daemon};

/// A gid no user of the test host has (the tests make processes with it).
const GROUP: u32 = 48_213;
/// The user the tests run other-user clients as.
const NOBODY: u32 = 65_534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A test directory other users can traverse (tempdirs are 0700), with store `st` holding
/// disk `vd` (16 MiB).
fn store_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let st = dir.path().join("st");
    ok(&[
        "store",
        "create",
        path(&st),
        "--size",
        "64M",
        "--extent-size",
        "1M",
    ]);
    ok(&["disk", "create", path(&st), "vd", "--size", "16M"]);
    dir
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// `dovetail ctl` against DIR/ctl.sock, run as user `uid` with group `gid`.
fn ctl_as(dir: &Path, uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new(serve::bin())
        .args(["ctl", "--control", path(&dir.join("ctl.sock"))])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run dovetail ctl as another user")
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).expect("lstat").mode() & 0o7777
}

#[test]
fn a_control_peer_of_another_user_is_refused() {
    if !is_root() {
        eprintln!("skipped: running clients as other users needs root");
        return;
    }
    let dir = store_dir();
    let d = dir.path();
    // The socket is world-writable, so anyone can connect: the peer check alone refuses.
    let daemon = Daemon::start(d, "peer", "mode 0666", &["--control-mode", "0666"]);
    assert_eq!(mode(&d.join("ctl.sock")), 0o666);
    let o = ctl_as(d, NOBODY, NOBODY, &["status"]);
    let out = stdout(&o);
    assert!(!o.status.success(), "another user was served: {out}");
    assert!(
        out.contains("forbidden") && out.contains(&format!("user {NOBODY}")),
        "{out}"
    );
    // Nor a command that changes something.
    let o = ctl_as(d, NOBODY, NOBODY, &["snapshot", "vd", "--name", "x"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(!ctl_ok(d, &["snapshots", "vd"]).contains(" x "));
    // Root (the daemon's user here) is served.
    assert!(ctl_ok(d, &["status"]).contains("vd"));
    daemon.terminate();

    // --control-group admits the group's members, and only them.
    let g = GROUP.to_string();
    let daemon = Daemon::start(d, "peer", "control group", &["--control-group", &g]);
    let meta = std::fs::symlink_metadata(d.join("ctl.sock")).expect("lstat");
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o660, GROUP));
    let o = ctl_as(d, NOBODY, GROUP, &["status"]);
    assert!(o.status.success(), "a member was refused: {}", stdout(&o));
    assert!(stdout(&o).contains("vd"));
    let o = ctl_as(d, NOBODY, NOBODY, &["status"]);
    assert!(
        !o.status.success(),
        "a non-member was served: {}",
        stdout(&o)
    );
    daemon.terminate();
    let log = std::fs::read_to_string(d.join("serve.log")).expect("log");
    assert!(log.contains("refused a connection: user 65534"), "{log}");
}

#[test]
fn live_export_is_confined_to_the_export_dir() {
    let dir = store_dir();
    let d = dir.path();
    let outside = tempfile::tempdir().expect("tempdir");
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"precious").expect("write");

    // No --export-dir: live export is off.
    let daemon = Daemon::start(d, "export", "no export dir", &[]);
    ctl_ok(d, &["snapshot", "vd", "--name", "s"]);
    let target = outside.path().join("x.img");
    let o = ctl_output(
        d,
        &["export", "vd", "--snapshot", "s", "--to", path(&target)],
    );
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("forbidden") && out.contains("--export-dir"),
        "{out}"
    );
    assert!(!target.exists());
    daemon.terminate();

    let exports = d.join("exports");
    std::fs::create_dir(&exports).expect("mkdir");
    let daemon = Daemon::start(d, "export", "export dir", &["--export-dir", path(&exports)]);
    // A path outside the directory, and names that climb out of it.
    for to in [path(&target), "../x.img", "sub/x.img", ".."] {
        let o = ctl_output(d, &["export", "vd", "--snapshot", "s", "--to", to]);
        let out = stdout(&o);
        assert!(!o.status.success(), "export to {to} was accepted: {out}");
        assert!(out.contains("plain file name"), "{to}: {out}");
    }
    assert!(!target.exists() && !d.join("x.img").exists());
    // A symlink planted in the export directory is not followed.
    std::os::unix::fs::symlink(&victim, exports.join("link.img")).expect("symlink");
    let o = ctl_output(d, &["export", "vd", "--snapshot", "s", "--to", "link.img"]);
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("exists already"), "{out}");
    assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
    // An existing file is not overwritten.
    std::fs::write(exports.join("old.img"), b"old").expect("write");
    let o = ctl_output(d, &["export", "vd", "--snapshot", "s", "--to", "old.img"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert_eq!(
        std::fs::read(exports.join("old.img")).expect("read"),
        b"old"
    );
    // A new plain name works, and the file is the daemon's user's only.
    ctl_ok(d, &["export", "vd", "--snapshot", "s", "--to", "new.img"]);
    let new = exports.join("new.img");
    assert_eq!(std::fs::metadata(&new).expect("export").len(), 16 << 20);
    assert_eq!(mode(&new), 0o600);
    // A path in the directory names the same place.
    let o = ctl_output(
        d,
        &[
            "export",
            "vd",
            "--snapshot",
            "s",
            "--to",
            path(&exports.join("abs.img")),
        ],
    );
    assert!(o.status.success(), "{}", stdout(&o));
    assert_eq!(mode(&exports.join("abs.img")), 0o600);
    daemon.terminate();
}

#[test]
fn fault_rules_need_allow_fault_injection() {
    let dir = store_dir();
    let d = dir.path();
    let tee = [
        "tee",
        "vd",
        "--policy",
        "sync-read-checks",
        "--fault",
        "flip-read:prob=0.5",
    ];
    let daemon = Daemon::start(d, "faults", "production", &[]);
    let o = ctl_output(d, &tee);
    let out = stdout(&o);
    assert!(!o.status.success(), "fault rules were accepted: {out}");
    assert!(
        out.contains("forbidden") && out.contains("--allow-fault-injection"),
        "{out}"
    );
    let status = ctl_ok(d, &["status", "vd"]);
    assert!(!status.contains("sync-read-checks"), "{status}");
    // Without faults the same tee is fine.
    ctl_ok(d, &["tee", "vd", "--policy", "sync-read-checks"]);
    ctl_ok(d, &["untee", "vd"]);
    daemon.terminate();

    let daemon = Daemon::start(d, "faults", "test daemon", &["--allow-fault-injection"]);
    let out = ctl_ok(d, &tee);
    assert!(out.contains("flip-read"), "{out}");
    daemon.terminate();
}

/// A raw control connection's first reply line.
fn request(s: &mut BufReader<UnixStream>, line: &str) -> serde_json::Value {
    s.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .expect("send");
    let mut l = String::new();
    s.read_line(&mut l).expect("a reply");
    serde_json::from_str(&l).expect("JSON")
}

#[test]
fn event_followers_are_bounded() {
    let dir = store_dir();
    let d = dir.path();
    let daemon = Daemon::start(d, "followers", "followers", &[]);
    let connect = || {
        let s = UnixStream::connect(d.join("ctl.sock")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        BufReader::new(s)
    };
    let follow = r#"{"cmd":"events","follow":true}"#;
    let mut followers = Vec::new();
    for i in 0..16 {
        let mut s = connect();
        let r = request(&mut s, follow);
        assert_eq!(r["ok"], serde_json::json!(true), "follower {i}: {r}");
        followers.push(s);
    }
    let mut s = connect();
    let r = request(&mut s, follow);
    assert_eq!(r["error"]["code"], serde_json::json!("busy"), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("16 clients follow events")),
        "{r}"
    );
    // The refused client keeps its connection for other commands, and so do others.
    let r = request(&mut s, r#"{"cmd":"status"}"#);
    assert_eq!(r["ok"], serde_json::json!(true), "{r}");
    assert!(ctl_ok(d, &["status"]).contains("vd"));
    // A follower that leaves makes room.
    drop(followers.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = request(&mut s, follow);
        if r["ok"] == serde_json::json!(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after a follower left: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(followers);
    daemon.terminate();
}

/// Whether a process of user `uid` and group `gid` can connect to the Unix socket `p`
/// (forks; the child only switches user and connects).
fn can_connect_as(p: &Path, uid: u32, gid: u32) -> bool {
    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
    let mut addr: libc::sockaddr_un = {
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
        unsafe { std::mem::zeroed() }
    };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = c.as_bytes_with_nul();
    assert!(bytes.len() <= addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child calls only async-signal-safe functions (setgroups, setgid, setuid,
    // socket, connect, _exit) on data prepared before the fork, then exits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                3
            } else {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let rc = libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                i32::from(rc != 0)
            };
            libc::_exit(code);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status));
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 3, "cannot switch to user {uid}");
        code == 0
    }
}

#[test]
fn disk_sockets_get_their_mode_and_group_before_anyone_connects() {
    let dir = store_dir();
    let d = dir.path();
    let sock = d.join("vd.sock");
    // The default: the daemon's user only (it was 0755 from root's umask before).
    let daemon = Daemon::start(d, "sockets", "default", &[]);
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&d.join("ctl.sock")), 0o600);
    if is_root() {
        assert!(!can_connect_as(&sock, NOBODY, GROUP));
    }
    daemon.terminate();
    assert!(!sock.exists(), "the socket is removed at shutdown");

    // QEMU running as an unprivileged user of a group (libvirt-qemu's kvm, say) attaches.
    let g = GROUP.to_string();
    let daemon = Daemon::start(d, "sockets", "group", &["--socket-group", &g]);
    let meta = std::fs::symlink_metadata(&sock).expect("lstat");
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o660, GROUP));
    if is_root() {
        assert!(
            can_connect_as(&sock, NOBODY, GROUP),
            "a member cannot attach"
        );
        assert!(
            !can_connect_as(&sock, NOBODY, NOBODY),
            "a non-member attached"
        );
    }
    // No private directory is left behind.
    let stray: Vec<_> = std::fs::read_dir(d)
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".dovetail-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    daemon.terminate();

    let daemon = Daemon::start(d, "sockets", "mode", &["--socket-mode", "0666"]);
    assert_eq!(mode(&sock), 0o666);
    daemon.terminate();

    let o = cli::dovetail(&[
        "serve",
        "--store",
        path(&d.join("st")),
        "--disk",
        &format!("vd={}", path(&sock)),
        "--socket-group",
        "no-such-group-here",
    ]);
    assert!(!o.status.success());
    let e = stdout(&o);
    assert!(e.contains("no group \"no-such-group-here\""), "{e}");
}

#[test]
fn symlinks_planted_in_a_store_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let victim = d.join("victim");
    std::fs::write(&victim, b"precious").expect("write");

    // The metadata temporary: removed, never truncated through.
    let st = d.join("st");
    std::fs::create_dir(&st).expect("mkdir");
    std::os::unix::fs::symlink(&victim, st.join("store.meta.tmp")).expect("symlink");
    ok(&[
        "store",
        "create",
        path(&st),
        "--size",
        "16M",
        "--extent-size",
        "1M",
    ]);
    assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
    for f in ["store.meta", "data.0"] {
        assert_eq!(mode(&st.join(f)), 0o600, "{f} is created 0600");
    }

    // A data file planted as a symlink at create time: refused.
    let st2 = d.join("st2");
    std::fs::create_dir(&st2).expect("mkdir");
    std::os::unix::fs::symlink(&victim, st2.join("data.0")).expect("symlink");
    let e = fails(&[
        "store",
        "create",
        path(&st2),
        "--size",
        "16M",
        "--extent-size",
        "1M",
    ]);
    assert!(e.contains("data.0"), "{e}");
    assert_eq!(std::fs::read(&victim).expect("read"), b"precious");

    // The data file swapped for a symlink after: every command that opens the store refuses.
    ok(&["disk", "create", path(&st), "vd", "--size", "4M"]);
    let copy = d.join("data-copy");
    std::fs::copy(st.join("data.0"), &copy).expect("copy");
    let before = std::fs::read(&copy).expect("read");
    std::fs::remove_file(st.join("data.0")).expect("rm");
    std::os::unix::fs::symlink(&copy, st.join("data.0")).expect("symlink");
    for args in [
        vec!["disk", "list", path(&st)],
        vec!["store", "check", path(&st)],
        vec!["disk", "snapshot", path(&st), "vd", "--name", "s"],
    ] {
        let e = fails(&args);
        assert!(e.contains("is a symlink"), "{args:?}: {e}");
    }
    let sock = d.join("vd.sock");
    let e = fails(&[
        "serve",
        "--store",
        path(&st),
        "--disk",
        &format!("vd={}", path(&sock)),
    ]);
    assert!(e.contains("is a symlink"), "{e}");
    assert_eq!(std::fs::read(&copy).expect("read"), before);
    // A relative symlink inside the store's own directory is no better: data.0 is opened
    // through the directory's descriptor, and no symlink is followed there either.
    std::fs::remove_file(st.join("data.0")).expect("rm");
    std::fs::rename(&copy, st.join("data.real")).expect("move");
    std::os::unix::fs::symlink("data.real", st.join("data.0")).expect("symlink");
    for args in [
        vec!["store", "check", path(&st)],
        vec![
            "disk",
            "export",
            path(&st),
            "vd",
            "--to",
            path(&d.join("out.img")),
        ],
    ] {
        let e = fails(&args);
        assert!(e.contains("is a symlink"), "{args:?}: {e}");
        assert!(e.contains("data.0"), "{args:?}: {e}");
    }
    assert!(!d.join("out.img").exists(), "nothing exported");
    assert_eq!(std::fs::read(st.join("data.real")).expect("read"), before);
    std::fs::remove_file(st.join("data.0")).expect("rm");
    std::fs::rename(st.join("data.real"), st.join("data.0")).expect("restore");
    ok(&["store", "check", path(&st)]);

    // The metadata file swapped for a symlink to a copy of itself: refused, copy unchanged.
    let meta_copy = d.join("meta-copy");
    std::fs::copy(st.join("store.meta"), &meta_copy).expect("copy");
    let before = std::fs::read(&meta_copy).expect("read");
    std::fs::remove_file(st.join("store.meta")).expect("rm");
    std::os::unix::fs::symlink(&meta_copy, st.join("store.meta")).expect("symlink");
    let e = fails(&["disk", "create", path(&st), "vd2", "--size", "4M"]);
    assert!(e.contains("is a symlink"), "{e}");
    assert_eq!(std::fs::read(&meta_copy).expect("read"), before);
}

#[test]
fn files_the_daemon_creates_are_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let st = d.join("st");
    let fast = d.join("fast.data");
    ok(&[
        "store",
        "create",
        path(&st),
        "--tier",
        &format!("fast={}:16M", path(&fast)),
        "--extent-size",
        "1M",
    ]);
    assert_eq!(mode(&fast), 0o600, "a tier file");
    assert_eq!(mode(&st.join("store.meta")), 0o600);
    ok(&["disk", "create", path(&st), "vd", "--size", "4M"]);
    let out = d.join("out.img");
    ok(&["disk", "export", path(&st), "vd", "--to", path(&out)]);
    assert_eq!(mode(&out), 0o600, "an offline export");

    // serve --image creates the image 0600.
    let img = d.join("new.img");
    let sock = d.join("img.sock");
    let mut child = Command::new(serve::bin())
        .args(["serve", "--image", path(&img), "--size", "1M", "--socket"])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(mode(&img), 0o600, "a raw image serve creates");
    assert_eq!(mode(&sock), 0o600, "its socket");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
    assert!(!sock.exists(), "the socket is removed at shutdown");
}
