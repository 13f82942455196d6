//! parallax-v1 reads through the queue's io_uring (`BlockLayout::map_direct`) on a store opened
//! for direct I/O, over a real vhost-user socket: the reads really take that path (counted),
//! read what was written while writes, FLUSHes (commits, which free superseded blocks for
//! reuse), snapshots, discards and pauses of the disk's switch run on the same blocks, with
//! guest buffers aligned and misaligned, holes and partial blocks; and a Tee whose policy does
//! not check reads serves its trusted reads the same way. Whole-block writes go through the
//! ring too (`BlockLayout::map_direct_write`), racing the same reads, commits and pauses.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{header, pattern, Buf, RangeSeg, Req, TestDriver, TestServer, SERIAL, S_OK};
use dovetail_backend::disk::Engine;
use dovetail_backend::Disk;
use dovetail_layout::{
    BlockLayout, IoBufs, MapGuard, Mapped, MappedPiece, Parallax, Result, Sector, Sectors,
};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{Policy, Switch, Tee, TeeOptions};
use dovetail_store::Store;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const SECTOR: u64 = 512;
const BLOCK: usize = 4096;
const SPB: u64 = (BLOCK as u64) / SECTOR;

/// Forwards everything to `inner`, counting reads mapped for the worker's io_uring and reads
/// the pool carried out.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn BlockLayout>,
    mapped: AtomicU64,
    pooled: AtomicU64,
    /// Writes mapped for the worker's io_uring.
    mapped_writes: AtomicU64,
    /// Mapped reads whose guard was dropped before their completion was reported.
    early: AtomicU64,
}

impl Counting {
    fn new(inner: Arc<dyn BlockLayout>) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            mapped: AtomicU64::new(0),
            pooled: AtomicU64::new(0),
            mapped_writes: AtomicU64::new(0),
            early: AtomicU64::new(0),
        })
    }

    /// Reads mapped so far; fails the test if any guard was released before its completion.
    fn mapped(&self) -> u64 {
        assert_eq!(
            self.early.load(Ordering::Relaxed),
            0,
            "a mapped read's or write's guard was dropped before its completion"
        );
        self.mapped.load(Ordering::Relaxed)
    }

    /// Writes mapped so far (checked like [`mapped`](Counting::mapped)).
    fn mapped_writes(&self) -> u64 {
        self.mapped();
        self.mapped_writes.load(Ordering::Relaxed)
    }
}

impl BlockLayout for Counting {
    fn capacity(&self) -> Sectors {
        self.inner.capacity()
    }
    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
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
    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> Result<()> {
        self.pooled.fetch_add(1, Ordering::Relaxed);
        self.inner.read_into(at, bufs, scratch)
    }
    fn write_from(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> Result<()> {
        self.inner.write_from(at, bufs, scratch)
    }
    fn map_direct_supported(&self) -> bool {
        self.inner.map_direct_supported()
    }
    fn map_direct<'a>(
        &'a self,
        at: Sector,
        len: usize,
        pieces: &mut Vec<MappedPiece>,
    ) -> Option<Mapped<'a>> {
        let m = self.inner.map_direct(at, len, pieces)?;
        self.mapped.fetch_add(1, Ordering::Relaxed);
        Some(Mapped {
            guard: Box::new(Watched {
                inner: m.guard,
                done: false,
                early: &self.early,
            }),
            mem_align: m.mem_align,
        })
    }
    fn map_direct_write<'a>(
        &'a self,
        at: Sector,
        bufs: IoBufs<'_>,
        pieces: &mut Vec<MappedPiece>,
    ) -> Option<Result<Mapped<'a>>> {
        let m = match self.inner.map_direct_write(at, bufs, pieces)? {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        self.mapped_writes.fetch_add(1, Ordering::Relaxed);
        Some(Ok(Mapped {
            guard: Box::new(Watched {
                inner: m.guard,
                done: false,
                early: &self.early,
            }),
            mem_align: m.mem_align,
        }))
    }
}

/// A mapped read's guard that notes whether it was dropped before its completion was
/// reported (its locks released while the read could still be in flight).
struct Watched<'a> {
    inner: Box<dyn MapGuard + 'a>,
    done: bool,
    early: &'a AtomicU64,
}

