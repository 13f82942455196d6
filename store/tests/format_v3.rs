//! Format version 4 (and 3), as docs/format.md states it: a metadata file with a two-tier header,
//! assembled here byte by byte from the document (not with the store's encoder), must open with
//! the tiers and the catalog it describes, over one data file per tier; extents must be read and
//! written at the document's place in their tier's file; the store's commits must produce the
//! document's bytes; `sync` must sync only the tier files a version wrote to; and a tier table
//! or tier file that breaks the rules must be refused by `open` and reported by `check`.
//! Format version 4 adds a header to each tier file, after its extents: a file without the one
//! its tier expects is refused; a version-3 store (no tier headers) is read as it is and
//! upgraded to version 4 by a read-write open, to the document's bytes.

use std::sync::Arc;

use dovetail_store::sim::{Power, SimFile, Torn};
use dovetail_store::{
    check_on, check_on_tiers, ExtentId, Store, StoreError, TierInfo, TierStatus, VersionKey,
    VersionSpace,
};

const EXTENT_SIZE: u64 = 8192;
/// Tier `fast` holds extents 0 and 1, tier `slow` extents 2, 3 and 4.
const FAST: u32 = 2;
const SLOW: u32 = 3;
const EXTENTS: u32 = FAST + SLOW;
const SLOT_SIZE: u64 = 8192;
const SLOT_A: usize = 4096;
const SLOT_B: usize = 4096 + SLOT_SIZE as usize;
const FAST_PATH: &str = "/nvme/ds.fast";
const SLOW_PATH: &str = "/hdd/ds.slow";

fn u16le(v: u16) -> [u8; 2] {
    v.to_le_bytes()
}

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

/// The header: format version 5 (the tier table came with 3, tier headers with 4), uuid 0xab…, then the tier table at byte 68: count 2, two
/// reserved bytes, then per tier its name (16 bytes, zero padded), extent count u32, path
/// length u16 and path. The checksum at 64 covers bytes 0..64 and 68..4096.
fn header(tiers: &[(&str, u32, &str)], extent_count: u32) -> Vec<u8> {
    header_v(5, tiers, extent_count)
}

/// [`header`] stating format `version` (3, 4 or 5: the same bytes but for the version and the
/// checksum).
fn header_v(version: u32, tiers: &[(&str, u32, &str)], extent_count: u32) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[0..8].copy_from_slice(b"DOVETAIL");
    h[8..16].copy_from_slice(b"STORE\0\0\0");
    h[16..20].copy_from_slice(&u32le(version));
    h[24..40].copy_from_slice(&[0xab; 16]);
    h[40..48].copy_from_slice(&u64le(EXTENT_SIZE));
    h[48..52].copy_from_slice(&u32le(extent_count));
    h[56..64].copy_from_slice(&u64le(SLOT_SIZE));
    h[68..70].copy_from_slice(&u16le(tiers.len() as u16));
    let mut at = 72;
    for (n, count, path) in tiers {
        h[at..at + n.len()].copy_from_slice(n.as_bytes());
        h[at + 16..at + 20].copy_from_slice(&u32le(*count));
        h[at + 20..at + 22].copy_from_slice(&u16le(path.len() as u16));
        h[at + 22..at + 22 + path.len()].copy_from_slice(path.as_bytes());
        at += 22 + path.len();
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..64]), &h[68..4096]);
    h[64..68].copy_from_slice(&u32le(crc));
    h
}

fn two_tier_header() -> Vec<u8> {
    header(
        &[("fast", FAST, FAST_PATH), ("slow", SLOW, SLOW_PATH)],
        EXTENTS,
    )
}

/// The golden catalog's payload (format version 3 encodes it as version 2 does): disk "vm1",
/// 1 GiB, trusted version 1 (parallax-v2, extents 1 then 3: one per tier, root "R1"),
/// candidate version 2 (parallax-v2, `v2_extents`, empty root), no tee. Next key 3.
fn payload(v2_extents: &[u32]) -> Vec<u8> {
    payload_v(5, v2_extents)
}

