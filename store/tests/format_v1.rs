//! Format version 1, as docs/format.md states it: a metadata file assembled here byte by byte
//! from the document (not with the store's encoder) must still open with the catalog it
//! describes in this binary, which upgrades it to format version 2 (stores it creates are
//! format version 3, which only adds the header's tier table): read-only without a single write,
//! and read-write through the in-place upgrade (docs/format.md, "Upgrade from format version
//! 1"), after which the catalog is the same, no disk has a tee record, the bytes are what the
//! document says and the store checks clean. Power cuts during the upgrade are in crash.rs.
//!
//! Also: the layout-check hook of `check`.

use std::sync::Arc;

use dovetail_store::sim::{Power, SimFile};
use dovetail_store::{
    check_on, DiskInfo, ExtentId, LayoutCheck, Store, StoreError, VersionInfo, VersionKey,
    VersionSpace,
};
const EXTENT_SIZE: u64 = 8192;
const EXTENTS: u32 = 4;
const SLOT_SIZE: u64 = 8192;

fn u32le(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

fn u64le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn name(b: &mut Vec<u8>, s: &str) {
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

/// A store of 4 extents of 8 KiB holding disk "vm1" (trusted version 1, parallax-v1, extents 2
/// then 0, root "R1") with candidate version 3 (parallax-v2, extent 1, empty root); next key 4.
fn golden_v1() -> (Vec<u8>, Vec<u8>) {
    let mut h = vec![0u8; 4096];
    h[0..8].copy_from_slice(b"DOVETAIL");
    h[8..16].copy_from_slice(b"STORE\0\0\0");
    h[16..20].copy_from_slice(&u32le(1));
    h[24..40].copy_from_slice(&[0xab; 16]);
    h[40..48].copy_from_slice(&u64le(EXTENT_SIZE));
    h[48..52].copy_from_slice(&u32le(EXTENTS));
    h[56..64].copy_from_slice(&u64le(SLOT_SIZE));
    let crc = crc32c::crc32c(&h[0..64]);
    h[64..68].copy_from_slice(&u32le(crc));

    let mut p = Vec::new();
    p.extend_from_slice(&u64le(4)); // next_key
    p.extend_from_slice(&u32le(EXTENTS));
    p.extend_from_slice(&u32le(1)); // free extents
    p.extend_from_slice(&u32le(2)); // versions
    p.extend_from_slice(&u32le(1)); // disks
    for owner in [1u64, 3, 1, 0] {
        p.extend_from_slice(&u64le(owner));
    }
    // Version 1.
    p.extend_from_slice(&u64le(1));
    name(&mut p, "vm1");
    name(&mut p, "parallax-v1");
    p.extend_from_slice(&u32le(2));
    p.extend_from_slice(&u32le(2));
    p.extend_from_slice(&u32le(0));
    p.extend_from_slice(&u32le(2));
    p.extend_from_slice(b"R1");
    // Version 3.
    p.extend_from_slice(&u64le(3));
    name(&mut p, "vm1");
    name(&mut p, "parallax-v2");
    p.extend_from_slice(&u32le(1));
    p.extend_from_slice(&u32le(1));
    p.extend_from_slice(&u32le(0));
    // Disk vm1.
    name(&mut p, "vm1");
    p.extend_from_slice(&u64le(1 << 30));
    p.extend_from_slice(&u64le(1));
    p.extend_from_slice(&u64le(3));

    let mut meta = vec![0u8; (4096 + 2 * SLOT_SIZE) as usize];
    meta[..4096].copy_from_slice(&h);
    // The catalog is generation 7 in slot B; slot A holds an older generation (6) with an
    // empty catalog, as after a series of commits.
    let mut slot = |at: usize, generation: u64, payload: &[u8]| {
        meta[at..at + 8].copy_from_slice(&u64le(generation));
        meta[at + 8..at + 12].copy_from_slice(&u32le(payload.len() as u32));
        let crc = crc32c::crc32c_append(crc32c::crc32c(&meta[at..at + 12]), payload);
        meta[at + 12..at + 16].copy_from_slice(&u32le(crc));
        meta[at + 16..at + 16 + payload.len()].copy_from_slice(payload);
    };
    let mut empty = Vec::new();
    empty.extend_from_slice(&u64le(1));
    empty.extend_from_slice(&u32le(EXTENTS));
    empty.extend_from_slice(&u32le(EXTENTS));
    empty.extend_from_slice(&u32le(0));
    empty.extend_from_slice(&u32le(0));
    empty.extend_from_slice(&[0u8; 8 * EXTENTS as usize]);
    slot(4096, 6, &empty);
    slot((4096 + SLOT_SIZE) as usize, 7, &p);

    let mut data = vec![0u8; (EXTENT_SIZE * u64::from(EXTENTS)) as usize];
    data[(2 * EXTENT_SIZE) as usize..][..5].copy_from_slice(b"hello");
    (meta, data)
}

fn open(meta: &[u8], data: &[u8]) -> dovetail_store::Result<Arc<Store>> {
    let power = Power::new();
    Store::open_on(
        Box::new(SimFile::with_bytes(power.clone(), meta)),
        Box::new(SimFile::with_bytes(power, data)),
    )
}

/// A slot's checksum in format version 2: crc32c over the format version (u32), the slot's
/// first 12 bytes, then the payload.
fn crc_v2(head: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&u32le(2)), head);
    crc32c::crc32c_append(crc, payload)
}

