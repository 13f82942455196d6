//! The load generator: one thread per queue, each keeping `iodepth` requests in flight on its
//! queue, with per-request latency in an HDR histogram.
//!
//! Every queue owns a contiguous part of the region under test, so no two queues ever touch the
//! same block; in verify mode a queue also never has two requests on one block in flight. That
//! makes the expected contents of every block exact (see [`crate::verify`]).
//!
//! Each in-flight request has a fixed slot in its queue's guest memory: a header, a status byte
//! and a data buffer, and a fixed run of descriptors pointing at them. Issuing a request writes
//! the header, flips the data descriptors' direction if needed, and pushes the head; nothing is
//! allocated or copied on the hot path unless verify mode has to stamp or check data.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress};

use crate::driver::{
    align_up, header_bytes, BlkConfig, Driver, DriverError, DriverOptions, PAGE, SECTOR_SIZE, S_OK,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use crate::fill::{fill_pattern, Rng};
use crate::verify::{check_block, stamp, BlockCheck, BlockState, Corruption, VerifyState};

/// Largest ring the generator asks for (what both dovetail and libvhost-user accept).
const MAX_RING: u16 = 1024;
/// Bytes of a slot's header area: the 16-byte request header and the status byte after it.
const SLOT_HEADER: u64 = 32;
/// Status byte value written before submitting, which no device returns.
const STATUS_UNSET: u8 = 0xff;

/// Which requests to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    #[value(name = "randread")]
    RandRead,
    #[value(name = "randwrite")]
    RandWrite,
    #[value(name = "read")]
    Read,
    #[value(name = "write")]
    Write,
    #[value(name = "randrw")]
    RandRw,
}

impl Pattern {
    pub fn random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw
        )
    }

    pub fn writes(self) -> bool {
        !matches!(self, Pattern::RandRead | Pattern::Read)
    }

    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRw => "randrw",
        }
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Stop issuing after this long.
    Time(Duration),
    /// Stop after this many bytes in all (split evenly between queues).
    Bytes(u64),
    /// Issue this many requests per block of each queue's part (1 with a sequential pattern:
    /// every block exactly once).
    Passes(u64),
}

/// A run's settings.
#[derive(Debug, Clone)]
pub struct Workload {
    pub pattern: Pattern,
    /// Percentage of reads for [`Pattern::RandRw`].
    pub read_percent: u8,
    /// Bytes per request (a multiple of 512).
    pub block_size: u32,
    /// Requests in flight per queue.
    pub iodepth: u16,
    pub queues: usize,
    pub limit: Limit,
    /// Byte offset and length of the region under test (default: the whole disk).
    pub region: Option<(u64, u64)>,
    /// Write self-describing blocks and check every read.
    pub verify: bool,
    /// Poll the used ring instead of sleeping on the call eventfd.
    pub poll: bool,
    pub seed: u64,
    /// CPUs to pin queue threads to (queue i on `cpus[i % len]`); empty: no pinning.
    pub cpus: Vec<usize>,
    /// How long any request may take before the run fails.
    pub timeout: Duration,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Stop issuing once this is set (as if the limit were reached): the run ends when the
    /// requests in flight complete. For runs whose end another thread decides.
    pub stop: Option<Arc<AtomicBool>>,
    /// Record every request that takes at least this long in [`Report::slow`] (when it
    /// completed, how long it took), up to [`SLOW_CAP`] of them.
    pub slow_threshold: Option<Duration>,
    /// After this many writes on a queue, let its requests in flight complete and send a
    /// FLUSH (0: never). In verify mode an acknowledged FLUSH makes the writes acknowledged
    /// before it *stable* in the record: what must survive a crash.
    pub flush_every: u64,
    /// Counters of acknowledged requests, updated as they complete, for another thread to
    /// watch (and to read after a run that failed part way).
    pub progress: Option<Arc<Progress>>,
    /// Verify mode, for a run during which the backend's storage may fail (the store's fault
    /// injection): the backend may reopen a version from its last commit at any time (the
    /// failed-sync rule, RELIABILITY.md), so what was acknowledged since the last FLUSH the
    /// record trusts may be gone. Every read is then checked as after a crash (each sector
    /// holds the block's stable write or a later one issued; a write that got IOERR left the
    /// old or the new data), and an acknowledged FLUSH does not make anything stable (a
    /// reopen the generator did not see may have dropped what it covered). After such a run
    /// the record must be settled ([`check_after_crash`]) before an exact run.
    pub durability_unknown: bool,
}

/// Requests acknowledged so far by a run ([`Workload::progress`]).
#[derive(Debug, Default)]
pub struct Progress {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
}

/// The most slow requests a run records.
pub const SLOW_CAP: usize = 1 << 20;

/// A request that took at least [`Workload::slow_threshold`].
#[derive(Debug, Clone, Copy)]
pub struct SlowRequest {
    /// When the generator saw it completed.
    pub done: Instant,
    pub latency_ns: u64,
}