/// [`payload`] in format `version`: before 5, the disk record ends after its tee flag; in 5
/// the attachment flag follows (0: not attached).
fn payload_v(format: u32, v2_extents: &[u32]) -> Vec<u8> {
    let mut owners = [0u64, 1, 0, 1, 0];
    for &e in v2_extents {
        owners[e as usize] = 2;
    }
    let mut p = Vec::new();
    p.extend_from_slice(&u64le(3)); // next_key
    p.extend_from_slice(&u32le(EXTENTS));
    let free = owners.iter().filter(|&&o| o == 0).count() as u32;
    p.extend_from_slice(&u32le(free));
    p.extend_from_slice(&u32le(2)); // versions
    p.extend_from_slice(&u32le(1)); // disks
    for o in owners {
        p.extend_from_slice(&u64le(o));
    }
    let mut version = |key: u64, extents: &[u32], root: &[u8]| {
        p.extend_from_slice(&u64le(key));
        name(&mut p, "vm1");
        name(&mut p, "parallax-v2");
        p.extend_from_slice(&u32le(extents.len() as u32));
        for &e in extents {
            p.extend_from_slice(&u32le(e));
        }
        p.extend_from_slice(&u32le(root.len() as u32));
        p.extend_from_slice(root);
    };
    version(1, &[1, 3], b"R1");
    version(2, v2_extents, b"");
    name(&mut p, "vm1");
    p.extend_from_slice(&u64le(1 << 30));
    p.extend_from_slice(&u64le(1));
    p.extend_from_slice(&u64le(2));
    p.push(0); // no tee
    if format >= 5 {
        p.push(0); // not attached
    }
    p
}

/// A slot's checksum in format version 5: crc32c over the format version (u32 = 5), the slot's
/// first 12 bytes, then the payload.
fn slot_crc(head: &[u8], payload: &[u8]) -> u32 {
    slot_crc_v(5, head, payload)
}

fn slot_crc_v(version: u32, head: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&u32le(version)), head);
    crc32c::crc32c_append(crc, payload)
}

/// A tier file's header (format version 4), 4096 bytes right after the tier's extents: magic
/// `DOVETAILTIER` and 4 zero bytes, version u32 = 4, 4 reserved bytes, the store's uuid (16),
/// extent size u64, first extent u32, extent count u32, the tier's index u16, 2 reserved bytes,
/// its name (16, zero padded), then at 76 crc32c of bytes 0..76 and 80..4096; zeros after.
fn tier_header(index: u16, name: &str, first: u32, count: u32) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[0..12].copy_from_slice(b"DOVETAILTIER");
    h[16..20].copy_from_slice(&u32le(4));
    h[24..40].copy_from_slice(&[0xab; 16]);
    h[40..48].copy_from_slice(&u64le(EXTENT_SIZE));
    h[48..52].copy_from_slice(&u32le(first));
    h[52..56].copy_from_slice(&u32le(count));
    h[56..58].copy_from_slice(&u16le(index));
    h[60..60 + name.len()].copy_from_slice(name.as_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..76]), &h[80..4096]);
    h[76..80].copy_from_slice(&u32le(crc));
    h
}

fn put_slot_v(version: u32, meta: &mut [u8], at: usize, generation: u64, payload: &[u8]) {
    meta[at..at + 8].copy_from_slice(&u64le(generation));
    meta[at + 8..at + 12].copy_from_slice(&u32le(payload.len() as u32));
    let crc = slot_crc_v(version, &meta[at..at + 12], payload);
    meta[at + 12..at + 16].copy_from_slice(&u32le(crc));
    meta[at + 16..at + 16 + payload.len()].copy_from_slice(payload);
}

fn slot_payload(meta: &[u8], at: usize) -> Vec<u8> {
    let len = u32::from_le_bytes(meta[at + 8..at + 12].try_into().expect("4")) as usize;
    meta[at + 16..at + 16 + len].to_vec()
}

/// The metadata file (generation 5 in slot A, slot B never written) and the two tier files:
/// extent 1 (the fast file's second extent) starts with "fast!", extent 3 (the slow file's
/// second extent) with "slow!".
fn golden() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    golden_with(two_tier_header())
}

