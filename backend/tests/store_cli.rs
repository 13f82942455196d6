//! `dovetail store ...` and `dovetail disk ...` as an operator runs them: the real binary,
//! its stdout, stderr and exit status, and the files it leaves.

mod cli;

use cli::{dovetail, fails, ok, path};

#[test]
fn create_list_check_and_delete_disks() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    let out = ok(&["store", "create", d, "--size", "4M", "--extent-size", "1M"]);
    assert!(out.contains("4 extents of 1 MiB (4 MiB)"), "{out}");
    assert_eq!(
        std::fs::metadata(dir.join("data.0"))
            .expect("data file")
            .len(),
        (4 << 20) + 4096,
        "4 extents, then the tier header"
    );

    let out = ok(&["disk", "create", d, "vm1", "--size", "10G"]);
    assert!(
        out.contains("created disk vm1 (10 GiB, parallax-v1)"),
        "{out}"
    );
    ok(&[
        "disk",
        "create",
        d,
        "vm2",
        "--size",
        "1M",
        "--layout",
        "parallax-v1",
    ]);
    let list = ok(&["disk", "list", d]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAME",
            "SIZE",
            "LAYOUT",
            "TRUSTED",
            "CANDIDATE",
            "EXTENTS",
            "TEE"
        ]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["vm1", "10", "GiB", "parallax-v1", "1", "-", "0", "-"]
    );
    assert!(lines[2].starts_with("vm2 "), "{list}");
    assert!(
        list.contains("2 disk(s); 4 of 4 extents of 1 MiB free"),
        "{list}"
    );

    let report = ok(&["store", "check", d]);
    assert!(report.contains("result: consistent"), "{report}");

    let out = ok(&["disk", "delete", d, "vm1"]);
    assert!(out.contains("deleted disk vm1"), "{out}");
    let list = ok(&["disk", "list", d]);
    assert!(!list.contains("vm1"), "{list}");
    assert!(list.contains("1 disk(s)"), "{list}");
    assert!(ok(&["store", "check", d]).contains("result: consistent"));
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_status_1() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    let missing = t.path().join("nothing-here");
    let m = path(&missing);

    let e = fails(&["store", "create", d, "--size", "10M"]);
    assert!(e.contains("too small"), "{e}");
    let e = fails(&["store", "create", d, "--size", "3M", "--extent-size", "2M"]);
    assert!(e.contains("not a whole number of 2 MiB extents"), "{e}");
    let e = fails(&["store", "create", d, "--size", "8M", "--extent-size", "6K"]);
    assert!(e.contains("multiple of 4096"), "{e}");
    assert!(!dir.exists(), "refused creates leave nothing behind");

    ok(&["store", "create", d, "--size", "8M", "--extent-size", "4M"]);
    let e = fails(&["store", "create", d, "--size", "8M", "--extent-size", "4M"]);
    assert!(e.contains("already exists"), "{e}");

    for args in [
        &["disk", "list", m][..],
        &["disk", "create", m, "vm1", "--size", "1G"],
        &["disk", "delete", m, "vm1"],
        &["store", "check", m],
    ] {
        let e = fails(args);
        assert!(e.contains("no store at"), "{args:?}: {e}");
    }

    ok(&["disk", "create", d, "vm1", "--size", "1G"]);
    let e = fails(&["disk", "create", d, "vm1", "--size", "1G"]);
    assert!(e.contains("a disk named \"vm1\" already exists"), "{e}");
    let e = fails(&["disk", "create", d, "vm2", "--size", "1536"]);
    assert!(e.contains("not a positive multiple of 4096"), "{e}");
    let e = fails(&["disk", "create", d, "no/slash", "--size", "1G"]);
    assert!(e.contains("disk name \"no/slash\" is invalid"), "{e}");
    let e = fails(&["disk", "delete", d, "vm9"]);
    assert!(e.contains("no disk named \"vm9\""), "{e}");

    // Argument errors are clap's (exit status 2), with the offending value named.
    let out = dovetail(&[
        "disk", "create", d, "vm3", "--size", "1G", "--layout", "nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn check_exits_non_zero_on_an_injected_violation() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    ok(&["store", "create", d, "--size", "8M", "--extent-size", "1M"]);
    ok(&["disk", "create", d, "vm1", "--size", "1G"]);

    // Grant extent 3 to key 42, which no version has, in the newest slot, re-checksummed so
    // only the catalog's invariants can catch it (layout of the file: docs/format.md).
    let meta_path = dir.join("store.meta");
    let mut meta = std::fs::read(&meta_path).expect("read metadata");
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let slot_size = u64_at(&meta, 56) as usize;
    let (a, b) = (4096, 4096 + slot_size);
    let off = if u64_at(&meta, a) > u64_at(&meta, b) {
        a
    } else {
        b
    };
    let len = u32_at(&meta, off + 8) as usize;
    let owner = off + 16 + 24 + 8 * 3;
    meta[owner..owner + 8].copy_from_slice(&42u64.to_le_bytes());
    // Slots of the current format: crc32c over the format version, the slot header and the
    // payload.
    let crc = dovetail_store::format::slot_crc(
        dovetail_store::format::FORMAT_VERSION,
        &meta[off..off + 12],
        &meta[off + 16..off + 16 + len],
    );
    meta[off + 12..off + 16].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&meta_path, &meta).expect("write metadata");

    let out = dovetail(&["store", "check", d]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("VIOLATION: extent 3 is granted to key 42, which is not a version"),
        "{stdout}"
    );
    assert!(stderr.contains("is not consistent"), "{stderr}");

    // Commands that change or list the store refuse it rather than misread it.
    let e = fails(&["disk", "list", d]);
    assert!(
        e.contains("metadata is corrupt") && e.contains("store check"),
        "{e}"
    );
}

