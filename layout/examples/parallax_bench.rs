//! Random 4 KiB reads (and writes) through parallax-v1 compared with the layouts without a tree:
//!
//! - `mem`: `MemLayout` against parallax-v1 on the in-memory `MemSpace`;
//! - `file`: `RawLayout` on a file against parallax-v1 on a minimal file-backed space (one file,
//!   extent `e` at byte `e * extent size`, no grant persistence): both read through the page
//!   cache with one `pread` per request, so the difference is the tree lookup.
//!
//! `cargo run --release -p dovetail-layout --example parallax_bench [MiB] [reads] [reads]`
//! (a third argument `reads` skips the write comparison). Writes on `MemSpace` are slow by
//! construction: its `sync` copies every extent to simulate durability.
//!
//! `BENCH_SPACE=1` also times `MemSpace::read` alone at the same places (the floor for
//! parallax-v1 on that space); `BENCH_PARALLAX_ONLY=1` stops after the in-memory parallax-v1
//! reads (for profiling).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dovetail_layout::raw::{RawLayout, RawOptions};
use dovetail_layout::{BlockLayout, MemLayout, Parallax, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{ExtentId, StoreError, VersionKey, VersionSpace};

/// A bare file-backed space for measuring: every extent it grants is its own.
#[derive(Debug)]
struct FileSpace {
    file: File,
    extent_size: u64,
    next: AtomicU32,
    root: Mutex<Vec<u8>>,
    violations: AtomicU64,
}

fn io(op: &str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        op: op.to_string(),
        source,
    }
}

impl VersionSpace for FileSpace {
    fn key(&self) -> VersionKey {
        VersionKey(1)
    }
    fn extent_size(&self) -> u64 {
        self.extent_size
    }
    fn extents(&self) -> Vec<ExtentId> {
        (0..self.next.load(Ordering::Relaxed))
            .map(ExtentId)
            .collect()
    }
    fn grant_extent(&self) -> dovetail_store::Result<ExtentId> {
        Ok(ExtentId(self.next.fetch_add(1, Ordering::Relaxed)))
    }
    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> dovetail_store::Result<()> {
        let at = u64::from(extent.0) * self.extent_size + offset;
        self.file.read_exact_at(buf, at).map_err(io("read"))
    }
    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> dovetail_store::Result<()> {
        if extent.0 >= self.next.load(Ordering::Relaxed) {
            self.violations.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::GrantViolation {
                key: VersionKey(1),
                extent,
                offset,
            });
        }
        let at = u64::from(extent.0) * self.extent_size + offset;
        self.file.write_all_at(buf, at).map_err(io("write"))
    }
    fn sync(&self) -> dovetail_store::Result<()> {
        self.file.sync_data().map_err(io("sync"))
    }
    fn root(&self) -> Vec<u8> {
        self.root.lock().map(|r| r.clone()).unwrap_or_default()
    }
    fn commit_root(&self, record: &[u8]) -> dovetail_store::Result<()> {
        if let Ok(mut r) = self.root.lock() {
            *r = record.to_vec();
        }
        Ok(())
    }
    fn grant_violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }
}

/// xorshift64*
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn fill(d: &dyn BlockLayout) {
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut at = 0;
    while at < d.capacity().0 {
        d.write(Sector(at), &chunk).expect("fill");
        at += 2048;
    }
    d.flush().expect("flush");
}

