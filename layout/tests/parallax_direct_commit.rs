//! Commits on a store opened for direct I/O: a commit's node, annotation and checksum blocks
//! are submitted together through the committing thread's io_uring. Several threads write and
//! FLUSH at once (commits racing writes, FLUSHes sharing commits); after the store is closed
//! and opened again, every byte is the model's and the check finds nothing.

mod common;

use std::sync::{Arc, Mutex};

use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_store::{Store, VersionSpace};

const DISK: u64 = 8 << 20;
const BLOCKS: u64 = DISK / 4096;
const THREADS: u64 = 3;

fn options() -> ParallaxOptions {
    ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    }
}

fn run(layout: &str) {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let dir = t.path().join("store");
    let key = {
        let store = Store::create(&dir, 64 << 20, 1 << 20).expect("create the store");
        store.create_disk("d", DISK, layout).expect("create disk")
    };
    let store = Store::open_direct(&dir).expect("open the store with direct I/O");
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    assert!(space.direct_io(), "the store is on direct I/O");
    let disk = Arc::new(
        Parallax::create_layout(space, layout, Sectors(DISK / 512), options()).expect("format"),
    );
    let model = Arc::new(Mutex::new(vec![0u8; DISK as usize]));
    // Each thread writes blocks of its own residue class (so the model's order is the disk's)
    // and FLUSHes every 8 writes; the last round ends with a FLUSH.
    let workers: Vec<_> = (0..THREADS)
        .map(|k| {
            let (disk, model) = (disk.clone(), model.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (k + 1);
                for round in 0..40u64 {
                    for _ in 0..8 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = (x % (BLOCKS / THREADS)) * THREADS + k;
                        let data = common::pattern(x, 4096);
                        disk.write(Sector(b * 8), &data).expect("write");
                        let at = (b * 4096) as usize;
                        model.lock().expect("model")[at..at + 4096].copy_from_slice(&data);
                    }
                    disk.flush()
                        .unwrap_or_else(|e| panic!("flush {round} of thread {k}: {e}"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("writer");
    }
    common::assert_clean(&disk, layout);
    drop(disk);
    drop(store);

    let store = Store::open_direct(&dir).expect("reopen the store");
    let disk = Parallax::open_with(store.space(key).expect("space"), options()).expect("reopen");
    common::assert_disk_eq(&disk, &model.lock().expect("model"), layout);
    common::assert_clean(&disk, layout);
}

#[test]
fn parallax_v1_commits_on_direct_io_are_durable() {
    run("parallax-v1");
}

#[test]
fn parallax_v2_commits_on_direct_io_are_durable() {
    run("parallax-v2");
}
