//! Every layout a disk can be served with (a raw image, parallax-v1 and parallax-v2 versions of
//! a store, a Tee of a parallax-v1 trusted version and a parallax-v2 candidate, and a parallax-v2
//! version of a two-tier store; opened by `common/layouts.rs`) over a real
//! vhost-user socket, on both cache modes (`writeback`: page cache; `none`: direct I/O, the
//! image or the store's tier files opened with `O_DIRECT`): many requests in flight on two
//! queues, whole and partial blocks, guest buffers aligned and misaligned, FLUSH, write-zeroes,
//! checked byte for byte against a model of the disk, then again after the layout is closed
//! and opened afresh. With direct I/O no page of the tier file stays in the page cache.
//!
//! `DOVETAIL_TEST_CACHE` (scripts/test.sh) picks one cache mode; unset, both run.
//! `DOVETAIL_TEST_ENGINE` picks the queues' I/O engine as for the other suites.

mod common;
#[path = "common/layouts.rs"]
mod layouts;

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use common::{header, pattern, test_engine, Buf, RangeSeg, Req, TestDriver, TestServer, SERIAL};
use common::{S_OK, WRITE_ZEROES_UNMAP};
use dovetail_backend::Disk;
use dovetail_layout::CacheMode;
use dovetail_store::Store;
use layouts::{modes, open, LAYOUTS};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u64 = 16 << 20;
const SECTOR: u64 = 512;
/// Pages of the store's tier file that are in the page cache (`mincore` over a mapping).
fn cached_pages(store: &Store) -> usize {
    let path = &store.tier_paths()[0];
    let f = std::fs::File::open(path).expect("tier file");
    let len = f.metadata().expect("size").len() as usize;
    // SAFETY: a fresh read-only shared mapping of the whole file, unmapped below; mincore
    // writes one byte per page into `vec`, which has that many.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(4096)];
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
        // The last page holds the tier header, read through the page cache at open.
        vec[..vec.len() - 1].iter().filter(|&&b| b & 1 == 1).count()
    }
}

/// A write (`data: Some`) or read of `len` bytes at `sector` through guest buffers placed by
/// hand at `skew` bytes past a page boundary, cut into `pieces`; returns what a read got.
fn by_hand(
    driver: &TestDriver,
    sector: u64,
    skew: u64,
    pieces: &[u32],
    data: Option<&[u8]>,
) -> Vec<u8> {
    let total: u32 = pieces.iter().sum();
    let (area, len) = driver.queue(0).expect("queue").data_area();
    assert!(len > 8 << 20, "data area of {len} bytes");
    let mem = driver.memory();
    let base = ((area.0 + (4 << 20) + 4095) & !4095) + skew;
    let kind = match data {
        Some(d) => {
            mem.write_slice(d, GuestAddress(base)).expect("guest write");
            VIRTIO_BLK_T_OUT
        }
        None => {
            // Poison behind the buffer: a read must not write past it.
            mem.write_slice(&vec![0xee; total as usize + 4096], GuestAddress(base))
                .expect("poison");
            VIRTIO_BLK_T_IN
        }
    };
    let mut bufs = vec![Buf::Out(header(kind, sector))];
    let mut off = 0u64;
    for &p in pieces {
        bufs.push(Buf::Raw {
            addr: base + off,
            len: p,
            writable: data.is_none(),
        });
        off += u64::from(p);
    }
    bufs.push(Buf::In(1));
    let c = driver.submit(0, &bufs);
    assert_eq!(c.status, Some(S_OK));
    let mut back = vec![0u8; total as usize + 64];
    mem.read_slice(&mut back, GuestAddress(base))
        .expect("guest read");
    if data.is_none() {
        assert!(
            back[total as usize..].iter().all(|&b| b == 0xee),
            "a read wrote past its buffer"
        );
    }
    back.truncate(total as usize);
    back
}

/// Reads the whole disk through the guest and compares it with `model`.
fn check_all(driver: &TestDriver, model: &[u8], what: &str) {
    let chunk = 1u32 << 20;
    for (k, want) in model.chunks(chunk as usize).enumerate() {
        let c = driver.submit(0, &Req::read(k as u64 * u64::from(chunk) / SECTOR, chunk));
        c.assert_ok(chunk);
        if c.data != want {
            let first = c
                .data
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{what}: the disk differs from the model at byte {}",
                k * chunk as usize + first
            );
        }
    }
}

