//! `dovetail-bench tiers`: what parallax-v2's tiering buys and costs, measured in process on a
//! real two-tier store.
//!
//! The store has a `fast` tier on a memory-backed file system (`/dev/shm` when it exists) and a
//! `slow` tier in the benchmark's directory (the machine's disk). One parallax-v2 disk is
//! written in full with compressible data (text-like blocks), then:
//!
//! 1. **demote**: every block made cold (the policy's cold-after set to 1 s) and moved by the
//!    mover to the slow tier, compressed; the slow tier's pages are then dropped from the page
//!    cache (fsync + `POSIX_FADV_DONTNEED`), so reads go to the device;
//! 2. **hot set before**: 4 KiB random reads over a hot set (16 MiB) for a few seconds, one
//!    thread: each read is a compressed block on the slow tier;
//! 3. the hot set is read twice more (so the mover sees it hot) and a mover round promotes it;
//! 4. **hot set after**: the same reads, now of uncompressed blocks on the fast tier;
//! 5. **compressed cold reads**: the same reads over a cold region of the same size, with the
//!    slow tier in the page cache, so what is measured is the decompression (against step 4,
//!    which reads uncompressed blocks from memory too).
//!
//! Peers, measured in the same run: 4 KiB random `pread`s of the slow tier file with its pages
//! dropped (the device), and of the fast tier file (memory). Every read's bytes are compared
//! with what was written.

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_layout::parallax::{Class, Parallax, ParallaxOptions, TierPolicy};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::store::TierSpec;
use dovetail_store::{Store, VersionSpace};

use crate::compare::{CompareError, Machine};

/// Marker comments around the section in BENCHMARKS.md.
pub const BEGIN: &str = "<!-- dovetail-bench tiers: begin -->";
pub const END: &str = "<!-- dovetail-bench tiers: end -->";
/// The section's title.
pub const TITLE: &str = "Tiering: hot-set reads before and after the mover, compressed cold reads";

const BLOCK: usize = 4096;

/// What to run.
#[derive(Debug, Clone)]
pub struct TiersOptions {
    pub dir: PathBuf,
    /// Where the fast tier's file goes.
    pub fast_dir: PathBuf,
    /// Size of the disk (and of each tier).
    pub size: u64,
    /// Size of the hot set (and of the cold region read in step 5).
    pub hot: u64,
    pub duration: Duration,
}

impl TiersOptions {
    pub fn new(dir: PathBuf) -> TiersOptions {
        let shm = Path::new("/dev/shm");
        TiersOptions {
            fast_dir: if shm.is_dir() {
                shm.to_path_buf()
            } else {
                dir.clone()
            },
            dir,
            size: 512 << 20,
            hot: 16 << 20,
            duration: Duration::from_secs(4),
        }
    }
}

/// One measured row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub what: String,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The whole result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TiersResult {
    pub rows: Vec<Row>,
    /// Blocks the demotion moved and how long it took.
    pub demoted: u64,
    pub demote_secs: f64,
    pub promoted: u64,
    pub promote_secs: f64,
    /// Bytes of the slow tier file actually allocated after the demotion.
    pub slow_allocated: u64,
    /// Every read returned what was written.
    pub exact: bool,
    pub fast_dir: String,
}

fn err(what: impl Into<String>) -> CompareError {
    CompareError::Io {
        what: what.into(),
        source: std::io::Error::other("failed"),
    }
}

fn layout_err(what: &str, e: dovetail_layout::Error) -> CompareError {
    err(format!("{what}: {}", dovetail_layout::error_chain(&e)))
}

/// Compressible, and different for every block.
pub fn text_block(b: u64) -> Vec<u8> {
    let line = format!("block {b:010} of the tiering benchmark, ");
    line.bytes().cycle().take(BLOCK).collect()
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// 4 KiB random reads over blocks `[first, first + blocks)` for `d`: IOPS (one thread, from
/// the reads' own time), p50, p99, and whether every checked read returned `expect(block)`.
/// `evict` runs before each read, untimed (it drops the slow tier's pages, so every read of
/// the slow tier goes to the device).
fn measure(
    d: &Duration,
    first: u64,
    blocks: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), CompareError>,
    expect: impl Fn(u64) -> Vec<u8>,
    mut evict: impl FnMut() -> Result<(), CompareError>,
) -> Result<(f64, f64, f64, bool), CompareError> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut buf = vec![0u8; BLOCK];
    let mut lat: Vec<f64> = Vec::new();
    let mut exact = true;
    let mut busy = 0.0;
    let t0 = Instant::now();
    while t0.elapsed() < *d {
        let b = first + rng.below(blocks);
        evict()?;
        let t = Instant::now();
        read(b, &mut buf)?;
        let took = t.elapsed().as_secs_f64();
        busy += took;
        lat.push(took * 1e6);
        // One read in 16 is checked byte for byte (the rest would measure the compare).
        if lat.len() % 16 == 0 && buf != expect(b) {
            exact = false;
        }
    }
    lat.sort_by(f64::total_cmp);
    let pick = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    Ok((lat.len() as f64 / busy, pick(0.5), pick(0.99), exact))
}