impl Workload {
    /// 4 KiB random reads at queue depth 1 on one queue for a second.
    pub fn new(pattern: Pattern) -> Workload {
        Workload {
            pattern,
            read_percent: 50,
            block_size: 4096,
            iodepth: 1,
            queues: 1,
            limit: Limit::Time(Duration::from_secs(1)),
            region: None,
            verify: false,
            poll: false,
            seed: 1,
            cpus: Vec::new(),
            timeout: crate::driver::DEFAULT_TIMEOUT,
            event_idx: true,
            stop: None,
            slow_threshold: None,
            flush_every: 0,
            progress: None,
            durability_unknown: false,
        }
    }
}

/// What the generator found out about the device.
#[derive(Debug, Clone)]
pub struct Device {
    /// Bytes.
    pub capacity: u64,
    pub config: BlkConfig,
    pub read_only: bool,
    /// Bytes one data descriptor may carry.
    pub segment_bytes: u32,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("invalid workload: {0}")]
    Workload(String),
    #[error("the device is read-only; {0} writes")]
    ReadOnly(&'static str),
    #[error("a queue thread panicked")]
    Panicked,
    /// The run failed part way (e.g. the backend died) after reads had already returned wrong
    /// data: that matters more than the failure, so it is what the run reports.
    #[error("{} block(s) read back wrong before the run failed ({failure}); first: {}", .corrupt.len(), .corrupt.first().map(ToString::to_string).unwrap_or_default())]
    CorruptThenFailed {
        corrupt: Vec<Corruption>,
        failure: String,
    },
}

impl From<vm_memory::GuestMemoryError> for LoadError {
    fn from(e: vm_memory::GuestMemoryError) -> LoadError {
        LoadError::Driver(DriverError::GuestMemory(e))
    }
}

/// Slots and descriptors per queue for a workload on a device whose data descriptors carry at
/// most `segment_bytes`.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Descriptors per request: header, data segments, status.
    chain: u16,
    queue_size: u16,
    /// Guest memory per queue.
    area: u64,
    /// Offset of the first data buffer from the start of the queue's data area.
    buffers_at: u64,
    /// Distance between data buffers.
    buffer_stride: u64,
}

impl Layout {
    fn new(w: &Workload, segment_bytes: u32) -> Result<Layout, LoadError> {
        let segs = w.block_size.div_ceil(segment_bytes.max(SECTOR_SIZE as u32));
        let chain = u16::try_from(segs + 2)
            .map_err(|_| LoadError::Workload("too many segments per request".into()))?;
        let descs = u32::from(chain) * u32::from(w.iodepth);
        let queue_size = descs.next_power_of_two();
        if queue_size > u32::from(MAX_RING) {
            return Err(LoadError::Workload(format!(
                "iodepth {} with {chain} descriptors per request needs a ring of {queue_size}; \
                 at most {MAX_RING}",
                w.iodepth
            )));
        }
        let queue_size = queue_size as u16;
        let buffers_at = align_up(u64::from(w.iodepth) * SLOT_HEADER, PAGE);
        let buffer_stride = align_up(u64::from(w.block_size), PAGE);
        let area = DriverOptions::ring_bytes(queue_size)
            + buffers_at
            + u64::from(w.iodepth) * buffer_stride
            + PAGE;
        Ok(Layout {
            chain,
            queue_size,
            area,
            buffers_at,
            buffer_stride,
        })
    }
}

fn check_workload(w: &Workload) -> Result<(), LoadError> {
    if w.block_size == 0 || u64::from(w.block_size) % SECTOR_SIZE != 0 {
        return Err(LoadError::Workload(format!(
            "block size {} is not a positive multiple of 512",
            w.block_size
        )));
    }
    if w.iodepth == 0 || w.queues == 0 {
        return Err(LoadError::Workload(
            "iodepth and queues must be at least 1".into(),
        ));
    }
    if w.read_percent > 100 {
        return Err(LoadError::Workload("rwmix is a percentage".into()));
    }
    Ok(())
}

/// Connects to the backend at `socket` with guest memory and rings sized for `w`, and reads the
/// device's config space.
pub fn connect(socket: &Path, w: &Workload) -> Result<(Driver, Device), LoadError> {
    check_workload(w)?;
    // Assume one descriptor per data buffer; if the device limits segment size, connect again
    // with rings sized for the longer chains.
    let mut segment_bytes = w.block_size;
    loop {
        let layout = Layout::new(w, segment_bytes)?;
        let mem_size = usize::try_from(layout.area * w.queues as u64)
            .map_err(|_| LoadError::Workload("guest memory too large".into()))?;
        let driver = Driver::connect(
            socket,
            DriverOptions {
                num_queues: w.queues,
                mem_size,
                queue_size: layout.queue_size,
                event_idx: w.event_idx,
                timeout: w.timeout,
                seal_memory: true,
            },
        )?;
        let config = driver.blk_config()?;
        let features = driver.acked_features();
        let mut seg = w.block_size;
        if features & (1 << VIRTIO_BLK_F_SIZE_MAX) != 0 && config.size_max != 0 {
            seg = seg.min(config.size_max);
        }
        let segs = w.block_size.div_ceil(seg);
        if features & (1 << VIRTIO_BLK_F_SEG_MAX) != 0
            && config.seg_max != 0
            && segs > config.seg_max
        {
            return Err(LoadError::Workload(format!(
                "{}-byte requests need {segs} segments; the device takes {}",
                w.block_size, config.seg_max
            )));
        }
        if seg < segment_bytes {
            segment_bytes = seg;
            continue;
        }
        let device = Device {
            capacity: config.capacity.saturating_mul(SECTOR_SIZE),
            read_only: features & (1 << VIRTIO_BLK_F_RO) != 0,
            segment_bytes,
            config,
        };
        return Ok((driver, device));
    }
}

