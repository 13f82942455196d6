//! A disk's life cycle on a running daemon, through the real binaries: `ctl disk-create`,
//! `attach` (a path, or a listening socket passed over the control socket), I/O through a
//! vhost-user frontend, `detach`, `disk-delete`; the catalog's attachments served again by a
//! daemon restarted with `--store DIR` alone; and every bad input refused with a clear error
//! and nothing changed (no catalog commit, no socket file).

mod cli;
mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cli::store_daemon::Daemon;
use cli::{ok, path};
use common::{pattern, Req, TestDriver};
use serde_json::Value;

/// `dovetail serve --store DIR/st --control DIR/ctl.sock [EXTRA]`, logging to DIR/serve.log.
fn start(dir: &Path, extra: &[&str]) -> Daemon {
    let ctl = dir.join("ctl.sock");
    let _ = std::fs::remove_file(&ctl);
    let mut args: Vec<String> = ["serve", "--store", path(&dir.join("st"))]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--control".to_string(), path(&ctl).to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut d = Daemon::spawn(dir, &args);
    d.wait_for(&[ctl]);
    d
}

/// What these tests ask of the daemon beyond [`Daemon`]'s own.
trait LifeCycle {
    fn ctl_refused(&self, args: &[&str]) -> String;
    fn served(&self) -> Vec<String>;
}

impl LifeCycle for Daemon {
    /// A command that must fail (exit 1) without committing anything to the catalog; returns
    /// its stderr.
    fn ctl_refused(&self, args: &[&str]) -> String {
        let before = catalog(&self.dir);
        let out = self.ctl(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "ctl {args:?} must fail: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            catalog(&self.dir),
            before,
            "ctl {args:?} was refused but changed the catalog"
        );
        String::from_utf8(out.stderr).expect("utf-8")
    }

