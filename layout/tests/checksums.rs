//! parallax-v2 data checksums: a destroyed data block is an error on every read path (never
//! zeros or other wrong data) and `check_data` names it; a bad copy is replaced by a good one
//! and repaired; snapshots keep their own checksums; a partial write never launders a damaged
//! block; a disk written in the old format (extension version 2, no checksums) is read and
//! upgraded.

mod common;

use std::sync::Arc;

use common::*;
use dovetail_layout::parallax::format::{
    make_ptr, Class as FClass, Group, Node, RootRecord, Tiering, V2Ext, BLOCK_SIZE,
};
use dovetail_layout::parallax::{Class, Parallax, ParallaxOptions, TierPolicy};
use dovetail_layout::{BlockLayout, Error, IoBuf, IoBufs, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{VersionKey, VersionSpace};

const CAP: Sectors = Sectors(2048 * 4); // 4 MiB, 1024 blocks
const EXTENT: u64 = 256 << 10; // 64 blocks

fn opts() -> ParallaxOptions {
    ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    }
}

fn v2(pool: Arc<MemPool>) -> (Arc<MemSpace>, Parallax) {
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), EXTENT));
    let d = Parallax::create_layout(space.clone(), "parallax-v2", CAP, opts()).expect("create");
    (space, d)
}

fn reopen(space: &MemSpace) -> (Arc<MemSpace>, Parallax) {
    let crashed = Arc::new(space.crash());
    let d = Parallax::open_with(crashed.clone(), opts()).expect("reopen");
    (crashed, d)
}

/// Overwrites every extent holding guest data (the data groups' members) with `byte`.
fn destroy_data(d: &Parallax, space: &MemSpace, byte: u8, only_primary: bool) {
    let junk = vec![byte; EXTENT as usize];
    for g in d.extent_groups() {
        if g.class == Class::Meta {
            continue;
        }
        let members = if only_primary {
            &g.members[..1]
        } else {
            &g.members[..]
        };
        for &e in members {
            space.write(e, 0, &junk).expect("overwrite the extent");
        }
    }
    space.sync().expect("sync the damage");
}

fn is_checksum_error(e: &Error, block: u64) -> bool {
    let s = dovetail_layout::error_chain(e);
    s.contains(&format!("data block {block} ")) && s.contains("fails its checksum")
}

/// Reads through `read_into` (the zero-copy path the backend uses) into `out`.
fn read_into(d: &Parallax, at: Sector, out: &mut [u8]) -> dovetail_layout::Result<()> {
    // Two pieces, so that blocks straddle them.
    let (a, b) = out.split_at_mut(out.len() / 2 + 512);
    let bufs = [
        IoBuf {
            ptr: a.as_mut_ptr(),
            len: a.len(),
        },
        IoBuf {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        },
    ];
    // SAFETY: both buffers are ours, valid and unaliased for the whole call.
    let bufs = unsafe { IoBufs::new(&bufs) };
    d.read_into(at, bufs, &mut Vec::new())
}

#[test]
fn destroyed_data_is_an_error_on_every_read_path_never_zeros() {
    let (space, d) = v2(MemPool::new(256));
    assert!(d.has_data_checksums());
    let data = pattern(7, 64 * BLOCK_SIZE);
    d.write(Sector(0), &data).expect("write");
    d.flush().expect("flush");
    let mut back = vec![0u8; data.len()];
    read_into(&d, Sector(0), &mut back).expect("intact data reads");
    assert_eq!(back, data);
    assert!(d.check_data().is_empty(), "{:?}", d.check_data());

    destroy_data(&d, &space, 0, false);
    let (_space, d) = reopen(&space);
    let mut buf = vec![0u8; 2 * BLOCK_SIZE];
    let e = d
        .read(Sector(8 * 3), &mut buf)
        .expect_err("a destroyed block");
    assert!(
        is_checksum_error(&e, 3),
        "{}",
        dovetail_layout::error_chain(&e)
    );
    let e = read_into(&d, Sector(8 * 5), &mut buf).expect_err("zero-copy path");
    assert!(
        is_checksum_error(&e, 5),
        "{}",
        dovetail_layout::error_chain(&e)
    );
    // A partial read needs the whole block to verify it: an error too.
    let e = d
        .read(Sector(8 * 9 + 1), &mut buf[..512])
        .expect_err("partial");
    assert!(
        is_checksum_error(&e, 9),
        "{}",
        dovetail_layout::error_chain(&e)
    );
    // A partial write does not launder the damage into a block with a fresh checksum.
    d.write(Sector(8 * 11 + 2), &[1u8; 512])
        .expect_err("read-modify-write of a destroyed block");
    let problems = d.check_data();
    assert_eq!(problems.len(), 64, "{problems:?}");
    assert!(
        problems[0].contains("the live tree: block 0 ")
            && problems[0].contains("fails its data checksum"),
        "{problems:?}"
    );
    // Whole-block writes replace the data: then it reads back again.
    d.write(Sector(0), &data[..BLOCK_SIZE]).expect("rewrite");
    d.read(Sector(0), &mut buf[..BLOCK_SIZE])
        .expect("rewritten block");
    assert_eq!(&buf[..BLOCK_SIZE], &data[..BLOCK_SIZE]);
}

