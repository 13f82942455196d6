//! Helpers shared by the layout integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{VersionKey, VersionSpace};

/// The project's seeded generator, so failures replay exactly.
pub use dovetail_store::rng::SplitMix64 as Rng;

/// Bytes that identify where and when they were written.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A fresh pool and one space in it.
pub fn mem_space(extent_size: u64, extents: u32) -> (Arc<MemPool>, Arc<MemSpace>) {
    let pool = MemPool::new(extents);
    let space = Arc::new(MemSpace::new(pool.clone(), VersionKey(1), extent_size));
    (pool, space)
}

/// A parallax-v1 disk on a fresh in-memory space.
pub fn parallax(capacity: Sectors, extent_size: u64) -> (Arc<MemSpace>, Parallax) {
    let (_pool, space) = mem_space(extent_size, 1 << 16);
    let disk = Parallax::create(space.clone(), capacity).expect("create parallax-v1");
    (space, disk)
}

/// Same, with a node cache of `cache_bytes`.
pub fn parallax_with_cache(
    capacity: Sectors,
    extent_size: u64,
    cache_bytes: usize,
) -> (Arc<MemSpace>, Parallax) {
    let (_pool, space) = mem_space(extent_size, 1 << 16);
    let opts = ParallaxOptions {
        cache_bytes,
        ..ParallaxOptions::default()
    };
    let disk = Parallax::create_with(space.clone(), capacity, opts).expect("create parallax-v1");
    (space, disk)
}

/// A parallax-v2 disk on a fresh in-memory space, its annotations committed only at commits
/// (no timer), so tests know exactly what is durable.
pub fn parallax_v2(capacity: Sectors, extent_size: u64) -> (Arc<MemSpace>, Parallax) {
    let (_pool, space) = mem_space(extent_size, 1 << 16);
    let disk = Parallax::create_layout(space.clone(), "parallax-v2", capacity, v2_options())
        .expect("create parallax-v2");
    (space, disk)
}

/// Options without the annotation timer.
pub fn v2_options() -> ParallaxOptions {
    ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    }
}

/// Reopens a crashed copy of `space`.
pub fn crash_and_reopen(space: &MemSpace) -> (Arc<MemSpace>, Parallax) {
    let crashed = Arc::new(space.crash());
    let dyn_space: Arc<dyn VersionSpace> = crashed.clone();
    let disk = Parallax::open_with(dyn_space, v2_options()).expect("reopen after crash");
    (crashed, disk)
}

/// The whole disk.
pub fn read_all(d: &dyn BlockLayout) -> Vec<u8> {
    let mut buf = vec![0u8; (d.capacity().0 * 512) as usize];
    d.read(Sector(0), &mut buf).expect("read whole disk");
    buf
}

/// Asserts the disk equals `model`, naming the first differing byte.
pub fn assert_disk_eq(d: &dyn BlockLayout, model: &[u8], what: &str) {
    let got = read_all(d);
    assert_eq!(got.len(), model.len(), "{what}: size");
    if got == model {
        return;
    }
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:#04x}, expected {:#04x}",
            i / 512,
            got[i],
            model[i]
        );
    }
}

/// Asserts `check()` finds nothing.
pub fn assert_clean(d: &Parallax, what: &str) {
    let problems = d.check();
    assert!(problems.is_empty(), "{what}: check found {problems:#?}");
}
