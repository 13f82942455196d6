//! `dovetail-bench annotate`: what parallax-v2's per-block annotations cost the guest.
//!
//! parallax-v2 is parallax-v1 plus annotations (read/write counts, last access, access pattern,
//! taint) updated on every guest request and committed at FLUSH and by a timer every 5 s. The
//! target: on 4 KiB random I/O, v2 within 5 % of v1 (IOPS ratio v2/v1 ≥ 0.95).
//!
//! One fresh store holds two disks of the same size, `v1` (parallax-v1) and `v2`
//! (parallax-v2), both served by one release daemon (`dovetail serve --store DIR --disk
//! v1=SOCK1 --disk v2=SOCK2 --control CTL --queues N`):
//!
//! 1. **fill**: both disks written in full, sequentially (4 KiB requests), so every read hits
//!    an allocated block;
//! 2. **runs**: for each workload (4 KiB randread and randwrite at QD32 on the daemon's queues,
//!    4 KiB randread at QD1 on one queue), `reps` pairs of runs, strictly alternating v1, v2,
//!    v1, v2, ... (the same seed, so the same offsets, within a pair). Each run has its own
//!    connection: between runs the daemon commits the disk the last guest left, and the bench
//!    fsyncs the store's files before the next run starts measuring. Before the randwrite
//!    pairs, each disk runs randwrite twice unmeasured (the warm-up: v1, v2, v1, v2), so both
//!    start them with the space copy-on-write needs already granted. Per run: IOPS, latency,
//!    the stalls (bursts of requests held 10 ms or more, e.g. v2's timer commits), the daemon's
//!    CPU time, and the CPU time the kernel's threads and every other process used meanwhile (this
//!    machine may be shared);
//! 3. **check**: `dovetail ctl annotations v2 --json` before the first run and after the last;
//!    the difference of its read and write totals against what the generator issued to v2.
//!
//! The verdict per workload is the median of the pairs' ratios (v2 IOPS / v1 IOPS of the same
//! pair). The write-up is one section of BENCHMARKS.md between marker comments, replaced in
//! place (or appended at the end the first time).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::compare::{fmt_iops, ratio, sync_dir, CompareError, Daemon, Machine};
use crate::layouts::dovetail_cmd;
use crate::load::{
    self, CpuTime, Latency, Limit, LoadError, Pattern, Report, SlowRequest, Workload,
};
use crate::procstat::{kernel_threads_cpu, process_cpu, system_busy};
use crate::units::format_size;

/// The marker comments around the section in BENCHMARKS.md.
pub const BEGIN: &str = "<!-- dovetail-bench annotate: begin -->";
pub const END: &str = "<!-- dovetail-bench annotate: end -->";
/// The section's title.
pub const TITLE: &str = "Annotations: what parallax-v2 costs against parallax-v1";
/// The goal: v2 IOPS / v1 IOPS at least this on every 4 KiB random workload (≤ 5 % overhead).
pub const TARGET_RATIO: f64 = 0.95;
/// The two disks, in the order each pair runs them, and their layouts.
pub const DISKS: [&str; 2] = ["v1", "v2"];
const LAYOUTS: [&str; 2] = ["parallax-v1", "parallax-v2"];
/// How long any one request may take before the generator gives up: generous, since an
/// extent grant or a commit may hold a request for a while, and that is a figure, not an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A request held at least this long is part of a *stall*.
pub const STALL: Duration = Duration::from_millis(10);
/// The stall target: no stall (so no request) of this long or longer on either disk, timer
/// and FLUSH commits included.
pub const STALL_TARGET: Duration = Duration::from_millis(50);
/// A slow request issued less than this after a stall's last completion belongs to it.
const STALL_GAP: Duration = Duration::from_millis(20);
/// A run is called disturbed when everything else on the machine used at least this much of
/// its CPU capacity (percent) while it ran.
pub const BUSY_PERCENT: f64 = 10.0;

/// What the profile of the daemon showed, at this revision (not from the run the figures come
/// from).
const NOTES: &str =
    "Where v2's extra time goes (from the code, `perf record -g` and `strace -f -T` of the \
daemon under these workloads, and this benchmark run on a build with the timer turned off; not \
from this run). These profiles were taken before writes ran outside a version-wide lock and \
commits persisted outside the state lock (ARCHITECTURE.md, *Commits as generations*): the timer \
commit now holds requests only while it captures (waiting for the writes in flight, writing the \
dirty annotation and checksum pages into the tree), and its node write-back and `fdatasync` run \
beside new requests. What they found:

