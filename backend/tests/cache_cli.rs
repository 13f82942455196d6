//! `dovetail serve --cache` and `--io-engine` as an operator meets them: the real binary serving
//! an image with direct I/O, and refusing what it cannot do with a message and exit status 1.

mod cli;
mod common;

use cli::{dovetail, fails, path};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pattern, Req};

/// Serves an image with `--cache none` on 2 queues: a guest's writes (many in flight), FLUSH
/// and reads go through, the bytes are in the image file, and the log names the cache mode.
#[test]
fn an_image_served_with_cache_none_round_trips_and_says_so() {
    for (cache, engine) in [("none", "auto"), ("none", "threads"), ("writeback", "auto")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (img, sock, log) = (
            dir.path().join("d.img"),
            dir.path().join("d.sock"),
            dir.path().join("serve.log"),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(["serve", "--image", path(&img), "--size", "8MiB", "--socket"])
            .arg(&sock)
            .args(["--queues", "2", "--cache", cache, "--io-engine", engine])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(child.try_wait().expect("wait").is_none(), "serve exited");
            assert!(Instant::now() < deadline, "serve never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
        let driver = common::TestDriver::connect(&sock, 2, 16 << 20);
        let data = |i: u64| pattern(300 + i, 8192);
        for q in 0..2 {
            let writes: Vec<_> = (0..32u64)
                .map(|i| Req::write((q * 32 + i) * 16, &data(q * 32 + i)))
                .collect();
            for c in driver.submit_batch(q as usize, &writes) {
                c.assert_ok(0);
            }
            driver.submit(q as usize, &Req::flush()).assert_ok(0);
            let reads: Vec<_> = (0..32u64)
                .map(|i| Req::read((q * 32 + i) * 16, 8192))
                .collect();
            for (i, c) in driver.submit_batch(q as usize, &reads).iter().enumerate() {
                c.assert_ok(8192);
                assert!(
                    c.data == data(q * 32 + i as u64),
                    "{cache}: read {i} differs"
                );
            }
        }
        drop(driver);
        let file = std::fs::File::open(&img).expect("image");
        for i in 0..64u64 {
            let mut b = vec![0u8; 8192];
            file.read_exact_at(&mut b, i * 16 * 512)
                .expect("read image");
            assert!(b == data(i), "{cache}: block {i} not in the image");
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let st = child.wait().expect("wait");
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(st.success(), "serve exits 0: {text}");
        assert!(text.contains(&format!("cache mode {cache}")), "{text}");
    }
}

#[test]
fn cache_and_engine_values_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("d.img");
    // Usage errors: exit status 2, as clap reports them.
    let usage = |args: &[&str]| {
        let out = dovetail(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = usage(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "1MiB",
        "--cache",
        "direct",
    ]);
    assert!(e.contains("expected none (direct I/O) or writeback"), "{e}");
    let e = usage(&[
        "serve",
        "--image",
        path(&img),
        "--size",
        "1MiB",
        "--io-engine",
        "aio",
    ]);
    assert!(e.contains("expected auto"), "{e}");
    assert!(!img.exists(), "nothing created");
    let store = dir.path().join("st");
    let e = fails(&[
        "serve",
        "--store",
        path(&store),
        "--disk",
        "a=/nonexistent/a.sock",
        "--cache",
        "none",
    ]);
    assert!(e.contains("--cache none is for --image"), "{e}");
}
