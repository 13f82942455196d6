//! `dovetail-bench migrate`: the background copy-out migration, measured three ways in one run.
//!
//! 1. **Copy-out throughput against dd.** For each repetition, alternating: `dd if=SRC of=DST
//!    bs=1M conv=fdatasync` copies SIZE bytes between two files of the bench directory; then a
//!    fresh store gets one parallax-v1 disk of SIZE imported from the same SRC (every block
//!    non-zero), a parallax-v1 candidate attached offline (`disk tee`), and the offline
//!    `dovetail migrate DIR DISK --rate 0` is timed. Before each timing the filesystem is synced
//!    (`syncfs`) and the source warmed (SRC, or the data ranges of the store's data file, read
//!    once), so both copies read from the page cache and both end durable (`fdatasync`).
//! 2. **Guest IOPS with and without a running copy-out.** A parallax-v1 disk, written in full
//!    with self-describing blocks (the load generator's verify format) and teed to a
//!    parallax-v1 candidate, is served by the release `dovetail serve --store DIR --disk
//!    NAME=SOCK --control CTL` and driven by the load generator in verify mode over its first
//!    WORKING-SET bytes. Phases alternate: baseline (no copy-out: not started yet, or paused with
//!    `ctl migrate --pause`) and with copy-out (started with `ctl migrate DISK` at the daemon's
//!    default rate, resumed with `--resume`), each on its own connection, the copy-out's
//!    progress read (`ctl --json migrate DISK --status`) before and after each.
//! 3. **Promote pause.** Under the same load the copy-out is set to `--rate 0` and resumed, the
//!    bench polls until it is done, then runs `ctl --json promote DISK` and records the reply's
//!    pause and the guest's slowest request while it ran. The daemon is then stopped, the
//!    promoted disk exported, and every block of it checked against the record of acknowledged
//!    writes.
//!
//! The write-up is one section of BENCHMARKS.md between marker comments, replaced alone.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::compare::{fmt_iops, prepare_image, ratio, sync_dir, CompareError, Daemon, Machine};
use crate::load::{self, Limit, LoadError, Pattern, Report, SlowRequest, Workload};
use crate::pause::{parse_reply, PauseFigures, Phase};
use crate::procstat::{kernel_threads_cpu, process_cpu, system_busy};
use crate::units::format_size;
use crate::verify::{check_block, stamp, BlockCheck, BlockState, VerifyState};

/// The marker comments around the section in BENCHMARKS.md.
pub const BEGIN: &str = "<!-- dovetail-bench migrate: begin -->";
pub const END: &str = "<!-- dovetail-bench migrate: end -->";
/// The section's title.
pub const TITLE: &str =
    "Migration: copy-out throughput, its cost to a busy guest, the promote pause";
/// Copy-out MB/s ÷ dd MB/s should reach this.
pub const COPY_TARGET: f64 = 0.7;
/// Guest IOPS with a running copy-out ÷ without should reach this.
pub const IOPS_TARGET: f64 = 0.8;
/// The promote pause should stay under this, in milliseconds.
pub const PAUSE_TARGET_MS: f64 = 50.0;
/// The served disk's name.
const DISK: &str = "vm";
/// Bytes per block of the presence map, the copy-out's unit.
const BLOCK: u64 = 4096;
/// The daemon's copy-out rate when `ctl migrate` is given none (docs/control.md).
pub const DEFAULT_RATE: u64 = 64 << 20;
/// How long any one request may take before the generator gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests at least this slow are recorded with their completion time.
const SLOW: Duration = Duration::from_millis(1);
/// A request held by a pause completes as it ends, before the reply reaches the bench.
const SLACK: Duration = Duration::from_millis(5);
/// A phase is undisturbed when other processes used less than this share of the machine's CPU
/// time during it.
pub const QUIET: f64 = 0.05;
/// The load keeps running this long before and after the promote.
const SETTLE: Duration = Duration::from_secs(1);
/// The longest the copy-out may take to finish at full speed.
const FINISH_TIMEOUT: Duration = Duration::from_secs(600);

/// What the profile of the copy-out showed, at this revision (not from a run's figures).
const NOTES: &str = "Where the copy-out's time goes, at this revision (from `perf record -g`, \
`perf trace -s` and `strace -f -T` of `dovetail migrate --rate 0` on a 1 GiB disk on a quiet \
machine, not from this run; by hand, with the same page cache and scratch-file treatment as \
here, it copied at 770 to 850 MiB/s against dd's 1.1 to 1.3 GB/s):

- **Extent grants sync the data file, on the copy thread.** Each new 64 MiB extent of the \
  candidate (17 for 1 GiB) is granted on the way: the store zeroes it (`fallocate`), \
  `fdatasync`s the whole data file and commits its metadata. The copy-out's one thread waits \
  for that sync, i.e. for the writeback of everything it wrote since the previous grant, and \
  copies nothing meanwhile: about every 80 ms of copying came 35 to 45 ms of `fdatasync`; the \
  19 syncs of the data file took 0.61 s of a 1.3 s copy (strace). A checkpoint every second \
  (the candidate's tree, the data file, then the presence map) adds a few more. dd lets the \
  kernel write back while it copies and syncs once, at the end.
- **More CPU per byte.** The copy-out reads and writes 16 blocks (64 KiB) per system call, dd \
  1 MiB; and each block is looked up in the trusted version's radix tree and allocated in the \
  candidate's: about 18 % of the samples are in dovetail's own code, 80 % in the kernel (most of \
  it copying to and from the page cache, as for dd). The copy-out process used about 1.6 times \
  dd's CPU time for the same bytes (0.64 s against 0.36 to 0.40 s under `perf stat`).

Reading the ratio: this is a 2-CPU virtual machine that hands the memory it frees back to its \
host (virtio-balloon free page reporting), and a process that writes into memory the host has \
taken back pays for faulting it in again, in its own CPU time. By hand, dd's CPU time for 1 GiB \
doubled (0.34 to 0.73 s) when it drew on such memory, and earlier runs of this bench, before it \
wrote and deleted a scratch file ahead of each timing, saw dd use 0.45 to 1.19 s and the ratio \
swing from 0.5 to 1.6 between runs, depending on which of the two copies happened to draw on \
it. dd's CPU time in the table (about 0.35 s for 1 GiB when it draws on recently freed memory) \
shows whether a run was affected.