/// The region a workload covers on `device`: (byte offset, number of blocks).
pub fn region(w: &Workload, device: &Device) -> Result<(u64, u64), LoadError> {
    let bs = u64::from(w.block_size);
    let (offset, len) = w.region.unwrap_or((0, device.capacity));
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= device.capacity)
        .ok_or_else(|| {
            LoadError::Workload(format!(
                "region {offset}+{len} runs past the {}-byte disk",
                device.capacity
            ))
        })?;
    if offset % SECTOR_SIZE != 0 {
        return Err(LoadError::Workload(
            "the region must start on a sector".into(),
        ));
    }
    let blocks = (end - offset) / bs;
    if blocks < w.queues as u64 {
        return Err(LoadError::Workload(format!(
            "{blocks} blocks of {bs} bytes cannot be shared by {} queues",
            w.queues
        )));
    }
    Ok((offset, blocks))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What the verify checks found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifySummary {
    /// Blocks read back and checked.
    pub checked: u64,
    /// Blocks read back about which nothing was recorded (not checked).
    pub unknown: u64,
    /// Every block that failed, in block order.
    pub corrupt: Vec<Corruption>,
}

/// CPU time the generator's queue threads used.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuTime {
    pub user_s: f64,
    pub sys_s: f64,
}

impl CpuTime {
    pub fn total(&self) -> f64 {
        self.user_s + self.sys_s
    }

    /// The calling thread's CPU time so far.
    pub fn thread() -> CpuTime {
        rusage(libc::RUSAGE_THREAD)
    }

    /// The whole process's CPU time so far.
    pub fn process() -> CpuTime {
        rusage(libc::RUSAGE_SELF)
    }
}

fn rusage(who: libc::c_int) -> CpuTime {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage the call writes into; `who` is RUSAGE_SELF or RUSAGE_THREAD.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        return CpuTime::default();
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    CpuTime {
        user_s: secs(ru.ru_utime),
        sys_s: secs(ru.ru_stime),
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub pattern: Pattern,
    pub block_size: u32,
    pub iodepth: u16,
    pub queues: usize,
    /// From the start of issuing to the last completion (the slowest queue).
    pub elapsed: Duration,
    pub reads: u64,
    pub writes: u64,
    /// FLUSHes sent ([`Workload::flush_every`]).
    pub flushes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests the device completed with a status other than OK.
    pub io_errors: u64,
    /// Latency from publishing a request to seeing it used, in nanoseconds.
    pub latency: Histogram<u64>,
    pub verify: Option<VerifySummary>,
    pub cpu: CpuTime,
    /// The requests slower than [`Workload::slow_threshold`], by completion time.
    pub slow: Vec<SlowRequest>,
}

impl Report {
    pub fn ops(&self) -> u64 {
        self.reads + self.writes
    }

    pub fn iops(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Megabytes (10^6 bytes) per second, reads and writes together.
    pub fn mb_per_s(&self) -> f64 {
        (self.read_bytes + self.write_bytes) as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn latency_us(&self) -> Latency {
        let h = &self.latency;
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }

    /// The generator's CPU use as a percentage of one core over the run.
    pub fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu.total() / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn summary(&self) -> Summary {
        Summary {
            pattern: self.pattern,
            block_size: self.block_size,
            iodepth: self.iodepth,
            queues: self.queues,
            elapsed_s: self.elapsed.as_secs_f64(),
            ops: self.ops(),
            reads: self.reads,
            writes: self.writes,
            read_bytes: self.read_bytes,
            write_bytes: self.write_bytes,
            iops: self.iops(),
            mb_per_s: self.mb_per_s(),
            lat_us: self.latency_us(),
            io_errors: self.io_errors,
            verify: self.verify.clone(),
            cpu: self.cpu,
            cpu_percent: self.cpu_percent(),
        }
    }
}

/// A [`Report`] as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub pattern: Pattern,
    pub block_size: u32,
    pub iodepth: u16,
    pub queues: usize,
    pub elapsed_s: f64,
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub lat_us: Latency,
    pub io_errors: u64,
    pub verify: Option<VerifySummary>,
    pub cpu: CpuTime,
    pub cpu_percent: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} bs={} iodepth={} queues={}: {} ops in {:.2} s ({} reads, {} writes)",
            self.pattern.name(),
            self.block_size,
            self.iodepth,
            self.queues,
            self.ops,
            self.elapsed_s,
            self.reads,
            self.writes
        )?;
        writeln!(
            f,
            "  IOPS {:.0}  MB/s {:.1}  latency us: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            self.iops,
            self.mb_per_s,
            self.lat_us.p50,
            self.lat_us.p99,
            self.lat_us.p999,
            self.lat_us.max
        )?;
        write!(
            f,
            "  I/O errors {}  generator CPU {:.2} s ({:.0}% of one core)",
            self.io_errors,
            self.cpu.total(),
            self.cpu_percent
        )?;
        if let Some(v) = &self.verify {
            write!(
                f,
                "\n  verify: {} blocks checked, {} unknown, {} corrupt",
                v.checked,
                v.unknown,
                v.corrupt.len()
            )?;
            for c in &v.corrupt {
                write!(f, "\n    {c}")?;
            }
        }
        Ok(())
    }
}