- **The request path.** Every request calls `Table::record` (crate `dovetail-annotations`) once \
  the data is served: a `fetch_add` on the ring of the last 8 request ends, which every queue's \
  worker writes, then per 4 KiB block an atomic increment of the block's counter and a \
  compare-and-swap of its packed epochs/pattern/taint word, then a check of the page's dirty \
  bit. The table takes 16 bytes per block (4 MiB for 1 GiB), so a random request misses the CPU \
  caches on its block's slot. Under randread QD32, `Table::record` was about 4 % of v2's samples, \
  over half of them on the load of the block's counter (the miss) and most of the rest on the \
  locked increment and the ring's `fetch_add`; the kernel's page-cache lookup \
  (`filemap_get_read_batch`, `xas_load`) went from about 10 % of v1's samples to 14 % of v2's, \
  the table's cache lines evicting the page cache's. That is the daemon's extra CPU per request \
  in the tables (a few tenths of a µs). At QD32 the daemon's two queue workers are the \
  bottleneck (they used about 1.8 of the machine's two CPUs), so IOPS falls about as much as the \
  daemon's CPU per request rises. For writes, `record` runs while the version's write lock is \
  held, which serialises the queues' writes anyway. With the timer turned off (below), v2 still \
  ran at 0.92 to 1.00 of v1 per pair on randread QD32 and on randwrite: this part alone is \
  about at the 5 % the target allows.
- **The timer commit.** Every 5 s, if any annotation changed (under load, always), the \
  persister thread (`annotations-<version>`) commits the version. It writes every dirty \
  annotation page into the tree (a random load dirties all 1029 pages of a 1 GiB disk, each \
  copied on write), writes back the tree nodes changed since the last commit, `fdatasync`s the \
  store's data file and commits the root record, all under the version's write lock, so every \
  request waits for it. After reads the sync has little to write, and the commit holds requests \
  for some milliseconds (v2's slowest reads). After writes it writes back everything the guest \
  wrote since the last commit: under strace that thread's `fdatasync` of the data file took 0.4 \
  to 0.6 s, and the generator sees stalls of 0.5 to 1.5 s, one to three in each 10 s randwrite \
  run. A commit also ends the allocator's epoch, so the next write to each block is copied on \
  write again, where v1 copies each block once per run. v1 does none of this without a FLUSH, \
  and the load sends none: a guest that flushes every few seconds (ext4 commits its journal \
  every 5 s) would make v1 commit too. The check: this benchmark on the same code built with \
  the timer turned off (`ParallaxOptions::persist_every: None`, so annotations are committed \
  only with the data: at FLUSH, snapshot and disconnect) saw no stall on v2 but one extent grant, \
  as on v1, and v2 at 0.933 of v1 on randwrite (pairs 1.004, 0.933, 0.920), against \
  0.769 (0.859, 0.762, 0.769) for the code as it is, run on the same machine minutes before. \
  On randwrite, then, the timer's stalls are most of v2's loss.
- **Method and noise.** The disks are filled 4 KiB at a time: after a fill with 1 MiB writes, \
  copy-on-write into the blocks the fill had written ran at half the speed of copy-on-write \
  elsewhere (about 40 % of the daemon's samples in the kernel's `ext4_block_write_begin`, \
  presumably on the large page-cache folios those writes left), so v1's randwrite runs \
  alternated between about 100k and over 200k IOPS as its copy-on-write moved between the two, \
  while v2, whose timer commits move it mid-run, stayed in between. The warm-up takes most extent \
  grants out of the measured runs (a grant zeroes 64 MiB and syncs the data file, a stall of up \
  to 0.8 s: a stall on v1 is one). This machine is shared and its speed drifts: v1's own runs \
  differ by 10 to 20 % between pairs, so a ratio within a few percent of the target is not \
  firm; the *others* column shows the runs other work disturbed, and a busy second CPU even \
  speeds up QD1, whose round trip is shorter when the vCPUs do not go idle.";

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Job {
    pub pattern: Pattern,
    pub iodepth: u16,
    pub queues: usize,
}

impl Job {
    pub fn label(&self) -> String {
        format!(
            "{} 4K QD{} x{}q",
            self.pattern.name(),
            self.iodepth,
            self.queues
        )
    }
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct AnnotateOptions {
    /// The release `dovetail` binary.
    pub dovetail: PathBuf,
    /// Directory for the store, the sockets and the daemon's log.
    pub dir: PathBuf,
    /// Size of each disk.
    pub size: u64,
    /// Length of each run.
    pub duration: Duration,
    /// Pairs of runs (v1, v2) per workload.
    pub reps: u32,
    /// Before the pairs of a write workload, each disk runs it unmeasured for this long in all,
    /// in two runs (v1, v2, v1, v2), so both start the pairs with the space their copy-on-write
    /// needs already granted; zero: no warm-up.
    pub warmup: Duration,
    /// Queues the daemon serves and the QD32 workloads use.
    pub queues: usize,
    /// Requests in flight per queue of the QD32 workloads.
    pub iodepth: u16,
}

impl AnnotateOptions {
    /// The defaults: 1 GiB disks, 10 s runs, 3 pairs per workload, QD32 on 2 queues.
    pub fn new(dovetail: PathBuf, dir: PathBuf) -> AnnotateOptions {
        AnnotateOptions {
            dovetail,
            dir,
            size: 1 << 30,
            duration: Duration::from_secs(10),
            reps: 3,
            warmup: Duration::from_secs(10),
            queues: 2,
            iodepth: 32,
        }
    }

    /// A smoke run: 256 MiB disks, 1 s runs, 2 pairs.
    pub fn quick(dovetail: PathBuf, dir: PathBuf) -> AnnotateOptions {
        AnnotateOptions {
            size: 256 << 20,
            duration: Duration::from_secs(1),
            reps: 2,
            warmup: Duration::from_secs(1),
            ..AnnotateOptions::new(dovetail, dir)
        }
    }

    /// The workloads, in the order they run: randread and randwrite at `iodepth` on `queues`,
    /// then randread at QD1 on one queue.
    pub fn jobs(&self) -> Vec<Job> {
        vec![
            Job {
                pattern: Pattern::RandRead,
                iodepth: self.iodepth,
                queues: self.queues,
            },
            Job {
                pattern: Pattern::RandWrite,
                iodepth: self.iodepth,
                queues: self.queues,
            },
            Job {
                pattern: Pattern::RandRead,
                iodepth: 1,
                queues: 1,
            },
        ]
    }
}

/// A burst of requests held [`STALL`] or more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stall {
    /// When the longest-held request of the burst was issued, seconds from the run's start.
    pub at_s: f64,
    /// How long it was held, seconds.
    pub held_s: f64,
}

/// The stalls among `slow` (requests of [`STALL`] or more, any order): a request issued before
/// the last completion of the stall before it (or less than [`STALL_GAP`] after) belongs to
/// that stall; a stall is as long as its longest-held request. `t0`: the run's start.
pub fn stalls(slow: &[SlowRequest], t0: Instant) -> Vec<Stall> {
    let mut slow: Vec<SlowRequest> = slow.to_vec();
    slow.sort_by_key(|r| r.done);
    let mut out: Vec<Stall> = Vec::new();
    let mut last_done: Option<Instant> = None;
    for r in &slow {
        let held = Duration::from_nanos(r.latency_ns);
        let at_s = r
            .done
            .checked_sub(held)
            .map_or(0.0, |i| i.saturating_duration_since(t0).as_secs_f64());
        let stall = Stall {
            at_s,
            held_s: held.as_secs_f64(),
        };
        let issued = r.done.checked_sub(held).unwrap_or(r.done);
        match (last_done, out.last_mut()) {
            // Sorted by completion: `d` is the latest completion of the current stall.
            (Some(d), Some(cur)) if issued < d + STALL_GAP => {
                if stall.held_s > cur.held_s {
                    *cur = stall;
                }
            }
            _ => out.push(stall),
        }
        last_done = Some(r.done);
    }
    out
}

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunFigures {
    /// `v1` or `v2`.
    pub disk: String,
    /// 1-based pair number.
    pub rep: u32,
    pub elapsed_s: f64,
    pub reads: u64,
    pub writes: u64,
    pub iops: f64,
    pub lat_us: Latency,
    /// Requests that took 1 ms or more.
    pub over_1ms: u64,
    pub io_errors: u64,
    /// The stalls (bursts of requests held 10 ms or more), in order.
    pub stalls: Vec<Stall>,
    /// CPU time of the daemon (all its threads) during the run, seconds.
    pub daemon_cpu_s: f64,
    /// CPU time of this process (the generator) during the run, seconds.
    pub bench_cpu_s: f64,
    /// CPU time of the kernel's threads during the run (writeback among them), seconds.
    pub kernel_cpu_s: f64,
    /// The same as a percentage of the machine's capacity over the run.
    pub kernel_percent: f64,
    /// CPU time of every other process on the machine during the run, seconds.
    pub others_cpu_s: f64,
    /// The same as a percentage of the machine's capacity over the run.
    pub others_percent: f64,
}

impl RunFigures {
    pub fn ops(&self) -> u64 {
        self.reads + self.writes
    }

    /// The daemon's CPU time per request, microseconds.
    pub fn daemon_us_per_request(&self) -> f64 {
        ratio(self.daemon_cpu_s * 1e6, self.ops() as f64)
    }

    /// Seconds held in stalls, in all.
    pub fn stalled_s(&self) -> f64 {
        self.stalls.iter().map(|s| s.held_s).fold(0.0, |a, b| a + b)
    }

    /// IOPS over the run's time outside its stalls.
    pub fn iops_outside_stalls(&self) -> f64 {
        ratio(self.ops() as f64, self.elapsed_s - self.stalled_s())
    }

    fn disturbed(&self) -> bool {
        self.others_percent >= BUSY_PERCENT
    }
}

/// One workload's runs and what they add up to.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub job: Job,
    pub label: String,
    pub v1: Vec<RunFigures>,
    pub v2: Vec<RunFigures>,
    /// Medians over the runs.
    pub v1_iops: f64,
    pub v2_iops: f64,
    pub v1_p50_us: f64,
    pub v2_p50_us: f64,
    pub v1_p99_us: f64,
    pub v2_p99_us: f64,
    /// Median daemon CPU time per request, microseconds.
    pub v1_cpu_us: f64,
    pub v2_cpu_us: f64,
    /// Sums over the runs.
    pub v1_over_1ms: u64,
    pub v2_over_1ms: u64,
    /// Largest over the runs.
    pub v1_max_us: f64,
    pub v2_max_us: f64,
    /// Stalls, and seconds held in them, summed over the runs.
    pub v1_stalls: usize,
    pub v2_stalls: usize,
    pub v1_stalled_s: f64,
    pub v2_stalled_s: f64,
    /// The median over the pairs of v2/v1 of the IOPS outside the stalls.
    pub ratio_outside_stalls: f64,
    /// v2 IOPS / v1 IOPS of each pair.
    pub pair_ratios: Vec<f64>,
    /// The median of `pair_ratios`: the verdict's figure.
    pub ratio: f64,
    /// The median ratio of the pairs in which neither run was disturbed, when some were (and
    /// some were not).
    pub quiet_ratio: Option<f64>,
    pub met: bool,
}

impl JobResult {
    fn of(job: Job, v1: Vec<RunFigures>, v2: Vec<RunFigures>) -> JobResult {
        let med = |runs: &[RunFigures], f: fn(&RunFigures) -> f64| median(runs.iter().map(f));
        let pair_ratios: Vec<f64> = v1
            .iter()
            .zip(&v2)
            .map(|(a, b)| ratio(b.iops, a.iops))
            .collect();
        let ratio_ = median(pair_ratios.iter().copied());
        let quiet: Vec<f64> = v1
            .iter()
            .zip(&v2)
            .filter(|(a, b)| !a.disturbed() && !b.disturbed())
            .map(|(a, b)| ratio(b.iops, a.iops))
            .collect();
        let quiet_ratio =
            (!quiet.is_empty() && quiet.len() < pair_ratios.len()).then(|| median(quiet));
        let max = |runs: &[RunFigures]| runs.iter().map(|r| r.lat_us.max).fold(0.0, f64::max);
        JobResult {
            job,
            label: job.label(),
            v1_iops: med(&v1, |r| r.iops),
            v2_iops: med(&v2, |r| r.iops),
            v1_p50_us: med(&v1, |r| r.lat_us.p50),
            v2_p50_us: med(&v2, |r| r.lat_us.p50),
            v1_p99_us: med(&v1, |r| r.lat_us.p99),
            v2_p99_us: med(&v2, |r| r.lat_us.p99),
            v1_cpu_us: med(&v1, RunFigures::daemon_us_per_request),
            v2_cpu_us: med(&v2, RunFigures::daemon_us_per_request),
            v1_over_1ms: v1.iter().map(|r| r.over_1ms).sum(),
            v2_over_1ms: v2.iter().map(|r| r.over_1ms).sum(),
            v1_max_us: max(&v1),
            v2_max_us: max(&v2),
            v1_stalls: v1.iter().map(|r| r.stalls.len()).sum(),
            v2_stalls: v2.iter().map(|r| r.stalls.len()).sum(),
            v1_stalled_s: v1.iter().map(RunFigures::stalled_s).fold(0.0, |a, b| a + b),
            v2_stalled_s: v2.iter().map(RunFigures::stalled_s).fold(0.0, |a, b| a + b),
            ratio_outside_stalls: median(
                v1.iter()
                    .zip(&v2)
                    .map(|(a, b)| ratio(b.iops_outside_stalls(), a.iops_outside_stalls())),
            ),
            met: !pair_ratios.is_empty() && ratio_ >= TARGET_RATIO,
            ratio: ratio_,
            pair_ratios,
            quiet_ratio,
            v1,
            v2,
        }
    }
}

/// The median (the mean of the two middle values for an even count); 0 for no values.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Read and write totals of a disk's annotations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub reads: u64,
    pub writes: u64,
}