/// The files of a store with `header`: in format version 4 each tier file ends with its tier
/// header, in version 3 with its last extent.
fn golden_with(header: Vec<u8>) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let version = u32::from_le_bytes(header[16..20].try_into().expect("4"));
    let mut meta = vec![0u8; (4096 + 2 * SLOT_SIZE) as usize];
    meta[..4096].copy_from_slice(&header);
    put_slot_v(version, &mut meta, SLOT_A, 5, &payload_v(version, &[]));
    let mut fast = vec![0u8; (EXTENT_SIZE * u64::from(FAST)) as usize];
    fast[EXTENT_SIZE as usize..][..5].copy_from_slice(b"fast!");
    let mut slow = vec![0u8; (EXTENT_SIZE * u64::from(SLOW)) as usize];
    slow[EXTENT_SIZE as usize..][..5].copy_from_slice(b"slow!");
    if version >= 4 {
        fast.extend_from_slice(&tier_header(0, "fast", 0, FAST));
        slow.extend_from_slice(&tier_header(1, "slow", FAST, SLOW));
    }
    (meta, fast, slow)
}

/// The same store in format version 3, as a version-3 binary wrote it.
fn golden_v3() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    golden_with(header_v(
        3,
        &[("fast", FAST, FAST_PATH), ("slow", SLOW, SLOW_PATH)],
        EXTENTS,
    ))
}

/// The files on simulated machines: one power supply for the metadata file and one per tier
/// file, so each file's syncs can be counted.
struct Machine {
    meta: SimFile,
    fast: SimFile,
    slow: SimFile,
    meta_power: Arc<Power>,
    fast_power: Arc<Power>,
    slow_power: Arc<Power>,
}

fn machine(meta: &[u8], fast: &[u8], slow: &[u8]) -> Machine {
    let (meta_power, fast_power, slow_power) = (Power::new(), Power::new(), Power::new());
    Machine {
        meta: SimFile::with_bytes(meta_power.clone(), meta),
        fast: SimFile::with_bytes(fast_power.clone(), fast),
        slow: SimFile::with_bytes(slow_power.clone(), slow),
        meta_power,
        fast_power,
        slow_power,
    }
}

impl Machine {
    fn open(&self, read_only: bool) -> dovetail_store::Result<Arc<Store>> {
        let files: Vec<Box<dyn dovetail_store::StoreFile>> =
            vec![Box::new(self.fast.clone()), Box::new(self.slow.clone())];
        if read_only {
            Store::open_on_tiers_read_only(Box::new(self.meta.clone()), files)
        } else {
            Store::open_on_tiers(Box::new(self.meta.clone()), files)
        }
    }

    /// Syncs so far of (metadata, fast, slow).
    fn syncs(&self) -> (u64, u64, u64) {
        (
            self.meta_power.syncs(),
            self.fast_power.syncs(),
            self.slow_power.syncs(),
        )
    }
}

fn read5(space: &dyn VersionSpace, e: u32) -> [u8; 5] {
    let mut b = [0u8; 5];
    space.read(ExtentId(e), 0, &mut b).expect("read");
    b
}