impl MapGuard for Watched<'_> {
    fn data(&self) -> Option<&[u8]> {
        self.inner.data()
    }

    fn verify(&mut self, bufs: IoBufs<'_>) -> Result<()> {
        self.inner.verify(bufs)
    }

    fn completed(&mut self, ok: bool, took: std::time::Duration) {
        self.done = true;
        self.inner.completed(ok, took);
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.early.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A fresh store in `dir` opened for direct I/O, with disk "vd" of parallax-v1.
fn direct_store(dir: &std::path::Path) -> (Arc<Store>, Arc<Parallax>) {
    let at = dir.join("store");
    Store::create(&at, 256 << 20, 4 << 20).expect("store");
    let store = Store::open_direct(&at).expect("open the store with direct I/O");
    assert!(store.direct_io());
    let key = store
        .create_disk("vd", SIZE, "parallax-v1")
        .expect("create the disk");
    let space = store.space(key).expect("space");
    let p = Parallax::create_layout(
        space,
        "parallax-v1",
        Sectors(SIZE / SECTOR),
        Default::default(),
    )
    .expect("create the version");
    (store, Arc::new(p))
}

/// Block `b`'s contents at version `v`: its number and version in the first 16 bytes, a
/// pattern of both after them.
fn block_data(b: u64, v: u64) -> Vec<u8> {
    let mut d = pattern(b * 1_000_003 + v, BLOCK);
    d[..8].copy_from_slice(&b.to_le_bytes());
    d[8..16].copy_from_slice(&v.to_le_bytes());
    d
}

/// The version block `b` holds in `got`, if `got` is exactly one of its versions.
fn version_of(b: u64, got: &[u8]) -> Option<u64> {
    let nb = u64::from_le_bytes(got[..8].try_into().ok()?);
    let v = u64::from_le_bytes(got[8..16].try_into().ok()?);
    (nb == b && got == block_data(b, v)).then_some(v)
}

/// Blocks rewritten by the writer.
const HOT: u64 = 48;
/// A block queue 0 zeroes (WRITE_ZEROES) between its reads.
const ZEROED: u64 = 200;
/// A block never written (a hole).
const HOLE: u64 = 300;

/// Reads racing writes, commits, snapshots, discards and pauses on the same blocks: queue 1
/// rewrites blocks 0..HOT with a new version per round (scattered 4 KiB and 8 KiB writes, all
/// in flight at once), FLUSHes (a commit: the blocks the round superseded are freed and
/// reused by the next); the test thread takes snapshots and pauses the switch; queue 0 reads
/// every block in batches (4 KiB and 16 KiB reads, a WRITE_ZEROES of another block in the
/// middle of each batch, which this queue carries out itself while its reads are in flight).
/// Every block read is whole, its own, and at least the version whose write completed before
/// the batch began.
#[test]
fn reads_racing_writes_commits_snapshots_and_pauses_read_what_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, parallax) = direct_store(dir.path());
    let counting = Counting::new(parallax.clone());
    let switch = Arc::new(Switch::new(counting.clone()));
    let disk = Disk::new(switch.clone(), false, SERIAL)
        .expect("disk")
        .with_engine(Engine::Auto);
    let server = TestServer::start(Arc::new(disk), 2);
    let driver = TestDriver::connect(server.socket(), 2, 32 << 20);
    // Version 0 everywhere, durable.
    let first: Vec<_> = (0..HOT)
        .map(|b| Req::write(b * SPB, &block_data(b, 0)))
        .collect();
    for c in driver.submit_batch(1, &first) {
        c.assert_ok(0);
    }
    driver
        .submit(1, &Req::write(ZEROED * SPB, &block_data(ZEROED, 0)))
        .assert_ok(0);
    driver.submit(1, &Req::flush()).assert_ok(0);
    // The last round whose writes all completed.
    let completed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    const ROUNDS: u64 = 40;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for v in 1..=ROUNDS {
                // 8 KiB writes over pairs of blocks on odd rounds, 4 KiB ones otherwise,
                // scattered (not in block order).
                let mut reqs = Vec::new();
                let step = if v % 2 == 1 { 2 } else { 1 };
                let mut b = 0;
                while b < HOT {
                    let mut data = block_data(b, v);
                    if step == 2 {
                        data.extend(block_data(b + 1, v));
                    }
                    reqs.push(Req::write(b * SPB, &data));
                    b += step;
                }
                reqs.reverse();
                let turn = (v as usize * 7) % reqs.len();
                reqs.rotate_left(turn);
                for c in driver.submit_batch(1, &reqs) {
                    c.assert_ok(0);
                }
                completed.store(v, Ordering::SeqCst);
                driver.submit(1, &Req::flush()).assert_ok(0);
            }
            stop.store(true, Ordering::SeqCst);
        });
        let reader = s.spawn(|| {
            let mut batches = 0u64;
            while !stop.load(Ordering::SeqCst) || batches < 3 {
                let floor = completed.load(Ordering::SeqCst);
                let mut reqs: Vec<Vec<Buf>> = Vec::new();
                // (first block, blocks) of each read
                let mut what: Vec<(u64, u64)> = Vec::new();
                let mut b = 0;
                while b < HOT {
                    let n = if (b / 4 + batches) % 3 == 0 { 4 } else { 1 };
                    reqs.push(Req::read(b * SPB, (n * BLOCK as u64) as u32));
                    what.push((b, n));
                    b += n;
                }
                let mid = reqs.len() / 2;
                reqs.insert(
                    mid,
                    Req::write_zeroes(&[RangeSeg {
                        sector: ZEROED * SPB,
                        num_sectors: SPB as u32,
                        flags: 0,
                    }]),
                );
                let mut done = driver.submit_batch(0, &reqs);
                let z = done.remove(mid);
                z.assert_ok(0);
                for ((first, n), c) in what.iter().zip(&done) {
                    c.assert_ok((n * BLOCK as u64) as u32);
                    for k in 0..*n {
                        let blk = first + k;
                        let got = &c.data[(k as usize) * BLOCK..(k as usize + 1) * BLOCK];
                        let v = version_of(blk, got).unwrap_or_else(|| {
                            panic!(
                                "batch {batches}: block {blk} read back torn or foreign: \
                                 block {} version {} in its header",
                                u64::from_le_bytes(got[..8].try_into().expect("8")),
                                u64::from_le_bytes(got[8..16].try_into().expect("8")),
                            )
                        });
                        assert!(
                            v >= floor,
                            "batch {batches}: block {blk} read version {v}, but version \
                             {floor} was written before the read began"
                        );
                    }
                }
                batches += 1;
            }
            batches
        });
        // Snapshots and pauses meanwhile.
        let mut snaps = 0;
        while !writer.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(15));
            parallax
                .snapshot(&format!("s{snaps}"))
                .expect("snapshot during the race");
            snaps += 1;
            let (r, _) = switch.replace(counting.clone());
            r.expect("same capacity");
        }
        writer.join().expect("writer");
        let batches = reader.join().expect("reader");
        assert!(batches >= 3, "{batches} read batches");
    });
    // Everything at its last version; the zeroed block and the hole read as zeros.
    let reqs: Vec<_> = (0..HOT).map(|b| Req::read(b * SPB, BLOCK as u32)).collect();
    for (b, c) in driver.submit_batch(0, &reqs).iter().enumerate() {
        c.assert_ok(BLOCK as u32);
        assert_eq!(version_of(b as u64, &c.data), Some(ROUNDS), "block {b}");
    }
    for blk in [ZEROED, HOLE] {
        let c = driver.submit(0, &Req::read(blk * SPB, BLOCK as u32));
        c.assert_ok(BLOCK as u32);
        assert!(c.data.iter().all(|&x| x == 0), "block {blk} is not zeros");
    }
    let mapped = counting.mapped();
    let writes = counting.mapped_writes();
    eprintln!(
        "{mapped} reads and {writes} writes mapped for io_uring, {} reads through the pool",
        counting.pooled.load(Ordering::Relaxed)
    );
    assert!(
        writes > HOT,
        "only {writes} writes were mapped for io_uring"
    );
    assert!(
        mapped > HOT * 2,
        "only {mapped} reads were mapped for io_uring ({} through the pool)",
        counting.pooled.load(Ordering::Relaxed)
    );
    drop(driver);
    server.stop().expect("serve returns Ok");
    // What the guest saw is what was committed.
    for b in 0..HOT {
        let mut buf = vec![0u8; BLOCK];
        parallax.read(Sector(b * SPB), &mut buf).expect("read");
        assert_eq!(version_of(b, &buf), Some(ROUNDS), "block {b} on the layout");
    }
}

