//! Free space in parallax-v1: superseded and discarded blocks are reused, so the version's
//! extents do not grow without bound; deleting a snapshot frees the blocks only it held.

mod common;

use common::{assert_clean, assert_disk_eq, crash_and_reopen, parallax, pattern};
use dovetail_layout::{BlockLayout, Sector, Sectors};

const CAPACITY: Sectors = Sectors(16384); // 8 MiB
const EXTENT: u64 = 256 << 10; // 64 blocks
const MIB: u64 = 2048; // sectors

#[test]
fn discarded_and_overwritten_blocks_are_reused() {
    let (_space, disk) = parallax(CAPACITY, EXTENT);
    // Write 1 MiB, discard it, flush, write again: a fixed working set.
    for round in 0..60u64 {
        let at = (round % 4) * MIB;
        disk.write(Sector(at), &pattern(round, (MIB * 512) as usize))
            .expect("write");
        disk.flush().expect("flush");
        disk.discard(Sector(at), Sectors(MIB)).expect("discard");
        disk.flush().expect("flush");
    }
    let usage = disk.usage();
    assert_eq!(usage.used, 0, "everything discarded: {usage:?}");
    // 1 MiB of data + its nodes, twice over at most (old and new copies around a commit).
    assert!(
        usage.extents <= 2 * (256 + 8) / 64 + 1,
        "extents grew: {usage:?}"
    );
    assert_clean(&disk, "after discard rounds");

    // Overwriting the same 1 MiB again and again, with and without flushes in between.
    let mut model = vec![0u8; (CAPACITY.0 * 512) as usize];
    for round in 0..60u64 {
        let data = pattern(1000 + round, (MIB * 512) as usize);
        disk.write(Sector(MIB), &data).expect("overwrite");
        model[(MIB * 512) as usize..(2 * MIB * 512) as usize].copy_from_slice(&data);
        if round % 3 == 0 {
            disk.flush().expect("flush");
        }
    }
    disk.flush().expect("flush");
    let after = disk.usage();
    assert!(
        after.extents <= usage.extents.max(2 * (256 + 8) / 64 + 1),
        "{after:?}"
    );
    // Committed: exactly the live data (blocks 256..512) and its nodes (a root and the two
    // leaves either side of block 508).
    assert_eq!(after.used, 256 + 3, "{after:?}");
    assert_disk_eq(&disk, &model, "after overwrites");
    assert_clean(&disk, "after overwrites");
}

#[test]
fn rewrites_within_one_epoch_happen_in_place() {
    let (_space, disk) = parallax(CAPACITY, EXTENT);
    disk.write(Sector(0), &pattern(1, (MIB * 512) as usize))
        .expect("write");
    let first = disk.usage().used;
    for round in 0..20u64 {
        disk.write(Sector(0), &pattern(2 + round, (MIB * 512) as usize))
            .expect("rewrite");
        disk.write(Sector(3), &pattern(100 + round, 512))
            .expect("sector rewrite");
    }
    assert_eq!(disk.usage().used, first, "no new blocks before a commit");
    disk.flush().expect("flush");
    disk.write(Sector(0), &pattern(50, (MIB * 512) as usize))
        .expect("write after commit");
    // Copy-on-write after a commit: new copies, the old ones pending until the next commit.
    assert_eq!(disk.usage().used, 2 * first, "{:?}", disk.usage());
    assert_eq!(disk.usage().pending, first);
    disk.flush().expect("flush");
    assert_eq!(disk.usage().used, first);
    assert_clean(&disk, "in-place rewrites");
}

#[test]
fn deleting_a_snapshot_frees_its_blocks_for_reuse() {
    let (space, disk) = parallax(CAPACITY, EXTENT);
    let mut model = vec![0u8; (CAPACITY.0 * 512) as usize];
    let v1 = pattern(1, (2 * MIB * 512) as usize);
    disk.write(Sector(0), &v1).expect("write");
    model[..v1.len()].copy_from_slice(&v1);
    disk.snapshot("before").expect("snapshot");
    let snapshot_model = model.clone();
    let base = disk.usage().used;
    // Blocks 0..512 and their nodes: a root and two leaves.
    assert_eq!(base, 512 + 3, "{:?}", disk.usage());

    let v2 = pattern(2, (2 * MIB * 512) as usize);
    disk.write(Sector(0), &v2).expect("overwrite");
    model[..v2.len()].copy_from_slice(&v2);
    disk.flush().expect("flush");
    // The snapshot keeps the old copies: nothing was freed by the commit.
    assert_eq!(disk.usage().used, 2 * base, "{:?}", disk.usage());
    let view = disk.open_snapshot("before").expect("open snapshot");
    assert_disk_eq(&view, &snapshot_model, "snapshot after overwrite");
    assert_disk_eq(&disk, &model, "live after overwrite");
    assert_clean(&disk, "with snapshot");

    // Discarding the live copy frees it (born after the snapshot); the snapshot's stay.
    disk.discard(Sector(0), Sectors(MIB)).expect("discard");
    model[..(MIB * 512) as usize].fill(0);
    disk.flush().expect("flush");
    assert_eq!(disk.usage().used, 2 * base - 256, "{:?}", disk.usage());
    assert_disk_eq(&view, &snapshot_model, "snapshot after discard");
    assert_clean(&disk, "after discard");

    let extents = disk.usage().extents;
    disk.delete_snapshot("before").expect("delete");
    assert_eq!(disk.usage().used, base - 256, "{:?}", disk.usage());
    assert!(disk.snapshots().is_empty());
    assert_clean(&disk, "after deleting the snapshot");

    // The freed space is reused: writing the same amount again grants no extent.
    let v3 = pattern(3, (2 * MIB * 512) as usize);
    disk.write(Sector(2 * MIB), &v3)
        .expect("write into freed space");
    model[(2 * MIB * 512) as usize..(4 * MIB * 512) as usize].copy_from_slice(&v3);
    disk.flush().expect("flush");
    assert_eq!(disk.usage().extents, extents, "{:?}", disk.usage());
    assert_disk_eq(&disk, &model, "after reuse");
    assert_clean(&disk, "after reuse");

    // And the accounting survives a crash and the sweep at open.
    let used = disk.usage().used;
    let (_c, reopened) = crash_and_reopen(&space);
    assert_eq!(reopened.usage().used, used);
    assert_disk_eq(&reopened, &model, "reopened");
    assert_clean(&reopened, "reopened");
}
