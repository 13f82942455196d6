//! One I/O suite, run against every layout: each must behave the same to the guest.

mod common;

use common::{assert_disk_eq, parallax, parallax_with_cache, pattern};
use dovetail_layout::raw::{RawLayout, RawOptions};
use dovetail_layout::{BlockLayout, Error, IoBuf, IoBufs, MemLayout, Parallax, Sector, Sectors};
use dovetail_store::Store;

/// Not a whole number of 4 KiB blocks, so the last block is partial.
const CAPACITY: Sectors = Sectors(8195);

/// Writes `data` at `at` on the disk and in the model.
fn write(d: &dyn BlockLayout, model: &mut [u8], at: u64, data: &[u8]) {
    d.write(Sector(at), data)
        .unwrap_or_else(|e| panic!("write {} bytes at sector {at}: {e}", data.len()));
    let s = (at * 512) as usize;
    model[s..s + data.len()].copy_from_slice(data);
}

fn zero(model: &mut [u8], at: u64, len: u64) {
    let s = (at * 512) as usize;
    model[s..s + (len * 512) as usize].fill(0);
}

/// The suite. `name` labels failures.
fn io_suite(name: &str, d: &dyn BlockLayout) {
    assert_eq!(d.capacity(), CAPACITY, "{name}: capacity");
    let cap = CAPACITY.0;
    let mut model = vec![0u8; (cap * 512) as usize];
    assert_disk_eq(d, &model, &format!("{name}: a new disk reads as zeroes"));

    // Edges: first sector, first block, last sector, the partial last block.
    write(d, &mut model, 0, &pattern(1, 512));
    write(d, &mut model, 8, &pattern(2, 4096));
    write(d, &mut model, cap - 1, &pattern(3, 512));
    write(d, &mut model, cap - 11, &pattern(4, 5120));
    assert_disk_eq(d, &model, &format!("{name}: edges"));
    let mut one = vec![0u8; 512];
    d.read(Sector(cap - 1), &mut one).expect("read last sector");
    assert_eq!(&one[..], &model[model.len() - 512..], "{name}: last sector");

    // Sector writes not aligned to 4 KiB blocks, across block boundaries, overwriting.
    write(d, &mut model, 5, &pattern(5, 3 * 512));
    write(d, &mut model, 13, &pattern(6, 100 * 512));
    write(d, &mut model, 1001, &pattern(7, 517 * 512));
    write(d, &mut model, 1002, &pattern(8, 512));
    write(d, &mut model, 4000, &pattern(9, 64 * 512));
    assert_disk_eq(d, &model, &format!("{name}: unaligned writes"));
    let mut mid = vec![0u8; 7 * 512];
    d.read(Sector(1003), &mut mid).expect("unaligned read");
    assert_eq!(
        &mid[..],
        &model[1003 * 512..1010 * 512],
        "{name}: unaligned read"
    );

    // Discard reads back as zeroes, aligned or not.
    d.discard(Sector(1024), Sectors(64))
        .expect("discard aligned");
    zero(&mut model, 1024, 64);
    d.discard(Sector(1003), Sectors(13))
        .expect("discard unaligned");
    zero(&mut model, 1003, 13);
    assert_disk_eq(d, &model, &format!("{name}: discard"));

    // Write zeroes, with and without unmap, aligned or not; then rewrite part of the range.
    d.write_zeroes(Sector(4001), Sectors(30), false)
        .expect("write zeroes");
    zero(&mut model, 4001, 30);
    d.write_zeroes(Sector(8), Sectors(16), true)
        .expect("write zeroes unmap");
    zero(&mut model, 8, 16);
    d.write_zeroes(Sector(cap - 3), Sectors(3), true)
        .expect("write zeroes at the end");
    zero(&mut model, cap - 3, 3);
    d.write_zeroes(Sector(0), Sectors(0), false)
        .expect("empty write zeroes");
    assert_disk_eq(d, &model, &format!("{name}: write zeroes"));
    write(d, &mut model, 4010, &pattern(10, 2 * 512));
    assert_disk_eq(d, &model, &format!("{name}: rewrite after zeroes"));

    // Out of range or malformed: an error, and nothing changes.
    let buf = pattern(11, 1024);
    let mut rbuf = vec![0u8; 1024];
    let out_of_range = |r: dovetail_layout::Result<()>, what: &str| {
        assert!(
            matches!(r, Err(Error::OutOfRange { .. })),
            "{name}: {what}: {r:?}"
        );
    };
    out_of_range(d.write(Sector(cap - 1), &buf), "write across the end");
    out_of_range(d.write(Sector(cap), &buf[..512]), "write past the end");
    out_of_range(d.write(Sector(u64::MAX), &buf[..512]), "write at u64::MAX");
    out_of_range(d.read(Sector(cap - 1), &mut rbuf), "read across the end");
    out_of_range(d.discard(Sector(cap - 1), Sectors(2)), "discard across");
    out_of_range(
        d.write_zeroes(Sector(1), Sectors(u64::MAX), true),
        "write zeroes overflowing",
    );
    assert!(
        matches!(d.write(Sector(0), &buf[..100]), Err(Error::Unaligned(100))),
        "{name}: unaligned buffer"
    );
    assert!(
        matches!(
            d.read(Sector(0), &mut rbuf[..513]),
            Err(Error::Unaligned(513))
        ),
        "{name}: unaligned read buffer"
    );
    assert_disk_eq(
        d,
        &model,
        &format!("{name}: refused requests change nothing"),
    );

    // Flush, then everything still reads back.
    d.flush().expect("flush");
    d.flush().expect("second flush");
    assert_disk_eq(d, &model, &format!("{name}: after flush"));

    // A large write spanning many blocks, then a whole-disk read through the scatter path.
    write(d, &mut model, 17, &pattern(12, 2048 * 512));
    d.flush().expect("flush");
    assert_disk_eq(d, &model, &format!("{name}: large write"));
    // Reads into scattered buffers (as from a guest), across written blocks and holes.
    for (at, sectors) in [(0u64, 1u64), (15, 9), (16, 2100), (cap - 40, 40), (3000, 8)] {
        let n = (sectors * 512) as usize;
        // Three pieces of odd sizes, filled with garbage first.
        let (mut a, mut b, mut c) = (vec![0xeeu8; 7], vec![0xeeu8; n / 2], vec![0xeeu8; n]);
        let cut = 7.min(n);
        let list = [
            IoBuf {
                ptr: a.as_mut_ptr(),
                len: cut,
            },
            IoBuf {
                ptr: b.as_mut_ptr(),
                len: (n - cut) / 2,
            },
            IoBuf {
                ptr: c.as_mut_ptr(),
                len: n - cut - (n - cut) / 2,
            },
        ];
        // SAFETY: the three vectors outlive `bufs` and are not otherwise touched while it is
        // used.
        let bufs = unsafe { IoBufs::new(&list) };
        let mut scratch = Vec::new();
        d.read_into(Sector(at), bufs, &mut scratch)
            .unwrap_or_else(|e| panic!("{name}: read_into {sectors} sectors at {at}: {e}"));
        let mut got = a[..cut].to_vec();
        got.extend_from_slice(&b[..list[1].len]);
        got.extend_from_slice(&c[..list[2].len]);
        let s = (at * 512) as usize;
        assert!(
            got == model[s..s + n],
            "{name}: read_into {sectors} sectors at {at}"
        );
    }
    d.write_zeroes(Sector(0), CAPACITY, true)
        .expect("zero the whole disk");
    model.fill(0);
    assert_disk_eq(d, &model, &format!("{name}: whole disk zeroed"));
}