/// Guest buffers aligned, at odd offsets and split at odd lengths, over written blocks, holes
/// and a partial block: every read returns the model's bytes (through io_uring straight into
/// guest memory when aligned, through a bounce buffer otherwise) and writes nothing past its
/// buffer.
#[test]
fn misaligned_guest_buffers_read_through_the_ring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, parallax) = direct_store(dir.path());
    let counting = Counting::new(parallax.clone());
    let disk = Disk::new(counting.clone(), false, SERIAL)
        .expect("disk")
        .with_engine(Engine::Auto);
    let server = TestServer::start(Arc::new(disk), 1);
    let driver = TestDriver::connect(server.socket(), 1, 16 << 20);
    // Blocks 0..16 written, 16..20 a hole, 20..24 written, the sector 22 * 8 + 3 rewritten.
    let mut model = vec![0u8; 32 * BLOCK];
    for (b, v) in (0..16u64).chain(20..24).map(|b| (b, 1)) {
        let d = block_data(b, v);
        model[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&d);
        driver.submit(0, &Req::write(b * SPB, &d)).assert_ok(0);
    }
    let sector = pattern(77, SECTOR as usize);
    let s = (22 * SPB + 3) as usize;
    model[s * SECTOR as usize..(s + 1) * SECTOR as usize].copy_from_slice(&sector);
    driver
        .submit(0, &Req::write(s as u64, &sector))
        .assert_ok(0);
    driver.submit(0, &Req::flush()).assert_ok(0);
    let (area, len) = driver.queue(0).expect("queue").data_area();
    assert!(len > 8 * MIB, "data area of {len} bytes");
    let base = (area.0 + 4 * MIB + 4095) & !4095;
    let mem = driver.memory();
    // (first sector, offset of the buffer from a page boundary, lengths of its pieces)
    let shapes: [(u64, u64, &[u32]); 10] = [
        (0, 0, &[16384]),
        (0, 0, &[4096, 8192]),
        (8, 16, &[8192]),
        (16, 512, &[4096]),
        (0, 0, &[1000, 3096, 4096]),
        // Over the hole and on into written blocks.
        (14 * SPB, 0, &[4096 * 8]),
        (14 * SPB, 24, &[4096 * 4, 4096 * 4]),
        // Part of blocks, the rewritten sector among them.
        (22 * SPB + 1, 0, &[512 * 5]),
        (21 * SPB + 7, 512, &[512, 4096, 1024]),
        // From inside the hole's last block into a written one.
        (19 * SPB + 1, 0, &[3584 + 4096]),
    ];
    let before = counting.mapped();
    for (k, (at, skew, pieces)) in shapes.iter().enumerate() {
        let total: u32 = pieces.iter().sum();
        let want = &model[(*at * SECTOR) as usize..(*at * SECTOR) as usize + total as usize];
        let dst = GuestAddress(base + (k as u64) * MIB / 4 + skew);
        mem.write_slice(
            &vec![0xee; total as usize + 8192],
            GuestAddress(dst.0 - skew),
        )
        .expect("poison");
        let mut bufs = vec![Buf::Out(header(VIRTIO_BLK_T_IN, *at))];
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
        assert_eq!(c.status, Some(S_OK), "shape {k}");
        assert_eq!(c.used_len, total + 1, "shape {k}");
        let mut back = vec![0u8; total as usize + 16];
        mem.read_slice(&mut back, dst).expect("guest read");
        assert!(back[..total as usize] == *want, "shape {k} read back wrong");
        assert!(
            back[total as usize..].iter().all(|&b| b == 0xee),
            "shape {k}: the read wrote past its buffer"
        );
    }
    let mapped = counting.mapped() - before;
    assert!(
        mapped >= 5,
        "only {mapped} of the shapes' reads were mapped for io_uring"
    );
    // A write from a misaligned buffer lands too (through the ring's bounce buffer).
    let writes = counting.mapped_writes();
    let data = pattern(5, 8192);
    let src = GuestAddress(base + 3 * MIB + 16);
    mem.write_slice(&data, src).expect("guest write");
    let bufs = vec![
        Buf::Out(header(VIRTIO_BLK_T_OUT, 30 * SPB)),
        Buf::Raw {
            addr: src.0,
            len: 8192,
            writable: false,
        },
        Buf::In(1),
    ];
    driver.submit(0, &bufs).assert_ok(0);
    let c = driver.submit(0, &Req::read(30 * SPB, 8192));
    c.assert_ok(8192);
    assert!(c.data == data);
    assert_eq!(
        counting.mapped_writes(),
        writes + 1,
        "the misaligned write was not mapped"
    );
    drop(driver);
    server.stop().expect("serve returns Ok");
}