/// One in-flight slot.
#[derive(Debug, Clone, Copy)]
struct Slot {
    busy: bool,
    write: bool,
    /// Block number within the region.
    block: u64,
    seq: u64,
    start: Instant,
}

/// What one queue thread measured.
#[derive(Debug)]
struct QueueReport {
    elapsed: Duration,
    reads: u64,
    writes: u64,
    flushes: u64,
    io_errors: u64,
    latency: Histogram<u64>,
    verify: VerifySummary,
    cpu: CpuTime,
    slow: Vec<SlowRequest>,
}

/// Settings shared by every queue thread.
#[derive(Debug)]
struct Shared<'a> {
    w: &'a Workload,
    layout: Layout,
    segment_bytes: u32,
    /// Byte offset of block 0 on the disk.
    offset: u64,
    seq: AtomicU64,
    abort: AtomicBool,
    barrier: Barrier,
    /// Every wrong read of every queue, also kept here so a run that fails later still says.
    corrupt: std::sync::Mutex<Vec<Corruption>>,
}

/// Runs `w` on a driver from [`connect`]. With `state` (verify mode), writes are recorded in it
/// and reads checked against it; it stays up to date even when the run fails part way (a
/// backend that died), so it can be saved and checked after a crash.
pub fn run(
    driver: &Driver,
    device: &Device,
    w: &Workload,
    mut state: Option<&mut VerifyState>,
) -> Result<Report, LoadError> {
    check_workload(w)?;
    if w.pattern.writes() && device.read_only {
        return Err(LoadError::ReadOnly(w.pattern.name()));
    }
    let (offset, blocks) = region(w, device)?;
    if w.verify {
        let Some(s) = state.as_deref() else {
            return Err(LoadError::Workload(
                "verify mode needs a state record".into(),
            ));
        };
        if (s.block_size, s.offset, s.blocks.len() as u64) != (w.block_size, offset, blocks) {
            return Err(LoadError::Workload(format!(
                "the state record covers {} blocks of {} bytes at byte offset {}; the run covers \
                 {blocks} blocks of {} bytes at {offset}",
                s.blocks.len(),
                s.block_size,
                s.offset,
                w.block_size
            )));
        }
    } else {
        state = None;
    }
    let layout = Layout::new(w, device.segment_bytes)?;
    let shared = Shared {
        w,
        layout,
        segment_bytes: device.segment_bytes,
        offset,
        seq: AtomicU64::new(state.as_deref().map_or(1, |s| s.next_seq.max(1))),
        abort: AtomicBool::new(false),
        barrier: Barrier::new(w.queues),
        corrupt: std::sync::Mutex::new(Vec::new()),
    };

    // Contiguous parts, one per queue, and the matching parts of the record.
    let bounds: Vec<(u64, u64)> = (0..w.queues as u64)
        .map(|q| {
            let n = w.queues as u64;
            (q * blocks / n, (q + 1) * blocks / n)
        })
        .collect();
    let mut parts: Vec<Option<&mut [BlockState]>> = Vec::with_capacity(w.queues);
    match state.as_deref_mut() {
        Some(s) => {
            let mut rest: &mut [BlockState] = &mut s.blocks;
            for &(start, end) in &bounds {
                let (part, tail) = rest.split_at_mut((end - start) as usize);
                parts.push(Some(part));
                rest = tail;
            }
        }
        None => parts.extend(bounds.iter().map(|_| None)),
    }

    let results: Vec<Result<QueueReport, LoadError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .zip(bounds.iter().copied())
            .enumerate()
            .map(|(q, (part, bounds))| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("load-q{q}"))
                    .spawn_scoped(scope, move || {
                        let r = queue_thread(driver, shared, q, bounds, part);
                        if r.is_err() {
                            shared.abort.store(true, Ordering::Relaxed);
                        }
                        r
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or(Err(LoadError::Panicked)),
                Err(e) => Err(LoadError::Driver(DriverError::EventFd(e))),
            })
            .collect()
    });
    if let Some(s) = state {
        s.next_seq = shared.seq.load(Ordering::Relaxed);
    }

    let mut report = Report {
        pattern: w.pattern,
        block_size: w.block_size,
        iodepth: w.iodepth,
        queues: w.queues,
        elapsed: Duration::ZERO,
        reads: 0,
        writes: 0,
        flushes: 0,
        read_bytes: 0,
        write_bytes: 0,
        io_errors: 0,
        latency: new_histogram(),
        verify: w.verify.then(VerifySummary::default),
        cpu: CpuTime::default(),
        slow: Vec::new(),
    };
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        let corrupt =
            std::mem::take(&mut *shared.corrupt.lock().unwrap_or_else(|p| p.into_inner()));
        if !corrupt.is_empty() {
            return Err(LoadError::CorruptThenFailed {
                corrupt,
                failure: e.to_string(),
            });
        }
    }
    for r in results {
        let r = r?;
        report.elapsed = report.elapsed.max(r.elapsed);
        report.reads += r.reads;
        report.writes += r.writes;
        report.flushes += r.flushes;
        report.io_errors += r.io_errors;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = report.latency.add(&r.latency);
        report.cpu.user_s += r.cpu.user_s;
        report.cpu.sys_s += r.cpu.sys_s;
        let room = SLOW_CAP.saturating_sub(report.slow.len());
        report.slow.extend(r.slow.into_iter().take(room));
        if let Some(v) = report.verify.as_mut() {
            v.checked += r.verify.checked;
            v.unknown += r.verify.unknown;
            v.corrupt.extend(r.verify.corrupt);
        }
    }
    report.read_bytes = report.reads * u64::from(w.block_size);
    report.write_bytes = report.writes * u64::from(w.block_size);
    if let Some(v) = report.verify.as_mut() {
        v.corrupt.sort_by_key(|c| c.block);
    }
    report.slow.sort_by_key(|s| s.done);
    Ok(report)
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 10 minutes at 3 significant digits; these bounds are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; out-of-range CPUs are ignored by the macro.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    let _ = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// Per-queue issuing state.
struct Issuer<'a> {
    shared: &'a Shared<'a>,
    rng: Rng,
    /// Blocks of this queue's part: `start..end` (region block numbers).
    start: u64,
    end: u64,
    cursor: u64,
    /// Requests issued, and the most that may be.
    issued: u64,
    budget: u64,
    deadline: Option<Instant>,
}

