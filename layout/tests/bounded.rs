//! Bounded before trusted: every length, count and capacity that the store's metadata and a
//! parallax root record state is checked against a hard limit before it sizes an allocation
//! or a loop. Each test feeds a decoder an input that claims far more than it holds and
//! asserts, with a counting allocator, that the decoder refuses it without allocating what
//! the input claims (the largest single allocation stays small), and that the refusal says
//! which limit was crossed.
//!
//! The same decoders run under libFuzzer (fuzz/README.md); this is the stable-toolchain proof
//! of the bounds, a few hundred milliseconds in all.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use dovetail_layout::parallax::format::{
    annotation_pages, depth_for, RootRecord, MAX_V2_GUEST_BLOCKS, SECTORS_PER_BLOCK,
};
use dovetail_layout::{Parallax, ParallaxOptions, Sectors};
use dovetail_store::format::{encode_slot, Header, Meta, MAX_EXTENTS, MAX_SLOT_SIZE, SLOT_HEADER};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{Store, VersionKey, VersionSpace};
use proptest::prelude::*;

/// The system allocator, noting the largest single allocation this thread made.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations made while the thread-local is torn down are not noted.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees are ours; `note` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's promises on `layout` are passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// What a decoder may allocate at once for an input of `len` bytes: 64 KiB plus 16 bytes per
/// input byte (the largest claim in these tests is gigabytes).
fn budget(len: usize) -> usize {
    (64 << 10) + 16 * len
}

/// A catalog payload: its fixed part (next key, extent count, free count, version count, disk
/// count), then `rest`.
fn payload(extents: u32, versions: u32, disks: u32, rest: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&extents.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&versions.to_le_bytes());
    b.extend_from_slice(&disks.to_le_bytes());
    b.extend_from_slice(rest);
    b
}

/// A version record's start: key, disk name, layout name, then an extent count `n`.
fn version_head(n: u32) -> Vec<u8> {
    let mut b = 7u64.to_le_bytes().to_vec();
    b.push(2);
    b.extend_from_slice(b"vm");
    b.push(3);
    b.extend_from_slice(b"raw");
    b.extend_from_slice(&n.to_le_bytes());
    b
}

/// A catalog payload claiming billions of extents, versions, disks, list entries or root
/// bytes is refused (it does not hold them) without allocating for them.
#[test]
fn a_catalog_claiming_huge_counts_is_refused_without_allocating_them() {
    let mut root_claim = version_head(0);
    root_claim.extend_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("extent count", payload(u32::MAX, 0, 0, &[])),
        ("version count", payload(0, u32::MAX, 0, &[])),
        ("disk count", payload(0, 0, u32::MAX, &[])),
        ("extent list", payload(0, 1, 0, &version_head(u32::MAX))),
        ("root record length", payload(0, 1, 0, &root_claim)),
    ];
    for version in 1..=dovetail_store::format::FORMAT_VERSION {
        for (what, bytes) in &cases {
            let (r, largest) = largest_during(|| Meta::decode(bytes, version));
            let e = r.expect_err(what).to_string();
            assert!(e.contains("in the middle of"), "{what}: {e}");
            assert!(
                largest <= budget(bytes.len()),
                "{what} (format {version}): an allocation of {largest} bytes for {} input bytes",
                bytes.len()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any counts (large ones likely) in front of a few random bytes: the catalog decoder
    /// never allocates more than the input can justify.
    #[test]
    fn catalog_allocations_follow_the_input_not_its_claims(
        extents in prop_oneof![0u32..64, any::<u32>()],
        versions in prop_oneof![0u32..4, any::<u32>()],
        disks in prop_oneof![0u32..4, any::<u32>()],
        n in prop_oneof![0u32..4, any::<u32>()],
        tail in proptest::collection::vec(any::<u8>(), 0..256),
        version in 1u32..=dovetail_store::format::FORMAT_VERSION,
    ) {
        let mut rest = vec![0u8; 8 * (extents.min(64) as usize)];
        rest.extend_from_slice(&version_head(n));
        rest.extend_from_slice(&tail);
        let bytes = payload(extents, versions, disks, &rest);
        let (_, largest) = largest_during(|| Meta::decode(&bytes, version));
        prop_assert!(largest <= budget(bytes.len()), "{largest} bytes for {}", bytes.len());
    }
}

/// A `store.meta` whose header states a slot of 1 GiB (re-checksummed, over a sparse file of
/// that length, and a slot claiming a payload to fill it) is refused by the header's bound
/// before the slot is read: nothing near a gigabyte is allocated.
#[test]
fn a_store_header_claiming_a_huge_slot_is_refused_before_the_slot_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    Store::create(dir.path(), 4 << 20, 1 << 20).expect("create a store");
    let meta_path = dir.path().join("store.meta");
    let bytes = std::fs::read(&meta_path).expect("read store.meta");
    let mut h = Header::decode(&bytes, &meta_path).expect("a good header");
    let slot = 1u64 << 30;
    assert!(slot > MAX_SLOT_SIZE);
    h.slot_size = slot;
    let mut meta = h.encode();
    meta.extend_from_slice(&encode_slot(h.version, 1, &[])[..SLOT_HEADER]);
    // Slot A's header claims a payload filling the whole slot.
    let len = (slot as usize - SLOT_HEADER) as u32;
    meta[4096 + 8..4096 + 12].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&meta_path, &meta).expect("write store.meta");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&meta_path)
        .expect("open store.meta");
    f.set_len(h.meta_len()).expect("a sparse store.meta");
    drop(f);
    let (r, largest) = largest_during(|| Store::open_read_only(dir.path()));
    let e = r.expect_err("a huge slot").to_string();
    assert!(e.contains(&format!("slot size {slot} is invalid")), "{e}");
    assert!(largest < 1 << 20, "an allocation of {largest} bytes");
    assert_eq!(
        MAX_SLOT_SIZE,
        dovetail_store::format::slot_size_for(MAX_EXTENTS)
    );
}