/// A Tee whose policy does not check reads (mirror-only) serves the guest's reads from the
/// trusted version through io_uring; under a policy that checks them, reads of blocks the
/// candidate holds go through the pool (compared with the candidate), and both read the same.
#[test]
fn a_tee_serves_trusted_reads_through_the_ring_when_reads_are_not_checked() {
    for (policy, expect_mapped) in [(Policy::MirrorOnly, true), (Policy::SyncCrossChecks, false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, trusted) = direct_store(dir.path());
        let ckey = store
            .add_version("vd", "parallax-v2")
            .expect("add a candidate");
        let candidate = Arc::new(
            Parallax::create_layout(
                store.space(ckey).expect("space"),
                "parallax-v2",
                Sectors(SIZE / SECTOR),
                Default::default(),
            )
            .expect("candidate"),
        );
        let presence =
            PresenceMap::create(&store.map_path(ckey), SIZE / 4096, ckey.0).expect("presence map");
        let tee = Arc::new(
            Tee::new(
                trusted.clone(),
                candidate,
                Arc::new(presence),
                TeeOptions::new("vd", policy),
            )
            .expect("tee"),
        );
        // Counted at the Tee's level: its mapped reads are the trusted version's.
        let top = Counting::new(tee);
        let disk = Disk::new(top.clone(), false, SERIAL)
            .expect("disk")
            .with_engine(Engine::Auto);
        let server = TestServer::start(Arc::new(disk), 1);
        let driver = TestDriver::connect(server.socket(), 1, 16 << 20);
        let writes: Vec<_> = (0..32u64)
            .map(|b| Req::write(b * SPB, &block_data(b, 3)))
            .collect();
        for c in driver.submit_batch(0, &writes) {
            c.assert_ok(0);
        }
        driver.submit(0, &Req::flush()).assert_ok(0);
        let reads: Vec<_> = (0..32u64)
            .map(|b| Req::read(b * SPB, BLOCK as u32))
            .collect();
        for (b, c) in driver.submit_batch(0, &reads).iter().enumerate() {
            c.assert_ok(BLOCK as u32);
            assert_eq!(
                version_of(b as u64, &c.data),
                Some(3),
                "{policy}: block {b}"
            );
        }
        let mapped = top.mapped();
        if expect_mapped {
            assert!(mapped >= 16, "{policy}: only {mapped} reads were mapped");
        } else {
            assert_eq!(
                mapped, 0,
                "{policy}: reads the candidate must check were mapped"
            );
        }
        drop(driver);
        server.stop().expect("serve returns Ok");
    }
}