impl Issuer<'_> {
    fn may_issue(&self, now: Instant) -> bool {
        !self.shared.abort.load(Ordering::Relaxed)
            && self.issued < self.budget
            && self.deadline.is_none_or(|d| now < d)
            && self
                .shared
                .w
                .stop
                .as_ref()
                .is_none_or(|s| !s.load(Ordering::Relaxed))
    }

    /// The next (block, write) to issue, or `None` if every candidate is busy.
    fn next(&mut self, slots: &[Slot]) -> Option<(u64, bool)> {
        let w = self.shared.w;
        let write = match w.pattern {
            Pattern::RandRead | Pattern::Read => false,
            Pattern::RandWrite | Pattern::Write => true,
            Pattern::RandRw => self.rng.below(100) >= u64::from(w.read_percent),
        };
        let len = self.end - self.start;
        let busy = |b: u64| w.verify && slots.iter().any(|s| s.busy && s.block == b);
        if w.pattern.random() {
            for _ in 0..8 {
                let b = self.start + self.rng.below(len);
                if !busy(b) {
                    return Some((b, write));
                }
            }
            None
        } else {
            let b = self.start + self.cursor;
            if busy(b) {
                return None;
            }
            self.cursor = (self.cursor + 1) % len;
            Some((b, write))
        }
    }
}

