//! Format version 2, as docs/format.md states it: a metadata file assembled here byte by byte
//! from the document (not with the store's encoder) must open with the catalog it describes,
//! tee records included; the store's own commits must produce the document's bytes; and the
//! tee rules (state byte, tee flag, a tee only beside a candidate) are enforced on open and
//! reported by `check`.

use std::sync::Arc;

use dovetail_store::sim::{Power, SimFile};
use dovetail_store::{check_on, ExtentId, Store, StoreError, TeeRec, TeeState, VersionKey};

const EXTENT_SIZE: u64 = 8192;
const EXTENTS: u32 = 4;
const SLOT_SIZE: u64 = 8192;
const SLOT_A: usize = 4096;
const SLOT_B: usize = 4096 + SLOT_SIZE as usize;

fn u16le(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}

fn u32le(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

fn u64le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// A name, policy or fault rule: u8 length, then the bytes.
fn name(b: &mut Vec<u8>, s: &str) {
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

/// A disk record's tee part: flag 1, state, changed, policy, fault count, faults, reason
/// (u16 length, bytes).
fn tee_bytes(
    b: &mut Vec<u8>,
    state: u8,
    changed: u64,
    policy: &str,
    faults: &[&str],
    reason: &str,
) {
    b.push(1);
    b.push(state);
    b.extend_from_slice(&u64le(changed));
    name(b, policy);
    b.push(faults.len() as u8);
    for f in faults {
        name(b, f);
    }
    b.extend_from_slice(&u16le(reason.len() as u16));
    b.extend_from_slice(reason.as_bytes());
}

const VM1_POLICY: &str = "compare:all";
const VM1_FAULTS: [&str; 2] = ["delay:10ms", "flip:every=1000"];
const VM2_POLICY: &str = "compare:reads";
const VM2_REASON: &str = "read of disk block 7 differed (trusted crc 0x1234, candidate crc 0x5678)";

fn vm1_tee() -> TeeRec {
    TeeRec {
        policy: VM1_POLICY.into(),
        faults: VM1_FAULTS.iter().map(|f| f.to_string()).collect(),
        state: TeeState::Active,
        reason: String::new(),
        changed: 1_700_000_000,
    }
}

fn vm2_tee() -> TeeRec {
    TeeRec {
        policy: VM2_POLICY.into(),
        faults: Vec::new(),
        state: TeeState::Quarantined,
        reason: VM2_REASON.into(),
        changed: 1_700_000_100,
    }
}

/// The golden catalog's payload. Three disks:
/// - "vm0": trusted version 2 (parallax-v1, no extents, empty root), no candidate, no tee
///   (unless `vm0_tee`, which breaks the rule that a tee needs a candidate);
/// - "vm1": trusted version 1 (parallax-v1, extents 2 then 0, root "R1"), candidate version 3
///   (parallax-v2, extent 1, empty root), an active tee with two fault rules;
/// - "vm2": trusted version 4 (parallax-v1, no extents), candidate version 5 (parallax-v1,
///   extent 3, root "C"), a quarantined tee.
///
/// Next key 6, no free extent. `vm1_state` is vm1's tee state byte.
fn payload(vm1_state: u8, vm0_tee: bool) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&u64le(6)); // next_key
    p.extend_from_slice(&u32le(EXTENTS));
    p.extend_from_slice(&u32le(0)); // free extents
    p.extend_from_slice(&u32le(5)); // versions
    p.extend_from_slice(&u32le(3)); // disks
    for owner in [1u64, 3, 1, 5] {
        p.extend_from_slice(&u64le(owner));
    }
    let mut version = |key: u64, disk: &str, layout: &str, extents: &[u32], root: &[u8]| {
        p.extend_from_slice(&u64le(key));
        name(&mut p, disk);
        name(&mut p, layout);
        p.extend_from_slice(&u32le(extents.len() as u32));
        for &e in extents {
            p.extend_from_slice(&u32le(e));
        }
        p.extend_from_slice(&u32le(root.len() as u32));
        p.extend_from_slice(root);
    };
    version(1, "vm1", "parallax-v1", &[2, 0], b"R1");
    version(2, "vm0", "parallax-v1", &[], b"");
    version(3, "vm1", "parallax-v2", &[1], b"");
    version(4, "vm2", "parallax-v1", &[], b"");
    version(5, "vm2", "parallax-v1", &[3], b"C");
    let disk = |p: &mut Vec<u8>, n: &str, trusted: u64, candidate: u64| {
        name(p, n);
        p.extend_from_slice(&u64le(1 << 30));
        p.extend_from_slice(&u64le(trusted));
        p.extend_from_slice(&u64le(candidate));
    };
    disk(&mut p, "vm0", 2, 0);
    if vm0_tee {
        tee_bytes(&mut p, 0, 5, "x", &[], "");
    } else {
        p.push(0); // no tee
    }
    disk(&mut p, "vm1", 1, 3);
    tee_bytes(
        &mut p,
        vm1_state,
        1_700_000_000,
        VM1_POLICY,
        &VM1_FAULTS,
        "",
    );
    disk(&mut p, "vm2", 4, 5);
    tee_bytes(&mut p, 1, 1_700_000_100, VM2_POLICY, &[], VM2_REASON);
    p
}