fn drop_cache(path: &Path) -> Result<(), CompareError> {
    let f = std::fs::File::open(path).map_err(|e| CompareError::Io {
        what: format!("open {}", path.display()),
        source: e,
    })?;
    f.sync_all().map_err(|e| CompareError::Io {
        what: format!("fsync {}", path.display()),
        source: e,
    })?;
    drop_pages(&f)
}

/// Drops the (clean) pages of `f` from the page cache.
fn drop_pages(f: &std::fs::File) -> Result<(), CompareError> {
    // SAFETY: a valid descriptor of an open file; advice only.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(err(format!("posix_fadvise: error {rc}")));
    }
    Ok(())
}

fn round(d: &Parallax) -> Result<(u64, u64), CompareError> {
    let (mut promoted, mut demoted) = (0, 0);
    loop {
        let r = d
            .tier_pass(256, 1 << 16)
            .map_err(|e| layout_err("mover pass", e))?;
        promoted += r.promoted;
        demoted += r.demoted;
        if r.wrapped {
            return Ok((promoted, demoted));
        }
    }
}

fn pread_at(f: &std::fs::File, at: u64, buf: &mut [u8]) -> Result<(), CompareError> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, at).map_err(|e| CompareError::Io {
        what: "pread".to_string(),
        source: e,
    })
}

/// Runs the benchmark.
pub fn run(o: &TiersOptions) -> Result<TiersResult, CompareError> {
    let store_dir = o.dir.join("store");
    let _ = std::fs::remove_dir_all(&store_dir);
    let fast = o
        .fast_dir
        .join(format!("dovetail-bench-fast-{}", std::process::id()));
    let slow = o.dir.join("slow.tier");
    let _ = std::fs::remove_file(&fast);
    let _ = std::fs::remove_file(&slow);
    std::fs::create_dir_all(&o.dir).map_err(|e| CompareError::Io {
        what: format!("create {}", o.dir.display()),
        source: e,
    })?;
    let result = run_in(o, &store_dir, &fast, &slow);
    let _ = std::fs::remove_file(&fast);
    result
}

