//! Isolation and untrusted metadata: a write outside the version's grants is refused by the
//! store and changes nothing of the other version; corrupt metadata is a clear error at open or
//! read, never a panic and never a write elsewhere.

mod common;

use std::sync::Arc;

use common::{assert_clean, assert_disk_eq, pattern};
use dovetail_layout::parallax::format::{
    make_ptr, split_ptr, Node, RootRecord, BLOCK_SIZE, ENTRIES,
};
use dovetail_layout::{BlockLayout, Error, Parallax, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{StoreError, VersionKey, VersionSpace};

const CAPACITY: Sectors = Sectors(8192);
const EXTENT: u64 = 64 << 10;

struct Two {
    a: Arc<MemSpace>,
    b: Arc<MemSpace>,
    disk_a: Parallax,
    disk_b: Parallax,
    model_b: Vec<u8>,
}

fn two_versions() -> Two {
    let pool = MemPool::new(256);
    let a = Arc::new(MemSpace::new(pool.clone(), VersionKey(1), EXTENT));
    let b = Arc::new(MemSpace::new(pool, VersionKey(2), EXTENT));
    let disk_a = Parallax::create(a.clone(), CAPACITY).expect("create a");
    let disk_b = Parallax::create(b.clone(), CAPACITY).expect("create b");
    let mut model_b = vec![0u8; (CAPACITY.0 * 512) as usize];
    for i in 0..8u64 {
        let data = pattern(100 + i, 64 * 512);
        disk_a
            .write(Sector(i * 1000), &pattern(i, 64 * 512))
            .expect("write a");
        disk_b.write(Sector(i * 1000 + 3), &data).expect("write b");
        let s = ((i * 1000 + 3) * 512) as usize;
        model_b[s..s + data.len()].copy_from_slice(&data);
    }
    disk_a.flush().expect("flush a");
    disk_b.flush().expect("flush b");
    Two {
        a,
        b,
        disk_a,
        disk_b,
        model_b,
    }
}

/// Every byte of every extent of `space`.
fn extent_bytes(space: &MemSpace) -> Vec<u8> {
    let mut all = Vec::new();
    for e in space.extents() {
        let mut buf = vec![0u8; EXTENT as usize];
        space.read(e, 0, &mut buf).expect("read extent");
        all.extend_from_slice(&buf);
    }
    all
}

#[test]
fn a_write_outside_the_grants_is_refused_counted_and_changes_nothing() {
    let t = two_versions();
    let before = extent_bytes(&t.b);
    let foreign = t.b.extents()[0];
    assert!(!t.a.extents().contains(&foreign));
    // A layout bug simulated: version a writes through its space into b's extent.
    let err =
        t.a.write(foreign, 4096, &[0xee; 4096])
            .expect_err("not granted to a");
    assert!(
        matches!(err, StoreError::GrantViolation { key: VersionKey(1), extent, offset: 4096 } if extent == foreign),
        "{err}"
    );
    assert_eq!(t.a.grant_violations(), 1);
    assert_eq!(t.b.grant_violations(), 0);
    assert_eq!(extent_bytes(&t.b), before, "no byte of b changed");
    assert_disk_eq(&t.disk_b, &t.model_b, "b's disk");
    assert_clean(&t.disk_a, "a");
    assert_clean(&t.disk_b, "b");
}

/// Rewrites the node at `ptr` in `space` after `change`, with a valid checksum.
fn rewrite_node(space: &MemSpace, ptr: u64, level: u8, change: impl FnOnce(&mut Node)) {
    let (e, i) = split_ptr(ptr).expect("pointer");
    let mut buf = [0u8; BLOCK_SIZE];
    space
        .read(e, u64::from(i) * BLOCK_SIZE as u64, &mut buf)
        .expect("read node");
    let mut node = Node::decode(&buf, ptr, level, u64::MAX).expect("decode node");
    change(&mut node);
    node.encode(ptr, &mut buf);
    space
        .write(e, u64::from(i) * BLOCK_SIZE as u64, &buf)
        .expect("rewrite node");
    space.sync().expect("sync");
}

fn root_of(space: &MemSpace) -> RootRecord {
    RootRecord::decode(&space.root()).expect("root record")
}

fn expect_corrupt(r: dovetail_layout::Result<Parallax>, what: &str) -> String {
    match r {
        Err(Error::Corrupt(msg)) => msg,
        Err(e) => panic!("{what}: expected Corrupt, got {e}"),
        Ok(_) => panic!("{what}: opened"),
    }
}

#[test]
fn a_pointer_into_another_version_is_corruption_and_nothing_is_written_there() {
    let t = two_versions();
    let before = extent_bytes(&t.b);
    let rec = root_of(&t.a);
    assert_eq!(rec.depth, 2);
    let foreign = make_ptr(t.b.extents()[0], 1);
    rewrite_node(&t.a, rec.root, 2, |n| n.entries[0] = foreign);
    let msg = expect_corrupt(Parallax::open(t.a.clone()), "foreign pointer");
    assert!(msg.contains("outside the version's extents"), "{msg}");
    // The running instance has the node cached; a fresh read of it also refuses.
    drop(t.disk_a);
    assert_eq!(extent_bytes(&t.b), before);
    assert_eq!(
        t.a.grant_violations(),
        0,
        "nothing even tried to write there"
    );
    assert_disk_eq(&t.disk_b, &t.model_b, "b's disk");
}

#[test]
fn corrupt_nodes_and_root_records_are_clear_errors() {
    let t = two_versions();
    let rec = root_of(&t.a);
    let (e, i) = split_ptr(rec.root).expect("root pointer");
    let off = u64::from(i) * BLOCK_SIZE as u64;
    let mut good = [0u8; BLOCK_SIZE];
    t.a.read(e, off, &mut good).expect("read root node");

    type Damage = fn(&mut [u8; BLOCK_SIZE]);
    let cases: [(&str, Damage); 3] = [
        ("magic", |b| b[0] ^= 0xff),
        ("checksum", |b| b[100] ^= 1),
        ("zeroed", |b| b.fill(0)),
    ];
    for (what, damage) in cases {
        let mut bad = good;
        damage(&mut bad);
        t.a.write(e, off, &bad).expect("damage");
        t.a.sync().expect("sync");
        let msg = expect_corrupt(Parallax::open(t.a.clone()), what);
        assert!(msg.contains("node at"), "{what}: {msg}");
    }
    t.a.write(e, off, &good).expect("repair");
    t.a.sync().expect("sync");
    Parallax::open(t.a.clone()).expect("repaired");

    // Wrong level, generation from the future, misplaced node, entry past the disk's end.
    let (level1, second) = {
        let mut buf = [0u8; BLOCK_SIZE];
        t.a.read(e, off, &mut buf).expect("read");
        let n = Node::decode(&buf, rec.root, 2, u64::MAX).expect("node");
        (n.entries[0], n.entries[1])
    };
    rewrite_node(&t.a, rec.root, 2, |n| n.level = 1);
    let msg = expect_corrupt(Parallax::open(t.a.clone()), "level");
    assert!(msg.contains("level"), "{msg}");
    rewrite_node(&t.a, rec.root, 1, |n| {
        n.level = 2;
        n.gen = rec.gen + 5;
    });
    let msg = expect_corrupt(Parallax::open(t.a.clone()), "generation");
    assert!(msg.contains("generation"), "{msg}");
    rewrite_node(&t.a, rec.root, 2, |n| n.gen = rec.gen);
    rewrite_node(&t.a, rec.root, 2, |n| n.entries[ENTRIES - 1] = level1);
    let msg = expect_corrupt(Parallax::open(t.a.clone()), "past the end");
    assert!(msg.contains("past the end"), "{msg}");
    rewrite_node(&t.a, rec.root, 2, |n| n.entries[ENTRIES - 1] = 0);
    rewrite_node(&t.a, rec.root, 2, |n| n.entries[1] = level1);
    let msg = expect_corrupt(Parallax::open(t.a.clone()), "shared within a tree");
    assert!(msg.contains("referenced twice"), "{msg}");
    rewrite_node(&t.a, rec.root, 2, |n| n.entries[1] = second);
    // The disk has 1024 blocks: entries 0..=2 of the root are in range, 2 is unused.
    rewrite_node(&t.a, rec.root, 2, |n| n.entries[2] = 12345);
    let msg = expect_corrupt(Parallax::open(t.a.clone()), "malformed pointer");
    assert!(msg.contains("outside"), "{msg}");
    rewrite_node(&t.a, rec.root, 2, |n| n.entries[2] = 0);
    Parallax::open(t.a.clone()).expect("repaired again");

    // Root records.
    let good_root = t.a.root();
    for (i, what) in [
        (0usize, "magic"),
        (9, "version"),
        (20, "capacity"),
        (24, "depth"),
    ] {
        let mut bad = good_root.clone();
        bad[i] ^= 0x11;
        t.a.commit_root(&bad).expect("commit damaged root");
        let msg = expect_corrupt(Parallax::open(t.a.clone()), what);
        assert!(msg.contains("root record"), "{what}: {msg}");
    }
    t.a.commit_root(&good_root[..30]).expect("commit truncated");
    expect_corrupt(Parallax::open(t.a.clone()), "truncated");
    t.a.commit_root(&good_root).expect("restore");
    let mut rec2 = root_of(&t.a);
    rec2.root = make_ptr(t.b.extents()[0], 0);
    t.a.commit_root(&rec2.encode())
        .expect("commit foreign root");
    let msg = expect_corrupt(Parallax::open(t.a.clone()), "foreign root");
    assert!(msg.contains("outside"), "{msg}");
    t.a.commit_root(&good_root).expect("restore");
    let disk = Parallax::open(t.a.clone()).expect("restored");
    assert_clean(&disk, "restored");
    assert!(matches!(
        Parallax::create(t.a.clone(), CAPACITY),
        Err(Error::InvalidArgument(_))
    ));
}