#[test]
fn a_version_4_store_written_from_the_document_opens_with_its_tiers() {
    let (meta, fast, slow) = golden();
    for read_only in [true, false] {
        let m = machine(&meta, &fast, &slow);
        let s = m.open(read_only).expect("opens");
        assert_eq!(m.syncs(), (0, 0, 0), "opening syncs nothing");
        let info = s.info();
        assert_eq!(info.format_version, 5);
        assert_eq!(info.uuid, [0xab; 16]);
        assert_eq!(
            (
                info.extent_size,
                info.extent_count,
                info.free_extents,
                info.generation
            ),
            (EXTENT_SIZE, EXTENTS, 3, 5)
        );
        assert_eq!(
            info.tiers,
            vec![
                TierStatus {
                    name: "fast".into(),
                    path: FAST_PATH.into(),
                    first_extent: 0,
                    extents: FAST,
                    free: 1,
                },
                TierStatus {
                    name: "slow".into(),
                    path: SLOW_PATH.into(),
                    first_extent: 2,
                    extents: SLOW,
                    free: 2,
                },
            ]
        );
        let want = vec![
            TierInfo {
                name: "fast".into(),
                extents: FAST,
                free: 1,
            },
            TierInfo {
                name: "slow".into(),
                extents: SLOW,
                free: 2,
            },
        ];
        assert_eq!(s.tiers(), want);
        let v1 = s.space(VersionKey(1)).expect("space");
        assert_eq!(v1.tiers(), want);
        assert_eq!(v1.extents(), vec![ExtentId(1), ExtentId(3)]);
        assert_eq!(v1.root(), b"R1");
        let tiers: Vec<usize> = (0..EXTENTS).map(|e| v1.extent_tier(ExtentId(e))).collect();
        assert_eq!(tiers, [0, 0, 1, 1, 1]);
        // Extent 1 is the fast file's second extent, extent 3 the slow file's second.
        assert_eq!(&read5(&*v1, 1), b"fast!");
        assert_eq!(&read5(&*v1, 3), b"slow!");
        assert_eq!(read5(&*v1, 2), [0; 5]);
        drop((v1, s));
        assert!(m.meta.live_bytes() == meta, "opening wrote nothing");
    }
    let m = machine(&meta, &fast, &slow);
    let report = check_on_tiers(
        Box::new(m.meta.clone()),
        vec![Box::new(m.fast.clone()), Box::new(m.slow.clone())],
        &[],
    )
    .expect("check");
    assert!(report.is_ok(), "{report}");
    let text = report.to_string();
    assert!(
        text.contains(
            "tier fast: /nvme/ds.fast, 2 extents (16 KiB) from extent 0: 1 granted, 1 free"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "tier slow: /hdd/ds.slow, 3 extents (24 KiB) from extent 2: 1 granted, 2 free"
        ),
        "{text}"
    );
}

#[test]
fn the_store_writes_what_the_document_says_in_each_tier_file() {
    let (meta, fast, slow) = golden();
    let m = machine(&meta, &fast, &slow);
    let s = m.open(false).expect("open");
    let v2 = s.space(VersionKey(2)).expect("space");

    // Tier 1 first: its lowest free extent is 2, the slow file's first extent, zeroed (a
    // hole, not synced: no tier file is synced for a grant) before the grant's commit
    // (generation 6, slot B), the one sync of the metadata file.
    let before = m.syncs();
    assert_eq!(v2.grant_extent_on(1).expect("grant slow"), ExtentId(2));
    assert_eq!(m.syncs(), (before.0 + 1, before.1, before.2));
    assert_eq!(v2.grant_extent_on(0).expect("grant fast"), ExtentId(0));
    let bytes = m.meta.durable_bytes();
    assert_eq!(&bytes[..4096], &meta[..4096], "the header does not change");
    assert_eq!(&bytes[SLOT_A..SLOT_A + 8], &u64le(7));
    let written = slot_payload(&bytes, SLOT_A);
    assert_eq!(written, payload(&[2, 0]), "the document's payload");
    assert_eq!(
        &bytes[SLOT_A + 12..SLOT_A + 16],
        &u32le(slot_crc(&bytes[SLOT_A..SLOT_A + 12], &written))
    );
    assert_eq!(&bytes[SLOT_B..SLOT_B + 8], &u64le(6));

    // Extent e of tier t is at (e - first(t)) · extent_size in t's file.
    v2.write(ExtentId(2), 100, b"cold").expect("write slow");
    v2.write(ExtentId(0), 200, b"hot").expect("write fast");
    assert_eq!(&m.slow.live_bytes()[100..104], b"cold");
    assert_eq!(&m.fast.live_bytes()[200..203], b"hot");
    let v1 = s.space(VersionKey(1)).expect("space");
    v1.write(ExtentId(3), 0, b"SLOW!").expect("write slow");
    v1.write(ExtentId(1), 0, b"FAST!").expect("write fast");
    assert_eq!(&m.slow.live_bytes()[EXTENT_SIZE as usize..][..5], b"SLOW!");
    assert_eq!(&m.fast.live_bytes()[EXTENT_SIZE as usize..][..5], b"FAST!");
    // Other versions' extents are refused whatever their tier.
    for e in [1, 3] {
        assert!(matches!(
            v2.write(ExtentId(e), 0, b"x"),
            Err(StoreError::GrantViolation { .. })
        ));
    }
    v1.sync().expect("sync");
    v2.sync().expect("sync");
    let synced = m.syncs();

    // A version that wrote only to the fast tier syncs only the fast file; then only the slow
    // one; a sync with nothing written syncs nothing. Any space of the version will do: they
    // share what has been written.
    v2.write(ExtentId(0), 0, b"only fast").expect("write");
    s.space(VersionKey(2))
        .expect("another space")
        .sync()
        .expect("sync");
    assert_eq!(m.syncs(), (synced.0, synced.1 + 1, synced.2));
    assert_eq!(&m.fast.durable_bytes()[..9], b"only fast");
    v2.write(ExtentId(2), 0, b"only slow").expect("write");
    v2.sync().expect("sync");
    assert_eq!(m.syncs(), (synced.0, synced.1 + 1, synced.2 + 1));
    assert_eq!(&m.slow.durable_bytes()[..9], b"only slow");
    v2.sync().expect("sync");
    v1.sync().expect("sync");
    assert_eq!(m.syncs(), (synced.0, synced.1 + 1, synced.2 + 1));

    // Freeing releases the extents' space in their own files.
    drop((v1, v2));
    s.drop_candidate("vm1").expect("drop");
    assert_eq!(&m.fast.live_bytes()[..9], &[0; 9]);
    assert_eq!(&m.slow.live_bytes()[..9], &[0; 9]);
    assert_eq!(&m.slow.live_bytes()[EXTENT_SIZE as usize..][..5], b"SLOW!");
}

