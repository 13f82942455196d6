//! Tiers over real files: `Store::create_tiered` makes one data file per tier (wherever the
//! operator puts it), grants by tier land in the right file at the right place, a full tier is
//! told apart from a full store, tiers and grants survive a reopen, a missing or short tier file
//! is named, and bad tier lists are refused before any file is made.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dovetail_store::{
    check, ExtentId, Store, StoreError, TierInfo, TierSpec, DATA_FILE, META_FILE,
};

const EXT: u64 = 64 << 10;

struct Dirs {
    _t: tempfile::TempDir,
    /// The store's directory.
    store: PathBuf,
    /// Where the fast tier's file goes ("another device").
    nvme: PathBuf,
    /// Where the slow tier's file goes.
    hdd: PathBuf,
}

fn dirs() -> Dirs {
    let t = tempfile::tempdir().expect("tempdir");
    let (store, nvme, hdd) = (
        t.path().join("store"),
        t.path().join("nvme"),
        t.path().join("hdd"),
    );
    std::fs::create_dir(&nvme).expect("mkdir");
    std::fs::create_dir(&hdd).expect("mkdir");
    Dirs {
        _t: t,
        store,
        nvme,
        hdd,
    }
}

fn spec(name: &str, path: &Path, extents: u64) -> TierSpec {
    TierSpec {
        name: name.into(),
        path: path.to_path_buf(),
        size: extents * EXT,
    }
}

/// fast: 2 extents (0, 1) in nvme/ds.fast; slow: 3 extents (2, 3, 4) in hdd/ds.slow.
fn create(d: &Dirs) -> Arc<Store> {
    Store::create_tiered(
        &d.store,
        &[
            spec("fast", &d.nvme.join("ds.fast"), 2),
            spec("slow", &d.hdd.join("ds.slow"), 3),
        ],
        EXT,
    )
    .expect("create")
}

/// `len` bytes at `offset` of a file, read behind the store's back.
fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("open");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).expect("read");
    b
}

fn tier_info(name: &str, extents: u32, free: u32) -> TierInfo {
    TierInfo {
        name: name.into(),
        extents,
        free,
    }
}

#[test]
fn extents_granted_on_each_tier_are_written_in_that_tiers_file() {
    let d = dirs();
    let s = create(&d);
    let (fast, slow) = (d.nvme.join("ds.fast"), d.hdd.join("ds.slow"));
    // Each file: the tier's extents, then its tier header.
    assert_eq!(
        std::fs::metadata(&fast).expect("fast").len(),
        2 * EXT + 4096
    );
    assert_eq!(
        std::fs::metadata(&slow).expect("slow").len(),
        3 * EXT + 4096
    );
    assert!(
        !d.store.join(DATA_FILE).exists(),
        "no data.0 in a tiered store"
    );
    let info = s.info();
    assert_eq!((info.format_version, info.extent_count), (5, 5));
    let shown: Vec<_> = info
        .tiers
        .iter()
        .map(|t| (t.name.as_str(), t.path.clone(), t.first_extent, t.extents))
        .collect();
    assert_eq!(
        shown,
        [("fast", fast.clone(), 0, 2), ("slow", slow.clone(), 2, 3)]
    );
    assert_eq!(s.tier_paths(), [fast.clone(), slow.clone()]);

    let key = s.create_disk("vm", 1 << 30, "parallax-v2").expect("disk");
    let sp = s.space(key).expect("space");
    assert_eq!(
        sp.tiers(),
        [tier_info("fast", 2, 2), tier_info("slow", 3, 3)]
    );
    let cold = sp.grant_extent_on(1).expect("slow");
    let hot = sp.grant_extent_on(0).expect("fast");
    let hot2 = sp.grant_extent_on(0).expect("fast");
    assert_eq!((cold, hot, hot2), (ExtentId(2), ExtentId(0), ExtentId(1)));
    assert_eq!(
        (
            sp.extent_tier(hot2),
            sp.extent_tier(cold),
            sp.extent_tier(ExtentId(4))
        ),
        (0, 1, 1)
    );
    sp.write(hot2, 4096, b"hot block").expect("write");
    sp.write(cold, 8192, b"cold block").expect("write");
    sp.sync().expect("sync");
    // Extent 1 is the fast file's second extent; extent 2 the slow file's first.
    assert_eq!(file_bytes(&fast, EXT + 4096, 9), b"hot block");
    assert_eq!(file_bytes(&slow, 8192, 10), b"cold block");
    let mut b = [0u8; 10];
    sp.read(cold, 8192, &mut b).expect("read");
    assert_eq!(&b, b"cold block");
    assert_eq!(
        sp.tiers(),
        [tier_info("fast", 2, 0), tier_info("slow", 3, 2)]
    );
    assert_eq!(s.info().tiers[1].free, 2);

    // Promoting a candidate frees the retired version's extents and releases their space in
    // their own files.
    s.add_version("vm", "parallax-v2").expect("candidate");
    let cand = s.disk("vm").expect("disk").candidate.expect("candidate");
    let cs = s.space(cand).expect("space");
    let e = cs.grant_extent().expect("lowest free extent, any tier");
    assert_eq!(e, ExtentId(3));
    drop((sp, cs));
    s.promote("vm").expect("promote");
    assert_eq!(file_bytes(&fast, EXT + 4096, 9), [0; 9]);
    assert_eq!(file_bytes(&slow, 8192, 10), [0; 10]);
    assert_eq!(
        s.tiers(),
        [tier_info("fast", 2, 2), tier_info("slow", 3, 2)]
    );
    drop(s);
    let report = check(&d.store).expect("check");
    assert!(report.is_ok(), "{report}");
}