/// What the annotations counted against what the generator issued to v2.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AnnotationCheck {
    /// After the fill, before the first run.
    pub before: Totals,
    /// After the last run.
    pub after: Totals,
    /// `after - before`.
    pub counted: Totals,
    /// Requests the generator completed on v2 in all runs (4 KiB each: one block each).
    pub issued: Totals,
    /// Writes the fill counted (one per 4 KiB block).
    pub fill_blocks: u64,
}

impl AnnotationCheck {
    /// The annotations counted exactly what was issued.
    pub fn exact(&self) -> bool {
        self.counted == self.issued
    }
}

/// Reads the totals out of what `dovetail ctl --json annotations DISK` printed (the last
/// non-empty line).
pub fn parse_totals(stdout: &str) -> Result<Totals, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("dovetail ctl printed nothing")?;
    let v: Value =
        serde_json::from_str(line).map_err(|e| format!("dovetail ctl printed {line:?}: {e}"))?;
    let t = v
        .get("totals")
        .filter(|t| t.is_object())
        .ok_or_else(|| format!("the reply {line} has no totals"))?;
    let field = |k: &str| {
        t.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("the reply's totals have no {k}: {line}"))
    };
    Ok(Totals {
        reads: field("reads")?,
        writes: field("writes")?,
    })
}