#[test]
fn help_explains_the_store_commands() {
    let top = ok(&["--help"]);
    assert!(top.contains("store") && top.contains("disk"), "{top}");
    let create = ok(&["store", "create", "--help"]);
    assert!(
        create.contains("--extent-size") && create.contains("[default: 64M]"),
        "{create}"
    );
    assert!(
        create.contains("--tier <NAME=PATH:SIZE>") && create.contains("cold data on the last tier"),
        "{create}"
    );
    let check = ok(&["store", "check", "--help"]);
    assert!(
        check.contains("Exits") && check.contains("violation"),
        "{check}"
    );
    let disk = ok(&["disk", "create", "--help"]);
    assert!(disk.contains("possible values: parallax-v1"), "{disk}");
    let upgrade = ok(&["store", "upgrade", "--help"]);
    assert!(
        upgrade.contains("adopts them")
            && upgrade.contains("regular file of exactly the tier's size"),
        "{upgrade}"
    );
    let serve = ok(&["serve", "--help"]);
    assert!(
        serve.contains("--allow-unsealed-memory") && serve.contains("F_SEAL_SHRINK"),
        "{serve}"
    );
}

#[test]
fn check_runs_the_parallax_check_and_finds_a_damaged_tree_node() {
    use dovetail_layout::parallax::Parallax;
    use dovetail_layout::{BlockLayout, Sector, Sectors};
    use std::os::unix::fs::FileExt;

    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    ok(&["store", "create", d, "--size", "128M"]);
    ok(&["disk", "create", d, "vm", "--size", "64M"]);
    {
        let store = dovetail_store::Store::open(&dir).expect("open store");
        let key = store.disk("vm").expect("disk").trusted;
        let space = store.space(key).expect("space");
        let disk = Parallax::create(space, Sectors(64 << 11)).expect("create tree");
        for i in 0..64u64 {
            disk.write(Sector(i * 1024), &[i as u8 + 1; 4096])
                .expect("write");
        }
        disk.flush().expect("flush");
    }
    let report = ok(&["store", "check", d]);
    assert!(report.contains("result: consistent"), "{report}");
    assert!(!report.contains("no layout-level check"), "{report}");

    // Damage one tree node (nodes start with their magic) behind the layout's back.
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("data.0"))
        .expect("data.0");
    let mut node = None;
    let mut buf = [0u8; 8];
    for off in (0..64u64 << 20).step_by(4096) {
        data.read_exact_at(&mut buf, off).expect("read");
        if &buf == b"DVPXNODE" {
            node = Some(off);
            break;
        }
    }
    let node = node.expect("a tree node in the store");
    data.write_all_at(&[0xff; 8], node + 100).expect("damage");
    let out = dovetail(&["store", "check", d]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("checksum mismatch"), "{stdout}");
}