#[test]
fn grants_by_tier_say_which_tier_is_full() {
    let (meta, fast, slow) = golden();
    let m = machine(&meta, &fast, &slow);
    let s = m.open(false).expect("open");
    let v2 = s.space(VersionKey(2)).expect("space");
    assert_eq!(v2.grant_extent_on(0).expect("fast"), ExtentId(0));
    let e = v2.grant_extent_on(0).expect_err("fast is full");
    assert!(
        matches!(e, StoreError::TierFull(ref t) if t == "fast"),
        "{e}"
    );
    assert_eq!(e.to_string(), "tier fast has no free extent left");
    assert!(e.is_full());
    // The slow tier still has room, and a grant that names no tier finds it.
    assert_eq!(v2.grant_extent().expect("any"), ExtentId(2));
    assert_eq!(v2.grant_extent_on(1).expect("slow"), ExtentId(4));
    let e = v2.grant_extent_on(1).expect_err("slow is full");
    assert!(
        matches!(e, StoreError::TierFull(ref t) if t == "slow"),
        "{e}"
    );
    assert!(matches!(v2.grant_extent(), Err(StoreError::Full)));
    let e = v2.grant_extent_on(2).expect_err("no tier 2");
    assert!(
        matches!(e, StoreError::Invalid(ref s) if s.contains("no tier 2 (it has 2: fast, slow)")),
        "{e}"
    );
    assert_eq!(v2.extents(), vec![ExtentId(0), ExtentId(2), ExtentId(4)]);
    assert!(v2.tiers().iter().all(|t| t.free == 0));
    drop(v2);
    drop(s);
    let again = m.open(true).expect("reopen");
    assert_eq!(again.info().free_extents, 0);
    assert_eq!(
        again.space(VersionKey(2)).expect("space").extents(),
        vec![ExtentId(0), ExtentId(2), ExtentId(4)]
    );
}