/// Everything one run of the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct AnnotateResult {
    pub disk_bytes: u64,
    pub duration_s: f64,
    pub reps: u32,
    pub queues: usize,
    pub iodepth: u16,
    /// CPUs of the machine.
    pub nproc: usize,
    /// Seconds the fill of each disk took (v1, v2).
    pub fill_s: [f64; 2],
    /// Seconds of unmeasured warm-up per disk before the write workload's pairs.
    pub warmup_s: f64,
    pub jobs: Vec<JobResult>,
    pub check: Option<AnnotationCheck>,
    /// Why the check could not be made, if it could not.
    pub check_error: Option<String>,
    pub target_ratio: f64,
    /// Every workload met the target.
    pub target_met: bool,
    /// No request of any run, on either disk, took [`STALL_TARGET`] or longer.
    pub stall_target_met: bool,
    /// No I/O errors anywhere.
    pub clean: bool,
    pub runtime_s: f64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

fn load_err(what: String) -> impl FnOnce(LoadError) -> CompareError {
    move |source| CompareError::Load {
        system: "dovetail",
        cell: format!("annotate benchmark, {what}"),
        source,
    }
}

/// The annotation totals of `disk`, through `dovetail ctl --json annotations`.
fn annotation_totals(dovetail: &Path, control: &Path, disk: &str) -> Result<Totals, String> {
    let out = Command::new(dovetail)
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .arg("--json")
        .arg("annotations")
        .arg(disk)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {} ctl: {e}", dovetail.display()))?;
    if !out.status.success() {
        return Err(format!(
            "dovetail ctl annotations {disk} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_totals(&String::from_utf8_lossy(&out.stdout))
}

/// Waits up to 10 s for `path` to appear.
fn wait_for(path: &Path, log: &Path) -> Result<(), CompareError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(CompareError::NoSocket("dovetail", log.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn over_1ms(r: &Report) -> u64 {
    r.latency
        .iter_recorded()
        .filter(|v| v.value_iterated_to() >= 1_000_000)
        .map(|v| v.count_at_value())
        .sum()
}

/// One measured run: connects afresh (the daemon has committed the disk the last guest left;
/// the connection waits for it), fsyncs the store's files, runs `w`, disconnects.
fn measure(
    socket: &Path,
    store: &Path,
    w: &Workload,
    daemon_pid: u32,
    nproc: usize,
    what: String,
) -> Result<(RunFigures, Report), CompareError> {
    let (driver, device) = load::connect(socket, w).map_err(load_err(what.clone()))?;
    sync_dir(store)?;
    let (k0, d0, b0, s0, t0) = (
        kernel_threads_cpu(),
        process_cpu(daemon_pid),
        CpuTime::process().total(),
        system_busy(),
        Instant::now(),
    );
    let r = load::run(&driver, &device, w, None).map_err(load_err(what))?;
    let stalls = stalls(&r.slow, t0);
    let wall = t0.elapsed().as_secs_f64();
    let daemon_cpu_s = (process_cpu(daemon_pid) - d0).max(0.0);
    let bench_cpu_s = (CpuTime::process().total() - b0).max(0.0);
    let kernel_cpu_s = (kernel_threads_cpu() - k0).max(0.0);
    let others_cpu_s = (system_busy() - s0 - daemon_cpu_s - bench_cpu_s - kernel_cpu_s).max(0.0);
    drop(driver);
    let f = RunFigures {
        disk: String::new(),
        rep: 0,
        elapsed_s: r.elapsed.as_secs_f64(),
        reads: r.reads,
        writes: r.writes,
        iops: r.iops(),
        lat_us: r.latency_us(),
        over_1ms: over_1ms(&r),
        io_errors: r.io_errors,
        stalls,
        daemon_cpu_s,
        bench_cpu_s,
        kernel_cpu_s,
        kernel_percent: 100.0 * ratio(kernel_cpu_s, wall * nproc as f64),
        others_cpu_s,
        others_percent: 100.0 * ratio(others_cpu_s, wall * nproc as f64),
    };
    Ok((f, r))
}

/// Runs the benchmark (module docs) and returns what it measured.
pub fn run(o: &AnnotateOptions) -> Result<AnnotateResult, CompareError> {
    let started = Instant::now();
    if o.reps == 0 {
        return Err(CompareError::Pause("--reps must be at least 1".into()));
    }
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::fs::create_dir_all(&o.dir).map_err(io(format!("create {}", o.dir.display())))?;
    let store = o.dir.join("annotate-store");
    let sockets = DISKS.map(|d| o.dir.join(format!("annotate-{d}.sock")));
    let control = o.dir.join("annotate-control.sock");
    let log = o.dir.join("annotate-daemon.log");
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_file(&control);

    // Room for both disks several times over (sparse: only what is written takes space):
    // copy-on-write after each commit takes new blocks before the old ones are freed.
    let extent = 64u64 << 20;
    let store_size = (o.size.div_ceil(extent) * 8 + 8) * extent;
    let d = store.display().to_string();
    let s = |v: &str| v.to_string();
    dovetail_cmd(
        &o.dovetail,
        &[
            s("store"),
            s("create"),
            d.clone(),
            s("--size"),
            store_size.to_string(),
        ],
    )?;
    for (disk, layout) in DISKS.iter().zip(LAYOUTS) {
        dovetail_cmd(
            &o.dovetail,
            &[
                s("disk"),
                s("create"),
                d.clone(),
                s(disk),
                s("--size"),
                o.size.to_string(),
                s("--layout"),
                s(layout),
            ],
        )?;
    }
    let mut cmd = Command::new(&o.dovetail);
    cmd.arg("serve").arg("--store").arg(&store);
    for (disk, socket) in DISKS.iter().zip(&sockets) {
        cmd.arg("--disk")
            .arg(format!("{disk}={}", socket.display()));
    }
    cmd.arg("--control")
        .arg(&control)
        .arg("--queues")
        .arg(o.queues.to_string());
    let daemon = Daemon::spawn("dovetail", cmd, &sockets[0], &log, None)?;
    wait_for(&sockets[1], &log)?;
    wait_for(&control, &log)?;
    let pid = daemon.pid();

    // Fill: every block of both disks written once, sequentially, 4 KiB at a time. (After a
    // fill with 1 MiB writes, copy-on-write into the blocks the fill wrote ran at half the speed
    // of copy-on-write anywhere else, so randwrite runs alternated between fast and slow.)
    let fill = Workload {
        block_size: 4096,
        iodepth: o.iodepth,
        queues: o.queues,
        limit: Limit::Passes(1),
        timeout: REQUEST_TIMEOUT,
        ..Workload::new(Pattern::Write)
    };
    let mut fill_s = [0.0; 2];
    let mut clean = true;
    for (i, disk) in DISKS.iter().enumerate() {
        eprintln!(
            "annotate: writing {disk} ({}) in full ...",
            format_size(o.size)
        );
        let t = Instant::now();
        let r = load::run_against(&sockets[i], &fill, None)
            .map_err(load_err(format!("fill of {disk}")))?;
        fill_s[i] = t.elapsed().as_secs_f64();
        clean &= r.io_errors == 0;
    }
    sync_dir(&store)?;
    let before = annotation_totals(&o.dovetail, &control, DISKS[1]);

    let jobs = o.jobs();
    let mut results = Vec::new();
    let mut issued = Totals::default();
    for job in &jobs {
        // Two warm-up runs per disk (v1, v2, v1, v2), each a round of copy-on-write ended by
        // the commit at disconnect, so both disks start the pairs with the space it needs.
        let warmups = if job.pattern.writes() && !o.warmup.is_zero() {
            2
        } else {
            0
        };
        for k in 1..=warmups {
            for (i, disk) in DISKS.iter().enumerate() {
                let w = Workload {
                    iodepth: job.iodepth,
                    queues: job.queues,
                    limit: Limit::Time(o.warmup / 2),
                    timeout: REQUEST_TIMEOUT,
                    seed: 1000 + k,
                    ..Workload::new(job.pattern)
                };
                let what = format!("{} on {disk}, warm-up {k}", job.label());
                let (f, _) = measure(&sockets[i], &store, &w, pid, nproc, what)?;
                eprintln!(
                    "{:<22} warm-up {k} {disk}: {:>9.0} IOPS (not counted)",
                    job.label(),
                    f.iops
                );
                clean &= f.io_errors == 0;
                if i == 1 {
                    issued.reads += f.reads;
                    issued.writes += f.writes;
                }
            }
        }
        let mut runs: [Vec<RunFigures>; 2] = [Vec::new(), Vec::new()];
        for rep in 1..=o.reps {
            for (i, disk) in DISKS.iter().enumerate() {
                let w = Workload {
                    iodepth: job.iodepth,
                    queues: job.queues,
                    limit: Limit::Time(o.duration),
                    timeout: REQUEST_TIMEOUT,
                    seed: u64::from(rep),
                    slow_threshold: Some(STALL),
                    ..Workload::new(job.pattern)
                };
                let what = format!("{} on {disk}, pair {rep}", job.label());
                let (mut f, _) = measure(&sockets[i], &store, &w, pid, nproc, what)?;
                f.disk = disk.to_string();
                f.rep = rep;
                eprintln!(
                    "{:<22} pair {rep} {disk}: {:>9.0} IOPS  p50 {:>7.1} us  p99 {:>8.1} us  \
                     max {:>9.1} us  >=1ms {:>5}  stalls {} ({:.3} s)  daemon {:.2} us/req  \
                     kernel {:.0}%  others {:.0}%  I/O errors {}",
                    job.label(),
                    f.iops,
                    f.lat_us.p50,
                    f.lat_us.p99,
                    f.lat_us.max,
                    f.over_1ms,
                    f.stalls.len(),
                    f.stalled_s(),
                    f.daemon_us_per_request(),
                    f.kernel_percent,
                    f.others_percent,
                    f.io_errors
                );
                clean &= f.io_errors == 0;
                if i == 1 {
                    issued.reads += f.reads;
                    issued.writes += f.writes;
                }
                runs[i].push(f);
            }
        }
        let [v1, v2] = runs;
        results.push(JobResult::of(*job, v1, v2));
    }

    let after = annotation_totals(&o.dovetail, &control, DISKS[1]);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&store);

    let (check, check_error) = match (before, after) {
        (Ok(before), Ok(after)) => (
            Some(AnnotationCheck {
                before,
                after,
                counted: Totals {
                    reads: after.reads.saturating_sub(before.reads),
                    writes: after.writes.saturating_sub(before.writes),
                },
                issued,
                fill_blocks: o.size / 4096,
            }),
            None,
        ),
        (Err(e), _) | (_, Err(e)) => (None, Some(e)),
    };
    Ok(AnnotateResult {
        disk_bytes: o.size,
        duration_s: o.duration.as_secs_f64(),
        reps: o.reps,
        queues: o.queues,
        iodepth: o.iodepth,
        nproc,
        fill_s,
        warmup_s: o.warmup.as_secs_f64(),
        target_met: results.iter().all(|j| j.met),
        stall_target_met: stall_target_met(&results),
        jobs: results,
        check,
        check_error,
        target_ratio: TARGET_RATIO,
        clean,
        runtime_s: started.elapsed().as_secs_f64(),
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// A warning when the pairs' ratios fall on both sides of the target, empty otherwise.
fn straddle(j: &JobResult, target: f64) -> String {
    let lo = j.pair_ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = j.pair_ratios.iter().copied().fold(0.0, f64::max);
    if lo < target && hi >= target {
        format!(
            " **The pairs' ratios fall on both sides of the target ({lo:.3} to {hi:.3}): the \
             verdict on this workload is not firm.**"
        )
    } else {
        String::new()
    }
}

/// The lowest and highest IOPS of some runs, as `103.6k–209.6k`.
fn iops_range(runs: &[RunFigures]) -> String {
    let lo = runs.iter().map(|r| r.iops).fold(f64::INFINITY, f64::min);
    let hi = runs.iter().map(|r| r.iops).fold(0.0, f64::max);
    if runs.is_empty() {
        "nothing".into()
    } else {
        format!("{}–{}", fmt_iops(lo), fmt_iops(hi))
    }
}

/// A run's stalls as `0.412 (4.98), 0.388 (10.46)`; `none` if none; the longest 6 if more,
/// with how many more.
fn stall_list(stalls: &[Stall]) -> String {
    if stalls.is_empty() {
        return "none".into();
    }
    const SHOWN: usize = 6;
    let mut v: Vec<&Stall> = stalls.iter().collect();
    if v.len() > SHOWN {
        v.sort_by(|a, b| b.held_s.total_cmp(&a.held_s));
        v.truncate(SHOWN);
        v.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    }
    let mut out: Vec<String> = v
        .iter()
        .map(|s| format!("{:.3} ({:.2})", s.held_s, s.at_s))
        .collect();
    if stalls.len() > SHOWN {
        out.push(format!(
            "and {} more, {:.3} s in all",
            stalls.len() - SHOWN,
            stalls.iter().map(|s| s.held_s).fold(0.0, |a, b| a + b)
        ));
    }
    out.join(", ")
}

/// Whether no request of any run of `jobs`, on either disk, took [`STALL_TARGET`] or longer
/// (so no stall did: a stall is as long as its longest-held request).
pub fn stall_target_met(jobs: &[JobResult]) -> bool {
    !jobs.is_empty()
        && jobs
            .iter()
            .all(|j| j.v1_max_us.max(j.v2_max_us) < STALL_TARGET.as_secs_f64() * 1e6)
}

/// The stall target's bullet: the longest stall and the slowest request of each disk, over
/// every run of every workload.
fn stall_verdict(r: &AnnotateResult) -> String {
    let longest = |runs: fn(&JobResult) -> &Vec<RunFigures>| {
        r.jobs
            .iter()
            .flat_map(|j| runs(j).iter().map(move |f| (j, f)))
            .flat_map(|(j, f)| f.stalls.iter().map(move |st| (j, f, st)))
            .max_by(|a, b| a.2.held_s.total_cmp(&b.2.held_s))
            .map_or("no stall".to_string(), |(j, f, st)| {
                format!(
                    "{:.0} ms ({}, pair {}, {:.2} s into the run)",
                    st.held_s * 1e3,
                    j.label,
                    f.rep,
                    st.at_s
                )
            })
    };
    let slowest = |f: fn(&JobResult) -> f64| r.jobs.iter().map(f).fold(0.0, f64::max) / 1e3;
    format!(
        "- Stall target: no stall of {} ms or more on either disk while v2's timer commits run \
         (the load sends no FLUSH): {}. The longest stall on v2: {}; on v1: {}. \
         The slowest request: {:.1} ms on v2, {:.1} ms on v1.",
        STALL_TARGET.as_millis(),
        verdict(r.stall_target_met),
        longest(|j| &j.v2),
        longest(|j| &j.v1),
        slowest(|j| j.v2_max_us),
        slowest(|j| j.v1_max_us),
    )
}

/// The tables (per workload; every run; the annotation check) and the verdicts, as Markdown.
pub fn tables(r: &AnnotateResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Per workload: medians over {reps} run{p} of each disk (latency in µs, from publishing a \
         request to seeing it used); *v2/v1* is the median over the pairs of v2's IOPS divided \
         by v1's in the same pair, each pair's ratio in brackets; *daemon CPU* is the daemon's \
         CPU time (all threads) per request, in µs:\n\n\
         | workload | v1 IOPS | v2 IOPS | v2/v1 | target ≥ {t:.2} | v1 p50 / p99 | v2 p50 / p99 \
         | daemon CPU v1 / v2 | stalls v1 / v2 | max v1 / v2 |\n\
         | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        reps = r.reps,
        p = if r.reps == 1 { "" } else { "s" },
        t = r.target_ratio,
    );
    for j in &r.jobs {
        let pairs: Vec<String> = j.pair_ratios.iter().map(|x| format!("{x:.3}")).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | **{:.3}** ({}) | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} \
             | {}, {:.2} s / {}, {:.2} s | {:.1} / {:.1} |",
            j.label,
            fmt_iops(j.v1_iops),
            fmt_iops(j.v2_iops),
            j.ratio,
            pairs.join(", "),
            verdict(j.met),
            j.v1_p50_us,
            j.v1_p99_us,
            j.v2_p50_us,
            j.v2_p99_us,
            j.v1_cpu_us,
            j.v2_cpu_us,
            j.v1_stalls,
            j.v1_stalled_s,
            j.v2_stalls,
            j.v2_stalled_s,
            j.v1_max_us / 1e3,
            j.v2_max_us / 1e3,
        );
    }
    let _ = writeln!(
        s,
        "\n*stalls*: bursts of requests held {stall} ms or more (a slow request issued before, \
         or less than {gap} ms after, the last completion of the burst before it belongs to \
         that burst; a burst counts as long as its longest-held request), their number and the \
         seconds held in them, summed over the runs; *max*: the slowest request of all the runs, \
         in ms.",
        stall = STALL.as_millis(),
        gap = STALL_GAP.as_millis(),
    );

    let _ = writeln!(
        s,
        "\nEvery run, in the order they ran (latency in µs; *stalls*: each one's seconds held, \
         and when it began, in seconds into the run; *kernel* is the CPU the kernel's threads \
         (writeback among them) used during the run and *others* what every other process on \
         the machine used, as a share of its {} CPUs; runs with others at {BUSY_PERCENT:.0} % \
         or more are marked *):\n\n\
         | workload | pair | disk | IOPS | p50 | p99 | p99.9 | max | ≥ 1 ms | stalls | daemon \
         CPU µs/req | kernel | others |\n\
         | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        r.nproc
    );
    for j in &r.jobs {
        for (a, b) in j.v1.iter().zip(&j.v2) {
            for f in [a, b] {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.2} | {:.0} \
                     % | {:.0} %{} |",
                    j.label,
                    f.rep,
                    f.disk,
                    fmt_iops(f.iops),
                    f.lat_us.p50,
                    f.lat_us.p99,
                    f.lat_us.p999,
                    f.lat_us.max,
                    f.over_1ms,
                    stall_list(&f.stalls),
                    f.daemon_us_per_request(),
                    f.kernel_percent,
                    f.others_percent,
                    if f.disturbed() { " *" } else { "" },
                );
            }
        }
    }

    let _ = writeln!(s);
    match (&r.check, &r.check_error) {
        (Some(c), _) => {
            let _ = writeln!(
                s,
                "What v2's annotations counted (`dovetail ctl --json annotations v2`, totals over \
                 all blocks) against what the generator issued to v2 (every request is 4 KiB, one \
                 block):\n\n\
                 | | reads | writes |\n\
                 | --- | ---: | ---: |\n\
                 | totals after the fill, before the first run | {} | {} |\n\
                 | totals after the last run | {} | {} |\n\
                 | counted during the runs (after − before) | {} | {} |\n\
                 | requests the generator completed on v2 (warm-up included) | {} | {} |\n\
                 | difference (counted − issued) | {} | {} |",
                c.before.reads,
                c.before.writes,
                c.after.reads,
                c.after.writes,
                c.counted.reads,
                c.counted.writes,
                c.issued.reads,
                c.issued.writes,
                c.counted.reads as i128 - c.issued.reads as i128,
                c.counted.writes as i128 - c.issued.writes as i128,
            );
        }
        (None, Some(e)) => {
            let _ = writeln!(s, "The annotations could not be read: {e}.");
        }
        (None, None) => {}
    }

    let _ = writeln!(s);
    let failed: Vec<String> = r
        .jobs
        .iter()
        .filter(|j| !j.met)
        .map(|j| format!("{} ({:.3})", j.label, j.ratio))
        .collect();
    let _ = writeln!(
        s,
        "- Target: v2 within 5 % of v1 (v2/v1 ≥ {:.2}) on every 4 KiB random workload: {}{}.",
        r.target_ratio,
        verdict(r.target_met),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" — below it: {}", failed.join(", "))
        }
    );
    for j in &r.jobs {
        let extra = ratio(j.v2_cpu_us - j.v1_cpu_us, j.v1_cpu_us) * 100.0;
        let quiet = j.quiet_ratio.map_or(String::new(), |q| {
            format!(
                "; over the pairs in which no run was disturbed (others < {BUSY_PERCENT:.0} %), \
                 {q:.3}"
            )
        });
        let _ = writeln!(
            s,
            "- {}: v2 at {:.1} % of v1's IOPS (median of the pairs; {:.1} % from the medians \
             of the runs){quiet}; the daemon spent {:.2} µs of CPU per request on v2 against \
             {:.2} on v1 ({:+.0} %). Stalls: v2 {} ({:.2} s held), v1 {} ({:.2} s); over the \
             time outside the stalls v2 ran at {:.1} % of v1's IOPS (median of the pairs). The \
             runs ranged over {} IOPS on v1 and {} on v2.{}",
            j.label,
            j.ratio * 100.0,
            ratio(j.v2_iops, j.v1_iops) * 100.0,
            j.v2_cpu_us,
            j.v1_cpu_us,
            extra,
            j.v2_stalls,
            j.v2_stalled_s,
            j.v1_stalls,
            j.v1_stalled_s,
            j.ratio_outside_stalls * 100.0,
            iops_range(&j.v1),
            iops_range(&j.v2),
            straddle(j, r.target_ratio),
        );
    }
    let _ = writeln!(s, "{}", stall_verdict(r));
    if let Some(c) = &r.check {
        let _ = writeln!(
            s,
            "- The annotations counted {} what was issued: {} reads and {} writes counted, {} \
             and {} issued (before the runs they held the fill's {} writes, one per 4 KiB block \
             written{}).",
            if c.exact() {
                "exactly"
            } else {
                "**not exactly**"
            },
            c.counted.reads,
            c.counted.writes,
            c.issued.reads,
            c.issued.writes,
            c.fill_blocks,
            if c.before
                == (Totals {
                    reads: 0,
                    writes: c.fill_blocks,
                })
            {
                ", as expected"
            } else {
                ": **they held something else**"
            },
        );
    }
    if !r.clean {
        let _ = writeln!(
            s,
            "- **Some requests failed (I/O errors): the run is not clean.**"
        );
    }
    s
}

