//! A voting Tee's members in the catalog (format version 7): the upgrade from format 5,
//! adding, changing, removing and promoting members, each surviving a reopen; a corrupt member
//! count refused by name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dovetail_store::format::{Meta, MAX_EXTRA_MEMBERS, MEMBERS_VERSION};
use dovetail_store::le::{le_u32, le_u64};
use dovetail_store::{check, MemberState, Store, StoreError, TeeRec, TeeState, META_FILE};

const EXT: u64 = 64 << 10;

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let p = t.path().join("store");
    (t, p)
}

fn tee() -> TeeRec {
    TeeRec {
        policy: "sync-read-checks".into(),
        faults: Vec::new(),
        state: TeeState::Active,
        reason: String::new(),
        changed: 1,
    }
}

/// A format-5 store with disk vm1 teed to one candidate, upgraded to format 7.
fn teed(dir: &Path) -> Arc<Store> {
    let s = Store::create(dir, 32 * EXT, EXT).expect("create");
    assert_eq!(s.info().format_version, 5);
    s.create_disk("vm1", 16 * EXT, "parallax-v1").expect("disk");
    s.add_version("vm1", "parallax-v1").expect("candidate");
    s.set_tee("vm1", tee()).expect("tee");
    // Format 5 records no third member, and says how to get one.
    let e = s.add_member("vm1", "parallax-v2").expect_err("format 5");
    assert!(e.to_string().contains("store upgrade --voting"), "{e}");
    let s = s.enable_members().expect("upgrade");
    assert_eq!(s.info().format_version, MEMBERS_VERSION);
    s
}

#[test]
fn members_are_committed_and_survive_a_reopen() {
    let (_t, dir) = tempdir();
    let s = teed(&dir);
    let a = s.add_member("vm1", "parallax-v2").expect("member a");
    let b = s.add_member("vm1", "parallax-v1").expect("member b");
    s.set_member_state("vm1", a, MemberState::Voting)
        .expect("voting");
    s.space(b).expect("space").grant_extent().expect("grant");
    drop(s);
    let s = Store::open(&dir).expect("reopen");
    assert_eq!(s.info().format_version, MEMBERS_VERSION);
    let m = s.members("vm1").expect("members");
    assert_eq!(
        m.iter().map(|m| (m.key, m.state)).collect::<Vec<_>>(),
        vec![(a.0, MemberState::Voting), (b.0, MemberState::Filling)]
    );
    assert_eq!(s.version(a).expect("a").layout, "parallax-v2");
    assert_eq!(s.version(b).expect("b").extents.len(), 1);
    // Five members at most.
    s.add_member("vm1", "parallax-v1").expect("member c");
    assert_eq!(s.members("vm1").expect("members").len(), MAX_EXTRA_MEMBERS);
    let e = s.add_member("vm1", "parallax-v1").expect_err("sixth");
    assert!(e.to_string().contains("the most a tee takes"), "{e}");
    // Removing b frees its extent; the store checks clean.
    let free = s.info().free_extents;
    s.remove_member("vm1", b).expect("remove b");
    assert_eq!(s.info().free_extents, free + 1);
    assert!(s.version(b).is_err());
    drop(s);
    let report = check(&dir).expect("check");
    assert!(report.is_ok(), "{report}");
}

#[test]
fn removing_the_candidate_moves_the_next_member_up_and_promote_swaps_roles() {
    let (_t, dir) = tempdir();
    let s = teed(&dir);
    let info = s.disk("vm1").expect("disk");
    let (trusted, cand) = (info.trusted, info.candidate.expect("candidate"));
    let a = s.add_member("vm1", "parallax-v2").expect("a");
    let b = s.add_member("vm1", "parallax-v1").expect("b");
    s.set_member_state("vm1", a, MemberState::Quarantined)
        .expect("quarantine a");
    // A quarantined member stays quarantined.
    s.set_member_state("vm1", a, MemberState::Voting)
        .expect("no-op");
    s.remove_member("vm1", cand).expect("remove the candidate");
    let info = s.disk("vm1").expect("disk");
    assert_eq!(info.candidate, Some(a));
    assert_eq!(
        info.tee.as_ref().map(|t| t.state),
        Some(TeeState::Quarantined)
    );
    assert_eq!(
        s.members("vm1")
            .expect("m")
            .iter()
            .map(|m| m.key)
            .collect::<Vec<_>>(),
        vec![b.0]
    );
    let e = s.remove_member("vm1", trusted).expect_err("trusted");
    assert!(e.to_string().contains("promote another member"), "{e}");
    // The two-member promote refuses while members follow the candidate.
    assert!(s.promote("vm1").is_err());
    s.promote_member("vm1", b).expect("promote b");
    drop(s);
    let s = Store::open(&dir).expect("reopen");
    let info = s.disk("vm1").expect("disk");
    assert_eq!(info.trusted, b);
    assert_eq!(info.candidate, Some(a));
    let m = s.members("vm1").expect("m");
    assert_eq!((m[0].key, m[0].state), (trusted.0, MemberState::Voting));
    // Untee drops every member.
    s.drop_candidate("vm1").expect("untee");
    assert!(s.members("vm1").expect("m").is_empty());
    assert!(s.version(trusted).is_err() && s.version(a).is_err());
    drop(s);
    let report = check(&dir).expect("check");
    assert!(report.is_ok(), "{report}");
}