/// Everything a catalog holds, apart from the generation and the format version.
#[derive(Debug, PartialEq, Eq)]
struct Catalog {
    uuid: [u8; 16],
    geometry: (u64, u32, u32),
    disks: Vec<DiskInfo>,
    versions: Vec<VersionInfo>,
    roots: Vec<Vec<u8>>,
}

fn catalog(s: &Arc<Store>) -> Catalog {
    let i = s.info();
    let versions = s.versions();
    Catalog {
        uuid: i.uuid,
        geometry: (i.extent_size, i.extent_count, i.free_extents),
        disks: s.disks(),
        roots: versions
            .iter()
            .map(|v| s.space(v.key).expect("space").root())
            .collect(),
        versions,
    }
}

/// The golden store's catalog, checked field by field.
fn assert_golden_catalog(s: &Arc<Store>) {
    let info = s.info();
    assert_eq!(info.uuid, [0xab; 16]);
    assert_eq!(
        (info.extent_size, info.extent_count, info.free_extents),
        (EXTENT_SIZE, EXTENTS, 1)
    );
    let d = s.disk("vm1").expect("disk");
    assert_eq!(d.size, 1 << 30);
    assert_eq!(d.layout, "parallax-v1");
    assert_eq!(
        (d.trusted, d.candidate),
        (VersionKey(1), Some(VersionKey(3)))
    );
    assert_eq!(d.tee, None, "format version 1 has no tee records");
    assert_eq!(s.tee("vm1").expect("tee"), None);
    let v1 = s.space(VersionKey(1)).expect("space");
    assert_eq!(v1.extents(), vec![ExtentId(2), ExtentId(0)]);
    assert_eq!(v1.root(), b"R1");
    let mut b = [0u8; 5];
    v1.read(ExtentId(2), 0, &mut b).expect("read");
    assert_eq!(&b, b"hello");
    let v3 = s.space(VersionKey(3)).expect("space");
    assert_eq!(v3.extents(), vec![ExtentId(1)]);
    assert!(v3.root().is_empty());
    assert_eq!(
        s.version(VersionKey(3)).expect("version").layout,
        "parallax-v2"
    );
}