fn queue_thread(
    driver: &Driver,
    shared: &Shared<'_>,
    index: usize,
    (start, end): (u64, u64),
    mut state: Option<&mut [BlockState]>,
) -> Result<QueueReport, LoadError> {
    let w = shared.w;
    if !w.cpus.is_empty() {
        pin_to(w.cpus[index % w.cpus.len()]);
    }
    let mut q = driver.queue(index)?;
    let layout = shared.layout;
    let bs = u64::from(w.block_size);
    let qd = w.iodepth;
    let (data, data_len) = q.data_area();
    let needed = layout.buffers_at + u64::from(qd) * layout.buffer_stride;
    if needed > data_len {
        return Err(LoadError::Workload(format!(
            "queue {index}: {needed} bytes of buffers do not fit in {data_len}"
        )));
    }
    let header_at = |k: u16| GuestAddress(data.0 + u64::from(k) * SLOT_HEADER);
    let status_at = |k: u16| GuestAddress(header_at(k).0 + 16);
    let buffer_at =
        |k: u16| GuestAddress(data.0 + layout.buffers_at + u64::from(k) * layout.buffer_stride);

    // Fixed descriptor runs: header, data segments, status.
    let chain = layout.chain;
    let seg = u64::from(shared.segment_bytes);
    for k in 0..qd {
        let base = k * chain;
        q.write_desc(base, header_at(k).0, 16, VRING_DESC_F_NEXT, base + 1)?;
        for s in 0..chain - 2 {
            let off = u64::from(s) * seg;
            let len = seg.min(bs - off) as u32;
            let d = base + 1 + s;
            q.write_desc(d, buffer_at(k).0 + off, len, VRING_DESC_F_NEXT, d + 1)?;
        }
        q.write_desc(base + chain - 1, status_at(k).0, 1, VRING_DESC_F_WRITE, 0)?;
    }
    // Data for plain writes: the same pseudo-random bytes every time, written once.
    if w.pattern.writes() && !w.verify {
        let mut b = vec![0u8; bs as usize];
        for k in 0..qd {
            fill_pattern(w.seed ^ (index as u64) << 32 ^ u64::from(k), &mut b);
            q.memory().write_slice(&b, buffer_at(k))?;
        }
    }
    if w.poll {
        q.disable_interrupts()?;
    }

    let part_blocks = end - start;
    let per_queue_budget = match w.limit {
        Limit::Time(_) => u64::MAX,
        Limit::Bytes(total) => (total / bs).div_ceil(w.queues as u64),
        Limit::Passes(n) => n.saturating_mul(part_blocks),
    };
    let mut scratch = vec![0u8; if w.verify { bs as usize } else { 0 }];
    let mut slots = vec![
        Slot {
            busy: false,
            write: false,
            block: 0,
            seq: 0,
            start: Instant::now(),
        };
        usize::from(qd)
    ];
    let mut free: Vec<u16> = (0..qd).rev().collect();
    let mut latency = new_histogram();
    let mut rep = QueueReport {
        elapsed: Duration::ZERO,
        reads: 0,
        writes: 0,
        flushes: 0,
        io_errors: 0,
        latency: new_histogram(),
        verify: VerifySummary::default(),
        cpu: CpuTime::default(),
        slow: Vec::new(),
    };
    let slow_ns = w
        .slow_threshold
        .map(|t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX));

    shared.barrier.wait();
    let cpu0 = CpuTime::thread();
    let t0 = Instant::now();
    let mut issuer = Issuer {
        shared,
        rng: Rng::new(w.seed.wrapping_add(index as u64)),
        start,
        end,
        cursor: 0,
        issued: 0,
        budget: per_queue_budget,
        deadline: match w.limit {
            Limit::Time(d) => Some(t0 + d),
            _ => None,
        },
    };
    let mut now = t0;
    let mut last = t0;
    let mut spins = 0u32;
    let mut progress = t0;
    // Writes since the last FLUSH, and (verify mode) the blocks they acknowledged.
    let mut writes_since_flush = 0u64;
    let mut unflushed: Vec<usize> = Vec::new();
    loop {
        let flush_due = w.flush_every > 0 && writes_since_flush >= w.flush_every;
        if flush_due && q.in_flight() == 0 {
            // Everything issued has completed: FLUSH, then what it covered is stable.
            let ok = flush_now(&mut q, chain, header_at(0), status_at(0))?;
            rep.flushes += 1;
            if let (true, Some(p)) = (ok, w.progress.as_ref()) {
                p.flushes.fetch_add(1, Ordering::Relaxed);
            }
            if ok && !w.durability_unknown {
                if let Some(st) = state.as_deref_mut() {
                    for bi in unflushed.drain(..) {
                        st[bi].stable = st[bi].acked;
                    }
                }
            } else {
                // A failed FLUSH: durability since the last good one is unknown (and with
                // `durability_unknown` even a good one proves nothing); what stays stable is
                // what an earlier FLUSH made so.
                unflushed.clear();
                if !ok {
                    rep.io_errors += 1;
                }
            }
            writes_since_flush = 0;
            now = Instant::now();
            continue;
        }
        // Fill every free slot.
        while !flush_due && issuer.may_issue(now) {
            let Some(&k) = free.last() else { break };
            let Some((block, write)) = issuer.next(&slots) else {
                break;
            };
            free.pop();
            let disk_offset = shared.offset + block * bs;
            let slot = &mut slots[usize::from(k)];
            *slot = Slot {
                busy: true,
                write,
                block,
                seq: 0,
                start: now,
            };
            if write && w.verify {
                let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
                slot.seq = seq;
                if let Some(st) = state.as_deref_mut() {
                    st[(block - start) as usize].in_flight = seq;
                }
                stamp(&mut scratch, disk_offset, seq);
                q.memory().write_slice(&scratch, buffer_at(k))?;
            }
            let mem = q.memory();
            let req_type = if write {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            };
            mem.write_obj(
                header_bytes(req_type, disk_offset / SECTOR_SIZE),
                header_at(k),
            )?;
            mem.write_obj(STATUS_UNSET, status_at(k))?;
            let dir = if write { 0 } else { VRING_DESC_F_WRITE };
            for s in 0..chain - 2 {
                let d = k * chain + 1 + s;
                q.set_desc_flags(d, VRING_DESC_F_NEXT | dir)?;
            }
            q.push(k * chain)?;
            issuer.issued += 1;
        }
        if q.publish()? {
            q.kick()?;
        }
        if q.in_flight() == 0 {
            // Nothing in flight and nothing more could be issued: the run is over.
            break;
        }

        // Reap whatever the device has used.
        let mut got = 0;
        while let Some(used) = q.pop_used()? {
            if got == 0 {
                now = Instant::now();
            }
            got += 1;
            let k = u16::try_from(used.id)
                .ok()
                .filter(|id| id % chain == 0 && id / chain < qd)
                .map(|id| id / chain)
                .filter(|&k| slots[usize::from(k)].busy)
                .ok_or(DriverError::UnknownUsedId {
                    queue: index,
                    id: used.id,
                })?;
            let slot = &mut slots[usize::from(k)];
            slot.busy = false;
            free.push(k);
            let took = (now - slot.start).as_nanos() as u64;
            latency.saturating_record(took);
            if slow_ns.is_some_and(|t| took >= t) && rep.slow.len() < SLOW_CAP {
                rep.slow.push(SlowRequest {
                    done: now,
                    latency_ns: took,
                });
            }
            let status: u8 = q.memory().read_obj(status_at(k))?;
            let ok = status == S_OK;
            if !ok {
                rep.io_errors += 1;
            }
            let bi = (slot.block - start) as usize;
            if let (true, Some(p)) = (ok, w.progress.as_ref()) {
                let c = if slot.write { &p.writes } else { &p.reads };
                c.fetch_add(1, Ordering::Relaxed);
            }
            if slot.write {
                rep.writes += 1;
                if let (true, Some(st)) = (ok, state.as_deref_mut()) {
                    st[bi].acked = slot.seq;
                    st[bi].in_flight = 0;
                    if w.flush_every > 0 {
                        unflushed.push(bi);
                    }
                }
                writes_since_flush += 1;
            } else {
                rep.reads += 1;
                if let (true, Some(st)) = (ok, state.as_deref()) {
                    q.memory().read_slice(&mut scratch, buffer_at(k))?;
                    let offset = shared.offset + slot.block * bs;
                    let check = if w.durability_unknown {
                        crate::verify::check_block_after_crash
                    } else {
                        check_block
                    };
                    match check(&scratch, slot.block, offset, st[bi]) {
                        BlockCheck::Good => rep.verify.checked += 1,
                        BlockCheck::Unknown => rep.verify.unknown += 1,
                        BlockCheck::Corrupt(c) => {
                            rep.verify.checked += 1;
                            shared
                                .corrupt
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(c.clone());
                            rep.verify.corrupt.push(c);
                        }
                    }
                }
            }
        }
        if got > 0 {
            last = now;
            progress = now;
            spins = 0;
            continue;
        }
        if shared.abort.load(Ordering::Relaxed) {
            // Another queue failed: stop here, leaving what is in flight recorded as such.
            break;
        }
        if w.poll {
            std::hint::spin_loop();
            spins += 1;
            if spins % 4096 == 0 {
                now = Instant::now();
                if now - progress > q.timeout() {
                    return Err(q.timeout_error().into());
                }
                q.check_connected()?;
            }
        } else {
            let deadline = Instant::now() + q.timeout();
            q.wait(deadline)?;
            now = Instant::now();
        }
    }
    let cpu1 = CpuTime::thread();
    rep.elapsed = last - t0;
    rep.latency = latency;
    rep.cpu = CpuTime {
        user_s: cpu1.user_s - cpu0.user_s,
        sys_s: cpu1.sys_s - cpu0.sys_s,
    };
    Ok(rep)
}

