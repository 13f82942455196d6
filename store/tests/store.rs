//! The store over real files: creation, reopening, grants, the isolation check, the catalog,
//! tee records, presence map files, slot fallback, format-version refusal, and `check` finding
//! injected damage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dovetail_store::le::{le_u32, le_u64};
use dovetail_store::{
    check, DiskInfo, ExtentId, Store, StoreError, TeeRec, TeeState, VersionKey, VersionSpace,
    DATA_FILE, MAPS_DIR, META_FILE,
};

/// Small extents keep the data file (and byte-for-byte comparisons of it) small.
const EXT: u64 = 64 << 10;

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let p = t.path().join("store");
    (t, p)
}

fn create(dir: &Path, extents: u64) -> Arc<Store> {
    Store::create(dir, extents * EXT, EXT).expect("create store")
}

fn read_all(space: &dyn VersionSpace, e: ExtentId, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    space.read(e, at, &mut b).expect("read");
    b
}

/// A slot's checksum in format version 4, that of the stores this binary creates
/// (docs/format.md): crc32c over the format version, the slot's first 12 bytes, then the
/// payload.
fn slot_crc(head: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&5u32.to_le_bytes()), head);
    crc32c::crc32c_append(crc, payload)
}

/// The newest valid slot of a (format version 5) metadata file, found as docs/format.md
/// describes it: returns the slot's offset and generation.
fn newest_slot(meta: &[u8]) -> (usize, u64) {
    let slot_size = le_u64(meta, 56) as usize;
    let mut best = None;
    for i in 0..2 {
        let off = 4096 + i * slot_size;
        let generation = le_u64(meta, off);
        let len = le_u32(meta, off + 8) as usize;
        let crc = le_u32(meta, off + 12);
        if generation == 0 || len > slot_size - 16 {
            continue;
        }
        let want = slot_crc(&meta[off..off + 12], &meta[off + 16..off + 16 + len]);
        if want == crc && best.is_none_or(|(_, g)| generation > g) {
            best = Some((off, generation));
        }
    }
    best.expect("a valid slot")
}

/// Rewrites the payload of the slot at `off` with `edit` applied, keeping the slot valid (a
/// raw edit: the way to plant damage that checksums cannot see).
fn edit_payload(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(META_FILE);
    let mut meta = std::fs::read(&path).expect("read metadata");
    let (off, _) = newest_slot(&meta);
    let len = le_u32(&meta, off + 8) as usize;
    let mut payload = meta[off + 16..off + 16 + len].to_vec();
    edit(&mut payload);
    meta[off + 8..off + 12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = slot_crc(&meta[off..off + 12], &payload);
    meta[off + 12..off + 16].copy_from_slice(&crc.to_le_bytes());
    meta[off + 16..off + 16 + payload.len()].copy_from_slice(&payload);
    std::fs::write(&path, &meta).expect("write metadata");
}

#[test]
fn create_then_open_round_trips_geometry_and_catalog() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 8);
    let info = s.info();
    assert_eq!(info.extent_count, 8);
    assert_eq!(info.extent_size, EXT);
    assert_eq!(info.free_extents, 8);
    assert_eq!(info.generation, 1);
    let key = s
        .create_disk("vm1", 1 << 30, "parallax-v1")
        .expect("create disk");
    assert_eq!(key, VersionKey(1));
    drop(s);

    let meta_len = std::fs::metadata(dir.join(META_FILE))
        .expect("metadata file")
        .len();
    let slot_size = le_u64(&std::fs::read(dir.join(META_FILE)).expect("read"), 56);
    assert_eq!(meta_len, 4096 + 2 * slot_size);
    assert_eq!(
        std::fs::metadata(dir.join(DATA_FILE))
            .expect("data file")
            .len(),
        8 * EXT + 4096,
        "8 extents, then the tier header"
    );
    assert!(
        !dir.join("store.meta.tmp").exists(),
        "no temporary file left"
    );

    let s = Store::open(&dir).expect("reopen");
    let again = s.info();
    assert_eq!(again.uuid, info.uuid);
    assert_eq!(again.generation, 2);
    assert_eq!(
        s.disks(),
        vec![DiskInfo {
            name: "vm1".into(),
            size: 1 << 30,
            layout: "parallax-v1".into(),
            trusted: key,
            candidate: None,
            tee: None,
        }]
    );
    assert!(s.space(key).expect("space").root().is_empty());
    drop(s);
    let report = check(&dir).expect("check");
    assert!(report.is_ok(), "{report}");
}