/// The guard of a mapped read keeps its pieces valid: until it is dropped, a write to its
/// block (here rewritten in place: allocated since the last commit) and a commit (which would
/// free the blocks the read reads) wait, and further mappings are refused rather than wait
/// (the worker holding guards must never block); the mapped file range holds the data the
/// read must return. Holes map to zero pieces; parallax-v2 (checksums to verify) maps nothing.
#[test]
fn a_mapping_holds_off_writes_and_commits_of_its_blocks_until_dropped() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, p) = direct_store(dir.path());
    assert!(p.map_direct_supported());
    let b = 5u64;
    p.write(Sector(b * SPB), &block_data(b, 1)).expect("write");
    p.flush().expect("commit");
    // Copied on write into a block of the current epoch, rewritten in place from now on.
    p.write(Sector(b * SPB), &block_data(b, 2)).expect("write");
    let mut pieces = Vec::new();
    let m = p
        .map_direct(Sector(b * SPB), 2 * BLOCK, &mut pieces)
        .expect("mapped");
    assert_eq!(pieces.len(), 2, "{pieces:?}");
    assert_eq!(
        (pieces[1].at, pieces[1].len, pieces[1].file),
        (BLOCK, BLOCK, None)
    );
    let (fd, offset) = pieces[0].file.expect("a file piece");
    assert_eq!((pieces[0].at, pieces[0].len), (0, BLOCK));
    // SAFETY: `fd` is the tier file's, open while the store lives; `ManuallyDrop` keeps this
    // borrowed handle from closing it.
    let file = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let read_mapped = || {
        let mut buf = dovetail_layout::engine::AlignedBuf::new(BLOCK);
        file.read_exact_at(buf.as_mut_slice(), offset)
            .expect("read the mapped range");
        buf.as_slice().to_vec()
    };
    std::thread::scope(|s| {
        let writer = s.spawn(|| p.write(Sector(b * SPB), &block_data(b, 3)));
        let committer = s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            p.flush()
        });
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert!(
            !writer.is_finished(),
            "a write of a mapped block did not wait"
        );
        assert!(
            !committer.is_finished(),
            "a commit did not wait for a mapped read"
        );
        assert_eq!(version_of(b, &read_mapped()), Some(2));
        let mut other = Vec::new();
        assert!(
            p.map_direct(Sector(b * SPB), BLOCK, &mut other).is_none(),
            "a mapping waited for, or went past, a waiting write"
        );
        drop(m);
        writer.join().expect("writer").expect("write");
        committer.join().expect("committer").expect("commit");
    });
    let mut buf = vec![0u8; BLOCK];
    p.read(Sector(b * SPB), &mut buf).expect("read");
    assert_eq!(version_of(b, &buf), Some(3));
    // parallax-v2 maps its reads too (checksums verified when they completed), but not the
    // read of part of a block it must verify.
    let key = store.add_version("vd", "parallax-v2").expect("v2");
    let v2 = Parallax::create_layout(
        store.space(key).expect("space"),
        "parallax-v2",
        Sectors(SIZE / SECTOR),
        Default::default(),
    )
    .expect("v2");
    v2.write(Sector(0), &block_data(0, 1)).expect("write");
    assert!(v2.map_direct_supported());
    assert!(v2.map_direct(Sector(1), 512, &mut pieces).is_none());
    assert!(v2.map_direct(Sector(0), BLOCK, &mut pieces).is_some());
}