#[test]
fn tier_files_that_do_not_match_the_header_are_refused_and_reported() {
    let (meta, fast, slow) = golden();
    let m = machine(&meta, &fast, &slow);

    // One data file for two tiers.
    let e =
        Store::open_on(Box::new(m.meta.clone()), Box::new(m.fast.clone())).expect_err("one file");
    assert!(
        matches!(e, StoreError::Invalid(ref s)
            if s.contains("the store has 2 tier(s) (fast, slow) but 1 data file(s) were given")),
        "{e}"
    );
    let report = check_on(Box::new(m.meta.clone()), Box::new(m.fast.clone()), &[]).expect("check");
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("the header names 2 tier(s) but 1 data file(s) were given")),
        "{report}"
    );

    // A slow file one extent short.
    let m = machine(&meta, &fast, &slow[..2 * EXTENT_SIZE as usize]);
    let e = m.open(true).expect_err("short");
    assert_eq!(
        e.to_string(),
        "tier slow: /hdd/ds.slow is 16384 bytes, shorter than the tier's 3 extents of 8 KiB and its tier header (28672 bytes)"
    );
    let report = check_on_tiers(
        Box::new(m.meta.clone()),
        vec![Box::new(m.fast.clone()), Box::new(m.slow.clone())],
        &[],
    )
    .expect("check");
    assert_eq!(
        report.violations,
        vec![
            "tier slow: its data file /hdd/ds.slow is 16384 bytes, shorter than the tier's 3 extents of 8 KiB and its tier header (28672 bytes)"
                .to_string()
        ],
        "{report}"
    );

    // Files long enough that are not the tier's own: no tier header (any host file), the
    // other tier's, another store's, a damaged one. Each is refused by every open, named with
    // what is wrong, reported by `check`, and left unchanged.
    let mut other_store = slow.clone();
    let mut h = tier_header(1, "slow", FAST, SLOW);
    h[24] ^= 0xff;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..76]), &h[80..4096]);
    h[76..80].copy_from_slice(&u32le(crc));
    other_store[(3 * EXTENT_SIZE) as usize..].copy_from_slice(&h);
    let mut other_tier = slow.clone();
    other_tier[(3 * EXTENT_SIZE) as usize..].copy_from_slice(&tier_header(0, "fast", 0, FAST));
    let mut damaged = slow.clone();
    damaged[(3 * EXTENT_SIZE) as usize + 200] = 1;
    let host_file: Vec<u8> = b"root:x:0:0:root:/root:/bin/bash\n"
        .iter()
        .copied()
        .cycle()
        .take(slow.len() + 100)
        .collect();
    let cases: [(&[u8], &str); 4] = [
        (
            &host_file,
            "tier slow: /hdd/ds.slow has no Dovetail tier header there (bad magic): it was not created as a tier file of a store (at byte 24576)",
        ),
        (
            &other_store,
            "tier slow: /hdd/ds.slow belongs to another store (its tier header names store 54abab",
        ),
        (
            &other_tier,
            "tier slow: /hdd/ds.slow is the data file of tier fast (index 0, extents 0..2 of 8192 bytes), not of tier slow (index 1, extents 2..5 of 8192 bytes)",
        ),
        (&damaged, "tier slow: /hdd/ds.slow has a damaged tier header"),
    ];
    for (file, words) in cases {
        let m = machine(&meta, &fast, file);
        for read_only in [true, false] {
            let e = m.open(read_only).expect_err(words);
            assert!(
                matches!(e, StoreError::TierFile { .. }) && e.to_string().starts_with(words),
                "{e}"
            );
        }
        assert!(
            m.slow.live_bytes() == file,
            "{words}: the file is unchanged"
        );
        assert!(
            m.meta.live_bytes() == meta,
            "{words}: the store is unchanged"
        );
        let report = check_on_tiers(
            Box::new(m.meta.clone()),
            vec![Box::new(m.fast.clone()), Box::new(m.slow.clone())],
            &[],
        )
        .expect("check");
        assert!(
            report.violations.len() == 1
                && report.violations[0]
                    .contains(words.trim_start_matches("tier slow: /hdd/ds.slow ")),
            "{report}"
        );
    }
}