#[test]
fn grants_roots_and_synced_data_persist_across_reopen() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 8);
    let ka = s.create_disk("a", 1 << 20, "parallax-v1").expect("disk a");
    let kb = s.create_disk("b", 1 << 20, "parallax-v1").expect("disk b");
    let (sa, sb) = (s.space(ka).expect("space a"), s.space(kb).expect("space b"));
    let e0 = sa.grant_extent().expect("grant");
    let e1 = sb.grant_extent().expect("grant");
    let e2 = sa.grant_extent().expect("grant");
    assert_eq!(sa.extents(), vec![e0, e2]);
    sa.write(e2, 4096, b"hello, extent")
        .expect("write own extent");
    sa.sync().expect("sync");
    sa.commit_root(b"root of a").expect("commit root");
    drop((sa, sb, s));

    let s = Store::open(&dir).expect("reopen");
    let (sa, sb) = (s.space(ka).expect("space a"), s.space(kb).expect("space b"));
    assert_eq!(sa.extents(), vec![e0, e2], "grant order kept");
    assert_eq!(sb.extents(), vec![e1]);
    assert_eq!(sa.root(), b"root of a");
    assert_eq!(read_all(&*sa, e2, 4096, 13), b"hello, extent");
    assert_eq!(s.info().free_extents, 5);
    sa.write(e0, 0, &[1; 512]).expect("grants still hold");
    assert!(matches!(
        sb.write(e0, 0, &[2; 512]),
        Err(StoreError::GrantViolation { .. })
    ));
}

#[test]
fn a_write_outside_the_grants_is_refused_counted_and_changes_no_byte() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 4);
    let ka = s.create_disk("a", 1 << 20, "parallax-v1").expect("disk a");
    let kb = s.create_disk("b", 1 << 20, "parallax-v1").expect("disk b");
    let (sa, sb) = (s.space(ka).expect("space a"), s.space(kb).expect("space b"));
    let ea = sa.grant_extent().expect("grant");
    sa.write(ea, 0, &[0xaa; 8192]).expect("own write");
    sa.sync().expect("sync");
    let before = std::fs::read(dir.join(DATA_FILE)).expect("read data file");

    let err = sb.write(ea, 512, &[0x55; 4096]).expect_err("not granted");
    match &err {
        StoreError::GrantViolation {
            key,
            extent,
            offset,
        } => {
            assert_eq!((*key, *extent, *offset), (kb, ea, 512));
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("version 2") && msg.contains("extent 0") && msg.contains("512"),
        "{msg}"
    );
    // A free extent is nobody's either.
    let free = ExtentId(3);
    assert!(matches!(
        sb.write(free, 0, &[0x55; 512]),
        Err(StoreError::GrantViolation { extent, .. }) if extent == free
    ));
    assert_eq!(sb.grant_violations(), 2);
    assert_eq!(s.grant_violations(kb), 2);
    assert_eq!(
        s.space(kb).expect("second space").grant_violations(),
        2,
        "counted per version, not per handle"
    );
    assert_eq!(sa.grant_violations(), 0);
    sb.sync().expect("sync");
    let after = std::fs::read(dir.join(DATA_FILE)).expect("read data file");
    assert!(before == after, "a refused write changed the data file");
}

#[test]
fn two_versions_cannot_write_each_others_extents() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 4);
    let trusted = s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    let cand = s.add_version("d", "parallax-v2").expect("candidate");
    let (st, sc) = (
        s.space(trusted).expect("space"),
        s.space(cand).expect("space"),
    );
    let et = st.grant_extent().expect("grant");
    let ec = sc.grant_extent().expect("grant");
    st.write(et, 0, &[1; 4096]).expect("own");
    sc.write(ec, 0, &[2; 4096]).expect("own");
    for (space, foreign) in [(&st, ec), (&sc, et)] {
        let err = space.write(foreign, 0, &[9; 4096]).expect_err("foreign");
        assert!(
            matches!(err, StoreError::GrantViolation { key, extent, offset: 0 } if key == space.key() && extent == foreign),
            "{err}"
        );
        assert_eq!(space.grant_violations(), 1);
    }
    assert_eq!(read_all(&*st, et, 0, 4096), vec![1; 4096]);
    assert_eq!(read_all(&*sc, ec, 0, 4096), vec![2; 4096]);
    // Reads are not restricted (the isolation layer guards writes only).
    assert_eq!(read_all(&*st, ec, 0, 16), vec![2; 16]);
}

#[test]
fn reads_and_writes_outside_an_extent_or_the_store_are_refused() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    let k = s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    let sp = s.space(k).expect("space");
    let e = sp.grant_extent().expect("grant");
    sp.write(e, EXT - 512, &[1; 512]).expect("last sector fits");
    let oob = |r: dovetail_store::Result<()>| matches!(r, Err(StoreError::OutOfBounds { .. }));
    assert!(oob(sp.write(e, EXT - 511, &[1; 512])));
    assert!(oob(sp.write(e, u64::MAX, &[1; 1])));
    assert!(oob(sp.write(ExtentId(2), 0, &[1; 1])));
    let mut b = [0u8; 512];
    assert!(oob(sp.read(e, EXT, &mut b)));
    assert!(oob(sp.read(ExtentId(u32::MAX), 0, &mut b)));
    assert_eq!(
        sp.grant_violations(),
        0,
        "out of bounds is not a grant violation"
    );
}