#[test]
fn a_full_tier_is_not_a_full_store() {
    let d = dirs();
    let s = create(&d);
    let key = s.create_disk("vm", 1 << 30, "parallax-v2").expect("disk");
    let sp = s.space(key).expect("space");
    sp.grant_extent_on(0).expect("fast");
    sp.grant_extent_on(0).expect("fast");
    let e = sp.grant_extent_on(0).expect_err("fast full");
    assert!(
        matches!(e, StoreError::TierFull(ref t) if t == "fast"),
        "{e}"
    );
    assert_eq!(e.to_string(), "tier fast has no free extent left");
    assert_eq!(sp.grant_extent_on(1).expect("slow has room"), ExtentId(2));
    assert!(matches!(
        sp.grant_extent_on(7),
        Err(StoreError::Invalid(ref s)) if s.contains("no tier 7")
    ));
    sp.grant_extent().expect("any");
    sp.grant_extent().expect("any");
    assert!(matches!(sp.grant_extent(), Err(StoreError::Full)));
    assert!(matches!(sp.grant_extent_on(1), Err(StoreError::TierFull(ref t)) if t == "slow"));
    assert_eq!(sp.extents().len(), 5);
}

#[test]
fn a_reopened_store_keeps_its_tiers_grants_and_data() {
    let d = dirs();
    let s = create(&d);
    let uuid = s.info().uuid;
    let key = s.create_disk("vm", 1 << 30, "parallax-v2").expect("disk");
    let sp = s.space(key).expect("space");
    let cold = sp.grant_extent_on(1).expect("slow");
    let hot = sp.grant_extent_on(0).expect("fast");
    sp.write(cold, 0, b"cold").expect("write");
    sp.write(hot, 0, b"hot").expect("write");
    sp.sync().expect("sync");
    sp.commit_root(b"root").expect("commit");
    let tiers = s.info().tiers;
    drop((sp, s));

    for read_only in [false, true] {
        let s = if read_only {
            Store::open_read_only(&d.store)
        } else {
            Store::open(&d.store)
        }
        .expect("reopen");
        assert_eq!(s.info().uuid, uuid);
        assert_eq!(s.info().tiers, tiers);
        assert_eq!(
            s.tiers(),
            [tier_info("fast", 2, 1), tier_info("slow", 3, 2)]
        );
        let sp = s.space(key).expect("space");
        assert_eq!(sp.extents(), vec![cold, hot]);
        assert_eq!(sp.root(), b"root");
        let mut b = [0u8; 4];
        sp.read(cold, 0, &mut b).expect("read");
        assert_eq!(&b, b"cold");
        sp.read(hot, 0, &mut b[..3]).expect("read");
        assert_eq!(&b[..3], b"hot");
    }
    let report = check(&d.store).expect("check");
    assert!(report.is_ok(), "{report}");
    let text = report.to_string();
    let fast = d.nvme.join("ds.fast");
    assert!(
        text.contains(&format!(
            "tier fast: {}, 2 extents (128 KiB) from extent 0: 1 granted, 1 free",
            fast.display()
        )),
        "{text}"
    );
}