/// Sends a FLUSH on `q` from slot 0's descriptors (header straight to status; the queue must
/// have nothing in flight) and waits for it: whether the device said `S_OK`.
fn flush_now(
    q: &mut crate::driver::VirtQueue,
    chain: u16,
    header: GuestAddress,
    status: GuestAddress,
) -> Result<bool, LoadError> {
    q.write_desc(0, header.0, 16, VRING_DESC_F_NEXT, chain - 1)?;
    q.memory()
        .write_obj(header_bytes(VIRTIO_BLK_T_FLUSH, 0), header)?;
    q.memory().write_obj(STATUS_UNSET, status)?;
    q.push(0)?;
    if q.publish()? {
        q.kick()?;
    }
    let deadline = Instant::now() + q.timeout();
    let used = loop {
        if let Some(u) = q.pop_used()? {
            break u;
        }
        if Instant::now() >= deadline {
            return Err(q.timeout_error().into());
        }
        q.wait(deadline)?;
    };
    // Slot 0's header leads to its data segments again.
    q.write_desc(0, header.0, 16, VRING_DESC_F_NEXT, 1)?;
    if used.id != 0 {
        return Err(DriverError::UnknownUsedId {
            queue: q.index(),
            id: used.id,
        }
        .into());
    }
    let s: u8 = q.memory().read_obj(status)?;
    Ok(s == S_OK)
}

/// Convenience for tests and scripts: connects to `socket`, runs `w`, and disconnects.
pub fn run_against(
    socket: &Path,
    w: &Workload,
    state: Option<&mut VerifyState>,
) -> Result<Report, LoadError> {
    let (driver, device) = connect(socket, w)?;
    run(&driver, &device, w, state)
}

/// What [`check_after_crash`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CrashCheck {
    /// Blocks read and checked (the record knew something about them).
    pub checked: u64,
    /// Of those, blocks that had a stable write to keep.
    pub stable: u64,
    /// Blocks holding a write newer than their stable one (it reached the disk before the
    /// crash, or was torn, sector by sector).
    pub newer: u64,
    /// Blocks that lost data a FLUSH had acknowledged, or hold damaged or misplaced sectors.
    pub lost: Vec<Corruption>,
}

/// Bytes per data descriptor of a read after a crash: whole sectors, at most `segment_bytes`
/// (the device's size_max) and 1 GiB.
fn read_segment(segment_bytes: u32) -> u64 {
    (u64::from(segment_bytes).min(1 << 30) / SECTOR_SIZE * SECTOR_SIZE).max(SECTOR_SIZE)
}