fn run_in(
    o: &TiersOptions,
    store_dir: &Path,
    fast: &Path,
    slow: &Path,
) -> Result<TiersResult, CompareError> {
    let extent = 16u64 << 20;
    let tier_size = (o.size * 2).div_ceil(extent) * extent;
    let store = Store::create_tiered(
        store_dir,
        &[
            TierSpec {
                name: "fast".into(),
                path: fast.to_path_buf(),
                size: tier_size,
            },
            TierSpec {
                name: "slow".into(),
                path: slow.to_path_buf(),
                size: tier_size,
            },
        ],
        extent,
    )
    .map_err(|e| err(format!("create the store: {e}")))?;
    let key = store
        .create_disk("bench", o.size, "parallax-v2")
        .map_err(|e| err(format!("create the disk: {e}")))?;
    let space: Arc<dyn VersionSpace> = store
        .space(key)
        .map_err(|e| err(format!("open the disk's space: {e}")))?;
    let opts = ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    };
    let d = Parallax::create_layout(space, "parallax-v2", Sectors(o.size / 512), opts)
        .map_err(|e| layout_err("create parallax-v2", e))?;
    let blocks = o.size / BLOCK as u64;
    let hot_blocks = o.hot / BLOCK as u64;
    let mut chunk = Vec::with_capacity(1 << 20);
    for b in 0..blocks {
        chunk.extend_from_slice(&text_block(b));
        if chunk.len() == 1 << 20 || b + 1 == blocks {
            let first = b + 1 - (chunk.len() / BLOCK) as u64;
            d.write(Sector(first * 8), &chunk)
                .map_err(|e| layout_err("fill", e))?;
            chunk.clear();
        }
    }
    d.flush().map_err(|e| layout_err("flush", e))?;
    let mut policy = TierPolicy::defaults(2);
    policy.cold_after_secs = 1;
    policy.hot_accesses = 1;
    d.set_tier_policy(policy)
        .map_err(|e| layout_err("policy", e))?;
    d.observe_temperature();
    std::thread::sleep(Duration::from_millis(1100));
    d.observe_temperature();
    let t = Instant::now();
    let (_, demoted) = round(&d)?;
    let demote_secs = t.elapsed().as_secs_f64();
    let slow_allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(slow)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    let mut rows = Vec::new();
    let mut exact = true;
    let layout_read = |b: u64, buf: &mut [u8]| {
        d.read(Sector(b * 8), buf)
            .map_err(|e| layout_err("read", e))
    };
    let hot_first = blocks / 3;
    // Peer: the slow tier's file itself, pages dropped.
    drop_cache(slow)?;
    let slow_file = std::fs::File::open(slow).map_err(|e| CompareError::Io {
        what: format!("open {}", slow.display()),
        source: e,
    })?;
    let (iops, p50, p99, _) = measure(
        &o.duration,
        0,
        blocks / 2,
        |b, buf| pread_at(&slow_file, b * BLOCK as u64, buf),
        |_| Vec::new(),
        || drop_pages(&slow_file),
    )?;
    rows.push(Row {
        what: "peer: pread of the slow tier's file, pages dropped".into(),
        iops,
        p50_us: p50,
        p99_us: p99,
    });
    drop_cache(slow)?;
    let (iops, p50, p99, ok) = measure(
        &o.duration,
        hot_first,
        hot_blocks,
        layout_read,
        text_block,
        || drop_pages(&slow_file),
    )?;
    exact &= ok;
    rows.push(Row {
        what: "hot set before the mover: cold, compressed, slow tier (pages dropped)".into(),
        iops,
        p50_us: p50,
        p99_us: p99,
    });
    // Make the hot set hot, and let the mover promote it.
    let mut buf = vec![0u8; BLOCK];
    d.observe_temperature();
    for _ in 0..2 {
        for b in hot_first..hot_first + hot_blocks {
            layout_read(b, &mut buf)?;
        }
    }
    d.observe_temperature();
    let t = Instant::now();
    let (promoted, _) = round(&d)?;
    let promote_secs = t.elapsed().as_secs_f64();
    for b in hot_first..hot_first + hot_blocks {
        let p = d
            .placement(b)
            .map_err(|e| layout_err("placement", e))?
            .ok_or_else(|| err(format!("block {b} unwritten")))?;
        if p.class != Class::Hot || p.tier != 0 {
            return Err(err(format!(
                "block {b} of the hot set was not promoted: {p:?}"
            )));
        }
    }
    drop_cache(slow)?;
    let (iops, p50, p99, ok) = measure(
        &o.duration,
        hot_first,
        hot_blocks,
        layout_read,
        text_block,
        || drop_pages(&slow_file),
    )?;
    exact &= ok;
    rows.push(Row {
        what: "hot set after the mover: hot, fast tier (slow tier's pages dropped)".into(),
        iops,
        p50_us: p50,
        p99_us: p99,
    });
    let fast_file = std::fs::File::open(fast).map_err(|e| CompareError::Io {
        what: format!("open {}", fast.display()),
        source: e,
    })?;
    let (iops, p50, p99, _) = measure(
        &o.duration,
        0,
        hot_blocks,
        |b, buf| pread_at(&fast_file, b * BLOCK as u64, buf),
        |_| Vec::new(),
        || drop_pages(&slow_file),
    )?;
    rows.push(Row {
        what: "peer: pread of the fast tier's file".into(),
        iops,
        p50_us: p50,
        p99_us: p99,
    });
    // Compressed cold reads with the slow tier cached: the decompression's cost.
    let cold_first = 0;
    for b in cold_first..cold_first + hot_blocks {
        layout_read(b, &mut buf)?;
    }
    let (iops, p50, p99, ok) = measure(
        &o.duration,
        cold_first,
        hot_blocks,
        layout_read,
        text_block,
        || Ok(()),
    )?;
    exact &= ok;
    rows.push(Row {
        what: "compressed cold reads, slow tier in the page cache".into(),
        iops,
        p50_us: p50,
        p99_us: p99,
    });
    let problems = d.check();
    if !problems.is_empty() {
        return Err(err(format!("check after the benchmark: {problems:?}")));
    }
    Ok(TiersResult {
        rows,
        demoted,
        demote_secs,
        promoted,
        promote_secs,
        slow_allocated,
        exact,
        fast_dir: o.fast_dir.display().to_string(),
    })
}

