//! `dovetail serve --cache` and `--io-engine` as an operator meets them: the real binary serving
//! an image and a store with direct I/O, and refusing what it cannot do with a message and exit
//! status 1.

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
    // A store that does not exist is still refused as such with --cache none.
    let store = dir.path().join("st");
    let sock = format!("a={}", path(&dir.path().join("a.sock")));
    let e = fails(&[
        "serve",
        "--store",
        path(&store),
        "--disk",
        &sock,
        "--cache",
        "none",
    ]);
    assert!(e.contains("no store"), "{e}");
}

/// `serve --store --cache none`: disks of every store layout (parallax-v1, parallax-v2, and a
/// Tee of a parallax-v1 trusted version and a parallax-v2 candidate) on 2 queues take writes
/// (many in flight, whole and partial blocks, from guest buffers aligned or not), FLUSH and
/// reads; the log names the cache mode; after the daemon stops, `disk export` (buffered, offline)
/// finds every byte and `store check` finds the store consistent.
#[test]
fn a_store_served_with_cache_none_round_trips_every_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    let log = dir.path().join("serve.log");
    let d = path(&st);
    cli::ok(&[
        "store",
        "create",
        d,
        "--size",
        "256M",
        "--extent-size",
        "4M",
    ]);
    cli::ok(&["disk", "create", d, "v1", "--size", "16M"]);
    cli::ok(&[
        "disk",
        "create",
        d,
        "v2",
        "--size",
        "16M",
        "--layout",
        "parallax-v2",
    ]);
    cli::ok(&["disk", "create", d, "tee", "--size", "16M"]);
    cli::ok(&["disk", "tee", d, "tee", "--candidate", "parallax-v2"]);
    let disks = ["v1", "v2", "tee"];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
    cmd.args(["serve", "--store", d, "--queues", "2", "--cache", "none"]);
    for n in disks {
        cmd.arg("--disk").arg(format!(
            "{n}={}",
            path(&dir.path().join(format!("{n}.sock")))
        ));
    }
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !disks
        .iter()
        .all(|n| dir.path().join(format!("{n}.sock")).exists())
    {
        if child.try_wait().expect("wait").is_some() {
            panic!(
                "serve exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "serve never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
    // What each disk must hold: 8 KiB blocks 0..64 on two queues, then a 512-byte write
    // into the middle of block 3 and one of 1536 bytes from a misaligned guest buffer.
    let data = |i: u64| pattern(900 + i, 8192);
    let mut want = vec![0u8; 64 * 8192];
    for i in 0..64u64 {
        want[(i * 8192) as usize..((i + 1) * 8192) as usize].copy_from_slice(&data(i));
    }
    let small = pattern(77, 512);
    want[3 * 8192 + 1024..3 * 8192 + 1536].copy_from_slice(&small);
    let odd = pattern(78, 1536);
    want[20 * 8192 + 512..20 * 8192 + 2048].copy_from_slice(&odd);
    for n in disks {
        let sock = dir.path().join(format!("{n}.sock"));
        let driver = common::TestDriver::connect(&sock, 2, 32 << 20);
        for q in 0..2u64 {
            let writes: Vec<_> = (0..32u64)
                .map(|i| Req::write((q * 32 + i) * 16, &data(q * 32 + i)))
                .collect();
            for c in driver.submit_batch(q as usize, &writes) {
                c.assert_ok(0);
            }
        }
        driver
            .submit(0, &Req::write(3 * 16 + 2, &small))
            .assert_ok(0);
        misaligned_write(&driver, 20 * 16 + 1, &odd);
        driver.submit(1, &Req::flush()).assert_ok(0);
        for q in 0..2u64 {
            let reads: Vec<_> = (0..32u64)
                .map(|i| Req::read((q * 32 + i) * 16, 8192))
                .collect();
            for (i, c) in driver.submit_batch(q as usize, &reads).iter().enumerate() {
                c.assert_ok(8192);
                let b = (q * 32 + i as u64) as usize;
                assert!(
                    c.data[..] == want[b * 8192..(b + 1) * 8192],
                    "{n}: block {b} read back wrong"
                );
            }
        }
        // A 512-byte read inside a block, into a buffer direct I/O cannot take as it is.
        let c = driver.submit(0, &Req::read(3 * 16 + 2, 512));
        c.assert_ok(512);
        assert!(c.data == small, "{n}: the partial block read back wrong");
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st_code = child.wait().expect("wait");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(st_code.success(), "serve exits 0: {text}");
    assert!(text.contains("cache mode none"), "{text}");
    for n in disks {
        let out = dir.path().join(format!("{n}.img"));
        cli::ok(&["disk", "export", d, n, "--to", path(&out)]);
        let bytes = std::fs::read(&out).expect("export");
        assert_eq!(bytes.len(), 16 << 20, "{n}");
        assert!(bytes[..want.len()] == want[..], "{n}: the export differs");
        assert!(
            bytes[want.len()..].iter().all(|&b| b == 0),
            "{n}: past the data"
        );
    }
    let report = cli::ok(&["store", "check", d]);
    assert!(report.contains("result: consistent"), "{report}");
}

/// A write of `data` at `sector` from a guest buffer 8 bytes past a page boundary.
fn misaligned_write(driver: &common::TestDriver, sector: u64, data: &[u8]) {
    use common::{header, Buf};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    use vm_memory::{Bytes, GuestAddress};
    let (area, len) = driver.queue(0).expect("queue").data_area();
    assert!(len > 8 << 20, "data area of {len} bytes");
    let src = GuestAddress(((area.0 + (6 << 20) + 4095) & !4095) + 8);
    driver.memory().write_slice(data, src).expect("guest write");
    let bufs = vec![
        Buf::Out(header(VIRTIO_BLK_T_OUT, sector)),
        Buf::Raw {
            addr: src.0,
            len: data.len() as u32,
            writable: false,
        },
        Buf::In(1),
    ];
    driver.submit(0, &bufs).assert_ok(0);
}
