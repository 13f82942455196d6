//! A node cache far smaller than the tree, shared by threads as queue workers and their pools
//! share it: readers that miss load nodes (with no cache lock held across the load) while a
//! writer's copy-on-write and commits change and free nodes. Every read returns what was
//! written.

mod common;

use std::sync::Arc;

use common::{parallax_with_cache, pattern, Rng};
use dovetail_layout::{BlockLayout, Sector, Sectors};

/// Blocks per leaf node's span, at most (4 KiB nodes of 8-byte pointers).
const SPAN: u64 = 512;
const LEAVES: u64 = 96;

#[test]
fn readers_loading_nodes_beside_a_writer_and_commits_read_what_was_written() {
    // 96 leaves' spans, a cache of 16 nodes (the least): nearly every read loads its leaf.
    let capacity = Sectors(LEAVES * SPAN * 8);
    let (_space, disk) = parallax_with_cache(capacity, 1 << 20, 0);
    // One block per leaf span for the readers, another for the writer.
    let fixed = |leaf: u64| Sector((leaf * SPAN + leaf % 7) * 8);
    let moving = |leaf: u64| Sector((leaf * SPAN + 100 + leaf % 5) * 8);
    for leaf in 0..LEAVES {
        disk.write(fixed(leaf), &pattern(leaf, 4096)).expect("fill");
        disk.write(moving(leaf), &pattern(1000 + leaf, 4096))
            .expect("fill");
    }
    disk.flush().expect("flush");
    let disk = Arc::new(disk);
    std::thread::scope(|s| {
        for r in 0..4u64 {
            let disk = disk.clone();
            s.spawn(move || {
                let mut rng = Rng::new(r + 1);
                let mut buf = vec![0u8; 4096];
                for step in 0..600 {
                    let leaf = rng.below(LEAVES);
                    disk.read(fixed(leaf), &mut buf).expect("read");
                    assert!(
                        buf == pattern(leaf, 4096),
                        "reader {r} step {step}: leaf {leaf}'s block"
                    );
                }
            });
        }
        let disk = disk.clone();
        s.spawn(move || {
            let mut rng = Rng::new(99);
            let mut buf = vec![0u8; 4096];
            for step in 0..400u64 {
                let leaf = rng.below(LEAVES);
                let data = pattern(10_000 + step, 4096);
                disk.write(moving(leaf), &data).expect("write");
                disk.read(moving(leaf), &mut buf).expect("read back");
                assert!(buf == data, "writer step {step}: leaf {leaf}'s block");
                if step % 25 == 0 {
                    disk.flush().expect("flush");
                }
            }
        });
    });
    let mut buf = vec![0u8; 4096];
    for leaf in 0..LEAVES {
        disk.read(fixed(leaf), &mut buf).expect("read");
        assert!(buf == pattern(leaf, 4096), "leaf {leaf}'s block at the end");
    }
}
