//! The queue workers' I/O engines over a real vhost-user socket: both cache modes (page cache,
//! direct I/O) on every engine (io_uring, the thread pool, one request at a time), many requests
//! in flight per queue, guest buffers aligned and misaligned for direct I/O, FLUSH after a
//! batch of writes, and a layout that must see every request served several at a time.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    header, image_bytes, pattern, raw_disk_with, Buf, Req, TestDriver, TestServer, SERIAL, S_OK,
};
use dovetail_backend::disk::Engine;
use dovetail_backend::Disk;
use dovetail_layout::{BlockLayout, CacheMode, MemLayout, Result, Sector, Sectors};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const MODES: [CacheMode; 2] = [CacheMode::None, CacheMode::Writeback];
const ENGINES: [Engine; 3] = [Engine::Auto, Engine::Threads, Engine::Sync];

/// 96 writes of 4 KiB to scattered blocks in one batch (all in flight at once), a FLUSH, then
/// 96 reads in one batch: every read returns its write, the image holds them, and the
/// neighbouring blocks stay zero.
fn batch_round_trip(cache: CacheMode, engine: Engine, queues: usize) {
    const N: u64 = 96;
    const LEN: usize = 4096;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk_with(&image, Some(16 * MIB), false, cache, engine);
    let server = TestServer::start(disk, queues);
    let driver = TestDriver::connect(server.socket(), queues, 32 << 20);
    // Blocks 0, 3, 6, ... written; blocks between them untouched.
    let sector = |q: usize, i: u64| (q as u64 * N + i) * 3 * (LEN as u64 / SECTOR);
    let data = |q: usize, i: u64| pattern(7000 + q as u64 * N + i, LEN);
    std::thread::scope(|s| {
        for q in 0..queues {
            let driver = &driver;
            s.spawn(move || {
                let writes: Vec<_> = (0..N)
                    .map(|i| Req::write(sector(q, i), &data(q, i)))
                    .collect();
                for c in driver.submit_batch(q, &writes) {
                    c.assert_ok(0);
                }
                driver.submit(q, &Req::flush()).assert_ok(0);
                let reads: Vec<_> = (0..N)
                    .map(|i| Req::read(sector(q, i), LEN as u32))
                    .collect();
                for (i, c) in driver.submit_batch(q, &reads).into_iter().enumerate() {
                    c.assert_ok(LEN as u32);
                    assert!(
                        c.data == data(q, i as u64),
                        "{cache}/{engine:?}: queue {q} read {i} differs from its write"
                    );
                }
            });
        }
    });
    for q in 0..queues {
        for i in 0..N {
            let off = sector(q, i) * SECTOR;
            assert!(
                image_bytes(&image, off, LEN) == data(q, i),
                "image at {off}"
            );
            assert!(
                image_bytes(&image, off + LEN as u64, 2 * LEN)
                    .iter()
                    .all(|&b| b == 0),
                "the blocks after {off} were touched"
            );
        }
    }
    drop(driver);
    server.stop().expect("serve returns Ok");
}

#[test]
fn batches_round_trip_on_every_cache_mode_and_engine() {
    for cache in MODES {
        for engine in ENGINES {
            batch_round_trip(cache, engine, 1);
        }
    }
}

#[test]
fn two_queues_keep_requests_in_flight_on_both_cache_modes() {
    for cache in MODES {
        batch_round_trip(cache, Engine::Auto, 2);
    }
}

