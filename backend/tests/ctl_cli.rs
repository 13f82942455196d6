//! `dovetail serve --control` and `dovetail ctl` as an operator runs them: the real binaries,
//! their output, exit statuses and the files they leave.

mod cli;

use cli::{dovetail, fails, ok, path, store_create};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Serving {
    child: Child,
    log: std::path::PathBuf,
}

impl Serving {
    fn start(dir: &Path, extra: &[&str]) -> Serving {
        let log = dir.join("serve.log");
        let store = dir.join("st");
        let mut args = vec![
            "serve".to_string(),
            "--store".into(),
            path(&store).into(),
            "--disk".into(),
            format!("a={}", path(&dir.join("a.sock"))),
            "--control".into(),
            path(&dir.join("ctl.sock")).into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("ctl.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "the control socket never appeared"
            );
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

#[test]
fn ctl_changes_a_served_disk_and_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "64M"]);
    let serving = Serving::start(dir.path(), &["--export-dir", path(dir.path())]);
    let ctl_sock = dir.path().join("ctl.sock");
    let ctl = path(&ctl_sock);
    let mode = std::fs::metadata(&ctl_sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let table = ok(&["ctl", "--control", ctl, "status"]);
    assert!(table.starts_with("DISK"), "{table}");
    assert!(table.contains("1 (parallax-v1)"), "{table}");
    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "tee",
        "a",
        "--candidate",
        "parallax-v1",
        "--policy",
        "sync-read-checks",
    ]);
    assert!(out.contains("attached candidate version 2"), "{out}");
    assert!(out.contains("I/O paused"), "{out}");
    let table = ok(&["ctl", "--control", ctl, "status", "a"]);
    assert!(table.contains("sync-read-checks"), "{table}");
    assert!(table.contains("active"), "{table}");
    let out = ok(&["ctl", "--control", ctl, "policy", "a", "mirror-only"]);
    assert!(
        out.contains("from sync-read-checks to mirror-only"),
        "{out}"
    );

    // --json is one parseable object per line.
    let json = ok(&["ctl", "--control", ctl, "--json", "status", "a"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    assert_eq!(v["disks"][0]["candidate"]["policy"], "mirror-only");
    assert_eq!(v["disks"][0]["pauses"]["pauses"], 2);

    // Errors: exit 1 with the daemon's code and message; nothing changed.
    let e = fails(&["ctl", "--control", ctl, "policy", "a", "bogus"]);
    assert!(e.contains("invalid") && e.contains("unknown policy"), "{e}");
    let e = fails(&["ctl", "--control", ctl, "status", "nope"]);
    assert!(e.contains("unknown-disk"), "{e}");
    let e = fails(&[
        "ctl",
        "--control",
        path(&dir.path().join("none.sock")),
        "status",
    ]);
    assert!(e.contains("is `dovetail serve --control"), "{e}");

    let snap = ok(&["ctl", "--control", ctl, "snapshot", "a", "--name", "s1"]);
    assert!(snap.contains("snapshot s1"), "{snap}");
    let list = ok(&["ctl", "--control", ctl, "snapshots", "a"]);
    assert!(list.contains("s1"), "{list}");
    let img = dir.path().join("s1.img");
    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "export",
        "a",
        "--snapshot",
        "s1",
        "--to",
        "s1.img",
    ]);
    assert!(out.contains("exported snapshot s1"), "{out}");
    let meta = std::fs::metadata(&img).expect("image");
    assert_eq!(meta.len(), 64 << 20);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "exports are 0600");

    let metrics = ok(&["ctl", "--control", ctl, "metrics"]);
    assert!(
        metrics.contains("# TYPE dovetail_requests_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dovetail_pauses_total{disk=\"a\"} 3"),
        "{metrics}"
    );
    let events = ok(&["ctl", "--control", ctl, "events"]);
    for kind in ["candidate-attached", "policy-changed", "snapshot-taken"] {
        assert!(events.contains(kind), "{events}");
    }
    let out = ok(&["ctl", "--control", ctl, "untee", "a"]);
    assert!(out.contains("dropped candidate version 2"), "{out}");

    let log = serving.stop();
    assert!(
        log.contains("disk a: policy changed from sync-read-checks to mirror-only; I/O paused"),
        "{log}"
    );
    assert!(
        !ctl_sock.exists(),
        "the control socket is removed at shutdown"
    );
    // The catalog holds what the daemon did.
    let list = ok(&["disk", "list", path(&st)]);
    assert!(!list.contains("mirror-only"), "{list}");
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
}