    fn served(&self) -> Vec<String> {
        let v: Value =
            serde_json::from_str(self.ctl_ok(&["--json", "status"]).trim()).expect("JSON");
        v["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .map(|d| d["name"].as_str().expect("name").to_string())
            .collect()
    }
}

/// The catalog's disks (name, size, versions, tee) and attachments, read beside the daemon:
/// what a life-cycle command changes. (Not the generation: a served disk commits by itself, its
/// extent reserve granting ahead of need.)
fn catalog(dir: &Path) -> String {
    let s = dovetail_store::Store::open_reader(&dir.join("st"))
        .expect("open the store beside the daemon");
    format!("{:?} {:?}", s.disks(), s.attachments())
}

/// The catalog's attachments (disk, socket), read beside the daemon.
fn attachments(dir: &Path) -> Vec<(String, PathBuf)> {
    dovetail_store::Store::open_reader(&dir.join("st"))
        .expect("open the store beside the daemon")
        .attachments()
        .into_iter()
        .map(|(n, a)| (n, a.socket))
        .collect()
}

fn new_store(dir: &Path) {
    ok(&[
        "store",
        "create",
        path(&dir.join("st")),
        "--size",
        "256M",
        "--extent-size",
        "4M",
    ]);
}

/// Writes a pattern through a frontend, flushes, reads it back.
fn write_and_check(socket: &Path, seed: u64, queues: usize) -> Vec<u8> {
    let driver = TestDriver::connect(socket, queues, 4 << 20);
    let data = pattern(seed, 64 * 1024);
    driver.submit(0, &Req::write(64, &data)).assert_ok(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    let c = driver.submit(queues - 1, &Req::read(64, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "read back differs from what was written");
    data
}

fn reads(socket: &Path, len: usize) -> Vec<u8> {
    let driver = TestDriver::connect(socket, 1, 4 << 20);
    let c = driver.submit(0, &Req::read(64, len as u32));
    c.assert_ok(len as u32);
    c.data
}

fn store_check_clean(dir: &Path) {
    let out = ok(&["store", "check", path(&dir.join("st"))]);
    assert!(!out.contains("VIOLATION"), "{out}");
}

#[test]
fn a_disk_is_created_attached_used_detached_and_deleted_live() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    new_store(dir);
    let d = start(dir, &[]);
    assert!(d.served().is_empty(), "an empty store serves nothing");

    let out = d.ctl_ok(&["disk-create", "vm1", "--size", "16M"]);
    assert!(out.contains("created disk vm1"), "{out}");
    let sock = dir.join("vm1.sock");
    assert!(
        !sock.exists(),
        "a created disk is not served until attached"
    );
    let out = d.ctl_ok(&[
        "attach",
        "vm1",
        "--socket",
        path(&sock),
        "--queues",
        "2",
        "--serial",
        "SER-1",
    ]);
    assert!(out.contains("attached: disk vm1"), "{out}");
    assert!(
        out.contains(&format!(
            "-chardev socket,id=dovetail-vm1,path={},reconnect=1",
            sock.display()
        )),
        "{out}"
    );
    assert!(out.contains("num-queues=2"), "{out}");
    assert!(
        out.contains("<disk type='vhostuser' device='disk'>"),
        "{out}"
    );
    assert!(
        out.contains(&format!("<source type='unix' path='{}'>", sock.display())),
        "{out}"
    );
    assert_eq!(attachments(dir), vec![("vm1".to_string(), sock.clone())]);
    assert_eq!(d.served(), ["vm1"]);

    let data = write_and_check(&sock, 11, 2);
    {
        let driver = TestDriver::connect(&sock, 2, 4 << 20);
        let c = driver.submit(0, &Req::get_id());
        c.assert_ok(20);
        assert!(c.data.starts_with(b"SER-1"), "the serial asked for");
    }

    // A daemon restarted with --store alone serves what the catalog says.
    d.stop();
    assert!(!sock.exists(), "the socket is removed at shutdown");
    let mut d = start(dir, &[]);
    d.wait_for(std::slice::from_ref(&sock));
    assert_eq!(d.served(), ["vm1"]);
    assert!(reads(&sock, data.len()) == data, "the data survived");
    let json = d.ctl_ok(&["--json", "status", "vm1"]);
    assert!(json.contains("\"socket\""), "{json}");

    let out = d.ctl_ok(&["detach", "vm1"]);
    assert!(out.contains("detached: disk vm1"), "{out}");
    assert!(!sock.exists(), "detach removes the socket");
    assert!(attachments(dir).is_empty());
    assert!(d.served().is_empty());
    // Detached and restarted: not served; its data is kept.
    d.stop();
    let d = start(dir, &[]);
    assert!(d.served().is_empty(), "a detached disk is not served again");
    let listed = ok(&["disk", "list", path(&dir.join("st"))]);
    assert!(listed.contains("vm1"), "{listed}");

    let out = d.ctl_ok(&["disk-delete", "vm1"]);
    assert!(out.contains("deleted disk vm1"), "{out}");
    let listed = ok(&["disk", "list", path(&dir.join("st"))]);
    assert!(!listed.contains("vm1"), "{listed}");
    d.stop();
    store_check_clean(dir);
}

#[test]
fn a_guest_keeps_detach_away_unless_forced_and_forced_detach_keeps_what_was_flushed() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    new_store(dir);
    let d = start(dir, &[]);
    d.ctl_ok(&["disk-create", "vm1", "--size", "16M"]);
    let sock = dir.join("vm1.sock");
    d.ctl_ok(&["attach", "vm1", "--socket", path(&sock)]);
    let driver = TestDriver::connect(&sock, 1, 4 << 20);
    let data = pattern(5, 32 * 1024);
    driver.submit(0, &Req::write(8, &data)).assert_ok(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    // The daemon marks the guest connected once the connection is set up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value =
            serde_json::from_str(d.ctl_ok(&["--json", "status", "vm1"]).trim()).expect("JSON");
        if v["disks"][0]["guest_connected"] == Value::Bool(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never showed as connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = d.ctl_refused(&["detach", "vm1"]);
    assert!(e.contains("conflict"), "{e}");
    assert!(e.contains("a guest is connected to disk \"vm1\""), "{e}");
    assert!(sock.exists(), "still served");
    // A write after the refusal, then a forced detach: requests in flight complete, the
    // disk is flushed.
    let more = pattern(6, 16 * 1024);
    driver.submit(0, &Req::write(200, &more)).assert_ok(0);
    let out = d.ctl_ok(&["detach", "vm1", "--force"]);
    assert!(out.contains("its guest was disconnected"), "{out}");
    assert!(!sock.exists());
    drop(driver);
    // Attached again: what was written is there (the forced detach flushed it).
    d.ctl_ok(&["attach", "vm1", "--socket", path(&sock)]);
    let driver = TestDriver::connect(&sock, 1, 4 << 20);
    let c = driver.submit(0, &Req::read(8, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "the flushed write is there");
    let c = driver.submit(0, &Req::read(200, more.len() as u32));
    c.assert_ok(more.len() as u32);
    assert!(
        c.data == more,
        "the write before the forced detach was kept"
    );
    drop(driver);
    d.stop();
    store_check_clean(dir);
}

#[test]
fn a_listening_socket_passed_over_the_control_socket_serves_the_disk() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    new_store(dir);
    let d = start(dir, &[]);
    d.ctl_ok(&["disk-create", "vm1", "--size", "16M"]);
    let sock = dir.join("passed.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let fd = listener.as_raw_fd();
    // SAFETY: fcntl F_SETFD only changes the descriptor's flags: ctl inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let out = d.ctl_ok(&["attach", "vm1", "--socket-fd", &fd.to_string()]);
    assert!(
        out.contains(&format!("served on {}", sock.display())),
        "{out}"
    );
    drop(listener);
    assert_eq!(attachments(dir), vec![("vm1".to_string(), sock.clone())]);
    write_and_check(&sock, 3, 1);
    d.ctl_ok(&["detach", "vm1"]);

    // Not a listening socket: refused, nothing recorded.
    let file = std::fs::File::create(dir.join("plain")).expect("file");
    let fd = file.as_raw_fd();
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let e = d.ctl_refused(&["attach", "vm1", "--socket-fd", &fd.to_string()]);
    assert!(
        e.contains("the socket passed with the request: not a socket"),
        "{e}"
    );
    assert!(attachments(dir).is_empty());
    d.stop();
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    new_store(dir);
    ok(&[
        "disk",
        "create",
        path(&dir.join("st")),
        "vm1",
        "--size",
        "16M",
    ]);
    ok(&[
        "disk",
        "create",
        path(&dir.join("st")),
        "teed",
        "--size",
        "16M",
    ]);
    let d = start(dir, &[]);
    let sock = dir.join("vm1.sock");

    // Unknown disk, for every verb.
    let e = d.ctl_refused(&["attach", "nope", "--socket", path(&dir.join("n.sock"))]);
    assert!(e.contains("unknown-disk") && e.contains("nope"), "{e}");
    assert!(!dir.join("n.sock").exists());
    let e = d.ctl_refused(&["detach", "nope"]);
    assert!(e.contains("unknown-disk"), "{e}");
    let e = d.ctl_refused(&["disk-delete", "nope"]);
    assert!(e.contains("unknown-disk"), "{e}");
    // Duplicate name, bad sizes and layouts, bad names.
    let e = d.ctl_refused(&["disk-create", "vm1", "--size", "16M"]);
    assert!(e.contains("conflict") && e.contains("vm1"), "{e}");
    let e = d.ctl_refused(&["disk-create", "odd", "--size", "6144"]);
    assert!(e.contains("not a positive multiple of 4096"), "{e}");
    let e = d.ctl_refused(&["disk-create", "x", "--size", "16M", "--layout", "nope"]);
    assert!(
        e.contains("layout \"nope\" is not one a store disk can have"),
        "{e}"
    );
    let e = d.ctl_refused(&["disk-create", "../x", "--size", "16M"]);
    assert!(e.contains("invalid"), "{e}");

    // Socket paths: a regular file in the way (left untouched), a missing directory, too
    // long, a socket another process serves.
    let file = dir.join("file");
    std::fs::write(&file, b"precious").expect("write");
    let e = d.ctl_refused(&["attach", "vm1", "--socket", path(&file)]);
    assert!(
        e.contains("a file that is not a socket is in the way"),
        "{e}"
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"precious");
    let missing = dir.join("missing").join("vm1.sock");
    let e = d.ctl_refused(&["attach", "vm1", "--socket", path(&missing)]);
    assert!(e.contains("does not exist"), "{e}");
    let long = dir.join("x".repeat(120));
    let e = d.ctl_refused(&["attach", "vm1", "--socket", path(&long)]);
    assert!(
        e.contains("socket path is") && e.contains("not 1 to 107"),
        "{e}"
    );
    let other = dir.join("other.sock");
    let _held = std::os::unix::net::UnixListener::bind(&other).expect("bind");
    let e = d.ctl_refused(&["attach", "vm1", "--socket", path(&other)]);
    assert!(
        e.contains("another process is already serving on it"),
        "{e}"
    );
    let e = d.ctl_refused(&[
        "attach",
        "vm1",
        "--socket",
        path(&sock),
        "--serial",
        &"s".repeat(21),
    ]);
    assert!(e.contains("serial is 21 bytes"), "{e}");
    let e = d.ctl_refused(&["attach", "vm1", "--socket", path(&dir.join("ctl.sock"))]);
    assert!(
        e.contains("another process is already serving on it"),
        "{e}"
    );
    assert!(attachments(dir).is_empty(), "no bad attach was recorded");

    // Attached: a second attach, one on the same socket, and a delete are refused.
    d.ctl_ok(&["attach", "vm1", "--socket", path(&sock)]);
    let e = d.ctl_refused(&["attach", "vm1", "--socket", path(&dir.join("again.sock"))]);
    assert!(e.contains("disk \"vm1\" is attached already"), "{e}");
    let e = d.ctl_refused(&["attach", "teed", "--socket", path(&sock)]);
    assert!(e.contains("conflict"), "{e}");
    let e = d.ctl_refused(&["disk-delete", "vm1"]);
    assert!(
        e.contains("conflict") && e.contains("detach it first"),
        "{e}"
    );

    // A teed disk, and one migrating, cannot be detached (nor deleted).
    let tsock = dir.join("teed.sock");
    d.ctl_ok(&["attach", "teed", "--socket", path(&tsock)]);
    d.ctl_ok(&["tee", "teed", "--policy", "mirror-only"]);
    let e = d.ctl_refused(&["detach", "teed"]);
    assert!(e.contains("disk \"teed\" is teed"), "{e}");
    d.ctl_ok(&["migrate", "teed", "--rate", "4K"]);
    let e = d.ctl_refused(&["detach", "teed", "--force"]);
    assert!(e.contains("disk \"teed\" is migrating"), "{e}");
    assert!(tsock.exists(), "still served");
    d.ctl_ok(&["untee", "teed"]);
    d.ctl_ok(&["detach", "teed"]);
    assert_eq!(d.served(), ["vm1"]);
    d.stop();
    store_check_clean(dir);
}

#[test]
fn lifecycle_commands_are_refused_where_they_cannot_work() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    new_store(dir);
    ok(&[
        "disk",
        "create",
        path(&dir.join("st")),
        "vm1",
        "--size",
        "16M",
    ]);
    // A read-only daemon changes nothing.
    let d = start(dir, &["--read-only"]);
    let e = d.ctl_refused(&["disk-create", "vm2", "--size", "16M"]);
    assert!(e.contains("read-only"), "{e}");
    let e = d.ctl_refused(&["attach", "vm1", "--socket", path(&dir.join("a.sock"))]);
    assert!(e.contains("read-only"), "{e}");
    d.stop();
}

#[test]
fn a_detached_disk_is_imported_live_only_from_the_import_directory() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    new_store(dir);
    let images = dir.join("images");
    std::fs::create_dir(&images).expect("mkdir");
    let data = pattern(23, 1 << 20);
    std::fs::write(images.join("vm1.img"), &data).expect("image");
    let outside = dir.join("secret.img");
    std::fs::write(&outside, pattern(1, 4096)).expect("outside");
    std::os::unix::fs::symlink(&outside, images.join("link.img")).expect("symlink");

    // Without --import-dir: refused.
    let d = start(dir, &[]);
    let e = d.ctl_refused(&["import", "vm1", "vm1.img"]);
    assert!(e.contains("forbidden") && e.contains("--import-dir"), "{e}");
    d.stop();

    let d = start(dir, &["--import-dir", path(&images)]);
    // Paths out of the directory, a symlink, a missing file: refused, nothing created.
    for (from, why) in [
        (path(&outside), "must be a plain file name"),
        ("../secret.img", "must be a plain file name"),
        ("link.img", "it is a symlink"),
        ("nope.img", "it does not exist"),
    ] {
        let e = d.ctl_refused(&["import", "vm1", from]);
        assert!(e.contains(why), "{from}: {e}");
    }
    let listed = ok(&["disk", "list", path(&dir.join("st"))]);
    assert!(!listed.contains("vm1"), "{listed}");

    let out = d.ctl_ok(&["import", "vm1", "vm1.img"]);
    assert!(
        out.contains("imported") && out.contains("into disk vm1"),
        "{out}"
    );
    // An attached disk is not imported into.
    let sock = dir.join("vm1.sock");
    d.ctl_ok(&["attach", "vm1", "--socket", path(&sock)]);
    let e = d.ctl_refused(&["import", "vm1", "vm1.img"]);
    assert!(
        e.contains("conflict") && e.contains("detach it first"),
        "{e}"
    );
    let driver = TestDriver::connect(&sock, 1, 4 << 20);
    let c = driver.submit(0, &Req::read(0, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "the imported image reads back");
    drop(driver);
    d.stop();
    store_check_clean(dir);
}