#[test]
fn a_missing_or_short_tier_file_is_named() {
    let d = dirs();
    drop(create(&d));
    let slow = d.hdd.join("ds.slow");
    let kept = d.hdd.join("kept");
    std::fs::rename(&slow, &kept).expect("move away");
    for read_only in [false, true] {
        let e = if read_only {
            Store::open_read_only(&d.store)
        } else {
            Store::open(&d.store)
        }
        .expect_err("missing");
        assert!(matches!(e, StoreError::TierFile { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("tier slow: {} is missing", slow.display())
        );
    }
    let report = check(&d.store).expect("check");
    assert_eq!(
        report.violations,
        vec![format!(
            "tier slow: its data file {} is missing",
            slow.display()
        )],
        "{report}"
    );

    std::fs::rename(&kept, &slow).expect("move back");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&slow)
        .and_then(|f| f.set_len(EXT))
        .expect("truncate");
    let e = Store::open(&d.store).expect_err("short");
    assert!(
        e.to_string().starts_with(&format!(
            "tier slow: {} is {EXT} bytes, shorter than the tier's 3 extents of 64 KiB",
            slow.display()
        )),
        "{e}"
    );
    assert!(!check(&d.store).expect("check").is_ok());
}

#[test]
fn a_store_without_tiers_has_one_default_tier_in_its_directory() {
    let d = dirs();
    let s = Store::create(&d.store, 3 * EXT, EXT).expect("create");
    assert_eq!(s.tiers(), [tier_info("default", 3, 3)]);
    assert_eq!(s.tier_paths(), [d.store.join(DATA_FILE)]);
    // Recorded as `data.0`, inside the directory: the store can be moved.
    let meta = std::fs::read(d.store.join(META_FILE)).expect("meta");
    assert_eq!(&meta[68..70], &1u16.to_le_bytes());
    assert_eq!(&meta[72..79], b"default");
    assert_eq!(&meta[88..92], &3u32.to_le_bytes());
    assert_eq!(&meta[92..94], &6u16.to_le_bytes());
    assert_eq!(&meta[94..100], b"data.0");
    let key = s.create_disk("vm", 1 << 20, "parallax-v1").expect("disk");
    let sp = s.space(key).expect("space");
    let e = sp.grant_extent_on(0).expect("tier 0");
    sp.write(e, 0, b"moved").expect("write");
    sp.sync().expect("sync");
    drop((sp, s));
    let moved = d.store.with_file_name("moved");
    std::fs::rename(&d.store, &moved).expect("move the store");
    let s = Store::open(&moved).expect("opens where it is now");
    assert_eq!(s.tier_paths(), [moved.join(DATA_FILE)]);
    let mut b = [0u8; 5];
    s.space(key)
        .expect("space")
        .read(e, 0, &mut b)
        .expect("read");
    assert_eq!(&b, b"moved");
}

#[test]
fn bad_tier_lists_are_refused_before_any_file_is_made() {
    let d = dirs();
    let (fast, slow) = (d.nvme.join("ds.fast"), d.hdd.join("ds.slow"));
    let cases: Vec<(Vec<TierSpec>, u64, &str)> = vec![
        (vec![], EXT, "1 to 8 tiers, not 0"),
        (
            vec![spec("fast", &fast, 1), spec("fast", &slow, 1)],
            EXT,
            "tier name \"fast\" is used twice",
        ),
        (
            vec![
                spec("fast", &fast, 1),
                spec("slow", &d.nvme.join(".").join("ds.fast"), 1),
            ],
            EXT,
            "tiers fast and slow have the same data file",
        ),
        (
            vec![spec("Fast", &fast, 1)],
            EXT,
            "tier name \"Fast\" is invalid",
        ),
        (
            vec![TierSpec {
                name: "fast".into(),
                path: fast.clone(),
                size: EXT + 4096,
            }],
            EXT,
            "tier fast's size 68 KiB is not a whole number of 64 KiB extents",
        ),
        (
            vec![TierSpec {
                name: "slow".into(),
                path: slow.clone(),
                size: 4096,
            }],
            EXT,
            "tier slow of 4 KiB is too small",
        ),
        (
            vec![spec("fast", &fast, 1), spec("slow", &slow, 1)],
            1000,
            "multiple of 4096",
        ),
        (
            vec![
                TierSpec {
                    name: "fast".into(),
                    path: fast.clone(),
                    size: 40_000 * 4096,
                },
                TierSpec {
                    name: "slow".into(),
                    path: slow.clone(),
                    size: 40_000 * 4096,
                },
            ],
            4096,
            "80000 extents is more than the 65536",
        ),
        (
            (0..9)
                .map(|i| spec(&format!("t{i}"), &d.hdd.join(format!("t{i}")), 1))
                .collect(),
            EXT,
            "1 to 8 tiers, not 9",
        ),
        (
            vec![spec("fast", &d.store.join(META_FILE), 1)],
            EXT,
            "would be the store's own store.meta",
        ),
        (
            vec![spec(
                "fast",
                &PathBuf::from(format!("/{}", "x".repeat(500))),
                1,
            )],
            EXT,
            "(1 to 480 allowed)",
        ),
    ];
    for (tiers, ext, words) in cases {
        let e = Store::create_tiered(&d.store, &tiers, ext).expect_err(words);
        assert!(matches!(e, StoreError::Invalid(_)), "{words}: {e}");
        assert!(e.to_string().contains(words), "{e} lacks {words:?}");
    }
    assert!(!d.store.exists(), "a refused create touches nothing");
    assert_eq!(std::fs::read_dir(&d.hdd).expect("ls").count(), 0);
    assert_eq!(std::fs::read_dir(&d.nvme).expect("ls").count(), 0);

    // A tier in a directory that does not exist: an I/O error naming the tier and its file,
    // and nothing left behind (the first tier's file, made already, is removed again).
    let lost = d.hdd.join("no-such-dir").join("ds.slow");
    let e = Store::create_tiered(
        &d.store,
        &[spec("fast", &fast, 1), spec("slow", &lost, 1)],
        EXT,
    )
    .expect_err("no directory");
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!(
            "creating tier slow's data file {}",
            lost.display()
        )),
        "{e}"
    );
    assert!(!fast.exists() && !d.store.exists());

    // An existing tier file is never overwritten, and nothing is left behind.
    std::fs::write(&slow, b"precious").expect("write");
    let e = Store::create_tiered(
        &d.store,
        &[spec("fast", &fast, 1), spec("slow", &slow, 1)],
        EXT,
    )
    .expect_err("exists");
    assert!(
        matches!(e, StoreError::StoreExists(ref p) if *p == slow),
        "{e}"
    );
    assert_eq!(std::fs::read(&slow).expect("read"), b"precious");
    assert!(!fast.exists());
    assert!(!d.store.join(META_FILE).exists());
}