#[test]
fn a_policy_set_live_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    store_create(&st);
    ok(&["disk", "create", path(&st), "a", "--size", "64M"]);
    let ctl_sock = dir.path().join("ctl.sock");
    let ctl = path(&ctl_sock);
    let serving = Serving::start(dir.path(), &["--control-mode", "0660"]);
    let mode = std::fs::metadata(&ctl_sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    ok(&[
        "ctl",
        "--control",
        ctl,
        "tee",
        "a",
        "--policy",
        "sync-cross-checks",
    ]);
    ok(&["ctl", "--control", ctl, "policy", "a", "lazy-hashes"]);
    serving.stop();
    let list = ok(&["disk", "list", path(&st)]);
    assert!(list.contains("lazy-hashes"), "{list}");
    let serving = Serving::start(dir.path(), &[]);
    let table = ok(&["ctl", "--control", ctl, "status", "a"]);
    assert!(table.contains("lazy-hashes"), "{table}");
    serving.stop();
}

#[test]
fn serve_help_explains_the_control_options() {
    let help = ok(&["serve", "--help"]);
    for needle in [
        "--control <PATH>",
        "--control-mode <MODE>",
        "--metrics <ADDR>",
        "docs/control.md",
        "--mover-interval <SECS>",
        "0 disables the mover",
        "--socket-mode <MODE>",
        "--socket-group <GROUP>",
        "libvirt-qemu",
        "--control-group <GROUP>",
        "SO_PEERCRED",
        "--export-dir <DIR>",
        "--allow-fault-injection",
    ] {
        assert!(
            help.contains(needle),
            "serve --help lacks {needle}:\n{help}"
        );
    }
    let help = ok(&["ctl", "--help"]);
    for cmd in [
        "status",
        "tee",
        "policy",
        "untee",
        "abort",
        "snapshot",
        "export",
        "events",
        "metrics",
        "taint",
        "annotations",
        "tiers",
    ] {
        assert!(help.contains(cmd), "ctl --help lacks {cmd}:\n{help}");
    }
    let help = ok(&["ctl", "--control", "x", "tiers", "--help"]);
    for opt in [
        "--class <CLASS>",
        "--copies <N>",
        "--tier <NAME>",
        "--compress",
        "--no-compress",
        "--cold-after <SECS>",
        "--hot-accesses <N>",
        "--rate <MIB_S>",
        "--move-now",
        "--scrub",
    ] {
        assert!(help.contains(opt), "ctl tiers --help lacks {opt}:\n{help}");
    }
    let help = ok(&["disk", "--help"]);
    for cmd in ["heatmap", "annotations"] {
        assert!(help.contains(cmd), "disk --help lacks {cmd}:\n{help}");
    }
    let e = fails(&[
        "serve",
        "--store",
        "x",
        "--disk",
        "a=b",
        "--metrics",
        "10.1.2.3:9",
    ]);
    assert!(e.contains("loopback"), "{e}");
    let out = dovetail(&[
        "serve",
        "--store",
        "x",
        "--disk",
        "a=b",
        "--control-mode",
        "999",
    ]);
    assert_eq!(out.status.code(), Some(2), "a bad mode is a usage error");
}

#[test]
fn offline_migrate_and_in_place_upgrade_keep_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data.iter_mut().enumerate().take(3 << 20) {
        *b = (i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(17) as u8
            | 1;
    }
    std::fs::write(&src, &data).expect("image");
    store_create(&st);
    ok(&["disk", "import", path(&st), "a", "--from", path(&src)]);
    let e = fails(&["migrate", path(&st), "a"]);
    assert!(e.contains("no active candidate"), "{e}");
    ok(&[
        "disk",
        "tee",
        path(&st),
        "a",
        "--policy",
        "sync-cross-checks",
    ]);
    let out = ok(&["migrate", path(&st), "a", "--rate", "0"]);
    assert!(
        out.contains("every block is in the candidate (768 copied, 1280 zero blocks"),
        "{out}"
    );
    // Again: nothing left to copy.
    let out = ok(&["migrate", path(&st), "a"]);
    assert!(out.contains("(0 copied, 0 zero blocks"), "{out}");
    let e = fails(&["disk", "upgrade", path(&st), "a", "--to", "parallax-v1"]);
    assert!(e.contains("already has a candidate"), "{e}");
    ok(&["disk", "untee", path(&st), "a"]);
    let out = ok(&["disk", "upgrade", path(&st), "a", "--to", "parallax-v1"]);
    assert!(out.contains("version 1 retired"), "{out}");
    let list = ok(&["disk", "list", path(&st)]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("a ") && l.contains(" 3 ")),
        "{list}"
    );
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
    let out_img = dir.path().join("out.img");
    ok(&["disk", "export", path(&st), "a", "--to", path(&out_img)]);
    assert!(
        std::fs::read(&out_img).expect("export") == data,
        "the upgraded disk holds the same bytes"
    );
}

