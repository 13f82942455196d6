//! Growing a served parallax disk in place (`Parallax::prepare_grow`, `grow_prepared`,
//! `finish_grow`): what the disk took between the preparation and the pause (writes, and
//! commits that took the annotation and checksum pages' dirty marks) is in the grown disk; a
//! power cut before the grow's commit leaves the old disk with everything committed before the
//! pause; a FLUSH before `finish_grow` ends commits the grown shape with all its pages; after
//! `finish_grow` the grown disk is durable, checks clean and its data checksums verify.

mod common;

use common::{assert_clean, assert_disk_eq, crash_and_reopen, pattern, read_all, v2_options};
use dovetail_layout::{BlockLayout, Parallax, Sector, Sectors};

/// 300 blocks; grown to 2000 (a new tree level) or 400 (the same depth).
const FROM: Sectors = Sectors(300 * 8);

fn write_block(disk: &Parallax, model: &mut [u8], block: u64, seed: u64) {
    let data = pattern(seed, 4096);
    disk.write(Sector(block * 8), &data).expect("write");
    model[(block * 4096) as usize..((block + 1) * 4096) as usize].copy_from_slice(&data);
}

/// Block `b`'s annotation write count (parallax-v2), or 0.
fn writes(disk: &Parallax, b: u64) -> u64 {
    disk.annotations().map_or(0, |t| u64::from(t.get(b).writes))
}

fn grow_live(layout: &str, to: Sectors) {
    let what = format!("{layout} grown live to {to}");
    let (space, disk) = if layout == "parallax-v2" {
        common::parallax_v2(FROM, 1 << 20)
    } else {
        common::parallax(FROM, 1 << 20)
    };
    let mut model = vec![0u8; (FROM.0 * 512) as usize];
    for b in (0..300).step_by(7) {
        write_block(&disk, &mut model, b, b);
    }
    disk.flush().expect("flush");
    let plan = disk.prepare_grow(to).expect("prepare");
    assert_eq!(plan.capacity(), to);
    // While the tables are prepared the disk takes writes; a FLUSH's commit takes the dirty
    // marks of the pages they changed (the grow's watch must see them), and later writes stay
    // dirty until the pause.
    for b in [1, 2, 150, 299] {
        write_block(&disk, &mut model, b, 1000 + b);
    }
    disk.flush().expect("flush while preparing");
    for b in [3, 151, 298] {
        write_block(&disk, &mut model, b, 2000 + b);
    }
    let old_writes: Vec<u64> = (0..300).map(|b| writes(&disk, b)).collect();
    assert!(old_writes[298] > 0 || layout == "parallax-v1");
    let grown = disk
        .grow_prepared(plan, &v2_options())
        .expect("grow in the pause");
    assert_eq!(grown.capacity(), to, "{what}: capacity");
    let err = disk
        .write(Sector(0), &pattern(9, 4096))
        .and_then(|()| disk.flush())
        .expect_err("the old handle commits nothing more");
    assert!(err.to_string().contains("closed"), "{what}: {err}");
    model.resize((to.0 * 512) as usize, 0);
    assert_disk_eq(&grown, &model, &format!("{what}: before its commit"));
    for (b, &w) in old_writes.iter().enumerate() {
        assert_eq!(
            writes(&grown, b as u64),
            w,
            "{what}: block {b}'s annotation"
        );
    }
    // A power cut now: the old disk, with everything written before the pause.
    {
        let (_c, old) = crash_and_reopen(&space);
        assert_eq!(old.capacity(), FROM, "{what}: cut before the commit");
        assert_disk_eq(
            &old,
            &model[..(FROM.0 * 512) as usize],
            &format!("{what}: cut before the commit"),
        );
        assert_clean(&old, &format!("{what}: cut before the commit"));
    }
    // Requests run between the pause and the commit (the new blocks read as zeroes).
    write_block(&grown, &mut model, 300, 3000);
    grown.finish_grow().expect("finish");
    let last = to.0 / 8 - 1;
    write_block(&grown, &mut model, last, 4000);
    grown.flush().expect("flush");
    assert_clean(&grown, &what);
    let (_c, reopened) = crash_and_reopen(&space);
    assert_eq!(reopened.capacity(), to, "{what}: after a power cut");
    assert_disk_eq(&reopened, &model, &format!("{what}: after a power cut"));
    assert_clean(&reopened, &format!("{what}: after a power cut"));
    for (b, &w) in old_writes.iter().enumerate() {
        assert_eq!(
            writes(&reopened, b as u64),
            w,
            "{what}: block {b}'s annotation, durable"
        );
    }
    if layout == "parallax-v2" {
        assert!(
            reopened.check_data().is_empty(),
            "{what}: {:?}",
            reopened.check_data()
        );
        assert_eq!(writes(&reopened, last), 1, "{what}: the new last block's");
    }
}

#[test]
fn v1_grows_live_adding_a_level() {
    grow_live("parallax-v1", Sectors(2000 * 8));
}

#[test]
fn v2_grows_live_moving_its_pages() {
    grow_live("parallax-v2", Sectors(400 * 8));
}

#[test]
fn v2_grows_live_adding_a_level() {
    grow_live("parallax-v2", Sectors(2000 * 8));
}

/// A FLUSH between the pause and `finish_grow` commits the grown shape with every page: a
/// power cut right after it reopens the grown disk, annotations and checksums included.
#[test]
fn a_flush_before_the_pages_commits_them_all() {
    let (space, disk) = common::parallax_v2(FROM, 1 << 20);
    let mut model = vec![0u8; (FROM.0 * 512) as usize];
    for b in (0..300).step_by(3) {
        write_block(&disk, &mut model, b, b);
    }
    disk.flush().expect("flush");
    let to = Sectors(1000 * 8);
    let plan = disk.prepare_grow(to).expect("prepare");
    let grown = disk.grow_prepared(plan, &v2_options()).expect("grow");
    model.resize((to.0 * 512) as usize, 0);
    write_block(&grown, &mut model, 999, 77);
    grown.flush().expect("a guest FLUSH");
    let (_c, reopened) = crash_and_reopen(&space);
    assert_eq!(reopened.capacity(), to);
    assert_eq!(read_all(&reopened), model, "grown disk after the cut");
    assert_clean(&reopened, "flushed before finish_grow");
    assert!(reopened.check_data().is_empty());
    assert_eq!(writes(&reopened, 3), 1);
    grown.finish_grow().expect("finish after a flush");
    assert_clean(&grown, "finished");
}

/// What the reopening grow refuses is refused before anything changes.
#[test]
fn prepare_refuses_and_changes_nothing() {
    let (_space, disk) = common::parallax_v2(FROM, 1 << 20);
    let err = disk.prepare_grow(FROM).expect_err("same size");
    assert!(err.to_string().contains("not growing"), "{err}");
    let err = disk.prepare_grow(Sectors(u64::MAX)).expect_err("too large");
    assert!(err.to_string().contains("too large"), "{err}");
    disk.snapshot("s").expect("snapshot");
    let err = disk
        .prepare_grow(Sectors(400 * 8))
        .expect_err("snapshots keep the pages' places");
    assert!(err.to_string().contains("delete its snapshots"), "{err}");
    assert_eq!(disk.capacity(), FROM);
    disk.write(Sector(0), &pattern(1, 4096))
        .expect("still serves");
    disk.flush().expect("still commits");
}
