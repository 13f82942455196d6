//! Grants ahead of need: a disk with its reserve running has the next extent granted by the
//! reserve thread before a request needs it, and uses it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_layout::{BlockLayout, Parallax, Sector, Sectors};
use dovetail_store::VersionSpace;

/// Extents of 64 blocks: the reserve grants once fewer than 64 are free.
const EXTENT: u64 = 256 << 10;

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run(layout: &str) {
    let (_pool, space) = common::mem_space(EXTENT, 1 << 12);
    let disk = Parallax::create_layout(
        space.clone(),
        layout,
        Sectors(16 << 11), // 16 MiB
        common::v2_options(),
    )
    .expect("create");
    disk.start_reserve().expect("start the reserve");
    let block = vec![0x5a; 4096];
    let mut next = 0u64;
    // Write into the first data extent until it runs low (52 of its 64 blocks), then stop.
    while next < 52 {
        disk.write(Sector(next * 8), &block).expect("write");
        next += 1;
    }
    // With no request running, the reserve grants the next extent(s).
    // With no request running, the reserve grants the next extent(s): parallax-v1 adds them
    // to its free space, parallax-v2 keeps them spare for its next groups.
    if layout == "parallax-v1" {
        wait_for("a grant ahead of need", || disk.usage().free >= 16);
    } else {
        wait_for("a spare extent", || {
            space.extents().len() as u64 > disk.usage().extents as u64
        });
    }
    let reserved = space.extents().len();
    // The requests that follow use what the reserve granted.
    for _ in 0..32 {
        disk.write(Sector(next * 8), &block).expect("write");
        next += 1;
    }
    assert!(space.extents().len() >= reserved);
    disk.flush().expect("flush");
    common::assert_clean(&disk, layout);
    let mut buf = vec![0u8; 4096];
    disk.read(Sector((next - 1) * 8), &mut buf).expect("read");
    assert_eq!(buf, block);
    // After a crash, whatever the reserve granted is free space again, or a spare extent.
    let (_, reopened) = common::crash_and_reopen(&space);
    common::assert_clean(&reopened, "reopened");
    drop(Arc::new(reopened));
}

#[test]
fn parallax_v1_grants_ahead_of_need() {
    run("parallax-v1");
}

#[test]
fn parallax_v2_keeps_spare_extents_ahead_of_need() {
    run("parallax-v2");
}