/// The whole section, between its marker comments, starting with a blank line and ending with
/// a newline.
pub fn section(r: &AnnotateResult, machine: &Machine, command: &str, when: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{BEGIN}\n## {TITLE}\n");
    let _ = writeln!(
        s,
        "Measured on {when} by the command below, in a run of its own ({:.0} s); only this \
         section was rewritten, so its figures are not from the run the rest of this page comes \
         from.\n\n```\n{command}\n```\n",
        r.runtime_s
    );
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), {} of RAM, {}, kernel {}; the store on {}; dovetail revision \
         {}.\n",
        machine.nproc,
        machine.cpu_model,
        machine.memory,
        machine.os,
        machine.kernel,
        machine.filesystem,
        machine.revision
    );
    let jobs: Vec<String> = r.jobs.iter().map(|j| format!("*{}*", j.label)).collect();
    let _ = writeln!(
        s,
        "parallax-v2 is parallax-v1 plus per-block annotations (read/write counts, last access, \
         access pattern, taint), updated by every guest request and committed at FLUSH and by a \
         timer every 5 s. Target: on 4 KiB random I/O, v2 within 5 % of v1. One fresh store \
         holds two disks of {size}, `v1` (`disk create --layout parallax-v1`) and `v2` \
         (`--layout parallax-v2`), both served by one release daemon (`dovetail serve --store \
         DIR --disk v1=SOCK1 --disk v2=SOCK2 --control CTL --queues {q}`) and driven by the load \
         generator (EVENT_IDX, completions by the call eventfd, one thread per queue, no \
         FLUSH, no verify mode). First both disks are written in full, sequentially, 4 KiB at \
         a time (v1 in {f1:.1} s, v2 in {f2:.1} s), so every read hits an allocated block. Then \
         for each workload ({jobs}; QD is per queue, *x1q* one queue), {reps} pairs of {secs:.0} \
         s runs strictly alternating v1, v2, v1, v2, ... (within a pair the same seed, so the \
         same offsets). Each run has its own connection: between runs the daemon commits the \
         disk its last guest left, and the store's files are fsynced before the next run \
         starts measuring. {warm}Before the first run and after the last, `dovetail ctl --json \
         annotations v2` gives the annotations' totals. The daemon's CPU time and the \
         machine's are read from `/proc` around each run.\n",
        size = format_size(r.disk_bytes),
        q = r.queues,
        f1 = r.fill_s[0],
        f2 = r.fill_s[1],
        jobs = jobs.join(", "),
        reps = r.reps,
        secs = r.duration_s,
        warm = if r.warmup_s > 0.0 {
            format!(
                "Before the randwrite pairs, two unmeasured randwrite runs of {:.0} s on each disk \
                 (v1, v2, v1, v2), each a round of copy-on-write ended by a commit, so both disks \
                 start the pairs with the space copy-on-write needs already granted. ",
                r.warmup_s / 2.0
            )
        } else {
            String::new()
        },
    );
    s.push_str(&tables(r));
    let _ = writeln!(s, "\n{NOTES}\n{END}");
    s
}