#[test]
fn a_bad_copy_is_replaced_by_a_good_one_and_repaired() {
    let pool = MemPool::with_tiers(&[("fast", 64), ("slow", 64)]);
    let (space, d) = v2(pool);
    let mut p = TierPolicy::defaults(2);
    p.classes[Class::Hot as usize].copies = 2;
    d.set_tier_policy(p).expect("two copies of hot data");
    let data = pattern(9, 16 * BLOCK_SIZE);
    d.write(Sector(0), &data).expect("write");
    d.flush().expect("flush");
    destroy_data(&d, &space, 0x5a, true);
    let (space, d) = reopen(&space);
    let mut back = vec![0u8; data.len()];
    read_into(&d, Sector(0), &mut back).expect("the second copy is good");
    assert_eq!(back, data);
    d.read(Sector(0), &mut back).expect("again");
    assert_eq!(back, data);
    assert!(d.tier_status().expect("v2").repairs >= 16);
    assert!(d.check_data().is_empty(), "{:?}", d.check_data());
    // Both copies gone: an error, not the junk.
    destroy_data(&d, &space, 0x5a, false);
    let (_space, d) = reopen(&space);
    let e = d.read(Sector(0), &mut back).expect_err("no good copy");
    assert!(
        is_checksum_error(&e, 0),
        "{}",
        dovetail_layout::error_chain(&e)
    );
    assert_eq!(d.check_data().len(), 32, "every copy named");
}

#[test]
fn snapshots_keep_their_own_checksums() {
    let (space, d) = v2(MemPool::new(256));
    let old = pattern(1, 8 * BLOCK_SIZE);
    let new = pattern(2, 8 * BLOCK_SIZE);
    d.write(Sector(0), &old).expect("write");
    d.snapshot("s").expect("snapshot");
    d.write(Sector(0), &new).expect("overwrite");
    d.flush().expect("flush");
    let (space, d) = {
        drop(d);
        reopen(&space)
    };
    let snap = d.open_snapshot("s").expect("open snapshot");
    let mut buf = vec![0u8; old.len()];
    snap.read(Sector(0), &mut buf).expect("snapshot reads");
    assert_eq!(buf, old);
    d.read(Sector(0), &mut buf).expect("live reads");
    assert_eq!(buf, new);
    assert!(d.check_data().is_empty(), "{:?}", d.check_data());
    destroy_data(&d, &space, 0, false);
    let (_space, d) = reopen(&space);
    let snap = d.open_snapshot("s").expect("open snapshot");
    let e = snap
        .read(Sector(0), &mut buf)
        .expect_err("destroyed snapshot block");
    assert!(
        is_checksum_error(&e, 0),
        "{}",
        dovetail_layout::error_chain(&e)
    );
    let problems = d.check_data();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("snapshot \"s\": block 7 ")),
        "{problems:?}"
    );
    assert_eq!(
        problems.len(),
        16,
        "8 live and 8 snapshot blocks: {problems:?}"
    );
}

/// A parallax-v2 disk of extension version 2 (before data checksums), built byte by byte as
/// an older binary wrote it: one data block, one leaf node, one hot group.
#[test]
fn a_disk_of_the_old_format_is_read_and_upgraded() {
    let pool = MemPool::new(64);
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), EXTENT));
    let guest = Sectors(2048); // 1 MiB: 256 blocks, 2 annotation pages, depth 1
    let e = space.grant_extent().expect("grant");
    let data = pattern(3, BLOCK_SIZE);
    space.write(e, 0, &data).expect("data block");
    let leaf_at = make_ptr(e, 63);
    let mut leaf = Node::empty(1, 1);
    leaf.entries[0] = make_ptr(e, 0);
    let mut buf = [0u8; BLOCK_SIZE];
    leaf.encode(leaf_at, &mut buf);
    space.write(e, 63 * BLOCK_SIZE as u64, &buf).expect("leaf");
    space.sync().expect("sync");
    let record = RootRecord {
        capacity: Sectors(258 * 8),
        depth: 1,
        root: leaf_at,
        gen: 1,
        snapshots: Vec::new(),
        v2: Some(V2Ext {
            guest_capacity: guest,
            epoch_base: 1_700_000_000,
            epoch_secs: 600,
            active: 0,
            labels: Vec::new(),
            tiering: Some(Tiering {
                policy: TierPolicy::defaults(1),
                groups: vec![Group {
                    class: FClass::Hot,
                    compressed: false,
                    members: vec![e],
                }],
            }),
            sums: false,
        }),
    };
    let bytes = record.encode();
    space.commit_root(&bytes).expect("commit the old record");
    assert_eq!(
        RootRecord::decode(&space.root())
            .expect("decode")
            .v2
            .map(|v| v.sums),
        Some(false)
    );

    let d = Parallax::open_with(space.clone(), opts()).expect("the new binary opens it");
    assert!(d.has_data_checksums(), "upgraded in memory");
    let mut back = vec![0u8; BLOCK_SIZE];
    d.read(Sector(0), &mut back).expect("old block reads");
    assert_eq!(back, data);
    assert!(d.check().is_empty(), "{:?}", d.check());
    assert!(d.check_data().is_empty(), "old blocks have no checksum yet");
    let fresh = pattern(4, BLOCK_SIZE);
    d.write(Sector(8), &fresh).expect("write");
    d.flush().expect("flush");
    let after = RootRecord::decode(&space.root()).expect("decode");
    assert_eq!(
        after.v2.as_ref().map(|v| v.sums),
        Some(true),
        "extension 3 now"
    );
    assert_eq!(after.capacity, Sectors(259 * 8), "one checksum page more");
    drop(d);
    let (_s, d) = reopen(&space);
    d.read(Sector(0), &mut back).expect("old block");
    assert_eq!(back, data);
    d.read(Sector(8), &mut back).expect("new block");
    assert_eq!(back, fresh);
    assert!(d.check().is_empty(), "{:?}", d.check());
    assert!(d.check_data().is_empty(), "{:?}", d.check_data());
}