What the promote costs outside its reported pause (from `strace -f -T -tt` of the daemon during \
two promotes of a 2 GiB disk under this load, set beside the generator's slow requests; not from \
this run): before the pause, the Tee is flushed: an `fdatasync` of the store's data file (0.16 to \
0.5 s, with the copy-out's last writes still dirty) and of the metadata. The pause itself \
(closing the Tee, one catalog commit) took 6 to 30 ms. After it, the retired version's space is \
released: one `fallocate(PUNCH_HOLE)` per 64 MiB extent, 21 to 29 ms each (36 extents: 0.9 s), on \
the control connection's thread, all under the store's state lock (`Store::release`). In both \
traces the guest's slowest request of the promote (about 0.5 s) waited while the holes were \
being punched (once completing just as the last one was): something it needed waited for the \
loop, most likely the store's lock (an extent grant for the new trusted version's copy-on-write \
writes). Neither the flush nor the release is counted in the reported pause; the row *the \
guest's slowest request while it ran* shows them.";

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The release `dovetail` binary.
    pub dovetail: PathBuf,
    /// Directory for the stores, the dd files, the sockets and the daemon's log.
    pub dir: PathBuf,
    /// Bytes copied by dd and by the offline copy-out (the disk's size in part 1).
    pub size: u64,
    /// Repetitions of the dd / copy-out pair.
    pub reps: u32,
    /// Size of the served disk in parts 2 and 3.
    pub serve_size: u64,
    /// The guest's load covers the first this many bytes of the served disk.
    pub working_set: u64,
    /// Length of each phase of part 2.
    pub duration: Duration,
    /// Baseline / with-copy-out pairs in part 2, in the order B W, W B, B W, ... (so a steady
    /// drift cancels over every two pairs).
    pub pairs: u32,
    /// The load alone before the first phase, not counted (the working set reaches the
    /// candidate through the guest's own writes, caches warm up).
    pub warmup: Duration,
    /// The candidate's validation policy (both parts).
    pub policy: String,
    pub read_percent: u8,
    pub block_size: u32,
    pub iodepth: u16,
    pub queues: usize,
}

impl MigrateOptions {
    /// The defaults: 1 GiB copied 3 times; a served disk sized by [`auto_serve_size`] with a
    /// 1 GiB working set, a 5 s warm-up and 4 pairs of 10 s phases, 4 KiB random 70/30
    /// reads/writes at QD32 on 2 queues, the candidate under lazy-hashes.
    pub fn new(dovetail: PathBuf, dir: PathBuf) -> MigrateOptions {
        let duration = Duration::from_secs(10);
        let working_set = 1 << 30;
        MigrateOptions {
            dovetail,
            dir,
            size: 1 << 30,
            reps: 3,
            serve_size: auto_serve_size(working_set, duration, 4),
            working_set,
            duration,
            pairs: 4,
            warmup: Duration::from_secs(5),
            policy: "lazy-hashes".into(),
            read_percent: 70,
            block_size: 4096,
            iodepth: 32,
            queues: 2,
        }
    }

    /// The workload, as the write-up names it.
    pub fn workload_label(&self) -> String {
        format!(
            "randrw ({}% reads), {} requests, queue depth {} on each of {} queue{}, over the \
             first {} of the disk",
            self.read_percent,
            format_size(u64::from(self.block_size)),
            self.iodepth,
            self.queues,
            if self.queues == 1 { "" } else { "s" },
            format_size(self.working_set)
        )
    }
}

/// A served disk big enough that the copy-out, at the daemon's default rate, is still running at
/// the end of the last with-copy-out phase: the working set (which the guest's own writes bring
/// over early) plus 1.5 times what the copy-out copies in all with-phases, in 256 MiB steps.
pub fn auto_serve_size(working_set: u64, duration: Duration, pairs: u32) -> u64 {
    let step = 256u64 << 20;
    let copied = DEFAULT_RATE as f64 * duration.as_secs_f64() * f64::from(pairs) * 1.5;
    let rest = (copied as u64).div_ceil(step) * step;
    working_set.div_ceil(step) * step + rest
}

/// One repetition of part 1.
#[derive(Debug, Clone, Serialize)]
pub struct CopyRun {
    /// 1-based.
    pub rep: u32,
    /// dd as a process, start to exit, seconds.
    pub dd_s: f64,
    /// SIZE ÷ `dd_s`, MB/s (10^6 bytes).
    pub dd_mb_s: f64,
    /// What dd printed (its own clock, which includes the final fdatasync), MB/s.
    pub dd_reported_mb_s: f64,
    /// `dovetail migrate` as a process, start to exit, seconds.
    pub copy_s: f64,
    /// SIZE ÷ `copy_s`, MB/s.
    pub copy_mb_s: f64,
    /// What `dovetail migrate` printed (the job's data bytes over its own time), MB/s.
    pub copy_reported_mb_s: f64,
    /// Blocks the copy-out copied with data, and all-zero blocks it recorded.
    pub copied_blocks: u64,
    pub zero_blocks: u64,
    /// CPU time (user + system) of the dd process and of the `dovetail migrate` process,
    /// seconds.
    pub dd_cpu_s: f64,
    pub copy_cpu_s: f64,
    /// CPU time kernel threads (writeback, ...) used meanwhile, seconds.
    pub dd_kernel_cpu_s: f64,
    pub copy_kernel_cpu_s: f64,
    /// CPU time every other process on the machine used meanwhile (a sign of a disturbed
    /// measurement), seconds.
    pub dd_other_cpu_s: f64,
    pub copy_other_cpu_s: f64,
    /// `copy_mb_s` ÷ `dd_mb_s`: both whole processes.
    pub ratio: f64,
    /// `copy_reported_mb_s` ÷ `dd_reported_mb_s`: both tools' own figures.
    pub ratio_reported: f64,
}

/// The copy-out's progress as `ctl --json migrate DISK --status` reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// The job's state (`running`, `paused`, `done`, ...), or `none` before it was started.
    pub state: String,
    pub blocks_present: u64,
    pub blocks_total: u64,
    /// Blocks the copy-out copied with data so far.
    pub copied_blocks: u64,
    pub rate_limit: u64,
}

impl Progress {
    /// Reads the `migration` object of a reply.
    pub fn of(reply: &Value) -> Result<Progress, String> {
        let m = reply
            .get("migration")
            .filter(|m| m.is_object())
            .ok_or_else(|| format!("the reply {reply} has no migration"))?;
        let n = |v: &Value, k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("the migration status has no {k}: {reply}"))
        };
        let mut p = Progress {
            state: "none".into(),
            blocks_present: n(m, "blocks_present")?,
            blocks_total: n(m, "blocks_total")?,
            ..Progress::default()
        };
        if let Some(c) = m.get("copy_out").filter(|c| c.is_object()) {
            p.state = c
                .get("state")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("the copy-out has no state: {reply}"))?
                .to_string();
            p.copied_blocks = n(c, "copied_blocks")?;
            p.rate_limit = n(c, "rate_limit")?;
        }
        Ok(p)
    }
}

/// Baseline or with copy-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Baseline,
    CopyOut,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::CopyOut => "with copy-out",
        }
    }
}

/// One phase of part 2.
#[derive(Debug, Clone, Serialize)]
pub struct LivePhase {
    pub kind: Kind,
    /// 1-based pair number.
    pub pair: u32,
    pub phase: Phase,
    pub before: Progress,
    pub after: Progress,
    /// CPU time of the daemon, of this bench (the load generator), of kernel threads
    /// (writeback, ...) and of every other process on the machine during the phase, seconds.
    pub daemon_cpu_s: f64,
    pub bench_cpu_s: f64,
    pub kernel_cpu_s: f64,
    pub other_cpu_s: f64,
}

impl LivePhase {
    /// Blocks the copy-out copied during the phase.
    pub fn copied(&self) -> u64 {
        self.after
            .copied_blocks
            .saturating_sub(self.before.copied_blocks)
    }

    /// Blocks that became present during the phase (the copy-out's and the guest's writes).
    pub fn present(&self) -> u64 {
        self.after
            .blocks_present
            .saturating_sub(self.before.blocks_present)
    }

    /// The copy-out's data rate over the phase, MB/s.
    pub fn copy_mb_s(&self) -> f64 {
        (self.copied() * BLOCK) as f64 / 1e6 / self.phase.elapsed_s.max(1e-9)
    }
}

/// Part 3.
#[derive(Debug, Clone, Serialize)]
pub struct Promote {
    /// The copy-out's state and progress when the final phase began.
    pub start: Progress,
    /// From resuming at `--rate 0` to seeing it done, seconds.
    pub finish_s: f64,
    /// Blocks it copied in that time.
    pub finish_copied_blocks: u64,
    pub pause: PauseFigures,
    /// The whole `dovetail ctl promote`, milliseconds.
    pub command_ms: f64,
    /// The guest's slowest request that completed while the promote ran (to 5 ms after),
    /// microseconds; 0 if none took 1 ms or more.
    pub guest_max_us: f64,
    /// When that request completed, milliseconds after `dovetail ctl promote` started (it had
    /// waited since `guest_max_at_ms - guest_max_us / 1000`).
    pub guest_max_at_ms: f64,
    /// The same over as long a time just before it.
    pub guest_max_before_us: f64,
    /// The guest's slowest request while the copy-out finished at full speed, microseconds.
    pub guest_max_finishing_us: f64,
    /// The load over the whole final phase.
    pub phase: Phase,
    /// The reply's message.
    pub message: String,
}

/// The promoted disk read back (exported) and checked block by block.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Check {
    pub blocks: u64,
    pub good: u64,
    pub corrupt: u64,
    /// The first corrupt block, described.
    pub first: Option<String>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateResult {
    pub size: u64,
    pub reps: Vec<CopyRun>,
    /// The median (nearest rank) of the whole-process ratios, and of the reported ones.
    pub median_ratio: f64,
    pub median_ratio_reported: f64,
    /// The runs (1-based) in which other processes used under [`QUIET`] of the machine's CPU
    /// time during both dd and the copy-out, and the median ratio over them alone (0 if none).
    pub quiet_reps: Vec<u32>,
    pub quiet_median_ratio: f64,
    /// The ratio the target is judged on: `quiet_median_ratio` if any run was undisturbed, else
    /// `median_ratio`.
    pub judged_copy_ratio: f64,
    pub copy_target: f64,
    /// The target was met by `judged_copy_ratio` (taken at face value when no run was
    /// undisturbed: see `copy_target_judged`).
    pub copy_target_met: bool,
    /// Some run was undisturbed, so the verdict stands on undisturbed figures.
    pub copy_target_judged: bool,
    pub policy: String,
    pub workload: String,
    pub serve_size: u64,
    pub working_set: u64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub queues: usize,
    pub phases: Vec<LivePhase>,
    /// All baseline phases together, and all with-copy-out phases.
    pub baseline: Phase,
    pub copy_out: Phase,
    /// Pooled IOPS with ÷ without.
    pub iops_ratio: f64,
    /// Each pair's ratio.
    pub pair_ratios: Vec<f64>,
    /// The pairs (1-based) in which other processes used under [`QUIET`] of the machine's CPU
    /// time in both phases, and the with/without IOPS ratio over them alone (0 if none).
    pub quiet_pairs: Vec<u32>,
    pub quiet_ratio: f64,
    /// The ratio the target is judged on: `quiet_ratio` if any pair was undisturbed, else
    /// `iops_ratio`.
    pub judged_ratio: f64,
    pub iops_target: f64,
    /// As `copy_target_met`, for `judged_ratio`.
    pub iops_target_met: bool,
    pub iops_target_judged: bool,
    /// The copy-out was running at the end of every with-phase.
    pub copy_out_ran_throughout: bool,
    /// The rate limit the daemon reported for the copy-out.
    pub rate_limit: u64,
    pub promote: Promote,
    pub pause_target_ms: f64,
    pub pause_target_met: bool,
    pub guest_pause_target_met: bool,
    pub check: Check,
    /// No I/O errors, no corrupt block anywhere.
    pub clean: bool,
    /// CPUs of the machine.
    pub cpus: usize,
    pub runtime_s: f64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

fn msg(s: impl Into<String>) -> CompareError {
    CompareError::Pause(s.into())
}

fn load_err(phase: &str) -> impl FnOnce(LoadError) -> CompareError + '_ {
    move |source| CompareError::Load {
        system: "dovetail",
        cell: format!("migrate benchmark, {phase}"),
        source,
    }
}