#[test]
fn a_relative_tier_path_is_recorded_absolute() {
    let d = dirs();
    // A path to nvme/ds.fast relative to the current directory (never changed: tests share it).
    let cwd = std::env::current_dir().expect("cwd");
    let mut rel = PathBuf::new();
    for _ in cwd.components().skip(1) {
        rel.push("..");
    }
    let target = d.nvme.join("ds.fast");
    rel.push(target.strip_prefix("/").expect("absolute temp dir"));
    assert!(rel.is_relative());
    let s = Store::create_tiered(
        &d.store,
        &[
            spec("fast", &rel, 1),
            spec("slow", &d.hdd.join("ds.slow"), 1),
        ],
        EXT,
    )
    .expect("create");
    let recorded = s.info().tiers[0].path.clone();
    assert!(recorded.is_absolute(), "{}", recorded.display());
    assert_eq!(recorded, cwd.join(&rel));
    assert!(target.exists());
    drop(s);
    Store::open(&d.store).expect("reopen");
}

/// Rewrites tier `t`'s path in the store's header (the tier table, under the header's
/// checksum), as someone with write access to `store.meta` could: the store's own encoder
/// writes the edited header, so every checksum is right.
fn rewrite_tier_path(dir: &Path, t: usize, path: &Path, version: Option<u32>) {
    use dovetail_store::format::Header;
    let meta = dir.join(META_FILE);
    let mut bytes = std::fs::read(&meta).expect("read");
    let mut h = Header::decode(&bytes[..4096], &meta).expect("header");
    h.tiers[t].path = path.to_path_buf();
    if let Some(v) = version {
        h.version = v;
    }
    bytes[..4096].copy_from_slice(&h.encode());
    std::fs::write(&meta, &bytes).expect("write");
}

