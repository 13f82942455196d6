//! parallax-v2's annotations: exact counts and access patterns for known workloads, their
//! persistence (exact across a clean reopen; after a crash, as of the last commit, which a FLUSH
//! or the timer makes), and taint labels (only blocks written while a label is on carry it,
//! including in snapshots and after copy-on-write).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovetail_annotations::Pattern;
use dovetail_layout::parallax::{Parallax, ParallaxOptions};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::VersionSpace;

const CAP: Sectors = Sectors(2048 * 4); // 4 MiB, 1024 blocks
const BLOCK: usize = 4096;

fn sector(block: u64) -> Sector {
    Sector(block * 8)
}

#[test]
fn known_workloads_give_exact_counts_and_patterns() {
    let (_space, d) = parallax_v2(CAP, 256 << 10);
    let t = d.annotations().expect("parallax-v2 keeps annotations");
    assert_eq!(t.blocks(), 1024);
    // Sequential: 64 KiB reads over the first 1 MiB (blocks 0..256), in order.
    let mut buf = vec![0u8; 64 << 10];
    for i in 0..16u64 {
        d.read(sector(i * 16), &mut buf).expect("read");
    }
    for b in 0..256 {
        let a = t.get(b);
        assert_eq!((a.reads, a.writes), (1, 0), "block {b}");
        assert!(a.last_read > 0, "block {b} has a last read epoch");
        let want = if b == 0 {
            Pattern::Random
        } else {
            Pattern::Sequential
        };
        assert_eq!(a.class(), want, "block {b}");
    }
    // Random: 4 KiB writes at scattered blocks of the second MiB, each three times.
    let blocks: Vec<u64> = (0..40u64).map(|i| 256 + (i * 97) % 256).collect();
    for round in 0..3 {
        for &b in &blocks {
            d.write(sector(b), &pattern(round * 1000 + b, BLOCK))
                .expect("write");
        }
    }
    for &b in &blocks {
        let a = t.get(b);
        assert_eq!((a.reads, a.writes), (0, 3), "block {b}");
        assert_eq!(a.class(), Pattern::Random, "block {b}");
        assert!(a.last_write > 0 && a.last_read == 0);
    }
    // A 512-byte write counts once for its block; untouched blocks have nothing.
    d.write(Sector(600 * 8 + 3), &[7u8; 512]).expect("write");
    assert_eq!(t.get(600).writes, 1);
    assert_eq!(t.get(601), Default::default());
    let totals = t.totals();
    assert_eq!(totals.reads, 256);
    assert_eq!(totals.writes, 40 * 3 + 1);
    // The hottest single blocks are the written ones.
    let top = t.top(5, 1);
    assert_eq!(top.len(), 5);
    assert!(top.iter().all(|r| r.writes == 3), "{top:?}");
}

#[test]
fn counts_persist_across_a_clean_reopen_and_lag_at_most_to_the_last_commit_after_a_crash() {
    let (space, d) = parallax_v2(CAP, 256 << 10);
    let t = d.annotations().expect("annotations");
    for b in 0..100u64 {
        d.write(sector(b), &pattern(b, BLOCK)).expect("write");
    }
    let mut buf = vec![0u8; BLOCK];
    for b in 0..50u64 {
        d.read(sector(b), &mut buf).expect("read");
    }
    d.flush().expect("flush");
    let at_flush: Vec<_> = (0..1024).map(|b| t.get(b)).collect();
    // Reopened at this point (nothing after the flush): exactly the same.
    let (_c, reopened) = crash_and_reopen(&space);
    let r = reopened.annotations().expect("annotations");
    for b in 0..1024u64 {
        assert_eq!(r.get(b), at_flush[b as usize], "block {b} after reopening");
    }
    assert_clean(&reopened, "reopened");
    // More I/O, no FLUSH, then a crash: the annotations are those of the last commit, not
    // garbage, not partly updated.
    for b in 0..100u64 {
        d.read(sector(b), &mut buf).expect("read");
    }
    d.write(sector(500), &pattern(500, BLOCK)).expect("write");
    let (_c, crashed) = crash_and_reopen(&space);
    let r = crashed.annotations().expect("annotations");
    for b in 0..1024u64 {
        assert_eq!(r.get(b), at_flush[b as usize], "block {b} after a crash");
    }
    // A FLUSH with only annotation changes commits them too.
    let mut buf = vec![0u8; BLOCK];
    d.read(sector(900), &mut buf).expect("read");
    d.flush().expect("flush");
    let (_c, again) = crash_and_reopen(&space);
    assert_eq!(again.annotations().expect("annotations").get(900).reads, 1);
    assert_eq!(again.annotations().expect("annotations").get(0).reads, 2);
}

