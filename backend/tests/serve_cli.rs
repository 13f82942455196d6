//! `dovetail serve` refusing what it cannot serve, as an operator meets it: the real binary,
//! its message and exit status, and no file left behind.

mod cli;
mod common;

use cli::{fails, ok, path};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `dovetail serve ARGS` in the background, logging at info to `log`; returns once every
/// path of `wait_for` exists.
fn spawn_serve(args: &[&str], log: &Path, wait_for: &[&Path]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("out")).expect("stdout"))
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !wait_for.iter().all(|p| p.exists()) {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!(
                "serve exited at start ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "serve never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// SIGTERM, then the exit status must be 0; returns the log and stdout.
fn stop_serve(mut child: Child, log: &Path) -> (String, String) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = child.wait().expect("wait");
    let text = std::fs::read_to_string(log).expect("log");
    assert!(st.success(), "serve exits 0 on SIGTERM ({st}): {text}");
    let out = std::fs::read_to_string(log.with_extension("out")).expect("stdout");
    (text, out)
}

/// `YYYY-MM-DD HH:MM:SSZ` somewhere in `s`.
fn has_utc_time(s: &str) -> bool {
    s.as_bytes().windows(20).any(|w| {
        let d = |i: usize| w[i].is_ascii_digit();
        (0..4).all(d)
            && w[4] == b'-'
            && d(5)
            && d(6)
            && w[7] == b'-'
            && d(8)
            && d(9)
            && w[10] == b' '
            && d(11)
            && d(12)
            && w[13] == b':'
            && d(14)
            && d(15)
            && w[16] == b':'
            && d(17)
            && d(18)
            && w[19] == b'Z'
    })
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_size_no_file_can_have_leaves_no_image_and_a_retry_serves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("i.img");
    let sock = dir.path().join("x.sock");
    let e = fails(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "9223372036854775808",
        "--socket",
        path(&sock),
    ]);
    assert!(
        e.contains(
            "--size 9223372036854775808: an image file is at most 9223372036854775807 bytes"
        ),
        "{e}"
    );
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));

    // 8191 TiB fits a file size but not ext4 (16 TiB at most). On a file system that takes it
    // (sparse), the taken metrics port stops the run, and the image it created goes too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = cli::dovetail(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "8191T",
        "--socket",
        path(&sock),
        "--metrics",
        &addr,
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    if e.contains("does not allow a file that large") {
        assert!(
            e.contains("cannot create image") && e.contains("9006099743113216 bytes"),
            "{e}"
        );
        assert!(!e.contains("out of range integral"), "{e}");
    } else {
        assert!(e.contains("cannot serve metrics"), "{e}");
    }
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));

    // A retry without --size finds no image: it is not served as an empty disk.
    let e = fails(&["serve", "--image", path(&img), "--socket", path(&sock)]);
    assert!(e.contains("image does not exist"), "{e}");
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}

#[test]
fn an_image_of_no_sectors_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("i.img");
    std::fs::File::create(&img).expect("0-byte image");
    let sock = dir.path().join("x.sock");
    let e = fails(&["serve", "--image", path(&img), "--socket", path(&sock)]);
    assert!(
        e.contains("i.img is 0 bytes: a disk of no sectors cannot be served"),
        "{e}"
    );
    assert_eq!(names(dir.path()), ["i.img"]);
}

#[test]
fn a_socket_that_cannot_be_made_is_refused_before_the_image_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("i.img");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--image", path(&img), "--size", "1M"];
        args.extend_from_slice(extra);
        let e = fails(&args);
        assert!(
            names(dir.path()).is_empty(),
            "{extra:?}: {:?}",
            names(dir.path())
        );
        e
    };
    let e = serve(&["--socket", "/nonexistent/x.sock"]);
    assert!(
        e.contains("cannot listen on /nonexistent/x.sock (the disk's --socket): directory /nonexistent does not exist"),
        "{e}"
    );
    let long = dir.path().join("s".repeat(120));
    let e = serve(&["--socket", path(&long)]);
    assert!(e.contains("a Unix socket path is at most 107"), "{e}");
    let sock = dir.path().join("x.sock");
    let e = serve(&[
        "--socket",
        path(&sock),
        "--control",
        "/nonexistent/ctl.sock",
    ]);
    assert!(
        e.contains("cannot listen on /nonexistent/ctl.sock (--control): directory /nonexistent"),
        "{e}"
    );
    let e = serve(&["--socket", path(&sock), "--control", path(&sock)]);
    assert!(
        e.contains("the disk's --socket and --control are both given the socket"),
        "{e}"
    );
    // A plain file in the socket's place.
    let file = tempfile::NamedTempFile::new().expect("file");
    let e = fails(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "1M",
        "--socket",
        path(file.path()),
    ]);
    assert!(
        e.contains("a file that is not a socket is in the way"),
        "{e}"
    );
    assert!(!img.exists());
}

#[test]
fn an_image_this_run_created_goes_when_serving_cannot_start() {
    // The metrics port is taken: found only once the image exists.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("i.img");
    let sock = dir.path().join("x.sock");
    let e = fails(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "1M",
        "--socket",
        path(&sock),
        "--metrics",
        &addr,
    ]);
    assert!(e.contains("metrics"), "{e}");
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));

    // An image that was there before is never removed.
    std::fs::write(&img, vec![7u8; 1 << 20]).expect("image");
    fails(&[
        "serve",
        "--image",
        path(&img),
        "--socket",
        path(&sock),
        "--metrics",
        &addr,
    ]);
    assert_eq!(std::fs::read(&img).expect("image"), vec![7u8; 1 << 20]);
}