#[test]
fn a_tier_path_rewritten_to_a_host_file_is_refused_and_the_file_is_untouched() {
    let d = dirs();
    let s = create(&d);
    let key = s.create_disk("vm", 1 << 30, "parallax-v2").expect("disk");
    drop(s);
    // Host files standing in for /etc/passwd: a short one, one long enough for the tier, and
    // another store's tier file (same name, same geometry).
    let victim = d.hdd.join("passwd");
    let line = b"root:x:0:0:root:/root:/bin/bash\n";
    let short: Vec<u8> = line.repeat(4);
    let long: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take((3 * EXT + 8192) as usize)
        .collect();
    let other = dirs();
    drop(create(&other));
    let foreign = other.hdd.join("ds.slow");
    let foreign_bytes = std::fs::read(&foreign).expect("read");
    let cases: Vec<(&Path, Vec<u8>, &str)> = vec![
        (&victim, short, "is 128 bytes, shorter than the tier's 3 extents of 64 KiB and its tier header"),
        (&victim, long, "has no Dovetail tier header there (bad magic): it was not created as a tier file of a store (at byte 196608)"),
        (&foreign, foreign_bytes, "belongs to another store (its tier header names store "),
    ];
    for (path, bytes, words) in cases {
        if path == victim {
            std::fs::write(&victim, &bytes).expect("write victim");
        }
        rewrite_tier_path(&d.store, 1, path, None);
        let want = format!("tier slow: {} {words}", path.display());
        for e in [
            Store::open(&d.store).expect_err("read-write"),
            Store::open_read_only(&d.store).expect_err("read-only"),
            Store::open_adopting_tiers(&d.store).expect_err("adopting"),
        ] {
            assert!(e.to_string().starts_with(&want), "{e}\nwant: {want}");
        }
        let report = check(&d.store).expect("check runs");
        assert!(!report.is_ok());
        assert!(
            report.violations.iter().any(|v| v.contains(words)),
            "{report}"
        );
        assert_eq!(
            std::fs::read(path).expect("read"),
            bytes,
            "{} is unchanged",
            path.display()
        );
    }
    // Something that is not a regular file is not opened at all.
    rewrite_tier_path(&d.store, 1, &d.nvme, None);
    let e = Store::open(&d.store).expect_err("a directory");
    assert!(
        e.to_string()
            .contains("is not a regular file (a directory)"),
        "{e}"
    );
    // Put back, the store opens with its disk.
    rewrite_tier_path(&d.store, 1, &d.hdd.join("ds.slow"), None);
    let s = Store::open(&d.store).expect("open");
    assert!(s.space(key).is_ok());
}

#[test]
fn a_version_3_store_with_tiers_elsewhere_is_upgraded_only_when_the_operator_adopts_them() {
    let d = dirs();
    let s = create(&d);
    let key = s.create_disk("vm", 1 << 30, "parallax-v2").expect("disk");
    let sp = s.space(key).expect("space");
    let e = sp.grant_extent_on(1).expect("grant");
    sp.write(e, 0, b"cold").expect("write");
    sp.sync().expect("sync");
    drop((sp, s));
    // The store as a version-3 binary left it: header version 3, no tier headers, slots with
    // version-3 checksums.
    let (fast, slow) = (d.nvme.join("ds.fast"), d.hdd.join("ds.slow"));
    downgrade_to_v3(&d.store, &[(&fast, 2), (&slow, 3)]);
    let slow_before = std::fs::read(&slow).expect("read");

    // Not opened, not even read: nothing proves the files are the store's.
    for e in [
        Store::open(&d.store).expect_err("rw"),
        Store::open_read_only(&d.store).expect_err("ro"),
    ] {
        let s = e.to_string();
        assert!(
            s.starts_with(&format!(
                "tier fast: {} is outside the store's directory",
                fast.display()
            )) && s.contains("dovetail store upgrade"),
            "{s}"
        );
    }
    let report = check(&d.store).expect("check");
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("is outside the store's directory")),
        "{report}"
    );
    assert!(
        report.to_string().contains(&slow.display().to_string()),
        "check lists the tier files: {report}"
    );
    assert_eq!(std::fs::read(&slow).expect("read"), slow_before);

    // Adopted: the upgrade writes each tier header; then every open works.
    let s = Store::open_adopting_tiers(&d.store).expect("adopt");
    assert_eq!(s.info().format_version, 5);
    let mut b = [0u8; 4];
    s.space(key)
        .expect("space")
        .read(e, 0, &mut b)
        .expect("read");
    assert_eq!(&b, b"cold");
    drop(s);
    assert_eq!(
        std::fs::metadata(&slow).expect("slow").len(),
        3 * EXT + 4096
    );
    assert!(file_bytes(&slow, 3 * EXT, 12) == b"DOVETAILTIER");
    assert!(Store::open(&d.store).is_ok());
    assert!(check(&d.store).expect("check").is_ok());
}