/// `doc` with the section replaced (between its markers) or, the first time, appended at the
/// end. The rest of `doc` is kept byte for byte.
pub fn replace_section(doc: &str, section: &str) -> String {
    crate::section::replace(doc, section, BEGIN, END, None)
}

/// Rewrites the section of the Markdown file `path` (created if missing).
pub fn write_section(path: &Path, section: &str) -> Result<(), CompareError> {
    crate::section::write(path, section, BEGIN, END, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median([]), 0.0);
        assert_eq!(median([3.0]), 3.0);
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn totals_are_parsed() {
        let reply = r#"{"blocks":262144,"disk":"v2","epoch_base":1795293482,"epoch_secs":600,"labels":[],"layout":"parallax-v2","role":"trusted","snapshot":null,"totals":{"blocks":262144,"first_block":0,"heat":262144,"last_read":0,"last_write":1,"random_blocks":2,"reads":7,"sequential_blocks":262142,"taint":0,"touched_blocks":262144,"writes":262144},"version":2}"#;
        assert_eq!(
            parse_totals(&format!("{reply}\n")),
            Ok(Totals {
                reads: 7,
                writes: 262144
            })
        );
        assert!(parse_totals("").is_err());
        assert!(parse_totals(r#"{"totals":{"reads":1}}"#).is_err());
        assert!(parse_totals("nope").is_err());
    }

    fn figures(disk: &str, iops: f64, others_percent: f64) -> RunFigures {
        RunFigures {
            disk: disk.into(),
            iops,
            reads: 1000,
            daemon_cpu_s: 0.002,
            others_percent,
            ..RunFigures::default()
        }
    }

    #[test]
    fn the_verdict_is_the_median_of_the_pairs() {
        let job = Job {
            pattern: Pattern::RandRead,
            iodepth: 32,
            queues: 2,
        };
        let j = JobResult::of(
            job,
            vec![
                figures("v1", 100.0, 0.0),
                figures("v1", 200.0, 50.0),
                figures("v1", 100.0, 0.0),
            ],
            vec![
                figures("v2", 96.0, 0.0),
                figures("v2", 100.0, 0.0),
                figures("v2", 90.0, 0.0),
            ],
        );
        assert_eq!(j.pair_ratios, [0.96, 0.5, 0.9]);
        assert_eq!(j.ratio, 0.9);
        assert!(!j.met);
        // The second pair was disturbed: the quiet ones are 0.96 and 0.9.
        assert!(j.quiet_ratio.is_some_and(|q| (q - 0.93).abs() < 1e-12));
        assert_eq!(j.v1_iops, 100.0);
        assert_eq!(j.v1_cpu_us, 2.0);
        assert_eq!(j.label, "randread 4K QD32 x2q");
    }

    #[test]
    fn slow_requests_make_stalls() {
        let t0 = Instant::now();
        let ms = |v: u64| Duration::from_millis(v);
        let slow = |done_ms: u64, held_ms: u64| SlowRequest {
            done: t0 + ms(done_ms),
            latency_ns: held_ms * 1_000_000,
        };
        // A 400 ms stall ending at 5.4 s (three requests, any order), a lone 12 ms request,
        // and a 300 ms stall ending at 10.5 s.
        let v = stalls(
            &[
                slow(5_401, 390),
                slow(7_000, 12),
                slow(5_400, 400),
                slow(5_410, 395),
                slow(10_500, 300),
            ],
            t0,
        );
        assert_eq!(v.len(), 3);
        assert!((v[0].at_s - 5.0).abs() < 1e-9 && (v[0].held_s - 0.4).abs() < 1e-9);
        assert!((v[1].held_s - 0.012).abs() < 1e-9);
        assert!((v[2].at_s - 10.2).abs() < 1e-9);
        assert!(stalls(&[], t0).is_empty());
        // Two bursts of one stall, 30 ms apart: the second's requests were issued during the
        // first.
        let v2 = stalls(&[slow(5_600, 1_100), slow(5_630, 1_000)], t0);
        assert_eq!(v2.len(), 1);
        assert!((v2[0].held_s - 1.1).abs() < 1e-9);
        let f = RunFigures {
            elapsed_s: 10.0,
            reads: 1000,
            stalls: v,
            ..RunFigures::default()
        };
        assert!((f.stalled_s() - 0.712).abs() < 1e-9);
        assert!((f.iops_outside_stalls() - 1000.0 / 9.288).abs() < 1e-9);
        assert_eq!(
            stall_list(&f.stalls),
            "0.400 (5.00), 0.012 (6.99), 0.300 (10.20)"
        );
    }

    #[test]
    fn the_stall_target_names_the_longest_stall_of_each_disk() {
        let job = Job {
            pattern: Pattern::RandWrite,
            iodepth: 32,
            queues: 2,
        };
        let with = |disk: &str, rep: u32, held_s: f64| RunFigures {
            rep,
            lat_us: Latency {
                max: held_s * 1e6,
                ..Latency::default()
            },
            stalls: vec![Stall { at_s: 4.5, held_s }],
            ..figures(disk, 100.0, 0.0)
        };
        let quiet = vec![JobResult::of(
            job,
            vec![with("v1", 1, 0.012)],
            vec![with("v2", 1, 0.049)],
        )];
        assert!(stall_target_met(&quiet));
        let jobs = vec![JobResult::of(
            job,
            vec![with("v1", 1, 0.012), with("v1", 2, 0.020)],
            vec![with("v2", 1, 0.400), with("v2", 2, 0.050)],
        )];
        assert!(!stall_target_met(&jobs));
        assert!(!stall_target_met(&[]));
        let r = AnnotateResult {
            disk_bytes: 1 << 30,
            duration_s: 10.0,
            reps: 2,
            queues: 2,
            iodepth: 32,
            nproc: 2,
            fill_s: [1.0, 1.0],
            warmup_s: 0.0,
            stall_target_met: stall_target_met(&jobs),
            jobs,
            check: None,
            check_error: None,
            target_ratio: TARGET_RATIO,
            target_met: false,
            clean: true,
            runtime_s: 60.0,
        };
        assert_eq!(
            stall_verdict(&r),
            "- Stall target: no stall of 50 ms or more on either disk while v2's timer commits \
             run (the load sends no FLUSH): **not met**. The longest stall on v2: 400 ms \
             (randwrite 4K QD32 x2q, pair 1, 4.50 s into the run); on v1: 20 ms (randwrite 4K \
             QD32 x2q, pair 2, 4.50 s into the run). The slowest request: 400.0 ms on v2, 20.0 \
             ms on v1."
        );
        assert!(tables(&r).contains("- Stall target: no stall of 50 ms"));
    }

    #[test]
    fn the_section_is_appended_then_replaced_in_place() {
        let doc = "# B\n\n## Tee\n\ntext.\n";
        let one = format!("\n{BEGIN}\n## {TITLE}\n\nfirst\n{END}\n");
        let two = format!("\n{BEGIN}\n## {TITLE}\n\nsecond\nrun\n{END}\n");
        let a = replace_section(doc, &one);
        assert_eq!(a, format!("{doc}\n{BEGIN}\n## {TITLE}\n\nfirst\n{END}\n"));
        let b = replace_section(&a, &two);
        assert_eq!(b, replace_section(doc, &two));
        assert_eq!(replace_section(&b, &two), b);
        // Text after the section stays where it is.
        let later = format!("{a}\n## Later\n");
        assert_eq!(
            replace_section(&later, &two),
            format!("{doc}\n{BEGIN}\n## {TITLE}\n\nsecond\nrun\n{END}\n\n## Later\n")
        );
        assert_eq!(
            replace_section("# B", &one),
            format!("# B\n\n{BEGIN}\n## {TITLE}\n\nfirst\n{END}\n")
        );
    }
}