#[test]
fn two_disks_given_one_socket_are_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    cli::ok(&[
        "store",
        "create",
        path(&st),
        "--size",
        "64M",
        "--extent-size",
        "4M",
    ]);
    for d in ["a", "b"] {
        cli::ok(&["disk", "create", path(&st), d, "--size", "8M"]);
    }
    let sock = dir.path().join("x.sock");
    let other = dir.path().join("sub/../x.sock");
    std::fs::create_dir(dir.path().join("sub")).expect("sub");
    let e = fails(&[
        "serve",
        "--store",
        path(&st),
        "--disk",
        &format!("a={}", path(&sock)),
        "--disk",
        &format!("b={}", path(&other)),
    ]);
    assert!(
        e.contains("disk a and disk b are both given the socket"),
        "{e}"
    );
    assert!(!e.contains("another process"), "{e}");
    assert!(!sock.exists());
    let e = fails(&[
        "serve",
        "--store",
        path(&st),
        "--disk",
        &format!("a={}", path(&sock)),
        "--disk",
        "b=/nonexistent/b.sock",
    ]);
    assert!(
        e.contains(
            "cannot listen on /nonexistent/b.sock (disk b): directory /nonexistent does not exist"
        ),
        "{e}"
    );
    assert!(!sock.exists());
}

#[test]
fn an_image_served_under_a_name_is_named_in_logs_control_and_the_qemu_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, sock, ctl) = (
        dir.path().join("i.img"),
        dir.path().join("vm7.sock"),
        dir.path().join("ctl.sock"),
    );
    let log = dir.path().join("serve.log");
    let child = spawn_serve(
        &[
            "--image",
            path(&img),
            "--size",
            "1MiB",
            "--name",
            "vm7",
            "--socket",
            path(&sock),
            "--control",
            path(&ctl),
        ],
        &log,
        &[&sock, &ctl],
    );
    let status = ok(&["ctl", "--control", path(&ctl), "status", "vm7"]);
    assert!(status.contains("vm7"), "{status}");
    // A guest comes and goes.
    let guest = common::TestDriver::connect(&sock, 1, 1 << 20);
    drop(guest);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("disk vm7: guest 1 disconnected")
    {
        assert!(Instant::now() < deadline, "no disconnect line");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (text, out) = stop_serve(child, &log);
    assert!(text.contains("disk vm7: guest 1 connected"), "{text}");
    assert!(text.contains("disk vm7: shutting down"), "{text}");
    assert!(
        out.contains("-chardev socket,id=dovetail-vm7,path=")
            && out.contains("vhost-user-blk-pci,chardev=dovetail-vm7,"),
        "{out}"
    );
    assert_eq!(std::fs::metadata(&img).expect("image").len(), 1 << 20);
}

#[test]
fn serve_flags_that_make_no_sense_alone_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("i.img");
    let out = cli::dovetail(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "1M",
        "--control-mode",
        "0660",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("--control <PATH>"), "{e}");
    let e = fails(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "1M",
        "--name",
        "../x",
    ]);
    assert!(e.contains("--name: disk name \"../x\" is invalid"), "{e}");
    let out = cli::dovetail(&["serve", "--image", path(&img), "--size", "1GB"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("is ambiguous") && e.contains("1G or 1GiB"),
        "{e}"
    );
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}

#[test]
fn sizes_take_iec_suffixes_and_snapshot_times_are_printed_as_utc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    let out = ok(&[
        "store",
        "create",
        path(&st),
        "--size",
        "256MiB",
        "--extent-size",
        "4MiB",
    ]);
    assert!(
        out.contains("256 MiB") || out.contains("256.0 MiB"),
        "{out}"
    );
    ok(&["disk", "create", path(&st), "a", "--size", "16MiB"]);
    let out = cli::dovetail(&["disk", "create", path(&st), "b", "--size", "16MB"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {e}");
    assert!(
        e.contains(
            "\"16MB\" is ambiguous (MB may mean a power of 1000 or of 1024): write 16M or 16MiB"
        ),
        "{e}"
    );
    ok(&["disk", "snapshot", path(&st), "a", "--name", "s1"]);
    let out = ok(&["disk", "snapshots", path(&st), "a"]);
    assert!(has_utc_time(&out), "{out}");

    // Live: `ctl snapshots` and `ctl events` print times; --json keeps the numbers.
    let (sock, ctl) = (dir.path().join("a.sock"), dir.path().join("ctl.sock"));
    let log = dir.path().join("serve.log");
    let child = spawn_serve(
        &[
            "--store",
            path(&st),
            "--disk",
            &format!("a={}", path(&sock)),
            "--control",
            path(&ctl),
        ],
        &log,
        &[&sock, &ctl],
    );
    let c = path(&ctl);
    ok(&["ctl", "--control", c, "snapshot", "a", "--name", "s2"]);
    let out = ok(&["ctl", "--control", c, "snapshots", "a"]);
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with('s')).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| has_utc_time(l)), "{out}");
    let json = ok(&["ctl", "--control", c, "--json", "snapshots", "a"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    assert!(v["snapshots"][0]["created"].as_u64().is_some(), "{json}");
    let out = ok(&["ctl", "--control", c, "events"]);
    assert!(out.contains("snapshot") && has_utc_time(&out), "{out}");
    let json = ok(&["ctl", "--control", c, "--json", "events"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    assert!(v["events"][0]["unix_ms"].as_u64().is_some(), "{json}");
    stop_serve(child, &log);
}