#[test]
fn a_version_1_store_opens_read_only_as_it_is_without_a_single_write() {
    let (meta, data) = golden_v1();
    let power = Power::new();
    let m = SimFile::with_bytes(power.clone(), &meta);
    let d = SimFile::with_bytes(power.clone(), &data);
    let s = Store::open_on_read_only(Box::new(m.clone()), Box::new(d.clone())).expect("opens");
    assert_golden_catalog(&s);
    let info = s.info();
    assert_eq!((info.format_version, info.generation), (1, 7));
    assert!(matches!(
        s.create_disk("vm2", 4096, "parallax-v1"),
        Err(StoreError::ReadOnly)
    ));
    assert!(matches!(
        s.quarantine("vm1", "no"),
        Err(StoreError::ReadOnly)
    ));
    drop(s);
    assert_eq!(power.syncs(), 0);
    assert!(m.live_bytes() == meta, "the metadata file is unchanged");
    assert!(d.live_bytes() == data, "the data file is unchanged");

    // `check` reads it as it is too, finds it consistent and says it is version 1.
    let report = check_on(Box::new(m.clone()), Box::new(d), &[]).expect("check");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.info.as_ref().expect("info").format_version, 1);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("format version 1: read as it is")),
        "{report}"
    );
    assert!(m.live_bytes() == meta, "check wrote nothing");
}

#[test]
fn a_read_write_open_upgrades_a_version_1_store_in_place_as_the_document_says() {
    let (meta, data) = golden_v1();
    let before = {
        let power = Power::new();
        let s = Store::open_on_read_only(
            Box::new(SimFile::with_bytes(power.clone(), &meta)),
            Box::new(SimFile::with_bytes(power, &data)),
        )
        .expect("read-only");
        catalog(&s)
    };

    let power = Power::new();
    let m = SimFile::with_bytes(power.clone(), &meta);
    let d = SimFile::with_bytes(power.clone(), &data);
    let s = Store::open_on(Box::new(m.clone()), Box::new(d.clone())).expect("upgrades");
    assert_eq!(power.syncs(), 2, "the upgrade is two synced writes");
    let info = s.info();
    assert_eq!((info.format_version, info.generation), (2, 8));
    assert_golden_catalog(&s);
    assert_eq!(catalog(&s), before, "the same catalog");
    drop(s);

    // The bytes, by the document: the header's first sector now says version 2 with its new
    // checksum, the rest of it is as before.
    let bytes = m.durable_bytes();
    assert_eq!(bytes.len(), meta.len());
    let mut h = meta[..4096].to_vec();
    h[16..20].copy_from_slice(&u32le(2));
    let crc = crc32c::crc32c(&h[0..64]);
    h[64..68].copy_from_slice(&u32le(crc));
    assert_eq!(&bytes[..4096], &h[..]);
    // Slot A (which held the older generation 6) holds generation 8: slot B's payload with a
    // tee flag of 0 after the (only) disk record, under a version-2 checksum.
    let (a, b) = (4096usize, (4096 + SLOT_SIZE) as usize);
    let len_b = u32::from_le_bytes(meta[b + 8..b + 12].try_into().expect("4")) as usize;
    let mut payload = meta[b + 16..b + 16 + len_b].to_vec();
    payload.push(0);
    assert_eq!(&bytes[a..a + 8], &u64le(8));
    assert_eq!(&bytes[a + 8..a + 12], &u32le(payload.len() as u32));
    assert_eq!(
        &bytes[a + 12..a + 16],
        &u32le(crc_v2(&bytes[a..a + 12], &payload))
    );
    assert_eq!(&bytes[a + 16..a + 16 + payload.len()], &payload[..]);
    // Slot B, the version-1 generation 7, is untouched; so is the data file.
    assert_eq!(&bytes[b..], &meta[b..]);
    assert!(d.durable_bytes() == data);

    // The upgraded store checks clean; slot B is reported as written before the upgrade.
    let report = check_on(Box::new(m.clone()), Box::new(d.clone()), &[]).expect("check");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.info.as_ref().expect("info").format_version, 2);
    assert!(
        !report
            .notes
            .iter()
            .any(|n| n.contains("not valid") || n.contains("format version")),
        "{report}"
    );
    assert!(
        report.slots[1].contains("format version 1"),
        "{:?}",
        report.slots
    );

    // It reopens as version 2, and its next commit goes to slot B as a version-2 slot.
    let power = Power::new();
    let m2 = SimFile::with_bytes(power.clone(), &m.durable_bytes());
    let s = Store::open_on(
        Box::new(m2.clone()),
        Box::new(SimFile::with_bytes(power.clone(), &data)),
    )
    .expect("reopen");
    assert_eq!(power.syncs(), 0, "nothing left to upgrade");
    assert_eq!(catalog(&s), before);
    assert_eq!(
        s.create_disk("vm2", 4096, "parallax-v1").expect("disk"),
        VersionKey(4)
    );
    assert_eq!(s.info().generation, 9);
    let bytes = m2.durable_bytes();
    assert_eq!(&bytes[b..b + 8], &u64le(9));
    let len = u32::from_le_bytes(bytes[b + 8..b + 12].try_into().expect("4")) as usize;
    assert_eq!(
        &bytes[b + 12..b + 16],
        &u32le(crc_v2(&bytes[b..b + 12], &bytes[b + 16..b + 16 + len]))
    );
}