/// CPU time (user + system) of this process's children that have been waited for, seconds.
fn children_cpu() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage the call writes into.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// What the machine's CPUs did up to now, seconds: busy in all, and in kernel threads.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    busy: f64,
    kernel: f64,
}

impl CpuSample {
    fn now() -> CpuSample {
        CpuSample {
            busy: system_busy(),
            kernel: kernel_threads_cpu(),
        }
    }

    /// (kernel threads, everything else outside `own` seconds of the measured processes)
    /// since `self`.
    fn split(&self, own: f64) -> (f64, f64) {
        let now = CpuSample::now();
        let kernel = (now.kernel - self.kernel).max(0.0);
        (kernel, (now.busy - self.busy - kernel - own).max(0.0))
    }
}

/// Runs `program args`, returns its stdout and stderr and how long it took; fails on a non-zero
/// exit.
fn timed(program: &Path, args: &[String]) -> Result<(String, String, Duration), CompareError> {
    let t = Instant::now();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("run {} {}", program.display(), args.join(" "))))?;
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(CompareError::Tool {
            tool: format!("{} {}", program.display(), args.join(" ")),
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok((stdout, stderr, took))
}

fn dovetail(o: &MigrateOptions, args: &[&str]) -> Result<String, CompareError> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    timed(&o.dovetail, &args).map(|(out, _, _)| out)
}

/// `dovetail ctl --control CONTROL --json ARGS`: the reply's last line as JSON.
fn ctl(o: &MigrateOptions, control: &Path, args: &[&str]) -> Result<Value, CompareError> {
    let mut a = vec![
        "ctl".to_string(),
        "--control".into(),
        control.display().to_string(),
        "--json".into(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    let (out, _, _) = timed(&o.dovetail, &a)?;
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| msg(format!("dovetail ctl {} printed nothing", args.join(" "))))?;
    serde_json::from_str(line).map_err(|e| msg(format!("dovetail ctl printed {line:?}: {e}")))
}

fn status(o: &MigrateOptions, control: &Path) -> Result<Progress, CompareError> {
    Progress::of(&ctl(o, control, &["migrate", DISK, "--status"])?).map_err(msg)
}

/// Flushes every dirty page of the filesystem holding `dir` (`syncfs`).
fn syncfs(dir: &Path) -> Result<(), CompareError> {
    let f = File::open(dir).map_err(io(format!("open {}", dir.display())))?;
    // SAFETY: syncfs only takes a file descriptor, which `f` keeps open for the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io(format!("syncfs {}", dir.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Reads the data ranges of `path` once (holes skipped), so they are in the page cache; returns
/// the bytes read.
fn warm(path: &Path) -> Result<u64, CompareError> {
    let what = || format!("read {}", path.display());
    let f = File::open(path).map_err(io(what()))?;
    let len = f.metadata().map_err(io(what()))?.len();
    let fd = f.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let mut total = 0u64;
    while pos < len {
        // SAFETY: lseek only moves the offset of `fd`, which `f` keeps open.
        let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            break; // ENXIO: no data after `pos`.
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        let (start, end) = (start as u64, if end < 0 { len } else { end as u64 });
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            let got = f.read_at(&mut buf[..n], at).map_err(io(what()))?;
            if got == 0 {
                break;
            }
            at += got as u64;
        }
        total += at - start;
        pos = end.max(start + 1);
    }
    Ok(total)
}

/// Writes `bytes` of zeroes to a scratch file in `dir` and deletes it, so that much memory has
/// just been freed by the guest. This VM hands memory it frees back to its host (virtio-balloon
/// free page reporting), and the first process to touch such memory again pays for it in CPU
/// time; run right before a timing, this lets the timed process draw on recently freed memory,
/// whichever it is.
fn recycle_memory(dir: &Path, bytes: u64) -> Result<(), CompareError> {
    let path = dir.join("recycle.tmp");
    let what = || format!("write {}", path.display());
    let mut f = File::create(&path).map_err(io(what()))?;
    let zero = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(zero.len() as u64) as usize;
        f.write_all(&zero[..n]).map_err(io(what()))?;
        done += n as u64;
    }
    drop(f);
    std::fs::remove_file(&path).map_err(io(format!("remove {}", path.display())))
}