#[test]
fn a_version_3_store_is_read_as_it_is_and_upgraded_to_the_documents_bytes() {
    let (meta, fast, slow) = golden_v3();
    // Read-only: version 3, the same catalog, nothing written.
    let m = machine(&meta, &fast, &slow);
    let s = m.open(true).expect("opens read-only");
    assert_eq!(s.info().format_version, 3);
    assert_eq!(s.info().generation, 5);
    assert_eq!(
        &read5(&*s.space(VersionKey(1)).expect("space"), 3),
        b"slow!"
    );
    drop(s);
    assert!(
        m.meta.live_bytes() == meta && m.slow.live_bytes() == slow && m.fast.live_bytes() == fast
    );
    let report = check_on_tiers(
        Box::new(m.meta.clone()),
        vec![Box::new(m.fast.clone()), Box::new(m.slow.clone())],
        &[],
    )
    .expect("check");
    assert!(report.is_ok(), "{report}");
    assert!(
        report
            .to_string()
            .contains("format version 3: its tier files carry no tier header"),
        "{report}"
    );

    // Read-write: each tier file gets its header (synced), then slot B the catalog as
    // generation 6 in format 4 (synced), then the header's first sector says 4 (synced);
    // then the upgrade to 5: slot A the catalog as generation 7 in format 5 (synced), the
    // header's first sector says 5 (synced).
    let s = m.open(false).expect("upgrades");
    assert_eq!(m.syncs(), (4, 1, 1));
    assert_eq!((s.info().format_version, s.info().generation), (5, 7));
    drop(s);
    let (want_meta, want_fast, want_slow) = golden();
    let bytes = m.meta.durable_bytes();
    assert_eq!(&bytes[..4096], &want_meta[..4096], "the version-5 header");
    assert_eq!(&bytes[SLOT_B..SLOT_B + 8], &u64le(6));
    let p = slot_payload(&bytes, SLOT_B);
    assert_eq!(p, payload_v(4, &[]));
    assert_eq!(
        &bytes[SLOT_B + 12..SLOT_B + 16],
        &u32le(slot_crc_v(4, &bytes[SLOT_B..SLOT_B + 12], &p))
    );
    assert_eq!(&bytes[SLOT_A..SLOT_A + 8], &u64le(7));
    let p = slot_payload(&bytes, SLOT_A);
    assert_eq!(p, payload(&[]));
    assert_eq!(
        &bytes[SLOT_A + 12..SLOT_A + 16],
        &u32le(slot_crc(&bytes[SLOT_A..SLOT_A + 12], &p))
    );
    assert!(
        m.fast.durable_bytes() == want_fast,
        "the fast file: its extents, then its tier header"
    );
    assert!(
        m.slow.durable_bytes() == want_slow,
        "the slow file: its extents, then its tier header"
    );
    // Slot B stays valid (a version-4 slot written before the upgrade) until the next commit.
    let report = check_on_tiers(
        Box::new(m.meta.clone()),
        vec![Box::new(m.fast.clone()), Box::new(m.slow.clone())],
        &[],
    )
    .expect("check");
    assert!(report.is_ok(), "{report}");
    assert!(
        report.slots[1].contains("format version 4 (written before the upgrade)"),
        "{report}"
    );

    // A tier file a version-3 store cannot vouch for is not adopted: not the length create made.
    let mut longer = slow.clone();
    longer.extend_from_slice(&[7u8; 100]);
    let m = machine(&meta, &fast, &longer);
    let e = m.open(false).expect_err("not adopted");
    assert!(
        e.to_string().starts_with(
            "tier slow: /hdd/ds.slow is 24676 bytes, not the 24576 bytes `store create` made"
        ),
        "{e}"
    );
    assert!(m.slow.live_bytes() == longer, "the file is unchanged");
    assert_eq!(
        &m.meta.live_bytes()[16..20],
        &u32le(3),
        "the store is still version 3"
    );
}