#[test]
fn a_version_1_store_written_from_the_document_serves_its_catalog_after_the_upgrade() {
    let (meta, data) = golden_v1();
    let s = open(&meta, &data).expect("opens");
    assert_golden_catalog(&s);
    assert_eq!(s.info().generation, 8);
    let v3 = s.space(VersionKey(3)).expect("space");
    assert!(matches!(
        v3.write(ExtentId(2), 0, b"x"),
        Err(StoreError::GrantViolation { .. })
    ));
    // The next version gets key 4; tee records can be added now.
    assert_eq!(
        s.add_version("vm1", "parallax-v1")
            .expect_err("vm1 has a candidate")
            .to_string(),
        "disk \"vm1\" already has a candidate (version 3)"
    );
    assert_eq!(
        s.create_disk("vm2", 4096, "parallax-v1").expect("disk"),
        VersionKey(4)
    );
    s.set_tee(
        "vm1",
        dovetail_store::TeeRec {
            policy: "p".into(),
            faults: Vec::new(),
            state: dovetail_store::TeeState::Active,
            reason: String::new(),
            changed: 1,
        },
    )
    .expect("tee");
    assert_eq!(s.info().generation, 10);
}

#[test]
fn a_store_of_another_format_version_is_refused_by_name() {
    let (mut meta, data) = golden_v1();
    meta[16..20].copy_from_slice(&u32le(8));
    let e = open(&meta, &data).expect_err("version 8");
    assert_eq!(
        e.to_string(),
        "store format version 8 is not supported by this binary (it reads version 7)"
    );
    meta[16..20].copy_from_slice(&u32le(0));
    let e = open(&meta, &data).expect_err("version 0");
    assert!(
        matches!(
            e,
            StoreError::Version {
                found: 0,
                supported: 7
            }
        ),
        "{e}"
    );
}

/// A checker that finds fault with every version whose root is not "R1", and tries to write.
struct PickyCheck;

impl LayoutCheck for PickyCheck {
    fn layout(&self) -> &str {
        "parallax-v1"
    }

    fn check(&self, version: &VersionInfo, space: std::sync::Arc<dyn VersionSpace>) -> Vec<String> {
        let mut v = Vec::new();
        if space.root() != b"R1" {
            v.push(format!("root of {} is not R1", version.key));
        }
        if space.write(version.extents[0], 0, b"x").is_ok() {
            v.push("a check could write".into());
        }
        v
    }
}