#[test]
fn a_regranted_extent_reads_as_zeros_and_a_deleted_versions_space_cannot_write() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    let ka = s.create_disk("a", 1 << 20, "parallax-v1").expect("disk a");
    let stale = s.space(ka).expect("space");
    let e = stale.grant_extent().expect("grant");
    stale.write(e, 0, &[0xee; 8192]).expect("write");
    assert_eq!(s.delete_disk("a").expect("delete"), 1);
    assert_eq!(s.info().free_extents, 2);
    assert!(matches!(
        stale.write(e, 0, &[1; 512]),
        Err(StoreError::GrantViolation { .. })
    ));
    assert!(matches!(
        stale.grant_extent(),
        Err(StoreError::NoSuchVersion(k)) if k == ka
    ));
    assert!(matches!(
        stale.commit_root(b"x"),
        Err(StoreError::NoSuchVersion(_))
    ));
    let kb = s.create_disk("b", 1 << 20, "parallax-v1").expect("disk b");
    assert!(kb > ka, "keys are never reused");
    let sb = s.space(kb).expect("space");
    assert_eq!(sb.grant_extent().expect("grant"), e, "lowest free extent");
    assert_eq!(read_all(&*sb, e, 0, 8192), vec![0; 8192]);
    assert!(matches!(
        stale.write(e, 0, &[1; 512]),
        Err(StoreError::GrantViolation { .. })
    ));
    assert!(matches!(s.space(ka), Err(StoreError::NoSuchVersion(_))));
}

#[test]
fn promote_and_drop_candidate_free_the_right_extents() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 6);
    let k1 = s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    let k2 = s.add_version("d", "parallax-v2").expect("candidate");
    assert!(matches!(
        s.add_version("d", "parallax-v2"),
        Err(StoreError::CandidateExists { key, .. }) if key == k2
    ));
    assert_eq!(s.disk("d").expect("disk").candidate, Some(k2));
    let (s1, s2) = (s.space(k1).expect("space"), s.space(k2).expect("space"));
    s1.grant_extent().expect("grant");
    s1.grant_extent().expect("grant");
    let e2 = s2.grant_extent().expect("grant");
    assert_eq!(s.info().free_extents, 3);
    assert_eq!(s.promote("d").expect("promote"), k1);
    let d = s.disk("d").expect("disk");
    assert_eq!((d.trusted, d.candidate), (k2, None));
    assert_eq!(d.layout, "parallax-v2");
    assert_eq!(s.info().free_extents, 5);
    assert!(matches!(s.version(k1), Err(StoreError::NoSuchVersion(_))));
    assert_eq!(s2.extents(), vec![e2]);
    let k3 = s.add_version("d", "parallax-v1").expect("candidate");
    s.space(k3).expect("space").grant_extent().expect("grant");
    assert_eq!(s.drop_candidate("d").expect("drop"), k3);
    assert!(matches!(
        s.drop_candidate("d"),
        Err(StoreError::NoCandidate(_))
    ));
    assert!(matches!(s.promote("d"), Err(StoreError::NoCandidate(_))));
    assert_eq!(s.info().free_extents, 5);
    drop((s1, s2, s));
    let report = check(&dir).expect("check");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.versions.len(), 1);
}