#[test]
fn a_version_3_store_without_tiers_is_upgraded_by_a_read_write_open() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("s");
    let s = Store::create(&dir, 3 * EXT, EXT).expect("create");
    s.create_disk("vm", 1 << 20, "parallax-v1").expect("disk");
    drop(s);
    downgrade_to_v3(&dir, &[(&dir.join(DATA_FILE), 3)]);
    let ro = Store::open_read_only(&dir).expect("read-only");
    assert_eq!(ro.info().format_version, 3);
    drop(ro);
    let s = Store::open(&dir).expect("upgrade");
    assert_eq!(s.info().format_version, 5);
    assert!(s.disk("vm").is_ok());
    drop(s);
    assert!(file_bytes(&dir.join(DATA_FILE), 3 * EXT, 12) == b"DOVETAILTIER");
}

/// Turns a store this binary made into what a version-3 binary made: the header says 3, every
/// valid slot is re-checksummed as version 3, and each tier file loses its tier header.
fn downgrade_to_v3(dir: &Path, files: &[(&Path, u64)]) {
    use dovetail_store::format::{slot_crc, Header};
    let meta = dir.join(META_FILE);
    let mut bytes = std::fs::read(&meta).expect("read");
    let h = Header::decode(&bytes[..4096], &meta).expect("header");
    for i in 0..2 {
        let at = h.slot_offset(i) as usize;
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
        if bytes[at..at + 16].iter().all(|&b| b == 0) || len > h.max_payload() {
            continue;
        }
        let crc = u32::from_le_bytes(bytes[at + 12..at + 16].try_into().expect("4"));
        let payload = bytes[at + 16..at + 16 + len].to_vec();
        if slot_crc(h.version, &bytes[at..at + 12], &payload) == crc {
            // The payload as a version-3 binary encodes it (no attachment flags).
            let (m, _) = dovetail_store::format::Meta::decode(&payload, h.version).expect("decode");
            let payload = m.encode_for(3).expect("v3");
            bytes[at + 8..at + 12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            let new = slot_crc(3, &bytes[at..at + 12], &payload);
            bytes[at + 12..at + 16].copy_from_slice(&new.to_le_bytes());
            bytes[at + 16..at + 16 + payload.len()].copy_from_slice(&payload);
        }
    }
    bytes[..4096].copy_from_slice(&Header { version: 3, ..h }.encode());
    std::fs::write(&meta, &bytes).expect("write");
    for (f, extents) in files {
        std::fs::OpenOptions::new()
            .write(true)
            .open(f)
            .and_then(|f| f.set_len(extents * EXT))
            .expect("truncate");
    }
}

#[test]
fn a_version_3_data_file_that_is_a_symlink_is_not_adopted_silently() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("s");
    let s = Store::create(&dir, 3 * EXT, EXT).expect("create");
    drop(s);
    downgrade_to_v3(&dir, &[(&dir.join(DATA_FILE), 3)]);
    // data.0 replaced by a symlink to a host file of exactly the tier's size.
    let host = t.path().join("host-file");
    std::fs::rename(dir.join(DATA_FILE), &host).expect("move");
    let before = std::fs::read(&host).expect("read");
    std::os::unix::fs::symlink(&host, dir.join(DATA_FILE)).expect("symlink");
    let e = Store::open(&dir).expect_err("a symlinked data file");
    assert!(
        e.to_string().contains("is outside the store's directory"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&host).expect("read"),
        before,
        "the host file is unchanged"
    );
}