#[test]
fn check_runs_the_layout_hook_on_a_read_only_store() {
    let (mut meta, data) = golden_v1();
    let power = Power::new();
    let files = |meta: &[u8]| {
        (
            Box::new(SimFile::with_bytes(power.clone(), meta)),
            Box::new(SimFile::with_bytes(power.clone(), &data)),
        )
    };
    let (m, d) = files(&meta);
    let report = check_on(m, d, &[&PickyCheck]).expect("check");
    assert!(report.is_ok(), "{report}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("no layout-level check for parallax-v2")),
        "{report}"
    );

    // Change version 1's root to "R2" (still a valid slot): the hook reports it.
    let at = (4096 + SLOT_SIZE) as usize;
    let len = u32::from_le_bytes(meta[at + 8..at + 12].try_into().expect("4")) as usize;
    let payload = &mut meta[at + 16..at + 16 + len];
    let pos = payload
        .windows(2)
        .position(|w| w == b"R1")
        .expect("root bytes");
    payload[pos + 1] = b'2';
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&meta[at..at + 12]),
        &meta[at + 16..at + 16 + len],
    );
    meta[at + 12..at + 16].copy_from_slice(&u32le(crc));
    let (m, d) = files(&meta);
    let report = check_on(m, d, &[&PickyCheck]).expect("check");
    assert_eq!(
        report.violations,
        vec!["version 1 (disk \"vm1\", parallax-v1): root of version 1 is not R1".to_string()],
        "{report}"
    );
}

#[test]
fn a_catalog_that_outgrows_its_slot_is_refused_and_nothing_changes() {
    // The golden store's slots are 8 KiB: a 16 KiB root record cannot fit.
    let (meta, data) = golden_v1();
    let s = open(&meta, &data).expect("open");
    let v1 = s.space(VersionKey(1)).expect("space");
    let e = v1.commit_root(&[7; 16 << 10]).expect_err("too big");
    assert!(
        matches!(e, StoreError::MetadataFull { max: 8176, .. }),
        "{e}"
    );
    assert_eq!(v1.root(), b"R1");
    assert_eq!(s.info().generation, 8, "generation 8 is the upgrade's");
    v1.commit_root(&[7; 4 << 10]).expect("4 KiB fits");
}

#[test]
fn a_version_1_store_directory_is_upgraded_by_open_and_gets_its_maps_directory() {
    let (meta, data) = golden_v1();
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    std::fs::write(dir.join(dovetail_store::META_FILE), &meta).expect("write");
    std::fs::write(dir.join(dovetail_store::DATA_FILE), &data).expect("write");

    // Read-only: as it is, nothing written, no maps/.
    let s = Store::open_read_only(dir).expect("read-only");
    assert_eq!(s.info().format_version, 1);
    let before = catalog(&s);
    drop(s);
    let report = dovetail_store::check(dir).expect("check");
    assert!(report.is_ok(), "{report}");
    assert!(report.to_string().contains("format version 1"), "{report}");
    assert!(std::fs::read(dir.join(dovetail_store::META_FILE)).expect("read") == meta);
    assert!(!dir.join(dovetail_store::MAPS_DIR).exists());

    // Read-write: upgraded, same catalog, maps/ made.
    let s = Store::open(dir).expect("upgrades");
    assert_eq!(s.info().format_version, 2);
    assert_eq!(catalog(&s), before);
    assert!(dir.join(dovetail_store::MAPS_DIR).is_dir());
    assert_eq!(
        s.map_path(VersionKey(3)),
        dir.join(dovetail_store::MAPS_DIR).join("3.map")
    );
    drop(s);
    let report = dovetail_store::check(dir).expect("check");
    assert!(report.is_ok(), "{report}");
    assert!(
        report.to_string().contains("format version 2, uuid"),
        "{report}"
    );
    let s = Store::open(dir).expect("reopen");
    assert_eq!(s.info().generation, 8);
    assert_eq!(catalog(&s), before);
}