#[test]
fn tee_and_untee_a_disk() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    ok(&["store", "create", d, "--size", "1G", "--extent-size", "16M"]);
    ok(&["disk", "create", d, "vm1", "--size", "64M"]);
    let image = t.path().join("in.img");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&image, &data).expect("image");

    // Bad policies and fault rules are refused with a clear message and change nothing.
    let err = fails(&["disk", "tee", d, "vm1", "--policy", "sometimes"]);
    assert!(
        err.contains("unknown policy") && err.contains("mirror-only"),
        "{err}"
    );
    let err = fails(&["disk", "tee", d, "vm1", "--fault", "flip-read:prob=2"]);
    assert!(err.contains("flip-read:prob=2"), "{err}");
    assert!(ok(&["disk", "list", d]).contains("vm1"));
    assert!(!ok(&["disk", "list", d]).contains("sync-"));

    let out = ok(&["disk", "tee", d, "vm1", "--policy", "sync-read-checks"]);
    assert!(out.contains("policy sync-read-checks"), "{out}");
    let list = ok(&["disk", "list", d]);
    assert!(list.contains("sync-read-checks"), "{list}");
    // Changing the policy keeps the same candidate.
    ok(&["disk", "tee", d, "vm1", "--policy", "mirror-only"]);
    let list = ok(&["disk", "list", d]);
    assert!(
        list.contains("mirror-only") && !list.contains("sync-read-checks"),
        "{list}"
    );

    // An import goes through the Tee: both versions hold the data, and the store checks clean
    // (the candidate's tree included).
    ok(&["disk", "import", d, "vm1", "--from", path(&image)]);
    let report = ok(&["store", "check", d]);
    assert!(report.contains("result: consistent"), "{report}");
    let out_img = t.path().join("out.img");
    ok(&["disk", "export", d, "vm1", "--to", path(&out_img)]);
    let back = std::fs::read(&out_img).expect("export");
    assert!(
        back[..data.len()] == data[..],
        "export of the trusted version"
    );
    assert!(dir.join("maps").read_dir().expect("maps").count() == 1);

    let out = ok(&["disk", "untee", d, "vm1"]);
    assert!(out.contains("dropped candidate"), "{out}");
    assert!(!ok(&["disk", "list", d]).contains("mirror-only"));
    assert!(dir.join("maps").read_dir().expect("maps").count() == 0);
    let err = fails(&["disk", "untee", d, "vm1"]);
    assert!(err.contains("vm1"), "{err}");
    let report = ok(&["store", "check", d]);
    assert!(report.contains("result: consistent"), "{report}");
}

#[test]
fn create_a_store_with_two_tiers_and_check_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    let (nvme, hdd) = (t.path().join("nvme"), t.path().join("hdd"));
    std::fs::create_dir(&nvme).expect("mkdir");
    std::fs::create_dir(&hdd).expect("mkdir");
    let (fast, slow) = (nvme.join("ds.fast"), hdd.join("ds.slow"));
    let fast_arg = format!("fast={}:2M", path(&fast));
    let slow_arg = format!("slow={}:6M", path(&slow));
    let out = ok(&[
        "store",
        "create",
        d,
        "--tier",
        &fast_arg,
        "--tier",
        &slow_arg,
        "--extent-size",
        "1M",
    ]);
    assert!(out.contains("8 extents of 1 MiB (8 MiB)"), "{out}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["TIER", "PATH", "SIZE", "EXTENTS"],
            vec!["fast", path(&fast), "2", "MiB", "2", "(0..=1)"],
            vec!["slow", path(&slow), "6", "MiB", "6", "(2..=7)"],
        ],
        "{out}"
    );
    // Each tier file: its extents, then its tier header.
    assert_eq!(
        std::fs::metadata(&fast).expect("fast").len(),
        (2 << 20) + 4096
    );
    assert_eq!(
        std::fs::metadata(&slow).expect("slow").len(),
        (6 << 20) + 4096
    );
    assert!(!dir.join("data.0").exists());

    // A disk whose layout asks for no tier fills the first tier first.
    ok(&["disk", "create", d, "vm1", "--size", "64M"]);
    let image = t.path().join("in.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).expect("image");
    ok(&["disk", "import", d, "vm1", "--from", path(&image)]);
    let report = ok(&["store", "check", d]);
    assert!(report.contains("result: consistent"), "{report}");
    assert!(report.contains("format version 5"), "{report}");
    let fast_line = report
        .lines()
        .find(|l| l.trim_start().starts_with("tier fast:"))
        .unwrap_or_else(|| panic!("no fast tier line: {report}"));
    assert!(
        fast_line.contains(&format!("{}, 2 extents (2 MiB) from extent 0", path(&fast))),
        "{report}"
    );
    assert!(fast_line.ends_with("2 granted, 0 free"), "{report}");
    assert!(
        report.contains(&format!(
            "tier slow: {}, 6 extents (6 MiB) from extent 2:",
            path(&slow)
        )),
        "{report}"
    );
    let back = t.path().join("out.img");
    ok(&["disk", "export", d, "vm1", "--to", path(&back)]);
    assert_eq!(
        &std::fs::read(&back).expect("export")[..1 << 20],
        &[7u8; 1 << 20][..]
    );

    // A missing tier file is named by every command that opens the store.
    let away = t.path().join("away");
    std::fs::rename(&slow, &away).expect("move");
    let e = fails(&["disk", "list", d]);
    assert!(
        e.contains(&format!("tier slow: {} is missing", path(&slow))),
        "{e}"
    );
    let out = dovetail(&["store", "check", d]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "VIOLATION: tier slow: its data file {} is missing",
            path(&slow)
        )),
        "{stdout}"
    );
    std::fs::rename(&away, &slow).expect("move back");
    assert!(ok(&["store", "check", d]).contains("result: consistent"));

    // Existing tier files are never overwritten.
    let other = t.path().join("other");
    let e = fails(&[
        "store",
        "create",
        path(&other),
        "--tier",
        &fast_arg,
        "--extent-size",
        "1M",
    ]);
    assert!(
        e.contains(&format!("{} already exists", path(&fast))),
        "{e}"
    );
    assert!(!other.join("store.meta").exists());
}