/// Guest buffers placed by hand: page aligned (direct I/O takes them as they are), and at odd
/// offsets or split at odd lengths (direct I/O goes through a bounce buffer). Every shape reads
/// back what was written, and the guest memory around a read buffer is not touched.
#[test]
fn aligned_and_misaligned_guest_buffers() {
    for cache in MODES {
        for engine in [Engine::Auto, Engine::Threads] {
            let dir = tempfile::tempdir().expect("tempdir");
            let image = dir.path().join("disk.img");
            let disk = raw_disk_with(&image, Some(8 * MIB), false, cache, engine);
            let server = TestServer::start(disk, 1);
            let driver = TestDriver::connect(server.socket(), 1, 16 << 20);
            // Buffers of our own past the first 4 MiB of the queue's data area (the driver's
            // own buffers start at its beginning).
            let (area, len) = driver.queue(0).expect("queue").data_area();
            assert!(len > 8 * MIB, "data area of {len} bytes");
            let base = (area.0 + 4 * MIB + 4095) & !4095;
            let mem = driver.memory();
            // (offset of the buffer from a page boundary, lengths of its pieces)
            let shapes: [(u64, &[u32]); 5] = [
                (0, &[16384]),
                (0, &[4096, 8192]),
                (16, &[8192]),
                (512, &[4096]),
                (0, &[1000, 3096, 4096]),
            ];
            for (k, (skew, pieces)) in shapes.iter().enumerate() {
                let total: u32 = pieces.iter().sum();
                let data = pattern(k as u64 + 100, total as usize);
                let at = 64 * k as u64;
                let src = GuestAddress(base + skew);
                mem.write_slice(&data, src).expect("guest write");
                let mut bufs = vec![Buf::Out(header(VIRTIO_BLK_T_OUT, at))];
                let mut off = 0u64;
                for &p in pieces.iter() {
                    bufs.push(Buf::Raw {
                        addr: src.0 + off,
                        len: p,
                        writable: false,
                    });
                    off += u64::from(p);
                }
                bufs.push(Buf::In(1));
                driver.submit(0, &bufs).assert_ok(0);
                assert!(
                    image_bytes(&image, at * SECTOR, total as usize) == data,
                    "{cache}/{engine:?}: shape {k} written wrong"
                );
                // Read it back into a different place, fenced by poison.
                let dst = GuestAddress(base + 2 * MIB + skew);
                mem.write_slice(
                    &vec![0xee; total as usize + 8192],
                    GuestAddress(dst.0 - skew),
                )
                .expect("poison");
                let mut bufs = vec![Buf::Out(header(VIRTIO_BLK_T_IN, at))];
                let mut off = 0u64;
                for &p in pieces.iter() {
                    bufs.push(Buf::Raw {
                        addr: dst.0 + off,
                        len: p,
                        writable: true,
                    });
                    off += u64::from(p);
                }
                bufs.push(Buf::In(1));
                let c = driver.submit(0, &bufs);
                assert_eq!(c.status, Some(S_OK));
                assert_eq!(c.used_len, total + 1);
                let mut back = vec![0u8; total as usize + 16];
                mem.read_slice(&mut back, dst).expect("guest read");
                assert!(
                    back[..total as usize] == data[..],
                    "{cache}/{engine:?}: shape {k} read back wrong"
                );
                assert!(
                    back[total as usize..].iter().all(|&b| b == 0xee),
                    "{cache}/{engine:?}: shape {k}: the read wrote past its buffer"
                );
            }
            drop(driver);
            server.stop().expect("serve returns Ok");
        }
    }
}

/// A layout that takes 40 ms per read and counts how many reads run at once.
#[derive(Debug)]
struct Slow {
    inner: MemLayout,
    now: AtomicUsize,
    most: AtomicUsize,
}

impl BlockLayout for Slow {
    fn capacity(&self) -> Sectors {
        self.inner.capacity()
    }
    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(40));
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.inner.read(at, buf)
    }
    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        self.inner.write(at, buf)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        self.inner.discard(at, len)
    }
    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> Result<()> {
        self.inner.write_zeroes(at, len, unmap)
    }
}