fn put_slot(meta: &mut [u8], at: usize, generation: u64, payload: &[u8]) {
    meta[at..at + 8].copy_from_slice(&u64le(generation));
    meta[at + 8..at + 12].copy_from_slice(&u32le(payload.len() as u32));
    let crc = slot_crc(&meta[at..at + 12], payload);
    meta[at + 12..at + 16].copy_from_slice(&u32le(crc));
    meta[at + 16..at + 16 + payload.len()].copy_from_slice(payload);
}

/// A slot's checksum in format version 2: crc32c over the format version (u32 = 2), the
/// slot's first 12 bytes, then the payload.
fn slot_crc(head: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&u32le(2)), head);
    crc32c::crc32c_append(crc, payload)
}

/// The metadata file holding `payload` as generation 11 in slot A; slot B holds generation 10
/// with an empty catalog. And the data file.
fn golden_v2_with(payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut h = vec![0u8; 4096];
    h[0..8].copy_from_slice(b"DOVETAIL");
    h[8..16].copy_from_slice(b"STORE\0\0\0");
    h[16..20].copy_from_slice(&u32le(2));
    h[24..40].copy_from_slice(&[0xcd; 16]);
    h[40..48].copy_from_slice(&u64le(EXTENT_SIZE));
    h[48..52].copy_from_slice(&u32le(EXTENTS));
    h[56..64].copy_from_slice(&u64le(SLOT_SIZE));
    let crc = crc32c::crc32c(&h[0..64]);
    h[64..68].copy_from_slice(&u32le(crc));

    let mut meta = vec![0u8; (4096 + 2 * SLOT_SIZE) as usize];
    meta[..4096].copy_from_slice(&h);
    put_slot(&mut meta, SLOT_A, 11, payload);
    let mut empty = Vec::new();
    empty.extend_from_slice(&u64le(1));
    empty.extend_from_slice(&u32le(EXTENTS));
    empty.extend_from_slice(&u32le(EXTENTS));
    empty.extend_from_slice(&u32le(0));
    empty.extend_from_slice(&u32le(0));
    empty.extend_from_slice(&[0u8; 8 * EXTENTS as usize]);
    put_slot(&mut meta, SLOT_B, 10, &empty);

    let mut data = vec![0u8; (EXTENT_SIZE * u64::from(EXTENTS)) as usize];
    data[(2 * EXTENT_SIZE) as usize..][..5].copy_from_slice(b"hello");
    (meta, data)
}

fn golden_v2() -> (Vec<u8>, Vec<u8>) {
    golden_v2_with(&payload(0, false))
}

fn files(meta: &[u8], data: &[u8]) -> (Arc<Power>, SimFile, SimFile) {
    let power = Power::new();
    (
        power.clone(),
        SimFile::with_bytes(power.clone(), meta),
        SimFile::with_bytes(power, data),
    )
}

fn open(meta: &[u8], data: &[u8]) -> dovetail_store::Result<Arc<Store>> {
    let (_, m, d) = files(meta, data);
    Store::open_on(Box::new(m), Box::new(d))
}

fn slot_payload(meta: &[u8], at: usize) -> Vec<u8> {
    let len = u32::from_le_bytes(meta[at + 8..at + 12].try_into().expect("4")) as usize;
    meta[at + 16..at + 16 + len].to_vec()
}