/// The bytes and seconds of dd's last line: `N bytes (...) copied, S s, R MB/s`.
pub fn parse_dd(stderr: &str) -> Option<(u64, f64)> {
    let line = stderr.lines().rev().find(|l| l.contains(" copied, "))?;
    let bytes = line.split_whitespace().next()?.parse().ok()?;
    let secs = line
        .split(" copied, ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((bytes, secs))
}

/// Copied blocks, zero blocks and MiB/s from `dovetail migrate`'s last line: `... (N copied, Z
/// zero blocks, R MiB/s) ...`.
pub fn parse_migrate(stdout: &str) -> Option<(u64, u64, f64)> {
    let line = stdout.lines().rev().find(|l| l.contains(" copied, "))?;
    let inner = line.split_once('(')?.1.split_once(')')?.0;
    let mut it = inner.split(", ");
    let copied = it.next()?.strip_suffix(" copied")?.parse().ok()?;
    let zero = it.next()?.strip_suffix(" zero blocks")?.parse().ok()?;
    let rate = it.next()?.strip_suffix(" MiB/s")?.parse().ok()?;
    Some((copied, zero, rate))
}

/// A store in `store` big enough for a disk of `size`, its candidate and some room.
fn create_store(o: &MigrateOptions, store: &Path, size: u64) -> Result<(), CompareError> {
    let _ = std::fs::remove_dir_all(store);
    let extent = 64u64 << 20;
    let store_size = (size.div_ceil(extent) * 4 + 8) * extent;
    let d = store.display().to_string();
    dovetail(
        o,
        &["store", "create", &d, "--size", &store_size.to_string()],
    )?;
    dovetail(
        o,
        &["disk", "create", &d, DISK, "--size", &size.to_string()],
    )?;
    Ok(())
}

fn import_and_tee(o: &MigrateOptions, store: &Path, image: &Path) -> Result<(), CompareError> {
    let d = store.display().to_string();
    let i = image.display().to_string();
    dovetail(o, &["disk", "import", &d, DISK, "--from", &i])?;
    dovetail(
        o,
        &[
            "disk",
            "tee",
            &d,
            DISK,
            "--candidate",
            "parallax-v1",
            "--policy",
            &o.policy,
        ],
    )?;
    Ok(())
}

/// Part 1, one repetition: dd, then the offline copy-out.
fn copy_rep(o: &MigrateOptions, rep: u32, src: &Path) -> Result<CopyRun, CompareError> {
    let dst = o.dir.join("dd-dst.raw");
    let store = o.dir.join("copy-store");
    let mb = |secs: f64| o.size as f64 / 1e6 / secs.max(1e-9);

    let recycle = o.size + (256 << 20);
    let _ = std::fs::remove_file(&dst);
    syncfs(&o.dir)?;
    warm(src)?;
    recycle_memory(&o.dir, recycle)?;
    let args = [
        format!("if={}", src.display()),
        format!("of={}", dst.display()),
        "bs=1M".into(),
        "conv=fdatasync".into(),
    ];
    let (cpu, sample) = (children_cpu(), CpuSample::now());
    let (_, dd_err, dd_took) = timed(Path::new("dd"), &args)?;
    let dd_cpu_s = children_cpu() - cpu;
    let (dd_kernel_cpu_s, dd_other_cpu_s) = sample.split(dd_cpu_s);
    let (bytes, dd_secs) =
        parse_dd(&dd_err).ok_or_else(|| msg(format!("cannot read dd's output: {dd_err}")))?;
    if bytes != o.size {
        return Err(msg(format!("dd copied {bytes} bytes, not {}", o.size)));
    }
    let _ = std::fs::remove_file(&dst);

    create_store(o, &store, o.size)?;
    import_and_tee(o, &store, src)?;
    syncfs(&o.dir)?;
    warm(&store.join("data.0"))?;
    recycle_memory(&o.dir, recycle)?;
    let d = store.display().to_string();
    let args: Vec<String> = ["migrate", &d, DISK, "--rate", "0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (cpu, sample) = (children_cpu(), CpuSample::now());
    let (out, _, copy_took) = timed(&o.dovetail, &args)?;
    let copy_cpu_s = children_cpu() - cpu;
    let (copy_kernel_cpu_s, copy_other_cpu_s) = sample.split(copy_cpu_s);
    let (copied, zero, mib_s) = parse_migrate(&out)
        .ok_or_else(|| msg(format!("cannot read dovetail migrate's output: {out}")))?;
    if copied + zero != o.size / BLOCK {
        return Err(msg(format!(
            "dovetail migrate copied {copied} blocks and {zero} zero blocks; the disk has {}",
            o.size / BLOCK
        )));
    }
    let _ = std::fs::remove_dir_all(&store);

    let dd_s = dd_took.as_secs_f64();
    let copy_s = copy_took.as_secs_f64();
    let dd_reported_mb_s = mb(dd_secs);
    let copy_reported_mb_s = mib_s * f64::from(1u32 << 20) / 1e6;
    let r = CopyRun {
        rep,
        dd_s,
        dd_mb_s: mb(dd_s),
        dd_reported_mb_s,
        copy_s,
        copy_mb_s: mb(copy_s),
        copy_reported_mb_s,
        copied_blocks: copied,
        zero_blocks: zero,
        dd_cpu_s,
        copy_cpu_s,
        dd_kernel_cpu_s,
        copy_kernel_cpu_s,
        dd_other_cpu_s,
        copy_other_cpu_s,
        ratio: ratio(mb(copy_s), mb(dd_s)),
        ratio_reported: ratio(copy_reported_mb_s, dd_reported_mb_s),
    };
    eprintln!(
        "copy {rep}: dd {:.3} s ({:.0} MB/s, dd says {:.0}); copy-out {:.3} s ({:.0} MB/s, it \
         says {:.0}); ratio {:.2} ({:.2} by their own figures); CPU dd {:.2} s, copy-out {:.2} \
         s; CPU of other processes during dd {:.2} s, during the copy-out {:.2} s",
        r.dd_s,
        r.dd_mb_s,
        r.dd_reported_mb_s,
        r.copy_s,
        r.copy_mb_s,
        r.copy_reported_mb_s,
        r.ratio,
        r.ratio_reported,
        r.dd_cpu_s,
        r.copy_cpu_s,
        r.dd_other_cpu_s,
        r.copy_other_cpu_s
    );
    Ok(r)
}

/// The nearest-rank median (the lower middle of an even count); 0 for none.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len().div_ceil(2) - 1]
}

/// Writes a disk image of `size` bytes in which every 4 KiB block `i` is a self-describing
/// write of sequence number `i + 1` (the load generator's verify format), and fsyncs it.
fn write_verify_image(path: &Path, size: u64) -> Result<(), CompareError> {
    let what = || format!("write {}", path.display());
    let mut f = File::create(path).map_err(io(what()))?;
    let chunk = 8usize << 20;
    let mut buf = vec![0u8; chunk];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(chunk as u64) as usize;
        let per = n.div_ceil(threads).div_ceil(BLOCK as usize) * BLOCK as usize;
        std::thread::scope(|s| {
            for (t, part) in buf[..n].chunks_mut(per).enumerate() {
                let base = done + (t * per) as u64;
                s.spawn(move || {
                    for (i, b) in part.chunks_exact_mut(BLOCK as usize).enumerate() {
                        let off = base + i as u64 * BLOCK;
                        stamp(b, off, off / BLOCK + 1);
                    }
                });
            }
        });
        f.write_all(&buf[..n]).map_err(io(what()))?;
        done += n as u64;
    }
    f.sync_all().map_err(io(what()))
}

/// The record of the image [`write_verify_image`] wrote, for the first `blocks` blocks.
fn image_state(blocks: u64, disk_blocks: u64) -> VerifyState {
    VerifyState {
        block_size: BLOCK as u32,
        offset: 0,
        next_seq: disk_blocks + 1,
        blocks: (0..blocks)
            .map(|i| BlockState {
                acked: i + 1,
                in_flight: 0,
                stable: i + 1,
            })
            .collect(),
    }
}

/// Checks every block of the raw image `path` against `state` (blocks past it: their image
/// sequence number).
fn check_image(path: &Path, state: &VerifyState) -> Result<Check, CompareError> {
    let what = || format!("read {}", path.display());
    let f = File::open(path).map_err(io(what()))?;
    let len = f.metadata().map_err(io(what()))?.len();
    let mut buf = vec![0u8; 4 << 20];
    let mut c = Check {
        blocks: len / BLOCK,
        ..Check::default()
    };
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], at).map_err(io(what()))?;
        for (i, b) in buf[..n].chunks_exact(BLOCK as usize).enumerate() {
            let off = at + i as u64 * BLOCK;
            let block = off / BLOCK;
            let st = state
                .blocks
                .get(block as usize)
                .copied()
                .unwrap_or(BlockState {
                    acked: block + 1,
                    in_flight: 0,
                    stable: block + 1,
                });
            match check_block(b, block, off, st) {
                BlockCheck::Good => c.good += 1,
                BlockCheck::Unknown => {}
                BlockCheck::Corrupt(k) => {
                    c.corrupt += 1;
                    c.first.get_or_insert_with(|| k.to_string());
                }
            }
        }
        at += n as u64;
    }
    Ok(c)
}

/// Adds `r` into `pool` (ops, time, latency, verify counts).
fn pool(into: &mut Option<Report>, r: &Report) {
    match into {
        None => {
            *into = Some(Report {
                slow: Vec::new(),
                ..r.clone()
            })
        }
        Some(p) => {
            p.elapsed += r.elapsed;
            p.reads += r.reads;
            p.writes += r.writes;
            p.read_bytes += r.read_bytes;
            p.write_bytes += r.write_bytes;
            p.io_errors += r.io_errors;
            let _ = p.latency.add(&r.latency);
            if let (Some(a), Some(b)) = (p.verify.as_mut(), r.verify.as_ref()) {
                a.checked += b.checked;
                a.unknown += b.unknown;
                a.corrupt.extend(b.corrupt.iter().cloned());
            }
        }
    }
}

fn report_phase(name: &str, r: &Report, p: Option<&Progress>) {
    let l = r.latency_us();
    let v = r.verify.clone().unwrap_or_default();
    eprintln!(
        "{name:<22} {:>9.0} IOPS  p50 {:>7.1} us  p99 {:>8.1} us  max {:>9.1} us  errors {}  \
         corrupt {}{}",
        r.iops(),
        l.p50,
        l.p99,
        l.max,
        r.io_errors,
        v.corrupt.len(),
        p.map_or(String::new(), |p| format!(
            "  copy-out {} ({} of {} blocks present)",
            p.state, p.blocks_present, p.blocks_total
        ))
    );
}

/// The slowest of `slow` (sorted by completion) that completed in `from..=to`.
fn slowest_in(slow: &[SlowRequest], from: Instant, to: Instant) -> Option<&SlowRequest> {
    let first = slow.partition_point(|r| r.done < from);
    slow[first..]
        .iter()
        .take_while(|r| r.done <= to)
        .max_by_key(|r| r.latency_ns)
}

/// The same, its latency in microseconds; 0 if none.
fn slowest_between(slow: &[SlowRequest], from: Instant, to: Instant) -> f64 {
    slowest_in(slow, from, to).map_or(0.0, |r| r.latency_ns as f64 / 1e3)
}

/// Sets the flag when dropped: the load stops however the controller ends.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the final phase's controller saw.
struct Finished {
    start: Progress,
    resumed: Instant,
    done_at: Instant,
    done: Progress,
    promote_from: Instant,
    promote_to: Instant,
    reply: Value,
}