/// 4 KiB random reads per second.
fn reads(d: &dyn BlockLayout, n: u64) -> f64 {
    let blocks = d.capacity().0 / 8;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let skew: usize = std::env::var("BENCH_SKEW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut big = vec![0u8; 8192];
    let buf = &mut big[skew..skew + 4096];
    // Warm up (fills the node cache).
    for _ in 0..n / 4 {
        d.read(Sector(rng.below(blocks) * 8), buf).expect("read");
    }
    let t = Instant::now();
    for _ in 0..n {
        d.read(Sector(rng.below(blocks) * 8), buf).expect("read");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// 4 KiB random writes per second, flushing every 256 writes.
fn writes(d: &dyn BlockLayout, n: u64) -> f64 {
    let blocks = d.capacity().0 / 8;
    let mut rng = Rng(0x0fed_cba9_8765_4321);
    let buf = vec![0x5au8; 4096];
    let t = Instant::now();
    for i in 0..n {
        d.write(Sector(rng.below(blocks) * 8), &buf).expect("write");
        if i % 256 == 255 {
            d.flush().expect("flush");
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn compare(
    what: &str,
    base_name: &str,
    base: &dyn BlockLayout,
    plx: &dyn BlockLayout,
    n: u64,
    with_writes: bool,
) {
    // Best of three alternating rounds, to damp the noise of a shared machine.
    let (mut rb, mut rp) = (0f64, 0f64);
    for _ in 0..3 {
        rb = rb.max(reads(base, n));
        rp = rp.max(reads(plx, n));
    }
    println!(
        "{what}: 4 KiB random reads: {base_name} {:.0}/s, parallax-v1 {:.0}/s, ratio {:.2}",
        rb,
        rp,
        rp / rb
    );
    if !with_writes {
        return;
    }
    let (wb, wp) = (writes(base, n / 4), writes(plx, n / 4));
    println!(
        "{what}: 4 KiB random writes (flush every 256): {base_name} {:.0}/s, parallax-v1 {:.0}/s, ratio {:.2}",
        wb,
        wp,
        wp / wb
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let with_writes = args.next().as_deref() != Some("reads");
    let capacity = Sectors(mib * 2048);

    let mem = MemLayout::new(capacity);
    let pool = MemPool::new(4096);
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), 64 << 20));
    let space2 = space.clone();
    let plx = Parallax::create(space, capacity).expect("create");
    fill(&mem);
    fill(&plx);
    if std::env::var_os("BENCH_SPACE").is_some() {
        let blocks = capacity.0 / 8;
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut buf = vec![0u8; 4096];
        let ext = space2.extents();
        let per = (64u64 << 20) / 4096;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..n {
                let b = rng.below(blocks);
                space2
                    .read(ext[(b / per) as usize], (b % per) * 4096, &mut buf)
                    .expect("read");
            }
            println!(
                "MemSpace::read alone: {:.0}/s",
                n as f64 / t.elapsed().as_secs_f64()
            );
            println!("parallax-v1 on MemSpace: {:.0} reads/s", reads(&plx, n));
        }
    }
    println!("{mib} MiB disk, tree depth {}, {n} reads", plx.depth());
    if std::env::var_os("BENCH_PARALLAX_ONLY").is_some() {
        println!("parallax-v1 on MemSpace: {:.0} reads/s", reads(&plx, n));
        return;
    }
    compare("mem", "MemLayout", &mem, &plx, n, with_writes);
    drop((mem, plx));

    let dir = tempfile::tempdir().expect("tempdir");
    let raw = RawLayout::open(
        &dir.path().join("raw.img"),
        RawOptions {
            create_size: Some(capacity.0 * 512),
            read_only: false,
            cache: None,
        },
    )
    .expect("raw");
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("space.img"))
        .expect("space file");
    let space = Arc::new(FileSpace {
        file,
        extent_size: 64 << 20,
        next: AtomicU32::new(0),
        root: Mutex::new(Vec::new()),
        violations: AtomicU64::new(0),
    });
    let space2 = space.clone();
    let plx = Parallax::create(space, capacity).expect("create");
    fill(&raw);
    fill(&plx);
    if std::env::var_os("BENCH_SPACE").is_some() {
        let blocks = capacity.0 / 8;
        let per = (64u64 << 20) / 4096;
        let mut buf = vec![0u8; 4096];
        for _ in 0..3 {
            let mut rng = Rng(0x1234_5678_9abc_def1);
            let t = Instant::now();
            for _ in 0..n {
                let b = rng.below(blocks);
                space2
                    .read(ExtentId((b / per) as u32), (b % per) * 4096, &mut buf)
                    .expect("read");
            }
            println!(
                "file space read alone: {:.0}/s",
                n as f64 / t.elapsed().as_secs_f64()
            );
        }
    }
    compare("file", "RawLayout", &raw, &plx, n, with_writes);
}