#[test]
fn a_malformed_tier_is_refused_with_a_clear_message() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    let fast = t.path().join("ds.fast");
    let f = path(&fast);
    // Argument errors are clap's (exit status 2) and name the piece that is wrong.
    let cases = [
        (format!("fast{f}:1M"), "no '=' after the tier's name"),
        (format!("={f}:1M"), "the tier's name before '=' is empty"),
        (format!("FAST={f}:1M"), "tier name \"FAST\" is invalid"),
        (format!("fast={f}"), "no ':' before the tier's size"),
        (
            "fast=:1M".to_string(),
            "tier fast's path between '=' and ':' is empty",
        ),
        (
            format!("fast={f}:1.5G"),
            "tier fast's size: \"1.5G\" is not a size",
        ),
    ];
    for (arg, words) in cases {
        let out = dovetail(&["store", "create", d, "--tier", &arg]);
        assert_eq!(out.status.code(), Some(2), "{arg}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(words) && stderr.contains("is not NAME=PATH:SIZE"),
            "{arg}: {stderr}"
        );
    }
    let out = dovetail(&[
        "store",
        "create",
        d,
        "--size",
        "1G",
        "--tier",
        &format!("fast={f}:1G"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    let out = dovetail(&["store", "create", d]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Tier lists the store refuses: exit status 1, the store's words.
    let dup = format!("fast={f}:1M");
    let e = fails(&[
        "store",
        "create",
        d,
        "--tier",
        &dup,
        "--tier",
        &dup,
        "--extent-size",
        "1M",
    ]);
    assert!(e.contains("tier name \"fast\" is used twice"), "{e}");
    let e = fails(&[
        "store",
        "create",
        d,
        "--tier",
        &format!("fast={f}:3M"),
        "--extent-size",
        "2M",
    ]);
    assert!(
        e.contains("tier fast's size 3 MiB is not a whole number of 2 MiB extents"),
        "{e}"
    );
    assert!(
        !dir.exists() && !fast.exists(),
        "refused creates leave nothing behind"
    );
}

#[test]
fn every_name_given_on_the_command_line_follows_one_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("st");
    let st = path(&st);
    ok(&[
        "store",
        "create",
        st,
        "--size",
        "64M",
        "--extent-size",
        "4M",
    ]);
    ok(&["disk", "create", st, "d", "--size", "8M"]);
    let rule = "starting with a letter or digit";
    let long = "s".repeat(5000);
    for bad in ["../x", "a/b", "..", "a b", long.as_str()] {
        let e = fails(&["disk", "snapshot", st, "d", "--name", bad]);
        assert!(
            e.contains("snapshot name \"") && e.contains("is invalid") && e.contains(rule),
            "{bad:?}: {e}"
        );
        assert!(
            e.len() < 400,
            "a short prefix of the name, not all of it: {e}"
        );
        let e = fails(&["disk", "create", st, bad, "--size", "8M"]);
        assert!(
            e.contains("disk name \"") && e.contains(rule),
            "{bad:?}: {e}"
        );
        assert!(e.len() < 400, "{e}");
    }
    let e = fails(&["disk", "snapshot", st, "d", "--name", &long]);
    assert!(
        e.contains("… (5000 bytes) is invalid: it is 5000 bytes, longer than 64"),
        "{e}"
    );
    let e = fails(&["disk", "delete-snapshot", st, "d", &long]);
    assert!(e.contains("no snapshot named") && e.len() < 400, "{e}");
    let e = fails(&["disk", "snapshots", st, &long]);
    assert!(e.contains("(5000 bytes)") && e.len() < 400, "{e}");
    // (A malformed argument is clap's usage error: exit status 2.)
    let out = dovetail(&[
        "store",
        "create",
        path(&dir.path().join("t")),
        "--tier",
        &format!("_x={}:64M", path(&dir.path().join("x.data"))),
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("tier name \"_x\" is invalid: it starts with '_'"),
        "{e}"
    );
    assert!(!dir.path().join("t").exists());
    // Nothing was created by the refused commands.
    let out = ok(&["disk", "snapshots", st, "d"]);
    assert!(out.contains("0 snapshot(s) of disk d"), "{out}");
    ok(&["disk", "snapshot", st, "d", "--name", "v1.2_rc-3"]);
}

#[test]
fn a_disk_that_cannot_be_opened_is_named_with_its_version_once() {
    let t = tempfile::tempdir().expect("tempdir");
    let st = t.path().join("st");
    let src = t.path().join("src.img");
    std::fs::write(&src, vec![0x5a; 1 << 20]).expect("source");
    ok(&["store", "create", path(&st), "--size", "128M"]);
    ok(&["disk", "import", path(&st), "vm", "--from", path(&src)]);
    // Destroy every tree node's magic behind the layout's back.
    let data = std::fs::read(st.join("data.0")).expect("data.0");
    let mut damaged = data.clone();
    for off in (0..data.len()).step_by(4096) {
        if data[off..].starts_with(b"DVPXNODE") {
            damaged[off..off + 8].copy_from_slice(&[0xff; 8]);
        }
    }
    assert_ne!(damaged, data, "the store holds tree nodes");
    std::fs::write(st.join("data.0"), damaged).expect("damage");
    let e = fails(&[
        "disk",
        "export",
        path(&st),
        "vm",
        "--to",
        path(&t.path().join("out.img")),
    ]);
    assert!(e.contains("cannot open disk vm (version 1): "), "{e}");
    assert!(!e.contains("version version"), "{e}");
}

/// A parallax-v2 disk whose data blocks were destroyed on the store (overwritten with zeros,
/// as a truncated and re-extended data file leaves them): `disk export` fails naming a block
/// instead of writing zeros and reporting success, and `store check --data` exits 1 naming the
/// disk, version and blocks, while `store check` without it looks only at the metadata.
#[test]
fn destroyed_parallax_v2_data_fails_export_and_check_data() {
    use std::os::unix::fs::FileExt;

    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    let src = t.path().join("src.img");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let image: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&src, &image).expect("source image");
    ok(&["store", "create", d, "--size", "1G"]);
    ok(&[
        "disk",
        "create",
        d,
        "vm",
        "--size",
        "4M",
        "--layout",
        "parallax-v2",
    ]);
    ok(&["disk", "import", d, "vm", "--from", path(&src)]);
    let good = t.path().join("good.img");
    ok(&["disk", "export", d, "vm", "--to", path(&good)]);
    assert_eq!(std::fs::read(&good).expect("export"), image);
    let report = ok(&["store", "check", d, "--data"]);
    assert!(report.contains("result: consistent"), "{report}");

    // Where the data lives: the extents of the disk's hot (data) groups.
    let (key, extent_size, data_extents) = {
        let store = dovetail_store::Store::open(&dir).expect("open store");
        let key = store.disk("vm").expect("disk").trusted;
        let disk = dovetail_layout::parallax::Parallax::open(store.space(key).expect("space"))
            .expect("open the disk");
        let extents: Vec<u32> = disk
            .extent_groups()
            .iter()
            .filter(|g| g.class != dovetail_layout::parallax::Class::Meta)
            .flat_map(|g| g.members.iter().map(|e| e.0))
            .collect();
        (key, store.extent_size(), extents)
    };
    assert!(!data_extents.is_empty());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("data.0"))
        .expect("data.0");
    let zeros = vec![0u8; extent_size as usize];
    for e in &data_extents {
        file.write_all_at(&zeros, u64::from(*e) * extent_size)
            .expect("destroy");
    }
    file.sync_all().expect("sync");

    let bad = t.path().join("bad.img");
    let err = fails(&["disk", "export", d, "vm", "--to", path(&bad)]);
    assert!(
        err.contains("data block") && err.contains("fails its checksum"),
        "{err}"
    );
    let out = dovetail(&["store", "check", d, "--data"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{key} (disk \"vm\", parallax-v2): the live tree: block 0 "
        )) && stdout.contains("fails its data checksum")
            && stdout.contains("more bad data blocks"),
        "{stdout}"
    );
    // Without --data, the metadata alone is checked: intact.
    let report = ok(&["store", "check", d]);
    assert!(report.contains("result: consistent"), "{report}");
}

/// Rewrites the path of tier `t` in `dir/store.meta` (and the header's checksum), as whoever
/// can write the store's metadata could.
fn rewrite_tier_path(dir: &std::path::Path, t: usize, to: &std::path::Path) {
    let meta = dir.join("store.meta");
    let mut bytes = std::fs::read(&meta).expect("read");
    let mut h = dovetail_store::format::Header::decode(&bytes[..4096], &meta).expect("header");
    h.tiers[t].path = to.to_path_buf();
    bytes[..4096].copy_from_slice(&h.encode());
    std::fs::write(&meta, &bytes).expect("write");
}

#[test]
fn a_tier_path_rewritten_to_a_host_file_is_refused_by_serve_and_check() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let d = path(&dir);
    ok(&["store", "create", d, "--size", "4M", "--extent-size", "1M"]);
    ok(&["disk", "create", d, "vm1", "--size", "1M"]);
    let data = std::fs::read(dir.join("data.0")).expect("data.0");
    assert_eq!(
        data.len(),
        (4 << 20) + 4096,
        "4 extents, then the tier header"
    );
    assert_eq!(&data[4 << 20..(4 << 20) + 12], b"DOVETAILTIER");

    // Stand-ins for /etc/passwd: as long as the tier and its header (so only the header tells
    // it apart), and a short one.
    let line = b"root:x:0:0:root:/root:/bin/bash\n";
    let long: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take((4 << 20) + 8192)
        .collect();
    let short = line.repeat(3);
    for (name, bytes, why) in [
        ("passwd", &long, "has no Dovetail tier header there (bad magic): it was not created as a tier file of a store (at byte 4194304)"),
        ("shadow", &short, "is 96 bytes, shorter than the tier's 4 extents of 1 MiB and its tier header (4198400 bytes)"),
    ] {
        let victim = t.path().join(name);
        std::fs::write(&victim, bytes).expect("victim");
        let mtime = std::fs::metadata(&victim).expect("stat").modified().expect("mtime");
        rewrite_tier_path(&dir, 0, &victim);
        let want = format!("tier default: {} {why}", victim.display());

        let out = dovetail(&["store", "check", d]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("VIOLATION: tier default: its data file {} {why}", victim.display())), "{stdout}");

        let sock = t.path().join("vm1.sock");
        let e = fails(&["serve", "--store", d, "--disk", &format!("vm1={}", path(&sock))]);
        assert!(e.contains(&want), "{e}\nwant: {want}");
        let e = fails(&["disk", "list", d]);
        assert!(e.contains(&want), "{e}");
        let e = fails(&["store", "upgrade", d]);
        assert!(e.contains(&want), "{e}");

        assert_eq!(&std::fs::read(&victim).expect("read"), bytes, "{name} is unchanged");
        assert_eq!(std::fs::metadata(&victim).expect("stat").modified().expect("mtime"), mtime);
    }
    // Put back, everything works again.
    rewrite_tier_path(&dir, 0, std::path::Path::new("data.0"));
    assert!(ok(&["store", "check", d]).contains("result: consistent"));
    assert!(ok(&["store", "upgrade", d]).contains("is format version 5"));
}