#[test]
fn a_version_2_store_written_from_the_document_opens_with_its_catalog_and_tee_records() {
    let (meta, data) = golden_v2();
    for read_only in [true, false] {
        let (power, m, d) = files(&meta, &data);
        let s = if read_only {
            Store::open_on_read_only(Box::new(m.clone()), Box::new(d))
        } else {
            Store::open_on(Box::new(m.clone()), Box::new(d))
        }
        .expect("opens");
        assert_eq!(power.syncs(), 0, "a version-2 store needs no upgrade");
        let info = s.info();
        assert_eq!(info.format_version, 2);
        assert_eq!(info.uuid, [0xcd; 16]);
        assert_eq!(
            (info.extent_size, info.extent_count, info.free_extents),
            (EXTENT_SIZE, EXTENTS, 0)
        );
        assert_eq!(info.generation, 11);
        // A version-2 store is one tier, `default`, at `data.0` (no tier table to read).
        assert_eq!(
            s.tiers(),
            vec![dovetail_store::TierInfo {
                name: "default".into(),
                extents: EXTENTS,
                free: 0,
            }]
        );
        assert_eq!(info.tiers[0].path, std::path::Path::new("data.0"));
        let names: Vec<_> = s.disks().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["vm0", "vm1", "vm2"]);
        let vm0 = s.disk("vm0").expect("vm0");
        assert_eq!(
            (vm0.trusted, vm0.candidate, vm0.tee),
            (VersionKey(2), None, None)
        );
        let vm1 = s.disk("vm1").expect("vm1");
        assert_eq!(
            (vm1.trusted, vm1.candidate),
            (VersionKey(1), Some(VersionKey(3)))
        );
        assert_eq!(vm1.tee, Some(vm1_tee()));
        assert_eq!(s.tee("vm1").expect("tee"), Some(vm1_tee()));
        assert_eq!(s.tee("vm2").expect("tee"), Some(vm2_tee()));
        assert!(matches!(s.tee("vm9"), Err(StoreError::NoSuchDisk(_))));
        let v1 = s.space(VersionKey(1)).expect("space");
        assert_eq!(v1.extents(), vec![ExtentId(2), ExtentId(0)]);
        assert_eq!(v1.root(), b"R1");
        let mut b = [0u8; 5];
        v1.read(ExtentId(2), 0, &mut b).expect("read");
        assert_eq!(&b, b"hello");
        assert_eq!(
            s.space(VersionKey(5)).expect("space").extents(),
            vec![ExtentId(3)]
        );
        assert_eq!(s.space(VersionKey(5)).expect("space").root(), b"C");
        drop(s);
        assert!(m.live_bytes() == meta, "opening wrote nothing");
    }
    let (_, m, d) = files(&meta, &data);
    let report = check_on(Box::new(m), Box::new(d), &[]).expect("check");
    assert!(report.is_ok(), "{report}");
    let text = report.to_string();
    assert!(
        text.contains("tee \"compare:all\" active since 1700000000"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "tee \"compare:reads\" quarantined at 1700000100: {VM2_REASON}"
        )),
        "{text}"
    );
}

#[test]
fn the_store_writes_what_the_document_says() {
    // The store's own encoding of the golden catalog, committed into the older slot, is the
    // document's bytes: same payload, under a version-2 checksum.
    let (meta, data) = golden_v2();
    let (_, m, d) = files(&meta, &data);
    let s = Store::open_on(Box::new(m.clone()), Box::new(d)).expect("open");
    // Re-commit version 1's root unchanged: generation 12, written to slot B.
    s.space(VersionKey(1))
        .expect("space")
        .commit_root(b"R1")
        .expect("commit");
    let bytes = m.durable_bytes();
    assert_eq!(&bytes[..4096], &meta[..4096], "the header does not change");
    assert_eq!(&bytes[SLOT_B..SLOT_B + 8], &u64le(12));
    let written = slot_payload(&bytes, SLOT_B);
    assert_eq!(written, payload(0, false), "same catalog, same bytes");
    assert_eq!(
        &bytes[SLOT_B + 12..SLOT_B + 16],
        &u32le(slot_crc(&bytes[SLOT_B..SLOT_B + 12], &written))
    );
    assert_eq!(
        &bytes[SLOT_A..SLOT_B],
        &meta[SLOT_A..SLOT_B],
        "slot A untouched"
    );

    // Quarantining vm1 changes its state byte, its reason and its time, nothing else.
    s.quarantine(
        "vm1",
        "policy compare:all: write of block 9 failed on the candidate",
    )
    .expect("quarantine");
    let t = s.tee("vm1").expect("tee").expect("has one");
    assert_eq!(t.state, TeeState::Quarantined);
    let bytes = m.durable_bytes();
    let mut want = payload(0, false);
    let (start, end) = vm1_tee_span();
    let mut tee = Vec::new();
    tee_bytes(
        &mut tee,
        1,
        t.changed,
        VM1_POLICY,
        &VM1_FAULTS,
        "policy compare:all: write of block 9 failed on the candidate",
    );
    want.splice(start..end, tee);
    assert_eq!(slot_payload(&bytes, SLOT_A), want);
    assert_eq!(&bytes[SLOT_A..SLOT_A + 8], &u64le(13));
}