#[test]
fn catalog_errors_are_distinct_and_clear() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    s.create_disk("vm1", 1 << 20, "parallax-v1").expect("disk");
    let e = s
        .create_disk("vm1", 1 << 20, "parallax-v1")
        .expect_err("dup");
    assert!(
        matches!(e, StoreError::DiskExists(ref n) if n == "vm1"),
        "{e}"
    );
    for bad in ["", "a/b", "../x", "-x", &"n".repeat(65)] {
        assert!(
            matches!(
                s.create_disk(bad, 1 << 20, "parallax-v1"),
                Err(StoreError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
    for size in [0, 512, 4097] {
        let e = s
            .create_disk("x", size, "parallax-v1")
            .expect_err("bad size");
        assert!(e.to_string().contains("4096"), "{e}");
    }
    assert!(matches!(
        s.create_disk("x", 4096, "bad layout"),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.delete_disk("nope"),
        Err(StoreError::NoSuchDisk(_))
    ));
    assert!(matches!(
        s.add_version("nope", "parallax-v1"),
        Err(StoreError::NoSuchDisk(_))
    ));
    assert!(matches!(
        s.space(VersionKey(99)),
        Err(StoreError::NoSuchVersion(VersionKey(99)))
    ));
    let sp = s.space(VersionKey(1)).expect("space");
    assert!(matches!(
        sp.commit_root(&vec![0; (64 << 10) + 1]),
        Err(StoreError::RootTooLarge { .. })
    ));
    sp.commit_root(&vec![7; 64 << 10]).expect("64 KiB fits");
    assert_eq!(s.disks().len(), 1, "nothing half-created");
}

#[test]
fn create_refuses_existing_files_and_bad_geometry_and_open_refuses_no_store() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    drop(s);
    let e = Store::create(&dir, 2 * EXT, EXT).expect_err("exists");
    assert!(matches!(e, StoreError::StoreExists(_)), "{e}");

    let (_t2, fresh) = tempdir();
    let cases: [(u64, u64, &str); 4] = [
        (EXT / 2, EXT, "too small"),
        (3 * EXT / 2, EXT, "whole number"),
        (1 << 20, 1000, "multiple of 4096"),
        (1 << 40, 4096, "use larger extents"),
    ];
    for (size, ext, words) in cases {
        let e = Store::create(&fresh, size, ext).expect_err("bad geometry");
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
        assert!(e.to_string().contains(words), "{e} lacks {words:?}");
    }
    assert!(!fresh.exists(), "a refused create touches nothing");

    let e = Store::open(&fresh).expect_err("no store");
    assert!(matches!(e, StoreError::NoStore(_)), "{e}");
    std::fs::create_dir_all(&fresh).expect("mkdir");
    assert!(matches!(Store::open(&fresh), Err(StoreError::NoStore(_))));
    assert!(matches!(check(&fresh), Err(StoreError::NoStore(_))));

    // A data file alone (an interrupted create, or someone else's file) is not overwritten.
    std::fs::write(fresh.join(DATA_FILE), b"precious").expect("write");
    assert!(matches!(
        Store::create(&fresh, 2 * EXT, EXT),
        Err(StoreError::StoreExists(_))
    ));
    assert_eq!(
        std::fs::read(fresh.join(DATA_FILE)).expect("read"),
        b"precious"
    );
}

#[test]
fn a_store_is_opened_by_one_writer_at_a_time() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    assert!(matches!(Store::open(&dir), Err(StoreError::InUse(_))));
    assert!(matches!(
        Store::open_read_only(&dir),
        Err(StoreError::InUse(_))
    ));
    assert!(matches!(check(&dir), Err(StoreError::InUse(_))));
    drop(s);
    let r1 = Store::open_read_only(&dir).expect("reader");
    let r2 = Store::open_read_only(&dir).expect("second reader");
    assert!(matches!(
        r1.create_disk("x", 4096, "parallax-v1"),
        Err(StoreError::ReadOnly)
    ));
    assert!(matches!(Store::open(&dir), Err(StoreError::InUse(_))));
    drop((r1, r2));
    Store::open(&dir).expect("writer again");
}

#[test]
fn a_full_store_says_so() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    let k = s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    let sp = s.space(k).expect("space");
    sp.grant_extent().expect("grant");
    sp.grant_extent().expect("grant");
    assert!(matches!(sp.grant_extent(), Err(StoreError::Full)));
    assert_eq!(sp.extents().len(), 2);
}

#[test]
fn a_corrupt_newest_slot_falls_back_to_the_previous_generation() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    let k = s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    let sp = s.space(k).expect("space");
    sp.commit_root(b"first").expect("commit");
    sp.commit_root(b"second").expect("commit");
    assert_eq!(s.info().generation, 4);
    drop((sp, s));

    let path = dir.join(META_FILE);
    let mut meta = std::fs::read(&path).expect("read");
    let (off, generation) = newest_slot(&meta);
    assert_eq!(generation, 4);
    meta[off + 16 + 5] ^= 0x40;
    std::fs::write(&path, &meta).expect("write");

    let s = Store::open(&dir).expect("opens on the older slot");
    assert_eq!(s.info().generation, 3);
    let sp = s.space(k).expect("space");
    assert_eq!(sp.root(), b"first");
    drop(sp);
    drop(s);
    let report = check(&dir).expect("check");
    assert!(report.is_ok(), "a torn slot is not a violation: {report}");
    assert!(
        report.notes.iter().any(|n| n.contains("not valid")),
        "{report}"
    );

    // The next commit overwrites the damaged slot, never the one in use.
    let s = Store::open(&dir).expect("open");
    s.space(k)
        .expect("space")
        .commit_root(b"third")
        .expect("commit");
    drop(s);
    let s = Store::open(&dir).expect("open");
    assert_eq!(s.info().generation, 4);
    assert_eq!(s.space(k).expect("space").root(), b"third");
}