/// Writes a raw image of `len` bytes at `path` with data (non-zero) in `blocks`.
fn image_with_blocks(path: &Path, len: u64, blocks: impl IntoIterator<Item = u64>) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("image");
    f.set_len(len).expect("size");
    for b in blocks {
        f.write_all_at(&[b as u8 | 1; 4096], b * 4096)
            .expect("write");
    }
}

/// `ctl taint`, `ctl annotations` (tables and JSON), and offline `disk annotations` and `disk
/// heatmap`, on a parallax-v2 disk written by `disk import` (whose writes are counted like a
/// guest's); a label left on while the daemon stops stays on for the next writer.
#[test]
fn taint_annotations_and_heatmap_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    store_create(&st);
    let out = ok(&[
        "disk",
        "create",
        path(&st),
        "a",
        "--size",
        "64M",
        "--layout",
        "parallax-v2",
    ]);
    assert!(out.contains("parallax-v2"), "{out}");
    ok(&["disk", "create", path(&st), "b", "--size", "16M"]);
    // Never opened yet: nothing recorded, and that is what is shown.
    let out = ok(&["disk", "annotations", path(&st), "a"]);
    assert!(out.contains("totals: 0 reads, 0 writes"), "{out}");
    assert!(out.contains("labels: none"), "{out}");

    // Blocks 0..16 in one request, block 1000 in another.
    let img = dir.path().join("one.img");
    image_with_blocks(&img, 4 << 20, (0..16).chain([1000]));
    ok(&["disk", "import", path(&st), "a", "--from", path(&img)]);

    let serving = Serving::start(dir.path(), &[]);
    let ctl_sock = dir.path().join("ctl.sock");
    let ctl = path(&ctl_sock);
    let out = ok(&["ctl", "--control", ctl, "taint", "a", "build", "--on"]);
    assert!(
        out.contains("disk a: taint label \"build\" on in the trusted version"),
        "{out}"
    );
    assert!(out.contains("labels: build (bit 0, on)"), "{out}");
    let json = ok(&[
        "ctl",
        "--control",
        ctl,
        "--json",
        "annotations",
        "a",
        "--top",
        "2",
        "--histogram",
        "4",
        "--block",
        "1000",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    assert_eq!(v["totals"]["writes"], 17, "{v}");
    assert_eq!(v["totals"]["reads"], 0, "{v}");
    assert_eq!(v["top"][0]["first_block"], 0, "{v}");
    assert_eq!(v["top"][1]["first_block"], 1, "{v}");
    assert_eq!(v["histogram"][0]["writes"], 17, "{v}");
    assert_eq!(v["block"]["annotation"]["writes"], 1, "{v}");
    assert_eq!(v["labels"][0]["name"], "build", "{v}");
    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "annotations",
        "a",
        "--top",
        "3",
        "--histogram",
        "4",
        "--block",
        "1000",
    ]);
    for needle in [
        "disk a: parallax-v2 version 1 (trusted), 16384 blocks of 4 KiB",
        "totals: 0 reads, 17 writes; 17 of 16384 blocks touched",
        "labels: build (bit 0, on)",
        "top 3 regions of 1 block:",
        "FIRST  BLOCKS  READS  WRITES  HEAT",
        "histogram: 4 buckets of 4096 blocks",
        "########################################",
        "block 1000: 0 reads, 1 write; class random",
    ] {
        assert!(out.contains(needle), "lacks {needle:?}:\n{out}");
    }
    let e = fails(&[
        "ctl",
        "--control",
        ctl,
        "annotations",
        "a",
        "--label",
        "nope",
    ]);
    assert!(e.contains("invalid") && e.contains("no taint label"), "{e}");
    let e = fails(&[
        "ctl",
        "--control",
        ctl,
        "annotations",
        "a",
        "--histogram",
        "0",
    ]);
    assert!(e.contains("invalid"), "{e}");
    let e = fails(&["ctl", "--control", ctl, "taint", "b", "x", "--on"]);
    assert!(e.contains("unknown-disk"), "{e}");
    let usage = dovetail(&["ctl", "--control", ctl, "taint", "a", "build"]);
    assert_eq!(usage.status.code(), Some(2), "--on or --off is required");
    // The daemon holds the store: offline readers read what it last committed.
    let out = ok(&[
        "disk",
        "heatmap",
        path(&st),
        "a",
        "--png",
        path(&dir.path().join("x.png")),
    ]);
    assert!(out.contains("heatmap of parallax-v2 version 1"), "{out}");
    let log = serving.stop();
    assert!(log.contains("taint label \"build\" on"), "{log}");

    // The label stayed on: these writes carry it.
    let img2 = dir.path().join("two.img");
    image_with_blocks(&img2, 16 << 20, 2000..2004);
    ok(&["disk", "import", path(&st), "a", "--from", path(&img2)]);
    let serving = Serving::start(dir.path(), &[]);
    ok(&["ctl", "--control", ctl, "taint", "a", "build", "--off"]);
    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "annotations",
        "a",
        "--label",
        "build",
    ]);
    assert!(
        out.contains("label build: 4 blocks in 1 range\n  2000-2003 (4 blocks)"),
        "{out}"
    );
    assert!(out.contains("labels: build (bit 0, off)"), "{out}");
    serving.stop();

    // Offline: the heat picture (16 x 16 parts of 64 blocks, 4 pixels each).
    let png_path = dir.path().join("heat.png");
    let out = ok(&[
        "disk",
        "heatmap",
        path(&st),
        "a",
        "--png",
        path(&png_path),
        "--columns",
        "16",
        "--cell",
        "4",
    ]);
    assert!(
        out.contains("64x64 pixels, 256 buckets of 64 block(s) (16 columns x 16 rows)"),
        "{out}"
    );
    assert!(
        out.contains("hottest bucket 0 (blocks 0-63): 0 reads, 16 writes"),
        "{out}"
    );
    let bytes = std::fs::read(&png_path).expect("png");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("decode");
    assert_eq!((frame.width, frame.height), (64, 64));
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    let px = |x: usize, y: usize| {
        let i = (y * 64 + x) * 3;
        [pixels[i], pixels[i + 1], pixels[i + 2]]
    };
    assert_eq!(px(0, 0), [255, 255, 255], "the hottest part is white");
    assert_eq!(px(3, 0), [48, 48, 48], "a grid line");
    assert_eq!(px(4, 0), [0, 0, 0], "blocks 64..128 were never touched");
    assert_ne!(px(15 * 4, 0), [0, 0, 0], "block 1000 was written");
    // Part 31 (blocks 1984..2048): row 1, column 15.
    assert_ne!(px(15 * 4, 4), [0, 0, 0], "blocks 2000..2004 were written");
    // Defaults: 64 columns, 8 pixels.
    let out = ok(&["disk", "heatmap", path(&st), "a", "--png", path(&png_path)]);
    assert!(
        out.contains("512x512 pixels, 4096 buckets of 4 block(s)"),
        "{out}"
    );
    let e = fails(&[
        "disk",
        "heatmap",
        path(&st),
        "b",
        "--png",
        path(&dir.path().join("b.png")),
    ]);
    assert!(e.contains("parallax-v1, which keeps no annotations"), "{e}");
    let e = fails(&[
        "disk",
        "heatmap",
        path(&st),
        "a",
        "--png",
        path(&png_path),
        "--version",
        "candidate",
    ]);
    assert!(e.contains("no candidate"), "{e}");

    // Offline annotations, as JSON and as text.
    let json = ok(&[
        "disk",
        "annotations",
        path(&st),
        "a",
        "--top",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    assert_eq!(v["totals"]["writes"], 21, "{v}");
    assert_eq!(v["role"], "trusted");
    let out = ok(&["disk", "annotations", path(&st), "a", "--label", "build"]);
    assert!(out.contains("2000-2003 (4 blocks)"), "{out}");
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
}

/// `ctl tiers`: the table, `--json` (after the subcommand too), every setting option, the
/// mover's `--move-now` and `--scrub`, and the errors (exit 1 with the daemon's message, or 2
/// for a usage error), which change nothing.
#[test]
fn ctl_tiers_shows_and_sets_a_disks_tiering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    store_create(&st);
    ok(&[
        "disk",
        "create",
        path(&st),
        "a",
        "--size",
        "64M",
        "--layout",
        "parallax-v2",
    ]);
    ok(&["disk", "create", path(&st), "b", "--size", "64M"]);
    let b_sock = dir.path().join("b.sock");
    let serving = Serving::start(
        dir.path(),
        &[
            "--disk",
            &format!("b={}", path(&b_sock)),
            "--mover-interval",
            "1",
        ],
    );
    let ctl_sock = dir.path().join("ctl.sock");
    let ctl = path(&ctl_sock);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["ctl", "--control", ctl, "tiers", "a"];
        all.extend_from_slice(args);
        all.push("--json");
        serde_json::from_str(ok(&all).trim()).expect("JSON")
    };

    let table = ok(&["ctl", "--control", ctl, "tiers", "a"]);
    for needle in [
        "disk a: version 1 (parallax-v2), tiering policy:",
        "CLASS     COPIES  TIER     COMPRESS",
        "metadata  2       default  no",
        "hot       1       default  no",
        "cold      1       default  yes",
        "cold after 3600 s idle; hot at 2 access(es)",
        "TIER     EXTENTS  FREE",
        "mover: running every 1 s",
    ] {
        assert!(table.contains(needle), "{needle:?} missing:\n{table}");
    }
    let v = json(&[]);
    assert_eq!(v["policy"]["metadata"]["copies"], 2, "{v}");
    assert_eq!(v["policy"]["cold"]["compress"], true, "{v}");
    // --json before the subcommand, as for every ctl command.
    let before: serde_json::Value =
        serde_json::from_str(ok(&["ctl", "--control", ctl, "--json", "tiers", "a"]).trim())
            .expect("JSON");
    assert_eq!(before["policy"], v["policy"]);

    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "tiers",
        "a",
        "--class",
        "cold",
        "--copies",
        "2",
        "--tier",
        "default",
        "--no-compress",
    ]);
    assert!(
        out.contains(
            "disk a: tiering policy changed: cold copies 1 -> 2, cold compress true -> false"
        ),
        "{out}"
    );
    let v = json(&[]);
    assert_eq!(
        v["policy"]["cold"],
        serde_json::json!({"copies": 2, "tier": "default", "compress": false})
    );
    let v = json(&[
        "--class",
        "cold",
        "--copies",
        "1",
        "--tier",
        "default",
        "--compress",
    ]);
    assert_eq!(
        v["policy"]["cold"],
        serde_json::json!({"copies": 1, "tier": "default", "compress": true})
    );
    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "tiers",
        "a",
        "--cold-after",
        "1",
        "--hot-accesses",
        "1",
        "--rate",
        "16",
    ]);
    assert!(
        out.contains("cold_after_secs 3600 -> 1, hot_accesses 2 -> 1, move_mib_s 32 -> 16"),
        "{out}"
    );
    let v = json(&[]);
    assert_eq!(v["policy"]["cold_after_secs"], 1);
    assert_eq!(v["policy"]["hot_accesses"], 1);
    assert_eq!(v["policy"]["move_mib_s"], 16);
    let out = ok(&["ctl", "--control", ctl, "tiers", "a", "--move-now"]);
    assert!(out.contains("the mover runs a round now"), "{out}");
    let out = ok(&["ctl", "--control", ctl, "tiers", "a", "--scrub"]);
    assert!(out.contains("scrub rewrote 0 bad copies"), "{out}");
    assert_eq!(json(&["--scrub"])["scrub_repairs"], 0);

    // Errors: exit 1 with the daemon's code and message; usage errors exit 2.
    let before = json(&[]);
    for (args, says) in [
        (
            &["--class", "cold", "--copies", "4"][..],
            "invalid: cold: 4 copies; 1 to 3 are allowed",
        ),
        (
            &["--class", "hot", "--compress"][..],
            "invalid: hot: only cold data can be compressed",
        ),
        (
            &["--class", "warm", "--copies", "1"][..],
            "invalid: unknown block class \"warm\"",
        ),
        (
            &["--class", "cold", "--tier", "slow"][..],
            "the store has no tier named \"slow\" (its tiers: default)",
        ),
        (&["--class", "cold"][..], "bad-request"),
        (&["--cold-after", "0"][..], "invalid: cold_after_secs 0"),
    ] {
        let mut all = vec!["ctl", "--control", ctl, "tiers", "a"];
        all.extend_from_slice(args);
        let e = fails(&all);
        assert!(e.contains(says), "{args:?}: {e}");
    }
    let e = fails(&["ctl", "--control", ctl, "tiers", "b"]);
    assert!(
        e.contains("conflict: disk b is parallax-v1, which has no block classes; upgrade it to parallax-v2"),
        "{e}"
    );
    for args in [
        &["--copies", "2"][..],
        &["--class", "cold", "--compress", "--no-compress"][..],
    ] {
        let mut all = vec!["ctl", "--control", ctl, "tiers", "a"];
        all.extend_from_slice(args);
        let out = dovetail(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?} is a usage error");
    }
    assert_eq!(
        json(&[])["policy"],
        before["policy"],
        "errors change nothing"
    );
    let log = serving.stop();
    assert!(
        log.contains("disk a: tier mover running every 1.0 s"),
        "{log}"
    );
    assert!(!log.contains("disk b: tier mover"), "{log}");
}
