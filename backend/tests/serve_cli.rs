//! `dovetail serve` refusing what it cannot serve, as an operator meets it: the real binary,
//! its message and exit status, and no file left behind.

mod cli;

use cli::{fails, path};
use std::path::Path;

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
}