#[test]
fn another_format_version_bad_magic_or_a_damaged_header_are_refused_clearly() {
    let (_t, dir) = tempdir();
    drop(create(&dir, 2));
    let path = dir.join(META_FILE);
    let good = std::fs::read(&path).expect("read");

    assert_eq!(le_u32(&good, 16), 5, "new stores are format version 5");
    // 7 (tee members) is this binary's newest; 8 is newer.
    for (version, _) in [(8u32, "newer"), (0u32, "older")] {
        let mut m = good.clone();
        m[16..20].copy_from_slice(&version.to_le_bytes());
        std::fs::write(&path, &m).expect("write");
        let e = Store::open(&dir).expect_err("other version");
        assert!(
            matches!(e, StoreError::Version { found, supported: 7 } if found == version),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(&format!("format version {version} is not supported")),
            "{e}"
        );
        let report = check(&dir).expect("check");
        assert!(!report.is_ok());
        assert!(report.violations[0].contains("format version"), "{report}");
    }

    let mut m = good.clone();
    m[0] = b'X';
    std::fs::write(&path, &m).expect("write");
    let e = Store::open(&dir).expect_err("bad magic");
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");
    assert!(e.to_string().contains("not a Dovetail store"), "{e}");

    let mut m = good.clone();
    m[40] ^= 1; // extent size, under the header checksum
    std::fs::write(&path, &m).expect("write");
    let e = Store::open(&dir).expect_err("bad checksum");
    assert!(
        matches!(e, StoreError::Corrupt(ref s) if s.contains("header checksum")),
        "{e}"
    );

    std::fs::write(&path, b"hello").expect("write");
    assert!(matches!(
        Store::open(&dir),
        Err(StoreError::NotAStore { .. })
    ));

    std::fs::write(&path, &good).expect("restore");
    Store::open(&dir).expect("restored header opens");
}

#[test]
fn check_finds_a_grant_to_an_unknown_key_and_open_refuses_it() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 8);
    let k = s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    s.space(k).expect("space").grant_extent().expect("grant");
    drop(s);
    assert!(check(&dir).expect("check").is_ok());

    // Extent 5's owner lives at payload byte 24 + 8 * 5 (docs/format.md).
    edit_payload(&dir, |p| {
        p[24 + 40..24 + 48].copy_from_slice(&77u64.to_le_bytes());
    });
    let report = check(&dir).expect("check");
    assert!(!report.is_ok());
    let all = report.violations.join("\n");
    assert!(
        all.contains("extent 5 is granted to key 77, which is not a version"),
        "{all}"
    );
    assert!(all.contains("free-space accounting"), "{all}");
    assert!(report.to_string().contains("VIOLATION"), "{report}");
    let e = Store::open(&dir).expect_err("inconsistent catalog");
    assert!(
        matches!(e, StoreError::Corrupt(ref s) if s.contains("store check")),
        "{e}"
    );
}

#[test]
fn check_finds_a_version_of_a_deleted_disk() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 4);
    s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    drop(s);
    // The payload ends with the disk record: name_len u8, name, size, trusted, candidate, tee
    // flag, attachment flag. Dropping it and fixing the disk count leaves version 1 pointing
    // at a missing disk.
    edit_payload(&dir, |p| {
        let rec = 1 + 1 + 8 + 8 + 8 + 1 + 1;
        p.truncate(p.len() - rec);
        p[20..24].copy_from_slice(&0u32.to_le_bytes());
    });
    let report = check(&dir).expect("check");
    let all = report.violations.join("\n");
    assert!(
        all.contains("not in the catalog (a deleted disk's version)"),
        "{all}"
    );
}

#[test]
fn versions_write_their_own_extents_from_many_threads() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 8);
    let mut handles = Vec::new();
    for t in 0..4u8 {
        let k = s
            .create_disk(&format!("d{t}"), 1 << 20, "parallax-v1")
            .expect("disk");
        let sp = s.space(k).expect("space");
        handles.push(std::thread::spawn(move || {
            let e = sp.grant_extent().expect("grant");
            for i in 0..(EXT / 4096) {
                sp.write(e, i * 4096, &[t; 4096]).expect("write");
            }
            sp.sync().expect("sync");
            (sp, e)
        }));
    }
    for (t, h) in handles.into_iter().enumerate() {
        let (sp, e) = h.join().expect("thread");
        assert_eq!(
            read_all(&*sp, e, 0, EXT as usize),
            vec![t as u8; EXT as usize]
        );
    }
}

fn tee(policy: &str) -> TeeRec {
    TeeRec {
        policy: policy.into(),
        faults: vec!["delay:5ms".into()],
        state: TeeState::Active,
        reason: String::new(),
        changed: 1_700_000_000,
    }
}