/// Part 3's controller: full speed, wait for the end, promote.
fn finish_and_promote(
    o: &MigrateOptions,
    control: &Path,
    stop: &AtomicBool,
) -> Result<Finished, CompareError> {
    let _stop_load = SetOnDrop(stop);
    std::thread::sleep(SETTLE);
    let start = status(o, control)?;
    let resumed = Instant::now();
    if start.state == "paused" || start.state == "running" {
        ctl(o, control, &["migrate", DISK, "--rate", "0"])?;
        if start.state == "paused" {
            ctl(o, control, &["migrate", DISK, "--resume"])?;
        }
    }
    let done = loop {
        let p = status(o, control)?;
        if p.state != "running" && p.state != "paused" {
            break p;
        }
        if resumed.elapsed() > FINISH_TIMEOUT {
            return Err(msg(format!(
                "the copy-out did not finish within {} s",
                FINISH_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let done_at = Instant::now();
    if done.blocks_present != done.blocks_total {
        return Err(msg(format!(
            "the copy-out ended {} with {} of {} blocks present",
            done.state, done.blocks_present, done.blocks_total
        )));
    }
    eprintln!(
        "copy-out done in {:.1} s at full speed under load",
        (done_at - resumed).as_secs_f64()
    );
    std::thread::sleep(SETTLE);
    let promote_from = Instant::now();
    let reply = ctl(o, control, &["promote", DISK])?;
    let promote_to = Instant::now();
    std::thread::sleep(SETTLE);
    Ok(Finished {
        start,
        resumed,
        done_at,
        done,
        promote_from,
        promote_to,
        reply,
    })
}

/// Waits up to 10 s for `path` to appear.
fn wait_for(path: &Path, log: &Path) -> Result<(), CompareError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(CompareError::NoSocket(
                "dovetail (control)",
                log.to_path_buf(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Parts 2 and 3 (module docs).
#[allow(clippy::type_complexity)]
fn live(o: &MigrateOptions) -> Result<(Vec<LivePhase>, Vec<Report>, Promote, Check), CompareError> {
    let store = o.dir.join("serve-store");
    let image = o.dir.join("serve.img");
    let socket = o.dir.join("migrate.sock");
    let control = o.dir.join("migrate-control.sock");
    let log = o.dir.join("migrate-daemon.log");
    let export = o.dir.join("promoted.img");
    let _ = std::fs::remove_file(&control);
    let _ = std::fs::remove_file(&export);

    eprintln!(
        "migrate: writing a {} disk of self-describing blocks ...",
        format_size(o.serve_size)
    );
    write_verify_image(&image, o.serve_size)?;
    create_store(o, &store, o.serve_size)?;
    import_and_tee(o, &store, &image)?;
    let _ = std::fs::remove_file(&image);
    sync_dir(&store)?;

    let mut cmd = Command::new(&o.dovetail);
    cmd.arg("serve")
        .arg("--store")
        .arg(&store)
        .arg("--disk")
        .arg(format!("{DISK}={}", socket.display()))
        .arg("--control")
        .arg(&control)
        .arg("--queues")
        .arg(o.queues.to_string());
    let daemon = Daemon::spawn("dovetail", cmd, &socket, &log, None)?;
    wait_for(&control, &log)?;

    let disk_blocks = o.serve_size / BLOCK;
    let mut state = image_state(o.working_set / u64::from(o.block_size), disk_blocks);
    let w = Workload {
        read_percent: o.read_percent,
        block_size: o.block_size,
        iodepth: o.iodepth,
        queues: o.queues,
        limit: Limit::Time(o.duration),
        region: Some((0, o.working_set)),
        verify: true,
        timeout: REQUEST_TIMEOUT,
        slow_threshold: Some(SLOW),
        ..Workload::new(Pattern::RandRw)
    };

    if !o.warmup.is_zero() {
        let ww = Workload {
            limit: Limit::Time(o.warmup),
            ..w.clone()
        };
        let (driver, device) = load::connect(&socket, &ww).map_err(load_err("warm-up"))?;
        let r = load::run(&driver, &device, &ww, Some(&mut state)).map_err(load_err("warm-up"))?;
        drop(driver);
        report_phase("warm-up", &r, Some(&status(o, &control)?));
        if r.io_errors > 0 || r.verify.as_ref().is_some_and(|v| !v.corrupt.is_empty()) {
            return Err(msg("I/O errors or corrupt reads in the warm-up"));
        }
    }
    let mut phases = Vec::new();
    let mut reports = Vec::new();
    for pair in 1..=o.pairs {
        let order = if pair % 2 == 1 {
            [Kind::Baseline, Kind::CopyOut]
        } else {
            [Kind::CopyOut, Kind::Baseline]
        };
        for kind in order {
            let now = status(o, &control)?;
            match (kind, now.state.as_str()) {
                (Kind::Baseline, "running") => {
                    ctl(o, &control, &["migrate", DISK, "--pause"])?;
                }
                (Kind::CopyOut, "none") => {
                    ctl(o, &control, &["migrate", DISK])?;
                }
                (Kind::CopyOut, "paused") => {
                    ctl(o, &control, &["migrate", DISK, "--resume"])?;
                }
                _ => {}
            }
            let name = format!("{} {pair}", kind.label());
            let (driver, device) = load::connect(&socket, &w).map_err(load_err(&name))?;
            let before = status(o, &control)?;
            let cpu = (
                process_cpu(daemon.pid()),
                load::CpuTime::process().total(),
                CpuSample::now(),
            );
            let r = load::run(&driver, &device, &w, Some(&mut state)).map_err(load_err(&name))?;
            let daemon_cpu_s = process_cpu(daemon.pid()) - cpu.0;
            let bench_cpu_s = load::CpuTime::process().total() - cpu.1;
            let (kernel_cpu_s, other_cpu_s) = cpu.2.split(daemon_cpu_s + bench_cpu_s);
            let after = status(o, &control)?;
            drop(driver);
            report_phase(&name, &r, Some(&after));
            if kind == Kind::CopyOut && after.state != "running" {
                eprintln!(
                    "migrate: the copy-out was {} at the end of {name}: the disk is too small \
                     for these phases (--serve-size)",
                    after.state
                );
            }
            phases.push(LivePhase {
                kind,
                pair,
                phase: Phase::of(&r),
                before,
                after,
                daemon_cpu_s,
                bench_cpu_s,
                kernel_cpu_s,
                other_cpu_s,
            });
            reports.push(r);
        }
    }

    // Part 3: the copy-out at full speed to the end, then the promote, under the same load.
    let stop = Arc::new(AtomicBool::new(false));
    let fw = Workload {
        limit: Limit::Time(Duration::from_secs(24 * 3600)),
        stop: Some(stop.clone()),
        ..w.clone()
    };
    let name = "finish and promote";
    let (driver, device) = load::connect(&socket, &fw).map_err(load_err(name))?;
    let (report, fin) = std::thread::scope(|scope| {
        let c = scope.spawn(|| finish_and_promote(o, &control, &stop));
        let report = load::run(&driver, &device, &fw, Some(&mut state));
        stop.store(true, Ordering::Relaxed);
        let fin = c
            .join()
            .unwrap_or_else(|_| Err(msg("the controller panicked")));
        (report, fin)
    });
    drop(driver);
    let report = report.map_err(load_err(name))?;
    report_phase(name, &report, None);
    let fin = fin?;
    let pause = parse_reply(&fin.reply.to_string()).map_err(msg)?;
    let message = fin
        .reply
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "promote: pause {:.3} ms (drain {:.3} ms, change {:.3} ms), command {:.1} ms",
        pause.total_us as f64 / 1e3,
        pause.drain_us as f64 / 1e3,
        pause.change_us as f64 / 1e3,
        (fin.promote_to - fin.promote_from).as_secs_f64() * 1e3
    );
    let window = fin.promote_to + SLACK - fin.promote_from;
    let promote =
        Promote {
            finish_s: (fin.done_at - fin.resumed).as_secs_f64(),
            finish_copied_blocks: fin
                .done
                .copied_blocks
                .saturating_sub(fin.start.copied_blocks),
            start: fin.start,
            pause,
            command_ms: (fin.promote_to - fin.promote_from).as_secs_f64() * 1e3,
            guest_max_us: slowest_between(&report.slow, fin.promote_from, fin.promote_to + SLACK),
            guest_max_at_ms: slowest_in(&report.slow, fin.promote_from, fin.promote_to + SLACK)
                .map_or(0.0, |r| {
                    r.done
                        .saturating_duration_since(fin.promote_from)
                        .as_secs_f64()
                        * 1e3
                }),
            guest_max_before_us: fin.promote_from.checked_sub(window).map_or(0.0, |from| {
                slowest_between(&report.slow, from, fin.promote_from)
            }),
            guest_max_finishing_us: slowest_between(&report.slow, fin.resumed, fin.done_at),
            phase: Phase::of(&report),
            message,
        };
    eprintln!(
        "promote: the guest's slowest request while it ran took {:.1} ms, completed at +{:.0} ms",
        promote.guest_max_us / 1e3,
        promote.guest_max_at_ms
    );
    reports.push(report);

    // Read the promoted disk back: stop the daemon, export, check every block.
    drop(daemon);
    eprintln!("migrate: exporting the promoted disk and checking every block ...");
    dovetail(
        o,
        &[
            "disk",
            "export",
            &store.display().to_string(),
            DISK,
            "--to",
            &export.display().to_string(),
        ],
    )?;
    let check = check_image(&export, &state)?;
    let _ = std::fs::remove_file(&export);
    let _ = std::fs::remove_dir_all(&store);
    eprintln!(
        "read-back: {} of {} blocks good, {} corrupt",
        check.good, check.blocks, check.corrupt
    );
    Ok((phases, reports, promote, check))
}

/// Runs the benchmark (module docs) and returns what it measured.
pub fn run(o: &MigrateOptions) -> Result<MigrateResult, CompareError> {
    let started = Instant::now();
    if o.size % BLOCK != 0 || o.serve_size % BLOCK != 0 || o.working_set % BLOCK != 0 {
        return Err(msg("sizes must be whole 4 KiB blocks"));
    }
    if o.working_set > o.serve_size {
        return Err(msg("the working set is larger than the served disk"));
    }
    std::fs::create_dir_all(&o.dir).map_err(io(format!("create {}", o.dir.display())))?;

    // Part 1.
    let src = o.dir.join("dd-src.raw");
    eprintln!("migrate: writing {} of data ...", format_size(o.size));
    prepare_image(&src, o.size)?;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    if dev(&src) != dev(&o.dir) {
        return Err(msg("the dd files and the store are not on one filesystem"));
    }
    let mut reps = Vec::new();
    for rep in 1..=o.reps {
        reps.push(copy_rep(o, rep, &src)?);
    }
    let _ = std::fs::remove_file(&src);
    let median_ratio = median(reps.iter().map(|r| r.ratio));
    let median_ratio_reported = median(reps.iter().map(|r| r.ratio_reported));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let quiet_reps: Vec<u32> = reps
        .iter()
        .filter(|r| {
            r.dd_other_cpu_s < QUIET * cpus as f64 * r.dd_s
                && r.copy_other_cpu_s < QUIET * cpus as f64 * r.copy_s
        })
        .map(|r| r.rep)
        .collect();
    let quiet_median_ratio = median(
        reps.iter()
            .filter(|r| quiet_reps.contains(&r.rep))
            .map(|r| r.ratio),
    );
    let judged_copy_ratio = if quiet_reps.is_empty() {
        median_ratio
    } else {
        quiet_median_ratio
    };

    // Parts 2 and 3.
    let (phases, reports, promote, check) = live(o)?;
    let mut base = None;
    let mut with = None;
    for (p, r) in phases.iter().zip(&reports) {
        match p.kind {
            Kind::Baseline => pool(&mut base, r),
            Kind::CopyOut => pool(&mut with, r),
        }
    }
    let baseline = base.as_ref().map(Phase::of).unwrap_or_default();
    let copy_out = with.as_ref().map(Phase::of).unwrap_or_default();
    let pair_ratios: Vec<f64> = (1..=o.pairs)
        .filter_map(|pair| {
            let of = |k| {
                phases
                    .iter()
                    .find(|p| p.pair == pair && p.kind == k)
                    .map(|p| p.phase.iops)
            };
            Some(ratio(of(Kind::CopyOut)?, of(Kind::Baseline)?))
        })
        .collect();
    let iops_ratio = ratio(copy_out.iops, baseline.iops);
    let quiet = |p: &LivePhase| p.other_cpu_s < QUIET * cpus as f64 * p.phase.elapsed_s;
    let quiet_pairs: Vec<u32> = (1..=o.pairs)
        .filter(|&pair| {
            let mut of_pair = phases.iter().filter(|p| p.pair == pair);
            of_pair.clone().count() == 2 && of_pair.all(quiet)
        })
        .collect();
    let pooled_iops = |k: Kind| {
        let (ops, secs) = phases
            .iter()
            .filter(|p| p.kind == k && quiet_pairs.contains(&p.pair))
            .fold((0u64, 0.0), |(o, t), p| {
                (o + p.phase.ops(), t + p.phase.elapsed_s)
            });
        ops as f64 / secs.max(1e-9)
    };
    let quiet_ratio = ratio(pooled_iops(Kind::CopyOut), pooled_iops(Kind::Baseline));
    let judged_ratio = if quiet_pairs.is_empty() {
        iops_ratio
    } else {
        quiet_ratio
    };
    let copy_out_ran_throughout = phases
        .iter()
        .filter(|p| p.kind == Kind::CopyOut)
        .all(|p| p.after.state == "running");
    let rate_limit = phases
        .iter()
        .find(|p| p.kind == Kind::CopyOut)
        .map_or(0, |p| p.after.rate_limit);
    let clean = reports
        .iter()
        .all(|r| r.io_errors == 0 && r.verify.as_ref().is_none_or(|v| v.corrupt.is_empty()))
        && check.corrupt == 0
        && check.good == check.blocks;
    let pause_ms = promote.pause.total_us as f64 / 1e3;
    Ok(MigrateResult {
        size: o.size,
        copy_target: COPY_TARGET,
        copy_target_met: judged_copy_ratio >= COPY_TARGET,
        copy_target_judged: !quiet_reps.is_empty(),
        quiet_reps,
        quiet_median_ratio,
        judged_copy_ratio,
        median_ratio,
        median_ratio_reported,
        reps,
        policy: o.policy.clone(),
        workload: o.workload_label(),
        serve_size: o.serve_size,
        working_set: o.working_set,
        duration_s: o.duration.as_secs_f64(),
        warmup_s: o.warmup.as_secs_f64(),
        queues: o.queues,
        phases,
        baseline,
        copy_out,
        iops_target: IOPS_TARGET,
        iops_target_met: judged_ratio >= IOPS_TARGET,
        iops_target_judged: !quiet_pairs.is_empty(),
        quiet_pairs,
        quiet_ratio,
        judged_ratio,
        iops_ratio,
        pair_ratios,
        copy_out_ran_throughout,
        rate_limit,
        pause_target_ms: PAUSE_TARGET_MS,
        pause_target_met: pause_ms < PAUSE_TARGET_MS,
        guest_pause_target_met: promote.guest_max_us < PAUSE_TARGET_MS * 1e3,
        promote,
        check,
        clean,
        cpus,
        runtime_s: started.elapsed().as_secs_f64(),
    })
}

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1e3)
}

/// A slowest-request figure: 0 stands for "no request took 1 ms or more".
fn guest_ms(us: f64) -> String {
    if us > 0.0 {
        ms(us)
    } else {
        "< 1".into()
    }
}

/// The verdict on a target, or none when every measurement behind it was disturbed.
fn disturbed_verdict(ok: bool, all_disturbed: bool) -> &'static str {
    if all_disturbed {
        "**not judged**"
    } else {
        verdict(ok)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The tables and verdicts, as Markdown.
pub fn tables(r: &MigrateResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "**Copy-out against dd**, {} copied, MB/s = 10^6 bytes/s:\n\n\
         | run | dd s | dd MB/s | copy-out s | copy-out MB/s | copy-out/dd | dd MB/s (its own figure) | copy-out MB/s (its own figure) | copy-out/dd (own figures) | CPU s, dd / copy-out | kernel threads' CPU s, during dd / the copy-out | other processes' CPU s, during dd / the copy-out |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        format_size(r.size)
    );
    for c in &r.reps {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.0} | {:.3} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
            c.rep,
            c.dd_s,
            c.dd_mb_s,
            c.copy_s,
            c.copy_mb_s,
            c.ratio,
            c.dd_reported_mb_s,
            c.copy_reported_mb_s,
            c.ratio_reported,
            c.dd_cpu_s,
            c.copy_cpu_s,
            c.dd_kernel_cpu_s,
            c.copy_kernel_cpu_s,
            c.dd_other_cpu_s,
            c.copy_other_cpu_s
        );
    }
    let _ = writeln!(
        s,
        "| **median** | | {:.0} | | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | | | |",
        median(r.reps.iter().map(|c| c.dd_mb_s)),
        median(r.reps.iter().map(|c| c.copy_mb_s)),
        r.median_ratio,
        median(r.reps.iter().map(|c| c.dd_reported_mb_s)),
        median(r.reps.iter().map(|c| c.copy_reported_mb_s)),
        r.median_ratio_reported
    );

    let _ = writeln!(
        s,
        "\n**The guest with and without a running copy-out** (latency in µs; *copied* is what \
         the copy-out copied during the phase, *present* every block that reached the candidate, \
         the guest's writes included; the state is the copy-out's at the phase's end; CPU \
         seconds of the daemon, of the load generator, of kernel threads, and of every other \
         process on the machine):\n\n\
         | phase | IOPS | p50 | p99 | p99.9 | max | copied (blocks) | copy-out MB/s | present (blocks) | state at the end | CPU s: daemon / generator / kernel / other processes |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
    );
    for p in &r.phases {
        let f = &p.phase;
        let _ = writeln!(
            s,
            "| {} {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {} | {} ({} of {} present) | {:.1} / {:.1} / {:.1} / {:.1} |",
            p.kind.label(),
            p.pair,
            fmt_iops(f.iops),
            f.lat_us.p50,
            f.lat_us.p99,
            f.lat_us.p999,
            f.lat_us.max,
            p.copied(),
            p.copy_mb_s(),
            p.present(),
            p.after.state,
            p.after.blocks_present,
            p.after.blocks_total,
            p.daemon_cpu_s,
            p.bench_cpu_s,
            p.kernel_cpu_s,
            p.other_cpu_s
        );
    }
    let (b, c) = (&r.baseline, &r.copy_out);
    let cpu = |k: Kind| {
        let of = |f: fn(&LivePhase) -> f64| -> f64 {
            r.phases.iter().filter(|p| p.kind == k).map(f).sum()
        };
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1}",
            of(|p| p.daemon_cpu_s),
            of(|p| p.bench_cpu_s),
            of(|p| p.kernel_cpu_s),
            of(|p| p.other_cpu_s)
        )
    };
    let _ = writeln!(
        s,
        "\nAll phases of each kind together:\n\n\
         | | baseline | with copy-out | with/baseline |\n\
         | --- | ---: | ---: | ---: |\n\
         | IOPS | {} | {} | {:.2} |\n\
         | latency p50 | {:.1} | {:.1} | {:.2} |\n\
         | latency p99 | {:.1} | {:.1} | {:.2} |\n\
         | latency p99.9 | {:.1} | {:.1} | {:.2} |\n\
         | latency max | {:.1} | {:.1} | {:.2} |\n\
         | requests of 1 ms or more | {} of {} | {} of {} | |\n\
         | seconds measured | {:.1} | {:.1} | |\n\
         | CPU s: daemon / generator / kernel / other processes | {} | {} | |",
        fmt_iops(b.iops),
        fmt_iops(c.iops),
        r.iops_ratio,
        b.lat_us.p50,
        c.lat_us.p50,
        ratio(c.lat_us.p50, b.lat_us.p50),
        b.lat_us.p99,
        c.lat_us.p99,
        ratio(c.lat_us.p99, b.lat_us.p99),
        b.lat_us.p999,
        c.lat_us.p999,
        ratio(c.lat_us.p999, b.lat_us.p999),
        b.lat_us.max,
        c.lat_us.max,
        ratio(c.lat_us.max, b.lat_us.max),
        b.over_1ms,
        b.ops(),
        c.over_1ms,
        c.ops(),
        b.elapsed_s,
        c.elapsed_s,
        cpu(Kind::Baseline),
        cpu(Kind::CopyOut)
    );

    let p = &r.promote;
    let _ = writeln!(
        s,
        "\n**Promote** (the copy-out resumed at `--rate 0` under the same load, then `ctl \
         promote`; times in ms):\n\n\
         | | |\n| --- | ---: |\n\
         | copy-out finishing at full speed: blocks copied / seconds / MB/s | {} / {:.1} / {:.0} |\n\
         | the guest's slowest request meanwhile | {} |\n\
         | pause reported by the daemon: total (drain + change) | **{}** ({} + {}) |\n\
         | whole `dovetail ctl promote` command | {:.1} |\n\
         | the guest's slowest request while it ran (it completed at +{:.0} ms) | {} |\n\
         | the same, in as long a time just before it | {} |\n\
         | the final phase: IOPS, p50 / p99 / max µs | {} IOPS, {:.1} / {:.1} / {:.1} |",
        p.finish_copied_blocks,
        p.finish_s,
        (p.finish_copied_blocks * BLOCK) as f64 / 1e6 / p.finish_s.max(1e-9),
        guest_ms(p.guest_max_finishing_us),
        ms(p.pause.total_us as f64),
        ms(p.pause.drain_us as f64),
        ms(p.pause.change_us as f64),
        p.command_ms,
        p.guest_max_at_ms,
        guest_ms(p.guest_max_us),
        guest_ms(p.guest_max_before_us),
        fmt_iops(p.phase.iops),
        p.phase.lat_us.p50,
        p.phase.lat_us.p99,
        p.phase.lat_us.max,
    );

    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "- Target: copy-out at ≥ {:.1}× dd's throughput: {} ({}; the median of all {} runs \
         {:.2}× as whole processes, {:.2}× by the tools' own figures).",
        r.copy_target,
        disturbed_verdict(r.copy_target_met, !r.copy_target_judged),
        if r.quiet_reps.is_empty() {
            format!(
                "every run was disturbed by other processes, so the figures may be off either \
                 way; taken at face value they would have {} it",
                if r.copy_target_met { "met" } else { "missed" }
            )
        } else {
            let q: Vec<String> = r.quiet_reps.iter().map(u32::to_string).collect();
            format!(
                "**{:.2}×**, the median of the undisturbed run{} {} (other processes under {:.0} \
                 % of the machine's CPU during both copies), which the target is judged on",
                r.quiet_median_ratio,
                if q.len() == 1 { "" } else { "s" },
                q.join(", "),
                QUIET * 100.0
            )
        },
        r.reps.len(),
        r.median_ratio,
        r.median_ratio_reported
    );
    let pairs: Vec<String> = r.pair_ratios.iter().map(|x| format!("{x:.2}")).collect();
    let _ = writeln!(
        s,
        "- Target: the guest keeps ≥ {:.1}× its IOPS while the copy-out runs: {} ({}; {:.2}× \
         over all phases; pair by pair {}). The copy-out {} (rate limit {}/s).",
        r.iops_target,
        disturbed_verdict(r.iops_target_met, !r.iops_target_judged),
        if r.quiet_pairs.is_empty() {
            format!(
                "every pair was disturbed by other processes; taken at face value the figures \
                 would have {} it",
                if r.iops_target_met { "met" } else { "missed" }
            )
        } else {
            let q: Vec<String> = r.quiet_pairs.iter().map(u32::to_string).collect();
            format!(
                "**{:.2}×** over the undisturbed pair{} {} (other processes under {:.0} % of the \
                 machine's CPU in both phases), which the target is judged on",
                r.quiet_ratio,
                if q.len() == 1 { "" } else { "s" },
                q.join(", "),
                QUIET * 100.0
            )
        },
        r.iops_ratio,
        pairs.join(", "),
        if r.copy_out_ran_throughout {
            "was running at the end of every with-copy-out phase"
        } else {
            "**finished (or stopped) during a with-copy-out phase**: those phases are partly \
             without it; run again with a larger --serve-size"
        },
        format_size(r.rate_limit)
    );
    let _ = writeln!(
        s,
        "- Target: a promote pause under {:.0} ms: {} (the daemon reported {} ms); as the guest \
         saw it: {} (its slowest request while the promote ran took {} ms).",
        r.pause_target_ms,
        verdict(r.pause_target_met),
        ms(p.pause.total_us as f64),
        verdict(r.guest_pause_target_met),
        guest_ms(p.guest_max_us)
    );
    let other = |k: Kind| -> f64 {
        r.phases
            .iter()
            .filter(|p| p.kind == k)
            .map(|p| p.other_cpu_s)
            .sum()
    };
    let max_of = |f: fn(&CopyRun) -> f64| r.reps.iter().map(f).fold(0.0, f64::max);
    let min_of = |f: fn(&CopyRun) -> f64| {
        r.reps
            .iter()
            .map(f)
            .fold(f64::INFINITY, f64::min)
            .min(max_of(f))
    };
    let _ = writeln!(
        s,
        "- Disturbance (this machine is shared): other processes used {:.1} CPU-s during the \
         baseline phases and {:.1} during the with-copy-out phases (of {:.0} CPU-s the machine \
         had in each); at most {:.2} s during a dd run and {:.2} s during a copy-out run. dd's \
         own CPU time for the same bytes ranged over {:.2} to {:.2} s, the copy-out's over {:.2} \
         to {:.2} s (see *Reading the ratio* below).",
        other(Kind::Baseline),
        other(Kind::CopyOut),
        r.cpus as f64 * r.duration_s * r.phases.len() as f64 / 2.0,
        max_of(|c| c.dd_other_cpu_s),
        max_of(|c| c.copy_other_cpu_s),
        min_of(|c| c.dd_cpu_s),
        max_of(|c| c.dd_cpu_s),
        min_of(|c| c.copy_cpu_s),
        max_of(|c| c.copy_cpu_s),
    );
    let io_errors: u64 =
        r.phases.iter().map(|p| p.phase.io_errors).sum::<u64>() + p.phase.io_errors;
    let corrupt: u64 = r.phases.iter().map(|p| p.phase.corrupt).sum::<u64>() + p.phase.corrupt;
    let _ = writeln!(
        s,
        "- Data: {io_errors} I/O errors and {corrupt} corrupt reads under load; the promoted \
         disk, exported, held {} of its {} blocks as expected ({} corrupt{}){}.",
        r.check.good,
        r.check.blocks,
        r.check.corrupt,
        r.check
            .first
            .as_ref()
            .map_or(String::new(), |f| format!(", the first: {f}")),
        if r.clean {
            ""
        } else {
            " — **the run is not clean**"
        }
    );
    s
}