/// A layout without a file of its own (parallax, the Tee) is served through the queue's
/// thread pool: the 8 reads of one batch on one queue run at once, where the one-at-a-time
/// engine runs them in turn.
#[test]
fn a_layout_without_a_file_runs_several_requests_of_one_queue_at_once() {
    for (engine, at_once) in [(Engine::Auto, true), (Engine::Sync, false)] {
        let slow = Arc::new(Slow {
            inner: MemLayout::new(Sectors(2048)),
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        slow.inner.write(Sector(8), &[5u8; 4096]).expect("write");
        let disk = Disk::new(slow.clone(), false, SERIAL)
            .expect("serial")
            .with_engine(engine);
        let server = TestServer::start(Arc::new(disk), 1);
        let driver = TestDriver::connect(server.socket(), 1, 16 << 20);
        let reads: Vec<_> = (0..8).map(|_| Req::read(8, 4096)).collect();
        let start = Instant::now();
        for c in driver.submit_batch(0, &reads) {
            c.assert_ok(4096);
            assert!(c.data.iter().all(|&b| b == 5));
        }
        let took = start.elapsed();
        let most = slow.most.load(Ordering::SeqCst);
        if at_once {
            assert!(most >= 4, "{engine:?}: at most {most} reads ran at once");
            assert!(
                took < Duration::from_millis(250),
                "{engine:?}: took {took:?}"
            );
        } else {
            assert_eq!(most, 1, "{engine:?}: one request at a time");
            assert!(
                took >= Duration::from_millis(300),
                "{engine:?}: took {took:?}"
            );
        }
        drop(driver);
        server.stop().expect("serve returns Ok");
    }
}

/// A queue kept full (the load generator, 32 requests in flight, mixed reads and writes) for a
/// few seconds on each cache mode: the guest adds requests while the queue's pass is between
/// submitting and waiting, which is when a pass looks at the ring again before it sleeps (that
/// path once took the vring's lock twice and stopped the queue for good). Every request
/// completes (the generator fails on a request that takes 5 s) without an I/O error.
#[test]
fn a_queue_kept_full_never_stalls() {
    use dovetail_bench::load::{self, Limit, Pattern, Workload};
    for cache in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        let disk = raw_disk_with(&image, Some(64 * MIB), false, cache, Engine::Auto);
        let server = TestServer::start(disk, 2);
        let w = Workload {
            pattern: Pattern::RandRw,
            block_size: 4096,
            iodepth: 32,
            queues: 2,
            limit: Limit::Time(Duration::from_secs(3)),
            ..Workload::new(Pattern::RandRw)
        };
        let (driver, device) = load::connect(server.socket(), &w).expect("connect");
        let report = load::run(&driver, &device, &w, None)
            .unwrap_or_else(|e| panic!("{cache}: {}", dovetail_layout::error_chain(&e)));
        assert_eq!(report.io_errors, 0, "{cache}");
        assert!(report.iops() > 100.0, "{cache}: {} IOPS", report.iops());
        drop(driver);
        server.stop().expect("serve returns Ok");
    }
}

/// A layout whose data "file" is one end of a Unix socket pair, offered for direct submission:
/// a read the queue hands to io_uring waits until the test sends bytes from the other end, a
/// write arrives there. The synchronous calls are not used on this path.
#[derive(Debug)]
struct SocketFile {
    ours: std::os::unix::net::UnixStream,
}

impl BlockLayout for SocketFile {
    fn capacity(&self) -> Sectors {
        Sectors(2048)
    }
    fn read(&self, _: Sector, _: &mut [u8]) -> Result<()> {
        unreachable!("served through io_uring")
    }
    fn write(&self, _: Sector, _: &[u8]) -> Result<()> {
        unreachable!("served through io_uring")
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, _: Sector, _: Sectors) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: Sector, _: Sectors, _: bool) -> Result<()> {
        Ok(())
    }
    fn direct_file(&self) -> Option<dovetail_layout::DirectFile> {
        use std::os::fd::AsRawFd;
        Some(dovetail_layout::DirectFile {
            fd: self.ours.as_raw_fd(),
            mem_align: 1,
        })
    }
}