#[test]
fn tee_records_are_set_quarantined_and_kept_across_reopen() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 4);
    s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    assert_eq!(s.tee("d").expect("tee"), None);
    assert!(matches!(s.tee("nope"), Err(StoreError::NoSuchDisk(_))));
    assert!(matches!(
        s.set_tee("nope", tee("p")),
        Err(StoreError::NoSuchDisk(_))
    ));
    let e = s.set_tee("d", tee("p")).expect_err("no candidate");
    assert!(
        matches!(e, StoreError::NoCandidate(ref d) if d == "d"),
        "{e}"
    );
    assert!(matches!(
        s.quarantine("d", "x"),
        Err(StoreError::NoCandidate(_))
    ));
    assert!(matches!(
        s.quarantine("nope", "x"),
        Err(StoreError::NoSuchDisk(_))
    ));
    let cand = s.add_version("d", "parallax-v2").expect("candidate");
    let e = s.quarantine("d", "x").expect_err("no tee");
    assert!(matches!(e, StoreError::NoTee(ref d) if d == "d"), "{e}");
    assert_eq!(e.to_string(), "disk \"d\" has no tee record");

    // Records that break the format's rules are refused, and nothing is committed.
    let generation = s.info().generation;
    let bad = [
        TeeRec {
            policy: "p".repeat(256),
            ..tee("p")
        },
        TeeRec {
            faults: vec!["f".into(); 17],
            ..tee("p")
        },
        TeeRec {
            faults: vec!["f".repeat(256)],
            ..tee("p")
        },
        TeeRec {
            reason: "why".into(),
            ..tee("p")
        },
    ];
    for t in bad {
        let e = s.set_tee("d", t).expect_err("invalid");
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    }
    assert_eq!(s.info().generation, generation);
    // The limits themselves are fine.
    s.set_tee(
        "d",
        TeeRec {
            policy: "p".repeat(255),
            faults: vec!["f".repeat(255); 16],
            ..tee("p")
        },
    )
    .expect("at the limits");

    s.set_tee("d", tee("compare")).expect("set");
    assert_eq!(s.tee("d").expect("tee"), Some(tee("compare")));
    assert_eq!(s.disk("d").expect("disk").tee, Some(tee("compare")));
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    s.quarantine("d", "read of block 3 differed\nsecond line")
        .expect("quarantine");
    let q = s.tee("d").expect("tee").expect("record");
    assert_eq!(q.state, TeeState::Quarantined);
    assert_eq!(q.reason, "read of block 3 differed second line");
    assert!(
        q.changed >= before && q.changed <= before + 60,
        "{}",
        q.changed
    );
    assert_eq!((q.policy.as_str(), q.faults.len()), ("compare", 1));
    // Already quarantined: nothing changes, nothing is committed.
    let generation = s.info().generation;
    s.quarantine("d", "another reason").expect("no-op");
    assert_eq!(s.info().generation, generation);
    assert_eq!(s.tee("d").expect("tee").expect("record").reason, q.reason);
    drop(s);

    let s = Store::open(&dir).expect("reopen");
    assert_eq!(s.tee("d").expect("tee"), Some(q.clone()));
    drop(s);
    let report = check(&dir).expect("check");
    assert!(report.is_ok(), "{report}");
    assert!(report.to_string().contains("quarantined at"), "{report}");

    // A long or blank reason is made to fit; a quarantined record may be set whole.
    let s = Store::open(&dir).expect("reopen");
    s.set_tee(
        "d",
        TeeRec {
            state: TeeState::Quarantined,
            reason: "x".repeat(5000),
            ..tee("p")
        },
    )
    .expect("set quarantined");
    assert_eq!(s.tee("d").expect("tee").expect("record").reason.len(), 4096);
    s.set_tee("d", tee("p")).expect("active again");
    s.quarantine("d", "  \n ").expect("quarantine");
    assert_eq!(
        s.tee("d").expect("tee").expect("record").reason,
        "no reason given"
    );

    // Dropping the candidate drops the tee; so does promoting one.
    assert_eq!(s.drop_candidate("d").expect("drop"), cand);
    assert_eq!(s.tee("d").expect("tee"), None);
    s.add_version("d", "parallax-v2").expect("candidate");
    s.set_tee("d", tee("p")).expect("set");
    s.promote("d").expect("promote");
    assert_eq!(s.disk("d").expect("disk").tee, None);
    assert!(matches!(
        s.set_tee("d", tee("p")),
        Err(StoreError::NoCandidate(_))
    ));
    drop(s);
    assert!(check(&dir).expect("check").is_ok());
}