#[test]
fn the_timer_commits_annotations_without_a_flush() {
    let (_pool, space) = mem_space(256 << 10, 1 << 12);
    let opts = ParallaxOptions {
        persist_every: Some(Duration::from_millis(50)),
        ..ParallaxOptions::default()
    };
    let d = Parallax::create_layout(space.clone(), "parallax-v2", CAP, opts).expect("create");
    d.flush().expect("first commit");
    let mut buf = vec![0u8; BLOCK];
    for b in 0..10u64 {
        d.read(sector(b), &mut buf).expect("read");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_c, crashed) = crash_and_reopen(&space);
        let r = crashed.annotations().expect("annotations");
        if (0..10).all(|b| r.get(b).reads == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the timer never committed the annotations"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn taint_marks_exactly_the_blocks_written_while_on_through_snapshots_and_cow() {
    let (space, d) = parallax_v2(CAP, 256 << 10);
    let t = d.annotations().expect("annotations");
    d.write(sector(1), &pattern(1, BLOCK)).expect("before");
    let label = d.set_taint("compromised", true).expect("taint on");
    assert_eq!((label.bit, label.active), (0, true));
    let bit = 1u16 << label.bit;
    for b in [10u64, 11, 12, 40] {
        d.write(sector(b), &pattern(b, BLOCK))
            .expect("write while on");
    }
    d.write_zeroes(sector(60), Sectors(16), false)
        .expect("zeroing is a write");
    // Reads do not taint.
    let mut buf = vec![0u8; BLOCK];
    d.read(sector(200), &mut buf).expect("read");
    d.set_taint("compromised", false).expect("taint off");
    d.write(sector(70), &pattern(70, BLOCK))
        .expect("write after off");
    let tainted = vec![(10, 13), (40, 41), (60, 62)];
    assert_eq!(t.ranges_with(bit), tainted);
    // A snapshot keeps them; overwriting a tainted block later (copy-on-write, label off) does
    // not clear its label in the live disk, and the snapshot still shows its own.
    d.snapshot("after-incident").expect("snapshot");
    d.write(sector(10), &pattern(99, BLOCK)).expect("overwrite");
    assert_eq!(t.ranges_with(bit), tainted);
    assert_eq!(t.get(10).writes, 2);
    let (snap, labels) = d.snapshot_annotations("after-incident").expect("snapshot");
    assert_eq!(snap.ranges_with(bit), tainted);
    assert_eq!(snap.get(10).writes, 1, "the snapshot froze the count");
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0].name, "compromised");
    // Labels and whether they are on are committed: they survive a crash.
    d.set_taint("second", true).expect("second label");
    let (_c, crashed) = crash_and_reopen(&space);
    let names: Vec<_> = crashed
        .labels()
        .into_iter()
        .map(|l| (l.name, l.bit, l.active))
        .collect();
    assert_eq!(
        names,
        vec![
            ("compromised".to_string(), 0, false),
            ("second".to_string(), 1, true)
        ]
    );
    let r = crashed.annotations().expect("annotations");
    assert_eq!(r.ranges_with(bit), tainted);
    crashed
        .write(sector(300), &pattern(300, BLOCK))
        .expect("write");
    assert_eq!(
        r.get(300).taint,
        0b10,
        "the active label stays on after a restart"
    );
    assert_clean(&crashed, "after taint");
    // Bad labels; turning off a label the disk does not have.
    assert!(d.set_taint("never-defined", false).is_err());
    assert!(d.set_taint("", true).is_err());
    assert!(d.set_taint("a b", true).is_err());
    for i in 2..16 {
        d.set_taint(&format!("l{i}"), true)
            .expect("up to 16 labels");
    }
    assert!(d.set_taint("one-too-many", true).is_err());
}

#[test]
fn parallax_v1_keeps_no_annotations_and_says_so() {
    let (_space, d) = parallax(CAP, 256 << 10);
    assert_eq!(d.layout(), "parallax-v1");
    assert!(d.annotations().is_none());
    let e = d.set_taint("x", true).expect_err("v1 has no taint");
    assert!(e.to_string().contains("parallax-v1"), "{e}");
}

#[test]
fn a_parallax_v2_disk_of_odd_size_reopens_with_its_own_layout() {
    let (space, d) = parallax_v2(Sectors(2048 + 3), 64 << 10);
    assert_eq!(d.layout(), "parallax-v2");
    assert_eq!(d.capacity(), Sectors(2048 + 3));
    d.write(Sector(2048), &[9u8; 512 * 3]).expect("tail");
    assert!(
        d.write(Sector(2048 + 3), &[0u8; 512]).is_err(),
        "guest capacity enforced"
    );
    d.flush().expect("flush");
    let dyn_space: Arc<dyn VersionSpace> = space.clone();
    let again = Parallax::open_with(dyn_space, v2_options()).expect("reopen");
    assert_eq!(
        (again.layout(), again.capacity()),
        ("parallax-v2", Sectors(2048 + 3))
    );
    assert_eq!(again.annotations().expect("annotations").get(256).writes, 1);
    assert_clean(&again, "odd size");
}