/// parallax-v2's mapped reads are verified against the blocks' checksums once read
/// (`MapGuard::verify`): a block whose bytes went bad in memory is read again and repaired in
/// the buffer, one bad on disk fails the read (never wrong data); through a served disk, the
/// reads are mapped, read right, and the read of the bad block answers IOERR.
#[test]
fn parallax_v2_mapped_reads_are_verified_against_their_checksums() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _v1) = direct_store(dir.path());
    let key = store.add_version("vd", "parallax-v2").expect("v2");
    let v2 = Arc::new(
        Parallax::create_layout(
            store.space(key).expect("space"),
            "parallax-v2",
            Sectors(SIZE / SECTOR),
            Default::default(),
        )
        .expect("v2"),
    );
    const N: u64 = 8;
    for b in 0..N {
        v2.write(Sector(b * SPB), &block_data(b, 1)).expect("write");
    }
    v2.flush().expect("commit");
    let want: Vec<u8> = (0..N).flat_map(|b| block_data(b, 1)).collect();
    // The worker's part: every piece read into an aligned buffer, then verified.
    let read_mapped = |buf: &mut dovetail_layout::engine::AlignedBuf| {
        let mut pieces = Vec::new();
        let m = v2
            .map_direct(Sector(0), N as usize * BLOCK, &mut pieces)
            .expect("mapped");
        for pc in &pieces {
            let (fd, offset) = pc.file.expect("a file piece");
            // SAFETY: `fd` is the tier file's, open while the store lives; `ManuallyDrop`
            // keeps this borrowed handle from closing it.
            let file = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            file.read_exact_at(&mut buf.as_mut_slice()[pc.at..pc.at + pc.len], offset)
                .expect("read the mapped range");
        }
        (m, pieces)
    };
    let mut buf = dovetail_layout::engine::AlignedBuf::new(N as usize * BLOCK);
    let (mut m, pieces) = read_mapped(&mut buf);
    // Block 5 goes bad in memory only: verify reads it again and repairs the buffer.
    buf.as_mut_slice()[5 * BLOCK + 100] ^= 0xff;
    let one = [buf.iobuf()];
    // SAFETY: `buf` outlives this list and nothing else uses it meanwhile.
    m.guard
        .verify(unsafe { IoBufs::new(&one) })
        .expect("verified after the repair");
    m.guard.completed(true, std::time::Duration::ZERO);
    drop(m);
    assert!(
        buf.as_slice() == want.as_slice(),
        "the buffer was not repaired"
    );
    // Block 3 goes bad on disk: the verification fails the read.
    let (fd, offset) = pieces
        .iter()
        .find(|p| p.at <= 3 * BLOCK && 3 * BLOCK < p.at + p.len)
        .and_then(|p| p.file.map(|(fd, o)| (fd, o + (3 * BLOCK - p.at) as u64)))
        .expect("block 3's piece");
    let mut bad = dovetail_layout::engine::AlignedBuf::new(BLOCK);
    bad.as_mut_slice().copy_from_slice(&block_data(3, 99));
    // SAFETY: as above.
    let file = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    file.write_all_at(bad.as_slice(), offset)
        .expect("damage block 3");
    let mut buf = dovetail_layout::engine::AlignedBuf::new(N as usize * BLOCK);
    let (mut m, _) = read_mapped(&mut buf);
    let one = [buf.iobuf()];
    // SAFETY: as above.
    let e = m
        .guard
        .verify(unsafe { IoBufs::new(&one) })
        .expect_err("a bad block passed verification");
    assert!(e.to_string().contains("checksum"), "{e}");
    m.guard.completed(false, std::time::Duration::ZERO);
    drop(m);
    // Served: the reads go through the ring and are verified there.
    let counting = Counting::new(v2.clone());
    let disk = Disk::new(counting.clone(), false, SERIAL)
        .expect("disk")
        .with_engine(Engine::Auto);
    let server = TestServer::start(Arc::new(disk), 1);
    let driver = TestDriver::connect(server.socket(), 1, 16 << 20);
    let reqs: Vec<_> = (0..N).map(|b| Req::read(b * SPB, BLOCK as u32)).collect();
    for (b, c) in driver.submit_batch(0, &reqs).iter().enumerate() {
        if b == 3 {
            assert_eq!(c.status, Some(common::S_IOERR), "the bad block read");
        } else {
            c.assert_ok(BLOCK as u32);
            assert_eq!(version_of(b as u64, &c.data), Some(1), "block {b}");
        }
    }
    assert!(
        counting.mapped() >= N - 1,
        "only {} of the reads were mapped",
        counting.mapped()
    );
    // Writes through the ring (from the layout's copy, whose checksums it noted): read back
    // verified, and their checksums hold after a commit and a reopen.
    let writes: Vec<_> = (N..2 * N)
        .map(|b| Req::write(b * SPB, &block_data(b, 2)))
        .collect();
    for c in driver.submit_batch(0, &writes) {
        c.assert_ok(0);
    }
    driver.submit(0, &Req::flush()).assert_ok(0);
    assert!(
        counting.mapped_writes() >= N,
        "only {} of the writes were mapped",
        counting.mapped_writes()
    );
    let reqs: Vec<_> = (N..2 * N)
        .map(|b| Req::read(b * SPB, BLOCK as u32))
        .collect();
    for (k, c) in driver.submit_batch(0, &reqs).iter().enumerate() {
        let b = N + k as u64;
        c.assert_ok(BLOCK as u32);
        assert_eq!(version_of(b, &c.data), Some(2), "block {b}");
    }
    drop(driver);
    server.stop().expect("serve returns Ok");
    drop(counting);
    let v2 = Arc::try_unwrap(v2).expect("the only reference");
    drop(v2);
    let v2 = Parallax::open(store.space(key).expect("space")).expect("reopen v2");
    for b in N..2 * N {
        let mut buf = vec![0u8; BLOCK];
        v2.read(Sector(b * SPB), &mut buf)
            .expect("verified read after the reopen");
        assert_eq!(version_of(b, &buf), Some(2), "block {b} after the reopen");
    }
}

