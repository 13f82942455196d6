//! parallax-v2 releases the host space of the long runs a commit frees after the commit, on a
//! thread of its own (off the FLUSH's path): the space is released, and no block written
//! meanwhile is ever punched (every byte reads back), after a reopen too.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use dovetail_layout::parallax::{Parallax, ParallaxOptions};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::{Store, VersionSpace};

const EXTENT: u64 = 1 << 20;
const BLOCK: usize = 4096;
const DISK: u64 = 16 << 20;

fn block_of(round: u64, b: u64) -> Vec<u8> {
    format!("round {round} block {b:06}; ")
        .bytes()
        .cycle()
        .take(BLOCK)
        .collect()
}

/// Allocated bytes of a file on the host (`st_blocks` is in 512-byte units).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

fn opts() -> ParallaxOptions {
    ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    }
}

fn open(store: &Arc<Store>) -> Parallax {
    let key = store.disk("d").expect("disk").trusted;
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    Parallax::open_with(space, opts()).expect("open disk")
}

fn write_range(d: &Parallax, round: u64, blocks: std::ops::Range<u64>) {
    for b in blocks {
        d.write(Sector(b * 8), &block_of(round, b)).expect("write");
    }
}

fn assert_range(d: &Parallax, round: u64, blocks: std::ops::Range<u64>) {
    let mut buf = vec![0u8; BLOCK];
    for b in blocks {
        d.read(Sector(b * 8), &mut buf).expect("read");
        assert!(buf == block_of(round, b), "block {b} of round {round}");
    }
}

#[test]
fn freed_runs_are_punched_after_the_commit_and_never_under_new_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let store = Store::create(&dir, 96 << 20, EXTENT).expect("create");
    let key = store
        .create_disk("d", DISK, "parallax-v2")
        .expect("create disk");
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    let d = Parallax::create_layout(space, "parallax-v2", Sectors(DISK / 512), opts())
        .expect("create parallax-v2");
    let data = dir.join("data.0");
    write_range(&d, 0, 0..512);
    d.flush().expect("flush");
    d.settle_punches();
    let before = allocated(&data);

    // Each round overwrites 512 blocks (2 MiB: long runs freed by its FLUSH) and at once,
    // while the puncher works on them, writes another 128 blocks that may be allocated
    // anywhere free: none of them may be punched.
    let (a, b) = (0..512u64, 512..640u64);
    for round in 1..=3u64 {
        write_range(&d, round, a.clone());
        d.flush().expect("flush");
        write_range(&d, round, b.clone());
        d.flush().expect("flush");
        assert_range(&d, round, a.clone());
        assert_range(&d, round, b.clone());
    }
    d.settle_punches();
    assert_range(&d, 3, 0..640);
    assert_eq!(d.check(), Vec::<String>::new());
    let after = allocated(&data);
    eprintln!("data file: {before} bytes allocated before the overwrites, {after} after");
    // Live: 2.5 MiB of data and the metadata. Unpunched, three rounds would leave 6 MiB of
    // superseded copies allocated besides.
    assert!(
        after < before + (3 << 20),
        "{after} bytes allocated after three rounds of overwrites (was {before})"
    );

    // A handle dropped right after a FLUSH (its puncher maybe holding blocks) punches nothing
    // after the drop: the next handle may allocate those blocks at once.
    write_range(&d, 5, a.clone());
    d.flush().expect("flush");
    drop(d);
    let d = open(&store);
    write_range(&d, 6, b.clone());
    write_range(&d, 6, 640..1024);
    d.flush().expect("flush");
    std::thread::sleep(std::time::Duration::from_millis(50));
    d.settle_punches();
    assert_range(&d, 5, a.clone());
    assert_range(&d, 6, 512..1024);
    assert_eq!(d.check(), Vec::<String>::new());
    drop(d);
    let d = open(&store);
    assert_range(&d, 5, a);
    assert_range(&d, 6, 512..1024);
    assert!(d.check_data().is_empty(), "{:?}", d.check_data());
}