#[test]
fn a_read_only_store_refuses_tee_changes() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 2);
    s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    s.add_version("d", "parallax-v2").expect("candidate");
    s.set_tee("d", tee("p")).expect("set");
    drop(s);
    let r = Store::open_read_only(&dir).expect("reader");
    assert_eq!(r.tee("d").expect("tee"), Some(tee("p")));
    assert!(matches!(
        r.set_tee("d", tee("q")),
        Err(StoreError::ReadOnly)
    ));
    assert!(matches!(r.quarantine("d", "x"), Err(StoreError::ReadOnly)));
}

#[test]
fn presence_map_files_live_in_maps_and_go_with_their_versions() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 8);
    let maps = dir.join(MAPS_DIR);
    assert!(maps.is_dir(), "create makes maps/");
    let t1 = s.create_disk("a", 1 << 20, "parallax-v1").expect("disk");
    let c1 = s.add_version("a", "parallax-v2").expect("candidate");
    assert_eq!(s.map_path(c1), maps.join(format!("{}.map", c1.0)));
    assert_eq!(s.map_path(VersionKey(42)), dir.join("maps/42.map"));
    let touch = |k: VersionKey| std::fs::write(s.map_path(k), b"map").expect("write map");

    // drop_candidate removes the candidate's map.
    touch(c1);
    s.drop_candidate("a").expect("drop");
    assert!(!s.map_path(c1).exists());
    // promote removes the retired version's map (the promoted one's is left to its owner).
    let c2 = s.add_version("a", "parallax-v2").expect("candidate");
    touch(t1);
    touch(c2);
    assert_eq!(s.promote("a").expect("promote"), t1);
    assert!(!s.map_path(t1).exists());
    assert!(s.map_path(c2).exists());
    // delete_disk removes both versions' maps; a missing one is no error.
    let c3 = s.add_version("a", "parallax-v1").expect("candidate");
    touch(c3);
    std::fs::remove_file(s.map_path(c2)).expect("rm");
    s.delete_disk("a").expect("delete");
    assert!(!s.map_path(c3).exists());
    assert_eq!(std::fs::read_dir(&maps).expect("maps").count(), 0);

    // A map that cannot be removed does not fail the catalog change; check notes it.
    s.create_disk("b", 1 << 20, "parallax-v1").expect("disk");
    let c4 = s.add_version("b", "parallax-v2").expect("candidate");
    std::fs::create_dir_all(s.map_path(c4).join("in-the-way")).expect("mkdir");
    s.drop_candidate("b").expect("drop succeeds anyway");
    assert_eq!(s.disk("b").expect("disk").candidate, None);
    std::fs::write(maps.join("junk.txt"), b"x").expect("write");
    drop(s);
    let report = check(&dir).expect("check");
    assert!(report.is_ok(), "{report}");
    let notes = report.notes.join("\n");
    assert!(
        notes.contains(&format!(
            "maps/{}.map is the presence map of version {}, which is not in the catalog",
            c4.0, c4.0
        )),
        "{notes}"
    );
    assert!(
        notes.contains("maps/junk.txt is neither a presence map nor a migration record"),
        "{notes}"
    );
}

#[test]
fn a_read_write_open_creates_a_missing_maps_directory_and_a_read_only_one_does_not() {
    let (_t, dir) = tempdir();
    drop(create(&dir, 2));
    std::fs::remove_dir(dir.join(MAPS_DIR)).expect("rmdir");
    drop(Store::open_read_only(&dir).expect("reader"));
    assert!(!dir.join(MAPS_DIR).exists());
    assert!(check(&dir).expect("check").is_ok());
    drop(Store::open(&dir).expect("writer"));
    assert!(dir.join(MAPS_DIR).is_dir());
}

#[test]
fn a_store_over_given_files_has_map_paths_that_name_nothing() {
    let power = dovetail_store::sim::Power::new();
    let s = Store::create_on(
        Box::new(dovetail_store::sim::SimFile::new(power.clone())),
        Box::new(dovetail_store::sim::SimFile::new(power)),
        2 * EXT,
        EXT,
    )
    .expect("create");
    assert_eq!(s.map_path(VersionKey(3)), Path::new("(store)/maps/3.map"));
    s.create_disk("d", 1 << 20, "parallax-v1").expect("disk");
    s.add_version("d", "parallax-v2").expect("candidate");
    s.drop_candidate("d").expect("drop touches no file");
}