fn row<'a>(r: &'a TiersResult, prefix: &str) -> Option<&'a Row> {
    r.rows.iter().find(|x| x.what.starts_with(prefix))
}

/// The ratios the section states.
pub fn ratios(r: &TiersResult) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let get = |p: &str| row(r, p).map(|x| x.iops);
    if let (Some(a), Some(b)) = (get("hot set after"), get("hot set before")) {
        out.push(("hot set after / before the mover".to_string(), a / b));
    }
    if let (Some(a), Some(b)) = (get("hot set before"), get("peer: pread of the slow")) {
        out.push(("hot set before / pread of the slow tier".to_string(), a / b));
    }
    if let (Some(a), Some(b)) = (get("hot set after"), get("peer: pread of the fast")) {
        out.push(("hot set after / pread of the fast tier".to_string(), a / b));
    }
    if let (Some(a), Some(b)) = (get("compressed cold"), get("hot set after")) {
        out.push((
            "compressed cold / uncompressed hot (both in memory)".to_string(),
            a / b,
        ));
    }
    out
}

/// A plain-text table.
pub fn tables(r: &TiersResult) -> String {
    let mut s = String::new();
    for x in &r.rows {
        let _ = writeln!(
            s,
            "{:<72} {:>10.0} IOPS  p50 {:>8.1} us  p99 {:>8.1} us",
            x.what, x.iops, x.p50_us, x.p99_us
        );
    }
    for (what, v) in ratios(r) {
        let _ = writeln!(s, "{what}: {v:.2}x");
    }
    let _ = writeln!(
        s,
        "demoted {} blocks in {:.2} s; promoted {} in {:.2} s; reads exact: {}",
        r.demoted, r.demote_secs, r.promoted, r.promote_secs, r.exact
    );
    s
}

/// The BENCHMARKS.md section.
pub fn section(r: &TiersResult, m: &Machine, command: &str, when: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}\n## {TITLE}\n");
    let _ = writeln!(
        s,
        "Command: `{command}` ({when}, revision {}).\n",
        m.revision
    );
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {}, kernel {}; the slow tier on {}, the fast tier in {} \
         (memory).\n",
        m.nproc, m.cpu_model, m.memory, m.kernel, m.filesystem, r.fast_dir
    );
    let _ = writeln!(
        s,
        "In process (`Parallax` on a real two-tier store, no VM): a parallax-v2 disk written in \
         full with compressible blocks, every block demoted (compressed, to the slow tier), then \
         4 KiB random reads by one thread (IOPS = reads / the reads' own time; before every read, untimed, the slow tier's pages are dropped from the page cache, so slow-tier reads reach the device) over a 16 MiB hot set before and after the mover \
         promoted it, and over a cold region with the slow tier cached. Peers are plain `pread`s \
         of the tier files in the same run. Every 16th read is compared byte for byte: {}.\n",
        if r.exact { "all equal" } else { "**MISMATCH**" }
    );
    let _ = writeln!(
        s,
        "| reads | IOPS | p50 µs | p99 µs |\n| --- | ---: | ---: | ---: |"
    );
    for x in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.1} | {:.1} |",
            x.what, x.iops, x.p50_us, x.p99_us
        );
    }
    let _ = writeln!(s, "\n| ratio | value |\n| --- | ---: |");
    for (what, v) in ratios(r) {
        let _ = writeln!(s, "| {what} | {v:.2}× |");
    }
    let _ = writeln!(
        s,
        "\nThe mover (unthrottled, in process) demoted {} blocks in {:.2} s and promoted {} in \
         {:.2} s. The slow tier's file has {} MiB allocated after the demotion: a compressed \
         block still takes a whole 4 KiB block (no packing yet), so compression saves no space \
         in this version.\n{END}",
        r.demoted,
        r.demote_secs,
        r.promoted,
        r.promote_secs,
        r.slow_allocated >> 20
    );
    s
}

pub fn write_section(path: &Path, section: &str) -> Result<(), CompareError> {
    crate::section::write(path, section, BEGIN, END, None)
}