/// Blocks of `bs` bytes one read after a crash may carry: at most `chunk` bytes, and no more
/// than queue 0's ring and data area hold (they were sized for the workload's block size and
/// iodepth, not for `chunk`) nor than the device's segment limits allow (`segment_bytes` per
/// data descriptor, `seg_max` descriptors). At least one block: if that does not fit either,
/// the driver says so.
fn blocks_per_read(
    driver: &Driver,
    segment_bytes: u32,
    seg_max: Option<u32>,
    bs: u64,
    chunk: u64,
) -> Result<u64, LoadError> {
    let (ring, area) = {
        let q = driver.queue(0)?;
        (u64::from(q.size()), q.data_area().1)
    };
    let seg = read_segment(segment_bytes);
    // Header and status take a descriptor and 16 aligned bytes each; data segments are whole
    // sectors, so they need no padding.
    let by_area = area.saturating_sub(32);
    let by_ring = ring.saturating_sub(2) * seg;
    let by_seg_max = seg_max.map_or(u64::MAX, |m| u64::from(m) * seg);
    let bytes = chunk
        .min(by_area)
        .min(by_ring)
        .min(by_seg_max)
        .min(u64::from(u32::MAX));
    Ok((bytes / bs).max(1))
}

/// After the backend crashed and came back: reads every block of `state`'s region through
/// `driver` (queue 0, up to `chunk` bytes per request: less when the queue's ring and data
/// area, sized by [`connect`] for the workload, or the device's segment limits take less) and
/// checks it with [`crate::verify::check_block_after_crash`]; then settles the record on what
/// each block holds now ([`VerifyState::settle_after_crash`]), so a run can go on from there.
pub fn check_after_crash(
    driver: &Driver,
    state: &mut VerifyState,
    chunk: u64,
) -> Result<CrashCheck, LoadError> {
    use crate::driver::Buf;
    let bs = u64::from(state.block_size);
    let config = driver.blk_config()?;
    let features = driver.acked_features();
    let segment_bytes = if features & (1 << VIRTIO_BLK_F_SIZE_MAX) != 0 && config.size_max != 0 {
        config.size_max
    } else {
        u32::MAX
    };
    let seg_max = (features & (1 << VIRTIO_BLK_F_SEG_MAX) != 0 && config.seg_max != 0)
        .then_some(config.seg_max);
    let per = blocks_per_read(driver, segment_bytes, seg_max, bs, chunk)?;
    let seg = read_segment(segment_bytes);
    let n = state.blocks.len() as u64;
    let mut out = CrashCheck::default();
    let mut first = 0u64;
    while first < n {
        let count = per.min(n - first);
        let offset = state.offset + first * bs;
        let mut req = vec![Buf::Out(
            header_bytes(VIRTIO_BLK_T_IN, offset / SECTOR_SIZE).to_vec(),
        )];
        let mut left = count * bs;
        while left > 0 {
            let len = left.min(seg);
            req.push(Buf::In(len as u32));
            left -= len;
        }
        req.push(Buf::In(1));
        let done = driver.submit(0, &req)?;
        if done.status != Some(S_OK) {
            return Err(LoadError::Workload(format!(
                "reading {count} blocks at byte offset {offset} after the crash: status {:?}",
                done.status
            )));
        }
        for (i, buf) in done.data.chunks_exact(bs as usize).enumerate() {
            let bi = (first + i as u64) as usize;
            let st = state.blocks[bi];
            let at = offset + i as u64 * bs;
            match crate::verify::check_block_after_crash(buf, bi as u64, at, st) {
                BlockCheck::Unknown => {}
                BlockCheck::Good => {
                    out.checked += 1;
                    if st.stable != 0 {
                        out.stable += 1;
                    }
                    let holds_stable =
                        buf.chunks(crate::verify::SECTOR).enumerate().all(|(k, s)| {
                            crate::verify::decode_sector(s, at + (k * crate::verify::SECTOR) as u64)
                                .is_ok_and(|seq| seq == st.stable)
                        });
                    if !holds_stable {
                        out.newer += 1;
                    }
                }
                BlockCheck::Corrupt(c) => {
                    out.checked += 1;
                    out.lost.push(c);
                }
            }
            state.settle_after_crash(bi, buf);
        }
        first += count;
    }
    Ok(out)
}

/// Sends one FLUSH on queue 0 of `driver` (nothing else in flight there) and waits for it:
/// whether the device answered `S_OK`.
pub fn flush(driver: &Driver) -> Result<bool, LoadError> {
    use crate::driver::Buf;
    let done = driver.submit(
        0,
        &[
            Buf::Out(header_bytes(VIRTIO_BLK_T_FLUSH, 0).to_vec()),
            Buf::In(1),
        ],
    )?;
    Ok(done.status == Some(S_OK))
}

/// A fresh record for `w` on `device`.
pub fn new_state(w: &Workload, device: &Device) -> Result<VerifyState, LoadError> {
    let (offset, blocks) = region(w, device)?;
    Ok(VerifyState::new(w.block_size, offset, blocks))
}