/// The whole section, between its marker comments, starting with a blank line and ending with
/// a newline.
pub fn section(r: &MigrateResult, machine: &Machine, command: &str, when: &str) -> String {
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
        "Machine: {} CPUs ({}), {} of RAM, {}, kernel {}; the stores and dd's files on {}; \
         dovetail revision {}.\n",
        machine.nproc,
        machine.cpu_model,
        machine.memory,
        machine.os,
        machine.kernel,
        machine.filesystem,
        machine.revision
    );
    let _ = writeln!(
        s,
        "**Copy-out against dd.** {reps} runs, alternating. *dd*: `dd if=SRC of=DST bs=1M \
         conv=fdatasync`, SRC a file of {size} of pseudo-random data written and fsynced \
         beforehand, DST a new file in the same directory. *copy-out*: a fresh store (`store \
         create`), one parallax-v1 disk of {size} imported from SRC (`disk import`: every \
         block holds data), a parallax-v1 candidate attached offline (`disk tee DIR {DISK} \
         --candidate parallax-v1 --policy {policy}`), then `dovetail migrate DIR {DISK} --rate \
         0` (release build). Page cache, the same for both: before each timing the filesystem \
         is synced (`syncfs`, so no earlier writes are flushed inside it) and the source read \
         once (SRC; the data ranges of the store's data file), so both read from memory; \
         then, as this VM hands the memory it frees back to its host (virtio-balloon free page \
         reporting) and the first process to touch such memory again pays for it in CPU time, \
         a scratch file of {size} + 256 MiB is written and deleted, so both draw on recently \
         freed memory for what they write; both \
         end with their copy durable (dd's `fdatasync`; the copy-out's last checkpoint: the \
         candidate flushed with `fdatasync`, then its presence map). *s* is the process from \
         start to exit, timed by the bench, and MB/s = {size} ÷ that; the *own figures* are \
         dd's (its clock includes the final sync) and the rate `dovetail migrate` prints (data \
         bytes over the job's own time, without opening and closing the store). *CPU s* is \
         the process's own CPU time (user + system); beside it, what the kernel's threads \
         (writeback among them) and every other process on the machine used meanwhile \
         (`/proc/stat` and `/proc/PID/stat`): this machine is shared, and a large figure for \
         other processes means the run was disturbed. The target is judged on the median of \
         the runs in which other processes used under {quiet:.0} % of the machine's CPU during \
         both copies, when there are any. Each run's store and DST are deleted after it.\n",
        reps = r.reps.len(),
        size = format_size(r.size),
        policy = r.policy,
        quiet = QUIET * 100.0,
    );
    let _ = writeln!(
        s,
        "**The guest during a copy-out, and the promote.** One parallax-v1 disk of {serve} in \
         a fresh store, written in full beforehand (`disk import` of an image in which every \
         4 KiB block is a self-describing write, the load generator's verify format), teed to \
         a parallax-v1 candidate under `{policy}` (`disk tee`, offline), served by the release \
         build (`dovetail serve --store DIR --disk {DISK}=SOCK --control CTL --queues {q}`) and \
         driven by the load generator in verify mode ({workload}: the guest's working set; \
         every read is checked against the record of acknowledged writes). After a warm-up of \
         {warm:.0} s (the same load, not counted), phases of {secs:.0} s, each on a new \
         connection, alternate in pairs ordered baseline, with; with, baseline; ... (so a \
         steady drift cancels over two pairs): *baseline* (the Tee alone: the copy-out not \
         started yet, later paused with `ctl migrate {DISK} --pause`) and *with copy-out* \
         (`ctl migrate {DISK}`, the daemon's default rate, later `--resume`). The guest's own \
         writes bring their blocks to the candidate too (upgrade-on-write), so the working set \
         is soon all present and the copy-out spends the phases on the rest of the disk; the \
         disk is sized so that it is still running at the end of the last with-phase. This \
         machine is shared with other work, so the CPU time of every other process is recorded \
         per phase; the IOPS target is judged on the pairs in which other processes used under \
         {quiet:.0} % of the machine's CPU in both phases, when there are any. Then, \
         under the same load, the copy-out is set to `--rate 0` and resumed, the bench polls \
         `ctl migrate {DISK} --status` until it is done, waits 1 s and runs `ctl --json \
         promote {DISK}`; the pause is the daemon's figure from the reply, *the guest's slowest \
         request while it ran* the slowest the generator saw complete from `dovetail ctl` \
         starting to 5 ms after it exited (\"< 1\": none took 1 ms). Last, the daemon is \
         stopped, the promoted disk exported (`disk export`) and every block checked.\n",
        serve = format_size(r.serve_size),
        policy = r.policy,
        q = r.queues,
        workload = r.workload,
        secs = r.duration_s,
        warm = r.warmup_s,
        quiet = QUIET * 100.0,
    );
    s.push_str(&tables(r));
    let _ = writeln!(s, "\n{NOTES}\n{END}");
    s
}