/// A mapped write (`map_direct_write`) is unseen until the worker reports its completion: a
/// read of its blocks and a commit wait for the guard (a read never sees a pointer whose data
/// is not written, a commit never captures it), further mappings of its blocks are refused
/// rather than waited for; once the pieces are written and the guard told and dropped, the
/// read returns the new data, the commit covers it, and the store reopened holds it.
#[test]
fn a_mapped_write_is_unseen_by_reads_and_commits_until_it_completed() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, p) = direct_store(dir.path());
    let b = 9u64;
    p.write(Sector(b * SPB), &block_data(b, 1)).expect("write");
    p.write(Sector((b + 1) * SPB), &block_data(b + 1, 1))
        .expect("write");
    p.flush().expect("commit");
    let data = [block_data(b, 2), block_data(b + 1, 2)].concat();
    let src = [dovetail_layout::IoBuf {
        ptr: data.as_ptr().cast_mut(),
        len: data.len(),
    }];
    // SAFETY: `data` lives (unchanged) past every use of these lists; the layout only reads it.
    let io = || unsafe { IoBufs::new(&src) };
    let mut pieces = Vec::new();
    let mut m = p
        .map_direct_write(Sector(b * SPB), io(), &mut pieces)
        .expect("mapped")
        .expect("no error");
    assert_eq!(pieces.iter().map(|x| x.len).sum::<usize>(), 2 * BLOCK);
    assert!(pieces.iter().all(|x| x.file.is_some()), "{pieces:?}");
    let mut other = Vec::new();
    assert!(
        p.map_direct(Sector(b * SPB), BLOCK, &mut other).is_none(),
        "a read of a block being written was mapped"
    );
    assert!(
        p.map_direct_write(Sector((b + 1) * SPB), io(), &mut other)
            .is_none(),
        "a second write of a block being written was mapped"
    );
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = vec![0u8; BLOCK];
            p.read(Sector(b * SPB), &mut buf).map(|()| buf)
        });
        let committer = s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            p.flush()
        });
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert!(
            !reader.is_finished(),
            "a read did not wait for a mapped write"
        );
        assert!(
            !committer.is_finished(),
            "a commit did not wait for a mapped write"
        );
        // The worker's part: the pieces written (direct I/O: an aligned copy).
        let mut buf = dovetail_layout::engine::AlignedBuf::new(data.len());
        buf.as_mut_slice().copy_from_slice(&data);
        for pc in &pieces {
            let (fd, offset) = pc.file.expect("a file piece");
            // SAFETY: `fd` is the tier file's, open while the store lives; `ManuallyDrop`
            // keeps this borrowed handle from closing it.
            let file = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
            });
            file.write_all_at(&buf.as_slice()[pc.at..pc.at + pc.len], offset)
                .expect("write the mapped range");
        }
        m.guard.completed(true, std::time::Duration::ZERO);
        drop(m);
        let got = reader.join().expect("reader").expect("read");
        assert_eq!(version_of(b, &got), Some(2), "the read after the write");
        committer.join().expect("committer").expect("commit");
    });
    // Durable: the store reopened (buffered) reads the new data.
    let key = store.disk("vd").expect("disk").trusted;
    drop(p);
    drop(store);
    let store = Store::open(&dir.path().join("store")).expect("reopen");
    let p = Parallax::open(store.space(key).expect("space")).expect("reopen the version");
    for k in [b, b + 1] {
        let mut buf = vec![0u8; BLOCK];
        p.read(Sector(k * SPB), &mut buf).expect("read");
        assert_eq!(version_of(k, &buf), Some(2), "block {k} after the reopen");
    }
}