#[test]
fn every_layout_passes_the_io_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = RawLayout::open(
        &dir.path().join("raw.img"),
        RawOptions {
            create_size: Some(CAPACITY.0 * 512),
            read_only: false,
            cache: None,
        },
    )
    .expect("raw image");
    let mem = MemLayout::new(CAPACITY);
    // Small extents, so the disk spans many of them and grants more as it fills.
    let (_s1, plx) = parallax(CAPACITY, 256 << 10);
    // A tiny node cache: every lookup path is evicted and read back.
    let (_s2, plx_small_cache) = parallax_with_cache(CAPACITY, 64 << 10, 0);
    // On a real store: its data file is read straight into scattered buffers.
    let store = Store::create(&dir.path().join("store"), 64 << 20, 1 << 20).expect("store");
    let key = store
        .create_disk(
            "d",
            (CAPACITY.0 * 512).next_multiple_of(4096),
            "parallax-v1",
        )
        .expect("disk");
    let plx_store = Parallax::create(store.space(key).expect("space"), CAPACITY).expect("parallax");
    let (_s3, plx2) = common::parallax_v2(CAPACITY, 256 << 10);
    let key2 = store
        .create_disk(
            "d2",
            (CAPACITY.0 * 512).next_multiple_of(4096),
            "parallax-v2",
        )
        .expect("disk");
    let plx2_store = Parallax::create_layout(
        store.space(key2).expect("space"),
        "parallax-v2",
        CAPACITY,
        common::v2_options(),
    )
    .expect("parallax-v2");
    let layouts: [(&str, &dyn BlockLayout); 7] = [
        ("raw", &raw),
        ("mem", &mem),
        ("parallax-v1", &plx),
        ("parallax-v1, small cache", &plx_small_cache),
        ("parallax-v1 on a store", &plx_store),
        ("parallax-v2", &plx2),
        ("parallax-v2 on a store", &plx2_store),
    ];
    for (name, layout) in layouts {
        io_suite(name, layout);
    }
    for (name, d) in [
        ("parallax-v2", &plx2),
        ("parallax-v2 on a store", &plx2_store),
    ] {
        d.flush().expect("flush");
        common::assert_clean(d, &format!("{name} after the suite"));
        let t = d.annotations().expect("annotations");
        assert!(
            t.totals().reads > 0 && t.totals().writes > 0,
            "{name}: counted"
        );
    }
    common::assert_clean(&plx, "parallax-v1 after the suite");
    common::assert_clean(
        &plx_small_cache,
        "parallax-v1 (small cache) after the suite",
    );
}