/// The newest valid slot (format 7: the checksum covers the version first): its offset,
/// payload length and generation.
fn newest_slot(meta: &[u8]) -> (usize, usize) {
    let slot_size = le_u64(meta, 56) as usize;
    let mut best: Option<(usize, usize, u64)> = None;
    for i in 0..2 {
        let off = 4096 + i * slot_size;
        let generation = le_u64(meta, off);
        let len = le_u32(meta, off + 8) as usize;
        if generation == 0 || len > slot_size - 16 {
            continue;
        }
        let crc = crc32c::crc32c_append(
            crc32c::crc32c_append(
                crc32c::crc32c(&MEMBERS_VERSION.to_le_bytes()),
                &meta[off..off + 12],
            ),
            &meta[off + 16..off + 16 + len],
        );
        if crc == le_u32(meta, off + 12) && best.is_none_or(|(_, _, g)| generation > g) {
            best = Some((off, len, generation));
        }
    }
    let (off, len, _) = best.expect("a valid slot");
    (off, len)
}

#[test]
fn a_corrupt_member_count_is_a_clear_error() {
    let (_t, dir) = tempdir();
    let s = teed(&dir);
    s.add_member("vm1", "parallax-v1").expect("member");
    drop(s);
    let meta = std::fs::read(dir.join(META_FILE)).expect("read");
    let (off, len) = newest_slot(&meta);
    let payload = &meta[off + 16..off + 16 + len];
    let (m, _) = Meta::decode(payload, MEMBERS_VERSION).expect("decode");
    assert_eq!(m.disks[0].members.len(), 1);
    // The member count is the byte before the last member record (17 bytes) of the last
    // disk, which ends the disks before the pool's bytes.
    let mut bad = m.encode_for(MEMBERS_VERSION).expect("encode");
    assert_eq!(bad, payload, "the payload re-encodes byte for byte");
    let count_at = (0..bad.len())
        .rev()
        .find(|&i| {
            bad[i] == 1
                && bad.get(i + 1..i + 9) == Some(&m.disks[0].members[0].key.to_le_bytes()[..])
        })
        .expect("the member count");
    bad[count_at] = 200;
    match Meta::decode(&bad, MEMBERS_VERSION) {
        Err(StoreError::Corrupt(msg)) => {
            assert!(msg.contains("200 tee members"), "{msg}")
        }
        other => panic!("expected a corrupt-payload error, got {other:?}"),
    }
    bad[count_at] = 1;
    bad[count_at + 9] = 7;
    match Meta::decode(&bad, MEMBERS_VERSION) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("state 7"), "{msg}"),
        other => panic!("expected a corrupt-payload error, got {other:?}"),
    }
    // An older format cannot hold the members.
    let e = m.encode_for(6).expect_err("format 6");
    assert!(e.to_string().contains("format version 7"), "{e}");
}

/// The bytes docs/format.md shows for a disk with one member after its candidate.
#[test]
fn a_member_list_is_the_bytes_the_format_shows() {
    use dovetail_store::format::{DiskRec, MemberRec, MemberState as S, VersionRec};
    let version = |key| VersionRec {
        key,
        disk: "vm1".into(),
        layout: "parallax-v1".into(),
        extents: Vec::new(),
        root: Vec::new(),
    };
    let mut m = Meta::empty(1);
    m.next_key = 10;
    m.versions = vec![version(1), version(2), version(9)];
    m.disks = vec![DiskRec {
        name: "vm1".into(),
        size: 4096,
        trusted: 1,
        candidate: 2,
        tee: Some(tee()),
        attach: None,
        members: vec![MemberRec {
            key: 9,
            state: S::Filling,
            changed: 1_700_000_000,
        }],
    }];
    let v6 = m.clone();
    let b7 = m.encode_for(MEMBERS_VERSION).expect("v7");
    let mut none = v6;
    none.disks[0].members.clear();
    let b7_empty = none
        .encode_for(MEMBERS_VERSION)
        .expect("v7 without members");
    // The member list replaces the empty list's count byte (0) at the same place, 17 bytes
    // longer.
    assert_eq!(b7.len(), b7_empty.len() + 17);
    let at = (0..b7_empty.len())
        .find(|&i| b7[i] != b7_empty[i])
        .expect("they differ");
    assert_eq!(b7_empty[at], 0);
    assert_eq!(
        &b7[at + 18..],
        &b7_empty[at + 1..],
        "the pool section follows"
    );
    assert_eq!(&b7[..at], &b7_empty[..at]);
    assert_eq!(
        &b7[at..at + 18],
        &[1, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0x00, 0xf1, 0x53, 0x65, 0, 0, 0, 0]
    );
    assert_eq!(Meta::decode(&b7, MEMBERS_VERSION).expect("decode").0, m);
}