/// An extent given back (`VersionSpace::release_extent`, `Store::ungrant`) is free in the
/// catalog, durably; the version's writes there are refused from then on, its bytes read as
/// zeros; an extent not granted to the version is refused; another version may be granted it.
#[test]
fn an_extent_given_back_is_free_and_no_longer_writable() {
    let (_t, dir) = tempdir();
    let store = create(&dir, 4);
    let a = store.create_disk("a", EXT, "parallax-v1").expect("disk a");
    let b = store.create_disk("b", EXT, "parallax-v1").expect("disk b");
    let sa = store.space(a).expect("space a");
    let e0 = sa.grant_extent().expect("grant");
    let e1 = sa.grant_extent().expect("grant");
    sa.write(e0, 0, &[7u8; 4096]).expect("write");
    sa.sync().expect("sync");
    let free = store.info().free_extents;
    sa.release_extent(e0).expect("give back");
    assert_eq!(store.info().free_extents, free + 1);
    assert_eq!(sa.extents(), vec![e1]);
    assert!(matches!(
        sa.write(e0, 0, &[1u8; 4096]),
        Err(StoreError::GrantViolation { .. })
    ));
    assert_eq!(
        read_all(&*sa, e0, 0, 4096),
        vec![0u8; 4096],
        "its space is released"
    );
    let sb = store.space(b).expect("space b");
    let e = sb.release_extent(e1).expect_err("another version's extent");
    assert!(e.to_string().contains("not granted"), "{e}");
    let e = sa.release_extent(e0).expect_err("given back already");
    assert!(e.to_string().contains("not granted"), "{e}");
    assert_eq!(
        sb.grant_extent().expect("grant"),
        e0,
        "the lowest free extent again"
    );
    drop((sa, sb, store));
    let store = Store::open(&dir).expect("reopen");
    assert_eq!(store.version(a).expect("a").extents, vec![e1]);
    assert_eq!(store.version(b).expect("b").extents, vec![e0]);
    drop(store);
    assert!(check(&dir).expect("check").is_ok());
}

/// Grants zero their extent outside the catalog's lock: grants running at once, from several
/// versions, still hand every extent out exactly once, each reading as zeros, until the store
/// is full; the catalog survives a reopen.
#[test]
fn concurrent_grants_hand_out_each_extent_once() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 24);
    let a = s.create_disk("a", 1 << 20, "parallax-v1").expect("disk a");
    let b = s.create_disk("b", 1 << 20, "parallax-v1").expect("disk b");
    let spaces = [s.space(a).expect("space a"), s.space(b).expect("space b")];
    let got: Vec<(u64, ExtentId)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let space = spaces[i % 2].clone();
                sc.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        match space.grant_extent() {
                            Ok(e) => {
                                assert_eq!(read_all(&*space, e, 0, 4096), vec![0; 4096]);
                                space.write(e, 0, &[i as u8 + 1; 4096]).expect("own");
                                mine.push((space.key().0, e));
                            }
                            Err(StoreError::Full) => return mine,
                            Err(e) => panic!("grant: {e}"),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("grant thread"))
            .collect()
    });
    assert_eq!(got.len(), 24, "every extent granted");
    let mut ids: Vec<u32> = got.iter().map(|&(_, e)| e.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 24, "no extent granted twice: {got:?}");
    for space in &spaces {
        let mine: Vec<ExtentId> = got
            .iter()
            .filter(|&&(k, _)| k == space.key().0)
            .map(|&(_, e)| e)
            .collect();
        let mut listed = space.extents();
        listed.sort_unstable();
        let mut expected = mine.clone();
        expected.sort_unstable();
        assert_eq!(listed, expected, "{}", space.key());
    }
    drop(spaces);
    drop(s);
    let s = Store::open(&dir).expect("reopen");
    assert_eq!(
        s.version(a).expect("a").extents.len() + s.version(b).expect("b").extents.len(),
        24
    );
}

#[test]
fn resize_disk_grows_the_catalog_size_and_refuses_what_it_must() {
    let (_t, dir) = tempdir();
    let s = create(&dir, 16);
    s.create_disk("vm", 8 * EXT, "parallax-v1")
        .expect("create disk");
    let gen = s.info().generation;
    for (name, size, want) in [
        ("vm", 4 * EXT, "shrinking"),
        ("vm", 8 * EXT + 512, "multiple of 4096"),
        ("vm", 0, "multiple of 4096"),
        ("vm", 17 * EXT, "the store holds"),
    ] {
        let e = s.resize_disk(name, size).expect_err("refused");
        assert!(e.to_string().contains(want), "{size}: {e}");
    }
    assert!(matches!(
        s.resize_disk("nope", 16 * EXT),
        Err(StoreError::NoSuchDisk(_))
    ));
    assert_eq!(s.info().generation, gen, "nothing committed");
    assert_eq!(s.resize_disk("vm", 8 * EXT).expect("same size"), 8 * EXT);
    assert_eq!(s.info().generation, gen, "the same size commits nothing");
    assert_eq!(s.resize_disk("vm", 16 * EXT).expect("grow"), 8 * EXT);
    drop(s);
    let s = Store::open(&dir).expect("reopen");
    assert_eq!(s.disk("vm").expect("disk").size, 16 * EXT, "durable");
}