fn round_trip(layout: &str, cache: CacheMode) {
    let what = format!("{layout}/{cache}");
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = open(dir.path(), layout, SIZE, cache, true);
    let disk = Disk::new(opened.layout.clone(), false, SERIAL)
        .expect("disk")
        .with_engine(test_engine());
    let server = TestServer::start(Arc::new(disk), 2);
    let driver = TestDriver::connect(server.socket(), 2, 32 << 20);
    let mut model = vec![0u8; SIZE as usize];
    let put = |model: &mut Vec<u8>, sector: u64, data: &[u8]| {
        let at = (sector * SECTOR) as usize;
        model[at..at + data.len()].copy_from_slice(data);
    };
    // 1. Two queues, 48 writes each in flight at once: 4 KiB and 12 KiB, scattered.
    let write = |q: usize, i: u64| {
        let len = if i % 3 == 0 { 12288 } else { 4096 };
        (
            (q as u64 * 48 + i) * 40,
            pattern(100 + q as u64 * 48 + i, len),
        )
    };
    std::thread::scope(|s| {
        for q in 0..2usize {
            let driver = &driver;
            s.spawn(move || {
                let reqs: Vec<_> = (0..48)
                    .map(|i| {
                        let (sector, data) = write(q, i);
                        Req::write(sector, &data)
                    })
                    .collect();
                for c in driver.submit_batch(q, &reqs) {
                    c.assert_ok(0);
                }
                driver.submit(q, &Req::flush()).assert_ok(0);
            });
        }
    });
    for q in 0..2 {
        for i in 0..48 {
            let (sector, data) = write(q, i);
            put(&mut model, sector, &data);
        }
    }
    // 2. Partial blocks: one sector in the middle of a written block, three sectors across a
    // block boundary of unwritten blocks, and 1 MiB + 512 bytes unaligned to blocks.
    for (sector, len, seed) in [
        (42u64, 512usize, 1u64),
        (4000 + 7, 1536, 2),
        (9001, 1 << 20, 3),
    ] {
        let data = pattern(seed, len);
        driver.submit(1, &Req::write(sector, &data)).assert_ok(0);
        put(&mut model, sector, &data);
    }
    // 3. Guest buffers placed by hand: page aligned, misaligned in memory, split at odd
    // lengths; each written, then read back into the same shape.
    let shapes: [(u64, &[u32]); 5] = [
        (0, &[16384]),
        (0, &[4096, 8192]),
        (16, &[8192]),
        (512, &[4096]),
        (0, &[1000, 3096, 4096]),
    ];
    for (k, (skew, pieces)) in shapes.iter().enumerate() {
        let total: u32 = pieces.iter().sum();
        let data = pattern(500 + k as u64, total as usize);
        let sector = 20_000 + 64 * k as u64 + k as u64;
        by_hand(&driver, sector, *skew, pieces, Some(&data));
        put(&mut model, sector, &data);
        let back = by_hand(&driver, sector, *skew, pieces, None);
        assert!(back == data, "{what}: shape {k} read back wrong");
    }
    // 4. Write-zeroes with and without unmap, over written and partial blocks.
    let c = driver.submit(
        0,
        &Req::write_zeroes(&[
            RangeSeg::new(40, 16, 0),
            RangeSeg::new(1920 + 3, 9, WRITE_ZEROES_UNMAP),
        ]),
    );
    c.assert_ok(0);
    model[40 * 512..56 * 512].fill(0);
    model[1923 * 512..1932 * 512].fill(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    check_all(&driver, &model, &what);
    drop(driver);
    server.stop().expect("serve returns Ok");
    if let (CacheMode::None, Some(store)) = (cache, &opened.store) {
        // Every data, node and annotation block went around the page cache.
        assert_eq!(
            cached_pages(store),
            0,
            "{what}: tier file pages in the page cache"
        );
    }
    drop(opened);
    // 5. Closed and opened again: what was flushed is there.
    let again = open(dir.path(), layout, SIZE, cache, false);
    let disk = Disk::new(again.layout.clone(), false, SERIAL)
        .expect("disk")
        .with_engine(test_engine());
    let server = TestServer::start(Arc::new(disk), 1);
    let driver = TestDriver::connect(server.socket(), 1, 32 << 20);
    check_all(&driver, &model, &format!("{what}, reopened"));
    drop(driver);
    server.stop().expect("serve returns Ok");
}

#[test]
fn raw_round_trips_on_both_cache_modes() {
    for cache in modes() {
        round_trip(LAYOUTS[0], cache);
    }
}

#[test]
fn parallax_v1_round_trips_on_both_cache_modes() {
    for cache in modes() {
        round_trip(LAYOUTS[1], cache);
    }
}

#[test]
fn parallax_v2_round_trips_on_both_cache_modes() {
    for cache in modes() {
        round_trip(LAYOUTS[2], cache);
    }
}

#[test]
fn a_tee_round_trips_on_both_cache_modes() {
    for cache in modes() {
        round_trip(LAYOUTS[3], cache);
    }
}

#[test]
fn a_tiered_disk_round_trips_on_both_cache_modes() {
    for cache in modes() {
        round_trip(LAYOUTS[4], cache);
    }
}