/// A parallax-v2 disk of `blocks` guest blocks, its tree capacity (sectors) and depth.
fn v2_shape(blocks: u64) -> (Sectors, u8) {
    let sums = blocks.div_ceil((4096 - 16) / 4);
    let tree = blocks + annotation_pages(blocks) + sums;
    (Sectors(tree * SECTORS_PER_BLOCK), depth_for(tree))
}

/// A parallax-v2 root record stating a guest of more than [`MAX_V2_GUEST_BLOCKS`] is refused
/// by the decoder and by `Parallax::open` before the in-memory tables (20 bytes a guest block,
/// 80 GiB here) are allocated; `create` refuses such a disk too, and one at the limit decodes.
#[test]
fn a_parallax_v2_record_claiming_a_huge_guest_is_refused_before_its_tables() {
    let pool = MemPool::new(8);
    let space = Arc::new(MemSpace::new(pool.clone(), VersionKey(1), 1 << 20));
    let disk = Parallax::create_layout(
        space.clone(),
        "parallax-v2",
        Sectors(2048),
        ParallaxOptions::default(),
    )
    .expect("create a small parallax-v2 disk");
    drop(disk);
    let record = RootRecord::decode(&space.root()).expect("its root record");
    let shaped = |blocks: u64| {
        let mut r = record.clone();
        let (tree, depth) = v2_shape(blocks);
        r.capacity = tree;
        r.depth = depth;
        r.v2.as_mut().expect("v2").guest_capacity = Sectors(blocks * SECTORS_PER_BLOCK);
        r.encode()
    };
    let at_limit = shaped(MAX_V2_GUEST_BLOCKS);
    let (r, largest) = largest_during(|| RootRecord::decode(&at_limit));
    r.expect("a guest at the limit decodes");
    assert!(largest <= budget(at_limit.len()), "{largest}");

    let over = shaped(MAX_V2_GUEST_BLOCKS + 1);
    let (r, largest) = largest_during(|| RootRecord::decode(&over));
    let e = r.expect_err("a guest over the limit").to_string();
    assert!(e.contains("more than the 4294967296"), "{e}");
    assert!(largest <= budget(over.len()), "{largest}");

    space.commit_root(&over).expect("commit the record");
    let (r, largest) =
        largest_during(|| Parallax::open(space.clone() as Arc<dyn VersionSpace>).map(|_| ()));
    let e = r.expect_err("open a guest over the limit").to_string();
    assert!(e.contains("more than the 4294967296"), "{e}");
    assert!(largest < 1 << 20, "an allocation of {largest} bytes");

    let fresh = Arc::new(MemSpace::new(pool, VersionKey(2), 1 << 20));
    let (r, largest) = largest_during(|| {
        Parallax::create_layout(
            fresh,
            "parallax-v2",
            Sectors((MAX_V2_GUEST_BLOCKS + 1) * SECTORS_PER_BLOCK),
            ParallaxOptions::default(),
        )
        .map(|_| ())
    });
    let e = r.expect_err("create a guest over the limit").to_string();
    assert!(e.contains("too large"), "{e}");
    assert!(largest < 1 << 20, "an allocation of {largest} bytes");
}

/// A root record claiming four billion snapshots, and any count in front of random bytes, is
/// refused without allocating for the claim.
#[test]
fn a_root_record_claiming_huge_snapshot_counts_is_refused_without_allocating_them() {
    let pool = MemPool::new(4);
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), 1 << 20));
    drop(
        Parallax::create_layout(
            space.clone(),
            "parallax-v2",
            Sectors(2048),
            ParallaxOptions::default(),
        )
        .expect("create"),
    );
    let good = space.root();
    let reseal = |b: &mut Vec<u8>| {
        b[12..16].fill(0);
        let crc = crc32c::crc32c(b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
    };
    for count in [u32::MAX, 1 << 20, 3] {
        let mut b = good.clone();
        b[28..32].copy_from_slice(&count.to_le_bytes());
        reseal(&mut b);
        let (r, largest) = largest_during(|| RootRecord::decode(&b));
        let e = r.expect_err("too many snapshots").to_string();
        assert!(e.contains("snapshot"), "{count}: {e}");
        assert!(largest <= budget(b.len()), "{count}: {largest}");
    }
}
