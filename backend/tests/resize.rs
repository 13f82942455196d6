//! Growing a disk: `dovetail ctl resize` on a served disk (raw image, parallax-v1,
//! parallax-v2) with a frontend connected (bench's driver, in this process), which gets the
//! config-change message, reads the new capacity from the config space and does I/O past
//! the old end; `dovetail disk resize` offline; and every bad input refused with a clear error
//! and nothing changed.

mod cli;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{fails, ok, path, store_create};
use dovetail_bench::driver::{Driver, DriverOptions, Req};

const MIB: u64 = 1 << 20;

struct Serving {
    child: Child,
    log: std::path::PathBuf,
}

impl Serving {
    fn start(dir: &Path, args: &[String]) -> Serving {
        let log = dir.join("serve.log");
        let mut all = vec!["serve".to_string()];
        all.extend(args.iter().cloned());
        all.extend([
            "--control".to_string(),
            path(&dir.join("ctl.sock")).to_string(),
        ]);
        let child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(&all)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("ctl.sock").exists() || !dir.join("a.sock").exists() {
            assert!(Instant::now() < deadline, "the sockets never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Serving { child, log }
    }

    fn stop(mut self) -> String {
        // SAFETY: kill only sends a signal to the child process this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "serve exits 0 on SIGTERM: {status}");
        std::fs::read_to_string(&self.log).expect("log")
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command line clap refuses: exit status 2, its message on stderr.
fn usage_error(args: &[&str]) -> String {
    let out = cli::dovetail(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The served disk `a` grows from 64 MiB to 96 MiB under a connected frontend; bad resizes
/// change nothing.
fn grow_served(dir: &Path, serve_args: &[String], disk: &str) -> String {
    let serving = Serving::start(dir, serve_args);
    let ctl_sock = dir.join("ctl.sock");
    let ctl = path(&ctl_sock);
    let driver = Driver::connect(&dir.join("a.sock"), DriverOptions::new(1, 16 << 20))
        .expect("connect the frontend");
    let changes = driver.config_changes().expect("backend request channel");
    let old = 64 * MIB / 512;
    assert_eq!(driver.blk_config().expect("config").capacity, old);
    let last = pattern(1, 4096);
    driver
        .submit(0, &Req::write(old - 8, &last))
        .expect("submit")
        .assert_ok(0);
    // Past the end: refused before the resize.
    let c = driver
        .submit(0, &Req::write(old, &last))
        .expect("submit past the end");
    assert_ne!(c.status, Some(0), "a write past the end fails");

    // Bad input: a clear error each, and nothing changed.
    for (args, want) in [
        (vec![disk, "32M"], "shrinking it"),
        (vec![disk, "64M"], "already that size"),
        (vec!["nope", "128M"], "unknown-disk"),
        (vec![disk, "abc"], "is not a size"),
        (vec![disk, "67109376"], "not a positive multiple of 4096"),
    ] {
        let mut all = vec!["ctl", "--control", ctl, "resize"];
        all.extend(&args);
        let out = match want {
            "already that size" => ok(&all),
            "is not a size" => usage_error(&all),
            _ => fails(&all),
        };
        assert!(
            out.contains(want),
            "resize {args:?}: want {want:?} in {out}"
        );
    }
    assert_eq!(changes.pending(), 0, "no change, no notification");
    assert_eq!(driver.blk_config().expect("config").capacity, old);

    let out = ok(&["ctl", "--control", ctl, "resize", disk, "96M"]);
    assert!(out.contains("grown from 64 MiB to 96 MiB"), "{out}");
    assert!(out.contains("the guest was told"), "{out}");
    assert!(
        changes.wait(Duration::from_secs(5)),
        "the frontend got the config-change message"
    );
    let new = 96 * MIB / 512;
    assert_eq!(driver.blk_config().expect("config").capacity, new);
    // I/O past the old end, up to the new last sector; the old data is still there.
    let past = pattern(2, 8192);
    driver
        .submit(0, &Req::write(old, &past))
        .expect("submit")
        .assert_ok(0);
    let tail = pattern(3, 4096);
    driver
        .submit(0, &Req::write(new - 8, &tail))
        .expect("submit")
        .assert_ok(0);
    driver.submit(0, &Req::flush()).expect("flush").assert_ok(0);
    for (at, want) in [(old - 8, &last), (old, &past), (new - 8, &tail)] {
        let c = driver
            .submit(0, &Req::read(at, want.len() as u32))
            .expect("read");
        c.assert_ok(want.len() as u32);
        assert_eq!(&c.data, want, "sector {at}");
    }
    let c = driver
        .submit(0, &Req::read(new, 512))
        .expect("read past the new end");
    assert_ne!(c.status, Some(0), "the new end is enforced");
    let status = ok(&["ctl", "--control", ctl, "--json", "status", disk]);
    let v: serde_json::Value = serde_json::from_str(status.trim()).expect("JSON");
    assert_eq!(v["disks"][0]["size"], 96 * MIB, "{status}");
    drop(driver);
    serving.stop()
}

fn store_with(dir: &Path, layout: &str) -> std::path::PathBuf {
    let st = dir.join("st");
    store_create(&st);
    ok(&[
        "disk",
        "create",
        path(&st),
        "a",
        "--size",
        "64M",
        "--layout",
        layout,
    ]);
    st
}

fn grow_store_disk(layout: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = store_with(dir.path(), layout);
    let args = vec![
        "--store".to_string(),
        path(&st).to_string(),
        "--disk".to_string(),
        format!("a={}", path(&dir.path().join("a.sock"))),
    ];
    let log = grow_served(dir.path(), &args, "a");
    assert!(log.contains("resized") || log.contains("grown"), "{log}");
    let list = ok(&["disk", "list", path(&st)]);
    assert!(list.contains("96"), "{list}");
    let check = ok(&["store", "check", path(&st), "--data"]);
    assert!(check.contains("result: consistent"), "{check}");
    // The grown size survives a restart: the disk is served at 96 MiB.
    let serving = Serving::start(dir.path(), &args);
    let driver = Driver::connect(&dir.path().join("a.sock"), DriverOptions::new(1, 16 << 20))
        .expect("connect again");
    assert_eq!(
        driver.blk_config().expect("config").capacity,
        96 * MIB / 512
    );
    let c = driver
        .submit(0, &Req::read(64 * MIB / 512, 8192))
        .expect("read");
    c.assert_ok(8192);
    assert_eq!(
        c.data,
        pattern(2, 8192),
        "written past the old end, durable"
    );
    drop(driver);
    serving.stop();
}

#[test]
fn ctl_resize_grows_a_parallax_v1_disk_under_a_frontend() {
    grow_store_disk("parallax-v1");
}

#[test]
fn ctl_resize_grows_a_parallax_v2_disk_under_a_frontend() {
    grow_store_disk("parallax-v2");
}

#[test]
fn ctl_resize_grows_a_raw_image_under_a_frontend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 * MIB))
        .expect("image");
    let args = vec![
        "--image".to_string(),
        path(&img).to_string(),
        "--socket".to_string(),
        path(&dir.path().join("a.sock")).to_string(),
    ];
    grow_served(dir.path(), &args, "a.img");
    assert_eq!(std::fs::metadata(&img).expect("image").len(), 96 * MIB);
}

#[test]
fn disk_resize_offline_and_its_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = store_with(dir.path(), "parallax-v2");
    let s = path(&st);
    for (args, want) in [
        (vec!["a", "32M"], "shrinking it"),
        (vec!["nope", "128M"], "nope"),
        (vec!["a", "1T"], "the store holds"),
        (vec!["a", "abc"], "is not a size"),
        (vec!["a", "67109376"], "not a positive multiple of 4096"),
    ] {
        let mut all = vec!["disk", "resize", s];
        all.extend(&args);
        let e = if want == "is not a size" {
            usage_error(&all)
        } else {
            fails(&all)
        };
        assert!(
            e.contains(want),
            "disk resize {args:?}: want {want:?} in {e}"
        );
    }
    let list = ok(&["disk", "list", s]);
    assert!(list.contains("64"), "unchanged: {list}");
    let out = ok(&["disk", "resize", s, "a", "200M"]);
    assert!(out.contains("grown from 64 MiB to 200 MiB"), "{out}");
    let check = ok(&["store", "check", s]);
    assert!(check.contains("result: consistent"), "{check}");
    let img = dir.path().join("out.img");
    ok(&["disk", "export", s, "a", "--to", path(&img)]);
    assert_eq!(std::fs::metadata(&img).expect("export").len(), 200 * MIB);
}

/// Killed between the catalog's commit of the new size and the version's grow (crash point
/// `resize-committed`): the store checks consistent, and the next open finishes the grow with
/// the data intact.
#[cfg(feature = "failpoints")]
#[test]
fn a_resize_killed_after_the_catalog_commit_finishes_at_the_next_open() {
    for layout in ["parallax-v1", "parallax-v2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = store_with(dir.path(), layout);
        let s = path(&st);
        let img = dir.path().join("in.img");
        let mut data = vec![0u8; (64 * MIB) as usize];
        data[..8192].copy_from_slice(&pattern(5, 8192));
        let end = data.len();
        data[end - 4096..].copy_from_slice(&pattern(6, 4096));
        std::fs::write(&img, &data).expect("image");
        ok(&["disk", "import", s, "a", "--from", path(&img)]);
        let out = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(["disk", "resize", s, "a", "96M"])
            .env("FAILPOINTS", "resize-committed=return")
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            None,
            "{layout}: killed at the point: {out:?}"
        );
        let check = ok(&["store", "check", s, "--data"]);
        assert!(check.contains("result: consistent"), "{layout}: {check}");
        let exported = dir.path().join("out.img");
        ok(&["disk", "export", s, "a", "--to", path(&exported)]);
        let back = std::fs::read(&exported).expect("export");
        assert_eq!(
            back.len() as u64,
            96 * MIB,
            "{layout}: grown at the next open"
        );
        assert!(back[..end] == data[..], "{layout}: the old data");
        assert!(
            back[end..].iter().all(|&b| b == 0),
            "{layout}: the new blocks"
        );
        let check = ok(&["store", "check", s, "--data"]);
        assert!(check.contains("result: consistent"), "{layout}: {check}");
    }
}

/// A teed disk with a copy-out running grows live: the Tee is attached again grown (both
/// versions, the presence map, the migration record), the copy-out resumes, the frontend is
/// told and writes past the old end reach both versions; after a restart the candidate is
/// still active and the migration finishes.
#[test]
fn ctl_resize_grows_a_teed_disk_with_its_candidate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = store_with(dir.path(), "parallax-v1");
    let args = vec![
        "--store".to_string(),
        path(&st).to_string(),
        "--disk".to_string(),
        format!("a={}", path(&dir.path().join("a.sock"))),
    ];
    let serving = Serving::start(dir.path(), &args);
    let ctl_sock = dir.path().join("ctl.sock");
    let ctl = path(&ctl_sock);
    let driver = Driver::connect(&dir.path().join("a.sock"), DriverOptions::new(1, 16 << 20))
        .expect("connect");
    let changes = driver.config_changes().expect("backend request channel");
    let old = 64 * MIB / 512;
    let first = pattern(7, 4096);
    driver
        .submit(0, &Req::write(old - 8, &first))
        .expect("submit")
        .assert_ok(0);
    driver.submit(0, &Req::flush()).expect("flush").assert_ok(0);
    ok(&[
        "ctl",
        "--control",
        ctl,
        "tee",
        "a",
        "--candidate",
        "parallax-v2",
        "--policy",
        "sync-read-checks",
    ]);
    ok(&["ctl", "--control", ctl, "migrate", "a", "--rate", "1M"]);
    let out = ok(&["ctl", "--control", ctl, "resize", "a", "96M"]);
    assert!(out.contains("the guest was told"), "{out}");
    assert!(changes.wait(Duration::from_secs(5)), "config change");
    let new = 96 * MIB / 512;
    assert_eq!(driver.blk_config().expect("config").capacity, new);
    let past = pattern(8, 8192);
    driver
        .submit(0, &Req::write(old, &past))
        .expect("submit")
        .assert_ok(0);
    driver.submit(0, &Req::flush()).expect("flush").assert_ok(0);
    for (at, want) in [(old - 8, &first), (old, &past)] {
        let c = driver
            .submit(0, &Req::read(at, want.len() as u32))
            .expect("read");
        c.assert_ok(want.len() as u32);
        assert_eq!(&c.data, want, "sector {at}");
    }
    let status = ok(&["ctl", "--control", ctl, "--json", "status", "a"]);
    let v: serde_json::Value = serde_json::from_str(status.trim()).expect("JSON");
    let d = &v["disks"][0];
    assert_eq!(d["size"], 96 * MIB, "{status}");
    assert_eq!(d["candidate"]["state"], "active", "{status}");
    assert_eq!(d["candidate"]["blocks_total"], 96 * MIB / 4096, "{status}");
    assert_eq!(
        d["migration"]["mode"], "copy-out",
        "the copy-out resumed: {status}"
    );
    drop(driver);
    let log = serving.stop();
    assert!(log.contains("grown from 64 MiB to 96 MiB"), "{log}");
    let check = ok(&["store", "check", path(&st), "--data"]);
    assert!(check.contains("result: consistent"), "{check}");
    // Restarted, the teed disk is served at its new size with its candidate active.
    let serving = Serving::start(dir.path(), &args);
    let status = ok(&["ctl", "--control", ctl, "--json", "status", "a"]);
    let v: serde_json::Value = serde_json::from_str(status.trim()).expect("JSON");
    assert_eq!(v["disks"][0]["size"], 96 * MIB, "{status}");
    assert_eq!(v["disks"][0]["candidate"]["state"], "active", "{status}");
    let driver = Driver::connect(&dir.path().join("a.sock"), DriverOptions::new(1, 16 << 20))
        .expect("connect again");
    let c = driver.submit(0, &Req::read(old, 8192)).expect("read");
    c.assert_ok(8192);
    assert_eq!(c.data, past, "written past the old end, durable");
    drop(driver);
    serving.stop();
}

#[test]
fn disk_resize_offline_grows_a_teed_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = store_with(dir.path(), "parallax-v1");
    let s = path(&st);
    ok(&["disk", "tee", s, "a", "--candidate", "parallax-v2"]);
    let out = ok(&["disk", "resize", s, "a", "128M"]);
    assert!(out.contains("grown from 64 MiB to 128 MiB"), "{out}");
    let check = ok(&["store", "check", s, "--data"]);
    assert!(check.contains("result: consistent"), "{check}");
    let img = dir.path().join("out.img");
    ok(&["disk", "export", s, "a", "--to", path(&img)]);
    assert_eq!(std::fs::metadata(&img).expect("export").len(), 128 * MIB);
}