/// `doc` with the section replaced (between its markers) or, the first time, inserted before
/// the "Load generator overhead" section (else at the end). The rest of `doc` is kept byte for
/// byte.
pub fn replace_section(doc: &str, section: &str) -> String {
    crate::section::replace(doc, section, BEGIN, END, Some("## Load generator overhead"))
}

/// Rewrites the section of the Markdown file `path` (created if missing).
pub fn write_section(path: &Path, section: &str) -> Result<(), CompareError> {
    crate::section::write(
        path,
        section,
        BEGIN,
        END,
        Some("## Load generator overhead"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_outputs_are_parsed() {
        let dd = "1024+0 records in\n1024+0 records out\n1073741824 bytes (1.1 GB, 1.0 GiB) \
                  copied, 0.709121 s, 1.5 GB/s\n";
        assert_eq!(parse_dd(dd), Some((1 << 30, 0.709121)));
        assert_eq!(parse_dd("dd: error"), None);
        let m = "disk d: every block is in the candidate (262144 copied, 0 zero blocks, 815.4 \
                 MiB/s); `dovetail ctl promote` (live) promotes it\n";
        assert_eq!(parse_migrate(m), Some((262_144, 0, 815.4)));
        assert_eq!(parse_migrate("nothing"), None);
    }

    #[test]
    fn progress_is_read_from_replies() {
        let none: Value = serde_json::from_str(
            r#"{"migration":{"blocks_present":5,"blocks_total":10,"copy_out":null,"mode":null}}"#,
        )
        .expect("json");
        let p = Progress::of(&none).expect("progress");
        assert_eq!(
            (p.state.as_str(), p.blocks_present, p.blocks_total),
            ("none", 5, 10)
        );
        let running: Value = serde_json::from_str(
            r#"{"migration":{"blocks_present":7,"blocks_total":10,"copy_out":{"blocks_present":7,"blocks_total":10,"bytes_copied":8192,"checkpoints":0,"copied_blocks":2,"elapsed_seconds":0.1,"error":null,"eta_seconds":null,"rate_bytes_per_second":0.0,"rate_limit":67108864,"state":"running","zero_blocks":0},"mode":"copy-out"}}"#,
        )
        .expect("json");
        let p = Progress::of(&running).expect("progress");
        assert_eq!(p.state, "running");
        assert_eq!((p.copied_blocks, p.rate_limit), (2, 64 << 20));
        assert!(Progress::of(&serde_json::json!({"message": "x"})).is_err());
    }

    #[test]
    fn the_served_disk_outlasts_the_phases() {
        // 64 MiB/s for 3 × 10 s is 1920 MiB; 1.5 times that is 2880 MiB, 3 GiB in 256 MiB steps.
        assert_eq!(
            auto_serve_size(1 << 30, Duration::from_secs(10), 3),
            4 << 30
        );
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0]), 1.0);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn images_check_against_their_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        write_verify_image(&path, 64 * BLOCK).expect("image");
        let state = image_state(16, 64);
        let c = check_image(&path, &state).expect("check");
        assert_eq!((c.blocks, c.good, c.corrupt), (64, 64, 0));
        // A block past the record that holds another block's data is caught.
        let f = File::options().write(true).open(&path).expect("open");
        let mut b = vec![0u8; BLOCK as usize];
        stamp(&mut b, 40 * BLOCK, 7);
        f.write_all_at(&b, 40 * BLOCK).expect("write");
        let c = check_image(&path, &state).expect("check");
        assert_eq!((c.good, c.corrupt), (63, 1));
        assert!(warm(&path).expect("warm") >= 64 * BLOCK);
    }

    #[test]
    fn the_section_is_inserted_then_replaced_in_place() {
        let doc = "# B\n\n<!-- dovetail-bench pause: begin -->\np\n<!-- dovetail-bench pause: \
                   end -->\n\n## Load generator overhead\n\nmore\n";
        let one = format!("\n{BEGIN}\n## {TITLE}\n\nfirst\n{END}\n");
        let two = format!("\n{BEGIN}\n## {TITLE}\n\nsecond\n{END}\n");
        let a = replace_section(doc, &one);
        assert!(a.contains(&format!(
            "pause: end -->\n\n{BEGIN}\n## {TITLE}\n\nfirst\n{END}\n\n## Load generator"
        )));
        let b = replace_section(&a, &two);
        assert_eq!(b, replace_section(doc, &two));
        assert_eq!(replace_section(&b, &two), b);
    }
}