/// Where vm1's tee part (from its flag byte on) lies in the golden payload.
fn vm1_tee_span() -> (usize, usize) {
    let p = payload(0, false);
    let mut vm1 = Vec::new();
    name(&mut vm1, "vm1");
    vm1.extend_from_slice(&u64le(1 << 30));
    vm1.extend_from_slice(&u64le(1));
    vm1.extend_from_slice(&u64le(3));
    let at = p
        .windows(vm1.len())
        .position(|w| w == vm1)
        .expect("vm1's record")
        + vm1.len();
    let mut tee = Vec::new();
    tee_bytes(&mut tee, 0, 1_700_000_000, VM1_POLICY, &VM1_FAULTS, "");
    assert_eq!(&p[at..at + tee.len()], &tee[..]);
    (at, at + tee.len())
}

#[test]
fn a_bad_tee_state_or_flag_byte_is_corruption() {
    let (meta, data) = golden_v2_with(&payload(2, false));
    let e = open(&meta, &data).expect_err("state 2");
    assert!(
        matches!(e, StoreError::Corrupt(ref s) if s.contains("disk \"vm1\"'s tee state is 2")),
        "{e}"
    );
    let (_, m, d) = files(&meta, &data);
    let report = check_on(Box::new(m), Box::new(d), &[]).expect("check");
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("tee state is 2")),
        "{report}"
    );

    let mut p = payload(0, false);
    let (start, _) = vm1_tee_span();
    p[start] = 9;
    let (meta, data) = golden_v2_with(&p);
    let e = open(&meta, &data).expect_err("flag 9");
    assert!(
        matches!(e, StoreError::Corrupt(ref s) if s.contains("tee flag is 9")),
        "{e}"
    );
}

#[test]
fn a_tee_record_without_a_candidate_is_refused_by_open_and_reported_by_check() {
    let (meta, data) = golden_v2_with(&payload(0, true));
    let e = open(&meta, &data).expect_err("tee without candidate");
    assert!(
        matches!(e, StoreError::Corrupt(ref s)
            if s.contains("disk \"vm0\" has a tee record but no candidate version")),
        "{e}"
    );
    let (_, m, d) = files(&meta, &data);
    let report = check_on(Box::new(m), Box::new(d), &[]).expect("check");
    assert_eq!(
        report.violations,
        vec![
            "disk \"vm0\" has a tee record but no candidate version (a tee needs both versions)"
                .to_string()
        ],
        "{report}"
    );
}

#[test]
fn a_version_1_checksum_under_a_version_2_header_is_a_pre_upgrade_slot() {
    // Slot A re-sealed with a version-1 checksum (as if written before an upgrade) is valid
    // and decoded by the version-1 rules: a version-2 payload there does not decode (corrupt);
    // a version-1 payload does, without tee records.
    let (mut meta, data) = golden_v2();
    let p = slot_payload(&meta, SLOT_A);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&meta[SLOT_A..SLOT_A + 12]), &p);
    meta[SLOT_A + 12..SLOT_A + 16].copy_from_slice(&u32le(crc));
    let e = open(&meta, &data).expect_err("a v2 payload is not a v1 one");
    assert!(matches!(e, StoreError::Corrupt(_)), "{e}");

    // A version-1 payload of the same catalog without tees (vm1 and vm2 lose their tee part).
    let mut v1 = Vec::new();
    let full = payload(0, false);
    let (start, end) = vm1_tee_span();
    v1.extend_from_slice(&full[..start]);
    v1.extend_from_slice(&full[end..]);
    let mut tail = Vec::new();
    tee_bytes(&mut tail, 1, 1_700_000_100, VM2_POLICY, &[], VM2_REASON);
    v1.truncate(v1.len() - tail.len());
    // vm0's flag byte 0 sits right after its record: drop it too.
    let mut vm0 = Vec::new();
    name(&mut vm0, "vm0");
    vm0.extend_from_slice(&u64le(1 << 30));
    vm0.extend_from_slice(&u64le(2));
    vm0.extend_from_slice(&u64le(0));
    let at = v1.windows(vm0.len()).position(|w| w == vm0).expect("vm0") + vm0.len();
    assert_eq!(v1.remove(at), 0);
    meta[SLOT_A + 8..SLOT_A + 12].copy_from_slice(&u32le(v1.len() as u32));
    let crc = crc32c::crc32c_append(crc32c::crc32c(&meta[SLOT_A..SLOT_A + 12]), &v1);
    meta[SLOT_A + 12..SLOT_A + 16].copy_from_slice(&u32le(crc));
    meta[SLOT_A + 16..SLOT_A + 16 + v1.len()].copy_from_slice(&v1);
    let s = open(&meta, &data).expect("a version-1 slot opens");
    assert_eq!(s.info().generation, 11);
    assert_eq!(s.disk("vm1").expect("vm1").candidate, Some(VersionKey(3)));
    assert!(s.disks().iter().all(|d| d.tee.is_none()));
}