#[test]
fn a_tier_table_that_breaks_the_rules_is_corrupt() {
    /// Name, extent count and path of each tier.
    type Tiers<'a> = &'a [(&'a str, u32, &'a str)];
    let cases: [(Tiers, &str); 4] = [
        (
            &[("fast", FAST, FAST_PATH), ("slow", SLOW + 1, SLOW_PATH)],
            "the tiers hold 6 extents but the store has 5",
        ),
        (
            &[("fast", FAST, FAST_PATH), ("fast", SLOW, SLOW_PATH)],
            "tier name \"fast\" is used twice",
        ),
        (
            &[("fast", FAST, FAST_PATH), ("slow", SLOW, FAST_PATH)],
            "tiers fast and slow have the same data file /nvme/ds.fast",
        ),
        (
            &[("Fast", FAST, FAST_PATH), ("slow", SLOW, SLOW_PATH)],
            "tier name \"Fast\" is invalid",
        ),
    ];
    for (tiers, words) in cases {
        let (meta, fast, slow) = golden_with(header(tiers, EXTENTS));
        let m = machine(&meta, &fast, &slow);
        let e = m.open(true).expect_err(words);
        assert!(
            matches!(e, StoreError::Corrupt(ref s) if s.contains("header tier table") && s.contains(words)),
            "{e}"
        );
        let report = check_on_tiers(
            Box::new(m.meta.clone()),
            vec![Box::new(m.fast.clone()), Box::new(m.slow.clone())],
            &[],
        )
        .expect("check");
        assert!(
            report.violations.len() == 1 && report.violations[0].contains(words),
            "{report}"
        );
    }
    // A version-2 checksum under a version-4 header does not make a valid slot: the store has
    // no valid slot then.
    let (mut meta, fast, slow) = golden();
    let p = slot_payload(&meta, SLOT_A);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&u32le(2)), &meta[SLOT_A..SLOT_A + 12]),
        &p,
    );
    meta[SLOT_A + 12..SLOT_A + 16].copy_from_slice(&u32le(crc));
    let e = machine(&meta, &fast, &slow)
        .open(true)
        .expect_err("v2 slot");
    assert!(
        matches!(e, StoreError::Corrupt(ref s) if s.contains("neither metadata slot is valid")),
        "{e}"
    );
}

#[test]
fn a_two_tier_store_over_simulated_files_keeps_what_was_synced_through_a_power_cut() {
    let power = Power::new();
    let (meta, fast, slow) = (
        SimFile::new(power.clone()),
        SimFile::new(power.clone()),
        SimFile::new(power.clone()),
    );
    let s = Store::create_on_tiers(
        Box::new(meta.clone()),
        vec![
            ("fast".to_string(), Box::new(fast.clone()), 2),
            ("slow".to_string(), Box::new(slow.clone()), 3),
        ],
        EXTENT_SIZE,
    )
    .expect("create");
    let info = s.info();
    assert_eq!((info.format_version, info.extent_count), (5, 5));
    let paths: Vec<_> = info.tiers.iter().map(|t| t.path.clone()).collect();
    assert_eq!(
        paths,
        [
            std::path::Path::new("data.0"),
            std::path::Path::new("data.1")
        ]
    );
    assert_eq!(fast.live_bytes().len(), 2 * EXTENT_SIZE as usize + 4096);
    assert_eq!(slow.live_bytes().len(), 3 * EXTENT_SIZE as usize + 4096);
    assert!(fast.live_bytes()[2 * EXTENT_SIZE as usize..].starts_with(b"DOVETAILTIER"));

    let key = s.create_disk("vm", 1 << 20, "parallax-v2").expect("disk");
    let sp = s.space(key).expect("space");
    let hot = sp.grant_extent_on(0).expect("fast");
    let cold = sp.grant_extent_on(1).expect("slow");
    assert_eq!((hot, cold), (ExtentId(0), ExtentId(2)));
    sp.write(hot, 0, b"hot data").expect("write");
    sp.write(cold, 4096, b"cold data").expect("write");
    sp.sync().expect("sync");
    sp.commit_root(b"root").expect("commit");
    sp.write(hot, 0, b"HOT DATA").expect("unsynced write");
    sp.write(cold, 4096, b"COLD DATA").expect("unsynced write");
    power.cut();
    drop((sp, s));

    let after = Power::new();
    let s = Store::open_on_tiers(
        Box::new(meta.after_crash(after.clone(), Torn::KeepNone)),
        vec![
            Box::new(fast.after_crash(after.clone(), Torn::KeepNone)),
            Box::new(slow.after_crash(after, Torn::KeepNone)),
        ],
    )
    .expect("reopen after the cut");
    let sp = s.space(key).expect("space");
    assert_eq!(sp.root(), b"root");
    assert_eq!(sp.extents(), vec![hot, cold]);
    let mut b = [0u8; 9];
    sp.read(hot, 0, &mut b[..8]).expect("read");
    assert_eq!(&b[..8], b"hot data");
    sp.read(cold, 4096, &mut b).expect("read");
    assert_eq!(&b, b"cold data");
    let names: Vec<_> = s.tiers().into_iter().map(|t| (t.name, t.free)).collect();
    assert_eq!(names, [("fast".to_string(), 1), ("slow".to_string(), 2)]);
}