/// Requests made available while another is in flight are started and completed without
/// waiting for it, each time, however many kicks came before: a READ that cannot finish (no
/// bytes on the socket yet) stays in flight while two WRITEs, one after the other, reach the
/// socket and complete, and a GET_ID completes too (out of order); then the READ gets its
/// bytes. The queue's wait on io_uring also watches the kick eventfd, armed once for all of
/// them (a poll re-armed per kick would miss the second WRITE, the kick eventfd being still
/// readable, unconsumed, from the first).
#[test]
fn requests_made_available_while_one_is_in_flight_start_at_once() {
    use dovetail_bench::driver::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use std::io::{Read, Write};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
    if dovetail_layout::engine::Uring::new(4).is_err() {
        eprintln!("no io_uring here; skipped");
        return;
    }
    const LEN: u32 = 4096;
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    theirs
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let disk = Disk::new(Arc::new(SocketFile { ours }), false, SERIAL)
        .expect("serial")
        .with_engine(Engine::Auto);
    let server = TestServer::start(Arc::new(disk), 1);
    let driver = TestDriver::connect(server.socket(), 1, 16 << 20);
    let mem = driver.memory().clone();
    let mut q = driver.queue(0).expect("queue");
    let (data, _) = q.data_area();
    // Chain k: descriptors 3k..3k+2 (header, data, status), its buffers at 8 KiB * k.
    let at = |k: u16| GuestAddress(data.0 + 8192 * u64::from(k));
    let place = |q: &mut dovetail_bench::driver::VirtQueue, k: u16, req: u32, body: &[u8]| {
        let (hdr, buf, status) = (
            at(k),
            GuestAddress(at(k).0 + 16),
            GuestAddress(at(k).0 + 16 + 4096),
        );
        mem.write_slice(&header(req, 0), hdr).expect("header");
        mem.write_slice(&[0xff], status).expect("status");
        let d = 3 * k;
        let dir = if req == VIRTIO_BLK_T_OUT {
            0
        } else {
            VRING_DESC_F_WRITE
        };
        if req == VIRTIO_BLK_T_OUT {
            mem.write_slice(body, buf).expect("data");
        }
        let len = if req == VIRTIO_BLK_T_GET_ID { 20 } else { LEN };
        q.write_desc(d, hdr.0, 16, VRING_DESC_F_NEXT, d + 1)
            .expect("desc");
        q.write_desc(d + 1, buf.0, len, VRING_DESC_F_NEXT | dir, d + 2)
            .expect("desc");
        q.write_desc(d + 2, status.0, 1, VRING_DESC_F_WRITE, 0)
            .expect("desc");
        q.push(d).expect("push");
        q.enable_interrupts().expect("interrupts");
        q.publish().expect("publish");
        q.kick().expect("kick");
    };
    let status = |k: u16| {
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(at(k).0 + 16 + 4096))
            .expect("status");
        b[0]
    };
    let next_used = |q: &mut dovetail_bench::driver::VirtQueue| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = q.pop_used().expect("used ring") {
                return u;
            }
            q.wait(deadline).expect("a completion within 5 s");
        }
    };
    // The READ: in flight until the test sends its bytes.
    place(&mut q, 0, VIRTIO_BLK_T_IN, &[]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        q.pop_used().expect("used").is_none(),
        "the READ completed without data"
    );
    for (k, fill) in [(1u16, 0x11u8), (2, 0x22)] {
        let body = vec![fill; LEN as usize];
        place(&mut q, k, VIRTIO_BLK_T_OUT, &body);
        let mut got = vec![0u8; LEN as usize];
        theirs
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("WRITE {k} was not started while the READ waits: {e}"));
        assert!(got == body, "WRITE {k} sent other bytes");
        let u = next_used(&mut q);
        assert_eq!(u.id, u32::from(3 * k), "WRITE {k} completes first");
        assert_eq!(status(k), S_OK);
    }
    place(&mut q, 3, VIRTIO_BLK_T_GET_ID, &[]);
    let u = next_used(&mut q);
    assert_eq!(u.id, 9, "GET_ID completes while the READ waits");
    assert_eq!(status(3), S_OK);
    // Now the READ's bytes.
    let body = pattern(77, LEN as usize);
    theirs.write_all(&body).expect("send");
    let u = next_used(&mut q);
    assert_eq!((u.id, u.len), (0, LEN + 1), "the READ completes last");
    assert_eq!(status(0), S_OK);
    let mut back = vec![0u8; LEN as usize];
    mem.read_slice(&mut back, GuestAddress(at(0).0 + 16))
        .expect("read back");
    assert!(back == body, "the READ returned other bytes");
    drop(q);
    drop(driver);
    server.stop().expect("serve returns Ok");
}
